/* Weighted bags of rows, the sparse stage of a dense-sparse product (dsformer.kernels.native).
 *
 *   out[s, b, :] = bias[b] + sum over e in bag b of weights[e] * rows[s, index[e], :]
 *
 * Bag b is [offsets[b], offsets[b + 1]), or [b * bag_size, (b + 1) * bag_size) when offsets is NULL;
 * bias may be NULL; with gelu set, GELU is applied to each output before it is stored. With
 * token_major set, out is laid out (s, :, b) instead: each bag's values go down a column, which
 * spares the caller a transposing copy (the stores are 1/bag-size of the work).
 * Each output row is accumulated in AVX-512 registers over its whole bag, up to 128 floats at a
 * time, and stored once: the inner loop is one load and one multiply-add per 16 floats, where an
 * embedding-bag that adds into its output in memory also loads and stores the output every time.
 * Bags are split over OpenMP threads (torch's own OpenMP runtime, loaded first by the process).
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline __mmask16 tail_mask(int64_t n) {
    return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
}

/* GELU with the exact erf form, 0.5 x (1 + erf(x / sqrt 2)), on 16 floats: erf by Abramowitz and
   Stegun 7.1.26 (absolute error below 1.5e-7), its exp by a degree-6 polynomial scaled with vscalefps. */
static inline __m512 exp_neg16(__m512 z) {  /* exp(-z) for z >= 0 */
    const __m512 x = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_min_ps(z, _mm512_set1_ps(100.0f)));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 gelu16(__m512 x) {
    const __m512 u = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
    const __m512 a = _mm512_abs_ps(u);
    const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(a, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f)));
    __m512 q = _mm512_set1_ps(1.061405429f);
    q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(-1.453152027f));
    q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(1.421413741f));
    q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(-0.284496736f));
    q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(0.254829592f));
    q = _mm512_mul_ps(q, t);
    const __m512 erf_abs = _mm512_fnmadd_ps(q, exp_neg16(_mm512_mul_ps(a, a)), _mm512_set1_ps(1.0f));
    /* erf(u) = sign(u) erf(|u|); 1 + erf(u) for u < 0 is 1 - erf_abs */
    const __mmask16 negative = _mm512_cmp_ps_mask(u, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 one_plus = _mm512_mask_sub_ps(_mm512_add_ps(_mm512_set1_ps(1.0f), erf_abs), negative,
                                               _mm512_set1_ps(1.0f), erf_abs);
    return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), one_plus);
}

/* test hook: out[i] = gelu(in[i]) */
void dsformer_gelu(const float *in, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = tail_mask(n - i);
        _mm512_mask_storeu_ps(out + i, m, gelu16(_mm512_maskz_loadu_ps(m, in + i)));
    }
}

/* bag_NV: one bag over one slice of NV vectors (n floats, 16 * (NV - 1) < n <= 16 * NV), written at
   out[0], out[out_step], ... Eight named accumulators rather than an array, so they stay in
   registers; those at or past NV are dead code the compiler drops. */
#define ALL8(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define MASK_OF(v) ((v) < nv - 1 ? full : last)
#define ACC_INIT(v) __m512 a##v = _mm512_set1_ps(start);
#define ACC_STEP(v) if ((v) < nv) a##v = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(MASK_OF(v), r + 16 * (v)), a##v);
#define ACC_GELU(v) if ((v) < nv) a##v = gelu16(a##v);
#define ACC_STORE(v) if ((v) < nv) _mm512_mask_storeu_ps(out + 16 * (v), MASK_OF(v), a##v);
#define ACC_SCATTER(v) if ((v) < nv) _mm512_mask_i32scatter_ps(out + 16 * (v) * out_step, MASK_OF(v), down, a##v, 4);

#define DEFINE_BAG(NV, T, SUFFIX)                                                                   \
    static void bag_##NV##SUFFIX(const float *rows, int64_t row_len, const void *index_, const float *weights, \
                                 int64_t e0, int64_t e1, float start, float *out, int64_t out_step,     \
                                 int64_t n, int gelu) {                                             \
        enum { nv = NV }; /* a constant: the tests on it fold away */                               \
        const T *index = (const T *)index_;                                                         \
        const __mmask16 full = 0xFFFF, last = tail_mask(n - 16 * (nv - 1));                         \
        ALL8(ACC_INIT)                                                                              \
        for (int64_t e = e0; e < e1; e++) {                                                         \
            const float *r = rows + (int64_t)index[e] * row_len;                                    \
            const __m512 w = _mm512_set1_ps(weights[e]);                                            \
            ALL8(ACC_STEP)                                                                          \
        }                                                                                           \
        if (gelu) { ALL8(ACC_GELU) }                                                                \
        if (out_step == 1) {                                                                        \
            ALL8(ACC_STORE)                                                                         \
        } else { /* token-major output: the bag's values go down a column */                       \
            const __m512i down = _mm512_mullo_epi32(                                                \
                _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),             \
                _mm512_set1_epi32((int)out_step));                                                  \
            ALL8(ACC_SCATTER)                                                                       \
        }                                                                                           \
    }

