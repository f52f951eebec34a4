"""What a training run does between optimizer steps, each action deciding for itself whether it is due.

After every optimizer step the loop hands the step to `PeriodicActions.after_step`: when any action is due (or this
process caught a stop signal) the ranks sync once (non-finite check, agreed stop), then each due action runs in order:
metrics record, checkpoint, its Hub upload, the stop, eval loss, validation videos. A resumed run starts after its
checkpoint's step, so nothing done at that step runs again; a run resumed at its very end makes again only what the
resume dropped from metrics.jsonl (eval loss, validation)."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from trainer.errors import RunStopped
from trainer.loop.checkpointing import save_checkpoint
from trainer.loop.eval_loss import log_eval_loss


@dataclass(frozen=True)
class Tick:
    """One finished optimizer step as the actions see it."""

    step: int
    last: bool  # the run's final step
    stop: int = 0  # a stop signal the ranks agreed on (0: none)


@dataclass(frozen=True)
class Schedule:
    """Due every `every` steps (0: never) before the last step; at the last step, due when `at_end`."""

    every: int
    at_end: bool

    def due(self, tick: Tick) -> bool:
        """Whether the schedule falls on this step."""
        if tick.last:
            return self.at_end
        return self.every > 0 and tick.step % self.every == 0


class PeriodicAction(Protocol):
    """An action between steps: `due` is pure (asked twice a step), `run` does the work."""

    redo_at_resumed_end: bool  # its output after the last checkpoint is dropped on resume, so a resumed end redoes it
    restarts_clock: bool  # the step clock restarts after it (its time is not training time)

    def due(self, tick: Tick) -> bool: ...

    def run(self, tick: Tick) -> None: ...


class StepClock:
    """Seconds per optimizer step since the clock last restarted (after a record, eval or validation)."""

    def __init__(self, step: int) -> None:
        self.restart(step)

    def restart(self, step: int) -> None:
        """Count from now and from `step`."""
        self.started, self.from_step = time.perf_counter(), step

    def seconds_per_step(self, step: int) -> float:
        """Wall seconds per step since the last restart."""
        return (time.perf_counter() - self.started) / max(step - self.from_step, 1)


class PeriodicActions:
    """Runs the due actions after each step. `agree(signum)` is the ranks' one sync (raises on a non-finite step before
    anything is saved, returns the stop signal any rank caught); a single process syncs at once on a signal, several
    only where an action is due anyway."""

    def __init__(self, actions: list[PeriodicAction], max_steps: int, start_step: int, clock: StepClock,
                 agree: Callable[[int], int], single_process: bool) -> None:
        self.actions, self.max_steps, self.start_step, self.clock = actions, max_steps, start_step, clock
        self.agree, self.single_process = agree, single_process

    def after_step(self, step: int, signum: int) -> None:
        """Sync if anything is due or a lone process was signalled, then run each due action in order."""
        quiet = Tick(step, step == self.max_steps)
        stop = signum if self.single_process else 0
        if stop or any(action.due(quiet) for action in self.actions):
            stop = self.agree(signum)
        self._run_due(Tick(quiet.step, quiet.last, stop), self.actions)

    def end_of_run(self) -> None:
        """A run resumed at its final step (killed after the last checkpoint) makes its final eval and validation."""
        if self.start_step >= self.max_steps:
            self._run_due(Tick(self.start_step, True), [a for a in self.actions if a.redo_at_resumed_end])

    def _run_due(self, tick: Tick, actions: list[PeriodicAction]) -> None:
        """Each of `actions` that is due at `tick`, in order; the clock restarts after those that ask for it."""
        for action in actions:
            if action.due(tick):  # asked just before it runs: an upload sees the checkpoint saved this step
                action.run(tick)
                if action.restarts_clock:
                    self.clock.restart(tick.step)


class ScheduledAction:
    """An action due when its `schedule` falls on the step; subclasses say what `run` does."""

    redo_at_resumed_end, restarts_clock = False, False

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule

    def due(self, tick: Tick) -> bool:
        """Whether its schedule falls on this step."""
        return self.schedule.due(tick)


class MetricsLog(ScheduledAction):
    """The step record (mean loss since the last one, learning rate, s/step, gradient norm, the step extras' metrics,
    peak GPU memory) into metrics.jsonl, the trackers, the progress bar and the webhooks."""

    restarts_clock = True

    def __init__(self, schedule: Schedule, accelerator, run, webhooks, progress, lr_scheduler, extras, clock: StepClock,
                 max_steps: int) -> None:
        super().__init__(schedule)
        self.accelerator, self.run_dir, self.webhooks, self.progress = accelerator, run, webhooks, progress
        self.lr_scheduler, self.extras, self.clock, self.max_steps = lr_scheduler, extras, clock, max_steps
        self.loss_sum = torch.zeros((), device=accelerator.device)
        self.loss_count = 0
        self.grad_norm: torch.Tensor | None = None

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """After each micro-batch: its loss joins the mean; the gradient norm is the latest optimizer step's."""
        self.loss_sum += loss.detach()
        self.loss_count += 1
        self.grad_norm = grad_norm

    def run(self, tick: Tick) -> None:
        """Reduce the loss over the ranks, write the record everywhere it goes, start the next mean."""
        device = self.accelerator.device
        mean_loss = self.accelerator.reduce(self.loss_sum, "mean").item() / self.loss_count  # waits for the GPU's queue
        seconds = self.clock.seconds_per_step(tick.step)
        record = {"step": tick.step, "loss": mean_loss,
                  "lr": self.lr_scheduler.get_last_lr()[0], "s_per_step": round(seconds, 4)}
        if self.grad_norm is not None:
            record["grad_norm"] = float(self.grad_norm)
        if self.extras is not None:
            record.update(self.extras.metrics)
        if device.type == "cuda":
            record["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if self.accelerator.is_main_process:
            self.run_dir.log_metrics(record)
            self.progress.set_postfix(loss=f"{record['loss']:.4f}", s_step=f"{seconds:.2f}")
            self.webhooks.progress(tick.step, self.max_steps, record)
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=tick.step)
        self.loss_sum.zero_()
        self.loss_count = 0


