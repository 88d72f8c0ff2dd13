/* Matrix products with weights in llama.cpp's k-quant (Q4_K, Q5_K, Q6_K) and legacy
 * (Q4_1, Q5_0, Q5_1) blocks, read in the file's own row order (kquant.h), so a mapped GGUF
 * tensor is used where it lies; Q4_K also as Q4_KX8, 8 rows interleaved, made at load.
 *
 * Each row's dot product runs super-block by super-block (k-quants: 256 inputs) or block
 * by block (legacy: 32) against the activation row quantized to int8 (per 256 or per 32,
 * kquant.h): the products of quants, activations and the 6/8-bit sub-block scales are
 * summed exactly in int32, and each super-block adds its sums into the fp32 result through
 * the same float operations (kq_add) in every implementation and layout; the legacy blocks
 * add theirs into 8 float lanes summed at the end in one fixed order. So the portable and
 * the AVX2 kernels give the same bits.
 *
 * Row by row, a super-block's 8-16 sub-block scales are applied lane by lane inside the
 * integer sums (a shuffle and a multiply-add per 32 inputs), which costs 2-3x the int4
 * kernel's time per weight; Q4_KX8 applies each scale to 8 rows at once (one multiply-add
 * per 32 inputs of 8 rows) and runs as fast as int4. Q5_K, Q6_K and the legacy types still
 * run row by row.
 */

#include <math.h>
#include <stdlib.h>

#include "kquant.h"

/* ---------------------------------------------------------------------------------------
 * Formats
 */
int fmt_row_order(int fmt) { return fmt >= FMT_Q4_K && fmt < FMT_COUNT; }

int fmt_known(int fmt) { return fmt == FMT_INT8 || fmt == FMT_INT4 || fmt_row_order(fmt); }

int64_t fmt_k_multiple(int fmt) {
    return fmt == FMT_Q4_K || fmt == FMT_Q5_K || fmt == FMT_Q6_K || fmt == FMT_Q4_KX8 || fmt == FMT_Q6_KX8 ? QKK : QK;
}

int64_t fmt_row_bytes(int fmt, int64_t K) {
    switch (fmt) {
    case FMT_Q4_K: return K / QKK * (int64_t)sizeof(block_q4_K);
    case FMT_Q5_K: return K / QKK * (int64_t)sizeof(block_q5_K);
    case FMT_Q6_K: return K / QKK * (int64_t)sizeof(block_q6_K);
    case FMT_Q4_1: return K / QK * (int64_t)sizeof(block_q4_1);
    case FMT_Q5_0: return K / QK * (int64_t)sizeof(block_q5_0);
    case FMT_Q5_1: return K / QK * (int64_t)sizeof(block_q5_1);
    case FMT_Q4_KX8: return K / QKK * (int64_t)sizeof(block_q4_Kx8) / 8; /* (per row of a group) */
    case FMT_Q6_KX8: return K / QKK * (int64_t)sizeof(block_q6_Kx8) / 8;
    default: return 0;
    }
}

int act_needs(const mistol_matrix *mats, int count) {
    int needs = 0;
    for (int i = 0; i < count; i++) needs |= fmt_k_multiple(mats[i].format) == QKK ? ACT_256 : ACT_32;
    return needs;
}

/* ---------------------------------------------------------------------------------------
 * Activations per 256: d = max|x| / 127, q = round(x / d) half to even (as quant_gemv.c's
 * per-32 quantizer), and the sums of q per 16.
 */
static void quantize_k_scalar(const float *x, int64_t K, int8_t *q, float *d, int32_t *s) {
    for (int64_t b = 0; b < K / QKK; b++) {
        const float *xb = x + b * QKK;
        float amax = 0.0f;
        for (int j = 0; j < QKK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
        for (int g = 0; g < QKK / 16; g++) {
            int32_t sum = 0;
            for (int j = 16 * g; j < 16 * g + 16; j++) {
                const int v = (int)nearbyintf(xb[j] * id);
                q[b * QKK + j] = (int8_t)v;
                sum += v;
            }
            s[b * 16 + g] = sum;
        }
        d[b] = db;
    }
}

#ifdef MISTOL_X86
AVX2_FN static void quantize_k_avx2(const float *x, int64_t K, int8_t *q, float *d, int32_t *s) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    enum { rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }; /* a constant expression, as clang requires */
    for (int64_t b = 0; b < K / QKK; b++) {
        const float *xb = x + b * QKK;
        __m256 m = _mm256_setzero_ps();
        for (int j = 0; j < QKK; j += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(xb + j), absmask));
        const float amax = hmax_ps(m);
        const float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
        const __m256 vid = _mm256_set1_ps(id);
        for (int j = 0; j < QKK; j += 32) {
            __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xb + j), vid), rnd));
            __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xb + j + 8), vid), rnd));
            __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xb + j + 16), vid), rnd));
            __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xb + j + 24), vid), rnd));
            s[b * 16 + j / 16] = hsum_epi32(_mm256_add_epi32(i0, i1));
            s[b * 16 + j / 16 + 1] = hsum_epi32(_mm256_add_epi32(i2, i3));
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
            _mm256_storeu_si256((__m256i *)(q + b * QKK + j), _mm256_permutevar8x32_epi32(p, perm));
        }
        d[b] = db;
    }
}
#endif

void act_quantize(const qkernels *kn, const float *x, int64_t K, int64_t m, int64_t e0, int64_t e1, int needs,
                  const qact *act) {
    if (e1 <= e0) return;
    if (needs & ACT_32)
        kn->quant(x + e0, e1 - e0, act->qa + m * K + e0, act->da + (m * K + e0) / QK, act->sa + (m * K + e0) / QK);
    if (needs & ACT_256)
        kn->kquant(x + e0, e1 - e0, act->qk + m * K + e0, act->dk + (m * K + e0) / QKK,
                   act->sk + (m * K + e0) / 16);
}

/* ---------------------------------------------------------------------------------------
 * How a (super-)block's exact integer sums enter the row's float sum: the same operations
 * in every implementation (the build has no FMA contraction), hence the same bits.
 */
static inline float kq_add(float acc, float d, float dmin, float da, int32_t sumi, int32_t summ) {
    return acc + ((d * da) * (float)sumi - (dmin * da) * (float)summ);
}


