"""Validation videos: a diffusers Wan pipeline with the adapter, the configured scheduler and flow shift, optional
skip-layer guidance, written as mp4 at the model's fps plus one contact sheet per validation.

`render` takes a ready pipeline, so other pipelines (image-to-video, Wan 2.2 two experts) plug in through
`build_pipeline` without touching the rest. `[[validation.renders]]` render every prompt once per entry, each with its
own sampling settings and extra LoRAs (a speed LoRA at 4 steps beside the full render; trainer.outputs.validation_adapters
stacks them); every video records the settings it was rendered with (`ValidationSettings.describe`).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from trainer.config.schema import WanforgeConfig
from trainer.data.dataset import pad_text
from trainer.data.video import write_mp4
from trainer.flavours import FLAVOURS
from trainer.model.memory import cudnn_benchmark
from trainer.outputs.prompts import TOKEN, fill_token, load_prompt_library, slug  # noqa: F401 - torch-free, checked by preflight
from trainer.outputs.skip_layers import SkipLayerGuidance, skip_layer_guidance

log = logging.getLogger(__name__)

PIPELINE_TEXT_LENGTH = 512  # WanPipeline pads prompt embeddings to max_sequence_length=512


@dataclass(frozen=True)
class ValidationPrompt:
    name: str  # file stem: the library nickname, or a slug of the prompt
    text: str


@dataclass(frozen=True)
class AdapterSpec:
    """An extra LoRA of a render (config: ValidationAdapter)."""

    path: str  # a local .safetensors file or hf://owner/repo[@revision]/file.safetensors
    strength: float = 1.0
    expert: str = "both"  # Wan 2.2 A14B: high, low or both

    @property
    def label(self) -> str:
        stem = Path(self.path.split("@")[-1] if self.path.startswith("hf://") else self.path).stem
        return f"{stem}@{self.strength:g}" + (f"/{self.expert}" if self.expert != "both" else "")


@dataclass(frozen=True)
class RenderSpec:
    """One [[validation.renders]] entry: None takes the base setting."""

    name: str
    steps: int | None = None
    guidance_scale: float | None = None
    guidance_scale_low: float | None = None
    flow_shift: float | None = None
    scheduler: str | None = None
    skip_layers: tuple[int, ...] | None = None
    lora_strength: float = 1.0
    adapters: tuple[AdapterSpec, ...] = ()


@dataclass(frozen=True)
class ValidationSettings:
    prompts: tuple[ValidationPrompt, ...]
    negative_prompt: str
    num_frames: int
    height: int
    width: int
    guidance_scale: float
    scheduler: str
    flow_shift: float
    steps: int
    seed: int
    fps: int
    skip_layers: SkipLayerGuidance | None = None
    compile: bool = True  # on a GPU, the blocks run compiled (`compiled_blocks`); a failing compile falls back to eager
    guidance_scale_low: float | None = None  # Wan 2.2 A14B with both experts: the low-noise expert's guidance
    adapters: tuple[AdapterSpec, ...] = ()  # extra LoRAs stacked on the run's own for this render
    lora_strength: float = 1.0  # the run's own LoRA's strength
    render: str = ""  # the render's name ("" when [validation] has no renders)
    renders: tuple[RenderSpec, ...] = ()  # [[validation.renders]]; empty: one render with the fields above
    skip_window: tuple[float, float, float] = (0.1, 0.9, 3.0)  # skip-layer start, stop, scale for a render's own layers

    @property
    def prompt(self) -> str:
        return self.prompts[0].text

    def each_render(self) -> list[ValidationSettings]:
        """The settings of every render, in the configured order (itself when there are no renders)."""
        return [self.with_render(r) for r in self.renders] if self.renders else [self]

    def with_render(self, r: RenderSpec) -> ValidationSettings:
        """These settings with a render's own: unset fields keep the base ones; a render that sets guidance_scale
        gives the low-noise expert the same unless it sets guidance_scale_low (a speed LoRA wants CFG 1 on both)."""
        low = self.guidance_scale_low
        if low is not None and (r.guidance_scale_low is not None or r.guidance_scale is not None):
            low = r.guidance_scale_low if r.guidance_scale_low is not None else r.guidance_scale
        skip = self.skip_layers
        if r.skip_layers is not None:
            skip = SkipLayerGuidance(tuple(r.skip_layers), *self.skip_window) if r.skip_layers else None
        return replace(
            self, render=r.name, steps=r.steps or self.steps,
            guidance_scale=self.guidance_scale if r.guidance_scale is None else r.guidance_scale,
            guidance_scale_low=low, flow_shift=r.flow_shift or self.flow_shift, scheduler=r.scheduler or self.scheduler,
            skip_layers=skip, lora_strength=r.lora_strength, adapters=r.adapters, renders=(),
        )

    def describe(self) -> dict:
        """What a video was rendered with (run.json, metrics.jsonl, videos.json, the mp4's comment)."""
        out = {"render": self.render, "steps": self.steps, "guidance_scale": self.guidance_scale,
               "flow_shift": self.flow_shift, "scheduler": self.scheduler, "seed": self.seed,
               "size": f"{self.width}x{self.height}x{self.num_frames}", "lora_strength": self.lora_strength,
               "adapters": [{"path": a.path, "strength": a.strength, "expert": a.expert} for a in self.adapters]}
        if self.guidance_scale_low is not None:
            out["guidance_scale_low"] = self.guidance_scale_low
        if self.skip_layers is not None:
            out["skip_layers"] = list(self.skip_layers.layers)
        return out

    def label(self) -> str:
        """One line for the contact sheet: steps, CFG, shift, sampler, LoRA strength, extra adapters."""
        cfg = f"CFG {self.guidance_scale:g}" + (
            f"/{self.guidance_scale_low:g}" if self.guidance_scale_low not in (None, self.guidance_scale) else "")
        parts = [f"{self.steps} steps", cfg, f"shift {self.flow_shift:g}", self.scheduler]
        if self.skip_layers is not None:
            parts.append("SLG " + ",".join(str(i) for i in self.skip_layers.layers))
        if self.lora_strength != 1.0:
            parts.append(f"LoRA x{self.lora_strength:g}")
        parts += [f"+{a.label}" for a in self.adapters]
        return (f"{self.render}: " if self.render else "") + ", ".join(parts)


@dataclass(frozen=True)
class Rendered:
    path: Path
    prompt: ValidationPrompt
    variant: str  # "" for the weights as they are, "ema" for the EMA weights
    frames: np.ndarray = field(repr=False, compare=False)
    settings: ValidationSettings | None = field(default=None, repr=False, compare=False)  # what rendered it

    @property
    def render(self) -> str:
        return self.settings.render if self.settings is not None else ""


def video_stem(prompt: str, render: str, variant: str, taken: set[str]) -> str:
    """The one place a validation video is named: prompt[-render][-variant], unique within its folder (`taken`, the
    stems already written this round, gets it added; a clash gets -2, -3, ...)."""
    stem = "-".join(part for part in (prompt, render, variant) if part)
    unique, n = stem, 1
    while unique in taken:
        n += 1
        unique = f"{stem}-{n}"
    taken.add(unique)
    return unique


def validation_prompts(cfg: WanforgeConfig, first_caption: str | None) -> tuple[ValidationPrompt, ...]:
    """The configured prompt, then the library's; the first training caption when neither is set."""
    v = cfg.validation
    prompts: list[ValidationPrompt] = []
    if v.prompt:
        text = fill_token(v.prompt, v.instance_prompt, "validation.prompt")
        prompts.append(ValidationPrompt(slug(text), text))
    if v.prompt_library is not None:
        for nickname, text in load_prompt_library(v.prompt_library).items():
            text = fill_token(text, v.instance_prompt, f"validation.prompt_library {nickname!r}")
            prompts.append(ValidationPrompt(slug(nickname), text))
    if not prompts:
        text = first_caption or "a video"
        prompts.append(ValidationPrompt(slug(text), text))
    names = unique_names([p.name for p in prompts], variants=("ema",))
    return tuple(ValidationPrompt(name, p.text) for name, p in zip(names, prompts))


def unique_names(names: list[str], variants: tuple[str, ...] = ()) -> list[str]:
    """File stems no two prompts share, counting each name's variant files (`<name>-ema`) and case (a case-insensitive
    disk): a repeated or clashing name gets the first free `-2`, `-3`, ... suffix."""
    taken: set[str] = set()
    out = []
    for name in names:
        candidate, n = name, 1
        while any(x.lower() in taken for x in (candidate, *(f"{candidate}-{v}" for v in variants))):
            n += 1
            candidate = f"{name}-{n}"
        taken |= {x.lower() for x in (candidate, *(f"{candidate}-{v}" for v in variants))}
        out.append(candidate)
    return out


def validation_texts(cfg: WanforgeConfig) -> list[str]:
    """Texts to embed with the training captions, so validation never loads the text encoder mid-training
    (the default prompt, the first caption, is cached as a caption already)."""
    texts = [cfg.validation.negative_prompt]
    if cfg.validation.prompt or cfg.validation.prompt_library is not None:
        texts += [p.text for p in validation_prompts(cfg, None)]
    return texts


def trained_resolutions(flavour_name: str) -> set[tuple[int, int]]:
    """(width, height) pairs the flavour's model was trained at, either orientation."""
    f = FLAVOURS[flavour_name]
    sizes = {(f.width, f.height)}
    if "14b" in f.name:  # the Wan 2.1/2.2 14B models were trained at 480p and 720p
        sizes |= {(832, 480), (1280, 720)}
    return sizes | {(h, w) for w, h in sizes}


def settings_for(cfg: WanforgeConfig, first_caption: str | None) -> ValidationSettings:
    v, flavour = cfg.validation, FLAVOURS[cfg.model.flavour]
    frames, height, width = cfg.dataset_shape(0)
    width, height = v.width or width, v.height or height
    if flavour.hub_id is not None and (width, height) not in trained_resolutions(flavour.name):
        known = ", ".join(f"{w}x{h}" for w, h in sorted(trained_resolutions(flavour.name)))
        log.warning("validation renders at %dx%d, which %s was not trained at (%s): expect weaker videos",
                    width, height, flavour.name, known)
    skip = None
    if v.skip_layers:
        skip = SkipLayerGuidance(tuple(v.skip_layers), v.skip_layer_start, v.skip_layer_stop, v.skip_layer_scale)
    renders = tuple(
        RenderSpec(r.name, r.num_inference_steps, r.guidance_scale, r.guidance_scale_low, r.flow_shift, r.scheduler,
                   None if r.skip_layers is None else tuple(r.skip_layers), r.lora_strength,
                   tuple(AdapterSpec(a.path, a.strength, a.expert) for a in r.adapters))
        for r in v.renders
    )
    return ValidationSettings(
        prompts=validation_prompts(cfg, first_caption),
        negative_prompt=v.negative_prompt,
        num_frames=v.num_frames or frames,
        height=height,
        width=width,
        guidance_scale=v.guidance_scale if v.guidance_scale is not None else flavour.guidance_scale,
        scheduler=v.scheduler,
        flow_shift=v.flow_shift or flavour.flow_shift,
        steps=v.num_inference_steps,
        seed=v.seed,
        fps=flavour.fps,
        skip_layers=skip,
        compile=render_compiles(cfg.memory),
        guidance_scale_low=(v.guidance_scale_low if v.guidance_scale_low is not None else flavour.guidance_scale_low)
        if flavour.is_expert else None,
        renders=renders,
        skip_window=(v.skip_layer_start, v.skip_layer_stop, v.skip_layer_scale),
    )


def render_compiles(memory) -> bool:
    """Validation compiles the blocks when training compiles them: memory.compile, or a preset (every preset compiles)
    unless memory.compile = false was set."""
    return memory.compile or (memory.preset != "none" and "compile" not in memory.model_fields_set)


def make_scheduler(kind: str, flow_shift: float):
    """UniPC multistep on flow sigmas (the official Wan sampler), or flow-matching Euler; both shift the sigmas
    as s' = shift*s / (1 + (shift-1)*s)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if kind == "unipc":
        return UniPCMultistepScheduler(
            num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift
        )
    if kind == "flow_match_euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=flow_shift)
    raise ValueError(f"unknown scheduler {kind!r}")


def build_pipeline(transformer, vae, settings: ValidationSettings, cfg: WanforgeConfig | None = None,
                   transformer_2=None):
    """The pipeline around already-loaded pieces (embeddings are passed in, so no text encoder). With `cfg`, the
    flavour's own pipeline (image-to-video, Wan 2.2 experts, TI2V: trainer.outputs.pipelines)."""
    from diffusers import WanPipeline

    if cfg is not None:
        from trainer.outputs.pipelines import flavour_pipeline

        return flavour_pipeline(cfg, transformer, vae, make_scheduler(settings.scheduler, settings.flow_shift),
                                vae.device, settings.height, settings.width, transformer_2, settings.num_frames)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                       scheduler=make_scheduler(settings.scheduler, settings.flow_shift))
    pipe.wanforge_experts = {"all": transformer}
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _block_call(block, *args, **kwargs):
    return block._call_impl(*args, **kwargs)  # forward with the block's hooks, past its `_compiled_call_impl`


