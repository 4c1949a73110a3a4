"""Sparse storage formats: what a pruned layer is stored as, so that its checkpoint is smaller than the dense one.

- ``sparse24``: a 2:4 layer as its kept values [out, in / 2] and their positions, two 2-bit indices per run of
  four weights (a byte holds two runs): 0.5625x the bf16 bytes.
- ``sparse24-int``: a 2:4 layer whose weights are integer codes (GPTQ after a 2:4 pruner): only the kept codes,
  packed, with the positions and the group scales of the ``int`` format (a group spans ``group_size`` of the
  original columns): 2:4 + 4-bit is about 0.16x bf16.
- ``bitmask``: an unstructured layer as a bit per weight (kept or not) and the kept values in row order, 0.5625x
  bf16 at 50%. No GPU kernel multiplies it faster than dense: it is unpacked once, when built or loaded, runs as a
  dense weight, and is packed again when saved.

On CUDA the two 2:4 formats run their own kernels (:mod:`compress.kernels.sparse24`): decode steps read the
compressed bytes once; prefill rebuilds the dense weight in one pass for cuBLAS. Elsewhere (CPU) they rebuild the
dense weight at each call.

A layer the recipe leaves masked (pruned, not stored in another format) is stored in one of these at the end of
the recipe (:func:`sparse_layer`), a 2:4 mask as ``sparse24``, any other as ``bitmask``; an ``int`` layer with a
2:4 mask as ``sparse24-int``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress import quant
from compress.formats.base import CompressedLinear, KernelChoice, learning
from compress.formats.integer import IntLinear, check_int_buffers, int_scheme, zero_points
from compress.kernels import sparse24
from compress.linear import get_bias, get_weight
from compress.sparsity import Pattern, follows

TWO_FOUR = Pattern(2, 4)
SPARSE_FORMATS = ("sparse24", "sparse24-int", "bitmask")


# -- 2:4 positions ---------------------------------------------------------------------------------------------

def positions_24(keep: torch.Tensor) -> torch.Tensor:
    """The two kept columns of each run of four (bool [out, in], at most two kept per run: runs keeping fewer
    are filled with the lowest pruned columns, whose values are zero) as indices 0-3, int64 [out, in / 2]."""
    rows, cols = keep.shape
    runs = keep.reshape(rows, cols // 4, 4)
    order = torch.argsort((~runs).to(torch.int8), dim=-1, stable=True)[..., :2]  # kept first, then lowest columns
    return order.sort(dim=-1).values.reshape(rows, cols // 2)


def pack_positions(index: torch.Tensor) -> torch.Tensor:
    """Indices 0-3 [out, in / 2] (two per run) as bytes [out, ceil(in / 8)]: a run's two indices in a nibble
    (first in bits 0-1), two runs per byte (the earlier in the low nibble)."""
    rows, half = index.shape
    nibbles = (index[:, 0::2] | (index[:, 1::2] << 2)).to(torch.uint8)  # [out, runs]
    nibbles = F.pad(nibbles, (0, nibbles.shape[1] % 2))
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def unpack_positions(meta: torch.Tensor, in_features: int) -> torch.Tensor:
    """:func:`pack_positions` undone: int64 [out, in / 2]."""
    nibbles = torch.stack([meta & 0xF, meta >> 4], dim=-1).reshape(meta.shape[0], -1)[:, : in_features // 4]
    return torch.stack([nibbles & 0x3, nibbles >> 2], dim=-1).reshape(meta.shape[0], -1).long()


def scatter_24(kept: torch.Tensor, index: torch.Tensor, in_features: int, fill: float = 0.0) -> torch.Tensor:
    """Kept entries [out, in / 2] at their positions in a dense [out, in], the rest ``fill``."""
    rows = kept.shape[0]
    columns = (index.reshape(rows, -1, 2) + torch.arange(0, in_features, 4, device=index.device)[None, :, None])
    dense = torch.full((rows, in_features), fill, dtype=kept.dtype, device=kept.device)
    return dense.scatter_(1, columns.reshape(rows, -1), kept)


def gather_24(dense: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The entries of ``dense`` [out, in] at the kept positions: [out, in / 2]."""
    rows, cols = dense.shape
    columns = index.reshape(rows, -1, 2) + torch.arange(0, cols, 4, device=index.device)[None, :, None]
    return dense.gather(1, columns.reshape(rows, -1))


