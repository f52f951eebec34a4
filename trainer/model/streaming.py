"""Weight streaming (`[memory] streamed_blocks`): the frozen base weights of some transformer blocks live in
page-locked host RAM and are copied into a ring of GPU slots for each block's forward and again for its backward.

A 14B Wan holds ~13 GiB of int8 base weights (~26 GiB bf16): with them all on a 16 GB card nothing is left for the
activations. A streamed block's frozen parameters keep their identity (peft, the offloader's exclusions and compiled
graphs see the same tensor objects); only what their `.data` points at changes: their own host copy while the block
is idle, one of `SLOTS` device tensors while it computes ("bound"). Only checkpointed blocks stream, so nothing a
block saved in forward refers to a slot: backward recomputes the block with the weights bound at that time. LoRA
parameters and the optimizer state stay on the device. optimum-quanto int8 weights (tensor subclasses) stream their
inner tensors (int8 data + scale).

The order of use is fixed: forward over the streamed blocks, backward over them in reverse, then the next step's
forward. A block is bound when it starts (forward: when it is called; backward: when the gradient of its output
arrives, before any of its backward runs) and released when it is done (forward: when it returns; backward: when the
next streamed block's backward starts, or the backward ends). Each release records an event on the compute stream;
a copy into that slot (on a side stream) waits for it, so a slot is never overwritten while kernels that read it are
still queued. After every bind the free slots are filled with the next blocks in that order, so the copy of the next
block overlaps the current block's compute; a slot that still holds the block needed next is reused without a copy
(the last block of the forward is the first of the backward, and the backward's last is the next forward's first).
On the CPU (tests) the same bookkeeping runs with plain tensors and synchronous copies: the slots are still separate
tensors, so which block computes with which slot can be checked.

Cost: each streamed block crosses PCIe once for the forward and once for the backward (~2 x streamed bytes per step,
minus the reuse at the two turnarounds), on top of the activation offload's traffic.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from trainer.model.offload import PinnedPool, pinned_copies, plain_tensors
from trainer.model.sizing import STREAM_SLOTS

log = logging.getLogger(__name__)

SLOTS = STREAM_SLOTS  # device slots: the block computing and the next one arriving (the sizing model counts them)
CHECK_RELEASED_SLOTS = False  # tests: a released slot is filled with garbage and forgotten, so any late read shows


def streamed_block_ids(checkpointed: list[int], count: int | None) -> list[int]:
    """Which of the checkpointed blocks stream: `count` of them spread evenly (more than there are: all of them).
    Spread, not the first N: each block's copy then has the compute of the resident blocks before it to hide behind."""
    ids = sorted(checkpointed)
    if not count or not ids:
        return []
    if count >= len(ids):
        return ids
    return [ids[k * len(ids) // count] for k in range(count)]


def move_trainable(module: torch.nn.Module, device: torch.device) -> None:
    """The trainable parameters (and any gradient they hold) to `device`, keeping each parameter's identity."""
    for p in module.parameters():
        if p.requires_grad and p.device.type != device.type:
            p.data = p.data.to(device)
            if p.grad is not None:
                p.grad = p.grad.to(device)


def in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


@dataclass(eq=False)
class _Slot:
    tensors: list[torch.Tensor]  # one device tensor per streamed leaf (same shapes and dtypes in every block)
    block: int | None = None  # whose weights it holds (once `copied` has completed)
    bound: bool = False  # a block computes with it now
    copied: torch.cuda.Event | None = None  # its host-to-device copy finished (side stream)
    free: torch.cuda.Event | None = None  # its last reader was queued before this (compute stream)


@dataclass(eq=False)
class _Block:
    params: list[tuple[torch.nn.Module, str]]  # where each streamed parameter is registered
    leaves: list[torch.Tensor]  # the plain tensors whose `.data` is swapped (parameters, or their inner tensors)
    host: list[torch.Tensor] = field(default_factory=list)  # page-locked copies, one per leaf


class WeightStreamer:
    """The streamed blocks of one transformer and their GPU slots (built by `stream_blocks`)."""

    def __init__(self, blocks: list[torch.nn.Module], ids: list[int], device: torch.device) -> None:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.cuda = device.type == "cuda"
        self.ids = list(ids)
        self._pool = PinnedPool(self.cuda)
        self._blocks = {i: self._take_to_host(blocks[i]) for i in self.ids}
        shapes = [[(t.shape, t.dtype) for t in b.host] for b in self._blocks.values()]
        if any(s != shapes[0] for s in shapes):
            raise ValueError("weight streaming needs transformer blocks of one layout (same shapes and dtypes)")
        self._slots = [_Slot([torch.empty_like(t, device=device) for t in self._blocks[self.ids[0]].host])
                       for _ in range(min(SLOTS, len(self.ids)))]
        self._order = [("forward", i) for i in self.ids] + [("backward", i) for i in reversed(self.ids)]
        self._position = {entry: k for k, entry in enumerate(self._order)}
        self._uses = {i: [k for k, (_, j) in enumerate(self._order) if j == i] for i in self.ids}
        self._pos = len(self._order) - 1  # as if the previous step's backward had just ended
        self._index = {id(blocks[i]): i for i in self.ids}
        self._managed = False  # the block runner brackets the call itself (the hooks stand aside)
        self._callback_queued = False
        self._copy = torch.cuda.Stream(device) if self.cuda else None
        self._compute = torch.cuda.current_stream(device) if self.cuda else None
        self.bytes_copied = 0  # host-to-device bytes of the current step (the slot reuse saves some)
        self.host_bytes = self._pool.bytes
        self.device_bytes = sum(t.numel() * t.element_size() for s in self._slots for t in s.tensors)
        for i in self.ids:
            blocks[i].register_forward_pre_hook(self._pre_hook)
            blocks[i].register_forward_hook(self._post_hook)

    # ------------------------------------------------------------ setup

    def _take_to_host(self, block: torch.nn.Module) -> _Block:
        """Every parameter of `block` (its frozen base: the adapter comes later) into one page-locked host buffer.
        A tensor-subclass parameter (int8) is first rebuilt on the device, so that it says the device it computes on;
        only its inner tensors then move."""
        params, leaves = [], []
        for module in block.modules():
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                inner = plain_tensors(p)
                if not inner:
                    raise TypeError(f"weight streaming: {type(p).__name__} parameters are neither plain tensors nor "
                                    "tensor subclasses with __tensor_flatten__")
                if inner[0] is not p and p.device != self.device:  # a tensor subclass
                    p = torch.nn.Parameter(p.detach().to(self.device), requires_grad=False)
                    module._parameters[name] = p
                p.requires_grad_(False)
                params.append((module, name))
                leaves += plain_tensors(p)
        entry = _Block(params, leaves, pinned_copies(self._pool, [t.data for t in leaves]))
        for leaf, host in zip(leaves, entry.host):
            leaf.data = host
        return entry

    def attach(self, transformer: torch.nn.Module) -> None:
        """After the adapter is added: its parameters to the device (peft puts them beside the base weight, which
        is in host RAM), and the streamed parameters left out of DDP's broadcasts (frozen, loaded alike everywhere)."""
        move_trainable(transformer, self.device)
        streamed = {id(getattr(m, n)) for b in self._blocks.values() for m, n in b.params}
        names = [n for n, p in transformer.named_parameters() if id(p) in streamed]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(transformer, names)

    def device_tensors(self) -> list[torch.Tensor]:
        """The slots' device tensors (never activations: the activation offload leaves them alone)."""
        return [t for s in self._slots for t in s.tensors]

    def streams(self, index: int) -> bool:
        return index in self._blocks

    @contextlib.contextmanager
    def without_streamed_parameters(self) -> Iterator[None]:
        """The streamed parameters hidden from their modules (`Module.to` and friends leave them in host RAM)."""
        saved = []
        for entry in self._blocks.values():
            for module, name in entry.params:
                if not any(m is module for m, _ in saved):
                    saved.append((module, module._parameters))
                    module._parameters = dict(module._parameters)
                module._parameters.pop(name, None)
        try:
            yield
        finally:
            for module, original in saved:
                original.update(module._parameters)  # what `_apply` replaced (non-streamed parameters)
                module._parameters = original

    # ------------------------------------------------------------ the forward (the block runner, or the hooks)

    @contextlib.contextmanager
    def running(self, index: int) -> Iterator[None]:
        """Around a streamed block's forward under the block runner (training): bound while it runs."""
        self._acquire("forward", index)
        self._managed = True
        try:
            yield
        finally:
            self._managed = False
            self._release_all()

    def around(self, index: int, call):
        """`call` (a compiled block call: validation's) bracketed like the block runner's: the binding stays outside
        the compiled code, whose traced hooks then stand aside."""

        def bound_call(*args, **kwargs):
            with self.running(index):
                return call(*args, **kwargs)

        return bound_call

    def watch_backward(self, index: int, output):
        """The block's backward binds it again: when the gradient of its output arrives."""
        if torch.is_grad_enabled() and torch.is_tensor(output) and output.requires_grad:
            output.register_hook(functools.partial(self._backward_begins, index))
        return output

    def _pre_hook(self, block, args):
        if self._managed or in_backward():  # the runner binds it / a checkpoint recomputes it in backward
            return None
        self._hooked_forward(block)
        return None

    def _post_hook(self, block, args, output):
        if self._managed or in_backward():
            return None
        self._hooked_forward_done(output)
        return None

    @torch._dynamo.disable
    def _hooked_forward(self, block) -> None:
        """A streamed block called outside the block runner (no_grad: validation, eval loss)."""
        self._acquire("forward", self._index[id(block)])

    @torch._dynamo.disable
    def _hooked_forward_done(self, output) -> None:
        self._release_all()
        if torch.is_grad_enabled() and torch.is_tensor(output) and output.requires_grad:
            raise RuntimeError("a streamed block ran with autograd outside checkpointing: its backward would read "
                               "weights that are gone (weight streaming needs gradient checkpointing)")

    # ------------------------------------------------------------ the backward

    def _backward_begins(self, index: int, grad):
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
        self._acquire("backward", index)
        return None

    def _backward_done(self) -> None:
        self._callback_queued = False
        self._release_all()

    # ------------------------------------------------------------ slots

    def bound_blocks(self) -> list[int]:
        return [s.block for s in self._slots if s.bound]

    def slot_of(self, index: int) -> int | None:
        """Which slot block `index` is bound to (None: idle, its weights are its host copies)."""
        return next((k for k, s in enumerate(self._slots) if s.bound and s.block == index), None)

    def _acquire(self, phase: str, index: int) -> None:
        self._release_all()  # one block computes at a time: whatever is still bound is done
        if self.cuda and phase == "forward":
            self._compute = torch.cuda.current_stream(self.device)
        self._pos = self._position[(phase, index)]
        if self._pos == 0:
            self.bytes_copied = 0
        slot = next((s for s in self._slots if s.block == index), None)
        if slot is None:
            slot = self._victim(0)
            self._load(index, slot)
        self._bind(index, slot)
        self._prefetch()

    def _next_use(self, index: int | None) -> int:
        """Steps ahead in the order until block `index` is needed again (a large number: never)."""
        n = len(self._order)
        return min(((k - self._pos) % n for k in self._uses.get(index, ())), default=n)

    def _victim(self, needed_in: int) -> _Slot | None:
        """The unbound slot to overwrite for a block needed `needed_in` steps ahead: the one whose block is needed
        last, and only if that is later than `needed_in`."""
        free = [s for s in self._slots if not s.bound]
        if not free:
            return None
        slot = max(free, key=lambda s: self._next_use(s.block))
        return slot if self._next_use(slot.block) > needed_in else None

    def _prefetch(self) -> None:
        n = len(self._order)
        for k in range(1, n):
            index = self._order[(self._pos + k) % n][1]
            if any(s.block == index for s in self._slots):
                continue
            slot = self._victim(k)
            if slot is None:
                return
            self._load(index, slot)

    def _load(self, index: int, slot: _Slot) -> None:
        host = self._blocks[index].host
        self.bytes_copied += sum(t.numel() * t.element_size() for t in host)
        slot.block = index
        if not self.cuda:
            for dst, src in zip(slot.tensors, host):
                dst.copy_(src)
            return
        if slot.free is not None:
            self._copy.wait_event(slot.free)  # whatever read the slot before has run
        with torch.cuda.stream(self._copy):
            for dst, src in zip(slot.tensors, host):
                dst.copy_(src, non_blocking=True)
            slot.copied = self._copy.record_event()

    def _bind(self, index: int, slot: _Slot) -> None:
        if self.cuda and slot.copied is not None:
            self._compute.wait_event(slot.copied)
        for leaf, tensor in zip(self._blocks[index].leaves, slot.tensors):
            leaf.data = tensor
        slot.bound = True

    def _release_all(self) -> None:
        for slot in self._slots:
            if not slot.bound:
                continue
            for leaf, host in zip(self._blocks[slot.block].leaves, self._blocks[slot.block].host):
                leaf.data = host
            slot.bound = False
            if CHECK_RELEASED_SLOTS:
                with torch.cuda.stream(self._compute) if self.cuda else contextlib.nullcontext():
                    for t in slot.tensors:
                        t.fill_(float("nan") if t.is_floating_point() else 77)
                slot.block = None
            if self.cuda:
                slot.free = self._compute.record_event()


def stream_blocks(transformer: torch.nn.Module, ids: list[int], device: torch.device) -> WeightStreamer:
    """Stream the frozen weights of `transformer.blocks[ids]` (before the adapter is added and the model moves to
    the device: their weights go to host RAM and never to the device in full). `transformer.to(...)` from now on
    leaves them in host RAM."""
    streamer = WeightStreamer(list(transformer.blocks), ids, device)
    transformer.wanforge_streamer = streamer
    plain_apply = type(transformer)._apply

    def _apply(fn, recurse=True):
        with streamer.without_streamed_parameters():
            return plain_apply(transformer, fn, recurse)

    transformer._apply = _apply
    log.info("weight streaming: %d blocks' frozen weights in host RAM (%.2f GiB pinned), %d slots on %s (%.2f GiB)",
             len(ids), streamer.host_bytes / 2**30, len(streamer._slots), device, streamer.device_bytes / 2**30)
    return streamer


def weight_streamer(transformer) -> WeightStreamer | None:
    """The transformer's weight streamer, if it streams."""
    return getattr(getattr(transformer, "module", transformer), "wanforge_streamer", None)
