"""QLoRA on the shared trainer: adapters learn while the 4-bit base stays as it was rounded (its update is of the
adapters' rank); on a compress checkpoint the codes come through bit for bit; the three outputs (the adapter alone
in peft's format, merged, beside the stored base) give the trained model's outputs; instruction data takes the
loss on responses only; bad settings are refused naming the field."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import compress
from compress.calibration.data import instruction_examples
from compress.errors import UsageError
from compress.formats.corrected import CorrectedLinear
from compress.formats.integer import IntLinear
from compress.linear import get_weight
from compress.lora import ADAPTER_DIR, load_adapter, nf4_weight, to_nf4
from conftest import TINY_TOKENIZER, make_tiny

TRAINING = {"steps": 8, "batch_size": 4, "lr": 3e-2, "warmup": 0.0, "eval_samples": 4, "save_every": 4}
RTN = {"method": "rtn", "args": {"bits": 4, "group_size": 32}}


def _nf4_unavailable(device: str) -> str | None:
    """Why bitsandbytes cannot round to NF4 on ``device`` here (None where it can)."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    import bitsandbytes.functional as bnbf

    try:
        bnbf.quantize_4bit(torch.ones(64, 64, device=device), quant_type="nf4")
    except Exception as exc:  # noqa: BLE001 - each bitsandbytes build fails its own way
        return f"the installed bitsandbytes cannot run NF4 on {device} ({type(exc).__name__}: {exc})"
    return None


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def nf4_device(request) -> str:
    """The device an NF4 test runs on: the CPU where the installed bitsandbytes supports it (skipped, with the
    reason, where it does not), and CUDA with ``-m gpu``."""
    why = _nf4_unavailable(request.param)
    if why:
        pytest.skip(why)
    return request.param


def _data(samples: int = 24, seq_len: int = 32) -> torch.Tensor:
    """Text drawn from 32 of the 512 tokens: a model learns quickly to put its probability there."""
    return torch.randint(0, 32, (samples, seq_len), generator=torch.Generator().manual_seed(1))


def _loss(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids).logits.float()
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()))


def _qlora(args: dict | None = None, first: list | None = None, **training) -> dict:
    step = {"method": "qlora", "args": {"r": 4, "alpha": 8, "dropout": 0.0, **(args or {})}}
    stages = ([{"steps": first}] if first else []) + [{"steps": [step]}]
    return {"training": {**TRAINING, **training}, "stages": stages}


def _saved(model, path: Path) -> Path:
    """``model`` written as a model directory with the tiny tokenizer (a base on disk)."""
    compress.save(model, path) if hasattr(model.config, "quantization_config") else model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_TOKENIZER / f, path / f)
    return path


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapters_learn_and_the_nf4_base_stays_as_rounded(arch: str, nf4_device: str) -> None:
    original = make_tiny(arch).to(nf4_device)
    model = make_tiny(arch).to(nf4_device)
    targets = {n: m for n, m in original.named_modules() if n.endswith(("q_proj", "c_attn", "down_proj", "c_proj"))}
    compress.apply(model, _qlora({"compute_dtype": "float32"}), calib=_data(), device=nf4_device)
    held = _data()[:4].to(nf4_device)  # the windows the trainer held out
    assert _loss(model, held) < _loss(original, held) - 0.3
    merged = dict(model.named_modules())
    for name, layer in targets.items():
        rounded = nf4_weight(to_nf4(layer, compute_dtype=torch.float32)).float()
        update = (get_weight(merged[name]).float() - rounded).cpu()  # what training added to the rounded base
        singular = torch.linalg.svdvals(update)
        assert singular[0] > 1e-3 and singular[4:].max() < 1e-5 * singular[0], (name, singular[:6])


