"""Recipe files: the YAML envelope and the checks that need no model.

A recipe is checked in four passes, each collecting every problem before one error lists them all:

1. the envelope (this module's schema): sections, fields and types; unknown keys are errors, and so are
   duplicate keys and strings where numbers or booleans belong (types are strict);
2. each step's ``args`` against its method's config class, errors rooted at the step;
3. constraints between steps and sections (a training method alone in its stage, calibration data
   present when a method needs it, data files that exist);
4. against the model on the meta device (:mod:`compress.plan`).

Relative paths inside a recipe file are resolved against the recipe's folder, so a recipe behaves the
same from any working directory; paths given on the command line are relative to the working directory.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from compress.calibration.data import check_contents, check_source
from compress.errors import PluginError, Problem, RecipeError
from compress.methods import Method, MethodConfig, Needs
from compress.model import check_device, is_local_reference
from compress.registry import Registry, registry


class Section(BaseModel):
    """Base of a recipe section: unknown keys are errors, values are immutable. A recipe is validated strictly
    (``validate_recipe``: no string is read as a number or a boolean); other callers, such as command-line
    options given as text, validate sections as they need."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Section):
    path: str | None = Field(None, description="Hub id or local directory (relative to the recipe file)")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    compute_dtype: Literal["model", "float32"] = Field(
        "model", description="precision of the blocks while they are compressed (calibration forward passes, "
                             "searches): float32 upcasts each block, and the layers before the first, for its turn "
                             "and casts it back, so a bf16/fp16 model is calibrated without 16-bit rounding of its "
                             "activations (slower on large models)")
    device: str = Field("auto", description="execution device: auto, cpu, cuda or cuda:N")
    nonfinite: Literal["error", "zero"] = Field(
        "error", description="what to do with NaN or infinite weights in the targeted layers: error (stop before "
                             "compressing, naming each layer) or zero (replace them by zeros, with a warning)")
    init: Literal["pretrained", "random"] = "pretrained"
    load: Literal["auto", "memory", "stream"] = Field(
        "auto", description="memory: load the whole model, then compress it; stream: read each decoder block from "
                            "the checkpoint's safetensors files when its turn comes and write it out compressed, so "
                            "memory holds one block (for models larger than the machine's memory; a local "
                            "directory, no training stage); auto: stream when the checkpoint is larger than half "
                            "the memory available")
    revision: str | None = None
    trust_remote_code: bool = False


class CalibrationSpec(Section):
    dataset: str = Field(description="a .txt/.jsonl/.parquet file (relative to the recipe) or a datasets id")
    config: str | None = None
    split: str = "train"
    column: str = "text"
    samples: int = Field(128, ge=1)
    seq_len: int | None = Field(None, ge=8, description="default: min(2048, the model's context)")
    seed: int = 0
    batch_size: int = Field(8, ge=1, description="samples per forward pass")
    activations: Literal["auto", "device", "cpu"] = Field(
        "auto", description="where the current block's calibration activations live: auto (on the device when they "
        "fit beside the block's work, else in CPU memory), device, or cpu")


