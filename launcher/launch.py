"""`wanforge launch|estimate|status|logs|sync|down`: check the request, estimate, render, then run it here or via SkyPilot.

`--target local` is the embedded default: the same setup/run scripts the SkyPilot task runs, on this machine, with
one node's SKYPILOT_* variables, the inputs placed as the task's file_mounts would place them, and the run folder at
the config's train.output_dir. Nothing here imports SkyPilot (launcher.lifecycle does, when it is called).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from launcher import lifecycle, render
from launcher.estimate import Estimate, cheapest_fitting, cited_rows, estimate, estimate_all, parse_gpu
from launcher.estimate_table import cpu_trial_note
from launcher.lifecycle import LaunchRecord
from launcher.readiness import readiness_lines, secret_lines
from launcher.targets import TARGETS, Plan, check_output, check_request, check_run_name
from trainer.config.files import load_config, save_config
from trainer.config.schema import WanforgeConfig
from trainer.errors import UserError
from trainer.model import sizing
from trainer.preflight.check import preflight


# ---------------------------------------------------------------- secrets


def secret_value(name: str) -> str | None:
    """A secret from the caller's environment, else from Colab's userdata (Colab keeps them out of the environment)."""
    if os.environ.get(name):
        return os.environ[name]
    try:
        from google.colab import userdata  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        return userdata.get(name) or None
    except Exception:  # userdata raises its own errors for absent / not-shared secrets
        return None


def needed_secrets(cfg: WanforgeConfig, plan: Plan, hub_dataset: str = "") -> dict[str, str]:
    """The secrets this run uses, and only those, each with what needs it: every other secret of the caller's shell
    stays here.

    HF_TOKEN: an hf:// output, a Hub dataset, push_to_hub, or a Hub model (a private or gated one needs it; the
    public Wan repos work without, so it travels for a Hub model only when set). WANDB_API_KEY: report_to wandb.
    AWS keys: an s3:// output the node uploads to (a mounted bucket uses SkyPilot's own cloud credentials)."""
    need: dict[str, str] = {}
    output = plan.output or ""
    hub = [why for why, used in ((f"--output {output}", output.startswith("hf://")),
                                 (f"--hub-dataset {hub_dataset}", bool(hub_dataset)),
                                 ("[hub] push_to_hub", cfg.hub.push_to_hub or cfg.hub.push_checkpoints_to_hub)) if used]
    if hub:
        need["HF_TOKEN"] = " and ".join(hub)
    if cfg.tracking.report_to == "wandb":
        need["WANDB_API_KEY"] = 'tracking.report_to = "wandb"'
    if plan.output_mode == "upload" and output.startswith("s3://"):
        need["AWS_ACCESS_KEY_ID"] = need["AWS_SECRET_ACCESS_KEY"] = f"the node's uploads to --output {output}"
    return need


def optional_secrets(cfg: WanforgeConfig, plan: Plan) -> list[str]:
    """Secrets the run uses when the caller has them: HF_TOKEN for a Hub model, AWS_ENDPOINT_URL for an s3:// store."""
    optional = []
    if not all(Path(v).exists() for v in (cfg.model.pretrained_model_name_or_path,
                                           cfg.model.pretrained_transformer_model_name_or_path) if v):
        optional.append("HF_TOKEN")
    if plan.output_mode == "upload" and (plan.output or "").startswith("s3://"):
        optional.append("AWS_ENDPOINT_URL")
    return optional


def secret_names(cfg: WanforgeConfig, plan: Plan, hub_dataset: str = "", present_only: bool = True) -> list[str]:
    """Names of the secrets that travel: the needed ones, and the optional ones the caller has set."""
    names = set(needed_secrets(cfg, plan, hub_dataset))
    names |= {n for n in optional_secrets(cfg, plan) if not present_only or secret_value(n)}
    return sorted(names)


def gather_secrets(cfg: WanforgeConfig, plan: Plan, hub_dataset: str = "") -> dict[str, str]:
    """Values of the secrets the run uses (a missing needed one is a UserError); nothing else of the environment."""
    missing = secret_lines(needed_secrets(cfg, plan, hub_dataset), secret_value)
    if missing:
        raise UserError("\n".join(missing))
    return {n: v for n in secret_names(cfg, plan, hub_dataset) if (v := secret_value(n))}


# ---------------------------------------------------------------- the request


