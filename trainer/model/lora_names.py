"""Which Wan modules an adapter reaches, and their names in the original Wan layout. Torch-free (preflight imports it).

The interchange LoRA format names modules as the original Wan code does (`blocks.0.self_attn.q`, `head.head`,
`img_emb.proj.1`); diffusers names them `blocks.0.attn1.to_q`, `proj_out`, `condition_embedder.image_embedder.ff.net.0.proj`.
The mapping follows diffusers' WanLoraLoaderMixin converter, which reads these files back. `interchange_problems`
says, from the config alone (no weights), which adapter targets could not be saved in that format, so `check` refuses
them before training instead of the final save failing after it.
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

from trainer.flavours import get_flavour

# diffusers module path inside a block -> original Wan module path
BLOCK_MAP = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
# top-level diffusers module -> original Wan module
TOP_MAP = {
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "proj_out": "head.head",
}
_BLOCK = re.compile(r"^blocks\.(?P<n>\d+)\.(?P<rest>.+)$")
_REVERSE_BLOCK = {v: k for k, v in BLOCK_MAP.items()}
_REVERSE_TOP = {v: k for k, v in TOP_MAP.items()}
# LyCORIS algorithms whose exported keys and strength are checked against ComfyUI's rules (tests/comfyui_rules.py)
LYCORIS_ALGOS = ("lora", "locon", "loha", "lokr", "full")


def _rename(module: str, block_names: dict[str, str], top_names: dict[str, str]) -> str | None:
    m = _BLOCK.match(module)
    if m:
        rest = block_names.get(m["rest"])
        return f"blocks.{m['n']}.{rest}" if rest else None
    return top_names.get(module)


def to_original(module: str) -> str | None:
    """diffusers module path -> original Wan module path; None for a module the original layout has no LoRA name for."""
    return _rename(module, BLOCK_MAP, TOP_MAP)


class LoRAFileError(RuntimeError):
    """A LoRA file about to be written would not load where it must: a bug in wanforge, not a user error."""


def original_name(module: str) -> str:
    """diffusers module path -> original Wan module path (the interchange and LyCORIS key names)."""
    original = to_original(module)
    if original is None:  # interchange_problems refuses such targets in `check`: reaching this is a bug
        raise LoRAFileError(f'LoRA module "{module}" has no name in the original Wan layout (preflight should have '
                            "refused this target)")
    return original


def to_diffusers(original: str) -> str | None:
    """Original Wan module path -> diffusers module path (None: not a module wanforge saves)."""
    return _rename(original, _REVERSE_BLOCK, _REVERSE_TOP)


def kohya_to_original(name: str) -> str | None:
    """kohya / musubi module name -> original Wan module path: `lora_unet_blocks_0_self_attn_q` -> `blocks.0.self_attn.q`
    (None if it names no original Wan module)."""
    if not name.startswith("lora_unet_"):
        return None
    body = name.removeprefix("lora_unet_")
    m = re.match(r"^blocks_(\d+)_(.+)$", body)
    candidates = [f"blocks.{m[1]}.{v}" for v in BLOCK_MAP.values() if v.replace(".", "_") == m[2]] if m else []
    candidates += [v for v in TOP_MAP.values() if v.replace(".", "_") == body]
    return candidates[0] if len(candidates) == 1 else None


def alpha_read_by_diffusers(original: str) -> bool:
    """diffusers' Wan converter applies `.alpha` only to block modules; elsewhere it is left over and loading raises."""
    return _BLOCK.match(original) is not None


# ---------------------------------------------------------------- the transformer's modules, without torch


