"""Tasks: data, batching, loss and metrics (deqrun.tasks.base.Task).

Every kind of task is one module here that registers its tasks (deqrun.registry.register_task);
importing this package registers them all.
"""

from deqrun.tasks import graph  # noqa: F401  (registers tu, planetoid, chains, ppi)
from deqrun.tasks.base import DatasetTask, LoaderOptions, ModelSpec, Task
from deqrun.tasks.classification import ClassificationTask, build_classification_task

__all__ = ["ClassificationTask", "DatasetTask", "LoaderOptions", "ModelSpec", "Task",
           "build_classification_task"]
