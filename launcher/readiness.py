"""What `wanforge launch` checks on this machine before SkyPilot is called: rsync, the target's SkyPilot extra and
credentials (where SkyPilot 0.14 looks for them, clouds/<cloud>.py), the secrets the outputs and trackers need, the
dataset folders. Each missing piece is one line naming it and its fix; `launch` stops on them (exit 2), `--dryrun`
prints them as warnings. Nothing here contacts a cloud or imports SkyPilot's cloud SDKs (only finds them).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from launcher.targets import Plan

CLOUD_EXTRAS = ("aws", "gcp", "azure", "lambda", "runpod", "vast", "nebius", "oci", "kubernetes")  # skypilot[...]


def launch_env_hint(target: str | None = None) -> str:
    """How to install the launcher environment, with the SkyPilot extra of `target` (any of CLOUD_EXTRAS)."""
    extra = target if target in CLOUD_EXTRAS else "CLOUD"
    which = "" if extra != "CLOUD" else f" (CLOUD: one or more of {','.join(CLOUD_EXTRAS)})"
    return ("SkyPilot is not installed in this Python. It lives in its own environment (its click pin clashes with "
            'wandb): python -m venv .venv-launch && .venv-launch/bin/pip install -c constraints-launch.txt -e ".[launch]" '
            f'"skypilot[{extra}]"{which}, then run .venv-launch/bin/wanforge ...')


RSYNC_LINE = ("rsync is not installed here: SkyPilot copies the config and the clips to the node with it and refuses "
              "to provision without it: apt-get install rsync (Debian/Ubuntu) or brew install rsync (macOS)")
CLOUD_DOCS = "docs/cloud.md#first-launch-checklist"


@dataclass(frozen=True)
class Credential:
    """One place SkyPilot finds a cloud's credentials: environment variables (all set), or a file (holding `key`)."""

    env: tuple[str, ...] = ()
    file: str = ""  # "~/..." as SkyPilot names it
    key: str = ""  # a text the file must contain, e.g. "api_key"

    def found(self) -> bool:
        if self.env:
            return all(os.environ.get(name) for name in self.env)
        path = Path(self.file).expanduser()
        if not path.is_file():
            return False
        if not self.key:
            return True
        try:
            return self.key in path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False

    def describe(self) -> str:
        return " and ".join(self.env) if self.env else self.file + (f" (with {self.key})" if self.key else "")


@dataclass(frozen=True)
class CloudSetup:
    """What SkyPilot needs on this machine for one cloud: the Python packages of `skypilot[<cloud>]`, the programs it
    runs, and the credentials (any one of `credentials`), with the fix a new user follows."""

    modules: tuple[str, ...] = ()
    tools: tuple[str, ...] = ()
    credentials: tuple[Credential, ...] = ()
    fix: str = ""
    extra: str = ""  # skypilot[...] extra, default: the target's name
    notes: list[str] = field(default_factory=list)


def _kubeconfigs() -> tuple[Credential, ...]:
    """KUBECONFIG may list several files (':'-separated); any that exists is a kubeconfig."""
    listed = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    return (*(Credential(file=p) for p in listed), Credential(file="~/.kube/config"),
            Credential(env=("KUBERNETES_SERVICE_HOST",)))  # in-cluster: the pod's service account


