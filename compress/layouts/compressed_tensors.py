"""The compressed-tensors checkpoint layout (llm-compressor's, ``quant_method: compressed-tensors``), read by
transformers (with the ``compressed-tensors`` package), vLLM and SGLang. Per quantized linear layer:

* integer codes below 8 bits, ``pack-quantized``: ``weight_packed`` int32 [out, ceil(in * bits / 32)], each row's
  codes as one little-endian bit stream (code j at bit j * bits, across word boundaries where 32 / bits is not
  whole), ``weight_shape`` [out, in], ``weight_scale`` [out, groups] and, when asymmetric, ``weight_zero_point``
  packed the same way along the output (int32 [ceil(out * bits / 32), groups]);
* 8-bit codes, ``int-quantized``: ``weight`` int8 [out, in], ``weight_scale``, ``weight_zero_point`` int8 if
  asymmetric;
* FP8 E4M3, ``float-quantized``: ``weight`` float8_e4m3fn [out, in], ``weight_scale`` [out, 1] (or [1]) and, for
  static activation scales, ``input_scale``.

The layout's integers are signed, q = code - 2**(bits-1), zero points likewise, and w = scale * (q - zero), the
int format's scale * (code - zero) exactly; packed values are q + 2**(bits-1), the int format's codes themselves.
Each distinct scheme is one entry of ``config_groups`` naming its layers; linear layers left dense are in
``ignore``. A ragged last group is refused (the layout's group strategy needs in features that the group size
divides), as are formats with no counterpart (sparse, factored, corrected).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from compress.layouts import LayoutError, load_converted, other_tensors, refuse_if


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers [n, m] in [0, 2**bits) packed along dim 1 into int32 [n, ceil(m * bits / 32)]: each row one
    little-endian bit stream, value j at bit j * bits (a value may continue into the next word)."""
    n, m = values.shape
    words = math.ceil(m * bits / 32)
    start = torch.arange(m, dtype=torch.int64) * bits
    word, offset = start // 32, start % 32
    v = values.to(torch.int64)
    out = torch.zeros(n, words + 1, dtype=torch.int64)  # one spare word for a last value's overflow
    out.scatter_add_(1, word.expand(n, m), (v << offset) & 0xFFFFFFFF)
    out.scatter_add_(1, (word + 1).expand(n, m), v >> (32 - offset))  # the bits past the word's end (0 if none)
    out = out[:, :words]
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unpack(words: torch.Tensor, bits: int, m: int) -> torch.Tensor:
    """The inverse of :func:`pack`: int32 [n, w] to uint8 [n, m]."""
    n = words.shape[0]
    w = torch.cat([words.to(torch.int64) & 0xFFFFFFFF, torch.zeros(n, 1, dtype=torch.int64)], dim=1)
    start = torch.arange(m, dtype=torch.int64) * bits
    word, offset = start // 32, start % 32
    low = w[:, word] >> offset
    high = w[:, word + 1] << (32 - offset)
    return ((low | high) & (2**bits - 1)).to(torch.uint8)


def _int_layer(layer) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    scheme = layer.int_scheme
    out_f, in_f = layer.out_features, layer.in_features
    if scheme.ragged(in_f):
        raise LayoutError(f"a ragged last group ({in_f} inputs in groups of {scheme.group_size}; the layout's "
                          "group strategy needs in features the group size divides)")
    strategy = {"group": "group", "channel": "channel", "tensor": "tensor"}[scheme.granularity]
    args = {"num_bits": scheme.bits, "type": "int", "symmetric": scheme.symmetric, "strategy": strategy,
            "group_size": scheme.group_size if strategy == "group" else None, "dynamic": False, "actorder": None,
            "observer": "minmax"}
    codes, offset = layer.codes(), 2 ** (scheme.bits - 1)
    scales = layer.scales.detach().clone()
    tensors = {"weight_scale": scales if strategy != "tensor" else scales.view(1)}
    zeros = layer.zero_points().round().to(torch.int64)
    if scheme.bits == 8:
        fmt = "int-quantized"
        tensors["weight"] = (codes.to(torch.int16) - offset).to(torch.int8)
        if not scheme.symmetric:
            tensors["weight_zero_point"] = (zeros - offset).to(torch.int8).reshape(tensors["weight_scale"].shape)
    else:
        fmt = "pack-quantized"
        tensors["weight_packed"] = pack(codes, scheme.bits)
        tensors["weight_shape"] = torch.tensor([out_f, in_f], dtype=torch.int64)
        if not scheme.symmetric:
            if strategy == "tensor":
                raise LayoutError("an asymmetric per-tensor scheme below 8 bits (the layout packs zero points per "
                                  "channel or group only)")
            tensors["weight_zero_point"] = pack(zeros.t().contiguous(), scheme.bits).t().contiguous()
    return tensors, args, fmt


def _fp8_layer(layer) -> tuple[dict[str, torch.Tensor], dict[str, Any], str, dict[str, Any] | None]:
    strategy = "channel" if layer.per_channel else "tensor"
    scale = layer.weight_scale.detach().clone()
    tensors = {"weight": layer.weight_fp8.detach().clone(), "weight_scale": scale if layer.per_channel else scale.view(1)}
    args = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": False,
            "observer": "minmax"}
    inputs = None
    if layer.activations == "dynamic":
        inputs = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True,
                  "observer": None}
    elif layer.activations == "static":
        inputs = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False,
                  "observer": "minmax"}
        tensors["input_scale"] = layer.input_scale.detach().clone().view(1)
    return tensors, args, "float-quantized", inputs


