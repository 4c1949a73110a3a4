// Device helpers the decode kernels share (int4_mma.cu, sparse24_mma.cu): 16-bit values travel as raw bits and
// every conversion is inline PTX, so no CUDA header is needed. compress/kernels/cuda_int4.py puts this file in
// front of a kernel's source before NVRTC compiles it, with IS_BF16, HAS_ZERO and WARPS defined.
//
// Codes become 16-bit values without a conversion: (w >> 4s) & 0x000F000F | BASE gives BASE + c for the codes in
// nibbles s and s + 4 (bf16 0x4300 | c = 128 + c, fp16 0x6400 | c = 1024 + c), and subtracting BASE + zero is
// exact, so the tensor cores see (c - zero) exactly.

#ifndef IS_BF16
#define IS_BF16 1
#endif
#ifndef HAS_ZERO
#define HAS_ZERO 0
#endif
#ifndef WARPS
#define WARPS 8
#endif

#if IS_BF16
#define BASE 0x43004300u
#define ONE 0x3F803F80u
#define MMA "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
#define FMA2 "fma.rn.bf16x2"
#define TO16 "cvt.rn.bf16.f32"
#define FROM16(h) __uint_as_float(((unsigned)(h)) << 16)
#else
#define BASE 0x64006400u
#define ONE 0x3C003C00u
#define MMA "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"
#define FMA2 "fma.rn.f16x2"
#define TO16 "cvt.rn.f16.f32"
#endif

typedef unsigned short u16;
typedef unsigned char u8;

__device__ __forceinline__ unsigned lop_pair(unsigned w) {
    unsigned r;  // (w & 0x000F000F) | BASE
    asm("lop3.b32 %0, %1, 0x000F000F, %2, 0xEA;" : "=r"(r) : "r"(w), "n"(BASE));
    return r;
}

__device__ __forceinline__ unsigned centre(unsigned p, unsigned neg_base_zero) {
    unsigned r;  // p * 1 + (-(BASE + zero)): exact
    asm(FMA2 " %0, %1, %2, %3;" : "=r"(r) : "r"(p), "r"(ONE), "r"(neg_base_zero));
    return r;
}

__device__ __forceinline__ unsigned prmt(unsigned a, unsigned b, unsigned sel) {
    unsigned r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
    return r;
}

__device__ __forceinline__ void mma(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                    unsigned b1) {
    asm volatile(MMA " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint4 load_stream(const void* p) {
    uint4 r;  // weights are read once: keep them out of L1
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

__device__ __forceinline__ float scale_of_bits(u16 h) {
#if IS_BF16
    return FROM16(h);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}

__device__ __forceinline__ float scale_of(const u16* s) { return scale_of_bits(*s); }

__device__ __forceinline__ u16 to16(float f) {
    u16 h;
    asm(TO16 " %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// -(BASE + zero) in both halves
__device__ __forceinline__ unsigned neg_base_zero(unsigned z) { return (BASE | (z * 0x00010001u)) ^ 0x80008000u; }

// A block's sums, lane (g, t) of each warp holding four as an mma's d (rows g and g + 8, tokens 2t and 2t + 1):
// share_sums puts a warp's in shared memory ``partial`` [WARPS][32][4]; after the caller's __syncthreads,
// add_shared gives warp 0 their sum over the warps, and store_rows writes it to y [M, N] times each row's scale.
__device__ __forceinline__ void share_sums(float (*partial)[32][4], const float* acc) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    partial[warp][lane][0] = acc[0];
    partial[warp][lane][1] = acc[1];
    partial[warp][lane][2] = acc[2];
    partial[warp][lane][3] = acc[3];
}

__device__ __forceinline__ void add_shared(float (*partial)[32][4], float* sum) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
        sum[0] += partial[w][lane][0];
        sum[1] += partial[w][lane][1];
        sum[2] += partial[w][lane][2];
        sum[3] += partial[w][lane][3];
    }
}

__device__ __forceinline__ void store_rows(u16* __restrict__ y, const float* sum, float sg, float sh, int M, int N,
                                           int row_g, int row_h) {
    const int m0 = 2 * (threadIdx.x % 4), m1 = m0 + 1;
    if (m0 < M) {
        y[(long)m0 * N + row_g] = to16(sum[0] * sg);
        y[(long)m0 * N + row_h] = to16(sum[2] * sh);
    }
    if (m1 < M) {
        y[(long)m1 * N + row_g] = to16(sum[1] * sg);
        y[(long)m1 * N + row_h] = to16(sum[3] * sh);
    }
}

#ifndef AHEAD
#define AHEAD 1  // chunks of weights a warp loads ahead of the one it computes (a benchmark's choice)
#endif

// The chunks in flight, oldest first: the oldest (just computed) leaves, ``next`` joins at the end.
template <typename T>
__device__ __forceinline__ void push(T* fifo, T next) {
#pragma unroll
    for (int a = 0; a + 1 < AHEAD; ++a) fifo[a] = fifo[a + 1];
    fifo[AHEAD - 1] = next;
}
