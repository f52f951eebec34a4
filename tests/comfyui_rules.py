"""Native ComfyUI's rules for Wan LoRA files, written from the project's checked facts on how the clients read LoRA files,
not from ComfyUI's code, so tests can load a file the way ComfyUI does and compare outputs:

- Keys name weights of the ORIGINAL Wan layout (`blocks.0.self_attn.q`, `head.head`, `img_emb.proj.1`, ...), either
  `diffusion_model.<module>.lora_A.weight` / `.lora_B.weight` (+ optional `.alpha`) or kohya-style
  `lora_unet_<module with dots as underscores>.<suffix>` (LyCORIS). A key that names no weight is "not loaded".
- Updates at strength s: LoRA / LoCon  W += s * (up @ down) * alpha / rank   (rank = rows of down; no alpha: 1)
                         LoHa         W += s * (w1a @ w1b) * (w2a @ w2b) * alpha / rank   (rank = rows of w1b)
                         LoKr         W += s * kron(w1, w2) * (alpha / rank if w1 or w2 is factored, else 1),
                                      w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b (w2 likewise; rank = rows of the _b)
                         full         W += s * diff, bias += s * diff_b
The original-layout model is made from the diffusers one through diffusers' own single-file converter
(`original_names` is checked to convert onto every diffusers weight, so the layout is diffusers', not ours).
"""

from __future__ import annotations

import torch