def export_model(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every tensor of ``model`` (compress layers in memory) in the compressed-tensors layout, and the
    ``quantization_config`` describing them; CheckpointError listing each layer the layout cannot express."""
    from compress.formats import compressed_modules
    from compress.formats.fp8 import Fp8Linear
    from compress.formats.integer import IntLinear
    from compress.linear import is_linear_like

    layers = dict(compressed_modules(model))
    problems: list[str] = []
    groups: dict[str, dict[str, Any]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        try:
            if isinstance(layer, IntLinear):
                own, args, fmt = _int_layer(layer)
                inputs = None
            elif isinstance(layer, Fp8Linear):
                own, args, fmt, inputs = _fp8_layer(layer)
            else:
                raise LayoutError(f"the {layer.format!r} format (the layout holds integer and FP8 layers)")
        except LayoutError as exc:
            problems.append(f"{name} has {exc}")
            continue
        key = json.dumps([args, inputs, fmt], sort_keys=True)
        group = groups.setdefault(key, {"targets": [], "weights": args, "input_activations": inputs,
                                        "output_activations": None, "format": fmt})
        group["targets"].append(name)
        tensors.update({f"{name}.{k}": v for k, v in own.items()})
        if getattr(layer, "bias", None) is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().clone()
    if not layers:
        problems.append("no compressed layer")
    refuse_if(problems, "this checkpoint cannot be written in the compressed-tensors layout")
    tensors.update(other_tensors(model, list(layers)))
    formats = sorted({g["format"] for g in groups.values()})
    config = {"quant_method": "compressed-tensors", "format": formats[0] if len(formats) == 1 else "mixed-precision",
              "quantization_status": "compressed", "kv_cache_scheme": None,
              "config_groups": {f"group_{i}": group for i, group in enumerate(groups.values())},
              "ignore": sorted(name for name, module in model.named_modules()
                               if is_linear_like(module) and name not in layers)}
    return tensors, config


def _scheme_of(name: str, module: nn.Module, config: dict[str, Any]) -> dict[str, Any] | None:
    """The config group whose targets name ``name`` (its name, an ``re:`` pattern, or its class) and that
    ``ignore`` does not exclude, else None."""
    def named(target: str) -> bool:
        if target.startswith("re:"):
            return re.match(target[3:], name) is not None
        return target in (name, type(module).__name__)

    if any(named(t) for t in config.get("ignore") or []):
        return None
    return next((group for group in (config.get("config_groups") or {}).values()
                 if any(named(t) for t in group.get("targets") or [])), None)


def _int_from_ct(tensors: dict[str, torch.Tensor], args: dict[str, Any], fmt: str, out_f: int, in_f: int):
    """Unsigned codes [out, in], scales and zero points [out, groups] and the IntScheme of one layer's tensors."""
    from compress.quant import IntScheme

    bits, symmetric, strategy = int(args.get("num_bits", 8)), bool(args.get("symmetric", True)), args.get("strategy")
    if args.get("type", "int") != "int" or strategy not in ("group", "channel"):
        raise LayoutError(f"a {args.get('type')} scheme of strategy {strategy!r} (compress reads integer schemes "
                          "per group or channel)")
    if "weight_g_idx" in tensors or args.get("actorder") not in (None, False, "static"):
        raise LayoutError("activation-ordered groups (actorder with a g_idx); compress's int format stores groups of "
                          "consecutive inputs")
    offset = 2 ** (bits - 1)
    scheme = IntScheme(bits, symmetric, strategy, args.get("group_size") if strategy == "group" else None)
    scales = tensors["weight_scale"].reshape(out_f, -1)
    if fmt == "pack-quantized":
        codes = unpack(tensors["weight_packed"], bits, in_f)
        zeros = (unpack(tensors["weight_zero_point"].t().contiguous(), bits, out_f).t().to(torch.int64)
                 if not symmetric else None)
    elif fmt in ("int-quantized", "naive-quantized") and bits == 8:
        codes = (tensors["weight"].to(torch.int16) + offset).to(torch.uint8)
        zeros = tensors["weight_zero_point"].reshape(out_f, -1).to(torch.int64) + offset if not symmetric else None
    else:
        raise LayoutError(f"the {fmt!r} format at {bits} bits (compress reads pack-quantized, and int-quantized at 8)")
    if zeros is None:
        zeros = torch.full(scales.shape, offset, dtype=torch.int64)
    return codes, scales, zeros.float(), scheme


def load_model(path: str | Path, config: dict[str, Any]) -> nn.Module:
    """The compressed-tensors checkpoint at ``path`` (its ``quantization_config``: ``config``) as a model of compress
    ``int`` layers on the CPU, codes as stored (no re-quantization); layers the config leaves out are read as they
    are. CheckpointError naming the layers compress cannot run (FP8, activation-ordered groups, other formats)."""
    from compress.formats.integer import IntLinear
    from compress.linear import linear_shape

    def convert(name: str, module: nn.Module, tensors) -> nn.Module | None:
        group = _scheme_of(name, module, config)
        if group is None:
            return None
        in_f, out_f = linear_shape(module)
        own = {key.removeprefix(f"{name}."): tensors.get(key) for key in tensors.files if key.startswith(f"{name}.weight")}
        try:
            codes, scales, zeros, scheme = _int_from_ct(own, group.get("weights") or {},
                                                         group.get("format") or config.get("format"), out_f, in_f)
        except KeyError as exc:
            raise LayoutError(f"no tensor {name}.{exc.args[0]}") from None
        bias = tensors.get(f"{name}.bias") if f"{name}.bias" in tensors else None
        return IntLinear.from_codes(codes, scales, zeros, scheme, bias, module.weight.dtype)

    return load_converted(path, convert, "compressed-tensors")
