/*
 * gradmon.stats._cpu_kernel: the CPU fast path for the 8-column partials (see layout.py).
 *
 * Plain CPython extension, no torch headers: Python passes raw data pointers, element
 * counts and dtype codes, and an output buffer of T*8 doubles (row-major [T, 8]).
 *
 * Design:
 *  - Each tensor is read once, in blocks of BLOCK elements. The fast path keeps LANES
 *    independent accumulators per statistic; independent lanes make vectorisation legal
 *    without -ffast-math, so gcc -O3 emits SIMD code while keeping IEEE semantics.
 *  - fp32/fp16/bf16 values are widened to double before summing, so the sums are as
 *    accurate as a float64 pass and x*x cannot overflow. min/max/zero stay in float.
 *  - NaN never enters min/max (comparisons with NaN are false). A NaN or Inf in a block
 *    makes the block's sum non-finite; only then is that block redone by a careful scalar
 *    path that counts and masks them. Clean data never pays for the NaN/Inf bookkeeping.
 *  - Tensors are cut into work items of CHUNK elements; the partial of every item is
 *    stored and combined per tensor in item order, so the result is bit-identical for any
 *    thread count. The GIL is released and items are split statically across threads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2, DT_F64 = 3, DT_COUNT = 4 };
enum { C_SUMSQ, C_SUM, C_ABSMAX, C_MIN, C_MAX, C_ZERO, C_NAN, C_INF, NCOLS };

#ifndef LANES
#define LANES 16                     /* accumulator lanes: enough to cover add latency */
#endif
#define BLOCK 2048                   /* elements per fast-path block (redo granularity) */
#define CHUNK ((int64_t)1 << 16)     /* elements per work item (threading granularity) */
#define MIN_PARALLEL ((int64_t)1 << 18) /* below this many elements threads cost more */
#define MAX_THREADS 64

/* Runtime ISA dispatch: the per-item routine is compiled for AVX-512 (x86-64-v4), AVX2
 * (x86-64-v3) and the baseline on x86-64 ELF; the loader picks the best at startup.
 * -std=c11 turns off FP contraction, so all clones do the same IEEE operations in the same
 * lanes and agree bitwise. Other platforms get the baseline compiler output. */
#if defined(__GNUC__) && defined(__x86_64__) && defined(__ELF__) && !defined(__clang__)
#ifndef CLONES
#define CLONES "arch=x86-64-v4", "arch=x86-64-v3", "default"
#endif
#define MULTIVERSION __attribute__((target_clones(CLONES)))
#else
#define MULTIVERSION
#endif
/* The block routines must be inlined into each clone to get that clone's ISA. */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

typedef struct {
    double sumsq, sum, mn, mx;
    int64_t zeros, nans, infs;
} part_t;

typedef struct {
    const void *ptr;
    int64_t start, len;
    int dtype;
    part_t part;
} item_t;

static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* Exact fp16 -> fp32 in integer/float ops that vectorise on any ISA. Subnormals go through
 * a subtraction of normal floats, so the result holds even under DAZ/FTZ. */
static inline float load_f16(const uint16_t *p, int64_t i) {
    uint32_t h = p[i], em = h & 0x7fffu, sign = (h & 0x8000u) << 16;
    uint32_t special = (em << 13) | 0x7f800000u;                  /* inf/nan, payload kept */
    uint32_t normal = (em << 13) + (112u << 23);                  /* rebias 15 -> 127 */
    uint32_t sub = f32_bits(bits_f32(em | 0x3f000000u) - 0.5f);   /* m * 2^-24, exact */
    /* Select with masks, not ?: - gcc keeps ?: around the float subtract as a branch
     * (it may not speculate an FP op under -ftrapping-math), which blocks vectorisation. */
    uint32_t is_special = 0u - (uint32_t)(em >= 0x7c00u), is_sub = 0u - (uint32_t)(em < 0x0400u);
    uint32_t b = (special & is_special) | (sub & is_sub) | (normal & ~(is_special | is_sub));
    return bits_f32(b | sign);
}
static inline float load_bf16(const uint16_t *p, int64_t i) { return bits_f32((uint32_t)p[i] << 16); }
static inline float load_f32(const float *p, int64_t i) { return p[i]; }
static inline double load_f64(const double *p, int64_t i) { return p[i]; }

/* Fast path for one block: returns 0 (and adds nothing) if the block holds NaN/Inf.
 * ACC is the accumulation type of the sums, VAL the type min/max are tracked in. */