#define DEFINE_BAGS(T, SUFFIX) DEFINE_BAG(1, T, SUFFIX) DEFINE_BAG(2, T, SUFFIX) DEFINE_BAG(3, T, SUFFIX) \
    DEFINE_BAG(4, T, SUFFIX) DEFINE_BAG(5, T, SUFFIX) DEFINE_BAG(6, T, SUFFIX) DEFINE_BAG(7, T, SUFFIX) \
    DEFINE_BAG(8, T, SUFFIX)
DEFINE_BAGS(int32_t, _i32) DEFINE_BAGS(int16_t, _i16) DEFINE_BAGS(uint8_t, _u8)

/* Decode pieces (the driver's dsformer_decode_*): a dot product of a basis row with a token, and a group
   of 16 outputs whose bags all hold m entries, stored interleaved (entry j of output l at 16 j + l), so
   each step is one vector load of indices and of values and one gather of what they name. Both prefetch
   AHEAD vectors ahead (2 KB of values): at a decode step the factors come from memory, and the
   prefetches keep more of it in flight than the hardware's own (measured: 1.33x -> 1.6x against the
   dense product with every factor in DRAM). */
enum { AHEAD = 32 };
static inline float dot(const float *a, const float *x, int64_t d) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= d; i += 32) {
        _mm_prefetch((const char *)(a + i + 16 * AHEAD), _MM_HINT_T0);
        _mm_prefetch((const char *)(a + i + 16 * AHEAD + 16), _MM_HINT_T0);
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(x + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(x + i + 16), s1);
    }
    for (; i < d; i += 16) {
        const __mmask16 m = tail_mask(d - i);
        s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, x + i), s0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

