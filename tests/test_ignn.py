"""IGNN: projection, well-posedness, per-graph solves and every gradient method (float64)."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian
from torch_geometric.data import Batch, Data

from deqrun.core import DEQ
from deqrun.data.graphs import normalize_adjacency, perron_root, prepare_graphs
from deqrun.models.ignn import (
    IGNN,
    IGNN_SIZES,
    IGNNConfig,
    ImplicitGraphLayer,
    _solve_layer,
    count_parameters,
    graph_input,
    project_rows_l1,
)

TIGHT = dict(f_max_iter=600, f_tol=1e-13, stop_mode="abs")


def make_graph(n: int, seed: int, features: int = 2, extra_edges: int = 2) -> Data:
    """A path of n nodes plus a few random chords, undirected, with random features."""
    gen = torch.Generator().manual_seed(seed)
    src = list(range(n - 1)) + torch.randint(0, n, (extra_edges,), generator=gen).tolist()
    dst = list(range(1, n)) + torch.randint(0, n, (extra_edges,), generator=gen).tolist()
    edges = torch.tensor([src + dst, dst + src])
    x = torch.randn(n, features, generator=gen, dtype=torch.float64)
    return Data(x=x, edge_index=edges, y=torch.tensor([seed % 2]))


def make_batch(sizes=(4, 6), normalization: str = "sym") -> Batch:
    graphs = prepare_graphs([make_graph(n, i) for i, n in enumerate(sizes)], normalization)
    for g in graphs:
        g.edge_weight = g.edge_weight.double()
    return Batch.from_data_list(graphs)


def make_layer(in_features: int = 2, width: int = 3, kappa: float = 0.9, seed: int = 0,
               scale: float = 3.0) -> ImplicitGraphLayer:
    torch.manual_seed(seed)
    layer = ImplicitGraphLayer(in_features, width, kappa).double()
    with torch.no_grad():
        layer.weight.mul_(scale)  # push W outside the ball so the projection acts
    return layer


def dense_propagation(g) -> torch.Tensor:
    return g.prop.to_dense()


# ---- projection and well-posedness -----------------------------------------------------------
def test_projection_is_the_l1_ball_projection():
    W = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    W[0] *= 0.01  # one row inside the ball
    radius = 0.7
    P = project_rows_l1(W, radius)
    l1 = P.abs().sum(dim=1)
    assert torch.equal(P[0], W[0])
    assert torch.allclose(l1[1:], torch.full_like(l1[1:], radius), atol=1e-12)
    assert torch.allclose(project_rows_l1(P, radius), P, atol=1e-12)  # idempotent
    for row, proj in zip(W[1:], P[1:]):  # soft-thresholding with theta found by bisection
        lo, hi = 0.0, float(row.abs().max())
        for _ in range(200):
            mid = (lo + hi) / 2
            above = float((row.abs() - mid).clamp_min(0).sum()) > radius
            lo, hi = (mid, hi) if above else (lo, mid)
        expected = row.sign() * (row.abs() - lo).clamp_min(0)
        assert torch.allclose(proj, expected, atol=1e-10)


def test_perron_root_bounds_the_dense_eigenvalue():
    data = make_graph(9, 3, extra_edges=4)
    weight = torch.rand(data.edge_index.shape[1], generator=torch.Generator().manual_seed(1))
    for mode in ("none", "sym", "rw"):
        ei, w = normalize_adjacency(data.edge_index, 9, weight, mode)
        dense = torch.zeros(9, 9, dtype=torch.float64).index_put_(tuple(ei), w.double(),
                                                                  accumulate=True)
        exact = float(torch.linalg.eigvals(dense.abs()).abs().max())
        root = float(perron_root(ei, w, 9, tol=1e-7))
        assert exact - 1e-6 <= root <= exact * (1 + 1e-5), mode


@pytest.mark.parametrize("normalization", ["none", "sym"])
def test_projection_makes_the_layer_a_contraction(normalization):
    batch = make_batch((5, 7), normalization)
    g = graph_input(batch)
    layer = make_layer(kappa=0.9)
    layer.project_(g.lambda_pf)
    radius = 0.9 / float(g.lambda_pf)
    assert float(layer.weight.detach().abs().sum(dim=1).max()) <= radius * (1 + 1e-12)
    # the linear part Z -> P Z W^T is kron(P, W) on row-major node rows; |.| bounds relu's
    # Jacobian, and its Perron root is lambda_pf(P) rho(|W|) <= kappa
    linear = torch.kron(dense_propagation(g).abs(), layer.weight.detach().abs())
    assert float(torch.linalg.eigvals(linear).abs().max()) <= 0.9 + 1e-9
    b = layer.injection(g.x, g.prop).detach()
    fixed = []
    for seed in (0, 1):
        z = 10 * torch.randn(b.shape, generator=torch.Generator().manual_seed(seed),
                             dtype=torch.float64)
        with torch.no_grad():
            for _ in range(800):
                z = layer.step(z, b, g.prop)
        fixed.append(z)
    assert torch.allclose(fixed[0], fixed[1], atol=1e-10, rtol=0)


# ---- per-graph residuals ---------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
def test_batched_graphs_solve_as_if_alone(solver):
    sizes = (5, 9)
    batch = make_batch(sizes)
    layer = make_layer()
    deq = DEQ(solver=solver, grad="implicit", f_max_iter=12, f_tol=1e-30, stop_mode="abs").eval()
    g = graph_input(batch)
    z_nodes, stats = _solve_layer(deq, layer, g.x, g, pretrain=False)
    assert stats.forward.abs_trace.shape == (12, 2)
    offsets = [0, sizes[0], sum(sizes)]
    for i in range(2):
        alone = graph_input(Batch.from_data_list([batch.get_example(i)]))
        z_alone, stats_alone = _solve_layer(deq, layer, alone.x, alone, pretrain=False)
        torch.testing.assert_close(stats.forward.abs_trace[:, i],
                                   stats_alone.forward.abs_trace[:, 0], rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(z_nodes[offsets[i]:offsets[i + 1]], z_alone,
                                   rtol=1e-9, atol=1e-14)
    assert not torch.equal(stats.forward.abs_trace[:, 0], stats.forward.abs_trace[:, 1])


# ---- gradients against dense exact answers ---------------------------------------------------
class Problem:
    """One layer on a batch of two graphs, loss <cot, Z*>, with dense Jacobians."""

    def __init__(self, kappa: float = 0.9) -> None:
        self.batch = make_batch((4, 6))
        self.g = graph_input(self.batch)
        self.layer = make_layer(kappa=kappa)
        self.layer.project_(self.g.lambda_pf)
        self.params = [self.layer.weight, self.layer.omega, self.layer.omega_direct,
                       self.layer.bias]
        self.b = self.layer.injection(self.g.x, self.g.prop).detach()
        z = torch.zeros_like(self.b)
        with torch.no_grad():
            for _ in range(2000):
                z = self.layer.step(z, self.b, self.g.prop)
        self.z_star = z
        n = z.numel()
        self.J = jacobian(lambda v: self.f_nodes(v.view_as(z)).reshape(-1), z.reshape(-1))
        self.cot = torch.randn(z.shape, generator=torch.Generator().manual_seed(7),
                               dtype=torch.float64)
        eye = torch.eye(n, dtype=torch.float64)
        self.w_exact = torch.linalg.solve((eye - self.J).T, self.cot.reshape(-1))

    def f_nodes(self, z: torch.Tensor) -> torch.Tensor:
        """f with the injection recomputed (so parameter gradients include Omega and b)."""
        return self.layer.step(z, self.layer.injection(self.g.x, self.g.prop), self.g.prop)

    def param_grads(self, w: torch.Tensor) -> list[torch.Tensor]:
        """w^T df/dtheta at z*."""
        out = self.f_nodes(self.z_star)
        return list(torch.autograd.grad(out, self.params, w.view_as(out)))

    def param_jacobian(self) -> torch.Tensor:
        """df/dtheta at z*, (state, parameters) dense."""
        rows = [torch.cat([g.reshape(-1) for g in self.param_grads(e)])
                for e in torch.eye(self.z_star.numel(), dtype=torch.float64)]
        return torch.stack(rows)

    def method_grads(self, deq: DEQ):
        deq.train()
        z_nodes, stats = _solve_layer(deq, self.layer, self.g.x, self.g, pretrain=False)
        grads = torch.autograd.grad((z_nodes * self.cot).sum(), self.params)
        return list(grads), stats

    def neumann(self, k: int, lam: float) -> torch.Tensor:
        B_T = lam * self.J.T + (1 - lam) * torch.eye(self.J.shape[0], dtype=torch.float64)
        term, total = self.cot.reshape(-1), torch.zeros(self.J.shape[0], dtype=torch.float64)
        for _ in range(k):
            total, term = total + term, B_T @ term
        return lam * total


def flat(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


@pytest.fixture(scope="module")
def problem() -> Problem:
    return Problem()


@pytest.fixture(scope="module")
def problem_half() -> Problem:
    return Problem(kappa=0.5)


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
def test_implicit_gradient_is_exact(problem, solver):
    deq = DEQ(solver=solver, grad="implicit", b_solver="anderson", b_max_iter=300, b_tol=1e-13,
              **TIGHT)
    grads, stats = problem.method_grads(deq)
    assert bool(stats.converged.all()) and stats.backward is not None
    exact = flat(problem.param_grads(problem.w_exact))
    assert rel_err(flat(grads), exact) <= 1e-8
    assert rel_err(flat(problem.param_grads(problem.cot.reshape(-1))), exact) > 0.01


@pytest.mark.parametrize("grad,k,lam", [("npg", 5, 0.5), ("upg", 5, 0.5), ("upg", 5, 1.0),
                                        ("jacobian_free", 1, 1.0)])
def test_phantom_gradients_match_their_series(problem, grad, k, lam):
    """UPG from an exact z* and NPG both equal lambda sum_{t<k} (B^T)^t grad; JFB is k=1."""
    options = {} if grad == "jacobian_free" else dict(k=k, lambda_=lam)
    grads, _ = problem.method_grads(DEQ(solver="anderson", grad=grad, **options, **TIGHT))
    expected = flat(problem.param_grads(problem.neumann(k, lam)))
    assert rel_err(flat(grads), expected) <= 1e-8


def shine_adjoint(problem: Problem, stats) -> torch.Tensor:
    """-cot^T B per graph, B Broyden's dense inverse estimate on the padded state; node rows."""
    pad, lowrank = problem.g.padding, stats.forward.lowrank
    cot = pad.dense(problem.cot).reshape(2, -1)
    w = []
    for i in range(2):
        keep = lowrank.valid[i]
        eye = torch.eye(cot.shape[1], dtype=torch.float64)
        w.append(-(cot[i] @ (-eye + lowrank.u[i][keep].T @ lowrank.v[i][keep])))
    return pad.nodes(torch.stack(w).view(2, pad.max_nodes, -1)).reshape(-1)


