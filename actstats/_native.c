/* One-pass statistics kernels for float32 CPU tensors whose values fill a block of memory.
 *
 * Optional: actstats builds this module when a C compiler is available and falls
 * back to PyTorch operations when it is not (actstats/native.py decides). Each
 * kernel reads its tensor once, where the PyTorch path needs about a dozen
 * passes and a dozen small operations per tensor; the results match that path's
 * conventions (see actstats/stats.py):
 *
 *   moments     -> the 8 raw-row columns: shift c, scale 1, sum(x - c), sum((x - c)^2),
 *                  min, max, zero count, saturated count. Sums in float32 lanes per
 *                  block of 512 values, blocks added in float64 (in float64 throughout
 *                  for a block far from, or very close to, the shift); a tensor holding
 *                  NaN or Inf gets sum = MARK * count, and min = max = NaN when it holds
 *                  a NaN (as aminmax gives).
 *                  Optionally also, per unit, the largest value (NaN when the unit saw a
 *                  NaN, as amax gives), fmax-merged into what is already there.
 *   sums        -> the sums alone, in float64 (for weights).
 *   histogram   -> float32 positions (x - low) * bins / (high - low), truncated,
 *                  clamped to the end bins, non-finite positions dropped; counts
 *                  added to a float64 vector.
 *   moments_binned -> moments and histogram in one pass: each block is binned while it is
 *                  in cache (for a histogram whose range is known before the read).
 *   rows_equal  -> are all rows of a [rows, width] matrix equal to the first one?
 *   masked_crc32c -> the checksum of TensorBoard's event records (its own is pure Python,
 *                  about 200 us per KB: more than the histograms it frames).
 *
 * Arguments are addresses (Tensor.data_ptr()) and sizes; the caller checks dtype,
 * device and layout. The interpreter lock is released while a kernel runs.
 *
 * Threads: moments, moments_binned, sums and histogram split a large tensor among the threads of PyTorch's own
 * OpenMP pool, as many as the caller asks (actstats passes torch.get_num_threads()). The pool is
 * found at import by name in the process (PyTorch's Linux wheels load their libgomp globally; the
 * other entry points are taken from the library that holds GOMP_parallel). Threads of our own
 * would compete with PyTorch's, which keep spinning for a while after each parallel operation;
 * the pool's threads are those. Without that runtime (other platforms, a build of PyTorch without
 * OpenMP), and in any child process forked after this module was imported (libgomp's pool does
 * not survive a fork; a child that imports this module only after the fork is not protected, as
 * PyTorch's own parallel operations are not there either), the kernels run on the calling
 * thread. Each thread takes a contiguous run of whole blocks (whole samples for fused unit
 * maxima, any run of values for the float64 sums) into a part of its own; the parts are merged
 * in thread order, so a result depends on the number of threads only through the order of
 * float64 additions (histogram counts not at all).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__linux__)
#include <dlfcn.h>
#include <pthread.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
/* one build runs the AVX2 code where the CPU has it, the baseline elsewhere */
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

#define MARK 1267650600228229401496703205376.0 /* 2**100, as stats.MARK */
#define EXPONENT 0x7f800000u

static int is_nonfinite(float v) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    return (bits & EXPONENT) == EXPONENT;
}

typedef struct {
    double sum, sumsq;
    int64_t zeros, saturated, nonfinite, nans;
    float min, max;
} Moments;

/* Values per block: the block's sums run in float32 lanes (a few dozen values each, as
 * exact as PyTorch's own float32 sums), its counts in int32 lanes; blocks add up in float64. */
#define BLOCK 512
#define FLUSH (1 << 30) /* histogram tallies are emptied before an int32 could overflow */
/* A block whose values lie further than this from the shift could overflow a float32 square;
 * one that lies closer than TINY (but not at 0) could underflow: both are summed in float64. */
#define HUGE_SPAN 18014398509481984.0f /* 2**54: 512 squares stay below 2**117 */
#define TINY_SPAN 9.094947017729282e-13f /* 2**-40 */

/* --- threads: PyTorch's OpenMP pool, when the process has one --------------------------- */

typedef void (*ParallelFn)(void (*)(void *), void *, unsigned, unsigned);
static ParallelFn gomp_parallel = NULL; /* GOMP_parallel(fn, data, threads, flags) */
static int (*omp_thread_num)(void) = NULL;
static int (*omp_num_threads)(void) = NULL;

#define MAX_TEAM 64
/* Values per thread below which a kernel does not split (waking a thread costs microseconds). */
#define TEAM_MIN_VALUES (1 << 16)

