"""Fast paths on the GPU compute what the stored format means (GPU only: pytest -m gpu)."""

from __future__ import annotations

import pytest
import torch

import compress
from compress import quant
from compress.formats.integer import IntLinear
from compress.quant import IntScheme
from conftest import make_tiny, use_tiles

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPES = [(4096, 4096), (1000, 384), (256, 8192), (96, 200), (4104, 4096)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("out_f, in_f", SHAPES)
@pytest.mark.parametrize("bits, symmetric, group", [(4, True, 128), (4, False, 64), (3, True, 128), (2, False, 32),
                                                    (8, True, None), (8, False, None), (8, True, 128)])
@pytest.mark.parametrize("bias", [False, True])
def test_int_layer_matches_dequantized_reference(out_f, in_f, bits, symmetric, group, bias) -> None:
    # where group does not divide in_f (200, 1000 / 128), the last group is ragged: the codes are stored padded to
    # whole groups and the decode kernels take the activations padded with zeros
    g = torch.Generator(device="cuda").manual_seed(out_f * 7 + in_f)
    w = torch.randn(out_f, in_f, device="cuda", generator=g) * 0.02
    b = torch.randn(out_f, device="cuda", generator=g, dtype=torch.bfloat16) if bias else None
    scheme = IntScheme(bits, symmetric, "group" if group else "channel", group)
    layer = IntLinear.from_weight(w, b, scheme, torch.bfloat16)
    reference = layer.dequantized_weight(torch.float32)
    torch.testing.assert_close(reference, quant.dequantize_weight(layer.codes(), layer.scales, layer.zero_points(),
                                                                  scheme, torch.float32))  # the Triton dequantizer
    # 8-bit: up to gemv.MAX_TOKENS the decode kernel; 4-bit: 1-2 the one-token kernel, 3 to 16 the tensor-core
    # kernel; more: dequantize + matmul
    for tokens in (1, 7, 8, 9, 16, 17, 64, 333):
        x = torch.randn(tokens, in_f, device="cuda", generator=g, dtype=torch.bfloat16)
        y = layer(x)
        assert torch.isfinite(y).all()
        expect = x.float() @ reference.t() + (0 if b is None else b.float())
        assert rel(y, expect) <= 1e-2, (tokens, rel(y, expect))


class _Spy:
    """Counts the calls of the decode kernels (IntLinear and Fp8Linear look them up at call time)."""

    def __init__(self, monkeypatch):
        from compress.kernels import gemv

        self.calls = {"gemv_int4": 0, "gemv_8bit": 0, "gemv_int4_corrected": 0}
        for name in self.calls:
            real = getattr(gemv, name)
            monkeypatch.setattr(gemv, name, self._wrap(name, real))

    def _wrap(self, name, real):
        def call(*args):
            self.calls[name] += 1
            return real(*args)
        return call


@pytest.mark.parametrize("scheme, kernel", [(IntScheme(4, True, "group", 128), "gemv_int4"),
                                            (IntScheme(3, False, "group", 64), "gemv_int4"),
                                            (IntScheme(8, True, "channel", None), "gemv_8bit"),
                                            (IntScheme(8, False, "channel", None), "gemv_8bit"),
                                            (IntScheme(4, True, "group", 40), None),
                                            (IntScheme(2, True, "group", 128), None)])
def test_decode_kernel_is_taken_where_it_applies(scheme, kernel, monkeypatch) -> None:
    spy = _Spy(monkeypatch)
    in_f = 640 if scheme.group_size == 40 else 1024
    layer = IntLinear.from_weight(torch.randn(256, in_f, device="cuda"), None, scheme, torch.bfloat16)
    layer(torch.randn(1, 1, in_f, device="cuda", dtype=torch.bfloat16))
    assert spy.calls == {k: int(k == kernel) for k in spy.calls}
    layer(torch.randn(1, 12, in_f, device="cuda", dtype=torch.bfloat16))  # 4-bit: the tensor-core kernel
    assert sum(spy.calls.values()) == int(kernel is not None) + int(kernel == "gemv_int4")
    layer(torch.randn(1, 64, in_f, device="cuda", dtype=torch.bfloat16))  # prefill: dequantize + matmul
    assert sum(spy.calls.values()) == int(kernel is not None) + int(kernel == "gemv_int4")


@pytest.mark.parametrize("method, args", [("rtn", {"bits": 4, "group_size": 64}),
                                          ("rtn", {"bits": 4, "group_size": 128}), ("int8", {}),
                                          ("fp8", {"activations": "dynamic"}), ("fp8", {"activations": "none"})])
# the decode kernels (compress.kernels.gemv): 1 the one-token kernels, 5 the tensor-core kernels (on these small
# layers, takes_dot); 16: the 4-bit tensor-core kernel still, dequantize + matmul for 8 bits. 4 bits in groups of
# 128: the CUDA kernel (compress.kernels.cuda_int4) at 1 and 5 tokens
@pytest.mark.parametrize("tokens", [1, 5, 16])
def test_compiled_decode_has_no_graph_breaks(method, args, tokens) -> None:
    torch._dynamo.reset()  # each case compiles new modules: earlier cases' recompiles must not hit dynamo's limit
    model = make_tiny("llama", dtype=torch.bfloat16).cuda()
    compress.apply(model, [{"method": method, "args": args}], device="cuda")
    ids = torch.randint(0, 512, (1, tokens), device="cuda")
    with torch.no_grad():
        eager = model(ids).logits
    compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")  # fullgraph: a break raises
    with torch.no_grad():  # inference, as generate runs it (the decode kernels have no backward)
        for _ in range(3):  # warm-up and CUDA-graph replays
            out = compiled(ids).logits
    # fp8 activations are quantized per token: a compiled amax/divide may round a few codes differently
    assert rel(out, eager) < (5e-2 if method == "fp8" else 2e-2)


@pytest.mark.parametrize("method, args, kernel", [("rtn", {"bits": 4, "group_size": 64}, "gemv_int4"),
                                                  ("rtn", {"bits": 4, "group_size": 128}, "gemv_int4"),
                                                  ("fp8", {"activations": "dynamic"}, "gemv_8bit")])
def test_fused_projections_decode_compiled_with_fewer_kernels(method, args, kernel, monkeypatch) -> None:
    """compress.fuse_projections on the GPU: a compiled decode step (CUDA graphs, no graph break) computes what
    the unfused model does, calling the decode kernel once for q/k/v and once for gate/up."""
    torch._dynamo.reset()
    model = make_tiny("llama", dtype=torch.bfloat16).cuda()
    compress.apply(model, [{"method": method, "args": args}], device="cuda")
    ids = torch.randint(0, 512, (1, 1), device="cuda")
    spy = _Spy(monkeypatch)
    with torch.no_grad():
        eager = model(ids).logits
        separate = spy.calls[kernel]
        assert compress.fuse_projections(model) == 2 * model.config.num_hidden_layers
        spy.calls[kernel] = 0
        model(ids)
        assert spy.calls[kernel] == separate - 3 * model.config.num_hidden_layers  # q/k/v: 3 -> 1, gate/up: 2 -> 1
        compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")  # fullgraph: a break raises
        for _ in range(3):  # warm-up and CUDA-graph replays
            out = compiled(ids).logits
    assert rel(out, eager) < (5e-2 if method == "fp8" else 2e-2)


@pytest.mark.parametrize("tokens", [1, 5, 64])
@pytest.mark.parametrize("weights", ["channel", "tensor"])
def test_fp8_scaled_mm_matches_emulation(tokens, weights, monkeypatch) -> None:
    from compress.formats.fp8 import Fp8Linear
    from compress.kernels import fp8_activations as activations
    from compress.kernels import gemv

    calls = []
    real = activations.quantize_rows
    monkeypatch.setattr(activations, "quantize_rows", lambda *a: calls.append(1) or real(*a))

    g = torch.Generator(device="cuda").manual_seed(tokens)
    layer = Fp8Linear.from_weight(torch.randn(512, 1024, device="cuda", generator=g), None, weights == "channel",
                                  "dynamic", torch.bfloat16)
    x = torch.randn(tokens, 1024, device="cuda", generator=g, dtype=torch.bfloat16)
    fast = layer(x)
    emulated = layer.cpu()(x.cpu())
    assert rel(fast.cpu(), emulated) < 1e-2
    assert len(calls) == (tokens > gemv.MAX_TOKENS)  # prefill quantizes its activations in one kernel pass


@pytest.mark.parametrize("rows, width", [(1, 4096), (4096, 4096), (37, 14336), (5, 1000)])
@pytest.mark.parametrize("static", [False, True])
def test_fp8_activation_kernel_matches_pytorch_bit_for_bit(rows, width, static) -> None:
    from compress.formats.fp8 import quantize_fp8, token_scales
    from compress.kernels import fp8_activations as activations

    g = torch.Generator(device="cuda").manual_seed(rows + width)
    x = (torch.randn(rows, width, device="cuda", generator=g) * 3).bfloat16()
    scale = torch.tensor([0.004], device="cuda") if static else None
    codes, scales = activations.quantize_rows(x, scale)
    want_scales = scale.view(1, 1).expand(rows, 1) if static else token_scales(x)
    assert torch.equal(scales, want_scales)
    assert torch.equal(codes.view(torch.uint8), quantize_fp8(x, want_scales).view(torch.uint8))


def test_checkpoints_move_between_cpu_and_gpu(tmp_path, monkeypatch) -> None:
    spy = _Spy(monkeypatch)
    cpu_model = make_tiny("qwen2", dtype=torch.bfloat16)
    compress.apply(cpu_model, [{"method": "rtn", "args": {"bits": 4, "group_size": 64}}], device="cpu")
    compress.save(cpu_model, tmp_path / "from-cpu")
    on_gpu = compress.load(tmp_path / "from-cpu", device="cuda")
    ids = torch.randint(0, 512, (1, 12))
    assert rel(on_gpu(ids.cuda()).logits.cpu(), cpu_model(ids).logits) < 2e-2
    layers = sum(isinstance(m, IntLinear) for m in on_gpu.modules())
    assert spy.calls["gemv_int4"] == layers  # 12 tokens: the tensor-core kernel, once a layer
    with torch.no_grad():  # a decode step of the loaded model takes the kernel
        on_gpu(ids[:, :1].cuda())
    assert spy.calls["gemv_int4"] == 2 * layers

    gpu_model = make_tiny("qwen2", dtype=torch.bfloat16).cuda()
    compress.apply(gpu_model, [{"method": "rtn", "args": {"bits": 4, "group_size": 64}}], device="cuda")
    compress.save(gpu_model, tmp_path / "from-gpu")
    on_cpu = compress.load(tmp_path / "from-gpu", device="cpu")
    assert rel(on_cpu(ids).logits, gpu_model(ids.cuda()).logits.cpu()) < 2e-2


def _op_cases(w: torch.Tensor, bits: int) -> list:
    """(the decode op called on x, the layer whose dequantized weight it multiplies) for each storage of ``w`` the
    op takes: 4-bit group 64, symmetric and asymmetric; or 8 bits: int8 and uint8 per channel, and FP8."""
    from compress.kernels import gemv
    from compress.formats.fp8 import Fp8Linear

    if bits == 4:
        layers = [IntLinear.from_weight(w, None, IntScheme(4, sym, "group", 64), torch.bfloat16) for sym in (True, False)]
        return [(lambda x, q=q: gemv.gemv_int4(x, q.qweight, q.scales, q.zeros, 64, 8.0), q) for q in layers]
    layers = [IntLinear.from_weight(w, None, IntScheme(8, sym, "channel", None), torch.bfloat16) for sym in (True, False)]
    fp8 = Fp8Linear.from_weight(w, None, True, "none", torch.bfloat16)
    return [(lambda x, q=q: gemv.gemv_8bit(x, q.qweight, q.scales, q.zeros), q) for q in layers] + [
        (lambda x: gemv.gemv_8bit(x, fp8.weight_fp8, fp8.weight_scale.view(-1), None), fp8)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 3, 8])
