/* LoRA dropout on the CPU without a mask or a dropped copy of the input (dropout_mask.py has the definition,
 * kernel.py the callers).
 *
 * x is (rows, cols), element e = i * cols + j in row-major order. Elements 2k and 2k + 1 take the low and the high
 * 32 bits of SplitMix64(seed + k * GAMMA); an element is dropped when its bits are below thr. The LoRA products
 * are computed on x itself by BLAS; these functions then remove the dropped elements' share, r multiply-adds per
 * dropped element (about p of them), reading x only where something was dropped:
 *   drop_forward: h[i, :]  -= x[i, j] * at[j, :]   and the list of dropped elements and their values of x
 *   drop_grad_a:  ga[:, j] -= x[i, j] * gh[i, :]   for the listed elements            (ga: (r, cols), given as ga^T)
 *   drop_grad_x:  gx[i, j] -= dot(gh[i, :], at[j, :])  for the listed elements
 * So the hashing runs once per forward; the backward pass walks the list (int32 flat indices and float32 values
 * of x, about p of the elements: the mask kept packed, and the dropped values read once, where they are scattered). Work is split over `threads` POSIX threads. Plain C (AVX-512 intrinsics where the
 * CPU has them): no torch or Python headers.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GAMMA 0x9E3779B97F4A7C15ULL
#define BLOCK 64 /* elements hashed at a time; blocks start at multiples of BLOCK */
#define MAX_THREADS 64

/* Bit k set where element start + k is dropped (start a multiple of BLOCK). Written twice: plain C, which the
 * compiler vectorizes as the target allows (built plain and for AVX2), and AVX-512 (64-bit vector multiplies,
 * compares straight to a bit mask). The forward job is built once per variant with it inlined, and the variant is
 * picked at run time by what the CPU supports. */
#define DROPPED_BITS_BODY                                                                                           \
    uint64_t z[BLOCK / 2]; /* little-endian: element 2k reads the low half, 2k + 1 the high half */               \
    uint32_t u[BLOCK];                                                                                              \
    uint8_t flags[BLOCK];                                                                                           \
    for (int k = 0; k < BLOCK / 2; k++) {                                                                           \
        uint64_t v = seed + (start / 2 + (uint64_t)k) * GAMMA;                                                      \
        v = (v ^ (v >> 30)) * 0xBF58476D1CE4E5B9ULL;                                                                \
        v = (v ^ (v >> 27)) * 0x94D049BB133111EBULL;                                                                \
        z[k] = v ^ (v >> 31);                                                                                       \
    }                                                                                                               \
    memcpy(u, z, sizeof z);                                                                                         \
    for (int k = 0; k < BLOCK; k++) flags[k] = u[k] < thr;                                                          \
    uint64_t bits = 0;                                                                                              \
    for (int w = 0; w < BLOCK / 8; w++) { /* eight 0/1 bytes to eight bits */                                      \
        uint64_t bytes;                                                                                             \
        memcpy(&bytes, flags + 8 * w, 8);                                                                           \
        bits |= ((bytes * 0x0102040810204080ULL) >> 56) << (8 * w);                                                \
    }                                                                                                               \
    return bits;

static inline uint64_t dropped_bits_plain(uint64_t seed, uint64_t start, uint32_t thr) { DROPPED_BITS_BODY }

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define X86 1

__attribute__((target("avx2,fma"))) static inline uint64_t dropped_bits_avx2(uint64_t seed, uint64_t start, uint32_t thr) {
    DROPPED_BITS_BODY
}

#define AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,popcnt")))

/* Counter offsets of the lanes, (8q + lane) * GAMMA, so a block's counters are one broadcast add away. */
#define OFFSETS(q)                                                                                                  \
    _mm512_set_epi64((long long)((8 * q + 7) * GAMMA), (long long)((8 * q + 6) * GAMMA),                             \
                     (long long)((8 * q + 5) * GAMMA), (long long)((8 * q + 4) * GAMMA),                             \
                     (long long)((8 * q + 3) * GAMMA), (long long)((8 * q + 2) * GAMMA),                             \
                     (long long)((8 * q + 1) * GAMMA), (long long)((8 * q + 0) * GAMMA))

