"""`train_both_experts`: what switching between the Wan 2.2 A14B experts costs against the average training step.

Two experts at the real A14B shape (random weights, bf16, LoRA r16) are assembled as the trainer does
(trainer.model.experts.ExpertPair: the trained expert on the GPU, the idle one in host RAM), and trained through
trainer.loop.training_step with `expert_switch_every_n_steps` = --every, so steps alternate high / low blocks. Per step the
wall time with a GPU sync around it; per switch the time of `select_expert` alone (the swap as the trainer runs it:
the idle expert's frozen weights from the page-locked slot to the GPU, the other's back, both directions at once).
For comparison, the swap as the code did it before (`Module.to` through pageable memory, one direction after the
other) is timed at the end on the same experts.

The share printed is swap / (default interval x median step + swap): the step-time fraction a run with the default
`expert_switch_every_n_steps` (50) spends switching. 480p is the conservative shape (the shortest step).

    python3 bench/experts_bench.py --shape 832x480x81 --preset fast --out $OUT/experts.md
    python3 bench/experts_bench.py --tiny          # CPU check of the logic at tiny shapes
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the boundary lookup must not wait on a network the GPU node lacks

import speed_bench  # noqa: E402  (bench/ is on the path when run as a script)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


def build_pair(flavour: str, cfg, device: torch.device):
    """Both experts as setup_expert_pair assembles them (built here with random weights instead of loaded)."""
    from trainer.model.experts import assemble_pair, frozen_tensors
    from trainer.model.trainable import make_trainable

    experts, offloaders = {}, {}
    for stage in ("high", "low"):
        transformer = speed_bench.build_transformer("14b", flavour)  # on the GPU: fast random init
        if stage == "low":  # the same seed built it: make it differ, so a mixed-up swap would show in the fingerprint
            with torch.no_grad():
                for t in frozen_tensors(transformer)[::FINGERPRINT_EVERY]:
                    t.add_(1.0)
        torch.manual_seed(0)
        offloaders[stage] = make_trainable(transformer, cfg.lora, cfg.memory, device, torch.device("cpu"))
        experts[stage] = transformer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return assemble_pair(experts, offloaders, flavour, device)


FINGERPRINT_EVERY = 25  # every 25th frozen tensor of an expert (about 50 at 14B)


def fingerprint(expert) -> list[float]:
    """Sums of a sample of the expert's frozen tensors, wherever they are (GPU or the host slot)."""
    from trainer.model.experts import frozen_tensors

    with torch.no_grad():
        return [float(t.float().sum()) for t in frozen_tensors(expert)[::FINGERPRINT_EVERY]]