def test_shine_matches_minus_grad_times_broyden_inverse(problem):
    deq = DEQ(solver="broyden", grad="shine", fallback=False, f_max_iter=15, f_tol=1e-10,
              stop_mode="abs")
    grads, stats = problem.method_grads(deq)
    z_star = problem.g.padding.nodes(stats.forward.z)
    out = problem.layer.step(z_star, problem.layer.injection(problem.g.x, problem.g.prop),
                             problem.g.prop)
    expected = torch.autograd.grad(out, problem.params, shine_adjoint(problem, stats).view_as(out))
    assert rel_err(flat(grads), flat(expected)) <= 1e-9


@pytest.mark.parametrize("grad,options", [
    ("npg", dict(k=5, lambda_=0.5)), ("upg", dict(k=5, lambda_=0.5)),
    ("upg", dict(k=5, lambda_=1.0)), ("jacobian_free", {}),
    ("shine", dict(fallback=False))])
def test_approximate_gradients_are_close_to_exact(problem_half, grad, options):
    """cos(method, exact) >= sqrt(1 - r^2), where r bounds the relative parameter-gradient error:
    ||P^T (w - w_m)|| <= ||P||_2 ||w - w_m||, so r = ||P||_2 ||w - w_m|| / ||P^T w|| with P the
    dense df/dtheta, w the exact adjoint and w_m the method's (its series, or SHINE's w measured
    from Broyden's inverse). kappa = 0.5 keeps the series short enough for r < 1."""
    problem = problem_half
    solver = "broyden" if grad == "shine" else "anderson"
    deq = DEQ(solver=solver, grad=grad, **options, **TIGHT)
    grads, stats = problem.method_grads(deq)
    exact = flat(problem.param_grads(problem.w_exact))
    P = problem.param_jacobian()
    if grad == "shine":
        w_method = shine_adjoint(problem, stats)
    else:
        w_method = problem.neumann(options.get("k", 1), options.get("lambda_", 1.0))
    r = float(torch.linalg.matrix_norm(P, 2) * (problem.w_exact - w_method).norm() / exact.norm())
    assert r < 1, r
    assert cosine(flat(grads), exact) >= (1 - r * r) ** 0.5 - 1e-12


