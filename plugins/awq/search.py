"""AWQ's two searches as plain tensor math (Lin et al., arXiv 2306.00978).

* Scale candidates: s = mean|x|^r / mean(w_normalised)^(1-r) per input channel, for r on a grid (the
  "duo" scaling of the AWQ reference), normalised so that max(s) * min(s) = 1; plus s = 1.
* Clipping: for each group of weights, the shrink factor of its absolute maximum that minimises the error
  of the group's partial dot products on sample inputs; then rounds that judge each group by its whole
  row's output error, the other groups' errors included (errors of neighbouring groups correlate through
  the inputs, and the per-group objective cannot see it).

Output errors are measured through the inputs' second moments ``E[x x^T]``: for a weight change ``d``, the
mean square of ``x . d`` is ``d^T E[x x^T] d``, so no candidate is ever multiplied by the inputs themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from compress import quant
from compress.quant import IntScheme


def channel_weight_mean(weights: torch.Tensor, scheme: IntScheme) -> torch.Tensor:
    """Mean over rows of |w| normalised by its group's max: how large each input channel's weights are."""
    g = quant.group_view(weights.float().abs(), scheme)
    g = g / g.amax(dim=-1, keepdim=True).clamp(min=1e-8)
    return quant.ungroup(g, weights.shape).mean(dim=0)


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


def quadratic_error(delta: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``delta_g^T G_gg delta_g`` for ``delta`` [..., G, gs] and a Gram matrix's diagonal blocks [G, gs, gs]:
    per group, the mean square of its partial dot products with the inputs."""
    return (torch.einsum("...gk,gkl->...gl", delta, blocks) * delta).sum(dim=-1)


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> float:
    """The mean square output error of a weight change ``delta`` [out, in] for inputs with ``E[x x^T] = gram``."""
    return quadratic_error(delta.unsqueeze(1), gram.unsqueeze(0)).mean().item()


def diagonal_blocks(gram: torch.Tensor, gs: int) -> torch.Tensor:
    """The [G, gs, gs] diagonal blocks of a [in, in] Gram matrix."""
    g = gram.shape[0] // gs
    return gram.reshape(g, gs, g, gs).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


