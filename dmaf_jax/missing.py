"""Imbalanced missing-modality CSVs (spec section 1.3) and the training masks they drive (1.4).

CSV format (the original code base's): header `data_name,mask_id,mask,pos_mask_ids`, one row per
case, `mask` the presence vector in channel order, `mask_id` its combination id, `pos_mask_ids`
the ids of its non-empty sub-combinations.

Generation rule (`generate_masks`, spec 1.3, exact): "mr2468" = missing rates 0.2/0.4/0.6/0.8 for
T1/T1ce/FLAIR/T2, the digits in the original script's modality order. One numpy legacy stream
seeded 1037: for the N sorted names, one `rand(N) > p` draw per modality (digit order, values
overwritten); the presence patterns in the script's order (complete first) each fill the next
`max(1, int(N * P(pattern)))` rows, the rest all-absent; one joint shuffle (the stream state
reset before each modality's shuffle); then each still-empty row redraws `rand(1) > p` per
modality until one is present. This reproduces all 8 shipped BraTS2020 CSVs row for row.

MyoPS: one mask per subject (every shipped MyoPS CSV gives all slices of a subject the same
mask), drawn by the same rule over the sorted subjects and expanded to their slices; the
patterns are all presence vectors in digit order, complete first. The shipped MyoPS CSVs are six
column permutations of one draw that this rule does not reproduce (its pattern order and stream
are unknown), so they are read as they are and the rule serves new rates only.
"""

from __future__ import annotations

import ast
import csv
import itertools
import pathlib
from collections.abc import Sequence

import numpy as np

from common import atomic
from dmaf_jax.modalities import DatasetSpec
from dmaf_jax.splits import subject_of

# Order of the digits in a rate name, per dataset (the generator scripts' orders).
RATE_DIGIT_ORDER = {"brats2020": ("t1", "t1ce", "flair", "t2"), "myops2020": ("bssfp", "lge", "t2")}
SEED = 1037  # the rule's own seed, not the config's


def _patterns(digits: int) -> list[tuple[bool, ...]]:
    """Presence patterns (digit order) in the order the rule fills rows."""
    if digits == 4:  # the BraTS script's hand-written order (T = present), checked on its CSVs
        order = "TTTT TTFT TTTF TTFF TFTT TFTF TFFT TFFF FTTT FTFT FTTF FTFF FFTT FFTF FFFT"
        return [tuple(c == "T" for c in pat) for pat in order.split()]
    return [p for p in itertools.product((True, False), repeat=digits) if any(p)]


def missing_rates(spec: DatasetSpec, code: str) -> dict[str, float]:
    """'mr2468' or '2468' -> {modality: missing probability} (digit d means d/10)."""
    digits = code.removeprefix("mr")
    order = RATE_DIGIT_ORDER[spec.name]
    if len(digits) != len(order) or not digits.isdigit():
        raise ValueError(
            f"missing-rate code {code!r} needs {len(order)} digits ({', '.join(order)})"
        )
    return {m: int(d) / 10 for m, d in zip(order, digits)}


def deterministic_counts(spec: DatasetSpec, n: int, rates: dict[str, float]) -> list[int]:
    """Rows per combination id that step 3 of the rule writes (before truncation at n)."""
    order = RATE_DIGIT_ORDER[spec.name]
    counts = [0] * len(spec.combinations)
    for pattern in _patterns(len(order)):
        present = dict(zip(order, pattern))
        counts[spec.combination_id([present[m] for m in spec.modalities])] = _rows(
            n, [rates[m] for m in order], pattern
        )
    return counts


def _rows(n: int, p: Sequence[float], pattern: Sequence[bool]) -> int:
    prob = float(n)
    for pk, present in zip(p, pattern):  # left to right, as the script multiplies
        prob = prob * ((1 - pk) if present else pk)
    return int(prob) or 1


def rule_masks(n: int, p: Sequence[float], seed: int = SEED) -> np.ndarray:
    """(n, len(p)) bool presence, columns in digit order: spec 1.3 steps 2-5 for n sorted rows."""
    state = np.random.get_state()  # the rule uses the global legacy stream; leave it as found
    try:
        np.random.seed(seed)
        cols = [np.random.rand(n) > pk for pk in p]  # only advances the stream
        row = 0
        for pattern in _patterns(len(p)):
            k = _rows(n, p, pattern)
            for col, present in zip(cols, pattern):
                col[row : row + k] = present
            row += k
        for col in cols:
            col[row:] = False
        st = np.random.get_state()
        for col in cols:  # one joint permutation
            np.random.set_state(st)
            np.random.shuffle(col)
        for i in range(n):
            while not any(col[i] for col in cols):
                for col, pk in zip(cols, p):
                    col[i] = np.random.rand(1)[0] > pk
        return np.stack(cols, 1)
    finally:
        np.random.set_state(state)


def generate_masks(
    spec: DatasetSpec, names: Sequence[str], rates: dict[str, float], seed: int = SEED
) -> dict[str, np.ndarray]:
    """{name: presence mask in channel order} by the rule above (per subject for MyoPS)."""
    order = RATE_DIGIT_ORDER[spec.name]
    per_subject = spec.name == "myops2020"
    units = sorted({subject_of(n) for n in names} if per_subject else set(names))
    drawn = rule_masks(len(units), [rates[m] for m in order], seed)
    cols = [order.index(m) for m in spec.modalities]
    by_unit = dict(zip(units, drawn[:, cols]))
    return {n: by_unit[subject_of(n) if per_subject else n].copy() for n in sorted(names)}