# ---- the whole model ---------------------------------------------------------------------------
def test_preset_parameter_counts_match_the_paper():
    deq = DEQ(solver="fixed_point", grad="implicit")
    counts = {name: count_parameters(IGNN(IGNN_SIZES[size], deq, features, classes, graph))
              for name, size, features, classes, graph in [
                  ("COX2", "tu", 35, 2, True), ("PROTEINS", "tu", 3, 2, True),
                  ("PPI", "ppi", 50, 121, False)]}
    assert counts == {"COX2": 37_634, "PROTEINS": 33_538, "PPI": 4_656_931}


@pytest.mark.parametrize("grad,solver", [("implicit", "fixed_point"), ("upg", "fixed_point"),
                                         ("npg", "anderson"), ("jacobian_free", "anderson"),
                                         ("shine", "broyden")])
def test_model_trains_on_graph_batches(grad, solver):
    torch.manual_seed(0)
    batch = make_batch((4, 6, 5))
    batch.x, batch.edge_weight = batch.x.float(), batch.edge_weight.float()
    config = IGNNConfig(size="tiny", layers=[8, 8])
    config.check()
    deq = DEQ(solver=solver, grad=grad, f_max_iter=50, f_tol=1e-5, stop_mode="abs")
    model = IGNN(config.resolve(), deq, 2, 2, graph_level=True)
    model.train()
    out, stats = model(batch)
    assert out.shape == (3, 2) and stats.residual.shape == (3,)
    torch.nn.functional.cross_entropy(out, batch.y).backward()
    for layer in model.layers:
        assert layer.weight.grad is not None and float(layer.weight.grad.abs().sum()) > 0
        bound = 0.9 / float(batch.lambda_pf.max())
        assert float(layer.weight.detach().abs().sum(dim=1).max()) <= bound + 1e-6


