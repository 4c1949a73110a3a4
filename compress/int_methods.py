"""What the methods that store the ``int`` format share: their arguments (bits, group size, symmetry) and the
declarations the plan checks them by (they take dense or pruned layers and leave them stored in ``int``; any
group size fits any layer: a last group that does not fill is ragged)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from compress.methods import Method, MethodConfig
from compress.quant import IntScheme
from compress.states import LayerKind


class IntWeightConfig(MethodConfig):
    """The arguments every method writing the ``int`` format with 2-8 bit group-wise codes shares (RTN, GPTQ,
    AWQ)."""

    bits: int = Field(4, ge=2, le=8, description="bits per weight")
    group_size: int | None = Field(128, ge=1, description="weights per scale along in_features; null: per channel")
    symmetric: bool = Field(True, description="fixed zero point (true) or a stored zero point per group (false)")

    def int_scheme(self) -> IntScheme:
        if self.group_size is None:
            return IntScheme(self.bits, self.symmetric, "channel", None)
        return IntScheme(self.bits, self.symmetric, "group", self.group_size)


class IntMethod(Method):
    """Base of methods that store their targets in the ``int`` format; their config has ``int_scheme()``.

    Zero weights stay exactly zero in ``int`` (zero is always a code), so they take pruned layers too; a method
    whose rounding moves weights (GPTQ's error feedback) keeps the pruner's mask itself."""

    def consumes(self, config: MethodConfig) -> frozenset[LayerKind]:
        return frozenset({LayerKind.DENSE, LayerKind.MASKED})

    def produces(self, config: MethodConfig) -> LayerKind | None:
        return LayerKind.FORMAT

    def writes(self, config: MethodConfig) -> dict[str, Any] | None:
        return {"format": "int", **config.int_scheme().to_dict()}
