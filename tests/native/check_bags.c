/* Checks a build of a weighted-bags kernel against a plain loop, with no Python or torch: for a CPU
 * family this machine cannot run, the kernel is cross-compiled with this file and run under an
 * emulator (tests/test_kernels.py: ARM64 under qemu-aarch64). The decode path's two entry points too.
 * Exits 0 when every case matches.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int dsformer_weighted_bags(const float *rows, int64_t sequences, int64_t rows_per_sequence, int64_t row_len,
                           const void *index, int index_type, const int32_t *offsets, int64_t bag_size,
                           const float *weights, const float *bias, int64_t bags, float *out, int token_major,
                           int gelu, int threads);

int dsformer_decode_rows(const void *x, int64_t tokens, const void *basis, int64_t k, int64_t d, const void *index,
                         int index_type, const void *values, int64_t n, int64_t s, const float *bias, int gelu,
                         void *y, int half, int threads);
int dsformer_decode_columns(const void *x, int64_t tokens, int64_t n, const void *index, int index_type,
                            const void *values, const int32_t *starts, const int32_t *atoms, int64_t groups,
                            const void *basis, int64_t k, int64_t d, const float *bias, void *y, int half,
                            int threads);

static uint32_t state = 12345u;
static float uniform(void) {  /* in [-1, 1) */
    state = state * 1664525u + 1013904223u;
    return (float)(state >> 8) / (float)(1u << 23) - 1.0f;
}

static float gelu_exact(float x) { return 0.5f * x * (1.0f + erff(x / sqrtf(2.0f))); }

/* one case: S sequences of R rows of length L, B bags (variable sizes when use_offsets), the indices
   stored as int32, int16 or uint8 (index_type 0, 1, 2) */
static int check(int64_t S, int64_t R, int64_t L, int64_t B, int use_offsets, int token_major, int gelu,
                 int index_type) {
    const int64_t bag_size = 5, E = B * bag_size;
    float *rows = malloc(sizeof(float) * S * R * L), *weights = malloc(sizeof(float) * E);
    float *bias = malloc(sizeof(float) * B), *out = malloc(sizeof(float) * S * B * L);
    int32_t *index = malloc(sizeof(int32_t) * E), *offsets = malloc(sizeof(int32_t) * (B + 1));
    for (int64_t i = 0; i < S * R * L; i++) rows[i] = 3.0f * uniform();
    for (int64_t e = 0; e < E; e++) {
        weights[e] = uniform();
        index[e] = (int32_t)((uniform() + 1.0f) * 0.5f * (float)R) % (int32_t)R;
    }
    for (int64_t b = 0; b < B; b++) bias[b] = uniform();
    offsets[0] = 0;  /* uneven bags, some empty, ending at E */
    for (int64_t b = 1; b < B; b++) {
        const int64_t step = (b % 3 == 0) ? 0 : (int64_t)((uniform() + 1.0f) * bag_size);
        offsets[b] = offsets[b - 1] + step > E ? (int32_t)E : (int32_t)(offsets[b - 1] + step);
    }
    offsets[B] = (int32_t)E;
    int16_t *index16 = malloc(sizeof(int16_t) * E);
    uint8_t *index8 = malloc(E);
    for (int64_t e = 0; e < E; e++) index16[e] = (int16_t)index[e], index8[e] = (uint8_t)index[e];
    const void *stored = index_type == 0 ? (const void *)index : index_type == 1 ? (const void *)index16 : index8;
    dsformer_weighted_bags(rows, S, R, L, stored, index_type, use_offsets ? offsets : NULL, use_offsets ? 0 : bag_size, weights,
                           bias, B, out, token_major, gelu, 2);
    double worst = 0.0;
    for (int64_t s = 0; s < S; s++)
        for (int64_t b = 0; b < B; b++) {
            const int64_t e0 = use_offsets ? offsets[b] : b * bag_size, e1 = use_offsets ? offsets[b + 1] : (b + 1) * bag_size;
            for (int64_t l = 0; l < L; l++) {
                double want = bias[b];
                for (int64_t e = e0; e < e1; e++) want += (double)weights[e] * rows[(s * R + index[e]) * L + l];
                if (gelu) want = gelu_exact((float)want);
                const float got = token_major ? out[(s * L + l) * B + b] : out[(s * B + b) * L + l];
                const double error = fabs(got - want);
                if (error > worst) worst = error;
            }
        }
    free(rows); free(weights); free(bias); free(out); free(index); free(index16); free(index8); free(offsets);
    const int ok = worst < 1e-4;
    printf("S=%lld R=%lld L=%lld B=%lld offsets=%d token_major=%d gelu=%d index_type=%d: max error %.2e %s\n",
           (long long)S, (long long)R, (long long)L, (long long)B, use_offsets, token_major, gelu, index_type, worst,
           ok ? "ok" : "FAIL");
    return ok;
}

