/* CPU kernels for sae_train's SAE training step.
 *
 * Built on first use by sae_train/sae/kernels/__init__.py with the system C compiler
 * (`cc -O3 -march=native -shared -fPIC`), called through ctypes. No torch headers, so it
 * builds in about a second. Not compiled with OpenMP (that could load a second runtime next to
 * torch's): work runs on torch's OpenMP team through the GOMP_parallel entry point the loader
 * passes in (sae_set_openmp), or on plain pthreads when there is none.
 *
 * Conventions
 *   - Dense matrices are row-major with a leading dimension (elements between rows).
 *   - `dtype` is DT_F32 or DT_BF16 for the big [B, N] pre-activation / latent matrices; all
 *     vectors (biases, thresholds, values, gradients of parameters) are float32.
 *   - Indices are int64 (torch's native index type); sparse latents use CSR: row r owns
 *     entries off[r] .. off[r+1]-1, `idx` holds latent ids.
 *   - Every kernel has an obviously-correct PyTorch twin in sae_train/sae/ops.py and a test.
 *
 * Top-k order: value descending, NaN above everything (as torch.topk), ties broken by the
 * lower column index. Output indices are sorted ascending within each row.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define SAE_AVX512 1
/* Keep a value in a register: GCC otherwise folds its load into every instruction that uses
 * it (a loaded bf16 row twice, g once per table row), and loads, not FMAs, become the limit. */
#define SAE_IN_REG(x) __asm__("" : "+v"(x))
#endif

#define DT_F32 0
#define DT_BF16 1

/* Keep a float's rounding: the compiler may not fuse the operation that produced it into an
 * FMA (an empty asm the value passes through, in a register of the FP/vector file). */
#if defined(__x86_64__) || defined(__i386__)
#define SAE_ROUNDED(x) __asm__("" : "+x"(x))
#elif defined(__aarch64__)
#define SAE_ROUNDED(x) __asm__("" : "+w"(x))
#else
#define SAE_ROUNDED(x)                  \
    do {                                \
        volatile float sae_rounded_ = (x); \
        (x) = sae_rounded_;             \
    } while (0)
#endif

/* Floats per vector of the path this build took: 16 (AVX-512 intrinsics), else what the
 * compiler may vectorise the portable loops to: 8 (AVX2+FMA), 4 (SSE2, Arm NEON), 1. */
int sae_vector_width(void) {
#if defined(SAE_AVX512)
    return 16;
#elif defined(__AVX2__) && defined(__FMA__)
    return 8;
#elif defined(__SSE2__) || defined(__ARM_NEON)
    return 4;
#else
    return 1;
#endif
}

/* ------------------------------------------------------------------ threading */

typedef void (*range_fn)(void *ctx, int64_t lo, int64_t hi, int tid);

typedef struct {
    range_fn fn;
    void *ctx;
    int64_t lo, hi;
    int tid;
} job_t;

static void *job_main(void *p) {
    job_t *j = (job_t *)p;
    if (j->lo < j->hi) j->fn(j->ctx, j->lo, j->hi, j->tid);
    return NULL;
}

/* torch's OpenMP runtime, when the loader hands it over (sae_set_openmp): work then runs on
 * torch's own thread team. Threads of our own would compete with its workers, which spin
 * for a while after every torch op — on a machine with few cores that oversubscription
 * stalls both sides for whole scheduler slices. */
typedef void (*gomp_parallel_fn)(void (*fn)(void *), void *data, unsigned nthreads, unsigned flags);
typedef int (*omp_int_fn)(void);
static gomp_parallel_fn g_parallel = NULL;
static omp_int_fn g_thread_num = NULL, g_num_threads = NULL;

void sae_set_openmp(void *gomp_parallel, void *omp_get_thread_num, void *omp_get_num_threads) {
    g_parallel = (gomp_parallel_fn)gomp_parallel;
    g_thread_num = (omp_int_fn)omp_get_thread_num;
    g_num_threads = (omp_int_fn)omp_get_num_threads;
}

typedef struct {
    job_t *jobs;
    int n;
} team_t;

static void team_main(void *p) {
    team_t *t = (team_t *)p;
    /* the team may be smaller than requested (OMP_DYNAMIC, thread limits): stride over jobs */
    for (int j = g_thread_num(); j < t->n; j += g_num_threads()) job_main(&t->jobs[j]);
}

/* Run fn over [0, n) split at the nthreads+1 boundaries in `cuts` (cuts[0]=0,
 * cuts[nthreads]=n). */
static void run_cuts(range_fn fn, void *ctx, const int64_t *cuts, int nthreads) {
    pthread_t th[256];
    job_t jobs[256];
    int spawned[256] = {0};
    if (nthreads > 256) nthreads = 256;
    for (int t = 0; t < nthreads; t++) jobs[t] = (job_t){fn, ctx, cuts[t], cuts[t + 1], t};
    if (nthreads == 1) {
        job_main(&jobs[0]);
        return;
    }
    if (g_parallel) {
        team_t team = {jobs, nthreads};
        g_parallel(team_main, &team, (unsigned)nthreads, 0);
        return;
    }
    for (int t = 1; t < nthreads; t++)
        if (jobs[t].lo < jobs[t].hi) spawned[t] = pthread_create(&th[t], NULL, job_main, &jobs[t]) == 0;
    for (int t = 1; t < nthreads; t++)
        if (jobs[t].lo < jobs[t].hi && !spawned[t]) job_main(&jobs[t]); /* spawn failed */
    job_main(&jobs[0]);
    for (int t = 1; t < nthreads; t++)
        if (spawned[t]) pthread_join(th[t], NULL);
}

/* Even split of [0, n) into nthreads chunks, each boundary a multiple of `align`. */
static void run_even(range_fn fn, void *ctx, int64_t n, int nthreads, int64_t align) {
    int64_t cuts[257];
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 256) nthreads = 256;
    for (int t = 0; t <= nthreads; t++) {
        int64_t c = n * t / nthreads;
        c = (c + align - 1) / align * align;
        cuts[t] = c < n ? c : n;
    }
    cuts[nthreads] = n;
    run_cuts(fn, ctx, cuts, nthreads);
}

/* Split rows [0, R) so each chunk holds about the same number of CSR entries. */
static void run_by_nnz(range_fn fn, void *ctx, int64_t R, const int64_t *off, int nthreads,
                       int64_t align) {
    int64_t cuts[257];
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 256) nthreads = 256;
    int64_t total = off[R] - off[0];
    cuts[0] = 0;
    int64_t r = 0;
    for (int t = 1; t < nthreads; t++) {
        int64_t target = off[0] + total * t / nthreads;
        while (r < R && off[r] < target) r++;
        int64_t c = (r + align - 1) / align * align;
        if (c > R) c = R;
        if (c < cuts[t - 1]) c = cuts[t - 1];
        cuts[t] = c;
    }
    cuts[nthreads] = R;
    run_cuts(fn, ctx, cuts, nthreads);
}

/* ------------------------------------------------------------------ element access */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float load1(const void *base, int dtype, int64_t i) {
    return dtype == DT_F32 ? ((const float *)base)[i] : bf16_to_f32(((const uint16_t *)base)[i]);
}

static inline void store1(void *base, int dtype, int64_t i, float v) {
    if (dtype == DT_F32)
        ((float *)base)[i] = v;
    else
        ((uint16_t *)base)[i] = f32_to_bf16(v);
}

#ifndef SAE_AVX512
/* The portable path's vectors: 8 floats in GCC/clang vector extensions, which the compiler
 * maps to one AVX2 register, two SSE or NEON registers, or scalar code. The hot loops of the
 * TopK step use them where plain C would not vectorise (sums whose order C fixes, loops over
 * gathered rows, selections). Loads and stores go through memcpy: unaligned, no aliasing. */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

static inline v8f v8_set1(float x) {
    v8f v = {x, x, x, x, x, x, x, x};
    return v;
}

static inline v8f v8_load(const void *base, int dtype, int64_t i) {
    v8f v;
    if (dtype == DT_F32) {
        memcpy(&v, (const float *)base + i, sizeof v);
        return v;
    }
    v8h h;
    memcpy(&h, (const uint16_t *)base + i, sizeof h);
    return (v8f)(__builtin_convertvector(h, v8u) << 16);
}

static inline void v8_store(float *p, v8f v) { memcpy(p, &v, sizeof v); }

/* store v in dtype (bf16: rounded as f32_to_bf16) and return what was stored, as fp32 */
static inline v8f v8_store_get(void *base, int dtype, int64_t i, v8f v) {
    if (dtype == DT_F32) {
        v8_store((float *)base + i, v);
        return v;
    }
    const v8u u = (v8u)v;
    const v8i nan = (v8i)(u & 0x7fffffffu) > 0x7f800000;
    v8u r = (u + (0x7fffu + ((u >> 16) & 1u))) >> 16;
    r = (r & ~(v8u)nan) | (((u >> 16) | 0x40u) & (v8u)nan);
    v8h h = __builtin_convertvector(r, v8h);
    memcpy((uint16_t *)base + i, &h, sizeof h);
    return (v8f)(r << 16);
}

static inline v8f v8_and(v8f v, v8i m) { return (v8f)((v8i)v & m); } /* v where m, else +0 */

static inline float v8_sum(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

static inline v8f v8_max(v8f v, v8f m) { /* max(v, m); a NaN v keeps m */
    v8i gt = v > m;
    return (v8f)(((v8i)v & gt) | ((v8i)m & ~gt));
}

static inline int v8_any(v8i m) {
    uint64_t w[4];
    memcpy(w, &m, sizeof w);
    return (w[0] | w[1] | w[2] | w[3]) != 0;
}
#endif

#ifdef SAE_AVX512
static inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u); }

