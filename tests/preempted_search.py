"""One search of configs/tiny.py, preempted as a VM is: SIGKILL right after a chosen checkpoint.

    python tests/preempted_search.py WORKDIR OVERRIDES_JSON [KILL_AT] [DIVERGE_AT]

OVERRIDES_JSON: {"train.seeds": 2, ...} applied to configs/tiny.py. KILL_AT says after which
checkpoint the process kills itself (kill -9: no cleanup, no atexit):
  full      the first checkpoint of a cohort that trains `full`;
  top       the first checkpoint of a cohort that does not;
  diverged  the first checkpoint that holds a diverged (non-finite) epoch;
  save:N    the N-th checkpoint;
  round:N   right after round N of a strategy in rounds was decided (its pruned runs recorded).
Without KILL_AT the search runs to the end. DIVERGE_AT ("CANDIDATE/SEED/EPOCH") makes that run's
train loss non-finite at that epoch (1-based), as a learning rate that blows up late would, and
its validation accuracy there the best of all (a non-finite epoch must never be the best one):
the same run diverges in the uninterrupted search and in the one that is killed and resumed.
"""
import json
import os
import signal
import sys


def main(argv):
    workdir, overrides = argv[1], json.loads(argv[2])
    kill_at = argv[3] if len(argv) > 3 and argv[3] else None
    diverge_at = argv[4] if len(argv) > 4 else None
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import logging

    import numpy as np

    from blockft_jax.engine import checkpoint
    from blockft_jax import launch
    from blockft_jax.search import decisions, search
    from blockft_jax.engine import cohort as cohort_lib
    from configs import tiny

    logging.getLogger().setLevel(logging.INFO)
    config = tiny.get_config()
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = tuple(value) if isinstance(value, list) else value

    training = []  # the (candidate, seed) keys of the runs being trained now
    run_cohort = search.Search.run_cohort

    def tracking(self, runs, unit, *rest):
        training[:] = [(g.candidate, seed) for g, seed in runs]
        return run_cohort(self, runs, unit, *rest)

    search.Search.run_cohort = tracking
    if diverge_at:
        candidate, seed, epoch = diverge_at.rsplit("/", 2)
        target, epoch = (candidate, int(seed)), int(epoch)
        poisoned_now = []  # the run's slot while its diverged epoch is being validated

        def poisoned(original, per_run):
            def epoch_fn(*args, **kwargs):
                out = original(*args, **kwargs)
                if target in training and kwargs.get("epoch", args[7]) == epoch - 1:
                    poisoned_now.append(training.index(target))
                    out = per_run(out, poisoned_now[-1])
                return out
            return epoch_fn

        def nan_in_run(out, i):
            state, losses, accuracies, steps = out
            return state, [np.nan if j == i else x for j, x in enumerate(losses)], accuracies, steps

        def best_looking(original):  # the diverged epoch validates best of all: never chosen
            def evaluate(*args, **kwargs):
                out = original(*args, **kwargs)
                if poisoned_now:
                    i = poisoned_now.pop()
                    (out[i] if isinstance(out, list) else out)["accuracy"] = 1.0
                return out
            return evaluate

        cohort_lib.train_epoch = poisoned(cohort_lib.train_epoch, nan_in_run)
        cohort_lib.evaluate = best_looking(cohort_lib.evaluate)

    if kill_at:
        save = checkpoint.Checkpoint.save

        saves = []

        def preempting(self, state, histories, epoch):
            save(self, state, histories, epoch)
            saves.append(epoch)
            runs = [tuple(k) for k in self.keys]
            holds_diverged = any(not np.isfinite(r["train_loss"]) for h in histories
                                 for r in h)
            if {"full": any(c == "full" for c, _ in runs) and len(runs) > 1,
                    "auto_rgn": any(c == "auto_rgn" for c, _ in runs),
                    "gradual": any(c.startswith("gradual:") for c, _ in runs),
                    "top": all(c != "full" for c, _ in runs) and len(runs) > 1,
                    "diverged": holds_diverged,
                    f"save:{len(saves)}": True}.get(kill_at, False):
                self.ckptr.wait_until_finished()
                print(f"KILLED after epoch {epoch} of {runs}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.Checkpoint.save = preempting
    if kill_at and kill_at.startswith("round:"):
        decide_round = decisions.Decisions.decide_round

        def deciding(self, strategy, index, *rest, **kwargs):
            entry = decide_round(self, strategy, index, *rest, **kwargs)
            if index == int(kill_at.split(":")[1]):
                print(f"KILLED after round {index} of {strategy} was decided", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return entry

        decisions.Decisions.decide_round = deciding
    return launch.run(config, workdir)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main(sys.argv))
