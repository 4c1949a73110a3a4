"""What the CUDA 4-bit decode kernel (compress/kernels/int4_mma.cu) is given, decided on any machine: which calls
it takes, its block size, and its fallback. The kernel's numbers are checked on a GPU (tests/test_kernels_gpu.py)."""

from __future__ import annotations

import logging

import pytest
import torch

from compress.kernels import cuda_int4


@pytest.mark.parametrize("tokens, n, k, group, takes", [
    (1, 4096, 4096, 128, True), (8, 4096, 4096, 128, True), (9, 4096, 4096, 128, False), (0, 4096, 4096, 128, False),
    (1, 4104, 4096, 128, False),  # rows: a multiple of 16
    (1, 4096, 4160, 64, False),  # columns and groups: multiples of 128
    (1, 4096, 4096, 64, False), (1, 4096, 4096, 256, True), (1, 4096, 4096, 384, False),  # 128 times a power of 2
    (1, 4096, 14336, 14336, True),  # one group a row
    (1, 16, 128, 128, True),
])
def test_shapes_the_kernel_takes(tokens, n, k, group, takes) -> None:
    assert cuda_int4.shape_ok(tokens, n, k, group) is takes


def test_block_size_keeps_the_grid_near_4096_warps() -> None:
    assert cuda_int4.default_warps(4096, 4096) == 16  # 256 blocks
    assert cuda_int4.default_warps(6144, 4096) == 8  # 384 blocks
    assert cuda_int4.default_warps(14336, 4096) == 4  # 896 blocks
    assert cuda_int4.default_warps(128256, 4096) == 4  # never fewer than 4 warps a block
    assert cuda_int4.default_warps(4096, 14336) == 16
    assert cuda_int4.default_warps(256, 640) == 4  # no more warps than the row's 5 chunks of 128
    assert cuda_int4.default_warps(16, 128) == 1


def test_cpu_tensors_and_the_switch_turn_it_off(monkeypatch) -> None:
    x, q, s = torch.zeros(1, 128, dtype=torch.bfloat16), torch.zeros(16, 64, dtype=torch.uint8), torch.zeros(
        16, 1, dtype=torch.bfloat16)
    assert not cuda_int4.applies(x, q, s, 128)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(cuda_int4, "usable", lambda device: True)
    assert cuda_int4.applies(x, q, s, 128)  # as on a GPU
    assert not cuda_int4.applies(x, q, s.half(), 128)  # scales of another dtype
    monkeypatch.setenv("COMPRESS_CUDA_INT4", "0")
    assert not cuda_int4.applies(x, q, s, 128)


@pytest.fixture
def fresh_usable():
    """cuda_int4.usable's per-device answer forgotten before and after the test."""
    cuda_int4.usable.cache_clear()
    yield cuda_int4.usable
    cuda_int4.usable.cache_clear()


def test_a_kernel_that_cannot_compile_falls_back_with_a_warning(monkeypatch, caplog, fresh_usable) -> None:
    def fails(*args, **kwargs):
        raise RuntimeError("nvrtc: library not found\nmore detail")

    monkeypatch.setattr(cuda_int4, "_kernel", fails)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with caplog.at_level(logging.WARNING, logger="compress.kernels.cuda_int4"):
        assert fresh_usable(0) is False
    assert "RuntimeError: nvrtc: library not found" in caplog.text and "Triton kernels" in caplog.text


def test_the_kernel_sources_ship_with_the_package() -> None:
    from importlib import resources

    kernels = resources.files("compress.kernels")
    assert "__device__" in kernels.joinpath("mma.cuh").read_text()  # the helpers both kernels are compiled behind
    for file, entry in (("int4_mma.cu", "int4_mma("), ("sparse24_mma.cu", "sparse24_mma(")):
        source = kernels.joinpath(file).read_text()
        assert 'extern "C" __global__' in source and entry in source, file


def test_gpus_without_16_bit_mma_are_not_asked_to_compile(monkeypatch, fresh_usable) -> None:
    def never(*args, **kwargs):
        raise AssertionError("compiled for a GPU the kernel cannot run on")

    monkeypatch.setattr(cuda_int4, "_kernel", never)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert fresh_usable(0) is False
