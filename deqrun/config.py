"""Config schemas, generated from the registries, and `resolve`, which checks a composed config.

Where each group's options come from (a default is written once):
- solver: one option per registered solver; fields from the solver's keyword options and the DEQ
  layer's common solve options (deqrun.core).
- grad: one option per registered gradient method (its dataclass fields) and `jiio`, the
  input-optimisation mode (deqrun.core.jiio.JIIOOptions).
- model, task: the schemas registered with the model and task builders (deqrun.registry); their
  YAML files in configs/ extend `/_schema/<group>/<name>`.
- optim, logger, trainer: the runner's own dataclasses below.

Hydra rejects unknown keys and wrong types while composing; `resolve` applies the root shorthands
`k` and `lambda`, checks ranges and combinations, and raises ConfigError with one readable line.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf

from deqrun import registry
from deqrun.errors import ConfigError

# Schemas use typing.Optional / List / Dict: OmegaConf reads these annotations at run time.
# ruff: noqa: UP006, UP007, UP035, UP045

GROUPS = ("model", "solver", "grad", "task", "optim", "logger", "trainer")
ROOT_KEYS = {*GROUPS, "k", "lambda", "row", "report", "run_name", "hydra"}
INPUT_OPTIMISATION = "jiio"
SCHEMA_GROUP = "_schema"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# ---- optim, logger, trainer (the runner's own options) ------------------------------------------
@dataclass
class OptimConfig:
    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    milestones: List[int] = field(default_factory=list)
    gamma: float = 0.1
    grad_clip: Optional[float] = None

    def check(self) -> None:
        _require(self.name in ("adam", "adamw", "sgd"), "optim.name must be adam, adamw or sgd")
        _require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, "optim.weight_decay must be >= 0")
        _require(0 <= self.momentum < 1, "optim.momentum must be in [0, 1)")
        _require(self.schedule in ("cosine", "constant", "step"),
                 "optim.schedule must be cosine, constant or step")
        _require(all(m >= 1 for m in self.milestones),
                 f"optim.milestones must be epochs >= 1, got {list(self.milestones)}")
        _require(self.schedule != "step" or len(self.milestones) > 0,
                 "optim.schedule=step needs optim.milestones (epochs after which the rate is "
                 "multiplied by optim.gamma), e.g. optim.milestones=[50] optim.gamma=0.5")
        _require(0 < self.gamma <= 1, f"optim.gamma must be in (0, 1], got {self.gamma}")
        _require(self.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]")
        _require(self.grad_clip is None or self.grad_clip > 0, "optim.grad_clip must be > 0")


@dataclass
class LoggerConfig:
    name: str = "jsonl"
    project: str = "deqrun"
    entity: Optional[str] = None
    mode: str = "auto"
    log_every: int = 1

    def check(self) -> None:
        _require(self.name in ("none", "jsonl", "csv", "wandb", "tensorboard"),
                 f"logger.name must be none, jsonl, csv, wandb or tensorboard, got {self.name!r}")
        _require(self.mode in ("auto", "offline", "online", "disabled"),
                 "logger.mode must be auto, offline, online or disabled")
        _require(self.log_every >= 1, "logger.log_every must be >= 1")


@dataclass
class TrainerConfig:
    device: str = "auto"
    epochs: int = 10
    max_steps: Optional[int] = None
    batch_size: int = 128
    eval_batch_size: int = 256
    seed: int = 0
    deterministic: bool = True
    pretrain_steps: int = 0
    pretrain_depth: int = 4
    jac_reg_weight: float = 0.0
    jac_samples: int = 1
    jac_reg_every: int = 1
    eval_every: int = 1
    checkpoint_every: int = 1
    num_workers: int = 0
    resume: bool = False
    resume_from: Optional[str] = None
    # A new run starting from another run's weights (fine-tuning): a checkpoint file or a run
    # folder (its checkpoints/last.pt). Weights and batch-norm statistics only; the optimiser,
    # schedule and step start anew. Ignored once the run has its own checkpoint to resume.
    init_from: Optional[str] = None
    progress: Optional[bool] = None
    threads: Optional[int] = None
    precision_every: int = 0
    resume_force: bool = False
    overwrite: bool = False
    on_divergence: str = "stop"
    max_skipped_batches: int = 10
    divergence_factor: Optional[float] = 100.0
    # Scale-out (deqrun/runner/distributed.py, precision_policy.py): auto joins torch.distributed
    # when started as several processes (torchrun, SLURM tasks); off always runs one process.
    distributed: str = "auto"
    sync_batchnorm: bool = True
    precision: str = "32"
    tf32: str = "auto"
    cudnn_benchmark: Optional[bool] = None

    def check(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "pretrain_depth", "jac_samples",
                     "jac_reg_every", "eval_every", "checkpoint_every"):
            _require(getattr(self, name) >= 1, f"trainer.{name} must be >= 1")
        for name in ("pretrain_steps", "num_workers", "precision_every"):
            _require(getattr(self, name) >= 0, f"trainer.{name} must be >= 0")
        _require(self.max_steps is None or self.max_steps >= 0,
                 "trainer.max_steps must be >= 0 (0: evaluate only, no training step)")
        _require(self.jac_reg_weight >= 0, "trainer.jac_reg_weight must be >= 0")
        _require(self.threads is None or self.threads >= 1, "trainer.threads must be >= 1")
        _require(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(self.device)) is not None,
                 f"trainer.device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        _require(self.on_divergence in ("stop", "skip_batch"),
                 f"trainer.on_divergence must be stop or skip_batch, got {self.on_divergence!r}")
        _require(self.max_skipped_batches >= 1, "trainer.max_skipped_batches must be >= 1")
        _require(self.divergence_factor is None or self.divergence_factor > 1,
                 "trainer.divergence_factor must be > 1 (or null to turn the check off)")
        _require(not ((self.resume or self.resume_from) and self.overwrite),
                 "trainer.overwrite=true starts the run anew: it excludes trainer.resume=true "
                 "and trainer.resume_from")
        _require(self.distributed in ("auto", "off"),
                 f"trainer.distributed must be auto or off, got {self.distributed!r}")
        _require(str(self.precision) in ("32", "fp32", "bf16", "fp16"),
                 f"trainer.precision must be 32 (or fp32), bf16 or fp16, got {self.precision!r}")
        _require(str(self.tf32).lower() in ("auto", "true", "false"),
                 f"trainer.tf32 must be auto, true or false, got {self.tf32!r}")
        _require(self.precision_every == 0 or str(self.precision) in ("32", "fp32"),
                 "gradient checks (trainer.precision_every > 0) compare with an exact float32 "
                 "gradient: they need trainer.precision=32")


RUNNER_SCHEMAS = {"optim": OptimConfig, "logger": LoggerConfig, "trainer": TrainerConfig}


# ---- schemas generated from the core -------------------------------------------------------------
def _omegaconf_type(annotation: Any) -> Any:
    """A type annotation OmegaConf understands (PEP 604 unions -> Optional, bare containers)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return Optional[_omegaconf_type(args[0])] if len(args) == 1 else Any
    if annotation is dict or origin is dict:
        return typing.Dict[str, Any]
    if annotation is list or origin is list:
        return typing.List[Any]
    return annotation


