"""Tasks: data, batching, loss and metrics (deqrun.tasks.base.Task).

Every kind of task is one module here that registers its tasks (deqrun.registry.register_task);
importing this package registers them all.
"""

# ruff: noqa: I001  (the base modules first, then the families that register themselves)

from deqrun.tasks.base import DatasetTask, LoaderOptions, ModelSpec, Task
from deqrun.tasks.classification import ClassificationTask, build_classification_task

# The other kinds of task register themselves on import.
from deqrun.tasks import generative  # noqa: E402,F401  (task=generative)
from deqrun.tasks import adversarial  # noqa: E402,F401  (task=adversarial)
from deqrun.tasks import graph  # noqa: E402,F401  (task=tu, planetoid, ppi, chains)
from deqrun.tasks import inverse  # noqa: E402,F401  (task=inverse)
from deqrun.tasks import language  # noqa: E402,F401  (task=wikitext2, wikitext103)
from deqrun.tasks import signal  # noqa: E402,F401  (task=image_fit, audio_fit, ...)

__all__ = ["ClassificationTask", "DatasetTask", "LoaderOptions", "ModelSpec", "Task",
           "build_classification_task"]
