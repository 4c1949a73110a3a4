"""The format registry: storage formats are found through the ``compress.formats`` entry-point group (the
built-in ``int`` and ``fp8`` included), so loading a checkpoint needs the formats it names and never the methods
that wrote it.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from compress.errors import CheckpointError, PluginError
from compress.formats.base import CompressedLinear
from compress.linear import linear_shape
from compress.entry_points import EntryPointRegistry

FORMAT_GROUP = "compress.formats"


def _format_class(obj: object, origin: str) -> type[CompressedLinear]:
    if not (isinstance(obj, type) and issubclass(obj, CompressedLinear)):
        raise PluginError(f"{origin} gives {obj!r}, which is not a compress.CompressedLinear subclass")
    if not isinstance(getattr(obj, "format", None), str):
        raise PluginError(f"{origin}: format class {obj.__name__} does not set its 'format' name")
    return obj


formats: EntryPointRegistry[type[CompressedLinear]] = EntryPointRegistry(
    FORMAT_GROUP, "format", _format_class, lambda cls: cls.format, "declare formats under the compress.formats "
    "entry-point group")


def register_format(cls: type[CompressedLinear]) -> type[CompressedLinear]:
    """Class decorator: make ``cls`` loadable from checkpoints under ``cls.format`` in this process (packages
    declare their formats under the ``compress.formats`` entry-point group instead)."""
    formats.register(cls)
    return cls


def format_class(name: str) -> type[CompressedLinear]:
    """The format called ``name``; CheckpointError says which package to install when none provides it."""
    try:
        return formats.get(name)
    except PluginError as exc:
        raise CheckpointError(f"checkpoint uses storage format {name!r}: {exc}; install the package that "
                              "provides it") from exc


def build_empty_layers(model: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    """Replace the named linear layers of a (meta) model with empty layers of their stored schemes."""
    dtype = next(model.parameters()).dtype
    for name, scheme in layers.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError as exc:
            raise CheckpointError(f"checkpoint compresses layer {name!r}, which this model does not have; "
                                  "the config.json and the weights disagree") from exc
        if "format" not in scheme:
            raise CheckpointError(f"checkpoint layer {name!r} names no storage format; the config.json is broken")
        in_f, out_f = linear_shape(layer)
        new = format_class(scheme["format"]).empty(in_f, out_f, getattr(layer, "bias", None) is not None, scheme,
                                                   dtype, layer.weight.device)
        new.written_by = {k: scheme[k] for k in ("method", "method_version") if k in scheme}
        model.set_submodule(name, new)
