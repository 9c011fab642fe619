# ruff: noqa: UP006, UP007, UP035, UP045
"""Signal fitting for coordinate networks: images, image generalisation, audio and video.

A signal is a grid of values; the network maps grid coordinates in [-1, 1]^d to values in
[-1, 1] (images and frames: 2 v - 1 of [0, 1] pixels; audio: samples over their largest |sample|).
The loss is the mean squared error on that scale; PSNR is computed on [0, 1] (pixels, or audio
mapped by (v + 1) / 2) with the output clipped to the valid range, as the reference does. Video
reports the mean and standard deviation of per-frame PSNRs.

Training is full batch by default (one batch, i.e. one optimiser step, per epoch); `batch_size`
gives mini-batches of coordinates instead (a fresh permutation per epoch, seeded by the run's
seed and the epoch). The runner's trainer.batch_size is not used: a batch of 128 pixels is never
what a signal wants. Each batch names its coordinate set (`key`) and rows (`index`), which the
models use to cache fixed points between steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, List, Optional

import numpy as np
import torch

from deqrun.data.signals import coordinate_grid, load_audio, load_image, load_video
from deqrun.errors import ConfigError, DataNotFoundError
from deqrun.registry import register_task
from deqrun.tasks.base import LoaderOptions, ModelSpec, Task
from deqrun.tasks.signal_artifacts import write_signal_artifacts

REPO_ROOT = Path(__file__).resolve().parents[2]
MIN_MSE = 1e-20
# The reference's input scales and the signal sizes they were set for: images of 512 pixels
# (shorter side), the 7 s Bach clip (308 207 samples). With input_scale null a task scales them
# with its own signal, so the filters keep the same frequencies per pixel / per sample.
REFERENCE_IMAGE_SIDE = 512
REFERENCE_AUDIO_SAMPLES = 308_207


@dataclass
class SignalBatch:
    """Coordinates (N, d), targets (N, C) in [-1, 1], the coordinate set's key, the rows' index
    in that set (None: all of it, in order) and, for video, each row's frame number."""

    coords: torch.Tensor
    target: torch.Tensor
    key: str
    index: Optional[torch.Tensor] = None
    frame: Optional[torch.Tensor] = None


@dataclass
class Signal:
    """A whole signal: coordinates, targets, grid shape (e.g. (H, W), (T,), (T, H, W)) and
    frame numbers (video)."""

    coords: torch.Tensor
    target: torch.Tensor
    shape: tuple[int, ...]
    frame: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.coords)

    def batch(self, key: str, index: Optional[torch.Tensor] = None) -> SignalBatch:
        if index is None:
            return SignalBatch(self.coords, self.target, key, None, self.frame)
        frame = None if self.frame is None else self.frame[index]
        return SignalBatch(self.coords[index], self.target[index], key, index, frame)

    def batches(self, key: str, size: Optional[int],
                generator: Optional[torch.Generator] = None) -> list[SignalBatch]:
        """All of it as one batch (size None), or chunks of `size` rows (shuffled by generator)."""
        if size is None or size >= len(self):
            return [self.batch(key)]
        order = (torch.randperm(len(self), generator=generator) if generator is not None
                 else torch.arange(len(self)))
        return [self.batch(key, chunk) for chunk in order.split(size)]


def resolve_path(path: str) -> Path:
    """A user path: as given (~ expanded), else relative to the repository root if it exists
    there (so ../shared/data works from any working directory)."""
    given = Path(path).expanduser()
    if given.exists() or given.is_absolute():
        return given
    from_repo = REPO_ROOT / given
    return from_repo if from_repo.exists() else given


def psnr_from_mse(mse: float) -> float:
    return -10.0 * math.log10(max(mse, MIN_MSE))


