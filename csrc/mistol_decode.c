/* One decoder layer of a Mistral/Llama model for one new token of one sequence (a decode
 * step on a CPU), with quantized weights (int8 or int4, each matrix its own), as a single
 * call:
 *
 *   h = rmsnorm(x) * norm_attn
 *   q, k, v = h Wq^T, h Wk^T, h Wv^T, then RoPE ("rotate half") on q and k
 *   the cache's slot `slot` = k, v
 *   a = softmax(q K^T / sqrt(head_dim)) V per query head over the first n_keys slots
 *       (grouped-query: query head h reads kv head h / (heads / kv_heads); mask[s] = 0
 *       hides slot s, for sliding windows and empty slots)
 *   x += a Wo^T
 *   h = rmsnorm(x) * norm_mlp
 *   x += (silu(h Wg^T) * h Wu^T) Wd^T
 *
 * The same arithmetic as mistol's PyTorch layer (float32 throughout; the matrix products
 * are mistol_kernels.c's), in one parallel region: the threads split each product's
 * weights and the attention's kv heads, and meet at a barrier between steps. A decode
 * step is a few hundred small operations besides its matrix products; run one by one
 * from Python they cost about a tenth of the step, here a few barriers.
 */

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "mistol_kernels.h"

#ifdef _OPENMP
#define BARRIER _Pragma("omp barrier")
#define SINGLE _Pragma("omp single") /* the next statement: one thread, then a barrier */
#else
#define BARRIER
#define SINGLE
#endif

/* Indices into mistol_decode_layer's pointer and size arrays. */
enum { P_NORM_ATTN, P_NORM_MLP, P_WQ, P_WK, P_WV, P_WO, P_WG, P_WU, P_WD, P_CACHE_K, P_CACHE_V, P_COS, P_SIN,
       P_MASK, P_COUNT };
enum { D_HIDDEN, D_FFN, D_HEADS, D_KV_HEADS, D_HEAD_DIM, D_CAPACITY, D_SLOT, D_KEYS, D_COUNT };

static void rms_norm(const float *x, const float *w, int64_t n, float eps, float *out) {
    float part[8] = {0}; /* eight independent sums: the compiler vectorizes them */
    int64_t k = 0;
    for (; k + 8 <= n; k += 8)
        for (int j = 0; j < 8; j++) part[j] += x[k + j] * x[k + j];
    float ss = 0.0f;
    for (int j = 0; j < 8; j++) ss += part[j];
    for (; k < n; k++) ss += x[k] * x[k];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (k = 0; k < n; k++) out[k] = w[k] * (x[k] * r);
}

/* RoPE, "rotate half": v[i] pairs with v[i + d/2]; cos/sin hold d values (each half twice). */
static void rope(float *v, const float *cos, const float *sin, int64_t d) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cos[i] + -b * sin[i];
        v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

static float silu(float g) { return g / (1.0f + expf(-g)); }

/* Dot products and y += a * x over one head's values. */
typedef float (*dot_fn)(const float *, const float *, int64_t);
typedef void (*axpy_fn)(float, const float *, float *, int64_t);