#if defined(__linux__)
static void team_after_fork(void) { /* in the child: the pool's threads were not copied */
    gomp_parallel = NULL;
}
#endif

static void team_init(void) {
#if defined(__linux__)
    void *found = dlsym(RTLD_DEFAULT, "GOMP_parallel");
    Dl_info where;
    void *runtime = NULL;
    if (found != NULL && dladdr(found, &where) && where.dli_fname != NULL)
        runtime = dlopen(where.dli_fname, RTLD_LAZY | RTLD_NOLOAD); /* that library, already loaded */
    if (runtime != NULL) {
        gomp_parallel = (ParallelFn)dlsym(runtime, "GOMP_parallel");
        omp_thread_num = (int (*)(void))dlsym(runtime, "omp_get_thread_num");
        omp_num_threads = (int (*)(void))dlsym(runtime, "omp_get_num_threads");
    }
    if (gomp_parallel == NULL || omp_thread_num == NULL || omp_num_threads == NULL
        || pthread_atfork(NULL, NULL, team_after_fork) != 0)
        gomp_parallel = NULL;
#endif
}

/* Threads to ask for: at most `threads` (PyTorch's count, from the caller), one per
 * TEAM_MIN_VALUES values of `values`, and `items` (the pieces to share). */
static int team_size(int64_t threads, int64_t values, int64_t items) {
    if (gomp_parallel == NULL)
        return 1;
    if (threads > values / TEAM_MIN_VALUES)
        threads = values / TEAM_MIN_VALUES;
    if (threads > items)
        threads = items;
    if (threads > MAX_TEAM)
        threads = MAX_TEAM;
    return threads < 1 ? 1 : (int)threads;
}

typedef void (*PieceFn)(void *job, int place, int team);

typedef struct {
    PieceFn piece;
    void *job;
    int asked; /* the threads asked for: the job's per-thread buffers hold that many parts */
    int team;  /* the threads that ran, written by thread 0 */
} TeamCall;

static void team_entry(void *data) {
    TeamCall *call = data;
    int place = omp_thread_num(), team = omp_num_threads();
    if (place == 0)
        call->team = team;
    if (team <= call->asked) /* a runtime that gave more threads than asked: run_team falls back */
        call->piece(call->job, place, team);
}

/* Run piece(job, place, team) for place = 0 .. team - 1, on `threads` threads of the pool (the
 * caller is one of them) or on the calling thread; return the team (the runtime may give fewer
 * threads than asked). Called without the interpreter lock. */
static int run_team(PieceFn piece, void *job, int threads) {
    if (threads > 1) {
        TeamCall call = {piece, job, threads, 1};
        gomp_parallel(team_entry, &call, (unsigned)threads, 0);
        if (call.team <= threads)
            return call.team;
    }
    piece(job, 0, 1);
    return 1;
}

/* Zeroed memory of `bytes` starting on a cache line (64 bytes), so that threads' parts laid out
 * in whole cache lines do not share one; `*block` is what to free. */
static void *zeroed_lines(size_t bytes, void **block) {
    char *raw = calloc(bytes + 64, 1);
    *block = raw;
    return raw == NULL ? NULL : (void *)(((uintptr_t)raw + 63) & ~(uintptr_t)63);
}

/* The part [*start, *end) of `items` that thread `place` of `team` takes. */
static void share(int64_t items, int place, int team, int64_t *start, int64_t *end) {
    *start = items * place / team;
    *end = items * (place + 1) / team;
}

/* --- binning into histograms ---------------------------------------------------------- */

VECTOR_CLONES
static void bin_index_f32(const float *x, int64_t n, float low, float per_unit, int32_t bins, int32_t *index) {
    float last = (float)(bins - 1);
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        float position = (x[i] - low) * per_unit;
        uint32_t bits;
        memcpy(&bits, &position, sizeof bits);
        int32_t bad = (bits & EXPONENT) == EXPONENT;
        position = position < 0.0f ? 0.0f : position > last ? last : position;
        index[i] = bad ? bins : (int32_t)position;
    }
}

/* Interleaved int32 tallies per thread, so that equal neighbours (a ReLU output's zeros) do not
 * wait on one another; bin_block's loop is unrolled for this many. */
#define TALLIES 8

/* Doubles a thread's histogram region takes: its `bins` float64 counts, then its tallies
 * (TALLIES * (bins + 1) int32, two per double), rounded up to whole cache lines. */
static int64_t binner_region(int64_t bins) {
    return (bins + TALLIES / 2 * (bins + 1) + 7) / 8 * 8;
}

