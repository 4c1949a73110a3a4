"""Streaming compression's parts: single tensors read from safetensors shards, blocks materialised from them with
shared weights kept shared, and the output written in Hugging Face's sharded layout that transformers loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.errors import CheckpointError
from compress.streaming import ShardedTensors, ShardWriter, materialize, release
from conftest import REF_A, REFCODE, REPO, make_tiny, needs_shared


def _empty_like(model):
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(model.config, dtype=model.dtype)


def test_sharded_output_loads_and_reads_back_tensor_by_tensor(tmp_path: Path) -> None:
    model = make_tiny("qwen2")  # untied
    writer = ShardWriter(tmp_path, shard_bytes=200_000)  # several shards for a tiny model
    state = model.state_dict()
    for prefix in ("model.layers.0.", "model.layers.1."):
        writer.add({k: v for k, v in state.items() if k.startswith(prefix)})
    writer.add({k: v for k, v in state.items() if not k.startswith("model.layers.")})
    writer.close()
    model.config.save_pretrained(tmp_path)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, value in state.items():
        assert torch.equal(loaded.state_dict()[name], value), name
    tensors = ShardedTensors(tmp_path)
    assert torch.equal(tensors.get("model.layers.1.mlp.down_proj.weight"), state["model.layers.1.mlp.down_proj.weight"])


def test_stored_tensors_are_copied_file_to_file_as_they_lie(tmp_path: Path) -> None:
    """The head and embeddings the output takes unchanged are copied from the checkpoint in chunks, never read whole;
    a file that ends inside the tensor is named."""
    model = make_tiny("qwen2").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    source, out = ShardedTensors(tmp_path / "src"), tmp_path / "out"
    out.mkdir()
    writer = ShardWriter(out, shard_bytes=100_000)
    state = model.state_dict()
    writer.add({"model.norm.weight": state["model.norm.weight"]})
    for key in ("lm_head.weight", "model.embed_tokens.weight"):
        writer.add_stored(key, source, key)
    writer.close()
    copied = ShardedTensors(out)
    for key in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert copied.get(key).dtype == torch.bfloat16 and torch.equal(copied.get(key), state[key]), key
    assert not list(out.glob(".shard-*"))
    path, start, _, _, size = source.stored("lm_head.weight")
    with path.open("r+b") as f:
        f.truncate(start + size // 2)
    with pytest.raises(CheckpointError, match=r"ends inside tensor lm_head.weight: the file is truncated"):
        ShardWriter(out).add_stored("lm_head.weight", source, "lm_head.weight")


def test_materialised_blocks_equal_the_loaded_model_and_tied_weights_stay_tied(tmp_path: Path) -> None:
    model = make_tiny("llama")  # tied embeddings
    model.save_pretrained(tmp_path)
    tensors = ShardedTensors(tmp_path)
    empty = _empty_like(model)
    materialize(empty.model.layers[1], "model.layers.1.", tensors)
    assert not any(p.is_meta for p in empty.model.layers[1].parameters())
    assert all(p.is_meta for p in empty.model.layers[0].parameters())
    for name, p in empty.model.layers[1].named_parameters():
        assert torch.equal(p, model.model.layers[1].get_parameter(name)), name
    materialize(empty, "", tensors)
    empty.tie_weights()
    assert empty.lm_head.weight is empty.model.embed_tokens.weight
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        assert torch.equal(empty(ids).logits, model(ids).logits)
    release(empty.model.layers[0])
    assert all(p.is_meta for p in empty.model.layers[0].parameters())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_an_empty_model_holds_only_its_tied_tensors(arch: str, tmp_path: Path) -> None:
    """Tied embeddings are read at once (they are one tensor for two modules); everything else waits on the meta
    device until the engine needs it."""
    from compress.streaming import empty_model

    model = make_tiny(arch)
    model.save_pretrained(tmp_path)
    empty, _ = empty_model(str(tmp_path), "float32")
    assert all(p.is_meta for p in empty.model.layers.parameters()) and empty.model.norm.weight.is_meta
    if arch == "llama":  # tied
        assert empty.lm_head.weight is empty.model.embed_tokens.weight
        assert torch.equal(empty.model.embed_tokens.weight, model.model.embed_tokens.weight)
    else:
        assert empty.lm_head.weight.is_meta and empty.model.embed_tokens.weight.is_meta


def test_an_untied_models_embeddings_and_head_are_not_in_memory_while_blocks_are_compressed(
        tiny_dirs, calib_text, tmp_path: Path, monkeypatch) -> None:
    """What makes a large vocabulary stream in little memory: the embeddings are read for the capture of the
    blocks' inputs and freed, the head is read only to be written."""
    import compress.streaming

    seen = []
    real = compress.streaming.BlockStream.load

    def load(self, name, block):
        seen.append((name, self.writer.folder.name, [n for n, p in self_model[0].named_parameters()
                                                     if not n.startswith("model.layers.") and not p.is_meta]))
        real(self, name, block)

    self_model = []
    real_empty = compress.streaming.empty_model
    monkeypatch.setattr(compress.streaming.BlockStream, "load", load)
    monkeypatch.setattr("compress.api.empty_model", lambda *a, **k: (lambda r: self_model.append(r[0]) or r)(
        real_empty(*a, **k)))
    recipe = {"model": {"load": "stream"}, "steps": [{"method": "gptq", "args": {"group_size": 64}}]}
    _apply(recipe, tiny_dirs["qwen2"], calib_text, tmp_path / "out")
    assert [name for name, _, _ in seen] == ["model.layers.0", "model.layers.1"]
    assert all(resident == [] for _, _, resident in seen), seen


