"""Perplexity under a stated protocol.

Default (the GPTQ / AWQ papers' protocol): tokenize the whole text once, cut it into non-overlapping
windows of ``seq_len`` tokens (the remainder is dropped), and report exp(mean NLL) over every predicted
token (``seq_len - 1`` per window). Options: a sliding ``stride`` (each window scores only its last
``stride`` tokens, with the rest as context), a BOS token prepended to every window, and a cap on tokens.

Windows are scored in batches on the model's device; the NLL is summed in float32 from each row's logits.

With a quantized KV cache (``kv``, :mod:`compress.kv`) each batch of windows goes through the cache as generation
does: the first ``prefill`` tokens at once, then one token a step, so every prediction after the prefill reads the
keys and values as the cache stored them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from compress.errors import DataError
from compress.eval.spec import KVCacheSpec

if TYPE_CHECKING:
    from transformers import Cache


@dataclass(frozen=True)
class Protocol:
    """Everything that changes a perplexity number; two numbers are comparable only if these are equal."""

    seq_len: int
    stride: int | None = None  # None: non-overlapping windows
    bos: bool = False
    max_tokens: int | None = None
    text: str = ""  # the data's name
    join: str = ""  # how documents were joined ("\n\n" for datasets splits; "" for a file read as is)
    text_sha256: str = ""  # the text's digest, when known: the same name with other contents is another text
    kv_cache: str = ""  # a quantized KV cache in the loop (KVCacheSpec.describe)

    def to_dict(self) -> dict:
        out = asdict(self)
        if not self.kv_cache:  # as before there was one: reports without it keep comparing equal
            del out["kv_cache"]
        return out

    def describe(self) -> str:
        """One line for reports, e.g. ``valid.txt, 1024-token windows (non-overlapping), no BOS``."""
        windows_ = "non-overlapping" if self.stride is None else f"stride {self.stride}"
        parts = [self.text or "(text)", f"{self.seq_len}-token windows ({windows_})", "BOS" if self.bos else "no BOS"]
        if self.max_tokens is not None:
            parts.append(f"first {self.max_tokens} tokens")
        if self.join:
            parts.append(f"documents joined with {self.join!r}")
        if self.kv_cache:
            parts.append(f"through a KV cache of {self.kv_cache}, one token a step after the prefill")
        return ", ".join(parts)


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll_sum: float
    predicted_tokens: int
    windows: int
    protocol: Protocol

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "nll_sum": self.nll_sum, "predicted_tokens": self.predicted_tokens,
                "windows": self.windows, "protocol": self.protocol.to_dict()}


def windows(ids: torch.Tensor, protocol: Protocol, bos_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The input windows [W, L] and, for each, how many of its last positions are scored [W]."""
    if protocol.stride is not None and not 0 < protocol.stride <= protocol.seq_len - 1:
        raise DataError(f"stride {protocol.stride} must be between 1 and seq_len - 1 ({protocol.seq_len - 1}): "
                        "a larger stride would skip tokens")
    if protocol.max_tokens is not None:
        ids = ids[: protocol.max_tokens]
    body = protocol.seq_len - 1 if protocol.bos else protocol.seq_len
    if protocol.stride is None:
        count = ids.numel() // body
        wins = ids[: count * body].view(count, body)
        scored = torch.full((count,), body - (0 if protocol.bos else 1))
    else:
        starts = list(range(0, max(ids.numel() - body, 0) + 1, protocol.stride))
        wins = torch.stack([ids[s : s + body] for s in starts]) if starts else ids.new_zeros(0, body)
        scored = torch.tensor([body - (0 if protocol.bos else 1)] + [protocol.stride] * (len(starts) - 1))
    if wins.shape[0] == 0:
        raise DataError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {protocol.seq_len}; "
                        "give more text or a smaller --seq-len")
    if protocol.bos:
        if bos_id is None:
            raise DataError("the protocol asks for a BOS token before every window, but the tokenizer has none; "
                            "drop the BOS option")
        wins = torch.cat([torch.full((wins.shape[0], 1), bos_id, dtype=wins.dtype), wins], dim=1)
    return wins, scored


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, protocol: Protocol, bos_id: int | None = None,
               batch_size: int = 8, device: torch.device | str | None = None, progress: bool = True,
               kv: KVCacheSpec | None = None, quantized: bool = True,
               new_cache: Callable[[], Cache] | None = None) -> PerplexityResult:
    """Perplexity of ``model`` on the 1-D token tensor ``ids`` under ``protocol``. With ``kv`` (which
    ``protocol.kv_cache`` must then describe), through a KV cache as generation runs: quantized as ``kv`` says, or
    in full precision (transformers' own cache, in the same steps) without ``quantized``, or made by ``new_cache``
    for each batch (another library's cache, in the same steps: ``kv`` then gives only the prefill)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    wins, scored = windows(ids, protocol, bos_id)
    nll_sum, count = 0.0, 0
    for start in tqdm(range(0, wins.shape[0], batch_size), desc="perplexity", unit="batch", disable=not progress or None):
        batch = wins[start : start + batch_size].to(device)
        keep = scored[start : start + batch_size]
        nll = _token_nll(model, batch) if kv is None else _token_nll_cached(model, batch, kv, quantized, new_cache)
        for row in range(batch.shape[0]):
            n = int(keep[row])
            nll_sum += nll[row, -n:].sum().item()
            count += n
    return PerplexityResult(math.exp(nll_sum / count), nll_sum, count, int(wins.shape[0]), protocol)


def _token_nll(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """NLL [B, L - 1] (float32) of each token after the first of ``batch`` given those before it."""
    logits = model(input_ids=batch, use_cache=False).logits
    return torch.stack([F.cross_entropy(logits[row, :-1].float(), batch[row, 1:], reduction="none")
                        for row in range(batch.shape[0])])


def _token_nll_cached(model: nn.Module, batch: torch.Tensor, kv: KVCacheSpec, quantized: bool,
                      new_cache: Callable[[], Cache] | None) -> torch.Tensor:
    """:func:`_token_nll` through a KV cache (:func:`cached_logits`)."""
    logits = cached_logits(model, batch, kv, quantized, new_cache)[:, :-1].float()
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none").view_as(batch[:, 1:])


def cached_logits(model: nn.Module, batch: torch.Tensor, kv: KVCacheSpec, quantized: bool = True,
                  new_cache: Callable[[], Cache] | None = None) -> torch.Tensor:
    """The logits [B, L, vocab] of ``batch`` [B, L] computed as generation does, through a KV cache quantized as
    ``kv`` says (or in full precision, transformers' own cache, without ``quantized``; or ``new_cache()``'s): the
    first ``kv.prefill`` tokens at once, then one a step."""
    from transformers import DynamicCache

    from compress.eval.speed import cache_keyword
    from compress.kv import KVScheme, QuantizedCache

    if new_cache is not None:
        cache = new_cache()
    elif quantized:
        cache = QuantizedCache(model.config, scheme=KVScheme.named(kv.scheme, kv.group_size, kv.residual))
    else:
        cache = DynamicCache(config=model.config)
    prefill = min(kv.prefill, batch.shape[1] - 1)
    steps = [batch[:, :prefill]] + list(batch[:, prefill:].split(1, dim=1))
    return torch.cat([model(input_ids=step, use_cache=True, **{cache_keyword(model): cache}).logits
                      for step in steps], 1)
