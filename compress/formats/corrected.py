"""The ``corrected`` storage format: a compressed layer (its ``base``, in any format) plus a low-rank correction of
what compressing it lost, y = base(x) + x A^T B^T, with ``A`` [rank, in] and ``B`` [out, rank] in the model's dtype.
Written by the ``lowrank-correct`` method after a quantization step. The pair is LoRA-shaped (``A`` is LoRA's
``lora_A``, ``B`` its ``lora_B`` with a scale of 1).

The checkpoint stores the base's tensors under ``base.`` as its own format stores them, and the scheme records the
base's scheme inside this one, so any format can be corrected and loads as it always does. The pair is stored in the
model's dtype, or (``pair_bits``) as 8- or 4-bit codes under ``a.`` and ``b.``: at rank 32 a bf16 pair is 1.5% of a
Llama-3-8B layer's values but 27% of a 3-bit checkpoint of a model 384 wide.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from compress.errors import CheckpointError
from compress.formats.base import CompressedLinear, KernelChoice
from compress.formats.integer import IntLinear
from compress.formats.registry import format_class
from compress.kernels.cuda_int4 import correction_scratch
from compress.quant import IntScheme


def pair_schemes(bits: int, rank: int) -> tuple[IntScheme, IntScheme]:
    """How a pair stored in ``bits`` is quantized: ``A``'s rows in groups of 128, ``B``'s rows (``rank`` long) whole;
    symmetric, round to nearest."""
    return IntScheme(bits, True, "group", 128), IntScheme(bits, True, "group", rank)


def quantized_pair(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype, bits: int) -> tuple[IntLinear, IntLinear]:
    """``A`` and ``B`` rounded to ``bits`` as the ``corrected`` format stores them (``a``, ``b``: ``int`` layers
    whose dequantized weights are the pair it computes with)."""
    a_scheme, b_scheme = pair_schemes(bits, A.shape[0])
    return IntLinear.from_weight(A, None, a_scheme, dtype), IntLinear.from_weight(B, None, b_scheme, dtype)


class CorrectedLinear(CompressedLinear):
    """A compressed layer ``base`` with a low-rank correction: ``A`` [rank, in], ``B`` [out, rank], stored in the
    model's dtype, or with ``pair_bits`` as 8- or 4-bit codes (the ``int`` format: ``a`` and ``b``), from which
    ``A`` and ``B`` are computed once (kept, not stored)."""

    format = "corrected"

    def __init__(self, base: CompressedLinear, rank: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                 pair_bits: int | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = base.in_features, base.out_features, rank
        self.base = base
        self.pair_bits = pair_bits
        stored = pair_bits is None
        self.register_buffer("A", torch.empty(rank, base.in_features, dtype=dtype, device=device), persistent=stored)
        self.register_buffer("B", torch.empty(base.out_features, rank, dtype=dtype, device=device), persistent=stored)
        if not stored:
            a_scheme, b_scheme = pair_schemes(pair_bits, rank)
            self.a = IntLinear(base.in_features, rank, a_scheme, False, dtype, device)
            self.b = IntLinear(rank, base.out_features, b_scheme, False, dtype, device)
        # the fused decode kernel's scratch (not stored)
        self.register_buffer("scratch", correction_scratch(rank, device), persistent=False)

    @classmethod
    @torch.no_grad()
    def wrap(cls, base: CompressedLinear, A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype,
             pair_bits: int | None = None) -> CorrectedLinear:
        """``base`` corrected by ``B @ A``, stored in ``dtype`` or rounded to ``pair_bits``."""
        if pair_bits is not None:
            return cls.from_pair(base, *quantized_pair(A, B, dtype, pair_bits))
        layer = cls(base, A.shape[0], dtype, A.device)
        layer.A.copy_(A)
        layer.B.copy_(B)
        return layer

    @classmethod
    @torch.no_grad()
    def from_pair(cls, base: CompressedLinear, a: IntLinear, b: IntLinear) -> CorrectedLinear:
        """``base`` corrected by a pair already rounded (:func:`quantized_pair`)."""
        layer = cls(base, a.out_features, a.scales.dtype, a.qweight.device, a.int_scheme.bits)
        layer.a, layer.b = a, b
        layer._unpack_pair()
        return layer

    def _unpack_pair(self) -> None:
        self.A = self.a.dequantized_weight(self.A.dtype).to(self.A.device)
        self.B = self.b.dequantized_weight(self.B.dtype).to(self.B.device)

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, scheme: dict[str, Any],
              dtype: torch.dtype, device: torch.device | str = "meta") -> CorrectedLinear:
        base_scheme = scheme.get("base")
        if not isinstance(base_scheme, dict) or "format" not in base_scheme:
            raise CheckpointError("a 'corrected' layer's scheme names no base format; the config.json is broken")
        base = format_class(base_scheme["format"]).empty(in_features, out_features, bias, base_scheme, dtype, device)
        return cls(base, int(scheme["rank"]), dtype, device, scheme.get("pair_bits"))

    def scheme(self) -> dict[str, Any]:
        scheme = {"format": self.format, "rank": self.rank, "base": self.base.scheme()}
        return scheme if self.pair_bits is None else {**scheme, "pair_bits": self.pair_bits}

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
        extra = (f"rank-{scheme['rank']} correction: {scheme['rank'] * (in_features + out_features):,} more values"
                 f"{' in ' + str(scheme['pair_bits']) + ' bits' if scheme.get('pair_bits') else ''}")
        return f"{base}; {extra}" if base else extra

    def sparsity(self) -> float:
        return self.base.sparsity()

    def check_loaded(self) -> str | None:
        if self.pair_bits is not None:
            return self.a.check_loaded() or self.b.check_loaded() or self.base.check_loaded()
        if not (torch.isfinite(self.A).all() and torch.isfinite(self.B).all()):
            return "non-finite correction factors"
        return self.base.check_loaded()

    def after_load(self) -> None:
        self.base.after_load()
        if self.pair_bits is not None:
            self._unpack_pair()
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
