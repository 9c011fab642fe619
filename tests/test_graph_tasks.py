"""Graph tasks: loaders on the shared copies and on made-up PPI files, folds, metrics, selection."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deqrun.core import DEQ
from deqrun.data.graphs import make_chains
from deqrun.errors import DataNotFoundError
from deqrun.models.ignn import IGNNConfig, build_ignn
from deqrun.tasks.base import LoaderOptions
from deqrun.tasks.graph import (
    ChainsConfig,
    PlanetoidConfig,
    PPIConfig,
    TUConfig,
    build_chains,
    build_planetoid,
    build_ppi,
    build_tu,
    fold_indices,
    selection_metrics,
)


@pytest.fixture(autouse=True)
def scratch(tmp_path, monkeypatch):
    monkeypatch.setenv("DEQRUN_GRAPH_SCRATCH", str(tmp_path / "scratch"))
    return tmp_path / "scratch"


def test_folds_are_stratified_disjoint_and_cover_everything():
    labels = np.array([0] * 70 + [1] * 30)
    seen = []
    for fold in range(10):
        parts = fold_indices(labels, 10, fold, seed=0, val_fold=True)
        everything = np.concatenate([parts["train"], parts["val"], parts["test"]])
        assert sorted(everything.tolist()) == list(range(100))
        assert labels[parts["test"]].sum() == 3 and len(parts["test"]) == 10
        seen.append(parts["test"])
    assert sorted(np.concatenate(seen).tolist()) == list(range(100))
    assert len(fold_indices(labels, 10, 0, 0, val_fold=False)["train"]) == 90


def test_selection_metrics_pick_the_validation_epoch_and_the_max():
    history = [{"epoch": 1, "val_accuracy": 0.5, "val_loss": 1.0, "test_accuracy": 0.9},
               {"epoch": 2, "val_accuracy": 0.8, "val_loss": 0.7, "test_accuracy": 0.6},
               {"epoch": 3, "val_accuracy": 0.8, "val_loss": 0.5, "test_accuracy": 0.7}]
    out = selection_metrics(history, "accuracy")
    assert out["test_accuracy_val_selected"] == 0.7 and out["epoch_val_selected"] == 3
    assert out["test_accuracy_max_over_epochs"] == 0.9


def test_tu_on_the_shared_cox2(shared_data, scratch):
    task = build_tu(TUConfig(dataset="COX2", root=str(shared_data / "TUDataset"), fold=3))
    assert task.eval_splits == ("val", "test")
    sizes = {k: len(v) for k, v in task.splits.items()}
    assert sum(sizes.values()) == 467 and sizes["test"] in (46, 47)
    assert task.model_spec().out_features == 2 and task.num_features == 35
    assert (scratch / next(p.name for p in scratch.iterdir()) / "COX2" / "processed").is_dir()
    assert not (shared_data / "TUDataset" / "COX2" / "processed").exists()  # read-only copy
    batches = task.train_batches(0, LoaderOptions(batch_size=64, seed=1))
    assert len(batches) == -(-sizes["train"] // 64)
    again = task.train_batches(0, LoaderOptions(batch_size=64, seed=1))
    assert torch.equal(batches[0].graph.y, again[0].graph.y)
    lam = batches[0].graph.lambda_pf
    assert lam.shape == (64,) and torch.allclose(lam, torch.ones(64), atol=1e-3)
    model = build_ignn(IGNNConfig(size="tiny"), DEQ(solver="fixed_point", grad="upg",
                                                    f_max_iter=30, f_tol=1e-4), task.model_spec())
    out, stats = model(task.model_input(batches[0]))
    assert out.shape == (64, 2) and stats.residual.shape == (64,)
    sums = task.metric_sums(out, batches[0])
    assert sums["count"] == 64 and 0 <= task.reduce(sums)["accuracy"] <= 1


def test_planetoid_on_the_shared_cora(shared_data):
    task = build_planetoid(PlanetoidConfig(dataset="Cora", root=str(shared_data / "Planetoid")))
    batches = task.train_batches(0, LoaderOptions(batch_size=1))
    assert len(batches) == 20  # task.steps_per_epoch full-batch steps
    batch = batches[0]
    assert int(batch.mask.sum()) == 140 and batch.graph.num_nodes == 2708
    assert [int(task.eval_batches(s, LoaderOptions(1))[0].mask.sum()) for s in ("val", "test")] \
        == [500, 1000]
    assert task.model_spec().out_features == 7 and task.count(batch)["samples"] == 140


def test_missing_data_is_one_line_naming_task_root(tmp_path):
    with pytest.raises(DataNotFoundError, match="task.root") as info:
        build_tu(TUConfig(dataset="COX2", root=str(tmp_path / "none"), download=False))
    assert "\n" not in str(info.value)
    with pytest.raises(DataNotFoundError, match="task.root"):
        build_planetoid(PlanetoidConfig(root=str(tmp_path / "none"), download=False))
    with pytest.raises(DataNotFoundError, match="task.root"):
        build_ppi(PPIConfig(root=str(tmp_path / "none"), download=False))


def write_ppi(raw, graphs_per_split=2, nodes=6, features=5, labels=4, seed=0):
    """Made-up files in the PPI layout: {split}_graph.json (node-link), feats, graph_id, labels."""
    rng = np.random.default_rng(seed)
    raw.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        n = graphs_per_split * nodes
        links = [{"source": g * nodes + i, "target": g * nodes + i + 1}
                 for g in range(graphs_per_split) for i in range(nodes - 1)]
        graph = {"directed": False, "multigraph": False, "graph": {},
                 "nodes": [{"id": i} for i in range(n)], "links": links}
        (raw / f"{split}_graph.json").write_text(json.dumps(graph))
        np.save(raw / f"{split}_feats.npy", rng.normal(size=(n, features)).astype(np.float32))
        np.save(raw / f"{split}_graph_id.npy", np.repeat(np.arange(graphs_per_split) + 1, nodes))
        np.save(raw / f"{split}_labels.npy", rng.integers(0, 2, size=(n, labels)))


def test_ppi_on_made_up_files(tmp_path):
    write_ppi(tmp_path / "PPI" / "raw")
    task = build_ppi(PPIConfig(root=str(tmp_path / "PPI"), download=False))
    assert {k: len(v) for k, v in task.splits.items()} == {"train": 2, "val": 2, "test": 2}
    spec = task.model_spec()
    assert (spec.out_features, task.num_features) == (4, 5) and spec.get("multilabel")
    (batch,) = task.eval_batches("test", LoaderOptions(batch_size=2))
    assert batch.graph.num_graphs == 2 and batch.graph.num_nodes == 12
    y = batch.graph.y
    perfect = task.reduce(task.metric_sums(10 * (2 * y - 1), batch))
    assert perfect["micro_f1"] == 1.0
    model = build_ignn(IGNNConfig(size="tiny", head="linear"),
                       DEQ(solver="fixed_point", grad="implicit", f_max_iter=30), spec)
    out, stats = model(task.model_input(batch))
    assert out.shape == (12, 4) and stats.residual.shape == (2,)
    task.loss(out, batch).backward()


def test_chains_put_the_label_only_at_the_head():
    data = make_chains(length=5, chains_per_class=3, features=8, train=6, val=9, test=15)
    assert data.num_nodes == 30 and data.x.abs().sum() == 6
    heads = data.x[:, :2].nonzero()
    assert torch.equal(data.y[heads[:, 0]], heads[:, 1])
    assert data.edge_index.shape[1] == 6 * 4 + 30  # chain edges plus self-loops (sym)
    masks = [data.train_mask, data.val_mask, data.test_mask]
    assert [int(m.sum()) for m in masks] == [6, 9, 15]
    assert int(sum(m.long() for m in masks).max()) == 1  # disjoint
    task = build_chains(ChainsConfig(length=4, chains_per_class=10, train=10, val=20, test=40))
    assert task.count(task.train_batches(0, LoaderOptions(1))[0])["samples"] == 10
    with pytest.raises(ValueError, match="node count"):
        ChainsConfig(length=2, chains_per_class=2).check()


@pytest.mark.slow
def test_cli_trains_ignn_on_chains_and_reports_both_selections(tmp_path):
    from test_cli import deqrun, metrics

    result = deqrun(["model=ignn", "task=chains", "task.steps_per_epoch=3", "trainer.epochs=2",
                     "trainer.threads=1", "solver=fixed_point", "solver.f_max_iter=40",
                     "grad=implicit", "run_name=chains"], tmp_path)
    assert result.returncode == 0, result.stderr
    content = metrics(tmp_path / "outputs" / "runs" / "chains")
    assert content["status"] == "completed" and content["parameters"] == 16 * 16 + 16 * 100 + 16 * 2
    final = content["final"]
    for key in ("test_accuracy_val_selected", "test_accuracy_max_over_epochs", "val_accuracy",
                "forward_nstep", "saved_bytes"):
        assert key in final, key
    assert len(content["history"]) == 2
