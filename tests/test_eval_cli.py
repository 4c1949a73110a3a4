"""`compress eval` end to end on tiny models, a recipe's eval: section after `compress apply`, and bad inputs
failing with exit code 2 and a message that says what to do."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import compress
from compress_cli import cli
from compress.model import load_tokenizer
from conftest import REPO

FAST = ["--seq-len", "32", "--max-tokens", "256"]


def run(args: list[str]):
    return CliRunner().invoke(cli, args, obj={})


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval-data") / "readme.txt"
    path.write_text((REPO / "README.md").read_text())
    return path


@pytest.fixture(scope="module")
def checkpoint(tiny_dirs, tmp_path_factory) -> Path:
    """The tiny qwen2 model, 4-bit RTN, saved as a compress checkpoint with its tokenizer."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["qwen2"])
    compress.apply(model, [{"method": "rtn", "args": {"bits": 4, "group_size": 64}}], device="cpu")
    path = tmp_path_factory.mktemp("ck") / "qwen2-w4"
    compress.save(model, path, tokenizer=load_tokenizer(str(tiny_dirs["qwen2"])))
    return path


def test_eval_fuses_every_model_unless_told_not_to(checkpoint, tiny_dirs, text, tmp_path, monkeypatch) -> None:
    """The checkpoint and the baseline both run with q/k/v and gate/up fused, or neither (--no-fuse), with the
    same perplexities either way."""
    from compress.runtime import fusion

    groups = []
    real = fusion.fuse_projections
    monkeypatch.setattr(fusion, "fuse_projections", lambda model: groups.append(real(model)) or groups[-1])
    layers = compress.load(checkpoint).config.num_hidden_layers
    reports = {}
    for flag, fused_groups in ((), [2 * layers] * 2), (("--no-fuse",), []):
        groups.clear()
        out = tmp_path / f"{len(flag)}.json"
        result = run(["eval", str(checkpoint), "--baseline", str(tiny_dirs["qwen2"]), "--data", str(text), *FAST,
                      "--tasks", "ppl", "--json", str(out), *flag])
        assert result.exit_code == 0, result.output
        assert groups == fused_groups  # model and baseline: q/k/v and gate/up in every layer, or nothing
        reports[flag] = json.loads(out.read_text())
    assert reports[()]["perplexity"] == pytest.approx(reports[("--no-fuse",)]["perplexity"], rel=1e-4)
    assert reports[()]["baseline"]["perplexity"] == pytest.approx(
        reports[("--no-fuse",)]["baseline"]["perplexity"], rel=1e-4)


def test_eval_against_a_baseline_writes_every_report(checkpoint, tiny_dirs, text, tmp_path: Path) -> None:
    out, report_dir = tmp_path / "run.json", tmp_path / "reports"
    result = run(["eval", str(checkpoint), "--baseline", str(tiny_dirs["qwen2"]), "--data", str(text), *FAST,
                  "--tasks", "ppl,kl,memory", "--json", str(out), "--output", str(report_dir)])
    assert result.exit_code == 0, result.output
    assert re.search(r"perplexity [\d.]+ vs [\d.]+ for the baseline \([+-][\d.]+%\) \[readme\.txt, 32-token windows",
                     result.output)
    assert re.search(r"mean KL vs baseline [\d.]+ nats, top-1 agreement [\d.]+% over 248 tokens", result.output)
    assert re.search(r"linear layers stored as: int x14 \(0\.1\d\dx dense\), dense x1 \(1\.000x dense\)", result.output)  # two blocks of 7, q/k/v and gate/up fused: each layer counted once
    report = json.loads(out.read_text())
    assert isinstance(report["perplexity"], float) and isinstance(report["baseline"]["perplexity"], float)
    assert report["models"]["baseline"]["ref"] == str(tiny_dirs["qwen2"])
    memory = report["memory"]
    assert memory["model"]["checkpoint_bytes"] < memory["baseline"]["checkpoint_bytes"]
    assert memory["model"]["tensor_bytes_by_dtype"]["uint8"] > 0
    assert set(memory["model"]["layouts"]) == {"int", "dense"} and set(memory["baseline"]["layouts"]) == {"dense"}
    assert {p.name for p in report_dir.iterdir()} >= {"report.json", "report.md", "report.html"}
    layouts = (report_dir / "report.md").read_text().split("| vs dense |")[1]
    assert re.search(r"\| \S+ \| int \| 14 \| 0% \| [\d.]+ \| 0\.1\d\dx \|", layouts)  # 4 bits and group scales
    assert re.search(r"\| \S+ \(baseline\) \| dense \| 15 \| 0% \| [\d.]+ \| 1\.000x \|", layouts)


