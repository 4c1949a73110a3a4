"""Runtime features: what changes how a loaded model runs and touches no stored weight (projection fusion now;
a quantized KV cache next). They are a kind of plugin of their own, beside methods and formats: found through
the ``compress.runtime`` entry-point group, named in a recipe's ``runtime:`` section, stored in a checkpoint's
``quantization_config`` under ``runtime``, and enabled by :func:`compress.load` once the model is on its device
(or by :func:`enable` on a model loaded through transformers)::

    runtime:
      - feature: fuse-projections
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch.nn as nn

from compress.errors import PluginError, Problem
from compress.methods import MethodConfig
from compress.entry_points import EntryPointRegistry


class FeatureConfig(MethodConfig):
    """Base of a runtime feature's arguments: unknown fields are errors, instances are immutable."""


class RuntimeFeature(ABC):
    """Base of a runtime feature: a name, a config class, and how to turn it on and off on a loaded model."""

    name: ClassVar[str]
    Config: ClassVar[type[FeatureConfig]] = FeatureConfig
    summary: ClassVar[str] = ""

    @abstractmethod
    def enable(self, model: nn.Module, config: FeatureConfig) -> None:
        """Turn the feature on for ``model`` (on the device it will run on)."""

    @abstractmethod
    def disable(self, model: nn.Module) -> None:
        """Turn it off again (before saving or moving the model)."""

    def check_model(self, model: nn.Module, config: FeatureConfig) -> list[Problem]:
        """Problems with running on ``model`` (on the meta device: checked with the recipe, before any weight is
        read); none by default."""
        return []


def _feature(obj: object, origin: str) -> RuntimeFeature:
    feature = obj() if isinstance(obj, type) else obj
    if not isinstance(feature, RuntimeFeature) or not isinstance(getattr(feature, "name", None), str):
        raise PluginError(f"{origin} gives {obj!r}, which is not a compress.runtime.RuntimeFeature with a name")
    return feature


features: EntryPointRegistry[RuntimeFeature] = EntryPointRegistry(
    "compress.runtime", "runtime feature", _feature, lambda f: f.name, "declare them under the compress.runtime "
    "entry-point group")


def enable(model: nn.Module, entries: list[dict[str, Any]] | None = None) -> list[str]:
    """Enable runtime features on ``model``: ``entries`` (``[{"feature": name, "args": {...}}]``), by default
    those its checkpoint records. Returns the names enabled."""
    if entries is None:
        qc = getattr(getattr(model, "config", None), "quantization_config", None)
        entries = list(getattr(qc, "runtime", None) or [])
    for entry in entries:
        feature = features.get(entry["feature"])
        feature.enable(model, feature.Config.model_validate(entry.get("args", {})))
    return [entry["feature"] for entry in entries]
