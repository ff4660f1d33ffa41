/* Weighted bags of rows (see bags.c for the operation) written with the C compiler's vector
 * extensions instead of one ISA's intrinsics: 8-float vectors, which the compiler maps to AVX2 + FMA
 * registers with -mavx2 -mfma and to pairs of NEON registers on ARM64. The method is bags.c's:
 * each output slice stays in up to 8 accumulators over its whole bag and is stored once. A slice is
 * 64 floats here (8 vectors of 8: AVX2 has 16 registers where AVX-512 has 32).
 */
#include <stdint.h>
#include <string.h>

enum { LANES = 8, SLICE = 64 };
typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));

/* n floats from p (n <= LANES in the last vector of a slice), the rest zero; memcpy of a constant
   size compiles to one unaligned vector load or store */
static inline vf load_n(const float *p, int64_t n) {
    vf x = {0};
    if (n >= LANES) memcpy(&x, p, sizeof x); else memcpy(&x, p, (size_t)n * sizeof(float));
    return x;
}

static inline void store_n(float *p, vf x, int64_t n) {
    if (n >= LANES) memcpy(p, &x, sizeof x); else memcpy(p, &x, (size_t)n * sizeof(float));
}

static inline vf splat(float v) { return (vf){0} + v; }

static inline vf blend(vi mask, vf yes, vf no) { return (vf)(((vi)yes & mask) | ((vi)no & ~mask)); }

/* GELU, erf form, as bags.c computes it: erf by Abramowitz and Stegun 7.1.26, exp(-z) by a degree-6
   polynomial on the reduced argument, scaled by 2^n built in the exponent bits (z is clamped at 87,
   where exp(-z) is already below float's smallest normal number times 2^1). */
static inline vf exp_neg(vf z) {
    const vf x = -(blend(z < 87.0f, z, splat(87.0f)));
    const vi n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, vi);  /* round to nearest: x <= 0 */
    const vf nf = __builtin_convertvector(n, vf);
    vf r = x - nf * 0.693359375f;
    r = r - nf * -2.12194440e-4f;
    vf p = splat(1.0f / 720);
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * (vf)((n + 127) << 23);
}

static inline vf gelu_v(vf x) {
    const vf u = x * 0.70710678118654752f;
    const vf a = (vf)((vi)u & 0x7fffffff);
    const vf t = 1.0f / (a * 0.3275911f + 1.0f);
    vf q = splat(1.061405429f);
    q = q * t - 1.453152027f;
    q = q * t + 1.421413741f;
    q = q * t - 0.284496736f;
    q = q * t + 0.254829592f;
    q = q * t;
    const vf erf_abs = 1.0f - q * exp_neg(a * a);
    return x * 0.5f * blend(u < 0.0f, 1.0f - erf_abs, 1.0f + erf_abs);
}

/* test hook: out[i] = gelu(in[i]) */
void dsformer_gelu(const float *in, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i += LANES) store_n(out + i, gelu_v(load_n(in + i, n - i)), n - i);
}

/* bag_NV: one bag over one slice of NV vectors (n floats, LANES * (NV - 1) < n <= LANES * NV), written
   at out[0], out[out_step], ... Eight named accumulators rather than an array, so they stay in
   registers; those at or past NV are dead code the compiler drops. */
#define ALL8(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define WIDTH(v) ((v) < nv - 1 ? LANES : n - LANES * (v))
#define ACC_INIT(v) vf a##v = splat(start);
#define ACC_STEP(v) if ((v) < nv) a##v += w * ((v) < nv - 1 ? load_n(r + LANES * (v), LANES) : load_n(r + LANES * (v), last));
#define ACC_GELU(v) if ((v) < nv) a##v = gelu_v(a##v);
#define ACC_STORE(v) if ((v) < nv) store_n(out + LANES * (v), a##v, WIDTH(v));
#define ACC_SCATTER(v)                                                                              \
    if ((v) < nv) {                                                                                 \
        for (int64_t i = 0; i < WIDTH(v); i++) out[(LANES * (v) + i) * out_step] = a##v[i];         \
    }

