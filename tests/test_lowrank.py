"""Low-rank decomposition (issue 21): the truncation against its closed forms, the factored format, and the method
on the engine; the low-rank correction of quantized layers and its format. The method's save / load / from_pretrained round trip on every architecture is in test_methods.py."""

from __future__ import annotations

import pytest
import torch

import compress
from compress.errors import CompressError, RecipeError
from compress.formats import CompressedLinear
from compress.formats.corrected import CorrectedLinear
from compress.formats.factored import FactoredLinear, rank_for
from compress.formats.integer import IntLinear
from compress.quant import IntScheme
from compress.solvers.lowrank import allocate_ranks, factor
from conftest import make_tiny


def _inputs(n: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """Correlated inputs with a few large channels, as a transformer's are."""
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5
    x = torch.randn(n, cols, generator=gen) @ mix
    x[:, :4] *= 20
    return x


def test_plain_truncation_is_the_best_rank_r_approximation() -> None:
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(48, 64, generator=gen, dtype=torch.float64).float()
    s = torch.linalg.svdvals(W.double())
    A, B = factor(W, 10)
    assert A.shape == (10, 64) and B.shape == (48, 10)
    # Eckart-Young: the error is the norm of the singular values left out
    assert (W - B @ A).norm().item() == pytest.approx(s[10:].norm().item(), rel=1e-4)


def test_whitened_truncation_minimises_the_output_error() -> None:
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(48, 64, generator=gen)
    X = _inputs(2048, 64, gen)
    H = X.t() @ X
    A, B = factor(W, 12, H, damp=1e-6)
    Ap, Bp = factor(W, 12)
    out = lambda a, b: (X @ (W - b @ a).t()).norm().item()  # noqa: E731
    # the optimum on these inputs is the truncated SVD of X W^T: its left-out singular values
    best = torch.linalg.svdvals((X @ W.t()).double())[12:].norm().item()
    assert out(A, B) == pytest.approx(best, rel=1e-3)
    assert out(A, B) < 0.5 * out(Ap, Bp)  # plain SVD is far from it where inputs are uneven
    assert (W - B @ A).norm() > (W - Bp @ Ap).norm()  # and it wins on the weight error, which is not the goal


def test_rank_holds_at_most_the_ratio_of_parameters() -> None:
    for in_f, out_f, ratio in [(128, 128, 0.8), (4096, 14336, 0.6), (576, 1536, 0.5), (10, 7, 0.3)]:
        r = rank_for(in_f, out_f, ratio)
        assert r * (in_f + out_f) <= ratio * in_f * out_f < (r + 1) * (in_f + out_f)
    assert rank_for(4, 4, 0.1) == 0


def test_factored_layer_runs_as_its_product_and_round_trips(tmp_path) -> None:
    gen = torch.Generator().manual_seed(2)
    A, B, bias = torch.randn(5, 32, generator=gen), torch.randn(24, 5, generator=gen), torch.randn(24, generator=gen)
    layer = FactoredLinear.from_factors(A, B, bias, torch.float32)
    x = torch.randn(3, 32, generator=gen)
    torch.testing.assert_close(layer(x), x @ (B @ A).t() + bias)
    torch.testing.assert_close(layer.dequantized_weight(), B @ A)
    empty = FactoredLinear.empty(32, 24, True, layer.scheme(), torch.float32, device="cpu")
    empty.load_state_dict(layer.state_dict())
    torch.testing.assert_close(empty(x), layer(x), rtol=0, atol=0)
    layer.A[0, 0] = float("nan")
    assert layer.check_loaded() == "non-finite factors"


def test_lowrank_factors_every_block_layer_at_the_ratio_and_whitened_beats_plain_svd() -> None:
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))
    calib = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(4))
    base = make_tiny("llama")
    with torch.no_grad():
        before = base(ids).logits
    errors = {}
    for mode in ("whitened", "svd"):
        args = {"mode": mode, "ratio": 0.5, "allocation": "uniform"}
        model = compress.apply(make_tiny("llama"), [{"method": "lowrank", "args": args}],
                               calib=calib if mode == "whitened" else None, device="cpu")
        layers = [m for m in model.modules() if isinstance(m, CompressedLinear)]
        assert layers and all(isinstance(m, FactoredLinear) for m in layers)
        for m in layers:
            assert m.rank == rank_for(m.in_features, m.out_features, 0.5)
            assert m.A.numel() + m.B.numel() <= 0.5 * m.in_features * m.out_features
        with torch.no_grad():
            errors[mode] = ((model(ids).logits - before).norm() / before.norm()).item()
    assert errors["whitened"] < errors["svd"], errors


