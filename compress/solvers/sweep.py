"""The optimal-brain-surgeon column sweep (GPTQ; SparseGPT is the same sweep with another choice per column).

:func:`lazy_sweep` walks a weight's columns a block at a time; each block's columns are settled one by one, each
column's error spread over the block's columns to its right through the upper Cholesky factor U of H^-1, and the
block's errors are applied to every column right of the block in one matrix product (the lazy batch update).

:func:`round_columns` settles a block by rounding each column to its quantization grid; ``keep`` (a pruner's
mask) pins the masked-out weights to zero on the way, so their error is spread too and they stay zero.
:func:`prune_columns` (SparseGPT) settles a block by zeroing the weights a mask drops, choosing an N:M mask as it
goes.
``sweep_torch`` is the reference (any device). On CUDA a Triton kernel does the same (without ``keep``) in one
launch per block: rows are independent, so each program takes a tile of rows and walks the block's columns with
the tile in registers, instead of ~10 PyTorch launches per column.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from compress.sparsity import nm_mask

try:
    import triton
    import triton.language as tl

    try:
        from triton.language.extra import libdevice
    except ImportError:  # older Triton
        from triton.language.extra.cuda import libdevice
except ImportError:  # CPU-only installs
    triton = None


def lazy_sweep(W: torch.Tensor, U: torch.Tensor, block_size: int, settle: Callable[[int, int], torch.Tensor]) -> None:
    """Sweep ``W`` [R, C] (float32, updated in place) block by block: ``settle(i1, i2)`` settles columns
    [i1, i2) of the current ``W`` and returns their scaled errors [R, i2 - i1], which are then spread over the
    columns right of the block through ``U`` [C, C], the upper Cholesky factor of H^-1."""
    columns = W.shape[1]
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        err = settle(i1, i2)
        W[:, i2:].addmm_(err, U[i1:i2, i2:], alpha=-1)


def sweep_torch(W1: torch.Tensor, U1: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
                keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [R, B] and scaled errors [R, B] of the block ``W1`` [R, B] (float32, not modified).

    ``U1`` [B, B] is the block of the upper Cholesky factor of H^-1; ``scale`` / ``zero`` [R, B] are the
    quantization parameters of each column; where ``keep`` (bool [R, B]) is False the code is the zero point.
    """
    W1 = W1.clone()
    codes = torch.empty_like(W1)
    err = torch.empty_like(W1)
    for i in range(W1.shape[1]):
        w, s, z = W1[:, i], scale[:, i], zero[:, i]
        q = torch.clamp(torch.round(w / s) + z, 0, maxq)
        if keep is not None:
            q = torch.where(keep[:, i], q, z)
        codes[:, i] = q
        e = (w - (q - z) * s) / U1[i, i]
        W1[:, i:].addr_(e, U1[i, i:], alpha=-1)
        err[:, i] = e
    return codes, err


if triton is not None:

    @triton.jit
    def _sweep_kernel(w_ptr, u_ptr, s_ptr, z_ptr, q_ptr, e_ptr, rows, cols, stride_w, stride_u, stride_s,
                      stride_z, stride_q, stride_e, maxq, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.arange(0, BLOCK_C)
        rmask = r < rows
        cmask = c < cols
        w = tl.load(w_ptr + r[:, None] * stride_w + c[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        for i in range(0, cols):
            wi = tl.sum(tl.where(c[None, :] == i, w, 0.0), axis=1)
            si = tl.load(s_ptr + r * stride_s + i, mask=rmask, other=1.0)
            zi = tl.load(z_ptr + r * stride_z + i, mask=rmask, other=0.0)
            q = tl.minimum(tl.maximum(libdevice.rint(tl.math.div_rn(wi, si)) + zi, 0.0), maxq)
            d = tl.load(u_ptr + i * stride_u + i)
            e = tl.math.div_rn(wi - (q - zi) * si, d)
            u = tl.load(u_ptr + i * stride_u + c, mask=cmask & (c >= i), other=0.0)
            w = w - e[:, None] * u[None, :]
            tl.store(q_ptr + r * stride_q + i, q, mask=rmask)
            tl.store(e_ptr + r * stride_e + i, e, mask=rmask)


def sweep_triton(W1: torch.Tensor, U1: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sweep_torch` as one Triton launch (CUDA, float32, at most 256 columns)."""
    rows, cols = W1.shape
    W1, U1, scale, zero = (t.float().contiguous() for t in (W1, U1, scale, zero))
    codes = torch.empty_like(W1)
    err = torch.empty_like(W1)
    block_c = triton.next_power_of_2(cols)
    block_r = 16 if block_c <= 128 else 8
    _sweep_kernel[(triton.cdiv(rows, block_r),)](
        W1, U1, scale, zero, codes, err, rows, cols, W1.stride(0), U1.stride(0), scale.stride(0), zero.stride(0),
        codes.stride(0), err.stride(0), float(maxq), BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return codes, err


def prune_columns(W1: torch.Tensor, U1: torch.Tensor, keep: torch.Tensor | None = None, n: int = 0, m: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SparseGPT's settle: the block ``W1`` [R, B] (float32, not modified) with the weights outside ``keep`` set
    to zero one column at a time, each column's error spread over the block's columns to its right through ``U1``
    (the block of the upper Cholesky factor of H^-1), so the kept weights compensate. With ``m``, ``keep`` is
    chosen as the sweep reaches each run of ``m`` columns: the ``n`` weights of least saliency w^2 / [U1]_ii^2 in
    the run's current (updated) values go. Returns (pruned block, keep, scaled errors)."""
    W1 = W1.clone()
    keep = torch.ones_like(W1, dtype=torch.bool) if keep is None else keep.clone()
    err = torch.empty_like(W1)
    d = torch.diagonal(U1)
    for i in range(W1.shape[1]):
        if m and i % m == 0:
            keep[:, i : i + m] = nm_mask(W1[:, i : i + m] ** 2 / d[i : i + m] ** 2, n, m)
        e = torch.where(keep[:, i], 0.0, W1[:, i]) / d[i]
        W1[:, i:].addr_(e, U1[i, i:], alpha=-1)
        W1[:, i].masked_fill_(~keep[:, i], 0.0)  # exactly zero, not w - (w / d) * d
        err[:, i] = e
    return W1, keep, err


def round_columns(W1: torch.Tensor, U1: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
                  keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sweep_torch`, as the Triton kernel on CUDA (blocks of up to 256 columns, no ``keep``)."""
    if triton is not None and W1.is_cuda and W1.shape[1] <= 256 and keep is None:
        return sweep_triton(W1, U1, scale, zero, maxq)
    return sweep_torch(W1, U1, scale, zero, maxq, keep)
