import pathlib

import numpy as np
import pytest

from dmaf_jax import missing, splits
from dmaf_jax.modalities import BRATS, MYOPS

DATA = splits.SHIPPED
SHIPPED_TOTALS = {"flair": 90, "t1ce": 135, "t1": 184, "t2": 43}


def test_combination_order_and_sub_masks():
    assert BRATS.combination_id([True, True, True, True]) == 14
    assert BRATS.combination_id([False, False, False, True]) == 0
    assert BRATS.combination_id([True, True, True, False]) == 10
    assert BRATS.sub_combination_ids([True, True, True, False]) == [1, 2, 3, 5, 6, 9, 10]
    assert MYOPS.combination_id([True, True, True]) == 6
    assert MYOPS.combination_id([False, False, True]) == 0


def test_rate_code_order():
    assert missing.missing_rates(BRATS, "mr2468") == {
        "t1": 0.2,
        "t1ce": 0.4,
        "flair": 0.6,
        "t2": 0.8,
    }
    with pytest.raises(ValueError, match="4 digits"):
        missing.missing_rates(BRATS, "mr246")


def test_mr2468_from_the_paper_split():
    names = splits.read_lists(DATA / "brats2020")["train"]
    assert len(names) == 219
    rates = missing.missing_rates(BRATS, "mr2468")
    det = missing.deterministic_counts(BRATS, 219, rates)
    # int(219 * P(pattern)), at least 1, by hand for a few patterns:
    assert det[5] == int(219 * 0.6 * 0.8 * 0.6 * 0.8)  # T1c+T1: 50
    assert det[14] == int(219 * 0.4 * 0.6 * 0.8 * 0.2)  # all four: 8
    assert det[8] == 1  # FLAIR+T2: 219 * 0.4*0.4*0.2*0.2 = 1.4
    masks = missing.generate_masks(BRATS, names, rates)
    counts = missing.combination_counts(BRATS, masks)
    n_det = sum(det)
    assert all(c >= d for c, d in zip(counts, det)) and sum(counts) == 219
    assert sum(c - d for c, d in zip(counts, det)) == 219 - n_det  # only the random rows differ
    got = missing.availability(BRATS, masks)
    for m, want in SHIPPED_TOTALS.items():
        assert abs(got[m] - want) <= 5, (m, got[m], want)
    again = missing.generate_masks(BRATS, list(reversed(names)), rates)
    assert all((again[n] == masks[n]).all() for n in names)  # deterministic, order-free


@pytest.mark.parametrize("path", sorted(DATA.glob("*/*.csv")), ids=lambda p: p.name)
def test_shipped_csvs_round_trip(path: pathlib.Path, tmp_path):
    spec = MYOPS if "MyoPS" in path.name else BRATS
    masks = missing.read_csv(spec, path)
    out = tmp_path / path.name
    missing.write_csv(spec, masks, out)
    assert out.read_text() == path.read_text().replace("\r\n", "\n")
    back = missing.read_csv(spec, out)
    assert all((back[k] == masks[k]).all() for k in masks)
    if path.name.endswith("mr2468.csv"):
        assert missing.availability(spec, masks) == SHIPPED_TOTALS


def test_shipped_files_equal_the_shared_copies():
    shared = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
    if not shared.exists():
        pytest.skip("../shared/data not present")
    for p in sorted(DATA.glob("*/*")):
        sub = "splits" if p.suffix == ".txt" else "missing_rates"
        assert p.read_bytes() == (shared / p.parent.name / sub / p.name).read_bytes(), p.name


def test_training_modes():
    rng = np.random.default_rng(0)
    case = np.array([True, True, False, False])
    assert (missing.training_mask(BRATS, "fixed", case, rng) == case).all()
    subs = {tuple(missing.training_mask(BRATS, "sub", case, rng)) for _ in range(200)}
    assert subs == {
        (True, False, False, False),
        (False, True, False, False),
        (True, True, False, False),
    }
    anys = {tuple(missing.training_mask(BRATS, "random", case, rng)) for _ in range(600)}
    assert len(anys) == 15
    with pytest.raises(ValueError, match="mode"):
        missing.training_mask(BRATS, "other", case, rng)


def test_bad_csv_rows(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text('data_name,mask_id,mask,pos_mask_ids\na,2,"[True, False, False, False]",[3]\n')
    with pytest.raises(ValueError, match="mask_id 2"):
        missing.read_csv(BRATS, p)


@pytest.mark.parametrize("code", ["357", "375", "537", "573", "735", "753"])
def test_myops_rule_digit_order(code):
    names = splits.read_lists(DATA / "myops2020")["train"]
    generated = missing.generate_masks(MYOPS, names, missing.missing_rates(MYOPS, code))
    shipped = missing.read_csv(MYOPS, DATA / "myops2020" / f"MyoPS2020_longtail_split_{code}.csv")
    got, want = missing.availability(MYOPS, generated), missing.availability(MYOPS, shipped)
    assert all(abs(got[m] - want[m]) <= 5 for m in want), (got, want)
