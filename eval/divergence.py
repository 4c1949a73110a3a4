"""How far the compressed model's next-token distributions are from the original's, on the evaluation text.

More sensitive than perplexity: a compressed model can keep its perplexity while moving probability
between tokens. Both models read the same non-overlapping windows; at every predicted position we take

* KL(P_original || P_compressed), in nats, averaged over positions;
* top-1 agreement: the share of positions where both models' most likely next token is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from compress.eval.perplexity import Protocol, cached_logits, windows
from compress.eval.spec import KVCacheSpec

POSITIONS_PER_CHUNK = 512  # log-softmax over the vocabulary a chunk of positions at a time (memory)


@dataclass(frozen=True)
class Divergence:
    mean_kl: float  # nats per token
    top1_agreement: float
    tokens: int

    def to_dict(self) -> dict:
        return {"mean_kl": self.mean_kl, "top1_agreement": self.top1_agreement, "tokens": self.tokens}


def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=batch.to(device), use_cache=False).logits


@torch.no_grad()
def next_token_divergence(model: nn.Module, baseline: nn.Module, ids: torch.Tensor, seq_len: int,
                          max_tokens: int | None = None, batch_size: int = 8, progress: bool = True,
                          kv: KVCacheSpec | None = None) -> Divergence:
    """Mean KL(baseline || model) and top-1 agreement over the windows of ``ids`` (at most ``max_tokens``); with
    ``kv``, the model's logits through that quantized KV cache (:func:`compress.eval.perplexity.cached_logits`)."""
    wins, _ = windows(ids, Protocol(seq_len=seq_len, max_tokens=max_tokens), None)
    kl_sum, agree, count = 0.0, 0, 0
    for start in tqdm(range(0, wins.shape[0], batch_size), desc="KL vs baseline", unit="batch",
                      disable=not progress or None):
        batch = wins[start : start + batch_size]
        base = _logits(baseline, batch)[:, :-1]
        ours = _logits(model, batch) if kv is None else cached_logits(model, batch.to(next(model.parameters()).device), kv)
        ours = ours[:, :-1].to(base.device)
        for b, o in zip(base.flatten(0, 1).split(POSITIONS_PER_CHUNK), ours.flatten(0, 1).split(POSITIONS_PER_CHUNK)):
            log_p = F.log_softmax(b.float(), dim=-1)
            log_q = F.log_softmax(o.float(), dim=-1)
            kl_sum += F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
            agree += int((b.argmax(-1) == o.argmax(-1)).sum())
            count += b.shape[0]
    return Divergence(kl_sum / count, agree / count, count)
