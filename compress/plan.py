"""Pass 4 of recipe checking: the recipe against the model, on the meta device (no weights loaded).

Produces the :class:`Plan` that ``compress validate`` prints and ``compress apply`` executes: for each
stage, each step with its method, config and the exact layers it will compress. Each layer's state is
followed from step to step (:mod:`compress.states`): a step that would receive a layer in a state it cannot
take is refused with the fix; and for each step that stores a format, the kernel each layer will decode with
on CUDA, or why it falls back to dequantize-then-matmul.
"""

from __future__ import annotations

import difflib
import logging
from collections import Counter
from dataclasses import dataclass, field

import torch.nn as nn

from compress.errors import CompressError, Problem, RecipeError
from compress.formats import format_class
from compress.formats.base import CompressedLinear, KernelChoice, layer_modules
from compress.formats.sparse import stored_format
from compress.linear import linear_shape
from compress.methods import Method, MethodConfig, Needs
from compress.model import config_context, find_blocks
from compress.recipe import Recipe, ResolvedStep
from compress.sparsity import Pattern, parse_pattern
from compress.states import LayerKind, describe_kinds
from compress.targets import linear_names, select

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedStep:
    where: str
    method: Method
    config: MethodConfig
    layers: list[str]
    kernels: dict[str, KernelChoice] = field(default_factory=dict)  # layer -> its decode kernel (format writers)
    notes: dict[str, str] = field(default_factory=dict)  # layer -> how it is stored, where there is something to say


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    stages: list[list[PlannedStep]]
    seq_len: int | None  # calibration sequence length, resolved against the model's context
    stored: dict[str, tuple[str, KernelChoice]] = field(default_factory=dict)  # masked layer -> sparse format, kernel

    def trains(self) -> bool:
        """Whether a stage of the plan trains (:attr:`Needs.TRAINING`)."""
        return any(s.method.needs_for(s.config) == Needs.TRAINING for stage in self.stages for s in stage)

    def needs_calibration(self) -> bool:
        """Whether a calibrated step needs the calibration set (training stages read their text themselves)."""
        return any(s.method.needs_for(s.config) == Needs.CALIBRATION for stage in self.stages for s in stage)

    def describe(self) -> str:
        lines = []
        for si, stage in enumerate(self.stages):
            name = self.recipe.all_stages()[si].name
            lines.append(f"stage {si}" + (f" ({name})" if name else ""))
            for step in stage:
                args = ", ".join(f"{k}={v}" for k, v in step.config.to_dict().items())
                lines.append(f"  {step.where}: {step.method.name}({args})")
                lines.append(f"    {len(step.layers)} layers: {_kinds(step.layers)}")
                lines += [f"    {line}" for line in _kernel_lines(step.kernels)]
                by_note: dict[str, list[str]] = {}
                for layer, note in step.notes.items():
                    by_note.setdefault(note, []).append(layer)
                lines += [f"    {len(names)} layers ({_kinds(names)}) have {note}" for note, names in by_note.items()]
        by_format: dict[tuple[str, KernelChoice], list[str]] = {}
        for layer, stored in self.stored.items():
            by_format.setdefault(stored, []).append(layer)
        for (fmt, choice), layers in by_format.items():
            lines.append(f"pruned, then stored sparse as {fmt}: {len(layers)} layers ({_kinds(layers)}); on CUDA: "
                         f"{choice.kernel + ' kernel' if choice.kernel else choice.note}")
        return "\n".join(lines)


def _kinds(layers: list[str]) -> str:
    return ", ".join(f"{k} x{n}" for k, n in Counter(layer.rsplit(".", 1)[-1] for layer in layers).items())


def _kernel_lines(kernels: dict[str, KernelChoice]) -> list[str]:
    """What ``compress validate`` says of a step's decode kernels on CUDA: one line per kernel and fallback."""
    by_choice: dict[KernelChoice, list[str]] = {}
    for layer, choice in kernels.items():
        by_choice.setdefault(choice, []).append(layer)
    lines = []
    for choice, layers in by_choice.items():
        which = "all of them" if len(by_choice) == 1 else f"{len(layers)} layers ({_kinds(layers)})"
        if choice.kernel is None:
            lines.append(f"on CUDA: {which} fall back to dequantize-then-matmul: {choice.note}")
        else:
            note = f" ({choice.note})" if choice.note else ""
            lines.append(f"on CUDA: {which} decode with the {choice.kernel} kernel{note}")
    return lines


