"""One registration per choice: every model and task says here what it is, once.

A model file registers its builder with `@register_model(name, schema=..., tasks=...)`; a task file
its builder with `@register_task(name, schema=..., kind=...)`. config.py derives from these
registries the Hydra schemas, the checks and the "valid choices" messages; the runner builds what
they name. Nothing else keeps a list of models or tasks.

Plugins: a module that registers more models or tasks is imported before the config is composed
when it is named in the environment variable DEQRUN_PLUGINS (comma-separated module names or paths
to .py files) or installed under the entry-point group `deqrun.plugins`. Its YAML files join
Hydra's search path with `hydra.searchpath=[file:///its/configs]` on the command line.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, is_dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from deqrun.errors import ConfigError

PLUGIN_ENV = "DEQRUN_PLUGINS"
PLUGIN_GROUP = "deqrun.plugins"
BUILTIN_MODULES = ("deqrun.models", "deqrun.tasks")


@dataclass(frozen=True)
class ModelEntry:
    """A registered model family.

    build(options, deq, spec) -> DEQModel: options is an instance of `schema`, deq the DEQ layer
    the runner configured, spec the task's ModelSpec (what the model must know about the data).
    `tasks` holds task names or task kinds the model serves.
    """

    name: str
    schema: type
    build: Callable[..., Any]
    tasks: tuple[str, ...]
    description: str


@dataclass(frozen=True)
class TaskEntry:
    """A registered task: build(options) -> Task, options an instance of `schema`.

    `kind` groups tasks that the same models serve (e.g. image_classification);
    `input_objective` says the task defines an input-optimisation problem (grad=jiio serves it).
    """

    name: str
    schema: type
    build: Callable[..., Any]
    kind: str
    input_objective: bool
    description: str


MODELS: dict[str, ModelEntry] = {}
TASKS: dict[str, TaskEntry] = {}


def _check_schema(kind: str, name: str, schema: type) -> None:
    if not is_dataclass(schema):
        raise TypeError(f"{kind} {name!r}: schema must be a dataclass, got {schema!r}")
    default = getattr(schema, "name", None)
    if default != name:
        raise TypeError(f"{kind} {name!r}: its schema's `name` field must default to {name!r}")


def register_model(name: str, *, schema: type, tasks: tuple[str, ...] | list[str],
                   description: str = "") -> Callable:
    """Decorator for a model builder `build(options, deq, spec) -> DEQModel`."""

    def wrap(build: Callable[..., Any]) -> Callable[..., Any]:
        _check_schema("model", name, schema)
        MODELS[name] = ModelEntry(name, schema, build, tuple(tasks), description)
        return build

    return wrap


def register_task(name: str, *, schema: type, kind: str, input_objective: bool = False,
                  description: str = "") -> Callable:
    """Decorator for a task builder `build(options) -> Task` (a Task class works as is)."""

    def wrap(build: Callable[..., Any]) -> Callable[..., Any]:
        _check_schema("task", name, schema)
        TASKS[name] = TaskEntry(name, schema, build, kind, input_objective, description)
        return build

    return wrap


def serves(model: str, task: str) -> bool:
    """Whether the registered model runs the registered task (by task name or kind)."""
    entry, task_entry = MODELS[model], TASKS[task]
    return task_entry.name in entry.tasks or task_entry.kind in entry.tasks


def tasks_of(model: str) -> list[str]:
    return sorted(t for t in TASKS if serves(model, t))


def input_objective_tasks() -> list[str]:
    return sorted(name for name, entry in TASKS.items() if entry.input_objective)


def model_entry(name: str) -> ModelEntry:
    load()
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; valid: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def task_entry(name: str) -> TaskEntry:
    load()
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; valid: {', '.join(sorted(TASKS))}")
    return TASKS[name]


_loaded = False


def load() -> None:
    """Import the built-in families and every plugin (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    for spec in plugin_specs():
        _import_plugin(spec)
    for entry in entry_points(group=PLUGIN_GROUP):
        entry.load()


def plugin_specs() -> list[str]:
    return [s.strip() for s in os.environ.get(PLUGIN_ENV, "").split(",") if s.strip()]


def _import_plugin(spec: str) -> None:
    """Import a plugin given as a module name or a path to a .py file."""
    try:
        if spec.endswith(".py"):
            path = Path(spec).expanduser().resolve()
            module_spec = importlib.util.spec_from_file_location(f"deqrun_plugin_{path.stem}",
                                                                 path)
            if module_spec is None or not path.is_file():
                raise FileNotFoundError(str(path))
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module
            module_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
    except (ImportError, FileNotFoundError) as error:
        raise ConfigError(f"{PLUGIN_ENV}: cannot import plugin {spec!r}: {error}") from None
