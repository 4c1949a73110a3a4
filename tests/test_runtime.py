"""Runtime features: named in a recipe, validated with the rest of it, stored in the checkpoint under their own
key, and enabled by compress.load on the device the model runs on."""

from __future__ import annotations

import json
import re
from pathlib import Path

from click.testing import CliRunner

import compress
from compress_cli import cli
from compress.runtime.fusion import is_fused


def test_a_recipe_runtime_feature_is_stored_and_enabled_on_load(tiny_dirs, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: [{method: rtn, args: {bits: 4, group_size: 64}}]\nruntime: [{feature: fuse-projections}]\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["apply", str(recipe), "--model", str(tiny_dirs["llama"]), "--output", str(out)],
                                obj={})
    assert result.exit_code == 0, result.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["runtime"] == [{"feature": "fuse-projections", "args": {}}]
    assert qc["formats"] == ["int"]
    assert is_fused(compress.load(out, device="cpu"))
    assert not is_fused(compress.load(out, device="cpu", enable_runtime=False))


def test_an_unknown_runtime_feature_is_a_recipe_problem(tiny_dirs, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: [{method: rtn}]\nruntime: [{feature: fuse-projection}, {feature: fuse-projections, "
                      "args: {groups: 2}}]\n")
    result = CliRunner().invoke(cli, ["validate", str(recipe), "--model", str(tiny_dirs["llama"])], obj={})
    assert result.exit_code == 2
    assert re.search(r"runtime\[0\]\.feature: unknown runtime feature 'fuse-projection'; did you mean "
                     r"'fuse-projections'\?", result.output), result.output
    assert re.search(r"runtime\[1\]\.args\.groups: unknown field", result.output), result.output
