"""From the command line to a search (`api.run`): multi-host setup, the log file, the dry run
and errors.

Errors a user can fix (config, data, weights, workdir, a full disk) end with one line saying
what to do; anything else keeps its traceback, and the last line says where the full log is.
"""
from __future__ import annotations

import errno
import logging
from pathlib import Path

import jax

from blockft_jax import api, benchmarking, models
from blockft_jax import target as target_lib
from blockft_jax.common import multihost, progress
from blockft_jax.common import workdir as workdir_lib
from blockft_jax.common.errors import UserError
from blockft_jax.engine import cohort, train
from blockft_jax.search import costs, plan

log = logging.getLogger("blockft_jax")


def dry_run(config, inputs: list[str]) -> str:
    """The plan of the search `config` describes (checked: `plan.check`), and what it reads,
    without loading images or weights; with the dataset's size known (an image folder, the
    digits), the engines by depth and the estimated time, from one real train step compiled
    and timed on this machine (random inputs)."""
    module = plan.build_module(config, num_classes=2)  # the head's size changes nothing here
    shape = (config.model.input_size, config.model.input_size, 3)
    table = models.layer_table(module, shape)
    searched = plan.make_plan(config, table, module)
    images = plan.approximate_images(config)
    if images is None or not searched.shared:
        return "\n".join([*inputs, plan.describe(config, searched, table, (
            "Estimated time: known once the dataset's size is (after its first load)."
            if images is None else None))])
    speed = _speed(config, module, table, searched, shape, images[0])
    searched = plan.make_plan(config, table, module, speed=speed, images=images)
    suffix = costs.suffix_flops(table, models.variable_shapes(module, shape), searched.units)
    cost = costs.estimate(searched, suffix, speed, images, config.data.batch_size,
                          config.data.batch_size * cohort.EVAL_BATCH_MULTIPLE)
    took = {part: progress.duration(seconds) for part, seconds in cost.items()}
    estimate = (f"Estimated time: {took['seconds']} on this machine ({took['train']} training, "
                f"{took['compile']} compiling, {took['prefix']} prefix caches; {images[0]:,} "
                f"training and {images[1]:,} validation images; from {speed.measured_on}, "
                f"compiled and timed here: {speed.compile_seconds:.1f} s to compile, "
                f"{speed.step_seconds * 1e3:.1f} ms a step and "
                f"{1e-9 / speed.seconds_per_flop:.1f} GFLOP/s beyond it).")
    return "\n".join([*inputs, plan.describe(config, searched, table, estimate)])


def _speed(config, module, table, searched, shape, train_images: int):
    """This machine's speed (costs.measure_once: as the search measures and keeps it) from the
    engine of the search's shallowest candidates, with random variables (nothing is loaded)
    and the search's optimizer."""
    variables = benchmarking.random_variables(module, shape, seed=0)
    tx = train.make_optimizer(config.train, train.total_steps(config, train_images))
    return costs.measure_once(config, searched, module, table, variables, tx,
                              batch_size=config.data.batch_size, image_shape=shape)


def run(config, workdir: str, *, start_over: bool = False, distributed: bool = False,
        dry_run_only: bool = False, target: str | None = None) -> int:
    """Runs the search (or prints its plan); returns a process exit status."""
    if distributed:
        jax.distributed.initialize()  # TPU pods and SLURM find their peers themselves
    if not multihost.is_leader():  # one copy of the search's progress: process 0's
        logging.getLogger("blockft_jax").setLevel(logging.WARNING)
    workdir = Path(workdir).expanduser().absolute()
    log_file = None
    try:
        api.resolve_paths(config)
        # Every value and every input checked before the workdir is touched: a mistake leaves
        # no trace there, and the rerun after fixing it starts as if it were the first.
        inputs = plan.check(config)
        if dry_run_only:
            print(dry_run(config, inputs))
            if target:  # the search's steps compiled for a TPU slice (target.py)
                print(target_lib.report(config, target))
            print(f"Results would go to {workdir}.")
            return 0
        if multihost.is_leader():
            log_file = _log_to_file(workdir / workdir_lib.LOG)
        api.run(config, workdir=workdir, start_over=start_over)
        if distributed:
            leave_distributed()
    except UserError as e:
        log.debug("Traceback", exc_info=True)
        log.error("error: %s", " ".join(str(e).split()))
        return 2
    except Exception as e:
        full = _disk_full(e)
        if full is not None:
            log.debug("Traceback", exc_info=True)
            log.error("error: the disk is full (writing %s). Free space there, or use another "
                      "--workdir, and run the same command again: finished results are kept and "
                      "the search resumes.", full)
            return 2
        log.exception("Unexpected error")
        where = (f"the traceback is above and in {log_file.baseFilename}" if log_file
                 else "the traceback is above")
        log.error("error: %s: %s. This looks like a bug or a machine problem, not a mistake in "
                  "your config or data; %s.", type(e).__name__, e, where)
        return 1
    finally:
        if log_file is not None:
            logging.getLogger().removeHandler(log_file)
            log_file.close()
    return 0


def leave_distributed() -> None:
    """Every process waits for the others, then disconnects: process 0 hosts the coordination
    service, and leaving while another process still talks to it aborts at exit."""
    if jax.process_count() > 1:
        multihost.barrier("search finished")
        jax.distributed.shutdown()


def _disk_full(error: BaseException) -> str | None:
    """The path of a 'no space left on device' anywhere in the error's chain, or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return error.filename or "the workdir"
        error = error.__cause__ or error.__context__
    return None


def _log_to_file(path: Path) -> logging.FileHandler:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler
