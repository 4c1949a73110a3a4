"""Small-batch (decode) matmul on packed 4-bit weights in compress's own layout (a Triton kernel), so the
GPU holds one copy of the weights, in the format the checkpoint stores.

y[M, N] = x[M, K] @ dequant(q)[N, K]^T for M <= 16: each program dequantizes a [BLOCK_N, BLOCK_K] tile of
packed codes (two per byte, low nibble first) with its group's scale and zero point and multiplies it on the
tensor cores; the K dimension is split over programs (SPLIT_K) when N alone gives too few programs, with
fp32 atomic accumulation. Registered as a torch custom op so torch.compile and CUDA graphs take it whole.
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
        grid = [(32, 1), (32, 2), (32, 4), (32, 8), (64, 1), (64, 2), (64, 4), (128, 1), (128, 2)]
        return [triton.Config({"BLOCK_N": bn, "BLOCK_K": 128, "SPLIT_K": split}, num_warps=4) for bn, split in grid]

    @triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K"], reset_to_zero=["y_ptr"])
    @triton.jit
    def _int4_gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, N, K, groups, group_size, zero_const, M_BUCKET,
                          HAS_ZERO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.arange(0, BLOCK_M)
        nmask = n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        chunk = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
        k_start = pid_k * chunk
        for k0 in range(k_start, tl.minimum(k_start + chunk, K), BLOCK_K):
            b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(q_ptr + n[:, None] * (K // 2) + b[None, :], mask=nmask[:, None], other=0)
            codes = tl.join(packed & 15, packed >> 4).reshape(BLOCK_N, BLOCK_K)
            g = k0 // group_size
            scale = tl.load(s_ptr + n * groups + g, mask=nmask, other=0.0).to(tl.float32)
            if HAS_ZERO:
                zero = tl.load(z_ptr + n * groups + g, mask=nmask, other=0).to(tl.float32)
            else:
                zero = tl.full((BLOCK_N,), zero_const, tl.float32)
            w = ((codes.to(tl.float32) - zero[:, None]) * scale[:, None]).to(tl.bfloat16)
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=(m[:, None] < M), other=0.0).to(tl.bfloat16)
            acc += tl.dot(x, tl.trans(w))
        out = y_ptr + m[:, None] * N + n[None, :]
        omask = (m[:, None] < M) & nmask[None, :]
        if SPLIT_K == 1:
            tl.store(out, acc, mask=omask)
        else:
            tl.atomic_add(out, acc, mask=omask)


def supported(bits: int, group_size: int, in_features: int, device: torch.device) -> bool:
    """4-bit nibble-packed layers whose groups hold whole 128-column tiles, on CUDA with Triton."""
    return (triton is not None and device.type == "cuda" and bits in (3, 4) and group_size % 128 == 0
            and in_features % group_size == 0)


@torch.library.custom_op("compress::int4_gemv", mutates_args=())
def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              group_size: int, zero_const: float) -> torch.Tensor:
    """x [M <= 16, K] (bf16) times the dequantized weight: [M, N] in bf16."""
    M, K = x.shape
    N = qweight.shape[0]
    y = torch.zeros(M, N, device=x.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
    _int4_gemv_kernel[grid](x.contiguous(), qweight, scales, zeros if zeros is not None else scales, y, M, N, K,
                            scales.shape[1], group_size, zero_const, 1 if M == 1 else 16,
                            HAS_ZERO=zeros is not None, BLOCK_M=16)
    return y.to(torch.bfloat16)


@int4_gemv.register_fake
def _(x, qweight, scales, zeros, group_size, zero_const):
    return x.new_empty(x.shape[0], qweight.shape[0], dtype=torch.bfloat16)
