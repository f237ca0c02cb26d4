"""DMAF-Net on BraTS2020: `configs/dmaf_brats2020.py` (= paper), `:paper`, `:demo`, `:smoke`.

Paper: the RFNet 219/50/100 split and the mr2468 CSV shipped in dmaf_jax/data/brats2020 (used
when the preprocessed names match), 80^3 crops, fixed per-case masks. Demo: 6 synthetic cases in
the real raw layout, generated and preprocessed on first use. Smoke: small volumes, for tests.
"""

from configs.dmaf_common import base_config, smoke_model


def get_config(variant: str = "paper"):
    c = base_config("brats2020", variant)
    c.data.missing_rate = "mr2468"
    if variant == "demo":
        # 16 synthetic cases at 2 mm voxels, a 32^3 crop and a narrow network: preprocess,
        # train and evaluate in minutes on a 2-core CPU. DTMS epochs scaled to the short run.
        c.data.synthetic_cases = 16
        c.data.zoom = 0.5
        c.data.crop = (32, 32, 32)
        c.data.foreground_crop = 0.5  # 32^3 crops at uniform corners rarely hold the tumour
        c.model.channels = (4, 8, 16, 32, 64)
        c.model.token_dim = 64
        c.model.heads = 4
        c.model.depth = 2
        c.model.mlp = 128
        c.train.epochs = 60
        c.train.learning_rate = 2e-3
        c.train.eval_every = 20
        c.train.checkpoint_every = 10
        c.train.distill_ramp_epochs = 10
        c.dtms.freeze_epochs = 20
        c.dtms.k_ramp = (20, 30)
    elif variant == "smoke":
        c.data.synthetic_cases = 6
        c.data.synthetic_shape = (40, 44, 36)
        c.data.min_size = 32
        c.data.crop = (32, 32, 32)
        c.data.batch_size = 2
        c.data.preprocess_workers = 1
        smoke_model(c)
    return c