def write_csv(spec: DatasetSpec, masks: dict[str, np.ndarray], path: str | pathlib.Path) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.open_text(path, newline="") as f:
        w = csv.writer(f)
        w.writerow(["data_name", "mask_id", "mask", "pos_mask_ids"])
        for name in sorted(masks):
            m = [bool(x) for x in masks[name]]
            w.writerow([name, spec.combination_id(m), str(m), str(spec.sub_combination_ids(m))])


def _literal(text: str, what: str):
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise ValueError(f"{what} {text!r} is not a Python literal") from None


def _presence(text: str, n: int, what: str) -> np.ndarray:
    """A mask cell ('[True, False, True, True]', or 0/1) as a bool (n,) vector."""
    value = _literal(text, what)
    ok = isinstance(value, list | tuple) and len(value) == n
    ok = ok and all(isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)) for v in value)
    if not ok:
        raise ValueError(f"{what} {text!r} is not a list of {n} True/False values")
    return np.array([bool(v) for v in value], bool)


def read_csv(
    spec: DatasetSpec, path: str | pathlib.Path, what: str = "missing-rate CSV"
) -> dict[str, np.ndarray]:
    """{name: presence mask}; checks that mask_id and pos_mask_ids agree with the mask. Raises
    with one line naming `what` (the config field), the file and the line: a missing file,
    missing columns, a malformed or empty mask, a wrong id, a name given twice."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if not path.is_file():
        raise IsADirectoryError(f"{what} {path} is a folder, not a CSV file")
    need = ["data_name", "mask_id", "mask"]
    order = ", ".join(spec.modalities)
    out, lines = {}, {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # a spreadsheet's BOM too
            reader = csv.DictReader(f)
            have = [c.strip() for c in reader.fieldnames or ()]
            if not set(need) <= set(have):
                raise ValueError(
                    f"{what} {path}: needs the columns {', '.join(need)} (pos_mask_ids "
                    f"optional), has {', '.join(have) if have else 'no header'}"
                )
            reader.fieldnames = have
            for i, row in enumerate(reader, start=2):
                if None in row or any(row[c] is None for c in need):
                    more = "more" if None in row else "fewer"
                    raise ValueError(
                        f"{what} {path}:{i}: {more} fields than the header's {len(have)} "
                        '(a mask must be quoted: "[True, False, ...]")'
                    )
                name = row["data_name"].strip()
                if not name:
                    raise ValueError(f"{what} {path}:{i}: empty data_name")
                where = f"{what} {path}:{i}: {name}:"
                mask = _presence(row["mask"], len(spec.modalities), f"{where} mask")
                if not mask.any():
                    raise ValueError(f"{where} mask {row['mask']} has no modality present")
                mask_id = _literal(row["mask_id"], f"{where} mask_id")
                if mask_id != spec.combination_id(mask):
                    raise ValueError(
                        f"{where} mask_id {row['mask_id']} does not match mask {row['mask']} "
                        f"(id {spec.combination_id(mask)}; modalities in the order {order})"
                    )
                pos = (row.get("pos_mask_ids") or "").strip()
                if pos and _literal(pos, f"{where} pos_mask_ids") != spec.sub_combination_ids(mask):
                    raise ValueError(
                        f"{where} pos_mask_ids {pos} does not match mask {row['mask']} "
                        f"({spec.sub_combination_ids(mask)})"
                    )
                if name in out:
                    raise ValueError(f"{where} also on line {lines[name]}")
                out[name], lines[name] = mask, i
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path}: not a text CSV ({e})") from None
    except csv.Error as e:
        raise ValueError(f"{what} {path}: not a CSV ({e})") from None
    return out


def availability(spec: DatasetSpec, masks: dict[str, np.ndarray]) -> dict[str, int]:
    """Cases with each modality present."""
    stacked = np.array(list(masks.values()), bool).reshape(-1, len(spec.modalities))
    return {m: int(stacked[:, k].sum()) for k, m in enumerate(spec.modalities)}


def combination_counts(spec: DatasetSpec, masks: dict[str, np.ndarray]) -> list[int]:
    counts = [0] * len(spec.combinations)
    for m in masks.values():
        counts[spec.combination_id(m)] += 1
    return counts


TRAINING_MODES = ("fixed", "sub", "random")


def training_mask(spec: DatasetSpec, mode: str, case_mask: np.ndarray, rng: np.random.Generator):
    """The mask a training sample uses: `fixed` the case's own (the paper's IDT setting), `sub` a
    random non-empty sub-mask of it (idt_drop), `random` one of all combinations (PDT)."""
    combos = spec.combination_masks()
    if mode == "fixed":
        return np.asarray(case_mask, bool)
    if mode == "sub":
        ids = spec.sub_combination_ids(case_mask)
        return combos[ids[int(rng.integers(len(ids)))]]
    if mode == "random":
        return combos[int(rng.integers(len(combos)))]
    raise ValueError(f"missing-modality mode must be one of {TRAINING_MODES}, not {mode!r}")
