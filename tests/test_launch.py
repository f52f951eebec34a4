"""`wanforge launch` without SkyPilot: the feasibility checks, the rendered tasks and their secrets, the local
target (the same setup/run scripts a node runs), `sync` with real rsync and `down` refusing before it."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from launcher import lifecycle, render
from launcher.cli import main
from launcher.lifecycle import LaunchRecord
from launcher.node import train_command
from launcher.sync import sync_run
from launcher.targets import TARGETS, check_request, feasibility_table
from trainer.config import save_config
from trainer.errors import UserError

from conftest import RSYNC_HINT, system_tool, tiny_config

REPO = Path(__file__).resolve().parent.parent
SECRET = "hf_THIS_VALUE_MUST_NEVER_BE_WRITTEN_123"


@pytest.fixture
def state(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("WANFORGE_STATE_DIR", str(tmp_path / "state"))
    for name in render.SECRET_NAMES:
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "state"


@pytest.fixture
def config_file(clips, tmp_path) -> Path:
    path = tmp_path / "cfg" / "tiny.toml"
    path.parent.mkdir()
    save_config(tiny_config(clips, tmp_path / "run", train={"max_train_steps": 2},
                            checkpoint={"every_n_steps": 1, "total_limit": 2},
                            validation={"at_end": False}), path)
    return path


def launch(config_file: Path, *extra: str) -> int:
    return main(["launch", str(config_file), *extra])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "runpod", "--gpu", "H1000", "--output", "hf://u/r"], 'unknown GPU. did you mean "H100"'),
        (["--target", "vast", "--gpu", "MI300X", "--output", "hf://u/r"], "MI300X: not offered on vast"),
        (["--target", "runpod", "--gpu", "H100", "--nodes", "2", "--output", "hf://u/r"], "--nodes 2: runpod runs the image as the pod"),
        (["--target", "runpod", "--gpu", "H100", "--output", "s3://b/p", "--output-mode", "mount"], "runpod cannot mount buckets"),
        (["--target", "vast", "--gpu", "RTX4090"], "the node must upload the run"),
        (["--target", "aws", "--gpu", "H100", "--managed"], "checkpoints must live outside it"),
        (["--target", "lambda", "--gpu", "H100", "--spot", "--output", "s3://b/p"], "lambda has no spot"),
        (["--target", "gcp", "--gpu", "RTX4090"], "RTX4090: not offered on gcp"),
        (["--target", "runpod", "--gpu", "H100", "--output", "ftp://x"], "use hf://USER/REPO"),
    ],
)
def test_impossible_requests_are_user_errors(config_file, state, capsys, args, message):
    assert launch(config_file, *args, "--dryrun") == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(state.glob("*.json"))  # nothing recorded, nothing launched


def test_gpu_too_small_by_the_estimate(config_file, state, capsys, tmp_path):
    big = tmp_path / "cfg" / "big.toml"
    big.write_text(config_file.read_text().replace('flavour = "tiny"', 'flavour = "t2v-480p-14b-2.1"')
                   .replace("num_frames = 9", "num_frames = 81").replace("width = 64", "width = 832")
                   .replace("height = 64", "height = 480"))
    assert launch(big, "--target", "runpod", "--gpu", "RTX4090", "--output", "hf://u/r", "--dryrun") == 2
    assert "more than RTX4090 has" in capsys.readouterr().err


def test_gpu_auto_picks_the_cheapest_that_fits(config_file, state, capsys):
    from launcher.estimate import cheapest_fitting
    from trainer.config import load_config

    assert launch(config_file, "--target", "runpod", "--gpu", "auto", "--output", "hf://u/r", "--dryrun") == 0
    out = capsys.readouterr().out
    pick = cheapest_fitting(load_config(config_file), list(TARGETS["runpod"].gpus))
    task = yaml.safe_load(out.split("estimate:")[0])
    assert task["resources"]["accelerators"] == f"{TARGETS['runpod'].gpus[pick.gpu]}:1"


def test_rendered_tasks_carry_no_secret_value(config_file, state, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("WANDB_API_KEY", SECRET + "w")
    assert launch(config_file, "--target", "runpod", "--gpu", "H100", "--output", "hf://u/r", "--dryrun",
                  "--name", "s1") == 0
    out = capsys.readouterr().out
    task_file = state / "s1" / "task.yaml"
    for text in (out, task_file.read_text(), (state / "s1" / "config.toml").read_text()):
        assert SECRET not in text
    task = yaml.safe_load(task_file.read_text())
    assert task["secrets"] == {"HF_TOKEN": None, "WANDB_API_KEY": None}
    assert task["resources"]["autostop"] == {"idle_minutes": 10, "down": True}
    assert task["envs"]["OUTPUT_MODE"] == "upload" and "num_nodes" not in task
    assert "MOUNT" not in task_file.read_text()  # pod clouds only COPY


def test_missing_needed_secret_stops_before_launch(config_file, state, capsys):
    assert launch(config_file, "--target", "runpod", "--gpu", "H100", "--output", "hf://u/r") == 2
    assert "set HF_TOKEN" in capsys.readouterr().err
    assert not list(state.glob("*.json"))


def test_vm_cloud_mounts_the_bucket_and_amd_gets_rocm(config_file, state, capsys):
    assert launch(config_file, "--target", "aws", "--gpu", "H100:8", "--nodes", "2", "--managed", "--spot",
                  "--output", "s3://bucket/runs", "--dryrun", "--name", "m1") == 0
    task = yaml.safe_load((state / "m1" / "task.yaml").read_text())
    assert task["num_nodes"] == 2 and task["resources"]["use_spot"] and "job_recovery" in task["resources"]
    assert task["file_mounts"]["/outputs"] == {"source": "s3://bucket/runs", "mode": "MOUNT_CACHED"}
    assert task["resources"]["image_id"].endswith("-cu128")
    capsys.readouterr()
    assert launch(config_file, "--target", "kubernetes", "--gpu", "MI300X:8", "--dryrun", "--name", "k1") == 0
    task = yaml.safe_load((state / "k1" / "task.yaml").read_text())
    assert task["resources"]["accelerators"] == "MI300:8" and task["resources"]["image_id"].endswith("-rocm")
    plan = check_request("runpod", "MI300X", 1, output="hf://u/r")
    assert plan.accelerator == "MI300X:1" and plan.vendor == "amd"


def test_templates_are_current_and_documented():
    for name in render.template_names():
        path = REPO / "sky" / f"{name}.yaml"
        assert path.read_text() == render.template_text(name), f"sky/{name}.yaml is stale: python -m launcher.render templates"
        task = yaml.safe_load(path.read_text())
        assert task["envs"]["CONFIG"] is None and task["secrets"] == {"HF_TOKEN": None}
    table = feasibility_table()
    assert table in (REPO / "docs" / "cloud.md").read_text(), "docs/cloud.md's feasibility table differs from launcher/targets.py"
    assert "| runpod |" in table and "MI300X" in table and "no (COPY only)" in table


def test_multinode_command_from_skypilot_variables(monkeypatch):
    monkeypatch.setenv("SKYPILOT_NUM_NODES", "2")
    monkeypatch.setenv("SKYPILOT_NUM_GPUS_PER_NODE", "8")
    monkeypatch.setenv("SKYPILOT_NODE_RANK", "1")
    monkeypatch.setenv("SKYPILOT_NODE_IPS", "10.0.0.5\n10.0.0.6\n")
    cmd = train_command(Path("/wanforge/config.toml"))
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    flags = dict(zip(cmd[3::1], cmd[4::1]))
    assert flags["--num_machines"] == "2" and flags["--machine_rank"] == "1" and flags["--num_processes"] == "16"
    assert flags["--main_process_ip"] == "10.0.0.5"
    assert cmd[-6:] == ["-m", "launcher.cli", "train", "/wanforge/config.toml", "--resume", "latest"]
    monkeypatch.setenv("SKYPILOT_NUM_NODES", "1")
    monkeypatch.setenv("SKYPILOT_NUM_GPUS_PER_NODE", "1")
    assert train_command(Path("/c.toml"))[1:4] == ["-m", "launcher.cli", "train"]


def test_local_target_runs_the_node_scripts_and_sync_down(config_file, state, tmp_path, monkeypatch, capsys):
    """The rendered setup/run, run here with one node's SKYPILOT_* variables, train the tiny model into the run layout;
    a node-mode run then comes back with real rsync, and `down` refuses until it has."""
    monkeypatch.setenv("PYTHONPATH", f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    assert launch(config_file, "--target", "local", "--name", "loc") == 0
    run = tmp_path / "run"
    assert (run / "config.toml").is_file() and (run / "metrics.jsonl").is_file()
    assert list((run / "lora").glob("*.safetensors")) and list((run / "checkpoints").glob("step-*"))
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "completed" and status["run_id"] == "local-run"
    inputs = state / "loc" / "node"
    assert (inputs / "config.toml").is_file() and (inputs / "input" / "data" / "0").is_symlink()

    # a cloud run whose outputs stay on the node: a folder standing in for the node's /outputs/<run>
    system_tool("rsync", install=RSYNC_HINT)  # the local target above needs no rsync; sync does
    node_copy = tmp_path / "node-outputs" / "r1"
    shutil.copytree(run, node_copy)
    rec = LaunchRecord(name="r1", target="kubernetes", managed=False, output=None, output_mode="node",
                       remote=str(node_copy), local_dir=str(tmp_path / "back"), launched_at=lifecycle.now())
    lifecycle.save_record(rec)
    assert main(["down", "r1"]) == 2
    assert "wanforge sync r1" in capsys.readouterr().err
    assert main(["sync", "r1"]) == 0
    back = tmp_path / "back"
    for part in ("config.toml", "run.json", "metrics.jsonl", "lora", "checkpoints", "validation"):
        assert (back / part).exists(), part
    assert lifecycle.load_record("r1").synced_status == "completed"
    assert lifecycle.unsynced_reason(lifecycle.load_record("r1")) is None


def test_sync_reports_a_missing_run(state, tmp_path, rsync):
    rec = LaunchRecord(name="r2", target="aws", managed=False, output=None, output_mode="node",
                       remote=str(tmp_path / "empty"), local_dir=str(tmp_path / "back2"))
    (tmp_path / "empty").mkdir()
    lifecycle.save_record(rec)
    with pytest.raises(UserError, match="no run.json"):
        sync_run(rec)
    assert main(["status", "nope"]) == 2


def test_estimate_of_the_tiny_model_says_cpu_trial(config_file, capsys):
    assert main(["estimate", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert "tiny is a CPU trial" in out and "GiB" not in out


def test_version_is_the_installed_distribution(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"wanforge {version('wanforge')}"


def test_cli_works_without_skypilot():
    """The trainer-side environment has no SkyPilot; every command that needs it says how to get it."""
    import importlib.util

    spec = importlib.util.find_spec("sky")
    if spec is not None and spec.origin is not None:  # pragma: no cover - running in the launch environment
        pytest.skip("SkyPilot is installed here")
    rec = LaunchRecord(name="x", target="aws", managed=False, output="s3://b", output_mode="mount", remote="",
                       local_dir="/tmp")
    with pytest.raises(UserError, match=".venv-launch"):
        lifecycle.status(rec)


def test_local_model_folder_does_not_travel(config_file, state, capsys, tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    assert launch(config_file, "--set", f'model.pretrained_model_name_or_path="{model}"', "--target", "runpod",
                  "--gpu", "H100", "--output", "hf://u/r", "--dryrun") == 2
    assert "model.pretrained_model_name_or_path" in capsys.readouterr().err


def test_hub_dataset_is_fetched_on_the_node_not_uploaded(config_file, state):
    assert launch(config_file, "--target", "gcp", "--gpu", "L4", "--hub-dataset", "someone/clips", "--dryrun",
                  "--name", "h1") == 0
    task = yaml.safe_load((state / "h1" / "task.yaml").read_text())
    assert task["envs"]["HUB_DATASET"] == "someone/clips"
    assert "/wanforge/input/data/0" not in task["file_mounts"] and "/wanforge/input/config.toml" in task["file_mounts"]
    assert task["envs"]["OUTPUT_MODE"] == "node" and "/outputs" not in task["file_mounts"]
