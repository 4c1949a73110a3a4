"""Losses the training methods share.

:func:`causal_lm_loss` is the next-token cross-entropy of a causal language model, as the model's own ``labels``
argument computes it (the mean over the tokens whose label is not -100), without the model's full logits: the
model runs with ``logits_to_keep=1``, its last hidden states are taken from its decoder, and the head and the
cross-entropy run over chunks of tokens whose logits are recomputed in the backward pass. The float32 logits of a
whole batch (2 x 1024 tokens of Llama 3's 128k vocabulary: 1 GiB, with their log-softmax and gradient three times
that) never exist at once; a chunk holds :data:`CHUNK_LOGITS` of them. Distillation (``compress.plugins.distill``)
computes its divergences the same way from :func:`last_hidden` and :func:`chunked_sum`, for student and teacher.

It holds for a head that is a plain linear map of the last hidden state. The first call on a model checks that:
the model's own logits for the last position must equal the head applied to the hidden state taken; a model whose
logits are changed after the head (soft-capping, scaling) or that cannot keep one position is scored through its
own loss instead, said once in the log.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

#: Logits per chunk of the chunked cross-entropy (128 MiB in float32).
CHUNK_LOGITS = 2**25
IGNORE = -100

_chunked: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """The cross-entropy on ``batch['labels']`` (unshifted, -100 where no loss is taken) as ``(loss, parts)`` for
    :func:`compress.trainer.fit`; ``model`` may be wrapped for data parallelism (its ``module`` is the model)."""
    taken = last_hidden(model, {k: v for k, v in batch.items() if k != "labels"})
    if taken is None:
        out = model(**batch, use_cache=False)
        return out.loss, {"ce": float(out.loss.detach())}
    hidden, head, _ = taken
    loss = chunked_cross_entropy(head, hidden[:, :-1], batch["labels"][:, 1:])
    return loss, {"ce": float(loss.detach())}


def last_hidden(model: nn.Module, inputs: dict[str, torch.Tensor], **options
                ) -> tuple[torch.Tensor, nn.Module, Any] | None:
    """``model``'s last hidden states [batch, length, hidden], its head and its output (``options`` passed on, e.g.
    ``output_hidden_states``), from a forward that computes the logits of the last position only; None where the
    head's output of those states would not be the model's logits (then ``model`` must be run as it is)."""
    if not may_chunk(model):
        return None
    inner = getattr(model, "module", model)
    taken: list[torch.Tensor] = []
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else inner.base_model
    hook = decoder.register_forward_hook(lambda _m, _i, output: taken.append(output[0]))
    try:
        out = model(**inputs, use_cache=False, logits_to_keep=1, **options)
    finally:
        hook.remove()
    if not taken:
        _decide(inner, False, f"its decoder ({type(decoder).__name__}) did not run")
        return None
    head = inner.get_output_embeddings()
    hidden = taken[-1]
    if inner not in _chunked:
        with torch.no_grad():
            ours = head(hidden[:, -1:]).float()
        theirs = out.logits[:, -1:].detach().float()
        same = ours.shape == theirs.shape and torch.allclose(ours, theirs, rtol=1e-2, atol=1e-2 * float(
            theirs.abs().max().clamp_min(1)))
        if not _decide(inner, same, "its logits are not its head applied to the last hidden state"):
            return None
    return hidden, head, out


def may_chunk(model: nn.Module) -> bool:
    """Whether :func:`last_hidden` may serve ``model``: not once it found that it cannot."""
    inner = getattr(model, "module", model)
    return _chunked.get(inner, True) and _can_chunk(inner)


def chunked_sum(fn: Callable[..., torch.Tensor], *rows: torch.Tensor, width: int) -> torch.Tensor:
    """The sum of ``fn`` over chunks of the rows of ``rows`` (each [tokens, ...], the same tokens), a chunk holding
    about :data:`CHUNK_LOGITS` // ``width`` tokens, each chunk's intermediates recomputed in the backward pass."""
    step = max(1, CHUNK_LOGITS // width)
    if rows[0].shape[0] <= step:  # one chunk: recomputing it would save nothing
        return fn(*rows)
    return sum(checkpoint(fn, *(r[i:i + step] for r in rows), use_reentrant=False)
               for i in range(0, rows[0].shape[0], step))


def chunked_cross_entropy(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy of ``head(hidden)`` against ``labels`` (already aligned with ``hidden``; -100 is
    skipped), computed a chunk of tokens at a time with each chunk's logits recomputed in the backward pass."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    scored = labels != IGNORE
    hidden, labels = hidden[scored], labels[scored]
    if labels.numel() == 0:
        return hidden.sum() * 0.0

    def nll_sum(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h).float(), y, reduction="sum")

    return chunked_sum(nll_sum, hidden, labels, width=head.weight.shape[0]) / labels.numel()


def _can_chunk(model: nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or getattr(model, "base_model", model) is model:
        return _decide(model, False, "its head is not a linear layer under a decoder")
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return _decide(model, False, "its forward cannot keep only the last position's logits")
    return True


def _decide(model: nn.Module, chunked: bool, why: str) -> bool:
    if model not in _chunked:
        _chunked[model] = chunked
        if not chunked:
            log.info("%s: the loss runs over the model's full logits (%s)", type(model).__name__, why)
    return chunked