/* One thread's histogram, in a zeroed region of binner_region(bins) doubles: blocks are tallied
 * into bins + 1 slots (the last one takes what is dropped: NaN, Inf, a position that overflows),
 * emptied into the float64 counts every FLUSH values and by binner_flush. */
typedef struct {
    float low, per_unit;
    int64_t bins, pending;
    double *counts;
    int32_t *tally;
} Binner;

static void binner_start(Binner *h, float low, float per_unit, int64_t bins, double *region) {
    *h = (Binner){low, per_unit, bins, 0, region, (int32_t *)(region + bins)};
}

static void binner_flush(Binner *h) {
    int64_t bins = h->bins, slots = bins + 1;
    for (int64_t b = 0; b < bins; b++) {
        int64_t total = 0;
        for (int k = 0; k < TALLIES; k++)
            total += h->tally[k * slots + b];
        h->counts[b] += (double)total;
    }
    memset(h->tally, 0, (size_t)(TALLIES * slots) * sizeof *h->tally);
    h->pending = 0;
}

/* Tally at most BLOCK values. */
static void bin_block(Binner *h, const float *x, int64_t size) {
    int64_t bins = h->bins, slots = bins + 1;
    int32_t *tally = h->tally;
    int32_t index[BLOCK + TALLIES - 1];
    bin_index_f32(x, size, h->low, h->per_unit, (int32_t)bins, index);
    for (int k = 0; k < TALLIES - 1; k++)
        index[size + k] = (int32_t)bins; /* padding: the dropped slot */
    for (int64_t i = 0; i < size; i += TALLIES) {
        tally[index[i]]++;
        tally[slots + index[i + 1]]++;
        tally[2 * slots + index[i + 2]]++;
        tally[3 * slots + index[i + 3]]++;
        tally[4 * slots + index[i + 4]]++;
        tally[5 * slots + index[i + 5]]++;
        tally[6 * slots + index[i + 6]]++;
        tally[7 * slots + index[i + 7]]++;
    }
    h->pending += size;
    if (h->pending >= FLUSH)
        binner_flush(h);
}

/* Add each thread's counts (regions `region` doubles apart) to `counts`. */
static void binner_gather(const double *regions, int64_t region, int team, int64_t bins, double *counts) {
    for (int t = 0; t < team; t++)
        for (int64_t b = 0; b < bins; b++)
            counts[b] += regions[t * region + b];
}

/* --- one-pass moments -------------------------------------------------------------------- */

typedef struct {
    float sum, sumsq, low, high;
    int32_t zeros, saturated, nonfinite, nans;
} Block;

/* What a block counts besides sums, extremes and non-finite values (each costs time per value). */
enum { COUNT_ZEROS = 1, COUNT_SATURATED = 2 };

/* One block. The loop is bound by its operations per value, so non-finite values are not
 * counted in it: a NaN makes the sum NaN, an Inf shows in min or max, and only then is the
 * block scanned again to count them (its sums are not used: the row keeps the count alone).
 * A NaN compares false, so min and max ignore it. */
static inline __attribute__((always_inline)) void block_body(const float *x, int64_t n, float shift, float mid,
                                                             float threshold, Block *b, const int what) {
    float sum = 0.0f, sumsq = 0.0f, low = INFINITY, high = -INFINITY;
    int32_t zeros = 0, saturated = 0, nonfinite = 0, nans = 0;
#pragma omp simd reduction(+ : sum, sumsq, zeros, saturated) reduction(min : low) reduction(max : high)
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        float d = v - shift;
        sum += d;
        sumsq += d * d;
        if (what & COUNT_ZEROS)
            zeros += v == 0.0f;
        if (what & COUNT_SATURATED)
            saturated += fabsf(v - mid) >= threshold;
        low = v < low ? v : low;
        high = v > high ? v : high;
    }
    if (sum != sum || low == -INFINITY || high == INFINITY || is_nonfinite(sum))
        for (int64_t i = 0; i < n; i++) {
            nonfinite += is_nonfinite(x[i]);
            nans += x[i] != x[i];
        }
    *b = (Block){sum, sumsq, low, high, zeros, saturated, nonfinite, nans};
}

VECTOR_CLONES
static void block_plain(const float *x, int64_t n, float shift, float mid, float threshold, Block *b) {
    block_body(x, n, shift, mid, threshold, b, 0);
}

VECTOR_CLONES
static void block_zeros(const float *x, int64_t n, float shift, float mid, float threshold, Block *b) {
    block_body(x, n, shift, mid, threshold, b, COUNT_ZEROS);
}

