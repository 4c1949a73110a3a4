"""Integer quantization primitives: small pure functions shared by every integer method.

Conventions, used by every plugin and by the stored format:

* A weight ``w`` of shape ``[out, in]`` is cut into groups along ``in``: ``tensor`` (one group for the
  whole tensor), ``channel`` (one per output row) or ``group`` (``ceil(in / group_size)`` per row). Where
  ``group_size`` does not divide ``in``, the last group of each row is shorter (ragged) and has its own scale
  and zero point. The functions pad it with zeros to a full group for their tensor arithmetic and crop the
  result: zero is always a code, so the padding changes no range, no rounding and no error sum.
* Codes are unsigned integers ``q`` in ``[0, 2**bits - 1]`` with a zero point ``z``:
  ``w ≈ (q - z) * scale``. Symmetric schemes fix ``z = 2**(bits - 1)``; asymmetric ones store it.
* Symmetric scale: ``max|w| / ((2**bits - 1) / 2)`` (the full range, as GPTQ and llm-compressor), or
  with ``restricted=True`` ``max|w| / (2**(bits-1) - 1)`` (absmax int8: ``127 / max|w|``).
* Asymmetric scale: ``(max - min) / (2**bits - 1)`` with the range widened to include 0, so that the
  zero point is an integer in range and an all-zero group stays exactly zero.
* Scales are rounded *up* to the storage dtype, so every element's error is at most ``scale / 2`` of
  the stored scale (rounding down could push the range ends past the last code).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch

Granularity = Literal["tensor", "channel", "group"]


@dataclass(frozen=True)
class IntScheme:
    """How one weight tensor is quantized; stored per module in the checkpoint."""

    bits: int
    symmetric: bool
    granularity: Granularity = "group"
    group_size: int | None = 128
    restricted: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")
        if self.granularity == "group" and (self.group_size is None or self.group_size < 1):
            raise ValueError(f"granularity 'group' needs a positive group_size, got {self.group_size}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def sym_zero(self) -> int:
        return 2 ** (self.bits - 1)

    def groups_per_row(self, in_features: int) -> int:
        if self.granularity == "group":
            return -(-in_features // self.group_size)
        return 1

    def padded_width(self, in_features: int) -> int:
        """``in_features`` rounded up to whole groups (itself unless the last group is ragged)."""
        return self.groups_per_row(in_features) * self.group_size if self.granularity == "group" else in_features

    def ragged(self, in_features: int) -> bool:
        """Whether the last group of a row is shorter than ``group_size``."""
        return self.padded_width(in_features) != in_features

    def to_dict(self) -> dict:
        return asdict(self)


def group_view(w: torch.Tensor, scheme: IntScheme) -> torch.Tensor:
    """``w`` [out, in] as [rows, groups, group_len]: rows is 1 for per-tensor, else out; a ragged last group is
    padded with zeros (:func:`ungroup` crops them again)."""
    out_f, in_f = w.shape
    if scheme.granularity == "tensor":
        return w.reshape(1, 1, out_f * in_f)
    groups = scheme.groups_per_row(in_f)
    width = scheme.padded_width(in_f)
    if width != in_f:
        w = torch.nn.functional.pad(w, (0, width - in_f))
    return w.reshape(out_f, groups, width // groups)


def ungroup(g: torch.Tensor, shape: torch.Size | tuple[int, int]) -> torch.Tensor:
    """A :func:`group_view` [rows, groups, group_len] back as [out, in] (``shape``), without the padding."""
    out_f, in_f = shape
    return g.reshape(out_f, -1)[:, :in_f]


def round_up_to(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` cast to ``dtype``, rounded up to the next representable value where casting went down."""
    cast = scale.to(dtype)
    low = cast.float() < scale
    if low.any():
        cast = torch.where(low, torch.nextafter(cast, torch.full_like(cast, float("inf"))), cast)
    return cast


