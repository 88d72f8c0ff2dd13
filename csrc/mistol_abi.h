/* What the library and its Python side (mistol/kernels/__init__.py) agree on: the ABI
 * version, the ids of formats, implementations, dtypes and errors, and the structs the
 * decode layer takes. Python writes none of these numbers itself: it reads them at load
 * from mistol_abi_constants() (abi.c), and checks its ctypes mirrors of the structs
 * against the sizes and offsets listed there. Bump MISTOL_ABI_VERSION on any change here
 * or in an exported function's parameters. */
#ifndef MISTOL_ABI_H
#define MISTOL_ABI_H

#include <stdint.h>

#define MISTOL_ABI_VERSION 20

/* Weight formats of the quantized kernels: int8/int4 in the packed layout of
 * mistol_kernels.h; the others are llama.cpp's block types in the file's own row order
 * (kquant.h), but Q4_KX8 / Q5_KX8 / Q6_KX8: Q4_K / Q5_K / Q6_K with 8 rows' super-blocks
 * interleaved. */
enum { FMT_INT8 = 1, FMT_INT4 = 2, FMT_Q4_K = 3, FMT_Q5_K = 4, FMT_Q6_K = 5, FMT_Q4_1 = 6, FMT_Q5_0 = 7,
       FMT_Q5_1 = 8, FMT_Q4_KX8 = 9, FMT_Q6_KX8 = 10,
       FMT_Q5_KX8 = 11, FMT_COUNT };
/* Implementations of the quantized kernels; IMPL_AUTO: the best this CPU runs. */
enum { IMPL_AUTO = 0, IMPL_SCALAR = 1, IMPL_AVX2 = 2, IMPL_VNNI = 3, IMPL_NEON = 4, IMPL_DOTPROD = 5 };
/* Element types of float tensors (dense weights, quantizer sources, dequantized output). */
enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
/* What the decode layer's KV cache holds: float32 or float16 rows, or llama.cpp's Q8_0 (int8
 * rows with a float16 scale per 32 values, the scales in a tensor of their own). */
enum { KV_F32 = 0, KV_F16 = 1, KV_Q8_0 = 2 };
enum { OK = 0, ERR_K = -1, ERR_FMT = -2, ERR_NOMEM = -3, ERR_IMPL = -4, ERR_ARG = -5 };

/* One quantized matrix: `rows` rows packed in format `format`, in tiles of `tile_blocks`
 * blocks of 32 inputs (int8/int4; the row-order formats ignore it, but it must be > 0). */
typedef struct {
    const uint8_t *data;
    int64_t rows;
    int64_t tile_blocks;
    int32_t format;
} mistol_matrix;

/* The weights of one decoder layer, in the order of `weights` below. */
enum { W_Q, W_K, W_V, W_O, W_GATE, W_UP, W_DOWN, W_COUNT };

typedef struct {
    mistol_matrix weights[W_COUNT];
    const float *norm_attn, *norm_mlp; /* the two RMSNorms' weights, [hidden] */
    const float *qkv_bias;             /* q, k, v biases side by side [dq + 2 dkv] (Qwen2), or NULL */
    const float *o_bias;               /* the output projection's bias [hidden], or NULL */
} mistol_layer;

/* One sequence's KV cache, holding every layer: [layers][kv_heads][capacity][head_dim]
 * values of the step's `cache_type` (float32, float16 or int8); with KV_Q8_0, k_scale and
 * v_scale hold their float16 scales, [layers][kv_heads][capacity][head_dim / 32] (else
 * NULL). A token's key and value go to slot `slot`; it attends over slots [0, n_keys) where
 * mask[s] != 0 (mask NULL: all of them). */
typedef struct {
    void *k, *v;
    uint16_t *k_scale, *v_scale;
    const uint8_t *mask;
    int64_t capacity, slot, n_keys;
} mistol_kv_row;

/* Everything one call of mistol_decode_layer reads: layer `layer` of `layers` for the
 * `rows` tokens whose hidden states x[rows][hidden] it updates in place. Either consecutive
 * tokens of one sequence (kv_rows NULL): its cache is cache_k/cache_v (scales:
 * cache_k_scale/cache_v_scale), laid out as mistol_kv_row describes; token m's key and value
 * go to slot (slot + m) mod capacity, and it attends over slots [0, n_keys) where
 * mask[m][s] != 0 (mask [rows][n_keys]; NULL: all of them). Or the next token of each of
 * `rows` sequences (a batch of decode steps): token m's cache is kv_rows[m] (the cache
 * fields here unused). cos/sin: the tokens' RoPE values, [rows][head_dim]. */
typedef struct {
    const mistol_layer *layers;
    int64_t layer;
    float *x;
    void *cache_k, *cache_v;
    uint16_t *cache_k_scale, *cache_v_scale;
    const float *cos, *sin;
    const uint8_t *mask;
    int64_t hidden, ffn, heads, kv_heads, head_dim;
    int64_t capacity, slot, n_keys;
    float eps;
    int32_t nthreads;
    int32_t impl;
    int32_t cache_type;
    int64_t rows;
    const mistol_kv_row *kv_rows;
} mistol_decode_args;

/* One entry of mistol_abi_constants(): a named value in a group ("format", "error", ...);
 * the list ends with an entry whose group is NULL. */
typedef struct {
    const char *group;
    const char *name;
    int64_t value;
} mistol_constant;

#endif
