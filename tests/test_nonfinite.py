"""NaN and infinite weights in the layers a recipe compresses (issue 19, finding 5): an error naming each layer
before any compression work, or, with ``model: {nonfinite: zero}``, zeros and a warning."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

import compress
from compress_cli import cli
from compress.errors import RecipeError, UsageError
from compress.formats import CompressedLinear
from conftest import REPO, TINY_TOKENIZER, make_tiny

STEPS = {
    "rtn": [{"method": "rtn", "args": {"bits": 4, "group_size": 64}}],
    "int8": [{"method": "int8"}],
    "gptq": [{"method": "gptq", "args": {"bits": 4, "group_size": 64}}],
}
ERROR = (r"4 weights of the model are NaN or infinite, in 2 of the layers the recipe compresses \(non-finite weights "
         r"/ all\):\n  model\.layers\.0\.self_attn\.q_proj: 1 of 16384\n  model\.layers\.1\.mlp\.down_proj: 3 of 32768\n"
         r"Compressed, each would make its whole group's scale non-finite\. Fix or re-download the model, or set "
         r"`nonfinite: zero` under `model:` in the recipe to replace them by zeros")


def poisoned(arch: str = "llama") -> nn.Module:
    model = make_tiny(arch)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[3, 5] = float("nan")
        down = model.model.layers[1].mlp.down_proj.weight
        down[0, 0], down[7, 1], down[9, 100] = float("inf"), float("-inf"), float("nan")
    return model


def tokens() -> torch.Tensor:
    return torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", sorted(STEPS))
def test_nonfinite_weights_are_an_error_before_any_work(method: str) -> None:
    model = poisoned()
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(UsageError, match=ERROR) as info:
        compress.apply(model, STEPS[method], calib=tokens())
    assert info.value.exit_code == 2
    assert not any(isinstance(m, CompressedLinear) for m in model.modules())
    for name, p in model.named_parameters():  # nothing changed, the NaN and inf included
        assert torch.allclose(p, before[name], rtol=0, atol=0, equal_nan=True), name


@pytest.mark.parametrize("method", sorted(STEPS))
def test_nonfinite_weights_zeroed_when_asked(method: str, caplog) -> None:
    model = poisoned()
    with caplog.at_level(logging.WARNING, logger="compress"):
        compress.apply(model, {"model": {"nonfinite": "zero"}, "steps": STEPS[method]}, calib=tokens())
    assert re.search(r"replaced 4 NaN or infinite weights by zeros in 2 layers \(model\.nonfinite: zero\):\n"
                     r"  model\.layers\.0\.self_attn\.q_proj: 1 of 16384\n  model\.layers\.1\.mlp\.down_proj: 3 of 32768",
                     caplog.text), caplog.text
    layers = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    assert len(layers) == 14
    for layer in layers:
        assert all(torch.isfinite(b).all() for b in layer.buffers() if b.is_floating_point()), layer
        assert torch.isfinite(layer.dequantized_weight()).all()
    assert torch.isfinite(model(tokens()[:1]).logits).all()


def test_only_the_targeted_layers_are_checked() -> None:
    model = poisoned()
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] = float("nan")  # tied with lm_head, which the recipe leaves alone
    compress.apply(model, {"steps": [{"method": "rtn", "targets": ["k_proj", "v_proj"], "args": {"group_size": 64}}]})
    assert isinstance(model.model.layers[0].self_attn.k_proj, CompressedLinear)
    steps = [{"method": "rtn", "targets": ["q_proj"], "ignore": ["model.layers.0.*"], "args": {"group_size": 64}}]
    compress.apply(poisoned(), steps)  # the one bad q_proj is ignored
    with pytest.raises(UsageError, match=r"1 weights of the model are NaN or infinite, in 1 of the layers .*\n"
                                         r"  model\.layers\.0\.self_attn\.q_proj: 1 of 16384\n[A-Z]"):
        compress.apply(poisoned(), [{"method": "rtn", "targets": ["q_proj"], "args": {"group_size": 64}}])


def test_conv1d_layers_are_checked() -> None:
    model = make_tiny("gpt2")
    with torch.no_grad():
        model.transformer.h[1].attn.c_attn.weight[2, 3] = float("inf")
    with pytest.raises(UsageError, match=r"  transformer\.h\.1\.attn\.c_attn: 1 of 49152\n"):
        compress.apply(model, [{"method": "int8"}])


def test_nonfinite_option_is_checked_with_the_recipe() -> None:
    with pytest.raises(RecipeError, match=r"model\.nonfinite: input should be 'error' or 'zero' \(got 'ignore'\)"):
        compress.apply(make_tiny("llama"), {"model": {"nonfinite": "ignore"}, "steps": [{"method": "rtn"}]})


def test_cli_names_the_layers_and_the_option(tmp_path: Path) -> None:
    model_dir = tmp_path / "nan-llama"
    poisoned().save_pretrained(model_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_TOKENIZER / f, model_dir / f)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["apply", str(REPO / "recipes" / "w4-rtn.yaml"), "--model", str(model_dir),
                                      "--output", str(out)], obj={})
    assert result.exit_code == 2, result.output
    assert re.search("error: " + ERROR, result.output), result.output
    assert not out.exists()
    recipe = tmp_path / "zero.yaml"
    recipe.write_text("model: {nonfinite: zero}\nsteps: [{method: rtn, args: {group_size: 64}}]\n")
    result = CliRunner().invoke(cli, ["apply", str(recipe), "--model", str(model_dir), "--output", str(out)], obj={})
    assert result.exit_code == 0, result.output
    assert torch.isfinite(compress.load(out, device="cpu")(tokens()[:1]).logits).all()
