/* Quantized matrix products: y = x @ W^T with W int8 or int4 in blocks of 32 along K, in
 * the packed layout of mistol_kernels.h.
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

#include <stdlib.h>
#include <math.h>

#include "mistol_kernels.h"

#define KCHUNK 64    /* blocks per step when several activation rows share a weight chunk */
#define ROWS_AT_ONCE 16 /* activation rows per pass of a multi-row kernel over a weight chunk */
/* The one-row kernels ask for each block GROUP_AHEAD bytes on, into L2 (prefetch_to_l2), on
 * CPUs where stream_prefetch() says so. Each thread reads one sequential stream, but on a
 * 2-core AMX Xeon (AVX512-VNNI) the hardware prefetcher alone left int4 at 24-25 GB/s and
 * int8 at 25-26 (python scripts/bench_gemv.py --threads 2, 7B's shapes), 30-31 and 28-29 with
 * it (2-8 KB alike); a decode step, builds in turns: 7B int4 157-158 -> 130-136 ms, int8
 * 282-284 -> 257-263, 0.5B int4 18.2-18.5 -> 13.1-14.5 (one thread 33.1-33.7 -> 26.2-26.6).
 * Into L1 (prefetcht0), as once tried on a 2-core EPYC, 2-16 KB ahead was 10-18% slower
 * than none there: each request holds one of the core's few L1 miss buffers. */
#define GROUP_AHEAD 4096
/* (pf: a constant; each kernel is built with and without, qkernels_select picks one: a test
 * of a variable in the loop cost the int4 kernel a fifth of its speed) */
#define GROUP_PREFETCH(pf, blk)                                                    \
    do {                                                                           \
        if (pf) prefetch_to_l2((const char *)(blk) + GROUP_AHEAD, sizeof(*(blk))); \
    } while (0)

/* ---------------------------------------------------------------------------------------
 * Activations: one row x[K] -> qa[K] int8, da[K/32] scales, sa[K/32] block sums of qa
 * (the int4 dot product subtracts 8 * sa once per block instead of 8 from every nibble).
 */
static void quantize_act_scalar(const float *x, int64_t K, int8_t *qa, float *da, int32_t *sa) {
    for (int64_t b = 0; b < K / QK; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        int has_nan = 0;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(xb[j])), has_nan |= xb[j] != xb[j];
        float d = act_block_scale(amax, has_nan), id = d != 0.0f ? 1.0f / d : 0.0f;
        int32_t s = 0;
        for (int j = 0; j < QK; j++) {
            int q = round_act(xb[j] * id);
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
static void group_int8_scalar(const uint8_t *wg, const int8_t *qa, const float *da, const int32_t *sa,
                              int64_t b0, int64_t b1, float *acc) {
    (void)sa;
    for (int64_t b = b0; b < b1; b++) {
        const block_q8_0x8 *blk = (const block_q8_0x8 *)wg + b;
        const int8_t *a = qa + b * QK;
        for (int r = 0; r < IL; r++) {
            int32_t s = 0;
            for (int j = 0; j < QK; j++) s += blk->qs[quant_offset(r, j)] * a[j];
            acc[r] += (float)s * (half_to_float(blk->d[r]) * da[b]);
        }
    }
}

static void group_int4_scalar(const uint8_t *wg, const int8_t *qa, const float *da, const int32_t *sa,
                              int64_t b0, int64_t b1, float *acc) {
    for (int64_t b = b0; b < b1; b++) {
        const block_q4_0x8 *blk = (const block_q4_0x8 *)wg + b;
        const int8_t *a = qa + b * QK;
        for (int r = 0; r < IL; r++) {
            int32_t s = 0;
            for (int j = 0; j < QK / 2; j++) {
                uint8_t v = blk->qs[quant_offset(r, j)];
                s += (v & 15) * a[j] + (v >> 4) * a[j + QK / 2];
            }
            s -= 8 * sa[b];
            acc[r] += (float)s * (half_to_float(blk->d[r]) * da[b]);
        }
    }
}

/* Where row m's activation bytes of block b start in the paired block-major layout (see
 * pair_rows): its bytes 4c..4c+3 are at this address + 8c. */
static inline const int8_t *row_act(const int8_t *qb, int64_t ld, int64_t b, int64_t m) {
    return qb + (b * ld + (m & ~(int64_t)1)) * QK + 4 * (m & 1);
}

/* Several activation rows against one group: each block's quants are unpacked once into
 * w[r][j] (the values the single-row kernels multiply: q for int8, the nibble n = q + 8 for
 * int4), then every row's block sums are taken as those kernels take them. */
static void group_rows_scalar(int fmt, const uint8_t *wg, const int8_t *qa, const float *da, const int32_t *sa,
                              int64_t ld, int64_t M, int64_t b0, int64_t b1, float *acc) {
    int8_t w[IL][QK];
    float d[IL];
    for (int64_t b = b0; b < b1; b++) {
        const uint16_t *ds;
        if (fmt == FMT_INT8) {
            const block_q8_0x8 *blk = (const block_q8_0x8 *)wg + b;
            for (int r = 0; r < IL; r++)
                for (int j = 0; j < QK; j++) w[r][j] = blk->qs[quant_offset(r, j)];
            ds = blk->d;
        } else {
            const block_q4_0x8 *blk = (const block_q4_0x8 *)wg + b;
            for (int r = 0; r < IL; r++)
                for (int j = 0; j < QK / 2; j++) {
                    const uint8_t v = blk->qs[quant_offset(r, j)];
                    w[r][j] = (int8_t)(v & 15), w[r][j + QK / 2] = (int8_t)(v >> 4);
                }
            ds = blk->d;
        }
        for (int r = 0; r < IL; r++) d[r] = half_to_float(ds[r]);
        for (int64_t m = 0; m < M; m++) {
            const int8_t *a = row_act(qa, ld, b, m);
            const float dam = da[b * ld + m];
            for (int r = 0; r < IL; r++) {
                int32_t s = 0;
                for (int j = 0; j < QK; j++) s += w[r][j] * a[8 * (j >> 2) + (j & 3)];
                if (fmt == FMT_INT4) s -= 8 * sa[b * ld + m];
                acc[m * IL + r] += (float)s * (d[r] * dam);
            }
        }
    }
}

static void group_rows_int8_scalar(const uint8_t *wg, const int8_t *qa, const float *da, const int32_t *sa,
                                   int64_t ld, int64_t M, int64_t b0, int64_t b1, float *acc) {
    group_rows_scalar(FMT_INT8, wg, qa, da, sa, ld, M, b0, b1, acc);
}

static void group_rows_int4_scalar(const uint8_t *wg, const int8_t *qa, const float *da, const int32_t *sa,
                                   int64_t ld, int64_t M, int64_t b0, int64_t b1, float *acc) {
    group_rows_scalar(FMT_INT4, wg, qa, da, sa, ld, M, b0, b1, acc);
}

/* ---------------------------------------------------------------------------------------
 * AVX2 kernels: the same arithmetic, the 8 rows' sums of a block reduced into one vector
 * (lane r = row r) so that scaling and accumulation are one multiply and one FMA.
 */
#ifdef MISTOL_X86
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
        enum { rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }; /* a constant expression, as clang requires */
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


#define CHUNK(q, c) _mm256_loadu_si256((const __m256i *)((q) + 32 * (c)))
#define BCAST4(a, j) _mm256_set1_epi32(load_i32((a) + (j)))

/* One group of 8 rows over blocks [b0, b1), accumulated into acc_out[8]: written once as a
 * macro and instantiated per instruction set (TARGET) with that set's dot product (DOT).
 * Independent partial sums keep the dot products' latency chains short. */
#define DEFINE_GROUP_INT8(NAME, TARGET, DOT, PF)                                                               \
    TARGET static void NAME(const uint8_t *wg, const int8_t *qa, const float *da, const int32_t *sa,           \
                            int64_t b0, int64_t b1, float *acc_out) {                                          \
        (void)sa;                                                                                              \
        const __m256i z = _mm256_setzero_si256();                                                              \
        __m256 acc = _mm256_loadu_ps(acc_out);                                                                 \
        for (int64_t b = b0; b < b1; b++) {                                                                    \
            const block_q8_0x8 *blk = (const block_q8_0x8 *)wg + b;                                            \
            GROUP_PREFETCH(PF, blk);                                                                           \
            const int8_t *q = blk->qs;                                                                         \
            const int8_t *a = qa + b * QK;                                                                     \
            __m256i s0 = DOT(DOT(z, CHUNK(q, 0), BCAST4(a, 0)), CHUNK(q, 1), BCAST4(a, 4));                    \
            __m256i s1 = DOT(DOT(z, CHUNK(q, 2), BCAST4(a, 8)), CHUNK(q, 3), BCAST4(a, 12));                   \
            __m256i s2 = DOT(DOT(z, CHUNK(q, 4), BCAST4(a, 16)), CHUNK(q, 5), BCAST4(a, 20));                  \
            __m256i s3 = DOT(DOT(z, CHUNK(q, 6), BCAST4(a, 24)), CHUNK(q, 7), BCAST4(a, 28));                  \
            __m256i s = _mm256_add_epi32(_mm256_add_epi32(s0, s1), _mm256_add_epi32(s2, s3));                  \
            __m256 scale = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk->d)),            \
                                         _mm256_set1_ps(da[b]));                                               \
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc);                                          \
        }                                                                                                      \
        _mm256_storeu_ps(acc_out, acc);                                                                        \
    }

