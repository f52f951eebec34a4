"""SkyPilot task YAML for a config and a checked request (launcher.targets.Plan), and the sky/ templates.

One builder makes both: `render_task` fills in a real config (its staged copy, each dataset folder, the run name,
the output) and `template_task` leaves `${CONFIG}` / `${DATASET}` for plain `sky launch sky/<t>.yaml --env ...`.
`python -m launcher.render templates` rewrites sky/*.yaml from here (tests check they are up to date).

Secrets are listed by NAME only (`secrets: {HF_TOKEN: null}`), only those the run uses (launcher.launch.secret_names);
their values go to the Task object at launch time (launcher.lifecycle) from the caller's environment or Colab
userdata, never into a YAML, a log or a printout. The setup / run scripts are fixed text: user values (run name,
output, dataset id) reach them only as environment variables, never spliced into the script.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from launcher.images import image_for
from launcher.targets import Plan

NODE_ROOT = "/wanforge"  # inputs on the node: input/config.toml, input/data/<i>/
NODE_OUTPUTS = "/outputs"  # run folders on the node (the trainer image's VOLUME; the bucket in mount mode)
TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "sky"

KEEP_ALIVE_MIN = 60  # a pod stays up this long after a failed final upload (launcher.node.keep_alive)

SETUP = """\
set -euo pipefail
# wanforge: check the node can run the trainer, then place the config and the data (a Hub dataset is fetched here).
PY="${WANFORGE_PYTHON:-python3}"
if ! "$PY" -c "import launcher.node" 2>/dev/null; then
  echo "wanforge: no wanforge on this machine: run the trainer image (resources.image_id: docker:ghcr.io/wanforge/...)" >&2
  exit 2
