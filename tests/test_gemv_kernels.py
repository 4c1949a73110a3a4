"""The Triton kernels on the CPU through Triton's interpreter: the decode kernels (compress.kernels.gemv) against
dequantize-then-matmul, and the FP8 activation quantizer against its PyTorch arithmetic. Through the
interpreter (TRITON_INTERPRET=1, in a subprocess: the switch is read when the kernels are defined). Shapes
are chosen so that every mask is exercised: rows not a multiple of the row block, widths not a multiple of
the tile, group counts not a multiple of the groups a tile holds or of the K split. Each case runs under a small
and a large tile configuration (the autotuner's benchmark needs a GPU). Their speed and the compiled path are checked on
the GPU (test_kernels_gpu.py, benchmarks/kernel_bench.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

SCRIPT = r"""
import torch, triton
from compress.formats.fp8 import Fp8Linear
from compress.formats.integer import IntLinear
from compress.kernels import gemv
from compress.quant import IntScheme

def run(kernel, config, fn):
    kernel.configs, kernel.cache = [triton.Config(config)], {}
    return fn()

def rel(y, ref):
    return float((y.float() - ref).norm() / ref.norm())

DOT_TILES = ({"BLOCK_N": 64, "SPLIT_K": 1}, {"BLOCK_N": 128, "SPLIT_K": 3})  # both tensor-core kernels' tiles
# the 4-bit one's, with each way of reading the activations
DOT_INT4_TILES = tuple({**tile, "X_ROWS": rows} for tile, rows in zip(DOT_TILES, (0, 1)))

worst = 0.0
gen = torch.Generator().manual_seed(0)
for out_f, in_f, bits, sym, group in [(40, 256, 4, True, 128), (24, 384, 4, False, 64), (8, 1024, 4, True, 512),
                                      (12, 96, 4, False, 32), (20, 256, 3, True, 128), (40, 256, 3, False, 64)]:
    layer = IntLinear.from_weight(torch.randn(out_f, in_f, generator=gen), None, IntScheme(bits, sym, "group", group),
                                  torch.bfloat16)
    ref_w = layer.dequantized_weight(torch.float32)
    # each kernel called directly (which one the op picks is tested on its own: test_tensor_core_kernel_takes)
    kernels = [(gemv.one_token_int4, gemv._gemv_int4_kernel, ({"BLOCK_N": 2, "BLOCK_K": 128}, {"BLOCK_N": 16, "BLOCK_K": 512}),
                # x read as words of two bfloat16 or float16, or float32 in two loads
                (torch.bfloat16, torch.float16, torch.float32)),
               # in float16 only: the interpreter's tl.dot multiplies bfloat16's bits as integers
               (gemv.dot_int4, gemv._dot_int4_kernel, DOT_INT4_TILES,
                (torch.float16,))]
    for tokens in (1, 2, 7):
        for path, kernel, configs, dtypes in kernels:
            for dtype in dtypes:
                x = torch.randn(tokens, in_f, generator=gen).to(dtype)
                ref = x.float() @ ref_w.t()
                for config in configs:
                    y = run(kernel, config, lambda: path(
                        x, layer.qweight, layer.scales, layer.zeros, group, float(layer.int_scheme.sym_zero)))
                    assert y.shape == (tokens, out_f) and y.dtype == dtype
                    worst = max(worst, rel(y, ref))
    for tokens in (40, 100):  # batched decode: the tensor-core tile grows to 64 and 128 tokens
        x = torch.randn(tokens, in_f, generator=gen).half()
        ref = x.float() @ ref_w.t()
        for config in (*DOT_INT4_TILES, {**DOT_INT4_TILES[0], "X_ROWS": 1}):
            y = run(gemv._dot_int4_kernel, config, lambda: gemv.dot_int4(
                x, layer.qweight, layer.scales, layer.zeros, group, float(layer.int_scheme.sym_zero)))
            assert y.shape == (tokens, out_f) and y.dtype == torch.float16
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
    args = gemv.kernel_args_8bit(codes, scales, zeros)
    kernels = [(gemv.one_token_8bit, gemv._gemv_8bit_kernel, ({"BLOCK_N": 2, "BLOCK_K": 256}, {"BLOCK_N": 16, "BLOCK_K": 1024}),
                torch.bfloat16),
               (gemv.dot_8bit, gemv._dot_8bit_kernel, DOT_TILES,
                torch.float16)]
    for tokens in (1, 5, 40):
        for path, kernel, configs, dtype in kernels[1:] if tokens > 8 else kernels:
            x = torch.randn(tokens, in_f, generator=gen).to(dtype)
            ref = x.float() @ ref_w.t()
            for config in configs:
                y = run(kernel, config, lambda: path(x, *args))
                assert y.shape == (tokens, out_f) and y.dtype == dtype
                worst = max(worst, rel(y, ref))
