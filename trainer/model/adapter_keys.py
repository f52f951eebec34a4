"""What an extra LoRA file (a speed LoRA stacked for validation) holds, and which of its keys would apply to a Wan
transformer. Torch-free at import (preflight uses it); torch and diffusers are imported inside the functions.

Key names and shapes come from the safetensors header (no weights read). They are converted by diffusers' own Wan LoRA
converter (`WanLoraLoaderMixin.lora_state_dict`: original Wan names as ComfyUI writes them, kohya / musubi names,
`.alpha`), run on shape-only meta tensors in `check` and on the real tensors at render time, so `check` predicts what
the loader gets. Where that converter refuses a file users do have (kohya names on only some modules or without
`.alpha`, original names without the `diffusion_model.` prefix, `.alpha` on a module it does not scale), the file is
first renamed to the form it reads (`convert_lora`). Then each converted module is looked up in the model: modules it
lacks (Wan 2.1 I2V's k_img / v_img on a Wan 2.2 or text-to-video model, blocks past its last) are named with the
reason, and sizes of another model (a 14B LoRA on the 1.3B) are an error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.model.lora_names import kohya_to_original, to_diffusers, to_original

ORIGINAL_PREFIX = "diffusion_model."
KOHYA_PREFIX = "lora_unet_"
DIFFUSERS_PREFIX = "transformer."
MAX_HEADER_BYTES = 100 * 2**20
FORMAT_NAMES = {"original": "original Wan names (ComfyUI)", "original-bare": "original Wan names without the "
                "diffusion_model. prefix", "kohya": "kohya / musubi names", "diffusers": "diffusers names",
                "unknown": "unknown"}
_SUFFIX = re.compile(r"\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_down\.weight|lora_up\.weight|alpha|diff|diff_b"
                     r"|dora_scale|lora_mid\.weight|lokr_w\w*|hada_w\w*|hada_t\w*|weight|bias)$")
_BARE_ORIGINAL = re.compile(r"^(blocks\.\d+\.(self_attn|cross_attn|ffn)|head\.head|time_projection|text_embedding|"
                            r"time_embedding|img_emb)\.")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
           "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
           "BOOL": "bool"}


class AdapterFileError(ValueError):
    """The file cannot be used as a LoRA (not safetensors, a format diffusers' loader does not read): the message says
    why, in one line."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]


# ---------------------------------------------------------------- the file


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes from a .safetensors header (8-byte length + JSON); no weights are read."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or length < 2 or length > min(MAX_HEADER_BYTES, size - 8):
                raise AdapterFileError("is not a .safetensors file (its header length does not fit the file)")
            header = json.loads(f.read(length).decode("utf-8"))
    except OSError as err:
        raise AdapterFileError(f"cannot be read ({err.strerror or err})") from None
    except (UnicodeDecodeError, ValueError) as err:
        if isinstance(err, AdapterFileError):
            raise
        raise AdapterFileError("is not a .safetensors file (its header is not JSON)") from None
    return parse_header(header)


def parse_header(header: Any) -> dict[str, TensorInfo]:
    """The tensors of a parsed safetensors header (huggingface_hub's remote header reader gives the same)."""
    if not isinstance(header, dict):
        raise AdapterFileError("is not a .safetensors file (its header is not a table of tensors)")
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list) or "dtype" not in entry:
            raise AdapterFileError(f'is not a .safetensors file (entry "{name}" has no dtype and shape)')
        out[name] = TensorInfo(str(entry["dtype"]), tuple(int(d) for d in entry["shape"]))
    if not out:
        raise AdapterFileError("holds no tensors")
    return out


def lora_format(keys: Iterable[str]) -> str:
    """original (ComfyUI: diffusion_model.<original module>), kohya (lora_unet_...), diffusers (transformer.<module>),
    original-bare (original names without the prefix), or unknown; in the order diffusers' loader tests them."""
    keys = list(keys)
    for fmt, prefix in (("original", ORIGINAL_PREFIX), ("kohya", KOHYA_PREFIX), ("diffusers", DIFFUSERS_PREFIX)):
        if any(k.startswith(prefix) for k in keys):
            return fmt
    if any(_BARE_ORIGINAL.match(k) for k in keys):
        return "original-bare"
    return "unknown"