CLOUDS: dict[str, CloudSetup] = {
    "runpod": CloudSetup(
        modules=("runpod",), credentials=(Credential(file="~/.runpod/config.toml", key="api_key"),),
        fix="create an API key at https://www.runpod.io/console/user/settings, then run `runpod config` (it writes "
            "~/.runpod/config.toml)"),
    "vast": CloudSetup(
        modules=("vastai_sdk",), credentials=(Credential(file="~/.config/vastai/vast_api_key"),),
        fix="copy your API key from https://cloud.vast.ai/account/ into ~/.config/vastai/vast_api_key "
            "(mkdir -p ~/.config/vastai first)"),
    "aws": CloudSetup(
        modules=("boto3", "botocore"), tools=("aws",),
        credentials=(Credential(env=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")), Credential(file="~/.aws/credentials"),
                     Credential(file="~/.aws/config"), Credential(env=("AWS_WEB_IDENTITY_TOKEN_FILE",)),
                     Credential(env=("AWS_CONTAINER_CREDENTIALS_FULL_URI",))),
        fix="run `aws configure` with an access key of your AWS account (IAM > Security credentials), or "
            "`aws configure sso`"),
    "gcp": CloudSetup(
        modules=("googleapiclient", "google.auth"), tools=("gcloud",),
        credentials=(Credential(env=("GOOGLE_APPLICATION_CREDENTIALS",)),
                     Credential(file="~/.config/gcloud/application_default_credentials.json")),
        fix="install the Google Cloud CLI (gcloud), then `gcloud init` and `gcloud auth application-default login`"),
    "azure": CloudSetup(
        modules=("azure.identity", "azure.mgmt.compute"), credentials=(Credential(file="~/.azure/msal_token_cache.json"),),
        fix="run `az login`, then `az account set -s SUBSCRIPTION_ID`"),
    "lambda": CloudSetup(
        credentials=(Credential(file="~/.lambda_cloud/lambda_keys", key="api_key"),),
        fix="create an API key at https://cloud.lambda.ai/api-keys and write `api_key = KEY` into "
            "~/.lambda_cloud/lambda_keys"),
    "nebius": CloudSetup(
        modules=("nebius",),
        credentials=(Credential(file="~/.nebius/credentials.json"), Credential(file="~/.nebius/NEBIUS_IAM_TOKEN.txt")),
        fix="put a service account's credentials in ~/.nebius/credentials.json and your tenant id in "
            "~/.nebius/NEBIUS_TENANT_ID.txt (SkyPilot's Nebius setup)"),
    "oci": CloudSetup(
        modules=("oci",), credentials=(Credential(file="~/.oci/config"),),
        fix="run `oci setup config` (it writes ~/.oci/config with your API signing key)"),
    "kubernetes": CloudSetup(
        modules=("kubernetes",), tools=("socat", "nc"),  # SkyPilot's port-forward networking (its default)
        fix="put your cluster's kubeconfig at ~/.kube/config (or set KUBECONFIG); `kubectl get nodes` must list "
            "the GPU nodes"),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def skypilot_lines(target: str) -> list[str]:
    """SkyPilot itself, then the target's extra, programs and credentials: one line per missing piece."""
    spec = importlib.util.find_spec("sky")
    if spec is None or spec.origin is None:  # (the repo's sky/ templates folder is a namespace package: no origin)
        return [launch_env_hint(target)]
    setup = CLOUDS[target]
    lines = []
    missing = [m for m in setup.modules if not _installed(m)]
    if missing:
        lines.append(f"--target {target}: SkyPilot's {target} support is not installed here (no {', '.join(missing)}): "
                     f'.venv-launch/bin/pip install -c constraints-launch.txt "skypilot[{setup.extra or target}]"')
    for tool in setup.tools:
        if shutil.which(tool) is None:
            lines.append(f"--target {target}: SkyPilot runs `{tool}`, which is not on PATH here: "
                         + _tool_fix(target, tool))
    credentials = setup.credentials or (_kubeconfigs() if target == "kubernetes" else ())
    if credentials and not any(c.found() for c in credentials):
        where = ", ".join(c.describe() for c in credentials)
        lines.append(f"--target {target}: no {target} credentials here (SkyPilot looks for {where}): {setup.fix}; "
                     f"`sky check {target}` then confirms ({CLOUD_DOCS})")
    return lines


def _tool_fix(target: str, tool: str) -> str:
    return {"aws": f'.venv-launch/bin/pip install -c constraints-launch.txt "skypilot[aws]" (it brings the aws CLI)',
            "gcloud": "install the Google Cloud CLI: https://cloud.google.com/sdk/docs/install",
            "socat": "apt-get install socat (brew install socat)",
            "nc": "apt-get install netcat-openbsd (brew install netcat)"}.get(tool, f"install {tool}")


SECRET_FIX = {
    "HF_TOKEN": "a Hugging Face token with write access (https://huggingface.co/settings/tokens)",
    "WANDB_API_KEY": "your W&B API key (https://wandb.ai/authorize)",
    "AWS_ACCESS_KEY_ID": "the access key of the S3(-compatible) store",
    "AWS_SECRET_ACCESS_KEY": "the secret key of the S3(-compatible) store",
}


def secret_lines(needed: dict[str, str], value_of) -> list[str]:
    """One line per needed secret that is not set: what needs it and where to get it."""
    return [f"{name} is not set: {why} needs it; export {name}=... ({SECRET_FIX.get(name, 'its value')}; in Colab: the "
            "Secrets panel). The value travels as a SkyPilot secret, never in a file"
            for name, why in needed.items() if not value_of(name)]


def dataset_lines(folders: dict[int, Path]) -> list[str]:
    """Each local dataset folder exists and holds files to upload."""
    lines = []
    for i, folder in folders.items():
        if not folder.is_dir():
            lines.append(f"datasets[{i}].path: {folder} is not a folder here, so there is nothing to upload: fix the "
                         f"path{' (or --hub-dataset USER/NAME to fetch a Hub dataset on the node)' if i == 0 else ''}")
        elif not any(p.is_file() for p in folder.iterdir()):
            lines.append(f"datasets[{i}].path: {folder} is empty: put the clips and their captions there")
    return lines


def readiness_lines(plan: Plan, needed_secrets: dict[str, str], value_of, folders: dict[int, Path],
                    check_credentials: bool = True) -> list[str]:
    """Everything this launch needs from this machine that is missing, one line each (empty: ready)."""
    lines = dataset_lines(folders)
    if plan.target.kind != "local":
        if shutil.which("rsync") is None:
            lines.append(RSYNC_LINE)
        lines += [line for line in skypilot_lines(plan.target.name)
                  if check_credentials or "credentials here" not in line]
        lines += secret_lines(needed_secrets, value_of)
    return lines
