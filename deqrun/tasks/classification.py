"""Image classification: a train/test data set pair with cross-entropy loss and accuracy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from deqrun.data.images import build_cifar10, build_digits, build_imagenet, build_mnist
from deqrun.errors import ConfigError

DEFAULT_DATA_ROOT = "~/.cache/deqrun/data"


@dataclass
class ClassificationTask:
    """An image-classification problem: its data, input shape, loss and metric."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    train_set: Dataset
    test_set: Dataset
    notes: list[str] = field(default_factory=list)
    metric_name: ClassVar[str] = "accuracy"

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of logits (N x num_classes) against integer labels (N)."""
        return F.cross_entropy(logits, y)

    def correct(self, logits: torch.Tensor, y: torch.Tensor) -> int:
        """Number of samples whose highest logit is at the label, to sum over an epoch."""
        return int((logits.argmax(dim=-1) == y).sum().item())


@dataclass(frozen=True)
class _Options:
    """The data options of a task, as given by the user (root already resolved)."""

    root: Path
    download: bool
    image_size: int | None
    augment: bool
    subset: int | None
    test_as_train: bool
    train_dir: str
    val_dir: str


Splits = tuple[Dataset, Dataset]


def _digits(o: _Options, notes: list[str]) -> Splits:
    """scikit-learn digits (bundled: root and download are unused)."""
    return build_digits(image_size=o.image_size, subset=o.subset, notes=notes)


def _mnist(o: _Options, notes: list[str]) -> Splits:
    """MNIST under o.root."""
    return build_mnist(
        o.root,
        download=o.download,
        image_size=o.image_size,
        subset=o.subset,
        test_as_train=o.test_as_train,
        notes=notes,
    )


def _cifar10(o: _Options, notes: list[str]) -> Splits:
    """CIFAR-10 under o.root."""
    return build_cifar10(
        o.root,
        download=o.download,
        image_size=o.image_size,
        augment=o.augment,
        subset=o.subset,
        notes=notes,
    )


def _imagenet(o: _Options, notes: list[str]) -> Splits:
    """ImageNet ImageFolders under o.root (no download exists)."""
    return build_imagenet(
        o.root,
        image_size=o.image_size,
        augment=o.augment,
        subset=o.subset,
        train_dir=o.train_dir,
        val_dir=o.val_dir,
        notes=notes,
    )


_BUILDERS: dict[str, Callable[[_Options, list[str]], Splits]] = {
    "digits": _digits,
    "mnist": _mnist,
    "cifar10": _cifar10,
    "imagenet": _imagenet,
}


def default_root(name: str) -> Path:
    """Where a data set lives when task.root is not given: ~/.cache/deqrun/data/<name>."""
    return Path(DEFAULT_DATA_ROOT, name).expanduser()


def _num_classes(dataset: Dataset) -> int:
    """Number of classes of a data set, looking through Subset wrappers."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return len(dataset.classes)


def build_classification_task(
    name: str,
    *,
    root: str | Path | None,
    download: bool,
    image_size: int | None,
    augment: bool,
    subset: int | None,
    test_as_train: bool,
    train_dir: str,
    val_dir: str,
) -> ClassificationTask:
    """Build the named task (digits, mnist, cifar10, imagenet) from its data options."""
    builder = _BUILDERS.get(name)
    if builder is None:
        choices = ", ".join(sorted(_BUILDERS))
        raise ConfigError(f"unknown image-classification task {name!r}: choose one of {choices}")
    options = _Options(
        root=default_root(name) if root is None else Path(root).expanduser(),
        download=download,
        image_size=image_size,
        augment=augment,
        subset=subset,
        test_as_train=test_as_train,
        train_dir=train_dir,
        val_dir=val_dir,
    )
    notes: list[str] = []
    train_set, test_set = builder(options, notes)
    image, _ = train_set[0]
    return ClassificationTask(
        name=name,
        num_classes=_num_classes(train_set),
        in_channels=image.shape[0],
        image_size=image.shape[-1],
        train_set=train_set,
        test_set=test_set,
        notes=notes,
    )
