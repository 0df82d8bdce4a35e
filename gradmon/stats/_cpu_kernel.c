/*
 * gradmon.stats._cpu_kernel: the CPU fast path for the 8-column partials (see layout.py).
 *
 * A plain CPython extension, no torch headers: Python passes raw data pointers, element
 * counts, dtype codes and an output buffer of T*8 doubles (row-major [T, 8]); the wrapper
 * in cpu.py owns the checks this side cannot make (devices, sizes, lifetimes).
 *
 * Design:
 *  - One read of the data, in blocks of BLOCK elements. Each statistic keeps independent
 *    accumulator lanes, which is what lets gcc -O3 vectorise without -ffast-math: the
 *    IEEE semantics (NaN, Inf, signed zero) stay intact.
 *  - Sums and sums of squares accumulate in double even for float input, so they are as
 *    accurate as a float64 pass and x*x cannot overflow.
 *  - The fast step ignores NaN/Inf entirely. A NaN or Inf makes the block's sum
 *    non-finite; only then is the block redone by the careful step, which classifies and
 *    masks them. Clean data never pays for the bookkeeping.
 *  - Tensors are cut into work items of CHUNK elements. Each item's partial is stored and
 *    the partials are combined per tensor in item order, so the result does not depend on
 *    the thread count or on which thread ran which item: it is bit-identical run to run.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <fenv.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2, DT_F64 = 3, DT_COUNT = 4 };
/* Added to a dtype code: only the sum of squares is wanted (a parameter norm), and the
 * row's other columns are NaN. One accumulator per element instead of five: a weight
 * costs about half a gradient. */
enum { NORM_ONLY = 16 };
enum { C_SUMSQ, C_SUM, C_ABSMAX, C_MIN, C_MAX, C_ZERO, C_NAN, C_INF, NCOLS };

#ifndef LANE_BYTES
#define LANE_BYTES 128 /* input bytes per step over all lanes: 32 float or 16 double lanes */
#endif
#define BLOCK 4096                      /* elements per block: the unit of the careful redo */
#define CHUNK ((int64_t)1 << 16)        /* elements per work item: the unit of threading */
#define MIN_PARALLEL ((int64_t)1 << 18) /* fewer elements in total: waking a helper costs more */
#define MAX_THREADS 64
#define MAX_STEP 1024 /* items claimed at once, at most (see job_t) */

/* Runtime ISA dispatch on x86-64 ELF: the per-item routine is compiled for AVX-512
 * (x86-64-v4), AVX2 (x86-64-v3) and the baseline, and the loader picks the best one, so
 * the wheel needs no -march. With -ffp-contract=fast (setup.py) the v3/v4 clones fuse the
 * x*x + q of the sum of squares into an FMA: results may differ across CPUs in the last
 * bits, never across runs on one machine. Other platforms get the plain build. */
#if defined(__GNUC__) && defined(__x86_64__) && defined(__ELF__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif
/* The block routines must be inlined into each clone to be compiled for its ISA. */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

typedef struct {
    double sumsq, sum, mn, mx;
    int64_t zeros, nans, infs;
} part_t;

typedef struct {
    const void *ptr;
    int64_t start, len;
    int dtype, norm_only;
    part_t part;
} item_t;