print("worst", worst)
"""


FP8_SCRIPT = r"""
import torch
from compress.formats.fp8 import quantize_fp8, token_scales
from compress.kernels import fp8_activations as activations

# Inputs that are E4M3 values times a power of two, with each row's max |x| at 448 times it: the scaling is
# exact and the codes need no rounding (the interpreter rounds E4M3 wrongly where rounding carries into the
# exponent; the rounding is checked on the GPU, tests/test_kernels_gpu.py).
gen = torch.Generator().manual_seed(0)
for rows, width in [(1, 4096), (4, 1000), (3, 14336)]:
    byte = torch.randint(0, 256, (rows, width), generator=gen, dtype=torch.uint8)
    byte[(byte & 0x7F) == 0x7F] = 0  # no NaN codes
    byte[:, width // 3] = 0x7E  # 448
    exps = torch.tensor([-4, 0, 3, -2])[:rows].view(-1, 1)
    x = (byte.view(torch.float8_e4m3fn).float() * torch.pow(2.0, exps)).bfloat16()
    for static in (None, torch.tensor([0.0625])):
        codes, scales = activations.quantize_rows(x, static)
        want_scales = token_scales(x) if static is None else static.view(1, 1).expand(rows, 1)
        want = quantize_fp8(x, want_scales)
        assert codes.dtype == torch.float8_e4m3fn and scales.shape == (rows, 1), (codes.dtype, scales.shape)
        assert torch.equal(scales, want_scales), (scales, want_scales)
        assert torch.equal(codes.view(torch.uint8), want.view(torch.uint8)), (rows, width, static)
print("equal")
"""


SPARSE24_SCRIPT = r"""
import torch, triton
from compress.formats.integer import IntLinear
from compress.formats.sparse import Sparse24IntLinear, Sparse24Linear
from compress.kernels import sparse24
from compress.quant import IntScheme
from compress.sparsity import nm_mask

def run(kernel, config, fn):
    kernel.configs, kernel.cache = [triton.Config(config)], {}
    return fn()

TILES = ({"BLOCK_N": 1, "BLOCK_W": 4}, {"BLOCK_N": 4, "BLOCK_W": 8})
calls = 0

def counted(op):
    def call(*args):
        global calls
        calls += 1
        return op(*args)
    return call

sparse24.gemv_24, sparse24.gemv_24_int4 = counted(sparse24.gemv_24), counted(sparse24.gemv_24_int4)
gen = torch.Generator().manual_seed(0)
worst = 0.0
# widths: whole tiles (no masks), words of four position bytes, single bytes with a last one holding one run
# (K % 8 == 4), a tile not filled; rows not a multiple of BLOCK_N
for out_f, in_f, bits, sym, gran, group in [(8, 512, 4, False, "group", 128), (12, 256, 4, True, "group", 64),
                                            (7, 200, 4, False, "group", 64),
                                            (5, 132, 3, False, "group", 32), (9, 72, 4, True, "channel", None)]:
    w = torch.randn(out_f, in_f, generator=gen)
    keep = nm_mask(w.abs(), 2, 4)
    layers = [(Sparse24Linear.from_dense(w, keep, torch.randn(out_f, generator=gen)).to(torch.bfloat16),
               sparse24._gemv_24_kernel),
              (Sparse24IntLinear.from_int(IntLinear.from_weight(w * keep, None, IntScheme(bits, sym, gran, group),
                                                                torch.bfloat16), keep), sparse24._gemv_24_int4_kernel)]
    for layer, kernel in layers:
        ref_w = layer.dequantized_weight(torch.float32)
        for shape in ((1, in_f), (2, 3, in_f)):  # a decode step; a few tokens in a batch
            x = torch.randn(*shape, generator=gen).bfloat16()
            ref = x.float() @ ref_w.t() + (0 if layer.bias is None else layer.bias.float())
            for tile in TILES:
                y = run(kernel, tile, lambda: layer(x))  # the format's forward takes the kernel
                assert y.shape == (*shape[:-1], out_f) and y.dtype == torch.bfloat16
                worst = max(worst, float((y.float() - ref).norm() / ref.norm()))
    dense, codes = layers[0][0], layers[1][0]
    assert torch.equal(sparse24.decompress_24(dense.values, dense.meta, in_f), dense.dequantized_weight())
    ref_w = codes.dequantized_weight(torch.float32)
    group = in_f if gran == "channel" else group
    w = sparse24.decompress_24_int4(codes.qweight, codes.meta, codes.scales, codes.zeros, group,
                                    float(codes.int_scheme.sym_zero), in_f)
    # within a bfloat16 step of the float32 weight (the interpreter rounds toward zero)
    assert w.dtype == torch.bfloat16 and ((w.float() - ref_w).abs() <= ref_w.abs() * 2**-7).all()
    assert torch.equal(w == 0, ref_w == 0)  # pruned entries exactly zero
print("calls", calls, "worst", worst)
"""


def _interpret(script: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_kernels_match_dequantized_matmul() -> None:
    worst = float(_interpret(SCRIPT).split("worst")[-1])
    # bf16 inputs and outputs, fp32 accumulation: the output's bf16 rounding (2**-9 relative) dominates
    assert worst <= 1e-2, worst


def test_sparse24_kernels_match_dense_matmul() -> None:
    """Both 2:4 decode kernels, reached through the formats' forward, against the product of the dense weight they
    store (bf16 values and 3-/4-bit codes, group and channel scales, ragged tiles)."""
    out = _interpret(SPARSE24_SCRIPT).split()
    calls, worst = int(out[out.index("calls") + 1]), float(out[-1])
    assert calls == 40  # every forward took a kernel
    assert worst <= 1e-2, worst  # fp32 accumulation; the bf16 output's rounding (2**-9 relative) dominates


def test_tensor_core_candidates_follow_the_tile_of_tokens() -> None:
    """Tiles of 16 tokens keep the candidates tuned for them (four warps, the activations in two strided loads);
    tiles of 32 and more tokens try eight warps and the 4-bit kernel's contiguous activation rows, through the
    autotuner's own pruning hook."""
    from compress.kernels import gemv

    for kernel in (gemv._dot_int4_kernel, gemv._dot_8bit_kernel):
        kernel.nargs = {}
        few, many = kernel.prune_configs({"BLOCK_M": 16}), kernel.prune_configs({"BLOCK_M": 64})
        assert few == gemv.dot_configs_for(kernel, 16) and many == gemv.dot_configs_for(kernel, 128)
        assert {c.num_warps for c in few} == {4} and {c.num_warps for c in many} == {4, 8}
        assert not any(c.kwargs.get("X_ROWS") for c in few)
        assert any(c.kwargs.get("X_ROWS") for c in many) == (kernel is gemv._dot_int4_kernel)
        assert len(kernel.configs) == len(few) + len(many)


def test_tensor_core_kernel_takes() -> None:
    """The ops' choice of kernel: the tensor-core kernel from DOT_MIN_TOKENS tokens (DOT_MIN_TOKENS_8BIT for the
    8-bit op; SMALL_DOT_MIN_TOKENS on small layers) to DOT_MAX_TOKENS, and only for 16-bit activations."""
    from compress.kernels import gemv

    big, small = gemv.SMALL_LAYER, gemv.SMALL_LAYER - 1
    assert not gemv.takes_dot(1, big, torch.bfloat16)
    assert gemv.takes_dot(gemv.DOT_MIN_TOKENS, big, torch.bfloat16)
    assert gemv.takes_dot(gemv.DOT_MAX_TOKENS, big, torch.float16)
    assert not gemv.takes_dot(gemv.DOT_MAX_TOKENS + 1, big, torch.bfloat16)
    assert not gemv.takes_dot(gemv.SMALL_DOT_MIN_TOKENS - 1, small, torch.bfloat16)
    assert gemv.takes_dot(gemv.SMALL_DOT_MIN_TOKENS, small, torch.bfloat16)
    assert not gemv.takes_dot(4, big, torch.float32)
    assert not gemv.takes_dot(gemv.DOT_MIN_TOKENS_8BIT - 1, big, torch.bfloat16, gemv.DOT_MIN_TOKENS_8BIT)
    assert gemv.takes_dot(gemv.DOT_MIN_TOKENS_8BIT, big, torch.bfloat16, gemv.DOT_MIN_TOKENS_8BIT)


def test_fp8_activation_kernel_matches_pytorch() -> None:
    # the same codes and scales bit for bit, dynamic and static (which saturates the larger rows)
    assert _interpret(FP8_SCRIPT).strip().endswith("equal")
