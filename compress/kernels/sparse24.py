"""Products of 2:4 sparse weights on CUDA: kernels that read the ``sparse24`` and ``sparse24-int`` formats as stored
(the kept values, or kept 4-bit codes, and their 2-bit positions): a CUDA kernel on tensor cores for decode where it
applies (``sparse24_mma.cu``, :func:`cuda_applies`), Triton kernels for the rest.

The stored layout (:mod:`compress.formats.sparse`): a row's kept entries in column order, two per run of four
columns, and a byte of positions per two runs (eight columns): bits 0-1 and 2-3 the first run's two columns, bits
4-5 and 6-7 the second's. The kernels read the positions as 32-bit words (16 kept entries, 32 columns) where a
row's bytes come in fours, else byte by byte.

* Decode (up to MAX_TOKENS tokens): :func:`gemv_24` and :func:`gemv_24_int4` read the weight once, about half the
  bytes of the dense layer. Each program owns ``BLOCK_N`` rows of one token and walks them ``BLOCK_W`` words at a
  time, a tile [rows, words, entries of a word]; each kept entry's activation is loaded from its column (a gather,
  served by L1: the token's activations are a few KiB). The first version picked each activation among its run's
  four by compares and selects: 1.00x bf16 on a Llama-3-8B decode step (H100); the gather made it 1.29x. The bf16
  kernel reads the next tile's words and values before this tile's gather, which waits on the words: the up
  projection went from 28.3 to 26.4 us (H200, one token; bf16 cuBLAS 30.4 us).
* The CUDA decode kernel (1-8 tokens, compute capability 8.0 on): over 16-bit values each lane spreads a run's
  kept pair to the dense positions its 2-bit meta names, with ``prmt`` byte selectors looked up in a table of 16,
  and feeds ``mma.m16n8k16`` as the dense int4 kernel does (``mma.cuh`` holds what the two share); over symmetric
  4-bit codes it gives the kept pairs to the sparse tensor cores (``mma.sp.m16n8k32``) with their positions as
  metadata. Llama-3-8B decode step, H100: 1.45x bf16 where the Triton gather gave 1.29x; 2:4 + int4 0.97x dense
  int4 (0.92x spreading, 0.76x with Triton). ``COMPRESS_CUDA_SPARSE24=0`` turns it off.
* Prefill (more tokens): :func:`decompress_24` and :func:`decompress_24_int4` write the dense weight in one pass
  for cuBLAS (79% of the copy bandwidth on Llama-3-8B's MLP, H200). PyTorch's own 2:4 matmul does not help on
  Hopper: its CUTLASS kernels run on compute capability 8.x only, and cuSPARSELt took 1.0 ms where dense cuBLAS
  took 0.7 ms (4096 tokens, up projection, H100, 2026-12-05).
"""

from __future__ import annotations

import os

import torch

from compress.kernels import cuda_int4
from compress.kernels.gemv import MAX_TOKENS, _bench_graphed, _unit_floats, triton

if triton is not None:
    import triton.language as tl


def available(x: torch.Tensor) -> bool:
    """Whether the kernels take input ``x`` [..., K]: on CUDA (or Triton's interpreter), at most MAX_TOKENS."""
    return triton is not None and (x.is_cuda or _interpreted()) and x.numel() <= MAX_TOKENS * x.shape[-1]


