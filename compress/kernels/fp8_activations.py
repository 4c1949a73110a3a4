"""Per-token FP8 activation quantization in one pass (Triton, CUDA): the input of a W8A8 matmul.

In PyTorch the same arithmetic (max |x| of each row, divide, saturate, round to E4M3) takes six passes over the
activations in fp32, about 33 bytes of memory traffic an element where 3 suffice (read bf16, write one byte):
for a prefill of 8 x 512 tokens through Llama-3-8B that is about 5 GB a block, more than the FP8 matmuls save.
The kernel reads each row once into registers, reduces it and writes the codes and the row's scale.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

FP8 = torch.float8_e4m3fn  # the fp8 format's storage type (compress.formats.fp8 takes it from here)
FP8_MAX = float(torch.finfo(FP8).max)  # 448
#: Widest row the kernel holds in registers at once; wider rows take the PyTorch path.
MAX_WIDTH = 32768


def available(x: torch.Tensor) -> bool:
    """Whether :func:`quantize_rows` runs ``x`` [M, K] on the kernel (CUDA, K up to MAX_WIDTH)."""
    return triton is not None and x.is_cuda and x.shape[-1] <= MAX_WIDTH


if triton is not None:

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, fp8_max, STATIC: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        k = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * K + k, mask=k < K, other=0.0).to(tl.float32)
        if STATIC:
            scale = tl.load(s_ptr)
        else:
            scale = tl.maximum(tl.max(tl.abs(x), axis=0) / fp8_max, 1e-12)
            tl.store(s_ptr + row, scale)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -fp8_max), fp8_max)  # IEEE division, as PyTorch
        codes = q.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        tl.store(q_ptr + row * K + k, codes, mask=k < K)


@torch.library.custom_op("compress::fp8_quantize_rows", mutates_args=())
def quantize_rows(x: torch.Tensor, static_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [M, K] as E4M3 codes [M, K] and float32 scales [M, 1], x ~ codes * scale.

    With ``static_scale`` (one float32 value) every row uses it; otherwise each row's max |x| maps to 448.
    The same arithmetic as ``format.token_scales`` and ``format.quantize_fp8``.
    """
    M, K = x.shape
    codes = torch.empty(M, K, device=x.device, dtype=FP8)
    scales = torch.empty(M, 1, device=x.device, dtype=torch.float32)
    if static_scale is not None:
        scales.copy_(static_scale.view(1, 1).expand(M, 1))
    block = triton.next_power_of_2(K)
    _quantize_rows_kernel[(M,)](x.contiguous(), codes.view(torch.uint8), scales if static_scale is None
                                else static_scale, K, FP8_MAX, STATIC=static_scale is not None, BLOCK=block,
                                num_warps=min(16, max(4, block // 1024)))
    return codes, scales


@quantize_rows.register_fake
def _(x, static_scale):
    return x.new_empty(x.shape, dtype=FP8), x.new_empty(x.shape[0], 1, dtype=torch.float32)