DEFINE_GROUP_INT8(group_int8_avx2, AVX2_FN, dot_i8_avx2, 0)
DEFINE_GROUP_INT8(group_int8_vnni, VNNI_FN, dot_i8_vnni, 0)
DEFINE_GROUP_INT8(group_int8_avx2_pf, AVX2_FN, dot_i8_avx2, 1)
DEFINE_GROUP_INT8(group_int8_vnni_pf, VNNI_FN, dot_i8_vnni, 1)

/* int4, one group of 8 rows over blocks [b0, b1). A chunk holds 4 quant bytes of each row:
 * their low nibbles are elements 4c..4c+3, their high nibbles 16 further on. Nibbles are
 * stored as n = q + 8, so 8 * (the activation block's sum) is subtracted once per block. */
AVX2_FN static inline __attribute__((always_inline)) void int4_avx2(const uint8_t *wg, const int8_t *qa,
                                                                     const float *da, const int32_t *sa, int64_t b0,
                                                                     int64_t b1, float *acc_out, const int pf) {
    const __m256i m4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_loadu_ps(acc_out);
    for (int64_t b = b0; b < b1; b++) {
        const block_q4_0x8 *blk = (const block_q4_0x8 *)wg + b;
        GROUP_PREFETCH(pf, blk);
        const uint8_t *q = blk->qs;
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
        const __m256 scale = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk->d)), _mm256_set1_ps(da[b]));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc);
    }
    _mm256_storeu_ps(acc_out, acc);
}

/* AVX512-VNNI: dpbusd sums four products into int32 without saturating, so the high
 * nibbles need no shift: masked in place they are 16 n, summed apart and divided by 16
 * (exactly: a multiple of 16) once per block. Each chunk is loaded once (the compiler
 * would otherwise load it again for each of its two masks). */
VNNI_FN static inline __attribute__((always_inline)) void int4_vnni(const uint8_t *wg, const int8_t *qa,
                                                                     const float *da, const int32_t *sa, int64_t b0,
                                                                     int64_t b1, float *acc_out, const int pf) {
    const __m256i m_lo = _mm256_set1_epi8(0x0f), m_hi = _mm256_set1_epi8((char)0xf0);
    __m256 acc = _mm256_loadu_ps(acc_out);
    for (int64_t b = b0; b < b1; b++) {
        const block_q4_0x8 *blk = (const block_q4_0x8 *)wg + b;
        GROUP_PREFETCH(pf, blk);
        const uint8_t *q = blk->qs;
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
        const __m256 scale = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk->d)), _mm256_set1_ps(da[b]));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc);
    }
    _mm256_storeu_ps(acc_out, acc);
}

/* each int4 kernel without and with (_pf) asking for the blocks ahead, as the int8 ones */
#define INT4_KERNEL(NAME, TARGET, BODY, PF)                                                             \
    TARGET static void NAME(const uint8_t *wg, const int8_t *qa, const float *da, const int32_t *sa,     \
                            int64_t b0, int64_t b1, float *acc) {                                       \
        BODY(wg, qa, da, sa, b0, b1, acc, PF);                                                          \
    }
INT4_KERNEL(group_int4_avx2, AVX2_FN, int4_avx2, 0)
INT4_KERNEL(group_int4_avx2_pf, AVX2_FN, int4_avx2, 1)
INT4_KERNEL(group_int4_vnni, VNNI_FN, int4_vnni, 0)
INT4_KERNEL(group_int4_vnni_pf, VNNI_FN, int4_vnni, 1)
#undef INT4_KERNEL

/* ---------------------------------------------------------------------------------------
 * Several activation rows against one group (group_rows_fn): a block's weights are loaded
 * and unpacked into registers once, then each row's 8 block sums (lane r = row r, as in the
 * single-row kernels) take one dot-product step per 32-byte chunk and are scaled and added
 * with the same multiply and FMA. The integer sums are exact whatever their order, so every
 * row gets the single-row kernel's bits.
 */
#define ROW_BLOCK_SCALE(blk) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk)->d))
#define ADD_ROW_BLOCK(accp, s, d, dam) \
    _mm256_storeu_ps((accp), _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps((d), _mm256_set1_ps(dam)), \
                                             _mm256_loadu_ps(accp)))

/* The several-row kernels ask for the bytes PF_BYTES ahead (the group's next blocks, or the
 * next group's) while this block computes, into L2 (prefetch_to_l2). 8 KB measured best (2-4
 * KB: 8 rows took 1.5-1.7x one row's time; 8-16 KB: 1.3x). */
#ifndef PF_BYTES
#define PF_BYTES 8192
#endif

/* AVX512-VNNI on 512-bit vectors: the dot products, not the memory, bound several rows
 * (dpbusd takes 64 byte pairs on a 512-bit vector in the time it takes 32 on a 256-bit
 * one), so two activation rows are taken at once. Each 32-byte chunk of a block is
 * widened once, every 4 bytes twice (lanes 2r and 2r + 1: row r's 4 bytes); one 8-byte
 * broadcast of a row pair's activations (row m's 4 bytes of the chunk, then row m + 1's,
 * as pair_rows lays them out) then multiplies row m into the even lanes and row m + 1 into
 * the odd ones. A pair's float sums stay in one register, in that interleaved order, over
 * all the blocks of a call: per pair and block, besides the 8 dot products, only the
 * scaling and one FMA (a permute, a blend, and a load and store of the sums there took
 * 10-15% of the time at 8-64 rows on one core, 7B's shapes). */
/* each 4 bytes of the first (WIDEN0) or second (WIDEN1) 32-byte chunk of 64 bytes twice */
#define WIDEN0(v) _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7), (v))
#define WIDEN1(v) \
    _mm512_permutexvar_epi32(_mm512_setr_epi32(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15), (v))
#define LOAD64(p) _mm512_loadu_si512((const void *)(p))

/* A block's 8 weights per lane pair, widened as above: int8 as w + 128 (dpbusd wants
 * unsigned weights; 128 * the activations' sum is taken off, and no lane can overflow:
 * |sum| <= 32 * 255 * 127), int4 as its nibbles q + 8
 * (chunk c's low nibbles are elements 4c..4c+3, its high nibbles 16 further on). */
VNNI_FN static inline void widen_int8_vnni(const uint8_t *qs, __m512i *w) {
    for (int c = 0; c < 8; c += 2) {
        const __m512i v = _mm512_xor_si512(LOAD64(qs + 32 * c), _mm512_set1_epi8((char)0x80));
        w[c] = WIDEN0(v), w[c + 1] = WIDEN1(v);
    }
}
VNNI_FN static inline void widen_int4_vnni(const uint8_t *qs, __m512i *w) {
    const __m512i m4 = _mm512_set1_epi8(15);
    for (int c = 0; c < 4; c += 2) {
        const __m512i v = LOAD64(qs + 32 * c);
        const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi32(v, 4), m4);
        w[c] = WIDEN0(lo), w[c + 1] = WIDEN1(lo), w[4 + c] = WIDEN0(hi), w[5 + c] = WIDEN1(hi);
    }
}

/* NP row pairs (M rows, M > 2 NP - 2) over blocks [b0, b1) of format fmt; inlined with NP a
 * constant, so that the pairs' sums live in registers. */
