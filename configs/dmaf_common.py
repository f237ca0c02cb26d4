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
    d.foreground_crop = 0.0  # share of crops around a tumour voxel (0: the original's uniform)
    d.rotation = 10  # degrees, integer angles in [-r, r)
    d.rotation_planes = ((0, 1), (1, 2), (0, 2))  # one drawn per sample; (H, W) = (0, 1)
    d.intensity = 0.1  # scale U(1-a, 1+a), shift U(-a, a)
    d.flip = True
    d.batch_size = 1
    d.workers = 0  # Grain worker processes; 2 cores: threads are faster for 3-D crops (see README)
    d.threads = 2  # reader threads per process
    d.max_replaced = 10  # unreadable or non-finite training crops replaced before stopping
    d.preprocess_workers = 2  # processes for preprocessing cases
    d.synthetic_cases = 0  # > 0: generate raw data when data.raw_dir and data.root are empty
    d.synthetic_shape = (240, 240, 155)

    c.faithful = False  # PASSION's eta 0.015 from epoch 0, HD95 1.0 for one empty mask, pooled loss

    c.model = m = config_dict.ConfigDict()
    m.channels = (8, 16, 32, 64, 128)  # per level; the crop must divide by 2^(levels-1)
    m.fusion = "dmaf"  # dmaf | mean (ablation: mean of the present modalities' features)
    m.token_dim = 128  # DMAF token width
    m.heads = 8  # DMAF attention heads
    m.depth = 4  # DMAF transformer layers per level
    m.mlp = 512  # DMAF MLP width
    m.dropout = 0.1  # DMAF MLP and residual dropout (training only)
    m.bfloat16 = False  # bfloat16 compute, float32 parameters and losses
    m.remat = False  # recompute encoder, decoder and fusion blocks: less memory, more time

    c.train = t = config_dict.ConfigDict()
    t.epochs = 300
    t.learning_rate = 2e-4  # poly per epoch: lr (1 - epoch / epochs)^0.9
    t.weight_decay = 1e-4  # decoupled, on every parameter
    t.lambda_cov = 0.1  # CCA weight (0 disables the term in the loss; the gap still sees it)
    t.lambda_att = 0.1  # masked attention alignment weight
    t.lambda_proto = 0.1  # prototype distillation weight
    t.distill_ramp_epochs = 20  # the distillation weights ramp from 0 over these epochs
    t.eval_every = 10  # epochs between validations (all modalities, sliding windows)
    t.checkpoint_every = 1  # epochs between checkpoints for resume
    t.log_every = 50  # steps between metric flushes
    t.max_skipped_in_row = 10  # non-finite steps (left out) in a row before stopping; 0: never
    t.select = "best"  # best (validation Dice) | last (the spec's "test the last epoch")

    c.parallel = p = config_dict.ConfigDict()  # devices and hosts (README: several GPUs)
    p.fsdp = False  # True: large parameters and optimiser moments split over the devices
    p.coordinator = config_dict.placeholder(str)  # process 0 host:port (or the environment)
    p.num_processes = 0  # processes in the run (0: from the environment)
    p.process_id = -1  # this process's index (-1: from the environment)

    c.dtms = x = config_dict.ConfigDict()
    x.reweight = True  # beta per modality from the epoch's relative gaps (ablation: False)
    x.scale = True  # per-encoder update factor k (ablation: False)
    x.freeze_epochs = 20  # beta and k stay at 1 before this epoch closes
    x.k_ramp = (20, 30)  # epochs over which k's reduction ramps from 0 to full
    x.k_min = 0.5
    x.mu = 0.99  # EMA of each distillation term (normaliser of the gaps)

    c.eval = e = config_dict.ConfigDict()
    e.windows_per_call = 2  # sliding windows per jitted call (the last call is padded)
    e.overlap = 0.5
    e.window = "sliding"  # sliding (BraTS, 7.1) | centre (only the centred training crop; MyoPS)
    e.checkpoint = config_dict.placeholder(int)  # a step; default: the chosen checkpoint
    e.combinations = config_dict.placeholder(str)  # e.g. "flair,flair+t1ce+t1+t2"; default all
    # HD95 when exactly one mask is empty: brats (373.13 mm) | passion (1.0, the original's);
    # default: passion when faithful, else brats
    e.hd95_empty = config_dict.placeholder(str)
    e.hd95_variant = "medpy"  # medpy (both directions pooled) | monai (larger directed one)
    e.split = "test"  # the split evaluate scores: test | val | train
    e.overlays = 2  # cases drawn in report.md: prediction per combination, DMAF attention maps

    c.predict = p = config_dict.ConfigDict()
    p.input = config_dict.placeholder(str)  # folder of new cases (BraTS/MyoPS layout, any depth)
    p.output = config_dict.placeholder(str)  # predictions folder; default <workdir>/predictions
    p.probabilities = False  # also <case>_prob.nii.gz: (X, Y, Z, K) float32 class probabilities
    return c


def smoke_model(c: config_dict.ConfigDict) -> None:
    """A narrow network and a few short epochs: the same code paths in seconds (tests)."""
    c.model.channels = (4, 8, 16, 32, 32)
    c.model.token_dim = 32
    c.model.heads = 4
    c.model.depth = 2
    c.model.mlp = 64
    c.train.epochs = 2
    c.train.eval_every = 1
    c.train.log_every = 2
    c.train.distill_ramp_epochs = 1
    c.dtms.freeze_epochs = 1
    c.dtms.k_ramp = (1, 2)
