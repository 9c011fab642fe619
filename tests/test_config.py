"""Composition of every config option, schema checks, shorthands, launchers."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from deqrun import registry
from deqrun.cli import config_dir
from deqrun.config import config_from_resolved, register_configs, resolve
from deqrun.core import GRADIENTS, SOLVERS
from deqrun.errors import ConfigError

CONFIGS = config_dir()


def yaml_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def options(group: str) -> list[str]:
    """A group's options as Hydra lists them (YAML files and ConfigStore entries)."""
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return sorted(GlobalHydra.instance().config_loader().get_group_options(group))


def composed(*overrides: str, hydra: bool = False):
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def test_every_group_lists_exactly_its_registered_options():
    registry.load()
    assert options("model") == sorted(registry.MODELS) == yaml_options("model")
    assert options("task") == sorted(registry.TASKS) == yaml_options("task")
    assert options("solver") == sorted(SOLVERS)
    assert options("grad") == sorted([*GRADIENTS, "jiio"])
    assert options("logger") == ["csv", "jsonl", "none", "tensorboard", "wandb"]
    for group in ("model", "task", "solver", "grad", "optim", "logger", "trainer"):
        assert not [o for o in options(group) if "schema" in o]


def test_solver_and_grad_defaults_come_from_the_core():
    cfg = composed("solver=anderson", "grad=implicit")
    assert (cfg.solver.m, cfg.solver.lam, cfg.solver.f_max_iter) == (5, 1e-4, 30)
    assert (cfg.grad.b_max_iter, cfg.grad.b_tol, cfg.grad.b_solver) == (40, 1e-6, "anderson")


@pytest.mark.parametrize("override", ["task=image_schema", "model=mdeq_schema", "paper=phantom",
                                      "solver=anderson_schema"])
def test_internal_entries_and_non_groups_are_refused(override):
    with pytest.raises((ConfigCompositionException, ConfigError)):
        resolve(composed(override))


def test_resolved_config_round_trips():
    run, resolved = resolve(composed("grad=implicit", "solver=anderson", "task=mnist"))
    again = config_from_resolved(resolved)
    assert again.grad == run.grad and again.solver == run.solver and again.task == run.task


def _model_serving(task: str) -> str:
    """The first registered model (default mdeq first) that runs the task."""
    names = ["mdeq", *sorted(m for m in registry.MODELS if m != "mdeq")]
    return next(m for m in names if registry.serves(m, task))


@pytest.mark.parametrize("group", ["solver", "grad", "task", "optim", "logger", "trainer", "model"])
def test_every_option_composes_and_resolves(group):
    for option in options(group):
        overrides = [f"{group}={option}"]
        if option == "shine":
            overrides.append("solver=broyden")
        if option == "jiio":
            continue  # needs a task with an input objective: see the refusal test
        if group == "model":
            overrides.append(f"task={registry.tasks_of(option)[0]}")
        if group == "task":
            overrides.append(f"model={_model_serving(option)}")
        if "task=adversarial" in overrides or (group, option) == ("task", "adversarial"):
            overrides.append("grad=jiio")  # its default training attack is JIIO's joint solve
        cfg = composed(*overrides)
        assert group == "trainer" or cfg[group].name == option
        run, resolved = resolve(cfg)
        assert getattr(run, group).__class__.__name__.endswith("Config")
        assert resolved[group] == dict(cfg[group])


@pytest.mark.parametrize("size", ["tiny", "small", "large"])
def test_mdeq_sizes_resolve(size):
    run, _ = resolve(composed(f"model.size={size}"))
    assert run.model.size == size


def test_root_shorthands_feed_the_grad_group():
    run, resolved = resolve(composed("model=mdeq", "grad=upg", "k=5", "lambda=0.5"))
    assert (run.grad.k, run.grad.lambda_) == (5, 0.5)
    assert resolved["grad"] == {"name": "upg", "k": 5, "lambda_": 0.5}
    run, _ = resolve(composed("grad=npg", "k=3", "lambda=1"))
    assert (run.grad.name, run.grad.k, run.grad.lambda_) == ("npg", 3, 1)


def test_shorthand_is_noted_not_applied_for_grads_without_it():
    run, _ = resolve(composed("grad=implicit", "k=3"))
    assert run.notes == ["k=3 ignored: grad=implicit has no k"]