VNNI_FN static inline __attribute__((always_inline)) void rows_vnni(int fmt, int NP, const uint8_t *wg,
                                                                     const int8_t *qb, const float *db,
                                                                     const int32_t *sb, int64_t ld, int64_t M,
                                                                     int64_t b0, int64_t b1, float *acc) {
    const __m512i zip = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
    const __m512i split = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    const __m512i z = _mm512_setzero_si512();
    const int shift = fmt == FMT_INT8 ? 7 : 3;
    const int64_t bytes = group_block_bytes(fmt);
    __m512 sums[8];
    for (int p = 0; p < NP; p++) /* rows 2p, 2p + 1 (an odd last row's pair is padding) */
        sums[p] = _mm512_permutexvar_ps(zip, _mm512_maskz_loadu_ps(2 * p + 1 < M ? 0xffff : 0x00ff, acc + 2 * p * IL));
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *blk = wg + b * bytes;
        prefetch_to_l2(blk + PF_BYTES, bytes);
        const uint16_t *d16 = fmt == FMT_INT8 ? ((const block_q8_0x8 *)blk)->d : ((const block_q4_0x8 *)blk)->d;
        const uint8_t *qs = fmt == FMT_INT8 ? (const uint8_t *)((const block_q8_0x8 *)blk)->qs
                                            : ((const block_q4_0x8 *)blk)->qs;
        __m512i w[8];
        if (fmt == FMT_INT8) widen_int8_vnni(qs, w);
        else widen_int4_vnni(qs, w);
        const __m128i dh = _mm_loadu_si128((const __m128i *)d16); /* row r's scale in lanes 2r, 2r + 1 */
        const __m512 d = _mm512_cvtph_ps(_mm256_set_m128i(_mm_unpackhi_epi16(dh, dh), _mm_unpacklo_epi16(dh, dh)));
        const int8_t *a = qb + b * ld * QK;
#define PAIR_BYTES(i) _mm512_set1_epi64(load_i64(ap + 8 * (i)))
        for (int p = 0; p < NP; p++) {
            const int8_t *ap = a + 2 * p * QK;
            __m512i s0 = _mm512_dpbusd_epi32(z, w[0], PAIR_BYTES(0)), s1 = _mm512_dpbusd_epi32(z, w[1], PAIR_BYTES(1));
            s0 = _mm512_dpbusd_epi32(s0, w[2], PAIR_BYTES(2)), s1 = _mm512_dpbusd_epi32(s1, w[3], PAIR_BYTES(3));
            s0 = _mm512_dpbusd_epi32(s0, w[4], PAIR_BYTES(4)), s1 = _mm512_dpbusd_epi32(s1, w[5], PAIR_BYTES(5));
            s0 = _mm512_dpbusd_epi32(s0, w[6], PAIR_BYTES(6)), s1 = _mm512_dpbusd_epi32(s1, w[7], PAIR_BYTES(7));
            /* the two rows' activation sums and scales, row 2p's in the even lanes */
            const __m512i bias = _mm512_slli_epi32(_mm512_set1_epi64(load_i64((const int8_t *)(sb + b * ld + 2 * p))), shift);
            const __m512 da = _mm512_castsi512_ps(_mm512_set1_epi64(load_i64((const int8_t *)(db + b * ld + 2 * p))));
            const __m512i s = _mm512_sub_epi32(_mm512_add_epi32(s0, s1), bias);
            sums[p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d, da), sums[p]);
        }
#undef PAIR_BYTES
    }
    for (int p = 0; p < NP; p++)
        _mm512_mask_storeu_ps(acc + 2 * p * IL, 2 * p + 1 < M ? 0xffff : 0x00ff, _mm512_permutexvar_ps(split, sums[p]));
}

/* up to ROWS_AT_ONCE rows, by pairs */
#define DEFINE_GROUP_ROWS_VNNI(NAME, FMT)                                                                         \
    VNNI_FN static void NAME(const uint8_t *wg, const int8_t *qa, const float *da, const int32_t *sa, int64_t ld, \
                             int64_t M, int64_t b0, int64_t b1, float *acc) {                                     \
        switch ((M + 1) / 2) {                                                                                    \
        case 1: rows_vnni(FMT, 1, wg, qa, da, sa, ld, M, b0, b1, acc); break;                                     \
        case 2: rows_vnni(FMT, 2, wg, qa, da, sa, ld, M, b0, b1, acc); break;                                     \
        case 3: rows_vnni(FMT, 3, wg, qa, da, sa, ld, M, b0, b1, acc); break;                                     \
        case 4: rows_vnni(FMT, 4, wg, qa, da, sa, ld, M, b0, b1, acc); break;                                     \
        case 5: rows_vnni(FMT, 5, wg, qa, da, sa, ld, M, b0, b1, acc); break;                                     \
        case 6: rows_vnni(FMT, 6, wg, qa, da, sa, ld, M, b0, b1, acc); break;                                     \
        case 7: rows_vnni(FMT, 7, wg, qa, da, sa, ld, M, b0, b1, acc); break;                                     \
        default: rows_vnni(FMT, 8, wg, qa, da, sa, ld, M, b0, b1, acc); break;                                    \
        }                                                                                                         \
    }
DEFINE_GROUP_ROWS_VNNI(group_rows_int8_vnni, FMT_INT8)
DEFINE_GROUP_ROWS_VNNI(group_rows_int4_vnni, FMT_INT4)

/* Several groups at once: a 512-bit vector holds two groups' 8 rows (the first's in its low
 * half), so each 4-byte weight column sits in a lane once, not twice, and a row's 4
 * activation bytes are broadcast to all 16 lanes. The permutes that widened the weights and
 * the row pairs' bias arithmetic go (the block's bias is the sum's starting value). With 8
 * rows or fewer, four groups (two vectors of each chunk) share each broadcast: the kernel is
 * bound by its dot products and the loads of the broadcasts, not by memory. The integer sums,
 * and their scaling and accumulation, are the pairs' above. On a 2-core AMX Xeon, 8 rows of
 * 7B's shapes (python scripts/bench_gemm_rows.py --threads 2, builds in turns): int8 3.0-3.1
 * -> 2.4-2.6 ms with two groups (1.40-1.48x -> 1.14-1.29x one row's time), int4 1.9-2.0 ->
 * 1.7-1.8 ms (1.73-1.92x -> 1.62-1.78x); four groups took int4 to 1.53-1.70x (in L2, one
 * thread: a tenth less time). int4 takes the dot products' time, as int8 does, in half the
 * bytes. AMX tiles (tdpbssd on the same unpacked weights, each block's sums stored, then
 * scaled) took as long at 8 rows and a fifth less at 16, in a test outside the library. */