#define DEFINE_BAG(NV, T, SUFFIX)                                                                   \
    static void bag_##NV##SUFFIX(const float *rows, int64_t row_len, const void *index_, const float *weights, \
                                 int64_t e0, int64_t e1, float start, float *out, int64_t out_step,     \
                                 int64_t n, int gelu) {                                             \
        enum { nv = NV }; /* a constant: the tests on it fold away */                               \
        const T *index = (const T *)index_;                                                         \
        const int64_t last = n - LANES * (nv - 1);                                                  \
        ALL8(ACC_INIT)                                                                              \
        for (int64_t e = e0; e < e1; e++) {                                                         \
            const float *r = rows + (int64_t)index[e] * row_len;                                    \
            const vf w = splat(weights[e]);                                                         \
            ALL8(ACC_STEP)                                                                          \
        }                                                                                           \
        if (gelu) { ALL8(ACC_GELU) }                                                                \
        if (out_step == 1) {                                                                        \
            ALL8(ACC_STORE)                                                                         \
        } else { /* token-major output: the bag's values go down a column */                       \
            ALL8(ACC_SCATTER)                                                                       \
        }                                                                                           \
    }

#define DEFINE_BAGS(T, SUFFIX) DEFINE_BAG(1, T, SUFFIX) DEFINE_BAG(2, T, SUFFIX) DEFINE_BAG(3, T, SUFFIX) \
    DEFINE_BAG(4, T, SUFFIX) DEFINE_BAG(5, T, SUFFIX) DEFINE_BAG(6, T, SUFFIX) DEFINE_BAG(7, T, SUFFIX) \
    DEFINE_BAG(8, T, SUFFIX)
DEFINE_BAGS(int32_t, _i32) DEFINE_BAGS(int16_t, _i16) DEFINE_BAGS(uint8_t, _u8)

/* Decode pieces (see bags.c): a dot product, and a group of 16 outputs over interleaved entries; the
   gathers are plain loads, which the compiler turns into gathers where the ISA has them; prefetches as
   there. */
enum { AHEAD = 32 };
static inline float dot(const float *a, const float *x, int64_t d) {
    vf s0 = {0}, s1 = {0};
    int64_t i = 0;
    for (; i + 2 * LANES <= d; i += 2 * LANES) {
        __builtin_prefetch(a + i + 16 * AHEAD);
        s0 += load_n(a + i, LANES) * load_n(x + i, LANES);
        s1 += load_n(a + i + LANES, LANES) * load_n(x + i + LANES, LANES);
    }
    for (; i < d; i += LANES) s0 += load_n(a + i, d - i) * load_n(x + i, d - i);
    s0 += s1;
    float total = 0.0f;
    for (int l = 0; l < LANES; l++) total += s0[l];
    return total;
}

#define DEFINE_GROUP(T, SUFFIX)                                                                     \
    static void group##SUFFIX(const float *src, const void *index_, const float *values, int64_t m,     \
                              const float *bias, int gelu, int64_t count, float *out) {             \
        const T *index = (const T *)index_;                                                         \
        vf lo = {0}, hi = {0};                                                                      \
        for (int64_t j = 0; j < m; j++) {                                                           \
            const T *i = index + 16 * j;                                                            \
            __builtin_prefetch(values + 16 * (j + AHEAD));                                          \
            __builtin_prefetch(values + 16 * (j + AHEAD) + 8);                                      \
            __builtin_prefetch(i + 16 * AHEAD);                                                     \
            vf g0, g1;                                                                              \
            for (int l = 0; l < LANES; l++) { g0[l] = src[i[l]]; g1[l] = src[i[LANES + l]]; }       \
            lo += load_n(values + 16 * j, LANES) * g0;                                              \
            hi += load_n(values + 16 * j + LANES, LANES) * g1;                                      \
        }                                                                                           \
        if (bias) { lo += load_n(bias, count); if (count > LANES) hi += load_n(bias + LANES, count - LANES); } \
        if (gelu) { lo = gelu_v(lo); hi = gelu_v(hi); }                                             \
        store_n(out, lo, count < LANES ? count : LANES);                                            \
        if (count > LANES) store_n(out + LANES, hi, count - LANES);                                 \
    }
