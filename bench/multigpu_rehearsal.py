"""Two-GPU host rehearsal of issue 22 (NOT RUN yet: written without device time). Random weights at the 1.3B shape.

Runs the command launcher/node.py builds from SkyPilot's variables three ways, each `preset = "auto"`, batch 1/GPU:
  one    1 GPU  (SKYPILOT_NUM_NODES=1, SKYPILOT_NUM_GPUS_PER_NODE=1, CUDA_VISIBLE_DEVICES=0)
  pair   1 node x 2 GPUs (SKYPILOT_NUM_NODES=1, SKYPILOT_NUM_GPUS_PER_NODE=2)
  nodes  2 "nodes" x 1 GPU on loopback (SKYPILOT_NUM_NODES=2, NODE_RANK 0/1, NODE_IPS 127.0.0.1 twice, one GPU each)
and prints, per run, the preset `auto` chose, the median s/step after 2 warm-up steps and the samples/s against one
GPU; then the largest relative loss difference of `nodes` against `pair` (same ranks and shards: bf16 kernels'
run-to-run noise only). Writes summary.json (and each run's metrics.jsonl) under --out.

    python3 bench/multigpu_rehearsal.py --work /tmp/rehearsal --steps 10 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _config(work: Path, name: str, steps: int, preset: str) -> Path:
    import gpu_smoke

    path = work / f"{name}.toml"
    gpu_smoke.write_config(path, work, work / f"run-{name}", steps, preset, steps, "at_end = false")
    return path


def _node_commands(config: Path, nodes: int, gpus: int, port: int) -> list[tuple[list[str], dict[str, str]]]:
    """(command, environment) of every node, each command built by launcher/node.py from that node's variables."""
    from launcher.node import train_command

    out = []
    for rank in range(nodes):
        env = {**os.environ, "SKYPILOT_NUM_NODES": str(nodes), "SKYPILOT_NUM_GPUS_PER_NODE": str(gpus),
               "SKYPILOT_NODE_RANK": str(rank), "SKYPILOT_NODE_IPS": "\n".join(["127.0.0.1"] * nodes),
               "MASTER_PORT": str(port)}
        if nodes > 1 or gpus == 1:
            env["CUDA_VISIBLE_DEVICES"] = str(rank)  # one GPU per "node"
        with mock.patch.dict(os.environ, env, clear=True):
            out.append((train_command(config), env))
    return out


def _run(work: Path, name: str, steps: int, nodes: int, gpus: int, preset: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = _config(work, name, steps, preset)
    procs = []
    for cmd, env in _node_commands(config, nodes, gpus, port):
        print(f"[{name}] {' '.join(cmd)}", flush=True)
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{name}: exit codes {codes}")
    run = work / f"run-{name}"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if "loss" in r]
    saved = (run / "config.toml").read_text()
    chosen = {key: line.split("=", 1)[1].strip() for line in saved.splitlines()
              for key in ("activation_offload", "checkpoint_sublayers") if line.startswith(key + " ")}
    return {"name": name, "processes": nodes * gpus, "memory": chosen,
            "s_per_step": statistics.median(r["s_per_step"] for r in steps_rows[2:]),
            "peak_gib": max(r.get("peak_gib", 0) for r in steps_rows),
            "losses": {r["step"]: r["loss"] for r in steps_rows}, "metrics": str(run / "metrics.jsonl")}


def main() -> None:
    import gpu_smoke

    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/wanforge-rehearsal"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--preset", default="auto", help="[memory] preset of every run (a fixed one compares losses at "
                    "equal memory settings: `auto` may choose differently per node)")
    ap.add_argument("--runs", default="one,pair,nodes", help="which of one,pair,nodes to run (one is the baseline)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if not (args.work / "model" / "model_index.json").exists():
        gpu_smoke.build_model(args.work / "model")
    gpu_smoke.make_clips(args.work / "clips")
    layout = {"one": (1, 1), "pair": (1, 2), "nodes": (2, 1)}
    runs = [_run(args.work, name, args.steps, *layout[name], args.preset) for name in args.runs.split(",")]
    by_name = {r["name"]: r for r in runs}
    one = by_name["one"]["s_per_step"] if "one" in by_name else None
    for r in runs:
        if one:
            r["samples_per_s_vs_one_gpu"] = round(r["processes"] * one / r["s_per_step"], 3)
        print(f"{r['name']:>5}: {r['processes']} process(es), memory {r['memory']}, {r['s_per_step']:.3f} s/step, "
              f"{r['peak_gib']} GiB, {r.get('samples_per_s_vs_one_gpu', '-')}x the samples/s of one GPU", flush=True)
    worst = None
    if "pair" in by_name and "nodes" in by_name:
        pair, nodes = by_name["pair"]["losses"], by_name["nodes"]["losses"]
        worst = max(abs(nodes[s] - pair[s]) / abs(pair[s]) for s in pair)
        print(f"nodes vs pair: largest relative loss difference {worst:.2e} over {len(pair)} steps", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.json").write_text(json.dumps({"runs": runs, "nodes_vs_pair_rel": worst}, indent=1))
        for r in runs:
            (args.out / f"metrics-{r['name']}.jsonl").write_text(Path(r["metrics"]).read_text())


if __name__ == "__main__":
    main()
