"""Fused sibling projections (compress.runtime.fusion): layers that read the same input run as one layer, with the same
outputs, no byte held twice, an undo that restores the original layers, and no graph break under torch.compile."""

from __future__ import annotations

import pytest
import torch

import compress
from compress.errors import UsageError
from compress.eval.memory import tensor_bytes_by_dtype
from compress.formats import CompressedLinear
from compress.formats.integer import IntLinear
from compress.runtime.fusion import FusedProjection
from conftest import make_tiny

STEPS = {"dense": [],  # the model's own nn.Linear layers
         "int4": [{"method": "rtn", "args": {"bits": 4, "group_size": 32}}],
         "int8": [{"method": "int8", "args": {}}],
         "fp8": [{"method": "fp8", "args": {"activations": "dynamic"}}]}
#: Groups expected a decoder layer: q/k/v and gate/up where they are separate layers (gpt2 and phi3 store q/k/v
#: as one layer already, and gpt2's and opt's MLPs have no two layers on one input).
GROUPS_PER_LAYER = {"llama": 2, "qwen2": 2, "mistral": 2, "gpt2": 0, "opt": 1, "phi3": 0}


@pytest.mark.parametrize("fmt", ["dense", "int4", "int8", "fp8"])
def test_fused_model_computes_what_the_layers_did(arch, fmt, tmp_path) -> None:
    model = make_tiny(arch)
    if STEPS[fmt]:
        compress.apply(model, [dict(s) for s in STEPS[fmt]], device="cpu")
    ids = torch.randint(0, 512, (2, 7))  # 14 tokens: the fused path (see test_prefill_runs_the_members_separately)
    with torch.no_grad():
        before = model(ids).logits
    layers_before = {n for n, m in model.named_modules() if isinstance(m, (CompressedLinear, torch.nn.Linear))}
    keys_before, bytes_before = set(model.state_dict()), tensor_bytes_by_dtype(model)

    fused = compress.fuse_projections(model)
    assert fused == GROUPS_PER_LAYER[arch] * model.config.num_hidden_layers
    assert compress.fuse_projections(model) == 0  # already fused: nothing more to do
    assert tensor_bytes_by_dtype(model) == bytes_before  # the members' buffers are views of the fused layers'
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    if fused:
        with pytest.raises(UsageError, match="unfuse_projections"):
            compress.save(model, tmp_path / "fused")
        assert not (tmp_path / "fused").exists()

    assert compress.unfuse_projections(model) == fused
    assert {n for n, m in model.named_modules() if isinstance(m, (CompressedLinear, torch.nn.Linear))} == layers_before
    assert set(model.state_dict()) == keys_before
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    compress.save(model, tmp_path / "unfused")


def test_member_called_with_another_input_computes_its_own() -> None:
    model = make_tiny("llama")
    compress.apply(model, [dict(s) for s in STEPS["int4"]], device="cpu")
    attention = model.model.layers[0].self_attn
    q, k = attention.q_proj, attention.k_proj
    compress.fuse_projections(model)
    x, other = torch.randn(3, q.in_features), torch.randn(3, q.in_features)
    with torch.no_grad():
        assert isinstance(attention.k_proj, FusedProjection)
        attention.q_proj(x)  # computes q, k and v for x
        torch.testing.assert_close(attention.k_proj(x), k(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(attention.k_proj(other), k(other), rtol=0, atol=0)
        assert torch.equal(attention.q_proj(other), q(other))


def test_prefill_runs_the_members_separately(monkeypatch) -> None:
    from compress.runtime.fusion import FUSE_MAX_TOKENS

    model = make_tiny("llama")
    compress.apply(model, [dict(s) for s in STEPS["int4"]], device="cpu")
    compress.fuse_projections(model)
    fused_calls = []
    for module in model.modules():
        if isinstance(module, FusedProjection) and module.fused is not None:
            module.fused.register_forward_hook(lambda m, i, o: fused_calls.append(i[0].shape[-2]))
    groups = 2 * model.config.num_hidden_layers
    with torch.no_grad():
        model(torch.randint(0, 512, (1, FUSE_MAX_TOKENS)))
        assert fused_calls == [FUSE_MAX_TOKENS] * groups
        long = torch.randint(0, 512, (1, FUSE_MAX_TOKENS + 1))
        before = model(long).logits
        assert len(fused_calls) == groups  # the longer call ran the members one by one
        compress.unfuse_projections(model)
        torch.testing.assert_close(model(long).logits, before, rtol=0, atol=0)


def test_fused_model_compiles_without_graph_breaks() -> None:
    model = make_tiny("llama")
    compress.apply(model, [dict(s) for s in STEPS["int4"]], device="cpu")
    compress.fuse_projections(model)
    ids = torch.randint(0, 512, (1, 5))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # fullgraph: a graph break raises
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_model_whose_forward_needs_more_is_left_unfused(caplog) -> None:
    class NeedsMask(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, input_ids, attention_mask):
            return self.q(attention_mask) + self.k(attention_mask)

    model = NeedsMask()
    assert compress.fuse_projections(model) == 0
    assert "nothing fused" in caplog.text and "attention_mask" in caplog.text
    assert isinstance(model.q, torch.nn.Linear)


def test_only_layers_that_stack_by_rows_are_fused(monkeypatch) -> None:
    """nn.Linear's subclasses (bitsandbytes' layers hold packed weights) and compressed formats that do not
    declare rows_stack are left alone."""

    class Packed(torch.nn.Linear):
        pass

    model = make_tiny("llama")
    for layer in model.model.layers:
        layer.mlp.gate_proj.__class__ = Packed
        layer.mlp.up_proj.__class__ = Packed
    assert compress.fuse_projections(model) == model.config.num_hidden_layers  # q/k/v only
    assert all(isinstance(layer.mlp.up_proj, Packed) for layer in model.model.layers)

    monkeypatch.setattr(IntLinear, "rows_stack", False)
    model = make_tiny("llama")
    compress.apply(model, [dict(s) for s in STEPS["int4"]], device="cpu")
    assert compress.fuse_projections(model) == 0
