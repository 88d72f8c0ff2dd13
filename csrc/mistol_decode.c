/* One decoder layer of a Mistral/Llama model for a few new tokens on a CPU, with quantized
 * weights (int8, int4 or one of llama.cpp's k-quant and legacy block types, each matrix its
 * own), as a single call. The tokens are either consecutive tokens of one sequence (a decode
 * step, a speculative verify pass, a short prompt) or the next token of each of several
 * sequences (a server's batch of decode steps, each sequence its own cache). Per token:
 *
 *   h = rmsnorm(x) * norm_attn
 *   q, k, v = h Wq^T (+ bq), h Wk^T (+ bk), h Wv^T (+ bv), then RoPE ("rotate half") on q and k
 *   the token's cache slot = k, v (float32, float16 or Q8_0 blocks: cache_type)
 *   a = softmax(q K^T / sqrt(head_dim)) V per query head over the first n_keys slots
 *       (grouped-query: query head h reads kv head h / (heads / kv_heads); mask[s] = 0
 *       hides slot s, for sliding windows and empty slots)
 *   x += a Wo^T (+ bo)
 *   h = rmsnorm(x) * norm_mlp
 *   x += (silu(h Wg^T) * h Wu^T) Wd^T
 *
 * The same arithmetic as mistol's PyTorch layer (float32 throughout; the matrix products
 * are quant_gemv.c's, the attention attention.c's), in one parallel region: the threads
 * split each product's weights and the attention's kv heads, and meet at a barrier between
 * steps. A decode step is a few hundred small operations besides its matrix products; run
 * one by one from Python they cost about a tenth of the step, here a few barriers. Several
 * tokens share each read of the weights (the products' several-row kernels) and of the
 * cache, and each token's arithmetic is what it would be alone: its bits do not depend on
 * the other tokens.
 *
 * The arguments come as one mistol_decode_args (mistol_abi.h); the scratch buffers live in
 * a mistol_workspace that the caller creates once per model and that grows only when a
 * step needs more (a longer cache, more threads) than any step before.
 */

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"
#include "mistol_kernels.h"

#ifdef _OPENMP
#define BARRIER _Pragma("omp barrier")
#define SINGLE _Pragma("omp single") /* the next statement: one thread, then a barrier */
#else
#define BARRIER
#define SINGLE
#endif

/* The scratch of one decode step: h (the products' float input), qkv, the attention
 * output, gate|up, the layer outputs added to x, the quantized input, and per thread:
 * attention scores and accumulators. Each buffer holds `*_size` elements. */
struct mistol_workspace {
    mistol_kv_row *kv;
    float *h, *qkv, *att, *gu, *y, *da, *scores, *acc, *dk, *kv_chunk, *db;
    int8_t *qa, *qk, *qb, *qkb, *qab;
    int32_t *sa, *sk, *sb;
    int64_t kv_size, h_size, qkv_size, att_size, gu_size, y_size, da_size, scores_size, acc_size, dk_size, kv_chunk_size,
        db_size, qa_size, qk_size, qb_size, qkb_size, qab_size, sa_size, sk_size, sb_size;
};
typedef struct mistol_workspace mistol_workspace;

EXPORT mistol_workspace *mistol_workspace_new(void) { return calloc(1, sizeof(mistol_workspace)); }

EXPORT void mistol_workspace_free(mistol_workspace *ws) {
    if (!ws) return;
    free(ws->h), free(ws->qkv), free(ws->att), free(ws->gu), free(ws->y), free(ws->da), free(ws->scores);
    free(ws->acc), free(ws->kv_chunk), free(ws->qa), free(ws->sa), free(ws->qk), free(ws->dk), free(ws->sk);
    free(ws->qb), free(ws->db), free(ws->sb), free(ws->qkb), free(ws->qab), free(ws->kv);
    free(ws);
}

/* *buf holds at least n elements of `size` bytes afterwards (its contents are scratch):
 * 0, or -1 when out of memory (*buf unchanged). */
static int reserve(void **buf, int64_t *have, int64_t n, size_t size) {
    if (n <= *have) return 0;
    void *grown = malloc(size * (size_t)n);
    if (!grown) return -1;
    free(*buf);
    *buf = grown, *have = n;
    return 0;
}

