"""Sharing a checkpoint on the Hugging Face Hub (``compress push DIR REPO_ID``).

What is pushed is checked first: a complete compress checkpoint (its config's ``quantization_config``, every file its
weights need, each safetensors header whole), whose weights are the tensors its config declares (a model built
empty from the config, compressed layers included, is compared tensor by tensor with the files' headers), and
that no run is writing now. Then the model card (``README.md``) is written unless the folder has one, and every
file goes to the Hub in one commit (``huggingface_hub``'s ``create_commit`` with all the operations): the large
files are uploaded first and the commit that makes them part of the repository is the last request, so a push
that fails or is interrupted leaves the repository as it was.

The Hub's address is ``HF_ENDPOINT`` (read when pushing); the token is the one given, else ``HF_TOKEN``, else the
cached login, as huggingface_hub finds it. It is never logged or written, and is removed from any error shown.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from compress.checkpoint import RECIPE_FILE, writers
from compress.checkpoint_files import SAFETENSORS_FILE, SAFETENSORS_INDEX, any_quantization_config, check_files, \
    read_quantization_config, weight_map
from compress.errors import CheckpointError, CompressError, UsageError, listed

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
REPORT_FILE = "report.json"  # an eval report beside the weights is shown in the card (compress eval --json DIR/...)
FLOAT_CODES = {"F16", "BF16", "F32", "F64"}  # a float tensor may be stored in any of them (loading casts)
SAFETENSORS_CODES = {torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
                     torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
EXPORTS = {"gptq": "GPTQ", "compressed-tensors": "compressed-tensors"}  # quant_method of compress export's layouts
PARTIAL_NAME = re.compile(r"^\..+\.(partial|old)-\d+$")


class PushError(CompressError):
    """The Hub refused or failed the push; nothing was committed."""


@dataclass
class PushPlan:
    """What a push sends: ``files`` (path in the repository, bytes) from ``folder``, and what became of the card
    (``written``, ``rewritten`` or ``kept``)."""

    folder: Path
    repo_id: str
    files: list[tuple[str, int]]
    card: str

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def describe(self) -> str:
        width = max(len(path) for path, _ in self.files)
        lines = [f"  {path:<{width}}  {size:>15,} bytes" for path, size in self.files]
        lines.append(f"{len(self.files)} files, {self.total_bytes:,} bytes, for {self.repo_id}; model card "
                     f"{self.card} ({self.folder / CARD_FILE})")
        return "\n".join(lines)


def check_checkpoint(folder: str | Path) -> dict[str, Any]:
    """The ``quantization_config`` of ``folder`` once it is checked to be a complete compress checkpoint whose
    weights match its config and that no run is writing; UsageError or CheckpointError with the reason otherwise."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a directory: push a checkpoint folder written by compress apply")
    if PARTIAL_NAME.match(folder.name):
        raise UsageError(f"{folder} is a run's working copy (a checkpoint being written, or one being replaced), "
                         "not a checkpoint: push the folder without the leading dot once the run has ended")
    running = writers(folder)
    if running:
        raise UsageError(f"{folder} is being written now (by process {', '.join(map(str, running))}): push it once "
                         "that run has ended")
    if not (folder / "config.json").is_file():
        raise UsageError(f"{folder} has no config.json: it is not a model checkpoint")
    check_files(folder)
    config = any_quantization_config(folder) or {}
    exported = config.get("quant_method") in EXPORTS and (folder / RECIPE_FILE).is_file()
    if read_quantization_config(folder) is None and not exported:
        raise UsageError(f"{folder} is not a compress checkpoint (its config.json has no quantization_config of "
                         "quant_method compress, and it is not a compress export): push checkpoints written by "
                         "compress apply or compress export, or use huggingface_hub's upload_folder for other models")
    if not (folder / SAFETENSORS_FILE).is_file() and not (folder / SAFETENSORS_INDEX).is_file():
        raise CheckpointError(f"{folder} has no weights ({SAFETENSORS_FILE} or {SAFETENSORS_INDEX}): the checkpoint "
                              "is incomplete; re-create it with compress apply")
    if exported:
        _check_export(folder)
    else:
        _check_tensors(folder, config)
    return config


def _stored_tensors(folder: Path) -> dict[str, tuple[str, list[int]]]:
    """Each tensor of the checkpoint's safetensors files: (safetensors dtype code, shape), from the headers."""
    single = folder / SAFETENSORS_FILE
    files = [single] if single.is_file() else sorted({folder / f for f in weight_map(folder / SAFETENSORS_INDEX).values()})
    stored = {}
    for file in files:
        with file.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        stored.update({name: (entry["dtype"], entry["shape"]) for name, entry in header.items() if name != "__metadata__"})
    return stored


