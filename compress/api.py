"""The Python API: ``compress.apply(model, recipe)`` and the recipe runner behind ``compress apply``."""

from __future__ import annotations

import copy
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from pydantic import BaseModel

from compress.calibration.data import (
    CalibrationSet, calibration_set, check_contents, instruction_examples, pack, read_columns, read_documents,
    token_windows,
)
from compress.calibration.engine import BlockWork, StepWork, run_stage, store_masked
from compress.checkpoint import record_layers, write_extras, writing
from compress.errors import DataError, Problem, RecipeError, UsageError
from compress.hf import CompressQuantizationConfig
from compress.methods import Needs
from compress.model import (
    config_context, find_blocks, is_local_reference, load_model, load_tokenizer, meta_model, resolve_device,
)
from compress.plan import Plan, PlannedStep, plan
from compress.recipe import Recipe, TrainingSpec, read_recipe_file, validate_recipe
from compress.states import LayerKind, LayerState
from compress.streaming import ModelStream, empty_model
from compress.targets import select
from compress.train import training_context

log = logging.getLogger(__name__)

RecipeLike = str | Path | dict | Recipe | Sequence[dict]
CalibLike = CalibrationSet | str | Sequence[str] | torch.Tensor | None


def recipe_dict(recipe: RecipeLike) -> tuple[dict, str]:
    """A recipe given as a file path, a dict, a Recipe or a list of steps, as (dict, source name)."""
    if isinstance(recipe, (str, Path)):
        return read_recipe_file(recipe), str(recipe)
    if isinstance(recipe, Recipe):
        return recipe.to_dict(), "recipe"
    if isinstance(recipe, dict):
        return dict(recipe), "recipe"
    if isinstance(recipe, Sequence):
        return {"steps": list(recipe)}, "steps"
    raise TypeError(f"recipe must be a path, a dict, a Recipe or a list of step dicts, got {type(recipe).__name__}")


def _calibration(plan_: Plan, calib: CalibLike, tokenizer) -> CalibrationSet | None:
    """The calibration set of the calibrated steps, or the windows a training stage trains on when ``calib`` gives
    them ready (tokens, or texts); None when no step needs it."""
    windows = isinstance(calib, (CalibrationSet, torch.Tensor)) or (isinstance(calib, Sequence)
                                                                    and not isinstance(calib, (str, Path)))
    if not plan_.needs_calibration() and not (windows and plan_.trains()):
        return None
    if isinstance(calib, CalibrationSet):
        return calib
    if isinstance(calib, torch.Tensor):
        return CalibrationSet(calib.long(), "tensor")
    spec = plan_.recipe.calibration
    samples, seed = (spec.samples, spec.seed) if spec else (128, 0)
    seq_len = plan_.seq_len or 2048
    if tokenizer is None:
        raise UsageError("calibration text needs a tokenizer: pass tokenizer=... (or token ids as calib)")
    if isinstance(calib, str):
        return calibration_set(tokenizer, calib, samples, seq_len, seed)
    if isinstance(calib, Sequence):
        return pack(list(calib), tokenizer, samples, seq_len, seed, source="given texts")
    assert spec is not None  # validate_recipe guarantees a calibration section when calib is None
    return calibration_set(tokenizer, spec.dataset, spec.samples, seq_len, spec.seed, spec.config, spec.split,
                           spec.column)


def _check_data_size(plan_: Plan, source: str) -> None:
    """The recipe's calibration file against the sequence length the plan took from the model's context, where
    the recipe sets none (``validate_recipe`` checks it where the recipe does); before any weight is loaded."""
    spec = plan_.recipe.calibration
    if spec is None or spec.seq_len is not None or plan_.seq_len is None or not plan_.needs_calibration():
        return
    problem = check_contents(spec.dataset, spec.samples, plan_.seq_len, spec.column)
    if problem:
        raise RecipeError([Problem("calibration.dataset", problem)], source)


