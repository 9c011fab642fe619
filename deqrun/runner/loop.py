"""The training loop, readable top to bottom: run -> epochs -> steps, evaluation, checkpoints.

The loop knows a task only through deqrun.tasks.base.Task (batches, loss, metric sums and their
reduction, the headline metric's name) and a model through deqrun.models.base.DEQModel.
Every step is timed (forward, backward), measured (solver steps and residual, bytes saved for
backward, peak memory) and logged; every epoch is evaluated, checkpointed and written to
metrics.json. SIGINT/SIGTERM stop the run at the next safe point with a checkpoint, so
`trainer.resume=true` continues exactly where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from deqrun.config import RunConfig
from deqrun.errors import Interrupted
from deqrun.gradcheck import cosine, exact_method, parameter_gradients, rng_state
from deqrun.loggers import Logger, build_logger
from deqrun.measure import SavedTensorMeter, Timer, peak_memory_bytes, reset_peak_memory
from deqrun.models.base import DEQModel
from deqrun.results import write_metrics
from deqrun.runner.build import (
    build_optimizer,
    build_scheduler,
    build_task_and_model,
    count_parameters,
    environment,
    loader_options,
    logger_options,
    seed_everything,
    select_device,
)
from deqrun.runner.checkpoint import load_checkpoint, save_checkpoint
from deqrun.runner.progress import Progress, add
from deqrun.runner.signals import StopSignals
from deqrun.tasks.base import Task, skip

log = logging.getLogger("deqrun")


@dataclass
class Training:
    """Everything one run works with, by name."""

    config: RunConfig
    task: Task
    model: DEQModel
    optimizer: torch.optim.Optimizer
    scheduler: Any
    device: torch.device
    run_dir: Path
    total_steps: int
    progress: Progress = field(default_factory=Progress)
    logger: Logger | None = None
    stop: StopSignals | None = None
    warmed: bool = False

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    @property
    def finished(self) -> bool:
        p = self.progress
        return p.epoch >= self.config.trainer.epochs or p.step >= self.total_steps

    def show_progress(self) -> bool | None:
        """tqdm's `disable`: None = only on a terminal."""
        chosen = self.config.trainer.progress
        return None if chosen is None else not chosen


