"""Speculative decoding, greedy and lossless: a cheap drafter proposes tokens, the target model checks them
all in one forward pass and keeps the longest prefix it would have produced itself, plus its own next token.
The output is the target's greedy output token for token; what changes is how many target forwards it takes.

Drafters: a draft model (one given by the user, or the compressed model drafting for its original) and prompt
lookup (n-gram matching in the text so far, no model). The loop is ours rather than ``generate``'s assisted
path because it counts proposals and acceptances exactly; transformers' own assisted generation
(``assistant_model`` / ``prompt_lookup_num_tokens``) is timed beside it, checked against the same greedy
output.

Greedy here is plain argmax: references come from ``generate`` with a clean ``GenerationConfig``, so logits
processors in a model's own generation config (repetition penalty...) cannot make them differ.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn as nn
from transformers import DynamicCache, GenerationConfig

from compress.eval.speed import cache_keyword, model_device, synchronize


class Drafter(Protocol):
    name: str

    def propose(self, seq: torch.Tensor, k: int) -> torch.Tensor:
        """Up to ``k`` next tokens (1-D, possibly empty) for the sequence ``seq`` [1, T]."""

    def accept(self, length: int) -> None:
        """The first ``length`` tokens of the sequence are final (the rest of the last proposal was rejected)."""

    def reset(self) -> None:
        """Forget the previous sequence (before a new prompt)."""


def forward_with_cache(model: nn.Module, input_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """Logits of ``input_ids`` after the positions in ``cache`` (which grows by them)."""
    return model(input_ids=input_ids, use_cache=True, **{cache_keyword(model): cache}).logits


def truncate(cache: DynamicCache, length: int) -> None:
    """Keep the first ``length`` positions of ``cache`` (``crop`` with a negative count: the form both
    transformers 5.17 and later accept)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


class ModelDrafter:
    """Greedy proposals from a draft model that keeps its own KV cache across steps."""

    def __init__(self, model: nn.Module, tokens: int, name: str = "draft model"):
        self.model, self.tokens, self.name = model, tokens, name
        self.reset()

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.model.config)
        self.cached = 0

    def propose(self, seq: torch.Tensor, k: int) -> torch.Tensor:
        step = seq[:, self.cached :].to(model_device(self.model))
        out = []
        for _ in range(min(k, self.tokens)):
            logits = forward_with_cache(self.model, step, self.cache)
            self.cached += step.shape[1]
            step = logits[:, -1:].argmax(-1)
            out.append(step[0])
        return torch.cat(out).to(seq.device) if out else seq.new_zeros(0)

    def accept(self, length: int) -> None:
        if self.cached > length:
            truncate(self.cache, length)
            self.cached = length


class PromptLookupDrafter:
    """Proposes what followed the most recent earlier occurrence of the sequence's last n-gram (longest n
    first, down to 1): free drafts for text that repeats its input (code, extraction, edits)."""

    def __init__(self, tokens: int, ngram: int):
        self.tokens, self.ngram, self.name = tokens, ngram, "prompt lookup"

    def propose(self, seq: torch.Tensor, k: int) -> torch.Tensor:
        ids = seq[0].tolist()
        k = min(k, self.tokens)
        for n in range(min(self.ngram, len(ids) - 1), 0, -1):
            tail = ids[-n:]
            for start in range(len(ids) - n - 1, -1, -1):
                if ids[start : start + n] == tail:
                    return torch.tensor(ids[start + n : start + n + k], dtype=seq.dtype, device=seq.device)
        return seq.new_zeros(0)

    def accept(self, length: int) -> None:
        pass

    def reset(self) -> None:
        pass