@pytest.mark.parametrize("out_f, in_f", [(4096, 4096), (1000, 1024), (14336, 4096), (4096, 14336), (333, 4160)])
def test_decode_kernels_match_reference(tokens, out_f, in_f, dtype) -> None:
    g = torch.Generator(device="cuda").manual_seed(tokens + out_f)
    w = torch.randn(out_f, in_f, device="cuda", generator=g) * 0.02
    x = torch.randn(tokens, in_f, device="cuda", generator=g, dtype=dtype)
    for op, layer in _op_cases(w, 4) + _op_cases(w, 8):
        assert rel(op(x), x.float() @ layer.dequantized_weight(torch.float32).t()) <= 1e-2


@pytest.mark.all_tiles
@pytest.mark.parametrize("kernel_name, tokens", [("_gemv_int4_kernel", (1, 2)), ("_dot_int4_kernel", (5, 16, 40)),
                                                 ("_gemv_8bit_kernel", (1, 4)), ("_dot_8bit_kernel", (5, 8))])
def test_every_tile_config_matches_reference(kernel_name, tokens, monkeypatch) -> None:
    """Each autotuning candidate of each kernel, not only the one the autotuner picks on this GPU: a candidate
    that computes wrongly (a miscompiled tile shape) would otherwise pass the tests and be picked elsewhere."""
    from compress.kernels import gemv

    kernel = getattr(gemv, kernel_name)
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(333, 4160, device="cuda", generator=g) * 0.02  # rows and groups off every tile
    cases = _op_cases(w, 8 if "8bit" in kernel_name else 4)
    xs = [torch.randn(t, 4160, device="cuda", generator=g, dtype=torch.bfloat16) for t in tokens]
    expected = [[x.float() @ layer.dequantized_weight(torch.float32).t() for x in xs] for _, layer in cases]
    for i, x in enumerate(xs):
        # the tensor-core kernels' candidates depend on the tile of tokens (16, or 64 for 40 tokens)
        tile = gemv.dot_tile(x.shape[0])
        for config in gemv.dot_configs_for(kernel, tile) if "dot" in kernel_name else list(kernel.configs):
            use_tiles(monkeypatch, kernel, [config])
            for (op, q), wants in zip(cases, expected):
                if x.shape[0] > gemv.DOT_MAX_TOKENS:  # more tokens than the op sends to the kernel: called directly
                    op = lambda x, q=q: gemv.dot_int4(x, q.qweight, q.scales, q.zeros, 64, 8.0)  # noqa: E731
                y = op(x)
                assert torch.isfinite(y).all() and rel(y, wants[i]) <= 1e-2, (str(config), x.shape[0], rel(y, wants[i]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits, symmetric, group", [(4, True, 128), (4, False, 128), (3, False, 256), (4, True, None)])
@pytest.mark.parametrize("out_f, in_f", [(16, 128), (4096, 4096), (6144, 4096), (4096, 14336), (1040, 1152)])
def test_cuda_int4_kernel_matches_reference(out_f, in_f, bits, symmetric, group, dtype) -> None:
    """The CUDA kernel (compress/kernels/int4_mma.cu) at every block size and token count it takes, and with 2 or 3
    chunks of codes loaded ahead (kernel_bench's variants)."""
    from compress.kernels import cuda_int4

    if group and in_f % group:
        pytest.skip("group does not divide in_features")
    g = torch.Generator(device="cuda").manual_seed(out_f + in_f + bits)
    w = torch.randn(out_f, in_f, device="cuda", generator=g) * 0.02
    scheme = IntScheme(bits, symmetric, "group" if group else "channel", group)
    layer = IntLinear.from_weight(w, None, scheme, dtype)
    size = group or in_f
    reference = layer.dequantized_weight(torch.float32)
    for tokens in range(1, cuda_int4.MAX_TOKENS + 1):
        x = torch.randn(tokens, in_f, device="cuda", generator=g, dtype=dtype)
        assert cuda_int4.applies(x, layer.qweight, layer.scales, size)
        want = x.float() @ reference.t()
        for warps, ahead in [(1, 1), (2, 1), (4, 1), (8, 1), (16, 1), (1, 3), (4, 2), (16, 3)]:
            y = cuda_int4.int4_mma(x, layer.qweight, layer.scales, layer.zeros, size, layer.int_scheme.sym_zero, warps,
                                   ahead=ahead)
            assert y.dtype == dtype and torch.isfinite(y).all(), (tokens, warps, ahead)
            assert rel(y, want) <= 1e-2, (tokens, warps, ahead, rel(y, want))


def test_cuda_int4_kernel_is_taken_only_where_it_applies() -> None:
    from compress.kernels import cuda_int4

    def layer(out_f, in_f, group, dtype=torch.bfloat16):
        return IntLinear.from_weight(torch.randn(out_f, in_f, device="cuda"), None, IntScheme(4, True, "group", group),
                                     dtype)

    def takes(q, tokens, dtype=torch.bfloat16, offset=0):
        x = torch.randn(tokens * q.in_features + offset, device="cuda", dtype=dtype)[offset:]
        return cuda_int4.applies(x.view(tokens, q.in_features), q.qweight, q.scales, q.int_scheme.group_size)

    assert takes(layer(256, 512, 128), 1) and takes(layer(256, 512, 128), 8)
    assert not takes(layer(256, 512, 128), 9)  # more tokens than the tile's columns
    assert not takes(layer(256, 512, 64), 1)  # group of 64: the Triton kernels
    assert not takes(layer(264, 512, 128), 1)  # rows not a multiple of 16
    assert takes(layer(256, 640, 128), 1)  # five chunks of 128
    assert not takes(layer(256, 512, 128), 1, offset=1)  # activations off 16-byte alignment
    assert not takes(layer(256, 512, 128, torch.float16), 1)  # fp16 scales, bf16 activations


@pytest.mark.parametrize("out_f, in_f", [(4096, 4096), (1000, 384), (96, 200), (4104, 4096), (4096, 14336)])
@pytest.mark.parametrize("bits", [None, 4])
def test_sparse24_layers_match_dense_product(out_f, in_f, bits, monkeypatch) -> None:
    """A 2:4 layer's decode kernel (bf16 values, or kept 4-bit codes) against the dense product of the weight it
    stores, eager and compiled; more tokens than the kernel takes rebuild the dense weight."""
    from compress.formats.sparse import Sparse24IntLinear, Sparse24Linear
    from compress.kernels import sparse24
    from compress.sparsity import nm_mask

    g = torch.Generator(device="cuda").manual_seed(out_f + in_f)
    w = torch.randn(out_f, in_f, device="cuda", generator=g) * 0.02
    keep = nm_mask(w.abs(), 2, 4)
    if bits is None:
        layer = Sparse24Linear.from_dense(w.bfloat16(), keep, None)
    else:
        dense = IntLinear.from_weight(w * keep, None, IntScheme(bits, False, "group", 64), torch.bfloat16)
        layer = Sparse24IntLinear.from_int(dense, keep)
    reference = layer.dequantized_weight(torch.float32)
    calls = []
    for name in ("gemv_24", "gemv_24_int4"):
        real = getattr(sparse24, name)
        monkeypatch.setattr(sparse24, name, lambda *a, _real=real: calls.append(1) or _real(*a))
    for tokens in (1, 3, sparse24.MAX_TOKENS, sparse24.MAX_TOKENS + 1, 100):
        x = torch.randn(tokens, in_f, device="cuda", generator=g, dtype=torch.bfloat16)
        expect = x.float() @ reference.t()
        assert rel(layer(x), expect) <= 1e-2, tokens
    assert len(calls) == 3  # the decode kernel up to MAX_TOKENS
    monkeypatch.undo()
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(1, in_f, device="cuda", generator=g, dtype=torch.bfloat16)
    assert rel(compiled(x), x.float() @ reference.t()) <= 1e-2


def _sparse24_layer(out_f: int, in_f: int, bits: int | None, symmetric: bool, group: int | None, dtype, g):
    from compress.formats.sparse import Sparse24IntLinear, Sparse24Linear
    from compress.sparsity import nm_mask

    w = torch.randn(out_f, in_f, device="cuda", generator=g) * 0.02
    keep = nm_mask(w.abs(), 2, 4)
    if bits is None:
        return Sparse24Linear.from_dense(w.to(dtype), keep, None)
    scheme = IntScheme(bits, symmetric, "group" if group else "channel", group)
    return Sparse24IntLinear.from_int(IntLinear.from_weight(w * keep, None, scheme, dtype), keep)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits, symmetric, group", [(None, False, None), (4, True, 128), (4, False, 128),
                                                    (3, False, 256), (4, False, None)])