/* indices as the kernel reads them: int32, int16 or uint8 copies of `index` */
static void *narrowed(const int32_t *index, int64_t count, int index_type) {
    if (index_type == 0) return (void *)index;
    void *out = malloc((size_t)count * (index_type == 1 ? 2 : 1));
    for (int64_t e = 0; e < count; e++) {
        if (index_type == 1) ((int16_t *)out)[e] = (int16_t)index[e];
        else ((uint8_t *)out)[e] = (uint8_t)index[e];
    }
    return out;
}

static int report(const char *what, int64_t tokens, int64_t n, int64_t d, int64_t k, int index_type, int half,
                  double worst, double largest) {
    const int ok = half ? worst < 1e-2 * largest : worst < 1e-4;  /* bfloat16 outputs are rounded to 8 bits */
    printf("%s tokens=%lld n=%lld d=%lld k=%lld index_type=%d half=%d: max error %.2e %s\n", what, (long long)tokens,
           (long long)n, (long long)d, (long long)k, index_type, half, worst, ok ? "ok" : "FAIL");
    return ok;
}

/* bfloat16 as the kernel reads it (truncated here: the reference uses the same rounded numbers) */
static uint16_t to_half(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)(u >> 16);
}
static float from_half(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
/* round floats to bfloat16 in place; return their bit patterns (or the floats themselves when !half) */
static void *maybe_half(float *v, int64_t count, int half) {
    if (!half) return v;
    uint16_t *h = malloc(sizeof(uint16_t) * (size_t)(count ? count : 1));
    for (int64_t i = 0; i < count; i++) v[i] = from_half(h[i] = to_half(v[i]));
    return h;
}

/* a bfloat16 run's outputs as floats in y; the bfloat16 copies freed */
static void widen_outputs(float *y, void *yh, int64_t count, void *xh, void *bh, void *vh) {
    for (int64_t i = 0; i < count; i++) y[i] = from_half(((uint16_t *)yh)[i]);
    free(xh); free(bh); free(vh); free(yh);
}

/* the decode path of a row layer: n outputs of s entries over k atoms of d, interleaved by 16 outputs */
static int check_decode_rows(int64_t tokens, int64_t n, int64_t d, int64_t k, int64_t s, int index_type, int gelu,
                             int half) {
    const int64_t groups = (n + 15) / 16;
    float *x = malloc(sizeof(float) * tokens * d), *basis = malloc(sizeof(float) * k * d);
    float *values = calloc((size_t)(groups * s * 16), sizeof(float)), *bias = malloc(sizeof(float) * n);
    float *y = malloc(sizeof(float) * tokens * n);
    int32_t *index = calloc((size_t)(groups * s * 16), sizeof(int32_t));
    for (int64_t i = 0; i < tokens * d; i++) x[i] = uniform();
    for (int64_t i = 0; i < k * d; i++) basis[i] = uniform();
    for (int64_t i = 0; i < n; i++) bias[i] = uniform();
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < s; j++) {
            const int64_t at = ((i / 16) * s + j) * 16 + i % 16;
            values[at] = uniform();
            index[at] = (int32_t)((uniform() + 1.0f) * 0.5f * (float)k) % (int32_t)k;
        }
    void *stored = narrowed(index, groups * s * 16, index_type);
    void *xh = maybe_half(x, tokens * d, half), *bh = maybe_half(basis, k * d, half);
    void *vh = maybe_half(values, groups * s * 16, half), *yh = half ? malloc(sizeof(uint16_t) * tokens * n) : y;
    dsformer_decode_rows(xh, tokens, bh, k, d, stored, index_type, vh, n, s, bias, gelu, yh, half, 2);
    if (half) widen_outputs(y, yh, tokens * n, xh, bh, vh);
    double worst = 0.0, largest = 0.0;
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t i = 0; i < n; i++) {
            double want = bias[i];
            for (int64_t j = 0; j < s; j++) {
                const int64_t at = ((i / 16) * s + j) * 16 + i % 16;
                double z = 0.0;
                for (int64_t c = 0; c < d; c++) z += (double)basis[index[at] * d + c] * x[t * d + c];
                want += values[at] * z;
            }
            if (gelu) want = gelu_exact((float)want);
            if (fabs(y[t * n + i] - want) > worst) worst = fabs(y[t * n + i] - want);
            if (fabs(want) > largest) largest = fabs(want);
        }
    if (stored != index) free(stored);
    free(x); free(basis); free(values); free(bias); free(y); free(index);
    return report(gelu ? "decode rows gelu" : "decode rows", tokens, n, d, k, index_type, half, worst, largest);
}

