"""Signal loaders and tasks on small made-up image, WAV and video files (and the shared data)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import soundfile
import torch
from skimage import io

from deqrun.core import DEQ
from deqrun.data.signals import coordinate_grid, load_audio, load_image, load_video
from deqrun.errors import ConfigError, DataNotFoundError
from deqrun.models.inr import IMFNConfig, build_imfn
from deqrun.tasks.base import LoaderOptions
from deqrun.tasks.signal import (
    AudioFitConfig,
    ImageFitConfig,
    ImageGeneralisationConfig,
    VideoFitConfig,
    build_audio_fit,
    build_image_fit,
    build_image_generalisation,
    build_video_fit,
)

OPTIONS = LoaderOptions(batch_size=128, seed=3)


@pytest.fixture
def rgb_png(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    path = tmp_path / "small.png"
    io.imsave(str(path), pixels, check_contrast=False)
    return path, pixels


@pytest.fixture
def wav(tmp_path):
    rate = 8000
    t = np.arange(400) / rate
    stereo = np.stack([0.25 * np.sin(2 * np.pi * 440 * t), -0.5 * np.ones_like(t)], axis=1)
    path = tmp_path / "tone.wav"
    soundfile.write(str(path), stereo, rate, subtype="PCM_16")
    return path, stereo.mean(axis=1), rate


@pytest.fixture
def frames_dir(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    rng = np.random.default_rng(1)
    clip = rng.integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    for t, frame in enumerate(clip):
        io.imsave(str(folder / f"f{t:02d}.png"), frame, check_contrast=False)
    return folder, clip


def test_grid_spans_minus_one_to_one_in_ij_order():
    grid = coordinate_grid((3, 2))
    assert grid.shape == (6, 2)
    torch.testing.assert_close(grid[:, 0], torch.tensor([-1.0, -1, 0, 0, 1, 1]))
    torch.testing.assert_close(grid[:, 1], torch.tensor([-1.0, 1, -1, 1, -1, 1]))


def test_image_loader_reads_rgb_grey_and_resizes(rgb_png):
    path, pixels = rgb_png
    image = load_image(str(path))
    np.testing.assert_allclose(image, pixels / 255.0, atol=1e-6)
    grey = load_image(str(path), grey=True)
    assert grey.shape == (6, 8, 1) and 0 <= grey.min() and grey.max() <= 1
    assert load_image(str(path), resize=[3, 4]).shape == (3, 4, 3)
    assert load_image(None, resize=[32]).shape == (32, 32, 1)  # scikit-image's camera
    with pytest.raises(DataNotFoundError, match="not found"):
        load_image(str(path.with_name("missing.png")))
    with pytest.raises(ConfigError, match="resize"):
        load_image(str(path), resize=[1, 2, 3])


def test_audio_loader_mixes_to_mono_and_normalises(wav):
    path, mono, rate = wav
    samples, got_rate, amplitude = load_audio(str(path))
    assert got_rate == rate and samples.shape == mono.shape
    assert amplitude == pytest.approx(np.abs(mono).max(), abs=1e-4)
    np.testing.assert_allclose(samples, mono / np.abs(mono).max(), atol=1e-3)
    assert np.abs(samples).max() == pytest.approx(1.0)
    with pytest.raises(DataNotFoundError):
        load_audio(str(path.with_name("none.wav")))


def test_video_loader_reads_folders_npy_and_gif(frames_dir, tmp_path):
    folder, clip = frames_dir
    frames = load_video(str(folder))
    np.testing.assert_allclose(frames, clip / 255.0, atol=1e-6)
    assert load_video(str(folder), max_frames=2, resize=[2, 3]).shape == (2, 2, 3, 3)
    np.save(tmp_path / "clip.npy", clip)
    np.testing.assert_allclose(load_video(str(tmp_path / "clip.npy")), frames, atol=1e-6)
    import imageio.v3 as iio

    iio.imwrite(tmp_path / "clip.gif", clip, loop=0)
    assert load_video(str(tmp_path / "clip.gif")).shape[:3] == (3, 4, 5)
    with pytest.raises(DataNotFoundError):
        load_video(str(tmp_path / "missing"))


def test_image_fit_task_full_batch_and_psnr(rgb_png):
    path, pixels = rgb_png
    task = build_image_fit(ImageFitConfig(path=str(path)))
    spec = task.model_spec()
    assert spec.in_shape == (2,) and spec.out_features == 3
    # the reference's 256 for 512 pixels, scaled to the shorter side (6 pixels); SIREN gets half
    assert spec.extra["input_scale"] == pytest.approx(3.0)
    assert spec.extra["siren_input_scale"] == pytest.approx(1.5)
    given = build_image_fit(ImageFitConfig(path=str(path), input_scale=40.0)).model_spec()
    assert (given.extra["input_scale"], given.extra["siren_input_scale"]) == (40.0, 20.0)
    (batch,) = task.train_batches(0, OPTIONS)
    assert batch.coords.shape == (48, 2) and batch.index is None
    assert batch.target.min() >= -1 and batch.target.max() <= 1
    output = batch.target + 0.2  # error 0.1 on [0, 1] except where clipping at 1 helps
    sums = task.metric_sums(output, batch)
    mse = float((((output.clamp(-1, 1) - batch.target) / 2) ** 2).mean())
    assert task.reduce(sums)["psnr"] == pytest.approx(-10 * math.log10(mse))
    assert task.reduce(sums)["loss"] == pytest.approx(0.04, rel=1e-5)


def test_minibatches_are_seeded_by_seed_and_epoch(rgb_png):
    task = build_image_fit(ImageFitConfig(path=str(rgb_png[0]), batch_size=10))
    first = [b.index for b in task.train_batches(2, OPTIONS)]
    again = [b.index for b in task.train_batches(2, OPTIONS)]
    other = [b.index for b in task.train_batches(3, OPTIONS)]
    assert len(first) == 5 and all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    assert sorted(torch.cat(first).tolist()) == list(range(48))


def test_generalisation_interleaves_train_and_test_pixels(rgb_png):
    path, pixels = rgb_png
    task = build_image_generalisation(ImageGeneralisationConfig(path=str(path)))
    (train,) = task.train_batches(0, OPTIONS)
    (test,) = task.eval_batches("test", OPTIONS)
    grid = coordinate_grid((6, 8)).reshape(6, 8, 2)
    torch.testing.assert_close(train.coords, grid[::2, ::2].reshape(-1, 2))
    torch.testing.assert_close(test.coords, grid[1::2, 1::2].reshape(-1, 2))
    expected = torch.from_numpy(pixels[1::2, 1::2] / 255.0).reshape(-1, 3).float() * 2 - 1
    torch.testing.assert_close(test.target, expected)
    with pytest.raises(ConfigError, match="task.image"):
        build_image_generalisation(ImageGeneralisationConfig(path=str(path.parent), image=5))


def test_video_task_reports_per_frame_psnr(frames_dir):
    folder, clip = frames_dir
    task = build_video_fit(VideoFitConfig(path=str(folder), eval_batch_size=7))
    assert task.model_spec().in_shape == (3,)
    batches = task.eval_batches("test", OPTIONS)
    sums: dict[str, float] = {}
    errors: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for batch in batches:
        noisy = (batch.target + 0.02 * (batch.frame.float() + 1).unsqueeze(1)).clamp(-1, 1)
        for key, value in task.metric_sums(noisy, batch).items():
            sums[key] = sums.get(key, 0.0) + value
        for row, t in enumerate(batch.frame.tolist()):
            errors[t] += (((noisy[row] - batch.target[row]) / 2) ** 2).tolist()
    psnrs = [-10 * math.log10(np.mean(errors[t])) for t in range(3)]
    reduced = task.reduce(sums)
    assert reduced["psnr"] == pytest.approx(np.mean(psnrs))
    assert reduced["psnr_std"] == pytest.approx(np.std(psnrs))
    assert len(batches) == math.ceil(60 / 7)
    with pytest.raises(ConfigError, match="task.path"):
        build_video_fit(VideoFitConfig())


def test_shared_kodak_and_bach_load(shared_data):
    task = build_image_generalisation(ImageGeneralisationConfig(
        path=str(shared_data / "images"), image=1, resize=[64, 96]))
    assert len(task.train) == 32 * 48 and "kodim19" in task.notes[0]
    audio = build_audio_fit(AudioFitConfig(path=str(shared_data / "audio" / "gt_bach.wav"),
                                            seconds=0.01))
    assert audio.rate == 44100 and len(audio.train) == 441
    # the reference's 25000 for the whole clip (308 207 samples), scaled to 441 samples
    assert audio.model_spec().extra["input_scale"] == pytest.approx(25000 * 441 / 308_207)
    full = build_audio_fit(AudioFitConfig(path=str(shared_data / "audio" / "gt_bach.wav")))
    assert full.model_spec().extra["input_scale"] == pytest.approx(25000)


@pytest.mark.parametrize("kind", ["image", "audio", "video"])
def test_artifacts_are_written(kind, rgb_png, wav, frames_dir, tmp_path, caplog):
    if kind == "image":
        task = build_image_generalisation(ImageGeneralisationConfig(path=str(rgb_png[0])))
    elif kind == "audio":
        task = build_audio_fit(AudioFitConfig(path=str(wav[0])))
    else:
        task = build_video_fit(VideoFitConfig(path=str(frames_dir[0]), batch_size=16))
    deq = DEQ("fixed_point", "npg", f_max_iter=30, f_tol=1e-3, k=2, lambda_=1.0)
    model = build_imfn(IMFNConfig(size="1L-8D", filter="gabor"), deq, task.model_spec())
    task.final_metrics([{"epoch": 1, "test_psnr": 10.0, "train_psnr": 9.0},
                        {"epoch": 2, "test_psnr": 12.0, "train_psnr": 11.0}])
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="deqrun"):
        metrics = task.artifacts(model, run_dir, torch.device("cpu"))
    assert (run_dir / "psnr.png").is_file()
    expected = {"image": ["comparison.png", "reconstruction.png"],
                "audio": ["reconstruction.wav", "waveform.png"],
                "video": ["frames.png", "frames/frame_0000.png"]}[kind]
    assert all((run_dir / name).is_file() for name in expected)
    psnr = metrics["wav_psnr" if kind == "audio" else "render_psnr"]
    assert 0 < psnr < 60
    if kind == "audio":
        written, rate = soundfile.read(str(run_dir / "reconstruction.wav"))
        assert rate == 8000 and len(written) == 400
        target = task.full.target.numpy()[:, 0]
        file_psnr = -10 * math.log10(float(np.mean(((written - target) / 2) ** 2)))
        assert psnr == pytest.approx(file_psnr, abs=1e-4)  # the file's PSNR, as written
        assert f"wav_psnr={psnr:.4g}" in caplog.text
