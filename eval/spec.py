"""The schema of an evaluation run: the ``eval:`` section of a recipe, and what ``compress eval``'s options
build. The core keeps a recipe's ``eval:`` section as a plain mapping; the command line checks it against
:class:`EvalSpec` with the rest of the recipe."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from compress.recipe import Section

EVAL_TASKS = ("ppl", "kl", "samples", "memory", "speed", "speculative")
SPEED_CONFIGS = ("no-cache", "dynamic", "static", "static-compile", "compiled-step", "compiled-verify")


class SpeedSpec(Section):
    """Generation speed (``speed`` task): prefill and decode tok/s per configuration and batch size, then
    throughput on a mix of prompt and output lengths."""

    batch_sizes: list[PositiveInt] = Field(default_factory=lambda: [1, 8, 32], min_length=1)
    configs: list[Literal[SPEED_CONFIGS]] = Field(
        default_factory=lambda: ["no-cache", "dynamic", "static-compile"], min_length=1,
        description="static-compile: static KV cache + torch.compile through generate; compiled-step: the same "
                    "compiled step in a bare greedy loop; compiled-verify: that step fed 8-token drafts, as "
                    "speculative decoding verifies them (all three CUDA only)")
    prompt_len: int = Field(128, ge=1)
    new_tokens: int = Field(256, ge=2)
    no_cache_new_tokens: int = Field(64, ge=2, description="at most this many new tokens without a KV cache "
                                     "(each step re-reads the whole sequence)")
    warmup: int = Field(2, ge=0)
    repeats: int = Field(3, ge=1, description="timed runs; the median is reported")
    mixed_requests: int = Field(32, ge=0, description="requests of mixed prompt/output lengths for batched "
                                "throughput (0: skip)")
    mixed_batch_size: int = Field(8, ge=1, description="static batching's batch size on the mixed requests")
    continuous: bool = Field(True, description="also run transformers' continuous batching where it is installed")


class SpeculativeSpec(Section):
    """Speculative decoding (``speculative`` task, batch 1, greedy, lossless)."""

    draft: str | None = Field(None, description="a draft model (Hub id or directory) sharing the tokenizer")
    draft_tokens: int = Field(4, ge=1, description="tokens a draft model proposes per step")
    lookup_tokens: int = Field(10, ge=1, description="tokens prompt lookup proposes per step")
    lookup_ngram: int = Field(3, ge=1, description="longest n-gram prompt lookup matches")
    prompts: int = Field(4, ge=1, description="prompts cut from the evaluation text")
    prompt_len: int = Field(128, ge=1)
    new_tokens: int = Field(128, ge=1)


class KVCacheSpec(Section):
    """A quantized KV cache in the loop (:mod:`compress.kv`): perplexity is computed by prefilling each window's first
    ``prefill`` tokens and feeding the rest one token a step, so the stored cache feeds every later prediction."""

    scheme: Literal["fp8", "int8", "int4", "int2"]
    group_size: int = Field(64, ge=1, description="tokens per key scale and channels per value scale (int schemes)")
    residual: int = Field(128, ge=0, description="most recent tokens kept in full precision (int schemes)")
    prefill: int = Field(128, ge=1, description="tokens of each window given at once before the token-by-token part")

    def describe(self) -> str:
        """e.g. ``int4 (group 64, residual 128), prefill 128``."""
        layout = "" if self.scheme == "fp8" else f" (group {self.group_size}, residual {self.residual})"
        return f"{self.scheme}{layout}, prefill {self.prefill}"


class EvalSpec(Section):
    """Evaluation of a model against its original (``compress eval``; after ``compress apply`` when a recipe
    has an ``eval:`` section)."""

    tasks: list[Literal[EVAL_TASKS]] | None = Field(
        None, min_length=1, description="default: ppl, kl (when there is a baseline), samples, memory")
    data: str | None = Field(None, description="a text file (read as is), a .jsonl/.parquet file, or "
                             "DATASET_ID[:CONFIG[:SPLIT]]; default: WikiText-2 raw, test split")
    seq_len: int | None = Field(None, ge=8, description="perplexity window; default: min(2048, the model's context)")
    stride: int | None = Field(None, ge=1, description="sliding windows scoring their last STRIDE tokens")
    bos: bool = Field(False, description="prepend the BOS token to every window")
    max_tokens: int | None = Field(None, ge=1, description="evaluate the first MAX_TOKENS tokens only")
    batch_size: int = Field(8, ge=1, description="windows per forward pass")
    kl_tokens: int = Field(16384, ge=1, description="tokens of the evaluation text for the KL divergence "
                           "(at most max_tokens)")
    prompts: str | None = Field(None, description="a file of prompts, one a line (default: a built-in set)")
    max_new_tokens: int = Field(32, ge=1, description="tokens generated per prompt (samples task)")
    seed: int = 0
    fuse: bool = Field(True, description="run every model with its layers that read the same input fused "
                       "(compress.fuse_projections: q/k/v, gate/up; faster decoding, the same outputs)")
    kv_cache: KVCacheSpec | None = Field(None, description="evaluate the model with a quantized KV cache")
    speed: SpeedSpec = Field(default_factory=SpeedSpec)
    speculative: SpeculativeSpec = Field(default_factory=SpeculativeSpec)
    output: str | None = Field(None, description="folder for report.json, report.md and report.html")
