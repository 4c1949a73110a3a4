"""The ``corrected`` storage format: a compressed layer (its ``base``, in any format) plus a low-rank correction of
what compressing it lost, y = base(x) + x A^T B^T, with ``A`` [rank, in] and ``B`` [out, rank] in the model's dtype.
Written by the ``lowrank-correct`` method after a quantization step. The pair is LoRA-shaped (``A`` is LoRA's
``lora_A``, ``B`` its ``lora_B`` with a scale of 1).

The checkpoint stores the base's tensors under ``base.`` as its own format stores them, and the scheme records the
base's scheme inside this one, so any format can be corrected and loads as it always does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from compress.formats.base import CompressedLinear, KernelChoice
from compress.formats.registry import format_class
from compress.kernels.cuda_int4 import correction_scratch


class CorrectedLinear(CompressedLinear):
    """A compressed layer ``base`` with a low-rank correction: ``A`` [rank, in], ``B`` [out, rank]."""

    format = "corrected"

    def __init__(self, base: CompressedLinear, rank: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        super().__init__()
        self.in_features, self.out_features, self.rank = base.in_features, base.out_features, rank
        self.base = base
        self.register_buffer("A", torch.empty(rank, base.in_features, dtype=dtype, device=device))
        self.register_buffer("B", torch.empty(base.out_features, rank, dtype=dtype, device=device))
        # the fused decode kernel's scratch (not stored)
        self.register_buffer("scratch", correction_scratch(rank, device), persistent=False)

    @classmethod
    @torch.no_grad()
    def wrap(cls, base: CompressedLinear, A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype) -> CorrectedLinear:
        """``base`` corrected by ``B @ A`` (stored in ``dtype``)."""
        layer = cls(base, A.shape[0], dtype, A.device)
        layer.A.copy_(A)
        layer.B.copy_(B)
        return layer

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, scheme: dict[str, Any],
              dtype: torch.dtype, device: torch.device | str = "meta") -> CorrectedLinear:
        base_scheme = scheme.get("base")
        if not isinstance(base_scheme, dict) or "format" not in base_scheme:
            from compress.errors import CheckpointError

            raise CheckpointError("a 'corrected' layer's scheme names no base format; the config.json is broken")
        base = format_class(base_scheme["format"]).empty(in_features, out_features, bias, base_scheme, dtype, device)
        return cls(base, int(scheme["rank"]), dtype, device)

    def scheme(self) -> dict[str, Any]:
        return {"format": self.format, "rank": self.rank, "base": self.base.scheme()}

    @classmethod
    def kernel(cls, scheme: dict[str, Any], in_features: int, out_features: int) -> KernelChoice:
        base = format_class(scheme["base"]["format"]).kernel(scheme["base"], in_features, out_features)
        rank = scheme["rank"]
        if base.kernel == "cuda-int4-mma" and rank % 8 == 0 and in_features % 256 == 0:
            extra = f"the rank-{rank} correction added in the same launch"
        else:
            extra = f"the rank-{rank} correction as two more matmuls"
        return KernelChoice(base.kernel, f"{base.note}; {extra}" if base.note else extra)

    @classmethod
    def storage_note(cls, scheme: dict[str, Any], in_features: int, out_features: int) -> str | None:
        base = format_class(scheme["base"]["format"]).storage_note(scheme["base"], in_features, out_features)
        extra = f"rank-{scheme['rank']} correction: {scheme['rank'] * (in_features + out_features):,} more values"
        return f"{base}; {extra}" if base else extra

    def sparsity(self) -> float:
        return self.base.sparsity()

    def check_loaded(self) -> str | None:
        if not (torch.isfinite(self.A).all() and torch.isfinite(self.B).all()):
            return "non-finite correction factors"
        return self.base.check_loaded()

    def after_load(self) -> None:
        self.base.after_load()
        self.scratch = correction_scratch(self.rank, self.A.device)  # not stored: zero it, whatever loading left

    def correction(self) -> torch.Tensor:
        """B A [out, in] in float32."""
        return self.B.float() @ self.A.float()

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        weight = self.base.dequantized_weight(torch.float32) + self.correction()
        return weight.to(dtype or self.A.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B = self.A.to(x.dtype), self.B.to(x.dtype)
        fused = self.base.forward_with_correction(x, A, B, self.scratch)  # one launch where the base's kernel can
        return fused if fused is not None else self.base(x) + F.linear(F.linear(x, A), B)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
