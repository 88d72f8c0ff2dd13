/* mistol's CPU kernels: y = x @ W^T with W quantized in blocks of 32 along K.
 *
 * Plain C ABI (called through ctypes on tensor.data_ptr()), no torch or Python headers.
 *
 * Weight layout ("packed"): the N rows are taken in groups of 8 (the last group padded
 * with zero rows), and within a group the blocks of the 8 rows that cover the same 32
 * inputs sit next to each other:
 *
 *     packed[G = ceil(N/8)][B = K/32][16 + 8 * QB] bytes
 *       bytes 0..15   the 8 rows' scales d, fp16
 *       bytes 16..    the 8 rows' quants, QB bytes each, interleaved 4 bytes at a time:
 *                     quant byte j of row r sits at 32 * (j / 4) + 4 * r + j % 4
 *                     int8: QB = 32, q[j] int8, value = d * q[j]              (llama.cpp Q8_0)
 *                     int4: QB = 16, byte j holds element j (low nibble) and
 *                           element j+16 (high nibble), value = d * (nibble - 8) (llama.cpp Q4_0)
 *
 * Long rows are cut into tiles along K: packed[T][G][B/T][16 + 8 * QB], tile t holding
 * blocks [t * B/T, (t + 1) * B/T) of every group (T = 1 up to 4096 inputs; mistol.quant
 * chooses T and the kernels take the blocks per tile). A decode step multiplies tile by
 * tile, so a thread's share of a tile is one sequential read and the tile's activations
 * (4 KB or so) stay in L1 across its groups; without tiles a group of 8 rows of 14336
 * inputs (64 KB of int4) evicts them from L1 before the next group starts, and a down
 * projection read its weights 25% slower.
 *
 * Each 8-row group's part of a tile is one contiguous stream. The per-row blocks are
 * byte-for-byte llama.cpp's Q8_0/Q4_0 blocks (scale moved next to its neighbours', quants
 * interleaved), which lets GGUF tensors be repacked, not requantized. The 4-byte interleave makes lane r of a 32-byte load hold
 * row r's bytes: one dot-product instruction against 4 activation bytes broadcast to every
 * lane adds 4 products into each row's own lane, and no horizontal sums are needed.
 *
 * Activations are quantized per block of 32 to int8 with an fp32 scale (as llama.cpp does
 * for its Q8_0 dot products; round half to even), so a block's dot product is exact integer
 * arithmetic and only the per-block sum is scaled and accumulated in fp32.
 *
 * Three implementations of the same arithmetic: AVX2+FMA+F16C, the same with AVX512-VNNI
 * dot products on 256-bit vectors (each compiled for its target function by function and
 * chosen at run time, so the library still loads on older CPUs), and portable scalar C.
 * The VNNI dot products add four products into int32 where AVX2 adds pairs into int16;
 * no pair sum here can saturate int16 (|w| <= 128, |a| <= 127), so both give the same bits.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "mistol_kernels.h"

#define KCHUNK 64    /* blocks per step when several activation rows share a weight chunk */
/* No software prefetch: each thread reads one sequential stream, which the hardware
 * prefetcher follows. Prefetching 2-16 KB ahead measured 10-18% slower on a 2-core EPYC
 * whose memory read 60+ GB/s (and no faster when it read less). */
#define SERIAL_BYTES (64 << 10) /* less work than this (weight bytes x rows): one thread */


static int64_t quant_bytes(int fmt) { return fmt == FMT_INT8 ? QK : QK / 2; }
int64_t group_block_bytes(int fmt) { return 2 * IL + IL * quant_bytes(fmt); }

/* ---------------------------------------------------------------------------------------
 * fp16 <-> fp32 without F16C
 */
static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        int e = -1;
        do { e++; man <<= 1; } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static uint16_t float_to_half(float f) { /* round to nearest even, as the hardware does */
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7fffffff;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00); /* rounds past the largest half */
    if (ax < 0x38800000u) { /* subnormal half (or zero) */
        if (ax < 0x33000000u) return (uint16_t)sign;
        uint32_t e = ax >> 23, man = (ax & 0x7fffff) | 0x800000, shift = 126 - e;
        uint32_t h = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((ax >> 13) - (112u << 10)), rem = ax & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

static uint16_t load_u16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

/* ---------------------------------------------------------------------------------------
 * Activations: one row x[K] -> qa[K] int8, da[K/32] scales, sa[K/32] block sums of qa
 * (the int4 dot product subtracts 8 * sa once per block instead of 8 from every nibble).
 */
static void quantize_act_scalar(const float *x, int64_t K, int8_t *qa, float *da, int32_t *sa) {
    for (int64_t b = 0; b < K / QK; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        int32_t s = 0;
        for (int j = 0; j < QK; j++) {
            int q = (int)nearbyintf(xb[j] * id);
            qa[b * QK + j] = (int8_t)q;
            s += q;
        }
        da[b] = d;
        sa[b] = s;
    }
}

/* ---------------------------------------------------------------------------------------
 * Scalar kernels: one 8-row group against one activation row, blocks [b0, b1), adding
 * into acc[8].
 */
/* Row r's quant byte j within a group block's quants (see the layout at the top). */
static inline int64_t quant_offset(int r, int j) { return 32 * (j >> 2) + 4 * r + (j & 3); }

static void group_int8_scalar(const uint8_t *wg, const int8_t *qa, const float *da, const int32_t *sa,
                              int64_t b0, int64_t b1, float *acc) {
    (void)sa;
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *blk = wg + b * (2 * IL + IL * QK);
        const int8_t *a = qa + b * QK;
        for (int r = 0; r < IL; r++) {
            const int8_t *q = (const int8_t *)(blk + 2 * IL);
            int32_t s = 0;
            for (int j = 0; j < QK; j++) s += q[quant_offset(r, j)] * a[j];
            acc[r] += (float)s * (half_to_float(load_u16(blk + 2 * r)) * da[b]);
        }
    }
}

