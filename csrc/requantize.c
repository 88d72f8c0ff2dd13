/* The product of long prompts with the repacked k-quants (Q4_KX8, Q5_KX8, Q6_KX8 of
 * kquant.h) on AVX512-VNNI: each thread requantizes one group of 8 rows at a time to int8,
 * per super-block of 256 inputs (one float scale a row, d = max|x| / 127, q = x * (1 / d)
 * rounded to nearest even), into a buffer that stays in its cache, and multiplies every
 * activation row by it, the activations quantized per 256 as the k-quant kernels take them
 * (kquant_gemv.c). A super-block's integer sums then need no scaling on the way: one float
 * step per 256 inputs, where the k-quants' own kernels scale every 16 or 32 inputs and unpack
 * their bits again for every 8 activation rows, which is most of their time on long prompts.
 *
 * Where the process may use AMX tiles (cpu_has_amx), two groups are requantized side by side
 * and each super-block's integer sums of 16 activation rows by 16 weight rows come from four
 * tile dot products (tdpbssd), then are scaled as above: the same bits as the VNNI path,
 * its products in about a third of the time, so that the requantization is then most of
 * the cost (a 7B Q6_K block at 64 rows: 86 ms on the VNNI path, 42-50 in tiles).
 *
 * The values are those of the kernels' reference (kquant_gemv.c's dequantization: the same
 * float operations), taken 8 rows at once, one row a vector lane: the x8 layouts interleave
 * the rows 4 bytes at a time, so a row's maximum needs no horizontal reduction. A super-block
 * holding a NaN or an infinity gets a NaN scale (and zero quants), so that a damaged file's
 * NaN reaches the output as it does on the other paths.
 */

#include <math.h>
#include <stdlib.h>

#include "kquant.h"
#include "mistol_kernels.h"

#ifdef MISTOL_X86
#define LOAD256(p) _mm256_loadu_si256((const __m256i *)(p))

/* One quad of 8 rows (v[p]: value p of every row) times id, rounded to nearest even, as
 * int8 with row r's 4 bytes at 4r (with MASKED, lanes not in keep: zero; a NaN or an
 * infinity times 0 would be -128). Packs leave the bytes grouped by value within each
 * 128-bit lane (rows 0-3, then 4-7); the shuffle transposes each 4 x 4. */
AVX2_FN static inline __attribute__((always_inline)) __m256i quad_bytes(const __m256 v[4], __m256 id, __m256i keep,
                                                                        int MASKED) {
    const __m256i transpose = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 0, 4, 8, 12, 1, 5,
                                               9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    __m256i q[4];
    for (int p = 0; p < 4; p++) {
        q[p] = _mm256_cvtps_epi32(_mm256_mul_ps(v[p], id));
        if (MASKED) q[p] = _mm256_and_si256(q[p], keep);
    }
    return _mm256_shuffle_epi8(_mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])),
                               transpose);
}

/* The scale of n values of 8 rows (lane r = row r), max|x| / 127, and its inverse (0 for a
 * zero scale); lanes with a NaN or an infinity: a NaN scale, inverse 0, and not in keep
 * (*any_bad: whether there are such lanes). The maximum is taken over the magnitudes' bits
 * as integers, which order as the floats do, and a NaN's or an infinity's are the largest:
 * two operations a vector, in 8 chains (one would wait on each max's latency). */
