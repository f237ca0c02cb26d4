"""The datasets' modalities, label maps and modality combinations (spec sections 1.1, 1.6, 7.2).

Masks are presence vectors in the channel order of the stored volumes: BraTS [FLAIR, T1ce, T1,
T2], MyoPS [bSSFP (C0), LGE (DE), T2]. A combination's id is its index in `combinations`.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str
    modalities: tuple[str, ...]  # channel order of the stored volumes
    file_suffixes: tuple[str, ...]  # raw file name suffix of each modality
    label_suffix: str
    label_map: dict[int, int]  # raw label value -> stored class
    combinations: tuple[str, ...]  # presence strings in channel order, in id order

    @property
    def num_classes(self) -> int:
        return len(set(self.label_map.values()) | {0})

    def combination_masks(self) -> np.ndarray:
        """(n_combinations, n_modalities) bool."""
        return np.array([[c == "1" for c in s] for s in self.combinations], dtype=bool)

    def combination_id(self, mask) -> int:
        key = "".join("1" if m else "0" for m in mask)
        return self.combinations.index(key)

    def sub_combination_ids(self, mask) -> list[int]:
        """Ids of every non-empty combination that uses only modalities present in `mask`."""
        mask = np.asarray(mask, bool)
        return [i for i, c in enumerate(self.combination_masks()) if not (c & ~mask).any()]


BRATS = DatasetSpec(
    name="brats2020",
    modalities=("flair", "t1ce", "t1", "t2"),
    file_suffixes=("flair", "t1ce", "t1", "t2"),
    label_suffix="seg",
    label_map={0: 0, 1: 1, 2: 2, 4: 3},
    # spec 7.2: T2, T1c, T1, FLAIR, T1c+T2, T1c+T1, FLAIR+T1, T1+T2, FLAIR+T2, FLAIR+T1c,
    # FLAIR+T1c+T1, FLAIR+T1+T2, FLAIR+T1c+T2, T1c+T1+T2, all four
    combinations=(
        "0001",
        "0100",
        "0010",
        "1000",
        "0101",
        "0110",
        "1010",
        "0011",
        "1001",
        "1100",
        "1110",
        "1011",
        "1101",
        "0111",
        "1111",
    ),
)

MYOPS = DatasetSpec(
    name="myops2020",
    modalities=("bssfp", "lge", "t2"),
    file_suffixes=("C0", "DE", "T2"),
    label_suffix="gd",
    label_map={0: 0, 200: 1, 500: 2, 600: 3, 1220: 4, 2221: 5},
    # spec 1.6: T2, LGE, bSSFP, LGE+T2, bSSFP+LGE, bSSFP+T2, all
    combinations=("001", "010", "100", "011", "110", "101", "111"),
)

SPECS = {BRATS.name: BRATS, MYOPS.name: MYOPS}
