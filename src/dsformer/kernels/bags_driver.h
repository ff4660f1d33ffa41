/* The part of a weighted-bags kernel that does not depend on the vector ISA: the split of the bags
 * over OpenMP threads and the walk over sequences, bags and slices of each row. A kernel source
 * defines SLICE (floats per slice: what its accumulators hold) and bag_1 .. bag_8 (a bag over a
 * slice of 1 .. 8 vectors of LANES floats), then includes this file.
 */
#include <stdint.h>

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
