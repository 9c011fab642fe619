"""The training loop, readable top to bottom: run -> epochs -> steps, evaluation, checkpoints.

The loop knows a task only through deqrun.tasks.base.Task (batches, loss, metric sums and their
reduction, the headline metric's name) and a model through deqrun.models.base.DEQModel.
Every step is timed (forward, backward), measured (solver steps and residual, bytes saved for
backward, peak memory) and logged; every epoch is evaluated, checkpointed and written to
metrics.json. SIGINT/SIGTERM stop the run at the next safe point (after a step, or inside an
evaluation, which is abandoned) with a checkpoint, so `trainer.resume=true` continues exactly where
it stopped. A non-finite loss, gradient or weight, or a loss exploding over its running median,
ends the run as `diverged` without taking the step (or skips the batch: trainer.on_divergence).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import statistics
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from deqrun.config import RunConfig
from deqrun.errors import Abort, Diverged, Interrupted, WriteError
from deqrun.loggers import Logger, build_logger
from deqrun.measure import SavedTensorMeter, Timer, peak_memory_bytes, reset_peak_memory
from deqrun.models.base import DEQModel
from deqrun.results import sanitize, write_metrics
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
from deqrun.runner.checkpoint import check_compatible, read_checkpoint, restore, save_checkpoint
from deqrun.runner.progress import Progress, add
from deqrun.runner.signals import StopSignals
from deqrun.studies.gradcheck import cosine, exact_method, parameter_gradients, rng_state
from deqrun.tasks.base import Task, skip

log = logging.getLogger("deqrun")


@dataclass
class Training:
    """Everything one run works with, by name."""

    config: RunConfig
    resolved: dict[str, Any]
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
    last_finite: dict[str, Any] = field(default_factory=dict)

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    @property
    def finished(self) -> bool:
        """The budget is spent and its last epoch was evaluated (not stopped inside it)."""
        p = self.progress
        spent = p.epoch >= self.config.trainer.epochs or p.step >= self.total_steps
        return spent and p.step_in_epoch == 0

    def show_progress(self) -> bool | None:
        """tqdm's `disable`: None = only on a terminal."""
        chosen = self.config.trainer.progress
        return None if chosen is None else not chosen


class EvaluationAbandoned(Exception):
    """A stop signal arrived during an evaluation: its numbers are dropped."""


