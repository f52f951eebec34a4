"""A launched run's life through SkyPilot's Python API: launch, status, logs, down; and the local record of it.

Each launch leaves a record, `<state dir>/<run>.json` (state dir: $WANFORGE_STATE_DIR or ~/.wanforge/launches), so
`wanforge status|logs|sync|down RUN` know the cluster or managed job, where the outputs are and whether they came
back. SkyPilot is imported only inside these functions: the rest of the CLI works in an environment without it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from launcher.readiness import CLOUD_EXTRAS, launch_env_hint
from trainer.errors import UserError
from trainer.fileio import atomic_write_json

LAUNCH_ENV_HINT = launch_env_hint()


@dataclass
class LaunchRecord:
    name: str  # the cluster / managed job name, also the run folder's name on the node
    target: str
    managed: bool
    output: str | None  # hf://..., s3://..., or None: the run stays on the node
    output_mode: str  # mount | upload | node
    remote: str  # node mode: rsync source of the run folder ("CLUSTER:/outputs/NAME", or a local path)
    local_dir: str  # where `sync` puts the run (the config's train.output_dir)
    launched_at: str = ""
    synced_at: str | None = None
    synced_status: str | None = None  # run.json status at the last sync
    extra: dict[str, Any] = field(default_factory=dict)
    launch_status: str = "launched"  # launching (SkyPilot is starting it) | launched | launch_failed
    launch_error: str | None = None  # launch_failed: the one line saying what failed and what to do
    accelerator: str = ""  # e.g. "H100-SXM:1", for the lines of a failure


def state_dir() -> Path:
    return Path(os.environ.get("WANFORGE_STATE_DIR") or Path.home() / ".wanforge" / "launches")


def record_path(name: str) -> Path:
    return state_dir() / f"{name}.json"


def save_record(rec: LaunchRecord) -> None:
    atomic_write_json(record_path(rec.name), asdict(rec))


def load_record(name: str) -> LaunchRecord:
    path = record_path(name)
    if not path.is_file():
        known = sorted(_known(p) for p in state_dir().glob("*.json")) if state_dir().is_dir() else []
        listed = f"known runs: {', '.join(known)}" if known else f"no runs launched from here ({state_dir()})"
        raise UserError(f'run "{name}": not launched from this machine; {listed}')
    return LaunchRecord(**json.loads(path.read_text(encoding="utf-8")))


def refuse_if_failed(rec: LaunchRecord) -> None:
    """A launch that never started has nothing to follow, sync or take down: say so instead of asking SkyPilot."""
    if rec.launch_status == "launch_failed":
        raise UserError(f"{rec.name}: its launch failed ({rec.launch_error}); nothing is running: fix that and "
                        "`wanforge launch` again")


def _known(path: Path) -> str:
    """A record's name for the "known runs" list, marked when its launch failed."""
    try:
        failed = json.loads(path.read_text(encoding="utf-8")).get("launch_status") == "launch_failed"
    except (OSError, ValueError):
        failed = False
    return path.stem + (" (launch failed)" if failed else "")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _sky(target: str | None = None) -> Any:
    try:
        import sky
    except ImportError:
        raise UserError(launch_env_hint(target)) from None
    if not hasattr(sky, "Task"):  # the repo's sky/ templates folder, seen as a namespace package from the repo root
        raise UserError(launch_env_hint(target))
    return sky


def _local_server_up() -> bool | None:
    """Whether SkyPilot's local API server answers now; None when SkyPilot talks to a remote one (not ours)."""
    from sky.server import common

    if not common.is_api_server_local():
        return None
    try:
        return common.get_api_server_status().status == common.ApiServerStatus.HEALTHY
    finally:
        common.get_api_server_status_response.cache_clear()  # SkyPilot's own next check must not see this answer


@contextlib.contextmanager
def sky_session(rec: LaunchRecord, keep_server: str = "") -> Iterator[Any]:
    """SkyPilot for one command: its failures become one UserError line (launcher.sky_errors), and the local API
    server that the first SkyPilot call starts is stopped again when this command started it. `keep_server`: the
    reason to leave a server this command started running (said on stderr)."""
    from launcher.sky_errors import Context, failure_line

    sky = _sky(rec.target)
    was_up = _local_server_up()
    try:
        yield sky
    except KeyboardInterrupt:  # SkyPilot's request goes on in its API server: stopping that would cut it short
        keep_server = keep_server or (f"the request for {rec.name} goes on there; `wanforge status {rec.name}` shows "
                                      f"it, `wanforge down {rec.name}` stops it")
        raise
    except Exception as err:
        line = failure_line(err, Context(rec.name, rec.target, rec.accelerator, rec.output or ""))
        if line is None:
            raise
        raise UserError(line) from None
    finally:
        if was_up is False and _local_server_up():
            if keep_server:
                print(f"wanforge: the SkyPilot API server this command started keeps running on purpose: {keep_server}",
                      file=sys.stderr)
            else:
                with contextlib.redirect_stdout(sys.stderr):
                    sky.api_stop()


