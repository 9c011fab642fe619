"""The training loop: one function, `run`, readable top to bottom.

run(config) builds the task, the DEQ model, the optimiser and the schedule, restores a checkpoint
when resuming, then trains epoch by epoch: every step is timed (forward, backward), measured
(solver steps and residual, bytes saved for backward, peak memory) and logged; every epoch is
evaluated, checkpointed and written to metrics.json. SIGINT/SIGTERM stop the run after the current
step with a checkpoint, so `trainer.resume=true` continues exactly where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import signal
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from deqrun import gradcheck
from deqrun.config import RunConfig
from deqrun.core import DEQ
from deqrun.errors import ConfigError, Interrupted
from deqrun.loggers import build_logger
from deqrun.measure import SavedTensorMeter, Timer, peak_memory_bytes, reset_peak_memory
from deqrun.models import build_model
from deqrun.results import write_metrics
from deqrun.tasks import build_classification_task

log = logging.getLogger("deqrun")
SUM_KEYS = ("samples", "steps", "step_ms", "forward_ms", "backward_ms", "nstep", "residual",
            "backward_nstep", "backward_steps")


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    epoch_sums: dict[str, float] = field(default_factory=dict)
    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SUM_KEYS, 0.0))
    peaks: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def run(config: RunConfig, resolved: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Train and evaluate as configured; return the final metrics (also in metrics.json)."""
    trainer = config.trainer
    device = select_device(trainer.device)
    seed_everything(trainer.seed, trainer.deterministic, trainer.threads, device)
    task, model = build_task_and_model(config, device)
    steps_per_epoch = math.ceil(len(task.train_set) / trainer.batch_size)
    total_steps = min(trainer.epochs * steps_per_epoch, trainer.max_steps or math.inf)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, total_steps)
    checkpoint = run_dir / "checkpoints" / "last.pt"
    progress = Progress()
    if trainer.resume_from or (trainer.resume and checkpoint.is_file()):
        source = Path(trainer.resume_from) if trainer.resume_from else checkpoint
        progress = load_checkpoint(source, model, optimizer, scheduler, device)
    elif trainer.resume:
        config.notes.append(f"trainer.resume=true but no checkpoint at {checkpoint} yet: "
                            "started from scratch")
    fresh = progress.step == 0
    if fresh:
        calibrate_batchnorm(model, task, config, device)
    notes = config.notes + task.notes
    header = dict(run_name=config.run_name, run_dir=str(run_dir), config=resolved, notes=notes,
                  environment=environment(device), parameters=count_parameters(model))
    write_metrics(run_dir, status="running", fresh=fresh, **header)
    log.info("run %s: %d parameters, %d steps, device %s", config.run_name,
             header["parameters"], total_steps, device)
    for note in notes:
        log.info("note: %s", note)
    logger = build_logger(config.logger.name, run_dir, resolved, append=not fresh,
                          **logger_options(config, resume=not fresh))
    context = dict(config=config, task=task, model=model, optimizer=optimizer, scheduler=scheduler,
                   device=device, logger=logger, total_steps=total_steps)
    try:
        with StopSignals() as stop:
            while progress.epoch < trainer.epochs and progress.step < total_steps:
                train_epoch(context, progress, stop)
                if stop.signum is not None:
                    save_checkpoint(checkpoint, model, optimizer, scheduler, progress)
                    write_metrics(run_dir, status="interrupted", history=progress.history)
                    raise Interrupted(stop.signum, interrupted_message(stop.signum, progress,
                                                                      checkpoint, config))
                finish_epoch(context, progress, run_dir, checkpoint)
        final = summarize(progress, device)
        logger.summary(final)
    finally:
        logger.close()
    write_metrics(run_dir, status="completed", final=final, history=progress.history)
    log.info("final: %s", json.dumps({k: final[k] for k in headline_keys(final)}))
    return final


