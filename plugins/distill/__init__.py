"""Knowledge distillation: the model (the student) learns to give the teacher's next-token distribution.

The student is the model as the recipe's earlier stages left it (recovery after pruning or quantization: only what
``train`` names learns, codes stay frozen and masks are kept), or a smaller model made from it by keeping some of
its decoder blocks (``student``), the classic use. The teacher is the original model (the default), the model
before this stage, or another model with the same tokenizer.

The loss is a weighted sum of: KL(teacher || student) on the next-token distributions at ``temperature`` (times
T², as Hinton et al. scale it, so the gradients keep their size), the reverse KL(student || teacher) (mode seeking,
as MiniLLM argues for generative students), the cross-entropy on the data, and the mean squared error between the
student's and the teacher's hidden states after each block (normalised by the teacher's mean square; a student's
block i is compared with the teacher block it was made from). The training loop is :func:`compress.trainer.fit`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from compress.errors import Problem
from compress.losses import chunked_cross_entropy, chunked_sum, last_hidden, may_chunk
from compress.methods import Method, MethodConfig, Needs
from compress.model import drop_blocks, find_blocks, is_local_reference, load_config, load_tokenizer
from compress.states import LayerKind
from compress.train import TrainContext
from compress.trainer import fit

log = logging.getLogger(__name__)


class StudentSpec(MethodConfig):
    keep_blocks: list[int] | None = Field(None, min_length=1, description="indices of the decoder blocks to keep")
    depth: int | None = Field(None, ge=1, description="keep this many blocks, evenly spaced, the first and last "
                                                      "among them")

    @model_validator(mode="after")
    def _one(self) -> StudentSpec:
        if (self.keep_blocks is None) == (self.depth is None):
            raise ValueError("give keep_blocks or depth, one of them")
        if self.keep_blocks is not None and sorted(set(self.keep_blocks)) != self.keep_blocks:
            raise ValueError(f"keep_blocks {self.keep_blocks} must be increasing, without repeats")
        return self

    def kept(self, blocks: int) -> list[int]:
        if self.keep_blocks is not None:
            return list(self.keep_blocks)
        if self.depth == 1:
            return [0]
        return sorted({round(i * (blocks - 1) / (self.depth - 1)) for i in range(self.depth)})


class DistillConfig(MethodConfig):
    teacher: str = Field("original", description="original (the model before the recipe's first stage), previous "
                         "(before this stage), or a model directory / Hub id with the same tokenizer")
    temperature: float = Field(1.0, gt=0, description="softens both distributions in the KL terms")
    kl: float = Field(1.0, ge=0, description="weight of KL(teacher || student)")
    reverse_kl: float = Field(0.0, ge=0, description="weight of KL(student || teacher)")
    ce: float = Field(0.0, ge=0, description="weight of the cross-entropy on the data")
    hidden: float = Field(0.0, ge=0, description="weight of the per-block hidden-state mean squared error")
    train: list[Literal["weights", "biases", "scales", "norms"]] = Field(
        default_factory=lambda: ["weights", "biases", "norms"], min_length=1,
        description="what learns: the targets' float weights (a pruned layer's kept ones), biases, quantization "
                    "scales (of targets stored in a format), and the model's norms")
    student: StudentSpec | None = Field(None, description="a smaller student: keep_blocks or depth")

    @model_validator(mode="after")
    def _some_loss(self) -> DistillConfig:
        if self.kl + self.reverse_kl + self.ce + self.hidden == 0:
            raise ValueError("every loss weight (kl, reverse_kl, ce, hidden) is 0: give one a weight")
        return self


class Distill(Method):
    name = "distill"
    Config = DistillConfig
    needs = Needs.TRAINING
    summary = "knowledge distillation from the original (or a named) model: recovery after compression, or a student"

    def consumes(self, config: DistillConfig) -> frozenset[LayerKind]:
        return frozenset(LayerKind)

    def teacher(self, config: DistillConfig) -> str | None:
        return config.teacher if config.kl or config.reverse_kl or config.hidden else None  # ce alone needs none

    def trains(self, config: DistillConfig) -> tuple[str, ...]:
        return tuple(config.train)

    def check_model(self, model: nn.Module, config: DistillConfig) -> list[Problem]:
        problems = []
        if config.student is not None:
            blocks = len(find_blocks(model).modules)
            kept = config.student.kept(blocks)
            if config.student.depth is not None and config.student.depth >= blocks:
                problems.append(Problem("student.depth", f"{config.student.depth} is not fewer than the model's "
                                        f"{blocks} blocks; give a smaller depth"))
            elif kept[0] < 0 or kept[-1] >= blocks:
                problems.append(Problem("student.keep_blocks", f"{kept} is out of range: the model has {blocks} "
                                        f"blocks, 0 to {blocks - 1}"))
            if config.teacher == "previous":
                problems.append(Problem("teacher", "previous is the model as this stage began, which the student is "
                                        "made from: use original, or name a model"))
        if config.teacher not in ("original", "previous"):
            problems += _teacher_problems(config.teacher, model)
        return problems

    def prepare(self, model: nn.Module, config: DistillConfig, layers: list[str], device: torch.device) -> None:
        if config.student is None:
            return
        blocks = len(find_blocks(model).modules)
        kept = config.student.kept(blocks)
        drop_blocks(model, kept)
        log.info("distill: student keeps blocks %s of %d", kept, blocks)

    def train(self, context: TrainContext, config: DistillConfig) -> None:
        teacher_blocks = None
        if config.student is not None and context.teacher is not None:
            teacher_blocks = config.student.kept(len(find_blocks(context.teacher).modules))
        loss_fn = distillation_loss(context.teacher, config, teacher_blocks)
        report = fit(context, loss_fn, label="distill")
        log.info("distill: %s", report.describe())


def _teacher_problems(teacher: str, model: nn.Module) -> list[Problem]:
    """A named teacher must exist and read text as the student does: the same vocabulary size, and, where both
    tokenizers can be read, the same vocabulary."""
    if is_local_reference(teacher) and not (path := Path(teacher).expanduser()).is_dir():
        return [Problem("teacher", f"model directory not found: {path}; give original, previous, a local model "
                        "directory or a Hub id")]
    try:
        theirs = load_config(teacher)
    except Exception as exc:  # noqa: BLE001 - UsageError with the reason, or a config transformers cannot read
        return [Problem("teacher", f"cannot read the teacher {teacher!r}: {exc}")]
    ours = getattr(model.config, "vocab_size", None)
    if getattr(theirs, "vocab_size", None) != ours:
        return [Problem("teacher", f"{teacher} has a vocabulary of {theirs.vocab_size} tokens, the student {ours}: "
                        "distillation needs the same tokenizer")]
    student_path = getattr(model.config, "_name_or_path", "") or ""
    if student_path:
        try:
            same = load_tokenizer(teacher).get_vocab() == load_tokenizer(student_path).get_vocab()
        except Exception:  # noqa: BLE001 - a model without tokenizer files: the vocabulary size was checked
            return []
        if not same:
            return [Problem("teacher", f"{teacher}'s tokenizer maps tokens to other ids than {student_path}'s: "
                            "distillation needs the same tokenizer")]
    return []


def distillation_loss(teacher: nn.Module | None, config: DistillConfig, teacher_blocks: list[int] | None = None):
    """``loss_fn(model, batch) -> (loss, parts)`` for :func:`compress.trainer.fit` (see the module doc). The
    divergences and the cross-entropy are computed from the last hidden states a chunk of tokens at a time
    (:mod:`compress.losses`), so neither model's full float32 logits exist at once; a model whose logits are not
    its head's output of those states is scored over its full logits."""
    needs_teacher = config.kl or config.reverse_kl or config.hidden
    if needs_teacher and teacher is None:
        raise ValueError("the distillation losses need a teacher")
    T = config.temperature
    weights = {"kl": config.kl, "reverse_kl": config.reverse_kl, "ce": config.ce, "hidden": config.hidden}

    def divergences(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """The per-token KL terms the config weighs, [tokens], at temperature T (times T²)."""
        student_logp = F.log_softmax(student_logits.float() / T, dim=-1)
        teacher_logp = F.log_softmax(teacher_logits.float() / T, dim=-1)
        terms = {}
        if config.kl:
            terms["kl"] = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1) * T * T
        if config.reverse_kl:
            terms["reverse_kl"] = (student_logp.exp() * (student_logp - teacher_logp)).sum(-1) * T * T
        return terms

    def chunked(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        if not may_chunk(model) or (needs_teacher and not may_chunk(teacher)):
            return None
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
        student = last_hidden(model, inputs, output_hidden_states=bool(config.hidden))
        if student is None:
            return None
        reference = None
        if needs_teacher:
            with torch.no_grad():
                reference = last_hidden(teacher, inputs, output_hidden_states=bool(config.hidden))
            if reference is None:
                return None
        hidden, head, out = student
        parts: dict[str, torch.Tensor] = {}
        if config.kl or config.reverse_kl:
            ref_hidden, ref_head, _ = reference
            mask = inputs["attention_mask"]
            seen = (mask.reshape(-1) != 0) if mask is not None else slice(None)
            rows = hidden.reshape(-1, hidden.shape[-1])[seen]
            ref_rows = ref_hidden.reshape(-1, ref_hidden.shape[-1])[seen]

            def summed(h: torch.Tensor, ref_h: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    teacher_logits = ref_head(ref_h)
                return torch.stack([t.sum() for t in divergences(head(h), teacher_logits).values()])

            names = [k for k in ("kl", "reverse_kl") if weights[k]]
            if rows.shape[0] == 0:  # nothing seen: no divergence
                parts.update({k: hidden.sum() * 0.0 for k in names})
            else:
                sums = chunked_sum(summed, rows, ref_rows, width=head.weight.shape[0]) / rows.shape[0]
                parts.update(zip(names, sums.unbind()))
        if config.hidden:
            parts["hidden"] = _hidden_mse(out.hidden_states, reference[2].hidden_states, teacher_blocks)
        if config.ce:
            parts["ce"] = chunked_cross_entropy(head, hidden[:, :-1], batch["labels"][:, 1:])
        return parts

    def full(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hidden = bool(config.hidden)
        mask = batch.get("attention_mask")  # padded examples: the padding is neither seen nor scored
        out = model(input_ids=batch["input_ids"], attention_mask=mask, labels=batch["labels"] if config.ce else None,
                    output_hidden_states=hidden, use_cache=False)
        parts: dict[str, torch.Tensor] = {}
        if needs_teacher:
            with torch.no_grad():
                ref = teacher(input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=hidden,
                              use_cache=False)
            parts.update({k: _token_mean(v, mask) for k, v in divergences(out.logits, ref.logits).items()})
            if hidden:
                parts["hidden"] = _hidden_mse(out.hidden_states, ref.hidden_states, teacher_blocks)
        if config.ce:
            parts["ce"] = out.loss
        return parts

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        parts = chunked(model, batch)
        if parts is None:
            parts = full(model, batch)
        loss = sum(weights[k] * v for k, v in parts.items())
        return loss, {k: float(v.detach()) for k, v in parts.items()}

    return loss_fn


def _token_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of per-token ``values`` [batch, seq] over the tokens ``mask`` keeps (all when None)."""
    if mask is None:
        return values.mean()
    return (values * mask).sum() / mask.sum().clamp_min(1)


def _hidden_mse(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                teacher_blocks: list[int] | None) -> torch.Tensor:
    """Mean over the student's blocks of ||h_s - h_t||² / ||h_t||² (block outputs; index 0 is the embeddings)."""
    pairs = [(student[i + 1], teacher[(teacher_blocks[i] if teacher_blocks else i) + 1])
             for i in range(len(student) - 1)]
    return torch.stack([(s.float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp_min(1e-12)
                        for s, t in pairs]).mean()
