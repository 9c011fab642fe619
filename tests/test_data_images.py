"""Tests of the image-classification data builders and task, on bundled and local real data."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from deqrun.data import images
from deqrun.data.images import build_cifar10, build_digits, build_imagenet, build_mnist
from deqrun.errors import ConfigError, DataNotFoundError, UserError
from deqrun.tasks import ClassificationTask, build_classification_task

SHARED = Path(__file__).resolve().parents[1].parent / "shared/data"
CIFAR_ROOT = SHARED / "cifar10-subset"
MNIST_ROOT = SHARED / "mnist"
IMAGENET_ROOT = SHARED / "imagenet-sample"
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

OPTIONS = dict(
    root=None,
    download=False,
    image_size=None,
    augment=False,
    subset=None,
    test_as_train=False,
    train_dir="train",
    val_dir="val",
)


def needs(path: Path) -> pytest.MarkDecorator:
    """Skip a test when a local data folder is absent."""
    return pytest.mark.skipif(not path.is_dir(), reason=f"local data {path} not available")


def stack(dataset, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All (or the first `count`) images and labels of a data set as two tensors."""
    items = [dataset[i] for i in range(len(dataset) if count is None else count)]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def test_errors_hierarchy() -> None:
    assert issubclass(ConfigError, UserError) and issubclass(DataNotFoundError, UserError)
    assert not issubclass(UserError, (ValueError, RuntimeError))


def test_digits_split_shapes_and_labels() -> None:
    train, test = build_digits()
    assert (len(train), len(test)) == (1437, 360)
    x, y = train[0]
    assert x.dtype == torch.float32 and x.shape == (1, 8, 8) and isinstance(y, int)
    train_x, train_y = stack(train)
    test_x, test_y = stack(test)
    all_counts = torch.bincount(torch.from_numpy(load_digits().target))
    assert torch.equal(torch.bincount(train_y) + torch.bincount(test_y), all_counts)
    assert ((torch.bincount(test_y) - 0.2 * all_counts).abs() <= 1).all()
    assert abs(train_x.mean().item()) < 1e-5 and abs(train_x.std().item() - 1) < 1e-4
    assert abs(test_x.mean().item()) < 0.1


def test_digits_images_are_affine_copies_of_sklearn() -> None:
    train, _ = build_digits()
    digits = load_digits()
    raw = torch.from_numpy(digits.images).float().flatten(1)
    raw = F.normalize(raw - raw.mean(dim=1, keepdim=True), dim=1)
    for index in (0, 500, 1436):
        x, y = train[index]
        x = F.normalize(x.flatten() - x.mean(), dim=0)
        best = int((raw @ x).argmax())
        assert (raw[best] @ x).item() > 0.9999 and int(digits.target[best]) == y


def test_digits_deterministic_and_independent_of_seed() -> None:
    torch.manual_seed(1)
    first = stack(build_digits()[0])
    torch.manual_seed(2)
    second = stack(build_digits()[0])
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_digits_upsampled() -> None:
    train, test = build_digits(image_size=16)
    train_x, _ = stack(train)
    assert train_x.shape == (1437, 1, 16, 16) and test[0][0].shape == (1, 16, 16)
    assert abs(train_x.mean().item()) < 1e-5 and abs(train_x.std().item() - 1) < 1e-4


def test_subset_keeps_first_samples() -> None:
    notes: list[str] = []
    full, _ = build_digits()
    small, _ = build_digits(subset=100, notes=notes)
    assert len(small) == 100 and torch.equal(small[99][0], full[99][0])
    assert notes and "100" in notes[0]
    with pytest.raises(ConfigError, match="task.subset"):
        build_digits(subset=0)
    with pytest.raises(ConfigError, match="task.image_size"):
        build_digits(image_size=-3)


def test_task_digits_loss_and_metrics() -> None:
    task = build_classification_task("digits", **OPTIONS)
    assert isinstance(task, ClassificationTask) and task.metric == "accuracy"
    assert task.higher_is_better and task.eval_splits == ("test",)
    assert (task.num_classes, task.in_channels, task.image_size) == (10, 1, 8)
    assert task.model_spec().in_shape == (1, 8, 8) and task.model_spec().out_features == 10
    assert task.notes == []
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0], [0.5, 0.0, 4.0], [1.0, 2.0, 0.0]])
    y = torch.tensor([0, 1, 0, 0])
    batch = (torch.zeros(4, 1, 8, 8), y)
    sums = task.metric_sums(logits, batch)
    assert sums["correct"] == 2 and sums["samples"] == 4
    assert torch.isclose(task.loss(logits, batch), F.cross_entropy(logits, y))
    reduced = task.reduce(sums)
    assert reduced["accuracy"] == 0.5
    assert abs(reduced["loss"] - float(F.cross_entropy(logits, y))) < 1e-6


