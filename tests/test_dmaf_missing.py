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
    assert missing.availability(BRATS, masks) == SHIPPED_TOTALS
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


def _shipped_myops(code):
    return missing.read_csv(MYOPS, DATA / "myops2020" / f"MyoPS2020_longtail_split_{code}.csv")


def _per_subject(masks):
    out = {}
    for name, m in masks.items():
        out.setdefault(splits.subject_of(name), set()).add(tuple(bool(x) for x in m))
    return out


MYOPS_CODES = ["357", "375", "537", "573", "735", "753"]


@pytest.mark.parametrize("code", MYOPS_CODES)
def test_myops_masks_per_subject(code):
    names = splits.read_lists(DATA / "myops2020")["train"]
    shipped = _per_subject(_shipped_myops(code))
    assert len(shipped) == 20 and all(len(v) == 1 for v in shipped.values())
    rates = missing.missing_rates(MYOPS, code)
    generated = missing.generate_masks(MYOPS, names, rates)
    assert sorted(generated) == sorted(names)
    per = _per_subject(generated)
    assert all(len(v) == 1 for v in per.values())
    # One rule draw over the 20 sorted subjects, columns from digit order to channel order.
    subjects = sorted(per)
    order = missing.RATE_DIGIT_ORDER["myops2020"]
    drawn = missing.rule_masks(20, [rates[m] for m in order])
    cols = [order.index(m) for m in MYOPS.modalities]
    assert all(per[s] == {tuple(drawn[i, cols])} for i, s in enumerate(subjects))
    # Digit order: per-subject availability close to the shipped CSV's (its stream differs).
    one = {s: next(iter(v)) for s, v in per.items()}
    want = {s: next(iter(v)) for s, v in shipped.items()}
    got, ref = missing.availability(MYOPS, one), missing.availability(MYOPS, want)
    assert all(abs(got[m] - ref[m]) <= 2 for m in ref), (got, ref)


def test_shipped_myops_csvs_are_column_permutations_of_one_draw():
    base = _shipped_myops("357")
    names = sorted(base)
    ref = np.array([base[n] for n in names])
    rates = missing.missing_rates(MYOPS, "357")
    for code in MYOPS_CODES:
        other = _shipped_myops(code)
        got = np.array([other[n] for n in names])
        r = missing.missing_rates(MYOPS, code)
        # the column with a given missing rate in `code` is the one with that rate in 357
        perm = [
            next(k for k, m in enumerate(MYOPS.modalities) if rates[m] == r[q])
            for q in MYOPS.modalities
        ]
        np.testing.assert_array_equal(ref[:, perm], got)


def _spec_rule(names, p):
    """Spec 1.3 steps 1-6 written out literally for BraTS; p over (t1, t1c, flair, t2)."""
    order = "TTTT TTFT TTTF TTFF TFTT TFTF TFFT TFFF FTTT FTFT FTTF FTFF FFTT FFTF FFFT".split()
    names = sorted(names)
    n = len(names)
    np.random.seed(1037)
    t1 = np.random.rand(n) > p[0]
    t1c = np.random.rand(n) > p[1]
    flair = np.random.rand(n) > p[2]
    t2 = np.random.rand(n) > p[3]
    cols = [t1, t1c, flair, t2]
    row = 0
    for pattern in order:
        present = [c == "T" for c in pattern]
        k = int(
            n
            * (1 - p[0] if present[0] else p[0])
            * (1 - p[1] if present[1] else p[1])
            * (1 - p[2] if present[2] else p[2])
            * (1 - p[3] if present[3] else p[3])
        )
        k = k if k else 1
        for c, v in zip(cols, present):
            c[row : row + k] = v
        row += k
    for c in cols:
        c[row:] = False
    st = np.random.get_state()
    for c in cols:
        np.random.set_state(st)
        np.random.shuffle(c)
    for i in range(n):
        while not (t1[i] or t1c[i] or flair[i] or t2[i]):
            for c, pk in zip(cols, p):
                c[i] = np.random.rand(1) > pk
    return {nm: np.array([flair[i], t1c[i], t1[i], t2[i]]) for i, nm in enumerate(names)}


@pytest.mark.parametrize("path", sorted(DATA.glob("brats2020/*.csv")), ids=lambda p: p.name)
def test_rule_regenerates_shipped_brats_csv(path: pathlib.Path, tmp_path):
    names = splits.read_lists(DATA / "brats2020")["train"]
    code = path.stem.rsplit("_", 1)[1]
    masks = missing.generate_masks(BRATS, names, missing.missing_rates(BRATS, code))
    shipped = missing.read_csv(BRATS, path)
    assert list(masks) == list(shipped) == sorted(names)
    for n in names:
        np.testing.assert_array_equal(masks[n], shipped[n], err_msg=n)
    missing.write_csv(BRATS, masks, tmp_path / "x.csv")
    assert (tmp_path / "x.csv").read_text() == path.read_text().replace("\r\n", "\n")


def test_rate_zero_gives_every_case_all_modalities():
    names = splits.read_lists(DATA / "brats2020")["train"]
    masks = missing.generate_masks(BRATS, names, missing.missing_rates(BRATS, "mr0000"))
    assert len(masks) == 219 and all(m.all() for m in masks.values())
    myops = splits.read_lists(DATA / "myops2020")["train"]
    masks = missing.generate_masks(MYOPS, myops, missing.missing_rates(MYOPS, "000"))
    assert len(masks) == 80 and all(m.all() for m in masks.values())


@pytest.mark.parametrize("seed", range(6))
def test_rule_follows_the_spec_for_other_codes_and_names(seed):
    r = np.random.default_rng(seed)
    code = "".join(str(d) for d in r.integers(0, 10, 4))
    n = int(r.integers(1, 120))
    names = [f"case_{int(x):05d}" for x in r.choice(100000, n, replace=False)]
    want = _spec_rule(names, [int(c) / 10 for c in code])
    got = missing.generate_masks(
        BRATS, list(r.permutation(names)), missing.missing_rates(BRATS, code)
    )
    assert list(got) == sorted(names)
    assert all((got[k] == want[k]).all() for k in want), code


def test_rule_seed_and_global_stream():
    names = splits.read_lists(DATA / "brats2020")["train"]
    rates = missing.missing_rates(BRATS, "mr2468")
    np.random.seed(5)
    before = np.random.get_state()[1].copy()
    default = missing.generate_masks(BRATS, names, rates)
    assert (np.random.get_state()[1] == before).all()  # the caller's stream is left alone
    same = missing.generate_masks(BRATS, names, rates, seed=1037)
    other = missing.generate_masks(BRATS, names, rates, seed=0)
    assert all((default[n] == same[n]).all() for n in names)
    assert any((default[n] != other[n]).any() for n in names)


def test_generated_masks_do_not_depend_on_cfg_seed(tmp_path):
    from configs import dmaf_brats2020
    from dmaf_jax import dataset

    names = [f"HG_case_{i:03d}" for i in range(30)]
    got = []
    for seed in (1037, 7):
        cfg = dmaf_brats2020.get_config("smoke")
        cfg.seed = seed
        masks, source = dataset._masks(cfg, BRATS, names, tmp_path / str(seed))
        assert "generated by the rule" in source
        got.append(masks)
    rule = missing.generate_masks(BRATS, names, missing.missing_rates(BRATS, "mr2468"))
    for masks in got:
        assert all((masks[n] == rule[n]).all() for n in names)