AVX2_FN static inline __m256 lane_scales(const __m256 *v, int n, __m256 *id, __m256i *keep, int *any_bad) {
    const __m256i magnitude = _mm256_set1_epi32(0x7fffffff);
    __m256i amax8[8];
    for (int j = 0; j < 8; j++) amax8[j] = _mm256_setzero_si256();
    for (int i = 0; i < n; i += 8) /* (n: a multiple of 8) */
        for (int j = 0; j < 8; j++)
            amax8[j] = _mm256_max_epu32(amax8[j], _mm256_and_si256(_mm256_castps_si256(v[i + j]), magnitude));
    __m256i bits = amax8[0];
    for (int j = 1; j < 8; j++) bits = _mm256_max_epu32(bits, amax8[j]);
    const __m256i bad = _mm256_cmpgt_epi32(bits, _mm256_set1_epi32(0x7f7fffff)); /* an infinity's bits or more */
    const __m256 amax = _mm256_castsi256_ps(bits), badf = _mm256_castsi256_ps(bad);
    const __m256 d = _mm256_div_ps(amax, _mm256_set1_ps(127.0f));
    const __m256 zero = _mm256_cmp_ps(d, _mm256_setzero_ps(), _CMP_EQ_OQ);
    *id = _mm256_andnot_ps(_mm256_or_ps(zero, badf), _mm256_div_ps(_mm256_set1_ps(1.0f), d));
    *keep = _mm256_xor_si256(bad, _mm256_set1_epi32(-1));
    *any_bad = !_mm256_testz_si256(bad, bad);
    return _mm256_blendv_ps(d, _mm256_set1_ps(NAN), badf);
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

/* A super-block's 256 values of 8 rows, v[4u + p] = value 4u + p (quad u) of every row,
 * from group block i of each x8 layout (sub-blocks in order, 32 vectors each). */
AVX2_FN static void q4k_x8_values(const uint8_t *group, int64_t i, __m256 v[QKK]) {
    const __m256i m4 = _mm256_set1_epi8(15);
    const block_q4_Kx8 *b = (const block_q4_Kx8 *)group + i;
    const __m256 dd = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b->d));
    const __m256 dm = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b->dmin));
    for (int j = 0; j < 8; j++) { /* sub-block j: chunk j / 2's low (j even) or high nibbles */
        __m256i quads[8];
        for (int k = 0; k < 8; k++) {
            const __m256i q = LOAD256(b->qs[j / 2][k]);
            quads[k] = _mm256_and_si256(j & 1 ? _mm256_srli_epi16(q, 4) : q, m4);
        }
        k4_values_avx2(quads, dd, dm, b->scales[j], b->mins, j, v + QK * j);
    }
}

AVX2_FN static void q5k_x8_values(const uint8_t *group, int64_t i, __m256 v[QKK]) {
    const __m256i m31 = _mm256_set1_epi8(31), m7 = _mm256_set1_epi8(7), m24 = _mm256_set1_epi8(24);
    const block_q5_Kx8 *b = (const block_q5_Kx8 *)group + i;
    const __m256 dd = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b->d));
    const __m256 dm = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b->dmin));
    for (int c = 0; c < 4; c++) { /* sub-blocks 2c (lo) and 2c + 1 (hi), unpacked as the kernels do */
        __m256i lo[8], hi[8];
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
        k4_values_avx2(lo, dd, dm, b->scales[2 * c], b->mins, 2 * c, v + QK * 2 * c);
        k4_values_avx2(hi, dd, dm, b->scales[2 * c + 1], b->mins, 2 * c + 1, v + QK * (2 * c + 1));
    }
}

/* Q6_KX8: sub-block 4h + t (elements 128h + 32t ..) is part t & 1 of half h's low bits and
 * bits 2t, 2t + 1 of its high bits; quads 0-3 have group 8h + 2t's scale, 4-7 the next's.
 * Values (d * scale) * (q - 32), as dequantize_q6k_block. */
AVX2_FN static void q6k_x8_values(const uint8_t *group, int64_t i, __m256 v[QKK]) {
    const __m256i m4 = _mm256_set1_epi8(15), m30 = _mm256_set1_epi8(0x30), off = _mm256_set1_epi32(32);
    const block_q6_Kx8 *b = (const block_q6_Kx8 *)group + i;
    const __m256 dd = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b->d));
    for (int h = 0; h < 2; h++)
        for (int t = 0; t < 4; t++)
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
                        v[QK * (4 * h + t) + 4 * u + p] =
                            _mm256_mul_ps(d1, _mm256_cvtepi32_ps(_mm256_sub_epi32(ints[p], off)));
                }
            }
}

typedef void (*x8_values_fn)(const uint8_t *, int64_t, __m256 *);

static x8_values_fn x8_values(int fmt) {
    return fmt == FMT_Q4_KX8 ? q4k_x8_values : fmt == FMT_Q5_KX8 ? q5k_x8_values : fmt == FMT_Q6_KX8 ? q6k_x8_values : NULL;
}