@pytest.mark.parametrize("out_f, in_f", [(16, 128), (4096, 4096), (4096, 14336), (1040, 1152)])
def test_cuda_sparse24_kernel_matches_reference(out_f, in_f, bits, symmetric, group, dtype) -> None:
    """The CUDA 2:4 kernel (compress/kernels/sparse24_mma.cu), bf16/fp16 values or kept codes, at every block size
    and token count it takes, with either register bound, with 2 or 3 chunks loaded ahead, and on the sparse tensor
    cores (kernel_bench's variants)."""
    from compress.kernels import cuda_int4, sparse24

    if group and in_f % group:
        pytest.skip("group does not divide in_features")
    g = torch.Generator(device="cuda").manual_seed(out_f + in_f + (bits or 0))
    layer = _sparse24_layer(out_f, in_f, bits, symmetric, group, dtype, g)
    reference = layer.dequantized_weight(torch.float32)
    for tokens in range(1, cuda_int4.MAX_TOKENS + 1):
        x = torch.randn(tokens, in_f, device="cuda", generator=g, dtype=dtype)
        want = x.float() @ reference.t()
        for warps, blocks, ahead, sp in [(1, None, 1, False), (2, None, 1, False), (4, None, 1, False),
                                         (8, None, 1, False), (16, None, 1, False), (4, 1, 1, False),
                                         (16, 2, 1, False), (1, None, 3, False), (4, None, 2, False),
                                         (16, None, 3, False), (1, None, 1, True), (4, None, 1, True),
                                         (16, None, 1, True), (8, None, 2, True)]:
            if bits is None:
                assert sparse24.cuda_applies(x, layer.values, layer.meta, in_f)
                y = sparse24.sparse24_mma(x, layer.values, layer.meta, warps=warps, min_blocks=blocks, ahead=ahead,
                                          sparse_mma=sp)
            else:
                size = group or in_f
                assert sparse24.cuda_applies(x, layer.qweight, layer.meta, size)
                y = sparse24.sparse24_mma(x, layer.qweight, layer.meta, layer.scales, layer.zeros, size,
                                          layer.int_scheme.sym_zero, warps, blocks, ahead, sp)
            assert y.dtype == dtype and torch.isfinite(y).all(), (tokens, warps, blocks, ahead, sp)
            assert rel(y, want) <= 1e-2, (tokens, warps, blocks, ahead, sp, rel(y, want))


