"""Damaged checkpoints are named with what to do, and an interrupted --overwrite never loses the checkpoint
(issue 19).

A truncated ``model.safetensors`` or a ``config.json`` with flipped bytes gave a ``SafetensorError`` /
``UnicodeDecodeError`` traceback and exit 1; now a ``CheckpointError`` names the file and says what to do (exit
2 on the command line). A kill between the two renames of an overwrite left nothing at the output and the old
checkpoint in a hidden ``.NAME.old-PID`` folder for good; now the swap is one atomic exchange where the system
has one, and the next save or load restores or removes what a killed run left.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

import compress
from compress import checkpoint, checkpoint_files
from compress.checkpoint import save
from compress_cli import cli
from compress.errors import CheckpointError, UsageError
from conftest import REPO, make_tiny

REMEDY = r"; re-create the checkpoint \(compress apply with --overwrite\) or copy / download it again$"


def compressed_model():
    model = make_tiny("qwen2")
    compress.apply(model, [{"method": "rtn", "args": {"bits": 4, "group_size": 64}}], device="cpu")
    return model


@pytest.fixture(scope="module")
def model():
    return compressed_model()


@pytest.fixture(scope="module")
def intact(model, tmp_path_factory) -> Path:
    return save(model, tmp_path_factory.mktemp("intact") / "ck")


@pytest.fixture
def ck(intact, tmp_path: Path) -> Path:
    """A fresh copy of the intact checkpoint to damage."""
    return Path(shutil.copytree(intact, tmp_path / "ck"))


def flip_bytes(file: Path, count: int = 20, seed: int = 0, start: int = 0, end: int | None = None) -> None:
    data = bytearray(file.read_bytes())
    for i in random.Random(seed).sample(range(start, len(data) if end is None else end), count):
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))


def header_length(file: Path) -> int:
    return int.from_bytes(file.read_bytes()[:8], "little")


def run(args: list[str]):
    return CliRunner().invoke(cli, args, obj={})


# -- damaged files ------------------------------------------------------------------------------------------


def _truncate_half(f: Path) -> None:
    os.truncate(f, f.stat().st_size // 2)


def _truncate_in_header(f: Path) -> None:
    os.truncate(f, 100)


def _truncate_to_4(f: Path) -> None:
    os.truncate(f, 4)


def _append(f: Path) -> None:
    with f.open("ab") as out:
        out.write(b"\0" * 16)


def _garbage_length(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[:8] = b"\xde\xad\xbe\xef\xde\xad\xbe\xef"
    f.write_bytes(bytes(data))


def _flip_header(f: Path) -> None:
    flip_bytes(f, count=20, start=8, end=8 + header_length(f))


def _bad_offsets(f: Path) -> None:  # valid JSON, but a tensor's byte range ends before it starts
    data, n = f.read_bytes(), header_length(f)
    header = json.loads(data[8:8 + n])
    header[next(name for name in header if name != "__metadata__")]["data_offsets"] = [10, 5]
    raw = json.dumps(header).encode()
    f.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


SIZES = r"it is (\d+) bytes long but its header describes (\d+) bytes"


@pytest.mark.parametrize("damage, what", [
    pytest.param(_truncate_half, SIZES + r" \(truncated: an interrupted copy or download\?\)", id="truncated"),
    pytest.param(_truncate_in_header, r"its header length field says \d+ bytes but only 92 bytes follow \(truncated, "
                 r"or not a safetensors file\)", id="truncated-in-header"),
    pytest.param(_truncate_to_4, r"it is 4 bytes long, too short for the 8-byte header length of a safetensors file",
                 id="4-bytes"),
    pytest.param(_append, r"it is (\d+) bytes long but its header describes only (\d+) bytes \(bytes added after "
                 r"the tensor data\)", id="bytes-appended"),
    pytest.param(_garbage_length, r"its header length field says 17275436393656397278 bytes but only \d+ bytes "
                 r"follow \(truncated, or not a safetensors file\)", id="garbage-length"),
    pytest.param(_flip_header, r"its header is not valid JSON \(.+\)", id="flipped-header"),
    pytest.param(_bad_offsets, r"its header gives tensor '[\w.]+' no valid data_offsets \(two byte offsets, start "
                 r"<= end\)", id="bad-offsets"),
])
def test_a_damaged_safetensors_file_is_named_with_what_to_do(intact: Path, ck: Path, damage, what: str) -> None:
    damage(ck / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        compress.load(ck, device="cpu")
    message = str(info.value)
    assert re.fullmatch(re.escape(f"checkpoint file {ck / 'model.safetensors'} is damaged: ") + what + REMEDY,
                        message), message
    sizes = re.search(r"it is (\d+) bytes long but its header describes (?:only )?(\d+) bytes", message)
    if sizes:  # the file's real size, and what its header adds up to: the intact file's size
        assert int(sizes[1]) == (ck / "model.safetensors").stat().st_size
        assert int(sizes[2]) == (intact / "model.safetensors").stat().st_size


def test_config_json_with_flipped_bytes_is_named(ck: Path) -> None:
    flip_bytes(ck / "config.json")  # seed 0: not UTF-8 any more (the UnicodeDecodeError)
    with pytest.raises(CheckpointError, match=re.escape(f"{ck / 'config.json'} is broken: it is not UTF-8 text (")
                       + r"'utf-8' codec can't decode byte 0x[0-9a-f]{2} in position \d+: .+\)" + REMEDY):
        compress.load(ck, device="cpu")


@pytest.mark.parametrize("text, what", [
    ("[1, 2]", "it holds a JSON array, not an object"),
    ('{"model_type": "qwen2", "quantization_config": 3}', "its quantization_config is a number, not an object"),
], ids=["array", "number"])
def test_config_json_of_the_wrong_shape_is_named(ck: Path, text: str, what: str) -> None:
    (ck / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=re.escape(f"{ck / 'config.json'} is broken: {what}") + REMEDY):
        checkpoint_files.read_quantization_config(ck)


@pytest.fixture
def sharded(model, intact, tmp_path: Path) -> Path:
    """The same checkpoint in Hugging Face's sharded layout: an index and three shards (``intact``: saving it set the
    model's quantization_config)."""
    path = tmp_path / "sharded"
    model.save_pretrained(path, max_shard_size="200KB")
    assert len(list(path.glob("model-*-of-*.safetensors"))) == 3
    return path


