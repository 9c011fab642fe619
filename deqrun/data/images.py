"""Image-classification data sets: scikit-learn digits, MNIST, CIFAR-10 and ImageNet.

Every builder returns ``(train_set, test_set)``; both yield ``(image, label)`` with a float32
C x H x W image tensor and an int label. Builders never write into a local data root: only an
explicit download writes (into the root, as torchvision does). When a ``notes`` list is given, a
builder appends one-line remarks worth logging (e.g. that the test split stands in for training).
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision import datasets
from torchvision.transforms import v2

from deqrun.errors import ConfigError, DataNotFoundError

PathLike = str | os.PathLike[str]
Transform = Callable[[torch.Tensor], torch.Tensor]

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SPLIT_SEED = 0
TEST_FRACTION = 0.2
IMAGENET_URL = "https://image-net.org/download-images.php"

_DIGIT_CLASSES = [str(digit) for digit in range(10)]
_CIFAR10_FILES = [
    *(name for name, _ in datasets.CIFAR10.train_list + datasets.CIFAR10.test_list),
    datasets.CIFAR10.meta["filename"],
]


class _TensorImages(TensorDataset):
    """Images and labels held in memory; an optional transform runs on each image as it is read."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        classes: Sequence[str],
        transform: Transform | None = None,
    ) -> None:
        super().__init__(images, labels.long())
        self.classes = list(classes)
        self.transform = transform

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.tensors[0][index], self.tensors[1][index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(label)


class _LocalCIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR-10 reading local batch files without md5 checks (subsets fail them)."""

    train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


def _note(notes: list[str] | None, text: str) -> None:
    """Append `text` to `notes` when the caller asked for notes."""
    if notes is not None:
        notes.append(text)


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _positive_int(value: object, option: str) -> int:
    """Return `value` if it is a positive int, else raise a ConfigError naming `option`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{option} must be a positive integer, got {value!r}")
    return value


def _image_size(image_size: int | None, native: int) -> int:
    """The requested image size, or the data set's native size when None."""
    return native if image_size is None else _positive_int(image_size, "task.image_size")


def _take_first(train_set: Dataset, subset: int | None, notes: list[str] | None) -> Dataset:
    """Keep only the first `subset` training samples; None keeps them all."""
    if subset is None:
        return train_set
    total = len(train_set)
    count = min(_positive_int(subset, "task.subset"), total)
    _note(notes, f"training on the first {count} of {total} training samples (task.subset)")
    return Subset(train_set, range(count))


def _stratified_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Train/test indices of a stratified split with a fixed seed, independent of the run seed."""
    index = np.arange(len(labels))
    train, test = train_test_split(
        index, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels
    )
    return train, test


def _to_float(steps: Sequence[Callable], mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """`steps` on a uint8 image, then scaling to [0, 1] and normalisation with `mean` and `std`."""
    return v2.Compose(
        [
            v2.ToImage(),
            *steps,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
            v2.ToPureTensor(),
        ]
    )


def _resize(size: int, native: int) -> list[Callable]:
    """A resize to size x size, or nothing when `size` is the native size."""
    return [] if size == native else [v2.Resize((size, size), antialias=True)]


def build_digits(
    *, image_size: int | None = None, subset: int | None = None, notes: list[str] | None = None
) -> tuple[Dataset, Dataset]:
    """scikit-learn's 8x8 digits, split 80/20 (stratified, seed 0), standardised by train stats."""
    size = _image_size(image_size, 8)
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1)
    if size != 8:
        images = F.interpolate(
            images, size=(size, size), mode="bilinear", align_corners=False, antialias=size < 8
        )
    labels = torch.from_numpy(digits.target)
    train_idx, test_idx = (torch.from_numpy(idx) for idx in _stratified_split(digits.target))
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    train_set = _TensorImages(images[train_idx], labels[train_idx], _DIGIT_CLASSES)
    test_set = _TensorImages(images[test_idx], labels[test_idx], _DIGIT_CLASSES)
    return _take_first(train_set, subset, notes), test_set


