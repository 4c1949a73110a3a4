"""The ``int`` storage format: k-bit integer weights (2-8 bits) with per-tensor / per-channel / per-group
scales, written by the int8, RTN, GPTQ and AWQ methods; with the decode kernels' eligibility.

Buffers (the checkpoint's tensors for this layer):

* ``qweight``: codes packed along ``in`` (see :func:`compress.quant.pack`): uint8 [out, ceil(in'/k)] with
  k = 4 codes a byte for 2-bit, 2 for 3- and 4-bit, 1 otherwise, and in' the input width rounded up to whole
  groups (a ragged last group is stored padded with zero codes, so the decode kernels see whole groups; the
  padding multiplies zero-padded activations and is never part of the weight); 8-bit symmetric stores signed
  int8 ``q - 128`` instead (absmax int8).
* ``scales``: [rows, groups] in the model dtype (rows is 1 for per-tensor quantization).
* ``zeros``: uint8 [rows, groups] zero points, asymmetric schemes only (symmetric ones use 2**(bits-1)).
* ``bias``: as the original layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress import quant
from compress.formats.base import CompressedLinear, KernelChoice, learning
from compress.kernels import cuda_int4, dequant, gemv
from compress.linear import get_bias, get_weight
from compress.quant import IntScheme


def zero_points(scales: torch.Tensor, zeros: torch.Tensor | None, scheme: IntScheme) -> torch.Tensor:
    """The float zero point of each group: the stored ``zeros``, or the scheme's symmetric zero."""
    if zeros is not None:
        return zeros.float()
    return torch.full(scales.shape, float(scheme.sym_zero), device=scales.device)


def check_int_buffers(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, scheme: IntScheme,
                      signed: bool = False) -> str | None:
    """What is wrong with loaded ``int`` buffers (codes wider than ``scheme.bits``, zero points out of range,
    scales not finite and positive), or None; ``signed`` codes (absmax int8) take every byte value."""
    if not signed:
        per = quant.codes_per_byte(scheme.bits)
        width = 8 // per
        above = ((1 << width) - 1) ^ scheme.maxq  # the bits of a slot that a code of scheme.bits never sets
        mask = sum(above << (j * width) for j in range(per))
        if mask and torch.any(qweight & mask):
            return f"codes wider than the declared {scheme.bits} bits"
        if zeros is not None and torch.any(zeros > scheme.maxq):
            return f"zero points above {scheme.maxq}, the largest {scheme.bits}-bit code"
    if not torch.isfinite(scales).all() or not (scales > 0).all():
        return "scales that are not finite and positive"
    return None


def gemv_group(scheme: IntScheme, in_features: int) -> tuple[int | None, str]:
    """The group size the decode kernels (:mod:`compress.kernels.gemv`) take a layer with: 0 for 8 bits per
    channel; None where they do not apply, with the reason."""
    if scheme.bits == 8:
        if scheme.granularity == "channel":
            return 0, ""
        return None, f"8-bit codes with {scheme.granularity} scales (the 8-bit kernel takes one scale a row)"
    if quant.codes_per_byte(scheme.bits) != 2:
        return None, f"{scheme.bits}-bit codes (the 4-bit kernels take 3- and 4-bit codes, two a byte)"
    if scheme.granularity == "tensor":
        return None, "per-tensor scales (the kernels take a scale per row or per group)"
    group = scheme.group_size if scheme.granularity == "group" else in_features
    if not 32 <= group <= 1024 or group & (group - 1):
        return None, f"groups of {group} (the kernels take powers of two from 32 to 1024)"
    return group, ""


def decode_kernel(scheme: IntScheme, in_features: int, out_features: int) -> KernelChoice:
    """Which kernel a decode step of an ``int`` layer of this scheme and shape runs on CUDA (16-bit activations;
    the one place this is decided: :meth:`IntLinear.forward` and ``compress validate`` both ask it)."""
    group, why = gemv_group(scheme, in_features)
    if group is None:
        return KernelChoice(None, why)
    if group == 0:
        return KernelChoice("triton-8bit")
    if cuda_int4.shape_ok(1, out_features, scheme.padded_width(in_features), group):
        return KernelChoice("cuda-int4-mma")
    return KernelChoice("triton-int4", "the CUDA kernel wants out_features a multiple of 16, in_features of 128 and "
                        "groups of 128 times a power of two")