VECTOR_CLONES
static void block_all(const float *x, int64_t n, float shift, float mid, float threshold, Block *b) {
    block_body(x, n, shift, mid, threshold, b, COUNT_ZEROS | COUNT_SATURATED);
}

typedef void (*BlockFn)(const float *, int64_t, float, float, float, Block *);

/* The sums of a block of finite values in float64 (values far from the shift, or very close to
 * it: vanishing gradients). Vectorised, and as fast as the float32 pass: both wait on memory. */
VECTOR_CLONES
static void block_sums_f64(const float *x, int64_t n, float shift, double *sum, double *sumsq) {
    double s = 0.0, q = 0.0;
#pragma omp simd reduction(+ : s, q)
    for (int64_t i = 0; i < n; i++) {
        double d = (double)x[i] - (double)shift;
        s += d;
        q += d * d;
    }
    *sum += s;
    *sumsq += q;
}

static void moments_start(Moments *m) {
    memset(m, 0, sizeof *m);
    m->min = INFINITY;
    m->max = -INFINITY;
}

/* Add one block of at most BLOCK values to m; the block's own figures are left in b. */
static void moments_add(const float *x, int64_t size, float shift, float mid, float threshold, BlockFn block,
                        Binner *h, Moments *m, Block *block_out) {
    Block b;
    block(x, size, shift, mid, threshold, &b);
    if (h != NULL) /* the block is in the L1 cache now */
        bin_block(h, x, size);
    *block_out = b;
    float span = fmaxf(b.high - shift, shift - b.low);
    if (b.nonfinite == 0 && (span > HUGE_SPAN || (span > 0.0f && span < TINY_SPAN) || is_nonfinite(b.sumsq))) {
        block_sums_f64(x, size, shift, &m->sum, &m->sumsq);
    } else {
        m->sum += b.sum;
        m->sumsq += b.sumsq;
    }
    m->zeros += b.zeros;
    m->saturated += b.saturated;
    m->nonfinite += b.nonfinite;
    m->nans += b.nans;
    m->min = b.low < m->min ? b.low : m->min;
    m->max = b.high > m->max ? b.high : m->max;
}

static void moments_f32(const float *x, int64_t n, float shift, float mid, float threshold, BlockFn block,
                        Binner *h, Moments *m) {
    Block b;
    moments_start(m);
    for (int64_t start = 0; start < n; start += BLOCK)
        moments_add(x + start, n - start < BLOCK ? n - start : BLOCK, shift, mid, threshold, block, h, m, &b);
}

VECTOR_CLONES
static void row_max_f32(const float *x, int64_t units, float *high, char *nan) {
#pragma omp simd
    for (int64_t u = 0; u < units; u++) {
        float v = x[u];
        high[u] = v > high[u] ? v : high[u];
        nan[u] |= v != v;
    }
}

/* The largest of n values merged into *high (NaN ignored there), and whether one was NaN into *nan;
 * inlined into the callers' own vector clones. */
static inline __attribute__((always_inline)) void run_max(const float *x, int64_t n, float *high, char *nan) {
    float h = -INFINITY;
    int any_nan = 0;
#pragma omp simd reduction(max : h) reduction(| : any_nan)
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        h = v > h ? v : h;
        any_nan |= v != v;
    }
    *high = h > *high ? h : *high;
    *nan |= any_nan;
}

VECTOR_CLONES
static void block_max_f32(const float *x, int64_t n, float *high, char *nan) {
    run_max(x, n, high, nan);
}

/* moments_f32 of x seen as [outer, units, inner] with inner >= BLOCK, and each unit's largest
 * value: a block lies within one unit, and its maximum is the block's own, swept again only
 * when the block holds NaN or Inf (the block's maximum ignores NaN). */
static void moments_units_f32(const float *x, int64_t outer, int64_t units, int64_t inner, float shift, float mid,
                              float threshold, BlockFn block, Binner *h, Moments *m, float *high, char *nan) {
    Block b;
    moments_start(m);
    for (int64_t o = 0; o < outer; o++) {
        const float *slab = x + o * units * inner;
        for (int64_t u = 0; u < units; u++) {
            for (int64_t i = 0; i < inner; i += BLOCK) {
                int64_t size = inner - i < BLOCK ? inner - i : BLOCK;
                moments_add(slab + u * inner + i, size, shift, mid, threshold, block, h, m, &b);
                if (b.nonfinite)
                    block_max_f32(slab + u * inner + i, size, high + u, nan + u);
                else if (b.high > high[u])
                    high[u] = b.high;
            }
        }
    }
}

