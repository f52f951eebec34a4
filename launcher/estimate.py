"""`wanforge estimate`: GPU and host memory, s/step, total time and cost of a config on a GPU, from measured rows.

Memory comes from trainer/model/sizing.py (the model `[memory] preset = "auto"` uses on the node), step time from the
nearest measured row (launcher/calibration.toml) scaled by FLOPs and, for another GPU, by datasheet bf16 TFLOP/s.
Every estimate says what was measured and what is extrapolated. No torch: the notebook form and the launcher call it.

    from launcher.estimate import estimate, known_gpus
    est = estimate(cfg, "H100")          # or "H100:2" for two GPUs
    est.vram_gib, est.host_gib, est.s_per_step, est.total_hours, est.cost_usd, est.fits, est.measured
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from trainer.config.model import MemoryConfig
from trainer.config.schema import WanforgeConfig
from trainer.errors import UserError
from trainer.flavours import FLAVOURS
from trainer.model import sizing
from trainer.model.preset_choice import resolve_memory
from trainer.model.presets import preset_of
from trainer.model.sizing import ModelShape, config_tokens, flavour_shape, row_shape, row_tokens, same_shape

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
    host_ram_gib: float  # host RAM of a typical one-GPU cloud node with this card (host_source says which)
    host_source: str


@dataclass(frozen=True)
class Estimate:
    gpu: str
    count: int  # GPUs in total (nodes x per node)
    vram_gib: float  # per GPU
    host_gib: float  # per GPU process: peak resident host memory (the activation offload's pinned buffers + the rest)
    host_ram_gib: float  # the host RAM this estimate assumed for the node (the card's typical cloud node)
    s_per_step: float
    total_hours: float  # training steps only (caching, validation and start-up not modelled)
    cost_usd_per_hour: float  # all GPUs together
    cost_usd: float
    fits: bool  # predicted to fit the GPU and the node's host RAM (measured or not: see `measured`)
    basis: str  # which measured row the numbers were scaled from
    memory_preset: str = ""  # what [memory] preset = "auto" (or the named one) becomes on this GPU; "custom" otherwise
    measured: bool = False  # GPU and host memory measured at this model, clip shape and preset (else scaled)
    gpu_measured: bool = False  # the GPU peak alone measured there (rows older than the host-memory column)
    speed_measured: bool = False  # s/step measured on this GPU at this shape and preset (else extrapolated)
    contention_s: float = 0.0  # of s_per_step: the count processes offloading at once (derived, trainer/model/sizing.py)
    speed_row: dict[str, Any] | None = dataclasses.field(default=None, compare=False)  # the row s/step is scaled from
    memory_row: dict[str, Any] | None = dataclasses.field(default=None, compare=False)  # the row memory is scaled from

    @property
    def fit_label(self) -> str:
        """"fits" only where measured; a prediction that fits but was never measured says so."""
        if not self.fits:
            return "DOES NOT FIT"
        if self.measured:
            return "fits"
        return "fits: GPU measured, host RAM extrapolated" if self.gpu_measured else "not measured (extrapolated)"

    def refs(self) -> tuple[str, str]:
        """(memory, s/step): the launcher/calibration.toml [[measured]] rows each figure is scaled from, as "row N"."""
        def ref(row: dict[str, Any] | None) -> str:
            return f"row {sizing.row_number(row)}" if row is not None else "no row"

        return ref(self.memory_row), ref(self.speed_row)

    def line(self) -> str:
        gpus = f"{self.count}x {self.gpu}" if self.count > 1 else self.gpu
        speed = "measured" if self.speed_measured else "extrapolated"
        memory_ref, speed_ref = self.refs()
        return (f"{gpus:>14}: {self.vram_gib:6.1f} GiB/GPU, {self.host_gib:5.1f} of {self.host_ram_gib:.0f} GiB host, "
                f"{self.fit_label} [{memory_ref}]; {self.s_per_step:6.2f} s/step {speed}"
                f"{f' incl. +{self.contention_s:.2f} s offload contention' if self.contention_s else ''} [{speed_ref}]; "
                f"{self.total_hours:6.2f} h, ${self.cost_usd_per_hour:.2f}/h -> ${self.cost_usd:,.2f}"
                + (f"  [{self.memory_preset}]" if self.memory_preset else ""))


def cited_rows(estimates: list[Estimate]) -> list[str]:
    """One line per [[measured]] row the estimates cite ("row N: what it measured (source)"), in file order: the
    footer of a table of estimates, so each figure's row is named and the two agree by construction."""
    rows = {sizing.row_number(r): r for e in estimates for r in (e.memory_row, e.speed_row) if r is not None}
    return [f"row {n}: {sizing.row_summary(rows[n])}" for n in sorted(rows)]