def _read_idx(path: Path) -> torch.Tensor:
    """Read an idx file of unsigned bytes, plain or gzip-compressed, into a uint8 tensor."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:
        raise DataNotFoundError(f"cannot read MNIST file {path}: {_first_line(exc)}") from exc
    ndim = data[3] if len(data) >= 4 else 0
    header = 4 + 4 * ndim
    if ndim == 0 or data[:3] != b"\x00\x00\x08" or len(data) < header:
        raise DataNotFoundError(f"MNIST file {path} is not an idx file of unsigned bytes")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) != header + math.prod(shape):
        raise DataNotFoundError(f"MNIST file {path} is truncated or corrupt (shape {shape})")
    return torch.from_numpy(np.frombuffer(data, np.uint8, offset=header).reshape(shape).copy())


def _read_mnist_split(raw: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Images (N x 28 x 28) and labels of one split ("train" or "t10k"), or None if absent."""
    paths = []
    for stem in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        found = [path for path in (raw / stem, raw / f"{stem}.gz") if path.is_file()]
        if not found:
            return None
        paths.append(found[0])
    images, labels = _read_idx(paths[0]), _read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataNotFoundError(
            f"MNIST files {paths[0]} and {paths[1]} do not match: shapes "
            f"{tuple(images.shape)} and {tuple(labels.shape)}"
        )
    return images, labels


def _download_mnist(root: Path) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Both MNIST splits fetched by torchvision's downloader into root/MNIST/raw."""
    try:
        train = datasets.MNIST(str(root), train=True, download=True)
        test = datasets.MNIST(str(root), train=False, download=True)
    except (OSError, RuntimeError) as exc:
        raise DataNotFoundError(
            f"could not download MNIST into {root}: {_first_line(exc)}; check the internet "
            "connection or pass a writable task.root=DIR"
        ) from exc
    return (train.data, train.targets), (test.data, test.targets)


def _split_test_as_train(
    test: tuple[torch.Tensor, torch.Tensor],
) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Split the MNIST test set 80/20 (stratified, seed 0) into stand-in train and test splits."""
    images, labels = test
    train_idx, test_idx = (torch.from_numpy(idx) for idx in _stratified_split(labels.numpy()))
    return (images[train_idx], labels[train_idx]), (images[test_idx], labels[test_idx])


def _mnist_splits(
    root: Path, download: bool, test_as_train: bool, notes: list[str] | None
) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Train and test (images, labels): local idx files, else a download, else the test split."""
    raw = root / "MNIST" / "raw"
    train, test = _read_mnist_split(raw, "train"), _read_mnist_split(raw, "t10k")
    if train is not None and test is not None:
        return train, test
    if download:
        return _download_mnist(root)
    if test is not None and test_as_train:
        _note(notes, f"MNIST test split used as train split (80/20 stratified split of {raw})")
        return _split_test_as_train(test)
    if test is not None:
        raise DataNotFoundError(
            f"MNIST training split missing under {raw} (found only t10k-*): pass "
            "task.test_as_train=true to split the test set 80/20 into train/test, "
            "task.download=true to download the full set, or task.root=DIR with a full copy"
        )
    raise DataNotFoundError(
        f"MNIST not found under {root} (expected MNIST/raw/{{train,t10k}}-{{images-idx3,"
        "labels-idx1}-ubyte[.gz]): pass task.root=DIR with a local copy or task.download=true "
        "to download it"
    )


def build_mnist(
    root: PathLike,
    *,
    download: bool = False,
    image_size: int | None = None,
    subset: int | None = None,
    test_as_train: bool = False,
    notes: list[str] | None = None,
    normalize: bool = True,
) -> tuple[Dataset, Dataset]:
    """MNIST from idx files (plain or gzip) under root/MNIST/raw, or torchvision's download;
    normalize=False keeps pixels in [0, 1] (attacks measure their ball in pixels)."""
    size = _image_size(image_size, 28)
    train, test = _mnist_splits(Path(root), download, test_as_train, notes)
    mean, std = (MNIST_MEAN, MNIST_STD) if normalize else ((0.0,), (1.0,))
    transform = _to_float(_resize(size, 28), mean, std)
    train_set = _TensorImages(train[0].unsqueeze(1), train[1], _DIGIT_CLASSES, transform)
    test_set = _TensorImages(test[0].unsqueeze(1), test[1], _DIGIT_CLASSES, transform)
    return _take_first(train_set, subset, notes), test_set


