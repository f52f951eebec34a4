"""Speed and memory options for the Wan transformer: attention backend, block checkpointing that keeps attention,
activation offload to CPU, regional compile, chunked feed-forward, int8 / fp8 base weights, and the frozen weights of
some blocks streamed from host RAM (trainer/model/streaming.py).

Everything here acts on a loaded diffusers `WanTransformer3DModel` through diffusers' own hooks
(`set_attention_backend`, `enable_gradient_checkpointing(func)`) and torch's
selective activation checkpointing; `apply_memory_options` is the one entry point the recipe calls.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts, noop_context_fn

from trainer.config.model import MemoryConfig
from trainer.model.attention import resolve_attention_backend, set_attention_backend
from trainer.model.fp8 import check_float8_device, convert_blocks_to_float8
from trainer.model.offload import ActivationOffloader
from trainer.model.sizing import HOST_SHARE, host_memory_gib
from trainer.model.streaming import WeightStreamer, stream_blocks, streamed_block_ids, weight_streamer

log = logging.getLogger(__name__)

FF_CHUNK_ENV = "WAN_FEED_FORWARD_CHUNK_SIZE"


def _is_attention_op(op) -> bool:
    name = str(op)
    return "scaled_dot_product" in name or "flash_attn" in name or "flash_attention" in name


def _keep_self_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Save the outputs of self-attention kernels (query length == key length); recompute everything else.

    Attention is ~75% of a Wan step's FLOPs at 81 frames and its output is only N x dim, so keeping it and recomputing
    the cheap projections, norms and feed-forward costs ~10% extra compute instead of ~35% for full recompute.
    """
    if _is_attention_op(op) and len(args) >= 2 and torch.is_tensor(args[0]) and torch.is_tensor(args[1]):
        seq_dim = -2 if str(op).startswith("aten.") else 1  # aten SDPA is (B, H, S, D); flash-attn ops (B, S, H, D)
        if args[0].shape[seq_dim] == args[1].shape[seq_dim]:
            return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_keep_self_attention)


def vace_blocks(transformer) -> list:
    """A VACE model's VACE blocks (the control branch; diffusers runs them through the same checkpointing hook as the
    main blocks, before them); [] for every other model."""
    return list(getattr(transformer, "vace_blocks", None) or [])


def checkpointed_block_ids(num_blocks: int, cfg: MemoryConfig) -> set[int]:
    """Which blocks recompute in backward. `checkpointed_blocks = N` checkpoints the first N (the rest keep everything)."""
    if cfg.gradient_checkpointing == "none":
        return set()
    count = num_blocks if cfg.checkpointed_blocks is None else min(cfg.checkpointed_blocks, num_blocks)
    return set(range(count))


def streamed_ids(num_blocks: int, cfg: MemoryConfig) -> list[int]:
    """Which blocks stream their frozen weights from host RAM: `streamed_blocks` of the checkpointed ones."""
    return streamed_block_ids(sorted(checkpointed_block_ids(num_blocks, cfg)), cfg.streamed_blocks)


def _plain(block, *args):
    return block(*args)


def _recompute_all(block, *args):
    return checkpoint(block.__call__, *args, use_reentrant=False)


def _keep_attention(block, *args):
    return checkpoint(block.__call__, *args, use_reentrant=False, context_fn=_selective_context)


def make_block_runner(blocks: list, checkpointed: set[int], mode: str, compile: bool,
                      offloader: ActivationOffloader | None = None, sublayers: bool = False,
                      extra_blocks: list = (), streamer: WeightStreamer | None = None) -> Callable:
    """The function diffusers calls for each block in training: plain, fully recomputed, or attention-keeping.

    With `compile`, the checkpoint call itself is inside the compiled region (so selective checkpointing still sees the
    attention ops); every block shares the same compiled code, so it compiles once per variant, not once per block.
    With an `offloader`, what a checkpointed block keeps for backward goes to CPU memory (trainer/model/offload.py).
    With `sublayers`, checkpointed blocks checkpoint their three sub-layers themselves (`enable_sublayer_checkpointing`).
    `extra_blocks`: a VACE model's VACE blocks, numbered after the main ones in `checkpointed`; they recompute like the
    main blocks but keep what they save on the GPU (the offloader's groups are the main blocks, in their order).
    With a `streamer`, a streamed block's weights are bound to a device slot around the (compiled) call, outside the
    compiled region, and again when its backward starts (trainer/model/streaming.py).
    """
    recompute = _keep_attention if mode == "selective" else _recompute_all
    plain = _plain
    if compile:
        recompute, plain = torch.compile(recompute, dynamic=False), torch.compile(plain, dynamic=False)
    whole = recompute
    if sublayers:
        recompute = plain
    index = {id(b): i for i, b in enumerate([*blocks, *extra_blocks])}
    main = len(blocks)

    def run(i, block, args):
        if i not in checkpointed:
            return plain(block, *args)
        if i >= main:  # a VACE block: never sub-layer checkpointed, never offloaded
            return whole(block, *args)
        if offloader is None:
            return recompute(block, *args)
        with offloader.group(i):
            return recompute(block, *args)

    def run_block(block, *args):
        i = index[id(block)]
        if streamer is None or not streamer.streams(i):
            return run(i, block, args)
        with streamer.running(i):
            output = run(i, block, args)
        return streamer.watch_backward(i, output)

    return run_block


