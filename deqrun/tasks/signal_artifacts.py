"""Pictures and sound of a fitted signal: reconstruction beside the target, PSNR over steps.

Written at the end of a run into its folder: images -> comparison.png (target, reconstruction,
error map) and reconstruction.png; audio -> reconstruction.wav and waveform.png; video ->
frames.png (a few frames, target above reconstruction) and frames/ (those frames as PNGs);
every task -> psnr.png (the logged PSNRs over training).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from deqrun.data.signals import write_audio

if TYPE_CHECKING:
    from deqrun.tasks.signal import Signal, SignalTask

VIDEO_FRAMES_SHOWN = 5
log = logging.getLogger("deqrun")


def render(model: torch.nn.Module, signal: Signal, device: torch.device,
           batch_size: int | None) -> np.ndarray:
    """The model's output on every coordinate of `signal`, clipped to [-1, 1], (N, C)."""
    was_training = model.training
    model.eval()
    outputs = []
    with torch.no_grad():
        for batch in signal.batches("render", batch_size):
            index = None if batch.index is None else batch.index.to(device)
            output, _ = model({"coords": batch.coords.to(device), "key": "render",
                               "index": index})
            outputs.append(output.clamp(-1, 1).float().cpu())
    model.train(was_training)
    return torch.cat(outputs).numpy()


def unit_psnr(output: np.ndarray, target: np.ndarray) -> float:
    """PSNR of values in [-1, 1] measured on [0, 1]."""
    from deqrun.tasks.signal import psnr_from_mse

    return psnr_from_mse(float(np.mean(((output - target) / 2) ** 2)))


def write_signal_artifacts(task: SignalTask, model: torch.nn.Module, run_dir: Path,
                           device: torch.device) -> dict[str, Any]:
    """Render the task's whole signal and write its pictures/sound; return their PSNRs."""
    run_dir.mkdir(parents=True, exist_ok=True)
    output = render(model, task.full, device, task.eval_batch_size or task.batch_size)
    target = task.full.target.numpy()
    if task.kind == "audio":
        metrics = _audio(run_dir, output, target, task.rate)
    elif task.kind == "video":
        metrics = _video(run_dir, output, target, task.full.shape)
    else:
        metrics = _image(run_dir, output, target, task.full.shape)
    if task.history:
        plot_psnr(task.history, run_dir / "psnr.png", task.name)
    log.info("wrote %s", ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in metrics.items()))
    return metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.round(np.clip((values + 1) / 2, 0, 1) * 255).astype(np.uint8)


def _save_png(path: Path, pixels: np.ndarray) -> None:
    from skimage import io

    io.imsave(str(path), pixels[..., 0] if pixels.shape[-1] == 1 else pixels,
              check_contrast=False)


def _image(run_dir: Path, output: np.ndarray, target: np.ndarray,
           shape: tuple[int, ...]) -> dict[str, Any]:
    height, width = shape
    recon = output.reshape(height, width, -1)
    truth = target.reshape(height, width, -1)
    psnr = unit_psnr(output, target)
    _save_png(run_dir / "reconstruction.png", _to_uint8(recon))
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    error = np.abs(recon - truth).mean(axis=2) / 2
    grey = recon.shape[2] == 1
    for ax, picture, title in ((axes[0], truth, "target"),
                               (axes[1], recon, f"reconstruction ({psnr:.2f} dB)")):
        ax.imshow(_to_uint8(picture)[..., 0] if grey else _to_uint8(picture),
                  cmap="gray" if grey else None)
        ax.set_title(title)
    shown = axes[2].imshow(error, cmap="inferno")
    axes[2].set_title("|error| on [0, 1]")
    fig.colorbar(shown, ax=axes[2], fraction=0.046)
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(run_dir / "comparison.png", dpi=100)
    plt.close(fig)
    return {"render_psnr": psnr}


def _audio(run_dir: Path, output: np.ndarray, target: np.ndarray, rate: int) -> dict[str, Any]:
    """reconstruction.wav (16 bit) and waveform.png; wav_psnr: that of the file as written
    (read back: its 16-bit rounding included)."""
    import soundfile

    write_audio(run_dir / "reconstruction.wav", output[:, 0], rate)
    written, _ = soundfile.read(str(run_dir / "reconstruction.wav"), dtype="float32")
    psnr = unit_psnr(written.reshape(-1, 1), target)
    plt = _pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(12, 6), sharex=True)
    seconds = np.arange(len(output)) / rate
    for ax, values, title in ((axes[0], target[:, 0], "target"),
                              (axes[1], output[:, 0], f"reconstruction ({psnr:.2f} dB)"),
                              (axes[2], output[:, 0] - target[:, 0], "error")):
        ax.plot(seconds, values, linewidth=0.3)
        ax.set_ylim(-1.05, 1.05)
        ax.set_title(title)
    axes[2].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(run_dir / "waveform.png", dpi=100)
    plt.close(fig)
    return {"wav_psnr": psnr, "wav_file": "reconstruction.wav"}


def _video(run_dir: Path, output: np.ndarray, target: np.ndarray,
           shape: tuple[int, ...]) -> dict[str, Any]:
    count, height, width = shape
    recon = output.reshape(count, height, width, -1)
    truth = target.reshape(count, height, width, -1)
    psnrs = [unit_psnr(recon[t], truth[t]) for t in range(count)]
    shown = sorted(set(np.linspace(0, count - 1, min(VIDEO_FRAMES_SHOWN, count)).astype(int)))
    (run_dir / "frames").mkdir(exist_ok=True)
    rows = []
    for t in shown:
        _save_png(run_dir / "frames" / f"frame_{t:04d}.png", _to_uint8(recon[t]))
        rows.append(np.concatenate([_to_uint8(truth[t]), _to_uint8(recon[t])], axis=0))
    _save_png(run_dir / "frames.png", np.concatenate(rows, axis=1))
    return {"render_psnr": float(np.mean(psnrs)), "render_psnr_std": float(np.std(psnrs))}


def plot_psnr(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Every logged *_psnr series of the history against the step (or epoch)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    keys = sorted({k for h in history for k in h if k.endswith("psnr")})
    for key in keys:
        points = [(h.get("step", h.get("epoch", i)), h[key]) for i, h in enumerate(history)
                  if isinstance(h.get(key), (int, float))]
        if points:
            ax.plot(*zip(*points), label=key, marker="o" if len(points) < 30 else None,
                    markersize=3)
    ax.set_xlabel("step" if any("step" in h for h in history) else "epoch")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if keys:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
