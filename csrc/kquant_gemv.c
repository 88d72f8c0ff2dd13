/* Matrix products with weights in llama.cpp's k-quant (Q4_K, Q5_K, Q6_K) and legacy
 * (Q4_1, Q5_0, Q5_1) blocks, read in the file's own row order (kquant.h), so a mapped GGUF
 * tensor is used where it lies; Q4_K, Q5_K and Q6_K also as Q4_KX8, Q5_KX8 and Q6_KX8, 8 rows
 * interleaved, made at load.
 *
 * Each row's dot product runs super-block by super-block (k-quants: 256 inputs) or block
 * by block (legacy: 32) against the activation row quantized to int8 (per 256 or per 32,
 * kquant.h): the products of quants, activations and the 6/8-bit sub-block scales are
 * summed exactly in int32, and each super-block adds its sums into the fp32 result through
 * the same float operations (kq_add) in every implementation and layout; the legacy blocks
 * add theirs into 8 float lanes summed at the end in one fixed order. So the portable, the
 * AVX2 and the NEON kernels (with and without ARM's dot products) give the same bits.
 *
 * Row by row, a super-block's 8-16 sub-block scales are applied lane by lane inside the
 * integer sums (a shuffle and a multiply-add per 32 inputs), which costs 2-3x the int4
 * kernel's time per weight; Q4_KX8 applies each scale to 8 rows at once (one multiply-add
 * per 32 inputs of 8 rows) and runs as fast as int4; Q5_KX8 and Q6_KX8 the same way. The
 * k-quants where they are not repacked run row by row; the legacy types too, but several
 * activation rows share each weight row's unpacked blocks (DEFINE_LEGACY_ROWS_*).
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
    return fmt == FMT_Q4_K || fmt == FMT_Q5_K || fmt == FMT_Q6_K || fmt == FMT_Q4_KX8 || fmt == FMT_Q5_KX8 ||
                   fmt == FMT_Q6_KX8
               ? QKK
               : QK;
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
    case FMT_Q5_KX8: return K / QKK * (int64_t)sizeof(block_q5_Kx8) / 8;
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
        int has_nan = 0;
        for (int j = 0; j < QKK; j++) amax = fmaxf(amax, fabsf(xb[j])), has_nan |= xb[j] != xb[j];
        const float db = act_block_scale(amax, has_nan), id = db != 0.0f ? 1.0f / db : 0.0f;
        for (int g = 0; g < QKK / 16; g++) {
            int32_t sum = 0;
            for (int j = 16 * g; j < 16 * g + 16; j++) {
                const int v = round_act(xb[j] * id);
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

void act_row_to_blocks(const int8_t *q, int64_t m, int64_t M, int64_t K, int8_t *qkb) {
    for (int64_t i = 0; i < K / QKK; i++) memcpy(qkb + (i * M + m) * QKK, q + i * QKK, QKK);
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

/* Q5_KX8: 8 rows at once, each row's sums and float steps exactly as dot_q5_K_scalar's. */
static inline int q5x8_value(const block_q5_Kx8 *b, int r, int j, int l) { /* sub-block j's element l */
    const q5_kx8_half *h = &b->q[j / 2][l / 16];
    const int u = (l % 16) / 4, i = l % 4;
    if (j % 2 == 0) return h->qs[u][r][i] & 31;
    return (h->qs[u][r][i] >> 5) | (((h->qh[r][i] >> (2 * u)) & 3) << 3);
}

static void q5k_x8_scalar(const uint8_t *wg, const int8_t *q, const float *d, const int32_t *s, int64_t K,
                          float *out) {
    for (int r = 0; r < 8; r++) out[r] = 0.0f;
    for (int64_t i = 0; i < K / QKK; i++) {
        const block_q5_Kx8 *b = (const block_q5_Kx8 *)wg + i;
        const int8_t *a = q + i * QKK;
        const int32_t *s16 = s + i * 16;
        for (int r = 0; r < 8; r++) {
            int32_t sumi = 0, summ = 0;
            for (int j = 0; j < 8; j++) {
                int32_t dot = 0;
                for (int l = 0; l < 32; l++) dot += q5x8_value(b, r, j, l) * a[32 * j + l];
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
 * 4l..4l+3, as one AVX2 vector holds them), scaled by d * da, even blocks into one set of
 * lanes and odd blocks into another (two chains of adds, not one); and its min (or Q5_0's
 * offset of 16, as a min of -16 d) times the activation block's sum into lane i mod 8 of a
 * third set (so that SIMD code computes eight blocks' mins at once). At the end the even and
 * odd lanes are added lane by lane, and each set is summed in the order of hsum_ps. No
 * per-block horizontal sum is needed that way. */

/* Block i's fields, whatever its type: its nibbles, its 5th bits (0 for Q4_1), its fp16
 * scale d and min m (0 for Q5_0, whose quants are offset by 16 instead). */
typedef struct {
    const uint8_t *qs;
    uint32_t qh;
    uint16_t d, m;
} legacy_view;

static inline legacy_view legacy_at(int fmt, const uint8_t *w, int64_t i) {
    if (fmt == FMT_Q4_1) {
        const block_q4_1 *b = (const block_q4_1 *)w + i;
        return (legacy_view){b->qs, 0, b->d, b->m};
    }
    if (fmt == FMT_Q5_0) {
        const block_q5_0 *b = (const block_q5_0 *)w + i;
        return (legacy_view){b->qs, load_u32(b->qh), b->d, 0};
    }
    const block_q5_1 *b = (const block_q5_1 *)w + i;
    return (legacy_view){b->qs, load_u32(b->qh), b->d, b->m};
}

/* A block's 32 quants in element order (0..15, or 0..31 with qh). */
static inline void legacy_quants(const legacy_view *b, uint8_t v[QK]) {
    for (int j = 0; j < QK / 2; j++) {
        v[j] = (uint8_t)((b->qs[j] & 15) | (((b->qh >> j) & 1) << 4));
        v[j + QK / 2] = (uint8_t)((b->qs[j] >> 4) | (((b->qh >> (j + 16)) & 1) << 4));
    }
}

/* Block i's 32 quants, its scale and its min (Q5_0's offset of 16 as a min of -16 d). */
static inline void legacy_block(int fmt, const uint8_t *w, int64_t i, uint8_t v[QK], float *dw, float *mw) {
    const legacy_view b = legacy_at(fmt, w, i);
    legacy_quants(&b, v);
    *dw = half_to_float(b.d);
    *mw = fmt == FMT_Q5_0 ? -16.0f * *dw : half_to_float(b.m);
}

static inline float lanes_sum(const float l[8]) { /* hsum_ps's order */
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

static float dot_legacy_scalar(int fmt, const uint8_t *w, const int8_t *q, const float *d, const int32_t *s,
                               int64_t K) {
    float even[8] = {0}, odd[8] = {0}, mins[8] = {0}, lanes[8];
    for (int64_t i = 0; i < K / QK; i++) {
        uint8_t v[QK];
        float dw, mw;
        legacy_block(fmt, w, i, v, &dw, &mw);
        const int8_t *a = q + i * QK;
        const float scale = dw * d[i];
        float *acc = i & 1 ? odd : even;
        for (int l = 0; l < 8; l++) {
            int32_t t = 0;
            for (int e = 4 * l; e < 4 * l + 4; e++) t += v[e] * a[e];
            acc[l] = acc[l] + (float)t * scale;
        }
        mins[i & 7] = mins[i & 7] + (mw * d[i]) * (float)s[i];
    }
    for (int l = 0; l < 8; l++) lanes[l] = even[l] + odd[l];
    return lanes_sum(lanes) + lanes_sum(mins);
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

/* One activation row reads each repacked block once and briefly, faster than the hardware
 * prefetcher alone brings a group's stream in (Q6_KX8 at 13 GB/s on 2 threads): ask for the
 * block ONE_ROW_AHEAD bytes on (7 Q6_KX8 blocks, 10 Q4_KX8; 6-14 blocks measured alike),
 * into L2. From memory on 2 threads (copies of a 4096 x 14336 matrix, side by side): Q4_KX8
 * 43 -> 57 GB/s (a plain read: 60), Q6_KX8 with its one-row kernel 40-43 -> 46-52 (plain
 * 53-63). Into L1, the next block, as the one-row Q6_KX8 asked before, that kernel read 20:
 * it waited on the core's few L1 miss buffers. The several-row kernels: ROWS_PREFETCH. */
#define ONE_ROW_AHEAD 12288
/* ... a quarter of that block at a time, one per quarter of the block the kernel works on:
 * the whole block's 18-26 requests at once queued behind each other. On a 2-core AMX Xeon,
 * python scripts/bench_gemv.py --threads 2 --blocks Q4_K,Q5_K,Q6_K, builds in turns: Q4_K
 * 19-21 -> 24-26 GB/s, Q5_K 21-23 -> 24-26, Q6_K 23-26 -> 25-29; a 7B decode step of
 * llama.cpp-made files, Q4_K_M 220-233 -> 191-198 ms, Q6_K 281-283 -> 259-260. */
#define ONE_ROW_PREFETCH(b, quarter) \
    prefetch_to_l2((const char *)(b) + ONE_ROW_AHEAD + (quarter) * (sizeof(*(b)) / 4), sizeof(*(b)) / 4)

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
            ONE_ROW_PREFETCH(b, c);
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

/* Q5_KX8 on AVX2: as Q4_KX8, reading the block front to back. The 5-bit quants allow 4
 * quads' pair sums in int16 (at most 4 * 2 * 31 * 127 = 31496), so each half of a chunk
 * takes its own madd by the rows' scales. */
AVX2_FN static void q5k_x8_avx2(const uint8_t *wg, const int8_t *q, const float *d, const int32_t *s, int64_t K,
                                float *out) {
    const __m256i m31 = _mm256_set1_epi8(31), m7 = _mm256_set1_epi8(7), m24 = _mm256_set1_epi8(24);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < K / QKK; i++) {
        const block_q5_Kx8 *b = (const block_q5_Kx8 *)wg + i;
        const int8_t *a = q + i * QKK;
        const int32_t *s16 = s + i * 16;
        __m256i sumi = _mm256_setzero_si256(), summ = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            ONE_ROW_PREFETCH(b, c);
            const __m128i sc_lo = _mm_loadl_epi64((const __m128i *)b->scales[2 * c]);
            const __m128i sc_hi = _mm_loadl_epi64((const __m128i *)b->scales[2 * c + 1]);
            const __m256i row_lo = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(sc_lo, sc_lo));
            const __m256i row_hi = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(sc_hi, sc_hi));
            for (int half = 0; half < 2; half++) {
                const q5_kx8_half *h = &b->q[c][half];
                const int8_t *ah = a + 64 * c + 16 * half;
                const __m256i top = LOAD256(h->qh);
                __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
                for (int u = 0; u < 4; u++) {
                    const __m256i v = LOAD256(h->qs[u]);
                    /* quad u's 2 bits of hi (at 2u) to bits 3, 4; (16-bit shifts: what crosses bytes is masked) */
                    const __m256i t = u < 2 ? _mm256_slli_epi16(top, 3 - 2 * u) : _mm256_srli_epi16(top, 2 * u - 3);
                    const __m256i qh = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 5), m7),
                                                       _mm256_and_si256(t, m24));
                    lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(_mm256_and_si256(v, m31), BCAST4(ah, 4 * u)));
                    hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(qh, BCAST4(ah, 32 + 4 * u)));
                }
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(lo, row_lo));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(hi, row_hi));
            }
            const uint32_t pair = ((uint32_t)(s16[4 * c + 2] + s16[4 * c + 3]) << 16) |
                                  ((uint32_t)(s16[4 * c] + s16[4 * c + 1]) & 0xffff);
            const __m256i mins = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)b->mins[c]));
            summ = _mm256_add_epi32(summ, _mm256_madd_epi16(mins, _mm256_set1_epi32((int)pair)));
        }
        const __m256 da = _mm256_set1_ps(d[i]);
        const __m256 dd = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b->d)), da);
        const __m256 dm = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b->dmin)), da);
        acc = _mm256_add_ps(acc, _mm256_sub_ps(_mm256_mul_ps(dd, _mm256_cvtepi32_ps(sumi)),
                                               _mm256_mul_ps(dm, _mm256_cvtepi32_ps(summ))));
    }
    _mm256_storeu_ps(out, acc);
}

/* (kept whole: gcc's copies of the several-row kernels specialized for one row, made when
 * one-row wrappers called them so, read half the GB/s) */
#if defined(__GNUC__) && !defined(__clang__)
#define NOT_SPECIALIZED __attribute__((noipa))
#else
#define NOT_SPECIALIZED __attribute__((noinline))
#endif

/* Several activation rows (a verify pass, a prompt chunk): the block 4 ahead, into L2
 * (prefetch_to_l2). A 7B Q4_K_M verify pass of 4 rows 263-293 -> 207-234 ms, of 8 rows
 * 406-483 -> 338-445 ms. One row asks further ahead (ONE_ROW_PREFETCH). A quarter at a time,
 * as the one-row kernels ask (AMX Xeon, 14336 x 4096 and its transpose, 2 threads, builds in
 * turns: Q4_K 8 rows 2.4-2.5 -> 2.1-2.3 ms, Q5_K 2.8-3.0 -> 2.6-2.9, Q6_K 3.5-3.7 -> 3.1-3.4;
 * 4 rows 5-15% less). */
#define ROWS_PREFETCH(b, quarter) \
    prefetch_to_l2((const char *)((b) + 4) + (quarter) * (sizeof(*(b)) / 4), sizeof(*(b)) / 4)

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

