"""Frames are picked by time at the model's fps: clips at 8, 24 and 30 fps carry a frame counter we decode back."""

import logging

import numpy as np
import pytest

from trainer.config.data import DatasetConfig
from trainer.config.files import config_from_dict
from trainer.data.buckets import frame_count
from trainer.data.cache import latent_spec, read_sample
from trainer.data.discovery import scan_dataset
from trainer.data.probe import probe
from trainer.data.video import read_frames_at, sample_times, write_mp4
from trainer.flavours import FLAVOURS

BITS = 8  # the frame index as 8 black/white 16x16 blocks (2 rows x 4): survives H.264 at its default quality


def counter_clip(n: int) -> np.ndarray:
    frames = np.full((n, 32, 64, 3), 16, dtype=np.uint8)
    for i in range(n):
        for bit in range(BITS):
            if i >> bit & 1:
                r, c = divmod(bit, 4)
                frames[i, r * 16 : r * 16 + 16, c * 16 : c * 16 + 16] = 235
    return frames


def read_counter(frames: np.ndarray) -> list[int]:
    out = []
    for f in frames:
        value = 0
        for bit in range(BITS):
            r, c = divmod(bit, 4)
            if f[r * 16 + 4 : r * 16 + 12, c * 16 + 4 : c * 16 + 12].mean() > 128:
                value |= 1 << bit
        out.append(value)
    return out