def test_task_unknown_name() -> None:
    with pytest.raises(ConfigError, match="cifar10, digits, imagenet, mnist"):
        build_classification_task("svhn", **OPTIONS)


def test_task_default_root_is_user_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(DataNotFoundError, match=str(tmp_path / ".cache/deqrun/data/cifar10")):
        build_classification_task("cifar10", **OPTIONS)


@needs(CIFAR_ROOT)
def test_cifar10_local_subset() -> None:
    train, test = build_cifar10(CIFAR_ROOT)
    assert (len(train), len(test)) == (5000, 1000)
    assert train.classes[0] == "airplane" and len(train.classes) == 10
    assert torch.bincount(torch.tensor(train.targets)).tolist() == [500] * 10
    assert torch.bincount(torch.tensor(test.targets)).tolist() == [100] * 10
    x, y = stack(test)
    assert x.dtype == torch.float32 and x.shape == (1000, 3, 32, 32)
    assert torch.equal(y, torch.tensor(test.targets))
    assert (x.mean(dim=(0, 2, 3)).abs() < 0.1).all()
    assert ((x.std(dim=(0, 2, 3)) - 1).abs() < 0.1).all()


@needs(CIFAR_ROOT)
def test_cifar10_augment_only_on_train() -> None:
    torch.manual_seed(0)
    train, test = build_cifar10(CIFAR_ROOT, augment=True)
    draws = [train[3][0] for _ in range(8)]
    assert all(d.shape == (3, 32, 32) for d in draws)
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert torch.equal(test[3][0], test[3][0])


@needs(CIFAR_ROOT)
def test_task_cifar10() -> None:
    task = build_classification_task("cifar10", **{**OPTIONS, "root": str(CIFAR_ROOT)})
    assert (task.num_classes, task.in_channels, task.image_size) == (10, 3, 32)


