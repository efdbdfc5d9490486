"""The search's progress in the log: a line per finished run, a line per slow cohort epoch, an
honest ETA; and the seconds spent compiling."""
from __future__ import annotations

import contextlib
import logging
import math
import threading
import time

import jax

log = logging.getLogger("blockft_jax.search")


class Progress:
    """Console progress: a line per finished run, a line per epoch of a cohort whose epochs
    take SLOW_EPOCH seconds or more (else one every PERIOD seconds), and an ETA.

    The ETA is the run-epochs left on each engine times that engine's seconds per run-epoch,
    measured: its cohorts' epochs (training and validation) over the run-epochs they trained.
    An engine not measured yet (full fine-tuning, while the top of the network trains) is
    estimated from a measured one, scaled by the ratio of their compiled train steps' flops per
    run. Before the first epoch is measured there is no ETA."""

    SLOW_EPOCH = 2.0
    PERIOD = 15.0

    def __init__(self, total: int, done: int, flops=lambda unit: None):
        self.total, self.done = total, done
        self.left: dict[str, int] = {}        # run-epochs left per engine
        self.seconds: dict[str, float] = {}   # measured, per engine
        self.trained: dict[str, int] = {}     # run-epochs measured, per engine
        self.flops = flops                    # unit -> compiled train-step flops per run
        self.last_line = time.perf_counter()

    def plan(self, unit: str, run_epochs: float) -> None:
        """The run-epochs engine `unit` will train (counted once per engine)."""
        self.left.setdefault(unit, run_epochs)

    def epoch(self, unit: str, keys, histories, epoch: int, seconds: float,
              trained: int) -> None:
        self.seconds[unit] = self.seconds.get(unit, 0.0) + seconds
        self.trained[unit] = self.trained.get(unit, 0) + trained
        self.left[unit] = max(self.left.get(unit, 0) - trained, 0)
        now = time.perf_counter()
        if seconds < self.SLOW_EPOCH and now - self.last_line < self.PERIOD:
            return
        self.last_line = now
        val = [h[-1]["val_accuracy"] for h in histories if h and h[-1]["epoch"] == epoch]
        names = keys[0][0] + (f" +{len(keys) - 1}" if len(keys) > 1 else "")
        log.info("  %s: epoch %d of %d run(s) (%s) in %.1f s, validation %s | ETA %s",
                 unit, epoch, len(keys), names, seconds,
                 f"{min(val):.3f}-{max(val):.3f}" if val else "-", self.eta())

    def finished(self, row: dict) -> None:
        self.done += 1
        log.info("[%d/%d] %-40s seed %d: val %.3f test %s (epoch %d, %s) %.1fs | ETA %s",
                 self.done, self.total, row["candidate"], row["seed"], row["val_accuracy"],
                 "-" if row["test_accuracy"] is None else f"{row['test_accuracy']:.3f}",
                 row["best_epoch"], row["status"], row["train_seconds"], self.eta())

    def rate(self, unit: str) -> float | None:
        """Seconds per run-epoch of an engine: measured, or scaled from a measured one."""
        if self.trained.get(unit):
            return self.seconds[unit] / self.trained[unit]
        measured = [u for u in self.trained if self.trained[u] and self.flops(u)]
        if not measured or not self.flops(unit):
            return None
        known = measured[-1]
        return self.seconds[known] / self.trained[known] * self.flops(unit) / self.flops(known)

    def eta(self) -> str:
        """The time left; '>= t' while an engine with runs left has no estimate yet (its steps
        still compiling), '?' before any epoch was measured."""
        seconds, unknown = 0.0, False
        for unit, left in self.left.items():
            if left:
                rate = self.rate(unit)
                unknown |= rate is None
                seconds += left * (rate or 0.0)
        if unknown:
            return f">= {duration(seconds)}" if seconds else "?"
        return duration(seconds)


def duration(seconds: float) -> str:
    """'4m05s', '1h02m'; '?' when not finite."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


class CompileClock:
    """Seconds JAX spends tracing, lowering and compiling while it is installed: in all
    (`seconds`, background compilations included), and holding up the thread that installed it
    (`blocking`: compiling on that thread or waiting for a background compilation)."""

    def __init__(self):
        self.seconds = self.blocking = 0.0
        self.thread = threading.current_thread()

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if event.startswith("/jax/core/compile/"):
            self.seconds += duration
            if threading.current_thread() is self.thread:
                self.blocking += duration

    @contextlib.contextmanager
    def waiting(self):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.blocking += time.perf_counter() - started

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)
