"""Checks that need no weights, run before anything loads: which tasks run, the models' configs, and the
perplexity window and generation lengths against each model's context."""

from __future__ import annotations

from pathlib import Path

from compress.errors import UsageError
from compress.model import is_local_reference, load_config
from compress.eval.spec import EvalSpec

DEFAULT_TASKS = ["ppl", "kl", "samples", "memory"]
TEXT_TASKS = ("ppl", "kl", "speculative")  # tasks that read the evaluation text


def with_tasks(spec: EvalSpec, has_baseline: bool) -> EvalSpec:
    """``spec`` with its tasks resolved: the default set (kl only with a baseline), or the ones asked for
    (UsageError for kl without a baseline)."""
    if spec.tasks is None:
        return spec.model_copy(update={"tasks": [t for t in DEFAULT_TASKS if has_baseline or t != "kl"]})
    if "kl" in spec.tasks and not has_baseline:
        raise UsageError("the kl task compares against the original model: pass --baseline MODEL_OR_DIR")
    return spec


def needs_text(spec: EvalSpec) -> list[str]:
    return [t for t in spec.tasks if t in TEXT_TASKS]


def label_of(ref: str) -> str:
    """How reports name a model: a directory's name, or the Hub id."""
    return Path(ref).name if is_local_reference(ref) else ref


def check_model(ref: str):
    """The config of ``ref``; a clear error for a missing path or a damaged checkpoint (its config.json or its
    weight files), found before any evaluation text is read. An interrupted overwrite's old checkpoint is put
    back first."""
    from compress.checkpoint import recover_leftovers
    from compress.checkpoint_files import check_files

    if is_local_reference(ref):
        recover_leftovers(ref)
        if (Path(ref).expanduser() / "config.json").is_file():
            check_files(ref)
    return load_config(ref)


def resolve_seq_len(spec: EvalSpec, contexts: dict[str, int | None]) -> int:
    """The perplexity window: ``spec.seq_len``, default min(2048, the smallest context); UsageError when it
    exceeds a model's context."""
    known = {name: c for name, c in contexts.items() if c is not None}
    if spec.seq_len is None:
        return min([2048, *known.values()])
    for name, context in known.items():
        if spec.seq_len > context:
            raise UsageError(f"seq_len {spec.seq_len} is larger than the context of {name} ({context} tokens); "
                             f"use --seq-len {context} or less")
    return spec.seq_len


def check_generation_lengths(spec: EvalSpec, contexts: dict[str, int | None]) -> None:
    """UsageError when a speed or speculative prompt plus its new tokens exceed a model's context."""
    lengths = {}
    if "speed" in spec.tasks:
        sp = spec.speed
        lengths["speed: --prompt-len + --new-tokens"] = sp.prompt_len + sp.new_tokens
        if sp.mixed_requests:  # mixed prompts are up to twice prompt_len
            lengths["speed (mixed requests): 2 x --prompt-len + --new-tokens"] = 2 * sp.prompt_len + sp.new_tokens
    if "speculative" in spec.tasks:
        lengths["speculative: prompt_len + new_tokens"] = spec.speculative.prompt_len + spec.speculative.new_tokens
    for what, length in lengths.items():
        for name, context in contexts.items():
            if context is not None and length > context:
                raise UsageError(f"{what} = {length} exceeds the context of {name} ({context} tokens); lower them")