VNNI_FN static inline __attribute__((always_inline)) void groups_rows_vnni(int fmt, int NV, int M, const uint8_t *wg,
                                                                            int64_t gstride, const int8_t *qb,
                                                                            const float *db, const int32_t *sb,
                                                                            int64_t ld, int64_t Mr, int64_t b0,
                                                                            int64_t b1, float *acc) {
    /* NV vectors of 2 groups each; acc[m][16 NV] */
    const int shift = fmt == FMT_INT8 ? 7 : 3;
    const int64_t bytes = group_block_bytes(fmt);
    __m512 sums[2][ROWS_AT_ONCE];
#pragma GCC unroll 16
    for (int m = 0; m < M; m++)
        for (int v = 0; v < NV; v++)
            sums[v][m] = m < Mr ? _mm512_loadu_ps(acc + 16 * (NV * m + v)) : _mm512_setzero_ps();
    for (int64_t b = b0; b < b1; b++) {
        __m512i w[2][8];
        __m512 d[2];
        for (int v = 0; v < NV; v++) {
            const uint8_t *blk0 = wg + 2 * v * gstride + b * bytes, *blk1 = blk0 + gstride;
            prefetch_to_l2(blk0 + PF_BYTES, bytes);
            prefetch_to_l2(blk1 + PF_BYTES, bytes);
#define BOTH(q, off) _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)((q##0) + (off)))), \
                                        _mm256_loadu_si256((const __m256i *)((q##1) + (off))), 1)
            __m256i dh;
            if (fmt == FMT_INT8) {
                const uint8_t *qs0 = (const uint8_t *)((const block_q8_0x8 *)blk0)->qs,
                              *qs1 = (const uint8_t *)((const block_q8_0x8 *)blk1)->qs;
                for (int c = 0; c < 8; c++) w[v][c] = _mm512_xor_si512(BOTH(qs, 32 * c), _mm512_set1_epi8((char)0x80));
                dh = _mm256_setr_m128i(_mm_loadu_si128((const __m128i *)((const block_q8_0x8 *)blk0)->d),
                                       _mm_loadu_si128((const __m128i *)((const block_q8_0x8 *)blk1)->d));
            } else {
                const uint8_t *qs0 = ((const block_q4_0x8 *)blk0)->qs, *qs1 = ((const block_q4_0x8 *)blk1)->qs;
                const __m512i m4 = _mm512_set1_epi8(15);
                for (int c = 0; c < 4; c++) {
                    const __m512i x = BOTH(qs, 32 * c);
                    w[v][c] = _mm512_and_si512(x, m4), w[v][4 + c] = _mm512_and_si512(_mm512_srli_epi32(x, 4), m4);
                }
                dh = _mm256_setr_m128i(_mm_loadu_si128((const __m128i *)((const block_q4_0x8 *)blk0)->d),
                                       _mm_loadu_si128((const __m128i *)((const block_q4_0x8 *)blk1)->d));
            }
#undef BOTH
            d[v] = _mm512_cvtph_ps(dh);
        }
        const int8_t *a = qb + b * ld * QK;
#pragma GCC unroll 16 /* (sums[] in registers) */
        for (int m = 0; m < M; m++) {
            /* row m's bytes 4c..4c + 3 at ap + 8 c (pair_rows' layout) */
            const int8_t *ap = a + (m & ~1) * QK + 4 * (m & 1);
            const __m512i bias = _mm512_set1_epi32(-(sb[b * ld + m] * (1 << shift)));
            __m512i s[2] = {bias, bias};
            for (int c = 0; c < 8; c++) {
                const __m512i x = _mm512_set1_epi32(load_i32(ap + 8 * c));
                for (int v = 0; v < NV; v++) s[v] = _mm512_dpbusd_epi32(s[v], w[v][c], x);
            }
            const __m512 dam = _mm512_set1_ps(db[b * ld + m]);
            for (int v = 0; v < NV; v++)
                sums[v][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[v]), _mm512_mul_ps(d[v], dam), sums[v][m]);
        }
    }
#pragma GCC unroll 16
    for (int m = 0; m < M; m++)
        for (int v = 0; v < NV; v++)
            if (m < Mr) _mm512_storeu_ps(acc + 16 * (NV * m + v), sums[v][m]);
}

/* ng = 2 groups with up to ROWS_AT_ONCE rows, or 4 with up to GROUPS4_ROWS (an odd count
 * computes its pair's padding row too, and drops it) */
#define DEFINE_GROUPS_ROWS_VNNI(NAME, FMT)                                                                       \
    VNNI_FN static void NAME(int ng, const uint8_t *wg, int64_t gs, const int8_t *qa, const float *da,          \
                             const int32_t *sa, int64_t ld, int64_t M, int64_t b0, int64_t b1, float *acc) {    \
        if (ng == 4) switch ((M + 1) / 2) {                                                                     \
            case 1: groups_rows_vnni(FMT, 2, 2, wg, gs, qa, da, sa, ld, M, b0, b1, acc); return;                \
            case 2: groups_rows_vnni(FMT, 2, 4, wg, gs, qa, da, sa, ld, M, b0, b1, acc); return;                \
            case 3: groups_rows_vnni(FMT, 2, 6, wg, gs, qa, da, sa, ld, M, b0, b1, acc); return;                \
            default: groups_rows_vnni(FMT, 2, 8, wg, gs, qa, da, sa, ld, M, b0, b1, acc); return;               \
            }                                                                                                   \
        switch ((M + 1) / 2) {                                                                                  \
        case 1: groups_rows_vnni(FMT, 1, 2, wg, gs, qa, da, sa, ld, M, b0, b1, acc); break;                     \
        case 2: groups_rows_vnni(FMT, 1, 4, wg, gs, qa, da, sa, ld, M, b0, b1, acc); break;                     \
        case 3: groups_rows_vnni(FMT, 1, 6, wg, gs, qa, da, sa, ld, M, b0, b1, acc); break;                     \
        case 4: groups_rows_vnni(FMT, 1, 8, wg, gs, qa, da, sa, ld, M, b0, b1, acc); break;                     \
        case 5: groups_rows_vnni(FMT, 1, 10, wg, gs, qa, da, sa, ld, M, b0, b1, acc); break;                    \
        case 6: groups_rows_vnni(FMT, 1, 12, wg, gs, qa, da, sa, ld, M, b0, b1, acc); break;                    \
        case 7: groups_rows_vnni(FMT, 1, 14, wg, gs, qa, da, sa, ld, M, b0, b1, acc); break;                    \
        default: groups_rows_vnni(FMT, 1, 16, wg, gs, qa, da, sa, ld, M, b0, b1, acc); break;                   \
        }                                                                                                       \
    }
DEFINE_GROUPS_ROWS_VNNI(groups_rows_int8_vnni, FMT_INT8)
DEFINE_GROUPS_ROWS_VNNI(groups_rows_int4_vnni, FMT_INT4)
#undef WIDEN0
#undef WIDEN1
#undef LOAD64

/* AVX2, int8: |w| once per block; per row, w's sign moved onto the activations (as in
 * dot_i8_avx2). */
AVX2_FN static void group_rows_int8_avx2(const uint8_t *wg, const int8_t *qa, const float *da, const int32_t *sa,
                                         int64_t ld, int64_t M, int64_t b0, int64_t b1, float *acc) {
    (void)sa;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t b = b0; b < b1; b++) {
        const block_q8_0x8 *blk = (const block_q8_0x8 *)wg + b;
        __m256i w[8], u[8];
        for (int c = 0; c < 8; c++) w[c] = CHUNK(blk->qs, c), u[c] = _mm256_sign_epi8(w[c], w[c]);
        const __m256 d = ROW_BLOCK_SCALE(blk);
        for (int64_t m = 0; m < M; m++) {
            const int8_t *a = row_act(qa, ld, b, m);
            __m256i s = _mm256_setzero_si256();
            for (int c = 0; c < 8; c++) { /* pair sums reach 2 * 128 * 127: each into int32 at once */
                const __m256i p16 = _mm256_maddubs_epi16(u[c], _mm256_sign_epi8(BCAST4(a, 8 * c), w[c]));
                s = _mm256_add_epi32(s, _mm256_madd_epi16(p16, ones));
            }
            ADD_ROW_BLOCK(acc + m * IL, s, d, da[b * ld + m]);
        }
    }
}

/* AVX2, int4: nibbles unpacked once per block. A pair sum of nibbles (<= 15) times
 * activations (|a| <= 127) is at most 3810, so a row's 8 products per lane add up in int16
 * (<= 30480) and widen once per block. */
AVX2_FN static void group_rows_int4_avx2(const uint8_t *wg, const int8_t *qa, const float *da, const int32_t *sa,
                                         int64_t ld, int64_t M, int64_t b0, int64_t b1, float *acc) {
    const __m256i m4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    for (int64_t b = b0; b < b1; b++) {
        const block_q4_0x8 *blk = (const block_q4_0x8 *)wg + b;
        __m256i lo[4], hi[4];
        for (int c = 0; c < 4; c++) {
            const __m256i v = CHUNK(blk->qs, c);
            lo[c] = _mm256_and_si256(v, m4), hi[c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        }
        const __m256 d = ROW_BLOCK_SCALE(blk);
        for (int64_t m = 0; m < M; m++) {
            const int8_t *a = row_act(qa, ld, b, m);
            __m256i s16 = _mm256_setzero_si256();
            for (int c = 0; c < 4; c++)
                s16 = _mm256_add_epi16(s16, _mm256_add_epi16(_mm256_maddubs_epi16(lo[c], BCAST4(a, 8 * c)),
                                                             _mm256_maddubs_epi16(hi[c], BCAST4(a, 8 * c + 32))));
            const __m256i s = _mm256_sub_epi32(_mm256_madd_epi16(s16, ones), _mm256_set1_epi32(8 * sa[b * ld + m]));
            ADD_ROW_BLOCK(acc + m * IL, s, d, da[b * ld + m]);
        }
    }
}
#undef ROW_BLOCK_SCALE
#undef ADD_ROW_BLOCK

#endif

/* ---------------------------------------------------------------------------------------
 * NEON kernels (64-bit ARM): the scalar code's arithmetic and its bits. Each row's block
 * sum is exact in int32, then scaled by (d * da) and added without fusing, as the scalar
 * loop does. Chunk c of a group block (32 bytes) holds 4 quant bytes of each row, rows
 * 0-3 in its first 16 bytes and rows 4-7 in the next, so with the dot-product extension
 * one sdot of a 16-byte half against activation bytes 4c..4c+3 (the lane form picks them
 * from a 16-byte load) adds 4 products into each row's own int32 lane, as dpbusd does on
 * x86. Without it, widening multiplies (int8 x int8 -> int16, exact) and pairwise adds into
 * int32 do the same in more steps.
 */
#ifdef MISTOL_ARM
static void quantize_act_neon(const float *x, int64_t K, int8_t *qa, float *da, int32_t *sa) {
    for (int64_t b = 0; b < K / QK; b++) {
        const float *xb = x + b * QK;
        float32x4_t v[8], m = vdupq_n_f32(0.0f);
        for (int i = 0; i < 8; i++) v[i] = vld1q_f32(xb + 4 * i), m = vmaxq_f32(m, vabsq_f32(v[i]));
        const float amax = vmaxvq_f32(m);
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        int32x4_t q[8], s = vdupq_n_s32(0);
        for (int i = 0; i < 8; i++) /* round half to even, as nearbyintf does */
            q[i] = vcvtnq_s32_f32(vmulq_n_f32(v[i], id)), s = vaddq_s32(s, q[i]);
        for (int h = 0; h < 2; h++) { /* |q| <= 127: narrowing is exact */
            const int16x8_t lo = vcombine_s16(vmovn_s32(q[4 * h]), vmovn_s32(q[4 * h + 1]));
            const int16x8_t hi = vcombine_s16(vmovn_s32(q[4 * h + 2]), vmovn_s32(q[4 * h + 3]));
            vst1q_s8(qa + b * QK + 16 * h, vcombine_s8(vmovn_s16(lo), vmovn_s16(hi)));
        }
        da[b] = d;
        sa[b] = vaddvq_s32(s);
    }
}

/* acc[4] += (float)s[4] * (d[4] * da): four rows' block sums, scaled as the scalar code does */
static inline float32x4_t add_scaled(float32x4_t acc, int32x4_t s, const uint16_t *d, float da) {
    const float32x4_t scale = vmulq_n_f32(vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(d))), da);
    return vaddq_f32(acc, vmulq_f32(vcvtq_f32_s32(s), scale));
}

