"""QLoRA: LoRA adapters trained on a frozen 4-bit model (Dettmers et al., 2023), through peft and bitsandbytes.

The base is bitsandbytes NF4 with double quantization and a bf16 compute dtype (``base: nf4``, the paper's
setting; ``fp4`` too), made from the targets' float weights, or the targets as they are (``base: keep``): a
compress checkpoint's 4- or 3-bit layers (GPTQ, AWQ, RTN), frozen with their codes, or float layers (plain
LoRA). peft's LoRA layers go on the targets (rank ``r``, scale ``alpha / r``, dropout on their input); only
they train (and the targets' biases with ``bias: lora_only``), on the data's cross-entropy (instruction data:
on the responses only), with bitsandbytes' paged 8-bit AdamW on CUDA. ``init: loftq`` starts the pair from what
4-bit rounding lost (LoftQ), or, on a layer that carries a low-rank correction (``lowrank-correct``), from that
correction.

Afterwards (``save``): ``merged``, each target becomes a float layer of base + update (the base dequantized
first; a later quantization step of the recipe may round it again), or ``beside``, a compress stored base keeps
its codes and the pair runs beside it (the ``corrected`` format). Rounding the merged weight back to NF4 would
lose most of what was learnt, so it is not offered. Where the base is a model on disk (the recipe's first stage,
default init), the adapter alone is also written in peft's format to the checkpoint's ``adapter/`` folder.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field, field_validator, model_validator

from compress.errors import Problem, UsageError
from compress.losses import causal_lm_loss
from compress.lora import AdapterSpec, add_adapters, adapter_files, finish, loftq, to_nf4
from compress.methods import Method, MethodConfig, Needs
from compress.model import DTYPES
from compress.states import LayerKind
from compress.train import TrainContext
from compress.trainer import fit

log = logging.getLogger(__name__)


class QLoraConfig(MethodConfig):
    base: Literal["nf4", "fp4", "keep"] = Field("nf4", description="nf4 / fp4: the targets rounded to bitsandbytes "
                                                "4-bit; keep: the targets as they are (a compress checkpoint's "
                                                "stored layers, or float layers for plain LoRA)")
    double_quant: bool = Field(True, description="nf4/fp4: round the blocks' scales to 8 bits too")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="nf4/fp4: the dtype "
                                                                     "the 4-bit layers compute in")
    r: int = Field(16, ge=1, description="the adapters' rank")
    alpha: float = Field(32.0, gt=0, description="the update is scaled by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapters' input while training")
    bias: Literal["none", "lora_only"] = Field("none", description="lora_only: the targets' biases train too")
    init: Literal["default", "loftq"] = Field("default", description="default: lora_B zero (the model starts as "
                                              "the base); loftq: from the base's rounding error, or a layer's "
                                              "low-rank correction")
    loftq_iterations: int = Field(1, ge=1, le=10, description="loftq on nf4/fp4: alternations of rounding and SVD")
    save: str = Field("merged", description="merged: float layers of base + update; beside: the pair beside a "
                      "compress stored base (the corrected format)")

    @field_validator("save")
    @classmethod
    def _save(cls, value: str) -> str:
        if value in ("nf4", "fp4", "merged_nf4", "merged-nf4"):
            raise ValueError(f"{value}: rounding base + update back to 4 bits loses most of what training learnt, so "
                             "it is not offered: save merged (float layers), then quantize in a later step of the "
                             "recipe (gptq, awq, rtn), or keep a compress base and save beside")
        if value not in ("merged", "beside"):
            raise ValueError(f"{value!r} is not one of merged, beside")
        return value

    @model_validator(mode="after")
    def _combination(self) -> QLoraConfig:
        if self.base != "keep" and self.save == "beside":
            raise ValueError(f"save beside keeps a compress stored base, and base {self.base} is bitsandbytes': save "
                             "merged, or quantize with a compress method first (e.g. gptq) and use base keep")
        return self


class QLora(Method):
    name = "qlora"
    Config = QLoraConfig
    needs = Needs.TRAINING
    summary = "LoRA adapters on a frozen 4-bit base (bitsandbytes NF4, or a compress checkpoint), then merged or kept"

    def consumes(self, config: QLoraConfig) -> frozenset[LayerKind]:
        if config.base != "keep":
            return frozenset({LayerKind.DENSE})
        return frozenset({LayerKind.FORMAT} if config.save == "beside" else {LayerKind.DENSE, LayerKind.FORMAT})

    def produces(self, config: QLoraConfig) -> LayerKind:
        return LayerKind.FORMAT if config.save == "beside" else LayerKind.DENSE

    def trains(self, config: QLoraConfig) -> tuple[str, ...]:
        return ("adapters", "biases") if config.bias == "lora_only" else ("adapters",)

    def check_model(self, model: nn.Module, config: QLoraConfig) -> list[Problem]:
        if config.base == "keep":
            return []
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            return [Problem("base", f"{config.base} needs bitsandbytes, which cannot be imported ({exc}): pip install "
                            "bitsandbytes, or use base keep on a compress checkpoint")]
        return []

    def prepare(self, model: nn.Module, config: QLoraConfig, layers: list[str], device: torch.device) -> None:
        """Round the targets to 4 bits on ``device``, one at a time (a model too large for the device in its own
        dtype fits in 4 bits), and put the adapters on them."""
        spec = AdapterSpec(config.r, config.alpha, config.dropout, config.bias)
        start: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if config.base != "keep":
            _check_bitsandbytes(config.base, device)
            for name in layers:
                module = model.get_submodule(name).to(device)
                if config.init == "loftq":
                    base, A, B = loftq(module, config.r, spec.scaling, config.loftq_iterations, config.base,
                                       config.double_quant, DTYPES[config.compute_dtype])
                    start[name] = (A, B)
                else:
                    base = to_nf4(module, config.base, config.double_quant, DTYPES[config.compute_dtype])
                model.set_submodule(name, base)
            log.info("qlora: %d layers rounded to %s%s", len(layers), config.base,
                     " with double quantization" if config.double_quant else "")
        elif config.init == "loftq":
            start = _from_corrections(model, layers, config.r, spec.scaling)
        add_adapters(model, layers, spec, start=start)
        log.info("qlora: rank-%d adapters on %d layers (%s)", config.r, len(layers),
                 "LoftQ start" if config.init == "loftq" else "lora_B zero")

    def train(self, context: TrainContext, config: QLoraConfig) -> None:
        model = context.model
        layers = sorted({name.split(".lora_")[0] for name in context.trainable if ".lora_" in name})
        peft_config = model.peft_config["default"]
        report = fit(context, causal_lm_loss, label="qlora", optimizer="paged_adamw_8bit")
        log.info("qlora: %s", report.describe())
        if config.init == "default" and context.source is not None:
            peft_config.base_model_name_or_path = context.source
            model.compress_adapter = adapter_files(model, peft_config)
        else:
            why = ("LoftQ changed the base's rounding" if config.init == "loftq" else
                   "the base is not a model on disk: the model was not loaded from one, or earlier stages changed it")
            log.info("qlora: the adapter alone is not written (%s); the checkpoint holds it %s", why, config.save)
        dtype = _float_dtype(model)
        finish(model, layers, config.save, dtype)
        log.info("qlora: adapters %s on %d layers", "merged" if config.save == "merged" else "kept beside", len(layers))


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's float weights outside the adapters (its embeddings')."""
    return model.get_input_embeddings().weight.dtype


