"""Atomic writes: a crash never leaves a half-written file under its final name.

Temporary files are created beside their target as `.tmp-<name>.<random><suffix>` with mode 0666 filtered by the
user's umask (tempfile.mkstemp would force 0600 on every output), then renamed into place. Everything of that name
in a run folder is a leftover of a killed process: `remove_stale_temp` clears them when the next run starts.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TEMP_PREFIX = ".tmp-"


def umask_mode(base: int = 0o666) -> int:
    """`base` as the user's umask filters it: what open() would give a new file. For files a library writes with
    its own mode (safetensors writes 0600). Read from /proc where it exists, since setting the umask to read it
    races other threads."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return base & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return base & ~mask


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new, empty, uniquely named file beside `path`, opened for writing (O_EXCL: never someone else's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = path.parent / f"{TEMP_PREFIX}{path.stem}.{secrets.token_hex(4)}{path.suffix}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp  # the umask applies
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def temp_path_beside(path: Path) -> Path:
    """A unique hidden name in the same folder, for writers that need a path (safetensors, PyAV): rename it after.
    The file exists (empty, umask mode) so the writer's truncating open keeps that mode."""
    fd, tmp = _create_temp(path)
    os.close(fd)
    return tmp


def remove_stale_temp(folder: Path, recursive: bool = True) -> list[Path]:
    """Delete every `.tmp-*` file or folder in `folder` (a killed writer's leftovers); returns what went.
    Call only while holding the folder's lock, so no live writer's temp file is touched."""
    removed = []
    if not folder.is_dir():
        return removed
    found = folder.rglob(f"{TEMP_PREFIX}*") if recursive else folder.glob(f"{TEMP_PREFIX}*")
    for path in sorted(found, key=lambda p: len(p.parts)):
        if not path.exists() and not path.is_symlink():  # inside a folder removed a moment ago
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def atomic_save_safetensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """safetensors.torch.save_file into a temp name beside `path`, then renamed into place."""
    from safetensors.torch import save_file

    tmp = temp_path_beside(path)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


WRITERS_LOCK = ".wanforge-writers.lock"


@contextmanager
def writing_into(folders: list[Path]) -> Iterator[list[Path]]:
    """Hold a shared lock on each folder while writing into it (caches that several runs and processes fill at
    once). The first writer to find no other one there (its exclusive lock succeeds) first clears the `.tmp-*`
    leftovers of killed writers: a cache never keeps a dead process's temp files, and never loses a live one's.
    Yields the leftovers removed. Without flock (Windows) nothing is cleared."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield []
        return
    fds: list[int] = []
    removed: list[Path] = []
    try:
        for folder in dict.fromkeys(folders):
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder / WRITERS_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                removed += remove_stale_temp(folder)
            except BlockingIOError:
                pass  # another writer is at work: its temp files are live
            except OSError:  # a filesystem without locks: clear nothing
                continue
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield removed
    finally:
        for fd in fds:
            os.close(fd)
