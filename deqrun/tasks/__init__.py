"""Tasks: data, batching, loss and metrics (deqrun.tasks.base.Task).

Every kind of task is one module here that registers its tasks (deqrun.registry.register_task);
importing this package registers them all.
"""

from deqrun.tasks.base import DatasetTask, LoaderOptions, ModelSpec, Task
from deqrun.tasks.classification import ClassificationTask, build_classification_task

__all__ = ["ClassificationTask", "DatasetTask", "LoaderOptions", "ModelSpec", "Task",
           "build_classification_task"]

from deqrun.tasks import signal  # noqa: E402, F401  (registers the signal-fitting tasks)