def run(config: RunConfig, resolved: dict[str, Any], run_dir: Path,
        previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train and evaluate as configured; return the final metrics (also in metrics.json).

    `previous`: the run folder's metrics.json before this process (None for a new folder). A
    resumed run that has nothing left to train returns its saved final metrics untouched.
    """
    with StopSignals() as stop:
        t = prepare(config, resolved, run_dir)
        t.stop = stop
        if t.finished and previous and previous.get("status") == "completed":
            return nothing_to_do(t, previous)
        begin(t)
        try:
            final = train_to_the_end(t)
        finally:
            t.logger.close()
    write_metrics(run_dir, status="completed", final=final, history=t.progress.history,
                  skipped_batches=t.progress.skipped)
    log.info("final: %s", json.dumps(sanitize({k: final[k] for k in
                                               headline_keys(t.task, final)})[0]))
    return final


def begin(t: Training) -> None:
    """Mark the run as running in metrics.json, log its set-up, open the logger."""
    config, run_dir = t.config, t.run_dir
    fresh = t.progress.step == 0
    if not fresh:
        log.info("resumed at epoch %d, step %d", t.progress.epoch + 1, t.progress.step)
    notes = config.notes + t.task.notes
    write_metrics(run_dir, status="running", fresh=fresh, run_name=config.run_name,
                  run_dir=str(run_dir), config=t.resolved, notes=notes,
                  metric=dict(name=t.task.metric, higher_is_better=t.task.higher_is_better),
                  environment=environment(t.device), parameters=count_parameters(t.model))
    log.info("run %s: %d parameters, %d steps, device %s", config.run_name,
             count_parameters(t.model), t.total_steps, t.device)
    for note in notes:
        log.info("note: %s", note)
    t.logger = build_logger(config.logger.name, run_dir, t.resolved, append=not fresh,
                            resume_at=(t.progress.step, t.progress.epoch),
                            **logger_options(config, resume=not fresh))


def train_to_the_end(t: Training) -> dict[str, Any]:
    """Epochs until the budget is spent; a signal, divergence or write failure ends the run."""
    try:
        while not t.finished:
            if t.stop.stopped:
                interrupt(t)
            train_epoch(t)
            if not t.stop.stopped:
                finish_epoch(t)
            if t.stop.stopped:
                interrupt(t)
        final = summarize(t)
        final.update(t.task.artifacts(t.model, t.run_dir, t.device))
        t.logger.summary(final)
        return final
    except Diverged as diverged:
        record_divergence(t, diverged)
        raise
    except Abort as abort:
        mark(t, status="interrupted", history=t.progress.history)
        raise Interrupted(abort.signum, f"abandoned by a third "
                          f"{signal.Signals(abort.signum).name} at step {t.progress.step}; the "
                          f"last checkpoint written is kept in {t.checkpoint}") from None
    except WriteError as error:
        mark(t, status="failed", error=str(error))
        raise


def mark(t: Training, **fields: Any) -> None:
    """Best effort: record the run's state in metrics.json (the disk may be what failed)."""
    try:
        write_metrics(t.run_dir, **fields)
    except WriteError:
        pass


def nothing_to_do(t: Training, previous: dict[str, Any]) -> dict[str, Any]:
    """A completed run resumed without more to train: its files are left as they are."""
    print(f"deqrun: run {t.config.run_name} is already completed (epoch {t.progress.epoch}, "
          f"step {t.progress.step}); nothing to do; raise trainer.epochs or trainer.max_steps "
          "to train further", file=sys.stderr)
    return previous.get("final") or {}


def prepare(config: RunConfig, resolved: dict[str, Any], run_dir: Path) -> Training:
    """Check the checkpoint when resuming (before building anything), build everything, restore
    the checkpoint, or calibrate a fresh model."""
    trainer = config.trainer
    device = select_device(trainer.device)
    checkpoint = run_dir / "checkpoints" / "last.pt"
    source = Path(trainer.resume_from) if trainer.resume_from else checkpoint
    state, changed = None, []
    if trainer.resume_from or (trainer.resume and checkpoint.is_file()):
        state = read_checkpoint(source, device)
        changed = check_compatible(source, state, resolved, trainer.resume_force)
    elif trainer.resume:
        config.notes.append(f"trainer.resume=true but no checkpoint at {checkpoint} yet: "
                            "started from scratch")
    seed_everything(trainer.seed, trainer.deterministic, trainer.threads, device)
    task, model = build_task_and_model(config, device)
    steps_per_epoch = len(task.train_batches(0, loader_options(config, device, train=True)))
    total_steps = min(trainer.epochs * steps_per_epoch, trainer.max_steps or math.inf)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, total_steps)
    t = Training(config, resolved, task, model, optimizer, scheduler, device, run_dir,
                 total_steps)
    if state is not None:
        t.progress = restore(source, state, model, optimizer, scheduler, changed)
        if changed:
            config.notes.append(f"resumed with trainer.resume_force=true despite: "
                                f"{'; '.join(changed)}")
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
        result = train_step(t, task.to_device(batch, t.device))
        if result is not None:
            record, sums = result
            record["warmup"], t.warmed = not t.warmed, True
            p.record_step(record, sums)
            p.note_loss(record["objective"])
            t.last_finite = record
            if p.step % t.config.logger.log_every == 0:
                t.logger.log("step", record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", nstep=f"{record['nstep']:.1f}",
                            **{task.metric: f"{record[task.metric]:.4g}"})
        bar.update()
        if t.stop.stopped:
            break
    bar.close()