#define DEFINE_FAST(NAME, T, VAL, ZT, LOAD)                                                    \
    ALWAYS_INLINE int NAME(const T *p, int64_t n, part_t *r) {                             \
        double s[LANES] = {0}, q[LANES] = {0};                                             \
        VAL mn[LANES], mx[LANES];                                                          \
        ZT z[LANES] = {0}; /* same width as VAL: compare masks map onto it directly */                                                            \
        for (int j = 0; j < LANES; j++) { mn[j] = (VAL)INFINITY; mx[j] = -(VAL)INFINITY; } \
        int64_t i = 0;                                                                     \
        for (; i + LANES <= n; i += LANES) {                                               \
            for (int j = 0; j < LANES; j++) {                                              \
                VAL x = LOAD(p, i + j);                                                    \
                double d = (double)x;                                                      \
                s[j] += d;                                                                 \
                q[j] += d * d;                                                             \
                mn[j] = x < mn[j] ? x : mn[j];                                             \
                mx[j] = x > mx[j] ? x : mx[j];                                             \
                z[j] += x == (VAL)0;                                                       \
            }                                                                              \
        }                                                                                  \
        for (int j = 0; i + j < n; j++) { /* tail: one element per lane */                 \
            VAL x = LOAD(p, i + j);                                                        \
            double d = (double)x;                                                          \
            s[j] += d;                                                                     \
            q[j] += d * d;                                                                 \
            mn[j] = x < mn[j] ? x : mn[j];                                                 \
            mx[j] = x > mx[j] ? x : mx[j];                                                 \
            z[j] += x == (VAL)0;                                                           \
        }                                                                                  \
        double S = 0, Q = 0, MN = INFINITY, MX = -INFINITY;                                \
        int64_t Z = 0;                                                                     \
        for (int j = 0; j < LANES; j++) {                                                  \
            S += s[j]; Q += q[j]; Z += z[j];                                               \
            MN = mn[j] < MN ? mn[j] : MN;                                                  \
            MX = mx[j] > MX ? mx[j] : MX;                                                  \
        }                                                                                  \
        if (!isfinite(S)) return 0; /* NaN or Inf in the block (sum of finite can't be) */ \
        r->sum += S; r->sumsq += Q; r->zeros += Z;                                         \
        r->mn = MN < r->mn ? MN : r->mn;                                                   \
        r->mx = MX > r->mx ? MX : r->mx;                                                   \
        return 1;                                                                          \
    }

/* Careful path: scalar, double precision, counts and masks NaN/Inf. */
#define DEFINE_CAREFUL(NAME, T, LOAD)                                                      \
    ALWAYS_INLINE void NAME(const T *p, int64_t n, part_t *r) {                            \
        for (int64_t i = 0; i < n; i++) {                                                  \
            double x = (double)LOAD(p, i);                                                 \
            if (isnan(x)) { r->nans++; continue; }                                         \
            if (isinf(x)) { r->infs++; continue; }                                         \
            r->sum += x; r->sumsq += x * x; r->zeros += x == 0.0;                          \
            r->mn = x < r->mn ? x : r->mn;                                                 \
            r->mx = x > r->mx ? x : r->mx;                                                 \
        }                                                                                  \
    }

DEFINE_FAST(fast_f32, float, float, int32_t, load_f32)
DEFINE_FAST(fast_f64, double, double, int64_t, load_f64)
DEFINE_CAREFUL(careful_f32, float, load_f32)
DEFINE_CAREFUL(careful_f64, double, load_f64)

/* Half types are widened into a float scratch block first: a plain elementwise loop
 * that vectorises on its own, after which the fp32 fast path runs unchanged. */
#define DEFINE_WIDEN(NAME, LOAD)                                                          \
    ALWAYS_INLINE void NAME(const uint16_t *p, int64_t n, float *dst) {                   \
        for (int64_t i = 0; i < n; i++) dst[i] = LOAD(p, i);                              \
    }
DEFINE_WIDEN(widen_f16, load_f16)
DEFINE_WIDEN(widen_bf16, load_bf16)

#define RUN_BLOCKS(T, FAST, CAREFUL)                                                      \
    do {                                                                                  \
        const T *p = (const T *)it->ptr + it->start;                                      \
        for (int64_t b = 0; b < it->len; b += BLOCK) {                                    \
            int64_t n = it->len - b < BLOCK ? it->len - b : BLOCK;                        \
            if (!FAST(p + b, n, r)) CAREFUL(p + b, n, r);                                 \
        }                                                                                 \
    } while (0)