def expected(source_fps: float, start_frame: int, n: int, model_fps: float = 16) -> list[int]:
    """The source frame on screen at t = (start + i) / model_fps (exact integer arithmetic)."""
    return [int((start_frame + i) * source_fps // model_fps) for i in range(n)]


@pytest.fixture(scope="module")
def counter_clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("counter")
    for fps in (8, 24, 30):
        write_mp4(folder / f"count_{fps}fps.mp4", counter_clip(fps * 2), fps=fps)  # 2 s each
        (folder / f"count_{fps}fps.txt").write_text(f"a counter at {fps} fps")
    write_mp4(folder / "long_30fps.mp4", counter_clip(150), fps=30)  # 5 s: windows late in the clip
    (folder / "long_30fps.txt").write_text("a long counter")
    return folder


def test_counter_survives_encoding(counter_clips):
    from trainer.data.video import decode_frames

    frames, _ = decode_frames(counter_clips / "count_30fps.mp4")
    assert read_counter(np.stack(frames)) == list(range(60))


def test_dataset_frames_are_the_16fps_picks(counter_clips):
    """Through the cache path (scan -> bucket -> entry spec -> streamed read), for 8, 24 and 30 fps sources."""
    ds = DatasetConfig(path=counter_clips, width=64, height=32, num_frames=17)
    scan = scan_dataset(ds, 0, "tiny")
    by_name = {c.video.name: c for c in scan.clips}
    for fps in (8, 24, 30):
        clip = by_name[f"count_{fps}fps.mp4"]
        assert clip.info.fps == pytest.approx(fps) and clip.info.frames_at(16) == 32  # 2 s at 16 fps
        assert clip.bucket.key == "64x32@17"
        frames = read_sample(latent_spec(ds, "tiny", clip)).numpy()
        assert read_counter(frames) == expected(fps, 0, 17), fps
    # 8 fps: every source frame twice; 30 fps: 0, 1, 3, 5, 7, 9, 11, 13, 15, 16, ... (not consecutive frames)
    assert expected(8, 0, 6) == [0, 0, 1, 1, 2, 2] and expected(30, 0, 10) == [0, 1, 3, 5, 7, 9, 11, 13, 15, 16]


def test_random_window_starts_on_the_16fps_grid(counter_clips):
    ds = DatasetConfig(path=counter_clips, width=64, height=32, num_frames=17, window_start="random",
                       caption_strategy="filename")
    clip = next(c for c in scan_dataset(ds, 0, "tiny").clips if c.video.name == "long_30fps.mp4")
    spec = latent_spec(ds, "tiny", clip)
    start_frame = round(spec.start * 16)
    assert spec.start * 16 == pytest.approx(start_frame) and 0 <= start_frame <= 80 - 17
    assert spec == latent_spec(ds, "tiny", clip)  # fixed per clip: the cache entry stays valid
    assert read_counter(read_sample(spec).numpy()) == expected(30, start_frame, 17)


def test_late_window_seeks_and_streams(counter_clips):
    """A window at 2.5 s (a seek to the keyframe before it, then decoding forward) picks the same frames."""
    frames = read_frames_at(counter_clips / "long_30fps.mp4", sample_times(2.5, 17, 16), lambda f: f)
    assert read_counter(frames) == expected(30, 40, 17)


def test_short_clips_skipped_with_reason_and_frame_buckets(counter_clips):
    info = probe(counter_clips / "count_8fps.mp4")  # 2 s: 32 frames at 16 fps
    tiny = FLAVOURS["tiny"]
    frames, why = frame_count(DatasetConfig(path=counter_clips, num_frames=81), tiny, info, 16)
    assert frames is None and why.startswith("too short") and "32 frames at 16 fps" in why and "81" in why
    # min_frames lets shorter clips train at their own length, rounded down to 1 + k * frame_interval
    assert frame_count(DatasetConfig(path=counter_clips, num_frames=81, min_frames=17), tiny, info, 16) == (29, None)
    assert frame_count(DatasetConfig(path=counter_clips, num_frames=81, min_frames=17, frame_interval=16),
                       tiny, info, 16) == (17, None)
    frames, why = frame_count(DatasetConfig(path=counter_clips, num_frames=17, max_frames=24), tiny, info, 16)
    assert frames is None and why.startswith("too long")
    scan = scan_dataset(DatasetConfig(path=counter_clips, width=64, height=32, num_frames=41), 0, "tiny")
    reasons = {p.name: why for p, why in scan.problems}
    assert reasons["count_24fps.mp4"].startswith("too short") and "long_30fps.mp4" not in reasons


def test_frame_counts_round_to_4k_plus_1_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="trainer.config"):
        cfg = config_from_dict({"datasets": [{"path": "x", "num_frames": 80}]})
    assert cfg.datasets[0].num_frames == 81
    assert "num_frames=80 is not 4k+1" in caplog.text and "using 81" in caplog.text
    assert config_from_dict({"datasets": [{"path": "x", "num_frames": 19}]}).datasets[0].num_frames == 17


def test_model_fps_is_configurable(counter_clips):
    """TI2V-5B trains at 24 fps: a 24 fps source is then read frame by frame."""
    ds = DatasetConfig(path=counter_clips, width=64, height=32, num_frames=17)
    clip = next(c for c in scan_dataset(ds, 0, "tiny-ti2v").clips if c.video.name == "count_24fps.mp4")
    assert read_counter(read_sample(latent_spec(ds, "tiny-ti2v", clip)).numpy()) == list(range(17))
    ds = DatasetConfig(path=counter_clips, width=64, height=32, num_frames=9, target_fps=12)
    clip = next(c for c in scan_dataset(ds, 0, "tiny").clips if c.video.name == "count_24fps.mp4")
    assert read_counter(read_sample(latent_spec(ds, "tiny", clip)).numpy()) == expected(24, 0, 9, model_fps=12)


@pytest.mark.parametrize("ext, codec, fmt", [(".avi", "mpeg4", "avi"), (".webm", "libvpx-vp9", "webm"),
                                             (".mkv", "libx264", "matroska"), (".mov", "libx264", "mov")])
def test_other_containers(tmp_path, ext, codec, fmt):
    """webm / mkv headers often carry no frame count: length comes from the packets' timestamps."""
    from fractions import Fraction

    import av

    path = tmp_path / f"clip{ext}"
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=Fraction(24))
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        if codec == "mpeg4":
            stream.options = {"qscale": "2"}
        for frame in counter_clip(48):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    info = probe(path)
    assert (info.frames, info.frames_at(16), info.fps) == (48, 32, 24)
    assert read_counter(read_frames_at(path, sample_times(0, 17, 16), lambda f: f)) == expected(24, 0, 17)
