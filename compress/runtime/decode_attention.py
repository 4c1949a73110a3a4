"""The runtime feature ``decode-attention``: decode steps on CUDA attend through compress's Triton kernel
(:func:`compress.kv.attention.dense_decode_attention`) over full-precision caches too, as they do over quantized ones.

transformers' ``sdpa`` attention, given a mask (a static cache always has one), repeats each grouped key and value
head for its query heads before attending (``repeat_kv``): a decode step writes and reads those copies at every
layer. The kernel reads each key and value once for all its query heads, split over the cache's tokens as
flash-decoding does. Prompts, the CPU and unmasked steps (a dynamic cache without padding, which sdpa attends
without the copies) keep the model's own attention. Models must run ``sdpa`` attention::

    runtime:
      - feature: decode-attention
"""

from __future__ import annotations

import logging

import torch.nn as nn

from compress.runtime import RuntimeFeature

log = logging.getLogger(__name__)


class DecodeAttention(RuntimeFeature):
    name = "decode-attention"
    summary = "decode steps on CUDA attend with a kernel that reads grouped keys and values once (no repeated copies)"

    def enable(self, model: nn.Module, config) -> None:
        from compress.kv.attention import read_caches_directly

        implementation = getattr(model.config, "_attn_implementation", None)
        if implementation != "sdpa":
            log.warning("decode-attention: the model runs %r attention, not sdpa; its attention stays its own",
                        implementation)
            return
        log.info("decode-attention: %d attention layers decode through compress's kernel",
                 read_caches_directly(model))

    def disable(self, model: nn.Module) -> None:
        from compress.kv.attention import read_caches_directly

        read_caches_directly(model, on=False)