@functools.lru_cache(maxsize=None)
def _compiled_block_call(backend):
    """One compiled function for every block of every render (the blocks share one graph; it compiles once)."""
    return torch.compile(_block_call, backend=backend, dynamic=False)


@contextmanager
def compiled_blocks(denoisers: list, backend="inductor") -> Iterator[None]:
    """The transformer blocks run through torch.compile during a render. Under no_grad diffusers calls each block
    itself, so training's compiled block runner (trainer.model.memory) is not used: without this, validation runs eager."""
    from trainer.model.streaming import weight_streamer

    touched = []
    for model in denoisers:
        streamer = weight_streamer(model)
        # VACE blocks too (numbered after the main blocks: never streamed)
        for i, block in enumerate([*getattr(model, "blocks", []), *(getattr(model, "vace_blocks", None) or [])]):
            if block._compiled_call_impl is None:
                call = functools.partial(_compiled_block_call(backend), block)
                if streamer is not None and streamer.streams(i):  # weights bound outside the compiled code
                    call = streamer.around(i, call)
                block._compiled_call_impl = call
                touched.append(block)
    try:
        yield
    finally:
        for block in touched:
            block._compiled_call_impl = None


_COMPILE_FAILED: list[str] = []  # a compile that failed once is not retried in this process
COMPILE_ON = ("cuda",)  # device types whose renders compile the blocks (a CPU render is a test or a demo)


