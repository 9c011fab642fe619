"""Image classification: a train/test data set pair with cross-entropy loss and accuracy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from deqrun.data.images import build_cifar10, build_digits, build_imagenet, build_mnist
from deqrun.data.paths import data_root
from deqrun.errors import ConfigError
from deqrun.registry import register_task
from deqrun.tasks.base import DatasetTask, ModelSpec

# The config schema uses typing.Optional: OmegaConf reads these annotations at run time.
# ruff: noqa: UP045



@dataclass
class ImageDataConfig:
    """Where an image task's data come from, shared by the image tasks (classification,
    adversarial, generative): root None means ~/.cache/deqrun/data/<data set>; download fetches a
    missing public set; image_size resizes; subset keeps the first N training images."""

    name: str = "images"
    root: Optional[str] = None
    download: bool = False
    image_size: Optional[int] = None
    subset: Optional[int] = None

    def check(self) -> None:
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"task.image_size must be >= 1, got {self.image_size}")
        if self.subset is not None and self.subset < 1:
            raise ValueError(f"task.subset must be >= 1, got {self.subset}")


@dataclass
class ImageTaskConfig(ImageDataConfig):
    """Image-classification options: the data (ImageDataConfig) and how they are used."""

    name: str = "digits"
    augment: bool = False
    test_as_train: bool = False
    train_dir: str = "train"
    val_dir: str = "val"


class ClassificationTask(DatasetTask):
    """An image-classification problem: (x, y) batches, cross-entropy, accuracy."""

    metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True

    def __init__(self, name: str, train_set: Dataset, test_set: Dataset,
                 notes: list[str] | None = None) -> None:
        super().__init__(train_set, test_set)
        self.name = name
        self.notes = list(notes or [])
        image, _ = train_set[0]
        self.in_channels, self.image_size = image.shape[0], image.shape[-1]
        self.num_classes = _num_classes(train_set)

    def model_spec(self) -> ModelSpec:
        return ModelSpec(kind="image_classification", in_shape=(self.in_channels,
                         self.image_size, self.image_size), out_features=self.num_classes)

    def model_input(self, batch: Any) -> torch.Tensor:
        return batch[0]

    def loss(self, logits: torch.Tensor, batch: Any) -> torch.Tensor:
        """Mean cross-entropy of logits (N x num_classes) against integer labels (N)."""
        return F.cross_entropy(logits, batch[1])

    def metric_sums(self, logits: torch.Tensor, batch: Any) -> dict[str, float]:
        y = batch[1]
        return {"loss": float(F.cross_entropy(logits, y, reduction="sum")),
                "correct": float((logits.argmax(dim=-1) == y).sum()), "samples": float(len(y))}

    def reduce(self, sums: dict[str, float]) -> dict[str, float]:
        samples = max(sums.get("samples", 0.0), 1.0)
        return {"loss": sums["loss"] / samples, "accuracy": sums["correct"] / samples}


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
    return data_root(None, name)


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
        root=data_root(root, name),
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
    return ClassificationTask(name, train_set, test_set, notes)


DESCRIPTIONS = {"digits": "scikit-learn's 8x8 digits (bundled, offline)",
                "mnist": "MNIST through torchvision", "cifar10": "CIFAR-10 through torchvision",
                "imagenet": "ImageNet ImageFolders"}


def _register(name: str) -> None:
    schema = make_dataclass(f"{name.capitalize()}TaskConfig", [("name", str, field(default=name))],
                            bases=(ImageTaskConfig,))

    def build(options: ImageTaskConfig) -> ClassificationTask:
        return build_classification_task(
            options.name, root=options.root, download=options.download,
            image_size=options.image_size, augment=options.augment, subset=options.subset,
            test_as_train=options.test_as_train, train_dir=options.train_dir,
            val_dir=options.val_dir)

    register_task(name, schema=schema, kind="image_classification",
                  description=DESCRIPTIONS[name])(build)


for _name in _BUILDERS:
    _register(_name)