/* Eight blocks at a time: their scales and mins computed at once from a vector of their
 * headers (the first 4 bytes of each: d, and m where the type has one), each block's scale
 * then broadcast from memory (a permute per block cost the AVX2 kernel 5-10%); even and odd
 * blocks add into two accumulators, so that no block waits for the last one's add. The instruction sets differ in how they fetch the headers
 * (eight_*: lanes past the last block n are 0, as are their activation scales and sums) and
 * sum a block's quads. */
typedef struct {
    __m256i h;          /* the headers */
    __m256 dw, da, sa;  /* the blocks' d, the activation blocks' scales and sums */
} eight_blocks;

AVX2_FN static inline __m256 halves_to_float(__m256i h) { /* each lane's low 16 bits, an fp16 */
    const __m256i low = _mm256_and_si256(h, _mm256_set1_epi32(0xffff));
    return _mm256_cvtph_ps(_mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(low, low), 0x08)));
}

AVX2_FN static inline eight_blocks eight_avx2(const void *blocks, int n, int bytes, const float *d, const int32_t *s) {
    const uint8_t *p = (const uint8_t *)blocks;
    int32_t h[8];
    for (int k = 0; k < 8; k++) h[k] = k < n ? (int32_t)load_u32(p + k * bytes) : 0;
    const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    eight_blocks e = {_mm256_setr_epi32(h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7])};
    e.dw = halves_to_float(e.h), e.da = _mm256_maskload_ps(d, live);
    e.sa = _mm256_cvtepi32_ps(_mm256_maskload_epi32(s, live));
    return e;
}

static inline __mmask32 first_words(int64_t n) { return n >= 32 ? 0xffffffffu : n <= 0 ? 0u : (1u << n) - 1u; }

/* AVX512: the headers from the words the blocks occupy (masked loads: nothing past block n
 * is read) and two word permutes; a gather costs several times that. */
#define HEADER_WORDS(stride, k) ((((stride) * (k) + 1) << 16) | ((stride) * (k)))
VNNI_BW_FN static inline eight_blocks eight_vnni(const void *blocks, int n, int bytes, const float *d,
                                                 const int32_t *s) {
    const int stride = bytes / 2, words = n * stride;
    const __m512i idx = _mm512_setr_epi32(HEADER_WORDS(stride, 0), HEADER_WORDS(stride, 1), HEADER_WORDS(stride, 2),
                                          HEADER_WORDS(stride, 3), HEADER_WORDS(stride, 4), HEADER_WORDS(stride, 5),
                                          HEADER_WORDS(stride, 6), HEADER_WORDS(stride, 7), 0, 0, 0, 0, 0, 0, 0, 0);
    const __mmask32 third = (stride * 6 >= 64 ? 0x3000u : 0) | (stride * 7 >= 64 ? 0xc000u : 0);
    const uint16_t *p = (const uint16_t *)blocks;
    const __m512i z0 = _mm512_maskz_loadu_epi16(first_words(words), p);
    const __m512i z1 = _mm512_maskz_loadu_epi16(first_words(words - 32), p + 32);
    const __m512i z2 = _mm512_maskz_loadu_epi16(first_words(words - 64), p + 64);
    const __mmask8 live = (__mmask8)((1u << n) - 1);
    eight_blocks e = {_mm512_castsi512_si256(_mm512_mask_blend_epi16(third, _mm512_permutex2var_epi16(z0, idx, z1),
                                                                     _mm512_permutexvar_epi16(idx, z2)))};
    e.dw = _mm256_cvtph_ps(_mm256_cvtepi32_epi16(e.h)), e.da = _mm256_maskz_loadu_ps(live, d);
    e.sa = _mm256_cvtepi32_ps(_mm256_maskz_loadu_epi32(live, s));
    return e;
}

#define OFFSET16(h, dw) _mm256_mul_ps(_mm256_set1_ps(-16.0f), (dw))
#define HEADER_MIN(h, dw) halves_to_float(_mm256_srli_epi32((h), 16))

/* A block's 8 lanes of integer sums: AVX2 with maddubs + madd, AVX512-VNNI with dpbusd (the
 * same sums: a pair's products fit int16) and the 5th bits added under a mask from qh. */
VNNI_BW_FN static inline __m256i add_fifth_bits_vnni(__m256i v, const uint8_t *qh) {
    return _mm256_mask_add_epi8(v, (__mmask32)load_u32(qh), v, _mm256_set1_epi8(16));
}
#define SUMS_AVX2(b, a, QUANTS) lanes32(QUANTS, a)
#define SUMS_VNNI(b, a, QUANTS) _mm256_dpbusd_epi32(_mm256_setzero_si256(), QUANTS, LOAD256(a))
#define Q4(b) nibbles32((b)->qs)
#define Q5_AVX2(b) _mm256_or_si256(nibbles32((b)->qs), fifth_bits(load_u32((b)->qh)))
#define Q5_VNNI(b) add_fifth_bits_vnni(nibbles32((b)->qs), (b)->qh)

/* One row asks for the bytes LEGACY_AHEAD on, into L2, group by group: without it the first
 * load of each group's headers waited on memory (Q5_0, 2 threads, 0.5B's 9728 x 896: 0.34 ->
 * 0.28-0.29 ms, 17 -> 21 GB/s; 7B's 4096 x 14336: 2.9-3.4 -> 1.96 ms; one thread 12-15%
 * less time; 2-12 KB measured alike. A 0.5B Q4_K_M file, whose Q5_0 matrices are 44% of it,
 * decoded 44.6-45.3 -> 50.8-51.8 tok/s, 2 threads, builds in turns). */