static inline float from_bits_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t to_bits_float(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline double from_bits_double(uint64_t u) { double f; memcpy(&f, &u, 8); return f; }
static inline uint64_t to_bits_double(double f) { uint64_t u; memcpy(&u, &f, 8); return u; }

/* Exact fp16 -> fp32 in integer and float ops that vectorise on any ISA. A subnormal is
 * made by subtracting two normal floats, so it survives DAZ. The selects are masks, not
 * ?:, because gcc turns a ?: guarding an FP op into a branch (under the default
 * -ftrapping-math it may not execute the op speculatively), and a branch blocks SIMD. */
static inline float load_f16(uint16_t h) {
    uint32_t em = h & 0x7fffu, sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t special = (em << 13) | 0x7f800000u; /* inf/nan, payload kept */
    uint32_t normal = (em << 13) + (112u << 23); /* exponent bias 15 -> 127 */
    uint32_t sub = to_bits_float(from_bits_float(em | 0x3f000000u) - 0.5f); /* m * 2^-24 */
    uint32_t is_special = 0u - (uint32_t)(em >= 0x7c00u), is_sub = 0u - (uint32_t)(em < 0x400u);
    uint32_t b = (special & is_special) | (sub & is_sub) | (normal & ~(is_special | is_sub));
    return from_bits_float(b | sign);
}
static inline float load_bf16(uint16_t h) { return from_bits_float((uint32_t)h << 16); }

/* Per-element steps on lane j. The careful step tells NaN/Inf apart by bit pattern and
 * masks them with integer selects, for the same reason as in load_f16. The ?: form of the
 * zero count in the fast step compiles to a masked add (one op fewer on AVX-512). */
#define FAST_STEP(VAL, UT, x, j)                                                           \
    do {                                                                                   \
        double d_ = (double)(x);                                                           \
        s[j] += d_;                                                                        \
        q[j] += d_ * d_;                                                                   \
        mn[j] = (x) < mn[j] ? (x) : mn[j];                                                 \
        mx[j] = (x) > mx[j] ? (x) : mx[j];                                                 \
        z[j] = (x) == (VAL)0 ? z[j] + 1 : z[j];                                            \
    } while (0)

#define CAREFUL_STEP(VAL, UT, x, j)                                                        \
    do {                                                                                   \
        const UT sign_ = (UT)1 << (sizeof(UT) * 8 - 1), inf_ = to_bits_##VAL(INFINITY);    \
        UT b_ = to_bits_##VAL(x), a_ = b_ & ~sign_;                                        \
        UT fin_ = (UT)0 - (UT)(a_ < inf_); /* all ones iff finite */                       \
        double d_ = (double)from_bits_##VAL(b_ & fin_); /* NaN/Inf -> +0 */                \
        s[j] += d_;                                                                        \
        q[j] += d_ * d_;                                                                   \
        VAL lo_ = from_bits_##VAL((b_ & fin_) | (inf_ & ~fin_));                           \
        VAL hi_ = from_bits_##VAL((b_ & fin_) | ((inf_ | sign_) & ~fin_));                 \
        mn[j] = lo_ < mn[j] ? lo_ : mn[j];                                                 \
        mx[j] = hi_ > mx[j] ? hi_ : mx[j];                                                 \
        z[j] += (x) == (VAL)0;                                                             \
        nn[j] += a_ > inf_;                                                                \
        ni[j] += a_ == inf_;                                                               \
    } while (0)

/* One block of n <= BLOCK values; lane j takes elements j, j + LANES, ..., and the lanes
 * are reduced in a fixed order. The fast version returns 0, adding nothing, if the block's
 * sum is not finite: NaN/Inf present (a double sum of finite floats cannot overflow; for
 * double input a finite overflow also lands here, and the redo gives the oracle's inf).
 * The careful version returns 0 if the block held NaN/Inf. */
#define DEFINE_BLOCK(NAME, VAL, UT, ZT, STEP, CAREFUL)                                     \
    ALWAYS_INLINE int NAME(const VAL *p, int64_t n, part_t *r) {                           \
        enum { LANES = LANE_BYTES / sizeof(VAL) };                                         \
        double s[LANES] = {0}, q[LANES] = {0};                                             \
        VAL mn[LANES], mx[LANES];                                                          \
        ZT z[LANES] = {0}, nn[LANES] = {0}, ni[LANES] = {0}; /* as wide as VAL, like masks */ \
        for (int j = 0; j < LANES; j++) mn[j] = (VAL)INFINITY, mx[j] = -(VAL)INFINITY;     \
        int64_t i = 0;                                                                     \
        for (; i + LANES <= n; i += LANES)                                                 \
            for (int j = 0; j < LANES; j++) STEP(VAL, UT, p[i + j], j);                    \
        for (int j = 0; i + j < n; j++) STEP(VAL, UT, p[i + j], j);                        \
        double S = 0, Q = 0;                                                               \
        int64_t Z = 0, NN = 0, NI = 0;                                                     \
        VAL MN_ = (VAL)INFINITY, MX_ = -(VAL)INFINITY; /* in VAL: no conversion per lane */ \
        for (int j = 0; j < LANES; j++) {                                                  \
            S += s[j], Q += q[j], Z += z[j], NN += nn[j], NI += ni[j];                     \
            MN_ = mn[j] < MN_ ? mn[j] : MN_;                                               \
            MX_ = mx[j] > MX_ ? mx[j] : MX_;                                               \
        }                                                                                  \
        double MN = (double)MN_, MX = (double)MX_;                                         \
        if (!(CAREFUL) && !isfinite(S)) return 0;                                          \
        r->sum += S, r->sumsq += Q, r->zeros += Z, r->nans += NN, r->infs += NI;           \
        r->mn = MN < r->mn ? MN : r->mn;                                                   \
        r->mx = MX > r->mx ? MX : r->mx;                                                   \
        return NN + NI == 0;                                                               \
    }

/* The sum of squares alone, with the lanes and order of the fast step's (the same bits).
 * Returns 0, adding nothing, if it is not finite: then the careful step redoes the block
 * (its sum of squares leaves NaN/Inf out, as for a gradient). */
#define DEFINE_NORM(NAME, VAL)                                                             \
    ALWAYS_INLINE int NAME(const VAL *p, int64_t n, part_t *r) {                           \
        enum { LANES = LANE_BYTES / sizeof(VAL) };                                         \
        double q[LANES] = {0};                                                             \
        int64_t i = 0;                                                                     \
        for (; i + LANES <= n; i += LANES)                                                 \
            for (int j = 0; j < LANES; j++) q[j] += (double)p[i + j] * (double)p[i + j];   \
        for (int j = 0; i + j < n; j++) q[j] += (double)p[i + j] * (double)p[i + j];       \
        double Q = 0;                                                                      \
        for (int j = 0; j < LANES; j++) Q += q[j];                                         \
        if (!isfinite(Q)) return 0;                                                        \
        r->sumsq += Q;                                                                     \
        return 1;                                                                          \
    }

DEFINE_NORM(norm_f32, float)
DEFINE_NORM(norm_f64, double)
DEFINE_BLOCK(fast_f32, float, uint32_t, int32_t, FAST_STEP, 0)
DEFINE_BLOCK(careful_f32, float, uint32_t, int32_t, CAREFUL_STEP, 1)
DEFINE_BLOCK(fast_f64, double, uint64_t, int64_t, FAST_STEP, 0)
DEFINE_BLOCK(careful_f64, double, uint64_t, int64_t, CAREFUL_STEP, 1)

/* fp16/bf16 blocks are widened (exactly) into a float scratch block by a plain loop that
 * vectorises on its own, and then take the float path. */
MULTIVERSION static void run_item(item_t *it) {
    part_t *r = &it->part;
    *r = (part_t){0.0, 0.0, INFINITY, -INFINITY, 0, 0, 0};
    int dirty = 0; /* after a block with NaN/Inf, skip the fast try until a clean block */
    float tmp[BLOCK];
    for (int64_t b = 0; b < it->len; b += BLOCK) {
        int64_t n = it->len - b < BLOCK ? it->len - b : BLOCK, at = it->start + b;
        if (it->dtype == DT_F64) {
            const double *p = (const double *)it->ptr + at;
            if (it->norm_only ? !norm_f64(p, n, r) : dirty || !fast_f64(p, n, r))
                dirty = !careful_f64(p, n, r);
            continue;
        }
        const float *p = (const float *)it->ptr + at;
        const uint16_t *h = (const uint16_t *)it->ptr + at;
        if (it->dtype == DT_F16) {
            for (int64_t i = 0; i < n; i++) tmp[i] = load_f16(h[i]);
            p = tmp;
        } else if (it->dtype == DT_BF16) {
            for (int64_t i = 0; i < n; i++) tmp[i] = load_bf16(h[i]);
            p = tmp;
        }
        if (it->norm_only ? !norm_f32(p, n, r) : dirty || !fast_f32(p, n, r))
            dirty = !careful_f32(p, n, r);
    }
}

/* One call's work. Items are claimed from a shared counter, `step` at a time, so threads
 * that get a core take over the share of one that does not. A step covers about CHUNK
 * elements: claimed one at a time, the items of many small tensors (a 256-element grad
 * is an item) made the counter's cache line bounce between cores at every item, and two
 * threads ran no faster than one (measured: 40,000 tensors of 256 floats). */
typedef struct {
    item_t *items;
    int64_t nitems, step;
    atomic_llong next;
    atomic_int seats; /* helpers that may still join */
    fenv_t env;       /* the caller's FP environment (DAZ/FTZ): helpers adopt it */
} job_t;

static void drain(job_t *j) {
    for (int64_t k; (k = atomic_fetch_add(&j->next, j->step)) < j->nitems;)
        for (int64_t end = k + j->step < j->nitems ? k + j->step : j->nitems; k < end; k++)
            run_item(&j->items[k]);
}

/* A persistent pool of helper threads that sleep on a condition variable between calls.
 * Not a thread per call: a new thread tends to be queued on its busy parent's CPU and
 * start late (~2 ms measured on a 2-vCPU VM), while a sleeping one wakes on its own CPU
 * (~10 us). One call uses the pool at a time; a concurrent call works on its own thread. */
static struct {
    pthread_mutex_t owner; /* held by the call that uses the pool */
    pthread_mutex_t mu;    /* guards the fields below */
    pthread_cond_t wake, idle;
    job_t *job;   /* the current job, NULL between calls */
    uint64_t gen; /* bumped per job, so a helper joins each job at most once */
    int size;     /* helpers started */
    int busy;     /* helpers inside the current job */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
          PTHREAD_COND_INITIALIZER, NULL, 0, 0, 0};

static void *helper(void *arg) {
    uint64_t seen = 0;
    (void)arg;
    pthread_mutex_lock(&pool.mu);
    for (;;) {
        while (pool.gen == seen) pthread_cond_wait(&pool.wake, &pool.mu);
        seen = pool.gen;
        job_t *j = pool.job; /* NULL if that job finished before this helper woke */
        if (!j || atomic_fetch_sub(&j->seats, 1) <= 0) continue;
        pool.busy++;
        pthread_mutex_unlock(&pool.mu);
        fesetenv(&j->env);
        drain(j);
        pthread_mutex_lock(&pool.mu);
        if (--pool.busy == 0) pthread_cond_signal(&pool.idle);
    }
    return NULL;
}

/* The calling thread works too; helpers that cannot be created are simply not needed. */
static void run_all(item_t *items, int64_t nitems, int64_t total, int nthreads) {
    int64_t step = total > 0 ? CHUNK * nitems / total : 1; /* items per CHUNK elements */
    job_t j = {.items = items,
               .nitems = nitems,
               .step = step < 1 ? 1 : step > MAX_STEP ? MAX_STEP : step,
               .seats = nthreads - 1};
    atomic_init(&j.next, 0);
    if (nthreads <= 1 || pthread_mutex_trylock(&pool.owner) != 0) {
        drain(&j);
        return;
    }
    fegetenv(&j.env);
    pthread_mutex_lock(&pool.mu);
    while (pool.size < nthreads - 1) {
        pthread_t tid;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int ok = pthread_create(&tid, &attr, helper, NULL) == 0;
        pthread_attr_destroy(&attr);
        if (!ok) break;
        pool.size++;
    }
    pool.job = &j;
    pool.gen++;
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
    drain(&j);
    /* Every item is claimed; wait for those in flight. A helper that wakes later sees
     * job == NULL and goes back to sleep, so j may then go out of scope. */
    pthread_mutex_lock(&pool.mu);
    while (pool.busy > 0) pthread_cond_wait(&pool.idle, &pool.mu);
    pool.job = NULL;
    pthread_mutex_unlock(&pool.mu);
    pthread_mutex_unlock(&pool.owner);
}

/* fork(): the child has none of the helpers. Hold the locks across fork so that no job is
 * in flight, then give the child an empty pool with fresh locks and condition variables
 * (the old ones may record waiters that do not exist there). */
static void pool_prepare(void) {
    pthread_mutex_lock(&pool.owner);
    pthread_mutex_lock(&pool.mu);
}
static void pool_parent(void) {
    pthread_mutex_unlock(&pool.mu);
    pthread_mutex_unlock(&pool.owner);
}
static void pool_child(void) {
    pthread_mutex_init(&pool.owner, NULL);
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.idle, NULL);
    pool.job = NULL;
    pool.size = pool.busy = 0;
}

