// 4-bit weight-only matrix product for decode steps (1-8 tokens) on the tensor cores, reading the ``int``
// format's packed codes as the checkpoint stores them: uint8 [N, K/2], two codes a byte, the even column in
// the low nibble; scales [N, K/GROUP] in the activations' 16-bit type; uint8 zero points or a constant.
//
// Compiled at run time by NVRTC (compress/kernels/cuda_int4.py) behind mma.cuh, with IS_BF16, HAS_ZERO and WARPS
// defined.
//
// A block owns 16 output rows; its WARPS warps take turns over the row's chunks of 128 codes (one 64-byte
// segment of a row: a group of 128, or part of a larger group) and the warps' sums are added in shared memory.
// In a warp, lane (g, t) = (lane / 4, lane % 4) loads 16 bytes (32 codes) of rows g and g + 8 of the chunk and
// the 32 activations of token g at the same columns. Each of its four 32-bit words of codes feeds two
// mma.m16n8k16: the products are summed over k, so any assignment of columns to the fragment's k slots
// works if the weights and the activations use the same one. Here the slots of lane t hold its own columns:
//   codes -> bf16/fp16 pairs (c - zero) without a conversion (mma.cuh), for the codes in nibbles s and s + 4;
//   activations: the same pairs of columns (s, s + 4), made by one prmt from the two words holding them.
// A chunk's product is scaled in float32 by its group's scale (rows g and g + 8).

#ifndef CORR_RANK
#define CORR_RANK 0  // > 0: add a low-rank correction x A^T B^T (the ``corrected`` format) in the same launch
#endif

#if CORR_RANK
// the low and high 16-bit values of a word, as floats
__device__ __forceinline__ float half_lo(unsigned w) { return scale_of_bits((u16)(w & 0xFFFFu)); }
__device__ __forceinline__ float half_hi(unsigned w) { return scale_of_bits((u16)(w >> 16)); }

__device__ __forceinline__ float shfl_xor(float v, int mask) {
    float r;
    asm volatile("shfl.sync.bfly.b32 %0, %1, %2, 0x1f, 0xffffffff;" : "=f"(r) : "f"(v), "r"(mask));
    return r;
}

__device__ __forceinline__ unsigned atomic_load(const unsigned* p) {
    unsigned r;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(r) : "l"(p) : "memory");
    return r;
}

__device__ __forceinline__ unsigned atomic_add(unsigned* p, unsigned v) {
    unsigned r;
    asm volatile("atom.global.add.u32 %0, [%1], %2;" : "=r"(r) : "l"(p), "r"(v) : "memory");
    return r;
}

__device__ __forceinline__ void fence() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }

__device__ __forceinline__ float load_cg(const float* p) {
    float r;  // written by other blocks in this launch: read through L2, never a stale L1 line
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(r) : "l"(p));
    return r;
}

__device__ __forceinline__ void atomic_add_f32(float* p, float v) {
    asm volatile("red.global.add.f32 [%0], %1;" :: "l"(p), "f"(v) : "memory");
}

__device__ __forceinline__ void sleep_ns(unsigned ns) { asm volatile("nanosleep.u32 %0;" :: "r"(ns)); }

