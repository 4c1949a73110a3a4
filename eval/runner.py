"""Running an evaluation: ``compress eval`` and a recipe's ``eval:`` section after ``compress apply``.

Everything a run needs from the user is checked before any weights load (:mod:`compress.eval.checks`):
the models' configs (a broken checkpoint config is named), the perplexity window and generation lengths
against each model's context, the prompts file, and the evaluation data. Then the models load and the tasks
run (:mod:`compress.eval.tasks`); the report is written as JSON, Markdown and HTML.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch.nn as nn

from compress.errors import UsageError
from compress.eval.checks import (
    check_generation_lengths,
    check_model,
    label_of,
    needs_text,
    resolve_seq_len,
    with_tasks,
)
from compress.eval.data import EvalText, load_eval_text, read_prompts
from compress.eval.report import summary, write_document, write_json
from compress.eval.tasks import Subject, evaluate_subjects
from compress.model import is_local_reference, load_model, load_tokenizer, resolve_device
from compress.model import config_context
from compress.eval.spec import EvalSpec
from compress.recipe import Recipe

log = logging.getLogger(__name__)

# EvalSpec fields whose command-line flag is not simply --field-name.
FLAGS = {"speed.batch_sizes": "--batch-sizes", "speed.configs": "--speed-configs", "speed.prompt_len": "--prompt-len",
         "speed.new_tokens": "--new-tokens", "speed.repeats": "--repeats", "speculative.draft": "--draft",
         "kv_cache.scheme": "--kv-cache", "kv_cache.group_size": "--kv-group-size", "kv_cache.residual": "--kv-residual",
         "kv_cache.prefill": "--kv-prefill"}


def eval_spec(options: dict) -> EvalSpec:
    """An EvalSpec from command-line options (None: the default); UsageError lists every bad option."""
    from pydantic import ValidationError

    from compress.recipe import problems_from_validation

    def given(d: dict) -> dict:
        return {k: given(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}

    try:
        return EvalSpec.model_validate(given(options))
    except ValidationError as exc:
        problems = problems_from_validation(exc, schema=EvalSpec)
        raise UsageError("invalid options: " + "; ".join(f"{_flag(p.where)}: {p.message}" for p in problems)) from exc


def _flag(where: str) -> str:
    """The command-line flag of an EvalSpec field path (``speed.batch_sizes[1]`` -> ``--batch-sizes[1]``)."""
    field, bracket, index = where.partition("[")
    return FLAGS.get(field, "--" + field.replace("_", "-")) + bracket + index


def prepare(spec: EvalSpec, refs: list[str], has_baseline: bool) -> tuple[EvalSpec, EvalText | None]:
    """The checks that need no weights, then the evaluation text: ``spec`` with its tasks resolved, and the
    text when a task reads it."""
    spec = with_tasks(spec, has_baseline)
    contexts = {label_of(ref): config_context(check_model(ref)) for ref in refs}
    resolve_seq_len(spec, contexts)
    check_generation_lengths(spec, contexts)
    if spec.speculative.draft and "speculative" in spec.tasks:
        check_model(spec.speculative.draft)
    read_prompts(spec.prompts)
    return spec, load_eval_text(spec.data) if needs_text(spec) else None


def load_subject(ref: str, device: str, dtype: str, fuse: bool) -> Subject:
    """A Hub id, a model directory or a compress checkpoint, on ``device``, for inference; with ``fuse``, its
    layers that read the same input fused (:func:`compress.fuse_projections`; every model of a run alike)."""
    from compress.checkpoint import load

    if is_local_reference(ref):
        module = load(ref, device=device, dtype=None if dtype == "auto" else dtype)
    else:
        module = load_model(ref, dtype).eval().to(device)
    return _subject(module, ref, fuse)


def _subject(module: nn.Module, ref: str, fuse: bool) -> Subject:
    """``module`` loaded from ``ref`` as a run's subject, fused where ``fuse``."""
    from compress.runtime.fusion import fuse_projections

    if fuse:
        fuse_projections(module)
    return Subject(module, ref, label_of(ref))


def _draft(spec: EvalSpec, device: str, dtype: str) -> Subject | None:
    if spec.speculative.draft and "speculative" in spec.tasks:
        return load_subject(spec.speculative.draft, device, dtype, spec.fuse)
    return None


def _tokenizer(*refs: str | None):
    """The tokenizer of the first of ``refs`` that has one (a checkpoint may have been saved without)."""
    last_error = None
    for ref in filter(None, refs):
        try:
            return load_tokenizer(ref)
        except UsageError as exc:
            last_error = exc
    log.warning("no tokenizer found (%s); only the memory and speed tasks can run", last_error)
    return None


def evaluate(model_ref: str, spec: EvalSpec, baseline_ref: str | None = None, device: str = "auto",
             dtype: str = "auto", progress: bool = True) -> dict:
    """``compress eval``: check the inputs, load the models, run the tasks; the run's report."""
    spec, text = prepare(spec, [r for r in (model_ref, baseline_ref) if r], baseline_ref is not None)
    device = resolve_device(device)
    tokenizer = _tokenizer(model_ref, baseline_ref)
    model = load_subject(model_ref, device, dtype, spec.fuse)
    baseline = load_subject(baseline_ref, device, dtype, spec.fuse) if baseline_ref else None
    if baseline is not None:
        baseline.label += " (baseline)"
    return evaluate_subjects(model, spec, tokenizer, baseline, text, _draft(spec, device, dtype), progress)


def write_outputs(report: dict, json_path: str | Path | None, output: str | Path | None) -> list[Path]:
    """Write the run's JSON and/or the Markdown + HTML documents; the paths written."""
    written = []
    if json_path:
        written.append(write_json(report, json_path))
    if output:
        written.append(write_json(report, Path(output) / "report.json"))
        written += write_document([report], output)
    return written


def run_recipe_eval(recipe: Recipe, checkpoint_dir: str | Path) -> str:
    """A recipe's ``eval:`` section after ``compress apply``: the checkpoint against the recipe's original
    model (rebuilt as ``apply`` loaded it, random init included). Writes report.json / .md / .html to
    ``eval.output`` (default ``reports/<checkpoint name>``); returns a short summary."""
    m = recipe.model
    spec, text = prepare(EvalSpec.model_validate(recipe.eval), [str(checkpoint_dir), m.path], has_baseline=True)
    device = resolve_device(m.device)
    model = load_subject(str(checkpoint_dir), device, m.dtype, spec.fuse)
    original = load_model(m.path, m.dtype, m.init, m.revision, m.trust_remote_code).eval().to(device)
    baseline = _subject(original, m.path, spec.fuse)
    baseline.label += " (baseline)"
    tokenizer = _tokenizer(str(checkpoint_dir), m.path)
    report = evaluate_subjects(model, spec, tokenizer, baseline, text, _draft(spec, device, m.dtype))
    written = write_outputs(report, None, spec.output or Path("reports") / Path(checkpoint_dir).name)
    return summary(report) + "\n" + f"eval report: {', '.join(str(p) for p in written)}"