/* A super-block of 8 rows requantized: their scales, and their values as q + 128 (dpbusd
 * multiplies unsigned bytes; the product takes 128 times the activations' sum off), 8
 * values of every row in each 64 bytes, as the product reads them. */
typedef struct {
    float d[8];        /* the rows' scales */
    uint8_t q[32][64]; /* [chunk c][row r][8]: row r's values 8c..8c+7 as q + 128 */
} sb8_int8;

/* 8 rows' 256 values (v[4u + p]: value 4u + p of every row) -> one sb8_int8. */
AVX2_FN static void requantize256_lanes(const __m256 v[QKK], sb8_int8 *out) {
    __m256 id;
    __m256i keep;
    int any_bad;
    _mm256_storeu_ps(out->d, lane_scales(v, QKK, &id, &keep, &any_bad));
    const __m256i bias = _mm256_set1_epi8((char)0x80);
    for (int c = 0; c < 32; c++) {
        const __m256i a = any_bad ? quad_bytes(v + 8 * c, id, keep, 1) : quad_bytes(v + 8 * c, id, keep, 0);
        const __m256i b = any_bad ? quad_bytes(v + 8 * c + 4, id, keep, 1) : quad_bytes(v + 8 * c + 4, id, keep, 0);
        const __m256i lo = _mm256_unpacklo_epi32(a, b), hi = _mm256_unpackhi_epi32(a, b); /* rows 0,1,4,5 / 2,3,6,7 */
        _mm256_storeu_si256((__m256i *)out->q[c], _mm256_xor_si256(_mm256_permute2x128_si256(lo, hi, 0x20), bias));
        _mm256_storeu_si256((__m256i *)(out->q[c] + 32), _mm256_xor_si256(_mm256_permute2x128_si256(lo, hi, 0x31), bias));
    }
}

/* MC activation rows (m0 ..) against a group's super-blocks wq[nsb], into out[MC][8]. qkb:
 * the activations super-block-major ([i][m][256]), dk their scales [m][nsb], s256 their
 * sums [i][m]. */
VNNI_FN static inline __attribute__((always_inline)) void sb8_rows_vnni(int MC, const sb8_int8 *wq, int64_t nsb,
                                                                         const int8_t *qkb, const float *dk,
                                                                         const int32_t *s256, int64_t M, int64_t m0,
                                                                         float *out) {
    __m256 acc[8];
    for (int m = 0; m < MC; m++) acc[m] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nsb; i++) {
        const sb8_int8 *b = wq + i;
        const int8_t *a = qkb + (i * M + m0) * QKK;
        __m512i sum[8];
        for (int m = 0; m < MC; m++) sum[m] = _mm512_setzero_si512();
        for (int c = 0; c < 32; c++) {
            const __m512i w = _mm512_loadu_si512((const void *)b->q[c]);
            for (int m = 0; m < MC; m++)
                sum[m] = _mm512_dpbusd_epi32(sum[m], w, _mm512_set1_epi64(load_i64(a + m * QKK + 8 * c)));
        }
        const __m256 d = _mm256_loadu_ps(b->d);
        for (int m = 0; m < MC; m++) {
            __m256i t = _mm512_cvtepi64_epi32(_mm512_add_epi32(sum[m], _mm512_srli_epi64(sum[m], 32)));
            t = _mm256_sub_epi32(t, _mm256_set1_epi32(128 * s256[i * M + m0 + m]));
            const __m256 scale = _mm256_mul_ps(d, _mm256_set1_ps(dk[(m0 + m) * nsb + i]));
            acc[m] = _mm256_add_ps(acc[m], _mm256_mul_ps(_mm256_cvtepi32_ps(t), scale));
        }
    }
    for (int m = 0; m < MC; m++) _mm256_storeu_ps(out + 8 * m, acc[m]);
}

#ifdef MISTOL_AMX
/* With AMX tiles two groups (16 weight rows) are requantized side by side, signed, as a
 * tile's B operand takes them: q[u] holds value 4u .. 4u + 3 of each of the 16 rows (4
 * bytes a row, the first group's rows first), so that a 64 x 16 B tile is 16 quads in a
 * row. */
