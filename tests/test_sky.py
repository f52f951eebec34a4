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


def run_in_launch_env(args: list[str], home: Path, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), PYTHONPATH=str(REPO), SKYPILOT_DISABLE_USAGE_COLLECTION="1")
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


def test_cli_runs_in_the_launch_env(clips, tmp_path):
    """The same `wanforge` CLI works in the SkyPilot environment (lazy imports both ways)."""
    config = tmp_path / "tiny.toml"
    save_config(tiny_config(clips, tmp_path / "run"), config)
    done = run_in_launch_env(["-m", "launcher.cli", "launch", str(config), "--target", "aws", "--gpu", "auto",
                              "--output", "s3://bucket/runs", "--dryrun", "--name", "env-check"], tmp_path / "home")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MOUNT_CACHED" in done.stdout and "estimate:" in done.stdout
    bad = run_in_launch_env(["-m", "launcher.cli", "launch", str(config), "--target", "vast", "--gpu", "MI300X",
                             "--output", "hf://u/r", "--dryrun"], tmp_path / "home")
    assert bad.returncode == 2 and "not offered on vast" in bad.stderr