def test_a_compress_base_keeps_its_codes_and_the_outputs_round_trip(tmp_path: Path) -> None:
    """On a saved RTN checkpoint: beside keeps the codes and writes the adapter, which peft loads on the base; the
    checkpoint loads with the same outputs; merged gives them too; merged then quantized runs in one recipe."""
    base_dir = _saved(compress.apply(make_tiny("llama"), [RTN], device="cpu"), tmp_path / "base")
    ids = _data(2, 16)
    beside = compress.apply(compress.load(base_dir), _qlora({"base": "keep", "save": "beside"}), calib=_data(),
                            device="cpu")
    base = compress.load(base_dir)
    stored = {n: m for n, m in base.named_modules() if isinstance(m, IntLinear)}
    for name, layer in stored.items():
        corrected = beside.get_submodule(name)
        assert isinstance(corrected, CorrectedLinear)
        assert torch.equal(corrected.base.qweight, layer.qweight) and torch.equal(corrected.base.scales, layer.scales)
    expected = beside(ids).logits
    assert (expected - base(ids).logits).abs().max() > 1e-2  # the adapters changed the outputs
    compress.save(beside, tmp_path / "beside")
    torch.testing.assert_close(compress.load(tmp_path / "beside")(ids).logits, expected)  # (3) beside
    assert (tmp_path / "beside" / ADAPTER_DIR / "adapter_model.safetensors").exists()
    with_adapter = load_adapter(compress.load(base_dir), tmp_path / "beside" / ADAPTER_DIR)
    torch.testing.assert_close(with_adapter(ids).logits, expected, atol=1e-4, rtol=1e-4)  # (1) the adapter alone
    merged = compress.apply(compress.load(base_dir), _qlora({"base": "keep", "save": "merged"}), calib=_data(),
                            device="cpu")
    torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=1e-4)  # (2) merged
    assert not any(isinstance(m, IntLinear) for m in merged.modules())
    recipe = _qlora({"base": "keep"})
    recipe["stages"].append({"steps": [RTN]})
    requantized = compress.apply(compress.load(base_dir), recipe, calib=_data(), device="cpu")
    assert sum(isinstance(m, IntLinear) for m in requantized.modules()) == len(stored)


def test_the_nf4_adapter_loads_with_peft_on_the_nf4_base(tmp_path: Path, nf4_device: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model_dir = _saved(make_tiny("llama"), tmp_path / "model")
    trained = AutoModelForCausalLM.from_pretrained(model_dir).to(nf4_device)
    compress.apply(trained, _qlora({"compute_dtype": "float32"}), calib=_data(), device=nf4_device)
    compress.save(trained, tmp_path / "out")
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=nf4, device_map=nf4_device)
    tuned = PeftModel.from_pretrained(base, tmp_path / "out" / ADAPTER_DIR)
    ids = _data(2, 16).to(nf4_device)  # merged in float32 against NF4 + adapter: the sums in another order (a wrong adapter: ~0.2)
    torch.testing.assert_close(tuned(ids).logits, trained(ids).logits, atol=2e-3, rtol=1e-3)


