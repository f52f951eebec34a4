"""The training recipe: caches -> transformer + LoRA -> flow-matching loop on accelerate -> checkpoints, LoRA, videos."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from trainer.cache import build_caches
from trainer.checkpointing import (OptimizerState, SchedulePosition, TrainState, checkpoint_config, load_checkpoint,
                                   save_checkpoint, verify_checkpoint)
from trainer.components import base_model_path
from trainer.conditioning import build_conditioning, with_conditioning
from trainer.config import WanforgeConfig, save_config
from trainer.dataset import Collate, TrainingData
from trainer.ema import AdapterEMA, weights_for
from trainer.errors import RunStopped, UserError
from trainer.eval_loss import eval_due, log_eval_loss, split_eval_samples
from trainer.experts import save_expert_loras, setup_expert_pair
from trainer.export import save_adapter
from trainer.hub import HubPublisher, final_upload_remedy, publish_final, tracker_note
from trainer.flavours import get_flavour
from trainer.guard import NonFiniteError, StopSignals, TrainingGuard, likely_causes, require_finite
from trainer.lora import adapter_state_dict, trainable_parameters
from trainer.distributed import noise_generator
from trainer.memory_presets import host_memory_gib, memory_choice, resolve_memory
from trainer.sizing import config_tokens
from trainer.optim import make_lr_scheduler, make_optimizer
from trainer.resume import check_resume_settings
from trainer.rundir import RunDir
from trainer.sharding import full_tensors, prepare_sharded
from trainer.step_extras import StepExtras
from trainer.tracking import init_trackers, run_id_for
from trainer.trainable import build_trainable_transformer
from trainer.training_step import training_step
from trainer.validation_round import TrainingValidator
from trainer.validation_videos import settings_for, validation_texts
from trainer.webhooks import Webhooks

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


def train(
    cfg: WanforgeConfig,
    resume: str | None = None,
    show_progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train a LoRA as the config says. `on_step(step)` runs after each optimizer step (tests, notebooks).

    One process writes a run folder at a time (a lock, rank 0's under several processes); SIGTERM / Ctrl-C save a
    checkpoint and raise RunStopped (run.json `stopped`); a NaN/inf loss or gradient raises NonFiniteTraining
    (`failed`, naming the last good checkpoint) before anything non-finite is saved."""
    from accelerate import Accelerator

    from trainer.preflight import preflight

    preflight(cfg, resume=resume).raise_if_invalid()  # every mistake a config can hold, before any cache or model
    run = RunDir(cfg.train.output_dir)
    cuda = torch.cuda.is_available()
    mixed_precision, base_dtype = _precision(cfg, cuda)
    accelerator = Accelerator(
        cpu=not cuda,  # on CPU, torchrun's processes then form a gloo group instead of N independent runs
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with=None if cfg.tracking.report_to == "none" else cfg.tracking.report_to,
        project_dir=str(run.root),
    )
    try:
        _lock_run(run, accelerator)
        return _train_locked(cfg, run, accelerator, resume, base_dtype, show_progress, on_step)
    finally:
        run.unlock()