@dataclass
class SpeculativeStats:
    proposed: int = 0
    accepted: int = 0
    target_forwards: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    # (prompt, first differing new token) where the output differs from plain greedy: in bf16 / fp16 this
    # happens at near-ties, because verifying k tokens at once computes the logits with other kernels
    mismatches: list[tuple[int, int]] = field(default_factory=list)

    def add(self, other: SpeculativeStats) -> None:
        for name in ("proposed", "accepted", "target_forwards", "new_tokens", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def _eos_ids(model: nn.Module) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


@torch.no_grad()
def speculative_greedy(target: nn.Module, drafter: Drafter, prompt: torch.Tensor,
                       max_new_tokens: int) -> tuple[torch.Tensor, SpeculativeStats]:
    """The target's greedy continuation of ``prompt`` [1, T] (stopping after an EOS, like ``generate``),
    produced by drafting and verifying; returns the whole sequence [1, T + n] and the counts."""
    seq = prompt.to(model_device(target))
    cache, cached = DynamicCache(config=target.config), 0
    eos = _eos_ids(target)
    stats = SpeculativeStats()
    while stats.new_tokens < max_new_tokens:
        room = max_new_tokens - stats.new_tokens - 1  # the target adds one token of its own every step
        draft = drafter.propose(seq, room) if room > 0 else seq.new_zeros(0)
        feed = torch.cat([seq[:, cached:], draft[None]], dim=1)
        logits = forward_with_cache(target, feed, cache)
        greedy = logits[0, -(draft.numel() + 1) :].argmax(-1)
        accepted = int((greedy[: draft.numel()] == draft).int().cumprod(0).sum())
        new = greedy[: accepted + 1]  # equal to draft[:accepted], then the target's own token
        stop = next((i for i, t in enumerate(new.tolist()) if t in eos), None)
        if stop is not None:
            new = new[: stop + 1]
        seq = torch.cat([seq, new[None]], dim=1)
        cached = seq.shape[1] - 1  # the cache holds everything but the newest token
        truncate(cache, cached)
        drafter.accept(cached)
        stats.proposed += draft.numel()
        stats.accepted += accepted
        stats.target_forwards += 1
        stats.new_tokens += new.numel()
        if stop is not None:
            break
    return seq, stats


def plain_greedy_config(model: nn.Module, max_new_tokens: int, pad_token_id: int) -> GenerationConfig:
    return GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
                            eos_token_id=model.generation_config.eos_token_id)


def _timed(fn, device: torch.device):
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


@torch.no_grad()
def greedy_references(target: nn.Module, prompts: list[torch.Tensor], max_new_tokens: int,
                      pad_token_id: int) -> tuple[list[torch.Tensor], float]:
    """The target's plain greedy outputs (dynamic KV cache) and their total time, after one warm-up."""
    device = model_device(target)
    config = plain_greedy_config(target, max_new_tokens, pad_token_id)
    target.generate(prompts[0].to(device), generation_config=config)  # warm-up
    outs, total = [], 0.0
    for p in prompts:
        out, seconds = _timed(lambda: target.generate(p.to(device), generation_config=config), device)
        outs.append(out)
        total += seconds
    return outs, total


def run_drafter(target: nn.Module, drafter: Drafter, prompts: list[torch.Tensor], references: list[torch.Tensor],
                max_new_tokens: int) -> SpeculativeStats:
    """Our loop over every prompt (after one warm-up), checked token for token against ``references``."""
    device = model_device(target)
    drafter.reset()
    speculative_greedy(target, drafter, prompts[0], max_new_tokens)
    total = SpeculativeStats()
    for i, (prompt, reference) in enumerate(zip(prompts, references)):
        drafter.reset()
        (seq, stats), seconds = _timed(lambda: speculative_greedy(target, drafter, prompt, max_new_tokens), device)
        stats.seconds = seconds
        total.add(stats)
        record_difference(total, i, prompt, seq, reference)
    return total


def record_difference(stats: SpeculativeStats, index: int, prompt: torch.Tensor, out: torch.Tensor,
             reference: torch.Tensor) -> None:
    """Record which new token of ``out`` first differs from ``reference`` (both [1, T + n]), if one does."""
    a, b = out[0, prompt.shape[1] :].cpu(), reference[0, prompt.shape[1] :].cpu()
    if torch.equal(a, b):
        return
    length = min(a.numel(), b.numel())
    differ = (a[:length] != b[:length]).nonzero()
    stats.mismatches.append((index, int(differ[0]) if differ.numel() else length))


