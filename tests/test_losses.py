"""The chunked cross-entropy gives the model's own loss and gradients without its full logits, and models whose
logits are not their head's output are scored through their own loss."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

import compress.losses as losses
from compress.losses import causal_lm_loss, chunked_cross_entropy
from conftest import make_tiny


def _batch(padding: bool) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 512, (3, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    if padding:  # a padded row and a prompt whose tokens take no loss, as instruction data has
        mask[1, 30:] = 0
        labels[1, 30:] = -100
        labels[2, :12] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("padding", [False, True])
def test_chunked_loss_equals_the_models_own(arch, padding, monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_LOGITS", 512 * 7)  # 7 tokens a chunk: 17 chunks per batch, one ragged
    model = make_tiny(arch)  # eval mode: no dropout, so the two forwards see the same network
    batch = _batch(padding)
    own = model(**batch, use_cache=False).loss
    own.backward()
    expected = _grads(model)
    model.zero_grad()
    loss, parts = causal_lm_loss(model, batch)
    loss.backward()
    assert losses._chunked[model] is True  # the chunked path ran, not the fallback
    torch.testing.assert_close(loss, own, rtol=1e-5, atol=1e-6)
    assert parts == {"ce": pytest.approx(float(own.detach()))}
    got = _grads(model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_cross_entropy_skips_ignored_tokens():
    head = nn.Linear(8, 11, bias=False)
    hidden = torch.randn(2, 5, 8)
    labels = torch.tensor([[1, -100, 3, 4, 10], [-100, -100, 0, 2, 2]])
    ref = nn.functional.cross_entropy(head(hidden).reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(chunked_cross_entropy(head, hidden, labels), ref)
    none = torch.full_like(labels, -100)
    assert float(chunked_cross_entropy(head, hidden.requires_grad_(), none)) == 0.0


def test_logits_changed_after_the_head_use_the_models_own_loss(caplog):
    model = make_tiny("llama")
    forward = model.forward

    def capped(*args, **kwargs):  # soft-capping after the head, as Gemma 2 does
        out = forward(*args, **kwargs)
        out.logits = torch.tanh(out.logits / 0.5) * 0.5
        if out.loss is not None:
            labels = kwargs["labels"]
            out.loss = nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                                   labels[:, 1:].reshape(-1))
        return out

    model.forward = capped
    batch = _batch(False)
    with caplog.at_level(logging.INFO, logger="compress.losses"):
        loss, _ = causal_lm_loss(model, batch)
    assert losses._chunked[model] is False
    assert "full logits" in caplog.text
    torch.testing.assert_close(loss, capped(**batch).loss)


@pytest.mark.parametrize("padding", [False, True])
def test_chunked_distillation_loss_equals_the_full_logits_one(arch, padding, monkeypatch):
    import compress.plugins.distill as distill

    monkeypatch.setattr(losses, "CHUNK_LOGITS", 512 * 7)
    student, teacher = make_tiny(arch, seed=1), make_tiny(arch, seed=0)
    config = distill.DistillConfig(kl=1.0, reverse_kl=0.5, ce=0.3, hidden=2.0, temperature=2.0)
    loss_fn = distill.distillation_loss(teacher, config)
    batch = _batch(padding)
    loss, parts = loss_fn(student, batch)
    loss.backward()
    assert losses._chunked[student] is True and losses._chunked[teacher] is True
    got = _grads(student)
    student.zero_grad()
    monkeypatch.setattr(distill, "may_chunk", lambda model: False)  # the same loss over the full logits
    expected_loss, expected_parts = loss_fn(student, batch)
    expected_loss.backward()
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert parts.keys() == expected_parts.keys() == {"kl", "reverse_kl", "ce", "hidden"}
    for name, value in expected_parts.items():
        assert parts[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    expected = _grads(student)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
