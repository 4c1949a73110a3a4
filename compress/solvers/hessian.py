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


def damped_factors(H: torch.Tensor, damp: float, label: str, inverse: bool = False,
                   dead: torch.Tensor | None = None, order: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """The lower Cholesky factor L of H + damp * mean(diag H) * I, or with ``inverse`` the upper Cholesky factor U
    of its inverse (U^T U = (H + damp...)^-1, what GPTQ's and SparseGPT's sweeps walk), and the damping used: raised
    tenfold until the factorization succeeds. CalibrationError, naming ``label``, when none does. ``dead`` (bool
    [in]): inputs that are always zero, whose diagonal entries count as 1 (before the damping and its mean), as the
    sweeps' zeroed weights there need. With ``order`` (a permutation of the inputs), the factor is that of H with its
    rows and columns in that order (``dead`` given in that order too).

    U is never built from an explicit inverse: with J the matrix that reverses the inputs' order, U = J L'^-1 J where
    L' is the lower factor of J H J (a triangular solve against the identity, in place), so beside H it holds at most
    two [in, in] matrices (0.8 GB each at a 14,336-wide layer in float32), one for L. (``torch.cholesky_inverse``
    would be a third, and on CUDA a fourth: cuSOLVER's path clones its input.) The reordered H is gathered a few
    columns at a time into the factor's memory."""
    if inverse:
        order = (torch.arange(H.shape[0], device=H.device) if order is None else order).flip(0)
        dead = None if dead is None else dead.flip(0)
    diagonal = torch.diag(H) if order is None else torch.diag(H)[order]  # a copy: [in] floats
    diagonal = diagonal if dead is None else diagonal.masked_fill(dead, 1)
    mean_diag = diagonal.mean()
    for attempt in range(MAX_DAMP_RETRIES + 1):
        # column-major, as LAPACK and cuSOLVER factor in place (and as the functional calls return their factors)
        L = torch.empty_strided(H.shape, (1, H.shape[0]), dtype=H.dtype, device=H.device)
        if order is None:
            L.copy_(H)
        else:
            _gather(H, order, L)
        L.diagonal().copy_(diagonal + damp * mean_diag)
        info = torch.empty((), dtype=torch.int32, device=H.device)
        torch.linalg.cholesky_ex(L, out=(L, info))
        factored = int(info) == 0  # one host synchronisation
        if factored and not inverse:
            return L, damp
        if factored:
            U = torch.zeros_like(L)  # column-major, as L
            U.diagonal().fill_(1)
            torch.linalg.solve_triangular(L, U, upper=False, out=U)  # L'^-1, written over the identity
            del L
            _reverse(U.t().reshape(-1))  # J X J: a column-major matrix's storage, reversed (a view of U's memory)
            if bool(torch.isfinite(U.diagonal()).all()):
                return U, damp
        if attempt < MAX_DAMP_RETRIES:
            log.warning("%s: Hessian not positive definite with damp=%g; retrying with damp=%g", label, damp,
                        damp * 10)
            damp *= 10
    raise CalibrationError(f"{label}: Hessian stays singular up to damp={damp:g}; the calibration data may be "
                           "too small or degenerate for this layer: give more samples, or ignore the layer")


def _gather(H: torch.Tensor, order: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` = H with its rows and columns in ``order``, a few columns at a time. (``H[order[:, None], order]``
    materialises two [in, in] int64 index tensors on CUDA: 3.1 GB at 14,336 inputs, measured.)"""
    step = max(1, CHUNK_ELEMENTS // H.shape[0])
    for c in range(0, H.shape[0], step):
        out[:, c : c + step] = H.index_select(1, order[c : c + step]).index_select(0, order)


def _reverse(flat: torch.Tensor, chunk: int = CHUNK_ELEMENTS // 4) -> None:
    """Reverse the 1-D tensor ``flat`` in place, swapping its ends a chunk at a time (a chunk's copy at most)."""
    n = flat.numel()
    for a in range(0, n // 2, chunk):
        b = min(a + chunk, n // 2)
        front = flat[a:b].clone()
        flat[a:b] = flat[n - b : n - a].flip(0)
        flat[n - b : n - a] = front.flip(0)


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
    L = damped_factors(hessian.H, damp, label)[0]
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
