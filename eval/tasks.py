"""The evaluation tasks on loaded models, and the run report they fill.

Each task is a function of one :class:`Run` returning its report section; :func:`evaluate_subjects` runs
the asked-for tasks in a fixed order (ppl, kl, samples, memory, speed, speculative). Results for the
evaluated model and its baseline sit side by side under ``model`` / ``baseline`` in every section.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import platform
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from compress.errors import UsageError
from compress.eval import memory, samples, speculative, speed, throughput
from compress.eval.checks import check_generation_lengths, needs_text, resolve_seq_len, with_tasks
from compress.eval.data import EvalText, read_prompts, tokenize
from compress.eval.divergence import next_token_divergence
from compress.eval.perplexity import Protocol, perplexity
from compress.eval.report import SCHEMA
from compress.model import config_context
from compress.eval.spec import EvalSpec, KVCacheSpec

log = logging.getLogger(__name__)


@dataclass
class Subject:
    """A model under evaluation and how the report names it."""

    module: nn.Module
    ref: str | None
    label: str

    def describe(self) -> dict:
        qc = getattr(self.module.config, "quantization_config", None)
        steps = (qc.to_dict() if hasattr(qc, "to_dict") else qc or {}).get("steps", [])
        return {"ref": self.ref, "label": self.label, "class": type(self.module).__name__,
                "dtype": str(memory.compute_dtype(self.module)).removeprefix("torch."),
                "compression": [{"method": s.get("method"), "args": s.get("args")} for s in steps]}


@dataclass
class Run:
    """What every task reads: the models, the options, the tokenized text."""

    subjects: dict[str, Subject]  # "model", and "baseline" when there is one
    spec: EvalSpec
    tokenizer: object
    text: EvalText | None
    ids: torch.Tensor | None
    seq_len: int
    pad: int
    draft: Subject | None
    progress: bool

    @property
    def model(self) -> Subject:
        return self.subjects["model"]

    @property
    def baseline(self) -> Subject | None:
        return self.subjects.get("baseline")


def ppl_task(run: Run) -> dict:
    s = run.spec
    protocol = Protocol(seq_len=run.seq_len, stride=s.stride, bos=s.bos, max_tokens=s.max_tokens,
                        text=run.text.name, join=run.text.join, text_sha256=run.text.sha256)
    bos = getattr(run.tokenizer, "bos_token_id", None)
    out: dict = {k: perplexity(m.module, run.ids, protocol, bos, s.batch_size, progress=run.progress).to_dict()
                 for k, m in run.subjects.items()}
    if s.kv_cache is not None:  # the model through the quantized cache, and through a full-precision one, same steps
        stated = replace(protocol, kv_cache=s.kv_cache.describe())
        for key, quantized in (("kv_cache", True), ("full_cache", False)):
            out[key] = perplexity(run.model.module, run.ids, stated, bos, s.batch_size, progress=run.progress,
                                  kv=s.kv_cache, quantized=quantized).to_dict()
        out["kv_cache_delta"] = out["kv_cache"]["perplexity"] / out["full_cache"]["perplexity"] - 1
    if run.baseline is not None:
        out["delta"] = out["model"]["perplexity"] / out["baseline"]["perplexity"] - 1
    return out


def kl_task(run: Run) -> dict:
    tokens = min(run.spec.kl_tokens, run.spec.max_tokens or run.spec.kl_tokens)
    kv = run.spec.kv_cache
    result = next_token_divergence(run.model.module, run.baseline.module, run.ids, run.seq_len, tokens,
                                   run.spec.batch_size, run.progress, kv)
    return {**result.to_dict(), "seq_len": run.seq_len, **({"kv_cache": kv.describe()} if kv else {})}


def samples_task(run: Run) -> dict:
    prompts = read_prompts(run.spec.prompts) or samples.DEFAULT_PROMPTS
    baseline = run.baseline.module if run.baseline else None
    with generating_through(run.model.module, run.spec.kv_cache):
        result = samples.side_by_side(run.model.module, run.tokenizer, prompts, run.spec.max_new_tokens,
                                      run.spec.seed, baseline, run.progress)
    return {**result, **({"kv_cache": run.spec.kv_cache.describe()} if run.spec.kv_cache else {})}


@contextlib.contextmanager
def generating_through(model: nn.Module, kv: KVCacheSpec | None) -> Iterator[None]:
    """While active, ``model.generate`` uses a quantized KV cache as ``kv`` says (the ``kv-cache`` runtime
    feature), unless the model has that feature on already."""
    if kv is None or getattr(model, "kv_cache_scheme", None) is not None:
        yield
        return
    from compress.runtime import features

    feature = features.get("kv-cache")
    feature.enable(model, feature.Config(scheme=kv.scheme, group_size=kv.group_size, residual=kv.residual))
    try:
        yield
    finally:
        feature.disable(model)


def memory_task(run: Run) -> dict:
    return {k: memory.memory_report(m.module, m.ref, run.seq_len, pad_token_id=run.pad,
                                    kv=run.spec.kv_cache if k == "model" else None)
            for k, m in run.subjects.items()}


def speed_task(run: Run) -> dict:
    s = run.spec.speed
    return {"settings": s.model_dump(mode="json"),
            "rows": {k: speed.speed_table(m.module, s, run.pad, run.progress,
                                          _kv_scheme(run) if k == "model" else None)
                     for k, m in run.subjects.items()},
            "mixed": {k: throughput.mixed_throughput(m.module, s, run.pad) for k, m in run.subjects.items()}}


def _kv_scheme(run: Run):
    """The run's quantized KV cache as a :class:`compress.kv.KVScheme`, or None."""
    kv = run.spec.kv_cache
    if kv is None:
        return None
    from compress.kv import KVScheme

    return KVScheme.named(kv.scheme, kv.group_size, kv.residual)


