"""Small-batch (decode) matmul on packed 4-bit weights in compress's own layout (a Triton kernel), so the
GPU holds one copy of the weights, in the format the checkpoint stores.

y[M, N] = x[M, K] @ dequant(q)[N, K]^T for M <= 16: each program reads a [BLOCK_N, BLOCK_K / 2] tile of
packed bytes (two codes each, low nibble first) and reduces it against x in fp32 on the CUDA cores (at M of
a few, the bytes, not the arithmetic, set the time); the K dimension is split over programs (SPLIT_K) when N
alone gives too few, with fp32 atomic accumulation. Registered as a torch custom op so torch.compile and CUDA graphs take it whole.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

MAX_TOKENS = 16

if triton is not None:

    def _configs():
        grid = [(16, 256, 1), (16, 256, 2), (16, 256, 4), (32, 256, 1), (32, 256, 2), (32, 256, 4), (64, 256, 1),
                (64, 256, 2), (16, 512, 1), (16, 512, 2), (32, 512, 1), (8, 256, 4), (8, 256, 8)]
        return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=4) for bn, bk, sk in grid]

    @triton.autotune(configs=_configs(), key=["M", "N", "K"], reset_to_zero=["y_ptr"])
    @triton.jit
    def _int4_gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, N, K, groups, zero_const, GROUP: tl.constexpr,
                          HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
        # Low and high nibbles are used as two half-width tiles against the even and odd entries of x, so no
        # interleaving is needed; each group's zero point comes out as zero * sum(x) over the group.
        NG: tl.constexpr = BLOCK_K // GROUP if BLOCK_K > GROUP else 1  # groups in a tile
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        half = tl.arange(0, BLOCK_K // 2)
        chunk = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
        k_start = pid_k * chunk
        k_end = tl.minimum(k_start + chunk, K)
        for m in range(0, M):
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for k0 in range(k_start, k_end, BLOCK_K):
                packed = tl.load(q_ptr + n[:, None] * (K // 2) + (k0 // 2 + half)[None, :], mask=nmask[:, None],
                                 other=0)
                xe = tl.load(x_ptr + m * K + k0 + 2 * half).to(tl.float32)
                xo = tl.load(x_ptr + m * K + k0 + 2 * half + 1).to(tl.float32)
                prod = (packed & 15).to(tl.float32) * xe[None, :] + (packed >> 4).to(tl.float32) * xo[None, :]
                part = tl.sum(tl.reshape(prod, (BLOCK_N, NG, BLOCK_K // (2 * NG))), axis=2)
                xsum = tl.sum(tl.reshape(xe + xo, (NG, BLOCK_K // (2 * NG))), axis=1)
                g = k0 // GROUP + tl.arange(0, NG)
                scale = tl.load(s_ptr + n[:, None] * groups + g[None, :], mask=nmask[:, None], other=0.0).to(tl.float32)
                if HAS_ZERO:
                    zero = tl.load(z_ptr + n[:, None] * groups + g[None, :], mask=nmask[:, None], other=0).to(tl.float32)
                else:
                    zero = zero_const
                acc += tl.sum((part - zero * xsum[None, :]) * scale, axis=1)
            if SPLIT_K == 1:
                tl.store(y_ptr + m * N + n, acc, mask=nmask)
            else:
                tl.atomic_add(y_ptr + m * N + n, acc, mask=nmask)


def supported(bits: int, group_size: int, in_features: int, device: torch.device) -> bool:
    """Nibble-packed layers with groups of 128-512 and widths a multiple of 512 (whole tiles), on CUDA."""
    return (triton is not None and device.type == "cuda" and bits in (3, 4) and group_size in (128, 256, 512)
            and in_features % 512 == 0)


@torch.library.custom_op("compress::int4_gemv", mutates_args=())
def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              group_size: int, zero_const: float) -> torch.Tensor:
    """x [M <= 16, K] (bf16) times the dequantized weight: [M, N] in bf16."""
    M, K = x.shape
    N = qweight.shape[0]
    y = torch.zeros(M, N, device=x.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
    _int4_gemv_kernel[grid](x.contiguous(), qweight, scales, zeros if zeros is not None else scales, y, M, N, K,
                            scales.shape[1], zero_const, GROUP=group_size, HAS_ZERO=zeros is not None)
    return y.to(torch.bfloat16)


@int4_gemv.register_fake
def _(x, qweight, scales, zeros, group_size, zero_const):
    return x.new_empty(x.shape[0], qweight.shape[0], dtype=torch.bfloat16)
