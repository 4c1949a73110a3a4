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


def test_ref_a_2of4_pruning_orders_the_methods_and_halves_the_layers(baseline: float, valid_ids, tmp_path: Path,
                                                                     record_property) -> None:
    """The shipped 2:4 recipes end to end (apply, save, load, perplexity) on 16 x 512 calibration tokens, a
    sixteenth of issue 20's protocol, to keep the default run short (about two minutes). Measured so (2026-12-06):
    magnitude +129%, Wanda +60% (with rescale; +82% without), SparseGPT +44% (the full protocol: +125%, +60%, +30%,
    docs/measurements.md). The bounds leave room for thread-count noise and sit between the methods: a SparseGPT no better than Wanda, or a
    Wanda no better than magnitude, fails; magnitude's bound only catches a broken pruner."""
    from transformers import AutoTokenizer

    from compress.calibration.data import calibration_set
    from compress.eval.memory import layout_bytes

    calib = calibration_set(AutoTokenizer.from_pretrained(REF_A), str(REFCODE / "calib.txt"), 16, 512, seed=0)
    bounds = {"magnitude-2of4.yaml": 2.0, "wanda-2of4.yaml": 0.8, "sparsegpt-2of4.yaml": 0.6}
    increase = {}
    for recipe, bound in bounds.items():
        model = ref_a()
        compress.apply(model, Path(__file__).parents[1] / "recipes" / recipe, calib=calib, device="cpu")
        compress.save(model, tmp_path / recipe)
        loaded = compress.load(tmp_path / recipe, device="cpu")
        increase[recipe] = perplexity(loaded, valid_ids, PROTOCOL, progress=False).perplexity / baseline - 1
        layouts = layout_bytes(loaded)
        record_property(recipe, increase[recipe])
        print(f"{recipe}: perplexity {increase[recipe]:+.1%} vs the original; {layouts['sparse24']['layers']} layers "
              "stored sparse24")
        # every block's linear layer stored 2:4: half the float32 values plus 2 bits a kept value; the head dense
        assert set(layouts) == {"sparse24", "dense"} and layouts["dense"]["layers"] == 1
        assert layouts["sparse24"]["sparsity"] == 0.5
        assert layouts["sparse24"]["stored_bytes"] == layouts["sparse24"]["dense_bytes"] * (0.5 + 1 / 32)
        assert increase[recipe] < bound, recipe
    assert increase["sparsegpt-2of4.yaml"] < increase["wanda-2of4.yaml"] < increase["magnitude-2of4.yaml"]
