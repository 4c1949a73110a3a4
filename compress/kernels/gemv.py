"""Weight-only matrix-vector products for decode steps on CUDA: Triton kernels that read a quantized weight
once, in the layout the checkpoint stores, and multiply it by a few tokens' activations.

A decode step multiplies one token (a few, when decoding a batch or verifying a draft) by every weight
matrix, so its time is the time to read the weights. Two ops:

* :func:`gemv_int4`: packed 4-bit codes [N, K/2] (two a byte, the even column in the low nibble) with
  group-wise scales and uint8 zero points or a constant zero point (the ``int`` format at 3 and 4 bits).
  From DOT_MIN_TOKENS tokens it runs a tensor-core kernel (below);
* :func:`gemv_8bit`: one byte a weight [N, K] (int8, or float8 E4M3) with per-row scales and optional uint8
  per-row zero points (the ``int`` format at 8 bits per channel, and ``fp8``).

Each program owns ``BLOCK_N`` output rows of one token and streams their weights in tiles of ``BLOCK_K`` bytes
a row, accumulating the products elementwise in fp32 registers and reducing over K once at the end (a
reduction per tile would cost more than the arithmetic). The 4-bit tile is shaped [rows, groups, bytes of a
group] so each group's scale is loaded once and broadcast. The programs of one row block for different tokens
are launched next to each other, so the other tokens can read the weight from L2. Both
kernels are torch custom ops, so torch.compile and CUDA graphs take them whole; tile sizes are autotuned per
shape on first use, timed as CUDA-graph replays (as decode steps run).

Measured on an H100 (``python -m compress.eval.kernel_bench``, one token, weights of Llama-3-8B's MLP): the
8-bit kernel reads int8 and fp8 weights at 82-87% of the copy bandwidth (cuBLAS reads bf16 at 88-94%); the
4-bit kernel at 47-49%, below torch's tinygemm kernel (58-61%), which needs its own tiled copy of the weights.

The one-token kernels' time grows with the tokens (each program dequantizes for its own token): 8 tokens took 7x
one token's time on the 4-bit MLP weights. For 3-16 tokens the 4-bit op runs a kernel that dequantizes each tile
once into 16 bits and multiplies it by all the tokens on the tensor cores (``--tokens 1,4,8,16`` in the
benchmark; 8 tokens, symmetric 4-bit, up / down projection: 49.6 / 49.2 us against 138.7 / 145.5 us for the
one-token kernel, and 41.7 / 44.8 us for cuBLAS on bf16). The 8-bit op has no such kernel yet.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

#: Calls with up to this many tokens take the kernels; more (prefill) dequantize once and use a dense matmul.
#: 4-bit calls with 16-bit activations take them up to DOT_BLOCK_M tokens (the tensor-core kernel's tile; H100,
#: 16 tokens, Llama-3-8B shapes: 1.1-2.6x faster than dequantizing for cuBLAS).
MAX_TOKENS = 8
#: 4-bit calls with at least this many tokens (and 16-bit activations) take the tensor-core kernel, which
#: dequantizes each weight once for all the tokens; fewer take the one-token kernel (H100: at 2 tokens the two
#: are level, 0.6-1.3x by layer shape; at 4 the tensor-core kernel is 1.5-2.3x faster on all but the 1024-row
#: k/v projections, 0.83x).
DOT_MIN_TOKENS = 3
DOT_BLOCK_M = 16  # the tensor-core tile's rows, the most tokens it takes
DOT_DTYPES = (torch.bfloat16, torch.float16)  # activations the tensor-core kernel takes


def _takes_dot(x: torch.Tensor) -> bool:
    return DOT_MIN_TOKENS <= x.shape[0] <= DOT_BLOCK_M and x.dtype in DOT_DTYPES


def _dot_grid(n: int):
    return lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])


def available(x: torch.Tensor, four_bit: bool = False) -> bool:
    """Whether the kernels can take input ``x`` [..., K]: on CUDA, with at most MAX_TOKENS tokens (DOT_BLOCK_M
    for the 4-bit op, ``four_bit``, with 16-bit ``x``)."""
    limit = DOT_BLOCK_M if four_bit and x.dtype in DOT_DTYPES else MAX_TOKENS
    return triton is not None and x.is_cuda and x.numel() <= limit * x.shape[-1]


if triton is not None:

    def _configs(block_ks):
        return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
                for bn in (2, 4, 8, 16) for bk in block_ks for w in (4, 8)]

    def _bench_graphed(kernel_call, quantiles):
        # Decode steps run as CUDA graphs: time the candidates the same way, or a small kernel's launch
        # overhead (tens of microseconds from Python) hides the differences between tile shapes.
        return triton.testing.do_bench_cudagraph(kernel_call, rep=20, quantiles=quantiles)

    # Integer codes become floats by the exponent trick: the bits 0x4B000000 | c read as a float are 2**23 + c
    # for 0 <= c < 2**23, and subtracting 2**23 + zero is exact: two full-rate instructions instead of an
    # int-to-float conversion, which runs at a quarter of the rate (4-bit kernel on the 14336 x 4096 up
    # projection, H100: 22.6 -> 19.8 us a call).
    MAGIC = tl.constexpr(0x4B000000)
    TWO_23 = tl.constexpr(8388608.0)

    @triton.autotune(configs=_configs((128, 256, 512)), key=["M", "N", "K"], do_bench=_bench_graphed)
    @triton.jit
    def _gemv_int4_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, N, K, groups, zero_const, GROUP: tl.constexpr,
                          HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        GB: tl.constexpr = GROUP // 2  # packed bytes of a group
        NG: tl.constexpr = BLOCK_K // GB if BLOCK_K > GB else 1  # groups in a tile
        m = tl.program_id(0) % M
        n = (tl.program_id(0) // M) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        gi = tl.arange(0, NG)
        j = tl.arange(0, GB)
        KB = K // 2
        acc = tl.zeros((BLOCK_N, NG, GB), dtype=tl.float32)
        for g0 in range(0, groups, NG):
            g = g0 + gi
            gmask = g < groups
            kb = g[:, None] * GB + j[None, :]  # [NG, GB] byte columns
            wmask = nmask[:, None, None] & gmask[None, :, None]
            packed = tl.load(q_ptr + n[:, None, None] * KB + kb[None, :, :], mask=wmask, other=0).to(tl.int32)
            smask = nmask[:, None] & gmask[None, :]
            s = tl.load(s_ptr + n[:, None] * groups + g[None, :], mask=smask, other=0.0).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(z_ptr + n[:, None] * groups + g[None, :], mask=smask, other=0).to(tl.float32)
            else:
                z = tl.zeros((BLOCK_N, NG), dtype=tl.float32) + zero_const
            offset = (z + TWO_23)[:, :, None]
            lo = ((packed & 15) | MAGIC).to(tl.float32, bitcast=True) - offset
            hi = ((packed >> 4) | MAGIC).to(tl.float32, bitcast=True) - offset
            # x's even and odd entries of the tile, from one contiguous load
            xk = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
            xpair = tl.load(x_ptr + m * K + xk, mask=gmask[:, None], other=0.0).to(tl.float32)
            xe, xo = tl.split(tl.reshape(xpair, (NG, GB, 2)))
            acc += (lo * xe[None, :, :] + hi * xo[None, :, :]) * s[:, :, None]
        y = tl.sum(tl.sum(acc, axis=2), axis=1)
        tl.store(y_ptr + m * N + n, y.to(y_ptr.dtype.element_ty), mask=nmask)

    @triton.autotune(configs=_configs((256, 512, 1024)), key=["M", "N", "K"], do_bench=_bench_graphed)
    @triton.jit
    def _gemv_8bit_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, KIND: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
        # KIND 0: int8 codes (zero 0); 1: uint8 codes with per-row zero points; 2: float8 E4M3 bytes.
        m = tl.program_id(0) % M
        n = (tl.program_id(0) // M) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        k = tl.arange(0, BLOCK_K)
        s = tl.load(s_ptr + n, mask=nmask, other=0.0).to(tl.float32)
        if KIND == 1:
            offset = tl.load(z_ptr + n, mask=nmask, other=0).to(tl.float32) + TWO_23
        else:
            offset = tl.zeros((BLOCK_N,), dtype=tl.float32) + (TWO_23 + 128.0)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + k
            kmask = kk < K
            w = tl.load(w_ptr + n[:, None] * K + kk[None, :], mask=nmask[:, None] & kmask[None, :], other=0)
            if KIND == 2:  # float8 E4M3, loaded as its bytes
                wf = w.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            elif KIND == 1:
                wf = (w.to(tl.int32) | MAGIC).to(tl.float32, bitcast=True) - offset[:, None]
            else:
                wf = ((w.to(tl.int32) + 128) | MAGIC).to(tl.float32, bitcast=True) - offset[:, None]
            x = tl.load(x_ptr + m * K + kk, mask=kmask, other=0.0).to(tl.float32)
            acc += wf * x[None, :]
        y = tl.sum(acc, axis=1)
        tl.store(y_ptr + m * N + n, (y * s).to(y_ptr.dtype.element_ty), mask=nmask)

    # A few tokens (a batch, or a draft being verified): the kernels above would redo the dequantization for
    # every token, so their time grows with the token count. These dequantize each weight tile once, into the
    # activations' 16-bit type, and let the tensor cores multiply it by all the tokens at once (padded to
    # BLOCK_M); programs also split K (SPLIT_K, a run-time argument: one compiled kernel serves every split) so
    # that narrow layers still fill the GPU, adding their partial sums atomically into a zeroed float32 output.
    def _dot_configs():
        return [triton.Config({"BLOCK_N": bn, "SPLIT_K": sk}, num_warps=4, num_stages=st)
                for bn in (16, 32, 64) for sk in (1, 2, 4, 8) for st in (2, 4)]

    @triton.autotune(configs=_dot_configs(), key=["N", "K"], do_bench=_bench_graphed, reset_to_zero=["y_ptr"])
    @triton.jit(do_not_specialize=["SPLIT_K"])
    def _dot_int4_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, N, K, groups, zero_const, GROUP: tl.constexpr,
                         HAS_ZERO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K):
        # One group a step: the codes minus their zero point are small integers, exact in 16 bits, so the group's
        # products are summed by the tensor cores and scaled once, per row, in float32.
        GB: tl.constexpr = GROUP // 2
        CB: tl.constexpr = GB if GB < 64 else 64
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        m = tl.arange(0, BLOCK_M)
        mmask = m < M
        j = tl.arange(0, CB)
        KB = K // 2
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(tl.program_id(1), groups, SPLIT_K):
            if HAS_ZERO:
                offset = tl.load(z_ptr + n * groups + g, mask=nmask, other=0).to(tl.float32) + TWO_23
            else:
                offset = tl.zeros((BLOCK_N,), dtype=tl.float32) + (zero_const + TWO_23)
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for c in tl.static_range(0, GB, CB):  # large groups in chunks of CB bytes a row
                b = g * GB + c + j
                packed = tl.load(q_ptr + n[:, None] * KB + b[None, :], mask=nmask[:, None], other=0).to(tl.int32)
                xe = tl.load(x_ptr + m[:, None] * K + 2 * b[None, :], mask=mmask[:, None], other=0.0)
                xo = tl.load(x_ptr + m[:, None] * K + 2 * b[None, :] + 1, mask=mmask[:, None], other=0.0)
                lo = (((packed & 15) | MAGIC).to(tl.float32, bitcast=True) - offset[:, None]).to(xe.dtype)
                hi = (((packed >> 4) | MAGIC).to(tl.float32, bitcast=True) - offset[:, None]).to(xe.dtype)
                part += tl.dot(xe, tl.trans(lo)) + tl.dot(xo, tl.trans(hi))
            s = tl.load(s_ptr + n * groups + g, mask=nmask, other=0.0).to(tl.float32)
            acc += part * s[None, :]
        tl.atomic_add(y_ptr + m[:, None] * N + n[None, :], acc, mask=mmask[:, None] & nmask[None, :], sem="relaxed")


@torch.library.custom_op("compress::gemv_int4", mutates_args=())
def gemv_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              group_size: int, zero_const: float) -> torch.Tensor:
    """``x`` [M, K] times the dequantized 4-bit weight: [M, N] in ``x``'s dtype.

    ``qweight`` uint8 [N, K/2], ``scales`` [N, K/group_size], ``zeros`` uint8 like ``scales`` or None (then
    every zero point is ``zero_const``); w[n, k] = (code - zero) * scale of k's group.
    """
    x = x.contiguous()
    path = dot_int4 if _takes_dot(x) else one_token_int4
    return path(x, qweight, scales, zeros, group_size, zero_const)


def one_token_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   group_size: int, zero_const: float) -> torch.Tensor:
    """:func:`gemv_int4` by the one-token kernel, whatever the tokens (``x`` contiguous; for benchmarks)."""
    M, K = x.shape
    N = qweight.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * M,)  # noqa: E731
    _gemv_int4_kernel[grid](x, qweight, scales, zeros if zeros is not None else scales, y, M, N, K,
                            scales.shape[1], zero_const, GROUP=group_size, HAS_ZERO=zeros is not None)
    return y


def dot_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
             group_size: int, zero_const: float) -> torch.Tensor:
    """:func:`gemv_int4` by the tensor-core kernel (``x`` contiguous, 16-bit, at most DOT_BLOCK_M tokens)."""
    M, K = x.shape
    N = qweight.shape[0]
    y32 = torch.zeros(M, N, device=x.device, dtype=torch.float32)
    _dot_int4_kernel[_dot_grid(N)](x, qweight, scales, zeros if zeros is not None else scales, y32, M, N, K,
                                   scales.shape[1], zero_const, GROUP=group_size, HAS_ZERO=zeros is not None,
                                   BLOCK_M=DOT_BLOCK_M)
    return y32.to(x.dtype)


@gemv_int4.register_fake
def _(x, qweight, scales, zeros, group_size, zero_const):
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.custom_op("compress::gemv_8bit", mutates_args=())
def gemv_8bit(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """``x`` [M, K] times an 8-bit weight [N, K] (int8, uint8 or float8): [M, N] in ``x``'s dtype.

    ``scales`` holds N per-row scales (any shape with N elements); ``zeros`` N uint8 zero points or None:
    w[n, k] = (weight[n, k] - zero[n]) * scale[n].
    """
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * M,)  # noqa: E731
    if weight.dtype == torch.float8_e4m3fn:
        kind, weight = 2, weight.view(torch.uint8)
    elif weight.dtype == torch.uint8:
        if zeros is None:
            raise ValueError("gemv_8bit: uint8 codes need their zero points")
        kind = 1
    elif weight.dtype == torch.int8:
        kind = 0
    else:
        raise ValueError(f"gemv_8bit: weights of dtype {weight.dtype} are not 8-bit codes")
    _gemv_8bit_kernel[grid](x.contiguous(), weight, scales.reshape(-1), zeros.reshape(-1) if zeros is not None
                            else scales, y, M, N, K, KIND=kind)
    return y


@gemv_8bit.register_fake
def _(x, weight, scales, zeros):
    return x.new_empty(x.shape[0], weight.shape[0])
