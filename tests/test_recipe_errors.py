"""Bad input gets a pinned, actionable message, the right exit code, and nothing is written."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from compress_cli import cli


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


# -- issue 19: what reached the model before validation caught it ------------------------------------------


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if any weight is loaded: the checks under test must come first."""
    import compress.api

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the problem was reported")

    monkeypatch.setattr(compress.api, "load_model", refuse)


@pytest.mark.parametrize("where, value", [("recipe", "tpu"), ("flag", "bogus"), ("recipe", "cuda:x"),
                                          ("flag", "CPU"), ("recipe", "cuda:")])
def test_bad_device_is_a_recipe_problem(where: str, value: str, tmp_path: Path, llama: str, no_weights) -> None:
    body = f"model: {{device: '{value}'}}\nsteps: [{{method: rtn}}]" if where == "recipe" else "steps: [{method: rtn}]"
    recipe = write(tmp_path, body)
    out = tmp_path / "out"
    commands = [["apply", str(recipe), "--model", llama, "--output", str(out)]]
    if where == "flag":
        commands[0] += ["--device", value]
    else:
        commands.append(["validate", str(recipe), "--model", llama])
    for command in commands:
        result = run(command)
        assert result.exit_code == 2, result.output
        assert re.search(rf"model\.device: unknown device '{re.escape(value)}'; use auto, cpu, cuda or cuda:N", result.output), result.output
        assert "Traceback" not in result.output
    assert not out.exists()


def test_check_device() -> None:
    from compress.model import check_device

    for good in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert check_device(good) is None, good
    for bad in ("tpu", "mps", "cuda:", "cuda:-1", "cuda:0:1", " cpu", "gpu", ""):
        assert re.fullmatch(rf"unknown device '{re.escape(bad)}'; use auto, cpu, cuda or cuda:N.*", check_device(bad)), bad


def test_resolve_device_refuses_what_it_cannot_run_on() -> None:
    import torch

    from compress.errors import UsageError
    from compress.model import resolve_device

    with pytest.raises(UsageError, match=r"unknown device 'tpu'; use auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match=r"device 'cuda' was asked for, but this machine has no CUDA GPU"):
            resolve_device("cuda")
    else:
        with pytest.raises(UsageError, match=r"device 'cuda:99' was asked for, but this machine has \d+ CUDA GPU"):
            resolve_device("cuda:99")


def test_python_api_refuses_a_bad_device_before_changing_weights() -> None:
    import torch

    import compress
    from compress.errors import UsageError
    from conftest import make_tiny

    model = make_tiny("llama")
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(UsageError, match=r"unknown device 'tpu'"):
        compress.apply(model, [{"method": "rtn"}], device="tpu")
    with pytest.raises(UsageError, match=r"model\.device: unknown device 'tpu'"):
        compress.apply(model, {"model": {"device": "tpu"}, "steps": [{"method": "rtn"}]})
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)


@pytest.mark.parametrize("content, offset, line", [
    (b"# r\xe9sum\xe9\nsteps: [{method: rtn}]\n", 3, 1),  # latin-1
    (b"steps: [{method: rtn}]\n# \xff\xfe\x00\x81 random\n", 25, 2),
    (bytes(range(128, 256)), 0, 1),
])
def test_recipe_that_is_not_utf8(content: bytes, offset: int, line: int, tmp_path: Path, llama: str) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(content)
    for command in (["validate", str(recipe), "--model", llama],
                    ["apply", str(recipe), "--model", llama, "--output", str(tmp_path / "out")]):
        result = run(command)
        assert result.exit_code == 2, result.output
        assert re.search(rf"error: .*recipe\.yaml: 1 problem\n  line {line}, byte {offset}: not UTF-8 text \(.*\); "
                         r"save the file as UTF-8", result.output), result.output
        assert "Traceback" not in result.output
    # the Python API reads recipe files the same way
    from compress.errors import RecipeError
    from compress.recipe import read_recipe_file

    with pytest.raises(RecipeError, match=rf"recipe\.yaml: 1 problem\n  line {line}, byte {offset}: not UTF-8"):
        read_recipe_file(recipe)