static void group_int4_scalar(const uint8_t *wg, const int8_t *qa, const float *da, const int32_t *sa,
                              int64_t b0, int64_t b1, float *acc) {
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *blk = wg + b * (2 * IL + IL * QK / 2);
        const int8_t *a = qa + b * QK;
        for (int r = 0; r < IL; r++) {
            const uint8_t *q = blk + 2 * IL;
            int32_t s = 0;
            for (int j = 0; j < QK / 2; j++) {
                uint8_t v = q[quant_offset(r, j)];
                s += (v & 15) * a[j] + (v >> 4) * a[j + QK / 2];
            }
            s -= 8 * sa[b];
            acc[r] += (float)s * (half_to_float(load_u16(blk + 2 * r)) * da[b]);
        }
    }
}

/* ---------------------------------------------------------------------------------------
 * AVX2 kernels: the same arithmetic, the 8 rows' sums of a block reduced into one vector
 * (lane r = row r) so that scaling and accumulation are one multiply and one FMA.
 */
#ifdef MISTOL_X86
AVX2_FN static inline float hmax_ps(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

AVX2_FN static inline int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

AVX2_FN static void quantize_act_avx2(const float *x, int64_t K, int8_t *qa, float *da, int32_t *sa) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < K / QK; b++) {
        const float *xb = x + b * QK;
        __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
        __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v0, absmask), _mm256_and_ps(v1, absmask)),
                                 _mm256_max_ps(_mm256_and_ps(v2, absmask), _mm256_and_ps(v3, absmask)));
        float amax = hmax_ps(m);
        float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        const __m256 vid = _mm256_set1_ps(id);
        const int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, vid), rnd));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, vid), rnd));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, vid), rnd));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, vid), rnd));
        sa[b] = hsum_epi32(_mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
        /* packs interleave 128-bit lanes; the final permute restores element order */
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        _mm256_storeu_si256((__m256i *)(qa + b * QK), _mm256_permutevar8x32_epi32(p, perm));
        da[b] = d;
    }
}

/* The dot products of one 32-byte chunk of a group block (4 quant bytes of each of the 8
 * rows, lane r = row r) against 4 activation bytes broadcast to every lane, added into
 * acc's int32 lanes; per instruction set, the group loops below are shared.
 *
 * int8: maddubs (and dpbusd) want one unsigned operand, so take |w| and move w's sign
 * onto a (exact for w = -128 too: |w| reads as 128 unsigned). */
AVX2_FN static inline __m256i dot_i8_avx2(__m256i acc, __m256i w, __m256i a) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w),
                                                                        _mm256_sign_epi8(a, w)),
                                                   _mm256_set1_epi16(1)));
}

/* AVX512-VNNI: dpbusd (unsigned x signed bytes, four products into each int32 lane)
 * replaces maddubs + madd + add. */
VNNI_FN static inline __m256i dot_i8_vnni(__m256i acc, __m256i w, __m256i a) {
    return _mm256_dpbusd_epi32(acc, _mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w));
}

static inline int32_t load_i32(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return v; }

#define CHUNK(q, c) _mm256_loadu_si256((const __m256i *)((q) + 32 * (c)))
#define BCAST4(a, j) _mm256_set1_epi32(load_i32((a) + (j)))

/* One group of 8 rows over blocks [b0, b1), accumulated into acc_out[8]: written once as a
 * macro and instantiated per instruction set (TARGET) with that set's dot product (DOT).
 * Independent partial sums keep the dot products' latency chains short. */
