"""Does diffusers' context parallelism give the right gradients for training? A tiny Wan transformer, one step of
loss backward with `enable_parallelism(ContextParallelConfig(...))` on every rank, against the same model unsplit.
Each CP rank holds the parameter gradients of its own sequence shard, so they are summed over ranks (what DDP/FSDP
over the CP group would do) before comparing. Checked on CPU (gloo, diffusers 0.42.1): ulysses with the native
backend matches to ~1e-6 relative; ring needs a backend that returns the log-sum-exp (cuDNN, flash), so GPU only.

    torchrun --standalone --nproc_per_node=2 bench/context_parallel_check.py ulysses native          # CPU or GPU
    torchrun --standalone --nproc_per_node=2 bench/context_parallel_check.py ring _native_cudnn      # GPU
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig, WanTransformer3DModel


def main(mode: str, backend: str) -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    else:
        torch.accelerator.device_count = lambda: 1  # diffusers 0.42 takes rank % device_count: 0 on CPU
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
    degree = {"ring_degree": world} if mode == "ring" else {"ulysses_degree": world}
    model.enable_parallelism(config=ContextParallelConfig(**degree))
    model.set_attention_backend(backend)
    model(x, t, text, return_dict=False)[0].float().square().mean().backward()
    worst = 0.0
    for a, b in zip(model.parameters(), ref.parameters()):
        dist.all_reduce(a.grad)
        worst = max(worst, ((a.grad - b.grad).abs().max() / b.grad.abs().max().clamp_min(1e-12)).item())
    print(f"rank {rank}: {mode} x{world} {backend}: largest relative gradient difference {worst:.2e}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