def test_utf8_recipe_with_a_byte_order_mark(tmp_path: Path, llama: str) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes("\ufeff# résumé\nsteps: [{method: rtn}]\n".encode())
    result = run(["validate", str(recipe), "--model", llama])
    assert result.exit_code == 0, result.output


# -- calibration files too small to fill one sample, caught by validation ----------------------------------


def _calib_recipe(tmp_path: Path, data: Path, extra: str = "") -> Path:
    return write(tmp_path, f"calibration: {{dataset: {data}{extra}}}\nsteps: [{{method: gptq}}]")


@pytest.mark.parametrize("extra, needed", [(", samples: 4, seq_len: 64", "4 samples of 64 tokens need 256 tokens"),
                                           ("", "128 samples of 256 tokens need 32768 tokens")])  # default seq_len
def test_calibration_file_too_small(extra: str, needed: str, tmp_path: Path, llama: str, no_weights) -> None:
    data = tmp_path / "short.txt"
    data.write_text("def f(): pass\n" * 10)  # 140 bytes
    recipe = _calib_recipe(tmp_path, data, extra)
    out = tmp_path / "out"
    for command in (["validate", str(recipe), "--model", llama],
                    ["apply", str(recipe), "--model", llama, "--output", str(out)]):
        result = run(command)
        assert result.exit_code == 2, result.output
        assert re.search(rf"calibration\.dataset: .*short\.txt holds 140 bytes of text; {needed} \(a token takes "
                         r"at least one byte of text\); lower calibration\.samples or calibration\.seq_len, "
                         r"or give more text", result.output), result.output
    assert not out.exists()


def test_empty_calibration_file(tmp_path: Path, llama: str, no_weights) -> None:
    data = tmp_path / "empty.txt"
    data.write_text("")
    result = run(["validate", str(_calib_recipe(tmp_path, data)), "--model", llama])
    assert result.exit_code == 2, result.output
    assert re.search(r"calibration\.dataset: .*empty\.txt is empty \(0 bytes\); give a file with text", result.output)
    # listed with the recipe's other problems
    recipe = write(tmp_path, f"calibration: {{dataset: {data}, seq_len: 64}}\nsteps: [{{method: gptq}}, {{method: nosuch}}]")
    result = run(["validate", str(recipe), "--model", llama])
    assert result.exit_code == 2 and "2 problems" in result.output, result.output
    assert "calibration.dataset:" in result.output and "steps[1].method: unknown method" in result.output


@pytest.mark.parametrize("rows, message", [
    ('{"text": ""}\n{"text": ""}\n', r"holds no text \(2 documents, all empty, in 26 bytes\)"),
    ('{"text": "abc"}\n{"text": "de"}\n', r"holds 5 bytes of text in 2 documents \(file: 31 bytes\); 4 samples of 64 tokens need 256 tokens"),
    ('{"txt": "abc"}\n', r"rows\.jsonl:1: no field 'text' \(found: txt\); set calibration\.column"),
    ('{"text": "abc"\n', r"rows\.jsonl:1: not valid JSON"),
])
def test_small_or_broken_jsonl(rows: str, message: str, tmp_path: Path, llama: str, no_weights) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text(rows)
    result = run(["validate", str(_calib_recipe(tmp_path, data, ", samples: 4, seq_len: 64")), "--model", llama])
    assert result.exit_code == 2, result.output
    assert re.search(r"calibration\.dataset: .*" + message, result.output), result.output


def test_calibration_file_not_utf8_is_found_by_validation(tmp_path: Path, llama: str, no_weights) -> None:
    data = tmp_path / "latin1.txt"
    data.write_bytes(b"r\xe9sum\xe9 " * 1000)
    result = run(["validate", str(_calib_recipe(tmp_path, data, ", samples: 4, seq_len: 64")), "--model", llama])
    assert result.exit_code == 2, result.output
    assert re.search(r"calibration\.dataset: .*latin1\.txt: not UTF-8 text \(invalid continuation byte at byte 1\); "
                     "give a text file", result.output), result.output


