/* The part of a weighted-bags kernel that does not depend on the vector ISA: the split of the bags
 * over OpenMP threads and the walk over sequences, bags and slices of each row. A kernel source
 * defines SLICE (floats per slice: what its accumulators hold) and bag_1 .. bag_8 (a bag over a
 * slice of 1 .. 8 vectors of LANES floats), then includes this file.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef void (*BagFn)(const float *, int64_t, const void *, const float *, int64_t, int64_t, float, float *,
                      int64_t, int64_t, int);
/* by index type (0: int32, 1: int16, 2: uint8; a DS layer stores the smallest its basis fits), then by
   vectors in the slice */
#define BAG_ROW(SUFFIX) {0, bag_1##SUFFIX, bag_2##SUFFIX, bag_3##SUFFIX, bag_4##SUFFIX, bag_5##SUFFIX, \
                         bag_6##SUFFIX, bag_7##SUFFIX, bag_8##SUFFIX}
static const BagFn BAGS[3][9] = {BAG_ROW(_i32), BAG_ROW(_i16), BAG_ROW(_u8)};

/* A bag of one-float rows (one token: a decode step): the sum runs along the bag, in eight independent
   partial sums, where the vector bags above would run one scalar multiply-add chain through one
   register (each add waiting for the last). The compiler vectorizes the eight lanes (gathers where the
   ISA has them). */
typedef float (*SingleFn)(const float *, const void *, const float *, int64_t, int64_t);
#define DEFINE_SINGLE(T, SUFFIX)                                                                     \
    static float single##SUFFIX(const float *rows, const void *index_, const float *weights, int64_t e0, \
                                int64_t e1) {                                                       \
        const T *index = (const T *)index_;                                                         \
        float part[8] = {0};                                                                        \
        int64_t e = e0;                                                                             \
        for (; e + 8 <= e1; e += 8)                                                                 \
            for (int j = 0; j < 8; j++) part[j] += weights[e + j] * rows[index[e + j]];             \
        for (; e < e1; e++) part[0] += weights[e] * rows[index[e]];                                 \
        return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7])); \
    }
DEFINE_SINGLE(int32_t, _i32) DEFINE_SINGLE(int16_t, _i16) DEFINE_SINGLE(uint8_t, _u8)
static const SingleFn SINGLES[3] = {single_i32, single_i16, single_u8};

/* The first bag of thread t's share: equal numbers of bags, or of entries when bag sizes vary
   (a column layer's atoms are used very unevenly). */
static int64_t split(const int32_t *offsets, int64_t bags, int t, int threads) {
    if (!offsets) return bags * t / threads;
    const int64_t target = (int64_t)offsets[bags] * t / threads;
    int64_t lo = 0, hi = bags;
    while (lo < hi) {  /* the first bag starting at or after target */
        const int64_t mid = (lo + hi) / 2;
        if (offsets[mid] < target) lo = mid + 1; else hi = mid;
    }
    return t == threads ? bags : lo;
}

int dsformer_weighted_bags(const float *rows, int64_t sequences, int64_t rows_per_sequence, int64_t row_len,
                           const void *index, int index_type, const int32_t *offsets, int64_t bag_size,
                           const float *weights, const float *bias, int64_t bags, float *out, int token_major,
                           int gelu, int threads) {
    if (index_type < 0 || index_type > 2) return 1;
    const BagFn *bag_of = BAGS[index_type];
    if (threads < 1) threads = 1;
    if (threads > bags) threads = (int)(bags > 0 ? bags : 1);
    const int64_t step = token_major ? bags : 1;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int t = 0; t < threads; t++) {
        const int64_t first = split(offsets, bags, t, threads), stop = split(offsets, bags, t + 1, threads);
        for (int64_t s = 0; s < sequences; s++) {
            const float *seq = rows + s * rows_per_sequence * row_len;
            float *seq_out = out + s * bags * row_len;
            if (row_len == 1 && !gelu) {  /* one token: out[b] either way round */
                for (int64_t b = first; b < stop; b++) {
                    const int64_t e0 = offsets ? offsets[b] : b * bag_size;
                    const int64_t e1 = offsets ? offsets[b + 1] : (b + 1) * bag_size;
                    seq_out[b] = (bias ? bias[b] : 0.0f) + SINGLES[index_type](seq, index, weights, e0, e1);
                }
                continue;
            }
            for (int64_t b = first; b < stop; b++) {
                const int64_t e0 = offsets ? offsets[b] : b * bag_size;
                const int64_t e1 = offsets ? offsets[b + 1] : (b + 1) * bag_size;
                const float start = bias ? bias[b] : 0.0f;
                for (int64_t l0 = 0; l0 < row_len; l0 += SLICE) {
                    const int64_t n = row_len - l0 < SLICE ? row_len - l0 : SLICE;
                    const float *r = seq + l0;
                    float *o = token_major ? seq_out + l0 * bags + b : seq_out + b * row_len + l0;
                    bag_of[(n + LANES - 1) / LANES](r, row_len, index, weights, e0, e1, start, o, step, n, gelu);
                }
            }
        }
    }
    return 0;
}

