"""compress export --format gptq and compress.load of GPTQ checkpoints: the layout checked against its specification
by an unpacker written here from it (not compress's), bit-exact round trips of codes, scales and zero points on
every test architecture, and what the layout cannot express refused with the layer and the reason."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import compress
from compress.checkpoint import save
from compress.errors import CheckpointError, UsageError
from compress.export import export
from compress.formats import compressed_modules
from compress_cli import cli
from conftest import ARCHS, RAGGED, make_tiny


def checkpoint(folder: Path, arch: str, steps: list[dict], dtype=torch.bfloat16, calib=None) -> Path:
    model = compress.apply(make_tiny(arch, dtype=dtype), steps, calib=calib, device="cpu")
    save(model, folder)
    return folder


def spec_weights(tensors: dict[str, np.ndarray], layer: str, bits: int, v1: bool) -> np.ndarray:
    """A GPTQ layer's weight [out, in] read as the layout's description says, bit by bit (float64)."""
    qweight = tensors[f"{layer}.qweight"].astype(np.int64) & 0xFFFFFFFF
    qzeros = tensors[f"{layer}.qzeros"].astype(np.int64) & 0xFFFFFFFF
    scales, g_idx = tensors[f"{layer}.scales"].astype(np.float64), tensors[f"{layer}.g_idx"]
    per, mask = 32 // bits, 2**bits - 1
    n_in, n_out = qweight.shape[0] * per, qweight.shape[1]
    w = np.zeros((n_out, n_in))
    for i in range(n_in):
        code = (qweight[i // per] >> ((i % per) * bits)) & mask  # [out]
        g = g_idx[i]
        zero = np.array([(qzeros[g, o // per] >> ((o % per) * bits)) & mask for o in range(n_out)])
        w[:, i] = scales[g] * (code - ((zero + 1) & mask if v1 else zero))
    return w


def read(folder: Path) -> dict[str, np.ndarray]:
    return {k: (v.float() if v.dtype in (torch.bfloat16, torch.float16) else v).numpy()
            for k, v in load_file(folder / "model.safetensors").items()}


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_tensors_follow_the_specification(tmp_path: Path, symmetric: bool) -> None:
    src = checkpoint(tmp_path / "w4", "llama", [{"method": "rtn", "args": {"bits": 4, "group_size": 32,
                                                                           "symmetric": symmetric}}])
    out = export(src, "gptq", tmp_path / "gptq")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["bits"] == 4 and config["group_size"] == 32
    assert config["sym"] is symmetric and config["desc_act"] is False
    tensors = read(out)
    model = compress.load(src, device="cpu")
    for name, layer in compressed_modules(model):
        assert tensors[f"{name}.qweight"].dtype == np.int32 and tensors[f"{name}.qzeros"].dtype == np.int32
        assert tensors[f"{name}.qweight"].shape == (layer.in_features // 8, layer.out_features)
        expected = layer.dequantized_weight(torch.float64).numpy()
        np.testing.assert_array_equal(spec_weights(tensors, name, 4, config["checkpoint_format"] == "gptq"), expected)
    assert "model.layers.0.self_attn.q_proj.weight" not in tensors and "model.embed_tokens.weight" in tensors


@pytest.mark.parametrize("arch", ARCHS + [RAGGED])
def test_rtn_round_trip_is_bit_exact(tmp_path: Path, arch: str) -> None:
    for symmetric in (True, False):
        src = checkpoint(tmp_path / f"w4-{symmetric}", arch,
                         [{"method": "rtn", "args": {"bits": 4, "group_size": 32, "symmetric": symmetric}}])
        _assert_round_trip(src, export(src, "gptq", tmp_path / f"gptq-{symmetric}"))


def test_gptq_round_trip_is_bit_exact_and_2_and_8_bits_too(tmp_path: Path, calib_text: Path) -> None:
    from compress.model import load_tokenizer
    from conftest import TINY_TOKENIZER

    from compress.calibration.data import calibration_set

    calib = calibration_set(load_tokenizer(str(TINY_TOKENIZER)), str(calib_text), 8, 64)
    steps = [{"method": "gptq", "args": {"bits": 4, "group_size": 32, "symmetric": True, "act_order": True}}]
    src = checkpoint(tmp_path / "gptq-w4", "qwen2", steps, calib=calib)
    _assert_round_trip(src, export(src, "gptq", tmp_path / "out"))
    for bits in (2, 8):
        src = checkpoint(tmp_path / f"w{bits}", "llama", [{"method": "rtn", "args": {"bits": bits, "group_size": 64}}])
        _assert_round_trip(src, export(src, "gptq", tmp_path / f"out{bits}"))


def _assert_round_trip(src: Path, out: Path) -> None:
    a, b = compress.load(src, device="cpu"), compress.load(out, device="cpu")
    la, lb = dict(compressed_modules(a)), dict(compressed_modules(b))
    assert la.keys() == lb.keys() and la
    for name, layer in la.items():
        other = lb[name]
        assert torch.equal(layer.codes(), other.codes()) and torch.equal(layer.scales, other.scales), name
        assert torch.equal(layer.zero_points(), other.zero_points()), name
        # restricted is how the method chose its scales (absmax int8: 127 / max|w|), not part of what is stored
        assert replace(layer.int_scheme, restricted=False) == replace(other.int_scheme, restricted=False), name
    ids = torch.randint(0, 500, (2, 24))
    assert torch.equal(a(ids).logits, b(ids).logits)


def test_what_the_layout_cannot_express_is_refused_naming_the_layer(tmp_path: Path) -> None:
    cases = {
        "w3": ([{"method": "rtn", "args": {"bits": 3, "group_size": 32}}], "q_proj has 3-bit codes"),
        "fp8": ([{"method": "fp8"}], "is stored as 'fp8' \\(the GPTQ layout holds integer codes only\\)"),
        "mixed": ([{"method": "rtn", "targets": ["gate_proj", "up_proj", "down_proj"],
                    "args": {"bits": 4, "group_size": 32}},
                   {"method": "rtn", "targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
                    "args": {"bits": 4, "group_size": 64}}],
                  "layers of different bit widths or group sizes \\(4-bit, group 32, 4-bit, group 64\\)"),
        "partial": ([{"method": "rtn", "targets": ["gate_proj", "up_proj", "down_proj"],
                      "args": {"bits": 4, "group_size": 32}}],
                    "self_attn.q_proj is not quantized"),
    }
    for name, (steps, message) in cases.items():
        src = checkpoint(tmp_path / name, "llama", steps)
        with pytest.raises(CheckpointError, match=message):
            export(src, "gptq", tmp_path / f"{name}-out")
        assert not (tmp_path / f"{name}-out").exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial folder left


def test_an_act_order_gptq_checkpoint_is_refused_at_load(tmp_path: Path) -> None:
    src = checkpoint(tmp_path / "w4", "llama", [{"method": "rtn", "args": {"bits": 4, "group_size": 32}}])
    out = export(src, "gptq", tmp_path / "gptq")
    tensors = load_file(out / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.g_idx"
    tensors[name] = tensors[name][torch.randperm(tensors[name].numel())]  # groups no longer runs of inputs
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="q_proj has inputs whose groups are not runs of consecutive inputs "
                                              "\\(an act-order checkpoint, desc_act: true\\)"):
        compress.load(out, device="cpu")


def test_cli_export_then_eval_reads_it(tmp_path: Path) -> None:
    src = checkpoint(tmp_path / "w4", "qwen2", [{"method": "rtn", "args": {"bits": 4, "group_size": 32}}])
    runner = CliRunner()
    result = runner.invoke(cli, ["export", str(src), "--format", "gptq", "--output", str(tmp_path / "g")], obj={})
    assert result.exit_code == 0, result.output
    again = runner.invoke(cli, ["export", str(src), "--format", "gptq", "--output", str(tmp_path / "g")], obj={})
    assert again.exit_code == 2 and "already exists; pass --overwrite" in again.output
    plain = tmp_path / "plain"
    make_tiny("llama").save_pretrained(plain)
    refused = runner.invoke(cli, ["export", str(plain), "--format", "gptq", "--output", str(tmp_path / "p")], obj={})
    assert refused.exit_code == 2 and "is not a compress checkpoint" in refused.output
    with pytest.raises(UsageError, match="compress exports gptq"):
        export(src, "awq", tmp_path / "x")


# -- compressed-tensors ----------------------------------------------------------------------------------------

LOAD_WITH_TRANSFORMERS = """
import sys, torch
from transformers import AutoModelForCausalLM, CompressedTensorsConfig
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=CompressedTensorsConfig(dequantize=True))
torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
assert "compress" not in sys.modules
"""

CT_CASES = {
    "w4": [{"method": "rtn", "args": {"bits": 4, "group_size": 32}}],
    "w4-asymmetric": [{"method": "rtn", "args": {"bits": 4, "group_size": 32, "symmetric": False}}],
    "w3": [{"method": "rtn", "args": {"bits": 3, "group_size": 32}}],
    "w4-channel": [{"method": "rtn", "args": {"bits": 4, "group_size": None}}],
    "int8-absmax": [{"method": "int8", "args": {"scheme": "absmax", "granularity": "channel"}}],
    "int8-zeropoint": [{"method": "int8", "args": {"scheme": "zero_point", "granularity": "channel"}}],
    "fp8-weight-only": [{"method": "fp8", "args": {"activations": "none"}}],
}


def test_ct_packing_is_the_layouts_bit_stream() -> None:
    """Value j of a row at bit j * bits of the row's little-endian bit stream, across word boundaries."""
    from compress.layouts.compressed_tensors import pack, unpack

    for bits in range(2, 9):
        values = torch.randint(0, 2**bits, (3, 45), dtype=torch.uint8)
        words = pack(values, bits)
        assert words.dtype == torch.int32 and words.shape == (3, -(-45 * bits // 32))
        stream = [(int(w) & 0xFFFFFFFF) >> k & 1 for w in words[1] for k in range(32)]
        for j in range(45):
            assert sum(stream[j * bits + k] << k for k in range(bits)) == values[1, j]
        assert torch.equal(unpack(words, bits, 45), values)


def test_ct_packing_equals_the_compressed_tensors_packages() -> None:
    """The format's own packer, where it is installed: the same words, and its unpacker reads ours back."""
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    from compress.layouts.compressed_tensors import pack

    for bits in range(2, 9):
        for width in (32, 40, 7):
            codes = torch.randint(0, 2**bits, (5, width), dtype=torch.uint8)
            signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
            assert torch.equal(pack(codes, bits), helpers.pack_to_int32(signed, bits))
            assert torch.equal(helpers.unpack_from_int32(pack(codes, bits), bits, codes.shape), signed)


@pytest.mark.parametrize("case", list(CT_CASES))
def test_ct_export_loads_in_transformers_without_compress(tmp_path: Path, case: str) -> None:
    pytest.importorskip("compressed_tensors")
    import subprocess
    import sys

    src = checkpoint(tmp_path / case, "qwen2", CT_CASES[case])
    out = export(src, "compressed-tensors", tmp_path / "ct")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["quantization_status"] == "compressed"
    assert config["ignore"] == ["lm_head"]
    ids = torch.randint(0, 500, (2, 24))
    torch.save(ids, tmp_path / "ids.pt")
    done = subprocess.run([sys.executable, "-c", LOAD_WITH_TRANSFORMERS, str(out), str(tmp_path / "ids.pt"),
                           str(tmp_path / "logits.pt")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = torch.load(tmp_path / "logits.pt")
    ours = compress.load(src, device="cpu")(ids).logits
    if case.startswith(("int8", "fp8")):  # compress's int8 layer scales after the matmul on the codes, its fp8 layer
        torch.testing.assert_close(theirs, ours, atol=0.05, rtol=0.02)  # dequantizes in float32: bf16 roundings differ
    else:  # the same weights dequantized the same way: identical
        assert torch.equal(theirs, ours)


def test_ct_refuses_what_it_cannot_express(tmp_path: Path) -> None:
    src = checkpoint(tmp_path / "ragged", RAGGED, [{"method": "rtn", "args": {"bits": 4, "group_size": 64}}])
    with pytest.raises(CheckpointError, match="q_proj has a ragged last group \\(160 inputs in groups of 64"):
        export(src, "compressed-tensors", tmp_path / "out")
    src = checkpoint(tmp_path / "2of4", "llama", [{"method": "magnitude", "args": {"structure": "2:4"}}])
    with pytest.raises(CheckpointError, match="q_proj has the 'sparse24' format"):
        export(src, "compressed-tensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["w4", "w4-asymmetric", "w3", "w4-channel", "int8-absmax", "int8-zeropoint"])
def test_ct_round_trip_through_compress_load_is_bit_exact(tmp_path: Path, case: str) -> None:
    src = checkpoint(tmp_path / case, "llama", CT_CASES[case])
    _assert_round_trip(src, export(src, "compressed-tensors", tmp_path / "ct"))


def test_ct_import_refuses_what_the_int_format_cannot_hold(tmp_path: Path) -> None:
    src = checkpoint(tmp_path / "fp8", "llama", CT_CASES["fp8-weight-only"])
    out = export(src, "compressed-tensors", tmp_path / "ct")
    with pytest.raises(CheckpointError, match="compressed-tensors layers compress cannot run: model.layers.0.self_attn"
                                              ".q_proj has a float scheme of strategy 'channel'"):
        compress.load(out, device="cpu")
    src = checkpoint(tmp_path / "w4", "llama", CT_CASES["w4"])
    out = export(src, "compressed-tensors", tmp_path / "ct4")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="activation-ordered groups"):
        compress.load(out, device="cpu")


# -- AWQ (read only) -------------------------------------------------------------------------------------------

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def awq_pack(x: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's GEMM packing as its description gives it: [n, m] nibbles to int32 [n, m / 8], word c's nibble k
    holding column 8c + AWQ_ORDER[k]."""
    out = torch.zeros(x.shape[0], x.shape[1] // 8, dtype=torch.int64)
    for c in range(x.shape[1] // 8):
        for k, column in enumerate(AWQ_ORDER):
            out[:, c] |= x[:, 8 * c + column].to(torch.int64) << (4 * k)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def awq_checkpoint(src: Path, out: Path, version: str = "gemm") -> Path:
    from compress.layouts import other_tensors

    model = compress.load(src, device="cpu")
    layers = dict(compressed_modules(model))
    tensors = other_tensors(model, list(layers))
    for name, layer in layers.items():
        tensors[f"{name}.qweight"] = awq_pack(layer.codes().t())
        tensors[f"{name}.qzeros"] = awq_pack(layer.zero_points().round().t())
        tensors[f"{name}.scales"] = layer.scales.t().to(torch.float16).contiguous()
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                     "version": version}
    (out / "config.json").write_text(json.dumps(config, default=str))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_an_awq_gemm_checkpoint_loads_bit_exact(tmp_path: Path, arch: str) -> None:
    src = checkpoint(tmp_path / "w4", arch, [{"method": "rtn", "args": {"bits": 4, "group_size": 32,
                                                                        "symmetric": False}}])
    _assert_round_trip(src, awq_checkpoint(src, tmp_path / "awq"))


def test_other_awq_versions_are_refused(tmp_path: Path) -> None:
    src = checkpoint(tmp_path / "w4", "llama", [{"method": "rtn", "args": {"bits": 4, "group_size": 32,
                                                                           "symmetric": False}}])
    out = awq_checkpoint(src, tmp_path / "awq", version="gemv")
    with pytest.raises(CheckpointError, match="an AWQ checkpoint of version 'gemv' at 4 bits; compress reads the GEMM"):
        compress.load(out, device="cpu")