static inline __m512 load16(const void *base, int dtype, int64_t i, __mmask16 m) {
    if (dtype == DT_F32) return _mm512_maskz_loadu_ps(m, (const float *)base + i);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)base + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __m512 load16u(const void *base, int dtype, int64_t i) { /* full vector */
    if (dtype == DT_F32) return _mm512_loadu_ps((const float *)base + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* v rounded to bf16 (round to nearest even, NaN kept), as 16 bf16 values and as fp32 */
static inline __m256i to_bf16(__m512 v) {
#ifdef __AVX512BF16__
    return (__m256i)_mm512_cvtneps_pbh(v);
#else
    __m512i u = _mm512_castps_si512(v);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                     _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    r = _mm512_srli_epi32(r, 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(r);
#endif
}

static inline __m512 bf16_to_ps(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* Loads/stores for a 16-lane step; `full` is a compile-time constant at every call site, so
 * the main loops use plain (unmasked) instructions — masked 16-bit loads/stores are slow on
 * AMD even with an all-ones mask — and only the tail pays for masks. */
static inline __m512 ld(const void *base, int dtype, int64_t i, __mmask16 m, int full) {
    return full ? load16u(base, dtype, i) : load16(base, dtype, i, m);
}

static inline __m512 ldf(const float *p, __mmask16 m, int full) {
    return full ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
}

static inline void stf(float *p, __m512 v, __mmask16 m, int full) {
    if (full)
        _mm512_storeu_ps(p, v);
    else
        _mm512_mask_storeu_ps(p, m, v);
}

/* store v in dtype (all lanes if full) and return what was stored, as fp32 */
static inline __m512 st_get(void *base, int dtype, int64_t i, __m512 v, __mmask16 m, int full) {
    if (dtype == DT_F32) {
        stf((float *)base + i, v, m, full);
        return v;
    }
    __m256i h = to_bf16(v);
    if (full)
        _mm256_storeu_si256((__m256i *)((uint16_t *)base + i), h);
    else
        _mm256_mask_storeu_epi16((uint16_t *)base + i, m, h);
    return bf16_to_ps(h);
}

#endif

/* ------------------------------------------------------------------ top-k per row */

/* Order-preserving key of a float: larger float -> larger key; every NaN maps above +inf,
 * -0.0 maps to +0.0 (torch compares them equal). Ties between equal keys go to the lower
 * index, which makes the order total and matches the PyTorch twin exactly. */
static inline uint32_t fkey(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0xffffffffu;
    if (u == 0x80000000u) u = 0;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

static inline float key_to_float(uint32_t k) {
    uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#ifdef SAE_AVX512
static inline __m512i fkey16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __mmask16 zero = _mm512_cmpeq_epi32_mask(u, _mm512_set1_epi32((int)0x80000000u));
    u = _mm512_mask_mov_epi32(u, zero, _mm512_setzero_si512());
    __mmask16 neg = _mm512_cmplt_epi32_mask(u, _mm512_setzero_si512());
    __m512i key = _mm512_mask_xor_epi32(_mm512_or_si512(u, _mm512_set1_epi32((int)0x80000000u)), neg, u,
                                        _mm512_set1_epi32(-1));
    return _mm512_mask_mov_epi32(key, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(-1));
}
#endif

/* How many of key[0..n) are >= t. */
static inline int64_t count_ge(const uint32_t *key, int64_t n, uint32_t t) {
    int64_t c = 0, i = 0;
#ifdef SAE_AVX512
    const __m512i vt = _mm512_set1_epi32((int)t);
    for (; i + 16 <= n; i += 16) c += __builtin_popcount(_mm512_cmpge_epu32_mask(_mm512_loadu_si512(key + i), vt));
#endif
    for (; i < n; i++) c += key[i] >= t;
    return c;
}

/* The k-th largest of n keys (1 <= k <= n), built bit by bit: the largest t with at least k
 * keys >= t. 33 vectorised counting passes, no data-dependent branches or histograms (a
 * byte histogram serialises: the keys of similar floats share their top bytes).
 * *n_eq_take receives how many entries equal to it belong to the top k. */
static uint32_t kth_key(const uint32_t *key, int64_t n, int64_t k, int64_t *n_eq_take) {
    uint32_t t = 0;
    for (int bit = 31; bit >= 0; bit--) {
        uint32_t cand = t | (1u << bit);
        if (count_ge(key, n, cand) >= k) t = cand;
    }
    *n_eq_take = k - (t == 0xffffffffu ? 0 : count_ge(key, n, t + 1));
    return t;
}

typedef struct {
    const void *z;
    int dtype;
    int64_t N, ldz, k;
    const float *bias;
    const uint8_t *colmask;
    int64_t *out_idx;
    float *out_val;
    int err;
} topk_ctx;

#ifdef SAE_AVX512
/* Small exact selections: a bitonic sort of 16*R keys (R = 1, 2, 4 or 8 registers; unused
 * slots hold key 0, below every real key: fkey never returns 0) into descending order. The
 * network has no data-dependent branches and its stages are independent across registers,
 * where kth_key's 33 counting passes form one long dependency chain: ~4x cheaper for the
 * 64 group maxima and the ~50 candidates of a TopK row. */
static inline __m512i bitonic_partner(__m512i v, int j) { /* lane l <- lane l ^ j, j < 16 */
    switch (j) {
    case 1: return _mm512_shuffle_epi32(v, _MM_PERM_CDAB);
    case 2: return _mm512_shuffle_epi32(v, _MM_PERM_BADC);
    case 4: return _mm512_shuffle_i32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1));
    default: return _mm512_shuffle_i32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2));
    }
}

static inline __attribute__((always_inline)) void bitonic_desc(__m512i *v, const int R) {
    static const uint16_t low_half[16] = {0, 0x5555, 0x3333, 0, 0x0f0f, 0, 0, 0, 0x00ff}; /* lanes with l & j == 0 */
    for (int s = 2; s <= 16 * R; s <<= 1)
        for (int j = s >> 1; j > 0; j >>= 1) {
            if (j >= 16) { /* partner in another register: element-wise */
                const int J = j >> 4;
                for (int r = 0; r < R; r++) {
                    if (r & J) continue;
                    __m512i a = v[r], b = v[r | J];
                    __m512i mx = _mm512_max_epu32(a, b), mn = _mm512_min_epu32(a, b);
                    int desc = ((16 * r) & s) == 0;
                    v[r] = desc ? mx : mn;
                    v[r | J] = desc ? mn : mx;
                }
                continue;
            }
            for (int r = 0; r < R; r++) {
                /* lane l keeps the max when (it is the pair's lower element) == (its block of s
                 * is sorted descending) */
                uint16_t desc = s < 16 ? low_half[s] : (((16 * r) & s) == 0 ? 0xffff : 0);
                __mmask16 takemax = (__mmask16)~(low_half[j] ^ desc);
                __m512i p = bitonic_partner(v[r], j);
                v[r] = _mm512_mask_blend_epi32(takemax, _mm512_min_epu32(v[r], p), _mm512_max_epu32(v[r], p));
            }
        }
}

/* The k-th largest of key[0..n) (1 <= k <= n <= 128) and, through *n_eq_take, how many keys
 * equal to it belong to the top k: the same answer as kth_key. */
static uint32_t kth_key_small(const uint32_t *key, int64_t n, int64_t k, int64_t *n_eq_take) {
    __m512i v[8];
    uint32_t sorted[128];
    const int R = n <= 16 ? 1 : n <= 32 ? 2 : n <= 64 ? 4 : 8;
    for (int r = 0; r < R; r++) {
        int64_t rem = n - 16 * r;
        v[r] = _mm512_maskz_loadu_epi32(rem >= 16 ? (__mmask16)0xffff : rem > 0 ? tail_mask(rem) : 0, key + 16 * r);
    }
    switch (R) {
    case 1: bitonic_desc(v, 1); break;
    case 2: bitonic_desc(v, 2); break;
    case 4: bitonic_desc(v, 4); break;
    default: bitonic_desc(v, 8); break;
    }
    for (int r = 0; r < R; r++) _mm512_storeu_si512(sorted + 16 * r, v[r]);
    uint32_t kth = sorted[k - 1];
    int64_t first = k - 1;
    while (first > 0 && sorted[first - 1] == kth) first--;
    *n_eq_take = k - first;
    return kth;
}

static inline uint32_t kth_key_any(const uint32_t *key, int64_t n, int64_t k, int64_t *n_eq_take) {
    return n <= 128 ? kth_key_small(key, n, k, n_eq_take) : kth_key(key, n, k, n_eq_take);
}

/* z[r, i] + bias[i] for the 16 columns at i (full vector), as fp32 */
static inline __attribute__((always_inline)) __m512 zb16(const char *row, int dtype, const float *bias, int64_t i) {
    return _mm512_add_ps(load16u(row, dtype, i), _mm512_loadu_ps(bias + i));
}

/* One row of topk_range without a column mask (the training path); same steps and result.
 * Scratch: gkey [16*nb + 16], ck/cv/ci [N + 64], ti/tv [k + 16], vq [N/16 + 2]. */
static inline __attribute__((always_inline)) void topk_row_fast(const char *row, const int dtype, int64_t N,
                                                                 const float *bias, int64_t k, int64_t nb, int64_t g,
                                                                 uint32_t *gkey, uint32_t *ck, float *cv, int32_t *ci,
                                                                 int32_t *ti, float *tv, uint64_t *vq, int64_t *oi,
                                                                 float *ov, const char *next) {
    const int64_t nvf = N / 16, rem = N % 16, esz = dtype == DT_F32 ? 4 : 2;
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    /* 1. group maxima; four chains per block so the max latency overlaps */
    for (int64_t b = 0; b < nb; b++) {
        const int64_t q0 = b * g, q1 = q0 + g < nvf ? q0 + g : nvf;
        __m512 m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf; /* max(v, m): a NaN v keeps m */
        int64_t q = q0;
        for (; q + 4 <= q1; q += 4) {
            m0 = _mm512_max_ps(zb16(row, dtype, bias, 16 * q), m0);
            m1 = _mm512_max_ps(zb16(row, dtype, bias, 16 * q + 16), m1);
            m2 = _mm512_max_ps(zb16(row, dtype, bias, 16 * q + 32), m2);
            m3 = _mm512_max_ps(zb16(row, dtype, bias, 16 * q + 48), m3);
        }
        for (; q < q1; q++) m0 = _mm512_max_ps(zb16(row, dtype, bias, 16 * q), m0);
        if (rem && nvf >= q0 && nvf < q0 + g) { /* the partial last vector belongs to this block */
            __mmask16 tm = tail_mask(rem);
            __m512 v = _mm512_add_ps(load16(row, dtype, 16 * nvf, tm), _mm512_maskz_loadu_ps(tm, bias + 16 * nvf));
            m1 = _mm512_max_ps(_mm512_mask_mov_ps(ninf, tm, v), m1);
        }
        _mm512_storeu_si512(gkey + 16 * b, fkey16(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3))));
    }
    int64_t eq;
    const __m512 vb = _mm512_set1_ps(key_to_float(kth_key_any(gkey, 16 * nb, k, &eq)));
    /* 2. candidates: entries >= bound or NaN (~1.4k of them, in ~k of the row's vectors). The
     * scan has no data-dependent branch (one per vector would mispredict ~k times a row, the
     * largest cost here): every vector is stored to `vbuf` with its mask and index, and the
     * write position advances only past vectors holding a candidate; those few are then
     * compressed, in column order. */
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    float *vbuf = (float *)ck; /* ck is free until the candidates' keys are computed */
    int64_t nsv = 0;
    for (int64_t q = 0; q < nvf; q++) {
        if (next && (q & (esz == 2 ? 1 : 0)) == 0) _mm_prefetch(next + 16 * q * esz, _MM_HINT_T0); /* next row's line */
        __m512 v = zb16(row, dtype, bias, 16 * q);
        __mmask16 m = _mm512_cmp_ps_mask(v, vb, _CMP_NLT_UQ);
        _mm512_storeu_ps(vbuf + 16 * nsv, v);
        vq[nsv] = ((uint64_t)q << 16) | m;
        nsv += m != 0;
    }
    if (rem) {
        __mmask16 tm = tail_mask(rem);
        __m512 v = _mm512_add_ps(load16(row, dtype, 16 * nvf, tm), _mm512_maskz_loadu_ps(tm, bias + 16 * nvf));
        __mmask16 m = _mm512_mask_cmp_ps_mask(tm, v, vb, _CMP_NLT_UQ);
        _mm512_storeu_ps(vbuf + 16 * nsv, v);
        vq[nsv] = ((uint64_t)nvf << 16) | m;
        nsv += m != 0;
    }
    int64_t nc = 0;
    for (int64_t s = 0; s < nsv; s++) {
        const __mmask16 m = (__mmask16)(vq[s] & 0xffff);
        const int q = (int)(vq[s] >> 16);
        _mm512_storeu_ps(cv + nc, _mm512_maskz_compress_ps(m, _mm512_loadu_ps(vbuf + 16 * s)));
        _mm512_storeu_si512(ci + nc, _mm512_maskz_compress_epi32(m, _mm512_add_epi32(lane, _mm512_set1_epi32(16 * q))));
        nc += __builtin_popcount(m);
    }
    if (nc < k) { /* cannot happen: the bound leaves >= k entries (fewer only with a column mask) */
        for (int64_t q = 0; q < k; q++) {
            oi[q] = q < nc ? ci[q] : -1;
            ov[q] = q < nc ? cv[q] : -INFINITY;
        }
        return;
    }
    for (int64_t q = 0; q < nc; q += 16) _mm512_storeu_si512(ck + q, fkey16(_mm512_loadu_ps(cv + q)));
    /* 3. the candidates above the k-th largest plus the first ties, in column order */
    int64_t take_eq;
    const uint32_t kth = kth_key_any(ck, nc, k, &take_eq);
    const __m512i vk = _mm512_set1_epi32((int)kth);
    int64_t o = 0;
    for (int64_t q = 0; q < nc; q += 16) {
        __mmask16 valid = tail_mask(nc - q);
        __m512i key = _mm512_loadu_si512(ck + q);
        __mmask16 take = _mm512_mask_cmpgt_epu32_mask(valid, key, vk);
        __mmask16 tie = _mm512_mask_cmpeq_epu32_mask(valid, key, vk);
        while (tie && take_eq > 0) {
            __mmask16 first = tie & (__mmask16)(-(int)tie);
            take |= first;
            tie ^= first;
            take_eq--;
        }
        _mm512_storeu_ps(tv + o, _mm512_maskz_compress_ps(take, _mm512_loadu_ps(cv + q)));
        _mm512_storeu_si512(ti + o, _mm512_maskz_compress_epi32(take, _mm512_loadu_si512(ci + q)));
        o += __builtin_popcount(take);
    }
    for (int64_t q = 0; q < k; q++) {
        oi[q] = ti[q];
        ov[q] = tv[q];
    }
}
#endif

#ifndef SAE_AVX512
/* Steps 1 and 2 of topk_range (below) for a row without a column mask, on 8-float vectors:
 * the group maxima (the same groups as the AVX-512 path: lane l of g consecutive 16-column
 * vectors), then the entries >= their k-th largest (or NaN) in column order, tested 8 at a
 * time (few vectors hold one). Returns how many; scratch as in topk_range. */
static inline __attribute__((always_inline)) int64_t topk_candidates_v8(const char *row, const int dtype, int64_t N,
                                                                        const float *bias, int64_t k, int64_t nb,
                                                                        int64_t g, uint32_t *gkey, uint32_t *ck,
                                                                        float *cv, int32_t *ci) {
    const int64_t nvf = N / 16;
    const v8f ninf = v8_set1(-INFINITY);
    for (int64_t b = 0; b < nb; b++) {
        const int64_t q0 = b * g, q1 = q0 + g < nvf ? q0 + g : nvf;
        v8f lo = ninf, hi = ninf;
        for (int64_t q = q0; q < q1; q++) {
            lo = v8_max(v8_load(row, dtype, 16 * q) + v8_load(bias, DT_F32, 16 * q), lo);
            hi = v8_max(v8_load(row, dtype, 16 * q + 8) + v8_load(bias, DT_F32, 16 * q + 8), hi);
        }
        for (int l = 0; l < 8; l++) {
            gkey[16 * b + l] = fkey(lo[l]);
            gkey[16 * b + 8 + l] = fkey(hi[l]);
        }
    }
    if (nvf / g < nb) /* the partial last vector belongs to a block */
        for (int64_t i = 16 * nvf; i < N; i++) {
            float v = load1(row, dtype, i) + bias[i];
            uint32_t *gk = gkey + 16 * (nvf / g) + i % 16;
            if (v == v && fkey(v) > *gk) *gk = fkey(v);
        }
    int64_t eq, nc = 0, i = 0;
    const float bound = key_to_float(kth_key(gkey, 16 * nb, k, &eq));
    const v8f vb = v8_set1(bound);
    for (; i + 8 <= N; i += 8) {
        const v8f v = v8_load(row, dtype, i) + v8_load(bias, DT_F32, i);
        const v8i take = ~(v < vb); /* v >= bound, or NaN */
        if (!v8_any(take)) continue;
        for (int l = 0; l < 8; l++) { /* no branch per lane: every lane is written, kept or not */
            cv[nc] = v[l];
            ck[nc] = fkey(v[l]);
            ci[nc] = (int32_t)(i + l);
            nc += take[l] != 0;
        }
    }
    for (; i < N; i++) {
        float v = load1(row, dtype, i) + bias[i];
        cv[nc] = v;
        ck[nc] = fkey(v);
        ci[nc] = (int32_t)i;
        nc += !(v < bound);
    }
    return nc;
}
#endif

