"""The command line end to end: every shipped recipe, every README command, idempotent re-runs, exit codes."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import compress
from compress_cli import cli
from compress.errors import CalibrationError
from compress.formats import CompressedLinear
from compress.methods import Method, MethodConfig, Needs
from compress.registry import registry
from conftest import REF_A, REPO, SHARED, tiny_config

RECIPES = sorted(p.name for p in (REPO / "recipes").glob("*.yaml"))


def run(args: list[str]):
    return CliRunner().invoke(cli, args, obj={})


def _shortened(recipe: Path, tmp_path: Path) -> Path:
    """``recipe`` with its training cut to two steps of short windows (its settings are for ref-a, minutes long)."""
    data = yaml.safe_load(recipe.read_text())
    if "training" not in data:
        return recipe
    data["training"] = {k: v for k, v in data["training"].items() if k != "tokens"}
    data["training"].update(steps=2, seq_len=64, eval_samples=2)
    short = tmp_path / recipe.name
    short.write_text(yaml.safe_dump(data))
    return short


def _deeper(tiny_dir: Path, tmp_path: Path, blocks: int) -> Path:
    """A copy of a tiny model directory with ``blocks`` decoder blocks (a student recipe needs more than two)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("qwen2").to_dict()
    config.pop("layer_types", None)  # derived from the depth
    config = type(tiny_config("qwen2"))(**{**config, "num_hidden_layers": blocks})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    path = tmp_path / f"qwen2-{blocks}"
    model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / f, path / f)
    return path


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_shipped_recipe_runs(recipe: str, tiny_dirs, calib_text, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["apply", str(_shortened(REPO / "recipes" / recipe, tmp_path)), "--output", str(out)]
    if recipe != "quickstart.yaml":  # the others name no model, and GPTQ / AWQ need --calib
        model = _deeper(tiny_dirs["qwen2"], tmp_path, 8) if recipe.startswith("student-") else tiny_dirs["qwen2"]
        args += ["--model", str(model), "--calib", str(calib_text)]
    if "lora" in recipe:
        args += ["--data", str(calib_text)]
    result = run(args)
    assert result.exit_code == 0, result.output
    model = compress.load(out, device="cpu")
    if recipe.startswith("student-"):  # smaller by its blocks, its layers as they were
        assert model.config.num_hidden_layers == len(model.model.layers) == 6
    elif recipe == "qlora.yaml":  # merged into float layers, and the adapter alone beside them
        assert not any(isinstance(m, CompressedLinear) for m in model.modules())
        assert (out / "adapter" / "adapter_config.json").exists()
    else:
        assert re.search(r"compressed layers: .* MB of weights, 0\.\d+x their", result.output)
        assert any(isinstance(m, CompressedLinear) for m in model.modules())
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_apply_is_idempotent_and_refuses_foreign_outputs(tiny_dirs, tmp_path: Path) -> None:
    out = tmp_path / "out"
    recipe = str(REPO / "recipes" / "w4-rtn.yaml")
    model = str(tiny_dirs["llama"])
    assert run(["apply", recipe, "--model", model, "--output", str(out)]).exit_code == 0
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    again = run(["apply", recipe, "--model", model, "--output", str(out)])
    assert again.exit_code == 0 and "is up to date" in again.output
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    # written by an older version, whose recipes lacked a field added since (with its default): still the same
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]["recipe"]["model"]["compute_dtype"]
    (out / "config.json").write_text(json.dumps(config))
    assert "is up to date" in run(["apply", recipe, "--model", model, "--output", str(out)]).output
    other = run(["apply", str(REPO / "recipes" / "w3-rtn.yaml"), "--model", model, "--output", str(out)])
    assert other.exit_code == 2 and "already exists and was not made by this recipe; pass --overwrite" in other.output
    redo = run(["apply", str(REPO / "recipes" / "w3-rtn.yaml"), "--model", model, "--output", str(out), "--overwrite"])
    assert redo.exit_code == 0
    assert compress.load(out, device="cpu").model.layers[0].mlp.up_proj.int_scheme.bits == 3


