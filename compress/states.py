"""Layer states: what a layer is between the steps of a recipe.

Every targeted layer starts ``dense`` (a float weight). A step declares which states it takes
(:meth:`compress.Method.consumes`) and which it leaves (:meth:`compress.Method.produces`): a pruner leaves
``masked`` layers (a float weight with a mask of the weights that must stay zero), a quantizer leaves a stored
``format``, a low-rank method ``factored`` layers. The plan follows each layer through the recipe and refuses a
step that would receive a state it cannot take, with the fix; while the recipe runs, the state (the mask, the
format and the method that wrote it) travels with the layer from step to step, so a quantizer can keep a mask
that a pruner left.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import torch


class LayerKind(str, Enum):
    """What a layer holds between two steps."""

    DENSE = "dense"  # a float weight, free to change
    MASKED = "masked"  # a float weight whose masked-out entries must stay zero
    FORMAT = "format"  # a stored format (a compress.CompressedLinear): no later step may change its weights
    FACTORED = "factored"  # a product of smaller float factors

    def described(self) -> str:
        return {"dense": "dense", "masked": "masked (pruned)", "format": "stored in a format",
                "factored": "factored"}[self.value]


#: What a step that only changes float weights in place leaves: the state it was given.
KEEPS = None


@dataclass
class LayerState:
    """One layer's state while a recipe runs."""

    kind: LayerKind = LayerKind.DENSE
    mask: torch.Tensor | None = None  # bool [out, in], True where a weight is kept (MASKED, or FORMAT after it)
    format: str | None = None  # the stored format's name (FORMAT only)
    written_by: dict[str, Any] = field(default_factory=dict)  # {"method": ..., "method_version": ...}

    def masked(self, mask: torch.Tensor) -> LayerState:
        return replace(self, kind=LayerKind.MASKED, mask=mask.to(torch.bool))


def describe_kinds(kinds: frozenset[LayerKind] | set[LayerKind]) -> str:
    order = list(LayerKind)
    return " or ".join(k.value for k in sorted(kinds, key=order.index))
