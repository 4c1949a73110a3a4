"""Linear-like layers seen one way: ``nn.Linear`` and GPT-2's ``Conv1D`` (weight stored [in, out]).

Methods read and write weights as ``[out_features, in_features]`` through these helpers, so GPT-2 needs
no special case anywhere else.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D: a linear layer with its weight transposed (GPT-2 and relatives)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_linear_like(module: nn.Module) -> bool:
    """True for layers computing ``x @ W.T + b`` with a plain 2-D weight: nn.Linear and Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features); works on the meta device."""
    if is_conv1d(module):
        in_f, out_f = module.weight.shape
        return in_f, out_f
    return module.in_features, module.out_features


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in] (a view for nn.Linear, a transposed view for Conv1D)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def in_stored_layout(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """An [out, in] tensor (a mask, a gradient) laid out as the layer stores its weight."""
    return tensor.t() if is_conv1d(module) else tensor


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an [out, in] weight back in place, in the layer's own dtype and layout."""
    target = module.weight
    src = weight.t() if is_conv1d(module) else weight
    with torch.no_grad():
        target.copy_(src.to(target.dtype))


def get_bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)