def test_recipe_eval_section_runs_after_apply(tiny_dirs, text, tmp_path: Path) -> None:
    recipe = tmp_path / "w4-eval.yaml"
    recipe.write_text(f"model: {{path: {tiny_dirs['qwen2']}}}\n"
                      "steps: [{method: rtn, args: {bits: 4, group_size: 64}}]\n"
                      f"eval: {{data: {text}, seq_len: 32, max_tokens: 256, tasks: [ppl, kl, samples], "
                      "max_new_tokens: 4, output: ./eval-out}\n")
    result = run(["apply", str(recipe), "--output", str(tmp_path / "ck")])
    assert result.exit_code == 0, result.output
    assert re.search(r"greedy tokens identical to the baseline's: [\d.]+%", result.output)
    assert "eval report: " in result.output
    report = json.loads((tmp_path / "eval-out" / "report.json").read_text())  # output: relative to the recipe
    assert report["baseline"]["ref"] == str(tiny_dirs["qwen2"]) and report["models"]["model"]["label"] == "ck"
    assert (tmp_path / "eval-out" / "report.html").exists()


def test_a_user_draft_model_drafts_losslessly(checkpoint, tiny_dirs, text) -> None:
    from compress.eval.runner import eval_spec, evaluate

    spec = eval_spec({"tasks": ["speculative"], "data": str(text),
                      "speculative": {"draft": str(checkpoint), "prompts": 2, "new_tokens": 16}})
    report = evaluate(str(tiny_dirs["qwen2"]), spec, device="cpu", progress=False)
    (target,) = report["speculative"]["targets"]  # no baseline: the evaluated model is the only target
    assert [r["method"] for r in target["rows"]][:2] == ["qwen2-w4 drafting (compress loop, 4 tokens)",
                                                         "qwen2-w4 drafting (transformers assistant_model)"]
    assert all(r["identical"] for r in target["rows"]) and target["rows"][0]["accepted"] > 0


@pytest.fixture
def broken_checkpoint(checkpoint, tmp_path: Path) -> Path:
    import shutil

    path = tmp_path / "broken"
    shutil.copytree(checkpoint, path)
    (path / "config.json").write_text('{"model_type": "qwen2", ')
    return path


@pytest.mark.parametrize("case, args, message", [
    ("missing data", ["--data", "{tmp}/missing.txt"],
     r"error: evaluation data file not found: .*missing\.txt; give a text file, a \.jsonl/\.parquet file, or a "
     r"datasets id"),
    ("window too long", ["--seq-len", "4096"],
     r"error: seq_len 4096 is larger than the context of qwen2-w4 \(256 tokens\); use --seq-len 256 or less"),
    ("speed too long", ["--tasks", "speed", "--new-tokens", "300"],
     r"error: speed: --prompt-len \+ --new-tokens = 428 exceeds the context of qwen2-w4 \(256 tokens\); lower them"),
    ("unknown task", ["--tasks", "ppl,perplexity"], r"error: invalid options: --tasks\[1\]: input should be 'ppl'"),
    ("kl alone", ["--tasks", "kl", "--data", "{text}"],
     r"error: the kl task compares against the original model: pass --baseline MODEL_OR_DIR"),
    ("missing prompts", ["--tasks", "samples", "--prompts", "{tmp}/prompts.txt"],
     r"error: prompts file not found: .*prompts\.txt; give a text file with one prompt a line"),
])
def test_bad_inputs_exit_2_with_a_clear_message(case: str, args: list[str], message: str, checkpoint, text,
                                                 tmp_path: Path) -> None:
    args = [a.format(tmp=tmp_path, text=text) for a in args]
    result = run(["eval", str(checkpoint), *args])
    assert result.exit_code == 2, result.output
    assert re.search(message, result.output), result.output


