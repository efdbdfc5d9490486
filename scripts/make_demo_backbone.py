"""Pretrains the demo backbone of a config and ships it with the package:

    python scripts/make_demo_backbone.py --config configs/demo.py

writes blockft_jax/assets/<model>-<hash>.msgpack (the hash covers everything that shapes the
backbone: model, width, input size, digits, epochs, learning rate, recipe). With it
there, every machine fine-tunes the same backbone instead of one pretrained by its own float
order, and the demo starts at once. Rerun it after a change that raises
pretrained.DEMO_RECIPE, and commit the new file in place of the old one.
"""
from __future__ import annotations

import shutil
import sys

from absl import app, flags
from ml_collections import config_flags

from blockft_jax import cli

config_flags.DEFINE_config_file("config", None, "A config with model.weights='demo'.",
                                lock_config=True)


def main(argv):
    del argv
    cli.setup_logging()
    from blockft_jax.search import plan, pretrained
    from blockft_jax.inputs import weights  # after the flags: --help needs no JAX
    config = flags.FLAGS.config
    if config.model.weights != "demo":
        cli.fail(f"model.weights={config.model.weights!r}: this script makes the 'demo' "
                 f"backbone; use a config with model.weights='demo' (configs/demo.py).")
    plan.check(config)
    module = plan.build_module(config, num_classes=len(config.demo.pretrain_classes))
    pretrained.demo_backbone(config, module, pretrain=True)
    name = pretrained.demo_file_name(config)
    pretrained.SHIPPED_DIR.mkdir(exist_ok=True)
    shutil.copyfile(weights.cache_dir() / "demo" / name, pretrained.SHIPPED_DIR / name)
    print(f"Shipped: {pretrained.SHIPPED_DIR / name}")


if __name__ == "__main__":
    cli.configs_importable(sys.argv)
    app.run(main)
