/* Requantization to int8 for long prompts: rows of llama.cpp's other block types (kquant.h:
 * Q4_K, Q5_K, Q6_K and their x8 layouts, Q4_1, Q5_0, Q5_1) -> Q8_0 blocks in the int8
 * kernels' packed layout (mistol_kernels.h), one untiled matrix [ceil(rows / 8)][K / 32]
 * of block_q8_0x8. A prompt's rows then run on the int8 kernels, which multiply faster than
 * these types' own kernels and than bf16 matmuls once the conversion is shared by enough
 * rows (mistol.block_quant).
 *
 * Each value is dequantized in float32 with the kernels' reference operations
 * (kquant_gemv.c's dequantization), then, per block of 32: d = max|x| / 127, q = x * (1 / d)
 * rounded to nearest even, the scale stored as fp16 (llama.cpp's Q8_0 rounds halves away
 * from zero instead; nearest even is one instruction here, and nothing compares these
 * blocks with llama.cpp's). A block holding a NaN or an infinity gets a NaN scale and zero
 * quants, so a damaged file's NaN reaches the output as it does on the other paths.
 *
 * The x8 layouts have an AVX2 version that takes a group's 8 rows as the 8 lanes of a
 * vector: their quads are already interleaved 4 bytes a row, as the output's are, so a
 * block needs no horizontal maximum and no transposes but one shuffle per 4 values a row.
 * Both versions give the same bits.
 */

#include <math.h>
#include <stdlib.h>

#include "kquant.h"
#include "mistol_kernels.h"

#define ROUNDER 12582912.0f /* 1.5 * 2^23: (v + ROUNDER) - ROUNDER rounds |v| < 2^22 to nearest even */

/* One row's 32 values -> its fp16 scale (returned) and 32 quants. */
static uint16_t requantize_block_scalar(const float *x, int8_t *q) {
    float amax = 0.0f;
    int bad = 0;
    for (int j = 0; j < QK; j++) {
        bad |= !isfinite(x[j]);
        amax = fmaxf(amax, fabsf(x[j]));
    }
    if (bad) {
        memset(q, 0, QK);
        return float_to_half(NAN);
    }
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int j = 0; j < QK; j++) q[j] = (int8_t)(int)((x[j] * id + ROUNDER) - ROUNDER);
    return float_to_half(d);
}

/* Rows [r0, r0 + 8) of any format (rows past `rows` zero) -> one group's blocks, by way of
 * float rows in buf[8][K]. */
static void requantize_group_portable(int fmt, const uint8_t *w, int64_t rows, int64_t r0, int64_t K,
                                      block_q8_0x8 *out, float *buf) {
    const int64_t r1 = r0 + IL < rows ? r0 + IL : rows;
    kquant_rows_to_f32(fmt, w, r0, r1, K, buf);
    memset(buf + (r1 - r0) * K, 0, sizeof(float) * (size_t)((IL - (r1 - r0)) * K));
    for (int64_t b = 0; b < K / QK; b++)
        for (int r = 0; r < IL; r++) {
            int8_t q[QK];
            out[b].d[r] = requantize_block_scalar(buf + r * K + b * QK, q);
            for (int j = 0; j < QK; j += 4) memcpy(out[b].qs + quant_offset(r, j), q + j, 4);
        }
}

#ifdef MISTOL_X86
#define LOAD256(p) _mm256_loadu_si256((const __m256i *)(p))

/* 8 rows' 32 values, v[4u + p] = value 4u + p of every row (lane r = row r) -> one
 * block_q8_0x8. */
AVX2_FN static void requantize_lanes_avx2(const __m256 v[QK], block_q8_0x8 *out) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 amax = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
    for (int i = 0; i < QK; i++) {
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v[i], v[i], _CMP_UNORD_Q));
    }
    const __m256 bad = _mm256_or_ps(nan, _mm256_cmp_ps(amax, _mm256_set1_ps(INFINITY), _CMP_EQ_OQ));
    const __m256 d = _mm256_div_ps(amax, _mm256_set1_ps(127.0f));
    const __m256 zero = _mm256_cmp_ps(d, _mm256_setzero_ps(), _CMP_EQ_OQ);
    const __m256 id = _mm256_andnot_ps(_mm256_or_ps(zero, bad), _mm256_div_ps(_mm256_set1_ps(1.0f), d));
    const __m256 d_out = _mm256_blendv_ps(d, _mm256_set1_ps(NAN), bad);
    _mm_storeu_si128((__m128i *)out->d, _mm256_cvtps_ph(d_out, _MM_FROUND_TO_NEAREST_INT));
    const __m256i keep = _mm256_castps_si256(_mm256_cmp_ps(d_out, d_out, _CMP_ORD_Q)); /* (bad lanes: zero quants) */
    /* 4 values of each row -> their bytes in row order: packs leave them grouped by value
     * within each 128-bit lane (rows 0-3, then 4-7), the shuffle transposes each 4 x 4 */
    const __m256i transpose = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 0, 4, 8, 12, 1, 5,
                                               9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    for (int u = 0; u < QK / 4; u++) {
        __m256i q[4];
        for (int p = 0; p < 4; p++) q[p] = _mm256_and_si256(_mm256_cvtps_epi32(_mm256_mul_ps(v[4 * u + p], id)), keep);
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)(out->qs + 32 * u), _mm256_shuffle_epi8(bytes, transpose));
    }
}