def run_name(config: Path, given: str | None) -> str:
    """A SkyPilot cluster / job name: lowercase letters, digits and dashes, starting with a letter. A given name is
    checked as it is (never rewritten: it names the run folder and its place in the bucket / Hub repo)."""
    if given is not None:
        return check_run_name(given)
    return default_run_name(config.stem)


def default_run_name(stem: str) -> str:
    """wf-<stem>-<MMDD-HHMMSS>, the stem reduced to lowercase letters, digits and dashes (the notebook form uses it)."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"wf-{stem}".lower()).strip("-")[:26].rstrip("-")
    return check_run_name(f"{name}-{time.strftime('%m%d-%H%M%S')}")


IMAGE_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}")  # registry/name:tag or @sha256:..., nothing a shell reads


def check_image(value: str) -> str:
    """--image: a container image reference (your own build of docker/, pushed to a registry the node can pull)."""
    if not IMAGE_RULE.fullmatch(value) or ".." in value or "/" not in value and ":" not in value:
        raise UserError(f"--image {value!r}: give an image reference such as ghcr.io/me/wanforge-trainer:0.1.0-cu128 "
                        "(letters, digits, '.', '_', '-', '/', ':', '@')")
    return value


def check_hub_dataset(value: str) -> str:
    """--hub-dataset: a Hub dataset id (USER/NAME), checked by the Hub's own repo-id rules."""
    if not value:
        return ""
    repo = value.removeprefix("hf://").removeprefix("datasets/")
    check_output(f"hf://{repo}", "--hub-dataset")
    return repo


def plan_request(cfg: WanforgeConfig, args: argparse.Namespace) -> tuple[Plan, Estimate | None]:
    """--gpu/--nodes/... -> a checked Plan and the estimate for it (auto: the cheapest GPU there that fits)."""
    target = args.target
    if target == "local":
        return check_request("local", None, output=args.output), None
    if target not in TARGETS:
        check_request(target, None)  # raises the unknown-target message
    spec = args.gpu or "auto"
    name, _, count_text = spec.partition(":")
    count = int(count_text) if count_text.isdigit() else 1
    if name.lower() == "auto":
        offered = list(TARGETS[target].gpus)
        est = cheapest_fitting(cfg, offered, count * args.nodes)
        gpu = est.gpu
    else:
        card, count = parse_gpu(spec)
        gpu = card.name
    plan = check_request(target, gpu, count, args.nodes, args.managed, args.spot, args.output, args.output_mode)
    est = estimate(cfg, f"{gpu}:{count * args.nodes}")
    if not est.fits and not args.ignore_estimate:
        raise UserError(f"--gpu {gpu}: the estimate says this config needs {est.vram_gib:.1f} GiB per GPU and "
                        f"{est.host_gib:.0f} GiB of host RAM, more than {gpu} has (GPU memory x {sizing.HEADROOM}, "
                        f"{est.host_ram_gib:.0f} GiB host on a typical node); pick a larger GPU "
                        "(--gpu auto), set memory.gradient_checkpointing = \"full\", or --ignore-estimate to try anyway")
    return plan, est


def check_model_travels(cfg: WanforgeConfig) -> None:
    """Model weights come from the Hub on the node; a local model folder of this machine would not be there."""
    for name in ("pretrained_model_name_or_path", "pretrained_transformer_model_name_or_path"):
        value = getattr(cfg.model, name)
        if value and Path(value).exists():
            raise UserError(f"model.{name}: {value} is a path on this machine and is not uploaded to the node; "
                            "push it to a Hub repo and give its id (or use --target local)")


def check_control_travels(cfg: WanforgeConfig) -> None:
    """VACE control / mask / reference folders travel inside their dataset folder (the only thing uploaded)."""
    for i, ds in enumerate(cfg.datasets):
        for name in ("control_path", "mask_path", "reference_path"):
            value = getattr(ds, name)
            if value is None:
                continue
            folder = Path(value) if Path(value).is_absolute() else ds.path / value
            if not folder.resolve().is_relative_to(ds.path.resolve()):
                raise UserError(f"datasets[{i}].{name}: {value} is outside the dataset folder {ds.path}, and only that "
                                f"folder is uploaded: move it inside and set {name} relative to it (e.g. \"control\")")