def known_gpus() -> dict[str, Gpu]:
    """Every GPU the kit knows, by name, with its memory, speed and reference $/h (price_source says where from)."""
    return {name: Gpu(name=name, **spec) for name, spec in sizing.load_calibration()["gpus"].items()}


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
    model: ModelShape
    tokens: int  # per sample, after patching
    lora_params: float

    @property
    def params(self) -> float:
        return self.model.params


def _lora_params(cfg: WanforgeConfig, model: ModelShape) -> float:
    total = 0.0
    for name in cfg.lora.target_modules:
        if name.endswith("net.0.proj"):
            total += cfg.lora.rank * (model.dim + model.ffn)
        elif name.endswith("net.2"):
            total += cfg.lora.rank * (model.ffn + model.dim)
        else:
            total += 2 * cfg.lora.rank * model.dim
    vace = model.vace_blocks if getattr(cfg.lora, "vace_blocks", True) else 0  # the adapter in the VACE blocks too
    return total * (model.layers + vace)


def config_shape(cfg: WanforgeConfig) -> Shape:
    """The largest sample of the config's datasets: the step that decides the peak."""
    model = flavour_shape(cfg.model.flavour)
    return Shape(model, config_tokens(cfg), _lora_params(cfg, model))


def _row_shape(row: dict[str, Any]) -> Shape:
    model = row_shape(row)
    lora = model.layers * row["lora_rank"] * (8 * 2 * model.dim + 2 * (model.dim + model.ffn))  # default targets
    return Shape(model, row_tokens(row), lora)


def _size_of(flavour: str) -> tuple[int, int, int]:
    m = flavour_shape(flavour)
    return m.dim, m.ffn, m.layers


def memory_on(cfg: WanforgeConfig, card: Gpu, count: int = 1) -> MemoryConfig:
    """The [memory] settings the trainer will use on this GPU: `preset = "auto"` resolves by its memory, the host
    RAM of the card's typical cloud node (`host_ram_gib`) and the `count` processes offloading at once, as the node
    does with its own."""
    return resolve_memory(cfg.memory, FLAVOURS[cfg.model.flavour], card.memory_gib, tokens=config_shape(cfg).tokens,
                          batch=cfg.train.train_batch_size, host_gib=card.host_ram_gib - sizing.idle_expert_gib(cfg),
                          warn=False, processes=count, world_size=count,  # "does not fit" is in the table
                          both_experts=cfg.model.train_both_experts)


def expected_attention(memory: MemoryConfig, card: Gpu | None) -> str:
    """The attention kernel the trainer image runs with on `card` (trainer/model/attention.py's `auto`: FlashAttention 4 on
    Hopper, which the CUDA image installs; cuDNN SDPA on other NVIDIA GPUs)."""
    if memory.attention_backend != "auto":
        return memory.attention_backend
    if card is None or card.vendor != "nvidia":
        return "native"
    return "flash_4_hub" if card.arch == "hopper" else "_native_cudnn"


