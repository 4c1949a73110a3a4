"""Compressed checkpoints: written atomically, loaded by :func:`load` or by transformers' ``from_pretrained``.

A checkpoint is a Hugging Face model directory: ``model.safetensors`` with the packed weights and their
scales / zero points, ``config.json`` whose ``quantization_config`` records the compress version, every
step applied, the recipe and each compressed layer's stored scheme and method, the tokenizer, and the
recipe again as ``recipe.yaml``.

Writing goes to a hidden sibling folder ``.NAME.partial-PID`` that is renamed into place only when complete: a
failure or a kill never leaves a half-written checkpoint at the target, and an existing target is replaced only
with ``overwrite``. The replacement is one atomic exchange of the two folders where the system has one (Linux's
``renameat2``), so the target always holds the old or the new checkpoint; elsewhere it is two renames, the old
checkpoint first moved aside to ``.NAME.old-PID``. What a killed run leaves is put right by the next save or load
of the same target (:func:`recover_leftovers`): a dead run's partial folder is removed, its ``.old-`` folder is
restored to the target when the target is missing and removed when the new checkpoint is in place.

Loading checks the files before transformers reads them (:func:`compress.checkpoint_files.check_files`):
``config.json`` decodes, and each safetensors file's header is whole and describes exactly the bytes the file has,
so a truncated or damaged checkpoint is named with what to do instead of failing deep inside safetensors.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml

from compress import distributed, layouts, runtime
from compress.checkpoint_files import any_quantization_config, check_files
from compress.errors import CheckpointError, UsageError
from compress.formats import compressed_modules
from compress.hf import CompressQuantizationConfig
from compress.model import DTYPES, resolve_device
from compress.runtime.fusion import is_fused

log = logging.getLogger(__name__)

RECIPE_FILE = "recipe.yaml"


def compressed_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Each compressed layer's qualified name -> its stored scheme and the method that wrote it."""
    return {
        name: {**module.scheme(), **getattr(module, "written_by", {})}
        for name, module in compressed_modules(model)
    }


def quantization_config(model: nn.Module, steps: list[dict], recipe: dict | None,
                        runtime_features: list[dict] | None) -> CompressQuantizationConfig:
    from compress import __version__

    return CompressQuantizationConfig(compressed_layers(model), steps, recipe or {}, __version__, runtime_features)


def _partial_dir(target: Path) -> Path:
    return target.parent / f".{target.name}.partial-{os.getpid()}"


def _old_dir(target: Path) -> Path:
    return target.parent / f".{target.name}.old-{os.getpid()}"