def _expected_tensors(folder: Path, config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[set[str]],
                                                                       set[str]]:
    """The tensors a model built from ``folder``'s config (the compressed layers of ``config`` empty in their
    formats) saves, on the meta device; the groups of names that are one tied tensor (a checkpoint stores one name
    of each); and the names of its linear layers."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from compress.formats.registry import build_empty_layers
    from compress.linear import is_linear_like
    from compress.model import config_dtype, load_config

    model_config = load_config(str(folder))
    with init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(model_config, dtype=config_dtype(model_config))
    build_empty_layers(model, config.get("layers") or {})
    model.tie_weights()
    names: dict[int, set[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(tensor), set()).add(name)
    linear = {name for name, module in model.named_modules() if is_linear_like(module)}
    return model.state_dict(), [group for group in names.values() if len(group) > 1], linear


def _check_tensors(folder: Path, config: dict[str, Any]) -> None:
    """CheckpointError naming what differs between the tensors the config declares and those the files hold."""
    try:
        expected, tied, _ = _expected_tensors(folder, config)
    except CompressError:
        raise
    except Exception as exc:  # the config names an architecture, a format or a scheme that does not build
        raise CheckpointError(f"{folder}: no model can be built from its config.json ({exc}); the config was edited "
                              "or damaged: re-create the checkpoint") from exc
    stored = _stored_tensors(folder)
    problems = []
    for name, tensor in expected.items():
        if name not in stored:
            if not any(name in group and group & stored.keys() for group in tied):
                problems.append(f"{name} is missing")
            continue
        code, shape = stored[name]
        if list(tensor.shape) != shape:
            problems.append(f"{name} is {shape}, the config declares {list(tensor.shape)}")
        wanted = SAFETENSORS_CODES.get(tensor.dtype)
        if wanted is None and code not in FLOAT_CODES or wanted is not None and code != wanted:
            problems.append(f"{name} is {code}, the config declares {str(tensor.dtype).removeprefix('torch.')}")
    problems += [f"{name} is not declared by the config" for name in sorted(stored.keys() - expected.keys())]
    if problems:
        raise CheckpointError(f"{folder}: its weights do not match its config.json: {listed(problems)}; the config or "
                              "the weights were edited or damaged: re-create the checkpoint")


def _check_export(folder: Path) -> None:
    """CheckpointError when an export's weights are not its config's model: every tensor the model built empty from
    the config holds outside its linear layers is there, every linear layer has tensors (under whatever names the
    layout gives them), and no tensor belongs to no module of the model."""
    expected, tied, linear = _expected_tensors(folder, {})
    stored = _stored_tensors(folder)
    modules = {name.rpartition(".")[0] for name in expected} | linear
    problems = [f"{name} is missing" for name in expected if name not in stored and name.rpartition(".")[0] not in
                linear and not any(name in group and group & stored.keys() for group in tied)]
    problems += [f"{module} has no tensors" for module in sorted(linear)
                 if not any(key.startswith(f"{module}.") for key in stored) and f"{module}.weight" not in
                 {n for group in tied if group & stored.keys() for n in group}]
    problems += [f"{key} belongs to no module of the config's model" for key in sorted(stored)
                 if key.rpartition(".")[0] not in modules]
    if problems:
        raise CheckpointError(f"{folder}: its weights do not match its config.json: {listed(problems)}; re-create the "
                              "export")


def plan_push(folder: str | Path, repo_id: str, card: bool = False, reports: list[str | Path] | None = None,
              base_model: str | None = None) -> PushPlan:
    """Check ``folder`` (:func:`check_checkpoint`), write its model card unless it has one (or again with
    ``card``), and list what a push sends: every file under it but hidden ones (names starting with a dot).
    ``reports``: compress eval reports for the card (default: ``folder``/report.json when there is one)."""
    folder = Path(folder).expanduser().resolve()
    config = check_checkpoint(folder)
    card_path = folder / CARD_FILE
    existed = card_path.exists()
    if card or not existed:
        if reports is None:
            reports = [folder / REPORT_FILE] if (folder / REPORT_FILE).is_file() else []
        text = model_card(folder, repo_id, config, reports, base_model)
        partial = card_path.with_name(f".{CARD_FILE}.partial-{os.getpid()}")
        partial.write_text(text)
        partial.replace(card_path)
        log.info("%s the model card %s", "rewrote" if existed else "wrote", card_path)
    files = sorted((path.relative_to(folder).as_posix(), path.stat().st_size) for path in folder.rglob("*")
                   if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts))
    return PushPlan(folder, repo_id, files, "rewritten" if existed and card else "kept" if existed else "written")


def push(plan: PushPlan, private: bool = False, revision: str | None = None, token: str | None = None) -> str:
    """Send ``plan``'s files to the Hub in one commit (creating the repository, private if ``private``, and the
    branch ``revision`` when missing); the commit's URL. PushError when the Hub refuses or fails: then nothing was
    committed and the repository is as it was."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(plan.folder / path))
                  for path, _ in plan.files]
    step = "creating the repository"
    try:
        api.create_repo(plan.repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        if revision:
            step = f"creating branch {revision}"
            api.create_branch(plan.repo_id, branch=revision, exist_ok=True)
        step = f"uploading {len(operations)} files ({plan.total_bytes:,} bytes) and committing them"
        info = api.create_commit(plan.repo_id, operations=operations, revision=revision,
                                 commit_message=f"Upload {plan.folder.name}, compressed with compress")
    except Exception as exc:  # HTTP errors, connection errors, refused tokens: all end the push the same way
        raise PushError(_push_failure(plan.repo_id, step, exc, token)) from None
    return str(info.commit_url)


def _push_failure(repo_id: str, step: str, exc: Exception, token: str | None) -> str:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    why = " ".join(str(exc).split())
    for secret in (token, os.environ.get("HF_TOKEN")):
        if secret:
            why = why.replace(secret, "***")
    advice = ("the token was refused or is missing: pass --token, set HF_TOKEN, or log in with `hf auth login`"
              if status in (401, 403) else "run the same command again (files already uploaded are not sent twice)")
    return (f"push to {repo_id} failed while {step}: {why}. Nothing was committed: the repository is as it was; "
            f"{advice}")


# -- the model card ------------------------------------------------------------------------------------------


def model_card(folder: Path, repo_id: str, config: dict[str, Any], reports: list[str | Path],
               base_model: str | None = None) -> str:
    """The model card of checkpoint ``folder`` (a compress checkpoint, or a compress export: ``config`` is its
    ``quantization_config``): YAML metadata (base model, library, tags with the methods and formats, pipeline, the
    base's license when known), what was done (the steps, and the recipe verbatim), the evaluation results of
    ``reports``, and how to load it."""
    from compress.eval.report import load_reports, results_markdown

    layout = EXPORTS.get(config.get("quant_method", ""))
    recipe_file = folder / RECIPE_FILE
    recipe = config.get("recipe") if layout is None else yaml.safe_load(recipe_file.read_text()) or {}
    recipe_model = ((recipe or {}).get("model") or {}).get("path")
    base = base_model or (hub_id(recipe_model) if recipe_model else None)
    steps = config.get("steps") if layout is None else [
        step for stage in recipe.get("stages") or [{"steps": recipe.get("steps") or []}] for step in stage["steps"]]
    methods = list(dict.fromkeys(step["method"] for step in steps or []))
    formats = config.get("formats") or []
    meta: dict[str, Any] = {}
    if base:
        meta["base_model"] = base
    meta["library_name"] = "compress" if layout is None else "transformers"
    license_ = _license(recipe_model, base)
    if license_:
        meta["license"] = license_
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = list(dict.fromkeys(["compress", *methods, *(_FORMAT_TAGS[f] for f in formats if f in _FORMAT_TAGS),
                                       *([config["quant_method"]] if layout else [])]))
    name = repo_id.rsplit("/", 1)[-1]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {name}", ""]
    what = (f"[{base}](https://huggingface.co/{base})" if base else
            f"`{Path(recipe_model).name}` (a local model)" if recipe_model else "A model")
    storage = _storage(config.get("layers") or {}) if layout is None else f"stored in the {layout} layout ({_layout_note(config)})"
    lines += [f"{what} compressed with compress: {storage}; {_weights_size(folder) / 2**20:,.1f} MiB of weights.", "",
              "## What was done", ""]
    for step in steps or []:
        args = ", ".join(f"{k}={v}" for k, v in (step.get("args") or {}).items() if v is not None)
        lines.append(f"- `{step['method']}` ({args})" + (f" on {step['layers']} layers" if "layers" in step else ""))
    if recipe_file.is_file():
        lines += ["", f"The recipe, as run (`{RECIPE_FILE}` in this repository):", "", "```yaml",
                  recipe_file.read_text().rstrip(), "```"]
    if reports:
        lines += ["", "## Evaluation", "", "Measured with `compress eval` against the uncompressed model on the same "
                  "text (the protocol is under each table).", "", results_markdown(load_reports(list(reports)), 3)]
    lines += ["", "## How to load", ""] + (_load_compress(repo_id) if layout is None else _load_export(repo_id, config))
    return "\n".join(lines)


def _load_compress(repo_id: str) -> list[str]:
    return ["With compress installed (`import compress` teaches transformers its formats):", "", "```python",
            "import compress", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")', "```", "",
            "or, with compress's runtime features (fused projections, its decode kernels on CUDA):", "", "```python",
            "import compress", "from huggingface_hub import snapshot_download", "",
            f'model = compress.load(snapshot_download("{repo_id}"))', "```", ""]


def _load_export(repo_id: str, config: dict[str, Any]) -> list[str]:
    needs = "compressed-tensors" if config["quant_method"] == "compressed-tensors" else "gptqmodel"
    return ["vLLM reads this layout:", "", "```bash", f"vllm serve {repo_id}", "```", "",
            f"With transformers (and the `{needs}` package installed):", "", "```python",
            "from transformers import AutoModelForCausalLM", "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")', "```", "",
            "With compress (its layers and decode kernels, codes as stored):", "", "```python", "import compress",
            "from huggingface_hub import snapshot_download", "",
            f'model = compress.load(snapshot_download("{repo_id}"))', "```", ""]


