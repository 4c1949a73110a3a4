"""Speculative decoding is lossless: whatever the drafter proposes, the output is the target's own greedy
output token for token (``generate`` with a plain greedy config is the reference), and the counts add up.

Untied architectures (qwen2, phi3) are used where rejections matter: tiny random models with tied
embeddings mostly repeat their last token, which any draft guesses right."""

from __future__ import annotations

import pytest
import torch

import compress
from compress.eval.speculative import (
    ModelDrafter,
    PromptLookupDrafter,
    plain_greedy_config,
    speculative_greedy,
    speculative_table,
)
from conftest import make_tiny

NEW = 24


def rtn4(model):
    return compress.apply(model, [{"method": "rtn", "args": {"bits": 4, "group_size": 64}}], device="cpu")


def prompts() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    head = torch.randint(0, 512, (1, 30), generator=gen)
    return [torch.cat([head, head[:, :12]], dim=1), torch.randint(0, 512, (1, 9), generator=gen)]


def greedy(target, prompt: torch.Tensor, new: int = NEW) -> torch.Tensor:
    return target.generate(prompt, generation_config=plain_greedy_config(target, new, 0))


@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
def test_compressed_model_drafting_for_its_original_is_lossless(arch: str) -> None:
    target, draft = make_tiny(arch), rtn4(make_tiny(arch))
    drafter = ModelDrafter(draft, tokens=4)
    for prompt in prompts():
        drafter.reset()
        out, stats = speculative_greedy(target, drafter, prompt, NEW)
        assert torch.equal(out, greedy(target, prompt))
        assert stats.new_tokens == NEW
        assert 0 < stats.accepted < stats.proposed  # both paths: drafts accepted and drafts rejected
        # every target forward adds its accepted drafts plus one token of its own
        assert stats.accepted + stats.target_forwards == NEW
        assert stats.target_forwards < NEW


def test_a_poor_draft_is_rejected_and_the_output_is_still_the_targets() -> None:
    target, stranger = make_tiny("qwen2", seed=0), make_tiny("qwen2", seed=1)
    drafter = ModelDrafter(stranger, tokens=5)
    for prompt in prompts():
        drafter.reset()
        out, stats = speculative_greedy(target, drafter, prompt, NEW)
        assert torch.equal(out, greedy(target, prompt))
        assert stats.accepted < stats.proposed  # rejections happened, and were repaired


def test_prompt_lookup_is_lossless_and_drafts_from_repeats() -> None:
    target = make_tiny("qwen2")
    drafter = PromptLookupDrafter(tokens=6, ngram=3)
    assert drafter.propose(torch.tensor([[5, 6, 7, 8, 9, 5, 6]]), 6).tolist() == [7, 8, 9, 5, 6]
    assert drafter.propose(torch.tensor([[1, 2, 3]]), 6).numel() == 0
    for prompt in prompts():
        out, stats = speculative_greedy(target, drafter, prompt, NEW)
        assert torch.equal(out, greedy(target, prompt))
        assert stats.accepted + stats.target_forwards == NEW


def test_stops_after_eos_like_generate() -> None:
    target = make_tiny("qwen2")
    prompt = prompts()[0]
    free = greedy(target, prompt)[0, prompt.shape[1]:].tolist()
    target.generation_config.eos_token_id = free[6]  # its first occurrence ends the generation
    expected = greedy(target, prompt)
    assert expected.shape[1] == prompt.shape[1] + free.index(free[6]) + 1
    out, _ = speculative_greedy(target, ModelDrafter(rtn4(make_tiny("qwen2")), 4), prompt, NEW)
    assert torch.equal(out, expected)


def test_speculative_table_reports_every_method() -> None:
    target, draft = make_tiny("llama"), rtn4(make_tiny("llama"))
    table = speculative_table(target, {"w4": draft}, prompts(), 12, draft_tokens=3, lookup_tokens=5, lookup_ngram=2,
                              pad_token_id=0)
    methods = [r["method"] for r in table["rows"]]
    assert methods == ["w4 drafting (compress loop, 3 tokens)", "w4 drafting (transformers assistant_model)",
                       "prompt lookup (compress loop, 2-gram, 5 tokens)",
                       "prompt lookup (transformers prompt_lookup_num_tokens)"]
    assert all(r["identical"] and r["new_tokens"] == 24 for r in table["rows"])
    ours = table["rows"][0]
    assert ours["acceptance_rate"] == pytest.approx(ours["accepted"] / ours["proposed"])
    assert ours["tokens_per_forward"] > 1 and ours["speedup"] > 0


def test_a_differing_output_is_reported_with_its_first_differing_token() -> None:
    from compress.eval.speculative import SpeculativeStats, record_difference, result_row

    stats = SpeculativeStats(new_tokens=4, seconds=1.0)
    prompt = torch.tensor([[1, 2]])
    record_difference(stats, 0, prompt, torch.tensor([[1, 2, 5, 6, 7, 8]]), torch.tensor([[1, 2, 5, 6, 7, 8]]))
    record_difference(stats, 1, prompt, torch.tensor([[1, 2, 5, 6, 0, 8]]), torch.tensor([[1, 2, 5, 6, 7, 8]]))
    record_difference(stats, 2, prompt, torch.tensor([[1, 2, 5]]), torch.tensor([[1, 2, 5, 6]]))  # stopped early
    row = result_row("m", stats, greedy_seconds=2.0, prompts=3)
    assert not row["identical"] and row["speedup"] == 2.0
    assert row["mismatches"] == [{"prompt": 1, "new_token": 2}, {"prompt": 2, "new_token": 1}]
