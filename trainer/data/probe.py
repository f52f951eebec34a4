"""What a media file holds (size, frame rate, length) without decoding it: PyAV demuxes packets, Pillow reads headers.

Kept free of torch so `wanforge check` scans a dataset quickly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from trainer.errors import UserError

VIDEO_EXTENSIONS = {".mp4", ".mov", ".webm", ".mkv", ".avi"}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp"}


class MediaError(Exception):
    """A file that can't be used; the message says why (the file is skipped, not the run)."""


@dataclass(frozen=True)
class MediaInfo:
    kind: str  # "video" or "image"
    width: int
    height: int
    frames: int  # source frames (1 for an image)
    duration: float  # seconds from the first frame's start to the last frame's end (0 for an image)
    fps: float  # average source frame rate (0 for an image)

    def frames_at(self, fps: float) -> int:
        """How many frames a resampling to `fps` gets out of this clip (frame i shows time i/fps)."""
        if self.kind == "image":
            return 1
        return max(0, int(self.duration * fps - 1e-6) + 1) if self.duration > 0 else 0

    def to_dict(self) -> dict:
        return asdict(self)


def probe(path: Path) -> MediaInfo:
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise MediaError("empty file")
    if suffix in IMAGE_EXTENSIONS:
        return probe_image(path)
    return probe_video(path)


def _library(module: str, package: str):
    """PyAV / Pillow, or one UserError saying how to get it (an environment built before the launcher's [launch]
    extra had them scans no clip; never a traceback)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"the clips can't be read in this Python ({package} is not installed): pip install "
                        f'"{package}" (the launcher environment: .venv-launch/bin/pip install -c constraints-launch.txt '
                        '-e ".[launch]"), or run `wanforge check` in the trainer environment') from None


def probe_image(path: Path) -> MediaInfo:
    pil = _library("PIL.Image", "pillow")
    Image, UnidentifiedImageError = pil, pil.UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()  # reads the whole file: a truncated image fails here, not in the middle of caching
            width, height = im.size
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as err:
        raise MediaError(f"unreadable image ({err.__class__.__name__}: {err})") from None
    return MediaInfo("image", width, height, 1, 0.0, 0.0)


def probe_video(path: Path) -> MediaInfo:
    """Exact frame count and duration from the packets' timestamps (headers of webm/mkv often lack a frame count)."""
    av = _library("av", "av")

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError("no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            tb = float(stream.time_base)
            header_rate = float(stream.average_rate or stream.guessed_rate or 0)  # read while open: av 19 frees it on close
            first = last = None
            last_duration = 0
            count = 0
            for packet in container.demux(stream):
                if packet.pts is None or packet.size == 0:
                    continue
                count += 1
                first = packet.pts if first is None else min(first, packet.pts)
                if last is None or packet.pts >= last:
                    last, last_duration = packet.pts, packet.duration or 0
    except av.FFmpegError as err:
        raise MediaError(f"unreadable video ({err.__class__.__name__}: {err})") from None
    if count == 0 or not width or not height:
        raise MediaError("no video frames")
    rate = header_rate or (count / max((last - first) * tb, 1e-9))
    frame_time = last_duration * tb if last_duration else 1.0 / rate
    duration = (last - first) * tb + frame_time
    return MediaInfo("video", width, height, count, duration, rate)
