"""FAMF-Net configurations: `configs/famf.py` (= paper), `:paper`, `:demo`, `:smoke`.

Every field exists in every variant; paths are empty placeholders, so overrides such as
`--config.data.manifest=/data/famf.csv` work on any variant.
"""

from ml_collections import config_dict

PAPER_SEED = 19970916


def get_config(variant: str = "paper") -> config_dict.ConfigDict:
    if variant not in ("paper", "demo", "smoke"):
        raise ValueError(f"unknown FAMF config variant {variant!r}: use paper, demo or smoke")
    c = config_dict.ConfigDict()
    c.model_name = "famf"
    c.variant = variant
    c.seed = PAPER_SEED  # model init, splits, augmentation and RDO keys derive from it
    c.faithful = False  # True: reproduce the original's bugs (spec section 6) for parity

    c.data = d = config_dict.ConfigDict()
    d.root = config_dict.placeholder(str)  # <root>/<patient>/{gray.jpg,elastic.jpg,label.npy}
    d.splits = config_dict.placeholder(str)  # {train,valid,test}/ or ac_k_fold_<i>/ lists
    d.manifest = config_dict.placeholder(str)  # CSV patient_id,bmode,swe,label[,split]
    d.synthetic_dir = config_dict.placeholder(str)  # demo data folder; default <workdir>/data
    d.synthetic_patients = 0  # > 0: generate a synthetic set when no data path is given
    d.synthetic_image_size = 320  # side of the generated JPEGs
    d.image_size = 256  # network input side; MAF grid = /2, CAM = /8
    d.center_crop = 0.9  # first crop, fraction of the shorter side (original 900 of 1,000 px)
    d.crop = 2 / 3  # second crop, fraction of the first (original 600 of 900 px)
    d.paired_crop = False  # True: one random crop for both modalities (B16)
    d.augmentation_prob = 0.8  # probability of the rotation + flip
    d.rotation = 15  # integer rotation range in degrees
    d.folds = 5  # > 1: stratified folds over train+valid, fixed test set
    d.workers = 0  # Grain worker processes for training batches (0 = in process)
    d.max_replaced = 10  # unreadable training pairs replaced by the next before stopping

    c.model = m = config_dict.ConfigDict()
    m.modalities = "both"  # both | bmode | swe (single-stream ablations)
    m.fusion = True  # False: RAA + MAF never switched on (the late-fusion baseline)
    # MAF's channel-attention logits / sqrt(N): near-uniform attention at 256x256 (MAF off in
    # effect); False = the original's unscaled logits (faithful mode always)
    m.scaled_attention = False
    m.bfloat16 = False  # bfloat16 backbones; params, BN, MAF/RAA, CAMs, logits and losses float32

    c.train = t = config_dict.ConfigDict()
    t.epochs = 5000
    t.batch_size = 4  # the original's DQN state (B + 2 = 6) fits batch 4 (B5)
    t.warmup_epochs = 50  # MAF switches on at this epoch
    t.optimizer = "sgd"  # sgd (coupled L2, as the original) | adamw (PyTorch's AdamW)
    t.learning_rate = 5e-4
    t.momentum = 0.9
    t.weight_decay = 0.05  # sgd: coupled L2 on every parameter (B19); adamw: decoupled
    t.lr_decay_rate = 0.985  # StepLR gamma
    t.lr_decay_epochs = 5  # StepLR step size in epochs
    t.loss = "focal"  # focal | ce
    t.double_softmax = False  # focal-loss variant (a) of spec 3.1
    # + weight x each stream's own loss (its trunk's pooled features through its half of
    # conv10, the same loss, alpha and gamma; after the warm-up the trunks read MAF's fusion):
    # keeps the stream with the easiest cue (SWE stiffness) from leaving the other untrained.
    # 0 = the original's objective; no parameters added; no effect with one stream. With SGD
    # the larger loss is also a larger step against the same coupled L2.
    t.stream_loss = 0.0
    t.eval_every = 2  # epochs between validations (and checkpoints)
    t.log_every = 10  # steps between metric lines
    t.max_skipped_in_row = 10  # non-finite steps (left out) in a row before stopping; 0: never

    c.parallel = p = config_dict.ConfigDict()  # devices and hosts (README: several GPUs)
    p.fsdp = False  # True: large parameters and optimiser moments split over the devices
    p.coordinator = config_dict.placeholder(str)  # process 0 host:port (or the environment)
    p.num_processes = 0  # processes in the run (0: from the environment)
    p.process_id = -1  # this process's index (-1: from the environment)

    c.rdo = r = config_dict.ConfigDict()
    r.enabled = True  # False: fixed alpha0 / gamma below
    r.alpha0 = 0.5
    r.gamma = 2.0
    r.learning_rate = 1e-5
    r.buffer_size = 10_000
    r.batch_size = 8
    r.epsilon_start = 1.0  # standard DQN exploration schedule (faithful: fixed 65.5 %)
    r.epsilon_end = 0.05
    r.epsilon_decay_steps = 2_000
    r.target_every = 100  # steps between target-network refreshes (not faithful)

    c.eval = e = config_dict.ConfigDict()
    e.checkpoint = config_dict.placeholder(int)  # step to restore; default the best by criterion
    # Which best checkpoint (on validation) evaluate/predict use: f1_acc (F1 + accuracy at 0.5,
    # the original's), f1, accuracy, or f1_best_auc (the best F1 over thresholds + ROC-AUC:
    # judged where the best-F1 operating point will be, not at 0.5)
    e.criterion = "f1_acc"
    e.batch_size = 8
    e.overlays = 4  # test patients drawn with CAMs and lesion centres in the report
    e.bootstrap = 1000  # resamples for the confidence intervals
    # Decision threshold chosen on the validation split (after temperature scaling): the best
    # F1 with each validation logit smoothed by a Gaussian kernel (smoothed_f1: steadier on
    # 10 malignant cases, see benchmarks/famf_threshold_rules.py), the best F1 itself (f1:
    # halfway in logit space between the two cases its interval ends at), or the highest
    # threshold keeping e.target_sensitivity (sensitivity)
    e.operating_point = "smoothed_f1"
    e.target_sensitivity = 0.95

    c.predict = p = config_dict.ConfigDict()
    p.input = config_dict.placeholder(str)  # a layout root or a CSV manifest (labels optional)
    p.output = config_dict.placeholder(
        str
    )  # CSV of probabilities; default <workdir>/predictions.csv

    c.import_path = config_dict.placeholder(str)  # .pth of the original network (import_torch)
    c.import_dqn_path = config_dict.placeholder(str)  # optional .pth of its DQN

    if variant == "demo":
        c.seed = 0
        d.synthetic_patients = 400
        d.image_size = 64
        d.center_crop = 1.0  # unknown lesion positions: keep most of the field of view
        d.crop = 0.875
        d.paired_crop = True
        d.folds = 1
        d.workers = 2
        t.epochs = 16
        t.batch_size = 16
        t.warmup_epochs = 4
        t.optimizer = "adamw"
        t.learning_rate = 2e-3
        t.weight_decay = 1e-4
        t.lr_decay_rate = 0.7
        t.lr_decay_epochs = 4
        t.eval_every = 2
        t.stream_loss = 0.5
        r.learning_rate = 1e-3
        r.epsilon_decay_steps = 200
        r.target_every = 50
        e.batch_size = 32
        e.bootstrap = 500
        e.criterion = "f1_best_auc"  # its test F1 is read at the validation-chosen threshold
    elif variant == "smoke":
        c.seed = 0
        d.synthetic_patients = 40
        d.synthetic_image_size = 96
        d.image_size = 32
        d.paired_crop = True
        d.folds = 1
        t.epochs = 2
        t.batch_size = 4
        t.warmup_epochs = 1
        t.optimizer = "adamw"
        t.learning_rate = 1e-3
        t.weight_decay = 0.0
        t.eval_every = 1
        t.log_every = 2
        r.buffer_size = 64
        e.batch_size = 8
        e.overlays = 2
        e.bootstrap = 50
    return c