def check_finite(model: nn.Module, layers: Iterable[str], action: str = "error") -> dict[str, int]:
    """Count the NaN and infinite weights of ``layers`` (each once, on its device). ``action="error"``: a
    UsageError names each layer holding any, with its count; ``"zero"``: they are replaced by zeros, with a
    warning. Returns the counts (layer -> non-finite weights) of the layers holding any."""
    found: dict[str, tuple[int, int]] = {}
    for name in dict.fromkeys(layers):
        weight = getattr(model.get_submodule(name), "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.is_meta:
            continue
        flat = weight.detach().reshape(-1)
        bad = sum(torch.isfinite(part).logical_not_().sum() for part in flat.split(1 << 24))  # bounded temporaries
        if (count := int(bad)) > 0:
            found[name] = (count, weight.numel())
    if not found:
        return {}
    lines = "\n".join(f"  {name}: {count} of {numel}" for name, (count, numel) in found.items())
    total = sum(count for count, _ in found.values())
    if action == "zero":
        with torch.no_grad():
            for name in found:
                model.get_submodule(name).weight.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        log.warning("replaced %d NaN or infinite weights by zeros in %d layers (model.nonfinite: zero):\n%s", total,
                    len(found), lines)
        return {name: count for name, (count, _) in found.items()}
    raise UsageError(
        f"{total} weights of the model are NaN or infinite, in {len(found)} of the layers the recipe compresses "
        f"(non-finite weights / all):\n{lines}\nCompressed, each would make its whole group's scale non-finite. Fix "
        "or re-download the model, or set `nonfinite: zero` under `model:` in the recipe to replace them by zeros")


def _step_work(step: PlannedStep) -> StepWork:
    def run(work: BlockWork) -> None:
        # Without autograd: a weight that requires grad would otherwise leave every buffer computed from it
        # holding its whole autograd graph (the float intermediates of every layer) alive.
        with torch.no_grad():
            step.method.compress_block(work, step.config)

    return StepWork(step.method.name, run, step.layers, step.method.needs_for(step.config) == Needs.CALIBRATION,
                    step.method.needs_reference(step.config), step.method.produces(step.config),
                    {"method": step.method.name, "method_version": step.method.version})


def execute(model: nn.Module, plan_: Plan, calib: CalibrationSet | None, device: torch.device,
            work_dir: Path | None = None, stream: ModelStream | None = None,
            training: TrainingData | None = None, resume: bool = False) -> None:
    """Run every stage of a checked plan on ``model`` (in place). Training stages train on ``training`` (default:
    ``calib`` with a held-out slice) and keep their checkpoints under ``work_dir`` (``stage-N``), when given;
    ``resume`` continues each from its last one. The targeted layers' weights are checked for NaN and infinite
    values first (``model.nonfinite``: an error, or replaced by zeros); with ``stream`` (a model whose blocks are
    on the meta device, :mod:`compress.streaming`), each block's as it is read."""
    targets = [name for stage in plan_.stages for step in stage for name in step.layers]
    check_finite(model, targets, plan_.recipe.model.nonfinite)
    trainers = [s for stage in plan_.stages for s in stage if s.method.needs_for(s.config) == Needs.TRAINING]
    original = None
    if any(s.method.teacher(s.config) == "original" for s in trainers):  # the teacher of a later stage
        original = copy.deepcopy(model).eval().requires_grad_(False)
    if plan_.trains() and training is None:
        training = split_training_data(calib, plan_.recipe.training or TrainingSpec())
    if stream is not None:
        stream.on_load = lambda name: check_finite(model, [t for t in targets if t == name or t.startswith(name + ".")],
                                                   plan_.recipe.model.nonfinite)
    calibration = plan_.recipe.calibration
    batch_size, activations = (calibration.batch_size, calibration.activations) if calibration else (8, "auto")
    compute_dtype = torch.float32 if plan_.recipe.model.compute_dtype == "float32" else None
    states: dict[str, LayerState] = {}
    for index, stage in enumerate(plan_.stages):
        if stage and stage[0].method.needs_for(stage[0].config) == Needs.TRAINING:
            assert training is not None
            _train_stage(model, plan_, index, states, training, device, original,
                         work_dir / f"stage-{index}" if work_dir else None, resume)
            continue
        last = index == len(plan_.stages) - 1

        def survey(fn: Callable[[BlockWork], None], step: PlannedStep) -> None:
            label = f"{step.method.name} (survey)"
            needs_inputs = step.method.needs_for(step.config) != Needs.NOTHING  # a data-free method surveys weights
            run_stage(model, find_blocks(model), [StepWork(label, fn, step.layers, needs_inputs=needs_inputs)], calib,
                      device, batch_size, compute_dtype, dict(states), stream.survey() if stream else None, activations)

        stage = [replace(s, config=s.method.before_stage(s.config, lambda fn, s=s: survey(fn, s))) for s in stage]
        run_stage(model, find_blocks(model), [_step_work(s) for s in stage], calib, device, batch_size,
                  compute_dtype, states, stream.stage(index) if stream else None, activations, last_stage=last)
        if stream is not None:
            stream.end_stage(index, model)
    store_masked(model, states)  # when a training stage came last (the last run_stage stored the others)
    _record_steps(model, plan_)


@dataclass(frozen=True)
class TrainingData:
    """The windows training stages learn from, and the held-out ones their evaluation loss is measured on."""

    train: CalibrationSet
    held_out: CalibrationSet | None


def split_training_data(data: CalibrationSet | None, spec: TrainingSpec) -> TrainingData:
    """``data``'s first ``spec.eval_samples`` windows held out (none when that would leave nothing to train on)."""
    if data is None:
        raise UsageError("a training stage needs data: give calib=..., or a training: section with a dataset")
    held = spec.eval_samples if data.samples > spec.eval_samples else 0
    if held < spec.eval_samples:
        log.warning("training: %d windows cannot spare %d for the held-out loss; none held out", data.samples,
                    spec.eval_samples)
    return TrainingData(data.take(slice(held, None)), data.take(slice(0, held)) if held else None)


def training_data(plan_: Plan, tokenizer, context: int | None, calib: CalibLike = None) -> TrainingData | None:
    """The training text tokenized into windows: ``training.dataset``, else the calibration text (``calib`` when
    it names a file or a datasets id, else the recipe's ``calibration.dataset``) read anew for as many tokens as
    training wants. That is ``tokens`` (or ``steps`` times the tokens a step) plus the held-out windows, or all
    of the text when it holds fewer (the trainer then makes more than one pass). None when the recipe does not
    train, or trains on calibration windows given as tokens."""
    if not plan_.trains():
        return None
    spec = plan_.recipe.training or TrainingSpec()
    field, (dataset, config, split, column) = "training.dataset", (spec.dataset, spec.config, spec.split, spec.column)
    if dataset is None:
        field = "calibration.dataset"
        cal = plan_.recipe.calibration
        if isinstance(calib, (str, Path)):
            dataset, config, split, column = str(calib), None, "train", "text"
        elif calib is None and cal is not None:
            dataset, config, split, column = cal.dataset, cal.config, cal.split, cal.column
        else:
            return None
    if tokenizer is None:
        raise UsageError(f"{field} {dataset} is text and training needs a tokenizer to read it: pass tokenizer=...")
    seq_len = spec.seq_len or plan_.seq_len or min(1024, context or 1024)
    if spec.prompt_column is not None:
        return split_training_data(_examples(spec, tokenizer, seq_len), spec)
    per_step = spec.batch_size * spec.grad_accum * seq_len
    wanted = spec.tokens or (spec.steps * per_step if spec.steps else 1 << 62)
    docs = read_documents(dataset, config, split, column)
    windows = token_windows(docs, tokenizer, seq_len, wanted + spec.eval_samples * seq_len, spec.seed)
    if windows.shape[0] <= spec.eval_samples:
        raise DataError(f"{field} {dataset} gives {windows.shape[0]} windows of {seq_len} tokens for training, "
                        f"which leaves none to train on beside the {spec.eval_samples} held out; give more text, or "
                        "lower training.seq_len or training.eval_samples")
    log.info("training data: %d windows of %d tokens from %s (%d held out)", windows.shape[0], seq_len, dataset,
             spec.eval_samples)
    return split_training_data(CalibrationSet(windows, dataset), spec)


def _examples(spec: TrainingSpec, tokenizer, seq_len: int) -> CalibrationSet:
    """Instruction data: ``spec.dataset``'s prompt and response columns as padded samples (see
    :func:`compress.calibration.data.instruction_examples`), in an order shuffled by ``spec.seed``."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if spec.chat_template and not has_template:
        raise UsageError("training.chat_template: true, but the tokenizer of this model has no chat template; set "
                         "chat_template: false to train on the prompts as they are, or use a model whose tokenizer "
                         "has one")
    use_template = has_template if spec.chat_template is None else spec.chat_template
    pairs = read_columns(spec.dataset, spec.config, spec.split, (spec.prompt_column, spec.response_column))
    data = instruction_examples([p for p, _ in pairs], [r for _, r in pairs], tokenizer, seq_len, use_template,
                                spec.dataset)
    if data.samples <= spec.eval_samples:
        raise DataError(f"training.dataset {spec.dataset} has {data.samples} usable examples, which leaves none to "
                        f"train on beside the {spec.eval_samples} held out; give more, or lower training.eval_samples")
    order = torch.randperm(data.samples, generator=torch.Generator().manual_seed(spec.seed))
    log.info("training data: %d examples of %d tokens from %s (%s; %d held out)", data.samples, seq_len,
             spec.dataset, "in the chat template" if use_template else "no chat template", spec.eval_samples)
    return data.take(order)


def _train_stage(model: nn.Module, plan_: Plan, index: int, states: dict[str, LayerState], training: TrainingData,
                 device: torch.device, original: nn.Module | None, checkpoint_dir: Path | None, resume: bool) -> None:
    step = plan_.stages[index][0]
    blocks = len(find_blocks(model).modules)
    layers = step.layers
    with torch.random.fork_rng(devices=[]):  # what prepare draws (adapters' initial values) follows training.seed
        torch.manual_seed((plan_.recipe.training or TrainingSpec()).seed)
        step.method.prepare(model, step.config, layers, device)
    if len(find_blocks(model).modules) != blocks:  # a smaller student: its targets are found again
        spec = plan_.recipe.all_stages()[index].steps[0]
        layers = list(select(model, spec.targets, spec.ignore).modules)
    wanted = step.method.teacher(step.config)
    if wanted == "original":
        teacher = original
    elif wanted == "previous":
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
    elif wanted is not None:
        spec_ = plan_.recipe.model
        teacher = load_model(wanted, spec_.dtype, revision=None, trust_remote_code=spec_.trust_remote_code)
        teacher.eval().requires_grad_(False)
    else:
        teacher = None
    source = (getattr(model.config, "_name_or_path", "") or None) if index == 0 else None  # the model on disk
    with training_context(model, layers, step.method.trains(step.config), states, training.train, device, teacher,
                          checkpoint_dir, training.held_out, plan_.recipe.training, resume, source) as context:
        step.method.train(context, step.config)
    _after_training(model, step, layers, states)


def _after_training(model: nn.Module, step: PlannedStep, layers: list[str], states: dict[str, LayerState]) -> None:
    """The states a training step leaves its layers in, as it declares (:meth:`compress.Method.produces`):
    float again (adapters merged), or stored in the format the layer now has (adapters beside a stored base)."""
    produces = step.method.produces(step.config)
    written_by = {"method": step.method.name, "method_version": step.method.version}
    for name in layers:
        if produces == LayerKind.DENSE:
            states[name] = LayerState()
        elif produces == LayerKind.FORMAT:
            layer = model.get_submodule(name)
            layer.written_by = dict(written_by)
            states[name] = LayerState(LayerKind.FORMAT, None, layer.format, dict(written_by))


def _record_steps(model: nn.Module, plan_: Plan) -> None:
    from compress import __version__

    previous = getattr(model.config, "quantization_config", None)
    steps = list(previous.steps) if isinstance(previous, CompressQuantizationConfig) else []
    steps += [{"method": s.method.name, "method_version": s.method.version, "args": s.config.to_dict(),
               "layers": len(s.layers)} for stage in plan_.stages for s in stage]
    features = [f.model_dump(mode="json") for f in plan_.recipe.runtime or []]
    if not features and isinstance(previous, CompressQuantizationConfig):
        features = previous.runtime
    model.config.quantization_config = CompressQuantizationConfig({}, steps, plan_.recipe.to_dict(), __version__,
                                                                  features)


def apply(model: nn.Module, recipe: RecipeLike, calib: CalibLike = None, tokenizer=None,
          device: str | None = None, work_dir: str | Path | None = None, resume: bool = False) -> nn.Module:
    """Compress ``model`` in place following ``recipe`` and return it.

    Args:
        model: a transformers causal LM (on the CPU or a GPU).
        recipe: a recipe file path, a recipe dict, or a list of steps such as
            ``[{"method": "rtn", "args": {"bits": 4, "group_size": 128}}]``.
        calib: calibration data for methods that need it: a CalibrationSet, token ids [N, L], a data file
            or datasets id, or a list of texts. Defaults to the recipe's calibration section.
        tokenizer: needed when ``calib`` is text.
        device: where blocks are compressed (default: the recipe's, else CUDA when available).
        work_dir: where training stages keep their checkpoints (``stage-N``; default: none are kept).
        resume: continue each training stage from its last checkpoint in ``work_dir``.

    The recipe is checked completely (against the model too) before any weight changes.
    """
    data, source = recipe_dict(recipe)
    parsed, stages = validate_recipe(data, source, model_given=True, calib_given=calib is not None)
    plan_ = plan(parsed, stages, model, source)
    if calib is None:
        _check_data_size(plan_, source)
    run_on = torch.device(resolve_device(device or parsed.model.device))
    calib_set = _calibration(plan_, calib, tokenizer)
    training = training_data(plan_, tokenizer, config_context(model.config), calib)
    execute(model, plan_, calib_set, run_on, Path(work_dir) if work_dir is not None else None, training=training,
            resume=resume)
    return model


@dataclass(frozen=True)
class CheckedRecipe:
    """A recipe file checked in all four passes, ready to run (what ``compress validate`` shows)."""

    recipe: Recipe
    plan: Plan
    source: str
    data: dict[str, Any]
    context: int | None = None  # the model's context length, where its config states one


def check_recipe(path: str | Path, overrides: dict[str, Any] | None = None,
                 sections: dict[str, type[BaseModel]] | None = None) -> CheckedRecipe:
    """Read ``path``, apply command-line overrides, and run all four checks (the model on the meta device);
    ``sections``: schemas of sections the core keeps as mappings (see :func:`compress.recipe.validate_recipe`)."""
    data = read_recipe_file(path)
    for key, value in (overrides or {}).items():
        section, _, field = key.partition(".")
        if field:
            if not isinstance(data.get(section), dict):
                data[section] = {}
            data[section][field] = value
        else:
            data[section] = value
    parsed, stages = validate_recipe(data, str(path), sections=sections)
    spec = parsed.model
    meta = meta_model(spec.path, spec.revision, spec.trust_remote_code)
    plan_ = plan(parsed, stages, meta, str(path))
    _check_data_size(plan_, str(path))
    return CheckedRecipe(parsed, plan_, str(path), data, config_context(meta.config))


def run_checked(checked: CheckedRecipe, work_dir: Path | None = None, resume: bool = False) -> tuple[nn.Module, Any]:
    """Load the model of a checked recipe, compress it, and return (model, tokenizer); training stages keep
    their checkpoints under ``work_dir`` and, with ``resume``, continue from the last. The device, the tokenizer
    and the calibration and training data come first: a problem with any of them is reported before the weights
    load."""
    spec = checked.recipe.model
    device = torch.device(resolve_device(spec.device))
    tokenizer, calib = _tokenizer_and_data(checked)
    training = training_data(checked.plan, tokenizer, checked.context)
    model = load_model(spec.path, spec.dtype, spec.init, spec.revision, spec.trust_remote_code)
    model.eval()
    execute(model, checked.plan, calib, device, work_dir, training=training, resume=resume)
    return model, tokenizer


def _tokenizer_and_data(checked: CheckedRecipe) -> tuple[Any, CalibrationSet | None]:
    spec = checked.recipe.model
    try:
        tokenizer = load_tokenizer(spec.path, spec.revision, spec.trust_remote_code)
    except UsageError:
        if checked.plan.needs_calibration() or checked.plan.trains():
            raise
        log.warning("no tokenizer found for %s; the checkpoint will have none", spec.path)
        tokenizer = None
    return tokenizer, _calibration(checked.plan, None, tokenizer)


def streams(checked: CheckedRecipe) -> bool:
    """Whether ``compress apply`` streams the model (``model.load``; auto: a local safetensors checkpoint larger
    than half the memory available, and a recipe that can stream), saying so in the log."""
    spec = checked.recipe.model
    if spec.load != "auto":
        return spec.load == "stream"
    if spec.init == "random" or not is_local_reference(spec.path) or checked.plan.trains():
        return False
    size = sum(f.stat().st_size for f in Path(spec.path).expanduser().glob("*.safetensors"))
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if size > available / 2:
        log.info("streaming %s: its checkpoint (%.1f GB) is larger than half the memory available (%.1f GB); "
                 "set model.load: memory to load it whole", spec.path, size / 1e9, available / 1e9)
        return True
    return False


def run_streamed(checked: CheckedRecipe, output: Path, overwrite: bool = False,
                 work_dir: Path | None = None) -> tuple[nn.Module, Any]:
    """Compress the model of a checked recipe block by block from its checkpoint and write the checkpoint at
    ``output`` as it goes (:mod:`compress.streaming`); returns (model, tokenizer), the model's blocks freed."""
    spec = checked.recipe.model
    device = torch.device(resolve_device(spec.device))
    tokenizer, calib = _tokenizer_and_data(checked)
    model, tensors = empty_model(spec.path, spec.dtype, spec.trust_remote_code)
    scratch = (work_dir or output.parent / f".{output.name}.work") / "stream"
    with writing(output, overwrite) as partial:
        execute(model, checked.plan, calib, device, work_dir, ModelStream(tensors, partial, scratch,
                                                                          len(checked.plan.stages)))
        recipe = record_layers(model, recipe=checked.recipe.to_dict())
        model.config.save_pretrained(partial)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(partial)
        write_extras(partial, tokenizer, recipe)
    shutil.rmtree(scratch, ignore_errors=True)
    return model, tokenizer