def test_cuda_sparse24_kernel_is_taken_only_where_it_applies(monkeypatch) -> None:
    from compress.kernels import sparse24

    g = torch.Generator(device="cuda").manual_seed(0)

    def takes(out_f, in_f, bits=None, group=None, tokens=1, offset=0):
        layer = _sparse24_layer(out_f, in_f, bits, False, group, torch.bfloat16, g)
        x = torch.randn(tokens * in_f + offset, device="cuda", dtype=torch.bfloat16)[offset:].view(tokens, in_f)
        weights = layer.values if bits is None else layer.qweight
        return sparse24.cuda_applies(x, weights, layer.meta, group or in_f)

    assert takes(256, 512) and takes(256, 512, tokens=8) and takes(256, 512, 4, 128)
    assert not takes(256, 512, tokens=9)  # more tokens than the tile's columns: the Triton kernel
    assert not takes(256, 512, 4, 64)  # groups of 64
    assert not takes(264, 512)  # rows not a multiple of 16
    assert not takes(256, 200)  # columns not a multiple of 128
    assert not takes(256, 512, offset=1)  # activations off 16-byte alignment
    monkeypatch.setenv("COMPRESS_CUDA_SPARSE24", "0")
    assert not takes(256, 512)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rank", [8, 32, 104])
