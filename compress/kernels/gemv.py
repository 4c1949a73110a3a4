"""Weight-only matrix-vector products for decode steps on CUDA: Triton kernels that read a quantized weight
once, in the layout the checkpoint stores, and multiply it by a few tokens' activations.

A decode step multiplies one token (a few, when decoding a batch or verifying a draft) by every weight
matrix, so its time is the time to read the weights. Two kernels:

* :func:`gemv_int4`: packed 4-bit codes [N, K/2] (two a byte, the even column in the low nibble) with
  group-wise scales and uint8 zero points or a constant zero point (the ``int`` format at 3 and 4 bits);
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
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

#: Calls with up to this many tokens take the kernels; more (prefill) dequantize once and use a dense matmul.
MAX_TOKENS = 8


def available(x: torch.Tensor) -> bool:
    """Whether the kernels can take input ``x`` [..., K]: on CUDA, with at most MAX_TOKENS tokens."""
    return triton is not None and x.is_cuda and x.numel() <= MAX_TOKENS * x.shape[-1]


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


@torch.library.custom_op("compress::gemv_int4", mutates_args=())
def gemv_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              group_size: int, zero_const: float) -> torch.Tensor:
    """``x`` [M, K] times the dequantized 4-bit weight: [M, N] in ``x``'s dtype.

    ``qweight`` uint8 [N, K/2], ``scales`` [N, K/group_size], ``zeros`` uint8 like ``scales`` or None (then
    every zero point is ``zero_const``); w[n, k] = (code - zero) * scale of k's group.
    """
    M, K = x.shape
    N = qweight.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * M,)  # noqa: E731
    _gemv_int4_kernel[grid](x.contiguous(), qweight, scales, zeros if zeros is not None else scales, y, M, N, K,
                            scales.shape[1], zero_const, GROUP=group_size, HAS_ZERO=zeros is not None)
    return y


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
