"""A layer's input second moments H = 2/n * sum(x^T x): the Hessian of its squared output error, which GPTQ,
SparseGPT and activation-aware low-rank methods all start from; and its damped Cholesky factors.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from compress.errors import CalibrationError
from compress.linear import linear_shape

if TYPE_CHECKING:
    from compress.calibration.engine import BlockWork

log = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 4
CHUNK_ELEMENTS = 2**24  # inputs are added in float32 chunks of this many elements (64 MB)


class Hessian:
    """Running H = 2/n * sum(x^T x) of a layer's inputs x [n, in], in float32.

    With ``cross`` it also keeps C = 2/n * sum(x_reference^T x) from the inputs the layer has in the
    uncompressed model (``x_reference``, row for row), for the asymmetric objective ||x_reference W^T - x Q^T||.
    """

    def __init__(self, columns: int, device: torch.device, cross: bool = False):
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.C = torch.zeros_like(self.H) if cross else None
        self.count = 0

    def add(self, x: torch.Tensor, x_reference: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1])
        n = x.shape[0]
        self.H.mul_(self.count / (self.count + n))
        if self.C is not None:
            self.C.mul_(self.count / (self.count + n))
            x_reference = x_reference.reshape(-1, x.shape[-1])
        self.count += n
        scale = (2 / self.count) ** 0.5
        step = max(256, CHUNK_ELEMENTS // x.shape[1])  # float32 copies of a few rows at a time, not of the batch
        for i in range(0, n, step):
            rows = x[i : i + step].to(self.H.device, torch.float32) * scale  # never in place: x may be float32
            self.H.addmm_(rows.t(), rows)
            if self.C is not None:
                reference = x_reference[i : i + step].to(self.H.device, torch.float32) * scale
                self.C.addmm_(reference.t(), rows)


def damped_factors(H: torch.Tensor, damp: float, label: str, inverse: bool = True, lower: bool = True,
                   dead: torch.Tensor | None = None, order: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
    """Lower Cholesky factor L of H + damp * mean(diag H) * I (if ``lower``), the upper Cholesky factor of its
    inverse (if ``inverse``), and the damping used: raised tenfold until both factorizations succeed (a nearly
    singular H can factor and still give an inverse that does not). CalibrationError, naming ``label``, when none
    does. ``dead`` (bool [in]): inputs that are always zero, whose diagonal entries count as 1 (before the damping
    and its mean), as the sweeps' zeroed weights there need. With ``order`` (a permutation of the inputs), the
    factors are those of H with its rows and columns in that order (``dead`` given in that order too).

    Beside H it holds at most two [in, in] matrices (the factors are computed in place, a permuted H gathered straight
    into the first; 0.8 GB each at a 14,336-wide layer in float32), one when only the inverse's factor is asked for."""
    diagonal = torch.diag(H) if order is None else torch.diag(H)[order]  # a copy: [in] floats
    diagonal = diagonal if dead is None else diagonal.masked_fill(dead, 1)
    mean_diag = diagonal.mean()
    for attempt in range(MAX_DAMP_RETRIES + 1):
        # column-major, as LAPACK and cuSOLVER factor in place (and as the functional calls return their factors)
        if order is None:
            L = torch.empty_strided(H.shape, (1, H.shape[0]), dtype=H.dtype, device=H.device).copy_(H)
        else:  # gathered straight into column-major order: the row-major gather of H^T, transposed
            L = H.t()[order[:, None], order].t()
        L.diagonal().copy_(diagonal + damp * mean_diag)
        info = torch.empty((), dtype=torch.int32, device=H.device)
        torch.linalg.cholesky_ex(L, out=(L, info))
        U = None
        if int(info) == 0 and inverse:
            U = torch.cholesky_inverse(L)
            if not lower:
                L = None
            torch.linalg.cholesky_ex(U, upper=True, out=(U, info))
        if int(info) == 0:
            return L if lower else None, U, damp
        if attempt < MAX_DAMP_RETRIES:
            log.warning("%s: Hessian or its inverse not positive definite with damp=%g; retrying with damp=%g",
                        label, damp, damp * 10)
            damp *= 10
    raise CalibrationError(f"{label}: Hessian stays singular up to damp={damp:g}; the calibration data may be "
                           "too small or degenerate for this layer: give more samples, or ignore the layer")


def original_target(weight: torch.Tensor, hessian: Hessian, reference: torch.Tensor, damp: float,
                    label: str) -> torch.Tensor:
    """The float32 weight that best gives the uncompressed model's outputs (``reference`` on its own inputs) from the
    compressed model's inputs (GPTAQ's asymmetric objective ||x_ref W_ref^T - x W^T||, with ``hessian``'s H and C):
    W + (W_ref C - W H) (H + damp)^-1, H damped by ``damp`` of its mean diagonal. When nothing upstream changed
    (x = x_ref, W = W_ref) that is W. Rows are independent: the weights of layers that share ``hessian`` can be
    passed stacked. ``hessian.C`` is used up (set to None: an [in, in] matrix less before H is factored)."""
    target = reference.float() @ hessian.C
    target -= weight.float() @ hessian.H
    hessian.C = None
    L = damped_factors(hessian.H, damp, label, inverse=False)[0]
    target = torch.cholesky_solve(target.t(), L).t()
    del L
    return target.add_(weight.float())


def block_hessians(work: BlockWork, groups: list[list[str]], cross: bool) -> list[Hessian]:
    """One Hessian per layer group of a block, from the inputs of its first layer (the group's layers read the
    same input), on one pass over the calibration batches; with ``cross``, from the block's inputs paired with
    the uncompressed block's (``work.reference``)."""
    hessians = {g[0]: Hessian(linear_shape(work.targets[g[0]])[0], work.device, cross) for g in groups}
    leaders = {g[0]: work.targets[g[0]] for g in groups}
    if cross:
        work.collect_input_pairs(leaders, lambda name, x_ref, x: hessians[name].add(x, x_ref))
    else:
        work.collect_inputs(leaders, lambda name, x: hessians[name].add(x))
    return [hessians[g[0]] for g in groups]