def _left_by_dead_runs(target: Path, kind: str) -> list[tuple[Path, int]]:
    """Target's hidden ``.NAME.KIND-PID`` siblings whose process has ended, with that process id."""
    found = []
    for path in target.parent.glob(f".{target.name}.{kind}-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            found.append((path, int(pid)))
    return found


def writers(target: str | Path) -> list[int]:
    """The running processes writing a checkpoint to ``target`` now (whose ``.NAME.partial-PID`` folder is there)."""
    target = Path(target).expanduser().resolve()
    pids = (path.name.rsplit("-", 1)[-1] for path in target.parent.glob(f".{target.name}.partial-*"))
    return sorted(int(pid) for pid in pids if pid.isdigit() and _alive(int(pid)))


def recover_leftovers(target: str | Path) -> None:
    """Put right what runs killed while writing ``target`` left beside it (their process no longer exists).

    A partial folder is removed. An ``.old-`` folder holds the checkpoint an overwrite was replacing: when the
    target is missing, the run was killed between moving the old checkpoint aside and moving the new one in, and
    the old one is restored; when the target exists, the new checkpoint landed and the old one is removed.
    """
    target = Path(target).expanduser().resolve()
    if not target.parent.is_dir():
        return
    for path, pid in _left_by_dead_runs(target, "partial"):
        if _remove(path):
            log.info("removed %s, left by process %d, which ended while writing %s", path.name, pid, target)
    olds = sorted(_left_by_dead_runs(target, "old"), key=lambda found: _changed(found[0]))
    if olds and not os.path.lexists(target):
        path, pid = olds.pop()  # the last one moved aside: the checkpoint the target held last
        try:
            path.rename(target)
        except OSError as exc:  # another process restored it first, or the folder cannot be written
            log.warning("could not restore %s from %s: %s", target, path.name, exc)
            return
        log.warning("restored %s from %s: an overwrite by process %d was killed before the new checkpoint was in "
                    "place", target, path.name, pid)
    if os.path.lexists(target):
        for path, pid in olds:
            if _remove(path):
                log.info("removed %s, the checkpoint %s held before an overwrite by process %d, killed after the "
                         "new one was in place", path.name, target, pid)


def _changed(path: Path) -> int:
    """When ``path`` was last renamed or changed (0 when it is gone)."""
    try:
        return path.lstat().st_ctime_ns
    except OSError:
        return 0


def _remove(path: Path) -> bool:
    """Remove the file or folder ``path``; whether it is gone (a read-only folder keeps it, with a warning)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)
    return not os.path.lexists(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one atomic rename (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where the
    system or the file system cannot, OSError for any other failure."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without it (older glibc, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, f"cannot exchange {a} and {b}: {os.strerror(code)}")


def save(model: nn.Module, output: str | Path, tokenizer=None, steps: list[dict] | None = None,
         recipe: dict | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` (compressed in memory) as a checkpoint directory at ``output``, atomically.

    ``steps`` and ``recipe`` default to what :func:`compress.apply` recorded on the model. Under a launcher of
    several processes only the main one writes; the others return the same path and write nothing.
    """
    if not distributed.is_main():
        log.debug("%s: only the main process writes %s", distributed.describe(), output)
        return Path(output).expanduser().resolve()
    if is_fused(model):
        raise UsageError(f"cannot save to {Path(output).expanduser().resolve()}: the model's projections are fused "
                         "for inference (compress.fuse_projections); call compress.unfuse_projections(model) first")
    with writing(output, overwrite) as partial:
        recipe = record_layers(model, steps, recipe)
        model.save_pretrained(partial)
        write_extras(partial, tokenizer, recipe, getattr(model, "compress_adapter", None))
    return Path(output).expanduser().resolve()


@contextlib.contextmanager
def writing(output: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A hidden folder beside ``output`` to write a checkpoint into, moved into place when the block ends and
    removed if it raises: a failure or a kill never leaves a half-written checkpoint at ``output``, and an
    existing one is replaced only with ``overwrite``."""
    target = Path(output).expanduser().resolve()
    recover_leftovers(target)  # first: an interrupted overwrite's old checkpoint is back at the target
    if target.exists() and not overwrite:
        raise UsageError(f"output {target} already exists; pass --overwrite (overwrite=True) to replace it, "
                         "or choose another output")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_dir(target)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
        _swap_into_place(partial, target)
    except BaseException as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(exc, OSError):
            raise CheckpointError(f"could not write checkpoint {target}: {exc}; nothing was written there") from exc
        raise
    log.info("wrote %s", target)


def record_layers(model: nn.Module, steps: list[dict] | None = None, recipe: dict | None = None) -> dict | None:
    """Set the model's quantization config to what a checkpoint records: each compressed layer's scheme and
    method, the formats, the runtime features, ``steps`` and ``recipe`` (by default those :func:`compress.apply`
    recorded on the model). Returns the recipe."""
    previous = getattr(model.config, "quantization_config", None)
    if steps is None and isinstance(previous, CompressQuantizationConfig):
        steps = previous.steps
    if recipe is None and isinstance(previous, CompressQuantizationConfig):
        recipe = previous.recipe
    features = previous.runtime if isinstance(previous, CompressQuantizationConfig) else []
    model.config.quantization_config = quantization_config(model, steps or [], recipe, features)
    return recipe


def write_extras(folder: Path, tokenizer=None, recipe: dict | None = None, adapter=None) -> None:
    """The tokenizer, the recipe (``recipe.yaml``) and a trained adapter alone (``adapter/``, in peft's format:
    :class:`compress.lora.AdapterExport`) beside a checkpoint's weights and config."""
    if adapter is not None:
        from compress.lora import ADAPTER_DIR, write_adapter

        write_adapter(folder / ADAPTER_DIR, adapter)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if recipe:
        (folder / RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False))


def _swap_into_place(partial: Path, target: Path) -> None:
    """Move the complete checkpoint at ``partial`` to ``target``; an existing target is replaced such that the
    target always holds the old or the new checkpoint (and, after a kill, :func:`recover_leftovers` finishes)."""
    if not target.exists():
        partial.rename(target)
        return
    if not _exchange(partial, target):
        old = _old_dir(target)
        target.rename(old)  # a kill from here to the next rename leaves no target: the next run restores `old`
        try:
            partial.rename(target)
        except OSError:
            old.rename(target)
            raise
        old.rename(partial)  # what is left to delete is a partial folder, never an incomplete `.old-` one
    _remove(partial)


def _from_pretrained(path: Path, dtype: torch.dtype | None) -> nn.Module:
    """A compress checkpoint (or a plain model) through transformers, every tensor the config declares checked to be
    in the weights."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"could not load checkpoint {path}: {exc}") from exc
    layers = tuple(f"{name}." for name in compressed_layers(model))
    missing = [key for key in info.get("missing_keys", []) if key.startswith(layers)]
    if missing:  # the config declares tensors the weights lack (e.g. zero points of a scheme relabelled asymmetric)
        shown = ", ".join(sorted(missing)[:4]) + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else "")
        raise CheckpointError(f"checkpoint {path}: {len(missing)} tensors its config.json declares are not in its "
                              f"weights: {shown}; the config or the weights were edited or damaged: re-create the "
                              "checkpoint")
    return model


def load(path: str | Path, device: str | None = None, dtype: str | torch.dtype | None = None,
         enable_runtime: bool = True) -> nn.Module:
    """Load a compress checkpoint (a GPTQ or compressed-tensors one, its layers converted to compress's as it loads,
    or any local causal LM) for inference, on ``device`` (default: auto), with the runtime features its recipe named enabled there
    (unless ``enable_runtime`` is False)."""
    path = Path(path).expanduser()
    recover_leftovers(path)  # an overwrite killed half-way: its old checkpoint back, or its leftovers gone
    if not path.is_dir():
        raise UsageError(f"checkpoint not found: {path} is not a directory")
    check_files(path)  # clear errors for damaged files before transformers reads them
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    stored = any_quantization_config(path)
    if stored is not None and stored.get("quant_method") in layouts.READERS:  # compress layers made as it loads
        model = layouts.read(path, stored)
        if torch_dtype is not None:
            model.to(torch_dtype)
    else:
        model = _from_pretrained(path, torch_dtype)
    model.eval()
    model = model.to(resolve_device(device or "auto"))
    if enable_runtime:
        runtime.enable(model)
    return model