#define LEGACY_AHEAD 4096
#define LEGACY_ONE_ROW_PREFETCH(b) prefetch_to_l2((const char *)(b) + LEGACY_AHEAD, 8 * sizeof(*(b)))
#define DEFINE_LEGACY_SIMD(NAME, FN, TYPE, EIGHT, SUMS, QUANTS, MIN8)                                          \
    FN static inline __m256 NAME##_block(const TYPE *b, const int8_t *a, const float *scales, int k) {         \
        return _mm256_mul_ps(_mm256_cvtepi32_ps(SUMS(b, a, QUANTS(b))), _mm256_broadcast_ss(scales + k));      \
    }                                                                                                          \
    FN static float NAME(const uint8_t *w, const int8_t *q, const float *d, const int32_t *s, int64_t K) {     \
        const TYPE *b = (const TYPE *)w;                                                                       \
        const int64_t nb = K / QK;                                                                             \
        __m256 even = _mm256_setzero_ps(), odd = even, mins = even; /* mins lane k: blocks 8j + k */         \
        for (int64_t i = 0; i < nb; i += 8, b += 8, q += 8 * QK) {                                             \
            const int n = nb - i < 8 ? (int)(nb - i) : 8;                                                      \
            LEGACY_ONE_ROW_PREFETCH(b);                                                                        \
            const eight_blocks e = EIGHT(b, n, (int)sizeof(TYPE), d + i, s + i);                               \
            mins = _mm256_add_ps(mins, _mm256_mul_ps(_mm256_mul_ps(MIN8(e.h, e.dw), e.da), e.sa));             \
            float scales[8];                                                                                   \
            _mm256_storeu_ps(scales, _mm256_mul_ps(e.dw, e.da));                                               \
            if (n == 8) { /* (a whole group: a constant trip count, unrolled without branches) */          \
                for (int k = 0; k < 8; k += 2) {                                                               \
                    even = _mm256_add_ps(even, NAME##_block(b + k, q + k * QK, scales, k));                    \
                    odd = _mm256_add_ps(odd, NAME##_block(b + k + 1, q + (k + 1) * QK, scales, k + 1));        \
                }                                                                                              \
            } else {                                                                                           \
                for (int k = 0; k < n; k++) {                                                                  \
                    const __m256 t = NAME##_block(b + k, q + k * QK, scales, k);                               \
                    if (k & 1) odd = _mm256_add_ps(odd, t);                                                    \
                    else even = _mm256_add_ps(even, t);                                                        \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
        return hsum_ps(_mm256_add_ps(even, odd)) + hsum_ps(mins);                                              \
    }

DEFINE_LEGACY_SIMD(dot_q4_1_avx2, AVX2_FN, block_q4_1, eight_avx2, SUMS_AVX2, Q4, HEADER_MIN)
DEFINE_LEGACY_SIMD(dot_q5_0_avx2, AVX2_FN, block_q5_0, eight_avx2, SUMS_AVX2, Q5_AVX2, OFFSET16)
DEFINE_LEGACY_SIMD(dot_q5_1_avx2, AVX2_FN, block_q5_1, eight_avx2, SUMS_AVX2, Q5_AVX2, HEADER_MIN)
DEFINE_LEGACY_SIMD(dot_q4_1_vnni, VNNI_BW_FN, block_q4_1, eight_vnni, SUMS_VNNI, Q4, HEADER_MIN)
DEFINE_LEGACY_SIMD(dot_q5_0_vnni, VNNI_BW_FN, block_q5_0, eight_vnni, SUMS_VNNI, Q5_VNNI, OFFSET16)
DEFINE_LEGACY_SIMD(dot_q5_1_vnni, VNNI_BW_FN, block_q5_1, eight_vnni, SUMS_VNNI, Q5_VNNI, HEADER_MIN)

/* Several activation rows against one legacy row (a verify pass, a batch of decode steps):
 * eight blocks' headers and quants unpacked once for all the rows, then each row's steps
 * those of the one-row kernel above (the same products, scales, lanes and order of adds), so
 * each row gets the bits a decode step gets. Row m's activations for blocks i .. i + 7 lie
 * together at q + (i ldq + 8 m) 32 (qact's qab). */

/* Row m's activation scales and sums of blocks i.., its mins' share added, and its blocks'
 * scales dw * da, as the one-row kernel takes them (lanes past the last block n: 0). */
#define LEGACY_ROW_SCALES(m, live)                                                                             \
    const __m256 da = _mm256_maskload_ps(d + (m) * nb + i, live);                                              \
    const __m256 sa = _mm256_cvtepi32_ps(_mm256_maskload_epi32(s + (m) * nb + i, live));                       \
    mins[m] = _mm256_add_ps(mins[m], _mm256_mul_ps(_mm256_mul_ps(min8, da), sa));                              \
    const __m256 sc = _mm256_mul_ps(e.dw, da);                                                                 \
    const int8_t *a = q + (i * ldq + 8 * (m)) * QK
/* acc + block k's sums (quants v) times its scale, as NAME##_block */
#define LEGACY_ROW_BLOCK(acc, SUMS, v, k)                                                                      \
    _mm256_add_ps(acc, _mm256_mul_ps(_mm256_cvtepi32_ps(SUMS(b + (k), a + (k) * QK, v)),                       \
                                     _mm256_permutevar8x32_ps(sc, _mm256_set1_epi32(k))))
/* Blocks i .. i + n - 1 (n <= 8) of a legacy row at b: their headers (e; EIGHT reads row 0's
 * activation scales and sums too, unused), their mins' factor min8 and the lanes of the n
 * blocks (live). */
#define LEGACY_GROUP(TYPE, EIGHT, MIN8)                                                                        \
    const int n = nb - i < 8 ? (int)(nb - i) : 8;                                                              \
    prefetch_to_l2(b + 16, 8 * sizeof(TYPE)); /* (the group after next) */                                     \
    const eight_blocks e = EIGHT(b, n, (int)sizeof(TYPE), d + i, s + i);                                       \
    const __m256 min8 = MIN8(e.h, e.dw);                                                                       \
    const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
/* AVX2: a row's even and odd blocks in two vectors. */
#define DEFINE_LEGACY_ROWS_AVX2(NAME, TYPE, QUANTS, MIN8)                                                     \
    AVX2_FN NOT_SPECIALIZED static void NAME(const uint8_t *w, const int8_t *q, int64_t ldq, const float *d,     \
                                             const int32_t *s, int64_t K, int64_t M, float *y, int64_t ldy) {     \
        const TYPE *b = (const TYPE *)w;                                                                       \
        const int64_t nb = K / QK;                                                                             \
        __m256 even[LEGACY_ROWS], odd[LEGACY_ROWS], mins[LEGACY_ROWS];                                         \
        for (int64_t m = 0; m < M; m++) even[m] = odd[m] = mins[m] = _mm256_setzero_ps();                     \
        for (int64_t i = 0; i < nb; i += 8, b += 8) {                                                          \
            LEGACY_GROUP(TYPE, eight_avx2, MIN8);                                                             \
            if (n < 8) { /* the last blocks */                                                               \
                __m256i v[7];                                                                                  \
                for (int k = 0; k < n; k++) v[k] = QUANTS((b + k));                                            \
                for (int64_t m = 0; m < M; m++) {                                                              \
                    LEGACY_ROW_SCALES(m, live);                                                                \
                    for (int k = 0; k < n; k++) {                                                              \
                        if (k & 1) odd[m] = LEGACY_ROW_BLOCK(odd[m], SUMS_AVX2, v[k], k);                      \
                        else even[m] = LEGACY_ROW_BLOCK(even[m], SUMS_AVX2, v[k], k);                          \
                    }                                                                                          \
                }                                                                                              \
                continue;                                                                                      \
            }                                                                                                  \
            const __m256i v0 = QUANTS((b)), v1 = QUANTS((b + 1)), v2 = QUANTS((b + 2)), v3 = QUANTS((b + 3));  \
            const __m256i v4 = QUANTS((b + 4)), v5 = QUANTS((b + 5)), v6 = QUANTS((b + 6)), v7 = QUANTS((b + 7)); \
            for (int64_t m = 0; m < M; m++) {                                                                  \
                LEGACY_ROW_SCALES(m, live);                                                                    \
                __m256 ev = even[m], od = odd[m];                                                              \
                ev = LEGACY_ROW_BLOCK(ev, SUMS_AVX2, v0, 0), od = LEGACY_ROW_BLOCK(od, SUMS_AVX2, v1, 1);      \
                ev = LEGACY_ROW_BLOCK(ev, SUMS_AVX2, v2, 2), od = LEGACY_ROW_BLOCK(od, SUMS_AVX2, v3, 3);      \
                ev = LEGACY_ROW_BLOCK(ev, SUMS_AVX2, v4, 4), od = LEGACY_ROW_BLOCK(od, SUMS_AVX2, v5, 5);      \
                ev = LEGACY_ROW_BLOCK(ev, SUMS_AVX2, v6, 6), od = LEGACY_ROW_BLOCK(od, SUMS_AVX2, v7, 7);      \
                even[m] = ev, odd[m] = od;                                                                     \
            }                                                                                                  \
        }                                                                                                      \
        for (int64_t m = 0; m < M; m++) y[m * ldy] = hsum_ps(_mm256_add_ps(even[m], odd[m])) + hsum_ps(mins[m]); \
    }

/* AVX512-VNNI: a row's even blocks in the low half of one 512-bit vector, its odd ones in the
 * high half, so that one dpbusd, conversion, multiply and add serve two blocks (lane by lane
 * the same operations). */
#define PAIR(lo, hi) _mm512_inserti64x4(_mm512_castsi256_si512(lo), (hi), 1)
/* Blocks 2j and 2j + 1's sums (quants p) times their scales (pair_scale[j] of sc2) */
#define LEGACY_ROW_PRODUCT(p, j)                                                                               \
    _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), p, _mm512_loadu_si512(a + 64 * (j)))), \
                  _mm512_permutexvar_ps(pair_scale[j], sc2))
#define DEFINE_LEGACY_ROWS_VNNI(NAME, TYPE, QUANTS, MIN8)                                                     \
    VNNI_BW_FN NOT_SPECIALIZED static void NAME(const uint8_t *w, const int8_t *q, int64_t ldq, const float *d,  \
                                                const int32_t *s, int64_t K, int64_t M, float *y, int64_t ldy) {  \
        const TYPE *b = (const TYPE *)w;                                                                       \
        const int64_t nb = K / QK;                                                                             \
        __m512 acc[LEGACY_ROWS];                                                                               \
        __m256 mins[LEGACY_ROWS];                                                                              \
        __m512i pair_scale[4]; /* lanes 0-7: block 2j's scale, 8-15: block 2j + 1's */                         \
        for (int j = 0; j < 4; j++)                                                                            \
            pair_scale[j] = _mm512_inserti64x4(_mm512_set1_epi32(2 * j), _mm256_set1_epi32(2 * j + 1), 1);    \
        for (int64_t m = 0; m < M; m++) acc[m] = _mm512_setzero_ps(), mins[m] = _mm256_setzero_ps();          \
        for (int64_t i = 0; i < nb; i += 8, b += 8) {                                                          \
            LEGACY_GROUP(TYPE, eight_vnni, MIN8);                                                             \
            if (n < 8) { /* the last blocks: pairs, and a last even block alone (its odd half not added) */ \
                __m512i p[4];                                                                                  \
                for (int j = 0; 2 * j < n; j++)                                                                \
                    p[j] = PAIR(QUANTS((b + 2 * j)), 2 * j + 1 < n ? QUANTS((b + 2 * j + 1)) : _mm256_setzero_si256()); \
                for (int64_t m = 0; m < M; m++) {                                                              \
                    LEGACY_ROW_SCALES(m, live);                                                                \
                    const __m512 sc2 = _mm512_castps256_ps512(sc);                                             \
                    for (int j = 0; 2 * j < n; j++)                                                            \
                        acc[m] = _mm512_mask_add_ps(acc[m], 2 * j + 1 < n ? 0xffff : 0x00ff, acc[m],           \
                                                    LEGACY_ROW_PRODUCT(p[j], j));                              \
                }                                                                                              \
                continue;                                                                                      \
            }                                                                                                  \
            const __m512i p0 = PAIR(QUANTS((b)), QUANTS((b + 1))), p1 = PAIR(QUANTS((b + 2)), QUANTS((b + 3)));  \
            const __m512i p2 = PAIR(QUANTS((b + 4)), QUANTS((b + 5))), p3 = PAIR(QUANTS((b + 6)), QUANTS((b + 7))); \
            for (int64_t m = 0; m < M; m++) {                                                                  \
                LEGACY_ROW_SCALES(m, live);                                                                    \
                const __m512 sc2 = _mm512_castps256_ps512(sc);                                                 \
                __m512 t = acc[m];                                                                             \
                t = _mm512_add_ps(t, LEGACY_ROW_PRODUCT(p0, 0)), t = _mm512_add_ps(t, LEGACY_ROW_PRODUCT(p1, 1)); \
                t = _mm512_add_ps(t, LEGACY_ROW_PRODUCT(p2, 2)), acc[m] = _mm512_add_ps(t, LEGACY_ROW_PRODUCT(p3, 3)); \
            }                                                                                                  \
        }                                                                                                      \
        for (int64_t m = 0; m < M; m++)                                                                        \
            y[m * ldy] = hsum_ps(_mm256_add_ps(_mm512_castps512_ps256(acc[m]), _mm512_extractf32x8_ps(acc[m], 1))) + \
                         hsum_ps(mins[m]);                                                                     \
    }

DEFINE_LEGACY_ROWS_AVX2(rows_q4_1_avx2, block_q4_1, Q4, HEADER_MIN)
DEFINE_LEGACY_ROWS_AVX2(rows_q5_0_avx2, block_q5_0, Q5_AVX2, OFFSET16)
DEFINE_LEGACY_ROWS_AVX2(rows_q5_1_avx2, block_q5_1, Q5_AVX2, HEADER_MIN)
DEFINE_LEGACY_ROWS_VNNI(rows_q4_1_vnni, block_q4_1, Q4, HEADER_MIN)
DEFINE_LEGACY_ROWS_VNNI(rows_q5_0_vnni, block_q5_0, Q5_VNNI, OFFSET16)
DEFINE_LEGACY_ROWS_VNNI(rows_q5_1_vnni, block_q5_1, Q5_VNNI, HEADER_MIN)

/* ---------------------------------------------------------------------------------------
 * Several activation rows against one repacked group (a speculative verify pass, a short
 * prefill): each piece of a super-block is unpacked once for up to X8_ROWS rows, then each
 * row's integer sums and float step are the one-row kernel's, so every row gets the bits
 * it gets alone. AVX2 adds quads' pair products in int16 and applies the scales with madd,
 * as the one-row kernels do; AVX512-VNNI sums each quad straight into int32 (dpbusd: no
 * pair sums to add, nothing to widen) and applies the scales with one madd. Q4_K and
 * Q5_K: a macro per format over each instruction set's dot product of one scale's quads
 * (sub_dot_*) and its scales' layout (scales_*); Q6_K: the one-row kernel's unpacking and
 * sums, further down.
 */

/* A piece's unpacked quads (lane r of quad k: row r's 4 quants), as each instruction set's
 * dot products take them: AVX2 as they are; AVX512-VNNI two quads a 512-bit vector,
 * interleaved (lane 2r: row r's quad 2p, lane 2r + 1: its quad 2p + 1), so that one 8-byte
 * broadcast of the activations feeds both and each dpbusd takes 64 products. */
typedef struct {
    __m256i v[8];
} quad_vectors_avx2;
typedef struct {
    __m512i v[4];
} quad_vectors_vnni;

AVX2_FN static inline void make_quads_avx2(const __m256i *w, int n, quad_vectors_avx2 *out) {
    for (int k = 0; k < n; k++) out->v[k] = w[k];
}
VNNI_FN static inline void make_quads_vnni(const __m256i *w, int n, quad_vectors_vnni *out) {
    const __m512i zip = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    for (int p = 0; p < n / 2; p++)
        out->v[p] = _mm512_permutex2var_epi32(_mm512_castsi256_si512(w[2 * p]), zip, _mm512_castsi256_si512(w[2 * p + 1]));
}

/* Each row's integer sums of a super-block, per instruction set (sums_*; fold_* gives the
 * 8 rows' int32 sums), and the dot products of quads first..first+n-1 (a: the activations
 * of quad `first`) weighted by each row's scale (scales_*: as the sums take them), added in. */
typedef __m256i sums_avx2, scale_vector_avx2;
typedef __m512i sums_vnni, scale_vector_vnni; /* lanes 2r, 2r + 1: row r */

/* AVX2: the quads' pair sums added in int16 (as many as the one-row kernel adds: 8 of 4-bit
 * quants, 4 of 5-bit), each row's scale (int16, in both its lanes) applied by
 * madd. */
AVX2_FN static inline sums_avx2 sub_dot_avx2(sums_avx2 acc, const quad_vectors_avx2 *w, int first, int n,
                                             const int8_t *a, scale_vector_avx2 scales) {
    __m256i p = _mm256_maddubs_epi16(w->v[first], BCAST4(a, 0));
    for (int k = 1; k < n; k++) p = _mm256_add_epi16(p, _mm256_maddubs_epi16(w->v[first + k], BCAST4(a, 4 * k)));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, scales));
}
AVX2_FN static inline scale_vector_avx2 scales_u8_avx2(const uint8_t *sc) {
    const __m128i v = _mm_loadl_epi64((const __m128i *)sc);
    return _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(v, v));
}
AVX2_FN static inline scale_vector_avx2 scales_s8_avx2(const int8_t *sc) {
    const __m128i v = _mm_loadl_epi64((const __m128i *)sc);
    return _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(v, v));
}
AVX2_FN static inline sums_avx2 zero_sums_avx2(void) { return _mm256_setzero_si256(); }
AVX2_FN static inline __m256i fold_avx2(sums_avx2 sums) { return sums; }

/* AVX512-VNNI: the products summed in int32 lanes, times each row's scale (int32, in both
 * its lanes); a row's two lanes are added once per super-block. A lane sums 2n products:
 * Q4_K's 8 quads at most 16 * 15 * 127 = 30480, Q5_K's 4 quads 8 * 31 * 127 = 31496, so
 * the sum is its own low int16 and madd against the scale (high int16 0) multiplies
 * exactly, one instruction where mullo_epi32 takes two on the port the dot products use
 * (8 rows: Q5_K 1.62-1.68 -> 1.52-1.59 times one row's time; Q4_K within noise). */
VNNI_BW_FN static inline sums_vnni sub_dot_vnni(sums_vnni acc, const quad_vectors_vnni *w, int first, int n,
                                                const int8_t *a, scale_vector_vnni scales) {
    __m512i sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w->v[first / 2], _mm512_set1_epi64(load_i64(a)));
    for (int p = 1; p < n / 2; p++)
        sum = _mm512_dpbusd_epi32(sum, w->v[first / 2 + p], _mm512_set1_epi64(load_i64(a + 8 * p)));
    return _mm512_add_epi32(acc, _mm512_madd_epi16(sum, scales));
}
VNNI_FN static inline scale_vector_vnni scales_u8_vnni(const uint8_t *sc) {
    const __m128i v = _mm_loadl_epi64((const __m128i *)sc);
    return _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(v, v));
}
VNNI_FN static inline sums_vnni zero_sums_vnni(void) { return _mm512_setzero_si512(); }
VNNI_FN static inline __m256i fold_vnni(sums_vnni sums) {
    return _mm512_cvtepi64_epi32(_mm512_add_epi32(sums, _mm512_srli_epi64(sums, 32)));
}

/* The mins' share of a Q4_K/Q5_K super-block for one row (16 activation sums s16), as the
 * one-row kernels add it up: one madd per pair of sub-blocks. */
AVX2_FN static inline __m256i k4_mins(const __m256i *mins, const int32_t *s16) {
    __m256i summ = _mm256_setzero_si256();
    for (int c = 0; c < 4; c++) {
        const uint32_t pair = ((uint32_t)(s16[4 * c + 2] + s16[4 * c + 3]) << 16) |
                              ((uint32_t)(s16[4 * c] + s16[4 * c + 1]) & 0xffff);
        summ = _mm256_add_epi32(summ, _mm256_madd_epi16(mins[c], _mm256_set1_epi32((int)pair)));
    }
    return summ;
}

/* A Q4_K/Q5_K super-block's float step for one row, as the one-row kernels take it (kq_add
 * lane by lane): its scales d, dmin (fp16, 8 rows), mins, the row's activation sums s16 and
 * scale da, and its 8 integer sums. */
AVX2_FN static inline __m256 k4_float_step(__m256 acc, const uint16_t *d, const uint16_t *dmin,
                                           const uint8_t (*mins)[8][2], const int32_t *s16, float da, __m256i sums) {
    __m256i m[4];
    for (int c = 0; c < 4; c++) m[c] = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)mins[c]));
    const __m256i summ = k4_mins(m, s16);
    const __m256 dd = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)d)), _mm256_set1_ps(da));
    const __m256 dm = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)dmin)), _mm256_set1_ps(da));
    return _mm256_add_ps(acc, _mm256_sub_ps(_mm256_mul_ps(dd, _mm256_cvtepi32_ps(sums)),
                                            _mm256_mul_ps(dm, _mm256_cvtepi32_ps(summ))));
}

/* AVX2 has 16 vector registers: 8 rows' sums and a piece's 8 unpacked vectors would not fit,
 * so its kernels take the rows 4 at a time (the group's blocks, just read, come again from
 * the cache). */
#define IN_FOURS(NAME, CHUNK)                                                                                       \
    AVX2_FN static void NAME(const uint8_t *wg, const int8_t *q, int64_t ldq, const float *d, const int32_t *s,    \
                             int64_t K, int64_t M, float *out) {                                                   \
        for (int64_t m0 = 0; m0 < M; m0 += 4)                                                                      \
            CHUNK(wg, q + m0 * QKK, ldq, d + m0 * (K / QKK), s + m0 * (K / 16), K, M - m0 < 4 ? M - m0 : 4,        \
                  out + 8 * m0);                                                                                   \
    }