def pick_row(cfg: WanforgeConfig, memory: MemoryConfig | None = None, card: Gpu | None = None,
             shards: int = 1) -> dict[str, Any]:
    """The measured row nearest the config: same model size, the same memory preset (else the same checkpointing),
    the same sharding of the base, the attention kernel the run gets on `card`, wanforge's own before the naive loop,
    newest first."""
    rows = sizing.load_calibration()["measured"]
    size = _size_of(cfg.model.flavour)
    memory = memory or cfg.memory
    gc = str(memory.gradient_checkpointing)
    preset = preset_of(memory)
    attention = expected_attention(memory, card)

    tokens, model = config_shape(cfg).tokens, flavour_shape(cfg.model.flavour)

    def rank(row: dict[str, Any]) -> tuple:
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
            sizing.row_shards(row) != shards,
            0 if row_shape(row) == model else 1,  # the same inputs (I2V condition channels, CLIP tokens)
            0 if row.get("base_quantization", "none") == memory.base_quantization else 1,
            0 if row.get("attention_backend", "_native_cudnn") == attention else 1,
            0 if row["trainer"] == "wanforge" else 1,
            0 if card is None or row["gpu"] == card.name else 1,
            abs(math.log(row_tokens(row) / max(tokens, 1))),  # the nearest clip shape
            "".join(chr(255 - ord(c)) for c in str(row["date"])),  # newest first
        )

    return min(rows, key=rank)


FP8_ARCHS = {"ada", "hopper", "blackwell"}  # NVIDIA GPUs with fp8 matmuls (trainer/fp8.py refuses the others)


def estimate(cfg: WanforgeConfig, gpu: str) -> Estimate:
    """GPU and host memory per GPU, s/step, hours and dollars for training `cfg` on `gpu` ("H100" or "H100:2")."""
    card, count = parse_gpu(gpu)
    gpus = known_gpus()
    memory = memory_on(cfg, card, count)
    shards = count if memory.shard_base else 1  # trainer/model/sharding.py: the base sharded over every process
    row = pick_row(cfg, memory, card, shards)
    row_gpu = gpus[row["gpu"]]
    want, ref = config_shape(cfg), _row_shape(row)
    micro = cfg.train.train_batch_size * cfg.train.gradient_accumulation_steps
    batch = cfg.train.train_batch_size
    preset = preset_of(memory)

    s_per_step = (row["s_per_step"] * want.model.forward_flops(want.tokens) / ref.model.forward_flops(ref.tokens)
                  * row_gpu.bf16_tflops / card.bf16_tflops * micro / row["batch"])
    speed_measured = (row["gpu"] == card.name and row.get("preset") == preset and preset is not None
                      and row_shape(row) == want.model and sizing.row_shards(row) == shards
                      and same_shape(want.tokens * micro, ref.tokens * row["batch"]))

    if preset is not None:  # the sizing model `auto` chose the preset with
        predicted = sizing.predict_memory(want.model, preset, want.tokens, batch, memory.base_quantization,
                                          cfg.model.base_dtype, shards)
    else:  # a custom [memory] mix: the nearest row by the same rule, never counted as measured
        lora_gib = (want.lora_params - ref.lora_params) * LORA_BYTES_PER_PARAM / 1024**3
        predicted = sizing.scale_row(row, want.model, want.tokens, batch, memory.base_quantization,
                                     cfg.model.base_dtype, offload=memory.activation_offload, lora_gib=lora_gib,
                                     shards=shards, streamed=sizing.streamed_count(memory.model_dump(), want.model.layers))
        predicted = dataclasses.replace(predicted, measured=False, gpu_measured=False)
    idle = sizing.idle_expert_gib(cfg, memory.base_quantization)  # train_both_experts: the other expert in host RAM
    vram, offload, host = predicted.gpu_gib, predicted.offload_gib, predicted.host_gib + idle
    on_card = predicted.gpu == card.name  # measured on another GPU model: scaled, so not "measured" here
    measured, gpu_measured = predicted.measured and on_card and not idle, predicted.gpu_measured and on_card
    memory_basis = f"; memory: {'custom [memory] mix, ' if preset is None else ''}{predicted.label}, from {predicted.basis}"

    contention = sizing.offload_contention()
    extra = contention.seconds(offload, count)  # the count GPUs are taken as one machine's (H100:2, one node)
    s_per_step += extra
    parallel_measured = count == 1 or _parallel_measured(row, want, preset, count)
    speed_measured = speed_measured and parallel_measured and not extra and not idle  # + the expert switches
    contention_note = (f"; {count} processes offloading {offload:.1f} GiB/step each: +{extra:.2f} s/step host-memory "
                       f"contention ({contention.basis}"
                       f"{'' if parallel_measured else '; extrapolated to this model, shape, GPU or count'})"
                       if extra else "")
    fp8_runs = memory.base_quantization != "fp8" or (card.vendor == "nvidia" and card.arch in FP8_ARCHS)
    oom = sizing.sharded_out_of_memory(want.model, want.tokens, shards, card.memory_gib) if shards > 1 else None
    oom_note = (f"; measured: preset {oom['preset']} with the base sharded over {oom['shards']} ran out of GPU memory "
                f"under a {oom['cap_gib']} GiB cap per process ({oom['source']})" if oom else "")
    hours = s_per_step * cfg.train.max_train_steps / 3600
    per_hour = card.usd_per_hour * count
    host_note = (f"; host RAM {card.host_ram_gib:.0f} GiB assumed ({card.host_source})"
                 + (f"; host includes the idle expert's {idle:.1f} GiB (train_both_experts)" if idle else ""))
    speed_note = "" if speed_measured else (
        f"; s/step extrapolated (FLOPs{'' if row['gpu'] == card.name else f', {row_gpu.name} -> {card.name} by datasheet bf16 TFLOP/s'})")
    return Estimate(
        gpu=card.name, count=count, vram_gib=round(vram, 2), host_gib=round(host, 1), host_ram_gib=card.host_ram_gib,
        s_per_step=round(s_per_step, 3), total_hours=round(hours, 3), cost_usd_per_hour=round(per_hour, 2),
        cost_usd=round(hours * per_hour, 2),
        fits=(sizing.fits_gpu(vram, card.memory_gib) and sizing.fits_host(predicted.pinned_gib, card.host_ram_gib - idle)
              and fp8_runs
              and oom is None),
        memory_preset=(preset or "custom") + (f", base sharded over {shards}" if shards > 1 else ""),
        speed_row=row, memory_row=predicted.row,
        measured=measured, gpu_measured=gpu_measured, speed_measured=speed_measured,
        contention_s=round(extra, 3),
        basis=(f"memory preset {preset or 'custom'}; {row['trainer']} {row['flavour']} on {row['gpu']}: "
               f"{row['s_per_step']} s/step, {row['peak_gib']} GiB ({row['source']}){memory_basis}{speed_note}{contention_note}{host_note}"
               f"{oom_note}"
               + ("" if fp8_runs else f"; fp8 base weights need an Ada, Hopper or Blackwell GPU, not {card.name}")),
    )


