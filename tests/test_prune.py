"""Pruning (issue 20): the masks (N:M keeps exactly N of every M; the sparsity asked is the sparsity got), the three
criteria ordered by the output error they leave, the mask kept through GPTQ, the sparse formats a pruned layer is
stored in (smaller, and the same logits after save and load), and bad input refused before any work."""

from __future__ import annotations

import pytest
import torch

import compress
from compress.errors import RecipeError
from compress.formats import CompressedLinear
from compress.formats.base import storage_summary
from compress.formats.sparse import (
    BitmaskLinear,
    Sparse24IntLinear,
    Sparse24Linear,
    pack_bits,
    pack_positions,
    positions_24,
    unpack_bits,
    unpack_positions,
)
from compress.plugins.prune import rescaled_rows
from compress.plugins.prune.sparsegpt import sparsegpt
from compress.solvers.hessian import Hessian
from compress.sparsity import Pattern, follows, nm_mask, parse_pattern, select_mask, unstructured_mask
from conftest import ARCHS, make_tiny

CALIB = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))


# -- masks ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_the_n_largest_of_every_m(n: int, m: int) -> None:
    scores = torch.randn(16, 64, generator=torch.Generator().manual_seed(n + m))
    keep = nm_mask(scores, n, m)
    runs = keep.reshape(16, -1, m)
    assert (runs.sum(-1) == n).all() and follows(keep, Pattern(n, m))
    grouped = scores.reshape(16, -1, m)
    smallest_kept = torch.where(runs, grouped, float("inf")).min(-1).values
    largest_pruned = torch.where(runs, -float("inf"), grouped).max(-1).values
    assert (smallest_kept >= largest_pruned).all()  # nothing pruned outranks anything kept in its run


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.75])
@pytest.mark.parametrize("per_row", [True, False])
def test_unstructured_mask_prunes_exactly_the_sparsity_asked(sparsity: float, per_row: bool) -> None:
    scores = torch.randn(10, 40, generator=torch.Generator().manual_seed(1))
    keep = unstructured_mask(scores, sparsity, per_row)
    if per_row:
        assert (keep.sum(1) == 40 - round(sparsity * 40)).all()
    else:
        assert int((~keep).sum()) == round(sparsity * 400)
    assert scores[keep].min() >= scores[~keep].max() if not per_row else True


@pytest.mark.parametrize("text, message", [("4:2", "0 < N < M"), ("2:2", "0 < N < M"), ("0:4", "0 < N < M"),
                                           ("half", "neither 'unstructured' nor N:M")])
def test_a_bad_structure_is_named(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_pattern(text)


# -- the criteria, on one layer ------------------------------------------------------------------------------------

def _correlated_inputs(n: int = 2048, width: int = 128) -> torch.Tensor:
    """Inputs with correlated channels of very different scales (as a transformer's are)."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(width, width, generator=g) / width**0.5 + torch.eye(width)
    scales = torch.logspace(-1, 1, width)[torch.randperm(width, generator=g)]
    return (torch.randn(n, width, generator=g) @ mix) * scales


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_output_error_orders_sparsegpt_below_wanda_below_magnitude(structure: str) -> None:
    x = _correlated_inputs()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    pattern = parse_pattern(structure)
    hessian = Hessian(128, torch.device("cpu"))
    hessian.add(x)

    def error(pruned: torch.Tensor) -> float:
        return float((x @ (w - pruned).t()).pow(2).mean())

    magnitude = w * select_mask(w.abs(), pattern, 0.5, per_row=False)
    wanda = w * select_mask(w.abs() * x.pow(2).sum(0).sqrt(), pattern, 0.5)
    pruned, keep = sparsegpt(w, hessian.H, pattern, 0.5)
    assert follows(keep, pattern) and float((~keep).float().mean()) == pytest.approx(0.5)
    assert torch.equal(pruned[~keep], torch.zeros(int((~keep).sum())))
    assert error(pruned) < error(wanda) < error(magnitude)


def test_wanda_rescale_is_each_rows_least_squares_factor() -> None:
    """rescaled_rows: each row's one factor is the least-squares fit of the pruned row's outputs to the full row's
    (any other factor gives more error), so the output error falls below plain Wanda's; the zeros stay zeros."""
    x = _correlated_inputs()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    hessian = Hessian(128, torch.device("cpu"))
    hessian.add(x)
    keep = select_mask(w.abs() * x.pow(2).sum(0).sqrt(), parse_pattern("2:4"), 0.5)
    scaled = rescaled_rows(w, keep, hessian.H)
    assert torch.equal(scaled[~keep], torch.zeros(int((~keep).sum())))

    def row_error(row: torch.Tensor, i: int) -> float:
        return float((x @ (w[i] - row)).pow(2).sum())

    for i in (0, 17, 63):
        best = row_error(scaled[i], i)
        assert best <= min(row_error(scaled[i] * f, i) for f in (0.99, 1.01))
        assert best < row_error(w[i] * keep[i], i)


# -- the methods on models -----------------------------------------------------------------------------------------

def _pruned_layers(model) -> dict[str, CompressedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method, args, stored", [
    ("magnitude", {"sparsity": 0.6}, BitmaskLinear),
    ("wanda", {"structure": "2:4"}, Sparse24Linear),
    ("sparsegpt", {"sparsity": 0.5}, BitmaskLinear),
    ("sparsegpt", {"structure": "2:4"}, Sparse24Linear),
])
def test_each_pruner_stores_the_sparsity_asked_and_loads_to_the_same_logits(arch, method, args, stored,
                                                                            tmp_path) -> None:
    model = make_tiny(arch)
    compress.apply(model, [{"method": method, "args": args}], calib=CALIB, device="cpu")
    layers = _pruned_layers(model)
    assert layers and all(type(m) is stored for m in layers.values())
    for name, layer in layers.items():
        weight = layer.dequantized_weight()
        if "structure" in args:
            assert follows(weight != 0, Pattern(2, 4)), name
            assert float((weight == 0).float().mean()) >= 0.5, name
        else:  # zeros counted: a kept weight may be 0 itself, never fewer zeros than asked
            assert (layer.out_features * layer.in_features - layer.kept) == round(
                args["sparsity"] * layer.out_features * layer.in_features), name
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    compress.save(model, tmp_path / "ck")
    loaded = compress.load(tmp_path / "ck", device="cpu")
    assert {n: type(m) for n, m in _pruned_layers(loaded).items()} == {n: type(m) for n, m in layers.items()}
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)


