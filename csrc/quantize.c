/* Weight (de)quantization: float rows -> llama.cpp Q8_0/Q4_0 blocks (row order or the
 * packed layout of mistol_kernels.h), and packed groups -> float32/bf16 rows. */

#include <math.h>

#include "mistol_kernels.h"

/* Group block b of a packed matrix in format fmt: where its 8 scales and its quant bytes are. */
static void group_block_parts(int fmt, uint8_t *w, int64_t b, uint16_t **d, uint8_t **qs) {
    if (fmt == FMT_INT8) {
        block_q8_0x8 *g = (block_q8_0x8 *)w + b;
        *d = g->d, *qs = (uint8_t *)g->qs;
    } else {
        block_q4_0x8 *g = (block_q4_0x8 *)w + b;
        *d = g->d, *qs = g->qs;
    }
}

/* ---------------------------------------------------------------------------------------
 * Dequantization of packed groups to float32 or bfloat16 rows, for the matmuls of long
 * prefills (compute-bound: bf16 dot-product instructions outrun the int8 kernels there).
 * out[groups * 8][K], padding rows included; each value d * q is exact in float32 and
 * rounded once to bf16 (to nearest even).
 */
static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16); /* finite values only */
}

/* One row's block: 32 int8 values q times d, stored as float32 or bf16. */
static void dequantize_row_scalar(const int8_t *q, float d, int out_type, void *out) {
    for (int j = 0; j < QK; j++) {
        const float v = d * (float)q[j];
        if (out_type == DT_F32) ((float *)out)[j] = v;
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
    if (out_type == DT_F32) {
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
    const int64_t qb = quant_bytes(fmt), esize = out_type == DT_F32 ? 4 : 2;
    for (int64_t b = 0; b < B; b++) {
        uint16_t *d;
        uint8_t *qs;
        group_block_parts(fmt, (uint8_t *)wg, b, &d, &qs);
        for (int r = 0; r < IL; r++) {
            uint8_t bytes[QK];
            int8_t q[QK];
            for (int j = 0; j < qb; j += 4) memcpy(bytes + j, qs + quant_offset(r, j), 4);
            if (fmt == FMT_INT8) {
                memcpy(q, bytes, QK);
            } else {
                for (int j = 0; j < QK / 2; j++) q[j] = (int8_t)((bytes[j] & 15) - 8);
                for (int j = 0; j < QK / 2; j++) q[j + QK / 2] = (int8_t)((bytes[j] >> 4) - 8);
            }
            row_fn(q, half_to_float(d[r]), out_type, (uint8_t *)out + (r * K + b * QK) * esize);
        }
    }
}

EXPORT int mistol_dequantize(int fmt, const uint8_t *w, int64_t groups, int64_t K, void *out, int out_type,
                             int nthreads) {
    if (fmt != FMT_INT8 && fmt != FMT_INT4) return ERR_FMT;
    if (K <= 0 || K % QK != 0) return ERR_K;
    if (groups < 0 || (out_type != DT_F32 && out_type != DT_BF16)) return ERR_ARG;
    const int64_t B = K / QK, gbytes = B * group_block_bytes(fmt);
    const int64_t esize = out_type == DT_F32 ? 4 : 2;
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
 * fp16 d + 16 bytes = 18 bytes: block_q8_0, block_q4_0) or the packed layout, padding rows
 * zeroed.
 */
static void load_block(const void *x, int xtype, int64_t off, float *buf) {
    if (xtype == DT_F32) {
        memcpy(buf, (const float *)x + off, QK * sizeof(float));
    } else if (xtype == DT_BF16) {
        const uint16_t *h = (const uint16_t *)x + off;
        for (int j = 0; j < QK; j++) buf[j] = bf16_to_float(h[j]);
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

/* One row's 32 values -> a Q8_0 block's fp16 scale (returned) and 32 quants. */
static uint16_t quantize_q8_0_block(const float *x, uint8_t *q_out) {
    float amax = 0.0f;
    for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(x[j]));
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int j = 0; j < QK; j++) q_out[j] = (uint8_t)(int8_t)round_away(x[j] * id);
    return float_to_half(d);
}

/* One row's 32 values -> a Q4_0 block's fp16 scale (returned) and 16 bytes of nibbles. */
static uint16_t quantize_q4_0_block(const float *x, uint8_t *q_out) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < QK; j++) {
        if (amax < fabsf(x[j])) {
            amax = fabsf(x[j]);
            max = x[j];
        }
    }
    const float d = max / -8, id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int j = 0; j < QK / 2; j++) {
        const int xi0 = (int)(int8_t)(x[j] * id + 8.5f), xi1 = (int)(int8_t)(x[QK / 2 + j] * id + 8.5f);
        q_out[j] = (uint8_t)((xi0 < 15 ? xi0 : 15) | ((xi1 < 15 ? xi1 : 15) << 4));
    }
    return float_to_half(d);
}

