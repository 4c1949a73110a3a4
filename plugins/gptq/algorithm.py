"""GPTQ (Frantar et al., arXiv 2210.17323) as plain tensor math.

``Hessian.add`` accumulates H = 2/n * sum(x x^T) over a layer's inputs; :func:`gptq` quantizes a weight
[out, in] column by column, spreading each column's rounding error over the columns not yet quantized
through the inverse Hessian's Cholesky factor, with lazy batch updates every ``block_size`` columns.

Options: damping (a fraction of the mean diagonal, raised tenfold on a failed Cholesky), activation order
with static groups (group scales come from the whole original weight, so storage stays in the original
column order and inference needs no permutation), and an MSE search of each group's clipping range.
Dead inputs (always zero) get zero weights.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from compress import quant
from compress.errors import CalibrationError
from compress.quant import IntScheme
from compress.plugins.gptq.sweep import sweep

log = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 4


class Hessian:
    """Running H = 2/n * sum(x^T x) of a layer's inputs x [n, in], in float32.

    With ``x_reference`` (the inputs the layer has in the uncompressed model, row for row) it also keeps
    C = 2/n * sum(x_reference^T x), for the asymmetric objective ||x_reference W^T - x Q^T||.
    """

    def __init__(self, columns: int, device: torch.device, cross: bool = False):
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.C = torch.zeros_like(self.H) if cross else None
        self.count = 0

    def add(self, x: torch.Tensor, x_reference: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)
        n = x.shape[0]
        keep = self.count / (self.count + n)
        self.count += n
        x = x * (2 / self.count) ** 0.5
        self.H.mul_(keep).addmm_(x.t(), x)
        if self.C is not None:
            xr = x_reference.reshape(-1, x.shape[-1]).to(self.H.device, torch.float32) * (2 / self.count) ** 0.5
            self.C.mul_(keep).addmm_(xr.t(), x)


@dataclass
class GPTQResult:
    codes: torch.Tensor  # uint8 [out, in], original column order
    scale: torch.Tensor  # [out, groups] (model dtype)
    zero: torch.Tensor  # [out, groups] float32 integers
    damp: float  # the damping finally used (fraction of the mean diagonal)


def _damped_factors(H: torch.Tensor, damp: float, label: str,
                    inverse: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """Lower Cholesky factor L of H + damp * mean(diag H) * I, the upper Cholesky factor of its inverse (if
    ``inverse``), and the damping used: raised tenfold until both factorizations succeed (a nearly singular
    H can factor and still give an inverse that does not)."""
    mean_diag = torch.diag(H).mean()
    eye = torch.eye(H.shape[0], device=H.device)
    for attempt in range(MAX_DAMP_RETRIES + 1):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        U = None
        if int(info) == 0 and inverse:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        if int(info) == 0:
            return L, U, damp
        if attempt < MAX_DAMP_RETRIES:
            log.warning("%s: Hessian or its inverse not positive definite with damp=%g; retrying with damp=%g",
                        label, damp, damp * 10)
            damp *= 10
    raise CalibrationError(f"{label}: Hessian stays singular up to damp={damp:g}; the calibration data may be "
                           "too small or degenerate for this layer: give more samples, or ignore the layer")


def _group_qparams(w: torch.Tensor, scheme: IntScheme, dtype: torch.dtype, mse: bool,
                   importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max qparams, or with ``mse`` the clipping range of least error weighted by ``importance``."""
    if mse:
        return quant.mse_qparams(w, scheme, dtype, importance=importance)
    return quant.qparams(w, scheme, dtype)


@torch.no_grad()
def gptq(weight: torch.Tensor, H: torch.Tensor, scheme: IntScheme, dtype: torch.dtype, damp: float = 0.01,
         block_size: int = 128, act_order: bool = False, mse: bool = False, label: str = "layer",
         cross: torch.Tensor | None = None, reference_weight: torch.Tensor | None = None) -> GPTQResult:
    """Quantize ``weight`` [out, in] with the GPTQ column sweep given its inputs' Hessian ``H`` [in, in].

    ``cross`` (C of :class:`Hessian`) switches to the asymmetric objective ||x_ref W_ref^T - x Q^T||, with
    ``reference_weight`` W_ref (default: ``weight``) the layer as it is in the uncompressed model: the sweep
    then starts from W + (W_ref C - W H) (H + damp)^-1, the best unquantized weight for the layer's actual
    inputs (GPTAQ). When nothing upstream changed (x = x_ref, W = W_ref) that is W itself.
    """
    W = weight.to(torch.float32).clone()
    H = H.clone()
    out_f, columns = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    L, U, damp = _damped_factors(H, damp, label, inverse=perm is None)
    if cross is not None:
        W_ref = W if reference_weight is None else reference_weight.to(W.device, torch.float32)
        W += torch.cholesky_solve((W_ref @ cross - W @ H).t(), L).t()
        W[:, dead] = 0
    gs = scheme.group_size if scheme.granularity == "group" else columns
    scale = torch.empty(out_f, columns // gs, dtype=torch.float32, device=W.device)  # values exact in dtype
    zero = torch.empty_like(scale)
    dynamic_groups = not act_order and scheme.granularity == "group"
    if not dynamic_groups:  # static qparams from the whole weight, before any update
        s, z = _group_qparams(W, scheme, dtype, mse, torch.diag(H))
        scale.copy_(s.float().expand_as(scale))
        zero.copy_(z.expand_as(zero))
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
        _, U, damp = _damped_factors(H, damp, label)
    group_of = (perm if perm is not None else torch.arange(columns, device=W.device)) // gs
    codes = torch.empty(out_f, columns, dtype=torch.float32, device=W.device)
    step = math.gcd(gs, block_size) if dynamic_groups else block_size  # dynamic groups start a block
    for i1 in range(0, columns, step):
        i2 = min(i1 + step, columns)
        if dynamic_groups and i1 % gs == 0:  # qparams from the group's current (updated) weights
            s, z = _group_qparams(W[:, i1 : i1 + gs], scheme, dtype, mse, torch.diag(H)[i1 : i1 + gs])
            scale[:, i1 // gs], zero[:, i1 // gs] = s[:, 0].float(), z[:, 0]
        g = group_of[i1:i2]
        block_codes, err = sweep(W[:, i1:i2], U[i1:i2, i1:i2], scale[:, g], zero[:, g], scheme.maxq)
        codes[:, i1:i2] = block_codes
        W[:, i2:].addmm_(err, U[i1:i2, i2:], alpha=-1)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return GPTQResult(codes.to(torch.uint8), scale.to(dtype), zero, damp)
