"""Two-GPU host rehearsal of the multi-node path (issues 22, 34). Random weights at the 1.3B shape.

Runs the command launcher/node.py builds from SkyPilot's variables, in the environment it gives it (across nodes,
NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME pinned to the interface toward the head node: here the loopback one), every run
at ONE fixed `[memory] preset` (default "fast": `auto` decides per node from its own process count, so one node of
two processes and two nodes of one would train different settings), batch 1/GPU:
  one    1 GPU  (SKYPILOT_NUM_NODES=1, SKYPILOT_NUM_GPUS_PER_NODE=1, CUDA_VISIBLE_DEVICES=0)
  pair   1 node x 2 GPUs (SKYPILOT_NUM_NODES=1, SKYPILOT_NUM_GPUS_PER_NODE=2)
  nodes  2 "nodes" x 1 GPU on loopback (SKYPILOT_NUM_NODES=2, NODE_RANK 0/1, NODE_IPS 127.0.0.1 twice, one GPU each)
  pair2  `pair` once more: the run-to-run noise of the GPU kernels, to judge `nodes` against
and prints, per run, the memory settings it trained with, the median s/step after 2 warm-up steps and the samples/s
against one GPU; then `nodes` against `pair`:
- both must have trained the same [memory] settings (else the losses are not comparable: said, not judged);
- step 1 (identical weights and inputs, before any update): relative loss difference <= CPU_REL, the tolerance the
  CPU test derives for this comparison (tests/test_multiprocess.py: same ranks, data shards and all-reduce, so the
  losses agree to float32 rounding; measured bitwise equal there);
- every step: <= max(CPU_REL, 2 x the pair2-vs-pair difference) where pair2 ran (bf16 GPU backward kernels are not
  bitwise deterministic, so later steps may differ by that noise whatever the layout), else <= CPU_REL.
Writes summary.json (and each run's metrics.jsonl) under --out.

    python3 bench/multigpu_rehearsal.py --work /tmp/rehearsal --steps 10 --runs pair,nodes,pair2 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tomllib
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


CPU_REL = 1e-6  # tests/test_multiprocess.py: loopback nodes vs one two-process node, fp32 (measured bitwise equal)
LAYOUT = {"one": (1, 1), "pair": (1, 2), "nodes": (2, 1), "pair2": (1, 2)}


def _node_commands(config: Path, nodes: int, gpus: int, port: int) -> list[tuple[list[str], dict[str, str]]]:
    """(command, environment) of every node, both built by launcher/node.py (train_command, train_env) from that
    node's variables."""
    from launcher.node import train_command, train_env

    out = []
    for rank in range(nodes):
        env = {**os.environ, "SKYPILOT_NUM_NODES": str(nodes), "SKYPILOT_NUM_GPUS_PER_NODE": str(gpus),
               "SKYPILOT_NODE_RANK": str(rank), "SKYPILOT_NODE_IPS": "\n".join(["127.0.0.1"] * nodes),
               "MASTER_PORT": str(port)}
        if nodes > 1 or gpus == 1:
            env["CUDA_VISIBLE_DEVICES"] = str(rank)  # one GPU per "node"
        with mock.patch.dict(os.environ, env, clear=True):
            out.append((train_command(config), train_env()))
    return out


