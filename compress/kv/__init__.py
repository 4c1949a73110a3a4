"""A quantized KV cache (KIVI's 2/4/8-bit keys per channel and values per token, or FP8), usable wherever
transformers takes a cache, with decode attention on CUDA that reads it as stored. See :mod:`compress.kv.cache`."""

from compress.kv.cache import KVScheme, PackedKV, QuantizedCache, QuantizedLayer

__all__ = ["KVScheme", "PackedKV", "QuantizedCache", "QuantizedLayer"]