def legacy_swaps(pair, device: torch.device) -> list[float]:
    """The swap before the page-locked slot: `Module.to("cpu")` of the outgoing expert, then `Module.to(device)` of the
    incoming one, from pageable memory. Leaves the pair without its slot (run last)."""
    from trainer.model.experts import frozen_tensors

    idle = pair.expert("low" if pair.active == "high" else "high")
    for t in frozen_tensors(idle):  # as the old code kept it: pageable memory
        t.data = t.data.clone()
    pair._slot = None
    times = []
    for _ in range(2):
        outgoing, incoming = pair.expert(pair.active), idle

        def swap():
            outgoing.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            incoming.to(device)

        times.append(timed(swap, device))
        pair.active = "low" if pair.active == "high" else "high"
        idle = outgoing
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavour", default="t2v-14b-2.2-high")
    parser.add_argument("--shape", default="832x480x81", help="clip width x height x frames")
    parser.add_argument("--preset", default="fast", help="memory preset of both experts")
    parser.add_argument("--every", type=int, default=2, help="expert_switch_every_n_steps in this bench")
    parser.add_argument("--blocks", type=int, default=4, help="blocks of --every steps (alternating experts)")
    parser.add_argument("--default-every", type=int, default=None, help="interval for the share (default: schema's)")
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny shapes: checks the logic only")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from accelerate import Accelerator

    from trainer.config.files import config_from_dict
    from trainer.config.model import ModelConfig
    from trainer.loop.optim import make_optimizer
    from trainer.loop.training_step import training_step
    from trainer.model.experts import select_expert
    from trainer.model.lora import trainable_parameters

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    memory = {"preset": args.preset}
    if args.tiny:
        speed_bench.SHAPES["14b"] = speed_bench.TINY
        args.shape, memory = "64x64x9", {"preset": "none", "gradient_checkpointing": "full"}
    speed_bench.DEVICE = device
    speed_bench.SHAPE = tuple(int(v) for v in args.shape.lower().split("x"))
    default_every = args.default_every or ModelConfig.model_fields["expert_switch_every_n_steps"].default
    cfg = config_from_dict({"model": {"flavour": args.flavour, "train_both_experts": True,
                                      "expert_switch_every_n_steps": args.every},
                            "memory": memory, "datasets": [{"path": "/tmp"}], "lora": {"rank": 16}}, source="bench")
    started = time.perf_counter()
    pair = build_pair(args.flavour, cfg, device)
    setup = time.perf_counter() - started
    pair.train()
    optimizer = make_optimizer(trainable_parameters(pair), cfg.optim, device)
    pair.attach_optimizer(optimizer)
    accelerator = Accelerator(mixed_precision="bf16" if device.type == "cuda" else "no", cpu=device.type != "cuda")
    model, optimizer = accelerator.prepare(pair, optimizer, device_placement=[False, True])
    generator = torch.Generator(device=device).manual_seed(0)
    batch = speed_bench.make_batch(args.flavour)
    from trainer.model.experts import active_stage

    before = {stage: fingerprint(pair.expert(stage)) for stage in ("high", "low")}
    steps, swaps, warm = [], [], set()
    for step in range(args.every * args.blocks):
        stage = active_stage(cfg, step)
        if stage != pair.active:
            swaps.append(timed(lambda: select_expert(model, stage, device), device))

        def one():
            loss = training_step(model, batch, cfg, generator, device, torch.bfloat16, step=step)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(trainable_parameters(pair.expert(stage)), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds = timed(one, device)
        if stage in warm:  # each expert's first step compiles / warms up
            steps.append(seconds)
        warm.add(stage)
        print(f"  step {step} ({stage}): {seconds:.3f} s", flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    intact = all(fingerprint(pair.expert(stage)) == before[stage] for stage in ("high", "low"))
    legacy = legacy_swaps(pair, device)
    step_s, swap_s, legacy_s = statistics.median(steps), statistics.median(swaps), statistics.median(legacy)

    def share(seconds: float) -> str:
        return f"{100 * seconds / (default_every * step_s + seconds):.2f}%"

    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (--tiny: logic check, not a timing)"
    params = sum(t.numel() for t in pair.high.parameters() if not t.requires_grad) / 1e9
    text = (f"device: {gpu}; torch {torch.__version__}; {args.flavour} + its other expert, {args.shape}, "
            f"{params:.2f} B frozen parameters per expert, preset {memory}, LoRA r16, batch 1; setup (build both, "
            f"idle one to the page-locked slot) {setup:.1f} s; GPU peak {peak:.2f} GiB; host peak (VmHWM) "
            f"{speed_bench.host_status()['VmHWM']:.2f} GiB; each expert's frozen weights after {len(swaps)} slot "
            f"swaps: {'identical to before (sampled sums)' if intact else 'CHANGED: the swap is broken'}\n\n"
            f"| what | seconds | share of a {default_every}-step expert block |\n|---|---|---|\n"
            f"| median training step (both experts, after each one's first step; {len(steps)} steps) | {step_s:.3f} | - |\n"
            f"| expert switch, page-locked slot, both directions at once (median of {len(swaps)}: "
            f"{' '.join(f'{s:.3f}' for s in swaps)}) | {swap_s:.3f} | {share(swap_s)} |\n"
            f"| expert switch as before: `Module.to` via pageable memory (median of {len(legacy)}: "
            f"{' '.join(f'{s:.3f}' for s in legacy)}) | {legacy_s:.3f} | {share(legacy_s)} |\n")
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0 if intact else 1


if __name__ == "__main__":
    sys.exit(main())