class SignalTask(Task):
    """Fit one signal; evaluate on the split `test` (the same or other coordinates)."""

    metric: ClassVar[str] = "psnr"
    higher_is_better: ClassVar[bool] = True
    eval_splits: tuple[str, ...] = ("test",)

    def __init__(self, name: str, kind: str, train: Signal, test: Signal, full: Signal, *,
                 input_scale: float, siren_input_scale: float, batch_size: Optional[int],
                 eval_batch_size: Optional[int], rate: int = 0) -> None:
        super().__init__()
        self.name, self.kind = name, kind
        self.train, self.test, self.full = train, test, full
        self.input_scale, self.siren_input_scale = input_scale, siren_input_scale
        self.batch_size, self.eval_batch_size, self.rate = batch_size, eval_batch_size, rate
        self.history: list[dict[str, Any]] = []

    def model_spec(self) -> ModelSpec:
        return ModelSpec(kind="signal", in_shape=(self.train.coords.shape[1],),
                         out_features=self.train.target.shape[1],
                         extra={"input_scale": self.input_scale,
                                "siren_input_scale": self.siren_input_scale,
                                "signal": self.kind})

    def train_batches(self, epoch: int, options: LoaderOptions) -> list[SignalBatch]:
        generator = torch.Generator().manual_seed(options.seed * 100_003 + epoch)
        return self.train.batches("train", self.batch_size, generator)

    def eval_batches(self, split: str, options: LoaderOptions) -> list[SignalBatch]:
        if split != "test":
            raise KeyError(f"task {self.name} has no evaluation split {split!r}")
        return self.test.batches("test", self.eval_batch_size)

    def model_input(self, batch: SignalBatch) -> dict[str, Any]:
        return {"coords": batch.coords, "key": batch.key, "index": batch.index}

    def count(self, batch: SignalBatch) -> dict[str, int]:
        return {"samples": int(len(batch.coords))}

    def loss(self, output: torch.Tensor, batch: SignalBatch) -> torch.Tensor:
        return torch.mean((output - batch.target) ** 2)

    def metric_sums(self, output: torch.Tensor, batch: SignalBatch) -> dict[str, float]:
        """Summed squared errors (loss scale and [0, 1] scale), per frame for video."""
        with torch.no_grad():
            loss_sq = ((output - batch.target) ** 2).sum(dim=1)
            unit_sq = (((output.clamp(-1, 1) - batch.target) / 2) ** 2).sum(dim=1)
        channels = output.shape[1]
        sums = {"loss_sq": float(loss_sq.sum()), "unit_sq": float(unit_sq.sum()),
                "values": float(loss_sq.numel() * channels)}
        if batch.frame is not None:
            per_frame = torch.zeros(int(batch.frame.max()) + 1, dtype=unit_sq.dtype,
                                    device=unit_sq.device).index_add_(0, batch.frame, unit_sq)
            counts = torch.bincount(batch.frame, minlength=len(per_frame)) * channels
            for t in torch.nonzero(counts).flatten().tolist():
                sums[f"frame_sq/{t}"] = float(per_frame[t])
                sums[f"frame_values/{t}"] = float(counts[t])
        return sums

    def reduce(self, sums: dict[str, float]) -> dict[str, float]:
        values = max(sums.get("values", 0.0), 1.0)
        reduced = {"loss": sums.get("loss_sq", 0.0) / values,
                   "psnr": psnr_from_mse(sums.get("unit_sq", 0.0) / values)}
        frames = frame_psnrs(sums)
        if frames:
            reduced["psnr"] = float(np.mean(frames))
            reduced["psnr_std"] = float(np.std(frames))
        return reduced

    def final_metrics(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """The best and the last test PSNR (the history is kept for the PSNR plot)."""
        self.history = list(history)
        final = super().final_metrics(history)
        last = [h["test_psnr"] for h in history if h.get("test_psnr") is not None]
        if last:
            final["final_test_psnr"] = last[-1]
        return final

    def artifacts(self, model: torch.nn.Module, run_dir: Path, device: torch.device,
                  ) -> dict[str, Any]:
        """Reconstruction (PNG / WAV / frames) beside the target, and the PSNR-over-steps plot."""
        return write_signal_artifacts(self, model, Path(run_dir), device)


def frame_psnrs(sums: dict[str, float]) -> list[float]:
    """Per-frame PSNRs from metric sums with frame_sq/<t> and frame_values/<t> entries."""
    frames = sorted(int(k.split("/")[1]) for k in sums if k.startswith("frame_sq/"))
    return [psnr_from_mse(sums[f"frame_sq/{t}"] / max(sums[f"frame_values/{t}"], 1.0))
            for t in frames]


# ---- images ------------------------------------------------------------------------------------
def image_signal(image: np.ndarray) -> Signal:
    """An (H, W, C) image in [0, 1] as a Signal with targets in [-1, 1]."""
    height, width, channels = image.shape
    target = torch.from_numpy(np.ascontiguousarray(image)).reshape(-1, channels) * 2 - 1
    return Signal(coordinate_grid((height, width)), target.float(), (height, width))


def sub_grid(image: np.ndarray, offset: int) -> Signal:
    """Pixels [offset::2, offset::2] with their coordinates on the full image's grid."""
    height, width, channels = image.shape
    coords = coordinate_grid((height, width)).reshape(height, width, 2)
    coords = coords[offset::2, offset::2]
    part = image[offset::2, offset::2]
    target = torch.from_numpy(np.ascontiguousarray(part)).reshape(-1, channels) * 2 - 1
    return Signal(coords.reshape(-1, 2), target.float(), tuple(part.shape[:2]))


def _check_scale(scale: Optional[float]) -> None:
    if scale is not None and scale <= 0:
        raise ValueError(f"task.input_scale must be > 0 or null, got {scale}")


def image_scale(given: Optional[float], reference: float, image: np.ndarray) -> float:
    """`given`, or the reference's scale for 512 pixels scaled to the image's shorter side."""
    if given is not None:
        return float(given)
    return reference * min(image.shape[:2]) / REFERENCE_IMAGE_SIDE


def _check_batches(options: Any) -> None:
    for field_name in ("batch_size", "eval_batch_size"):
        value = getattr(options, field_name)
        if value is not None and value < 1:
            raise ValueError(f"task.{field_name} must be >= 1 or null, got {value}")


@dataclass
class ImageFitConfig:
    """task=image_fit: fit every pixel of one image, evaluated on the same pixels."""

    name: str = "image_fit"
    path: Optional[str] = None  # None: scikit-image's camera (512 x 512, grey)
    resize: Optional[List[int]] = None  # [height, width] (or [size])
    grey: bool = False
    batch_size: Optional[int] = None  # coordinates per training batch; None: full batch
    eval_batch_size: Optional[int] = None
    # suggested to the model (SIREN gets half); None: 256 per 512 pixels of the shorter side
    input_scale: Optional[float] = None

    def check(self) -> None:
        _check_batches(self)
        _check_scale(self.input_scale)


@register_task("image_fit", schema=ImageFitConfig, kind="signal",
               description="fit one image (default: scikit-image's camera); PSNR on its pixels")
def build_image_fit(options: ImageFitConfig) -> SignalTask:
    options.check()
    path = None if options.path is None else str(resolve_path(options.path))
    image = load_image(path, resize=options.resize, grey=options.grey)
    signal = image_signal(image)
    scale = image_scale(options.input_scale, 256.0, image)
    task = SignalTask("image_fit", "image", signal, signal, signal, input_scale=scale,
                      siren_input_scale=scale / 2, batch_size=options.batch_size,
                      eval_batch_size=options.eval_batch_size)
    batches = "full batch" if options.batch_size is None else f"batches of {options.batch_size}"
    task.notes.append(f"image {path or 'skimage camera'}: {image.shape[0]}x{image.shape[1]}x"
                      f"{image.shape[2]}, {batches}, suggested input scale {scale:g} "
                      f"(SIREN {scale / 2:g}; model.input_scale overrides)")
    return task


@dataclass
class ImageGeneralisationConfig:
    """task=image_generalisation: train on pixels [::2, ::2], test on [1::2, 1::2]."""

    name: str = "image_generalisation"
    path: str = "../shared/data/images"  # an image file, or a folder (sorted, pick `image`)
    image: int = 0  # which image of the folder (the table sweeps 0, 1, 2)
    resize: Optional[List[int]] = None
    grey: bool = False
    batch_size: Optional[int] = None
    eval_batch_size: Optional[int] = None
    input_scale: Optional[float] = None  # None: 128 per 512 pixels of the shorter side

    def check(self) -> None:
        _check_batches(self)
        _check_scale(self.input_scale)
        if self.image < 0:
            raise ValueError(f"task.image must be >= 0, got {self.image}")


def pick_image(path: Path, index: int) -> Path:
    """`path` if it is a file, else its index-th image file (sorted by name)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise DataNotFoundError(f"image file or folder not found: {path}")
    files = sorted(p for p in path.iterdir()
                   if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"))
    if not files:
        raise DataNotFoundError(f"no images in {path}")
    if index >= len(files):
        raise ConfigError(f"task.image={index} but {path} holds {len(files)} images "
                          f"(0..{len(files) - 1})")
    return files[index]


@register_task("image_generalisation", schema=ImageGeneralisationConfig, kind="signal",
               description="train on a quarter of the pixels, PSNR on another quarter (Kodak)")
def build_image_generalisation(options: ImageGeneralisationConfig) -> SignalTask:
    options.check()
    file = pick_image(resolve_path(options.path), options.image)
    image = load_image(str(file), resize=options.resize, grey=options.grey)
    scale = image_scale(options.input_scale, 128.0, image)
    task = SignalTask("image_generalisation", "image", sub_grid(image, 0), sub_grid(image, 1),
                      image_signal(image), input_scale=scale, siren_input_scale=scale / 2,
                      batch_size=options.batch_size, eval_batch_size=options.eval_batch_size)
    task.notes.append(f"image {file.name} {image.shape[0]}x{image.shape[1]}: train on [::2, ::2], "
                      f"test on [1::2, 1::2], suggested input scale {scale:g} "
                      f"(SIREN {scale / 2:g}; model.input_scale overrides)")
    return task


# ---- audio -------------------------------------------------------------------------------------
@dataclass
class AudioFitConfig:
    """task=audio_fit: fit a WAV clip (samples over the largest |sample|)."""

    name: str = "audio_fit"
    path: str = "../shared/data/audio/gt_bach.wav"
    seconds: Optional[float] = None  # keep only the first seconds; None: all
    batch_size: Optional[int] = None
    eval_batch_size: Optional[int] = None
    input_scale: Optional[float] = None  # None: 25000 per 308 207 samples (the 7 s Bach clip)

    def check(self) -> None:
        _check_batches(self)
        _check_scale(self.input_scale)
        if self.seconds is not None and self.seconds <= 0:
            raise ValueError(f"task.seconds must be > 0, got {self.seconds}")


@register_task("audio_fit", schema=AudioFitConfig, kind="signal",
               description="fit an audio clip (default: the Bach clip of SIREN); PSNR and a WAV")
def build_audio_fit(options: AudioFitConfig) -> SignalTask:
    options.check()
    file = resolve_path(options.path)
    samples, rate, amplitude = load_audio(str(file))
    if options.seconds is not None:
        samples = samples[: max(2, int(options.seconds * rate))]
    target = torch.from_numpy(samples).unsqueeze(1)
    signal = Signal(coordinate_grid((len(samples),)), target, (len(samples),))
    scale = (options.input_scale if options.input_scale is not None
             else 25000.0 * len(samples) / REFERENCE_AUDIO_SAMPLES)
    task = SignalTask("audio_fit", "audio", signal, signal, signal, input_scale=scale,
                      siren_input_scale=scale, batch_size=options.batch_size,
                      eval_batch_size=options.eval_batch_size, rate=rate)
    task.notes.append(f"audio {file.name}: {len(samples)} samples at {rate} Hz "
                      f"({len(samples) / rate:.2f} s), amplitude {amplitude:.4g} divided out, "
                      f"input scale {scale:g}")
    return task


# ---- video -------------------------------------------------------------------------------------
@dataclass
class VideoFitConfig:
    """task=video_fit: fit a video (a folder of frames, a .npy array or a GIF)."""

    name: str = "video_fit"
    path: Optional[str] = None
    max_frames: Optional[int] = None
    resize: Optional[List[int]] = None  # per frame: [height, width]
    batch_size: Optional[int] = 65536
    eval_batch_size: Optional[int] = 65536
    input_scale: float = 128.0

    def check(self) -> None:
        _check_batches(self)
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"task.max_frames must be >= 1, got {self.max_frames}")
        if self.input_scale <= 0:
            raise ValueError(f"task.input_scale must be > 0, got {self.input_scale}")


def video_signal(frames: np.ndarray) -> Signal:
    """(T, H, W, C) frames in [0, 1] as a Signal over (t, y, x) with per-row frame numbers."""
    count, height, width, channels = frames.shape
    target = torch.from_numpy(np.ascontiguousarray(frames)).reshape(-1, channels) * 2 - 1
    frame = torch.arange(count).repeat_interleave(height * width)
    return Signal(coordinate_grid((count, height, width)), target.float(),
                  (count, height, width), frame)


@register_task("video_fit", schema=VideoFitConfig, kind="signal",
               description="fit a video (folder of frames, .npy or GIF); per-frame PSNR")
def build_video_fit(options: VideoFitConfig) -> SignalTask:
    options.check()
    if options.path is None:
        raise ConfigError("task=video_fit needs task.path: a folder of frames, a .npy array "
                          "(T, H, W[, C]) or a GIF")
    file = resolve_path(options.path)
    frames = load_video(str(file), max_frames=options.max_frames, resize=options.resize)
    signal = video_signal(frames)
    task = SignalTask("video_fit", "video", signal, signal, signal,
                      input_scale=options.input_scale, siren_input_scale=options.input_scale,
                      batch_size=options.batch_size, eval_batch_size=options.eval_batch_size)
    task.notes.append(f"video {file.name}: {frames.shape[0]} frames of "
                      f"{frames.shape[1]}x{frames.shape[2]}x{frames.shape[3]}")
    return task
