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
    def _dequant_kernel(q_ptr, s_ptr, z_ptr, out_ptr, rows, in_features, packed_cols, groups, group_size,
                        scale_rows, zero_const, PER_BYTE: tl.constexpr, WIDTH: tl.constexpr, HAS_ZERO: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # A [BLOCK_R, BLOCK_C] tile of the output from [BLOCK_R, BLOCK_C / PER_BYTE] packed bytes: each byte is
        # read once and spread over its PER_BYTE codes with shifts, then scaled by its group.
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c0 = tl.program_id(1) * BLOCK_C
        b = c0 // PER_BYTE + tl.arange(0, BLOCK_C // PER_BYTE)
        rmask = r < rows
        packed = tl.load(q_ptr + r[:, None] * packed_cols + b[None, :], mask=rmask[:, None] & (b < packed_cols)[None, :],
                         other=0).to(tl.int32)
        shifts = tl.arange(0, PER_BYTE) * WIDTH
        codes = (packed[:, :, None] >> shifts[None, None, :]) & ((1 << WIDTH) - 1)
        codes = tl.reshape(codes, (BLOCK_R, BLOCK_C))
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < in_features
        srow = r if scale_rows > 1 else r * 0
        g = c // group_size
        smask = rmask[:, None] & cmask[None, :]
        scale = tl.load(s_ptr + srow[:, None] * groups + g[None, :], mask=smask, other=1.0).to(tl.float32)
        if HAS_ZERO:
            zero = tl.load(z_ptr + srow[:, None] * groups + g[None, :], mask=smask, other=0).to(tl.float32)
        else:
            zero = zero_const
        w = (codes.to(tl.float32) - zero) * scale
        tl.store(out_ptr + r[:, None] * in_features + c[None, :], w.to(out_ptr.dtype.element_ty), mask=smask)


def available(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda and not torch.compiler.is_compiling()


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int,
               in_features: int, sym_zero: int, dtype: torch.dtype) -> torch.Tensor:
    """Float [out, in] from packed uint8 codes [out, packed_cols], [rows, groups] scales and (asymmetric)
    uint8 zero points; rows is 1 for per-tensor scales."""
    out_features = qweight.shape[0]
    per_byte = 4 if bits <= 2 else 2 if bits <= 4 else 1
    out = torch.empty(out_features, in_features, dtype=dtype, device=qweight.device)
    block_r, block_c = 16, 256
    grid = (triton.cdiv(out_features, block_r), triton.cdiv(in_features, block_c))
    _dequant_kernel[grid](qweight, scales, zeros if zeros is not None else scales, out, out_features, in_features,
                          qweight.shape[1], scales.shape[1], group_size, scales.shape[0], float(sym_zero),
                          PER_BYTE=per_byte, WIDTH=8 // per_byte, HAS_ZERO=zeros is not None, BLOCK_R=block_r,
                          BLOCK_C=block_c)
    return out