def _modulation(block, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # shift, scale, gate (self-attention), shift, scale, gate (feed-forward), as diffusers' WanTransformerBlock
    if temb.ndim == 4:  # Wan 2.2 TI2V: batch, tokens, 6, dim
        return tuple(t.squeeze(2) for t in (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2))
    return (block.scale_shift_table + temb.float()).chunk(6, dim=1)


def _self_attention_sublayer(block, hidden_states, temb, rotary_emb):
    shift, scale, gate = _modulation(block, temb)[:3]
    norm = (block.norm1(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
    return (hidden_states.float() + block.attn1(norm, None, None, rotary_emb) * gate).type_as(hidden_states)


def _cross_attention_sublayer(block, hidden_states, encoder_hidden_states):
    norm = block.norm2(hidden_states.float()).type_as(hidden_states)
    return hidden_states + block.attn2(norm, encoder_hidden_states, None, None)


def _feed_forward_sublayer(block, hidden_states, temb):
    shift, scale, gate = _modulation(block, temb)[3:]
    norm = (block.norm3(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
    return (hidden_states.float() + block.ffn(norm).float() * gate).type_as(hidden_states)


class _SublayerCheckpointing:
    """Wan block forward (the same math as diffusers' `WanTransformerBlock.forward`, tests compare them) with the
    self-attention, cross-attention and feed-forward sub-layers checkpointed separately.

    Each sub-layer's output is kept (two more hidden-size tensors per block than whole-block checkpointing), so the
    recompute in backward no longer needs the two attention output projections, whose results only fed the next
    sub-layer: ~2 x 2·tokens·dim² FLOPs per block (~0.2 s per step at 14B 832x480x81). Meant with activation_offload.
    """

    keep_attention: bool

    def forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
        context = _selective_context if self.keep_attention else noop_context_fn
        hidden_states = checkpoint(_self_attention_sublayer, self, hidden_states, temb, rotary_emb,
                                   use_reentrant=False, context_fn=context)
        hidden_states = checkpoint(_cross_attention_sublayer, self, hidden_states, encoder_hidden_states,
                                   use_reentrant=False, context_fn=context)
        return checkpoint(_feed_forward_sublayer, self, hidden_states, temb, use_reentrant=False)


_SUBLAYER_CLASSES: dict[type, type] = {}


def enable_sublayer_checkpointing(blocks: list, ids: set[int], keep_attention: bool) -> None:
    """Checkpoint the sub-layers of these blocks separately (same parameters and state-dict keys; block hooks such as
    TREAD's still run, since the block is still called as a module)."""
    for i in ids:
        block = blocks[i]
        base = type(block)
        if not isinstance(block, _SublayerCheckpointing):
            if base not in _SUBLAYER_CLASSES:
                _SUBLAYER_CLASSES[base] = type(f"SublayerCheckpointed{base.__name__}", (_SublayerCheckpointing, base), {})
            block.__class__ = _SUBLAYER_CLASSES[base]
        block.keep_attention = keep_attention


def enable_feed_forward_chunking(transformer, chunk_size: int) -> None:
    """Run each block's feed-forward over `chunk_size` tokens at a time (exact: the FF is per token).

    Wan's block has no chunking hook in diffusers. The FF modules get a subclass (same parameters and state-dict keys)
    rather than a per-instance patched `forward`: one shared code object, so regional compile reuses one graph for all
    blocks instead of recompiling for each.
    """
    for block in [*transformer.blocks, *vace_blocks(transformer)]:
        ff = block.ffn
        if not isinstance(ff, _ChunkedFeedForward):
            ff.__class__ = _chunked_class(type(ff))
        ff.chunk_size = chunk_size


_CHUNKED: dict[type, type] = {}


class _ChunkedFeedForward:
    chunk_size: int

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        forward = super().forward  # the diffusers FeedForward this class was mixed into
        if hidden_states.shape[1] <= self.chunk_size:
            return forward(hidden_states, *args, **kwargs)
        parts = hidden_states.split(self.chunk_size, dim=1)
        return torch.cat([forward(part, *args, **kwargs) for part in parts], dim=1)


def _chunked_class(base: type) -> type:
    if base not in _CHUNKED:
        _CHUNKED[base] = type(f"Chunked{base.__name__}", (_ChunkedFeedForward, base), {})
    return _CHUNKED[base]


def quantize_base_weights(transformer, kind: str) -> None:
    """Frozen base weights in int8 (optimum-quanto, weight-only). Call before LoRA is added."""
    if kind == "int8":
        from optimum.quanto import freeze, qint8, quantize

        quantize(transformer, weights=qint8, exclude=["proj_out", "patch_embedding", "condition_embedder*"])
        freeze(transformer)


def place_base_model(transformer, cfg: MemoryConfig, device: torch.device) -> None:
    """Quantize and place the frozen base model on the device (before LoRA is added). int8 is quantized before the
    move (half the bytes cross); fp8 after it (the same bytes either way, and the GPU quantizes faster). The blocks
    of `streamed_blocks` put their weights in host RAM first: they never reach the device whole."""
    if cfg.base_quantization == "int8":
        quantize_base_weights(transformer, cfg.base_quantization)
    ids = streamed_ids(len(transformer.blocks), cfg)
    if ids:
        if cfg.base_quantization == "fp8":
            raise ValueError('memory.streamed_blocks with base_quantization = "fp8" (preflight refuses it)')
        stream_blocks(transformer, ids, device)
    transformer.to(device)
    if cfg.base_quantization == "fp8":
        check_float8_device(device)
        log.info("fp8 base weights: %d linear layers", convert_blocks_to_float8(transformer))


@contextmanager
def cudnn_benchmark() -> Iterator[None]:
    """cuDNN times its convolution algorithms once per shape and keeps the fastest (the VAE's 3D convolutions, when
    caching and in validation renders); the process's own setting comes back afterwards."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def offload_host_budget() -> int:
    """Host bytes one process's activation offload may hold: HOST_SHARE of the free host RAM (cgroup limit included),
    split between the processes of this node. Past it, saved tensors stay on the GPU instead of OOM-killing the run."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return int(HOST_SHARE * host_memory_gib() * 2**30 / processes)


def apply_memory_options(transformer, cfg: MemoryConfig, device: torch.device) -> ActivationOffloader | None:
    """Attention backend, feed-forward chunking, checkpointing, activation offload and compile (after LoRA, before
    accelerate.prepare). Returns the activation offloader when `activation_offload` is on (its byte count is a metric)."""
    if cfg.base_quantization == "fp8":
        check_float8_device(device)
    backend = resolve_attention_backend(cfg.attention_backend, device, context_parallel=cfg.context_parallel > 1)
    set_attention_backend(transformer, backend, cfg.attention_backend)
    chunk = cfg.feed_forward_chunk_size or int(os.environ.get(FF_CHUNK_ENV, "0") or 0)
    if chunk:
        enable_feed_forward_chunking(transformer, chunk)
    blocks, extra = list(transformer.blocks), vace_blocks(transformer)
    checkpointed = checkpointed_block_ids(len(blocks), cfg)
    streamer = weight_streamer(transformer)
    if streamer is None and streamed_ids(len(blocks), cfg):
        raise RuntimeError("memory.streamed_blocks: place_base_model puts the streamed weights in host RAM first")
    if streamer is not None:
        streamer.attach(transformer)
    offloader = None
    if cfg.activation_offload and checkpointed:
        offloader = ActivationOffloader(device, num_groups=max(checkpointed) + 1, max_host_bytes=offload_host_budget())
        offloader.exclude_parameters(transformer)
        if streamer is not None:
            offloader.exclude_tensors(streamer.device_tensors())
    if cfg.checkpoint_sublayers and checkpointed:
        enable_sublayer_checkpointing(blocks, checkpointed, keep_attention=cfg.gradient_checkpointing == "selective")
    if checkpointed or cfg.compile:
        # VACE blocks: checkpointed whenever checkpointing is on (checkpointed_blocks counts main blocks)
        both = checkpointed | ({len(blocks) + j for j in range(len(extra))} if checkpointed else set())
        transformer.enable_gradient_checkpointing(make_block_runner(
            blocks, both, cfg.gradient_checkpointing, cfg.compile, offloader, cfg.checkpoint_sublayers, extra,
            streamer))
    if device.type == "cuda":
        # Under bf16 autocast the adapter matmuls run in bf16 anyway; peft's cast of each LoRA input to the fp32
        # adapter dtype would only add a full-size copy per adapted layer.
        for module in transformer.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
    return offloader

