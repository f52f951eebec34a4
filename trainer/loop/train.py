"""The training recipe, read top to bottom: `train` (preflight, accelerate, the run folder's lock) -> `_train_locked`
(resume check, memory preset, run.json, signals) -> `_train`: `_prepare` (caches, model, optimizer, resumed state,
loader, periodic actions) -> `_loop` (micro-steps, then trainer.loop.periodic's due actions) -> `_finish` (LoRA files,
final upload, run.json). The components live in their own modules; this file only orders them."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from trainer.config.files import save_config
from trainer.config.schema import WanforgeConfig
from trainer.data.cache import Sample, build_caches
from trainer.data.conditioning import build_conditioning, with_conditioning
from trainer.data.dataset import Collate, TrainingData
from trainer.distributed import keep_until_exit, noise_generator
from trainer.errors import DiskFull, OutOfMemory, UserError, is_disk_full, is_out_of_memory
from trainer.flavours import Flavour, get_flavour
from trainer.loop.checkpointing import (OptimizerState, SchedulePosition, TrainState, checkpoint_config, load_checkpoint,
                                   verify_checkpoint)
from trainer.loop.eval_loss import split_eval_samples
from trainer.loop.guard import StopSignals, TrainingGuard, likely_causes
from trainer.loop.optim import make_lr_scheduler, make_optimizer
from trainer.loop.periodic import (CheckpointSave, CheckpointUpload, EvalLoss, MetricsLog, PeriodicAction, PeriodicActions,
                              Schedule, StepClock, StopAtSignal, ValidationVideos)
from trainer.loop.resume import check_resume_settings
from trainer.loop.step_extras import StepExtras
from trainer.loop.training_step import training_step
from trainer.model.components import base_model_path
from trainer.model.context_parallel import backward_scale, data_parallel
from trainer.model.ema import AdapterEMA, weights_for
from trainer.model.experts import setup_expert_pair
from trainer.model.lora import adapter_state_dict, trainable_parameters
from trainer.model.preset_choice import memory_choice, resolve_memory
from trainer.model.sharding import full_tensors, prepare_sharded
from trainer.model.sizing import host_memory_gib
from trainer.model.sizing import config_tokens, idle_expert_gib
from trainer.model.trainable import build_trainable_transformer
from trainer.outputs.export import save_expert_loras
from trainer.outputs.export import save_adapter
from trainer.outputs.finite import NonFiniteError, require_finite
from trainer.outputs.hub import HubPublisher, final_upload_remedy, publish_final, tracker_note
from trainer.outputs.tracking import init_trackers, run_id_for
from trainer.outputs.validation_round import TrainingValidator
from trainer.outputs.validation_videos import ValidationSettings, settings_for, validation_texts
from trainer.outputs.webhooks import Webhooks
from trainer.rundir import RunDir

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished run made: its folder, the LoRA file, the validation videos, cache entries built, last step."""

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

    from trainer.preflight.check import preflight

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
    """Check the resume, choose the memory preset, start run.json (`caching`) and the webhooks, then train under the
    stop signals; any exception is recorded in run.json (`stopped` or `failed`) before it propagates."""
    from accelerate.utils import set_seed

    main = accelerator.is_main_process
    resume_from = run.resolve_resume(resume) if resume else None
    if resume is None and run.complete_checkpoints():  # (`latest` with none usable: a fresh start, warned above)
        raise UserError(
            f"{run.root} already has checkpoints: pass --resume latest to continue that run, "
            "or set train.output_dir to a new folder"
        )
    device = accelerator.device
    gpu_gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    host_gib = (host_memory_gib() - idle_expert_gib(cfg)) / int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # offloaders
    flavour = get_flavour(cfg.model.flavour)  # resolved once for the whole run
    memory = resolve_memory(cfg.memory, flavour, gpu_gib, tokens=config_tokens(cfg),
                            batch=cfg.train.train_batch_size, host_gib=host_gib,
                            both_experts=cfg.model.train_both_experts)
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
    reached = Reached(start_step)
    try:
        with StopSignals() as signals:
            return _train(cfg, run, accelerator, flavour, base_dtype, resume_from, show_progress, on_step, webhooks,
                          signals, reached)
    except BaseException as err:
        plain = _plain_fault(run, err, reached, accelerator.device)
        if main:
            try:
                _record_failure(run, cfg, plain or err, webhooks, reached)
            except OSError as record_err:  # the disk that failed may refuse run.json too: the error still counts
                log.error("could not record the failure in %s: %s", run.run_json, record_err)
        if plain is not None:
            raise plain from None
        raise
    finally:
        webhooks.close()