@torch.no_grad()
def run_hf_assisted(target: nn.Module, prompts: list[torch.Tensor], references: list[torch.Tensor],
                    config: GenerationConfig, assistant_model: nn.Module | None = None) -> SpeculativeStats:
    """transformers' assisted generation (``assistant_model``, or prompt lookup set in ``config``): time and
    equality with the references (it does not report acceptances)."""
    device = model_device(target)
    assist = {"assistant_model": assistant_model} if assistant_model is not None else {}
    target.generate(prompts[0].to(device), generation_config=config, **assist)
    total = SpeculativeStats()
    for i, (prompt, reference) in enumerate(zip(prompts, references)):
        out, seconds = _timed(lambda: target.generate(prompt.to(device), generation_config=config, **assist), device)
        total.seconds += seconds
        total.new_tokens += out.shape[1] - prompt.shape[1]
        record_difference(total, i, prompt, out, reference)
    return total


def result_row(method: str, stats: SpeculativeStats, greedy_seconds: float, prompts: int) -> dict:
    row = {"method": method, "identical": not stats.mismatches,
           "mismatches": [{"prompt": p, "new_token": t} for p, t in stats.mismatches],
           "prompts": prompts, "new_tokens": stats.new_tokens, "seconds": stats.seconds,
           "speedup": greedy_seconds / stats.seconds if stats.seconds else None}
    if stats.target_forwards:
        row.update(proposed=stats.proposed, accepted=stats.accepted, target_forwards=stats.target_forwards,
                   acceptance_rate=stats.accepted / stats.proposed if stats.proposed else 0.0,
                   tokens_per_forward=stats.new_tokens / stats.target_forwards)
    return row


def speculative_table(target: nn.Module, drafts: dict[str, nn.Module], prompts: list[torch.Tensor],
                      max_new_tokens: int, draft_tokens: int, lookup_tokens: int, lookup_ngram: int,
                      pad_token_id: int) -> dict:
    """The ``speculative`` task: for each draft model and for prompt lookup, our loop (acceptance, lossless
    check, speedup over plain greedy) and transformers' assisted generation (time, lossless check)."""
    references, greedy_seconds = greedy_references(target, prompts, max_new_tokens, pad_token_id)
    greedy = plain_greedy_config(target, max_new_tokens, pad_token_id)
    rows = []
    for name, draft in drafts.items():
        stats = run_drafter(target, ModelDrafter(draft, draft_tokens, name), prompts, references, max_new_tokens)
        rows.append(result_row(f"{name} drafting (compress loop, {draft_tokens} tokens)", stats, greedy_seconds,
                         len(prompts)))
        stats = run_hf_assisted(target, prompts, references, greedy, assistant_model=draft)
        rows.append(result_row(f"{name} drafting (transformers assistant_model)", stats, greedy_seconds, len(prompts)))
    stats = run_drafter(target, PromptLookupDrafter(lookup_tokens, lookup_ngram), prompts, references, max_new_tokens)
    rows.append(result_row(f"prompt lookup (compress loop, {lookup_ngram}-gram, {lookup_tokens} tokens)", stats,
                     greedy_seconds, len(prompts)))
    lookup = GenerationConfig(**greedy.to_diff_dict(), prompt_lookup_num_tokens=lookup_tokens,
                              max_matching_ngram_size=lookup_ngram)
    stats = run_hf_assisted(target, prompts, references, lookup)
    rows.append(result_row("prompt lookup (transformers prompt_lookup_num_tokens)", stats, greedy_seconds, len(prompts)))
    return {"greedy_seconds": greedy_seconds, "max_new_tokens": max_new_tokens, "prompts": len(prompts),
            "rows": rows}