/* Four rows' 4 weight bytes each (w, 16 bytes) times the same 4 activation bytes (a4, held
 * twice), added pairwise into p[4] = {row 0 pairs 0-1, row 0 pairs 2-3, row 1 ...} for
 * rows 0-1 (p[0]) and 2-3 (p[1]); vpaddq of the two gives the rows' sums. */
static inline void mul4_neon(int32x4_t *p, int8x16_t w, int8x8_t a4) {
    p[0] = vpadalq_s16(p[0], vmull_s8(vget_low_s8(w), a4));
    p[1] = vpadalq_s16(p[1], vmull_s8(vget_high_s8(w), a4));
}

/* activation bytes 4c..4c+3 of a 16-byte load, in both halves of 8 bytes */
#define A4(v, c) vreinterpret_s8_s32(vdup_laneq_s32(vreinterpretq_s32_s8(v), (c)))

static void group_int8_neon(const uint8_t *wg, const int8_t *qa, const float *da, const int32_t *sa, int64_t b0,
                            int64_t b1, float *acc_out) {
    (void)sa;
    float32x4_t acc0 = vld1q_f32(acc_out), acc1 = vld1q_f32(acc_out + 4);
    for (int64_t b = b0; b < b1; b++) {
        const block_q8_0x8 *blk = (const block_q8_0x8 *)wg + b;
        const int8_t *q = blk->qs, *a = qa + b * QK;
        const int8x16_t a0 = vld1q_s8(a), a1 = vld1q_s8(a + 16);
        int32x4_t lo[2] = {vdupq_n_s32(0), vdupq_n_s32(0)}, hi[2] = {vdupq_n_s32(0), vdupq_n_s32(0)};
#define STEP(c, av, lane) \
    mul4_neon(lo, vld1q_s8(q + 32 * (c)), A4(av, lane)), mul4_neon(hi, vld1q_s8(q + 32 * (c) + 16), A4(av, lane))
        STEP(0, a0, 0); STEP(1, a0, 1); STEP(2, a0, 2); STEP(3, a0, 3);
        STEP(4, a1, 0); STEP(5, a1, 1); STEP(6, a1, 2); STEP(7, a1, 3);
#undef STEP
        acc0 = add_scaled(acc0, vpaddq_s32(lo[0], lo[1]), blk->d, da[b]);
        acc1 = add_scaled(acc1, vpaddq_s32(hi[0], hi[1]), blk->d + 4, da[b]);
    }
    vst1q_f32(acc_out, acc0), vst1q_f32(acc_out + 4, acc1);
}

/* int4: a chunk's low nibbles are elements 4c..4c+3, its high nibbles 16 further on; the
 * nibbles (n = q + 8, 0..15) multiply as int8, and 8 * (the activations' sum) is
 * subtracted once per block. */
static void group_int4_neon(const uint8_t *wg, const int8_t *qa, const float *da, const int32_t *sa, int64_t b0,
                            int64_t b1, float *acc_out) {
    const uint8x16_t m4 = vdupq_n_u8(15);
    float32x4_t acc0 = vld1q_f32(acc_out), acc1 = vld1q_f32(acc_out + 4);
    for (int64_t b = b0; b < b1; b++) {
        const block_q4_0x8 *blk = (const block_q4_0x8 *)wg + b;
        const uint8_t *q = blk->qs;
        const int8_t *a = qa + b * QK;
        const int8x16_t a0 = vld1q_s8(a), a1 = vld1q_s8(a + 16);
        int32x4_t lo[2] = {vdupq_n_s32(0), vdupq_n_s32(0)}, hi[2] = {vdupq_n_s32(0), vdupq_n_s32(0)};
#define STEP(c)                                                                                        \
    do {                                                                                               \
        const uint8x16_t v0 = vld1q_u8(q + 32 * (c)), v1 = vld1q_u8(q + 32 * (c) + 16);                \
        mul4_neon(lo, vreinterpretq_s8_u8(vandq_u8(v0, m4)), A4(a0, c));                               \
        mul4_neon(lo, vreinterpretq_s8_u8(vshrq_n_u8(v0, 4)), A4(a1, c));                              \
        mul4_neon(hi, vreinterpretq_s8_u8(vandq_u8(v1, m4)), A4(a0, c));                               \
        mul4_neon(hi, vreinterpretq_s8_u8(vshrq_n_u8(v1, 4)), A4(a1, c));                              \
    } while (0)
        STEP(0); STEP(1); STEP(2); STEP(3);
#undef STEP
        const int32x4_t bias = vdupq_n_s32(8 * sa[b]);
        acc0 = add_scaled(acc0, vsubq_s32(vpaddq_s32(lo[0], lo[1]), bias), blk->d, da[b]);
        acc1 = add_scaled(acc1, vsubq_s32(vpaddq_s32(hi[0], hi[1]), bias), blk->d + 4, da[b]);
    }
    vst1q_f32(acc_out, acc0), vst1q_f32(acc_out + 4, acc1);
}

#ifdef MISTOL_DOTPROD
/* With sdot: rows 0-3 (s0) and 4-7 (s1) in int32 lanes directly. */
DOTPROD_FN static void group_int8_dotprod(const uint8_t *wg, const int8_t *qa, const float *da, const int32_t *sa,
                                          int64_t b0, int64_t b1, float *acc_out) {
    (void)sa;
    float32x4_t acc0 = vld1q_f32(acc_out), acc1 = vld1q_f32(acc_out + 4);
    for (int64_t b = b0; b < b1; b++) {
        const block_q8_0x8 *blk = (const block_q8_0x8 *)wg + b;
        const int8_t *q = blk->qs, *a = qa + b * QK;
        const int8x16_t a0 = vld1q_s8(a), a1 = vld1q_s8(a + 16);
        int32x4_t s0 = vdupq_n_s32(0), s1 = s0, t0 = s0, t1 = s0; /* two chains per half: sdot latency */
#define STEP(s, t, off) s = vdotq_laneq_s32(s, vld1q_s8(q + (off)), a0, (off) / 32), \
                        t = vdotq_laneq_s32(t, vld1q_s8(q + 128 + (off)), a1, (off) / 32)
        STEP(s0, t0, 0); STEP(s1, t1, 16); STEP(s0, t0, 32); STEP(s1, t1, 48);
        STEP(s0, t0, 64); STEP(s1, t1, 80); STEP(s0, t0, 96); STEP(s1, t1, 112);
#undef STEP
        acc0 = add_scaled(acc0, vaddq_s32(s0, t0), blk->d, da[b]);
        acc1 = add_scaled(acc1, vaddq_s32(s1, t1), blk->d + 4, da[b]);
    }
    vst1q_f32(acc_out, acc0), vst1q_f32(acc_out + 4, acc1);
}

