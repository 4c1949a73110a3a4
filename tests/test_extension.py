"""A third party adds a storage format and a method through entry points alone (no change to compress), and a
checkpoint its method wrote loads in a fresh process from the format alone, without importing the method."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import compress
from compress.errors import CheckpointError
from conftest import install_fake_distribution, make_tiny

SIGN_FORMAT = textwrap.dedent('''
    """The ``sign`` format: 1-bit weights, a sign per weight and one scale per row (mean |w|)."""
    import torch
    import torch.nn.functional as F

    from compress import CompressedLinear, KernelChoice


    class SignLinear(CompressedLinear):
        format = "sign"
        rows_stack = True

        def __init__(self, in_features, out_features, bias, dtype, device="cpu"):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.register_buffer("signs", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("row_scale", torch.empty(out_features, 1, dtype=dtype, device=device))
            if bias:
                self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device))
            else:
                self.bias = None

        @classmethod
        def empty(cls, in_features, out_features, bias, scheme, dtype, device="meta"):
            return cls(in_features, out_features, bias, dtype, device)

        @classmethod
        def from_weight(cls, weight, bias):
            layer = cls(weight.shape[1], weight.shape[0], bias is not None, weight.dtype, weight.device)
            layer.signs.copy_(torch.where(weight >= 0, 1, -1).to(torch.int8))
            layer.row_scale.copy_(weight.abs().mean(dim=1, keepdim=True))
            if bias is not None:
                layer.bias.copy_(bias)
            return layer

        def scheme(self):
            return {"format": self.format}

        @classmethod
        def kernel(cls, scheme, in_features, out_features):
            return KernelChoice(None, "1-bit signs have no decode kernel")

        def dequantized_weight(self, dtype=None):
            return (self.signs.to(self.row_scale.dtype) * self.row_scale).to(dtype or self.row_scale.dtype)

        def forward(self, x):
            return F.linear(x, self.dequantized_weight(x.dtype), self.bias)
''')

BINARIZE_METHOD = textwrap.dedent('''
    """The ``binarize`` method: every target becomes a ``sign`` layer."""
    import torch

    from compress import LayerKind, Method, MethodConfig, Needs
    from compress.linear import get_bias, get_weight
    from my_sign_format import SignLinear


    class Binarize(Method):
        name = "binarize"
        Config = MethodConfig
        needs = Needs.NOTHING
        summary = "1-bit signs with a scale per row"

        def produces(self, config):
            return LayerKind.FORMAT

        def writes(self, config):
            return {"format": "sign"}

        def compress_block(self, work, config):
            for name, layer in list(work.targets.items()):
                work.replace(name, SignLinear.from_weight(get_weight(layer).detach().clone(), get_bias(layer)))
''')


@pytest.fixture
def sign_plugin(tmp_path: Path, monkeypatch) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    install_fake_distribution(site, "my-sign", {"my_sign_format": SIGN_FORMAT, "my_binarize": BINARIZE_METHOD},
                              {"compress.plugins": {"binarize": "my_binarize:Binarize"},
                               "compress.formats": {"sign": "my_sign_format:SignLinear"}})
    monkeypatch.syspath_prepend(str(site))
    compress.registry.refresh()
    compress.formats.refresh()
    yield site
    monkeypatch.undo()
    for module in ("my_sign_format", "my_binarize"):
        sys.modules.pop(module, None)
    compress.registry.refresh()
    compress.formats.refresh()


def test_a_third_party_format_and_method_round_trip_through_a_fresh_process(sign_plugin: Path, tmp_path: Path) -> None:
    model = make_tiny("llama")
    compress.apply(model, [{"method": "binarize", "targets": ["*.mlp.*"]}], device="cpu")
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "SignLinear"
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    out = compress.save(model, tmp_path / "ckpt")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["formats"] == ["sign"]
    assert qc["layers"]["model.layers.1.mlp.down_proj"] == {"format": "sign", "method": "binarize", "method_version": "1"}
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys
        import torch
        import compress
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained({str(out)!r})
        assert "my_binarize" not in sys.modules, "loading imported the method"
        assert "my_sign_format" in sys.modules
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        with torch.no_grad():
            logits = model(ids).logits
        torch.testing.assert_close(logits, torch.load({str(tmp_path / 'expected.pt')!r}), rtol=0, atol=1e-5)
        print("loaded", type(model.model.layers[0].mlp.up_proj).__name__)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(sign_plugin), *sys.path])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded SignLinear" in result.stdout


def test_validate_says_the_plugin_format_has_no_kernel(sign_plugin: Path, tiny_dirs, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from compress_cli import cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: [{method: binarize}]\n")
    result = CliRunner().invoke(cli, ["validate", str(recipe), "--model", str(tiny_dirs["llama"])], obj={})
    assert result.exit_code == 0, result.output
    assert "on CUDA: all of them fall back to dequantize-then-matmul: 1-bit signs have no decode kernel" in result.output
    listing = CliRunner().invoke(cli, ["plugins"], obj={})
    assert "binarize" in listing.output and "fp8 [compress-llm" in listing.output.split("formats: ")[1]
    assert "sign [my-sign 1.0]" in listing.output


def test_a_checkpoint_whose_format_is_missing_names_it(sign_plugin: Path, tmp_path: Path) -> None:
    model = make_tiny("llama")
    compress.apply(model, [{"method": "binarize", "targets": ["*.mlp.*"]}], device="cpu")
    out = compress.save(model, tmp_path / "ckpt")
    compress.formats.unregister("sign")
    sys.modules.pop("my_sign_format", None)
    (sign_plugin / "my-sign-1.0.dist-info" / "entry_points.txt").write_text("[compress.plugins]\nbinarize = my_binarize:Binarize\n")
    compress.formats.refresh()
    with pytest.raises(CheckpointError, match=r"checkpoint uses storage format 'sign': unknown format 'sign'; "
                                              r"installed formats: bitmask, corrected, factored, fp8, int, sparse24, sparse24-int .*install the package that provides it"):
        compress.load(out, device="cpu")
