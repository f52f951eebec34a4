"""Preflight checks of the numbers in a config: learning rates, steps, noise levels of the experts, frame counts
and sizes (a unit mix-up, a size the model or memory cannot take)."""

from __future__ import annotations

import math
import os

from trainer.data.buckets import size_in_units
from trainer.flavours import trained_sizes
from trainer.preflight.report import PreflightRun


FAR_BEYOND = 2.0  # a training size over this many times the pixels (or frames) the model was trained at
LR_SUSPICIOUS = 1e-2  # above this a LoRA learning rate is a warning; above 1 an error (a mistyped exponent)
MAX_FRAME_PIXELS = 4096 * 2160  # larger frames than 4K: a unit mix-up, not a training size


def check_numbers(run: PreflightRun) -> None:
    cfg = run.cfg
    lr = cfg.optim.learning_rate
    if lr > 1:
        exponent = round(math.log10(lr))
        fix = f"did you mean {10.0 ** -exponent:g}?" if abs(lr - 10.0 ** exponent) / lr < 1e-9 else "try 0.0001"
        run.error(f"optim.learning_rate = {lr:g}: no LoRA trains at a learning rate above 1 (it diverges to nan at "
                  f"once): {fix}")
    elif lr > LR_SUSPICIOUS:
        run.warn(f"optim.learning_rate = {lr:g} is high for a LoRA (1e-4 is usual, 1e-3 already aggressive): "
                 "expect divergence")
    if cfg.optim.lr_scheduler != "constant" and cfg.optim.lr_warmup_steps >= cfg.train.max_train_steps:
        run.warn(f"optim.lr_warmup_steps = {cfg.optim.lr_warmup_steps} is not below train.max_train_steps = "
                 f"{cfg.train.max_train_steps}: the run never reaches its learning rate")
    if cfg.train.max_grad_norm is None and cfg.train.max_grad_value is None and lr > 1e-3:
        run.warn(f"train: no gradient clipping with optim.learning_rate = {lr:g}: a spike can make the LoRA nan")
    for i, ds in enumerate(cfg.datasets):
        if ds.caption_dropout_probability >= 0.5:
            run.warn(f"datasets[{i}].caption_dropout_probability = {ds.caption_dropout_probability:g}: most samples "
                     "train without their caption (0.05-0.1 is usual)")
    if cfg.ema.use_ema and cfg.ema.update_interval > cfg.train.max_train_steps:
        run.warn(f"ema.update_interval = {cfg.ema.update_interval} is above train.max_train_steps: the EMA never "
                 "updates and lora/ema/ would equal the initial LoRA")
    if cfg.train.dataloader_num_workers > (os.cpu_count() or 1):
        run.warn(f"train.dataloader_num_workers = {cfg.train.dataloader_num_workers} is more than this machine's "
                 f"{os.cpu_count()} CPUs")
    if cfg.lora.rank > 512:
        run.warn(f"lora.rank = {cfg.lora.rank}: far above the 16-128 LoRAs use (a rank near the layer width is a "
                 "full fine-tune in slow motion)")
    if cfg.train.text_max_length > 512:
        run.error(f"train.text_max_length = {cfg.train.text_max_length}: the Wan pipelines use 512 text tokens, so "
                  "longer embeddings train a model validation and inference never see: try 512")
    if cfg.model.wan_force_2_1_time_embedding and not run.flavour.expand_timesteps:
        run.warn(f"model.wan_force_2_1_time_embedding is for TI2V-5B only and is ignored by {run.flavour.name}")
    if run.flavour.boundary is not None:
        _expert_noise_levels(run)


def _expert_noise_levels(run: PreflightRun) -> None:
    """Wan 2.2 A14B: the flow distribution must put noise levels on the trained expert's side of the boundary."""
    flow, b = run.cfg.flow, run.flavour.boundary
    if flow.timestep_sampling == "uniform":
        above = 1 - b
    elif flow.timestep_sampling == "shift":
        above = 1 - b / (flow.shift - (flow.shift - 1) * b)
    else:
        z = (math.log(b / (1 - b)) - flow.logit_mean) / flow.logit_std
        above = 0.5 * math.erfc(z / math.sqrt(2))
    sides = ("high", "low") if run.cfg.model.train_both_experts else (run.flavour.stage,)
    for side in sides:
        share = above if side == "high" else 1 - above
        if share < 0.01:
            run.error(f"flow: only {share:.2%} of the noise levels fall on the {side}-noise side of the expert "
                      f"boundary {b}: that expert would almost never train: try flow.timestep_sampling = \"uniform\"")


def _size_units(value: float, kind: str, field_name: str) -> str | None:
    """Why a size in resolution_type units is not meant (None: plausible), with a converted value to try."""
    if value <= 0:
        return f"{field_name} = {value:g} must be above 0"
    if kind == "area" and value > MAX_FRAME_PIXELS / 1e6:
        return (f"{field_name} = {value:g} means {value:g} megapixels (resolution_type = \"area\"): did you mean "
                f"{round(value * value / 1e6, 2):g}, the area of a {value:g}-pixel square?")
    if kind != "area" and value < 8:
        return (f"{field_name} = {value:g} means {value:g} pixels (resolution_type = \"{kind}\"): did you mean "
                f"{round(math.sqrt(value * 1e6)):d}, the side of a {value:g}-megapixel square?")
    if kind != "area" and value * value > MAX_FRAME_PIXELS * 4:
        return f"{field_name} = {value:g} pixels is far beyond any video model's frame: try 632 (832x480)"
    return None