/* Checks one tensor's entry; 0, or -1 with a ValueError. */
static int check_entry(Py_ssize_t i, long long n, long long dt, const void *p) {
    if (dt >= NORM_ONLY) dt -= NORM_ONLY;
    if (n < 0 || dt < 0 || dt >= DT_COUNT || (n > 0 && p == NULL)) {
        PyErr_Format(PyExc_ValueError, "bad entry %zd: numel %lld, dtype %lld, ptr %p", i, n,
                     dt, p);
        return -1;
    }
    return 0;
}

/* A checked entry as an item: the whole tensor. */
static item_t entry(const void *p, long long n, long long dt) {
    int norm_only = dt >= NORM_ONLY;
    return (item_t){.ptr = p, .start = 0, .len = n, .dtype = (int)dt - norm_only * NORM_ONLY,
                    .norm_only = norm_only};
}

/* The partials of T checked tensors (an item each in `whole`): split into items of CHUNK
 * elements, run on up to nthreads threads, combined per tensor in item order. Tensor
 * i < full writes its row of 8 at out + i * stride; tensor full + k (a norm-only one)
 * writes its sum of squares at out + k * stride + NCOLS. 0, or -1 with MemoryError. */
static int run_tensors(const item_t *whole, Py_ssize_t T, double *out, int nthreads,
                       Py_ssize_t stride, Py_ssize_t full) {
    int64_t *first = PyMem_Malloc(sizeof(int64_t) * (size_t)(T + 1)); /* + a sentinel */
    if (!first) {
        PyErr_NoMemory();
        return -1;
    }
    int64_t nitems = 0, total = 0;
    for (Py_ssize_t i = 0; i < T; i++) {
        first[i] = nitems;
        nitems += (whole[i].len + CHUNK - 1) / CHUNK;
        total += whole[i].len;
    }
    first[T] = nitems;
    item_t *items = PyMem_Malloc(sizeof(item_t) * (size_t)(nitems ? nitems : 1));
    if (!items) {
        PyMem_Free(first);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < T; i++) {
        for (int64_t k = first[i], s = 0; k < first[i + 1]; k++, s += CHUNK) {
            items[k] = whole[i];
            items[k].start = s;
            items[k].len = whole[i].len - s < CHUNK ? whole[i].len - s : CHUNK;
        }
    }
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads > nitems) nthreads = (int)nitems;
    if (nthreads < 1 || total < MIN_PARALLEL) nthreads = 1;

    Py_BEGIN_ALLOW_THREADS
    run_all(items, nitems, total, nthreads);
    for (Py_ssize_t i = 0; i < T; i++) {
        part_t a = {0.0, 0.0, INFINITY, -INFINITY, 0, 0, 0};
        for (int64_t k = first[i]; k < first[i + 1]; k++) { /* item order: deterministic */
            const part_t *b = &items[k].part;
            a.sumsq += b->sumsq, a.sum += b->sum;
            a.mn = b->mn < a.mn ? b->mn : a.mn;
            a.mx = b->mx > a.mx ? b->mx : a.mx;
            a.zeros += b->zeros, a.nans += b->nans, a.infs += b->infs;
        }
        if (i >= full) {
            out[(size_t)(i - full) * stride + NCOLS] = a.sumsq;
            continue;
        }
        double *row = out + (size_t)i * stride;
        row[C_SUMSQ] = a.sumsq;
        if (whole[i].norm_only) {
            for (int c = C_SUMSQ + 1; c < NCOLS; c++) row[c] = NAN;
            continue;
        }
        row[C_SUM] = a.sum;
        /* max |x| follows from min and max; with no finite entry mn > mx and it is 0. */
        row[C_ABSMAX] = a.mn <= a.mx ? fmax(fabs(a.mn), fabs(a.mx)) : 0.0;
        row[C_MIN] = a.mn;
        row[C_MAX] = a.mx;
        row[C_ZERO] = (double)a.zeros;
        row[C_NAN] = (double)a.nans;
        row[C_INF] = (double)a.infs;
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(items);
    PyMem_Free(first);
    return 0;
}

