"""TREAD routing on a small real diffusers Wan transformer: exactness, positions, gradients, checkpointing."""

from __future__ import annotations

import pytest
import torch

from trainer.config.model import LoraConfig, MemoryConfig
from trainer.config.training import TreadConfig
from trainer.errors import UserError
from trainer.loop.tread import (
    TokenRouter,
    draw_kept_indices,
    gather_tokens,
    install_tread,
    kept_count,
    resolve_routes,
    scatter_tokens,
)

LAYERS = 4


def _model(seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=LAYERS, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32,
    )
    with torch.no_grad():  # the final projection starts non-zero so outputs depend on every block
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 3, 8, 10, generator=g)  # 3 x 4 x 5 = 60 tokens
    text = torch.randn(batch, 7, 16, generator=g)
    t = torch.tensor([300.0, 800.0][:batch])
    return x, t, text


def _run(model, x, t, text):
    return model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]


def _tread(*routes) -> TreadConfig:
    return TreadConfig.model_validate(
        {"routes": [{"selection_ratio": r, "start_layer_idx": s, "end_layer_idx": e} for r, s, e in routes]}
    )


def test_resolve_negative_indices_and_errors():
    routes = resolve_routes(_tread((0.1, 1, -2), (0.3, -1, -1)), LAYERS)
    assert [(r.start, r.end, r.ratio) for r in routes] == [(1, 2, 0.1), (3, 3, 0.3)]
    with pytest.raises(UserError, match="overlap"):
        resolve_routes(_tread((0.1, 0, 2), (0.1, 2, 3)), LAYERS)
    with pytest.raises(UserError, match="outside"):
        resolve_routes(_tread((0.1, 0, 4)), LAYERS)
    with pytest.raises(UserError, match="after"):
        resolve_routes(_tread((0.1, 3, 1)), LAYERS)
    with pytest.raises(ValueError):
        _tread((1.0, 0, 1))  # at least one token must go through


def test_ratio_zero_is_no_tread():
    model = _model().train()
    x, t, text = _inputs()
    plain = _run(model, x, t, text)
    assert install_tread(model, _tread((0.0, 0, -1))) is None
    # a route that keeps every token (round(60 * 0.004) == 0) goes through the hooks and must change nothing
    router = TokenRouter(model, _tread((0.004, 0, -1)))
    assert kept_count(60, 0.004) == 60
    router.plan(x.shape, torch.Generator().manual_seed(0))
    assert torch.equal(_run(model, x, t, text), plain)


def test_gather_scatter_round_trip():
    g = torch.Generator().manual_seed(3)
    full = torch.randn(2, 50, 8, generator=g)
    kept = draw_kept_indices(2, 50, 0.3, g)
    assert kept.shape == (2, 35) and (kept.diff(dim=1) > 0).all()
    assert kept[0].tolist() != kept[1].tolist()  # each sample draws its own subset
    part = gather_tokens(full, kept)
    assert torch.equal(scatter_tokens(full, kept, part), full)
    changed = scatter_tokens(full, kept, part + 1)
    routed = torch.ones(2, 50, dtype=torch.bool)
    routed[torch.arange(2).unsqueeze(1), kept] = False
    assert torch.equal(changed[routed], full[routed]) and torch.equal(changed[~routed], full[~routed] + 1)


def test_routed_tokens_skip_the_route_and_return_to_their_places():
    model = _model().train()
    x, t, text = _inputs()
    router = TokenRouter(model, _tread((0.5, 1, 2)))
    seen = {}

    def route_input(module, args, kwargs):  # runs before the router's hook: the full sequence entering the route
        seen.setdefault("in", args[0])

    def inside_route(module, args, kwargs):  # runs after it: what block 1 really gets
        seen.setdefault("rope_in_route", args[3])

    model.blocks[1].register_forward_pre_hook(route_input, with_kwargs=True, prepend=True)
    model.blocks[1].register_forward_pre_hook(inside_route, with_kwargs=True)

    def route_output(module, args, output):  # after the router's hook: the sequence leaving the route
        seen.setdefault("out", output)

    model.blocks[2].register_forward_hook(route_output)
    router.plan(x.shape, torch.Generator().manual_seed(5))
    _run(model, x, t, text)
    kept = router._plan[1].kept
    full_in, full_out = seen["in"], seen["out"]
    assert full_out.shape == full_in.shape  # put back at the route's end
    routed = torch.ones(full_in.shape[:2], dtype=torch.bool)
    routed[torch.arange(2).unsqueeze(1), kept] = False
    assert torch.equal(full_out[routed], full_in[routed])  # routed tokens skipped blocks 1..2 untouched
    # the kept tokens went through blocks 1..2 with their own rotary embeddings: recompute them by hand
    rope = model.rope(x)
    cos, sin = seen["rope_in_route"]
    assert torch.equal(cos, gather_tokens(rope[0], kept)) and torch.equal(sin, gather_tokens(rope[1], kept))
    router.remove()
    temb, proj, ctx, _ = model.condition_embedder(t, text, None)
    proj = proj.unflatten(1, (6, -1))
    h = gather_tokens(full_in, kept)
    with torch.no_grad():
        for block in model.blocks[1:3]:
            h = block(h, ctx, proj, (cos, sin))
    assert torch.allclose(gather_tokens(full_out, kept), h, atol=1e-6)