def _compile_errors() -> tuple[type[BaseException], ...]:
    import torch._dynamo.exc as dynamo_exc

    return (dynamo_exc.TorchDynamoException, dynamo_exc.BackendCompilerFailed)


@torch.no_grad()
def generate(
    pipe,
    settings: ValidationSettings,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    callback=None,
) -> np.ndarray:
    """Frames [F,H,W,3] float in [0,1] for one prompt, with skip-layer guidance inside its window when configured.
    On a GPU the blocks run compiled (not with skip-layer guidance, whose hooks change the blocks mid-render; a failing
    compile renders again without) and cuDNN picks its fastest convolutions for the VAE decode."""
    denoisers = [m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None]
    was_training = [m.training for m in denoisers]
    for m in denoisers:
        m.eval()
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    compile_first = (settings.compile and device.type in COMPILE_ON and settings.skip_layers is None
                     and not _COMPILE_FAILED)
    extra = dict(getattr(pipe, "wanforge_call_kwargs", {}))
    if "guidance_scale_2" in extra and settings.guidance_scale_low is not None:  # this render's low-noise guidance
        extra["guidance_scale_2"] = settings.guidance_scale_low
    guidance = [settings.guidance_scale, extra.get("guidance_scale_2", settings.guidance_scale)]  # per expert
    try:
        for compiled in (True, False) if compile_first else (False,):
            try:
                with (compiled_blocks(denoisers) if compiled else nullcontext()), autocast, cudnn_benchmark(), \
                        skip_layer_guidance(denoisers, pipe.scheduler, settings.skip_layers, guidance):
                    return pipe(
                        prompt_embeds=pad_text([prompt_embeds], PIPELINE_TEXT_LENGTH).to(device),
                        negative_prompt_embeds=pad_text([negative_embeds], PIPELINE_TEXT_LENGTH).to(device),
                        num_frames=settings.num_frames,
                        height=settings.height,
                        width=settings.width,
                        num_inference_steps=settings.steps,
                        guidance_scale=settings.guidance_scale,
                        generator=torch.Generator(device="cpu").manual_seed(settings.seed),
                        output_type="np",
                        callback_on_step_end=callback,
                        **extra,  # image / guidance_scale_2 / VACE control (trainer.outputs.pipelines)
                    ).frames[0]
            except _compile_errors() as err:
                if not compiled:
                    raise
                _COMPILE_FAILED.append(str(err))
                log.warning("validation: torch.compile of the blocks failed (%s): rendering without it",
                            str(err).splitlines()[0][:200])
    finally:
        for m, mode in zip(denoisers, was_training):
            m.train(mode)
    raise AssertionError("unreachable")  # the eager attempt returns or raises