def split_key(key: str) -> tuple[str, str]:
    """(module, suffix): `blocks.0.attn1.to_q.lora_A.weight` -> (`blocks.0.attn1.to_q`, `lora_A.weight`)."""
    m = _SUFFIX.search(key)
    return (key[: m.start()], m.group(1)) if m else (key, "")


def source_module(key: str, fmt: str) -> str | None:
    """The diffusers module a key of the file names (None: a name the Wan layout does not have)."""
    module, _ = split_key(key)
    if fmt == "original":
        return to_diffusers(module.removeprefix(ORIGINAL_PREFIX)) if module.startswith(ORIGINAL_PREFIX) else None
    if fmt == "original-bare":
        return to_diffusers(module)
    if fmt == "kohya":
        original = kohya_to_original(module)
        return to_diffusers(original) if original else None
    if fmt == "diffusers":
        return module.removeprefix(DIFFUSERS_PREFIX) if module.startswith(DIFFUSERS_PREFIX) else None
    return None


# ---------------------------------------------------------------- conversion (diffusers' converter, torch inside)


def _normalised(state: Mapping[str, Any], fmt: str) -> tuple[dict[str, Any], list[str]]:
    """The file in the form diffusers' original-name converter reads: kohya and bare names renamed to
    `diffusion_model.<original module>.lora_A/lora_B/alpha`; `.alpha` of a non-block module folded into its lora_A (that
    converter scales only block modules). Returns it and the keys it could not rename."""
    out: dict[str, Any] = {}
    unknown: list[str] = []
    renames = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}
    for key, tensor in state.items():
        module, suffix = split_key(key)
        if fmt == "kohya":
            original = kohya_to_original(module)
            if original is None or suffix not in (*renames, "alpha", "lora_A.weight", "lora_B.weight"):
                unknown.append(key)
                continue
            out[f"{ORIGINAL_PREFIX}{original}.{renames.get(suffix, suffix)}"] = tensor
        elif fmt == "original-bare":
            out[ORIGINAL_PREFIX + key] = tensor
        else:
            out[key] = tensor
    for key in [k for k in out if k.endswith(".alpha")]:
        module = key.removeprefix(ORIGINAL_PREFIX).removesuffix(".alpha")
        down = next((f"{ORIGINAL_PREFIX}{module}.{s}" for s in ("lora_A.weight", "lora_down.weight")
                     if f"{ORIGINAL_PREFIX}{module}.{s}" in out), None)
        if _BLOCK.match(module) or down is None:
            continue
        out[down] = out[down] * (float(out.pop(key).item()) / out[down].shape[0])
    return out, unknown


def _fold_alphas(converted: dict[str, Any]) -> dict[str, Any]:
    """diffusers-named files may carry `<module>.alpha`; load_lora_weights refuses keys without "lora": fold each into its
    lora_A as alpha / rank (what the forward pass would scale by)."""
    for key in [k for k in converted if k.endswith(".alpha")]:
        down = key.removesuffix(".alpha") + ".lora_A.weight"
        alpha = float(converted.pop(key).item())
        if down in converted:
            converted[down] = converted[down] * (alpha / converted[down].shape[0])
    return converted


_CONVERTER_ERRORS = (KeyError, ValueError, IndexError, AttributeError, TypeError, RuntimeError)