/* Per row:
 *  1. a lower bound for the k-th largest value: split the row into G >= 2k disjoint groups
 *     (lane l of g consecutive vectors), take each group's max (lane-wise: no horizontal
 *     reductions; NaN skipped, masked-out columns -inf) and the exact k-th largest of those
 *     maxima — the k best groups each hold an element >= it;
 *  2. collect the entries >= bound (or NaN) with their keys: ~1.4k of them for i.i.d. rows,
 *     whatever the row's scale, and prefetch the next row meanwhile;
 *  3. select the k-th largest candidate key (kth_key) and emit, in column order, the candidates
 *     above it plus the first ties: exactly k, indices ascending. */
static void topk_range(void *p, int64_t lo, int64_t hi, int tid) {
    (void)tid;
    topk_ctx *c = (topk_ctx *)p;
    const int64_t N = c->N, k = c->k, esz = c->dtype == DT_F32 ? 4 : 2;
    const int64_t nb = (k + 7) / 8;                   /* blocks of g vectors -> 16 maxima each */
    const int64_t g = (N + 16 * nb - 1) / (16 * nb);  /* vectors per block */
    const int64_t G = 16 * nb;
    uint32_t *gkey = (uint32_t *)malloc(sizeof(uint32_t) * (G + 16));
    uint16_t *vmask = (uint16_t *)malloc(sizeof(uint16_t) * (N / 16 + 5));
    uint32_t *ck = (uint32_t *)malloc(sizeof(uint32_t) * (N + 64));
    float *cv = (float *)malloc(sizeof(float) * (N + 64));
    int32_t *ci = (int32_t *)malloc(sizeof(int32_t) * (N + 64));
    int32_t *ti = (int32_t *)malloc(sizeof(int32_t) * (k + 16));
    float *tv = (float *)malloc(sizeof(float) * (k + 16));
    uint64_t *vq = (uint64_t *)malloc(sizeof(uint64_t) * (N / 16 + 2));
    if (!gkey || !vmask || !ck || !cv || !ci || !ti || !tv || !vq) {
        c->err = 1;
        goto done;
    }
    for (int64_t r = lo; r < hi; r++) {
        const char *row = (const char *)c->z + (size_t)(r * c->ldz) * esz;
        const char *next = r + 1 < hi ? row + c->ldz * esz : NULL; /* prefetched by the AVX-512 path */
        (void)next;
        int64_t nc = 0;
#ifdef SAE_AVX512
        if (!c->colmask) {
            if (c->dtype == DT_BF16)
                topk_row_fast(row, DT_BF16, N, c->bias, k, nb, g, gkey, ck, cv, ci, ti, tv, vq, c->out_idx + r * k, c->out_val + r * k, next);
            else
                topk_row_fast(row, DT_F32, N, c->bias, k, nb, g, gkey, ck, cv, ci, ti, tv, vq, c->out_idx + r * k, c->out_val + r * k, next);
            continue;
        }
        /* with a column mask: every vector is loaded under the mask of its selectable columns */
        const __m512 ninf = _mm512_set1_ps(-INFINITY);
        for (int64_t b = 0; b < nb; b++) {
            __m512 m = ninf;
            for (int64_t t = 0; t < g; t++) {
                int64_t i = (b * g + t) * 16;
                if (i >= N) break;
                __mmask16 tm = tail_mask(N - i);
                __m128i cm = _mm_maskz_loadu_epi8(tm, c->colmask + i);
                tm &= _mm_test_epi8_mask(cm, cm);
                __m512 v = _mm512_add_ps(load16(row, c->dtype, i, tm), _mm512_maskz_loadu_ps(tm, c->bias + i));
                m = _mm512_max_ps(_mm512_mask_mov_ps(ninf, tm, v), m); /* NaN in v: max keeps m */
            }
            _mm512_storeu_si512(gkey + 16 * b, fkey16(m));
        }
        int64_t eq;
        uint32_t bkey = kth_key(gkey, G, k, &eq);
        const __m512 vb = _mm512_set1_ps(key_to_float(bkey));
        /* pass 2 only records which lanes qualify (few do); the candidates are then read
         * back one by one — cheaper than compressing every vector */
        const int64_t nv = (N + 15) / 16;
        for (int64_t q = 0; q < nv; q++) {
            int64_t i = 16 * q;
            if (next && (i & 31) == 0) _mm_prefetch(next + i * esz, _MM_HINT_T0);
            __mmask16 tm = tail_mask(N - i);
            __m128i cm = _mm_maskz_loadu_epi8(tm, c->colmask + i);
            tm &= _mm_test_epi8_mask(cm, cm);
            __m512 v = _mm512_add_ps(load16(row, c->dtype, i, tm), _mm512_maskz_loadu_ps(tm, c->bias + i));
            vmask[q] = _mm512_mask_cmp_ps_mask(tm, v, vb, _CMP_NLT_UQ); /* v >= bound or NaN */
        }
        vmask[nv] = vmask[nv + 1] = vmask[nv + 2] = vmask[nv + 3] = 0;
        for (int64_t q = 0; q < nv; q += 4) {
            uint64_t m4;
            memcpy(&m4, vmask + q, 8);
            while (m4) {
                int64_t col = 16 * q + __builtin_ctzll(m4);
                m4 &= m4 - 1;
                float v = load1(row, c->dtype, col) + c->bias[col];
                cv[nc] = v;
                ck[nc] = fkey(v);
                ci[nc] = (int32_t)col;
                nc++;
            }
        }
#else
        if (!c->colmask) {
            nc = c->dtype == DT_BF16 ? topk_candidates_v8(row, DT_BF16, N, c->bias, k, nb, g, gkey, ck, cv, ci)
                                     : topk_candidates_v8(row, DT_F32, N, c->bias, k, nb, g, gkey, ck, cv, ci);
        } else {
            for (int64_t q = 0; q < G; q++) gkey[q] = 0;
            for (int64_t i = 0; i < N; i++) {
                if (c->colmask && !c->colmask[i]) continue;
                float v = load1(row, c->dtype, i) + c->bias[i];
                int64_t q = (i / (16 * g)) * 16 + (i % 16);
                if (v == v && fkey(v) > gkey[q]) gkey[q] = fkey(v);
            }
            int64_t eq;
            float bound = key_to_float(kth_key(gkey, G, k, &eq));
            for (int64_t i = 0; i < N; i++) {
                if (c->colmask && !c->colmask[i]) continue;
                float v = load1(row, c->dtype, i) + c->bias[i];
                if (!(v < bound)) {
                    cv[nc] = v;
                    ck[nc] = fkey(v);
                    ci[nc] = (int32_t)i;
                    nc++;
                }
            }
        }
#endif
        int64_t *oi = c->out_idx + r * k;
        float *ov = c->out_val + r * k;
        if (nc < k) { /* only when fewer than k selectable entries exist (-inf values): flag */
            for (int64_t q = 0; q < k; q++) {
                oi[q] = q < nc ? ci[q] : -1;
                ov[q] = q < nc ? cv[q] : -INFINITY;
            }
            continue;
        }
        int64_t o = 0, take_eq;
        uint32_t kth = kth_key(ck, nc, k, &take_eq);
        for (int64_t q = 0; q < nc && o < k; q++) {
            int take = ck[q] > kth || (ck[q] == kth && take_eq-- > 0);
            oi[o] = ci[q];
            ov[o] = cv[q];
            o += take;
        }
    }
done:
    free(vq);
    free(ti);
    free(tv);
    free(gkey);
    free(vmask);
    free(ck);
    free(cv);
    free(ci);
}

/* Top-k of (z[r, :] + bias) per row, restricted to columns with colmask != 0 when colmask is
 * given. Writes k (index, value) pairs per row, indices ascending. Returns 0 on success. */
int sae_topk_rows(const void *z, int dtype, int64_t B, int64_t N, int64_t ldz, const float *bias,
                  const uint8_t *colmask, int64_t k, int64_t *out_idx, float *out_val, int nthreads) {
    topk_ctx c = {z, dtype, N, ldz, k, bias, colmask, out_idx, out_val, 0};
    run_even(topk_range, &c, B, nthreads, 1);
    return c.err;
}

/* ------------------------------------------------------------------ batch top-k */

typedef struct {
    const void *z;
    int dtype;
    int64_t N, ldz;
    const float *bias;
    float thr;
    int64_t cap;      /* candidate slots per thread */
    int32_t *cidx;    /* [nthreads * cap] */
    float *cval;
    int64_t *row_cnt; /* [B] */
    int64_t *tcount;  /* [nthreads] */
    int *overflow;
} bt_ctx;

/* Collect the entries of rows lo..hi with z + bias > thr (or NaN) into this thread's slots. */
static void bt_range(void *p, int64_t lo, int64_t hi, int tid) {
    bt_ctx *c = (bt_ctx *)p;
    const int64_t N = c->N, esz = c->dtype == DT_F32 ? 4 : 2;
    int32_t *ci = c->cidx + tid * c->cap;
    float *cv = c->cval + tid * c->cap;
    int64_t o = 0;
#ifdef SAE_AVX512
    /* as in topk_row_fast: no branch per vector (most hold no candidate, and the few that do
     * are unpredictable); vectors are stored with their masks, and only those with a
     * candidate are kept and compressed afterwards */
    float *vbuf = (float *)malloc(sizeof(float) * (N + 32));
    uint64_t *vq = (uint64_t *)malloc(sizeof(uint64_t) * (N / 16 + 2));
    if (!vbuf || !vq) {
        free(vbuf);
        free(vq);
        *c->overflow = 2; /* out of memory */
        c->tcount[tid] = 0;
        return;
    }
    const __m512 thr = _mm512_set1_ps(c->thr);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#endif
    for (int64_t r = lo; r < hi; r++) {
        const char *row = (const char *)c->z + (size_t)(r * c->ldz) * esz;
        int64_t start = o, i = 0;
        if (o + N + 16 > c->cap) { /* the row might not fit: flag, the caller retries */
            *c->overflow = 1;
            break;
        }
#ifdef SAE_AVX512
        int64_t nsv = 0;
        for (; i + 16 <= N; i += 16) {
            __m512 v = _mm512_add_ps(load16u(row, c->dtype, i), _mm512_loadu_ps(c->bias + i));
            __mmask16 m = _mm512_cmp_ps_mask(v, thr, _CMP_NLE_UQ); /* v > thr, or NaN */
            _mm512_storeu_ps(vbuf + 16 * nsv, v);
            vq[nsv] = ((uint64_t)i << 16) | m;
            nsv += m != 0;
        }
        if (i < N) {
            __mmask16 tm = tail_mask(N - i);
            __m512 v = _mm512_add_ps(load16(row, c->dtype, i, tm), _mm512_maskz_loadu_ps(tm, c->bias + i));
            __mmask16 m = _mm512_mask_cmp_ps_mask(tm, v, thr, _CMP_NLE_UQ);
            _mm512_storeu_ps(vbuf + 16 * nsv, v);
            vq[nsv] = ((uint64_t)i << 16) | m;
            nsv += m != 0;
            i = N;
        }
        for (int64_t q = 0; q < nsv; q++) {
            const __mmask16 m = (__mmask16)(vq[q] & 0xffff);
            const int col = (int)(vq[q] >> 16);
            _mm512_storeu_ps(cv + o, _mm512_maskz_compress_ps(m, _mm512_loadu_ps(vbuf + 16 * q)));
            _mm512_storeu_si512(ci + o, _mm512_maskz_compress_epi32(m, _mm512_add_epi32(lane, _mm512_set1_epi32(col))));
            o += __builtin_popcount(m);
        }
#endif
        for (; i < N; i++) {
            float v = load1(row, c->dtype, i) + c->bias[i];
            if (v > c->thr || v != v) {
                cv[o] = v;
                ci[o] = (int32_t)i;
                o++;
            }
        }
        c->row_cnt[r] = o - start;
    }
    c->tcount[tid] = o;
#ifdef SAE_AVX512
    free(vbuf);
    free(vq);
#endif
}

/* Batch top-k: the n_keep largest entries of z + bias above thr (>= 0, so after ReLU) over
 * the whole [B, N] batch, ties to the lower row-major position (NaN first). Writes CSR
 * out_off [B+1], out_idx / out_val [nnz] (row-major) and returns nnz. thr is the caller's
 * guess of a value below the n_keep-th largest: returns -1 when fewer than n_keep entries
 * exceed a positive thr (retry with thr = 0), -2 when `cap` candidate slots per thread
 * were too few (retry with more) and -3 when scratch memory could not be allocated. Scratch: cidx/cval [nthreads * cap], keys [nthreads * cap]. */