#define RESERVE(ws, name, n) reserve((void **)&(ws)->name, &(ws)->name##_size, (n), sizeof(*(ws)->name))

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

/* The quantized activation rows of one product (mats[count], M rows) as qgemm_share reads
 * them: with M > 1, the several-row kernels' copies of them in ws (act_rows_copies fills
 * them), where this instruction set has such kernels for these formats. */
static qact product_act(const mistol_workspace *ws, const qkernels *kn, const mistol_matrix *mats, int count,
                        int64_t M, int needs) {
    qact act = {ws->qa, ws->da, ws->sa, ws->qk, ws->dk, ws->sk};
    if (M < 2) return act;
    int packed = 0, legacy = 0;
    for (int i = 0; i < count; i++)
        packed |= mats[i].format == FMT_INT8 || mats[i].format == FMT_INT4, legacy |= kn->legacy_rows[mats[i].format] != NULL;
    if (packed && kn->group_rows[FMT_INT8] && needs & ACT_32) act.qb = ws->qb, act.db = ws->db, act.sb = ws->sb;
    if (needs & ACT_256 && kn->q4k_x8_rows) act.qkb = ws->qkb;
    if (legacy && needs & ACT_32) act.qab = ws->qab;
    return act;
}

/* args->x[rows][hidden] (float32, in place) += layer args->layer, as described at the top,
 * with ws's scratch. Row m's arithmetic is the same whatever the number of rows (the
 * products' several-row kernels give each row its one-row bits; attention gives each token
 * its own, whatever the others):
 * tokens decoded together come out as they would one at a time. Returns 0 or an error. */