#define DEFINE_GROUP_INT8(NAME, TARGET, DOT)                                                                   \
    TARGET static void NAME(const uint8_t *wg, const int8_t *qa, const float *da, const int32_t *sa,           \
                            int64_t b0, int64_t b1, float *acc_out) {                                          \
        (void)sa;                                                                                              \
        const int64_t bb = 2 * IL + IL * QK;                                                                   \
        const __m256i z = _mm256_setzero_si256();                                                              \
        __m256 acc = _mm256_loadu_ps(acc_out);                                                                 \
        for (int64_t b = b0; b < b1; b++) {                                                                    \
            const uint8_t *blk = wg + b * bb, *q = blk + 2 * IL;                                               \
            const int8_t *a = qa + b * QK;                                                                     \
            __m256i s0 = DOT(DOT(z, CHUNK(q, 0), BCAST4(a, 0)), CHUNK(q, 1), BCAST4(a, 4));                    \
            __m256i s1 = DOT(DOT(z, CHUNK(q, 2), BCAST4(a, 8)), CHUNK(q, 3), BCAST4(a, 12));                   \
            __m256i s2 = DOT(DOT(z, CHUNK(q, 4), BCAST4(a, 16)), CHUNK(q, 5), BCAST4(a, 20));                  \
            __m256i s3 = DOT(DOT(z, CHUNK(q, 6), BCAST4(a, 24)), CHUNK(q, 7), BCAST4(a, 28));                  \
            __m256i s = _mm256_add_epi32(_mm256_add_epi32(s0, s1), _mm256_add_epi32(s2, s3));                  \
            __m256 scale = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk)),               \
                                         _mm256_set1_ps(da[b]));                                               \
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc);                                          \
        }                                                                                                      \
        _mm256_storeu_ps(acc_out, acc);                                                                        \
    }

DEFINE_GROUP_INT8(group_int8_avx2, AVX2_FN, dot_i8_avx2)
DEFINE_GROUP_INT8(group_int8_vnni, VNNI_FN, dot_i8_vnni)

/* int4, one group of 8 rows over blocks [b0, b1). A chunk holds 4 quant bytes of each row:
 * their low nibbles are elements 4c..4c+3, their high nibbles 16 further on. Nibbles are
 * stored as n = q + 8, so 8 * (the activation block's sum) is subtracted once per block. */
AVX2_FN static void group_int4_avx2(const uint8_t *wg, const int8_t *qa, const float *da, const int32_t *sa,
                                    int64_t b0, int64_t b1, float *acc_out) {
    const int64_t bb = 2 * IL + IL * QK / 2;
    const __m256i m4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_loadu_ps(acc_out);
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *blk = wg + b * bb, *q = blk + 2 * IL;
        const int8_t *a = qa + b * QK;
        __m256i s = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            const __m256i v = CHUNK(q, c);
            const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            /* pair sums are at most 2 * 15 * 127 each, so the two halves add in int16 */
            const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, BCAST4(a, 4 * c)),
                                                 _mm256_maddubs_epi16(hi, BCAST4(a, 4 * c + 16)));
            s = _mm256_add_epi32(s, _mm256_madd_epi16(s16, ones));
        }
        s = _mm256_sub_epi32(s, _mm256_set1_epi32(8 * sa[b]));
        const __m256 scale = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk)), _mm256_set1_ps(da[b]));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc);
    }
    _mm256_storeu_ps(acc_out, acc);
}

/* AVX512-VNNI: dpbusd sums four products into int32 without saturating, so the high
 * nibbles need no shift: masked in place they are 16 n, summed apart and divided by 16
 * (exactly: a multiple of 16) once per block. Each chunk is loaded once (the compiler
 * would otherwise load it again for each of its two masks). */
VNNI_FN static void group_int4_vnni(const uint8_t *wg, const int8_t *qa, const float *da, const int32_t *sa,
                                    int64_t b0, int64_t b1, float *acc_out) {
    const int64_t bb = 2 * IL + IL * QK / 2;
    const __m256i m_lo = _mm256_set1_epi8(0x0f), m_hi = _mm256_set1_epi8((char)0xf0);
    __m256 acc = _mm256_loadu_ps(acc_out);
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *blk = wg + b * bb, *q = blk + 2 * IL;
        const int8_t *a = qa + b * QK;
        __m256i lo = _mm256_setzero_si256(), hi16 = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            __m256i v = CHUNK(q, c);
            __asm__("" : "+x"(v)); /* keep v in a register */
            lo = _mm256_dpbusd_epi32(lo, _mm256_and_si256(v, m_lo), BCAST4(a, 4 * c));
            hi16 = _mm256_dpbusd_epi32(hi16, _mm256_and_si256(v, m_hi), BCAST4(a, 4 * c + 16));
        }
        const __m256i s = _mm256_sub_epi32(_mm256_add_epi32(lo, _mm256_srai_epi32(hi16, 4)),
                                           _mm256_slli_epi32(_mm256_set1_epi32(sa[b]), 3));
        const __m256 scale = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk)), _mm256_set1_ps(da[b]));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc);
    }
    _mm256_storeu_ps(acc_out, acc);
}

int cpu_has_avx2(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    }
    return cached;
}

static int cpu_has_vnni(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                 __builtin_cpu_supports("avx512vnni");
    }
    return cached;
}
#else
int cpu_has_avx2(void) { return 0; }
static int cpu_has_vnni(void) { return 0; }
#endif

/* ---------------------------------------------------------------------------------------
 * Driver: quantize the activation rows once, then each thread multiplies its share of the
 * weights' row groups.
 */
