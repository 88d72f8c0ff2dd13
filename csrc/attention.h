/* The KV cache's rows and the attention over them, for the compiled decode layer
 * (mistol_decode.c): how a key or value row is stored in each cache type, and one kv head's
 * grouped-query attention for a few tokens. Internal to the library. */
#ifndef MISTOL_ATTENTION_H
#define MISTOL_ATTENTION_H

#include <stdint.h>

/* One kv head's cached rows [capacity][d] in the cache's type: float32, float16, or int8 with
 * scales [capacity][d / 32] (Q8_0). */
typedef struct {
    const void *rows;
    const uint16_t *scales;
} kv_rows;

/* The attention arithmetic a CPU runs for one cache type and head size (attention_select). */
typedef struct attention_kernels attention_kernels;
struct attention_kernels {
    int cache_type;
    /* x[d] into rows[at, at + d) of a cache (scales[at / 32, ...) for Q8_0) */
    void (*store)(const float *x, void *rows, uint16_t *scales, int64_t at, int64_t d);
    /* rows [s0, s0 + n) of src as float32, out[n][d]; NULL for a float32 cache (read in place) */
    void (*load)(kv_rows src, int64_t s0, int64_t n, int64_t d, float *out);
    /* out[s] = scale * (q . keys[s]) for s < n */
    void (*scores)(const attention_kernels *, const float *q, const float *keys, int64_t n, int64_t d, float scale,
                   float *out);
    /* x[n] = softmax(x): exp(x[s] - max x) / their sum (0 where x[s] is -inf) */
    void (*softmax)(float *x, int64_t n);
    /* out[d] += p[s] * values[s] for each s < n with p[s] != 0, in order of s */
    void (*weighted_sum)(const attention_kernels *, const float *p, const float *values, int64_t n, int64_t d,
                         float *out);
    float (*dot)(const float *, const float *, int64_t); /* the generic loops' steps */
    void (*axpy)(float, const float *, float *, int64_t);
};

/* The kernels for impl (IMPL_*), cache_type (KV_*) and head size d on this CPU. */
void attention_select(int impl, int cache_type, int64_t d, attention_kernels *out);

/* The rows of a cache (float32, float16 or int8 elements by cache type) from element `at` on. */
kv_rows kv_view(int cache_type, const void *rows, const uint16_t *scales, int64_t at);

/* The cache rows attend reads a chunk of at a time (into its `chunk` scratch). */
#define KV_CHUNK 32

/* The query heads of M tokens against one kv head's cached keys and values: token m's heads
 * at q + m ldq ([group][d]), its output at out + m ldo. Token m attends over slots
 * [0, n_keys) where mask[m n_keys + s] != 0 (mask NULL: all of them). Each chunk of keys and
 * values is read once for every token and head, and a token's arithmetic is the same
 * whatever M and however many keys lie beyond its own. scores: scratch of M * group * n_keys
 * floats; chunk: of KV_CHUNK * d. */
void attend(const attention_kernels *a, kv_rows keys, kv_rows values, const float *q, int64_t ldq, int64_t M,
            int64_t group, int64_t d, int64_t n_keys, const uint8_t *mask, float *scores, float *chunk, float *out,
            int64_t ldo);

#endif