DOTPROD_FN static void group_int4_dotprod(const uint8_t *wg, const int8_t *qa, const float *da, const int32_t *sa,
                                          int64_t b0, int64_t b1, float *acc_out) {
    const uint8x16_t m4 = vdupq_n_u8(15);
    float32x4_t acc0 = vld1q_f32(acc_out), acc1 = vld1q_f32(acc_out + 4);
    for (int64_t b = b0; b < b1; b++) {
        const block_q4_0x8 *blk = (const block_q4_0x8 *)wg + b;
        const uint8_t *q = blk->qs;
        const int8_t *a = qa + b * QK;
        const int8x16_t a0 = vld1q_s8(a), a1 = vld1q_s8(a + 16);
        int32x4_t s0 = vdupq_n_s32(0), s1 = s0, t0 = s0, t1 = s0; /* low nibbles in s, high in t */
#define STEP(c)                                                                                        \
    do {                                                                                               \
        const uint8x16_t v0 = vld1q_u8(q + 32 * (c)), v1 = vld1q_u8(q + 32 * (c) + 16);                \
        s0 = vdotq_laneq_s32(s0, vreinterpretq_s8_u8(vandq_u8(v0, m4)), a0, (c));                      \
        t0 = vdotq_laneq_s32(t0, vreinterpretq_s8_u8(vshrq_n_u8(v0, 4)), a1, (c));                     \
        s1 = vdotq_laneq_s32(s1, vreinterpretq_s8_u8(vandq_u8(v1, m4)), a0, (c));                      \
        t1 = vdotq_laneq_s32(t1, vreinterpretq_s8_u8(vshrq_n_u8(v1, 4)), a1, (c));                     \
    } while (0)
        STEP(0); STEP(1); STEP(2); STEP(3);
#undef STEP
        const int32x4_t bias = vdupq_n_s32(8 * sa[b]);
        acc0 = add_scaled(acc0, vsubq_s32(vaddq_s32(s0, t0), bias), blk->d, da[b]);
        acc1 = add_scaled(acc1, vsubq_s32(vaddq_s32(s1, t1), bias), blk->d + 4, da[b]);
    }
    vst1q_f32(acc_out, acc0), vst1q_f32(acc_out + 4, acc1);
}
#endif
#undef A4
#endif

/* ---------------------------------------------------------------------------------------
 * Driver: quantize the activation rows once, then each thread multiplies its share of the
 * weights' row groups.
 */
/* Groups [g0, g1) of one matrix with N rows, packed in tiles of tb blocks,
 * into its output columns y[m * ldy + n]. acc: scratch of qgemm_acc_floats(M) floats. */
static void run_groups(group_fn fn, group_rows_fn rows_fn, groups_rows_fn wide_fn, const uint8_t *w, int64_t bb,
                       int64_t tb, const qact *act, int64_t M, int64_t K, int64_t N, float *y, int64_t ldy, int64_t g0,
                       int64_t g1, float *acc) {
    const int64_t B = K / QK, G = (N + IL - 1) / IL;
    const int8_t *qa = act->qa;
    const float *da = act->da;
    const int32_t *sa = act->sa;
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
    if (!act->qb) rows_fn = NULL, wide_fn = NULL; /* (no paired copy of the activations) */
    /* several rows: group by group (2 or 4 at once where they are whole and wide_fn is there),
     * each weight chunk kept in L1 across the rows */
    for (int64_t g = g0, ng; g < g1; g += ng) {
        ng = !wide_fn || !rows_fn ? 1
             : M <= GROUPS4_ROWS && g + 4 <= g1 && (g + 4) * IL <= N ? 4
             : g + 2 <= g1 && (g + 2) * IL <= N ? 2
             : 1;
        memset(acc, 0, sizeof(float) * IL * M * ng);
        for (int64_t t0 = 0; t0 < B; t0 += tb) {
            const int64_t tw = B - t0 < tb ? B - t0 : tb;
            for (int64_t b0 = t0; b0 < t0 + tw; b0 += KCHUNK) {
                const int64_t b1 = b0 + KCHUNK < t0 + tw ? b0 + KCHUNK : t0 + tw;
                /* The rows after the first find the chunk in L1 and miss no memory, so the
                 * hardware prefetcher stalls while they compute: ask for the next chunk now
                 * (at 7B, 2 rows cost 2x one row without this; memory waits on compute).
                 * The multi-row kernels read each block once for ROWS_AT_ONCE rows, as one
                 * row does, and need it only for more rows than that. */
                if (!rows_fn || M > ROWS_AT_ONCE) {
                    const uint8_t *next = GROUP_IN_TILE(g, t0, tw) + b1 * bb;
                    for (int64_t off = 0; off < KCHUNK * bb; off += 64) __builtin_prefetch(next + off);
                }
                if (ng > 1)
                    for (int64_t m0 = 0; m0 < M; m0 += ROWS_AT_ONCE)
                        wide_fn((int)ng, GROUP_IN_TILE(g, t0, tw), tw * bb, act->qb + m0 * QK, act->db + m0,
                                act->sb + m0, M + (M & 1), M - m0 < ROWS_AT_ONCE ? M - m0 : ROWS_AT_ONCE, b0, b1,
                                acc + m0 * ng * IL);
                else if (rows_fn)
                    for (int64_t m0 = 0; m0 < M; m0 += ROWS_AT_ONCE)
                        rows_fn(GROUP_IN_TILE(g, t0, tw), act->qb + m0 * QK, act->db + m0, act->sb + m0, M + (M & 1),
                                M - m0 < ROWS_AT_ONCE ? M - m0 : ROWS_AT_ONCE, b0, b1, acc + m0 * IL);
                else
                    for (int64_t m = 0; m < M; m++)
                        fn(GROUP_IN_TILE(g, t0, tw), qa + m * K, da + m * B, sa + m * B, b0, b1, acc + m * IL);
            }
        }
        const int64_t stride = ng * IL, rows = ng > 1 ? stride : N - g * IL < IL ? N - g * IL : IL;
        for (int64_t m = 0; m < M; m++) memcpy(y + m * ldy + g * IL, acc + m * stride, sizeof(float) * rows);
    }
#undef GROUP_IN_TILE
}

int qkernels_select(int impl, qkernels *out) {
    if (impl == IMPL_AUTO) impl = best_impl();
    if ((impl == IMPL_AVX2 && !cpu_has_avx2()) || (impl == IMPL_VNNI && !cpu_has_vnni())) return ERR_IMPL;
    *out = (qkernels){quantize_act_scalar, {NULL, group_int8_scalar, group_int4_scalar}};
#ifdef MISTOL_X86
    const int pf = stream_prefetch();
    if (impl == IMPL_AVX2)
        *out = (qkernels){quantize_act_avx2, {NULL, pf ? group_int8_avx2_pf : group_int8_avx2,
                                              pf ? group_int4_avx2_pf : group_int4_avx2}};
    if (impl == IMPL_VNNI)
        *out = (qkernels){quantize_act_avx2, {NULL, pf ? group_int8_vnni_pf : group_int8_vnni,
                                              pf ? group_int4_vnni_pf : group_int4_vnni}};
#endif
#ifdef MISTOL_ARM
    if (impl == IMPL_DOTPROD && !cpu_has_dotprod()) return ERR_IMPL;
    if (impl == IMPL_NEON) *out = (qkernels){quantize_act_neon, {NULL, group_int8_neon, group_int4_neon}};
#ifdef MISTOL_DOTPROD
    if (impl == IMPL_DOTPROD) *out = (qkernels){quantize_act_neon, {NULL, group_int8_dotprod, group_int4_dotprod}};
#endif
#else
    if (impl == IMPL_NEON || impl == IMPL_DOTPROD) return ERR_IMPL;
#endif
    out->group_rows[FMT_INT8] = group_rows_int8_scalar, out->group_rows[FMT_INT4] = group_rows_int4_scalar;
#ifdef MISTOL_X86
    if (impl == IMPL_AVX2)
        out->group_rows[FMT_INT8] = group_rows_int8_avx2, out->group_rows[FMT_INT4] = group_rows_int4_avx2;
    if (impl == IMPL_VNNI) {
        out->group_rows[FMT_INT8] = group_rows_int8_vnni, out->group_rows[FMT_INT4] = group_rows_int4_vnni;
        out->groups_rows[FMT_INT8] = groups_rows_int8_vnni, out->groups_rows[FMT_INT4] = groups_rows_int4_vnni;
    }
#endif
    if (impl == IMPL_NEON || impl == IMPL_DOTPROD) /* the single-row kernels, row by row, until NEON has its own */
        out->group_rows[FMT_INT8] = out->group_rows[FMT_INT4] = NULL;
    kquant_select(impl, out);
    return OK;
}

