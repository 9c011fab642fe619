# ruff: noqa: UP006, UP007, UP035, UP045
"""task=generative: a decoder trained by reconstruction, its latents inferred by JIIO.

Each batch of images becomes an InputProblem: find the latent x whose generated image is closest
(mean squared error per pixel, images in [-1, 1]) to the target, starting from x = 0. The model
solves it jointly with its equilibrium (grad=jiio) and the reconstruction loss trains the
decoder through the warm-started implicit backward. At the end of a run, a Gaussian fitted to
inferred training latents gives samples; reconstructions and samples are saved as PNG grids.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, TensorDataset
from torchvision.utils import save_image

from deqrun.core import InputProblem
from deqrun.data import paths
from deqrun.data.generative import build_images
from deqrun.registry import register_task
from deqrun.tasks.base import LoaderOptions, ModelSpec, Task
from deqrun.tasks.classification import ImageDataConfig

ImageObjective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class GenerativeConfig(ImageDataConfig):
    """task=generative: data (ImageDataConfig), latent size, and the end-of-run pictures."""

    name: str = "generative"
    dataset: str = "mnist"
    eval_subset: Optional[int] = None
    latent_dim: int = 128
    latent_weight: float = 0.0
    fit_latents: int = 512
    grid: int = 64

    def check(self) -> None:
        super().check()
        if self.dataset not in ("mnist", "cifar10", "celeba", "folder"):
            raise ValueError(f"task.dataset must be one of celeba, cifar10, folder, mnist; "
                             f"got {self.dataset!r}")
        if self.latent_dim < 1 or self.fit_latents < 2 or self.grid < 1:
            raise ValueError("task.latent_dim and task.grid must be >= 1, task.fit_latents >= 2")
        if self.latent_weight < 0 or (self.eval_subset is not None and self.eval_subset < 1):
            raise ValueError("task.latent_weight must be >= 0 and task.eval_subset >= 1")
        if self.image_size is not None and (self.image_size < 4 or self.image_size % 4):
            raise ValueError(f"task.image_size must be a multiple of 4, got {self.image_size}")


def data_root(options: Any) -> Path:
    """task.root, or ~/.cache/deqrun/data/<dataset>."""
    return paths.data_root(options.root, options.dataset)


def squared_error(images: torch.Tensor, target: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean squared error over the pixels (only where mask is 1, when given)."""
    error = (images - target) ** 2
    if mask is None:
        return error.flatten(1).mean(1)
    mask = mask.expand_as(error)
    return (error * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)