EXPORT int mistol_decode_layer(mistol_workspace *ws, const mistol_decode_args *args) {
    qkernels kn;
    const int64_t D = args->hidden, F = args->ffn, hq = args->heads, hkv = args->kv_heads, hd = args->head_dim;
    const int64_t M = args->rows;
    if (D <= 0 || F <= 0 || D % QK || F % QK || (hq * hd) % QK || hkv <= 0 || hq % hkv || hd % 2) return ERR_ARG;
    const int cache_type = args->cache_type;
    if (cache_type != KV_F32 && cache_type != KV_F16 && cache_type != KV_Q8_0) return ERR_ARG;
    if (args->layer < 0 || M < 1 || (cache_type == KV_Q8_0 && hd % QK)) return ERR_ARG;
    if (!args->kv_rows && (M > args->capacity || args->slot < 0 || args->slot >= args->capacity)) return ERR_ARG;
    if (RESERVE(ws, kv, M)) return ERR_NOMEM;
    int64_t most_keys = 0; /* each row's cache, and the most slots a row attends over */
    for (int64_t m = 0; m < M; m++) {
        const mistol_kv_row shared = {args->cache_k, args->cache_v, args->cache_k_scale, args->cache_v_scale,
                                      args->mask ? args->mask + m * args->n_keys : NULL, args->capacity,
                                      args->capacity > 0 ? (args->slot + m) % args->capacity : 0, args->n_keys};
        const mistol_kv_row r = args->kv_rows ? args->kv_rows[m] : shared;
        if (r.capacity <= 0 || r.slot < 0 || r.slot >= r.capacity || r.n_keys <= 0 || r.n_keys > r.capacity)
            return ERR_ARG;
        if (cache_type == KV_Q8_0 && (!r.k_scale || !r.v_scale)) return ERR_ARG;
        ws->kv[m] = r, most_keys = r.n_keys > most_keys ? r.n_keys : most_keys;
    }
    const int64_t dq = hq * hd, dkv = hkv * hd, group = hq / hkv, kmax = F > D ? (F > dq ? F : dq) : (D > dq ? D : dq);
    const mistol_layer *layer = &args->layers[args->layer];
    const mistol_matrix *w = layer->weights;
    const int64_t rows[W_COUNT] = {[W_Q] = dq, [W_K] = dkv, [W_V] = dkv, [W_O] = D, [W_GATE] = F, [W_UP] = F,
                                   [W_DOWN] = D};
    const int64_t inputs[W_COUNT] = {[W_Q] = D, [W_K] = D, [W_V] = D, [W_O] = dq, [W_GATE] = D, [W_UP] = D,
                                     [W_DOWN] = F};
    for (int i = 0; i < W_COUNT; i++) {
        if (!fmt_known(w[i].format)) return ERR_FMT;
        if (w[i].tile_blocks <= 0 || w[i].rows != rows[i] || inputs[i] % fmt_k_multiple(w[i].format)) return ERR_ARG;
    }
    /* the activation quantizations each product reads (a layer may mix formats) */
    const int need_qkv = act_needs(&w[W_Q], 3), need_o = act_needs(&w[W_O], 1), need_gu = act_needs(&w[W_GATE], 2),
              need_down = act_needs(&w[W_DOWN], 1);
    const int64_t down_unit = need_down & ACT_256 ? 256 : QK; /* the down input's share per thread */
    if (qkernels_select(args->impl, &kn) != OK) return ERR_IMPL;
    const int nthreads = args->nthreads < 1 ? 1 : args->nthreads;
    /* each thread's several-row sums on cache lines of its own (as gemm_run's) */
    const int64_t acc_stride = qgemm_acc_floats(M), Mp = M + (M & 1), copies = M > 1 ? M : 0;
    const int64_t together = args->kv_rows ? 1 : M; /* tokens that attend over one cache at once */
    if (RESERVE(ws, h, M * kmax) || RESERVE(ws, qkv, M * (dq + 2 * dkv)) || RESERVE(ws, att, M * dq) ||
        RESERVE(ws, gu, M * 2 * F) || RESERVE(ws, y, M * D) || RESERVE(ws, da, M * kmax / QK) ||
        RESERVE(ws, qa, M * kmax) || RESERVE(ws, sa, M * kmax / QK) || RESERVE(ws, qk, M * kmax) ||
        RESERVE(ws, dk, M * kmax / QK) || RESERVE(ws, sk, M * kmax / 16) ||
        RESERVE(ws, scores, nthreads * together * group * most_keys) || RESERVE(ws, acc, nthreads * acc_stride + 16) ||
        RESERVE(ws, kv_chunk, nthreads * KV_CHUNK * hd) || RESERVE(ws, qb, copies ? Mp * kmax : 1) ||
        RESERVE(ws, db, copies ? Mp * kmax / QK : 1) || RESERVE(ws, sb, copies ? Mp * kmax / QK : 1) ||
        RESERVE(ws, qkb, copies * kmax + 1) || RESERVE(ws, qab, copies * ((kmax / QK + 7) / 8 * 8 * QK) + 1))
        return ERR_NOMEM;
    attention_kernels attention;
    attention_select(args->impl, cache_type, hd, &attention);

    float *x = args->x, *h = ws->h, *qkv = ws->qkv, *att = ws->att, *gu = ws->gu, *y = ws->y;
    const qact act_qkv = product_act(ws, &kn, &w[W_Q], 3, M, need_qkv), act_o = product_act(ws, &kn, &w[W_O], 1, M, need_o);
    const qact act_gu = product_act(ws, &kn, &w[W_GATE], 2, M, need_gu);
    const qact act_down = product_act(ws, &kn, &w[W_DOWN], 1, M, need_down);
    float *scores = ws->scores;
    float *acc = (float *)(((uintptr_t)ws->acc + 63) & ~(uintptr_t)63);
    const mistol_kv_row *kv = ws->kv;
    const int64_t ld_qkv = dq + 2 * dkv;

#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
#endif
    {
        float *my_acc = acc + thread_index() * acc_stride;
        float *my_scores = scores + thread_index() * together * group * most_keys;
        float *my_chunk = ws->kv_chunk + thread_index() * KV_CHUNK * hd;
        SINGLE
        {
            for (int64_t m = 0; m < M; m++) {
                rms_norm(x + m * D, layer->norm_attn, D, args->eps, h + m * D);
                act_quantize(&kn, h + m * D, D, m, 0, D, need_qkv, &act_qkv);
            }
            act_rows_copies(&act_qkv, M, D);
        }
        qgemm_share(&kn, &w[W_Q], 3, &act_qkv, M, D, qkv, ld_qkv, my_acc); /* q, k, v */
        BARRIER
        int64_t j0, j1; /* this thread's kv heads, with their query heads: every row's key and value
                         * written to its cache before any row attends */
        thread_share(hkv, &j0, &j1);
        for (int64_t j = j0; j < j1; j++) {
            for (int64_t m = 0; m < M; m++) {
                float *row = qkv + m * ld_qkv, *k = row + dq + j * hd, *v = row + dq + dkv + j * hd;
                const float *cos = args->cos + m * hd, *sin = args->sin + m * hd;
                /* this row's slot of kv head j in layer `layer` of its cache */
                const int64_t at = ((args->layer * hkv + j) * kv[m].capacity + kv[m].slot) * hd;
                if (layer->qkv_bias) { /* this kv head's k and v, and its group's query heads */
                    const float *b = layer->qkv_bias;
                    for (int64_t i = 0; i < hd; i++) k[i] += b[dq + j * hd + i], v[i] += b[dq + dkv + j * hd + i];
                    for (int64_t i = j * group * hd; i < (j + 1) * group * hd; i++) row[i] += b[i];
                }
                rope(k, cos, sin, hd);
                for (int64_t g = 0; g < group; g++) rope(row + (j * group + g) * hd, cos, sin, hd);
                attention.store(k, kv[m].k, kv[m].k_scale, at, hd);
                attention.store(v, kv[m].v, kv[m].v_scale, at, hd);
            }
            /* then attention: one sequence's tokens all at once, several sequences' one by one */
            for (int64_t m = 0; m < M; m += together) {
                const int64_t head = (args->layer * hkv + j) * kv[m].capacity * hd; /* kv head j's rows */
                attend(&attention, kv_view(cache_type, kv[m].k, kv[m].k_scale, head),
                       kv_view(cache_type, kv[m].v, kv[m].v_scale, head), qkv + m * ld_qkv + j * group * hd, ld_qkv,
                       together, group, hd, kv[m].n_keys, kv[m].mask, my_scores, my_chunk, att + m * dq + j * group * hd,
                       dq);
            }
        }
        BARRIER
        SINGLE
        {
            for (int64_t m = 0; m < M; m++) act_quantize(&kn, att + m * dq, dq, m, 0, dq, need_o, &act_o);
            act_rows_copies(&act_o, M, dq);
        }
        qgemm_share(&kn, &w[W_O], 1, &act_o, M, dq, y, D, my_acc);
        BARRIER
        SINGLE
        {
            for (int64_t m = 0; m < M; m++) {
                float *xm = x + m * D, *ym = y + m * D;
                if (layer->o_bias)
                    for (int64_t i = 0; i < D; i++) xm[i] += ym[i] + layer->o_bias[i];
                else
                    for (int64_t i = 0; i < D; i++) xm[i] += ym[i];
                rms_norm(xm, layer->norm_mlp, D, args->eps, h + m * D);
                act_quantize(&kn, h + m * D, D, m, 0, D, need_gu, &act_gu);
            }
            act_rows_copies(&act_gu, M, D);
        }
        qgemm_share(&kn, &w[W_GATE], 2, &act_gu, M, D, gu, 2 * F, my_acc); /* gate, up */
        BARRIER
        int64_t b0, b1; /* SiLU (an exp per value) and quantization of this thread's blocks */
        thread_share(F / down_unit, &b0, &b1);
        for (int64_t m = 0; m < M; m++) {
            const float *gate = gu + m * 2 * F, *up = gate + F;
            float *hm = h + m * F;
            for (int64_t i = b0 * down_unit; i < b1 * down_unit; i++) hm[i] = silu(gate[i]) * up[i];
            act_quantize(&kn, hm, F, m, b0 * down_unit, b1 * down_unit, need_down, &act_down);
        }
        BARRIER
        SINGLE
        act_rows_copies(&act_down, M, F);
        qgemm_share(&kn, &w[W_DOWN], 1, &act_down, M, F, y, D, my_acc);
        BARRIER
        SINGLE
        for (int64_t i = 0; i < M * D; i++) x[i] += y[i];
    }
    return OK;
}
