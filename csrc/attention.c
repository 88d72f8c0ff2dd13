/* The KV cache's row formats and the decode layer's attention (attention.h).
 *
 * A float16 cache (KV_F16) holds keys and values in half the bytes: rows are rounded to f16
 * as they are written (to nearest even, as torch's .to(float16)). A Q8_0 cache (KV_Q8_0)
 * holds them in about a quarter: each block of 32 values of a row as int8 with a float16
 * scale, quantized as they are written (as llama.cpp's quantize_row_q8_0_ref, and
 * mistol/model/kv_cache.py's quantize_q8_0: the same bits). Either is turned back into
 * float32 a chunk of KV_CHUNK rows at a time as attention reads them, into a per-thread
 * scratch that stays in L1.
 *
 * At long contexts attention takes much of a decode step. Each key costs a dot product, an
 * exponential and a multiply-add per value; taken one call per key (a dot product, libm's
 * expf, an axpy), that arithmetic outweighed reading the cache. The AVX2 kernels take eight
 * keys at a time (eight sums reduced together, in one transposing step, to eight scores),
 * exponentials eight at a time, and keep a head's output in registers across a chunk's
 * values; reading the cache is then most of what is left (a 7B's 4,000 keys of f16: 508 MB a
 * step). A key's arithmetic is the same wherever it falls among the eight: a token's bits do
 * not depend on how many keys there are beyond its own, nor on the other tokens of the call.
 */

#include <float.h>
#include <math.h>
#include <string.h>

#include "attention.h"
#include "mistol_kernels.h"

/* ---------------------------------------------------------------------------------------
 * Storing rows: float32, float16, Q8_0
 */

static inline int round_away(float v) { /* roundf for |v| < 2^31, without a libm call */
    int i = (int)v;
    float f = v - (float)i;
    return i + (f >= 0.5f) - (f <= -0.5f);
}

/* x[d] (d a multiple of 32) -> Q8_0: per block d = max|x| / 127, q = roundf(x * (1 / d)).
 * A NaN makes its block's scale NaN (as PyTorch's max does; fmaxf would skip it and the
 * block would read back finite); an infinity makes it inf (1 / d = 0); the quants of either
 * are 0 (a float -> int conversion of NaN is undefined). */
static void store_q8_0(const float *x, void *rows, uint16_t *scales, int64_t at, int64_t d) {
    int8_t *q = (int8_t *)rows + at;
    scales += at / QK;
    for (int64_t b = 0; b < d / QK; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        int nan = 0;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(xb[j])), nan |= xb[j] != xb[j];
        const float scale = nan ? NAN : amax / 127.0f, inv = scale != 0.0f && scale <= FLT_MAX ? 1.0f / scale : 0.0f;
        scales[b] = float_to_half(scale);
        for (int j = 0; j < QK; j++) {
            const float v = xb[j] * inv;
            q[b * QK + j] = v == v ? (int8_t)round_away(v) : 0;
        }
    }
}

static void store_f32(const float *x, void *rows, uint16_t *scales, int64_t at, int64_t d) {
    (void)scales;
    memcpy((float *)rows + at, x, sizeof(float) * (size_t)d);
}

static void store_f16_scalar(const float *x, void *rows, uint16_t *scales, int64_t at, int64_t d) {
    (void)scales;
    uint16_t *h = (uint16_t *)rows + at;
    for (int64_t i = 0; i < d; i++) h[i] = float_to_half(x[i]);
}

static void load_q8_0_scalar(kv_rows src, int64_t s0, int64_t n, int64_t d, float *out) {
    const int8_t *q = (const int8_t *)src.rows + s0 * d;
    const uint16_t *scales = src.scales + s0 * (d / QK);
    for (int64_t b = 0; b < n * d / QK; b++) {
        const float scale = half_to_float(scales[b]);
        for (int j = 0; j < QK; j++) out[b * QK + j] = (float)q[b * QK + j] * scale;
    }
}

static void load_f16_scalar(kv_rows src, int64_t s0, int64_t n, int64_t d, float *out) {
    const uint16_t *h = (const uint16_t *)src.rows + s0 * d;
    for (int64_t i = 0; i < n * d; i++) out[i] = half_to_float(h[i]);
}