def _parallel_measured(row: dict[str, Any], want: Shape, preset: str | None, count: int) -> bool:
    """A `[[parallel]]` row measured this preset, model, clip shape, GPU and process count."""
    return any(p["preset"] == preset and p["gpu"] == row["gpu"] and p["processes"] == count
               and row_shape(p) == want.model and same_shape(row_tokens(p), want.tokens)
               for p in sizing.load_calibration().get("parallel", []))


def estimate_all(cfg: WanforgeConfig, names: list[str] | None = None, count: int = 1) -> list[Estimate]:
    """One estimate per known GPU (or per name given), cheapest total first."""
    names = names or list(known_gpus())
    found = [estimate(cfg, f"{n}:{count}") for n in names]
    return sorted(found, key=lambda e: (not e.fits, e.cost_usd, e.cost_usd_per_hour))


def cheapest_fitting(cfg: WanforgeConfig, names: list[str], count: int = 1, measured_only: bool = True) -> Estimate:
    """`--gpu auto`: the cheapest (total cost) GPU among `names` that the estimate says fits; with `measured_only`
    (the default) only among GPUs with measured rows, never a card known only from its datasheet."""
    if measured_only:
        measured = sizing.measured_gpus()
        unmeasured = [n for n in names if n not in measured]
        names = [n for n in names if n in measured]
        if not names:
            raise UserError(f"--gpu auto: none of {', '.join(unmeasured)} has a measured row (measured: "
                            f"{', '.join(sorted(measured))}); name a GPU with --gpu to use a datasheet extrapolation")
    fitting = [e for e in estimate_all(cfg, names, count) if e.fits]
    if not fitting:
        raise UserError(f"--gpu auto: no GPU in {', '.join(names)} fits this config by the estimate "
                        "(set memory.gradient_checkpointing = \"full\", lower the resolution/frames, or pick a larger GPU)")
    return fitting[0]

