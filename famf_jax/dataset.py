"""Finding FAMF data on disk and splitting it by patient (spec section 1.1, B29).

Two inputs are understood:
- the original layout, `<root>/<patient>/{gray.jpg, elastic.jpg, label.npy}` with split lists
  `<splits>/{train,valid,test}/<patient>` or `<splits>/ac_k_fold_<i>/{train,valid,test}/<patient>`;
- a CSV manifest `patient_id,bmode,swe,label[,split]` (relative paths are relative to the CSV).

Hidden entries are skipped and reported, unreadable images are reported by name and excluded.
The resulting plan (test set and folds, patient ids) is written to the workdir as splits.json.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Sequence

import numpy as np
from absl import logging
from PIL import Image

from common import atomic

SPLITS = ("train", "valid", "test")
BMODE_FILE, SWE_FILE, LABEL_FILE = "gray.jpg", "elastic.jpg", "label.npy"


@dataclasses.dataclass(frozen=True)
class Record:
    patient_id: str
    bmode: str
    swe: str
    label: int


class DataError(ValueError):
    """The data on disk cannot be used; the message names what is wrong."""


def _visible(
    entries: Sequence[pathlib.Path], where: str, problems: list[str]
) -> list[pathlib.Path]:
    out = []
    for e in sorted(entries):
        if e.name.startswith("."):
            problems.append(f"{where}: hidden entry {e.name!r} ignored")
        else:
            out.append(e)
    return out


def _readable(path: str) -> str | None:
    """None if `path` opens as an image, else the reason."""
    try:
        with Image.open(path) as im:
            im.verify()
        return None
    except FileNotFoundError:
        return "missing"
    except Exception as e:  # PIL raises many kinds for corrupt files
        return f"unreadable ({type(e).__name__}: {e})"


def _check_images(records: list[Record], problems: list[str]) -> list[Record]:
    good = []
    for r in records:
        bad = [(p, why) for p in (r.bmode, r.swe) if (why := _readable(p))]
        for p, why in bad:
            problems.append(f"patient {r.patient_id}: image {p} {why}; patient excluded")
        if not bad:
            good.append(r)
    return good


def _read_label(path: pathlib.Path) -> int:
    value = np.load(path, allow_pickle=False)
    if value.size != 1:
        raise DataError(f"{path}: label must hold one value, has shape {value.shape}")
    label = int(float(value.reshape(())))
    if label not in (0, 1):
        raise DataError(f"{path}: label must be 0 or 1, is {label}")
    return label


def scan_layout(
    root: str | pathlib.Path, problems: list[str], require_label: bool = True
) -> dict[str, Record]:
    """All patients of `<root>/<patient>/...`, keyed by patient id (label -1 if not required
    and absent)."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise DataError(f"data.root {root} is not a folder")
    records = {}
    for d in _visible([p for p in root.iterdir() if p.is_dir()], str(root), problems):
        label_path = d / LABEL_FILE
        if not label_path.exists() and not require_label:
            records[d.name] = Record(d.name, str(d / BMODE_FILE), str(d / SWE_FILE), -1)
            continue
        if not label_path.exists():
            problems.append(f"patient {d.name}: no {LABEL_FILE}; patient excluded")
            continue
        try:
            label = _read_label(label_path)
        except (DataError, ValueError, OSError) as e:
            problems.append(f"patient {d.name}: {e}; patient excluded")
            continue
        records[d.name] = Record(d.name, str(d / BMODE_FILE), str(d / SWE_FILE), label)
    return records


def read_split_lists(splits: str | pathlib.Path, problems: list[str]) -> list[dict[str, list[str]]]:
    """One {split: [patient ids]} per fold folder (`ac_k_fold_<i>`), or one for a flat folder."""
    splits = pathlib.Path(splits)
    if not splits.is_dir():
        raise DataError(f"data.splits {splits} is not a folder")
    fold_dirs = sorted(
        p for p in splits.iterdir() if p.is_dir() and p.name.startswith("ac_k_fold_")
    )
    fold_dirs = sorted(fold_dirs, key=lambda p: int(p.name.rsplit("_", 1)[1]))
    out = []
    for d in fold_dirs or [splits]:
        lists = {}
        for s in SPLITS:
            sd = d / s
            lists[s] = (
                [e.name for e in _visible(list(sd.iterdir()), str(sd), problems)]
                if sd.is_dir()
                else []
            )
        if not any(lists.values()):
            raise DataError(f"{d} has no train/valid/test lists")
        out.append(lists)
    return out


