// 8-bit weight-only matrix product for decode steps (1-8 tokens) on the tensor cores, reading the codes as the
// checkpoint stores them: bytes [N, K], KIND 0 int8 (w = c s), 1 uint8 with a zero point a row (w = (c - z) s), 2
// float8 E4M3 (w = e s); one scale a row, in the activations' 16-bit type or (SCALE_F32) float32.
//
// Compiled at run time by NVRTC (compress/kernels/cuda_8bit.py) behind mma.cuh, with IS_BF16, WARPS, KIND and
// SCALE_F32 defined.
//
// The layout of the work is int4_mma.cu's: a block owns 16 output rows, its warps take turns over the rows' chunks of
// 64 columns (64 bytes a row, as a 4-bit chunk of 128), and lane (g, t) = (lane / 4, lane % 4) takes 16 columns of
// rows g and g + 8 (16 bytes a row) and the same columns of token g's activations. Each 32-bit word of codes (four columns)
// becomes two pairs of 16-bit values, exactly, and feeds one mma.m16n8k16 with the activations of those columns as
// they lie (a word of activations is already a pair of columns): integers by the exponent trick (0x4B000000 | u read
// as a float is 2^23 + u; subtracting 2^23 + zero leaves u - zero, an integer of at most 8 significant bits, exact in
// either 16-bit type), E4M3 by the hardware's conversion to float16 (then bfloat16 through float32: E4M3 values have
// 4 significant bits). A row's scale multiplies its sum once, at the end.

#ifndef KIND
#define KIND 0
#endif
#ifndef SCALE_F32
#define SCALE_F32 0
#endif

// Two floats as a pair of 16-bit values, the first in the low half.
__device__ __forceinline__ unsigned pair16(float lo, float hi) {
    unsigned r;
#if IS_BF16
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}

#if KIND == 2
// Two E4M3 codes (the low and high byte of a 16-bit half of w) as a pair of the activations' 16-bit type.
__device__ __forceinline__ unsigned e4m3_pair(unsigned w, int half) {
    unsigned h;
    if (half)
        asm("{ .reg .b16 lo, hi; mov.b32 {lo, hi}, %1; cvt.rn.f16x2.e4m3x2 %0, hi; }" : "=r"(h) : "r"(w));
    else
        asm("{ .reg .b16 lo, hi; mov.b32 {lo, hi}, %1; cvt.rn.f16x2.e4m3x2 %0, lo; }" : "=r"(h) : "r"(w));
#if IS_BF16
    float lo, hi;
    asm("{ .reg .b16 a, b; mov.b32 {a, b}, %2; cvt.f32.f16 %0, a; cvt.f32.f16 %1, b; }" : "=f"(lo), "=f"(hi) : "r"(h));
    return pair16(lo, hi);
#else
    return h;
#endif
}
#endif

// The four codes of word w (byte i = column i) as pairs of columns (0, 1) and (2, 3); ``base`` = 2^23 + the row's
// zero (integers), ``flip`` = 0x80808080 for int8 (c + 128 as an unsigned byte), else 0.
__device__ __forceinline__ void word_pairs(unsigned w, float base, unsigned flip, unsigned& p01, unsigned& p23) {
#if KIND == 2
    p01 = e4m3_pair(w, 0);
    p23 = e4m3_pair(w, 1);
#else
    w ^= flip;
    const float c0 = __uint_as_float(0x4B000000u | (w & 0xFFu)) - base;
    const float c1 = __uint_as_float(0x4B000000u | ((w >> 8) & 0xFFu)) - base;
    const float c2 = __uint_as_float(0x4B000000u | ((w >> 16) & 0xFFu)) - base;
    const float c3 = __uint_as_float(0x4B000000u | (w >> 24)) - base;
    p01 = pair16(c0, c1);
    p23 = pair16(c2, c3);
#endif
}

// The mma of one word of codes of rows g (wg) and g + 8 (wh), with the activations of its four columns (xa: columns
// 0, 1; xb: 2, 3).
__device__ __forceinline__ void word_mma(float* d, unsigned wg, unsigned wh, unsigned xa, unsigned xb, float bg,
                                         float bh, unsigned flip) {
    unsigned g01, g23, h01, h23;
    word_pairs(wg, bg, flip, g01, g23);
    word_pairs(wh, bh, flip, h01, h23);
    mma(d, g01, h01, g23, h23, xa, xb);
}

__device__ __forceinline__ void words_mma(float* d, uint4 wg, uint4 wh, uint4 x0, uint4 x1, float bg, float bh,
                                          unsigned flip) {  // 16 columns: codes wg / wh, activations x0, x1
    word_mma(d, wg.x, wh.x, x0.x, x0.y, bg, bh, flip);
    word_mma(d, wg.y, wh.y, x0.z, x0.w, bg, bh, flip);
    word_mma(d, wg.z, wh.z, x1.x, x1.y, bg, bh, flip);
    word_mma(d, wg.w, wh.w, x1.z, x1.w, bg, bh, flip);
}

#if SCALE_F32
typedef float scale_t;
__device__ __forceinline__ float scale_value(const float* s) { return *s; }
#else
typedef u16 scale_t;
__device__ __forceinline__ float scale_value(const u16* s) { return scale_of(s); }
#endif

extern "C" __global__ void __launch_bounds__(WARPS * 32)
byte_mma(const u16* __restrict__ x, const u8* __restrict__ q, const scale_t* __restrict__ scales,
         const u8* __restrict__ zeros, u16* __restrict__ y, int M, int N, int K) {
    __shared__ float partial[WARPS][32][4];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int row_g = blockIdx.x * 16 + g, row_h = row_g + 8;
    const int chunks = K / 64;
    const int token = g < M ? g : M - 1;  // lanes past the tokens compute a copy of the last one's columns
    const u8* qg = q + (long)row_g * K + 16 * t;
    const u8* qh = q + (long)row_h * K + 16 * t;
    const uint4* xt = (const uint4*)(x + (long)token * K + 16 * t);
#if KIND == 1
    const float bg = 8388608.f + zeros[row_g], bh = 8388608.f + zeros[row_h];
    const unsigned flip = 0u;
#elif KIND == 0
    const float bg = 8388608.f + 128.f, bh = bg;
    const unsigned flip = 0x80808080u;
#else
    const float bg = 0.f, bh = 0.f;
    const unsigned flip = 0u;
#endif
    float d[4] = {0.f, 0.f, 0.f, 0.f};

    int c = warp;
    uint4 wg, wh;
    if (c < chunks) {
        wg = load_stream(qg + 64 * c);
        wh = load_stream(qh + 64 * c);
    }
    for (; c < chunks; c += WARPS) {
        const int next = c + WARPS;
        uint4 ng, nh;
        if (next < chunks) {  // the next chunk's codes are on their way while this one is computed
            ng = load_stream(qg + 64 * next);
            nh = load_stream(qh + 64 * next);
        }
        const uint4* xc = xt + 8 * c;  // 64 columns = 8 uint4 a chunk; this lane's 2 follow
        words_mma(d, wg, wh, xc[0], xc[1], bg, bh, flip);
        wg = ng;
        wh = nh;
    }
    share_sums(partial, d);
    __syncthreads();
    if (warp == 0) {
        float sum[4] = {0.f, 0.f, 0.f, 0.f};
        add_shared(partial, sum);
        store_rows(y, sum, scale_value(scales + row_g), scale_value(scales + row_h), M, N, row_g, row_h);
    }
}
