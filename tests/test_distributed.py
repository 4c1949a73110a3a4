"""`compress apply` under `accelerate launch` with two processes on the CPU (gloo): a training stage gives the
weights of one process with the same global batch, only the main process writes and reports, and a NaN or a crash
in one process leaves no output. Each process picks its own GPU from the launcher's environment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import compress
from compress import distributed
from compress.formats.corrected import CorrectedLinear
from compress.formats.sparse import Sparse24Linear
from compress.model import resolve_device
from conftest import make_tiny
from test_cli import run

# One step's batch: BATCH windows in one process, or BATCH / 2 in each of two.
BATCH = 4
TRAINING = {"steps": 4, "lr": 1e-3, "warmup": 0.0, "eval_samples": 2, "seq_len": 32, "seed": 0}

# Runs the command line in each launched process; process 1 breaks its third loss on purpose when told to.
BREAKING = """
import os, sys
import compress.trainer as trainer
import compress_cli

mode, original = os.environ.get("BREAK"), trainer.fit

def fit(context, loss_fn, *args, **kwargs):
    calls = [0]

    def loss(model, batch):
        value, parts = loss_fn(model, batch)
        calls[0] += 1
        if os.environ["RANK"] == "1" and calls[0] == 3:
            if mode == "nan":
                value = value * float("nan")
            elif mode == "crash":
                raise RuntimeError("process 1 failed on purpose")
        return value, parts

    return original(context, loss, *args, **kwargs)

trainer.fit = fit
sys.argv = ["compress"] + sys.argv[1:]
compress_cli.main()
"""


# A one-shot stage, then a training stage: distillation of a 2:4 model, or LoRA on a GPTQ 4-bit one (QLoRA's path
# with the stored layers kept as the base, which runs on the CPU).
STAGES = {
    "distill": [{"steps": [{"method": "magnitude", "args": {"structure": "2:4"}}]},
                {"steps": [{"method": "distill"}]}],
    "lora": [{"steps": [{"method": "gptq", "args": {"bits": 4, "group_size": 32}}]},
             {"steps": [{"method": "qlora", "args": {"base": "keep", "save": "beside", "r": 4, "alpha": 8,
                                                     "dropout": 0.0}}]}],
}


def _recipe(tmp_path: Path, model: Path, calib: Path, batch: int, kind: str = "distill") -> Path:
    path = tmp_path / f"{kind}-batch-{batch}.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"path": str(model), "device": "cpu"},
        "calibration": {"dataset": str(calib), "samples": 8, "seq_len": 32},
        "training": {**TRAINING, "batch_size": batch, "dataset": str(calib)},
        "stages": STAGES[kind]}))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path, recipe: Path, output: Path, brk: str = "") -> subprocess.CompletedProcess:
    script = tmp_path / "launched.py"
    script.write_text(BREAKING)
    env = {**os.environ, "BREAK": brk, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(script), "apply", str(recipe), "--output", str(output)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("kind, trained, layer", [
    ("distill", "model.layers.0.input_layernorm.weight", Sparse24Linear),
    ("lora", "model.layers.0.mlp.down_proj.B", CorrectedLinear),  # the adapter kept beside the 4-bit layer
])
def test_two_processes_train_as_one_with_the_same_global_batch(kind: str, trained: str, layer: type, tiny_dirs,
                                                               calib_text, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process: GPTQ's sums in the same order, so the same codes
    try:
        alone = run(["apply", str(_recipe(tmp_path, tiny_dirs["llama"], calib_text, BATCH, kind)), "--output", str(one)])
    finally:
        torch.set_num_threads(threads)
    assert alone.exit_code == 0, alone.output
    launched = _launch(tmp_path, _recipe(tmp_path, tiny_dirs["llama"], calib_text, BATCH // 2, kind), two)
    assert launched.returncode == 0, launched.stderr[-3000:]
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert set(a) == set(b)  # the same layout, loaded by one process
    assert isinstance(compress.load(two, device="cpu").model.layers[0].mlp.down_proj, layer)
    for name in a:  # the same windows, gradients averaged over the processes: equal up to the sum's order
        apart = ((b[name].float() - a[name].float()).abs() > 2e-6).float().mean().item()
        # Adam's first steps move an element by about lr whatever its gradient's size, so an element whose gradient
        # is near zero may land elsewhere when the sum's order changes; processes that did not average their
        # gradients would leave most trained elements apart
        assert apart <= 0.01, f"{name}: {apart:.1%} of the elements differ by more than 2e-6"
    if kind == "distill":  # it did train: a norm moved, or the adapter's B (zeros at the start) did
        start = load_file(tiny_dirs["llama"] / "model.safetensors")[trained]
        assert not torch.equal(b[trained], start)
    else:
        assert b[trained].abs().max() > 0
    # the main process alone writes and reports
    assert launched.stdout.count(f"wrote {two}") == 1, launched.stdout
    assert launched.stderr.count("before training") == launched.stderr.count("after 4 steps") == 1, launched.stderr
    assert _leftovers(tmp_path) == [], _leftovers(tmp_path)


@pytest.mark.parametrize("brk, message", [
    ("nan", "the loss became nan at step 2 of 4"),  # every process sees the mean loss and stops with the message
    ("crash", "process 1 failed on purpose"),  # the launcher stops the others
])
def test_a_failure_in_one_process_leaves_no_output(brk: str, message: str, tiny_dirs, calib_text,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "out"
    launched = _launch(tmp_path, _recipe(tmp_path, tiny_dirs["llama"], calib_text, BATCH // 2), out, brk)
    assert launched.returncode != 0
    assert message in launched.stderr, launched.stderr[-3000:]
    assert not out.exists()
    assert [name for name in _leftovers(tmp_path) if not name.endswith(".work")] == []


def test_each_process_takes_its_own_gpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("cuda") == resolve_device("auto") == "cuda:2"
    assert resolve_device("cuda:0") == "cuda:0"  # a named GPU stays named
    assert resolve_device("cpu") == "cpu"
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device("cuda") == "cuda"


def test_only_the_main_process_saves(monkeypatch, tmp_path: Path) -> None:
    model = make_tiny("llama")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert not distributed.is_main()
    assert compress.save(model, tmp_path / "out") == tmp_path / "out"
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("RANK", "0")
    compress.save(model, tmp_path / "out")
    assert (tmp_path / "out" / "config.json").exists()
