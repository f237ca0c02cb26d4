"""DMAF-Net on BraTS2020: `configs/dmaf_brats2020.py` (= paper), `:paper`, `:demo`, `:smoke`.

Paper: the RFNet 219/50/100 split and the mr2468 CSV shipped in dmaf_jax/data/brats2020 (used
when the preprocessed names match), 80^3 crops, fixed per-case masks. Demo: 16 synthetic cases in
the real raw layout, generated and preprocessed on first use. Smoke: small volumes, for tests.
"""

from configs.dmaf_common import base_config, smoke_model


def get_config(variant: str = "paper"):
    c = base_config("brats2020", variant)
    c.data.missing_rate = "mr2468"
    if variant == "demo":
        # 16 synthetic cases at 3 mm voxels, a 32^3 crop and a narrow network: preprocess,
        # train and evaluate in about 15 minutes on a 2-core CPU. DTMS epochs scaled to the
        # short run. At 3 mm a crop spans 96 mm, most of a hemisphere: the pre-norm instance
        # norms see enough context to tell oedema from bright healthy texture (at 2 mm, 64 mm
        # crops: test WT Dice 0.33 after the same number of steps; at 3 mm 0.77 (60 epochs)
        # and 0.85 (80), measured), and a case has 12 windows to evaluate instead of 45.
        c.data.synthetic_cases = 16
        c.data.zoom = 1 / 3
        c.data.crop = (32, 32, 32)
        c.data.foreground_crop = 1 / 3  # nnU-Net's share of tumour-centred crops
        c.model.channels = (4, 8, 16, 32, 64)
        c.model.token_dim = 64
        c.model.heads = 4
        c.model.depth = 2
        c.model.mlp = 128
        c.train.epochs = 80
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