class TrainingSpec(Section):
    """The trainer's data and settings, for every training step of the recipe (:mod:`compress.trainer`)."""

    dataset: str | None = Field(None, description="training text: a .txt/.jsonl/.parquet file (relative to the "
                                "recipe) or a datasets id; default: the calibration text (calibration.dataset or "
                                "--calib), read for as many tokens as training wants")
    config: str | None = None
    split: str = "train"
    column: str = "text"
    prompt_column: str | None = Field(None, description="instruction data: the field (column) of the prompts, with "
                                      "response_column; each pair is one sample and the loss is on the response only")
    response_column: str | None = Field(None, description="instruction data: the field (column) of the responses")
    chat_template: bool | None = Field(None, description="instruction data: put each prompt in the tokenizer's chat "
                                       "template as a user turn; default: when the tokenizer has one")
    seq_len: int | None = Field(None, ge=8, description="tokens a sample; default: the calibration's")
    tokens: int | None = Field(None, ge=1, description="training tokens in all (the data repeats when shorter); "
                               "or set steps")
    steps: int | None = Field(None, ge=1, description="optimizer steps; default: from tokens, else one pass")
    batch_size: int = Field(4, ge=1, description="samples a forward pass")
    grad_accum: int = Field(1, ge=1, description="forward passes an optimizer step")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW)")
    lr_relative: bool = Field(False, description="each tensor's rate is lr times its root mean square before "
                              "training, so that tensors of different sizes (quantization scales near 0.03, norms "
                              "near 1) change by the same fraction a step; a tensor of zeros trains at lr")
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adamw", "paged_adamw_8bit"] | None = Field(
        None, description="AdamW, or bitsandbytes' paged 8-bit AdamW (CUDA only; AdamW elsewhere, said in the log); "
                          "default: the method's choice (qlora: paged 8-bit, others: AdamW)")
    warmup: float = Field(0.05, ge=0, lt=1, description="fraction of the steps the rate rises linearly over")
    min_lr: float = Field(0.1, ge=0, le=1, description="the rate at the end of the cosine decay, as a fraction "
                          "of lr")
    clip: float | None = Field(1.0, gt=0, description="gradient norm clipping; null: none")
    eval_samples: int = Field(8, ge=0, description="held-out samples the evaluation loss is measured on (taken "
                              "from the data, never trained on)")
    eval_every: int = Field(0, ge=0, description="steps between evaluations of the held-out loss; 0: at the "
                            "start and the end only")
    save_every: int = Field(100, ge=1, description="steps between checkpoints (for --resume)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: less "
                                         "memory, about a third more time")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="autocast the forward (accelerate) while the trained tensors keep float32 master "
                            "copies; auto: the model's dtype when it is bf16 or fp16, else no")
    seed: int = 0


class StepSpec(Section):
    method: str
    targets: list[str] = Field(default_factory=lambda: ["Linear"], min_length=1)
    ignore: list[str] = Field(default_factory=list)
    args: dict[str, Any] = Field(default_factory=dict)


class RuntimeSpec(Section):
    """A runtime feature the checkpoint runs with once loaded (``compress.load`` enables it)."""

    feature: str
    args: dict[str, Any] = Field(default_factory=dict)


class StageSpec(Section):
    name: str | None = None
    steps: list[StepSpec] = Field(min_length=1)


class Recipe(Section):
    model: ModelSpec = Field(default_factory=ModelSpec)
    calibration: CalibrationSpec | None = None
    training: TrainingSpec | None = None
    stages: list[StageSpec] | None = None
    steps: list[StepSpec] | None = Field(None, description="shorthand for a single stage")
    runtime: list[RuntimeSpec] | None = Field(None, description="runtime features the checkpoint runs with "
                                               "(e.g. fuse-projections)")
    output: str | None = None
    eval: dict[str, Any] | None = Field(None, description="evaluation after apply; checked by the evaluation "
                                        "harness's schema (compress.eval.spec.EvalSpec) where the caller gives it")

    def all_stages(self) -> list[StageSpec]:
        return list(self.stages or []) or ([StageSpec(steps=self.steps)] if self.steps else [])

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


# -- pass 1: the envelope ----------------------------------------------------------------------------------


