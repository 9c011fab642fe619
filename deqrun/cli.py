"""The `deqrun` command: compose the Hydra config, check it, run training.

A bad value or a missing data set prints one line and exits with status 2 (single runs). In a
sweep (`deqrun -m ...`) a job that fails writes its metrics.json with status "failed" and the
error, the other jobs go on, and the sweep ends with a summary and a non-zero status.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from deqrun.config import register_configs, resolve
from deqrun.errors import Interrupted, UserError
from deqrun.results import write_metrics

PACKAGE_DIR = Path(__file__).resolve().parent
EXIT_USER_ERROR = 2


def config_dir() -> Path:
    """configs/ inside the installed package, or at the top of a source checkout."""
    for candidate in (PACKAGE_DIR / "configs", PACKAGE_DIR.parent / "configs"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"deqrun's configs/ folder is missing next to {PACKAGE_DIR}")


def _job(cfg: DictConfig) -> Any:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        config, resolved = resolve(cfg)
        from deqrun.runner import run  # the data and model stack loads after the config checks

        return run(config, resolved, run_dir)
    except UserError as error:
        write_metrics(run_dir, status="failed", error=str(error))
        print(f"deqrun: error: {error}", file=sys.stderr)
        if not multirun:
            sys.exit(EXIT_USER_ERROR)
    except Interrupted as stop:
        print(f"deqrun: {stop}", file=sys.stderr)
        sys.exit(128 + stop.signum)
    except Exception as error:
        write_metrics(run_dir, status="failed", error=f"{type(error).__name__}: {error}")
        raise
    return None


class SweepSummary(Callback):
    """After a sweep: one line per job with its status; a non-zero exit if any job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        statuses = {}
        for metrics in sorted(sweep_dir.glob("*/metrics.json")):
            statuses[metrics.parent.name] = json.loads(metrics.read_text()).get("status", "?")
        failed = [name for name, status in statuses.items() if status != "completed"]
        print(f"deqrun sweep: {len(statuses) - len(failed)} of {len(statuses)} jobs completed "
              f"in {sweep_dir}", file=sys.stderr)
        for name in failed:
            print(f"  {name}: {statuses[name]}", file=sys.stderr)
        if failed:
            sys.exit(1)


def main() -> None:
    """Console entry point."""
    try:
        register_configs()
    except UserError as error:
        print(f"deqrun: error: {error}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    entry = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
    entry(_job)()


if __name__ == "__main__":
    main()
