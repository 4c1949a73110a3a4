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
from dataclasses import dataclass

import torch

from compress import quant
from compress.errors import CalibrationError
from compress.quant import IntScheme

log = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 4


class Hessian:
    """Running H = 2/n * sum(x x^T) of a layer's inputs, in float32."""

    def __init__(self, columns: int, device: torch.device):
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)
        n = x.shape[0]
        self.H.mul_(self.count / (self.count + n))
        self.count += n
        x = x * (2 / self.count) ** 0.5
        self.H.addmm_(x.t(), x)


@dataclass
class GPTQResult:
    codes: torch.Tensor  # uint8 [out, in], original column order
    scale: torch.Tensor  # [out, groups] (model dtype)
    zero: torch.Tensor  # [out, groups] float32 integers
    damp: float  # the damping finally used (fraction of the mean diagonal)


def _inverse_cholesky(H: torch.Tensor, damp: float, label: str) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of H^-1, with damping raised tenfold until the factorisation succeeds."""
    mean_diag = torch.diag(H).mean()
    eye = torch.eye(H.shape[0], device=H.device)
    for attempt in range(MAX_DAMP_RETRIES + 1):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U, damp
        if attempt < MAX_DAMP_RETRIES:
            log.warning("%s: Hessian not positive definite with damp=%g; retrying with damp=%g", label, damp, damp * 10)
            damp *= 10
    raise CalibrationError(f"{label}: Hessian stays singular up to damp={damp:g}; the calibration data may be "
                           "too small or degenerate for this layer: give more samples, or ignore the layer")


def _group_qparams(w: torch.Tensor, scheme: IntScheme, dtype: torch.dtype, mse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    fn = quant.mse_qparams if mse else quant.qparams
    return fn(w, scheme, dtype)


@torch.no_grad()
def gptq(weight: torch.Tensor, H: torch.Tensor, scheme: IntScheme, dtype: torch.dtype, damp: float = 0.01,
         block_size: int = 128, act_order: bool = False, mse: bool = False, label: str = "layer") -> GPTQResult:
    """Quantize ``weight`` [out, in] with the GPTQ column sweep given its inputs' Hessian ``H`` [in, in]."""
    W = weight.to(torch.float32).clone()
    H = H.clone()
    out_f, columns = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    gs = scheme.group_size if scheme.granularity == "group" else columns
    scale = torch.empty(out_f, columns // gs, dtype=torch.float32, device=W.device)  # values exact in dtype
    zero = torch.empty_like(scale)
    perm = None
    if act_order or scheme.granularity != "group":  # static qparams from the whole (original) weight
        s, z = _group_qparams(W, scheme, dtype, mse)
        scale.copy_(s.float().expand_as(scale))
        zero.copy_(z.expand_as(zero))
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    U, damp = _inverse_cholesky(H, damp, label)
    group_of = ((perm if perm is not None else torch.arange(columns)) // gs).tolist()
    codes = torch.empty(out_f, columns, dtype=torch.float32, device=W.device)
    dynamic_groups = not act_order and scheme.granularity == "group"
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if dynamic_groups and col % gs == 0:  # qparams from the group's current (updated) weights
                current = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]
                s, z = _group_qparams(current, scheme, dtype, mse)
                scale[:, col // gs], zero[:, col // gs] = s[:, 0].float(), z[:, 0]
            s, z = scale[:, group_of[col]], zero[:, group_of[col]]
            w = W1[:, i]
            q = torch.clamp(torch.round(w / s) + z, 0, scheme.maxq)
            codes[:, col] = q
            err = (w - (q - z) * s) / U1[i, i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1)
            Err1[:, i] = err
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return GPTQResult(codes.to(torch.uint8), scale.to(dtype), zero, damp)
