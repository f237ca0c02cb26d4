"""Imbalanced missing-modality CSVs (spec section 1.3) and the training masks they drive (1.4).

CSV format (the original code base's): header `data_name,mask_id,mask,pos_mask_ids`, one row per
case, `mask` the presence vector in channel order, `mask_id` its combination id, `pos_mask_ids`
the ids of its non-empty sub-combinations.

Generation rule ("mr2468" = missing rates 0.2/0.4/0.6/0.8 for T1/T1ce/FLAIR/T2, the digits in
the original script's modality order): for the sorted names, each of the combinations in id
order gets `max(1, int(N * P(pattern)))` rows with P the product of presence/absence
probabilities; the remaining rows draw each modality present with probability 1 - p until at
least one is; the rows are then shuffled jointly. The deterministic part is exact; the rest
depends on the random stream. Ours is Python's `random` seeded 1037 (one of the three streams
the original seeds with 1037), drawing each row's modalities in the script's digit order: for
mr2468 this gives availability FLAIR 91, T1ce 135, T1 184, T2 46 against the shipped CSV's
90/135/184/43 (numpy's generators with the same seed give T2 49). It is not the original's
stream: the shipped CSVs are read as they are, never regenerated.
"""

from __future__ import annotations

import ast
import csv
import pathlib
import random
from collections.abc import Sequence

import numpy as np

from dmaf_jax.modalities import DatasetSpec

# Order of the digits in a rate name, per dataset (the generator scripts' orders).
RATE_DIGIT_ORDER = {"brats2020": ("t1", "t1ce", "flair", "t2"), "myops2020": ("bssfp", "lge", "t2")}
SEED = 1037


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
    """Rows per combination id in the rule's deterministic part."""
    p = np.array([rates[m] for m in spec.modalities])
    counts = []
    for mask in spec.combination_masks():
        prob = float(np.prod(np.where(mask, 1 - p, p)))
        counts.append(max(1, int(n * prob)))
    return counts


def generate_masks(
    spec: DatasetSpec, names: Sequence[str], rates: dict[str, float], seed: int = SEED
) -> dict[str, np.ndarray]:
    """{name: presence mask} by the rule above."""
    names = sorted(names)
    n = len(names)
    rng = random.Random(seed)
    masks = np.zeros((n, len(spec.modalities)), bool)
    row = 0
    for mask, count in zip(spec.combination_masks(), deterministic_counts(spec, n, rates)):
        take = min(count, n - row)
        masks[row : row + take] = mask
        row += take
    digit_order = RATE_DIGIT_ORDER[spec.name]
    for i in range(row, n):
        while not masks[i].any():
            present = {m: rng.random() > rates[m] for m in digit_order}
            masks[i] = [present[m] for m in spec.modalities]
    order = list(range(n))
    rng.shuffle(order)
    return dict(zip(names, masks[order]))


def write_csv(spec: DatasetSpec, masks: dict[str, np.ndarray], path: str | pathlib.Path) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["data_name", "mask_id", "mask", "pos_mask_ids"])
        for name in sorted(masks):
            m = [bool(x) for x in masks[name]]
            w.writerow([name, spec.combination_id(m), str(m), str(spec.sub_combination_ids(m))])


def read_csv(spec: DatasetSpec, path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """{name: presence mask}; checks that mask_id and pos_mask_ids agree with the mask."""
    out = {}
    with pathlib.Path(path).open(newline="") as f:
        reader = csv.DictReader(f)
        need = {"data_name", "mask_id", "mask"}
        if not need <= set(reader.fieldnames or ()):
            raise ValueError(f"{path}: needs the columns {sorted(need)}")
        for i, row in enumerate(reader, start=2):
            mask = np.array(ast.literal_eval(row["mask"]), bool)
            if mask.shape != (len(spec.modalities),) or not mask.any():
                raise ValueError(
                    f"{path}:{i}: mask {row['mask']} is not a non-empty "
                    f"{len(spec.modalities)}-vector"
                )
            if int(row["mask_id"]) != spec.combination_id(mask):
                raise ValueError(
                    f"{path}:{i}: mask_id {row['mask_id']} does not match {row['mask']}"
                )
            out[row["data_name"]] = mask
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