def read_manifest(path: str | pathlib.Path, problems: list[str], require_label: bool = True):
    """(records by patient, {split: ids} or None when there is no split column).

    Without `require_label` the label column may be missing or empty (label -1)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"data.manifest {path} does not exist")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"patient_id", "bmode", "swe"} | ({"label"} if require_label else set())
    if not rows or not need <= set(rows[0]):
        raise DataError(f"{path}: needs the columns {sorted(need)} (optional: split)")
    base = path.parent
    records, splits = {}, ({s: [] for s in SPLITS} if "split" in rows[0] else None)
    for i, row in enumerate(rows, start=2):
        pid = row["patient_id"].strip()
        try:
            raw = (row.get("label") or "").strip()
            label = -1 if not raw and not require_label else int(float(raw))
        except ValueError:
            problems.append(f"{path}:{i}: label {row['label']!r} is not a number; row skipped")
            continue
        if label not in (0, 1) and (require_label or label != -1):
            problems.append(f"{path}:{i}: label {label} is not 0 or 1; row skipped")
            continue
        if pid in records:
            problems.append(f"{path}:{i}: patient {pid} listed twice; first row kept")
            continue
        rec = Record(pid, str(base / row["bmode"].strip()), str(base / row["swe"].strip()), label)
        records[pid] = rec
        if splits is not None:
            s = row["split"].strip().lower()
            s = {"val": "valid", "validation": "valid"}.get(s, s)
            if s not in SPLITS:
                problems.append(f"{path}:{i}: split {s!r} is not one of {SPLITS}; row skipped")
                del records[pid]
                continue
            splits[s].append(pid)
    return records, splits


def stratified_folds(
    ids: Sequence[str], labels: dict[str, int], k: int, seed: int
) -> list[list[str]]:
    """k disjoint patient groups with the class ratio kept (each class dealt round-robin)."""
    rng = np.random.default_rng(seed)
    folds: list[list[str]] = [[] for _ in range(k)]
    offset = 0
    for cls in (0, 1):
        members = sorted(i for i in ids if labels[i] == cls)
        rng.shuffle(members)
        for j, pid in enumerate(members):
            folds[(j + offset) % k].append(pid)
        offset += len(members)
    return [sorted(f) for f in folds]


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def check_disjoint(given: list[dict[str, list[str]]]) -> None:
    """A patient in two splits of one fold leaks test data into training: stop, naming them."""
    for k, g in enumerate(given):
        for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
            both = sorted(set(g[a]) & set(g[b]))
            if both:
                where = f"fold {k}: " if len(given) > 1 else ""
                raise DataError(
                    f"{where}{len(both)} patient(s) in both the {a} and the {b} split: "
                    + ", ".join(both[:5])
                    + (" ..." if len(both) > 5 else "")
                )


def plan_splits(
    labels: dict[str, int],
    given: list[dict[str, list[str]]] | None,
    folds: int,
    seed: int,
    test_fraction: float = 0.2,
    valid_fraction: float = 0.2,
) -> list[dict[str, list[str]]]:
    """Per fold {train, valid, test} patient ids; the test set stays fixed across folds.

    Given lists define the test set and one train/valid split. With folds > 1 their train and
    valid patients are re-split into stratified folds. With several given fold folders and
    folds <= their number, they are used as they are.
    """
    if given and len(given) > 1 and folds <= len(given):
        return [{s: sorted(g[s]) for s in SPLITS} for g in given[: max(folds, 1)]]
    if given:
        test = sorted(given[0]["test"])
        train, valid = sorted(given[0]["train"]), sorted(given[0]["valid"])
    else:
        parts = stratified_folds(sorted(labels), labels, max(round(1 / test_fraction), 2), seed)
        test, train, valid = parts[0], sorted(sum(parts[1:], [])), []
    if not test:
        raise DataError("the test set is empty")
    pool = sorted(set(train) | set(valid))
    if folds > 1:
        parts = stratified_folds(pool, labels, folds, seed + 1)
        return [{"train": sorted(set(pool) - set(p)), "valid": p, "test": test} for p in parts]
    if not valid:
        k = max(round(1 / valid_fraction), 2)
        valid = stratified_folds(train, labels, k, seed + 1)[0]
        train = sorted(set(train) - set(valid))
    return [{"train": train, "valid": valid, "test": test}]


@dataclasses.dataclass
class FamfData:
    records: dict[str, Record]
    folds: list[dict[str, list[str]]]
    problems: list[str]

    def split(self, fold: int, name: str) -> list[Record]:
        return [self.records[i] for i in self.folds[fold][name]]


def load(
    *,
    root: str | None,
    splits: str | None,
    manifest: str | None,
    folds: int,
    seed: int,
    workdir: str | pathlib.Path,
) -> FamfData:
    """Records and the fold plan; reuses `<workdir>/splits.json` when it exists."""
    problems: list[str] = []
    if manifest:
        records, given = read_manifest(manifest, problems)
        given = [given] if given else None
    elif root:
        records = scan_layout(root, problems)
        given = read_split_lists(splits, problems) if splits else None
    else:
        raise DataError("no data: set data.manifest, or data.root (and data.splits)")
    records = {r.patient_id: r for r in _check_images(list(records.values()), problems)}
    if given:
        for g in given:
            for s in SPLITS:
                missing = [i for i in g[s] if i not in records]
                for i in missing:
                    problems.append(f"split {s}: patient {i} has no usable data; left out")
                g[s] = [i for i in g[s] if i in records]
        check_disjoint(given)
    labels = {i: r.label for i, r in records.items()}
    plan_path = pathlib.Path(workdir) / "splits.json"
    # What the plan depends on: the patients and labels, the given lists, folds and seed (not
    # the spelling of a path, so a moved or re-addressed workdir still evaluates).
    inputs = {
        "patients": _digest(sorted(labels.items())),
        # list order is the file system's: compare the sets
        "given": _digest([{k: sorted(v) for k, v in g.items()} for g in given]) if given else None,
        "folds": folds,
        "seed": seed,
    }
    if plan_path.exists():
        saved = json.loads(plan_path.read_text())
        made_for = saved.get("inputs", {})  # older files store fewer inputs (or none)
        changed = {
            k: (made_for[k], v) for k, v in inputs.items() if k in made_for and made_for[k] != v
        }
        if changed:
            what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise DataError(
                f"{plan_path} was planned for other data settings ({what}; the run's settings "
                "are in config.json): use a new workdir, or delete it to plan again"
            )
        plan = saved["folds"]
        unknown = {i for f in plan for s in SPLITS for i in f[s]} - set(records)
        if unknown:
            raise DataError(f"{plan_path} names patients not in the data: {sorted(unknown)[:5]}")
    else:
        plan = plan_splits(labels, given, folds, seed)
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(plan_path, {"seed": seed, "inputs": inputs, "folds": plan})
    for p in problems:
        logging.warning("data: %s", p)
    return FamfData(records, plan, problems)
