"""TensorBoard scalar event files, written without TensorFlow.

tf.summary would do, but importing TensorFlow takes 7 s here (more while JAX compiles beside
it), and a search that reads its data without TensorFlow (digits, image folders) would pay it
before its first candidate. The event file format is TFRecord-framed `Event` protos; the
`tensorboard` package ships both the protos and the framing, in pure Python.
"""
from __future__ import annotations

import socket
import time
from pathlib import Path

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter


class ScalarWriter:
    """Appends scalars to a new events file in `logdir` (`tensorboard --logdir` reads it)."""

    def __init__(self, logdir: Path):
        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        # The name TensorBoard looks for: events.out.tfevents.<time>.<host>[.<suffix>].
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}"
        self.path = logdir / name
        self._records = RecordWriter(open(self.path, "wb"))
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def scalars(self, values: dict[str, float], step: int) -> None:
        """One event holding every (tag, value) for `step`; flushed at once."""
        summary = summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()])
        self._write(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
        self._records.flush()

    def close(self) -> None:
        self._records.close()

    def _write(self, event) -> None:
        self._records.write(event.SerializeToString())
