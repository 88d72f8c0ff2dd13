/* Declarations shared by mistol's C sources: the packed weight layout and its block
 * structs, the runtime choice of instruction set (CPU detection and the kernel table),
 * the threads' shares of a parallel region, fp16 conversion and common SIMD helpers.
 * Everything here is internal to the library (hidden visibility); the ctypes entry
 * points are marked EXPORT and what Python must agree on is in mistol_abi.h.
 *
 * Weight layout ("packed"): the N rows are taken in groups of 8 (the last group padded
 * with zero rows), and within a group the blocks of the 8 rows that cover the same 32
 * inputs sit next to each other:
 *
 *     packed[G = ceil(N/8)][B = K/32] group blocks (block_q8_0x8 or block_q4_0x8)
 *       d      the 8 rows' scales, fp16
 *       qs     the 8 rows' quants, QB bytes each, interleaved 4 bytes at a time:
 *              quant byte j of row r sits at 32 * (j / 4) + 4 * r + j % 4
 *              int8: QB = 32, q[j] int8, value = d * q[j]              (llama.cpp Q8_0)
 *              int4: QB = 16, byte j holds element j (low nibble) and
 *                    element j+16 (high nibble), value = d * (nibble - 8) (llama.cpp Q4_0)
 *
 * Long rows are cut into tiles along K: packed[T][G][B/T] group blocks, tile t holding
 * blocks [t * B/T, (t + 1) * B/T) of every group (T = 1 up to 4096 inputs; mistol.quant
 * chooses T and the kernels take the blocks per tile). A decode step multiplies tile by
 * tile, so a thread's share of a tile is one sequential read and the tile's activations
 * (4 KB or so) stay in L1 across its groups; without tiles a group of 8 rows of 14336
 * inputs (64 KB of int4) evicts them from L1 before the next group starts, and a down
 * projection read its weights 25% slower.
 *
 * Each 8-row group's part of a tile is one contiguous stream. The per-row blocks are
 * byte-for-byte llama.cpp's Q8_0/Q4_0 blocks (scale moved next to its neighbours', quants
 * interleaved), which lets GGUF tensors be repacked, not requantized. The 4-byte
 * interleave makes lane r of a 32-byte load hold row r's bytes: one dot-product
 * instruction against 4 activation bytes broadcast to every lane adds 4 products into
 * each row's own lane, and no horizontal sums are needed.
 */
#ifndef MISTOL_KERNELS_H
#define MISTOL_KERNELS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "mistol_abi.h"

/* -DMISTOL_PORTABLE_ONLY builds the scalar code alone, as on CPUs other than x86 and ARM64 */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(MISTOL_PORTABLE_ONLY)
#define MISTOL_X86 1
#include <immintrin.h>
#define AVX2_FN __attribute__((target("avx2,fma,f16c")))
#define VNNI_FN __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")))
#define VNNI_BW_FN __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni,avx512bw,avx512dq")))
/* AMX tiles (int8): Linux only, where a process asks the kernel for the tile state */
#if defined(__linux__) && (defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11)
#define MISTOL_AMX 1
#define AMX_FN                                                                                                  \
    __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni,avx512bw,avx512dq,amx-tile,amx-int8")))
#endif
#endif

/* 64-bit ARM: NEON (Advanced SIMD) is part of the architecture; the dot-product
 * instructions (ARMv8.2 "dotprod", every Apple M chip) are compiled per function and
 * chosen at run time, as AVX2 is on x86. */