/* Q4_KX8: sub-block j is chunk j/2's low (j even) or high nibbles. */
#define Q4K_X8_ROWS(NAME, FN, SUFFIX, ROWS)                                                                            \
    FN static void NAME(const uint8_t *wg, const int8_t *q, int64_t ldq, const float *d, const int32_t *s, int64_t K,  \
                        int64_t M, float *out) {                                                                       \
        const __m256i m4 = _mm256_set1_epi8(15);                                                                       \
        __m256 acc[ROWS];                                                                                              \
        for (int64_t m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();                                                  \
        for (int64_t i = 0; i < K / QKK; i++) {                                                                        \
            const block_q4_Kx8 *b = (const block_q4_Kx8 *)wg + i;                                                      \
            sums_##SUFFIX sumi[ROWS];                                                                      \
            for (int64_t m = 0; m < M; m++) sumi[m] = zero_sums_##SUFFIX();                                          \
            for (int j = 0; j < 8; j++) {                                                                              \
                if (M > 1 && !(j & 1)) ROWS_PREFETCH(b, j / 2);                                                        \
                __m256i w[8];                                                                                          \
                for (int k = 0; k < 8; k++) {                                                                          \
                    const __m256i v = LOAD256(b->qs[j / 2][k]);                                                        \
                    w[k] = _mm256_and_si256(j & 1 ? _mm256_srli_epi16(v, 4) : v, m4);                                  \
                }                                                                                                      \
                quad_vectors_##SUFFIX quads;                                                                           \
                make_quads_##SUFFIX(w, 8, &quads);                                                                     \
                const scale_vector_##SUFFIX sc = scales_u8_##SUFFIX(b->scales[j]);                                                   \
                for (int64_t m = 0; m < M; m++)                                                                        \
                    sumi[m] = sub_dot_##SUFFIX(sumi[m], &quads, 0, 8, q + (i * ldq + m) * QKK + 32 * j, sc);           \
            }                                                                                                          \
            for (int64_t m = 0; m < M; m++)                                                                           \
                acc[m] = k4_float_step(acc[m], b->d, b->dmin, b->mins, s + m * (K / 16) + i * 16, d[m * (K / QKK) + i],\
                                       fold_##SUFFIX(sumi[m]));                                                       \
        }                                                                                                              \
        for (int64_t m = 0; m < M; m++) _mm256_storeu_ps(out + 8 * m, acc[m]);                                         \
    }
Q4K_X8_ROWS(q4k_x8_rows4_avx2, AVX2_FN, avx2, 4)
IN_FOURS(q4k_x8_rows_avx2, q4k_x8_rows4_avx2)
Q4K_X8_ROWS(q4k_x8_rows_vnni, VNNI_BW_FN, vnni, 8)

/* One row of Q6_KX8 (every decode step of a Q6_K matrix). Each quad of the block is read
 * once and makes the 4 quants of the parts that share it (t = 0..3: the two ql nibbles and
 * qh's four 2-bit fields), each summed into its own group's int32 lanes (lane r: row r; AVX2
 * adds two quads' pair products in int16 first, VNNI takes each quad in a 256-bit dpbusd,
 * no permutes), and each group's sums are weighted by the rows' scales once. The integer
 * sums and the float step are the several-row kernels', so the bits are too. In L2 on one
 * core this reads 34 GB/s where the several-row kernel for one row read 23 (AVX512-VNNI);
 * from memory on 2 threads, with the block ONE_ROW_AHEAD asked for, 46-52 against 40-43
 * (a plain read of the same bytes: 53-63), side by side on copies of a 4096 x 14336 matrix. */
AVX2_FN static inline __m256 q6x8_float_step(__m256 acc, const block_q6_Kx8 *b, const int32_t *s16, float da,
                                             __m256i sumi) {
    __m256i offset = _mm256_setzero_si256();
    for (int g = 0; g < 16; g += 2) { /* two groups' scales a madd, as the several-row kernels */
        const __m256i pair = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(_mm_loadl_epi64((const __m128i *)b->scales[g]),
                                                                    _mm_loadl_epi64((const __m128i *)b->scales[g + 1])));
        const uint32_t bs = ((uint32_t)s16[g + 1] << 16) | ((uint32_t)s16[g] & 0xffff);
        offset = _mm256_add_epi32(offset, _mm256_madd_epi16(pair, _mm256_set1_epi32((int)bs)));
    }
    const __m256i sum = _mm256_sub_epi32(sumi, _mm256_slli_epi32(offset, 5));
    const __m256 dd = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b->d)), _mm256_set1_ps(da));
    return _mm256_add_ps(acc, _mm256_mul_ps(dd, _mm256_cvtepi32_ps(sum)));
}

/* Quad u of half h, quarter kh of a Q6_KX8 block as the 4 parts' quants (6 bits, unsigned). */
#define Q6X8_QUANTS(b, h, kh, u, w)                                                                                     \
    do {                                                                                                                \
        const __m256i m4_ = _mm256_set1_epi8(15), m30_ = _mm256_set1_epi8(0x30);                                        \
        const __m256i L0 = LOAD256((b)->ql[h][0][4 * (kh) + (u)]), L1 = LOAD256((b)->ql[h][1][4 * (kh) + (u)]);         \
        const __m256i H = LOAD256((b)->qh[h][4 * (kh) + (u)]);                                                          \
        (w)[0] = _mm256_or_si256(_mm256_and_si256(L0, m4_), _mm256_and_si256(_mm256_slli_epi16(H, 4), m30_));            \
        (w)[1] = _mm256_or_si256(_mm256_and_si256(L1, m4_), _mm256_and_si256(_mm256_slli_epi16(H, 2), m30_));            \
        (w)[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(L0, 4), m4_), _mm256_and_si256(H, m30_));            \
        (w)[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(L1, 4), m4_),                                        \
                                 _mm256_and_si256(_mm256_srli_epi16(H, 2), m30_));                                      \
    } while (0)

/* Quarter kh of half h of a Q6_KX8 block (4 groups of 16 inputs) against its activations a:
 * the 8 rows' integer sums, each group's weighted by the rows' scales. (The several-row
 * kernels' quarter, below, unpacks all 16 vectors before the rows pass; with one row that
 * order read 23-24 GB/s in L2 on one core where this one, each quad's parts summed as soon as
 * they are made, reads 27 with AVX512-VNNI.) */
AVX2_FN static inline __m256i q6x8_quarter_avx2(const block_q6_Kx8 *b, int h, int kh, const int8_t *a) {
    __m256i sum = _mm256_setzero_si256();
    for (int u = 0; u < 4; u += 2) { /* two quads' pair products in int16: at most 2 * 2 * 63 * 127 */
        __m256i w0[4], w1[4];
        Q6X8_QUANTS(b, h, kh, u, w0);
        Q6X8_QUANTS(b, h, kh, u + 1, w1);
        for (int t = 0; t < 4; t++) {
            const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(w0[t], BCAST4(a, 32 * t + 4 * u)),
                                               _mm256_maddubs_epi16(w1[t], BCAST4(a, 32 * t + 4 * u + 4)));
            sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p, scales_s8_avx2(b->scales[8 * h + 2 * t + kh])));
        }
    }
    return sum;
}
VNNI_FN static inline __m256i q6x8_quarter_vnni(const block_q6_Kx8 *b, int h, int kh, const int8_t *a) {
    __m256i g[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int u = 0; u < 4; u++) {
        __m256i w[4];
        Q6X8_QUANTS(b, h, kh, u, w);
        for (int t = 0; t < 4; t++) g[t] = _mm256_dpbusd_epi32(g[t], w[t], BCAST4(a, 32 * t + 4 * u));
    }
    __m256i sum = _mm256_setzero_si256();
    for (int t = 0; t < 4; t++) {
        const __m256i sc = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)b->scales[8 * h + 2 * t + kh]));
        sum = _mm256_add_epi32(sum, _mm256_mullo_epi32(g[t], sc));
    }
    return sum;
}

#define Q6K_X8_ONE(NAME, FN, SUFFIX)                                                                                 \
    FN static void NAME(const uint8_t *wg, const int8_t *q, const float *d, const int32_t *s, int64_t K,         \
                        float *out) {                                                                            \
        __m256 acc = _mm256_setzero_ps();                                                                        \
        for (int64_t i = 0; i < K / QKK; i++) {                                                                  \
            const block_q6_Kx8 *b = (const block_q6_Kx8 *)wg + i;                                                \
            __m256i sumi = _mm256_setzero_si256();                                                               \
            for (int h = 0; h < 2; h++)                                                                          \
                for (int kh = 0; kh < 2; kh++) {                                                                 \
                    ONE_ROW_PREFETCH(b, 2 * h + kh);                                                             \
                    sumi = _mm256_add_epi32(sumi, q6x8_quarter_##SUFFIX(b, h, kh, q + i * QKK + 128 * h + 16 * kh)); \
                }                                                                                                \
            acc = q6x8_float_step(acc, b, s + i * 16, d[i], sumi);                                               \
        }                                                                                                        \
        _mm256_storeu_ps(out, acc);                                                                              \
    }
Q6K_X8_ONE(q6k_x8_avx2, AVX2_FN, avx2)
Q6K_X8_ONE(q6k_x8_vnni, VNNI_FN, vnni)

/* Several rows of Q6_KX8, unpacked as the one-row kernel unpacks them: quarter kh of half h
 * (qa: the M rows' activations of the super-block, QKK apart) into each row's integer sums,
 * the unpacked quads used by all the rows. AVX2 (16 registers): two quads' 4 parts at a time,
 * their pair products added in int16 and weighted by the rows' scales with madd. AVX512-VNNI:
 * the quarter's 16 vectors at once, per row 16 256-bit dpbusd into its 4 groups' sums, each
 * multiplied by the rows' scales once. The integer sums are the one-row kernel's (added in
 * another order, exactly), and so is the float step: every row gets its bits. */
AVX2_FN static inline void q6x8_rows_quarter_avx2(const block_q6_Kx8 *b, int h, int kh, const int8_t *qa, int64_t M,
                                                  __m256i *sumi) {
    for (int u = 0; u < 4; u += 2) {
        __m256i w0[4], w1[4];
        Q6X8_QUANTS(b, h, kh, u, w0);
        Q6X8_QUANTS(b, h, kh, u + 1, w1);
        for (int64_t m = 0; m < M; m++) {
            const int8_t *a = qa + m * QKK + 128 * h + 16 * kh;
            for (int t = 0; t < 4; t++) {
                const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(w0[t], BCAST4(a, 32 * t + 4 * u)),
                                                   _mm256_maddubs_epi16(w1[t], BCAST4(a, 32 * t + 4 * u + 4)));
                sumi[m] = _mm256_add_epi32(sumi[m], _mm256_madd_epi16(p, scales_s8_avx2(b->scales[8 * h + 2 * t + kh])));
            }
        }
    }
}
VNNI_FN static inline void q6x8_rows_quarter_vnni(const block_q6_Kx8 *b, int h, int kh, const int8_t *qa, int64_t M,
                                                  __m256i *sumi) {
    __m256i w[4][4], sc[4];
    for (int u = 0; u < 4; u++) Q6X8_QUANTS(b, h, kh, u, w[u]);
    for (int t = 0; t < 4; t++)
        sc[t] = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)b->scales[8 * h + 2 * t + kh]));
    for (int64_t m = 0; m < M; m++) {
        const int8_t *a = qa + m * QKK + 128 * h + 16 * kh;
        __m256i g[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int u = 0; u < 4; u++)
            for (int t = 0; t < 4; t++) g[t] = _mm256_dpbusd_epi32(g[t], w[u][t], BCAST4(a, 32 * t + 4 * u));
        for (int t = 0; t < 4; t++) sumi[m] = _mm256_add_epi32(sumi[m], _mm256_mullo_epi32(g[t], sc[t]));
    }
}

/* 8 rows of a 14336 x 4096 matrix, 2 threads, from memory: with AVX512-VNNI 3.3-3.4 ms when
 * each part was unpacked apart (ql twice, qh four times) and two quads filled a 512-bit vector
 * (two permutes per group), 2.6 ms now (int4's kernel: 1.6; one row: 1.4); with AVX2 4.1 ->
 * 3.2 ms. */
