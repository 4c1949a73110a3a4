"""Compressed checkpoints: written atomically, loaded by :func:`load` or by transformers' ``from_pretrained``.

A checkpoint is a Hugging Face model directory: ``model.safetensors`` with the packed weights and their
scales / zero points, ``config.json`` whose ``quantization_config`` records the compress version, every
step applied, the recipe and each compressed layer's stored scheme and method, the tokenizer, and the
recipe again as ``recipe.yaml``.

Writing goes to a hidden sibling folder that is renamed into place only when complete: a failure or a
kill never leaves a half-written checkpoint at the target, and an existing target is replaced only with
``overwrite``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml

from compress import runtime
from compress.errors import CheckpointError, UsageError
from compress.formats import CompressedLinear
from compress.hf import QUANT_METHOD, CompressQuantizationConfig
from compress.model import DTYPES, resolve_device
from compress.runtime.fusion import is_fused

log = logging.getLogger(__name__)

RECIPE_FILE = "recipe.yaml"


def compressed_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Each compressed layer's qualified name -> its stored scheme and the method that wrote it."""
    return {
        name: {**module.scheme(), **getattr(module, "written_by", {})}
        for name, module in model.named_modules()
        if isinstance(module, CompressedLinear)
    }


def quantization_config(model: nn.Module, steps: list[dict], recipe: dict | None,
                        runtime_features: list[dict] | None) -> CompressQuantizationConfig:
    from compress import __version__

    return CompressQuantizationConfig(compressed_layers(model), steps, recipe or {}, __version__, runtime_features)


def _partial_dir(target: Path) -> Path:
    return target.parent / f".{target.name}.partial-{os.getpid()}"


def _clean_stale(target: Path) -> None:
    """Remove partial folders left by killed runs (their process no longer exists)."""
    for stale in target.parent.glob(f".{target.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save(model: nn.Module, output: str | Path, tokenizer=None, steps: list[dict] | None = None,
         recipe: dict | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` (compressed in memory) as a checkpoint directory at ``output``, atomically.

    ``steps`` and ``recipe`` default to what :func:`compress.apply` recorded on the model.
    """
    target = Path(output).expanduser().resolve()
    if is_fused(model):
        raise UsageError(f"cannot save to {target}: the model's projections are fused for inference "
                         "(compress.fuse_projections); call compress.unfuse_projections(model) first")
    if target.exists() and not overwrite:
        raise UsageError(f"output {target} already exists; pass --overwrite (overwrite=True) to replace it, "
                         "or choose another output")
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(target)
    partial = _partial_dir(target)
    shutil.rmtree(partial, ignore_errors=True)
    previous = getattr(model.config, "quantization_config", None)
    if steps is None and isinstance(previous, CompressQuantizationConfig):
        steps = previous.steps
    if recipe is None and isinstance(previous, CompressQuantizationConfig):
        recipe = previous.recipe
    features = previous.runtime if isinstance(previous, CompressQuantizationConfig) else []
    try:
        model.config.quantization_config = quantization_config(model, steps or [], recipe, features)
        model.save_pretrained(partial)
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
        if recipe:
            (partial / RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False))
        _swap_into_place(partial, target)
    except BaseException as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(exc, OSError):
            raise CheckpointError(f"could not write checkpoint {target}: {exc}; nothing was written there") from exc
        raise
    log.info("wrote %s", target)
    return target


def _swap_into_place(partial: Path, target: Path) -> None:
    if not target.exists():
        partial.rename(target)
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    target.rename(old)
    try:
        partial.rename(target)
    except OSError:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_quantization_config(path: str | Path) -> dict[str, Any] | None:
    """The compress ``quantization_config`` of a model directory, None for an uncompressed model."""
    config_file = Path(path) / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} is not a model directory: it has no config.json") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_file} is broken: {exc}; re-create the checkpoint") from exc
    qc = config.get("quantization_config")
    if qc is None or qc.get("quant_method") != QUANT_METHOD:
        return None
    if not isinstance(qc.get("layers"), dict):
        raise CheckpointError(f"{config_file}: quantization_config has no 'layers' table; the checkpoint is broken")
    return qc


def load(path: str | Path, device: str | None = None, dtype: str | torch.dtype | None = None,
         enable_runtime: bool = True) -> nn.Module:
    """Load a compress checkpoint (or any local causal LM) for inference, on ``device`` (default: auto), with the
    runtime features its recipe named enabled there (unless ``enable_runtime`` is False)."""
    from transformers import AutoModelForCausalLM

    path = Path(path).expanduser()
    if not path.is_dir():
        raise UsageError(f"checkpoint not found: {path} is not a directory")
    read_quantization_config(path)  # clear errors for a broken config before transformers reads it
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = DTYPES[dtype] if isinstance(dtype, str) else dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"could not load checkpoint {path}: {exc}") from exc
    model.eval()
    model = model.to(resolve_device(device or "auto"))
    if enable_runtime:
        runtime.enable(model)
    return model