def image_objective(target: torch.Tensor, mask: torch.Tensor | None = None,
                    latent_weight: float = 0.0) -> ImageObjective:
    """objective(images, x): squared_error against target (where mask is 1), plus
    latent_weight * mean(x^2) per sample, a Gaussian prior on the latent (0: none)."""

    def objective(images: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        loss = squared_error(images, target, mask)
        return loss + latent_weight * (x**2).flatten(1).mean(1) if latent_weight else loss

    return objective


def psnr(mse: float) -> float:
    """PSNR in dB of a mean squared error on images in [-1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / mse) if mse > 0 else float("inf")


def psnr_sum(errors: torch.Tensor) -> float:
    """The sum of per-sample PSNRs of per-sample mean squared errors (divide by the count)."""
    return sum(psnr(float(e)) for e in errors)


def save_bands(bands: list[torch.Tensor], path: Path, count: int | None = None) -> None:
    """Images in [-1, 1] as one PNG grid, each band below the one before, sqrt(count) images a
    row (count: the first band's length unless given)."""
    count = len(bands[0]) if count is None else count
    save_image(torch.cat(bands).add(1).div(2), path, nrow=max(1, int(math.sqrt(count))))


class GenerativeTask(Task):
    """Reconstruction of images by a generator whose latents JIIO infers."""

    name = "generative"
    metric = "mse"
    higher_is_better = False

    def __init__(self, options: GenerativeConfig) -> None:
        super().__init__()
        options.check()
        self.options = options
        train, self.test_images = build_images(options.dataset, data_root(options),
                                               image_size=options.image_size,
                                               download=options.download, notes=self.notes)
        if options.subset is not None and options.subset < len(train):
            self.notes.append(f"training on the first {options.subset} of {len(train)} images")
            train = train[: options.subset]
        self.train_images = train
        if options.eval_subset is not None and options.eval_subset < len(self.test_images):
            self.notes.append(f"evaluating on the first {options.eval_subset} of "
                              f"{len(self.test_images)} test images")
            self.test_images = self.test_images[: options.eval_subset]

    def model_spec(self) -> ModelSpec:
        shape = tuple(self.train_images.shape[1:])
        return ModelSpec(kind="generative", in_shape=(self.options.latent_dim,),
                         out_features=shape[0],
                         extra={"image_shape": shape, "latent_dim": self.options.latent_dim})

    def train_batches(self, epoch: int, options: LoaderOptions) -> DataLoader:
        generator = torch.Generator().manual_seed(options.seed * 100_003 + epoch)
        return DataLoader(TensorDataset(self.train_images), batch_size=options.batch_size,
                          shuffle=True, generator=generator, pin_memory=options.pin_memory)

    def eval_batches(self, split: str, options: LoaderOptions) -> DataLoader:
        if split != "test":
            raise KeyError(f"task {self.name} has no evaluation split {split!r}")
        return DataLoader(TensorDataset(self.test_images), batch_size=options.batch_size,
                          pin_memory=options.pin_memory)

    def target(self, batch: Any) -> torch.Tensor:
        return batch[0]

    def objective(self, batch: Any) -> ImageObjective:
        """The per-sample objective of the batch's latent inference."""
        return image_objective(self.target(batch), latent_weight=self.options.latent_weight)

    def model_input(self, batch: Any) -> InputProblem:
        target = self.target(batch)
        x0 = target.new_zeros(len(target), self.options.latent_dim)
        return InputProblem(x0=x0, objective=self.objective(batch), loss_scale=1.0 / len(x0))

    def loss(self, output: Any, batch: Any) -> torch.Tensor:
        return squared_error(output.images, self.target(batch)).mean()

    def metric_sums(self, output: Any, batch: Any) -> dict[str, float]:
        with torch.no_grad():
            errors = squared_error(output.images, self.target(batch))
        return {"sq_error": float(errors.sum()), "samples": float(len(errors))}

    def reduce(self, sums: dict[str, float]) -> dict[str, float]:
        mse = sums["sq_error"] / max(sums["samples"], 1.0)
        return {"loss": mse, "mse": mse, "psnr": psnr(mse)}

    def artifacts(self, model: torch.nn.Module, run_dir: Path, device: torch.device,
                  ) -> dict[str, Any]:
        """recon.png (targets above reconstructions) and samples.png from a fitted Gaussian."""
        model.eval()
        count = min(self.options.grid, len(self.test_images))
        targets = self.test_images[:count].to(device)
        recon = model(self.model_input((targets,)))[0].images.detach()
        latents = self.infer_latents(model, device)
        samples = sample_latents(latents, self.options.grid)
        with torch.no_grad():
            generated = model(samples)[0].images
        save_bands([targets, recon], run_dir / "recon.png")
        save_bands([generated], run_dir / "samples.png", count)
        mse = float(squared_error(recon, targets).mean())
        return {"recon_png": "recon.png", "samples_png": "samples.png",
                "artifact_recon_mse": mse, "artifact_recon_psnr": psnr(mse),
                "fitted_latents": len(latents)}

    def infer_latents(self, model: torch.nn.Module, device: torch.device,
                      batch_size: int = 128) -> torch.Tensor:
        """JIIO latents of the first fit_latents training images."""
        images = self.train_images[: self.options.fit_latents]
        latents = [model(self.model_input((chunk.to(device),)))[0].latent.detach()
                   for chunk in images.split(batch_size)]
        return torch.cat(latents)


def sample_latents(latents: torch.Tensor, count: int, ridge: float = 1e-4,
                   seed: int = 0) -> torch.Tensor:
    """`count` draws from the Gaussian (mean, covariance + ridge I) fitted to `latents`."""
    data = latents.double()
    mean = data.mean(0)
    centred = data - mean
    cov = centred.T @ centred / max(len(data) - 1, 1)
    cov = cov + ridge * cov.diagonal().mean().clamp_min(1e-12) * torch.eye(
        len(mean), dtype=cov.dtype, device=cov.device)
    chol = torch.linalg.cholesky(cov)
    noise = torch.randn(count, len(mean), generator=torch.Generator().manual_seed(seed),
                        dtype=cov.dtype).to(cov.device)
    return (mean + noise @ chol.T).to(latents.dtype)


@register_task("generative", schema=GenerativeConfig, kind="generative", input_objective=True,
               description="image reconstruction by a generator with JIIO latent inference")
def build_generative_task(options: GenerativeConfig) -> GenerativeTask:
    return GenerativeTask(options)
