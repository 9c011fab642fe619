"""Dataclass schemas for every config group, their registration in Hydra's ConfigStore, and
`resolve`, which turns a composed config into checked, typed objects before any work starts.

Hydra rejects unknown keys and values of the wrong type while composing (each group's YAML file
extends its schema). `resolve` applies the root shorthands `k` and `lambda` and checks ranges and
combinations, raising ConfigError with one readable line.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from deqrun.errors import ConfigError

# Schemas use typing.Optional / List / Dict: OmegaConf reads these annotations at run time.
# ruff: noqa: UP006, UP007, UP045


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# ---- model -------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    name: str = "mdeq"


@dataclass
class MDEQConfig(ModelConfig):
    """MDEQ: `size` picks a preset (tiny/small/large); any field set here overrides it."""

    name: str = "mdeq"
    size: str = "tiny"
    num_branches: Optional[int] = None
    branch_channels: Optional[list[int]] = None
    head_channels: Optional[list[int]] = None
    final_channels: Optional[int] = None
    stem_channels: Optional[int] = None
    downsample_times: Optional[int] = None
    expansion: Optional[int] = None
    num_groups: Optional[int] = None
    dropout: Optional[float] = None
    weight_norm: Optional[bool] = None

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "name"}

    def check(self) -> None:
        from deqrun.models.mdeq import resolve_mdeq_spec

        try:
            resolve_mdeq_spec(**self.options())
        except ValueError as error:
            raise ConfigError(f"model={self.name}: {error}") from None


@dataclass
class PlannedModelConfig(ModelConfig):
    """A model that a later release brings; choosing it says so."""

    name: str = "planned"

    def check(self) -> None:
        """Nothing to check: _check_available refuses it."""


# ---- solver ------------------------------------------------------------------------------------
@dataclass
class SolverConfig:
    name: str = "anderson"
    f_max_iter: int = 30
    f_tol: float = 1e-3
    stop_mode: str = "rel"
    eval_f_max_iter: Optional[int] = None
    eval_f_tol: Optional[float] = None

    def options(self) -> dict[str, Any]:
        """Keyword arguments for deqrun.core.DEQ."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "name"}


@dataclass
class FixedPointConfig(SolverConfig):
    name: str = "fixed_point"
    tau: float = 1.0


@dataclass
class AndersonConfig(SolverConfig):
    name: str = "anderson"
    m: int = 5
    lam: float = 1e-4
    beta: float = 1.0


@dataclass
class BroydenConfig(SolverConfig):
    name: str = "broyden"
    mem: Optional[int] = None


# ---- grad --------------------------------------------------------------------------------------
@dataclass
class GradConfig:
    name: str = "implicit"

    def options(self) -> dict[str, Any]:
        """Keyword arguments for deqrun.core.DEQ."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "name"}


@dataclass
class ImplicitConfig(GradConfig):
    name: str = "implicit"
    b_solver: str = "anderson"
    b_max_iter: int = 40
    b_tol: float = 1e-6
    b_stop_mode: str = "abs"
    b_solver_options: dict[str, Any] = field(default_factory=dict)
    b_warm_start: bool = False


@dataclass
class PhantomConfig(GradConfig):
    """upg and npg: k steps/terms with damping lambda_."""

    name: str = "upg"
    k: int = 5
    lambda_: float = 0.5


@dataclass
class JacobianFreeConfig(GradConfig):
    name: str = "jacobian_free"


@dataclass
class ShineConfig(GradConfig):
    name: str = "shine"
    fallback: bool = True
    fallback_threshold: float = 1.8
    refine: int = 0
    refine_tol: float = 1e-6


@dataclass
class PlannedGradConfig(GradConfig):
    name: str = "planned"

    def options(self) -> dict[str, Any]:
        return {}


# ---- task --------------------------------------------------------------------------------------
@dataclass
class TaskConfig:
    name: str = "digits"


@dataclass
class ImageTaskConfig(TaskConfig):
    """Image classification data: root None means ~/.cache/deqrun/data/<name>."""

    name: str = "digits"
    root: Optional[str] = None
    download: bool = False
    image_size: Optional[int] = None
    augment: bool = False
    subset: Optional[int] = None
    test_as_train: bool = False
    train_dir: str = "train"
    val_dir: str = "val"


# ---- optim, logger, trainer ---------------------------------------------------------------------
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
    grad_clip: Optional[float] = None

    def check(self) -> None:
        _require(self.name in ("adam", "adamw", "sgd"), "optim.name must be adam, adamw or sgd")
        _require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, "optim.weight_decay must be >= 0")
        _require(0 <= self.momentum < 1, "optim.momentum must be in [0, 1)")
        _require(self.schedule in ("cosine", "constant"),
                 "optim.schedule must be cosine or constant")
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
        _require(self.name in ("none", "jsonl", "csv", "wandb"),
                 f"logger.name must be none, jsonl, csv or wandb, got {self.name!r}")
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
    eval_every: int = 1
    checkpoint_every: int = 1
    num_workers: int = 0
    resume: bool = False
    resume_from: Optional[str] = None
    progress: Optional[bool] = None
    threads: Optional[int] = None
    precision_every: int = 0

    def check(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "pretrain_depth", "jac_samples",
                     "eval_every", "checkpoint_every"):
            _require(getattr(self, name) >= 1, f"trainer.{name} must be >= 1")
        for name in ("pretrain_steps", "num_workers", "precision_every"):
            _require(getattr(self, name) >= 0, f"trainer.{name} must be >= 0")
        _require(self.max_steps is None or self.max_steps >= 1, "trainer.max_steps must be >= 1")
        _require(self.jac_reg_weight >= 0, "trainer.jac_reg_weight must be >= 0")
        _require(self.threads is None or self.threads >= 1, "trainer.threads must be >= 1")
        _require(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
                 f"trainer.device must be auto, cpu, cuda[:N] or mps, got {self.device!r}")


SCHEMAS: dict[str, dict[str, type]] = {
    "model": {"mdeq": MDEQConfig, "planned": PlannedModelConfig},
    "solver": {"fixed_point": FixedPointConfig, "anderson": AndersonConfig,
               "broyden": BroydenConfig},
    "grad": {"implicit": ImplicitConfig, "phantom": PhantomConfig,
             "jacobian_free": JacobianFreeConfig, "shine": ShineConfig,
             "planned": PlannedGradConfig},
    "task": {"image": ImageTaskConfig},
    "optim": {"optim": OptimConfig},
    "logger": {"logger": LoggerConfig},
    "trainer": {"trainer": TrainerConfig},
}
AVAILABLE_MODELS = ("mdeq",)
AVAILABLE_GRADS = ("implicit", "upg", "npg", "jacobian_free", "shine")


def register_configs() -> None:
    """Store every schema as `<group>/<name>_schema` for the YAML files to extend."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group, schemas in SCHEMAS.items():
        for name, schema in schemas.items():
            store.store(group=group, name=f"{name}_schema", node=schema)