def wan_modules(image_embedder: bool, num_layers: int) -> list[tuple[str, str]]:
    """(name, class name) of every module of diffusers' WanTransformer3DModel, in named_modules() order.
    image_embedder: Wan 2.1 I2V (CLIP image tokens: image embedder + add_k/v_proj in every block).
    tests/test_export.py checks this table against the real class."""
    mods = [("", "WanTransformer3DModel"), ("rope", "WanRotaryPosEmbed"), ("patch_embedding", "Conv3d")]
    ce = "condition_embedder"
    mods += [(ce, "WanTimeTextImageEmbedding"), (f"{ce}.timesteps_proj", "Timesteps"),
             (f"{ce}.time_embedder", "TimestepEmbedding"), (f"{ce}.time_embedder.linear_1", "Linear"),
             (f"{ce}.time_embedder.act", "SiLU"), (f"{ce}.time_embedder.linear_2", "Linear"), (f"{ce}.act_fn", "SiLU"),
             (f"{ce}.time_proj", "Linear"), (f"{ce}.text_embedder", "PixArtAlphaTextProjection"),
             (f"{ce}.text_embedder.linear_1", "Linear"), (f"{ce}.text_embedder.act_1", "GELU"),
             (f"{ce}.text_embedder.linear_2", "Linear")]
    if image_embedder:
        ie = f"{ce}.image_embedder"
        mods += [(ie, "WanImageEmbedding"), (f"{ie}.norm1", "FP32LayerNorm"), (f"{ie}.ff", "FeedForward"),
                 (f"{ie}.ff.net", "ModuleList"), (f"{ie}.ff.net.0", "GELU"), (f"{ie}.ff.net.0.proj", "Linear"),
                 (f"{ie}.ff.net.1", "Dropout"), (f"{ie}.ff.net.2", "Linear"), (f"{ie}.norm2", "FP32LayerNorm")]
    mods.append(("blocks", "ModuleList"))
    for n in range(num_layers):
        b = f"blocks.{n}"
        mods += [(b, "WanTransformerBlock"), (f"{b}.norm1", "FP32LayerNorm")]
        for attn in ("attn1", "attn2"):
            a = f"{b}.{attn}"
            mods += [(a, "WanAttention"), (f"{a}.to_q", "Linear"), (f"{a}.to_k", "Linear"), (f"{a}.to_v", "Linear"),
                     (f"{a}.to_out", "ModuleList"), (f"{a}.to_out.0", "Linear"), (f"{a}.to_out.1", "Dropout"),
                     (f"{a}.norm_q", "RMSNorm"), (f"{a}.norm_k", "RMSNorm")]
            if attn == "attn2" and image_embedder:
                mods += [(f"{a}.add_k_proj", "Linear"), (f"{a}.add_v_proj", "Linear"), (f"{a}.norm_added_k", "RMSNorm")]
        mods += [(f"{b}.norm2", "FP32LayerNorm"), (f"{b}.ffn", "FeedForward"), (f"{b}.ffn.net", "ModuleList"),
                 (f"{b}.ffn.net.0", "GELU"), (f"{b}.ffn.net.0.proj", "Linear"), (f"{b}.ffn.net.1", "Dropout"),
                 (f"{b}.ffn.net.2", "Linear"), (f"{b}.norm3", "FP32LayerNorm")]
    mods += [("norm_out", "FP32LayerNorm"), ("proj_out", "Linear")]
    return mods


def flavour_modules(flavour_name: str, num_layers: int | None = None) -> list[tuple[str, str]]:
    flavour = get_flavour(flavour_name)
    return wan_modules(flavour.image_encoder, num_layers or flavour.num_layers)