/* One block of 32 values (f32, bf16 or f16 at x + off) quantized: its fp16 scale (returned)
 * and its quants, in Q8_0 or Q4_0. */
static uint16_t quantize_block(int fmt, const void *x, int xtype, int64_t off, uint8_t *qs) {
    float buf[QK];
    load_block(x, xtype, off, buf);
    return fmt == FMT_INT8 ? quantize_q8_0_block(buf, qs) : quantize_q4_0_block(buf, qs);
}

#ifdef MISTOL_X86
/* The same on AVX2 and F16C, the same operations lane by lane (no FMA: -ffp-contract=off): the
 * same bits. Loading a checkpoint spends its time here: from bf16 or f16, 2-4.7x the scalar
 * code's speed. */
AVX2_FN static uint16_t quantize_block_avx2(int fmt, const void *x, int xtype, int64_t off, uint8_t *qs) {
    __m256 v[4];
    for (int k = 0; k < 4; k++) {
        if (xtype == DT_F32) {
            v[k] = _mm256_loadu_ps((const float *)x + off + 8 * k);
        } else {
            const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + off + 8 * k));
            v[k] = xtype == DT_BF16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                                    : _mm256_cvtph_ps(h);
        }
    }
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 abs[4], m8;
    for (int k = 0; k < 4; k++) { /* |x|, a NaN as 0: fmaxf and the scalar search pass NaNs over */
        abs[k] = _mm256_andnot_ps(sign, v[k]);
        abs[k] = _mm256_and_ps(abs[k], _mm256_cmp_ps(abs[k], abs[k], _CMP_ORD_Q));
    }
    m8 = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    __m256i q[4];
    float d;
    if (fmt == FMT_INT8) {
        d = amax / 127.0f;
        const __m256 id = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
        for (int k = 0; k < 4; k++) { /* round_away, lane by lane */
            const __m256 t = _mm256_mul_ps(v[k], id);
            const __m256i i = _mm256_cvttps_epi32(t);
            const __m256 f = _mm256_sub_ps(t, _mm256_cvtepi32_ps(i));
            const __m256i up = _mm256_castps_si256(_mm256_cmp_ps(f, _mm256_set1_ps(0.5f), _CMP_GE_OQ));
            const __m256i down = _mm256_castps_si256(_mm256_cmp_ps(f, _mm256_set1_ps(-0.5f), _CMP_LE_OQ));
            q[k] = _mm256_add_epi32(_mm256_sub_epi32(i, up), down); /* (masks are -1 where true) */
            q[k] = _mm256_and_si256(q[k], _mm256_set1_epi32(0xff)); /* the low byte, as the C cast takes it */
        }
        const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(q[0], q[1]), _mm256_packus_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)qs, _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    } else {
        /* the first value of the largest magnitude, with its sign (0 if all are 0): without
         * branches, whose misses (where it lies is random) cost more than the rest */
        uint32_t hits = 0;
        float values[QK];
        for (int k = 0; k < 4; k++) {
            hits |= (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(abs[k], _mm256_set1_ps(amax), _CMP_EQ_OQ)) << (8 * k);
            _mm256_storeu_ps(values + 8 * k, v[k]);
        }
        const float max = amax != 0.0f ? values[__builtin_ctz(hits | 0x80000000u)] : 0.0f;
        d = max / -8;
        const __m256 id = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f), bias = _mm256_set1_ps(8.5f);
        for (int k = 0; k < 4; k++) { /* (int)(int8_t)(x * id + 8.5f), at most 15 */
            const __m256i i = _mm256_cvttps_epi32(_mm256_add_ps(_mm256_mul_ps(v[k], id), bias));
            q[k] = _mm256_min_epi32(_mm256_srai_epi32(_mm256_slli_epi32(i, 24), 24), _mm256_set1_epi32(15));
        }
        /* byte j: element j in the low nibble, element 16 + j in the high one (the low byte of the
         * int the C code forms, out-of-range values included) */
        const __m256i low = _mm256_set1_epi32(0xff);
        const __m256i b0 = _mm256_and_si256(_mm256_or_si256(q[0], _mm256_slli_epi32(q[2], 4)), low);
        const __m256i b1 = _mm256_and_si256(_mm256_or_si256(q[1], _mm256_slli_epi32(q[3], 4)), low);
        const __m256i words = _mm256_permute4x64_epi64(_mm256_packus_epi32(b0, b1), 0xd8); /* 16 words in order */
        const __m128i bytes = _mm_packus_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
        _mm_storeu_si128((__m128i *)qs, bytes);
    }
    return float_to_half(d);
}
#endif

