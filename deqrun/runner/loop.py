"""The training loop, readable top to bottom: run -> epochs -> steps, evaluation, checkpoints.

The loop knows a task only through deqrun.tasks.base.Task (batches, loss, metric sums and their
reduction, the headline metric's name) and a model through deqrun.models.base.DEQModel.
Every step is timed (forward, backward), measured (solver steps and residual, bytes saved for
backward, peak memory) and logged; epochs are evaluated and checkpointed at the trainer's cadence
(eval_every, checkpoint_every), and metrics.json is rewritten (its whole history) when an epoch is
evaluated or checkpointed, or METRICS_EVERY_S seconds after the last write, not after every epoch
(a full-batch task has one step per epoch). SIGINT/SIGTERM stop the run at the next safe point
(after a step, or inside an evaluation, which is abandoned) with a checkpoint, so
`trainer.resume=true` continues exactly where it stopped. A non-finite loss, gradient or weight,
or a loss exploding over its running median, ends the run as `diverged` without taking the step
(or skips the batch: trainer.on_divergence).

Scale-out: started as several processes (torchrun, SLURM tasks) with trainer.distributed=auto,
the run is data-parallel (DistributedDataParallel; deqrun/runner/distributed.py): each rank trains
on its shard of the global batch, every step's loss, metric sums and solver statistics are added
over ranks (so the logged numbers are the global batch's), every rank stops at the same step, and
only rank 0 logs, writes metrics.json and checkpoints. SIGUSR2 (a SLURM time-out or preemption)
checkpoints, marks the run interrupted and requeues it (deqrun/runner/preemption.py).
trainer.precision=bf16|fp16 runs forwards under autocast (fp16 with loss scaling); the DEQ solver
stays in float32 (deqrun/runner/precision_policy.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from deqrun.config import RunConfig
from deqrun.core import DEQ
from deqrun.errors import Abort, ConfigError, Diverged, Interrupted, WriteError
from deqrun.loggers import Logger, build_logger
from deqrun.measure import SavedTensorMeter, Timer, peak_memory_bytes, reset_peak_memory
from deqrun.models.base import DEQModel
from deqrun.results import sanitize, write_metrics
from deqrun.runner import distributed as ddp
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
from deqrun.runner.checkpoint import (
    check_compatible,
    init_weights,
    read_checkpoint,
    restore,
    save_checkpoint,
)
from deqrun.runner.precision_policy import (
    NumericsPolicy,
    apply_policy,
    autocast,
    grad_scaler,
    resolve_policy,
)
from deqrun.runner.preemption import PreemptionSignals, clear_requeue, mark_requeue
from deqrun.runner.progress import Progress, add
from deqrun.runner.rng import load_rank_rng, save_rank_rng
from deqrun.runner.signals import StopSignals
from deqrun.studies.gradcheck import cosine, exact_method, parameter_gradients, rng_state
from deqrun.tasks.base import Task

log = logging.getLogger("deqrun")
# metrics.json holds the whole history; between evaluations and checkpoints it is rewritten at most
# this often (rewriting it after every one-step epoch of a full-batch task costs more than the step)
METRICS_EVERY_S = 30.0


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
    ctx: ddp.DistributedContext = field(default_factory=ddp.DistributedContext)
    net: nn.Module | None = None  # what trains: the model, in DistributedDataParallel on N ranks
    policy: NumericsPolicy = field(default_factory=NumericsPolicy)
    scaler: Any = None
    preempt: PreemptionSignals | None = None
    stopping: bool = False  # a stop every rank agreed on
    preempted: bool = False  # ... for a time-out or preemption (SIGUSR2), not SIGINT/SIGTERM
    metrics_written: float = field(default_factory=time.monotonic)

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
        """tqdm's `disable`: None = only on a terminal (never on ranks other than 0)."""
        if not self.ctx.is_main:
            return True
        chosen = self.config.trainer.progress
        return None if chosen is None else not chosen

    def check_stop(self) -> bool:
        """Whether to stop now: a signal here (or, on N ranks, on any rank: a collective that
        every rank calls at the same points)."""
        if self.stopping:
            return True
        preempt = self.preempt is not None and self.preempt.requested
        reason = 2.0 if self.stop.stopped else 1.0 if preempt else 0.0
        if self.ctx.distributed:  # SIGINT/SIGTERM anywhere outrank a preemption anywhere
            reason = ddp.max_over_ranks(reason, self.ctx)
        self.stopping, self.preempted = reason > 0, reason == 1.0
        return self.stopping


