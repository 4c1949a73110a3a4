"""The decode kernels (compress.kernels.gemv) against dequantize-then-matmul, on the CPU through Triton's
interpreter (TRITON_INTERPRET=1, in a subprocess: the switch is read when the kernels are defined). Shapes
are chosen so that every mask is exercised: rows not a multiple of the row block, widths not a multiple of
the tile, group counts not a multiple of the groups a tile holds. Each case runs under a small and a large
tile configuration (the autotuner's benchmark needs a GPU). Their speed and the compiled path are checked on
the GPU (test_kernels_gpu.py, compress.eval.kernel_bench)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import torch, triton
from compress.formats import IntLinear
from compress.kernels import gemv
from compress.plugins.fp8.format import Fp8Linear
from compress.quant import IntScheme

def run(kernel, config, fn):
    kernel.configs, kernel.cache = [triton.Config(config)], {}
    return fn()

def rel(y, ref):
    return float((y.float() - ref).norm() / ref.norm())

worst = 0.0
gen = torch.Generator().manual_seed(0)
for out_f, in_f, bits, sym, group in [(40, 256, 4, True, 128), (24, 384, 4, False, 64), (8, 1024, 4, True, 512),
                                      (12, 96, 4, False, 32), (20, 256, 3, True, 128), (40, 256, 3, False, 64)]:
    layer = IntLinear.from_weight(torch.randn(out_f, in_f, generator=gen), None, IntScheme(bits, sym, "group", group),
                                  torch.bfloat16)
    ref_w = layer.dequantized_weight(torch.float32)
    for tokens in (1, 3):
        x = torch.randn(tokens, in_f, generator=gen).bfloat16()
        ref = x.float() @ ref_w.t()
        for config in ({"BLOCK_N": 2, "BLOCK_K": 128}, {"BLOCK_N": 16, "BLOCK_K": 512}):
            y = run(gemv._gemv_int4_kernel, config, lambda: gemv.gemv_int4(
                x, layer.qweight, layer.scales, layer.zeros, group, float(layer.int_scheme.sym_zero)))
            assert y.shape == (tokens, out_f) and y.dtype == torch.bfloat16
            worst = max(worst, rel(y, ref))
for out_f, in_f, kind in [(40, 256, "int8"), (24, 1000, "uint8"), (9, 300, "fp8"), (33, 512, "fp8-tensor")]:
    w = torch.randn(out_f, in_f, generator=gen)
    if kind.startswith("fp8"):
        layer = Fp8Linear.from_weight(w, None, kind == "fp8", "none", torch.bfloat16)
        codes, scales, zeros = layer.weight_fp8, layer.weight_scale.view(-1).expand(out_f).contiguous(), None
    else:
        layer = IntLinear.from_weight(w, None, IntScheme(8, kind == "int8", "channel", None), torch.bfloat16)
        codes, scales, zeros = layer.qweight, layer.scales, layer.zeros
    ref_w = layer.dequantized_weight(torch.float32)
    for tokens in (1, 5):
        x = torch.randn(tokens, in_f, generator=gen).bfloat16()
        ref = x.float() @ ref_w.t()
        for config in ({"BLOCK_N": 2, "BLOCK_K": 256}, {"BLOCK_N": 16, "BLOCK_K": 1024}):
            y = run(gemv._gemv_8bit_kernel, config, lambda: gemv.gemv_8bit(x, codes, scales, zeros))
            assert y.shape == (tokens, out_f) and y.dtype == torch.bfloat16
            worst = max(worst, rel(y, ref))
print("worst", worst)
"""


def test_kernels_match_dequantized_matmul() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    worst = float(done.stdout.split("worst")[-1])
    # bf16 inputs and outputs, fp32 accumulation: the output's bf16 rounding (2**-9 relative) dominates
    assert worst <= 1e-2, worst
