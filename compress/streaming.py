"""Compressing a model larger than the machine's memory: the model is built on the meta device, and each decoder
block's tensors are read from the checkpoint's safetensors shards when its turn comes, compressed, written to the
output shards and released, so memory holds one block (plus the embeddings and head) at a time.

:class:`ShardedTensors` reads single tensors from a model directory (``model.safetensors`` or a sharded
``model.safetensors.index.json``); :class:`ShardWriter` writes the output in Hugging Face's sharded layout;
:class:`BlockStream` is what the calibration engine calls around each block (``load`` before, ``store`` after).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import shutil
import sys
from collections.abc import Callable
from typing import BinaryIO
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from compress.checkpoint_files import SAFETENSORS_FILE, SAFETENSORS_INDEX, weight_map
from compress.errors import CheckpointError, UsageError

log = logging.getLogger(__name__)

SHARD_BYTES = 2**29  # an output shard closes once it holds this much (on disk meanwhile, not in memory)


class ShardedTensors:
    """The tensors of a model directory's safetensors files, read one at a time (never a whole file)."""

    def __init__(self, model_dir: str | Path):
        self.root = Path(model_dir)
        single, index = self.root / SAFETENSORS_FILE, self.root / SAFETENSORS_INDEX
        if single.is_file():  # transformers' own order: the single file first
            with safe_open(single, "pt") as f:
                self.files = dict.fromkeys(f.keys(), single)
        elif index.is_file():
            self.files = {name: self.root / file for name, file in weight_map(index).items()}
        else:
            raise UsageError(f"{self.root} has no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}: streaming reads "
                             "safetensors checkpoints only; set model.load: memory for other kinds")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def stored(self, name: str) -> tuple[Path, int, str, list[int], int]:
        """Where tensor ``name``'s bytes lie: (file, offset of its first byte, safetensors dtype, shape, bytes)."""
        path = self.files[name]
        with path.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            entry = json.loads(f.read(length))[name]
        start, end = entry["data_offsets"]
        return path, 8 + length + start, entry["dtype"], entry["shape"], end - start

    def get(self, name: str) -> torch.Tensor:
        # opened for each read: a file kept open stays mapped, and the pages read count against the process
        with safe_open(self.files[name], "pt") as f:
            return f.get_tensor(name)


def materialize(module: nn.Module, prefix: str, tensors: ShardedTensors, skip: str | None = None,
                recurse: bool = True) -> None:
    """Give every parameter and buffer of ``module`` that is on the meta device its tensor from ``tensors`` (the
    name is ``prefix`` + its name in ``module``), in its dtype where both are floating-point, as ``from_pretrained``
    casts them. Tensors shared by two modules stay shared. One the checkpoint does not hold is left on the meta
    device for the model's weight tying to fill. Modules whose qualified name starts with ``skip`` are left, and
    without ``recurse`` only ``module``'s own tensors are read."""
    fresh: dict[int, torch.Tensor] = {}
    for module_name, sub in module.named_modules() if recurse else [("", module)]:
        if skip is not None and f"{prefix}{module_name}.".startswith(skip):
            continue
        for table in (sub._parameters, sub._buffers):  # buffers: a compressed layer's, from an earlier stage's output
            for name, old in list(table.items()):
                if old is None or not old.is_meta:
                    continue
                if id(old) not in fresh:
                    key = f"{prefix}{module_name}.{name}" if module_name else f"{prefix}{name}"
                    if key not in tensors:
                        continue
                    fresh[id(old)] = _loaded(tensors, key, old)
                table[name] = fresh[id(old)]


def _loaded(tensors: ShardedTensors, key: str, like: torch.Tensor) -> torch.Tensor:
    t = tensors.get(key)
    if tuple(t.shape) != tuple(like.shape):
        raise CheckpointError(f"{tensors.root}: tensor {key} has shape {tuple(t.shape)}, the model's config wants "
                              f"{tuple(like.shape)}; the checkpoint and its config.json disagree")
    t = t.to(like.dtype) if t.is_floating_point() and like.is_floating_point() else t
    return nn.Parameter(t, requires_grad=like.requires_grad) if isinstance(like, nn.Parameter) else t


def _stored_as(tensors: ShardedTensors, key: str, like: torch.Tensor) -> bool:
    """Whether tensor ``key`` is stored with ``like``'s dtype and shape (then reading it would change nothing)."""
    _, _, dtype, shape, _ = tensors.stored(key)
    return _DTYPES.get(like.dtype) == dtype and list(like.shape) == list(shape)


def release(module: nn.Module) -> None:
    """Free ``module``'s tensors (they go to the meta device)."""
    module.to("meta")


def _return_freed_memory() -> None:
    """Hand the memory freed by a released block back to the system (glibc keeps freed blocks for reuse, which
    would count a block's worth of memory twice in the process's resident size)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def has_meta(module: nn.Module, recurse: bool = True) -> bool:
    """Whether any of ``module``'s tensors is on the meta device (not read yet, or freed)."""
    return any(t.is_meta for t in (*module.parameters(recurse), *module.buffers(recurse)))