def decompresses(x: torch.Tensor) -> bool:
    """Whether :func:`decompress_24` rebuilds the dense weight for input ``x`` (on CUDA, or Triton's interpreter)."""
    return triton is not None and (x.is_cuda or _interpreted())


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if triton is not None:

    def _configs():
        # tiles of 1024 to 4096 kept entries (BLOCK_W words of 4 position bytes: 16 entries a word)
        return [triton.Config({"BLOCK_N": bn, "BLOCK_W": bw}, num_warps=w)
                for bn in (1, 2, 4, 8) for bw in (8, 16, 32, 64) for w in (4, 8)
                if 1024 <= bn * bw * 16 <= 4096]

    def _even(args) -> bool:
        """No row or width tail: the kernels need no masks."""
        return (args["N"] % args["BLOCK_N"] == 0 and args["MW"] % args["BLOCK_W"] == 0
                and args["K"] % (8 * args["WB"]) == 0)

    @triton.jit
    def _gathered(x_ptr, m, K, word, ww, WB: tl.constexpr, EVEN: tl.constexpr):
        """The activation of each kept entry of the position words ``word`` [rows, words] (word index ``ww``):
        [rows, words, 4 WB] in float32. Slot s of a word is its run's (s // 2) kept column ``(word >> 2 s) & 3``."""
        s = tl.arange(0, 4 * WB)
        run = (8 * WB) * ww[:, None] + 4 * (s // 2)[None, :]  # [words, slots] first column of the slot's run
        col = run[None, :, :] + ((word[:, :, None] >> (2 * s)[None, None, :]) & 3)
        if EVEN:
            xv = tl.load(x_ptr + m * K + col)
        else:
            xv = tl.load(x_ptr + m * K + col, mask=col < K, other=0.0)
        return xv.to(tl.float32)

    @triton.jit
    def _values_tile(v_ptr, meta_ptr, n, ww, N, K, MW, WB: tl.constexpr, EVEN: tl.constexpr):
        """Position words [rows, words] and kept values [rows, words, 4 WB] of words ``ww``; zeros past the row."""
        KV = K // 2  # kept values a row
        vcol = (4 * WB) * ww[:, None] + tl.arange(0, 4 * WB)[None, :]  # [words, slots] kept-value columns
        wmask = (n < N)[:, None] & (ww < MW)[None, :]
        if EVEN:  # whole words: only the words past the row (the prefetch after the last tile) are masked
            vmask = wmask[:, :, None]
        else:
            vmask = wmask[:, :, None] & (vcol < KV)[None, :, :]
        word = tl.load(meta_ptr + n[:, None] * MW + ww[None, :], mask=wmask, other=0)
        v = tl.load(v_ptr + n[:, None, None] * KV + vcol[None, :, :], mask=vmask, other=0.0,
                    eviction_policy="evict_first")
        return word, v

    @triton.autotune(configs=_configs(), key=["M", "N", "K"], do_bench=_bench_graphed)
    @triton.heuristics({"EVEN": _even})
    @triton.jit
    def _gemv_24_kernel(x_ptr, v_ptr, meta_ptr, y_ptr, M, N, K, MW, WB: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_W: tl.constexpr, EVEN: tl.constexpr):
        # The next tile's words and values are loaded before this tile's activations are gathered (which wait on
        # the words): a tile's two dependent reads overlap the next tile's.
        m = tl.program_id(0) % M
        n = (tl.program_id(0) // M) * BLOCK_N + tl.arange(0, BLOCK_N)
        w = tl.arange(0, BLOCK_W)
        acc = tl.zeros((BLOCK_N, BLOCK_W, 4 * WB), dtype=tl.float32)
        word, v = _values_tile(v_ptr, meta_ptr, n, w, N, K, MW, WB, EVEN)
        for w0 in range(0, MW, BLOCK_W):
            next_word, next_v = _values_tile(v_ptr, meta_ptr, n, w0 + BLOCK_W + w, N, K, MW, WB, EVEN)
            acc += v.to(tl.float32) * _gathered(x_ptr, m, K, word, w0 + w, WB, EVEN)
            word, v = next_word, next_v
        y = tl.sum(tl.sum(acc, axis=2), axis=1)
        tl.store(y_ptr + m * N + n, y.to(y_ptr.dtype.element_ty), mask=n < N)

    @triton.autotune(configs=_configs(), key=["M", "N", "K"], do_bench=_bench_graphed)
    @triton.heuristics({"EVEN": _even})
    @triton.jit
    def _gemv_24_int4_kernel(x_ptr, q_ptr, meta_ptr, s_ptr, z_ptr, y_ptr, M, N, K, MW, groups, zero_const,
                             GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, WB: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_W: tl.constexpr, EVEN: tl.constexpr):
        # The kept codes are packed two a byte (a run's two): a word's 4 WB entries are 2 WB code bytes. Code c is
        # read as u = 1 + c/16 (as the dense 4-bit kernel does): (c - z) s = 16 s u - (16 + z) s, one fma a code
        # with the word's 16 s and -(16 + z) s (a word's 8 WB columns lie in one group).
        m = tl.program_id(0) % M
        n = (tl.program_id(0) // M) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        w = tl.arange(0, BLOCK_W)
        h = tl.arange(0, 2 * WB)
        QB = K // 4  # code bytes a row
        acc = tl.zeros((BLOCK_N, BLOCK_W, 4 * WB), dtype=tl.float32)
        for w0 in range(0, MW, BLOCK_W):
            ww = w0 + w
            qcol = (2 * WB) * ww[:, None] + h[None, :]  # [words, code bytes]
            group = ((8 * WB) * ww) // GROUP
            if EVEN:
                word = tl.load(meta_ptr + n[:, None] * MW + ww[None, :])
                packed = tl.load(q_ptr + n[:, None, None] * QB + qcol[None, :, :], eviction_policy="evict_first")
                scale = tl.load(s_ptr + n[:, None] * groups + group[None, :]).to(tl.float32)
            else:
                wmask = nmask[:, None] & (ww < MW)[None, :]
                word = tl.load(meta_ptr + n[:, None] * MW + ww[None, :], mask=wmask, other=0)
                packed = tl.load(q_ptr + n[:, None, None] * QB + qcol[None, :, :],
                                 mask=nmask[:, None, None] & (qcol < QB)[None, :, :], other=0,
                                 eviction_policy="evict_first")
                scale = tl.load(s_ptr + n[:, None] * groups + group[None, :], mask=wmask, other=0.0).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(z_ptr + n[:, None] * groups + group[None, :], mask=nmask[:, None] & (ww < MW)[None, :],
                            other=0).to(tl.float32)
            else:
                z = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32) + zero_const
            lo, hi = _unit_floats(packed, False)  # [rows, words, code bytes]: each byte's first and second code
            u = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_W, 4 * WB))  # the entries in slot order
            a = 16.0 * scale
            b = -(16.0 + z) * scale
            acc += (u * a[:, :, None] + b[:, :, None]) * _gathered(x_ptr, m, K, word, ww, WB, EVEN)
        y = tl.sum(tl.sum(acc, axis=2), axis=1)
        tl.store(y_ptr + m * N + n, y.to(y_ptr.dtype.element_ty), mask=nmask)

    @triton.jit
    def _decompress_24_kernel(v_ptr, meta_ptr, s_ptr, z_ptr, w_ptr, N, K, MB, groups, zero_const, GROUP: tl.constexpr,
                              CODES: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_B: tl.constexpr):
        # A tile of BLOCK_N rows and BLOCK_B position bytes (8 BLOCK_B columns), read and written as contiguous
        # rows and computed as [rows, bytes, 2 runs, 4 columns]: column c of a run is its first kept entry where the
        # first position is c, its second where the second is, else zero. With CODES the entries are 4-bit codes,
        # a run's two in a byte, scaled as (c - z) s by the run's group.
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        b0 = tl.program_id(1) * BLOCK_B
        nmask = (n < N)[:, None]
        byte = tl.load(meta_ptr + n[:, None] * MB + b0 + tl.arange(0, BLOCK_B)[None, :],
                       mask=nmask & (b0 + tl.arange(0, BLOCK_B) < MB)[None, :], other=0).to(tl.int32)
        nib = tl.reshape(tl.join(byte & 15, byte >> 4), (BLOCK_N, BLOCK_B, 2))  # [rows, bytes, runs]
        runs = 2 * b0 + tl.arange(0, 2 * BLOCK_B)  # the tile's runs
        if CODES:
            rmask = nmask & (runs < K // 4)[None, :]
            codes = tl.load(v_ptr + n[:, None] * (K // 4) + runs[None, :], mask=rmask, other=0).to(tl.int32)
            group = (4 * runs[None, :]) // GROUP
            scale = tl.load(s_ptr + n[:, None] * groups + group, mask=rmask, other=0.0).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(z_ptr + n[:, None] * groups + group, mask=rmask, other=0).to(tl.float32)
            else:
                z = zero_const
            first = tl.reshape(((codes & 15).to(tl.float32) - z) * scale, (BLOCK_N, BLOCK_B, 2))
            second = tl.reshape(((codes >> 4).to(tl.float32) - z) * scale, (BLOCK_N, BLOCK_B, 2))
        else:
            vcol = 4 * b0 + tl.arange(0, 4 * BLOCK_B)
            v = tl.load(v_ptr + n[:, None] * (K // 2) + vcol[None, :], mask=nmask & (vcol < K // 2)[None, :],
                        other=0.0)
            first, second = tl.split(tl.reshape(v, (BLOCK_N, BLOCK_B, 2, 2)))
        c = tl.arange(0, 4)[None, None, None, :]
        dense = tl.where((nib & 3)[:, :, :, None] == c, first[:, :, :, None],
                         tl.where((nib >> 2)[:, :, :, None] == c, second[:, :, :, None], 0.0))
        col = 8 * b0 + tl.arange(0, 8 * BLOCK_B)
        dense = tl.reshape(dense, (BLOCK_N, 8 * BLOCK_B)).to(w_ptr.dtype.element_ty)
        tl.store(w_ptr + n[:, None] * K + col[None, :], dense, mask=nmask & (col < K)[None, :])


def _words(meta: torch.Tensor, group: int | None = None) -> tuple[torch.Tensor, int]:
    """The position bytes as the kernels read them, and the bytes a word: 32-bit words of four where a row's
    bytes come in fours (and, for codes, a group spans whole words: 32 columns), else single bytes."""
    if meta.shape[1] % 4 == 0 and (group is None or group % 32 == 0):
        return meta.view(torch.int32), 4
    return meta, 1


def _launch(kernel, x: torch.Tensor, n: int, weights: tuple, *extra, **meta) -> torch.Tensor:
    """Runs ``kernel`` (a program for each BLOCK_N rows and token; arguments x, ``weights``, y, M, N, K,
    ``extra``) on ``x`` [M, K]: [M, n] in ``x``'s dtype."""
    M, K = x.shape
    y = torch.empty(M, n, device=x.device, dtype=x.dtype)
    grid = lambda tile: (triton.cdiv(n, tile["BLOCK_N"]) * M,)  # noqa: E731
    kernel[grid](x, *weights, y, M, n, K, *extra, **meta)
    return y


def cuda_applies(x: torch.Tensor, weights: torch.Tensor, meta: torch.Tensor, group_size: int) -> bool:
    """Whether the CUDA kernel (``sparse24_mma.cu``) takes ``x`` [M, K] against a 2:4 layer's kept ``weights`` (16-bit
    values or packed codes) and positions ``meta``: 1-8 tokens of bf16 or fp16 on an NVIDIA GPU of compute capability
    8.0 on, N a multiple of 16, K a multiple of 128, groups of 128 times a power of two (or one a row), contiguous
    16-byte aligned operands, and the kernel compiled. ``COMPRESS_CUDA_SPARSE24=0`` turns it off (the Triton kernels
    then take the call)."""
    if os.environ.get("COMPRESS_CUDA_SPARSE24", "1") == "0":
        return False
    if not (x.is_cuda and torch.version.hip is None and x.dtype in (torch.bfloat16, torch.float16)):
        return False
    M, K = x.shape
    if not (cuda_int4.shape_ok(M, meta.shape[0], K, group_size) and meta.shape[1] * 8 == K):
        return False
    if not all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (x, weights, meta)):
        return False
    return cuda_int4.usable(x.device.index or 0)


def default_warps(n: int, k: int, codes: bool) -> int:
    """Warps a block of the CUDA kernel splits its 16 rows' chunks over: the dense int4 kernel's choice
    (:func:`compress.kernels.cuda_int4.default_warps`), but at most 8 for 16-bit values where the rows are short (at
    most 32 chunks of 128) and fill 256 blocks or more. H200, one token, us at 8 / 16 warps (``kernel_bench``,
    2026-12-07): 4096 x 4096 8.1 / 8.8, and for the shapes this leaves alone 1024 x 4096 5.8 / 4.4, 4096 x 14336
    23.3 / 23.0; 4-bit codes 4096 x 4096 6.2 / 6.3."""
    warps = cuda_int4.default_warps(n, k)
    if not codes and warps > 8 and n // cuda_int4.ROWS >= 256 and k // cuda_int4.CHUNK <= 32:
        return 8
    return warps


def sparse24_mma(x: torch.Tensor, weights: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor | None = None,
                 zeros: torch.Tensor | None = None, group_size: int = 0, zero_const: float = 0.0,
                 warps: int | None = None, min_blocks: int | None = None, ahead: int = 1,
                 sparse_mma: bool | None = None) -> torch.Tensor:
    """``x`` [M, K] times a 2:4 weight on the CUDA kernel (check :func:`cuda_applies` first): ``weights`` the kept
    16-bit values [N, K/2], or with ``scales`` the kept 4-bit codes [N, K/4] (``zeros``, ``group_size`` and
    ``zero_const`` as :func:`gemv_24_int4`). ``warps`` overrides the block's warps, ``min_blocks`` the blocks an SM
    must hold, which caps the kernel's registers (``sparse24_mma.cu``'s MIN_BLOCKS), ``ahead`` the chunks a warp
    loads ahead of the one it computes (AHEAD; 1 as measured), and ``sparse_mma`` whether the products run on the
    sparse tensor cores (``mma.sp``, SPARSE_MMA) or the kept entries are spread to dense ones: by default on for
    symmetric 4-bit codes, off for 16-bit values, as the model decodes faster (H100, Llama-3-8B shape: codes 289.7
    against 262.1 tok/s, values 198.2 against 208.6; docs/kernels.md), and off for codes with zero points, whose
    ``mma.sp`` path spills 76 bytes under the register bound and was not timed. By default 4-bit codes hold 32 warps
    an SM (64 registers, nothing spilled; 60-72 uncapped), 16-bit values take what the compiler gives them (64-74;
    capped they spill)."""
    M, K = x.shape
    N = meta.shape[0]
    codes = scales is not None
    warps = warps or default_warps(N, K, codes)
    sparse_mma = codes and zeros is None if sparse_mma is None else sparse_mma
    if min_blocks is None:
        min_blocks = 32 // warps if codes else 1
    shift = 31 if not codes or group_size >= K else (group_size // cuda_int4.CHUNK).bit_length() - 1
    kernel = cuda_int4.compiled("sparse24_mma.cu", "sparse24_mma", x.device.index or 0,
                                IS_BF16=int(x.dtype == torch.bfloat16), HAS_ZERO=int(zeros is not None), WARPS=warps,
                                CODES=int(codes), MIN_BLOCKS=min_blocks, AHEAD=ahead, SPARSE_MMA=int(sparse_mma))
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    scales = scales.contiguous() if codes else x
    kernel(grid=(N // cuda_int4.ROWS, 1, 1), block=(32 * warps, 1, 1),
           args=[x, weights, meta, scales, zeros.contiguous() if zeros is not None else weights, y, M, N, K,
                 scales.shape[1] if codes else 1, shift, int(zero_const)])
    return y


@torch.library.custom_op("compress::gemv_24", mutates_args=())
def gemv_24(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """``x`` [M, K] times a 2:4 sparse weight: [M, N] in ``x``'s dtype. ``values`` [N, K/2] are the kept entries,
    ``meta`` uint8 [N, ceil(K/8)] their positions (the ``sparse24`` format)."""
    x = x.contiguous()
    if values.dtype == x.dtype and cuda_applies(x, values, meta, x.shape[1]):
        return sparse24_mma(x, values, meta)
    words, wb = _words(meta)
    return _launch(_gemv_24_kernel, x, values.shape[0], (values, words), words.shape[1], WB=wb)


@gemv_24.register_fake
def _(x, values, meta):
    return x.new_empty(x.shape[0], values.shape[0])


@torch.library.custom_op("compress::gemv_24_int4", mutates_args=())
def gemv_24_int4(x: torch.Tensor, qweight: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor | None, group_size: int, zero_const: float) -> torch.Tensor:
    """``x`` [M, K] times a 2:4 sparse 4-bit weight: [M, N] in ``x``'s dtype. ``qweight`` uint8 [N, K/4] holds the
    kept codes two a byte, ``meta`` their positions, ``scales`` [N, groups] and ``zeros`` (uint8 like ``scales``, or
    None for ``zero_const``) the groups of ``group_size`` original columns (the ``sparse24-int`` format)."""
    x = x.contiguous()
    if scales.dtype == x.dtype and cuda_applies(x, qweight, meta, group_size):
        return sparse24_mma(x, qweight, meta, scales, zeros, group_size, zero_const)
    words, wb = _words(meta, group_size)
    weights = (qweight, words, scales, zeros if zeros is not None else scales)
    return _launch(_gemv_24_int4_kernel, x, qweight.shape[0], weights, words.shape[1],
                   scales.shape[1], zero_const, GROUP=group_size, HAS_ZERO=zeros is not None, WB=wb)


@gemv_24_int4.register_fake
def _(x, qweight, meta, scales, zeros, group_size, zero_const):
    return x.new_empty(x.shape[0], qweight.shape[0])


DECOMPRESS_TILE = (16, 64)  # rows, position bytes a program


def _decompress(entries: torch.Tensor, meta: torch.Tensor, in_features: int, dtype: torch.dtype, scales=None,
                zeros=None, group_size: int = 0, zero_const: float = 0.0) -> torch.Tensor:
    n, mb = meta.shape
    dense = torch.empty(n, in_features, dtype=dtype, device=entries.device)
    bn, bb = DECOMPRESS_TILE
    s = scales if scales is not None else entries
    _decompress_24_kernel[(triton.cdiv(n, bn), triton.cdiv(mb, bb))](
        entries, meta, s, zeros if zeros is not None else s, dense, n, in_features, mb,
        scales.shape[1] if scales is not None else 1, zero_const, GROUP=max(group_size, 1), CODES=scales is not None,
        HAS_ZERO=zeros is not None, BLOCK_N=bn, BLOCK_B=bb)
    return dense


@torch.library.custom_op("compress::decompress_24", mutates_args=())
def decompress_24(values: torch.Tensor, meta: torch.Tensor, in_features: int) -> torch.Tensor:
    """The dense weight [N, ``in_features``] of a ``sparse24`` layer (``values`` [N, K/2], ``meta`` [N, ceil(K/8)]),
    the pruned entries zero: one pass over the compressed bytes, for prefill's dense matmul."""
    return _decompress(values, meta, in_features, values.dtype)


@decompress_24.register_fake
def _(values, meta, in_features):
    return values.new_empty(values.shape[0], in_features)


@torch.library.custom_op("compress::decompress_24_int4", mutates_args=())
def decompress_24_int4(qweight: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                       group_size: int, zero_const: float, in_features: int) -> torch.Tensor:
    """The dense weight [N, ``in_features``] in ``scales``' dtype of a ``sparse24-int`` layer of 3- or 4-bit codes
    (arguments as for :func:`gemv_24_int4`), the pruned entries zero: one pass, for prefill's dense matmul."""
    return _decompress(qweight, meta, in_features, scales.dtype, scales, zeros, group_size, zero_const)


@decompress_24_int4.register_fake
def _(qweight, meta, scales, zeros, group_size, zero_const, in_features):
    return scales.new_empty(qweight.shape[0], in_features)
