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
from compress.formats import CompressedLinear, register_format
from compress.fusion import fuse_projections, unfuse_projections
from compress.hf import register as _register_with_transformers
from compress.methods import Method, MethodConfig, Needs
from compress.registry import registry

__version__ = "0.1.0"

_register_with_transformers()

__all__ = [
    "CalibrationSet", "CompressError", "CompressedLinear", "Method", "MethodConfig", "Needs", "RecipeError",
    "apply", "fuse_projections", "load", "register_format", "registry", "save", "unfuse_projections",
]
