"""The `wanforge` command, the one entry point: the engine's commands (trainer/cli.py) and the launcher's own
(estimate, launch, status, logs, sync, down, import-simpletuner). Each subcommand imports what it needs when it runs."""

from __future__ import annotations

import argparse
import sys

from trainer.cli import new_parser, run_command, with_config


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
    parser, sub = new_parser("wanforge", "Train Wan 2.1 / 2.2 video LoRAs anywhere.")

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
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
