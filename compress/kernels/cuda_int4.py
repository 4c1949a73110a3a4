"""The 4-bit decode kernel in CUDA (``int4_mma.cu``): 1-8 tokens of 16-bit activations times packed 4-bit
codes on the tensor cores, reading the ``int`` format's bytes as stored (no repacking, no second copy).

It is compiled at first use by NVRTC through ``torch.cuda._compile_kernel`` (no build step at install time,
and no compiler needed beyond the NVRTC library PyTorch's CUDA builds ship). PyTorch's helper also wants to
know where a CUDA toolkit lies (``CUDA_HOME``, or ``nvcc`` on the PATH), though the kernel includes no header.
Where any of that is missing or fails,
:func:`applies` says no (logging why, once) and :mod:`compress.kernels.gemv`'s Triton kernels take the call.
Setting the environment variable ``COMPRESS_CUDA_INT4=0`` turns the kernel off the same way (to compare, or to
rule it out).
"""

from __future__ import annotations

import functools
import logging
import os
from importlib import resources

import torch

log = logging.getLogger(__name__)

MAX_TOKENS = 8  # the mma tile's 8 columns
CHUNK = 128  # codes of a row a warp takes at a time: K and the group size must be multiples of it
ROWS = 16  # output rows a block owns (the mma tile's rows)
MAX_RANK = 256  # the largest low-rank correction the kernel adds in its own launch


def shape_ok(tokens: int, n: int, k: int, group_size: int) -> bool:
    """Whether the kernel takes ``tokens`` rows against an [n, k] weight in groups of ``group_size``."""
    return (1 <= tokens <= MAX_TOKENS and n % ROWS == 0 and k % CHUNK == 0 and group_size % CHUNK == 0
            and (group_size & (group_size - 1) == 0 or group_size >= k))