def run(config: RunConfig, resolved: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Train and evaluate as configured; return the final metrics (also in metrics.json)."""
    t = prepare(config, run_dir)
    fresh = t.progress.step == 0
    notes = config.notes + t.task.notes
    write_metrics(run_dir, status="running", fresh=fresh, run_name=config.run_name,
                  run_dir=str(run_dir), config=resolved, notes=notes,
                  environment=environment(t.device), parameters=count_parameters(t.model))
    log.info("run %s: %d parameters, %d steps, device %s", config.run_name,
             count_parameters(t.model), t.total_steps, t.device)
    for note in notes:
        log.info("note: %s", note)
    t.logger = build_logger(config.logger.name, run_dir, resolved, append=not fresh,
                            **logger_options(config, resume=not fresh))
    try:
        with StopSignals() as t.stop:
            while not t.finished:
                train_epoch(t)
                if t.stop.stopped:
                    interrupt(t)
                finish_epoch(t)
        final = summarize(t)
        final.update(t.task.artifacts(t.model, run_dir, t.device))
        t.logger.summary(final)
    finally:
        t.logger.close()
    write_metrics(run_dir, status="completed", final=final, history=t.progress.history)
    log.info("final: %s", json.dumps({k: final[k] for k in headline_keys(t.task, final)}))
    return final


def prepare(config: RunConfig, run_dir: Path) -> Training:
    """Build everything; restore the checkpoint when resuming; calibrate a fresh model."""
    trainer = config.trainer
    device = select_device(trainer.device)
    seed_everything(trainer.seed, trainer.deterministic, trainer.threads, device)
    task, model = build_task_and_model(config, device)
    steps_per_epoch = len(task.train_batches(0, loader_options(config, device, train=True)))
    total_steps = min(trainer.epochs * steps_per_epoch, trainer.max_steps or math.inf)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, total_steps)
    t = Training(config, task, model, optimizer, scheduler, device, run_dir, total_steps)
    if trainer.resume_from or (trainer.resume and t.checkpoint.is_file()):
        source = Path(trainer.resume_from) if trainer.resume_from else t.checkpoint
        t.progress = load_checkpoint(source, model, optimizer, scheduler, device)
    elif trainer.resume:
        config.notes.append(f"trainer.resume=true but no checkpoint at {t.checkpoint} yet: "
                            "started from scratch")
    if t.progress.step == 0:
        calibrate_batchnorm(t)
    return t


def train_epoch(t: Training) -> None:
    """Train until the epoch ends, the step budget is spent, or a stop signal arrives."""
    p, task = t.progress, t.task
    t.model.reset_state()
    batches = task.train_batches(p.epoch, loader_options(t.config, t.device, train=True))
    bar = tqdm(total=len(batches), initial=p.step_in_epoch, leave=False,
               desc=f"epoch {p.epoch + 1}/{t.config.trainer.epochs}",
               disable=t.show_progress())
    for batch in skip(batches, p.step_in_epoch):
        if p.step >= t.total_steps:
            break
        record, sums = train_step(t, task.to_device(batch, t.device))
        record["warmup"], t.warmed = not t.warmed, True
        p.record_step(record, sums)
        if p.step % t.config.logger.log_every == 0:
            t.logger.log("step", record)
        bar.update()
        bar.set_postfix(loss=f"{record['loss']:.3f}", nstep=f"{record['nstep']:.1f}",
                        **{task.metric: f"{record[task.metric]:.4g}"})
        if t.stop.stopped:
            break
    bar.close()


def train_step(t: Training, batch: Any) -> tuple[dict[str, Any], dict[str, float]]:
    """One optimisation step, timed and measured: (the step's record, the task's metric sums)."""
    config, task, model, device = t.config, t.task, t.model, t.device
    pretrain = t.progress.step < config.trainer.pretrain_steps
    every = config.trainer.precision_every
    check = every > 0 and not pretrain and t.progress.step % every == 0
    rng_before = rng_state(device) if check else None
    model.train()
    reset_peak_memory(device)
    with SavedTensorMeter(exclude=model.parameters()) as saved, Timer(device) as forward:
        output, stats = model(task.model_input(batch), pretrain=pretrain)
        loss = task.loss(output, batch)
        if stats.jac_loss is not None:
            loss = loss + config.trainer.jac_reg_weight * stats.jac_loss
    t.optimizer.zero_grad(set_to_none=True)
    with Timer(device) as backward:
        loss.backward()
    grad_cosine = exact_cosine(t, batch, rng_before) if check else None
    with Timer(device) as update:
        if config.optim.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        lr = t.optimizer.param_groups[0]["lr"]
        t.optimizer.step()
        t.scheduler.step()
    with torch.no_grad():
        sums = task.metric_sums(output, batch)
    timing = dict(forward_ms=forward.ms, backward_ms=backward.ms,
                  step_ms=forward.ms + backward.ms + update.ms)
    record = step_record(t, pretrain, lr, task.reduce(sums), task.count(batch), timing, stats)
    record.update(objective=loss.item(), saved_bytes=saved.bytes,
                  peak_memory_bytes=peak_memory_bytes(device))
    if grad_cosine is not None:
        record["grad_cosine"] = grad_cosine
    return record, sums


def step_record(t: Training, pretrain: bool, lr: float, metrics: dict[str, float],
                counts: dict[str, int], timing: dict[str, float], stats: Any) -> dict[str, Any]:
    """The logged record of one step."""
    seconds = timing["step_ms"] / 1e3
    record = dict(step=t.progress.step + 1, epoch=t.progress.epoch + 1, pretrain=pretrain,
                  **metrics, lr=lr, **counts, **timing,
                  **{f"{unit}_per_s": n / seconds for unit, n in counts.items()},
                  nstep=float(stats.nstep.float().mean()), residual=float(stats.residual.mean()),
                  diverged=int(stats.diverged.sum()))
    if stats.backward is not None:
        record["backward_nstep"] = float(stats.backward.nstep.float().mean())
        record["backward_residual"] = float(stats.backward.residual.mean())
    return record


def exact_cosine(t: Training, batch: Any, rng_before: dict[str, Any]) -> float:
    """Cosine between this step's gradient and the exact one on the same batch and masks."""
    params = t.model.implicit_parameters()
    used = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
    exact = parameter_gradients(t.model, t.task, batch, params, exact_method(), rng_before,
                                t.device, jac_weight=t.config.trainer.jac_reg_weight)
    return cosine(used, exact)


@torch.no_grad()
def calibrate_batchnorm(t: Training) -> None:
    """Start BatchNorm running statistics from a training batch instead of mean 0, variance 1.

    Layers initialised small (MDEQ's stem and head) have variances far below 1, and with few steps
    per epoch the running average would take epochs to forget the initial 1: eval-mode metrics
    would sit at chance while the training ones are already good.
    """
    norms = [m for m in t.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    batches = t.task.train_batches(-1, loader_options(t.config, t.device, train=True))
    batch = t.task.to_device(next(iter(batches)), t.device)
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    t.model.train()
    t.model(t.task.model_input(batch))
    t.model.reset_state()
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum


def finish_epoch(t: Training) -> None:
    """Evaluate, log and checkpoint at the end of an epoch (or of the step budget)."""
    p, task, trainer = t.progress, t.task, t.config.trainer
    solver = p.epoch_solver
    samples = max(solver.get("samples", 0.0), 1.0)
    record = dict(epoch=p.epoch + 1, step=p.step,
                  **{f"train_{k}": v for k, v in task.reduce(p.epoch_task).items()},
                  train_nstep=solver.get("nstep", 0.0) / samples,
                  train_residual=solver.get("residual", 0.0) / samples,
                  lr=t.scheduler.get_last_lr()[0])
    last = p.step >= t.total_steps or p.epoch + 1 >= trainer.epochs
    if last or (p.epoch + 1) % trainer.eval_every == 0:
        for split in task.eval_splits:
            record.update(evaluate(t, split))
    p.history.append(record)
    p.start_epoch()
    t.logger.log("epoch", record)
    log.info("epoch %d: %s", record["epoch"], ", ".join(
        f"{k}={v:.4g}" for k, v in record.items() if k not in ("epoch", "step")))
    if last or p.epoch % trainer.checkpoint_every == 0:
        save_checkpoint(t.checkpoint, t.model, t.optimizer, t.scheduler, p)
    write_metrics(t.run_dir, status="running", history=p.history, latest=summarize(t))


def evaluate(t: Training, split: str) -> dict[str, float]:
    """The task's metrics and the solver's statistics on an evaluation split (eval mode, eval
    solver budget), as `<split>_<metric>` and `eval_*` (`<split>_eval_*` for other splits)."""
    task, model, device = t.task, t.model, t.device
    model.eval()
    model.reset_state()
    batches = task.eval_batches(split, loader_options(t.config, device, train=False))
    sums: dict[str, float] = {}
    solver: dict[str, float] = {}
    with torch.set_grad_enabled(task.eval_with_grad):
        for batch in tqdm(batches, desc=f"eval {split}", leave=False, disable=t.show_progress()):
            batch = task.to_device(batch, device)
            with Timer(device) as timer:
                output, stats = model(task.model_input(batch))
            add(sums, task.metric_sums(output, batch))
            add(solver, {"nstep": stats.nstep.float().sum(), "residual": stats.residual.sum(),
                         "diverged": stats.diverged.sum(), "rows": len(stats.nstep),
                         "ms": timer.ms, **task.count(batch)})
    rows, prefix = max(solver.get("rows", 0.0), 1.0), "eval" if split == "test" else f"{split}_eval"
    out = {f"{split}_{k}": v for k, v in task.reduce(sums).items()}
    out.update({f"{prefix}_nstep": solver.get("nstep", 0.0) / rows,
                f"{prefix}_residual": solver.get("residual", 0.0) / rows,
                f"{prefix}_diverged": int(solver.get("diverged", 0.0)),
                f"{prefix}_samples_per_s": solver.get("samples", 0.0) /
                max(solver.get("ms", 0.0) / 1e3, 1e-9)})
    return out


def summarize(t: Training) -> dict[str, Any]:
    """The run's final numbers: the last evaluation, the task's extras, speed and memory."""
    history, task = t.progress.history, t.task
    last = history[-1] if history else {}
    final: dict[str, Any] = {k: v for k, v in last.items() if k.startswith("train_")}
    evaluated = [h for h in history if f"{task.eval_splits[0]}_{task.metric}" in h]
    if evaluated:
        final.update({k: v for k, v in evaluated[-1].items() if k not in ("epoch", "step", "lr")})
    final.update(task.final_metrics(history))
    final.update(t.progress.speed(t.device))
    return final


def headline_keys(task: Task, final: dict[str, Any]) -> list[str]:
    keys = (f"test_{task.metric}", "samples_per_s", "tokens_per_s", "forward_ms", "backward_ms",
            "forward_nstep", "saved_bytes", "peak_memory_bytes")
    return [k for k in keys if k in final]


def interrupt(t: Training) -> None:
    """Checkpoint the trained state, mark the run interrupted, and stop."""
    p, signum = t.progress, t.stop.signum
    save_checkpoint(t.checkpoint, t.model, t.optimizer, t.scheduler, p)
    write_metrics(t.run_dir, status="interrupted", history=p.history)
    raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} at epoch {p.epoch + 1}, "
                      f"step {p.step}; checkpoint {t.checkpoint}; continue with the same "
                      f"arguments plus run_name={t.config.run_name} trainer.resume=true")