#if defined(__GNUC__) && defined(__aarch64__) && !defined(MISTOL_PORTABLE_ONLY)
#define MISTOL_ARM 1
#include <arm_neon.h>
#if defined(__ARM_FEATURE_DOTPROD)
#define MISTOL_DOTPROD 1
#define DOTPROD_FN /* the whole build targets it already (Apple's arm64) */
#elif defined(__clang__) && __clang_major__ >= 17
#define MISTOL_DOTPROD 1
#define DOTPROD_FN __attribute__((target("dotprod")))
#elif !defined(__clang__) && __GNUC__ >= 8
#define MISTOL_DOTPROD 1
#define DOTPROD_FN __attribute__((target("arch=armv8.2-a+dotprod"))) /* as arm_neon.h declares sdot */
#endif /* else this compiler's arm_neon.h has sdot only for builds that target it: NEON alone */
#endif

#if defined(_WIN32)
#define EXPORT __declspec(dllexport)
#else
#define EXPORT __attribute__((visibility("default")))
#endif

#define QK 32 /* inputs per block */
#define IL 8  /* rows interleaved per group */
#define LINE_FLOATS 16 /* floats per 64-byte cache line */
#define SERIAL_BYTES (64 << 10) /* less work than this (weight bytes x rows): one thread */

/* llama.cpp's blocks of one row, as GGUF files and the row-order quantizer hold them. */
typedef struct {
    uint16_t d; /* fp16 scale */
    int8_t qs[QK];
} block_q8_0;

typedef struct {
    uint16_t d;
    uint8_t qs[QK / 2]; /* element j in the low nibble of byte j, element j + 16 in its high nibble */
} block_q4_0;

/* The packed layout's group blocks: the same blocks of 8 rows, scales first, quants
 * interleaved (quant_offset). */
typedef struct {
    uint16_t d[IL];
    int8_t qs[IL * QK];
} block_q8_0x8;

typedef struct {
    uint16_t d[IL];
    uint8_t qs[IL * QK / 2];
} block_q4_0x8;

_Static_assert(sizeof(block_q8_0) == 34 && sizeof(block_q4_0) == 18, "llama.cpp's block sizes");
_Static_assert(sizeof(block_q8_0x8) == 8 * 34 && sizeof(block_q4_0x8) == 8 * 18, "no padding in group blocks");

/* Quant bytes per row of one block, and bytes of one group block, in packed format fmt. */
static inline int64_t quant_bytes(int fmt) { return fmt == FMT_INT8 ? QK : QK / 2; }
static inline int64_t group_block_bytes(int fmt) { return fmt == FMT_INT8 ? sizeof(block_q8_0x8) : sizeof(block_q4_0x8); }

/* Row r's quant byte j within a group block's quants. */
static inline int64_t quant_offset(int r, int j) { return 32 * (j >> 2) + 4 * r + (j & 3); }

/* ---------------------------------------------------------------------------------------
 * Runtime dispatch
 */
int cpu_has_avx2(void);    /* AVX2 + FMA + F16C */
int cpu_has_vnni(void);    /* and AVX512-VNNI (on 256-bit vectors), -BW and -DQ */
int cpu_has_bf16dp(void);  /* and AVX512-BF16 */
int cpu_has_amx(void);     /* and AMX int8 tiles this process may use (MISTOL_AMX=0: as if not) */
int stream_prefetch(void); /* whether streaming kernels ask for their weights ahead (common.c) */
int cpu_has_dotprod(void); /* ARM: the dot products (sdot), and kernels for them in this build */

/* One activation row x[K] -> qa[K] int8, da[K/32] scales, sa[K/32] block sums of qa. */
typedef void (*quant_fn)(const float *, int64_t, int8_t *, float *, int32_t *);
/* One 8-row group against one quantized row, blocks [b0, b1), added into acc[8]. */
typedef void (*group_fn)(const uint8_t *, const int8_t *, const float *, const int32_t *, int64_t, int64_t, float *);
/* One 8-row group against M quantized rows held block-major in pairs (qact's qb, db, sb,
 * with ld = M rounded up to even; M even where more rows follow), blocks [b0, b1), added
 * into acc[8 m + r]: each weight block is read (and unpacked) once for all the rows. Row
 * m's sums are bit for bit the group_fn's for that row alone: the same integer block sums,
 * scaled and accumulated in the same order. Arguments: wg, qb, db, sb, ld, M, b0, b1, acc. */
