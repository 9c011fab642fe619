"""task=adversarial: the JIIO attack against a brute-force optimum, the ball, PGD, the task."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA

from deqrun.core import DEQ, GRADIENTS, JIIO, JIIOOptions, joint_solve
from deqrun.errors import ConfigError
from deqrun.models.base import DEQModel
from deqrun.models.mdeq import MDEQConfig, build_mdeq_model, frozen_batch_stats
from deqrun.registry import input_objective_tasks, serves
from deqrun.tasks.adversarial import (
    AdversarialConfig,
    AdversarialTask,
    attack_problem,
    pgd_attack,
    random_start,
    robust_evaluation,
)
from deqrun.tasks.base import LoaderOptions, ModelSpec

DZ, CLASSES = 5, 3


def linear_classifier(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """z = A z + B x (A contractive), logits = C z, inputs in 2-D: the attack's optimum over an
    L2 circle is found by brute force over angles (cross-entropy of affine logits is convex in
    x, so its maximum over the disc lies on the circle)."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(DZ, DZ, generator=gen, dtype=torch.float64)
    A = 0.5 * A / torch.linalg.matrix_norm(A, 2)
    B = torch.randn(DZ, 2, generator=gen, dtype=torch.float64)
    C = torch.randn(CLASSES, DZ, generator=gen, dtype=torch.float64)
    return A, B, C


def brute_force_max(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, center: torch.Tensor,
                    labels: torch.Tensor, eps: float) -> torch.Tensor:
    """max over the circle of radius eps around each center of CE(C (I - A)^-1 B x, y)."""
    K = C @ torch.linalg.inv(torch.eye(DZ, dtype=A.dtype) - A) @ B
    angles = torch.linspace(0, 2 * math.pi, 200_001, dtype=A.dtype)
    ring = torch.stack([angles.cos(), angles.sin()], 1) * eps
    best = []
    for c, y in zip(center, labels):
        logits = (c + ring) @ K.T
        best.append(F.cross_entropy(logits, y.expand(len(ring)), reduction="none").max())
    return torch.stack(best)


