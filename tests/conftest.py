"""Shared fixtures: tiny random models of several architectures, saved with a tokenizer, and the shared
reference model (skipped with a reason where ../shared is absent)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COMPRESS_SHARED", REPO.parent / "shared"))
REF_A = SHARED / "models" / "ref-a"
REFCODE = SHARED / "data" / "refcode"
TINY_TOKENIZER = REPO / "recipes" / "models" / "tiny-llama"

needs_shared = pytest.mark.skipif(
    not (REF_A / "config.json").exists() or not (REFCODE / "valid.txt").exists(),
    reason=f"the shared reference model and data are not at {SHARED} (set COMPRESS_SHARED to their folder)",
)

COMMON = dict(vocab_size=512, max_position_embeddings=256)


def tiny_config(arch: str):
    """A small config of ``arch``: every linear in_features is a multiple of 64."""
    import transformers as tf

    if arch == "llama":  # grouped-query attention, tied embeddings
        return tf.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, tie_word_embeddings=True, **COMMON)
    if arch == "qwen2":  # q/k/v with bias, untied
        return tf.Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, tie_word_embeddings=False, **COMMON)
    if arch == "qwen2-ragged":  # widths no usual group size divides: 160 = 2 x 64 + 32, 720 = 11 x 64 + 16
        return tf.Qwen2Config(hidden_size=160, intermediate_size=720, num_hidden_layers=2, num_attention_heads=5,
                              num_key_value_heads=1, tie_word_embeddings=False, **COMMON)
    if arch == "mistral":
        return tf.MistralConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, tie_word_embeddings=False, **COMMON)
    if arch == "gpt2":  # Conv1D layers, LayerNorm with bias, tied
        return tf.GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=512, n_positions=256, bos_token_id=0,
                             eos_token_id=0)
    if arch == "opt":  # fc1 -> relu -> fc2, v_proj -> out_proj, tied
        return tf.OPTConfig(hidden_size=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
                            word_embed_proj_dim=128, **COMMON)
    if arch == "phi3":  # fused qkv_proj and gate_up_proj, untied
        return tf.Phi3Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                             tie_word_embeddings=False, **COMMON)
    raise ValueError(arch)


ARCHS = ["llama", "qwen2", "mistral", "gpt2", "opt", "phi3"]
RAGGED = "qwen2-ragged"  # in_features that group sizes do not divide (not in ARCHS: the tests that need it say so)


def make_tiny(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=dtype)
    # Random init leaves norms at 1 and biases at 0; perturb them so folding and bias paths are exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def install_fake_distribution(site: Path, dist: str, modules: dict[str, str],
                              entry_points: dict[str, dict[str, str]]) -> None:
    """What `pip install` leaves behind: the modules and a .dist-info with METADATA and entry_points.txt
    (``entry_points``: group -> {name: "module:attr"})."""
    for name, code in modules.items():
        (site / f"{name}.py").write_text(code)
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    sections = [f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items())
                for group, entries in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(sections))


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Each tiny architecture saved as a model directory with the repo's tiny tokenizer."""
    root = tmp_path_factory.mktemp("tiny-models")
    dirs = {}
    for name in ARCHS:
        path = root / name
        make_tiny(name).save_pretrained(path)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(TINY_TOKENIZER / f, path / f)
        dirs[name] = path
    return dirs


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory) -> Path:
    """A calibration file: the repo's own Python source (plenty of tokens for tiny tests)."""
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    text = "\n\n".join(p.read_text() for p in sorted((REPO / "compress").rglob("*.py")))
    path.write_text(text * 3)
    return path


#: The tile configuration each autotuned Triton kernel runs with in GPU tests (see one_tile_config); one of the
#: configurations its autotuner chooses from, picked so that the row and K masks and the K split are exercised.
PINNED_TILES = {
    "_gemv_int4_kernel": {"BLOCK_N": 4, "BLOCK_K": 256},
    "_gemv_8bit_kernel": {"BLOCK_N": 8, "BLOCK_K": 512},
    "_dot_int4_kernel": {"BLOCK_N": 64, "SPLIT_K": 2, "X_ROWS": 1},
    "_dot_8bit_kernel": {"BLOCK_N": 64, "SPLIT_K": 2},
}


@pytest.fixture(autouse=True)
def one_tile_config(request, monkeypatch):
    """GPU tests run each autotuned kernel with one tile configuration (PINNED_TILES) instead of autotuning: the
    autotuner compiles and times 24 candidates for every new shape, and with it the GPU suite did not finish in
    a 10-minute call (an H100 ran 84 of its 120 tests in 330 s; the compiled-decode cases took about a minute each). Tests marked ``all_tiles`` keep every candidate (they check each one)."""
    if request.node.get_closest_marker("gpu") is None or request.node.get_closest_marker("all_tiles"):
        return
    from compress.kernels import gemv

    for name, tile in PINNED_TILES.items():
        kernel = getattr(gemv, name)
        pinned = [c for c in kernel.configs if c.kwargs == tile]
        assert pinned, f"PINNED_TILES[{name!r}] = {tile} is not one of the kernel's configurations"
        use_tiles(monkeypatch, kernel, pinned[:1])


def use_tiles(monkeypatch, kernel, configs: list) -> None:
    """Make the autotuned Triton ``kernel`` choose among ``configs`` only (one: no tuning), forgetting its earlier
    picks; undone when the test ends."""
    monkeypatch.setattr(kernel, "configs", configs)
    monkeypatch.setattr(kernel, "cache", {})
