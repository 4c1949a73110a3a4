"""Calibration activations (issue 19): kept on the device when they fit and in CPU memory otherwise, with the
choice logged; a block that runs out of device memory is put back as it was and done again with smaller batches."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers as tf

from compress.calibration import activations
from compress.calibration.activations import BlockInputs, choose_store
from compress.calibration.data import CalibrationSet
from compress.calibration.engine import StepWork, run_stage
from compress.errors import CalibrationError
from compress.model import find_blocks
from compress.states import LayerKind

GiB = 2**30


def _call(batch: int, seq: int = 4) -> tuple[tuple, dict]:
    hidden = torch.randn(batch, seq, 8)
    mask = torch.randn(batch, 1, seq, seq)
    rotary = (torch.randn(1, seq, 2), torch.randn(1, seq, 2))  # broadcast over the batch
    return (hidden,), {"attention_mask": mask, "position_embeddings": rotary,
                       "cache_position": torch.arange(batch), "use_cache": False}


def test_halved_splits_each_call_along_its_batch_and_keeps_what_is_broadcast() -> None:
    calls = [_call(5), _call(1), _call(2)]
    halved = BlockInputs(calls).halved()
    assert [halved.hidden(i).shape[0] for i in range(len(halved.calls))] == [3, 2, 1, 1, 1]
    assert torch.equal(torch.cat([halved.hidden(0), halved.hidden(1)]), calls[0][0][0])
    (_, first), (_, second) = halved.calls[0], halved.calls[1]
    assert torch.equal(torch.cat([first["attention_mask"], second["attention_mask"]]), calls[0][1]["attention_mask"])
    assert first["position_embeddings"][0] is calls[0][1]["position_embeddings"][0]  # [1, seq, d]: not split
    assert first["cache_position"] is calls[0][1]["cache_position"]  # one dimension: not a batch of samples
    assert first["use_cache"] is False and halved.calls[2] is calls[1]  # a call of one sample stays whole
    assert halved.tokens == BlockInputs(calls).tokens and halved.batch == 3


@pytest.fixture
def cuda_memory(monkeypatch):
    """A pretend CUDA device with ``free`` bytes free, 1 GiB of torch's cache unused."""
    def set_free(free: int) -> None:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 80 * GiB))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 3 * GiB)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 2 * GiB)
    return set_free


def test_activations_stay_on_the_device_when_they_fit_beside_the_blocks_work(cuda_memory, caplog) -> None:
    caplog.set_level(logging.INFO, logger="compress")
    block = torch.nn.Linear(1024, 1024, bias=False)  # 4 MiB of float32
    call = ((torch.zeros(8, 2048, 1024, dtype=torch.bfloat16),), {})  # 32 MiB a call
    cuda = torch.device("cuda")
    need = 32 * 2**20 * 16 * 2  # 16 calls, 2 copies: 1 GiB
    room = need + activations.BLOCK_WORK * 4 * 2**20 + activations.HEADROOM  # exactly enough, counting the cache
    cuda_memory(room - GiB)
    assert choose_store("auto", cuda, call, 16, 2, block) == cuda
    assert "calibration activations (1.00 GiB) are kept on cuda" in caplog.text
    cuda_memory(room - GiB - 1)
    assert choose_store("auto", cuda, call, 16, 2, block) == torch.device("cpu")
    warning = [r for r in caplog.records if r.levelno == logging.WARNING][-1].getMessage()
    assert "(1.00 GiB) do not fit on cuda" in warning and "kept in CPU memory" in warning
    assert choose_store("device", cuda, call, 16, 2, block) == cuda  # as asked, whatever is free
    assert choose_store("cpu", cuda, call, 1, 2, block) == torch.device("cpu")
    assert choose_store("auto", torch.device("cpu"), call, 16, 2, block) == torch.device("cpu")