static float dot_scalar(const float *a, const float *b, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static void axpy_scalar(float a, const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

#ifdef MISTOL_X86
AVX2_FN static float dot_avx2(const float *a, const float *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    float s = hsum_ps(_mm256_add_ps(s0, s1));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

AVX2_FN static void axpy_avx2(float a, const float *x, float *y, int64_t n) {
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}
#endif

/* The query heads q[group][d] of one kv head against its cached keys/values [capacity][d]:
 * out[group][d]. scores: scratch of group * n_keys floats. */
static void attend(dot_fn dot, axpy_fn axpy, const float *q, int64_t group, const float *keys, const float *values,
                   int64_t d, int64_t n_keys, const uint8_t *mask, float *scores, float *out) {
    const float scale = 1.0f / sqrtf((float)d);
    for (int64_t g = 0; g < group; g++) {
        float *sc = scores + g * n_keys, top = -INFINITY;
        for (int64_t s = 0; s < n_keys; s++) {
            sc[s] = mask && !mask[s] ? -INFINITY : dot(q + g * d, keys + s * d, d) * scale;
            top = sc[s] > top ? sc[s] : top;
        }
        float sum = 0.0f;
        for (int64_t s = 0; s < n_keys; s++) sum += sc[s] = sc[s] == -INFINITY ? 0.0f : expf(sc[s] - top);
        float *o = out + g * d;
        memset(o, 0, sizeof(float) * (size_t)d);
        for (int64_t s = 0; s < n_keys; s++)
            if (sc[s] != 0.0f) axpy(sc[s] / sum, values + s * d, o, d);
    }
}

/* x[D] (float32, in place) += one layer, as described at the top. ptrs and dims are
 * indexed by P_* and D_*; fmts[i] is the format of weight P_WQ + i and tiles[i] its blocks
 * per tile (packed in mistol_kernels.c's layout); norms, caches ([kv_heads][capacity][head_dim], this
 * layer's) and cos/sin float32, mask uint8 [n_keys] or NULL. Returns 0 or an error. */
EXPORT int mistol_decode_layer(const int *fmts, const int64_t *tiles, float *x, const void *const *ptrs,
                               const int64_t *dims, float eps, int nthreads, int impl) {
    qkernels kn;
    for (int i = 0; i < 7; i++) {
        if (fmts[i] != FMT_INT8 && fmts[i] != FMT_INT4) return ERR_FMT;
        if (tiles[i] <= 0) return ERR_ARG;
    }
    if (qkernels_select(impl, &kn) != OK) return ERR_IMPL;
    const int64_t D = dims[D_HIDDEN], F = dims[D_FFN], hq = dims[D_HEADS], hkv = dims[D_KV_HEADS];
    const int64_t hd = dims[D_HEAD_DIM], cap = dims[D_CAPACITY], slot = dims[D_SLOT], n_keys = dims[D_KEYS];
    if (D <= 0 || F <= 0 || D % QK || F % QK || (hq * hd) % QK || hkv <= 0 || hq % hkv || hd % 2) return ERR_ARG;
    if (slot < 0 || slot >= cap || n_keys <= 0 || n_keys > cap) return ERR_ARG;
    if (nthreads < 1) nthreads = 1;
    dot_fn dot = dot_scalar;
    axpy_fn axpy = axpy_scalar;
#ifdef MISTOL_X86
    if (impl != IMPL_SCALAR && cpu_has_avx2()) dot = dot_avx2, axpy = axpy_avx2;
#endif

    const int64_t dq = hq * hd, dkv = hkv * hd, group = hq / hkv, kmax = F > D ? (F > dq ? F : dq) : (D > dq ? D : dq);
    const float *const *f = (const float *const *)ptrs;
    const uint8_t *const *w = (const uint8_t *const *)ptrs;
    float *cache_k = (float *)ptrs[P_CACHE_K], *cache_v = (float *)ptrs[P_CACHE_V];
    const uint8_t *mask = ptrs[P_MASK];

    /* scratch: h (the products' float input), qkv, attention output, gate|up, the layer
     * outputs added to x, the quantized input, and per thread: scores and accumulators */
    float *h = malloc(sizeof(float) * (size_t)kmax), *qkv = malloc(sizeof(float) * (size_t)(dq + 2 * dkv));
    float *att = malloc(sizeof(float) * (size_t)dq), *gu = malloc(sizeof(float) * (size_t)(2 * F));
    float *y = malloc(sizeof(float) * (size_t)D), *da = malloc(sizeof(float) * (size_t)(kmax / QK));
    int8_t *qa = malloc((size_t)kmax);
    int32_t *sa = malloc(sizeof(int32_t) * (size_t)(kmax / QK));
    float *scores = malloc(sizeof(float) * (size_t)(nthreads * group * n_keys));
    float *acc = malloc(sizeof(float) * (size_t)(nthreads * IL));
    if (!h || !qkv || !att || !gu || !y || !da || !qa || !sa || !scores || !acc) {
        free(h), free(qkv), free(att), free(gu), free(y), free(da), free(qa), free(sa), free(scores), free(acc);
        return ERR_NOMEM;
    }
    const uint8_t *w_qkv[3] = {w[P_WQ], w[P_WK], w[P_WV]}, *w_gu[2] = {w[P_WG], w[P_WU]};
    const int64_t n_qkv[3] = {dq, dkv, dkv}, n_gu[2] = {F, F}, n_d[1] = {D};

#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
#endif
    {
        float *my_acc = acc + thread_index() * IL, *my_scores = scores + thread_index() * group * n_keys;
        SINGLE
        {
            rms_norm(x, f[P_NORM_ATTN], D, eps, h);
            kn.quant(h, D, qa, da, sa);
        }
        qgemm_share(&kn, fmts, qa, da, sa, 1, D, 3, w_qkv, n_qkv, tiles, qkv, dq + 2 * dkv, my_acc);
        BARRIER
        int64_t j0, j1; /* this thread's kv heads, with their query heads */
        thread_share(hkv, &j0, &j1);
        for (int64_t j = j0; j < j1; j++) {
            float *k = qkv + dq + j * hd, *v = qkv + dq + dkv + j * hd;
            rope(k, f[P_COS], f[P_SIN], hd);
            memcpy(cache_k + (j * cap + slot) * hd, k, sizeof(float) * (size_t)hd);
            memcpy(cache_v + (j * cap + slot) * hd, v, sizeof(float) * (size_t)hd);
            for (int64_t g = 0; g < group; g++) rope(qkv + (j * group + g) * hd, f[P_COS], f[P_SIN], hd);
            attend(dot, axpy, qkv + j * group * hd, group, cache_k + j * cap * hd, cache_v + j * cap * hd, hd,
                   n_keys, mask, my_scores, att + j * group * hd);
        }
        BARRIER
        SINGLE
        kn.quant(att, dq, qa, da, sa);
        qgemm_share(&kn, fmts + 3, qa, da, sa, 1, dq, 1, &w[P_WO], n_d, tiles + 3, y, D, my_acc);
        BARRIER
        SINGLE
        {
            for (int64_t i = 0; i < D; i++) x[i] += y[i];
            rms_norm(x, f[P_NORM_MLP], D, eps, h);
            kn.quant(h, D, qa, da, sa);
        }
        qgemm_share(&kn, fmts + 4, qa, da, sa, 1, D, 2, w_gu, n_gu, tiles + 4, gu, 2 * F, my_acc);
        BARRIER
        int64_t b0, b1; /* SiLU (an exp per value) and quantization of this thread's blocks */
        thread_share(F / QK, &b0, &b1);
        for (int64_t i = b0 * QK; i < b1 * QK; i++) h[i] = silu(gu[i]) * gu[F + i];
        kn.quant(h + b0 * QK, (b1 - b0) * QK, qa + b0 * QK, da + b0, sa + b0);
        BARRIER
        qgemm_share(&kn, fmts + 6, qa, da, sa, 1, F, 1, &w[P_WD], n_d, tiles + 6, y, D, my_acc);
        BARRIER
        SINGLE
        for (int64_t i = 0; i < D; i++) x[i] += y[i];
    }
    free(h), free(qkv), free(att), free(gu), free(y), free(da), free(qa), free(sa), free(scores), free(acc);
    return OK;
}
