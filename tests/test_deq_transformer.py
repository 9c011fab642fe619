"""DEQ-Transformer and word-level language modelling: causality, memory, gradients, data."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deqrun.core import DEQ, reset_norms
from deqrun.data.text import EOS, UNK, Segments, Vocabulary, stream, words_of
from deqrun.errors import DataNotFoundError
from deqrun.models.deq_transformer import (
    SIZES,
    AdaptiveIO,
    DEQTransformer,
    DEQTransformerConfig,
    TransformerSpec,
)
from deqrun.registry import model_entry, task_entry
from deqrun.tasks.base import LoaderOptions
from deqrun.tasks.language import LanguageModelTask, WikiText2Config

TIGHT = dict(f_max_iter=120, f_tol=1e-12, stop_mode="abs")
VOCAB = 23


def tiny_spec(norm: str = "post", dropout: float = 0.0, mem_len: int = 6,
              cutoffs: tuple = (), explicit: bool = False) -> TransformerSpec:
    return TransformerSpec(d_model=8, n_head=2, d_head=4, d_inner=16, mem_len=mem_len,
                           cutoffs=cutoffs, div_val=2, dropout=dropout, norm=norm, init_std=0.1,
                           explicit=explicit)


def tiny_model(deq: DEQ, seed: int = 0, **spec) -> DEQTransformer:
    """A contractive tiny model (a strong injection, weak z paths): its fixed point is unique."""
    torch.manual_seed(seed)
    model = DEQTransformer(tiny_spec(**spec), deq, vocab_size=VOCAB).double()
    with torch.no_grad():
        model.inject.weight.normal_(0.0, 1.0)
        model.layer.attention.o_net.weight_g.mul_(5.0)
    return model


def tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    a, b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return float(a @ b / (a.norm() * b.norm()))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is several times faster on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_f_is_causal_at_every_iteration(norm):
    """Iterating f from zero, changing token t+1 never changes any state at positions <= t."""
    model = tiny_model(DEQ(solver="fixed_point", **TIGHT), norm=norm, dropout=0.3).train()
    model((tokens(2, 5, 9), tokens(2, 5, 10)))  # a memory from an earlier segment
    x = tokens(2, 7, 1)
    changed = x.clone()
    changed[:, 4] = (x[:, 4] + 1) % VOCAB
    states = []
    for sequence in (x, changed):
        torch.manual_seed(3)  # the same dropout masks for both
        context = model.context(sequence)
        reset_norms(model.layer)
        z, trace = context.injection.new_zeros(2, 7, 8), []
        for _ in range(6):
            z = model.layer(z, context)
            trace.append(z)
        states.append(torch.stack(trace))
    assert torch.equal(states[0][:, :, :4], states[1][:, :, :4])
    assert (states[0][:, :, 4:] - states[1][:, :, 4:]).abs().max() > 1e-3


def test_fixed_point_is_causal_through_anderson():
    """At the (tightly solved) fixed point the states before t ignore the token at t."""
    model = tiny_model(DEQ(solver="anderson", **TIGHT)).eval()
    x = tokens(2, 7, 1)
    changed = x.clone()
    changed[:, 4] = (x[:, 4] + 5) % VOCAB
    z_a, stats, _ = model.equilibrium(x)
    z_b, _, _ = model.equilibrium(changed)
    assert stats.abs_residual.max() < 1e-9
    assert (z_a[:, :4] - z_b[:, :4]).abs().max() < 1e-8
    assert (z_a[:, 4:] - z_b[:, 4:]).abs().max() > 1e-3


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_two_halves_with_memory_equal_one_segment(norm):
    model = tiny_model(DEQ(solver="anderson", **TIGHT), norm=norm).eval()
    x, y = tokens(3, 8, 4), tokens(3, 8, 5)
    with torch.no_grad():
        model.reset_state()
        whole, _ = model((x, y))
        model.reset_state()
        first, _ = model((x[:, :4], y[:, :4]))
        assert model.memory[0].shape == (3, 4, 8)
        second, _ = model((x[:, 4:], y[:, 4:]))
        model.reset_state()
        alone, _ = model((x[:, 4:], y[:, 4:]))
    assert torch.allclose(torch.cat([first, second], dim=1), whole, atol=1e-8)
    assert not torch.allclose(alone, second, atol=1e-3)
    model.reset_state()
    assert model.memory is None


def test_memory_keeps_the_last_mem_len_states():
    model = tiny_model(DEQ(solver="anderson", f_max_iter=5), mem_len=3).eval()
    with torch.no_grad():
        model((tokens(2, 5, 1), tokens(2, 5, 2)))
        model((tokens(2, 2, 3), tokens(2, 2, 4)))
    assert model.memory[0].shape == (2, 3, 8) and model.memory[1].shape == (2, 3, 3 * 8)
    with torch.no_grad():
        model((tokens(4, 2, 3), tokens(4, 2, 4)))  # a new batch size starts without memory
    assert model.memory[0].shape == (4, 2, 8)


def test_adaptive_softmax_is_a_distribution_and_embedding_is_tied():
    torch.manual_seed(0)
    io = AdaptiveIO(VOCAB, 8, (5, 12), div_val=2).double()
    hidden = torch.randn(3, 8, dtype=torch.float64)
    every = torch.arange(VOCAB)
    nll = torch.stack([io.nll(hidden[i].expand(VOCAB, 8), every) for i in range(3)])
    assert torch.allclose(torch.logsumexp(-nll, dim=1), torch.zeros(3, dtype=torch.float64))
    embedded = io.embed(torch.tensor([[2, 7, 20]]))
    expected = io.tables[2].weight[20 - 12] @ io.projections["2"].t() * math.sqrt(8)
    assert embedded.shape == (1, 3, 8) and torch.allclose(embedded[0, 2], expected)
    assert torch.allclose(embedded[0, 0], io.tables[0].weight[2] * math.sqrt(8))


def test_presets_and_options():
    assert DEQTransformerConfig().spec() == SIZES["tiny"]
    paper = DEQTransformerConfig(size="wt103", norm="pre").spec()
    assert (paper.d_model, paper.n_head, paper.d_inner, paper.mem_len) == (700, 10, 48000, 150)
    assert paper.cutoffs == (20000, 40000, 200000) and paper.norm == "pre"
    assert DEQTransformerConfig(cutoffs=[100, 1000]).spec().cutoffs == (100, 1000)
    for bad in (dict(norm="mid"), dict(size="huge"), dict(cutoffs=[50, 10]), dict(dropout=1.0)):
        with pytest.raises(ValueError):
            DEQTransformerConfig(**bad).check()
    assert model_entry("deq_transformer").tasks == ("language_model",)


# ---- gradients against the exact implicit gradient ---------------------------------------------


def exact_gradients(model: DEQTransformer, x: torch.Tensor, y: torch.Tensor) -> list:
    """dL/dtheta = w^T df/dtheta + dhead/dtheta with w = (I - J)^-T dL/dz*, J dense."""
    params = list(model.parameters())
    context = model.context(x)
    reset_norms(model.layer)

    def f(z: torch.Tensor) -> torch.Tensor:
        return model.layer(z, context)

    z_star = model.deq.solve(f, torch.zeros(*x.shape, 8, dtype=torch.float64), 120, 1e-13).z
    z_star = z_star.detach().requires_grad_()
    head_loss = model.head(z_star, y).sum()
    (grad_z,) = torch.autograd.grad(head_loss, z_star, retain_graph=True)
    jac = torch.autograd.functional.jacobian(f, z_star.detach())
    n = z_star.numel()
    eye = torch.eye(n, dtype=torch.float64)
    w = torch.linalg.solve((eye - jac.reshape(n, n)).T, grad_z.reshape(n)).reshape(z_star.shape)
    total = (f(z_star.detach()) * w).sum() + head_loss
    grads = torch.autograd.grad(total, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def method_gradients(model: DEQTransformer, x: torch.Tensor, y: torch.Tensor) -> list:
    params = list(model.parameters())
    z_star, _, _ = model.equilibrium(x)
    grads = torch.autograd.grad(model.head(z_star, y).sum(), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


# Measured on this contractive tiny layer: implicit 1 - 1e-15, UPG/NPG A_{5,0.8} 0.9997,
# Jacobian-free 0.98, SHINE 0.96-0.98 (post and pre).
GRADIENT_CASES = [
    ("anderson", "implicit", dict(b_solver="broyden", b_max_iter=120, b_tol=1e-12), 1 - 1e-9),
    ("anderson", "upg", dict(k=5, lambda_=0.8), 0.999),
    ("anderson", "npg", dict(k=5, lambda_=0.8), 0.999),
    ("anderson", "jacobian_free", {}, 0.95),
    ("broyden", "shine", dict(fallback=False), 0.9),
]


@pytest.mark.parametrize(("solver", "grad", "options", "threshold"), GRADIENT_CASES)
@pytest.mark.parametrize("norm", ["post", "pre"])
def test_gradient_methods_against_exact(solver, grad, options, threshold, norm):
    deq = DEQ(solver=solver, grad=grad, f_max_iter=120, f_tol=1e-12, stop_mode="abs", **options)
    model = tiny_model(deq, norm=norm, cutoffs=(6,)).train()
    warm_memory(model)
    x, y = tokens(2, 5, 1), tokens(2, 5, 2)
    exact = exact_gradients(model, x, y)
    ours = method_gradients(model, x, y)
    assert cosine(ours, exact) > threshold


def warm_memory(model: DEQTransformer) -> None:
    """Give the model a memory from an earlier segment."""
    with torch.no_grad():
        model.eval()
        model((tokens(2, 4, 7), tokens(2, 4, 8)))
        model.train()


def test_upg_equals_npg_at_the_fixed_point():
    """Unrolling k damped steps from z* and the k-term Neumann series give the same gradient."""
    grads = []
    for grad in ("upg", "npg"):
        deq = DEQ(solver="anderson", grad=grad, k=4, lambda_=0.6, **TIGHT)
        model = tiny_model(deq, cutoffs=(6,)).train()
        warm_memory(model)
        grads.append(torch.cat([g.flatten() for g in method_gradients(model, tokens(2, 5, 1),
                                                                       tokens(2, 5, 2))]))
    assert (grads[0] - grads[1]).norm() < 1e-8 * grads[1].norm()


# ---- the word-level data protocol --------------------------------------------------------------

CORPUS = {
    "train": "the cat sat\n\nthe dog sat on the cat\n",
    "valid": "the cat ran\n",
    "test": "a dog sat\nthe end\n",
}


def write_corpus(folder: Path, splits: tuple = ("train", "valid", "test")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        (folder / f"{split}.txt").write_text(CORPUS[split])
    return folder


def test_vocabulary_eos_and_unk():
    words = words_of(["b a b", "", "c b"])
    assert words == ["b", "a", "b", EOS, EOS, "c", "b", EOS]
    vocab = Vocabulary.from_words(words)
    assert vocab.words == ["b", EOS, "a", "c", UNK]  # by count, ties by first appearance
    assert vocab.encode(["c", "zebra", EOS]).tolist() == [3, 4, 1]


def test_streams_and_segments_cover_the_text_in_order():
    ids = torch.arange(23)
    data = stream(ids, 3)
    assert data.tolist()[1] == list(range(7, 14))  # contiguous rows, the tail (21, 22) dropped
    segments = list(Segments(data, 4))
    assert len(Segments(data, 4)) == len(segments) == 2
    inputs = torch.cat([x for x, _ in segments], dim=1)
    targets = torch.cat([y for _, y in segments], dim=1)
    assert torch.equal(inputs, data[:, :-1]) and torch.equal(targets, data[:, 1:])
    assert [x.shape[1] for x, _ in segments] == [4, 2]


def test_offline_task_through_datasets_text_builder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    root = write_corpus(tmp_path / "corpus")
    task = LanguageModelTask(WikiText2Config(root=str(root), tgt_len=2,
                                              cache_dir=str(tmp_path / "cache")))
    assert task.eval_splits == ("val", "test")
    assert task.vocab.words[:3] == ["the", EOS, "cat"]
    assert len(task.vocab) == 7  # the cat sat <eos> dog on + <unk>
    unk = task.vocab.index[UNK]
    test_ids = task.ids["test"].tolist()
    assert test_ids == [unk, task.vocab.index["dog"], task.vocab.index["sat"],
                        task.vocab.index[EOS], 0, unk, task.vocab.index[EOS]]
    assert task.model_spec().get("vocab_size") == 7
    batches = task.train_batches(0, LoaderOptions(batch_size=2))
    x, y = next(iter(batches))
    assert task.count((x, y)) == {"samples": 2, "tokens": 4}
    assert [t.tolist() for t in x] == [t.tolist() for t in task.ids["train"][:12].view(2, 6)[:, :2]]
    assert "unigram (add-one) perplexity" in task.notes[0]


def test_task_metrics_and_unigram_baseline(tmp_path):
    root = write_corpus(tmp_path / "corpus")
    task = LanguageModelTask(WikiText2Config(root=str(root), cache_dir=str(tmp_path / "c")))
    counts = torch.bincount(task.ids["train"], minlength=7).double() + 1
    logp = torch.log(counts / counts.sum())
    assert task.unigram["test"] == pytest.approx(math.exp(-logp[task.ids["test"]].mean()))
    nll = torch.full((2, 3), math.log(10.0))
    sums = task.metric_sums(nll, None)
    reduced = task.reduce(sums)
    assert reduced["perplexity"] == pytest.approx(10.0)
    assert reduced["bits_per_token"] == pytest.approx(math.log2(10.0))
    assert task.loss(nll, None).item() == pytest.approx(math.log(10.0))
    final = task.final_metrics([{"test_perplexity": 30.0}, {"test_perplexity": 20.0}])
    assert final["best_test_perplexity"] == 20.0 and "unigram_test_perplexity" in final
    assert task_entry("wikitext103").kind == "language_model"


def test_train_on_valid_and_missing_files(tmp_path):
    root = write_corpus(tmp_path / "two", ("valid", "test"))
    task = LanguageModelTask(WikiText2Config(root=str(root), train_split="valid",
                                              cache_dir=str(tmp_path / "c")))
    assert task.eval_splits == ("test",) and len(task.vocab) == 5  # the cat ran <eos> <unk>
    with pytest.raises(DataNotFoundError, match="train.txt"):
        LanguageModelTask(WikiText2Config(root=str(root), cache_dir=str(tmp_path / "c")))
    with pytest.raises(ValueError, match="train_split"):
        WikiText2Config(train_split="test").check()


def test_shared_wikitext2_copy(shared_data, tmp_path):
    """The local WikiText-2 valid/test files: the standard token counts."""
    task = LanguageModelTask(WikiText2Config(root=str(shared_data / "wikitext-2"),
                                              train_split="valid", cache_dir=str(tmp_path)))
    assert task.ids["valid"].numel() == 217646 and task.ids["test"].numel() == 245569
    assert 500 < task.unigram["test"] < 650


def test_explicit_variant_unrolls_the_same_layer():
    deq = DEQ(solver="anderson", pretrain_depth=3, **TIGHT)
    explicit = tiny_model(deq, explicit=True).eval()
    x, y = tokens(2, 5, 1), tokens(2, 5, 2)
    with torch.no_grad():
        nll, stats = explicit((x, y))
        explicit.reset_state()
        context = explicit.context(x)
        z = context.injection.new_zeros(2, 5, 8)
        for _ in range(3):
            z = explicit.layer(z, context)
    assert stats.pretrain and torch.allclose(nll, explicit.head(z, y))


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
def test_training_step_with_jacobian_penalty_and_pretraining(solver):
    """Every solver runs a training step; the Jacobian penalty and the unrolled pretraining
    reach the layer's parameters; the implicit parameters exclude only the softmax head's."""
    deq = DEQ(solver=solver, grad="upg", k=2, lambda_=0.8, f_max_iter=10, jac_reg=True)
    model = tiny_model(deq, norm="pre", dropout=0.2, cutoffs=(6,)).train()
    x, y = tokens(2, 5, 1), tokens(2, 5, 2)
    for pretrain in (True, False):
        nll, stats = model((x, y), pretrain=pretrain)
        loss = nll.mean() + (stats.jac_loss if stats.jac_loss is not None else 0)
        grads = torch.autograd.grad(loss, model.implicit_parameters(), allow_unused=True)
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert stats.pretrain == pretrain and (stats.jac_loss is None) == pretrain
    head = len(list(model.parameters())) - len(model.implicit_parameters())
    assert head == 1 + 1 + 2  # the two clusters' biases, the cluster logits' weight and bias


@pytest.mark.slow
def test_cli_trains_and_evaluates_on_a_local_corpus(tmp_path):
    """deqrun model=deq_transformer task=wikitext2 task.root=DIR: two steps and a test pass."""
    root = tmp_path / "corpus"
    root.mkdir()
    for split, repeat in (("train", 12), ("valid", 3), ("test", 3)):
        (root / f"{split}.txt").write_text((CORPUS["train"] + CORPUS[split]) * repeat)
    args = ["model=deq_transformer", "task=wikitext2", f"task.root={root}",
            f"task.cache_dir={tmp_path / 'cache'}", "task.tgt_len=8", "model.d_model=16",
            "model.n_head=2", "model.d_head=8", "model.d_inner=32", "model.cutoffs=[]",
            "solver=anderson", "solver.f_max_iter=6", "grad=upg", "k=2", "lambda=0.8",
            "trainer.batch_size=4", "trainer.eval_batch_size=4", "trainer.max_steps=2",
            "trainer.jac_reg_weight=0.5", "trainer.progress=false", "run_name=lm"]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, "-m", "deqrun.cli", *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    content = json.loads((tmp_path / "outputs" / "runs" / "lm" / "metrics.json").read_text())
    final = content["final"]
    assert content["status"] == "completed"
    assert 1 < final["test_perplexity"] < 1000 and final["unigram_test_perplexity"] > 1
    assert final["val_perplexity"] > 1 and final["tokens_per_s"] > final["samples_per_s"] > 0
    assert 0 < final["forward_nstep"] <= 6
