# ruff: noqa: UP006, UP007, UP035, UP045
"""task=adversarial: a classifier trained against (and measured under) attacks in a norm ball.

The input objective is the attack's: maximise the cross-entropy of the model's logits within an
L2 (or L-infinity) ball of radius eps around the clean image, in pixel units (images are kept in
[0, 1], not normalised, so eps = 1 means one pixel-unit of L2 norm as in the JIIO paper).

- Training (task.train_attack=jiio, with grad=jiio): every training batch becomes an InputProblem
  that the model solves jointly with its equilibrium by JIIO with task.train_iters iterations
  (JIIO-k); the cross-entropy at the attacked input trains the model through the implicit
  backward warm-started from mu*. task.train_attack=none trains on clean images.
- Evaluation: clean accuracy on the test split every evaluation; at the end of the run, on the
  first task.attack_subset test images, robust accuracy under PGD (task.pgd_steps normalised
  steps of task.pgd_lr, each a full DEQ forward and implicit backward) and under the JIIO attack
  (grad.T iterations), with the wall-clock time of each attack and the cross-entropy each reaches
  (measured by the same plain DEQ solve), written to attacks.json in the run folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from deqrun.core import InputProblem, JIIOOptions
from deqrun.core.jiio import project, step_direction
from deqrun.data.images import build_cifar10, build_mnist
from deqrun.data.paths import data_root
from deqrun.registry import register_task
from deqrun.tasks.base import LoaderOptions, ModelSpec, Task
from deqrun.tasks.classification import ImageDataConfig

DATASETS = ("mnist", "cifar10")
NORMS = ("l2", "linf")
TRAIN_ATTACKS = ("jiio", "none")


@dataclass
class AdversarialConfig(ImageDataConfig):
    """task=adversarial: data (ImageDataConfig), the threat model, the training attack and the
    final attacks."""

    name: str = "adversarial"
    dataset: str = "mnist"
    test_as_train: bool = True
    norm: str = "l2"
    eps: float = 1.0
    train_attack: str = "jiio"
    train_iters: int = 10
    random_start: bool = True
    pgd_steps: int = 20
    pgd_lr: float = 0.2
    attack_subset: int = 500
    attack_batch: int = 100
    trace_every: int = 10
    # JIIO options of the final JIIO attack only, over grad.* (which the training attack uses),
    # e.g. {m: 5, z_damping: 1.0, mu_damping: 1.0}; alpha0 here is in pixels like grad.alpha0
    eval_jiio: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        super().check()
        if self.dataset not in DATASETS:
            raise ValueError(f"task.dataset must be one of {', '.join(DATASETS)}, "
                             f"got {self.dataset!r}")
        if self.norm not in NORMS:
            raise ValueError(f"task.norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.train_attack not in TRAIN_ATTACKS:
            raise ValueError(f"task.train_attack must be one of {', '.join(TRAIN_ATTACKS)}, "
                             f"got {self.train_attack!r}")
        if self.eps <= 0 or self.pgd_lr <= 0:
            raise ValueError("task.eps and task.pgd_lr must be > 0")
        if self.train_iters < 1 or self.pgd_steps < 1 or self.attack_batch < 1:
            raise ValueError("task.train_iters, task.pgd_steps and task.attack_batch must be >= 1")
        if self.attack_subset < 0 or self.trace_every < 0:
            raise ValueError("task.attack_subset and task.trace_every must be >= 0")
        unknown = sorted(set(self.eval_jiio) - set(JIIOOptions.names()))
        if unknown:
            raise ValueError(f"task.eval_jiio takes JIIO options "
                             f"({', '.join(JIIOOptions.names())}); got {', '.join(unknown)}")

    def check_grad(self, grad: str) -> None:
        """The JIIO training attack is the joint solve of grad=jiio: refuse it before the run."""
        if self.train_attack == "jiio" and grad != "jiio":
            raise ValueError(f"task.train_attack=jiio needs grad=jiio (got grad={grad}); pass "
                             "grad=jiio, or task.train_attack=none to train on clean images")


class Batch(NamedTuple):
    """Images in [0, 1], labels, and whether the batch is to be attacked (training batches)."""

    images: torch.Tensor
    labels: torch.Tensor
    attack: bool = False


def _tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.as_tensor(labels, dtype=torch.long)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy."""
    return F.cross_entropy(logits, labels, reduction="none")


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output (a tensor, or AttackedLogits)."""
    return getattr(output, "logits", output)


def attack_problem(images: torch.Tensor, labels: torch.Tensor, norm: str, eps: float,
                   T: int | None = None, loss_scale: float = 1.0,
                   callback: Callable[[int, torch.Tensor], None] | None = None,
                   start: torch.Tensor | None = None,
                   overrides: dict[str, Any] | None = None) -> InputProblem:
    """Maximise the cross-entropy in the `norm` ball of radius eps around images (minimise its
    negative), normalised steps, from `start` (default: the images); T None keeps grad.T;
    `overrides`: other JIIO options for this attack only."""

    def objective(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return -cross_entropy(logits, labels)

    return InputProblem(x0=images if start is None else start, objective=objective,
                        x_center=images, loss_scale=loss_scale, projection=norm, eps=eps,
                        normalized_step=True, T=T, callback=callback,
                        overrides=dict(overrides or {}) or None)


def random_start(images: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """A point drawn uniformly from the `norm` ball of radius eps around each image (the random
    start of PGD training, Madry et al. 2018: without it a few-step attack from the image itself
    perturbs along the label's own gradient, and training on it can leak the label)."""
    if norm == "linf":
        return images + (2 * torch.rand_like(images) - 1) * eps
    direction = torch.randn_like(images)
    direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-30).view(
        -1, *([1] * (images.dim() - 1)))
    radius = eps * torch.rand(len(images), device=images.device) ** (1.0 / images[0].numel())
    return images + direction * radius.view(-1, *([1] * (images.dim() - 1)))


