/* llama.cpp's k-quant and legacy 4/5-bit block types, as GGUF files hold them: each
 * matrix row is its blocks one after the other, rows in the file's order (no repacking).
 *
 * k-quants: super-blocks of 256 inputs.
 *   Q4_K  fp16 d, dmin; 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32;
 *         128 bytes of nibbles. value = d * sc[j] * q - dmin * m[j], q in 0..15.
 *         Bytes 32c..32c+31 hold sub-block 2c (low nibbles) and 2c+1 (high nibbles).
 *   Q5_K  as Q4_K plus 32 bytes qh: bit 2c of qh[l] is the 5th bit of sub-block 2c's
 *         element l, bit 2c+1 that of sub-block 2c+1's.
 *   Q6_K  128 bytes ql (low 4 bits), 64 bytes qh (2 high bits), 16 int8 scales (one per
 *         16 inputs), fp16 d. value = d * sc[g] * (q - 32), q in 0..63.
 * Legacy types: blocks of 32 inputs, element j in the low nibble of byte j, element j+16
 * in its high nibble (as Q4_0).
 *   Q4_1  fp16 d, m; value = d * q + m.
 *   Q5_0  fp16 d; 32 bits qh (bit j: element j's 5th bit); value = d * (q - 16).
 *   Q5_1  fp16 d, m; qh; value = d * q + m.
 *
 * The k-quants' activations are quantized per 256 inputs (as llama.cpp's Q8_K: one fp32
 * scale, int8 values, sums per 16), so that a whole super-block's dot product is exact
 * integer arithmetic scaled once; the legacy types take the per-32 quantization of
 * quant_gemv.c (as llama.cpp's Q8_0/Q8_1).
 */
#ifndef MISTOL_KQUANT_H
#define MISTOL_KQUANT_H

#include "mistol_kernels.h"

#define QKK 256 /* inputs per k-quant super-block */

typedef struct {
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t qs[QKK / 2];
} block_q4_K;

typedef struct {
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t qh[QKK / 8];
    uint8_t qs[QKK / 2];
} block_q5_K;

typedef struct {
    uint8_t ql[QKK / 2];
    uint8_t qh[QKK / 4];
    int8_t scales[QKK / 16];
    uint16_t d;
} block_q6_K;

typedef struct {
    uint16_t d, m;
    uint8_t qs[QK / 2];
} block_q4_1;

typedef struct {
    uint16_t d;
    uint8_t qh[4];
    uint8_t qs[QK / 2];
} block_q5_0;

typedef struct {
    uint16_t d, m;
    uint8_t qh[4];
    uint8_t qs[QK / 2];
} block_q5_1;

/* Q4_K repacked at load for decode (FMT_Q4_KX8): the same super-block of 8 rows side by
 * side, so that one 32-byte load holds 4 quant bytes of each row (lane r = row r, as in
 * mistol_kernels.h's int4 layout) and the scales are applied to 8 rows at once; scales and
 * mins unpacked to bytes (4 bytes a row more than Q4_K: 148 bytes per 256 inputs). A matrix
 * is its groups of 8 rows (the last padded with zero rows), each its super-blocks in order. */
typedef struct {
    uint16_t d[8], dmin[8];
    uint8_t scales[8][8];   /* [sub-block j][row] */
    uint8_t mins[4][8][2];  /* [sub-block pair p][row][2]: the mins of sub-blocks 2p and 2p + 1 */
    uint8_t qs[4][8][8][4]; /* [32-byte chunk c][quad k][row]: Q4_K's qs bytes 32c + 4k .. 32c + 4k + 3 */
} block_q4_Kx8;

/* Q6_K repacked the same way (FMT_Q6_KX8), no larger than 8 rows of Q6_K. */
typedef struct {
    uint16_t d[8];
    int8_t scales[16][8];       /* [group of 16 g][row] */
    uint8_t ql[2][2][8][8][4];  /* [half h][part p][quad k][row]: Q6_K's ql bytes 64h + 32p + 4k .. + 3 */
    uint8_t qh[2][8][8][4];     /* [half h][quad k][row]: Q6_K's qh bytes 32h + 4k .. + 3 */
} block_q6_Kx8;

/* Q5_K repacked the same way (FMT_Q5_KX8): Q4_KX8's header, then the quants in the order
 * the kernel reads them, one stream: chunk c (sub-blocks 2c and 2c + 1, 5-bit quants lo and
 * hi) in two halves of 4 quads. A half holds, for its quad u (element l = 16 half + 4u + i
 * of both sub-blocks) and row r, qs[u][r][i] = lo | (hi & 7) << 5, and hi >> 3 in bits 2u,
 * 2u + 1 of qh[r][i]: lo is one AND away, hi five operations. 180 bytes a row per 256
 * inputs (Q5_K's 176, scales and mins as bytes). */
typedef struct {
    uint8_t qs[4][8][4]; /* [quad u][row][i]: lo and hi's low 3 bits */
    uint8_t qh[8][4];    /* [row][i]: hi's top 2 bits, of quad u in bits 2u, 2u + 1 */
} q5_kx8_half;

typedef struct {
    uint16_t d[8], dmin[8];
    uint8_t scales[8][8];   /* [sub-block j][row] */
    uint8_t mins[4][8][2];  /* [sub-block pair p][row][2]: the mins of sub-blocks 2p and 2p + 1 */
    q5_kx8_half q[4][2];    /* [32-byte chunk c][half] */
} block_q5_Kx8;

_Static_assert(sizeof(block_q6_Kx8) == 8 * 210, "8 rows of Q6_K");
_Static_assert(sizeof(block_q5_Kx8) == 8 * 180, "8 rows of Q5_K, scales and mins as bytes");
_Static_assert(sizeof(block_q4_Kx8) == 1184, "8 rows of Q4_K, scales and mins as bytes");
_Static_assert(sizeof(block_q4_K) == 144 && sizeof(block_q5_K) == 176 && sizeof(block_q6_K) == 210,
               "llama.cpp's k-quant block sizes");
_Static_assert(sizeof(block_q4_1) == 20 && sizeof(block_q5_0) == 22 && sizeof(block_q5_1) == 24,
               "llama.cpp's legacy block sizes");

/* Q4_K/Q5_K sub-block j's 6-bit scale and min from the 12 packed bytes. */
static inline void scale_min_k4(int j, const uint8_t *q, int *sc, int *m) {
    if (j < 4) {
        *sc = q[j] & 63, *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* One row of K inputs in row-order format fmt -> out[K] float32 (dequantize.c's rows). */
void kquant_dequantize_row(int fmt, const uint8_t *row, int64_t K, float *out);

#endif