/* A Q4_K/Q5_K super-block's scales and mins, and sum_j m[j] * (activation sum of sub-block j). */
static inline int32_t scales_mins_k4(const uint8_t *packed, const int32_t *s16, int32_t *sc) {
    int32_t summ = 0;
    for (int j = 0; j < 8; j++) {
        int m;
        scale_min_k4(j, packed, &sc[j], &m);
        summ += m * (s16[2 * j] + s16[2 * j + 1]);
    }
    return summ;
}

/* Q6_K's offset of 32: 32 * sum_g sc[g] * (activation sum of group g). */
static inline int32_t q6_offset(const int8_t *sc, const int32_t *s16) {
    int32_t t = 0;
    for (int g = 0; g < 16; g++) t += sc[g] * s16[g];
    return 32 * t;
}

/* ---------------------------------------------------------------------------------------
 * Portable kernels
 */
static float dot_q4_K_scalar(const uint8_t *w, const int8_t *q, const float *d, const int32_t *s, int64_t K) {
    float acc = 0.0f;
    for (int64_t i = 0; i < K / QKK; i++) {
        const block_q4_K *b = (const block_q4_K *)w + i;
        const int8_t *a = q + i * QKK;
        int32_t sc[8], sumi = 0;
        const int32_t summ = scales_mins_k4(b->scales, s + i * 16, sc);
        for (int j = 0; j < 8; j++) {
            const uint8_t *qs = b->qs + 32 * (j / 2);
            const int shift = 4 * (j & 1);
            int32_t dot = 0;
            for (int l = 0; l < 32; l++) dot += ((qs[l] >> shift) & 15) * a[32 * j + l];
            sumi += sc[j] * dot;
        }
        acc = kq_add(acc, half_to_float(b->d), half_to_float(b->dmin), d[i], sumi, summ);
    }
    return acc;
}

static float dot_q5_K_scalar(const uint8_t *w, const int8_t *q, const float *d, const int32_t *s, int64_t K) {
    float acc = 0.0f;
    for (int64_t i = 0; i < K / QKK; i++) {
        const block_q5_K *b = (const block_q5_K *)w + i;
        const int8_t *a = q + i * QKK;
        int32_t sc[8], sumi = 0;
        const int32_t summ = scales_mins_k4(b->scales, s + i * 16, sc);
        for (int j = 0; j < 8; j++) {
            const uint8_t *qs = b->qs + 32 * (j / 2);
            const int shift = 4 * (j & 1);
            int32_t dot = 0;
            for (int l = 0; l < 32; l++) dot += (((qs[l] >> shift) & 15) | (((b->qh[l] >> j) & 1) << 4)) * a[32 * j + l];
            sumi += sc[j] * dot;
        }
        acc = kq_add(acc, half_to_float(b->d), half_to_float(b->dmin), d[i], sumi, summ);
    }
    return acc;
}

/* Element 128 h + 32 k + l of a Q6_K super-block (h: half, k: quarter of it), 0..63. */
static inline int q6_value(const block_q6_K *b, int h, int k, int l) {
    const uint8_t lo = b->ql[64 * h + 32 * (k & 1) + l] >> (4 * (k >> 1));
    return (lo & 15) | (((b->qh[32 * h + l] >> (2 * k)) & 3) << 4);
}

static float dot_q6_K_scalar(const uint8_t *w, const int8_t *q, const float *d, const int32_t *s, int64_t K) {
    float acc = 0.0f;
    for (int64_t i = 0; i < K / QKK; i++) {
        const block_q6_K *b = (const block_q6_K *)w + i;
        const int8_t *a = q + i * QKK;
        int32_t sumi = 0;
        for (int h = 0; h < 2; h++)
            for (int k = 0; k < 4; k++)
                for (int half = 0; half < 2; half++) { /* one group of 16 inputs, one scale */
                    int32_t dot = 0;
                    for (int l = 16 * half; l < 16 * half + 16; l++) dot += q6_value(b, h, k, l) * a[128 * h + 32 * k + l];
                    sumi += b->scales[8 * h + 2 * k + half] * dot;
                }
        sumi -= q6_offset(b->scales, s + i * 16);
        acc = kq_add(acc, half_to_float(b->d), 0.0f, d[i], sumi, 0);
    }
    return acc;
}

/* Q4_KX8: 8 rows at once, each row's sums and float steps exactly as dot_q4_K_scalar's. */
static void q4k_x8_scalar(const uint8_t *wg, const int8_t *q, const float *d, const int32_t *s, int64_t K,
                          float *out) {
    for (int r = 0; r < 8; r++) out[r] = 0.0f;
    for (int64_t i = 0; i < K / QKK; i++) {
        const block_q4_Kx8 *b = (const block_q4_Kx8 *)wg + i;
        const int8_t *a = q + i * QKK;
        const int32_t *s16 = s + i * 16;
        for (int r = 0; r < 8; r++) {
            int32_t sumi = 0, summ = 0;
            for (int j = 0; j < 8; j++) {
                int32_t dot = 0;
                for (int l = 0; l < 32; l++) {
                    const uint8_t byte = b->qs[j / 2][l / 4][r][l % 4];
                    dot += ((byte >> (4 * (j & 1))) & 15) * a[32 * j + l];
                }
                sumi += b->scales[j][r] * dot;
                summ += b->mins[j / 2][r][j % 2] * (s16[2 * j] + s16[2 * j + 1]);
            }
            out[r] = kq_add(out[r], half_to_float(b->d[r]), half_to_float(b->dmin[r]), d[i], sumi, summ);
        }
    }
}

/* Q6_KX8: 8 rows at once, each row's sums and float steps exactly as dot_q6_K_scalar's. */
static inline int q6x8_value(const block_q6_Kx8 *b, int r, int h, int k4, int l) { /* element 128h + 32 k4 + l */
    const uint8_t lo = b->ql[h][k4 & 1][l / 4][r][l % 4] >> (4 * (k4 >> 1));
    return (lo & 15) | (((b->qh[h][l / 4][r][l % 4] >> (2 * k4)) & 3) << 4);
}

