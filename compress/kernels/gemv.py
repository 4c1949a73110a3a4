"""Weight-only matrix-vector products for decode steps on CUDA: Triton kernels that read a quantized weight
once, in the layout the checkpoint stores, and multiply it by a few tokens' activations.

A decode step multiplies one token (a few, when decoding a batch or verifying a draft) by every weight
matrix, so its time is the time to read the weights. Two ops:

* :func:`gemv_int4`: packed 4-bit codes [N, K/2] (two a byte, the even column in the low nibble) with
  group-wise scales and uint8 zero points or a constant zero point (the ``int`` format at 3 and 4 bits).
  Where :func:`compress.kernels.cuda_int4.applies` (1-8 tokens, groups of 128 times a power of two, the
  shapes of common models) it runs the CUDA kernel there, which feeds the codes to the tensor cores as they are
  stored and is 1.7-1.9x faster than the Triton kernels below (H100, Llama-3-8B shapes, one token: up
  projection 10.5 against 18.9 us, down 11.7 against 21.9 us, weights replayed from L2). Otherwise the Triton
  kernels: from a few tokens on (:func:`takes_dot`) a tensor-core kernel (below), else the one-token kernel;
* :func:`gemv_8bit`: one byte a weight [N, K] (int8, or float8 E4M3) with per-row scales and optional uint8
  per-row zero points (the ``int`` format at 8 bits per channel, and ``fp8``); a tensor-core kernel too.

Each program of the one-token kernels owns ``BLOCK_N`` output rows of one token and streams their weights in tiles
of ``BLOCK_K`` bytes a row. The 4-bit tile is shaped [rows, groups, bytes of a group], so each group's scale and
zero point are loaded once and broadcast, and the tile's activations are read as 32-bit words of two 16-bit values,
the tile's own shape. The programs of one row block for different tokens are launched next to each other, so the
other tokens can read the weight from L2. The one-token kernels load the weights with L1's evict-first hint: the
weights are read once, and the hint leaves L1 to the activations, which each row tile reads again (H100, Llama-3-8B
decode step, old and new code in one call: int4 with its head 256.7 -> 264.7 tok/s, int8 218.4 -> 227.9; bypassing
L1 (``.cg``) instead gained nothing, and an evict-last hint on the activations cost instructions and gained nothing;
the tensor-core kernels below, whose activations go through shared memory, gained nothing from it either: 8 tokens a
step, 1303.0 -> 1305.1 tok/s int4, 1361.6 -> 1341.8 int8, and do without). All kernels are torch custom ops, so
torch.compile and CUDA graphs take them whole; tile sizes are autotuned per shape on first use, timed as CUDA-graph
replays (as decode steps run).

Measured on an H100 (``python -m benchmarks.kernel_bench``, weights replayed from L2 as the autotuner times
them; 2026-11-26): one token, Llama-3-8B's MLP (up / down projection): the 4-bit kernel 18.0 / 18.9 us (52-54% of
the copy bandwidth; 19.8 / 20.7 before its codes were made floats in PTX), cuBLAS on bf16 41.8 / 44.6 us; the
8-bit kernel 23.3 / 22.6 us for int8 / fp8 on the up projection (84 / 87%).

The one-token kernels' time grows with the tokens (each program dequantizes for its own token). From 2 tokens
(5 on layers under 2**23 weights) the 4-bit op runs a kernel that turns each weight tile into 16 bits once and
multiplies it by all the tokens on the tensor cores, the weights as the left operand (wgmma reads it from
registers on Hopper). Same benchmark, 8 / 16 tokens, up projection: 31.8 / 35.3 us, against 121.9 / 239.3 us for
the one-token kernel and 41.9 / 42.3 us for cuBLAS on bf16; 49.0 / 66.8 us for this kernel's previous version,
which had the tokens as the left operand. The 8-bit op has one too, from 3 tokens (5 on small layers), up to
MAX_TOKENS: 8 tokens, up projection, 30.0 us (int8) / 29.3 us (fp8) against 121.0 / 84.7 us for its one-token
kernel.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from compress.kernels import cuda_8bit, cuda_int4

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

#: Calls with up to this many tokens take the kernels; more (prefill) dequantize once and use a dense matmul.
#: 4-bit calls with 16-bit activations take them up to DOT_MAX_TOKENS tokens (the tensor-core kernel; H100,
#: 16 tokens, Llama-3-8B shapes: 1.8-3.6x faster than dequantizing for cuBLAS).
MAX_TOKENS = 8
#: 4-bit calls with at least this many tokens (and 16-bit activations) take the tensor-core kernel, which
#: dequantizes each weight once for all the tokens; fewer take the one-token kernel. Its fixed costs (a zeroed
#: float32 output, atomic adds, the cast back) weigh on small layers, which take it from SMALL_DOT_MIN_TOKENS
#: (H100, 2-4 tokens, us one-token / tensor-core: k/v 1024x4096 4.8 / 7.0, 5.7 / 6.9, 6.7 / 7.0; o 4096x4096
#: 10.8 / 10.2, 15.4 / 10.3, 19.6 / 10.2; up 14336x4096 33.1 / 30.8 at 2 tokens).
DOT_MIN_TOKENS = 2
#: The 8-bit op's one-token kernel holds out longer (H100, 2 tokens, us one-token / tensor-core: int8 o 10.7 /
#: 10.7, up 35.2 / 28.8; fp8 o 7.2 / 10.3, up 28.2 / 28.4; 3 tokens: int8 15.4 / 10.6, 50.2 / 28.8; fp8 10.8 /
#: 10.3, 36.5 / 28.7).
DOT_MIN_TOKENS_8BIT = 3
SMALL_DOT_MIN_TOKENS = 5
SMALL_LAYER = 2**23  # weights (N * K) below which a layer is small
DOT_BLOCK_M = 16  # the tensor-core tile's fewest rows (tokens): calls of more take the next power of two
#: The most tokens the 4-bit tensor-core kernel computes (:func:`dot_int4`): batched decode (32-64 sequences a
#: step), long drafts being verified, small prefill chunks, where dequantizing the whole weight for cuBLAS writes
#: and reads it again in 16 bits, 4.5 times the bytes of the codes.
DOT_MAX_TILE = 128
#: The most tokens the ops send to the tensor-core kernels. Calls of 17 to DOT_MAX_TILE tokens will take them once
#: their speed there is measured on a GPU (``benchmarks.kernel_bench --tokens 32,64,128``); not yet.
DOT_MAX_TOKENS = 16
DOT_DTYPES = (torch.bfloat16, torch.float16)  # activations the tensor-core kernel takes


def takes_dot(tokens: int, weights: int, dtype: torch.dtype, min_tokens: int = DOT_MIN_TOKENS) -> bool:
    """Whether a call with ``tokens`` rows of ``dtype`` activations, on a layer of ``weights`` weights (N * K),
    runs the op's tensor-core kernel rather than its one-token kernel (``min_tokens``: the op's threshold on
    layers that are not small, DOT_MIN_TOKENS for 4 bits, DOT_MIN_TOKENS_8BIT for 8)."""
    first = min_tokens if weights >= SMALL_LAYER else SMALL_DOT_MIN_TOKENS
    return first <= tokens <= DOT_MAX_TOKENS and dtype in DOT_DTYPES


def dot_tile(tokens: int) -> int:
    """The tensor-core kernels' tile of tokens (their BLOCK_M) for a call of ``tokens``: the next power of two, at
    least DOT_BLOCK_M."""
    return max(DOT_BLOCK_M, 1 << (tokens - 1).bit_length())


def _dot_grid(n: int):
    return lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])


def available(x: torch.Tensor, four_bit: bool = False) -> bool:
    """Whether the kernels can take input ``x`` [..., K]: on CUDA, with at most MAX_TOKENS tokens (DOT_MAX_TOKENS
    for the 4-bit op, ``four_bit``, with 16-bit ``x``)."""
    limit = DOT_MAX_TOKENS if four_bit and x.dtype in DOT_DTYPES else MAX_TOKENS
    return triton is not None and x.is_cuda and x.numel() <= limit * x.shape[-1]


if triton is not None:

    def _configs(block_ks):
        return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
                for bn in (2, 4, 8, 16) for bk in block_ks for w in (4, 8)]

    def _bench_graphed(kernel_call, quantiles):
        # Decode steps run as CUDA graphs: time the candidates the same way, or a small kernel's launch
        # overhead (tens of microseconds from Python) hides the differences between tile shapes.
        return triton.testing.do_bench_cudagraph(kernel_call, rep=20, quantiles=quantiles)

    # Integer codes become floats by the exponent trick: the bits 0x4B000000 | c read as a float are 2**23 + c
    # for 0 <= c < 2**23, and subtracting 2**23 + zero is exact: two full-rate instructions instead of an
    # int-to-float conversion, which runs at a quarter of the rate (the 8-bit kernels).
    MAGIC = tl.constexpr(0x4B000000)
    TWO_23 = tl.constexpr(8388608.0)
    ONE = tl.constexpr(0x3F800000)  # 1.0f

    # The 4-bit kernels turn a byte's two codes into floats in inline PTX, four bytes an instance (pack=4: byte i
    # of $in is element i; a 16-bit output holds elements 0, 1 in its first register, low half first). Where PTX
    # cannot run (Triton's interpreter, AMD GPUs) the same floats come from Triton's integer ops.
    # One-token kernel: code c -> 1 + c/16, c in the top four mantissa bits of 1.0f, by a shift and one lop3
    # ((a & b) | c, immediate 0xEA) a code, against 3-4 instructions for extracting the byte and the exponent trick
    # (one token, Llama-3-8B shapes: 5-18% faster on an H200 with a cold L2; on an H100 with weights in L2, 9-10%
    # on o, up and down, level on k/v).
    UNIT_PTX = tl.constexpr("""{
    .reg .b32 t<8>;
    shl.b32 t0, $8, 19; shl.b32 t1, $8, 15; shl.b32 t2, $8, 11; shl.b32 t3, $8, 7;
    shl.b32 t4, $8, 3;  shr.u32 t5, $8, 1;  shr.u32 t6, $8, 5;  shr.u32 t7, $8, 9;
    lop3.b32 $0, t0, 0x00780000, 0x3F800000, 0xEA; lop3.b32 $1, t2, 0x00780000, 0x3F800000, 0xEA;
    lop3.b32 $2, t4, 0x00780000, 0x3F800000, 0xEA; lop3.b32 $3, t6, 0x00780000, 0x3F800000, 0xEA;
    lop3.b32 $4, t1, 0x00780000, 0x3F800000, 0xEA; lop3.b32 $5, t3, 0x00780000, 0x3F800000, 0xEA;
    lop3.b32 $6, t5, 0x00780000, 0x3F800000, 0xEA; lop3.b32 $7, t7, 0x00780000, 0x3F800000, 0xEA;
    }""")
    # Tensor-core kernel: code c -> BASE + c in 16 bits (bfloat16 0x4300 | c = 128 + c; float16 0x6400 | c =
    # 1024 + c): bytes spread to 16-bit lanes by prmt, then one lop3 per two codes.
    HALVES_PTX = """{
    .reg .b32 t0, t1;
    prmt.b32 t0, $4, 0, 0x7170; prmt.b32 t1, $4, 0, 0x7372;
    lop3.b32 $0, t0, 0x000F000F, MAGIC2, 0xEA; lop3.b32 $1, t1, 0x000F000F, MAGIC2, 0xEA;
    shr.b32 t0, t0, 4; shr.b32 t1, t1, 4;
    lop3.b32 $2, t0, 0x000F000F, MAGIC2, 0xEA; lop3.b32 $3, t1, 0x000F000F, MAGIC2, 0xEA;
    }"""
    BF16_PTX = tl.constexpr(HALVES_PTX.replace("MAGIC2", "0x43004300"))
    FP16_PTX = tl.constexpr(HALVES_PTX.replace("MAGIC2", "0x64006400"))

    @triton.jit
    def _unit_floats(packed, PTX: tl.constexpr):
        """uint8 bytes -> (1 + low nibble / 16, 1 + high nibble / 16) in float32."""
        if PTX:
            lo, hi = tl.inline_asm_elementwise(UNIT_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r", [packed],
                                               dtype=(tl.float32, tl.float32), is_pure=True, pack=4)
        else:
            p = packed.to(tl.int32)
            lo = (((p << 19) & 0x00780000) | ONE).to(tl.float32, bitcast=True)
            hi = (((p << 15) & 0x00780000) | ONE).to(tl.float32, bitcast=True)
        return lo, hi

    @triton.jit
    def _based_halves(packed, IS_BF16: tl.constexpr, PTX: tl.constexpr):
        """uint8 bytes -> (BASE + low nibble, BASE + high nibble) in bfloat16 (BASE 128) or float16 (1024)."""
        dtype: tl.constexpr = tl.bfloat16 if IS_BF16 else tl.float16
        if PTX:
            lo, hi = tl.inline_asm_elementwise(BF16_PTX if IS_BF16 else FP16_PTX, "=r,=r,=r,=r,r", [packed],
                                               dtype=(dtype.value, dtype.value), is_pure=True, pack=4)
        else:
            magic: tl.constexpr = 0x4300 if IS_BF16 else 0x6400
            p = packed.to(tl.int16)
            lo = ((p & 15) | magic).to(dtype, bitcast=True)
            hi = (((p >> 4) & 15) | magic).to(dtype, bitcast=True)
        return lo, hi

    @triton.jit
    def _x_pairs(x_ptr, m, K, kb, mask, X_WORDS: tl.constexpr):
        """Token m's activations at the even and odd columns of byte columns ``kb``, in float32. 16-bit x is read
        as int32 words (even column in the low half), the shape of the packed bytes, so nothing reshuffles it;
        ``X_WORDS``: 1 bfloat16, 2 float16, 0 float32 (two strided loads)."""
        if X_WORDS == 0:
            xe = tl.load(x_ptr + m * K + 2 * kb, mask=mask, other=0.0)
            xo = tl.load(x_ptr + m * K + 2 * kb + 1, mask=mask, other=0.0)
        else:
            w = tl.load(x_ptr + m * (K // 2) + kb, mask=mask, other=0)
            if X_WORDS == 1:
                xe = (w << 16).to(tl.float32, bitcast=True)
                xo = (w & -65536).to(tl.float32, bitcast=True)
            else:
                xe = w.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
                xo = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return xe, xo

    @triton.autotune(configs=_configs((128, 256, 512)), key=["M", "N", "K"], do_bench=_bench_graphed)
    @triton.jit
    def _gemv_int4_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, N, K, groups, zero_const, GROUP: tl.constexpr,
                          HAS_ZERO: tl.constexpr, X_WORDS: tl.constexpr, PTX: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
        # With u = 1 + c/16, sum((c - zero) x) = 16 sum(u x) - (16 + zero) sum(x): a group's products need no
        # subtraction, and its sum of x is shared by the tile's rows.
        GB: tl.constexpr = GROUP // 2  # packed bytes of a group
        NG: tl.constexpr = BLOCK_K // GB if BLOCK_K > GB else 1  # groups in a tile
        m = tl.program_id(0) % M
        n = (tl.program_id(0) // M) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        gi = tl.arange(0, NG)
        j = tl.arange(0, GB)
        KB = K // 2
        acc = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
        for g0 in range(0, groups, NG):
            g = g0 + gi
            gmask = g < groups
            kb = g[:, None] * GB + j[None, :]  # [NG, GB] byte columns
            packed = tl.load(q_ptr + n[:, None, None] * KB + kb[None, :, :],
                             mask=nmask[:, None, None] & gmask[None, :, None], other=0, eviction_policy="evict_first")
            smask = nmask[:, None] & gmask[None, :]
            s = tl.load(s_ptr + n[:, None] * groups + g[None, :], mask=smask, other=0.0).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(z_ptr + n[:, None] * groups + g[None, :], mask=smask, other=0).to(tl.float32)
            else:
                z = tl.zeros((BLOCK_N, NG), dtype=tl.float32) + zero_const
            xe, xo = _x_pairs(x_ptr, m, K, kb, gmask[:, None], X_WORDS)
            lo, hi = _unit_floats(packed, PTX)
            ux = tl.sum(lo * xe[None, :, :] + hi * xo[None, :, :], axis=2)
            sx = tl.sum(xe + xo, axis=1)
            acc += (16.0 * ux - (16.0 + z) * sx[None, :]) * s
        y = tl.sum(acc, axis=1)
        tl.store(y_ptr + m * N + n, y.to(y_ptr.dtype.element_ty), mask=nmask)

    @triton.jit
    def _byte_offsets(z_ptr, n, nmask, KIND: tl.constexpr):
        """The 8-bit kernels' per-row 2**23 + zero point (KIND 1: loaded; int8 codes: 128, the +128 of
        :func:`_byte_values`)."""
        if KIND == 1:
            offset = tl.load(z_ptr + n, mask=nmask, other=0).to(tl.float32) + TWO_23
        else:
            offset = tl.zeros(n.shape, dtype=tl.float32) + (TWO_23 + 128.0)
        return offset

    @triton.jit
    def _byte_values(w, offset, KIND: tl.constexpr, like):
        """8-bit weights [rows, k] as values in ``like``'s dtype: E4M3 bytes (KIND 2) decoded, integer codes
        (KIND 0 int8, 1 uint8) minus their zero points by the exponent trick, ``offset`` from :func:`_byte_offsets`."""
        if KIND == 2:  # float8 E4M3, loaded as its bytes
            wf = w.to(tl.float8e4nv, bitcast=True).to(like.dtype)
        elif KIND == 1:
            wf = ((w.to(tl.int32) | MAGIC).to(tl.float32, bitcast=True) - offset[:, None]).to(like.dtype)
        else:
            wf = (((w.to(tl.int32) + 128) | MAGIC).to(tl.float32, bitcast=True) - offset[:, None]).to(like.dtype)
        return wf

    @triton.autotune(configs=_configs((256, 512, 1024)), key=["M", "N", "K"], do_bench=_bench_graphed)
    @triton.jit
    def _gemv_8bit_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, KIND: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
        # KIND 0: int8 codes (zero 0); 1: uint8 codes with per-row zero points; 2: float8 E4M3 bytes.
        m = tl.program_id(0) % M
        n = (tl.program_id(0) // M) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        k = tl.arange(0, BLOCK_K)
        s = tl.load(s_ptr + n, mask=nmask, other=0.0).to(tl.float32)
        offset = _byte_offsets(z_ptr, n, nmask, KIND)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + k
            kmask = kk < K
            w = tl.load(w_ptr + n[:, None] * K + kk[None, :], mask=nmask[:, None] & kmask[None, :], other=0,
                        eviction_policy="evict_first")
            wf = _byte_values(w, offset, KIND, offset)
            x = tl.load(x_ptr + m * K + kk, mask=kmask, other=0.0).to(tl.float32)
            acc += wf * x[None, :]
        y = tl.sum(acc, axis=1)
        tl.store(y_ptr + m * N + n, (y * s).to(y_ptr.dtype.element_ty), mask=nmask)

    # A few tokens (a batch, or a draft being verified): the kernels above would redo the dequantization for
    # every token, so their time grows with the token count. These dequantize each weight tile once, into the
    # activations' 16-bit type, and let the tensor cores multiply it by all the tokens at once (padded to
    # BLOCK_M); programs also split K (SPLIT_K, a run-time argument: one compiled kernel serves every split) so
    # that narrow layers still fill the GPU, adding their partial sums atomically into a zeroed float32 output.
    # BLOCK_M (the tokens padded to a power of two from DOT_BLOCK_M) is part of the autotuning key, and the
    # candidates depend on it: tiles of 16 tokens choose among the first set of :func:`_dot_configs`, tiles of 32
    # and more among the second (eight warps too, and X_ROWS: the 4-bit kernel's other way of reading the
    # activations, which every row block reads again and which grow with the tokens).
    def _dot_configs(x_rows: bool = False) -> tuple[list, list]:
        few = [triton.Config({"BLOCK_N": bn, "SPLIT_K": sk, **({"X_ROWS": 0} if x_rows else {})}, num_warps=4,
                             num_stages=st)
               for bn in (64, 128) for sk in (1, 2, 4, 8) for st in (2, 3, 4)]
        many = [triton.Config({"BLOCK_N": bn, "SPLIT_K": sk, **({"X_ROWS": xr} if x_rows else {})}, num_warps=w,
                              num_stages=3)
                for bn in (64, 128) for sk in (1, 2, 4) for w in (4, 8) for xr in ((0, 1) if x_rows else (0,))]
        return few, many

    def dot_configs_for(kernel, block_m: int) -> list:
        """A tensor-core kernel's candidates for a tile of ``block_m`` tokens."""
        return kernel.few_tokens if block_m <= DOT_BLOCK_M else kernel.many_tokens

    def _autotuned_dot(x_rows: bool = False):
        few, many = _dot_configs(x_rows)

        def decorate(fn):
            kernel = triton.autotune(
                configs=few + many, key=["N", "K", "BLOCK_M"], do_bench=_bench_graphed, reset_to_zero=["y_ptr"],
                prune_configs_by={"early_config_prune": lambda configs, nargs, **kw: dot_configs_for(
                    kernel, kw.get("BLOCK_M", nargs.get("BLOCK_M", DOT_BLOCK_M)))})(fn)
            kernel.few_tokens, kernel.many_tokens = few, many
            return kernel
        return decorate

    @_autotuned_dot(x_rows=True)
    @triton.jit(do_not_specialize=["SPLIT_K"])
    def _dot_int4_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, N, K, groups, zero_const, GROUP: tl.constexpr,
                         HAS_ZERO: tl.constexpr, PTX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         X_ROWS: tl.constexpr, SPLIT_K):
        # The weight tile is the tensor cores' left operand ([BLOCK_N rows, K] times x's [K, BLOCK_M tokens]): on
        # Hopper, wgmma reads it from registers, where the codes were turned into 16 bits, and only the small x
        # tile goes through shared memory. One group a step: BASE + code minus BASE + zero is a small integer,
        # exact in 16 bits, so the group's products are summed by the tensor cores and scaled once, in float32.
        GB: tl.constexpr = GROUP // 2
        CB: tl.constexpr = GB if GB < 64 else 64
        IS_BF16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16  # else float16
        BASE: tl.constexpr = 128.0 if IS_BF16 else 1024.0
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        m = tl.arange(0, BLOCK_M)
        mmask = m < M
        j = tl.arange(0, CB)
        KB = K // 2
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for g in range(tl.program_id(1), groups, SPLIT_K):
            if HAS_ZERO:
                offset = tl.load(z_ptr + n * groups + g, mask=nmask, other=0).to(tl.float32) + BASE
            else:
                offset = tl.zeros((BLOCK_N,), dtype=tl.float32) + (zero_const + BASE)
            offset = offset.to(x_ptr.dtype.element_ty)[:, None]
            part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for c in tl.static_range(0, GB, CB):  # large groups in chunks of CB bytes a row
                b = g * GB + c + j
                packed = tl.load(q_ptr + n[:, None] * KB + b[None, :], mask=nmask[:, None], other=0)
                if X_ROWS:  # each token's 2 CB inputs in one contiguous load, split into even and odd
                    kx = 2 * (g * GB + c) + tl.arange(0, 2 * CB)
                    xx = tl.load(x_ptr + m[:, None] * K + kx[None, :], mask=mmask[:, None], other=0.0)
                    xe, xo = tl.split(tl.reshape(xx, (BLOCK_M, CB, 2)))
                    xe, xo = tl.trans(xe), tl.trans(xo)
                else:  # the even and the odd inputs in two strided loads, laid out as the dot takes them
                    xe = tl.load(x_ptr + m[None, :] * K + 2 * b[:, None], mask=mmask[None, :], other=0.0)
                    xo = tl.load(x_ptr + m[None, :] * K + 2 * b[:, None] + 1, mask=mmask[None, :], other=0.0)
                lo, hi = _based_halves(packed, IS_BF16, PTX)
                part = tl.dot(lo - offset, xe, part)
                part = tl.dot(hi - offset, xo, part)
            s = tl.load(s_ptr + n * groups + g, mask=nmask, other=0.0).to(tl.float32)
            acc += part * s[:, None]
        tl.atomic_add(y_ptr + m[None, :] * N + n[:, None], acc, mask=nmask[:, None] & mmask[None, :], sem="relaxed")

    @_autotuned_dot()
    @triton.jit(do_not_specialize=["SPLIT_K"])
    def _dot_8bit_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, KIND: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, SPLIT_K):
        # As _dot_int4_kernel, for _gemv_8bit_kernel's KINDs: codes minus zero points (|v| <= 255) and E4M3 values
        # are exact in 16 bits; the row scales apply once, at the end.
        BLOCK_K: tl.constexpr = 128
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        m = tl.arange(0, BLOCK_M)
        mmask = m < M
        k = tl.arange(0, BLOCK_K)
        offset = _byte_offsets(z_ptr, n, nmask, KIND)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(tl.program_id(1) * BLOCK_K, K, SPLIT_K * BLOCK_K):
            kk = k0 + k
            kmask = kk < K
            w = tl.load(w_ptr + n[:, None] * K + kk[None, :], mask=nmask[:, None] & kmask[None, :], other=0)
            x = tl.load(x_ptr + m[None, :] * K + kk[:, None], mask=kmask[:, None] & mmask[None, :], other=0.0)
            wf = _byte_values(w, offset, KIND, x)
            acc = tl.dot(wf, x, acc)
        acc *= tl.load(s_ptr + n, mask=nmask, other=0.0).to(tl.float32)[:, None]
        tl.atomic_add(y_ptr + m[None, :] * N + n[:, None], acc, mask=nmask[:, None] & mmask[None, :], sem="relaxed")


