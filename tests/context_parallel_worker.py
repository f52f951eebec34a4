"""Run by tests/test_context_parallel.py under torchrun (gloo, one process per context-parallel rank): for each case, one
training micro-step of the tiny Wan with LoRA, unsplit in this process and context-parallel over all processes, on the
same batch and noise; writes what the test compares to OUT (rank 0).

Both models are built by the trainer's own assembly (trainer.model.trainable.make_trainable, which applies
`memory.context_parallel`), the step is trainer.loop.training_step, the noise stream and the backward scale are the
loop's (trainer.model.context_parallel.data_parallel / backward_scale), and the context-parallel model is wrapped in
DDP as accelerate wraps it, so its gradients are DDP's average over the processes.

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m tests.context_parallel_worker OUT.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.config.files import config_from_dict
from trainer.distributed import noise_generator
from trainer.flavours import get_flavour
from trainer.loop.training_step import training_step
from trainer.model.components import base_model_path, load_transformer
from trainer.model.context_parallel import backward_scale, data_parallel, is_context_parallel
from trainer.model.trainable import make_trainable

# (flavour, [memory] fields, batch): the block paths context parallel must go through (plain blocks, selective
# checkpointing with checkpointed sub-layers and chunked feed-forward, full recompute, streamed block weights), the I2V
# inputs (condition channels, CLIP image tokens in the cross-attention), TI2V's per-token timesteps, and batches of 2
CASES = [
    ("tiny", {"gradient_checkpointing": "none"}, 1),
    ("tiny", {"gradient_checkpointing": "selective", "checkpoint_sublayers": True, "feed_forward_chunk_size": 16}, 2),
    ("tiny-i2v-2.1", {"gradient_checkpointing": "selective"}, 1),
    ("tiny-ti2v", {"gradient_checkpointing": "full"}, 2),
    # weight streaming (trainer/model/streaming.py) under context parallel and DDP: both blocks from host RAM
    ("tiny", {"gradient_checkpointing": "full", "streamed_blocks": 2, "activation_offload": True}, 1),
]
LATENT = (3, 8, 8)  # latent frames, height, width: 3 x 4 x 4 = 48 tokens after the 2x2 patches


def _config(flavour: str, memory: dict, degree: int, batch: int):
    return config_from_dict({"model": {"flavour": flavour}, "lora": {"rank": 4},
                             "memory": {"preset": "none", "context_parallel": degree, **memory},
                             "train": {"train_batch_size": batch}, "datasets": [{"path": "/unused"}]})


def _model(cfg, seed: int):
    torch.manual_seed(seed)  # the same LoRA initialisation on every rank and for both models
    transformer = load_transformer(cfg.model, torch.float32)
    make_trainable(transformer, cfg.lora, cfg.memory, torch.device("cpu"))
    with torch.no_grad():  # lora_B starts at zero, which would leave every lora_A gradient zero: give it values
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + p.numel())) * 0.1)
    return transformer.train()


def _batch(flavour, batch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    out = {"latents": torch.randn(batch, flavour.latent_channels, *LATENT, generator=g),
           "text": torch.randn(batch, 8, 32, generator=g)}
    if flavour.task == "i2v":
        out["condition"] = torch.randn(batch, flavour.in_channels - flavour.latent_channels, *LATENT, generator=g)
    if flavour.image_encoder:
        out["image_embeds"] = torch.randn(batch, 5, 32, generator=g)
    return out


def run_case(index: int, flavour_name: str, memory: dict, batch_size: int) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    plain_cfg = _config(flavour_name, memory, 1, batch_size)
    cfg = _config(flavour_name, memory, world, batch_size)
    flavour = get_flavour(cfg.model.flavour)
    if rank == 0:
        base_model_path(cfg.model)  # builds the tiny model once
    dist.barrier()
    reference, split = _model(plain_cfg, 100 + index), _model(cfg, 100 + index)
    assert not is_context_parallel(reference) and is_context_parallel(split)
    ddp = torch.nn.parallel.DistributedDataParallel(split)  # what accelerate.prepare wraps it in
    batch = _batch(flavour, batch_size)
    dp_rank, dp_size = data_parallel(rank, world, cfg.memory.context_parallel)
    device, dtype = torch.device("cpu"), torch.float32

    loss = training_step(reference, batch, plain_cfg, noise_generator(0, 0, device), device, dtype, None, 0, flavour)
    loss.backward()
    split_loss = training_step(ddp, batch, cfg, noise_generator(0, dp_rank, device), device, dtype, None, 0,
                               flavour)
    (split_loss * backward_scale(cfg.memory.context_parallel)).backward()

    grads = {}
    for (name, a), (_, b) in zip(split.named_parameters(), reference.named_parameters()):
        if b.requires_grad:
            grads[name] = {"max_ref": b.grad.abs().max().item(),
                           "max_diff": (a.grad - b.grad).abs().max().item()}
    return {"flavour": flavour_name, "memory": memory, "batch": batch_size, "world": world, "dp_size": dp_size,
            "loss": loss.item(), "split_loss": split_loss.item(), "grads": grads}


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    results = [run_case(i, *case) for i, case in enumerate(CASES)]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        out.write_text(json.dumps({"ranks": gathered}, indent=1))
    dist.barrier()
    # end without tearing gloo down: its destructor can deadlock on the GIL at the end of a rank (trainer/distributed.py)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