def peft_targets(target_modules: list[str], modules: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The modules peft adapts for a list of target names (a name matches itself or any path ending in "." + it).
    Each module's dotted suffixes are looked up in a set: linear in modules + targets, however long the list."""
    wanted = set(target_modules)
    out = []
    for n, c in modules:
        parts = n.split(".") if n else []
        if any(".".join(parts[i:]) in wanted for i in range(len(parts))):
            out.append((n, c))
    return out


def targets_matching_nothing(target_modules: list[str], modules: list[tuple[str, str]]) -> list[str]:
    """The target names that select no module (in their order), from one index of every module's suffixes."""
    suffixes = {".".join(parts[i:]) for n, _ in modules if n for parts in [n.split(".")] for i in range(len(parts))}
    return [t for t in target_modules if t not in suffixes]


def _is_conv(cls: str) -> bool:
    return cls.startswith("Conv")


def lycoris_targets(kwargs: dict, preset: dict, modules: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The modules lycoris' LycorisNetwork adapts for create_lycoris kwargs and an apply_preset dict (the preset keys
    a config leaves out take lycoris' defaults; trainer.model.lycoris applies them the same way). Mirrors lycoris
    4.x: every supported descendant of a module whose class is targeted, and every module whose name is."""
    defaults = lycoris_preset_defaults()
    preset = {**defaults, **preset}
    match = (lambda p, n: fnmatch.fnmatch(n, p)) if preset["use_fnmatch"] else (lambda p, n: re.match(p, n) is not None)
    classes = set(preset["target_module"]) | set(preset["module_algo_map"])
    names = set(preset["target_name"]) | set(preset["name_algo_map"])
    excluded = lambda n: bool(n) and (n in preset["exclude_name"] or any(match(p, n) for p in preset["exclude_name"]))  # noqa: E731
    linear_dim = int(kwargs.get("linear_dim", 4) if kwargs.get("linear_dim", 4) is not None else 4)
    conv_dim = int(kwargs.get("conv_dim", linear_dim) or linear_dim)
    train_norm = str(kwargs.get("train_norm", False)).lower() in ("1", "true", "yes")

    def supported(cls: str, config: dict) -> bool:
        if train_norm and "Norm" in cls:
            return True
        if cls == "Linear":
            return linear_dim > 0
        if _is_conv(cls):  # Wan's only conv, patch_embedding, has kernel (1, 2, 2): lycoris treats it as k_size 1
            return linear_dim > 0 or conv_dim > 0 or bool(config.get("dim"))
        return False

    chosen: dict[str, str] = {}
    for name, cls in modules:
        if excluded(name):
            continue
        if cls in classes and not any(match(p, name) for p in names):
            config = preset["module_algo_map"].get(cls, {})
            prefix = f"{name}." if name else ""
            for sub, sub_cls in modules:
                if (sub == name or sub.startswith(prefix)) and not excluded(sub) and supported(sub_cls, config):
                    chosen.setdefault(sub, sub_cls)
        elif name in names or any(match(p, name) for p in names):
            if supported(cls, {}):
                chosen.setdefault(name, cls)
    return [(n, c) for n, c in modules if n in chosen]


def lycoris_preset_defaults() -> dict:
    """lycoris' LycorisNetwork class defaults for every preset key (its presets are class state: a preset that leaves
    a key out would otherwise inherit the previous network's value)."""
    return {"enable_conv": True, "target_module": ["Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm"],
            "target_name": [], "module_algo_map": {}, "name_algo_map": {}, "use_fnmatch": False, "exclude_name": []}


# preset keys lycoris accepts that do not change which Wan modules it adapts
_OTHER_PRESET_KEYS = {"lora_prefix", "unet_target_module", "unet_target_name", "text_encoder_target_module",
                      "text_encoder_target_name"}


def default_lycoris_preset(target_modules: list[str]) -> dict:
    """Without "apply_preset": the modules lora.target_modules names, in every block (the LoRA default)."""
    return {"target_module": [], "target_name": [rf"^blocks\.\d+\.{re.escape(t)}$" for t in target_modules]}


# ---------------------------------------------------------------- preflight


def interchange_problems(cfg) -> list[str]:
    """Every reason the run's adapter could not be saved as a LoRA file both native ComfyUI and diffusers load
    (from the config and flavour alone; one line each, naming the field and a fix). Empty: it can be saved."""
    modules = flavour_modules(cfg.model.flavour)
    if cfg.lora.lora_type == "lycoris":
        return _lycoris_problems(cfg, modules)
    problems = [f'lora.target_modules: "{target}" matches no module of the {cfg.model.flavour} transformer (diffusers '
                'names, e.g. "attn1.to_q", "attn2.to_out.0", "ffn.net.0.proj", "proj_out")'
                for target in targets_matching_nothing(cfg.lora.target_modules, modules)]
    reached = peft_targets(cfg.lora.target_modules, modules)
    problems += _unsaveable(reached, "lora.target_modules")
    if cfg.lora.save_format == "comfyui":
        if reached and not any(n.startswith("blocks.") for n, _ in reached):
            problems.append("lora.target_modules: the adapter reaches no transformer block, and diffusers' loader "
                            'reads an interchange LoRA file only with block modules: add some, e.g. "attn1.to_q"')
        names = {n.rsplit(".", 1)[-1] for n, _ in reached if n.startswith("blocks.")}
        if ("add_k_proj" in names) != ("add_v_proj" in names):
            problems.append('lora.target_modules: "attn2.add_k_proj" and "attn2.add_v_proj" go together (diffusers\' '
                            "loader reads the image keys of a LoRA file only as a pair): target both or neither")
    return problems


def _unsaveable(reached: list[tuple[str, str]], field: str) -> list[str]:
    bad = [n for n, c in reached if c != "Linear" or to_original(n) is None]
    if not bad:
        return []
    shown = ", ".join(f'"{n}"' for n in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    return [f"{field}: {shown} cannot be saved in a LoRA file ComfyUI loads (only Linear layers with a name in the "
            "original Wan layout can): leave them out of the targets"]


def _lycoris_problems(cfg, modules: list[tuple[str, str]]) -> list[str]:
    path = Path(cfg.lora.lycoris_config)
    try:
        kwargs = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []  # missing or broken: read_lycoris_config names the problem where the file is read
    if not isinstance(kwargs, dict):
        return []
    field = f"lora.lycoris_config ({path.name})"
    problems = []
    algo = str(kwargs.get("algo", "lora")).lower()
    if algo not in LYCORIS_ALGOS:
        problems.append(f'{field}: algo "{algo}" is not exported by wanforge (its file is not checked to load in '
                        f'ComfyUI): use one of {", ".join(LYCORIS_ALGOS)}')
    try:
        multiplier = float(kwargs.get("multiplier", 1.0))
    except (TypeError, ValueError):
        return problems + [f'{field}: "multiplier" must be a number (1.0: the trained strength)']
    if str(kwargs.get("dora_wd", False)).lower() in ("1", "true", "yes") and multiplier != 1.0:
        problems.append(f'{field}: "multiplier" {multiplier} with "dora_wd" cannot be baked into the saved weights '
                        '(DoRA is not linear in its strength): use "multiplier": 1.0')
    preset = kwargs.get("apply_preset")
    if preset is None:
        preset = default_lycoris_preset(cfg.lora.target_modules)
    if not isinstance(preset, dict):
        return problems + [f'{field}: "apply_preset" must be a JSON object of lycoris preset keys']
    unknown = sorted(set(preset) - set(lycoris_preset_defaults()) - _OTHER_PRESET_KEYS)
    if unknown:
        return problems + [f'{field}: "apply_preset" has keys lycoris does not know: {", ".join(unknown)} (it takes '
                           f'{", ".join(sorted(set(lycoris_preset_defaults()) | _OTHER_PRESET_KEYS))})']
    try:
        reached = lycoris_targets(kwargs, preset, modules)
    except (re.error, TypeError, AttributeError, ValueError) as err:
        return problems + [f'{field}: its "apply_preset" is not usable ({err})']
    if not reached:
        problems.append(f"{field}: its preset matches no module of the {cfg.model.flavour} transformer")
    problems += _unsaveable(reached, field)
    return problems