def convert_lora(state: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """(state dict with diffusers names, as `load_lora_weights` takes it; the file's format). diffusers' converter as it
    is first; a file it refuses (or would silently pass through unconverted) is renamed first (`_normalised`).
    AdapterFileError when neither reads it. Works on real tensors and on meta tensors (shapes only; `.alpha` real)."""
    from diffusers.loaders import WanLoraLoaderMixin

    fmt = lora_format(state)
    if fmt == "unknown":
        raise AdapterFileError("has no key diffusers' Wan LoRA loader recognises (it reads diffusion_model.<original "
                               "Wan module>, lora_unet_<module> and transformer.<module> LoRA keys)")
    if any(split_key(k)[1].startswith(("lokr_", "hada_")) for k in state):
        raise AdapterFileError("is a LyCORIS LoKr / LoHa file: diffusers' Wan LoRA loader reads plain LoRA "
                               "(lora_A/lora_B or lora_down/lora_up) only")
    first_error: Exception | None = None
    if fmt != "original-bare":
        try:
            return _fold_alphas(dict(WanLoraLoaderMixin.lora_state_dict(dict(state)))), fmt
        except _CONVERTER_ERRORS as err:
            first_error = err
    normalised, _ = _normalised(state, fmt)
    try:
        return _fold_alphas(dict(WanLoraLoaderMixin.lora_state_dict(normalised))), fmt
    except _CONVERTER_ERRORS as err:
        detail = str(first_error or err).splitlines()[0][:200] if str(first_error or err) else type(err).__name__
        raise AdapterFileError(f"is refused by diffusers' Wan LoRA converter ({detail})") from None


# ---------------------------------------------------------------- which keys apply


@dataclass
class AdapterReport:
    """What loading the file into one transformer would do."""

    fmt: str
    modules: int = 0  # modules of the model that get its weights
    applied_keys: set[str] = field(default_factory=set)  # converted keys that load (diffusers names)
    layers: set[str] = field(default_factory=set)  # the modules they load into
    errors: list[str] = field(default_factory=list)  # loading would fail or change nothing
    not_applied: list[str] = field(default_factory=list)  # keys that would not apply, grouped, each with why


def module_group(modules: Iterable[str], fmt: str) -> str:
    """`blocks.0-39.cross_attn.k_img, ...` in the file's own naming (original names unless the file uses diffusers')."""
    shown: dict[str, list[int]] = {}
    others: list[str] = []
    for module in modules:
        name = module if fmt == "diffusers" else (to_original(module) or module)
        m = _BLOCK.match(name)
        if m:
            shown.setdefault(m[2], []).append(int(m[1]))
        else:
            others.append(name)
    parts = [f"blocks.{_ranges(sorted(set(ns)))}.{rest}" for rest, ns in shown.items()] + sorted(set(others))
    return ", ".join(parts[:6]) + (f" and {len(parts) - 6} more" if len(parts) > 6 else "")


def _ranges(numbers: list[int]) -> str:
    spans: list[str] = []
    start = prev = numbers[0]
    for n in numbers[1:] + [None]:  # type: ignore[list-item]
        if n is not None and n == prev + 1:
            prev = n
            continue
        spans.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return spans[0] if len(spans) == 1 else "{" + ",".join(spans) + "}"


def _absent_reason(module: str, shapes: Mapping[str, tuple[int, int]]) -> str:
    m = _BLOCK.match(module)
    layers = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
    if m and int(m[1]) >= layers:
        return f"this model has blocks 0-{layers - 1} only"
    if module.endswith(("add_k_proj", "add_v_proj")) or "image_embedder" in module:
        return ("Wan 2.1 image-to-video layers (CLIP image input, k_img / v_img): this model has none, so these keys "
                "are skipped (harmless for a speed LoRA made for Wan 2.1 I2V)")
    return "no such layer in this model"


def analyse(source_keys: Iterable[str], converted: Mapping[str, tuple[int, ...]], fmt: str,
            shapes: Mapping[str, tuple[int, int]]) -> AdapterReport:
    """Compare a converted LoRA ({diffusers key: shape}) with the model's linear layers ({module: (in, out)}).
    `source_keys`: the file's own keys, for what the converter dropped."""
    report = AdapterReport(fmt)
    absent: dict[str, list[str]] = {}
    wrong: list[str] = []
    unknown = [k for k in converted if not k.startswith(DIFFUSERS_PREFIX)]
    landed: set[str] = set()
    for key, shape in converted.items():
        if not key.startswith(DIFFUSERS_PREFIX):
            continue
        module, suffix = split_key(key.removeprefix(DIFFUSERS_PREFIX))
        if module not in shapes:
            absent.setdefault(_absent_reason(module, shapes), []).append(module)
            continue
        fan_in, fan_out = shapes[module]
        expected = {"lora_A.weight": (None, fan_in), "lora_B.weight": (fan_out, None), "lora_B.bias": (fan_out,)}.get(suffix)
        if expected is None or len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape)):
            wrong.append(f"{module} ({suffix} {list(shape)}; the layer is {fan_in} -> {fan_out})")
            continue
        report.applied_keys.add(key)
        landed.add(module)
    report.modules, report.layers = len(landed), landed
    if wrong:
        report.errors.append(f"{len(wrong)} keys are sized for another model, e.g. {wrong[0]}: is it a LoRA for "
                             "another Wan size (14B vs 1.3B vs 5B)?")
    for reason, modules in absent.items():
        report.not_applied.append(f"{module_group(sorted(set(modules)), fmt)} ({len(set(modules))} layers): {reason}")
    if unknown:
        report.not_applied.append(f"{len(unknown)} keys the loader does not place, e.g. {unknown[0]}: not a "
                                  "transformer LoRA key")
    source = list(source_keys)
    converted_modules = {split_key(k.removeprefix(DIFFUSERS_PREFIX))[0] for k in converted}
    dropped = sorted({m for k in source if (m := source_module(k, fmt)) and m not in converted_modules
                      and split_key(k)[1] not in ("diff", "diff_b", "dora_scale")})
    if dropped:
        report.not_applied.append(f"{module_group(dropped, fmt)} ({len(dropped)} layers): dropped by diffusers' Wan "
                                  "converter")
    diffs = [k for k in source if split_key(k)[1] in ("diff", "diff_b") and not k.endswith("head.head.diff")
             and (split_key(k)[1] == "diff" or "norm" in k)]
    if diffs:
        report.not_applied.append(f"{len(diffs)} full-weight difference keys (.diff, e.g. {diffs[0]}): diffusers' "
                                  "loader ignores them (ComfyUI applies them)")
    doras = [k for k in source if k.endswith("dora_scale")]
    if doras:
        report.not_applied.append(f"{len(doras)} DoRA magnitude keys (dora_scale): diffusers loads the file as a plain "
                                  "LoRA without them")
    if not report.applied_keys and not report.errors:
        report.errors.append("none of its keys applies to this model" + (
            f" ({report.not_applied[0]})" if report.not_applied else ""))
    return report


