"""Checkpoint layouts of other tools, which compress writes (``compress export``) and reads (``compress.load``):
each module packs and unpacks one layout's tensors and says what of a compress layer it cannot express; what they
share (the tensors outside the converted layers, loading a checkpoint into compress layers, the refusals) is here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from compress.errors import CheckpointError, listed


READERS = {"gptq": "gptq", "compressed-tensors": "compressed_tensors", "awq": "awq"}  # quant_method -> the module reading it


def read(path: str | Path, config: dict[str, Any]) -> nn.Module:
    """The checkpoint at ``path`` whose ``quantization_config`` is ``config`` (a quant_method of :data:`READERS`)
    as a model of compress layers on the CPU."""
    return importlib.import_module(f"compress.layouts.{READERS[config['quant_method']]}").load_model(path, config)


class LayoutError(ValueError):
    """What of one layer a layout cannot express (the caller names the layer)."""


def refuse_if(problems: list[str], message: str) -> None:
    """CheckpointError ``message: problem; problem ...`` (the first five) when there are any."""
    if problems:
        raise CheckpointError(f"{message}: {listed(problems)}")


def other_tensors(model: nn.Module, converted: list[str]) -> dict[str, torch.Tensor]:
    """``model``'s state outside the ``converted`` layers, as it is; a tied tensor once, under its first name."""
    inside = tuple(f"{name}." for name in converted)
    seen: set[int] = set()
    tensors = {}
    for key, value in model.state_dict().items():
        if not key.startswith(inside) and id(value.untyped_storage()) not in seen:
            seen.add(id(value.untyped_storage()))
            tensors[key] = value.detach().clone().contiguous()
    return tensors


def load_converted(path: str | Path, convert: Callable[[str, nn.Module, object], nn.Module | None],
                   what: str) -> nn.Module:
    """The checkpoint at ``path`` as a model on the CPU: built empty from its config, each linear-like layer for
    which ``convert(name, module, tensors)`` returns a compress layer replaced by it (a LayoutError it raises is
    collected and all are reported in one CheckpointError), every other tensor read as stored. The config's
    ``quantization_config`` (``what``'s) is dropped: the layers are compress's now, and a save records them."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from compress.linear import is_linear_like
    from compress.model import config_dtype, load_config
    from compress.streaming import ShardedTensors, has_meta, materialize

    model_config = load_config(str(path))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(model_config, dtype=config_dtype(model_config))
    tensors = ShardedTensors(path)
    problems = []
    for name, module in list(model.named_modules()):
        if not is_linear_like(module):
            continue
        try:
            layer = convert(name, module, tensors)
        except LayoutError as exc:
            problems.append(f"{name} has {exc}")
            continue
        if layer is not None:
            model.set_submodule(name, layer)
    refuse_if(problems, f"{path}: {what} layers compress cannot run")
    materialize(model, "", tensors)
    model.tie_weights()
    if has_meta(model):
        missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        raise CheckpointError(f"{path}: the checkpoint holds no tensor for {', '.join(missing[:5])}; it does not "
                              "match its config.json")
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.eval()
