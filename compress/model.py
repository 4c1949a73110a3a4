"""Loading models and reading their structure (decoder blocks), for any transformers causal LM.

Per-architecture facts are derived from the module tree, never from a list of supported models.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from compress.distributed import process_device
from compress.errors import UsageError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def is_local_reference(ref: str) -> bool:
    """True when ``ref`` names a path rather than a Hub id (``org/name``)."""
    return ref.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(ref))


def config_dtype(config, name: str = "auto") -> torch.dtype:
    """The dtype a model of ``config`` is loaded in: ``name``, or with ``auto`` the one its config states."""
    return resolve_dtype(name, getattr(config, "dtype", None) or getattr(config, "torch_dtype", None))


def resolve_dtype(name: str, config_dtype: object = None) -> torch.dtype:
    """``auto`` takes the checkpoint's dtype (float32 when it states none)."""
    if name == "auto":
        if isinstance(config_dtype, torch.dtype):
            return config_dtype
        if isinstance(config_dtype, str) and config_dtype in DTYPES:
            return DTYPES[config_dtype]
        return torch.float32
    return DTYPES[name]


DEVICE_FORMS = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def check_device(name: object) -> str | None:
    """A problem with a device name (one of auto, cpu, cuda, cuda:N), found without touching any device; else
    None. Whether this machine has the device is :func:`resolve_device`'s question."""
    if isinstance(name, str) and _DEVICE.fullmatch(name):
        return None
    return (f"unknown device {name!r}; use {DEVICE_FORMS} (cuda:N: the GPU of index N; auto: the first CUDA GPU "
            "when there is one, else the CPU)")


def resolve_device(name: str) -> str:
    """``auto``: the first CUDA GPU when there is one, else the CPU; under a launcher of several processes, ``cuda``
    is each process's own GPU (:func:`compress.distributed.process_device`). UsageError for a name that is not a device
    (see :func:`check_device`) and for a CUDA device this machine does not have."""
    problem = check_device(name)
    if problem:
        raise UsageError(problem)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    name = process_device(name)  # several processes: each its own GPU
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} was asked for, but this machine has no CUDA GPU; use --device cpu")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise UsageError(f"device {name!r} was asked for, but this machine has {count} CUDA GPU{'s' if count != 1 else ''}"
                         f" (cuda:0 to cuda:{count - 1}); use one of those")
    return name


def _check_reference(ref: str) -> None:
    if is_local_reference(ref):
        path = Path(ref).expanduser()
        if not path.exists():
            raise UsageError(f"model path not found: {path}; give a local model directory or a Hub id such as org/name")
        if not (path / "config.json").is_file():
            raise UsageError(f"model directory {path} has no config.json; it does not look like a Hugging Face model")


def config_context(config) -> int | None:
    """The context length a transformers config states (None when it states none)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_config(ref: str, revision: str | None = None, trust_remote_code: bool = False):
    """The model's transformers config, with a clear error for missing paths and unreachable Hub ids."""
    from transformers import AutoConfig

    _check_reference(ref)
    try:
        return AutoConfig.from_pretrained(ref, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"could not read the config of model {ref!r}: {exc}. If this is a Hub id, this machine may be "
            "offline: download the model first and pass its local directory"
        ) from exc


def load_model(ref: str, dtype: str = "auto", init: str = "pretrained", revision: str | None = None,
               trust_remote_code: bool = False, seed: int = 0) -> nn.Module:
    """A causal LM on the CPU. ``init="random"`` builds random weights from the config alone (demos,
    speed benchmarks), which the logs say plainly."""
    from transformers import AutoModelForCausalLM

    config = load_config(ref, revision, trust_remote_code)
    torch_dtype = config_dtype(config, dtype)
    if init == "random":
        log.warning("model %s: building RANDOM weights from its config (init: random); outputs are meaningless", ref)
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    try:
        return AutoModelForCausalLM.from_pretrained(
            ref, dtype=torch_dtype, revision=revision, trust_remote_code=trust_remote_code
        )
    except OSError as exc:
        raise UsageError(
            f"could not load the weights of model {ref!r}: {exc}. For a directory with only a config, set "
            "`init: random` under model: to build random weights"
        ) from exc


def meta_model(ref: str, revision: str | None = None, trust_remote_code: bool = False) -> nn.Module:
    """The model's module tree with real shapes and no data (for checking recipes before loading); a compress
    checkpoint's stored layers are its formats' layers, as loading makes them."""
    from transformers import AutoModelForCausalLM

    from compress.checkpoint_files import QUANT_METHOD
    from compress.formats.registry import build_empty_layers

    config = load_config(ref, revision, trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    stored = getattr(config, "quantization_config", None)
    stored = stored if isinstance(stored, dict) else getattr(stored, "to_dict", dict)()
    if stored.get("quant_method") == QUANT_METHOD and stored.get("layers"):
        build_empty_layers(model, stored["layers"])
    return model


def load_tokenizer(ref: str, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ref, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"could not load a tokenizer for {ref!r}: {exc}") from exc


@dataclass(frozen=True)
class Blocks:
    """The decoder blocks of a model: the ModuleList's qualified name and its children."""

    prefix: str
    modules: list[nn.Module]

    def names(self) -> list[str]:
        return [f"{self.prefix}.{i}" for i in range(len(self.modules))]


def find_blocks(model: nn.Module) -> Blocks:
    """The decoder blocks: the ModuleList whose children are the model's ``_no_split_modules`` classes
    (the unit transformers never splits across devices); failing that, the largest ModuleList of
    identical children."""
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    best: tuple[int, str, nn.ModuleList] | None = None
    fallback: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child).__name__ for child in module}
        if len(kinds) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if kinds <= no_split and (best is None or size > best[0]):
            best = (size, name, module)
        if fallback is None or size > fallback[0]:
            fallback = (size, name, module)
    chosen = best or fallback
    if chosen is None:
        raise UsageError(f"could not find the decoder blocks of {type(model).__name__}: it has no list of identical layers")
    return Blocks(chosen[1], list(chosen[2]))


def drop_blocks(model: nn.Module, keep: list[int]) -> None:
    """Keep only the decoder blocks ``keep`` (indices, in order) of ``model``, in place: the blocks are renumbered
    (each attention's ``layer_idx``, which the KV cache goes by) and the config's layer count and per-layer lists
    follow, so the smaller model runs, saves and loads as a model of its own."""
    blocks = find_blocks(model)
    parent_name, _, attr = blocks.prefix.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, attr, nn.ModuleList([blocks.modules[i] for i in keep]))
    for index, block in enumerate(getattr(parent, attr)):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index
    config = model.config
    config.num_hidden_layers = len(keep)
    if isinstance(getattr(config, "layer_types", None), list) and len(config.layer_types) == len(blocks.modules):
        config.layer_types = [config.layer_types[i] for i in keep]


def config_dict(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc
