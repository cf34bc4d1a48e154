/* quantkit's one native kernel: the statistics a calibration pass takes of every activation.
 *
 * NumPy needs five passes over a tensor for its abs-max and |x| histogram (min, max, abs,
 * scale, bincount on a 64-bit index copy); these loops take one (min, max and the binning
 * together; a second only when the range must grow), keep nothing but the counts, and fold an
 * equalization's per-channel factor into the same read.
 * Loaded with ctypes (quantkit/calibrators/native.py), so it has no Python ABI: a plain shared
 * library, built at install time where a C compiler is found; without it quantkit uses NumPy.
 *
 * Every function reads a float32 tensor viewed as [outer, channels, inner] (C order); the
 * statistics multiply each value by scale[c] first when scale is not NULL (in float32, as
 * NumPy's x * s).
 * Results are bit-identical to quantkit's NumPy code for the same values.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SSE2__) || defined(_M_X64)
#include <emmintrin.h>
#define QK_SSE 1
#endif

#define LANES 8

/* The tensor as runs of contiguous values, each with one factor: [outer, channels] runs of inner
 * values (scale[r % channels]); or, channel last (inner 1) with factors, [outer] runs of
 * channels values, a factor each (per_value). */
typedef struct {
    int per_value;
    int64_t runs, run;
} qk_runs;

static qk_runs qk_runs_of(int64_t outer, int64_t channels, int64_t inner, const float *scale)
{
    qk_runs rs;
    rs.per_value = scale && inner == 1;
    rs.runs = rs.per_value ? outer : outer * channels;
    rs.run = rs.per_value ? channels : inner;
    return rs;
}

/* run r's factors: NULL (none), one (sc[0]) or, per_value, one a value (sc[i]) */
static inline const float *qk_run_scale(const float *scale, qk_runs rs, int64_t r, int64_t channels)
{
    return !scale ? NULL : rs.per_value ? scale : scale + r % channels;
}

/* value i's factor in a run whose factors are sc */
static inline float qk_factor(const float *sc, int per_value, int64_t i)
{
    return !sc ? 1.0f : per_value ? sc[i] : sc[0];
}

/* a value's bin: floor(|v| * per_unit), clamped to the top one (a NaN's or a huge value's
 * conversion, negative, too: the caller drops those counts) */
static inline int64_t qk_bin(float v, float per_unit, int64_t top)
{
    int64_t b = (int64_t)(fabsf(v) * per_unit);
    return b > top || b < 0 ? top : b;
}

/* The i-th value of a run read as every kernel reads it: p[i] times its factor, folded into the
 * running min, max and NaN flag (minps/maxps's rule: a NaN leaves lo and hi as they were). */
static inline float qk_read1(const float *p, int64_t i, const float *sc, int per_value, float *lo, float *hi,
                             int *nan)
{
    float v = p[i] * qk_factor(sc, per_value, i);
    *lo = v < *lo ? v : *lo;
    *hi = v > *hi ? v : *hi;
    *nan |= v != v;
    return v;
}

#ifdef QK_SSE
/* lo and hi folded with the four lanes of l and h */
static inline void qk_fold4(__m128 l, __m128 h, float *lo, float *hi)
{
    float lv[4], hv[4];
    _mm_storeu_ps(lv, l);
    _mm_storeu_ps(hv, h);
    for (int k = 0; k < 4; k++) {
        *lo = lv[k] < *lo ? lv[k] : *lo;
        *hi = hv[k] > *hi ? hv[k] : *hi;
    }
}

/* qk_bin of four magnitudes (sign bits already cleared) */
static inline __m128i qk_bins4(__m128 magnitudes, __m128 unit, __m128i last)
{
    __m128i q = _mm_cvttps_epi32(_mm_mul_ps(magnitudes, unit));
    __m128i over = _mm_or_si128(_mm_cmpgt_epi32(q, last), _mm_cmplt_epi32(q, _mm_setzero_si128()));
    return _mm_or_si128(_mm_and_si128(over, last), _mm_andnot_si128(over, q));
}

