# ruff: noqa: UP006, UP007, UP035, UP045
"""task=inverse: recover clean images from corrupted observations through a generator's latent.

Inpainting hides a square (mask_size x mask_size, centred) of every image; denoising adds
Gaussian noise of standard deviation sigma (on the [0, 1] pixel scale). The latent is found by
JIIO against the observation only (the visible pixels, or the noisy image); the metric is the
PSNR of the generated image against the clean one. Run it on a trained generator:
trainer.init_from=<its run> trainer.max_steps=0 evaluates without a training step (training on
this task would fit the generator to the observations, as a reconstruction task does). The end
of the run writes recovered.png: clean, observed and recovered test images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from deqrun.registry import register_task
from deqrun.tasks.base import LoaderOptions
from deqrun.tasks.generative import (
    GenerativeConfig,
    GenerativeTask,
    ImageObjective,
    image_objective,
    psnr_sum,
    save_bands,
    squared_error,
)

CORRUPTIONS = ("inpaint", "denoise")


@dataclass
class InverseConfig(GenerativeConfig):
    """task=inverse: the generative data options plus the corruption."""

    name: str = "inverse"
    corruption: str = "inpaint"
    mask_size: int = 20
    sigma: float = 0.2
    noise_seed: int = 0

    def check(self) -> None:
        super().check()
        if self.corruption not in CORRUPTIONS:
            raise ValueError(f"task.corruption must be one of {', '.join(CORRUPTIONS)}, "
                             f"got {self.corruption!r}")
        if self.mask_size < 1 or self.sigma < 0:
            raise ValueError("task.mask_size must be >= 1 and task.sigma >= 0")


def centre_mask(shape: tuple[int, ...], size: int) -> torch.Tensor:
    """1 x 1 x H x W mask: 0 on the centred size x size square (hidden), 1 elsewhere."""
    height, width = shape[-2:]
    mask = torch.ones(1, 1, height, width)
    top, left = max(0, (height - size) // 2), max(0, (width - size) // 2)
    mask[..., top:top + size, left:left + size] = 0
    return mask


def add_noise(images: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """images in [-1, 1] plus Gaussian noise of std sigma on the [0, 1] scale (2 sigma here)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator).to(images)
    return images + 2.0 * sigma * noise


class InverseTask(GenerativeTask):
    """Inpainting or denoising through JIIO latent inference; PSNR against the clean image."""

    name = "inverse"
    metric = "psnr"
    higher_is_better = True

    def __init__(self, options: InverseConfig) -> None:
        super().__init__(options)
        self.mask = centre_mask(self.train_images.shape, options.mask_size)
        self.train_observed = self.observe(self.train_images, options.noise_seed)
        self.test_observed = self.observe(self.test_images, options.noise_seed + 1)

    def observe(self, clean: torch.Tensor, seed: int) -> torch.Tensor:
        """The corrupted observations of clean images (fixed noise per image)."""
        if self.options.corruption == "denoise":
            return add_noise(clean, self.options.sigma, seed)
        return clean * self.mask.to(clean)

    def train_batches(self, epoch: int, options: LoaderOptions) -> DataLoader:
        generator = torch.Generator().manual_seed(options.seed * 100_003 + epoch)
        data = TensorDataset(self.train_images, self.train_observed)
        return DataLoader(data, batch_size=options.batch_size, shuffle=True, generator=generator)

    def eval_batches(self, split: str, options: LoaderOptions) -> DataLoader:
        if split != "test":
            raise KeyError(f"task {self.name} has no evaluation split {split!r}")
        data = TensorDataset(self.test_images, self.test_observed)
        return DataLoader(data, batch_size=options.batch_size)

    def objective(self, batch: Any) -> ImageObjective:
        """Squared error against the observation (visible pixels only, for inpainting), plus
        task.latent_weight * mean(x^2), the latent prior, when set."""
        observed = batch[1]
        mask = self.mask.to(observed) if self.options.corruption == "inpaint" else None
        return image_objective(observed, mask, self.options.latent_weight)

    def loss(self, output: Any, batch: Any) -> torch.Tensor:
        return self.objective(batch)(output.images, output.latent).mean()

    def metric_sums(self, output: Any, batch: Any) -> dict[str, float]:
        with torch.no_grad():
            errors = squared_error(output.images, self.target(batch))
        return {"sq_error": float(errors.sum()), "psnr_sum": psnr_sum(errors),
                "samples": float(len(errors))}

    def artifacts(self, model: torch.nn.Module, run_dir: Path, device: torch.device,
                  ) -> dict[str, Any]:
        """recovered.png: the first task.grid clean test images, their observations and the
        images recovered from them, in three bands; their mean PSNR. (No samples: the generator
        is not what this task judges.)"""
        model.eval()
        count = min(self.options.grid, len(self.test_images))
        clean = self.test_images[:count].to(device)
        observed = self.test_observed[:count].to(device)
        recovered = model(self.model_input((clean, observed)))[0].images.detach()
        save_bands([clean, observed.clamp(-1, 1), recovered], run_dir / "recovered.png")
        return {"recovered_png": "recovered.png",
                "artifact_recovered_psnr": psnr_sum(squared_error(recovered, clean)) / count}

    def reduce(self, sums: dict[str, float]) -> dict[str, float]:
        count = max(sums["samples"], 1.0)
        mse = sums["sq_error"] / count
        return {"loss": mse, "mse": mse, "psnr": sums["psnr_sum"] / count}


@register_task("inverse", schema=InverseConfig, kind="inverse", input_objective=True,
               description="inpainting / denoising through a trained generator (JIIO latents)")
def build_inverse_task(options: InverseConfig) -> InverseTask:
    return InverseTask(options)
