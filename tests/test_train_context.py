"""The contract of training methods (TrainContext): a training step gets the whole model with only its targets'
parameters trainable, the teacher when it asks (the model before the stage, frozen), the data with labels, and
a checkpoint folder; afterwards every parameter has its flags back. A later stage compresses the trained model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import Field

import compress
from compress import Method, MethodConfig, Needs, TrainContext
from compress.formats.integer import IntLinear
from compress.registry import registry
from conftest import make_tiny


class TuneConfig(MethodConfig):
    steps: int = Field(8, ge=1)
    distil: bool = False


class Tune(Method):
    """A few steps of SGD on the cross-entropy of the data (or on the KL to the teacher with ``distil``)."""

    name = "test-tune"
    Config = TuneConfig
    needs = Needs.TRAINING
    seen: dict = {}

    def teacher(self, config):
        return "previous" if config.distil else None

    def train(self, context: TrainContext, config):
        params = context.trainable_parameters()
        assert all(p.requires_grad for p in params.values())
        assert not any(p.requires_grad for n, p in context.model.named_parameters() if n not in params)
        optimizer = torch.optim.SGD(list(params.values()), lr=0.5)
        losses = []
        context.model.train()
        for _ in range(config.steps):
            for batch in context.batches(4):
                out = context.model(**batch)
                loss = out.loss
                if config.distil:
                    with torch.no_grad():
                        target = context.teacher(batch["input_ids"]).logits.log_softmax(-1)
                    loss = F.kl_div(out.logits.log_softmax(-1), target, log_target=True, reduction="batchmean")
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        Tune.seen = {"losses": losses, "trainable": list(params), "teacher": context.teacher,
                     "checkpoint_dir": context.checkpoint_dir, "labels": batch["labels"].equal(batch["input_ids"])}


@pytest.fixture(autouse=True)
def tune():
    registry.register(Tune)
    yield Tune
    registry.unregister(Tune.name)


def _data() -> torch.Tensor:
    return torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))


def test_only_the_targets_train_and_flags_come_back() -> None:
    model = make_tiny("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    compress.apply(model, [{"method": "test-tune", "targets": ["*.mlp.down_proj"]}], calib=_data(), device="cpu")
    seen = Tune.seen
    assert seen["trainable"] == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    assert seen["losses"][-1] < seen["losses"][0]
    assert seen["teacher"] is None and seen["checkpoint_dir"] is None and seen["labels"]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(seen["trainable"])
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_the_teacher_is_the_model_before_the_stage_and_a_later_stage_compresses(tmp_path: Path) -> None:
    model = make_tiny("llama")
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    recipe = {"stages": [{"steps": [{"method": "rtn", "args": {"bits": 4, "group_size": 64}, "targets": ["*.self_attn.*"]}]},
                         {"steps": [{"method": "test-tune", "args": {"distil": True, "steps": 4}, "targets": ["*.mlp.*"]}]},
                         {"steps": [{"method": "rtn", "args": {"bits": 4, "group_size": 64}, "targets": ["*.mlp.*"]}]}]}
    compress.apply(model, recipe, calib=_data(), device="cpu")
    teacher = Tune.seen["teacher"]
    assert teacher is not None and not any(p.requires_grad for p in teacher.parameters())
    assert isinstance(teacher.model.layers[0].self_attn.q_proj, IntLinear)  # what the stage began from
    assert torch.equal(teacher.model.layers[0].mlp.up_proj.weight, original["model.layers.0.mlp.up_proj.weight"])
    assert Tune.seen["losses"][-1] < Tune.seen["losses"][0]
    assert sum(isinstance(m, IntLinear) for m in model.modules()) == 14


def test_a_training_step_must_be_alone_in_its_stage() -> None:
    with pytest.raises(compress.RecipeError, match=r"steps\[1\]: method 'test-tune' trains the whole model and must "
                                                   r"be the only step of its stage"):
        compress.apply(make_tiny("llama"), [{"method": "rtn"}, {"method": "test-tune"}], calib=_data(), device="cpu")


def test_relative_rates_move_every_tensor_by_the_same_fraction() -> None:
    """With lr_relative, one AdamW step (about lr in absolute terms) changes a tensor of scales near 0.03 and one of
    norms near 1 by about the same fraction; a tensor of zeros trains at lr."""
    from compress.recipe import TrainingSpec
    from compress.trainer import _optimizer

    scales = torch.nn.Parameter(torch.full((64,), 0.03))
    norms = torch.nn.Parameter(torch.ones(64))
    zeros = torch.nn.Parameter(torch.zeros(64))
    opt = _optimizer("adamw", [scales, norms, zeros], TrainingSpec(lr=1e-2, lr_relative=True), torch.device("cpu"), "t")
    for p in (scales, norms, zeros):
        p.grad = torch.ones_like(p)
    opt.step()
    assert torch.allclose(1 - scales.detach() / 0.03, torch.full((64,), 1e-2), rtol=1e-3)
    assert torch.allclose(1 - norms.detach(), torch.full((64,), 1e-2), rtol=1e-3)
    assert torch.allclose(zeros.detach(), torch.full((64,), -1e-2), rtol=1e-3)
