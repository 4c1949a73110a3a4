"""Truncated SVD of a layer's weight: the factors of its best rank-r approximation for the weight error (plain SVD),
or for the layer's output error on its calibration inputs (whitened, as in SVD-LLM, Wang et al. 2024).

With H = X^T X (the inputs' second moments, :class:`compress.solvers.hessian.Hessian`) = L L^T, the output error of
W' is ||X (W - W')^T||^2 = ||(W - W') L||^2, so the best W' of rank r is the truncated SVD of W L, times L^-1.
The singular values are split evenly between the factors, which keeps both of them in range for a later
quantization step.
"""

from __future__ import annotations

import torch

from compress.solvers.hessian import damped_factors


def factor(weight: torch.Tensor, rank: int, H: torch.Tensor | None = None, damp: float = 0.01,
           label: str = "", energy: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [rank, in], B [out, rank]) in float32 with B A the best rank-``rank`` approximation of ``weight``
    [out, in]: for the weight error, or with ``H`` [in, in] for the output error (H damped by ``damp`` of its
    mean diagonal, more if it does not factor). With ``energy``, the rank is the smallest that keeps that fraction
    of the squared singular values (of the weight, or of the whitened weight), at most ``rank``."""
    W = weight.float()
    if H is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        rank = rank if energy is None else min(rank, rank_for_energy(S, energy))
        root = S[:rank].sqrt()
        return root[:, None] * Vh[:rank], U[:, :rank] * root
    L, _ = damped_factors(H.float(), damp, label)
    U, S, Vh = torch.linalg.svd(W @ L, full_matrices=False)
    rank = rank if energy is None else min(rank, rank_for_energy(S, energy))
    root = S[:rank].sqrt()
    A = torch.linalg.solve_triangular(L, root[:, None] * Vh[:rank], upper=False, left=False)  # (S^1/2 V^T) L^-1
    return A, U[:, :rank] * root


def allocate_ranks(spectra: dict[str, tuple[int, int, torch.Tensor]], ratio: float) -> dict[str, int]:
    """A rank for each layer, all factors together holding at most ``ratio`` of the layers' parameters.

    ``spectra`` maps each layer to (in, out, the squared singular values of its weight, or of its whitened weight,
    in decreasing order). Each layer starts at rank 1; the remaining budget goes greedily to the singular values
    that keep the most of their layer's energy (as a fraction of the layer's total) per parameter they cost
    (in + out), so that layers whose spectrum falls fast give up rank to those whose spectrum is flat. A layer never
    gets a rank whose factors would be as large as its dense weight."""
    budget = ratio * sum(i * o for i, o, _ in spectra.values()) - sum(i + o for i, o, _ in spectra.values())
    names, gains, costs = [], [], []
    for index, (name, (i, o, s2)) in enumerate(spectra.items()):
        cap = min(len(s2), (i * o - 1) // (i + o))
        tail = s2[1:cap].double() / s2.double().sum().clamp(min=1e-300)
        names.append(torch.full((len(tail),), index))
        gains.append(tail / (i + o))
        costs.append(torch.full((len(tail),), float(i + o), dtype=torch.float64))
    order = torch.cat(gains).argsort(descending=True, stable=True)
    taken = torch.cat(costs)[order].cumsum(0) <= budget
    picked = torch.bincount(torch.cat(names)[order][taken], minlength=len(spectra))
    return {name: 1 + int(n) for name, n in zip(spectra, picked)}


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest rank whose singular values (decreasing) hold at least ``energy`` of the squares' sum (at least
    1)."""
    s2 = singular_values.double().square()
    kept = s2.cumsum(0) / s2.sum().clamp(min=1e-300)
    return max(1, int((kept < energy - 1e-12).sum()) + 1)

