"""transformers integration: after ``import compress``, ``AutoModelForCausalLM.from_pretrained(dir)`` loads
compress checkpoints (``quantization_config.quant_method == "compress"``), building each compressed layer
empty from its stored scheme before the weights are read. Loading needs the formats a checkpoint names (the
``compress.formats`` entry points), never the methods that wrote it.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from compress.checkpoint_files import QUANT_METHOD


class CompressQuantizationConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a compress checkpoint.

    ``layers`` maps each compressed layer's qualified name to its stored scheme (format, bits, ...) and
    the method that wrote it; ``formats`` names the storage formats they use (all that loading needs);
    ``steps`` lists every step applied; ``recipe`` is the recipe used; ``runtime`` lists the runtime features
    (``{"feature": name, "args": {...}}``) that :func:`compress.load` enables.
    """

    def __init__(self, layers: dict[str, dict] | None = None, steps: list[dict] | None = None,
                 recipe: dict | None = None, compress_version: str | None = None,
                 runtime: list[dict] | None = None, formats: list[str] | None = None, **kwargs: Any):
        self.quant_method = QUANT_METHOD
        self.layers = layers or {}
        self.formats = formats or sorted({scheme["format"] for scheme in self.layers.values() if "format" in scheme})
        self.steps = steps or []
        self.recipe = recipe or {}
        self.runtime = runtime or []
        self.compress_version = compress_version
        self.extra = kwargs

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "compress_version": self.compress_version, "steps": self.steps,
                "recipe": self.recipe, "runtime": self.runtime, "formats": self.formats, "layers": self.layers}


class CompressHfQuantizer(HfQuantizer):
    """Replaces the stored layers with empty compressed layers on the meta device before loading."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, **kwargs):
        from compress.formats import build_empty_layers

        build_empty_layers(model, self.quantization_config.layers)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from compress.errors import CheckpointError, listed
        from compress.formats import compressed_modules

        bad = [f"{name} ({problem})" for name, module in compressed_modules(model) if (problem := module.check_loaded())]
        if bad:
            raise CheckpointError(f"{len(bad)} compressed layers do not match the scheme the checkpoint's config.json "
                                  f"declares: {listed(bad, 6)}; the config or the weights were edited or damaged: re-create the "
                                  "checkpoint")
        for _, module in compressed_modules(model):
            module.after_load()
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def register() -> None:
    """Make transformers aware of compress checkpoints (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(CompressQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(CompressHfQuantizer)


register()
