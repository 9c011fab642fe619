"""logger=tensorboard: event files in <run>/tensorboard for clusters where wandb is not an option.

Scalars per step (`step/<name>`) and per epoch (`epoch/<name>`, on the step axis so both line
up), the resolved config as text, the final numbers as text and scalars (`final/<name>`), and
figures (matplotlib figures or PNG files, e.g. the pictures a task writes as artifacts) as
images. A resumed run drops the events the interrupted one logged after its checkpoint
(`purge_step`), so curves do not fold back. View with `tensorboard --logdir outputs/`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from deqrun.loggers import Logger


def _number(value: Any) -> float | None:
    """A loggable scalar (bools as 0/1), or None for text, lists and non-finite values."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _markdown_block(text: str) -> str:
    """Text shown verbatim by TensorBoard's markdown renderer (indented code block)."""
    return "\n".join("    " + line for line in text.splitlines())


class TensorboardLogger(Logger):
    """TensorBoard event files under run_dir/tensorboard."""

    def __init__(self, run_dir: Path, config: dict[str, Any], append: bool = False,
                 resume_step: int | None = None, flush_secs: int = 30) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = run_dir / "tensorboard"
        purge = resume_step + 1 if append and resume_step is not None else None
        self.writer = SummaryWriter(str(self.log_dir), purge_step=purge, flush_secs=flush_secs)
        self.writer.add_text("config", _markdown_block(json.dumps(config, indent=2, default=str)),
                             global_step=resume_step or 0)
        self.last_step = resume_step or 0

    def log(self, kind: str, record: dict[str, Any]) -> None:
        step = int(record.get("step", record.get("epoch", self.last_step)))
        self.last_step = max(self.last_step, step)
        for key, value in record.items():
            number = _number(value)
            if number is not None and key != "step":
                self.writer.add_scalar(f"{kind}/{key}", number, global_step=step)

    def summary(self, record: dict[str, Any]) -> None:
        lines = ["| metric | value |", "|---|---|"]
        for key, value in record.items():
            number = _number(value)
            if number is not None:
                self.writer.add_scalar(f"final/{key}", number, global_step=self.last_step)
            lines.append(f"| {key} | {value} |")
        self.writer.add_text("final", "\n".join(lines), global_step=self.last_step)

    def figure(self, name: str, figure: Any, step: int | None = None) -> None:
        """A matplotlib figure or an image file (PNG, JPEG) as image `name`."""
        step = self.last_step if step is None else step
        if isinstance(figure, (str, Path)):
            from PIL import Image

            with Image.open(figure) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(name, pixels, global_step=step, dataformats="HWC")
        else:
            self.writer.add_figure(name, figure, global_step=step, close=False)

    def figures(self, folder: Path, pattern: str = "*.png") -> list[str]:
        """Every image in `folder` matching `pattern`, named by file stem; returns the names."""
        names = []
        for path in sorted(folder.glob(pattern)):
            self.figure(f"figures/{path.stem}", path)
            names.append(path.stem)
        return names

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
