"""The contract between compress and the methods that train (distillation, QLoRA): a training step runs alone in
its stage and gets the whole model through a :class:`TrainContext`; :func:`compress.trainer.fit` is the loop they
share.

The engine builds the context from the plan. What may train is what the method declares
(:meth:`compress.Method.trains`), among the kinds of :data:`KINDS`: the float weights and biases of the step's
targets, the quantization scales of the targets stored in a format, and the model's normalisation layers. The
codes of a stored format never train, and a pruned layer's mask is kept (:attr:`TrainContext.masks`). Tensors a
format keeps as buffers are made parameters for the stage and buffers again after it, and every trainable tensor
trains in float32 (a master copy of a half-precision one, cast back at the end); every other parameter is frozen
for the stage and gets its flag back. The teacher is the model the method names (:meth:`Method.teacher`),
frozen; the data are the training windows with a held-out slice; the checkpoint folder is where the trainer keeps
what it needs to resume.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from compress.calibration.data import CalibrationSet
from compress.linear import in_stored_layout
from compress.lora import adapter_parameters
from compress.recipe import TrainingSpec
from compress.states import LayerKind, LayerState

#: What a training method may declare trainable (``Method.trains``).
KINDS = ("weights", "biases", "scales", "norms", "adapters")
_FACTORS = ("weight", "A", "B")  # a plain layer's weight; a factored layer's or a correction's factors


@dataclass
class TrainContext:
    """What a training method is given (see the module doc)."""

    model: nn.Module
    data: CalibrationSet  # training windows
    device: torch.device
    trainable: list[str]  # qualified names of the parameters that may train
    teacher: nn.Module | None = None  # frozen; None unless the method asks for one
    checkpoint_dir: Path | None = None  # where to keep resumable state; None: the run cannot be resumed
    held_out: CalibrationSet | None = None  # windows never trained on, for the evaluation loss
    settings: TrainingSpec = field(default_factory=TrainingSpec)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter -> bool mask of the weights kept
    resume: bool = False  # continue from the last checkpoint in checkpoint_dir
    source: str | None = None  # where the model as the stage begins is on disk (the recipe's, in its first stage)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters that may train, by qualified name (the only ones with ``requires_grad``)."""
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in self.trainable}

    def batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """The data as model inputs on the device: ``input_ids`` and ``labels`` (and ``attention_mask`` for padded
        examples) of ``batch_size`` samples."""
        return self.data.input_batches(batch_size, self.device)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.lower().endswith("norm")


def trainable_tensors(model: nn.Module, layers: list[str], kinds: tuple[str, ...]) -> list[tuple[nn.Module, str, str]]:
    """(module, attribute, qualified name) of every float tensor of ``kinds`` (see :data:`KINDS`): ``layers``' own
    weights (or factors), biases and quantization scales (a stored layer's, or the base's of a corrected one), the
    LoRA pairs on them (:mod:`compress.lora`), and the weights and biases of every normalisation layer of
    ``model``."""
    found: dict[str, tuple[nn.Module, str, str]] = {}

    def add(prefix: str, module: nn.Module, names: tuple[str, ...]) -> None:
        for attr in names:
            tensor = module._parameters.get(attr, module._buffers.get(attr))  # not a property computed from them
            if tensor is not None and tensor.is_floating_point():
                found[f"{prefix}.{attr}" if prefix else attr] = (module, attr, f"{prefix}.{attr}" if prefix else attr)

    for layer in layers:
        module = model.get_submodule(layer)
        if "weights" in kinds:
            add(layer, module, _FACTORS)
        if "biases" in kinds:  # a layer with adapters (peft's) holds its bias in its base layer
            base = "base_layer" if "base_layer" in module._modules else ""
            add(f"{layer}.{base}".rstrip("."), module.get_submodule(base), ("bias",))
        if "scales" in kinds:
            for sub, child in module.named_modules():
                add(f"{layer}.{sub}" if sub else layer, child, ("scales",))
        if "adapters" in kinds:
            found.update((entry[2], entry) for entry in adapter_parameters(model, [layer]))
    if "norms" in kinds:
        for name, module in model.named_modules():
            if _is_norm(module):
                add(name, module, ("weight", "bias"))
    return list(found.values())


@contextlib.contextmanager
def _as_float32_parameters(tensors: list[tuple[nn.Module, str, str]]) -> Iterator[None]:
    """Every tensor of ``tensors`` is a float32 parameter for the stage: a buffer (quantization scales) becomes a
    parameter, a half-precision one gets a float32 master copy, so that small updates are not rounded away.
    Afterwards each is what it was (a parameter, or a buffer persistent as before) in its own dtype, holding the
    trained values."""
    changed = []
    for module, attr, _ in tensors:
        is_buffer = attr in module._buffers
        current = module._buffers[attr] if is_buffer else module._parameters[attr]
        if not is_buffer and current.dtype == torch.float32:
            continue
        persistent = attr not in module._non_persistent_buffers_set
        (module._buffers if is_buffer else module._parameters).pop(attr)
        module._non_persistent_buffers_set.discard(attr)
        module.register_parameter(attr, nn.Parameter(current.detach().float()))
        changed.append((module, attr, is_buffer, persistent, current.dtype, current.requires_grad))
    try:
        yield
    finally:
        for module, attr, is_buffer, persistent, dtype, requires_grad in changed:
            data = module._parameters.pop(attr).detach().to(dtype)
            if is_buffer:
                module.register_buffer(attr, data, persistent=persistent)
            else:
                module.register_parameter(attr, nn.Parameter(data, requires_grad=requires_grad))


@contextlib.contextmanager
def training_context(model: nn.Module, layers: list[str], kinds: tuple[str, ...], states: dict[str, LayerState],
                     data: CalibrationSet, device: torch.device, teacher: nn.Module | None = None,
                     checkpoint_dir: Path | None = None, held_out: CalibrationSet | None = None,
                     settings: TrainingSpec | None = None, resume: bool = False,
                     source: str | None = None) -> Iterator[TrainContext]:
    """A :class:`TrainContext` in which only the tensors of ``kinds`` (of ``layers``, and the norms) train, with the
    masks of ``layers`` pruned in ``states``; afterwards every parameter has its ``requires_grad`` back, promoted
    buffers are buffers again and the model is in eval mode."""
    tensors = trainable_tensors(model, layers, kinds)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    masks = {}
    for owner, attr, name in tensors:
        state = states.get(name.rpartition(".")[0])
        if attr == "weight" and state is not None and state.kind == LayerKind.MASKED:
            masks[name] = in_stored_layout(owner, state.mask)
    with _as_float32_parameters(tensors):
        allowed = {name for _, _, name in tensors}
        for n, p in model.named_parameters():
            p.requires_grad_(n in allowed)
        try:
            yield TrainContext(model, data, device, [name for _, _, name in tensors], teacher, checkpoint_dir,
                               held_out, settings or TrainingSpec(), masks, resume, source)
        finally:
            for n, p in model.named_parameters():
                p.requires_grad_(flags.get(n, True))
            model.eval()
