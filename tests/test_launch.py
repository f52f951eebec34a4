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

from launcher import launch as launch_module
from launcher import lifecycle, render
from launcher.cli import main
from launcher.lifecycle import LaunchRecord
from launcher.node import train_command
from launcher.sync import sync_run
from launcher.targets import TARGETS, check_request, feasibility_table
from trainer.config.files import save_config
from trainer.errors import UserError

from conftest import RSYNC_HINT, system_tool, tiny_config

REPO = Path(__file__).resolve().parent.parent
SECRET = "hf_THIS_VALUE_MUST_NEVER_BE_WRITTEN_123"
ALL_SECRETS = ("HF_TOKEN", "WANDB_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")


@pytest.fixture
def state(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("WANFORGE_STATE_DIR", str(tmp_path / "state"))
    for name in ALL_SECRETS:
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
        (["--target", "runpod", "--gpu", "H100", "--output", "s3://bkt/p", "--output-mode", "mount"], "runpod cannot mount buckets"),
        (["--target", "vast", "--gpu", "RTX4090"], "the node must upload the run"),
        (["--target", "aws", "--gpu", "H100", "--managed"], "checkpoints must live outside it"),
        (["--target", "lambda", "--gpu", "H100", "--spot", "--output", "s3://bkt/p"], "lambda has no spot"),
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
    from trainer.config.files import load_config

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
    assert task["secrets"] == {"HF_TOKEN": None}  # W&B is set here but the run does not report to it
    assert task["resources"]["autostop"] == {"idle_minutes": 10, "down": True}
    assert task["envs"]["OUTPUT_MODE"] == "upload" and "num_nodes" not in task
    assert "MOUNT" not in task_file.read_text()  # pod clouds only COPY


def _skypilot_here() -> bool:
    import importlib.util

    spec = importlib.util.find_spec("sky")
    return spec is not None and spec.origin is not None


def test_launch_lists_what_this_machine_lacks_before_skypilot(config_file, state, tmp_path, monkeypatch, capsys):
    """A dataset folder that is gone, no rsync (a PATH without it), no SkyPilot in this Python and no HF_TOKEN for an
    hf:// output: one line each with its fix, exit 2, nothing recorded; --dryrun prints the same lines as warnings
    and still writes the task."""
    if _skypilot_here():  # pragma: no cover - the launch environment (tests/test_sky.py covers it there)
        pytest.skip("SkyPilot is installed here")
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    gone = tmp_path / "clips-moved-away"
    args = ["--set", f'datasets.0.path="{gone}"', "--target", "runpod", "--gpu", "H100", "--output", "hf://u/r",
            "--name", "wf-ready"]
    assert launch(config_file, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err), err
    dataset, rsync, sky, token = err
    assert f"datasets[0].path: {gone} is not a folder here" in dataset and "--hub-dataset" in dataset
    assert "rsync is not installed here" in rsync and "apt-get install rsync" in rsync
    assert "SkyPilot is not installed in this Python" in sky and '"skypilot[runpod]"' in sky
    assert "HF_TOKEN is not set: --output hf://u/r needs it; export HF_TOKEN=" in token
    assert not list(state.glob("*.json")) and not (state / "wf-ready" / "task.yaml").exists()

    assert launch(config_file, *args, "--dryrun") == 0
    captured = capsys.readouterr()
    warnings = captured.err.strip().splitlines()
    assert [w.removeprefix("warning: ") for w in warnings] == [e.removeprefix("error: ") for e in err]
    assert "fix the warnings above before a real launch" in captured.out
    assert yaml.safe_load((state / "wf-ready" / "task.yaml").read_text())["secrets"] == {"HF_TOKEN": None}
    assert not list(state.glob("*.json"))  # a dry run records no run


@pytest.mark.parametrize(("args", "name"), [
    (["--target", "aws", "--gpu", "H100", "--output", "s3://bkt/runs"], None),
    (["--target", "vast", "--gpu", "RTX4090", "--output", "s3://bkt/runs"], "AWS_ACCESS_KEY_ID"),
    (["--target", "kubernetes", "--gpu", "H100", "--set", 'tracking.report_to="wandb"'], "WANDB_API_KEY"),
])
def test_each_missing_token_names_what_needs_it(config_file, state, capsys, args, name):
    """The tokens the outputs and trackers need: a mounted bucket needs none (SkyPilot's own credentials), a pod
    cloud's S3 upload needs the keys, W&B its key; each missing one is its own line."""
    assert launch(config_file, *args, "--dryrun", "--name", "wf-tok") == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if " is not set: " in line]
    if name is None:
        assert warned == []
    else:
        assert any(line.startswith(f"warning: {name} is not set: ") for line in warned), warned
        assert all(line.startswith("warning: ") for line in warned)


