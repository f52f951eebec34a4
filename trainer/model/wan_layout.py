"""The module layout of diffusers' WanTransformer3DModel and the number of blocks a run's transformer has, torch-free.

Preflight resolves model-dependent names (LoRA target modules, skip layers, TREAD routes, the CREPA block) against
this without loading weights. The layout is diffusers' own (tests/test_preflight.py compares it with the real class
for every flavour's architecture); the block count comes from the model's config.json where it is on disk (a local
folder, the Hub cache, the built tiny model) and from the flavour otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import UserError
from trainer.flavours import Flavour
from trainer.model.lora_names import wan_modules

ADAPTABLE = ("Linear", "Conv3d")  # the module kinds of this model peft puts a LoRA on


def module_layout(flavour: Flavour, blocks: int) -> dict[str, str]:
    """Every named module of the transformer (path -> class name), as diffusers builds it for this flavour (the one
    table of it is trainer.model.lora_names.wan_modules; VACE flavours add their VACE blocks)."""
    return {name: kind for name, kind in wan_modules(flavour.image_encoder, blocks, len(flavour.vace_layers)) if name}


def matching_modules(layout: dict[str, str], target: str) -> dict[str, str]:
    """The modules a target name selects, by peft's rule for a list of names: the full path or its dotted suffix."""
    return {path: kind for path, kind in layout.items() if path == target or path.endswith("." + target)}


def _config_json(folder: Path, subfolder: str | None) -> Path | None:
    path = (folder / subfolder if subfolder else folder) / "config.json"
    return path if path.is_file() else None


def _cached_hub_config(repo: str, subfolder: str, revision: str | None) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo, f"{subfolder}/config.json", revision=revision)
    except Exception:  # an id that is no valid repo id: its own check reports it
        return None
    return Path(found) if isinstance(found, str) else None


def transformer_config_file(model, flavour: Flavour) -> Path | None:
    """config.json of the transformer the run trains, when it is on this machine (nothing is downloaded)."""
    override = model.pretrained_transformer_model_name_or_path
    if override and not override.endswith(".safetensors") and Path(override).is_dir():
        return _config_json(Path(override), model.pretrained_transformer_subfolder)
    base = model.pretrained_model_name_or_path
    if base is None and flavour.tiny is not None:
        from trainer.model.tiny import tiny_model_dir

        return _config_json(tiny_model_dir(flavour.tiny), flavour.expert_subfolder)
    base = base or flavour.hub_id
    if base is None:
        return None
    if Path(base).is_dir():
        return _config_json(Path(base), flavour.expert_subfolder)
    return _cached_hub_config(base, flavour.expert_subfolder, model.revision)