static void q6k_x8_scalar(const uint8_t *wg, const int8_t *q, const float *d, const int32_t *s, int64_t K,
                          float *out) {
    for (int r = 0; r < 8; r++) out[r] = 0.0f;
    for (int64_t i = 0; i < K / QKK; i++) {
        const block_q6_Kx8 *b = (const block_q6_Kx8 *)wg + i;
        const int8_t *a = q + i * QKK;
        for (int r = 0; r < 8; r++) {
            int32_t sumi = 0, offset = 0;
            for (int h = 0; h < 2; h++)
                for (int k4 = 0; k4 < 4; k4++)
                    for (int half = 0; half < 2; half++) {
                        int32_t dot = 0;
                        for (int l = 16 * half; l < 16 * half + 16; l++) dot += q6x8_value(b, r, h, k4, l) * a[128 * h + 32 * k4 + l];
                        sumi += b->scales[8 * h + 2 * k4 + half][r] * dot;
                    }
            for (int g = 0; g < 16; g++) offset += b->scales[g][r] * s[i * 16 + g];
            out[r] = kq_add(out[r], half_to_float(b->d[r]), 0.0f, d[i], sumi - 32 * offset, 0);
        }
    }
}

/* Legacy 32-blocks. Each block adds its products into 8 float lanes (lane l: elements
 * 4l..4l+3, as one AVX2 vector holds them), scaled by d * da, and its min (or Q5_0's offset
 * of 16, as a min of -16 d) times the activation block's sum into one float; the lanes are
 * summed at the end in the order of hsum_ps. No per-block horizontal sum is needed that way. */
static inline uint32_t load_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

/* Block i's 32 quants in element order (0..15, or 0..31 with qh), its scale and its min. */
static inline void legacy_block(int fmt, const uint8_t *w, int64_t i, uint8_t v[QK], float *dw, float *mw) {
    const uint8_t *qs;
    uint32_t qh = 0;
    if (fmt == FMT_Q4_1) {
        const block_q4_1 *b = (const block_q4_1 *)w + i;
        qs = b->qs, *dw = half_to_float(b->d), *mw = half_to_float(b->m);
    } else if (fmt == FMT_Q5_0) {
        const block_q5_0 *b = (const block_q5_0 *)w + i;
        qs = b->qs, *dw = half_to_float(b->d), *mw = -16.0f * *dw, qh = load_u32(b->qh);
    } else {
        const block_q5_1 *b = (const block_q5_1 *)w + i;
        qs = b->qs, *dw = half_to_float(b->d), *mw = half_to_float(b->m), qh = load_u32(b->qh);
    }
    for (int j = 0; j < QK / 2; j++) {
        v[j] = (uint8_t)((qs[j] & 15) | (((qh >> j) & 1) << 4));
        v[j + QK / 2] = (uint8_t)((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4));
    }
}

static inline float lanes_sum(const float l[8]) { /* hsum_ps's order */
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

static float dot_legacy_scalar(int fmt, const uint8_t *w, const int8_t *q, const float *d, const int32_t *s,
                               int64_t K) {
    float lanes[8] = {0}, mins = 0.0f;
    for (int64_t i = 0; i < K / QK; i++) {
        uint8_t v[QK];
        float dw, mw;
        legacy_block(fmt, w, i, v, &dw, &mw);
        const int8_t *a = q + i * QK;
        const float scale = dw * d[i];
        for (int l = 0; l < 8; l++) {
            int32_t t = 0;
            for (int e = 4 * l; e < 4 * l + 4; e++) t += v[e] * a[e];
            lanes[l] = lanes[l] + (float)t * scale;
        }
        mins = mins + (mw * d[i]) * (float)s[i];
    }
    return lanes_sum(lanes) + mins;
}

static float dot_q4_1_scalar(const uint8_t *w, const int8_t *q, const float *d, const int32_t *s, int64_t K) {
    return dot_legacy_scalar(FMT_Q4_1, w, q, d, s, K);
}
static float dot_q5_0_scalar(const uint8_t *w, const int8_t *q, const float *d, const int32_t *s, int64_t K) {
    return dot_legacy_scalar(FMT_Q5_0, w, q, d, s, K);
}
static float dot_q5_1_scalar(const uint8_t *w, const int8_t *q, const float *d, const int32_t *s, int64_t K) {
    return dot_legacy_scalar(FMT_Q5_1, w, q, d, s, K);
}

/* ---------------------------------------------------------------------------------------
 * AVX2 kernels: each (super-)block's integer sums in one vector of int32 lanes, reduced
 * once per block; then the same float step as above.
 */
#ifdef MISTOL_X86
#define LOAD256(p) _mm256_loadu_si256((const __m256i *)(p))
static inline int32_t load_i32(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return v; }
#define BCAST4(a, j) _mm256_set1_epi32(load_i32((a) + (j)))

/* 32 unsigned quants (< 64) times 32 activations, each pair's product sum weighted by the
 * int16 lane of `scales` it falls on: int32 lanes */
AVX2_FN static inline __m256i dot32_scaled(__m256i w, const int8_t *a, __m256i scales) {
    const __m256i p = _mm256_maddubs_epi16(w, LOAD256(a)); /* pairs: at most 2 * 63 * 127 */
    return _mm256_madd_epi16(p, scales);
}

/* The 8 sub-block scales of a Q4_K/Q5_K super-block as int16 in both 128-bit lanes (the
 * 12 packed bytes read as three 32-bit words; the same values as scale_min_k4). */
AVX2_FN static inline __m256i scales_k4_avx2(const uint8_t *packed) {
    uint32_t u[3];
    memcpy(u, packed, 12);
    const uint32_t lo = u[0] & 0x3f3f3f3f, hi = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
    return _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_set_epi32(0, 0, (int)hi, (int)lo)));
}

/* The activation sums per 16 of one super-block as 16 int16 lanes, in order (each at most
 * 16 * 127 in magnitude). */
AVX2_FN static inline __m256i sums16_avx2(const int32_t *s16) {
    return _mm256_permute4x64_epi64(_mm256_packs_epi32(LOAD256(s16), LOAD256(s16 + 8)), 0xd8);
}

/* Lane j: m[j] * (activation sums 2j and 2j + 1), for the mins of a Q4_K/Q5_K super-block. */
AVX2_FN static inline __m256i mins_k4_avx2(const uint8_t *packed, const int32_t *s16) {
    uint32_t u[3];
    memcpy(u, packed, 12);
    const uint32_t lo = u[1] & 0x3f3f3f3f, hi = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
    const __m128i m8 = _mm_set_epi32(0, 0, (int)hi, (int)lo);
    return _mm256_madd_epi16(sums16_avx2(s16), _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m8, m8)));
}

/* The sums of the lanes of a and of b. */
AVX2_FN static inline void hsum2_epi32(__m256i a, __m256i b, int32_t *sa, int32_t *sb) {
    const __m256i h = _mm256_hadd_epi32(a, b); /* a01 a23 b01 b23 | a45 a67 b45 b67 */
    __m128i x = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    x = _mm_hadd_epi32(x, x);
    *sa = _mm_cvtsi128_si32(x), *sb = _mm_extract_epi32(x, 1);
}

