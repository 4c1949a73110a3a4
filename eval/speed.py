"""Generation speed with transformers' ``generate``: prefill and decode tokens per second, per KV-cache
configuration and batch size.

Configurations:

* ``no-cache``: every step re-reads the whole sequence (``use_cache=False``);
* ``dynamic``: the default growing KV cache, eager;
* ``static``: a preallocated KV cache, eager (``disable_compile``: transformers would otherwise compile it);
* ``static-compile``: a static KV cache with the decode step under ``torch.compile`` (mode reduce-overhead,
  CUDA graphs), through transformers' own ``compile_config`` path, as in the anchors. CUDA only: on a CPU
  the row is reported as skipped.
* ``compiled-step``: the same compiled decode step and static KV cache, driven by a bare greedy loop (the
  next token is the argmax, kept on the GPU; no logits processors, stopping checks or host syncs between
  steps) as gpt-fast and serving engines run it. It times the model's step; ``static-compile`` adds
  ``generate``'s per-token work on the host, which is the same for every model and so narrows the gap
  between a fast model and a slow one. CUDA only.
* ``compiled-verify``: the compiled step fed a draft of DRAFT_TOKENS tokens at a time, as speculative decoding
  verifies a draft, every draft accepted (the next draft is the step's own greedy tokens). Its tok/s counts
  every token verified: what speculative decoding reaches with this model verifying and a perfect free
  drafter, the bound that the 1-token step's weight-read time sets. CUDA only.

Timing: a logits processor marks the moment each step's logits are ready (a CUDA event on a GPU, so
marking costs no synchronisation; ``perf_counter`` on a CPU). Prefill time is from the call to the first
mark (it includes generate's setup: time to first token); decode time is from the first mark to the last,
for ``new_tokens - 1`` steps. ``min_new_tokens`` keeps an EOS from ending a run early. Each row runs
``warmup`` untimed generations (compilation, CUDA-graph capture, allocator) and reports the median of
``repeats`` timed ones.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import statistics
import time

import torch
import torch.nn as nn
from tqdm.auto import tqdm
from transformers import CompileConfig, LogitsProcessor, LogitsProcessorList, StaticCache

from compress.eval.spec import SpeedSpec

log = logging.getLogger(__name__)

# fullgraph: a graph break fails loudly instead of silently timing a half-compiled model (checked with
# compress's IntLinear on transformers 5.17 and 5.24); dynamic=False: decode shapes are fixed per batch size.
COMPILE = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead")
COMPILED = ("static-compile", "compiled-step", "compiled-verify")
#: Tokens a ``compiled-verify`` step takes: a typical speculative draft (prompt lookup, a draft model) plus one.
DRAFT_TOKENS = 8


def cuda_mark() -> torch.cuda.Event:
    """A CUDA event recorded now on the current stream (marks a time without synchronising)."""
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


class StepClock(LogitsProcessor):
    """Marks the time each generation step's logits are ready; passes the scores through unchanged."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def _now(self):
        return cuda_mark() if self.cuda else time.perf_counter()

    def start(self) -> None:
        self.marks = [self._now()]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.marks.append(self._now())
        return scores

    def seconds(self, first: int, last: int) -> float:
        """Seconds between two marks (after the work has finished)."""
        if self.cuda:
            self.marks[last].synchronize()
            return self.marks[first].elapsed_time(self.marks[last]) / 1000
        return self.marks[last] - self.marks[first]