@pytest.mark.parametrize("out_f, in_f", [(16, 256), (4096, 4096), (28672, 4096), (4096, 14336)])
def test_cuda_int4_kernel_adds_a_low_rank_correction_in_its_launch(out_f, in_f, rank, dtype) -> None:
    """x W^T + x A^T B^T in one launch: at every token count and block size, several launches in a row (the
    counters the kernel's blocks synchronise on must come back to zero), and under CUDA-graph replay."""
    from compress.kernels import cuda_int4, gemv

    g = torch.Generator(device="cuda").manual_seed(out_f + in_f + rank)
    layer = IntLinear.from_weight(torch.randn(out_f, in_f, device="cuda", generator=g) * 0.02, None,
                                  IntScheme(4, True, "group", 128), dtype)
    A = (torch.randn(rank, in_f, device="cuda", generator=g) / in_f**0.5).to(dtype)
    B = (torch.randn(out_f, rank, device="cuda", generator=g) * 0.02).to(dtype)
    scratch = cuda_int4.correction_scratch(rank, "cuda")
    weight = layer.dequantized_weight(torch.float32) + B.float() @ A.float()
    for tokens in range(1, cuda_int4.MAX_TOKENS + 1):
        x = torch.randn(tokens, in_f, device="cuda", generator=g, dtype=dtype)
        assert cuda_int4.correction_applies(x, A, B, scratch)
        want = x.float() @ weight.t()
        for warps in (1, 4, 16):
            for _ in range(2):
                y = cuda_int4.int4_mma(x, layer.qweight, layer.scales, None, 128, layer.int_scheme.sym_zero, warps,
                                       correction=(A, B, scratch))
                assert rel(y, want) <= 1e-2, (tokens, warps, rel(y, want))
            assert not scratch.any()
    x = torch.randn(3, in_f, device="cuda", generator=g, dtype=dtype)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gemv.gemv_int4_corrected(x, layer.qweight, layer.scales, None, 128, layer.int_scheme.sym_zero, A, B, scratch)
    for _ in range(3):
        x.copy_(torch.randn(3, in_f, device="cuda", generator=g, dtype=dtype))
        graph.replay()
        assert rel(y, x.float() @ weight.t()) <= 1e-2
    assert not scratch.any()