def test_cifar10_unreadable(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in images._CIFAR10_FILES:
        (folder / name).write_bytes(b"not a pickle")
    with pytest.raises(DataNotFoundError, match="unreadable") as info:
        build_cifar10(tmp_path)
    assert "\n" not in str(info.value)


def test_cifar10_download_uses_torchvision(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    calls = []

    class FakeCIFAR10(images.datasets.CIFAR10):
        def __init__(self, root, train=True, transform=None, download=False):
            calls.append((root, train, download))
            self.classes, self.train = ["a", "b"], train

    monkeypatch.setattr(images.datasets, "CIFAR10", FakeCIFAR10)
    train, test = build_cifar10(tmp_path, download=True)
    assert calls == [(str(tmp_path), True, True), (str(tmp_path), False, False)]
    assert train.train and not test.train


@needs(MNIST_ROOT)
def test_mnist_test_only_copy_needs_test_as_train() -> None:
    with pytest.raises(DataNotFoundError, match="task.test_as_train=true") as info:
        build_mnist(MNIST_ROOT)
    assert "\n" not in str(info.value)


@needs(MNIST_ROOT)
def test_mnist_test_as_train() -> None:
    notes: list[str] = []
    train, test = build_mnist(MNIST_ROOT, test_as_train=True, notes=notes)
    assert (len(train), len(test)) == (8000, 2000)
    assert notes and "test split used as train split" in notes[0]
    train_x, train_y = stack(train)
    _, test_y = stack(test)
    assert train_x.dtype == torch.float32 and train_x.shape == (8000, 1, 28, 28)
    counts = torch.tensor(MNIST_TEST_COUNTS)
    assert torch.equal(torch.bincount(train_y) + torch.bincount(test_y), counts)
    assert ((torch.bincount(test_y) - 0.2 * counts).abs() <= 1).all()
    assert abs(train_x.mean().item()) < 0.05 and abs(train_x.std().item() - 1) < 0.05
    assert torch.isclose(train_x.min(), torch.tensor(-0.1307 / 0.3081))
    again, _ = build_mnist(MNIST_ROOT, test_as_train=True)
    assert torch.equal(stack(again, 50)[0], train_x[:50])


@needs(MNIST_ROOT)
def test_task_mnist_records_note() -> None:
    options = {**OPTIONS, "root": str(MNIST_ROOT), "test_as_train": True, "image_size": 16}
    task = build_classification_task("mnist", **options)
    assert (task.num_classes, task.in_channels, task.image_size) == (10, 1, 16)
    assert any("test split used as train split" in note for note in task.notes)


@needs(MNIST_ROOT)
def test_mnist_plain_and_gzip_idx_without_writing(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    source = MNIST_ROOT / "MNIST/raw"
    shutil.copy(source / "t10k-images-idx3-ubyte.gz", raw / "train-images-idx3-ubyte.gz")
    plain = [("train", "labels-idx1"), ("t10k", "images-idx3"), ("t10k", "labels-idx1")]
    for prefix, stem in plain:
        with gzip.open(source / f"t10k-{stem}-ubyte.gz") as src:
            (raw / f"{prefix}-{stem}-ubyte").write_bytes(src.read())
    before = sorted(tmp_path.rglob("*"))
    train, test = build_mnist(tmp_path)
    assert (len(train), len(test)) == (10000, 10000)
    assert torch.equal(train[123][0], test[123][0]) and train[123][1] == test[123][1]
    assert sorted(tmp_path.rglob("*")) == before


def test_mnist_corrupt_idx(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 20)
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(DataNotFoundError, match="t10k-images-idx3-ubyte"):
        build_mnist(tmp_path, test_as_train=True)


def test_mnist_download_uses_torchvision(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    calls = []

    class FakeMNIST:
        def __init__(self, root, train=True, download=False):
            calls.append((root, train, download))
            count = 6 if train else 4
            self.data = torch.full((count, 28, 28), 255, dtype=torch.uint8)
            self.targets = torch.arange(count)

    monkeypatch.setattr(images.datasets, "MNIST", FakeMNIST)
    train, test = build_mnist(tmp_path, download=True)
    assert [call[1:] for call in calls] == [(True, True), (False, True)]
    assert (len(train), len(test)) == (6, 4)
    assert torch.allclose(train[5][0], torch.full((1, 28, 28), (1 - 0.1307) / 0.3081))


def test_mnist_download_failure_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried mirror 1")

    monkeypatch.setattr(images.datasets, "MNIST", offline)
    with pytest.raises(DataNotFoundError, match="could not download MNIST") as info:
        build_mnist(tmp_path, download=True)
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


@needs(IMAGENET_ROOT)
def test_imagenet_sample() -> None:
    notes: list[str] = []
    train, test = build_imagenet(
        IMAGENET_ROOT, train_dir=".", val_dir=".", image_size=64, notes=notes
    )
    assert (len(train), len(test)) == (20, 20) and len(train.classes) == 20
    x, y = stack(test)
    assert x.dtype == torch.float32 and x.shape == (20, 3, 64, 64)
    assert sorted(y.tolist()) == list(range(20))
    assert x.mean().abs() < 0.5 and 0.7 < x.std() < 1.5
    assert notes and "not held-out" in notes[0]
    augmented, _ = build_imagenet(
        IMAGENET_ROOT, train_dir=".", val_dir=".", image_size=64, augment=True
    )
    assert augmented[0][0].shape == (3, 64, 64)


@needs(IMAGENET_ROOT)
def test_task_imagenet() -> None:
    options = {**OPTIONS, "root": str(IMAGENET_ROOT), "train_dir": ".", "val_dir": "."}
    task = build_classification_task("imagenet", **{**options, "image_size": 64})
    assert (task.num_classes, task.in_channels, task.image_size) == (20, 3, 64)
    with pytest.raises(DataNotFoundError, match="task.val_dir"):
        build_classification_task("imagenet", **{**options, "val_dir": "val"})


@pytest.mark.parametrize("name", ["mnist", "cifar10", "imagenet"])
def test_missing_root(name: str, tmp_path: Path) -> None:
    root = tmp_path / "nonexistent"
    with pytest.raises(DataNotFoundError) as info:
        build_classification_task(name, **{**OPTIONS, "root": str(root)})
    message = str(info.value)
    assert str(root) in message and "task.root" in message and "\n" not in message
    assert not root.exists()
