"""The contract between compress and the methods that train (distillation, QLoRA): a training step runs alone in
its stage and gets the whole model through a :class:`TrainContext`.

The engine builds the context from the plan: the parameters that may train are those of the step's targets (the
others are frozen for the stage and given back their flags after it), the teacher is the model as it was before
the stage (a frozen copy, only when the method asks for one), the data are the calibration samples with their
labels (causal LM: the labels are the input ids; the model shifts them), and the checkpoint folder is where the
method keeps what it needs to resume an interrupted run.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from compress.calibration.data import CalibrationSet


@dataclass
class TrainContext:
    """What a training method is given (see the module doc)."""

    model: nn.Module
    data: CalibrationSet
    device: torch.device
    trainable: list[str]  # qualified names of the parameters that may train
    teacher: nn.Module | None = None  # the model before this stage, frozen; None unless the method asks
    checkpoint_dir: Path | None = None  # where to keep resumable state; None: the run cannot be resumed
    accelerator: Any | None = None  # an accelerate.Accelerator when the trainer runs distributed

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters that may train, by qualified name (the only ones with ``requires_grad``)."""
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in self.trainable}

    def batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """The data as model inputs on the device: ``input_ids`` and ``labels`` of ``batch_size`` samples."""
        for ids in self.data.batches(batch_size):
            ids = ids.to(self.device)
            yield {"input_ids": ids, "labels": ids.clone()}


@contextlib.contextmanager
def training_context(model: nn.Module, layers: list[str], data: CalibrationSet, device: torch.device,
                     teacher: bool, checkpoint_dir: Path | None) -> Iterator[TrainContext]:
    """A :class:`TrainContext` in which only the parameters of ``layers`` train; afterwards every parameter has
    its ``requires_grad`` back, the model is in eval mode, and the teacher (with ``teacher``) is released."""
    trainable = [f"{layer}.{p}" for layer in layers for p, _ in model.get_submodule(layer).named_parameters(recurse=False)]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    frozen_copy = None
    if teacher:
        frozen_copy = copy.deepcopy(model).eval().requires_grad_(False)
    allowed = set(trainable)
    for n, p in model.named_parameters():
        p.requires_grad_(n in allowed)
    try:
        yield TrainContext(model, data, device, trainable, frozen_copy, checkpoint_dir)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.eval()
