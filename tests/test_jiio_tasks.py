"""The JIIO generator, task=generative and task=inverse on small real images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA

from deqrun.core import DEQ, JIIO
from deqrun.data.generative import build_images
from deqrun.errors import ConfigError, DataNotFoundError
from deqrun.models.generator import GeneratorConfig, MDEQGenerator, build_generator
from deqrun.registry import input_objective_tasks, serves
from deqrun.tasks.base import LoaderOptions
from deqrun.tasks.generative import GenerativeConfig, GenerativeTask, sample_latents
from deqrun.tasks.inverse import InverseConfig, InverseTask, add_noise, centre_mask

TINY = GeneratorConfig(branch_channels=[8, 8], expansion=1, head_channels=4)
LATENT = 16


def generator(task: GenerativeTask, **changes) -> MDEQGenerator:
    """A tiny generator with a DEQ and a JIIO input optimiser (what grad=jiio gives)."""
    deq = DEQ(solver="anderson", grad="implicit", f_max_iter=6, f_tol=1e-4, b_max_iter=6)
    model = build_generator(TINY, deq, task.model_spec())
    settings = dict(T=4, m=4, alpha0=[1.0, 1.0], b_max_iter=6, b_tol=1e-8)
    settings.update(changes)
    model.input_optimiser = JIIO(**settings)
    return model


@pytest.fixture(scope="module")
def task() -> GenerativeTask:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return GenerativeTask(GenerativeConfig(root=str(SHARED_DATA / "mnist"), image_size=16,
                                            subset=64, latent_dim=LATENT, fit_latents=16,
                                            grid=4))


def test_registered_with_an_input_objective() -> None:
    assert {"generative", "inverse"} <= set(input_objective_tasks())
    assert serves("mdeq_generator", "generative") and serves("mdeq_generator", "inverse")


def test_generative_task_data_and_spec(task: GenerativeTask) -> None:
    assert task.train_images.shape == (64, 1, 16, 16)
    assert task.test_images.shape == (2000, 1, 16, 16)
    assert task.train_images.min() >= -1 and task.train_images.max() <= 1
    spec = task.model_spec()
    assert spec.get("image_shape") == (1, 16, 16) and spec.get("latent_dim") == LATENT
    assert any("80/20" in note for note in task.notes)


def test_generative_eval_subset_keeps_the_first_test_images(task: GenerativeTask) -> None:
    small = GenerativeTask(GenerativeConfig(root=task.options.root, image_size=16, subset=64,
                                            eval_subset=100, latent_dim=LATENT))
    assert torch.equal(small.test_images, task.test_images[:100])
    assert sum(len(b[0]) for b in small.eval_batches("test", LoaderOptions(batch_size=32))) == 100
    with pytest.raises(ValueError, match="eval_subset"):
        GenerativeConfig(eval_subset=0).check()


def batch_of(task: GenerativeTask, size: int = 8) -> tuple[torch.Tensor, ...]:
    return next(iter(task.train_batches(0, LoaderOptions(batch_size=size))))


def test_forward_with_an_input_problem(task: GenerativeTask) -> None:
    torch.manual_seed(0)
    model = generator(task)
    batch = batch_of(task)
    output, stats = model.train()(task.model_input(batch))
    loss = task.loss(output, batch)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # stats.forward: the re-solve at x* (grad.resolve) by the DEQ (f_max_iter 6), after JIIO (T=4)
    assert stats.backward is not None and 1 <= stats.forward.n_f_evals <= 6
    with torch.no_grad():
        output, _ = model.eval()(task.model_input(batch))
        decoded, _ = model(output.latent)
    torch.testing.assert_close(output.images, decoded.images)
    sums = task.metric_sums(output, batch)
    assert task.reduce(sums)["mse"] == pytest.approx(sums["sq_error"] / 8)


def test_the_jacobian_penalty_reaches_the_jiio_training_path(task: GenerativeTask) -> None:
    torch.manual_seed(0)
    model = generator(task).train()
    batch = batch_of(task)
    assert model(task.model_input(batch))[1].jac_loss is None
    model.deq.jac_reg = True  # what the runner's penalty switch does on a penalised step
    output, stats = model(task.model_input(batch))
    assert stats.jac_loss is not None and float(stats.jac_loss.detach()) > 0
    (task.loss(output, batch) + stats.jac_loss).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.implicit_parameters())


def test_generator_needs_grad_jiio_for_inference(task: GenerativeTask) -> None:
    model = generator(task)
    model.input_optimiser = None
    with pytest.raises(ConfigError, match="grad=jiio"):
        model(task.model_input(batch_of(task)))


def test_artifacts_write_png_grids(task: GenerativeTask, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = generator(task, T=2)
    metrics = task.artifacts(model, tmp_path, torch.device("cpu"))
    assert (tmp_path / "recon.png").stat().st_size > 0
    assert (tmp_path / "samples.png").stat().st_size > 0
    assert metrics["fitted_latents"] == 16 and metrics["artifact_recon_mse"] > 0


def test_sample_latents_follow_the_fitted_gaussian() -> None:
    gen = torch.Generator().manual_seed(0)
    mixing = torch.tensor([[1.0, 0.0], [0.8, 0.5]])
    data = torch.randn(4000, 2, generator=gen) @ mixing.T + torch.tensor([2.0, -1.0])
    samples = sample_latents(data, 4000, seed=1)
    torch.testing.assert_close(samples.mean(0), data.mean(0), atol=0.08, rtol=0)
    torch.testing.assert_close(samples.T.cov(), data.T.cov(), atol=0.08, rtol=0)


def test_inverse_corruptions(shared_data: Path) -> None:
    mask = centre_mask((1, 1, 28, 28), 20)
    assert int((mask == 0).sum()) == 400 and mask[..., 4:24, 4:24].sum() == 0
    clean = torch.zeros(2000, 1, 8, 8)
    noisy = add_noise(clean, 0.2, seed=0)
    assert noisy.std().item() == pytest.approx(0.4, rel=0.02)
    task = InverseTask(InverseConfig(root=str(shared_data / "mnist"), subset=8,
                                      corruption="inpaint"))
    batch = next(iter(task.eval_batches("test", LoaderOptions(batch_size=4))))
    objective = task.objective(batch)
    images = batch[0].clone()
    changed = images.clone()
    changed[..., 10:18, 10:18] = 1.0  # inside the hidden square: the objective cannot see it
    x = torch.zeros(4, 128)
    torch.testing.assert_close(objective(changed, x), objective(images, x))
    assert (objective(images, x) == 0).all()


def test_inverse_artifacts_show_clean_observed_and_recovered(shared_data: Path,
                                                             tmp_path: Path) -> None:
    """task=inverse's end of run (it once reused task=generative's, which has no observations,
    and every task=inverse run crashed there)."""
    torch.manual_seed(0)
    task = InverseTask(InverseConfig(root=str(shared_data / "mnist"), image_size=16, subset=64,
                                      latent_dim=LATENT, grid=4, corruption="inpaint",
                                      mask_size=6))
    metrics = task.artifacts(generator(task, T=2), tmp_path, torch.device("cpu"))
    assert (tmp_path / "recovered.png").stat().st_size > 0
    assert metrics["recovered_png"] == "recovered.png"
    assert 0 < metrics["artifact_recovered_psnr"] < 60


def test_inverse_objective_carries_the_latent_prior(shared_data: Path) -> None:
    """task.latent_weight adds weight * mean(x^2) per sample to inpainting and denoising alike
    (it was once read by task=generative only)."""
    x = torch.arange(4 * 128, dtype=torch.float32).view(4, 128) / 300
    for corruption in ("inpaint", "denoise"):
        plain, prior = (InverseTask(InverseConfig(root=str(shared_data / "mnist"), subset=8,
                                                  corruption=corruption, latent_weight=w))
                        for w in (0.0, 0.5))
        batch = next(iter(plain.eval_batches("test", LoaderOptions(batch_size=4))))
        images = batch[0] * 0.5
        extra = prior.objective(batch)(images, x) - plain.objective(batch)(images, x)
        torch.testing.assert_close(extra, 0.5 * (x**2).mean(1))


def test_data_errors_and_image_folders(shared_data: Path, tmp_path: Path) -> None:
    train, test = build_images("celeba", shared_data / "celeba", image_size=32, download=False,
                               notes=[])
    assert train.shape[1:] == (3, 32, 32) and len(train) + len(test) == 32
    with pytest.raises(DataNotFoundError, match="task.root"):
        build_images("folder", tmp_path / "missing", image_size=16, download=False, notes=[])
    with pytest.raises(ConfigError, match="valid"):
        build_images("svhn", tmp_path, image_size=16, download=False, notes=[])
    with pytest.raises(ValueError, match="task.dataset"):
        GenerativeConfig(dataset="svhn").check()
