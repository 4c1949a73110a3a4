"""Quality on the shared reference model (ref-a, ../shared/data/refcode): perplexity against the original on
the same text, and checkpoint sizes. CPU, float32, on the first WINDOWS 1024-token windows of valid.txt
(the full split is 625 windows; the relative change is measured on identical text, so a slice suffices for
bounds this wide)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import compress
from compress.eval.perplexity import Protocol, perplexity
from compress.formats import CompressedLinear
from conftest import REF_A, REFCODE, needs_shared

pytestmark = [needs_shared, pytest.mark.quality]

WINDOWS = 24
PROTOCOL = Protocol(seq_len=1024, max_tokens=WINDOWS * 1024, text="refcode/valid.txt")


@pytest.fixture(scope="module")
def valid_ids() -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(REF_A)
    text = (REFCODE / "valid.txt").read_text()[: WINDOWS * 1024 * 6]  # ~3 characters a token: plenty
    ids = torch.tensor(tok(text, verbose=False)["input_ids"])
    assert ids.numel() >= WINDOWS * 1024
    return ids


def ref_a():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(REF_A, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def baseline(valid_ids) -> float:
    torch.set_num_threads(max(torch.get_num_threads(), 2))
    return perplexity(ref_a(), valid_ids, PROTOCOL, progress=False).perplexity


def linear_bytes_ratio(ckpt: Path) -> float:
    """Bytes of the compressed layers' stored tensors (codes, scales, zeros) over their bf16 weights."""
    from safetensors import safe_open

    stored = dense = 0
    model = compress.load(ckpt, device="cpu")
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        for name, layer in model.named_modules():
            if isinstance(layer, CompressedLinear):
                for part in ("qweight", "scales", "zeros"):
                    key = f"{name}.{part}"
                    if key in f.keys():
                        t = f.get_tensor(key)
                        stored += t.numel() * t.element_size()
                dense += layer.in_features * layer.out_features * 2
    return stored / dense


@pytest.mark.parametrize("recipe, max_increase, max_ratio", [
    ("int8-zeropoint.yaml", 0.001, 0.52),
    ("int8-absmax.yaml", 0.001, 0.52),
    ("w4-rtn.yaml", 0.04, 0.30),
])
def test_ref_a_quality_and_size(recipe: str, max_increase: float, max_ratio: float, baseline: float, valid_ids,
                                tmp_path: Path, record_property) -> None:
    model = ref_a()
    compress.apply(model, Path(__file__).parents[1] / "recipes" / recipe, device="cpu")
    compress.save(model, tmp_path / "ck")
    loaded = compress.load(tmp_path / "ck", device="cpu")
    ppl = perplexity(loaded, valid_ids, PROTOCOL, progress=False).perplexity
    increase = ppl / baseline - 1
    ratio = linear_bytes_ratio(tmp_path / "ck")
    record_property("ppl", ppl)
    record_property("baseline", baseline)
    print(f"{recipe}: ppl {ppl:.4f} vs {baseline:.4f} ({increase:+.3%}); linear bytes {ratio:.3f}x bf16")
    assert increase < max_increase
    assert ratio <= max_ratio