def test_calibration_file_large_enough_passes(tmp_path: Path, llama: str, calib_text: Path) -> None:
    data = tmp_path / "enough.txt"
    data.write_text("x" * 256)  # 4 x 64 tokens at most one byte each: not ruled out by its size
    assert run(["validate", str(_calib_recipe(tmp_path, data, ", samples: 4, seq_len: 64")), "--model", llama]).exit_code == 0
    assert run(["validate", str(_calib_recipe(tmp_path, calib_text)), "--model", llama]).exit_code == 0


def test_size_bound_holds_for_the_tokenizer(tiny_dirs) -> None:
    """The check's premise: the tokenizer never makes more tokens of a text than the text has bytes (+2)."""
    from compress.model import load_tokenizer

    tok = load_tokenizer(str(tiny_dirs["llama"]))
    for text in ("x", "\n", " ", "résumé \u2603 \U0001F600", "def f():\n\treturn 1\n" * 3, "\u4e2d\u6587" * 5):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) <= len(text.encode()) + 2, (text, ids)


# -- duplicate keys and strict types -------------------------------------------------------------------------


def test_duplicate_keys_are_problems(tmp_path: Path, llama: str) -> None:
    recipe = write(tmp_path, """
        model: {dtype: float32}
        steps:
          - method: rtn
            args:
              bits: 4
              bits: 3
        model: {dtype: bfloat16}
        """)
    for command in (["validate", str(recipe), "--model", llama],
                    ["apply", str(recipe), "--model", llama, "--output", str(tmp_path / "out")]):
        result = run(command)
        assert result.exit_code == 2, result.output
        assert "2 problems" in result.output, result.output
        assert re.search(r"steps\[0\]\.args\.bits: duplicate key, given at line 6 and again at line 7; keep one",
                         result.output), result.output
        assert re.search(r"\n  model: duplicate key, given at line 2 and again at line 8; keep one", result.output)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("body, pattern", [
    ("steps: [{method: rtn, args: {bits: '4'}}]", r"steps\[0\]\.args\.bits: input should be a valid integer \(got '4'\)"),
    ("steps: [{method: rtn, args: {symmetric: 'no'}}]",
     r"steps\[0\]\.args\.symmetric: input should be a valid boolean \(got 'no'\)"),
    ("steps: [{method: gptq, args: {damp: '0.1'}}]\ncalibration: {dataset: x}",
     r"steps\[0\]\.args\.damp: input should be a valid number \(got '0\.1'\)"),
    ("steps: [{method: rtn, args: {bits: 4.0}}]", r"steps\[0\]\.args\.bits: input should be a valid integer \(got 4\.0\)"),
    ("steps: [{method: rtn, args: {symmetric: 1}}]", r"steps\[0\]\.args\.symmetric: input should be a valid boolean \(got 1\)"),
    ("model: {trust_remote_code: 'yes'}\nsteps: [{method: rtn}]",
     r"model\.trust_remote_code: input should be a valid boolean \(got 'yes'\)"),
    ("calibration: {dataset: x, samples: '16'}\nsteps: [{method: rtn}]",
     r"calibration\.samples: input should be a valid integer \(got '16'\)"),
    ("calibration: {dataset: x, seed: true}\nsteps: [{method: rtn}]",
     r"calibration\.seed: input should be a valid integer \(got True\)"),
    ("steps: [{method: rtn, targets: q_proj}]", r"steps\[0\]\.targets: input should be a valid list \(got 'q_proj'\)"),
    ("steps: [{method: rtn}]\neval: {seq_len: '64'}", r"eval\.seq_len: input should be a valid integer \(got '64'\)"),
])
def test_strict_types(body: str, pattern: str, tmp_path: Path, llama: str) -> None:
    result = run(["validate", str(write(tmp_path, body)), "--model", llama])
    assert result.exit_code == 2, result.output
    assert re.search(pattern, result.output), result.output


