"""Pass 4 of recipe checking: the recipe against the model, on the meta device (no weights loaded).

Produces the :class:`Plan` that ``compress validate`` prints and ``compress apply`` executes: for each
stage, each step with its method, config and the exact layers it will compress.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections import Counter
from dataclasses import dataclass

import torch.nn as nn

from compress.errors import Problem, RecipeError
from compress.linear import linear_shape
from compress.methods import Method, MethodConfig, Needs
from compress.model import find_blocks
from compress.recipe import Recipe, ResolvedStep
from compress.targets import linear_names, select

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedStep:
    where: str
    method: Method
    config: MethodConfig
    layers: list[str]


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    stages: list[list[PlannedStep]]
    seq_len: int | None  # calibration sequence length, resolved against the model's context

    def needs_calibration(self) -> bool:
        return any(s.method.needs_for(s.config) != Needs.NOTHING for stage in self.stages for s in stage)

    def describe(self) -> str:
        lines = []
        for si, stage in enumerate(self.stages):
            name = self.recipe.all_stages()[si].name
            lines.append(f"stage {si}" + (f" ({name})" if name else ""))
            for step in stage:
                args = ", ".join(f"{k}={v}" for k, v in step.config.to_dict().items())
                kinds = Counter(layer.rsplit(".", 1)[-1] for layer in step.layers)
                summary = ", ".join(f"{k} x{n}" for k, n in kinds.items())
                lines.append(f"  {step.where}: {step.method.name}({args})")
                lines.append(f"    {len(step.layers)} layers: {summary}")
        return "\n".join(lines)


def model_context(model: nn.Module) -> int | None:
    return config_context(getattr(model, "config", None))


def config_context(config) -> int | None:
    """The context length a transformers config states (None when it states none)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def plan(recipe: Recipe, stages: list[list[ResolvedStep]], model: nn.Module, source: str = "recipe") -> Plan:
    """Check every step against ``model`` (meta or real) and resolve its layers; RecipeError lists all problems."""
    problems: list[Problem] = []
    blocks = find_blocks(model)
    block_prefix = blocks.prefix + "."
    planned: list[list[PlannedStep]] = []
    quantized_by: dict[str, str] = {}
    for stage in stages:
        planned_stage = []
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
            for p in step.method.check_targets(sel.modules, step.config):
                problems.append(Problem(f"{step.where}.args.{p.where}" if p.where else step.where, p.message))
            if step.method.quantizes(step.config):
                twice = [n for n in sel.modules if n in quantized_by]
                if twice:
                    problems.append(Problem(step.where, f"{len(twice)} layers ({_names(twice)}) are already "
                                            f"quantized by {quantized_by[twice[0]]}; a layer is quantized once "
                                            "(for AWQ then GPTQ, give awq `quantize: false`)"))
                quantized_by.update({n: f"{step.where} ({step.method.name})" for n in sel.modules})
            planned_stage.append(PlannedStep(step.where, step.method, step.config, list(sel.modules)))
        planned.append(planned_stage)
    seq_len = _seq_len(recipe, model, problems)
    if problems:
        raise RecipeError(problems, f"{source} (against {type(model).__name__})")
    return Plan(recipe, planned, seq_len)


def _seq_len(recipe: Recipe, model: nn.Module, problems: list[Problem]) -> int | None:
    if recipe.calibration is None:
        return None
    context = model_context(model)
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


def group_size_problems(targets: dict[str, nn.Module], group_size: int | None, field: str = "group_size") -> list[Problem]:
    """The shared check of group-wise methods: ``group_size`` must divide every target's in_features.

    One problem lists every offending layer and the fixes (group sizes that divide them all,
    per-channel, or ignoring the layers).
    """
    if not group_size:
        return []
    bad = {n: linear_shape(m)[0] for n, m in targets.items() if linear_shape(m)[0] % group_size}
    if not bad:
        return []
    common = math.gcd(*(linear_shape(m)[0] for m in targets.values()))
    fits = [g for g in (256, 128, 64, 32, 16) if common % g == 0 and g < group_size]
    fixes = [f"group_size: {fits[0]} (divides every targeted layer)"] if fits else []
    fixes += ["per-channel scales (group_size: null)", "add these layers to ignore"]
    listed = ", ".join(f"{n} (in_features={f})" for n, f in bad.items())
    return [Problem(field, f"{group_size} does not divide in_features of {len(bad)} layers: {listed}; "
                    f"fix with one of: {'; '.join(fixes)}")]
