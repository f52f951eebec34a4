"""Whether a safetensors file holds NaN or inf, read without torch (numpy over the file's own bytes), so `wanforge
check --resume` and the resume itself refuse a checkpoint that would only diverge later, naming the file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from trainer.errors import UserError

# dtype -> (numpy view of the raw bytes, mask of the exponent bits that mark inf/NaN when all set)
RESUMED_FILES = ("adapter.safetensors", "state.safetensors")  # trainer.loop.checkpointing's weights and optimizer state
CHUNK = 64 * 2**20  # bytes read at a time
_FLOATS = {"F64": (np.float64, None), "F32": (np.float32, None), "F16": (np.float16, None),
           "BF16": (np.uint16, 0x7F80), "F8_E5M2": (np.uint8, 0x7C), "F8_E4M3": (np.uint8, 0x7F)}


def first_nonfinite(path: Path) -> str | None:
    """The name of the first tensor in the file holding NaN or inf; None when every value is finite. A file that is
    not safetensors raises ValueError (its reader names that problem)."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("too short for a safetensors header")
        (size,) = struct.unpack("<Q", head)
        header = json.loads(f.read(size))
        start = 8 + size
        entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__" and v.get("dtype") in _FLOATS),
                         key=lambda kv: kv[1]["data_offsets"][0])
        for name, info in entries:
            begin, end = info["data_offsets"]
            dtype, mask = _FLOATS[info["dtype"]]
            step = CHUNK // np.dtype(dtype).itemsize * np.dtype(dtype).itemsize
            f.seek(start + begin)
            for at in range(begin, end, step):
                values = np.frombuffer(f.read(min(step, end - at)), dtype=dtype)
                if ((values & mask) == mask).any() if mask is not None else not np.isfinite(values).all():
                    return name
    return None


def require_finite_checkpoint(folder: Path, files: tuple[str, ...]) -> None:
    """Refuse a checkpoint whose weights or optimizer state hold NaN/inf: the file and tensor named, and the newest
    earlier checkpoint that is finite as the one to resume from."""
    for name in files:
        path = folder / name
        try:
            bad = first_nonfinite(path)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable: the checkpoint reader names that
        if bad is None:
            continue
        earlier = _finite_before(folder, files)
        fix = (f"resume from an earlier one: --resume {earlier}" if earlier is not None else
               "no earlier checkpoint is finite: start again in a new train.output_dir, with a lower "
               "optim.learning_rate")
        raise UserError(f"{path}: tensor {bad!r} holds NaN or inf, so this checkpoint can't be resumed (training "
                        f"from it would only diverge): {fix}")


def _finite_before(folder: Path, files: tuple[str, ...]) -> Path | None:
    from trainer.rundir import RunDir

    step = _step_of(folder)
    for s, other in reversed(RunDir(folder.parent.parent).complete_checkpoints()):
        if step is not None and s >= step:
            continue
        try:
            if all(first_nonfinite(other / name) is None for name in files):
                return other
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _step_of(folder: Path) -> int | None:
    try:
        return int(folder.name.removeprefix("step-"))
    except ValueError:
        return None
