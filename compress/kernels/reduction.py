"""Weight-only matmul for 8-bit weights (int8, fp8) that torch.compile turns into one kernel reading them once.

For a decode step (a few tokens) the matmul is bound by reading the weights. Written as ``F.linear(x,
w.to(bf16))``, inductor on CUDA materialises the converted bf16 weight and then calls cuBLAS, so every step
writes and re-reads twice the weight bytes: slower than bf16 itself. Written as a broadcast multiply and a sum
over the input features, inductor fuses the conversion into a single reduction kernel that reads the 8-bit
weight once. Eager execution and larger token counts keep ``F.linear`` (the broadcast would materialise
[tokens, out, in]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Up to this many tokens a compiled call takes the fused reduction.
FUSED_MAX_TOKENS = 4


def fuses(x: torch.Tensor) -> bool:
    """Whether :func:`weight_only_linear` takes the fused reduction for input ``x`` [..., in]."""
    return torch.compiler.is_compiling() and x.numel() <= FUSED_MAX_TOKENS * x.shape[-1]


def weight_only_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` in ``x``'s dtype for a weight [out, in] of any dtype (int8 codes, fp8, ...), with no
    scale applied: the caller scales the [..., out] result."""
    if fuses(x):
        return (x.unsqueeze(-2).float() * weight.float()).sum(dim=-1).to(x.dtype)
    return F.linear(x, weight.to(x.dtype))
