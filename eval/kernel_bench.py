"""Micro-benchmark of the linear-layer kernels on Llama-3-8B shapes (GPU): time per call and achieved
bandwidth (weight bytes read per call / time) against a device-to-device copy measured in the same run.

    python -m compress.eval.kernel_bench
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton.testing

from compress.formats import IntLinear
from compress.quant import IntScheme

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}


def copy_bandwidth() -> float:
    src = torch.randn(2**28, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * 4 / (ms / 1e3)


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def main() -> None:
    from compress.kernels import gemv, int4
    from compress.plugins.fp8.format import Fp8Linear

    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"{'shape':<8} {'M':>5} {'kernel':<22} {'us':>9} {'GB/s':>7} {'of copy':>7}")
    torch._dynamo.config.recompile_limit = 64
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        layer4 = IntLinear.from_weight(w, None, IntScheme(4, True, "group", 128), torch.bfloat16)
        layer8 = IntLinear.from_weight(w, None, IntScheme(8, True, "channel", None, restricted=True), torch.bfloat16)
        fp8 = Fp8Linear.from_weight(w, None, True, "dynamic", torch.bfloat16)
        fp8wo = Fp8Linear.from_weight(w, None, True, "none", torch.bfloat16)
        int8_compiled = torch.compile(layer8._int8_channel_linear)
        fp8wo_compiled = torch.compile(fp8wo.forward)
        tg = int4.pack(layer4.codes(), layer4.scales, layer4.zero_points()) if layer4._int4_weight is None else (
            layer4._int4_weight, layer4._int4_scales_zeros)
        for m in (1, 4096):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            kernels = {
                "bf16 cublas": (lambda: F.linear(x, w), 2 * n * k),
                "int4 tinygemm": (lambda: int4.matmul(x, tg[0], tg[1], 128), n * k // 2),
                "int8 compiled": (lambda: int8_compiled(x), n * k),
                "fp8 scaled_mm": (lambda: fp8(x), n * k),
                "fp8 w-only compiled": (lambda: fp8wo_compiled(x), n * k),
            }
            if m <= gemv.MAX_TOKENS:
                kernels["int4 triton gemv"] = (lambda: gemv.int4_gemv(x, layer4.qweight, layer4.scales, None, 128, 8.0),
                                               n * k // 2)
                x8 = torch.randn(8, k, device="cuda", dtype=torch.bfloat16)
                kernels["int4 gemv M=8"] = (lambda: gemv.int4_gemv(x8, layer4.qweight, layer4.scales, None, 128, 8.0),
                                            n * k // 2)
                kernels["int4 tinygemm M=8"] = (lambda: int4.matmul(x8, tg[0], tg[1], 128), n * k // 2)
            else:
                kernels["int4 dequant+cublas"] = (lambda: F.linear(x, layer4.dequantized_weight(torch.bfloat16)),
                                                  n * k // 2)
                kernels["int4 dequant alone"] = (lambda: layer4.dequantized_weight(torch.bfloat16), n * k // 2)
            for label, (fn, nbytes) in kernels.items():
                try:
                    us = bench(fn) * 1e3
                except Exception as exc:  # report and go on: one failing kernel must not hide the others
                    print(f"{name:<8} {m:>5} {label:<22} failed: {type(exc).__name__}: {str(exc)[:120]}")
                    continue
                gbs = nbytes / (us / 1e6) / 1e9
                print(f"{name:<8} {m:>5} {label:<22} {us:9.1f} {gbs:7.0f} {gbs * 1e9 / bw:7.0%}", flush=True)
        del w, layer4, layer8, fp8, fp8wo
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