def _ptx(x: torch.Tensor) -> bool:
    """Whether the 4-bit kernels may use inline PTX for ``x``: on NVIDIA GPUs, not in Triton's interpreter."""
    return x.is_cuda and torch.version.hip is None and os.environ.get("TRITON_INTERPRET", "0") != "1"


def _one_token(kernel, x: torch.Tensor, x_arg: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
               zeros: torch.Tensor | None, *extra, **meta) -> torch.Tensor:
    """Runs a one-token ``kernel`` (a program for each BLOCK_N rows and token) on ``x`` [M, K], passed as
    ``x_arg``: [M, N] in ``x``'s dtype."""
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid = lambda tile: (triton.cdiv(N, tile["BLOCK_N"]) * M,)  # noqa: E731
    kernel[grid](x_arg, weight, scales, zeros if zeros is not None else scales, y, M, N, K, *extra, **meta)
    return y


def _tensor_cores(kernel, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  *extra, **meta) -> torch.Tensor:
    """Runs a tensor-core ``kernel`` (its split-K programs add into a zeroed float32 output) on ``x`` [M, K]:
    [M, N] in ``x``'s dtype. The tile holds the tokens padded to a power of two, at least DOT_BLOCK_M."""
    M, K = x.shape
    N = weight.shape[0]
    y32 = torch.zeros(M, N, device=x.device, dtype=torch.float32)
    kernel[_dot_grid(N)](x, weight, scales, zeros if zeros is not None else scales, y32, M, N, K, *extra,
                         BLOCK_M=dot_tile(M), **meta)
    return y32.to(x.dtype)


