"""Which layers a step touches: target and ignore patterns resolved against a model.

A pattern is one of:

* ``Linear``: every linear layer (``nn.Linear``, GPT-2's ``Conv1D``, and a loaded checkpoint's stored layers,
  :class:`compress.CompressedLinear`); any other class name matches layers of that class (``Conv1D``,
  ``IntLinear`` ...);
* a plain name such as ``lm_head`` or ``q_proj``: layers whose last name component is exactly that;
* a name with dots or wildcards: a glob on the full name (``model.layers.*.mlp.*``, ``*.0.self_attn.*``);
* ``re:REGEX``: a regular expression that must match the whole name (``re:.*layers\\.(0|1)\\..*``).

Only linear layers are ever selected (a stored layer as one, not the parts it holds). The output embedding
(``lm_head``) is left alone unless a pattern names it (by its name, not by class or wildcard), and a layer
sharing its weight with another (tied embeddings) cannot be selected.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import torch.nn as nn

from compress.formats.base import CompressedLinear, layer_modules
from compress.linear import is_linear_like


def is_layer(module: nn.Module) -> bool:
    """A layer a step can select: a linear one, or a stored one (a loaded checkpoint's)."""
    return is_linear_like(module) or isinstance(module, CompressedLinear)


def _pattern_kind(pattern: str) -> str:
    if pattern.startswith("re:"):
        return "regex"
    if any(ch in pattern for ch in ".*?["):
        return "glob"
    if pattern[:1].isupper():
        return "class"
    return "name"


def matches(pattern: str, name: str, module: nn.Module) -> bool:
    kind = _pattern_kind(pattern)
    if kind == "regex":
        return re.fullmatch(pattern[3:], name) is not None
    if kind == "glob":
        return fnmatch.fnmatchcase(name, pattern)
    if kind == "class":
        if pattern == "Linear":
            return is_layer(module)
        return any(cls.__name__ == pattern for cls in type(module).__mro__)
    return name.rsplit(".", 1)[-1] == pattern


def names_exactly(pattern: str, name: str) -> bool:
    """True when ``pattern`` names this layer itself (its full or last name), not by class or wildcard."""
    return pattern == name or (_pattern_kind(pattern) == "name" and name.rsplit(".", 1)[-1] == pattern)


@dataclass
class Selection:
    """The layers a step selects, in model order, and the patterns that selected nothing."""

    modules: dict[str, nn.Module] = field(default_factory=dict)
    unmatched_targets: list[int] = field(default_factory=list)  # indices into the targets list
    unmatched_ignores: list[int] = field(default_factory=list)
    tied: list[str] = field(default_factory=list)  # selected names whose weight is shared


def tied_weight_owners(model: nn.Module) -> dict[str, list[str]]:
    """For each module whose weight is shared, the other modules holding the same tensor."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if weight is not None:
            owners.setdefault(id(weight), []).append(name)
    return {n: [o for o in names if o != n] for names in owners.values() if len(names) > 1 for n in names}


def select(model: nn.Module, targets: list[str], ignore: list[str]) -> Selection:
    """Resolve ``targets`` minus ``ignore`` on ``model`` (works on the meta device)."""
    sel = Selection()
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    target_hits = [0] * len(targets)
    ignore_hits = [0] * len(ignore)
    tied = tied_weight_owners(model)
    for name, module in layer_modules(model):
        if not is_layer(module):
            continue
        hit = [i for i, p in enumerate(targets) if matches(p, name, module)]
        if module is output_embeddings:
            hit = [i for i in hit if names_exactly(targets[i], name)]
        for i in hit:
            target_hits[i] += 1
        if not hit:
            continue
        ignored = [i for i, p in enumerate(ignore) if matches(p, name, module)]
        for i in ignored:
            ignore_hits[i] += 1
        if ignored:
            continue
        sel.modules[name] = module
        if name in tied:
            sel.tied.append(name)
    sel.unmatched_targets = [i for i, n in enumerate(target_hits) if n == 0]
    sel.unmatched_ignores = [i for i, n in enumerate(ignore_hits) if n == 0]
    return sel


def linear_names(model: nn.Module) -> list[str]:
    """Distinct last-name components of the model's linear layers (for "did you mean" hints)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in layer_modules(model) if is_layer(m)})