typedef void (*group_rows_fn)(const uint8_t *, const int8_t *, const float *, const int32_t *, int64_t, int64_t,
                              int64_t, int64_t, float *);
/* The same for ng = 2 or 4 neighbouring groups at once (each one's blocks gstride bytes
 * after the one before; 4 only for M <= GROUPS4_ROWS), into acc[8 (ng m + j) + r]: row m's
 * 8 sums of group j, group after group; each row's bits as above. Arguments: ng, wg,
 * gstride, qb, db, sb, ld, M, b0, b1, acc. */
#define GROUPS4_ROWS 8
typedef void (*groups_rows_fn)(int, const uint8_t *, int64_t, const int8_t *, const float *, const int32_t *, int64_t,
                               int64_t, int64_t, int64_t, float *);

/* One activation row x[K] -> qk[K] int8, dk[K/256] scales, sk[K/16] sums of qk per 16
 * (the k-quants' activation blocks, kquant.h). */
typedef void (*kquant_fn)(const float *, int64_t, int8_t *, float *, int32_t *);
/* One row of a row-order format (kquant.h) against one quantized activation row of K
 * inputs (its per-32 or per-256 quantization, as the format takes): the dot product. */
typedef float (*rowdot_fn)(const uint8_t *, const int8_t *, const float *, const int32_t *, int64_t);
/* One group of a repacked k-quant layout against M <= X8_ROWS activation rows, into
 * out[M][8]: (group, q, ldq, d, s, K, M, out). The rows' quantized activations are held
 * super-block-major (row m's super-block i at q + (i ldq + m) 256: rows side by side, where
 * rows K bytes apart would share one set of the L1 cache), their scales and sums row by row
 * (d: K/256, s: K/16 apart). */
#define X8_ROWS 8
typedef void (*x8_rows_fn)(const uint8_t *, const int8_t *, int64_t, const float *, const int32_t *, int64_t, int64_t,
                           float *);
/* One row of a legacy type (Q4_1, Q5_0, Q5_1) against M <= LEGACY_ROWS activation rows, each
 * row's result the bits its rowdot gives: (w, q, ldq, d, s, K, M, y, ldy), row m's result
 * into y[m ldy]. The rows' per-32 quants are held 8 blocks at a time, rows side by side
 * (row m's block 8 g + k at q + ((g ldq + m) 8 + k) 32, as qact's qab), their scales and
 * sums row by row (d, s: K/32 apart). */
#define LEGACY_ROWS 16
typedef void (*legacy_rows_fn)(const uint8_t *, const int8_t *, int64_t, const float *, const int32_t *, int64_t,
                               int64_t, float *, int64_t);

/* The functions of one instruction set: the activation quantizers and each format's
 * kernel (a group kernel for the packed formats, a row kernel for the row-order ones). */
typedef struct {
    quant_fn quant;
    group_fn group[FMT_COUNT]; /* FMT_INT8, FMT_INT4 */
    kquant_fn kquant;
    rowdot_fn rowdot[FMT_COUNT]; /* the row-order formats */
    /* Q4_KX8, Q5_KX8, Q6_KX8: one group of 8 rows against one activation row (per 256), into out[8] */
    void (*q4k_x8)(const uint8_t *, const int8_t *, const float *, const int32_t *, int64_t, float *);
    void (*q5k_x8)(const uint8_t *, const int8_t *, const float *, const int32_t *, int64_t, float *);
    void (*q6k_x8)(const uint8_t *, const int8_t *, const float *, const int32_t *, int64_t, float *);
    /* the same for up to X8_ROWS activation rows at once (qact's qkb), each row's bits as
     * above; NULL: one row at a time */
    x8_rows_fn q4k_x8_rows, q5k_x8_rows, q6k_x8_rows;
    /* Q4_1, Q5_0, Q5_1: several activation rows at once (NULL: rowdot row by row) */
    legacy_rows_fn legacy_rows[FMT_COUNT];
    /* FMT_INT8, FMT_INT4: several activation rows at once (NULL: group[] row by row) */
    group_rows_fn group_rows[FMT_COUNT];
    /* the same over 2 or 4 groups at once (NULL: group_rows group by group) */
    groups_rows_fn groups_rows[FMT_COUNT];
} qkernels;