@dataclass
class Reached:
    """How far a run got, for the line and run.json a fault mid-run leaves: the last finished optimizer step and the
    latent shape of the batch in hand."""

    step: int = 0
    latents: tuple[int, ...] | None = None


def _plain_fault(run: RunDir, err: BaseException, reached: Reached, device: torch.device) -> UserError | None:
    """A full disk or a size too big for memory, as the one line the CLI prints (exit 2, no traceback)."""
    if isinstance(err, UserError) or not isinstance(err, Exception):
        return None
    if is_disk_full(err):
        done = run.complete_checkpoints()
        good = f"the last good checkpoint is {done[-1][1]}" if done else "no checkpoint was saved yet"
        where = next((e.filename for e in _chain(err) if isinstance(e, OSError) and e.filename), None)
        when = f"after step {reached.step}" if reached.step else "before the first step"
        return DiskFull(f"disk full: no space left on the device{f' writing {where}' if where else ''} {when} "
                        f"({good}; run.json keeps both): free space there (df -h {run.root}), then go on with: "
                        "wanforge train CONFIG --resume latest")
    if is_out_of_memory(err):
        return OutOfMemory(f"out of {device.type.upper()} memory at step {reached.step + 1} training "
                           f"{_shape(reached.latents)}: this size does not fit this machine (the clips are fine): "
                           'lower the datasets\' resolution or num_frames or train.train_batch_size, or set '
                           'memory.preset = "low"')
    return None