#ifdef MISTOL_X86
AVX2_FN static void store_f16_f16c(const float *x, void *rows, uint16_t *scales, int64_t at, int64_t d) {
    (void)scales;
    uint16_t *h = (uint16_t *)rows + at;
    int64_t i = 0;
    for (; i + 8 <= d; i += 8)
        _mm_storeu_si128((__m128i *)(h + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < d; i++) h[i] = float_to_half(x[i]);
}

AVX2_FN static void load_f16_f16c(kv_rows src, int64_t s0, int64_t n, int64_t d, float *out) {
    const uint16_t *h = (const uint16_t *)src.rows + s0 * d;
    int64_t i = 0;
    for (; i + 8 <= n * d; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
    for (; i < n * d; i++) out[i] = half_to_float(h[i]);
}

AVX2_FN static void load_q8_0_avx2(kv_rows src, int64_t s0, int64_t n, int64_t d, float *out) {
    const int8_t *q = (const int8_t *)src.rows + s0 * d;
    const uint16_t *scales = src.scales + s0 * (d / QK);
    for (int64_t b = 0; b < n * d / QK; b++) {
        const __m256 scale = _mm256_set1_ps(half_to_float(scales[b]));
        for (int j = 0; j < QK; j += 8) {
            const __m256i q32 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + b * QK + j)));
            _mm256_storeu_ps(out + b * QK + j, _mm256_mul_ps(_mm256_cvtepi32_ps(q32), scale));
        }
    }
}
#endif

kv_rows kv_view(int cache_type, const void *rows, const uint16_t *scales, int64_t at) {
    const size_t size = cache_type == KV_F32 ? 4 : cache_type == KV_F16 ? 2 : 1;
    return (kv_rows){(const uint8_t *)rows + (size_t)at * size, cache_type == KV_Q8_0 ? scales + at / QK : NULL};
}

/* ---------------------------------------------------------------------------------------
 * Generic steps: a dot product per key, y += p * v per key (any head size; NEON and the
 * scalar build give them their own dot and axpy)
 */

static float dot_scalar(const float *a, const float *b, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static void axpy_scalar(float a, const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

static void scores_generic(const attention_kernels *a, const float *q, const float *keys, int64_t n, int64_t d,
                           float scale, float *out) {
    for (int64_t s = 0; s < n; s++) out[s] = a->dot(q, keys + s * d, d) * scale;
}

static void softmax_generic(float *x, int64_t n) {
    float top = -INFINITY, sum = 0.0f;
    for (int64_t s = 0; s < n; s++) top = x[s] > top ? x[s] : top;
    for (int64_t s = 0; s < n; s++) sum += x[s] = x[s] == -INFINITY ? 0.0f : expf(x[s] - top);
    for (int64_t s = 0; s < n; s++) x[s] /= sum;
}

static void weighted_sum_generic(const attention_kernels *a, const float *p, const float *values, int64_t n, int64_t d,
                                 float *out) {
    for (int64_t s = 0; s < n; s++)
        if (p[s] != 0.0f) a->axpy(p[s], values + s * d, out, d);
}

#ifdef MISTOL_ARM
/* NEON, the AVX2 dot product's arithmetic on 4 lanes: fused multiply-adds, four partial sums */
static float dot_neon(const float *a, const float *b, int64_t n) {
    float32x4_t s0 = vdupq_n_f32(0.0f), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
        s1 = vfmaq_f32(s1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
        s2 = vfmaq_f32(s2, vld1q_f32(a + i + 8), vld1q_f32(b + i + 8));
        s3 = vfmaq_f32(s3, vld1q_f32(a + i + 12), vld1q_f32(b + i + 12));
    }
    float s = vaddvq_f32(vaddq_f32(vaddq_f32(s0, s1), vaddq_f32(s2, s3)));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static void axpy_neon(float a, const float *x, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(x + i), a));
    for (; i < n; i++) y[i] += a * x[i];
}
#endif

/* ---------------------------------------------------------------------------------------
 * AVX2 (head sizes a multiple of 8)
 */
#ifdef MISTOL_X86
/* The sum of v's lanes as ((0+1)+(2+3)) + ((4+5)+(6+7)): the order sum8x8 gives each key. */
AVX2_FN static inline float sum8(__m256 v) {
    const __m256 pairs = _mm256_hadd_ps(v, v), quads = _mm256_hadd_ps(pairs, pairs);
    return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(quads), _mm256_extractf128_ps(quads, 1)));
}

/* The sums of a0..a7's lanes, each in sum8's order, as one vector [sum a0, ..., sum a7]. */
AVX2_FN static inline __m256 sum8x8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6,
                                    __m256 a7) {
    const __m256 lo = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3)); /* [a0..a3 low | a0..a3 high] */
    const __m256 hi = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