/* Shuffles that spread int16 lane j of a 128-bit lane over all of its 8 lanes. */
#define SPREAD16(j) _mm256_set1_epi16((short)(((2 * (j) + 1) << 8) | (2 * (j))))

AVX2_FN static float dot_q4_K_avx2(const uint8_t *w, const int8_t *q, const float *d, const int32_t *s, int64_t K) {
    const __m256i m4 = _mm256_set1_epi8(15);
    float acc = 0.0f;
    for (int64_t i = 0; i < K / QKK; i++) {
        const block_q4_K *b = (const block_q4_K *)w + i;
        const int8_t *a = q + i * QKK;
        const __m256i scales = scales_k4_avx2(b->scales);
        __m256i sum0 = _mm256_setzero_si256(), sum1 = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            const __m256i v = LOAD256(b->qs + 32 * c);
            sum0 = _mm256_add_epi32(sum0, dot32_scaled(_mm256_and_si256(v, m4), a + 64 * c,
                                                       _mm256_shuffle_epi8(scales, SPREAD16(2 * c))));
            sum1 = _mm256_add_epi32(sum1, dot32_scaled(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), a + 64 * c + 32,
                                                       _mm256_shuffle_epi8(scales, SPREAD16(2 * c + 1))));
        }
        int32_t sumi, summ;
        hsum2_epi32(_mm256_add_epi32(sum0, sum1), mins_k4_avx2(b->scales, s + i * 16), &sumi, &summ);
        acc = kq_add(acc, _cvtsh_ss(b->d), _cvtsh_ss(b->dmin), d[i], sumi, summ);
    }
    return acc;
}

AVX2_FN static float dot_q5_K_avx2(const uint8_t *w, const int8_t *q, const float *d, const int32_t *s, int64_t K) {
    const __m256i m4 = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1);
    float acc = 0.0f;
    for (int64_t i = 0; i < K / QKK; i++) {
        const block_q5_K *b = (const block_q5_K *)w + i;
        const int8_t *a = q + i * QKK;
        const __m256i qh = LOAD256(b->qh), scales = scales_k4_avx2(b->scales);
        __m256i sum = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            const __m256i v = LOAD256(b->qs + 32 * c);
            /* bit 2c (2c + 1) of qh[l], moved to bit 4 */
            const __m256i h0 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * c)), one), 4);
            const __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * c + 1)), one), 4);
            const __m256i lo = _mm256_or_si256(_mm256_and_si256(v, m4), h0);
            const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), h1);
            sum = _mm256_add_epi32(sum, dot32_scaled(lo, a + 64 * c, _mm256_shuffle_epi8(scales, SPREAD16(2 * c))));
            sum = _mm256_add_epi32(sum, dot32_scaled(hi, a + 64 * c + 32, _mm256_shuffle_epi8(scales, SPREAD16(2 * c + 1))));
        }
        int32_t sumi, summ;
        hsum2_epi32(sum, mins_k4_avx2(b->scales, s + i * 16), &sumi, &summ);
        acc = kq_add(acc, _cvtsh_ss(b->d), _cvtsh_ss(b->dmin), d[i], sumi, summ);
    }
    return acc;
}

/* Shuffles that spread int16 lane 2k over the low 128-bit lane and 2k + 1 over the high one. */
#define SPREAD_PAIR(k) _mm256_set_m128i(_mm_set1_epi16((short)(((4 * (k) + 3) << 8) | (4 * (k) + 2))), \
                                        _mm_set1_epi16((short)(((4 * (k) + 1) << 8) | (4 * (k)))))

AVX2_FN static float dot_q6_K_avx2(const uint8_t *w, const int8_t *q, const float *d, const int32_t *s, int64_t K) {
    const __m256i m4 = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(3), m30 = _mm256_set1_epi8(0x30);
    float acc = 0.0f;
    for (int64_t i = 0; i < K / QKK; i++) {
        const block_q6_K *b = (const block_q6_K *)w + i;
        const int8_t *sc = b->scales;
        __m256i sum = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            const int8_t *a = q + i * QKK + 128 * h;
            /* scales 8h..8h+7 as int16 in both lanes; quarter k takes 2k (low lane), 2k + 1 (high) */
            const __m256i g = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)(sc + 8 * h))));
            const __m256i l0 = LOAD256(b->ql + 64 * h), l1 = LOAD256(b->ql + 64 * h + 32);
            const __m256i qh = LOAD256(b->qh + 32 * h);
            const __m256i q0 = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(qh, m3), 4));
            const __m256i q1 = _mm256_or_si256(_mm256_and_si256(l1, m4),
                                               _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m3), 4));
            const __m256i q2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(qh, m30));
            const __m256i q3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                               _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30));
            sum = _mm256_add_epi32(sum, dot32_scaled(q0, a, _mm256_shuffle_epi8(g, SPREAD_PAIR(0))));
            sum = _mm256_add_epi32(sum, dot32_scaled(q1, a + 32, _mm256_shuffle_epi8(g, SPREAD_PAIR(1))));
            sum = _mm256_add_epi32(sum, dot32_scaled(q2, a + 64, _mm256_shuffle_epi8(g, SPREAD_PAIR(2))));
            sum = _mm256_add_epi32(sum, dot32_scaled(q3, a + 96, _mm256_shuffle_epi8(g, SPREAD_PAIR(3))));
        }
        /* minus 32 * sum_g sc[g] * (activation sum of group g) */
        const __m256i offset = _mm256_madd_epi16(sums16_avx2(s + i * 16), _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)sc)));
        const int32_t sumi = hsum_epi32(_mm256_sub_epi32(sum, _mm256_slli_epi32(offset, 5)));
        acc = kq_add(acc, _cvtsh_ss(b->d), 0.0f, d[i], sumi, 0);
    }
    return acc;
}

/* Q4_KX8 on AVX2: lane r = row r throughout, as group_int4_avx2. Per sub-block the pair
 * sums of maddubs add up in int16 (8 quads: at most 8 * 2 * 15 * 127 = 30480), then one
 * madd applies each row's scale; the mins take one madd per pair of sub-blocks. The float
 * step is kq_add's, lane by lane. */
