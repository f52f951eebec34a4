"""Cache entries on disk are checked before they are reused: a truncated, foreign or wrongly shaped file is named and
built again instead of failing in the middle of training. Reads safetensors headers only (no tensor data)."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open


def entry_problem(path: Path, expected: dict[str, tuple[int, ...] | int]) -> str | None:
    """Why an existing cache entry can't be used (truncated, not safetensors, a tensor missing or of the wrong shape);
    None if it reads. `expected`: tensor name -> its exact shape, or its number of dimensions. Reads the header only."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            names = set(f.keys())
            for name, want in expected.items():
                if name not in names:
                    return f"no {name!r} tensor"
                shape = tuple(f.get_slice(name).get_shape())
                if isinstance(want, int) and len(shape) != want:
                    return f"{name!r} has {len(shape)} dimensions, not {want}"
                if not isinstance(want, int) and shape != want:
                    return f"{name!r} has shape {list(shape)}, not {list(want)}"
    except Exception as err:  # safetensors raises its own error types for damaged files
        return f"unreadable ({err.__class__.__name__}: {str(err)[:120]})"
    return None
