"""One process of a 2-process search on localhost (CPU collectives over gloo), for
tests/test_multiprocess.py:

    python tests/search_worker.py PORT PROCESS_ID NUM_PROCESSES WORKDIR [DIE_AFTER_SAVES|skewed|bad]

Runs configs/tiny.py (every strategy) through the command line's launcher. With
DIE_AFTER_SAVES=N, process 0 kills itself (SIGKILL, as a preempted VM dies) right after its N-th
epoch checkpoint; the test then kills the other process the same way. With `skewed`,
train.checkpoint_seconds is 20 and process 1's clock runs 10,000 times fast: left to itself, it
would checkpoint after every epoch and process 0 rarely. With `bad`, the launcher joins the
processes itself (`--distributed`) and the config holds a mistake: the command's exit status
is returned as it is, with no leaving done here.
"""
import os
import signal
import sys

EXIT_UNSUPPORTED = 77  # the platform cannot run CPU multi-process collectives at all


def main(argv):
    port, process_id, num_processes = (int(a) for a in argv[1:4])
    workdir = argv[4]
    skewed = len(argv) > 5 and argv[5] == "skewed"
    bad = len(argv) > 5 and argv[5] == "bad"
    die_after = int(argv[5]) if len(argv) > 5 and not (skewed or bad) else None
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax
    initialize = jax.distributed.initialize

    def join():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                   process_id=process_id, initialization_timeout=120)

    if bad:  # --distributed: the launcher joins (on localhost here) and must leave
        jax.distributed.initialize = join
        from blockft_jax import launch
        from configs import tiny
        config = tiny.get_config()
        config.train.epochs = 0  # a mistake every process finds after joining
        return launch.run(config, workdir, distributed=True)
    try:
        join()
    except Exception as e:  # setup only: a failure later is a bug, not the platform
        print(f"UNSUPPORTED: {type(e).__name__}: {e}", flush=True)
        return EXIT_UNSUPPORTED
    import logging

    from blockft_jax.engine import checkpoint
    from blockft_jax import launch
    from configs import tiny
    logging.getLogger().setLevel(logging.INFO)
    if die_after is not None and process_id == 0:
        saves = []

        def preempting(original):
            def save(self, *args, **kwargs):
                original(self, *args, **kwargs)
                saves.append(1)
                if len(saves) == die_after:
                    self.ckptr.wait_until_finished()
                    os.kill(os.getpid(), signal.SIGKILL)
            return save

        checkpoint.Checkpoint.save = preempting(checkpoint.Checkpoint.save)
    config = tiny.get_config()
    if skewed:
        from blockft_jax.search import search
        config.train.checkpoint_seconds = 20.0
        if process_id == 1:  # the search's clock, not the libraries'
            import time
            import types
            search.time = types.SimpleNamespace(**{
                name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
            search.time.perf_counter = lambda: 1e4 * time.perf_counter()
    status = launch.run(config, workdir)
    # Leave together: process 0 hosts the coordination service, and exiting while the other
    # process still talks to it aborts the process (a check failure in its shutdown).
    launch.leave_distributed()
    return status


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main(sys.argv))