@torch.library.custom_op("compress::gemv_int4", mutates_args=())
def gemv_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              group_size: int, zero_const: float) -> torch.Tensor:
    """``x`` [M, K] times the dequantized 4-bit weight: [M, N] in ``x``'s dtype.

    ``qweight`` uint8 [N, K/2], ``scales`` [N, K/group_size], ``zeros`` uint8 like ``scales`` or None (then
    every zero point is ``zero_const``); w[n, k] = (code - zero) * scale of k's group.
    """
    x = x.contiguous()
    if cuda_int4.applies(x, qweight, scales, group_size):
        return cuda_int4.int4_mma(x, qweight, scales, zeros, group_size, zero_const)
    path = dot_int4 if takes_dot(x.shape[0], qweight.shape[0] * x.shape[1], x.dtype) else one_token_int4
    return path(x, qweight, scales, zeros, group_size, zero_const)


def one_token_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   group_size: int, zero_const: float) -> torch.Tensor:
    """:func:`gemv_int4` by the one-token kernel, whatever the tokens (``x`` contiguous; for benchmarks)."""
    words = {torch.bfloat16: 1, torch.float16: 2}.get(x.dtype, 0)
    return _one_token(_gemv_int4_kernel, x, x.view(torch.int32) if words else x, qweight, scales, zeros,
                      scales.shape[1], zero_const, GROUP=group_size, HAS_ZERO=zeros is not None, X_WORDS=words,
                      PTX=_ptx(x))