def test_instruction_data_takes_the_loss_on_responses_only() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    prompts, responses = ["def add(a, b):", "x" * 400], ["    return a + b", "y"]
    data = instruction_examples(prompts, responses, tok, 24, chat_template=False)
    assert data.samples == 1  # the second prompt fills the window: left out
    head = tok(prompts[0])["input_ids"]
    tail = tok(responses[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(head) + len(tail)
    assert data.input_ids[0, :n].tolist() == head + tail
    assert data.labels[0].tolist() == [-100] * len(head) + tail + [-100] * (24 - n)
    assert data.attention_mask[0].tolist() == [1] * n + [0] * (24 - n)
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}" \
                        "{% if add_generation_prompt %}<assistant>{% endif %}"
    chat = instruction_examples(prompts[:1], responses[:1], tok, 48, chat_template=True)
    opened = tok("<user>def add(a, b):<assistant>", add_special_tokens=False)["input_ids"]
    labelled = chat.labels[0][chat.labels[0] != -100].tolist()
    assert chat.input_ids[0, :len(opened)].tolist() == opened
    assert labelled == tok(responses[0], add_special_tokens=False)["input_ids"]


def test_instruction_data_trains_from_a_jsonl_file(tmp_path: Path) -> None:
    import json

    rows = [{"q": f"say {i % 7}", "a": f"{i % 7} " * 6} for i in range(40)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    training = {"dataset": str(tmp_path / "pairs.jsonl"), "prompt_column": "q", "response_column": "a",
                "seq_len": 32, "steps": 4}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    pairs = instruction_examples([r["q"] for r in rows], [r["a"] for r in rows], tok, 32, chat_template=False)
    original, model = make_tiny("llama"), make_tiny("llama")
    compress.apply(model, _qlora({"base": "keep"}, **training), device="cpu", tokenizer=tok)  # LoRA: data, not NF4
    with torch.no_grad():  # the loss on the responses (the labels) falls
        before, after = (float(m(**pairs.model_inputs()).loss) for m in (original, model))
    assert after < before - 1.0, (before, after)


@pytest.mark.parametrize("recipe, where, message", [
    (_qlora({"r": 0}), r"stages\[0\]\.steps\[0\]\.args\.r", r"greater than or equal to 1"),
    (_qlora({"save": "nf4"}), r"stages\[0\]\.steps\[0\]\.args\.save", r"rounding base \+ update back to 4 bits"),
    (_qlora({"save": "beside"}), r"stages\[0\]\.steps\[0\]\.args", r"save beside keeps a compress stored base"),
    ({"training": TRAINING, "steps": [{"method": "qlora", "targets": ["nothing_here"]}]},
     r"steps\[0\]\.targets\[0\]", r"nothing_here"),
    ({"training": {**TRAINING, "prompt_column": "q"}, "steps": [{"method": "qlora"}]},
     r"training\.response_column", r"needs both columns"),
    (_qlora({"base": "keep", "save": "beside"}), r"stages\[0\]\.steps\[0\]", r"are dense; method 'qlora' takes "
                                                                            r"format layers"),
])
def test_recipe_checks_name_the_field(recipe: dict, where: str, message: str) -> None:
    with pytest.raises(compress.RecipeError, match=where + r".*" + message):
        compress.apply(make_tiny("llama"), recipe, calib=_data(), device="cpu")


def test_a_chat_template_asked_of_a_tokenizer_without_one_is_refused(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    (tmp_path / "p.jsonl").write_text('{"q": "a", "a": "b"}\n' * 20)
    training = {"dataset": str(tmp_path / "p.jsonl"), "prompt_column": "q", "response_column": "a",
                "chat_template": True, "steps": 2}
    with pytest.raises(UsageError, match=r"training\.chat_template: true, but the tokenizer .* has no chat "
                                                  r"template"):
        compress.apply(make_tiny("llama"), _qlora(**training), device="cpu",
                       tokenizer=AutoTokenizer.from_pretrained(TINY_TOKENIZER))


def test_nf4_where_bitsandbytes_cannot_run_it_is_refused(monkeypatch) -> None:
    import bitsandbytes.functional as bnbf

    def no_kernel(*args, **kwargs):
        raise NotImplementedError("no 4-bit kernel for this device")

    monkeypatch.setattr(bnbf, "quantize_4bit", no_kernel)
    with pytest.raises(UsageError, match=r"qlora base nf4: the installed bitsandbytes cannot run 4-bit "
                                                  r"layers on cpu \(NotImplementedError: no 4-bit kernel"):
        compress.apply(make_tiny("llama"), _qlora(), calib=_data(), device="cpu")


def test_loftq_starts_closer_to_the_float_weight_than_rounding(nf4_device: str) -> None:
    from compress.lora import loftq

    layer = torch.nn.Linear(128, 96, bias=False, device=nf4_device)
    torch.nn.init.normal_(layer.weight, std=0.02)
    error = lambda w: float((layer.weight.detach() - w).norm())  # noqa: E731
    plain = error(nf4_weight(to_nf4(layer, compute_dtype=torch.float32)).float())
    errors = []
    for iterations in (1, 3):
        base, A, B = loftq(layer, r=8, scaling=2.0, iterations=iterations, compute_dtype=torch.float32)
        errors.append(error(nf4_weight(base).float() + 2.0 * B @ A))
    assert errors[0] < 0.9 * plain and errors[1] <= errors[0] * 1.001, (plain, errors)


def test_loftq_on_a_compress_base_starts_from_its_low_rank_correction() -> None:
    """RTN with a rank-4 correction, then LoRA initialised from it (hardly trained): the model is the corrected one,
    and the pair is kept beside the same codes."""
    first = [RTN, {"method": "lowrank-correct", "args": {"rank": 4}}]
    corrected = compress.apply(make_tiny("llama"), first, calib=_data(), device="cpu")
    tuned = compress.apply(make_tiny("llama"), _qlora({"base": "keep", "save": "beside", "init": "loftq"}, first=first,
                                                      steps=1, lr=1e-12), calib=_data(), device="cpu")
    ids = _data(2, 16)
    torch.testing.assert_close(tuned(ids).logits, corrected(ids).logits, atol=1e-5, rtol=1e-5)
    layer = tuned.model.layers[0].self_attn.q_proj
    assert isinstance(layer, CorrectedLinear) and isinstance(layer.base, IntLinear) and layer.rank == 4
    with pytest.raises(UsageError, match=r"set r: 4, or use init default"):
        compress.apply(make_tiny("llama"), _qlora({"base": "keep", "init": "loftq", "r": 8}, first=first),
                       calib=_data(), device="cpu")


def test_instruction_columns_are_read_in_one_pass_from_jsonl_and_parquet(tmp_path: Path) -> None:
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from compress.calibration.data import read_columns
    from compress.errors import DataError

    rows = [{"q": f"q{i}", "a": f"a{i}", "other": i} for i in range(5)]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    expected = [(f"q{i}", f"a{i}") for i in range(5)]
    for name in ("p.jsonl", "p.parquet"):
        assert read_columns(str(tmp_path / name), columns=("q", "a")) == expected
        with pytest.raises(DataError, match=r"no (field|column) 'answer'"):
            read_columns(str(tmp_path / name), columns=("q", "answer"))
