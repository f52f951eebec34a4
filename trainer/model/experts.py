"""Wan 2.2 A14B experts: which expert a step trains, the boundary between them, and the pair of trainable experts.

diffusers layout: `transformer` is the HIGH-noise expert (timestep t >= boundary * 1000), `transformer_2` the LOW-noise
expert (t < boundary * 1000); boundary 0.875 for T2V, 0.9 for I2V. The timestep is sigma * 1000, so the split is
sigma >= boundary (high) / sigma < boundary (low). Noise levels restricted to one expert's side are drawn in
trainer/loop/flow.py (stage_sigmas).
"""

from __future__ import annotations

import functools
import logging

import torch

from trainer.flavours import Flavour, Stage
from trainer.model.streaming import move_trainable

log = logging.getLogger(__name__)
def expert_boundary(model) -> float | None:
    """The Wan 2.2 A14B boundary to train and render with: the checkpoint's own `boundary_ratio` when its config states
    one (a warning when it differs from the flavour's), else the flavour's; None for models without experts."""
    from trainer.model.components import base_model_path

    return _boundary(model.flavour, base_model_path(model), model.revision)


@functools.lru_cache(maxsize=16)
def _boundary(flavour_name: str, base: str, revision: str | None) -> float | None:
    from trainer.config.model import ModelConfig
    from trainer.flavours import get_flavour
    from trainer.model.components import pipeline_boundary

    flavour = get_flavour(flavour_name)
    if flavour.boundary is None:
        return None
    own = pipeline_boundary(ModelConfig(flavour=flavour_name, pretrained_model_name_or_path=base, revision=revision))
    if own is None:
        return flavour.boundary
    if abs(own - flavour.boundary) > 1e-9:
        log.warning("%s states boundary_ratio %s, the %s flavour %s: training the experts on the model's own %s",
                    base, own, flavour_name, flavour.boundary, own)
    return own