@pytest.mark.parametrize("overrides,match", [
    (["grad=upg", "k=-1"], "k must be >= 1"),
    (["lambda=1.5"], "lambda_ must be in"),
    (["k=2.5"], "k must be an integer"),
    (["lambda=abc"], "lambda must be a number"),
    (["grad=shine", "solver=anderson"], "needs solver=broyden"),
    (["solver=fixed_point", "solver.tau=0"], "tau must be in"),
    (["solver.f_max_iter=0"], "f_max_iter"),
    (["grad=implicit", "grad.b_solver=newton"], "b_solver must be one of"),
    (["grad=implicit", "+grad.b_solver_options.mm=2"], "unknown option 'mm'"),
    (["model.size=huge"], "huge"),
    (["model.branch_channels=[8,8,8]"], "branch_channels"),
    (["optim.lr=-1"], "optim.lr"),
    (["trainer.epochs=0"], "trainer.epochs"),
    (["trainer.device=tpu"], "trainer.device"),
    (["grad=jiio", "task=digits"], "grad=jiio needs a task with an input objective"),
])
def test_out_of_range_values_fail_with_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match) as error:
        resolve(composed(*overrides))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("override", [
    "solver.f_tol=abc", "typo_key=1", "grad.typo=1", "trainer.epochs=many", "model.size=[1]",
    "solver=anderson solver.mem=3",
])
def test_schema_rejects_wrong_types_and_unknown_keys(override):
    with pytest.raises((ConfigCompositionException, ValidationError, ConfigKeyError)):
        composed(*override.split())


def test_launcher_presets_compose():
    slurm = composed("launcher=slurm", hydra=True)
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher")
    assert slurm.hydra.launcher.gpus_per_node == 1 and slurm.trainer.device == "cuda"
    joblib = composed("launcher=joblib", hydra=True)
    assert joblib.hydra.launcher._target_.endswith("JoblibLauncher")
    plain = composed(hydra=True)
    assert plain.hydra.launcher._target_.endswith("BasicLauncher")


def test_default_experiment_is_mdeq_tiny_digits_upg():
    run, _ = resolve(composed())
    assert (run.model.name, run.model.size, run.task.name, run.grad.name) == (
        "mdeq", "tiny", "digits", "upg")
    assert run.solver.name == "broyden"


def test_every_recipe_names_a_model_and_task_pair_and_composes():
    recipes = yaml_options("recipe")
    assert recipes, "configs/recipe/ is empty"
    models, tasks = options("model"), options("task")
    for recipe in recipes:
        pairs = [(m, recipe[len(m) + 1:]) for m in models if recipe.startswith(m + "_")]
        pairs = [(m, t) for m, t in pairs if t in tasks]
        assert pairs, f"recipe/{recipe}.yaml matches no model_task pair (it would never apply)"
        model, task = pairs[0]
        jiio = ["grad=jiio"] if task == "adversarial" else []  # its default training attack
        resolve(composed(f"model={model}", f"task={task}", *jiio))


def test_recipe_applies_to_the_bare_pair_and_yields_to_everything_else():
    bare = composed("model=deq_transformer", "task=wikitext2")
    assert bare.trainer.epochs == 3 and bare.trainer.batch_size == 32
    assert bare.solver.f_max_iter == 15 and bare.optim.lr == pytest.approx(2e-3)
    other = composed("model=deq_transformer", "task=wikitext103")  # no recipe for this pair
    root = composed()
    assert other.trainer.epochs == root.trainer.epochs
    cli = composed("model=deq_transformer", "task=wikitext2", "trainer.epochs=7", "solver=anderson",
                   "solver.f_max_iter=9")
    assert cli.trainer.epochs == 7 and cli.solver.name == "anderson" and cli.solver.f_max_iter == 9
    assert cli.trainer.batch_size == 32  # the recipe's other values stay
    row = composed("experiment=lm/upg", "table=lm_smoke")
    assert row.trainer.epochs == 2 and row.solver.f_max_iter == 12


def test_the_jiio_training_attack_without_grad_jiio_is_refused_before_the_run():
    with pytest.raises(ConfigError, match="task.train_attack=jiio needs grad=jiio"):
        resolve(composed("task=adversarial", "grad=upg"))
    resolve(composed("task=adversarial", "grad=upg", "task.train_attack=none"))
    resolve(composed("task=adversarial", "grad=jiio"))