AVX2_FN static void q4k_x8_avx2(const uint8_t *wg, const int8_t *q, const float *d, const int32_t *s, int64_t K,
                                float *out) {
    const __m256i m4 = _mm256_set1_epi8(15);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < K / QKK; i++) {
        const block_q4_Kx8 *b = (const block_q4_Kx8 *)wg + i;
        const int8_t *a = q + i * QKK;
        const int32_t *s16 = s + i * 16;
        __m256i sumi = _mm256_setzero_si256(), summ = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
            for (int k = 0; k < 8; k++) {
                const __m256i v = LOAD256(b->qs[c][k]);
                lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(_mm256_and_si256(v, m4), BCAST4(a, 64 * c + 4 * k)));
                hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4),
                                                               BCAST4(a, 64 * c + 32 + 4 * k)));
            }
            /* each row's scale in its two int16 lanes */
            const __m128i sc_lo = _mm_loadl_epi64((const __m128i *)b->scales[2 * c]);
            const __m128i sc_hi = _mm_loadl_epi64((const __m128i *)b->scales[2 * c + 1]);
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(lo, _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(sc_lo, sc_lo))));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(hi, _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(sc_hi, sc_hi))));
            /* mins of sub-blocks 2c, 2c + 1 against those sub-blocks' activation sums */
            const uint32_t pair = ((uint32_t)(s16[4 * c + 2] + s16[4 * c + 3]) << 16) |
                                  ((uint32_t)(s16[4 * c] + s16[4 * c + 1]) & 0xffff);
            summ = _mm256_add_epi32(summ, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)b->mins[c])),
                                                            _mm256_set1_epi32((int)pair)));
        }
        const __m256 da = _mm256_set1_ps(d[i]);
        const __m256 dd = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b->d)), da);
        const __m256 dm = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b->dmin)), da);
        acc = _mm256_add_ps(acc, _mm256_sub_ps(_mm256_mul_ps(dd, _mm256_cvtepi32_ps(sumi)),
                                               _mm256_mul_ps(dm, _mm256_cvtepi32_ps(summ))));
    }
    _mm256_storeu_ps(out, acc);
}

/* The kernel reads a block's three parts (low bits of two halves, high bits) as three
 * interleaved streams, which the hardware prefetcher follows poorly (half of Q4_KX8's
 * GB/s on one core): ask for the whole next block while this one computes. */
#define PREFETCH_NEXT_BLOCK(b)                                                                     \
    for (size_t off = 0; off < sizeof(*(b)); off += 64) __builtin_prefetch((const char *)((b) + 1) + off)

/* Q6_KX8 on AVX2: lane r = row r. Two quads' pair sums add in int16 (at most
 * 2 * 2 * 63 * 127 = 32004) before each row's scale of their group applies by madd. */
AVX2_FN static void q6k_x8_avx2(const uint8_t *wg, const int8_t *q, const float *d, const int32_t *s, int64_t K,
                                float *out) {
    const __m256i m4 = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(3), m30 = _mm256_set1_epi8(0x30);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < K / QKK; i++) {
        const block_q6_Kx8 *b = (const block_q6_Kx8 *)wg + i;
        const int8_t *a = q + i * QKK;
        const int32_t *s16 = s + i * 16;
        PREFETCH_NEXT_BLOCK(b);
        __m256i sumi = _mm256_setzero_si256(), offset = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++)
            for (int kp = 0; kp < 4; kp++) {
                __m256i p[4];
                for (int u = 0; u < 2; u++) {
                    const int k = 2 * kp + u;
                    const __m256i A = LOAD256(b->ql[h][0][k]), B = LOAD256(b->ql[h][1][k]), H = LOAD256(b->qh[h][k]);
                    const __m256i q0 = _mm256_or_si256(_mm256_and_si256(A, m4), _mm256_slli_epi16(_mm256_and_si256(H, m3), 4));
                    const __m256i q1 = _mm256_or_si256(_mm256_and_si256(B, m4),
                                                       _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(H, 2), m3), 4));
                    const __m256i q2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(A, 4), m4), _mm256_and_si256(H, m30));
                    const __m256i q3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(B, 4), m4),
                                                       _mm256_and_si256(_mm256_srli_epi16(H, 2), m30));
                    const int8_t *ak = a + 128 * h + 4 * k;
                    const __m256i t0 = _mm256_maddubs_epi16(q0, BCAST4(ak, 0)), t1 = _mm256_maddubs_epi16(q1, BCAST4(ak, 32));
                    const __m256i t2 = _mm256_maddubs_epi16(q2, BCAST4(ak, 64)), t3 = _mm256_maddubs_epi16(q3, BCAST4(ak, 96));
                    if (u == 0) {
                        p[0] = t0, p[1] = t1, p[2] = t2, p[3] = t3;
                    } else {
                        p[0] = _mm256_add_epi16(p[0], t0), p[1] = _mm256_add_epi16(p[1], t1);
                        p[2] = _mm256_add_epi16(p[2], t2), p[3] = _mm256_add_epi16(p[3], t3);
                    }
                }
                for (int t = 0; t < 4; t++) { /* group 8h + 2t + (quads 4..7: the second 16) */
                    const __m128i sc = _mm_loadl_epi64((const __m128i *)b->scales[8 * h + 2 * t + kp / 2]);
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p[t], _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(sc, sc))));
                }
            }
        for (int g = 0; g < 16; g += 2) { /* sum_g sc[g] * (activation sum of group g), two groups a madd */
            const __m128i pair = _mm_unpacklo_epi8(_mm_loadl_epi64((const __m128i *)b->scales[g]),
                                                   _mm_loadl_epi64((const __m128i *)b->scales[g + 1]));
            const uint32_t bs = ((uint32_t)s16[g + 1] << 16) | ((uint32_t)s16[g] & 0xffff);
            offset = _mm256_add_epi32(offset, _mm256_madd_epi16(_mm256_cvtepi8_epi16(pair), _mm256_set1_epi32((int)bs)));
        }
        sumi = _mm256_sub_epi32(sumi, _mm256_slli_epi32(offset, 5));
        const __m256 dd = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b->d)), _mm256_set1_ps(d[i]));
        /* kq_add with dmin 0: x - 0 * 0 is x, bit for bit */
        acc = _mm256_add_ps(acc, _mm256_mul_ps(dd, _mm256_cvtepi32_ps(sumi)));
    }
    _mm256_storeu_ps(out, acc);
}

/* Legacy blocks: 16 bytes of nibbles (element j low, j + 16 high) as 32 unsigned quants
 * in element order, plus each element's 5th bit from qh where the type has one. */
