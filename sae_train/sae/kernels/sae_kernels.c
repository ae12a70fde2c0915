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
#endif

#define DT_F32 0
#define DT_BF16 1

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
    if (!gkey || !vmask || !ck || !cv || !ci) {
        c->err = 1;
        goto done;
    }
    for (int64_t r = lo; r < hi; r++) {
        const char *row = (const char *)c->z + (size_t)(r * c->ldz) * esz;
        const char *next = r + 1 < hi ? row + c->ldz * esz : NULL;
        int64_t nc = 0;
#ifdef SAE_AVX512
        const __m512 ninf = _mm512_set1_ps(-INFINITY);
        for (int64_t b = 0; b < nb; b++) {
            __m512 m = ninf;
            for (int64_t t = 0; t < g; t++) {
                int64_t i = (b * g + t) * 16;
                if (i >= N) break;
                if (i + 16 <= N && !c->colmask) {
                    m = _mm512_max_ps(_mm512_add_ps(load16u(row, c->dtype, i), _mm512_loadu_ps(c->bias + i)), m);
                    continue; /* NaN in v: max keeps m */
                }
                __mmask16 tm = tail_mask(N - i);
                if (c->colmask) {
                    __m128i cm = _mm_maskz_loadu_epi8(tm, c->colmask + i);
                    tm &= _mm_test_epi8_mask(cm, cm);
                }
                __m512 v = _mm512_add_ps(load16(row, c->dtype, i, tm), _mm512_maskz_loadu_ps(tm, c->bias + i));
                m = _mm512_max_ps(_mm512_mask_mov_ps(ninf, tm, v), m);
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
            if (i + 16 <= N && !c->colmask) {
                __m512 v = _mm512_add_ps(load16u(row, c->dtype, i), _mm512_loadu_ps(c->bias + i));
                vmask[q] = _mm512_cmp_ps_mask(v, vb, _CMP_NLT_UQ); /* v >= bound or NaN */
                continue;
            }
            __mmask16 tm = tail_mask(N - i);
            if (c->colmask) {
                __m128i cm = _mm_maskz_loadu_epi8(tm, c->colmask + i);
                tm &= _mm_test_epi8_mask(cm, cm);
            }
            __m512 v = _mm512_add_ps(load16(row, c->dtype, i, tm), _mm512_maskz_loadu_ps(tm, c->bias + i));
            vmask[q] = _mm512_mask_cmp_ps_mask(tm, v, vb, _CMP_NLT_UQ);
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
        {
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
    for (int64_t r = lo; r < hi; r++) {
        const char *row = (const char *)c->z + (size_t)(r * c->ldz) * esz;
        int64_t start = o, i = 0;
        if (o + N + 16 > c->cap) { /* the row might not fit: flag, the caller retries */
            *c->overflow = 1;
            break;
        }
#ifdef SAE_AVX512
        const __m512 thr = _mm512_set1_ps(c->thr);
        const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        for (; i < N; i += 16) {
            __mmask16 tm = tail_mask(N - i);
            __m512 v = i + 16 <= N ? _mm512_add_ps(load16u(row, c->dtype, i), _mm512_loadu_ps(c->bias + i))
                                   : _mm512_add_ps(load16(row, c->dtype, i, tm), _mm512_maskz_loadu_ps(tm, c->bias + i));
            __mmask16 m = _mm512_mask_cmp_ps_mask(tm, v, thr, _CMP_NLE_UQ);
            if (!m) continue; /* most vectors hold no candidate */
            _mm512_storeu_ps(cv + o, _mm512_maskz_compress_ps(m, v));
            _mm512_storeu_si512(ci + o, _mm512_maskz_compress_epi32(m, _mm512_add_epi32(lane, _mm512_set1_epi32((int)i))));
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
}

/* Batch top-k: the n_keep largest entries of z + bias above thr (>= 0, so after ReLU) over
 * the whole [B, N] batch, ties to the lower row-major position (NaN first). Writes CSR
 * out_off [B+1], out_idx / out_val [nnz] (row-major) and returns nnz. thr is the caller's
 * guess of a value below the n_keep-th largest: returns -1 when fewer than n_keep entries
 * exceed a positive thr (retry with thr = 0) and -2 when `cap` candidate slots per thread
 * were too few (retry with more). Scratch: cidx/cval [nthreads * cap], keys [nthreads * cap]. */
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
    if (overflow) return -2;
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
} spmm_ctx;

static inline const void *trow(const spmm_ctx *c, int64_t i) {
    return (const char *)c->T + (size_t)(i * c->ldt) * (c->tdtype == DT_F32 ? 4 : 2);
}

#define BLK 16 /* accumulator registers per block: 256 output floats */

/* out[0:D] (+)= sum over CSR entries e of row r: val_e * T[idx_e, 0:D]. Full blocks of
 * BLK vectors run without masks. (Software prefetch of the next rows measured slower: the
 * table mostly sits in L2/L3 and the extra instructions cost more than the misses.) */
static void row_gather_axpy(const spmm_ctx *c, int64_t r, float *out, int accumulate) {
    const int64_t D = c->D, e0 = c->off[r], e1 = c->off[r + 1];
    int64_t d0 = 0;
#ifdef SAE_AVX512
    const __m512i hi16 = _mm512_set1_epi32((int)0xffff0000u);
    const __m512i ilv_lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i ilv_hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    for (; d0 + 16 * BLK <= D; d0 += 16 * BLK) {
        __m512 acc[BLK];
#pragma GCC unroll 16
        for (int j = 0; j < BLK; j++) acc[j] = accumulate ? _mm512_loadu_ps(out + d0 + 16 * j) : _mm512_setzero_ps();
        if (accumulate && c->tdtype == DT_BF16) {
#pragma GCC unroll 8
            for (int j = 0; j < BLK / 2; j++) {
                __m512 lo = acc[2 * j], hi = acc[2 * j + 1];
                acc[2 * j] = _mm512_permutex2var_ps(lo, even, hi);
                acc[2 * j + 1] = _mm512_permutex2var_ps(lo, odd, hi);
            }
        }
        for (int64_t e = e0; e < e1; e++) {
            float a = c->val[c->perm ? c->perm[e] : e];
            if (a == 0.0f) continue;
            const void *src = trow(c, c->idx[e]);
            const __m512 va = _mm512_set1_ps(a);
            if (c->tdtype == DT_F32) {
#pragma GCC unroll 16
                for (int j = 0; j < BLK; j++) acc[j] = _mm512_fmadd_ps(va, load16u(src, DT_F32, d0 + 16 * j), acc[j]);
            } else {
                /* bf16 without shuffles: 32 values per load; acc[2j] holds the even elements
                 * of the 32-block j, acc[2j+1] the odd ones (re-interleaved at the end) */
                const uint16_t *h = (const uint16_t *)src + d0;
#pragma GCC unroll 8
                for (int j = 0; j < BLK / 2; j++) {
                    __m512i w = _mm512_loadu_si512(h + 32 * j);
                    acc[2 * j] = _mm512_fmadd_ps(va, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), acc[2 * j]);
                    acc[2 * j + 1] = _mm512_fmadd_ps(va, _mm512_castsi512_ps(_mm512_and_si512(w, hi16)), acc[2 * j + 1]);
                }
            }
        }
        if (c->tdtype == DT_BF16) { /* even/odd -> natural order (the inverse for accumulate) */
#pragma GCC unroll 8
            for (int j = 0; j < BLK / 2; j++) {
                __m512 ev = acc[2 * j], od = acc[2 * j + 1];
                acc[2 * j] = _mm512_permutex2var_ps(ev, ilv_lo, od);
                acc[2 * j + 1] = _mm512_permutex2var_ps(ev, ilv_hi, od);
            }
        }
#pragma GCC unroll 16
        for (int j = 0; j < BLK; j++) _mm512_storeu_ps(out + d0 + 16 * j, acc[j]);
    }
    if (d0 < D) { /* last partial block: masked */
        __m512 acc[BLK];
        __mmask16 mk[BLK];
        for (int j = 0; j < BLK; j++) {
            int64_t d = d0 + 16 * j;
            mk[j] = d < D ? tail_mask(D - d) : 0;
            acc[j] = accumulate ? _mm512_maskz_loadu_ps(mk[j], out + d) : _mm512_setzero_ps();
        }
        for (int64_t e = e0; e < e1; e++) {
            float a = c->val[c->perm ? c->perm[e] : e];
            if (a == 0.0f) continue;
            const void *src = trow(c, c->idx[e]);
            const __m512 va = _mm512_set1_ps(a);
            for (int j = 0; j < BLK && mk[j]; j++) {
                __m512 t = mk[j] == 0xffff ? load16u(src, c->tdtype, d0 + 16 * j) : load16(src, c->tdtype, d0 + 16 * j, mk[j]);
                acc[j] = _mm512_fmadd_ps(va, t, acc[j]);
            }
        }
        for (int j = 0; j < BLK && mk[j]; j++) _mm512_mask_storeu_ps(out + d0 + 16 * j, mk[j], acc[j]);
        d0 = D;
    }
#endif
    for (; d0 < D; d0++) {
        float s = accumulate ? out[d0] : 0.0f;
        for (int64_t e = e0; e < e1; e++) s += c->val[c->perm ? c->perm[e] : e] * load1(trow(c, c->idx[e]), c->tdtype, d0);
        out[d0] = s;
    }
}

static void spmm_range(void *p, int64_t lo, int64_t hi, int tid) {
    (void)tid;
    spmm_ctx *c = (spmm_ctx *)p;
    const int64_t D = c->D;
    for (int64_t r = lo; r < hi; r++) {
        float *o = c->out + r * c->ldo;
        row_gather_axpy(c, r, o, c->accumulate);
        if (!c->bias) continue;
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
#endif
        for (; d < D; d++) {
            o[d] += c->bias[d];
            sse += (o[d] - t[d]) * (o[d] - t[d]);
        }
        c->row_sse[r] = sse;
    }
}

/* Rows r0 .. r0+15 accumulated in a [16, D] scratch block, written as columns of `out`
 * (one 64-byte line per output row), so a transposed result costs no extra pass. */
static void spmm_t_range(void *p, int64_t lo, int64_t hi, int tid) {
    (void)tid;
    spmm_ctx *c = (spmm_ctx *)p;
    const int64_t D = c->D;
    float *blk = (float *)aligned_alloc(64, ((sizeof(float) * 16 * D + 63) / 64) * 64);
    if (!blk) return;
    for (int64_t r0 = lo; r0 < hi; r0 += 16) {
        int64_t nr = hi - r0 < 16 ? hi - r0 : 16;
        for (int64_t j = 0; j < nr; j++) row_gather_axpy(c, r0 + j, blk + j * D, 0);
        int64_t d = 0;
#ifdef SAE_AVX512
        if (nr == 16) {
            __m512i vidx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32((int)D));
            for (; d < D; d++) {
                float *o = c->out + d * c->ldo + r0;
                __m512 v = _mm512_i32gather_ps(vidx, blk + d, 4);
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
}

/* out[r, :] = sum_{e in row r} val[perm ? perm[e] : e] * T[idx[e], :] for r < R (CSR times
 * dense; T fp32 or bf16). With transpose_out, writes out[:, r] instead (out is [D, R] with
 * leading dim ldo); with accumulate, adds to out. */
void sae_csr_spmm(int64_t R, const int64_t *off, const int64_t *idx, const float *val, const int64_t *perm,
                  const void *T, int tdtype, int64_t D, int64_t ldt, float *out, int64_t ldo, int transpose_out,
                  int accumulate, int nthreads) {
    spmm_ctx c = {off, idx, perm, val, T, tdtype, D, ldt, out, ldo, accumulate, NULL, NULL, NULL};
    if (transpose_out)
        run_by_nnz(spmm_t_range, &c, R, off, nthreads, 16);
    else
        run_by_nnz(spmm_range, &c, R, off, nthreads, 1);
}

/* The SAE decode: out[r] = sum_e val_e * T[idx_e] + bias (x_hat, [R, D] contiguous), and
 * row_sse[r] = ||out[r] - target[r]||^2 (the reconstruction error) in the same pass. */
void sae_csr_decode(int64_t R, const int64_t *off, const int64_t *idx, const float *val, const void *T, int tdtype,
                    int64_t D, const float *bias, const float *target, float *out, float *row_sse, int nthreads) {
    spmm_ctx c = {off, idx, NULL, val, T, tdtype, D, D, out, D, 0, bias, target, row_sse};
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

/* Four dot products at a time: independent FMA chains, and each g vector loaded once. */
static void sddmm_range(void *p, int64_t lo, int64_t hi, int tid) {
    sddmm_ctx *c = (sddmm_ctx *)p;
    const int64_t D = c->D, esz = c->tdtype == DT_F32 ? 4 : 2;
    float *geff = (float *)malloc(sizeof(float) * (D + 32));
    if (!geff) return;
    float *cg = c->col_g ? c->col_g + (int64_t)tid * D : NULL;
#ifdef SAE_AVX512
    float *gsplit = (float *)malloc(sizeof(float) * (D + 32));
    if (!gsplit) {
        free(geff);
        return;
    }
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#endif
    for (int64_t r = lo; r < hi; r++) {
        const float *g = c->G ? c->G + r * c->ldg : NULL;
        if (c->xh) { /* g <- G + s * (x_hat - x): the MSE gradient joins here, no extra pass */
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
        for (int64_t e = c->off[r]; e < c->off[r + 1]; e += 4) {
            int64_t n = c->off[r + 1] - e < 4 ? c->off[r + 1] - e : 4;
            const void *t[4];
            for (int q = 0; q < 4; q++) t[q] = (const char *)c->T + (size_t)(c->idx[e + (q < n ? q : 0)] * c->ldt) * esz;
            float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            int64_t d = 0;
#ifdef SAE_AVX512
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
#define SDDMM_STEP(LOAD)                                  \
    {                                                     \
        __m512 gv = _mm512_loadu_ps(g + d);               \
        a0 = _mm512_fmadd_ps(gv, LOAD(t[0], d), a0);      \
        a1 = _mm512_fmadd_ps(gv, LOAD(t[1], d), a1);      \
        a2 = _mm512_fmadd_ps(gv, LOAD(t[2], d), a2);      \
        a3 = _mm512_fmadd_ps(gv, LOAD(t[3], d), a3);      \
    }
#define LOAD_F32(p, i) load16u(p, DT_F32, i)
#define LOAD_BF16(p, i) load16u(p, DT_BF16, i)
            if (c->tdtype == DT_F32) {
                for (; d + 16 <= D; d += 16) SDDMM_STEP(LOAD_F32)
            } else { /* bf16 without shuffles: even/odd halves against g split the same way */
                const __m512i hi16 = _mm512_set1_epi32((int)0xffff0000u);
                __m512 b0 = _mm512_setzero_ps(), b1 = b0, b2 = b0, b3 = b0; /* odd halves */
                for (; d + 32 <= D; d += 32) {
                    __m512 ge = _mm512_loadu_ps(gsplit + d), go = _mm512_loadu_ps(gsplit + d + 16);
#define SDDMM_EO(A, B, T)                                                                           \
    {                                                                                               \
        __m512i w = _mm512_loadu_si512((const uint16_t *)(T) + d);                                  \
        A = _mm512_fmadd_ps(ge, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), A);                  \
        B = _mm512_fmadd_ps(go, _mm512_castsi512_ps(_mm512_and_si512(w, hi16)), B);                 \
    }
                    SDDMM_EO(a0, b0, t[0]) SDDMM_EO(a1, b1, t[1]) SDDMM_EO(a2, b2, t[2]) SDDMM_EO(a3, b3, t[3])
                }
                a0 = _mm512_add_ps(a0, b0);
                a1 = _mm512_add_ps(a1, b1);
                a2 = _mm512_add_ps(a2, b2);
                a3 = _mm512_add_ps(a3, b3);
                for (; d + 16 <= D; d += 16) SDDMM_STEP(LOAD_BF16)
            }
            if (d < D) {
                __mmask16 m = tail_mask(D - d);
                __m512 gv = _mm512_maskz_loadu_ps(m, g + d);
                a0 = _mm512_fmadd_ps(gv, load16(t[0], c->tdtype, d, m), a0);
                a1 = _mm512_fmadd_ps(gv, load16(t[1], c->tdtype, d, m), a1);
                a2 = _mm512_fmadd_ps(gv, load16(t[2], c->tdtype, d, m), a2);
                a3 = _mm512_fmadd_ps(gv, load16(t[3], c->tdtype, d, m), a3);
                d = D;
            }
            s[0] = _mm512_reduce_add_ps(a0);
            s[1] = _mm512_reduce_add_ps(a1);
            s[2] = _mm512_reduce_add_ps(a2);
            s[3] = _mm512_reduce_add_ps(a3);
#endif
            for (; d < D; d++)
                for (int q = 0; q < 4; q++) s[q] += g[d] * load1(t[q], c->tdtype, d);
            for (int q = 0; q < n; q++) c->out[e + q] = s[q];
        }
    }
#ifdef SAE_AVX512
    free(gsplit);
#endif
    free(geff);
}

/* The decode's backward w.r.t. the latents with the MSE gradient folded in: the gradient of
 * x_hat is g = G + s * (xh - x) (G may be NULL; s = 2 dL/dmse / B); writes g to gout (dtype
 * gdtype, the table of the W_dec gradient), its per-thread column sums to col_g [nthreads,
 * D] (the b_dec gradient through x_hat), and out[e] = <g[r], T[idx[e]]>. */
void sae_decode_backward(int64_t R, const int64_t *off, const int64_t *idx, const float *G, const float *xh,
                         const float *x, float s, const void *T, int tdtype, int64_t D, float *out, void *gout,
                         int gdtype, float *col_g, int nthreads) {
    sddmm_ctx c = {off, idx, G, T, tdtype, D, D, D, out, xh, x, s, gout, gdtype, col_g};
    run_by_nnz(sddmm_range, &c, R, off, nthreads, 1);
}

/* CSR [R, C] -> CSC: coff[C+1], crow[nnz] (rows ascending within a column), perm[nnz]
 * (position of each CSC entry in the CSR arrays). Counting sort, single thread: O(nnz + C). */
void sae_csr_transpose(int64_t R, int64_t C, const int64_t *off, const int64_t *idx, int64_t *coff,
                       int64_t *crow, int64_t *perm) {
    memset(coff, 0, sizeof(int64_t) * (C + 1));
    for (int64_t e = off[0]; e < off[R]; e++) coff[idx[e] + 1]++;
    for (int64_t j = 0; j < C; j++) coff[j + 1] += coff[j];
    int64_t *cur = (int64_t *)malloc(sizeof(int64_t) * (C ? C : 1));
    memcpy(cur, coff, sizeof(int64_t) * C);
    for (int64_t r = 0; r < R; r++)
        for (int64_t e = off[r]; e < off[r + 1]; e++) {
            int64_t p = cur[idx[e]]++;
            crow[p] = r;
            perm[p] = e;
        }
    free(cur);
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
    act_ctx c;
    memset(&c, 0, sizeof c);
    c.z = z;
    c.out = out;
    c.dtype = dtype;
    c.N = N;
    c.bias = bias;
    c.thr = thr;
    c.colw = colw;
    c.row_wsum = row_wsum;
    c.row_cnt = row_cnt;
    c.col_cnt = col_cnt;
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
    act_ctx c;
    memset(&c, 0, sizeof c);
    c.z = g;
    c.ref = ref;
    c.dtype = dtype;
    c.N = N;
    c.bias = bias;
    c.thr = thr;
    c.eps = eps;
    c.row_g = row_g;
    c.colw = colw;
    c.col_g = col_g;
    c.col_w = col_w;
    c.col_wg = col_wg;
    c.col_wr = col_wr;
    run_even(act_bwd_range, &c, B, nthreads, 1);
}
