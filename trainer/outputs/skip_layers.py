"""Skip-layer guidance for the Wan pipelines, inside a window of the sampling steps.

diffusers has the pieces but not for WanPipeline: its `SkipLayerGuidance` guider only runs in modular pipelines,
while its layer-skip hooks (`apply_layer_skip`) work on any transformer. So a diffusers `ModelHook` on the
transformer watches the pipeline's own "cond" call (the pipelines name their calls through `cache_context`), and
inside the window runs the same call again with the chosen blocks skipped, returning

    cond' = cond + (scale / guidance) * (cond - cond_skipped)

The pipeline then forms uncond + guidance * (cond' - uncond) = uncond + guidance * (cond - uncond)
+ scale * (cond - cond_skipped): exactly the guider's formula. Without CFG (guidance <= 1) the factor is scale.
The step comes from the scheduler (its step index), which every Wan pipeline advances the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

HOOK_NAME = "wanforge_skip_layer_guidance"


@dataclass(frozen=True)
class SkipLayerGuidance:
    layers: tuple[int, ...]
    start: float  # fraction of the sampling steps, counted from the first (noisiest) step
    stop: float  # exclusive
    scale: float

    def active(self, step_index: int, num_steps: int) -> bool:
        return self.start <= step_index / num_steps < self.stop and self.scale > 0


def _hook_class():
    from diffusers.hooks import HookRegistry, LayerSkipConfig, ModelHook, apply_layer_skip
    from diffusers.hooks.hooks import BaseState, StateManager
    from diffusers.hooks.layer_skip import _LAYER_SKIP_HOOK

    class _Nothing(BaseState):
        def reset(self, *args, **kwargs) -> None:
            pass

    class SkipLayerGuidanceHook(ModelHook):
        _is_stateful = True  # so the pipeline's cache_context (the "cond"/"uncond" name) reaches us

        def __init__(self, slg: SkipLayerGuidance, scheduler, guidance_scale: float):
            super().__init__()
            self.slg, self.scheduler = slg, scheduler
            self.factor = slg.scale / guidance_scale if guidance_scale > 1.0 else slg.scale
            self.context = StateManager(_Nothing)

        def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
            self.context.reset()
            return module

        def new_forward(self, module: torch.nn.Module, *args, **kwargs):
            output = self.fn_ref.original_forward(*args, **kwargs)
            context = self.context._context
            if context is None or context.name != "cond":
                return output
            step = self.scheduler.step_index or 0
            if not self.slg.active(step, len(self.scheduler.timesteps)):
                return output
            registry = HookRegistry.check_if_exists_or_initialize(module)
            apply_layer_skip(module, LayerSkipConfig(indices=list(self.slg.layers), fqn="blocks"))
            try:
                skipped = self.fn_ref.original_forward(*args, **kwargs)
            finally:
                registry.remove_hook(_LAYER_SKIP_HOOK, recurse=True)
                registry.invalidate_child_registries_cache()
            cond, cond_skipped = _first(output), _first(skipped)
            return _replace_first(output, cond + self.factor * (cond - cond_skipped))

    return SkipLayerGuidanceHook


def _first(output):
    return output[0] if isinstance(output, tuple) else output.sample


def _replace_first(output, value):
    if isinstance(output, tuple):
        return (value, *output[1:])
    output.sample = value
    return output


@contextmanager
def skip_layer_guidance(denoisers: list, scheduler, slg: SkipLayerGuidance | None,
                        guidance_scales: list[float]) -> Iterator[list]:
    """Install the hook on each denoiser (both experts of Wan 2.2, each with its own guidance scale) for the duration
    of one pipeline call."""
    if slg is None:
        yield []
        return
    from diffusers.hooks import HookRegistry

    hook_class = _hook_class()
    hooks = []
    for model, guidance_scale in zip(denoisers, guidance_scales):
        blocks = len(model.blocks)
        bad = [i for i in slg.layers if i >= blocks]
        if bad:
            from trainer.errors import UserError

            raise UserError(f"validation.skip_layers: {bad} out of range, the model has blocks 0..{blocks - 1}")
        hook = hook_class(slg, scheduler, guidance_scale)
        HookRegistry.check_if_exists_or_initialize(model).register_hook(hook, HOOK_NAME)
        hooks.append(hook)
    try:
        yield hooks
    finally:
        for model in denoisers:
            HookRegistry.check_if_exists_or_initialize(model).remove_hook(HOOK_NAME, recurse=False)