def _schema(class_name: str, name: str, specs: list[tuple[str, Any, Any]]) -> type:
    """A dataclass with `name` first, then (field, annotation, default) in order."""
    made = [("name", str, field(default=name))]
    for key, annotation, default in specs:
        mutable = isinstance(default, (dict, list))
        value = field(default_factory=lambda d=default: type(d)(d)) if mutable else \
            field(default=default)
        made.append((key, _omegaconf_type(annotation), value))
    return make_dataclass(class_name, made, namespace={"options": _options})


def _options(self: Any) -> dict[str, Any]:
    """The fields other than `name`, as keyword arguments."""
    return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "name"}


def _signature_specs(function: Any, names: list[str] | None = None) -> list[tuple[str, Any, Any]]:
    hints = typing.get_type_hints(function)
    specs = []
    for param in inspect.signature(function).parameters.values():
        if param.default is inspect.Parameter.empty or param.name not in (names or [param.name]):
            continue
        specs.append((param.name, hints.get(param.name, Any), param.default))
    return specs


COMMON_SOLVE_OPTIONS = ["f_max_iter", "f_tol", "stop_mode", "eval_f_max_iter", "eval_f_tol"]


_SCHEMA_CACHE: dict[tuple, type] = {}


def _cached(key: tuple, make: Any) -> type:
    """One schema class per registered object, so configs of one option compare equal."""
    if key not in _SCHEMA_CACHE:
        _SCHEMA_CACHE[key] = make()
    return _SCHEMA_CACHE[key]


def solver_schemas() -> dict[str, type]:
    from deqrun.core import DEQ, SOLVERS, solver_option_names

    common = _signature_specs(DEQ.__init__, COMMON_SOLVE_OPTIONS)
    schemas = {}
    for name, solve in SOLVERS.items():
        own = _signature_specs(solve.__wrapped__, solver_option_names(name))
        schemas[name] = _cached(("solver", name, solve), lambda n=name, o=own: _schema(
            f"{_camel(n)}SolverConfig", n, common + o))
    return schemas