def train_step(t: Training, batch: Any) -> tuple[dict[str, Any], dict[str, float]] | None:
    """One optimisation step, timed and measured: (the step's record, the task's metric sums),
    or None when a diverging batch was skipped (trainer.on_divergence=skip_batch)."""
    config, task, model, device = t.config, t.task, t.model, t.device
    pretrain = t.progress.step < config.trainer.pretrain_steps
    every = config.trainer.precision_every
    check = every > 0 and not pretrain and t.progress.step % every == 0
    rng_before = rng_state(device) if check else None
    model.train()
    reset_peak_memory(device)
    meter = SavedTensorMeter(exclude=model.parameters())
    with outer_objective(model, task, batch), meter as saved, Timer(device) as forward:
        output, stats = model(task.model_input(batch), pretrain=pretrain)
        loss = task.loss(output, batch)
        if stats.jac_loss is not None:
            loss = loss + config.trainer.jac_reg_weight * stats.jac_loss
    t.optimizer.zero_grad(set_to_none=True)
    with Timer(device) as backward:
        loss.backward()
    objective = loss.item()
    problem = divergence(t, objective)
    if problem is not None:
        return skip_batch(t, problem, objective)
    if check:
        with outer_objective(model, task, batch):
            grad_cosine = exact_cosine(t, batch, rng_before)
    else:
        grad_cosine = None
    with Timer(device) as update:
        lr = optimizer_step(t)
    with torch.no_grad():
        sums = task.metric_sums(output, batch)
    timing = dict(forward_ms=forward.ms, backward_ms=backward.ms,
                  step_ms=forward.ms + backward.ms + update.ms)
    record = step_record(t, pretrain, lr, task.reduce(sums), task.count(batch), timing, stats)
    record.update(objective=objective, saved_bytes=saved.bytes,
                  peak_memory_bytes=peak_memory_bytes(device))
    if grad_cosine is not None:
        record["grad_cosine"] = grad_cosine
    return record, sums


def outer_objective(model: DEQModel, task: Task, batch: Any) -> Any:
    """The batch's loss as a function of the model's output, handed to the model for the block
    (models with OPA solvers turn it into dL/dz); nothing for a model without the hook."""
    hand_over = getattr(model, "outer_objective", None)
    return hand_over(lambda out: task.loss(out, batch)) if hand_over else contextlib.nullcontext()


def optimizer_step(t: Training) -> float:
    """Clip, step, advance the schedule; Diverged if the weights came out non-finite."""
    config, model = t.config, t.model
    if config.optim.grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
    lr = t.optimizer.param_groups[0]["lr"]
    t.optimizer.step()
    t.scheduler.step()
    if not all_finite(p for p in model.parameters()):
        raise Diverged("the optimiser step produced non-finite weights",
                       divergence_details(t, "non-finite weights after the step", None,
                                          weights_finite=False))
    return lr


def all_finite(tensors: Any) -> bool:
    """Whether every value of every tensor is finite (one synchronisation)."""
    flags = [torch.isfinite(x).all() for x in tensors if x is not None]
    return bool(torch.stack(flags).all()) if flags else True


def divergence(t: Training, objective: float) -> str | None:
    """Why this step diverges (non-finite loss or gradient, exploding loss), or None."""
    if not math.isfinite(objective):
        return f"non-finite loss ({objective})"
    if not all_finite(p.grad for p in t.model.parameters()):
        return "non-finite gradient"
    factor, recent = t.config.trainer.divergence_factor, t.progress.recent_losses
    if factor is not None and recent:
        median = statistics.median(recent)
        if median != 0 and abs(objective) > factor * abs(median):
            return (f"loss {objective:.4g} exploded over {factor:g} x its running median "
                    f"{median:.4g}")
    return None