def test_vm_cloud_mounts_the_bucket_and_amd_gets_rocm(config_file, state, capsys):
    # 16 GPUs need 16 batches of 2 per optimizer step: the 8 clips 4 times (preflight refuses fewer)
    assert launch(config_file, "--set", "datasets.0.repeats=4", "--target", "aws", "--gpu", "H100:8", "--nodes", "2",
                  "--managed", "--spot", "--output", "s3://bucket/runs", "--dryrun", "--name", "m1") == 0
    task = yaml.safe_load((state / "m1" / "task.yaml").read_text())
    assert task["num_nodes"] == 2 and task["resources"]["use_spot"] and "job_recovery" in task["resources"]
    assert task["file_mounts"]["/outputs"] == {"source": "s3://bucket/runs", "mode": "MOUNT_CACHED"}
    assert task["resources"]["image_id"].endswith("-cu128")
    capsys.readouterr()
    assert launch(config_file, "--set", "datasets.0.repeats=2", "--target", "kubernetes", "--gpu", "MI300X:8", "--dryrun",
                  "--name", "k1") == 0
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
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    flags = dict(arg.split("=", 1) for arg in cmd[3:8])
    assert flags["--nnodes"] == "2" and flags["--node_rank"] == "1" and flags["--nproc_per_node"] == "8"
    assert flags["--master_addr"] == "10.0.0.5" and flags["--master_port"] == "29500"
    assert cmd[-6:] == ["-m", "trainer.cli", "train", "/wanforge/config.toml", "--resume", "latest"]
    monkeypatch.setenv("SKYPILOT_NUM_NODES", "1")
    monkeypatch.setenv("SKYPILOT_NUM_GPUS_PER_NODE", "1")
    assert train_command(Path("/c.toml"))[1:4] == ["-m", "trainer.cli", "train"]


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
    rec = LaunchRecord(name="x", target="aws", managed=False, output="s3://bkt", output_mode="mount", remote="",
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


# ---------------------------------------------------------------- least secrets


@pytest.mark.parametrize(
    ("args", "sets", "travel"),
    [
        (["--target", "vast", "--gpu", "RTX4090", "--output", "hf://me/loras"], [], ["HF_TOKEN"]),
        (["--target", "aws", "--gpu", "H100", "--output", "s3://my-bucket/runs"], [], []),
        (["--target", "runpod", "--gpu", "H100", "--output", "s3://my-bucket/runs"], [],
         ["AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL", "AWS_SECRET_ACCESS_KEY"]),
        (["--target", "kubernetes", "--gpu", "H100"], ['tracking.report_to="wandb"'], ["WANDB_API_KEY"]),
        (["--target", "gcp", "--gpu", "L4", "--hub-dataset", "someone/clips"], [], ["HF_TOKEN"]),
        (["--target", "aws", "--gpu", "H100"], ["hub.push_to_hub=true", 'hub.hub_model_id="me/lora"'], ["HF_TOKEN"]),
        (["--target", "aws", "--gpu", "H100"], ['model.pretrained_model_name_or_path="me/private-wan"'], ["HF_TOKEN"]),
    ],
)
def test_a_task_gets_only_the_secrets_its_run_uses(config_file, state, monkeypatch, args, sets, travel):
    """Every secret is set in the caller's shell; the rendered task names only those the run uses, with no value."""
    for name in ALL_SECRETS:
        monkeypatch.setenv(name, SECRET + name)
    overrides = [x for kv in sets for x in ("--set", kv)]
    assert launch(config_file, *overrides, *args, "--dryrun", "--name", "least") == 0
    text = (state / "least" / "task.yaml").read_text()
    assert sorted(yaml.safe_load(text).get("secrets") or {}) == travel
    assert SECRET not in text


def test_launch_hands_only_the_used_secret_values_to_skypilot(config_file, state, monkeypatch):
    """The values that reach the SkyPilot Task (lifecycle.launch) are the used ones only."""
    for name in ALL_SECRETS:
        monkeypatch.setenv(name, SECRET + name)
    handed = {}
    monkeypatch.setattr(lifecycle, "launch", lambda task, rec, secrets: handed.update(secrets))
    # this test is about the secret values: the machine's readiness (rsync, SkyPilot, credentials) is another test's
    monkeypatch.setattr(launch_module, "readiness_lines", lambda *a, **k: [])
    assert launch(config_file, "--target", "vast", "--gpu", "RTX4090", "--output", "hf://me/loras", "--name", "v1") == 0
    assert handed == {"HF_TOKEN": SECRET + "HF_TOKEN"}


# ---------------------------------------------------------------- no shell from strings

HOSTILE_OUTPUTS = ["hf://me/../other", "hf://https://evil.example/x", "hf://me/x;rm -rf ~", "hf://me/$(id)", "hf://me/a b",
                   "s3://my-bucket/$(touch pwned)", "s3://my-bucket/a;id", "s3://my-bucket/`id`", "s3://my-bucket/../x",
                   "s3://../x", "s3://my-bucket/a b", "gs://my-bucket/x|id", "r2://s3://my-bucket", "hf://me/a/b",
                   "s3://Bad_Bucket/x", "hf://me/x\nOUTPUT=y"]
HOSTILE_NAMES = ["../../x", "a;b", "$(id)", "`id`", "my run", "x/../../y", "Run", "-x", ""]


@pytest.mark.parametrize("output", HOSTILE_OUTPUTS)
def test_hostile_outputs_are_refused_at_launch(config_file, state, capsys, output):
    assert launch(config_file, "--target", "runpod", "--gpu", "H100", "--output", output, "--dryrun") == 2
    err = capsys.readouterr().err
    assert "--output" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not list(state.glob("*/task.yaml"))


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_run_names_are_refused_at_launch(config_file, state, capsys, name):
    assert launch(config_file, "--target", "runpod", "--gpu", "H100", "--output", "hf://me/r", f"--name={name}",
                  "--dryrun") == 2
    assert "--name" in capsys.readouterr().err
    assert not (state.parent / "x").exists() and not list(state.glob("*/task.yaml"))


@pytest.mark.parametrize(("variable", "value"), [("OUTPUT", o) for o in HOSTILE_OUTPUTS[:8]] +
                         [("RUN_NAME", n) for n in ("../../x", "a;b", "$(id)", "`id`", "x/y")] +
                         [("OUTPUT_MODE", "upload; id")])
def test_the_node_checks_its_environment_again(tmp_path, monkeypatch, capsys, variable, value):
    """A hand-edited task (sky launch --env OUTPUT=...) meets the same rules on the node, before anything runs."""
    from launcher import node

    monkeypatch.setenv("WANFORGE_ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("WANFORGE_RUNS_DIR", str(tmp_path / "outputs"))
    monkeypatch.setenv("OUTPUT_MODE", "upload")
    monkeypatch.setenv("OUTPUT", "hf://me/runs")
    monkeypatch.setenv("RUN_NAME", "ok")
    monkeypatch.setenv(variable, value)
    for part in ("setup", "run"):
        assert node.main([part]) == 2
        err = capsys.readouterr().err
        assert variable in err and "Traceback" not in err
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "x").exists()


def test_rendered_scripts_are_fixed_text_with_values_in_envs(config_file, state):
    """User values reach the node only as environment variables: the setup/run scripts never contain them."""
    assert launch(config_file, "--target", "runpod", "--gpu", "H100", "--output", "hf://me/my-lora", "--name",
                  "wf-values", "--hub-dataset", "someone/clips", "--dryrun") == 0
    task = yaml.safe_load((state / "wf-values" / "task.yaml").read_text())
    assert task["setup"] == render.SETUP and task["run"] == render.RUN
    for value in ("me/my-lora", "wf-values", "someone/clips"):
        assert value not in task["setup"] + task["run"]
    assert task["envs"]["OUTPUT"] == "hf://me/my-lora" and task["envs"]["RUN_NAME"] == "wf-values"
    assert task["envs"]["KEEP_ALIVE_MIN"] == str(render.KEEP_ALIVE_MIN)
    assert launch(config_file, "--target", "vast", "--gpu", "RTX4090", "--output", "hf://me/my-lora", "--name", "wf-k",
                  "--keep-alive-min", "5", "--dryrun") == 0
    assert yaml.safe_load((state / "wf-k" / "task.yaml").read_text())["envs"]["KEEP_ALIVE_MIN"] == "5"
    assert launch(config_file, "--target", "aws", "--gpu", "H100", "--name", "wf-vm", "--dryrun") == 0
    assert yaml.safe_load((state / "wf-vm" / "task.yaml").read_text())["envs"]["KEEP_ALIVE_MIN"] == "0"  # a VM stays


def test_no_external_command_is_a_shell_string():
    """No shell=True, os.system or `bash -c` with built text in the launcher / trainer / bench code (the task's own
    fixed setup/run scripts, run by --target local as SkyPilot runs them, are the one `bash -c`)."""
    import re

    offenders = []
    for path in [*REPO.glob("launcher/*.py"), *REPO.glob("trainer/*.py")]:
        text = path.read_text()
        for pattern in (r"shell\s*=\s*True", r"os\.system\(", r"os\.popen\(", r"\[\s*\"(ba)?sh\",\s*\"-c\""):
            for match in re.finditer(pattern, text):
                line = text[:match.start()].count("\n") + 1
                offenders.append(f"{path.relative_to(REPO)}:{line}")
    assert offenders == ["launcher/launch.py:" + str(_run_local_line())]


def _run_local_line() -> int:
    lines = (REPO / "launcher" / "launch.py").read_text().splitlines()
    return next(i + 1 for i, line in enumerate(lines) if '["bash", "-c", task[part]]' in line)


def test_sync_brings_back_folders_with_spaces_and_shell_syntax(state, tmp_path, rsync):
    """rsync gets argument lists: a node folder and a local folder named with spaces, `;` and `$(...)` are just names."""
    node_copy = tmp_path / "node outputs; $(touch pwned)" / "r3"
    (node_copy / "lora").mkdir(parents=True)
    (node_copy / "config.toml").write_text("x = 1\n")
    (node_copy / "run.json").write_text(json.dumps({"status": "completed"}))
    (node_copy / "lora" / "w.safetensors").write_bytes(b"\0" * 64)
    dest = tmp_path / "my runs `id`" / "back here"
    rec = LaunchRecord(name="r3", target="kubernetes", managed=False, output=None, output_mode="node",
                       remote=str(node_copy), local_dir=str(dest), launched_at=lifecycle.now())
    lifecycle.save_record(rec)
    assert sync_run(rec) == (dest, "completed")
    assert (dest / "lora" / "w.safetensors").read_bytes() == b"\0" * 64
    assert not list(tmp_path.rglob("pwned")) and not (REPO / "pwned").exists()


@pytest.mark.parametrize(("url", "tool"), [("s3://my-bucket/runs/r1", "aws"), ("gs://my-bucket/runs/r1", "gsutil")])
def test_bucket_sync_is_an_argument_list(tmp_path, url, tool):
    from launcher.sync import bucket_sync_command

    dest = tmp_path / "a b; $(touch pwned)"
    cmd, env = bucket_sync_command(url, dest)
    assert cmd[0] == tool and url in cmd and str(dest) in cmd and env == {}
    with pytest.raises(UserError, match="not allowed"):
        from launcher.sync import bucket_sync

        bucket_sync("s3://my-bucket/$(id)/r1", dest)


def test_every_cloud_installs_from_the_constraints_and_ci_checks_it():
    """The install hint names the target's SkyPilot extra; .ci/run resolves every cloud of the table against
    constraints-launch.txt (the pins come from one resolve of all of them, so none can be left out)."""
    import re

    clouds = [t for t in TARGETS if t != "local"]
    assert sorted(lifecycle.CLOUD_EXTRAS) == sorted(clouds)
    hint = lifecycle.launch_env_hint("runpod")
    assert '-c constraints-launch.txt -e ".[launch]" "skypilot[runpod]"' in hint
    ci = (REPO / ".ci" / "run").read_text()
    joint = re.search(r"for extras in (\S+)", ci).group(1).split(",")
    assert sorted(joint) == sorted(clouds) and "--dry-run" in ci and "-c constraints-launch.txt" in ci
    pins = {line.split("==")[0].lower() for line in (REPO / "constraints-launch.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    assert {"skypilot", "boto3", "runpod", "vastai-sdk", "azure-cli", "google-api-python-client", "oci", "nebius",
            "kubernetes", "python-dateutil"} <= pins


def test_your_own_image_and_hostile_image_names(config_file, state, capsys):
    assert launch(config_file, "--target", "aws", "--gpu", "H100", "--name", "wf-img", "--image",
                  "ghcr.io/me/wanforge-trainer:0.1.0-cu128", "--dryrun") == 0
    task = yaml.safe_load((state / "wf-img" / "task.yaml").read_text())
    assert task["resources"]["image_id"] == "docker:ghcr.io/me/wanforge-trainer:0.1.0-cu128"
    for bad in ("me/x; id", "$(id)/x:1", "-x/y", "a b/c:1", "../x:1"):
        assert launch(config_file, "--target", "aws", "--gpu", "H100", f"--image={bad}", "--dryrun") == 2
        assert "--image" in capsys.readouterr().err