/* Four values p[i..i+4) read as qk_read1 reads one (s: sc[0] in every lane, for a per-run
 * factor), folded into the running min, max and NaN lanes. */
static inline __m128 qk_read4(const float *p, int64_t i, const float *sc, int per_value, __m128 s, __m128 *l,
                              __m128 *h, __m128 *bad)
{
    __m128 v = _mm_loadu_ps(p + i);
    if (sc)
        v = _mm_mul_ps(v, per_value ? _mm_loadu_ps(sc + i) : s);
    *l = _mm_min_ps(v, *l);
    *h = _mm_max_ps(v, *h);
    *bad = _mm_or_ps(*bad, _mm_cmpunord_ps(v, v));
    return v;
}
#endif

/* min, max of p[0..n) times s (sc_step 0: sc[0]; 1: sc[i]; sc NULL: 1) into lo/hi; returns
 * nonzero when a value is NaN (left out of lo and hi) */
static int qk_minmax_run(const float *p, int64_t n, const float *sc, int sc_step, float *lo_, float *hi_)
{
    float lo = *lo_, hi = *hi_;
    int nan = 0;
    int64_t i = 0;
#ifdef QK_SSE
    __m128 l0 = _mm_set1_ps(lo), l1 = l0, h0 = _mm_set1_ps(hi), h1 = h0;
    __m128 bad = _mm_setzero_ps();
    const __m128 s = _mm_set1_ps(sc ? sc[0] : 1.0f);
    for (; i + 8 <= n; i += 8) {  /* two sets of lanes: independent chains */
        qk_read4(p, i, sc, sc_step, s, &l0, &h0, &bad);
        qk_read4(p, i + 4, sc, sc_step, s, &l1, &h1, &bad);
    }
    qk_fold4(_mm_min_ps(l0, l1), _mm_max_ps(h0, h1), &lo, &hi);
    nan = _mm_movemask_ps(bad) != 0;
#endif
    for (; i < n; i++)
        qk_read1(p, i, sc, sc_step, &lo, &hi, &nan);
    *lo_ = lo;
    *hi_ = hi;
    return nan;
}

/* out[0] = min, out[1] = max of the (scaled) values; returns 1 when a value is NaN (NaNs are
 * left out of min and max), else 0. */
int64_t qk_minmax(const float *x, int64_t outer, int64_t channels, int64_t inner, const float *scale,
                  float *out)
{
    const qk_runs rs = qk_runs_of(outer, channels, inner, scale);
    float lo = INFINITY, hi = -INFINITY;
    int nan = 0;
    for (int64_t r = 0; r < rs.runs; r++)
        nan |= qk_minmax_run(x + r * rs.run, rs.run, qk_run_scale(scale, rs, r, channels), rs.per_value, &lo, &hi);
    out[0] = lo;
    out[1] = hi;
    return nan;
}

/* qk_minmax_run's min, max and NaN flag of a run of n values (multiplied by sc[0] when sc_step
 * is 0, by sc[i] when it is 1, not at all when sc is NULL), and their bins in the four
 * sub-histograms. */
static int qk_bin_run(const float *p, int64_t n, const float *sc, int sc_step, float per_unit, int64_t top,
                      uint32_t *h0, uint32_t *h1, uint32_t *h2, uint32_t *h3, float *lo_, float *hi_)
{
    float lo = *lo_, hi = *hi_;
    int nan = 0;
    int64_t i = 0;
#ifdef QK_SSE
    /* four bins at a time */
    const __m128 unit = _mm_set1_ps(per_unit);
    const __m128 mag = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
    const __m128i last = _mm_set1_epi32((int)top);
    const __m128 s = _mm_set1_ps(sc ? sc[0] : 1.0f);
    __m128 l = _mm_set1_ps(lo), h = _mm_set1_ps(hi), bad = _mm_setzero_ps();
    int32_t b[4];
    for (; i + 4 <= n; i += 4) {
        __m128 v = qk_read4(p, i, sc, sc_step, s, &l, &h, &bad);
        _mm_storeu_si128((__m128i *)b, qk_bins4(_mm_and_ps(v, mag), unit, last));
        h0[b[0]]++;
        h1[b[1]]++;
        h2[b[2]]++;
        h3[b[3]]++;
    }
    qk_fold4(l, h, &lo, &hi);
    nan = _mm_movemask_ps(bad) != 0;
#endif
    for (; i < n; i++)
        h0[qk_bin(qk_read1(p, i, sc, sc_step, &lo, &hi, &nan), per_unit, top)]++;
    *lo_ = lo;
    *hi_ = hi;
    return nan;
}