def _apply(recipe: dict, model_dir: Path, calib: Path, out: Path) -> dict[str, torch.Tensor]:
    import yaml
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from compress_cli import cli

    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(cli, ["apply", str(path), "--model", str(model_dir), "--calib", str(calib),
                                      "--output", str(out)], obj={})
    assert result.exit_code == 0, result.output
    files = sorted(out.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("shipped", ["w4-gptq", "w4-awq-gptq", "int8-absmax"])
def test_streaming_writes_what_compressing_in_memory_writes(arch: str, shipped: str, tiny_dirs, calib_text,
                                                            tmp_path: Path, monkeypatch) -> None:
    import yaml

    import compress.streaming

    read = []
    real = compress.streaming.materialize
    monkeypatch.setattr(compress.streaming, "materialize", lambda module, prefix, *a, **k: read.append(prefix) or
                        real(module, prefix, *a, **k))

    recipe = yaml.safe_load((REPO / "recipes" / f"{shipped}.yaml").read_text())
    recipe["calibration"] = {"dataset": str(calib_text), "samples": 8, "seq_len": 64}
    recipe.setdefault("model", {})
    stored = {}
    for load in ("memory", "stream"):
        recipe["model"]["load"] = load
        stored[load] = _apply(recipe, tiny_dirs[arch], calib_text, tmp_path / load)
        blocks = [prefix for prefix in read if prefix.rstrip(".").rpartition(".")[2].isdigit()]
        assert len(blocks) == len(set(blocks)) == (2 if load == "stream" else 0), read  # each block read once
    assert stored["memory"].keys() == stored["stream"].keys()
    for name, value in stored["memory"].items():
        assert torch.equal(stored["stream"][name], value), name


def test_streaming_a_two_stage_recipe_reads_the_first_stage_back(tiny_dirs, calib_text, tmp_path: Path) -> None:
    """A second stage reads the blocks the first wrote (int8 on attention, then GPTQ on the MLP)."""
    recipe = {"calibration": {"dataset": str(calib_text), "samples": 8, "seq_len": 64},
              "stages": [{"steps": [{"method": "int8", "targets": ["*.self_attn.*"]}]},
                         {"steps": [{"method": "gptq", "args": {"group_size": 64}, "targets": ["*.mlp.*"]}]}]}
    stored = {}
    for load in ("memory", "stream"):
        recipe["model"] = {"load": load}
        stored[load] = _apply(recipe, tiny_dirs["llama"], calib_text, tmp_path / load)
    assert stored["memory"].keys() == stored["stream"].keys()
    assert all(torch.equal(stored["stream"][k], v) for k, v in stored["memory"].items())


def test_streaming_a_head_a_data_free_step_compresses(tiny_dirs, calib_text, tmp_path: Path) -> None:
    """A layer outside the blocks that a step compresses is read for it and written compressed."""
    recipe = {"steps": [{"method": "rtn", "args": {"group_size": 64}, "targets": ["Linear", "lm_head"]}]}
    stored = {}
    for load in ("memory", "stream"):
        recipe["model"] = {"load": load}
        stored[load] = _apply(recipe, tiny_dirs["qwen2"], calib_text, tmp_path / load)
    assert "lm_head.weight" not in stored["stream"] and any(k.startswith("lm_head.") for k in stored["stream"])
    assert stored["memory"].keys() == stored["stream"].keys()
    assert all(torch.equal(stored["stream"][k], v) for k, v in stored["memory"].items())


@needs_shared
def test_streaming_ref_a_equals_compressing_it_in_memory(tmp_path: Path) -> None:
    recipe = {"calibration": {"dataset": str(REFCODE / "calib.txt"), "samples": 8, "seq_len": 256},
              "steps": [{"method": "gptq", "args": {"bits": 4, "group_size": 128, "act_order": True, "mse": True}}]}
    stored = {}
    for load in ("memory", "stream"):
        recipe["model"] = {"load": load}
        stored[load] = _apply(recipe, REF_A, REFCODE / "calib.txt", tmp_path / load)
    assert stored["memory"].keys() == stored["stream"].keys() and len(stored["memory"]) > 100
    assert all(torch.equal(stored["stream"][k], v) for k, v in stored["memory"].items())