def test_jiio_attack_reaches_the_brute_force_optimum() -> None:
    A, B, C = linear_classifier()
    center = torch.tensor([[0.3, -0.2], [1.0, 0.5], [-0.4, 0.8]], dtype=torch.float64)
    labels, eps = torch.tensor([0, 1, 2]), 0.7

    def f(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return z @ A.T + x @ B.T

    def objective(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(z @ C.T, labels, reduction="none")

    options = JIIOOptions(T=300, m=10, alpha0=[0.1, 0.01], switch_iter=150, projection="l2",
                          eps=eps, normalized_step=True, best_rel_residual=1e-8)
    result = joint_solve(f, objective, torch.zeros(3, DZ, dtype=torch.float64), center.clone(),
                         options)
    best = brute_force_max(A, B, C, center, labels, eps)
    assert (result.x - center).norm(dim=1).max() <= eps * (1 + 1e-12)
    torch.testing.assert_close(-result.objective, best, atol=1e-6, rtol=1e-6)


def small_mdeq(jiio: bool = True, grad: str = "implicit") -> torch.nn.Module:
    deq = DEQ(solver="broyden" if grad == "shine" else "anderson", grad=grad, f_max_iter=12,
              f_tol=1e-4,
              **({"b_max_iter": 12} if grad == "implicit" else {}))
    options = MDEQConfig(branch_channels=[6, 6], head_channels=[4, 4], stem_channels=6,
                         final_channels=16, expansion=1, num_groups=2, dropout=0.0)
    torch.manual_seed(0)
    model = build_mdeq_model(options, deq, ModelSpec("image_classification", (1, 12, 12), 10))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:  # running statistics of the layers initialised small (as the runner does)
        norm.reset_running_stats()
        norm.momentum = None
    with torch.no_grad():
        model.train()(torch.rand(32, 1, 12, 12))
        model.classifier.classifier.weight.mul_(10.0)
    for norm in norms:
        norm.momentum = 0.1
    if jiio:
        model.input_optimiser = JIIO(T=12, m=5, alpha0=[0.3, 0.1], b_max_iter=12)
    return model.eval()


@pytest.mark.parametrize("norm, eps", [("l2", 1.0), ("linf", 0.1)])
def test_attacks_stay_in_the_ball(norm: str, eps: float) -> None:
    model = small_mdeq()
    x, y = torch.rand(6, 1, 12, 12), torch.randint(0, 10, (6,))
    output, _ = model(attack_problem(x, y, norm, eps))
    x_pgd, _ = pgd_attack(model, x, y, norm=norm, eps=eps, lr=0.4, steps=5)
    for x_adv in (output.x, x_pgd):
        delta = (x_adv - x).flatten(1)
        size = delta.norm(dim=1) if norm == "l2" else delta.abs().amax(1)
        assert (size <= eps * (1 + 1e-6)).all()
        assert size.max() > 0.5 * eps  # the attacks do move


def test_pgd_and_jiio_attacks_on_mdeq_increase_the_loss() -> None:
    model = small_mdeq()
    x, y = torch.rand(8, 1, 12, 12), torch.randint(0, 10, (8,))
    x_pgd, _ = pgd_attack(model, x, y, norm="l2", eps=1.0, lr=0.2, steps=5)
    x_jiio = model(attack_problem(x, y, "l2", 1.0))[0].x
    with torch.no_grad():
        clean, pgd, jiio = (F.cross_entropy(model(v)[0], y) for v in (x, x_pgd, x_jiio))
    assert pgd > clean + 0.05 and jiio > clean + 0.05, (clean, pgd, jiio)


class TanhClassifier(DEQModel):
    """z = tanh(W z + U x), logits = C z: a contractive DEQ with a closed-form input gradient."""

    def __init__(self, deq: DEQ, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        W = torch.randn(6, 6, generator=gen, dtype=torch.float64)
        self.deq = deq
        self.W = 0.5 * W / torch.linalg.matrix_norm(W, 2)
        self.U = torch.randn(6, 4, generator=gen, dtype=torch.float64)
        self.C = 3 * torch.randn(3, 6, generator=gen, dtype=torch.float64)

    def forward(self, x: torch.Tensor, pretrain: bool = False) -> tuple[torch.Tensor, Any]:
        injection = x @ self.U.T
        z, stats = self.deq(lambda z: torch.tanh(z @ self.W.T + injection),
                            torch.zeros(len(x), 6, dtype=x.dtype))
        return z @ self.C.T, stats

    def exact_gradient(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """dCE/dx = U^T D (I - W^T D)^-1 C^T (softmax - onehot), D = diag(1 - z*^2)."""
        z = torch.zeros(len(x), 6, dtype=x.dtype)
        for _ in range(500):
            z = torch.tanh(z @ self.W.T + x @ self.U.T)
        grads = []
        for z_i, y_i in zip(z, y):
            D = torch.diag(1 - z_i**2)
            dlogits = torch.softmax(self.C @ z_i, 0) - F.one_hot(y_i, 3).to(x.dtype)
            adjoint = torch.linalg.solve(torch.eye(6, dtype=x.dtype) - self.W.T @ D,
                                         self.C.T @ dlogits)
            grads.append(self.U.T @ D @ adjoint)
        return torch.stack(grads)


def test_pgd_steps_along_the_models_exact_input_gradient() -> None:
    """PGD differentiates the deployed (eval-mode) DEQ through its implicit backward: each
    normalised step follows the closed-form input gradient, and the ball holds."""
    deq = DEQ(solver="anderson", grad="implicit", f_max_iter=100, f_tol=1e-12, b_max_iter=100,
              b_tol=1e-12)
    model = TanhClassifier(deq).eval()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    x_adv, _ = pgd_attack(model, x, y, norm="l2", eps=10.0, lr=1e-3, steps=1)
    grad = model.exact_gradient(x, y)
    torch.testing.assert_close((x_adv - x) / 1e-3, grad / grad.norm(dim=1, keepdim=True),
                               atol=1e-8, rtol=0)
    assert not model.deq.training  # restored after the attack
    x_adv, loss = pgd_attack(model, x, y, norm="l2", eps=0.5, lr=0.2, steps=6)
    assert ((x_adv - x).norm(dim=1) <= 0.5 * (1 + 1e-12)).all()
    with torch.no_grad():
        clean = F.cross_entropy(model(x)[0], y, reduction="none")
    assert (loss > clean + 1e-3).all()


def test_training_through_the_attack_gives_parameter_gradients() -> None:
    model = small_mdeq().train()
    x, y = torch.rand(4, 1, 12, 12), torch.randint(0, 10, (4,))
    output, stats = model(attack_problem(x, y, "l2", 1.0, T=4, loss_scale=-0.25))
    F.cross_entropy(output.logits, y).backward()
    assert stats.backward is not None and stats.backward.nstep.max() >= 1
    assert all(p.grad is not None for p in model.equilibrium.parameters())
    assert model.stem[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("grad", sorted(set(GRADIENTS) - {"jiio"}))
def test_every_gradient_method_trains_the_attacked_classifier(grad: str) -> None:
    """task=adversarial with task.train_attack=none runs under every gradient method: a clean
    training step reaches every parameter, and both attacks still raise the loss."""
    model = small_mdeq(grad=grad).train()
    x, y = torch.rand(4, 1, 12, 12), torch.randint(0, 10, (4,))
    F.cross_entropy(model(x)[0], y).backward()
    grads = [p.grad for p in model.equilibrium.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    model.eval()
    x_pgd, _ = pgd_attack(model, x, y, norm="l2", eps=1.0, lr=0.2, steps=3)
    x_jiio = model(attack_problem(x, y, "l2", 1.0))[0].x
    with torch.no_grad():
        clean, pgd, jiio = (F.cross_entropy(model(v)[0], y) for v in (x, x_pgd, x_jiio))
    assert pgd > clean and jiio > clean, (grad, clean, pgd, jiio)


def test_frozen_batch_stats_keeps_running_statistics() -> None:
    model = small_mdeq().train()
    norm = model.stem[1]
    before = norm.running_mean.clone()
    with frozen_batch_stats(model):
        model.injection(torch.rand(4, 1, 12, 12) + 3.0)
    torch.testing.assert_close(norm.running_mean, before, rtol=0, atol=0)
    assert norm.momentum == 0.1
    model.injection(torch.rand(4, 1, 12, 12) + 3.0)
    assert not torch.equal(norm.running_mean, before)


def test_attack_needs_grad_jiio() -> None:
    model = small_mdeq(jiio=False)
    x, y = torch.rand(2, 1, 12, 12), torch.tensor([0, 1])
    with pytest.raises(ConfigError, match="grad=jiio"):
        model(attack_problem(x, y, "l2", 1.0))


def test_registered_for_mdeq_with_an_input_objective() -> None:
    assert "adversarial" in input_objective_tasks() and serves("mdeq", "adversarial")
    with pytest.raises(ValueError, match="train_attack"):
        AdversarialConfig(train_attack="pgd").check()
    with pytest.raises(ValueError, match="norm"):
        AdversarialConfig(norm="l1").check()


@pytest.fixture(scope="module")
def task() -> AdversarialTask:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return AdversarialTask(AdversarialConfig(root=str(SHARED_DATA / "mnist"), image_size=12,
                                             subset=32, attack_subset=6, attack_batch=3,
                                             pgd_steps=2, trace_every=4))


def test_task_batches_pixels_and_the_attack(task: AdversarialTask, tmp_path: Path) -> None:
    assert task.train_images.shape == (32, 1, 12, 12) and len(task.test_images) == 2000
    assert task.train_images.min() >= 0 and task.train_images.max() <= 1  # pixels, not normalised
    train = next(iter(task.train_batches(0, LoaderOptions(batch_size=4))))
    test = next(iter(task.eval_batches("test", LoaderOptions(batch_size=4))))
    assert train.attack and not test.attack
    problem = task.model_input(train)
    assert problem.eps == 1.0 and problem.projection == "l2" and problem.T == 10
    assert problem.loss_scale == pytest.approx(-0.25)
    assert torch.equal(task.model_input(test), test.images)
    model = small_mdeq()
    report = robust_evaluation(model, task.test_images, task.test_labels, task.options,
                               torch.device("cpu"))
    assert report["samples"] == 6 and report["jiio_iters"] == 12
    for attack in ("pgd", "jiio"):
        assert report[f"{attack}_robust_accuracy"] <= report["clean_accuracy"] + 1e-9
        assert report[f"{attack}_max_distance"] <= 1.0 + 1e-6 and report[f"{attack}_ms"] > 0
    assert [t["iteration"] for t in report["jiio_trace"]] == [4, 8, 12]
    # the final JIIO attack takes its own options over grad.* (here 8 iterations, m 2)
    own = replace(task.options, eval_jiio={"T": 8, "m": 2, "z_damping": 1.0})
    report = robust_evaluation(model, task.test_images, task.test_labels, own,
                               torch.device("cpu"))
    assert report["jiio_iters"] == 8 and report["jiio_eval_options"]["m"] == 2
    assert [t["iteration"] for t in report["jiio_trace"]] == [4, 8]
    with pytest.raises(ValueError, match="task.eval_jiio takes JIIO options"):
        replace(task.options, eval_jiio={"steps": 8}).check()
    metrics = task.artifacts(model, tmp_path, torch.device("cpu"))
    assert (tmp_path / "attacks.json").is_file() and "attack_pgd_robust_accuracy" in metrics


def test_training_resolves_the_equilibrium_at_the_attacked_input() -> None:
    # Two joint iterations leave z* far from z = f(z, x*); training re-solves it from z* (the
    # model's Anderson, tol 1e-4) unless grad.resolve=false, and reports that solve.
    x, y = torch.rand(4, 1, 12, 12), torch.randint(0, 10, (4,))
    model = small_mdeq().train()
    output, stats = model(attack_problem(x, y, "l2", 1.0, T=2, loss_scale=-0.25))
    joint = output.jiio.rel_residual
    assert joint.min() > 0.5 and stats.forward.rel_residual.max() < 0.5 * joint.min()
    F.cross_entropy(output.logits, y).backward()
    assert stats.backward is not None
    model = small_mdeq().train()
    model.input_optimiser.resolve = False
    output, stats = model(attack_problem(x, y, "l2", 1.0, T=2, loss_scale=-0.25))
    assert torch.equal(stats.forward.rel_residual, output.jiio.rel_residual)


@pytest.mark.parametrize("norm, eps", [("l2", 1.0), ("linf", 0.1)])
def test_random_start_lies_in_the_ball_and_the_training_attack_starts_there(norm, eps) -> None:
    torch.manual_seed(0)
    images = torch.rand(16, 1, 12, 12)
    start = random_start(images, norm, eps)
    delta = (start - images).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps * (1 + 1e-6)).all() and (size > 0.5 * eps).all()
    problem = attack_problem(images, torch.zeros(16, dtype=torch.long), norm, eps, start=start)
    assert torch.equal(problem.x0, start) and torch.equal(problem.x_center, images)
