"""A small folder of made-up photos, to try the "Your own photos" walkthrough without photos of
your own (and for CI, which runs it):

    python scripts/example_photos.py            # photos/<class>/*.jpg and new_photos/*.jpg

Three classes -- circles, squares, stripes -- drawn in random colours, sizes and places on
noisy backgrounds, as JPEG files of a few sizes: what an image folder from a phone looks like
to the search, in miniature. new_photos/ holds unlabelled ones for `predict`. A photos/ folder
that exists already is left as it is.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circles", "squares", "stripes")


def draw(kind: str, rng: np.random.Generator) -> Image.Image:
    width, height = (int(v) for v in rng.integers(64, 160, 2))
    background = rng.integers(0, 256, 3)
    pixels = np.clip(background + rng.normal(0, 25, (height, width, 3)), 0, 255)
    image = Image.fromarray(pixels.astype(np.uint8))
    pen = ImageDraw.Draw(image)
    colour = tuple(int(c) for c in (255 - background + rng.integers(-40, 40, 3)) % 256)
    size = int(rng.integers(min(width, height) // 3, min(width, height) * 3 // 4))
    x, y = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
    if kind == "circles":
        pen.ellipse((x, y, x + size, y + size), fill=colour)
    elif kind == "squares":
        pen.rectangle((x, y, x + size, y + size), fill=colour)
    else:
        step = int(rng.integers(6, 14))
        for top in range(0, height, 2 * step):
            pen.rectangle((0, top, width, top + step), fill=colour)
    return image


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="photos", help="the labelled folder")
    parser.add_argument("--new", default="new_photos", help="the unlabelled folder")
    parser.add_argument("--per_class", type=int, default=20, help="photos per class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if Path(args.out).is_dir() and any(Path(args.out).iterdir()):  # someone's photos: hands off
        print(f"{args.out}/ exists already; left as it is")
        return
    rng = np.random.default_rng(args.seed)
    for kind in CLASSES:
        folder = Path(args.out) / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(args.per_class):
            draw(kind, rng).save(folder / f"{kind}_{i:03d}.jpg", quality=90)
    Path(args.new).mkdir(parents=True, exist_ok=True)
    for i, kind in enumerate(CLASSES * 2):
        draw(kind, rng).save(Path(args.new) / f"photo_{i}.jpg", quality=90)
    print(f"Wrote {len(CLASSES) * args.per_class} photos in {len(CLASSES)} classes to "
          f"{args.out}/ and {2 * len(CLASSES)} unlabelled ones to {args.new}/")


if __name__ == "__main__":
    main()