int64_t thread_index(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

void thread_share(int64_t total, int64_t *start, int64_t *end) {
#ifdef _OPENMP
    const int64_t nt = omp_get_num_threads();
#else
    const int64_t nt = 1;
#endif
    const int64_t t = thread_index();
    *start = total * t / nt, *end = total * (t + 1) / nt;
}

/* Groups [g0, g1) of one matrix with N rows, packed in tiles of tb blocks (see the top),
 * into its output columns y[m * ldy + n]. acc: scratch of IL * M floats. */
static void run_groups(group_fn fn, const uint8_t *w, int64_t bb, int64_t tb, const int8_t *qa, const float *da,
                       const int32_t *sa, int64_t M, int64_t K, int64_t N, float *y, int64_t ldy, int64_t g0,
                       int64_t g1, float *acc) {
    const int64_t B = K / QK, G = (N + IL - 1) / IL;
    if (tb > B) tb = B;
/* group g's blocks [t0, t0 + tw) sit in the tile at t0; the kernels index blocks from 0 */
#define GROUP_IN_TILE(g, t0, tw) (w + (t0) * G * bb + ((g) * (tw) - (t0)) * bb)
    if (M == 1) { /* tile by tile, each group's sums kept in y (the padded last group's in acc) */
        for (int64_t g = g0; g < g1; g++) memset(g * IL + IL <= N ? y + g * IL : acc, 0, sizeof(float) * IL);
        for (int64_t t0 = 0; t0 < B; t0 += tb) {
            const int64_t tw = B - t0 < tb ? B - t0 : tb;
            for (int64_t g = g0; g < g1; g++)
                fn(GROUP_IN_TILE(g, t0, tw), qa, da, sa, t0, t0 + tw, g * IL + IL <= N ? y + g * IL : acc);
        }
        if (g1 * IL > N && g0 < g1) memcpy(y + (g1 - 1) * IL, acc, sizeof(float) * (size_t)(N - (g1 - 1) * IL));
        return;
    }
    /* several rows: group by group, each weight chunk kept in L1 across the rows */
    for (int64_t g = g0; g < g1; g++) {
        memset(acc, 0, sizeof(float) * IL * M);
        for (int64_t t0 = 0; t0 < B; t0 += tb) {
            const int64_t tw = B - t0 < tb ? B - t0 : tb;
            for (int64_t b0 = t0; b0 < t0 + tw; b0 += KCHUNK) {
                const int64_t b1 = b0 + KCHUNK < t0 + tw ? b0 + KCHUNK : t0 + tw;
                for (int64_t m = 0; m < M; m++)
                    fn(GROUP_IN_TILE(g, t0, tw), qa + m * K, da + m * B, sa + m * B, b0, b1, acc + m * IL);
            }
        }
        const int64_t rows = N - g * IL < IL ? N - g * IL : IL;
        for (int64_t m = 0; m < M; m++) memcpy(y + m * ldy + g * IL, acc + m * IL, sizeof(float) * rows);
    }
#undef GROUP_IN_TILE
}

EXPORT int mistol_best_impl(void) { return cpu_has_vnni() ? IMPL_VNNI : cpu_has_avx2() ? IMPL_AVX2 : IMPL_SCALAR; }

int qkernels_select(int impl, qkernels *out) {
    if (impl == IMPL_AUTO) impl = mistol_best_impl();
    if ((impl == IMPL_AVX2 && !cpu_has_avx2()) || (impl == IMPL_VNNI && !cpu_has_vnni())) return ERR_IMPL;
    *out = (qkernels){quantize_act_scalar, {NULL, group_int8_scalar, group_int4_scalar}};
#ifdef MISTOL_X86
    if (impl == IMPL_AVX2) *out = (qkernels){quantize_act_avx2, {NULL, group_int8_avx2, group_int4_avx2}};
    if (impl == IMPL_VNNI) *out = (qkernels){quantize_act_avx2, {NULL, group_int8_vnni, group_int4_vnni}};
#endif
    return OK;
}

/* The groups of all the matrices, split into one contiguous range per thread (a static
 * schedule: each thread streams its own part of the weights), walked matrix by matrix. */
void qgemm_share(const qkernels *kn, const int *fmts, const int8_t *qa, const float *da, const int32_t *sa,
                 int64_t M, int64_t K, int count, const uint8_t *const *ws, const int64_t *ns, const int64_t *tbs,
                 float *y, int64_t ldy, float *acc) {
    int64_t G = 0;
    for (int i = 0; i < count; i++) G += (ns[i] + IL - 1) / IL;
    int64_t start, end, first = 0, col = 0;
    thread_share(G, &start, &end);
    for (int i = 0; i < count && first < end; i++) {
        const int64_t gi = (ns[i] + IL - 1) / IL;
        const int64_t g0 = start > first ? start - first : 0, g1 = end - first < gi ? end - first : gi;
        if (g0 < g1)
            run_groups(kn->group[fmts[i]], ws[i], group_block_bytes(fmts[i]), tbs[i], qa, da, sa, M, K, ns[i],
                       y + col, ldy, g0, g1, acc);
        first += gi, col += ns[i];
    }
}

EXPORT int mistol_kernels_abi(void) { return 7; }

/* For i < count: y[:, cols of matrix i] = x[M][K] @ W_i^T, W_i (N_i rows) packed as described
 * at the top in tiles of tbs[i] blocks; matrix i's outputs start at column sum(N_0..N_{i-1}) of y, whose rows are ldy
 * floats apart. Several matrices that share an input (a layer's q/k/v, gate/up) thus cost
 * one parallel region and one activation quantization. Returns 0 or a negative error. */
EXPORT int mistol_gemm_many(int fmt, const float *x, int64_t M, int64_t K, int count, const uint8_t *const *ws,
                            const int64_t *ns, const int64_t *tbs, float *y, int64_t ldy, int nthreads, int impl) {
    qkernels kn;
    if (fmt != FMT_INT8 && fmt != FMT_INT4) return ERR_FMT;
    if (qkernels_select(impl, &kn) != OK) return ERR_IMPL;
    if (K <= 0 || K % QK != 0) return ERR_K;
    if (M < 0 || count < 0) return ERR_ARG;
    int64_t G = 0, cols = 0;
    for (int i = 0; i < count; i++) {
        if (ns[i] < 0 || tbs[i] <= 0) return ERR_ARG;
        G += (ns[i] + IL - 1) / IL, cols += ns[i];
    }
    if (ldy < cols) return ERR_ARG;
    if (M == 0 || G == 0) return OK;
    const int64_t B = K / QK;
    if (nthreads > G) nthreads = (int)G;
    if (nthreads < 1 || G * B * group_block_bytes(fmt) * M < SERIAL_BYTES) nthreads = 1;

    int8_t *qa = malloc((size_t)(M * K));
    float *da = malloc(sizeof(float) * (size_t)(M * B));
    int32_t *sa = malloc(sizeof(int32_t) * (size_t)(M * B));
    float *acc = malloc(sizeof(float) * (size_t)(IL * M * nthreads));
    int *fmts = malloc(sizeof(int) * (size_t)count);
    if (!qa || !da || !sa || !acc || !fmts) {
        free(qa), free(da), free(sa), free(acc), free(fmts);
        return ERR_NOMEM;
    }
    for (int i = 0; i < count; i++) fmts[i] = fmt;

    /* One thread quantizes the activations: a small fraction of the matmul's time at any
     * M, and no barrier inside the parallel region. */
    for (int64_t m = 0; m < M; m++) kn.quant(x + m * K, K, qa + m * K, da + m * B, sa + m * B);
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
#endif
    qgemm_share(&kn, fmts, qa, da, sa, M, K, count, ws, ns, tbs, y, ldy, acc + thread_index() * IL * M);
    free(qa), free(da), free(sa), free(acc), free(fmts);
    return OK;
}

/* ---------------------------------------------------------------------------------------
 * Float weights (unquantized models): y = x @ W^T for a few rows of x (decode steps), W
 * [N][K] in float32, bfloat16 or float16 as torch holds it (row-major, no repacking), x and
 * y float32. Reading W is the whole cost, so each thread streams its own rows once, four
 * at a time sharing the loads of x, with float32 products and sums (bf16 and f16 values
 * are exact in float32).
 */
enum { W_F32 = 0, W_BF16 = 1, W_F16 = 2 };


static inline float dense_value(const void *w, int wtype, int64_t k) {
    if (wtype == W_F32) return ((const float *)w)[k];
    const uint16_t h = ((const uint16_t *)w)[k];
    if (wtype == W_F16) return half_to_float(h);
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static float dense_row_scalar(const uint8_t *row, int wtype, const float *x, const void *xp, int64_t K) {
    (void)xp;
    float s = 0.0f;
    for (int64_t k = 0; k < K; k++) s += dense_value(row, wtype, k) * x[k];
    return s;
}

#ifdef MISTOL_X86
/* One row against x. Rows are read one after another (a thread's rows are one sequential
 * stream, which measured faster than interleaving several), 32 values per step into four
 * accumulators (FMA latency). bf16 values are read 16 per load without shuffles: a 32-bit
 * lane holds values 2i (low half) and 2i+1 (high half), and a shift or a mask makes each a
 * float32, so xs holds each 16 values of x as its 8 even ones, then its 8 odd ones. */
AVX2_FN static inline void dense_load16(const uint8_t *row, int wtype, int64_t k, __m256 *w0, __m256 *w1) {
    if (wtype == W_BF16) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + k));
        *w0 = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        *w1 = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
    } else if (wtype == W_F16) {
        *w0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + k)));
        *w1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + k + 8)));
    } else {
        *w0 = _mm256_loadu_ps((const float *)row + k);
        *w1 = _mm256_loadu_ps((const float *)row + k + 8);
    }
}

