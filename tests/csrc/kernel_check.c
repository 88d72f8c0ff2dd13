/* Checks every SIMD implementation of the quantized kernels that this CPU runs against the
 * portable scalar C, on seeded random data: int8/int4 in the packed layout, and llama.cpp's
 * k-quant and legacy blocks (kquant.h) row by row and repacked 8 rows at a time. Built from
 * the C files of csrc/ and this file alone (no Python, no torch), so that it can be
 * cross-compiled for another architecture and run under an emulator
 * (tests/test_kernels_native.py).
 *
 * Where an implementation does the scalar code's arithmetic (the activation quantizers
 * everywhere; the k-quant and legacy block products everywhere; the NEON int8/int4
 * products, which scale and add without fusing) the results must be the same bits; the x86
 * int8/int4 products fuse the multiply-add and the decode layer's attention sums in another
 * order, so those are compared within a tolerance. Any implementation must give the same
 * bits at every thread count.
 *
 * The float (dense) products pick their code from the CPU alone; they are checked against
 * products and sums in double.
 *
 * Output: "best <impl>", then one line per check, "ok ...", "FAIL ..." or "unavailable
 * <impl>" (the CPU lacks its instructions); exit status 1 if any check failed.
 */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"
#include "kquant.h"

EXPORT int mistol_gemm_many(int fmt, const float *x, int64_t M, int64_t K, int count, const uint8_t *const *ws,
                            const int64_t *ns, const int64_t *tbs, float *y, int64_t ldy, int nthreads, int impl);
typedef struct mistol_workspace mistol_workspace;
EXPORT mistol_workspace *mistol_workspace_new(void);
EXPORT void mistol_workspace_free(mistol_workspace *ws);
EXPORT int mistol_decode_layer(mistol_workspace *ws, const mistol_decode_args *args);
EXPORT int mistol_gemm_matrices(const float *x, int64_t M, int64_t K, int count, const mistol_matrix *mats, float *y,
                                int64_t ldy, int nthreads, int impl);
EXPORT int mistol_gemm_as_int8(int fmt, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t rows,
                               float *y, int64_t ldy, int nthreads, int impl);
EXPORT int mistol_repack_q4_k_x8(const uint8_t *w, int64_t rows, int64_t K, uint8_t *out, int nthreads);
EXPORT int mistol_repack_q5_k_x8(const uint8_t *w, int64_t rows, int64_t K, uint8_t *out, int nthreads);
EXPORT int mistol_repack_q6_k_x8(const uint8_t *w, int64_t rows, int64_t K, uint8_t *out, int nthreads);
EXPORT int mistol_dense_many(int wtype, const float *x, int x_is_bf16, int64_t M, int64_t K, int count,
                             const void *const *ws, const int64_t *ns, const int64_t *tks, float *y, int64_t ldy,
                             int nthreads);

static const struct {
    int id;
    const char *name;
    int exact; /* its matrix products are the scalar code's arithmetic */
} IMPLS[] = {
    {IMPL_AVX2, "avx2", 0}, {IMPL_VNNI, "avx512vnni", 0}, {IMPL_NEON, "neon", 1}, {IMPL_DOTPROD, "dotprod", 1}};

static int failures = 0;

static void report(int ok, const char *impl, const char *what, double err) {
    printf("%s %s %s", ok ? "ok" : "FAIL", impl, what);
    if (err >= 0) printf(" (max relative difference %.3g)", err);
    printf("\n");
    failures += !ok;
}

