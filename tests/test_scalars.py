"""The TensorFlow-free scalar writer, read back by TensorBoard's own event reader."""
from tensorboard.backend.event_processing import event_accumulator

from blockft_jax.common.scalars import ScalarWriter


def read_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    events = event_accumulator.EventAccumulator(str(logdir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_scalars_read_back_by_tensorboard(tmp_path):
    writer = ScalarWriter(tmp_path / "run")
    writer.scalars({"loss": 2.5, "val_accuracy": 0.25}, step=1)
    writer.scalars({"loss": 1.5, "val_accuracy": 0.75}, step=2)
    writer.close()
    assert read_scalars(tmp_path / "run") == {"loss": [(1, 2.5), (2, 1.5)],
                                              "val_accuracy": [(1, 0.25), (2, 0.75)]}