/* Each unit's largest value in x seen as [outer, units, inner] with inner < BLOCK, in a pass
 * of its own (the moments then read whole blocks: a block per unit would be a few values). */
VECTOR_CLONES
static void units_max_f32(const float *x, int64_t outer, int64_t units, int64_t inner, float *high, char *nan) {
    for (int64_t o = 0; o < outer; o++) {
        const float *slab = x + o * units * inner;
        if (inner == 1) {
            row_max_f32(slab, units, high, nan);
            continue;
        }
        for (int64_t u = 0; u < units; u++) {
            const float *run = slab + u * inner;
            if (inner >= 16) {
                run_max(run, inner, high + u, nan + u);
                continue;
            }
            /* a few values per unit: vector lanes would cost more than they save */
            float h = high[u];
            int any_nan = 0;
            for (int64_t i = 0; i < inner; i++) {
                h = run[i] > h ? run[i] : h;
                any_nan |= run[i] != run[i];
            }
            high[u] = h;
            nan[u] |= any_nan;
        }
    }
}

/* Add the part p to m. */
static void moments_merge(Moments *m, const Moments *p) {
    m->sum += p->sum;
    m->sumsq += p->sumsq;
    m->zeros += p->zeros;
    m->saturated += p->saturated;
    m->nonfinite += p->nonfinite;
    m->nans += p->nans;
    m->min = p->min < m->min ? p->min : m->min;
    m->max = p->max > m->max ? p->max : m->max;
}

typedef struct {
    const float *x;
    int64_t n, outer, units, inner;
    float shift, mid, threshold;
    BlockFn block;
    int fused; /* unit maxima come out of the moments' own blocks (see moments_units_f32) */
    float *high; /* unit maxima: a row of `stride` per thread (whole cache lines) */
    char *nan;
    int64_t stride;
    /* a histogram binned in the same pass (bins 0: none): each thread's region of `region`
     * doubles in `hist` (see Binner) */
    float low, per_unit;
    int64_t bins, region;
    double *hist;
    Moments part[MAX_TEAM];
} MomentsJob;

static void moments_piece(void *data, int place, int team) {
    MomentsJob *job = data;
    Moments m; /* here, not in job->part: neighbours' parts share cache lines */
    int64_t start, end;
    float *high = job->high + place * job->stride;
    char *nan = job->nan + place * job->stride;
    Binner binner, *h = NULL;
    if (job->bins) {
        binner_start(&binner, job->low, job->per_unit, job->bins, job->hist + place * job->region);
        h = &binner;
    }
    if (job->fused) { /* whole samples (outer indices), each thread with maxima of its own */
        share(job->outer, place, team, &start, &end);
        moments_units_f32(job->x + start * job->units * job->inner, end - start, job->units, job->inner,
                          job->shift, job->mid, job->threshold, job->block, h, &m, high, nan);
    } else {
        share((job->n + BLOCK - 1) / BLOCK, place, team, &start, &end); /* whole blocks of the flat values */
        start *= BLOCK;
        end = end * BLOCK < job->n ? end * BLOCK : job->n;
        moments_f32(job->x + start, end - start, job->shift, job->mid, job->threshold, job->block, h, &m);
        if (job->high != NULL) { /* and the maxima of whole samples */
            share(job->outer, place, team, &start, &end);
            units_max_f32(job->x + start * job->units * job->inner, end - start, job->units, job->inner, high, nan);
        }
    }
    if (h != NULL)
        binner_flush(h);
    job->part[place] = m;
}

/* False, with a TypeError set, unless a kernel got `expected` (or `also`) arguments. */
static int argument_count(const char *kernel, Py_ssize_t nargs, Py_ssize_t expected, Py_ssize_t also) {
    if (nargs == expected || nargs == also)
        return 1;
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments, got %zd", kernel, expected, nargs);
    return 0;
}

/* The leading (float32 values address, count) pair every kernel takes, from args[0] and args[1];
 * the caller checks PyErr_Occurred(). */
static void values_argument(PyObject *const *args, const float **x, int64_t *n) {
    *x = (const float *)PyLong_AsVoidPtr(args[0]);
    *n = PyLong_AsLongLong(args[1]);
}

/* moments(x_ptr, n, out_ptr, threads, zeros, saturation, mid, threshold[, units_ptr, outer, units, inner, merge]):
 * out_ptr -> 8 float64; with the unit arguments, x is [outer, units, inner] and units_ptr -> `units`
 * float32 maxima (NaN for a unit that saw a NaN, as amax gives), written or fmax-merged. */
