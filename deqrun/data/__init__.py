"""Data set builders."""

from deqrun.data.images import build_cifar10, build_digits, build_imagenet, build_mnist

__all__ = ["build_cifar10", "build_digits", "build_imagenet", "build_mnist"]