/* Activation rows quantized for the matrices that read them: per block of 32 (qa, da,
 * sa: int8/int4 and the legacy 32-blocks) and, where a k-quant reads them, per block of
 * 256 (qk, dk, sk); each NULL where no matrix needs it. Several rows' per-32 blocks may
 * also be held block-major for the multi-row kernels, rows in pairs (qb, db, sb: see
 * pair_rows in quant_gemv.c), else these are NULL. */
typedef struct {
    int8_t *qa;
    float *da;
    int32_t *sa;
    int8_t *qk;
    float *dk;
    int32_t *sk;
    int8_t *qb;
    float *db;
    int32_t *sb;
    int8_t *qkb; /* qk super-block-major, for the repacked k-quants' multi-row kernels, or NULL */
    int8_t *qab; /* qa 8 blocks at a time, rows side by side (legacy_rows_fn), for the legacy types' multi-row
                  * kernels, or NULL */
} qact;

enum { ACT_32 = 1, ACT_256 = 2 }; /* what act_needs returns: which quantizations to make */

/* The best implementation this CPU runs (IMPL_VNNI, IMPL_AVX2, IMPL_DOTPROD, IMPL_NEON or
 * IMPL_SCALAR). */
int best_impl(void);
/* The kernels of impl (IMPL_AUTO: the best this CPU runs): OK or ERR_IMPL. */
int qkernels_select(int impl, qkernels *out);
/* Fills the row-order formats' entries of out (kquant_gemv.c). */
void kquant_select(int impl, qkernels *out);

/* Row-order formats (kquant.h): whether fmt is one, and its bytes per row of K inputs;
 * whether fmt is known at all, and the inputs K must be a multiple of. */
int fmt_row_order(int fmt);
int64_t fmt_row_bytes(int fmt, int64_t K);
int fmt_known(int fmt);
int64_t fmt_k_multiple(int fmt);
/* ACT_32 | ACT_256: the activation quantizations that the matrices read. */
int act_needs(const mistol_matrix *mats, int count);
/* Inputs [e0, e1) of activation row m, x[K] (e0, e1 multiples of 256 where ACT_256 is
 * needed, else of 32), into the quantizations `needs` names, at that row's place in act. */
void act_quantize(const qkernels *kn, const float *x, int64_t K, int64_t m, int64_t e0, int64_t e1, int needs,
                  const qact *act);
/* Activation row m's per-256 quants q[K] into the super-block-major copy qkb[K / 256][M][256]
 * that the repacked k-quants' multi-row kernels read (a group's rows of one super-block side
 * by side: rows K bytes apart would share one set of the L1 cache). */
void act_row_to_blocks(const int8_t *q, int64_t m, int64_t M, int64_t K, int8_t *qkb);
/* The copies of M quantized activation rows (act's qa and qk, K inputs each) that the
 * several-row kernels read: those of act's qb/db/sb, qkb and qab that are not NULL (sized
 * as gemm_run in quant_gemv.c sizes them). Nothing for M < 2. */
void act_rows_copies(const qact *act, int64_t M, int64_t K);
/* Q4_1 / Q5_0 / Q5_1 rows [r0, r0 + IL) of w (the file's blocks; rows past `rows`: zero) ->
 * one group of int8 blocks out[K / 32] with the same quants and scales (Q5_0: its values;
 * Q4_1, Q5_1: their values less each block's m, which lands in mins[K / 32][IL] as float). */
