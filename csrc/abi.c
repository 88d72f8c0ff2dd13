/* The library's ABI as data: its version, and every id, error message, struct size and
 * field offset and size of mistol_abi.h by name, so that the Python side reads them instead of
 * writing them again (and notices a stale or mismatched build at load). */

#include <stddef.h>

#include "mistol_kernels.h"

/* a struct field's offset and size */
#define FIELD(type, field) \
    {"offsetof", #type "." #field, offsetof(type, field)}, {"fieldsize", #type "." #field, sizeof(((type *)0)->field)}

static const mistol_constant constants[] = {
    {"abi", "version", MISTOL_ABI_VERSION},

    {"format", "int8", FMT_INT8},
    {"format", "int4", FMT_INT4},
    /* llama.cpp's block types, named as gguf.GGMLQuantizationType names them */
    {"format", "Q4_K", FMT_Q4_K},
    {"format", "Q5_K", FMT_Q5_K},
    {"format", "Q6_K", FMT_Q6_K},
    {"format", "Q4_1", FMT_Q4_1},
    {"format", "Q5_0", FMT_Q5_0},
    {"format", "Q5_1", FMT_Q5_1},
    {"format", "Q4_Kx8", FMT_Q4_KX8},
    {"format", "Q6_Kx8", FMT_Q6_KX8},
    {"format", "Q5_Kx8", FMT_Q5_KX8},

    {"impl", "auto", IMPL_AUTO},
    {"impl", "scalar", IMPL_SCALAR},
    {"impl", "avx2", IMPL_AVX2},
    {"impl", "avx512vnni", IMPL_VNNI},
    {"impl", "neon", IMPL_NEON},
    {"impl", "dotprod", IMPL_DOTPROD},

    /* named as torch names its dtypes */
    {"dtype", "float32", DT_F32},
    {"dtype", "bfloat16", DT_BF16},
    {"dtype", "float16", DT_F16},

    /* named as `--kv-cache` names them */
    {"kv_cache", "f32", KV_F32},
    {"kv_cache", "f16", KV_F16},
    {"kv_cache", "q8_0", KV_Q8_0},

    {"error", "K must be a positive multiple of 32", ERR_K},
    {"error", "unknown format", ERR_FMT},
    {"error", "out of memory", ERR_NOMEM},
    {"error", "this CPU lacks the instructions of the chosen implementation", ERR_IMPL},
    {"error", "bad shape", ERR_ARG},

    /* mistol_layer.weights[i], by the name of the layer's module */
    {"decode_weight", "q_proj", W_Q},
    {"decode_weight", "k_proj", W_K},
    {"decode_weight", "v_proj", W_V},
    {"decode_weight", "o_proj", W_O},
    {"decode_weight", "gate_proj", W_GATE},
    {"decode_weight", "up_proj", W_UP},
    {"decode_weight", "down_proj", W_DOWN},

    {"sizeof", "mistol_matrix", sizeof(mistol_matrix)},
    FIELD(mistol_matrix, data),
    FIELD(mistol_matrix, rows),
    FIELD(mistol_matrix, tile_blocks),
    FIELD(mistol_matrix, format),

    {"sizeof", "mistol_layer", sizeof(mistol_layer)},
    FIELD(mistol_layer, weights),
    FIELD(mistol_layer, norm_attn),
    FIELD(mistol_layer, norm_mlp),
    FIELD(mistol_layer, qkv_bias),
    FIELD(mistol_layer, o_bias),

    {"sizeof", "mistol_decode_args", sizeof(mistol_decode_args)},
    FIELD(mistol_decode_args, layers),
    FIELD(mistol_decode_args, layer),
    FIELD(mistol_decode_args, x),
    FIELD(mistol_decode_args, cache_k),
    FIELD(mistol_decode_args, cache_v),
    FIELD(mistol_decode_args, cache_k_scale),
    FIELD(mistol_decode_args, cache_v_scale),
    FIELD(mistol_decode_args, cos),
    FIELD(mistol_decode_args, sin),
    FIELD(mistol_decode_args, mask),
    FIELD(mistol_decode_args, hidden),
    FIELD(mistol_decode_args, ffn),
    FIELD(mistol_decode_args, heads),
    FIELD(mistol_decode_args, kv_heads),
    FIELD(mistol_decode_args, head_dim),
    FIELD(mistol_decode_args, capacity),
    FIELD(mistol_decode_args, slot),
    FIELD(mistol_decode_args, n_keys),
    FIELD(mistol_decode_args, eps),
    FIELD(mistol_decode_args, nthreads),
    FIELD(mistol_decode_args, impl),
    FIELD(mistol_decode_args, cache_type),
    FIELD(mistol_decode_args, rows),
    FIELD(mistol_decode_args, kv_rows),

    {"sizeof", "mistol_kv_row", sizeof(mistol_kv_row)},
    FIELD(mistol_kv_row, k),
    FIELD(mistol_kv_row, v),
    FIELD(mistol_kv_row, k_scale),
    FIELD(mistol_kv_row, v_scale),
    FIELD(mistol_kv_row, mask),
    FIELD(mistol_kv_row, capacity),
    FIELD(mistol_kv_row, slot),
    FIELD(mistol_kv_row, n_keys),

    {NULL, NULL, 0},
};

/* Kept apart from the table: a build from before the table existed answers it too. */
EXPORT int mistol_kernels_abi(void) { return MISTOL_ABI_VERSION; }

EXPORT const mistol_constant *mistol_abi_constants(void) { return constants; }