/* splitmix64: the same numbers on every machine */
static uint64_t rng_state;
static uint64_t next_u64(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static float uniform(float lo, float hi) { return lo + (hi - lo) * (float)((next_u64() >> 40) * (1.0 / (1 << 24))); }

static float *random_floats(int64_t n, float scale) {
    float *x = malloc(sizeof(float) * (size_t)n);
    for (int64_t i = 0; i < n; i++) x[i] = uniform(-scale, scale);
    return x;
}

/* Activations with the quantizer's edge cases: a zero block, a block whose values land on
 * halves (ties round to even), one with a single nonzero value, one of extremes. */
static float *edge_activations(int64_t K) {
    float *x = random_floats(K, 3.0f);
    if (K >= 4 * QK) {
        memset(x, 0, sizeof(float) * QK);
        for (int j = 0; j < QK; j++) x[QK + j] = (float)(j - 16) + 0.5f, x[QK + QK - 1] = 127.0f;
        x[2 * QK + 5] = -1e-3f;
        for (int j = 0; j < QK; j++) x[3 * QK + j] = j % 2 ? 1e4f : -1e4f;
    }
    return x;
}

/* A random fp16 scale, now and then zero or subnormal. */
static uint16_t random_scale(void) {
    const uint64_t pick = next_u64() % 64;
    return pick == 0 ? 0 : pick == 1 ? (uint16_t)(1 + next_u64() % 0x3ff) : float_to_half(uniform(-0.05f, 0.05f));
}

/* Activations with the per-256 quantizer's edge cases (K a multiple of 256, at least
 * 1024): a zero super-block, one of halves (ties), one with a single tiny nonzero value. */
static float *edge_activations_256(int64_t K) {
    float *x = edge_activations(K);
    memset(x + QKK, 0, sizeof(float) * QKK);
    for (int j = 0; j < QKK; j++) x[2 * QKK + j] = (float)(j % 64 - 32) + 0.5f;
    x[2 * QKK + 7] = 127.0f;
    memset(x + 3 * QKK, 0, sizeof(float) * QKK);
    x[3 * QKK + 200] = 1e-3f;
    return x;
}

/* Group blocks of format fmt for rows x K with random quants and scales (a few of them
 * fp16 subnormals or zero), packed in one tile. */
static uint8_t *random_packed(int fmt, int64_t rows, int64_t K) {
    const int64_t blocks = (rows + IL - 1) / IL * (K / QK), bb = group_block_bytes(fmt);
    uint8_t *w = malloc((size_t)(blocks * bb));
    for (int64_t i = 0; i < blocks * bb; i++) w[i] = (uint8_t)next_u64();
    for (int64_t b = 0; b < blocks; b++) {
        uint16_t *d = (uint16_t *)(w + b * bb); /* both group blocks start with d[IL] */
        for (int r = 0; r < IL; r++) d[r] = random_scale();
    }
    return w;
}

/* Rows x K of a row-order format (kquant.h) with random quants, scales and mins (all 6
 * bits of a k-quant's, all 8 of Q6_K's, -128 included) and random fp16 fields as above. */
static uint8_t *random_rows(int fmt, int64_t rows, int64_t K) {
    const int64_t bs = fmt_row_bytes(fmt, fmt_k_multiple(fmt)), blocks = rows * fmt_row_bytes(fmt, K) / bs;
    uint8_t *w = malloc((size_t)(blocks * bs) + 1);
    for (int64_t i = 0; i < blocks * bs; i++) w[i] = (uint8_t)next_u64();
    for (int64_t b = 0; b < blocks; b++) {
        uint8_t *blk = w + b * bs;
        /* the fp16 fields: d (and dmin or m) first, but Q6_K's d last */
        const int64_t at = fmt == FMT_Q6_K ? bs - 2 : 0, count = fmt == FMT_Q6_K || fmt == FMT_Q5_0 ? 1 : 2;
        for (int64_t f = 0; f < count; f++) {
            const uint16_t h = random_scale();
            memcpy(blk + at + 2 * f, &h, 2);
        }
    }
    return w;
}

/* The same rows' blocks in format fmt as the kernels take them: a repacked copy for the
 * 8-row layouts (Q4_KX8, Q5_KX8, Q6_KX8), else the rows themselves. */
static uint8_t *kernel_layout(int fmt, uint8_t *rows_data, int64_t rows, int64_t K) {
    if (fmt != FMT_Q4_KX8 && fmt != FMT_Q5_KX8 && fmt != FMT_Q6_KX8) return rows_data;
    uint8_t *out = malloc((size_t)((rows + 7) / 8 * 8 * fmt_row_bytes(fmt, K)));
    const int rc = fmt == FMT_Q4_KX8   ? mistol_repack_q4_k_x8(rows_data, rows, K, out, 2)
                   : fmt == FMT_Q5_KX8 ? mistol_repack_q5_k_x8(rows_data, rows, K, out, 2)
                                       : mistol_repack_q6_k_x8(rows_data, rows, K, out, 2);
    if (rc != OK) printf("FAIL repack of format %d: error %d\n", fmt, rc), failures++;
    free(rows_data);
    return out;
}

/* The GGUF type whose rows fmt holds (Q4_K for Q4_KX8, ...). */
static int file_format(int fmt) {
    return fmt == FMT_Q4_KX8 ? FMT_Q4_K : fmt == FMT_Q5_KX8 ? FMT_Q5_K : fmt == FMT_Q6_KX8 ? FMT_Q6_K : fmt;
}

/* A repacked layout's group kernel: 8 rows against one activation row. */
typedef void (*x8_fn)(const uint8_t *, const int8_t *, const float *, const int32_t *, int64_t, float *);
static x8_fn x8_kernel(int fmt, const qkernels *kn) {
    return fmt == FMT_Q4_KX8 ? kn->q4k_x8 : fmt == FMT_Q5_KX8 ? kn->q5k_x8 : kn->q6k_x8;
}

/* A weight matrix of `rows` x K in format fmt (any), random, and its mistol_matrix. */
static mistol_matrix random_matrix(int fmt, int64_t rows, int64_t K) {
    const uint8_t *data = fmt == FMT_INT8 || fmt == FMT_INT4
                              ? random_packed(fmt, rows, K)
                              : kernel_layout(fmt, random_rows(file_format(fmt), rows, K), rows, K);
    return (mistol_matrix){data, rows, K / QK, fmt};
}

static const char *format_name(int fmt) {
    static const char *names[FMT_COUNT] = {"?", "int8", "int4", "Q4_K", "Q5_K", "Q6_K", "Q4_1", "Q5_0", "Q5_1",
                                           "Q4_KX8", "Q6_KX8", "Q5_KX8"};
    return fmt > 0 && fmt < FMT_COUNT ? names[fmt] : "?";
}

/* (noinline: GCC 12's aarch64 vectorizer crashes on this loop inlined into check_decode) */
__attribute__((noinline)) static double max_relative_difference(const float *a, const float *b, int64_t n) {
    double scale = 0, err = 0;
    for (int64_t i = 0; i < n; i++) {
        const double v = fabs((double)b[i]), e = fabs((double)a[i] - b[i]);
        if (v > scale) scale = v;
        if (e > err || e != e) err = e; /* a NaN counts as the largest difference */
    }
    return scale > 0 ? err / scale : err;
}

static void check_quantizer(const char *name, const qkernels *kn, const qkernels *ref) {
    const int64_t K = 4096, B = K / QK;
    float *x = edge_activations(K), da[2][B];
    int8_t qa[2][K];
    int32_t sa[2][B];
    ref->quant(x, K, qa[0], da[0], sa[0]);
    kn->quant(x, K, qa[1], da[1], sa[1]);
    report(!memcmp(qa[0], qa[1], sizeof qa[0]) && !memcmp(da[0], da[1], sizeof da[0]) &&
               !memcmp(sa[0], sa[1], sizeof sa[0]),
           name, "activation quantizer: same bits", -1);
    free(x);
}

/* One group kernel against the scalar one over several block ranges. */
static void check_group(const char *name, int exact, int fmt, const qkernels *kn, const qkernels *ref) {
    const int64_t K = 1024, B = K / QK;
    uint8_t *w = random_packed(fmt, IL, K);
    float *x = edge_activations(K), da[B];
    int8_t qa[K];
    int32_t sa[B];
    ref->quant(x, K, qa, da, sa);
    const int64_t ranges[][2] = {{0, B}, {0, 1}, {3, 4}, {5, 17}};
    int ok = 1;
    double worst = 0;
    for (size_t i = 0; i < sizeof ranges / sizeof ranges[0]; i++) {
        float a[IL], b[IL];
        for (int r = 0; r < IL; r++) a[r] = b[r] = uniform(-1, 1); /* the kernels add into acc */
        ref->group[fmt](w, qa, da, sa, ranges[i][0], ranges[i][1], a);
        kn->group[fmt](w, qa, da, sa, ranges[i][0], ranges[i][1], b);
        const double err = max_relative_difference(b, a, IL);
        worst = fmax(worst, err);
        ok &= exact ? !memcmp(a, b, sizeof a) : err < 1e-5;
    }
    char what[64];
    snprintf(what, sizeof what, "%s group kernel: %s", fmt == FMT_INT8 ? "int8" : "int4",
             exact ? "same bits" : "within 1e-5");
    report(ok, name, what, exact ? -1 : worst);
    free(w), free(x);
}

/* mistol_gemm_many: three matrices (one with a padded last group, one of an odd number of
 * groups), tiled and not, one and several rows (21: more than one pass of the several-row
 * kernels), one and several threads. */
static void check_gemm(const char *name, int impl, int exact, int fmt) {
    const int64_t K = 2048, ns[3] = {203, 64, 40}, N = 203 + 64 + 40;
    uint8_t *ws[3];
    for (int i = 0; i < 3; i++) ws[i] = random_packed(fmt, ns[i], K);
    int ok = 1;
    double worst = 0;
    for (int t = 0; t < 2; t++) /* one tile, or tiles of 8 blocks (random bytes either way) */
    for (int64_t mi = 0; mi < 4; mi++) {
        const int64_t M = (int64_t[]){1, 3, 8, 21}[mi];
        const int64_t tb = t ? 8 : K / QK, tiles[3] = {tb, tb, tb};
        float *x = edge_activations(M * K);
        float *ref = malloc(sizeof(float) * (size_t)(M * N)), *y = malloc(sizeof(float) * (size_t)(M * N));
        if (mistol_gemm_many(fmt, x, M, K, 3, (const uint8_t *const *)ws, ns, tiles, ref, N, 1, IMPL_SCALAR)) ok = 0;
        for (int threads = 1; threads <= 4; threads += 3) {
            if (mistol_gemm_many(fmt, x, M, K, 3, (const uint8_t *const *)ws, ns, tiles, y, N, threads, impl)) ok = 0;
            const double err = max_relative_difference(y, ref, M * N);
            worst = fmax(worst, err);
            ok &= exact ? !memcmp(y, ref, sizeof(float) * (size_t)(M * N)) : err < 1e-5;
            /* each row as the one-row kernels give it alone (a speculative verify pass's rows
             * must be a decode step's bits) */
            for (int64_t m = 0; M > 1 && m < M; m++) {
                float *row = malloc(sizeof(float) * (size_t)N);
                if (mistol_gemm_many(fmt, x + m * K, 1, K, 3, (const uint8_t *const *)ws, ns, tiles, row, N, threads,
                                     impl))
                    ok = 0;
                ok &= !memcmp(row, y + m * N, sizeof(float) * (size_t)N);
                free(row);
            }
        }
        free(x), free(ref), free(y);
    }
    char what[96];
    snprintf(what, sizeof what, "%s gemm (tiled and not, M 1, 3, 8 and 21, 1 and 4 threads): %s, rows alone's bits",
             fmt == FMT_INT8 ? "int8" : "int4", exact ? "same bits" : "within 1e-5");
    report(ok, name, what, exact ? -1 : worst);
    for (int i = 0; i < 3; i++) free(ws[i]);
}

/* ---------------------------------------------------------------------------------------
 * k-quant and legacy blocks: every implementation gives the portable code's bits.
 */
static void check_kquantizer(const char *name, const qkernels *kn, const qkernels *ref) {
    const int64_t K = 2048;
    float *x = edge_activations_256(K), d[2][K / QKK];
    int8_t q[2][K];
    int32_t s16[2][K / 16];
    ref->kquant(x, K, q[0], d[0], s16[0]);
    kn->kquant(x, K, q[1], d[1], s16[1]);
    report(!memcmp(q[0], q[1], sizeof q[0]) && !memcmp(d[0], d[1], sizeof d[0]) &&
               !memcmp(s16[0], s16[1], sizeof s16[0]),
           name, "k-quant activation quantizer (per 256): same bits", -1);
    free(x);
}

/* A NaN among a block's activations: the portable quantizers make that block's scale NaN
 * (so the products are NaN, as in float arithmetic) and its codes well defined, the other
 * blocks as without it. Reported under "portable" (one line, not one per implementation). */
static void check_nan_activations(const qkernels *ref) {
    const int64_t K = 2 * QKK;
    float *x = random_floats(K, 3.0f), d32[K / QK], d256[K / QKK], clean32[K / QK];
    int8_t q[K], qc[K];
    int32_t s[K / 16];
    ref->quant(x, K, qc, clean32, s);
    x[QK + 3] = NAN;
    ref->quant(x, K, q, d32, s);
    int ok = d32[1] != d32[1] && d32[0] == clean32[0] && d32[2] == clean32[2] && !memcmp(q, qc, QK);
    for (int j = QK; j < 2 * QK; j++) ok &= q[j] == 0;
    ref->kquant(x, K, q, d256, s);
    ok &= d256[0] != d256[0] && d256[1] == d256[1] && q[QK + 3] == 0;
    report(ok, "portable", "activation quantizers: a NaN makes its block's scale NaN", -1);
    free(x);
}

/* x[K] quantized as format fmt reads it (per 256 or per 32) by the portable quantizer. */
typedef struct {
    int8_t *q;
    float *d;
    int32_t *s;
} quantized;

static quantized quantize_for(int fmt, const qkernels *ref, const float *x, int64_t K) {
    const int per256 = fmt_k_multiple(fmt) == QKK;
    quantized a = {malloc((size_t)K), malloc(sizeof(float) * (size_t)(K / QK)),
                   malloc(sizeof(int32_t) * (size_t)(K / 16))};
    (per256 ? ref->kquant : ref->quant)(x, K, a.q, a.d, a.s);
    return a;
}

/* One row-order format's row kernel against the portable one: several K (one block up to
 * several super-blocks), a few rows each, with the activations' edge cases. */
static void check_rowdot(const char *name, int fmt, const qkernels *kn, const qkernels *ref) {
    const int64_t unit = fmt_k_multiple(fmt), Ks[] = {unit, 3 * unit, 15 * unit, 4 * QKK, 9 * QKK};
    int ok = 1;
    for (size_t k = 0; k < sizeof Ks / sizeof Ks[0]; k++) {
        const int64_t K = Ks[k], rows = 6, rb = fmt_row_bytes(fmt, K);
        uint8_t *w = random_rows(fmt, rows, K);
        float *x = K >= 4 * QKK ? edge_activations_256(K) : random_floats(K, 2.0f);
        const quantized a = quantize_for(fmt, ref, x, K);
        for (int64_t r = 0; r < rows; r++) {
            const float want = ref->rowdot[fmt](w + r * rb, a.q, a.d, a.s, K);
            const float got = kn->rowdot[fmt](w + r * rb, a.q, a.d, a.s, K);
            ok &= !memcmp(&want, &got, sizeof want);
        }
        free(w), free(x), free(a.q), free(a.d), free(a.s);
    }
    char what[80];
    snprintf(what, sizeof what, "%s row kernel (K of 1 to 15 blocks or super-blocks): same bits", format_name(fmt));
    report(ok, name, what, -1);
}

/* A repacked 8-row layout's kernel against the portable one, group by group, and against
 * the portable row kernel on the rows it was made from (padding rows: zero). */
static void check_x8(const char *name, int fmt, const qkernels *kn, const qkernels *ref) {
    const int row_fmt = file_format(fmt);
    const int64_t shapes[][2] = {{8, QKK}, {13, 3 * QKK}, {3, 2 * QKK}, {21, 4 * QKK}}; /* rows, K */
    int ok = 1;
    for (size_t k = 0; k < sizeof shapes / sizeof shapes[0]; k++) {
        const int64_t rows = shapes[k][0], K = shapes[k][1], rb = fmt_row_bytes(row_fmt, K);
        const int64_t gb = 8 * fmt_row_bytes(fmt, K);
        uint8_t *w = random_rows(row_fmt, rows, K), *copy = malloc((size_t)(rows * rb));
        memcpy(copy, w, (size_t)(rows * rb));
        uint8_t *packed = kernel_layout(fmt, copy, rows, K);
        float *x = K >= 4 * QKK ? edge_activations_256(K) : random_floats(K, 2.0f);
        const quantized a = quantize_for(fmt, ref, x, K);
        for (int64_t g = 0; g < (rows + 7) / 8; g++) {
            float want[8], got[8];
            x8_kernel(fmt, ref)(packed + g * gb, a.q, a.d, a.s, K, want);
            x8_kernel(fmt, kn)(packed + g * gb, a.q, a.d, a.s, K, got);
            ok &= !memcmp(want, got, sizeof want);
            for (int64_t r = 8 * g; r < 8 * g + 8; r++) {
                const float row = r < rows ? ref->rowdot[row_fmt](w + r * rb, a.q, a.d, a.s, K) : 0.0f;
                ok &= !memcmp(&row, &got[r - 8 * g], sizeof row);
            }
        }
        free(w), free(packed), free(x), free(a.q), free(a.d), free(a.s);
    }
    char what[96];
    snprintf(what, sizeof what, "%s group kernel (8 to 21 rows): same bits, and the %s rows' bits", format_name(fmt),
             format_name(row_fmt));
    report(ok, name, what, -1);
}

/* mistol_gemm_matrices over one matrix of each row-order format (row counts not multiples
 * of 8), one and three activation rows, one and four threads: the portable code's bits. */
static void check_block_gemm(const char *name, int impl) {
    enum { COUNT = 9 };
    const int fmts[COUNT] = {FMT_Q4_KX8, FMT_Q5_K, FMT_Q6_KX8, FMT_Q4_1, FMT_Q5_0, FMT_Q5_1, FMT_Q6_K, FMT_Q4_K,
                             FMT_Q5_KX8};
    const int64_t rows[COUNT] = {203, 40, 77, 33, 19, 64, 21, 8, 45}, K = 1024;
    mistol_matrix mats[COUNT];
    int64_t N = 0;
    for (int i = 0; i < COUNT; i++) mats[i] = random_matrix(fmts[i], rows[i], K), N += rows[i];
    int ok = 1;
    const int64_t row_counts[] = {1, 3, 11}; /* (11: the repacked layouts' 8 rows at once, then 3) */
    for (size_t c = 0; c < sizeof row_counts / sizeof row_counts[0]; c++) {
        const int64_t M = row_counts[c];
        float *x = edge_activations_256(M * K);
        float *ref = malloc(sizeof(float) * (size_t)(M * N)), *y = malloc(sizeof(float) * (size_t)(M * N));
        if (mistol_gemm_matrices(x, M, K, COUNT, mats, ref, N, 1, IMPL_SCALAR) != OK) ok = 0;
        for (int threads = 1; threads <= 4; threads += 3) {
            memset(y, 0xff, sizeof(float) * (size_t)(M * N));
            if (mistol_gemm_matrices(x, M, K, COUNT, mats, y, N, threads, impl) != OK) ok = 0;
            ok &= !memcmp(y, ref, sizeof(float) * (size_t)(M * N));
        }
        free(x), free(ref), free(y);
    }
    report(ok, name, "k-quant and legacy gemm (9 formats, M 1, 3 and 11, 1 and 4 threads): same bits", -1);
    for (int i = 0; i < COUNT; i++) free((void *)mats[i].data);
}

/* The legacy types' multi-row kernels through mistol_gemm_matrices: K with and without a last
 * group of fewer than 8 blocks, 2 to 35 activation rows (past LEGACY_ROWS at once), 1 and 4
 * threads: every row the bits the portable row kernel gives it. */
static void check_legacy_rows(const char *name, int impl) {
    const int fmts[] = {FMT_Q4_1, FMT_Q5_0, FMT_Q5_1};
    const int64_t Ks[] = {13 * QK, 3 * QK, 28 * QK, 4096 + 5 * QK}, row_counts[] = {2, 5, 17, 35}, rows = 11;
    int ok = 1;
    for (size_t f = 0; f < sizeof fmts / sizeof fmts[0]; f++)
        for (size_t k = 0; k < sizeof Ks / sizeof Ks[0]; k++) {
            const int64_t K = Ks[k];
            const mistol_matrix w = random_matrix(fmts[f], rows, K);
            for (size_t c = 0; c < sizeof row_counts / sizeof row_counts[0]; c++) {
                const int64_t M = row_counts[c];
                float *x = edge_activations(M * K);
                float *ref = malloc(sizeof(float) * (size_t)(M * rows)), *y = malloc(sizeof(float) * (size_t)(M * rows));
                if (mistol_gemm_matrices(x, M, K, 1, &w, ref, rows, 1, IMPL_SCALAR) != OK) ok = 0;
                for (int threads = 1; threads <= 4; threads += 3) {
                    memset(y, 0xff, sizeof(float) * (size_t)(M * rows));
                    if (mistol_gemm_matrices(x, M, K, 1, &w, y, rows, threads, impl) != OK) ok = 0;
                    ok &= !memcmp(y, ref, sizeof(float) * (size_t)(M * rows));
                }
                free(x), free(ref), free(y);
            }
            free((void *)w.data);
        }
    report(ok, name, "Q4_1/Q5_0/Q5_1 several rows (M 2 to 35, K 3 to 133 blocks, 1 and 4 threads): same bits", -1);
}

/* mistol_gemm_as_int8 (Q4_1 / Q5_0 / Q5_1 rows converted 8 at a time to int8 blocks of their
 * quants; row count not a multiple of 8; 1, 3 and 40 activation rows; 1 and 4 threads).
 * Q5_0 against mistol_gemm_matrices on int8 blocks of the same values converted here one block
 * at a time: this implementation's int8 kernels' bits. Q4_1 and Q5_1 (minimums added apart)
 * against their own kernels: the same integer sums, the float steps in another order. */
static void check_as_int8(const char *name, int impl) {
    const int64_t rows = 19, K = 1024, B = K / QK, G = (rows + IL - 1) / IL;
    const int fmts[] = {FMT_Q5_0, FMT_Q4_1, FMT_Q5_1};
    int ok = 1;
    double worst = 0.0;
    for (size_t f = 0; f < sizeof fmts / sizeof fmts[0]; f++) {
        const int fmt = fmts[f];
        uint8_t *w = random_rows(fmt, rows, K);
        block_q8_0x8 *packed = calloc((size_t)(G * B), sizeof(block_q8_0x8));
        for (int64_t r = 0; fmt == FMT_Q5_0 && r < rows; r++)
            for (int64_t b = 0; b < B; b++) {
                const block_q5_0 *blk = (const block_q5_0 *)w + r * B + b;
                block_q8_0x8 *out = packed + r / IL * B + b;
                uint32_t qh;
                memcpy(&qh, blk->qh, 4);
                out->d[r % IL] = blk->d;
                for (int j = 0; j < QK; j++) {
                    const int nibble = j < QK / 2 ? blk->qs[j] & 15 : blk->qs[j - QK / 2] >> 4;
                    out->qs[quant_offset((int)(r % IL), j)] = (uint8_t)(int8_t)((nibble | (int)((qh >> j) & 1) << 4) - 16);
                }
            }
        const mistol_matrix ref_matrix = fmt == FMT_Q5_0 ? (mistol_matrix){(const uint8_t *)packed, rows, B, FMT_INT8}
                                                         : (mistol_matrix){w, rows, 1, fmt};
        const int64_t row_counts[] = {1, 3, 40};
        for (size_t c = 0; c < sizeof row_counts / sizeof row_counts[0]; c++) {
            const int64_t M = row_counts[c];
            float *x = edge_activations(M * K);
            float *ref = malloc(sizeof(float) * (size_t)(M * rows)), *y = malloc(sizeof(float) * (size_t)(M * rows));
            if (mistol_gemm_matrices(x, M, K, 1, &ref_matrix, ref, rows, 1, fmt == FMT_Q5_0 ? impl : IMPL_SCALAR) != OK)
                ok = 0;
            double scale = 0.0;
            for (int64_t i = 0; i < M * rows; i++) scale = fmax(scale, fabs(ref[i]));
            for (int threads = 1; threads <= 4; threads += 3) {
                memset(y, 0xff, sizeof(float) * (size_t)(M * rows));
                if (mistol_gemm_as_int8(fmt, x, M, K, w, rows, y, rows, threads, impl) != OK) ok = 0;
                if (fmt == FMT_Q5_0) ok &= !memcmp(y, ref, sizeof(float) * (size_t)(M * rows));
                for (int64_t i = 0; fmt != FMT_Q5_0 && i < M * rows; i++) {
                    const double err = fabs((double)y[i] - ref[i]) / scale;
                    ok &= err <= 1e-5, worst = fmax(worst, err);
                }
            }
            free(x), free(ref), free(y);
        }
        free(w), free(packed);
    }
    report(ok, name, "legacy types as int8 (M 1, 3 and 40, 1 and 4 threads): Q5_0 the int8 kernels' bits, "
                     "Q4_1/Q5_1 within 1e-5 of their kernels", worst);
}

/* The decode checks' layer: hidden 256, ffn 512, 8 query heads over 2 kv heads of 32,
 * weights of formats fmts[W_COUNT] (mixed), random, with q/k/v and o biases. */
enum { LAYER_D = 256, LAYER_F = 512, LAYER_HQ = 8, LAYER_HKV = 2, LAYER_HD = 32 };
static mistol_layer random_layer(const int *fmts) {
    const int64_t D = LAYER_D, F = LAYER_F, dq = LAYER_HQ * LAYER_HD, dkv = LAYER_HKV * LAYER_HD;
    const int64_t rows[W_COUNT] = {dq, dkv, dkv, D, F, F, D}, cols[W_COUNT] = {D, D, D, dq, D, D, F};
    mistol_layer layer;
    memset(&layer, 0, sizeof layer);
    for (int i = 0; i < W_COUNT; i++) layer.weights[i] = random_matrix(fmts[i], rows[i], cols[i]);
    layer.norm_attn = random_floats(D, 1.0f), layer.norm_mlp = random_floats(D, 1.0f);
    layer.qkv_bias = random_floats(dq + 2 * dkv, 0.1f), layer.o_bias = random_floats(D, 0.1f);
    return layer;
}

static void free_layer(mistol_layer *layer) {
    for (int i = 0; i < W_COUNT; i++) free((void *)layer->weights[i].data);
    free((void *)layer->norm_attn), free((void *)layer->norm_mlp), free((void *)layer->qkv_bias);
    free((void *)layer->o_bias);
}

/* One decoder layer (grouped-query attention over a few cached tokens, biases, weights of
 * formats fmts[W_COUNT], mixed) against the scalar implementation, and at 1 and 3 threads. */
static void check_decode(const char *name, int impl, const int *fmts, const char *label) {
    enum { D = LAYER_D, F = LAYER_F, HQ = LAYER_HQ, HKV = LAYER_HKV, HD = LAYER_HD, CAP = 24, SLOT = 17 };
    mistol_layer layer = random_layer(fmts);
    float *cos = random_floats(HD, 1.0f), *sin = random_floats(HD, 1.0f), *x0 = random_floats(D, 1.0f);
    const int64_t cache = HKV * CAP * HD;
    float *keys = random_floats(cache, 1.0f), *values = random_floats(cache, 1.0f);
    float out[3][D];
    float *k = malloc(sizeof(float) * cache), *v = malloc(sizeof(float) * cache);
    mistol_workspace *ws = mistol_workspace_new();
    const int runs[3][2] = {{IMPL_SCALAR, 1}, {impl, 1}, {impl, 3}};
    int ok = 1;
    for (int r = 0; r < 3; r++) {
        memcpy(k, keys, sizeof(float) * cache), memcpy(v, values, sizeof(float) * cache);
        memcpy(out[r], x0, sizeof(float) * D);
        const mistol_decode_args args = {
            .layers = &layer, .layer = 0, .x = out[r], .cache_k = k, .cache_v = v, .cos = cos, .sin = sin,
            .mask = NULL, .hidden = D, .ffn = F, .heads = HQ, .kv_heads = HKV, .head_dim = HD,
            .capacity = CAP, .slot = SLOT, .n_keys = SLOT + 1, .eps = 1e-5f, .nthreads = runs[r][1],
            .impl = runs[r][0], .rows = 1};
        if (mistol_decode_layer(ws, &args) != OK) ok = 0;
    }
    const double err = max_relative_difference(out[1], out[0], D);
    char what[96];
    snprintf(what, sizeof what, "decode layer (%s): within 1e-4 of scalar", label);
    report(ok && err < 1e-4, name, what, err);
    snprintf(what, sizeof what, "decode layer (%s): same bits at 1 and 3 threads", label);
    report(ok && !memcmp(out[1], out[2], sizeof out[1]), name, what, -1);
    mistol_workspace_free(ws);
    free_layer(&layer);
    free(cos), free(sin), free(x0), free(keys), free(values), free(k), free(v);
}

/* mistol_decode_layer over M = 5 rows at once (a verify pass) against 5 calls of one row
 * each, from the same cache: the same hidden states and cache contents, bit for bit, for each
 * cache type, 1 and 3 threads. The rows' slots wrap past the cache's end; each row's mask
 * hides the later rows' slots (as causality does) and a few others (as a window does). */
static void check_decode_rows(const char *name, int impl, const int *fmts, const char *label) {
    enum { D = LAYER_D, F = LAYER_F, HQ = LAYER_HQ, HKV = LAYER_HKV, HD = LAYER_HD, CAP = 24, SLOT = 21, M = 5 };
    mistol_layer layer = random_layer(fmts);
    float *cos = random_floats(M * HD, 1.0f), *sin = random_floats(M * HD, 1.0f), *x0 = random_floats(M * D, 1.0f);
    uint8_t mask[M][CAP];
    for (int m = 0; m < M; m++)
        for (int s = 0; s < CAP; s++) {
            int later = 0;
            for (int n = m + 1; n < M; n++) later |= s == (SLOT + n) % CAP;
            mask[m][s] = !later && s % 5 != 3;
        }
    const int64_t cache = HKV * CAP * HD, nscales = cache / QK;
    float *keys = random_floats(cache, 1.0f), *values = random_floats(cache, 1.0f);
    uint16_t scale_init[HKV * CAP * HD / QK];
    for (int64_t i = 0; i < nscales; i++) scale_init[i] = float_to_half(uniform(0.001f, 0.01f));
    mistol_workspace *ws = mistol_workspace_new();
    int ok = 1;
    for (int type = KV_F32; type <= KV_Q8_0; type++)
        for (int threads = 1; threads <= 3; threads += 2) {
            float out[2][M * D];
            void *k[2], *v[2];
            uint16_t ks[2][HKV * CAP * HD / QK], vs[2][HKV * CAP * HD / QK];
            for (int r = 0; r < 2; r++) { /* r = 0: row by row, 1: all rows at once */
                k[r] = malloc(sizeof(float) * cache), v[r] = malloc(sizeof(float) * cache);
                memcpy(k[r], keys, sizeof(float) * cache), memcpy(v[r], values, sizeof(float) * cache);
                memcpy(ks[r], scale_init, sizeof ks[r]), memcpy(vs[r], scale_init, sizeof vs[r]);
                memcpy(out[r], x0, sizeof(float) * M * D);
                mistol_decode_args args = {
                    .layers = &layer, .layer = 0, .cache_k = k[r], .cache_v = v[r], .hidden = D, .ffn = F, .heads = HQ,
                    .kv_heads = HKV, .head_dim = HD, .capacity = CAP, .n_keys = CAP, .eps = 1e-5f, .nthreads = threads,
                    .impl = impl, .cache_type = type, .cache_k_scale = type == KV_Q8_0 ? ks[r] : NULL,
                    .cache_v_scale = type == KV_Q8_0 ? vs[r] : NULL};
                for (int m = 0; m < M; m += r ? M : 1) {
                    args.x = out[r] + m * D, args.cos = cos + m * HD, args.sin = sin + m * HD, args.mask = mask[m];
                    args.slot = (SLOT + m) % CAP, args.rows = r ? M : 1;
                    if (mistol_decode_layer(ws, &args) != OK) ok = 0;
                }
            }
            const size_t cache_bytes = type == KV_F32 ? sizeof(float) * cache : type == KV_F16 ? 2 * cache : cache;
            ok &= !memcmp(out[0], out[1], sizeof out[0]) && !memcmp(k[0], k[1], cache_bytes) &&
                  !memcmp(v[0], v[1], cache_bytes) && (type != KV_Q8_0 || (!memcmp(ks[0], ks[1], sizeof ks[0]) &&
                                                                          !memcmp(vs[0], vs[1], sizeof vs[0])));
            for (int r = 0; r < 2; r++) free(k[r]), free(v[r]);
        }
    char what[128];
    snprintf(what, sizeof what, "decode layer (%s), 5 rows at once: the bits of 5 one-row calls (3 caches)", label);
    report(ok, name, what, -1);
    mistol_workspace_free(ws);
    free_layer(&layer);
    free(cos), free(sin), free(x0), free(keys), free(values);
}

/* mistol_decode_layer over the next token of 4 sequences at once (kv_rows: a batch of decode
 * steps, each sequence its own cache of its own capacity, slot and mask) against 4 one-row
 * calls: the same hidden states and caches, bit for bit, each cache type, 1 and 3 threads. */
static void check_decode_sessions(const char *name, int impl, const int *fmts, const char *label) {
    enum { D = LAYER_D, F = LAYER_F, HQ = LAYER_HQ, HKV = LAYER_HKV, HD = LAYER_HD, M = 4, LAYERS = 2, LAYER = 1 };
    const int64_t caps[M] = {24, 7, 40, 16}, slots[M] = {21, 0, 39, 5}, keys[M] = {24, 3, 40, 16};
    mistol_layer layers[LAYERS]; /* (layer 1 of 2: each cache's second layer) */
    memset(layers, 0, sizeof layers);
    layers[LAYER] = random_layer(fmts);
    float *cos = random_floats(M * HD, 1.0f), *sin = random_floats(M * HD, 1.0f), *x0 = random_floats(M * D, 1.0f);
    uint8_t masks[M][40];
    for (int m = 0; m < M; m++)
        for (int s = 0; s < 40; s++) masks[m][s] = (s + m) % 4 != 1 || s == slots[m];
    float *init[M][2];
    uint16_t *scale_init[M][2];
    for (int m = 0; m < M; m++)
        for (int kv = 0; kv < 2; kv++) {
            const int64_t n = LAYERS * HKV * caps[m] * HD;
            init[m][kv] = random_floats(n, 1.0f), scale_init[m][kv] = malloc(sizeof(uint16_t) * (size_t)(n / QK));
            for (int64_t i = 0; i < n / QK; i++) scale_init[m][kv][i] = float_to_half(uniform(0.001f, 0.01f));
        }
    mistol_workspace *ws = mistol_workspace_new();
    int ok = 1;
    for (int type = KV_F32; type <= KV_Q8_0; type++)
        for (int threads = 1; threads <= 3; threads += 2) {
            float out[2][M * D];
            mistol_kv_row kv_rows[2][M];
            for (int r = 0; r < 2; r++) { /* r = 0: one call per sequence, 1: one call for all */
                for (int m = 0; m < M; m++) {
                    const int64_t n = LAYERS * HKV * caps[m] * HD;
                    void *k = malloc(sizeof(float) * (size_t)n), *v = malloc(sizeof(float) * (size_t)n);
                    uint16_t *ks = malloc(sizeof(uint16_t) * (size_t)(n / QK)), *vs = malloc(sizeof(uint16_t) * (size_t)(n / QK));
                    memcpy(k, init[m][0], sizeof(float) * (size_t)n), memcpy(v, init[m][1], sizeof(float) * (size_t)n);
                    memcpy(ks, scale_init[m][0], sizeof(uint16_t) * (size_t)(n / QK));
                    memcpy(vs, scale_init[m][1], sizeof(uint16_t) * (size_t)(n / QK));
                    kv_rows[r][m] = (mistol_kv_row){k, v, type == KV_Q8_0 ? ks : NULL, type == KV_Q8_0 ? vs : NULL,
                                                    masks[m], caps[m], slots[m], keys[m]};
                    if (type != KV_Q8_0) free(ks), free(vs);
                }
                memcpy(out[r], x0, sizeof(float) * M * D);
                mistol_decode_args args = {.layers = layers, .layer = LAYER, .hidden = D, .ffn = F, .heads = HQ,
                                           .kv_heads = HKV, .head_dim = HD, .eps = 1e-5f, .nthreads = threads,
                                           .impl = impl, .cache_type = type};
                for (int m = 0; m < M; m += r ? M : 1) {
                    args.x = out[r] + m * D, args.cos = cos + m * HD, args.sin = sin + m * HD;
                    args.rows = r ? M : 1, args.kv_rows = kv_rows[r] + m;
                    if (mistol_decode_layer(ws, &args) != OK) ok = 0;
                }
            }
            ok &= !memcmp(out[0], out[1], sizeof out[0]);
            for (int m = 0; m < M; m++) {
                const int64_t n = LAYERS * HKV * caps[m] * HD;
                const size_t bytes = (size_t)n * (type == KV_F32 ? 4 : type == KV_F16 ? 2 : 1);
                ok &= !memcmp(kv_rows[0][m].k, kv_rows[1][m].k, bytes) && !memcmp(kv_rows[0][m].v, kv_rows[1][m].v, bytes);
                if (type == KV_Q8_0)
                    ok &= !memcmp(kv_rows[0][m].k_scale, kv_rows[1][m].k_scale, sizeof(uint16_t) * (size_t)(n / QK)) &&
                          !memcmp(kv_rows[0][m].v_scale, kv_rows[1][m].v_scale, sizeof(uint16_t) * (size_t)(n / QK));
                for (int r = 0; r < 2; r++)
                    free(kv_rows[r][m].k), free(kv_rows[r][m].v), free(kv_rows[r][m].k_scale), free(kv_rows[r][m].v_scale);
            }
        }
    char what[128];
    snprintf(what, sizeof what, "decode layer (%s), 4 sequences at once: the bits of 4 one-row calls (3 caches)", label);
    report(ok, name, what, -1);
    mistol_workspace_free(ws);
    free_layer(&layers[LAYER]);
    for (int m = 0; m < M; m++)
        for (int kv = 0; kv < 2; kv++) free(init[m][kv]), free(scale_init[m][kv]);
    free(cos), free(sin), free(x0);
}

/* Element i of a cache's rows as attention reads it back. */
static double stored(int type, const void *rows, const uint16_t *scales, int64_t i) {
    if (type == KV_F32) return ((const float *)rows)[i];
    if (type == KV_F16) return half_to_float(((const uint16_t *)rows)[i]);
    return ((const int8_t *)rows)[i] * (double)half_to_float(scales[i / QK]);
}

/* attend (the decode layer's attention) against softmax attention in double over the values
 * the cache holds, for head sizes 32 to 128 and each cache type; and each token's bits
 * whatever else the call holds: 3 tokens over 70 keys against each token alone over only its
 * own keys (41 and 9: the chunks' and the eight-key groups' tails fall elsewhere). */
static void check_attention(const char *name, int impl) {
    enum { N = 70, M = 3, G = 2, DMAX = 128 };
    static const int64_t dims[] = {32, 40, 64, 96, 128};
    const int64_t own[M] = {N, 41, 9};
    uint8_t mask[M][N]; /* a window's and causality's gaps; token 2 sees only its last key */
    for (int m = 0; m < M; m++)
        for (int s = 0; s < N; s++) mask[m][s] = s < own[m] && s % 7 != 3 && (m != 2 || s == 8);
    int same_bits = 1;
    double worst = 0;
    for (size_t di = 0; di < sizeof dims / sizeof dims[0]; di++)
        for (int type = KV_F32; type <= KV_Q8_0; type++) {
            const int64_t d = dims[di];
            if (type == KV_Q8_0 && d % QK) continue;
            attention_kernels a;
            attention_select(impl, type, d, &a);
            float *kx = random_floats(N * d, 1.0f), *vx = random_floats(N * d, 1.0f), *q = random_floats(M * G * d, 3.0f);
            void *krows = malloc(sizeof(float) * N * d), *vrows = malloc(sizeof(float) * N * d);
            uint16_t kscales[N * DMAX / QK], vscales[N * DMAX / QK];
            for (int64_t s = 0; s < N; s++)
                a.store(kx + s * d, krows, kscales, s * d, d), a.store(vx + s * d, vrows, vscales, s * d, d);
            const kv_rows keys = kv_view(type, krows, kscales, 0), values = kv_view(type, vrows, vscales, 0);
            float scores[M * G * N], chunk[KV_CHUNK * DMAX], out[M * G * DMAX], alone[G * DMAX];
            attend(&a, keys, values, q, G * d, M, G, d, N, &mask[0][0], scores, chunk, out, G * d);
            for (int m = 0; m < M; m++) {
                attend(&a, keys, values, q + m * G * d, G * d, 1, G, d, own[m], mask[m], scores, chunk, alone, G * d);
                same_bits &= !memcmp(alone, out + m * G * d, sizeof(float) * (size_t)(G * d));
                for (int g = 0; g < G; g++) {
                    double p[N], top = -INFINITY, sum = 0;
                    for (int s = 0; s < N; s++) {
                        p[s] = -INFINITY;
                        if (!mask[m][s]) continue;
                        double dot = 0;
                        for (int64_t i = 0; i < d; i++) dot += (double)q[(m * G + g) * d + i] * stored(type, krows, kscales, s * d + i);
                        p[s] = dot / sqrt((double)d), top = fmax(top, p[s]);
                    }
                    for (int s = 0; s < N; s++) sum += p[s] = exp(p[s] - top);
                    for (int64_t i = 0; i < d; i++) {
                        double exact = 0;
                        for (int s = 0; s < N; s++) exact += p[s] / sum * stored(type, vrows, vscales, s * d + i);
                        const double err = fabs(out[(m * G + g) * d + i] - exact); /* (values within +-1) */
                        if (err > worst || err != err) worst = err;
                    }
                }
            }
            free(kx), free(vx), free(q), free(krows), free(vrows);
        }
    report(worst < 2e-6, name, "attention (head sizes 32-128, 3 cache types): within 2e-6 of double", worst);
    report(same_bits, name, "attention: each token's bits alone over its own keys, as among 3 over 70 keys", -1);
}

/* mistol_dense_many (which picks its row function from the CPU alone) against products
 * and sums in double: float32, bf16 and f16 weights, plain rows and tiles, 1 and 2 rows of
 * x, 1 and 4 threads. Each output's error is measured against the sum of its products'
 * magnitudes (what float32 rounding can be proportional to). */
static void check_dense(const char *name) {
    const int64_t K = 1024, N = 70, tile = 256;
    const char *types[] = {"float32", "bfloat16", "float16"};
    for (int wtype = DT_F32; wtype <= DT_F16; wtype++) {
        const int64_t esize = wtype == DT_F32 ? 4 : 2;
        float *values = random_floats(N * K, 1.0f), *x = random_floats(2 * K, 1.0f);
        uint8_t *rows = malloc((size_t)(N * K * esize)), *tiles = malloc((size_t)(N * K * esize));
        for (int64_t i = 0; i < N * K; i++) { /* the stored value, and that value back as float */
            uint32_t bits;
            memcpy(&bits, &values[i], 4);
            const uint16_t h = wtype == DT_BF16 ? (uint16_t)(bits >> 16) : float_to_half(values[i]);
            if (wtype == DT_F32) memcpy(rows + 4 * i, &values[i], 4);
            else memcpy(rows + 2 * i, &h, 2), values[i] = wtype == DT_BF16 ? bf16_to_float(h) : half_to_float(h);
        }
        for (int64_t n = 0; n < N; n++) /* [K / tile][N][tile] */
            for (int64_t k = 0; k < K; k++)
                memcpy(tiles + ((k / tile * N + n) * tile + k % tile) * esize, rows + (n * K + k) * esize,
                       (size_t)esize);
        int ok = 1;
        double worst = 0;
        for (int tiled = 0; tiled < 2; tiled++)
            for (int64_t M = 1; M <= 2; M++)
                for (int threads = 1; threads <= 4; threads += 3) {
                    float y[2 * 70];
                    const void *w = tiled ? tiles : rows;
                    const int64_t tk = tiled ? tile : K;
                    if (mistol_dense_many(wtype, x, 0, M, K, 1, &w, &N, &tk, y, N, threads) != OK) ok = 0;
                    for (int64_t m = 0; m < M; m++)
                        for (int64_t n = 0; n < N; n++) {
                            double exact = 0, size = 0;
                            for (int64_t k = 0; k < K; k++) {
                                exact += (double)values[n * K + k] * x[m * K + k];
                                size += fabs((double)values[n * K + k] * x[m * K + k]);
                            }
                            const double err = fabs(y[m * N + n] - exact) / size;
                            if (err > worst || err != err) worst = err;
                        }
                }
        char what[64];
        snprintf(what, sizeof what, "dense %s rows: within 1e-6", types[wtype]);
        report(ok && worst < 1e-6, name, what, worst);
        free(values), free(x), free(rows), free(tiles);
    }
}

int main(void) {
    const int best = best_impl();
    const char *best_name = best == IMPL_SCALAR ? "scalar" : "?";
    for (size_t i = 0; i < sizeof IMPLS / sizeof IMPLS[0]; i++)
        if (IMPLS[i].id == best) best_name = IMPLS[i].name;
    printf("best %s\n", best_name);
    rng_state = 7;
    check_dense(best_name);
    qkernels ref;
    qkernels_select(IMPL_SCALAR, &ref);
    check_nan_activations(&ref);
    check_as_int8("portable", IMPL_SCALAR);
    check_attention("portable", IMPL_SCALAR);
    for (size_t i = 0; i < sizeof IMPLS / sizeof IMPLS[0]; i++) {
        qkernels kn;
        const char *name = IMPLS[i].name;
        if (qkernels_select(IMPLS[i].id, &kn) != OK) {
            printf("unavailable %s\n", name);
            continue;
        }
        rng_state = 42;
        check_quantizer(name, &kn, &ref);
        for (int fmt = FMT_INT8; fmt <= FMT_INT4; fmt++) {
            check_group(name, IMPLS[i].exact, fmt, &kn, &ref);
            check_gemm(name, IMPLS[i].id, IMPLS[i].exact, fmt);
        }
        static const int packed_fmts[W_COUNT] = {FMT_INT8, FMT_INT4, FMT_INT8, FMT_INT4,
                                                 FMT_INT8, FMT_INT4, FMT_INT8};
        check_attention(name, IMPLS[i].id);
        check_decode(name, IMPLS[i].id, packed_fmts, "int8 and int4");
        check_decode_rows(name, IMPLS[i].id, packed_fmts, "int8 and int4");
        check_decode_sessions(name, IMPLS[i].id, packed_fmts, "int8 and int4");
        check_kquantizer(name, &kn, &ref);
        for (int fmt = FMT_Q4_K; fmt <= FMT_Q5_1; fmt++) check_rowdot(name, fmt, &kn, &ref);
        check_x8(name, FMT_Q4_KX8, &kn, &ref);
        check_x8(name, FMT_Q5_KX8, &kn, &ref);
        check_x8(name, FMT_Q6_KX8, &kn, &ref);
        check_block_gemm(name, IMPLS[i].id);
        check_legacy_rows(name, IMPLS[i].id);
        check_as_int8(name, IMPLS[i].id);
        /* q: Q4_KX8, k: Q5_K, v: Q5_KX8, o: Q6_KX8, gate: Q4_1, up: Q5_1, down: Q6_K */
        static const int block_fmts[W_COUNT] = {FMT_Q4_KX8, FMT_Q5_K, FMT_Q5_KX8, FMT_Q6_KX8,
                                                FMT_Q4_1,   FMT_Q5_1, FMT_Q6_K};
        check_decode(name, IMPLS[i].id, block_fmts, "k-quant and legacy blocks");
        check_decode_rows(name, IMPLS[i].id, block_fmts, "k-quant and legacy blocks");
        check_decode_sessions(name, IMPLS[i].id, block_fmts, "k-quant and legacy blocks");
    }
    return failures ? 1 : 0;
}
