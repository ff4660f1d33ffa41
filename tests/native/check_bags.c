/* Checks a build of a weighted-bags kernel against a plain loop, with no Python or torch: for a CPU
 * family this machine cannot run, the kernel is cross-compiled with this file and run under an
 * emulator (tests/test_kernels.py: ARM64 under qemu-aarch64). Exits 0 when every case matches.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int dsformer_weighted_bags(const float *rows, int64_t sequences, int64_t rows_per_sequence, int64_t row_len,
                           const void *index, int index_type, const int32_t *offsets, int64_t bag_size,
                           const float *weights, const float *bias, int64_t bags, float *out, int token_major,
                           int gelu, int threads);

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

int main(void) {
    const int64_t lengths[] = {1, 7, 8, 37, 64, 65, 200};
    int ok = 1;
    for (size_t i = 0; i < sizeof lengths / sizeof *lengths; i++)
        for (int flags = 0; flags < 8; flags++)
            ok &= check(1 + (flags & 1), 11, lengths[i], 9, flags & 1, (flags >> 1) & 1, (flags >> 2) & 1, (int)(i % 3));
    return ok ? 0 : 1;
}