def _llama(layers: int = 2):
    config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=2,
                            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def _halving_step(model, fail_above: int | None, attempts: dict[str, list[int]]) -> StepWork:
    """A step that halves each target's weight in place and masks its negative weights, then runs out of memory
    while the block's batches are larger than ``fail_above`` (always, with None)."""
    def apply(work) -> None:
        for name, layer in work.targets.items():
            layer.weight.data.mul_(0.5)
            work.set_mask(name, layer.weight >= 0)
        attempts.setdefault(work.name, []).append(work.inputs.batch)
        if fail_above is None or work.inputs.batch > fail_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")

    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    return StepWork("halve", apply, targets, needs_inputs=True, produces=LayerKind.MASKED)


def test_a_block_out_of_memory_is_done_again_from_where_it_was_with_smaller_batches(caplog) -> None:
    model = _llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calib = CalibrationSet(torch.randint(0, 128, (8, 16)), "random")
    attempts: dict[str, list[int]] = {}
    states: dict = {}
    run_stage(model, find_blocks(model), [_halving_step(model, 2, attempts)], calib, torch.device("cpu"),
              batch_size=8, states=states, retry=True)
    assert attempts == {"model.layers.0": [8, 4, 2], "model.layers.1": [2]}  # the smaller batches carry on
    for name, p in model.named_parameters():
        expected = before[name] * 0.5 if ".layers." in name and "proj" in name else before[name]
        assert torch.equal(p, expected), name  # halved once: each failed attempt was undone
    masked = [n for n, s in states.items() if s.mask is not None]
    assert len(masked) == 14 and all(torch.equal(states[n].mask, model.get_submodule(n).weight >= 0) for n in masked)
    retries = [r.getMessage() for r in caplog.records if "doing it again" in r.getMessage()]
    assert retries == [f"out of memory on cpu while compressing block model.layers.0 with {b} samples per batch: "
                       f"doing it again with {b // 2}" for b in (8, 4)]


def test_out_of_memory_with_one_sample_per_batch_is_a_clear_error() -> None:
    model = _llama(1)
    calib = CalibrationSet(torch.randint(0, 128, (2, 16)), "random")
    attempts: dict[str, list[int]] = {}
    with pytest.raises(CalibrationError, match=r"out of memory on cpu while compressing block model.layers.0 with "
                       r"one calibration sample per batch: set calibration.activations: cpu, use fewer "
                       r"calibration.samples or a shorter seq_len, or a device with more memory \(CUDA out of "
                       r"memory. Tried to allocate 2.00 GiB\)$"):
        run_stage(model, find_blocks(model), [_halving_step(model, None, attempts)], calib, torch.device("cpu"),
                  batch_size=2, retry=True)
    assert attempts == {"model.layers.0": [2, 1]}


def test_without_retry_out_of_memory_is_not_tried_again() -> None:
    model = _llama(1)
    calib = CalibrationSet(torch.randint(0, 128, (4, 16)), "random")
    attempts: dict[str, list[int]] = {}
    with pytest.raises(CalibrationError, match="out of memory on cpu"):
        run_stage(model, find_blocks(model), [_halving_step(model, None, attempts)], calib, torch.device("cpu"),
                  batch_size=4)  # retry: only on CUDA by default
    assert attempts == {"model.layers.0": [4]}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_activations_kept_in_cpu_memory_compress_as_those_on_the_gpu(method: str, tmp_path) -> None:
    import compress

    calib = CalibrationSet(torch.randint(0, 128, (16, 32)), "random")
    (tmp_path / "unused.txt").write_text("the calibration set is given\n")
    stored = {}
    for where in ("device", "cpu"):
        model = _llama()
        recipe = {"steps": [{"method": method, "args": {"group_size": 64}}],
                  "calibration": {"dataset": str(tmp_path / "unused.txt"), "activations": where}}
        compress.apply(model, recipe, calib=calib, device="cuda")
        stored[where] = model.state_dict()
    assert all(torch.equal(stored["cpu"][k], v) for k, v in stored["device"].items())