/* One pass: out[0] = min, out[1] = max of the (scaled) values, and, when no value is NaN and
 * max |v| <= range, counts[b] += the number of values with floor(|v| * per_unit) == b (a value
 * at or past the top, |v| == range or a rounding above it, in the last bin, as quantkit's NumPy
 * binning does). Returns 1 when it added the counts; 0 when a value is past the range (grow the
 * range and call again), 2 when one is NaN (no counts added either); -1 when its scratch counts
 * cannot be allocated. */
int qk_histogram(const float *x, int64_t outer, int64_t channels, int64_t inner, const float *scale,
                 double range, float per_unit, int64_t bins, int64_t *counts, float *out)
{
    /* four interleaved 32-bit sub-histograms: consecutive values in one bin (a ReLU's zeros)
     * do not wait on each other's increments; flushed into 64-bit sums before any can overflow */
    uint32_t *sub = calloc((size_t)(4 * bins), sizeof(uint32_t));
    int64_t *sum = calloc((size_t)bins, sizeof(int64_t));
    if (!sub || !sum) {
        free(sub);
        free(sum);
        return -1;
    }
    uint32_t *h0 = sub, *h1 = sub + bins, *h2 = sub + 2 * bins, *h3 = sub + 3 * bins;
    const int64_t top = bins - 1;
    const int64_t flush_every = (int64_t)1 << 30;
    const qk_runs rs = qk_runs_of(outer, channels, inner, scale);
    const int64_t run = rs.run;
    float lo = INFINITY, hi = -INFINITY;
    int nan = 0;
    int64_t pending = 0;
    for (int64_t r = 0; r < rs.runs; r++) {
        const float *p = x + r * run;
        const float *sc = qk_run_scale(scale, rs, r, channels);
        for (int64_t i = 0; i < run;) {
            int64_t n = run - i < flush_every - pending ? run - i : flush_every - pending;
            nan |= qk_bin_run(p + i, n, sc ? (rs.per_value ? sc + i : sc) : NULL, rs.per_value, per_unit, top,
                              h0, h1, h2, h3, &lo, &hi);
            i += n;
            pending += n;
            if (pending >= flush_every) {
                for (int64_t b = 0; b < bins; b++)
                    sum[b] += (int64_t)h0[b] + h1[b] + h2[b] + h3[b];
                memset(sub, 0, (size_t)(4 * bins) * sizeof(uint32_t));
                pending = 0;
            }
        }
    }
    out[0] = lo;
    out[1] = hi;
    double amax = (double)(-lo > hi ? -lo : hi);
    int fits = !nan && amax <= range;
    if (fits)
        for (int64_t b = 0; b < bins; b++)
            counts[b] += sum[b] + h0[b] + h1[b] + h2[b] + h3[b];
    free(sub);
    free(sum);
    return nan ? 2 : fits;
}

/* NumPy's sampled binning (HistogramCollector, a stride k > 1) in one pass: sample[b] += the
 * values at flat positions offset, offset + k, ... in bin b; tail[b] += every value with
 * |v| >= bar in bin b; out[0], out[1] = min and max. Both counts are the caller's to combine (and
 * to zero first); they are valid only when this returns 1 (max |v| <= range); 0: a value is past
 * the range, 2: a value is NaN. */