def test_validate_lists_the_layers_each_step_hits(tiny_dirs) -> None:
    result = run(["validate", str(REPO / "recipes" / "int8-absmax.yaml"), "--model", str(tiny_dirs["gpt2"])])
    assert result.exit_code == 0, result.output
    assert "int8(scheme=absmax, granularity=channel, group_size=128)" in result.output
    assert "8 layers: c_attn x2, c_proj x4, c_fc x2" in result.output


def test_a_recipe_starts_from_a_compress_checkpoint_with_its_layers_stored(tiny_dirs, calib_text,
                                                                           tmp_path: Path) -> None:
    """The checkpoint's stored layers are selectable and in the format state from the start (checked on the meta
    device): LoRA beside them is planned, a second quantization of them is refused with the fix."""
    out = tmp_path / "w4"
    assert run(["apply", str(REPO / "recipes" / "w4-rtn.yaml"), "--model", str(tiny_dirs["llama"]), "--output",
                str(out)]).exit_code == 0
    lora = tmp_path / "lora.yaml"
    lora.write_text(yaml.safe_dump({"training": {"steps": 2}, "steps": [{"method": "qlora",
                                                                         "args": {"base": "keep", "save": "beside"}}]}))
    result = run(["validate", str(lora), "--model", str(out), "--calib", str(calib_text)])
    assert result.exit_code == 0, result.output
    assert "14 layers: q_proj x2, k_proj x2" in result.output
    again = run(["validate", str(REPO / "recipes" / "w4-rtn.yaml"), "--model", str(out)])
    assert again.exit_code != 0
    assert re.search(r"14 layers .* are stored in a format by the checkpoint the model was loaded from; method 'rtn' "
                     r"takes dense or masked layers: start from the original model instead", again.output)


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split("&&")[-1].strip()
            if line.startswith("compress "):
                commands.append(line)
    return commands


@pytest.mark.parametrize("command", _readme_commands())
def test_readme_commands_run(command: str, monkeypatch) -> None:
    if "../shared" in command and not REF_A.exists():
        pytest.skip(f"needs {SHARED}")
    monkeypatch.chdir(REPO)
    result = run(shlex.split(command)[1:])
    assert result.exit_code == 0, result.output


# -- a calibration method registered in code: the engine's inputs, data errors and runtime failures ------


class ObserveConfig(MethodConfig):
    fail: bool = False


class Observe(Method):
    """Records the mean input norm each targeted layer sees (and can fail on purpose)."""

    name = "test-observe"
    Config = ObserveConfig
    needs = Needs.CALIBRATION
    seen: dict[str, float] = {}

    def compress_block(self, work, config):
        if config.fail:
            raise CalibrationError(f"block {work.name}: Hessian is not positive definite; raise damp")
        norms: dict[str, list[float]] = {}
        with work.observe(work.targets, lambda n, x: norms.setdefault(n, []).append(x.norm().item())):
            work.forward()
        Observe.seen.update({n: sum(v) / len(v) for n, v in norms.items()})


@pytest.fixture
def observe():
    registry.register(Observe)
    Observe.seen = {}
    yield Observe
    registry.unregister(Observe.name)