def _in_units(width: int, height: int, kind: str) -> str:
    value = size_in_units(width, height, kind)
    return f"{value:.2f}".rstrip("0").rstrip(".") if kind == "area" else str(round(value))


def _beyond_training(run: PreflightRun, index: int) -> None:
    """A training size far beyond what the model was trained at: said with how much more each step costs (an
    absurd one, beyond any video model's frame, is an error)."""
    from trainer.data.buckets import frame_size

    f, ds, where = run.flavour, run.cfg.datasets[index], f"datasets[{index}]"
    width, height = frame_size(ds, f, f.width, f.height)  # a clip of the model's own shape
    tw, th = trained_sizes(f)[-1]
    pixels = width * height / (tw * th)
    frames = run.cfg.dataset_shape(index)[0] / f.num_frames
    fix = (f"{where}.width = {tw if width >= height else th} and {where}.height = {th if width >= height else tw}"
           if ds.width is not None else
           f"{where}.resolution = {_in_units(tw, th, ds.resolution_type)}")
    if width * height > 4 * MAX_FRAME_PIXELS:
        if ds.width is None:
            return  # resolution in the wrong units: _size_units says so
        run.error(f"{where}: {width}x{height} is far beyond any video model's frame (a unit mix-up?): try {fix}")
        return
    if pixels > FAR_BEYOND:
        tokens = pixels * max(frames, 1.0)
        run.warn(f"{where}: {width}x{height} is {pixels:.1f}x the pixels of {tw}x{th}, the largest size {f.name} was "
                 f"trained at: each step costs about {tokens:.1f}x to {tokens * tokens:.0f}x as much (attention grows "
                 f"with the square of the tokens) for a size the model never saw: try {fix}")
    if frames > FAR_BEYOND:
        run.warn(f"{where}.num_frames = {run.cfg.dataset_shape(index)[0]} is {frames:.1f}x the {f.num_frames} frames "
                 f"{f.name} was trained on: each step costs {frames:.1f}x or more for lengths the model never saw: "
                 f"try {where}.num_frames = {f.num_frames}")


def check_frames_and_sizes(run: PreflightRun) -> None:
    cfg, f = run.cfg, run.flavour
    from trainer.data.buckets import size_multiple

    m = size_multiple(f)
    for i, ds in enumerate(cfg.datasets):
        where = f"datasets[{i}]"
        for name in ("resolution", "minimum_image_size", "maximum_image_size", "target_downsample_size"):
            value = getattr(ds, name)
            if value is not None:
                why = _size_units(value, ds.resolution_type, f"{where}.{name}")
                if why:
                    run.error(why)
        _beyond_training(run, i)
        if ds.width is not None and ds.resolution is not None:
            run.warn(f"{where}: width and height are set, so resolution = {ds.resolution:g} is ignored")
        frames = ds.num_frames or f.num_frames
        if ds.min_frames is not None and ds.min_frames > frames:
            run.warn(f"{where}.min_frames = {ds.min_frames} is above num_frames = {frames}: clips need only "
                     f"{frames} frames (set min_frames <= num_frames)")
        needed = min(ds.min_frames or frames, frames)
        if ds.max_frames is not None and ds.max_frames < needed:
            run.error(f"{where}.max_frames = {ds.max_frames} is below the {needed} frames a clip needs "
                      f"(min_frames / num_frames), so no video can train: try max_frames = none (no limit)")
        ext = ds.caption_extension
        if ds.caption_strategy == "textfile" and (not ext.startswith(".") or ext == "." or any(c in ext for c in "/\\")):
            fixed = "".join(c for c in ext if c not in "/\\").strip(".")
            how = "must start with a dot" if not ext.startswith(".") else 'must be a dot and a name, as in ".txt"'
            run.error(f'{where}.caption_extension = "{ext}" {how}: try ".{fixed or "txt"}"')
        if ds.maximum_image_size is not None and ds.target_downsample_size is not None \
                and ds.target_downsample_size > ds.maximum_image_size:
            run.warn(f"{where}.target_downsample_size = {ds.target_downsample_size:g} is above maximum_image_size = "
                     f"{ds.maximum_image_size:g}: large samples would be scaled up, not down")
    v = cfg.validation
    for name in ("width", "height"):
        value = getattr(v, name)
        if value is not None and value % m:
            run.error(f"validation.{name} = {value} must be a multiple of {m} for {f.name}: try {max(m, value // m * m)}")
    if v.width is not None and v.height is not None:
        tw, th = trained_sizes(f)[-1]
        pixels = v.width * v.height / (tw * th)
        if pixels > FAR_BEYOND:
            portrait = v.height > v.width
            run.warn(f"validation: {v.width}x{v.height} is {pixels:.1f}x the pixels of {tw}x{th}, the largest size "
                     f"{f.name} was trained at: rendering costs far more and looks worse: try validation.width = "
                     f"{th if portrait else tw} and validation.height = {tw if portrait else th}")
    if v.num_frames is not None and f.hub_id is not None and v.num_frames > 4 * f.num_frames:
        run.warn(f"validation.num_frames = {v.num_frames} is far beyond the {f.num_frames} frames {f.name} was "
                 "trained on: rendering will be slow and the video weak")
    if cfg.datasets and cfg.datasets[0].disabled:
        run.warn("datasets[0] is disabled, yet validation takes its frame size and eval samples from it: move an "
                 "enabled dataset first")
