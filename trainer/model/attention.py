"""Attention backend choice for the Wan transformer, through diffusers' attention dispatch.

FlashAttention 4 from the `flash-attn-4` pip package (module `flash_attn.cute`) is served through diffusers'
`flash_4_hub` backend: when the package is installed, its kernels are wrapped as torch custom ops (so regional
torch.compile keeps the block in one graph and selective checkpointing can keep the attention output) and handed to
diffusers in place of the kernels-hub download. Without the package `flash_4_hub` is diffusers' own hub path.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging

import torch

from trainer.errors import UserError

FLASH_4 = "flash_4_hub"
# compute capabilities FlashAttention 4's CuTe kernels are built for: Hopper (sm90) and datacenter Blackwell (sm100)
FLASH_4_CAPABILITIES = (9, 10)

log = logging.getLogger(__name__)


def flash_attn_4_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and importlib.util.find_spec("flash_attn.cute") is not None


def flash_attn_4_import_error() -> str | None:
    """None when the installed flash-attn-4 kernels import; else why not (a missing or mismatched CuTe DSL, say)."""
    try:
        importlib.import_module("flash_attn.cute.interface")
    except Exception as err:  # noqa: BLE001 - any failure here means "not usable", reported with its reason
        return f"{type(err).__name__}: {err}"
    return None


def resolve_attention_backend(name: str, device: torch.device, context_parallel: bool = False) -> str:
    """The diffusers attention backend to use. Always explicit: diffusers otherwise falls back to a process-wide one.
    Under `context_parallel`, "auto" is cuDNN SDPA on NVIDIA (FlashAttention 4 has no context-parallel path)."""
    if name != "auto":
        return name
    if device.type != "cuda" or torch.version.cuda is None:
        return "native"  # ROCm and CPU: torch picks
    if context_parallel:  # diffusers 0.42 registers no context-parallel path for flash_4_hub
        return "_native_cudnn"
    # FlashAttention 4 is faster than cuDNN SDPA at Wan's shapes on the H100 (bench/RESULTS.md); it is taken wherever
    # it is installed, imports, and the GPU is one its kernels are built for. Why it is not taken is said once.
    if not flash_attn_4_installed():
        return "_native_cudnn"
    major = torch.cuda.get_device_capability(device)[0]
    if major not in FLASH_4_CAPABILITIES:
        _say_once(f"flash-attn-4 is installed but its kernels do not run on compute capability {major}.x "
                  "(Hopper 9.x and Blackwell 10.x only): using cuDNN SDPA")
        return "_native_cudnn"
    error = flash_attn_4_import_error()
    if error is None:
        return FLASH_4
    _say_once(f"flash-attn-4 is installed but does not import ({error}): using cuDNN SDPA; reinstall it with "
              'pip install "wanforge[flash4]"')
    return "_native_cudnn"


_SAID: set[str] = set()


def _say_once(message: str) -> None:
    """A warning that training, validation and every rank's setup would otherwise repeat: logged once a process."""
    if message not in _SAID:
        _SAID.add(message)
        log.warning(message)


def set_attention_backend(transformer, backend: str, configured: str) -> None:
    """Point every attention processor of `transformer` at `backend`, with a message naming the field on failure."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    names = [b.value for b in AttentionBackendName]
    if backend not in names:
        hint = difflib.get_close_matches(backend, names, n=1)
        fix = f'did you mean "{hint[0]}"?' if hint else 'use "auto" or one of: ' + ", ".join(names)
        raise UserError(f'memory.attention_backend: unknown backend "{configured}": {fix}')
    log.info("attention backend: %s%s", backend, " (auto)" if configured == "auto" else "")
    if backend == FLASH_4 and flash_attn_4_installed():
        error = flash_attn_4_import_error()
        if error is not None:
            raise UserError(f'memory.attention_backend = "{configured}": flash-attn-4 is installed but does not import '
                            f'({error}): reinstall it with pip install "wanforge[flash4]", or use "auto"')
        _use_local_flash_attn_4(transformer)
        return
    try:
        transformer.set_attention_backend(backend)
    except (ValueError, RuntimeError, ImportError) as err:
        extra = " (or pip install flash-attn-4 for the local kernels)" if backend == FLASH_4 else ""
        raise UserError(f'memory.attention_backend = "{configured}" is not usable here ({err}){extra}: use "auto"') from err


def _use_local_flash_attn_4(transformer) -> None:
    """diffusers' `set_attention_backend` minus its `kernels`-package check, which only guards the hub download that
    a pre-filled kernel makes unnecessary."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_dispatch import _HUB_KERNELS_REGISTRY, AttentionBackendName, _AttentionBackendRegistry

    backend = AttentionBackendName(FLASH_4)
    _HUB_KERNELS_REGISTRY[backend].kernel_fn = flash_attn_4
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if isinstance(module, AttentionModuleMixin) and hasattr(processor, "_attention_backend"):
            processor._attention_backend = backend
    _AttentionBackendRegistry.set_active_backend(backend)


def flash_attn_4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None,
                 causal: bool = False) -> torch.Tensor:
    """FlashAttention 4 on (batch, seq, heads, head_dim) tensors, differentiable, opaque to torch.compile."""
    if causal:
        raise ValueError("flash_attn_4: causal attention is not used by Wan and not wired here")
    # the kernels take one half-precision dtype; under autocast cast to its dtype as SDPA's autocast rule does (with
    # fp32 base weights the q/k RMSNorms return fp32 while v is already bf16)
    device = q.device.type
    autocast = device in ("cuda", "cpu") and torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else q.dtype
    if device != "cpu" and dtype not in (torch.bfloat16, torch.float16):  # (no FA4 kernels run on CPU)
        raise ValueError(f"flash_attn_4 needs bf16 or fp16 inputs (got {q.dtype}); train with bf16/fp16 mixed "
                         'precision or set memory.attention_backend = "_native_cudnn"')
    q, k, v = (t.to(dtype) for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return torch.ops.wanforge.flash_attn4_fwd(q, k, v, scale)[0]


@torch.library.custom_op("wanforge::flash_attn4_fwd", mutates_args=())
def _flash_attn4_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse, *_ = _flash_attn_fwd(q, k, v, softmax_scale=scale, return_lse=True)
    return out, lse


@_flash_attn4_fwd.register_fake
def _(q, k, v, scale):
    batch, seq_q, heads, _ = q.shape
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty((batch, heads, seq_q), dtype=torch.float32)


@torch.library.custom_op("wanforge::flash_attn4_bwd", mutates_args=())
def _flash_attn4_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_bwd

    dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout.contiguous(), lse, scale, False, 0.0)[:3]
    return dq, dk, dv


@_flash_attn4_bwd.register_fake
def _(dout, q, k, v, out, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.wanforge.flash_attn4_bwd(dout, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


_flash_attn4_fwd.register_autograd(_backward, setup_context=_setup_context)