/* Row-order output: block b of llama.cpp's blocks in format fmt. */
static void store_row_block(int fmt, uint8_t *out, int64_t b, uint16_t d, const uint8_t *qs) {
    if (fmt == FMT_INT8) {
        block_q8_0 *blk = (block_q8_0 *)out + b;
        blk->d = d, memcpy(blk->qs, qs, sizeof blk->qs);
    } else {
        block_q4_0 *blk = (block_q4_0 *)out + b;
        blk->d = d, memcpy(blk->qs, qs, sizeof blk->qs);
    }
}

EXPORT int mistol_quantize(int fmt, const void *x, int xtype, int64_t n, int64_t K, uint8_t *out, int packed,
                           int nthreads) {
    if (fmt != FMT_INT8 && fmt != FMT_INT4) return ERR_FMT;
    if (xtype < DT_F32 || xtype > DT_F16 || n < 0) return ERR_ARG;
    if (K <= 0 || K % QK != 0) return ERR_K;
    const int64_t B = K / QK, qb = quant_bytes(fmt);
    const int64_t units = packed ? (n + IL - 1) / IL : n; /* groups of 8 rows, or rows */
    uint16_t (*quantize_one)(int, const void *, int, int64_t, uint8_t *) = quantize_block;
#ifdef MISTOL_X86
    if (cpu_has_avx2()) quantize_one = quantize_block_avx2;
#endif
    if (nthreads < 1) nthreads = 1;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && units * B > 4096)
#endif
    for (int64_t u = 0; u < units; u++) {
        const int64_t r0 = packed ? u * IL : u, rows = packed ? IL : 1;
        for (int64_t b = 0; b < B; b++) {
            for (int64_t i = 0; i < rows; i++) {
                uint8_t qs[QK] = {0};
                uint16_t d = 0; /* padding row: zero scale and quants read as zero weights */
                if (r0 + i < n) d = quantize_one(fmt, x, xtype, (r0 + i) * K + b * QK, qs);
                if (!packed) {
                    store_row_block(fmt, out, u * B + b, d, qs);
                    continue;
                }
                uint16_t *group_d; /* row i of group block (u, b): its scale, its quants interleaved */
                uint8_t *group_qs;
                group_block_parts(fmt, out, u * B + b, &group_d, &group_qs);
                group_d[i] = d;
                for (int64_t j = 0; j < qb; j += 4) memcpy(group_qs + quant_offset((int)i, (int)j), qs + j, 4);
            }
        }
    }
    return OK;
}

/* llama.cpp Q8_0/Q4_0 rows (blocks[n][K/32], each the fp16 scale then the quants: a GGUF
 * tensor's bytes) -> the packed layout's groups in row order, as mistol_quantize writes them
 * with `packed`: the file's blocks moved, not requantized (padding rows zero). */
EXPORT int mistol_pack_blocks(int fmt, const uint8_t *blocks, int64_t n, int64_t K, uint8_t *out, int nthreads) {
    if (fmt != FMT_INT8 && fmt != FMT_INT4) return ERR_FMT;
    if (n < 0) return ERR_ARG;
    if (K <= 0 || K % QK != 0) return ERR_K;
    const int64_t B = K / QK, qb = quant_bytes(fmt), block_bytes = 2 + qb, groups = (n + IL - 1) / IL;
    if (nthreads < 1) nthreads = 1;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && groups * B > 4096)
#endif
    for (int64_t u = 0; u < groups; u++)
        for (int64_t b = 0; b < B; b++) {
            uint16_t *group_d;
            uint8_t *group_qs;
            group_block_parts(fmt, out, u * B + b, &group_d, &group_qs);
            for (int i = 0; i < IL; i++) {
                static const uint8_t zeros[QK + 2];
                const int64_t r = u * IL + i;
                const uint8_t *src = r < n ? blocks + (r * B + b) * block_bytes : zeros;
                memcpy(&group_d[i], src, 2);
                for (int j = 0; j < qb; j += 4) memcpy(group_qs + quant_offset(i, j), src + 2 + j, 4);
            }
        }
    return OK;
}
