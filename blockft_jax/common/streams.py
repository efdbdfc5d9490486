"""A run's random streams, named, so that no two share bits at any step.

Each jax stream is its own `fold_in` of the run's seed key: the head's initialisation
(`head_key`), and per train step the augmentation and dropout keys (`step_key`: a fold_in of the
stream, then of the step). The batch order is numpy's generator seeded [seed, epoch] (a
permutation drawn on the host each epoch, by every process alike): a stream of its own that
shares nothing with the jax keys.
"""
from __future__ import annotations

import jax
import numpy as np

HEAD = 1
AUGMENT = 2
DROPOUT = 3
GRADIENT_NORMS = 4  # Auto-RGN's measurement batches (their augmentation and dropout)


def seed_key(seed: int) -> jax.Array:
    """The key every stream of the run `seed` derives from."""
    return jax.random.key(seed)


def head_key(seed: int) -> jax.Array:
    """The run's head initialisation (shared by every candidate of a seed: paired runs)."""
    return jax.random.fold_in(seed_key(seed), HEAD)


def step_key(key: jax.Array, stream: int, step) -> jax.Array:
    """The `stream` (AUGMENT, DROPOUT, GRADIENT_NORMS) key of train step `step` of the run
    with seed key `key`."""
    return jax.random.fold_in(jax.random.fold_in(key, stream), step)


def batch_order(seed: int, epoch: int) -> np.random.Generator:
    """The generator of the run's batch order in `epoch`."""
    return np.random.default_rng([seed, epoch])
