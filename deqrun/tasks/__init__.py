"""Tasks: data plus loss and metric."""

from deqrun.tasks.classification import ClassificationTask, build_classification_task

__all__ = ["ClassificationTask", "build_classification_task"]

from deqrun.tasks import signal  # noqa: E402, F401  (registers the signal-fitting tasks)
