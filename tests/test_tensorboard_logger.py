"""logger=tensorboard writes scalars, the config as text and figures as images."""

from __future__ import annotations

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

from deqrun.loggers import TensorboardLogger  # noqa: E402


def events(log_dir):
    accumulator = EventAccumulator(str(log_dir), size_guidance={"images": 0, "tensors": 0,
                                                                "scalars": 0})
    accumulator.Reload()
    return accumulator


def test_scalars_config_figures_and_final_numbers(tmp_path):
    logger = TensorboardLogger(tmp_path, {"model": {"name": "mdeq"}, "trainer": {"seed": 3}})
    for step in (1, 2, 3):
        logger.log("step", {"step": step, "epoch": 1, "loss": 1.0 / step, "pretrain": False,
                            "note": "text is skipped", "nan": float("nan")})
    logger.log("epoch", {"epoch": 1, "step": 3, "test_accuracy": 0.5})
    figure, axes = plt.subplots(figsize=(2, 2))
    axes.plot([0, 1], [1, 0])
    logger.figure("curve", figure)
    plt.imsave(tmp_path / "sample.png", [[0.0, 1.0], [1.0, 0.0]])
    assert logger.figures(tmp_path) == ["sample"]
    logger.summary({"test_accuracy": 0.5, "status": "completed"})
    logger.close()
    found = events(tmp_path / "tensorboard")
    tags = found.Tags()
    assert {"step/loss", "step/epoch", "step/pretrain", "epoch/test_accuracy",
            "final/test_accuracy"} <= set(tags["scalars"])
    assert "step/note" not in tags["scalars"] and "step/nan" not in tags["scalars"]
    assert [(e.step, round(e.value, 4)) for e in found.Scalars("step/loss")] == \
        [(1, 1.0), (2, 0.5), (3, 0.3333)]
    assert {"curve", "figures/sample"} <= set(tags["images"])
    assert {"config/text_summary", "final/text_summary"} <= set(tags["tensors"])
    config_text = found.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"seed": 3' in config_text


def test_a_resumed_run_drops_events_after_its_checkpoint(tmp_path):
    first = TensorboardLogger(tmp_path, {})
    for step in range(1, 7):
        first.log("step", {"step": step, "loss": float(step)})
    first.close()
    resumed = TensorboardLogger(tmp_path, {}, append=True, resume_step=4)
    resumed.log("step", {"step": 5, "loss": 50.0})
    resumed.close()
    steps = [(e.step, e.value) for e in events(tmp_path / "tensorboard").Scalars("step/loss")]
    assert steps == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0)]