def _cifar10_splits(
    root: Path, download: bool, train_transform: Transform, test_transform: Transform
) -> tuple[datasets.CIFAR10, datasets.CIFAR10]:
    """Local batch files without md5 checks if all present, else torchvision's checked download."""
    folder = root / datasets.CIFAR10.base_folder
    present = all((folder / name).is_file() for name in _CIFAR10_FILES)
    if not present and not download:
        raise DataNotFoundError(
            f"CIFAR-10 not found under {root} (expected {folder.name}/data_batch_1..5, test_batch, "
            "batches.meta): pass task.root=DIR with a local copy or task.download=true to "
            "download it"
        )
    cifar = _LocalCIFAR10 if present else datasets.CIFAR10
    try:
        train = cifar(str(root), train=True, transform=train_transform, download=not present)
        test = cifar(str(root), train=False, transform=test_transform)
    except (OSError, RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as exc:
        if not present:
            raise DataNotFoundError(
                f"could not download CIFAR-10 into {root}: {_first_line(exc)}; check the "
                "internet connection or pass a writable task.root=DIR"
            ) from exc
        raise DataNotFoundError(
            f"CIFAR-10 files under {folder} are unreadable ({_first_line(exc)}): replace them "
            "or pass task.root=DIR with a good copy"
        ) from exc
    return train, test


def build_cifar10(
    root: PathLike,
    *,
    download: bool = False,
    image_size: int | None = None,
    augment: bool = False,
    subset: int | None = None,
    notes: list[str] | None = None,
    normalize: bool = True,
) -> tuple[Dataset, Dataset]:
    """CIFAR-10 from root/cifar-10-batches-py; augment = random crop (pad 4) + flip on train;
    normalize=False keeps pixels in [0, 1]."""
    size = _image_size(image_size, 32)
    flips = [v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip()] if augment else []
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if normalize else ((0.0,) * 3, (1.0,) * 3)
    train_transform = _to_float(_resize(size, 32) + flips, mean, std)
    test_transform = _to_float(_resize(size, 32), mean, std)
    train_set, test_set = _cifar10_splits(Path(root), download, train_transform, test_transform)
    return _take_first(train_set, subset, notes), test_set


def _image_folder(path: Path, transform: Transform, missing: str) -> datasets.ImageFolder:
    """An ImageFolder at `path`, raising DataNotFoundError(`missing`) if it is absent or empty."""
    if not path.is_dir():
        raise DataNotFoundError(missing)
    try:
        return datasets.ImageFolder(str(path), transform=transform)
    except (OSError, RuntimeError) as exc:
        raise DataNotFoundError(f"{missing} ({path}: {_first_line(exc)})") from exc


def _imagenet_missing(root: Path, train_dir: str, val_dir: str) -> str:
    """The one-line message for an ImageNet copy that is absent or incomplete."""
    return (
        f"ImageNet not found under {root} (expected ImageFolder directories {train_dir}/ and "
        f"{val_dir}/ of <wnid>/<image>.JPEG): pass task.root=DIR and task.train_dir/task.val_dir "
        "('.' = the root itself); it cannot be downloaded automatically, get it from "
        f"{IMAGENET_URL}"
    )


def build_imagenet(
    root: PathLike,
    *,
    image_size: int | None = None,
    augment: bool = False,
    subset: int | None = None,
    train_dir: str = "train",
    val_dir: str = "val",
    notes: list[str] | None = None,
) -> tuple[Dataset, Dataset]:
    """ImageNet as ImageFolders root/train_dir and root/val_dir ("." = root); never downloaded."""
    size = _image_size(image_size, 224)
    root = Path(root)
    train_path, val_path = root / train_dir, root / val_dir
    missing = _imagenet_missing(root, train_dir, val_dir)
    evaluation = [v2.Resize(size * 256 // 224, antialias=True), v2.CenterCrop(size)]
    crops = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    train_transform = _to_float(crops if augment else evaluation, IMAGENET_MEAN, IMAGENET_STD)
    train_set = _image_folder(train_path, train_transform, missing)
    test_set = _image_folder(val_path, _to_float(evaluation, IMAGENET_MEAN, IMAGENET_STD), missing)
    if train_set.classes != test_set.classes:
        raise DataNotFoundError(
            f"ImageNet class folders differ between {train_path} ({len(train_set.classes)}) "
            f"and {val_path} ({len(test_set.classes)}): both must hold the same <wnid>/ folders"
        )
    if train_path.resolve() == val_path.resolve():
        _note(notes, f"train and test sets are both {val_path}: test accuracy is not held-out")
    return _take_first(train_set, subset, notes), test_set
