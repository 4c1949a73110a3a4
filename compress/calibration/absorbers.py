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
    """An op whose output channels can be divided by ``s`` to compensate a group multiplied by ``s``.

    ``index`` maps each of the group's input channels to the op's output channel that feeds it, when the op
    has fewer outputs than the group has inputs (v_proj -> o_proj under grouped-query attention, where each
    value head serves several query heads); None when they correspond one to one.
    """

    name: str  # qualified name
    module: nn.Module
    index: torch.Tensor | None = None

    def tie(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A group-input scale ``s`` made realisable: (the op's output scale, the group's input scale). Input
        channels fed by the same output channel share the mean of their scales."""
        if self.index is None:
            return s, s
        width = int(self.index.max()) + 1
        idx = self.index.to(s.device)
        # a one-hot sum, not index_add_: on CUDA that adds with atomics, in an order that changes run to run
        members = idx.unsqueeze(0) == torch.arange(width, device=s.device).unsqueeze(1)  # [width, channels]
        t = torch.where(members, s, 0).sum(dim=1) / members.sum(dim=1).to(s.dtype)
        return t, t[idx]

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


HEAD_DIMS = (32, 64, 80, 96, 128, 160, 256)


def _head_expansions(produced: int, width: int) -> list[torch.Tensor]:
    """Channel maps for an op with ``produced`` outputs feeding ``width`` inputs through repeated heads
    (grouped-query attention): input channel c of head h reads output channel (h // repeat) * d + c % d."""
    if width <= produced or width % produced:
        return []
    repeat = width // produced
    c = torch.arange(width)
    return [((c // d) // repeat) * d + c % d for d in HEAD_DIMS if produced % d == 0]


def _candidates(work: BlockWork, group: list[str], order: list[str]) -> list[Absorber]:
    """Ops executed before the group whose outputs can feed its inputs (one to one, or through repeated
    heads), nearest first."""
    width = linear_shape(work.targets[group[0]])[0]
    first = min(order.index(n) for n in group if n in order)
    found = []
    for name in reversed(order[:first]):
        module = work.block.get_submodule(work.local(name)) if name != work.name else work.block
        if is_linear_like(module):
            produced = linear_shape(module)[1]
            if produced == width:
                found.append(Absorber(name, module))
            found += [Absorber(name, module, index) for index in _head_expansions(produced, width)]
        elif isinstance(getattr(module, "weight", None), torch.Tensor) and tuple(module.weight.shape) == (width,):
            found.append(Absorber(name, module))
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
        for absorber in _candidates(work, group, order):
            produced, consumed = absorber.tie(factor)
            if absorber.index is not None:  # each output channel's own power of two, repeated over its heads
                produced = 2.0 ** (torch.randint(0, 2, produced.shape, generator=generator).float() * 2 - 1)
                consumed = produced[absorber.index]
            absorber.scale_outputs(1 / produced)
            scale_inputs(layers, consumed)
            out = work.forward(limit=1)[0]
            absorber.scale_outputs(produced)
            scale_inputs(layers, 1 / consumed)
            diff = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
            if diff < TOLERANCE:
                found[group[0]] = absorber
                break
    return found
