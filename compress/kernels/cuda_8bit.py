"""The 8-bit decode kernel in CUDA (``byte_mma.cu``): 1-8 tokens of 16-bit activations times 8-bit codes with a
scale a row (int8; uint8 with a zero point a row; float8 E4M3), on the tensor cores, reading the codes as stored.

Built as the 4-bit kernel is (:mod:`compress.kernels.cuda_int4`: compiled by NVRTC at first use, the same work
layout: a block of 16 rows, its warps taking turns over 64-byte chunks of the rows; 42-64 registers a thread
compiled for sm_90, ``tests/test_cuda_int4.py``). :func:`compress.kernels.gemv.gemv_8bit` sends it calls of 2-8
tokens (a small batch, a draft being verified), where it beats the Triton kernels, and leaves one token to the
Triton one-token kernel, which is as fast or faster on the large layers. H100, weights replayed from L2
(``python -m benchmarks.kernel_bench --tokens 1,8 --only "8-bit kernel,one-token,tensor-core"``, 2026-12-07), us,
this kernel / the best Triton kernel: 8 tokens, int8: q/k/v fused 10.0 / 13.1, o 6.7 / 11.1, up 23.5 / 28.7, gate/up
fused 50.4 / 49.7; one token, int8: o 6.6 / 8.3, up 23.5 / 22.3, gate/up 49.0 / 42.7 (fp8: 22.0 / 21.6 and 43.4 /
40.4). ``COMPRESS_CUDA_8BIT=0`` turns it off, ``=1`` gives it one token too (to compare).
"""

from __future__ import annotations

import os

import torch

from compress.kernels import cuda_int4

CHUNK = 64  # columns (bytes) of a row a warp takes at a time: K must be a multiple of it


def applies(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
            kind: int) -> bool:
    """Whether :func:`byte_mma` takes ``x`` [M, K] against 8-bit ``weight`` bytes [N, K] of ``kind`` (with ``scales``
    [N] and ``zeros`` [N] or None, as :func:`compress.kernels.gemv.kernel_args_8bit` gives them): 2-8 tokens (1-8
    with ``COMPRESS_CUDA_8BIT=1``; none with ``=0``) of bf16 or fp16 on an NVIDIA GPU of compute capability 8.9 or
    later (E4M3 conversions; 8.0 for integer codes), N a multiple of 16, K of 64, scales in ``x``'s dtype or float32,
    16-byte aligned operands, and the kernel compiled."""
    switch = os.environ.get("COMPRESS_CUDA_8BIT", "")
    if switch == "0" or (x.shape[0] == 1 and switch != "1"):
        return False
    if not (x.is_cuda and torch.version.hip is None and x.dtype in (torch.bfloat16, torch.float16)
            and scales.dtype in (x.dtype, torch.float32) and scales.numel() == weight.shape[0]):
        return False
    M, K = x.shape
    N = weight.shape[0]
    if not (1 <= M <= cuda_int4.MAX_TOKENS and N % cuda_int4.ROWS == 0 and K % CHUNK == 0 and weight.shape[1] == K):
        return False
    if x.data_ptr() % 16 or weight.data_ptr() % 16 or not (x.is_contiguous() and weight.is_contiguous()):
        return False
    if kind == 2 and torch.cuda.get_device_capability(x.device) < (8, 9):
        return False
    return cuda_int4.usable(x.device.index or 0)


def byte_mma(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, kind: int,
             warps: int | None = None) -> torch.Tensor:
    """``x`` [M, K] (contiguous, 1-8 tokens) times the 8-bit weight: [M, N] in ``x``'s dtype; ``weight`` the codes'
    bytes [N, K] of ``kind`` (0 int8, 1 uint8 with zero points, 2 E4M3, as
    :func:`compress.kernels.gemv.kernel_args_8bit` gives them), ``scales`` [N] flat, ``zeros`` [N] uint8 for kind 1
    (check :func:`applies` first). ``warps`` overrides the block's warps (1, 2, 4, 8 or 16; for benchmarks)."""
    M, K = x.shape
    N = weight.shape[0]
    warps = warps or cuda_int4.default_warps(N, K * cuda_int4.CHUNK // CHUNK)  # as many chunks as the 4-bit kernel
    kernel = cuda_int4.compiled("byte_mma.cu", "byte_mma", x.device.index or 0, IS_BF16=int(x.dtype == torch.bfloat16),
                                WARPS=warps, KIND=kind, SCALE_F32=int(scales.dtype == torch.float32))
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    kernel(grid=(N // cuda_int4.ROWS, 1, 1), block=(32 * warps, 1, 1),
           args=[x, weight.view(torch.uint8), scales.contiguous(), zeros if zeros is not None else weight, y, M, N, K])
    return y
