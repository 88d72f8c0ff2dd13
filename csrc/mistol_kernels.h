/* Declarations shared by mistol's C sources: the quantized matrix-vector products of
 * mistol_kernels.c, used on their own (through ctypes) and inside the fused decode layer
 * of mistol_decode.c. Everything here is internal to the library (hidden visibility);
 * the ctypes entry points are marked EXPORT. */
#ifndef MISTOL_KERNELS_H
#define MISTOL_KERNELS_H

#include <stdint.h>

/* -DMISTOL_PORTABLE_ONLY builds the scalar code alone, as on CPUs other than x86 */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(MISTOL_PORTABLE_ONLY)
#define MISTOL_X86 1
#include <immintrin.h>
#define AVX2_FN __attribute__((target("avx2,fma,f16c")))
#define VNNI_FN __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")))
#endif

#if defined(_WIN32)
#define EXPORT __declspec(dllexport)
#else
#define EXPORT __attribute__((visibility("default")))
#endif

#define QK 32 /* inputs per block */
#define IL 8  /* rows interleaved per group */

enum { FMT_INT8 = 1, FMT_INT4 = 2 };
enum { IMPL_AUTO = 0, IMPL_SCALAR = 1, IMPL_AVX2 = 2, IMPL_VNNI = 3 };
enum { OK = 0, ERR_K = -1, ERR_FMT = -2, ERR_NOMEM = -3, ERR_IMPL = -4, ERR_ARG = -5 };

/* One activation row x[K] -> qa[K] int8, da[K/32] scales, sa[K/32] block sums of qa. */
typedef void (*quant_fn)(const float *, int64_t, int8_t *, float *, int32_t *);
/* One 8-row group against one quantized row, blocks [b0, b1), added into acc[8]. */
typedef void (*group_fn)(const uint8_t *, const int8_t *, const float *, const int32_t *, int64_t, int64_t, float *);

/* The functions of one instruction set: the activation quantizer (the same for both
 * weight formats) and each format's group kernel. */
typedef struct {
    quant_fn quant;
    group_fn group[3]; /* indexed by FMT_INT8 and FMT_INT4 */
} qkernels;

/* The kernels of impl (IMPL_AUTO: the best this CPU runs): OK or ERR_IMPL. */
int qkernels_select(int impl, qkernels *out);

/* Bytes of one block of 8 interleaved rows (32 inputs) in fmt's packed layout. */
int64_t group_block_bytes(int fmt);

/* Inside a parallel region (or outside it, as the only thread): this thread's share of
 * y[:, matrix i's columns] = (quantized rows qa/da/sa)[M][K] @ W_i^T for i < count, W_i of
 * ns[i] rows packed in format fmts[i], in tiles of tbs[i] blocks; matrix i's outputs start
 * at column sum(ns[0..i-1]), rows of y are ldy floats apart. acc: this thread's scratch of
 * IL * M floats. */
void qgemm_share(const qkernels *kn, const int *fmts, const int8_t *qa, const float *da, const int32_t *sa,
                 int64_t M, int64_t K, int count, const uint8_t *const *ws, const int64_t *ns, const int64_t *tbs,
                 float *y, int64_t ldy, float *acc);

/* Inside a parallel region: this thread's index, and its contiguous share [start, end) of
 * `total` units. */
int64_t thread_index(void);
void thread_share(int64_t total, int64_t *start, int64_t *end);

int cpu_has_avx2(void);

#ifdef MISTOL_X86
AVX2_FN static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#endif
