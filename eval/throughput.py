"""Batched throughput on a mix of prompt and output lengths, as a server sees them.

* Static batching: requests in arrival order, ``batch_size`` at a time, prompts left-padded; a batch runs
  until its longest request is done, so short requests hold their slot idle.
* Continuous batching (transformers' paged-attention manager, where the installed version has it): a
  finished request's slot is refilled at once.

Throughput counts only the tokens requests asked for; time is the wall time of the whole mix (median of
``repeats`` after one warm-up). Greedy decoding, EOS disabled, so every request makes exactly its tokens.
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from compress.errors import CompressError
from compress.eval.speed import model_device, synchronize
from compress.eval.spec import SpeedSpec

log = logging.getLogger(__name__)

RESULT_TIMEOUT_S = 600


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    new_tokens: int


def mixed_requests(vocab: int, spec: SpeedSpec, seed: int = 0) -> list[Request]:
    """``spec.mixed_requests`` requests: prompts of 8 to 2 x prompt_len tokens and outputs of 8 to new_tokens,
    drawn uniformly with ``seed``."""
    rng = random.Random(seed)
    return [Request([rng.randrange(vocab) for _ in range(rng.randint(8, 2 * spec.prompt_len))],
                    rng.randint(min(8, spec.new_tokens), spec.new_tokens)) for _ in range(spec.mixed_requests)]


def _left_padded(prompts: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


@torch.no_grad()
def _run_static(model: nn.Module, requests: list[Request], batch_size: int, pad: int) -> None:
    device = model_device(model)
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        ids, mask = _left_padded([r.prompt for r in chunk], pad, device)
        longest = max(r.new_tokens for r in chunk)
        model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                       pad_token_id=pad)


def _timed(run, device: torch.device, repeats: int) -> float:
    """Median wall time of ``run(i)`` for i in range(repeats)."""
    times = []
    for i in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run(i)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def static_batching(model: nn.Module, requests: list[Request], batch_size: int, repeats: int, pad: int = 0) -> dict:
    device = model_device(model)
    _run_static(model, requests[:batch_size], batch_size, pad)  # warm-up
    seconds = _timed(lambda i: _run_static(model, requests, batch_size, pad), device, repeats)
    tokens = sum(r.new_tokens for r in requests)
    return {"mode": "static batching", "batch_size": batch_size, "seconds": seconds, "tokens": tokens,
            "tok_s": tokens / seconds}


def _cb_config(requests: list[Request], device: torch.device):
    """A paged cache sized to the mix on a CPU (transformers would size it to the free memory, slowly);
    transformers' own sizing on a GPU."""
    from transformers import ContinuousBatchingConfig

    if device.type == "cuda":
        return ContinuousBatchingConfig()
    page = 32
    pages = sum(-(-(len(r.prompt) + r.new_tokens) // page) for r in requests) + len(requests)
    size_field = "page_size" if "page_size" in ContinuousBatchingConfig.__dataclass_fields__ else "block_size"
    return ContinuousBatchingConfig(**{size_field: page}, num_blocks=pages, max_batch_tokens=8 * page)


def _serve(manager, requests: list[Request], tag: str) -> int:
    """Submit ``requests`` to a running manager and wait for all of them; the tokens they produced."""
    for i, r in enumerate(requests):
        manager.add_request(input_ids=r.prompt, request_id=f"{tag}-{i}", max_new_tokens=r.new_tokens, eos_token_id=-1)
    done, tokens = 0, 0
    while done < len(requests):
        result = manager.get_result(timeout=RESULT_TIMEOUT_S)
        if result is None:
            raise CompressError("transformers' continuous batching stopped before finishing the requests "
                               "(its log above says why)")
        if result.is_finished():
            done += 1
            tokens += len(result.generated_tokens)
    return tokens


@torch.no_grad()
def continuous_batching(model: nn.Module, requests: list[Request], repeats: int) -> dict | None:
    """Throughput through transformers' continuous batching; None where the installed version lacks it."""
    if not hasattr(model, "init_continuous_batching"):
        log.info("this transformers version has no continuous batching; skipped")
        return None
    from transformers import GenerationConfig

    device = model_device(model)
    config = GenerationConfig(do_sample=False, max_new_tokens=max(r.new_tokens for r in requests), eos_token_id=-1)
    manager = model.init_continuous_batching(generation_config=config,
                                             continuous_batching_config=_cb_config(requests, device))
    manager.start()
    try:
        _serve(manager, requests[:2], "warmup")
        produced: list[int] = []
        seconds = _timed(lambda i: produced.append(_serve(manager, requests, f"run{i}")), device, repeats)
    finally:
        manager.stop(block=True)  # also restores the model's attention implementation and empties the CUDA cache
        manager.destroy()
    return {"mode": "continuous batching", "batch_size": None, "seconds": seconds, "tokens": produced[-1],
            "tok_s": produced[-1] / seconds}


def mixed_throughput(model: nn.Module, spec: SpeedSpec, pad: int = 0) -> list[dict]:
    """Static batching and (where available and asked for) continuous batching on the same mixed requests."""
    if spec.mixed_requests == 0:
        return []
    requests = mixed_requests(model.config.get_text_config().vocab_size, spec)
    rows = [static_batching(model, requests, spec.mixed_batch_size, spec.repeats, pad)]
    if spec.continuous:
        row = continuous_batching(model, requests, spec.repeats)
        if row is not None:
            rows.append(row)
    return rows