class CheckpointSave(ScheduledAction):
    """A resumable checkpoint when scheduled (always at the last step, so a run can be extended) and at a stop."""

    def __init__(self, schedule: Schedule, accelerator, run, keep: int | None, transformer, resumable: dict,
                 config_text: str, ema) -> None:
        super().__init__(schedule)
        self.accelerator, self.run_dir, self.keep = accelerator, run, keep
        self.transformer, self.resumable, self.config_text, self.ema = transformer, resumable, config_text, ema
        self.saved: tuple[int, Path] | None = None  # (step, folder) of this process's latest save

    def due(self, tick: Tick) -> bool:
        """Scheduled, or the run is stopping."""
        return self.schedule.due(tick) or bool(tick.stop)

    def run(self, tick: Tick) -> None:
        """Save (every rank its part, trainer.loop.checkpointing) and remember where."""
        folder = save_checkpoint(self.accelerator, self.run_dir, tick.step, self.keep, self.transformer, self.resumable,
                                 self.config_text, self.ema.shadow if self.ema is not None else [])
        self.saved = (tick.step, folder)


class CheckpointUpload:
    """The checkpoint just saved, queued for the Hub (main process, with hub.push_checkpoints)."""

    redo_at_resumed_end, restarts_clock = False, False

    def __init__(self, checkpoint: CheckpointSave, publisher) -> None:
        self.checkpoint, self.publisher = checkpoint, publisher

    def due(self, tick: Tick) -> bool:
        """A checkpoint was saved at this very step."""
        return self.checkpoint.saved is not None and self.checkpoint.saved[0] == tick.step

    def run(self, tick: Tick) -> None:
        """Queue it (the upload runs in the background)."""
        self.publisher.push_checkpoint(self.checkpoint.saved[1], tick.step)


class StopAtSignal:
    """SIGTERM / Ctrl-C: after the step's checkpoint, run.json `stopped` and RunStopped (resumable)."""

    redo_at_resumed_end, restarts_clock = False, False

    def __init__(self, accelerator, run) -> None:
        self.accelerator, self.run_dir = accelerator, run

    def due(self, tick: Tick) -> bool:
        """The ranks agreed on a stop signal."""
        return bool(tick.stop)

    def run(self, tick: Tick) -> None:
        """Record `stopped` and end the run."""
        if self.accelerator.is_main_process:
            self.run_dir.write_status(status="stopped", step=tick.step, error=None)
        raise RunStopped(tick.stop, f"{signal.Signals(tick.stop).name}: stopped after step {tick.step}, checkpoint "
                                    "saved (go on with --resume latest)")


class EvalLoss(ScheduledAction):
    """The fixed-noise eval loss of the held samples (trainer.loop.eval_loss) into metrics.jsonl and the trackers."""

    redo_at_resumed_end, restarts_clock = True, True

    def __init__(self, schedule: Schedule, accelerator, transformer, samples: list, cfg, run) -> None:
        super().__init__(schedule)
        self.accelerator, self.transformer, self.samples, self.cfg, self.run_dir = (accelerator, transformer, samples,
                                                                                    cfg, run)

    def run(self, tick: Tick) -> None:
        """Measure on the main process (the others wait) and log it."""
        log_eval_loss(self.accelerator, self.transformer, self.samples, self.cfg, self.run_dir, self.accelerator.device,
                      tick.step)


class ValidationVideos(ScheduledAction):
    """A validation round (trainer.outputs.validation_round) with the live weights; keeps the paths of every video made."""

    redo_at_resumed_end, restarts_clock = True, True

    def __init__(self, schedule: Schedule, validator, accelerator, transformer) -> None:
        super().__init__(schedule)
        self.validator, self.accelerator, self.transformer = validator, accelerator, transformer
        self.videos: list[Path] = []

    def run(self, tick: Tick) -> None:
        """Render on the main process (the others wait), with training's RNG set aside so a resume draws the same."""
        device = self.accelerator.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            self.videos += self.validator(self.accelerator, self.transformer, tick.step)