AVX2_FN static float dense_row_avx2(const uint8_t *row, int wtype, const float *x, const void *xp, int64_t K) {
    const float *xs = xp;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    __m256 w0, w1, w2, w3;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        dense_load16(row, wtype, k, &w0, &w1);
        dense_load16(row, wtype, k + 16, &w2, &w3);
        a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xs + k), a0);
        a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xs + k + 8), a1);
        a2 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xs + k + 16), a2);
        a3 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xs + k + 24), a3);
    }
    if (k + 16 <= K) {
        dense_load16(row, wtype, k, &w0, &w1);
        a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xs + k), a0);
        a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xs + k + 8), a1);
        k += 16;
    }
    float s = hsum_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; k++) s += dense_value(row, wtype, k) * x[k];
    return s;
}

/* bf16 weights and bf16 inputs (x's values are bf16 numbers, as in a bf16 model) on a CPU
 * with AVX512-BF16: vdpbf16ps multiplies 16 pairs and adds them into 8 float32 lanes, and x
 * held as bf16 (xb) is half the bytes. With K = 14336 (a down projection) the float32 x
 * (56 KB) no longer stays in L1 next to the streaming weights, and the float32 loop above
 * reads the weights at half its speed; with bf16 x it loses less. Products are exact; the
 * sums are float32 as above, in another order (and, as the instruction does, subnormal
 * inputs and results count as zero: nowhere near the values of a model's weights). */