DEFINE_GROUP(int32_t, _i32) DEFINE_GROUP(int16_t, _i16) DEFINE_GROUP(uint8_t, _u8)

/* The same three for bfloat16 factors (uint16 bit patterns), widened to float; sums in float. */
typedef uint16_t vh __attribute__((vector_size(2 * LANES)));
typedef uint32_t vu __attribute__((vector_size(4 * LANES)));

static inline vf load_h(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
}

static inline float widen(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float dot_h(const uint16_t *a, const float *x, int64_t d) {
    vf s0 = {0};
    int64_t i = 0;
    for (; i + LANES <= d; i += LANES) {
        __builtin_prefetch(a + i + 32 * AHEAD);
        s0 += load_h(a + i) * load_n(x + i, LANES);
    }
    float total = 0.0f;
    for (int l = 0; l < LANES; l++) total += s0[l];
    for (; i < d; i++) total += widen(a[i]) * x[i];
    return total;
}

#define DEFINE_GROUP_H(T, SUFFIX)                                                                   \
    static void group_h##SUFFIX(const float *src, const void *index_, const uint16_t *values, int64_t m, \
                                const float *bias, int gelu, float *out) {                          \
        const T *index = (const T *)index_;                                                         \
        vf lo = {0}, hi = {0};                                                                      \
        for (int64_t j = 0; j < m; j++) {                                                           \
            const T *i = index + 16 * j;                                                            \
            __builtin_prefetch(values + 16 * (j + AHEAD));                                          \
            __builtin_prefetch(i + 16 * AHEAD);                                                     \
            vf g0, g1;                                                                              \
            for (int l = 0; l < LANES; l++) { g0[l] = src[i[l]]; g1[l] = src[i[LANES + l]]; }       \
            lo += load_h(values + 16 * j) * g0;                                                     \
            hi += load_h(values + 16 * j + LANES) * g1;                                             \
        }                                                                                           \
        if (bias) { lo += load_n(bias, LANES); hi += load_n(bias + LANES, LANES); }                 \
        if (gelu) { lo = gelu_v(lo); hi = gelu_v(hi); }                                             \
        store_n(out, lo, LANES);                                                                    \
        store_n(out + LANES, hi, LANES);                                                            \
    }
DEFINE_GROUP_H(int32_t, _i32) DEFINE_GROUP_H(int16_t, _i16) DEFINE_GROUP_H(uint8_t, _u8)

static void add_rows_h(float *acc, const uint16_t *rows, const float *w, int64_t count, int64_t d) {
    for (int64_t a = 0; a < count; a++) {
        const uint16_t *r = rows + a * d;
        int64_t i = 0;
        for (; i + LANES <= d; i += LANES) {
            __builtin_prefetch(r + i + 32 * AHEAD);
            store_n(acc + i, load_n(acc + i, LANES) + w[a] * load_h(r + i), LANES);
        }
        for (; i < d; i++) acc[i] += w[a] * widen(r[i]);
    }
}

/* acc (d floats) += sum over the rows a of w[a] * rows[a] (count rows of d) */
static void add_rows(float *acc, const float *rows, const float *w, int64_t count, int64_t d) {
    for (int64_t a = 0; a < count; a++) {
        const float *r = rows + a * d;
        for (int64_t i = 0; i < d; i += LANES) {
            __builtin_prefetch(r + i + 16 * AHEAD);
            store_n(acc + i, load_n(acc + i, d - i) + w[a] * load_n(r + i, d - i), d - i);
        }
    }
}

#include "bags_driver.h"