def test_2of4_then_gptq_stores_only_the_kept_codes_and_keeps_the_zeros(tmp_path) -> None:
    model = make_tiny("llama")
    compress.apply(model, [{"method": "sparsegpt", "args": {"structure": "2:4"}},
                           {"method": "gptq", "args": {"bits": 4, "group_size": 64}}], calib=CALIB, device="cpu")
    layers = _pruned_layers(model)
    assert all(type(m) is Sparse24IntLinear for m in layers.values())
    for layer in layers.values():
        assert follows(layer.dequantized_weight() != 0, Pattern(2, 4))
        assert layer.qweight.shape[1] == layer.in_features // 4  # 4-bit codes of half the columns: a byte holds 2
    dense_int = make_tiny("llama")
    compress.apply(dense_int, [{"method": "gptq", "args": {"bits": 4, "group_size": 64}}], calib=CALIB, device="cpu")
    ratio = lambda m: float(storage_summary(m).split(", ")[1].split("x ")[0])  # noqa: E731
    assert ratio(model) < 0.8 * ratio(dense_int)
    ids = torch.randint(0, 512, (1, 12))
    compress.save(model, tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(compress.load(tmp_path / "ck", device="cpu")(ids).logits, model(ids).logits)


def test_a_transformers_load_of_a_pruned_checkpoint_computes_as_compress_load(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model = make_tiny("qwen2")
    compress.apply(model, [{"method": "magnitude"}], device="cpu")
    compress.save(model, tmp_path / "ck")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


# -- the stored layouts --------------------------------------------------------------------------------------------

def test_2of4_positions_and_bits_round_trip() -> None:
    keep = nm_mask(torch.randn(6, 40), 2, 4)
    index = positions_24(keep)
    assert torch.equal(unpack_positions(pack_positions(index), 40), index)
    mask = torch.rand(5, 21) > 0.5
    assert torch.equal(unpack_bits(pack_bits(mask), 21), mask)


def test_2of4_bf16_is_stored_in_0_5625_of_its_dense_bytes() -> None:
    weight = torch.randn(64, 256, dtype=torch.bfloat16)
    keep = nm_mask(weight.float().abs(), 2, 4)
    layer = Sparse24Linear.from_dense(weight, keep, None)
    assert torch.equal(layer.dequantized_weight(), torch.where(keep, weight, 0))
    stored = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    assert stored / (64 * 256 * 2) == 0.5625


def test_bitmask_layer_computes_with_a_dense_weight_and_saves_its_packed_form() -> None:
    weight = torch.randn(8, 20)
    keep = torch.rand(8, 20, generator=torch.Generator().manual_seed(0)) > 0.5
    layer = BitmaskLinear.from_dense(weight, keep, None)
    assert layer.values is None and torch.equal(layer.dense, torch.where(keep, weight, 0))
    state = layer.state_dict()
    assert set(state) == {"bitmask", "values"} and torch.equal(state["values"], weight[keep])
    empty = BitmaskLinear.empty(20, 8, False, layer.scheme(), torch.float32, "cpu")
    empty.load_state_dict(state)
    assert empty.check_loaded() is None
    empty.after_load()
    assert torch.equal(empty.dense, layer.dense)


# -- bad input -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    ({"sparsity": 1.0}, r"steps\[0\]\.args\.sparsity: .*less than 1"),
    ({"sparsity": 0}, r"steps\[0\]\.args\.sparsity: .*greater than 0"),
    ({"structure": "4:4"}, r"steps\[0\]\.args\.structure: .*0 < N < M"),
    ({"structure": "2:4", "sparsity": 0.3}, r"structure 2:4 prunes 0\.5 of the weights, but sparsity is 0\.3"),
    ({"structure": "2:3"}, r"steps\[0\]\.args\.structure: 2:3 needs in_features divisible by 3; 14 layers are not"),
])
def test_bad_pruning_arguments_are_refused_before_any_weight_changes(args, message) -> None:
    model = make_tiny("llama")
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(RecipeError, match=message):
        compress.apply(model, [{"method": "wanda", "args": args}], calib=CALIB, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("recipe, stored", [("magnitude-50.yaml", "bitmask"), ("wanda-2of4.yaml", "sparse24"),
                                            ("sparsegpt-2of4-w4.yaml", "sparse24-int")])
def test_validate_says_how_pruned_layers_will_be_stored(recipe: str, stored: str, tiny_dirs, calib_text) -> None:
    from click.testing import CliRunner

    from compress_cli import cli
    from conftest import REPO

    result = CliRunner().invoke(cli, ["validate", str(REPO / "recipes" / recipe), "--model", str(tiny_dirs["qwen2"]),
                                      "--calib", str(calib_text)], obj={})
    assert result.exit_code == 0, result.output
    assert f"pruned, then stored sparse as {stored}: 14 layers" in result.output
    assert "cuda-int4" not in result.output  # the int step's kernel does not run a layer stored sparse


def test_a_pruner_after_a_quantizer_is_refused_with_the_order_that_works() -> None:
    model = make_tiny("llama")
    with pytest.raises(RecipeError, match=r"are stored in a format by steps\[0\] \(gptq\); method 'sparsegpt' takes "
                                          r"dense layers"):
        compress.apply(model, [{"method": "gptq"}, {"method": "sparsegpt"}], calib=CALIB, device="cpu")


def test_owl_spreads_sparsity_by_outlier_ratio_and_keeps_the_average() -> None:
    from compress.plugins.prune import owl_sparsity

    ratios = {"b0": 0.010, "b1": 0.030, "b2": 0.020, "b3": 0.010}
    sparsity = owl_sparsity(ratios, 0.5, 0.08)
    assert sum(sparsity.values()) / 4 == pytest.approx(0.5)
    assert sparsity["b1"] < sparsity["b2"] < sparsity["b0"] == sparsity["b3"]  # more outliers, less pruned
    assert max(sparsity.values()) - min(sparsity.values()) == pytest.approx(0.16)  # 2 x lambda apart
    assert all(v == pytest.approx(0.6) for v in owl_sparsity({"a": 0.1, "b": 0.1}, 0.6, 0.08).values())


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_owl_prunes_blocks_unevenly_and_the_model_as_much_as_asked(method: str) -> None:
    model = make_tiny("mistral")
    before = {n: p.clone() for n, p in model.named_parameters()}
    compress.apply(model, [{"method": method, "args": {"sparsity": 0.5, "owl": True, "owl_lambda": 0.1}}],
                   calib=CALIB, device="cpu")
    per_block: dict[str, list[int]] = {}
    for name, layer in _pruned_layers(model).items():
        block = name.split(".self_attn")[0].split(".mlp")[0]
        count = per_block.setdefault(block, [0, 0])
        count[0] += layer.out_features * layer.in_features - layer.kept
        count[1] += layer.out_features * layer.in_features
    sparsity = [pruned / total for pruned, total in per_block.values()]
    assert sparsity[0] != pytest.approx(sparsity[1], abs=0.05)  # 0.4 and 0.6 (two blocks: the extremes)
    assert sum(p for p, _ in per_block.values()) / sum(t for _, t in per_block.values()) == pytest.approx(0.5, abs=1e-3)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "layers" not in n)


