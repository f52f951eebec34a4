"""Activation offload: what a checkpointed transformer block keeps for backward goes to pinned CPU memory.

With checkpointing, a Wan block keeps only its inputs (and, with selective checkpointing, its self-attention output)
until backward: ~100 MB each per block at 1.3B 832x480x81, ~335 MB at 14B. This moves those tensors to pinned host
memory on a side CUDA stream while the forward goes on, and in backward copies the next block's tensors back while the
current block's backward runs, so the GPU holds about one block's worth instead of all of them.

Written here because torch's `save_on_cpu` copies synchronously (the forward waits for every copy and nothing is
prefetched) and torchtune's `OffloadActivations` would pull the whole torchtune stack in for one class.

Host RAM: the copies live in exact-size page-locked buffers reused step to step (`PinnedPool`), never more than
`max_host_bytes` a step; what does not fit stays on the GPU. torch's own pinned allocator rounds every buffer up to a
power of two (a 774 MB block input at 14B 1280x720x81 takes 1 GiB), which is what OOM-killed 720p runs on 128 GiB nodes.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

MIN_OFFLOAD_BYTES = 1 << 20  # smaller tensors (modulation vectors, text states of one block) stay where they are
KEEP_LAST_BLOCKS = 1  # the last block's backward comes first: a round trip through the host would only add latency


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense in some dimension order: a copy with the same strides holds exactly its elements
    (compiled backward graphs check the strides of what they get back)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda p: p[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """`t` itself, or the plain tensors a tensor subclass is made of (`__tensor_flatten__`: optimum-quanto's int8 data
    and scale); [] for a subclass without it."""
    if type(t) in (torch.Tensor, torch.nn.Parameter):
        return [t]
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None:
        return []
    names, _ = flatten()
    return [inner for name in names for inner in plain_tensors(getattr(t, name))]


def _storages(t: torch.Tensor) -> list[int]:
    """Storage addresses of a tensor, or of the plain tensors a tensor subclass is made of."""
    return [inner.untyped_storage().data_ptr() for inner in plain_tensors(t)]


class PinnedPool:
    """Page-locked host buffers of exact sizes, handed out again each step (a step saves the same shapes every time).

    Plain host allocations registered with `cudaHostRegister`: torch's pinned allocator would round each one up to a
    power of two (up to 2x the host RAM). Falls back to torch's pinned allocator where registering fails.
    """

    def __init__(self, cuda: bool, limit: int | None = None) -> None:
        self.cuda = cuda
        self.limit = limit  # free buffers of other sizes are dropped before the pool grows past this
        self._free: dict[int, list[torch.Tensor]] = {}
        self._taken: list[torch.Tensor] = []
        self._registered: list[torch.Tensor] = []
        self.bytes = 0  # host bytes held (reused step to step; dropped only to stay under `limit`)
        weakref.finalize(self, _unregister, self._registered)

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 host buffer of exactly `nbytes`, free until `release_all`."""
        free = self._free.get(nbytes)
        if not free and self.limit is not None:
            self._trim(self.limit - nbytes)
        buf = free.pop() if free else self._new(nbytes)
        self._taken.append(buf)
        return buf

    def _trim(self, target: int) -> None:
        """Drop free buffers (largest first) until the pool holds at most `target` bytes: clips of other shapes
        (buckets) leave buffers of sizes the next steps may never ask for again."""
        free = sorted((buf for bufs in self._free.values() for buf in bufs), key=lambda b: -b.numel())
        for buf in free:
            if self.bytes <= target:
                break
            self._free[buf.numel()].remove(buf)
            self.bytes -= buf.numel()
            if any(buf is r for r in self._registered):
                torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
                self._registered[:] = [r for r in self._registered if r is not buf]

    def release_all(self) -> None:
        for buf in self._taken:
            self._free.setdefault(buf.numel(), []).append(buf)
        self._taken.clear()

    def _new(self, nbytes: int) -> torch.Tensor:
        self.bytes += nbytes
        if not self.cuda:
            return torch.empty(nbytes, dtype=torch.uint8)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0) == 0:
            self._registered.append(buf)
            return buf
        log.warning("cudaHostRegister failed: activation offload falls back to torch's pinned allocator")
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


