"""compress: make Hugging Face language models smaller and faster.

Python API::

    import compress
    model = compress.apply(model, "recipes/w4-rtn.yaml")          # or a list of steps
    compress.save(model, "out/w4", tokenizer=tok)
    model = compress.load("out/w4")                                # or AutoModelForCausalLM.from_pretrained

Importing compress also teaches transformers to load compress checkpoints: at once where transformers' quantizer
registry is already imported, else the moment it is (so that ``compress plugins``, which imports the methods, need
not load transformers). ``apply``, ``load``, ``save``, ``CalibrationSet`` and the projection fusion are imported on
first use, for the same reason.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from typing import Any

from compress.errors import CompressError, RecipeError
from compress.formats import CompressedLinear, KernelChoice, formats, register_format
from compress.methods import Method, MethodConfig, Needs
from compress.registry import registry
from compress.runtime import FeatureConfig, RuntimeFeature, features
from compress.states import LayerKind
from compress.train import TrainContext

__version__ = "0.1.0"

_ON_FIRST_USE = {"apply": "compress.api", "load": "compress.checkpoint", "save": "compress.checkpoint",
                 "CalibrationSet": "compress.calibration.data", "fuse_projections": "compress.runtime.fusion",
                 "unfuse_projections": "compress.runtime.fusion"}


def __getattr__(name: str) -> Any:
    if name not in _ON_FIRST_USE:
        raise AttributeError(f"module 'compress' has no attribute {name!r}")
    value = getattr(importlib.import_module(_ON_FIRST_USE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_ON_FIRST_USE})


class _RegisterWithTransformers(importlib.abc.MetaPathFinder):
    """Imports :mod:`compress.hf` (which registers compress's quantizer) as soon as transformers' quantizer registry
    has been imported. Asked once, then it leaves ``sys.meta_path``."""

    REGISTRY = "transformers.quantizers.auto"

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.REGISTRY:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)  # as the finders after this one would find it
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def run_then_register(module: Any) -> None:
            run(module)
            importlib.import_module("compress.hf")  # registers at its import (a no-op where it is importing)

        spec.loader.exec_module = run_then_register
        return spec


if _RegisterWithTransformers.REGISTRY in sys.modules:
    importlib.import_module("compress.hf")
elif not any(isinstance(finder, _RegisterWithTransformers) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTransformers())

__all__ = [
    "CalibrationSet", "CompressError", "CompressedLinear", "FeatureConfig", "KernelChoice", "LayerKind", "Method",
    "MethodConfig", "Needs", "RecipeError", "RuntimeFeature", "TrainContext", "apply", "features", "formats",
    "fuse_projections", "load", "register_format", "registry", "save", "unfuse_projections",
]
