"""Layer states between steps: a pruner's mask travels to the steps after it (GPTQ keeps it, in one stage or
the next), the plan refuses steps that cannot take the state they are given and says the fix, and the engine
holds every step to the state it declared."""

from __future__ import annotations

import pytest
import torch
from pydantic import Field

import compress
from compress import LayerKind, Method, MethodConfig, Needs
from compress.errors import PluginError, RecipeError
from compress.formats.integer import IntLinear
from compress.linear import get_weight, set_weight
from compress.registry import registry
from conftest import make_tiny


class HalfConfig(MethodConfig):
    declare_only: bool = Field(False, description="declare a mask but set none (a broken plugin)")


class PruneHalf(Method):
    """Zeroes the smaller half of each row's weights and records the mask."""

    name = "test-prune-half"
    Config = HalfConfig
    masks: dict[str, torch.Tensor] = {}  # what it pruned, by layer (for the tests to check)

    def produces(self, config):
        return LayerKind.MASKED

    def compress_block(self, work, config):
        for name, layer in work.targets.items():
            w = get_weight(layer)
            keep = w.abs() >= w.abs().median(dim=1, keepdim=True).values
            set_weight(layer, w * keep)
            PruneHalf.masks[name] = keep.cpu()
            if not config.declare_only:
                work.set_mask(name, keep)


class Scale(Method):
    """Doubles dense weights (takes dense layers only)."""

    name = "test-scale"
    Config = MethodConfig

    def compress_block(self, work, config):
        for layer in work.targets.values():
            set_weight(layer, get_weight(layer) * 2)


@pytest.fixture(autouse=True)
def toy_methods():
    registry.register(PruneHalf)
    registry.register(Scale)
    yield
    registry.unregister(PruneHalf.name)
    registry.unregister(Scale.name)


def _calib() -> torch.Tensor:
    return torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))


def _zeros_kept(model) -> tuple[int, int]:
    """(weights the pruner zeroed, of those still exactly zero) over the compressed layers."""
    zeroed = kept = 0
    for name, m in model.named_modules():
        if isinstance(m, IntLinear):
            pruned = ~PruneHalf.masks[name]
            zeroed += int(pruned.sum())
            kept += int((m.dequantized_weight(torch.float32)[pruned] == 0).sum())
    return zeroed, kept


GPTQ = {"method": "gptq", "args": {"bits": 4, "group_size": 64}}


@pytest.mark.parametrize("stages", ["one stage", "two stages"])
def test_gptq_keeps_the_mask_a_pruner_left(stages: str) -> None:
    model = make_tiny("llama")
    prune = {"method": "test-prune-half"}
    recipe = {"steps": [prune, GPTQ]} if stages == "one stage" else {"stages": [{"steps": [prune]}, {"steps": [GPTQ]}]}
    compress.apply(model, recipe, calib=_calib(), device="cpu")
    zeroed, kept = _zeros_kept(model)
    assert zeroed > 0 and kept == zeroed  # every pruned weight is still exactly zero


def test_without_the_mask_gptq_refills_pruned_weights() -> None:
    """The oracle for the test above: a pruner that records no mask (declared dense) loses its zeros to GPTQ."""

    class Unmasked(PruneHalf):
        name = "test-prune-unmasked"

        def produces(self, config):
            return None

    registry.register(Unmasked)
    try:
        model = make_tiny("llama")
        compress.apply(model, {"steps": [{"method": "test-prune-unmasked", "args": {"declare_only": True}}, GPTQ]},
                       calib=_calib(), device="cpu")
    finally:
        registry.unregister(Unmasked.name)
    zeroed, kept = _zeros_kept(model)
    assert kept < zeroed  # GPTQ's error feedback moved some pruned weights off zero (about 2% here)


@pytest.mark.parametrize("steps, message", [
    ([{"method": "rtn"}, {"method": "gptq"}],
     r"steps\[1\]: 14 layers \(.*\) are stored in a format by steps\[0\] \(rtn\); method 'gptq' takes dense or masked "
     r"layers: a layer is stored once: remove one of the two steps \(for AWQ then GPTQ, give awq `quantize: false`\)"),
    ([{"method": "test-prune-half"}, {"method": "test-scale"}],
     r"steps\[1\]: 14 layers .* are masked \(pruned\) by steps\[0\] \(test-prune-half\); method 'test-scale' takes "
     r"dense layers: put this step before the pruning step"),
    ([{"method": "fp8"}, {"method": "test-scale", "targets": ["q_proj"]}],
     r"steps\[1\]: 2 layers \(model\.layers\.0\.self_attn\.q_proj, model\.layers\.1\.self_attn\.q_proj\) are stored in "
     r"a format by steps\[0\] \(fp8\); method 'test-scale' takes dense layers"),
])
def test_plan_refuses_a_step_given_a_state_it_cannot_take(steps, message) -> None:
    model = make_tiny("llama")
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(RecipeError, match=message):
        compress.apply(model, steps, calib=_calib(), device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # refused before any weight changed


def test_awq_without_quantizing_then_gptq_is_allowed() -> None:
    model = make_tiny("llama")
    compress.apply(model, [{"method": "awq", "args": {"quantize": False, "search_tokens": 128, "clip_tokens": 64}},
                           GPTQ], calib=_calib(), device="cpu")
    assert sum(isinstance(m, IntLinear) for m in model.modules()) == 14


def test_a_step_that_breaks_its_declaration_is_reported() -> None:
    model = make_tiny("llama")
    with pytest.raises(PluginError, match=r"method step 'test-prune-half': layer model\.layers\.0\.self_attn\.q_proj "
                                          r"has no mask; it declares it prunes"):
        compress.apply(model, [{"method": "test-prune-half", "args": {"declare_only": True}}], device="cpu")


def test_every_built_in_method_declares_its_states() -> None:
    for name in ("int8", "rtn", "gptq", "awq", "fp8"):
        method = registry.get(name)
        config = method.Config()
        assert method.consumes(config) == {LayerKind.DENSE, LayerKind.MASKED}, name
        assert method.produces(config) == LayerKind.FORMAT, name
        assert method.writes(config)["format"] in compress.formats.names(), name
    awq = registry.get("awq")
    assert awq.produces(awq.Config(quantize=False)) is None and awq.writes(awq.Config(quantize=False)) is None
