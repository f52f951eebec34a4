"""Sharded 14B LoRA training on two GPUs under a per-process memory cap, 14B DDP on 1 vs 2 GPUs (issues 22, 34), and
Wan 2.2 A14B at 720p with context parallel on 1 vs 2 GPUs (issue 34).

Random weights at the Wan 2.1 T2V 14B shape (bench/gpu_smoke.py builds the folder in bf16 straight on the GPU), the
smoke clips at 832x480x81, batch 1 per process, LoRA rank 16, everything through `python -m trainer.cli train` under
torchrun. Each process caps its CUDA allocator at --cap-gib (torch.cuda.set_per_process_memory_fraction, set by this
script's `cli` wrapper before trainer.cli runs), so the run shows what a card of that size would hold.

    python3 bench/shard_bench.py --work /tmp/shard-bench --out $OUT           # sharded: 2 processes x 24 GiB
    python3 bench/shard_bench.py --work /tmp/shard-bench --out $OUT --ddp     # DDP, preset auto: 1 GPU, then 2
    python3 bench/shard_bench.py --work /tmp/shard-bench --out $OUT --context-parallel --preset balanced-lean
                                              # Wan 2.2 A14B 1280x720x81: 1 GPU, then 2 with context_parallel = 2
    python3 bench/shard_bench.py --work /tmp/shard-tiny --out /tmp/o --tiny   # the same code on CPU (gloo)
    python3 bench/shard_bench.py --work /tmp/shard-bench --out $OUT --memory-history --budget 1  # what fills the
                                              # first sharded forward: $OUT/memory-history/rank*-{oom,first-forward}.txt

Sharded mode: `shard` trains --steps steps with memory.shard_base = true and preset --preset (a tiny validation render
at the end, a checkpoint, the LoRA export); if it ran out of memory under the cap, `shard-expandable` tries once more
with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (less fragmentation); then `shard-resume` extends the run that
trained by 2 steps with --resume latest (each only if the time budget allows). Prints one markdown row per run
(median s/step after 2 warm-up steps, rank 0's training-loop peak from metrics.jsonl, every process's peak allocated /
reserved from the training loop on, checkpoint and validation included) and writes summary-MODE.json, rows-MODE.md
(with the launcher/calibration.toml row of the sharded run) and logs-MODE.tar.gz to --out, after every run.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import runpy
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

CAP_ENV = "WANFORGE_BENCH_CAP_GIB"
PEAKS_ENV = "WANFORGE_BENCH_PEAKS"
HISTORY_ENV = "WANFORGE_BENCH_MEMORY_HISTORY"  # a folder: each process records its CUDA allocations up to the first forward
MEMORY_FIELDS = ("shard_base", "gradient_checkpointing", "checkpoint_sublayers", "activation_offload", "compile",
                 "attention_backend", "base_quantization", "context_parallel")
SMALL_VALIDATION = "at_end = true\nnum_inference_steps = 2\nwidth = 320\nheight = 192\nnum_frames = 17"


# ---------------------------------------------------------------- the wrapper torchrun starts: cap, then trainer.cli

_AT_EXIT: list = []
_HOOKED: list[bool] = []


def at_exit(fn) -> None:
    """Run `fn` when this process ends: at interpreter exit, and also when a multi-process rank ends through
    trainer.distributed.exit_if_kept (os._exit, which skips atexit)."""
    if not _HOOKED:
        _HOOKED.append(True)
        import trainer.distributed as distributed

        exit_if_kept = distributed.exit_if_kept

        def run_then_exit(code: int) -> None:
            _run_at_exit()
            exit_if_kept(code)

        distributed.exit_if_kept = run_then_exit  # trainer/cli.py looks it up when a rank ends
        atexit.register(_run_at_exit)
    _AT_EXIT.append(fn)


def _run_at_exit() -> None:
    while _AT_EXIT:
        _AT_EXIT.pop()()


def _write_peak() -> None:
    import torch

    folder = os.environ.get(PEAKS_ENV)
    if not folder or not torch.cuda.is_available():
        return
    device = torch.cuda.current_device()
    peak = {"rank": int(os.environ.get("RANK", "0")),
            "max_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
            "max_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2)}
    Path(folder, f"rank{peak['rank']}.json").write_text(json.dumps(peak))


class FirstForwardHistory:
    """CUDA allocator history of this process from its start (model load, sharding) to the end of its first training
    forward, or to the out-of-memory error inside it: written to FOLDER/rank{R}-{first-forward|oom|exit}.txt (the
    live allocations at the traced peak, grouped by the code line that made them: bench/memory_peak.py) and .pickle.gz
    (torch.cuda.memory._snapshot, gunzip for https://pytorch.org/memory_viz). Recording stops after the first forward,
    so later steps run at full speed; an exit before it (an OOM in backward or while sharding) writes `exit`."""

    def __init__(self, folder: Path):
        import torch

        self.folder, self.rank = folder, int(os.environ.get("RANK", "0"))
        self.recording = True
        folder.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
        at_exit(lambda: self.dump("exit"))

    def dump(self, tag: str) -> None:
        import gzip
        import pickle

        import torch
        from memory_peak import peak_report

        if not self.recording:
            return
        self.recording = False
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        allocated, reserved = (f(torch.cuda.current_device()) / 2**30 for f in (torch.cuda.memory_allocated,
                                                                                 torch.cuda.memory_reserved))
        header = (f"rank {self.rank}, {tag}: allocated now {allocated:.2f} GiB, reserved {reserved:.2f} GiB, peak "
                  f"allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB\n")
        report = peak_report(snapshot, top=40, device=torch.cuda.current_device())
        (self.folder / f"rank{self.rank}-{tag}.txt").write_text(header + report + "\n")
        with gzip.open(self.folder / f"rank{self.rank}-{tag}.pickle.gz", "wb") as out:
            pickle.dump(snapshot, out)
        print(f"memory history: {self.folder / f'rank{self.rank}-{tag}.txt'}", flush=True)

    def wrap(self, training_step):
        """trainer.loop.train's training_step, dumping after (or inside) its first call."""
        import torch

        def traced(*args, **kwargs):
            if not self.recording:
                return training_step(*args, **kwargs)
            try:
                loss = training_step(*args, **kwargs)
            except torch.OutOfMemoryError:
                self.dump("oom")
                raise
            self.dump("first-forward")
            return loss

        return traced


def capped_cli(argv: list[str]) -> None:
    """`trainer.cli ARGV` in this process, with the CUDA allocator capped at $WANFORGE_BENCH_CAP_GIB (and, with
    $WANFORGE_BENCH_MEMORY_HISTORY, the first forward's memory history: FirstForwardHistory)."""
    import torch

    cap = float(os.environ.get(CAP_ENV, "0") or 0)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        if cap:
            total = torch.cuda.get_device_properties(local).total_memory
            torch.cuda.set_per_process_memory_fraction(min(cap * 2**30 / total, 1.0), local)
        if os.environ.get(HISTORY_ENV):
            import trainer.loop.train as loop

            loop.training_step = FirstForwardHistory(Path(os.environ[HISTORY_ENV])).wrap(loop.training_step)
    elif os.environ.get(HISTORY_ENV):
        print("memory history: no CUDA device here, nothing recorded", flush=True)
    at_exit(_write_peak)
    sys.argv = ["trainer.cli", *argv]
    runpy.run_module("trainer.cli", run_name="__main__", alter_sys=True)


# ---------------------------------------------------------------- the driver


def _launch(config: Path, processes: int, cap_gib: float, log: Path, peaks: Path, extra: list[str],
            env_extra: dict[str, str]) -> int:
    peaks.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, CAP_ENV: str(cap_gib), PEAKS_ENV: str(peaks), "PYTHONUNBUFFERED": "1", **env_extra}
    if processes == 1:
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        cmd = [sys.executable, __file__, "cli", "train", str(config), *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               __file__, "cli", "train", str(config), *extra]
    print("$", " ".join(cmd), flush=True)
    with log.open("a") as out:
        return subprocess.run(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode


def _result(name: str, run: Path, processes: int, cap_gib: float, peaks: Path, code: int, seconds: float,
            log: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] \
        if (run / "metrics.jsonl").is_file() else []
    steps = [r for r in rows if "loss" in r]
    timed = [r["s_per_step"] for r in steps[2:]]
    status = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
    tail = log.read_text(errors="replace").splitlines()[-15:] if code else []
    ran = tomllib.loads((run / "config.toml").read_text()).get("memory", {}) if (run / "config.toml").is_file() else {}
    return {"name": name, "processes": processes, "cap_gib": cap_gib, "exit_code": code, "wall_s": round(seconds),
            "status": status.get("status"), "memory": status.get("memory", {}).get("ran"),
            "memory_fields": {k: ran.get(k) for k in MEMORY_FIELDS},
            "s_per_step": round(statistics.median(timed), 3) if timed else None,
            "peak_gib_rank0_training": max((r.get("peak_gib", 0) for r in steps), default=None),
            "peaks": [json.loads(p.read_text()) for p in sorted(peaks.glob("rank*.json"))],
            "losses": {r["step"]: r["loss"] for r in steps}, "lora": status.get("lora"),
            "videos": status.get("videos"), "error_tail": tail}


def _cache(work: Path, config: Path) -> None:
    """The latent and text caches, built by one uncapped process before the capped runs (the VAE's peak is not what
    the cap measures; on a small card `wanforge cache` runs the same way first)."""
    with (work / "cache.log").open("a") as out:
        subprocess.run([sys.executable, "-m", "trainer.cli", "cache", str(config)], cwd=ROOT, stdout=out,
                       stderr=subprocess.STDOUT, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _run(args, name: str, config: Path, run: Path, processes: int, cap_gib: float,
         extra: list[str] = (), env: dict[str, str] | None = None) -> dict:
    """One training run; its result joins args.results and --out is rewritten."""
    work = args.work
    log, peaks = work / f"{name}.log", work / f"peaks-{name}"
    started = time.time()
    code = _launch(config, processes, cap_gib, log, peaks, list(extra), env or {})
    result = _result(name, run, processes, cap_gib, peaks, code, time.time() - started, log)
    result["env"] = env or {}
    print(_row(result), flush=True)
    args.results.append(result)
    save(args)
    return result


def _row(r: dict) -> str:
    peaks = ", ".join(f"rank {p['rank']} {p['max_allocated_gib']}/{p['max_reserved_gib']}" for p in r["peaks"]) or "-"
    fields = r["memory_fields"]
    memory = f"{r['memory']}: " + ", ".join(k for k in MEMORY_FIELDS[:5] if fields.get(k) not in (None, False, "none"))
    if (fields.get("context_parallel") or 1) > 1:
        memory += f", context_parallel = {fields['context_parallel']}"
    return (f"| {r['name']} | {r['processes']} | {r['cap_gib'] or 'none'} | {memory} | {r['s_per_step']} | "
            f"{r['peak_gib_rank0_training']} | {peaks} | {r['status'] or 'exit ' + str(r['exit_code'])} |")


HEADER = ("| run | processes | cap GiB | memory preset ran | s/step (median after 2) | rank-0 training peak GiB | "
          "peak allocated/reserved GiB per process (loop on) | status |\n|---|---|---|---|---|---|---|---|")


def calibration_row(r: dict, preset: str, date: str) -> str:
    """The launcher/calibration.toml `[[measured]]` row of a sharded run, from its own numbers (the lead checks and
    pastes it; `peak_gib` the larger of the ranks' peaks from the training loop on)."""
    from trainer.model.sizing import flavour_shape, predict_memory

    peak = max((p["max_allocated_gib"] for p in r["peaks"]), default=r["peak_gib_rank0_training"])
    shape = flavour_shape("t2v-480p-14b-2.1")
    offload = predict_memory(shape, preset, shape.tokens(81, 480, 832)).offload_gib  # sharding offloads the same
    return "\n".join([
        "[[measured]]", 'trainer = "wanforge"', 'gpu = "H100"', 'flavour = "t2v-480p-14b-2.1"', "num_frames = 81",
        "width = 832", "height = 480", "batch = 1", "lora_rank = 16", f'preset = "{preset}"',
        'gradient_checkpointing = "selective"', f"shards = {r['processes']}", f"s_per_step = {r['s_per_step']}",
        f"peak_gib = {peak}", f"offload_gib = {offload}", f'date = "{date}"',
        f'source = "bench/RESULTS.md: python3 bench/shard_bench.py --preset {preset} --cap-gib {r["cap_gib"]} '
        "(2x H100, "
        "memory.shard_base = true, cuDNN attention, random weights; peak = max over ranks of max_memory_allocated; "
        'offload_gib from the unsharded row of the preset: sharding offloads the same activations)"'])


def _setup(work: Path, tiny: bool) -> None:
    if tiny:
        from trainer.demo.world import make_demo_dataset

        if not (work / "clips").exists():
            make_demo_dataset(work / "clips")
        return
    import gpu_smoke

    if not (work / "model" / "model_index.json").exists():  # in a child: this process never holds GPU memory
        subprocess.run([sys.executable, __file__, "build", str(work / "model")], cwd=ROOT, check=True)
    gpu_smoke.make_clips(work / "clips")


CP_FLAVOUR, CP_SIZE = "t2v-14b-2.2-high", (81, 720, 1280)  # Wan 2.2 A14B (an expert is the 14B shape) at 720p


def _config(work: Path, name: str, steps: int, preset: str, memory: str, validation: str, tiny: bool,
            flavour: str = "t2v-480p-14b-2.1", size: tuple[int, int, int] = (81, 480, 832)) -> Path:
    path, run = work / f"{name}.toml", work / f"run-{name}"
    if tiny:
        import tomli_w

        from trainer.config.files import to_toml_dict
        from trainer.demo.world import demo_config

        raw = to_toml_dict(demo_config(work / "clips", run, steps))
        raw["train"].update(train_batch_size=1, log_every_n_steps=1)
        raw["checkpoint"]["every_n_steps"] = steps
        raw["memory"] = {"preset": preset, **tomllib.loads(memory)}  # the tiny model keeps the demo's size
        raw["validation"] = {"at_end": "at_end = true" in validation, "num_inference_steps": 2, "every_n_steps": 1000}
        path.write_text(tomli_w.dumps(raw))  # [memory] as written: the preset's fields are not set explicitly
        return path
    import gpu_smoke

    gpu_smoke.write_config(path, work, run, steps, preset, steps, validation, flavour=flavour, memory=memory,
                           size=size)
    return path


def sharded(args) -> None:
    work, results = args.work, args.results
    config = _config(work, "shard", args.steps, args.preset, "shard_base = true", SMALL_VALIDATION, args.tiny)
    _cache(work, config)
    print(f"cache built at {time.time() - args.started:.0f} s", flush=True)
    history = {HISTORY_ENV: str(args.out / "memory-history")} if args.memory_history and args.out else {}
    _run(args, "shard", config, work / "run-shard", 2, args.cap_gib, env=history)
    out_of_memory = "out of memory" in (work / "shard.log").read_text(errors="replace").lower()
    if out_of_memory and time.time() - args.started < args.budget - args.resume_s:
        # the allocator's fragmentation under the cap, not the model: try once with expandable segments
        shutil.rmtree(work / "run-shard", ignore_errors=True)
        _run(args, "shard-expandable", config, work / "run-shard", 2, args.cap_gib,
             env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    if results[-1]["exit_code"] == 0 and time.time() - args.started < args.budget - args.resume_s:
        _run(args, "shard-resume", config, work / "run-shard", 2, args.cap_gib,
             ["--resume", "latest", "--set", f"train.max_train_steps={args.steps + 2}",
              "--set", "validation.at_end=false"],
             env={k: v for k, v in (results[-1].get("env") or {}).items() if k != HISTORY_ENV})


def ddp(args) -> None:
    work, results = args.work, args.results
    for name, processes in (("ddp-one", 1), ("ddp-pair", 2)):
        config = _config(work, name, args.steps, "auto", "", "at_end = false", args.tiny)
        _run(args, name, config, work / f"run-{name}", processes, 0)
    one, pair = results
    if one["s_per_step"] and pair["s_per_step"]:
        pair["samples_per_s_vs_one_gpu"] = round(2 * one["s_per_step"] / pair["s_per_step"], 3)
        print(f"2 GPUs: {pair['samples_per_s_vs_one_gpu']}x the samples/s of one", flush=True)
        save(args)


def context_parallel(args) -> None:
    """Wan 2.2 A14B (one expert) at 1280x720x81: one GPU, then two GPUs splitting each sample's tokens
    (memory.context_parallel = 2), the same preset; s/step and every process's peak. Both train one sample per step."""
    work = args.work
    for name, processes in (("cp-one", 1), ("cp-pair", 2)):
        config = _config(work, name, args.steps, args.preset, f"context_parallel = {processes}", "at_end = false",
                         args.tiny, flavour=CP_FLAVOUR, size=CP_SIZE)
        if name == "cp-one":
            _cache(work, config)  # 720p latents once, uncapped; the second run reuses them
        _run(args, name, config, work / f"run-{name}", processes, args.cap_gib if args.cap_gib_set else 0)
    one, pair = args.results[-2:]
    if one["s_per_step"] and pair["s_per_step"]:
        pair["step_time_vs_one_gpu"] = round(pair["s_per_step"] / one["s_per_step"], 3)
        print(f"context parallel x2: {pair['step_time_vs_one_gpu']}x the s/step of one GPU", flush=True)
        save(args)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "cli":
        capped_cli(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "build":
        import gpu_smoke

        gpu_smoke.build_model(Path(sys.argv[2]), gpu_smoke.WAN_14B)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/shard-bench"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--preset", default="low", help="[memory] preset of the sharded run (low: the unsharded 14B rows "
                    "predict ~23 GiB a process, balanced ~25)")
    ap.add_argument("--cap-gib", type=float, default=24.0, help="CUDA memory cap per process (sharded runs)")
    ap.add_argument("--ddp", action="store_true", help="DDP with preset auto on 1 GPU, then 2 (no cap)")
    ap.add_argument("--context-parallel", action="store_true", help="Wan 2.2 A14B at 1280x720x81 with --preset "
                    "(use e.g. balanced-lean): 1 GPU, then 2 GPUs with memory.context_parallel = 2 (no cap unless "
                    "--cap-gib is given)")
    ap.add_argument("--tiny", action="store_true", help="the tiny model on CPU (gloo): checks this script")
    ap.add_argument("--memory-history", action="store_true", help="sharded mode: each process of the first run "
                    "records its CUDA allocations up to its first forward (or the OOM in it) and writes, under "
                    "--out/memory-history/, what is live at the peak by code line (rankR-TAG.txt) and the snapshot "
                    "for pytorch.org/memory_viz (rankR-TAG.pickle.gz)")
    ap.add_argument("--budget", type=float, default=500, help="seconds; the resume run is skipped past it")
    ap.add_argument("--resume-s", type=float, default=120, help="expected seconds of the resume run")
    args = ap.parse_args()
    args.cap_gib_set = "--cap-gib" in sys.argv
    args.started = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    _setup(args.work, args.tiny)
    print(f"setup {time.time() - args.started:.0f} s", flush=True)
    args.results = []
    (ddp if args.ddp else context_parallel if args.context_parallel else sharded)(args)
    print(save(args), flush=True)
    print(f"total {time.time() - args.started:.0f} s", flush=True)
    if any(r["exit_code"] for r in args.results):
        sys.exit(1)


def save(args) -> str:
    """The table so far (and --out's files, rewritten after every run: a command stopped at its limit keeps them)."""
    table = "\n".join([HEADER, *(_row(r) for r in args.results)])
    trained = [r for r in args.results if r["name"] in ("shard", "shard-expandable") and r["exit_code"] == 0]  # sharded
    if trained:
        table += "\n\n```toml\n" + calibration_row(trained[0], args.preset, time.strftime("%Y-%m-%d")) + "\n```"
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        mode = "ddp" if args.ddp else "cp" if args.context_parallel else "shard"
        (args.out / f"summary-{mode}.json").write_text(json.dumps(args.results, indent=1))
        (args.out / f"rows-{mode}.md").write_text(table + "\n")
        with tarfile.open(args.out / f"logs-{mode}.tar.gz", "w:gz") as tar:
            for path in sorted(args.work.glob("*.log")) + sorted(args.work.glob("run-*/metrics.jsonl")) \
                    + sorted(args.work.glob("run-*/run.json")) + sorted(args.work.glob("*.toml")):
                tar.add(path, arcname=str(path.relative_to(args.work)))
    return table


if __name__ == "__main__":
    main()