#define Q6K_X8_SEVERAL(NAME, FN, SUFFIX)                                                                         \
    FN NOT_SPECIALIZED static void NAME(const uint8_t *wg, const int8_t *q, int64_t ldq, const float *d,        \
                                        const int32_t *s, int64_t K, int64_t M, float *out) {                   \
        __m256 acc[X8_ROWS];                                                                                     \
        for (int64_t m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();                                            \
        for (int64_t i = 0; i < K / QKK; i++) {                                                                  \
            const block_q6_Kx8 *b = (const block_q6_Kx8 *)wg + i;                                                \
            __m256i sumi[X8_ROWS];                                                                               \
            for (int64_t m = 0; m < M; m++) sumi[m] = _mm256_setzero_si256();                                    \
            for (int h = 0; h < 2; h++)                                                                          \
                for (int kh = 0; kh < 2; kh++) {                                                                 \
                    ROWS_PREFETCH(b, 2 * h + kh);                                                                \
                    q6x8_rows_quarter_##SUFFIX(b, h, kh, q + i * ldq * QKK, M, sumi);                            \
                }                                                                                                \
            for (int64_t m = 0; m < M; m++)                                                                      \
                acc[m] = q6x8_float_step(acc[m], b, s + m * (K / 16) + i * 16, d[m * (K / QKK) + i], sumi[m]);   \
        }                                                                                                        \
        for (int64_t m = 0; m < M; m++) _mm256_storeu_ps(out + 8 * m, acc[m]);                                  \
    }
Q6K_X8_SEVERAL(q6k_x8_rows_avx2, AVX2_FN, avx2)
Q6K_X8_SEVERAL(q6k_x8_rows_vnni, VNNI_FN, vnni)

/* Q5_KX8: chunk c's half holds quads 4 half .. 4 half + 3 of sub-blocks 2c (lo) and 2c + 1
 * (hi), unpacked as q5k_x8_avx2 does. */
#define Q5K_X8_ROWS(NAME, FN, SUFFIX, ROWS)                                                                               \
    FN static void NAME(const uint8_t *wg, const int8_t *q, int64_t ldq, const float *d, const int32_t *s, int64_t K,     \
                        int64_t M, float *out) {                                                                          \
        const __m256i m31 = _mm256_set1_epi8(31), m7 = _mm256_set1_epi8(7), m24 = _mm256_set1_epi8(24);                   \
        __m256 acc[ROWS];                                                                                                 \
        for (int64_t m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();                                                     \
        for (int64_t i = 0; i < K / QKK; i++) {                                                                           \
            const block_q5_Kx8 *b = (const block_q5_Kx8 *)wg + i;                                                         \
            sums_##SUFFIX sumi[ROWS];                                                                         \
            for (int64_t m = 0; m < M; m++) sumi[m] = zero_sums_##SUFFIX();                                             \
            for (int c = 0; c < 4; c++) {                                                                                 \
                if (M > 1) ROWS_PREFETCH(b, c);                                                                           \
                const scale_vector_##SUFFIX sc_lo = scales_u8_##SUFFIX(b->scales[2 * c]);                                               \
                const scale_vector_##SUFFIX sc_hi = scales_u8_##SUFFIX(b->scales[2 * c + 1]);                                           \
                for (int half = 0; half < 2; half++) {                                                                    \
                    const q5_kx8_half *hb = &b->q[c][half];                                                               \
                    const __m256i top = LOAD256(hb->qh);                                                                  \
                    __m256i lo[4], hi[4];                                                                                 \
                    for (int u = 0; u < 4; u++) {                                                                         \
                        const __m256i v = LOAD256(hb->qs[u]);                                                             \
                        const __m256i t = u < 2 ? _mm256_slli_epi16(top, 3 - 2 * u) : _mm256_srli_epi16(top, 2 * u - 3);  \
                        lo[u] = _mm256_and_si256(v, m31);                                                                 \
                        hi[u] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 5), m7), _mm256_and_si256(t, m24)); \
                    }                                                                                                     \
                    quad_vectors_##SUFFIX quads_lo, quads_hi;                                                             \
                    make_quads_##SUFFIX(lo, 4, &quads_lo), make_quads_##SUFFIX(hi, 4, &quads_hi);                         \
                    for (int64_t m = 0; m < M; m++) {                                                                     \
                        const int8_t *a = q + (i * ldq + m) * QKK + 64 * c + 16 * half;                                   \
                        sumi[m] = sub_dot_##SUFFIX(sub_dot_##SUFFIX(sumi[m], &quads_lo, 0, 4, a, sc_lo), &quads_hi, 0, 4, a + 32, sc_hi); \
                    }                                                                                                     \
                }                                                                                                         \
            }                                                                                                             \
            for (int64_t m = 0; m < M; m++)                                                                           \
                acc[m] = k4_float_step(acc[m], b->d, b->dmin, b->mins, s + m * (K / 16) + i * 16, d[m * (K / QKK) + i],\
                                       fold_##SUFFIX(sumi[m]));                                                       \
        }                                                                                                                 \
        for (int64_t m = 0; m < M; m++) _mm256_storeu_ps(out + 8 * m, acc[m]);                                            \
    }
Q5K_X8_ROWS(q5k_x8_rows4_avx2, AVX2_FN, avx2, 4)
IN_FOURS(q5k_x8_rows_avx2, q5k_x8_rows4_avx2)
Q5K_X8_ROWS(q5k_x8_rows_vnni, VNNI_BW_FN, vnni, 8)
#endif

/* ---------------------------------------------------------------------------------------
 * NEON kernels (64-bit ARM): the portable kernels' integer sums, in int32 lanes reduced
 * once per super-block, and their float steps (kq_add; for 8 rows the same operations lane
 * by lane, unfused; the legacy types' 8 float lanes in the same order), hence their bits.
 * Each kernel is written once as a macro and made twice: with the dot-product extension
 * (sdot: 4 products into each int32 lane) and with plain NEON (widening multiplies into
 * int16 lanes, then pairwise adds into int32). No int16 lane gathers more than 4 products
 * of a quant below 64 and an activation of at most 127 in magnitude (4 * 63 * 127 = 32004),
 * or 8 of a quant below 16, so the int16 sums are exact too.
 */
#ifdef MISTOL_ARM
static void quantize_k_neon(const float *x, int64_t K, int8_t *q, float *d, int32_t *s) {
    for (int64_t b = 0; b < K / QKK; b++) {
        const float *xb = x + b * QKK;
        float32x4_t m = vdupq_n_f32(0.0f);
        for (int j = 0; j < QKK; j += 4) /* (maxnm ignores a NaN, as fmaxf does) */
            m = vmaxnmq_f32(m, vabsq_f32(vld1q_f32(xb + j)));
        const float amax = vmaxnmvq_f32(m);
        const float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
        for (int g = 0; g < QKK / 16; g++) {
            int32x4_t v[4];
            for (int i = 0; i < 4; i++) /* round half to even, as nearbyintf does */
                v[i] = vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(xb + 16 * g + 4 * i), id));
            s[b * 16 + g] = vaddvq_s32(vaddq_s32(vaddq_s32(v[0], v[1]), vaddq_s32(v[2], v[3])));
            const int16x8_t lo = vcombine_s16(vmovn_s32(v[0]), vmovn_s32(v[1])); /* |v| <= 127: exact */
            const int16x8_t hi = vcombine_s16(vmovn_s32(v[2]), vmovn_s32(v[3]));
            vst1q_s8(q + b * QKK + 16 * g, vcombine_s8(vmovn_s16(lo), vmovn_s16(hi)));
        }
        d[b] = db;
    }
}

/* The three dot products the kernels are made of, per instruction set:
 *   DOT16(acc, w, a)   acc plus the 16 products of w and a, in some lanes (for sums only);
 *   SUMS4(w, a)        lane i: the products of bytes 4i..4i+3 (what sdot adds);
 *   ROWS4(acc, w0..w3, a)  four rows of an interleaved layout: w_u holds quad u (4 bytes)
 *                      of rows 0-3, a the 4 quads' activations; lane r: row r's 16 products. */
#define KA4(a, u) vreinterpret_s8_s32(vdup_laneq_s32(vreinterpretq_s32_s8(a), (u))) /* quad u, twice */

static inline int32x4_t dot16_neon(int32x4_t acc, int8x16_t w, int8x16_t a) {
    return vpadalq_s16(acc, vmlal_high_s8(vmull_s8(vget_low_s8(w), vget_low_s8(a)), w, a));
}

static inline int32x4_t sums4_neon(int8x16_t w, int8x16_t a) {
    return vpaddq_s32(vpaddlq_s16(vmull_s8(vget_low_s8(w), vget_low_s8(a))), vpaddlq_s16(vmull_high_s8(w, a)));
}

static inline int32x4_t rows4_neon(int32x4_t acc, int8x16_t w0, int8x16_t w1, int8x16_t w2, int8x16_t w3,
                                   int8x16_t a) {
    int16x8_t p01 = vmull_s8(vget_low_s8(w0), KA4(a, 0)), p23 = vmull_s8(vget_high_s8(w0), KA4(a, 0));
    p01 = vmlal_s8(p01, vget_low_s8(w1), KA4(a, 1)), p23 = vmlal_s8(p23, vget_high_s8(w1), KA4(a, 1));
    p01 = vmlal_s8(p01, vget_low_s8(w2), KA4(a, 2)), p23 = vmlal_s8(p23, vget_high_s8(w2), KA4(a, 2));
    p01 = vmlal_s8(p01, vget_low_s8(w3), KA4(a, 3)), p23 = vmlal_s8(p23, vget_high_s8(w3), KA4(a, 3));
    return vaddq_s32(acc, vpaddq_s32(vpaddlq_s16(p01), vpaddlq_s16(p23)));
}

#ifdef MISTOL_DOTPROD
DOTPROD_FN static inline int32x4_t dot16_dotprod(int32x4_t acc, int8x16_t w, int8x16_t a) {
    return vdotq_s32(acc, w, a);
}

DOTPROD_FN static inline int32x4_t sums4_dotprod(int8x16_t w, int8x16_t a) { return vdotq_s32(vdupq_n_s32(0), w, a); }

DOTPROD_FN static inline int32x4_t rows4_dotprod(int32x4_t acc, int8x16_t w0, int8x16_t w1, int8x16_t w2,
                                                 int8x16_t w3, int8x16_t a) {
    acc = vdotq_laneq_s32(acc, w0, a, 0), acc = vdotq_laneq_s32(acc, w1, a, 1);
    acc = vdotq_laneq_s32(acc, w2, a, 2);
    return vdotq_laneq_s32(acc, w3, a, 3);
}
#endif

#define S8(v) vreinterpretq_s8_u8(v)
#define NIB_LO(v) S8(vandq_u8((v), vdupq_n_u8(15)))
#define NIB_HI(v) S8(vshrq_n_u8((v), 4))

/* Four rows' uint8 (or int8) scales, p[0..3], as int32 lanes. */
static inline int32x4_t rows_u8(const uint8_t *p) {
    return vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(vmovl_u8(vld1_u8(p)))));
}
static inline int32x4_t rows_s8(const int8_t *p) { return vmovl_s16(vget_low_s16(vmovl_s8(vld1_s8(p)))); }

/* Four rows' fp16 scales times the activation scale da, as kq_add takes them. */
static inline float32x4_t rows_f16_times(const uint16_t *h, float da) {
    return vmulq_n_f32(vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h))), da);
}

/* kq_add on four rows' lanes: acc + ((d * da) * sumi - (dmin * da) * summ) */
static inline float32x4_t kq_add4(float32x4_t acc, float32x4_t dd, float32x4_t dm, int32x4_t sumi, int32x4_t summ) {
    return vaddq_f32(acc, vsubq_f32(vmulq_f32(dd, vcvtq_f32_s32(sumi)), vmulq_f32(dm, vcvtq_f32_s32(summ))));
}

/* Q4_K (QH: NULL) and Q5_K (QH: its qh) row by row: sub-block j's 32 products summed in
 * int32 lanes, weighted by its scale (a lane-wise multiply-add), the lanes summed once per
 * super-block. */
#define DEFINE_Q45_K_NEON(NAME, TARGET, DOT16, TYPE, QH)                                                        \
    TARGET static float NAME(const uint8_t *w, const int8_t *q, const float *d, const int32_t *s, int64_t K) { \
        const uint8x16_t one = vdupq_n_u8(1), two = vdupq_n_u8(2);                                             \
        const int32x4_t zero = vdupq_n_s32(0);                                                                 \
        float acc = 0.0f;                                                                                      \
        for (int64_t i = 0; i < K / QKK; i++) {                                                                \
            const TYPE *b = (const TYPE *)w + i;                                                               \
            const int8_t *a = q + i * QKK;                                                                     \
            int32_t sc[8];                                                                                     \
            const int32_t summ = scales_mins_k4(b->scales, s + i * 16, sc);                                    \
            const uint8_t *qh = QH;                                                                            \
            uint8x16_t h0 = vdupq_n_u8(0), h1 = h0; /* Q5_K: qh, shifted right by 2 per chunk */               \
            if (qh) h0 = vld1q_u8(qh), h1 = vld1q_u8(qh + 16);                                                 \
            int32x4_t sum = zero;                                                                              \
            for (int c = 0; c < 4; c++) {                                                                      \
                const uint8x16_t v0 = vld1q_u8(b->qs + 32 * c), v1 = vld1q_u8(b->qs + 32 * c + 16);            \
                int8x16_t l0 = NIB_LO(v0), l1 = NIB_LO(v1), u0 = NIB_HI(v0), u1 = NIB_HI(v1);                  \
                if (qh) { /* bit 2c of qh[l] to bit 4 of sub-block 2c's quant l, bit 2c + 1 to 2c + 1's */     \
                    l0 = vorrq_s8(l0, S8(vshlq_n_u8(vandq_u8(h0, one), 4)));                                   \
                    l1 = vorrq_s8(l1, S8(vshlq_n_u8(vandq_u8(h1, one), 4)));                                   \
                    u0 = vorrq_s8(u0, S8(vshlq_n_u8(vandq_u8(h0, two), 3)));                                   \
                    u1 = vorrq_s8(u1, S8(vshlq_n_u8(vandq_u8(h1, two), 3)));                                   \
                    h0 = vshrq_n_u8(h0, 2), h1 = vshrq_n_u8(h1, 2);                                            \
                }                                                                                              \
                const int8_t *ac = a + 64 * c;                                                                 \
                const int32x4_t lo = DOT16(DOT16(zero, l0, vld1q_s8(ac)), l1, vld1q_s8(ac + 16));              \
                const int32x4_t hi = DOT16(DOT16(zero, u0, vld1q_s8(ac + 32)), u1, vld1q_s8(ac + 48));         \
                sum = vmlaq_n_s32(vmlaq_n_s32(sum, lo, sc[2 * c]), hi, sc[2 * c + 1]);                         \
            }                                                                                                  \
            acc = kq_add(acc, half_to_float(b->d), half_to_float(b->dmin), d[i], vaddvq_s32(sum), summ);       \
        }                                                                                                      \
        return acc;                                                                                            \
    }