def model_context(model: nn.Module) -> int | None:
    return config_context(getattr(model, "config", None))


def plan(recipe: Recipe, stages: list[list[ResolvedStep]], model: nn.Module, source: str = "recipe") -> Plan:
    """Check every step against ``model`` (meta or real) and resolve its layers; RecipeError lists all problems."""
    problems: list[Problem] = []
    blocks = find_blocks(model)
    block_prefix = blocks.prefix + "."
    planned: list[list[PlannedStep]] = []
    states: dict[str, tuple[LayerKind, str]] = {  # layer -> its state and the step that left it so
        name: (LayerKind.FORMAT, LOADED)
        for name, module in layer_modules(model) if isinstance(module, CompressedLinear)}
    masks: dict[str, tuple[Pattern, dict | None]] = {}  # masked layer -> its pattern, and a later step's format
    shapes: dict[str, tuple[int, int]] = {}  # masked layer -> (in_features, out_features)
    for stage in stages:
        planned_stage = []
        in_stage: set[str] = set()  # layers a step of this stage changed (its reference still holds them as they were)
        for step in stage:
            sel = select(model, step.spec.targets, step.spec.ignore)
            for k in sel.unmatched_targets:
                problems.append(_unmatched(step, k, model))
            for k in sel.unmatched_ignores:
                log.warning("%s.ignore[%d]: pattern %r matches none of the targeted layers", step.where, k,
                            step.spec.ignore[k])
            if sel.tied:
                problems.append(Problem(f"{step.where}.targets", f"{', '.join(sel.tied)} share their weight with "
                                        "another layer (tied embeddings); compressing them would untie the "
                                        "weights: remove them from the targets"))
            outside = [n for n in sel.modules if not n.startswith(block_prefix)]
            if outside and step.method.needs_for(step.config) == Needs.CALIBRATION:
                problems.append(Problem(f"{step.where}.targets", f"method {step.method.name!r} works on decoder "
                                        f"blocks ({blocks.prefix}.N) and cannot compress {', '.join(outside)}; "
                                        "add them to ignore"))
            for p in step.method.check_model(model, step.config) + step.method.check_targets(sel.modules, step.config):
                problems.append(Problem(f"{step.where}.args.{p.where}" if p.where else step.where, p.message))
            problems += _state_problems(step, list(sel.modules), states, in_stage)
            kernels, notes = _storage(step, sel.modules, problems)
            pattern, scheme = step.method.mask_pattern(step.config), step.method.writes(step.config)
            for name in sel.modules:
                if pattern is not None:
                    masks[name] = (parse_pattern(pattern), None)
                    shapes[name] = linear_shape(sel.modules[name])
                elif scheme is not None and name in masks:
                    masks[name] = (masks[name][0], scheme)
            planned_stage.append(PlannedStep(step.where, step.method, step.config, list(sel.modules), kernels, notes))
        planned.append(planned_stage)
    problems += _runtime_problems(recipe, model)
    seq_len = _seq_len(recipe, model, problems)
    if problems:
        raise RecipeError(problems, f"{source} (against {type(model).__name__})")
    stored = {name: (fmt, format_class(fmt).kernel(scheme or {}, *shapes[name]))
              for name, (pattern, scheme) in masks.items() if (fmt := stored_format(pattern, scheme))}
    for step in (s for stage in planned for s in stage):  # those run as their sparse format says, not as the step's
        for name in stored:
            step.kernels.pop(name, None)
    return Plan(recipe, planned, seq_len, stored)


def _runtime_problems(recipe: Recipe, model: nn.Module) -> list[Problem]:
    """Each runtime feature's problems with ``model`` (its arguments were checked with the recipe)."""
    from compress.runtime import features

    problems = []
    for i, entry in enumerate(recipe.runtime or []):
        feature = features.get(entry.feature)
        for p in feature.check_model(model, feature.Config.model_validate(entry.args)):
            problems.append(Problem(f"runtime[{i}].args.{p.where}" if p.where else f"runtime[{i}]", p.message))
    return problems


LOADED = "the checkpoint the model was loaded from"  # who stored a layer that was stored before the recipe