AVX2_FN static void scores_avx2(const attention_kernels *a, const float *q, const float *keys, int64_t n, int64_t d,
                                float scale, float *out) {
    (void)a;
    int64_t s = 0;
    for (; s + 8 <= n; s += 8) { /* eight keys: eight sums, each over the head in 8-lane steps */
        const float *k = keys + s * d;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        for (int64_t i = 0; i < d; i += 8) {
            const __m256 qi = _mm256_loadu_ps(q + i);
            a0 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + i), a0);
            a1 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + d + i), a1);
            a2 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + 2 * d + i), a2);
            a3 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + 3 * d + i), a3);
            a4 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + 4 * d + i), a4);
            a5 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + 5 * d + i), a5);
            a6 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + 6 * d + i), a6);
            a7 = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + 7 * d + i), a7);
        }
        _mm256_storeu_ps(out + s, _mm256_mul_ps(sum8x8(a0, a1, a2, a3, a4, a5, a6, a7), _mm256_set1_ps(scale)));
    }
    for (; s < n; s++) { /* the last keys one by one, each with the same arithmetic */
        const float *k = keys + s * d;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(k + i), acc);
        out[s] = sum8(acc) * scale;
    }
}

/* exp(x) for x <= 0 (a softmax's shifted scores), within 1 ulp of the exact value; 0 below FLT_MIN's
 * logarithm (and for -inf), NaN for NaN: exp(x) = 2^n e^r with n = round(x / ln 2), r = x - n ln 2
 * in [-ln 2 / 2, ln 2 / 2], and e^r = 1 + r + r^2 P(r), P Cephes's degree-5 polynomial. */
AVX2_FN static inline __m256 exp_avx2(__m256 x) {
    const __m256 smallest = _mm256_set1_ps(-87.33654f); /* log(FLT_MIN): below, 2^n is not normal */
    const __m256 tiny = _mm256_cmp_ps(x, smallest, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(smallest, x)); /* (NaN stays NaN: the second operand) */
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x); /* ln 2 in two parts, the first exact */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(two_n)));
}

/* The softmax 8 scores at a time; the last few in a masked vector, so that score s always
 * sits in lane s % 8 and its sum is the same whatever n (padding adds exact zeros). */
AVX2_FN static void softmax_avx2(float *x, int64_t n) {
    const int64_t full = n / 8 * 8;
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - full)), lanes); /* the lanes past `full` */
    const __m256 minus_inf = _mm256_set1_ps(-INFINITY);
    /* the last n - full scores, with -inf in the lanes past them (their exponentials: zeros) */
    const __m256 rest = _mm256_blendv_ps(minus_inf, _mm256_maskload_ps(x + full, tail), _mm256_castsi256_ps(tail));
    __m256 top = _mm256_max_ps(rest, minus_inf); /* (max_ps skips a NaN in its first operand) */
    for (int64_t s = 0; s < full; s += 8) top = _mm256_max_ps(_mm256_loadu_ps(x + s), top);
    const __m256 shift = _mm256_set1_ps(hmax_ps(top));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t s = 0; s < full; s += 8) {
        const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + s), shift));
        _mm256_storeu_ps(x + s, e), sum = _mm256_add_ps(sum, e);
    }
    if (full < n) {
        const __m256 e = exp_avx2(_mm256_sub_ps(rest, shift));
        _mm256_maskstore_ps(x + full, tail, e), sum = _mm256_add_ps(sum, e);
    }
    const float total = sum8(sum);
    for (int64_t s = 0; s < full; s += 8)
        _mm256_storeu_ps(x + s, _mm256_div_ps(_mm256_loadu_ps(x + s), _mm256_set1_ps(total)));
    for (int64_t s = full; s < n; s++) x[s] /= total;
}

/* A head's output kept in registers across the chunk's values, 64 of it at a time (eight
 * independent chains of multiply-adds); each value lane a fused multiply-add in order of s. */
