"""LoRA adapters on the layers a recipe targets, through peft, and what peft lacks for compressed bases.

peft puts the adapters on (``inject_adapter_in_model`` with a ``LoraConfig``): on ``nn.Linear`` / ``Conv1D``
layers, on bitsandbytes ``Linear4bit`` layers (:func:`to_nf4` makes them from float ones, as transformers'
``BitsAndBytesConfig`` would on loading), and on compress's own stored layers (:class:`CompressedLoraLinear`,
registered with peft as a custom module: the stored layer runs as it is, frozen, and the pair is added to its
output). What this module adds:

- :func:`loftq`: the adapters start from the quantization error (LoftQ: alternate NF4 rounding of ``W - B A`` and
  a rank-r SVD of what rounding lost), so training starts closer to the float model;
- :func:`finish`: the adapters leave the model ``merged`` (each layer a float layer holding base + B A, the
  base dequantized first: bitsandbytes' own merge rounds the sum to NF4 again, which loses what was learnt) or
  ``beside`` a compress layer (the ``corrected`` format: base + x A^T B^T, the pair stored with the checkpoint);
- :func:`adapter_files` / :func:`write_adapter` / :func:`load_adapter`: the adapter alone in peft's format,
  which ``PeftModel.from_pretrained`` loads onto its base (for a compress base, with :func:`adapter_config`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

from compress.formats.base import CompressedLinear
from compress.linear import is_conv1d, get_bias, get_weight, linear_shape

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # beside a checkpoint's weights: the adapter alone, in peft's format
ADAPTER_NAME = "default"
_PEFT_PREFIX = "base_model.model."  # how PeftModel names the tensors it saves


@dataclass(frozen=True)
class AdapterSpec:
    """The adapters' shape: rank, alpha (the update is scaled by alpha / r), dropout on their input, and which
    biases train (peft's ``bias``: none, all, lora_only)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    bias: Literal["none", "all", "lora_only"] = "none"

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


@dataclass
class AdapterExport:
    """The adapter as peft saves it: its config (``adapter_config.json``) and tensors, kept on the model
    (``model.compress_adapter``) until the checkpoint is written."""

    config: dict
    tensors: dict[str, torch.Tensor]


@functools.cache
def _compressed_lora_class() -> type[nn.Module]:
    """The class, made once on first use (importing peft is slow, and only adapters need it)."""
    from peft.tuners.lora.gptq import GPTQLoraLinear

    class CompressedLoraLinear(GPTQLoraLinear):
        """LoRA on a compress stored layer: the layer's own forward (its kernels), frozen, plus the adapters' pair
        (peft's LoRA for quantized layers it cannot merge into)."""

    return CompressedLoraLinear


def lora_config(layers: list[str], spec: AdapterSpec):
    """peft's ``LoraConfig`` for ``layers`` (qualified names), with compress's stored layers registered."""
    from peft import LoraConfig

    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, bias=spec.bias,
                        target_modules=list(layers), fan_in_fan_out=False)
    config._register_custom_module({CompressedLinear: _compressed_lora_class()})
    return config


def adapter_config(folder: str | Path):
    """The ``LoraConfig`` saved in ``folder``, with compress's stored layers registered: pass it as
    ``PeftModel.from_pretrained(model, folder, config=adapter_config(folder))`` when the base is a compress
    checkpoint (:func:`load_adapter` does)."""
    from peft import LoraConfig

    config = LoraConfig.from_pretrained(str(folder))
    config._register_custom_module({CompressedLinear: _compressed_lora_class()})
    return config


def load_adapter(model: nn.Module, folder: str | Path):
    """``model`` (the adapter's base: a transformers model, NF4-loaded or not, or a compress checkpoint) with the
    adapter saved in ``folder`` on it, as a ``PeftModel``."""
    from peft import PeftModel

    with _quiet_peft():
        return PeftModel.from_pretrained(model, str(folder), config=adapter_config(folder))


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft reads a stored layer's in and out features, and warns that it does not know the layer's type."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
        yield


