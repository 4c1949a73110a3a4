"""The runtime feature ``kv-cache``: a checkpoint's default quantized KV cache (:mod:`compress.kv`). Once enabled
(``compress.load`` does it for a checkpoint whose recipe names it), ``model.generate`` without a cache of the caller's
uses a :class:`compress.kv.QuantizedCache` of the recorded scheme, and ``compress eval`` evaluates through it::

    runtime:
      - feature: kv-cache
        args: {scheme: int4, group_size: 64, residual: 128}
"""

from __future__ import annotations

import functools
import inspect
from typing import Literal

import torch.nn as nn
from pydantic import Field

from compress.errors import Problem, UsageError
from compress.runtime import FeatureConfig, RuntimeFeature

CACHE_KEYWORDS = ("cache", "past_key_values")  # generate's keyword for a cache: ``cache`` from transformers 5.2x


class KVCacheConfig(FeatureConfig):
    scheme: Literal["fp8", "int8", "int4", "int2"] = "int4"
    group_size: int = Field(64, ge=1, description="tokens per key scale and channels per value scale (int schemes)")
    residual: int = Field(128, ge=0, description="most recent tokens kept in full precision (int schemes)")


class KVCacheFeature(RuntimeFeature):
    name = "kv-cache"
    Config = KVCacheConfig
    summary = "generate stores keys and values quantized (KIVI int2/4/8 or fp8), decoding from the packed cache"

    def enable(self, model: nn.Module, config: KVCacheConfig) -> None:
        from compress.kv import KVScheme, QuantizedCache

        scheme = KVScheme.named(config.scheme, config.group_size, config.residual)
        keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        generate = type(model).generate

        @functools.wraps(generate)
        def generate_with_cache(*args, **kwargs):
            if all(kwargs.get(k) is None for k in CACHE_KEYWORDS):
                kwargs[keyword] = QuantizedCache(model.config, scheme=scheme)
            return generate(model, *args, **kwargs)

        model.generate = generate_with_cache
        model.kv_cache_scheme = config

    def check_model(self, model: nn.Module, config: KVCacheConfig) -> list[Problem]:
        from compress.kv import KVScheme
        from compress.kv.cache import check_model

        try:
            check_model(model.config, KVScheme.named(config.scheme, config.group_size, config.residual))
        except UsageError as exc:
            return [Problem("group_size" if "group_size" in str(exc) else "", str(exc))]
        return []

    def disable(self, model: nn.Module) -> None:
        for attribute in ("generate", "kv_cache_scheme"):
            model.__dict__.pop(attribute, None)
