"""One PNG per validation for a quick look: a row per video, evenly spaced frames across, above each row its label
(the video's name and the settings it was rendered with), wrapped to the sheet's width."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from trainer.fileio import atomic_write_bytes

LABEL_HEIGHT = 14


def frame_indices(num_frames: int, columns: int) -> list[int]:
    """`columns` evenly spaced frames including the first and the last."""
    if num_frames <= columns:
        return list(range(num_frames))
    return [round(i * (num_frames - 1) / (columns - 1)) for i in range(columns)]


def _to_uint8(frames: np.ndarray) -> np.ndarray:
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def wrap_label(draw: ImageDraw.ImageDraw, label: str, width: int) -> list[str]:
    """The label in lines that fit `width` pixels, broken at spaces (a word longer than a line is cut by characters)."""
    lines: list[str] = []
    for word in label.split(" "):
        line = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(line) + 4 <= width:
            lines[-1] = line
            continue
        while draw.textlength(word) + 4 > width and len(word) > 1:
            cut = max(1, next((n for n in range(len(word), 0, -1) if draw.textlength(word[:n]) + 4 <= width), 1))
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines or [""]


def contact_sheet(rows: list[tuple[str, np.ndarray]], path: Path, columns: int = 8, max_tile_width: int = 256) -> Path:
    """rows: (label, frames [F,H,W,3] uint8 or float in [0,1]). Tiles keep the video's aspect ratio; a label takes
    LABEL_HEIGHT pixels per line."""
    if not rows:
        raise ValueError("a contact sheet needs at least one video")
    height, width = rows[0][1].shape[1:3]
    scale = min(1.0, max_tile_width / width)
    tile_w, tile_h = max(1, round(width * scale)), max(1, round(height * scale))
    cols = min(columns, max(len(frames) for _, frames in rows))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = [wrap_label(measure, label, cols * tile_w) for label, _ in rows]
    tops = np.cumsum([0] + [tile_h + LABEL_HEIGHT * len(lines) for lines in labels]).tolist()
    sheet = Image.new("RGB", (cols * tile_w, tops[-1]), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for r, ((_, frames), lines) in enumerate(zip(rows, labels)):
        top = tops[r]
        for n, line in enumerate(lines):
            draw.text((2, top + 1 + n * LABEL_HEIGHT), line, fill=(255, 255, 255))
        frames = _to_uint8(frames)
        for c, i in enumerate(frame_indices(len(frames), cols)):
            tile = Image.fromarray(frames[i]).resize((tile_w, tile_h), Image.Resampling.BILINEAR)
            sheet.paste(tile, (c * tile_w, top + LABEL_HEIGHT * len(lines)))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path
