"""python -m blockft_jax.main --config configs/mobilenet_v2.py --workdir runs/mnv2"""
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from blockft_jax import launch

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Search configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for results, checkpoints and models.")
flags.DEFINE_bool("start_over", False, "Archive an earlier search in --workdir and start again.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
    sys.exit(launch.run(FLAGS.config, FLAGS.workdir, start_over=FLAGS.start_over,
                        distributed=FLAGS.distributed))


if __name__ == "__main__":
    app.run(main)