#define WIDEN_i32(p) _mm512_loadu_si512((const void *)(p))
#define WIDEN_i16(p) _mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i *)(p)))
#define WIDEN_u8(p) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define DEFINE_GROUP(T, SUFFIX)                                                                     \
    static void group##SUFFIX(const float *src, const void *index_, const float *values, int64_t m,     \
                              const float *bias, int gelu, int64_t count, float *out) {             \
        const T *index = (const T *)index_;                                                         \
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();                                  \
        int64_t j = 0;                                                                              \
        for (; j + 2 <= m; j += 2) {                                                                \
            _mm_prefetch((const char *)(values + 16 * (j + AHEAD)), _MM_HINT_T0);                   \
            _mm_prefetch((const char *)(values + 16 * (j + AHEAD) + 16), _MM_HINT_T0);              \
            _mm_prefetch((const char *)(index + 16 * (j + AHEAD)), _MM_HINT_T0);                    \
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(values + 16 * j),                                  \
                                 _mm512_i32gather_ps(WIDEN##SUFFIX(index + 16 * j), src, 4), a0);   \
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(values + 16 * j + 16),                             \
                                 _mm512_i32gather_ps(WIDEN##SUFFIX(index + 16 * j + 16), src, 4), a1); \
        }                                                                                           \
        if (j < m)                                                                                  \
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(values + 16 * j),                                  \
                                 _mm512_i32gather_ps(WIDEN##SUFFIX(index + 16 * j), src, 4), a0);   \
        const __mmask16 keep = tail_mask(count);                                                    \
        __m512 acc = _mm512_add_ps(a0, a1);                                                         \
        if (bias) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(keep, bias));                      \
        if (gelu) acc = gelu16(acc);                                                                \
        _mm512_mask_storeu_ps(out, keep, acc);                                                      \
    }
DEFINE_GROUP(int32_t, _i32) DEFINE_GROUP(int16_t, _i16) DEFINE_GROUP(uint8_t, _u8)

/* The same three for bfloat16 factors (basis, values: uint16 bit patterns), widened to float in registers;
   sums in float. Tails past the last full vector run scalar (no masked 16-bit loads in AVX-512F). */
static inline float widen(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
#define LOAD_H(p) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))

static inline float dot_h(const uint16_t *a, const float *x, int64_t d) {
    __m512 s0 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= d; i += 16) {
        _mm_prefetch((const char *)(a + i + 32 * AHEAD), _MM_HINT_T0);
        s0 = _mm512_fmadd_ps(LOAD_H(a + i), _mm512_loadu_ps(x + i), s0);
    }
    float total = _mm512_reduce_add_ps(s0);
    for (; i < d; i++) total += widen(a[i]) * x[i];
    return total;
}

#define DEFINE_GROUP_H(T, SUFFIX)                                                                   \
    static void group_h##SUFFIX(const float *src, const void *index_, const uint16_t *values, int64_t m, \
                                const float *bias, int gelu, float *out) {                          \
        const T *index = (const T *)index_;                                                         \
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();                                  \
        int64_t j = 0;                                                                              \
        for (; j + 2 <= m; j += 2) {                                                                \
            _mm_prefetch((const char *)(values + 16 * (j + AHEAD)), _MM_HINT_T0);                   \
            _mm_prefetch((const char *)(index + 16 * (j + AHEAD)), _MM_HINT_T0);                    \
            a0 = _mm512_fmadd_ps(LOAD_H(values + 16 * j), _mm512_i32gather_ps(WIDEN##SUFFIX(index + 16 * j), src, 4), a0); \
            a1 = _mm512_fmadd_ps(LOAD_H(values + 16 * j + 16),                                      \
                                 _mm512_i32gather_ps(WIDEN##SUFFIX(index + 16 * j + 16), src, 4), a1); \
        }                                                                                           \
        if (j < m)                                                                                  \
            a0 = _mm512_fmadd_ps(LOAD_H(values + 16 * j), _mm512_i32gather_ps(WIDEN##SUFFIX(index + 16 * j), src, 4), a0); \
        __m512 acc = _mm512_add_ps(a0, a1);                                                         \
        if (bias) acc = _mm512_add_ps(acc, _mm512_loadu_ps(bias));                                  \
        if (gelu) acc = gelu16(acc);                                                                \
        _mm512_storeu_ps(out, acc);                                                                 \
    }
DEFINE_GROUP_H(int32_t, _i32) DEFINE_GROUP_H(int16_t, _i16) DEFINE_GROUP_H(uint8_t, _u8)

static void add_rows_h(float *acc, const uint16_t *rows, const float *w, int64_t count, int64_t d) {
    for (int64_t a = 0; a < count; a++) {
        const uint16_t *r = rows + a * d;
        const __m512 wa = _mm512_set1_ps(w[a]);
        int64_t i = 0;
        for (; i + 16 <= d; i += 16) {
            _mm_prefetch((const char *)(r + i + 32 * AHEAD), _MM_HINT_T0);
            _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(wa, LOAD_H(r + i), _mm512_loadu_ps(acc + i)));
        }
        for (; i < d; i++) acc[i] += w[a] * widen(r[i]);
    }
}

/* acc (d floats) += sum over the rows a of w[a] * rows[a] (count rows of d), two rows a pass */
static void add_rows(float *acc, const float *rows, const float *w, int64_t count, int64_t d) {
    int64_t a = 0;
    for (; a + 2 <= count; a += 2) {
        const float *r0 = rows + a * d, *r1 = r0 + d;
        const __m512 w0 = _mm512_set1_ps(w[a]), w1 = _mm512_set1_ps(w[a + 1]);
        for (int64_t i = 0; i < d; i += 16) {
            const __mmask16 m = tail_mask(d - i);
            _mm_prefetch((const char *)(r0 + i + 16 * AHEAD), _MM_HINT_T0);
            _mm_prefetch((const char *)(r1 + i + 16 * AHEAD), _MM_HINT_T0);
            __m512 v = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m, r0 + i), _mm512_maskz_loadu_ps(m, acc + i));
            _mm512_mask_storeu_ps(acc + i, m, _mm512_fmadd_ps(w1, _mm512_maskz_loadu_ps(m, r1 + i), v));
        }
    }
    if (a < count) {
        const __m512 w0 = _mm512_set1_ps(w[a]);
        for (int64_t i = 0; i < d; i += 16) {
            const __mmask16 m = tail_mask(d - i);
            _mm512_mask_storeu_ps(acc + i, m, _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m, rows + a * d + i),
                                                               _mm512_maskz_loadu_ps(m, acc + i)));
        }
    }
}

enum { LANES = 16, SLICE = 128 };
#include "bags_driver.h"