def ragged_note(scheme: IntScheme, in_features: int) -> str | None:
    """How a layer whose last group is ragged is stored (None when its groups are whole)."""
    if not scheme.ragged(in_features):
        return None
    whole, rest = divmod(in_features, scheme.group_size)
    return (f"a ragged last group ({in_features} = {whole} x {scheme.group_size} + {rest}), stored padded to "
            "whole groups")


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
            qshape, qdtype = (out_features, -(-scheme.padded_width(in_features) // per)), torch.uint8
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
        self._group = gemv_group(scheme, in_features)[0]

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
            padded = F.pad(codes, (0, scheme.padded_width(in_f) - in_f))  # a ragged last group's zero codes
            layer.qweight.copy_(quant.pack(padded, scheme.bits))
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
        return cls(in_features, out_features, int_scheme(scheme), bias, dtype, device)

    def scheme(self) -> dict[str, Any]:
        return {"format": self.format, **self.int_scheme.to_dict()}

    @classmethod
    def kernel(cls, scheme: dict[str, Any], in_features: int, out_features: int) -> KernelChoice:
        return decode_kernel(int_scheme(scheme), in_features, out_features)

    @classmethod
    def storage_note(cls, scheme: dict[str, Any], in_features: int, out_features: int) -> str | None:
        return ragged_note(int_scheme(scheme), in_features)

    # -- computing ------------------------------------------------------------------------------------

    def codes(self) -> torch.Tensor:
        """Unsigned codes [out, in] (uint8)."""
        if self.signed_storage:
            return (self.qweight.to(torch.int16) + self.int_scheme.sym_zero).to(torch.uint8)
        return quant.unpack(self.qweight, self.int_scheme.bits, self.in_features)

    def check_loaded(self) -> str | None:
        return check_int_buffers(self.qweight, self.scales, self.zeros, self.int_scheme, self.signed_storage)

    def zero_points(self) -> torch.Tensor:
        return zero_points(self.scales, self.zeros, self.int_scheme)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        s = self.int_scheme
        if dequant.available(self.qweight) and not self.signed_storage and not learning(self.scales):
            group = s.group_size if s.granularity == "group" else self.in_features
            return dequant.dequantize(self.qweight, self.scales, self.zeros, s.bits, group, self.in_features,
                                      s.sym_zero, dtype or self.scales.dtype)
        return quant.dequantize_weight(self.codes(), self.scales, self.zero_points(), s, dtype or self.scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = None if learning(self.scales) else self._group
        # a decode step on CUDA: read the codes once
        if group is not None and gemv.available(x, four_bit=group > 0):
            x2 = self._padded(x)
            if group == 0:
                y = gemv.gemv_8bit(x2, self.qweight, self.scales, self.zeros)
            else:
                y = gemv.gemv_int4(x2, self.qweight, self.scales, self.zeros, group, float(self.int_scheme.sym_zero))
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        if group == 0:
            return self._int8_channel_linear(x)
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as [tokens, in], widened with zeros to the codes' width where the last group is ragged (its
        padded codes meet zeros)."""
        x2 = x.reshape(-1, self.in_features)
        width = self.int_scheme.padded_width(self.in_features)
        return x2 if width == self.in_features else F.pad(x2, (0, width - self.in_features))

    def forward_with_correction(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                                scratch: torch.Tensor) -> torch.Tensor | None:
        group = self._group
        if not group or not gemv.available(x, four_bit=True) or learning(self.scales, A, B):
            return None
        x2 = self._padded(x)
        if x2.shape[1] != A.shape[1]:  # a ragged layer: the correction's columns stop where the layer's do
            A = F.pad(A, (0, x2.shape[1] - A.shape[1]))
        y = gemv.gemv_int4_corrected(x2, self.qweight, self.scales, self.zeros, group,
                                     float(self.int_scheme.sym_zero), A, B, scratch)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

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


def int_scheme(scheme: dict[str, Any]) -> IntScheme:
    """The integer scheme of a stored per-layer scheme (what ``IntLinear.scheme`` writes)."""
    return IntScheme(**{k: scheme[k] for k in ("bits", "symmetric", "granularity", "group_size", "restricted")})
