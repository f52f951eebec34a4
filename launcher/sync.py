"""`wanforge sync RUN`: bring a run folder back into the local run folder, in the DESIGN.md layout.

From where the outputs are: the node itself (rsync over SkyPilot's ssh alias of the cluster: there is no
`sky rsync-down`), a mounted bucket (SkyPilot's own bucket sync command for that store), or where the node uploaded
them (Hub repo subfolder / S3 prefix, launcher.node.download).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from launcher.lifecycle import LaunchRecord, now, save_record
from trainer.errors import UserError


def rsync(source: str, dest: Path) -> None:
    """rsync -Pavz SOURCE/ DEST/ ; SOURCE is "CLUSTER:/path" (SkyPilot writes the ssh alias) or a local folder."""
    if shutil.which("rsync") is None:
        raise UserError("rsync is not installed here: apt-get install rsync (or brew install rsync)")
    dest.mkdir(parents=True, exist_ok=True)
    cmd = ["rsync", "-Pavz", "--exclude", "checkpoints/.tmp-*", source.rstrip("/") + "/", str(dest) + "/"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"rsync from {source} failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}"
                        " - is the cluster up (wanforge status RUN)?")


def bucket_sync(url: str, dest: Path) -> None:
    """A bucket folder -> dest with the store's own CLI, as SkyPilot builds the command (aws s3 sync, gsutil ...)."""
    try:
        from sky import cloud_stores
    except ImportError:
        from launcher.lifecycle import LAUNCH_ENV_HINT

        raise UserError(LAUNCH_ENV_HINT) from None
    dest.mkdir(parents=True, exist_ok=True)
    command = cloud_stores.get_storage_from_path(url).make_sync_dir_command(url, str(dest))
    if subprocess.run(["bash", "-c", command]).returncode != 0:
        raise UserError(f"downloading {url} failed: check the store's credentials and that the bucket exists")


def check_layout(folder: Path) -> str:
    """The run folder has the DESIGN.md layout; returns run.json's status."""
    run_json = folder / "run.json"
    if not run_json.is_file() or not (folder / "config.toml").is_file():
        raise UserError(f"{folder}: no run.json / config.toml came back; the run may not have started yet "
                        "(wanforge logs RUN)")
    return str(json.loads(run_json.read_text(encoding="utf-8")).get("status", "unknown"))


def sync_run(rec: LaunchRecord, dest: Path | None = None) -> tuple[Path, str]:
    """Bring the run back; records the sync (what `down` checks). Returns (local folder, run status)."""
    folder = Path(dest or rec.local_dir)
    if rec.output_mode == "node":
        rsync(rec.remote, folder)
    elif rec.output_mode == "mount":
        bucket_sync(f"{(rec.output or '').rstrip('/')}/{rec.name}", folder)
    else:
        from launcher.node import download

        download(rec.output or "", rec.name, folder)
    status = check_layout(folder)
    rec.synced_at, rec.synced_status = now(), status
    save_record(rec)
    return folder, status
