"""Read clips (streamed, resampled by timestamps) and images, fit them to a bucket; write mp4s with PyAV."""

from __future__ import annotations

import os
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from trainer.data.probe import MediaError
from trainer.fileio import temp_path_beside


ClipError = MediaError  # one exception type for "this file can't be used"


def decode_frames(path: Path) -> tuple[list[np.ndarray], list[float]]:
    """All frames as RGB uint8 arrays with their presentation times in seconds (for short files: tests, checks)."""
    frames: list[np.ndarray] = []
    times: list[float] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ClipError("no video stream")
            stream = container.streams.video[0]
            fallback_rate = float(stream.average_rate or stream.guessed_rate or 16)
            for i, frame in enumerate(container.decode(stream)):
                t = float(frame.time) if frame.time is not None else i / fallback_rate
                frames.append(frame.to_ndarray(format="rgb24"))
                times.append(t)
    except av.FFmpegError as err:
        raise ClipError(f"unreadable video ({err.__class__.__name__}: {err})") from None
    if not frames:
        raise ClipError("no decodable frames")
    start = times[0]
    return frames, [t - start for t in times]


def sample_times(start: float, num_frames: int, fps: float) -> list[float]:
    """The times (s from the clip's first frame) a model at `fps` sees: start + i/fps."""
    return [start + i / fps for i in range(num_frames)]


def read_frames_at(path: Path, times: list[float], transform: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The frame shown at each time (the last one starting at or before it), each passed through `transform`.

    Streamed: frames are decoded in order and dropped unless picked, and decoding stops after the last time,
    so a long clip never sits in memory; a window late in the clip starts from a seek to the keyframe before it.
    """
    picked: list[np.ndarray | None] = [None] * len(times)
    eps = 1e-6
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ClipError("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            tb = float(stream.time_base)
            origin = float(stream.start_time * tb) if stream.start_time is not None else None
            if times[0] > 1.0 and origin is not None:
                container.seek(int((origin + times[0]) / tb), stream=stream, backward=True, any_frame=False)
            k, previous = 0, None
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                if origin is None:
                    origin = float(frame.time)
                t = float(frame.time) - origin
                while k < len(times) and times[k] < t - eps:  # `previous` is on screen at times[k]
                    if previous is None:
                        raise ClipError(f"no frame at {times[k]:.3f}s (the stream starts at {t:.3f}s)")
                    picked[k] = transform(previous.to_ndarray(format="rgb24"))
                    k += 1
                if k == len(times):
                    break
                previous = frame
            if previous is not None and k < len(times):  # the last frame stays on screen to the end of the clip
                rate = float(stream.average_rate or stream.guessed_rate or 16)
                shown = (previous.duration * tb) if previous.duration else 1.0 / rate
                end = float(previous.time) - origin + shown
                if times[-1] >= end - eps:
                    raise ClipError(f"too short: {end:.2f}s holds no frame at {times[-1]:.2f}s ({len(times)} frames wanted)")
                last = transform(previous.to_ndarray(format="rgb24"))
                picked[k:] = [last] * (len(times) - k)
    except av.FFmpegError as err:
        raise ClipError(f"unreadable video ({err.__class__.__name__}: {err})") from None
    if any(p is None for p in picked):
        raise ClipError("no decodable frames")
    return np.stack(picked)


def read_image(path: Path, transform: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """An image as a one-frame clip [1,H,W,3]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as err:
        raise ClipError(f"unreadable image ({err.__class__.__name__}: {err})") from None
    return transform(array)[None]


def fit_to_size(
    frame: np.ndarray, width: int, height: int, crop: bool = True, crop_at: tuple[float, float] = (0.5, 0.5),
    pre_scale: float | None = None,
) -> np.ndarray:
    """[H,W,3] uint8 -> [height,width,3]: scale to cover the size (or by pre_scale if larger), then crop the window
    at crop_at (fractions of the spare height, width); crop=False resizes straight to the size."""
    frame = np.ascontiguousarray(frame) if frame.flags.writeable else frame.copy()  # Pillow's arrays are read-only
    video = torch.from_numpy(frame).permute(2, 0, 1)[None].float()
    h, w = video.shape[-2:]
    if crop:
        scale = max(height / h, width / w, pre_scale or 0.0)
        new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    else:
        new_h, new_w = height, width
    if (new_h, new_w) != (h, w):
        video = F.interpolate(video, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = round((new_h - height) * crop_at[0]), round((new_w - width) * crop_at[1])
    video = video[:, :, top : top + height, left : left + width]
    return video[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def resize_center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[F,H,W,3] uint8 -> [F,height,width,3] uint8: scale to cover the target, then crop the centre."""
    return torch.from_numpy(np.stack([fit_to_size(f.numpy(), width, height) for f in frames]))


def load_clip(path: Path, num_frames: int, height: int, width: int, fps: float, start: float = 0.0) -> torch.Tensor:
    """A clip as [num_frames, height, width, 3] uint8, resampled to `fps` from `start` seconds, centre-cropped."""
    frames = read_frames_at(path, sample_times(start, num_frames, fps), lambda f: fit_to_size(f, width, height))
    return torch.from_numpy(frames)


def write_mp4(path: Path, frames: np.ndarray | torch.Tensor, fps: float, crf: int = 18, comment: str | None = None) -> Path:
    """[F,H,W,3] uint8 (or float in [0,1]) -> H.264 mp4 at `fps`, written atomically; `comment` goes into the
    container's comment tag (validation videos carry the settings they were rendered with)."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:  # yuv420p needs even sizes
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    tmp = temp_path_beside(path)
    try:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            if comment:
                container.metadata["comment"] = comment
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)}
            for array in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