def _lock_run(run: RunDir, accelerator) -> None:
    """Rank 0 takes the run folder's lock; every rank learns whether it got it (so none trains on alone)."""
    refused: UserError | None = None
    if accelerator.is_main_process:
        try:
            run.lock("train")
        except UserError as err:
            refused = err
    if accelerator.num_processes > 1:
        flag = torch.tensor([0 if refused is None else 1], device=accelerator.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if refused is None and flag.item():
            refused = UserError(f"{run.root} is in use by another wanforge process (see rank 0's message)")
    if refused is not None:
        raise refused


def _train_locked(cfg: WanforgeConfig, run: RunDir, accelerator, resume: str | None, base_dtype, show_progress: bool,
                  on_step) -> TrainResult:
    from accelerate.utils import set_seed

    main = accelerator.is_main_process
    resume_from = run.resolve_resume(resume) if resume else None
    if resume_from is None and run.complete_checkpoints():
        raise UserError(
            f"{run.root} already has checkpoints: pass --resume latest to continue that run, "
            "or set train.output_dir to a new folder"
        )
    device = accelerator.device
    gpu_gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    host_gib = host_memory_gib() / int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # each local process offloads
    memory = resolve_memory(cfg.memory, get_flavour(cfg.model.flavour), gpu_gib, tokens=config_tokens(cfg),
                            batch=cfg.train.train_batch_size, host_gib=host_gib)
    memory_record = memory_choice(cfg.memory, memory, gpu_gib, host_gib)
    cfg = cfg.model_copy(update={"memory": memory})
    start_step, changes = _check_resume(cfg, resume_from)
    set_seed(cfg.train.seed)
    if main:
        run.create()
        run.remove_stale_temp()
        if resume_from is not None and (aside := run.abandon_after(start_step)) is not None:
            _say(f"resuming at step {start_step} abandons the later checkpoints: moved them to {aside}", show_progress)
        run.truncate_metrics_after(start_step, drop_after_checkpoint=start_step >= cfg.train.max_train_steps)
        save_config(cfg, run.config)  # after the resume check: config.toml is what trains
        run.write_status(status="caching", fresh=True, run_id=run_id_for(run),
                         max_train_steps=cfg.train.max_train_steps, memory=memory_record,
                         resumed_from=str(resume_from) if resume_from is not None else None)
        if resume_from is not None:
            _say(f"resumed from step {start_step} ({resume_from})"
                 + ("; taking effect: " + "; ".join(changes) if changes else ""), show_progress)
    accelerator.wait_for_everyone()
    webhooks = Webhooks.from_config(cfg.tracking.webhook_config if main else None,
                                    cfg.tracking.run_name or run.root.name)
    try:
        with StopSignals() as signals:
            return _train(cfg, run, accelerator, device, base_dtype, resume_from, show_progress, on_step, webhooks,
                          signals)
    except BaseException as err:
        if main:
            _record_failure(run, cfg, err, webhooks)
        raise
    finally:
        webhooks.close()


def _check_resume(cfg: WanforgeConfig, resume_from: Path | None) -> tuple[int, list[str]]:
    """(the step a resume starts from, the changed settings that take effect); refuses what can't change."""
    if resume_from is None:
        return 0, []
    step = verify_checkpoint(resume_from)
    if step > cfg.train.max_train_steps:
        raise UserError(f"--resume {resume_from}: the checkpoint is at step {step}, past train.max_train_steps = "
                        f"{cfg.train.max_train_steps}: set train.max_train_steps = {step} or more")
    saved = checkpoint_config(resume_from)
    return step, (check_resume_settings(saved, cfg, str(resume_from)) if saved is not None else [])


def _record_failure(run: RunDir, cfg: WanforgeConfig, err: BaseException, webhooks: Webhooks) -> None:
    """run.json after an exception: `stopped` (kept if the loop already wrote it) or `failed` with the error."""
    if isinstance(err, KeyboardInterrupt):
        if run.read_status().get("status") != "stopped":
            run.write_status(status="stopped", error=None, stop_reason=str(err))
        webhooks.send("info", f"stopped: {err}")
        return
    fields = {}
    if isinstance(err, NonFiniteError):
        done = run.complete_checkpoints()
        good = done[-1][1] if done else None
        lr = min(cfg.optim.learning_rate / 10, 1e-4)
        err.args = (f"{err}. " + (
            f"Last good checkpoint: {good}; go on from it with a lower learning rate: wanforge train CONFIG "
            f"--resume {good} --set optim.learning_rate={lr:g} (or from an earlier one, if its weights had already "
            "grown too large)" if good is not None else
            f"No checkpoint was saved before it: start again with a lower learning rate (optim.learning_rate = {lr:g})"),)
        fields = {"failed_at_step": getattr(err, "step", None),
                  "last_good_checkpoint": str(good.relative_to(run.root)) if good is not None else None}
    run.write_status(status="failed", error=f"{err.__class__.__name__}: {err}"[:2000], **fields)
    webhooks.error(err)


def _say(line: str, show_progress: bool) -> None:
    """A line the user should see once: printed by the CLI / notebook, logged when progress output is off."""
    if show_progress:
        print(line, flush=True)
    else:
        log.info(line)


def _train(cfg, run: RunDir, accelerator, device, base_dtype, resume_from, show_progress, on_step,
           webhooks: Webhooks, signals: StopSignals) -> TrainResult:
    main = accelerator.is_main_process
    flavour = get_flavour(cfg.model.flavour)  # resolved once for the loop
    def upload_failed(line: str) -> None:  # log (hub.py), webhook and tracker hear of every failed Hub upload
        webhooks.send("error", line)
        tracker_note(accelerator.trackers)(line)

    publisher = HubPublisher.maybe(cfg, run, on_error=upload_failed) if main else None
    with accelerator.main_process_first():  # one process builds the tiny model / fills the Hub cache, then the rest
        base_model_path(cfg.model)
    # ---- caches: the VAE and text encoder are loaded only for missing entries, then freed
    report = build_caches(cfg, device, extra_texts=validation_texts(cfg), show_progress=show_progress and main,
                          rank=accelerator.process_index, world_size=accelerator.num_processes,
                          barrier=accelerator.wait_for_everyone)
    train_samples, eval_samples = split_eval_samples(cfg, report.samples)
    # buckets, repeats, weights; a dataset too small for one optimizer step is a UserError suggesting repeats
    data = TrainingData.build(cfg, train_samples, report.skipped, accelerator.num_processes, report.empty_text_path)
    samples = data.samples
    if main:
        _say("\n".join(["buckets:", *data.report]), show_progress)  # the skipped files and why, once
    first_caption = report.samples[0][0].caption if report.samples and report.samples[0] else None
    val = settings_for(cfg, first_caption)

    # ---- model and adapter
    both = cfg.model.train_both_experts  # Wan 2.2 A14B: an ExpertPair, the idle expert in CPU RAM
    if both:
        transformer = setup_expert_pair(cfg, base_dtype, device, accelerator.num_processes)
    else:
        transformer = build_trainable_transformer(cfg, base_dtype, device)
    extras = StepExtras.install(transformer, cfg, device, base_dtype)  # TREAD, CREPA, rollout (None: all off)
    transformer.train()
    params = trainable_parameters(transformer)
    optimizer = make_optimizer(params, cfg.optim, device)
    if both:
        transformer.attach_optimizer(optimizer)
    lr_scheduler = make_lr_scheduler(optimizer, cfg.optim, cfg.train.max_train_steps)
    state = TrainState()
    if cfg.memory.shard_base:  # FSDP reduces the gradients: accelerate adds autocast only (trainer/sharding.py)
        transformer, optimizer = prepare_sharded(accelerator, transformer, optimizer)
    else:
        transformer, optimizer = accelerator.prepare(transformer, optimizer, device_placement=[not both, True])
    ema = AdapterEMA(params, cfg.ema) if cfg.ema.use_ema else None
    resumable = {"train": state, "optimizer": OptimizerState(optimizer), "lr_scheduler": SchedulePosition(lr_scheduler)}
    if ema is not None:
        resumable["ema"] = ema  # a resume continues the same average
    if extras is not None:
        resumable.update(extras.checkpoint_objects())
    if accelerator.scaler is not None:
        resumable["scaler"] = accelerator.scaler  # fp16 loss scale
    if resume_from is not None:
        load_checkpoint(accelerator, resume_from, transformer, resumable, optional={"scaler"})
    init_trackers(cfg, run, accelerator)
    validator = TrainingValidator(cfg, run, val, device, base_dtype, ema, webhooks)
    webhooks.send("info", (f"resumed at step {state.step}" if resume_from else "started")
                  + f": {cfg.train.max_train_steps} steps of {cfg.model.flavour}")
    guard = TrainingGuard(device, check_gradients=accelerator.scaler is None,
                          causes=likely_causes(cfg, accelerator.mixed_precision))
    config_text = run.config.read_text(encoding="utf-8") if main else ""

    dataset, collate = with_conditioning(  # I2V: the cached image conditioning joins each sample
        data.dataset(), Collate(cfg.train.text_max_length),
        build_conditioning(cfg, [s.latent_path for s in samples], device, show_progress and main),
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=data.batch_sampler(
            cfg.train.seed, start_batch=state.step * cfg.train.gradient_accumulation_steps,
            rank=accelerator.process_index, world_size=accelerator.num_processes,
        ),
        collate_fn=collate,
        num_workers=cfg.train.dataloader_num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.train.seed),  # keeps the global RNG (LoRA dropout) resumable
    )
    if main:
        run.write_status(status="training", step=state.step)
    progress = tqdm(total=cfg.train.max_train_steps, initial=state.step, disable=not (show_progress and main),
                    desc="training", unit="step")
    batches = iter(loader)
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    if device.type == "cuda":  # peak_gib is the training peak, not the caching pass's VAE / text encoder
        torch.cuda.reset_peak_memory_stats(device)
    step_started, timed_from_step = time.perf_counter(), state.step
    videos: list[Path] = []
    micro = state.step * cfg.train.gradient_accumulation_steps  # this rank's micro-batches so far
    resumed_at_end = state.step >= cfg.train.max_train_steps  # killed after the last checkpoint: finish the end
    signals.deferred = True  # from here a signal finishes the step and saves a checkpoint
    try:
        while state.step < cfg.train.max_train_steps:
            batch = next(batches)
            generator = noise_generator(cfg.train.seed, micro * accelerator.num_processes + accelerator.process_index,
                                        device)
            micro += 1
            with accelerator.accumulate(transformer):
                loss = training_step(transformer, batch, cfg, generator, device, base_dtype, extras, state.step,
                                     flavour)
                accelerator.backward(loss)
                guard.watch_loss(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    if cfg.train.max_grad_norm is not None:
                        grad_norm = accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
                    else:
                        grad_norm = guard.gradient_norm(params)  # before value clipping hides an inf
                        if cfg.train.max_grad_value is not None:
                            accelerator.clip_grad_value_(params, cfg.train.max_grad_value)
                    grad_norm = full_tensors(grad_norm)  # sharded: gathered from every rank's part
                    guard.after_step(state.step + 1, grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            loss_count += 1
            if not accelerator.sync_gradients:
                continue
            lr_scheduler.step()
            state.step += 1
            if ema is not None:
                ema.after_step(state.step)
            progress.update(1)
            last = state.step == cfg.train.max_train_steps
            due_log = state.step % cfg.train.log_every_n_steps == 0 or last
            due_checkpoint = state.step % cfg.checkpoint.every_n_steps == 0 or last  # last: a run can be extended
            due_eval = bool(eval_samples) and eval_due(cfg, state.step, last)
            due_validation = validator.due(state.step, last)
            stop = signals.signum if accelerator.num_processes == 1 else 0  # ranks agree on it where they sync
            if due_log or due_checkpoint or due_eval or due_validation or stop:
                stop = guard.check(accelerator, signals.signum)  # raises NonFiniteTraining before anything is saved
            if due_log:
                mean_loss = accelerator.reduce(loss_sum, "mean").item() / loss_count  # waits for the GPU's queue
                seconds = (time.perf_counter() - step_started) / max(state.step - timed_from_step, 1)
                record = {"step": state.step, "loss": mean_loss,
                          "lr": lr_scheduler.get_last_lr()[0], "s_per_step": round(seconds, 4)}
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                if extras is not None:
                    record.update(extras.metrics)
                if device.type == "cuda":
                    record["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                if main:
                    run.log_metrics(record)
                    progress.set_postfix(loss=f"{record['loss']:.4f}", s_step=f"{seconds:.2f}")
                    webhooks.progress(state.step, cfg.train.max_train_steps, record)
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state.step)
                loss_sum.zero_()
                loss_count = 0
                step_started, timed_from_step = time.perf_counter(), state.step
            if due_checkpoint or stop:
                checkpoint = save_checkpoint(accelerator, run, state.step, cfg.checkpoint.total_limit, transformer,
                                             resumable, config_text, ema.shadow if ema is not None else [])
                if publisher is not None:
                    publisher.push_checkpoint(checkpoint, state.step)
            if stop:
                if main:
                    run.write_status(status="stopped", step=state.step, error=None)
                raise RunStopped(stop, f"{signal.Signals(stop).name}: stopped after step {state.step}, checkpoint "
                                       "saved (go on with --resume latest)")
            if due_eval:
                log_eval_loss(accelerator, transformer, eval_samples, cfg, run, device, state.step)
                step_started, timed_from_step = time.perf_counter(), state.step
            if due_validation:
                videos += _validate(validator, accelerator, transformer, state.step, device)
                step_started, timed_from_step = time.perf_counter(), state.step
            if on_step is not None:
                on_step(state.step)
    finally:
        signals.deferred = False
        progress.close()
    if resumed_at_end:  # the final eval / validation of a run killed after its last checkpoint
        if eval_samples and eval_due(cfg, state.step, True):
            log_eval_loss(accelerator, transformer, eval_samples, cfg, run, device, state.step)
        if validator.due(state.step, True):
            videos += _validate(validator, accelerator, transformer, state.step, device)

    if both:
        lora_file = save_expert_loras(cfg, run, accelerator, transformer)
    else:
        lora_file = _save_final_lora(cfg, run, accelerator, transformer)
    ema_file = _save_final_lora(cfg, run, accelerator, transformer, ema) if ema is not None else None
    accelerator.end_training()
    if main:
        publish_final(publisher, cfg, run, val, lora_file, ema_file, validator.last, state.step)
        hub_errors = publisher.wait() if publisher is not None else []  # the run is done: let uploads finish
        final_error = publisher.final_failure(hub_errors) if publisher is not None else None
        run.write_status(status="upload_failed" if final_error else "completed", step=state.step,
                         lora=str(lora_file.relative_to(run.root)), videos=[str(v.relative_to(run.root)) for v in videos],
                         error=final_error, hub_errors=hub_errors,
                         remedy=final_upload_remedy(cfg.hub.hub_model_id, run.root) if final_error else None)
        webhooks.send("info", f"finished after {state.step} steps" + (f"; {hub_errors[0]}" if hub_errors else ""))
    return TrainResult(run.root, lora_file, videos, report.built, state.step)


def _validate(validator: TrainingValidator, accelerator, transformer, step: int, device) -> list[Path]:
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # resumable RNG
        return validator(accelerator, transformer, step)


def _save_final_lora(cfg: WanforgeConfig, run: RunDir, accelerator, transformer, ema: AdapterEMA | None = None) -> Path:
    """The live adapter into lora/, or with `ema` the averaged one into lora/ema/."""
    accelerator.wait_for_everyone()
    with weights_for("ema" if ema is not None else "", ema):  # clone: the state shares storage with the parameters
        state = {k: v.detach().clone() for k, v in adapter_state_dict(accelerator.unwrap_model(transformer)).items()}
    require_finite(state, "the final EMA LoRA" if ema is not None else "the final LoRA")
    info = {"flavour": cfg.model.flavour, "rank": str(cfg.lora.rank), "alpha": str(cfg.lora.effective_alpha),
            "steps": str(cfg.train.max_train_steps)}
    if not accelerator.is_main_process:
        return run.lora
    return save_adapter(accelerator.unwrap_model(transformer), state, run.lora / "ema" if ema is not None else run.lora,
                        cfg.lora, info)  # trainer.export: the one writer of LoRA files


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()

