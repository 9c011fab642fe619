"""Image sets for generative modelling: MNIST, CIFAR-10, CelebA faces, any folder of images.

Every builder returns (train, test) image tensors, N x C x H x W float32 in [-1, 1] (labels are not
needed). Nothing is written into a local data root; only an explicit download writes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from deqrun.data.images import _cifar10_splits, _mnist_splits, _stratified_split
from deqrun.errors import ConfigError, DataNotFoundError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CELEBA_CROP = 140  # the customary centre crop of the 178 x 218 aligned faces
TEST_FRACTION = 0.2

Splits = tuple[torch.Tensor, torch.Tensor]


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x C x H x W -> float32 in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def resize(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Square resize (antialiased bilinear) of float images; None keeps the size."""
    if size is None or images.shape[-1] == size == images.shape[-2]:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False).clamp(-1, 1)


def mnist_images(root: Path, download: bool, notes: list[str]) -> Splits:
    """MNIST digits (1 x 28 x 28); without the train files, the test set split 80/20."""
    train, test = _mnist_splits(root, download, True, notes)
    return to_unit_range(train[0].unsqueeze(1)), to_unit_range(test[0].unsqueeze(1))


def cifar10_images(root: Path, download: bool, notes: list[str]) -> Splits:
    """CIFAR-10 (3 x 32 x 32) from the python batch files."""
    train, test = _cifar10_splits(root, download, None, None)
    as_tensor = [torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous() for s in (train, test)]
    return to_unit_range(as_tensor[0]), to_unit_range(as_tensor[1])


def _read_image(path: Path, crop: int | None) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if crop is not None:
                left, top = (image.width - crop) // 2, (image.height - crop) // 2
                image = image.crop((left, top, left + crop, top + crop))
            data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
            return data.view(image.height, image.width, 3).permute(2, 0, 1)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataNotFoundError(f"cannot read image {path}: {exc}") from exc


def folder_images(folder: Path, size: int, crop: int | None = None) -> torch.Tensor:
    """Every image under `folder` (sorted, recursive), centre-cropped then resized to size."""
    if not folder.is_dir():
        raise DataNotFoundError(f"image folder {folder} not found: pass task.root=DIR")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(paths) < 2:
        raise DataNotFoundError(f"image folder {folder} holds {len(paths)} images; need >= 2")
    images = []
    for path in paths:
        image = _read_image(path, crop)
        if crop is None:
            side = min(image.shape[-2:])
            top, left = (image.shape[-2] - side) // 2, (image.shape[-1] - side) // 2
            image = image[:, top:top + side, left:left + side]
        images.append(resize(to_unit_range(image.unsqueeze(0)), size))
    return torch.cat(images)


def split_80_20(images: torch.Tensor) -> Splits:
    """A fixed 80/20 train/test split (seeded, independent of the run's seed)."""
    train, test = _stratified_split(torch.zeros(len(images), dtype=torch.long).numpy())
    return images[torch.from_numpy(train)], images[torch.from_numpy(test)]


def celeba_images(root: Path, size: int) -> Splits:
    """CelebA aligned faces from root/img_align_celeba (or root itself), 140 crop, 80/20."""
    folder = root / "img_align_celeba" if (root / "img_align_celeba").is_dir() else root
    return split_80_20(folder_images(folder, size, crop=CELEBA_CROP))


def build_images(dataset: str, root: Path, *, image_size: int | None, download: bool,
                 notes: list[str]) -> Splits:
    """(train, test) images of `dataset` (mnist, cifar10, celeba, folder) resized to image_size."""
    if dataset == "mnist":
        train, test = mnist_images(root, download, notes)
    elif dataset == "cifar10":
        train, test = cifar10_images(root, download, notes)
    elif dataset == "celeba":
        return celeba_images(root, image_size or 64)
    elif dataset == "folder":
        return split_80_20(folder_images(root, image_size or 64))
    else:
        raise ConfigError(f"unknown generative dataset {dataset!r}; valid: celeba, cifar10, "
                          "folder, mnist")
    return resize(train, image_size), resize(test, image_size)
