"""The whole config (`WanforgeConfig`): one section per table, and the checks that need more than one section."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field, model_validator

from trainer.config.data import CacheConfig, DatasetConfig
from trainer.config.model import LoraConfig, MemoryConfig, ModelConfig
from trainer.config.outputs import HubConfig, TrackingConfig, ValidationConfig
from trainer.config.section import Section
from trainer.config.training import (CheckpointConfig, CrepaConfig, EmaConfig, FlowConfig, OptimConfig,
                                     ScheduledSamplingConfig, TrainConfig, TreadConfig)
from trainer.flavours import FLAVOURS

_log = logging.getLogger(__name__)


class WanforgeConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    datasets: list[DatasetConfig] = Field(default_factory=list, description="One or more [[datasets]] tables.")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    flow: FlowConfig = Field(default_factory=FlowConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ema: EmaConfig = Field(default_factory=EmaConfig)
    hub: HubConfig = Field(default_factory=HubConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    tread: TreadConfig = Field(default_factory=TreadConfig)
    crepa: CrepaConfig = Field(default_factory=CrepaConfig)
    scheduled_sampling: ScheduledSamplingConfig = Field(default_factory=ScheduledSamplingConfig)

    @model_validator(mode="before")
    @classmethod
    def _old_section_names(cls, data: Any) -> Any:
        """`[rollout]` was the first name of `[scheduled_sampling]`: configs that use it still load, with a warning."""
        if isinstance(data, dict) and "rollout" in data and "scheduled_sampling" not in data:
            _log.warning("[rollout] is now called [scheduled_sampling]: rename the section (it was read as that)")
            data = {("scheduled_sampling" if k == "rollout" else k): v for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _needs_data(self) -> WanforgeConfig:
        if not self.datasets:
            raise ValueError('no dataset: add a [[datasets]] table with path = "folder/of/clips"')
        step = FLAVOURS[self.model.flavour].vae_spatial * 2  # VAE downscale x patch 2: 16, or 32 for the Wan 2.2 VAE
        for i in range(len(self.datasets)):
            _, height, width = self.dataset_shape(i)
            if height % step or width % step:
                raise ValueError(
                    f"datasets[{i}]: {width}x{height} does not fit {self.model.flavour} (its VAE and patching need "
                    f"multiples of {step}): try {max(step, width // step * step)}x{max(step, height // step * step)}"
                )
        return self

    @model_validator(mode="after")
    def _fp8_needs_a_standard_lora(self) -> WanforgeConfig:
        if self.lora.lora_type != "lycoris":
            return self
        why = ('works with lora.lora_type = "lora" only (LyCORIS adds its delta to the base weight itself, which fp8 '
               "keeps quantized)")
        if self.memory.base_quantization == "fp8":
            raise ValueError(f'memory.base_quantization = "fp8" {why}: set lora.lora_type = "lora", or '
                             'memory.base_quantization = "int8" to keep LyCORIS')
        if self.memory.preset == "balanced-fp8":
            raise ValueError(f'memory.preset = "balanced-fp8" {why}: set lora.lora_type = "lora", or '
                             'memory.preset = "balanced" to keep LyCORIS')
        return self

    def dataset_shape(self, index: int = 0) -> tuple[int, int, int]:
        """(num_frames, height, width) of a dataset, with the flavour's defaults filled in."""
        f = FLAVOURS[self.model.flavour]
        d = self.datasets[index]
        return (d.num_frames or f.num_frames, d.height or f.height, d.width or f.width)
