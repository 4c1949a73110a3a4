// 2:4 sparse weight times 1-8 tokens for decode steps, on the tensor cores, reading the 2:4 formats as the checkpoint
// stores them: the kept entries of each row in column order, two a run of four columns, either 16-bit values
// [N, K/2] (``sparse24``, CODES 0) or 4-bit codes two a byte [N, K/4] (``sparse24-int``, CODES 1, with the ``int``
// format's scales and zero points per group of original columns); and their positions, uint8 [N, K/8] read as
// 32-bit words: a run's two column indices (0-3, increasing) in a nibble, bits 0-1 the first, eight runs a word.
//
// Compiled at run time by NVRTC (compress/kernels/cuda_int4.py) behind mma.cuh, with IS_BF16, HAS_ZERO, WARPS and
// CODES defined, and MIN_BLOCKS where a caller caps the registers: above 1 it asks the compiler for few enough that
// an SM holds that many blocks (32 / WARPS: at most 64 a thread, 32 warps an SM, as int4_mma.cu has without a bound;
// compiled for sm_90 without one this kernel takes 64-74 at 16-bit values and 60-72 at 4-bit codes, which leaves
// 16-28 warps an SM at 4 and 16 warps a block).
//
// The layout of the work is int4_mma.cu's: a block owns 16 output rows, its warps take turns over the rows' chunks
// of 128 columns, lane (g, t) takes 32 columns (eight runs) of rows g and g + 8 and the same columns of token g's
// activations. Each run's two kept entries (one 32-bit word) are spread to the run's two dense words, the pruned
// columns zero, by two prmt whose selectors come from a 16-entry table indexed by the run's position nibble; the
// dense words and the activations then feed one mma.m16n8k16 a run, as dense weights would. The weights are read
// once, at half the dense bytes (plus 1 bit a column of positions); the activations are read whole (from L1/L2).

#ifndef CODES
#define CODES 0
#endif
#ifndef SPARSE_MMA
#define SPARSE_MMA 0  // 1: the sparse tensor cores (mma.sp) take the kept entries as they are (see below)
#endif
#if defined(MIN_BLOCKS) && MIN_BLOCKS > 1  // (a bound of 1 block, spelt out, changes nvcc's allocation: 68 -> 87)
#define BOUNDS __launch_bounds__(WARPS * 32, MIN_BLOCKS)
#else
#define BOUNDS __launch_bounds__(WARPS * 32)
#endif

__device__ __forceinline__ unsigned load_stream1(const unsigned* p) {
    unsigned r;
    asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(r) : "l"(p));
    return r;
}

__device__ __forceinline__ uint2 load_stream2(const void* p) {
    uint2 r;
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
    return r;
}

// The prmt selectors that place a run's kept pair (a word: the first entry in the low half) at its columns: the low
// 16 bits build the run's columns 0-1, the high 16 bits columns 2-3; byte 4 (of a zero word) fills a pruned column.
__device__ __forceinline__ unsigned run_selector(unsigned nibble) {
    const unsigned first = nibble & 3u, second = nibble >> 2;
    unsigned s = 0;
#pragma unroll
    for (unsigned c = 0; c < 4; ++c) s |= (first == c ? 0x10u : (second == c ? 0x32u : 0x44u)) << (8 * c);
    return s;
}

// One run's mma: the kept pairs of rows g (pg) and g + 8 (ph) at their columns, times the run's four activations
// (two words).
__device__ __forceinline__ void run_mma(float* d, unsigned pg, unsigned ph, unsigned sg, unsigned sh, unsigned x0,
                                        unsigned x1) {
    mma(d, prmt(pg, 0u, sg), prmt(ph, 0u, sh), prmt(pg, 0u, sg >> 16), prmt(ph, 0u, sh >> 16), x0, x1);
}

#if SPARSE_MMA
// SPARSE_MMA 1: mma.sp.m16n8k32 takes a row's 32 columns as 8 runs of which it is given the kept pairs and their
// positions, so nothing is spread and each product covers twice the columns. Lane (g, t) supplies the pairs of the
// hardware's runs t and t + 4 (rows g and g + 8, as a dense m16n8k16's A over the kept entries); product i (0-3) of
// a chunk gives it the lane's own runs 2i and 2i + 1 (so the loads stay the dense path's), which makes the
// hardware's run j the chunk's run 8 (j % 4) + 2i + j / 4. The activations follow that order: lane t's four words
// (k slots 2t + 8m, 2t + 8m + 1) are words 4i + t % 2 and 4i + 2 + t % 2 of lane t / 2's and lane t / 2 + 2's 16
// (loaded a word at a time, from L1).
// The positions (lanes 0 and 1 give them: selector 0) cover the hardware's runs 4t..4t + 3, row g in the low half
// and g + 8 in the high: nibble 2i + t of each of the row's four position words of the chunk. The manual gives the
// A and metadata layouts only in figures; these were checked on an H100 (a one-warp probe against A @ B over eight
// candidate layouts, 2026-12-08, and the -m gpu tests).
#if IS_BF16
#define MMA_SP "mma.sp.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32"
#else
#define MMA_SP "mma.sp.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32"
#endif

