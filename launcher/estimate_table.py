"""Estimates as people read them: aligned text columns for the notebooks and the CLI, and for the tiny models (CPU
trials, which a GPU estimate says nothing about) one line saying so. No torch, no widgets."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainer.config.schema import WanforgeConfig

if TYPE_CHECKING:
    from launcher.estimate import Estimate

ESTIMATE_HEADER = ("GPU", "VRAM/GPU", "host RAM", "s/step", "time", "$/h", "total $", "memory preset", "fits",
                   "rows (memory, s/step)")
TEXT_COLUMNS = (0, 7, 8, 9)  # the GPU name, the preset, the verdict and the rows read left-aligned; numbers right


def cpu_trial_note(cfg: WanforgeConfig) -> str | None:
    """What to say instead of a GPU estimate for the tiny models: they are CPU trials, a GPU estimate of them is 0."""
    from trainer.flavours import get_flavour

    if get_flavour(cfg.model.flavour).tiny is None:
        return None
    frames, height, width = cfg.dataset_shape()
    return (f"{cfg.model.flavour} is a CPU trial ({width}x{height}x{frames}, {cfg.train.max_train_steps} steps): "
            "it trains on this machine's CPU, no GPU needed. Choose a real Wan flavour ([model] flavour) for a GPU "
            "estimate.")


def _duration(hours: float) -> str:
    minutes = hours * 60
    return "<1 min" if minutes < 1 else f"{minutes:.0f} min" if minutes < 60 else f"{hours:.1f} h"


def estimate_cells(est: Estimate) -> tuple[str, ...]:
    """One row of ESTIMATE_HEADER."""
    gpus = f"{est.count}x {est.gpu}" if est.count > 1 else est.gpu
    speed = f"{est.s_per_step:.2f}" + ("" if est.speed_measured else "*")
    return (gpus, f"{est.vram_gib:.1f} GiB", f"{est.host_gib:.0f}/{est.host_ram_gib:.0f} GiB", speed,
            _duration(est.total_hours), f"{est.cost_usd_per_hour:.2f}", f"{est.cost_usd:,.2f}", est.memory_preset,
            est.fit_label, ", ".join(ref.removeprefix("row ") for ref in est.refs()))


def estimate_table(rows: list[Estimate]) -> list[str]:
    """Estimates as aligned text columns (numbers right-aligned), a header line first."""
    table = [ESTIMATE_HEADER, *(estimate_cells(e) for e in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(ESTIMATE_HEADER))]
    return ["  ".join(c.ljust(wd) if i in TEXT_COLUMNS else c.rjust(wd) for i, (c, wd) in enumerate(zip(r, widths))).rstrip()
            for r in table]


def estimate_text(cfg: WanforgeConfig, gpu: str, others: int = 0) -> str:
    """The estimate as a notebook prints it: the CPU-trial line for the tiny models, else the table for `gpu`
    ("H100" or "H100:2") and the `others` cheapest GPUs after it."""
    from launcher.estimate import estimate, estimate_all

    note = cpu_trial_note(cfg)
    if note:
        return note
    chosen = estimate(cfg, gpu)
    rest = [e for e in estimate_all(cfg) if e.gpu != chosen.gpu][:others]
    lines = estimate_table([chosen, *rest])
    if rest:
        lines.insert(2, "")  # the chosen GPU, then the cheapest others
    from launcher.estimate import cited_rows

    return "\n".join([*lines, "training steps only; * s/step extrapolated, not measured; rows: the measured rows "
                       "(launcher/calibration.toml [[measured]], N-th) memory and s/step are scaled from:",
                       *(f"  row {line.removeprefix('row ')}" for line in cited_rows([chosen, *rest])),
                       f"{chosen.gpu}: {chosen.basis}"])