def _run(work: Path, name: str, steps: int, nodes: int, gpus: int, preset: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = _config(work, name, steps, preset)
    procs = []
    for cmd, env in _node_commands(config, nodes, gpus, port):
        pinned = " ".join(f"{k}={env[k]}" for k in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME") if env.get(k))
        print(f"[{name}] {pinned} {' '.join(cmd)}", flush=True)
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{name}: exit codes {codes}")
    run = work / f"run-{name}"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if "loss" in r]
    chosen = tomllib.loads((run / "config.toml").read_text()).get("memory", {})  # what trained (run.json: why)
    return {"name": name, "processes": nodes * gpus, "memory": chosen,
            "s_per_step": statistics.median(r["s_per_step"] for r in steps_rows[2:]),
            "peak_gib": max(r.get("peak_gib", 0) for r in steps_rows),
            "losses": {r["step"]: r["loss"] for r in steps_rows}, "metrics": str(run / "metrics.jsonl")}


def compare(by_name: dict[str, dict]) -> dict | None:
    """`nodes` against `pair` as the module docstring says; None when either did not run."""
    if "pair" not in by_name or "nodes" not in by_name:
        return None
    pair, nodes = by_name["pair"], by_name["nodes"]

    def worst(a: dict, b: dict) -> float:
        return max(abs(a["losses"][s] - b["losses"][s]) / abs(b["losses"][s]) for s in b["losses"])

    out = {"cpu_rel": CPU_REL, "same_settings": pair["memory"] == nodes["memory"]}
    if not out["same_settings"]:
        out["verdict"] = "not comparable: the runs trained different [memory] settings (use one fixed --preset)"
        return out
    first = min(pair["losses"])
    out["step1_rel"] = abs(nodes["losses"][first] - pair["losses"][first]) / abs(pair["losses"][first])
    out["worst_rel"] = worst(nodes, pair)
    out["noise_rel"] = worst(by_name["pair2"], pair) if "pair2" in by_name else None
    bound = max(CPU_REL, 2 * out["noise_rel"]) if out["noise_rel"] is not None else CPU_REL
    out["bound_rel"] = bound
    out["equal"] = out["step1_rel"] <= CPU_REL and out["worst_rel"] <= bound
    out["verdict"] = ("equal" if out["equal"] else "NOT equal") + (
        f": step 1 {out['step1_rel']:.2e} (<= {CPU_REL:g}), worst step {out['worst_rel']:.2e} (<= {bound:.2e}"
        + (f", pair2 vs pair {out['noise_rel']:.2e}" if out["noise_rel"] is not None else ", no pair2 run") + ")")
    return out


def main() -> None:
    import gpu_smoke

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/wanforge-rehearsal"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--preset", default="fast", help="[memory] preset of every run, one fixed preset so the losses "
                    "compare at equal settings (\"auto\" decides per node from its own process count)")
    ap.add_argument("--runs", default="one,pair,nodes", help="which of one,pair,nodes,pair2 to run (one: the "
                    "samples/s baseline; pair2: the run-to-run noise the nodes-vs-pair losses are judged against)")
    args = ap.parse_args()
    names = args.runs.split(",")
    unknown = [n for n in names if n not in LAYOUT]
    if unknown:
        ap.error(f"--runs: unknown {unknown}: choose from {list(LAYOUT)}")
    args.work.mkdir(parents=True, exist_ok=True)
    if not (args.work / "model" / "model_index.json").exists():
        gpu_smoke.build_model(args.work / "model")
    gpu_smoke.make_clips(args.work / "clips")
    runs = [_run(args.work, name, args.steps, *LAYOUT[name], args.preset) for name in names]
    by_name = {r["name"]: r for r in runs}
    one = by_name["one"]["s_per_step"] if "one" in by_name else None
    for r in runs:
        if one:
            r["samples_per_s_vs_one_gpu"] = round(r["processes"] * one / r["s_per_step"], 3)
        print(f"{r['name']:>5}: {r['processes']} process(es), memory {r['memory']}, {r['s_per_step']:.3f} s/step, "
              f"{r['peak_gib']} GiB, {r.get('samples_per_s_vs_one_gpu', '-')}x the samples/s of one GPU", flush=True)
    comparison = compare(by_name)
    if comparison is not None:
        print(f"nodes vs pair at preset {args.preset}: {comparison['verdict']}", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.json").write_text(json.dumps({"preset": args.preset, "runs": runs,
                                                           "nodes_vs_pair": comparison}, indent=1))
        for r in runs:
            (args.out / f"metrics-{r['name']}.jsonl").write_text(Path(r["metrics"]).read_text())


if __name__ == "__main__":
    main()