def test_off_without_gradients_and_after_clear():
    model = _model().train()
    x, t, text = _inputs()
    with torch.no_grad():
        plain = _run(model, x, t, text)
    router = TokenRouter(model, _tread((0.5, 1, 2)))
    router.plan(x.shape, torch.Generator().manual_seed(0))
    with torch.no_grad():  # validation / rollouts: never routed
        assert torch.equal(_run(model, x, t, text), plain)
    routed = _run(model, x, t, text)
    assert not torch.allclose(routed, plain)
    router.clear()
    assert torch.equal(_run(model, x, t, text), plain)


def _lora_model(checkpointing: str | None):
    from trainer.model.lora import add_lora
    from trainer.model.memory import apply_memory_options

    model = _model()
    add_lora(model, LoraConfig(rank=2))
    with torch.no_grad():  # peft starts lora_B at zero; nonzero B so every A gets a gradient too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    if checkpointing == "diffusers":
        model.enable_gradient_checkpointing()
    elif checkpointing is not None:
        apply_memory_options(model, MemoryConfig(gradient_checkpointing=checkpointing, attention_backend="native"),
                             torch.device("cpu"))
    return model.train()


@pytest.mark.parametrize("checkpointing", ["diffusers", "full", "selective"])
def test_gradients_reach_every_lora_and_match_without_checkpointing(checkpointing):
    x, t, text = _inputs()
    grads = {}
    for mode in (None, checkpointing):
        model = _lora_model(mode)
        router = TokenRouter(model, _tread((0.25, 0, 1), (0.5, 2, -1)))
        router.plan(x.shape, torch.Generator().manual_seed(7))
        _run(model, x, t, text).square().mean().backward()  # backward recomputes blocks with the same routes
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    lora = [n for n in grads[None] if "lora_" in n]
    assert len(lora) == LAYERS * 10 * 2
    assert all(grads[checkpointing][n].abs().sum() > 0 for n in lora), "a LoRA got no gradient"
    for n in lora:
        assert torch.allclose(grads[checkpointing][n], grads[None][n], rtol=1e-4, atol=1e-7), n


def test_full_tokens_inside_a_route_for_crepa():
    """A block inside a route sees only the kept tokens; full_tokens gives all N, routed ones at their route-start values."""
    model = _model().train()
    x, t, text = _inputs()
    router = TokenRouter(model, _tread((0.5, 1, 2)))
    seen = {}

    def route_input(module, args, kwargs):
        seen.setdefault("in", args[0])

    def block_1_output(module, args, output):
        seen.setdefault("mid", output)

    model.blocks[1].register_forward_pre_hook(route_input, with_kwargs=True, prepend=True)
    model.blocks[1].register_forward_hook(block_1_output)
    router.plan(x.shape, torch.Generator().manual_seed(2))
    _run(model, x, t, text)
    kept = router._plan[1].kept
    assert seen["mid"].shape[1] == kept.shape[1] == 30
    full = router.full_tokens(1, seen["mid"])
    assert full.shape == seen["in"].shape
    assert torch.equal(gather_tokens(full, kept), seen["mid"])
    routed = torch.ones(full.shape[:2], dtype=torch.bool)
    routed[torch.arange(2).unsqueeze(1), kept] = False
    assert torch.equal(full[routed], seen["in"][routed])
    assert router.full_tokens(3, seen["in"]) is seen["in"]  # outside any route: unchanged


@pytest.mark.parametrize("adapter", ["lycoris-lokr", "lora-on-int8-base"])
def test_gradients_reach_every_adapter_weight(adapter, tmp_path):
    """LyCORIS modules and quantised base layers live inside the blocks: routing around them must not cut gradients."""
    import json

    from trainer.model.lora import add_lora
    from trainer.model.memory import quantize_base_weights

    model = _model()
    if adapter == "lycoris-lokr":
        path = tmp_path / "lycoris.json"
        path.write_text(json.dumps({"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 4}))
        add_lora(model, LoraConfig(lora_type="lycoris", lycoris_config=path))
    else:
        quantize_base_weights(model, "int8")
        add_lora(model, LoraConfig(rank=2))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    with torch.no_grad():  # adapters start as a no-op with a zero factor; move off zero so every factor gets a gradient
        for p in trainable.values():
            p.add_(torch.randn_like(p) * 0.05)
    model.enable_gradient_checkpointing()
    model.train()
    router = TokenRouter(model, _tread((0.5, 0, 1), (0.25, 2, 3)))
    x, t, text = _inputs()
    router.plan(x.shape, torch.Generator().manual_seed(4))
    _run(model, x, t, text).square().mean().backward()
    missing = [n for n, p in trainable.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing[:5]
