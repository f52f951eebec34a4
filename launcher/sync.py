"""`wanforge sync RUN`: bring a run folder back into the local run folder, in the docs/runs.md layout.

From where the outputs are: the node itself (rsync over SkyPilot's ssh alias of the cluster: there is no
`sky rsync-down`), a mounted bucket (the store's CLI, as SkyPilot syncs it), or where the node uploaded them (Hub repo
subfolder / S3 prefix, launcher.node.download). Every command is an argument list; names and URIs are checked first.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from launcher.lifecycle import LaunchRecord, now, save_record
from launcher.targets import check_output, check_run_name
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


R2_ACCOUNT_ID = Path("~/.cloudflare/accountid")  # where SkyPilot keeps the Cloudflare account (sky check r2)
R2_CREDENTIALS = Path("~/.cloudflare/r2.credentials")  # and the R2 keys, as an AWS credentials file, profile "r2"


def bucket_sync_command(url: str, dest: Path) -> tuple[list[str], dict[str, str]]:
    """The store's own CLI as an argument list (and extra environment), as SkyPilot syncs a bucket folder: never a
    shell string, so a folder with spaces or quotes is one argument. `url` was checked by check_output."""
    scheme, _, rest = url.partition("://")
    if scheme == "s3":
        return ["aws", "s3", "sync", "--no-follow-symlinks", url, str(dest)], {}
    if scheme == "gs":
        return ["gsutil", "-m", "rsync", "-e", "-r", url, str(dest)], {}
    if scheme == "r2":
        account = R2_ACCOUNT_ID.expanduser()
        if not account.is_file():
            raise UserError(f"{url}: no Cloudflare account id at {account}; set up R2 for SkyPilot (sky check r2)")
        endpoint = f"https://{account.read_text(encoding='utf-8').split()[0]}.r2.cloudflarestorage.com"
        return (["aws", "s3", "sync", "--no-follow-symlinks", f"s3://{rest}", str(dest), "--endpoint-url", endpoint,
                 "--profile", "r2"], {"AWS_SHARED_CREDENTIALS_FILE": str(R2_CREDENTIALS.expanduser())})
    raise UserError(f"{url}: mounted runs come back from s3://, gs:// or r2:// buckets")


def bucket_sync(url: str, dest: Path) -> None:
    """A bucket folder -> dest with the store's own CLI."""
    cmd, extra_env = bucket_sync_command(check_output(url, "output"), dest)
    if shutil.which(cmd[0]) is None:
        raise UserError(f"{cmd[0]} is not installed here: it brings {url} back (pip install awscli, or the Google "
                        "Cloud SDK for gsutil)")
    dest.mkdir(parents=True, exist_ok=True)
    if subprocess.run(cmd, env={**os.environ, **extra_env}).returncode != 0:
        raise UserError(f"downloading {url} failed: check the store's credentials and that the bucket exists")


def check_layout(folder: Path) -> str:
    """The run folder has the docs/runs.md layout; returns run.json's status."""
    run_json = folder / "run.json"
    if not run_json.is_file() or not (folder / "config.toml").is_file():
        raise UserError(f"{folder}: no run.json / config.toml came back; the run may not have started yet "
                        "(wanforge logs RUN)")
    return str(json.loads(run_json.read_text(encoding="utf-8")).get("status", "unknown"))


def sync_run(rec: LaunchRecord, dest: Path | None = None, from_node: bool = False) -> tuple[Path, str]:
    """Bring the run back; records the sync (what `down` checks). Returns (local folder, run status).

    from_node: rsync from the node even where the run is uploaded (a final upload that failed: the node keeps the
    only copy for KEEP_ALIVE_MIN)."""
    folder = Path(dest or rec.local_dir)
    check_run_name(rec.name, "run")
    if rec.output_mode == "node" or from_node:
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


def status_line(folder: Path) -> str | None:
    """run.json's status (with its error and remedy when it has them) in one line, or None without a run.json."""
    try:
        status = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    line = str(status.get("status", "unknown"))
    if status.get("status") == "upload_failed":
        line = f"upload failed: {status.get('error') or '?'}; {status.get('remedy') or ''}".rstrip("; ")
    elif status.get("error"):
        line += f": {status['error']}"
    return line


def node_status_line(rec: LaunchRecord, timeout_s: float = 20) -> str | None:
    """run.json's status read on the node itself (over SkyPilot's ssh alias), or None when the node is not reachable."""
    if rec.target == "local":
        return status_line(Path(rec.local_dir))
    if shutil.which("ssh") is None:
        return None
    remote = f"{rec.remote.partition(':')[2] or '/outputs/' + check_run_name(rec.name, 'run')}/run.json"
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(timeout_s)}", check_run_name(rec.name, "run"),
           "cat", remote]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s + 5)
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        return None
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "run.json").write_text(done.stdout, encoding="utf-8")
        return status_line(Path(tmp))