def _layout_note(config: dict[str, Any]) -> str:
    if config["quant_method"] == "gptq":
        group = "per channel" if config.get("group_size", -1) < 0 else f"groups of {config.get('group_size')}"
        return f"{config.get('bits')}-bit, {group}, {'symmetric' if config.get('sym') else 'asymmetric'}"
    groups = (config.get("config_groups") or {}).values()
    return "; ".join(f"{g.get('format')}: {len(g.get('targets') or [])} layers" for g in groups)


_FORMAT_TAGS = {"int": "quantized", "fp8": "fp8", "sparse24": "2:4-sparse", "sparse24-int": "2:4-sparse",
                "bitmask": "sparse", "factored": "low-rank", "corrected": "low-rank-correction"}


def hub_id(ref: str) -> str | None:
    """The Hub id a recipe's model names: the id itself, or the one a Hub cache path holds
    (``.../models--ORG--NAME/snapshots/...``); None for any other local path."""
    from compress.model import is_local_reference

    if not is_local_reference(ref):
        return ref
    cached = re.search(r"models--([^/]+?)--([^/]+)", ref)
    return f"{cached.group(1)}/{cached.group(2)}" if cached else None


def _license(recipe_model: str | None, base: str | None) -> str | None:
    """The base model's license from its card on this machine (the recipe's model folder, or the Hub cache), never
    from the network; None when no card is at hand."""
    cards = []
    if recipe_model and Path(recipe_model).expanduser().is_dir():
        cards.append(Path(recipe_model).expanduser() / CARD_FILE)
    if base:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base, CARD_FILE)
        if isinstance(cached, str):
            cards.append(Path(cached))
    for card in cards:
        if card.is_file():
            text = card.read_text(errors="replace")
            if text.startswith("---"):
                try:
                    meta = yaml.safe_load(text.split("---", 2)[1]) or {}
                except yaml.YAMLError:
                    continue
                if isinstance(meta, dict) and isinstance(meta.get("license"), str):
                    return meta["license"]
    return None


def _storage(layers: dict[str, dict[str, Any]]) -> str:
    """How the compressed layers are stored, e.g. ``14 linear layers stored as int 4-bit, groups of 32``."""
    if not layers:
        return "no linear layer is stored compressed"
    kinds: dict[str, int] = {}
    for scheme in layers.values():
        kind = scheme.get("format", "?") + (f" {scheme['bits']}-bit" if scheme.get("bits") else "")
        kind += f", groups of {scheme['group_size']}" if scheme.get("group_size") else ""
        kinds[kind] = kinds.get(kind, 0) + 1
    return f"{len(layers)} linear layers stored as " + "; ".join(
        kind if len(kinds) == 1 else f"{kind} ({count})" for kind, count in kinds.items())


def _weights_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))
