"""Streaming compression's parts: single tensors read from safetensors shards, blocks materialised from them with
shared weights kept shared, and the output written in Hugging Face's sharded layout that transformers loads."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from compress.streaming import ShardedTensors, ShardWriter, materialize, release
from conftest import make_tiny


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