def applies(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> bool:
    """Whether :func:`int4_mma` takes ``x`` [M, K] against packed ``qweight`` [N, K/2]: 1-8 tokens of bf16 or
    fp16 (the scales' dtype too) on an NVIDIA GPU of compute capability 8.0 or later, N a multiple of 16, K a
    multiple of 128, groups of 128 times a power of two (or one group a row), 16-byte aligned operands, and the
    kernel compiled."""
    if os.environ.get("COMPRESS_CUDA_INT4", "1") == "0":
        return False
    if not (x.is_cuda and torch.version.hip is None and x.dtype in (torch.bfloat16, torch.float16)
            and scales.dtype == x.dtype):
        return False
    if not shape_ok(x.shape[0], qweight.shape[0], x.shape[1], group_size):
        return False
    if x.data_ptr() % 16 or qweight.data_ptr() % 16 or qweight.stride() != (x.shape[1] // 2, 1):
        return False
    return usable(x.device.index or 0)


def default_warps(n: int, k: int) -> int:
    """Warps a block (16 rows) splits its row's chunks over: as many as keep the whole grid to about 4096 warps
    (31 for each of an H100's 132 multiprocessors), from 16 down to 4, and no more than the row's chunks.

    H100, one token, weights replayed from L2, us for 4 / 8 / 16 warps (``kernel_bench``): o 4096x4096 6.8 / 5.0 /
    4.4; q/k/v fused 6144x4096 7.7 / 5.6 / 6.0; up 14336x4096 10.5 / 12.4 / 12.3; gate/up fused 28672x4096 25.7 /
    24.0 / 26.4; down 4096x14336 28.4 / 16.3 / 11.7.
    """
    blocks = n // ROWS
    warps = 16
    while warps > 4 and blocks * warps > 4096:
        warps //= 2
    while warps > 1 and warps > k // CHUNK:
        warps //= 2
    return warps


def correction_applies(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scratch: torch.Tensor) -> bool:
    """Whether :func:`int4_mma` can add the correction x A^T B^T in its own launch: ``A`` [R, K] and ``B`` [N, R]
    contiguous and 16-byte aligned in ``x``'s dtype, R a multiple of 8 up to MAX_RANK, K a multiple of 256, and
    ``scratch`` (:func:`correction_scratch`) on the same device (with :func:`applies`)."""
    R, K = A.shape
    return (A.dtype == B.dtype == x.dtype and A.is_contiguous() and B.is_contiguous() and R % 8 == 0
            and 8 <= R <= MAX_RANK and K == x.shape[1] and K % 256 == 0 and B.shape[1] == R
            and A.data_ptr() % 16 == 0 and B.data_ptr() % 16 == 0 and scratch.dtype == torch.int32
            and scratch.numel() == MAX_TOKENS * R + 2 and A.device == B.device == scratch.device == x.device)


def correction_scratch(rank: int, device: torch.device | str) -> torch.Tensor:
    """The zeroed int32 buffer a layer's corrected launches share: t = x A^T (float32 [MAX_TOKENS, rank]), then the
    two counters the blocks synchronise on; each launch leaves it zero again."""
    return torch.zeros(MAX_TOKENS * rank + 2, dtype=torch.int32, device=device)


def int4_mma(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
             group_size: int, zero_const: float, warps: int | None = None,
             correction: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
             ahead: int = 1) -> torch.Tensor:
    """``x`` [M, K] (contiguous, 1-8 tokens) times the 4-bit weight: [M, N] in ``x``'s dtype; arguments as
    :func:`compress.kernels.gemv.gemv_int4` (check :func:`applies` first). ``warps`` overrides the block's
    warps (1, 2, 4, 8 or 16) and ``ahead`` the chunks of codes a warp loads ahead of the one it computes (for
    benchmarks: 1 is what the kernel was measured with; compiled for sm_90, 2 and 3 take 61-68 registers).

    With ``correction`` = (A [R, K], B [N, R], scratch), the result is x W^T + x A^T B^T in the same launch (check
    :func:`correction_applies`): its first K / 256 blocks add their slices of x A^T into ``scratch`` and count
    themselves done there, the others wait for them and add that times B^T to their rows; the last block zeroes
    ``scratch`` for the next launch."""
    M, K = x.shape
    N = qweight.shape[0]
    warps = warps or default_warps(N, K)
    shift = 31 if group_size >= K else (group_size // CHUNK).bit_length() - 1
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    rank = 0 if correction is None else correction[0].shape[0]
    kernel = _kernel(x.dtype == torch.bfloat16, zeros is not None, warps, x.device.index or 0, rank, ahead)
    args = [x, qweight, scales.contiguous(), zeros.contiguous() if zeros is not None else qweight, y, M, N, K,
            scales.shape[1], shift, int(zero_const)]
    blocks = N // ROWS
    if correction is not None:
        A, B, scratch = correction
        t = scratch[: MAX_TOKENS * rank].view(torch.float32)
        args += [A, B, t, scratch[MAX_TOKENS * rank :]]
        blocks += K // 256
    kernel(grid=(blocks, 1, 1), block=(32 * warps, 1, 1), args=args)
    return y


@functools.cache
def compiled(file: str, entry: str, device: int, **defines: int):
    """Kernel ``entry`` of ``file`` (in this package, put behind the shared helpers of ``mma.cuh``) compiled by NVRTC
    for ``device`` with ``defines`` (name: value); once per distinct arguments."""
    with torch.cuda.device(device):
        return torch.cuda._compile_kernel(source(file), entry, nvcc_options=[f"-D{k}={v}" for k, v in defines.items()])


def source(file: str) -> str:
    """The CUDA source NVRTC compiles for kernel file ``file`` of this package: the shared helpers, then the file."""
    kernels = resources.files("compress.kernels")
    return kernels.joinpath("mma.cuh").read_text() + "\n" + kernels.joinpath(file).read_text()


def _kernel(bf16: bool, has_zero: bool, warps: int, device: int, rank: int = 0, ahead: int = 1):
    return compiled("int4_mma.cu", "int4_mma", device, IS_BF16=int(bf16), HAS_ZERO=int(has_zero), WARPS=warps,
                    CORR_RANK=rank, AHEAD=ahead)


@functools.cache
def usable(device: int) -> bool:
    """Whether ``device`` has mma.sync for 16-bit operands (compute capability 8.0 on) and the kernel compiles
    there; asked once a device, as every decode call asks (the 2:4 kernel of :mod:`compress.kernels.sparse24` asks
    it too: it is built the same way)."""
    if torch.cuda.get_device_capability(device) < (8, 0):
        return False
    try:
        _kernel(True, False, default_warps(4096, 4096), device)
    except Exception as err:  # no NVRTC, no CUDA headers, an old PyTorch: the Triton kernels serve instead
        log.warning("the CUDA 4-bit decode kernel is unavailable (%s: %s); 4-bit layers use the Triton kernels, "
                    "which decode slower (Llama-3-8B int4 on an H100: 294 against 358 tok/s). It is compiled by "
                    "torch.cuda._compile_kernel (NVRTC), which needs a PyTorch that has it and a CUDA toolkit it can "
                    "find (set CUDA_HOME, or put nvcc on the PATH)",
                    type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return False
    return True
