"""Train/val/test lists (spec sections 1.2 and 1.6).

The paper's lists (`train.txt`, `val.txt`, `test.txt`, one preprocessed name per line, with the
HG_/LG_ prefixes) are shipped in `dmaf_jax/data/<dataset>/` and are read as they are;
without lists, a fresh split is drawn with a seed. Names are those of the preprocessed files.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np

from common import atomic

SPLIT_FILES = {"train": "train.txt", "val": "val.txt", "test": "test.txt"}
SHIPPED = pathlib.Path(__file__).parent / "data"  # <dataset>/{train,val,test}.txt and CSVs


def read_lists(folder: str | pathlib.Path, what: str = "split folder") -> dict[str, list[str]]:
    """{split: names} from the .txt lists present in `folder` (at least train.txt). Raises
    with one line naming `what` (the config field) and the file for a missing folder or
    train.txt, an unreadable list, and a name in two lists or twice in one."""
    folder = pathlib.Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{what} {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"{what} {folder} is a file, not a folder of split lists")
    out, where = {}, {}
    for split, fname in SPLIT_FILES.items():
        p = folder / fname
        if not p.exists():
            continue
        try:
            lines = p.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{what} {p}: cannot read it as text ({e})") from e
        out[split] = [line.strip() for line in lines if line.strip()]
        for i, line in enumerate(lines, start=1):
            name = line.strip()
            if not name:
                continue
            if name in where:
                raise ValueError(
                    f"{what} {folder}: {name} is listed twice ({where[name]} and {fname}:{i}); "
                    "a case belongs to one split"
                )
            where[name] = f"{fname}:{i}"
    if "train" not in out:
        raise FileNotFoundError(
            f"{what} {folder} has no train.txt (expected {', '.join(SPLIT_FILES.values())})"
        )
    return out


def subject_of(name: str) -> str:
    """The subject a name belongs to: MyoPS slices `<case>_slice_<i>` share their case."""
    return name.split("_slice_")[0]


def fresh_split(
    names: Sequence[str], seed: int, fractions=(0.6, 0.13, 0.27)
) -> dict[str, list[str]]:
    """A seeded random split by subject (default close to the paper's 219/50/100 proportions);
    slices of one subject never straddle splits."""
    subjects = sorted({subject_of(n) for n in names})
    order = np.random.default_rng(seed).permutation(len(subjects))
    n_train = int(round(fractions[0] * len(subjects)))
    n_val = int(round(fractions[1] * len(subjects)))
    pick = [subjects[i] for i in order]
    groups = {
        "train": set(pick[:n_train]),
        "val": set(pick[n_train : n_train + n_val]),
        "test": set(pick[n_train + n_val :]),
    }
    return {s: sorted(n for n in names if subject_of(n) in g) for s, g in groups.items()}


def write_lists(split: dict[str, list[str]], folder: str | pathlib.Path) -> None:
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for s, names in split.items():
        atomic.write_text(folder / SPLIT_FILES[s], "".join(f"{n}\n" for n in names))


def resolve(
    available: Sequence[str], lists_dir: str | None, seed: int
) -> tuple[dict[str, list[str]], list[str]]:
    """The split restricted to `available` names, and the listed names that are missing."""
    if lists_dir:
        split = read_lists(lists_dir)
    else:
        split = fresh_split(available, seed)
    have = set(available)
    missing = sorted({n for names in split.values() for n in names} - have)
    return {s: [n for n in names if n in have] for s, names in split.items()}, missing