static PyObject *moments_call(PyObject *const *args, Py_ssize_t nargs, int binned) {
    const Py_ssize_t u = binned ? 11 : 8; /* where the unit arguments start */
    if (!argument_count(binned ? "moments_binned" : "moments", nargs, u, u + 5))
        return NULL;
    const float *x;
    int64_t n;
    values_argument(args, &x, &n);
    double *out = (double *)PyLong_AsVoidPtr(args[2]);
    int64_t asked = PyLong_AsLongLong(args[3]);
    int want_zeros = PyObject_IsTrue(args[4]);
    int want_saturation = PyObject_IsTrue(args[5]);
    double mid = PyFloat_AsDouble(args[6]);
    double threshold = PyFloat_AsDouble(args[7]);
    float *unit_out = NULL;
    int64_t outer = 0, units = 0, inner = 0;
    int merge = 0;
    if (nargs == u + 5) {
        unit_out = (float *)PyLong_AsVoidPtr(args[u]);
        outer = PyLong_AsLongLong(args[u + 1]);
        units = PyLong_AsLongLong(args[u + 2]);
        inner = PyLong_AsLongLong(args[u + 3]);
        merge = PyObject_IsTrue(args[u + 4]);
    }
    const double *bounds = NULL;
    double *counts = NULL;
    int64_t bins = 0;
    if (binned) {
        bounds = (const double *)PyLong_AsVoidPtr(args[8]);
        bins = PyLong_AsLongLong(args[9]);
        counts = (double *)PyLong_AsVoidPtr(args[10]);
    }
    if (PyErr_Occurred())
        return NULL;
    if (binned && (bins <= 0 || bins >= INT32_MAX)) {
        PyErr_SetString(PyExc_ValueError, "moments_binned needs between 1 and 2**31 - 2 bins");
        return NULL;
    }
    if (n <= 0 || (unit_out != NULL && (units <= 0 || outer <= 0 || inner <= 0 || outer * units * inner != n))) {
        PyErr_SetString(PyExc_ValueError, "moments needs values, and a [outer, units, inner] layout of them");
        return NULL;
    }
    float shift = is_nonfinite(x[0]) ? 0.0f : x[0];
    int fused = unit_out != NULL && inner >= BLOCK;
    MomentsJob job = {x, n, outer, units, inner, shift, (float)mid, (float)threshold,
                      want_saturation ? block_all : want_zeros ? block_zeros : block_plain, fused, NULL, NULL,
                      (units + 63) / 64 * 64, 0.0f, 0.0f, 0, 0, NULL};
    int threads = team_size(asked, n, fused ? outer : (n + BLOCK - 1) / BLOCK);
    void *high_block = NULL, *nan_block = NULL, *hist_block = NULL;
    if (binned) { /* as histogram() bins: float32 low and per_unit */
        float low = (float)bounds[0], high = (float)bounds[1];
        job.low = low;
        job.per_unit = (float)bins / (high - low);
        job.bins = bins;
        job.region = binner_region(bins);
        job.hist = zeroed_lines((size_t)(threads * job.region) * sizeof *job.hist, &hist_block);
        if (job.hist == NULL)
            return PyErr_NoMemory();
    }
    if (unit_out != NULL) {
        job.high = zeroed_lines((size_t)(threads * job.stride) * sizeof *job.high, &high_block);
        job.nan = zeroed_lines((size_t)(threads * job.stride), &nan_block);
        if (job.high == NULL || job.nan == NULL) {
            free(high_block);
            free(nan_block);
            free(hist_block);
            return PyErr_NoMemory();
        }
        for (int64_t u = 0; u < threads * job.stride; u++)
            job.high[u] = -INFINITY;
    }
    Moments m;
    Py_BEGIN_ALLOW_THREADS
    int team = run_team(moments_piece, &job, threads);
    m = job.part[0];
    for (int t = 1; t < team; t++)
        moments_merge(&m, &job.part[t]);
    if (unit_out != NULL) {
        for (int64_t u = 0; u < units; u++) {
            float high = job.high[u];
            char any_nan = job.nan[u];
            for (int t = 1; t < team; t++) {
                high = job.high[t * job.stride + u] > high ? job.high[t * job.stride + u] : high;
                any_nan |= job.nan[t * job.stride + u];
            }
            float value = any_nan ? NAN : high;
            unit_out[u] = merge ? fmaxf(unit_out[u], value) : value;
        }
    }
    if (binned)
        binner_gather(job.hist, job.region, team, bins, counts);
    Py_END_ALLOW_THREADS
    free(high_block);
    free(nan_block);
    free(hist_block);
    int nan = m.nans > 0;
    out[0] = shift;
    out[1] = 1.0;
    out[2] = m.nonfinite ? MARK * (double)m.nonfinite : m.sum;
    out[3] = m.nonfinite ? 0.0 : m.sumsq;
    out[4] = nan ? NAN : m.min; /* as aminmax: NaN when there is one */
    out[5] = nan ? NAN : m.max;
    out[6] = want_zeros ? (double)m.zeros : 0.0;
    out[7] = want_saturation ? (double)m.saturated : 0.0;
    Py_RETURN_NONE;
}