def skip_batch(t: Training, problem: str, objective: float) -> None:
    """Skip the diverging batch (no optimiser step), or end the run as diverged."""
    t.optimizer.zero_grad(set_to_none=True)
    trainer, p = t.config.trainer, t.progress
    details = divergence_details(t, problem, objective)
    if trainer.on_divergence == "stop":
        raise Diverged(f"training diverged at step {p.step + 1}: {problem}", details)
    if p.skipped + 1 > trainer.max_skipped_batches:
        raise Diverged(f"training diverged: more than {trainer.max_skipped_batches} batches "
                       f"skipped (trainer.max_skipped_batches); last at step {p.step + 1}: "
                       f"{problem}", details)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the schedule advances without an optimiser step
        t.scheduler.step()
    p.skip_step()
    log.warning("step %d skipped (%d so far): %s", p.step, p.skipped, problem)
    t.logger.log("step", dict(step=p.step, epoch=p.epoch + 1, skipped=1, reason=problem,
                              objective=objective))
    return None


def divergence_details(t: Training, reason: str, objective: float | None,
                       weights_finite: bool = True) -> dict[str, Any]:
    """What metrics.json records about a divergence: where, why, the last finite values."""
    keys = ("step", "epoch", "loss", "objective", "lr", "nstep", "residual", t.task.metric)
    return dict(step=t.progress.step + 1, epoch=t.progress.epoch + 1, reason=reason,
                objective=objective, weights_finite=weights_finite,
                skipped_batches=t.progress.skipped,
                last_finite={k: t.last_finite[k] for k in keys if k in t.last_finite})


def record_divergence(t: Training, diverged: Diverged) -> None:
    """Checkpoint the last finite state (not non-finite weights); metrics.json says diverged."""
    if diverged.details.get("weights_finite", True):
        with t.stop.protect():
            save_checkpoint(t.checkpoint, t.model, t.optimizer, t.scheduler, t.progress,
                            t.resolved)
    mark(t, status="diverged", divergence=diverged.details, history=t.progress.history,
         error=str(diverged))


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
    if stats.fallback is not None:
        record["fallback"] = float(stats.fallback.float().mean())
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
        try:
            for split in task.eval_splits:
                record.update(evaluate(t, split))
        except EvaluationAbandoned:
            log.warning("evaluation abandoned: stopping")
            return
    p.history.append(record)
    p.start_epoch()
    t.logger.log("epoch", record)
    log.info("epoch %d: %s", record["epoch"], ", ".join(
        f"{k}={v:.4g}" for k, v in record.items() if k not in ("epoch", "step")))
    with t.stop.protect():
        if last or p.epoch % trainer.checkpoint_every == 0:
            save_checkpoint(t.checkpoint, t.model, t.optimizer, t.scheduler, p, t.resolved)
        write_metrics(t.run_dir, status="running", history=p.history, latest=summarize(t),
                      skipped_batches=p.skipped)


def evaluate(t: Training, split: str) -> dict[str, float]:
    """The task's metrics and the solver's statistics on an evaluation split (eval mode, eval
    solver budget), as `<split>_<metric>` and `eval_*` (`<split>_eval_*` for other splits)."""
    task, model, device = t.task, t.model, t.device
    model.eval()
    model.reset_state()
    batches = task.eval_batches(split, loader_options(t.config, device, train=False))
    log.info("evaluating %s: %d batches", split, len(batches))
    sums: dict[str, float] = {}
    solver: dict[str, float] = {}
    with torch.set_grad_enabled(task.eval_with_grad):
        for batch in tqdm(batches, desc=f"eval {split}", leave=False, disable=t.show_progress()):
            if t.stop.stopped:
                raise EvaluationAbandoned(split)
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
    with t.stop.protect():
        save_checkpoint(t.checkpoint, t.model, t.optimizer, t.scheduler, p, t.resolved)
        write_metrics(t.run_dir, status="interrupted", history=p.history,
                      skipped_batches=p.skipped)
    raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} at epoch {p.epoch + 1}, "
                      f"step {p.step}; checkpoint {t.checkpoint}; continue with the same "
                      f"arguments plus run_name={t.config.run_name} trainer.resume=true")
