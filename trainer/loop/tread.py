"""TREAD token routing for the diffusers Wan transformer (training only).

A route takes a random `selection_ratio` fraction of each sample's video tokens AROUND blocks start..end (inclusive):
those tokens skip the blocks and are put back in their original positions after `end`; the other tokens go through
as usual. The text (cross-attention context) is never routed, and the rotary embeddings (and Wan 2.2's per-token
timestep embeddings) are gathered with the same indices, so every kept token keeps its own position.

It works through forward hooks on diffusers' `WanTransformerBlock`s, so LoRA / LyCORIS layers, quantised weights,
gradient checkpointing and compile (which all live inside or around the blocks) are untouched. The hooks act only
while a plan is set AND gradients are on: validation, `torch.no_grad()` rollouts and inference run the plain model.
The plan must stay set through backward, because checkpointed blocks re-run their hooks when they recompute.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainer.config.training import TreadConfig
from trainer.model.wan_layout import Route, resolve_routes  # noqa: F401 - block ranges, checked torch-free by preflight

_ARG_NAMES = ("hidden_states", "encoder_hidden_states", "temb", "rotary_emb")


def kept_count(num_tokens: int, ratio: float) -> int:
    """Tokens that go THROUGH a route's blocks (at least one)."""
    return max(1, num_tokens - int(round(num_tokens * ratio)))


def draw_kept_indices(batch: int, num_tokens: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """[batch, kept] sorted token indices, a fresh uniform random subset per sample."""
    scores = torch.rand(batch, num_tokens, generator=generator, device=generator.device)
    kept = scores.argsort(dim=1)[:, : kept_count(num_tokens, ratio)]
    return kept.sort(dim=1).values


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B or 1, N, ...] -> [B, K, ...] at index [B, K]."""
    if x.shape[0] != index.shape[0]:
        x = x.expand(index.shape[0], *x.shape[1:])
    idx = index.view(*index.shape, *([1] * (x.ndim - 2))).expand(*index.shape, *x.shape[2:])
    return torch.gather(x, 1, idx)


def scatter_tokens(full: torch.Tensor, index: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """A copy of `full` [B, N, C] with the rows at index [B, K] replaced by part [B, K, C] (out of place: autograd)."""
    idx = index.unsqueeze(-1).expand(*index.shape, full.shape[-1])
    return full.scatter(1, idx, part.to(full.dtype))


@dataclass
class _RouteState:
    route: Route
    kept: torch.Tensor
    full: torch.Tensor | None = None  # hidden states entering the route (the routed tokens' values)
    args: dict[str, object] = field(default_factory=dict)  # gathered rotary / per-token temb


class TokenRouter:
    """Forward hooks on the transformer's blocks that apply the routes of the current plan."""

    def __init__(self, transformer, cfg: TreadConfig):
        lists = block_lists(transformer)
        self.routes = resolve_routes(cfg, len(lists[0]))
        self.patch = tuple(transformer.config.patch_size)
        self._plan: dict[int, _RouteState] = {}  # by start block
        self._handles = []
        for blocks in lists:  # Wan 2.2 A14B pairs: both experts, one plan (only the active one runs)
            for route in self.routes:
                for i in range(route.start, route.end + 1):
                    self._handles.append(blocks[i].register_forward_pre_hook(self._pre_hook(i, route), with_kwargs=True))
                self._handles.append(blocks[route.end].register_forward_hook(self._post_hook(route), with_kwargs=True))

    # ---- planning (once per micro-step, before the forward; kept until the next plan so backward can recompute)
    def plan(self, latents_shape: torch.Size | tuple[int, ...], generator: torch.Generator) -> None:
        batch, _, frames, height, width = latents_shape
        p_t, p_h, p_w = self.patch
        tokens = (frames // p_t) * (height // p_h) * (width // p_w)
        self._tokens = tokens
        self._plan = {r.start: _RouteState(r, draw_kept_indices(batch, tokens, r.ratio, generator)) for r in self.routes}

    def clear(self) -> None:
        self._plan = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._plan = {}

    def _state(self, route: Route) -> _RouteState | None:
        if not self._plan or not torch.is_grad_enabled():
            return None
        return self._plan.get(route.start)

    def _pre_hook(self, index: int, route: Route):
        def hook(module, args, kwargs):
            state = self._state(route)
            if state is None:
                return None
            values = _bind(args, kwargs)
            if values["hidden_states"].shape[1] != self._tokens and index == route.start:
                return None  # another shape than planned (not a training forward): leave it alone
            if index == route.start:
                if state.full is None:  # first forward only: a checkpoint recompute sees the same tensor
                    state.full = values["hidden_states"]
                    cos, sin = values["rotary_emb"]
                    state.args["rotary_emb"] = (gather_tokens(cos, state.kept), gather_tokens(sin, state.kept))
                    temb = values["temb"]
                    state.args["temb"] = gather_tokens(temb, state.kept) if temb.ndim == 4 else temb
                values["hidden_states"] = gather_tokens(values["hidden_states"], state.kept)
            if state.full is None:
                return None
            values["rotary_emb"] = state.args["rotary_emb"]
            values["temb"] = state.args["temb"]
            return _unbind(values, args, kwargs)

        return hook

    def _post_hook(self, route: Route):
        def hook(module, args, kwargs, output):
            state = self._state(route)
            if state is None or state.full is None or output.shape[1] == state.full.shape[1]:
                return None
            return scatter_tokens(state.full, state.kept, output)

        return hook

    def full_tokens(self, block_index: int, hidden: torch.Tensor) -> torch.Tensor:
        """A block's output as all N tokens: inside a route, the routed tokens take their values from the route start."""
        for state in self._plan.values():
            r = state.route
            if r.start <= block_index <= r.end and state.full is not None and hidden.shape[1] != state.full.shape[1]:
                return scatter_tokens(state.full, state.kept, hidden)
        return hidden


def _bind(args: tuple, kwargs: dict) -> dict:
    values = dict(zip(_ARG_NAMES, args))
    values.update({k: v for k, v in kwargs.items() if k in _ARG_NAMES})
    return values


def _unbind(values: dict, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    new_args = tuple(values[_ARG_NAMES[i]] for i in range(len(args)))
    new_kwargs = {k: (values[k] if k in _ARG_NAMES else v) for k, v in kwargs.items()}
    return new_args, new_kwargs


def block_lists(transformer) -> list:
    """The transformer's blocks, or both experts' blocks for a Wan 2.2 A14B pair (trainer.model.experts.ExpertPair)."""
    from trainer.model.experts import ExpertPair

    if isinstance(transformer, ExpertPair):
        return [transformer.high.blocks, transformer.low.blocks]
    return [transformer.blocks]


def install_tread(transformer, cfg: TreadConfig) -> TokenRouter | None:
    """Hooks for the configured routes, or None when no route drops anything."""
    if not any(r.selection_ratio > 0 for r in cfg.routes):
        resolve_routes(cfg, len(block_lists(transformer)[0]))  # still report bad indices
        return None
    return TokenRouter(transformer, cfg)
