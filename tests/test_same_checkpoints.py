"""The shipped recipes write the same checkpoints, bit for bit, as the code did before the core was generalised
(layer states, formats of their own, shared solvers): the digests in ``data/checkpoint_digests.json`` were made
by the code at commit d4b6d33, before any of that changed, with ``python tests/test_same_checkpoints.py``; but
two, gpt2's ``w4-gptq`` and ``w4-awq-gptq``, were made again on 2026-12-07 (``python tests/test_same_checkpoints.py
gpt2/w4-gptq gpt2/w4-awq-gptq``) when the sweeps' inverse Hessian factor came to be computed by a triangular solve
instead of an explicit inverse (the same factor within 3e-7 relative; a few of gpt2's codes round the other way;
llama's and qwen2's checkpoints are unchanged).

Each case builds a small model of one architecture with weights drawn from a seeded generator (not the
architecture's own init, which may change between transformers releases), compresses it with a shipped recipe
on random calibration tokens, saves it and digests every stored tensor (name, dtype, shape, bytes).

Calibrated recipes compute in floating point through transformers' modules and torch's matmuls, whose last bits
may differ under other versions; their digests are compared only under the torch and transformers versions that
made them (the data-free recipes' everywhere)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from conftest import REPO, tiny_config  # noqa: E402

DIGESTS = HERE / "data" / "checkpoint_digests.json"
RECIPES = ["quickstart", "int8-zeropoint", "int8-absmax", "w4-rtn", "w3-rtn", "fp8", "fp8-weight-only",
           "w4-gptq", "w3-gptq", "w4-awq", "w4-awq-gptq"]
CALIBRATED = {"w4-gptq", "w3-gptq", "w4-awq", "w4-awq-gptq"}
MODELS = {"llama": torch.float32, "qwen2": torch.bfloat16, "gpt2": torch.float32}


def seeded_model(arch: str, dtype: torch.dtype):
    """A tiny ``arch`` model whose every parameter is drawn from one seeded generator."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1 + 0.1 * noise if p.dim() == 1 and name.endswith("weight") else 0.05 * noise)  # norms near 1
    return model.to(dtype).eval()


def calibration_tokens() -> torch.Tensor:
    return torch.randint(0, 512, (16, 64), generator=torch.Generator().manual_seed(1))


def digest(recipe: str, arch: str, tmp: Path) -> str:
    """sha256 of every tensor the recipe's checkpoint of the seeded ``arch`` model stores."""
    import compress
    from safetensors.torch import load_file

    model = seeded_model(arch, MODELS[arch])
    compress.apply(model, REPO / "recipes" / f"{recipe}.yaml", calib=calibration_tokens(), device="cpu")
    out = compress.save(model, tmp / f"{arch}-{recipe}")
    tensors = load_file(out / "model.safetensors")
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_writes_the_same_tensors_as_before(recipe: str, arch: str, tmp_path: Path) -> None:
    stored = json.loads(DIGESTS.read_text())
    if recipe in CALIBRATED and stored["versions"] != _versions():
        pytest.skip(f"calibrated digests were made under {stored['versions']}; this is {_versions()}")
    torch.set_num_threads(2)
    assert digest(recipe, arch, tmp_path) == stored["digests"][f"{arch}/{recipe}"]


if __name__ == "__main__":  # write the digests (only ever with the code the comparison is against): all, or the
    import tempfile              # cases named ("gpt2/w4-gptq"), under the versions the others were made with

    torch.set_num_threads(2)
    cases = sys.argv[1:] or [f"{a}/{r}" for r in RECIPES for a in MODELS]
    stored = json.loads(DIGESTS.read_text()) if sys.argv[1:] else {"versions": _versions(), "digests": {}}
    if stored["versions"] != _versions():
        sys.exit(f"the digests were made under {stored['versions']}; this is {_versions()}")
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            arch, recipe = case.split("/")
            stored["digests"][case] = digest(recipe, arch, Path(tmp))
    DIGESTS.write_text(json.dumps(stored, indent=1) + "\n")
    print(f"wrote {len(cases)} digests to {DIGESTS}")