/* Decode: a dense-sparse layer for a few tokens, one token at a time, reading each factor once per token
 * (at a decode step the factors stream from memory and the layer is bound by their bytes). A variant
 * defines dot (a basis row times a token) and group_* (16 outputs over interleaved bags of m entries
 * each: entry j of output l at 16 j + l; padding entries have value 0 and index 0), add_rows, and their
 * bfloat16 forms (dot_h, group_h_*, add_rows_h: factors stored as bfloat16, sums in float). With half set,
 * x, basis, values and y are bfloat16 (uint16 bit patterns); the bias is float either way. */
typedef void (*GroupFn)(const float *, const void *, const float *, int64_t, const float *, int, int64_t, float *);
typedef void (*GroupHalfFn)(const float *, const void *, const uint16_t *, int64_t, const float *, int, float *);
static const GroupFn GROUPS[3] = {group_i32, group_i16, group_u8};
static const GroupHalfFn GROUPS_H[3] = {group_h_i32, group_h_i16, group_h_u8};
static const int64_t INDEX_BYTES[3] = {4, 2, 1};

static inline uint16_t narrow(float f) {  /* to bfloat16, rounding to nearest even as torch does */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);  /* NaN stays NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* a token's inputs as floats: x itself, or its bfloat16 values widened into scratch */
static const float *as_floats(const void *x, int64_t count, int half, float *scratch) {
    if (!half) return (const float *)x;
    for (int64_t i = 0; i < count; i++) scratch[i] = widen(((const uint16_t *)x)[i]);
    return scratch;
}

/* Row vectors: z = B x (k atoms of d), then output i = bias[i] + sum_j values[i, j] z[index[i, j]], GELU
   applied where asked; index and values (ceil(n / 16), s, 16) interleaved. Returns 2 out of memory. */
int dsformer_decode_rows(const void *x, int64_t tokens, const void *basis, int64_t k, int64_t d, const void *index,
                         int index_type, const void *values, int64_t n, int64_t s, const float *bias, int gelu,
                         void *y, int half, int threads) {
    if (index_type < 0 || index_type > 2) return 1;
    float *z = malloc((size_t)(tokens * (k + d)) * sizeof(float));  /* z, then the inputs as floats */
    if (!z) return 2;
    const float *xs = as_floats(x, tokens * d, half, z + tokens * k);
    const int64_t groups = (n + 15) / 16, width = INDEX_BYTES[index_type];
    #pragma omp parallel num_threads(threads < 1 ? 1 : threads)
    for (int64_t t = 0; t < tokens; t++) {
        #pragma omp for schedule(static)
        for (int64_t a = 0; a < k; a++)
            z[t * k + a] = half ? dot_h((const uint16_t *)basis + a * d, xs + t * d, d)
                                : dot((const float *)basis + a * d, xs + t * d, d);
        #pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; g++) {
            const int64_t count = n - 16 * g < 16 ? n - 16 * g : 16;
            const void *ig = (const char *)index + g * s * 16 * width;
            if (!half) {
                GROUPS[index_type](z + t * k, ig, (const float *)values + g * s * 16, s, bias ? bias + 16 * g : 0,
                                   gelu, count, (float *)y + t * n + 16 * g);
                continue;
            }
            float b16[16] = {0}, out[16];  /* the bias padded to the group, the outputs before rounding */
            if (bias)
                for (int64_t l = 0; l < count; l++) b16[l] = bias[16 * g + l];
            GROUPS_H[index_type](z + t * k, ig, (const uint16_t *)values + g * s * 16, s, b16, gelu, out);
            for (int64_t l = 0; l < count; l++) ((uint16_t *)y)[t * n + 16 * g + l] = narrow(out[l]);
        }
    }
    free(z);
    return 0;
}