def dot_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
             group_size: int, zero_const: float) -> torch.Tensor:
    """:func:`gemv_int4` by the tensor-core kernel (``x`` contiguous, 16-bit, at most DOT_MAX_TILE tokens)."""
    return _tensor_cores(_dot_int4_kernel, x, qweight, scales, zeros, scales.shape[1], zero_const,
                         GROUP=group_size, HAS_ZERO=zeros is not None, PTX=_ptx(x))


@gemv_int4.register_fake
def _(x, qweight, scales, zeros, group_size, zero_const):
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.custom_op("compress::gemv_int4_corrected", mutates_args=())
def gemv_int4_corrected(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                        group_size: int, zero_const: float, A: torch.Tensor, B: torch.Tensor,
                        scratch: torch.Tensor) -> torch.Tensor:
    """:func:`gemv_int4` plus a low-rank correction: x W^T + x A^T B^T with ``A`` [R, K], ``B`` [N, R]. The CUDA
    kernel adds it in its own launch (``scratch``: :func:`compress.kernels.cuda_int4.correction_scratch`, zero and
    left zero, so the op declares no mutation); elsewhere the two thin products follow the 4-bit one."""
    x = x.contiguous()
    if cuda_int4.applies(x, qweight, scales, group_size) and cuda_int4.correction_applies(x, A, B, scratch):
        return cuda_int4.int4_mma(x, qweight, scales, zeros, group_size, zero_const, correction=(A, B, scratch))
    return gemv_int4(x, qweight, scales, zeros, group_size, zero_const) + F.linear(F.linear(x, A), B)


