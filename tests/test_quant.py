"""Numerical oracles on the quantization primitives."""

from __future__ import annotations

import itertools

import pytest
import torch

from compress import quant
from compress.quant import IntScheme

SCHEMES = [
    IntScheme(bits, sym, gran, gs if gran == "group" else None, restricted)
    for bits, sym, (gran, gs), restricted in itertools.product(
        range(2, 9), (True, False), (("tensor", None), ("channel", None), ("group", 32), ("group", 64)), (False,)
    )
] + [IntScheme(8, True, "channel", None, restricted=True), IntScheme(8, True, "tensor", None, restricted=True)]


def _weights(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 192, generator=g) * torch.rand(24, 1, generator=g) * 3
    w[0] = 0.0  # all-zero row
    w[1] = 0.37  # constant positive row
    w[2] = -1.5  # constant negative row
    w[3, :64] = 0.0  # an all-zero group
    w[4] = w[4].abs() + 0.1  # all-positive row: the zero point sits at the edge
    return w


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_error_at_most_half_a_step(scheme: IntScheme, dtype: torch.dtype) -> None:
    w = _weights(scheme.bits).to(dtype).float()
    scale, zero = quant.qparams(w, scheme, dtype)
    assert scale.dtype == dtype
    assert torch.isfinite(scale).all() and (scale > 0).all()
    codes = quant.quantize_weight(w, scale, zero, scheme)
    assert int(codes.max()) <= scheme.maxq
    if scheme.restricted:
        assert int(codes.min()) >= 1  # absmax int8 uses [-127, 127] only
    deq = quant.dequantize_weight(codes, scale, zero, scheme, torch.float32)
    assert torch.isfinite(deq).all()
    step = quant.group_view(torch.ones_like(w), scheme) * scale.float().unsqueeze(-1)
    err = quant.group_view((deq - w).abs(), scheme)
    rounding = quant.group_view(w.abs(), scheme) * 1e-6  # float32 arithmetic on w / scale
    assert (err <= step / 2 + rounding).all(), float((err - step / 2 - rounding).max())
    # zero stays exactly zero; all-zero rows round-trip exactly
    assert (deq[w == 0] == 0).all()


def test_zero_point_matches_the_textbook_formula() -> None:
    # For a row whose range contains 0, codes are round((w - min) / (max - min) * 255) up to the
    # integer zero point's half-step shift.
    w = torch.tensor([[-1.0, -0.25, 0.0, 0.5, 2.0]])
    scheme = IntScheme(8, False, "channel", None)
    scale, zero = quant.qparams(w, scheme, torch.float32)
    assert scale.item() == pytest.approx(3.0 / 255)
    codes = quant.quantize_weight(w, scale, zero, scheme)
    textbook = torch.round((w - w.min()) / (w.max() - w.min()) * 255)
    assert (codes.float() - textbook).abs().max() <= 1
    assert codes[0, 0] == 0 and codes[0, -1] == 255


def test_absmax_scale_is_max_over_127() -> None:
    w = torch.tensor([[0.5, -2.54, 1.0]])
    scheme = IntScheme(8, True, "channel", None, restricted=True)
    scale, _ = quant.qparams(w, scheme, torch.float32)
    assert scale.item() == pytest.approx(2.54 / 127)
    codes = quant.quantize_weight(w, scale, torch.full_like(scale, 128.0), scheme).int() - 128
    assert codes.tolist() == [[25, -127, 50]]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [1, 7, 64, 129, 130, 131])
def test_pack_round_trips_exactly(bits: int, n: int) -> None:
    codes = torch.randint(0, 2**bits, (5, n), dtype=torch.uint8)
    packed = quant.pack(codes, bits)
    per = quant.codes_per_byte(bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, -(-n // per))
    assert torch.equal(quant.unpack(packed, bits, n), codes)


def test_four_bit_packs_two_per_byte_low_nibble_first() -> None:
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert quant.pack(codes, 4).tolist() == [[0x21, 0x0F]]


def test_mse_search_never_worse_than_min_max() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    w[:, 0] *= 20  # outliers make clipping worthwhile
    scheme = IntScheme(3, True, "group", 64)
    err = {}
    for name, (s, z) in {"minmax": quant.qparams(w, scheme), "mse": quant.mse_qparams(w, scheme)}.items():
        codes = quant.quantize_weight(w, s, z, scheme)
        err[name] = (quant.dequantize_weight(codes, s, z, scheme, torch.float32) - w).pow(2).sum().item()
    assert err["mse"] < err["minmax"] * 0.95


def test_bits_out_of_range_rejected() -> None:
    with pytest.raises(ValueError, match="bits must be in 2..8"):
        IntScheme(9, True)


@pytest.mark.parametrize("bits, symmetric", [(4, True), (4, False), (3, True), (8, False)])
def test_a_ragged_last_group_is_quantized_as_a_group_of_its_own(bits: int, symmetric: bool) -> None:
    """in_features = 200 in groups of 64: three full groups and one of 8; the padding changes nothing, so each
    group's qparams and codes are those of the group quantized on its own (per channel, on its columns)."""
    w = torch.cat([_weights(5), _weights(6)[:, :8]], dim=1)
    w[5, 192:] = w[5, 192:].abs() + 0.2  # an all-positive ragged group: its range must still include zero
    scheme = IntScheme(bits, symmetric, "group", 64)
    assert scheme.groups_per_row(200) == 4 and scheme.padded_width(200) == 256 and scheme.ragged(200)
    for search in (quant.qparams, quant.mse_qparams):
        scale, zero = search(w, scheme, torch.float32)
        codes = quant.quantize_weight(w, scale, zero, scheme)
        assert scale.shape == (24, 4) and codes.shape == (24, 200)
        for g, cols in enumerate((slice(0, 64), slice(64, 128), slice(128, 192), slice(192, 200))):
            alone = IntScheme(bits, symmetric, "channel", None)
            s, z = search(w[:, cols], alone, torch.float32)
            assert torch.equal(scale[:, g : g + 1], s) and torch.equal(zero[:, g : g + 1], z), (search, g)
            assert torch.equal(codes[:, cols], quant.quantize_weight(w[:, cols], s, z, alone)), (search, g)
        deq = quant.dequantize_weight(codes, scale, zero, scheme, torch.float32)
        torch.testing.assert_close(quant.fake_quantize_weight(w, scale, zero, scheme), deq, rtol=0, atol=0)
        if search is quant.qparams:  # min/max ranges: every weight within half a step
            assert ((deq - w).abs() <= scale.repeat_interleave(64, dim=1)[:, :200] / 2 + 1e-6).all()
