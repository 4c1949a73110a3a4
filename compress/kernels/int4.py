"""4-bit (and 2/3-bit) group-wise weights through PyTorch's tinygemm kernel (``aten._weight_int4pack_mm``,
the kernel gpt-fast uses), for CUDA GPUs of compute capability 8.0 and newer.

tinygemm computes w = (q - 8) * scale + zero with bf16 scale / zero per group; a stored code q with zero point
z maps onto it exactly with zero = (8 - z) * scale. It wants the codes repacked into its tiled layout, which
is done once when the layer lands on the GPU.
"""

from __future__ import annotations

import torch

GROUP_SIZES = (32, 64, 128, 256)


def inner_k_tiles(in_features: int) -> int | None:
    """The largest tile count tinygemm accepts for this width (it needs in_features % (16 * tiles) == 0)."""
    for tiles in (8, 4, 2):
        if in_features % (16 * tiles) == 0:
            return tiles
    return None


def supported(bits: int, group_size: int, in_features: int, out_features: int, device: torch.device) -> bool:
    """Whether tinygemm can run this layer on ``device``."""
    # 3 and 4 bits only: tinygemm holds the zero point as a bf16 (8 - z) * scale, whose rounding is too coarse
    # next to the few levels of 2-bit weights.
    if device.type != "cuda" or bits not in (3, 4) or group_size not in GROUP_SIZES or out_features % 8:
        return False
    if in_features % group_size or inner_k_tiles(in_features) is None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """tinygemm's weight layout and [groups, out, 2] bf16 scales-and-zeros, from uint8 codes [out, in] and
    [out, groups] scale / zero point (all on the GPU)."""
    pairs = (codes[:, ::2] << 4) | codes[:, 1::2]  # tinygemm: even column in the high nibble
    weight = torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), inner_k_tiles(codes.shape[1]))
    s = scale.float()
    scales_and_zeros = torch.stack([s, (8 - zero.float()) * s], dim=-1).transpose(0, 1)
    return weight, scales_and_zeros.to(torch.bfloat16).contiguous()


def matmul(x: torch.Tensor, weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [M, in] (any float dtype) times the packed weight: [M, out] in bf16."""
    return torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), weight, group_size, scales_and_zeros)