/* the decode path of a column layer: n inputs, k atoms of d; atoms in groups of 16 (in reverse order, some
   bags empty), each group padded to its longest bag */
static int check_decode_columns(int64_t tokens, int64_t n, int64_t d, int64_t k, int index_type, int half) {
    const int64_t groups = (k + 15) / 16;
    int32_t *atoms = malloc(sizeof(int32_t) * groups * 16), *starts = malloc(sizeof(int32_t) * (groups + 1));
    int64_t *length = malloc(sizeof(int64_t) * groups * 16);
    starts[0] = 0;
    for (int64_t g = 0; g < groups; g++) {
        int64_t longest = 0;
        for (int l = 0; l < 16; l++) {
            const int64_t lane = 16 * g + l;
            atoms[lane] = lane < k ? (int32_t)(k - 1 - lane) : -1;
            length[lane] = lane < k && lane % 5 ? (int64_t)((uniform() + 1.0f) * 6.0f) : 0;
            if (length[lane] > longest) longest = length[lane];
        }
        starts[g + 1] = starts[g] + (int32_t)longest;
    }
    const int64_t entries = (int64_t)starts[groups] * 16;
    float *values = calloc((size_t)entries + 1, sizeof(float)), *x = malloc(sizeof(float) * tokens * n);
    int32_t *index = calloc((size_t)entries + 1, sizeof(int32_t));
    float *basis = malloc(sizeof(float) * k * d), *bias = malloc(sizeof(float) * d), *y = malloc(sizeof(float) * tokens * d);
    for (int64_t g = 0; g < groups; g++)
        for (int l = 0; l < 16; l++)
            for (int64_t j = 0; j < length[16 * g + l]; j++) {
                const int64_t at = (starts[g] + j) * 16 + l;
                values[at] = uniform();
                index[at] = (int32_t)((uniform() + 1.0f) * 0.5f * (float)n) % (int32_t)n;
            }
    for (int64_t i = 0; i < tokens * n; i++) x[i] = uniform();
    for (int64_t i = 0; i < k * d; i++) basis[i] = uniform();
    for (int64_t i = 0; i < d; i++) bias[i] = uniform();
    void *stored = narrowed(index, entries, index_type);
    void *xh = maybe_half(x, tokens * n, half), *bh = maybe_half(basis, k * d, half);
    void *vh = maybe_half(values, entries, half), *yh = half ? malloc(sizeof(uint16_t) * tokens * d) : y;
    dsformer_decode_columns(xh, tokens, n, stored, index_type, vh, starts, atoms, groups, bh, k, d, bias, yh, half, 2);
    if (half) widen_outputs(y, yh, tokens * d, xh, bh, vh);
    double worst = 0.0, largest = 0.0;
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t c = 0; c < d; c++) {
            double want = bias[c];
            for (int64_t lane = 0; lane < k; lane++) {
                double u = 0.0;
                for (int64_t j = 0; j < length[lane]; j++) {
                    const int64_t at = (starts[lane / 16] + j) * 16 + lane % 16;
                    u += (double)values[at] * x[t * n + index[at]];
                }
                want += u * basis[atoms[lane] * d + c];
            }
            if (fabs(y[t * d + c] - want) > worst) worst = fabs(y[t * d + c] - want);
            if (fabs(want) > largest) largest = fabs(want);
        }
    if (stored != index) free(stored);
    free(atoms); free(starts); free(length); free(values); free(x); free(index); free(basis); free(bias); free(y);
    return report("decode columns", tokens, n, d, k, index_type, half, worst, largest);
}

int main(void) {
    const int64_t lengths[] = {1, 7, 8, 37, 64, 65, 200};
    int ok = 1;
    for (size_t i = 0; i < sizeof lengths / sizeof *lengths; i++)
        for (int flags = 0; flags < 8; flags++)
            ok &= check(1 + (flags & 1), 11, lengths[i], 9, flags & 1, (flags >> 1) & 1, (flags >> 2) & 1, (int)(i % 3));
    for (int index_type = 0; index_type < 3; index_type++)  /* uint8 indices need at most 256 atoms or inputs */
        for (int64_t tokens = 1; tokens <= 3; tokens += 2)
            for (int half = 0; half < 2; half++) {  /* float32, then bfloat16 factors; rows of odd length */
                ok &= check_decode_rows(tokens, 37, 41, index_type == 2 ? 200 : 300, 9, index_type, tokens == 3, half);
                ok &= check_decode_columns(tokens, index_type == 2 ? 200 : 300, 37, 35, index_type, half);
            }
    return ok ? 0 : 1;
}
