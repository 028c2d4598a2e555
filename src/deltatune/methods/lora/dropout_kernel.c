/* LoRA dropout masks applied in one pass on the CPU (see dropout_mask.py for the definition, kernel.py for use).
 *
 * Element i is kept when the top 32 bits of SplitMix64(seed + i * GAMMA) are >= thr. The loops compile to vector
 * code (one clone per instruction set, picked at load time) and run over `threads` slices of the range. Built by
 * kernel.py with the system C compiler; plain C, no torch or Python headers.
 */
#include <pthread.h>
#include <stdint.h>

#define GAMMA 0x9E3779B97F4A7C15ULL

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

static inline uint32_t bits32(uint64_t seed, uint64_t i) {
    uint64_t z = seed + i * GAMMA;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return (uint32_t)(z >> 32);
}

/* out[i] = x[i] where kept, else 0, for i in [start, end). */
CLONES static void dropped_range(const float *x, float *out, int64_t start, int64_t end, uint64_t seed,
                                 uint32_t thr) {
    for (int64_t i = start; i < end; i++) out[i] = bits32(seed, (uint64_t)i) >= thr ? x[i] : 0.0f;
}

/* acc[i] += t[i] where kept, for i in [start, end). */
CLONES static void add_dropped_range(float *acc, const float *t, int64_t start, int64_t end, uint64_t seed,
                                     uint32_t thr) {
    for (int64_t i = start; i < end; i++) acc[i] += bits32(seed, (uint64_t)i) >= thr ? t[i] : 0.0f;
}

typedef struct {
    int add;
    float *dst;
    const float *src;
    int64_t start, end;
    uint64_t seed;
    uint32_t thr;
} job_t;

static void *run(void *arg) {
    job_t *job = (job_t *)arg;
    if (job->add)
        add_dropped_range(job->dst, job->src, job->start, job->end, job->seed, job->thr);
    else
        dropped_range(job->src, job->dst, job->start, job->end, job->seed, job->thr);
    return 0;
}

#define MAX_THREADS 64

static void parallel(int add, float *dst, const float *src, int64_t n, uint64_t seed, uint32_t thr, int threads) {
    job_t jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS];
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1 || n < (int64_t)1 << 16) threads = 1; /* a thread costs more than a small slice */
    int64_t chunk = (n / threads + 63) / 64 * 64;
    for (int k = 0; k < threads; k++) {
        int64_t start = k * chunk, end = start + chunk < n ? start + chunk : n;
        job_t job = {add, dst, src, start < n ? start : n, end, seed, thr};
        jobs[k] = job;
        started[k] = k > 0 && pthread_create(&ids[k], 0, run, &jobs[k]) == 0;
    }
    run(&jobs[0]);
    for (int k = 1; k < threads; k++) {
        if (started[k])
            pthread_join(ids[k], 0);
        else
            run(&jobs[k]); /* no thread to spare: do its slice here */
    }
}

void deltatune_dropped_f32(const float *x, float *out, int64_t n, uint64_t seed, uint32_t thr, int threads) {
    parallel(0, out, x, n, seed, thr, threads);
}

void deltatune_add_dropped_f32(float *acc, const float *t, int64_t n, uint64_t seed, uint32_t thr, int threads) {
    parallel(1, acc, t, n, seed, thr, threads);
}
