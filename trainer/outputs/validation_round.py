"""A validation round: every prompt with the chosen weights (live, EMA or both), one contact sheet, and the reports
(metrics.jsonl, trackers, webhooks). Used during training and by `wanforge validate CONFIG --lora PATH`."""

from __future__ import annotations

import logging
import tempfile
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config.schema import WanforgeConfig
from trainer.data.cache import text_embeds
from trainer.data.discovery import scan_dataset
from trainer.errors import UserError
from trainer.model.attention import resolve_attention_backend, set_attention_backend
from trainer.model.components import load_transformer, load_vae
from trainer.model.ema import AdapterEMA, validation_variants, weights_for
from trainer.outputs.contact_sheet import contact_sheet
from trainer.outputs.pipelines import lora_load_kwargs
from trainer.outputs.validation_videos import Rendered, ValidationSettings, build_pipeline, render, settings_for
from trainer.outputs.webhooks import Webhooks
from trainer.rundir import RunDir

log = logging.getLogger(__name__)
CONTACT_SHEET = "contact_sheet.png"


@dataclass
class RoundResult:
    videos: list[Rendered]
    sheet: Path

    @property
    def paths(self) -> list[Path]:
        return [r.path for r in self.videos]


def label(r: Rendered) -> str:
    return r.prompt.name + (f" [{r.variant}]" if r.variant else "")


def prompt_embeds(cfg: WanforgeConfig, settings: ValidationSettings, device: torch.device) -> dict[str, torch.Tensor]:
    texts = list(dict.fromkeys([p.text for p in settings.prompts] + [settings.negative_prompt]))
    return dict(zip(texts, text_embeds(cfg, texts, device)))


def validation_round(
    pipe, settings: ValidationSettings, embeds: dict[str, torch.Tensor], out_dir: Path, device: torch.device,
    autocast_dtype: torch.dtype | None, variants: list[tuple[str, AbstractContextManager]],
) -> RoundResult:
    """Render every prompt under each (variant, weights context); the same seed, so variants compare frame by frame."""
    videos: list[Rendered] = []
    for variant, weights in variants:
        with weights:
            videos += render(pipe, settings, embeds, out_dir, device, autocast_dtype, variant)
    sheet = contact_sheet([(label(r), r.frames) for r in videos], out_dir / CONTACT_SHEET)
    return RoundResult(videos, sheet)


class TrainingValidator:
    """Validation during training, on the main process; the others wait (with a sharded or context-parallel model they
    render along: its forward needs every rank of its group). When it is due: trainer.loop.periodic."""

    def __init__(self, cfg: WanforgeConfig, run: RunDir, settings: ValidationSettings, device: torch.device,
                 base_dtype: torch.dtype, ema: AdapterEMA | None, webhooks: Webhooks):
        self.cfg, self.run, self.settings, self.device = cfg, run, settings, device
        self.autocast = base_dtype if base_dtype != torch.float32 else None
        self.ema, self.webhooks = ema, webhooks
        self.last: RoundResult | None = None

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
        result = self._render(model, self.run.validation / f"step-{step}")
        rel = lambda p: str(p.relative_to(self.run.root))  # noqa: E731
        self.run.log_metrics({"step": step, "validation_videos": [rel(p) for p in result.paths],
                              "contact_sheet": rel(result.sheet)})
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
    """`wanforge validate`: the config's validation settings with a saved LoRA (either format), outside training.
    The plain transformer and diffusers' own LoRA loader, not `build_trainable_transformer`: this checks the saved
    file the way a user's pipeline loads it, and a trainable model would add a fresh adapter beside it."""
    if not lora.is_file():
        raise UserError(f"--lora {lora}: no such file")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, cfg.model.base_dtype) if cuda else torch.float32
    needs_caption = cfg.validation.prompt is None and cfg.validation.prompt_library is None
    clips = scan_dataset(cfg.datasets[0]).clips if needs_caption else []
    settings = settings_for(cfg, clips[0].caption if clips else None)
    embeds = prompt_embeds(cfg, settings, device)
    transformer = load_transformer(cfg.model, dtype).to(device)
    backend = cfg.memory.attention_backend  # the kernel training would use (cuDNN / FlashAttention 4 on an H100)
    set_attention_backend(transformer, resolve_attention_backend(backend, device), backend)
    pipe = build_pipeline(transformer, load_vae(cfg.model).to(device), settings, cfg)
    try:
        pipe.load_lora_weights(str(lora), **lora_load_kwargs(cfg, pipe))
    except (ValueError, KeyError) as err:
        raise UserError(f"--lora {lora}: diffusers could not load it into this model ({err})") from None
    out = out_dir or cfg.train.output_dir / "validation" / "manual"
    result = validation_round(pipe, settings, embeds, out, device, dtype if cuda else None, [("", nullcontext())])
    return result.paths + [result.sheet]