def test_global_allocation_gives_rank_where_the_spectrum_is_flat_and_meets_the_budget() -> None:
    steep = torch.tensor([2.0**-k for k in range(64)])  # one layer's energy falls fast, the other's not at all
    flat = torch.ones(64)
    ranks = allocate_ranks({"steep": (64, 64, steep), "flat": (64, 64, flat), "wide": (64, 256, flat)}, 0.4)
    cost = ranks["steep"] * 128 + ranks["flat"] * 128 + ranks["wide"] * 320
    budget = 0.4 * (64 * 64 * 2 + 64 * 256)
    assert budget - 320 < cost <= budget  # met to within the largest layer's step
    assert ranks["steep"] < 10 < ranks["flat"]
    assert ranks["wide"] < ranks["flat"]  # a rank of the wide layer costs more for the same share of its energy


def test_global_allocation_keeps_the_ratio_over_all_layers() -> None:
    calib = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(4))
    model = compress.apply(make_tiny("llama"), [{"method": "lowrank", "args": {"ratio": 0.5}}], calib=calib,
                           device="cpu")
    layers = [m for m in model.modules() if isinstance(m, FactoredLinear)]
    kept = sum(m.A.numel() + m.B.numel() for m in layers)
    total = sum(m.in_features * m.out_features for m in layers)
    assert len(layers) == 14 and 0.5 * total - 384 < kept <= 0.5 * total
    assert len({m.rank for m in layers}) > 2  # not one rank for all


def test_fitting_the_original_outputs_changes_only_what_follows_a_compressed_layer() -> None:
    """With fit_original a layer is truncated from the weight that best gives the uncompressed model's outputs on the
    compressed model's inputs: the first group of the first block sees the original inputs, so its factors are
    those of the plain whitened truncation; every layer after a factored one differs."""
    calib = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(4))
    factored = {}
    for fit in (True, False):
        args = {"ratio": 0.5, "fit_original": fit, "allocation": "uniform"}
        model = compress.apply(make_tiny("llama"), [{"method": "lowrank", "args": args}], calib=calib, device="cpu")
        factored[fit] = {n: m for n, m in model.named_modules() if isinstance(m, FactoredLinear)}
    for name, layer in factored[True].items():
        same = torch.allclose(layer.dequantized_weight(), factored[False][name].dequantized_weight(), atol=1e-5)
        assert same == (".layers.0.self_attn." in name and name.split(".")[-1] in ("q_proj", "k_proj", "v_proj")), name


def test_a_ratio_below_one_rank_is_refused_before_any_weight_changes() -> None:
    model = make_tiny("llama")
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(RecipeError, match=r"steps\[0\]\.args\.ratio: 0\.001 of the parameters is less than one "
                                          r"rank of 14 layers \(model\.layers\.0\.mlp\.down_proj, .*raise the ratio"):
        compress.apply(model, [{"method": "lowrank", "args": {"mode": "svd", "ratio": 0.001, "allocation": "uniform"}}],
                       device="cpu")
    with pytest.raises(RecipeError, match=r"steps\[0\]\.args\.ratio: 0\.001 of the parameters of the 14 layers is "
                                          r"less than one rank for each of them: raise the ratio"):
        compress.apply(model, [{"method": "lowrank", "args": {"mode": "svd", "ratio": 0.001}}], device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# -- low-rank correction of quantization error ------------------------------------------------------------------


def _q_proj_inputs(model, calib: torch.Tensor) -> torch.Tensor:
    seen = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(calib)
    hook.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])


def test_correction_is_the_best_rank_r_fit_of_the_quantization_error_on_the_layer_inputs() -> None:
    """On the first layer group (whose inputs no earlier correction changed), the correction of a layer's own error
    reaches the optimum of ||X (W - Q - B A)^T|| over rank-r pairs: the left-out singular values of X (W - Q)^T."""
    calib = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(4))
    original = make_tiny("llama")
    X = _q_proj_inputs(original, calib).double()
    W = original.model.layers[0].self_attn.q_proj.weight.double()
    steps = [{"method": "rtn", "args": {"bits": 3, "group_size": 32}},
             {"method": "lowrank-correct", "args": {"rank": 6, "fit_original": False, "damp": 1e-7}}]
    model = compress.apply(make_tiny("llama"), steps, calib=calib, device="cpu")
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, CorrectedLinear) and isinstance(layer.base, IntLinear) and layer.rank == 6
    Q = layer.base.dequantized_weight(torch.float64)
    error = X @ (W - Q).t()
    best = torch.linalg.svdvals(error)[6:].norm().item()
    corrected = (X @ (W - layer.dequantized_weight(torch.float64)).t()).norm().item()
    assert corrected == pytest.approx(best, rel=1e-3)
    assert corrected < 0.92 * error.norm().item()  # random weights: their rounding error is nearly white


