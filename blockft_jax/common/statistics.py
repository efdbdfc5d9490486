"""The paired bootstrap behind every comparison of a search: a rung's decision
(candidates/halving.py) and the summary's comparisons (search/results.py). Numpy only, so
that both can use it without importing each other."""
from __future__ import annotations

import numpy as np

REPLICATES = 2000
BOOTSTRAP_SEED = 0
# Replicates are computed in batches of about this many (replicate, example) pairs (32 MB).
BATCH_ELEMENTS = 2**22


def paired_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray, *,
                     replicates: int = REPLICATES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """Bootstrap replicates of mean accuracy(a) - mean accuracy(b), both (seeds, examples).

    Each replicate resamples examples and seeds with replacement, the same draws for both sides:
    seed k of every candidate shares the head init and data order, and every candidate sees the
    same examples, so pairing removes the noise the two share.

    Draws: seed indices come from default_rng([seed, 0]), example indices from
    default_rng([seed, 1]), replicate after replicate, each index floor(n * uniform) (one
    64-bit draw per index, so the stream does not depend on how replicates are batched here).
    """
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ValueError(f"need two equal, non-empty (seeds, examples) arrays; got {a.shape} "
                         f"and {b.shape}.")
    n_seeds, n_examples = a.shape
    diff = a.astype(np.float64) - b.astype(np.float64)
    seed_rng = np.random.default_rng([seed, 0])
    example_rng = np.random.default_rng([seed, 1])
    seed_draws = _indices(seed_rng, (replicates, n_seeds), n_seeds)
    # How often each seed is drawn, per replicate: (replicates, seeds).
    seed_counts = (seed_draws[:, :, None] == np.arange(n_seeds)).sum(axis=1)
    out = np.empty(replicates)
    batch = max(1, BATCH_ELEMENTS // n_examples)
    for start in range(0, replicates, batch):
        stop = min(start + batch, replicates)
        # Per replicate, each example's difference averaged over the drawn seeds...
        per_example = seed_counts[start:stop] @ diff / n_seeds
        # ...then averaged over the drawn examples.
        drawn = _indices(example_rng, (stop - start, n_examples), n_examples)
        out[start:stop] = np.take_along_axis(per_example, drawn, axis=1).mean(axis=1)
    return out


def _indices(rng: np.random.Generator, shape, n: int) -> np.ndarray:
    return np.minimum((rng.random(shape) * n).astype(np.int64), n - 1)


def interval95(replicates: np.ndarray) -> list[float]:
    lo, hi = np.quantile(replicates, [0.025, 0.975])
    return [float(lo), float(hi)]
