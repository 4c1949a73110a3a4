"""Outputs side by side: greedy and seeded sampled continuations of fixed prompts, from the compressed model
and its original, and how often their greedy tokens agree.

Each prompt is generated on its own (batch 1, no padding), so a difference between the two models is never
a padding artefact. Sampling re-seeds torch before every generation: both models draw with the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

# The classic check first; then prose, code (ref-a and code models) and a list, which break differently.
DEFAULT_PROMPTS = [
    "The quick brown fox jumped over the",
    "The capital of France is",
    "def fibonacci(n):\n",
    "import numpy as np\n\n\ndef normalize(x):\n",
    "1, 2, 3, 4, 5,",
]

SAMPLING = {"do_sample": True, "temperature": 0.8, "top_p": 0.95}


@dataclass(frozen=True)
class Continuation:
    prompt: str
    tokens: list[int]
    text: str


def generation_defaults(tokenizer) -> dict:
    """Keyword arguments every generate call here passes: a pad token (silences transformers' warning)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"pad_token_id": pad if pad is not None else 0}


@torch.no_grad()
def continue_prompts(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int,
                     seed: int | None = None, progress: bool = True) -> list[Continuation]:
    """Greedy continuations (``seed`` None) or sampled ones (torch re-seeded with ``seed`` per prompt)."""
    device = next(model.parameters()).device
    options = {**generation_defaults(tokenizer), "max_new_tokens": max_new_tokens}
    options.update(SAMPLING if seed is not None else {"do_sample": False})
    out = []
    for prompt in tqdm(prompts, desc="greedy" if seed is None else "sampled", unit="prompt",
                       disable=not progress or None):
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        if seed is not None:
            torch.manual_seed(seed)
        new = model.generate(ids, **options)[0, ids.shape[1]:].tolist()
        out.append(Continuation(prompt, new, tokenizer.decode(new, skip_special_tokens=True)))
    return out


def greedy_agreement(ours: list[Continuation], baseline: list[Continuation]) -> dict:
    """Share of the baseline's greedy tokens that the model reproduced at the same position, and where the
    two first diverge (the prompt's token count, averaged; a token missing on one side is a mismatch)."""
    same = total = 0
    first_diffs = []
    for a, b in zip(ours, baseline):
        length = max(len(a.tokens), len(b.tokens))
        matches = [i < len(a.tokens) and i < len(b.tokens) and a.tokens[i] == b.tokens[i] for i in range(length)]
        same += sum(matches)
        total += length
        first_diffs.append(matches.index(False) if False in matches else length)
    return {"identical_token_share": same / total if total else 1.0,
            "mean_first_divergence": sum(first_diffs) / len(first_diffs) if first_diffs else 0.0}


def side_by_side(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, seed: int,
                 baseline: nn.Module | None = None, progress: bool = True) -> dict:
    """The ``samples`` task: greedy and sampled continuations of both models, and greedy agreement."""
    runs = {"model": model} if baseline is None else {"model": model, "baseline": baseline}
    greedy = {k: continue_prompts(m, tokenizer, prompts, max_new_tokens, None, progress) for k, m in runs.items()}
    sampled = {k: continue_prompts(m, tokenizer, prompts, max_new_tokens, seed, progress) for k, m in runs.items()}
    rows = []
    for i, prompt in enumerate(prompts):
        row = {"prompt": prompt}
        for k in runs:
            row[f"{k}_greedy"] = greedy[k][i].text
            row[f"{k}_sampled"] = sampled[k][i].text
        rows.append(row)
    result: dict = {"max_new_tokens": max_new_tokens, "seed": seed, "sampling": SAMPLING, "prompts": rows}
    if baseline is not None:
        result["agreement"] = greedy_agreement(greedy["model"], greedy["baseline"])
    return result
