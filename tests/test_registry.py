"""Plugins are discovered through entry points: a third-party package shows up in `compress plugins` and is
usable from a recipe with no change to compress; a broken one is reported when asked for."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from compress_cli import cli
from compress.errors import PluginError
from compress.registry import Registry, registry
from conftest import REPO, install_fake_distribution


def docs_plugin_example() -> str:
    text = (REPO / "docs" / "plugins.md").read_text()
    match = re.search(r"<!-- plugin-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/plugins.md must hold the plugin example after <!-- plugin-example -->"
    return match.group(1)


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    install_fake_distribution(site, "my-compress-plugin", {"my_compress_plugin": docs_plugin_example()},
                              {"compress.plugins": {"toy-prune": "my_compress_plugin:MagnitudePrune"}})
    install_fake_distribution(site, "broken-plugin", {"broken_plugin": "import no_such_module_anywhere\n"},
                              {"compress.plugins": {"broken": "broken_plugin:Method"}})
    monkeypatch.syspath_prepend(str(site))
    registry.refresh()
    yield site
    monkeypatch.undo()
    registry.refresh()


def test_third_party_plugin_is_listed(third_party) -> None:
    result = CliRunner().invoke(cli, ["plugins"], obj={})
    assert result.exit_code == 0, result.output
    assert re.search(r"toy-prune\s+nothing\s+.*\[my-compress-plugin 1\.0\]", result.output)
    assert re.search(r"broken\s+BROKEN\s+broken-plugin 1\.0: .*No module named 'no_such_module_anywhere'", result.output)
    assert re.search(r"rtn\s+nothing", result.output)  # built-ins come through the same group


def test_third_party_plugin_runs_from_a_recipe(third_party, tiny_dirs, tmp_path: Path) -> None:
    recipe = tmp_path / "prune.yaml"
    recipe.write_text("steps: [{method: toy-prune, targets: ['*.mlp.*'], args: {sparsity: 0.5}}]\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["apply", str(recipe), "--model", str(tiny_dirs["llama"]), "--output", str(out)], obj={})
    assert result.exit_code == 0, result.output
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    mlp = model.model.layers[0].mlp.down_proj.weight
    attn = model.model.layers[0].self_attn.q_proj.weight
    assert (mlp == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert (attn == 0).float().mean().item() < 0.01


def test_broken_plugin_reported_when_asked(third_party, tiny_dirs, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: [{method: broken}]\n")
    result = CliRunner().invoke(cli, ["validate", str(recipe), "--model", str(tiny_dirs["llama"])], obj={})
    assert result.exit_code == 2
    assert re.search(r"steps\[0\]\.method: method 'broken' is installed \(broken-plugin 1\.0, entry point "
                     r"'broken_plugin:Method'\) but failed to import: ModuleNotFoundError", result.output)


def test_unknown_method_suggests_and_lists() -> None:
    with pytest.raises(PluginError, match=r"unknown method 'rnt'; did you mean 'rtn'\? installed methods: .*int8"):
        registry.get("rnt")


def test_discovery_is_lazy() -> None:
    fresh = Registry()
    assert fresh._entry_points is None  # nothing read until a method is asked for
    assert "rtn" in fresh.names()
    assert fresh._entries == {}  # listing names imports no plugin


def test_plugin_api_misuse_is_explained() -> None:
    from compress.methods import Method

    class NoConfig(Method):
        name = "no-config"

    with pytest.raises(PluginError, match="does not set 'Config'"):
        Registry().register(NoConfig)
