"""What is on the GPU at the peak of one training step: live allocations grouped by the code line that made them.

Runs one `speed_bench` variant through the trainer's path (warm-up steps first, so compile caches are built), records
CUDA allocator history for one more step, replays it to the moment of the highest allocated total, and prints the
live blocks at that moment by size, each with its innermost frames from this repo, diffusers, peft or torch.

    python3 bench/memory_peak.py --model 1.3b --variant int8-selective-compile-offload
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _where(frames: list[dict]) -> str:
    keep = [f for f in frames if any(k in f["filename"] for k in ("wanforge", "/trainer/", "diffusers", "peft",
                                                                  "optimum", "torch/_inductor", "torch/utils/checkpoint",
                                                                  "torch/autograd", "/bench/"))]
    picked = (keep or frames)[:3]
    return " <- ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in picked)


def peak_report(snapshot: dict, top: int = 25, device: int = 0) -> str:
    """The live allocations at the highest total the trace of `device` reached, by the code line that made them
    (bench/shard_bench.py --memory-history uses it too)."""
    live: dict[int, tuple[int, str]] = {}
    total, peak, at_peak = 0, 0, {}
    for event in snapshot["device_traces"][device]:
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], _where(event.get("frames", [])))
            total += event["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif event["action"] in ("free_requested", "free_completed") and event["addr"] in live:
            if event["action"] == "free_requested":
                total -= live.pop(event["addr"])[0]
    by_site: dict[str, list[int]] = collections.defaultdict(list)
    for size, where in at_peak.values():
        by_site[where].append(size)
    lines = [f"traced peak (allocations made during the recorded step only): {peak / 2**30:.2f} GiB"]
    for where, sizes in sorted(by_site.items(), key=lambda kv: -sum(kv[1]))[:top]:
        lines.append(f"{sum(sizes) / 2**30:7.3f} GiB  x{len(sizes):<3d} {where}")
    return "\n".join(lines)


def main() -> None:
    from bench import speed_bench

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=list(speed_bench.SHAPES), default="1.3b")
    parser.add_argument("--variant", default="int8-selective-compile-offload")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    holder: dict = {}
    original = speed_bench.timed_steps

    def traced(step, warmup, steps):
        times = original(step, warmup, 0)  # compile and settle
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
        step()
        torch.cuda.synchronize()
        holder["snapshot"] = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        holder["base"], holder["peak"] = base, torch.cuda.max_memory_allocated()
        return times or [0.0]

    speed_bench.timed_steps = traced
    speed_bench.run_trainer_variant(args.model, speed_bench.VARIANTS[args.variant], warmup=2, steps=0)
    report = (f"{args.variant} ({args.model}): allocated before the step {holder['base'] / 2**30:.2f} GiB, "
              f"peak during it {holder['peak'] / 2**30:.2f} GiB\n" + peak_report(holder["snapshot"]))
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