def dataset_folders(cfg: WanforgeConfig, hub_dataset: str) -> dict[int, Path]:
    """The local dataset folders the task uploads, by index (datasets[0] comes from the Hub with --hub-dataset)."""
    return {i: ds.path for i, ds in enumerate(cfg.datasets) if not (i == 0 and hub_dataset)}


def launch_preflight(cfg: WanforgeConfig, plan: Plan, missing_folders: set[int]) -> None:
    """The config's preflight as the node will run it; a dataset folder that is not here is a readiness line
    (launcher.readiness), so its own errors are not repeated (and nothing is scanned there)."""
    here = plan.target.kind == "local"  # the node runs `train --resume latest`
    report = preflight(cfg, here=here, resume="latest", num_processes=max(plan.gpus_per_node, 1) * plan.nodes,
                       scan=not missing_folders)
    report.errors = [e for e in report.errors if not any(e.startswith(f"datasets[{i}].path:") for i in missing_folders)]
    report.raise_if_invalid()


# ---------------------------------------------------------------- local target


def node_env(plan: Plan, name: str, node_root: Path, outputs: Path, hub_dataset: str) -> dict[str, str]:
    """The environment the task's setup/run get on one node: the task's envs plus SkyPilot's per-node variables."""
    envs = render.node_envs(name, plan, hub_dataset)
    envs.update(WANFORGE_ROOT=str(node_root), WANFORGE_RUNS_DIR=str(outputs), WANFORGE_PYTHON=sys.executable)
    envs.update(SKYPILOT_NODE_RANK="0", SKYPILOT_NODE_IPS="127.0.0.1", SKYPILOT_NUM_NODES="1",
                SKYPILOT_NUM_GPUS_PER_NODE=str(max(plan.gpus_per_node, 1)), SKYPILOT_TASK_ID=f"local-{name}")
    return envs


def place_inputs(node_root: Path, config_file: Path, datasets: list[Path], hub_dataset: str) -> None:
    """What the task's file_mounts do on a node: the config copied, each dataset folder at input/data/<i>."""
    inputs = node_root / "input"
    if inputs.exists():
        shutil.rmtree(inputs)
    (inputs / "data").mkdir(parents=True)
    shutil.copy2(config_file, inputs / "config.toml")
    for i, folder in enumerate(datasets):
        if not (i == 0 and hub_dataset):
            (inputs / "data" / str(i)).symlink_to(folder.resolve(), target_is_directory=True)


def run_local(task: dict[str, Any], env: dict[str, str]) -> int:
    """Run the task's setup then run script with bash, as SkyPilot would on the node."""
    full = {**os.environ, **env}
    for part in ("setup", "run"):
        code = subprocess.run(["bash", "-c", task[part]], env=full).returncode
        if code != 0:
            print(f"wanforge launch --target local: {part} exited {code}", file=sys.stderr)
            return code
    return 0


# ---------------------------------------------------------------- commands