def grad_schemas() -> dict[str, type]:
    from deqrun.core import GRADIENTS
    from deqrun.core.jiio import JIIOOptions

    schemas = {}
    for name, cls in [*GRADIENTS.items(), (INPUT_OPTIMISATION, JIIOOptions)]:
        schemas[name] = _cached(("grad", name, cls), lambda n=name, c=cls: _schema(
            f"{_camel(n)}GradConfig", n, _field_specs(c)))
    return schemas


def _field_specs(cls: type) -> list[tuple[str, Any, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name], _default(f)) for f in fields(cls)]


def _default(f: Any) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def register_configs() -> None:
    """Put every option into Hydra's ConfigStore: solver/<name> and grad/<name> as complete
    options, and the model, task and runner schemas under _schema/ for the YAML files to extend."""
    from hydra.core.config_store import ConfigStore

    registry.load()
    store = ConfigStore.instance()
    for group, schemas in (("solver", solver_schemas()), ("grad", grad_schemas())):
        for name, schema in schemas.items():
            store.store(group=group, name=name, node=schema)
    for name, entry in registry.MODELS.items():
        store.store(group=f"{SCHEMA_GROUP}/model", name=name, node=entry.schema)
    for name, entry in registry.TASKS.items():
        store.store(group=f"{SCHEMA_GROUP}/task", name=name, node=entry.schema)
    for group, schema in RUNNER_SCHEMAS.items():
        store.store(group=f"{SCHEMA_GROUP}/{group}", name="base", node=schema)
    store.store(group="hydra/help", name="deqrun", node=help_config())


# ---- the typed run configuration ---------------------------------------------------------------
@dataclass
class RunConfig:
    """A checked, typed run configuration (what the runner receives)."""

    model: Any
    solver: Any
    grad: Any
    task: Any
    optim: OptimConfig
    logger: LoggerConfig
    trainer: TrainerConfig
    run_name: str
    notes: list[str]

    @property
    def input_optimisation(self) -> bool:
        """grad=jiio: the task's input-optimisation mode; the DEQ trains with implicit."""
        return self.grad.name == INPUT_OPTIMISATION

    def deq_options(self) -> dict[str, Any]:
        """Keyword arguments for deqrun.core.DEQ."""
        grad = ("implicit", {}) if self.input_optimisation else \
            (self.grad.name, self.grad.options())
        options = dict(solver=self.solver.name, grad=grad[0], **self.solver.options(), **grad[1])
        options.update(pretrain_depth=self.trainer.pretrain_depth,
                       jac_reg=self.trainer.jac_reg_weight > 0,
                       jac_samples=self.trainer.jac_samples)
        return options


def resolve(cfg: DictConfig) -> tuple[RunConfig, dict[str, Any]]:
    """Apply the root shorthands, check everything; return the typed config and the resolved dict.

    Raises ConfigError (one line) for any value out of range or combination that makes no sense.
    """
    registry.load()
    _check_root_keys(cfg)
    notes: list[str] = []
    _apply_shorthands(cfg, notes)
    groups = {name: OmegaConf.to_object(cfg[name]) for name in GROUPS}
    run = RunConfig(**groups, run_name=check_run_name(cfg.run_name), notes=notes)
    _check_choices(run)
    for group in ("model", "task", "optim", "logger", "trainer"):
        _check_part(group, getattr(run, group))
    _check_deq(run)
    return run, OmegaConf.to_container(cfg, resolve=True)


def check_run_name(name: Any) -> str:
    """A run name as given, if it is a plain folder name; else ConfigError."""
    _require(isinstance(name, str), f"run_name must be a string (a folder name), got {name!r}; "
             "quote it: run_name=\"'...'\"")
    _require(name.strip() != "", "run_name must not be empty")
    _require(name not in (".", "..") and not re.search(r"[/\\\x00-\x1f]", name),
             f"run_name={name!r} must be a plain folder name (no '/', '\\', '.' or '..')")
    return name


def _check_root_keys(cfg: DictConfig) -> None:
    for key in cfg:
        _require(key in ROOT_KEYS, f"{key!r} is not a config group or root option of deqrun; "
                 f"groups: {', '.join(GROUPS)} (plus experiment, table, launcher)")


def _apply_shorthands(cfg: DictConfig, notes: list[str]) -> None:
    """Root `k` and `lambda` set grad.k and grad.lambda_ where the grad method has them."""
    for short, target in (("k", "k"), ("lambda", "lambda_")):
        value = cfg.get(short)
        if value is None:
            continue
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        _require(numeric and (short != "k" or isinstance(value, int)),
                 f"{short} must be {'an integer' if short == 'k' else 'a number'}, got {value!r}")
        if target in cfg.grad:
            cfg.grad[target] = value
        else:
            notes.append(f"{short}={value} ignored: grad={cfg.grad.name} has no {target}")


