"""AWQ's two searches as plain tensor math (Lin et al., arXiv 2306.00978).

* Scale candidates: s = mean|x|^r / mean(w_normalised)^(1-r) per input channel, for r on a grid (the
  "duo" scaling of the AWQ reference), normalised so that max(s) * min(s) = 1; plus s = 1.
* Clipping: for each group of weights, the shrink factor of its absolute maximum that minimises the error
  of the group's partial dot products on sample inputs.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from compress import quant
from compress.quant import IntScheme


def channel_weight_mean(weights: torch.Tensor, scheme: IntScheme) -> torch.Tensor:
    """Mean over rows of |w| normalised by its group's max: how large each input channel's weights are."""
    g = quant.group_view(weights.float().abs(), scheme)
    g = g / g.amax(dim=-1, keepdim=True).clamp(min=1e-8)
    return g.reshape(weights.shape).mean(dim=0)


def scale_candidates(x_mean: torch.Tensor, w_mean: torch.Tensor, grid: int,
                     weight_exponents: list[float] | None = None) -> Iterator[torch.Tensor]:
    """The identity, then one scale vector per ratio r = i / grid: mean|x|^r / mean(w)^(1 - r), or, with
    ``weight_exponents``, mean|x|^r / mean(w)^b for each b given (a two-dimensional search)."""
    yield torch.ones_like(x_mean)
    for i in range(grid):
        r = i / grid
        for b in weight_exponents if weight_exponents is not None else [1 - r]:
            s = (x_mean.pow(r) / (w_mean.pow(b) + 1e-4)).clamp(min=1e-4)
            yield s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def clip_weight(weight: torch.Tensor, x: torch.Tensor, scheme: IntScheme, grid: int = 20, max_shrink: float = 0.5,
                rows_per_chunk: int = 128) -> torch.Tensor:
    """``weight`` [out, in] with each group clipped to the range that best preserves x @ w_group on the sample
    inputs ``x`` [n, in] once quantized.

    The range is [-m, m] with m a shrink of the group's max |w| (the AWQ search); for asymmetric schemes the
    two ends are then refined separately (one pass over each end with the other fixed), since a zero point
    lets the grid sit off-centre.
    """
    w = weight.float()
    out_f, in_f = w.shape
    gs = scheme.group_size if scheme.granularity == "group" else in_f
    xg = x.float().reshape(-1, in_f // gs, gs)  # [n, G, gs]
    shrinks = [1 - i / grid for i in range(int(max_shrink * grid))]
    clipped = torch.empty_like(w)
    for r0 in range(0, out_f, rows_per_chunk):
        wg = w[r0 : r0 + rows_per_chunk].reshape(-1, in_f // gs, gs)  # [o, G, gs]
        reference = torch.einsum("ngk,ogk->nog", xg, wg)
        amax = wg.abs().amax(dim=-1, keepdim=True)
        lo, hi = -amax, amax.clone()
        best_err = torch.full(amax.shape[:2], float("inf"), device=w.device)

        def search(candidates):
            nonlocal lo, hi, best_err
            for new_lo, new_hi in candidates:
                cur = torch.minimum(torch.maximum(wg, new_lo), new_hi)
                deq = quant.rtn_dequantized(cur.reshape(-1, in_f), scheme, weight.dtype).reshape(cur.shape)
                err = (torch.einsum("ngk,ogk->nog", xg, deq) - reference).pow(2).mean(dim=0)
                better = (err < best_err).unsqueeze(-1)
                best_err = torch.minimum(err, best_err)
                lo, hi = torch.where(better, new_lo, lo), torch.where(better, new_hi, hi)

        search((-amax * f, amax * f) for f in shrinks)
        if not scheme.symmetric:
            low_end, high_end = wg.amin(dim=-1, keepdim=True), wg.amax(dim=-1, keepdim=True)
            search((low_end * f, hi) for f in shrinks)
            search((lo, high_end * f) for f in shrinks)
        clipped[r0 : r0 + rows_per_chunk] = torch.minimum(torch.maximum(wg, lo), hi).reshape(-1, in_f)
    return clipped
