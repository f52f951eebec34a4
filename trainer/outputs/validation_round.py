"""A validation round: every prompt in every render (`[[validation.renders]]`: e.g. full steps, and a speed LoRA at 4
steps) with the chosen weights (live, EMA or both), one contact sheet whose rows name each video's settings, a
videos.json beside them (file -> settings), and the reports (metrics.jsonl, trackers, webhooks). Used during training
and by `wanforge validate CONFIG --lora PATH`."""

from __future__ import annotations

import logging
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config.schema import WanforgeConfig
from trainer.data.cache import text_embeds
from trainer.fileio import atomic_write_json
from trainer.data.discovery import scan_dataset
from trainer.errors import UserError
from trainer.model.attention import resolve_attention_backend, set_attention_backend
from trainer.model.components import load_transformer, load_vae
from trainer.model.ema import AdapterEMA, validation_variants, weights_for
from trainer.outputs.contact_sheet import contact_sheet
from trainer.outputs.pipelines import lora_load_kwargs
from trainer.outputs.validation_adapters import adapter_file
from trainer.outputs.validation_videos import Rendered, ValidationSettings, build_pipeline, render, settings_for
from trainer.outputs.webhooks import Webhooks
from trainer.rundir import RunDir

log = logging.getLogger(__name__)
CONTACT_SHEET = "contact_sheet.png"
MANIFEST = "videos.json"


@dataclass
class RoundResult:
    videos: list[Rendered]
    sheet: Path

    @property
    def paths(self) -> list[Path]:
        return [r.path for r in self.videos]

    def settings_by_path(self, relative_to: Path) -> dict[str, dict]:
        """Each video's file (relative to `relative_to`) -> the settings it was rendered with."""
        return {str(r.path.relative_to(relative_to)): video_record(r) for r in self.videos}


def label(r: Rendered) -> str:
    """A video's name in trackers and webhooks: the prompt, its render and the weights variant."""
    return r.prompt.name + (f" ({r.render})" if r.render else "") + (f" [{r.variant}]" if r.variant else "")


def sheet_label(r: Rendered) -> str:
    """A contact-sheet row: the video's name, then the settings it was rendered with."""
    name = r.prompt.name + (f" [{r.variant}]" if r.variant else "")
    return f"{name} | {r.settings.label()}" if r.settings is not None else name


def video_record(r: Rendered) -> dict:
    record = {"prompt": r.prompt.text, "variant": r.variant}
    return record | (r.settings.describe() if r.settings is not None else {})


def resolve_adapters(settings: ValidationSettings) -> None:
    """Fetch every render's Hub adapters now (and find the local ones), so a missing file stops the run before
    training rather than at its first validation."""
    for render_settings in settings.each_render():
        for spec in render_settings.adapters:
            adapter_file(spec.path)


def prompt_embeds(cfg: WanforgeConfig, settings: ValidationSettings, device: torch.device) -> dict[str, torch.Tensor]:
    texts = list(dict.fromkeys([p.text for p in settings.prompts] + [settings.negative_prompt]))
    return dict(zip(texts, text_embeds(cfg, texts, device)))


def validation_round(
    pipe, settings: ValidationSettings, embeds: dict[str, torch.Tensor], out_dir: Path, device: torch.device,
    autocast_dtype: torch.dtype | None, variants: list[tuple[str, AbstractContextManager]],
) -> RoundResult:
    """Render every prompt in every render under each (variant, weights context); the same seed, so variants and renders
    compare frame by frame. Writes the contact sheet and videos.json (file -> settings) beside the videos."""
    videos: list[Rendered] = []
    taken: set[str] = set()
    for variant, weights in variants:
        with weights:
            for render_settings in settings.each_render():
                videos += render(pipe, render_settings, embeds, out_dir, device, autocast_dtype, variant, taken)
    # VACE: the control (and mask) the videos were rendered from, above them (trainer.outputs.pipelines)
    rows = list(getattr(pipe, "wanforge_sheet_rows", []))
    sheet = contact_sheet(rows + [(sheet_label(r), r.frames) for r in videos], out_dir / CONTACT_SHEET)
    result = RoundResult(videos, sheet)
    atomic_write_json(out_dir / MANIFEST, result.settings_by_path(out_dir))
    return result


