/* Dense matrix products for float weights (unquantized models): y = x @ W^T for a few rows of x (decode steps), W
 * [N][K] in float32, bfloat16 or float16 as torch holds it (row-major, no repacking), x and
 * y float32. Reading W is the whole cost, so each thread streams its own rows once, four
 * at a time sharing the loads of x, with float32 products and sums (bf16 and f16 values
 * are exact in float32).
 */

#include <stdlib.h>

#include "mistol_kernels.h"

/* The row kernels ask for the weights DENSE_AHEAD bytes on, into L2, where the int8/int4
 * kernels do (stream_prefetch): on a 2-core AMX Xeon (python scripts/bench_gemv.py
 * --threads 2, builds in turns) f32 14336 x 4096 read 21 -> 23-24 GB/s, 4096 x 14336 17 ->
 * 24, bf16 21-23 -> 23-24 (8 KB: no better); a 1b bf16 decode step 112-114 -> 99-100 ms. */
#define DENSE_AHEAD 4096
#define DENSE_PREFETCH(pf, p, n)                        \
    do {                                                \
        if (pf) prefetch_to_l2((p) + DENSE_AHEAD, (n)); \
    } while (0)
static inline float dense_value(const void *w, int wtype, int64_t k) {
    if (wtype == DT_F32) return ((const float *)w)[k];
    const uint16_t h = ((const uint16_t *)w)[k];
    return wtype == DT_F16 ? half_to_float(h) : bf16_to_float(h);
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
    if (wtype == DT_BF16) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + k));
        *w0 = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        *w1 = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
    } else if (wtype == DT_F16) {
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
    const int64_t esize = wtype == DT_F32 ? 4 : 2;
    const int pf = stream_prefetch();
    for (; k + 32 <= K; k += 32) {
        DENSE_PREFETCH(pf, row + k * esize, 32 * esize);
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
    const int pf = stream_prefetch();
    for (; k + 64 <= K; k += 64) {
        DENSE_PREFETCH(pf, row + 2 * k, 128);
        DP(a0, 0);
        DP(a1, 16);
        DP(a2, 32);
        DP(a3, 48);
    }
    for (; k + 16 <= K; k += 16) DP(a0, 0);
#undef DP
    float s = hsum_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; k++) s += dense_value(row, DT_BF16, k) * x[k];
    return s;
}

#endif

#ifdef MISTOL_ARM
/* NEON: 16 values per step into four accumulators of fused multiply-adds, as the AVX2 row
 * does with 32. bf16 widens to float32 by a shift and f16 by the conversion instruction,
 * both in order, so x is read as given. */
static inline void dense_load8_neon(const uint8_t *row, int wtype, int64_t k, float32x4_t *w0, float32x4_t *w1) {
    if (wtype == DT_BF16) {
        const uint16x8_t v = vld1q_u16((const uint16_t *)row + k);
        *w0 = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(v), 16));
        *w1 = vreinterpretq_f32_u32(vshll_high_n_u16(v, 16));
    } else if (wtype == DT_F16) {
        const float16x8_t v = vreinterpretq_f16_u16(vld1q_u16((const uint16_t *)row + k));
        *w0 = vcvt_f32_f16(vget_low_f16(v));
        *w1 = vcvt_high_f32_f16(v);
    } else {
        *w0 = vld1q_f32((const float *)row + k);
        *w1 = vld1q_f32((const float *)row + k + 4);
    }
}

static float dense_row_neon(const uint8_t *row, int wtype, const float *x, const void *xp, int64_t K) {
    (void)xp;
    float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0, a2 = a0, a3 = a0, w0, w1, w2, w3;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        dense_load8_neon(row, wtype, k, &w0, &w1);
        dense_load8_neon(row, wtype, k + 8, &w2, &w3);
        a0 = vfmaq_f32(a0, w0, vld1q_f32(x + k));
        a1 = vfmaq_f32(a1, w1, vld1q_f32(x + k + 4));
        a2 = vfmaq_f32(a2, w2, vld1q_f32(x + k + 8));
        a3 = vfmaq_f32(a3, w3, vld1q_f32(x + k + 12));
    }
    float s = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
    for (; k < K; k++) s += dense_value(row, wtype, k) * x[k];
    return s;
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
    if (wtype < DT_F32 || wtype > DT_F16 || K <= 0 || M < 0 || count < 0) return ERR_ARG;
    int64_t N = 0;
    for (int i = 0; i < count; i++) {
        if (ns[i] < 0 || tks[i] <= 0 || K % tks[i] || (tks[i] < K && tks[i] % 16)) return ERR_ARG;
        N += ns[i];
    }
    if (ldy < N) return ERR_ARG;
    if (M == 0 || N == 0) return OK;
    const int64_t esize = wtype == DT_F32 ? 4 : 2;
    dense_fn fn = dense_row_scalar;
    void *prepared = NULL; /* x as the row function reads it, if not as given: */
    int64_t prepared_size = 0; /* bytes per value */
#ifdef MISTOL_X86
    if (wtype == DT_BF16 && x_is_bf16 && cpu_has_bf16dp()) {
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
        if (wtype == DT_BF16) { /* each 16 values of x as the 8 even ones, then the 8 odd ones */
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
#ifdef MISTOL_ARM
    fn = dense_row_neon;
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