def test_config_check_rejects_bad_values():
    with pytest.raises(ValueError, match="kappa"):
        IGNNConfig(kappa=1.0).check()
    with pytest.raises(ValueError, match="size"):
        IGNNConfig(size="huge").check()
    with pytest.raises(ValueError, match="head"):
        IGNNConfig(head="max").check()


def test_auto_size_follows_the_task():
    from deqrun.models.ignn import build_ignn
    from deqrun.tasks.base import ModelSpec

    deq = DEQ(solver="fixed_point", grad="implicit")
    cases = [(ModelSpec("graph_classification", (3,), 2), 3),
             (ModelSpec("node_classification", (5,), 4, {"multilabel": True}), 5),
             (ModelSpec("node_classification", (5,), 2, {"synthetic_chains": True}), 1),
             (ModelSpec("node_classification", (5,), 7), 1)]
    for spec, n_layers in cases:
        assert len(build_ignn(IGNNConfig(), deq, spec).layers) == n_layers
    with pytest.raises(Exception, match="graph tasks"):
        build_ignn(IGNNConfig(), deq, ModelSpec("image_classification", (3, 8, 8), 10))


def test_saved_tensor_meter_counts_sparse_operands():
    """The runner's meter sees the CSR propagation matrix saved by sparse.mm (no storage)."""
    from deqrun.measure import SavedTensorMeter

    g = graph_input(make_batch((4, 6)))
    x = torch.randn(g.x.shape[0], 3, dtype=torch.float64, requires_grad=True)
    with SavedTensorMeter() as meter:
        torch.sparse.mm(g.prop, x * 2).sum()
    assert meter.bytes >= g.prop.values().numel() * 8
