"""The sky/ templates and the tasks `wanforge launch` renders, checked by the real SkyPilot code.

SkyPilot lives in its own environment (.venv-launch, see constraints-launch.txt): its click pin clashes with wandb.
These tests run a script in that environment's Python (WANFORGE_LAUNCH_PYTHON, else <repo>/.venv-launch/bin/python),
with a small GPU catalog written into a temporary HOME so `Task.validate()` works offline.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import tiny_config
from trainer.config.files import save_config

REPO = Path(__file__).resolve().parent.parent

CHECK = r'''
import copy, json, os, sys
from pathlib import Path
import yaml
import sky
from launcher import lifecycle, render
from launcher.lifecycle import LaunchRecord
from launcher.targets import TARGETS, check_request
from trainer.errors import UserError

config, data, secret = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
# A small GPU catalog in this HOME: every accelerator name of the feasibility table, with the clouds that list it.
cloud_names = {"runpod": "RunPod", "vast": "Vast", "aws": "AWS", "gcp": "GCP", "azure": "Azure", "lambda": "Lambda",
               "nebius": "nebius", "oci": "OCI", "kubernetes": "Kubernetes"}
accelerators = {}
for t in TARGETS.values():
    for name in t.gpus.values():
        accelerators.setdefault(name, set()).add(cloud_names[t.name])
catalog = Path.home() / ".sky" / "catalogs" / "v8" / "common"
catalog.mkdir(parents=True)
with open(catalog / "accelerators.csv", "w") as f:
    f.write("AcceleratorName,Clouds\n")
    for name, clouds in sorted(accelerators.items()):
        f.write(f'{name},"{sorted(clouds)}"\n')
with open(catalog / "metadata.csv", "w") as f:
    f.write("GPU,MemoryGB,Manufacturer\n")
    for name in sorted(accelerators):
        f.write(f"{name},80,{'AMD' if name.startswith('MI') else 'NVIDIA'}\n")

report = {"templates": {}, "rendered": {}, "errors": []}
for path in sorted((Path(sys.argv[4])).glob("*.yaml")):
    raw = yaml.safe_load(path.read_text())
    task = sky.Task.from_yaml_config(copy.deepcopy(raw), env_overrides=[
        ("CONFIG", str(config)), ("DATASET", str(data)), ("OUTPUT", "s3://bucket/runs")],
        secrets_overrides=[("HF_TOKEN", secret)])
    task.validate()
    report["templates"][path.stem] = [str(r) for r in task.resources]

plans = {
    "runpod-hub": check_request("runpod", "H100", 1, output="hf://user/repo"),
    "runpod-s3-upload": check_request("runpod", "L40S", 1, output="s3://bucket/runs"),
    "runpod-mi300x": check_request("runpod", "MI300X", 1, output="hf://user/repo"),
    "vast": check_request("vast", "RTX4090", 1, output="hf://user/repo"),
    "aws-managed-spot": check_request("aws", "H100", 8, nodes=2, managed=True, spot=True, output="s3://bucket/runs"),
    "gcp-node": check_request("gcp", "A100-80GB", 1),
    "lambda-mount": check_request("lambda", "H100", 1, output="s3://bucket/runs"),
    "kubernetes-amd": check_request("kubernetes", "MI300X", 8, nodes=2),
}
for name, plan in plans.items():
    rendered = render.render_task(plan, f"wf-{name}", config, [data], secrets=["HF_TOKEN", "WANDB_API_KEY"])
    text = render.dump(rendered)
    task = lifecycle.to_task(yaml.safe_load(text))
    task.update_secrets({"HF_TOKEN": secret})  # what lifecycle.launch does with the caller's value
    task.validate()
    report["rendered"][name] = {"resources": [str(r) for r in task.resources], "num_nodes": task.num_nodes,
                                "storage": sorted(task.storage_mounts), "secret_in_text": secret in text,
                                "secret_in_dict_after_launch_prep": secret in json.dumps(rendered)}

# down refuses before sync, in the environment that has SkyPilot, before any SkyPilot call
os.environ["WANFORGE_STATE_DIR"] = str(Path.home() / "state")
rec = LaunchRecord(name="n1", target="gcp", managed=False, output=None, output_mode="node", remote="n1:/outputs/n1",
                   local_dir=str(Path.home() / "back"))
try:
    lifecycle.down(rec)
except UserError as err:
    report["errors"].append(str(err))
print("REPORT " + json.dumps(report))
'''


def launch_python() -> Path:
    found = Path(os.environ.get("WANFORGE_LAUNCH_PYTHON") or REPO / ".venv-launch" / "bin" / "python")
    if not found.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{found} is missing: .ci/run creates the launch environment (.venv-launch)")
        pytest.skip(f"no launch environment at {found}: python -m venv .venv-launch && .venv-launch/bin/pip install "
                    '-c constraints-launch.txt -e ".[launch]"')
    return found


def run_in_launch_env(args: list[str], home: Path, extra_env: dict[str, str] | None = None,
                      **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "VIRTUAL_ENV", "WANFORGE_", "SKYPILOT_", "KUBECONFIG", "HF_TOKEN", "AWS_"))}
    env.update(HOME=str(home), PYTHONPATH=str(REPO), SKYPILOT_DISABLE_USAGE_COLLECTION="1", **(extra_env or {}))
    return subprocess.run([str(launch_python()), *args], env=env, capture_output=True, text=True, timeout=600, **kw)


def test_templates_and_rendered_tasks_pass_skypilot_validation(clips, tmp_path):
    config = tmp_path / "tiny.toml"
    save_config(tiny_config(clips, tmp_path / "run"), config)
    secret = "hf_SECRET_VALUE_NEVER_IN_A_TASK_987"
    done = run_in_launch_env(["-c", CHECK, str(config), str(clips), secret, str(REPO / "sky")], tmp_path / "home")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.split("REPORT ", 1)[1])
    assert set(report["templates"]) == {"runpod", "runpod-mi300x", "vast", "vm", "multinode", "kubernetes",
                                        "kubernetes-amd"}
    assert "RunPod({'MI300X': 1}" in report["templates"]["runpod-mi300x"][0]
    assert "Kubernetes({'MI300': 8}" in report["templates"]["kubernetes-amd"][0]
    rendered = report["rendered"]
    assert len(rendered) == 8
    for name, r in rendered.items():
        assert not r["secret_in_text"] and not r["secret_in_dict_after_launch_prep"], name
    assert rendered["aws-managed-spot"]["num_nodes"] == 2 and "[Spot]" in rendered["aws-managed-spot"]["resources"][0]
    assert rendered["aws-managed-spot"]["storage"] == ["/outputs"] and rendered["lambda-mount"]["storage"] == ["/outputs"]
    assert rendered["runpod-hub"]["storage"] == [] and rendered["runpod-s3-upload"]["storage"] == []
    assert "rocm" in rendered["kubernetes-amd"]["resources"][0]
    assert report["errors"] and "wanforge sync n1" in report["errors"][0]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _record(state: Path, name: str, **fields) -> None:
    state.mkdir(parents=True, exist_ok=True)
    rec = {"name": name, "target": "kubernetes", "managed": False, "output": None, "output_mode": "node",
           "remote": f"{name}:/outputs/{name}", "local_dir": str(state.parent / "back" / name), **fields}
    (state / f"{name}.json").write_text(json.dumps(rec))


def test_every_documented_command_runs_in_a_fresh_launch_env(clips, tmp_path):
    """What the docs run in the launch environment (check, estimate, launch, status, logs, sync, down,
    import-simpletuner), there, with a clean HOME and a clip folder no environment has scanned: no PyAV / torch
    surprise, user errors one line each (exit 2), and the SkyPilot API server a command starts is stopped again."""
    import shutil

    from conftest import RSYNC_HINT, system_tool

    data = tmp_path / "fresh clips"
    shutil.copytree(clips, data, ignore=shutil.ignore_patterns(".wanforge_cache"))
    home = tmp_path / "home"
    home.mkdir()
    config = tmp_path / "tiny.toml"
    save_config(tiny_config(data, tmp_path / "run"), config)
    big = tmp_path / "wan13b.toml"
    save_config(tiny_config(data, tmp_path / "run13", model={"flavour": "t2v-480p-1.3b-2.1"},
                            datasets={"num_frames": 81, "width": 832, "height": 480},
                            memory={"gradient_checkpointing": "selective"}), big)
    port = _free_port()
    env = {"SKYPILOT_API_SERVER_LOCAL_PORT": str(port)}

    def wanforge(*args: str, code: int = 0) -> subprocess.CompletedProcess:
        done = run_in_launch_env(["-m", "launcher.cli", *args], home, extra_env=env)
        assert done.returncode == code, f"wanforge {' '.join(args)}: {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
        return done

    assert "config OK" in wanforge("check", str(config)).stdout
    assert (data / ".wanforge_cache" / "probe.json").is_file()  # the clips were read here, not found in a cache
    assert "CPU trial" in wanforge("estimate", str(config)).stdout
    assert "s/step" in wanforge("estimate", str(big)).stdout

    dry = wanforge("launch", str(config), "--target", "kubernetes", "--gpu", "H100", "--name", "wf-env", "--dryrun")
    assert "dry run: nothing launched" in dry.stdout and "MOUNT" not in dry.stdout
    assert "warning: --target kubernetes: no kubernetes credentials here" in dry.stderr
    state = home / ".wanforge" / "launches"
    assert (state / "wf-env" / "task.yaml").is_file()
    real = wanforge("launch", str(config), "--target", "kubernetes", "--gpu", "H100", "--name", "wf-env2", code=2)
    lines = real.stderr.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), lines
    assert any("no kubernetes credentials here" in line and "~/.kube/config" in line for line in lines)
    assert not list(state.glob("*.json"))  # nothing launched, nothing listed
    bad = wanforge("launch", str(config), "--target", "vast", "--gpu", "MI300X", "--output", "hf://u/r", "--dryrun",
                   code=2)
    assert "not offered on vast" in bad.stderr

    root = tmp_path / "SimpleTuner"
    (root / "config" / "wan").mkdir(parents=True)
    for name in ("config.json", "multidatabackend.json"):
        shutil.copy(REPO / "tests" / "fixtures" / "simpletuner_wan" / name, root / "config" / "wan" / name)
    wanforge("import-simpletuner", str(root / "config" / "wan" / "config.json"), "--root", str(root), "-o",
             str(tmp_path / "imported.toml"))
    assert (tmp_path / "imported.toml").is_file()

    # a launch that failed: status says why, logs / sync refuse in one line, down has nothing to stop
    _record(state, "wf-failed", launch_status="launch_failed", launch_error="--target kubernetes: no H100 free")
    assert "launch_failed: --target kubernetes: no H100 free" in wanforge("status", "wf-failed").stdout
    for command in ("logs", "sync"):
        assert len(wanforge(command, "wf-failed", code=2).stderr.strip().splitlines()) == 1
    assert "nothing is up" in wanforge("down", "wf-failed").stdout
    assert "not launched from this machine" in wanforge("status", "wf-nope", code=2).stderr

    # a run whose folder is on the node (a folder stands in for it): down refuses until sync brought it back
    node = tmp_path / "node" / "wf-node"
    shutil.copytree(REPO / "tests" / "fixtures" / "simpletuner_wan", node)  # any files
    (node / "run.json").write_text(json.dumps({"status": "completed"}))
    (node / "config.toml").write_text(config.read_text())
    _record(state, "wf-node", remote=str(node))
    assert "wanforge sync wf-node" in wanforge("down", "wf-node", code=2).stderr
    system_tool("rsync", install=RSYNC_HINT)
    assert "run status: completed" in wanforge("sync", "wf-node").stdout

    # a real SkyPilot call: the API server it starts (none ran before) is stopped again when `down` ends
    _record(state, "wf-gone", synced_at="2026-01-01T00:00:00Z")
    assert not _port_open(port)
    gone = wanforge("down", "wf-gone")
    assert "no cluster of that name (already down)" in gone.stdout
    assert not _port_open(port), "the SkyPilot API server wanforge started is still running"


FAILURES = r'''
import contextlib, io, json, os, sys
from pathlib import Path
import requests
import sky
from sky import exceptions as ex
from sky.backends import backend_utils
from launcher import launch as launch_module, lifecycle
from launcher.cli import main

config = sys.argv[1]
# this script is about what SkyPilot's own failures become; the machine's readiness is tests/test_launch.py's
launch_module.readiness_lines = lambda *a, **k: []


def raises(err):
    def call(*args, **kwargs):
        raise err
    return call


def rsync_check(*args, **kwargs):  # SkyPilot's own check, on a PATH without rsync
    os.environ["PATH"] = "/nonexistent"
    try:
        backend_utils.check_rsync_installed()
    finally:
        os.environ["PATH"] = saved_path


saved_path = os.environ["PATH"]
cases = {
    "capacity": raises(ex.ResourcesUnavailableError("Failed to provision all possible launchable resources.")),
    "quota": raises(ex.ResourcesUnavailableError("Failed to provision all possible launchable resources.",
                                                 failover_history=[Exception("Quota 'GPUS_ALL_REGIONS' exceeded")])),
    "credentials": raises(ex.InvalidCloudCredentials("\x1b[31mkubeconfig: invalid token\x1b[0m\nmore detail")),
    "no-cloud": raises(ex.NoCloudAccessError("No cloud is enabled. Run sky check.")),
    "unsupported": raises(ex.NotSupportedError("multi-node is not supported here")),
    "kube-api": raises(ex.KubeAPIUnreachableError("connection refused")),
    "api-server": raises(ex.ApiServerConnectionError("http://127.0.0.1:1")),
    "network": raises(requests.exceptions.ConnectionError("Max retries exceeded")),
    "image": raises(ex.ClusterSetUpError("pod failed: ErrImagePull: manifest unknown")),
    "setup": raises(ex.ClusterSetUpError("setup exited 2")),
    "bucket": raises(ex.StorageBucketGetError("bucket does not exist")),
    "rsync": rsync_check,
    "bug": raises(ValueError("a bug in wanforge")),
}
report = {}
for name, fake in cases.items():
    sky.launch = fake
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(["launch", config, "--target", "kubernetes", "--gpu", "H100", "--name", f"wf-{name}"])
        except Exception as bug:
            code = f"raised {type(bug).__name__}"
    rec = json.loads((lifecycle.state_dir() / f"wf-{name}.json").read_text())
    report[name] = {"code": code, "err": err.getvalue(), "status": rec["launch_status"], "why": rec["launch_error"]}
# a failure after the cluster came up (setup): the cluster is taken down, so the failed launch bills nothing
downed = []
sky.launch = lambda task, cluster_name: "launch-request"
def stream_and_get(request):
    if request == "launch-request":
        raise ex.ClusterSetUpError("setup exited 1")
    return request
sky.stream_and_get = stream_and_get
sky.status = lambda cluster_names, refresh: [{"name": cluster_names[0]}]
sky.get = lambda request: request
sky.down = lambda name, **kw: downed.append(name) or "down-request"
err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = main(["launch", config, "--target", "kubernetes", "--gpu", "H100", "--name", "wf-up"])
report["_after_up"] = {"code": code, "downed": downed, "err": err.getvalue()}
err = io.StringIO()
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
    report["_status"] = {"code": main(["status", "wf-capacity"])}
print("REPORT " + json.dumps(report))
'''


def test_skypilot_failures_are_one_line_each_and_recorded(clips, tmp_path):
    """SkyPilot's real exception classes, raised where `sky.launch` is called in the real launch path: each becomes one
    `error:` line saying what failed and what to do, exit 2, and the run is recorded as launch_failed with that line;
    an exception that is not SkyPilot's (a bug) still raises."""
    config = tmp_path / "tiny.toml"
    save_config(tiny_config(clips, tmp_path / "run"), config)
    home = tmp_path / "home"
    home.mkdir()
    done = run_in_launch_env(["-c", FAILURES, str(config)], home,
                             extra_env={"SKYPILOT_API_SERVER_LOCAL_PORT": str(_free_port())})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.split("REPORT ", 1)[1])
    expected = {
        "capacity": "no H100:1 could be provisioned on kubernetes now",
        "quota": "quota does not allow H100:1",
        "credentials": "SkyPilot cannot use your kubernetes credentials (kubeconfig: invalid token)",
        "no-cloud": "SkyPilot cannot use your kubernetes credentials",
        "unsupported": "SkyPilot cannot run this request there",
        "kube-api": "the cluster's API is unreachable",
        "api-server": "the SkyPilot API server failed",
        "network": "network: SkyPilot could not reach kubernetes",
        "image": "could not pull the trainer image",
        "setup": "wf-setup: the node's setup failed (setup exited 2)",
        "bucket": "SkyPilot could not use the bucket",
        "rsync": "rsync is not installed here",
    }
    for name, phrase in expected.items():
        r = report[name]
        lines = r["err"].strip().splitlines()
        assert r["code"] == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, r)
        assert phrase in lines[0] and "\x1b[" not in lines[0], (name, lines[0])
        assert r["status"] == "launch_failed" and r["why"] == lines[0].removeprefix("error: "), (name, r)
    assert report["bug"]["code"] == "raised ValueError"  # exit 1 stays for bugs
    assert report["_status"]["code"] == 0
    after = report["_after_up"]
    assert after["code"] == 2 and after["downed"] == ["wf-up"] and "took wf-up down" in after["err"]