/* Column vectors: u = C^T x, each atom's bag of the input entries that use it, then y = u B + bias. The atoms
   come in groups of 16 with interleaved bags padded to the group's longest (starts: each group's first
   entry / 16, then the end; atoms: the atom of each lane, -1 for none). u B: each thread adds up its share of
   B's rows (whole rows, read in order) into its own partial sum, then the partials are added. */
int dsformer_decode_columns(const void *x, int64_t tokens, int64_t n, const void *index, int index_type,
                            const void *values, const int32_t *starts, const int32_t *atoms, int64_t groups,
                            const void *basis, int64_t k, int64_t d, const float *bias, void *y, int half,
                            int threads) {
    if (index_type < 0 || index_type > 2) return 1;
    if (threads < 1) threads = 1;
    float *scratch = malloc((size_t)(tokens * (k + n) + threads * d) * sizeof(float));
    if (!scratch) return 2;
    float *u = scratch, *partials = scratch + tokens * k;
    const float *xs = as_floats(x, tokens * n, half, partials + threads * d);
    const int64_t width = INDEX_BYTES[index_type];
    #pragma omp parallel num_threads(threads)
    {
        const int me = omp_get_thread_num(), team = omp_get_num_threads();
        for (int64_t t = 0; t < tokens; t++) {
            #pragma omp for schedule(static)
            for (int64_t g = 0; g < groups; g++) {
                float part[16];
                const void *ig = (const char *)index + (int64_t)starts[g] * 16 * width;
                const int64_t m = starts[g + 1] - starts[g];
                if (half)
                    GROUPS_H[index_type](xs + t * n, ig, (const uint16_t *)values + (int64_t)starts[g] * 16, m, 0, 0, part);
                else
                    GROUPS[index_type](xs + t * n, ig, (const float *)values + (int64_t)starts[g] * 16, m, 0, 0, 16, part);
                for (int l = 0; l < 16; l++)
                    if (atoms[16 * g + l] >= 0) u[t * k + atoms[16 * g + l]] = part[l];
            }  /* the implied barrier: u is whole */
            const int64_t a0 = k * me / team, a1 = k * (me + 1) / team;
            float *mine = partials + (int64_t)me * d;
            memset(mine, 0, (size_t)d * sizeof(float));
            if (half)
                add_rows_h(mine, (const uint16_t *)basis + a0 * d, u + t * k + a0, a1 - a0, d);
            else
                add_rows(mine, (const float *)basis + a0 * d, u + t * k + a0, a1 - a0, d);
            #pragma omp barrier
            #pragma omp for schedule(static)
            for (int64_t c = 0; c < d; c++) {
                float sum = bias ? bias[c] : 0.0f;
                for (int p = 0; p < team; p++) sum += partials[(int64_t)p * d + c];
                if (half) ((uint16_t *)y)[t * d + c] = narrow(sum);
                else ((float *)y)[t * d + c] = sum;
            }
        }
    }
    free(scratch);
    return 0;
}

/* Write back and drop [p, p + bytes) from every cache level, so the next read comes from memory (timing a
   decode step, where a model larger than the cache streams its weights). Split over the threads, which
   leaves them awake as a model's previous operation would. Returns 1 where it cannot. */
int dsformer_evict(const void *p, int64_t bytes, int threads) {
#if defined(__x86_64__) || defined(__aarch64__)
    const int64_t lines = (bytes + 63) / 64;
    #pragma omp parallel for schedule(static) num_threads(threads < 1 ? 1 : threads)
    for (int64_t i = 0; i < lines; i++) {
#if defined(__x86_64__)
        __builtin_ia32_clflush((const char *)p + 64 * i);
#else
        __asm__ volatile("dc civac, %0" : : "r"((const char *)p + 64 * i) : "memory");
#endif
    }
#if defined(__x86_64__)
    __builtin_ia32_mfence();
#else
    __asm__ volatile("dsb sy" : : : "memory");
#endif
    return 0;
#else
    (void)p; (void)bytes; (void)threads;
    return 1;
#endif
}