AVX2_FN static inline __m256i nibbles32(const uint8_t *qs) {
    const __m128i v = _mm_loadu_si128((const __m128i *)qs);
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
    return _mm256_and_si256(both, _mm256_set1_epi8(15));
}

AVX2_FN static inline __m256i fifth_bits(uint32_t qh) { /* byte j = bit j of qh, times 16 */
    const __m256i shuf = _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL, 0x0303030303030303LL);
    const __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), shuf);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit), _mm256_set1_epi8(16));
}

/* One block's 8 lanes of integer sums (lane l: elements 4l..4l+3) */
AVX2_FN static inline __m256i lanes32(__m256i w, const int8_t *a) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, LOAD256(a)), _mm256_set1_epi16(1));
}

#define DEFINE_LEGACY_AVX2(NAME, TYPE, QUANTS, MIN)                                                            \
    AVX2_FN static float NAME(const uint8_t *w, const int8_t *q, const float *d, const int32_t *s, int64_t K) { \
        __m256 lanes = _mm256_setzero_ps();                                                                    \
        float mins = 0.0f;                                                                                     \
        for (int64_t i = 0; i < K / QK; i++) {                                                                 \
            const TYPE *b = (const TYPE *)w + i;                                                               \
            const float dw = _cvtsh_ss(b->d), mw = MIN;                                                        \
            const __m256 t = _mm256_cvtepi32_ps(lanes32(QUANTS, q + i * QK));                                  \
            lanes = _mm256_add_ps(lanes, _mm256_mul_ps(t, _mm256_set1_ps(dw * d[i])));                         \
            mins = mins + (mw * d[i]) * (float)s[i];                                                           \
        }                                                                                                      \
        return hsum_ps(lanes) + mins;                                                                          \
    }

DEFINE_LEGACY_AVX2(dot_q4_1_avx2, block_q4_1, nibbles32(b->qs), _cvtsh_ss(b->m))
DEFINE_LEGACY_AVX2(dot_q5_0_avx2, block_q5_0, _mm256_or_si256(nibbles32(b->qs), fifth_bits(load_u32(b->qh))),
                   -16.0f * dw)
DEFINE_LEGACY_AVX2(dot_q5_1_avx2, block_q5_1, _mm256_or_si256(nibbles32(b->qs), fifth_bits(load_u32(b->qh))),
                   _cvtsh_ss(b->m))
#endif

/* ---------------------------------------------------------------------------------------
 * Selection and the driver
 */
void kquant_select(int impl, qkernels *out) {
    if (impl == IMPL_AUTO) impl = best_impl();
    out->kquant = quantize_k_scalar;
    out->q4k_x8 = q4k_x8_scalar;
    out->q6k_x8 = q6k_x8_scalar;
    out->rowdot[FMT_Q4_K] = dot_q4_K_scalar, out->rowdot[FMT_Q5_K] = dot_q5_K_scalar;
    out->rowdot[FMT_Q6_K] = dot_q6_K_scalar, out->rowdot[FMT_Q4_1] = dot_q4_1_scalar;
    out->rowdot[FMT_Q5_0] = dot_q5_0_scalar, out->rowdot[FMT_Q5_1] = dot_q5_1_scalar;
#ifdef MISTOL_X86
    if (impl == IMPL_AVX2 || impl == IMPL_VNNI) { /* (no VNNI gain measured yet: the same AVX2 code) */
        out->kquant = quantize_k_avx2;
        out->q4k_x8 = q4k_x8_avx2;
        out->q6k_x8 = q6k_x8_avx2;
        out->rowdot[FMT_Q4_K] = dot_q4_K_avx2, out->rowdot[FMT_Q5_K] = dot_q5_K_avx2;
        out->rowdot[FMT_Q6_K] = dot_q6_K_avx2, out->rowdot[FMT_Q4_1] = dot_q4_1_avx2;
        out->rowdot[FMT_Q5_0] = dot_q5_0_avx2, out->rowdot[FMT_Q5_1] = dot_q5_1_avx2;
    }
#endif
}

#define ROW_CHUNK 16 /* rows whose blocks stay in cache while several activation rows pass */

void kquant_rows(const qkernels *kn, const mistol_matrix *w, const qact *act, int64_t M, int64_t K, int64_t r0,
                 int64_t r1, float *y, int64_t ldy) {
    if (w->format == FMT_Q4_KX8 || w->format == FMT_Q6_KX8) { /* groups of 8 rows (r0 is a multiple of 8) */
        const int64_t gb = 8 * fmt_row_bytes(w->format, K);
        float out[8];
        for (int64_t g = r0 / 8; g * 8 < r1; g++)
            for (int64_t m = 0; m < M; m++) {
                (w->format == FMT_Q4_KX8 ? kn->q4k_x8 : kn->q6k_x8)(w->data + g * gb, act->qk + m * K, act->dk + m * (K / QKK), act->sk + m * (K / 16), K, out);
                for (int64_t r = g * 8; r < g * 8 + 8 && r < r1; r++) y[m * ldy + r] = out[r - g * 8];
            }
        return;
    }
    const rowdot_fn dot = kn->rowdot[w->format];
    const int64_t rb = fmt_row_bytes(w->format, K);
    const int per256 = fmt_k_multiple(w->format) == QKK;
    const int8_t *q = per256 ? act->qk : act->qa;
    const float *d = per256 ? act->dk : act->da;
    const int32_t *s = per256 ? act->sk : act->sa;
    const int64_t nd = per256 ? K / QKK : K / QK, ns = per256 ? K / 16 : K / QK;
    for (int64_t c0 = r0; c0 < r1; c0 += ROW_CHUNK) {
        const int64_t c1 = c0 + ROW_CHUNK < r1 ? c0 + ROW_CHUNK : r1;
        for (int64_t m = 0; m < M; m++)
            for (int64_t r = c0; r < c1; r++) y[m * ldy + r] = dot(w->data + r * rb, q + m * K, d + m * nd, s + m * ns, K);
    }
}

/* ---------------------------------------------------------------------------------------
 * Dequantization (prefill multiplies dequantized tiles; tests read the values)
 */
/* (inlined into a portable and an AVX2 copy of the loops below: mistol_dequantize_rows) */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* One super-block's values from its quants laid out as in the file (Q4_K/Q5_K: qs[128],
 * qh[32] or NULL; Q6_K: ql[128], qh[64]) and its scales unpacked to bytes. Loops over
 * runs of 16-32 elements with one scale each, which the compiler vectorizes (a per-element
 * index, as in q6_value, does not: 5-10x slower). The float operations are those of the
 * kernels' reference: (d * scale) * q - dmin * min. */