def _state_problems(step: ResolvedStep, layers: list[str], states: dict[str, tuple[LayerKind, str]],
                    in_stage: set[str]) -> list[Problem]:
    """Whether ``step`` can take its layers in the states the earlier steps left them in (then it records what
    it leaves); one problem per state it cannot take, with the fix. ``in_stage``: the layers the stage's earlier
    steps changed (updated)."""
    takes = step.method.consumes(step.config)
    produces = step.method.produces(step.config)
    refused: dict[tuple[LayerKind, str], list[str]] = {}
    gone: dict[str, list[str]] = {}  # stored by an earlier stage, for a step that reads the original weights
    for name in layers:
        kind, by = states.get(name, (LayerKind.DENSE, ""))
        if kind not in takes:
            refused.setdefault((kind, by), []).append(name)
        elif kind == LayerKind.FORMAT and name not in in_stage and step.method.needs_reference(step.config):
            gone.setdefault(by, []).append(name)
        if produces is not None:
            states[name] = (produces, f"{step.where} ({step.method.name})")
            in_stage.add(name)
    problems = [Problem(step.where, f"{len(names)} layers ({_names(names)}) were stored by {by}, in an earlier "
                        f"stage: method {step.method.name!r} reads their original weights, which only the stage that "
                        "stores them still has: put the two steps in the same stage") for by, names in gone.items()]
    for (kind, by), names in refused.items():
        fix = "remove one of the two steps, or put this one first"
        if by == LOADED:
            fix = "start from the original model instead, or leave these layers out (ignore: [...])"
        elif kind == LayerKind.DENSE:
            fix = ("put a quantization step (rtn, gptq, awq, ...) on these layers before it" if takes == {LayerKind.FORMAT}
                   else f"put a step that leaves them {describe_kinds(takes)} before it")
        elif kind == LayerKind.FORMAT and produces == LayerKind.FORMAT:
            fix = "a layer is stored once: remove one of the two steps (for AWQ then GPTQ, give awq `quantize: false`)"
        elif kind == LayerKind.MASKED:
            fix = "put this step before the pruning step, or use a method that keeps a pruner's mask"
        problems.append(Problem(step.where, f"{len(names)} layers ({_names(names)}) are {kind.described()}"
                                f"{f' by {by}' if by else ''}; "
                                f"method {step.method.name!r} takes {describe_kinds(takes)} layers: {fix}"))
    return problems


def _storage(step: ResolvedStep, layers: dict[str, nn.Module],
             problems: list[Problem]) -> tuple[dict[str, KernelChoice], dict[str, str]]:
    """For a step that stores a format: the decode kernel each of its layers will run with on CUDA, and what the
    format has to say about how each is stored."""
    scheme = step.method.writes(step.config)
    if scheme is None:
        return {}, {}
    try:
        fmt = format_class(scheme["format"])
    except CompressError as exc:
        problems.append(Problem(step.where, f"method {step.method.name!r} stores format {scheme['format']!r}: {exc}"))
        return {}, {}
    kernels = {n: fmt.kernel(scheme, *linear_shape(m)) for n, m in layers.items()}
    notes = {n: note for n, m in layers.items() if (note := fmt.storage_note(scheme, *linear_shape(m)))}
    return kernels, notes


def _seq_len(recipe: Recipe, model: nn.Module, problems: list[Problem]) -> int | None:
    context = model_context(model)
    training = recipe.training.seq_len if recipe.training else None
    if training is not None and context is not None and training > context:
        problems.append(Problem("training.seq_len", f"{training} exceeds the model's context of {context} tokens; "
                                f"use at most {context}"))
    if recipe.calibration is None:
        return None
    wanted = recipe.calibration.seq_len
    if wanted is None:
        return min(2048, context or 2048)
    if context is not None and wanted > context:
        problems.append(Problem("calibration.seq_len", f"{wanted} exceeds the model's context of {context} "
                                f"tokens; use at most {context}"))
    return wanted


def _names(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _unmatched(step: ResolvedStep, k: int, model: nn.Module) -> Problem:
    pattern = step.spec.targets[k]
    known = linear_names(model)
    close = difflib.get_close_matches(pattern, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return Problem(f"{step.where}.targets[{k}]", f"pattern {pattern!r} matches no linear layer of "
                   f"{type(model).__name__}; {hint}its linear layers are named: {', '.join(known)}")