def expert_for_step(step: int, first: Stage, every: int) -> Stage:
    """train_both_experts: blocks of `every` optimizer steps, starting with the flavour's own expert."""
    other: Stage = "low" if first == "high" else "high"
    return first if (step // every) % 2 == 0 else other


def active_stage(cfg, step: int, flavour: Flavour | None = None) -> Stage | None:
    """The expert optimizer step `step` trains: the flavour's, or alternating blocks with train_both_experts.
    `flavour`: the config's, when the caller has resolved it already."""
    from trainer.flavours import get_flavour

    flavour = flavour or get_flavour(cfg.model.flavour)
    if not flavour.is_expert:
        return None
    if cfg.model.train_both_experts:
        return expert_for_step(step, flavour.stage, cfg.model.expert_switch_every_n_steps)
    return flavour.stage


# ---------------------------------------------------------------- train_both_experts


class ExpertPair(torch.nn.Module):
    """Both Wan 2.2 A14B experts, each with its own LoRA; forward runs the active one. The idle expert's frozen weights
    wait in one page-locked host buffer (`_IdleSlot`); its LoRA parameters keep their identity, so the optimizer and
    its state stay valid (AdamW skips them while they have no gradient)."""

    def __init__(self, high, low, offloaders: dict | None = None):
        super().__init__()
        self.high, self.low = high, low
        self.active: Stage = "high"
        self.config = high.config
        self._slot: _IdleSlot | None = None
        # each expert's activation offloader (trainer.model.offload), one pinned pool between them: one expert trains at a time
        self._offloaders = {stage: o for stage, o in (offloaders or {}).items() if o is not None}
        if len(self._offloaders) == 2:
            self._offloaders["low"].pool = self._offloaders["high"].pool

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Both experts' adapters, keys prefixed "high." / "low." (checkpoints)."""
        from trainer.model.lora import adapter_state_dict

        return {f"{stage}.{k}": v for stage in ("high", "low") for k, v in adapter_state_dict(self.expert(stage)).items()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> list[str]:
        from trainer.model.lora import load_adapter_state_dict

        unexpected = [k for k in state if not k.startswith(("high.", "low."))]
        for stage in ("high", "low"):
            part = {k.removeprefix(f"{stage}."): v for k, v in state.items() if k.startswith(f"{stage}.")}
            unexpected += [f"{stage}.{k}" for k in load_adapter_state_dict(self.expert(stage), part)]
        return unexpected

    def expert(self, stage: Stage):
        return self.high if stage == "high" else self.low

    @property
    def patch_embedding(self):
        return self.expert(self.active).patch_embedding

    def attach_optimizer(self, optimizer) -> None:
        """The optimizer whose state follows each expert's LoRA between CPU and GPU (a resume loads it wherever the
        parameters are; the fused AdamW kernel needs it beside them)."""
        self._optimizer = optimizer

    def _move_optimizer_state(self, expert, device) -> None:
        optimizer = getattr(self, "_optimizer", None)
        if optimizer is None:
            return
        fused = any(group.get("fused") for group in optimizer.param_groups)
        for p in expert.parameters():
            state = optimizer.state.get(p)
            for key, value in (state or {}).items():
                if torch.is_tensor(value) and (value.dim() > 0 or fused):  # non-fused AdamW keeps `step` on the CPU
                    state[key] = value.to(device)

    def activate(self, stage: Stage, device: torch.device) -> None:
        """Make `stage` the expert on `device` and put the other one in host RAM. The frozen weights trade places with
        the other expert's through the page-locked idle slot (both copy directions at once, on side streams); experts
        whose frozen tensors are not plain tensors of one layout (int8 / fp8 bases) move with `Module.to` instead."""
        incoming, outgoing = self.expert(stage), self.expert("low" if stage == "high" else "high")
        if self._slot is not None:
            self._slot.exchange(frozen_tensors(incoming), frozen_tensors(outgoing))
            move_trainable(outgoing, torch.device("cpu"))
            move_trainable(incoming, device)
        else:
            if not _on(outgoing, torch.device("cpu")):
                outgoing.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            incoming.to(device)
            if _same_layout(incoming, outgoing):  # from now on the idle expert waits in the page-locked slot
                self._slot = _IdleSlot(frozen_tensors(outgoing), device)
        self._move_optimizer_state(outgoing, torch.device("cpu"))
        self._move_optimizer_state(incoming, device)
        if stage in self._offloaders:  # its weights have new addresses now: still never offloaded
            self._offloaders[stage].exclude_parameters(incoming, replace=True)
        self.active = stage

    def set_host_budget(self, max_host_bytes: int | None) -> None:
        """The activation offload's host cap, for both experts (after the idle one took its share of host RAM)."""
        for offloader in self._offloaders.values():
            offloader.set_host_budget(max_host_bytes)

    def settled(self, stage: Stage, device: torch.device) -> bool:
        """`stage` runs on `device` and the other expert is back in host RAM (validation puts both on the device)."""
        other = self.expert("low" if stage == "high" else "high")
        idle = self._slot.holds(frozen_tensors(other)) if self._slot is not None else _on(other, torch.device("cpu"))
        return self.active == stage and _on(self.expert(stage), device) and idle

    def forward(self, *args, **kwargs):
        return self.expert(self.active)(*args, **kwargs)


def frozen_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """The base weights: frozen parameters, then buffers, in module order (the same order for both experts)."""
    return [p for p in module.parameters() if not p.requires_grad] + list(module.buffers())


def _on(module: torch.nn.Module, device: torch.device) -> bool:
    t = next(iter(frozen_tensors(module)), None)
    return t is not None and t.device.type == device.type


def _same_layout(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Both experts' frozen tensors are plain tensors of the same shapes and dtypes (one slot can hold either)."""
    ta, tb = frozen_tensors(a), frozen_tensors(b)
    plain = (torch.Tensor, torch.nn.Parameter)
    return bool(ta) and len(ta) == len(tb) and all(
        type(x) in plain and type(y) in plain and x.shape == y.shape and x.dtype == y.dtype for x, y in zip(ta, tb))


_CHUNK_BYTES = 1 << 30  # copies in flight at most two of these ahead: the GPU never holds both experts whole


class _IdleSlot:
    """One exact-size page-locked host buffer (as the activation offload's) holding the idle expert's frozen tensors.

    An exchange copies each incoming tensor from its slot view to a new device tensor (host to device) and then the
    matching outgoing tensor into the view it left (device to host), on two side streams so both directions run at
    once; the outgoing tensor becomes that view. Built once from the idle expert (one copy into the buffer).
    Written here because `Module.to` goes through pageable memory one direction at a time.
    """

    def __init__(self, idle: list[torch.Tensor], device: torch.device) -> None:
        from trainer.model.offload import PinnedPool, pinned_copies

        self.device = device
        self.cuda = device.type == "cuda"
        self._pool = PinnedPool(self.cuda)  # owns the buffer (and unregisters it when the slot goes)
        self.views = pinned_copies(self._pool, [t.data for t in idle])
        for view, t in zip(self.views, idle):
            t.data = view

    def holds(self, tensors: list[torch.Tensor]) -> bool:
        return all(t.data_ptr() == v.data_ptr() for t, v in zip(tensors, self.views))

    def exchange(self, incoming: list[torch.Tensor], outgoing: list[torch.Tensor]) -> None:
        """`incoming` to the device (from the slot, or wherever else it is), `outgoing` into the slot; tensor by
        tensor, each only where it is not there already (validation puts both experts on the device)."""
        if not self.cuda:
            for t_in, t_out, view in zip(incoming, outgoing, self.views):
                if t_in.data_ptr() == view.data_ptr():
                    t_in.data = t_in.data.clone()
                if t_out.data_ptr() != view.data_ptr():
                    view.copy_(t_out.data)
                    t_out.data = view
            return
        current = torch.cuda.current_stream(self.device)
        up, down = torch.cuda.Stream(self.device), torch.cuda.Stream(self.device)
        up.wait_stream(current)  # the outgoing expert's last kernels, and blocks the allocator hands out below
        down.wait_stream(current)
        chunks: list[torch.cuda.Event] = []
        in_chunk = 0
        for t_in, t_out, view in zip(incoming, outgoing, self.views):
            if t_in.data_ptr() == view.data_ptr() or t_in.device.type != "cuda":
                arrived = torch.empty_like(view, device=self.device)
                with torch.cuda.stream(up):
                    arrived.copy_(t_in.data, non_blocking=True)
                down.wait_event(up.record_event())  # the slot view is read before it is overwritten
                t_in.data = arrived
            if t_out.data_ptr() != view.data_ptr():
                leaving = t_out.data
                with torch.cuda.stream(down):
                    view.copy_(leaving, non_blocking=True)
                leaving.record_stream(down)  # its device memory is reused only after this copy
                t_out.data = view
                del leaving
            in_chunk += view.numel() * view.element_size()
            if in_chunk >= _CHUNK_BYTES:
                chunks.append(down.record_event())
                in_chunk = 0
                if len(chunks) > 2:
                    chunks[-3].synchronize()  # at most a few chunks of both experts on the device at once
        current.wait_stream(up)
        current.wait_stream(down)


def setup_expert_pair(cfg, dtype: torch.dtype, device: torch.device, num_processes: int) -> ExpertPair:
    """Both experts with LoRA and the memory options; the flavour's own expert active on the device."""
    from trainer.errors import UserError
    from trainer.model.components import load_transformer
    from trainer.model.trainable import make_trainable

    if num_processes > 1:
        raise UserError("model.train_both_experts runs on one GPU: train each expert as its own multi-GPU run instead")
    experts, offloaders = {}, {}
    for stage, sub in (("high", "transformer"), ("low", "transformer_2")):
        experts[stage] = load_transformer(cfg.model, dtype, subfolder=sub)
        offloaders[stage] = make_trainable(experts[stage], cfg.lora, cfg.memory, device, torch.device("cpu"))
    return assemble_pair(experts, offloaders, cfg.model.flavour, device)


def assemble_pair(experts: dict, offloaders: dict, flavour: str, device: torch.device) -> ExpertPair:
    """The pair of two trainable experts (base weights in host RAM): the flavour's own expert on the device, the other
    in the page-locked slot, and the offload's host cap taken again now that both have their place."""
    from trainer.flavours import get_flavour
    from trainer.model.memory import offload_host_budget

    pair = ExpertPair(experts["high"], experts["low"], offloaders)
    pair.activate(get_flavour(flavour).stage, device)
    pair.set_host_budget(offload_host_budget())
    return pair


def select_expert(transformer, stage: Stage | None, device: torch.device) -> None:
    """Before a micro-step: make `stage` the running expert of a pair (a no-op for one transformer)."""
    model = getattr(transformer, "module", transformer)
    if isinstance(model, ExpertPair) and stage is not None and not model.settled(stage, device):
        model.activate(stage, device)
