"""SparseGPT (Frantar & Alistarh, arXiv 2301.00774) as plain tensor math.

Given the Hessian H = 2/n * sum(x x^T) of a layer's inputs, :func:`sparsegpt` prunes a weight [out, in] in the
shared column sweep (:mod:`compress.solvers.sweep`): the columns are taken a block at a time; in each block the
mask is chosen (unstructured: the block's weights of least saliency w^2 / [H^-1]_ii, over all rows, so every
block is pruned to the same sparsity; N:M: each run of M columns as the sweep reaches it), and each pruned
weight's error is spread over the columns not yet settled through the inverse Hessian's Cholesky factor, so the
kept weights compensate. Lazy batch updates apply a block's errors to the columns right of it at once.
"""

from __future__ import annotations

import math

import torch

from compress.solvers.hessian import damped_factors
from compress.solvers.sweep import lazy_sweep, prune_columns
from compress.sparsity import Pattern, unstructured_mask


@torch.no_grad()
def sparsegpt(weight: torch.Tensor, H: torch.Tensor, pattern: Pattern, sparsity: float, damp: float = 0.01,
              block_size: int = 128, label: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """The pruned weight [out, in] (float32) and its mask (True: kept) of ``weight`` given its inputs' Hessian
    ``H`` [in, in]: N:M for a structured ``pattern``, else ``sparsity`` of each block of columns pruned.

    To fit the uncompressed model's outputs instead of the layer's own (GPTAQ's asymmetric objective, as for
    :func:`gptq`), pass the weight that best gives them (:func:`compress.solvers.hessian.original_target`)."""
    W = weight.to(torch.float32).clone()
    dead = torch.diag(H) == 0
    W[:, dead] = 0
    U, _ = damped_factors(H, damp, label, inverse=True, dead=dead)
    keep = torch.empty_like(W, dtype=torch.bool)

    def settle(i1: int, i2: int) -> torch.Tensor:
        chosen = None
        if not pattern.structured:
            saliency = W[:, i1:i2] ** 2 / torch.diagonal(U)[i1:i2] ** 2
            chosen = unstructured_mask(saliency, sparsity, per_row=False)
        W[:, i1:i2], keep[:, i1:i2], err = prune_columns(W[:, i1:i2], U[i1:i2, i1:i2], chosen, pattern.n, pattern.m)
        return err

    step = block_size if not pattern.structured else block_size // math.gcd(block_size, pattern.m) * pattern.m
    lazy_sweep(W, U, step, settle)  # N:M runs never straddle a block
    return W, keep