@dataclass
class RunConfig:
    """A checked, typed run configuration (what train.run receives)."""

    model: ModelConfig
    solver: SolverConfig
    grad: GradConfig
    task: TaskConfig
    optim: OptimConfig
    logger: LoggerConfig
    trainer: TrainerConfig
    run_name: str
    notes: list[str]

    def deq_options(self) -> dict[str, Any]:
        """Keyword arguments for deqrun.core.DEQ."""
        options = dict(solver=self.solver.name, grad=self.grad.name, **self.solver.options(),
                       **self.grad.options())
        options.update(pretrain_depth=self.trainer.pretrain_depth,
                       jac_reg=self.trainer.jac_reg_weight > 0,
                       jac_samples=self.trainer.jac_samples)
        return options


GROUPS = ("model", "solver", "grad", "task", "optim", "logger", "trainer")
GRAD_SCHEMA_OF = {"upg": "phantom", "npg": "phantom", "jiio": "planned"}
MODEL_SCHEMA_OF = {"deq_transformer": "planned", "ignn": "planned", "isiren": "planned",
                   "imfn": "planned"}
TASKS_OF_MODEL = {"mdeq": ("digits", "mnist", "cifar10", "imagenet")}


def resolve(cfg: DictConfig) -> tuple[RunConfig, dict[str, Any]]:
    """Apply the root shorthands, check everything; return the typed config and the resolved dict.

    Raises ConfigError (one line) for any value out of range or combination that makes no sense.
    """
    notes: list[str] = []
    _apply_shorthands(cfg, notes)
    groups = {name: OmegaConf.to_object(cfg[name]) for name in GROUPS}
    run = RunConfig(**groups, run_name=str(cfg.run_name), notes=notes)
    _check_available(run)
    for part in (run.model, run.optim, run.logger, run.trainer):
        part.check()
    _check_deq(run)
    return run, OmegaConf.to_container(cfg, resolve=True)


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


def _check_available(run: RunConfig) -> None:
    if run.model.name not in AVAILABLE_MODELS:
        raise ConfigError(f"model={run.model.name} is not available yet in this version of "
                          f"deqrun; available models: {', '.join(AVAILABLE_MODELS)}")
    if run.grad.name not in AVAILABLE_GRADS:
        raise ConfigError(f"grad={run.grad.name} is not available yet in this version of "
                          f"deqrun; available: {', '.join(AVAILABLE_GRADS)}")
    tasks = TASKS_OF_MODEL[run.model.name]
    _require(run.task.name in tasks, f"model={run.model.name} does not run task="
             f"{run.task.name}; valid tasks for it: {', '.join(tasks)}")


def _check_deq(run: RunConfig) -> None:
    """Build the DEQ layer once so that the core checks every solver and grad option."""
    from deqrun.core import DEQ

    try:
        DEQ(**run.deq_options())
    except ValueError as error:
        raise ConfigError(f"solver={run.solver.name} grad={run.grad.name}: {error}") from None


def config_from_resolved(resolved: dict[str, Any]) -> RunConfig:
    """The typed config of a finished run, from the resolved dict saved in its metrics.json."""
    schema_names = {
        "model": MODEL_SCHEMA_OF.get(resolved["model"]["name"], resolved["model"]["name"]),
        "solver": resolved["solver"]["name"],
        "grad": GRAD_SCHEMA_OF.get(resolved["grad"]["name"], resolved["grad"]["name"]),
        "task": "image", "optim": "optim", "logger": "logger", "trainer": "trainer"}
    groups = {}
    for group, schema in schema_names.items():
        node = OmegaConf.merge(OmegaConf.structured(SCHEMAS[group][schema]), resolved[group])
        groups[group] = OmegaConf.to_object(node)
    return RunConfig(**groups, run_name=str(resolved.get("run_name", "")), notes=[])