def test_corrected_layers_decode_compiled(monkeypatch) -> None:
    """An int4 model with a low-rank correction: the compiled decode step (CUDA graphs, no graph break) computes what
    the eager model does."""
    torch._dynamo.reset()
    model = make_tiny("llama", dtype=torch.bfloat16).cuda()
    calib = torch.randint(0, 512, (4, 64), device="cuda")
    compress.apply(model, [{"method": "rtn", "args": {"bits": 4, "group_size": 128}},
                           {"method": "lowrank-correct", "args": {"rank": 8}}], calib=calib, device="cuda")
    ids = torch.randint(0, 512, (1, 1), device="cuda")
    spy = _Spy(monkeypatch)
    with torch.no_grad():
        eager = model(ids).logits
        # every layer through the corrected op; the 128-wide inputs (all but down_proj's 256) fall back to the 4-bit
        # kernel plus two products: the single launch splits the inputs in slices of 256
        assert spy.calls["gemv_int4_corrected"] == 7 * model.config.num_hidden_layers
        assert spy.calls["gemv_int4"] == 6 * model.config.num_hidden_layers
        compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
        for _ in range(3):
            out = compiled(ids).logits
    assert rel(out, eager) < 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["int8", "uint8", "fp8-channel", "fp8-tensor"])