def cmd_launch(args: argparse.Namespace) -> int:
    config = Path(args.config)
    cfg = load_config(config, args.set)
    plan, est = plan_request(cfg, args)
    if args.keep_alive_min < 0:
        raise UserError(f"--keep-alive-min {args.keep_alive_min}: minutes, 0 or more")
    name = run_name(config, args.name)
    hub_dataset = check_hub_dataset(args.hub_dataset or "")
    folders = dataset_folders(cfg, hub_dataset)
    launch_preflight(cfg, plan, {i for i, f in folders.items() if not f.is_dir()})
    if plan.target.kind != "local":
        check_model_travels(cfg)
        check_control_travels(cfg)
    # what this machine must have for the launch, before SkyPilot is called: each missing piece one line
    missing = readiness_lines(plan, needed_secrets(cfg, plan, hub_dataset), secret_value, folders,
                              check_credentials=not args.skip_credential_check)
    if missing and not args.dryrun:
        raise UserError("\n".join(missing))
    for line in missing:
        print(f"warning: {line}", file=sys.stderr)
    staging = lifecycle.state_dir() / name
    staging.mkdir(parents=True, exist_ok=True)
    staged_config = staging / "config.toml"
    save_config(cfg, staged_config)
    if plan.target.kind == "local":
        secrets: dict[str, str] = {}
        names: list[str] = []
    elif args.dryrun:  # names only: a dry run shows which secrets would travel, and needs none of them set
        secrets, names = {}, secret_names(cfg, plan, hub_dataset)
    else:
        secrets = gather_secrets(cfg, plan, hub_dataset)
        names = sorted(secrets)
    task = render.render_task(plan, name, staged_config, list(folders.values()), hub_dataset, names,
                              image=check_image(args.image) if args.image else None, keep_alive_min=args.keep_alive_min)
    (staging / "task.yaml").write_text(render.dump(task), encoding="utf-8")
    note = cpu_trial_note(cfg)  # the tiny models: a GPU estimate of them would be all zeros
    estimate_line = f"estimate: {note}" if note else f"estimate: {est.line()}" if est else ""

    if args.dryrun:
        print(render.dump(task))
        if estimate_line:
            print(estimate_line + (f"\n  from {est.basis}" if est and not note else ""))
        ready = "; fix the warnings above before a real launch" if missing else ""
        print(f"dry run: nothing launched (task written to {staging / 'task.yaml'}){ready}")
        return 0

    local_dir = cfg.train.output_dir
    rec = LaunchRecord(name=name, target=plan.target.name, managed=plan.managed, output=plan.output,
                       output_mode=plan.output_mode, remote=f"{name}:{render.NODE_OUTPUTS}/{name}",
                       local_dir=str(local_dir), launched_at=lifecycle.now(), accelerator=plan.accelerator or "")
    if plan.target.kind == "local":
        # the run folder is the config's own output_dir: the node's outputs root is its parent
        rec.remote, rec.synced_at = str(local_dir), lifecycle.now()
        lifecycle.save_record(rec)
        env = node_env(plan, local_dir.name, staging / "node", local_dir.parent, hub_dataset)
        place_inputs(staging / "node", staged_config, list(folders.values()), hub_dataset)
        code = run_local(task, env)
        print(f"run folder: {local_dir}")
        return code

    if estimate_line:
        print(estimate_line)
    lifecycle.launch(task, rec, secrets)
    where = {"node": f"on the node until `wanforge sync {name}`", "mount": f"in {plan.output}/{name}",
             "upload": f"uploaded to {plan.output} ({name}/)"}[plan.output_mode]
    print(f"launched {name} on {plan.target.name} ({plan.accelerator} x {plan.nodes} node(s)); outputs {where}")
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    note = cpu_trial_note(cfg)
    if note:  # the tiny models: a GPU estimate of them would be all zeros
        print(note)
        return 0
    if args.gpu:
        card, count = parse_gpu(args.gpu)
        rows = [estimate(cfg, f"{card.name}:{count}")]
    else:
        rows = estimate_all(cfg)
    print(f"{cfg.model.flavour}, {cfg.train.max_train_steps} steps, batch {cfg.train.train_batch_size}"
          f" x {cfg.train.gradient_accumulation_steps}, memory preset {cfg.memory.preset} (resolved per GPU below):")
    for e in rows:
        print("  " + e.line())
    print("measured rows each figure is scaled from ([row N] above; launcher/calibration.toml [[measured]], N-th row):")
    for line in cited_rows(rows):
        print("  " + line)
    if len(rows) == 1:
        print(f"how: {rows[0].basis}")
    print("s/step is scaled from its row by FLOPs and, on another GPU, by datasheet bf16 TFLOP/s; host RAM is the "
          "card's typical node (calibration.toml host_source); prices: reference on-demand $/h per GPU "
          "(calibration.toml names each source), check the live price with `sky show-gpus`")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    rec = lifecycle.load_record(args.run)
    if rec.launch_status == "launch_failed":
        print(f"{rec.name}: target {rec.target}, launch_failed: {rec.launch_error}; nothing is running "
              f"(fix that and `wanforge launch` again)")
        return 0
    print(f"{rec.name}: target {rec.target}{' (managed job)' if rec.managed else ''}, outputs: "
          f"{rec.output or 'on the node'} ({rec.output_mode}), last sync: {rec.synced_at or 'never'}"
          f"{f' (run was {rec.synced_status})' if rec.synced_status else ''}")
    from launcher.sync import node_status_line

    line = node_status_line(rec)
    if line:
        print(f"  run: {line}")
    if rec.target == "local":
        return 0
    for row in lifecycle.status(rec):
        keys = ("name", "job_name", "status", "resources_str", "launched_at", "job_duration")
        print("  " + ", ".join(f"{k}={row[k]}" for k in keys if row.get(k) is not None))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    rec = lifecycle.load_record(args.run)
    if rec.target == "local":
        raise UserError(f"{rec.name} ran here: its output was printed; metrics are in {rec.local_dir}/metrics.jsonl")
    return lifecycle.logs(rec, follow=not args.no_follow)