# ---------------------------------------------------------------- SkyPilot calls


def to_task(task_config: dict[str, Any]) -> Any:
    """The SkyPilot Task of a rendered config, schema-checked (no secret values yet)."""
    sky = _sky(task_config.get("resources", {}).get("cloud"))
    return sky.Task.from_yaml_config(copy.deepcopy(task_config))


def launch(task_config: dict[str, Any], rec: LaunchRecord, secrets: dict[str, str]) -> None:
    """Start the cluster (or managed job) and stream its logs; secret values go to the Task object only.

    The record says `launching` while SkyPilot works; a SkyPilot failure makes it `launch_failed` with the one line
    (and a cluster that failure left up is taken down), so nothing half-started is listed as a run."""
    rec.launch_status = "launching"
    save_record(rec)
    keep = (f"it follows the managed job {rec.name}; `sky api stop` stops it once you no longer follow the job"
            if rec.managed else "")
    try:
        with sky_session(rec, keep_server=keep) as sky:
            task = to_task(task_config)
            if secrets:
                task.update_secrets(secrets)
            if rec.managed:
                request = sky.jobs.launch(task, name=rec.name)
            else:
                request = sky.launch(task, cluster_name=rec.name)
            try:
                sky.stream_and_get(request)
            except Exception:
                if not rec.managed:
                    _down_after_failure(sky, rec)
                raise
    except UserError as err:
        rec.launch_status = "launch_failed"
        rec.launch_error = str(err)
        save_record(rec)
        raise
    rec.launch_status = "launched"
    save_record(rec)


def _down_after_failure(sky: Any, rec: LaunchRecord) -> None:
    """A launch that failed after its cluster came up (setup, file upload): take that cluster down, so a failed launch
    bills nothing; say so either way."""
    try:
        if not sky.get(sky.status(cluster_names=[rec.name], refresh=sky.StatusRefreshMode.NONE)):
            return
        sky.stream_and_get(sky.down(rec.name))
        print(f"wanforge: took {rec.name} down: its launch failed after the cluster had started", file=sys.stderr)
    except Exception as err:  # the launch's own failure is what gets reported; this one is said beside it
        print(f"wanforge: {rec.name} may still be up after the failed launch ({type(err).__name__}): "
              f"`wanforge down {rec.name}` or `sky down {rec.name}`", file=sys.stderr)


def status(rec: LaunchRecord) -> list[dict[str, Any]]:
    """What SkyPilot says about the run now: the cluster's record, or the managed job's."""
    refuse_if_failed(rec)
    with sky_session(rec) as sky:
        if rec.managed:
            jobs = sky.get(sky.jobs.queue(refresh=False, skip_finished=False))
            rows = [_as_dict(j) for j in jobs]
            return [r for r in rows if r.get("job_name") == rec.name]
        clusters = sky.get(sky.status(cluster_names=[rec.name], refresh=sky.StatusRefreshMode.AUTO))
        return [_as_dict(c) for c in clusters]


def _as_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    if hasattr(obj, "model_dump"):
        return obj.model_dump()
    return dict(vars(obj))


def logs(rec: LaunchRecord, follow: bool = True) -> int:
    """Stream the run's logs to stdout (follows until the job ends unless follow=False)."""
    refuse_if_failed(rec)
    with sky_session(rec) as sky:
        if rec.managed:
            result = sky.jobs.tail_logs(name=rec.name, follow=follow)
        else:
            result = sky.tail_logs(rec.name, job_id=None, follow=follow)
    return int(result or 0) if isinstance(result, int) else 0


def unsynced_reason(rec: LaunchRecord) -> str | None:
    """Why taking the run down now would lose outputs, or None when it would not."""
    if rec.output_mode != "node":
        return None  # the run folder is in the bucket / Hub repo
    if rec.synced_at is None:
        return (f"the run folder exists only on {rec.name}; bring it back first: wanforge sync {rec.name} "
                f"(or wanforge down {rec.name} --force to lose it)")
    return None


def down(rec: LaunchRecord, force: bool = False) -> bool:
    """Tear the cluster down (or cancel the managed job); refuses while the only copy of the outputs is on it.
    Returns False when there was nothing to take down (a failed launch, or a cluster already gone)."""
    if rec.launch_status == "launch_failed":
        return False  # nothing started (a cluster the failure left up was taken down then)
    reason = unsynced_reason(rec)
    if reason and not force:
        raise UserError(f"not taking {rec.name} down: {reason}")
    was_up = True
    with sky_session(rec) as sky:
        try:
            if rec.managed:
                sky.stream_and_get(sky.jobs.cancel(name=rec.name))
            else:
                # graceful: a MOUNT_CACHED bucket is flushed before the machine goes
                sky.stream_and_get(sky.down(rec.name, graceful=rec.output_mode == "mount"))
        except sky.exceptions.ClusterDoesNotExist:
            was_up = False
    rec.extra["down_at"] = now()
    save_record(rec)
    return was_up