def meta_state(header: Mapping[str, TensorInfo], alphas: Mapping[str, float]) -> dict[str, Any]:
    """Shape-only tensors for the converter (`.alpha` values real: it divides by them)."""
    import torch

    out: dict[str, Any] = {}
    for name, info in header.items():
        if name in alphas:
            out[name] = torch.tensor(alphas[name])
        else:
            dtype = getattr(torch, _DTYPES.get(info.dtype, "float32"), torch.float32)
            out[name] = torch.empty(info.shape, dtype=dtype, device="meta")
    return out


def analyse_header(header: Mapping[str, TensorInfo], alphas: Mapping[str, float],
                   shapes: Mapping[str, tuple[int, int]]) -> AdapterReport:
    """`check`'s look at a file without its weights: diffusers' converter on meta tensors, then `analyse`."""
    fmt = lora_format(header)
    try:
        converted, fmt = convert_lora(meta_state(header, alphas))
    except AdapterFileError as err:
        return AdapterReport(fmt, errors=[str(err)])
    return analyse(header, {k: tuple(v.shape) for k, v in converted.items()}, fmt, shapes)


def read_alphas(path: Path, header: Mapping[str, TensorInfo]) -> dict[str, float]:
    """The `.alpha` scalars of a local file (the only values the converter needs)."""
    names = [n for n in header if n.endswith(".alpha")]
    if not names:
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {n: float(f.get_tensor(n).float().reshape(-1)[0]) for n in names}
