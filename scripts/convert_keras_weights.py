#!/usr/bin/env python
"""Convert Keras weights into blockft_jax variables (flax msgpack of {'params','batch_stats'}).

  python scripts/convert_keras_weights.py --model mobilenet_v2 --width 0.35 --size 224 \
      --keras path/to/file.h5 --out mnv2.msgpack
  python scripts/convert_keras_weights.py --model resnet50_v2 --imagenet --out r50v2.msgpack
"""
import argparse
import sys

import jax

from blockft_jax import models
from blockft_jax.inputs import weights


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, choices=models.MODEL_NAMES)
    parser.add_argument("--width", type=float, default=1.0, help="Keras's alpha")
    parser.add_argument("--size", type=int, default=224, help="input height = width")
    parser.add_argument("--minimalistic", action="store_true", help="MobileNetV3 only")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--keras", help="a Keras .h5, .weights.h5 or .keras file (a whole "
                        "transfer model too: its backbone is found by its layers)")
    source.add_argument("--imagenet", action="store_true",
                        help="download the official keras-applications ImageNet file")
    parser.add_argument("--out", required=True, help="output .msgpack path")
    args = parser.parse_args(argv)

    options = {"minimalistic": True} if args.minimalistic else {}
    module = models.create(args.model, width=args.width, **options)
    try:
        if args.imagenet:
            variables = weights.imagenet_variables(args.model, module, args.size)
        else:
            variables = weights.load_keras(args.keras, module, (args.size, args.size, 3))
    except (weights.WeightsError, FileNotFoundError, RuntimeError, ValueError) as e:
        sys.exit(f"error: {e}")
    weights.save_variables(args.out, variables)
    count = sum(x.size for x in jax.tree.leaves(variables))
    print(f"wrote {args.out}: {count:,} values for {args.model} (width {args.width})")


if __name__ == "__main__":
    main()
