"""What the CUDA decode kernels (compress/kernels/*.cu) are given, decided on any machine: which calls they take,
their block size, their fallback, and what they compile to for an H100. Their numbers are checked on a GPU
(tests/test_kernels_gpu.py)."""

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


def test_the_24_kernel_over_values_takes_8_warps_on_wide_short_rows() -> None:
    from compress.kernels import sparse24

    assert sparse24.default_warps(4096, 4096, codes=False) == 8  # 256 blocks of 32 chunks: 8.1 against 8.8 us
    assert sparse24.default_warps(4096, 4096, codes=True) == 16  # codes: as dense int4
    assert sparse24.default_warps(1024, 4096, codes=False) == 16  # 64 blocks: 16 warps keep more loads in flight
    assert sparse24.default_warps(4096, 14336, codes=False) == 16  # long rows
    assert sparse24.default_warps(14336, 4096, codes=False) == 4


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


def _compiled_for_sm90(file: str, entry: str, **defines: int) -> dict[str, int]:
    """Kernel ``entry`` of ``file`` compiled for an H100 without a GPU, as the GPU machine's NVRTC would (NVRTC from
    the nvidia-cuda-nvrtc wheel, then the ptxas Triton ships): its registers, spilled bytes and static shared memory."""
    import ctypes
    import re
    import subprocess

    nvidia = pytest.importorskip("nvidia.cuda_nvrtc", reason="the NVRTC wheel (nvidia-cuda-nvrtc-cu12) is absent")
    triton = pytest.importorskip("triton")
    lib = next(iter(nvidia.__path__)) + "/lib/libnvrtc.so.12"
    ptxas = triton.__path__[0] + "/backends/nvidia/bin/ptxas"
    nvrtc = ctypes.CDLL(lib)
    program = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(program), cuda_int4.source(file).encode(), file.encode(), 0, None,
                                    None) == 0
    options = [b"--gpu-architecture=compute_90"] + [f"-D{k}={v}".encode() for k, v in defines.items()]
    status = nvrtc.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    assert status == 0, log.value.decode()[-3000:]
    nvrtc.nvrtcGetPTXSize(program, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetPTX(program, ptx)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    done = subprocess.run([ptxas, "-arch=sm_90", "-v", "-", "-o", "/dev/null"], input=ptx.value, capture_output=True)
    report = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, report[-3000:]
    registers = re.search(r"Used (\d+) registers", report)
    spilled = re.search(r"(\d+) bytes spill stores", report)
    shared = re.search(r"(\d+) bytes smem", report)
    return {"registers": int(registers.group(1)), "spilled": int(spilled.group(1)) if spilled else 0,
            "shared": int(shared.group(1)) if shared else 0}


@pytest.mark.parametrize("warps", [1, 4, 8, 16])
def test_the_correction_keeps_the_kernel_at_32_warps_an_sm(warps: int) -> None:
    """The 4-bit kernel compiled for sm_90 with a low-rank correction in its launch (ranks 8 to the largest, 16-bit
    types, zero points or not) takes at most 64 registers a thread and spills nothing, so an SM holds 32 of its warps
    as it does without a correction (62-64 registers at 4 and 16 warps a block, symmetric codes): its paths for the
    pair once took 86-90, which left 16-20 warps an SM to stream the codes. The same holds with zero points and no
    correction (70 registers at 16 warps a block before)."""
    for bf16 in (1, 0):
        asymmetric = _compiled_for_sm90("int4_mma.cu", "int4_mma", IS_BF16=bf16, HAS_ZERO=1, WARPS=warps, CORR_RANK=0)
        assert asymmetric["registers"] <= 64 and asymmetric["spilled"] == 0, (bf16, asymmetric)
    for rank in (8, 32, 104, cuda_int4.MAX_RANK):
        for bf16, zero in ((1, 0), (0, 1)):
            corrected = _compiled_for_sm90("int4_mma.cu", "int4_mma", IS_BF16=bf16, HAS_ZERO=zero, WARPS=warps,
                                           CORR_RANK=rank)
            assert corrected["registers"] <= 64 and corrected["spilled"] == 0, (rank, bf16, zero, corrected)


def test_codes_loaded_further_ahead_fit_the_registers() -> None:
    """The 4-bit kernel and the 2:4 kernel over 4-bit codes with 2 or 3 chunks in flight beyond the one computed
    (kernel_bench's variants): nothing spilled, at most 68-70 registers (28 warps an SM, 32 at 64)."""
    for ahead in (2, 3):
        for warps in (4, 8, 16):
            report = _compiled_for_sm90("int4_mma.cu", "int4_mma", IS_BF16=1, HAS_ZERO=0, WARPS=warps, AHEAD=ahead)
            assert report["registers"] <= 68 and report["spilled"] == 0, (ahead, warps, report)
            report = _compiled_for_sm90("sparse24_mma.cu", "sparse24_mma", IS_BF16=1, HAS_ZERO=0, WARPS=warps, CODES=1,
                                        AHEAD=ahead)
            assert report["registers"] <= 70 and report["spilled"] == 0, (ahead, warps, report)


@pytest.mark.parametrize("codes", [0, 1])
def test_the_24_kernel_compiles_with_and_without_a_register_cap(codes: int) -> None:
    """The 2:4 kernel compiled for sm_90 at each block size: as it runs by default (64-74 registers), and with
    ``min_blocks`` = 32 / warps, which holds it to 64 (4-bit codes without spilling; 16-bit values spill 16 bytes)."""
    for warps in (4, 8, 16):
        free = _compiled_for_sm90("sparse24_mma.cu", "sparse24_mma", IS_BF16=1, HAS_ZERO=codes, WARPS=warps,
                                  CODES=codes)
        capped = _compiled_for_sm90("sparse24_mma.cu", "sparse24_mma", IS_BF16=1, HAS_ZERO=codes, WARPS=warps,
                                    CODES=codes, MIN_BLOCKS=32 // warps)
        assert capped["registers"] <= 64 and free["registers"] > 0
        if codes:
            assert capped["spilled"] == 0


def test_the_24_kernel_compiles_for_the_sparse_tensor_cores() -> None:
    """``SPARSE_MMA`` (mma.sp): 16-bit values take 80-82 registers unbounded, without spilling; symmetric 4-bit codes,
    bounded as by default, 64 without spilling (zero points spill 76 bytes under the bound, so codes with zero points
    keep spreading by default)."""
    for warps in (1, 4, 8, 16):
        for bf16 in (0, 1):
            values = _compiled_for_sm90("sparse24_mma.cu", "sparse24_mma", IS_BF16=bf16, WARPS=warps, SPARSE_MMA=1)
            assert values["spilled"] == 0 and values["registers"] <= 84, (warps, bf16, values)
            codes = _compiled_for_sm90("sparse24_mma.cu", "sparse24_mma", IS_BF16=bf16, WARPS=warps, CODES=1,
                                       MIN_BLOCKS=32 // warps, SPARSE_MMA=1)
            assert codes["spilled"] == 0 and codes["registers"] <= 64, (warps, bf16, codes)


@pytest.mark.parametrize("kind", [0, 1, 2])
def test_the_8bit_kernel_compiles_for_sm90_within_64_registers(kind: int) -> None:
    """The 8-bit kernel (int8, uint8 with zero points, E4M3) at each block size and 16-bit type, scales in that
    type or float32: at most 64 registers a thread (32 warps an SM), nothing spilled."""
    for warps in (1, 4, 8, 16):
        for bf16 in (1, 0):
            for f32 in (0, 1):
                report = _compiled_for_sm90("byte_mma.cu", "byte_mma", IS_BF16=bf16, WARPS=warps, KIND=kind,
                                            SCALE_F32=f32)
                assert report["registers"] <= 64 and report["spilled"] == 0, (warps, bf16, f32, report)


def test_the_8bit_kernel_takes_2_to_8_tokens(monkeypatch) -> None:
    """By default 2-8 tokens (one token stays with the Triton kernel, as fast or faster on large layers: H100,
    2026-12-07); COMPRESS_CUDA_8BIT=1 gives it one token too, =0 none; never CPU tensors or shapes it cannot take."""
    from compress.kernels import cuda_8bit

    one, two = torch.zeros(1, 64, dtype=torch.bfloat16), torch.zeros(2, 64, dtype=torch.bfloat16)
    w, s = torch.zeros(16, 64, dtype=torch.int8), torch.ones(16)
    assert not cuda_8bit.applies(two, w, s, None, 0)  # CPU tensors
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(cuda_int4, "usable", lambda device: True)
    assert cuda_8bit.applies(two, w, s, None, 0) and not cuda_8bit.applies(one, w, s, None, 0)
    monkeypatch.setenv("COMPRESS_CUDA_8BIT", "1")
    assert cuda_8bit.applies(one, w, s, None, 0)
    assert not cuda_8bit.applies(torch.zeros(9, 64, dtype=torch.bfloat16), w, s, None, 0)  # 9 tokens
    assert not cuda_8bit.applies(torch.zeros(2, 96, dtype=torch.bfloat16), torch.zeros(16, 96, dtype=torch.int8), s,
                                 None, 0)  # K not a multiple of 64
    assert not cuda_8bit.applies(two, w[:8], s[:8], None, 0)  # N not a multiple of 16
    monkeypatch.setenv("COMPRESS_CUDA_8BIT", "0")
    assert not cuda_8bit.applies(two, w, s, None, 0)