/* act's rows quantized per 32 (qa, da, sa: row after row) again in act's qb, db, sb, for
 * the multi-row kernels: block after block, and within a block rows in pairs, 4 bytes of
 * each in turn. Rows m, m + 1 (m even) of block b: qb + (b Mp + m) 32 holds row m's bytes
 * 0-3, row m + 1's bytes 0-3, row m's bytes 4-7, ...; their scales and sums at db, sb
 * [b Mp + m] and [b Mp + m + 1]. Mp: M rounded up to even (an odd last row is paired with
 * zeros). A kernel then finds a block's rows side by side (row after row they sit K bytes
 * apart, for K a multiple of 4096 all in one set of the L1 cache, which 12 or more rows
 * overflow), and one 8-byte load holds a pair's activations for one 4-byte weight column. */
static void pair_rows(const qact *act, int64_t M, int64_t K) {
    const int64_t B = K / QK, Mp = M + (M & 1);
    for (int64_t b = 0; b < B; b++)
        for (int64_t m = 0; m < Mp; m++) {
            int8_t *dst = act->qb + (b * Mp + (m & ~(int64_t)1)) * QK + 4 * (m & 1);
            for (int c = 0; c < QK / 4; c++) {
                if (m < M) memcpy(dst + 8 * c, act->qa + m * K + b * QK + 4 * c, 4);
                else memset(dst + 8 * c, 0, 4);
            }
            act->db[b * Mp + m] = m < M ? act->da[m * B + b] : 0.0f;
            act->sb[b * Mp + m] = m < M ? act->sa[m * B + b] : 0;
        }
}

void act_rows_copies(const qact *act, int64_t M, int64_t K) {
    if (M < 2) return;
    if (act->qb) pair_rows(act, M, K);
    if (act->qkb)
        for (int64_t m = 0; m < M; m++) act_row_to_blocks(act->qk + m * K, m, M, K, act->qkb);
    if (act->qab) {
        const int64_t B = K / QK;
        if (B % 8) memset(act->qab, 0, (size_t)((B + 7) / 8 * 8 * QK * M)); /* (the last group's unused blocks: 0) */
        for (int64_t m = 0; m < M; m++)
            for (int64_t b = 0; b < B; b++)
                memcpy(act->qab + ((b / 8 * M + m) * 8 + b % 8) * QK, act->qa + m * K + b * QK, QK);
    }
}

/* The groups of all the matrices, split into one contiguous range per thread (a static
 * schedule: each thread streams its own part of the weights), walked matrix by matrix. */
void qgemm_share(const qkernels *kn, const mistol_matrix *mats, int count, const qact *act, int64_t M, int64_t K,
                 float *y, int64_t ldy, float *acc) {
    int64_t G = 0;
    for (int i = 0; i < count; i++) G += (mats[i].rows + IL - 1) / IL;
    int64_t start, end, first = 0, col = 0;
    thread_share(G, &start, &end);
    for (int i = 0; i < count && first < end; i++) {
        const mistol_matrix *w = &mats[i];
        const int64_t gi = (w->rows + IL - 1) / IL;
        const int64_t g0 = start > first ? start - first : 0, g1 = end - first < gi ? end - first : gi;
        if (g0 < g1 && fmt_row_order(w->format)) /* (row-order formats: 8 rows per unit of work) */
            kquant_rows(kn, w, act, M, K, g0 * IL, g1 * IL < w->rows ? g1 * IL : w->rows, y + col, ldy);
        else if (g0 < g1)
            run_groups(kn->group[w->format], kn->group_rows[w->format], kn->groups_rows[w->format], w->data,
                       group_block_bytes(w->format), w->tile_blocks, act, M, K, w->rows, y + col, ldy, g0, g1, acc);
        first += gi, col += w->rows;
    }
}

/* A matrix product's setup (activations quantized once, the paired copy, each thread's
 * scratch), then one parallel region in which every thread runs `share` on its part. */
typedef void (*share_fn)(const qkernels *, const mistol_matrix *, int, const qact *, int64_t, int64_t, float *, int64_t,
                         float *);

static int gemm_run(const float *x, int64_t M, int64_t K, int count, const mistol_matrix *mats, float *y, int64_t ldy,
                    int nthreads, int impl, share_fn share) {
    qkernels kn;
    if (qkernels_select(impl, &kn) != OK) return ERR_IMPL;
    if (K <= 0 || K % QK != 0) return ERR_K;
    if (M < 0 || count < 0) return ERR_ARG;
    int64_t G = 0, cols = 0, bytes = 0;
    for (int i = 0; i < count; i++) {
        const int fmt = mats[i].format;
        if (!fmt_known(fmt)) return ERR_FMT;
        if (K % fmt_k_multiple(fmt) != 0) return ERR_K;
        if (mats[i].rows < 0 || mats[i].tile_blocks <= 0) return ERR_ARG;
        G += (mats[i].rows + IL - 1) / IL, cols += mats[i].rows;
        bytes += fmt_row_order(fmt) ? mats[i].rows * fmt_row_bytes(fmt, K)
                                    : (mats[i].rows + IL - 1) / IL * (K / QK) * group_block_bytes(fmt);
    }
    if (ldy < cols) return ERR_ARG;
    if (M == 0 || G == 0) return OK;
    if (nthreads > G) nthreads = (int)G;
    if (nthreads < 1 || bytes * M < SERIAL_BYTES) nthreads = 1;

    const int needs = act_needs(mats, count);
    const int64_t nk = needs & ACT_256 ? M * K : 0, n32 = needs & ACT_32 ? M * K : 0;
    qact act = {malloc((size_t)n32 + 1), malloc(sizeof(float) * (size_t)(n32 / QK + 1)),
                malloc(sizeof(int32_t) * (size_t)(n32 / QK + 1)), malloc((size_t)nk + 1),
                malloc(sizeof(float) * (size_t)(nk / 256 + 1)), malloc(sizeof(int32_t) * (size_t)(nk / 16 + 1))};
    /* the paired copy, for the multi-row kernels (where this instruction set has them) */
    const int64_t nb = M > 1 && kn.group_rows[FMT_INT8] ? (M + (M & 1)) * (n32 / M) : 0;
    act.qb = malloc((size_t)nb + 1), act.db = malloc(sizeof(float) * (size_t)(nb / QK + 1));
    act.sb = malloc(sizeof(int32_t) * (size_t)(nb / QK + 1));
    /* the per-256 rows super-block-major, for the repacked k-quants' multi-row kernels */
    const int64_t nkb = M > 1 && kn.q4k_x8_rows ? nk : 0;
    act.qkb = malloc((size_t)nkb + 1);
    /* the per-32 rows block-major, for the legacy types' multi-row kernels */
    int legacy = 0;
    for (int i = 0; i < count; i++) legacy |= kn.legacy_rows[mats[i].format] != NULL;
    const int64_t nab = M > 1 && legacy ? (K / QK + 7) / 8 * 8 * QK * M : 0;
    act.qab = malloc((size_t)nab + 1);
    /* Each thread's scratch on cache lines of its own: the several-row kernels store to it
     * block after block, and two threads that write one line take turns owning it (at 7B
     * with 2 threads, 2-8 rows took 1.5-3x as long, varying with where malloc put it). */
    const int64_t acc_stride = qgemm_acc_floats(M);
    void *acc_mem = malloc(sizeof(float) * (size_t)(acc_stride * nthreads + LINE_FLOATS));
    float *acc = acc_mem ? (float *)(((uintptr_t)acc_mem + 63) & ~(uintptr_t)63) : NULL;
#define FREE_ACT free(act.qa), free(act.da), free(act.sa), free(act.qk), free(act.dk), free(act.sk), \
                 free(act.qb), free(act.db), free(act.sb), free(act.qkb), free(act.qab), free(acc_mem)
    if (!act.qa || !act.da || !act.sa || !act.qk || !act.dk || !act.sk || !act.qb || !act.db || !act.sb || !act.qkb ||
        !act.qab || !acc) {
        FREE_ACT;
        return ERR_NOMEM;
    }
    /* One thread quantizes the activations: a small fraction of the matmul's time at any
     * M, and no barrier inside the parallel region. */
    for (int64_t m = 0; m < M; m++) act_quantize(&kn, x + m * K, K, m, 0, K, needs, &act);
    if (!nb) free(act.qb), free(act.db), free(act.sb), act.qb = NULL, act.db = NULL, act.sb = NULL;
    if (!nkb) free(act.qkb), act.qkb = NULL;
    if (!nab) free(act.qab), act.qab = NULL;
    act_rows_copies(&act, M, K);
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
#endif
    share(&kn, mats, count, &act, M, K, y, ldy, acc + thread_index() * acc_stride);
    FREE_ACT;
#undef FREE_ACT
    return OK;
}