def render(
    pipe,
    settings: ValidationSettings,
    embeds: dict[str, torch.Tensor],
    out_dir: Path,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    variant: str = "",
    taken: set[str] | None = None,
) -> list[Rendered]:
    """One mp4 per prompt at the model's fps, for one render: its scheduler and flow shift, its extra LoRAs stacked on
    the run's (trainer.outputs.validation_adapters), named by `video_stem` (`taken`: the stems already written in
    `out_dir` this round). `embeds` maps each prompt text and the negative prompt to its embedding."""
    from trainer.outputs.validation_adapters import stacked_adapters

    taken = set() if taken is None else taken
    pipe.scheduler = make_scheduler(settings.scheduler, settings.flow_shift)
    out = []
    with stacked_adapters(pipe, settings):
        for prompt in settings.prompts:
            frames = generate(pipe, settings, embeds[prompt.text], embeds[settings.negative_prompt], device,
                              autocast_dtype)
            name = video_stem(prompt.name, settings.render, variant, taken)
            comment = json.dumps({"prompt": prompt.text, "variant": variant, **settings.describe()}, ensure_ascii=False)
            path = write_mp4(out_dir / f"{name}.mp4", frames, settings.fps, comment=comment)
            out.append(Rendered(path, prompt, variant, frames, settings))
    return out
