"""Defaults for every search; model files import this and override."""
import ml_collections


def get_config():
    config = ml_collections.ConfigDict()

    config.model = ml_collections.ConfigDict()
    config.model.name = "mobilenet_v2"
    config.model.width = 1.0             # Keras's alpha (MobileNets)
    config.model.input_size = 224
    # 'imagenet' (official Keras file, downloaded and cached), 'demo' (pretrained on digits
    # 0-4 here, cached), 'random', or a path to a Keras .h5 / .weights.h5 / converted .msgpack.
    config.model.weights = "imagenet"
    config.model.dropout_rate = 0.2
    # Model options (None: the model's default). Each applies to the models named; setting one
    # another model lacks is refused.
    config.model.options = ml_collections.ConfigDict()
    options = config.model.options
    options.minimalistic = ml_collections.FieldReference(None, field_type=bool)  # MobileNetV3s
    options.include_preprocessing = ml_collections.FieldReference(None, field_type=bool)  # V3s
    options.depth_multiplier = ml_collections.FieldReference(None, field_type=int)  # mobilenet_v1
    options.blocks = ml_collections.FieldReference(None, field_type=int)  # mobilenet_v2: first N
    # How convolutions run: 'auto' (by backend), 'native', 'shifted' / 'matmul' (all models).
    options.depthwise_impl = ml_collections.FieldReference(None, field_type=str)
    options.conv_impl = ml_collections.FieldReference(None, field_type=str)

    config.data = ml_collections.ConfigDict()
    # Any TFDS image-classification dataset ('tf_flowers', 'beans', 'cats_vs_dogs', ...),
    # 'image_folder' (data.path: one subfolder per class) or 'digits' (offline demo).
    config.data.name = "tf_flowers"
    config.data.data_dir = ml_collections.FieldReference(None, field_type=str)
    config.data.path = ml_collections.FieldReference(None, field_type=str)  # image_folder
    # TFDS feature names, for datasets that do not call them 'image' and 'label'.
    config.data.image_key = ml_collections.FieldReference(None, field_type=str)
    config.data.label_key = ml_collections.FieldReference(None, field_type=str)
    # TFDS split strings for (train, validation, test), e.g. ('train[:80%]', 'train[80%:]',
    # 'test'); None: the dataset's own validation/test splits, the rest carved from train.
    config.data.tfds_splits = ml_collections.FieldReference(None, field_type=tuple)
    config.data.splits = (0.7, 0.15, 0.15)  # train / validation / test fractions, when carved
    config.data.split_seed = 0
    config.data.batch_size = 32           # global batch, split across devices
    config.data.classes = ml_collections.FieldReference(None, field_type=tuple)  # digits
    config.data.train_per_class = ml_collections.FieldReference(None, field_type=int)
    config.data.augment_flip = False
    config.data.augment_crop = False

    config.train = ml_collections.ConfigDict()
    config.train.epochs = 10
    config.train.seeds = 3
    # 'adam', 'adamw' (the same: with weight_decay both are AdamW, decoupled decay) or 'sgd'.
    config.train.optimizer = "adam"
    config.train.learning_rate = 1e-4
    config.train.momentum = 0.9           # sgd
    config.train.weight_decay = 0.0       # kernels only, trained layers only
    config.train.schedule = "constant"    # 'constant' or 'cosine'
    config.train.warmup_epochs = 0.0
    config.train.compute_dtype = "float32"  # 'bfloat16' on GPU/TPU
    # The new head's learning rate (None: train.learning_rate, the backbone's). A fresh head
    # and a pretrained backbone want rates apart: on ImageNet MobileNetV2 and 200 photos,
    # classifier-only reached 0.31 at 1e-4 and 0.71 at 1e-3, while full fine-tuning collapsed
    # to chance at 1e-3 (docs/settings.md).
    config.train.head_learning_rate = ml_collections.FieldReference(1e-3, field_type=float)
    config.train.freeze_bn = ml_collections.FieldReference(None, field_type=bool)  # replaced:
    # search.bn_policies=('frozen',) keeps every BN in inference mode
    config.train.prefix_cache = True      # cache the frozen prefix's output (when exact)
    # The running cohort is checkpointed after an epoch once this many seconds have passed
    # since its last checkpoint (0 = after every epoch). At most one a minute: a checkpoint
    # holds every run's trained layers, their optimizer state and their best epoch's layers
    # (MobileNetV2 at 224 px, a cohort of 8: 188-274 MB; VGG16: 1.8 GB), and an interruption
    # loses at most a minute of training (docs/performance.md, "Checkpoints").
    config.train.checkpoint_seconds = 60.0

    config.search = ml_collections.ConfigDict()
    # Runs of one engine (same lowest trainable unit) trained at once, vmapped: 0 = as many as
    # memory allows, and on CPU only where that is measured to pay (the rule in
    # blockft_jax/engine/placement.py), 1 = one at a time, N = up to N.
    config.search.parallel = 0
    config.search.strategies = ("classifier_only", "full", "layerwise", "topk", "blocks",
                                "window", "llrd", "gradual", "lp_ft", "l2sp", "auto_rgn",
                                "subtuning")
    # How far down each strategy searches, in layers / blocks / windows from the output;
    # 0 = the whole backbone, down to its first weighted layer.
    config.search.max_layers = 0
    config.search.topk = (2, 3, 4, 5)
    # Non-weight layer kinds that split blocks (comma-separated; the paper: pooling and
    # activation), or 'units' for the architecture's own blocks (VGG block5, MobileNetV2 block_16).
    config.search.block_boundaries = "pooling,activation"
    config.search.max_blocks = 0
    config.search.window = 3
    config.search.stride = ml_collections.FieldReference(None, field_type=int)  # None: = window
    config.search.max_windows = 0
    # Today's one-run methods, compared as baselines (never pruned by halving). llrd: every
    # layer trains at decay ** depth of the learning rate (depth: units below the head), one
    # candidate per decay. gradual: the top unit first, one more every k epochs, per k.
    # auto_rgn: each epoch, multipliers from relative gradient norms on this many batches.
    config.search.llrd_decays = (0.5, 0.65, 0.8)
    config.search.gradual_epochs = (1, 3)
    config.search.auto_rgn_batches = 5
    # lp_ft (LP-FT, Kumar et al. 2022): the head alone for this many epochs (a linear probe),
    # then every layer from that head, the backbone's optimizer state fresh.
    config.search.lp_epochs = 3
    # l2sp (L2-SP, Li et al. 2018): every layer trains with alpha / 2 * ||w - w0||^2 pulling
    # the backbone towards its starting weights w0, one candidate per alpha, and
    # beta / 2 * ||w||^2 on the head (the paper's alpha 0.01-0.1, beta 0.01).
    config.search.l2sp_alphas = (0.01, 0.1)
    config.search.l2sp_beta = 0.01
    # subtuning (SubTuning, Kaplun et al. 2023): greedy rounds over the top subtuning_units
    # units (0: all); each round adds the unit that most improves validation at halving's first
    # rung, while it gains >= subtuning_epsilon (theirs: 0.01), for at most subtuning_rounds
    # rounds (0: no limit); the chosen units then train every seed.
    config.search.subtuning_units = 0
    config.search.subtuning_rounds = 3
    config.search.subtuning_epsilon = 0.01
    # How the layers train, searched with them (a candidate is (layers, setting); settings
    # are data for the one compiled step, never new compilations). BatchNorm: 'train' (the BN
    # layers a candidate trains use batch statistics, as Keras's trainable BN) and/or 'frozen'
    # (every BN in inference mode; its scale and offset still train). lr_factors multiply the
    # backbone's learning rate, e.g. (0.1, 1.0, 10.0).
    config.search.bn_policies = ("train", "frozen")
    config.search.lr_factors = (1.0,)
    # 'halving': successive halving (rungs of growing epochs; each strategy's best 1/eta go on;
    # the finalists train every seed to train.epochs) -- the whole network for a fraction of
    # the cost; 'exhaustive': the paper's protocol (every candidate, every seed, every epoch).
    config.search.schedule = "halving"
    config.search.eta = 3
    config.search.halving_seeds = 1   # seeds the early rungs train (the last trains all)
    # A rung is at least this many optimizer steps (shorter rungs are dropped: a few steps rank
    # noise), and prunes only on evidence: a candidate goes when the paired test on validation
    # puts it below the rung's leader, never while the leader is within chance.
    config.search.min_rung_steps = 30
    config.search.prune_only_on_evidence = True
    # Candidates but full's train in at most this many engines by depth (each from its own
    # lowest unit, with its own prefix cache): a candidate pays only for its own depth.
    config.search.engines = 4

    # Only for model.weights='demo': the backbone pretrained on these digits (the search's
    # data.classes should be others). configs/demo.py's ships with the package.
    config.demo = ml_collections.ConfigDict()
    config.demo.pretrain_classes = (0, 1, 2, 3, 4)
    config.demo.pretrain_epochs = 15
    config.demo.pretrain_learning_rate = 3e-3
    return config
