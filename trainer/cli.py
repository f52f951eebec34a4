"""The engine's commands (demo, train, check, cache, validate, export): `wanforge` hands them here, and the node and
the trainer images run them as `python -m trainer.cli`. Importing this module does not import torch."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from trainer.config.files import load_config
from trainer.config.schema import WanforgeConfig
from trainer.errors import UserError, is_disk_full

UPLOAD_FAILED_EXIT = 3  # trained, but the final upload did not verify (run.json status upload_failed)


def _load(args: argparse.Namespace) -> WanforgeConfig:
    return load_config(args.config, args.set)


def cmd_demo(args: argparse.Namespace) -> int:
    from trainer.demo.run import run_demo

    started = time.perf_counter()
    result = run_demo(Path(args.out).resolve(), args.steps)
    print(f"\nwanforge demo finished in {time.perf_counter() - started:.0f} s")
    print(result.summary())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.loop.train import train

    from trainer.rundir import RunDir

    cfg = _load(args)
    result = train(cfg, resume=args.resume)
    print(f"LoRA: {result.lora_file}")
    for video in result.videos:
        print(f"validation video: {video}")
    status = RunDir(result.run_dir).read_status()
    if status.get("status") == "upload_failed":  # trained, but the Hub does not hold the LoRA: say so in the exit code
        print(f"error: {status.get('error')}\n  fix: {status.get('remedy')}", file=sys.stderr)
        return UPLOAD_FAILED_EXIT
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from trainer.preflight.check import check_config_file

    report = check_config_file(args.config, args.set, resume=args.resume)
    if report.buckets:
        print("\n".join(["buckets (samples per bucket, skipped files and why):", *report.buckets]))
    for line in report.warnings:
        print(f"warning: {line}", file=sys.stderr)
    if report.errors:
        print("\n".join(f"error: {p}" for p in report.errors), file=sys.stderr)
        return 2
    cfg = report.config
    print(f"config OK: {cfg.model.flavour}, LoRA rank {cfg.lora.rank}, {cfg.train.max_train_steps} steps -> {cfg.train.output_dir}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from trainer.data.cache import build_caches
    from trainer.preflight.check import preflight
    from trainer.rundir import RunDir

    cfg = _load(args)
    state = PartialState()  # under `accelerate launch` every process builds its own share of the entries
    preflight(cfg, num_processes=state.num_processes, training=False).raise_if_invalid()
    run = RunDir(cfg.train.output_dir)
    if state.is_main_process:
        run.lock("cache")  # one writer per run: not beside a `train` of the same run
    try:
        report = build_caches(cfg, state.device, rank=state.process_index, world_size=state.num_processes,
                              barrier=state.wait_for_everyone, show_progress=state.is_main_process)
    finally:
        run.unlock()
    if not state.is_main_process:
        return 0
    ready = sum(len(s) for s in report.samples)
    for path, why in report.skipped:
        print(f"  skipped {path}: {why}")
    for path in report.quarantined:
        print(f"  moved to quarantine: {path}")
    conditioning = f", {report.built_conditioning} image conditionings" if report.built_conditioning else ""
    print(f"{ready} samples cached ({report.built_latents} latents and {report.built_texts} text embeddings"
          f"{conditioning} built now, {len(report.skipped)} files skipped)")
    return 0


RENDER_FLAGS = ("adapter", "steps", "guidance_scale", "guidance_scale_low", "flow_shift", "scheduler", "lora_strength")
CLI_RENDER = "cli"  # the render `wanforge validate` makes from its flags


def parse_adapter_flag(spec: str) -> dict:
    """`--adapter PATH[,strength=S][,expert=high|low|both]` -> a [[validation.renders.adapters]] table."""
    path, *options = spec.split(",")
    table: dict = {"path": path.strip()}
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip()
        if not sep or key not in ("strength", "expert"):
            raise UserError(f'--adapter "{spec}": after the path come strength=S and expert=high|low|both, comma '
                            'separated, e.g. --adapter speed.safetensors,strength=1.0,expert=both')
        if key == "strength":
            try:
                table[key] = float(value)
            except ValueError:
                raise UserError(f'--adapter "{spec}": strength "{value}" is not a number (e.g. strength=0.8)') from None
        else:
            table[key] = value.strip()
    return table


def cli_render(args: argparse.Namespace) -> dict | None:
    """The one render `wanforge validate` flags describe (None: no flag, the config's renders run)."""
    if all(getattr(args, name, None) in (None, []) for name in RENDER_FLAGS):
        return None
    render: dict = {"name": CLI_RENDER, "adapters": [parse_adapter_flag(a) for a in args.adapter or []]}
    for flag, field in (("steps", "num_inference_steps"), ("guidance_scale", "guidance_scale"),
                        ("guidance_scale_low", "guidance_scale_low"), ("flow_shift", "flow_shift"),
                        ("scheduler", "scheduler"), ("lora_strength", "lora_strength")):
        if getattr(args, flag) is not None:
            render[field] = getattr(args, flag)
    return render


def cmd_validate(args: argparse.Namespace) -> int:
    from trainer.config.files import apply_override, config_from_dict, read_config_data
    from trainer.outputs.validation_round import validate_lora
    from trainer.preflight.check import preflight

    render = cli_render(args)
    if render is None:
        cfg = _load(args)
    else:  # the flags replace the config's renders, validated like the file's own (their paths: from the shell's folder)
        for adapter in render["adapters"]:
            if adapter["path"] and not adapter["path"].startswith("hf://"):
                adapter["path"] = str(Path(adapter["path"]).expanduser().resolve())
        data = read_config_data(args.config)
        for assignment in args.set:
            apply_override(data, assignment)
        data.setdefault("validation", {})["renders"] = [render]
        cfg = config_from_dict(data, source=f"{args.config} + validate flags",
                               base_dir=Path(args.config).parent.resolve())
    report = preflight(cfg, scan=False, training=False)  # the adapters' keys against this model, as `check` reads them
    for line in report.warnings:
        if line.startswith("validation."):
            print(f"warning: {line}", file=sys.stderr)
    problems = [e for e in report.errors if e.startswith("validation.")]  # what this command needs of the config
    if problems:
        raise UserError("\n".join(problems))
    for path in validate_lora(cfg, Path(args.lora), Path(args.out) if args.out else None):
        print(f"{'contact sheet' if path.suffix == '.png' else 'validation video'}: {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from trainer.outputs.export import convert_lora

    src = Path(args.lora)
    out = Path(args.out) if args.out else src.parent / f"export-{args.format}"
    print(convert_lora(src, args.format, out))
    return 0


def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments every config-taking command shares: the TOML file and `--set a.b=v` overrides."""
    p.add_argument("config", help="TOML config file")
    p.add_argument("--set", action="append", default=[], metavar="A.B=V", help="override a field (repeatable)")
    return p


def add_engine_commands(sub: argparse._SubParsersAction) -> None:
    """Add the engine's subcommands to a parser (this module's own, and `wanforge`'s in launcher/cli.py)."""
    p = sub.add_parser("demo", help="a tiny pre-trained Wan learns a new background from generated clips (LoRA on CPU, before/after)")
    p.add_argument("--out", default="wanforge-demo", help="folder for the clips, config and run (default: ./wanforge-demo)")
    p.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
    p.set_defaults(func=cmd_demo)

    p = with_config(sub.add_parser("train", help="train a LoRA"))
    p.add_argument("--resume", metavar="latest|PATH", help="continue from the newest checkpoint or a checkpoint folder")
    p.set_defaults(func=cmd_train)

    p = with_config(sub.add_parser("check", help="preflight: every problem train would meet, before any GPU time"))
    p.add_argument("--resume", metavar="latest|PATH", help="check as `train --resume` would run")
    p.set_defaults(func=cmd_check)
    with_config(sub.add_parser("cache", help="build the latent and text caches only")).set_defaults(func=cmd_cache)

    p = with_config(sub.add_parser("validate", help="render validation videos with a LoRA"))
    p.add_argument("--lora", required=True, help="a LoRA file (either format)")
    p.add_argument("--out", help="folder for the videos (default: <output_dir>/validation/manual)")
    p.add_argument("--adapter", action="append", metavar="PATH[,strength=S][,expert=E]",
                   help="an extra LoRA stacked on --lora (a speed LoRA; a file or hf://owner/repo/file.safetensors; "
                        "expert high|low|both on Wan 2.2 A14B); repeatable")
    p.add_argument("--steps", type=int, help="sampling steps of this render (e.g. 4 with a speed LoRA)")
    p.add_argument("--guidance-scale", type=float, help="CFG of this render (1: off, as speed LoRAs want)")
    p.add_argument("--guidance-scale-low", type=float, help="Wan 2.2 A14B: CFG of the low-noise expert")
    p.add_argument("--flow-shift", type=float, help="scheduler flow shift of this render")
    p.add_argument("--scheduler", choices=["unipc", "flow_match_euler"], help="sampler of this render")
    p.add_argument("--lora-strength", type=float, help="strength of --lora (default 1)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("export", help="convert a saved LoRA to the other format")
    p.add_argument("lora", help="LoRA .safetensors file")
    p.add_argument("--format", choices=["comfyui", "diffusers"], required=True)
    p.add_argument("--out", help="output folder (default: beside the input)")
    p.set_defaults(func=cmd_export)


def installed_version() -> str:
    """The version of the installed distribution (pyproject.toml's, through the package metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("wanforge")
    except PackageNotFoundError:
        return "(not installed: pip install -e .)"


def new_parser(prog: str, description: str) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """A parser with `--version` and required subcommands, the engine's already added."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"wanforge {installed_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_engine_commands(sub)
    return parser, sub


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run one subcommand: a user's mistake is one `error:` line and exit 2; a stop exits 128 + the signal."""
    from trainer import known_warnings

    known_warnings.install()
    try:
        code = func(args)
    except UserError as err:  # one `error:` line per problem
        print("\n".join(f"error: {line}" for line in str(err).splitlines() if line.strip()) or "error", file=sys.stderr)
        code = 2
    except KeyboardInterrupt as err:  # trainer.errors.RunStopped carries 128 + the signal (143 SIGTERM, 130 Ctrl-C)
        print(f"stopped: {err}" if str(err) else "stopped", file=sys.stderr)
        code = getattr(err, "exit_code", 130)
    except BaseException as err:
        if not (isinstance(err, Exception) and is_disk_full(err)):  # a bug: the traceback is what helps
            _exit_if_distributed(1, traceback=True)
            raise
        where = f" writing {err.filename}" if isinstance(err, OSError) and err.filename else ""
        print(f"error: disk full: no space left on the device{where}: free space, then run the command again",
              file=sys.stderr)
        code = 2
    _exit_if_distributed(code)
    return code


def _exit_if_distributed(code: int, traceback: bool = False) -> None:
    """A rank of a multi-process run ends here, without tearing its process group down (trainer/distributed.py)."""
    if "trainer.distributed" in sys.modules:
        from trainer.distributed import exit_if_kept

        if traceback:
            import traceback as tb

            tb.print_exc()
        exit_if_kept(code)


def main(argv: list[str] | None = None) -> int:
    parser, _ = new_parser("python -m trainer.cli", "The wanforge training engine.")
    args = parser.parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