ALWAYS_INLINE void dequantize_k4_block(const uint8_t *qs, const uint8_t *qh, const uint8_t *sc, const uint8_t *mn, float dd,
                                float dm, float *out) {
    for (int j = 0; j < 8; j++) {
        const float d1 = dd * (float)sc[j], m1 = dm * (float)mn[j];
        const uint8_t *q = qs + 32 * (j / 2);
        const int shift = 4 * (j & 1);
        float *o = out + 32 * j;
        if (qh)
            for (int l = 0; l < 32; l++) o[l] = d1 * (float)(((q[l] >> shift) & 15) | (((qh[l] >> j) & 1) << 4)) - m1;
        else
            for (int l = 0; l < 32; l++) o[l] = d1 * (float)((q[l] >> shift) & 15) - m1;
    }
}

ALWAYS_INLINE void dequantize_q6k_block(const uint8_t *ql, const uint8_t *qh, const int8_t *sc, float dd, float *out) {
    for (int h = 0; h < 2; h++)
        for (int k = 0; k < 4; k++) {
            const uint8_t *lo = ql + 64 * h + 32 * (k & 1), *hi = qh + 32 * h;
            const int lshift = 4 * (k >> 1), hshift = 2 * k;
            for (int half = 0; half < 2; half++) {
                const float d1 = dd * (float)sc[8 * h + 2 * k + half];
                float *o = out + 128 * h + 32 * k + 16 * half;
                for (int l = 16 * half; l < 16 * half + 16; l++)
                    o[l - 16 * half] = d1 * (float)((((lo[l] >> lshift) & 15) | (((hi[l] >> hshift) & 3) << 4)) - 32);
            }
        }
}

/* Row `lane` of a Q4_KX8 / Q6_KX8 group -> out[K]: the lane's bytes gathered back into
 * the file's order, then the row formats' code (the same float operations). */
ALWAYS_INLINE void dequantize_row_q4k_x8(const uint8_t *group, int lane, int64_t K, float *out) {
    uint8_t qs[128], sc[8], mn[8];
    for (int64_t i = 0; i < K / QKK; i++, out += QKK) {
        const block_q4_Kx8 *b = (const block_q4_Kx8 *)group + i;
        for (int j = 0; j < 8; j++) sc[j] = b->scales[j][lane], mn[j] = b->mins[j / 2][lane][j % 2];
        for (int c = 0; c < 4; c++)
            for (int k = 0; k < 8; k++) memcpy(qs + 32 * c + 4 * k, b->qs[c][k][lane], 4);
        dequantize_k4_block(qs, NULL, sc, mn, half_to_float(b->d[lane]), half_to_float(b->dmin[lane]), out);
    }
}

ALWAYS_INLINE void dequantize_row_q6k_x8(const uint8_t *group, int lane, int64_t K, float *out) {
    uint8_t ql[128], qh[64];
    int8_t sc[16];
    for (int64_t i = 0; i < K / QKK; i++, out += QKK) {
        const block_q6_Kx8 *b = (const block_q6_Kx8 *)group + i;
        for (int g = 0; g < 16; g++) sc[g] = b->scales[g][lane];
        for (int h = 0; h < 2; h++)
            for (int k = 0; k < 8; k++) {
                memcpy(ql + 64 * h + 4 * k, b->ql[h][0][k][lane], 4);
                memcpy(ql + 64 * h + 32 + 4 * k, b->ql[h][1][k][lane], 4);
                memcpy(qh + 32 * h + 4 * k, b->qh[h][k][lane], 4);
            }
        dequantize_q6k_block(ql, qh, sc, half_to_float(b->d[lane]), out);
    }
}

/* Q6_K rows w[rows][K] -> Q6_KX8 groups out[ceil(rows / 8)][K / 256] (padding rows zero).
 * Returns 0 or a negative error. */
EXPORT int mistol_repack_q6_k_x8(const uint8_t *w, int64_t rows, int64_t K, uint8_t *out) {
    if (K <= 0 || K % QKK) return ERR_K;
    if (rows < 0) return ERR_ARG;
    const int64_t nb = K / QKK, groups = (rows + 7) / 8;
    memset(out, 0, (size_t)(groups * nb) * sizeof(block_q6_Kx8));
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < nb; i++) {
            const block_q6_K *src = (const block_q6_K *)(w + r * nb * (int64_t)sizeof(block_q6_K)) + i;
            block_q6_Kx8 *dst = (block_q6_Kx8 *)out + (r / 8) * nb + i;
            const int lane = (int)(r % 8);
            dst->d[lane] = src->d;
            for (int g = 0; g < 16; g++) dst->scales[g][lane] = src->scales[g];
            for (int h = 0; h < 2; h++)
                for (int k = 0; k < 8; k++) {
                    memcpy(dst->ql[h][0][k][lane], src->ql + 64 * h + 4 * k, 4);
                    memcpy(dst->ql[h][1][k][lane], src->ql + 64 * h + 32 + 4 * k, 4);
                    memcpy(dst->qh[h][k][lane], src->qh + 32 * h + 4 * k, 4);
                }
        }
    return OK;
}

/* Q4_K rows w[rows][K] -> Q4_KX8 groups out[ceil(rows / 8)][K / 256] (padding rows zero).
 * Returns 0 or a negative error. */
EXPORT int mistol_repack_q4_k_x8(const uint8_t *w, int64_t rows, int64_t K, uint8_t *out) {
    if (K <= 0 || K % QKK) return ERR_K;
    if (rows < 0) return ERR_ARG;
    const int64_t nb = K / QKK, groups = (rows + 7) / 8;
    memset(out, 0, (size_t)(groups * nb) * sizeof(block_q4_Kx8));
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < nb; i++) {
            const block_q4_K *src = (const block_q4_K *)(w + r * nb * (int64_t)sizeof(block_q4_K)) + i;
            block_q4_Kx8 *dst = (block_q4_Kx8 *)out + (r / 8) * nb + i;
            const int lane = (int)(r % 8);
            dst->d[lane] = src->d, dst->dmin[lane] = src->dmin;
            for (int j = 0; j < 8; j++) {
                int sc, m;
                scale_min_k4(j, src->scales, &sc, &m);
                dst->scales[j][lane] = (uint8_t)sc, dst->mins[j / 2][lane][j % 2] = (uint8_t)m;
            }
            for (int c = 0; c < 4; c++)
                for (int k = 0; k < 8; k++) memcpy(dst->qs[c][k][lane], src->qs + 32 * c + 4 * k, 4);
        }
    return OK;
}

