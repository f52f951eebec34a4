"""The `wanforge` command. Each subcommand imports the trainer only when it runs, so `check` needs no GPU stack."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from trainer.config import WanforgeConfig, load_config, save_config
from trainer.errors import UserError


def installed_version() -> str:
    """The version of the installed distribution (pyproject.toml's, through the package metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("wanforge")
    except PackageNotFoundError:
        return "(not installed: pip install -e .)"


def _load(args: argparse.Namespace) -> WanforgeConfig:
    return load_config(args.config, args.set)


def cmd_demo(args: argparse.Namespace) -> int:
    from trainer.demo import demo_config, make_demo_dataset
    from trainer.train import train

    out = Path(args.out).resolve()
    started = time.perf_counter()
    data = make_demo_dataset(out / "data")
    cfg = demo_config(data, out / "run", max_train_steps=args.steps)
    save_config(cfg, out / "demo.toml")
    result = train(cfg, show_progress=True)
    seconds = time.perf_counter() - started
    print(f"\nwanforge demo finished in {seconds:.0f} s")
    print(f"  clips + captions : {data}")
    print(f"  config           : {out / 'demo.toml'}  (train it again: wanforge train {out / 'demo.toml'} --resume latest)")
    print(f"  LoRA             : {result.lora_file}")
    for video in result.videos:
        print(f"  validation video : {video}")
    print(f"  metrics          : {result.run_dir / 'metrics.jsonl'}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.train import train

    cfg = _load(args)
    result = train(cfg, resume=args.resume)
    print(f"LoRA: {result.lora_file}")
    for video in result.videos:
        print(f"validation video: {video}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from trainer.discovery import check_datasets

    cfg = _load(args)
    report, problems = check_datasets(cfg)
    print("\n".join(["buckets (samples per bucket, skipped files and why):", *report]))
    if problems:
        print("\n".join(f"error: {p}" for p in problems), file=sys.stderr)
        return 2
    print(f"config OK: {cfg.model.flavour}, LoRA rank {cfg.lora.rank}, {cfg.train.max_train_steps} steps -> {cfg.train.output_dir}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from trainer.cache import build_caches

    cfg = _load(args)
    state = PartialState()  # under `accelerate launch` every process builds its own share of the entries
    report = build_caches(cfg, state.device, rank=state.process_index, world_size=state.num_processes,
                          barrier=state.wait_for_everyone, show_progress=state.is_main_process)
    if not state.is_main_process:
        return 0
    ready = sum(len(s) for s in report.samples)
    for path, why in report.skipped:
        print(f"  skipped {path}: {why}")
    for path in report.quarantined:
        print(f"  moved to quarantine: {path}")
    print(f"{ready} samples cached ({report.built_latents} latents and {report.built_texts} text embeddings built now, "
          f"{len(report.skipped)} files skipped)")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from trainer.validate import validate_lora

    cfg = _load(args)
    for path in validate_lora(cfg, Path(args.lora), Path(args.out) if args.out else None):
        print(f"{'contact sheet' if path.suffix == '.png' else 'validation video'}: {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from trainer.export import convert_lora

    src = Path(args.lora)
    out = Path(args.out) if args.out else src.parent / f"export-{args.format}"
    print(convert_lora(src, args.format, out))
    return 0


def cmd_import_simpletuner(args: argparse.Namespace) -> int:
    from launcher.simpletuner import import_simpletuner

    conv = import_simpletuner(args.config_json, args.out, args.backend, args.root)
    for line in conv.fixes:
        print(f"fixed: {line}", file=sys.stderr)
    for line in conv.notes:
        print(f"note: {line}", file=sys.stderr)
    if conv.warning():
        print(conv.warning(), file=sys.stderr)
    print(f"wrote {args.out}: check it with `wanforge check {args.out}`")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wanforge", description="Train Wan 2.1 / 2.2 video LoRAs anywhere.")
    parser.add_argument("--version", action="version", version=f"wanforge {installed_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("config", help="TOML config file")
        p.add_argument("--set", action="append", default=[], metavar="A.B=V", help="override a field (repeatable)")
        return p

    p = sub.add_parser("demo", help="tiny random Wan + generated clips: train a LoRA on CPU and render a video")
    p.add_argument("--out", default="wanforge-demo", help="folder for the clips, config and run (default: ./wanforge-demo)")
    p.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
    p.set_defaults(func=cmd_demo)

    p = with_config(sub.add_parser("train", help="train a LoRA"))
    p.add_argument("--resume", metavar="latest|PATH", help="continue from the newest checkpoint or a checkpoint folder")
    p.set_defaults(func=cmd_train)

    with_config(sub.add_parser("check", help="preflight: config and dataset scan")).set_defaults(func=cmd_check)
    with_config(sub.add_parser("cache", help="build the latent and text caches only")).set_defaults(func=cmd_cache)

    p = with_config(sub.add_parser("validate", help="render validation videos with a LoRA"))
    p.add_argument("--lora", required=True, help="a LoRA file (either format)")
    p.add_argument("--out", help="folder for the videos (default: <output_dir>/validation/manual)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("export", help="convert a saved LoRA to the other format")
    p.add_argument("lora", help="LoRA .safetensors file")
    p.add_argument("--format", choices=["comfyui", "diffusers"], required=True)
    p.add_argument("--out", help="output folder (default: beside the input)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-simpletuner", help="convert a SimpleTuner config.json (+ multidatabackend.json) to TOML")
    p.add_argument("config_json", help="SimpleTuner config.json")
    p.add_argument("--backend", help="multidatabackend.json (default: the config's data_backend_config)")
    p.add_argument("-o", "--out", required=True, help="TOML file to write")
    p.add_argument("--root", help="folder SimpleTuner ran from; its relative paths start there (default: current folder)")
    p.set_defaults(func=cmd_import_simpletuner)

    from launcher.launch import add_commands  # estimate, launch, status, logs, sync, down (no SkyPilot import)

    add_commands(sub, with_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    from trainer import known_warnings

    known_warnings.install()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"stopped: {err}" if str(err) else "stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
