"""Low-rank correction of quantization error (as EoRA / LQER): after a quantization step of the same stage, each
quantized layer gets a rank-r pair (A, B) fitted to what quantizing it lost, for the least error of the layer's
outputs on the calibration data, and is stored as the ``corrected`` format (the quantized layer plus x A^T B^T).

With Q the quantized weight and W the original, the pair is the whitened truncated SVD of W' - Q
(:func:`compress.solvers.lowrank.factor`), where W' is W (``fit_original: false``: the layer's own error on the
quantized model's inputs) or the weight that best gives the uncompressed model's outputs from the quantized model's
inputs (GPTAQ's asymmetric target, the default), so the correction also absorbs what the earlier layers lost. The
block's layers are taken group by group in execution order, each group's inputs collected after the earlier
groups were corrected.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from compress.calibration.engine import BlockWork
from compress.errors import CompressError, Problem
from compress.formats.base import CompressedLinear
from compress.formats.corrected import CorrectedLinear
from compress.linear import get_weight, linear_shape
from compress.methods import Method, MethodConfig, Needs
from compress.solvers.hessian import block_hessians, original_target
from compress.solvers.lowrank import factor
from compress.states import LayerKind


class LowRankCorrectConfig(MethodConfig):
    rank: int = Field(32, gt=0, description="rank of each layer's correction")
    damp: float = Field(0.01, gt=0, lt=1, description="damping added to the inputs' second moments before "
                                                      "whitening, as a fraction of their mean diagonal")
    fit_original: bool = Field(True, description="fit the uncompressed model's layer outputs (on its own inputs) "
                                                 "rather than the layer's own quantization error")
    bits: Literal[4, 8] | None = Field(None, description="store the pair in 8 or 4 bits; null: in the model's dtype")


class LowRankCorrect(Method):
    name = "lowrank-correct"
    Config = LowRankCorrectConfig
    needs = Needs.CALIBRATION
    summary = "rank-r correction of each quantized layer's error, output-aware (EoRA / LQER), after a quantization step"

    def consumes(self, config: LowRankCorrectConfig) -> frozenset[LayerKind]:
        return frozenset({LayerKind.FORMAT})

    def produces(self, config: LowRankCorrectConfig) -> LayerKind:
        return LayerKind.FORMAT

    def needs_reference(self, config: LowRankCorrectConfig) -> bool:
        return True  # the original weights, which only the stage's reference copy of the block still has

    def check_targets(self, targets: dict[str, nn.Module], config: LowRankCorrectConfig) -> list[Problem]:
        big = sorted(n for n, layer in targets.items() if config.rank >= min(linear_shape(layer)))
        if not big:
            return []
        smallest = min(min(linear_shape(targets[n])) for n in big)
        return [Problem("rank", f"{config.rank} is not below min(in_features, out_features) of {len(big)} layers "
                        f"({', '.join(big[:3])}{', ...' if len(big) > 3 else ''}; the smallest is {smallest}): "
                        f"use a rank below {smallest}, or ignore those layers in the step")]

    def compress_block(self, work: BlockWork, config: LowRankCorrectConfig) -> None:
        for group in work.linear_groups():
            hessian = block_hessians(work, [group], config.fit_original)[0]
            layers = [work.targets[name] for name in group]
            originals = [work.reference.block.get_submodule(work.local(name)) for name in group]
            for name, layer, original in zip(group, layers, originals):
                if isinstance(original, CompressedLinear) or not isinstance(layer, CompressedLinear):
                    raise CompressError(f"{self.name}: layer {name} must be quantized by a step of the same stage, "
                                        "which keeps its original weights until the stage ends")
            quantized = [layer.dequantized_weight(torch.float32).to(work.device) for layer in layers]
            targets = [get_weight(original).to(work.device).float() for original in originals]
            if hessian.C is not None:  # the weights that best give the original outputs, stacked
                targets = original_target(torch.cat(quantized), hessian, torch.cat(targets), config.damp,
                                          ", ".join(group)).split([q.shape[0] for q in quantized])
            for name, layer, original, W, Q in zip(group, layers, originals, targets, quantized):
                A, B = factor(W - Q, config.rank, hessian.H, config.damp, name)
                work.replace(name, CorrectedLinear.wrap(layer, A, B, get_weight(original).dtype, config.bits))