def block_count(model, flavour: Flavour) -> int:
    """Transformer blocks of the run's model: its config.json where present, else the flavour's (tiny: trainer.model.tiny)."""
    file = transformer_config_file(model, flavour)
    if file is not None:
        try:
            return int(json.loads(file.read_text(encoding="utf-8"))["num_layers"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if flavour.tiny is not None:
        from trainer.model.tiny import TINY_NUM_LAYERS

        return TINY_NUM_LAYERS
    return flavour.num_layers


def transformer_dims(model, flavour: Flavour) -> dict:
    """The run's transformer config (diffusers' WanTransformer3DModel keys): its config.json where on this machine,
    else the flavour's real shape."""
    file = transformer_config_file(model, flavour)
    if file is not None:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
            if isinstance(data, dict) and "num_layers" in data:
                return data
        except (OSError, ValueError):
            pass
    if flavour.tiny is not None:  # not built yet: its arguments (trainer.model.tiny)
        from trainer.model.tiny import TINY_CHANNELS, tiny_transformer_config, tiny_vace_config

        return tiny_vace_config() if flavour.is_vace else tiny_transformer_config(*TINY_CHANNELS[flavour.tiny])
    heads = flavour.num_heads
    dims = {"num_attention_heads": heads, "attention_head_dim": flavour.dim // heads, "ffn_dim": flavour.ffn_dim,
            "num_layers": block_count(model, flavour), "in_channels": flavour.in_channels,
            "out_channels": flavour.latent_channels, "patch_size": [1, 2, 2], "text_dim": 4096, "freq_dim": 256,
            "image_dim": 1280 if flavour.image_encoder else None,
            "added_kv_proj_dim": flavour.dim if flavour.image_encoder else None}
    if flavour.is_vace:
        dims.update(vace_layers=list(flavour.vace_layers), vace_in_channels=96)
    return dims


def head_count(model, flavour: Flavour) -> int:
    """Attention heads of the run's transformer (its config.json where on this machine, else the flavour's)."""
    return int(transformer_dims(model, flavour)["num_attention_heads"])


def linear_shapes(dims: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every Linear layer of WanTransformer3DModel with this config, by module path
    (tests/test_validation_adapters.py checks it against the real class)."""
    dim = int(dims["num_attention_heads"]) * int(dims["attention_head_dim"])
    ffn, freq, text = int(dims["ffn_dim"]), int(dims["freq_dim"]), int(dims["text_dim"])
    patch = 1
    for p in dims.get("patch_size") or (1, 2, 2):
        patch *= int(p)
    ce = "condition_embedder"
    shapes = {f"{ce}.time_embedder.linear_1": (freq, dim), f"{ce}.time_embedder.linear_2": (dim, dim),
              f"{ce}.time_proj": (dim, 6 * dim), f"{ce}.text_embedder.linear_1": (text, dim),
              f"{ce}.text_embedder.linear_2": (dim, dim),
              "proj_out": (dim, int(dims.get("out_channels") or dims["in_channels"]) * patch)}
    image = dims.get("image_dim")
    if image:
        shapes |= {f"{ce}.image_embedder.ff.net.0.proj": (int(image), int(image)),
                   f"{ce}.image_embedder.ff.net.2": (int(image), dim)}
    added = dims.get("added_kv_proj_dim")
    for n in range(int(dims["num_layers"])):
        b = f"blocks.{n}"
        for attn in ("attn1", "attn2"):
            shapes |= {f"{b}.{attn}.{x}": (dim, dim) for x in ("to_q", "to_k", "to_v", "to_out.0")}
        if added:
            shapes |= {f"{b}.attn2.add_k_proj": (int(added), dim), f"{b}.attn2.add_v_proj": (int(added), dim)}
        shapes |= {f"{b}.ffn.net.0.proj": (dim, ffn), f"{b}.ffn.net.2": (ffn, dim)}
    for n in range(len(dims.get("vace_layers") or [])):  # WanVACETransformer3DModel: a Wan block + hint projections
        b = f"vace_blocks.{n}"
        for attn in ("attn1", "attn2"):
            shapes |= {f"{b}.{attn}.{x}": (dim, dim) for x in ("to_q", "to_k", "to_v", "to_out.0")}
        if added:
            shapes |= {f"{b}.attn2.add_k_proj": (int(added), dim), f"{b}.attn2.add_v_proj": (int(added), dim)}
        shapes |= {f"{b}.ffn.net.0.proj": (dim, ffn), f"{b}.ffn.net.2": (ffn, dim), f"{b}.proj_out": (dim, dim)}
        if n == 0:
            shapes[f"{b}.proj_in"] = (dim, dim)
    return shapes


def rotary_positions(model, flavour: Flavour) -> int:
    """Positions per axis (frames, height, width in patches) the transformer's rotary embedding has: rope_max_seq_len
    of its config (diffusers' default 1024)."""
    try:
        return int(transformer_dims(model, flavour).get("rope_max_seq_len") or 1024)
    except (TypeError, ValueError):
        return 1024


# ---------------------------------------------------------------- TREAD routes (block ranges; trainer.loop.tread routes them)


@dataclass(frozen=True)
class Route:
    start: int  # first routed block, resolved to 0..L-1
    end: int  # last routed block, inclusive
    ratio: float  # fraction of video tokens routed around start..end


def resolve_routes(cfg, num_layers: int) -> list[Route]:
    """Routes of a TreadConfig with negative indices resolved; they must lie inside the model and must not overlap."""
    routes = []
    for i, r in enumerate(cfg.routes):
        start = r.start_layer_idx + num_layers if r.start_layer_idx < 0 else r.start_layer_idx
        end = r.end_layer_idx + num_layers if r.end_layer_idx < 0 else r.end_layer_idx
        where = f"tread.routes[{i}]"
        if not (0 <= start < num_layers and 0 <= end < num_layers):
            raise UserError(f"{where}: layers {r.start_layer_idx}..{r.end_layer_idx} are outside the model's "
                            f"{num_layers} blocks (use 0..{num_layers - 1}, or negative indices from the end)")
        if start > end:
            raise UserError(f"{where}: start_layer_idx {r.start_layer_idx} resolves after end_layer_idx "
                            f"{r.end_layer_idx}: swap them")
        routes.append(Route(start, end, r.selection_ratio))
    routes.sort(key=lambda r: r.start)
    for a, b in zip(routes, routes[1:]):
        if b.start <= a.end:
            raise UserError(f"tread.routes: blocks {a.start}..{a.end} and {b.start}..{b.end} overlap: routes must be "
                            f"disjoint (end the first before block {b.start})")
    return [r for r in routes if r.ratio > 0]