# -- formats ---------------------------------------------------------------------------------------------------

def _kernel_group(scheme: quant.IntScheme, in_features: int) -> int | None:
    """The group width the 2:4 integer kernel takes a layer of ``scheme`` with, or None where it does not apply:
    codes two a byte (3 and 4 bits), one scale a row or groups whose width is a multiple of 8 (a byte of
    positions covers 8 columns, which must share a scale)."""
    if quant.codes_per_byte(scheme.bits) != 2:
        return None
    if scheme.granularity == "channel":
        return in_features
    if scheme.granularity == "group" and scheme.group_size % 8 == 0:
        return scheme.group_size
    return None


def _shaped(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A kernel's output [tokens, out] in ``x``'s leading shape, plus ``bias``."""
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y if bias is None else y + bias


class Sparse24Linear(CompressedLinear):
    """A 2:4 sparse linear layer: the kept values and their 2-bit positions."""

    format = "sparse24"
    rows_stack = True

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("values", torch.empty(out_features, in_features // 2, dtype=dtype, device=device))
        self.register_buffer("meta", torch.empty(out_features, -(-in_features // 8), dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_dense(cls, weight: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor | None) -> Sparse24Linear:
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, bias is not None, weight.dtype, weight.device)
        index = positions_24(keep)
        layer.values.copy_(gather_24(torch.where(keep, weight, 0), index))
        layer.meta.copy_(pack_positions(index))
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, scheme: dict[str, Any],
              dtype: torch.dtype, device: torch.device | str = "meta") -> Sparse24Linear:
        return cls(in_features, out_features, bias, dtype, device)

    def scheme(self) -> dict[str, Any]:
        return {"format": self.format, "structure": "2:4"}

    @classmethod
    def kernel(cls, scheme: dict[str, Any], in_features: int, out_features: int) -> KernelChoice:
        return KernelChoice("sparse24", f"up to {sparse24.MAX_TOKENS} tokens; more (prefill) rebuild the dense "
                            "weight in one pass for cuBLAS")

    def sparsity(self) -> float:
        return 0.5

    def check_loaded(self) -> str | None:
        index = unpack_positions(self.meta, self.in_features).reshape(self.out_features, -1, 2)
        if not (index[..., 0] < index[..., 1]).all():
            return "2:4 positions that are not two distinct columns in increasing order"
        return None

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        weight = scatter_24(self.values, unpack_positions(self.meta, self.in_features), self.in_features)
        return weight if dtype is None else weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if sparse24.available(x) and x.dtype == self.values.dtype:  # a decode step: read the kept values once
            y = sparse24.gemv_24(x.reshape(-1, self.in_features), self.values, self.meta)
            return _shaped(y, x, self.bias)
        if sparse24.decompresses(x) and x.dtype == self.values.dtype:  # prefill: one pass to a dense weight
            return F.linear(x, sparse24.decompress_24(self.values, self.meta, self.in_features), self.bias)
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 2:4, bias={self.bias is not None}"


class Sparse24IntLinear(CompressedLinear):
    """A 2:4 sparse layer of integer codes: the kept codes packed as the ``int`` format packs codes, their
    positions as ``sparse24`` stores them, and the ``int`` format's scales (and zero points) per group of the
    original columns."""

    format = "sparse24-int"
    rows_stack = True

    def __init__(self, in_features: int, out_features: int, scheme: quant.IntScheme, bias: bool,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.int_scheme = scheme
        per = quant.codes_per_byte(scheme.bits)
        rows = 1 if scheme.granularity == "tensor" else out_features
        groups = scheme.groups_per_row(in_features)
        self.register_buffer("qweight", torch.empty(out_features, -(-(in_features // 2) // per), dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("meta", torch.empty(out_features, -(-in_features // 8), dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(rows, groups, dtype=dtype, device=device))
        self.register_buffer("zeros", None if scheme.symmetric else
                             torch.empty(rows, groups, dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_int(cls, layer: IntLinear, keep: torch.Tensor) -> Sparse24IntLinear:
        """``layer``'s codes at the positions of its 2:4 mask ``keep`` (the pruned codes are its zero points)."""
        s = layer.int_scheme
        new = cls(layer.in_features, layer.out_features, s, layer.bias is not None, layer.scales.dtype,
                  layer.scales.device)
        index = positions_24(keep.to(layer.scales.device))
        new.qweight.copy_(quant.pack(gather_24(layer.codes(), index), s.bits))
        new.meta.copy_(pack_positions(index))
        new.scales.copy_(layer.scales)
        if new.zeros is not None:
            new.zeros.copy_(layer.zeros)
        if new.bias is not None:
            new.bias.copy_(layer.bias)
        return new

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, scheme: dict[str, Any],
              dtype: torch.dtype, device: torch.device | str = "meta") -> Sparse24IntLinear:
        return cls(in_features, out_features, int_scheme(scheme), bias, dtype, device)

    def scheme(self) -> dict[str, Any]:
        return {"format": self.format, "structure": "2:4", **self.int_scheme.to_dict()}

    @classmethod
    def kernel(cls, scheme: dict[str, Any], in_features: int, out_features: int) -> KernelChoice:
        s = int_scheme(scheme)
        if _kernel_group(s, in_features) is None:
            return KernelChoice(None, f"{s.bits}-bit codes with {s.granularity} scales run as a dense weight rebuilt "
                                "at each call (the 2:4 kernel takes 3- and 4-bit codes with channel scales or groups "
                                "of a multiple of 8)")
        return KernelChoice("sparse24-int4", f"up to {sparse24.MAX_TOKENS} tokens; more (prefill) rebuild the dense "
                            "weight in one pass for cuBLAS")

    def codes(self) -> torch.Tensor:
        """Unsigned codes [out, in], the pruned positions at their group's zero point (weight exactly 0)."""
        kept = quant.unpack(self.qweight, self.int_scheme.bits, self.in_features // 2)
        index = unpack_positions(self.meta, self.in_features)
        placed = scatter_24(torch.ones_like(kept, dtype=torch.bool), index, self.in_features)
        return torch.where(placed, scatter_24(kept, index, self.in_features), self._zero_codes())

    def _zero_codes(self) -> torch.Tensor:
        """The zero point of each weight's group, [out or 1, in] (uint8)."""
        s = self.int_scheme
        width = s.group_size if s.granularity == "group" else self.in_features
        z = self.zero_points().repeat_interleave(width, dim=1)[:, : self.in_features]
        return z.round().to(torch.uint8)

    def zero_points(self) -> torch.Tensor:
        return zero_points(self.scales, self.zeros, self.int_scheme)

    def sparsity(self) -> float:
        return 0.5

    def check_loaded(self) -> str | None:
        return check_int_buffers(self.qweight, self.scales, self.zeros, self.int_scheme)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return quant.dequantize_weight(self.codes(), self.scales, self.zero_points(), self.int_scheme,
                                       dtype or self.scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = None if learning(self.scales) else _kernel_group(self.int_scheme, self.in_features)
        if group is not None and sparse24.available(x):  # a decode step: read the kept codes once
            y = sparse24.gemv_24_int4(x.reshape(-1, self.in_features), self.qweight, self.meta, self.scales,
                                      self.zeros, group, float(self.int_scheme.sym_zero))
            return _shaped(y, x, self.bias)
        if group is not None and sparse24.decompresses(x) and x.dtype == self.scales.dtype:  # prefill: one pass
            weight = sparse24.decompress_24_int4(self.qweight, self.meta, self.scales, self.zeros, group,
                                                 float(self.int_scheme.sym_zero), self.in_features)
            return F.linear(x, weight, self.bias)
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        s = self.int_scheme
        return (f"in_features={self.in_features}, out_features={self.out_features}, 2:4, bits={s.bits}, "
                f"bias={self.bias is not None}")


class BitmaskLinear(CompressedLinear):
    """An unstructured sparse layer: stored as a bit per weight (kept or not) and the kept values in row order;
    computed with as a dense weight, unpacked once (when built, or loaded) and packed again when saved."""

    format = "bitmask"

    def __init__(self, in_features: int, out_features: int, kept: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.in_features, self.out_features, self.kept = in_features, out_features, kept
        self.register_buffer("bitmask", torch.empty(out_features, -(-in_features // 8), dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("values", torch.empty(kept, dtype=dtype, device=device))  # until unpacked
        self.register_buffer("dense", None, persistent=False)  # the weight computed with, once unpacked
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_dense(cls, weight: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor | None) -> BitmaskLinear:
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, int(keep.sum()), bias is not None, weight.dtype, weight.device)
        layer.bitmask.copy_(pack_bits(keep))
        layer.values.copy_(weight[keep])
        if bias is not None:
            layer.bias.copy_(bias)
        layer.after_load()
        return layer

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, scheme: dict[str, Any],
              dtype: torch.dtype, device: torch.device | str = "meta") -> BitmaskLinear:
        return cls(in_features, out_features, int(scheme["kept"]), bias, dtype, device)

    def scheme(self) -> dict[str, Any]:
        return {"format": self.format, "kept": self.kept}

    @classmethod
    def kernel(cls, scheme: dict[str, Any], in_features: int, out_features: int) -> KernelChoice:
        return KernelChoice(None, "unstructured sparsity has no fast GPU kernel: unpacked to a dense weight at load")

    def mask(self) -> torch.Tensor:
        return unpack_bits(self.bitmask, self.in_features)

    def sparsity(self) -> float:
        return 1 - self.kept / (self.in_features * self.out_features)

    def check_loaded(self) -> str | None:
        if self.values is not None and int(self.mask().sum()) != self.kept:
            return f"a bitmask that keeps {int(self.mask().sum())} weights where the scheme declares {self.kept}"
        return None

    @torch.no_grad()
    def after_load(self) -> None:
        """Unpack the stored values into the dense weight computed with (and free them)."""
        if self.values is None:
            return
        dense = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype, device=self.values.device)
        dense[self.mask()] = self.values
        self.dense, self.values = dense, None

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.values is None:  # packed again from the dense weight, under the name it is loaded by
            dense = self.dense
            destination[prefix + "values"] = (torch.empty(self.kept, dtype=dense.dtype, device="meta") if dense.is_meta
                                              else dense[self.mask()])

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.values is not None:
            self.after_load()
        return self.dense if dtype is None else self.dense.to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized_weight().clone()  # a fresh tensor, as for every format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{1 - self.kept / (self.in_features * self.out_features):.0%} sparse, bias={self.bias is not None}")


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [out, in] as bytes [out, ceil(in / 8)], column j in bit j % 8 of byte j // 8."""
    rows, cols = mask.shape
    padded = F.pad(mask.to(torch.uint8), (0, -cols % 8)).reshape(rows, -1, 8)
    return (padded << torch.arange(8, dtype=torch.uint8, device=mask.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """:func:`pack_bits` undone: bool [out, cols]."""
    bits = (packed[..., None] >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    return bits.reshape(packed.shape[0], -1)[:, :cols].bool()


def stored_format(pattern: Pattern, scheme: dict[str, Any] | None) -> str | None:
    """The sparse format :func:`sparse_layer` will store a layer in, known before any weight: from the pattern of
    its mask and the scheme of the format a later step stores it in (None: none); None where the layer stays in
    that format."""
    two_four = pattern.structured and 4 % pattern.m == 0 and pattern.n * (4 // pattern.m) <= 2
    if scheme is None:
        return "sparse24" if two_four else "bitmask"
    signed = scheme.get("bits") == 8 and scheme.get("symmetric")
    return "sparse24-int" if scheme.get("format") == "int" and two_four and not signed else None


def sparse_layer(layer: nn.Module, keep: torch.Tensor) -> CompressedLinear | None:
    """The sparse format a layer with mask ``keep`` is stored in: ``sparse24-int`` for an ``int`` layer whose mask
    is 2:4, ``sparse24`` for a float layer whose mask is 2:4, else ``bitmask``; None for a layer stored in another
    format (it keeps its zeros in that format)."""
    two_four = keep.shape[1] % 4 == 0 and follows(keep, TWO_FOUR)
    if isinstance(layer, IntLinear):
        return Sparse24IntLinear.from_int(layer, keep) if two_four and not layer.signed_storage else None
    if isinstance(layer, CompressedLinear):
        return None
    weight, bias = get_weight(layer), get_bias(layer)
    keep = keep.to(weight.device)
    if two_four:
        return Sparse24Linear.from_dense(weight, keep, bias)
    return BitmaskLinear.from_dense(weight, keep, bias)