class EvaluationAbandoned(Exception):
    """A stop signal arrived during an evaluation: its numbers are dropped."""


def run(config: RunConfig, resolved: dict[str, Any], run_dir: Path,
        previous: dict[str, Any] | None = None,
        ctx: ddp.DistributedContext | None = None) -> dict[str, Any]:
    """Train and evaluate as configured; return the final metrics (also in metrics.json).

    `previous`: the run folder's metrics.json before this process (None for a new folder). A
    resumed run that has nothing left to train returns its saved final metrics untouched.
    `ctx`: this process's place in a data-parallel run (deqrun.cli joins the process group).
    """
    with StopSignals() as stop, PreemptionSignals() as preempt:
        t = prepare(config, resolved, run_dir, ctx or ddp.DistributedContext())
        t.stop, t.preempt = stop, preempt
        if t.finished and previous and previous.get("status") == "completed":
            return nothing_to_do(t, previous)
        begin(t)
        try:
            final = train_to_the_end(t)
        finally:
            t.logger.close()
    if t.ctx.is_main:
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
    if not t.ctx.is_main:
        t.logger = Logger()
        return
    write_metrics(run_dir, status="running", fresh=fresh, run_name=config.run_name,
                  run_dir=str(run_dir), config=t.resolved, notes=notes,
                  metric=dict(name=t.task.metric, higher_is_better=t.task.higher_is_better),
                  environment=environment(t.device) | t.ctx.describe(),
                  numerics=t.policy.describe(), parameters=count_parameters(t.model))
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
        if t.total_steps == 0 and not t.progress.history:
            evaluate_only(t)
        while not t.finished:
            if t.check_stop():
                interrupt(t)
            train_epoch(t)
            if not t.stopping:
                finish_epoch(t)
            if t.check_stop():
                interrupt(t)
        final = summarize(t)
        if t.ctx.distributed:
            final.update(distributed_summary(t, final))
        if t.ctx.is_main:
            final.update(t.task.artifacts(t.model, t.run_dir, t.device))
        t.logger.summary(final)
        return final
    except Diverged as diverged:
        record_divergence(t, diverged)
        raise
    except Abort as abort:
        if t.ctx.is_main:
            mark(t, status="interrupted", history=t.progress.history)
        raise Interrupted(abort.signum, f"abandoned by a third "
                          f"{signal.Signals(abort.signum).name} at step {t.progress.step}; the "
                          f"last checkpoint written is kept in {t.checkpoint}") from None
    except WriteError as error:
        mark(t, status="failed", error=str(error))
        raise


def evaluate_only(t: Training) -> None:
    """trainer.max_steps=0: the model as built, or as trainer.init_from loaded it, evaluated on
    every split without a training step (e.g. a trained generator on task=inverse, or a trained
    classifier attacked with other task.eval_jiio settings), then checkpointed. The task's
    end-of-run work (attacks, pictures) follows as after training."""
    record: dict[str, Any] = dict(epoch=0, step=0)
    try:
        for split in t.task.eval_splits:
            record.update(evaluate(t, split))
    except EvaluationAbandoned:
        interrupt(t)
    t.progress.history.append(record)
    t.logger.log("epoch", record)
    log.info("evaluated without training: %s", ", ".join(
        f"{k}={v:.4g}" for k, v in record.items() if k not in ("epoch", "step")))
    with t.stop.protect():
        save_state(t)
        if t.ctx.is_main:
            write_metrics(t.run_dir, status="running", history=t.progress.history,
                          latest=summarize(t), skipped_batches=t.progress.skipped)
    if t.check_stop():
        interrupt(t)


def mark(t: Training, **fields: Any) -> None:
    """Best effort: record the run's state in metrics.json (the disk may be what failed)."""
    try:
        write_metrics(t.run_dir, **fields)
    except WriteError:
        pass


def nothing_to_do(t: Training, previous: dict[str, Any]) -> dict[str, Any]:
    """A completed run resumed without more to train: its files are left as they are."""
    if not t.ctx.is_main:
        return previous.get("final") or {}
    print(f"deqrun: run {t.config.run_name} is already completed (epoch {t.progress.epoch}, "
          f"step {t.progress.step}); nothing to do; raise trainer.epochs or trainer.max_steps "
          "to train further", file=sys.stderr)
    return previous.get("final") or {}


