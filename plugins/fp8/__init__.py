"""FP8 (E4M3) quantization: weights per output channel or per tensor; activations per token at run time
(``dynamic``), by a per-tensor scale measured on calibration data (``static``), or left in 16-bit
(``none``: weight-only). The storage format and its kernels are the core's ``fp8`` format
(:mod:`compress.formats.fp8`)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from compress.calibration.engine import BlockWork
from compress.linear import get_bias, get_weight
from compress.formats.fp8 import FP8_MAX, Fp8Linear
from compress.methods import Method, MethodConfig, Needs
from compress.states import LayerKind


class FP8Config(MethodConfig):
    weights: Literal["channel", "tensor"] = Field("channel", description="one weight scale per output row, or one")
    activations: Literal["dynamic", "static", "none"] = Field(
        "dynamic", description="fp8 activations scaled per token at run time, by a calibrated per-tensor scale, "
                               "or none (weight-only)")


class FP8(Method):
    name = "fp8"
    Config = FP8Config
    needs = Needs.NOTHING
    summary = "FP8 E4M3 weights (+ dynamic or static fp8 activations), torch._scaled_mm on Hopper"

    def needs_for(self, config: FP8Config) -> Needs:
        return Needs.CALIBRATION if config.activations == "static" else Needs.NOTHING

    def consumes(self, config: FP8Config) -> frozenset[LayerKind]:
        return frozenset({LayerKind.DENSE, LayerKind.MASKED})  # E4M3 stores zero exactly: a pruner's zeros stay

    def produces(self, config: FP8Config) -> LayerKind:
        return LayerKind.FORMAT

    def writes(self, config: FP8Config) -> dict[str, Any]:
        return {"format": "fp8", "weights": config.weights, "activations": config.activations}

    @torch.no_grad()
    def compress_block(self, work: BlockWork, config: FP8Config) -> None:
        input_scales = {}
        if config.activations == "static":
            amax = dict.fromkeys(work.targets, 0.0)

            def see(name: str, x: torch.Tensor) -> None:
                amax[name] = max(amax[name], x.abs().max().item())

            work.collect_inputs(work.targets, see)
            input_scales = {n: torch.tensor(max(a, 1e-12) / FP8_MAX) for n, a in amax.items()}
        for name, layer in list(work.targets.items()):
            home, dtype = layer.weight.device, layer.weight.dtype
            bias = get_bias(layer)
            new = Fp8Linear.from_weight(get_weight(layer).to(work.device), None if bias is None else bias.to(work.device),
                                        config.weights == "channel", config.activations, dtype, input_scales.get(name))
            work.replace(name, new.to(home))
