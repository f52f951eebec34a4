"""Self-attention kernels at Wan's real shapes: forward and forward+backward time, TFLOP/s, error vs fp32.

    python3 bench/attention_bench.py            # cuDNN / flash / efficient SDPA, and FlashAttention 4 if installed
    python3 bench/attention_bench.py --tokens 75600 --heads 40 --kernels cudnn --gemm   # 14B at 1280x720x81

Shapes: 832x480x81 -> 32760 tokens (1280x720x81 -> 75600), head_dim 128; 1.3B has 12 heads, 14B 40. FLOPs: forward
4*N^2*H*D, backward 2.5x forward (the five matmuls of a flash backward). `--gemm` also times the bf16 matmuls of a
block's linear layers at that token count (forward and the input-gradient matmul): the matmul rate of a FLOP floor.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

TOKENS = 32760


def sdpa(backend: SDPBackend):
    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return run


def kernels() -> dict:
    found = {"cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "flash (FA2)": sdpa(SDPBackend.FLASH_ATTENTION),
             "efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION)}
    try:
        from trainer.model.attention import flash_attn_4, flash_attn_4_installed

        if flash_attn_4_installed():
            found["flash-attn-4"] = flash_attn_4
    except ImportError as err:
        print(f"flash-attn-4 not usable: {err}")
    return found


def gemm_rates(tokens: int, dim: int, ffn: int, reps: int) -> None:
    """bf16 TF/s of the block's linear layers at `tokens`: y = x W^T (forward) and dx = dy W (input gradient)."""
    print(f"\n| matmul ({tokens} tokens) | ms | TF/s |\n|---|---|---|")
    for name, (k, n) in {"dim x dim (q/k/v/o)": (dim, dim), "dim -> ffn (up)": (dim, ffn),
                         "ffn -> dim (down)": (ffn, dim)}.items():
        x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
        for label, fn in ((f"{name} forward", lambda: x @ w.t()), (f"{name} input grad", lambda: dy @ w)):
            ms = time_ms(fn, reps)
            print(f"| {label} | {ms:.2f} | {2 * tokens * k * n / ms / 1e9:.0f} |", flush=True)


def time_ms(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--heads", default="12,40")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--kernels", default="", help="comma list of kernel names to run (default: all found)")
    parser.add_argument("--gemm", action="store_true", help="also time the 14B block's matmuls at --tokens")
    args = parser.parse_args()
    tokens = args.tokens
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; tokens {tokens}, head_dim 128, bf16\n")
    print("| heads | kernel | fwd ms | fwd TF/s | fwd+bwd ms | fwd+bwd TF/s | bwd TF/s | max err out / dq vs fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    wanted = [k for k in args.kernels.split(",") if k]
    for heads in map(int, args.heads.split(",")):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, tokens, heads, 128, device="cuda", dtype=torch.bfloat16, generator=g)
                   for _ in range(3))
        dout = torch.randn_like(q)
        fwd_flop = 4 * tokens * tokens * heads * 128
        # fp32 reference on a slice of queries (the full fp32 matrix would not fit): first 1024 queries
        qs = q[:, :1024].float().requires_grad_()
        ref = F.scaled_dot_product_attention(qs.transpose(1, 2), k.float().transpose(1, 2),
                                             v.float().transpose(1, 2)).transpose(1, 2)
        (ref_dq,) = torch.autograd.grad(ref, qs, dout[:, :1024].float())
        for name, fn in kernels().items():
            if wanted and name.split()[0] not in wanted:
                continue
            try:
                qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
                fwd = time_ms(lambda: fn(q, k, v), args.reps)

                def both():
                    out = fn(qg, kg, vg)
                    torch.autograd.grad(out, (qg, kg, vg), dout)

                total = time_ms(both, args.reps)
                # error on the same 1024 queries (attention rows are independent)
                qe = q[:, :1024].clone().requires_grad_()
                out = fn(qe, k, v)
                (dq,) = torch.autograd.grad(out, qe, dout[:, :1024])
                err_out = (out.float() - ref).abs().max().item()
                err_dq = (dq.float() - ref_dq).abs().max().item()
                bwd = total - fwd
                print(f"| {heads} | {name} | {fwd:.1f} | {fwd_flop / fwd / 1e9:.0f} | {total:.1f} | "
                      f"{3.5 * fwd_flop / total / 1e9:.0f} | {2.5 * fwd_flop / bwd / 1e9:.0f} | "
                      f"{err_out:.2e} / {err_dq:.2e} |", flush=True)
            except Exception as err:  # noqa: BLE001 - one kernel failing must not hide the others
                print(f"| {heads} | {name} | failed: {type(err).__name__}: {str(err)[:200]} | | | | | |", flush=True)
        del q, k, v, dout, qs, ref, ref_dq
    if args.gemm:
        gemm_rates(tokens, 5120, 13824, args.reps)


if __name__ == "__main__":
    main()
