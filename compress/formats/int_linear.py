"""The ``int`` storage format: k-bit integer weights (2-8 bits) with per-tensor / per-channel / per-group
scales, written by the int8, RTN, GPTQ and AWQ methods.

Buffers (the checkpoint's tensors for this layer):

* ``qweight``: codes packed along ``in`` (see :func:`compress.quant.pack`): uint8 [out, ceil(in/k)] with
  k = 4 codes a byte for 2-bit, 2 for 3- and 4-bit, 1 otherwise; 8-bit symmetric stores signed int8
  ``q - 128`` instead (absmax int8).
* ``scales``: [rows, groups] in the model dtype (rows is 1 for per-tensor quantization).
* ``zeros``: uint8 [rows, groups] zero points, asymmetric schemes only (symmetric ones use 2**(bits-1)).
* ``bias``: as the original layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from compress import quant
from compress.formats import CompressedLinear, register_format
from compress.kernels import dequant, gemv
from compress.linear import get_bias, get_weight
from compress.methods import MethodConfig
from compress.quant import IntScheme


@register_format
class IntLinear(CompressedLinear):
    """A linear layer whose weight is stored as k-bit integer codes with scales (and zero points)."""

    format = "int"
    rows_stack = True

    def __init__(self, in_features: int, out_features: int, scheme: IntScheme, bias: bool,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.int_scheme = scheme
        rows = 1 if scheme.granularity == "tensor" else out_features
        groups = scheme.groups_per_row(in_features)
        if self.signed_storage:
            qshape, qdtype = (out_features, in_features), torch.int8
        else:
            per = quant.codes_per_byte(scheme.bits)
            qshape, qdtype = (out_features, -(-in_features // per)), torch.uint8
        self.register_buffer("qweight", torch.empty(qshape, dtype=qdtype, device=device))
        self.register_buffer("scales", torch.empty(rows, groups, dtype=dtype, device=device))
        if scheme.symmetric:
            self.zeros = None
        else:
            self.register_buffer("zeros", torch.empty(rows, groups, dtype=torch.uint8, device=device))
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    @property
    def signed_storage(self) -> bool:
        return self.int_scheme.bits == 8 and self.int_scheme.symmetric

    # -- building -------------------------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: IntScheme,
                   bias: torch.Tensor | None, dtype: torch.dtype) -> IntLinear:
        """Build from uint8 codes [out, in] and [rows, groups] scale / zero (zero ignored if symmetric)."""
        out_f, in_f = codes.shape
        layer = cls(in_f, out_f, scheme, bias is not None, dtype, device=codes.device)
        if layer.signed_storage:
            layer.qweight.copy_((codes.to(torch.int16) - scheme.sym_zero).to(torch.int8))
        else:
            layer.qweight.copy_(quant.pack(codes, scheme.bits))
        layer.scales.copy_(scale.to(dtype))
        if layer.zeros is not None:
            layer.zeros.copy_(zero.to(torch.uint8))
        if bias is not None:
            layer.bias.copy_(bias.detach().to(dtype))
        return layer

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, scheme: IntScheme,
                    dtype: torch.dtype, scale: torch.Tensor | None = None,
                    zero: torch.Tensor | None = None) -> IntLinear:
        """Round-to-nearest quantize a float [out, in] weight (min/max qparams unless given)."""
        if scale is None or zero is None:
            scale, zero = quant.qparams(weight, scheme, dtype)
        codes = quant.quantize_weight(weight, scale, zero, scheme)
        return cls.from_codes(codes, scale, zero, scheme, bias, dtype)

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, scheme: dict[str, Any],
              dtype: torch.dtype, device: torch.device | str = "meta") -> IntLinear:
        fields = {k: scheme[k] for k in ("bits", "symmetric", "granularity", "group_size", "restricted")}
        return cls(in_features, out_features, IntScheme(**fields), bias, dtype, device)

    def scheme(self) -> dict[str, Any]:
        return {"format": self.format, **self.int_scheme.to_dict()}

    # -- fast paths -----------------------------------------------------------------------------------

    def _gemv_group(self) -> int | None:
        """The group size the decode kernel (:mod:`compress.kernels.gemv`) takes this layer with: 0 for 8 bits
        per channel; None where it does not apply (2-bit codes, per-tensor scales, odd group sizes)."""
        s = self.int_scheme
        if s.bits == 8:
            return 0 if s.granularity == "channel" else None
        group = s.group_size if s.granularity == "group" else self.in_features
        if quant.codes_per_byte(s.bits) != 2 or s.granularity == "tensor" or not 32 <= group <= 1024:
            return None
        return group if group & (group - 1) == 0 else None

    # -- computing ------------------------------------------------------------------------------------

    def codes(self) -> torch.Tensor:
        """Unsigned codes [out, in] (uint8)."""
        if self.signed_storage:
            return (self.qweight.to(torch.int16) + self.int_scheme.sym_zero).to(torch.uint8)
        return quant.unpack(self.qweight, self.int_scheme.bits, self.in_features)

    def zero_points(self) -> torch.Tensor:
        if self.zeros is not None:
            return self.zeros.float()
        return torch.full(self.scales.shape, float(self.int_scheme.sym_zero), device=self.scales.device)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        s = self.int_scheme
        if dequant.available(self.qweight) and not self.signed_storage:
            group = s.group_size if s.granularity == "group" else self.in_features
            return dequant.dequantize(self.qweight, self.scales, self.zeros, s.bits, group, self.in_features,
                                      s.sym_zero, dtype or self.scales.dtype)
        return quant.dequantize_weight(self.codes(), self.scales, self.zero_points(), s, dtype or self.scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self._gemv_group()
        # a decode step on CUDA: read the codes once
        if group is not None and gemv.available(x, four_bit=group > 0):
            x2 = x.reshape(-1, self.in_features)
            if group == 0:
                y = gemv.gemv_8bit(x2, self.qweight, self.scales, self.zeros)
            else:
                y = gemv.gemv_int4(x2, self.qweight, self.scales, self.zeros, group, float(self.int_scheme.sym_zero))
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        if group == 0:
            return self._int8_channel_linear(x)
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def _int8_channel_linear(self, x: torch.Tensor) -> torch.Tensor:
        """8-bit per channel, many tokens: the matmul on the codes, scaled after it (one conversion pass)."""
        if self.signed_storage:
            centred = self.qweight.to(x.dtype)
        else:  # q - z lies in [-255, 255]: exact in bf16/fp16, and no cancellation after the matmul
            centred = self.qweight.to(x.dtype) - self.zeros.to(x.dtype)
        y = F.linear(x, centred) * self.scales.view(-1).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        s = self.int_scheme
        gran = f"group_size={s.group_size}" if s.granularity == "group" else s.granularity
        kind = "symmetric" if s.symmetric else "asymmetric"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={s.bits}, "
                f"{gran}, {kind}, bias={self.bias is not None}")


class IntWeightConfig(MethodConfig):
    """The arguments every method writing the ``int`` format shares (RTN, GPTQ, AWQ)."""

    bits: int = Field(4, ge=2, le=8, description="bits per weight")
    group_size: int | None = Field(128, ge=1, description="weights per scale along in_features; null: per channel")
    symmetric: bool = Field(True, description="fixed zero point (true) or a stored zero point per group (false)")

    def int_scheme(self) -> IntScheme:
        if self.group_size is None:
            return IntScheme(self.bits, self.symmetric, "channel", None)
        return IntScheme(self.bits, self.symmetric, "group", self.group_size)


def quantize_layer(layer: nn.Module, scheme: IntScheme, device: torch.device, scale: torch.Tensor | None = None,
                   zero: torch.Tensor | None = None, codes: torch.Tensor | None = None) -> IntLinear:
    """An IntLinear replacing ``layer`` (nn.Linear or Conv1D), computed on ``device`` and left where ``layer``
    was, with ``layer``'s bias and dtype.

    By default the weight is rounded to nearest with min/max qparams; ``scale``/``zero`` replace the qparams,
    and ``codes`` (uint8 [out, in], e.g. from GPTQ) replace the rounding too.
    """
    home, dtype = layer.weight.device, layer.weight.dtype
    bias = get_bias(layer)
    bias = None if bias is None else bias.to(device)
    if codes is not None:
        q = IntLinear.from_codes(codes.to(device), scale.to(device), zero.to(device), scheme, bias, dtype)
    else:
        q = IntLinear.from_weight(get_weight(layer).to(device), bias, scheme, dtype,
                                  None if scale is None else scale.to(device), None if zero is None else zero.to(device))
    return q.to(home)
