"""The run folder contract (DESIGN.md): config.toml, checkpoints/step-N/, lora/, validation/step-N/, metrics.jsonl, run.json."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.fileio import atomic_write_json

_STEP_DIR = re.compile(r"^step-(\d+)$")


class RunDir:
    def __init__(self, root: Path):
        self.root = root
        self.checkpoints = root / "checkpoints"
        self.lora = root / "lora"
        self.validation = root / "validation"
        self.metrics = root / "metrics.jsonl"
        self.run_json = root / "run.json"
        self.config = root / "config.toml"

    def create(self) -> None:
        for d in (self.root, self.checkpoints, self.lora, self.validation):
            d.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- status
    def read_status(self) -> dict[str, Any]:
        if self.run_json.is_file():
            return json.loads(self.run_json.read_text())
        return {}

    def write_status(self, **fields: Any) -> None:
        status = self.read_status()
        status.update(fields, updated_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        atomic_write_json(self.run_json, status)

    # ---------------------------------------------------------------- metrics
    def log_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics_after(self, step: int) -> None:
        """On resume, drop records past the checkpoint so the curve continues without a duplicate tail."""
        if not self.metrics.is_file():
            return
        kept = [line for line in self.metrics.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        self.metrics.write_text("".join(line + "\n" for line in kept))

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        """Finished checkpoints, oldest first. Half-written ones live under a temporary name and never match."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for d in self.checkpoints.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and d.is_dir() and (d / "wanforge_state.json").is_file():
                found.append((int(m.group(1)), d))
        return sorted(found)

    def resolve_resume(self, resume: str) -> Path | None:
        """`latest` -> the newest complete checkpoint (None on a fresh run); otherwise a checkpoint folder path."""
        if resume == "latest":
            done = self.complete_checkpoints()
            return done[-1][1] if done else None
        path = Path(resume)
        if not (path / "wanforge_state.json").is_file():
            raise UserError(f"--resume {resume}: not a complete checkpoint folder (expected checkpoints/step-N/ of a run)")
        return path

    def prune_checkpoints(self, keep: int | None) -> None:
        if keep is None:
            return
        for _, d in self.complete_checkpoints()[:-keep]:
            shutil.rmtree(d, ignore_errors=True)
        for d in self.checkpoints.glob(".tmp-step-*"):  # leftovers of a crash mid-write
            shutil.rmtree(d, ignore_errors=True)
