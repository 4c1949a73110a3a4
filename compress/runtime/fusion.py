"""Sibling projections run as one layer: linear layers (compressed, or ``nn.Linear``) that read the same input
(q/k/v after the input norm, gate/up after the post-attention norm) are computed by one layer over their
stacked rows.

In a decode step each weight matrix costs a kernel launch and the kernel's ramp-up and tail; the small ones (k
and v under grouped-query attention: 2 MB each in 4 bits at Llama-3-8B) run far from the memory bandwidth. One
kernel over q/k/v's rows and one over gate/up's reads the same bytes in fewer, larger launches.

:func:`fuse_projections` finds the groups by running the model once on two tokens and noting which layers
receive the very same input tensor; it needs no list of architectures. It considers ``nn.Linear`` itself (not
its subclasses, such as bitsandbytes' layers) and the compressed formats that declare ``rows_stack``. Layers
fuse when they have the same class, input width and stored scheme (dtype, for ``nn.Linear``), and every tensor
either has one row an output (it is stacked) or is the same in all of them (it is shared: a per-tensor scale
two layers happen to share, a static input scale of layers that read the same input). The members' tensors
become row views of the fused layer's, so no byte is held twice.

At run time the first member (in the order the model calls them) computes the whole group's output and keeps
it, with its input; each other member returns its slice when it is called with that same tensor, and computes
on its own otherwise, so a model that calls the layers differently gets right answers, only slower.

Calls of more than FUSE_MAX_TOKENS tokens (prefill) run the members one by one, as before fusing: there the
launches saved are nothing next to the matmuls, and fused int4 prefill measured 3-4% slower (8 x 512 tokens,
Llama-3-8B shape: 0.90x bf16 fused against 0.93x separate on an H100, 0.89x against 0.93x on an H200).

This is an inference transform: :func:`unfuse_projections` undoes it, and :func:`compress.save` asks for that
first.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn as nn

from compress.formats import CompressedLinear, layer_modules
from compress.runtime import RuntimeFeature

log = logging.getLogger(__name__)

#: Calls with up to this many tokens (decode steps, drafts being verified) run a group as one layer; more run the
#: members separately. The 4-bit decode kernels take up to 16 tokens (compress.kernels.gemv.DOT_MAX_TOKENS).
FUSE_MAX_TOKENS = 16


class _Group:
    """What the members of one fused group share: their output widths and the last output, with its input."""

    def __init__(self, sizes: list[int]):
        self.sizes = sizes
        self.cache: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None = None


class FusedProjection(nn.Module):
    """Stands in for member ``index`` of a fused group; ``layer`` is the original layer (its tensors are views
    of ``fused``'s, which only the first member holds)."""

    def __init__(self, layer: nn.Module, group: _Group, index: int, fused: nn.Module | None):
        super().__init__()
        self.layer = layer
        self.fused = fused
        self.index = index
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.__dict__["group"] = group  # shared by the members, not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.group
        if x.numel() > FUSE_MAX_TOKENS * x.shape[-1]:
            return self.layer(x)
        if self.fused is not None:
            outputs = self.fused(x).split(group.sizes, dim=-1)
            group.cache = (x, outputs)
            return outputs[0]
        cached = group.cache
        if cached is None or cached[0] is not x:
            return self.layer(x)
        if self.index == len(group.sizes) - 1:
            group.cache = None  # the last member: the group's output is no longer needed
        return cached[1][self.index]

    def extra_repr(self) -> str:
        return f"member {self.index} of {len(self.group.sizes)}"


def is_fused(model: nn.Module) -> bool:
    """Whether :func:`fuse_projections` has fused any of ``model``'s layers."""
    return any(isinstance(m, FusedProjection) for m in model.modules())


@torch.no_grad()
def fuse_projections(model: nn.Module) -> int:
    """Fuse ``model``'s linear layers (compressed, or ``nn.Linear``) that read the same input, in place; returns
    the number of groups fused (0 if there are none, or if the model is fused already).

    Call it once the model is on the device it will run on: moving it afterwards copies the fused tensors and
    the members' views apart. For inference: a fused ``nn.Linear``'s gradients would go to the fused weight.
    """
    if is_fused(model):
        return 0
    layers = {name: m for name, m in layer_modules(model)
              if type(m) is nn.Linear or isinstance(m, CompressedLinear) and m.rows_stack}  # not nn.Linear's subclasses
    groups = _shared_inputs(model, layers)
    fused = 0
    for names in groups:
        members = [layers[n] for n in names]
        why = _unfusable(members)
        if why:
            log.info("fusion: %s kept apart: %s", ", ".join(names), why)
            continue
        _fuse(model, names, members)
        fused += 1
    log.info("fusion: %d groups of layers that read the same input now run as one layer each", fused)
    return fused


@torch.no_grad()
def unfuse_projections(model: nn.Module) -> int:
    """Undo :func:`fuse_projections`: each member gets back tensors of its own. Returns the groups undone."""
    undone = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, FusedProjection):
            layer = module.layer
            tensors = _tensors(layer)
            for key, t in tensors.items():
                if t is not None:
                    tensors[key] = _like(t, t.clone())
            model.set_submodule(name, layer)
            undone += module.fused is not None
    return undone


