"""Read clips and write mp4s with PyAV."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from trainer.fileio import temp_path_beside


class ClipError(Exception):
    """A clip that can't be used; the message says why (the file is skipped, not the run)."""


def decode_frames(path: Path) -> tuple[list[np.ndarray], list[float]]:
    """All frames as RGB uint8 arrays with their presentation times in seconds."""
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


def sample_at_fps(times: list[float], num_frames: int, fps: float) -> list[int]:
    """Indices of the source frames shown at t = i/fps for i < num_frames, so motion keeps its real speed."""
    duration = times[-1] + (times[-1] - times[-2] if len(times) > 1 else 1.0 / fps)
    needed = (num_frames - 1) / fps
    if needed >= duration + 1e-6:
        raise ClipError(f"too short: {duration:.2f}s holds fewer than {num_frames} frames at {fps:g} fps")
    picks = []
    j = 0
    for i in range(num_frames):
        t = i / fps + 1e-6
        while j + 1 < len(times) and times[j + 1] <= t:
            j += 1
        picks.append(j)
    return picks


def resize_center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[F,H,W,3] uint8 -> [F,height,width,3] uint8: scale to cover the target, then crop the centre."""
    video = frames.permute(0, 3, 1, 2).float()
    h, w = video.shape[-2:]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        video = F.interpolate(video, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    video = video[:, :, top : top + height, left : left + width]
    return video.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def load_clip(path: Path, num_frames: int, height: int, width: int, fps: float) -> torch.Tensor:
    """A clip as [num_frames, height, width, 3] uint8, resampled to `fps` from its start."""
    frames, times = decode_frames(path)
    picks = sample_at_fps(times, num_frames, fps)
    video = torch.from_numpy(np.stack([frames[i] for i in picks]))
    return resize_center_crop(video, height, width)


def write_mp4(path: Path, frames: np.ndarray | torch.Tensor, fps: float, crf: int = 18) -> Path:
    """[F,H,W,3] uint8 (or float in [0,1]) -> H.264 mp4 at `fps`, written atomically."""
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
