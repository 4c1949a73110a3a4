"""The GPTQ checkpoint layout (AutoGPTQ and GPTQModel's ``quant_method: gptq``), read by transformers, vLLM, SGLang
and TGI. Per quantized linear layer, with p = 32 / bits codes in an int32:

* ``qweight`` int32 [in / p, out]: input row i of the transposed codes lies in word i // p, at bit (i % p) * bits;
* ``qzeros`` int32 [groups, out / p]: each group's zero point, packed along the output the same way; the ``gptq``
  (v1) checkpoint format stores zero - 1 (so a zero of 0 cannot be stored), ``gptq_v2`` the zero itself;
* ``scales`` [groups, out] (float16 where it holds them exactly, else their own dtype: loaders cast them); ``g_idx`` int32 [in], the group of each input (i // group_size here: groups of
  consecutive inputs, ``desc_act: false``); ``bias``.

The weight is w[o, i] = scales[g, o] * (code[o, i] - zero[g, o]) with g = g_idx[i]. The layout takes 2, 4 and 8 bits
(the 3-bit one packs codes across word boundaries and is not written), one bit width and group size for the whole
model, in and out features that fill whole words. A ragged last group (in features that the group size does not
divide) is expressed as it is: g_idx gives its inputs the last group.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from compress.errors import CheckpointError
from compress.layouts import LayoutError, load_converted, other_tensors, refuse_if
from compress.quant import IntScheme

BITS = (2, 4, 8)
V1, V2 = "gptq", "gptq_v2"


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers [n, m] in [0, 2**bits) packed along dim 0 into int32 [n * bits / 32, m]: value k of each run of
    32 / bits at bit k * bits."""
    per = 32 // bits
    runs = values.to(torch.int64).reshape(-1, per, values.shape[1])
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    words = (runs << shifts).sum(dim=1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same 32 bits, as a signed int


def unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of :func:`pack`: int32 [n, m] to uint8 [n * 32 / bits, m]."""
    per = 32 // bits
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    return ((unsigned.unsqueeze(1) >> shifts) & (2**bits - 1)).reshape(-1, words.shape[1]).to(torch.uint8)


@dataclass(frozen=True)
class GPTQLayer:
    """One layer in the GPTQ layout: its tensors and the settings the model-wide config must state."""

    tensors: dict[str, torch.Tensor]
    bits: int
    group_size: int  # -1: one group a row
    symmetric: bool
    checkpoint_format: str


def to_gptq(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, scheme: IntScheme,
            bias: torch.Tensor | None, checkpoint_format: str | None = None) -> GPTQLayer:
    """A layer's unsigned codes [out, in], scales and zero points [rows, groups] (rows 1 for a per-tensor scheme) in
    the GPTQ layout; LayoutError says what it cannot express. In ``checkpoint_format``, by default v1 when every zero
    point is at least 1, else v2."""
    out_f, in_f = codes.shape
    if scheme.bits not in BITS:
        raise LayoutError(f"{scheme.bits}-bit codes (the GPTQ layout is written for {', '.join(map(str, BITS))} bits; "
                          "its 3-bit packing crosses word boundaries)")
    per = 32 // scheme.bits
    for what, size in (("in", in_f), ("out", out_f)):
        if size % per:
            raise LayoutError(f"{what}_features {size} is not a multiple of {per} (the {scheme.bits}-bit codes of "
                              "an int32)")
    group = scheme.group_size if scheme.granularity == "group" else in_f
    groups = -(-in_f // group)
    scales = scales.expand(out_f, groups)  # a per-tensor scale is every row's
    zeros = zeros.expand(out_f, groups).round().to(torch.int64)
    half = scales.to(torch.float16)
    if torch.equal(half.to(scales.dtype), scales):
        scales = half  # GPTQ checkpoints' usual dtype; scales it cannot hold exactly keep their own (loaders cast)
    v1 = bool((zeros >= 1).all()) if checkpoint_format is None else checkpoint_format == V1
    tensors = {
        "qweight": pack(codes.t(), scheme.bits),
        "qzeros": pack(zeros - 1 if v1 else zeros, scheme.bits).t().contiguous(),
        "scales": scales.t().contiguous(),
        "g_idx": (torch.arange(in_f) // group).to(torch.int32),
    }
    if bias is not None:
        tensors["bias"] = bias.detach().clone()
    return GPTQLayer(tensors, scheme.bits, scheme.group_size if scheme.granularity == "group" else -1,
                     scheme.symmetric, V1 if v1 else V2)


def from_gptq(tensors: dict[str, torch.Tensor], bits: int, group_size: int, symmetric: bool,
              checkpoint_format: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, IntScheme]:
    """A layer's GPTQ tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``) as unsigned codes [out, in], scales and
    zero points [out, groups] (float) and the IntScheme that stores them; LayoutError for what the int format cannot
    hold (groups that are not runs of consecutive inputs: act-order ``desc_act`` checkpoints)."""
    if bits not in BITS:
        raise LayoutError(f"{bits}-bit GPTQ layers (read: {', '.join(map(str, BITS))} bits)")
    codes = unpack(tensors["qweight"], bits).t().contiguous()
    in_f = codes.shape[1]
    group = group_size if group_size > 0 else in_f
    g_idx = tensors.get("g_idx")
    if g_idx is not None and not torch.equal(g_idx.to(torch.int64), torch.arange(in_f) // group):
        raise LayoutError("inputs whose groups are not runs of consecutive inputs (an act-order checkpoint, "
                          "desc_act: true); compress's int format stores groups of consecutive inputs")
    zeros = unpack(tensors["qzeros"].t().contiguous(), bits).t().to(torch.int64)
    if checkpoint_format == V1:
        zeros = (zeros + 1) & (2**bits - 1)
    scales = tensors["scales"].t().contiguous()
    scheme = IntScheme(bits, symmetric, "group" if group_size > 0 else "channel", group_size if group_size > 0 else None)
    if symmetric and not bool((zeros == scheme.sym_zero).all()):
        scheme = IntScheme(bits, False, scheme.granularity, scheme.group_size)  # stated symmetric, stored otherwise
    return codes, scales, zeros.t().contiguous().float(), scheme


# -- a whole model ------------------------------------------------------------------------------------------------


def export_model(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every tensor of ``model`` (compress layers in memory) in the GPTQ layout, and the ``quantization_config``
    that describes them; CheckpointError listing each layer the layout cannot express."""
    from compress.formats import compressed_modules
    from compress.formats.integer import IntLinear
    from compress.linear import is_linear_like
    from compress.model import find_blocks

    layers = dict(compressed_modules(model))
    problems = []
    blocks = find_blocks(model).prefix + "."
    problems += [f"{name} is not quantized (GPTQ loaders quantize every linear layer of the decoder blocks)"
                 for name, module in model.named_modules()
                 if name.startswith(blocks) and is_linear_like(module) and name not in layers]
    results: dict[str, GPTQLayer] = {}
    # one checkpoint format for the model, chosen before packing: v1 unless some zero point is 0 (only v2 holds it)
    v1 = all(bool((layer.zero_points() >= 1).all()) for layer in layers.values() if isinstance(layer, IntLinear))
    for name, layer in layers.items():
        if not isinstance(layer, IntLinear):
            problems.append(f"{name} is stored as {layer.format!r} (the GPTQ layout holds integer codes only)")
            continue
        try:
            results[name] = to_gptq(layer.codes(), layer.scales, layer.zero_points(), layer.int_scheme, layer.bias,
                                    V1 if v1 else V2)
        except LayoutError as exc:
            problems.append(f"{name} has {exc}")
    settings = sorted({(r.bits, r.group_size) for r in results.values()})
    if len(settings) > 1:
        problems.append("layers of different bit widths or group sizes (" + ", ".join(
            f"{b}-bit, group {g}" for b, g in settings) + "); the GPTQ config states one of each")
    if not results and not problems:
        problems.append("no quantized layer")
    refuse_if(problems, "this checkpoint cannot be written in the GPTQ layout")
    tensors = {f"{name}.{key}": value for name, r in results.items() for key, value in r.tensors.items()}
    tensors.update(other_tensors(model, list(results)))
    first = next(iter(results.values()))
    config = {"quant_method": "gptq", "bits": first.bits, "group_size": first.group_size, "desc_act": False,
              "sym": all(r.symmetric for r in results.values()), "checkpoint_format": first.checkpoint_format,
              "static_groups": False, "true_sequential": True, "lm_head": any(not n.startswith(blocks) for n in results)}
    return tensors, config


def load_model(path: str | Path, config: dict[str, Any]) -> nn.Module:
    """The GPTQ checkpoint at ``path`` (its ``quantization_config``: ``config``) as a model of compress layers on
    the CPU, its codes, scales and zero points as stored (no re-quantization): the ``int`` format's kernels run it.
    CheckpointError naming the layers the int format cannot hold."""
    from compress.formats.integer import IntLinear
    from compress.linear import linear_shape

    bits, group_size = int(config.get("bits", 4)), int(config.get("group_size", 128))
    symmetric, checkpoint_format = bool(config.get("sym", True)), config.get("checkpoint_format", V1)
    if checkpoint_format not in (V1, V2):
        raise CheckpointError(f"{path}: GPTQ checkpoint_format {checkpoint_format!r} (compress reads {V1} and {V2})")

    def convert(name: str, module: nn.Module, tensors) -> nn.Module | None:
        if f"{name}.qweight" not in tensors:
            return None
        stored = {key: tensors.get(f"{name}.{key}") for key in ("qweight", "qzeros", "scales", "g_idx")
                  if f"{name}.{key}" in tensors}
        codes, scales, zeros, scheme = from_gptq(stored, bits, group_size, symmetric, checkpoint_format)
        in_features, out_features = linear_shape(module)
        if tuple(codes.shape) != (out_features, in_features):
            raise LayoutError(f"[{codes.shape[0]}, {codes.shape[1]}] codes for a layer of [{out_features}, "
                              f"{in_features}]")
        bias = tensors.get(f"{name}.bias") if f"{name}.bias" in tensors else None
        return IntLinear.from_codes(codes, scales, zeros, scheme, bias, module.weight.dtype)

    return load_converted(path, convert, "GPTQ")
