"""What ends a training run early and cleanly, checked only where the loop already waits for the device.

- Non-finite training: each optimizer step folds "the loss or the gradient norm is NaN/inf" into a device-side record
  of the first bad step (no host sync); `check` reads it where the loop syncs anyway (logging, checkpoints,
  validation, the end) and raises NonFiniteTraining before anything is saved, so the last checkpoint stays good.
  Under fp16 the gradient check is left to the loss scaler, whose job is to skip overflowing steps.
- SIGTERM / Ctrl-C (`StopSignals`): inside the loop they ask for a stop, which the loop honours after the step by
  saving a checkpoint and raising RunStopped; anywhere else they raise RunStopped at once. A second one aborts.
"""

from __future__ import annotations

import logging
import signal
import threading

import torch

from trainer.errors import RunStopped
from trainer.outputs.finite import NonFiniteError

log = logging.getLogger(__name__)


class NonFiniteTraining(NonFiniteError):
    def __init__(self, step: int, causes: str):
        super().__init__(f"training diverged: the loss or a gradient became NaN/inf at step {step}, so the run "
                         f"stopped and nothing from that step on was saved. Likely causes: {causes}")
        self.step = step


def likely_causes(cfg, mixed_precision: str) -> str:
    causes = [f"a learning rate too high (optim.learning_rate = {cfg.optim.learning_rate:g}; LoRAs train at "
              "about 1e-5 to 1e-4)"]
    if cfg.train.max_grad_norm is None:
        causes.append("no gradient clipping (train.max_grad_norm = 1.0 limits a bad step)")
    if mixed_precision == "fp16":
        causes.append('fp16 overflow (train.mixed_precision = "bf16" on a GPU that has it, else "no")')
    if cfg.flow.timestep_sampling == "shift":
        causes.append(f"flow.shift = {cfg.flow.shift:g} putting most steps at extreme noise levels")
    return "; ".join(causes)


class TrainingGuard:
    """The device-side record of the first non-finite step, and the stop request, agreed across ranks in `check`."""

    def __init__(self, device: torch.device, check_gradients: bool, causes: str):
        self.first_bad = torch.zeros((), dtype=torch.int64, device=device)
        self._bad = torch.zeros((), dtype=torch.bool, device=device)
        self.check_gradients, self.causes = check_gradients, causes

    def watch_loss(self, loss: torch.Tensor) -> None:
        """After each micro-batch (no sync: a device op)."""
        self._bad.logical_or_(~torch.isfinite(loss.detach()).all())

    def gradient_norm(self, params: list[torch.nn.Parameter]) -> torch.Tensor | None:
        """The total gradient norm, on the device (when clipping by norm is off; None when not checked)."""
        grads = [p.grad for p in params if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads and self.check_gradients else None

    def after_step(self, step: int, grad_norm: torch.Tensor | None) -> None:
        """Once per optimizer step, with its final gradient norm (clipping's, or gradient_norm's)."""
        if self.check_gradients and grad_norm is not None:
            self._bad.logical_or_(~torch.isfinite(grad_norm.to(self._bad.device)))
        self.first_bad.masked_fill_(self._bad & (self.first_bad == 0), step)
        self._bad.zero_()

    def check(self, accelerator, stop_signal: int) -> int:
        """Host sync: raise NonFiniteTraining if a step went bad; return the stop signal any rank received (0: none)."""
        flags = torch.stack([self.first_bad, torch.tensor(stop_signal, device=self.first_bad.device)])
        if accelerator.num_processes > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        first_bad, signum = flags.tolist()
        if first_bad:
            raise NonFiniteTraining(first_bad, self.causes)
        return signum


class StopSignals:
    """SIGTERM and SIGINT handlers for the life of a run (main thread only; elsewhere nothing is installed)."""

    def __init__(self) -> None:
        self.signum = 0
        self.deferred = False  # True inside the loop: a signal asks for a stop at the end of the step
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.deferred and not self.signum:
            self.signum = signum
            log.warning("%s: finishing this step, saving a checkpoint, then stopping (again to abort now)",
                        signal.Signals(signum).name)
            return
        raise RunStopped(signum, f"{signal.Signals(signum).name} before a checkpoint could be saved")
