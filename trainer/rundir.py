"""The run folder contract (docs/runs.md): config.toml, checkpoints/step-N/, lora/, validation/step-N/, metrics.jsonl,
run.json, and the lock that keeps it to one writer."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Literal, get_args

from trainer.errors import UserError, is_disk_full
from trainer.fileio import atomic_write_json, atomic_write_text, remove_stale_temp

log = logging.getLogger(__name__)

RunStatus = Literal["caching", "training", "completed", "stopped", "failed", "upload_failed"]
"""run.json `status`, the one set every tool reads:
- caching: building the latent / text caches;  training: in the loop (`step` is the last finished step);
- completed: the final LoRA (and the final validation, if configured) exist;
- stopped: SIGTERM / Ctrl-C after saving a checkpoint, or before there was anything to save; resumable;
- failed: an error, or a non-finite loss / gradient (`error` says which; `last_good_checkpoint` where to go on);
- upload_failed: training finished and the final LoRA exists, but the final upload did not verify (`error`)."""
STATUSES: tuple[str, ...] = get_args(RunStatus)
FINAL_STATUSES: tuple[str, ...] = ("completed", "stopped", "failed", "upload_failed")
CHECKPOINT_MARKER = "wanforge_state.json"
LOCK_FILE = ".wanforge.lock"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _overwrite_in_place(path: Path, text: str) -> None:
    """On a full disk a new file can't be made, but an existing small one can be rewritten in the blocks it already
    has: run.json still tells the truth after the disk ran out (not atomic, which only a full disk justifies)."""
    data = text.encode("utf-8")
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_manifest(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """name -> {"size", "sha256"} of a checkpoint's files: the marker lists them, so a copy that lost or cut one short
    (an asynchronous bucket upload, an rsync stopped midway) is told apart from a finished checkpoint."""
    return {name: {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)} for name in names}


def checkpoint_problem(folder: Path, verify_hashes: bool = False) -> str | None:
    """Why `folder` is not a complete checkpoint (its marker missing or unreadable, a listed file missing or of
    another size, with verify_hashes another sha256), or None. A marker without a file list (written before the
    list existed) counts as complete."""
    marker = folder / CHECKPOINT_MARKER
    if not marker.is_file():
        return f"no {CHECKPOINT_MARKER}"
    try:
        files = json.loads(marker.read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return f"{CHECKPOINT_MARKER} is unreadable (cut short?)"
    if files is None:
        return None
    if not isinstance(files, dict):
        return f"{CHECKPOINT_MARKER} has no valid file list"
    problems = []
    for name, entry in sorted(files.items()):
        path = folder / name
        if Path(name).name != name or not isinstance(entry, dict):
            return f"{CHECKPOINT_MARKER} lists {name!r}, not a file of the checkpoint"
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != entry.get("size"):
            problems.append(f"{name} has {path.stat().st_size} of its {entry.get('size')} bytes")
    if not problems and verify_hashes:  # sizes first (cheap, and what an unfinished copy shows), then the contents
        problems = [f"{name} does not match its sha256" for name, entry in sorted(files.items())
                    if file_sha256(folder / name) != entry.get("sha256")]
    return ", ".join(problems) or None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class RunDir:
    def __init__(self, root: Path):
        self.root = root
        self.checkpoints = root / "checkpoints"
        self.lora = root / "lora"
        self.validation = root / "validation"
        self.metrics = root / "metrics.jsonl"
        self.run_json = root / "run.json"
        self.config = root / "config.toml"
        self._lock_fd: int | None = None

    def create(self) -> None:
        for d in (self.root, self.checkpoints, self.lora, self.validation):
            d.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- one writer
    def lock(self, command: str) -> None:
        """Hold the run folder for this process (flock: the kernel drops it when the process dies, however it dies).
        A second writer gets a UserError naming the holder at once."""
        try:
            import fcntl
        except ImportError:  # Windows: no flock; runs there are single-user notebooks
            return
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            try:
                h = json.loads(holder)
                holder = f"`wanforge {h['command']}`, PID {h['pid']} on {h['host']}, since {h['since']}"
            except (ValueError, KeyError, TypeError):
                pass
            raise UserError(f"{self.root} is in use by another wanforge process ({holder}): wait for it to end or "
                            "stop it, or set train.output_dir to another folder") from None
        except OSError as err:  # a filesystem without locks (some bucket mounts): run, but say so
            os.close(fd)
            log.warning("%s: cannot lock the run folder (%s); make sure only one process writes to it", path, err)
            return
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"command": command, "pid": os.getpid(), "host": socket.gethostname(),
                                 "since": _now()}).encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock; the file stays (unlinking it would race a new holder)
            self._lock_fd = None

    def remove_stale_temp(self) -> None:
        """Temp files and folders of killed writers (`.tmp-*`) in the folders a run writes (not elsewhere: the run
        folder may sit inside someone else's). Call while holding the lock."""
        removed = remove_stale_temp(self.root, recursive=False)
        for folder in (self.checkpoints, self.lora, self.validation):
            removed += remove_stale_temp(folder)
        for path in removed:
            log.info("removed %s (left by a killed run)", path)

    # ---------------------------------------------------------------- status
    def read_status(self) -> dict[str, Any]:
        if self.run_json.is_file():
            try:
                return json.loads(self.run_json.read_text())
            except ValueError:  # written atomically, so only a hand edit breaks it; start it over
                return {}
        return {}

    def write_status(self, status: RunStatus | None = None, fresh: bool = False, **fields: Any) -> None:
        """Update run.json. `fresh`: a new start, keeping only the run id (no stale error, LoRA or videos)."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"run.json status {status!r} is not one of {STATUSES}")
        old = self.read_status()
        data = {k: old[k] for k in ("run_id",) if k in old} if fresh else old
        data.update(fields, updated_at=_now())
        if status is not None:
            data["status"] = status
        try:
            atomic_write_json(self.run_json, data)
        except OSError as err:
            if not is_disk_full(err) or not self.run_json.is_file():
                raise
            _overwrite_in_place(self.run_json, json.dumps(data, indent=2, sort_keys=True) + "\n")

    # ---------------------------------------------------------------- metrics
    def log_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics_after(self, step: int, drop_after_checkpoint: bool = False) -> list[str]:
        """Keep the records of steps <= `step` so a resumed curve has no duplicate tail; returns the dropped lines.
        A torn line (a kill mid-write) is dropped and the file rewritten whole. `drop_after_checkpoint`: also drop
        step `step`'s records written after its checkpoint (eval, validation: they are about to be made again)."""
        if not self.metrics.is_file():
            return []
        kept, dropped = [], []
        for line in self.metrics.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
                at = int(record.get("step", 0))
            except (ValueError, TypeError, AttributeError):
                if line.strip():
                    log.warning("metrics.jsonl: dropped a torn line %r", line[:80])
                continue
            late = at > step or (drop_after_checkpoint and at == step and "loss" not in record)
            (dropped if late else kept).append(line)
        atomic_write_text(self.metrics, "".join(line + "\n" for line in kept))
        return dropped

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"

    def _step_dirs(self) -> list[tuple[int, Path]]:
        """checkpoints/step-N folders with a marker, oldest first (half-written ones live under a temporary name)."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for d in self.checkpoints.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and d.is_dir() and (d / CHECKPOINT_MARKER).is_file():
                found.append((int(m.group(1)), d))
        return sorted(found)

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        """Finished checkpoints, oldest first: every file their marker lists is there at its size (checkpoint_problem)."""
        return [(step, d) for step, d in self._step_dirs() if checkpoint_problem(d) is None]

    def resolve_resume(self, resume: str) -> Path | None:
        """`latest` -> the newest complete checkpoint, its files checked against their sha256 (None on a fresh run);
        a newer one that is not complete (a bucket mount still uploading when the machine stopped) is skipped with a
        warning saying why. Otherwise a checkpoint folder path, which must be complete."""
        if resume == "latest":
            for _, d in reversed(self._step_dirs()):
                problem = checkpoint_problem(d, verify_hashes=True)
                if problem is None:
                    return d
                log.warning("skipping checkpoint %s: %s (a partial upload or copy, e.g. a bucket mount still "
                            "uploading when the machine stopped); resuming from an older one", d, problem)
            return None
        path = Path(resume).expanduser()
        problem = checkpoint_problem(path, verify_hashes=True)
        if problem is not None:
            done = self.complete_checkpoints()
            known = ", ".join(str(p) for _, p in done[-3:]) or "none yet"
            raise UserError(f"--resume {resume}: not a complete checkpoint folder ({problem}; this run's newest "
                            f"complete ones: {known}; or pass --resume latest)")
        return path

    def prune_checkpoints(self, keep: int | None) -> None:
        if keep is None:
            return
        for _, d in self.complete_checkpoints()[:-keep]:
            shutil.rmtree(d, ignore_errors=True)

    def abandon_after(self, step: int) -> Path | None:
        """A resume from `step` while later checkpoints exist (a rewind): move that later branch (its checkpoints,
        validation folders, final LoRA and metrics rows) into abandoned-<time>/ so `latest` never picks it again.
        Returns that folder, or None when nothing was later."""
        later = [d for s, d in self.complete_checkpoints() if s > step]
        if not later:
            return None
        aside = self.root / f"abandoned-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        (aside / "checkpoints").mkdir(parents=True, exist_ok=True)
        for d in later:
            os.replace(d, aside / "checkpoints" / d.name)
        for d in self.validation.glob("step-*") if self.validation.is_dir() else []:
            m = _STEP_DIR.match(d.name)
            if m and int(m.group(1)) > step:
                (aside / "validation").mkdir(exist_ok=True)
                os.replace(d, aside / "validation" / d.name)
        if self.lora.is_dir() and any(self.lora.iterdir()):  # written after the last (later) checkpoint
            os.replace(self.lora, aside / "lora")
        dropped = self.truncate_metrics_after(step)
        if dropped:
            atomic_write_text(aside / "metrics.jsonl", "".join(line + "\n" for line in dropped))
        return aside