static PyObject *py_moments(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return moments_call(args, nargs, 0);
}

/* moments_binned(x_ptr, n, out_ptr, threads, zeros, saturation, mid, threshold, bounds_ptr, bins, counts_ptr
 *                [, units_ptr, outer, units, inner, merge]): moments(), and x's values added to `bins`
 * float64 counts over the 2 float64 bounds, as histogram() adds them, in the same pass. */
static PyObject *py_moments_binned(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return moments_call(args, nargs, 1);
}

typedef struct {
    const float *x;
    int64_t n;
    float shift;
    double sum[MAX_TEAM], sumsq[MAX_TEAM];
} SumsJob;

/* A run of values (not whole blocks: the sums are float64 throughout). */
static void sums_piece(void *data, int place, int team) {
    SumsJob *job = data;
    int64_t start, end;
    double sum = 0.0, sumsq = 0.0;
    share(job->n, place, team, &start, &end);
    block_sums_f64(job->x + start, end - start, job->shift, &sum, &sumsq);
    job->sum[place] = sum;
    job->sumsq[place] = sumsq;
}

/* sums(x_ptr, n, out_ptr, threads): out_ptr -> 8 float64: shift c, scale 1, sum(x - c), sum((x - c)^2) in
 * float64, then zeros (no min, max or counts: for weights; NaN or Inf make the sums NaN or Inf). */
static PyObject *py_sums(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!argument_count("sums", nargs, 4, 4))
        return NULL;
    const float *x;
    int64_t n;
    values_argument(args, &x, &n);
    double *out = (double *)PyLong_AsVoidPtr(args[2]);
    int64_t asked = PyLong_AsLongLong(args[3]);
    if (PyErr_Occurred())
        return NULL;
    if (n <= 0) {
        PyErr_SetString(PyExc_ValueError, "sums needs at least one value");
        return NULL;
    }
    SumsJob job = {x, n, x[0]};
    double sum = 0.0, sumsq = 0.0;
    Py_BEGIN_ALLOW_THREADS
    int team = run_team(sums_piece, &job, team_size(asked, n, n));
    for (int t = 0; t < team; t++) {
        sum += job.sum[t];
        sumsq += job.sumsq[t];
    }
    Py_END_ALLOW_THREADS
    double row[8] = {job.shift, 1.0, sum, sumsq, 0.0, 0.0, 0.0, 0.0};
    memcpy(out, row, sizeof row);
    Py_RETURN_NONE;
}

typedef struct {
    const float *x;
    int64_t n;
    float low, per_unit;
    int64_t bins, region;
    double *counts; /* per thread, a region of `region` doubles (see Binner) */
} HistogramJob;

/* Bin this thread's run of whole blocks into its own counts. */
static void histogram_piece(void *data, int place, int team) {
    HistogramJob *job = data;
    Binner h;
    int64_t start, end;
    binner_start(&h, job->low, job->per_unit, job->bins, job->counts + place * job->region);
    share((job->n + BLOCK - 1) / BLOCK, place, team, &start, &end);
    for (int64_t block = start; block < end; block++) {
        int64_t first = block * BLOCK, size = job->n - first < BLOCK ? job->n - first : BLOCK;
        bin_block(&h, job->x + first, size);
    }
    binner_flush(&h);
}

