"""python -m blockft_jax.main --config configs/mobilenet_v2.py [--workdir runs/mnv2] [--dry_run]"""
import logging
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from blockft_jax import launch

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Search configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for results, checkpoints and models "
                                     "(default: runs/<config file name>).")
flags.DEFINE_bool("dry_run", False, "Check the config and print the plan; train nothing.")
flags.DEFINE_bool("start_over", False, "Archive an earlier search in --workdir and start again.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.mark_flags_as_required(["config"])


def _configs_importable(argv) -> None:
    """Config files import their defaults as `configs.default`: make the folder that holds
    configs/ importable wherever the command runs from."""
    for i, arg in enumerate(argv):
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else (
            argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
        if path:
            sys.path.insert(0, str(Path(path).expanduser().absolute().parent.parent))


def main(argv):
    del argv
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
    workdir = FLAGS.workdir or str(
        Path("runs") / Path(config_flags.get_config_filename(FLAGS["config"])).stem)
    sys.exit(launch.run(FLAGS.config, workdir, start_over=FLAGS.start_over,
                        distributed=FLAGS.distributed, dry_run_only=FLAGS.dry_run))


if __name__ == "__main__":
    _configs_importable(sys.argv)
    app.run(main)
