"""A seconds-long search for tests: a three-block MobileNetV2 on a few digits."""
from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "mobilenet_v2"
    config.model.width = 0.35
    config.model.input_size = 32
    config.model.weights = "random"
    config.model.dropout_rate = 0.0
    config.model.options.blocks = 3

    config.data.name = "digits"
    config.data.classes = (5, 6, 7)
    config.data.train_per_class = 8
    # Validation and test of 54 images each (81 at the default 0.15): evaluating them was
    # most of a tiny search's compute (24 training images).
    config.data.splits = (0.8, 0.1, 0.1)
    config.data.batch_size = 8

    config.train.epochs = 2
    config.train.seeds = 1
    config.train.learning_rate = 1e-3
    config.train.head_learning_rate = None  # the backbone's, whatever a test sets it to
    # Tests interrupt searches right after a checkpoint: one after every epoch.
    config.train.checkpoint_seconds = 0.0

    # Runs in cohorts as large as the runs allow (the default, parallel=0, without its CPU
    # rule): a CPU where cohorts would not pay trains one run at a time by default
    # (placement.MIN_CPU_COHORT_SPEEDUP), and the tests of cohorts, their resume and their
    # layouts must run them anywhere; test_search checks the default's rule itself.
    config.search.parallel = 64
    # One setting (today's BatchNorm rule): the tests that search settings say so.
    config.search.bn_policies = ("train",)
    config.search.max_layers = 3
    config.search.topk = (2,)
    config.search.max_blocks = 2
    config.search.window = 2
    config.search.max_windows = 2
    # One option of the one-run methods that have several (their options differ in numbers,
    # not in code paths): 16 runs, every strategy.
    config.search.llrd_decays = (0.65,)
    config.search.lp_epochs = 1
    config.search.l2sp_alphas = (0.01,)
    # SubTuning over the top two units: round 1 the head and each unit, round 2 the other unit.
    config.search.subtuning_units = 2
    config.search.subtuning_rounds = 2
    return config