#define RUN_HALF_BLOCKS(WIDEN)                                                            \
    do {                                                                                  \
        const uint16_t *p = (const uint16_t *)it->ptr + it->start;                        \
        float tmp[BLOCK];                                                                 \
        for (int64_t b = 0; b < it->len; b += BLOCK) {                                    \
            int64_t n = it->len - b < BLOCK ? it->len - b : BLOCK;                        \
            WIDEN(p + b, n, tmp);                                                         \
            if (!fast_f32(tmp, n, r)) careful_f32(tmp, n, r);                             \
        }                                                                                 \
    } while (0)

MULTIVERSION static void run_item(item_t *it) {
    part_t *r = &it->part;
    r->sumsq = r->sum = 0.0;
    r->mn = INFINITY;
    r->mx = -INFINITY;
    r->zeros = r->nans = r->infs = 0;
    switch (it->dtype) {
    case DT_F32: RUN_BLOCKS(float, fast_f32, careful_f32); break;
    case DT_F16: RUN_HALF_BLOCKS(widen_f16); break;
    case DT_BF16: RUN_HALF_BLOCKS(widen_bf16); break;
    default: RUN_BLOCKS(double, fast_f64, careful_f64); break;
    }
}

/* One call's work queue. Spawned threads are detached and share it by reference count, so
 * the caller never waits for a thread the OS has not scheduled yet (on a busy machine
 * that wait is a whole scheduler slice): once every item is claimed, the caller waits
 * only for items in flight, and a late thread finds the queue empty and just leaves. */
typedef struct {
    item_t *items;
    int64_t nitems;
    atomic_llong next, done; /* items claimed, items finished */
    atomic_int refs;
    pthread_mutex_t mu;
    pthread_cond_t all_done;
} queue_t;

static void queue_release(queue_t *q) {
    if (atomic_fetch_sub(&q->refs, 1) == 1) {
        pthread_mutex_destroy(&q->mu);
        pthread_cond_destroy(&q->all_done);
        free(q);
    }
}

/* Items are claimed one at a time, so threads that do run take over the share of one that
 * does not. Which thread runs an item never changes the item's partial. */
static void *run_queue(void *arg) {
    queue_t *q = (queue_t *)arg;
    for (;;) {
        int64_t k = atomic_fetch_add(&q->next, 1);
        if (k >= q->nitems) break;
        run_item(&q->items[k]);
        if (atomic_fetch_add(&q->done, 1) + 1 == q->nitems) {
            pthread_mutex_lock(&q->mu);
            pthread_cond_broadcast(&q->all_done);
            pthread_mutex_unlock(&q->mu);
        }
    }
    queue_release(q);
    return NULL;
}

/* The caller's thread works too; a thread that cannot be created is simply not needed. */
static void run_all(item_t *items, int64_t nitems, int nthreads) {
    queue_t *q = nthreads > 1 ? malloc(sizeof *q) : NULL;
    if (!q) {
        for (int64_t k = 0; k < nitems; k++) run_item(&items[k]);
        return;
    }
    q->items = items;
    q->nitems = nitems;
    atomic_init(&q->next, 0);
    atomic_init(&q->done, 0);
    atomic_init(&q->refs, 1);
    pthread_mutex_init(&q->mu, NULL);
    pthread_cond_init(&q->all_done, NULL);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (int t = 1; t < nthreads; t++) {
        pthread_t tid;
        atomic_fetch_add(&q->refs, 1);
        if (pthread_create(&tid, &attr, run_queue, q) != 0) {
            atomic_fetch_sub(&q->refs, 1);
            break;
        }
    }
    pthread_attr_destroy(&attr);
    atomic_fetch_add(&q->refs, 1); /* run_queue drops one reference; keep ours */
    run_queue(q);
    pthread_mutex_lock(&q->mu);
    while (atomic_load(&q->done) < nitems) pthread_cond_wait(&q->all_done, &q->mu);
    pthread_mutex_unlock(&q->mu);
    queue_release(q);
}