def range_qparams(
    wmin: torch.Tensor, wmax: torch.Tensor, scheme: IntScheme, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for groups whose values lie in [wmin, wmax] (elementwise tensors).

    Returns ``scale`` (in ``dtype``, never 0) and ``zero`` (float32 holding integers in [0, maxq]).
    """
    wmin, wmax = wmin.float(), wmax.float()
    if scheme.symmetric:
        amax = torch.maximum(wmin.abs(), wmax.abs())
        half = (2 ** (scheme.bits - 1) - 1) if scheme.restricted else scheme.maxq / 2
        scale = round_up_to(amax / half, dtype)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.full_like(amax, float(scheme.sym_zero))
        return scale, zero
    wmin = wmin.clamp(max=0)
    wmax = wmax.clamp(min=0)
    scale = round_up_to((wmax - wmin) / scheme.maxq, dtype)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.round(-wmin / scale.float()).clamp(0, scheme.maxq)
    return scale, zero


def qparams(w: torch.Tensor, scheme: IntScheme, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max scale and zero point of ``w`` [out, in]; both shaped [rows, groups]."""
    g = group_view(w.float(), scheme)
    return range_qparams(g.amin(dim=-1), g.amax(dim=-1), scheme, dtype or w.dtype)


def mse_qparams(
    w: torch.Tensor,
    scheme: IntScheme,
    dtype: torch.dtype | None = None,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point with the clipping range searched per group: shrink [min, max] by factors
    ``1 - i / grid`` for i < grid * max_shrink, keeping for each group the one with the least
    ``sum |w - dequant(quant(w))| ** norm`` (the search of the GPTQ reference code), each column's error
    weighted by ``importance`` [in] when given (e.g. the diagonal of the inputs' Hessian).

    Shrink factors are evaluated in batches (about 2**26 elements at a time) rather than one by one.
    """
    g = group_view(w.float(), scheme)
    weight = None if importance is None else group_view(importance.float().expand_as(w), scheme)
    wmin, wmax = g.amin(dim=-1), g.amax(dim=-1)
    dtype = dtype or w.dtype
    shrinks = 1 - torch.arange(int(max_shrink * grid), device=w.device, dtype=torch.float32) / grid
    per_batch = max(1, 2**26 // max(1, g.numel()))
    best_err = best_scale = best_zero = None
    for f in shrinks.split(per_batch):
        f = f.view(-1, 1, 1)
        scale, zero = range_qparams(wmin * f, wmax * f, scheme, dtype)  # [S, rows, groups]
        deq = fake_quantize(g, scale.float().unsqueeze(-1), zero.unsqueeze(-1), scheme.maxq)
        err = (deq - g).abs().pow(norm)
        err = (err if weight is None else err * weight).sum(dim=-1)
        err, pick = err.min(dim=0)
        scale = scale.gather(0, pick.unsqueeze(0))[0]
        zero = zero.gather(0, pick.unsqueeze(0))[0]
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes ``clamp(round(w / scale) + zero, 0, maxq)`` as float32 (shapes broadcast)."""
    return torch.clamp(torch.round(w.float() / scale.float()) + zero, 0, maxq)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """``dequantize(quantize(w))`` in float32: what the stored model will compute with."""
    return (quantize(w, scale, zero, maxq) - zero) * scale.float()


def quantize_weight(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: IntScheme
) -> torch.Tensor:
    """Codes of ``w`` [out, in] as uint8 [out, in], given [rows, groups] scale and zero."""
    g = group_view(w.float(), scheme)
    codes = quantize(g, scale.unsqueeze(-1), zero.unsqueeze(-1), scheme.maxq)
    return ungroup(codes, w.shape).to(torch.uint8)


def dequantize_weight(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: IntScheme, dtype: torch.dtype
) -> torch.Tensor:
    """Float weight [out, in] from uint8 codes [out, in] and [rows, groups] scale / zero."""
    g = group_view(codes, scheme).float()
    w = (g - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
    return ungroup(w, codes.shape).to(dtype)


def codes_per_byte(bits: int) -> int:
    """How many codes one stored byte holds: 4 for 2-bit, 2 for 3- and 4-bit (nibbles), else 1."""
    if bits <= 2:
        return 4
    if bits <= 4:
        return 2
    return 1


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes [rows, n] along the last dim; element j of a byte sits at bits j*width.

    The last dim is padded with zeros to a whole number of bytes; ``unpack`` takes the true length.
    """
    per = codes_per_byte(bits)
    if per == 1:
        return codes.to(torch.uint8).contiguous()
    width = 8 // per
    n = codes.shape[-1]
    pad = (-n) % per
    c = torch.nn.functional.pad(codes.to(torch.uint8), (0, pad)).reshape(*codes.shape[:-1], -1, per)
    out = torch.zeros(c.shape[:-1], dtype=torch.uint8, device=codes.device)
    for j in range(per):
        out |= c[..., j] << (j * width)
    return out


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 codes with last dim ``n``."""
    per = codes_per_byte(bits)
    if per == 1:
        return packed[..., :n]
    width = 8 // per
    mask = (1 << width) - 1
    parts = [(packed >> (j * width)) & mask for j in range(per)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], -1)[..., :n]


def fake_quantize_weight(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: IntScheme) -> torch.Tensor:
    """``w`` [out, in] quantized with [rows, groups] ``scale`` / ``zero`` and dequantized, in float32."""
    g = group_view(w.float(), scheme)
    return ungroup(fake_quantize(g, scale.float().unsqueeze(-1), zero.unsqueeze(-1), scheme.maxq), w.shape)


def rtn_dequantized(w: torch.Tensor, scheme: IntScheme, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``w`` [out, in] rounded to nearest with min/max qparams and dequantized, in float32."""
    return fake_quantize_weight(w, *qparams(w, scheme, dtype or w.dtype), scheme)