CREDENTIALS = r'''
import json
from pathlib import Path
import sky.clouds.azure as azure, sky.clouds.gcp as gcp, sky.clouds.runpod as runpod, sky.clouds.vast as vast
from sky.adaptors import nebius, oci
from sky.provision.lambda_cloud import lambda_utils
from launcher.readiness import CLOUDS

files = {name: [c.file for c in setup.credentials if c.file] for name, setup in CLOUDS.items()}
skypilot = {"runpod": f"~/.runpod/{runpod._CREDENTIAL_FILE}", "vast": vast._CREDENTIAL_PATH,
            "gcp": gcp.DEFAULT_GCP_APPLICATION_CREDENTIAL_PATH, "lambda": lambda_utils.CREDENTIALS_PATH,
            "oci": oci.OCI_CONFIG_PATH, "nebius": nebius._get_default_credentials_path(),
            "azure": "~/.azure/" + next(f for f in azure._CREDENTIAL_FILES if f.startswith("msal"))}
report = {"missing": {k: v for k, v in skypilot.items() if v not in files[k]}}
# SkyPilot's own local RunPod check and ours agree, without and with the file
report["runpod_before"] = [runpod.RunPod._check_runpod_credentials()[0], CLOUDS["runpod"].credentials[0].found()]
path = Path.home() / ".runpod" / "config.toml"
path.parent.mkdir()
path.write_text('[default]\napi_key = "rpa_x"\n')
report["runpod_after"] = [runpod.RunPod._check_runpod_credentials()[0], CLOUDS["runpod"].credentials[0].found()]
print("REPORT " + json.dumps(report))
'''


def test_credential_places_are_skypilots_own(tmp_path):
    """The files the launch checks for each cloud are the ones the pinned SkyPilot reads (its own constants), and its
    own local RunPod check agrees with ours."""
    home = tmp_path / "home"
    home.mkdir()
    done = run_in_launch_env(["-c", CREDENTIALS], home)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.split("REPORT ", 1)[1])
    assert report["missing"] == {}
    assert report["runpod_before"] == [False, False] and report["runpod_after"] == [True, True]
