"""Distillation on the shared trainer: it lowers the student's divergence from the teacher on every test
architecture; codes and masks come through training bit for bit; resuming gives the weights an uninterrupted
run gives; a NaN loss stops with the step and the last checkpoint; a smaller student runs, saves and loads; the
recipe checks name the field of each mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import compress
from compress.formats.integer import IntLinear
from compress.formats.sparse import Sparse24Linear
from compress.trainer import TrainingError, learning_rate_factor
from conftest import make_tiny

TRAINING = {"steps": 6, "batch_size": 4, "lr": 1e-3, "warmup": 0.0, "eval_samples": 4, "save_every": 2}


def _data(samples: int = 20, seq_len: int = 32) -> torch.Tensor:
    return torch.randint(0, 512, (samples, seq_len), generator=torch.Generator().manual_seed(1))


def _divergence(student, teacher, ids: torch.Tensor) -> float:
    """KL(teacher || student) per token on ``ids``."""
    with torch.no_grad():
        s = F.log_softmax(student(ids).logits.float(), -1)
        t = F.log_softmax(teacher(ids).logits.float(), -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def _recipe(distill_args: dict | None = None, first: list | None = None, **training) -> dict:
    first = first if first is not None else [{"method": "magnitude", "args": {"structure": "2:4"}}]
    return {"training": {**TRAINING, **training},
            "stages": [{"steps": first},
                       {"steps": [{"method": "distill", "args": distill_args or {}}]}]}


def test_distillation_lowers_the_divergence_from_the_teacher(arch: str) -> None:
    teacher = make_tiny(arch)
    pruned = make_tiny(arch)
    compress.apply(pruned, _recipe()["stages"][0]["steps"], device="cpu")
    distilled = make_tiny(arch)
    compress.apply(distilled, _recipe(), calib=_data(), device="cpu")
    seen = _data()
    before, after = _divergence(pruned, teacher, seen), _divergence(distilled, teacher, seen)
    assert after < 0.8 * before, (before, after)


def test_codes_stay_bit_exact_and_masks_are_kept() -> None:
    """Scales and norms train, the 4-bit codes of the attention and the 2:4 pattern of the MLP do not change."""
    first = [{"method": "magnitude", "args": {"structure": "2:4"}, "targets": ["*.mlp.*"]},
             {"method": "rtn", "args": {"bits": 4, "group_size": 64, "symmetric": False}, "targets": ["*.self_attn.*"]}]
    plain = compress.apply(make_tiny("llama"), first, device="cpu")
    tuned = compress.apply(make_tiny("llama"), _recipe({"train": ["weights", "scales", "norms"]}, first=first),
                           calib=_data(), device="cpu")
    plain_layers, tuned_layers = dict(plain.named_modules()), dict(tuned.named_modules())
    quantized = [n for n, m in tuned_layers.items() if isinstance(m, IntLinear)]
    sparse = [n for n, m in tuned_layers.items() if isinstance(m, Sparse24Linear)]
    assert len(quantized) == 8 and len(sparse) == 6
    for name in quantized:
        a, b = plain_layers[name], tuned_layers[name]
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.zeros, b.zeros)
        assert "scales" in dict(b.named_buffers()) and not any(True for _ in b.parameters())
    assert any(not torch.equal(plain_layers[n].scales, tuned_layers[n].scales) for n in quantized)
    for name in sparse:
        a, b = plain_layers[name], tuned_layers[name]
        assert torch.equal(a.meta, b.meta)  # the same kept positions
        assert not torch.equal(a.values, b.values)  # the kept weights learned
    assert not torch.equal(plain.model.norm.weight, tuned.model.norm.weight)


def test_resume_gives_the_weights_of_an_uninterrupted_run_and_a_nan_stops_with_the_checkpoint(
        tmp_path: Path, monkeypatch) -> None:
    recipe = _recipe()
    whole = compress.apply(make_tiny("llama"), recipe, calib=_data(), device="cpu", work_dir=tmp_path / "whole")

    import compress.plugins.distill as distill

    real = distill.distillation_loss

    def failing_at_step_5(*args, **kwargs):
        loss_fn, calls = real(*args, **kwargs), [0]

        def wrapped(model, batch):
            loss, parts = loss_fn(model, batch)
            calls[0] += model.training  # training calls only, not the held-out evaluation
            return (loss * float("nan"), parts) if calls[0] == 5 else (loss, parts)

        return wrapped

    monkeypatch.setattr(distill, "distillation_loss", failing_at_step_5)
    work = tmp_path / "cut"
    with pytest.raises(TrainingError, match=r"distill: the loss became nan at step 5 of 6 \(kl .*\); training stopped, "
                                            r"and the last good checkpoint is .*step-0000004\.pt \(kept\)"):
        compress.apply(make_tiny("llama"), recipe, calib=_data(), device="cpu", work_dir=work)
    assert sorted(p.name for p in (work / "stage-1").iterdir()) == ["step-0000002.pt", "step-0000004.pt"]
    monkeypatch.setattr(distill, "distillation_loss", real)
    resumed = compress.apply(make_tiny("llama"), recipe, calib=_data(), device="cpu", work_dir=work, resume=True)
    expected = dict(whole.state_dict())
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_a_smaller_student_drops_blocks_and_runs_saves_and_loads(tmp_path: Path) -> None:
    from compress.formats import storage_summary

    model = make_tiny("qwen2")
    teacher_params = sum(p.numel() for p in model.parameters())
    recipe = {"training": TRAINING, "steps": [{"method": "distill", "args": {"student": {"keep_blocks": [1]}}}]}
    compress.apply(model, recipe, calib=_data(), device="cpu")
    assert model.config.num_hidden_layers == 1 and len(model.model.layers) == 1
    student_params = sum(p.numel() for p in model.parameters())
    assert student_params < teacher_params
    assert storage_summary(model).startswith(f"no compressed layers; {student_params / 1e6:.2f} M parameters")
    assert model.model.layers[0].self_attn.layer_idx == 0
    ids = _data(1, 8)
    out = model.generate(ids, max_new_tokens=4, do_sample=False)  # the KV cache goes by layer_idx
    assert out.shape == (1, 12)
    model.save_pretrained(tmp_path / "student")
    loaded = compress.load(tmp_path / "student")
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_depth_keeps_evenly_spaced_blocks_with_the_first_and_last() -> None:
    from compress.plugins.distill import StudentSpec

    assert StudentSpec(depth=6).kept(8) == [0, 1, 3, 4, 6, 7]
    assert StudentSpec(depth=2).kept(8) == [0, 7]
    assert StudentSpec(keep_blocks=[0, 2]).kept(8) == [0, 2]


def test_the_schedule_warms_up_then_decays_to_min_lr() -> None:
    rates = [learning_rate_factor(s, 10, 0.2, 0.1) for s in range(10)]
    assert rates[:2] == [1 / 3, 2 / 3] and rates[2] == 1.0
    assert rates[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(rates[2:], rates[3:]))


@pytest.mark.parametrize("recipe, where, message", [
    ({"steps": [{"method": "distill"}]}, r"steps\[0\]", r"trains and has no data: add a training: section"),
    ({"training": {"steps": 2}, "steps": [{"method": "rtn"}]}, r"training", r"no step of the recipe trains"),
    ({"training": {"steps": 2, "tokens": 100}, "steps": [{"method": "distill"}]}, r"training\.steps",
     r"both tokens \(100\) and steps \(2\) are set"),
    ({"training": {"steps": 2}, "steps": [{"method": "distill", "args": {"student": {"keep_blocks": [0, 2]}}}]},
     r"steps\[0\]\.args\.student\.keep_blocks", r"\[0, 2\] is out of range: the model has 2 blocks"),
    ({"training": {"steps": 2}, "steps": [{"method": "distill", "args": {"kl": 0}}]}, r"steps\[0\]\.args",
     r"every loss weight"),
])
def test_recipe_checks_name_the_field(recipe: dict, where: str, message: str) -> None:
    with pytest.raises(compress.RecipeError, match=where + r".*" + message):
        compress.apply(make_tiny("llama"), recipe, calib=_data() if "training" in recipe else None, device="cpu")


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path: Path) -> None:
    import transformers as tf

    other = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, vocab_size=1000))
    other.save_pretrained(tmp_path / "teacher")
    recipe = {"training": {"steps": 2}, "steps": [{"method": "distill", "args": {"teacher": str(tmp_path / "teacher")}}]}
    with pytest.raises(compress.RecipeError, match=r"steps\[0\]\.args\.teacher: .* has a vocabulary of 1000 tokens, "
                                                   r"the student 512"):
        compress.apply(make_tiny("llama"), recipe, calib=_data(), device="cpu")


def test_a_bf16_model_trains_through_float32_master_copies() -> None:
    """The forward autocasts to bf16 (mixed_precision auto) while the norms and kept weights train in float32:
    updates below bf16's rounding of the weights still add up, and the tensors come back in bf16."""
    model = make_tiny("llama", dtype=torch.bfloat16)
    before = {n: p.clone() for n, p in model.named_parameters()}
    compress.apply(model, _recipe(lr=1.5e-3, min_lr=1.0, steps=6), calib=_data(), device="cpu")
    after = dict(model.named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in after.values())
    # norms near 1, where bf16's spacing is 2**-7: one Adam step (about lr) would round away in bf16, six add up
    norm = "model.norm.weight"
    assert not torch.equal(before[norm], after[norm])