def to_nf4(module: nn.Module, quant_type: str = "nf4", double_quant: bool = True,
           compute_dtype: torch.dtype = torch.bfloat16, weight: torch.Tensor | None = None) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` holding ``module``'s weight (or ``weight``, [out, in]) rounded to 4 bits in
    blocks of 64 (``quant_type`` nf4 or fp4; ``double_quant`` rounds the blocks' scales to 8 bits too), on the
    module's device, computing in ``compute_dtype``. The bias stays as it is."""
    import bitsandbytes as bnb

    in_f, out_f = linear_shape(module)
    source = get_weight(module) if weight is None else weight
    bias = get_bias(module)
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type=quant_type, device="meta")
    layer.weight = bnb.nn.Params4bit(source.detach().contiguous(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=double_quant)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    layer.compress_conv1d = is_conv1d(module)  # a GPT-2 layer: merged back as a Conv1D
    # bitsandbytes repacks a CPU layer's weight for inference at its first forward in eval mode, and that layout
    # has no backward (gradients would stop at the layer) and no dequantize: these layers train, so never repack
    layer.support_avx512bf16_for_cpu = False
    return layer.to(source.device)


def nf4_weight(layer: nn.Module) -> torch.Tensor:
    """A ``Linear4bit`` layer's weight as it computes with it, dense [out, in]."""
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


@torch.no_grad()
def loftq(module: nn.Module, r: int, scaling: float, iterations: int = 1, quant_type: str = "nf4",
          double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16
          ) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """LoftQ: ``module``'s weight W as a 4-bit base Q and a pair (A [r, in], B [out, r]) with Q + scaling B A
    close to W: ``iterations`` times, Q = round(W - scaling B A) and scaling B A = the best rank-r fit of W - Q.
    Returns the ``Linear4bit`` base, lora_A and lora_B (float32)."""
    weight = get_weight(module).float()
    low = torch.zeros_like(weight)
    for _ in range(iterations):
        base = to_nf4(module, quant_type, double_quant, compute_dtype, (weight - low).to(get_weight(module).dtype))
        U, S, Vh = torch.linalg.svd(weight - nf4_weight(base).float(), full_matrices=False)
        root = S[:r].sqrt()
        A, B = root[:, None] * Vh[:r], U[:, :r] * root
        low = B @ A
    return base, A, B / scaling


def add_adapters(model: nn.Module, layers: list[str], spec: AdapterSpec,
                 start: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
    """peft's LoRA layers on ``layers`` of ``model`` (in place), lora_B zero (the model computes as before) unless
    ``start`` gives a layer's (lora_A, lora_B). Returns the ``LoraConfig``."""
    from peft import inject_adapter_in_model

    config = lora_config(layers, spec)
    four_bit = any(type(model.get_submodule(n)).__name__ == "Linear4bit" for n in layers)
    if four_bit:
        model.is_loaded_in_4bit = True  # what peft reads to put its 4-bit LoRA layers on Linear4bit
    try:
        with _quiet_peft():
            inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    finally:
        if four_bit:
            del model.is_loaded_in_4bit
    for name, (A, B) in (start or {}).items():
        layer = model.get_submodule(name)
        layer.lora_A[ADAPTER_NAME].weight.data.copy_(A)
        layer.lora_B[ADAPTER_NAME].weight.data.copy_(B)
    return config


def adapter_parameters(model: nn.Module, layers: list[str]) -> list[tuple[nn.Module, str, str]]:
    """(module, attribute, qualified name) of the adapters' tensors on ``layers``."""
    found = []
    for layer in layers:
        for name, module in model.get_submodule(layer).named_modules():
            if name.startswith(("lora_A.", "lora_B.")) and "weight" in module._parameters:
                found.append((module, "weight", f"{layer}.{name}.weight"))
    return found


def adapter_files(model: nn.Module, config) -> AdapterExport:
    """The adapter on ``model`` as peft saves it (keys without the adapter's name, under ``base_model.model.``)."""
    from peft import get_peft_model_state_dict

    tensors = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    saved = config.to_dict()
    saved.pop("_custom_modules", None)
    saved["target_modules"] = sorted(saved["target_modules"])
    return AdapterExport(saved, {_PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


def write_adapter(folder: Path, export: AdapterExport) -> None:
    """``export`` as ``folder/adapter_config.json`` and ``folder/adapter_model.safetensors``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(export.config, indent=2, sort_keys=True, default=str))
    save_file(export.tensors, str(folder / "adapter_model.safetensors"))


def _delta(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A LoRA layer's (A [r, in], scaling * B [out, r]) in float32."""
    A = layer.lora_A[ADAPTER_NAME].weight.detach().float()
    B = layer.lora_B[ADAPTER_NAME].weight.detach().float() * layer.scaling[ADAPTER_NAME]
    return A, B


def _float_layer(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, conv1d: bool) -> nn.Module:
    out_f, in_f = weight.shape
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(out_f, in_f)
        layer.weight = nn.Parameter(weight.t().to(dtype).contiguous(), requires_grad=False)
    else:
        layer = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=dtype)
        layer.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
    return layer.to(weight.device)


@torch.no_grad()
def finish(model: nn.Module, layers: list[str], keep: Literal["merged", "beside"], dtype: torch.dtype) -> None:
    """Take the adapters off ``layers`` (in place): ``merged``, each becomes a float layer (``dtype``) holding its
    base's weight (a 4-bit or stored base dequantized) plus scaling B A; ``beside``, a compress stored base keeps
    its codes and the pair goes beside it (the ``corrected`` format). Other LoRA state (``peft_config``) goes."""
    from compress.formats.corrected import CorrectedLinear

    for name in layers:
        layer = model.get_submodule(name)
        base = layer.get_base_layer()
        A, B = _delta(layer)
        if keep == "beside":
            new = CorrectedLinear.wrap(base, A.to(dtype), B.to(dtype), dtype)
        else:
            if isinstance(base, CompressedLinear):
                weight, conv1d = base.dequantized_weight(torch.float32), False
            elif type(base).__name__ == "Linear4bit":
                weight, conv1d = nf4_weight(base).float(), getattr(base, "compress_conv1d", False)
            else:
                weight, conv1d = get_weight(base).float(), is_conv1d(base)
            new = _float_layer(weight + B.to(weight.device) @ A.to(weight.device), get_bias(base), dtype, conv1d)
        model.set_submodule(name, new)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in model.__dict__:  # set on the instance by peft (transformers has class defaults)
            delattr(model, attr)