typedef struct {
    float d[16];        /* the rows' scales */
    int8_t q[64][64];   /* [quad u][row r][4]: row r's values 4u .. 4u + 3 */
} sb16_tiles;

/* 8 rows' 256 values (as requantize256_lanes) -> half `half` of one sb16_tiles. */
AVX2_FN static void requantize256_tiles(const __m256 v[QKK], int half, sb16_tiles *out) {
    __m256 id;
    __m256i keep;
    int any_bad;
    _mm256_storeu_ps(out->d + 8 * half, lane_scales(v, QKK, &id, &keep, &any_bad));
    if (any_bad) /* (a NaN or an infinity: a damaged file) */
        for (int u = 0; u < 64; u++)
            _mm256_storeu_si256((__m256i *)(out->q[u] + 32 * half), quad_bytes(v + 4 * u, id, keep, 1));
    else
        for (int u = 0; u < 64; u++)
            _mm256_storeu_si256((__m256i *)(out->q[u] + 32 * half), quad_bytes(v + 4 * u, id, keep, 0));
}

/* The tiles: 0 and 3 sum 16 activation rows x 16 weight rows (int32), from A tiles 1 and 4
 * (16 activation rows x 64 values: a super-block's quarter) and B tiles 2 and 5 (64 values x
 * 16 weight rows, a quad a row). */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

AMX_FN static void tiles_on(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 6; t++) cfg.colsb[t] = 64, cfg.rows[t] = 16;
    /* GCC 12's _tile_loadconfig tells the compiler it reads 8 bytes, so it may drop the
     * stores above (then ldtilecfg faults): a barrier keeps them */
    __asm__ __volatile__("" : : "r"(&cfg) : "memory");
    _tile_loadconfig(&cfg);
}

AMX_FN static void tiles_off(void) { _tile_release(); }

/* Activation rows m0 .. m0 + 15 against a pair's super-blocks wq[nsb], into out[16][16]
 * (qkb and dk as sb8_rows_vnni's, each with 16 rows of padding after the last). Each
 * super-block's integer sums are scaled as sb8_rows_vnni scales them (the same float
 * operations in the same order), two super-blocks at a time, one per accumulator tile. */
AMX_FN static void sb16_rows16_amx(const sb16_tiles *wq, int64_t nsb, const int8_t *qkb, const float *dk, int64_t M,
                                   int64_t m0, float *out) {
    int32_t sums[2][16][16] __attribute__((aligned(64)));
    __m512 acc[16];
    for (int m = 0; m < 16; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t i = 0; i < nsb; i += 2) {
        const int two = i + 1 < nsb;
        const int8_t *a = qkb + (i * M + m0) * QKK;
        _tile_zero(0);
        for (int t = 0; t < 4; t++) {
            _tile_loadd(1, a + 64 * t, QKK);
            _tile_loadd(2, wq[i].q[16 * t], 64);
            _tile_dpbssd(0, 1, 2);
        }
        _tile_stored(0, sums[0], 64);
        if (two) {
            _tile_zero(3);
            for (int t = 0; t < 4; t++) {
                _tile_loadd(4, a + M * QKK + 64 * t, QKK);
                _tile_loadd(5, wq[i + 1].q[16 * t], 64);
                _tile_dpbssd(3, 4, 5);
            }
            _tile_stored(3, sums[1], 64);
        }
        for (int s = 0; s <= two; s++) {
            const __m512 d = _mm512_loadu_ps(wq[i + s].d);
            for (int m = 0; m < 16; m++) {
                const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(dk[(m0 + m) * nsb + i + s]));
                const __m512 t = _mm512_cvtepi32_ps(_mm512_load_si512((const void *)sums[s][m]));
                acc[m] = _mm512_add_ps(acc[m], _mm512_mul_ps(t, scale));
            }
        }
    }
    for (int m = 0; m < 16; m++) _mm512_storeu_ps(out + 16 * m, acc[m]);
}
#endif