// 16 bytes from global to shared memory without passing through registers (cp.async: sm_80 on); the copies a thread
// issued are complete after copy_async_wait
__device__ __forceinline__ void copy_async16(void* shared, const void* global) {
    unsigned dst;
    asm volatile("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(dst) : "l"(shared));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst), "l"(global) : "memory");
}
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void copy_async_wait() { asm volatile("cp.async.wait_all;" ::: "memory"); }
#endif


// The two mma of one 32-bit word of codes of rows g (wg) and g + 8 (wh), with the eight activations of those
// columns in xw (uint4 = four words of two 16-bit values).
__device__ __forceinline__ void word_mma(float* d, unsigned wg, unsigned wh, uint4 xw, unsigned zg, unsigned zh) {
    unsigned q0 = prmt(xw.x, xw.z, 0x5410), q1 = prmt(xw.x, xw.z, 0x7632);
    unsigned q2 = prmt(xw.y, xw.w, 0x5410), q3 = prmt(xw.y, xw.w, 0x7632);
    unsigned g0 = centre(lop_pair(wg), zg), g1 = centre(lop_pair(wg >> 4), zg);
    unsigned g2 = centre(lop_pair(wg >> 8), zg), g3 = centre(lop_pair(wg >> 12), zg);
    unsigned h0 = centre(lop_pair(wh), zh), h1 = centre(lop_pair(wh >> 4), zh);
    unsigned h2 = centre(lop_pair(wh >> 8), zh), h3 = centre(lop_pair(wh >> 12), zh);
    mma(d, g0, h0, g1, h1, q0, q1);
    mma(d, g2, h2, g3, h3, q2, q3);
}

#if CORR_RANK
// The correction's first half, t = x A^T [M, CORR_RANK] in float32, by the launch's first K / 256 blocks: block b
// takes columns [256 b, 256 b + 256) (8 a lane), its warps the rows of A in turn, four rows' loads in flight at a
// time, and adds its partial sums into t (zero before the launch); then it counts itself done in sync[0], after a
// fence that makes its sums visible. (Few registers: the kernel's count is the largest of its paths', and it sets
// how many blocks an SM holds.)
__device__ void correction_rows(const u16* __restrict__ x, const u16* __restrict__ a, float* t, unsigned* sync,
                                int M, int K) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int k = 256 * blockIdx.x + 8 * lane;
    constexpr int PER_WARP = (CORR_RANK + WARPS - 1) / WARPS;
#pragma unroll 1
    for (int i = 0; i < PER_WARP; i += 4) {
        uint4 av[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int r = warp + (i + j) * WARPS;
            if (i + j < PER_WARP && r < CORR_RANK) av[j] = *(const uint4*)(a + (long)r * K + k);
        }
#pragma unroll 1
        for (int m = 0; m < M; ++m) {
            const uint4 xv = *(const uint4*)(x + (long)m * K + k);
            const unsigned xw[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int r = warp + (i + j) * WARPS;
                if (i + j < PER_WARP && r < CORR_RANK) {
                    const unsigned aw[4] = {av[j].x, av[j].y, av[j].z, av[j].w};
                    float acc = 0.f;
#pragma unroll
                    for (int w = 0; w < 4; ++w)
                        acc += half_lo(aw[w]) * half_lo(xw[w]) + half_hi(aw[w]) * half_hi(xw[w]);
#pragma unroll
                    for (int off = 16; off > 0; off >>= 1) acc += shfl_xor(acc, off);
                    if (lane == 0) atomic_add_f32(t + m * CORR_RANK + r, acc);
                }
            }
        }
    }
    if (lane == 0) fence();
    __syncthreads();
    if (threadIdx.x == 0) {
        fence();
        atomic_add(sync, 1u);
    }
}
#endif

// Registers: symmetric codes without a correction take 48-64 a thread (compiled for sm_90), so an SM holds 32 warps
// of blocks; zero points (70 at 16 warps a block) and the correction's paths (72-90) would leave 16-24, so those
// variants ask for as many blocks as 32 warps make (64 registers, nothing spilled).
#if CORR_RANK || HAS_ZERO
#define BOUNDS __launch_bounds__(WARPS * 32, 32 / WARPS)
#else
#define BOUNDS __launch_bounds__(WARPS * 32)
#endif

