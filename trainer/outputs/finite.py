"""No non-finite tensor is ever written or uploaded: savers and uploaders call `require_finite` first."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from trainer.errors import UserError


class NonFiniteError(UserError):
    """Tensors with NaN or inf where a file or an upload was about to be made."""


def require_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise NonFiniteError naming `what` and a bad tensor unless every value is finite (one host sync per device)."""
    by_device: dict[torch.device, list[str]] = {}
    for k, v in tensors.items():
        if v.is_floating_point() or v.is_complex():
            by_device.setdefault(v.device, []).append(k)
    bad = []
    for names in by_device.values():  # one host sync per device
        flags = torch.stack([torch.isfinite(tensors[k]).all() for k in names]).tolist()
        bad += [k for k, ok in zip(names, flags) if not ok]
    if bad:
        names = [k for group in by_device.values() for k in group]
        raise NonFiniteError(f"{what}: {len(bad)} of {len(names)} tensors hold NaN or inf (first: {bad[0]}); "
                             "refusing to write or upload it")


def require_finite_files(paths: list[Path], what: str) -> None:
    """The same for safetensors files on disk (uploads of files written earlier)."""
    from safetensors.torch import load_file

    for path in paths:
        if path.suffix == ".safetensors" and path.is_file():
            require_finite(load_file(str(path)), f"{what} ({path.name})")
