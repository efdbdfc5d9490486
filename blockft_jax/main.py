"""Searches which layers of a pretrained CNN to fine-tune (block-wise fine-tuning).

  python -m blockft_jax.main --config configs/mobilenet_v2.py [--workdir runs/mnv2] [--dry_run]
  python -m blockft_jax.main --config configs/mobilenet_v2.py --dry_run --target tpu:v5e:2x4

Any config key can be overridden after --config: --config.<key>=<value>, e.g.
  --config.train.epochs=5 --config.data.name=image_folder --config.data.path=photos
  --config.search.strategies='("layerwise","topk")'
--show_config lists every key with its value (after the overrides). Results go to --workdir
(default runs/<config file name>); rerunning the same command resumes the search there. Other
libraries' notices (JAX, TensorFlow) are hidden unless --verbosity=0 (or 1) asks for them.
On a CPU, JAX gets one device per physical core
(XLA_FLAGS=--xla_force_host_platform_device_count=N sets another count).
"""
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from blockft_jax import cli
from blockft_jax.common import cores

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The search's config file (required), e.g. "
                                "configs/mobilenet_v2.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for results, checkpoints and models "
                                     "(default: runs/<config file name>).")
flags.DEFINE_bool("dry_run", False, "Check the config, the data and the weights file, print "
                                    "the plan; train nothing, write nothing.")
flags.DEFINE_bool("show_config", False, "Print every config key with its value and exit.")
flags.DEFINE_bool("start_over", False, "Archive an earlier search in --workdir and start again.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.DEFINE_string("target", None, "With --dry_run: compile the search's steps for a TPU slice "
                                    "on this machine and estimate its memory and time there, "
                                    "e.g. tpu:v5e:2x4 or tpu:v4:2x2x4 (needs pip install -e "
                                    "'.[tpu]').")


def main(argv):
    del argv
    if FLAGS.show_config:
        print(cli.config_listing(FLAGS.config))
        return
    cli.setup_logging(FLAGS.verbosity if FLAGS["verbosity"].present else None)
    cores.use_every_core()  # before JAX starts: it reads XLA_FLAGS once
    from blockft_jax import launch  # after the flags: --help and mistakes need no JAX
    config_file = config_flags.get_config_filename(FLAGS["config"]).partition(":")[0]
    workdir = FLAGS.workdir or str(Path("runs") / Path(config_file).stem)
    if FLAGS.target and not FLAGS.dry_run:
        cli.fail("--target estimates a search on a TPU slice without running it: add --dry_run.")
    sys.exit(launch.run(FLAGS.config, workdir, start_over=FLAGS.start_over,
                        distributed=FLAGS.distributed, dry_run_only=FLAGS.dry_run,
                        target=FLAGS.target))


if __name__ == "__main__":
    cli.configs_importable(sys.argv)
    app.run(main, flags_parser=cli.parse_main_flags)