@gemv_int4_corrected.register_fake
def _(x, qweight, scales, zeros, group_size, zero_const, A, B, scratch):
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.custom_op("compress::gemv_8bit", mutates_args=())
def gemv_8bit(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """``x`` [M, K] times an 8-bit weight [N, K] (int8, uint8 or float8): [M, N] in ``x``'s dtype.

    ``scales`` holds N per-row scales (any shape with N elements); ``zeros`` N uint8 zero points or None:
    w[n, k] = (weight[n, k] - zero[n]) * scale[n].
    """
    x = x.contiguous()
    args = kernel_args_8bit(weight, scales, zeros)
    if cuda_8bit.applies(x, *args):
        return cuda_8bit.byte_mma(x, *args)
    takes = takes_dot(x.shape[0], weight.shape[0] * x.shape[1], x.dtype, DOT_MIN_TOKENS_8BIT)
    return (dot_8bit if takes else one_token_8bit)(x, *args)


def kernel_args_8bit(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> tuple:
    """:func:`gemv_8bit`'s weight arguments as its kernels take them: (the weight's bytes, flat scales, flat zero
    points or None, kind: 0 int8, 1 uint8 with zero points, 2 float8 E4M3)."""
    if weight.dtype == torch.float8_e4m3fn:
        kind, weight = 2, weight.view(torch.uint8)
    elif weight.dtype == torch.uint8:
        if zeros is None:
            raise ValueError("gemv_8bit: uint8 codes need their zero points")
        kind = 1
    elif weight.dtype == torch.int8:
        kind = 0
    else:
        raise ValueError(f"gemv_8bit: weights of dtype {weight.dtype} are not 8-bit codes")
    return weight, scales.reshape(-1), zeros.reshape(-1) if zeros is not None else None, kind


def one_token_8bit(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   kind: int) -> torch.Tensor:
    """:func:`gemv_8bit` by the one-token kernel, whatever the tokens (``x`` contiguous; ``weight`` as bytes of
    ``kind`` 0 int8, 1 uint8 with ``zeros``, 2 float8 E4M3; ``scales`` and ``zeros`` flat; for benchmarks)."""
    return _one_token(_gemv_8bit_kernel, x, x, weight, scales, zeros, KIND=kind)


def dot_8bit(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
             kind: int) -> torch.Tensor:
    """:func:`gemv_8bit` by the tensor-core kernel (arguments as :func:`one_token_8bit`; ``x`` 16-bit, at most
    DOT_MAX_TOKENS tokens)."""
    return _tensor_cores(_dot_8bit_kernel, x, weight, scales, zeros, KIND=kind)


@gemv_8bit.register_fake
def _(x, weight, scales, zeros):
    return x.new_empty(x.shape[0], weight.shape[0])