def train_epoch(context: dict[str, Any], progress: Progress, stop: StopSignals) -> None:
    """Train until the epoch ends, the step budget is spent, or a stop signal arrives."""
    config, task, device = context["config"], context["task"], context["device"]
    loader = train_loader(task, config, progress.epoch, device)
    batches = iter(loader)
    for _ in range(progress.step_in_epoch):
        next(batches)
    bar = tqdm(total=len(loader), initial=progress.step_in_epoch, leave=False,
               desc=f"epoch {progress.epoch + 1}/{config.trainer.epochs}",
               disable=None if config.trainer.progress is None else not config.trainer.progress)
    for x, y in batches:
        if progress.step >= context["total_steps"]:
            break
        record = train_step(context, x.to(device), y.to(device), progress)
        record["warmup"] = not context.get("warmed", False)
        context["warmed"] = True
        accumulate(progress, record)
        if progress.step % config.logger.log_every == 0:
            context["logger"].log("step", record)
        bar.update()
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.3f}",
                        nstep=f"{record['nstep']:.1f}")
        if stop.signum is not None:
            break
    bar.close()


def train_step(context: dict[str, Any], x: torch.Tensor, y: torch.Tensor,
               progress: Progress) -> dict[str, Any]:
    """One optimisation step, timed and measured."""
    config, task, model = context["config"], context["task"], context["model"]
    optimizer, scheduler, device = context["optimizer"], context["scheduler"], context["device"]
    pretrain = progress.step < config.trainer.pretrain_steps
    every = config.trainer.precision_every
    check_precision = every > 0 and not pretrain and progress.step % every == 0
    state_before = gradcheck.rng_state(device) if check_precision else None
    model.train()
    reset_peak_memory(device)
    with SavedTensorMeter(exclude=model.parameters()) as saved, Timer(device) as forward:
        logits, stats = model(x, pretrain=pretrain)
        loss = task.loss(logits, y)
        if stats.jac_loss is not None:
            loss = loss + config.trainer.jac_reg_weight * stats.jac_loss
    optimizer.zero_grad(set_to_none=True)
    with Timer(device) as backward:
        loss.backward()
    cosine = exact_cosine(context, x, y, state_before) if check_precision else None
    with Timer(device) as update:
        if config.optim.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    step_ms = forward.ms + backward.ms + update.ms
    record = dict(step=progress.step + 1, epoch=progress.epoch + 1, pretrain=pretrain,
                  loss=loss.item(), accuracy=task.correct(logits, y) / len(y), samples=len(y),
                  lr=lr, forward_ms=forward.ms, backward_ms=backward.ms, step_ms=step_ms,
                  samples_per_s=len(y) / (step_ms / 1e3), nstep=float(stats.nstep.float().mean()),
                  residual=float(stats.residual.mean()), diverged=int(stats.diverged.sum()),
                  saved_bytes=saved.bytes, peak_memory_bytes=peak_memory_bytes(device))
    if stats.backward is not None:
        record["backward_nstep"] = float(stats.backward.nstep.float().mean())
        record["backward_residual"] = float(stats.backward.residual.mean())
    if cosine is not None:
        record["grad_cosine"] = cosine
    return record


