"""The KV cache's quantization as pure tensor functions (KIVI, Liu et al. 2024, arXiv 2402.02750).

Keys have outlier channels, so they are quantized per channel: each channel of a run of ``group`` consecutive
tokens gets its own scale and zero point (:func:`quantize_keys`). Values have none and are used per token by the
attention's weighted sum, so they are quantized per token: each run of ``group`` channels of one token gets its own
(:func:`quantize_values`). Both are asymmetric min/max grids with integer zero points (int8): code = round(x / scale) +
zero, clamped to [0, 2^bits - 1]; x ~ (code - zero) * scale, within scale / 2 of x.

Scales are float16 and zero points int8 (3 bytes a group); codes are packed along the channels (head_dim) of each token, lowest bits
first (:func:`pack`). FP8 (E4M3) keys and values use one scale per head (:func:`fp8_quantize`).

Shapes follow transformers' caches: [batch, heads, tokens, head_dim].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_MAX = 448.0  # the largest finite float8_e4m3fn
SCALE_DTYPE = torch.float16


@dataclass
class Quantized:
    """Packed codes [B, H, T, D * bits / 8] (uint8), scales and zero points (float16 and int8), grouped as the
    function that made them says."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes below 2^bits [..., D] packed 8 / bits to a byte along the last dimension, lowest bits first."""
    if bits == 8:
        return codes.to(torch.uint8)
    per = 8 // bits
    c = codes.to(torch.uint8).unflatten(-1, (-1, per))
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (c << shifts).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of :func:`pack`: uint8 codes [..., D]."""
    if bits == 8:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)


def _grid(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float16, as stored) and int8 zero point of the min/max grid over [lo, hi]. The grid need not hold 0
    (a key channel of an outlier can sit far from it), but its zero point must fit int8: the scale is at least
    |lo| / 127, which widens it only where the range is under maxq / 127 of |lo|. The
    float16 scale is rounded up, so the grid still spans [lo, hi] and every error stays within scale / 2."""
    maxq = (1 << bits) - 1
    lo, hi = lo.float(), hi.float()
    exact = torch.maximum((hi - lo) / maxq, lo.abs() / 127).clamp(min=1e-5)
    scale = exact.to(SCALE_DTYPE)
    scale = torch.where(scale.float() < exact, torch.nextafter(scale, torch.full_like(scale, torch.inf)), scale)
    zero = torch.round(-lo / scale.float()).clamp(-128, 127)
    return scale, zero.to(torch.int8)


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(x.float() / scale.float()) + zero.float(), 0, (1 << bits) - 1).to(torch.uint8)


def _quantize(x: torch.Tensor, bits: int, group: int, dim: int) -> Quantized:
    """``x`` with a scale and zero point for each run of ``group`` along ``dim`` (their shape: ``x``'s, with
    ``dim`` divided by ``group``)."""
    runs = x.unflatten(dim, (-1, group))
    scale, zero = _grid(runs.amin(dim + 1), runs.amax(dim + 1), bits)
    codes = _codes(runs, scale.unsqueeze(dim + 1), zero.unsqueeze(dim + 1), bits).flatten(dim, dim + 1)
    return Quantized(pack(codes, bits), scale, zero)


def _dequantize(q: Quantized, bits: int, group: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    codes = unpack(q.codes, bits).unflatten(dim, (-1, group)).float()
    scale, zero = q.scale.unsqueeze(dim + 1).float(), q.zero.unsqueeze(dim + 1).float()
    return ((codes - zero) * scale).flatten(dim, dim + 1).to(dtype)


def quantize_keys(k: torch.Tensor, bits: int, group: int) -> Quantized:
    """Keys [B, H, T, D], T a multiple of ``group``, per channel over runs of ``group`` tokens: scale and zero
    [B, H, T / group, D]."""
    return _quantize(k, bits, group, 2)


def dequantize_keys(q: Quantized, bits: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    return _dequantize(q, bits, group, 2, dtype)


def quantize_values(v: torch.Tensor, bits: int, group: int) -> Quantized:
    """Values [B, H, T, D], D a multiple of ``group``, per token over runs of ``group`` channels: scale and zero
    [B, H, T, D / group]."""
    return _quantize(v, bits, group, 3)


def dequantize_values(q: Quantized, bits: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    return _dequantize(q, bits, group, 3, dtype)


def fp8_scale(x: torch.Tensor) -> torch.Tensor:
    """One float32 scale per head [H] of ``x`` [B, H, T, D]: its largest magnitude maps to E4M3's largest finite."""
    return (x.detach().float().abs().amax(dim=(0, 2, 3)) / FP8_MAX).clamp(min=1e-8)


def fp8_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` [B, H, T, D] / its head's ``scale`` [H] in float8_e4m3fn (beyond the range: saturated, not inf)."""
    y = x.float() / scale.view(1, -1, 1, 1)
    return y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fp8_dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scale.view(1, -1, 1, 1)).to(dtype)