/* Q6_K row by row: each group of 16 inputs one DOT16, weighted by its scale. */
#define DEFINE_Q6_K_NEON(NAME, TARGET, DOT16)                                                                  \
    TARGET static float NAME(const uint8_t *w, const int8_t *q, const float *d, const int32_t *s, int64_t K) { \
        const uint8x16_t m4 = vdupq_n_u8(15), m3 = vdupq_n_u8(3), m12 = vdupq_n_u8(12), m30 = vdupq_n_u8(0x30); \
        const int32x4_t zero = vdupq_n_s32(0);                                                                 \
        float acc = 0.0f;                                                                                      \
        for (int64_t i = 0; i < K / QKK; i++) {                                                                \
            const block_q6_K *b = (const block_q6_K *)w + i;                                                   \
            int32x4_t sum = zero;                                                                              \
            for (int h = 0; h < 2; h++) {                                                                      \
                const int8_t *a = q + i * QKK + 128 * h, *sc = b->scales + 8 * h;                              \
                for (int u = 0; u < 2; u++) { /* inputs 16u..16u+15 of each quarter: group 2k + u */           \
                    const uint8x16_t l0 = vld1q_u8(b->ql + 64 * h + 16 * u), l1 = vld1q_u8(b->ql + 64 * h + 32 + 16 * u); \
                    const uint8x16_t qh = vld1q_u8(b->qh + 32 * h + 16 * u);                                  \
                    const uint8x16_t q0 = vorrq_u8(vandq_u8(l0, m4), vshlq_n_u8(vandq_u8(qh, m3), 4));         \
                    const uint8x16_t q1 = vorrq_u8(vandq_u8(l1, m4), vshlq_n_u8(vandq_u8(qh, m12), 2));        \
                    const uint8x16_t q2 = vorrq_u8(vshrq_n_u8(l0, 4), vandq_u8(qh, m30));                      \
                    const uint8x16_t q3 = vorrq_u8(vshrq_n_u8(l1, 4), vandq_u8(vshrq_n_u8(qh, 2), m30));       \
                    sum = vmlaq_n_s32(sum, DOT16(zero, S8(q0), vld1q_s8(a + 16 * u)), sc[u]);                  \
                    sum = vmlaq_n_s32(sum, DOT16(zero, S8(q1), vld1q_s8(a + 32 + 16 * u)), sc[2 + u]);         \
                    sum = vmlaq_n_s32(sum, DOT16(zero, S8(q2), vld1q_s8(a + 64 + 16 * u)), sc[4 + u]);         \
                    sum = vmlaq_n_s32(sum, DOT16(zero, S8(q3), vld1q_s8(a + 96 + 16 * u)), sc[6 + u]);         \
                }                                                                                              \
            }                                                                                                  \
            const int32_t sumi = vaddvq_s32(sum) - q6_offset(b->scales, s + i * 16);                           \
            acc = kq_add(acc, half_to_float(b->d), 0.0f, d[i], sumi, 0);                                       \
        }                                                                                                      \
        return acc;                                                                                            \
    }

/* Quads 4 half .. 4 half + 3 of chunk c's sub-blocks (2c: lo, 2c + 1: hi) for rows 4r..4r+3
 * of a Q4_KX8 or Q5_KX8 block: lo[u], hi[u] hold quad u of the 4 rows. */
static inline void quads_q4kx8(const void *block, int c, int half, int r, int8x16_t lo[4], int8x16_t hi[4]) {
    const block_q4_Kx8 *b = block;
    for (int u = 0; u < 4; u++) {
        const uint8x16_t v = vld1q_u8(b->qs[c][4 * half + u][4 * r]);
        lo[u] = NIB_LO(v), hi[u] = NIB_HI(v);
    }
}

static inline void quads_q5kx8(const void *block, int c, int half, int r, int8x16_t lo[4], int8x16_t hi[4]) {
    const q5_kx8_half *h = &((const block_q5_Kx8 *)block)->q[c][half];
    const uint8x16_t m31 = vdupq_n_u8(31), m24 = vdupq_n_u8(24);
    uint8x16_t top = vld1q_u8(h->qh[4 * r]); /* quad u's 2 bits of hi at 2u */
    for (int u = 0; u < 4; u++) {
        const uint8x16_t v = vld1q_u8(h->qs[u][4 * r]);
        lo[u] = S8(vandq_u8(v, m31));
        hi[u] = S8(vorrq_u8(vshrq_n_u8(v, 5), vandq_u8(vshlq_n_u8(top, 3), m24)));
        top = vshrq_n_u8(top, 2);
    }
}

/* Q4_KX8 and Q5_KX8 (TYPE, its quads read by QUADS): rows 0-3 and 4-7 in two int32x4 (lane
 * r = row r), as q4k_x8_scalar's / q5k_x8_scalar's sums; each row's sub-block scale applied
 * by a lane-wise multiply-add, the mins against the pairs of activation sums by widening
 * multiplies. */
#define DEFINE_Q45_KX8_NEON(NAME, TARGET, ROWS4, TYPE, QUADS)                                                  \
    TARGET static void NAME(const uint8_t *wg, const int8_t *q, const float *d, const int32_t *s, int64_t K,    \
                            float *out) {                                                                      \
        const int32x4_t zero = vdupq_n_s32(0);                                                                 \
        float32x4_t acc[2] = {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)};                                           \
        for (int64_t i = 0; i < K / QKK; i++) {                                                                \
            const TYPE *b = (const TYPE *)wg + i;                                                              \
            const int8_t *a = q + i * QKK;                                                                     \
            const int32_t *s16 = s + i * 16;                                                                   \
            int32x4_t sumi[2] = {zero, zero}, summ[2] = {zero, zero};                                          \
            for (int c = 0; c < 4; c++) {                                                                      \
                int32x4_t lo[2][2], hi[2][2]; /* sub-blocks 2c, 2c + 1: [quads 0-3, 4-7][rows 0-3, 4-7] */    \
                for (int kq = 0; kq < 2; kq++) { /* (apart: shorter chains of dependent dot products) */       \
                    const int8x16_t alo = vld1q_s8(a + 64 * c + 16 * kq), ahi = vld1q_s8(a + 64 * c + 32 + 16 * kq); \
                    for (int r = 0; r < 2; r++) {                                                              \
                        int8x16_t wl[4], wh[4];                                                                \
                        QUADS(b, c, kq, r, wl, wh);                                                            \
                        lo[kq][r] = ROWS4(zero, wl[0], wl[1], wl[2], wl[3], alo);                              \
                        hi[kq][r] = ROWS4(zero, wh[0], wh[1], wh[2], wh[3], ahi);                              \
                    }                                                                                          \
                }                                                                                              \
                /* the pair of activation sums (at most 32 * 127 each) against each row's two mins */          \
                const int16_t p0 = (int16_t)(s16[4 * c] + s16[4 * c + 1]), p1 = (int16_t)(s16[4 * c + 2] + s16[4 * c + 3]); \
                const int16x4_t pair = vset_lane_s16(p1, vset_lane_s16(p1, vdup_n_s16(p0), 1), 3);             \
                const int16x8_t mins = vreinterpretq_s16_u16(vmovl_u8(vld1_u8(b->mins[c][0])));                \
                const int16x8_t mins4 = vreinterpretq_s16_u16(vmovl_u8(vld1_u8(b->mins[c][4])));               \
                for (int r = 0; r < 2; r++) {                                                                  \
                    sumi[r] = vmlaq_s32(sumi[r], vaddq_s32(lo[0][r], lo[1][r]), rows_u8(b->scales[2 * c] + 4 * r)); \
                    sumi[r] = vmlaq_s32(sumi[r], vaddq_s32(hi[0][r], hi[1][r]), rows_u8(b->scales[2 * c + 1] + 4 * r)); \
                    const int16x8_t m = r ? mins4 : mins; /* row pairs: {m0, m1} of rows 4r..4r+3 */           \
                    summ[r] = vaddq_s32(summ[r], vpaddq_s32(vmull_s16(vget_low_s16(m), pair),                  \
                                                            vmull_s16(vget_high_s16(m), pair)));               \
                }                                                                                              \
            }                                                                                                  \
            for (int r = 0; r < 2; r++)                                                                        \
                acc[r] = kq_add4(acc[r], rows_f16_times(b->d + 4 * r, d[i]), rows_f16_times(b->dmin + 4 * r, d[i]), \
                                 sumi[r], summ[r]);                                                            \
        }                                                                                                      \
        vst1q_f32(out, acc[0]), vst1q_f32(out + 4, acc[1]);                                                    \
    }

/* Q6_KX8: rows 0-3 and 4-7 in two int32x4; 4 quads (one group of 16) per ROWS4, weighted
 * by each row's scale of that group; the offset of 32 as q6k_x8_scalar subtracts it. */
#define DEFINE_Q6_KX8_NEON(NAME, TARGET, ROWS4)                                                                \
    TARGET static void NAME(const uint8_t *wg, const int8_t *q, const float *d, const int32_t *s, int64_t K,    \
                            float *out) {                                                                      \
        const uint8x16_t m4 = vdupq_n_u8(15), m3 = vdupq_n_u8(3), m12 = vdupq_n_u8(12), m30 = vdupq_n_u8(0x30); \
        const int32x4_t zero = vdupq_n_s32(0);                                                                 \
        const float32x4_t fzero = vdupq_n_f32(0.0f);                                                           \
        float32x4_t acc[2] = {fzero, fzero};                                                                   \
        for (int64_t i = 0; i < K / QKK; i++) {                                                                \
            const block_q6_Kx8 *b = (const block_q6_Kx8 *)wg + i;                                              \
            const int8_t *a = q + i * QKK;                                                                     \
            const int32_t *s16 = s + i * 16;                                                                   \
            int32x4_t sumi[2] = {zero, zero}, offset[2] = {zero, zero};                                        \
            for (int h = 0; h < 2; h++)                                                                        \
                for (int kq = 0; kq < 2; kq++) { /* quads 4kq..4kq+3 of each quarter: group 8h + 2t + kq */    \
                    const int8_t *ah = a + 128 * h + 16 * kq;                                                  \
                    const int8x16_t a0 = vld1q_s8(ah), a1 = vld1q_s8(ah + 32), a2 = vld1q_s8(ah + 64), a3 = vld1q_s8(ah + 96); \
                    for (int r = 0; r < 2; r++) {                                                              \
                        int8x16_t w[4][4]; /* [quarter t][quad u] */                                           \
                        for (int u = 0; u < 4; u++) {                                                          \
                            const int k = 4 * kq + u;                                                          \
                            const uint8x16_t A = vld1q_u8(b->ql[h][0][k][4 * r]), B = vld1q_u8(b->ql[h][1][k][4 * r]); \
                            const uint8x16_t H = vld1q_u8(b->qh[h][k][4 * r]);                                 \
                            w[0][u] = S8(vorrq_u8(vandq_u8(A, m4), vshlq_n_u8(vandq_u8(H, m3), 4)));           \
                            w[1][u] = S8(vorrq_u8(vandq_u8(B, m4), vshlq_n_u8(vandq_u8(H, m12), 2)));          \
                            w[2][u] = S8(vorrq_u8(vshrq_n_u8(A, 4), vandq_u8(H, m30)));                        \
                            w[3][u] = S8(vorrq_u8(vshrq_n_u8(B, 4), vandq_u8(vshrq_n_u8(H, 2), m30)));         \
                        }                                                                                      \
                        const int8x16_t at[4] = {a0, a1, a2, a3};                                              \
                        for (int t = 0; t < 4; t++)                                                            \
                            sumi[r] = vmlaq_s32(sumi[r], ROWS4(zero, w[t][0], w[t][1], w[t][2], w[t][3], at[t]), \
                                                rows_s8(b->scales[8 * h + 2 * t + kq] + 4 * r));               \
                    }                                                                                          \
                }                                                                                              \
            for (int g = 0; g < 16; g++)                                                                       \
                for (int r = 0; r < 2; r++) offset[r] = vmlaq_n_s32(offset[r], rows_s8(b->scales[g] + 4 * r), s16[g]); \
            /* kq_add with dmin 0 and summ 0, the same operations */                                           \
            const float32x4_t dm = vmulq_n_f32(fzero, d[i]);                                                   \
            for (int r = 0; r < 2; r++)                                                                        \
                acc[r] = kq_add4(acc[r], rows_f16_times(b->d + 4 * r, d[i]), dm,                               \
                                 vsubq_s32(sumi[r], vshlq_n_s32(offset[r], 5)), zero);                         \
        }                                                                                                      \
        vst1q_f32(out, acc[0]), vst1q_f32(out + 4, acc[1]);                                                    \
    }

/* Legacy blocks: lanes 0-3 (elements 0-15, the low nibbles) and 4-7 (16-31, the high ones)
 * in two float32x4, as the portable code's 8 lanes, and summed in its order. */
static inline void fifth_bits_neon(const uint8_t *qh, uint8x16_t *lo, uint8x16_t *hi) {
    static const uint8_t bit[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    static const uint8_t byte_lo[16] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1};
    static const uint8_t byte_hi[16] = {2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3};
    const uint8x16_t bytes = vreinterpretq_u8_u32(vdupq_n_u32(load_u32(qh))), bits = vld1q_u8(bit);
    const uint8x16_t sixteen = vdupq_n_u8(16);
    *lo = vandq_u8(vtstq_u8(vqtbl1q_u8(bytes, vld1q_u8(byte_lo)), bits), sixteen);
    *hi = vandq_u8(vtstq_u8(vqtbl1q_u8(bytes, vld1q_u8(byte_hi)), bits), sixteen);
}

