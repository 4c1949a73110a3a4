"""The fused weight-only reduction that compiled decode steps of 8-bit layers take (compress.kernels.reduction),
against dequantize-then-matmul, on CPU. torch.compiler.is_compiling is faked so the eager run takes the path
compilation would; that the compiled graph fuses and is fast is checked on the GPU (test_kernels_gpu.py and
compress.eval.format_bench)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compress.formats.int_linear import IntLinear
from compress.kernels import reduction
from compress.plugins.fp8.format import Fp8Linear, quantize_fp8
from compress.quant import IntScheme


def _layers(out_f: int, in_f: int, bias: bool) -> dict[str, torch.nn.Module]:
    gen = torch.Generator().manual_seed(out_f * 31 + in_f)
    w = torch.randn(out_f, in_f, generator=gen)
    b = torch.randn(out_f, generator=gen) if bias else None
    channel = dict(bits=8, granularity="channel", group_size=None)
    return {
        "int8 absmax": IntLinear.from_weight(w, b, IntScheme(symmetric=True, **channel), torch.bfloat16),
        "int8 zero_point": IntLinear.from_weight(w, b, IntScheme(symmetric=False, **channel), torch.bfloat16),
        "fp8 weight-only": Fp8Linear.from_weight(w, b, True, "none", torch.bfloat16),
        "fp8 w8a8": Fp8Linear.from_weight(w, b, False, "dynamic", torch.bfloat16),
    }


@pytest.mark.parametrize("shape", [(96, 80), (200, 136)])
@pytest.mark.parametrize("tokens", [1, 3, 9])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_path_matches_dequantized_matmul(shape, tokens, bias, monkeypatch) -> None:
    out_f, in_f = shape
    x = torch.randn(1, tokens, in_f, generator=torch.Generator().manual_seed(tokens)).bfloat16()
    for name, layer in _layers(out_f, in_f, bias).items():
        eager = layer(x)
        with monkeypatch.context() as m:
            m.setattr(torch.compiler, "is_compiling", lambda: True)
            assert reduction.fuses(x) == (tokens <= reduction.FUSED_MAX_TOKENS)
            fused = layer(x)
        if name == "fp8 w8a8":  # reference: the layer's own arithmetic on its dequantized operands
            xs = layer._input_scales(x.reshape(-1, in_f))
            xd = (quantize_fp8(x.reshape(-1, in_f), xs).float() * xs).reshape(x.shape)
        else:
            xd = x.float()
        reference = F.linear(xd, layer.dequantized_weight(torch.float32),
                             None if layer.bias is None else layer.bias.float())
        assert fused.shape == eager.shape == (1, tokens, out_f) and fused.dtype == torch.bfloat16
        for y in (fused, eager):
            rel = ((y.float() - reference).norm() / reference.norm()).item()
            assert rel <= 1e-2, (name, rel)
