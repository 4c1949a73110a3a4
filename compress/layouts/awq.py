"""The AWQ checkpoint layout (AutoAWQ's GEMM version, ``quant_method: awq``, ``version: gemm``), which
``compress.load`` reads into compress's ``int`` layers. Per quantized linear layer, 4-bit codes, eight to an int32:

* ``qweight`` int32 [in, out / 8]: row i holds input i's codes; word c of a row holds outputs 8c .. 8c + 7, the
  nibble at bit 4k holding output 8c + ORDER[k] (ORDER = 0, 2, 4, 6, 1, 3, 5, 7, the order AutoAWQ's kernels
  unpack in);
* ``qzeros`` int32 [groups, out / 8]: the zero points, packed the same way; ``scales`` [groups, out];

with w[o, i] = scales[g, o] * (code - zero[g, o]) for input i of group g = i // group_size. Other versions (``gemv``,
``exllama``, ``marlin``) lay the codes out otherwise and are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from compress.errors import CheckpointError
from compress.layouts import LayoutError, load_converted
from compress.quant import IntScheme

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack(words: torch.Tensor) -> torch.Tensor:
    """int32 [n, m / 8] in AWQ's order to uint8 [n, m]: nibble k of word c is column 8c + ORDER[k]."""
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    nibbles = torch.stack([(unsigned >> (4 * k)) & 0xF for k in range(8)], dim=-1)  # [n, m / 8, 8] by nibble
    columns = torch.empty_like(nibbles)
    columns[..., list(ORDER)] = nibbles
    return columns.reshape(words.shape[0], -1).to(torch.uint8)


def load_model(path: str | Path, config: dict[str, Any]) -> nn.Module:
    """The AWQ (GEMM) checkpoint at ``path`` (its ``quantization_config``: ``config``) as a model of compress ``int``
    layers on the CPU, codes, scales and zero points as stored; CheckpointError for other versions or bit widths."""
    from compress.formats.integer import IntLinear
    from compress.linear import linear_shape

    bits, group_size = int(config.get("bits", config.get("w_bit", 4))), int(config.get("group_size",
                                                                                      config.get("q_group_size", 128)))
    version = str(config.get("version", "gemm")).lower()
    if bits != 4 or version != "gemm":
        raise CheckpointError(f"{path}: an AWQ checkpoint of version {version!r} at {bits} bits; compress reads the "
                              "GEMM version at 4 bits (re-export it with AutoAWQ's version='gemm')")
    symmetric = not config.get("zero_point", True)

    def convert(name: str, module: nn.Module, tensors) -> nn.Module | None:
        if f"{name}.qweight" not in tensors:
            return None
        in_f, out_f = linear_shape(module)
        codes = unpack(tensors.get(f"{name}.qweight")).t().contiguous()
        if tuple(codes.shape) != (out_f, in_f):
            raise LayoutError(f"[{codes.shape[0]}, {codes.shape[1]}] codes for a layer of [{out_f}, {in_f}]")
        scales = tensors.get(f"{name}.scales").t().contiguous()
        if f"{name}.qzeros" in tensors:
            zeros = unpack(tensors.get(f"{name}.qzeros")).t().float()
        else:
            zeros = torch.full(scales.shape, 8.0)
        scheme = IntScheme(4, symmetric and bool((zeros == 8).all()), "group", group_size)
        bias = tensors.get(f"{name}.bias") if f"{name}.bias" in tensors else None
        return IntLinear.from_codes(codes, scales, zeros, scheme, bias, module.weight.dtype)

    return load_converted(path, convert, "AWQ")