ALWAYS_INLINE void dequantize_row(int fmt, const uint8_t *row, int64_t K, float *out) {
    if (fmt == FMT_Q4_K || fmt == FMT_Q5_K) {
        for (int64_t i = 0; i < K / QKK; i++, out += QKK) {
            const block_q4_K *b4 = (const block_q4_K *)row + i;
            const block_q5_K *b5 = (const block_q5_K *)row + i;
            const uint8_t *scales = fmt == FMT_Q4_K ? b4->scales : b5->scales;
            uint8_t sc[8], mn[8];
            for (int j = 0; j < 8; j++) {
                int s6, m6;
                scale_min_k4(j, scales, &s6, &m6);
                sc[j] = (uint8_t)s6, mn[j] = (uint8_t)m6;
            }
            if (fmt == FMT_Q4_K)
                dequantize_k4_block(b4->qs, NULL, sc, mn, half_to_float(b4->d), half_to_float(b4->dmin), out);
            else
                dequantize_k4_block(b5->qs, b5->qh, sc, mn, half_to_float(b5->d), half_to_float(b5->dmin), out);
        }
    } else if (fmt == FMT_Q6_K) {
        for (int64_t i = 0; i < K / QKK; i++, out += QKK) {
            const block_q6_K *b = (const block_q6_K *)row + i;
            dequantize_q6k_block(b->ql, b->qh, b->scales, half_to_float(b->d), out);
        }
    } else {
        for (int64_t i = 0; i < K / QK; i++, out += QK) {
            const uint8_t *qs;
            uint32_t qh = 0;
            float dd, m = 0.0f;
            int offset = 0;
            if (fmt == FMT_Q4_1) {
                const block_q4_1 *b = (const block_q4_1 *)row + i;
                qs = b->qs, dd = half_to_float(b->d), m = half_to_float(b->m);
            } else if (fmt == FMT_Q5_0) {
                const block_q5_0 *b = (const block_q5_0 *)row + i;
                qs = b->qs, dd = half_to_float(b->d), qh = load_u32(b->qh), offset = 16;
            } else {
                const block_q5_1 *b = (const block_q5_1 *)row + i;
                qs = b->qs, dd = half_to_float(b->d), m = half_to_float(b->m), qh = load_u32(b->qh);
            }
            for (int j = 0; j < QK / 2; j++) /* (two loops of one shift pattern each vectorize) */
                out[j] = dd * (float)(((qs[j] & 15) | (int)(((qh >> j) & 1) << 4)) - offset) + m;
            for (int j = 0; j < QK / 2; j++)
                out[j + QK / 2] = dd * (float)(((qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1) << 4)) - offset) + m;
        }
    }
}

void kquant_dequantize_row(int fmt, const uint8_t *row, int64_t K, float *out) { dequantize_row(fmt, row, K, out); }

typedef uint32_t __attribute__((may_alias)) uint32_alias;

/* Rows [r0, r1) (buf: K floats of scratch for bfloat16 output). */
ALWAYS_INLINE void dequantize_rows_body(int fmt, const uint8_t *w, int64_t r0, int64_t r1, int64_t K, void *out,
                                        int out_type, float *buf) {
    const int64_t rb = fmt_row_bytes(fmt, K), gb = 8 * rb; /* (gb: the x8 layouts' group bytes) */
    for (int64_t r = r0; r < r1; r++) {
        float *dst = out_type == DT_F32 ? (float *)out + r * K : buf;
        if (fmt == FMT_Q4_KX8)
            dequantize_row_q4k_x8(w + r / 8 * gb, (int)(r % 8), K, dst);
        else if (fmt == FMT_Q6_KX8)
            dequantize_row_q6k_x8(w + r / 8 * gb, (int)(r % 8), K, dst);
        else
            dequantize_row(fmt, w + r * rb, K, dst);
        if (out_type == DT_F32) continue;
        uint16_t *o = (uint16_t *)out + r * K;
        const uint32_alias *bits = (const uint32_alias *)buf; /* (a loop the compiler vectorizes) */
        for (int64_t k = 0; k < K; k++) o[k] = (uint16_t)((bits[k] + 0x7fff + ((bits[k] >> 16) & 1)) >> 16);
    }
}

static void dequantize_rows_portable(int fmt, const uint8_t *w, int64_t r0, int64_t r1, int64_t K, void *out,
                                     int out_type, float *buf) {
    dequantize_rows_body(fmt, w, r0, r1, K, out, out_type, buf);
}

#ifdef MISTOL_X86
/* The same loops vectorized 8 wide: 1.5-2x the portable copy (SSE2) on the k-quants. */
AVX2_FN static void dequantize_rows_avx2(int fmt, const uint8_t *w, int64_t r0, int64_t r1, int64_t K, void *out,
                                         int out_type, float *buf) {
    dequantize_rows_body(fmt, w, r0, r1, K, out, out_type, buf);
}
#endif

/* rows x K of row-order format fmt -> out [rows][K], float32 or bfloat16 (rounded to
 * nearest even). Returns 0 or a negative error. */
EXPORT int mistol_dequantize_rows(int fmt, const uint8_t *w, int64_t rows, int64_t K, void *out, int out_type,
                                  int nthreads) {
    if (!fmt_row_order(fmt)) return ERR_FMT;
    if (K <= 0 || K % fmt_k_multiple(fmt) != 0) return ERR_K;
    if (rows < 0 || (out_type != DT_F32 && out_type != DT_BF16)) return ERR_ARG;
    void (*run)(int, const uint8_t *, int64_t, int64_t, int64_t, void *, int, float *) = dequantize_rows_portable;
#ifdef MISTOL_X86
    if (cpu_has_avx2()) run = dequantize_rows_avx2;
#endif
    int failed = 0;
    if (nthreads < 1) nthreads = 1;
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && rows * K > (1 << 16))
#endif
    {
        float *buf = out_type == DT_F32 ? NULL : malloc(sizeof(float) * (size_t)K);
        int64_t r0, r1;
        thread_share(rows, &r0, &r1);
        if (out_type == DT_BF16 && !buf) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            failed = 1;
            r1 = r0;
        }
        run(fmt, w, r0, r1, K, out, out_type, buf);
        free(buf);
    }
    return failed ? ERR_NOMEM : OK;
}
