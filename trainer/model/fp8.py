"""Frozen base weights in fp8 with real fp8 matmuls (`memory.base_quantization = "fp8"`).

Each linear layer of the transformer blocks keeps its weight as float8 e4m3 twice, scaled per output row (for the
forward) and per input column (for the input gradient), so both matmuls of a LoRA step run as `torch._scaled_mm` with
rowwise scales; activations and output gradients are quantized per token row on the fly. The weight gets no gradient.

Written here because torchao's float8 training (`convert_to_float8_training`) re-quantizes the weight every step and
computes its gradient even when it is frozen (and then needs the token count divisible by 16: 832x480x81 gives 32760),
and its inference tensors (`Float8Tensor`) have no backward.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.errors import UserError

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and the fp32 scale of each row (row max |x| maps to the largest e4m3 value): x ~ values * scale."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


# One torch custom op for the matmul, with the quantization of its input left outside as plain torch ops: regional
# compile fuses that quantization into the op producing the input, and selective checkpointing tags both for recompute
# like any other op. (As a torch.autograd.Function the quantized input escaped the checkpoint tags under compile and
# was kept for backward: +17 GiB at 1.3B 832x480x81.) `x` is passed only so that autograd routes its gradient.
@torch.library.custom_op("wanforge::fp8_linear", mutates_args=())
def _fp8_linear(x: torch.Tensor, xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                weight_t: torch.Tensor, weight_t_scale: torch.Tensor, bias: torch.Tensor | None,
                out_dtype: torch.dtype) -> torch.Tensor:
    fused_bias = bias if out_dtype != torch.float32 else None  # _scaled_mm adds a bias only to 16-bit outputs
    out = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=weight_scale, bias=fused_bias, out_dtype=out_dtype,
                           use_fast_accum=True)
    return out + bias if bias is not None and fused_bias is None else out


@_fp8_linear.register_fake
def _(x, xq, xs, weight, weight_scale, weight_t, weight_t_scale, bias, out_dtype):
    return xq.new_empty((xq.shape[0], weight.shape[0]), dtype=out_dtype)


def _setup_context(ctx, inputs, output) -> None:
    x, _, _, _, _, weight_t, weight_t_scale, _, _ = inputs
    ctx.save_for_backward(weight_t, weight_t_scale)
    ctx.input_dtype = x.dtype


def _backward(ctx, grad):
    """Only the input gradient (the weight is frozen): dy quantized per row times the per-column-scaled weight."""
    weight_t, weight_t_scale = ctx.saved_tensors
    gq, gs = quantize_rows(grad)
    dx = torch._scaled_mm(gq, weight_t.t(), scale_a=gs, scale_b=weight_t_scale, out_dtype=grad.dtype)
    return dx.to(ctx.input_dtype), None, None, None, None, None, None, None, None


_fp8_linear.register_autograd(_backward, setup_context=_setup_context)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, weight_t: torch.Tensor,
               weight_t_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """y = x @ W.T + b with x quantized per row to e4m3; the gradient reaches x only."""
    rows = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_rows(rows.detach())
    out = torch.ops.wanforge.fp8_linear(rows, xq, xs, weight, weight_scale, weight_t, weight_t_scale, bias, out_dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])


class Float8FrozenLinear(nn.Linear):
    """An `nn.Linear` whose frozen weight is stored and multiplied in fp8 (same module names and forward signature, so
    peft and LyCORIS wrap it like any linear). `compute_dtype` is the dtype outputs come in (peft reads it to give the
    adapter the base layer's dtype rather than fp8's)."""

    weight_scale: torch.Tensor
    weight_t: torch.Tensor
    weight_t_scale: torch.Tensor
    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.weight_t, self.weight_t_scale, self.bias,
                          self.compute_dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale.t()


def to_float8(linear: nn.Linear) -> Float8FrozenLinear:
    """Quantize one linear layer in place (its class changes; bf16 weight memory is replaced by two fp8 copies)."""
    weight = linear.weight.detach()
    compute_dtype = weight.dtype if weight.dtype in (torch.bfloat16, torch.float16) else torch.float32
    values, scale = quantize_rows(weight)  # (out, in), (out, 1)
    values_t, scale_t = quantize_rows(weight.t())  # (in, out), (in, 1)
    linear.__class__ = Float8FrozenLinear
    linear.weight = nn.Parameter(values, requires_grad=False)
    linear.register_buffer("weight_scale", scale.t().contiguous(), persistent=False)  # (1, out) for scale_b
    linear.register_buffer("weight_t", values_t.contiguous(), persistent=False)
    linear.register_buffer("weight_t_scale", scale_t.t().contiguous(), persistent=False)  # (1, in)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
    linear.compute_dtype = compute_dtype
    return linear


def check_float8_device(device: torch.device) -> None:
    """fp8 matmuls need an Ada, Hopper or Blackwell GPU (compute capability 8.9+); the CPU runs them slowly (tests)."""
    if device.type == "cpu":
        return
    if device.type != "cuda" or torch.version.hip:
        raise UserError('memory.base_quantization = "fp8" runs on NVIDIA GPUs only (it was not measured on ROCm): '
                        'use "int8" or "none"')
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise UserError(f'memory.base_quantization = "fp8" needs fp8 matmuls (Ada, Hopper or newer); {name} is '
                        f'sm_{major}{minor}: use "none" (bf16) or "int8"')


def convert_blocks_to_float8(transformer) -> int:
    """Every linear layer inside the transformer blocks and a VACE model's VACE blocks (the embedders and the output
    projection stay as they are), where both sizes are multiples of 16 as fp8 matmuls need. Returns how many."""
    count = 0
    for block in [*transformer.blocks, *(getattr(transformer, "vace_blocks", None) or [])]:
        for module in block.modules():
            if type(module) is nn.Linear and module.in_features % 16 == 0 and module.out_features % 16 == 0:
                to_float8(module)
                count += 1
    if count == 0:
        raise UserError('memory.base_quantization = "fp8": no linear layer of the transformer blocks has sizes that '
                        'are multiples of 16; use "none" or "int8"')
    return count
