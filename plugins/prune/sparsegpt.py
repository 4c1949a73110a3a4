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

from compress.solvers.hessian import asymmetric_start, damped_factors
from compress.solvers.sweep import lazy_sweep, prune_columns
from compress.sparsity import Pattern, unstructured_mask


@torch.no_grad()
def sparsegpt(weight: torch.Tensor, H: torch.Tensor, pattern: Pattern, sparsity: float, damp: float = 0.01,
              block_size: int = 128, label: str = "layer", cross: torch.Tensor | None = None,
              reference_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The pruned weight [out, in] (float32) and its mask (True: kept) of ``weight`` given its inputs' Hessian
    ``H`` [in, in]: N:M for a structured ``pattern``, else ``sparsity`` of each block of columns pruned.

    ``cross`` (C of :class:`compress.solvers.hessian.Hessian`) fits the uncompressed model's outputs, with
    ``reference_weight`` the layer as it is there (GPTAQ's asymmetric objective, as :func:`gptq` does)."""
    W = weight.to(torch.float32).clone()
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    L, U, _ = damped_factors(H, damp, label)
    if cross is not None:
        W_ref = W if reference_weight is None else reference_weight.to(W.device, torch.float32)
        W = asymmetric_start(W, H, L, cross, W_ref)
        W[:, dead] = 0
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