__device__ __forceinline__ void mma_sp(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                       unsigned b1, unsigned b2, unsigned b3, unsigned e) {
    asm volatile(MMA_SP " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "r"(b2), "r"(b3), "r"(e));
}

// Nibble ``n`` (0-7) of each of four position words, in bytes 0, 1, 2, 3 of the result's low nibbles: the byte
// holding it gathered from each word by prmt, then the nibble moved to the low half of its byte.
__device__ __forceinline__ unsigned nibbles(uint4 w, int n) {
    const unsigned byte = (unsigned)(n >> 1), sel = byte | ((4u + byte) << 4);
    const unsigned b = prmt(prmt(w.x, w.y, sel), prmt(w.z, w.w, sel), 0x5410u);
    return (b >> (4 * (n & 1))) & 0x0F0F0F0Fu;
}

// The metadata of product i for lane t (t = 0, 1; lanes 2 and 3 compute one the instruction ignores)
__device__ __forceinline__ unsigned sp_meta(uint4 pg, uint4 ph, int i, int t) {
    unsigned ng = nibbles(pg, 2 * i + (t & 1)), nh = nibbles(ph, 2 * i + (t & 1));
    ng = (ng | (ng >> 4)) & 0x00FF00FFu;  // bytes 0 and 2: the four nibbles in order
    nh = (nh | (nh >> 4)) & 0x00FF00FFu;
    return prmt(ng, nh, 0x6420u);
}
#endif

#if CODES
// The kept pair of run r (0-7) of a lane's eight bytes of codes, as 16-bit (c - zero) values: byte r holds the
// run's first code in its low nibble and its second in the high one.
__device__ __forceinline__ unsigned code_pair(uint2 c, int r, unsigned zero) {
    const unsigned w = r < 4 ? c.x : c.y;
    const unsigned b = (unsigned)(r & 3);
    return centre(lop_pair(prmt(w, w >> 4, b | ((4u + b) << 8))), zero);
}
#endif

extern "C" __global__ void BOUNDS
sparse24_mma(const u16* __restrict__ x, const u8* __restrict__ w, const unsigned* __restrict__ meta,
             const u16* __restrict__ scales, const u8* __restrict__ zeros, u16* __restrict__ y, int M, int N, int K,
             int groups, int group_shift, int zero_const) {
    __shared__ float partial[WARPS][32][4];
#if !SPARSE_MMA
    __shared__ unsigned selectors[16];
    if (threadIdx.x < 16) selectors[threadIdx.x] = run_selector(threadIdx.x);
    __syncthreads();
#endif
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int row_g = blockIdx.x * 16 + g, row_h = row_g + 8;
    const int chunks = K / 128;
    const int token = g < M ? g : M - 1;  // lanes past the tokens compute a copy of the last one's columns
#if SPARSE_MMA
    // a chunk: a row's four words of positions (each lane all four); of the activations (64 words), words
    // 16 (t / 2) + 4i + t % 2 + {0, 2, 32, 34} for product i
    typedef uint4 Pos;
    const uint4* mg = (const uint4*)(meta + (long)row_g * (K / 32));
    const uint4* mh = (const uint4*)(meta + (long)row_h * (K / 32));
    const unsigned* xp = (const unsigned*)(x + (long)token * K) + 16 * (t / 2) + (t & 1);
#define POS_AT(p, c) (p)[c]
#else
    // a chunk: one 32-bit word of positions a lane (4 a row), 32 activations a lane (16 uint4 a token)
    typedef unsigned Pos;
    const unsigned* mg = meta + (long)row_g * (K / 32) + t;
    const unsigned* mh = meta + (long)row_h * (K / 32) + t;
    const uint4* xt = (const uint4*)(x + (long)token * K + 32 * t);
#define POS_AT(p, c) load_stream1((p) + 4 * (c))
#endif
#if CODES
    // 8 bytes of codes a lane (4 uint2 a row's chunk)
    const uint2* wg = (const uint2*)(w + (long)row_g * (K / 4)) + t;
    const uint2* wh = (const uint2*)(w + (long)row_h * (K / 4)) + t;
    const u16 *sgp = scales + (long)row_g * groups, *shp = scales + (long)row_h * groups;
#if HAS_ZERO
    const u8 *zgp = zeros + (long)row_g * groups, *zhp = zeros + (long)row_h * groups;
#endif
    uint2 cg[AHEAD], ch[AHEAD];  // this chunk's and the AHEAD - 1 after it, in order (as the positions)
#else
    // 32 bytes of values a lane (8 uint4 a row's chunk)
    const uint4* wg = (const uint4*)(w + (long)row_g * K) + 2 * t;
    const uint4* wh = (const uint4*)(w + (long)row_h * K) + 2 * t;
    uint4 ag[AHEAD], bg[AHEAD], ah[AHEAD], bh[AHEAD];
#endif
    float acc[4] = {0.f, 0.f, 0.f, 0.f};

    int c = warp;
    Pos pos_g[AHEAD], pos_h[AHEAD];
#pragma unroll
    for (int a = 0; a < AHEAD; ++a) {
        const int cc = c + a * WARPS;
        if (cc < chunks) {
            pos_g[a] = POS_AT(mg, cc);
            pos_h[a] = POS_AT(mh, cc);
#if CODES
            cg[a] = load_stream2(wg + 4 * cc);
            ch[a] = load_stream2(wh + 4 * cc);
#else
            ag[a] = load_stream(wg + 8 * cc);
            bg[a] = load_stream(wg + 8 * cc + 1);
            ah[a] = load_stream(wh + 8 * cc);
            bh[a] = load_stream(wh + 8 * cc + 1);
#endif
        }
    }
    for (; c < chunks; c += WARPS) {
        const int next = c + AHEAD * WARPS;
        Pos npos_g, npos_h;
#if CODES
        uint2 ncg, nch;
#else
        uint4 nag, nbg, nah, nbh;
#endif
        if (next < chunks) {  // a later chunk's weights are on their way while this one is computed
            npos_g = POS_AT(mg, next);
            npos_h = POS_AT(mh, next);
#if CODES
            ncg = load_stream2(wg + 4 * next);
            nch = load_stream2(wh + 4 * next);
#else
            nag = load_stream(wg + 8 * next);
            nbg = load_stream(wg + 8 * next + 1);
            nah = load_stream(wh + 8 * next);
            nbh = load_stream(wh + 8 * next + 1);
#endif
        }
        float d[4] = {0.f, 0.f, 0.f, 0.f};
#if SPARSE_MMA
        const unsigned* xc = xp + 64 * c;
#define SP_PRODUCT(i, ag0, ah0, ag1, ah1)                                                                      \
        mma_sp(d, ag0, ah0, ag1, ah1, xc[4 * (i)], xc[32 + 4 * (i)], xc[4 * (i) + 2], xc[34 + 4 * (i)],         \
               sp_meta(pos_g[0], pos_h[0], i, t));
#else
        const uint4* xc = xt + 16 * c;
        const uint4 x0 = xc[0], x1 = xc[1], x2 = xc[2], x3 = xc[3];
        const unsigned xw[16] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w,
                                 x2.x, x2.y, x2.z, x2.w, x3.x, x3.y, x3.z, x3.w};
#endif
#if CODES
        const int group = c >> group_shift;  // chunks of 128 a group: a power of two (31 for one group a row)
#if HAS_ZERO
        const unsigned zg = neg_base_zero(zgp[group]), zh = neg_base_zero(zhp[group]);
#else
        const unsigned zg = neg_base_zero(zero_const), zh = zg;
#endif
#if SPARSE_MMA
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            SP_PRODUCT(i, code_pair(cg[0], 2 * i, zg), code_pair(ch[0], 2 * i, zh), code_pair(cg[0], 2 * i + 1, zg),
                       code_pair(ch[0], 2 * i + 1, zh))
        }
#else
#pragma unroll
        for (int r = 0; r < 8; ++r) {
            run_mma(d, code_pair(cg[0], r, zg), code_pair(ch[0], r, zh), selectors[(pos_g[0] >> (4 * r)) & 15u],
                    selectors[(pos_h[0] >> (4 * r)) & 15u], xw[2 * r], xw[2 * r + 1]);
        }
#endif
        const float sg = scale_of(sgp + group), sh = scale_of(shp + group);
        acc[0] += d[0] * sg;
        acc[1] += d[1] * sg;
        acc[2] += d[2] * sh;
        acc[3] += d[3] * sh;
        push(cg, ncg);
        push(ch, nch);
#else
        const unsigned vg[8] = {ag[0].x, ag[0].y, ag[0].z, ag[0].w, bg[0].x, bg[0].y, bg[0].z, bg[0].w};
        const unsigned vh[8] = {ah[0].x, ah[0].y, ah[0].z, ah[0].w, bh[0].x, bh[0].y, bh[0].z, bh[0].w};
#if SPARSE_MMA
#pragma unroll
        for (int i = 0; i < 4; ++i) SP_PRODUCT(i, vg[2 * i], vh[2 * i], vg[2 * i + 1], vh[2 * i + 1])
#else
#pragma unroll
        for (int r = 0; r < 8; ++r) {
            run_mma(d, vg[r], vh[r], selectors[(pos_g[0] >> (4 * r)) & 15u],
                    selectors[(pos_h[0] >> (4 * r)) & 15u], xw[2 * r], xw[2 * r + 1]);
        }
#endif
        acc[0] += d[0];
        acc[1] += d[1];
        acc[2] += d[2];
        acc[3] += d[3];
        push(ag, nag);
        push(bg, nbg);
        push(ah, nah);
        push(bh, nbh);
#endif
        push(pos_g, npos_g);
        push(pos_h, npos_h);
    }
    share_sums(partial, acc);
    __syncthreads();
    if (warp == 0) {
        float sum[4] = {0.f, 0.f, 0.f, 0.f};
        add_shared(partial, sum);
        store_rows(y, sum, 1.f, 1.f, M, N, row_g, row_h);
    }
}