def _shared_inputs(model: nn.Module, layers: dict[str, nn.Module]) -> list[list[str]]:
    """Names of the layers that receive the same input tensor in one forward pass of two tokens, a list per
    input, in call order; layers called more than once in the pass are left out."""
    calls: list[tuple[str, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args, name=name: calls.append((name, args[0])) if args else None)
             for name, m in layers.items()]
    try:
        if layers:
            first = next(iter(layers.values()))
            device = next(iter([*first.parameters(), *first.buffers()])).device
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device))
    except Exception as exc:  # noqa: BLE001 -- fusion only speeds a model up: without it the model still runs
        log.warning("fusion: nothing fused: the model's forward on two tokens of input_ids failed (%s: %s)",
                    type(exc).__name__, exc)
        return []
    finally:
        for hook in hooks:
            hook.remove()
    counts: dict[str, int] = {}
    for name, _ in calls:
        counts[name] = counts.get(name, 0) + 1
    by_input: dict[int, list[str]] = {}
    for name, x in calls:  # `calls` keeps every input alive, so ids are not reused
        if counts[name] == 1:
            by_input.setdefault(id(x), []).append(name)
    return [names for names in by_input.values() if len(names) > 1]


def _tensors(layer: nn.Module) -> dict[str, torch.Tensor | None]:
    """Where ``layer`` keeps its tensors: an ``nn.Linear``'s parameters, a compressed layer's buffers."""
    return layer._parameters if isinstance(layer, nn.Linear) else layer._buffers


def _like(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``new`` as a parameter if ``old`` is one."""
    return nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new


def _scheme(layer: nn.Module) -> dict:
    return layer.scheme() if isinstance(layer, CompressedLinear) else {"dtype": layer.weight.dtype}


def _unfusable(members: list[nn.Module]) -> str | None:
    """Why ``members`` cannot run as one layer, or None."""
    first = members[0]
    for m in members[1:]:
        if type(m) is not type(first):
            return f"different classes ({type(first).__name__}, {type(m).__name__})"
        if m.in_features != first.in_features or _scheme(m) != _scheme(first):
            return "different input widths or storage schemes"
    for m in members:
        other = m._buffers if isinstance(m, nn.Linear) else m._parameters
        if set(_tensors(m)) != set(_tensors(first)) or m._modules or any(t is not None for t in other.values()):
            return "different tensors"
    for key, t in _tensors(first).items():
        tensors = [_tensors(m)[key] for m in members]
        if t is None:
            if any(u is not None for u in tensors):
                return f"{key} is set in some layers only"
        elif not _stacked(key, members) and not all(torch.equal(u, t) for u in tensors[1:]):
            return f"{key} differs and has no row an output"
    return None


def _stacked(key: str, members: list[nn.Module]) -> bool:
    """Whether tensor ``key`` has one row an output in every member (then the fused layer stacks it)."""
    return all(_tensors(m)[key].dim() > 0 and _tensors(m)[key].shape[0] == m.out_features for m in members)


def _fuse(model: nn.Module, names: list[str], members: list[nn.Module]) -> None:
    first = members[0]
    # the same class and settings, sharing no hooks or state with the first member; its tensors are set below
    fused = copy.deepcopy(first, memo={id(t): t for t in _tensors(first).values() if t is not None})
    fused.out_features = sum(m.out_features for m in members)
    for key, t in _tensors(first).items():
        if t is not None and _stacked(key, members):
            stacked = torch.cat([_tensors(m)[key] for m in members])
            _tensors(fused)[key] = _like(t, stacked)
            for m, part in zip(members, stacked.split([m.out_features for m in members])):
                _tensors(m)[key] = _like(t, part)
    group = _Group([m.out_features for m in members])
    for i, (name, layer) in enumerate(zip(names, members)):
        model.set_submodule(name, FusedProjection(layer, group, i, fused if i == 0 else None))


class FuseProjections(RuntimeFeature):
    """The runtime feature ``fuse-projections``: :func:`fuse_projections` on load."""

    name = "fuse-projections"
    summary = "layers that read the same input (q/k/v, gate/up) run as one layer"

    def enable(self, model: nn.Module, config) -> None:
        fuse_projections(model)

    def disable(self, model: nn.Module) -> None:
        unfuse_projections(model)
