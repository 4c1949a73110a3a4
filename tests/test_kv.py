"""The quantized KV cache (compress.kv): its quantization's error bounds, the residual window, generation through it
on every test architecture and on ref-a, perplexity through it, the decode kernel against its PyTorch oracle (in
Triton's interpreter on the CPU, on CUDA with -m gpu), and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from conftest import ARCHS, REF_A, REFCODE, make_tiny, needs_shared, tiny_config

from compress.errors import UsageError
from compress.kv import KVScheme, QuantizedCache, QuantizedLayer
from compress.kv import quant


def _outlier_keys(seed: int = 0, tokens: int = 256) -> torch.Tensor:
    """Keys [2, 4, tokens, 64] with a few outlier channels (large, offset), as real models' keys have."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(2, 4, tokens, 64, generator=g)
    k[..., [3, 17, 40]] = k[..., [3, 17, 40]] * 8 + 20
    return k


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_round_trips_every_code(bits: int) -> None:
    codes = (torch.arange(256) % (1 << bits)).to(torch.uint8).view(-1, 8)
    packed = quant.pack(codes, bits)
    assert packed.shape == (codes.shape[0], 8 * bits // 8)
    assert torch.equal(quant.unpack(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [16, 32, 64])
def test_int_errors_stay_within_half_a_step(bits: int, group: int) -> None:
    """Every key and value comes back within half its group's (float16) scale; the codes use the whole grid."""
    k = _outlier_keys(bits)
    qk = quant.quantize_keys(k, bits, group)
    assert qk.codes.shape == (2, 4, 256, 64 * bits // 8) and qk.scale.shape == (2, 4, 256 // group, 64)
    step = qk.scale.float().repeat_interleave(group, dim=2)
    assert ((quant.dequantize_keys(qk, bits, group, torch.float32) - k).abs() <= step / 2 * (1 + 1e-6)).all()
    qv = quant.quantize_values(k, bits, group)
    assert qv.scale.shape == (2, 4, 256, 64 // group)
    step = qv.scale.float().repeat_interleave(group, dim=3)
    assert ((quant.dequantize_values(qv, bits, group, torch.float32) - k).abs() <= step / 2 * (1 + 1e-6)).all()
    assert int(quant.unpack(qk.codes, bits).max()) == (1 << bits) - 1


def test_fp8_error_is_within_e4m3_rounding() -> None:
    x = _outlier_keys(1)
    scale = quant.fp8_scale(x)
    back = quant.fp8_dequantize(quant.fp8_quantize(x, scale), scale, torch.float32)
    # E4M3 keeps 3 mantissa bits: relative error at most 2^-4 in the normal range, an absolute one below it
    tiny = scale.view(1, -1, 1, 1) * 2.0**-9
    assert ((back - x).abs() <= x.abs() * 2.0**-4 + tiny).all()


def test_keys_per_channel_beat_keys_per_token_on_outlier_channels() -> None:
    """KIVI's finding: with outlier channels, a scale per channel (over a run of tokens) loses far less than a
    scale per token (over a run of channels), at the same bits and group size."""
    k = _outlier_keys(2)
    per_channel = quant.dequantize_keys(quant.quantize_keys(k, 4, 32), 4, 32, torch.float32)
    per_token = quant.dequantize_values(quant.quantize_values(k, 4, 32), 4, 32, torch.float32)
    assert (per_channel - k).pow(2).mean() < 0.25 * (per_token - k).pow(2).mean()


@pytest.mark.parametrize("residual,group", [(0, 16), (8, 16), (20, 8)])
def test_the_window_holds_exactly_the_last_tokens_in_full_precision(residual: int, group: int) -> None:
    layer = QuantizedLayer(KVScheme("int", 4, group, residual))
    k, v = _outlier_keys(3, 200), _outlier_keys(4, 200)
    seen = 0
    for n in [37, 1, 1, 5, 64, 1, 1, 1, 89]:  # a prompt, then steps of several sizes
        layer.update(k[:, :, seen : seen + n], v[:, :, seen : seen + n])
        seen += n
        window = layer.keys.shape[2]
        assert layer.stored + window == seen == layer.get_seq_length()
        assert layer.stored % group == 0
        assert window < residual + group and (window >= residual or layer.stored == 0)
        assert torch.equal(layer.keys, k[:, :, seen - window : seen]) and torch.equal(layer.values, v[:, :, seen - window : seen])
    stored_k, stored_v = layer.dequantize(layer.stored)
    assert (stored_k - k[:, :, : layer.stored]).abs().max() < 2 and (stored_v - v[:, :, : layer.stored]).abs().max() < 2


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_a_static_layer_holds_what_a_dynamic_one_holds(bits: int) -> None:
    """The static layer (fixed buffers, the window in a ring, branch-free steps for torch.compile) hands the attention
    the same keys and values as the dynamic one, bit for bit, through a prompt, single steps and a second prompt."""
    from compress.kv.cache import StaticQuantizedLayer

    scheme = KVScheme("int", bits, 16, 24)
    dynamic, static = QuantizedLayer(scheme, direct=True), StaticQuantizedLayer(scheme, 300, direct=True)
    k, v = _outlier_keys(7, 300), _outlier_keys(8, 300)
    seen = 0
    for n in [50, 1, 1, 1, 30] + [1] * 100:
        a, _ = dynamic.update(k[:, :, seen : seen + n], v[:, :, seen : seen + n])
        b, _ = static.update(k[:, :, seen : seen + n], v[:, :, seen : seen + n])
        seen += n
        assert (int(a.stored), int(a.length)) == (int(b.stored), int(b.length))
        assert all(torch.equal(x, y[:, :, : seen]) for x, y in zip(a.dequantized(), b.dequantized()))
    assert int(static.get_seq_length()) == seen == dynamic.get_seq_length()
    with pytest.raises(UsageError, match="holds 300 tokens"):
        static.update(k[:, :, :200], v[:, :, :200])


def test_a_prompt_in_chunks_through_a_static_cache_gives_the_dynamic_caches_logits() -> None:
    """A long prompt fed in chunks (as kv_bench and servers prefill): the static cache's mask spans the whole cache,
    the keys only the tokens so far; the logits equal those through the dynamic cache fed the same chunks."""
    model = make_tiny("llama")
    ids = torch.randint(3, 500, (2, 96), generator=torch.Generator().manual_seed(0))
    logits = []
    for max_cache_len in (None, 128):
        cache = QuantizedCache(model.config, bits=4, group_size=16, residual=16, max_cache_len=max_cache_len)
        with torch.no_grad():
            chunks = [model(ids[:, i : i + 32], past_key_values=cache, cache_position=torch.arange(i, i + 32)).logits
                      for i in range(0, 96, 32)]
        logits.append(torch.cat(chunks, 1))
    assert torch.allclose(logits[0], logits[1], atol=1e-5)


@pytest.mark.parametrize("max_cache_len", [None, 128])
def test_a_prompts_attention_a_few_sequences_at_a_time_gives_the_whole_batchs_logits(monkeypatch,
                                                                                      max_cache_len) -> None:
    """Past a memory bound the prompt's attention dequantizes the cache a few sequences at a time (each with its own
    padding mask): the logits are those of the whole batch at once."""
    from compress.kv import attention

    model = make_tiny("llama")
    assert model.config._attn_implementation == "sdpa"  # the wrapper that takes packed views runs
    ids = torch.randint(3, 500, (5, 96), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :7] = mask[3, :20] = 0  # left padding that differs between sequences
    logits, calls, whole, attend = [], [], attention.DEQUANTIZED_BYTES, attention._dequantized_attention
    for bound in (whole, 1):  # 1 byte: one sequence at a time
        monkeypatch.setattr(attention, "DEQUANTIZED_BYTES", bound)
        monkeypatch.setattr(attention, "_dequantized_attention", lambda *a, b=bound: calls.append(b) or attend(*a))
        cache = QuantizedCache(model.config, bits=4, group_size=16, residual=16, max_cache_len=max_cache_len)
        with torch.no_grad():
            chunks = [model(ids[:, i : i + 32], attention_mask=mask[:, : i + 32], past_key_values=cache,
                            cache_position=torch.arange(i, i + 32)).logits for i in range(0, 96, 32)]
        logits.append(torch.cat(chunks, 1))
    layers = model.config.num_hidden_layers
    assert calls.count(1) == 5 * calls.count(whole) == 5 * 3 * layers
    assert torch.allclose(logits[0], logits[1], atol=1e-5)


def test_a_static_cache_step_compiles_whole() -> None:
    """The decode step through a static quantized cache traces as one graph (torch.compile fullgraph: a graph break
    raises; the eager backend, so no compiler is needed) and gives the eager step's tokens."""
    from compress.eval.speed import decode_step

    model = make_tiny("llama")
    ids = torch.randint(3, 500, (2, 60), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(120)
    tokens = []
    for compiled_steps in (False, True):
        cache = QuantizedCache(model.config, bits=4, group_size=16, residual=16, max_cache_len=120)
        step, _ = decode_step(model, cache)
        run = torch.compile(step, fullgraph=True, backend="eager") if compiled_steps else step
        token, out = step(ids, positions[:60]), []
        for i in range(60, 100):  # past two groups' completion: both branches of the store traced
            token = run(token, positions[i : i + 1])
            out.append(token)
        tokens.append(torch.cat(out, 1))
    assert torch.equal(tokens[0], tokens[1])


def test_a_step_sees_its_new_tokens_and_the_window_in_full_precision() -> None:
    """What update hands the attention: the tokens stored before the step dequantized, everything after exact (a
    prompt's own attention is exact, as in KIVI)."""
    layer = QuantizedLayer(KVScheme("int", 2, 16, 16))
    k, v = _outlier_keys(5, 100), _outlier_keys(6, 100)
    keys, values = layer.update(k[:, :, :90], v[:, :, :90])
    assert torch.equal(keys, k[:, :, :90]) and torch.equal(values, v[:, :, :90])  # the prompt: all exact
    assert layer.stored == 64
    keys, _ = layer.update(k[:, :, 90:91], v[:, :, 90:91])
    assert keys.shape[2] == 91 and torch.equal(keys[:, :, 64:], k[:, :, 64:91])
    assert not torch.equal(keys[:, :, :64], k[:, :, :64])  # 2-bit: the stored part is not exact


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_through_the_cache_on_every_architecture(arch: str) -> None:
    """greedy generation with every scheme runs on each test architecture; the int8 cache's logits stay within 1%
    of the full-precision cache's (float32 tiny models, a 40-token prompt, 24 new tokens)."""
    from transformers import DynamicCache

    model = make_tiny(arch)
    ids = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    ref = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kwargs)
    for name in ("int8", "int4", "int2", "fp8"):
        cache = QuantizedCache(model.config, scheme=KVScheme.named(name, 16, 8))
        out = model.generate(ids, past_key_values=cache, **kwargs)
        assert out.sequences.shape == ref.sequences.shape
        assert cache.layers[0].get_seq_length() == 63 and cache.layers[0].stored >= 48
        if name == "int8":
            for a, b in zip(out.logits, ref.logits):
                assert (a - b).abs().max() <= 0.01 * b.abs().max()


@needs_shared
def test_ref_a_greedy_outputs_with_an_int8_cache_equal_the_full_precision_caches() -> None:
    """ref-a (bfloat16), 8 prompts of 192 tokens from valid.txt, 48 new tokens, group 32, residual 128 (so 64 prompt
    tokens are stored quantized from the first step): the int8 cache's greedy tokens are the full-precision
    cache's up to a near tie, where the full-precision run's two best logits are within one bfloat16 step (1/16 at
    ref-a's logits; measured: two of the 8 prompts meet one, at margins 0 and 1/16). int4's agreement is printed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(REF_A, dtype=torch.bfloat16).eval()
    ids = AutoTokenizer.from_pretrained(REF_A)((REFCODE / "valid.txt").read_text()[:60000]).input_ids
    prompts = torch.tensor([ids[i * 500 : i * 500 + 192] for i in range(8)])
    kwargs = dict(max_new_tokens=48, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    ref = model.generate(prompts, past_key_values=DynamicCache(config=model.config), **kwargs)
    agreement = {}
    for bits in (8, 4):
        out = model.generate(prompts, past_key_values=QuantizedCache(model.config, bits=bits, group_size=32), **kwargs)
        same = out.sequences[:, 192:] == ref.sequences[:, 192:]
        agreement[f"int{bits}"] = same.float().mean().item()
        if bits == 8:
            for row, row_same in enumerate(same):
                if not row_same.all():
                    first = int((~row_same).nonzero()[0])
                    top = ref.logits[first][row].float().topk(2).values
                    assert top[0] - top[1] <= 1 / 16, (row, first, top)
    print("greedy agreement with the full-precision cache:", agreement)
    assert agreement["int8"] >= agreement["int4"]


def test_perplexity_through_a_full_precision_cache_equals_the_plain_forwards(tmp_path) -> None:
    """The token-by-token loop is exact: through transformers' own cache it gives the batched forward's perplexity
    (float32); through an int8 cache, within 0.5%."""
    from compress.eval.perplexity import Protocol, perplexity
    from compress.eval.spec import KVCacheSpec

    model = make_tiny("llama")
    ids = torch.randint(3, 500, (3000,), generator=torch.Generator().manual_seed(1))
    protocol = Protocol(seq_len=128)
    plain = perplexity(model, ids, protocol, progress=False).perplexity
    spec = KVCacheSpec(scheme="int8", group_size=16, residual=16, prefill=20)
    full = perplexity(model, ids, protocol, progress=False, kv=spec, quantized=False).perplexity
    int8 = perplexity(model, ids, protocol, progress=False, kv=spec).perplexity
    assert abs(full / plain - 1) < 1e-5
    assert abs(int8 / plain - 1) < 5e-3
    made = []  # a cache of the caller's (another library's), made for each batch, in the same steps

    def new_cache():
        made.append(QuantizedCache(model.config, scheme=KVScheme("int", 8, 16, 16)))
        return made[-1]

    theirs = perplexity(model, ids, protocol, progress=False, kv=spec, new_cache=new_cache).perplexity
    assert theirs == int8 and len(made) == 3  # 23 windows, 8 a batch


def test_compress_eval_reports_the_cache(tiny_dirs, tmp_path) -> None:
    from compress_cli import cli

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97}" for i in range(3000)))
    out = tmp_path / "r.json"
    result = CliRunner().invoke(cli, ["eval", str(tiny_dirs["llama"]), "--data", str(text), "--seq-len", "64",
                                      "--max-tokens", "640", "--tasks", "ppl", "--kv-cache", "int4",
                                      "--kv-group-size", "16", "--kv-residual", "16", "--kv-prefill", "8",
                                      "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    kv = json.loads(out.read_text())["kv_cache"]
    assert "int4 (group 16, residual 16), prefill 8" in kv["protocol"]["kv_cache"]
    assert kv["delta"] == pytest.approx(kv["perplexity"] / kv["full_cache_perplexity"] - 1)
    assert "through the KV cache" in result.output


def test_kl_and_samples_run_through_the_cache(tiny_dirs, tmp_path) -> None:
    """With --kv-cache the kl and samples tasks read the model through the quantized cache: int8 against the same
    model as baseline gives a KL near zero (not exactly zero), and the report says which cache."""
    from compress_cli import cli

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97}" for i in range(3000)))
    out = tmp_path / "r.json"
    model = str(tiny_dirs["llama"])
    result = CliRunner().invoke(cli, ["eval", model, "--baseline", model, "--data", str(text), "--seq-len", "64",
                                      "--max-tokens", "640", "--tasks", "kl,samples", "--kv-cache", "int8",
                                      "--kv-group-size", "16", "--kv-residual", "8", "--kv-prefill", "8",
                                      "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert 0 < report["kl"]["mean_kl"] < 1e-3 and report["kl"]["kv_cache"].startswith("int8 (group 16, residual 8)")
    assert report["samples"]["kv_cache"].startswith("int8")


def test_the_memory_task_measures_the_cache_as_its_arithmetic_says(tiny_dirs, tmp_path) -> None:
    """The bytes a token the cache holds after a 200-token forward equal KVScheme.bytes_per_token's arithmetic (tiny
    llama: 2 layers, 2 KV heads of 32, float32). Against a float32 cache the ratios are not the issue's (which are
    against bf16, measured on ref-a and the GPU), so only their order is asserted here, and fp8's exact quarter."""
    from compress.eval.memory import quantized_cache_bytes
    from compress.eval.spec import KVCacheSpec

    model = make_tiny("llama")
    ratios = {}
    for scheme in ("int2", "int4", "int8", "fp8"):
        got = quantized_cache_bytes(model, KVCacheSpec(scheme=scheme, group_size=16, residual=32), 200)
        assert got["bytes_per_token"] == pytest.approx(got["bytes_per_token_at"]["200"])
        ratios[scheme] = got["vs_full_at"]["4096"]
    assert ratios["int2"] < ratios["int4"] < ratios["int8"] < 1 and ratios["fp8"] == 0.25  # 1 byte of float32's 4


def test_kv_options_without_a_cache_are_refused(tiny_dirs) -> None:
    from compress_cli import cli

    result = CliRunner().invoke(cli, ["eval", str(tiny_dirs["llama"]), "--kv-group-size", "32", "--device", "cpu"])
    assert result.exit_code == 2 and "--kv-group-size set without --kv-cache" in result.output


@pytest.mark.parametrize("kwargs,words", [
    (dict(bits=3), "is not one of 2, 4, 8"),
    (dict(bits=4, group_size=24), "does not divide the attention heads' dimension 32"),
    (dict(bits=4, residual=-1), "must be an integer >= 0"),
    (dict(bits=4, group_size=0), "must be a positive integer"),
])
def test_bad_settings_are_refused(kwargs: dict, words: str) -> None:
    with pytest.raises(UsageError, match=words):
        QuantizedCache(tiny_config("llama"), **kwargs)


def test_models_with_other_attention_are_refused() -> None:
    import transformers as tf

    config = tiny_config("qwen2")
    config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(UsageError, match="needs every layer to be full attention"):
        QuantizedCache(config, bits=4, group_size=16)
    with pytest.raises(UsageError, match="no attention heads"):
        QuantizedCache(tf.MambaConfig(hidden_size=64, num_hidden_layers=2), bits=4)


KERNEL_SCRIPT = """
import torch
from compress.kv import KVScheme
from compress.kv.cache import QuantizedLayer
from compress.kv.attention import decode_attention, decode_reference
worst = 0.0
for bits, group, residual, heads, groups, prompt in [(2, 16, 16, 2, 3, 150), (4, 32, 64, 1, 4, 300), (8, 16, 0, 2, 1, 70),
                                                    (4, 16, 64, 2, 2, 40)]:
    torch.manual_seed(bits)
    layer = QuantizedLayer(KVScheme("int", bits, group, residual), direct=True)
    k, v = torch.randn(2, heads, prompt + 1, 64) * 3, torch.randn(2, heads, prompt + 1, 64)
    layer.update(k[:, :, :prompt], v[:, :, :prompt])
    view, _ = layer.update(k[:, :, prompt:], v[:, :, prompt:])
    q = torch.randn(2, heads * groups, 1, 64)
    keep = torch.ones(2, view.length, dtype=torch.bool)
    keep[1, :7] = False
    for mask in (None, keep):
        ref = decode_reference(q, view, mask)
        out = decode_attention(q, view, mask, block=32)
        worst = max(worst, (out - ref).abs().max().item())
for prompt in (300, 1):  # fp8: every token stored at once, a scale a head
    layer = QuantizedLayer(KVScheme("fp8", 8, 64, 128), direct=True)
    k, v = torch.randn(2, 2, prompt + 1, 64) * 3, torch.randn(2, 2, prompt + 1, 64)
    layer.update(k[:, :, :prompt], v[:, :, :prompt])
    view, _ = layer.update(k[:, :, prompt:], v[:, :, prompt:])
    q = torch.randn(2, 4, 1, 64)
    worst = max(worst, (decode_attention(q, view, block=32) - decode_reference(q, view)).abs().max().item())
import triton
import triton.language as tl
from compress.kv.attention import _e4m3

@triton.jit
def decode_bytes(x_ptr, y_ptr):
    i = tl.arange(0, 256)
    tl.store(y_ptr + i, _e4m3(tl.load(x_ptr + i)))

codes = torch.arange(256, dtype=torch.uint8)
decoded = torch.empty(256)
decode_bytes[(1,)](codes, decoded)
finite = (codes & 0x7F) != 0x7F  # 0x7f and 0xff are NaN in E4M3 (the cache never stores them)
assert torch.equal(decoded[finite], codes.view(torch.float8_e4m3fn).float()[finite]), "e4m3 decoder"
from compress.kv.cache import StaticQuantizedLayer
for bits in (2, 4):  # a static layer's views: the window in a ring, the lengths on the device
    layer = StaticQuantizedLayer(KVScheme("int", bits, 16, 24), 400, direct=True)
    k, v = torch.randn(1, 2, 300, 64) * 3, torch.randn(1, 2, 300, 64)
    layer.update(k[:, :, :100], v[:, :, :100])
    for t in range(100, 140):
        view, _ = layer.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
        if t % 7 == 0:
            q = torch.randn(1, 4, 1, 64)
            worst = max(worst, (decode_attention(q, view, block=32) - decode_reference(q, view)).abs().max().item())
print("worst", worst)
"""


def test_decode_kernel_matches_its_oracle_in_the_interpreter() -> None:
    """The Triton decode kernel (run by Triton's interpreter) against dequantize-then-attend in float32: 2/4/8 bits,
    grouped-query heads, a mask, a view with nothing stored yet, several splits, fp8 (and the kernel's E4M3 decoder
    against torch's on every byte), and a static layer's views (the window in a ring, the lengths read on the
    device, splits past the length)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", KERNEL_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.split("worst")[-1]) < 5e-3  # the kernel multiplies float16 inputs (float32 sums)


DENSE_SCRIPT = """
import math
import torch
import transformers as tf
from compress.eval.speed import decode_step
from compress.kv import attention

def reference(q, k, v, keep):
    g = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(g, 1).transpose(2, 3) / math.sqrt(q.shape[-1])
    if keep is not None:
        s = s.masked_fill(~keep.expand(q.shape[0], -1)[:, None, None, :], float("-inf"))
    return torch.softmax(s, -1) @ v.repeat_interleave(g, 1)

worst = 0.0
for heads, groups, length in [(2, 3, 150), (1, 4, 33), (8, 4, 300)]:
    torch.manual_seed(length)
    k, v = torch.randn(2, heads, length, 64) * 3, torch.randn(2, heads, length, 64)
    q = torch.randn(2, heads * groups, 1, 64)
    keep = torch.ones(2, length, dtype=torch.bool)
    keep[0, length // 2 :] = False  # a static cache's slots not yet written
    keep[1, :5] = False  # padding
    for mask in (None, keep, keep[:1]):
        out = attention.dense_decode_attention(q, k, v, mask, block=32)
        worst = max(worst, (out - reference(q, k, v, mask)).abs().max().item())
print("kernel", worst)

# a model's decode steps through a static cache, with and without the kernel (allowed on the CPU here)
attention._dense_kernel_can_run = lambda query, key, value, kwargs: query.shape[2] == 1
config = tf.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, attn_implementation="sdpa")
torch.manual_seed(0)
model = tf.LlamaForCausalLM(config).eval()
ids = torch.randint(3, 300, (2, 20))
logits = []
for on in (False, True):
    assert attention.read_caches_directly(model, on) == 2
    cache = tf.StaticCache(config=config, max_cache_len=40)
    step, _ = decode_step(model, cache)
    calls = []
    dense = attention.dense_decode_attention
    attention.dense_decode_attention = lambda *a, **k: calls.append(1) or dense(*a, **k)
    with torch.no_grad():
        token = step(ids, torch.arange(20))
        out = []
        for i in range(20, 30):
            out.append(model(input_ids=token, cache_position=torch.tensor([i]), past_key_values=cache).logits)
            token = out[-1][:, -1:].argmax(-1)
    attention.dense_decode_attention = dense
    assert len(calls) == (20 if on else 0), len(calls)
    logits.append(torch.cat(out, 1))
print("model", (logits[0] - logits[1]).abs().max().item())
# a dynamic cache without padding: no mask, so sdpa attends without repeating the heads and keeps the steps
calls = []
attention.dense_decode_attention = lambda *a, **k: calls.append(1) or dense(*a, **k)
with torch.no_grad():
    model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
assert not calls, len(calls)
# a mask with a row for each head (biases such as ALiBi's) goes to the model's attention, a shared one to the kernel
from transformers.modeling_utils import AttentionInterface
wrapped = AttentionInterface._global_mapping["sdpa"]
layer = model.model.layers[0].self_attn
q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 30, 16), torch.randn(2, 2, 30, 16)
bias = torch.randn(2, 4, 1, 30)
attention.dense_decode_attention = lambda *a, **k: calls.append(1) or dense(*a, **k)
out, _ = wrapped(layer, q, k, v, bias, scaling=0.25)
assert not calls and torch.allclose(out, wrapped.__wrapped__(layer, q, k, v, bias, scaling=0.25)[0])
wrapped(layer, q, k, v, torch.ones(2, 1, 1, 30, dtype=torch.bool), scaling=0.25)
assert len(calls) == 1
"""


def test_dense_decode_kernel_matches_attention_over_repeated_heads_in_the_interpreter() -> None:
    """The decode kernel over a full-precision cache (``dense_decode_attention``, Triton's interpreter) against
    attention over keys and values repeated for each query head, in float32: grouped heads, a static cache's mask, a
    mask of one row for the batch; and a model's decode steps through a static cache with the kernel give the
    logits of the model's own attention."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", DENSE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = dict(line.split() for line in done.stdout.splitlines() if line.startswith(("kernel", "model")))
    assert float(figures["kernel"]) < 5e-3  # float16 products, float32 sums
    assert float(figures["model"]) < 2e-3


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_decode_kernel_reads_the_packed_codes_with_wide_loads(bits: int) -> None:
    """The decode kernel compiled for an H100 (sm_90, no GPU needed) as a launch specialises it (pointers and the
    strides of contiguous buffers 16-byte aligned): a token's codes are read with 16-byte loads, not byte by byte
    (int4 and int2 once took 130 single-byte loads a thread, addressing channel d's byte as d // 2 or d // 4)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from compress.kv.attention import _decode_kernel

    names = _decode_kernel.arg_names
    types = {"q_ptr": "*bf16", "kc_ptr": "*u8", "ks_ptr": "*fp16", "kz_ptr": "*i8", "vc_ptr": "*u8", "vs_ptr": "*fp16",
             "vz_ptr": "*i8", "tk_ptr": "*bf16", "tv_ptr": "*bf16", "scaling": "fp32"}
    const = {"GROUPS": 4, "BLOCK_H": 16, "D": 128, "BITS": bits, "GROUP": 64, "BLOCK_T": 64, "FP8": False,
             "HAS_KEEP": False, "ON_DEVICE": False, "RING": False}
    signature = {n: "constexpr" if n in const else types.get(n, "*fp32" if n.endswith("_ptr") else "i32")
                 for n in names}
    aligned = [n for n in names if n.endswith("_ptr") or n[-2:] in ("_b", "_h", "_t")] + ["per_split"]
    aligned.remove("vs_t")  # a token's value scales: a few float16 values
    aligned.remove("keep_b")  # not specialised (it changes from step to step)
    try:  # Triton's offline-compilation interface (3.3 and later); an older one is not this test's subject
        source = ASTSource(_decode_kernel, signature, {(names.index(n),): v for n, v in const.items()},
                           {(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    except TypeError as e:
        pytest.skip(f"this Triton's ASTSource takes other arguments: {e}")
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    byte_loads = ptx.count("ld.global.b8") + ptx.count("ld.global.u8")
    assert byte_loads <= 4, f"{byte_loads} single-byte global loads"  # the lengths and the like, not the codes
    assert "cp.async" in ptx or "ld.global.v4" in ptx


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 4, 8, "fp8"])
def test_decode_kernel_on_cuda_matches_dequantize_then_attend(bits) -> None:
    from compress.kv.attention import decode_attention, decode_reference

    torch.manual_seed(0)
    scheme = KVScheme("fp8", 8) if bits == "fp8" else KVScheme("int", bits, 32, 128)
    layer = QuantizedLayer(scheme, direct=True)
    k = torch.randn(1, 8, 5001, 128, device="cuda", dtype=torch.bfloat16) * 3
    v = torch.randn(1, 8, 5001, 128, device="cuda", dtype=torch.bfloat16)
    layer.update(k[:, :, :5000], v[:, :, :5000])
    view, _ = layer.update(k[:, :, 5000:], v[:, :, 5000:])
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    ref = decode_reference(q, view)
    out = decode_attention(q, view).float()
    assert (out - ref).abs().max() < 2e-2  # the bfloat16 output's rounding


@pytest.mark.gpu
def test_decoding_step_by_step_compiles_the_kernel_once() -> None:
    """The lengths change at every step; were they specialised (as Triton does with integers, on being a multiple
    of 16), new combinations would compile the kernel again in the middle of decoding, a second or so each."""
    from compress.kv.attention import _decode_kernel, decode_attention

    caches = getattr(_decode_kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this Triton keeps its compiled kernels elsewhere")
    layer = QuantizedLayer(KVScheme("int", 4, 64, 16), direct=True)
    k = torch.randn(1, 8, 400, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    layer.update(k[:, :, :300], v[:, :, :300])
    compiled = []
    for t in range(300, 400):  # 100 steps: every length mod 16, two groups stored, windows of 16 to 79 tokens
        decode_attention(q, layer.update(k[:, :, t : t + 1], v[:, :, t : t + 1])[0])
        compiled.append(sum(len(cache[0]) for cache in caches.values()))
    assert compiled[-1] == compiled[0], compiled


@pytest.mark.gpu
def test_generation_on_cuda_reads_the_packed_cache() -> None:
    """On CUDA the decode steps take the kernel, and generate gives the tokens of the dequantizing path."""
    from compress.kv import attention

    model = make_tiny("llama").cuda()
    ids = torch.randint(3, 500, (2, 300), generator=torch.Generator().manual_seed(0)).cuda()
    calls = []
    original = attention.decode_attention
    attention.decode_attention = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        fast = model.generate(ids, past_key_values=QuantizedCache(model.config, bits=4, group_size=32),
                              max_new_tokens=16, do_sample=False, pad_token_id=0)
    finally:
        attention.decode_attention = original
    cache = QuantizedCache(model.config, bits=4, group_size=32)
    for layer in cache.layers:
        layer.direct = False
    slow = model.generate(ids, past_key_values=cache, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert len(calls) == 15 * model.config.num_hidden_layers
    assert (fast == slow).float().mean() > 0.95


def test_a_checkpoint_carries_its_kv_cache(tmp_path) -> None:
    """A recipe's kv-cache runtime feature is stored with the checkpoint; compress.load turns it on: generate then
    uses the quantized cache unless given one, and disabling it restores transformers' own."""
    import compress
    from compress.runtime import features

    model = make_tiny("llama")
    recipe = {"steps": [{"method": "rtn", "args": {"bits": 8, "group_size": 64}}],
              "runtime": [{"feature": "kv-cache", "args": {"scheme": "int2", "group_size": 16, "residual": 8}}]}
    compress.apply(model, recipe, device="cpu")
    out = compress.save(model, tmp_path / "ckpt")
    loaded = compress.load(out)
    assert loaded.kv_cache_scheme.scheme == "int2"
    seen = []
    original = QuantizedLayer.update
    QuantizedLayer.update = lambda self, *a, **k: seen.append(self.scheme) or original(self, *a, **k)
    try:
        loaded.generate(torch.randint(3, 500, (1, 40)), max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert seen and all(s == KVScheme("int", 2, 16, 8) for s in seen)
        seen.clear()
        features.get("kv-cache").disable(loaded)
        loaded.generate(torch.randint(3, 500, (1, 40)), max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert not seen
    finally:
        QuantizedLayer.update = original


def test_a_checkpoint_carries_decode_attention(tmp_path) -> None:
    """The decode-attention runtime feature is stored with the checkpoint; compress.load marks every attention layer
    for the kernel (taken on CUDA only: on the CPU the logits are the model's own), and disabling it unmarks them."""
    import compress
    from compress.kv.attention import DENSE_FLAG
    from compress.runtime import features

    model = make_tiny("llama")
    recipe = {"steps": [{"method": "rtn", "args": {"bits": 8, "group_size": 64}}],
              "runtime": [{"feature": "decode-attention"}]}
    compress.apply(model, recipe, device="cpu")
    ids = torch.randint(3, 500, (1, 40))
    with torch.no_grad():
        expected = model(ids).logits
    loaded = compress.load(compress.save(model, tmp_path / "ckpt"))
    marked = [n for n, m in loaded.named_modules() if getattr(m, DENSE_FLAG, False)]
    assert len(marked) == loaded.config.num_hidden_layers and all(n.endswith("self_attn") for n in marked)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, expected, atol=1e-5)
    features.get("decode-attention").disable(loaded)
    assert not any(getattr(m, DENSE_FLAG, False) for m in loaded.modules())


@pytest.mark.parametrize("args,where", [({"scheme": "int3"}, r"runtime\[0\]\.args\.scheme"),
                                        ({"scheme": "int4", "group_size": 24}, r"runtime\[0\]\.args\.group_size: .*"
                                                                               r"does not divide .* dimension 32")])
def test_a_kv_cache_the_model_cannot_take_is_refused_before_anything_runs(args: dict, where: str) -> None:
    """Checked with the recipe (its arguments, then against the model on the meta device), before any weight is
    read or changed."""
    import compress

    model = make_tiny("llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    recipe = {"steps": [{"method": "rtn", "args": {"bits": 8, "group_size": 64}}],
              "runtime": [{"feature": "kv-cache", "args": args}]}
    with pytest.raises(UsageError, match=where):
        compress.apply(model, recipe, device="cpu")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.gpu
def test_compiled_steps_through_a_static_quantized_cache() -> None:
    """The speed task's compiled step (fullgraph, CUDA graphs) through a static int4 cache gives the tokens of eager
    steps through the dynamic int4 cache (tiny llama, bf16: a rare near tie may flip one)."""
    from compress.eval.speed import decode_step

    model = make_tiny("llama", dtype=torch.bfloat16).cuda()
    ids = torch.randint(3, 500, (2, 100), generator=torch.Generator().manual_seed(0)).cuda()
    positions = torch.arange(200, device="cuda")
    tokens = {}
    for name, cache in (("static", QuantizedCache(model.config, bits=4, group_size=16, residual=16, max_cache_len=200)),
                        ("dynamic", QuantizedCache(model.config, bits=4, group_size=16, residual=16))):
        step, compiled = decode_step(model, cache)
        token, out = step(ids, positions[:100]), []
        for i in range(100, 160):
            if name == "static":
                torch.compiler.cudagraph_mark_step_begin()
                token = compiled(token, positions[i : i + 1]).clone()
            else:
                token = step(token, positions[i : i + 1])
            out.append(token)
        tokens[name] = torch.cat(out, 1)
    assert (tokens["static"] == tokens["dynamic"]).float().mean() > 0.95


@pytest.mark.gpu
def test_compiled_steps_through_a_static_cache_with_the_dense_kernel() -> None:
    """The compiled step (fullgraph, CUDA graphs) through transformers' static cache with ``decode-attention`` on
    takes the kernel and gives the tokens of the model's own attention (tiny llama, bf16: a rare near tie may flip
    one); the kernel matches sdpa on a Llama-3-8B layer's shape."""
    from compress.eval.speed import decode_step
    from compress.kv import attention
    from transformers import StaticCache

    q = torch.randn(2, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 8, 5000, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
    assert (attention.dense_decode_attention(q, k, v).float() - ref).abs().max() < 2e-2
    model = make_tiny("llama", dtype=torch.bfloat16).cuda()
    ids = torch.randint(3, 500, (2, 100), generator=torch.Generator().manual_seed(0)).cuda()
    positions = torch.arange(200, device="cuda")
    tokens, dense = {}, attention.dense_decode_attention
    for on in (False, True):
        attention.read_caches_directly(model, on)
        seen = []  # one entry at most: the traced step guards on its length, so it recompiles once, not every step

        def spy(*args, seen=seen, **kwargs):
            if not seen:
                seen.append(1)
            return dense(*args, **kwargs)

        attention.dense_decode_attention = spy
        try:
            step, compiled = decode_step(model, StaticCache(config=model.config, max_cache_len=200))
            token, out = step(ids, positions[:100]), []
            for i in range(100, 160):
                torch.compiler.cudagraph_mark_step_begin()
                token = compiled(token, positions[i : i + 1]).clone()
                out.append(token)
        finally:
            attention.dense_decode_attention = dense
        tokens[on] = torch.cat(out, 1)
        assert bool(seen) == on  # traced into the compiled step once it is on, never before
    assert (tokens[True] == tokens[False]).float().mean() > 0.95


def test_the_speed_task_times_generation_through_the_cache(tiny_dirs, tmp_path, monkeypatch) -> None:
    """--kv-cache with the speed task: the dynamic configuration generates through the quantized cache (timed), the
    configurations it cannot run in are reported skipped with the reason."""
    from compress_cli import cli

    seen = []
    original = QuantizedLayer.update
    monkeypatch.setattr(QuantizedLayer, "update", lambda self, *a, **k: seen.append(1) or original(self, *a, **k))
    out = tmp_path / "r.json"
    model = str(tiny_dirs["llama"])
    result = CliRunner().invoke(cli, ["eval", model, "--tasks", "speed", "--kv-cache", "int4", "--kv-group-size", "16",
                                      "--speed-configs", "dynamic,static", "--batch-sizes", "1", "--prompt-len", "40",
                                      "--new-tokens", "8", "--repeats", "1", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = {r["config"]: r for r in json.loads(out.read_text())["speed"]["rows"]["model"]}
    assert rows["dynamic"]["decode_tok_s"] > 0 and seen  # timed, through the quantized cache
    assert "a quantized KV cache runs in dynamic" in rows["static"]["skipped"]
