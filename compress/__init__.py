"""compress: make Hugging Face language models smaller and faster.

Python API::

    import compress
    model = compress.apply(model, "recipes/w4-rtn.yaml")          # or a list of steps
    compress.save(model, "out/w4", tokenizer=tok)
    model = compress.load("out/w4")                                # or AutoModelForCausalLM.from_pretrained

Importing compress also teaches transformers to load compress checkpoints.
"""

from compress.api import apply
from compress.calibration.data import CalibrationSet
from compress.checkpoint import load, save
from compress.errors import CompressError, RecipeError
from compress.formats import CompressedLinear, KernelChoice, formats, register_format
from compress.hf import register as _register_with_transformers
from compress.methods import Method, MethodConfig, Needs
from compress.registry import registry
from compress.runtime import FeatureConfig, RuntimeFeature, features
from compress.runtime.fusion import fuse_projections, unfuse_projections
from compress.states import LayerKind
from compress.train import TrainContext

__version__ = "0.1.0"

_register_with_transformers()

__all__ = [
    "CalibrationSet", "CompressError", "CompressedLinear", "FeatureConfig", "KernelChoice", "LayerKind", "Method",
    "MethodConfig", "Needs", "RecipeError", "RuntimeFeature", "TrainContext", "apply", "features", "formats",
    "fuse_projections", "load", "register_format", "registry", "save", "unfuse_projections",
]
