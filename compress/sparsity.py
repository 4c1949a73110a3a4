"""Sparsity patterns and mask selection, shared by the pruners and the sparse storage formats.

A pattern is ``unstructured`` (any weights, a fraction of each row or of the layer) or ``N:M`` (N weights kept in
every M consecutive weights of a row, 2:4 being what NVIDIA's sparse tensor cores run). Masks are bool tensors
shaped like the weight, True where a weight is kept. The functions are pure: scores in, masks out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_NM = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class Pattern:
    """``n`` kept in every ``m`` consecutive weights of a row, or unstructured (``m`` = 0)."""

    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float:
        """The fraction pruned by an N:M pattern."""
        return 1 - self.n / self.m if self.m else float("nan")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.m else "unstructured"


def parse_pattern(text: str) -> Pattern:
    """``unstructured`` or ``N:M`` (0 < N < M); ValueError saying what is accepted otherwise."""
    if text == "unstructured":
        return Pattern()
    match = _NM.match(text)
    if not match:
        raise ValueError(f"structure {text!r} is neither 'unstructured' nor N:M such as '2:4'")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"structure {text!r}: N:M needs 0 < N < M (N weights kept in every M), got N={n}, M={m}")
    return Pattern(n, m)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest ``scores`` [rows, cols] in every ``m`` consecutive columns of each row (``m`` must
    divide cols); ties keep the lower column."""
    rows, cols = scores.shape
    grouped = scores.reshape(rows, cols // m, m)
    order = torch.argsort(grouped, dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(grouped, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(rows, cols)


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Prune the ``sparsity`` fraction of lowest ``scores`` [rows, cols], in each row (``per_row``) or over the
    whole tensor; exactly round(sparsity x count) weights go (ties: the lower index goes first)."""
    flat = scores.reshape(scores.shape[0], -1) if per_row else scores.reshape(1, -1)
    pruned = round(sparsity * flat.shape[1])
    keep = torch.ones_like(flat, dtype=torch.bool)
    if pruned:
        order = torch.argsort(flat, dim=-1, stable=True)
        keep.scatter_(-1, order[:, :pruned], False)
    return keep.reshape(scores.shape)


def select_mask(scores: torch.Tensor, pattern: Pattern, sparsity: float, per_row: bool = True) -> torch.Tensor:
    """The mask keeping the highest ``scores``: N:M for a structured ``pattern``, else ``sparsity`` pruned."""
    if pattern.structured:
        return nm_mask(scores, pattern.n, pattern.m)
    return unstructured_mask(scores, sparsity, per_row)


def follows(mask: torch.Tensor, pattern: Pattern) -> bool:
    """Whether ``mask`` keeps at most N in every M consecutive weights of each row (always, unstructured)."""
    if not pattern.structured:
        return True
    rows, cols = mask.shape
    if cols % pattern.m:
        return False
    return bool((mask.reshape(rows, cols // pattern.m, pattern.m).sum(-1) <= pattern.n).all())