def test_calibration_method_sees_every_block(observe, tiny_dirs, calib_text, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"calibration: {{dataset: {calib_text}, samples: 4, seq_len: 32}}\nsteps: [{{method: test-observe}}]\n")
    result = run(["apply", str(recipe), "--model", str(tiny_dirs["opt"]), "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert len(observe.seen) == 12 and all(v > 0 for v in observe.seen.values())


@pytest.mark.parametrize("data, message", [
    ("missing.txt", r"calibration\.dataset: data file not found: .*missing\.txt"),
    ("data.csv", r"calibration\.dataset: .*data\.csv: unsupported file kind '\.csv'; use one of \.txt, \.jsonl, \.parquet"),
])
def test_bad_calibration_data(observe, data: str, message: str, tiny_dirs, tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,b\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"calibration: {{dataset: ./{data}}}\nsteps: [{{method: test-observe}}]\n")
    result = run(["apply", str(recipe), "--model", str(tiny_dirs["llama"]), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert re.search(message, result.output), result.output
    assert not (tmp_path / "out").exists()


def test_unreadable_calibration_data(observe, tiny_dirs, tmp_path: Path) -> None:
    data = tmp_path / "binary.txt"
    data.write_bytes(b"\xff\xfe\x00binary")
    out = tmp_path / "out"
    result = run(["apply", "/dev/null", "--model", str(tiny_dirs["llama"])])  # an empty recipe file
    assert result.exit_code == 2 and "a recipe is a mapping of sections" in result.output
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: [{method: test-observe}]\n")
    result = run(["apply", str(recipe), "--model", str(tiny_dirs["llama"]), "--calib", str(data), "--output", str(out)])
    assert result.exit_code == 2
    assert re.search(r"binary\.txt: not UTF-8 text \(invalid start byte at byte 0\); give a text file", result.output)
    assert not out.exists()


def test_too_little_calibration_data(observe, tiny_dirs, tmp_path: Path) -> None:
    data = tmp_path / "short.txt"
    data.write_text("def f(): pass\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"calibration: {{dataset: {data}, samples: 16, seq_len: 64}}\nsteps: [{{method: test-observe}}]\n")
    result = run(["apply", str(recipe), "--model", str(tiny_dirs["llama"]), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert re.search(r"calibration\.dataset: .*short\.txt holds 14 bytes of text; 16 samples of 64 tokens need 1024 "
                     r"tokens", result.output), result.output


def test_runtime_failure_exits_1_and_writes_nothing(observe, tiny_dirs, calib_text, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"calibration: {{dataset: {calib_text}, samples: 2, seq_len: 32}}\n"
                      "steps: [{method: test-observe, args: {fail: true}}]\n")
    result = run(["apply", str(recipe), "--model", str(tiny_dirs["llama"]), "--output", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "error: block model.layers.0: Hessian is not positive definite; raise damp" in result.output
    assert not (tmp_path / "out").exists()


def test_calibration_method_needs_data(observe, tiny_dirs, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: [{method: test-observe}]\n")
    result = run(["validate", str(recipe), "--model", str(tiny_dirs["llama"])])
    assert result.exit_code == 2
    assert "steps[0]: method 'test-observe' needs calibration data; add a calibration: section" in result.output


def test_calibration_packing_is_deterministic(tiny_dirs, calib_text) -> None:
    from compress.calibration.data import calibration_set
    from compress.model import load_tokenizer

    tok = load_tokenizer(str(tiny_dirs["llama"]))
    a = calibration_set(tok, str(calib_text), samples=8, seq_len=64, seed=3)
    b = calibration_set(tok, str(calib_text), samples=8, seq_len=64, seed=3)
    c = calibration_set(tok, str(calib_text), samples=8, seq_len=64, seed=4)
    assert a.input_ids.shape == (8, 64) and torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)


@pytest.mark.parametrize("args, expected", [
    ("{bits: 4, group_size: 128}", r"on CUDA: all of them decode with the cuda-int4-mma kernel"),
    ("{bits: 4, group_size: 64}", r"on CUDA: all of them decode with the triton-int4 kernel \(the CUDA kernel wants "
                                  r"out_features a multiple of 16, in_features of 128 and groups of 128"),
    ("{bits: 2, group_size: 64}", r"on CUDA: all of them fall back to dequantize-then-matmul: 2-bit codes"),
    ("{bits: 4, group_size: 96}", r"on CUDA: all of them fall back to dequantize-then-matmul: groups of 96 .*\n.*"
                                  r"12 layers \(q_proj x2, .*up_proj x2\) have a ragged last group \(128 = 1 x 96 \+ 32\), "
                                  r"stored padded to whole groups\n.*2 layers \(down_proj x2\) have a ragged last group "
                                  r"\(256 = 2 x 96 \+ 64\)"),
    ("{bits: 8, group_size: null}", r"on CUDA: all of them decode with the triton-8bit kernel"),
])
def test_validate_says_which_kernel_each_layer_decodes_with(args: str, expected: str, tiny_dirs, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"steps: [{{method: rtn, args: {args}}}]\n")
    result = run(["validate", str(recipe), "--model", str(tiny_dirs["llama"])])
    assert re.search(expected, result.output), result.output


def _wide_model(tmp_path: Path, **shape) -> Path:
    import json

    config = json.loads((REPO / "recipes" / "models" / "tiny-llama" / "config.json").read_text())
    config.update(head_dim=64, num_attention_heads=shape["hidden_size"] // 64, num_key_value_heads=2, **shape)
    model_dir = tmp_path / "wide"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


@pytest.mark.parametrize("shape, args, expected", [
    # group_size 96 divides a 384-wide model's layers but is no power of two
    ({"hidden_size": 384, "intermediate_size": 768}, "{bits: 4, group_size: 96}",
     [r"on CUDA: all of them fall back to dequantize-then-matmul: groups of 96 \(the kernels take powers of two from "
      r"32 to 1024\)"]),
    # per channel: a row is one group, 256 wide on q..up (a kernel), 768 wide on down_proj (none)
    ({"hidden_size": 256, "intermediate_size": 768}, "{bits: 4, group_size: null}",
     [r"on CUDA: 12 layers \(q_proj x2, .*up_proj x2\) decode with the cuda-int4-mma kernel",
      r"on CUDA: 2 layers \(down_proj x2\) fall back to dequantize-then-matmul: groups of 768"]),
])
def test_validate_says_why_layers_fall_back(shape: dict, args: str, expected: list[str], tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"steps: [{{method: rtn, args: {args}}}]\n")
    result = run(["validate", str(recipe), "--model", str(_wide_model(tmp_path, **shape))])
    assert result.exit_code == 0, result.output
    for pattern in expected:
        assert re.search(pattern, result.output), result.output


def test_an_interrupted_training_run_resumes_only_when_asked(tiny_dirs, calib_text, tmp_path: Path,
                                                             monkeypatch) -> None:
    """A NaN at step 3 stops the run (exit 1) and keeps the step-2 checkpoint; the same command refuses to start
    over on top of it (exit 2) until told --resume, which finishes and clears the work folder."""
    import compress.plugins.distill as distill

    recipe = tmp_path / "distill.yaml"
    recipe.write_text(yaml.safe_dump({"training": {"steps": 4, "seq_len": 32, "batch_size": 2, "save_every": 2,
                                                   "eval_samples": 2},
                                      "steps": [{"method": "distill", "args": {"train": ["norms"]}}]}))
    out = tmp_path / "out"
    args = ["apply", str(recipe), "--model", str(tiny_dirs["llama"]), "--calib", str(calib_text), "--output", str(out)]
    real = distill.distillation_loss

    def nan_at_step_3(*a, **k):
        loss_fn, calls = real(*a, **k), [0]

        def wrapped(model, batch):
            loss, parts = loss_fn(model, batch)
            calls[0] += model.training
            return (loss * float("nan"), parts) if calls[0] == 3 else (loss, parts)

        return wrapped

    monkeypatch.setattr(distill, "distillation_loss", nan_at_step_3)
    failed = run(args)
    assert failed.exit_code == 1 and "the loss became nan at step 3 of 4" in failed.output, failed.output
    work = tmp_path / ".out.work"
    assert (work / "stage-0" / "step-0000002.pt").exists() and not out.exists()
    monkeypatch.setattr(distill, "distillation_loss", real)
    refused = run(args)
    assert refused.exit_code == 2 and "pass --resume to continue" in refused.output, refused.output
    resumed = run(args + ["--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert (out / "config.json").exists() and not work.exists()
