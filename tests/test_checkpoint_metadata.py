"""A checkpoint whose config.json no longer matches its tensors (edited or damaged) is refused at load with the
layers named, instead of loading and computing garbage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import compress
from compress.errors import CheckpointError
from conftest import make_tiny


def _edited(tmp_path: Path, method: dict, **changes) -> Path:
    model = make_tiny("llama")
    compress.apply(model, [method], device="cpu")
    out = compress.save(model, tmp_path / "ck")
    config = json.loads((out / "config.json").read_text())
    for scheme in config["quantization_config"]["layers"].values():
        scheme.update(changes)
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_codes_wider_than_the_declared_bits_are_refused(tmp_path: Path) -> None:
    """A 4-bit checkpoint relabelled 3-bit has the same tensor shapes; it loaded and gave perplexity 78,317."""
    out = _edited(tmp_path, {"method": "rtn", "args": {"bits": 4, "group_size": 64}}, bits=3)
    with pytest.raises(CheckpointError, match=r"14 compressed layers do not match the scheme the checkpoint's "
                                              r"config\.json declares: model\.layers\.0\.self_attn\.q_proj \(codes wider "
                                              r"than the declared 3 bits\).*re-create the checkpoint"):
        compress.load(out, device="cpu")


def test_a_true_three_bit_checkpoint_loads(tmp_path: Path) -> None:
    out = _edited(tmp_path, {"method": "rtn", "args": {"bits": 3, "group_size": 64}})
    assert compress.load(out, device="cpu").model.layers[0].mlp.up_proj.int_scheme.bits == 3


def test_non_finite_scales_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    out = _edited(tmp_path, {"method": "fp8", "args": {"activations": "none"}})
    tensors = load_file(out / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight_scale"][3] = float("nan")
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 compressed layers .*model\.layers\.1\.mlp\.down_proj \(weight scales "
                                              r"that are not finite and positive\)"):
        compress.load(out, device="cpu")


def test_a_changed_group_size_is_refused(tmp_path: Path) -> None:
    out = _edited(tmp_path, {"method": "rtn", "args": {"bits": 4, "group_size": 64}}, group_size=32)
    with pytest.raises(CheckpointError, match=r"could not load checkpoint"):
        compress.load(out, device="cpu")


def test_tensors_the_config_declares_but_the_weights_lack_are_refused(tmp_path: Path) -> None:
    """Relabelled asymmetric, a symmetric checkpoint's layers want zero points it never stored; they were left as
    whatever memory held."""
    from compress.formats.integer import IntLinear

    out = _edited(tmp_path, {"method": "rtn", "args": {"bits": 4, "group_size": 64}}, symmetric=False)
    original = IntLinear.check_loaded
    IntLinear.check_loaded = lambda self: None  # the loader's own check, not the garbage in the zero points, decides
    try:
        with pytest.raises(CheckpointError, match=r"14 tensors its config\.json declares are not in its weights: "
                                                  r"model\.layers\.0\.mlp\.down_proj\.zeros, .*re-create the checkpoint"):
            compress.load(out, device="cpu")
    finally:
        IntLinear.check_loaded = original