@contextmanager
def implicit_gradient(model: nn.Module) -> Iterator[None]:
    """The model's DEQ attaches its gradient although the model is in eval mode (batch norm and
    dropout stay in eval mode): what an attack on the deployed model differentiates."""
    deq = getattr(model, "deq", None)
    mode = deq.training if deq is not None else False
    if deq is not None:
        deq.train(True)
    try:
        yield
    finally:
        if deq is not None:
            deq.train(mode)


class Stopwatch:
    """Wall-clock time with pauses (measurements along an attack's path are not its cost)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.total, self.start = device, 0.0, None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def resume(self) -> None:
        self._sync()
        self.start = time.perf_counter()

    def pause(self) -> float:
        self._sync()
        if self.start is not None:
            self.total += time.perf_counter() - self.start
            self.start = None
        return self.total * 1e3


def pgd_attack(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, norm: str,
               eps: float, lr: float, steps: int,
               trace: Callable[[int, torch.Tensor], None] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD from the clean image: x <- P(x + lr g/||g||) (sign(g) for linf), g the gradient of
    the cross-entropy through the model's DEQ (its implicit backward), `steps` times.

    Returns each sample's strongest iterate (highest cross-entropy met along the path, clean
    image included) and that cross-entropy. trace(k, loss) sees the mean loss at iterate k.
    """
    x = images.detach().clone()
    best_x, best_loss = x.clone(), torch.full_like(labels, -float("inf"), dtype=images.dtype)
    with implicit_gradient(model), torch.enable_grad():
        for step in range(steps + 1):
            x_in = x.detach().requires_grad_()
            loss = cross_entropy(logits_of(model(x_in)[0]), labels)
            better = loss.detach() > best_loss
            best_loss = torch.where(better, loss.detach(), best_loss)
            best_x[better] = x[better]
            if trace is not None:
                trace(step, loss.detach())
            if step == steps:
                break
            (grad,) = torch.autograd.grad(loss.sum(), x_in)
            x = project(x + lr * step_direction(grad, norm, True), images, norm, eps).detach()
    return best_x, best_loss