int64_t sae_batch_topk(const void *z, int dtype, int64_t B, int64_t N, int64_t ldz, const float *bias, float thr,
                       int64_t n_keep, int64_t cap, int32_t *cidx, float *cval, uint32_t *keys, int64_t *row_cnt,
                       int64_t *out_off, int64_t *out_idx, float *out_val, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 256) nthreads = 256;
    int64_t tcount[256] = {0}, cuts[257];
    int overflow = 0;
    for (int t = 0; t <= nthreads; t++) cuts[t] = B * t / nthreads;
    bt_ctx c = {z, dtype, N, ldz, bias, thr, cap, cidx, cval, row_cnt, tcount, &overflow};
    run_cuts(bt_range, &c, cuts, nthreads);
    if (overflow) return overflow == 2 ? -3 : -2;
    int64_t total = 0;
    for (int t = 0; t < nthreads; t++) total += tcount[t];
    if (total < n_keep && thr > 0.0f) return -1;
    uint32_t kth = 0;
    int64_t take_eq = total;
    if (total > n_keep) {
        int64_t q = 0;
        for (int t = 0; t < nthreads; t++)
            for (int64_t e = 0; e < tcount[t]; e++) keys[q++] = fkey(cval[t * cap + e]);
        kth = kth_key(keys, total, n_keep, &take_eq);
    }
    int64_t o = 0, q = 0;
    out_off[0] = 0;
    for (int t = 0; t < nthreads; t++) {
        int64_t e = t * cap;
        for (int64_t r = cuts[t]; r < cuts[t + 1]; r++) {
            for (int64_t j = 0; j < row_cnt[r]; j++, e++, q++) {
                uint32_t key = total > n_keep ? keys[q] : 1;
                if (key > kth || (key == kth && take_eq-- > 0)) {
                    out_idx[o] = cidx[e];
                    out_val[o] = cval[e];
                    o++;
                }
            }
            out_off[r + 1] = o;
        }
    }
    return o;
}

/* A starting cut for sae_batch_topk: the value that `expected` entries of z + bias (over the
 * whole [B, N] batch) are estimated to exceed, from a sample of ~64k entries taken as runs of
 * up to 256 consecutive columns (a few cache lines each, where single strided entries would
 * each cost a cache miss) in evenly spaced rows, at scattered column offsets. NaN and negative
 * estimates give 0. Only speed depends on it: sae_batch_topk is exact for any cut, and
 * retries when the cut leaves too few entries. */
float sae_batch_topk_guess(const void *z, int dtype, int64_t B, int64_t N, int64_t ldz, const float *bias,
                           int64_t expected) {
    const int64_t esz = dtype == DT_F32 ? 4 : 2;
    const int64_t L = N < 256 ? N : 256;
    int64_t S = 65536 / L;
    if (S > B) S = B;
    if (S < 1) S = 1;
    uint32_t *keys = (uint32_t *)malloc(sizeof(uint32_t) * (size_t)(S * L + 16));
    if (!keys) return 0.0f;
    int64_t n = 0;
    for (int64_t i = 0; i < S; i++) {
        const int64_t r = i * B / S;
        int64_t c0 = N > L ? (int64_t)(((uint64_t)(i + 1) * 2654435761u) % (uint64_t)(N - L + 1)) : 0;
        const char *row = (const char *)z + (size_t)(r * ldz) * esz;
        for (int64_t j = c0; j < c0 + L; j++) keys[n++] = fkey(load1(row, dtype, j) + bias[j]);
    }
    int64_t want = (int64_t)((double)expected * (double)n / ((double)B * (double)N));
    if (want < 1) want = 1;
    if (want > n) want = n;
    int64_t eq;
    float g = key_to_float(kth_key(keys, n, want, &eq));
    free(keys);
    return g == g && g > 0.0f ? g : 0.0f;
}

/* ------------------------------------------------------------------ sparse products */

/* Tables (the dense operand gathered by row) may be bf16; accumulation is always fp32. The
 * accumulators live in registers (blocks of 8 vectors), so each gathered table element costs
 * one load and one FMA. */

typedef struct {
    const int64_t *off, *idx, *perm;
    const float *val;
    const void *T;
    int tdtype;
    int64_t D, ldt;
    float *out;
    int64_t ldo;
    int accumulate;
    const float *bias, *target; /* decode: out += bias; row_sse[r] = ||out[r] - target[r]||^2 */
    float *row_sse;
    float *val_sum; /* optional: val_sum[r] = sum of row r's values, in entry order */
    int stream_out; /* write finished output rows with streaming stores (64-byte aligned rows) */
} spmm_ctx;

static inline const void *trow(const spmm_ctx *c, int64_t i) {
    return (const char *)c->T + (size_t)(i * c->ldt) * (c->tdtype == DT_F32 ? 4 : 2);
}

#define GCHUNK 64 /* entries per chunk: their table rows and values are looked up once */

#ifdef SAE_AVX512
/* out[d0 : d0 + 32P] (+)= sum_e a[e] * src[e][d0 : d0 + 32P] for a bf16 table, P <= 8 pairs
 * of registers: one 64-byte load gives 32 values, shifted/masked into the even and odd
 * elements (no shuffles in the loop); the accumulators are re-interleaved once at the end.
 * P is a compile-time constant at every call site, so acc[] lives in registers. */
static inline __attribute__((always_inline)) void axpy_bf16_block(const void *const *src, const float *a, int n,
                                                                  int64_t d0, float *out, int load, int stream,
                                                                  const int P) {
    const __m512i hi16 = _mm512_set1_epi32((int)0xffff0000u);
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    const __m512i ilv_lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i ilv_hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    __m512 acc[16];
    for (int j = 0; j < P; j++) {
        if (load) {
            __m512 lo = _mm512_loadu_ps(out + d0 + 32 * j), hi = _mm512_loadu_ps(out + d0 + 32 * j + 16);
            acc[2 * j] = _mm512_permutex2var_ps(lo, even, hi);
            acc[2 * j + 1] = _mm512_permutex2var_ps(lo, odd, hi);
        } else {
            acc[2 * j] = acc[2 * j + 1] = _mm512_setzero_ps();
        }
    }
    for (int e = 0; e < n; e++) {
        const __m512 va = _mm512_set1_ps(a[e]);
        const uint16_t *h = (const uint16_t *)src[e] + d0;
        for (int j = 0; j < P; j++) {
            __m512i w = _mm512_loadu_si512(h + 32 * j);
            SAE_IN_REG(w);
            acc[2 * j] = _mm512_fmadd_ps(va, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), acc[2 * j]);
            acc[2 * j + 1] = _mm512_fmadd_ps(va, _mm512_castsi512_ps(_mm512_and_si512(w, hi16)), acc[2 * j + 1]);
        }
    }
    for (int j = 0; j < P; j++) {
        __m512 lo = _mm512_permutex2var_ps(acc[2 * j], ilv_lo, acc[2 * j + 1]);
        __m512 hi = _mm512_permutex2var_ps(acc[2 * j], ilv_hi, acc[2 * j + 1]);
        if (stream) {
            _mm512_stream_ps(out + d0 + 32 * j, lo);
            _mm512_stream_ps(out + d0 + 32 * j + 16, hi);
        } else {
            _mm512_storeu_ps(out + d0 + 32 * j, lo);
            _mm512_storeu_ps(out + d0 + 32 * j + 16, hi);
        }
    }
}

/* The same for an fp32 table, P <= 16 registers of 16 values. */
static inline __attribute__((always_inline)) void axpy_f32_block(const void *const *src, const float *a, int n,
                                                                 int64_t d0, float *out, int load, int stream,
                                                                 const int P) {
    __m512 acc[16];
    for (int j = 0; j < P; j++) acc[j] = load ? _mm512_loadu_ps(out + d0 + 16 * j) : _mm512_setzero_ps();
    for (int e = 0; e < n; e++) {
        const __m512 va = _mm512_set1_ps(a[e]);
        const float *h = (const float *)src[e] + d0;
        for (int j = 0; j < P; j++) acc[j] = _mm512_fmadd_ps(va, _mm512_loadu_ps(h + 16 * j), acc[j]);
    }
    for (int j = 0; j < P; j++) {
        if (stream)
            _mm512_stream_ps(out + d0 + 16 * j, acc[j]);
        else
            _mm512_storeu_ps(out + d0 + 16 * j, acc[j]);
    }
}

#define AXPY_CASES(FN, ...)       \
    case 1: FN(__VA_ARGS__, 1); break; \
    case 2: FN(__VA_ARGS__, 2); break; \
    case 3: FN(__VA_ARGS__, 3); break; \
    case 4: FN(__VA_ARGS__, 4); break; \
    case 5: FN(__VA_ARGS__, 5); break; \
    case 6: FN(__VA_ARGS__, 6); break; \
    case 7: FN(__VA_ARGS__, 7); break;
#else
/* out[d0 : d0 + 8P] (+)= sum_e a[e] * src[e][d0 : d0 + 8P], the P <= 8 accumulators in
 * registers; P and dtype are compile-time constants at every call site. */
static inline __attribute__((always_inline)) void axpy_v8_block(const void *const *src, const float *a, int n,
                                                                int64_t d0, float *out, int load, const int dtype,
                                                                const int P) {
    v8f acc[8];
    for (int j = 0; j < P; j++) acc[j] = load ? v8_load(out, DT_F32, d0 + 8 * j) : v8_set1(0.0f);
    for (int e = 0; e < n; e++) {
        const v8f va = v8_set1(a[e]);
        for (int j = 0; j < P; j++) acc[j] += va * v8_load(src[e], dtype, d0 + 8 * j);
    }
    for (int j = 0; j < P; j++) v8_store(out + d0 + 8 * j, acc[j]);
}

static inline __attribute__((always_inline)) void axpy_v8_row(const void *const *src, const float *a, int n,
                                                              int64_t D, float *out, int load, const int dtype) {
    int64_t d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) axpy_v8_block(src, a, n, d0, out, load, dtype, 8);
    for (; d0 + 8 <= D; d0 += 8) axpy_v8_block(src, a, n, d0, out, load, dtype, 1);
    for (; d0 < D; d0++) {
        float t = load ? out[d0] : 0.0f;
        for (int q = 0; q < n; q++) t += a[q] * load1(src[q], dtype, d0);
        out[d0] = t;
    }
}
#endif

/* out[0:D] (+)= sum over CSR entries e of row r: val_e * T[idx_e, 0:D], accumulated in fp32
 * in entry order. The entries go in chunks of GCHUNK whose table rows and values (zeros
 * skipped) are looked up once; each chunk then runs over D in blocks held in registers
 * (up to 256 outputs), with no masks except for a last D % 32 (bf16) / D % 16 (fp32).
 * (Software prefetch of the next rows measured slower: the table mostly sits in L2/L3 and
 * the extra instructions cost more than the misses.) */
static void row_gather_axpy(const spmm_ctx *c, int64_t r, float *out, int accumulate) {
    const int64_t D = c->D, e1 = c->off[r + 1];
    int64_t e = c->off[r];
    const void *src[GCHUNK];
    float a[GCHUNK];
    int first = 1;
    while (first || e < e1) {
        int n = 0;
        for (; e < e1 && n < GCHUNK; e++) {
            float v = c->val[c->perm ? c->perm[e] : e];
            if (v == 0.0f) continue;
            a[n] = v;
            src[n++] = trow(c, c->idx[e]);
        }
        const int load = accumulate || !first;
        first = 0;
        int64_t d0 = 0;
#ifdef SAE_AVX512
        /* the final values of a row nothing reads back soon: streaming stores (no read for
         * ownership, no eviction of the tables) */
        const int stream = c->stream_out && e >= e1 && ((uintptr_t)out & 63) == 0;
        if (c->tdtype == DT_BF16) {
            int64_t np = D / 32;
            for (; np >= 8; np -= 8, d0 += 256) axpy_bf16_block(src, a, n, d0, out, load, stream, 8);
            switch (np) { AXPY_CASES(axpy_bf16_block, src, a, n, d0, out, load, stream) default: break; }
            d0 += 32 * np;
        } else {
            int64_t nv = D / 16;
            for (; nv >= 16; nv -= 16, d0 += 256) axpy_f32_block(src, a, n, d0, out, load, stream, 16);
            if (nv >= 8) {
                axpy_f32_block(src, a, n, d0, out, load, stream, 8);
                nv -= 8;
                d0 += 128;
            }
            switch (nv) { AXPY_CASES(axpy_f32_block, src, a, n, d0, out, load, stream) default: break; }
            d0 += 16 * nv;
        }
        for (; d0 < D; d0 += 16) { /* the last < 32 (bf16) or < 16 (fp32) columns: masked */
            const __mmask16 m = tail_mask(D - d0);
            __m512 acc = load ? _mm512_maskz_loadu_ps(m, out + d0) : _mm512_setzero_ps();
            for (int q = 0; q < n; q++) acc = _mm512_fmadd_ps(_mm512_set1_ps(a[q]), load16(src[q], c->tdtype, d0, m), acc);
            _mm512_mask_storeu_ps(out + d0, m, acc);
        }
#else
        if (c->tdtype == DT_BF16)
            axpy_v8_row(src, a, n, D, out, load, DT_BF16);
        else
            axpy_v8_row(src, a, n, D, out, load, DT_F32);
        (void)d0;
#endif
    }
}