def exact_cosine(context: dict[str, Any], x: torch.Tensor, y: torch.Tensor,
                 state: dict[str, Any]) -> float:
    """Cosine between this step's gradient and the exact one on the same batch and masks."""
    model, device = context["model"], context["device"]
    params = gradcheck.implicit_parameters(model)
    used = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
    exact = gradcheck.parameter_gradients(model, context["task"], x, y, params,
                                          gradcheck.exact_method(), state, device,
                                          jac_weight=context["config"].trainer.jac_reg_weight)
    return gradcheck.cosine(used, exact)


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, task, config: RunConfig, device: torch.device) -> None:
    """Start BatchNorm running statistics from a training batch instead of mean 0, variance 1.

    Layers initialised small (MDEQ's stem and head) have variances far below 1, and with few steps
    per epoch the running average would take epochs to forget the initial 1: eval-mode accuracy
    would sit at chance while training accuracy is already high.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    x, _ = next(iter(train_loader(task, config, -1, device)))
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    model(x.to(device))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum


def accumulate(progress: Progress, record: dict[str, Any]) -> None:
    """Add a step to the epoch sums, and (after warm-up, outside pretraining) to the totals."""
    progress.step += 1
    progress.step_in_epoch += 1
    sums = progress.epoch_sums
    for key in ("loss", "nstep", "residual"):
        sums[key] = sums.get(key, 0.0) + record[key] * record["samples"]
    sums["correct"] = sums.get("correct", 0.0) + record["accuracy"] * record["samples"]
    sums["samples"] = sums.get("samples", 0.0) + record["samples"]
    for key in ("saved_bytes", "peak_memory_bytes"):
        progress.peaks[key] = max(progress.peaks.get(key, 0), record[key])
    if record["pretrain"] or record.get("warmup"):
        return
    totals = progress.totals
    totals["steps"] += 1
    for key in ("samples", "step_ms", "forward_ms", "backward_ms", "nstep", "residual"):
        totals[key] += record[key]
    if "backward_nstep" in record:
        totals["backward_nstep"] += record["backward_nstep"]
        totals["backward_steps"] += 1


def finish_epoch(context: dict[str, Any], progress: Progress, run_dir: Path,
                 checkpoint: Path) -> None:
    """Evaluate, log and checkpoint at the end of an epoch (or of the step budget)."""
    config, sums = context["config"], progress.epoch_sums
    samples = max(sums.get("samples", 0.0), 1.0)
    record = dict(epoch=progress.epoch + 1, step=progress.step, train_loss=sums["loss"] / samples,
                  train_accuracy=sums["correct"] / samples, train_nstep=sums["nstep"] / samples,
                  train_residual=sums["residual"] / samples,
                  lr=context["scheduler"].get_last_lr()[0])
    last = progress.step >= context["total_steps"] or progress.epoch + 1 >= config.trainer.epochs
    if last or (progress.epoch + 1) % config.trainer.eval_every == 0:
        record.update(evaluate(context))
    progress.history.append(record)
    progress.epoch += 1
    progress.step_in_epoch = 0
    progress.epoch_sums = {}
    context["logger"].log("epoch", record)
    log.info("epoch %d: %s", record["epoch"], ", ".join(
        f"{k}={v:.4g}" for k, v in record.items() if k not in ("epoch", "step")))
    if last or progress.epoch % config.trainer.checkpoint_every == 0:
        save_checkpoint(checkpoint, context["model"], context["optimizer"],
                        context["scheduler"], progress)
    write_metrics(run_dir, status="running", history=progress.history,
                  latest=summarize(progress, context["device"]))


@torch.no_grad()
def evaluate(context: dict[str, Any]) -> dict[str, float]:
    """Loss, accuracy and solver statistics on the test split (eval mode, eval solver budget)."""
    task, model, device = context["task"], context["model"], context["device"]
    model.eval()
    sums = dict.fromkeys(("loss", "correct", "nstep", "residual", "diverged", "samples", "ms"), 0.0)
    for x, y in eval_loader(task, context["config"], device):
        x, y = x.to(device), y.to(device)
        with Timer(device) as timer:
            logits, stats = model(x)
        n = len(y)
        sums["loss"] += float(task.loss(logits, y)) * n
        sums["correct"] += task.correct(logits, y)
        sums["nstep"] += float(stats.nstep.float().sum())
        sums["residual"] += float(stats.residual.sum())
        sums["diverged"] += float(stats.diverged.sum())
        sums["samples"] += n
        sums["ms"] += timer.ms
    n = max(sums["samples"], 1.0)
    return dict(test_loss=sums["loss"] / n, test_accuracy=sums["correct"] / n,
                eval_nstep=sums["nstep"] / n, eval_residual=sums["residual"] / n,
                eval_diverged=int(sums["diverged"]), eval_samples_per_s=n / (sums["ms"] / 1e3))


def summarize(progress: Progress, device: torch.device) -> dict[str, Any]:
    """The run's final numbers: the last evaluation, and speed/memory averaged over its steps."""
    totals, evaluated = progress.totals, [h for h in progress.history if "test_accuracy" in h]
    steps = max(totals["steps"], 1.0)
    last = progress.history[-1] if progress.history else {}
    final: dict[str, Any] = {k: last[k] for k in ("train_loss", "train_accuracy") if k in last}
    if evaluated:
        final.update({k: v for k, v in evaluated[-1].items() if k not in ("epoch", "step", "lr")})
        final["best_test_accuracy"] = max(h["test_accuracy"] for h in evaluated)
    final.update(
        samples_per_s=totals["samples"] / max(totals["step_ms"] / 1e3, 1e-9),
        forward_ms=totals["forward_ms"] / steps, backward_ms=totals["backward_ms"] / steps,
        step_ms=totals["step_ms"] / steps, forward_nstep=totals["nstep"] / steps,
        forward_residual=totals["residual"] / steps,
        saved_bytes=int(progress.peaks.get("saved_bytes", 0)),
        peak_memory_bytes=int(progress.peaks.get("peak_memory_bytes", 0)),
        peak_memory_kind="cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
        epochs=progress.epoch, steps=progress.step, timed_steps=int(totals["steps"]))
    if totals["backward_steps"]:
        final["backward_nstep"] = totals["backward_nstep"] / totals["backward_steps"]
    return final


