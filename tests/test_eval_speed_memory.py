"""The speed benchmark's structure (never its timings: they depend on the machine), that its cache
configurations produce the same tokens, mixed-request throughput counting, and the memory accounting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from transformers import StaticCache

import compress
from compress.eval import memory, speed, throughput
from compress.formats import CompressedLinear
from compress.eval.spec import SpeedSpec
from conftest import make_tiny


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama")


def test_cache_configurations_generate_the_same_tokens(model) -> None:
    ids = speed.random_prompts(model, 2, 8)
    outs = {c: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              pad_token_id=0, **speed.config_kwargs(c))
            for c in ("no-cache", "dynamic", "static")}
    assert torch.equal(outs["no-cache"], outs["dynamic"]) and torch.equal(outs["dynamic"], outs["static"])


def test_speed_table_rows(model) -> None:
    spec = SpeedSpec(batch_sizes=[1, 2], configs=["no-cache", "dynamic", "static", "static-compile", "compiled-step",
                                                  "compiled-verify"],
                     prompt_len=8, new_tokens=6, no_cache_new_tokens=4, warmup=1, repeats=2)
    rows = speed.speed_table(model, spec, progress=False)
    assert [(r["config"], r["batch"]) for r in rows] == [(c, b) for c in spec.configs for b in (1, 2)]
    timed = [r for r in rows if "skipped" not in r]
    assert [r["config"] for r in rows if "skipped" in r] == [c for c in speed.COMPILED for _ in (1, 2)]  # CUDA only
    for r in timed:
        assert r["new_tokens"] == (4 if r["config"] == "no-cache" else 6)
        assert r["decode_tok_s"] == pytest.approx(r["batch"] * (r["new_tokens"] - 1) / r["decode_s"])
        assert r["prefill_tok_s"] == pytest.approx(r["batch"] * 8 / r["prefill_s"])
        assert r["peak_gpu_bytes"] is None


@torch.no_grad()
def test_verify_step_returns_the_greedy_token_after_every_draft_position(model) -> None:
    # compiled-verify's step, eager: after a prefill into the static cache, a draft of 4 tokens gives the
    # greedy next token at each of its positions, as one forward over prompt + draft (no cache) does
    prompt, draft = speed.random_prompts(model, 2, 6), speed.random_prompts(model, 2, 4, seed=1)
    cache = StaticCache(config=model.config, max_cache_len=16)
    positions = torch.arange(16)
    prefill, _ = speed.decode_step(model, cache, mode=None)
    verify, _ = speed.decode_step(model, cache, mode=None, keep=4)
    first = prefill(prompt, positions[:6])
    tokens = verify(draft, positions[6:10])
    full = model(torch.cat([prompt, draft], dim=1), use_cache=False).logits
    assert torch.equal(first, full[:, 5:6].argmax(-1))
    assert tokens.shape == (2, 4) and torch.equal(tokens, full[:, 6:10].argmax(-1))


def test_step_clock_marks_every_step(model) -> None:
    clock = speed.StepClock(torch.device("cpu"))
    clock.start()
    model.generate(speed.random_prompts(model, 1, 5), max_new_tokens=7, min_new_tokens=7, do_sample=False,
                   pad_token_id=0, logits_processor=[clock])
    assert len(clock.marks) == 1 + 7
    assert 0 < clock.seconds(0, 1) and 0 < clock.seconds(1, -1)


def test_mixed_requests_static_batching_counts_requested_tokens(model) -> None:
    spec = SpeedSpec(prompt_len=8, new_tokens=10, mixed_requests=5, mixed_batch_size=2, repeats=1, continuous=False)
    requests = throughput.mixed_requests(512, spec)
    assert len(requests) == 5 and all(8 <= len(r.prompt) <= 16 and 8 <= r.new_tokens <= 10 for r in requests)
    assert requests == throughput.mixed_requests(512, spec)  # seeded
    rows = throughput.mixed_throughput(model, spec)
    assert [r["mode"] for r in rows] == ["static batching"]
    assert rows[0]["tokens"] == sum(r.new_tokens for r in requests)


@pytest.mark.slow
def test_continuous_batching_serves_every_request(model) -> None:
    spec = SpeedSpec(prompt_len=8, new_tokens=10, mixed_requests=4, repeats=1)
    row = throughput.continuous_batching(model, throughput.mixed_requests(512, spec), repeats=1)
    assert row["tokens"] == sum(r.new_tokens for r in throughput.mixed_requests(512, spec))


def test_kv_cache_bytes_per_token() -> None:
    llama, gpt2 = make_tiny("llama"), make_tiny("gpt2")
    assert memory.kv_cache_bytes_per_token(llama.config, torch.float32) == 2 * 2 * 2 * 32 * 4  # 2 KV heads of 32
    assert memory.kv_cache_bytes_per_token(gpt2.config, torch.bfloat16) == 2 * 2 * 4 * 32 * 2  # MHA: 4 heads
    # Llama-3.2-1B: 16 layers, 8 KV heads of 64, bf16 -> 32 KiB a token
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8)
    assert memory.kv_cache_bytes_per_token(config, torch.bfloat16) == 32768


def test_tensor_bytes_count_packed_codes_and_tied_weights_once(tmp_path: Path) -> None:
    dense = make_tiny("llama")  # tied embeddings: the 512 x 128 matrix is counted once
    unique = {p.data_ptr(): p.numel() for p in dense.parameters()}
    buffers = sum(b.numel() * b.element_size() for b in dense.buffers())
    assert memory.tensor_bytes_by_dtype(dense) == {"float32": 4 * sum(unique.values()) + buffers}
    rtn4 = [{"method": "rtn", "args": {"bits": 4, "group_size": 64}}]
    packed = compress.apply(make_tiny("llama"), rtn4, device="cpu")
    layers = [m for m in packed.modules() if isinstance(m, CompressedLinear)]
    assert memory.tensor_bytes_by_dtype(packed)["uint8"] == sum(m.out_features * m.in_features // 2 for m in layers)
    compress.save(packed, tmp_path / "ck")
    on_disk = sum(f.stat().st_size for f in (tmp_path / "ck").iterdir())
    assert memory.checkpoint_bytes(str(tmp_path / "ck")) == on_disk


def test_layouts_count_each_format_its_bytes_and_pruned_fraction() -> None:
    model = make_tiny("llama").to(torch.bfloat16)
    total = {name: m.in_features * m.out_features for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    compress.apply(model, [{"method": "magnitude", "args": {"structure": "2:4"}, "targets": ["re:.*\\.0\\..*"]},
                           {"method": "magnitude", "args": {"sparsity": 0.75}, "targets": ["re:.*\\.1\\..*"]}],
                   device="cpu")
    layouts = memory.layout_bytes(model)
    two_four, bitmask, dense = layouts["sparse24"], layouts["bitmask"], layouts["dense"]
    weights_24 = sum(w for name, w in total.items() if ".0." in name)
    weights_bm = sum(w for name, w in total.items() if ".1." in name)
    # 2:4: half the values in bf16 plus 2 bits a kept value; bitmask: a bit a weight plus the kept quarter
    assert two_four["layers"] == 7 and two_four["sparsity"] == 0.5
    assert two_four["stored_bytes"] == weights_24 * 2 * 0.5625 and two_four["dense_bytes"] == weights_24 * 2
    assert bitmask["layers"] == 7 and bitmask["sparsity"] == pytest.approx(0.75, abs=1e-3)
    assert bitmask["stored_bytes"] == pytest.approx(weights_bm * (1 / 8 + 0.25 * 2), rel=1e-3)
    assert dense["sparsity"] == 0.0 and dense["stored_bytes"] == dense["dense_bytes"]  # the rest, lm_head among them
    assert memory.memory_report(model, None, 64)["layouts"] == layouts
    compress.fuse_projections(model)  # a fused group's layer holds its members' tensors: counted once, as members
    assert memory.layout_bytes(model) == layouts


def test_bench_prints_the_speed_table_of_a_random_model(monkeypatch, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from benchmarks import bench

    monkeypatch.setitem(bench.SHAPES, "tiny", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                                   max_position_embeddings=128))
    args = ["--random", "tiny", "--tasks", "speed,memory", "--prompt-len", "8", "--new-tokens", "4", "--warmup", "0",
            "--repeats", "1", "--speed-configs", "dynamic,static", "--dtype", "float32", "--device", "cpu",
            "--json", str(tmp_path / "bench.json")]
    result = CliRunner().invoke(bench.main, args)
    assert result.exit_code == 0, result.output
    assert "| tiny (random, float32) | dynamic | 1 | 4 |" in result.output
    assert "| tiny (random, float32) | static | 1 | 4 |" in result.output
    assert (tmp_path / "bench.json").exists()
    unknown = CliRunner().invoke(bench.main, ["--random", "llama-9b"])
    assert unknown.exit_code == 2
    assert "error: unknown shape 'llama-9b'; known: llama-3.2-1b, llama-3-8b" in unknown.output
    quality = CliRunner().invoke(bench.main, ["--random", "tiny", "--tasks", "ppl"])
    assert quality.exit_code == 2 and "a random-weight model has no tokenizer" in quality.output


def test_format_bench_line_gives_ratios_and_omits_untimed_prefill() -> None:
    from benchmarks.format_bench import summary

    base = {"format": "bf16", "decode_tok_s": 140.0, "floor_fraction": 0.7, "peak_gpu_bytes": 16 * 2**30,
            "decode": {"compiled-step": 140.0}, "batches": {32: 4000.0}}
    row = {"format": "int8", "decode_tok_s": 224.0, "floor_fraction": 0.57, "peak_gpu_bytes": 8 * 2**30,
           "decode": {"compiled-step": 224.0}, "batches": {32: 5000.0}}
    line = summary(row, base)
    assert "224.0 tok/s (1.60x bf16, 57% of floor)" in line and "(0.50x)" in line and "prefill" not in line
    assert "b32 5000.0 (1.25x)" in line
    base["prefill_tok_s"], row["prefill_tok_s"] = 30000.0, 27000.0
    assert "prefill    27000 tok/s (0.90x)" in summary(row, base)


def test_format_bench_checks_formats_and_batch_sizes_before_any_gpu_work() -> None:
    from benchmarks.format_bench import parse_batch_sizes, split_format

    assert parse_batch_sizes("1,8,32,8,64") == [8, 32, 64]
    assert split_format("torchao-int4") == ("torchao-int4", False, False)
    assert split_format("int4-lm-head+fused+attn") == ("int4-lm-head", True, True)
    assert split_format("torchao-int4+attn") == ("torchao-int4", False, True)
    for bad in ("1,x", "0,8", "-8"):
        with pytest.raises(SystemExit, match="positive integers"):
            parse_batch_sizes(bad)
    with pytest.raises(SystemExit, match="choose from .*torchao-int8"):
        split_format("int3")
    with pytest.raises(SystemExit, match="only bf16 and compress formats"):
        split_format("torchao-int4+fused")
    with pytest.raises(SystemExit, match="the suffixes are"):
        split_format("int4+fast")


class _Packed(torch.Tensor):
    """A wrapper tensor subclass as torchao's quantized weights are: a logical bf16 [out, in] shape over packed
    inner tensors."""

    @staticmethod
    def __new__(cls, codes: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int]):
        out = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=torch.bfloat16)
        out.codes, out.scales = codes, scales
        return out

    def __tensor_flatten__(self):
        return ["codes", "scales"], None

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"{func} on a packed weight")


def test_format_bench_counts_a_tensor_subclass_by_its_inner_tensors() -> None:
    from benchmarks.format_bench import stored_bytes

    packed = _Packed(torch.zeros(64, 128, dtype=torch.uint8), torch.zeros(64, 2, dtype=torch.bfloat16), (64, 256))
    assert stored_bytes(packed) == 64 * 128 + 64 * 2 * 2  # not 64 x 256 x 2 bytes of its logical shape
    assert stored_bytes(torch.zeros(3, 5, dtype=torch.bfloat16)) == 30
    assert stored_bytes(nn.Parameter(torch.zeros(4))) == 16