/* y[:, cols of matrix i] = x[M][K] @ W_i^T for the matrices mats[i < count], each in its
 * own format; matrix i's outputs start at column sum(rows of mats[0..i-1]) of y, whose
 * rows are ldy floats apart. Several matrices that share an input (a layer's q/k/v,
 * gate/up) thus cost one parallel region and one activation quantization (per kind of
 * activation block the formats read). Returns 0 or a negative error. */
EXPORT int mistol_gemm_matrices(const float *x, int64_t M, int64_t K, int count, const mistol_matrix *mats, float *y,
                                int64_t ldy, int nthreads, int impl) {
    return gemm_run(x, M, K, count, mats, y, ldy, nthreads, impl, qgemm_share);
}

/* shares[m][r] = sum over blocks b of mins[b][r] * sums[m][b]: the share of Q4_1's / Q5_1's
 * block minimums in 8 rows' outputs (the rows in lanes; four sums over the blocks in turn, so
 * that no add waits on the one before: a 32nd of the products, in float, took as long as the
 * int8 product itself when each row summed its blocks in one chain). */
static void min_shares_portable(const float *mins, const float *sums, int64_t B, int64_t M, float *shares) {
    for (int64_t m = 0; m < M; m++) {
        float t[4][IL] = {{0}};
        for (int64_t b = 0; b < B; b++)
            for (int r = 0; r < IL; r++) t[b & 3][r] += mins[b * IL + r] * sums[m * B + b];
        for (int r = 0; r < IL; r++) shares[m * IL + r] = (t[0][r] + t[1][r]) + (t[2][r] + t[3][r]);
    }
}

#ifdef MISTOL_X86
AVX2_FN static void min_shares_avx2(const float *mins, const float *sums, int64_t B, int64_t M, float *shares) {
    for (int64_t m = 0; m < M; m++) {
        const float *s = sums + m * B;
        __m256 t0 = _mm256_setzero_ps(), t1 = t0, t2 = t0, t3 = t0;
        int64_t b = 0;
#define MIN_TERM(t, i) t = _mm256_add_ps(t, _mm256_mul_ps(_mm256_loadu_ps(mins + (i) * IL), _mm256_broadcast_ss(s + (i))))
        for (; b + 4 <= B; b += 4) MIN_TERM(t0, b), MIN_TERM(t1, b + 1), MIN_TERM(t2, b + 2), MIN_TERM(t3, b + 3);
        for (; b < B; b++) { /* (t[b & 3], as the portable code) */
            if ((b & 3) == 0) MIN_TERM(t0, b);
            else if ((b & 3) == 1) MIN_TERM(t1, b);
            else MIN_TERM(t2, b);
        }
#undef MIN_TERM
        _mm256_storeu_ps(shares + m * IL, _mm256_add_ps(_mm256_add_ps(t0, t1), _mm256_add_ps(t2, t3)));
    }
}
#endif

static void min_shares(const float *mins, const float *sums, int64_t B, int64_t M, float *shares) {
#ifdef MISTOL_X86
    if (cpu_has_avx2()) {
        min_shares_avx2(mins, sums, B, M, shares);
        return;
    }
#endif
    min_shares_portable(mins, sums, B, M, shares);
}

/* This thread's groups of one Q4_1 / Q5_0 / Q5_1 matrix, each converted to int8 blocks in a
 * buffer of the thread's (K / 32 blocks of 272 bytes: 41 KB at K = 4864) and multiplied by
 * the int8 kernels for all M rows; Q4_1's and Q5_1's block minimums m then add m times each
 * activation block's value sum (da * sa, as the types' own kernels take it). Without the
 * buffers, the types' own kernels. */
static void as_int8_share(const qkernels *kn, const mistol_matrix *mats, int count, const qact *act, int64_t M,
                          int64_t K, float *y, int64_t ldy, float *acc) {
    (void)count;
    const mistol_matrix *w = mats;
    const int64_t B = K / QK;
    const int has_mins = w->format != FMT_Q5_0;
    int64_t start, end;
    thread_share((w->rows + IL - 1) / IL, &start, &end);
    if (start >= end) return;
    block_q8_0x8 *group = malloc(sizeof(block_q8_0x8) * (size_t)B);
    float *mins = has_mins ? malloc(sizeof(float) * (size_t)(B * IL)) : NULL;
    float *sums = has_mins ? malloc(sizeof(float) * (size_t)(M * B)) : NULL; /* da * sa, as act's */
    float *shares = has_mins ? malloc(sizeof(float) * (size_t)(M * IL)) : NULL; /* [m][r]: the minimums' share */
    if (!group || (has_mins && (!mins || !sums || !shares))) {
        free(group), free(mins), free(sums), free(shares);
        kquant_rows(kn, w, act, M, K, start * IL, end * IL < w->rows ? end * IL : w->rows, y, ldy);
        return;
    }
    for (int64_t i = 0; has_mins && i < M * B; i++) sums[i] = act->da[i] * (float)act->sa[i];
    for (int64_t g = start; g < end; g++) {
        legacy_group_to_int8(w->format, w->data, w->rows, g * IL, K, group, mins);
        const int64_t n = w->rows - g * IL < IL ? w->rows - g * IL : IL;
        run_groups(kn->group[FMT_INT8], kn->group_rows[FMT_INT8], NULL, (const uint8_t *)group, sizeof(block_q8_0x8), B,
                   act, M, K, n, y + g * IL, ldy, 0, 1, acc);
        if (has_mins) {
            min_shares(mins, sums, B, M, shares);
            for (int64_t m = 0; m < M; m++)
                for (int64_t r = 0; r < n; r++) y[m * ldy + g * IL + r] += shares[m * IL + r];
        }
    }
    free(group), free(mins), free(sums), free(shares);
}

/* y[M][rows] = x[M][K] @ W^T for Q4_1, Q5_0 or Q5_1 rows w (the file's blocks) on the int8
 * kernels (legacy_group_to_int8; for prompts, mistol.model.backend.INT8_MIN_ROWS: decode
 * steps read the blocks as they are). */
EXPORT int mistol_gemm_as_int8(int fmt, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t rows,
                               float *y, int64_t ldy, int nthreads, int impl) {
    if (fmt != FMT_Q4_1 && fmt != FMT_Q5_0 && fmt != FMT_Q5_1) return ERR_FMT;
    const mistol_matrix mat = {w, rows, 1, fmt};
    return gemm_run(x, M, K, 1, &mat, y, ldy, nthreads, impl, as_int8_share);
}

/* mistol_gemm_matrices for matrices of one packed format fmt (int8 or int4): W_i at
 * ws[i], ns[i] rows, in tiles of tbs[i] blocks. */
EXPORT int mistol_gemm_many(int fmt, const float *x, int64_t M, int64_t K, int count, const uint8_t *const *ws,
                            const int64_t *ns, const int64_t *tbs, float *y, int64_t ldy, int nthreads, int impl) {
    if (fmt != FMT_INT8 && fmt != FMT_INT4) return ERR_FMT;
    if (count < 0) return ERR_ARG;
    mistol_matrix *mats = malloc(sizeof(mistol_matrix) * (size_t)count + 1);
    if (!mats) return ERR_NOMEM;
    for (int i = 0; i < count; i++) mats[i] = (mistol_matrix){ws[i], ns[i], tbs[i], fmt};
    const int rc = mistol_gemm_matrices(x, M, K, count, mats, y, ldy, nthreads, impl);
    free(mats);
    return rc;
}
