"""Does diffusers' context parallelism give the right gradients for training, with a given attention backend? A tiny
Wan transformer, one step of loss backward split over every rank, against the same model unsplit. Each CP rank holds
the parameter gradients of its own sequence shard, so they are summed over ranks (what the trainer's backward scale
under DDP does) before comparing. `ulysses` goes through the trainer's own path (trainer/model/context_parallel.py,
`[memory] context_parallel`); `ring` through diffusers directly (the trainer does not use it). Checked on CPU (gloo,
diffusers 0.42.1): ulysses with the native backend matches to ~1e-6 relative (tests/test_context_parallel.py holds
it); ring needs a backend that returns the log-sum-exp (cuDNN, flash), so GPU only. On a GPU, the first thing to run
before trusting `context_parallel` there: `auto` under context parallel is `_native_cudnn`.

    torchrun --standalone --nproc_per_node=2 bench/context_parallel_check.py ulysses native          # CPU or GPU
    torchrun --standalone --nproc_per_node=2 bench/context_parallel_check.py ulysses _native_cudnn   # GPU
    torchrun --standalone --nproc_per_node=2 bench/context_parallel_check.py ring _native_cudnn      # GPU
"""

from __future__ import annotations

import sys

import os

import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig, WanTransformer3DModel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from trainer.model.context_parallel import parallel_config_on_cpu, enable_context_parallel  # noqa: E402


def main(mode: str, backend: str) -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    shape = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64 if cuda else 16, in_channels=4,
                 out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64)
    ref = WanTransformer3DModel(**shape).to(device, dtype)
    model = WanTransformer3DModel(**shape).to(device, dtype)
    model.load_state_dict(ref.state_dict())
    x = torch.randn(1, 4, 3, 8, 8, device=device, dtype=dtype)
    text = torch.randn(1, 8, 32, device=device, dtype=dtype)
    t = torch.tensor([500], device=device)
    ref.set_attention_backend(backend)
    ref(x, t, text, return_dict=False)[0].float().square().mean().backward()
    model.set_attention_backend(backend)  # before the split, as the trainer does (enable_parallelism checks it)
    if mode == "ring":
        with parallel_config_on_cpu():
            model.enable_parallelism(config=ContextParallelConfig(ring_degree=world))
    else:
        enable_context_parallel(model, world, device)
    model(x, t, text, return_dict=False)[0].float().square().mean().backward()
    worst = 0.0
    for a, b in zip(model.parameters(), ref.parameters()):
        dist.all_reduce(a.grad)
        worst = max(worst, ((a.grad - b.grad).abs().max() / b.grad.abs().max().clamp_min(1e-12)).item())
    print(f"rank {rank}: {mode} x{world} {backend}: largest relative gradient difference {worst:.2e}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
