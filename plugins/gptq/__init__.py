"""GPTQ: Hessian-aware rounding of k-bit weights (the algorithm is in ``algorithm.py``).

Within a decoder block the targeted layers are taken group by group in execution order (layers reading the
same input, such as q/k/v, form one group and share one Hessian), and each group's Hessian is collected
after the earlier groups were quantized, so later layers correct for earlier layers' errors (attention
before MLP). The layers of a group are quantized in one sweep (their rows stacked: GPTQ treats rows
independently), which is also what makes it fast. Layers a pruner left masked keep their zeros.
"""

from __future__ import annotations

import logging

import torch
from pydantic import Field

from compress.calibration.engine import BlockWork
from compress.formats.integer import quantize_layer
from compress.int_methods import IntMethod, IntWeightConfig
from compress.linear import get_weight, linear_shape
from compress.methods import Needs
from compress.plugins.gptq.algorithm import gptq
from compress.solvers.hessian import Hessian, block_hessians

log = logging.getLogger(__name__)


class GPTQConfig(IntWeightConfig):
    damp: float = Field(0.01, gt=0, lt=1, description="damping added to H, as a fraction of its mean diagonal")
    block_size: int = Field(128, ge=1, description="columns per lazy batch update")
    act_order: bool = Field(True, description="quantize columns by decreasing Hessian diagonal (static groups)")
    mse: bool = Field(False, description="search each group's clipping range for the least weight error")
    sequential: bool = Field(True, description="collect each layer group's inputs after the earlier groups "
                                               "of the block were quantized")
    fit_original: bool = Field(False, description="fit the uncompressed model's layer outputs (on its own "
                                                  "inputs) rather than the layer's outputs on the compressed "
                                                  "model's inputs (GPTAQ's asymmetric calibration)")


class GPTQ(IntMethod):
    name = "gptq"
    Config = GPTQConfig
    needs = Needs.CALIBRATION
    summary = "GPTQ 2-8 bit, group-wise, act-order with static groups, packed storage"

    def needs_reference(self, config: GPTQConfig) -> bool:
        return config.fit_original

    def compress_block(self, work: BlockWork, config: GPTQConfig) -> None:
        groups = work.linear_groups()
        if config.sequential:
            for group in groups:
                self._quantize_group(work, group, block_hessians(work, [group], config.fit_original)[0], config)
        else:
            for group, hessian in zip(groups, block_hessians(work, groups, config.fit_original)):
                self._quantize_group(work, group, hessian, config)

    @staticmethod
    def _quantize_group(work: BlockWork, group: list[str], hessian: Hessian, config: GPTQConfig) -> None:
        layers = [work.targets[name] for name in group]
        rows = [linear_shape(layer)[1] for layer in layers]
        weight = torch.cat([get_weight(layer).to(work.device) for layer in layers])
        reference = None
        if hessian.C is not None:  # the same layers in the uncompressed block
            originals = [work.reference.block.get_submodule(work.local(name)) for name in group]
            reference = torch.cat([get_weight(layer).to(work.device) for layer in originals])
        masks = [work.mask(name) for name in group]
        keep = None if all(m is None for m in masks) else torch.cat(
            [torch.ones_like(w, dtype=torch.bool) if m is None else m for w, m in zip(weight.split(rows), masks)])
        label = ", ".join(group)
        result = gptq(weight, hessian.H, config.int_scheme(), layers[0].weight.dtype, config.damp,
                      config.block_size, config.act_order, config.mse, label, hessian.C, reference, keep)
        parts = zip(group, layers, result.codes.split(rows), result.scale.split(rows), result.zero.split(rows))
        for name, layer, codes, scale, zero in parts:
            work.replace(name, quantize_layer(layer, config.int_scheme(), work.device, scale, zero, codes))