def _path_text(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _fields_at(loc: tuple, schema: type[BaseModel]) -> list[str]:
    """The field names of the section a location points into (for "did you mean")."""
    cls: Any = schema
    for part in loc:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            break
        cls = _inner_model(field.annotation)
    return list(cls.model_fields) if isinstance(cls, type) and issubclass(cls, BaseModel) else []


def _inner_model(annotation: Any) -> Any:
    for arg in typing.get_args(annotation) or (annotation,):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
        inner = _inner_model(arg) if typing.get_args(arg) else None
        if inner is not None:
            return inner
    return None


def problems_from_validation(exc: ValidationError, root: tuple = (), fields: list[str] | None = None,
                             schema: type[BaseModel] | None = None) -> list[Problem]:
    """Turn pydantic's errors into problems with recipe paths and "did you mean" hints (``schema``: the model
    validated, default the recipe's; ``fields``: the known fields where they are flat)."""
    problems = []
    for err in exc.errors():
        loc = root + tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            known = fields if fields is not None else _fields_at(tuple(err["loc"])[:-1], schema or Recipe)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"; did you mean {close[0]}?" if close else (f"; known fields: {', '.join(known)}" if known else "")
            problems.append(Problem(_path_text(loc), f"unknown field{hint}"))
        else:
            got = err.get("input")
            shown = f" (got {got!r})" if got is not None and not isinstance(got, (dict, list)) else ""
            message = err["msg"].removeprefix("Value error, ")  # a validator's own words, as it wrote them
            problems.append(Problem(_path_text(loc), f"{message[:1].lower()}{message[1:]}{shown}"))
    return problems


def _resolve_paths(data: dict, base: Path) -> None:
    """Make relative local paths in the recipe absolute against the recipe's folder."""

    def fix(section: Any, key: str) -> None:
        if isinstance(section, dict) and isinstance(section.get(key), str):
            value = section[key]
            candidate = base / value
            if value.startswith(("./", "../")) or (not Path(value).is_absolute() and candidate.exists()):
                section[key] = str(candidate.resolve())

    fix(data.get("model"), "path")
    fix(data.get("calibration"), "dataset")
    fix(data.get("eval"), "data")
    fix(data.get("eval"), "prompts")
    fix(data.get("eval"), "output")
    if isinstance(data.get("eval"), dict):
        fix(data["eval"].get("speculative"), "draft")
    if isinstance(data.get("output"), str) and not Path(data["output"]).is_absolute():
        data["output"] = str((base / data["output"]).resolve())


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading floats as YAML 1.2 does too: ``1e-3`` is a number (YAML 1.1, PyYAML's
    default, reads it as a string, which strict types would then refuse)."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _duplicate_keys(node: yaml.Node, loc: tuple, seen: set[int], problems: list[Problem]) -> None:
    """A problem for every key given twice in one mapping, at its path in the recipe."""
    if id(node) in seen:  # anchors make a graph; visit each node once
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], yaml.Mark] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key_node.tag != "tag:yaml.org,2002:merge":
                mark, earlier = key_node.start_mark, first.get((key_node.tag, key))
                if earlier is None:
                    first[key_node.tag, key] = mark
                elif earlier.line == mark.line:
                    problems.append(Problem(_path_text(loc + (key,)), f"duplicate key, given twice on line "
                                            f"{mark.line + 1} (columns {earlier.column + 1} and {mark.column + 1}); keep one"))
                else:
                    problems.append(Problem(_path_text(loc + (key,)), f"duplicate key, given at line "
                                            f"{earlier.line + 1} and again at line {mark.line + 1}; keep one"))
            _duplicate_keys(value_node, loc + (key,) if key is not None else loc, seen, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _duplicate_keys(item, loc + (i,), seen, problems)


def parse_yaml(text: str, source: str) -> Any:
    """A YAML document, with duplicate keys as errors (RecipeError lists each with its path and lines) and
    YAML 1.2's floats; RecipeError for text that is not YAML."""
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        problems: list[Problem] = []
        if node is not None:
            _duplicate_keys(node, (), set(), problems)
        if problems:
            raise RecipeError(problems, source=source)
        return loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError([Problem(where, f"not valid YAML: {getattr(exc, 'problem', exc)}")], source=source) from exc
    finally:
        loader.dispose()


def read_recipe_file(path: str | Path) -> dict:
    """The recipe file as a dict with its relative paths resolved; RecipeError for a file that is not UTF-8,
    not YAML, or gives a key twice."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError([Problem("", f"cannot read recipe file: {exc.strerror or exc}")], source=str(path)) from exc
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise RecipeError([Problem(f"line {line}, byte {exc.start}", f"not UTF-8 text (byte 0x{raw[exc.start]:02x}: "
                                   f"{exc.reason}); save the file as UTF-8")], source=str(path)) from exc
    data = parse_yaml(text, str(path))
    if not isinstance(data, dict):
        raise RecipeError([Problem("", f"a recipe is a mapping of sections, got {type(data).__name__}")], source=str(path))
    _resolve_paths(data, path.parent.resolve())
    return data


# -- passes 2 and 3 ----------------------------------------------------------------------------------------


class ResolvedStep(typing.NamedTuple):
    where: str  # "stages[0].steps[1]"
    spec: StepSpec
    method: Method
    config: MethodConfig


def validate_recipe(data: dict, source: str = "recipe", plugins: Registry = registry, model_given: bool = False,
                    calib_given: bool = False, sections: dict[str, type[BaseModel]] | None = None
                    ) -> tuple[Recipe, list[list[ResolvedStep]]]:
    """Passes 1-3: the parsed recipe and, per stage, its steps with their methods and configs.

    ``model_given`` / ``calib_given``: the caller supplies the model / calibration data itself (the Python
    API), so the recipe need not name them. ``sections`` checks sections the core holds as plain mappings
    against their owners' schemas (the command line gives ``{"eval": EvalSpec}``).
    """
    problems: list[Problem] = []
    try:
        recipe: Recipe | None = Recipe.model_validate(data, strict=True)
    except ValidationError as exc:
        recipe = None
        problems.extend(problems_from_validation(exc))
    # Pass 2 runs on the raw steps, so a broken envelope does not hide problems in the steps' arguments.
    checked: dict[str, tuple[Method, MethodConfig]] = {}
    for where, raw in _raw_steps(data):
        method_name, args = raw.get("method"), raw.get("args", {})
        if not isinstance(method_name, str):
            continue
        try:
            method = plugins.get(method_name)
        except PluginError as exc:
            problems.append(Problem(f"{where}.method", str(exc)))
            continue
        if not isinstance(args, dict):
            continue
        try:
            checked[where] = (method, method.Config.from_dict(args))
        except ValidationError as exc:
            for p in problems_from_validation(exc, fields=list(method.Config.model_fields)):
                problems.append(Problem(f"{where}.args.{p.where}" if p.where else f"{where}.args", p.message))
    problems += _runtime_problems(data)
    device = data["model"].get("device") if isinstance(data.get("model"), dict) else None
    if isinstance(device, str) and (problem := check_device(device)):
        problems.append(Problem("model.device", problem))
    for name, schema in (sections or {}).items():
        if isinstance(data.get(name), dict):
            try:
                schema.model_validate(data[name], strict=True)
            except ValidationError as exc:
                problems += problems_from_validation(exc, root=(name,), schema=schema)
    if recipe is None:
        raise RecipeError(problems, source)
    if recipe.stages and recipe.steps:
        problems.append(Problem("steps", "give either stages or steps (a single stage), not both"))
    if not recipe.all_stages():
        problems.append(Problem("stages", "no steps: add stages (or steps) listing at least one method"))
    stages: list[list[ResolvedStep]] = []
    for si, stage in enumerate(recipe.all_stages()):
        resolved = []
        for ji, step in enumerate(stage.steps):
            where = f"stages[{si}].steps[{ji}]" if recipe.stages else f"steps[{ji}]"
            if where in checked:
                resolved.append(ResolvedStep(where, step, *checked[where]))
        stages.append(resolved)
    problems.extend(_cross_checks(recipe, stages, model_given, calib_given))
    if problems:
        raise RecipeError(problems, source)
    return recipe, stages


def _runtime_problems(data: dict) -> list[Problem]:
    """Pass 2 for the ``runtime:`` section: each feature is installed and its arguments fit it."""
    from compress.runtime import features

    problems = []
    entries = data.get("runtime")
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        if not isinstance(entry, dict) or not isinstance(entry.get("feature"), str):
            continue
        try:
            feature = features.get(entry["feature"])
        except PluginError as exc:
            problems.append(Problem(f"runtime[{i}].feature", str(exc)))
            continue
        try:
            feature.Config.from_dict(entry.get("args") or {})
        except ValidationError as exc:
            for p in problems_from_validation(exc, fields=list(feature.Config.model_fields)):
                problems.append(Problem(f"runtime[{i}].args.{p.where}" if p.where else f"runtime[{i}].args", p.message))
    return problems


def _raw_steps(data: dict) -> list[tuple[str, dict]]:
    """(path, step dict) for every step-like mapping in the raw recipe."""
    found = []
    stages = data.get("stages")
    if isinstance(stages, list):
        for si, stage in enumerate(stages):
            steps = stage.get("steps") if isinstance(stage, dict) else None
            for ji, step in enumerate(steps if isinstance(steps, list) else []):
                if isinstance(step, dict):
                    found.append((f"stages[{si}].steps[{ji}]", step))
    if isinstance(data.get("steps"), list) and not isinstance(stages, list):
        found += [(f"steps[{ji}]", step) for ji, step in enumerate(data["steps"]) if isinstance(step, dict)]
    return found


def _cross_checks(recipe: Recipe, stages: list[list[ResolvedStep]], model_given: bool, calib_given: bool) -> list[Problem]:
    problems = []
    all_trainers = [s for stage in stages for s in stage if s.method.needs_for(s.config) == Needs.TRAINING]
    training = recipe.training
    own_data = training is not None and training.dataset is not None  # else the trainers train on calibration data
    needing = [s for stage in stages for s in stage if s.method.needs_for(s.config) == Needs.CALIBRATION
               or (s.method.needs_for(s.config) == Needs.TRAINING and not own_data)]
    for stage in stages:
        trainers = [s for s in stage if s.method.needs_for(s.config) == Needs.TRAINING]
        if trainers and len(stage) > 1:
            problems.append(Problem(trainers[0].where, f"method {trainers[0].method.name!r} trains the whole model "
                                    "and must be the only step of its stage; move it to a stage of its own"))
    if needing and recipe.calibration is None and not calib_given:
        first = needing[0]
        if first.method.needs_for(first.config) == Needs.TRAINING:
            problems.append(Problem(first.where, f"method {first.method.name!r} trains and has no data: add a "
                                    "training: section with a dataset (a .txt/.jsonl/.parquet file or a datasets id), "
                                    "a calibration: section, or pass --calib"))
        else:
            problems.append(Problem(first.where, f"method {first.method.name!r} needs calibration data; add a "
                                    "calibration: section (dataset: a .txt/.jsonl/.parquet file) or pass --calib"))
    if training is not None:
        if not all_trainers:
            problems.append(Problem("training", "no step of the recipe trains; remove the training: section or add a "
                                    "training step (e.g. method: distill) in a stage of its own"))
        if training.tokens is not None and training.steps is not None:
            problems.append(Problem("training.steps", f"both tokens ({training.tokens}) and steps ({training.steps}) "
                                    "are set; keep one"))
        examples = training.prompt_column is not None or training.response_column is not None
        if examples and (training.prompt_column is None or training.response_column is None):
            given, missing = (("prompt_column", "response_column") if training.response_column is None
                              else ("response_column", "prompt_column"))
            problems.append(Problem(f"training.{missing}", f"instruction data needs both columns: {given} is set, "
                                    f"{missing} is not; set it, or remove {given} to train on plain text"))
        if examples and not own_data:
            problems.append(Problem("training.dataset", "instruction data (prompt_column, response_column) is read "
                                    "from training.dataset, which is not set: name the file or datasets id there"))
        if training.chat_template is not None and not examples:
            problems.append(Problem("training.chat_template", "applies to instruction data only: set prompt_column "
                                    "and response_column, or remove chat_template"))
        if own_data and all_trainers and (problem := check_source(training.dataset)):
            problems.append(Problem("training.dataset", problem))
        elif own_data and all_trainers:
            problem = check_contents(training.dataset, training.eval_samples + 1,
                                     None if examples else training.seq_len, training.prompt_column or training.column)
            if problem:
                problems.append(Problem("training.dataset", problem))
    if recipe.calibration is not None and needing:
        spec = recipe.calibration
        problem = check_source(spec.dataset)
        if not problem and not calib_given:  # the size test waits for the model's context when seq_len is not set
            problem = check_contents(spec.dataset, spec.samples, spec.seq_len, spec.column)
        if problem:
            problems.append(Problem("calibration.dataset", problem))
    if recipe.model.load == "stream":
        if all_trainers:
            first = all_trainers[0]
            problems.append(Problem("model.load", f"stream cannot run {first.where} ({first.method.name}), "
                                    "which trains the whole model; use load: memory"))
        if recipe.model.init == "random":
            problems.append(Problem("model.load", "stream reads a checkpoint's weights; init: random has none: use "
                                    "load: memory"))
    if not model_given and recipe.model.path is None:
        problems.append(Problem("model.path", "no model given: set model.path in the recipe or pass --model"))
    elif not model_given and is_local_reference(recipe.model.path) and not Path(recipe.model.path).expanduser().exists():
        problems.append(Problem("model.path", f"model path not found: {recipe.model.path}"))
    return problems