VNNI_FN static void sb8_rows8_vnni(const sb8_int8 *wq, int64_t nsb, const int8_t *qkb, const float *dk,
                                   const int32_t *s256, int64_t M, int64_t m0, float *out) {
    sb8_rows_vnni(8, wq, nsb, qkb, dk, s256, M, m0, out);
}
VNNI_FN static void sb8_rows1_vnni(const sb8_int8 *wq, int64_t nsb, const int8_t *qkb, const float *dk,
                                   const int32_t *s256, int64_t M, int64_t m0, float *out) {
    sb8_rows_vnni(1, wq, nsb, qkb, dk, s256, M, m0, out);
}
#endif

#ifdef MISTOL_X86
static void mark_failed(int *failed) { /* (inside a parallel region) */
#ifdef _OPENMP
#pragma omp atomic write
#endif
    *failed = 1;
}

/* This thread's share of the M activation rows x[M][K], quantized per 256 (kquant: the
 * kernels' quantizer) into qkb [i][m][256], dk [m][nsb] and s256 [i][m] (their sums, which
 * only the VNNI path's unsigned products need; NULL: not kept). */
static void quantize_share(const qkernels *kn, const float *x, int64_t M, int64_t K, int8_t *qkb, float *dk,
                           int32_t *s256, int *failed) {
    const int64_t nsb = K / QKK;
    int8_t *q = malloc((size_t)K); /* one row's quants, and its sums per 16 */
    int32_t *s16 = malloc(sizeof(int32_t) * (size_t)(K / 16));
    int64_t m0, m1;
    thread_share(M, &m0, &m1);
    if (!q || !s16) {
        mark_failed(failed);
        m1 = m0;
    }
    for (int64_t m = m0; m < m1; m++) {
        kn->kquant(x + m * K, K, q, dk + m * nsb, s16);
        act_row_to_blocks(q, m, M, K, qkb);
        for (int64_t i = 0; s256 && i < nsb; i++) {
            int32_t sum = 0;
            for (int g = 0; g < 16; g++) sum += s16[i * 16 + g];
            s256[i * M + m] = sum;
        }
    }
    free(q), free(s16);
}

#ifdef MISTOL_AMX
/* This thread's share of the pairs of groups of w (with AMX tiles): each pair requantized
 * into the thread's buffer, then multiplied by every activation row, 16 at a time (the rows
 * past M: padding, their sums not kept). */
AMX_FN static void multiply_share_amx(int fmt, const uint8_t *w, int64_t rows, int64_t K, const int8_t *qkb,
                                      const float *dk, int64_t M, float *y, int64_t ldy, int *failed) {
    const int64_t nsb = K / QKK, gbytes = 8 * fmt_row_bytes(fmt, K), groups = (rows + IL - 1) / IL;
    const x8_values_fn values = x8_values(fmt);
    int64_t p0, p1;
    thread_share((groups + 1) / 2, &p0, &p1);
    sb16_tiles *wq = aligned_alloc(64, sizeof(sb16_tiles) * (size_t)nsb);
    if (!wq) mark_failed(failed);
    if (!wq || *failed) p1 = p0;
    if (p1 > p0) tiles_on(); /* (the configured state is saved at every switch: only while used) */
    __m256 v[QKK];
    float out[16 * 16];
    for (int64_t p = p0; p < p1; p++) {
        for (int64_t i = 0; i < nsb; i++)
            for (int half = 0; half < 2; half++) {
                if (2 * p + half < groups) {
                    values(w + (2 * p + half) * gbytes, i, v);
                    requantize256_tiles(v, half, wq + i);
                } else { /* no second group: zeros */
                    memset(wq[i].d + 8, 0, sizeof(float) * 8);
                    for (int u = 0; u < 64; u++) memset(wq[i].q[u] + 32, 0, 32);
                }
            }
        const int64_t r0 = 2 * p * IL, nr = rows - r0 < 2 * IL ? rows - r0 : 2 * IL;
        for (int64_t m0 = 0; m0 < M; m0 += 16) {
            sb16_rows16_amx(wq, nsb, qkb, dk, M, m0, out);
            for (int64_t m = m0; m < M && m < m0 + 16; m++)
                memcpy(y + m * ldy + r0, out + 16 * (m - m0), sizeof(float) * (size_t)nr);
        }
    }
    if (p1 > p0) tiles_off();
    free(wq);
}
#endif

/* This thread's share of the groups of w: each requantized into the thread's buffer, then
 * multiplied by every activation row, 8 at a time. */