fi
"$PY" -m launcher.node setup
"""

RUN = """\
set -euo pipefail
# wanforge: train (accelerate over all GPUs of all nodes when there are several), resume from the latest
# checkpoint, upload the run folder as it goes when OUTPUT_MODE=upload. See launcher/node.py.
exec "${WANFORGE_PYTHON:-python3}" -m launcher.node run
"""


def _resources(plan: Plan, image: str) -> dict[str, Any]:
    res: dict[str, Any] = {"cloud": plan.target.name, "accelerators": plan.accelerator, "image_id": f"docker:{image}"}
    if plan.spot:
        res["use_spot"] = True
    if plan.managed:
        res["job_recovery"] = {"strategy": "EAGER_NEXT_REGION", "max_restarts_on_errors": 1}
    if plan.target.name == "runpod":
        res["autostop"] = {"idle_minutes": 10, "down": True}  # RunPod cannot stop a pod: delete it once idle
    return res


def _task(name: str, plan: Plan, image: str, envs: dict[str, Any], file_mounts: dict[str, Any],
          secrets: list[str]) -> dict[str, Any]:
    task: dict[str, Any] = {"name": name, "resources": _resources(plan, image)}
    if plan.nodes > 1:
        task["num_nodes"] = plan.nodes
    task["envs"] = envs
    if secrets:
        task["secrets"] = {s: None for s in secrets}
    task["file_mounts"] = file_mounts
    task["setup"] = SETUP
    task["run"] = RUN
    return task


def _output_mount(plan: Plan, source: str) -> dict[str, Any]:
    return {NODE_OUTPUTS: {"source": source, "mode": "MOUNT_CACHED"}} if plan.output_mode == "mount" else {}


def node_envs(run_name: str, plan: Plan, hub_dataset: str = "", upload_every_min: int = 15,
              keep_alive_min: int = KEEP_ALIVE_MIN) -> dict[str, str]:
    """The task's envs: every user value reaches the node as an environment variable (the setup / run scripts are
    fixed text that only read them), checked again there (launcher.node.checked_env)."""
    return {
        "RUN_NAME": run_name,
        "OUTPUT": plan.output or "",
        "OUTPUT_MODE": plan.output_mode,
        "HUB_DATASET": hub_dataset,
        "UPLOAD_EVERY_MIN": str(upload_every_min),
        "KEEP_ALIVE_MIN": str(keep_alive_min if plan.target.kind == "pod" else 0),
        "WANFORGE_ROOT": NODE_ROOT,
        "WANFORGE_RUNS_DIR": NODE_OUTPUTS,
    }


def render_task(plan: Plan, run_name: str, config_file: Path, datasets: list[Path], hub_dataset: str = "",
                secrets: list[str] | None = None, image: str | None = None,
                keep_alive_min: int = KEEP_ALIVE_MIN) -> dict[str, Any]:
    """The task for one launch: `config_file` is the staged, resolved config; `datasets` its local folders in order."""
    image = image or image_for(plan.vendor)
    mounts: dict[str, Any] = {f"{NODE_ROOT}/input/config.toml": str(config_file)}
    for i, folder in enumerate(datasets):
        if i == 0 and hub_dataset:
            continue
        mounts[f"{NODE_ROOT}/input/data/{i}"] = str(folder)
    mounts.update(_output_mount(plan, plan.output or ""))
    return _task(run_name, plan, image, node_envs(run_name, plan, hub_dataset, keep_alive_min=keep_alive_min), mounts,
                 secrets or [])


# ---------------------------------------------------------------- the sky/ templates


def _template_plans() -> dict[str, tuple[Plan, str]]:
    """Template name -> (an example plan, the comment at its top)."""
    from launcher.targets import check_request

    return {
        "runpod": (check_request("runpod", "H100", 1, output="hf://USER/REPO"),
                   "RunPod: the image is the pod (one node); the node uploads the run to OUTPUT (hf://USER/REPO or "
                   "s3://BUCKET/PREFIX); the pod is deleted 10 minutes after it goes idle. A final upload that fails "
                   "keeps the pod up KEEP_ALIVE_MIN minutes: `wanforge sync RUN --from-node` (or rsync) fetches it."),
        "runpod-mi300x": (check_request("runpod", "MI300X", 1, output="hf://USER/REPO"),
                          "RunPod AMD MI300X with the ROCm trainer image; otherwise as runpod.yaml."),
        "vast": (check_request("vast", "RTX4090", 1, output="hf://USER/REPO"),
                 "Vast.ai: the image is the instance (one node, no bucket mounts); the node uploads the run to OUTPUT. "
                 "`sky down` it when the upload is done."),
        "vm": (check_request("aws", "H100", 1, output="s3://bucket/prefix"),
               "VM clouds (aws, gcp, azure, lambda, nebius, oci: change `cloud`): the image runs inside the VM, the run "
               "folder is a MOUNT_CACHED bucket. Spot + recovery: `sky jobs launch sky/vm.yaml --use-spot ...`."),
        "multinode": (check_request("aws", "H100", 8, nodes=2, managed=True, output="s3://bucket/prefix"),
                      "Two nodes x 8 GPUs as a managed job: torchrun starts one process per GPU, rendezvous on the "
                      "first of SKYPILOT_NODE_IPS; each node pins NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME to its "
                      "interface toward that head node (launcher/node.py, unless --env sets them); checkpoints in the "
                      "bucket, so a recovery resumes."),
        "kubernetes": (check_request("kubernetes", "H100", 1),
                       "Kubernetes (NVIDIA): the image is the pod; outputs stay on it until `wanforge sync` / rsync, "
                       "or set OUTPUT=hf://USER/REPO and OUTPUT_MODE=upload."),
        "kubernetes-amd": (check_request("kubernetes", "MI300X", 8),
                           "Kubernetes with AMD Instinct MI300X nodes (accelerators MI300:N) and the ROCm image."),
    }


def template_task(name: str) -> dict[str, Any]:
    plan, _ = _template_plans()[name]
    envs: dict[str, Any] = {"CONFIG": None, "DATASET": None}
    envs.update(node_envs("wanforge", plan))
    if plan.output_mode != "node":
        envs["OUTPUT"] = None  # required: --env OUTPUT=...
    mounts: dict[str, Any] = {f"{NODE_ROOT}/input/config.toml": "${CONFIG}", f"{NODE_ROOT}/input/data/0": "${DATASET}"}
    mounts.update(_output_mount(plan, "${OUTPUT}"))
    return _task(f"wanforge-{name}", plan, image_for(plan.vendor), envs, mounts, ["HF_TOKEN"])


def template_names() -> list[str]:
    return list(_template_plans())


def template_text(name: str) -> str:
    _, comment = _template_plans()[name]
    usage = (f"sky launch sky/{name}.yaml --env CONFIG=my.toml --env DATASET=clips/"
             + (" --env OUTPUT=..." if template_task(name)["envs"].get("OUTPUT", "") is None else "")
             + " --secret HF_TOKEN")
    header = [
        f"# wanforge SkyPilot task: {name}. Generated by `python -m launcher.render templates` (launcher/render.py):",
        "# edit there, not here. `wanforge launch CONFIG --target ...` renders the same task from a config.",
        "#",
        *[f"# {line}" for line in _wrap(comment)],
        "#",
        f"#   {usage}",
        "# CONFIG: a wanforge TOML (its datasets[0] is replaced by DATASET, a local folder of clips + captions, or by",
        "# HUB_DATASET, a Hugging Face dataset id fetched on the node: then pass an empty folder as DATASET). More secrets",
        "# as needed: --secret WANDB_API_KEY; for an s3:// OUTPUT the node uploads to: --secret AWS_ACCESS_KEY_ID",
        "# --secret AWS_SECRET_ACCESS_KEY (and --secret AWS_ENDPOINT_URL for an S3-compatible store). RUN_NAME names the",
        "# run folder (/outputs/RUN_NAME, and the same in the bucket / Hub repo): --env RUN_NAME=... for each new run.",
        "",
    ]
    return "\n".join(header) + dump(template_task(name))


def _wrap(text: str, width: int = 114) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)


def write_templates(folder: Path = TEMPLATES_DIR) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in template_names():
        path = folder / f"{name}.yaml"
        path.write_text(template_text(name), encoding="utf-8")
        written.append(path)
    return written


def dump(task: dict[str, Any]) -> str:
    """YAML text of a task; the setup/run scripts as literal blocks, so they read as the shell they are."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return yaml.dump(task, Dumper=Dumper, sort_keys=False, default_flow_style=False, width=120)


if __name__ == "__main__":
    if sys.argv[1:] == ["templates"]:
        for p in write_templates():
            print(p)
    else:
        print("usage: python -m launcher.render templates", file=sys.stderr)
        sys.exit(2)
