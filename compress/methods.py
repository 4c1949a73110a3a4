"""The plugin API: what a compression method is.

A method is a name, a config class and the code that applies it. Third parties write a subclass of
:class:`Method`, declare it under the ``compress.plugins`` entry-point group, and it is usable from a
recipe with no change to compress::

    class Halve(Method):
        name = "halve"
        Config = HalveConfig          # a MethodConfig: unknown fields rejected, immutable
        needs = Needs.NOTHING         # or CALIBRATION (gets block inputs) or TRAINING (gets the model)
        # consumes / produces / writes: the layer states it takes and leaves (compress.states)

        def compress_block(self, work, config):
            for name, layer in work.targets.items():
                layer.weight.data.mul_(config.factor)
"""

from __future__ import annotations

import json
from enum import Enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from compress.errors import PluginError, Problem
from compress.states import KEEPS, LayerKind

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

    from compress.calibration.engine import BlockWork
    from compress.train import TrainContext


class Needs(str, Enum):
    """What a method needs from the engine."""

    NOTHING = "nothing"  # data-free: visits each decoder block with no inputs
    CALIBRATION = "calibration"  # gets the captured inputs of each decoder block
    TRAINING = "training"  # gets the whole model and the calibration set, in a stage of its own


class MethodConfig(BaseModel):
    """Base of every method's config: unknown fields are errors, instances are immutable, types are strict (a
    string is never read as a number or a boolean: ``bits: "4"`` and ``symmetric: "no"`` are errors; an integer
    fills a float field).

    ``from_dict`` reads arguments as a recipe or a checkpoint gives them (JSON's types: a list fills a tuple
    field, a string an enum field), and ``to_dict`` writes them so; they round-trip through the JSON stored in a
    checkpoint's ``config.json``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        try:
            text = json.dumps(data, allow_nan=True)
        except (TypeError, ValueError):  # a value JSON cannot hold (a date from YAML, an object): Python's rules
            return cls.model_validate(data)
        return cls.model_validate_json(text)


class Method:
    """Base class of a compression method. Subclasses set the class attributes and override the hooks
    their ``needs`` calls for.

    A method declares the layer states it takes and leaves (:mod:`compress.states`), and the format it stores,
    so a recipe's steps are checked together before anything runs."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    Config: ClassVar[type[MethodConfig]]
    needs: ClassVar[Needs] = Needs.NOTHING
    summary: ClassVar[str] = ""

    def needs_for(self, config: MethodConfig) -> Needs:
        """What this configuration needs (``needs`` unless some settings need less or more, e.g. static
        activation scales that need calibration data)."""
        return self.needs

    def consumes(self, config: MethodConfig) -> frozenset[LayerKind]:
        """The layer states this method can take (default: dense float weights only)."""
        return frozenset({LayerKind.DENSE})

    def produces(self, config: MethodConfig) -> LayerKind | None:
        """The state it leaves its targets in: MASKED (it sets ``work.set_mask`` for each target), FORMAT (it
        replaces each target with a :class:`compress.CompressedLinear` through ``work.replace``), FACTORED, or
        ``KEEPS`` (None, the default: it changes float weights in place and the state stays what it was)."""
        return KEEPS

    def mask_pattern(self, config: MethodConfig) -> str | None:
        """For methods that produce MASKED: the pattern of their masks (``2:4``, ``unstructured``), from which the
        plan says how the layers will be stored (:mod:`compress.formats.sparse`)."""
        return None

    def writes(self, config: MethodConfig) -> dict[str, Any] | None:
        """For methods that produce FORMAT: the per-layer scheme they store (``{"format": name, ...}``, as the
        format's ``scheme()`` gives it), so the plan can say which kernel each layer will run with."""
        return None

    def needs_reference(self, config: MethodConfig) -> bool:
        """True when the method also wants each block's uncompressed copy and its inputs in the uncompressed
        model (``work.reference``), e.g. to fit compressed layers to the original model's outputs."""
        return False

    def teacher(self, config: MethodConfig) -> str | None:
        """For TRAINING methods: the model ``context.teacher`` holds, frozen: ``"original"`` (the model before the
        recipe's first stage), ``"previous"`` (the model as it was before this stage), a model directory or Hub id
        (with the same tokenizer), or None for no teacher (the default)."""
        return None

    def trains(self, config: MethodConfig) -> tuple[str, ...]:
        """For TRAINING methods: the kinds of tensor that train (:data:`compress.train.KINDS`): ``weights`` and
        ``biases`` of the step's targets by default; ``scales`` (of targets stored in a format), ``norms`` (every
        normalisation layer of the model) and ``adapters`` (the LoRA pairs :meth:`prepare` put on the targets) on
        request. Codes never train; masks of pruned layers are kept."""
        return ("weights", "biases")

    def prepare(self, model: nn.Module, config: MethodConfig, layers: list[str], device: torch.device) -> None:
        """For TRAINING methods: change the model before its stage trains it on ``device``: its shape (drop
        decoder blocks to make a smaller student; the step's targets are found again afterwards) or its ``layers``
        (round them, put adapters on them); the default changes nothing."""

    def check_model(self, model: nn.Module, config: MethodConfig) -> list[Problem]:
        """Model-aware check of the step's arguments against the whole model on the meta device (e.g. block indices
        in range), before any weight is loaded; problems as :meth:`check_targets` returns them."""
        return []

    def check_targets(self, targets: dict[str, nn.Module], config: MethodConfig) -> list[Problem]:
        """Model-aware check on the meta device, before any weight is loaded.

        ``targets`` maps the qualified names of the selected layers to layers with real shapes and no data.
        Return the problems found, each ``where`` relative to the step's ``args`` ("" for the step itself),
        naming the layers concerned and what to do.
        """
        return []

    def before_stage(self, config: MethodConfig, survey: Callable[[Callable[[BlockWork], None]], None]
                     ) -> MethodConfig:
        """Called before the stage that runs this step, with ``survey(fn)``: a walk over the decoder blocks of the
        model as it stands, calling ``fn(work)`` with each block's targets (and calibration inputs, unless the step
        needs none) and changing nothing. Returns the config the step runs with (default: ``config``); a method that decides something for
        the whole model from every block (OWL's sparsity per block) overrides it."""
        return config

    def compress_block(self, work: BlockWork, config: MethodConfig) -> None:
        """Compress ``work.targets`` (the targeted layers of one decoder block, or of the layers outside
        the blocks). ``work.inputs`` holds the block's calibration inputs when ``needs`` is CALIBRATION.
        Runs under ``torch.no_grad()``; a method that optimises something per block enables it locally."""
        raise PluginError(
            f"method {self.name!r} declares needs={self.needs.value!r} but does not override compress_block; "
            "the plugin's author must implement it"
        )

    def train(self, context: TrainContext, config: MethodConfig) -> None:
        """Run a training stage on the whole model (``needs`` is TRAINING): ``context`` holds the model, the
        teacher when asked for, the data, the device, a checkpoint folder and the parameters that may train."""
        raise PluginError(
            f"method {self.name!r} declares needs={self.needs.value!r} but does not override train; "
            "the plugin's author must implement it"
        )
