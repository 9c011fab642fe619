"""Table presets (configs/table/) and paper-table rows (configs/experiment/) compose as intended."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from deqrun.cli import config_dir
from deqrun.config import register_configs, resolve

CONFIGS = config_dir()
EXPERIMENTS = sorted(str(p.relative_to(CONFIGS / "experiment").with_suffix(""))
                     for p in (CONFIGS / "experiment").rglob("*.yaml"))
TABLES = sorted(p.stem for p in (CONFIGS / "table").glob("*.yaml"))
PHANTOM_EXPERIMENTS = [e for e in EXPERIMENTS if e.startswith("phantom/")]
PHANTOM_TABLES = [t for t in TABLES if t.startswith("phantom_")]
PHANTOM_RECIPE = dict(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="cosine")


def composed(*overrides: str, hydra: bool = False):
    return composed_many([list(overrides)], hydra=hydra)[0]


def composed_many(override_lists: list[list[str]], hydra: bool = False) -> list:
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return [compose("config", overrides=overrides, return_hydra_config=hydra)
                for overrides in override_lists]


def sweep_values(table: str, key: str) -> list[str]:
    params = composed(f"table={table}", hydra=True).hydra.sweeper.params
    return str(params[key]).split(",")


def table_jobs(table: str) -> list[tuple]:
    """(experiment, typed config, resolved dict) of every job the table's sweep launches."""
    jobs = [(experiment, seed) for experiment in sweep_values(table, "experiment")
            for seed in sweep_values(table, "trainer.seed")]
    configs = composed_many([[f"table={table}", f"experiment={experiment}", f"trainer.seed={seed}"]
                             for experiment, seed in jobs])
    return [(experiment, *resolve(cfg)) for (experiment, _), cfg in zip(jobs, configs)]


def test_the_phantom_rows_and_tables_exist():
    assert PHANTOM_EXPERIMENTS == ["phantom/implicit", "phantom/jacobian_free", "phantom/npg",
                           "phantom/shine", "phantom/upg"]
    assert PHANTOM_TABLES == ["phantom_paper", "phantom_smoke"]


@pytest.mark.parametrize("experiment", PHANTOM_EXPERIMENTS)
def test_every_experiment_composes_and_resolves_with_a_row(experiment):
    run, resolved = resolve(composed(f"experiment={experiment}"))
    assert resolved["row"]["id"] == experiment.split("/")[-1]
    assert resolved["row"]["label"]
    assert resolved["row"]["id"].startswith(run.grad.name)