def test_strict_types_still_take_what_yaml_and_python_give(tmp_path: Path, llama: str) -> None:
    """Integers where floats belong, YAML lists, and the Python API's plain values."""
    import compress
    from compress.formats import CompressedLinear
    from compress.registry import registry
    from conftest import make_tiny

    recipe = write(tmp_path, """
        calibration: {dataset: x}
        steps:
          - {method: awq, args: {max_shrink: 0.5, weight_exponents: [1, 0.5, 2], quantize: false}}
          - {method: gptq, args: {damp: 1e-2, bits: 4, group_size: null, symmetric: false}}
        """)
    import compress.recipe as r

    parsed, stages = r.validate_recipe(r.read_recipe_file(recipe), model_given=True, calib_given=True)
    awq, gptq = stages[0]
    assert awq.config.weight_exponents == [1.0, 0.5, 2.0] and gptq.config.group_size is None
    assert gptq.config.damp == 0.01  # YAML 1.2's float 1e-2 (YAML 1.1 reads it as a string)
    assert registry.get("awq").Config.from_dict({"weight_exponents": [1, 2]}).weight_exponents == [1.0, 2.0]
    model = make_tiny("llama")
    compress.apply(model, [{"method": "rtn", "args": {"bits": 4, "group_size": 64, "symmetric": False}}])
    assert isinstance(model.model.layers[0].self_attn.q_proj, CompressedLinear)


def test_method_configs_with_tuple_and_enum_fields_read_yaml_lists_and_values() -> None:
    """A plugin's config may use tuples and enums: recipes (YAML lists, strings) and checkpoints (JSON) fill them."""
    from enum import Enum

    from pydantic import ValidationError

    from compress.methods import MethodConfig

    class Mode(str, Enum):
        fast = "fast"
        slow = "slow"

    class TupleConfig(MethodConfig):
        window: tuple[int, int] = (1, 2)
        mode: Mode = Mode.fast
        ratio: float = 0.5

    config = TupleConfig.from_dict({"window": [3, 4], "mode": "slow", "ratio": 1})
    assert config == TupleConfig(window=(3, 4), mode=Mode.slow, ratio=1.0)
    assert TupleConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValidationError, match=r"window\.0\n  Input should be a valid integer"):
        TupleConfig.from_dict({"window": ["3", 4]})


def test_too_few_tokens_found_before_the_weights_load(tmp_path: Path, llama: str, no_weights) -> None:
    """Bytes enough to pass validation, tokens too few: the tokenized check still stops the run, before the
    weights load (the data is read and tokenized first)."""
    data = tmp_path / "repeated.txt"
    data.write_text("hello world " * 25)  # 300 bytes: validation cannot rule out 4 x 64 tokens; BPE makes fewer
    recipe = _calib_recipe(tmp_path, data, ", samples: 4, seq_len: 64")
    assert run(["validate", str(recipe), "--model", llama]).exit_code == 0
    result = run(["apply", str(recipe), "--model", llama, "--output", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert re.search(r"repeated\.txt has 175 tokens: 2 windows of 64, fewer than the 4 samples asked for; lower "
                     "samples or seq_len, or give more text", result.output), result.output
    assert not (tmp_path / "out").exists()


def test_eval_refuses_a_bad_device_before_loading(tmp_path: Path, llama: str, monkeypatch) -> None:
    """compress eval resolves its --device through compress.model.resolve_device before it loads a model."""
    import compress.eval.runner

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the device was checked")

    monkeypatch.setattr(compress.eval.runner, "load_subject", refuse)
    data = tmp_path / "valid.txt"
    data.write_text("hello world " * 100)
    result = run(["eval", llama, "--data", str(data), "--tasks", "ppl", "--device", "tpu"])
    assert result.exit_code == 2, result.output
    assert "error: unknown device 'tpu'; use auto, cpu, cuda or cuda:N" in result.output


def test_duplicate_keys_on_one_line_and_merge_keys(tmp_path: Path, llama: str) -> None:
    result = run(["validate", str(write(tmp_path, "steps: [{method: rtn, args: {bits: 4, bits: 3}}]")), "--model", llama])
    assert result.exit_code == 2, result.output
    assert "steps[0].args.bits: duplicate key, given twice on line 1 (columns 30 and 39); keep one" in result.output
    recipe = write(tmp_path, """
        steps:
          - &rtn {method: rtn, args: {bits: 4}}
          - {<<: *rtn, targets: [lm_head], ignore: []}
        """)  # a YAML merge key is no duplicate; its keys are overridden on purpose
    result = run(["validate", str(recipe), "--model", llama])
    assert "duplicate key" not in result.output and "1 problem" in result.output, result.output
    assert "steps[1].targets: lm_head share their weight" in result.output