def config_kwargs(config: str) -> dict:
    """``generate`` keyword arguments for a configuration name."""
    if config == "no-cache":
        return {"use_cache": False}
    if config == "dynamic":
        return {}
    if config == "static":
        return {"cache_implementation": "static", "disable_compile": True}
    if config == "static-compile":
        return {"cache_implementation": "static", "compile_config": COMPILE}
    raise ValueError(f"unknown speed configuration {config!r}")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_prompts(model: nn.Module, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Token ids [batch, length] drawn uniformly from the vocabulary (speed does not depend on them)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config().vocab_size
    return torch.randint(0, vocab, (batch, length), generator=gen).to(model_device(model))


def cache_keyword(model: nn.Module) -> str:
    """The forward's KV-cache keyword: ``cache`` from transformers 5.2x (``past_key_values`` before, deprecated
    after)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def decode_step(model: nn.Module, cache: StaticCache, mode: str | None = COMPILE.mode, keep: int = 1):
    """The eager step ``(token [batch, n], positions [n]) -> next tokens [batch, keep]`` (greedy, from the logits
    of the last ``keep`` positions only) and the same step compiled whole (``fullgraph``, static shapes,
    ``mode``). ``keep`` > 1: a draft's tokens checked at once, as speculative decoding does."""

    cached = {cache_keyword(model): cache}

    def step(token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        # logits of the last positions only, as generate asks for them (the prefill's would be [batch,
        # prompt_len, vocab]: a quantized output head would dequantize itself for them)
        logits = model(input_ids=token, cache_position=position, use_cache=True, logits_to_keep=keep,
                       **cached).logits
        return logits[:, -keep:].argmax(-1)

    return step, torch.compile(step, fullgraph=COMPILE.fullgraph, dynamic=False, mode=mode)


def static_cache(model: nn.Module, max_cache_len: int, kv=None):
    """A KV cache of fixed size for ``max_cache_len`` tokens: transformers' ``StaticCache``, or with ``kv`` (a
    :class:`compress.kv.KVScheme`) a static quantized one."""
    if kv is None:
        return StaticCache(config=model.config, max_cache_len=max_cache_len)
    from compress.kv import QuantizedCache

    return QuantizedCache(model.config, scheme=kv, max_cache_len=max_cache_len)


@torch.no_grad()
def time_compiled_steps(model: nn.Module, batch: int, prompt_len: int, new_tokens: int, warmup: int,
                        repeats: int, draft: int = 1, kv=None, prefill_chunk: int | None = None
                        ) -> tuple[list[float], list[float]]:
    """Prefill and decode seconds of ``warmup + repeats`` greedy runs of the ``compiled-step`` configuration
    (timed ones only): an eager prefill into a static KV cache (transformers', or with ``kv`` a
    :class:`compress.kv.KVScheme` a static quantized one), in chunks of ``prefill_chunk`` tokens where given (long
    prompts at large batches, whose activations would not fit at once), then ``(new_tokens - 1) // draft``
    compiled steps of ``draft`` tokens each (``compiled-verify``: draft > 1)."""
    device = model_device(model)
    ids = random_prompts(model, batch, prompt_len)
    cache = static_cache(model, prompt_len + new_tokens, kv)
    positions = torch.arange(prompt_len + new_tokens, device=device)
    step, compiled = decode_step(model, cache, keep=draft)
    prefill, decode = [], []
    chunk = prefill_chunk or prompt_len
    for run in range(warmup + repeats):
        cache.reset()
        synchronize(device)
        start = cuda_mark()
        for s in range(0, prompt_len, chunk):  # the last chunk's greedy tokens are the first draft
            token = step(ids[:, s:s + chunk], positions[s:min(s + chunk, prompt_len)])
        first = cuda_mark()
        for i in range(prompt_len, prompt_len + new_tokens - draft, draft):
            torch.compiler.cudagraph_mark_step_begin()
            token = compiled(token, positions[i:i + draft]).clone()
        end = cuda_mark()
        end.synchronize()
        if run >= warmup:
            prefill.append(start.elapsed_time(first) / 1000)
            decode.append(first.elapsed_time(end) / 1000)
    return prefill, decode


@torch.no_grad()
def time_generation(model: nn.Module, config: str, batch: int, prompt_len: int, new_tokens: int, warmup: int,
                    repeats: int, pad_token_id: int = 0, kv=None) -> dict:
    """One row of the speed table: medians of prefill and decode time, as seconds and tokens per second. With
    ``kv`` (a :class:`compress.kv.KVScheme`; ``dynamic`` and the compiled steps only), through that quantized cache."""
    device = model_device(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    draft = DRAFT_TOKENS if config == "compiled-verify" else 1
    if config in ("compiled-step", "compiled-verify"):
        prefill, decode = time_compiled_steps(model, batch, prompt_len, new_tokens, warmup, repeats, draft, kv)
    else:
        prefill, decode = _time_generate(model, config, batch, prompt_len, new_tokens, warmup, repeats, pad_token_id,
                                         kv)
    prefill_s, decode_s = statistics.median(prefill), statistics.median(decode)
    steps = (new_tokens - 1) // draft
    return {
        "config": config, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "prefill_s": prefill_s, "decode_s": decode_s,
        "prefill_tok_s": batch * prompt_len / prefill_s,
        "decode_tok_s": batch * steps * draft / decode_s,
        "ms_per_step": 1000 * decode_s / steps,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


def _time_generate(model: nn.Module, config: str, batch: int, prompt_len: int, new_tokens: int, warmup: int,
                   repeats: int, pad_token_id: int, kv=None) -> tuple[list[float], list[float]]:
    """Prefill and decode seconds of the timed runs of ``generate`` in ``config`` (a fresh quantized cache a run
    with ``kv``)."""
    device = model_device(model)
    ids = random_prompts(model, batch, prompt_len)
    clock = StepClock(device)
    kwargs = {**config_kwargs(config), "max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
              "pad_token_id": pad_token_id, "attention_mask": torch.ones_like(ids),
              "logits_processor": LogitsProcessorList([clock])}
    prefill, decode = [], []
    for run in range(warmup + repeats):
        synchronize(device)
        if kv is not None:
            from compress.kv import QuantizedCache

            kwargs[cache_keyword(model)] = QuantizedCache(model.config, scheme=kv)
        clock.start()
        model.generate(ids, **kwargs)
        if run >= warmup:
            prefill.append(clock.seconds(0, 1))
            decode.append(clock.seconds(1, -1))
    return prefill, decode


def skipped_row(config: str, batch: int, spec: SpeedSpec, reason: str) -> dict:
    return {"config": config, "batch": batch, "prompt_len": spec.prompt_len, "new_tokens": _new_tokens(config, spec),
            "skipped": reason}


def _new_tokens(config: str, spec: SpeedSpec) -> int:
    return min(spec.no_cache_new_tokens, spec.new_tokens) if config == "no-cache" else spec.new_tokens


def _recompile_headroom():
    """Room for one compiled graph per model and batch size (dynamo's default limit is 8 per code object,
    which every model of a class shares)."""
    dynamo_config = torch._dynamo.config
    if hasattr(dynamo_config, "recompile_limit"):
        return dynamo_config.patch(recompile_limit=max(dynamo_config.recompile_limit, 64))
    return contextlib.nullcontext()


KV_CONFIGS = ("dynamic", "compiled-step", "compiled-verify")  # the configurations a quantized KV cache runs in


def speed_table(model: nn.Module, spec: SpeedSpec, pad_token_id: int = 0, progress: bool = True, kv=None
                ) -> list[dict]:
    """Rows for every configuration x batch size of ``spec`` (through the quantized KV cache ``kv``, a
    :class:`compress.kv.KVScheme`, where given). A row that runs out of GPU memory is reported as skipped (with the
    reason) rather than ending the benchmark."""
    device = model_device(model)
    rows = []
    cells = [(c, b) for c in spec.configs for b in spec.batch_sizes]
    with _recompile_headroom():
        for config, batch in tqdm(cells, desc="speed", unit="row", disable=not progress or None):
            if config in COMPILED and device.type != "cuda":
                rows.append(skipped_row(config, batch, spec, "torch.compile with CUDA graphs needs a CUDA device"))
                continue
            if kv is not None and config not in KV_CONFIGS:
                rows.append(skipped_row(config, batch, spec, f"a quantized KV cache runs in {', '.join(KV_CONFIGS)}"))
                continue
            try:
                rows.append(time_generation(model, config, batch, spec.prompt_len, _new_tokens(config, spec),
                                            spec.warmup, spec.repeats, pad_token_id, kv))
            except torch.OutOfMemoryError:
                log.warning("speed: %s at batch %d ran out of GPU memory; skipped", config, batch)
                torch.cuda.empty_cache()
                rows.append(skipped_row(config, batch, spec, "out of GPU memory"))
            log.info("speed: %s", _describe(rows[-1]))
    return rows


def _describe(row: dict) -> str:
    if "skipped" in row:
        return f"{row['config']} batch {row['batch']}: skipped ({row['skipped']})"
    return (f"{row['config']} batch {row['batch']}: prefill {row['prefill_tok_s']:.0f} tok/s, "
            f"decode {row['decode_tok_s']:.1f} tok/s")