static inline void spmm_row(const spmm_ctx *c, int64_t r) {
    const int64_t D = c->D;
    {
        float *o = c->out + r * c->ldo;
        row_gather_axpy(c, r, o, c->accumulate);
        if (!c->bias) return;
        const float *t = c->target + r * D; /* the row is still in L1: bias and SSE are free */
        float sse = 0.0f;
        int64_t d = 0;
#ifdef SAE_AVX512
        __m512 acc = _mm512_setzero_ps();
        for (; d + 16 <= D; d += 16) {
            __m512 v = _mm512_add_ps(_mm512_loadu_ps(o + d), _mm512_loadu_ps(c->bias + d));
            _mm512_storeu_ps(o + d, v);
            __m512 diff = _mm512_sub_ps(v, _mm512_loadu_ps(t + d));
            acc = _mm512_fmadd_ps(diff, diff, acc);
        }
        sse = _mm512_reduce_add_ps(acc);
#else
        v8f acc = v8_set1(0.0f);
        for (; d + 8 <= D; d += 8) {
            v8f v = v8_load(o, DT_F32, d) + v8_load(c->bias, DT_F32, d);
            v8_store(o + d, v);
            v8f diff = v - v8_load(t, DT_F32, d);
            acc += diff * diff;
        }
        sse = v8_sum(acc);
#endif
        for (; d < D; d++) {
            o[d] += c->bias[d];
            sse += (o[d] - t[d]) * (o[d] - t[d]);
        }
        c->row_sse[r] = sse;
    }
}

static inline void row_val_sum(const spmm_ctx *c, int64_t r) {
    if (!c->val_sum) return;
    float t = 0.0f;
    for (int64_t e = c->off[r]; e < c->off[r + 1]; e++) t += c->val[c->perm ? c->perm[e] : e];
    c->val_sum[r] = t;
}

static void spmm_range(void *p, int64_t lo, int64_t hi, int tid) {
    (void)tid;
    for (int64_t r = lo; r < hi; r++) {
        spmm_row((const spmm_ctx *)p, r);
        row_val_sum((const spmm_ctx *)p, r);
    }
#ifdef SAE_AVX512
    _mm_sfence(); /* streaming stores are visible before the caller reads the result */
#endif
}

/* Rows r0 .. r0+15 accumulated in a [16, D] scratch block, written as columns of `out`
 * (one 64-byte line per output row), so a transposed result costs no extra pass. */
static void spmm_t_range(void *p, int64_t lo, int64_t hi, int tid) {
    spmm_ctx *c = (spmm_ctx *)p;
    const int64_t D = c->D;
    (void)tid;
    float *blk = (float *)aligned_alloc(64, ((sizeof(float) * 16 * D + 63) / 64) * 64);
    if (!blk) return;
    spmm_ctx gather = *c; /* rows into blk: plain stores, blk is read right back */
    gather.stream_out = 0;
    for (int64_t r0 = lo; r0 < hi; r0 += 16) {
        int64_t nr = hi - r0 < 16 ? hi - r0 : 16;
        for (int64_t j = 0; j < nr; j++) row_gather_axpy(&gather, r0 + j, blk + j * D, 0);
        for (int64_t r = r0; r < r0 + nr; r++) row_val_sum(c, r);
        int64_t d = 0;
#ifdef SAE_AVX512
        if (nr == 16) {
            __m512i vidx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32((int)D));
            const int stream = c->stream_out && ((uintptr_t)(c->out + r0) & 63) == 0 && (c->ldo & 15) == 0;
            for (; d < D; d++) {
                float *o = c->out + d * c->ldo + r0;
                __m512 v = _mm512_i32gather_ps(vidx, blk + d, 4);
                if (stream)
                    _mm512_stream_ps(o, v);
                else
                    _mm512_storeu_ps(o, c->accumulate ? _mm512_add_ps(v, _mm512_loadu_ps(o)) : v);
            }
        }
#endif
        for (; d < D; d++)
            for (int64_t j = 0; j < nr; j++) {
                float *o = c->out + d * c->ldo + r0 + j;
                *o = c->accumulate ? *o + blk[j * D + d] : blk[j * D + d];
            }
    }
    free(blk);
#ifdef SAE_AVX512
    _mm_sfence();
#endif
}

/* out[r, :] = sum_{e in row r} val[perm ? perm[e] : e] * T[idx[e], :] for r < R (CSR times
 * dense; T fp32 or bf16). With transpose_out, writes out[:, r] instead (out is [D, R] with
 * leading dim ldo); with accumulate, adds to out. val_sum (optional): each row's sum of
 * values. */
void sae_csr_spmm(int64_t R, const int64_t *off, const int64_t *idx, const float *val, const int64_t *perm,
                  const void *T, int tdtype, int64_t D, int64_t ldt, float *out, int64_t ldo, int transpose_out,
                  int accumulate, float *val_sum, int nthreads) {
    spmm_ctx c = {.off = off, .idx = idx, .perm = perm, .val = val, .T = T, .tdtype = tdtype, .D = D, .ldt = ldt,
                  .out = out, .ldo = ldo, .accumulate = accumulate, .val_sum = val_sum,
                  .stream_out = !accumulate && D % 16 == 0 && ldo % 16 == 0}; /* bias NULL: not a decode */
    if (transpose_out)
        run_by_nnz(spmm_t_range, &c, R, off, nthreads, 16);
    else
        run_by_nnz(spmm_range, &c, R, off, nthreads, 1);
}

/* The SAE decode: out[r] = sum_e val_e * T[idx_e] + bias (x_hat, [R, D] contiguous), and
 * row_sse[r] = ||out[r] - target[r]||^2 (the reconstruction error) in the same pass. */
void sae_csr_decode(int64_t R, const int64_t *off, const int64_t *idx, const float *val, const void *T, int tdtype,
                    int64_t D, const float *bias, const float *target, float *out, float *row_sse, int nthreads) {
    spmm_ctx c = {.off = off, .idx = idx, .val = val, .T = T, .tdtype = tdtype, .D = D, .ldt = D, .out = out,
                  .ldo = D, .bias = bias, .target = target, .row_sse = row_sse}; /* the rest zero */
    run_by_nnz(spmm_range, &c, R, off, nthreads, 1);
}

typedef struct {
    const int64_t *off, *idx;
    const float *G;
    const void *T;
    int tdtype;
    int64_t ldg, ldt, D;
    float *out;
    /* optional: the gradient used is G (or 0 if NULL) + s * (xh - x), written to gout
     * (dtype gdtype) with its column sums in col_g[tid * D + d] */
    const float *xh, *x;
    float s;
    void *gout;
    int gdtype;
    float *col_g;
} sddmm_ctx;

#define SD_GROUP 8 /* dot products per pass over g: 16 accumulators for bf16 */

#ifdef SAE_AVX512

/* s[q] = <g, t[q][0:D]> for SD_GROUP bf16 table rows: even/odd elements against gsplit (g
 * with each 32-block split into its 16 even and 16 odd elements), no shuffles in the loop. */
static inline void dots_bf16_group(const void *const *t, const float *gsplit, const float *g, int64_t D, float *s) {
    const __m512i hi16 = _mm512_set1_epi32((int)0xffff0000u);
    __m512 a[SD_GROUP], b[SD_GROUP];
    for (int q = 0; q < SD_GROUP; q++) a[q] = b[q] = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 32 <= D; d += 32) {
        __m512 ge = _mm512_loadu_ps(gsplit + d), go = _mm512_loadu_ps(gsplit + d + 16);
        SAE_IN_REG(ge);
        SAE_IN_REG(go);
        for (int q = 0; q < SD_GROUP; q++) {
            __m512i w = _mm512_loadu_si512((const uint16_t *)t[q] + d);
            SAE_IN_REG(w);
            a[q] = _mm512_fmadd_ps(ge, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), a[q]);
            b[q] = _mm512_fmadd_ps(go, _mm512_castsi512_ps(_mm512_and_si512(w, hi16)), b[q]);
        }
    }
    for (int q = 0; q < SD_GROUP; q++) a[q] = _mm512_add_ps(a[q], b[q]);
    for (; d < D; d += 16) {
        const __mmask16 m = tail_mask(D - d);
        const __m512 gv = _mm512_maskz_loadu_ps(m, g + d);
        for (int q = 0; q < SD_GROUP; q++) a[q] = _mm512_fmadd_ps(gv, load16(t[q], DT_BF16, d, m), a[q]);
    }
    for (int q = 0; q < SD_GROUP; q++) s[q] = _mm512_reduce_add_ps(a[q]);
}

static inline void dots_f32_group(const void *const *t, const float *g, int64_t D, float *s) {
    __m512 a[SD_GROUP];
    for (int q = 0; q < SD_GROUP; q++) a[q] = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
        __m512 gv = _mm512_loadu_ps(g + d);
        SAE_IN_REG(gv);
        for (int q = 0; q < SD_GROUP; q++) a[q] = _mm512_fmadd_ps(gv, _mm512_loadu_ps((const float *)t[q] + d), a[q]);
    }
    if (d < D) {
        const __mmask16 m = tail_mask(D - d);
        const __m512 gv = _mm512_maskz_loadu_ps(m, g + d);
        for (int q = 0; q < SD_GROUP; q++) a[q] = _mm512_fmadd_ps(gv, _mm512_maskz_loadu_ps(m, (const float *)t[q] + d), a[q]);
    }
    for (int q = 0; q < SD_GROUP; q++) s[q] = _mm512_reduce_add_ps(a[q]);
}
#endif

#ifndef SAE_AVX512
/* s[q] = <g, t[q][0:D]> for SD_GROUP table rows: SD_GROUP independent vector accumulators. */
static inline __attribute__((always_inline)) void dots_v8_group(const void *const *t, const float *g, int64_t D,
                                                                float *s, const int dtype) {
    v8f a[SD_GROUP];
    for (int q = 0; q < SD_GROUP; q++) a[q] = v8_set1(0.0f);
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
        const v8f gv = v8_load(g, DT_F32, d);
        for (int q = 0; q < SD_GROUP; q++) a[q] += gv * v8_load(t[q], dtype, d);
    }
    for (int q = 0; q < SD_GROUP; q++) s[q] = v8_sum(a[q]);
    for (; d < D; d++)
        for (int q = 0; q < SD_GROUP; q++) s[q] += g[d] * load1(t[q], dtype, d);
}
#endif

/* One row of the SDDMM: out[e] = <g, T[idx[e]]> for the entries of row r, with g = G[r] (+ s *
 * (xh[r] - x[r]) when xh is set), optionally written to gout and summed into cg. Four dot
 * products at a time: independent FMA chains, and each g vector loaded once. geff/gsplit:
 * scratch of D + 32 floats. */
static inline void sddmm_row(const sddmm_ctx *c, int64_t r, float *geff, float *gsplit, float *cg, const float *g_in) {
    const int64_t D = c->D, esz = c->tdtype == DT_F32 ? 4 : 2;
#ifdef SAE_AVX512
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#else
    (void)gsplit;
#endif
    const float *g = g_in ? g_in : c->G ? c->G + r * c->ldg : NULL;
    if (!g_in && c->xh) { /* g <- G + s * (x_hat - x): the MSE gradient joins here, no extra pass */
        const float *xh = c->xh + r * D, *x = c->x + r * D;
        int64_t d = 0;
#ifdef SAE_AVX512
        const __m512 vs = _mm512_set1_ps(c->s);
        for (; d + 16 <= D; d += 16) {
            __m512 v = _mm512_mul_ps(vs, _mm512_sub_ps(_mm512_loadu_ps(xh + d), _mm512_loadu_ps(x + d)));
            if (g) v = _mm512_add_ps(v, _mm512_loadu_ps(g + d));
            _mm512_storeu_ps(geff + d, v);
        }
#endif
        for (; d < D; d++) geff[d] = (g ? g[d] : 0.0f) + c->s * (xh[d] - x[d]);
        g = geff;
    }
    if (c->gout || cg) {
        int64_t d = 0;
#ifdef SAE_AVX512
        for (; d + 16 <= D; d += 16) {
            __m512 v = _mm512_loadu_ps(g + d);
            if (c->gout) st_get(c->gout, c->gdtype, r * D + d, v, 0xffff, 1);
            if (cg) _mm512_storeu_ps(cg + d, _mm512_add_ps(_mm512_loadu_ps(cg + d), v));
        }
#endif
        for (; d < D; d++) {
            if (c->gout) store1(c->gout, c->gdtype, r * D + d, g[d]);
            if (cg) cg[d] += g[d];
        }
    }
#ifdef SAE_AVX512
    if (c->tdtype == DT_BF16) /* per 32-block: the 16 even elements, then the 16 odd ones */
        for (int64_t d = 0; d + 32 <= D; d += 32) {
            __m512 lo16 = _mm512_loadu_ps(g + d), hi16v = _mm512_loadu_ps(g + d + 16);
            _mm512_storeu_ps(gsplit + d, _mm512_permutex2var_ps(lo16, even, hi16v));
            _mm512_storeu_ps(gsplit + d + 16, _mm512_permutex2var_ps(lo16, odd, hi16v));
        }
#endif
    for (int64_t e = c->off[r]; e < c->off[r + 1]; e += SD_GROUP) {
        int64_t n = c->off[r + 1] - e < SD_GROUP ? c->off[r + 1] - e : SD_GROUP;
        const void *t[SD_GROUP];
        for (int q = 0; q < SD_GROUP; q++) t[q] = (const char *)c->T + (size_t)(c->idx[e + (q < n ? q : 0)] * c->ldt) * esz;
        float s[SD_GROUP];
#ifdef SAE_AVX512
        if (c->tdtype == DT_BF16)
            dots_bf16_group(t, gsplit, g, D, s);
        else
            dots_f32_group(t, g, D, s);
#else
        if (c->tdtype == DT_BF16)
            dots_v8_group(t, g, D, s, DT_BF16);
        else
            dots_v8_group(t, g, D, s, DT_F32);
#endif
        for (int q = 0; q < n; q++) c->out[e + q] = s[q];
    }
}

