"""One-pass dequantization of packed integer weights on CUDA (a Triton kernel): reads the packed codes and
writes the float weight once, where the PyTorch expression takes several passes. Used for large batches
(prefill), where the matmul that follows is compute-bound and the weight is dequantized once per call.
Under torch.compile the PyTorch expression is used instead: the compiler fuses it into one pass itself.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


if triton is not None:

    @triton.jit
    def _dequant_kernel(q_ptr, s_ptr, z_ptr, out_ptr, numel, in_features, packed_cols, groups, group_size,
                        rows_scaled, zero_const, PER_BYTE: tl.constexpr, WIDTH: tl.constexpr, HAS_ZERO: tl.constexpr,
                        BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        n = offs // in_features
        k = offs % in_features
        byte = tl.load(q_ptr + n * packed_cols + k // PER_BYTE, mask=mask, other=0).to(tl.int32)
        code = (byte >> ((k % PER_BYTE) * WIDTH)) & ((1 << WIDTH) - 1)
        row = n * rows_scaled
        g = k // group_size
        scale = tl.load(s_ptr + row * groups + g, mask=mask, other=1.0).to(tl.float32)
        if HAS_ZERO:
            zero = tl.load(z_ptr + row * groups + g, mask=mask, other=0).to(tl.float32)
        else:
            zero = zero_const
        w = (code.to(tl.float32) - zero) * scale
        tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=mask)


def available(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda and not torch.compiler.is_compiling()


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int,
               in_features: int, sym_zero: int, dtype: torch.dtype) -> torch.Tensor:
    """Float [out, in] from packed uint8 codes [out, packed_cols], [rows, groups] scales and (asymmetric)
    uint8 zero points; rows is 1 for per-tensor scales."""
    out_features = qweight.shape[0]
    per_byte = 4 if bits <= 2 else 2 if bits <= 4 else 1
    out = torch.empty(out_features, in_features, dtype=dtype, device=qweight.device)
    numel = out.numel()
    block = 1024
    _dequant_kernel[(triton.cdiv(numel, block),)](
        qweight, scales, zeros if zeros is not None else scales, out, numel, in_features, qweight.shape[1],
        scales.shape[1], group_size, 1 if scales.shape[0] > 1 else 0, float(sym_zero), PER_BYTE=per_byte,
        WIDTH=8 // per_byte, HAS_ZERO=zeros is not None, BLOCK=block)
    return out