__attribute__((target("avx2,fma,avx512f,avx512vl,avx512bf16")))
static float dense_row_bf16dp(const uint8_t *row, int wtype, const float *x, const void *xp, int64_t K) {
    (void)wtype;
    const uint16_t *w = (const uint16_t *)row, *xb = xp;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t k = 0;
#define DP(acc, off) acc = _mm256_dpbf16_ps(acc, (__m256bh)_mm256_loadu_si256((const __m256i *)(w + k + (off))), \
                                            (__m256bh)_mm256_loadu_si256((const __m256i *)(xb + k + (off))))
    for (; k + 64 <= K; k += 64) {
        DP(a0, 0);
        DP(a1, 16);
        DP(a2, 32);
        DP(a3, 48);
    }
    for (; k + 16 <= K; k += 16) DP(a0, 0);
#undef DP
    float s = hsum_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; k++) s += dense_value(row, W_BF16, k) * x[k];
    return s;
}

static int cpu_has_bf16dp(void) {
    static int cached = -1;
    if (cached < 0)
        cached = cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                 __builtin_cpu_supports("avx512bf16");
    return cached;
}
#endif

typedef float (*dense_fn)(const uint8_t *, int, const float *, const void *, int64_t);

/* Like mistol_gemm_many, for float weights: matrix i (N_i rows of K values of type wtype)
 * writes columns sum(N_0..N_{i-1}) onwards of y, whose rows are ldy floats apart. Matrix i
 * is held in tiles of tks[i] values along K ([K / tks[i]][N_i][tks[i]]; tks[i] = K: plain
 * rows), multiplied tile by tile as the quantized kernels do, so that the tile of x stays
 * in L1 across the rows (tks[i] a multiple of 16 dividing K).
 * x_is_bf16: every value of x is a bf16 number (lets bf16 weights use bf16 dot products). */
EXPORT int mistol_dense_many(int wtype, const float *x, int x_is_bf16, int64_t M, int64_t K, int count,
                             const void *const *ws, const int64_t *ns, const int64_t *tks, float *y, int64_t ldy,
                             int nthreads) {
    if (wtype < W_F32 || wtype > W_F16 || K <= 0 || M < 0 || count < 0) return ERR_ARG;
    int64_t N = 0;
    for (int i = 0; i < count; i++) {
        if (ns[i] < 0 || tks[i] <= 0 || K % tks[i] || (tks[i] < K && tks[i] % 16)) return ERR_ARG;
        N += ns[i];
    }
    if (ldy < N) return ERR_ARG;
    if (M == 0 || N == 0) return OK;
    const int64_t esize = wtype == W_F32 ? 4 : 2;
    dense_fn fn = dense_row_scalar;
    void *prepared = NULL; /* x as the row function reads it, if not as given: */
    int64_t prepared_size = 0; /* bytes per value */
#ifdef MISTOL_X86
    if (wtype == W_BF16 && x_is_bf16 && cpu_has_bf16dp()) {
        uint16_t *xb = malloc(sizeof(uint16_t) * (size_t)(M * K));
        if (!xb) return ERR_NOMEM;
        for (int64_t i = 0; i < M * K; i++) {
            uint32_t bits;
            memcpy(&bits, x + i, 4);
            xb[i] = (uint16_t)(bits >> 16); /* exact: x holds bf16 values */
        }
        fn = dense_row_bf16dp, prepared = xb, prepared_size = sizeof(uint16_t);
    } else if (cpu_has_avx2()) {
        fn = dense_row_avx2;
        if (wtype == W_BF16) { /* each 16 values of x as the 8 even ones, then the 8 odd ones */
            float *xs = malloc(sizeof(float) * (size_t)(M * K));
            if (!xs) return ERR_NOMEM;
            for (int64_t m = 0; m < M; m++)
                for (int64_t k = 0; k + 16 <= K; k += 16)
                    for (int j = 0; j < 8; j++)
                        xs[m * K + k + j] = x[m * K + k + 2 * j], xs[m * K + k + 8 + j] = x[m * K + k + 2 * j + 1];
            prepared = xs, prepared_size = sizeof(float);
        }
    }
#else
    (void)x_is_bf16;
#endif
    if (nthreads > N) nthreads = (int)N;
    if (nthreads < 1 || N * K * esize * M < SERIAL_BYTES) nthreads = 1;
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
#endif
    {
        int64_t start, end; /* this thread's rows of all the matrices */
        thread_share(N, &start, &end);
        int64_t first = 0; /* global index of matrix i's first row */
        for (int i = 0; i < count && first < end; i++) {
            const int64_t r0 = start > first ? start - first : 0, r1 = end - first < ns[i] ? end - first : ns[i];
            const int64_t tk = tks[i];
            for (int64_t k0 = 0; k0 < K; k0 += tk) { /* tile by tile: rows of tk values */
                const uint8_t *tile = (const uint8_t *)ws[i] + k0 * ns[i] * esize;
                for (int64_t r = r0; r < r1; r++) {
                    for (int64_t m = 0; m < M; m++) {
                        const void *xm = prepared ? (const void *)((const uint8_t *)prepared + (m * K + k0) * prepared_size)
                                                  : (const void *)(x + m * K + k0);
                        const float v = fn(tile + r * tk * esize, wtype, x + m * K + k0, xm, tk);
                        y[m * ldy + first + r] = k0 ? y[m * ldy + first + r] + v : v;
                    }
                }
            }
            first += ns[i];
        }
    }
    free(prepared);
    return OK;
}