AVX512 static inline uint64_t dropped_bits_avx512(uint64_t seed, uint64_t start, uint32_t thr) {
    const __m512i mix1 = _mm512_set1_epi64((long long)0xBF58476D1CE4E5B9ULL);
    const __m512i mix2 = _mm512_set1_epi64((long long)0x94D049BB133111EBULL);
    const __m512i limit = _mm512_set1_epi32((int)thr);
    const __m512i base = _mm512_set1_epi64((long long)(seed + start / 2 * GAMMA));
    const __m512i offsets[4] = {OFFSETS(0ULL), OFFSETS(1ULL), OFFSETS(2ULL), OFFSETS(3ULL)};
    uint64_t bits = 0;
    for (int q = 0; q < BLOCK / 16; q++) { /* 8 counters, 16 elements */
        __m512i v = _mm512_add_epi64(base, offsets[q]);
        v = _mm512_mullo_epi64(_mm512_xor_si512(v, _mm512_srli_epi64(v, 30)), mix1);
        v = _mm512_mullo_epi64(_mm512_xor_si512(v, _mm512_srli_epi64(v, 27)), mix2);
        v = _mm512_xor_si512(v, _mm512_srli_epi64(v, 31));
        bits |= (uint64_t)_mm512_cmplt_epu32_mask(v, limit) << (16 * q);
    }
    return bits;
}
#endif

/* The small operands come padded to rp columns (a multiple of LANES, zeros past r), so that every inner loop runs
 * over whole 16-float chunks, which the compiler keeps in vector registers. */
#define LANES 16

typedef struct {
    float *out;
    const float *x, *small;
    const int32_t *idx;
    int32_t *list;
    float *values; /* the dropped elements' values of x, beside `list` */
    int64_t begin, end; /* element range (forward) or list range (backward) */
    int64_t cols, r, rp, capacity, count;
    uint64_t seed;
    uint32_t thr;
} job_t;

/* h[i, :r] -= sum over the row's dropped elements e of x[e] * at[j(e), :], the sum kept in registers (one store per
 * row and chunk instead of a load-add-store chain per element). */
#define CORRECT_ROW(NAME, ATTR)                                                                                     \
    ATTR static inline void NAME(float *restrict h_row, const float *restrict values, const float *restrict at,     \
                                 const int32_t *restrict drops, int64_t n, int64_t row_start, int64_t r,            \
                                 int64_t rp) {                                                                      \
        for (int64_t c0 = 0; c0 < rp; c0 += LANES) {                                                                \
            float acc[LANES] = {0};                                                                                 \
            for (int64_t k = 0; k < n; k++) {                                                                       \
                const float v = values[k], *restrict a = at + (drops[k] - row_start) * rp + c0;                     \
                for (int c = 0; c < LANES; c++) acc[c] += v * a[c];                                                 \
            }                                                                                                       \
            for (int c = 0; c < LANES && c0 + c < r; c++) h_row[c0 + c] -= acc[c];                                  \
        }                                                                                                           \
    }