@pytest.mark.parametrize("out_f, in_f", [(16, 64), (4096, 4096), (14336, 4096), (4096, 14336), (1040, 1088)])
def test_cuda_8bit_kernel_matches_reference(out_f, in_f, kind, dtype, monkeypatch) -> None:
    """The CUDA 8-bit kernel (given one token too by COMPRESS_CUDA_8BIT=1) against the dequantized weight, at 1-8
    tokens and every block size: int8 (absmax) and uint8 with zero points per channel, E4M3 with a scale a channel or one for
    the tensor (subnormal codes included: the weights span 2**-12 to 2**2 of the scale)."""
    from compress.formats.fp8 import Fp8Linear
    from compress.kernels import cuda_8bit, gemv

    monkeypatch.setenv("COMPRESS_CUDA_8BIT", "1")
    g = torch.Generator(device="cuda").manual_seed(out_f + in_f)
    w = torch.randn(out_f, in_f, device="cuda", generator=g) * torch.logspace(-12, 2, in_f, 2, device="cuda") * 1e-3
    if kind.startswith("fp8"):
        layer = Fp8Linear.from_weight(w, None, kind == "fp8-channel", "none", dtype)
        weight, scales = layer.weight_fp8, layer.weight_scale.view(-1).expand(out_f).contiguous()
        zeros = None
    else:
        layer = IntLinear.from_weight(w, None, IntScheme(8, kind == "int8", "channel", None), dtype)
        weight, scales, zeros = layer.qweight, layer.scales, layer.zeros
    reference = layer.dequantized_weight(torch.float32)
    args = gemv.kernel_args_8bit(weight, scales, zeros)
    for tokens in range(1, 9):
        x = torch.randn(tokens, in_f, device="cuda", generator=g, dtype=dtype)
        assert cuda_8bit.applies(x, *args)
        want = x.float() @ reference.t()
        for warps in (1, 4, 16):
            y = cuda_8bit.byte_mma(x, *args, warps=warps)
            assert rel(y, want) <= 5e-3, (tokens, warps, rel(y, want))
        assert rel(gemv.gemv_8bit(x, weight, scales, zeros), want) <= 5e-3  # the op takes it
    monkeypatch.setenv("COMPRESS_CUDA_8BIT", "0")
    assert not cuda_8bit.applies(x, *args)