/* A quad vector (4 unsigned byte values of each row) -> its 4 values as int32 lanes. */
AVX2_FN static inline void quad_ints_avx2(__m256i quad, __m256i ints[4]) {
    const __m256i byte = _mm256_set1_epi32(0xff);
    ints[0] = _mm256_and_si256(quad, byte);
    ints[1] = _mm256_and_si256(_mm256_srli_epi32(quad, 8), byte);
    ints[2] = _mm256_and_si256(_mm256_srli_epi32(quad, 16), byte);
    ints[3] = _mm256_srli_epi32(quad, 24);
}

AVX2_FN static inline __m256 bytes_to_floats(const uint8_t *b) { /* 8 unsigned bytes */
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)b)));
}

/* Q4_KX8 / Q5_KX8 sub-block j's quads quads[8] (values 0..31) -> its 32 values of 8 rows:
 * (d * scale) * q - dmin * min, as dequantize_k4_block. */
AVX2_FN static void k4_values_avx2(const __m256i quads[8], __m256 dd, __m256 dm, const uint8_t *scales,
                                   const uint8_t (*mins)[8][2], int j, __m256 v[QK]) {
    uint8_t mn[8];
    for (int r = 0; r < 8; r++) mn[r] = mins[j / 2][r][j % 2];
    const __m256 d1 = _mm256_mul_ps(dd, bytes_to_floats(scales)), m1 = _mm256_mul_ps(dm, bytes_to_floats(mn));
    for (int u = 0; u < 8; u++) {
        __m256i ints[4];
        quad_ints_avx2(quads[u], ints);
        for (int p = 0; p < 4; p++) v[4 * u + p] = _mm256_sub_ps(_mm256_mul_ps(d1, _mm256_cvtepi32_ps(ints[p])), m1);
    }
}

AVX2_FN static void requantize_q4k_x8_avx2(const uint8_t *group, int64_t K, block_q8_0x8 *out) {
    const __m256i m4 = _mm256_set1_epi8(15);
    for (int64_t i = 0; i < K / QKK; i++) {
        const block_q4_Kx8 *b = (const block_q4_Kx8 *)group + i;
        const __m256 dd = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b->d));
        const __m256 dm = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b->dmin));
        for (int j = 0; j < 8; j++) { /* sub-block j: chunk j / 2's low (j even) or high nibbles */
            __m256i quads[8];
            __m256 v[QK];
            for (int k = 0; k < 8; k++) {
                const __m256i q = LOAD256(b->qs[j / 2][k]);
                quads[k] = _mm256_and_si256(j & 1 ? _mm256_srli_epi16(q, 4) : q, m4);
            }
            k4_values_avx2(quads, dd, dm, b->scales[j], b->mins, j, v);
            requantize_lanes_avx2(v, out + 8 * i + j);
        }
    }
}

AVX2_FN static void requantize_q5k_x8_avx2(const uint8_t *group, int64_t K, block_q8_0x8 *out) {
    const __m256i m31 = _mm256_set1_epi8(31), m7 = _mm256_set1_epi8(7), m24 = _mm256_set1_epi8(24);
    for (int64_t i = 0; i < K / QKK; i++) {
        const block_q5_Kx8 *b = (const block_q5_Kx8 *)group + i;
        const __m256 dd = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b->d));
        const __m256 dm = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b->dmin));
        for (int c = 0; c < 4; c++) { /* sub-blocks 2c (lo) and 2c + 1 (hi), unpacked as the kernels do */
            __m256i lo[8], hi[8];
            __m256 v[QK];
            for (int half = 0; half < 2; half++) {
                const q5_kx8_half *h = &b->q[c][half];
                const __m256i top = LOAD256(h->qh);
                for (int u = 0; u < 4; u++) {
                    const __m256i q = LOAD256(h->qs[u]);
                    const __m256i t = u < 2 ? _mm256_slli_epi16(top, 3 - 2 * u) : _mm256_srli_epi16(top, 2 * u - 3);
                    lo[4 * half + u] = _mm256_and_si256(q, m31);
                    hi[4 * half + u] =
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 5), m7), _mm256_and_si256(t, m24));
                }
            }
            k4_values_avx2(lo, dd, dm, b->scales[2 * c], b->mins, 2 * c, v);
            requantize_lanes_avx2(v, out + 8 * i + 2 * c);
            k4_values_avx2(hi, dd, dm, b->scales[2 * c + 1], b->mins, 2 * c + 1, v);
            requantize_lanes_avx2(v, out + 8 * i + 2 * c + 1);
        }
    }
}