/* The forward job: hash BATCH blocks (independent, so their multiplies overlap), then walk their set bits. */
#define BATCH 16
#define FORWARD_JOB(NAME, BITS, CORRECT, ATTR)                                                                      \
    ATTR static void *NAME(void *arg) { /* small = at (cols, rp), out = h (rows, r) */                              \
        job_t *job = (job_t *)arg;                                                                                  \
        const int64_t cols = job->cols, end = job->end, capacity = job->capacity;                                  \
        int32_t *restrict list = job->list;                                                                         \
        float *restrict values = job->values;                                                                       \
        const float *restrict x = job->x;                                                                           \
        int64_t count = 0, row_first = 0, i = job->begin / cols, row_end = (i + 1) * cols;                          \
        uint64_t masks[BATCH];                                                                                      \
        for (int64_t s0 = job->begin / BLOCK * BLOCK; s0 < end; s0 += BATCH * BLOCK) {                             \
            for (int b = 0; b < BATCH; b++) masks[b] = BITS(job->seed, (uint64_t)(s0 + b * BLOCK), job->thr);       \
            if (count > capacity - BATCH * BLOCK) { /* no room for a whole batch more */                            \
                job->count = -1;                                                                                    \
                return 0;                                                                                           \
            }                                                                                                       \
            for (int b = 0; b < BATCH && s0 + b * BLOCK < end; b++) {                                               \
                int64_t b0 = s0 + b * BLOCK;                                                                        \
                uint64_t bits = masks[b];                                                                           \
                if (b0 < job->begin) bits &= ~0ULL << (job->begin - b0);                                            \
                if (end - b0 < BLOCK) bits &= (1ULL << (end - b0)) - 1;                                             \
                while (bits) {                                                                                      \
                    int64_t e = b0 + __builtin_ctzll(bits);                                                         \
                    bits &= bits - 1;                                                                               \
                    while (e >= row_end) { /* a new row: correct the finished one */                                \
                        CORRECT(job->out + i * job->r, values + row_first, job->small, list + row_first,            \
                                count - row_first, row_end - cols, job->r, job->rp);                                \
                        row_first = count;                                                                          \
                        row_end += cols;                                                                            \
                        i++;                                                                                        \
                    }                                                                                               \
                    values[count] = x[e];                                                                           \
                    list[count++] = (int32_t)e;                                                                     \
                }                                                                                                   \
            }                                                                                                       \
        }                                                                                                           \
        CORRECT(job->out + i * job->r, values + row_first, job->small, list + row_first, count - row_first,         \
                row_end - cols, job->r, job->rp);                                                                   \
        job->count = count;                                                                                         \
        return 0;                                                                                                   \
    }

CORRECT_ROW(correct_row_plain, )
FORWARD_JOB(forward_job_plain, dropped_bits_plain, correct_row_plain, )
#ifdef X86
CORRECT_ROW(correct_row_avx2, __attribute__((target("avx2,fma"))))
FORWARD_JOB(forward_job_avx2, dropped_bits_avx2, correct_row_avx2, __attribute__((target("avx2,fma"))))

/* CORRECT_ROW with the 16 sums in one vector register (the compiler keeps them in scalar ones). */
AVX512 static inline void correct_row_avx512(float *restrict h_row, const float *restrict values,
                                             const float *restrict at, const int32_t *restrict drops, int64_t n,
                                             int64_t row_start, int64_t r, int64_t rp) {
    for (int64_t c0 = 0; c0 < rp; c0 += LANES) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t k = 0; k < n; k++)
            acc = _mm512_fmadd_ps(_mm512_set1_ps(values[k]), _mm512_loadu_ps(at + (drops[k] - row_start) * rp + c0),
                                  acc);
        __mmask16 live = r - c0 >= LANES ? (__mmask16)0xFFFF : (__mmask16)((1u << (r - c0)) - 1);
        _mm512_mask_storeu_ps(h_row + c0, live, _mm512_sub_ps(_mm512_maskz_loadu_ps(live, h_row + c0), acc));
    }
}
FORWARD_JOB(forward_job_avx512, dropped_bits_avx512, correct_row_avx512, AVX512)
#endif

/* The backward jobs walk the list. grad_a: ga^T[j, :] -= x[e] * gh[i, :]; grad_x: gx[e] -= dot(gh[i, :], at[j, :]). */
#define GRAD_A_JOB(NAME, ATTR)                                                                                      \
    ATTR static void *NAME(void *arg) { /* x = values, small = gh (rows, rp); out = this thread's ga^T (cols, rp) */ \
        job_t *job = (job_t *)arg;                                                                                  \
        const int64_t cols = job->cols, rp = job->rp;                                                               \
        const float *restrict values = job->x, *restrict gh = job->small;                                          \
        const int32_t *restrict list = job->idx;                                                                    \
        float *restrict gat = job->out;                                                                             \
        int64_t i = job->begin < job->end ? list[job->begin] / cols : 0;                                            \
        for (int64_t n = job->begin; n < job->end; n++) {                                                           \
            int64_t e = list[n];                                                                                    \
            while (e >= (i + 1) * cols) i++; /* the list is in order: step to e's row */                            \
            const float v = values[n], *restrict g = gh + i * rp;                                                   \
            float *restrict row = gat + (e - i * cols) * rp;                                                        \
            GRAD_A_UPDATE                                                                                           \
        }                                                                                                           \
        return 0;                                                                                                   \
    }

