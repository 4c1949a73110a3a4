"""Stored formats of compressed layers: each is an ``nn.Module`` class that can be built empty from its
per-module scheme (as written in a checkpoint's ``quantization_config``) and then filled by loading.

Formats are shared by methods (RTN, GPTQ and AWQ all write the ``int`` format); a plugin with a storage of
its own registers it with :func:`register_format`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
import torch.nn as nn

from compress.errors import CheckpointError


class CompressedLinear(nn.Module, ABC):
    """Base of stored compressed linear layers (the module that replaces an nn.Linear / Conv1D)."""

    format: ClassVar[str]
    in_features: int
    out_features: int
    #: Whether layers of this format that read the same input may be fused (``compress.fuse_projections``) by
    #: stacking their buffers: every buffer whose first dimension is ``out_features`` holds one row an output, in
    #: order. Off unless a format says so (a format may store a weight transposed).
    rows_stack: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, scheme: dict[str, Any],
              dtype: torch.dtype, device: torch.device | str = "meta") -> CompressedLinear:
        """A layer with the right buffers (unfilled) for ``scheme``, ready for ``load_state_dict``."""

    @abstractmethod
    def scheme(self) -> dict[str, Any]:
        """The per-module entry stored in the checkpoint: enough to rebuild the layer with ``empty``."""

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight [out, in] this layer computes with (a fresh tensor: writing to it changes nothing).

        Read-only, for code that inspects ``layer.weight`` (transformers' weight init on load, user code).
        """
        return self.dequantized_weight()

    @abstractmethod
    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight this layer computes with, as a dense [out, in] tensor."""


_FORMATS: dict[str, type[CompressedLinear]] = {}


def register_format(cls: type[CompressedLinear]) -> type[CompressedLinear]:
    """Class decorator: make ``cls`` loadable from checkpoints under ``cls.format``."""
    existing = _FORMATS.get(cls.format)
    if existing is not None and existing is not cls:
        raise CheckpointError(f"storage format {cls.format!r} is registered twice ({existing} and {cls})")
    _FORMATS[cls.format] = cls
    return cls


def format_class(name: str) -> type[CompressedLinear]:
    if name not in _FORMATS:
        raise CheckpointError(
            f"checkpoint uses storage format {name!r}, which no installed compress plugin provides "
            f"(known: {', '.join(sorted(_FORMATS))}); install the plugin that wrote it"
        )
    return _FORMATS[name]


def storage_summary(model: nn.Module) -> str:
    """One line: bytes of the compressed layers' weights (with scales / zeros, without bias) against the
    same weights in bf16."""
    stored = dense = count = 0
    for module in model.modules():
        if isinstance(module, CompressedLinear):
            stored += sum(b.numel() * b.element_size() for n, b in module.named_buffers(recurse=False) if n != "bias")
            dense += module.in_features * module.out_features * 2
            count += 1
    if not count:
        return "no compressed layers"
    return (f"{count} compressed layers: {stored / 1e6:.2f} MB of weights, {stored / dense:.3f}x their "
            f"{dense / 1e6:.2f} MB in bf16")


from compress.formats.int_linear import IntLinear  # noqa: E402  (registers the built-in format)

__all__ = ["CompressedLinear", "IntLinear", "format_class", "register_format", "storage_summary"]