static PyObject *compute(PyObject *self, PyObject *args) {
    PyObject *ptrs_o, *numels_o, *dtypes_o, *out_o;
    int nthreads;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOi:compute", &ptrs_o, &numels_o, &dtypes_o, &out_o, &nthreads))
        return NULL;
    PyObject *ptrs = PySequence_Fast(ptrs_o, "ptrs must be a sequence");
    PyObject *numels = ptrs ? PySequence_Fast(numels_o, "numels must be a sequence") : NULL;
    PyObject *dtypes = numels ? PySequence_Fast(dtypes_o, "dtypes must be a sequence") : NULL;
    item_t *items = NULL;
    int64_t *first = NULL; /* first item of each tensor, plus a sentinel */
    PyObject *result = NULL;
    if (!dtypes) goto done;
    Py_ssize_t T = PySequence_Fast_GET_SIZE(ptrs);
    if (PySequence_Fast_GET_SIZE(numels) != T || PySequence_Fast_GET_SIZE(dtypes) != T) {
        PyErr_SetString(PyExc_ValueError, "ptrs, numels and dtypes must have equal lengths");
        goto done;
    }
    double *out = (double *)PyLong_AsVoidPtr(out_o);
    if (PyErr_Occurred()) goto done;
    if (T > 0 && out == NULL) {
        PyErr_SetString(PyExc_ValueError, "out_ptr is NULL");
        goto done;
    }
    first = PyMem_Malloc(sizeof(int64_t) * (size_t)(T + 1));
    if (!first) { PyErr_NoMemory(); goto done; }
    /* Validate everything and count items before touching memory. */
    int64_t nitems = 0, total = 0;
    for (Py_ssize_t i = 0; i < T; i++) {
        long long n = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(numels, i));
        long dt = PyLong_AsLong(PySequence_Fast_GET_ITEM(dtypes, i));
        void *p = PyLong_AsVoidPtr(PySequence_Fast_GET_ITEM(ptrs, i));
        if (PyErr_Occurred()) goto done;
        if (n < 0 || dt < 0 || dt >= DT_COUNT || (n > 0 && p == NULL)) {
            PyErr_Format(PyExc_ValueError, "bad entry %zd: numel %lld, dtype %ld, ptr %p", i, n, dt, p);
            goto done;
        }
        first[i] = nitems;
        nitems += (n + CHUNK - 1) / CHUNK;
        total += n;
    }
    first[T] = nitems;
    items = PyMem_Malloc(sizeof(item_t) * (size_t)(nitems ? nitems : 1));
    if (!items) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t i = 0; i < T; i++) {
        int64_t n = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(numels, i));
        int dt = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(dtypes, i));
        const void *p = PyLong_AsVoidPtr(PySequence_Fast_GET_ITEM(ptrs, i));
        for (int64_t k = first[i], s = 0; k < first[i + 1]; k++, s += CHUNK) {
            items[k].ptr = p;
            items[k].dtype = dt;
            items[k].start = s;
            items[k].len = n - s < CHUNK ? n - s : CHUNK;
        }
    }
    if (nthreads < 1) nthreads = 1;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (total < MIN_PARALLEL) nthreads = 1;
    if (nthreads > nitems) nthreads = (int)(nitems ? nitems : 1);

    Py_BEGIN_ALLOW_THREADS
    run_all(items, nitems, nthreads);
    /* Combine each tensor's items in item order: independent of how threads split them. */
    for (Py_ssize_t i = 0; i < T; i++) {
        part_t a = {0.0, 0.0, INFINITY, -INFINITY, 0, 0, 0};
        for (int64_t k = first[i]; k < first[i + 1]; k++) {
            const part_t *b = &items[k].part;
            a.sumsq += b->sumsq; a.sum += b->sum;
            a.mn = b->mn < a.mn ? b->mn : a.mn;
            a.mx = b->mx > a.mx ? b->mx : a.mx;
            a.zeros += b->zeros; a.nans += b->nans; a.infs += b->infs;
        }
        double *row = out + (size_t)i * NCOLS;
        row[C_SUMSQ] = a.sumsq;
        row[C_SUM] = a.sum;
        /* |x| max from min and max; no finite entry leaves mn > mx and gives 0. */
        row[C_ABSMAX] = a.mn <= a.mx ? fmax(fabs(a.mn), fabs(a.mx)) : 0.0;
        row[C_MIN] = a.mn;
        row[C_MAX] = a.mx;
        row[C_ZERO] = (double)a.zeros;
        row[C_NAN] = (double)a.nans;
        row[C_INF] = (double)a.infs;
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyMem_Free(items);
    PyMem_Free(first);
    Py_XDECREF(ptrs);
    Py_XDECREF(numels);
    Py_XDECREF(dtypes);
    return result;
}

static PyMethodDef methods[] = {
    {"compute", compute, METH_VARARGS,
     "compute(ptrs, numels, dtypes, out_ptr, nthreads) -> None\n"
     "Writes float64 [T, 8] partials to out_ptr. dtype codes: 0 f32, 1 f16, 2 bf16, 3 f64.\n"
     "The caller guarantees every pointer is valid for its numel and out has T*8 doubles."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_kernel", NULL, -1, methods};

PyMODINIT_FUNC PyInit__cpu_kernel(void) { return PyModule_Create(&module); }
