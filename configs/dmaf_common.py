"""Fields shared by the DMAF-Net configs (BraTS2020 and MyoPS2020)."""

from ml_collections import config_dict


def base_config(dataset: str, variant: str) -> config_dict.ConfigDict:
    if variant not in ("paper", "demo", "smoke"):
        raise ValueError(f"unknown DMAF config variant {variant!r}: use paper, demo or smoke")
    c = config_dict.ConfigDict()
    c.model_name = "dmaf"
    c.dataset = dataset  # brats2020 | myops2020
    c.variant = variant
    c.seed = 1037  # the code base's seed: splits, CSV generation, augmentation

    c.data = d = config_dict.ConfigDict()
    d.raw_dir = config_dict.placeholder(str)  # the download: one folder per case (NIfTI)
    d.root = config_dict.placeholder(
        str
    )  # preprocessed vol/ seg/ meta/; default <workdir>/preprocessed
    d.splits = config_dict.placeholder(str)  # folder with train.txt (val.txt, test.txt)
    d.require_paper_split = False  # training stops if the paper's split can't be used
    d.missing_csv = config_dict.placeholder(str)  # imbalanced missing-rate CSV to read
    d.missing_rate = ""  # rate code of the CSV to use or generate (e.g. mr2468)
    d.mask_mode = (
        "fixed"  # fixed (the CSV's mask) | sub (random sub-mask) | random (any combination)
    )
    d.min_size = 128  # every axis at least this long (raw voxels) after the brain crop (BraTS)
    d.brain_box = "ours"  # ours | original (RFNet's box exactly: exclusive max, 128 or 129)
    d.zoom = 1.0  # resampling after the crop; 0.5 = voxels twice as large (demo)
    d.crop = (80, 80, 80)  # training crop
    d.random_crop = True  # False: centred crop
    d.rotation = 10  # degrees, integer angles in [-r, r)
    d.rotation_planes = ((0, 1), (1, 2), (0, 2))  # one drawn per sample; (H, W) = (0, 1)
    d.intensity = 0.1  # scale U(1-a, 1+a), shift U(-a, a)
    d.flip = True
    d.batch_size = 1
    d.workers = 0  # Grain worker processes; 2 cores: threads are faster for 3-D crops (see README)
    d.threads = 2  # reader threads per process
    d.preprocess_workers = 2  # processes for preprocessing cases
    d.synthetic_cases = 0  # > 0: generate raw data when data.raw_dir and data.root are empty
    d.synthetic_shape = (240, 240, 155)
    return c