def _chain(err: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while err is not None and err not in out:
        out.append(err)
        err = err.__cause__ or err.__context__
    return out


def _shape(latents: tuple[int, ...] | None) -> str:
    """[B, C, F', h, w] latents as the frames they came from: "2 clips of 832x480x81" (the VAE packs 4 frames and
    8x8 pixels per latent; the 2.2 VAE 16x16, which the channel count tells)."""
    if latents is None or len(latents) != 5:
        return "its first batch"
    b, c, f, h, w = latents
    px = 16 if c == 48 else 8
    return f"{b} clip(s) of {w * px}x{h * px}x{(f - 1) * 4 + 1}"


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


def _record_failure(run: RunDir, cfg: WanforgeConfig, err: BaseException, webhooks: Webhooks,
                    reached: Reached) -> None:
    """run.json after an exception: `stopped` (kept if the loop already wrote it) or `failed` with the error, the step
    reached and the last good checkpoint."""
    if isinstance(err, KeyboardInterrupt):
        if run.read_status().get("status") != "stopped":
            run.write_status(status="stopped", error=None, stop_reason=str(err))
        webhooks.send("info", f"stopped: {err}")
        return
    done = run.complete_checkpoints()
    fields: dict[str, Any] = {"step": reached.step,
                              "last_good_checkpoint": str(done[-1][1].relative_to(run.root)) if done else None}
    if isinstance(err, NonFiniteError):
        done = run.complete_checkpoints()
        good = done[-1][1] if done else None
        lr = min(cfg.optim.learning_rate / 10, 1e-4)
        err.args = (f"{err}. " + (
            f"Last good checkpoint: {good}; go on from it with a lower learning rate: wanforge train CONFIG "
            f"--resume {good} --set optim.learning_rate={lr:g} (or from an earlier one, if its weights had already "
            "grown too large)" if good is not None else
            f"No checkpoint was saved before it: start again with a lower learning rate (optim.learning_rate = {lr:g})"),)
        fields["failed_at_step"] = getattr(err, "step", None)
    run.write_status(status="failed", error=f"{err.__class__.__name__}: {err}"[:2000], **fields)
    webhooks.error(err)


def _say(line: str, show_progress: bool) -> None:
    """A line the user should see once: printed by the CLI / notebook, logged when progress output is off."""
    if show_progress:
        print(line, flush=True)
    else:
        log.info(line)


@dataclass
class Training:
    """What `_prepare` builds once and the loop and the finish then use."""

    cfg: WanforgeConfig
    run: RunDir
    accelerator: Any
    flavour: Flavour
    base_dtype: torch.dtype
    transformer: Any
    params: list[torch.nn.Parameter]
    optimizer: Any
    lr_scheduler: Any
    state: TrainState
    ema: AdapterEMA | None
    extras: StepExtras | None
    guard: TrainingGuard
    loader: torch.utils.data.DataLoader
    progress: Any
    metrics: MetricsLog
    validation: ValidationVideos
    periodic: PeriodicActions
    publisher: HubPublisher | None
    webhooks: Webhooks
    settings: ValidationSettings
    caches_built: int
    reached: Reached = field(default_factory=Reached)


def _train(cfg: WanforgeConfig, run: RunDir, accelerator, flavour: Flavour, base_dtype: torch.dtype,
           resume_from: Path | None, show_progress: bool, on_step, webhooks: Webhooks,
           signals: StopSignals, reached: Reached) -> TrainResult:
    """The recipe: prepare everything once, loop over the optimizer steps, finish with the LoRA files and the upload."""
    training = _prepare(cfg, run, accelerator, flavour, base_dtype, resume_from, show_progress, webhooks)
    training.reached = reached
    if accelerator.num_processes > 1:  # its process group must outlive it (trainer/distributed.py)
        keep_until_exit(training)
    _loop(training, signals, on_step)
    return _finish(training)


def _prepare(cfg: WanforgeConfig, run: RunDir, accelerator, flavour: Flavour, base_dtype: torch.dtype,
             resume_from: Path | None, show_progress: bool, webhooks: Webhooks) -> Training:
    """Caches and data, the trainable model and its optimizer, the resumed state, trackers, the loader and the
    periodic actions, in this order (it is also the order the seeded RNG is drawn in)."""
    main, device = accelerator.is_main_process, accelerator.device
    publisher = _hub_publisher(cfg, run, accelerator, webhooks)
    data, eval_samples, settings, caches_built = _prepare_data(cfg, accelerator, show_progress)
    transformer, extras, params, optimizer, lr_scheduler = _prepare_model(cfg, accelerator, base_dtype)
    state, ema, resumable = _resume_state(cfg, accelerator, transformer, params, optimizer, lr_scheduler, extras,
                                          resume_from)
    init_trackers(cfg, run, accelerator)
    validator = TrainingValidator(cfg, run, settings, device, base_dtype, ema, webhooks)
    webhooks.send("info", (f"resumed at step {state.step}" if resume_from else "started")
                  + f": {cfg.train.max_train_steps} steps of {cfg.model.flavour}")
    guard = TrainingGuard(device, check_gradients=accelerator.scaler is None,
                          causes=likely_causes(cfg, accelerator.mixed_precision))
    loader = _loader(cfg, data, state.step, accelerator, show_progress)
    if main:
        run.write_status(status="training", step=state.step)
    progress = tqdm(total=cfg.train.max_train_steps, initial=state.step, disable=not (show_progress and main),
                    desc="training", unit="step")
    clock = StepClock(state.step)
    metrics = MetricsLog(Schedule(cfg.train.log_every_n_steps, at_end=True), accelerator, run, webhooks, progress,
                         lr_scheduler, extras, clock, cfg.train.max_train_steps)
    checkpoint = CheckpointSave(Schedule(cfg.checkpoint.every_n_steps, at_end=True), accelerator, run,
                                cfg.checkpoint.total_limit, transformer, resumable,
                                run.config.read_text(encoding="utf-8") if main else "", ema)
    validation = ValidationVideos(Schedule(cfg.validation.every_n_steps, at_end=cfg.validation.at_end), validator,
                                  accelerator, transformer)
    actions: list[PeriodicAction] = [metrics, checkpoint]
    if publisher is not None:
        actions.append(CheckpointUpload(checkpoint, publisher))
    actions.append(StopAtSignal(accelerator, run))
    if eval_samples:
        actions.append(EvalLoss(Schedule(cfg.validation.eval_every_n_steps, at_end=True), accelerator, transformer,
                                eval_samples, cfg, run))
    actions.append(validation)
    periodic = PeriodicActions(actions, cfg.train.max_train_steps, state.step, clock,
                               agree=lambda signum: guard.check(accelerator, signum),
                               single_process=accelerator.num_processes == 1)
    return Training(cfg, run, accelerator, flavour, base_dtype, transformer, params, optimizer, lr_scheduler, state,
                    ema, extras, guard, loader, progress, metrics, validation, periodic, publisher, webhooks, settings,
                    caches_built)


def _hub_publisher(cfg: WanforgeConfig, run: RunDir, accelerator, webhooks: Webhooks) -> HubPublisher | None:
    """The main process's Hub uploader (None when the Hub is off); the log, webhooks and trackers hear of every
    failed upload."""
    if not accelerator.is_main_process:
        return None

    def upload_failed(line: str) -> None:
        webhooks.send("error", line)
        tracker_note(accelerator.trackers)(line)

    return HubPublisher.maybe(cfg, run, on_error=upload_failed)


def _prepare_data(cfg: WanforgeConfig, accelerator, show_progress: bool
                  ) -> tuple[TrainingData, list[Sample], ValidationSettings, int]:
    """(the training data, the eval samples, the validation settings, cache entries built). The caches load the VAE
    and text encoder only for missing entries, each rank its share; a dataset too small for one optimizer step is a
    UserError suggesting repeats."""
    main = accelerator.is_main_process
    with accelerator.main_process_first():  # one process builds the tiny model / fills the Hub cache, then the rest
        base_model_path(cfg.model)
    report = build_caches(cfg, accelerator.device, extra_texts=validation_texts(cfg),
                          show_progress=show_progress and main, rank=accelerator.process_index,
                          world_size=accelerator.num_processes, barrier=accelerator.wait_for_everyone)
    train_samples, eval_samples = split_eval_samples(cfg, report.samples)
    data = TrainingData.build(cfg, train_samples, report.skipped, _data_rank(cfg, accelerator)[1],
                              report.empty_text_path)
    if main:
        _say("\n".join(["buckets:", *data.report]), show_progress)  # the skipped files and why, once
    from trainer.outputs.vace_validation import default_caption

    first_caption = default_caption(cfg, [s.caption for s in report.samples[0]] if report.samples else [])
    return data, eval_samples, settings_for(cfg, first_caption), report.built


def _prepare_model(cfg: WanforgeConfig, accelerator, base_dtype: torch.dtype):
    """(transformer, step extras, trainable parameters, optimizer, LR schedule), the first two through accelerate.
    Wan 2.2 A14B with both experts: an ExpertPair whose idle expert waits in CPU RAM (accelerate leaves it in place)."""
    device = accelerator.device
    both = cfg.model.train_both_experts
    if both:
        transformer = setup_expert_pair(cfg, base_dtype, device, accelerator.num_processes)
    else:
        transformer = build_trainable_transformer(cfg, base_dtype, device)
    extras = StepExtras.install(transformer, cfg, device, base_dtype)  # TREAD, CREPA, scheduled sampling (None: off)
    transformer.train()
    params = trainable_parameters(transformer)
    optimizer = make_optimizer(params, cfg.optim, device)
    if both:
        transformer.attach_optimizer(optimizer)
    lr_scheduler = make_lr_scheduler(optimizer, cfg.optim, cfg.train.max_train_steps)
    if cfg.memory.shard_base:  # FSDP reduces the gradients: accelerate adds autocast only (trainer/model/sharding.py)
        transformer, optimizer = prepare_sharded(accelerator, transformer, optimizer)
    else:
        transformer, optimizer = accelerator.prepare(transformer, optimizer, device_placement=[not both, True])
    return transformer, extras, params, optimizer, lr_scheduler


def _resume_state(cfg: WanforgeConfig, accelerator, transformer, params, optimizer, lr_scheduler,
                  extras: StepExtras | None, resume_from: Path | None
                  ) -> tuple[TrainState, AdapterEMA | None, dict[str, Any]]:
    """(step counter, EMA, every object a checkpoint saves), loaded from `resume_from` when resuming, so the run
    goes on with the same optimizer, schedule, average, extras and fp16 loss scale."""
    state = TrainState()
    ema = AdapterEMA(params, cfg.ema) if cfg.ema.use_ema else None
    resumable = {"train": state, "optimizer": OptimizerState(optimizer), "lr_scheduler": SchedulePosition(lr_scheduler)}
    if ema is not None:
        resumable["ema"] = ema
    if extras is not None:
        resumable.update(extras.checkpoint_objects())
    if accelerator.scaler is not None:
        resumable["scaler"] = accelerator.scaler
    if resume_from is not None:
        load_checkpoint(accelerator, resume_from, transformer, resumable, optional={"scaler"})
    return state, ema, resumable


def _data_rank(cfg: WanforgeConfig, accelerator) -> tuple[int, int]:
    """(rank, size) of this process among the data-parallel ranks: every process, except under context parallel,
    where the processes of one group train on the same micro-batches (trainer/model/context_parallel.py)."""
    return data_parallel(accelerator.process_index, accelerator.num_processes, cfg.memory.context_parallel)


def _loader(cfg: WanforgeConfig, data: TrainingData, step: int, accelerator, show_progress: bool
            ) -> torch.utils.data.DataLoader:
    """This rank's batches from `step` on, with the cached I2V conditioning joined to each sample; its own seeded
    generator keeps the global RNG (LoRA dropout) resumable."""
    device = accelerator.device
    rank, world_size = _data_rank(cfg, accelerator)
    dataset, collate = with_conditioning(
        data.dataset(), Collate(cfg.train.text_max_length),
        build_conditioning(cfg, [s.latent_path for s in data.samples], device,
                           show_progress and accelerator.is_main_process),
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=data.batch_sampler(
            cfg.train.seed, start_batch=step * cfg.train.gradient_accumulation_steps, rank=rank, world_size=world_size,
        ),
        collate_fn=collate,
        num_workers=cfg.train.dataloader_num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )


def _loop(t: Training, signals: StopSignals, on_step) -> None:
    """Optimizer steps until max_train_steps, each followed by the periodic actions and `on_step`. Inside the loop a
    stop signal finishes the step and saves a checkpoint."""
    accelerator, state = t.accelerator, t.state
    batches = iter(t.loader)
    micro = state.step * t.cfg.train.gradient_accumulation_steps  # this rank's micro-batches so far
    if accelerator.device.type == "cuda":  # peak_gib is the training peak, not the caching pass's VAE / text encoder
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    t.periodic.clock.restart(state.step)
    signals.deferred = True
    try:
        while state.step < t.cfg.train.max_train_steps:
            loss, grad_norm = _micro_step(t, next(batches), micro)
            micro += 1
            t.metrics.add(loss, grad_norm)
            if not accelerator.sync_gradients:
                continue
            t.lr_scheduler.step()
            state.step += 1
            t.reached.step = state.step
            if t.ema is not None:
                t.ema.after_step(state.step)
            t.progress.update(1)
            t.periodic.after_step(state.step, signals.signum)
            if on_step is not None:
                on_step(state.step)
    finally:
        signals.deferred = False
        t.progress.close()


def _micro_step(t: Training, batch: dict, micro: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss, gradient norm) of one micro-batch under accelerate's accumulation; the last micro-batch of a step
    clips, checks and applies the gradients. Its noise is seeded by (seed, micro-batch, data-parallel rank): a resume
    draws the same, and the ranks of a context-parallel group draw alike (their gradients sum: the backward scale)."""
    cfg, accelerator = t.cfg, t.accelerator
    rank, world_size = _data_rank(cfg, accelerator)
    generator = noise_generator(cfg.train.seed, micro * world_size + rank, accelerator.device)
    t.reached.latents = tuple(batch["latents"].shape)
    with accelerator.accumulate(t.transformer):
        loss = training_step(t.transformer, batch, cfg, generator, accelerator.device, t.base_dtype, t.extras,
                             t.state.step, t.flavour)
        scale = backward_scale(cfg.memory.context_parallel)
        accelerator.backward(loss * scale if scale != 1 else loss)
        t.guard.watch_loss(loss)
        grad_norm = _clip_gradients(t) if accelerator.sync_gradients else None
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


def _clip_gradients(t: Training) -> torch.Tensor | None:
    """Clip by norm or by value as configured and record the step's gradient norm with the non-finite guard."""
    cfg, accelerator = t.cfg, t.accelerator
    if cfg.train.max_grad_norm is not None:
        grad_norm = accelerator.clip_grad_norm_(t.params, cfg.train.max_grad_norm)
    else:
        grad_norm = t.guard.gradient_norm(t.params)  # before value clipping hides an inf
        if cfg.train.max_grad_value is not None:
            accelerator.clip_grad_value_(t.params, cfg.train.max_grad_value)
    grad_norm = full_tensors(grad_norm)  # sharded: gathered from every rank's part
    t.guard.after_step(t.state.step + 1, grad_norm)
    return grad_norm


def _finish(t: Training) -> TrainResult:
    """After the last step: the end a resumed run still owes, the LoRA files (live, EMA), the final Hub upload and
    run.json `completed` (or `upload_failed`)."""
    cfg, run, accelerator, step = t.cfg, t.run, t.accelerator, t.state.step
    t.periodic.end_of_run()
    if cfg.model.train_both_experts:
        lora_file = save_expert_loras(cfg, run, accelerator, t.transformer)
    else:
        lora_file = _save_final_lora(cfg, run, accelerator, t.transformer)
    ema_file = _save_final_lora(cfg, run, accelerator, t.transformer, t.ema) if t.ema is not None else None
    accelerator.end_training()
    videos = t.validation.videos
    if accelerator.is_main_process:
        publish_final(t.publisher, cfg, run, t.settings, lora_file, ema_file, t.validation.validator.last, step)
        hub_errors = t.publisher.wait() if t.publisher is not None else []  # the run is done: let uploads finish
        final_error = t.publisher.final_failure(hub_errors) if t.publisher is not None else None
        run.write_status(status="upload_failed" if final_error else "completed", step=step,
                         lora=str(lora_file.relative_to(run.root)), videos=[str(v.relative_to(run.root)) for v in videos],
                         video_settings=t.validation.validator.video_settings,
                         error=final_error, hub_errors=hub_errors,
                         remedy=final_upload_remedy(cfg.hub.hub_model_id, run.root) if final_error else None)
        t.webhooks.send("info", f"finished after {step} steps" + (f"; {hub_errors[0]}" if hub_errors else ""))
    return TrainResult(run.root, lora_file, videos, t.caches_built, step)


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
                        cfg.lora, info)  # trainer.outputs.export: the one writer of LoRA files