def _own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors ``module`` itself holds that a state dict saves (not its children's, not its non-persistent
    buffers)."""
    own = {name: t for name, t in module._parameters.items() if t is not None}
    own.update({name: t for name, t in module._buffers.items()
                if t is not None and name not in module._non_persistent_buffers_set})
    return own


def _free_own(module: nn.Module, names: list[str]) -> None:
    """Put ``module``'s own tensors ``names`` back on the meta device (its children keep theirs)."""
    for table in (module._parameters, module._buffers):
        for name in names:
            t = table.get(name)
            if t is not None and not t.is_meta:
                meta = t.detach().to("meta")
                table[name] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta


_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


class ShardWriter:
    """Writes tensors to safetensors shards in a folder as they come, then Hugging Face's index of them (one
    ``model.safetensors`` when they fit one shard).

    Each tensor's bytes go to disk when it is added (to the open shard's data file); a shard is assembled (its
    header, then its data copied over in chunks) once it holds ``shard_bytes``, so memory never holds more than the
    tensor being written, whatever the shard size."""

    def __init__(self, folder: Path, shard_bytes: int = SHARD_BYTES):
        self.folder = folder
        self.shard_bytes = shard_bytes
        self._header: dict[str, dict] = {}
        self._data: BinaryIO | None = None
        self._offset = 0
        self._shards: list[tuple[Path, list[str]]] = []

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write ``tensors`` (a module's state dict with qualified names); of tensors that are one (tied weights),
        the first name is stored."""
        seen = set()
        for name, t in tensors.items():
            key = (t.data_ptr(), tuple(t.shape), t.dtype)
            if t.is_meta or key in seen:
                continue
            seen.add(key)
            size = t.numel() * t.element_size()
            if self._offset and self._offset + size > self.shard_bytes:
                self._flush()  # what waits, first: a large tensor is then held alone
            if self._data is None:
                self._data = self._data_path(len(self._shards)).open("wb")
            self._data.write(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
            self._header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                                  "data_offsets": [self._offset, self._offset + size]}
            self._offset += size
            if self._offset >= self.shard_bytes:
                self._flush()

    def add_stored(self, name: str, tensors: ShardedTensors, key: str) -> None:
        """Copy tensor ``key`` of ``tensors`` under ``name`` as it is stored, file to file in chunks (never whole in
        memory: a large vocabulary's head is gigabytes)."""
        path, start, dtype, shape, size = tensors.stored(key)
        if self._offset and self._offset + size > self.shard_bytes:
            self._flush()
        if self._data is None:
            self._data = self._data_path(len(self._shards)).open("wb")
        with path.open("rb") as src:
            src.seek(start)
            left = size
            while left:
                chunk = src.read(min(left, 2**24))
                if not chunk:
                    raise CheckpointError(f"{path} ends inside tensor {key}: the file is truncated")
                self._data.write(chunk)
                left -= len(chunk)
        self._header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [self._offset, self._offset + size]}
        self._offset += size
        if self._offset >= self.shard_bytes:
            self._flush()

    def _data_path(self, index: int) -> Path:
        return self.folder / f".shard-{index:05d}.data"

    def _flush(self) -> None:
        """Assemble the open shard: its safetensors header, then its data (8-byte aligned, as safetensors writes)."""
        if self._data is None:
            return
        self._data.close()
        index = len(self._shards)
        path, data = self.folder / f".shard-{index:05d}.safetensors", self._data_path(index)
        text = json.dumps({"__metadata__": {"format": "pt"}, **self._header}, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with path.open("wb") as out, data.open("rb") as src:
            out.write(len(text).to_bytes(8, "little"))
            out.write(text)
            shutil.copyfileobj(src, out, 2**24)
        data.unlink()
        self._shards.append((path, list(self._header)))
        self._header, self._data, self._offset = {}, None, 0

    def close(self) -> None:
        """Write what is queued and name the shards as ``from_pretrained`` expects."""
        self._flush()
        if len(self._shards) == 1:
            self._shards[0][0].rename(self.folder / SAFETENSORS_FILE)
            return
        count = len(self._shards)
        weight_map, total = {}, 0
        for i, (path, names) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
            total += (self.folder / final).stat().st_size
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


class BlockStream:
    """The engine's hooks when the model streams: read a decoder block's tensors before it is compressed, write
    them (compressed) and free them after; read a module outside the blocks (the embeddings while the stage's
    inputs are captured, a layer a data-free step compresses) when it is needed."""

    def __init__(self, tensors: ShardedTensors, writer: ShardWriter | None, original: ShardedTensors | None = None,
                 on_load: Callable[[str], None] | None = None):
        self.tensors = tensors
        self.writer = writer
        self.original = original or tensors  # where the modules outside the blocks are read from
        self.on_load = on_load

    def load(self, name: str, block: nn.Module) -> None:
        materialize(block, f"{name}.", self.tensors)
        if self.on_load is not None:
            self.on_load(name)

    def load_outside(self, name: str, module: nn.Module) -> None:
        """Read the module ``name`` outside the decoder blocks from the model's own checkpoint."""
        materialize(module, f"{name}.", self.original)
        if self.on_load is not None:
            self.on_load(name)

    def store(self, name: str, block: nn.Module) -> None:
        if self.writer is not None:
            self.writer.add({f"{name}.{k}": v for k, v in block.state_dict().items()})
        release(block)
        _return_freed_memory()


def empty_model(ref: str, dtype: str = "auto", trust_remote_code: bool = False) -> tuple[nn.Module, ShardedTensors]:
    """The model of directory ``ref`` on the meta device, in ``dtype`` (a name; auto: the config's, as
    :func:`compress.model.load_model` loads it), and the checkpoint's tensors. Only tied tensors (embeddings that
    are also the head) are read now: the decoder blocks and the other modules are read when the engine needs them,
    which keeps a large vocabulary's embeddings and head out of memory while the blocks are compressed."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from compress.model import config_dtype, find_blocks, load_config

    config = load_config(ref, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=config_dtype(config, dtype),
                                                 trust_remote_code=trust_remote_code)
    tensors = ShardedTensors(ref)
    blocks = find_blocks(model)
    model.tie_weights()  # tied tensors become one parameter, read below
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for tied in (group for group in names.values() if len(group) > 1):
        for name in tied:
            module_name, _, _ = name.rpartition(".")
            materialize(model.get_submodule(module_name), f"{module_name}." if module_name else "", tensors,
                        recurse=False)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters()
               if not n.startswith(blocks.prefix + ".") and p.is_meta and n not in tensors]
    if missing:
        raise CheckpointError(f"{ref}: the checkpoint holds no tensor for {', '.join(missing[:5])}; it does not "
                              "match its config.json")
    return model.eval(), tensors


class ModelStream:
    """A streamed run of a recipe's stages: the first stage reads the blocks from the model's checkpoint, a later
    one from the stage before's output in ``scratch``; the last stage writes to ``output``, after the blocks the
    modules outside them, one at a time (those still on the meta device read from the checkpoint, written and freed
    again)."""

    def __init__(self, source: ShardedTensors, output: Path, scratch: Path, stages: int):
        self.source = source
        self.original = source
        self.output = output
        self.scratch = scratch
        self.stages = stages
        self.on_load: Callable[[str], None] | None = None  # called with a block's name once it is read
        self._writer: ShardWriter | None = None

    def stage(self, index: int) -> BlockStream:
        """The hooks for stage ``index``'s walk over the blocks."""
        folder = self.output if index == self.stages - 1 else self.scratch / f"stage-{index}"
        folder.mkdir(parents=True, exist_ok=True)
        self._writer = ShardWriter(folder)
        return BlockStream(self.source, self._writer, self.original, self.on_load)

    def survey(self) -> BlockStream:
        """The hooks for a walk over the blocks that changes nothing (a method's survey before its stage): each
        block is read as the coming stage will read it, and freed after, nothing written."""
        return BlockStream(self.source, None, self.original, self.on_load)

    def end_stage(self, index: int, model: nn.Module) -> None:
        """Close stage ``index``'s output (the last stage's with the rest of ``model``); the next stage reads it."""
        if index == self.stages - 1:
            self._write_outside(model)
        self._writer.close()
        if index < self.stages - 1:
            self.source = ShardedTensors(self.scratch / f"stage-{index}")

    def _write_outside(self, model: nn.Module) -> None:
        """Add the tensors outside the decoder blocks (freed by now) to the output: those in memory (tied, or
        compressed by a step) together, then each module's tensors still on the meta device read from the model's
        checkpoint, added and freed, one module at a time."""
        from compress.model import find_blocks

        skip = find_blocks(model).prefix + "."
        outside = [(f"{name}." if name else "", module) for name, module in model.named_modules()
                   if not f"{name}.".startswith(skip) and _own_tensors(module)]
        self._writer.add({prefix + key: t for prefix, module in outside for key, t in _own_tensors(module).items()})
        for prefix, module in outside:
            unread = [key for key, t in _own_tensors(module).items() if t.is_meta]
            # stored as the model holds them: copied file to file; in another dtype: read, cast, written, freed
            raw = [key for key in unread if prefix + key in self.original
                   and _stored_as(self.original, prefix + key, _own_tensors(module)[key])]
            for key in raw:
                self._writer.add_stored(prefix + key, self.original, prefix + key)
            cast = [key for key in unread if key not in raw]
            if cast:
                materialize(module, prefix, self.original, recurse=False)
                own = _own_tensors(module)
                self._writer.add({prefix + key: own[key] for key in cast})
                _free_own(module, cast)