def prepare(config: RunConfig, resolved: dict[str, Any], run_dir: Path,
            ctx: ddp.DistributedContext | None = None) -> Training:
    """Check the checkpoint when resuming (before building anything), build everything, restore
    the checkpoint, or calibrate a fresh model; on N ranks, wrap it for data parallelism."""
    trainer = config.trainer
    ctx = ctx or ddp.DistributedContext()
    device = ctx.device if ctx.distributed else select_device(trainer.device)
    if ctx.distributed and trainer.precision_every > 0:
        raise ConfigError("gradient checks (trainer.precision_every > 0) run in one process; "
                          "add trainer.distributed=off")
    policy = numerics_policy(config)
    checkpoint = run_dir / "checkpoints" / "last.pt"
    source = Path(trainer.resume_from) if trainer.resume_from else checkpoint
    state, changed = None, []
    if trainer.resume_from or (trainer.resume and checkpoint.is_file()):
        state = read_checkpoint(source, device)
        changed = check_compatible(source, state, resolved, trainer.resume_force)
    elif trainer.resume:
        config.notes.append(f"trainer.resume=true but no checkpoint at {checkpoint} yet: "
                            "started from scratch")
    seed_everything(trainer.seed, False, trainer.threads, device)
    apply_policy(policy, device)
    task, model = build_task_and_model(config, device)
    if ctx.distributed:
        model = sync_batchnorm(config, model, ctx)
    steps_per_epoch = len(ddp.shard_batches(task, 0, loader_options(config, device, train=True),
                                            ctx))
    total_steps = min(trainer.epochs * steps_per_epoch,
                      math.inf if trainer.max_steps is None else trainer.max_steps)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, total_steps, steps_per_epoch)
    t = Training(config, resolved, task, model, optimizer, scheduler, device, run_dir,
                 total_steps, ctx=ctx, policy=policy, scaler=grad_scaler(policy, device))
    if state is not None:
        t.progress = restore(source, state, model, optimizer, scheduler, changed)
        if ctx.distributed:
            load_rank_rng(t.checkpoint, ctx.rank, device)
        if changed:
            config.notes.append(f"resumed with trainer.resume_force=true despite: "
                                f"{'; '.join(changed)}")
        if ctx.is_main:
            clear_requeue(run_dir)
    elif trainer.init_from:
        path = init_weights(trainer.init_from, model, device)
        config.notes.append(f"initialised from {path} (weights and batch-norm statistics; "
                            "optimiser, schedule and step start anew)")
    if t.progress.step == 0:
        if not (state is None and trainer.init_from):  # init_from brings its own statistics
            calibrate_batchnorm(t)
        if ctx.rank > 0:  # independent dropout masks per rank (the weights come from rank 0)
            torch.manual_seed(trainer.seed + RANK_SEED_STRIDE * ctx.rank)
    t.net = ddp.wrap_model(model, ctx)
    return t


RANK_SEED_STRIDE = 1_000_003


def numerics_policy(config: RunConfig) -> NumericsPolicy:
    """trainer.precision / tf32 / deterministic / cudnn_benchmark as one policy: cuDNN autotuning
    follows `not deterministic` unless set; TF32 `auto` is on only for bf16/fp16 runs without
    determinism or gradient checks (deqrun/runner/precision_policy.py)."""
    trainer = config.trainer
    benchmark = trainer.cudnn_benchmark
    if benchmark is None:
        benchmark = not trainer.deterministic
    return resolve_policy(trainer.precision, trainer.tf32, trainer.deterministic, benchmark,
                          exact_checks=trainer.precision_every > 0)


