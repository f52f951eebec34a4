"""`wanforge estimate`: VRAM, s/step, total time and cost of a config on a GPU, from measured rows.

The numbers come from launcher/calibration.toml: measured step times and peaks (bench/RESULTS.md, FACTS.md), scaled
to the config's model and clip shape by FLOPs / activation size, and to another GPU by its bf16 TFLOP/s. The rule is
written at the top of that file and in `_scale` below. No torch: the notebook form and the launcher call it.

    from launcher.estimate import estimate, known_gpus
    est = estimate(cfg, "H100")          # or "H100:2" for two GPUs
    est.vram_gib, est.s_per_step, est.total_hours, est.cost_usd, est.fits
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from trainer.config import MemoryConfig, WanforgeConfig
from trainer.errors import UserError
from trainer.flavours import FLAVOURS
from trainer.presets import estimated_peak_gib, preset_of, resolve_memory

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CALIBRATION_FILE = Path(__file__).with_name("calibration.toml")
CONTEXT_GIB = 1.5  # CUDA/ROCm context + allocator slack on top of the modelled peak
TEXT_DIM = 4096  # UMT5-XXL
LORA_BYTES_PER_PARAM = 16  # fp32 weight + grad + AdamW's two moments


@dataclass(frozen=True)
class Gpu:
    name: str
    vendor: str  # "nvidia" | "amd"
    arch: str  # "hopper", "blackwell", "ada", "ampere", "cdna3": which attention kernel `auto` gets there
    memory_gib: float
    bf16_tflops: float
    usd_per_hour: float
    spec_source: str
    price_source: str


@dataclass(frozen=True)
class Estimate:
    gpu: str
    count: int  # GPUs in total (nodes x per node)
    vram_gib: float  # per GPU
    s_per_step: float
    total_hours: float  # training steps only (caching, validation and start-up not modelled)
    cost_usd_per_hour: float  # all GPUs together
    cost_usd: float
    fits: bool
    basis: str  # which measured row the numbers were scaled from
    memory_preset: str = ""  # what [memory] preset = "auto" (or the named one) becomes on this GPU; "custom" otherwise

    def line(self) -> str:
        fit = "fits" if self.fits else "DOES NOT FIT"
        gpus = f"{self.count}x {self.gpu}" if self.count > 1 else self.gpu
        return (f"{gpus:>14}: {self.vram_gib:6.1f} GiB/GPU ({fit}), {self.s_per_step:6.2f} s/step, "
                f"{self.total_hours:6.2f} h, ${self.cost_usd_per_hour:.2f}/h -> ${self.cost_usd:,.2f}"
                + (f"  [{self.memory_preset}]" if self.memory_preset else ""))


@lru_cache(maxsize=1)
def load_calibration(path: Path = CALIBRATION_FILE) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the package was built without its data file (package-data)")
    return tomllib.loads(path.read_text(encoding="utf-8"))


def known_gpus() -> dict[str, Gpu]:
    """Every GPU the kit knows, by name, with its memory, speed and reference $/h (price_source says where from)."""
    return {name: Gpu(name=name, **spec) for name, spec in load_calibration()["gpus"].items()}


def parse_gpu(spec: str) -> tuple[Gpu, int]:
    """"H100" or "H100:2" -> (the GPU, count). Unknown names are a UserError with the list."""
    name, _, count_text = spec.strip().partition(":")
    gpus = known_gpus()
    by_lower = {k.lower(): k for k in gpus}
    if name.lower() not in by_lower:
        import difflib

        close = difflib.get_close_matches(name.upper(), list(gpus), n=1, cutoff=0.6)
        hint = f'did you mean "{close[0]}"? ' if close else ""
        raise UserError(f'--gpu "{spec}": unknown GPU. {hint}Known: {", ".join(gpus)} (add one in launcher/calibration.toml)')
    if count_text and (not count_text.isdigit() or int(count_text) < 1):
        raise UserError(f'--gpu "{spec}": the count after ":" must be a whole number >= 1, e.g. H100:2')
    return gpus[by_lower[name.lower()]], int(count_text or 1)


# ---------------------------------------------------------------- the model's size


@dataclass(frozen=True)
class Shape:
    params: float  # transformer parameters
    dim: int
    layers: int
    tokens: int  # per sample, after patching
    lora_params: float


# The real transformer shapes (FACTS.md) by size, for flavours that don't carry them.
_SIZES = {"1.3b": (1536, 8960, 30), "14b": (5120, 13824, 40), "5b": (3072, 14336, 30)}


def _dims(flavour_name: str) -> tuple[int, int, int, int]:
    """(dim, ffn, layers, VAE spatial factor) of a flavour: its own fields, else by the size in its name."""
    f = FLAVOURS[flavour_name]
    if f.hub_id is None:
        return 32, 64, 2, getattr(f, "vae_spatial", 8)  # the tiny test models (trainer/tiny.py), built locally
    if hasattr(f, "dim") and hasattr(f, "num_layers"):
        return f.dim, f.ffn_dim, f.num_layers, getattr(f, "vae_spatial", 8)
    for size, (dim, ffn, layers) in _SIZES.items():
        if size in flavour_name.lower():
            return dim, ffn, layers, 16 if size == "5b" else 8
    raise ValueError(f"flavour {flavour_name}: no transformer shape known for the estimate (add dim/num_layers to it)")


def _transformer_params(dim: int, ffn: int, layers: int) -> float:
    """Wan DiT parameters: per block self + cross attention (4 d x d each) and the FFN, plus text/time embeddings."""
    block = 8 * (dim * dim + dim) + 2 * dim * ffn + ffn + dim
    return layers * block + TEXT_DIM * dim + dim * dim + 256 * dim + 7 * dim * dim


def _lora_params(cfg: WanforgeConfig, dim: int, ffn: int, layers: int) -> float:
    total = 0.0
    for name in cfg.lora.target_modules:
        if name.endswith("net.0.proj"):
            total += cfg.lora.rank * (dim + ffn)
        elif name.endswith("net.2"):
            total += cfg.lora.rank * (ffn + dim)
        else:
            total += 2 * cfg.lora.rank * dim
    return total * layers


def config_shape(cfg: WanforgeConfig) -> Shape:
    """The largest sample of the config's datasets: the step that decides the peak."""
    dim, ffn, layers, spatial = _dims(cfg.model.flavour)
    tokens = 0
    for i in range(len(cfg.datasets)):
        frames, height, width = cfg.dataset_shape(i)
        tokens = max(tokens, ((frames - 1) // 4 + 1) * (height // (spatial * 2)) * (width // (spatial * 2)))
    return Shape(_transformer_params(dim, ffn, layers), dim, layers, tokens, _lora_params(cfg, dim, ffn, layers))


def _row_shape(row: dict[str, Any]) -> Shape:
    dim, ffn, layers, spatial = _dims(row["flavour"])
    tokens = ((row["num_frames"] - 1) // 4 + 1) * (row["height"] // (spatial * 2)) * (row["width"] // (spatial * 2))
    lora = layers * row["lora_rank"] * (8 * 2 * dim + 2 * (dim + ffn))  # the default target modules
    return Shape(_transformer_params(dim, ffn, layers), dim, layers, tokens, lora)


def _forward_flops(s: Shape) -> float:
    return 2 * s.params * s.tokens + 4 * s.layers * s.dim * s.tokens**2


def _size_of(flavour: str) -> tuple[int, int, int]:
    dim, ffn, layers, _ = _dims(flavour)
    return dim, ffn, layers


def memory_on(cfg: WanforgeConfig, card: Gpu) -> MemoryConfig:
    """The [memory] settings the trainer will use on this GPU: `preset = "auto"` resolves by its memory (the target
    machine's host RAM is unknown here, so host-RAM limits on activation offload are not applied)."""
    return resolve_memory(cfg.memory, FLAVOURS[cfg.model.flavour], card.memory_gib, tokens=config_shape(cfg).tokens,
                          batch=cfg.train.train_batch_size, warn=False)  # "does not fit" is in the table


def expected_attention(memory: MemoryConfig, card: Gpu | None) -> str:
    """The attention kernel the trainer image runs with on `card` (trainer/attention.py's `auto`: FlashAttention 4 on
    Hopper, which the CUDA image installs; cuDNN SDPA on other NVIDIA GPUs)."""
    if memory.attention_backend != "auto":
        return memory.attention_backend
    if card is None or card.vendor != "nvidia":
        return "native"
    return "flash_4_hub" if card.arch == "hopper" else "_native_cudnn"


def pick_row(cfg: WanforgeConfig, memory: MemoryConfig | None = None, card: Gpu | None = None) -> dict[str, Any]:
    """The measured row nearest the config: same model size, the same memory preset (else the same checkpointing),
    the attention kernel the run gets on `card`, wanforge's own before the naive loop, newest first."""
    rows = load_calibration()["measured"]
    size = _size_of(cfg.model.flavour)
    memory = memory or cfg.memory
    gc = str(memory.gradient_checkpointing)
    preset = preset_of(memory)
    attention = expected_attention(memory, card)

    def rank(row: dict[str, Any]) -> tuple[int, int, int, int, int, str]:
        row_gc = row["gradient_checkpointing"]
        if preset is not None and row.get("preset") == preset:
            setting = 0
        elif row.get("preset") and preset is None and row_gc == gc:
            setting = 2  # a preset row for a custom mix with the same checkpointing: after rows without a preset
        else:
            setting = 1 if row_gc == gc else 3 if {row_gc, gc} == {"full", "selective"} else 4
        return (
            0 if _size_of(row["flavour"]) == size else 1,
            setting,
            0 if row.get("base_quantization", "none") == memory.base_quantization else 1,
            0 if row.get("attention_backend", "_native_cudnn") == attention else 1,
            0 if row["trainer"] == "wanforge" else 1,
            "".join(chr(255 - ord(c)) for c in str(row["date"])),  # newest first
        )

    return min(rows, key=rank)


FP8_ARCHS = {"ada", "hopper", "blackwell"}  # NVIDIA GPUs with fp8 matmuls (trainer/fp8.py refuses the others)


def _bytes_per_weight(cfg: WanforgeConfig, memory: MemoryConfig) -> int:
    if memory.base_quantization == "int8":
        return 1
    if memory.base_quantization == "fp8":
        return 2  # two 1-byte copies: the forward and the input-gradient layouts
    return {"bfloat16": 2, "float16": 2, "float32": 4}[cfg.model.base_dtype]


def estimate(cfg: WanforgeConfig, gpu: str) -> Estimate:
    """VRAM per GPU, s/step, hours and dollars for training `cfg` on `gpu` ("H100" or "H100:2")."""
    card, count = parse_gpu(gpu)
    gpus = known_gpus()
    memory = memory_on(cfg, card)
    row = pick_row(cfg, memory, card)
    row_gpu = gpus[row["gpu"]]
    want, ref = config_shape(cfg), _row_shape(row)
    micro = cfg.train.train_batch_size * cfg.train.gradient_accumulation_steps

    s_per_step = (row["s_per_step"] * _forward_flops(want) / _forward_flops(ref)
                  * row_gpu.bf16_tflops / card.bf16_tflops * micro / row["batch"])

    gib = 1024**3
    ref_weights = ref.params * (1 if row.get("base_quantization") == "int8" else 2) / gib
    ref_lora = ref.lora_params * LORA_BYTES_PER_PARAM / gib
    ref_act = max(row["peak_gib"] - ref_weights - ref_lora, 0.0)
    act = ref_act * (cfg.train.train_batch_size * want.tokens * want.dim * want.layers) / (
        row["batch"] * ref.tokens * ref.dim * ref.layers)
    vram = want.params * _bytes_per_weight(cfg, memory) / gib + want.lora_params * LORA_BYTES_PER_PARAM / gib + act
    preset = preset_of(memory)
    memory_basis = ""
    if preset is not None and row.get("preset") != preset and cfg.model.base_dtype != "float32":
        # no row measured this preset at this model size: use the preset table `auto` chose it with, so the two agree
        vram = estimated_peak_gib(FLAVOURS[cfg.model.flavour], preset, want.tokens, cfg.train.train_batch_size)
        memory_basis = f"; VRAM from the {preset} preset's measured peaks (trainer/presets.py), scaled to this model"

    fp8_runs = memory.base_quantization != "fp8" or (card.vendor == "nvidia" and card.arch in FP8_ARCHS)
    hours = s_per_step * cfg.train.max_train_steps / 3600
    per_hour = card.usd_per_hour * count
    return Estimate(
        gpu=card.name, count=count, vram_gib=round(vram, 2), s_per_step=round(s_per_step, 3),
        total_hours=round(hours, 3), cost_usd_per_hour=round(per_hour, 2), cost_usd=round(hours * per_hour, 2),
        fits=vram + CONTEXT_GIB <= card.memory_gib and fp8_runs,
        memory_preset=preset or "custom",
        basis=(f"memory preset {preset or 'custom'}; {row['trainer']} {row['flavour']} on {row['gpu']}: "
               f"{row['s_per_step']} s/step, {row['peak_gib']} GiB ({row['source']}){memory_basis}"
               + ("" if fp8_runs else f"; fp8 base weights need an Ada, Hopper or Blackwell GPU, not {card.name}")),
    )


def estimate_all(cfg: WanforgeConfig, names: list[str] | None = None, count: int = 1) -> list[Estimate]:
    """One estimate per known GPU (or per name given), cheapest total first."""
    names = names or list(known_gpus())
    found = [estimate(cfg, f"{n}:{count}") for n in names]
    return sorted(found, key=lambda e: (not e.fits, e.cost_usd, e.cost_usd_per_hour))


def cheapest_fitting(cfg: WanforgeConfig, names: list[str], count: int = 1) -> Estimate:
    """`--gpu auto`: the cheapest (total cost) GPU among `names` that the estimate says fits."""
    fitting = [e for e in estimate_all(cfg, names, count) if e.fits]
    if not fitting:
        raise UserError(f"--gpu auto: no GPU in {', '.join(names)} fits this config by the estimate "
                        "(set memory.gradient_checkpointing = \"full\", lower the resolution/frames, or pick a larger GPU)")
    return fitting[0]

