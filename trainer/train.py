"""The training recipe: caches -> transformer + LoRA -> flow-matching loop on accelerate -> checkpoints, LoRA, videos."""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from trainer.cache import build_caches, text_embeds
from trainer.checkpointing import TrainState, install_adapter_hooks, load_checkpoint, save_checkpoint
from trainer.components import load_transformer, load_vae
from trainer.config import WanforgeConfig, save_config, to_toml_dict
from trainer.dataset import CachedDataset, Collate, ResumableBatchSampler
from trainer.errors import UserError
from trainer.export import save_lora
from trainer.flow import flow_loss, flow_target, noisy_input, sample_sigmas, timesteps_from_sigmas
from trainer.lora import add_lora, trainable_parameters
from trainer.optim import make_lr_scheduler, make_optimizer
from trainer.rundir import RunDir
from trainer.validation import ValidationSettings, render, settings_for

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    lora_file: Path
    videos: list[Path] = field(default_factory=list)
    cache_entries_built: int = 0
    final_step: int = 0


def _precision(cfg: WanforgeConfig, cuda: bool) -> tuple[str, torch.dtype]:
    """(accelerate mixed_precision, base weight dtype). CPU always trains in fp32."""
    if not cuda:
        return "no", torch.float32
    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    base = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[mp]
    if mp != "no" and cfg.model.base_dtype == "float32":
        base = torch.float32
    return mp, base