static inline float lanes_sum_neon(float32x4_t l0, float32x4_t l1) { /* lanes_sum's order */
    const float32x4_t v = vaddq_f32(l0, l1); /* l0 + l4, l1 + l5, l2 + l6, l3 + l7 */
    const float32x2_t h = vadd_f32(vget_low_f32(v), vget_high_f32(v));
    return vget_lane_f32(h, 0) + vget_lane_f32(h, 1);
}

#define DEFINE_LEGACY_NEON(NAME, TARGET, SUMS4, TYPE, QH, MIN)                                                 \
    TARGET static float NAME(const uint8_t *w, const int8_t *q, const float *d, const int32_t *s, int64_t K) { \
        float32x4_t l0[2] = {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)}, l1[2] = {l0[0], l0[0]}; /* even, odd */    \
        float mins[8] = {0};                                                                                   \
        for (int64_t i = 0; i < K / QK; i++) {                                                                 \
            const TYPE *b = (const TYPE *)w + i;                                                               \
            const float dw = half_to_float(b->d), mw = MIN;                                                    \
            const uint8x16_t v = vld1q_u8(b->qs);                                                              \
            uint8x16_t lo = vandq_u8(v, vdupq_n_u8(15)), hi = vshrq_n_u8(v, 4);                                \
            const uint8_t *qh = QH;                                                                            \
            if (qh) {                                                                                          \
                uint8x16_t h0, h1;                                                                             \
                fifth_bits_neon(qh, &h0, &h1);                                                                 \
                lo = vorrq_u8(lo, h0), hi = vorrq_u8(hi, h1);                                                  \
            }                                                                                                  \
            const int8_t *a = q + i * QK;                                                                      \
            const float scale = dw * d[i];                                                                     \
            l0[i & 1] = vaddq_f32(l0[i & 1], vmulq_n_f32(vcvtq_f32_s32(SUMS4(S8(lo), vld1q_s8(a))), scale));   \
            l1[i & 1] = vaddq_f32(l1[i & 1], vmulq_n_f32(vcvtq_f32_s32(SUMS4(S8(hi), vld1q_s8(a + 16))), scale)); \
            mins[i & 7] = mins[i & 7] + (mw * d[i]) * (float)s[i];                                             \
        }                                                                                                      \
        return lanes_sum_neon(vaddq_f32(l0[0], l0[1]), vaddq_f32(l1[0], l1[1])) + lanes_sum(mins);             \
    }