def test_corrected_format_runs_base_plus_product_and_round_trips() -> None:
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(24, 64, generator=gen)
    base = IntLinear.from_weight(W, torch.randn(24, generator=gen), IntScheme(bits=4, symmetric=True, group_size=32),
                                 torch.float32)
    A, B = torch.randn(3, 64, generator=gen), torch.randn(24, 3, generator=gen)
    layer = CorrectedLinear.wrap(base, A, B, torch.float32)
    x = torch.randn(5, 64, generator=gen)
    torch.testing.assert_close(layer(x), base(x) + x @ (B @ A).t())
    torch.testing.assert_close(layer.dequantized_weight(), base.dequantized_weight() + B @ A)
    empty = CorrectedLinear.empty(64, 24, base.bias is not None, layer.scheme(), torch.float32, device="cpu")
    empty.load_state_dict(layer.state_dict())
    torch.testing.assert_close(empty(x), layer(x), rtol=0, atol=0)
    assert set(layer.state_dict()) >= {"A", "B", "base.qweight", "base.scales"}
    layer.B[1, 1] = float("inf")
    assert layer.check_loaded() == "non-finite correction factors"


def test_correction_needs_a_quantization_step_of_its_own_stage_and_a_rank_below_the_width() -> None:
    model = make_tiny("llama")
    calib = torch.randint(0, 512, (4, 64))
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(RecipeError, match=r"steps\[0\]: 14 layers .* are dense; method 'lowrank-correct' takes format "
                                          r"layers: put a quantization step \(rtn, gptq, awq, \.\.\.\) on these layers"):
        compress.apply(model, [{"method": "lowrank-correct"}], calib=calib, device="cpu")
    staged = {"stages": [{"steps": [{"method": "rtn", "args": {"bits": 4, "group_size": 32}}]},
                         {"steps": [{"method": "lowrank-correct", "args": {"rank": 128}}]}]}
    with pytest.raises(RecipeError) as err:
        compress.apply(model, staged, calib=calib, device="cpu")
    assert "stages[1].steps[0].args.rank: 128 is not below min(in_features, out_features) of 14 layers" in str(err.value)
    assert ("were stored by stages[0].steps[0] (rtn), in an earlier stage: method 'lowrank-correct' reads their "
            "original weights, which only the stage that stores them still has: put the two steps in the same stage"
            in str(err.value))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_gptq_fitting_codes_and_pair_together_beats_correcting_after() -> None:
    """gptq's correction_rank: the pair and the codes fitted in turns (the codes of the weight less the pair, with
    ranges chosen afresh) leave less output error on the layer's inputs than the same rank fitted to GPTQ's error
    afterwards, which leaves less than GPTQ alone; the layer is stored as the corrected format."""
    calib = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(4))
    original = make_tiny("llama")
    X = _q_proj_inputs(original, calib).double()
    W = original.model.layers[0].self_attn.q_proj.weight.double()
    gptq = {"bits": 3, "group_size": 32, "act_order": True, "mse": True}
    recipes = {"gptq": [{"method": "gptq", "args": gptq}],
               "after": [{"method": "gptq", "args": gptq}, {"method": "lowrank-correct", "args": {"rank": 8,
                                                                                                 "fit_original": False}}],
               "together": [{"method": "gptq", "args": {**gptq, "correction_rank": 8}}]}
    errors = {}
    for name, steps in recipes.items():
        layer = compress.apply(make_tiny("llama"), steps, calib=calib, device="cpu").model.layers[0].self_attn.q_proj
        errors[name] = (X @ (W - layer.dequantized_weight(torch.float64)).t()).norm().item()
        if name != "gptq":
            assert isinstance(layer, CorrectedLinear) and layer.rank == 8 and isinstance(layer.base, IntLinear)
    assert errors["together"] < 0.95 * errors["after"] < 0.95 * errors["gptq"], errors


def test_gptq_refuses_a_correction_of_pruned_layers() -> None:
    with pytest.raises(CompressError, match=r"gptq: .*q_proj.* are pruned; a low-rank correction would fill the "
                                            r"pruned weights back in"):
        compress.apply(make_tiny("llama"), [{"method": "magnitude", "args": {"sparsity": 0.5}},
                                            {"method": "gptq", "args": {"bits": 4, "group_size": 32,
                                                                        "correction_rank": 4}}],
                       calib=torch.randint(0, 512, (4, 64)), device="cpu")