AVX2_FN static void weighted_sum_avx2(const attention_kernels *a, const float *p, const float *values, int64_t n,
                                      int64_t d, float *out) {
    (void)a;
    int64_t i = 0;
    for (; i + 64 <= d; i += 64) {
        __m256 o0 = _mm256_loadu_ps(out + i), o1 = _mm256_loadu_ps(out + i + 8), o2 = _mm256_loadu_ps(out + i + 16),
               o3 = _mm256_loadu_ps(out + i + 24), o4 = _mm256_loadu_ps(out + i + 32),
               o5 = _mm256_loadu_ps(out + i + 40), o6 = _mm256_loadu_ps(out + i + 48),
               o7 = _mm256_loadu_ps(out + i + 56);
        for (int64_t s = 0; s < n; s++) {
            if (p[s] == 0.0f) continue;
            const __m256 w = _mm256_set1_ps(p[s]);
            const float *v = values + s * d + i;
            o0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v), o0), o1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8), o1);
            o2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 16), o2), o3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 24), o3);
            o4 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 32), o4), o5 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 40), o5);
            o6 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 48), o6), o7 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 56), o7);
        }
        _mm256_storeu_ps(out + i, o0), _mm256_storeu_ps(out + i + 8, o1), _mm256_storeu_ps(out + i + 16, o2);
        _mm256_storeu_ps(out + i + 24, o3), _mm256_storeu_ps(out + i + 32, o4), _mm256_storeu_ps(out + i + 40, o5);
        _mm256_storeu_ps(out + i + 48, o6), _mm256_storeu_ps(out + i + 56, o7);
    }
    for (; i < d; i += 8) {
        __m256 o = _mm256_loadu_ps(out + i);
        for (int64_t s = 0; s < n; s++)
            if (p[s] != 0.0f) o = _mm256_fmadd_ps(_mm256_set1_ps(p[s]), _mm256_loadu_ps(values + s * d + i), o);
        _mm256_storeu_ps(out + i, o);
    }
}
#endif

/* ---------------------------------------------------------------------------------------
 * The choice, and attention itself
 */

void attention_select(int impl, int cache_type, int64_t d, attention_kernels *out) {
    static void (*const stores[])(const float *, void *, uint16_t *, int64_t, int64_t) = {
        [KV_F32] = store_f32, [KV_F16] = store_f16_scalar, [KV_Q8_0] = store_q8_0};
    static void (*const loads[])(kv_rows, int64_t, int64_t, int64_t, float *) = {
        [KV_F32] = NULL, [KV_F16] = load_f16_scalar, [KV_Q8_0] = load_q8_0_scalar};
    *out = (attention_kernels){.cache_type = cache_type, .store = stores[cache_type], .load = loads[cache_type],
                               .scores = scores_generic, .softmax = softmax_generic,
                               .weighted_sum = weighted_sum_generic, .dot = dot_scalar, .axpy = axpy_scalar};
    if (impl == IMPL_SCALAR) return;
#ifdef MISTOL_X86
    if (!cpu_has_avx2()) return;
    if (cache_type == KV_F16) out->store = store_f16_f16c, out->load = load_f16_f16c;
    if (cache_type == KV_Q8_0) out->load = load_q8_0_avx2;
    if (d % 8 == 0) out->scores = scores_avx2, out->softmax = softmax_avx2, out->weighted_sum = weighted_sum_avx2;
#endif
#ifdef MISTOL_ARM
    out->dot = dot_neon, out->axpy = axpy_neon;
#endif
    (void)d;
}

void attend(const attention_kernels *a, kv_rows keys, kv_rows values, const float *q, int64_t ldq, int64_t M,
            int64_t group, int64_t d, int64_t n_keys, const uint8_t *mask, float *scores, float *chunk, float *out,
            int64_t ldo) {
    const float scale = 1.0f / sqrtf((float)d);
    for (int64_t s0 = 0; s0 < n_keys; s0 += KV_CHUNK) {
        const int64_t n = n_keys - s0 < KV_CHUNK ? n_keys - s0 : KV_CHUNK;
        const float *kc = (const float *)keys.rows + s0 * d;
        if (a->load) a->load(keys, s0, n, d, chunk), kc = chunk;
        for (int64_t m = 0; m < M; m++)
            for (int64_t g = 0; g < group; g++) {
                float *sc = scores + (m * group + g) * n_keys + s0;
                a->scores(a, q + m * ldq + g * d, kc, n, d, scale, sc);
                for (int64_t s = 0; mask && s < n; s++)
                    if (!mask[m * n_keys + s0 + s]) sc[s] = -INFINITY;
            }
    }
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < group; g++) {
            a->softmax(scores + (m * group + g) * n_keys, n_keys);
            memset(out + m * ldo + g * d, 0, sizeof(float) * (size_t)d);
        }
    for (int64_t s0 = 0; s0 < n_keys; s0 += KV_CHUNK) {
        const int64_t n = n_keys - s0 < KV_CHUNK ? n_keys - s0 : KV_CHUNK;
        const float *vc = (const float *)values.rows + s0 * d;
        if (a->load) a->load(values, s0, n, d, chunk), vc = chunk;
        for (int64_t m = 0; m < M; m++)
            for (int64_t g = 0; g < group; g++)
                a->weighted_sum(a, scores + (m * group + g) * n_keys + s0, vc, n, d, out + m * ldo + g * d);
    }
}