static void sddmm_range(void *p, int64_t lo, int64_t hi, int tid) {
    sddmm_ctx *c = (sddmm_ctx *)p;
    const int64_t D = c->D;
    float *geff = (float *)malloc(sizeof(float) * (D + 32));
    float *gsplit = (float *)malloc(sizeof(float) * (D + 32));
    if (geff && gsplit)
        for (int64_t r = lo; r < hi; r++) sddmm_row(c, r, geff, gsplit, c->col_g ? c->col_g + (int64_t)tid * D : NULL, NULL);
    free(gsplit);
    free(geff);
}

/* The decode's backward w.r.t. the latents with the MSE gradient folded in: the gradient of
 * x_hat is g = G + s * (xh - x) (G may be NULL, else rows ldg floats apart; s = 2 dL/dmse / B); writes g to gout (dtype
 * gdtype, the table of the W_dec gradient), its per-thread column sums to col_g [nthreads,
 * D] (the b_dec gradient through x_hat), and out[e] = <g[r], T[idx[e]]>. */
void sae_decode_backward(int64_t R, const int64_t *off, const int64_t *idx, const float *G, int64_t ldg,
                         const float *xh, const float *x, float s, const void *T, int tdtype, int64_t D, float *out,
                         void *gout, int gdtype, float *col_g, int nthreads) {
    sddmm_ctx c = {.off = off, .idx = idx, .G = G, .T = T, .tdtype = tdtype, .ldg = ldg, .ldt = D, .D = D, .out = out,
                   .xh = xh, .x = x, .s = s, .gout = gout, .gdtype = gdtype, .col_g = col_g};
    run_by_nnz(sddmm_range, &c, R, off, nthreads, 1);
}

/* The training decode: sae_csr_decode plus, while the token's table rows are still in cache,
 * everything the backward needs from the residual res = x_hat - target (the MSE gradient is
 * s * res, s = 2 dL/dmse / B, known only in the backward, which just scales these):
 * dots[e] = <res[r], T[idx[e]]>, res in rdtype (rout: the table of the W_dec gradient) and its
 * per-thread column sums col [nthreads, D]. Saves the backward a second gather of the table. */
typedef struct {
    spmm_ctx sp;
    sddmm_ctx sd;
} dtrain_ctx;

static void decode_train_range(void *p, int64_t lo, int64_t hi, int tid) {
    dtrain_ctx *c = (dtrain_ctx *)p;
    const spmm_ctx *sp = &c->sp;
    const int64_t D = sp->D;
    float *xrow = (float *)aligned_alloc(64, sizeof(float) * (size_t)((D + 31) / 16 * 16));
    float *res = (float *)malloc(sizeof(float) * (D + 32));
    float *gsplit = (float *)malloc(sizeof(float) * (D + 32));
    if (xrow && res && gsplit)
        for (int64_t r = lo; r < hi; r++) {
            row_gather_axpy(sp, r, xrow, 0); /* x_hat - bias, in L1 */
            float *o = sp->out + r * D;
            const float *t = sp->target + r * D;
            float sse = 0.0f;
            int64_t d = 0;
#ifdef SAE_AVX512
            /* x_hat goes out with streaming stores (nothing here reads it again): no read
             * for ownership, and it does not push the table out of the cache */
            const int stream = D % 16 == 0 && ((uintptr_t)o & 63) == 0;
            __m512 acc = _mm512_setzero_ps();
            for (; d + 16 <= D; d += 16) {
                __m512 v = _mm512_add_ps(_mm512_load_ps(xrow + d), _mm512_loadu_ps(sp->bias + d));
                if (stream)
                    _mm512_stream_ps(o + d, v);
                else
                    _mm512_storeu_ps(o + d, v);
                __m512 diff = _mm512_sub_ps(v, _mm512_loadu_ps(t + d));
                _mm512_storeu_ps(res + d, diff);
                acc = _mm512_fmadd_ps(diff, diff, acc);
            }
            sse = _mm512_reduce_add_ps(acc);
#else
            v8f acc = v8_set1(0.0f);
            for (; d + 8 <= D; d += 8) {
                v8f v = v8_load(xrow, DT_F32, d) + v8_load(sp->bias, DT_F32, d);
                v8_store(o + d, v);
                v8f diff = v - v8_load(t, DT_F32, d);
                v8_store(res + d, diff);
                acc += diff * diff;
            }
            sse = v8_sum(acc);
#endif
            for (; d < D; d++) {
                float v = xrow[d] + sp->bias[d];
                o[d] = v;
                res[d] = v - t[d];
                sse += res[d] * res[d];
            }
            sp->row_sse[r] = sse;
            sddmm_row(&c->sd, r, NULL, gsplit, c->sd.col_g + (int64_t)tid * D, res);
        }
#ifdef SAE_AVX512
    _mm_sfence(); /* the streaming stores are visible before the caller reads x_hat */
#endif
    free(gsplit);
    free(res);
    free(xrow);
}

void sae_decode_train(int64_t R, const int64_t *off, const int64_t *idx, const float *val, const void *T, int tdtype,
                      int64_t D, const float *bias, const float *target, float *out, float *row_sse, float *dots,
                      void *rout, int rdtype, float *col, int nthreads) {
    /* only the fields decode_train_range reads: it hands the helpers the output row, accumulate
     * = 0 and g = the residual itself (no ldo/accumulate, no G/ldg/xh/x/s) */
    dtrain_ctx c = {.sp = {.off = off, .idx = idx, .val = val, .T = T, .tdtype = tdtype, .D = D, .ldt = D,
                           .out = out, .bias = bias, .target = target, .row_sse = row_sse},
                    .sd = {.off = off, .idx = idx, .T = T, .tdtype = tdtype, .ldt = D, .D = D, .out = dots,
                           .gout = rout, .gdtype = rdtype, .col_g = col}};
    run_by_nnz(decode_train_range, &c, R, off, nthreads, 1);
}

/* CSR [R, C] -> CSC: coff[C+1], crow[nnz] (rows ascending within a column), perm[nnz]
 * (position of each CSC entry in the CSR arrays). Counting sort, O(nnz + nthreads * C), in
 * parallel: each thread counts the columns of its rows (cnt [nthreads, C] scratch), the
 * offsets are summed, then each thread places its rows' entries at its own cursors (threads
 * hold ascending row ranges, so rows stay ascending within a column). */
typedef struct {
    int64_t C;
    const int64_t *off, *idx;
    int64_t *cnt, *crow, *perm;
    int phase;
} transpose_ctx;

static void transpose_range(void *p, int64_t lo, int64_t hi, int tid) {
    transpose_ctx *c = (transpose_ctx *)p;
    int64_t *cur = c->cnt + (int64_t)tid * c->C;
    if (c->phase == 0) {
        memset(cur, 0, sizeof(int64_t) * c->C);
        for (int64_t e = c->off[lo]; e < c->off[hi]; e++) cur[c->idx[e]]++;
        return;
    }
    for (int64_t r = lo; r < hi; r++)
        for (int64_t e = c->off[r]; e < c->off[r + 1]; e++) {
            int64_t q = cur[c->idx[e]]++;
            c->crow[q] = r;
            c->perm[q] = e;
        }
}

void sae_csr_transpose(int64_t R, int64_t C, const int64_t *off, const int64_t *idx, int64_t *coff, int64_t *crow,
                       int64_t *perm, int64_t *cnt, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 256) nthreads = 256;
    int64_t cuts[257];
    int64_t total = off[R] - off[0];
    cuts[0] = 0;
    for (int t = 1, r = 0; t <= nthreads; t++) { /* the same nnz-balanced split for both phases */
        int64_t target = off[0] + total * t / nthreads;
        while (r < R && off[r] < target) r++;
        cuts[t] = t == nthreads ? R : r;
    }
    transpose_ctx c = {C, off, idx, cnt, crow, perm, 0};
    run_cuts(transpose_range, &c, cuts, nthreads);
    coff[0] = 0;
    for (int64_t j = 0; j < C; j++) {
        int64_t start = coff[j];
        for (int t = 0; t < nthreads; t++) { /* counts -> this thread's first slot in column j */
            int64_t n = c.cnt[(int64_t)t * C + j];
            c.cnt[(int64_t)t * C + j] = start;
            start += n;
        }
        coff[j + 1] = start;
    }
    c.phase = 1;
    run_cuts(transpose_range, &c, cuts, nthreads);
}

/* out = (x - bias) in dtype (x [B, D] fp32, bias [D]): the encoder's input, in one pass
 * (torch: a subtraction, then a cast). Rounds as torch's cast does (to nearest even). */
typedef struct {
    const float *x, *bias;
    void *out;
    int dtype;
    int64_t D;
} center_ctx;

static void center_range(void *p, int64_t lo, int64_t hi, int tid) {
    (void)tid;
    center_ctx *c = (center_ctx *)p;
    const int64_t D = c->D;
    for (int64_t r = lo; r < hi; r++) {
        const float *x = c->x + r * D;
        int64_t d = 0;
#ifdef SAE_AVX512
        for (; d + 16 <= D; d += 16)
            st_get(c->out, c->dtype, r * D + d, _mm512_sub_ps(_mm512_loadu_ps(x + d), _mm512_loadu_ps(c->bias + d)), 0xffff, 1);
#endif
        for (; d < D; d++) store1(c->out, c->dtype, r * D + d, x[d] - c->bias[d]);
    }
}

void sae_center_cast(const float *x, const float *bias, void *out, int dtype, int64_t B, int64_t D, int nthreads) {
    center_ctx c = {x, bias, out, dtype, D};
    run_even(center_range, &c, B, nthreads, 1);
}

/* AuxK's residual: out = (ehat - x) + xh (ehat [B, D] in dtype, x/xh fp32; out in dtype),
 * the difference between the dead latents' reconstruction of the residual x - xh and that
 * residual, with its squared norm (of the fp32 values, before out's rounding) summed per
 * thread into partial[nthreads]. One pass instead of four. */
typedef struct {
    const void *ehat;
    const float *x, *xh;
    void *out;
    int dtype;
    int64_t D;
    double *partial;
} resid_ctx;

static void resid_range(void *p, int64_t lo, int64_t hi, int tid) {
    resid_ctx *c = (resid_ctx *)p;
    const int64_t D = c->D;
    double total = 0.0;
    for (int64_t r = lo; r < hi; r++) {
        const float *x = c->x + r * D, *xh = c->xh + r * D;
        float ss = 0.0f;
        int64_t d = 0;
#ifdef SAE_AVX512
        __m512 acc = _mm512_setzero_ps();
        for (; d + 16 <= D; d += 16) {
            __m512 v = _mm512_add_ps(_mm512_sub_ps(load16u(c->ehat, c->dtype, r * D + d), _mm512_loadu_ps(x + d)),
                                     _mm512_loadu_ps(xh + d));
            acc = _mm512_fmadd_ps(v, v, acc);
            st_get(c->out, c->dtype, r * D + d, v, 0xffff, 1);
        }
        ss = _mm512_reduce_add_ps(acc);
#endif
        for (; d < D; d++) {
            float v = (load1(c->ehat, c->dtype, r * D + d) - x[d]) + xh[d];
            ss += v * v;
            store1(c->out, c->dtype, r * D + d, v);
        }
        total += ss;
    }
    c->partial[tid] = total;
}

void sae_auxk_residual(const void *ehat, const float *x, const float *xh, void *out, int dtype, int64_t B, int64_t D,
                       double *partial, int nthreads) {
    resid_ctx c = {ehat, x, xh, out, dtype, D, partial};
    for (int t = 0; t < nthreads; t++) partial[t] = 0.0;
    run_even(resid_range, &c, B, nthreads, 1);
}

/* out = x * scale (fp32, [B, D]) and, in the same pass, the per-thread sum of squares of out
 * (partial[nthreads]) and column sums (colsum[nthreads, D]), both in double: the trainer's
 * normalised batch and its variance (the FVU denominator). */
typedef struct {
    const float *x;
    float *out;
    float scale;
    int64_t D;
    double *partial, *colsum;
    float *scratch;
} moments_ctx;