def test_an_intact_sharded_checkpoint_loads(sharded: Path) -> None:
    loaded = compress.load(sharded, device="cpu")
    assert loaded.config.quantization_config.layers


def test_a_truncated_shard_is_named(sharded: Path) -> None:
    shard = sharded / "model-00002-of-00003.safetensors"
    _truncate_half(shard)
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint file {shard} is damaged: ") + SIZES):
        compress.load(sharded, device="cpu")


@pytest.mark.parametrize("damage, what", [
    (lambda index: flip_bytes(index), r"it is not UTF-8 text \(.+\)|it is not valid JSON \(.+\)"),
    (lambda index: index.write_text('{"metadata": {}}'), r"it has no weight_map table \(tensor name -> shard file\)"),
    (lambda index: index.write_text(index.read_text().replace("model-00003-of-00003", "model-00004-of-00003")),
     r"it names shards that are not in the folder: model-00004-of-00003\.safetensors"),
], ids=["flipped-bytes", "no-weight-map", "missing-shard"])
def test_a_broken_index_is_named(sharded: Path, damage, what: str) -> None:
    index = sharded / "model.safetensors.index.json"
    damage(index)
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint file {index} is broken: ") + f"(?:{what})"
                       + REMEDY):
        compress.load(sharded, device="cpu")


@pytest.mark.parametrize("damage, what", [
    (lambda ck: _truncate_half(ck / "model.safetensors"), r"model\.safetensors is damaged: " + SIZES),
    (lambda ck: flip_bytes(ck / "config.json"), r"config\.json is broken: it is not UTF-8 text"),
], ids=["truncated-weights", "flipped-config"])
def test_eval_of_a_damaged_checkpoint_exits_2_with_one_block(ck: Path, damage, what: str) -> None:
    damage(ck)
    result = run(["eval", str(ck), "--tasks", "memory"])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # a CompressError, printed; not an exception escaping
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and re.search(what + ".*" + REMEDY, lines[0]), result.output


# -- an interrupted --overwrite ----------------------------------------------------------------------------


