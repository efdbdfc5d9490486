"""From the command line to a search: multi-host setup, and errors users can act on."""
from __future__ import annotations

import logging

import jax

log = logging.getLogger("blockft_jax")


def run(config, workdir: str, *, start_over: bool = False, distributed: bool = False) -> int:
    """Runs the search; returns a process exit status. Mistakes in the config, data or
    weights end with one clear line, not a traceback."""
    from blockft_jax import search, weights
    from blockft_jax.workdir import WorkdirError
    if distributed:
        jax.distributed.initialize()  # TPU pods and SLURM find their peers themselves
    if not jax.config.jax_compilation_cache_dir:
        # A resumed (preempted) or repeated search reuses its compiled steps.
        from blockft_jax.weights import cache_dir
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax_compilation"))
        # Small programs too (the head init, eval steps: 0.2-0.5 s each on CPU).
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    log.info("JAX %s: %d process(es), %d device(s): %s", jax.__version__, jax.process_count(),
             jax.device_count(), jax.devices()[0].device_kind)
    try:
        search.run(config, workdir, start_over=start_over)
    except (search.ConfigError, WorkdirError, weights.WeightsError, FileNotFoundError,
            ValueError, RuntimeError) as e:
        log.debug("Traceback", exc_info=True)
        log.error("error: %s", e)
        return 2
    return 0