extern "C" __global__ void BOUNDS
int4_mma(const u16* __restrict__ x, const u8* __restrict__ q, const u16* __restrict__ scales,
         const u8* __restrict__ zeros, u16* __restrict__ y, int M, int N, int K, int groups, int group_shift,
         int zero_const
#if CORR_RANK
         , const u16* __restrict__ corr_a, const u16* __restrict__ corr_b, float* corr_t, unsigned* sync
#endif
         ) {
    __shared__ float partial[WARPS][32][4];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#if CORR_RANK
    // blocks [0, K / 256) compute t = x A^T; the others own 16 rows each, as without a correction, and wait for t
    // (the t blocks come first, so they are running or done by then) before adding t B^T to their rows, with
    // their rows of B copied to shared memory while the codes stream, and t too once it is complete
    __shared__ __align__(16) u16 b_rows[16][CORR_RANK];
    __shared__ __align__(16) float t_rows[8][CORR_RANK];
    const int t_blocks = K / 256;
    if (blockIdx.x < t_blocks) {
        correction_rows(x, corr_a, corr_t, sync, M, K);
        return;
    }
    const int block = blockIdx.x - t_blocks;
    for (int i = threadIdx.x; i < 2 * CORR_RANK; i += WARPS * 32) {  // 16 rows of CORR_RANK / 8 pieces of 16 bytes
        const int row = i / (CORR_RANK / 8), col = 8 * (i % (CORR_RANK / 8));
        copy_async16(&b_rows[row][col], corr_b + (long)(block * 16 + row) * CORR_RANK + col);
    }
    copy_async_commit();
#else
    const int block = blockIdx.x;
#endif
    const int row_g = block * 16 + g, row_h = row_g + 8;
    const int chunks = K / 128;
    const int token = g < M ? g : M - 1;  // lanes past the tokens compute a copy of the last one's columns
    const u8* qg = q + (long)row_g * (K / 2) + 16 * t;
    const u8* qh = q + (long)row_h * (K / 2) + 16 * t;
    const uint4* xt = (const uint4*)(x + (long)token * K + 32 * t);
    const u16 *sgp = scales + (long)row_g * groups, *shp = scales + (long)row_h * groups;
#if HAS_ZERO
    const u8 *zgp = zeros + (long)row_g * groups, *zhp = zeros + (long)row_h * groups;
#endif
    float acc[4] = {0.f, 0.f, 0.f, 0.f};

    int c = warp;
    uint4 wg[AHEAD], wh[AHEAD];  // the codes of this chunk and of the AHEAD - 1 after it, in order
#pragma unroll
    for (int a = 0; a < AHEAD; ++a) {
        if (c + a * WARPS < chunks) {
            wg[a] = load_stream(qg + 64 * (c + a * WARPS));
            wh[a] = load_stream(qh + 64 * (c + a * WARPS));
        }
    }
    for (; c < chunks; c += WARPS) {
        const int next = c + AHEAD * WARPS;
        uint4 ng, nh;
        if (next < chunks) {  // a later chunk's codes are on their way while this one is computed
            ng = load_stream(qg + 64 * next);
            nh = load_stream(qh + 64 * next);
        }
        const uint4* xc = xt + 16 * c;  // 128 columns = 16 uint4 a chunk; this lane's 4 follow
        uint4 x0 = xc[0], x1 = xc[1], x2 = xc[2], x3 = xc[3];
        const int group = c >> group_shift;  // chunks of 128 a group: a power of two (31 for one group a row)
#if HAS_ZERO
        unsigned zg = neg_base_zero(zgp[group]), zh = neg_base_zero(zhp[group]);
#else
        unsigned zg = neg_base_zero(zero_const), zh = zg;
#endif
        float d[4] = {0.f, 0.f, 0.f, 0.f};
        word_mma(d, wg[0].x, wh[0].x, x0, zg, zh);
        word_mma(d, wg[0].y, wh[0].y, x1, zg, zh);
        word_mma(d, wg[0].z, wh[0].z, x2, zg, zh);
        word_mma(d, wg[0].w, wh[0].w, x3, zg, zh);
        const float sg = scale_of(sgp + group), sh = scale_of(shp + group);
        acc[0] += d[0] * sg;
        acc[1] += d[1] * sg;
        acc[2] += d[2] * sh;
        acc[3] += d[3] * sh;
        push(wg, ng);
        push(wh, nh);
    }
    share_sums(partial, acc);
#if CORR_RANK
    copy_async_wait();  // this thread's pieces of B are in b_rows (the barrier below shows them to warp 0)
#endif
    __syncthreads();
    if (warp == 0) {
        float sum[4] = {0.f, 0.f, 0.f, 0.f};
        add_shared(partial, sum);
#if CORR_RANK
        const int m0 = 2 * t, m1 = 2 * t + 1;  // sum[0], sum[1]: row g, tokens m0, m1; sum[2], sum[3]: row g + 8
        if (lane == 0) {
            while (atomic_load(sync) < (unsigned)t_blocks) sleep_ns(64);
        }
        asm volatile("bar.warp.sync 0xffffffff;" ::: "memory");
        fence();
        for (int i = lane; i < M * CORR_RANK; i += 32) t_rows[i / CORR_RANK][i % CORR_RANK] = load_cg(corr_t + i);
        asm volatile("bar.warp.sync 0xffffffff;" ::: "memory");
        const int ma = m0 < M ? m0 : M - 1, mb = m1 < M ? m1 : M - 1;
#pragma unroll 4
        for (int r = 0; r < CORR_RANK; r += 8) {  // 8 of B's values (16 bytes) and of each token's t at a time
            const uint4 gv = *(const uint4*)&b_rows[g][r], hv = *(const uint4*)&b_rows[g + 8][r];
            const float4 a0 = *(const float4*)&t_rows[ma][r], a1 = *(const float4*)&t_rows[ma][r + 4];
            const float4 b0 = *(const float4*)&t_rows[mb][r], b1 = *(const float4*)&t_rows[mb][r + 4];
            const unsigned gw[4] = {gv.x, gv.y, gv.z, gv.w}, hw[4] = {hv.x, hv.y, hv.z, hv.w};
            const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
            const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float g0 = half_lo(gw[j]), g1 = half_hi(gw[j]), h0 = half_lo(hw[j]), h1 = half_hi(hw[j]);
                sum[0] += av[2 * j] * g0 + av[2 * j + 1] * g1;
                sum[1] += bv[2 * j] * g0 + bv[2 * j + 1] * g1;
                sum[2] += av[2 * j] * h0 + av[2 * j + 1] * h1;
                sum[3] += bv[2 * j] * h0 + bv[2 * j + 1] * h1;
            }
        }
        if (lane == 0) {  // the last block to finish zeroes t and the counters for the next launch
            if (atomic_add(sync + 1, 1u) == gridDim.x - t_blocks - 1) {
                for (int i = 0; i < M * CORR_RANK; ++i) corr_t[i] = 0.f;
                sync[0] = 0u;
                sync[1] = 0u;
            }
        }
#endif
        store_rows(y, sum, 1.f, 1.f, M, N, row_g, row_h);
    }
}
