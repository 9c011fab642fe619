"""Tasks: data plus loss and metric."""

from deqrun.tasks.classification import ClassificationTask, build_classification_task

__all__ = ["ClassificationTask", "build_classification_task"]
from deqrun.tasks import generative as _generative  # noqa: F401  (registers task=generative)
from deqrun.tasks import inverse as _inverse  # noqa: F401  (registers task=inverse)
