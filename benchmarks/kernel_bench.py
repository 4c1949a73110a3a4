"""Micro-benchmark of the linear-layer kernels on Llama-3-8B shapes (GPU): time per call and achieved
bandwidth (weight bytes read per call / time) against a device-to-device copy measured in the same run.

    python -m benchmarks.kernel_bench [--tokens 1,4,8,16] [--shapes up,down] [--only "bf16,int4 cuda,sparse24"]
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import triton.testing

from compress.quant import IntScheme

if TYPE_CHECKING:
    from compress.formats.integer import IntLinear

SHAPES = {"o": (4096, 4096), "kv": (1024, 4096), "up": (14336, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096), "qkv": (6144, 4096), "gate_up": (28672, 4096)}  # the last two: fused layers


def copy_bandwidth() -> float:
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * 4 / (ms / 1e3)


def bench(fn) -> float:
    """Milliseconds per call, replayed from a CUDA graph as decode steps run (no launch overhead)."""
    fn()  # compile and autotune outside the graph
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def tinygemm_pack(layer: IntLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric 4-bit layer in the layout of torch's tinygemm kernel (``aten._weight_int4pack_mm``, gpt-fast's
    int4 kernel), the reference the Triton kernel is measured against: w = (q - 8) * scale + zero."""
    codes = layer.codes()
    pairs = (codes[:, ::2] << 4) | codes[:, 1::2]  # tinygemm: even column in the high nibble
    weight = torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), 8)
    s = layer.scales.float()
    scales_and_zeros = torch.stack([s, torch.zeros_like(s)], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()
    return weight, scales_and_zeros


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1", help="comma-separated token counts (rows of x) to time")
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help=f"comma-separated layer shapes to time, of: {', '.join(SHAPES)} (default: all)")
    parser.add_argument("--only", default="", help="time only the kernels whose label contains one of these "
                                                   "comma-separated words (e.g. 'bf16,int4 cuda'; default: all)")
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    shapes = args.shapes.split(",")
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        parser.error(f"--shapes: unknown shape(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    only = [word for word in args.only.split(",") if word]
    from compress.formats.fp8 import Fp8Linear
    from compress.formats.integer import IntLinear
    from compress.formats.sparse import Sparse24IntLinear, Sparse24Linear
    from compress.kernels import cuda_8bit, cuda_int4, gemv, sparse24
    from compress.sparsity import nm_mask

    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"{'shape':<8} {'M':>5} {'kernel':<24} {'us':>9} {'GB/s':>7} {'of copy':>7}")
    torch._dynamo.config.recompile_limit = 64
    fused = torch.compile(lambda x, w: (x.unsqueeze(-2).float() * w.float()).sum(dim=-1).to(x.dtype))
    widest = max(max(SHAPES[name]) for name in shapes)
    A32 = torch.randn(32, widest, device="cuda", dtype=torch.bfloat16) / widest**0.5  # a correction pair's factors
    B32 = torch.randn(widest, 32, device="cuda", dtype=torch.bfloat16) * 0.02
    for name in shapes:
        n, k = SHAPES[name]
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        layer4 = IntLinear.from_weight(w, None, IntScheme(4, True, "group", 128), torch.bfloat16)
        layer8 = IntLinear.from_weight(w, None, IntScheme(8, True, "channel", None, restricted=True), torch.bfloat16)
        fp8 = Fp8Linear.from_weight(w, None, True, "dynamic", torch.bfloat16)
        tg = tinygemm_pack(layer4)
        keep = nm_mask(w.abs().float(), 2, 4)  # 2:4 by magnitude: the kept values, and the kept 4-bit codes
        sp24 = Sparse24Linear.from_dense(w, keep, None)
        sp24i = Sparse24IntLinear.from_int(IntLinear.from_weight(w * keep, None, IntScheme(4, True, "group", 128),
                                                                 torch.bfloat16), keep)
        s8, s8f = layer8.scales.view(-1), fp8.weight_scale.view(-1).contiguous()
        for m in tokens:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            kernels = {
                "bf16 cublas": (lambda: F.linear(x, w), 2 * n * k),
                "int4 tinygemm": (lambda: torch.ops.aten._weight_int4pack_mm(x, tg[0], 128, tg[1]), n * k // 2),
            }
            int4_args = (layer4.qweight, layer4.scales, None, 128, 8.0)
            if m <= gemv.DOT_MAX_TOKENS:  # the op, and each of its two kernels (gemv.takes_dot picks between them)
                kernels["int4 op"] = (lambda: gemv.gemv_int4(x, *int4_args), n * k // 2)
                kernels["int4 one-token kernel"] = (lambda: gemv.one_token_int4(x, *int4_args), n * k // 2)
            if m <= gemv.DOT_MAX_TILE:  # the tensor-core kernel, also where the op does not send calls to it yet
                kernels["int4 tensor-core kernel"] = (lambda: gemv.dot_int4(x, *int4_args), n * k // 2)
            if m <= cuda_int4.MAX_TOKENS:  # the CUDA kernel at each block size, and with a rank-32 correction
                for warps in (4, 8, 16):  # and with 2 or 3 chunks of codes loaded ahead of the one computed
                    for ahead in (1, 2, 3):
                        kernels[f"int4 cuda {warps} warps" + (f" {ahead} ahead" if ahead > 1 else "")] = (
                            lambda warps=warps, ahead=ahead: cuda_int4.int4_mma(x, *int4_args, warps=warps,
                                                                                ahead=ahead), n * k // 2)
                pair = (A32[:, :k].contiguous(), B32[:n].contiguous(), cuda_int4.correction_scratch(32, "cuda"))
                kernels["int4 cuda + rank-32 pair"] = (lambda pair=pair: cuda_int4.int4_mma(
                    x, *int4_args, correction=pair), n * k // 2 + 2 * 32 * (n + k))
            if m <= gemv.MAX_TOKENS:  # the op, and each of its two kernels
                int8_args = gemv.kernel_args_8bit(layer8.qweight, s8, None)
                fp8_args = gemv.kernel_args_8bit(fp8.weight_fp8, s8f, None)
                kernels.update({
                    "int8 triton gemv": (lambda: gemv.gemv_8bit(x, layer8.qweight, s8, None), n * k),
                    "int8 one-token kernel": (lambda: gemv.one_token_8bit(x, *int8_args), n * k),
                    "int8 tensor-core kernel": (lambda: gemv.dot_8bit(x, *int8_args), n * k),
                    "fp8 triton gemv": (lambda: gemv.gemv_8bit(x, fp8.weight_fp8, s8f, None), n * k),
                    "fp8 one-token kernel": (lambda: gemv.one_token_8bit(x, *fp8_args), n * k),
                    "fp8 tensor-core kernel": (lambda: gemv.dot_8bit(x, *fp8_args), n * k),
                    "int8 inductor fused": (lambda: fused(x, layer8.qweight), n * k),
                })
                if m <= cuda_int4.MAX_TOKENS:  # the CUDA 8-bit kernel (the op's at 2-8 tokens)
                    kernels["int8 cuda 8-bit kernel"] = (lambda: cuda_8bit.byte_mma(x, *int8_args), n * k)
                    kernels["fp8 cuda 8-bit kernel"] = (lambda: cuda_8bit.byte_mma(x, *fp8_args), n * k)
            if m <= sparse24.MAX_TOKENS:  # bytes: kept values (or codes) and their positions; the op's choice
                kernels["sparse24 gemv"] = (lambda: sparse24.gemv_24(x, sp24.values, sp24.meta), n * k * 9 // 8)
                kernels["sparse24-int4 gemv"] = (lambda: sparse24.gemv_24_int4(
                    x, sp24i.qweight, sp24i.meta, sp24i.scales, None, 128, 8.0), n * k * 3 // 8)
            if m <= cuda_int4.MAX_TOKENS:  # the CUDA 2:4 kernel at each block size (COMPRESS_CUDA_SPARSE24=0: Triton),
                for warps in (4, 8, 16):  # as the op runs it, and with the other register bound (see sparse24_mma)
                    for other, capped, uncapped in (("", None, None), (" other bound", 32 // warps, 1)):
                        kernels[f"sparse24 cuda {warps} warps{other}"] = (
                            lambda warps=warps, blocks=capped: sparse24.sparse24_mma(
                                x, sp24.values, sp24.meta, warps=warps, min_blocks=blocks), n * k * 9 // 8)
                        kernels[f"sparse24-int4 cuda {warps} warps{other}"] = (
                            lambda warps=warps, blocks=uncapped: sparse24.sparse24_mma(
                                x, sp24i.qweight, sp24i.meta, sp24i.scales, None, 128, 8.0, warps, blocks),
                            n * k * 3 // 8)
                    kernels[f"sparse24 cuda {warps} warps mma.sp"] = (
                        lambda warps=warps: sparse24.sparse24_mma(x, sp24.values, sp24.meta, warps=warps,
                                                                  sparse_mma=True), n * k * 9 // 8)
                    kernels[f"sparse24-int4 cuda {warps} warps spread"] = (  # codes default to mma.sp
                        lambda warps=warps: sparse24.sparse24_mma(x, sp24i.qweight, sp24i.meta, sp24i.scales, None,
                                                                  128, 8.0, warps, sparse_mma=False), n * k * 3 // 8)
                    for ahead in (2, 3):  # more of the (smaller) chunks of codes and positions in flight
                        kernels[f"sparse24-int4 cuda {warps} warps {ahead} ahead"] = (
                            lambda warps=warps, ahead=ahead: sparse24.sparse24_mma(
                                x, sp24i.qweight, sp24i.meta, sp24i.scales, None, 128, 8.0, warps, ahead=ahead),
                            n * k * 3 // 8)
            # prefill sizes: cuSPARSELt's 2:4 matmul timed as graph replays (2026-12-06's one-off script timed eager
            # calls: about 1.0 ms at 512 and 4096 tokens alike, as if a fixed cost, such as PyTorch setting up
            # cuSPARSELt's plan at every call, hid the matmul)
            if m >= 16 and torch.backends.cusparselt.is_available():
                packed = torch._cslt_compress((w * keep).to(torch.bfloat16))
                try:
                    alg = torch._cslt_sparse_mm_search(packed, x.t())
                except RuntimeError:
                    alg = 0
                kernels["sparse24 cusparselt"] = (lambda packed=packed, alg=alg: torch._cslt_sparse_mm(
                    packed, x.t(), alg_id=alg, transpose_result=True), n * k * 9 // 8)
            kernels["sparse24 decompress+cublas"] = (
                lambda: F.linear(x, sparse24.decompress_24(sp24.values, sp24.meta, k)), n * k * 9 // 8)
            kernels["int4 dequant+cublas"] = (lambda: F.linear(x, layer4.dequantized_weight(torch.bfloat16)),
                                              n * k // 2)
            xq = x.to(torch.float8_e4m3fn)
            xs = torch.ones(m, 1, device="cuda")
            kernels["fp8 scaled_mm"] = (lambda: torch._scaled_mm(xq, fp8.weight_fp8.t(), scale_a=xs,
                                                                  scale_b=s8f.view(1, -1), out_dtype=torch.bfloat16),
                                        n * k)
            for label, (fn, nbytes) in kernels.items():
                if only and not any(word in label for word in only):
                    continue
                try:
                    us = bench(fn) * 1e3
                except Exception as exc:  # report and go on: one failing kernel must not hide the others
                    print(f"{name:<8} {m:>5} {label:<24} failed: {type(exc).__name__}: {str(exc)[:120]}")
                    continue
                gbs = nbytes / (us / 1e6) / 1e9
                print(f"{name:<8} {m:>5} {label:<24} {us:9.1f} {gbs:7.0f} {gbs * 1e9 / bw:7.0%}", flush=True)
        del w, layer4, layer8, fp8, sp24, sp24i
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
