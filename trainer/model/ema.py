"""An exponential moving average of the adapter (the LoRA weights only), through diffusers' EMAModel.

Every checkpoint holds it (trainer.loop.checkpointing) and a resume continues it exactly.
Validation swaps the EMA weights in and back out (`swapped_in`), as `ema.validation` asks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from trainer.config.training import EmaConfig


class AdapterEMA:
    def __init__(self, params: list[torch.nn.Parameter], cfg: EmaConfig):
        from diffusers.training_utils import EMAModel

        self.params = params
        self.interval, self.decay = cfg.update_interval, cfg.decay
        # EMAModel warms the decay up as (1+n)/(10+n) over the first updates, then holds `decay`.
        self.model = EMAModel(params, decay=cfg.decay)

    def after_step(self, step: int) -> None:
        """Call after each optimizer step: updates every `update_interval` steps."""
        if step % self.interval == 0:
            self.model.step(self.params)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The EMA weights in the live parameters for the duration; the live ones come back after, bit for bit."""
        self.model.store(self.params)
        self.model.copy_to(self.params)
        try:
            yield
        finally:
            self.model.restore(self.params)

    @property
    def shadow(self) -> list[torch.Tensor]:
        return self.model.shadow_params

    # the state_dict / load_state_dict protocol trainer.loop.checkpointing saves and restores
    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
        self.model.decay = self.decay  # the current ema.decay takes effect on a resume
        self.model.to(device=self.params[0].device)  # checkpoints load onto the CPU


def validation_variants(ema: AdapterEMA | None, setting: str) -> list[str]:
    """Which weights validation renders: "" (live) and/or "ema"."""
    if ema is None or setting == "none":
        return [""]
    return ["ema"] if setting == "ema_only" else ["", "ema"]


@contextmanager
def weights_for(variant: str, ema: AdapterEMA | None) -> Iterator[None]:
    if variant == "ema":
        assert ema is not None
        with ema.swapped_in():
            yield
    else:
        yield