/* ---------------------------------------------------------------------------------------
 * Dequantization of packed groups to float32 or bfloat16 rows, for the matmuls of long
 * prefills (compute-bound: bf16 dot-product instructions outrun the int8 kernels there).
 * out[groups * 8][K], padding rows included; each value d * q is exact in float32 and
 * rounded once to bf16 (to nearest even).
 */
enum { OUT_F32 = 0, OUT_BF16 = 1 };

static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16); /* finite values only */
}

/* One row's block: 32 int8 values q times d, stored as float32 or bf16. */
static void dequantize_row_scalar(const int8_t *q, float d, int out_type, void *out) {
    for (int j = 0; j < QK; j++) {
        const float v = d * (float)q[j];
        if (out_type == OUT_F32) ((float *)out)[j] = v;
        else ((uint16_t *)out)[j] = float_to_bf16(v);
    }
}

#ifdef MISTOL_X86
AVX2_FN static inline __m256i bf16_bits_avx2(__m256 v) { /* float_to_bf16 on 8 lanes, in int32 */
    __m256i bits = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
}

AVX2_FN static void dequantize_row_avx2(const int8_t *q, float d, int out_type, void *out) {
    const __m256 vd = _mm256_set1_ps(d);
    __m256 v[4];
    for (int i = 0; i < 4; i++) {
        const __m256i q32 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * i)));
        v[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(q32), vd);
    }
    if (out_type == OUT_F32) {
        for (int i = 0; i < 4; i++) _mm256_storeu_ps((float *)out + 8 * i, v[i]);
        return;
    }
    for (int i = 0; i < 4; i += 2) { /* packus interleaves 128-bit lanes; the permute restores order */
        __m256i h = _mm256_packus_epi32(bf16_bits_avx2(v[i]), bf16_bits_avx2(v[i + 1]));
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + 8 * i), _mm256_permute4x64_epi64(h, 0xd8));
    }
}
#endif

typedef void (*dequant_row_fn)(const int8_t *, float, int, void *);

/* One group: each row's quants back in row order as int8 values, then scaled and stored. */
static void dequantize_group(dequant_row_fn row_fn, int fmt, const uint8_t *wg, int64_t B, int64_t K,
                             int out_type, void *out) {
    const int64_t gbb = group_block_bytes(fmt), qb = quant_bytes(fmt), esize = out_type == OUT_F32 ? 4 : 2;
    for (int64_t b = 0; b < B; b++) {
        const uint8_t *blk = wg + b * gbb;
        for (int r = 0; r < IL; r++) {
            uint8_t bytes[QK];
            int8_t q[QK];
            for (int j = 0; j < qb; j += 4) memcpy(bytes + j, blk + 2 * IL + quant_offset(r, j), 4);
            if (fmt == FMT_INT8) {
                memcpy(q, bytes, QK);
            } else {
                for (int j = 0; j < QK / 2; j++) q[j] = (int8_t)((bytes[j] & 15) - 8);
                for (int j = 0; j < QK / 2; j++) q[j + QK / 2] = (int8_t)((bytes[j] >> 4) - 8);
            }
            row_fn(q, half_to_float(load_u16(blk + 2 * r)), out_type, (uint8_t *)out + (r * K + b * QK) * esize);
        }
    }
}

EXPORT int mistol_dequantize(int fmt, const uint8_t *w, int64_t groups, int64_t K, void *out, int out_type,
                             int nthreads) {
    if (fmt != FMT_INT8 && fmt != FMT_INT4) return ERR_FMT;
    if (K <= 0 || K % QK != 0) return ERR_K;
    if (groups < 0 || (out_type != OUT_F32 && out_type != OUT_BF16)) return ERR_ARG;
    const int64_t B = K / QK, gbytes = B * group_block_bytes(fmt);
    const int64_t esize = out_type == OUT_F32 ? 4 : 2;
    if (nthreads < 1) nthreads = 1;
    dequant_row_fn row_fn = dequantize_row_scalar;
#ifdef MISTOL_X86
    if (cpu_has_avx2()) row_fn = dequantize_row_avx2;
#endif
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && groups * B > 256)
#endif
    for (int64_t g = 0; g < groups; g++)
        dequantize_group(row_fn, fmt, w + g * gbytes, B, K, out_type, (uint8_t *)out + g * IL * K * esize);
    return OK;
}