@pytest.mark.parametrize("table", PHANTOM_TABLES)
def test_tables_are_multiruns_of_rows_and_seeds_matching_their_report_metadata(table):
    cfg = composed(f"table={table}", hydra=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweep.dir.startswith(f"outputs/tables/{table.replace('_', '-')}/")
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${row.id}-seed${trainer.seed}"
    rows = [e.split("/")[-1] for e in sweep_values(table, "experiment")]
    assert rows == list(cfg.report.rows)
    assert [int(s) for s in sweep_values(table, "trainer.seed")] == list(cfg.report.seeds)
    assert cfg.report.baseline == "implicit" and cfg.report.name == "phantom"


def test_paper_table_has_the_papers_settings():
    jobs = {experiment: (run, resolved) for experiment, run, resolved in table_jobs("phantom_paper")
            if resolved["trainer"]["seed"] == 0}
    assert sorted(jobs) == ["phantom/implicit", "phantom/upg"]
    assert sweep_values("phantom_paper", "trainer.seed") == ["0", "1", "2"]
    for run, _ in jobs.values():
        assert (run.model.name, run.model.size, run.task.name, run.task.augment) == (
            "mdeq", "large", "cifar10", True)
        trainer = run.trainer
        assert (trainer.epochs, trainer.batch_size, trainer.device) == (220, 128, "cuda")
        assert (run.solver.name, run.solver.f_max_iter) == ("broyden", 18)
    upg, _ = jobs["phantom/upg"]
    assert (upg.grad.name, upg.grad.k, upg.grad.lambda_) == ("upg", 5, 0.5)
    assert {k: getattr(upg.optim, k) for k in PHANTOM_RECIPE} == PHANTOM_RECIPE
    assert upg.trainer.pretrain_steps == 0 and upg.model.dropout == 0.0
    implicit, _ = jobs["phantom/implicit"]
    assert implicit.grad.name == "implicit" and implicit.grad.b_max_iter == 20
    assert (implicit.optim.name, implicit.optim.lr, implicit.optim.schedule) == (
        "adam", 1e-3, "cosine")
    assert implicit.trainer.pretrain_steps == 20000 and implicit.model.dropout is None


def test_smoke_table_runs_every_row_with_one_recipe_on_cpu():
    jobs = table_jobs("phantom_smoke")
    assert len(jobs) == 10
    grads = {run.grad.name for _, run, _ in jobs}
    assert grads == {"implicit", "upg", "npg", "shine", "jacobian_free"}
    for _, run, resolved in jobs:
        assert (run.model.size, run.model.dropout, run.task.name) == ("tiny", None, "digits")
        assert {k: getattr(run.optim, k) for k in PHANTOM_RECIPE} == PHANTOM_RECIPE
        assert run.trainer.pretrain_steps == 0
        assert (run.trainer.device, run.trainer.threads) == ("cpu", 1)
        assert (run.solver.name, run.solver.f_max_iter) == ("broyden", 15)
        assert run.trainer.epochs == 10 and run.trainer.batch_size == 128
        assert resolved["report"]["scale"] == "smoke"
    recipes = {str(resolved["optim"]) + str(resolved["trainer"]) for _, _, resolved in jobs
               if resolved["trainer"]["seed"] == 0}
    assert len(recipes) == 1


def test_command_line_overrides_still_win_over_a_table():
    cfg = composed("table=phantom_smoke", "experiment=phantom/upg", "trainer.epochs=1", "k=3")
    run, resolved = resolve(cfg)
    assert run.trainer.epochs == 1 and run.grad.k == 3


def test_without_experiment_or_table_nothing_changes():
    cfg = composed()
    assert cfg.row is None and cfg.report is None
    assert cfg.grad.name == "upg" and cfg.optim.name == "adam"


@pytest.mark.parametrize("table", ["ignn_smoke", "ignn_paper"])
def test_ignn_tables_sweep_folds_datasets_and_rows(table):
    cfg = composed(f"table={table}", hydra=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == (
        "${task.dataset}-${row.id}-fold${task.fold}")
    rows = [e.split("/")[-1] for e in sweep_values(table, "experiment")]
    assert rows == list(cfg.report.rows) == ["implicit", "upg", "upg_lambda1"]
    assert sweep_values(table, "task.fold") == [str(f) for f in cfg.report.seeds]
    assert sweep_values(table, "task.dataset") == list(cfg.report.groups) == ["COX2", "PROTEINS"]
    assert (list(cfg.report.group_by), cfg.report.replicate_key) == (["task.dataset"], "task.fold")
    assert list(cfg.report.metrics) == ["test_accuracy_val_selected",
                                        "test_accuracy_max_over_epochs"]
    configs = composed_many([[f"table={table}", f"experiment=ignn/{row}", "task.fold=3"]
                             for row in rows])
    grads = []
    for cfg in configs:
        run, _ = resolve(cfg)
        assert (run.model.name, run.task.name, run.task.fold) == ("ignn", "tu", 3)
        assert (run.solver.name, run.solver.f_max_iter, run.solver.f_tol) == (
            "fixed_point", 300, 3e-6)
        assert (run.optim.lr, run.trainer.batch_size, run.optim.schedule) == (  # COX2
            (1e-3, 128, "step") if table == "ignn_paper" else (1e-2, 64, "step"))
        if table == "ignn_paper":  # the reference: 200 epochs, the rate halved from epoch 51 on
            assert (run.trainer.epochs, list(run.optim.milestones)) == (200, [50])
        assert run.optim.gamma == 0.5 and (run.model.direct_injection, run.model.bias) == (
            False, False)
        grads.append((run.grad.name, getattr(run.grad, "lambda_", None)))
    assert grads == [("implicit", None), ("upg", 0.5), ("upg", 1.0)]
    if table == "ignn_smoke":  # the smoke table's batch is per data set
        proteins, _ = resolve(composed(f"table={table}", "task.dataset=PROTEINS"))
        assert (proteins.trainer.batch_size, proteins.trainer.epochs) == (32, 15)