#define GRAD_X_JOB(NAME, ATTR)                                                                                      \
    ATTR static void *NAME(void *arg) { /* x = gh (rows, rp), small = at (cols, rp), out = gx (rows, cols) */      \
        job_t *job = (job_t *)arg;                                                                                  \
        const int64_t cols = job->cols, rp = job->rp;                                                               \
        const float *restrict gh = job->x, *restrict at = job->small;                                              \
        const int32_t *restrict list = job->idx;                                                                    \
        float *restrict gx = job->out;                                                                              \
        int64_t i = job->begin < job->end ? list[job->begin] / cols : 0;                                            \
        for (int64_t n = job->begin; n < job->end; n++) {                                                           \
            int64_t e = list[n];                                                                                    \
            while (e >= (i + 1) * cols) i++;                                                                        \
            const float *restrict g = gh + i * rp, *restrict a = at + (e - i * cols) * rp;                          \
            float dot;                                                                                              \
            GRAD_X_DOT                                                                                              \
            gx[e] -= dot;                                                                                           \
        }                                                                                                           \
        return 0;                                                                                                   \
    }

#define GRAD_A_UPDATE                                                                                               \
    for (int64_t c = 0; c < rp; c++) row[c] -= v * g[c];
#define GRAD_X_DOT                                                                                                  \
    float acc[LANES] = {0};                                                                                         \
    for (int64_t c0 = 0; c0 < rp; c0 += LANES)                                                                      \
        for (int c = 0; c < LANES; c++) acc[c] += g[c0 + c] * a[c0 + c];                                            \
    dot = 0.0f;                                                                                                     \
    for (int c = 0; c < LANES; c++) dot += acc[c];
GRAD_A_JOB(grad_a_job_plain, )
GRAD_X_JOB(grad_x_job_plain, )
#undef GRAD_A_UPDATE
#undef GRAD_X_DOT

#ifdef X86
#define GRAD_A_UPDATE                                                                                               \
    for (int64_t c0 = 0; c0 < rp; c0 += LANES)                                                                      \
        _mm512_storeu_ps(row + c0, _mm512_fnmadd_ps(_mm512_set1_ps(v), _mm512_loadu_ps(g + c0),                     \
                                                    _mm512_loadu_ps(row + c0)));
#define GRAD_X_DOT                                                                                                  \
    __m512 acc = _mm512_setzero_ps();                                                                               \
    for (int64_t c0 = 0; c0 < rp; c0 += LANES)                                                                      \
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(g + c0), _mm512_loadu_ps(a + c0), acc);                               \
    dot = _mm512_reduce_add_ps(acc);
GRAD_A_JOB(grad_a_job_avx512, AVX512)
GRAD_X_JOB(grad_x_job_avx512, AVX512)
#undef GRAD_A_UPDATE
#undef GRAD_X_DOT
#endif

typedef void *(*job_fn)(void *);
static struct {
    job_fn forward, grad_a, grad_x;
} kernels;

static int isa_limit = 2; /* deltatune_limit_isa: 0 plain C, 1 up to AVX2, 2 up to AVX-512 */

/* The jobs for this CPU, picked once (every caller computes the same answer: a race is harmless). */
static void pick_kernels(void) {
    if (kernels.forward) return;
    job_fn forward = forward_job_plain, grad_a = grad_a_job_plain, grad_x = grad_x_job_plain;
#ifdef X86
    __builtin_cpu_init();
    if (isa_limit >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw")) {
        forward = forward_job_avx512;
        grad_a = grad_a_job_avx512;
        grad_x = grad_x_job_avx512;
    } else if (isa_limit >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        forward = forward_job_avx2;
    }
#endif
    kernels.grad_a = grad_a;
    kernels.grad_x = grad_x;
    kernels.forward = forward;
}

/* For tests: use at most this instruction set from now on (0 plain C, 1 AVX2, 2 AVX-512, where the CPU has it). */
void deltatune_limit_isa(int level) {
    isa_limit = level;
    kernels.forward = 0;
    pick_kernels();
}

static int thread_count(int threads, int64_t work) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1 || work < ((int64_t)1 << 14)) threads = 1; /* a thread costs more than a small slice */
    return threads;
}

