import pytest

from configs import dmaf_brats2020, dmaf_myops2020, famf

PATHS = {
    famf: (
        "data.root",
        "data.splits",
        "data.manifest",
        "data.synthetic_dir",
        "predict.input",
        "predict.output",
        "import_path",
        "eval.checkpoint",
    ),
    dmaf_brats2020: ("data.raw_dir", "data.root", "data.splits", "data.missing_csv"),
    dmaf_myops2020: ("data.raw_dir", "data.root", "data.splits", "data.missing_csv"),
}


def get(cfg, dotted):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


@pytest.mark.parametrize("module", list(PATHS), ids=lambda m: m.__name__)
def test_every_variant_has_every_path_empty(module):
    default = module.get_config()
    assert default.variant == "paper"
    keys = set(default.to_dict())
    for variant in ("paper", "demo", "smoke"):
        cfg = module.get_config(variant)
        assert set(cfg.to_dict()) == keys
        for path in PATHS[module]:
            assert get(cfg, path) is None, (variant, path)
        get(cfg, PATHS[module][0].rsplit(".", 1)[0])[PATHS[module][0].rsplit(".", 1)[1]] = "/x"
    with pytest.raises(ValueError, match="variant"):
        module.get_config("large")


def test_famf_paper_settings():
    c = famf.get_config()
    assert (c.data.image_size, c.train.batch_size, c.train.optimizer) == (256, 4, "sgd")
    assert (c.train.learning_rate, c.train.weight_decay, c.train.warmup_epochs) == (5e-4, 0.05, 50)
    assert (c.train.lr_decay_rate, c.train.lr_decay_epochs, c.data.folds) == (0.985, 5, 5)
    assert (c.rdo.alpha0, c.rdo.gamma) == (0.5, 2.0) and not c.faithful