static double *out_pointer(PyObject *out_o, Py_ssize_t T) {
    double *out = (double *)PyLong_AsVoidPtr(out_o);
    if (PyErr_Occurred()) return NULL;
    if (T > 0 && out == NULL) PyErr_SetString(PyExc_ValueError, "out_ptr is NULL");
    return out;
}

static PyObject *compute(PyObject *self, PyObject *args) {
    PyObject *ptrs_o, *numels_o, *dtypes_o, *out_o;
    int nthreads;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOi:compute", &ptrs_o, &numels_o, &dtypes_o, &out_o,
                          &nthreads))
        return NULL;
    PyObject *ptrs = PySequence_Fast(ptrs_o, "ptrs must be a sequence");
    PyObject *numels = ptrs ? PySequence_Fast(numels_o, "numels must be a sequence") : NULL;
    PyObject *dtypes = numels ? PySequence_Fast(dtypes_o, "dtypes must be a sequence") : NULL;
    item_t *whole = NULL;
    PyObject *result = NULL;
    if (!dtypes) goto done;
    Py_ssize_t T = PySequence_Fast_GET_SIZE(ptrs);
    if (PySequence_Fast_GET_SIZE(numels) != T || PySequence_Fast_GET_SIZE(dtypes) != T) {
        PyErr_SetString(PyExc_ValueError, "ptrs, numels and dtypes must have equal lengths");
        goto done;
    }
    double *out = out_pointer(out_o, T);
    if (PyErr_Occurred()) goto done;
    /* Every entry is checked before anything is read. */
    whole = PyMem_Malloc(sizeof(item_t) * (size_t)(T ? T : 1));
    if (!whole) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < T; i++) {
        long long n = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(numels, i));
        long long dt = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(dtypes, i));
        void *p = PyLong_AsVoidPtr(PySequence_Fast_GET_ITEM(ptrs, i));
        if (PyErr_Occurred() || check_entry(i, n, dt, p) < 0) goto done;
        whole[i] = entry(p, n, dt);
    }
    if (run_tensors(whole, T, out, nthreads, NCOLS, T) == 0) result = Py_NewRef(Py_None);
