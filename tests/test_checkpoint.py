"""Checkpoints: what they record, atomic writes, refusal to overwrite, clear errors for broken ones."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import compress
from compress.checkpoint import save
from compress.errors import CheckpointError, UsageError
from conftest import REPO, make_tiny


@pytest.fixture
def compressed():
    model = make_tiny("qwen2")
    compress.apply(model, [{"method": "rtn", "args": {"bits": 4, "group_size": 64}}], device="cpu")
    return model


def test_config_records_method_version_scheme_and_recipe(compressed, tmp_path: Path) -> None:
    save(compressed, tmp_path / "ck")
    qc = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compress" and qc["compress_version"] == compress.__version__
    assert qc["steps"] == [{"method": "rtn", "method_version": "1", "layers": 14,
                            "args": {"bits": 4, "group_size": 64, "symmetric": True, "clip_search": False}}]
    assert qc["recipe"]["steps"][0]["method"] == "rtn"
    layer = qc["layers"]["model.layers.1.self_attn.q_proj"]
    assert layer == {"format": "int", "bits": 4, "symmetric": True, "granularity": "group", "group_size": 64,
                     "restricted": False, "method": "rtn", "method_version": "1"}


def test_existing_target_is_refused_then_overwritten(compressed, tmp_path: Path) -> None:
    target = tmp_path / "ck"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(UsageError, match="already exists; pass --overwrite"):
        save(compressed, target)
    assert (target / "precious.txt").read_text() == "keep me"
    save(compressed, target, overwrite=True)
    assert not (target / "precious.txt").exists() and (target / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no partial or old folders left


def test_failure_while_writing_leaves_nothing(compressed, tmp_path: Path) -> None:
    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointError, match="No space left on device; nothing was written there"):
        save(compressed, tmp_path / "ck", tokenizer=BrokenTokenizer())
    assert list(tmp_path.iterdir()) == []


def test_failure_while_overwriting_keeps_the_old_checkpoint(compressed, tmp_path: Path) -> None:
    save(compressed, tmp_path / "ck")
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError(5, "Input/output error")

    with pytest.raises(CheckpointError):
        save(compressed, tmp_path / "ck", tokenizer=BrokenTokenizer(), overwrite=True)
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_killed_writer_leaves_no_checkpoint(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO / 'tests')!r})
        import compress
        from conftest import make_tiny
        model = make_tiny("llama")
        compress.apply(model, [{{"method": "rtn"}}], device="cpu")
        class Slow:
            def save_pretrained(self, path):
                print("writing", flush=True)
                time.sleep(60)
        compress.save(model, {str(tmp_path / 'ck')!r}, tokenizer=Slow())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "ck").exists()
    partial = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert partial  # the killed run's work in progress, out of the way
    model = make_tiny("llama")
    compress.apply(model, [{"method": "rtn"}], device="cpu")
    save(model, tmp_path / "ck")  # the next run cleans up after the killed one
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_broken_config_is_explained(compressed, tmp_path: Path) -> None:
    save(compressed, tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is broken: .*re-create the checkpoint"):
        compress.load(tmp_path / "ck", device="cpu")
    with pytest.raises(UsageError, match="checkpoint not found"):
        compress.load(tmp_path / "missing", device="cpu")


def test_cpu_written_checkpoint_keeps_dtype(tmp_path: Path) -> None:
    model = make_tiny("llama", dtype=torch.bfloat16)
    compress.apply(model, [{"method": "int8"}], device="cpu")
    save(model, tmp_path / "ck")
    loaded = compress.load(tmp_path / "ck", device="cpu")
    layer = loaded.model.layers[0].mlp.up_proj
    assert layer.qweight.dtype == torch.int8 and layer.scales.dtype == torch.bfloat16