int qk_histogram_sampled(const float *x, int64_t outer, int64_t channels, int64_t inner, const float *scale,
                         double range, float per_unit, int64_t bins, int64_t k, int64_t offset, float bar,
                         int64_t *sample, int64_t *tail, float *out)
{
    const int64_t top = bins - 1;
    const qk_runs rs = qk_runs_of(outer, channels, inner, scale);
    const int per_value = rs.per_value;
    const int64_t run = rs.run;
    float lo = INFINITY, hi = -INFINITY;
    int nan = 0;
    int64_t next = offset;  /* the next sampled flat position */
    for (int64_t r = 0; r < rs.runs; r++) {
        const float *p = x + r * run;
        const float *sc = qk_run_scale(scale, rs, r, channels);
        const int64_t base = r * run;
        int64_t i = 0;
#ifdef QK_SSE
        const __m128 unit = _mm_set1_ps(per_unit);
        const __m128 mag = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
        const __m128i last = _mm_set1_epi32((int)top);
        const __m128 s = _mm_set1_ps(sc ? sc[0] : 1.0f);
        const __m128 barv = _mm_set1_ps(bar);
        __m128 l = _mm_set1_ps(lo), h = _mm_set1_ps(hi), bad = _mm_setzero_ps();
        int32_t b[4];
        for (; i + 4 <= run; i += 4) {
            __m128 a = _mm_and_ps(qk_read4(p, i, sc, per_value, s, &l, &h, &bad), mag);
            int tails = _mm_movemask_ps(_mm_cmpge_ps(a, barv));
            const int64_t at = base + i;
            if (!tails && next >= at + 4)
                continue;
            _mm_storeu_si128((__m128i *)b, qk_bins4(a, unit, last));
            for (int j = 0; tails; j++, tails >>= 1)
                if (tails & 1)
                    tail[b[j]]++;
            for (; next < at + 4; next += k)
                sample[b[next - at]]++;
        }
        qk_fold4(l, h, &lo, &hi);
        nan |= _mm_movemask_ps(bad) != 0;
#endif
        for (; i < run; i++) {
            float v = qk_read1(p, i, sc, per_value, &lo, &hi, &nan);
            int64_t bin = qk_bin(v, per_unit, top);
            if (fabsf(v) >= bar)
                tail[bin]++;
            if (base + i == next) {
                sample[bin]++;
                next += k;
            }
        }
    }
    out[0] = lo;
    out[1] = hi;
    double amax = (double)(-lo > hi ? -lo : hi);
    return nan ? 2 : amax <= range;
}

/* out[c] = max over outer and inner of |x| (unscaled), for each channel c. */
void qk_channel_absmax(const float *x, int64_t outer, int64_t channels, int64_t inner, float *out)
{
    for (int64_t c = 0; c < channels; c++)
        out[c] = 0.0f;
    if (inner == 1) {  /* channel last: one row of channels at a time */
        for (int64_t o = 0; o < outer; o++) {
            const float *p = x + o * channels;
            for (int64_t c = 0; c < channels; c++) {
                float v = fabsf(p[c]);
                out[c] = v > out[c] ? v : out[c];
            }
        }
        return;
    }
    for (int64_t o = 0; o < outer; o++) {
        for (int64_t c = 0; c < channels; c++) {
            const float *p = x + (o * channels + c) * inner;
            float m[LANES] = {0};
            int64_t i = 0;
            for (; i + LANES <= inner; i += LANES)
                for (int k = 0; k < LANES; k++) {
                    float v = fabsf(p[i + k]);
                    m[k] = v > m[k] ? v : m[k];
                }
            for (; i < inner; i++) {
                float v = fabsf(p[i]);
                m[0] = v > m[0] ? v : m[0];
            }
            float best = out[c];
            for (int k = 0; k < LANES; k++)
                best = m[k] > best ? m[k] : best;
            out[c] = best;
        }
    }
}
