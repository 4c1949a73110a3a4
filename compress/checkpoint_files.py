"""A checkpoint's files on disk, read and checked without loading a model: ``config.json`` and its compress
``quantization_config``, a sharded checkpoint's index (tensor name -> shard file), and each safetensors file's header
against the file's length, so a truncated or damaged checkpoint is named with what to do instead of failing deep
inside safetensors or transformers.

Both :mod:`compress.checkpoint` (saving, loading) and :mod:`compress.streaming` (reading a checkpoint tensor by
tensor) read checkpoints through this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compress.errors import CheckpointError

QUANT_METHOD = "compress"  # a compress checkpoint's quantization_config.quant_method
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # safetensors refuses a longer header
REMEDY = "re-create the checkpoint (compress apply with --overwrite) or copy / download it again"


def read_quantization_config(path: str | Path) -> dict[str, Any] | None:
    """The compress ``quantization_config`` of a model directory, None for an uncompressed model."""
    qc = any_quantization_config(path)
    if qc is None or qc.get("quant_method") != QUANT_METHOD:
        return None
    if not isinstance(qc.get("layers"), dict):
        raise CheckpointError(f"{Path(path) / 'config.json'}: quantization_config has no 'layers' table; the "
                              "checkpoint is broken")
    return qc


def any_quantization_config(path: str | Path) -> dict[str, Any] | None:
    """The ``quantization_config`` of a model directory whatever wrote it (compress, GPTQ, ...), None when it has
    none; CheckpointError when config.json is missing or broken."""
    config_file = Path(path) / "config.json"
    try:
        config = _read_json(config_file)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} is not a model directory: it has no config.json") from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_file} is broken: {_why(exc)}; {REMEDY}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} is broken: it holds a JSON {_json_kind(config)}, not an object; {REMEDY}")
    qc = config.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise CheckpointError(f"{config_file} is broken: its quantization_config is a {_json_kind(qc)}, not an "
                              f"object; {REMEDY}")
    return qc


def _read_json(file: Path) -> Any:
    """The JSON in ``file``; UnicodeDecodeError or JSONDecodeError (both ValueError) for damaged text."""
    return json.loads(file.read_bytes().decode("utf-8"))


def _why(exc: Exception) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"it is not UTF-8 text ({exc})"
    if isinstance(exc, json.JSONDecodeError):
        return f"it is not valid JSON ({exc})"
    return str(exc)


def _json_kind(value: Any) -> str:
    kinds = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def check_weight_files(path: str | Path) -> None:
    """CheckpointError naming the file when the safetensors weights transformers would read from ``path`` are
    damaged: ``model.safetensors``, else the shards ``model.safetensors.index.json`` lists (a folder with neither
    is left to transformers). Reads only the headers."""
    path = Path(path)
    single, index = path / SAFETENSORS_FILE, path / SAFETENSORS_INDEX
    if single.is_file():  # transformers' own order: the single file first
        _check_safetensors(single)
    elif index.is_file():
        for shard in _shards(index):
            _check_safetensors(path / shard)


def _shards(index: Path) -> list[str]:
    """The shard files a sharded checkpoint's index names, each checked to be in the folder."""
    return sorted(set(weight_map(index).values()))


def weight_map(index: Path) -> dict[str, str]:
    """A sharded checkpoint's index: tensor name -> shard file, every shard checked to be in the folder."""
    def broken(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint file {index} is broken: {what}; {REMEDY}")

    try:
        content = _read_json(index)
    except (OSError, ValueError) as exc:
        raise broken(_why(exc)) from exc
    table = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(table, dict) or not all(isinstance(f, str) for f in table.values()):
        raise broken("it has no weight_map table (tensor name -> shard file)")
    missing = sorted({shard for shard in table.values() if not (index.parent / shard).is_file()})
    if missing:
        raise broken(f"it names shards that are not in the folder: {', '.join(missing)}")
    return table


def _check_safetensors(file: Path) -> None:
    """The 8-byte header length, the JSON header, and a file exactly as long as the header says."""
    def damaged(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint file {file} is damaged: {what}; {REMEDY}")

    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise damaged(f"it is {size} bytes long, too short for the 8-byte header length of a safetensors file")
            length = int.from_bytes(head, "little")
            if length > size - 8 or length > MAX_HEADER_BYTES:
                raise damaged(f"its header length field says {length} bytes but only {size - 8} bytes follow "
                              "(truncated, or not a safetensors file)")
            raw = f.read(length)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint file {file}: {exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except ValueError as exc:
        raise damaged(f"its header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise damaged("its header is not a JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise damaged(f"its header gives tensor {name!r} no valid data_offsets (two byte offsets, start <= end)")
        end = max(end, offsets[1])
    expected = 8 + length + end
    if size < expected:
        raise damaged(f"it is {size} bytes long but its header describes {expected} bytes (truncated: an "
                      "interrupted copy or download?)")
    if size > expected:
        raise damaged(f"it is {size} bytes long but its header describes only {expected} bytes (bytes added after "
                      "the tensor data)")


def check_files(path: str | Path) -> None:
    """CheckpointError naming the file and what to do when ``config.json`` or the safetensors weights of the model
    directory ``path`` are damaged; cheap (reads the config and the weights' headers)."""
    read_quantization_config(path)
    check_weight_files(path)