def _block_names(b: str, image_embedder: bool) -> list[str]:
    names = [f"{b}.modulation", f"{b}.norm3.weight", f"{b}.norm3.bias"]
    for attn in ("self_attn", "cross_attn"):
        linears = ["q", "k", "v", "o"] + (["k_img", "v_img"] if attn == "cross_attn" and image_embedder else [])
        names += [f"{b}.{attn}.{x}.{p}" for x in linears for p in ("weight", "bias")]
        names += [f"{b}.{attn}.norm_q.weight", f"{b}.{attn}.norm_k.weight"]
        if attn == "cross_attn" and image_embedder:
            names.append(f"{b}.cross_attn.norm_k_img.weight")
    return names + [f"{b}.ffn.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]


def original_names(num_blocks: int, image_embedder: bool, vace_blocks: int = 0) -> list[str]:
    """Parameter names of the original Wan transformer (Wan's model.py layout; with `vace_blocks`, the official Wan
    VACE model's: `vace_patch_embedding` and `vace_blocks.N.*` with `before_proj` (block 0) and `after_proj`)."""
    names = ["patch_embedding.weight", "patch_embedding.bias", "head.head.weight", "head.head.bias", "head.modulation"]
    for m in ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1"):
        names += [f"{m}.weight", f"{m}.bias"]
    if image_embedder:
        names += [f"img_emb.proj.{i}.{p}" for i in (0, 1, 3, 4) for p in ("weight", "bias")]
    for n in range(num_blocks):
        names += _block_names(f"blocks.{n}", image_embedder)
    if vace_blocks:
        names += ["vace_patch_embedding.weight", "vace_patch_embedding.bias"]
    for n in range(vace_blocks):
        b = f"vace_blocks.{n}"
        names += _block_names(b, image_embedder) + [f"{b}.after_proj.weight", f"{b}.after_proj.bias"]
        names += [f"{b}.before_proj.weight", f"{b}.before_proj.bias"] if n == 0 else []
    return names


def _to_diffusers(state: dict) -> dict:
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    return convert_wan_transformer_to_diffusers(dict(state))


def original_layout(model) -> dict[str, torch.Tensor]:
    """The diffusers model's weights under original Wan names (diffusers' converter decides where each one goes)."""
    image = getattr(model.condition_embedder, "image_embedder", None) is not None
    names = original_names(len(model.blocks), image, len(getattr(model, "vace_blocks", None) or []))
    where = _to_diffusers({name: torch.tensor([float(i)]) for i, name in enumerate(names)})
    diffusers_state = model.state_dict()
    assert set(where) == set(diffusers_state), set(where) ^ set(diffusers_state)  # the layout above is complete
    return {names[int(v.item())]: diffusers_state[k].clone() for k, v in where.items()}


def _module_of(key: str, weights: set[str]) -> tuple[str, str]:
    """(original module, suffix) for a LoRA key, by ComfyUI's key map; AssertionError when "not loaded"."""
    key_map = {}
    for w in weights:
        module = w.removesuffix(".weight")
        key_map[f"diffusion_model.{module}"] = module
        key_map[f"lora_unet_{module.replace('.', '_')}"] = module
    for base, module in key_map.items():
        if key.startswith(base + "."):
            return module, key[len(base) + 1:]
    raise AssertionError(f"lora key not loaded: {key}")


def _update(p: dict[str, torch.Tensor]) -> torch.Tensor:
    alpha = float(p["alpha"]) if "alpha" in p else None
    if "lora_A.weight" in p or "lora_down.weight" in p:
        down = p.get("lora_A.weight", p.get("lora_down.weight")).float()
        up = p.get("lora_B.weight", p.get("lora_up.weight")).float()
        return up @ down * (alpha / down.shape[0] if alpha is not None else 1.0)
    if "hada_w1_a" in p:
        w1 = p["hada_w1_a"].float() @ p["hada_w1_b"].float()
        w2 = p["hada_w2_a"].float() @ p["hada_w2_b"].float()
        return w1 * w2 * (alpha / p["hada_w1_b"].shape[0] if alpha is not None else 1.0)
    if any(k.startswith("lokr_") for k in p):
        w1 = p["lokr_w1"].float() if "lokr_w1" in p else p["lokr_w1_a"].float() @ p["lokr_w1_b"].float()
        w2 = p["lokr_w2"].float() if "lokr_w2" in p else p["lokr_w2_a"].float() @ p["lokr_w2_b"].float()
        factored = p.get("lokr_w1_b", p.get("lokr_w2_b"))
        scale = alpha / factored.shape[0] if alpha is not None and factored is not None else 1.0
        return torch.kron(w1, w2) * scale
    if "diff" in p:
        return p["diff"].float()
    raise AssertionError(f"no update ComfyUI knows in {sorted(p)}")


def apply_lora(original: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], strength: float = 1.0) -> dict:
    """The original-layout weights with the LoRA file applied as ComfyUI applies it."""
    weights = {k for k in original if k.endswith(".weight")}
    patches: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in lora.items():
        module, suffix = _module_of(key, weights)
        patches.setdefault(module, {})[suffix] = value
    out = dict(original)
    for module, p in patches.items():
        w = out[f"{module}.weight"]
        out[f"{module}.weight"] = (w.float() + strength * _update(p).reshape(w.shape)).to(w.dtype)
        if "diff_b" in p:
            out[f"{module}.bias"] = out[f"{module}.bias"] + strength * p["diff_b"].to(w.dtype)
    return out


def load_like_comfyui(model_factory, lora: dict[str, torch.Tensor], strength: float = 1.0):
    """A fresh base model (model_factory()) with the LoRA file merged by ComfyUI's rules, back in diffusers' layout."""
    model = model_factory()
    patched = apply_lora(original_layout(model), lora, strength)
    model.load_state_dict(_to_diffusers(patched), strict=True)
    return model.eval()


def transformer_inputs(image: bool, timestep: float = 700.0, vace: bool = False) -> dict:
    """Fixed inputs for the tiny transformers (T2V, or I2V with 36 channels and CLIP image tokens, or VACE with its
    96-channel control context)."""
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 36 if image else 16, 3, 8, 8, generator=g),
                  timestep=torch.tensor([timestep]), encoder_hidden_states=torch.randn(1, 12, 32, generator=g),
                  return_dict=False)
    if image:
        inputs["encoder_hidden_states_image"] = torch.randn(1, 5, 32, generator=g)
    if vace:
        inputs["control_hidden_states"] = torch.randn(1, 96, 3, 8, 8, generator=g)
    return inputs