def test_a_checkpoint_with_a_broken_config_is_named(broken_checkpoint) -> None:
    result = run(["eval", str(broken_checkpoint), "--tasks", "memory"])
    assert result.exit_code == 2
    assert re.search(r"error: .*broken/config\.json is broken: .*; re-create the checkpoint", result.output)


def test_a_missing_model_is_named(tmp_path: Path) -> None:
    result = run(["eval", str(tmp_path / "nowhere"), "--tasks", "memory"])
    assert result.exit_code == 2
    assert re.search(r"error: model path not found: .*nowhere; give a local model directory or a Hub id", result.output)


# -- the default evaluation text offline (issue 19, finding 11: 27 s of retries before the error) -------------


NOT_CACHED = (r"error: the default evaluation text, Salesforce/wikitext:wikitext-2-raw-v1:test \(WikiText-2 raw test\), "
              r"is not in the local cache and cannot be downloaded \({why}\); pass the evaluation text as a file: "
              r"--data FILE \(for the standard protocol, wikitext-2-raw/wiki\.test\.raw\)")


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch):
    """Caches with nothing in them (a machine that has WikiText cached would load it), offline mode unset."""
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)


def _timed_eval(model: Path):
    start = time.perf_counter()
    result = run(["eval", str(model), "--tasks", "ppl"])
    return result, time.perf_counter() - start


def test_without_data_in_offline_mode_fails_at_once(empty_hub_cache, tiny_dirs, monkeypatch) -> None:
    attempts = []

    def connect(address, *args, **kwargs):
        attempts.append(address)
        raise OSError(101, "Network is unreachable")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", connect)
    result, seconds = _timed_eval(tiny_dirs["qwen2"])
    assert result.exit_code == 2, result.output
    assert attempts == []  # offline mode is set: no connection is even tried
    assert re.search(NOT_CACHED.format(why="HF_HUB_OFFLINE is set"), result.output), result.output
    assert seconds < 8


@pytest.mark.parametrize("network", ["unreachable", "silent"])
def test_without_data_and_no_route_to_the_hub_fails_at_once(network: str, empty_hub_cache, tiny_dirs,
                                                            monkeypatch) -> None:
    """No route (the connection fails at once) or a silent one (it never answers, name lookup included): the
    Hub is given a couple of seconds, not 27 s of retries."""
    released = threading.Event()

    def connect(address, timeout=None, *args, **kwargs):
        if network == "silent":
            released.wait(30)
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", connect)
    try:
        result, seconds = _timed_eval(tiny_dirs["qwen2"])
    finally:
        released.set()
    assert result.exit_code == 2, result.output
    why = "no connection to huggingface.co within 2 s" if network == "silent" else \
        r"cannot connect to huggingface.co: \[Errno 101\] Network is unreachable"
    assert re.search(NOT_CACHED.format(why=why), result.output), result.output
    assert seconds < 8


def test_an_unknown_device_exits_2_before_anything_loads(tmp_path: Path) -> None:
    """The device is checked first: the model here does not even exist, and the device is what is named."""
    result = run(["eval", str(tmp_path / "nowhere"), "--tasks", "memory", "--device", "tpu"])
    assert result.exit_code == 2, result.output
    assert re.search(r"^error: unknown device 'tpu'; use auto, cpu, cuda or cuda:N", result.output), result.output


def test_calibration_from_the_hub_offline_fails_at_once(empty_hub_cache, tiny_dirs, tmp_path: Path, monkeypatch) -> None:
    """compress apply --calib DATASET_ID takes the same path: offline, the cache only, and a clear error at once."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("offline mode: no connection"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("calibration: {dataset: someone/code-corpus, samples: 4, seq_len: 32}\n"
                      "steps: [{method: gptq, args: {group_size: 64}}]\n")
    start = time.perf_counter()
    result = run(["apply", str(recipe), "--model", str(tiny_dirs["llama"]), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert re.search(r"error: dataset 'someone/code-corpus' \(config None, split 'train'\) is not in the local cache "
                     r"and cannot be downloaded \(HF_HUB_OFFLINE is set\); use a local \.txt/\.jsonl/\.parquet file",
                     result.output), result.output
    assert time.perf_counter() - start < 8 and not (tmp_path / "out").exists()