def cmd_sync(args: argparse.Namespace) -> int:
    from launcher.sync import sync_run

    rec = lifecycle.load_record(args.run)
    lifecycle.refuse_if_failed(rec)
    folder, status = sync_run(rec, Path(args.to) if args.to else None, from_node=args.from_node)
    print(f"synced {rec.name} -> {folder} (run status: {status})")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    rec = lifecycle.load_record(args.run)
    if rec.target == "local":
        print(f"{rec.name} ran here: nothing to take down")
        return 0
    if rec.launch_status == "launch_failed":
        print(f"{rec.name}: its launch failed ({rec.launch_error}); nothing is up")
        return 0
    was_up = lifecycle.down(rec, force=args.force)
    print(f"{rec.name} is down" if was_up else f"{rec.name}: SkyPilot has no cluster of that name (already down)")
    return 0


def add_commands(sub: Any, with_config: Any) -> None:
    """The launcher's subcommands, added to the `wanforge` parser (launcher/cli.py)."""
    p = with_config(sub.add_parser("estimate", help="VRAM, s/step, time and cost of a config per GPU"))
    p.add_argument("--gpu", help="one GPU (NAME or NAME:COUNT); default: every known GPU, cheapest first")
    p.set_defaults(func=cmd_estimate)

    p = with_config(sub.add_parser("launch", help="run a config here or on a cloud GPU through SkyPilot"))
    p.add_argument("--target", required=True, choices=list(TARGETS), help="local (this machine) or a SkyPilot cloud")
    p.add_argument("--gpu", help="NAME[:COUNT] per node (e.g. H100:1, MI300X:8) or auto: the cheapest that fits")
    p.add_argument("--nodes", type=int, default=1, help="nodes (VM clouds and kubernetes only)")
    p.add_argument("--managed", action="store_true", help="a SkyPilot managed job: recovers from preemption")
    p.add_argument("--spot", action="store_true", help="spot instances (needs --output; best with --managed)")
    p.add_argument("--output", help="where the run folder lives: s3://BUCKET/PREFIX, gs://..., or hf://USER/REPO")
    p.add_argument("--output-mode", default="auto", choices=["auto", "mount", "upload"],
                   help="mount the bucket (VM clouds, default there) or let the node upload (pod clouds, Hub)")
    p.add_argument("--hub-dataset", help="a Hugging Face dataset id fetched on the node, used as datasets[0]")
    p.add_argument("--image", help="the trainer image the node runs (default: this version's published image for the "
                                   "GPU's vendor, see docs/containers.md); your own: REGISTRY/NAME:TAG")
    p.add_argument("--name", help="run / cluster name (default wf-<config>-<time>)")
    p.add_argument("--dryrun", action="store_true", help="print the rendered task and the estimate, launch nothing")
    p.add_argument("--ignore-estimate", action="store_true", help="launch even if the estimate says it won't fit")
    p.add_argument("--skip-credential-check", action="store_true",
                   help="launch even where no credentials of the target are found here (SkyPilot finds them another "
                        "way, e.g. an instance role)")
    p.add_argument("--keep-alive-min", type=int, default=render.KEEP_ALIVE_MIN,
                   help="pod targets: minutes the pod stays up after a final upload that failed, so `wanforge sync "
                        f"RUN --from-node` can fetch the run (default {render.KEEP_ALIVE_MIN})")
    p.set_defaults(func=cmd_launch)

    for name, helptext, func in (("status", "the run's cluster / managed job status", cmd_status),
                                 ("logs", "stream the run's logs", cmd_logs),
                                 ("sync", "bring the run folder back", cmd_sync),
                                 ("down", "tear the run's cluster down (cancel a managed job)", cmd_down)):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("run", help="the run name printed by `wanforge launch`")
        p.set_defaults(func=func)
        if name == "logs":
            p.add_argument("--no-follow", action="store_true", help="print what is there and return")
        if name == "sync":
            p.add_argument("--to", help="local folder (default: the config's train.output_dir)")
            p.add_argument("--from-node", action="store_true",
                           help="rsync from the node even where the run is uploaded (after a failed final upload)")
        if name == "down":
            p.add_argument("--force", action="store_true", help="even if the outputs were never synced")