VNNI_FN static void multiply_share(int fmt, const uint8_t *w, int64_t rows, int64_t K, const int8_t *qkb,
                                   const float *dk, const int32_t *s256, int64_t M, float *y, int64_t ldy,
                                   int *failed) {
    const int64_t nsb = K / QKK, gbytes = 8 * fmt_row_bytes(fmt, K);
    const x8_values_fn values = x8_values(fmt);
    int64_t g0, g1;
    thread_share((rows + IL - 1) / IL, &g0, &g1);
    sb8_int8 *wq = malloc(sizeof(sb8_int8) * (size_t)nsb);
    if (!wq) mark_failed(failed);
    if (!wq || *failed) g1 = g0; /* (short of memory anywhere: no thread multiplies) */
    __m256 v[QKK];
    for (int64_t g = g0; g < g1; g++) {
        for (int64_t i = 0; i < nsb; i++) {
            values(w + g * gbytes, i, v);
            requantize256_lanes(v, wq + i);
        }
        const int64_t nr = rows - g * IL < IL ? rows - g * IL : IL;
        float out[8 * 8];
        for (int64_t m0 = 0; m0 < M;) {
            const int mc = M - m0 >= 8 ? 8 : 1;
            if (mc == 8) sb8_rows8_vnni(wq, nsb, qkb, dk, s256, M, m0, out);
            else sb8_rows1_vnni(wq, nsb, qkb, dk, s256, M, m0, out);
            for (int m = 0; m < mc; m++) memcpy(y + (m0 + m) * ldy + g * IL, out + 8 * m, sizeof(float) * (size_t)nr);
            m0 += mc;
        }
    }
    free(wq);
}
#endif

/* y[m * ldy + r] = x[M][K] times the first `rows` rows of fmt (an x8 layout: its groups),
 * requantized as above; AVX512-VNNI CPUs only (else ERR_IMPL). Returns 0 or a negative
 * error. */
EXPORT int mistol_gemm_requantized(int fmt, const uint8_t *w, int64_t rows, int64_t K, const float *x, int64_t M,
                                   float *y, int64_t ldy, int nthreads) {
#ifdef MISTOL_X86
    if (!x8_values(fmt)) return ERR_FMT;
    if (K <= 0 || K % QKK != 0) return ERR_K;
    if (rows < 0 || M < 0 || ldy < rows) return ERR_ARG;
    if (!cpu_has_vnni()) return ERR_IMPL;
    if (M == 0 || rows == 0) return OK;
    qkernels kn;
    if (qkernels_select(IMPL_VNNI, &kn) != OK) return ERR_IMPL;
    const int64_t nsb = K / QKK;
    /* the activations super-block-major (8 rows of one super-block: 2 KB in a row) */
    const int amx = cpu_has_amx(), pad = amx ? 16 : 0; /* (AMX: 16 rows at a time, read past M) */
    int8_t *qkb = malloc((size_t)((M + pad) * K));
    float *dk = malloc(sizeof(float) * (size_t)((M + pad) * nsb));
    int32_t *s256 = amx ? NULL : malloc(sizeof(int32_t) * (size_t)(M * nsb));
    int failed = !qkb || !dk || (!amx && !s256);
    if (!failed) memset(qkb + M * K, 0, (size_t)(pad * K)), memset(dk + M * nsb, 0, sizeof(float) * (size_t)(pad * nsb));
    if (nthreads < 1) nthreads = 1;
    if (!failed) {
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
        {
            quantize_share(&kn, x, M, K, qkb, dk, s256, &failed);
#ifdef _OPENMP
#pragma omp barrier
#endif
#ifdef MISTOL_AMX
            if (amx) multiply_share_amx(fmt, w, rows, K, qkb, dk, M, y, ldy, &failed);
            else
#endif
                multiply_share(fmt, w, rows, K, qkb, dk, s256, M, y, ldy, &failed);
        }
    }
    free(qkb), free(dk), free(s256);
    return failed ? ERR_NOMEM : OK;
#else
    (void)fmt, (void)w, (void)rows, (void)K, (void)x, (void)M, (void)y, (void)ldy, (void)nthreads;
    return ERR_IMPL;
#endif
}
