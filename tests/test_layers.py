"""Compressed layers' forward on the CPU (the path CPUs, older GPUs and prefill take) against x times their
dequantized weight, for every storage variant. The CUDA decode kernels are checked in test_gemv_kernels.py
(CPU interpreter) and test_kernels_gpu.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compress.formats.fp8 import Fp8Linear, quantize_fp8, token_scales
from compress.formats.integer import IntLinear
from compress.quant import IntScheme


def _layers(out_f: int, in_f: int, bias: bool) -> dict[str, torch.nn.Module]:
    gen = torch.Generator().manual_seed(out_f * 31 + in_f)
    w = torch.randn(out_f, in_f, generator=gen)
    b = torch.randn(out_f, generator=gen) if bias else None
    channel = dict(bits=8, granularity="channel", group_size=None)
    return {
        "int8 absmax": IntLinear.from_weight(w, b, IntScheme(symmetric=True, **channel), torch.bfloat16),
        "int8 zero_point": IntLinear.from_weight(w, b, IntScheme(symmetric=False, **channel), torch.bfloat16),
        "int4 g16 asymmetric": IntLinear.from_weight(w, b, IntScheme(4, False, "group", 16), torch.bfloat16),
        "int3 g16": IntLinear.from_weight(w, b, IntScheme(3, True, "group", 16), torch.bfloat16),
        "int2 per channel": IntLinear.from_weight(w, b, IntScheme(2, False, "channel", None), torch.bfloat16),
        "fp8 weight-only": Fp8Linear.from_weight(w, b, True, "none", torch.bfloat16),
        "fp8 w8a8": Fp8Linear.from_weight(w, b, False, "dynamic", torch.bfloat16),
    }


@pytest.mark.parametrize("shape", [(96, 80), (200, 136)])
@pytest.mark.parametrize("tokens", [1, 9])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_matches_dequantized_matmul(shape, tokens, bias) -> None:
    out_f, in_f = shape
    x = torch.randn(1, tokens, in_f, generator=torch.Generator().manual_seed(tokens)).bfloat16()
    for name, layer in _layers(out_f, in_f, bias).items():
        y = layer(x)
        if name == "fp8 w8a8":  # reference: the layer's own arithmetic on its dequantized operands
            xs = token_scales(x.reshape(-1, in_f))
            xd = (quantize_fp8(x.reshape(-1, in_f), xs).float() * xs).reshape(x.shape)
        else:
            xd = x.float()
        reference = F.linear(xd, layer.dequantized_weight(torch.float32),
                             None if layer.bias is None else layer.bias.float())
        assert y.shape == (1, tokens, out_f) and y.dtype == torch.bfloat16
        rel = ((y.float() - reference).norm() / reference.norm()).item()
        assert rel <= 1e-2, (name, rel)


def test_fp8_layer_keeps_its_storage_through_dtype_casts() -> None:
    # model.to(torch.bfloat16) or .half() must not turn the E4M3 weights into 16-bit copies or round the
    # float32 scales; the bias follows the model's dtype
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(3))
    layer = Fp8Linear.from_weight(w, torch.randn(24), True, "static", torch.float32, input_scale=torch.tensor([0.03]))
    codes, scale, input_scale = layer.weight_fp8.clone(), layer.weight_scale.clone(), layer.input_scale.clone()
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half()):
        cast(layer)
        assert layer.weight_fp8.dtype == torch.float8_e4m3fn
        assert torch.equal(layer.weight_fp8.view(torch.uint8), codes.view(torch.uint8))
        assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, scale)
        assert torch.equal(layer.input_scale, input_scale)
    assert layer.bias.dtype == torch.float16
    assert layer(torch.randn(2, 64).half()).dtype == torch.float16


def test_every_format_exports_its_dense_weights_and_names_the_layouts_it_has() -> None:
    from compress.errors import CheckpointError

    for name, layer in _layers(48, 64, True).items():
        tensors = layer.export("dense")
        assert torch.equal(tensors["weight"], layer.dequantized_weight()), name
        assert torch.equal(tensors["bias"], layer.bias), name
        with pytest.raises(CheckpointError, match=rf"format '{layer.format}' cannot be exported as 'vllm-marlin'; it "
                                                  r"exports: dense"):
            layer.export("vllm-marlin")


def test_learning_scales_bypass_the_kernels_which_have_no_backward(monkeypatch) -> None:
    from compress import quant
    from compress.kernels import dequant, gemv

    def kernel(*args, **kwargs):
        raise RuntimeError("kernel")

    monkeypatch.setattr(dequant, "available", lambda t: True)
    monkeypatch.setattr(dequant, "dequantize", kernel)
    monkeypatch.setattr(gemv, "available", lambda x, four_bit=False: True)
    monkeypatch.setattr(gemv, "gemv_int4", kernel)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    layer = IntLinear.from_weight(w, None, IntScheme(4, True, "group", 32), torch.float32)
    x = torch.randn(1, 1, 128, generator=torch.Generator().manual_seed(1))  # a decode step: the gemv kernel's shape
    with torch.no_grad(), pytest.raises(RuntimeError, match="kernel"):
        layer(x)  # inference takes the kernel
    scales = layer._buffers.pop("scales")
    layer.scales = torch.nn.Parameter(scales.clone())  # as a training stage makes the scales it tunes
    with pytest.raises(RuntimeError, match="kernel"), torch.no_grad():
        layer(x)  # still the kernel where no gradient is wanted
    layer(x).square().sum().backward()
    reference = scales.clone().requires_grad_()
    weight = quant.dequantize_weight(layer.codes(), reference, layer.zero_points(), layer.int_scheme, torch.float32)
    F.linear(x, weight).square().sum().backward()
    assert reference.grad.abs().sum() > 0
    torch.testing.assert_close(layer.scales.grad, reference.grad)
