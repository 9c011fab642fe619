"""Tasks: data, batching, loss and metrics (deqrun.tasks.base.Task).

Every kind of task is one module here that registers its tasks (deqrun.registry.register_task);
importing this package registers them all.
"""

from deqrun.tasks import generative as _generative  # noqa: F401  (registers task=generative)
from deqrun.tasks import inverse as _inverse  # noqa: F401  (registers task=inverse)
from deqrun.tasks.base import DatasetTask, LoaderOptions, ModelSpec, Task
from deqrun.tasks.classification import ClassificationTask, build_classification_task

__all__ = ["ClassificationTask", "DatasetTask", "LoaderOptions", "ModelSpec", "Task",
           "build_classification_task"]

from deqrun.tasks import (
    language,  # noqa: E402,F401  (registers task=wikitext2, wikitext103)
    signal,  # noqa: E402, F401  (registers the signal-fitting tasks)
)
