"""The harness on a CUDA GPU (opt-in: pytest -m gpu): static KV cache + torch.compile really compiles and
gives the dynamic cache's tokens, timings are taken, and speculative decoding stays lossless on the GPU."""

from __future__ import annotations

import pytest
import torch

import compress
from compress.eval import speed
from compress.eval.speculative import ModelDrafter, plain_greedy_config, speculative_greedy
from compress.eval.spec import SpeedSpec
from conftest import make_tiny

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_static_compile_matches_dynamic_and_is_timed() -> None:
    model = compress.apply(make_tiny("qwen2"), [{"method": "rtn", "args": {"bits": 4, "group_size": 64}}],
                           device="cuda").cuda()
    ids = speed.random_prompts(model, 2, 16)
    outs = [model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                           pad_token_id=0, **speed.config_kwargs(c)) for c in ("dynamic", "static-compile")]
    assert torch.equal(outs[0], outs[1])
    assert hasattr(model, "_compiled_call")  # transformers compiled the decode step
    spec = SpeedSpec(batch_sizes=[1, 4], configs=["dynamic", "static-compile", "compiled-step", "compiled-verify"],
                     prompt_len=16, new_tokens=16,
                     warmup=2, repeats=2)
    rows = speed.speed_table(model, spec, progress=False)
    assert all("skipped" not in r and r["decode_tok_s"] > 0 and r["peak_gpu_bytes"] > 0 for r in rows)


def test_self_speculative_decoding_is_lossless_on_gpu() -> None:
    target = make_tiny("qwen2").cuda()
    draft = compress.apply(make_tiny("qwen2"), [{"method": "rtn", "args": {"bits": 4, "group_size": 64}}],
                           device="cuda").cuda()
    prompt = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(0)).cuda()
    out, stats = speculative_greedy(target, ModelDrafter(draft, 4), prompt, 32)
    assert torch.equal(out, target.generate(prompt, generation_config=plain_greedy_config(target, 32, 0)))
    assert stats.accepted > 0
