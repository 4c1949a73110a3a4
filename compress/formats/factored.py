"""The ``factored`` storage format: a linear layer as the product of two thin factors, W ~ B A, with ``A`` [rank, in]
and ``B`` [out, rank] in the model's dtype, stored and run as they are (two matmuls: x A^T, then B^T). Written by
the ``lowrank`` method with rank x (in + out) at most a fraction (under 1) of in x out: always smaller than the
dense layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from compress.formats.base import CompressedLinear, KernelChoice


class FactoredLinear(CompressedLinear):
    """A linear layer stored as two factors: ``A`` [rank, in] and ``B`` [out, rank]."""

    format = "factored"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.register_buffer("A", torch.empty(rank, in_features, dtype=dtype, device=device))
        self.register_buffer("B", torch.empty(out_features, rank, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None,
                     dtype: torch.dtype) -> FactoredLinear:
        layer = cls(A.shape[1], B.shape[0], A.shape[0], bias is not None, dtype, A.device)
        layer.A.copy_(A)
        layer.B.copy_(B)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, scheme: dict[str, Any],
              dtype: torch.dtype, device: torch.device | str = "meta") -> FactoredLinear:
        return cls(in_features, out_features, int(scheme["rank"]), bias, dtype, device)

    def scheme(self) -> dict[str, Any]:
        return {"format": self.format, "rank": self.rank}

    @classmethod
    def kernel(cls, scheme: dict[str, Any], in_features: int, out_features: int) -> KernelChoice:
        return KernelChoice(None, "runs as two matmuls through its factors (no kernel of its own)")

    @classmethod
    def storage_note(cls, scheme: dict[str, Any], in_features: int, out_features: int) -> str | None:
        if "ratio" not in scheme and "rank" not in scheme:
            return None
        rank = scheme.get("rank") or rank_for(in_features, out_features, scheme["ratio"])
        return f"rank {rank} of {min(in_features, out_features)}" if rank else None

    def check_loaded(self) -> str | None:
        if not (torch.isfinite(self.A).all() and torch.isfinite(self.B).all()):
            return "non-finite factors"
        return None

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.B.float() @ self.A.float()).to(dtype or self.A.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype),
                        None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")


def rank_for(in_features: int, out_features: int, ratio: float) -> int:
    """The largest rank whose factors hold at most ``ratio`` of the layer's in x out parameters (0: none does)."""
    return int(ratio * in_features * out_features // (in_features + out_features))
