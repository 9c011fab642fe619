"""Signals for coordinate networks: images, audio clips and videos as (coordinates, values).

Every loader returns values in [0, 1] (images, video frames) or [-1, 1] (audio) as float32 numpy
arrays; `coordinate_grid` gives the matching coordinates in [-1, 1]^d. Missing or unreadable
files raise DataNotFoundError with one line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from deqrun.errors import ConfigError, DataNotFoundError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
KODAK_DEFAULT = ("kodim05.png", "kodim19.png", "kodim23.png")


def coordinate_grid(shape: tuple[int, ...]) -> torch.Tensor:
    """Coordinates of every grid point of `shape` in [-1, 1]^d, (prod(shape), d), 'ij' order."""
    axes = [torch.linspace(-1.0, 1.0, n) if n > 1 else torch.zeros(1) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(shape))


def _as_float_image(array: np.ndarray, where: str) -> np.ndarray:
    """uint8/uint16/float image -> float32 (H, W, C) in [0, 1]; alpha dropped."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise DataNotFoundError(f"{where}: expected an image (H x W or H x W x C), "
                                f"got shape {array.shape}")
    if array.shape[2] in (2, 4):
        array = array[:, :, :-1]
    if np.issubdtype(array.dtype, np.integer):
        array = array.astype(np.float32) / float(np.iinfo(array.dtype).max)
    return np.clip(array.astype(np.float32), 0.0, 1.0)


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from skimage.transform import resize

    resized = resize(image, (*size, image.shape[2]), anti_aliasing=True, preserve_range=True)
    return np.clip(resized.astype(np.float32), 0.0, 1.0)


def _size_pair(resize: list[int] | int | None) -> tuple[int, int] | None:
    if resize is None:
        return None
    values = [resize] if isinstance(resize, int) else list(resize)
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise ConfigError(f"resize must be a positive size or [height, width], got {resize!r}")
    return int(values[0]), int(values[1])


def read_image_file(path: Path) -> np.ndarray:
    """An image file as float32 (H, W, C) in [0, 1]."""
    from skimage import io

    if not path.is_file():
        raise DataNotFoundError(f"image file not found: {path}")
    try:
        array = io.imread(str(path))
    except (OSError, ValueError) as error:
        raise DataNotFoundError(f"cannot read image {path}: {error}") from None
    return _as_float_image(np.asarray(array), str(path))


def load_image(path: str | None = None, *, resize: list[int] | int | None = None,
               grey: bool = False) -> np.ndarray:
    """An image as float32 (H, W, C) in [0, 1]: a file, or scikit-image's camera when None."""
    if path is None:
        from skimage import data

        image = _as_float_image(data.camera(), "skimage.data.camera")
    else:
        image = read_image_file(Path(path).expanduser())
    if grey and image.shape[2] == 3:
        image = (image @ np.array([0.2125, 0.7154, 0.0721], dtype=np.float32))[:, :, None]
    size = _size_pair(resize)
    return image if size is None else _resize(image, size)


def default_kodak_paths(data_root: Path) -> list[Path]:
    """The three Kodak photographs of the shared data folder."""
    return [data_root / "images" / name for name in KODAK_DEFAULT]


def load_audio(path: str) -> tuple[np.ndarray, int, float]:
    """A WAV file as mono float32 samples in [-1, 1], its rate and the amplitude divided out.

    The amplitude is the largest absolute sample (the reference divides by the largest sample,
    which can leave values below -1; the maximum of |x| keeps the target inside [-1, 1]).
    """
    import soundfile

    file = Path(path).expanduser()
    if not file.is_file():
        raise DataNotFoundError(f"audio file not found: {file}")
    try:
        samples, rate = soundfile.read(str(file), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as error:
        raise DataNotFoundError(f"cannot read audio {file}: {error}") from None
    mono = samples.mean(axis=1)
    amplitude = float(np.abs(mono).max())
    if amplitude == 0 or mono.size < 2:
        raise DataNotFoundError(f"audio {file} is silent or has fewer than 2 samples")
    return (mono / amplitude).astype(np.float32), int(rate), amplitude


def write_audio(path: Path, samples: np.ndarray, rate: int) -> None:
    """Write mono samples in [-1, 1] as a 16-bit WAV."""
    import soundfile

    soundfile.write(str(path), np.clip(samples, -1.0, 1.0), rate, subtype="PCM_16")


def load_video(path: str, *, max_frames: int | None = None,
               resize: list[int] | int | None = None) -> np.ndarray:
    """A video as float32 (T, H, W, C) in [0, 1] from a folder of frames (sorted by name),
    a .npy array (T, H, W[, C]), or an animated GIF/TIFF; other files need imageio's ffmpeg."""
    source = Path(path).expanduser()
    if source.is_dir():
        frames = _frames_from_folder(source)
    elif source.is_file():
        frames = _frames_from_file(source)
    else:
        raise DataNotFoundError(f"video not found (a file or a folder of frames): {source}")
    frames = frames[:max_frames] if max_frames else frames
    size = _size_pair(resize)
    if size is not None:
        frames = np.stack([_resize(frame, size) for frame in frames])
    return frames.astype(np.float32)


def _frames_from_folder(folder: Path) -> np.ndarray:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataNotFoundError(f"no image frames ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    frames = [read_image_file(p) for p in files]
    if len({f.shape for f in frames}) != 1:
        raise DataNotFoundError(f"frames in {folder} differ in size")
    return np.stack(frames)


def _frames_from_file(file: Path) -> np.ndarray:
    if file.suffix.lower() == ".npy":
        array = np.load(file)
        if array.ndim == 3:
            array = array[..., None]
        if array.ndim != 4:
            raise DataNotFoundError(f"{file}: expected an array (T, H, W[, C]), got {array.shape}")
        return np.stack([_as_float_image(frame, str(file)) for frame in array])
    import imageio.v3 as iio

    try:
        array = np.asarray(iio.imread(str(file), index=None))
    except Exception as error:  # imageio raises plugin-specific errors
        raise DataNotFoundError(f"cannot read video {file} ({error}); use a folder of frames, "
                                f"a .npy array, or install imageio-ffmpeg") from None
    if array.ndim == 3 and array.shape[-1] not in (3, 4):
        array = array[..., None]
    if array.ndim != 4:
        raise DataNotFoundError(f"{file}: expected several frames, got shape {array.shape}")
    return np.stack([_as_float_image(frame, str(file)) for frame in array])