def test_owl_streams_as_it_runs_in_memory(tiny_dirs, calib_text, tmp_path) -> None:
    from click.testing import CliRunner
    from safetensors.torch import load_file

    import yaml
    from compress_cli import cli

    stored = {}
    for load in ("memory", "stream"):
        recipe = {"model": {"load": load}, "calibration": {"dataset": str(calib_text), "samples": 8, "seq_len": 64},
                  "steps": [{"method": "wanda", "args": {"owl": True}}]}
        path = tmp_path / f"{load}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        result = CliRunner().invoke(cli, ["apply", str(path), "--model", str(tiny_dirs["qwen2"]), "--output",
                                          str(tmp_path / load)], obj={})
        assert result.exit_code == 0, result.output
        stored[load] = load_file(tmp_path / load / "model.safetensors")
    assert stored["memory"].keys() == stored["stream"].keys()
    assert all(torch.equal(stored["stream"][k], v) for k, v in stored["memory"].items())


def test_owl_with_a_fixed_pattern_is_refused() -> None:
    with pytest.raises(RecipeError, match=r"owl sets a sparsity per block, which 2:4 fixes: use it unstructured"):
        compress.apply(make_tiny("llama"), [{"method": "wanda", "args": {"structure": "2:4", "owl": True}}],
                       calib=CALIB, device="cpu")