class TrainingValidator:
    """Validation during training, on the main process; the others wait (with a sharded or context-parallel model they
    render along: its forward needs every rank of its group). When it is due: trainer.loop.periodic."""

    def __init__(self, cfg: WanforgeConfig, run: RunDir, settings: ValidationSettings, device: torch.device,
                 base_dtype: torch.dtype, ema: AdapterEMA | None, webhooks: Webhooks):
        self.cfg, self.run, self.settings, self.device = cfg, run, settings, device
        self.autocast = base_dtype if base_dtype != torch.float32 else None
        self.ema, self.webhooks = ema, webhooks
        self.last: RoundResult | None = None
        self.video_settings: dict[str, dict] = {}  # every video of the run (relative path) -> its settings (run.json)
        resolve_adapters(settings)

    def __call__(self, accelerator, transformer, step: int) -> list[Path]:
        from trainer.model.context_parallel import is_context_parallel
        from trainer.model.sharding import is_sharded
        from trainer.outputs.tracking import log_validation

        model = accelerator.unwrap_model(transformer)
        if not accelerator.is_main_process:
            if is_sharded(model) or is_context_parallel(model):  # collective forwards: render along, keep nothing
                with tempfile.TemporaryDirectory() as scratch:
                    self._render(model, Path(scratch))
            accelerator.wait_for_everyone()
            return []
        started = time.perf_counter()
        result = self._render(model, self.run.validation / f"step-{step}")
        seconds = round(time.perf_counter() - started, 3)  # the round's wall time (the videos are written: synced)
        rel = lambda p: str(p.relative_to(self.run.root))  # noqa: E731
        settings = result.settings_by_path(self.run.root)
        self.video_settings.update(settings)
        self.run.log_metrics({"step": step, "validation_videos": [rel(p) for p in result.paths],
                              "contact_sheet": rel(result.sheet), "validation_settings": settings,
                              "validation_s": seconds})
        log_validation(accelerator, self.cfg, [(label(r), r.path) for r in result.videos], result.sheet, step)
        self.webhooks.send("validation", f"validation at step {step}: " + ", ".join(label(r) for r in result.videos),
                           step=step, images=[result.sheet])
        self.last = result
        accelerator.wait_for_everyone()
        return result.paths

    def _render(self, model, out_dir: Path) -> RoundResult:
        embeds = prompt_embeds(self.cfg, self.settings, self.device)
        vae = load_vae(self.cfg.model, torch.float32).to(self.device)
        pipe = build_pipeline(model, vae, self.settings, self.cfg)
        variants = [(v, weights_for(v, self.ema)) for v in validation_variants(self.ema, self.cfg.ema.validation)]
        result = validation_round(pipe, self.settings, embeds, out_dir, self.device, self.autocast, variants)
        del pipe, vae
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return result


def validate_lora(cfg: WanforgeConfig, lora: Path, out_dir: Path | None = None) -> list[Path]:
    """`wanforge validate`: the config's validation settings (its renders and their adapters too) with a saved LoRA
    (either format), outside training. The plain transformer and diffusers' own LoRA loader, not
    `build_trainable_transformer`: this checks the saved file the way a user's pipeline loads it, and a trainable model
    would add a fresh adapter beside it. Writes the videos, the contact sheet and videos.json (file -> settings)."""
    if not lora.is_file():
        raise UserError(f"--lora {lora}: no such file")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, cfg.model.base_dtype) if cuda else torch.float32
    needs_caption = cfg.validation.prompt is None and cfg.validation.prompt_library is None
    clips = scan_dataset(cfg.datasets[0]).clips if needs_caption else []
    from trainer.outputs.vace_validation import default_caption

    settings = settings_for(cfg, default_caption(cfg, [c.caption for c in clips]))
    resolve_adapters(settings)
    embeds = prompt_embeds(cfg, settings, device)
    transformer = load_transformer(cfg.model, dtype).to(device)
    backend = cfg.memory.attention_backend  # the kernel training would use (cuDNN / FlashAttention 4 on an H100)
    set_attention_backend(transformer, resolve_attention_backend(backend, device), backend)
    pipe = build_pipeline(transformer, load_vae(cfg.model).to(device), settings, cfg)
    from trainer.outputs.export import diffusers_lora_source

    try:  # a VACE LoRA's VACE-block keys: its diffusers twin (trainer.outputs.export)
        pipe.load_lora_weights(diffusers_lora_source(lora), adapter_name=RUN_ADAPTER, **lora_load_kwargs(cfg, pipe))
    except (ValueError, KeyError) as err:
        raise UserError(f"--lora {lora}: diffusers could not load it into this model ({err})") from None
    out = out_dir or cfg.train.output_dir / "validation" / "manual"
    result = validation_round(pipe, settings, embeds, out, device, dtype if cuda else None, [("", nullcontext())])
    return result.paths + [result.sheet]


RUN_ADAPTER = "run"  # the adapter name of the run's LoRA in `wanforge validate`
