"""Finding FAMF data on disk and splitting it by patient (spec section 1.1, B29).

Two inputs are understood:
- the original layout, `<root>/<patient>/{gray.jpg, elastic.jpg, label.npy}` with split lists
  `<splits>/{train,valid,test}/<patient>` or `<splits>/ac_k_fold_<i>/{train,valid,test}/<patient>`;
- a CSV manifest `patient_id,bmode,swe,label[,split]` (relative paths are relative to the CSV).

Hidden entries are skipped and reported; a patient whose image does not decode or whose label is
not 0 or 1 is left out with a warning naming the file and why. When that leaves a split empty or
too small, the error names the patients left out of it and why. A split list naming a patient
with no folder in the data is an error. The resulting plan (test set and folds, patient ids) is
written to the workdir as splits.json, only once every check passed.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from absl import logging
from PIL import Image

from common import atomic
from common.errors import brief

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


def _leave_out(excluded: dict[str, str], problems: list[str], pid: str, why: str) -> None:
    """Record why patient `pid` is left out (the first reason counts) and warn about it."""
    excluded.setdefault(pid, why)
    problems.append(f"patient {pid}: {why}; patient excluded")


def left_out_text(items: Sequence[tuple[str, str]], limit: int = 3) -> str:
    """'P1 (why); P2 (why); P3 (why); and 2 more (all in the warnings above)'."""
    shown = "; ".join(f"{pid} ({why})" for pid, why in items[:limit])
    more = len(items) - limit
    return shown + (f"; and {more} more (all in the warnings above)" if more > 0 else "")


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
    """None if `path` decodes completely as an 8-bit grey or colour image, else the reason.

    The whole file is decoded (a truncated JPEG passes PIL's `verify`), JPEGs at a reduced
    scale, which still reads every byte."""
    p = pathlib.Path(path)
    if p.is_dir():
        return f"image {path} is a folder"
    if not p.exists():
        return f"image {path} missing"
    try:
        with Image.open(p) as im:
            mode, (w, h) = im.mode, im.size
            if im.format == "JPEG":
                im.draft(mode, (max(1, w // 8), max(1, h // 8)))
            im.load()
    except Image.UnidentifiedImageError:
        return f"image {path} unreadable (not an image format PIL knows)"
    except Exception as e:  # PIL raises many kinds for corrupt files
        return f"image {path} unreadable ({type(e).__name__}: {e})"
    if mode.startswith("I") or mode == "F":  # 16/32-bit: RGB conversion would clip it
        return f"image {path} has mode {mode}, expected 8-bit grey or colour"
    return None


def check_images(
    records: list[Record], problems: list[str], excluded: dict[str, str] | None = None
) -> list[Record]:
    """The records whose two images decode; the others are left out, each with its reason."""
    excluded = {} if excluded is None else excluded
    paths = sorted({p for r in records for p in (r.bmode, r.swe)})
    # PIL decodes outside the GIL: threads make the paper's 714 images a few seconds.
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        why = dict(zip(paths, pool.map(_readable, paths)))
    good = []
    for r in records:
        bad = [why[p] for p in (r.bmode, r.swe) if why[p]]
        if bad:
            _leave_out(excluded, problems, r.patient_id, "; ".join(bad))
        else:
            good.append(r)
    return good


def _label_value(value, where: str) -> int:
    """0 or 1 from a number that must be exactly one of them ('1.0' is 1, 0.7 is an error)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where} {value!r} is not a number") from None
    if x not in (0.0, 1.0):
        raise DataError(f"{where} {value} is not 0 or 1")
    return int(x)


