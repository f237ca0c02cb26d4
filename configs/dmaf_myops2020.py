"""DMAF-Net on MyoPS2020: `configs/dmaf_myops2020.py` (= paper), `:paper`, `:demo`, `:smoke`.

Paper: the 80/22-slice split and the 357 long-tail CSV shipped in dmaf_jax/data/myops2020,
2-D slices centre-cropped to 256 x 256, lr 2e-3, no validation split (the last epoch is
evaluated). Demo/smoke: synthetic cases in the raw layout.
"""

from configs.dmaf_common import base_config, smoke_model


def get_config(variant: str = "paper"):
    c = base_config("myops2020", variant)
    c.data.missing_rate = "357"
    c.data.crop = (256, 256, 1)
    c.data.random_crop = False
    c.eval.window = "centre"  # spec 7.3: one 256^2 forward pass per slice, no sliding window
    c.data.rotation_planes = ((0, 1),)  # each slice in its own plane, as the original
    c.data.synthetic_shape = (160, 160, 5)
    c.train.learning_rate = 2e-3  # section 11.3 (HGA's MyoPS trainer)
    if variant == "demo":
        # A few synthetic subjects, 160^2 slices: preprocess, train and evaluate in minutes.
        c.data.synthetic_cases = 8
        c.data.crop = (160, 160, 1)
        c.train.epochs = 30
        c.train.eval_every = 10
        c.train.distill_ramp_epochs = 5
        c.dtms.freeze_epochs = 10
        c.dtms.k_ramp = (10, 15)
    elif variant == "smoke":
        c.data.synthetic_cases = 4
        c.data.synthetic_shape = (48, 40, 3)
        c.data.crop = (32, 32, 1)
        c.data.batch_size = 2
        c.data.preprocess_workers = 1
        smoke_model(c)
    return c