static void moments_range(void *p, int64_t lo, int64_t hi, int tid) {
    moments_ctx *c = (moments_ctx *)p;
    const int64_t D = c->D;
    double *cs = c->colsum + (int64_t)tid * D;
    float *rowacc = c->scratch + (int64_t)tid * D; /* fp32 column sums of a block of rows, zeroed */
    double total = 0.0;
    int64_t in_block = 0;
    for (int64_t r = lo; r < hi; r++) {
        const float *x = c->x + r * D;
        float *o = c->out + r * D;
        float ss = 0.0f;
        int64_t d = 0;
#ifdef SAE_AVX512
        const __m512 vs = _mm512_set1_ps(c->scale);
        __m512 acc = _mm512_setzero_ps();
        for (; d + 16 <= D; d += 16) {
            __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + d), vs);
            _mm512_storeu_ps(o + d, v);
            acc = _mm512_fmadd_ps(v, v, acc);
            _mm512_storeu_ps(rowacc + d, _mm512_add_ps(_mm512_loadu_ps(rowacc + d), v));
        }
        ss = _mm512_reduce_add_ps(acc);
#endif
        for (; d < D; d++) {
            float v = x[d] * c->scale;
            o[d] = v;
            ss += v * v;
            rowacc[d] += v;
        }
        total += ss;
        if (++in_block == 64 || r + 1 == hi) { /* fold into double every 64 rows */
            for (d = 0; d < D; d++) {
                cs[d] += rowacc[d];
                rowacc[d] = 0.0f;
            }
            in_block = 0;
        }
    }
    c->partial[tid] = total;
}

void sae_scale_moments(const float *x, float scale, float *out, int64_t B, int64_t D, double *partial,
                       double *colsum, float *scratch, int nthreads) {
    moments_ctx c = {x, out, scale, D, partial, colsum, scratch};
    memset(colsum, 0, sizeof(double) * (size_t)nthreads * (size_t)D);
    memset(scratch, 0, sizeof(float) * (size_t)nthreads * (size_t)D);
    for (int t = 0; t < nthreads; t++) partial[t] = 0.0;
    run_even(moments_range, &c, B, nthreads, 1);
}

/* ------------------------------------------------------------------ dense activations */

typedef struct {
    void *z;
    void *out;
    int dtype;
    int64_t N;
    const float *bias, *thr, *colw;
    float *row_wsum, *row_cnt;
    int32_t *col_cnt; /* [nthreads, N] */
    /* backward */
    const void *ref;
    const float *row_g;
    float eps;
    float *col_g, *col_w, *col_wg, *col_wr; /* [nthreads, N] each, may be NULL */
} act_ctx;

/* f = relu(z + bias) (thr == NULL) or (z + bias) * [z + bias > thr] (JumpReLU), written to
 * out (may alias z). Per row: sum_i colw_i * f_i (colw NULL: 1) and the count of f_i != 0;
 * per column (this thread's slice): how many rows fired. */
#ifdef SAE_AVX512
/* one 16-lane step of act_fwd; returns the nonzero mask, accumulates colw*f into *wacc */
static inline __mmask16 act_fwd_step(const act_ctx *c, const char *zr, char *fr, int32_t *cc, int64_t i,
                                     __mmask16 tm, int full, __m512 *wacc) {
    __m512 v = _mm512_add_ps(ld(zr, c->dtype, i, tm, full), ldf(c->bias + i, tm, full));
    __m512 f;
    if (c->thr) /* NLE_UQ: v > thr, or NaN (kept, so a broken encoder shows in the loss) */
        f = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, ldf(c->thr + i, tm, full), _CMP_NLE_UQ), v);
    else
        f = _mm512_max_ps(_mm512_setzero_ps(), v); /* max(0, NaN) = NaN */
    f = st_get(fr, c->dtype, i, f, tm, full); /* statistics of what was stored */
    __mmask16 on = _mm512_mask_cmp_ps_mask(tm, f, _mm512_setzero_ps(), _CMP_NEQ_UQ);
    __m512i ci = full ? _mm512_loadu_si512(cc + i) : _mm512_maskz_loadu_epi32(tm, cc + i);
    ci = _mm512_mask_add_epi32(ci, on, ci, _mm512_set1_epi32(1));
    if (full)
        _mm512_storeu_si512(cc + i, ci);
    else
        _mm512_mask_storeu_epi32(cc + i, tm, ci);
    *wacc = c->colw ? _mm512_fmadd_ps(f, ldf(c->colw + i, tm, full), *wacc) : _mm512_add_ps(f, *wacc);
    return on;
}
#endif

/* f = relu(z + bias) (thr == NULL) or (z + bias) * [z + bias > thr] (JumpReLU), written to
 * out (may alias z). Per row: sum_i colw_i * f_i (colw NULL: 1) and the count of f_i != 0;
 * per column (this thread's slice): how many rows fired. */
static void act_fwd_range(void *p, int64_t lo, int64_t hi, int tid) {
    act_ctx *c = (act_ctx *)p;
    const int64_t N = c->N, esz = c->dtype == DT_F32 ? 4 : 2;
    int32_t *cc = c->col_cnt + (int64_t)tid * N;
    for (int64_t r = lo; r < hi; r++) {
        const char *zr = (const char *)c->z + (size_t)(r * N) * esz;
        char *fr = (char *)c->out + (size_t)(r * N) * esz;
        float ws = 0.0f;
        int64_t cnt = 0, i = 0;
#ifdef SAE_AVX512
        __m512 wacc = _mm512_setzero_ps();
        for (; i + 16 <= N; i += 16) cnt += __builtin_popcount(act_fwd_step(c, zr, fr, cc, i, 0xffff, 1, &wacc));
        if (i < N) cnt += __builtin_popcount(act_fwd_step(c, zr, fr, cc, i, tail_mask(N - i), 0, &wacc));
        i = N;
        ws = _mm512_reduce_add_ps(wacc);
#else
        const act_ctx cl = *c; /* a local copy: the stores below cannot alias its fields */
        v8f wacc = v8_set1(0.0f);
        v8i on_count = {0};
        for (; i + 8 <= N; i += 8) {
            v8f v = v8_load(zr, cl.dtype, i) + v8_load(cl.bias, DT_F32, i);
            v8f f = v8_and(v, ~(v <= (cl.thr ? v8_load(cl.thr, DT_F32, i) : v8_set1(0.0f)))); /* v > thr, or NaN */
            f = v8_store_get(fr, cl.dtype, i, f); /* statistics of what was stored */
            v8i on = f != v8_set1(0.0f), col;
            memcpy(&col, cc + i, sizeof col);
            col -= on; /* on is -1 where set */
            memcpy(cc + i, &col, sizeof col);
            on_count -= on;
            wacc += cl.colw ? f * v8_load(cl.colw, DT_F32, i) : f;
        }
        ws = v8_sum(wacc);
        for (int l = 0; l < 8; l++) cnt += on_count[l];
#endif
        for (; i < N; i++) {
            float v = load1(zr, c->dtype, i) + c->bias[i];
            float f = (c->thr ? v > c->thr[i] : v > 0.0f) || v != v ? v : 0.0f;
            store1(fr, c->dtype, i, f);
            f = load1(fr, c->dtype, i);
            if (f != 0.0f) {
                cnt++;
                cc[i]++;
            }
            ws += (c->colw ? c->colw[i] : 1.0f) * f;
        }
        if (c->row_wsum) c->row_wsum[r] = ws;
        c->row_cnt[r] = (float)cnt;
    }
}

void sae_act_fwd(void *z, void *out, int dtype, int64_t B, int64_t N, const float *bias, const float *thr,
                 const float *colw, float *row_wsum, float *row_cnt, int32_t *col_cnt, int nthreads) {
    act_ctx c = {.z = z, .out = out, .dtype = dtype, .N = N, .bias = bias, .thr = thr, .colw = colw,
                 .row_wsum = row_wsum, .row_cnt = row_cnt, .col_cnt = col_cnt}; /* the rest zero */
    run_even(act_fwd_range, &c, B, nthreads, 1);
}

/* Backward of act_fwd, in place on g (the gradient w.r.t. f, same dtype as ref):
 *   ReLU (thr NULL, ref = f):   g <- (g + row_g[r] * colw_i) * [f > 0]
 *   JumpReLU (ref = z, before bias):  v = z + bias;  g <- g * [v > thr]
 * row_g[r] is the gradient w.r.t. the per-row output of act_fwd (row_wsum for ReLU; for
 * JumpReLU the L0 count, whose only gradient is the threshold's pseudo-derivative).
 * Per column (this thread's slice, NULL = skip):
 *   col_g  += g_out                      (bias gradient)
 *   col_w  += row_g[r] * f               (ReLU: gradient w.r.t. colw)
 *   col_wg += K * g_in,  col_wr += K * row_g[r]   (JumpReLU; K = [|v - thr| < eps/2])  */
#ifdef SAE_AVX512
static inline void act_bwd_step(const act_ctx *c, const char *fr, char *gr, int64_t i, __mmask16 tm, int full,
                                __m512 vrg, float *cg, float *cw, float *cwg, float *cwr) {
    const __m512 zero = _mm512_setzero_ps();
    __m512 f = ld(fr, c->dtype, i, tm, full);
    __m512 g = ld(gr, c->dtype, i, tm, full);
    __m512 go;
    if (c->thr) {
        __m512 v = _mm512_add_ps(f, ldf(c->bias + i, tm, full));
        __m512 th = ldf(c->thr + i, tm, full);
        go = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, th, _CMP_GT_OQ), g);
        __mmask16 win = _mm512_mask_cmp_ps_mask(tm, _mm512_abs_ps(_mm512_sub_ps(v, th)), _mm512_set1_ps(0.5f * c->eps), _CMP_LT_OQ);
        if (win) {
            if (cwg) _mm512_mask_storeu_ps(cwg + i, win, _mm512_add_ps(_mm512_maskz_loadu_ps(win, cwg + i), g));
            if (cwr) _mm512_mask_storeu_ps(cwr + i, win, _mm512_add_ps(_mm512_maskz_loadu_ps(win, cwr + i), vrg));
        }
    } else {
        __m512 gi = c->colw ? _mm512_fmadd_ps(vrg, ldf(c->colw + i, tm, full), g) : _mm512_add_ps(g, vrg);
        go = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(f, zero, _CMP_GT_OQ), gi);
        if (cw) stf(cw + i, _mm512_fmadd_ps(vrg, f, ldf(cw + i, tm, full)), tm, full);
    }
    go = st_get(gr, c->dtype, i, go, tm, full); /* sum what the GEMM sees */
    if (cg) stf(cg + i, _mm512_add_ps(go, ldf(cg + i, tm, full)), tm, full);
}
#endif

static void act_bwd_range(void *p, int64_t lo, int64_t hi, int tid) {
    act_ctx *c = (act_ctx *)p;
    const int64_t N = c->N, esz = c->dtype == DT_F32 ? 4 : 2;
    float *cg = c->col_g ? c->col_g + (int64_t)tid * N : NULL;
    float *cw = c->col_w ? c->col_w + (int64_t)tid * N : NULL;
    float *cwg = c->col_wg ? c->col_wg + (int64_t)tid * N : NULL;
    float *cwr = c->col_wr ? c->col_wr + (int64_t)tid * N : NULL;
    const float half = 0.5f * c->eps;
    for (int64_t r = lo; r < hi; r++) {
        const char *fr = (const char *)c->ref + (size_t)(r * N) * esz;
        char *gr = (char *)c->z + (size_t)(r * N) * esz;
        const float rg = c->row_g ? c->row_g[r] : 0.0f;
        int64_t i = 0;
#ifdef SAE_AVX512
        const __m512 vrg = _mm512_set1_ps(rg);
        for (; i + 16 <= N; i += 16) act_bwd_step(c, fr, gr, i, 0xffff, 1, vrg, cg, cw, cwg, cwr);
        if (i < N) act_bwd_step(c, fr, gr, i, tail_mask(N - i), 0, vrg, cg, cw, cwg, cwr);
        i = N;
#else
        const act_ctx cl = *c; /* a local copy: the stores below cannot alias its fields */
        const v8f vrg = v8_set1(rg), vhalf = v8_set1(half);
        for (; i + 8 <= N; i += 8) {
            v8f f = v8_load(fr, cl.dtype, i), g = v8_load(gr, cl.dtype, i), go;
            if (cl.thr) {
                v8f v = f + v8_load(cl.bias, DT_F32, i), th = v8_load(cl.thr, DT_F32, i);
                go = v8_and(g, v > th);
                v8i win = (v8f)((v8i)(v - th) & 0x7fffffff) < vhalf; /* |v - thr| < eps / 2 */
                if (v8_any(win)) {
                    if (cwg) v8_store(cwg + i, v8_load(cwg, DT_F32, i) + v8_and(g, win));
                    if (cwr) v8_store(cwr + i, v8_load(cwr, DT_F32, i) + v8_and(vrg, win));
                }
            } else {
                v8f gi = g + vrg * (cl.colw ? v8_load(cl.colw, DT_F32, i) : v8_set1(1.0f));
                go = v8_and(gi, f > v8_set1(0.0f));
                if (cw) v8_store(cw + i, vrg * f + v8_load(cw, DT_F32, i));
            }
            go = v8_store_get(gr, cl.dtype, i, go); /* sum what the GEMM sees */
            if (cg) v8_store(cg + i, v8_load(cg, DT_F32, i) + go);
        }
#endif
        for (; i < N; i++) {
            float f = load1(fr, c->dtype, i), g = load1(gr, c->dtype, i), go;
            if (c->thr) {
                float v = f + c->bias[i];
                go = v > c->thr[i] ? g : 0.0f;
                if (fabsf(v - c->thr[i]) < half) {
                    if (cwg) cwg[i] += g;
                    if (cwr) cwr[i] += rg;
                }
            } else {
                float gi = g + rg * (c->colw ? c->colw[i] : 1.0f);
                go = f > 0.0f ? gi : 0.0f;
                if (cw) cw[i] += rg * f;
            }
            store1(gr, c->dtype, i, go);
            if (cg) cg[i] += load1(gr, c->dtype, i);
        }
    }
}

