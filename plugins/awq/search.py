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


def scale_candidates(x_mean: torch.Tensor, w_mean: torch.Tensor, grid: int) -> Iterator[torch.Tensor]:
    """The identity, then one scale vector per ratio r = i / grid."""
    yield torch.ones_like(x_mean)
    for i in range(grid):
        r = i / grid
        s = (x_mean.pow(r) / (w_mean.pow(1 - r) + 1e-4)).clamp(min=1e-4)
        yield s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def clip_weight(weight: torch.Tensor, x: torch.Tensor, scheme: IntScheme, grid: int = 20, max_shrink: float = 0.5,
                rows_per_chunk: int = 128) -> torch.Tensor:
    """``weight`` [out, in] with each group clipped to the shrink of its max |w| that best preserves
    x @ w_group on the sample inputs ``x`` [n, in] once quantized."""
    w = weight.float()
    out_f, in_f = w.shape
    gs = scheme.group_size if scheme.granularity == "group" else in_f
    xg = x.float().reshape(-1, in_f // gs, gs)  # [n, G, gs]
    clipped = torch.empty_like(w)
    for r0 in range(0, out_f, rows_per_chunk):
        wg = w[r0 : r0 + rows_per_chunk].reshape(-1, in_f // gs, gs)  # [o, G, gs]
        reference = torch.einsum("ngk,ogk->nog", xg, wg)
        org_max = wg.abs().amax(dim=-1, keepdim=True)
        best_max = org_max.clone()
        best_err = torch.full(org_max.shape[:2], float("inf"), device=w.device)
        for i in range(int(max_shrink * grid)):
            max_val = org_max * (1 - i / grid)
            cur = torch.clamp(wg, -max_val, max_val)
            deq = quant.rtn_dequantized(cur.reshape(-1, in_f), scheme, weight.dtype).reshape(cur.shape)
            err = (torch.einsum("ngk,ogk->nog", xg, deq) - reference).pow(2).mean(dim=0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better.unsqueeze(-1), max_val, best_max)
        clipped[r0 : r0 + rows_per_chunk] = torch.clamp(wg, -best_max, best_max).reshape(-1, in_f)
    return clipped
