"""Stored formats of compressed layers (a registry of their own, beside the methods'): each is a
:class:`CompressedLinear` subclass that can be built empty from its per-layer scheme, as a checkpoint's
``quantization_config`` records it, and then filled by loading.

Formats are shared by methods (int8, RTN, GPTQ and AWQ all write ``int``); a package adds one under the
``compress.formats`` entry-point group, code with :func:`register_format`.
"""

from compress.formats.base import CompressedLinear, KernelChoice, compressed_modules, layer_modules, storage_summary
from compress.formats.registry import build_empty_layers, format_class, formats, register_format

__all__ = ["CompressedLinear", "KernelChoice", "build_empty_layers", "compressed_modules", "format_class", "formats",
           "layer_modules", "register_format", "storage_summary"]