def headline_keys(final: dict[str, Any]) -> list[str]:
    keys = ("test_accuracy", "samples_per_s", "forward_ms", "backward_ms", "forward_nstep",
            "saved_bytes", "peak_memory_bytes")
    return [k for k in keys if k in final]


# ---- building blocks ---------------------------------------------------------------------------
def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} but CUDA is not available here; use "
                          "trainer.device=cpu or auto")
    return device


def seed_everything(seed: int, deterministic: bool, threads: int | None,
                    device: torch.device) -> None:
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    if deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def build_task_and_model(config: RunConfig, device: torch.device) -> tuple[Any, nn.Module]:
    """The task (data, loss, metric) and the model around a DEQ layer, on `device`."""
    task = build_task(config)
    model = build_model(config.model.name, config.model.options(), deq=DEQ(**config.deq_options()),
                        in_channels=task.in_channels, num_classes=task.num_classes)
    return task, model.to(device)


def build_task(config: RunConfig):
    t = config.task
    return build_classification_task(
        t.name, root=t.root, download=t.download, image_size=t.image_size, augment=t.augment,
        subset=t.subset, test_as_train=t.test_as_train, train_dir=t.train_dir, val_dir=t.val_dir)


def build_optimizer(config: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    o = config.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay)
    optimizer = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return optimizer(params, lr=o.lr, weight_decay=o.weight_decay)


def build_scheduler(config: RunConfig, optimizer: torch.optim.Optimizer,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to min_lr_ratio x lr (or constant), per step."""
    o = config.optim

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min((step - o.warmup_steps) / max(total_steps - o.warmup_steps, 1), 1.0)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_loader(task, config: RunConfig, epoch: int, device: torch.device) -> DataLoader:
    """Shuffled by a generator seeded from (seed, epoch): a resumed epoch sees the same order."""
    generator = torch.Generator().manual_seed(config.trainer.seed * 100_003 + epoch)
    return DataLoader(task.train_set, batch_size=config.trainer.batch_size, shuffle=True,
                      generator=generator, num_workers=config.trainer.num_workers,
                      pin_memory=device.type == "cuda")


def eval_loader(task, config: RunConfig, device: torch.device) -> DataLoader:
    return DataLoader(task.test_set, batch_size=config.trainer.eval_batch_size, shuffle=False,
                      generator=torch.Generator().manual_seed(0),
                      num_workers=config.trainer.num_workers, pin_memory=device.type == "cuda")


def logger_options(config: RunConfig, resume: bool) -> dict[str, Any]:
    if config.logger.name != "wandb":
        return {}
    lg = config.logger
    return dict(project=lg.project, entity=lg.entity, mode=lg.mode, run_name=config.run_name,
                resume=resume)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def environment(device: torch.device) -> dict[str, Any]:
    info = dict(device=str(device), torch=torch.__version__, python=platform.python_version(),
                threads=torch.get_num_threads(), host=platform.node())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---- checkpoints, signals, metrics.json --------------------------------------------------------
def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, progress: Progress) -> None:
    """Everything needed to continue exactly: weights, optimiser, schedule, RNG, progress."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                 scheduler=scheduler.state_dict(), progress=asdict(progress),
                 rng_cpu=torch.get_rng_state(),
                 rng_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, device: torch.device) -> Progress:
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}; trainer.resume_from must name a checkpoint "
                          "file (or use run_name=<run> trainer.resume=true)")
    state = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"].cpu())
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng_cuda"]])
    progress = Progress(**state["progress"])
    log.info("resumed from %s at epoch %d, step %d", path, progress.epoch + 1, progress.step)
    return progress


class StopSignals:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step; a second one aborts."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> StopSignals:
        self.signum: int | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: stopping after this step", signal.Signals(signum).name)

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def interrupted_message(signum: int, progress: Progress, checkpoint: Path,
                        config: RunConfig) -> str:
    return (f"stopped by {signal.Signals(signum).name} at epoch {progress.epoch + 1}, step "
            f"{progress.step}; checkpoint {checkpoint}; continue with the same arguments plus "
            f"run_name={config.run_name} trainer.resume=true")