void legacy_group_to_int8(int fmt, const uint8_t *w, int64_t rows, int64_t r0, int64_t K, block_q8_0x8 *out,
                          float *mins);
/* Inside a parallel region: rows [r0, r1) of one row-order matrix times M activation
 * rows, into y[m * ldy + r]. */
void kquant_rows(const qkernels *kn, const mistol_matrix *w, const qact *act, int64_t M, int64_t K, int64_t r0,
                 int64_t r1, float *y, int64_t ldy);

/* The floats of one thread's scratch (acc) for qgemm_share over M rows: up to four groups'
 * sums per row, on cache lines of its own. */
static inline int64_t qgemm_acc_floats(int64_t M) { return (4 * IL * M + LINE_FLOATS - 1) / LINE_FLOATS * LINE_FLOATS; }

/* Inside a parallel region (or outside it, as the only thread): this thread's share of
 * y[:, matrix i's columns] = (quantized rows act)[M][K] @ W_i^T for i < count;
 * matrix i's outputs start at column sum(rows of mats[0..i-1]), rows of y are ldy floats
 * apart. acc: this thread's scratch of qgemm_acc_floats(M) floats. */
void qgemm_share(const qkernels *kn, const mistol_matrix *mats, int count, const qact *act, int64_t M, int64_t K,
                 float *y, int64_t ldy, float *acc);

/* Inside a parallel region: this thread's index, and its contiguous share [start, end) of
 * `total` units. */
int64_t thread_index(void);
void thread_share(int64_t total, int64_t *start, int64_t *end);

/* ---------------------------------------------------------------------------------------
 * fp16 / bf16 <-> fp32 without F16C
 */
/* The scalar activation quantizers' rounding: half to even, as the SIMD ones. A NaN (a
 * non-finite input times the block's inverse scale) would be undefined behaviour cast to
 * int; it becomes 0, and the block's scale is made NaN (act_block_scale) so that the
 * product stays NaN as float arithmetic would. */
static inline int round_act(float v) { return v == v ? (int)nearbyintf(v) : 0; }
static inline float act_block_scale(float amax, int has_nan) { return has_nan ? NAN : amax / 127.0f; }

/* Ask for `bytes` at p into L2 (prefetcht1), for kernels whose several activation rows take
 * long enough over a block that the hardware prefetcher falls behind. Not into L1: there each
 * request holds one of the core's few L1 miss buffers until its line arrives, which kept the
 * int8 kernels at 8 rows near 24 GB/s (2.5-2.8 ms for 14336 x 4096 on 2 threads, whatever the
 * memory did); into L2 they take 1.7-1.9 ms, the dot products' own time. */
static inline void prefetch_to_l2(const void *p, int64_t bytes) {
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch((const char *)p + off, 0, 2);
}

/* Unaligned loads of 4 or 8 bytes (one instruction each; casts would break aliasing rules). */
static inline uint32_t load_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline int32_t load_i32(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return v; }
static inline int64_t load_i64(const int8_t *p) { int64_t v; memcpy(&v, p, 8); return v; }

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        int e = -1;
        do { e++; man <<= 1; } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t float_to_half(float f) { /* round to nearest even, as the hardware does */
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7fffffff;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00); /* rounds past the largest half */
    if (ax < 0x38800000u) { /* subnormal half (or zero) */
        if (ax < 0x33000000u) return (uint16_t)sign;
        uint32_t e = ax >> 23, man = (ax & 0x7fffff) | 0x800000, shift = 126 - e;
        uint32_t h = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((ax >> 13) - (112u << 10)), rem = ax & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

static inline float bf16_to_float(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* ---------------------------------------------------------------------------------------
 * Horizontal reductions of one AVX2 vector
 */
#ifdef MISTOL_X86
AVX2_FN static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2_FN static inline float hmax_ps(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

AVX2_FN static inline int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}
#endif

#endif
