"""One decider on several processes: process 0 decides, every process gets its answer.

On a pod every process runs the search, but only process 0 reads and writes the workdir's
decisions (results, checkpoints' metadata, saved models). Anything that steers training or
writing is decided there and broadcast, so processes can never disagree, even on a shared
filesystem whose writes show up late elsewhere (gcsfuse). On one process all of this is free.
"""
from __future__ import annotations

import json
from typing import Any, Callable

import jax
import numpy as np


def is_leader() -> bool:
    return jax.process_index() == 0


def broadcast_json(decide: Callable[[], Any]) -> Any:
    """`decide()` run on process 0 only; its (JSON-able) answer returned on every process."""
    if jax.process_count() == 1:
        return decide()
    from jax.experimental import multihost_utils
    payload = json.dumps(decide()).encode() if is_leader() else b""
    size = int(multihost_utils.broadcast_one_to_all(np.int64(len(payload))))
    buffer = np.zeros(size, np.uint8)
    if is_leader():
        buffer[:] = np.frombuffer(payload, np.uint8)
    buffer = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    return json.loads(buffer.tobytes().decode())


def broadcast_arrays(tree_from_leader: Callable[[], Any], like: Any) -> Any:
    """A pytree of arrays shaped like `like`, as process 0's `tree_from_leader()` gives it."""
    if jax.process_count() == 1:
        return tree_from_leader()
    from jax.experimental import multihost_utils
    tree = tree_from_leader() if is_leader() else jax.tree.map(np.zeros_like, like)
    return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(tree))


def barrier(name: str) -> None:
    """Waits until every process gets here (before reading what process 0 wrote)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