done:
    PyMem_Free(whole);
    Py_XDECREF(ptrs);
    Py_XDECREF(numels);
    Py_XDECREF(dtypes);
    return result;
}

/* The agent's call for one (device, dtype) group of n grads and their weights, read from
 * the table its C++ pass wrote (gather.py Reads): int64 [5, capacity], of which the first
 * n columns hold each grad's pointer and element count, then its weight's pointer,
 * element count and dtype code. The grads all have dtype `code`. Writes [n, 9] doubles:
 * the grad's 8 partials, then its weight's sum of squares (a weight is read for its norm
 * only). No Python int per tensor, nothing to assemble afterwards. */
static PyObject *compute_group(PyObject *self, PyObject *args) {
    PyObject *table_o, *out_o;
    Py_ssize_t cap, n;
    int code, nthreads;
    (void)self;
    if (!PyArg_ParseTuple(args, "OnniOi:compute_group", &table_o, &cap, &n, &code, &out_o,
                          &nthreads))
        return NULL;
    if (n < 0 || cap < n || code < 0 || code >= DT_COUNT) {
        PyErr_Format(PyExc_ValueError, "bad group: n %zd, capacity %zd, code %d", n, cap, code);
        return NULL;
    }
    const int64_t *table = (const int64_t *)PyLong_AsVoidPtr(table_o);
    if (PyErr_Occurred()) return NULL;
    if (n > 0 && table == NULL) {
        PyErr_SetString(PyExc_ValueError, "table_ptr is NULL");
        return NULL;
    }
    double *out = out_pointer(out_o, n);
    if (PyErr_Occurred()) return NULL;
    item_t *whole = PyMem_Malloc(sizeof(item_t) * (size_t)(n ? 2 * n : 1));
    if (!whole) return PyErr_NoMemory();
    PyObject *result = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        const void *g = (const void *)(intptr_t)table[i], *w = (const void *)(intptr_t)table[2 * cap + i];
        long long gn = table[cap + i], wn = table[3 * cap + i], wdt = table[4 * cap + i];
        if (check_entry(i, gn, code, g) < 0) goto done;
        if (wdt >= NORM_ONLY || check_entry(n + i, wn, wdt, w) < 0) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "bad entry %zd: dtype %lld", n + i, wdt);
            goto done;
        }
        whole[i] = entry(g, gn, code);
        whole[n + i] = entry(w, wn, wdt + NORM_ONLY);
    }
    if (run_tensors(whole, 2 * n, out, nthreads, NCOLS + 1, n) == 0) result = Py_NewRef(Py_None);
