"""The one sizing model: GPU memory, host memory and step time of a LoRA run, from measured rows. No torch.

Both `[memory] preset = "auto"` (trainer/model/preset_choice.py, on the node) and `wanforge estimate` / `--gpu auto`
(launcher/estimate.py, on the user's machine) ask this module, so they cannot disagree.

Measured rows (launcher/calibration.toml `[[measured]]`, each naming its command in bench/RESULTS.md) give, for one
model, clip shape, preset and GPU: s/step, peak GPU GiB (torch max_memory_allocated), host GiB the activation offload
copied per step, and (newer rows) the process's peak resident set. A question about another shape is answered from
the nearest measured row of the same preset and model width:
  GPU GiB   = weights (params x bytes per weight) + (row peak - row weights) x (tokens x dim x blocks) / (row's)
  host GiB  = process base (measured: RSS without offload) + offloaded bytes x (tokens x dim x blocks) / (row's)
  s/step    = row s/step x FLOPs / row FLOPs x (row GPU datasheet bf16 TFLOP/s / target's)
and every answer says whether it is `measured` (a row at this model, shape and preset) or `extrapolated` (scaled).
`blocks` counts a VACE model's VACE blocks beside its main ones (each runs over as many tokens), so a VACE flavour is
scaled from the Wan rows of its width and says "extrapolated" until a row measures it.
Weight streaming (`streamed_blocks`, trainer/model/streaming.py): the weights on the GPU are the resident blocks' plus
STREAM_SLOTS blocks' worth of slots (and everything outside the blocks); the streamed blocks' weights are host RAM.
A preset without rows of its own (presets.SIZED_FROM) is sized from its basis preset's rows: the same GPU memory for
the activations, the offload scaled by the hidden-size tensors each checkpointed block keeps (selective 2, full 1,
sub-layers 2 more: the measured balanced / balanced-lean rows hold 49.7 / 25.4 GiB at 14B, 1.96x), its own weights
and streaming; s/step from its speed basis. Always labelled extrapolated.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from trainer.model.presets import PRESETS, SIZED_FROM

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

HOST_SHARE = 0.6  # the activation offload may use at most this share of the free host RAM (dataloader, page cache)
HEADROOM = 0.92  # of the GPU's memory: the allocator's fragmentation and the CUDA context
HOST_BASE_GIB = 8.0  # host RSS of a training process besides the offload, where a row did not measure it (guess)
STREAM_SLOTS = 2  # device slots of weight streaming (trainer/model/streaming.py): one block computing, one arriving


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (empty where there is none: not Linux)."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_free(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this container may still allocate under its cgroup memory limit (None: no limit set). Containers (RunPod,
    Vast, Kubernetes pods) see the whole machine in /proc/meminfo, but their OOM killer acts at the cgroup limit."""
    for limit_file, usage_file in (("memory.max", "memory.current"),  # cgroup v2
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):  # v1
        limit, usage = _read_int(root / limit_file), _read_int(root / usage_file)
        if limit is None or usage is None or limit >= 1 << 60:  # "max" or v1's "unlimited" page-rounded int64
            continue
        reclaimable = 0
        stat = root / ("memory.stat" if limit_file == "memory.max" else "memory/memory.stat")
        try:
            for line in stat.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key in ("inactive_file", "total_inactive_file") and value.strip().isdigit():
                    reclaimable = int(value)
        except OSError:
            pass
        return max(limit - usage + reclaimable, 0)
    return None


def host_memory_gib(meminfo: dict[str, int] | None = None, cgroup_free: int | None = -1) -> float:
    """Host RAM this process can still use, GiB: /proc/meminfo's MemAvailable, capped by the container's cgroup limit."""
    info = _meminfo() if meminfo is None else meminfo
    available = info.get("MemAvailable", info.get("MemFree", 0))
    limit = _cgroup_free() if cgroup_free == -1 else cgroup_free
    if limit is not None:
        available = min(available, limit) if available else limit
    return available / 2**30


# ---------------------------------------------------------------- model shapes, tokens, FLOPs