/* ---------------------------------------------------------------------------------------
 * Weight quantization, bit-exact with llama.cpp's reference quantize_row_q8_0/q4_0.
 * Source rows x[n][K] in fp32, bf16 or fp16 (read straight from a mapped checkpoint);
 * output either llama.cpp's blocks in row order (Q8_0: fp16 d + 32 int8 = 34 bytes; Q4_0:
 * fp16 d + 16 bytes = 18 bytes) or our packed layout, padding rows zeroed.
 */
enum { SRC_F32 = 0, SRC_BF16 = 1, SRC_F16 = 2 };

static void load_block(const void *x, int xtype, int64_t off, float *buf) {
    if (xtype == SRC_F32) {
        memcpy(buf, (const float *)x + off, QK * sizeof(float));
    } else if (xtype == SRC_BF16) {
        const uint16_t *h = (const uint16_t *)x + off;
        for (int j = 0; j < QK; j++) {
            uint32_t bits = (uint32_t)h[j] << 16;
            memcpy(buf + j, &bits, 4);
        }
    } else {
        const uint16_t *h = (const uint16_t *)x + off;
        for (int j = 0; j < QK; j++) buf[j] = half_to_float(h[j]);
    }
}

static inline int round_away(float v) { /* roundf for |v| < 2^31, without a libm call */
    int i = (int)v;
    float f = v - (float)i;
    return i + (f >= 0.5f) - (f <= -0.5f);
}

static void quantize_q8_0_block(const float *x, uint8_t *d_out, uint8_t *q_out) {
    float amax = 0.0f;
    for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(x[j]));
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    uint16_t h = float_to_half(d);
    memcpy(d_out, &h, 2);
    for (int j = 0; j < QK; j++) q_out[j] = (uint8_t)(int8_t)round_away(x[j] * id);
}

static void quantize_q4_0_block(const float *x, uint8_t *d_out, uint8_t *q_out) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < QK; j++) {
        if (amax < fabsf(x[j])) {
            amax = fabsf(x[j]);
            max = x[j];
        }
    }
    const float d = max / -8, id = d != 0.0f ? 1.0f / d : 0.0f;
    uint16_t h = float_to_half(d);
    memcpy(d_out, &h, 2);
    for (int j = 0; j < QK / 2; j++) {
        const int xi0 = (int)(int8_t)(x[j] * id + 8.5f), xi1 = (int)(int8_t)(x[QK / 2 + j] * id + 8.5f);
        q_out[j] = (uint8_t)((xi0 < 15 ? xi0 : 15) | ((xi1 < 15 ? xi1 : 15) << 4));
    }
}

EXPORT int mistol_quantize(int fmt, const void *x, int xtype, int64_t n, int64_t K, uint8_t *out, int packed,
                           int nthreads) {
    if (fmt != FMT_INT8 && fmt != FMT_INT4) return ERR_FMT;
    if (xtype < SRC_F32 || xtype > SRC_F16 || n < 0) return ERR_ARG;
    if (K <= 0 || K % QK != 0) return ERR_K;
    const int64_t B = K / QK, qb = quant_bytes(fmt), gbb = group_block_bytes(fmt);
    const int64_t units = packed ? (n + IL - 1) / IL : n; /* groups of 8 rows, or rows */
    if (nthreads < 1) nthreads = 1;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && units * B > 4096)
#endif
    for (int64_t u = 0; u < units; u++) {
        float buf[QK];
        const int64_t r0 = packed ? u * IL : u, rows = packed ? IL : 1;
        for (int64_t b = 0; b < B; b++) {
            for (int64_t i = 0; i < rows; i++) {
                uint8_t *d_out, *q_out;
                uint8_t row_q[QK];
                if (packed) { /* quantize into row_q, then interleave (see the layout at the top) */
                    d_out = out + (u * B + b) * gbb + 2 * i;
                    q_out = row_q;
                } else {
                    d_out = out + (u * B + b) * (2 + qb);
                    q_out = d_out + 2;
                }
                if (r0 + i >= n) { /* padding row: zero scale and quants read as zero weights */
                    memset(d_out, 0, 2), memset(q_out, 0, (size_t)qb);
                } else {
                    load_block(x, xtype, (r0 + i) * K + b * QK, buf);
                    if (fmt == FMT_INT8) quantize_q8_0_block(buf, d_out, q_out);
                    else quantize_q4_0_block(buf, d_out, q_out);
                }
                if (packed) {
                    uint8_t *dst = out + (u * B + b) * gbb + 2 * IL;
                    for (int64_t j = 0; j < qb; j += 4) memcpy(dst + quant_offset((int)i, (int)j), q_out + j, 4);
                }
            }
        }
    }
    return OK;
}