def dead_pid() -> int:
    """The id of a process that has surely ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def marked(model, path: Path, mark: str) -> Path:
    """A checkpoint at ``path`` with a file saying which one it is."""
    save(model, path)
    (path / "which.txt").write_text(mark)
    return path


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def killed_between_the_renames(model, tmp_path: Path) -> tuple[Path, int]:
    """What a run killed between 'old target -> .ck.old-PID' and 'partial -> target' left: no target, the old
    checkpoint hidden, the new one complete in its partial folder."""
    target, pid = tmp_path / "ck", dead_pid()
    marked(model, target, "old").rename(tmp_path / f".ck.old-{pid}")
    marked(model, tmp_path / "new", "new").rename(tmp_path / f".ck.partial-{pid}")
    return target, pid


def test_load_restores_the_old_checkpoint_after_a_kill_between_the_renames(model, tmp_path: Path, caplog) -> None:
    target, pid = killed_between_the_renames(model, tmp_path)
    caplog.set_level(logging.INFO, logger="compress.checkpoint")
    loaded = compress.load(target, device="cpu")
    assert loaded.config.quantization_config.layers
    assert (target / "which.txt").read_text() == "old" and names(tmp_path) == ["ck"]
    assert re.search(rf"restored {re.escape(str(target))} from \.ck\.old-{pid}: an overwrite by process {pid} was "
                     r"killed before the new checkpoint was in place", caplog.text), caplog.text
    assert re.search(rf"removed \.ck\.partial-{pid}, left by process {pid}, which ended while writing", caplog.text)


def test_eval_restores_the_old_checkpoint_after_a_kill_between_the_renames(model, tmp_path: Path) -> None:
    target, _ = killed_between_the_renames(model, tmp_path)
    result = run(["eval", str(target), "--tasks", "memory", "--device", "cpu"])
    assert result.exit_code == 0, result.output  # before: "model path not found"
    assert (target / "which.txt").read_text() == "old" and names(tmp_path) == ["ck"]


def test_save_restores_the_old_checkpoint_before_deciding(model, tmp_path: Path, caplog) -> None:
    target, pid = killed_between_the_renames(model, tmp_path)
    caplog.set_level(logging.INFO, logger="compress.checkpoint")
    with pytest.raises(UsageError, match="already exists; pass --overwrite"):
        save(model, target)  # the old checkpoint is back at the output, so this is a save over it
    assert (target / "which.txt").read_text() == "old" and names(tmp_path) == ["ck"]
    assert "restored" in caplog.text
    save(model, target, overwrite=True)
    assert not (target / "which.txt").exists() and names(tmp_path) == ["ck"]


def test_the_old_checkpoint_is_removed_after_a_kill_following_the_swap(model, tmp_path: Path, caplog) -> None:
    target, pid = tmp_path / "ck", dead_pid()
    marked(model, target, "new")
    marked(model, tmp_path / "old", "old").rename(tmp_path / f".ck.old-{pid}")
    caplog.set_level(logging.INFO, logger="compress.checkpoint")
    compress.load(target, device="cpu")
    assert (target / "which.txt").read_text() == "new" and names(tmp_path) == ["ck"]
    assert re.search(rf"removed \.ck\.old-{pid}, the checkpoint {re.escape(str(target))} held before an overwrite "
                     rf"by process {pid}, killed after the new one was in place", caplog.text), caplog.text
    marked(model, tmp_path / "old", "old").rename(tmp_path / f".ck.old-{pid}")
    save(model, target, overwrite=True)  # the next save cleans up the same way
    assert names(tmp_path) == ["ck"]


def test_a_running_overwrite_is_left_alone(model, tmp_path: Path) -> None:
    live = os.getppid()  # the process that started this one: alive
    target = tmp_path / "ck"
    marked(model, tmp_path / "old", "old").rename(tmp_path / f".ck.old-{live}")
    with pytest.raises(UsageError, match="checkpoint not found"):
        compress.load(target, device="cpu")
    assert names(tmp_path) == [f".ck.old-{live}"]


def test_overwrite_swaps_in_one_step_where_the_system_can(model, tmp_path: Path, monkeypatch) -> None:
    """Where rename can exchange two folders (Linux), the output is never missing, not even for an instant."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir(), (a / "from-a").touch()
    if not checkpoint._exchange(a, b):
        pytest.skip("this system cannot exchange two folders in one rename (renameat2 RENAME_EXCHANGE)")
    assert names(b) == ["from-a"] and names(a) == []
    target = marked(model, tmp_path / "ck", "old")
    renamed = []
    real = Path.rename
    monkeypatch.setattr(Path, "rename", lambda self, to: renamed.append(self) or real(self, to))
    save(model, target, overwrite=True)
    assert target not in renamed and not (target / "which.txt").exists()
    assert names(tmp_path) == ["a", "b", "ck"]


def test_overwrite_without_an_exchange_still_cleans_up(model, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
    target = marked(model, tmp_path / "ck", "old")
    save(model, target, overwrite=True)
    assert not (target / "which.txt").exists() and names(tmp_path) == ["ck"]


def test_a_real_kill_between_the_renames_is_recovered(tmp_path: Path) -> None:
    """Without an atomic exchange (some file systems), a run killed between its two renames: the next load has the
    old checkpoint back."""
    target = tmp_path / "ck"
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(REPO / 'tests')!r})
        import compress
        from compress import checkpoint
        from conftest import make_tiny
        model = make_tiny("llama")
        compress.apply(model, [{{"method": "rtn"}}], device="cpu")
        compress.save(model, {str(target)!r})
        Path({str(target / 'which.txt')!r}).write_text("old")
        checkpoint._exchange = lambda a, b: False
        real = Path.rename
        def rename(self, to):
            if ".partial-" in self.name:
                print("between", flush=True)
                time.sleep(60)
            return real(self, to)
        Path.rename = rename
        compress.save(model, {str(target)!r}, overwrite=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "between"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert names(tmp_path) == [f".ck.old-{proc.pid}", f".ck.partial-{proc.pid}"]  # the state the issue found
    compress.load(target, device="cpu")
    assert (target / "which.txt").read_text() == "old" and names(tmp_path) == ["ck"]