done:
    PyMem_Free(whole);
    return result;
}

/* weaken(list): each item that is neither None nor already a weak reference is replaced,
 * in place, by a weak reference to it (without callback), which is then untracked from the
 * cyclic GC (stats/cpu.py weaken). The agent holds N weak references: to the parameters
 * for the whole run, and, in its Python pass (gather.py, where the C++ one is not built),
 * to each gradient from one collection to the next. Weakref objects are GC-tracked for
 * the sake of their callbacks, and N of them living across a step were promoted to the
 * oldest generation and set off full collections of the whole heap (~1 us a tensor per
 * step, measured). A weak reference without a callback takes part in no cycle, so it
 * need not be tracked (its dealloc untracks again: a no-op). Made here in one pass, they
 * are never tracked while a collection could promote them. */
static PyObject *weaken(PyObject *self, PyObject *list) {
    (void)self;
    if (!PyList_Check(list)) {
        PyErr_SetString(PyExc_TypeError, "weaken takes a list");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); i++) {
        PyObject *o = PyList_GET_ITEM(list, i);
        if (o == Py_None || PyWeakref_CheckRef(o)) continue;
        PyObject *ref = PyWeakref_NewRef(o, NULL);
        if (!ref) return NULL;
        if (((PyWeakReference *)ref)->wr_callback == NULL && PyObject_GC_IsTracked(ref))
            PyObject_GC_UnTrack(ref);
        PyList_SET_ITEM(list, i, ref); /* steals ref */
        Py_DECREF(o);                  /* the list's reference to the object */
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"weaken", weaken, METH_O,
     "weaken(list) -> None\n\n"
     "Replace each item that is not None or a weak reference by an untracked weak\n"
     "reference to it, in place."},
    {"compute", compute, METH_VARARGS,
     "compute(ptrs, numels, dtypes, out_ptr, nthreads) -> None\n\n"
     "Write float64 [T, 8] partials to out_ptr. dtype codes: 0 f32, 1 f16, 2 bf16, 3 f64;\n"
     "plus 16: the sum of squares only (the row's other columns are NaN).\n"
     "The caller guarantees that each pointer addresses numel contiguous elements and that\n"
     "out_ptr addresses T*8 writable doubles, all valid for the whole call."},
    {"compute_group", compute_group, METH_VARARGS,
     "compute_group(table_ptr, capacity, n, code, out_ptr, nthreads) -> None\n\n"
     "One group of n grads of dtype code and their weights, from a C-contiguous int64\n"
     "[5, capacity] table (grad pointers, grad numels, weight pointers, weight numels,\n"
     "weight codes; first n columns): writes [n, 9] doubles, each grad's 8 partials\n"
     "then its weight's sum of squares.\n"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_cpu_kernel", .m_size = -1, .m_methods = methods};

PyMODINIT_FUNC PyInit__cpu_kernel(void) {
    static int registered = 0; /* the fork handlers must be registered once per process */
    if (!registered && pthread_atfork(pool_prepare, pool_parent, pool_child) == 0)
        registered = 1;
    return PyModule_Create(&module);
}