TEXT_DIM = 4096  # UMT5-XXL
_SIZES = {"1.3b": (1536, 8960, 30), "14b": (5120, 13824, 40), "5b": (3072, 14336, 30)}


@dataclass(frozen=True)
class ModelShape:
    dim: int
    ffn: int
    layers: int
    vae_spatial: int = 8
    in_channels: int = 16  # I2V: + 20 condition channels
    image_encoder: bool = False  # Wan 2.1 I2V: 257 CLIP tokens in cross-attention
    vace_blocks: int = 0  # VACE: blocks of the control branch, each a Wan block over as many tokens (+ 2 d x d hints)

    @property
    def blocks(self) -> int:
        """Blocks one step runs (main + VACE): what activations and attention FLOPs scale with."""
        return self.layers + self.vace_blocks

    @property
    def params(self) -> float:
        """Wan DiT parameters: per block self + cross attention (4 d x d each) and the FFN, plus embeddings (VACE: its
        blocks with their hint projections, and the control's patch embedding)."""
        d, f = self.dim, self.ffn
        vace = self.vace_blocks * (self.block_params + 2 * (d * d + d)) + (96 * 4 * d if self.vace_blocks else 0)
        return self.layers * self.block_params + TEXT_DIM * d + d * d + 256 * d + 7 * d * d + vace

    @property
    def block_params(self) -> float:
        """One transformer block's parameters (what a sharded run all-gathers at a time)."""
        d, f = self.dim, self.ffn
        return 8 * (d * d + d) + 2 * d * f + f + d

    def tokens(self, frames: int, height: int, width: int) -> int:
        """Transformer tokens of one clip: latent frames x (height / 16) x (width / 16) (2x2 patches)."""
        patch = self.vae_spatial * 2
        return ((frames - 1) // 4 + 1) * (height // patch) * (width // patch)

    def forward_flops(self, tokens: int) -> float:
        """FLOPs of one forward: the matmuls (2 x params x tokens) and self-attention (4 x blocks x dim x tokens^2,
        VACE blocks included: they run over as many tokens as the main ones)."""
        return 2 * self.params * tokens + 4 * self.blocks * self.dim * tokens**2


def flavour_shape(name: str) -> ModelShape:
    """The transformer shape of a flavour: its own fields, else by the size in its name; the tiny test models 32/64/2."""
    from trainer.flavours import FLAVOURS

    f = FLAVOURS[name]
    inputs = dict(in_channels=f.in_channels, image_encoder=f.image_encoder, vace_blocks=len(f.vace_layers))
    if f.hub_id is None:
        return ModelShape(32, 64, 2, f.vae_spatial, **inputs)
    if hasattr(f, "dim") and hasattr(f, "num_layers"):
        return ModelShape(f.dim, f.ffn_dim, f.num_layers, f.vae_spatial, **inputs)
    for size, (dim, ffn, layers) in _SIZES.items():
        if size in name.lower():
            return ModelShape(dim, ffn, layers, 16 if size == "5b" else 8, **inputs)
    raise ValueError(f"flavour {name}: no transformer shape known for sizing (add dim/num_layers to it)")


def config_tokens(cfg) -> int:
    """Tokens of the config's largest clip (a WanforgeConfig): the step that decides the peak."""
    model = flavour_shape(cfg.model.flavour)
    return max(model.tokens(*cfg.dataset_shape(i)) for i in range(len(cfg.datasets)))


def bytes_per_weight(quantization: str, base_dtype: str = "bfloat16") -> int:
    if quantization == "int8":
        return 1
    if quantization == "fp8":
        return 2  # two 1-byte copies: the forward and the input-gradient layouts
    return {"bfloat16": 2, "float16": 2, "float32": 4}[base_dtype]


def idle_expert_gib(cfg, quantization: str | None = None) -> float:
    """Host GiB the idle Wan 2.2 expert holds with model.train_both_experts (its frozen weights wait in page-locked host
    memory, trainer/model/experts.py); 0 otherwise. `quantization`: the resolved base_quantization (default the config's)."""
    if not cfg.model.train_both_experts:
        return 0.0
    weight = bytes_per_weight(quantization if quantization is not None else cfg.memory.base_quantization,
                              cfg.model.base_dtype)
    return flavour_shape(cfg.model.flavour).params * weight / 2**30


# ---------------------------------------------------------------- measured rows


CALIBRATION_FILE = Path(__file__).resolve().parents[2] / "launcher" / "calibration.toml"


@lru_cache(maxsize=1)
def load_calibration(path: Path = CALIBRATION_FILE) -> dict[str, Any]:
    """launcher/calibration.toml: `[[measured]]` rows and `[gpus.*]` datasheet specs (the one place for both)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the package was built without its data file (package-data)")
    return tomllib.loads(path.read_text(encoding="utf-8"))


def measured_rows() -> list[dict[str, Any]]:
    return list(load_calibration()["measured"])


def row_shape(row: dict[str, Any]) -> ModelShape:
    return flavour_shape(row["flavour"])


def row_tokens(row: dict[str, Any]) -> int:
    return row_shape(row).tokens(row["num_frames"], row["height"], row["width"])


def row_number(row: dict[str, Any]) -> int:
    """A [[measured]] row's place in launcher/calibration.toml (1 = the first), the name `estimate` cites it by."""
    return measured_rows().index(row) + 1


def row_summary(row: dict[str, Any]) -> str:
    """What a [[measured]] row measured, in one line, with its source."""
    setting = f"preset {row['preset']}" if row.get("preset") else f"{row['gradient_checkpointing']} checkpointing"
    kernel = {"flash_4_hub": "FlashAttention 4"}.get(row.get("attention_backend", ""), "cuDNN attention")
    quant = f", {row['base_quantization']} base" if row.get("base_quantization", "none") != "none" else ""
    shards = f", base sharded over {row_shards(row)}" if row_shards(row) > 1 else ""
    return (f"{row['trainer']} {row['flavour']} {row['width']}x{row['height']}x{row['num_frames']} batch {row['batch']}, "
            f"{setting}, {kernel}{quant}{shards}, on {row['gpu']}: {row['s_per_step']} s/step, {row['peak_gib']} GiB "
            f"({row['source']})")


def measured_gpus() -> set[str]:
    """GPUs with at least one measured row (`--gpu auto` picks among these unless asked otherwise)."""
    return {row["gpu"] for row in measured_rows()}


def same_shape(a: int, b: int) -> bool:
    return abs(a - b) <= 0.02 * max(a, b)


@dataclass(frozen=True)
class MemoryPrediction:
    gpu_gib: float  # peak GPU memory (torch max_memory_allocated)
    offload_gib: float  # host RAM the activation offload holds (exact-size pinned buffers)
    host_gib: float  # peak resident host memory of the training process: its base + the offload
    measured: bool  # a row measured GPU and host memory of this preset, model and token count: not a scaled guess
    basis: str
    gpu_measured: bool = False  # the GPU peak alone was measured at this shape (older rows lack the host peak)
    gpu: str = ""  # the GPU the row was measured on
    row: dict[str, Any] | None = field(default=None, compare=False)  # the [[measured]] row it was scaled from
    streamed_gib: float = 0.0  # host RAM the streamed blocks' weights hold (page-locked, `streamed_blocks`)

    @property
    def pinned_gib(self) -> float:
        """Page-locked host RAM: the activation offload's buffers and the streamed weights."""
        return self.offload_gib + self.streamed_gib

    @property
    def label(self) -> str:
        if self.measured:
            return "measured"
        return "GPU measured; host RAM extrapolated" if self.gpu_measured else "not measured (extrapolated)"


def sharded_out_of_memory(shape: ModelShape, tokens: int, shards: int, gpu_gib: float) -> dict[str, Any] | None:
    """A measured `[[sharded_out_of_memory]]` row that rules this run out, or None: the same model, its base sharded
    over as many processes, ran out of GPU memory at no more tokens under a per-process cap of at least `gpu_gib`
    (every preset holds at least what that row's lowest-memory preset held)."""
    for row in load_calibration().get("sharded_out_of_memory", []):
        if (row_shape(row) == shape and int(row["shards"]) == shards and row_tokens(row) <= tokens * 1.01
                and float(row["cap_gib"]) >= gpu_gib):
            return row
    return None


def row_shards(row: dict[str, Any]) -> int:
    """Processes a row's frozen base was sharded over (`shards`; absent: 1, every process held all of it)."""
    return int(row.get("shards", 1))


def streamed_count(memory: dict[str, Any], layers: int) -> int:
    """Blocks whose weights stream from host RAM under these [memory] values (trainer/model/memory.py streamed_ids):
    `streamed_blocks` of the checkpointed blocks."""
    if memory.get("gradient_checkpointing", "selective") == "none" or not memory.get("streamed_blocks"):
        return 0
    checkpointed = memory.get("checkpointed_blocks")
    return min(memory["streamed_blocks"], layers if checkpointed is None else min(checkpointed, layers))


def weights_gib(shape: ModelShape, quantization: str, base_dtype: str = "bfloat16", shards: int = 1,
                streamed: int = 0) -> float:
    """Base weights one process holds on the GPU: all of them, or with `shards` > 1 its 1/shards slice plus two
    all-gathered blocks (the one running and the one prefetched: trainer/model/sharding.py), or with `streamed`
    blocks in host RAM all but theirs plus STREAM_SLOTS blocks' slots."""
    per_weight = bytes_per_weight(quantization, base_dtype)
    if shards > 1:
        return (shape.params / shards + 2 * shape.block_params) * per_weight / 2**30
    away = max(streamed - STREAM_SLOTS, 0) if streamed else 0
    return (shape.params - away * shape.block_params) * per_weight / 2**30


def streamed_gib(shape: ModelShape, quantization: str, base_dtype: str = "bfloat16", streamed: int = 0) -> float:
    """Host RAM the streamed blocks' weights take (page-locked)."""
    return streamed * shape.block_params * bytes_per_weight(quantization, base_dtype) / 2**30


def kept_hidden_tensors(memory: dict[str, Any]) -> int:
    """Hidden-size tensors each checkpointed block keeps for backward (what the activation offload moves): its input,
    with selective checkpointing the self-attention output too, with sub-layers two more sub-layer inputs."""
    kept = 1 if memory.get("gradient_checkpointing", "selective") == "full" else 2
    return kept + (2 if memory.get("checkpoint_sublayers") else 0)


def _row_streamed(row: dict[str, Any]) -> int:
    return int(row.get("streamed_blocks", streamed_count(PRESETS.get(row.get("preset", ""), {}), row_shape(row).layers)))


def _rows_of(preset: str, basis: str) -> list[dict[str, Any]]:
    """The wanforge rows of `preset`, else of the preset that sizes it until it has its own (presets.SIZED_FROM)."""
    rows = [r for r in measured_rows() if r.get("preset") == preset and r["trainer"] == "wanforge"]
    if not rows and preset in SIZED_FROM:
        return _rows_of(SIZED_FROM[preset][basis], basis)
    if not rows:
        raise KeyError(f"no measured row of memory preset {preset!r} in {CALIBRATION_FILE.name}")
    return rows


def _preset_row(shape: ModelShape, preset: str, tokens: int, shards: int = 1) -> dict[str, Any]:
    """The wanforge row of `preset` (or of its sizing basis) nearest this model (same width and depth first, then
    the same sharding), then nearest token count."""
    import math

    rows = _rows_of(preset, "memory")

    def rank(row: dict[str, Any]) -> tuple:
        s = row_shape(row)
        has_host = "host_peak_gib" in row
        return ((s.dim, s.layers) != (shape.dim, shape.layers), abs(s.dim - shape.dim), row_shards(row) != shards,
                abs(math.log(row_tokens(row) / max(tokens, 1))), s != shape, not has_host,
                "".join(chr(255 - ord(c)) for c in str(row["date"])))

    return min(rows, key=rank)


def predict_memory(shape: ModelShape, preset: str, tokens: int, batch: int = 1,
                   base_quantization: str | None = None, base_dtype: str = "bfloat16",
                   shards: int = 1) -> MemoryPrediction:
    """GPU and host memory of `preset` for this model and clip, from its nearest measured row.
    `base_quantization` is the user's own setting where it overrides the preset's; `shards` the processes the frozen
    base is sharded over (`[memory] shard_base`: bf16 weights whatever the preset says)."""

    values = PRESETS[preset]
    quant = "none" if shards > 1 else base_quantization or values.get("base_quantization", "none")
    row = _preset_row(shape, preset, tokens, shards)
    streamed = 0 if shards > 1 else streamed_count(values, shape.layers)
    if row.get("preset") == preset:
        return scale_row(row, shape, tokens, batch, quant, base_dtype, shards=shards, streamed=streamed)
    basis = PRESETS[row["preset"]]
    ratio = kept_hidden_tensors(values) / kept_hidden_tensors(basis) if values.get("activation_offload") else 0.0
    scaled = scale_row(row, shape, tokens, batch, quant, base_dtype, offload=ratio > 0, shards=shards,
                       streamed=streamed, offload_scale=ratio or 1.0)
    note = (f"{preset} has no measured row yet: sized from {row['preset']} (its GPU activations; offload x "
            f"{ratio:g} for the hidden-size tensors each block keeps; {streamed} blocks' weights streamed from host "
            f"RAM): ")
    return replace(scaled, measured=False, gpu_measured=False, basis=note + scaled.basis)


def scale_row(row: dict[str, Any], shape: ModelShape, tokens: int, batch: int, quantization: str,
              base_dtype: str = "bfloat16", offload: bool | None = None, lora_gib: float = 0.0,
              shards: int = 1, streamed: int = 0, offload_scale: float = 1.0) -> MemoryPrediction:
    """The scaling rule (module docstring): `row`'s memory moved to this model, clip, batch and base weights.
    `offload` False drops the row's activation offload (a custom mix without it); `lora_gib` adds the difference
    between this run's LoRA state and the row's; `shards` > 1: the base sharded over that many processes (weights_gib);
    `streamed`: blocks whose weights stream from host RAM; `offload_scale`: a factor on the row's offload.
    Measured only at the row's own model, shape, weights, sharding and streaming."""
    ref = row_shape(row)
    ref_tokens = row_tokens(row)
    scale = (tokens * batch * shape.dim * shape.blocks) / (ref_tokens * row["batch"] * ref.dim * ref.blocks)
    row_quant = row.get("base_quantization", "none")
    row_streamed = _row_streamed(row)
    activations = max(row["peak_gib"] - weights_gib(ref, row_quant, shards=row_shards(row), streamed=row_streamed), 0.0)
    gpu = weights_gib(shape, quantization, base_dtype, shards, streamed) + activations * scale + lora_gib
    row_offload = row.get("offload_gib", 0.0)
    offloaded = row_offload * scale * offload_scale if offload is not False else 0.0
    in_host = streamed_gib(shape, quantization, base_dtype, streamed)
    if "host_peak_gib" in row:
        base = row["host_peak_gib"] - row_offload - streamed_gib(ref, row_quant, streamed=row_streamed)
        host_basis = f"host {row['host_peak_gib']} GiB"
    else:
        base = HOST_BASE_GIB
        host_basis = f"host base {HOST_BASE_GIB} GiB (not measured with this row)"
    gpu_measured = (ref == shape and quantization == row_quant and offload is None and not lora_gib
                    and same_shape(tokens * batch, ref_tokens * row["batch"]) and row_shards(row) == shards
                    and streamed == row_streamed and offload_scale == 1.0)
    sharded = f", base sharded over {row_shards(row)}" if row_shards(row) > 1 else ""
    basis = (f"{row.get('preset', 'custom')} on {row['flavour']} {row['width']}x{row['height']}x{row['num_frames']} "
             f"({row['gpu']}{sharded}): {row['peak_gib']} GiB GPU, {host_basis} ({row['source']})")
    return MemoryPrediction(round(gpu, 2), round(offloaded, 2), round(base + offloaded + in_host, 2),
                            gpu_measured and "host_peak_gib" in row, basis, gpu_measured, row["gpu"], row,
                            round(in_host, 2))


def fits_gpu(gpu_gib: float, card_gib: float) -> bool:
    return gpu_gib <= HEADROOM * card_gib


def fits_host(pinned_gib: float, host_free_gib: float | None) -> bool:
    """The offload and the streamed weights within HOST_SHARE of the free host RAM (unknown: assumed to fit)."""
    return host_free_gib is None or pinned_gib <= HOST_SHARE * host_free_gib


# ---------------------------------------------------------------- several processes on one machine


def local_processes() -> int:
    """Training processes on this machine (torchrun / accelerate set LOCAL_WORLD_SIZE; 1 when started alone)."""
    import os

    text = os.environ.get("LOCAL_WORLD_SIZE", "1").strip()
    return max(int(text), 1) if text.isdigit() else 1


@dataclass(frozen=True)
class Contention:
    """What activation offload costs when several processes of one machine offload at once (host memory bandwidth)."""
    s_per_gib: float  # seconds each further offloading process adds to every process's step, per GiB it offloads
    basis: str

    def seconds(self, offload_gib: float, processes: int) -> float:
        return self.s_per_gib * offload_gib * max(processes - 1, 0)


@lru_cache(maxsize=1)
def offload_contention() -> Contention:
    """DERIVED from the measured `[[parallel]]` rows with offload: (s/step with N processes - s/step alone) /
    ((N - 1) x GiB offloaded per step), averaged. Linear in the offloaded bytes and in the number of further
    processes: an assumption, checked only at the rows' own model, shape, GPU and process count."""
    rows = [r for r in load_calibration().get("parallel", []) if r["offload_gib"] > 0 and r["processes"] > 1]
    if not rows:
        return Contention(0.0, "no measured multi-process row with offload: contention not modelled")
    rates = [(r["s_per_step"] - r["s_per_step_one"]) / ((r["processes"] - 1) * r["offload_gib"]) for r in rows]
    rate = max(sum(rates) / len(rates), 0.0)
    measured = "; ".join(f"{r['preset']} {r['flavour']} {r['width']}x{r['height']}x{r['num_frames']} on "
                         f"{r['processes']}x {r['gpu']}: {r['s_per_step']} vs {r['s_per_step_one']} s/step, "
                         f"{r['offload_gib']} GiB offloaded" for r in rows)
    return Contention(rate, f"derived {rate:.4f} s per GiB offloaded per further process from {measured} (bench/RESULTS.md)")


def _speed_row(shape: ModelShape, preset: str, tokens: int) -> dict[str, Any]:
    """The wanforge row of `preset` to compare presets' speed by: same model width and depth, then the kernel and GPU
    the multi-process rows were measured with (cuDNN, H100), so that every preset is timed on the same footing."""
    import math

    rows = _rows_of(preset, "speed")
    return min(rows, key=lambda r: ((row_shape(r).dim, row_shape(r).layers) != (shape.dim, shape.layers),
                                    abs(row_shape(r).dim - shape.dim),
                                    r.get("attention_backend", "_native_cudnn") != "_native_cudnn",
                                    r["gpu"] != "H100", abs(math.log(row_tokens(r) / max(tokens, 1)))))


def relative_step_seconds(shape: ModelShape, preset: str, tokens: int, batch: int = 1, processes: int = 1,
                          base_quantization: str | None = None) -> float:
    """s/step of `preset` on an H100 with cuDNN attention (FLOPs-scaled from its row), plus the offload contention of
    `processes` processes offloading at once: for ranking presets against each other, not for the estimate's hours."""
    row = _speed_row(shape, preset, tokens)
    seconds = row["s_per_step"] * shape.forward_flops(tokens) * batch / (
        row_shape(row).forward_flops(row_tokens(row)) * row["batch"])
    offload = predict_memory(shape, preset, tokens, batch, base_quantization).offload_gib
    return seconds + offload_contention().seconds(offload, processes)