class _StopFlag:
    """SIGTERM (preemption, `sky down`, Ctrl-C in a container) finishes the step, saves a checkpoint, and stops."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum, frame) -> None:
        self.requested = True


def train(
    cfg: WanforgeConfig,
    resume: str | None = None,
    show_progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train a LoRA as the config says. `on_step(step)` runs after each optimizer step (tests, notebooks)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    run = RunDir(cfg.train.output_dir)
    resume_from = run.resolve_resume(resume) if resume else None
    if resume_from is None and run.complete_checkpoints():
        raise UserError(
            f"{run.root} already has checkpoints: pass --resume latest to continue that run, "
            "or set train.output_dir to a new folder"
        )
    cuda = torch.cuda.is_available()
    mixed_precision, base_dtype = _precision(cfg, cuda)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with=None if cfg.tracking.report_to == "none" else cfg.tracking.report_to,
        project_dir=str(run.root),
    )
    device = accelerator.device
    set_seed(cfg.train.seed)
    if accelerator.is_main_process:
        run.create()
        save_config(cfg, run.config)
        run_id = run.read_status().get("run_id") or os.environ.get("SKYPILOT_TASK_ID") or uuid.uuid4().hex[:12]
        run.write_status(status="caching", run_id=run_id, max_train_steps=cfg.train.max_train_steps)
    try:
        return _train(cfg, run, accelerator, device, base_dtype, resume_from, show_progress, on_step)
    except BaseException as err:
        if accelerator.is_main_process:
            stopped = isinstance(err, KeyboardInterrupt)
            run.write_status(status="interrupted" if stopped else "failed", error=f"{err.__class__.__name__}: {err}"[:2000])
        raise


def _train(cfg, run: RunDir, accelerator, device, base_dtype, resume_from, show_progress, on_step) -> TrainResult:
    main = accelerator.is_main_process
    # ---- caches: the VAE and text encoder are loaded only for missing entries, then freed
    report = build_caches(cfg, device, extra_texts=_validation_texts(cfg), show_progress=show_progress and main)
    samples = [s for ds, ds_samples in zip(cfg.datasets, report.samples) for s in ds_samples * ds.repeats]
    micro_batch = cfg.train.train_batch_size
    needed = micro_batch * cfg.train.gradient_accumulation_steps * accelerator.num_processes
    if len(samples) < needed:
        raise UserError(
            f"the datasets hold {len(samples)} samples after repeats, fewer than one optimizer step needs "
            f"({needed} = train_batch_size x gradient_accumulation_steps x GPUs): raise datasets.repeats"
        )
    first_caption = report.samples[0][0].caption if report.samples and report.samples[0] else None
    val = settings_for(cfg, first_caption)

    # ---- model and adapter
    transformer = load_transformer(cfg.model, base_dtype).to(device)
    add_lora(transformer, cfg.lora)
    if cfg.memory.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    params = trainable_parameters(transformer)
    optimizer = make_optimizer(params, cfg.optim, device)
    lr_scheduler = make_lr_scheduler(optimizer, cfg.optim, cfg.train.max_train_steps)
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    state = TrainState(generator)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler, state)
    install_adapter_hooks(accelerator)
    if resume_from is not None:
        load_checkpoint(accelerator, resume_from)
        if main:
            run.truncate_metrics_after(state.step)
            log.info("resumed from %s at step %d", resume_from, state.step)
    _init_trackers(cfg, run, accelerator)

    loader = torch.utils.data.DataLoader(
        CachedDataset(samples),
        batch_sampler=ResumableBatchSampler(
            len(samples), micro_batch, cfg.train.seed,
            start_batch=state.step * cfg.train.gradient_accumulation_steps,
            rank=accelerator.process_index, world_size=accelerator.num_processes,
        ),
        collate_fn=Collate(cfg.train.text_max_length),
        num_workers=cfg.train.dataloader_num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.train.seed),  # keeps the global RNG (LoRA dropout) resumable
    )
    stop = _StopFlag()
    previous_handler = signal.signal(signal.SIGTERM, stop) if _in_main_thread() else None
    if main:
        run.write_status(status="training", step=state.step)
    progress = tqdm(total=cfg.train.max_train_steps, initial=state.step, disable=not (show_progress and main),
                    desc="training", unit="step")
    batches = iter(loader)
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    step_started = time.perf_counter()
    videos: list[Path] = []
    try:
        while state.step < cfg.train.max_train_steps:
            batch = next(batches)
            with accelerator.accumulate(transformer):
                loss = _micro_step(transformer, batch, cfg, state.generator, device, base_dtype)
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    if cfg.train.max_grad_norm is not None:
                        grad_norm = accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
                    elif cfg.train.max_grad_value is not None:
                        accelerator.clip_grad_value_(params, cfg.train.max_grad_value)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            loss_count += 1
            if not accelerator.sync_gradients:
                continue
            lr_scheduler.step()
            state.step += 1
            progress.update(1)
            if state.step % cfg.train.log_every_n_steps == 0 or state.step == cfg.train.max_train_steps:
                seconds = (time.perf_counter() - step_started) / cfg.train.log_every_n_steps
                record = {"step": state.step, "loss": accelerator.reduce(loss_sum, "mean").item() / loss_count,
                          "lr": lr_scheduler.get_last_lr()[0], "s_per_step": round(seconds, 4)}
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                if device.type == "cuda":
                    record["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                if main:
                    run.log_metrics(record)
                    progress.set_postfix(loss=f"{record['loss']:.4f}", s_step=f"{seconds:.2f}")
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state.step)
                loss_sum.zero_()
                loss_count = 0
                step_started = time.perf_counter()
            last = state.step == cfg.train.max_train_steps
            if state.step % cfg.checkpoint.every_n_steps == 0 or stop.requested or last:  # last: a run can be extended
                save_checkpoint(accelerator, run, state.step, cfg.checkpoint.total_limit)
            if stop.requested:
                if main:
                    run.write_status(status="stopped", step=state.step)
                raise KeyboardInterrupt(f"stopped by SIGTERM after step {state.step} (checkpoint saved)")
            every = cfg.validation.every_n_steps
            if (every and state.step % every == 0 and not last) or (last and cfg.validation.at_end):
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # resumable RNG
                    videos += _validate(cfg, run, accelerator, transformer, val, state.step, device, base_dtype)
                step_started = time.perf_counter()
            if on_step is not None:
                on_step(state.step)
    finally:
        progress.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)

    lora_file = _save_final_lora(cfg, run, accelerator, transformer)
    accelerator.end_training()
    if main:
        run.write_status(status="completed", step=state.step, lora=str(lora_file.relative_to(run.root)),
                         videos=[str(v.relative_to(run.root)) for v in videos], error=None)
    return TrainResult(run.root, lora_file, videos, report.built, state.step)


def _micro_step(transformer, batch, cfg: WanforgeConfig, generator: torch.Generator, device, dtype) -> torch.Tensor:
    latents = batch["latents"].to(device, non_blocking=True).float()
    text = batch["text"].to(device, non_blocking=True)
    sigmas = sample_sigmas(latents.shape[0], cfg.flow, generator)
    noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(device)
    noisy = noisy_input(latents, noise, sigmas)
    prediction = transformer(
        hidden_states=noisy.to(dtype), timestep=timesteps_from_sigmas(sigmas).to(device),
        encoder_hidden_states=text.to(dtype), return_dict=False,
    )[0]
    return flow_loss(prediction, flow_target(latents, noise))


def _validation_texts(cfg: WanforgeConfig) -> list[str]:
    texts = [cfg.validation.negative_prompt]
    if cfg.validation.prompt:
        texts.append(cfg.validation.prompt)
    return texts


def _validate(cfg, run: RunDir, accelerator, transformer, val: ValidationSettings, step: int, device, base_dtype) -> list[Path]:
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return []
    prompt, negative = text_embeds(cfg, [val.prompt, val.negative_prompt], device)
    vae = load_vae(cfg.model, torch.float32).to(device)
    autocast = base_dtype if base_dtype != torch.float32 else None
    path = render(accelerator.unwrap_model(transformer), vae, val, prompt, negative, run.validation / f"step-{step}",
                  device, autocast)
    del vae
    if device.type == "cuda":
        torch.cuda.empty_cache()
    run.log_metrics({"step": step, "validation_video": str(path.relative_to(run.root))})
    _log_video(accelerator, cfg, path, step)
    accelerator.wait_for_everyone()
    return [path]


def _save_final_lora(cfg: WanforgeConfig, run: RunDir, accelerator, transformer) -> Path:
    from peft.utils import get_peft_model_state_dict

    accelerator.wait_for_everyone()
    state = get_peft_model_state_dict(accelerator.unwrap_model(transformer), adapter_name="default")
    info = {"flavour": cfg.model.flavour, "rank": str(cfg.lora.rank), "alpha": str(cfg.lora.effective_alpha),
            "steps": str(cfg.train.max_train_steps)}
    if not accelerator.is_main_process:
        return run.lora
    return save_lora(state, run.lora, rank=cfg.lora.rank, alpha=cfg.lora.effective_alpha, fmt=cfg.lora.save_format,
                     dtype=getattr(torch, cfg.lora.save_dtype), info=info)


def _init_trackers(cfg: WanforgeConfig, run: RunDir, accelerator) -> None:
    if cfg.tracking.report_to == "none":
        return
    run_id = run.read_status().get("run_id")
    name = cfg.tracking.run_name or run.root.name
    init_kwargs = {"wandb": {"name": name, "id": run_id, "resume": "allow"}} if cfg.tracking.report_to == "wandb" else {}
    flat = {f"{section}.{k}": (v if isinstance(v, (int, float, str, bool)) else str(v))
            for section, values in to_toml_dict(cfg).items() if isinstance(values, dict) for k, v in values.items()}
    accelerator.init_trackers(cfg.tracking.project, config=flat, init_kwargs=init_kwargs)


def _log_video(accelerator, cfg: WanforgeConfig, path: Path, step: int) -> None:
    if cfg.tracking.report_to == "wandb":
        import wandb

        accelerator.get_tracker("wandb").log({"validation": wandb.Video(str(path), format="mp4")}, step=step)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()