class AdversarialTask(Task):
    """MDEQ classification under attack: JIIO adversarial training, PGD and JIIO evaluation."""

    name = "adversarial"
    metric = "accuracy"
    higher_is_better = True

    def __init__(self, options: AdversarialConfig) -> None:
        super().__init__()
        options.check()
        self.options = options
        root = data_root(options.root, options.dataset)
        if options.dataset == "mnist":
            train, test = build_mnist(root, download=options.download,
                                      image_size=options.image_size, subset=options.subset,
                                      test_as_train=options.test_as_train, notes=self.notes,
                                      normalize=False)
        else:
            train, test = build_cifar10(root, download=options.download,
                                        image_size=options.image_size, subset=options.subset,
                                        notes=self.notes, normalize=False)
        self.train_images, self.train_labels = _tensors(train)
        self.test_images, self.test_labels = _tensors(test)
        self.notes.append(f"threat model: {options.norm} ball of radius {options.eps} in pixels "
                          f"([0, 1] images); training attack: {options.train_attack}")

    def model_spec(self) -> ModelSpec:
        shape = tuple(self.train_images.shape[1:])
        return ModelSpec(kind="image_classification", in_shape=shape, out_features=10)

    def _loader(self, images: torch.Tensor, labels: torch.Tensor, attack: bool,
                batch_size: int, generator: torch.Generator | None = None) -> DataLoader:
        def collate(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> Batch:
            x, y = zip(*samples)
            return Batch(torch.stack(x), torch.stack(y), attack)

        return DataLoader(TensorDataset(images, labels), batch_size=batch_size,
                          shuffle=generator is not None, generator=generator, collate_fn=collate)

    def train_batches(self, epoch: int, options: LoaderOptions) -> DataLoader:
        generator = torch.Generator().manual_seed(options.seed * 100_003 + epoch)
        return self._loader(self.train_images, self.train_labels,
                            self.options.train_attack == "jiio", options.batch_size, generator)

    def eval_batches(self, split: str, options: LoaderOptions) -> DataLoader:
        if split != "test":
            raise KeyError(f"task {self.name} has no evaluation split {split!r}")
        return self._loader(self.test_images, self.test_labels, False, options.batch_size)

    def model_input(self, batch: Batch) -> Any:
        """Clean images, or for training batches the JIIO-k attack problem on them."""
        if not batch.attack:
            return batch.images
        o = self.options
        start = random_start(batch.images, o.norm, o.eps) if o.random_start else None
        return attack_problem(batch.images, batch.labels, o.norm, o.eps, T=o.train_iters,
                              loss_scale=-1.0 / len(batch.labels), start=start)

    def loss(self, output: Any, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(logits_of(output), batch.labels)

    def metric_sums(self, output: Any, batch: Batch) -> dict[str, float]:
        logits, y = logits_of(output).detach(), batch.labels
        return {"loss": float(F.cross_entropy(logits, y, reduction="sum")),
                "correct": float((logits.argmax(-1) == y).sum()), "samples": float(len(y))}

    def reduce(self, sums: dict[str, float]) -> dict[str, float]:
        samples = max(sums.get("samples", 0.0), 1.0)
        return {"loss": sums["loss"] / samples, "accuracy": sums["correct"] / samples}

    # ---- the final robust evaluation ----------------------------------------------------------
    def artifacts(self, model: nn.Module, run_dir: Path, device: torch.device,
                  ) -> dict[str, Any]:
        """Clean and robust accuracy (PGD, JIIO) on the first attack_subset test images."""
        if self.options.attack_subset == 0:
            return {}
        report = robust_evaluation(model, self.test_images, self.test_labels, self.options,
                                   device)
        (run_dir / "attacks.json").write_text(json.dumps(report, indent=2))
        return {f"attack_{k}": v for k, v in report.items() if not isinstance(v, (list, dict))}


def _plain_loss(model: nn.Module, x: torch.Tensor, labels: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample cross-entropy and correctness at x by the model's plain (eval) solve."""
    with torch.no_grad():
        logits = logits_of(model(x)[0])
    return cross_entropy(logits, labels), logits.argmax(-1) == labels


def robust_evaluation(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      options: AdversarialConfig, device: torch.device) -> dict[str, Any]:
    """PGD and (with grad=jiio) the JIIO attack on the first attack_subset images, batch by
    batch: accuracy and cross-entropy at each attack's input (plain eval solve), its time
    (attack only), its largest distance to the clean image, and mean-loss traces vs time."""
    o = options
    model.eval()
    count = min(o.attack_subset, len(images))
    jiio_on = getattr(model, "input_optimiser", None) is not None
    attacks = ["pgd", "jiio"] if jiio_on else ["pgd"]
    sums: dict[str, float] = {"clean_correct": 0.0}
    traces: dict[str, dict[int, list[float]]] = {a: {} for a in attacks}
    losses: dict[str, list[torch.Tensor]] = {a: [] for a in attacks}
    for start in range(0, count, o.attack_batch):
        x = images[start:start + o.attack_batch][: count - start].to(device)
        y = labels[start:start + len(x)].to(device)
        sums["clean_correct"] += float(_plain_loss(model, x, y)[1].sum())
        for attack in attacks:
            x_adv, ms, trace = _run_attack(attack, model, x, y, o, device)
            loss, correct = _plain_loss(model, x_adv, y)
            distance = _distance(x_adv - x, o.norm)
            losses[attack].append(loss.cpu())
            sums[f"{attack}_correct"] = sums.get(f"{attack}_correct", 0.0) + float(correct.sum())
            sums[f"{attack}_ms"] = sums.get(f"{attack}_ms", 0.0) + ms
            sums[f"{attack}_max_distance"] = max(sums.get(f"{attack}_max_distance", 0.0),
                                                 float(distance.max()))
            for k, (t_ms, value) in trace.items():
                traces[attack].setdefault(k, []).append((t_ms, value * len(x)))
    report: dict[str, Any] = {"samples": count, "clean_accuracy": sums["clean_correct"] / count,
                              "eps": o.eps, "norm": o.norm, "pgd_steps": o.pgd_steps,
                              "pgd_lr": o.pgd_lr}
    if jiio_on:
        report["jiio_iters"] = int(o.eval_jiio.get("T", model.input_optimiser.T))
        report["jiio_eval_options"] = dict(o.eval_jiio)
    for attack in attacks:
        loss = torch.cat(losses[attack])
        report.update({f"{attack}_robust_accuracy": sums[f"{attack}_correct"] / count,
                       f"{attack}_loss": float(loss.mean()), f"{attack}_ms": sums[f"{attack}_ms"],
                       f"{attack}_max_distance": sums[f"{attack}_max_distance"]})
        report[f"{attack}_trace"] = [
            {"iteration": k, "ms": sum(t for t, _ in v), "loss": sum(s for _, s in v) / count}
            for k, v in sorted(traces[attack].items())]
    if jiio_on:
        jiio_loss, pgd_loss = torch.cat(losses["jiio"]), torch.cat(losses["pgd"])
        report["jiio_at_least_pgd_fraction"] = float((jiio_loss >= pgd_loss - 1e-6).float().mean())
    return report


def _distance(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1)
    return flat.norm(dim=1) if norm == "l2" else flat.abs().amax(1)


def _run_attack(attack: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                o: AdversarialConfig, device: torch.device,
                ) -> tuple[torch.Tensor, float, dict[int, tuple[float, float]]]:
    """One attack on one batch: (adversarial images, attack ms, {iteration: (ms, mean loss)})."""
    watch, trace = Stopwatch(device), {}
    every = o.trace_every
    if attack == "pgd":
        def record(step: int, loss: torch.Tensor) -> None:
            ms = watch.pause()
            if every and (step % max(1, every // 4) == 0 or step == o.pgd_steps):
                trace[step] = (ms, float(loss.mean()))
            watch.resume()

        watch.resume()
        x_adv, _ = pgd_attack(model, x, y, norm=o.norm, eps=o.eps, lr=o.pgd_lr,
                              steps=o.pgd_steps, trace=record)
        return x_adv, watch.pause(), trace

    last = int(o.eval_jiio.get("T", model.input_optimiser.T))

    def callback(k: int, x_k: torch.Tensor) -> None:
        ms = watch.pause()
        if every and (k % every == 0 or k == last):
            trace[k] = (ms, float(_plain_loss(model, x_k, y)[0].mean()))
        if k < last:  # after the last iteration: picking the best iterate and decoding it
            watch.resume()

    watch.resume()
    output, _ = model(attack_problem(x, y, o.norm, o.eps, callback=callback,
                                     overrides=dict(o.eval_jiio)))
    return output.x.detach(), watch.pause(), trace


@register_task("adversarial", schema=AdversarialConfig, kind="image_classification",
               input_objective=True,
               description="adversarial training (JIIO attack) and PGD/JIIO robust accuracy")
def build_adversarial_task(options: AdversarialConfig) -> AdversarialTask:
    return AdversarialTask(options)