/* Runs fn on jobs[0 .. threads): jobs[0] here, the others on new threads (or here, if none can start). */
static void run_all(void *(*fn)(void *), job_t *jobs, int threads) {
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS];
    for (int k = 1; k < threads; k++) started[k] = pthread_create(&ids[k], 0, fn, &jobs[k]) == 0;
    fn(&jobs[0]);
    for (int k = 1; k < threads; k++) {
        if (started[k])
            pthread_join(ids[k], 0);
        else
            fn(&jobs[k]);
    }
}

/* Returns how many elements were dropped (their flat indices, ascending, in list[0 .. count)), or -1 when more
 * than `capacity` were: then h and list are partly written and the caller must start over another way.
 * at: A^T padded to (cols, rp). */
int64_t deltatune_drop_forward(float *h, const float *x, const float *at, int64_t rows, int64_t cols, int64_t r,
                               int64_t rp, uint64_t seed, uint32_t thr, int32_t *list, float *values, int64_t capacity,
                               int threads) {
    pick_kernels();
    job_t jobs[MAX_THREADS];
    threads = thread_count(threads, rows * cols);
    if (threads > rows) threads = (int)rows;
    int64_t chunk = (rows + threads - 1) / threads; /* whole rows per thread: each owns its rows of h */
    for (int k = 0; k < threads; k++) {
        int64_t row0 = k * chunk < rows ? k * chunk : rows, row1 = row0 + chunk < rows ? row0 + chunk : rows;
        int64_t share = capacity * (row1 - row0) / rows; /* its part of the list, by its share of the rows */
        job_t job = {h, x, at, 0, list + capacity * row0 / rows, values + capacity * row0 / rows, row0 * cols, row1 * cols,
                     cols, r, rp, share, 0, seed, thr};
        jobs[k] = job;
    }
    run_all(kernels.forward, jobs, threads);
    int64_t total = 0;
    for (int k = 0; k < threads; k++) {
        if (jobs[k].count < 0) return -1;
        memmove(list + total, jobs[k].list, (size_t)jobs[k].count * sizeof(int32_t));
        memmove(values + total, jobs[k].values, (size_t)jobs[k].count * sizeof(float));
        total += jobs[k].count;
    }
    return total;
}

/* gat: (gA)^T's correction, (cols, rp), zeroed by the caller; gh padded to (rows, rp). */
void deltatune_drop_grad_a(float *gat, const float *values, const float *gh, const int32_t *list, int64_t count,
                           int64_t cols, int64_t rp, int threads) {
    job_t jobs[MAX_THREADS];
    threads = thread_count(threads, count * rp);
    float *partials = 0;
    if (threads > 1) {
        partials = calloc((size_t)(threads - 1) * (size_t)(rp * cols), sizeof(float));
        if (!partials) threads = 1;
    }
    int64_t chunk = (count + threads - 1) / threads;
    for (int k = 0; k < threads; k++) {
        int64_t n0 = k * chunk < count ? k * chunk : count, n1 = n0 + chunk < count ? n0 + chunk : count;
        float *out = k == 0 ? gat : partials + (size_t)(k - 1) * (size_t)(rp * cols);
        job_t job = {out, values, gh, list, 0, 0, n0, n1, cols, 0, rp, 0, 0, 0, 0};
        jobs[k] = job;
    }
    pick_kernels();
    run_all(kernels.grad_a, jobs, threads);
    if (partials) {
        int64_t n = rp * cols;
        for (int k = 0; k < threads - 1; k++)
            for (int64_t e = 0; e < n; e++) gat[e] += partials[(size_t)k * (size_t)n + e];
        free(partials);
    }
}

/* gh and at padded to (rows, rp) and (cols, rp). */
void deltatune_drop_grad_x(float *gx, const float *gh, const float *at, const int32_t *list, int64_t count,
                           int64_t cols, int64_t rp, int threads) {
    job_t jobs[MAX_THREADS];
    threads = thread_count(threads, count * rp);
    int64_t chunk = (count + threads - 1) / threads;
    for (int k = 0; k < threads; k++) {
        int64_t n0 = k * chunk < count ? k * chunk : count, n1 = n0 + chunk < count ? n0 + chunk : count;
        job_t job = {gx, gh, at, list, 0, 0, n0, n1, cols, 0, rp, 0, 0, 0, 0};
        jobs[k] = job;
    }
    pick_kernels();
    run_all(kernels.grad_x, jobs, threads);
}
