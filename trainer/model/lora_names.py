"""Which Wan modules an adapter reaches, and their names in the original Wan layout. Torch-free (preflight imports it).

The interchange LoRA format names modules as the original Wan code does (`blocks.0.self_attn.q`, `head.head`,
`img_emb.proj.1`); diffusers names them `blocks.0.attn1.to_q`, `proj_out`, `condition_embedder.image_embedder.ff.net.0.proj`.
The mapping follows diffusers' WanLoraLoaderMixin converter, which reads these files back. VACE blocks keep the
official Wan VACE names (`vace_blocks.0.self_attn.q`, `vace_blocks.0.before_proj` / `after_proj` for diffusers'
`proj_in` / `proj_out`), as diffusers' single-file converter (convert_wan_transformer_to_diffusers) and ComfyUI read
them; diffusers' LoRA converter has no VACE names, so a file with VACE-block keys also gets a diffusers-format twin. `interchange_problems`
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
# a VACE block is a Wan block plus the hint projections (VACE block 0 also projects the control in)
VACE_BLOCK_MAP = {**BLOCK_MAP, "proj_in": "before_proj", "proj_out": "after_proj"}
_BLOCK = re.compile(r"^blocks\.(?P<n>\d+)\.(?P<rest>.+)$")
_VACE_BLOCK = re.compile(r"^vace_blocks\.(?P<n>\d+)\.(?P<rest>.+)$")
VACE_PREFIX = "vace_blocks."
_REVERSE_BLOCK = {v: k for k, v in BLOCK_MAP.items()}
_REVERSE_VACE_BLOCK = {v: k for k, v in VACE_BLOCK_MAP.items()}
_REVERSE_TOP = {v: k for k, v in TOP_MAP.items()}
# LyCORIS algorithms whose exported keys and strength are checked against ComfyUI's rules (tests/comfyui_rules.py)
LYCORIS_ALGOS = ("lora", "locon", "loha", "lokr", "full")


def _rename(module: str, block_names: dict[str, str], top_names: dict[str, str],
            vace_names: dict[str, str]) -> str | None:
    for pattern, names, prefix in ((_BLOCK, block_names, "blocks"), (_VACE_BLOCK, vace_names, "vace_blocks")):
        m = pattern.match(module)
        if m:
            rest = names.get(m["rest"])
            return f"{prefix}.{m['n']}.{rest}" if rest else None
    return top_names.get(module)


def to_original(module: str) -> str | None:
    """diffusers module path -> original Wan module path; None for a module the original layout has no LoRA name for."""
    return _rename(module, BLOCK_MAP, TOP_MAP, VACE_BLOCK_MAP)


def is_vace_module(module: str) -> bool:
    """A module of a VACE block (the same prefix in the original and the diffusers layout)."""
    return module.startswith(VACE_PREFIX)


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
    return _rename(original, _REVERSE_BLOCK, _REVERSE_TOP, _REVERSE_VACE_BLOCK)


def kohya_to_original(name: str) -> str | None:
    """kohya / musubi module name -> original Wan module path: `lora_unet_blocks_0_self_attn_q` -> `blocks.0.self_attn.q`
    (None if it names no original Wan module)."""
    if not name.startswith("lora_unet_"):
        return None
    body = name.removeprefix("lora_unet_")
    m = re.match(r"^(vace_blocks|blocks)_(\d+)_(.+)$", body)  # a VACE model's VACE blocks: their own names
    names = (VACE_BLOCK_MAP if m and m[1] == "vace_blocks" else BLOCK_MAP).values()
    candidates = [f"{m[1]}.{m[2]}.{v}" for v in names if v.replace(".", "_") == m[3]] if m else []
    candidates += [v for v in TOP_MAP.values() if v.replace(".", "_") == body]
    return candidates[0] if len(candidates) == 1 else None


def alpha_read_by_diffusers(original: str) -> bool:
    """diffusers' Wan converter applies `.alpha` only to block modules; elsewhere it is left over and loading raises
    (VACE blocks: the converter reads none of their keys, their alpha is folded like the top-level modules')."""
    return _BLOCK.match(original) is not None


# ---------------------------------------------------------------- the transformer's modules, without torch


def _block_modules(b: str, image_embedder: bool, vace: bool = False, first: bool = False) -> list[tuple[str, str]]:
    """(name, class) of one WanTransformerBlock (or, with `vace`, one WanVACETransformerBlock; `first`: VACE block 0,
    which also has the input projection)."""
    mods = [(b, "WanVACETransformerBlock" if vace else "WanTransformerBlock")]
    if vace and first:
        mods.append((f"{b}.proj_in", "Linear"))
    mods.append((f"{b}.norm1", "FP32LayerNorm"))
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
    if vace:
        mods.append((f"{b}.proj_out", "Linear"))
    return mods


def wan_modules(image_embedder: bool, num_layers: int, vace_blocks: int = 0) -> list[tuple[str, str]]:
    """(name, class name) of every module of diffusers' WanTransformer3DModel, in named_modules() order.
    image_embedder: Wan 2.1 I2V (CLIP image tokens: image embedder + add_k/v_proj in every block); vace_blocks: the
    number of VACE blocks of a WanVACETransformer3DModel (0: not a VACE model).
    tests/test_export.py checks this table against the real classes."""
    cls = "WanVACETransformer3DModel" if vace_blocks else "WanTransformer3DModel"
    mods = [("", cls), ("rope", "WanRotaryPosEmbed"), ("patch_embedding", "Conv3d")]
    if vace_blocks:
        mods.append(("vace_patch_embedding", "Conv3d"))
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
        mods += _block_modules(f"blocks.{n}", image_embedder)
    if vace_blocks:
        mods.append(("vace_blocks", "ModuleList"))
        for n in range(vace_blocks):
            mods += _block_modules(f"vace_blocks.{n}", image_embedder, vace=True, first=n == 0)
    mods += [("norm_out", "FP32LayerNorm"), ("proj_out", "Linear")]
    return mods


def flavour_modules(flavour_name: str, num_layers: int | None = None) -> list[tuple[str, str]]:
    flavour = get_flavour(flavour_name)
    return wan_modules(flavour.image_encoder, num_layers or flavour.num_layers, len(flavour.vace_layers))


# peft's exclude_modules (a regex it matches against the whole module path) that keeps an adapter off the VACE blocks
VACE_EXCLUDE = r"vace_blocks\..*"


def adapts_vace_blocks(lora_cfg, flavour_name: str) -> bool:
    """Whether the run's adapter reaches into the VACE blocks: a VACE flavour with lora.vace_blocks on."""
    return get_flavour(flavour_name).is_vace and bool(getattr(lora_cfg, "vace_blocks", True))


def _suffixes(name: str) -> list[str]:
    """"blocks.0.attn1.to_q" -> itself, "0.attn1.to_q", "attn1.to_q", "to_q": every name peft matches it by."""
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def peft_targets(target_modules: list[str], modules: list[tuple[str, str]],
                 vace_blocks: bool = True) -> list[tuple[str, str]]:
    """The modules peft adapts for a list of target names (a name matches itself or any path ending in "." + it);
    `vace_blocks` False: none inside a VACE block (peft's exclude_modules = VACE_EXCLUDE). Each module's suffixes are
    looked up in a set: linear in modules + targets, however long the list."""
    wanted = set(target_modules)
    return [(n, c) for n, c in modules if n and (vace_blocks or not is_vace_module(n))
            and any(s in wanted for s in _suffixes(n))]


def targets_matching_nothing(target_modules: list[str], modules: list[tuple[str, str]],
                             vace_blocks: bool = True) -> list[str]:
    """The target names that select no module (in their order), from one index of every module's suffixes."""
    found = {s for n, _ in modules if n and (vace_blocks or not is_vace_module(n)) for s in _suffixes(n)}
    return [t for t in target_modules if t not in found]


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


def default_lycoris_preset(target_modules: list[str], vace_blocks: bool = False) -> dict:
    """Without "apply_preset": the modules lora.target_modules names, in every block (the LoRA default), and with
    `vace_blocks` in every VACE block too."""
    prefixes = ("blocks", "vace_blocks") if vace_blocks else ("blocks",)
    return {"target_module": [], "target_name": [rf"^{p}\.\d+\.{re.escape(t)}$" for p in prefixes
                                                 for t in target_modules]}


def lycoris_preset(preset: dict | None, target_modules: list[str], vace_blocks: bool) -> dict:
    """The preset a run applies: the config's apply_preset (kept off the VACE blocks unless `vace_blocks`), or the
    default one."""
    if preset is None:
        return default_lycoris_preset(target_modules, vace_blocks)
    if vace_blocks or not isinstance(preset, dict):
        return preset
    excluded = preset.get("exclude_name", [])
    pattern = "vace_blocks.*" if preset.get("use_fnmatch") else VACE_EXCLUDE
    return {**preset, "exclude_name": [*excluded, pattern] if isinstance(excluded, list) else excluded}


# ---------------------------------------------------------------- preflight


def interchange_problems(cfg) -> list[str]:
    """Every reason the run's adapter could not be saved as a LoRA file both native ComfyUI and diffusers load
    (from the config and flavour alone; one line each, naming the field and a fix). Empty: it can be saved."""
    modules = flavour_modules(cfg.model.flavour)
    vace = adapts_vace_blocks(cfg.lora, cfg.model.flavour)
    if cfg.lora.lora_type == "lycoris":
        return _lycoris_problems(cfg, modules, vace)
    nowhere = set(targets_matching_nothing(cfg.lora.target_modules, modules))
    problems = []
    for target in targets_matching_nothing(cfg.lora.target_modules, modules, vace):
        hint = " outside the VACE blocks (lora.vace_blocks = false)" if target not in nowhere else ""
        problems.append(f'lora.target_modules: "{target}" matches no module of the {cfg.model.flavour} transformer'
                        f'{hint} (diffusers names, e.g. "attn1.to_q", "attn2.to_out.0", "ffn.net.0.proj", "proj_out")')
    reached = peft_targets(cfg.lora.target_modules, modules, vace)
    problems += _unsaveable(reached, "lora.target_modules")
    if cfg.lora.save_format == "comfyui":
        # VACE-block modules are read by ComfyUI from the interchange file and by diffusers from its diffusers twin
        if reached and not any(n.startswith(("blocks.", VACE_PREFIX)) for n, _ in reached):
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


def _lycoris_problems(cfg, modules: list[tuple[str, str]], vace_blocks: bool = False) -> list[str]:
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
    preset = lycoris_preset(kwargs.get("apply_preset"), cfg.lora.target_modules, vace_blocks)
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
