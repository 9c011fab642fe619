"""The generic runner: builders, the training loop, checkpoints, signals.

`run(config, resolved, run_dir)` trains any registered model on any registered task; it talks to
them only through deqrun.tasks.base.Task and deqrun.models.base.DEQModel.
"""

from deqrun.runner.loop import run

__all__ = ["run"]