/* Q6_KX8: block 4h + t of a super-block (elements 128h + 32t ..) is part t & 1 of half h's
 * low bits and bits 2t, 2t + 1 of its high bits; quads 0-3 have group 8h + 2t's scale,
 * 4-7 the next's. Values (d * scale) * (q - 32), as dequantize_q6k_block. */
AVX2_FN static void requantize_q6k_x8_avx2(const uint8_t *group, int64_t K, block_q8_0x8 *out) {
    const __m256i m4 = _mm256_set1_epi8(15), m30 = _mm256_set1_epi8(0x30), off = _mm256_set1_epi32(32);
    for (int64_t i = 0; i < K / QKK; i++) {
        const block_q6_Kx8 *b = (const block_q6_Kx8 *)group + i;
        const __m256 dd = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b->d));
        for (int h = 0; h < 2; h++)
            for (int t = 0; t < 4; t++) {
                __m256 v[QK];
                for (int kh = 0; kh < 2; kh++) {
                    const __m256i sc = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)b->scales[8 * h + 2 * t + kh]));
                    const __m256 d1 = _mm256_mul_ps(dd, _mm256_cvtepi32_ps(sc));
                    for (int u = 4 * kh; u < 4 * kh + 4; u++) {
                        const __m256i L = LOAD256(b->ql[h][t & 1][u]), H = LOAD256(b->qh[h][u]);
                        const __m256i lo = _mm256_and_si256(t < 2 ? L : _mm256_srli_epi16(L, 4), m4);
                        const __m256i hi = t < 2 ? _mm256_slli_epi16(H, 4 - 2 * t) : t > 2 ? _mm256_srli_epi16(H, 2) : H;
                        __m256i ints[4];
                        quad_ints_avx2(_mm256_or_si256(lo, _mm256_and_si256(hi, m30)), ints);
                        for (int p = 0; p < 4; p++)
                            v[4 * u + p] = _mm256_mul_ps(d1, _mm256_cvtepi32_ps(_mm256_sub_epi32(ints[p], off)));
                    }
                }
                requantize_lanes_avx2(v, out + 8 * i + 4 * h + t);
            }
    }
}

typedef void (*requantize_x8_fn)(const uint8_t *, int64_t, block_q8_0x8 *);

static requantize_x8_fn x8_avx2(int fmt) {
    return fmt == FMT_Q4_KX8 ? requantize_q4k_x8_avx2
         : fmt == FMT_Q5_KX8 ? requantize_q5k_x8_avx2
         : fmt == FMT_Q6_KX8 ? requantize_q6k_x8_avx2
                             : NULL;
}
#endif

/* rows x K of row-order format fmt (an x8 layout: its groups) -> out[ceil(rows / 8)][K / 32]
 * block_q8_0x8; impl IMPL_SCALAR: the portable code alone (tests compare the two). Returns 0
 * or a negative error. */
EXPORT int mistol_requantize_int8(int fmt, const uint8_t *w, int64_t rows, int64_t K, uint8_t *out, int nthreads,
                                  int impl) {
    if (!fmt_row_order(fmt)) return ERR_FMT;
    if (K <= 0 || K % fmt_k_multiple(fmt) != 0) return ERR_K;
    if (rows < 0) return ERR_ARG;
    const int64_t groups = (rows + IL - 1) / IL, B = K / QK;
    void (*x8)(const uint8_t *, int64_t, block_q8_0x8 *) = NULL;
#ifdef MISTOL_X86
    if (impl != IMPL_SCALAR && cpu_has_avx2()) x8 = x8_avx2(fmt);
#else
    (void)impl;
#endif
    int failed = 0;
    if (nthreads < 1) nthreads = 1;
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && rows * K > (1 << 16))
#endif
    {
        float *buf = x8 ? NULL : malloc(sizeof(float) * (size_t)(IL * K)); /* a group's rows, dequantized */
        int64_t g0, g1;
        thread_share(groups, &g0, &g1);
        if (!x8 && !buf) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            failed = 1;
            g1 = g0;
        }
        for (int64_t g = g0; g < g1; g++) {
            block_q8_0x8 *dst = (block_q8_0x8 *)out + g * B;
            if (x8) x8(w + g * 8 * fmt_row_bytes(fmt, K), K, dst);
            else requantize_group_portable(fmt, w, rows, g * IL, K, dst, buf);
        }
        free(buf);
    }
    return failed ? ERR_NOMEM : OK;
}