@torch.no_grad()
def clip_weight(weight: torch.Tensor, gram: torch.Tensor, scheme: IntScheme, grid: int = 20, max_shrink: float = 0.5,
                passes: int = 0, chunk_elements: int = 2**25) -> torch.Tensor:
    """``weight`` [out, in] with each group clipped to the range that best preserves its outputs once quantized,
    for inputs whose second moments are ``gram`` [in, in] (``E[x x^T]``).

    The range is [-m, m] with m a shrink of the group's max |w| (the AWQ search, which judges each group by its
    own partial dot products); for asymmetric schemes the two ends are then refined separately (one pass over
    each end with the other fixed), since a zero point lets the grid sit off-centre. ``passes`` more rounds then
    visit the groups of each row in turn and judge each one by the error of the whole row's output, the other
    groups' current errors included. Candidates are evaluated together, about ``chunk_elements`` at a time.

    A ragged last group is searched padded with zero weights and zero second moments: they add nothing to any
    error, and zero lies in every candidate range.
    """
    out_f, true_in = weight.shape
    in_f = scheme.padded_width(true_in)
    w = torch.nn.functional.pad(weight.float(), (0, in_f - true_in))
    gram = torch.nn.functional.pad(gram.float(), (0, in_f - true_in, 0, in_f - true_in))
    gs = scheme.group_size if scheme.granularity == "group" else in_f
    n_groups = in_f // gs
    blocks = diagonal_blocks(gram, gs)
    shrinks = 1 - torch.arange(int(max_shrink * grid), device=w.device, dtype=torch.float32).view(-1, 1, 1, 1) / grid
    rows = max(1, chunk_elements // (len(shrinks) * in_f))
    clipped = torch.empty_like(w)
    for r0 in range(0, out_f, rows):
        wg = w[r0 : r0 + rows].reshape(-1, n_groups, gs)  # [o, G, gs]
        lo, hi = _clip_search(wg, scheme, shrinks, weight.dtype, lambda d: quadratic_error(d, blocks))
        delta = _dequantized(wg, lo, hi, scheme, weight.dtype) - wg
        for _ in range(passes):
            for g in range(n_groups):
                cols = slice(g, g + 1)
                # the other groups' share of the row error's cross term: sum over h != g of G_gh delta_h
                cross = delta.reshape(-1, in_f) @ gram[:, g * gs : (g + 1) * gs] - delta[:, g] @ blocks[g]

                def row_error(d: torch.Tensor, g: int = g, cross: torch.Tensor = cross) -> torch.Tensor:
                    d = d[..., 0, :]
                    return ((d @ blocks[g]) * d + 2 * d * cross).sum(dim=-1, keepdim=True)

                lo[:, cols], hi[:, cols] = _clip_search(wg[:, cols], scheme, shrinks, weight.dtype, row_error,
                                                        (lo[:, cols], hi[:, cols], row_error(delta[:, cols])))
                fresh = _dequantized(wg[:, cols], lo[:, cols], hi[:, cols], scheme, weight.dtype)
                delta[:, cols] = fresh - wg[:, cols]
        clipped[r0 : r0 + rows] = torch.minimum(torch.maximum(wg, lo), hi).reshape(-1, in_f)
    return clipped[:, :true_in]


def _dequantized(wg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scheme: IntScheme,
                 dtype: torch.dtype) -> torch.Tensor:
    """``wg`` [o, G, gs] clipped to [lo, hi] (broadcasting, e.g. [F, o, G, 1]), rounded to nearest and
    dequantized."""
    cur = torch.minimum(torch.maximum(wg, lo), hi)
    scale, zero = quant.range_qparams(cur.amin(dim=-1), cur.amax(dim=-1), scheme, dtype)
    return quant.fake_quantize(cur, scale.unsqueeze(-1), zero.unsqueeze(-1), scheme.maxq)


def _clip_search(wg: torch.Tensor, scheme: IntScheme, shrinks: torch.Tensor, dtype: torch.dtype,
                 error: Callable[[torch.Tensor], torch.Tensor],
                 start: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of ``wg`` [o, G, gs], the range [lo, hi] (each [o, G, 1]) of least ``error(dequantized - wg)``
    among the shrinks [F, 1, 1, 1] of [-max|w|, max|w|], then (asymmetric schemes) of each end with the other
    fixed. From a ``start`` (lo, hi, its error), a candidate must beat it to replace it."""
    amax = wg.abs().amax(dim=-1, keepdim=True)
    lo, hi, best = start if start is not None else (None, None, None)
    stages = [lambda lo, hi: (-amax * shrinks, amax * shrinks)]
    if not scheme.symmetric:
        stages.append(lambda lo, hi: (wg.amin(dim=-1, keepdim=True) * shrinks, hi.expand_as(shrinks * hi)))
        stages.append(lambda lo, hi: (lo.expand_as(shrinks * lo), wg.amax(dim=-1, keepdim=True) * shrinks))
    for stage in stages:
        cand_lo, cand_hi = stage(lo, hi)  # [F, o, G, 1]
        err = error(_dequantized(wg, cand_lo, cand_hi, scheme, dtype) - wg)  # [F, o, G]
        k = err.argmin(dim=0, keepdim=True)
        k_err = err.gather(0, k)[0]
        pick_lo = cand_lo.gather(0, k.unsqueeze(-1))[0]
        pick_hi = cand_hi.gather(0, k.unsqueeze(-1))[0]
        if best is None:
            lo, hi, best = pick_lo, pick_hi, k_err
        else:
            better = (k_err < best).unsqueeze(-1)
            lo, hi = torch.where(better, pick_lo, lo), torch.where(better, pick_hi, hi)
            best = torch.minimum(k_err, best)
    return lo, hi