/* histogram(x_ptr, n, bounds_ptr, bins, counts_ptr, threads): bounds -> 2 float64, counts -> bins float64 */
static PyObject *py_histogram(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!argument_count("histogram", nargs, 6, 6))
        return NULL;
    const float *x;
    int64_t n;
    values_argument(args, &x, &n);
    const double *bounds = (const double *)PyLong_AsVoidPtr(args[2]);
    int64_t bins = PyLong_AsLongLong(args[3]);
    double *counts = (double *)PyLong_AsVoidPtr(args[4]);
    int64_t asked = PyLong_AsLongLong(args[5]);
    if (PyErr_Occurred())
        return NULL;
    if (bins <= 0 || bins >= INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "histogram needs between 1 and 2**31 - 2 bins");
        return NULL;
    }
    float low = (float)bounds[0], high = (float)bounds[1];
    /* a thread more only for at least 8 values per slot: each one sets up and merges all the bins */
    int64_t blocks = (n + BLOCK - 1) / BLOCK, per_slots = n / (8 * (bins + 1));
    int threads = team_size(asked, n, blocks < per_slots ? blocks : per_slots);
    HistogramJob job = {x, n, low, (float)bins / (high - low), bins, binner_region(bins), NULL};
    void *block;
    job.counts = zeroed_lines((size_t)(threads * job.region) * sizeof *job.counts, &block);
    if (job.counts == NULL)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    int team = run_team(histogram_piece, &job, threads);
    binner_gather(job.counts, job.region, team, bins, counts);
    Py_END_ALLOW_THREADS
    free(block);
    Py_RETURN_NONE;
}

VECTOR_CLONES
static int row_differs_f32(const float *row, const float *first, int64_t width) {
    int differs = 0;
#pragma omp simd reduction(| : differs)
    for (int64_t j = 0; j < width; j++)
        differs |= (row[j] - first[j]) != 0.0f; /* NaN differs; -0.0 equals 0.0 */
    return differs;
}

/* rows_equal(x_ptr, rows, width) -> bool: every row of [rows, width] equals the first */
static PyObject *py_rows_equal(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!argument_count("rows_equal", nargs, 3, 3))
        return NULL;
    const float *x;
    int64_t rows;
    values_argument(args, &x, &rows);
    int64_t width = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    int equal = 1;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t r = 0; r < rows && equal; r++) /* row 0 too: a NaN in it makes it differ from itself */
        equal = !row_differs_f32(x + r * width, x, width);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(equal);
}

/* CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as TFRecord framing uses it. */
static uint32_t crc_table[256];

static void crc_table_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc_table[i] = c;
    }
}

/* masked_crc32c(data) -> int: the masked CRC-32C of a bytes-like object, as TensorBoard's
 * record writer computes it in Python ((crc >> 15 | crc << 17) + 0xA282EAD8, 32 bits). */
static PyObject *py_masked_crc32c(PyObject *self, PyObject *data) {
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) != 0)
        return NULL;
    const unsigned char *p = view.buf;
    uint32_t crc = 0xFFFFFFFFu;
    for (Py_ssize_t i = 0; i < view.len; i++)
        crc = crc_table[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
    PyBuffer_Release(&view);
    crc ^= 0xFFFFFFFFu;
    uint32_t masked = ((crc >> 15) | (crc << 17)) + 0xA282EAD8u;
    return PyLong_FromUnsignedLong(masked);
}

/* team(n, threads) -> int: the threads a kernel asked for `threads` would use to read n values */
static PyObject *py_team(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!argument_count("team", nargs, 2, 2))
        return NULL;
    int64_t n = PyLong_AsLongLong(args[0]), threads = PyLong_AsLongLong(args[1]);
    if (PyErr_Occurred())
        return NULL;
    return PyLong_FromLong(team_size(threads, n, n));
}

static PyMethodDef methods[] = {
    {"moments", (PyCFunction)(void (*)(void))py_moments, METH_FASTCALL, "Raw-row moments of a float32 vector."},
    {"moments_binned", (PyCFunction)(void (*)(void))py_moments_binned, METH_FASTCALL,
     "Raw-row moments of a float32 vector, and its values added to bin counts."},
    {"sums", (PyCFunction)(void (*)(void))py_sums, METH_FASTCALL, "Float64 sums of a float32 vector."},
    {"histogram", (PyCFunction)(void (*)(void))py_histogram, METH_FASTCALL, "Add float32 values to bin counts."},
    {"rows_equal", (PyCFunction)(void (*)(void))py_rows_equal, METH_FASTCALL, "Are all rows equal to the first?"},
    {"masked_crc32c", py_masked_crc32c, METH_O, "TensorBoard's masked CRC-32C of a bytes-like object."},
    {"team", (PyCFunction)(void (*)(void))py_team, METH_FASTCALL, "Threads a kernel would use to read n values."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "One-pass statistics kernels.", -1, methods};

/* What actstats/native.py expects (KERNELS_VERSION there): raised when a kernel is added or
 * changes its arguments, so that a build older than the Python code is not used. */
#define KERNELS_VERSION 2

PyMODINIT_FUNC PyInit__native(void) {
    crc_table_init();
    team_init();
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "VERSION", KERNELS_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