ALIGN = 512  # byte offset of each tensor in a shared buffer (any dtype's alignment, and DMA-friendly)


def pinned_copies(pool: PinnedPool, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of `tensors` in one exact-size page-locked buffer from `pool`, as views with their shapes and dtypes
    (each at an ALIGN-byte offset): how host RAM holds frozen weights that go back and forth to the device."""
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    buffer = pool.take(max(total, 1))
    views = [buffer[o:o + t.numel() * t.element_size()].view(t.dtype).view(t.shape) for o, t in zip(offsets, tensors)]
    for view, t in zip(views, tensors):
        view.copy_(t)
    return views


def _unregister(buffers: list[torch.Tensor]) -> None:
    for buf in buffers:
        torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
    buffers.clear()


def _host_view(buf: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`buf`'s bytes as a tensor with `like`'s dtype, shape and strides (dense: `_dense` checked it)."""
    return buf.view(like.dtype).as_strided(like.shape, like.stride())


@dataclass(eq=False)
class _Offloaded:
    host: torch.Tensor
    source: weakref.ref  # the original tensor: a second save of it (shared inputs) reuses this copy while it lives
    groups: set[int] = field(default_factory=set)
    uses_left: int = 0
    copied: torch.cuda.Event | None = None  # host copy finished
    device_copy: torch.Tensor | None = None
    fetched: torch.cuda.Event | None = None  # device copy finished


class ActivationOffloader:
    """Saved-tensor hooks, one group per transformer block: `with offloader.group(i): block(...)`.

    Forward: each saved tensor over MIN_OFFLOAD_BYTES (parameters excluded) is copied to pinned host memory on a side
    stream; its GPU memory is freed when the forward drops it and the copy is done. Backward walks the blocks in
    reverse: the first time a block's tensors are asked for, the previous block's are fetched on another side stream.
    The last `keep_last` blocks stay on the GPU, and so does whatever would take a step's host copies over
    `max_host_bytes` (None: no limit): a run short of host RAM keeps more on the GPU instead of being OOM-killed.
    On CPU it keeps separate copies (no streams): the same bookkeeping, for tests.
    """

    def __init__(self, device: torch.device, num_groups: int, keep_last: int | None = None,
                 min_bytes: int | None = None, max_host_bytes: int | None = None) -> None:
        if device.type == "cuda" and device.index is None:  # tensors report cuda:N, never plain cuda
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.num_groups = num_groups
        self.keep_last = KEEP_LAST_BLOCKS if keep_last is None else keep_last
        self.min_bytes = MIN_OFFLOAD_BYTES if min_bytes is None else min_bytes
        self.cuda = device.type == "cuda"
        self._to_host = torch.cuda.Stream(device) if self.cuda else None
        self._to_device = torch.cuda.Stream(device) if self.cuda else None
        self._excluded: set[int] = set()
        self._groups: dict[int, list[_Offloaded]] = {}
        self._by_key: dict[tuple, _Offloaded] = {}
        self._prefetched: set[int] = set()
        self._current = -1
        self.max_host_bytes = max_host_bytes
        self.pool = PinnedPool(self.cuda, max_host_bytes)
        self.bytes_offloaded = 0  # this step's host copies (a shared tensor counts once)
        self.bytes_kept_for_lack_of_host = 0  # this step's tensors over max_host_bytes, left on the GPU
        self._warned_host = False

    def exclude_parameters(self, module: torch.nn.Module, replace: bool = False) -> None:
        """Never offload the model's own weights and buffers (backward saves frozen weights for input gradients),
        including the plain tensors inside quantized ones (optimum-quanto's int8 data and scales). By storage address:
        `replace` forgets the earlier ones, for weights that moved (a Wan 2.2 expert swapped onto the GPU)."""
        if replace:
            self._excluded.clear()
        for t in [*module.parameters(), *module.buffers()]:
            self._excluded.update(_storages(t))

    def exclude_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Never offload these either (the weight streaming's device slots: weights, not activations)."""
        for t in tensors:
            self._excluded.update(_storages(t))

    def set_host_budget(self, max_host_bytes: int | None) -> None:
        """A new cap on the host bytes a step may hold (the free host RAM changed)."""
        self.max_host_bytes = self.pool.limit = max_host_bytes

    @contextlib.contextmanager
    def group(self, index: int) -> Iterator[None]:
        if index == 0:
            self._new_step()
        if index >= self.num_groups - self.keep_last:
            yield
            return
        self._current = index
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield

    def _new_step(self) -> None:
        if self.bytes_kept_for_lack_of_host and not self._warned_host:  # said once: the GPU pays for the host's limit
            self._warned_host = True
            log.warning("activation offload: the host budget (%.1f GiB) was full; %.1f GiB of saved tensors stayed on "
                        "the GPU last step (free host RAM or a smaller memory preset avoids it)",
                        (self.max_host_bytes or 0) / 2**30, self.bytes_kept_for_lack_of_host / 2**30)
        self._groups.clear()
        self._by_key.clear()
        self._prefetched.clear()
        self.pool.release_all()
        self.bytes_offloaded = 0
        self.bytes_kept_for_lack_of_host = 0

    def _eligible(self, t: torch.Tensor) -> bool:
        return (type(t) is torch.Tensor and t.device == self.device and not t.is_sparse
                and t.numel() * t.element_size() >= self.min_bytes
                and t.untyped_storage().data_ptr() not in self._excluded and _dense(t))

    def _pack(self, t: torch.Tensor):
        if not self._eligible(t):
            return t
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t._version)
        record = self._by_key.get(key)
        if record is None or record.source() is None:
            nbytes = t.numel() * t.element_size()
            if self.max_host_bytes is not None and self.bytes_offloaded + nbytes > self.max_host_bytes:
                self.bytes_kept_for_lack_of_host += nbytes
                return t
            record = self._copy_to_host(t)
            self._by_key[key] = record
        record.uses_left += 1
        if self._current not in record.groups:
            record.groups.add(self._current)
            self._groups.setdefault(self._current, []).append(record)
        return record

    def _copy_to_host(self, t: torch.Tensor) -> _Offloaded:
        nbytes = t.numel() * t.element_size()
        self.bytes_offloaded += nbytes
        host = _host_view(self.pool.take(nbytes), t)
        if not self.cuda:
            host.copy_(t.detach())
            return _Offloaded(host=host, source=weakref.ref(t))
        self._to_host.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._to_host):
            host.copy_(t, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self._to_host)
        t.record_stream(self._to_host)  # its memory is reused only after the copy, whenever the forward frees it
        return _Offloaded(host=host, source=weakref.ref(t), copied=copied)

    def _unpack(self, record):
        if not isinstance(record, _Offloaded):
            return record
        if len(record.groups) == 1:  # a block's own tensor (not a shared input): its backward is starting
            (group,) = record.groups
            for g in (group, group - 1):
                if g not in self._prefetched and g in self._groups:
                    self._prefetched.add(g)
                    self._fetch_group(g)
        if record.device_copy is None:
            self._fetch(record)
        value = record.device_copy
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(record.fetched)
            value.record_stream(stream)
        record.uses_left -= 1
        if record.uses_left <= 0:
            record.device_copy = None  # backward holds it as long as it needs it
        return value

    def _fetch_group(self, group: int) -> None:
        for record in self._groups.get(group, []):
            if record.device_copy is None:
                self._fetch(record)

    def _fetch(self, record: _Offloaded) -> None:
        if not self.cuda:
            record.device_copy = record.host.clone()
            return
        with torch.cuda.stream(self._to_device):
            self._to_device.wait_event(record.copied)
            record.device_copy = record.host.to(self.device, non_blocking=True)
            record.fetched = torch.cuda.Event()
            record.fetched.record(self._to_device)
