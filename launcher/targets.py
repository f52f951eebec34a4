"""Where a run can go: the feasibility table SkyPilot itself does not check, and the request check.

A target is a SkyPilot cloud (or `local`). The table says, per target, what kind of machine the image runs as, how
many nodes it allows, whether buckets can be mounted, whether it has spot instances, and the accelerator name each
known GPU has there. `check_request` turns a launch request into a `Plan` or one UserError naming the fix, before
anything is rendered or launched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from trainer.errors import UserError

Kind = Literal["local", "pod", "vm", "kubernetes"]

# Kit GPU name -> SkyPilot accelerator name, per cloud (SkyPilot catalog v8 common/accelerators.csv and each cloud's
# vms.csv). RunPod names the SXM H100 / H200 "-SXM" (its plain "H100" is the PCIe card). Kubernetes uses the node
# label of the cluster; the names below are the ones SkyPilot's GPU labellers and its AMD examples use (MI300:N).
_NVIDIA_COMMON = {"H100": "H100", "H200": "H200", "B200": "B200", "A100-80GB": "A100-80GB", "L40S": "L40S", "L4": "L4"}


@dataclass(frozen=True)
class Target:
    name: str
    kind: Kind
    max_nodes: int
    mounts: bool  # bucket MOUNT / MOUNT_CACHED file_mounts work
    spot: bool
    gpus: dict[str, str] = field(default_factory=dict)  # kit GPU -> accelerator name on this cloud
    note: str = ""


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("local", "local", 1, False, False, note="this machine, no SkyPilot: the same setup/run script"),
        Target("runpod", "pod", 1, False, False,
               {"H100": "H100-SXM", "H200": "H200-SXM", "B200": "B200", "A100-80GB": "A100-80GB-SXM", "L40S": "L40S",
                "RTX6000-Ada": "RTX6000-Ada", "RTXA6000": "RTXA6000", "RTX4090": "RTX4090", "L4": "L4",
                "MI300X": "MI300X"},
               "the image is the pod: one node, inputs copied, outputs uploaded by the node, deleted when idle"),
        Target("vast", "pod", 1, False, False,
               {"H100": "H100", "H200": "H200", "L40S": "L40S", "RTX6000-Ada": "RTX6000-Ada", "RTXA6000": "RTXA6000",
                "RTX5090": "RTX5090", "RTX4090": "RTX4090"},
               "the image is the instance: one node, inputs copied, outputs uploaded by the node, no ports"),
        Target("aws", "vm", 16, True, True,
               {"H100": "H100", "H200": "H200", "B200": "B200", "A100-80GB": "A100-80GB", "L40S": "L40S", "L4": "L4"}),
        Target("gcp", "vm", 16, True, True,
               {"H100": "H100", "H200": "H200", "A100-80GB": "A100-80GB", "L4": "L4"}),
        Target("azure", "vm", 16, True, True, {"H100": "H100", "A100-80GB": "A100-80GB"}),
        Target("lambda", "vm", 16, True, False,
               {"H100": "H100", "B200": "B200", "A100-80GB": "A100-80GB", "RTXA6000": "A6000"}),
        Target("nebius", "vm", 16, True, True, {"H100": "H100", "H200": "H200", "B200": "B200", "L40S": "L40S"}),
        Target("oci", "vm", 16, True, True, {"H100": "H100", "H200": "H200", "A100-80GB": "A100-80GB", "L40S": "L40S"}),
        Target("kubernetes", "kubernetes", 16, True, False, {**_NVIDIA_COMMON, "RTX4090": "RTX4090", "MI300X": "MI300"},
               "the image is the pod on your cluster; AMD nodes need the ROCm image (chosen for MI300X)"),
    )
}


@dataclass(frozen=True)
class Plan:
    """A checked request: everything the renderer needs besides the config."""

    target: Target
    gpu: str | None  # kit GPU name (None on local)
    accelerator: str | None  # SkyPilot `accelerators:` value, e.g. "H100-SXM:1" or "MI300:8"
    gpus_per_node: int
    nodes: int
    vendor: str  # "nvidia" | "amd": picks the image
    managed: bool
    spot: bool
    output: str | None  # hf://user/repo, s3://bucket/prefix, gs://..., or None (outputs stay on the node)
    output_mode: Literal["mount", "upload", "node"]


def target(name: str) -> Target:
    if name not in TARGETS:
        raise UserError(f'--target "{name}": unknown target; choose one of {", ".join(TARGETS)}')
    return TARGETS[name]


def offering(gpu: str) -> list[str]:
    """The cloud targets that offer a kit GPU."""
    return [t.name for t in TARGETS.values() if gpu in t.gpus]


OUTPUT_HELP = "hf://USER/REPO (a Hugging Face model repo) or a bucket: s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, r2://BUCKET/PREFIX"
BUCKET_SCHEMES = ("s3", "gs", "r2")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]")  # S3 / GCS / R2 bucket names (GCS also allows "_")
_PREFIX_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-=+]*")  # a key prefix segment: no spaces, quotes or shell syntax
RUN_NAME_RULE = re.compile(r"[a-z][a-z0-9-]{0,39}")  # a SkyPilot cluster name, a folder name, a Hub path segment


def check_output(output: str, field: str = "--output") -> str:
    """A checked output URI, or one UserError: Hub repo-id rules, bucket-name rules, no traversal, nothing for a shell.

    Checked at `launch` and again on the node (launcher.node), so a hand-written task is held to the same rules."""
    scheme, sep, rest = output.partition("://")
    bad = f"{field} {output!r}"
    if not sep or scheme not in ("hf", *BUCKET_SCHEMES):
        raise UserError(f"{bad}: use {OUTPUT_HELP}")
    if "://" in rest or any(ch.isspace() for ch in output):
        raise UserError(f"{bad}: one scheme and no spaces, e.g. hf://me/my-lora or s3://my-bucket/loras")
    if scheme == "hf":
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        repo = rest.strip("/")
        try:
            if repo.count("/") != 1:
                raise HFValidationError("a repo id is NAMESPACE/NAME")
            validate_repo_id(repo)
        except HFValidationError as err:
            raise UserError(f"{bad}: not a Hub repo id ({str(err).splitlines()[0]}); e.g. hf://me/my-lora") from None
        return f"hf://{repo}"
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise UserError(f"{bad}: {bucket!r} is not a bucket name (3-63 lowercase letters, digits, '-', '.'); "
                        f"e.g. {scheme}://my-bucket/loras")
    parts = [p for p in prefix.split("/") if p]
    for part in parts:
        if not _PREFIX_PART.fullmatch(part) or part.strip(".") == "":
            raise UserError(f"{bad}: the prefix part {part!r} is not allowed (letters, digits, '.', '_', '-', '=', '+'; "
                            f"no '..'); e.g. {scheme}://{bucket}/loras")
    return f"{scheme}://{bucket}" + (f"/{'/'.join(parts)}" if parts else "")


FOLDER_NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ +=-]{0,99}")  # one path segment: no "/", quotes or `$;&|`


def check_run_name(name: str, field: str = "--name", folder_only: bool = False) -> str:
    """A run name: it names the cluster, the run folder and its place in the bucket / Hub repo. folder_only (the node,
    where a `--target local` run keeps the config's own folder name): one safe path segment, spaces allowed."""
    if folder_only:
        if not FOLDER_NAME_RULE.fullmatch(name) or ".." in name or name != name.strip():
            raise UserError(f'{field} {name!r}: one folder name (letters, digits, spaces, ".", "_", "-"; no "/" or "..")')
        return name
    if not RUN_NAME_RULE.fullmatch(name):
        raise UserError(f'{field} {name!r}: use 1-40 lowercase letters, digits and dashes, starting with a letter '
                        "(e.g. wf-my-lora)")
    return name


def _output_kind(output: str) -> str:
    return "hub" if check_output(output).startswith("hf://") else "bucket"


def check_request(
    target_name: str,
    gpu: str | None,
    count: int = 1,
    nodes: int = 1,
    managed: bool = False,
    spot: bool = False,
    output: str | None = None,
    output_mode: str = "auto",
) -> Plan:
    """Check a launch request against the table; every impossible combination is one UserError with its fix.

    `gpu` is a kit GPU name already resolved (see launcher.estimate.parse_gpu); `count` GPUs per node.
    """
    t = target(target_name)
    output = check_output(output) if output else None
    if nodes < 1:
        raise UserError(f"--nodes {nodes}: must be at least 1")
    if t.kind == "local":
        if nodes > 1 or managed or spot:
            raise UserError("--target local runs on this machine: one node, no --managed, no --spot")
        if output and _output_kind(output) == "bucket":
            raise UserError("--target local writes the run folder here: no --output bucket (use a cloud target)")
        return Plan(t, gpu, None, count, 1, "nvidia", False, False, output, "upload" if output else "node")

    if gpu is None:
        raise UserError(f"--target {t.name} needs --gpu (a name with an optional count, e.g. H100:1, or auto)")
    if gpu not in t.gpus:
        where = offering(gpu)
        elsewhere = f" ({gpu} is on: {', '.join(where)})" if where else ""
        raise UserError(f"--gpu {gpu}: not offered on {t.name}; {t.name} has {', '.join(t.gpus)}{elsewhere}")
    if nodes > t.max_nodes:
        why = "runs the image as the pod itself (no multi-node)" if t.kind == "pod" else f"allows up to {t.max_nodes}"
        raise UserError(f"--nodes {nodes}: {t.name} {why}; use --nodes 1 with more GPUs per node "
                        f"(--gpu {gpu}:8), or a VM cloud / kubernetes for several nodes")
    if spot and not t.spot:
        raise UserError(f"--spot: {t.name} has no spot instances in SkyPilot; use aws, gcp, azure, nebius or oci")

    mode = output_mode
    if output is None:
        if mode == "mount":
            raise UserError("--output-mode mount needs --output BUCKET (s3://BUCKET/PREFIX, gs://...)")
        if t.kind == "pod":
            raise UserError(f"--target {t.name}: the pod is deleted when training ends, so the node must upload "
                            "the run: add --output hf://USER/REPO (with HF_TOKEN set) or --output s3://BUCKET/PREFIX")
        if managed or spot:
            raise UserError("--managed/--spot: a recovered job starts on a new machine, so checkpoints must live "
                            "outside it: add --output s3://BUCKET/PREFIX (mounted) or hf://USER/REPO")
        mode = "node"
    else:
        kind = _output_kind(output)
        if mode == "auto":
            mode = "mount" if (kind == "bucket" and t.mounts) else "upload"
        if mode == "mount" and not t.mounts:
            raise UserError(f"--output-mode mount: {t.name} cannot mount buckets (the image is the pod; only COPY "
                            "works there): use --output-mode upload, the node then uploads the run itself")
        if mode == "mount" and kind != "bucket":
            raise UserError(f"--output-mode mount: {output} is not a bucket; a Hub repo is uploaded (--output-mode upload)")
        if mode == "upload" and kind == "bucket" and not output.startswith("s3://"):
            raise UserError(f"--output {output}: the node uploads only to s3:// (any S3-compatible store with "
                            "AWS_ENDPOINT_URL) or hf://; mount gs:// / r2:// buckets on a VM cloud instead")

    accel_name = t.gpus[gpu]
    from launcher.estimate import known_gpus

    vendor = known_gpus()[gpu].vendor
    return Plan(t, gpu, f"{accel_name}:{count}", count, nodes, vendor, managed, spot, output, mode)  # type: ignore[arg-type]


def feasibility_table() -> str:
    """The table as markdown (README, `wanforge launch --help-targets`)."""
    from launcher.estimate import known_gpus

    gpus = known_gpus()
    rows = ["| target | runs the image as | nodes | bucket mount | spot | GPUs (kit name = SkyPilot name there) |",
            "|---|---|---|---|---|---|"]
    for t in TARGETS.values():
        if t.kind == "local":
            continue
        names = ", ".join(k if k == v else f"{k}={v}" for k, v in t.gpus.items())
        amd = [k for k in t.gpus if gpus[k].vendor == "amd"]
        image = {"pod": "the pod", "vm": "a container in the VM", "kubernetes": "the pod"}[t.kind]
        image += " (ROCm image for " + ", ".join(amd) + ")" if amd else ""
        nodes = "1" if t.max_nodes == 1 else "several"
        rows.append(f"| {t.name} | {image} | {nodes} | {'yes' if t.mounts else 'no (COPY only)'} | "
                    f"{'yes' if t.spot else 'no'} | {names} |")
    return "\n".join(rows)
