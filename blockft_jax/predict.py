"""Classify images with a model a search saved.

    python -m blockft_jax.predict --model runs/x photos/ cat.jpg > labels.csv

prints CSV: `path,class,probability` (the top class), plus `class_2,probability_2,...` with
`--top K`. `--model` takes a search's workdir (its winner, WORKDIR/models/best) or a saved
model's folder (WORKDIR/models/<strategy>). Folders are searched recursively for
jpg/jpeg/png/bmp/gif files. Images are decoded and resized exactly as the training images were
(`data.read_image`) and preprocessed as the model expects. An unreadable image is named on
stderr and skipped; the exit status is 0 when at least one image was classified, 2 otherwise
(with one line saying why).

From Python:

    model = predict.load("runs/x")                 # or "runs/x/models/layerwise"
    probabilities = model.probabilities(images)   # uint8 (N, size, size, 3) RGB -> (N, classes)
"""
from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import functools
import sys
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from blockft_jax import cli, models
from blockft_jax.engine import checkpoint
from blockft_jax.inputs import data


@dataclasses.dataclass(frozen=True)
class SavedModel:
    """A saved models/<strategy>/ directory, rebuilt: the Flax module, its variables and
    model.json."""
    module: models.Backbone
    variables: dict
    meta: dict

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def input_size(self) -> int:
        return int(self.meta["input_size"])

    @property
    def preprocessing(self) -> str:
        return self.meta["preprocessing"]

    def probabilities(self, images, batch_size: int = 32) -> np.ndarray:
        """Softmax probabilities (N, classes), float32, for uint8 RGB images (N, size, size, 3)
        (0-255 floats work too). Batches are padded to one shape: one compilation."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (self.input_size, self.input_size, 3):
            raise ValueError(f"Expected images of shape (N, {self.input_size}, "
                             f"{self.input_size}, 3), got {images.shape}.")
        return self._in_batches_of(images, max(1, min(batch_size, len(images))))

    def _in_batches_of(self, images: np.ndarray, size: int) -> np.ndarray:
        out = []
        for start in range(0, len(images), size):
            batch = images[start:start + size]
            padded = np.concatenate([batch, np.zeros((size - len(batch),) + batch.shape[1:],
                                                     batch.dtype)])
            out.append(np.asarray(_probabilities(self.module, self.preprocessing,
                                                 self.variables, padded))[:len(batch)])
        return (np.concatenate(out) if out
                else np.zeros((0, len(self.class_names)), np.float32))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _probabilities(module, preprocessing, variables, images):
    logits = module.apply(variables, data.preprocess(images, preprocessing), train=False)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def model_path(path) -> Path:
    """The saved model `path` names: a saved model's directory itself (WORKDIR/models/best,
    WORKDIR/models/<strategy>), or a search's workdir, meaning its winner (models/best).
    FileNotFoundError naming the saved models there when it names none."""
    path = Path(path)
    if (path / checkpoint.MODEL_META).exists():
        return path
    if (path / "models" / "best" / checkpoint.MODEL_META).exists():
        return path / "models" / "best"
    folder = path / "models" if (path / "models").is_dir() else path
    saved = sorted(str(p.parent) for p in folder.glob(f"*/{checkpoint.MODEL_META}"))
    if saved:
        raise FileNotFoundError(f"{path} is not a saved model (no {checkpoint.MODEL_META}) and "
                                f"has no models/best; pass one of: {', '.join(saved)}.")
    raise FileNotFoundError(f"{path} is not a saved model (no {checkpoint.MODEL_META}); pass "
                            "a search's workdir (its winner, WORKDIR/models/best) or "
                            "WORKDIR/models/<strategy>.")


def load(path) -> SavedModel:
    """Rebuilds a saved model for inference: `path` is a saved model's directory
    (checkpoint.save_model's) or a search's workdir (its winner; see model_path)."""
    path = model_path(path)
    variables, meta = checkpoint.load_model(path)
    missing = [key for key in ("model", "class_names", "input_size", "preprocessing")
               if key not in meta] or ([] if "name" in meta["model"] else ["model.name"])
    if missing:
        raise ValueError(f"{Path(path).absolute() / checkpoint.MODEL_META} lacks {missing}; "
                         "it was not written by a search of this version.")
    spec = meta["model"]
    options = {k: v for k, v in (spec.get("options") or {}).items() if v is not None}
    module = models.create(spec["name"], num_classes=len(meta["class_names"]),
                           width=spec.get("width", 1.0),
                           dropout_rate=spec.get("dropout_rate", 0.0), **options)
    return SavedModel(module, variables, meta)


def image_files(paths: Sequence) -> list[Path]:
    """The files named, and the image files (by suffix) under the folders named, recursively
    and sorted, in the order given."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in data.IMAGE_SUFFIXES)
        else:
            files.append(path)  # named explicitly: read it whatever its suffix
    return files


def classify(model: SavedModel, files: Sequence[Path], batch_size: int = 32
             ) -> tuple[list[Path], np.ndarray, list[tuple[str, str]]]:
    """(the files classified, their probabilities (N, classes), the skipped (path, reason)).
    Files are read batch by batch (in threads), so memory stays bounded."""
    def read(file):
        try:
            return data.read_image(file, model.input_size), None
        except data.UnreadableImageError as e:
            return None, str(e)

    classified, probabilities, skipped = [], [], []
    size = max(1, min(batch_size, len(files)))  # every batch padded to it: one compilation
    with concurrent.futures.ThreadPoolExecutor() as pool:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            images = []
            for file, (image, reason) in zip(chunk, pool.map(read, chunk)):
                if image is None:
                    skipped.append((str(file), reason))
                else:
                    classified.append(file)
                    images.append(image)
            if images:
                probabilities.append(model._in_batches_of(np.stack(images), size))
    stacked = (np.concatenate(probabilities) if probabilities
               else np.zeros((0, len(model.class_names)), np.float32))
    return classified, stacked, skipped


def csv_rows(files: Sequence[Path], probabilities: np.ndarray, class_names: Sequence[str],
             top: int = 1) -> list[list[str]]:
    """Header and one row per file: path, then the `top` classes with their probabilities,
    most probable first."""
    header = ["path", "class", "probability"]
    for k in range(2, top + 1):
        header += [f"class_{k}", f"probability_{k}"]
    rows = [header]
    for file, p in zip(files, probabilities):
        row = [str(file)]
        for c in np.argsort(-p, kind="stable")[:top]:
            row += [class_names[c], f"{p[c]:.6f}"]
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m blockft_jax.predict",
        description="Classify images with a saved model; CSV on stdout (path, class, "
                    "probability).")
    parser.add_argument("--model", required=True,
                        help="a search's workdir (its winner: WORKDIR/models/best) or a saved "
                             "model's folder (WORKDIR/models/<strategy>)")
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="image files or folders (searched recursively)")
    parser.add_argument("--top", type=int, default=1, help="classes per image")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=32,
                        help="images per batch")
    args = parser.parse_args(argv)

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    if args.batch_size < 1:
        return fail(f"--batch_size must be at least 1, got {args.batch_size}.")
    try:
        model = load(args.model)
    except (FileNotFoundError, ValueError) as e:
        return fail(str(e))
    if not 1 <= args.top <= len(model.class_names):
        return fail(f"--top must be between 1 and {len(model.class_names)} (the model's "
                    f"classes), got {args.top}.")
    files = image_files(args.paths)
    classified, probabilities, skipped = classify(model, files, args.batch_size)
    for path, reason in skipped:
        print(f"warning: skipped {path}: {reason}", file=sys.stderr)
    if not files:
        return fail(f"no image files ({', '.join(sorted(data.IMAGE_SUFFIXES))}) in "
                    f"{' '.join(args.paths)}.")
    if not classified:
        return fail(f"none of the {len(files)} image file(s) could be read (see the warnings "
                    "above).")
    csv.writer(sys.stdout, lineterminator="\n").writerows(
        csv_rows(classified, probabilities, model.class_names, args.top))
    return 0


if __name__ == "__main__":
    cli.setup_logging()
    sys.exit(main())