def _read_label(path: pathlib.Path) -> int:
    try:
        with path.open("rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise DataError(f"{path} is not a .npy file (numpy.save of one number)")
        value = np.load(path, allow_pickle=False)
    except DataError:
        raise
    except Exception as e:  # numpy raises ValueError, OSError, EOFError, ... for bad files
        raise DataError(f"{path} unreadable ({brief(e)})") from None
    if not isinstance(value, np.ndarray) or value.size != 1:
        shape = getattr(value, "shape", type(value).__name__)
        raise DataError(f"{path}: label must hold one value, has shape {shape}")
    return _label_value(value.reshape(()).item(), f"{path}: label")


def _check_folder(path: str | pathlib.Path, field: str, what: str) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.exists():
        raise DataError(f"{field} {path} does not exist (expected {what})")
    if not path.is_dir():
        raise DataError(f"{field} {path} is a file, expected {what}")
    return path


def scan_layout(
    root: str | pathlib.Path,
    problems: list[str],
    require_label: bool = True,
    excluded: dict[str, str] | None = None,
    field: str = "data.root",
) -> dict[str, Record]:
    """All patients of `<root>/<patient>/...`, keyed by patient id (label -1 if not required
    and absent). Patients with a missing or bad label are left out, with the reason in
    `excluded`; a root without any patient folder is an error."""
    excluded = {} if excluded is None else excluded
    layout = f"a folder of <patient>/{{{BMODE_FILE}, {SWE_FILE}, {LABEL_FILE}}} folders"
    root = _check_folder(root, field, layout)
    folders = [p for p in root.iterdir() if p.is_dir()]
    if not _visible(folders, str(root), []):
        files = sorted(p.name for p in root.iterdir() if not p.is_dir())
        what = f"holds no patient folder, only {len(files)} file(s) ({', '.join(files[:3])}" + (
            ", ...)" if len(files) > 3 else ")"
        )
        raise DataError(f"{field} {root} {what if files else 'is empty'}; expected {layout}")
    records = {}
    for d in _visible(folders, str(root), problems):
        label_path = d / LABEL_FILE
        if not label_path.exists() and not require_label:
            records[d.name] = Record(d.name, str(d / BMODE_FILE), str(d / SWE_FILE), -1)
            continue
        if not label_path.exists():
            _leave_out(excluded, problems, d.name, f"no {label_path}")
            continue
        try:
            label = _read_label(label_path)
        except DataError as e:
            if not require_label:  # prediction: the label is only reported
                problems.append(f"patient {d.name}: {e}; predicted without a label")
                label = -1
            else:
                _leave_out(excluded, problems, d.name, str(e))
                continue
        records[d.name] = Record(d.name, str(d / BMODE_FILE), str(d / SWE_FILE), label)
    return records


def read_split_lists(splits: str | pathlib.Path, problems: list[str]) -> list[dict[str, list[str]]]:
    """One {split: [patient ids]} per fold folder (`ac_k_fold_<i>`), or one for a flat folder."""
    splits = _check_folder(
        splits, "data.splits", "{train,valid,test}/<patient> or ac_k_fold_<i>/ folders"
    )
    fold_dirs = [p for p in splits.iterdir() if p.is_dir() and p.name.startswith("ac_k_fold_")]
    for p in fold_dirs:
        if not p.name.rsplit("_", 1)[1].isdigit():
            raise DataError(f"data.splits: {p} is not named ac_k_fold_<number>")
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
            raise DataError(
                f"data.splits: {d} has no train/valid/test lists (expected {d}/test/<patient>)"
            )
        if not lists["test"]:
            raise DataError(f"data.splits: {d / 'test'} lists no patient (the test split)")
        out.append(lists)
    return out


def _read_csv(path: pathlib.Path, field: str) -> tuple[list[dict], list[str]]:
    if not path.exists():
        raise DataError(f"{field} {path} does not exist")
    if not path.is_file():
        raise DataError(f"{field} {path} is a folder, expected a CSV file")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [(h or "").strip() for h in reader.fieldnames or []]
            reader.fieldnames = header
            rows = list(reader)
    except UnicodeDecodeError:
        raise DataError(f"{field} {path} is not a UTF-8 text (CSV) file") from None
    except csv.Error as e:
        raise DataError(f"{field} {path}: not a valid CSV file ({e})") from None
    if not header:
        raise DataError(f"{field} {path} is empty (expected a header line and rows)")
    return rows, header


def read_manifest(
    path: str | pathlib.Path,
    problems: list[str],
    require_label: bool = True,
    excluded: dict[str, str] | None = None,
    field: str = "data.manifest",
):
    """(records by patient, {split: ids} or None when there is no split column).

    Without `require_label` the label column may be missing or empty (label -1). A row with a
    bad label is left out (its reason in `excluded`) but stays in its split's list, so that an
    emptied split can name it."""
    excluded = {} if excluded is None else excluded
    path = pathlib.Path(path)
    rows, header = _read_csv(path, field)
    need = ["patient_id", "bmode", "swe"] + (["label"] if require_label else [])
    absent = [c for c in need if c not in header]
    if absent:
        raise DataError(
            f"{field} {path} has the columns {header}, needs {', '.join(need)} (optional: "
            f"{'split' if require_label else 'label, split'}); missing: {', '.join(absent)}"
        )
    if not rows:
        raise DataError(f"{field} {path} has a header but no rows")
    base = path.parent
    records, splits = {}, ({s: [] for s in SPLITS} if "split" in header else None)
    for i, row in enumerate(rows, start=2):
        cells = {k: (row.get(k) or "").strip() for k in ("patient_id", "bmode", "swe", "label")}
        pid = cells["patient_id"]
        if not pid:
            problems.append(f"{path}:{i}: no patient_id; row skipped")
            continue
        if pid in records or pid in excluded:
            problems.append(f"{path}:{i}: patient {pid} listed twice; this row skipped")
            continue
        split = None
        if splits is not None:
            split = (row.get("split") or "").strip().lower()
            split = {"val": "valid", "validation": "valid"}.get(split, split)
            if split not in SPLITS:
                _leave_out(
                    excluded, problems, pid, f"{path}:{i}: split {split!r} is not one of {SPLITS}"
                )
                continue
            splits[split].append(pid)
        empty = [c for c in ("bmode", "swe") if not cells[c]]
        if empty:
            _leave_out(excluded, problems, pid, f"{path}:{i}: no {' or '.join(empty)} path")
            continue
        try:
            raw = cells["label"]
            label = -1 if not raw and not require_label else _label_value(raw, "label")
        except DataError as e:
            if not require_label:  # prediction: the label is only reported
                problems.append(f"{path}:{i}: {e}; patient {pid} predicted without a label")
                label = -1
            else:
                _leave_out(excluded, problems, pid, f"{path}:{i}: {e}")
                continue
        records[pid] = Record(pid, str(base / cells["bmode"]), str(base / cells["swe"]), label)
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


def check_disjoint(given: list[dict[str, list[str]]], source: str = "") -> None:
    """A patient in two splits of one fold leaks test data into training: stop, naming them."""
    for k, g in enumerate(given):
        for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
            both = sorted(set(g[a]) & set(g[b]))
            if both:
                where = f"fold {k}: " if len(given) > 1 else ""
                raise DataError(
                    f"{source}{where}{len(both)} patient(s) in both the {a} and the {b} split: "
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
    excluded: dict[str, str] = dataclasses.field(default_factory=dict)  # patient -> why
    plan_path: pathlib.Path | None = None
    plan_inputs: dict | None = None  # set while the plan is not yet written (`save_plan`)

    def split(self, fold: int, name: str) -> list[Record]:
        return [self.records[i] for i in self.folds[fold][name]]


def _too_small(
    plan: list[dict[str, list[str]]],
    given: list[dict[str, list[str]]] | None,
    excluded: dict[str, str],
    n_usable: int,
    least: dict[str, tuple[int, str]],
) -> str | None:
    """What is wrong with the first split smaller than `least[split]` = (minimum, what it is
    for), naming the patients left out of it (of the data when no split lists were given), or
    None when every split is large enough."""
    for k, fold in enumerate(plan):
        for s in ("test", "valid", "train"):
            n, (minimum, purpose) = len(fold[s]), least.get(s, (0, ""))
            if n >= minimum:
                continue
            where = f"fold {k}: " if len(plan) > 1 else ""
            if n == 0:
                msg = f"{where}the {s} split is empty"
            else:
                msg = f"{where}the {s} split has {n} patient(s), fewer than {purpose}"
            if given:  # the split's own patients that were left out, and rows of no split
                g = given[min(k, len(given) - 1)]
                listed = set(g["test"]) if s == "test" else set(g["train"]) | set(g["valid"])
                anywhere = {i for g in given for ids in g.values() for i in ids}
                lost = [(i, w) for i, w in excluded.items() if i in listed or i not in anywhere]
                of = "of it"
            else:
                lost, of = list(excluded.items()), "of the data"
            if lost:
                msg += f"; {len(lost)} patient(s) left out {of}: {left_out_text(lost)}"
            else:
                msg += f"; none was left out ({n_usable} usable patient(s) in all)"
            return msg
    return None


def load(
    *,
    root: str | None,
    splits: str | None,
    manifest: str | None,
    folds: int,
    seed: int,
    workdir: str | pathlib.Path,
    min_train: int = 0,
    min_valid: int = 0,
    save: bool = True,
    source: str | None = None,
) -> FamfData:
    """Records and the fold plan; reuses `<workdir>/splits.json` when it exists.

    Every fold needs a test patient, `min_valid` validation and `min_train` training patients
    (training: one batch). With `save` the plan is written when new; otherwise the caller
    writes it with `save_plan` after its own checks, so a failed run leaves nothing behind.
    `source` names the data in errors (default: the config field and path)."""
    problems: list[str] = []
    excluded: dict[str, str] = {}
    named = source
    if manifest and root:
        raise DataError(f"both data.manifest ({manifest}) and data.root ({root}) are set: give one")
    if manifest:
        if splits:
            raise DataError(
                f"data.splits ({splits}) goes with data.root; a manifest gives the splits in "
                "its split column"
            )
        records, given = read_manifest(manifest, problems, excluded=excluded)
        given = [given] if given else None
        source = f"data.manifest {manifest}: "
    elif root:
        given = read_split_lists(splits, problems) if splits else None
        records = scan_layout(root, problems, excluded=excluded)
        source = f"data.splits {splits}: " if splits else f"data.root {root}: "
        if given:
            listed = {i for g in given for ids in g.values() for i in ids}
            unknown = sorted(listed - set(records) - set(excluded))
            if unknown:
                raise DataError(
                    f"data.splits {splits} lists {len(unknown)} patient(s) with no folder in "
                    f"data.root {root}: {', '.join(unknown[:5])}"
                    + (" ..." if len(unknown) > 5 else "")
                )
            unused = len(set(records) - listed)
            if unused:
                problems.append(f"{unused} patient(s) of {root} are in no split list; not used")
    else:
        raise DataError("no data: set data.manifest, or data.root (and data.splits)")
    source = f"{named}: " if named else source
    if given:  # before the images are decoded: overlapping lists fail at once
        check_disjoint(given, source)
    records = {r.patient_id: r for r in check_images(list(records.values()), problems, excluded)}
    for p in problems:  # before any error below, which names only the first few
        logging.warning("data: %s", p)
    if not records:
        lost = list(excluded.items())
        detail = f": {len(lost)} left out: {left_out_text(lost)}" if lost else ""
        raise DataError(f"{source}no usable patient{detail}")
    kept = None
    if given:
        kept = [{s: [i for i in g[s] if i in records] for s in SPLITS} for g in given]
    labels = {i: r.label for i, r in records.items()}
    plan_path = pathlib.Path(workdir) / "splits.json"
    # What the plan depends on: the patients and labels, the given lists, folds and seed (not
    # the spelling of a path, so a moved or re-addressed workdir still evaluates).
    inputs = {
        "patients": _digest(sorted(labels.items())),
        # list order is the file system's: compare the sets
        "given": _digest([{k: sorted(v) for k, v in g.items()} for g in kept]) if kept else None,
        "folds": folds,
        "seed": seed,
    }
    new = not plan_path.exists()
    if not new:
        try:
            saved = json.loads(plan_path.read_text())
            plan = saved["folds"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(
                f"{plan_path} is not a split plan ({type(e).__name__}: {e}): delete it to plan "
                "again"
            ) from None
        made_for = saved.get("inputs", {})  # older files store fewer inputs (or none)
        changed = {
            k: (made_for[k], v) for k, v in inputs.items() if k in made_for and made_for[k] != v
        }
        if changed:
            what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            lost = list(excluded.items())
            why = f"; left out now: {left_out_text(lost)}" if lost and "patients" in changed else ""
            raise DataError(
                f"{plan_path} was planned for other data settings ({what}; the run's settings "
                f"are in config.json){why}: use a new workdir, or delete it to plan again"
            )
        unknown = {i for f in plan for s in SPLITS for i in f[s]} - set(records)
        if unknown:
            lost = [(i, excluded.get(i, "not in the data")) for i in sorted(unknown)]
            raise DataError(f"{plan_path} names patients now left out: {left_out_text(lost)}")
    else:
        try:
            plan = plan_splits(labels, kept, folds, seed)
        except DataError:  # an empty test split: say which patients were left out of it
            plan = [{"train": [], "valid": [], "test": []}]
    least = {
        "test": (1, "one"),
        "valid": (min_valid, f"{min_valid} (validation during training)"),
        "train": (min_train, f"one batch (train.batch_size={min_train})"),
    }
    problem = _too_small(plan, given, excluded, len(records), least)
    if problem:
        raise DataError(f"{source}{problem}")
    data = FamfData(records, plan, problems, excluded, plan_path, inputs if new else None)
    if save:
        save_plan(data)
    return data


def save_plan(data: FamfData) -> None:
    """Writes a newly made plan to its splits.json (nothing when it was read from there)."""
    if data.plan_inputs is None or data.plan_path is None:
        return
    data.plan_path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(
        data.plan_path,
        {"seed": data.plan_inputs["seed"], "inputs": data.plan_inputs, "folds": data.folds},
    )
    data.plan_inputs = None
