"""Bad input gets a pinned, actionable message, the right exit code, and nothing is written."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from compress.cli import cli


def run(args: list[str]):
    return CliRunner().invoke(cli, args, obj={})


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(body))
    return path


@pytest.fixture
def llama(tiny_dirs) -> str:
    return str(tiny_dirs["llama"])


CASES = {
    "unknown method": ("steps: [{method: gtpq}]", r"steps\[0\]\.method: unknown method 'gtpq'; .*installed methods: .*rtn"),
    "misspelt field": ("steps: [{method: rtn, args: {groupsize: 64}}]",
                       r"steps\[0\]\.args\.groupsize: unknown field; did you mean group_size\?"),
    "wrong type": ("steps: [{method: rtn, args: {bits: four}}]",
                   r"steps\[0\]\.args\.bits: input should be a valid integer.*\(got 'four'\)"),
    "bits out of range": ("steps: [{method: rtn, args: {bits: 9}}]",
                          r"steps\[0\]\.args\.bits: input should be less than or equal to 8 \(got 9\)"),
    "misspelt section": ("stage: []\nsteps: [{method: rtn}]", r"stage: unknown field; did you mean stages\?"),
    "misspelt step key": ("steps: [{method: rtn, arg: {bits: 4}}]", r"steps\[0\]\.arg: unknown field; did you mean args\?"),
    "pattern matching nothing": ("steps: [{method: rtn, targets: [q_prj]}]",
                                 r"steps\[0\]\.targets\[0\]: pattern 'q_prj' matches no linear layer of "
                                 r"LlamaForCausalLM; did you mean 'q_proj'\?"),
    "tied lm_head": ("steps: [{method: rtn, targets: [lm_head]}]", r"lm_head share their weight with another layer"),
    "no steps": ("model: {dtype: float32}", r"stages: no steps"),
    "misspelt eval field": ("steps: [{method: rtn}]\neval: {taks: [ppl], speed: {batch_size: [1]}}",
                            r"eval\.speed\.batch_size: unknown field; did you mean batch_sizes\?\n.*eval\.taks: unknown "
                            r"field; did you mean tasks\?"),
    "bad yaml": ("steps: [{method: rtn", r"line \d+, column \d+: not valid YAML"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_recipe_problems_are_pinned(case: str, tmp_path: Path, llama: str) -> None:
    body, pattern = CASES[case]
    recipe = write(tmp_path, body)
    out = tmp_path / "out"
    for command in (["validate", str(recipe), "--model", llama],
                    ["apply", str(recipe), "--model", llama, "--output", str(out)]):
        result = run(command)
        assert result.exit_code == 2, result.output
        assert re.search(pattern, result.output), result.output
        assert "Traceback" not in result.output
    assert not out.exists()


def test_every_problem_is_reported_at_once(tmp_path: Path, llama: str) -> None:
    recipe = write(tmp_path, """
        model: {dtype: float64}
        steps:
          - {method: rtn, args: {bits: 1, groupsize: 64}}
          - {method: nosuch}
        """)
    result = run(["validate", str(recipe), "--model", llama])
    assert result.exit_code == 2
    assert "4 problems" in result.output
    for where in ("model.dtype", r"steps[0].args.bits", r"steps[0].args.groupsize", r"steps[1].method"):
        assert where in result.output


def test_missing_model_path(tmp_path: Path) -> None:
    recipe = write(tmp_path, "model: {path: ./no/such/model}\nsteps: [{method: rtn}]")
    result = run(["apply", str(recipe), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert re.search(r"model\.path: model path not found: .*no/such/model", result.output)
    assert not (tmp_path / "out").exists()


def test_no_model_at_all(tmp_path: Path) -> None:
    result = run(["validate", str(write(tmp_path, "steps: [{method: rtn}]"))])
    assert result.exit_code == 2
    assert "model.path: no model given: set model.path in the recipe or pass --model" in result.output


def test_missing_recipe_file(tmp_path: Path) -> None:
    result = run(["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "cannot read recipe file" in result.output


def test_debug_shows_the_traceback(tmp_path: Path, llama: str) -> None:
    recipe = write(tmp_path, "steps: [{method: gtpq}]")
    result = CliRunner().invoke(cli, ["--debug", "validate", str(recipe), "--model", llama], obj={})
    assert result.exit_code != 0
    assert type(result.exception).__name__ == "RecipeError"
