"""gradcheck: any method's parameter gradient against the exact one, same batch, same masks."""

from __future__ import annotations

import pytest
import torch
from studies_toy import ToyDEQ, ToyTask, dense_exact

from deqrun.core import DEQ, GRADIENTS
from deqrun.studies import gradcheck
from deqrun.tasks.base import LoaderOptions

CPU = torch.device("cpu")


def first_batch(task: ToyTask, size: int = 4):
    return task.to_device(next(iter(task.eval_batches("test", LoaderOptions(size)))), CPU)


def test_exact_method_matches_the_dense_implicit_gradient():
    model, task = ToyDEQ(DEQ(grad="jacobian_free", f_max_iter=200, f_tol=1e-12)), ToyTask()
    batch = first_batch(task)
    params = model.implicit_parameters()
    grads = gradcheck.parameter_gradients(model, task, batch, params, gradcheck.exact_method(),
                                          gradcheck.rng_state(CPU), CPU)
    for got, want in zip(grads, dense_exact(model, batch)):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-9)
    assert grads[2].abs().max() == 0  # the unused parameter gets zeros, not None
    assert gradcheck.cosine(grads, dense_exact(model, batch)) == pytest.approx(1, abs=1e-10)


def test_the_configured_method_differs_and_is_kept():
    deq = DEQ(grad="jacobian_free", f_max_iter=200, f_tol=1e-12)
    model, task = ToyDEQ(deq, spectral_norm=0.9), ToyTask()
    batch, configured = first_batch(task), deq.gradient
    params, state = model.implicit_parameters(), gradcheck.rng_state(CPU)
    jfb = gradcheck.parameter_gradients(model, task, batch, params, deq.gradient, state, CPU)
    exact = dense_exact(model, batch)
    assert gradcheck.cosine(jfb, exact) < 0.999
    gradcheck.parameter_gradients(model, task, batch, params, gradcheck.exact_method(), state, CPU)
    assert deq.gradient is configured


def test_replay_repeats_the_masks_and_leaves_rng_and_buffers_as_found():
    model, task = ToyDEQ(DEQ(grad="implicit", f_max_iter=100, f_tol=1e-12), dropout=0.5), ToyTask()
    batch, params = first_batch(task), model.implicit_parameters()
    method = GRADIENTS["implicit"](**gradcheck.EXACT)
    state = gradcheck.rng_state(CPU)
    torch.rand(3)  # the caller's RNG moves on after the state was taken
    one = gradcheck.parameter_gradients(model, task, batch, params, method, state, CPU)
    two = gradcheck.parameter_gradients(model, task, batch, params, method, state, CPU)
    other = gradcheck.parameter_gradients(model, task, batch, params, method,
                                          gradcheck.rng_state(CPU), CPU)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    assert not torch.equal(one[1], other[1])  # other masks, other gradient: the masks matter
    assert int(model.calls) == 0
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    gradcheck.parameter_gradients(model, task, batch, params, method, state, CPU)
    assert torch.equal(torch.rand(3), expected)


def test_jacobian_penalty_is_included_with_its_probes_replayed():
    deq = DEQ(grad="implicit", f_max_iter=100, f_tol=1e-12, jac_reg=True)
    model, task = ToyDEQ(deq, dropout=0.3), ToyTask()
    batch, params = first_batch(task), model.implicit_parameters()
    state = gradcheck.rng_state(CPU)
    method = gradcheck.exact_method()
    plain = gradcheck.parameter_gradients(model, task, batch, params, method, state, CPU)
    penalised = gradcheck.parameter_gradients(model, task, batch, params, method, state, CPU,
                                              jac_weight=2.0)
    gradcheck.set_rng_state(state, CPU)
    with deq.use_gradient(method):
        output, stats = model(task.model_input(batch))
        by_hand = torch.autograd.grad(task.loss(output, batch) + 2.0 * stats.jac_loss, params[:2])
    assert gradcheck.cosine(plain, penalised) < 1 - 1e-6
    for got, want in zip(penalised, by_hand):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_cosine():
    a = [torch.tensor([1.0, 0.0]), torch.tensor([[0.0]])]
    b = [torch.tensor([1.0, 1.0]), torch.tensor([[0.0]])]
    assert gradcheck.cosine(a, b) == pytest.approx(2**-0.5)
    assert gradcheck.cosine(a, [-t for t in a]) == pytest.approx(-1)
