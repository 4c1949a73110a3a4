"""Which operation in a decoder block can absorb a per-channel scaling of a layer group's input.

Activation-aware methods (AWQ, SmoothQuant-style smoothing) multiply the input channels of a group of
linear layers by ``s`` and divide the output channels of the op that produces that input by ``s``, so the
block computes the same function. Which op that is (input norm -> q/k/v, v -> o, post-attention norm ->
gate/up, up -> down, fc1 -> relu -> fc2 ...) is found here by testing, not from a list of architectures:
for each candidate (a norm with a per-channel weight, or an earlier linear layer with as many outputs as
the group has inputs), scale it by random powers of two, divide the group's weight columns by the same,
and keep the candidate for which the block's output is unchanged. Powers of two make the check exact in
any floating-point format.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn

from compress.calibration.engine import BlockWork
from compress.linear import get_bias, get_weight, is_linear_like, linear_shape, set_weight

log = logging.getLogger(__name__)

TOLERANCE = 1e-4


@dataclass(frozen=True)
class Absorber:
    """An op whose output channels can be divided by ``s`` to compensate a group multiplied by ``s``."""

    name: str  # qualified name
    module: nn.Module

    @torch.no_grad()
    def scale_outputs(self, factor: torch.Tensor) -> None:
        """Multiply the op's output channels by ``factor`` (a vector over channels)."""
        if is_linear_like(self.module):
            w = get_weight(self.module)
            set_weight(self.module, w * factor.to(w.device, torch.float32).unsqueeze(1).to(w.dtype))
        else:
            self.module.weight.mul_(factor.to(self.module.weight.device, self.module.weight.dtype))
        bias = get_bias(self.module)
        if bias is not None:
            bias.mul_(factor.to(bias.device, bias.dtype))


@torch.no_grad()
def scale_inputs(layers: list[nn.Module], factor: torch.Tensor) -> None:
    """Multiply the input channels (weight columns) of ``layers`` by ``factor``."""
    for layer in layers:
        w = get_weight(layer)
        set_weight(layer, w * factor.to(w.device, torch.float32).to(w.dtype))


def _candidates(work: BlockWork, group: list[str], order: list[str]) -> list[tuple[str, nn.Module]]:
    """Ops executed before the group whose output width equals its input width, nearest first."""
    width = linear_shape(work.targets[group[0]])[0]
    first = min(order.index(n) for n in group if n in order)
    found = []
    for name in reversed(order[:first]):
        module = work.block.get_submodule(work.local(name)) if name != work.name else work.block
        if is_linear_like(module):
            if linear_shape(module)[1] == width:
                found.append((name, module))
        elif isinstance(getattr(module, "weight", None), torch.Tensor) and tuple(module.weight.shape) == (width,):
            found.append((name, module))
    return found


@torch.no_grad()
def _execution_order(work: BlockWork) -> list[str]:
    order: list[str] = []
    handles = []
    for local, module in work.block.named_modules():
        if local:
            qualified = f"{work.name}.{local}" if work.name else local
            handles.append(module.register_forward_hook(lambda _m, _i, _o, n=qualified: order.append(n)))
    try:
        work.forward(limit=1)
    finally:
        for h in handles:
            h.remove()
    seen: set[str] = set()
    return [n for n in order if not (n in seen or seen.add(n))]


@torch.no_grad()
def find_absorbers(work: BlockWork, groups: list[list[str]]) -> dict[str, Absorber | None]:
    """For each group (keyed by its first layer), the op that absorbs its input scaling, or None."""
    order = _execution_order(work)
    reference = work.forward(limit=1)[0]
    generator = torch.Generator().manual_seed(0)
    found: dict[str, Absorber | None] = {}
    for group in groups:
        found[group[0]] = None
        layers = [work.targets[n] for n in group]
        width = linear_shape(layers[0])[0]
        factor = 2.0 ** (torch.randint(0, 2, (width,), generator=generator).float() * 2 - 1)  # 1/2 or 2
        for name, module in _candidates(work, group, order):
            absorber = Absorber(name, module)
            absorber.scale_outputs(1 / factor)
            scale_inputs(layers, factor)
            out = work.forward(limit=1)[0]
            absorber.scale_outputs(factor)
            scale_inputs(layers, 1 / factor)
            diff = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
            if diff < TOLERANCE:
                found[group[0]] = absorber
                break
    return found