def speculative_prompts(ids: torch.Tensor, count: int, length: int) -> list[torch.Tensor]:
    """``count`` prompts of ``length`` tokens cut from evenly spaced places in the evaluation text."""
    if ids.numel() < length + 1:
        raise UsageError(f"speculative: the evaluation text has {ids.numel()} tokens, fewer than one prompt of "
                         f"{length}")
    starts = torch.linspace(0, ids.numel() - length - 1, count).long().tolist()
    return [ids[s : s + length][None] for s in starts]


def speculative_task(run: Run) -> dict:
    """The evaluated model as the target (with the user's draft model, and prompt lookup), then the baseline
    as the target with the evaluated (compressed) model drafting for it."""
    s = run.spec.speculative
    prompts = speculative_prompts(run.ids, s.prompts, s.prompt_len)
    plans = [("model", run.model, {run.draft.label: run.draft.module} if run.draft else {})]
    if run.baseline is not None:
        plans.append(("baseline", run.baseline, {run.model.label: run.model.module}))
    targets = []
    for role, target, drafts in plans:
        log.info("speculative decoding: %s as the target", target.label)
        table = speculative.speculative_table(target.module, drafts, prompts, s.new_tokens, s.draft_tokens,
                                              s.lookup_tokens, s.lookup_ngram, run.pad)
        targets.append({"label": target.label, "role": role, **table})
    return {"targets": targets}


TASKS = {"ppl": ppl_task, "kl": kl_task, "samples": samples_task, "memory": memory_task, "speed": speed_task,
         "speculative": speculative_task}


def environment(device: torch.device) -> dict:
    import transformers

    import compress

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"device": str(device), "gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__,
            "compress": compress.__version__, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads()}


def evaluate_subjects(model: Subject, spec: EvalSpec, tokenizer=None, baseline: Subject | None = None,
                      text: EvalText | None = None, draft: Subject | None = None, progress: bool = True) -> dict:
    """Run ``spec.tasks`` on loaded models; the run's report (JSON-ready, see :mod:`compress.eval.report`)."""
    subjects = {"model": model} if baseline is None else {"model": model, "baseline": baseline}
    spec = with_tasks(spec, baseline is not None)
    default_kv = getattr(model.module, "kv_cache_scheme", None)  # a checkpoint's kv-cache runtime feature
    if spec.kv_cache is None and default_kv is not None:
        log.info("evaluating through the checkpoint's KV cache (%s)", default_kv.scheme)
        spec = spec.model_copy(update={"kv_cache": KVCacheSpec(**default_kv.model_dump())})
    contexts = {s.label: config_context(s.module.config) for s in subjects.values()}
    seq_len = resolve_seq_len(spec, contexts)
    check_generation_lengths(spec, contexts)
    text_tasks = needs_text(spec)
    if text_tasks and text is None:
        raise UsageError(f"tasks {', '.join(text_tasks)} need evaluation text: give data (--data)")
    token_tasks = text_tasks + [t for t in spec.tasks if t == "samples"]
    if token_tasks and tokenizer is None:
        raise UsageError(f"tasks {', '.join(token_tasks)} need a tokenizer and neither the model nor the baseline "
                         "directory has one: save it with the checkpoint (compress.save(model, dir, tokenizer=tok))")
    pad = samples.generation_defaults(tokenizer)["pad_token_id"] if tokenizer is not None else 0
    run = Run(subjects, spec, tokenizer, text, tokenize(tokenizer, text) if text_tasks else None, seq_len, pad, draft,
              progress)
    report: dict = {"schema": SCHEMA, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    "tasks": list(spec.tasks), "perplexity": None, "protocol": None,
                    "baseline": {"ref": baseline.ref, "label": baseline.label} if baseline else None,
                    "environment": environment(speed.model_device(model.module)),
                    "models": {k: s.describe() for k, s in subjects.items()}, "spec": spec.model_dump(mode="json")}
    for name, task in TASKS.items():
        if name in spec.tasks:
            log.info("task %s", name)
            report[name] = task(run)
    if "ppl" in report:
        report["perplexity"] = report["ppl"]["model"]["perplexity"]
        report["protocol"] = report["ppl"]["model"]["protocol"]
        if baseline is not None:
            report["baseline"]["perplexity"] = report["ppl"]["baseline"]["perplexity"]
        if "kv_cache" in report["ppl"]:
            ppl = report["ppl"]
            report["kv_cache"] = {"perplexity": ppl["kv_cache"]["perplexity"], "protocol": ppl["kv_cache"]["protocol"],
                                  "full_cache_perplexity": ppl["full_cache"]["perplexity"],
                                  "delta": ppl["kv_cache_delta"]}
    return report