def sync_batchnorm(config: RunConfig, model: DEQModel, ctx: ddp.DistributedContext) -> DEQModel:
    """BatchNorm over the global batch (SyncBatchNorm) on GPU ranks; torch has no CPU version,
    so gloo ranks keep per-rank statistics (noted in the run's notes)."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    if ctx.device.type == "cuda" and config.trainer.sync_batchnorm:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    config.notes.append("BatchNorm statistics are per process (SyncBatchNorm needs GPU ranks, "
                        "or trainer.sync_batchnorm=false): not the 1-process run's numbers")
    return model


def train_epoch(t: Training) -> None:
    """Train until the epoch ends, the step budget is spent, or a stop signal arrives."""
    p, task = t.progress, t.task
    t.model.reset_state()
    batches = ddp.shard_batches(task, p.epoch, loader_options(t.config, t.device, train=True),
                                t.ctx, skip=p.step_in_epoch)  # skipped batches are not loaded
    bar = tqdm(total=len(batches) + p.step_in_epoch, initial=p.step_in_epoch, leave=False,
               desc=f"epoch {p.epoch + 1}/{t.config.trainer.epochs}",
               disable=t.show_progress())
    for batch in batches:
        if p.step >= t.total_steps:
            break
        batch = task.to_device(batch, t.device, non_blocking=t.device.type == "cuda")
        result = train_step(t, batch)
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
        if t.check_stop():
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
    penalise = jacobian_step(config, t.progress.step)
    with outer_objective(model, task, batch), penalty_switch(model, penalise), meter as saved, \
            Timer(device) as forward, autocast(t.policy, device):
        output, stats = (t.net or model)(task.model_input(batch), pretrain=pretrain)
        loss = task.loss(output, batch)
        if stats.jac_loss is not None:
            loss = loss + config.trainer.jac_reg_weight * stats.jac_loss
    t.optimizer.zero_grad(set_to_none=True)
    with Timer(device) as backward:
        t.scaler.scale(loss).backward()
    objective = loss.item()
    with torch.no_grad():
        sums = task.metric_sums(output, batch)
    counts = task.count(batch)
    solver = solver_sums(stats)
    if t.ctx.distributed:
        objective, sums, counts, solver = global_step(t, objective, sums, counts, solver)
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
    timing = dict(forward_ms=forward.ms, backward_ms=backward.ms,
                  step_ms=forward.ms + backward.ms + update.ms)
    record = step_record(t, pretrain, lr, task.reduce(sums), counts, timing, stats, solver)
    record.update(objective=objective, saved_bytes=saved.bytes,
                  peak_memory_bytes=peak_memory_bytes(device))
    if grad_cosine is not None:
        record["grad_cosine"] = grad_cosine
    return record, sums


def solver_sums(stats: Any) -> dict[str, float]:
    """The step's forward-solver statistics as sums over the batch's rows."""
    return dict(nstep=float(stats.nstep.float().sum()), residual=float(stats.residual.sum()),
                converged=float(stats.converged.float().sum()), rows=float(len(stats.nstep)),
                diverged=float(stats.diverged.sum()))


def global_step(t: Training, objective: float, sums: dict[str, float], counts: dict[str, int],
                solver: dict[str, float]) -> tuple[float, dict, dict, dict]:
    """The global batch's numbers from every rank's shard, in one all-reduce: the loss averaged
    over ranks (each shard's loss is a mean, and DDP averages the gradients alike), the task's
    metric sums, counts and the solver's sums added."""
    keys = sorted(sums), sorted(counts), sorted(solver)
    values = [objective, *(sums[k] for k in keys[0]), *(counts[k] for k in keys[1]),
              *(solver[k] for k in keys[2])]
    total = ddp.sum_values(values, t.ctx)
    objective, rest = total[0] / t.ctx.world_size, iter(total[1:])
    sums = {k: next(rest) for k in keys[0]}
    counts = {k: int(round(next(rest))) for k in keys[1]}
    solver = {k: next(rest) for k in keys[2]}
    return objective, sums, counts, solver


def jacobian_step(config: RunConfig, step: int) -> bool:
    """Whether this training step adds the Jacobian penalty: trainer.jac_reg_weight > 0, on every
    trainer.jac_reg_every-th step counted from 0 (pretraining steps, which unroll, have none)."""
    return config.trainer.jac_reg_weight > 0 and step % config.trainer.jac_reg_every == 0


@contextlib.contextmanager
def penalty_switch(model: nn.Module, on: bool) -> Any:
    """Switch the Hutchinson penalty of every DEQ inside `model` on or off for one step."""
    deqs = [m for m in model.modules() if isinstance(m, DEQ)]
    before = [d.jac_reg for d in deqs]
    for d in deqs:
        d.jac_reg = on
    try:
        yield
    finally:
        for d, was in zip(deqs, before):
            d.jac_reg = was


def outer_objective(model: DEQModel, task: Task, batch: Any) -> Any:
    """The batch's loss as a function of the model's output, handed to the model for the block
    (models with OPA solvers turn it into dL/dz); nothing for a model without the hook."""
    hand_over = getattr(model, "outer_objective", None)
    return hand_over(lambda out: task.loss(out, batch)) if hand_over else contextlib.nullcontext()


def optimizer_step(t: Training) -> float:
    """Clip, step, advance the schedule; Diverged if the weights came out non-finite."""
    config, model = t.config, t.model
    if config.optim.grad_clip is not None:
        t.scaler.unscale_(t.optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
    lr = t.optimizer.param_groups[0]["lr"]
    t.scaler.step(t.optimizer)
    t.scaler.update()
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
    if not t.scaler.is_enabled() and not all_finite(p.grad for p in t.model.parameters()):
        return "non-finite gradient"  # (fp16: the loss scaler skips such steps itself)
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
    if not t.ctx.is_main:
        return
    if diverged.details.get("weights_finite", True):
        with t.stop.protect():
            save_checkpoint(t.checkpoint, t.model, t.optimizer, t.scheduler, t.progress,
                            t.resolved)
    mark(t, status="diverged", divergence=diverged.details, history=t.progress.history,
         error=str(diverged))


def step_record(t: Training, pretrain: bool, lr: float, metrics: dict[str, float],
                counts: dict[str, int], timing: dict[str, float], stats: Any,
                solver: dict[str, float]) -> dict[str, Any]:
    """The logged record of one step (solver: solver_sums, over every rank's rows)."""
    seconds = timing["step_ms"] / 1e3
    rows = max(solver["rows"], 1.0)
    record = dict(step=t.progress.step + 1, epoch=t.progress.epoch + 1, pretrain=pretrain,
                  **metrics, lr=lr, **counts, **timing,
                  **{f"{unit}_per_s": n / seconds for unit, n in counts.items()},
                  nstep=solver["nstep"] / rows, residual=solver["residual"] / rows,
                  converged=solver["converged"] / rows, diverged=int(solver["diverged"]))
    if stats.backward is not None:
        record["backward_nstep"] = float(stats.backward.nstep.float().mean())
        record["backward_residual"] = float(stats.backward.residual.mean())
    if stats.fallback is not None:
        record["fallback"] = float(stats.fallback.float().mean())
    if stats.jac_loss is not None:
        record["jac_loss"] = float(stats.jac_loss.detach())
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
    # this rank's shard of a batch (SyncBatchNorm on GPU ranks adds the shards' statistics)
    batches = ddp.shard_batches(t.task, -1, loader_options(t.config, t.device, train=True), t.ctx)
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
                  train_converged=solver.get("converged", 0.0) / samples,
                  lr=t.scheduler.get_last_lr()[0])
    last = p.step >= t.total_steps or p.epoch + 1 >= trainer.epochs
    evaluated = last or (p.epoch + 1) % trainer.eval_every == 0
    if evaluated:
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
        checkpointed = last or p.epoch % trainer.checkpoint_every == 0
        if checkpointed:
            save_state(t)
        if t.ctx.is_main and (evaluated or checkpointed
                              or time.monotonic() - t.metrics_written >= METRICS_EVERY_S):
            write_metrics(t.run_dir, status="running", history=p.history, latest=summarize(t),
                          skipped_batches=p.skipped)
            t.metrics_written = time.monotonic()


def save_state(t: Training) -> None:
    """The checkpoint (rank 0) and, on N ranks, every rank's random state beside it."""
    if t.ctx.distributed:
        save_rank_rng(t.checkpoint, t.ctx.rank, t.device)
    if t.ctx.is_main:
        save_checkpoint(t.checkpoint, t.model, t.optimizer, t.scheduler, t.progress, t.resolved)


def evaluate(t: Training, split: str) -> dict[str, float]:
    """The task's metrics and the solver's statistics on an evaluation split (eval mode, eval
    solver budget), as `<split>_<metric>` and `eval_*` (`<split>_eval_*` for other splits)."""
    task, model, device = t.task, t.model, t.device
    model.eval()
    model.reset_state()
    batches = ddp.shard_eval_batches(task, split, loader_options(t.config, device, train=False),
                                     t.ctx)
    log.info("evaluating %s: %d batches", split, len(batches))
    sums: dict[str, float] = {}
    solver: dict[str, float] = {}
    nsteps: list[torch.Tensor] = []
    with torch.set_grad_enabled(task.eval_with_grad):
        for batch in tqdm(batches, desc=f"eval {split}", leave=False, disable=t.show_progress()):
            if t.stop.stopped and not t.ctx.distributed:  # N ranks: stop after the evaluation
                raise EvaluationAbandoned(split)
            batch = task.to_device(batch, device)
            with Timer(device) as timer, autocast(t.policy, device):
                output, stats = model(task.model_input(batch))
            add(sums, task.metric_sums(output, batch))
            needed = getattr(stats.forward, "steps_to_tol", None) if stats.forward else None
            nsteps.append((stats.nstep if needed is None else needed).reshape(-1).float().cpu())
            add(solver, {"nstep": stats.nstep.float().sum(), "residual": stats.residual.sum(),
                         "converged": stats.converged.float().sum(),
                         "diverged": stats.diverged.sum(), "rows": len(stats.nstep),
                         "ms": timer.ms, **task.count(batch)})
    if t.ctx.distributed:  # every rank's samples over the slowest rank's time
        ms = ddp.max_over_ranks(solver.pop("ms", 0.0), t.ctx)
        sums, solver = ddp.reduce_sums(sums, t.ctx), ddp.reduce_sums(solver, t.ctx)
        solver["ms"] = ms
    steps = torch.cat(nsteps) if nsteps else torch.zeros(0)
    if t.ctx.distributed:  # the median over every rank's samples
        steps = ddp.gather_values(steps, t.ctx)
    median_steps = float(steps.median()) if steps.numel() else 0.0
    rows, prefix = max(solver.get("rows", 0.0), 1.0), "eval" if split == "test" else f"{split}_eval"
    out = {f"{split}_{k}": v for k, v in task.reduce(sums).items()}
    out.update({f"{prefix}_nstep": solver.get("nstep", 0.0) / rows,
                f"{prefix}_residual": solver.get("residual", 0.0) / rows,
                # The share of evaluated samples (segments, graphs, images) whose forward solve got
                # under the tolerance, and the median over samples of the f evaluations each one
                # needed to get there (the budget, solver.eval_f_max_iter, when it never did).
                f"{prefix}_converged": solver.get("converged", 0.0) / rows,
                f"{prefix}_steps_median": median_steps,
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


def distributed_summary(t: Training, final: dict[str, Any]) -> dict[str, Any]:
    """Over the ranks (a collective): throughput in total (the logged counts are already the
    global batch's) and per rank, peak memory per rank and its maximum."""
    peaks = ddp.gather(int(final.get("peak_memory_bytes", 0)), t.ctx)
    out: dict[str, Any] = dict(world_size=t.ctx.world_size, peak_memory_bytes=max(peaks),
                               peak_memory_bytes_per_rank=peaks)
    for unit in ("samples", "tokens"):
        if f"{unit}_per_s" in final:
            out[f"{unit}_per_s_per_rank"] = final[f"{unit}_per_s"] / t.ctx.world_size
    return out


def headline_keys(task: Task, final: dict[str, Any]) -> list[str]:
    keys = (f"test_{task.metric}", "samples_per_s", "tokens_per_s", "forward_ms", "backward_ms",
            "forward_nstep", "saved_bytes", "peak_memory_bytes")
    return [k for k in keys if k in final]


def interrupt(t: Training) -> None:
    """Checkpoint the trained state, mark the run interrupted, and stop; after a time-out or
    preemption signal (SIGUSR2), leave a requeue marker and hand over to submitit / scontrol."""
    p, preempted = t.progress, t.preempted
    if preempted:
        signum = (t.preempt.signum if t.preempt is not None and t.preempt.signum
                  else signal.SIGUSR2)
    else:
        signum = t.stop.signum or signal.SIGTERM  # SIGTERM: another rank's signal
    with t.stop.protect():
        save_state(t)
        if t.ctx.is_main:
            write_metrics(t.run_dir, status="interrupted", history=p.history,
                          skipped_batches=p.skipped)
            if preempted:
                mark_requeue(t.run_dir, signum, p.step, p.epoch)
    ddp.barrier(t.ctx)
    requeued = t.ctx.is_main and preempted and t.preempt.hand_over()
    how = ("the job is requeued and resumes from it" if requeued else
           f"continue with the same arguments plus run_name={t.config.run_name} "
           "trainer.resume=true")
    raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} at epoch {p.epoch + 1}, "
                      f"step {p.step}; checkpoint {t.checkpoint}; {how}")