#define DEFINE_NEON_SET(SUFFIX, TARGET, DOT16, SUMS4, ROWS4)                                                   \
    DEFINE_Q45_K_NEON(dot_q4_K_##SUFFIX, TARGET, DOT16, block_q4_K, NULL)                                         \
    DEFINE_Q45_K_NEON(dot_q5_K_##SUFFIX, TARGET, DOT16, block_q5_K, b->qh)                                         \
    DEFINE_Q6_K_NEON(dot_q6_K_##SUFFIX, TARGET, DOT16)                                                         \
    DEFINE_Q45_KX8_NEON(q4k_x8_##SUFFIX, TARGET, ROWS4, block_q4_Kx8, quads_q4kx8)                             \
    DEFINE_Q45_KX8_NEON(q5k_x8_##SUFFIX, TARGET, ROWS4, block_q5_Kx8, quads_q5kx8)                             \
    DEFINE_Q6_KX8_NEON(q6k_x8_##SUFFIX, TARGET, ROWS4)                                                         \
    DEFINE_LEGACY_NEON(dot_q4_1_##SUFFIX, TARGET, SUMS4, block_q4_1, NULL, half_to_float(b->m))                   \
    DEFINE_LEGACY_NEON(dot_q5_0_##SUFFIX, TARGET, SUMS4, block_q5_0, b->qh, -16.0f * dw)                           \
    DEFINE_LEGACY_NEON(dot_q5_1_##SUFFIX, TARGET, SUMS4, block_q5_1, b->qh, half_to_float(b->m))

DEFINE_NEON_SET(neon, , dot16_neon, sums4_neon, rows4_neon)
#ifdef MISTOL_DOTPROD
DEFINE_NEON_SET(dotprod, DOTPROD_FN, dot16_dotprod, sums4_dotprod, rows4_dotprod)
#endif
#undef KA4
#undef S8
#undef NIB_LO
#undef NIB_HI
#endif

/* ---------------------------------------------------------------------------------------
 * Selection and the driver
 */
void kquant_select(int impl, qkernels *out) {
    if (impl == IMPL_AUTO) impl = best_impl();
    out->kquant = quantize_k_scalar;
    out->q4k_x8 = q4k_x8_scalar;
    out->q5k_x8 = q5k_x8_scalar;
    out->q6k_x8 = q6k_x8_scalar;
    out->q4k_x8_rows = out->q5k_x8_rows = out->q6k_x8_rows = NULL;
    out->legacy_rows[FMT_Q4_1] = out->legacy_rows[FMT_Q5_0] = out->legacy_rows[FMT_Q5_1] = NULL;
    out->rowdot[FMT_Q4_K] = dot_q4_K_scalar, out->rowdot[FMT_Q5_K] = dot_q5_K_scalar;
    out->rowdot[FMT_Q6_K] = dot_q6_K_scalar, out->rowdot[FMT_Q4_1] = dot_q4_1_scalar;
    out->rowdot[FMT_Q5_0] = dot_q5_0_scalar, out->rowdot[FMT_Q5_1] = dot_q5_1_scalar;
#ifdef MISTOL_X86
    if (impl == IMPL_AVX2 || impl == IMPL_VNNI) {
        out->kquant = quantize_k_avx2;
        out->q4k_x8 = q4k_x8_avx2;
        out->q5k_x8 = q5k_x8_avx2;
        out->q6k_x8 = impl == IMPL_VNNI ? q6k_x8_vnni : q6k_x8_avx2;
        out->q4k_x8_rows = impl == IMPL_VNNI ? q4k_x8_rows_vnni : q4k_x8_rows_avx2;
        out->q5k_x8_rows = impl == IMPL_VNNI ? q5k_x8_rows_vnni : q5k_x8_rows_avx2;
        out->q6k_x8_rows = impl == IMPL_VNNI ? q6k_x8_rows_vnni : q6k_x8_rows_avx2;
        out->rowdot[FMT_Q4_K] = dot_q4_K_avx2, out->rowdot[FMT_Q5_K] = dot_q5_K_avx2;
        out->rowdot[FMT_Q6_K] = dot_q6_K_avx2, out->rowdot[FMT_Q4_1] = dot_q4_1_avx2;
        out->rowdot[FMT_Q5_0] = dot_q5_0_avx2, out->rowdot[FMT_Q5_1] = dot_q5_1_avx2;
        out->legacy_rows[FMT_Q4_1] = rows_q4_1_avx2, out->legacy_rows[FMT_Q5_0] = rows_q5_0_avx2;
        out->legacy_rows[FMT_Q5_1] = rows_q5_1_avx2;
    }
    if (impl == IMPL_VNNI) {
        out->rowdot[FMT_Q4_1] = dot_q4_1_vnni, out->rowdot[FMT_Q5_0] = dot_q5_0_vnni;
        out->rowdot[FMT_Q5_1] = dot_q5_1_vnni;
        out->legacy_rows[FMT_Q4_1] = rows_q4_1_vnni, out->legacy_rows[FMT_Q5_0] = rows_q5_0_vnni;
        out->legacy_rows[FMT_Q5_1] = rows_q5_1_vnni;
    }
#endif
#ifdef MISTOL_ARM
    if (impl == IMPL_NEON) {
        out->kquant = quantize_k_neon;
        out->q4k_x8 = q4k_x8_neon;
        out->q5k_x8 = q5k_x8_neon;
        out->q6k_x8 = q6k_x8_neon;
        out->rowdot[FMT_Q4_K] = dot_q4_K_neon, out->rowdot[FMT_Q5_K] = dot_q5_K_neon;
        out->rowdot[FMT_Q6_K] = dot_q6_K_neon, out->rowdot[FMT_Q4_1] = dot_q4_1_neon;
        out->rowdot[FMT_Q5_0] = dot_q5_0_neon, out->rowdot[FMT_Q5_1] = dot_q5_1_neon;
    }
#ifdef MISTOL_DOTPROD
    if (impl == IMPL_DOTPROD) {
        out->kquant = quantize_k_neon;
        out->q4k_x8 = q4k_x8_dotprod;
        out->q5k_x8 = q5k_x8_dotprod;
        out->q6k_x8 = q6k_x8_dotprod;
        out->rowdot[FMT_Q4_K] = dot_q4_K_dotprod, out->rowdot[FMT_Q5_K] = dot_q5_K_dotprod;
        out->rowdot[FMT_Q6_K] = dot_q6_K_dotprod, out->rowdot[FMT_Q4_1] = dot_q4_1_dotprod;
        out->rowdot[FMT_Q5_0] = dot_q5_0_dotprod, out->rowdot[FMT_Q5_1] = dot_q5_1_dotprod;
    }
#endif
#endif
}

#define ROW_CHUNK 16 /* rows whose blocks stay in cache while several activation rows pass */

void kquant_rows(const qkernels *kn, const mistol_matrix *w, const qact *act, int64_t M, int64_t K, int64_t r0,
                 int64_t r1, float *y, int64_t ldy) {
    /* the repacked layouts: groups of 8 rows (r0 is a multiple of 8) */
    if (w->format == FMT_Q4_KX8 || w->format == FMT_Q5_KX8 || w->format == FMT_Q6_KX8) {
        const int64_t gb = 8 * fmt_row_bytes(w->format, K);
        void (*group)(const uint8_t *, const int8_t *, const float *, const int32_t *, int64_t, float *) =
            w->format == FMT_Q4_KX8 ? kn->q4k_x8 : w->format == FMT_Q5_KX8 ? kn->q5k_x8 : kn->q6k_x8;
        const x8_rows_fn rows = w->format == FMT_Q4_KX8   ? kn->q4k_x8_rows
                                : w->format == FMT_Q5_KX8 ? kn->q5k_x8_rows
                                                          : kn->q6k_x8_rows;
        float out[X8_ROWS * 8];
        for (int64_t g = r0 / 8; g * 8 < r1; g++)
            for (int64_t m0 = 0; m0 < M;) {
                const int64_t mc = rows && act->qkb ? (M - m0 < X8_ROWS ? M - m0 : X8_ROWS) : 1;
                const float *d = act->dk + m0 * (K / QKK);
                const int32_t *s = act->sk + m0 * (K / 16);
                if (mc > 1) rows(w->data + g * gb, act->qkb + m0 * QKK, M, d, s, K, mc, out);
                else group(w->data + g * gb, act->qk + m0 * K, d, s, K, out);
                for (int64_t m = 0; m < mc; m++)
                    for (int64_t r = g * 8; r < g * 8 + 8 && r < r1; r++) y[(m0 + m) * ldy + r] = out[8 * m + r - g * 8];
                m0 += mc;
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
    const legacy_rows_fn rows = act->qab && M > 1 ? kn->legacy_rows[w->format] : NULL;
    if (rows) { /* each row's blocks read once for up to LEGACY_ROWS activation rows */
        for (int64_t r = r0; r < r1; r++)
            for (int64_t m0 = 0; m0 < M; m0 += LEGACY_ROWS)
                rows(w->data + r * rb, act->qab + m0 * 8 * QK, M, d + m0 * nd, s + m0 * ns, K,
                     M - m0 < LEGACY_ROWS ? M - m0 : LEGACY_ROWS, y + m0 * ldy + r, ldy);
        return;
    }
    for (int64_t c0 = r0; c0 < r1; c0 += ROW_CHUNK) {
        const int64_t c1 = c0 + ROW_CHUNK < r1 ? c0 + ROW_CHUNK : r1;
        for (int64_t m = 0; m < M; m++)
            for (int64_t r = c0; r < c1; r++) y[m * ldy + r] = dot(w->data + r * rb, q + m * K, d + m * nd, s + m * ns, K);
    }
}

/* ---------------------------------------------------------------------------------------
 * The legacy types as int8: a Q5_0 block's values are d * (q - 16) with q - 16 in [-16, 15],
 * which a block of the int8 kernels holds exactly (the same fp16 d, quants q - 16); Q4_1's
 * and Q5_1's are d * q + m, q in [0, 31]: an int8 block of quants q and scale d, plus m times
 * the block's activations, which the caller adds from the activations' block sums. Long
 * prompts convert 8 rows at a time and multiply them with the int8 several-row kernels
 * (mistol_gemm_as_int8), which keep each row pair's sums in registers where the types' own
 * kernels unpack every block again for every row.
 */
static void group_to_int8_scalar(int fmt, const uint8_t *const src[IL], int64_t K, block_q8_0x8 *out, float *mins) {
    const int offset = fmt == FMT_Q5_0 ? 16 : 0;
    for (int64_t b = 0; b < K / QK; b++)
        for (int r = 0; r < IL; r++) {
            int8_t q[QK] = {0};
            out[b].d[r] = 0;
            if (mins) mins[b * IL + r] = 0.0f;
            if (src[r]) {
                const legacy_view blk = legacy_at(fmt, src[r], b);
                uint8_t v[QK];
                legacy_quants(&blk, v);
                for (int j = 0; j < QK; j++) q[j] = (int8_t)(v[j] - offset);
                out[b].d[r] = blk.d;
                if (mins) mins[b * IL + r] = half_to_float(blk.m);
            }
            for (int j = 0; j < QK; j += 4) memcpy(out[b].qs + quant_offset(r, j), q + j, 4);
        }
}

#ifdef MISTOL_X86
/* AVX2: a block's 32 quants of each row as one vector (nibbles32 | fifth_bits), then an
 * 8 x 8 transpose of 4-byte quads puts quad c of the 8 rows side by side. */
AVX2_FN static void group_to_int8_avx2(int fmt, const uint8_t *const src[IL], int64_t K, block_q8_0x8 *out,
                                       float *mins) {
    const __m256i offset = _mm256_set1_epi8(fmt == FMT_Q5_0 ? 16 : 0);
    for (int64_t b = 0; b < K / QK; b++) {
        __m256i v[IL];
        for (int r = 0; r < IL; r++) {
            if (!src[r]) {
                v[r] = _mm256_setzero_si256(), out[b].d[r] = 0;
                if (mins) mins[b * IL + r] = 0.0f;
                continue;
            }
            const legacy_view blk = legacy_at(fmt, src[r], b);
            v[r] = _mm256_sub_epi8(_mm256_or_si256(nibbles32(blk.qs), fifth_bits(blk.qh)), offset);
            out[b].d[r] = blk.d;
            if (mins) mins[b * IL + r] = half_to_float(blk.m);
        }
        __m256i t[IL], u[IL];
        for (int r = 0; r < IL; r += 2)
            t[r] = _mm256_unpacklo_epi32(v[r], v[r + 1]), t[r + 1] = _mm256_unpackhi_epi32(v[r], v[r + 1]);
        for (int h = 0; h < IL; h += 4) /* rows h..h+3: u[h + c] holds their quads c and c + 4 */
            u[h] = _mm256_unpacklo_epi64(t[h], t[h + 2]), u[h + 1] = _mm256_unpackhi_epi64(t[h], t[h + 2]),
            u[h + 2] = _mm256_unpacklo_epi64(t[h + 1], t[h + 3]), u[h + 3] = _mm256_unpackhi_epi64(t[h + 1], t[h + 3]);
        for (int c = 0; c < 4; c++) {
            _mm256_storeu_si256((__m256i *)(out[b].qs + 32 * c), _mm256_permute2x128_si256(u[c], u[c + 4], 0x20));
            _mm256_storeu_si256((__m256i *)(out[b].qs + 32 * (c + 4)), _mm256_permute2x128_si256(u[c], u[c + 4], 0x31));
        }
    }
}
#endif

void legacy_group_to_int8(int fmt, const uint8_t *w, int64_t rows, int64_t r0, int64_t K, block_q8_0x8 *out,
                          float *mins) {
    const uint8_t *src[IL];
    for (int r = 0; r < IL; r++) src[r] = r0 + r < rows ? w + (r0 + r) * fmt_row_bytes(fmt, K) : NULL;
    if (fmt == FMT_Q5_0) mins = NULL; /* (its offset is in the quants) */
#ifdef MISTOL_X86
    if (cpu_has_avx2()) {
        group_to_int8_avx2(fmt, src, K, out, mins);
        return;
    }
#endif
    group_to_int8_scalar(fmt, src, K, out, mins);
}

/* ---------------------------------------------------------------------------------------
 * Dequantization (prefill multiplies dequantized tiles; tests read the values)
 */
/* (inlined into a portable and an AVX2 copy of the loops below: mistol_dequantize_rows) */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* A block's fp16 scale as float; a NaN one (a damaged file) as the quiet NaN with no payload,
 * so that every value it makes rounds to a bfloat16 NaN (a payload with its high mantissa
 * bits set would carry into the sign: -0). */
ALWAYS_INLINE float block_scale(uint16_t h) {
    const float f = half_to_float(h);
    return f == f ? f : NAN;
}

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

/* The same from a super-block's 256 quants as bytes, in element order. */
ALWAYS_INLINE void dequantize_k_values(const uint8_t *q, const uint8_t *sc, const uint8_t *mn, float dd, float dm,
                                       float *out) {
    for (int j = 0; j < 8; j++) {
        const float d1 = dd * (float)sc[j], m1 = dm * (float)mn[j];
        for (int l = 0; l < 32; l++) out[32 * j + l] = d1 * (float)q[32 * j + l] - m1;
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

/* Row `lane` of a Q4_KX8 / Q5_KX8 / Q6_KX8 group -> out[K]: the lane's bytes gathered back into
 * the file's order, then the row formats' code (the same float operations). */
ALWAYS_INLINE void dequantize_row_q4k_x8(const uint8_t *group, int lane, int64_t K, float *out) {
    uint8_t qs[128], sc[8], mn[8];
    for (int64_t i = 0; i < K / QKK; i++, out += QKK) {
        const block_q4_Kx8 *b = (const block_q4_Kx8 *)group + i;
        for (int j = 0; j < 8; j++) sc[j] = b->scales[j][lane], mn[j] = b->mins[j / 2][lane][j % 2];
        for (int c = 0; c < 4; c++)
            for (int k = 0; k < 8; k++) memcpy(qs + 32 * c + 4 * k, b->qs[c][k][lane], 4);
        dequantize_k4_block(qs, NULL, sc, mn, block_scale(b->d[lane]), block_scale(b->dmin[lane]), out);
    }
}

/* (Q5_KX8: the lane's quants are unpacked 4 at a time to bytes in element order instead:
 * putting back Q5_K's bit planes costs more than the float loop) */
ALWAYS_INLINE void dequantize_row_q5k_x8(const uint8_t *group, int lane, int64_t K, float *out) {
    uint8_t q[QKK], sc[8], mn[8];
    for (int64_t i = 0; i < K / QKK; i++, out += QKK) {
        const block_q5_Kx8 *b = (const block_q5_Kx8 *)group + i;
        for (int j = 0; j < 8; j++) sc[j] = b->scales[j][lane], mn[j] = b->mins[j / 2][lane][j % 2];
        for (int c = 0; c < 4; c++)
            for (int half = 0; half < 2; half++) {
                const q5_kx8_half *h = &b->q[c][half];
                const uint32_t top = load_u32(h->qh[lane]);
                for (int u = 0; u < 4; u++) { /* lo: sub-block 2c's quants, hi: 2c + 1's, 4 bytes at once */
                    const uint32_t v = load_u32(h->qs[u][lane]);
                    const uint32_t lo = v & 0x1f1f1f1fu;
                    const uint32_t hi = ((v >> 5) & 0x07070707u) | ((top >> (2 * u)) & 0x03030303u) << 3;
                    memcpy(q + 64 * c + 16 * half + 4 * u, &lo, 4);
                    memcpy(q + 64 * c + 32 + 16 * half + 4 * u, &hi, 4);
                }
            }
        dequantize_k_values(q, sc, mn, block_scale(b->d[lane]), block_scale(b->dmin[lane]), out);
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
        dequantize_q6k_block(ql, qh, sc, block_scale(b->d[lane]), out);
    }
}

/* Repacking k-quant rows w[rows][K] into groups of 8 interleaved rows out[ceil(rows / 8)][K / 256]
 * (padding rows zero): `block` moves one row's super-block into its lane of a group's. Groups
 * are shared among threads, each zeroing its own first (so the thread that fills a page
 * touches it first). Returns 0 or a negative error. */
typedef void (*repack_block_fn)(const uint8_t *src, uint8_t *dst, int lane);

static int repack_x8(const uint8_t *w, int64_t rows, int64_t K, uint8_t *out, int nthreads, size_t src_bytes,
                     size_t dst_bytes, repack_block_fn block) {
    if (K <= 0 || K % QKK) return ERR_K;
    if (rows < 0) return ERR_ARG;
    const int64_t nb = K / QKK, groups = (rows + 7) / 8;
    if (nthreads < 1) nthreads = 1;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && groups > 1)
#endif
    for (int64_t g = 0; g < groups; g++) {
        uint8_t *group = out + (size_t)(g * nb) * dst_bytes;
        memset(group, 0, (size_t)nb * dst_bytes);
        for (int lane = 0; lane < 8 && g * 8 + lane < rows; lane++)
            for (int64_t i = 0; i < nb; i++)
                block(w + (size_t)((g * 8 + lane) * nb + i) * src_bytes, group + (size_t)i * dst_bytes, lane);
    }
    return OK;
}

static void repack_q6_k_block(const uint8_t *s, uint8_t *d, int lane) {
    const block_q6_K *src = (const block_q6_K *)s;
    block_q6_Kx8 *dst = (block_q6_Kx8 *)d;
    dst->d[lane] = src->d;
    for (int g = 0; g < 16; g++) dst->scales[g][lane] = src->scales[g];
    for (int h = 0; h < 2; h++)
        for (int k = 0; k < 8; k++) {
            memcpy(dst->ql[h][0][k][lane], src->ql + 64 * h + 4 * k, 4);
            memcpy(dst->ql[h][1][k][lane], src->ql + 64 * h + 32 + 4 * k, 4);
            memcpy(dst->qh[h][k][lane], src->qh + 32 * h + 4 * k, 4);
        }
}

EXPORT int mistol_repack_q6_k_x8(const uint8_t *w, int64_t rows, int64_t K, uint8_t *out, int nthreads) {
    return repack_x8(w, rows, K, out, nthreads, sizeof(block_q6_K), sizeof(block_q6_Kx8), repack_q6_k_block);
}

/* One row's Q4_K/Q5_K super-block scales into lane `lane` of an x8 group: its d and dmin, and
 * its eight 6-bit scales and mins unpacked to bytes (the layouts Q4_KX8 and Q5_KX8 share). */
static void repack_k4_scales(uint16_t d, uint16_t dmin, const uint8_t *packed, int lane, uint16_t *dst_d,
                             uint16_t *dst_dmin, uint8_t scales[8][8], uint8_t mins[4][8][2]) {
    dst_d[lane] = d, dst_dmin[lane] = dmin;
    for (int j = 0; j < 8; j++) {
        int sc, m;
        scale_min_k4(j, packed, &sc, &m);
        scales[j][lane] = (uint8_t)sc, mins[j / 2][lane][j % 2] = (uint8_t)m;
    }
}

static void repack_q5_k_block(const uint8_t *s, uint8_t *d, int lane) {
    const block_q5_K *src = (const block_q5_K *)s;
    block_q5_Kx8 *dst = (block_q5_Kx8 *)d;
    repack_k4_scales(src->d, src->dmin, src->scales, lane, dst->d, dst->dmin, dst->scales, dst->mins);
    for (int c = 0; c < 4; c++)
        for (int half = 0; half < 2; half++) {
            q5_kx8_half *h = &dst->q[c][half];
            for (int u = 0; u < 4; u++)
                for (int e = 0; e < 4; e++) {
                    const int l = 16 * half + 4 * u + e, q = src->qs[32 * c + l], bits = src->qh[l];
                    const int lo = (q & 15) | ((bits >> (2 * c)) & 1) << 4;
                    const int hi = (q >> 4) | ((bits >> (2 * c + 1)) & 1) << 4;
                    h->qs[u][lane][e] = (uint8_t)(lo | (hi & 7) << 5);
                    h->qh[lane][e] |= (uint8_t)((hi >> 3) << (2 * u));
                }
        }
}

EXPORT int mistol_repack_q5_k_x8(const uint8_t *w, int64_t rows, int64_t K, uint8_t *out, int nthreads) {
    return repack_x8(w, rows, K, out, nthreads, sizeof(block_q5_K), sizeof(block_q5_Kx8), repack_q5_k_block);
}

static void repack_q4_k_block(const uint8_t *s, uint8_t *d, int lane) {
    const block_q4_K *src = (const block_q4_K *)s;
    block_q4_Kx8 *dst = (block_q4_Kx8 *)d;
    repack_k4_scales(src->d, src->dmin, src->scales, lane, dst->d, dst->dmin, dst->scales, dst->mins);
    for (int c = 0; c < 4; c++)
        for (int k = 0; k < 8; k++) memcpy(dst->qs[c][k][lane], src->qs + 32 * c + 4 * k, 4);
}

EXPORT int mistol_repack_q4_k_x8(const uint8_t *w, int64_t rows, int64_t K, uint8_t *out, int nthreads) {
    return repack_x8(w, rows, K, out, nthreads, sizeof(block_q4_K), sizeof(block_q4_Kx8), repack_q4_k_block);
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
                dequantize_k4_block(b4->qs, NULL, sc, mn, block_scale(b4->d), block_scale(b4->dmin), out);
            else
                dequantize_k4_block(b5->qs, b5->qh, sc, mn, block_scale(b5->d), block_scale(b5->dmin), out);
        }
    } else if (fmt == FMT_Q6_K) {
        for (int64_t i = 0; i < K / QKK; i++, out += QKK) {
            const block_q6_K *b = (const block_q6_K *)row + i;
            dequantize_q6k_block(b->ql, b->qh, b->scales, block_scale(b->d), out);
        }
    } else {
        for (int64_t i = 0; i < K / QK; i++, out += QK) {
            const uint8_t *qs;
            uint32_t qh = 0;
            float dd, m = 0.0f;
            int offset = 0;
            if (fmt == FMT_Q4_1) {
                const block_q4_1 *b = (const block_q4_1 *)row + i;
                qs = b->qs, dd = block_scale(b->d), m = block_scale(b->m);
            } else if (fmt == FMT_Q5_0) {
                const block_q5_0 *b = (const block_q5_0 *)row + i;
                qs = b->qs, dd = block_scale(b->d), qh = load_u32(b->qh), offset = 16;
            } else {
                const block_q5_1 *b = (const block_q5_1 *)row + i;
                qs = b->qs, dd = block_scale(b->d), m = block_scale(b->m), qh = load_u32(b->qh);
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
        else if (fmt == FMT_Q5_KX8)
            dequantize_row_q5k_x8(w + r / 8 * gb, (int)(r % 8), K, dst);
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