def test_rank_and_energy_set_each_layers_rank() -> None:
    calib = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(4))
    fixed = compress.apply(make_tiny("llama"), [{"method": "lowrank", "args": {"rank": 20}}], calib=calib, device="cpu")
    assert {m.rank for m in fixed.modules() if isinstance(m, FactoredLinear)} == {20}
    ranks = {}
    for energy in (0.5, 0.9):
        model = compress.apply(make_tiny("llama"), [{"method": "lowrank", "args": {"mode": "svd", "energy": energy}}],
                               device="cpu")
        ranks[energy] = {n: m.rank for n, m in model.named_modules() if isinstance(m, FactoredLinear)}
        for name, rank in ranks[energy].items():  # the smallest rank keeping that share of the weight's energy
            s2 = torch.linalg.svdvals(make_tiny("llama").get_submodule(name).weight.double()).square()
            kept = s2.cumsum(0) / s2.sum()
            i, o = model.get_submodule(name).in_features, model.get_submodule(name).out_features
            cap = (i * o - 1) // (i + o)  # the largest rank whose factors are smaller than the layer
            assert rank == min(cap, int((kept < energy - 1e-12).sum()) + 1), name
    assert all(ranks[0.5][n] < ranks[0.9][n] for n in ranks[0.5])


def test_rank_budgets_are_checked_before_any_weight_changes() -> None:
    model = make_tiny("llama")
    with pytest.raises(RecipeError) as err:
        compress.apply(model, [{"method": "lowrank", "args": {"mode": "svd", "rank": 60}}], device="cpu")
    assert str(err.value).endswith(
        "steps[0].args.rank: at rank 60 the factors of 4 layers (model.layers.0.self_attn.k_proj, "
        "model.layers.0.self_attn.v_proj, model.layers.1.self_attn.k_proj, ...) are not smaller than the layers (rank "
        "x (in + out) >= in x out): lower the rank, or ignore those layers to keep them dense")
    with pytest.raises(RecipeError, match=r"args\.rank: 300 is larger than min\(in_features, out_features\) of 14 "
                                          r"layers .*the smallest is 64\): lower the rank"):
        compress.apply(model, [{"method": "lowrank", "args": {"mode": "svd", "rank": 300}}], device="cpu")
    with pytest.raises(RecipeError, match=r"give one of ratio, rank and energy, not ratio and rank"):
        compress.apply(model, [{"method": "lowrank", "args": {"ratio": 0.5, "rank": 8}}], device="cpu")
    with pytest.raises(RecipeError, match=r"energy"):
        compress.apply(model, [{"method": "lowrank", "args": {"mode": "svd", "energy": 1.5}}], device="cpu")


@pytest.mark.parametrize("bits", [8, 4])
def test_a_pair_stored_in_bits_computes_as_rounded_and_round_trips(bits: int, tmp_path) -> None:
    """gptq's correction_bits: the checkpoint holds the pair's codes only (no float pair), the layer computes with
    exactly the rounded pair after loading, and the codes were fitted with that rounding (the weight quantized once
    more less the rounded pair), so the layer's output error stays well under GPTQ's alone."""
    calib = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(4))
    original = make_tiny("llama")
    X = _q_proj_inputs(original, calib).double()
    W = original.model.layers[0].self_attn.q_proj.weight.double()
    gptq = {"bits": 3, "group_size": 32}
    errors = {}
    for name, extra in {"gptq": {}, "bf16": {"correction_rank": 8}, "bits": {"correction_rank": 8,
                                                                             "correction_bits": bits}}.items():
        model = compress.apply(make_tiny("llama"), [{"method": "gptq", "args": {**gptq, **extra}}], calib=calib,
                               device="cpu")
        layer = model.model.layers[0].self_attn.q_proj
        errors[name] = (X @ (W - layer.dequantized_weight(torch.float64)).t()).norm().item()
    assert layer.scheme()["pair_bits"] == bits and isinstance(layer.a, IntLinear) and layer.a.int_scheme.bits == bits
    state = layer.state_dict()
    assert "A" not in state and "B" not in state and {"a.qweight", "b.qweight", "base.qweight"} <= set(state)
    torch.testing.assert_close(layer.A, layer.a.dequantized_weight(layer.A.dtype), rtol=0, atol=0)
    assert errors["bits"] < 0.9 * errors["gptq"] and errors["bf16"] < errors["gptq"], errors
    compress.save(model, tmp_path / "ck")
    loaded = compress.load(tmp_path / "ck", device="cpu")
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