def _check_choices(run: RunConfig) -> None:
    """The model serves the task; grad=jiio only on tasks with an input objective."""
    model, task = run.model.name, run.task.name
    _require(model in registry.MODELS, f"unknown model {model!r}; valid: "
             f"{', '.join(sorted(registry.MODELS))}")
    _require(task in registry.TASKS, f"unknown task {task!r}; valid: "
             f"{', '.join(sorted(registry.TASKS))}")
    _require(registry.serves(model, task), f"model={model} does not run task={task}; valid "
             f"tasks for it: {', '.join(registry.tasks_of(model))}")
    if run.input_optimisation:
        accepting = registry.input_objective_tasks()
        _require(task in accepting, f"grad={INPUT_OPTIMISATION} needs a task with an input "
                 f"objective; task={task} has none; tasks that accept it: "
                 f"{', '.join(accepting) or 'none in this version'}")
    needs_grad = getattr(run.task, "check_grad", None)  # a task option that needs a grad choice
    if needs_grad is not None:
        try:
            needs_grad(run.grad.name)
        except ValueError as error:
            raise ConfigError(f"task={task}: {error}") from None


def _check_part(group: str, part: Any) -> None:
    check = getattr(part, "check", None)
    if check is None:
        return
    try:
        check()
    except ValueError as error:
        name = getattr(part, "name", group)
        raise ConfigError(f"{group}={name}: {error}") from None


def _check_deq(run: RunConfig) -> None:
    """Build the DEQ layer once so that the core checks every solver and grad option."""
    from deqrun.core import DEQ

    solver = run.solver
    try:
        for key, low in (("eval_f_max_iter", 1), ("eval_f_tol", 0)):
            value = getattr(solver, key, None)
            if value is not None and not (value >= low if key.endswith("iter") else value > 0):
                raise ValueError(f"solver.{key} must be {'>= 1' if low else '> 0'} or null, "
                                 f"got {value}")
        DEQ(**run.deq_options())
    except ValueError as error:
        raise ConfigError(f"solver={run.solver.name} grad={run.grad.name}: {error}") from None


def _schema_of(group: str, name: str) -> type:
    if group == "solver":
        return solver_schemas()[name]
    if group == "grad":
        return grad_schemas()[name]
    if group in ("model", "task"):
        entry = registry.model_entry(name) if group == "model" else registry.task_entry(name)
        return entry.schema
    return RUNNER_SCHEMAS[group]


def config_from_resolved(resolved: dict[str, Any]) -> RunConfig:
    """The typed config of a finished run, from the resolved dict saved in its metrics.json."""
    registry.load()
    groups = {}
    for group in GROUPS:
        schema = _schema_of(group, resolved[group].get("name", group))
        node = OmegaConf.merge(OmegaConf.structured(schema), resolved[group])
        groups[group] = OmegaConf.to_object(node)
    return RunConfig(**groups, run_name=str(resolved.get("run_name", "")), notes=[])


# ---- --help --------------------------------------------------------------------------------------
def help_config() -> dict[str, Any]:
    """`deqrun --help`: the groups and their options, from the registries."""
    from deqrun.core import GRADIENTS, SOLVERS

    lines = ["deqrun: train and measure deep equilibrium models.", "",
             "Usage: deqrun [group=option ...] [group.key=value ...] [-m for sweeps]",
             "       deqrun --cfg job [overrides]   prints the composed config", "",
             "== Config groups (group=option) =="]
    for name, entry in sorted(registry.MODELS.items()):
        lines.append(f"model={name}: {entry.description} (tasks: "
                     f"{', '.join(registry.tasks_of(name))})")
    for name, entry in sorted(registry.TASKS.items()):
        lines.append(f"task={name}: {entry.description}")
    lines.append(f"solver: {', '.join(sorted(SOLVERS))}")
    lines.append(f"grad: {', '.join(sorted(GRADIENTS))}, {INPUT_OPTIMISATION} (input "
                 f"optimisation; tasks: {', '.join(registry.input_objective_tasks()) or 'none'})")
    lines += ["optim: adam, sgd   logger: none, jsonl, csv, wandb, tensorboard   trainer: default",
              "launcher: joblib, slurm   experiment, table: paper-table presets (see README)", "",
              "== Config ==", "$CONFIG", "",
              "Hydra's own options: deqrun --hydra-help"]
    template = "\n".join(line.replace("$", "$$") if line != "$CONFIG" else line
                         for line in lines)
    return {"app_name": "deqrun", "header": "", "footer": "", "template": template}