def _check_bitsandbytes(quant_type: str, device: torch.device) -> None:
    """Refuse, with what to do, a device where bitsandbytes cannot round to 4 bits."""
    import bitsandbytes.functional as bnbf

    try:
        bnbf.quantize_4bit(torch.ones(64, 64, dtype=torch.bfloat16, device=device), quant_type=quant_type)
    except Exception as exc:  # noqa: BLE001 - each bitsandbytes build fails its own way on a device it lacks
        raise UsageError(f"steps: qlora base {quant_type}: the installed bitsandbytes cannot run 4-bit layers on "
                         f"{device} ({type(exc).__name__}: {exc}); run on CUDA (model.device), install a "
                         "bitsandbytes with CPU support (0.49 or later), or use base keep on a compress "
                         "checkpoint") from exc


def _from_corrections(model: nn.Module, layers: list[str], rank: int, scaling: float
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """LoftQ on a compress base: a layer carrying a low-rank correction gives it to its adapters (and runs as its
    base); other layers cannot, since their float weights are gone."""
    from compress.formats.corrected import CorrectedLinear

    start = {}
    for name in layers:
        layer = model.get_submodule(name)
        if not isinstance(layer, CorrectedLinear):
            kind = type(layer).__name__
            raise UsageError(f"steps: qlora init loftq on base keep starts from a layer's low-rank correction, and "
                             f"{name} is a {kind} without one (its float weights are gone): add a lowrank-correct "
                             "step before it, use init default, or base nf4 on the float model")
        if layer.rank != rank:
            raise UsageError(f"steps: qlora init loftq starts {name}'s adapters from its rank-{layer.rank} correction: "
                             f"set r: {layer.rank}, or use init default")
        start[name] = (layer.A.float(), layer.B.float() / scaling)
        model.set_submodule(name, layer.base)
    return start