void sae_act_bwd(void *g, const void *ref, int dtype, int64_t B, int64_t N, const float *bias, const float *thr,
                 float eps, const float *row_g, const float *colw, float *col_g, float *col_w, float *col_wg,
                 float *col_wr, int nthreads) {
    act_ctx c = {.z = g, .ref = ref, .dtype = dtype, .N = N, .bias = bias, .thr = thr, .eps = eps,
                 .row_g = row_g, .colw = colw, .col_g = col_g, .col_w = col_w, .col_wg = col_wg,
                 .col_wr = col_wr}; /* the rest zero */
    run_even(act_bwd_range, &c, B, nthreads, 1);
}

/* ------------------------------------------------------------------ optimizer step */

/* The optimizer step of a [R, D] parameter in two passes, for the trainer's fused update
 * (sae_train/train/update.py; its twin is project_grads_ + clip_grad_norm_ + Adam.step +
 * constrain_, four to six passes over every W-sized tensor).
 *
 * Pass 1 (only the global gradient norm for clipping needs it): per row, with w given, the
 * projection coefficient coef_r = <g_r, w_r> / max(<w_r, w_r>, 1e-12) (the component of the
 * gradient along the unit-norm decoder row) and the squared norm of g_r - coef_r w_r; without
 * w, the squared norm of g_r. Per-thread sums of the squared norms go to partial[nthreads]. */
typedef struct {
    int64_t D;
    const float *g, *w;
    float *coef;
    double *partial;
} sqnorm_ctx;

static inline float dot_f32(const float *a, const float *b, int64_t D) {
    int64_t d = 0;
    float s = 0.0f;
#ifdef SAE_AVX512
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    for (; d + 32 <= D; d += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d + 16), _mm512_loadu_ps(b + d + 16), a1);
    }
    for (; d < D; d += 16) {
        __mmask16 m = tail_mask(D - d);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + d), _mm512_maskz_loadu_ps(m, b + d), a0);
    }
    s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#else
    v8f a0 = v8_set1(0.0f), a1 = a0;
    for (; d + 16 <= D; d += 16) {
        a0 += v8_load(a, DT_F32, d) * v8_load(b, DT_F32, d);
        a1 += v8_load(a, DT_F32, d + 8) * v8_load(b, DT_F32, d + 8);
    }
    s = v8_sum(a0 + a1);
#endif
    for (; d < D; d++) s += a[d] * b[d];
    return s;
}

static void sqnorm_range(void *p, int64_t lo, int64_t hi, int tid) {
    sqnorm_ctx *c = (sqnorm_ctx *)p;
    const int64_t D = c->D;
    double total = 0.0;
    for (int64_t r = lo; r < hi; r++) {
        const float *g = c->g + r * D;
        if (!c->w) {
            total += dot_f32(g, g, D);
            continue;
        }
        const float *w = c->w + r * D;
        float ww = dot_f32(w, w, D);
        float k = dot_f32(g, w, D) / (ww > 1e-12f ? ww : 1e-12f);
        c->coef[r] = k;
        float s = 0.0f; /* ||g - k w||^2, the row still in L1 */
        int64_t d = 0;
#ifdef SAE_AVX512
        const __m512 vk = _mm512_set1_ps(-k);
        __m512 acc = _mm512_setzero_ps();
        for (; d < D; d += 16) {
            __mmask16 m = tail_mask(D - d);
            __m512 e = _mm512_fmadd_ps(vk, _mm512_maskz_loadu_ps(m, w + d), _mm512_maskz_loadu_ps(m, g + d));
            acc = _mm512_fmadd_ps(e, e, acc);
        }
        s = _mm512_reduce_add_ps(acc);
#else
        const v8f vk = v8_set1(-k);
        v8f acc = v8_set1(0.0f);
        for (; d + 8 <= D; d += 8) {
            v8f e = vk * v8_load(w, DT_F32, d) + v8_load(g, DT_F32, d);
            acc += e * e;
        }
        s = v8_sum(acc);
#endif
        for (; d < D; d++) {
            float e = fmaf(-k, w[d], g[d]);
            s += e * e;
        }
        total += s;
    }
    c->partial[tid] = total;
}

void sae_rows_sqnorm(int64_t R, int64_t D, const float *g, const float *w, float *coef, double *partial, int nthreads) {
    sqnorm_ctx c = {D, g, w, coef, partial};
    for (int t = 0; t < nthreads; t++) partial[t] = 0.0;
    run_even(sqnorm_range, &c, R, nthreads, 1);
}

/* Pass 2: Adam on each row, as torch's fused CPU Adam computes it (fp32, amsgrad/maximize/
 * weight decay off), on the gradient g' = clip * (g_r - coef_r p_r) (coef NULL: no
 * projection), then optionally the row renormalised to unit norm (the decoder constraint)
 * and the result also stored rounded to bf16 in `shadow` (the GEMM copy for the next
 * forward; NULL: none). Constants come from the caller exactly as torch forms them:
 * lerp_w = 1 - beta1, sq_w = 1 - beta2, neg_step = -lr / (1 - beta1^t), bc2_sqrt =
 * sqrt(1 - beta2^t). Reads p, g, m, v once and writes p, m, v (and shadow) once. */
typedef struct {
    int64_t R, D;
    float *p;
    const float *g;
    float *m, *v;
    const float *coef;
    float clip, neg_step, lerp_w, beta2, sq_w, bc2_sqrt, eps;
    int normalize;
    uint16_t *shadow;
} adam_ctx;

#ifdef SAE_AVX512
/* one 16-lane step of adam_range; returns the new parameter values (stored in out) */
static inline __attribute__((always_inline)) __m512 adam_step16(const adam_ctx *c, float *pr, const float *gr, float *mr,
                                                                 float *vr, float *out, float k, int small, float lw,
                                                                 __mmask16 mk, int full) {
    __m512 pv = ldf(pr, mk, full);
    __m512 g = ldf(gr, mk, full);
    if (c->coef) g = _mm512_fmadd_ps(_mm512_set1_ps(-k), pv, g);
    g = _mm512_mul_ps(g, _mm512_set1_ps(c->clip));
    __m512 mv = ldf(mr, mk, full);
    mv = _mm512_fmadd_ps(_mm512_set1_ps(lw), _mm512_sub_ps(g, mv), small ? mv : g);
    __m512 vv = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(c->sq_w), g), g,
                                _mm512_mul_ps(ldf(vr, mk, full), _mm512_set1_ps(c->beta2)));
    __m512 den = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vv), _mm512_set1_ps(c->bc2_sqrt)), _mm512_set1_ps(c->eps));
    pv = _mm512_add_ps(pv, _mm512_div_ps(_mm512_mul_ps(_mm512_set1_ps(c->neg_step), mv), den));
    stf(mr, mv, mk, full);
    stf(vr, vv, mk, full);
    stf(out, pv, mk, full);
    return pv;
}
#endif

/* One element of adam_range; returns the new parameter value. exact_tail: torch's scalar
 * loop (the last numel % 16 elements) rounds (sq_w * g) * g before adding it, no FMA. */
static inline __attribute__((always_inline)) float adam1(const adam_ctx *c, float pv, float g, float *m, float *v,
                                                         float k, int small, float lw, const int exact_tail) {
    if (c->coef) g = fmaf(-k, pv, g);
    g *= c->clip;
    float mv = fmaf(lw, g - *m, small ? *m : g);
    float vb = *v * c->beta2, t = (c->sq_w * g) * g;
    if (exact_tail) SAE_ROUNDED(t);
    float vv = vb + t;
    *m = mv;
    *v = vv;
    return pv + (c->neg_step * mv) / (sqrtf(vv) / c->bc2_sqrt + c->eps);
}

static void adam_range(void *p, int64_t lo, int64_t hi, int tid) {
    (void)tid;
    adam_ctx *c = (adam_ctx *)p;
    const int64_t D = c->D;
    float *row = c->normalize ? (float *)malloc(sizeof(float) * (D + 16)) : NULL;
    if (c->normalize && !row) return;
    /* exp_avg.lerp_(grad, w) as torch computes it: fma(w, g - m, m) for |w| < 0.5, else
     * fma(w - 1, g - m, g) */
    const int small = fabsf(c->lerp_w) < 0.5f;
    const float lw = small ? c->lerp_w : c->lerp_w - 1.0f;
    for (int64_t r = lo; r < hi; r++) {
        float *pr = c->p + r * D, *mr = c->m + r * D, *vr = c->v + r * D;
        const float *gr = c->g + r * D;
        const float k = c->coef ? c->coef[r] : 0.0f;
        float *out = c->normalize ? row : pr; /* normalised rows are staged, then divided */
        float ss = 0.0f;
        int64_t d = 0;
        /* torch runs its vector code on whole 16-float lines of the flattened tensor and a
         * scalar loop (no FMA in the second moment) on the last numel % 16 elements: so do we */
        const int64_t vec_end = r == c->R - 1 ? D - (c->R * D) % 16 : D;
#ifdef SAE_AVX512
        __m512 acc = _mm512_setzero_ps();
        for (; d + 16 <= vec_end; d += 16) {
            __m512 pv = adam_step16(c, pr + d, gr + d, mr + d, vr + d, out + d, k, small, lw, 0xffff, 1);
            acc = _mm512_fmadd_ps(pv, pv, acc);
        }
        if (d < vec_end) {
            __m512 pv = adam_step16(c, pr + d, gr + d, mr + d, vr + d, out + d, k, small, lw, tail_mask(vec_end - d), 0);
            acc = _mm512_fmadd_ps(pv, pv, acc);
            d = vec_end;
        }
        ss = _mm512_reduce_add_ps(acc);
#else
        const adam_ctx cl = *c; /* a local copy: no store below may alias its fields, so the loop vectorises */
        for (; d < vec_end; d++) out[d] = adam1(&cl, pr[d], gr[d], mr + d, vr + d, k, small, lw, 0);
        v8f acc = v8_set1(0.0f);
        int64_t q = 0;
        for (; q + 8 <= vec_end; q += 8) acc += v8_load(out, DT_F32, q) * v8_load(out, DT_F32, q);
        ss = v8_sum(acc);
        for (; q < vec_end; q++) ss += out[q] * out[q];
#endif
        for (; d < D; d++) {
            float pv = adam1(c, pr[d], gr[d], mr + d, vr + d, k, small, lw, 1);
            out[d] = pv;
            ss += pv * pv;
        }
        if (c->normalize) { /* W_dec.div_(W_dec.norm(dim=1).clamp_min(1e-12)) */
            float n = sqrtf(ss);
            n = n > 1e-12f ? n : 1e-12f;
            d = 0;
#ifdef SAE_AVX512
            const __m512 vn = _mm512_set1_ps(n);
            for (; d + 16 <= D; d += 16) _mm512_storeu_ps(pr + d, _mm512_div_ps(_mm512_loadu_ps(row + d), vn));
#endif
            for (; d < D; d++) pr[d] = row[d] / n;
        }
        if (c->shadow) {
            uint16_t *sh = c->shadow + r * D;
            d = 0;
#ifdef SAE_AVX512
            for (; d + 16 <= D; d += 16) _mm256_storeu_si256((__m256i *)(sh + d), to_bf16(_mm512_loadu_ps(pr + d)));
#endif
            for (; d < D; d++) sh[d] = f32_to_bf16(pr[d]);
        }
    }
    free(row);
}

void sae_adam_rows(int64_t R, int64_t D, float *p, const float *g, float *m, float *v, const float *coef, float clip,
                   float neg_step, float lerp_w, float beta2, float sq_w, float bc2_sqrt, float eps, int normalize,
                   uint16_t *shadow, int nthreads) {
    adam_ctx c = {.R = R, .D = D, .p = p, .g = g, .m = m, .v = v, .coef = coef, .clip = clip, .neg_step = neg_step,
                  .lerp_w = lerp_w, .beta2 = beta2, .sq_w = sq_w, .bc2_sqrt = bc2_sqrt, .eps = eps,
                  .normalize = normalize, .shadow = shadow};
    run_even(adam_range, &c, R, nthreads, 1);
}

/* y = A @ x for A [R, C] fp32 row-major, x [C]: one streaming pass over A, rows split over
 * the threads (torch's mv reaches about half this bandwidth on a cold matrix). */
typedef struct {
    const float *A, *x;
    float *y;
    int64_t C;
} gemv_ctx;

static void gemv_range(void *p, int64_t lo, int64_t hi, int tid) {
    (void)tid;
    gemv_ctx *c = (gemv_ctx *)p;
    for (int64_t r = lo; r < hi; r++) c->y[r] = dot_f32(c->A + r * c->C, c->x, c->C);
}

void sae_gemv(const float *A, const float *x, float *y, int64_t R, int64_t C, int nthreads) {
    gemv_ctx c = {A, x, y, C};
    run_even(gemv_range, &c, R, nthreads, 1);
}
