/* The CudaCopier type: kvshelf's CUDA copy path (src/cuda/parts.cu,
 * kvs_cuda_copy_parts) for callers that keep their objects in host memory of
 * their own -- the Mooncake store's pinned staging (kvshelf.mooncake_store).
 *
 *   c = CudaCopier(device)
 *   a = c.pinned_alloc(n)              pinned, device-mapped host memory (int)
 *   h = c.snapshot(event)              the caller's CUDA event, snapshotted now
 *   ok = c.dump(objs, parts, payload_off=64, stamp_off=56, event=h)
 *   ok = c.load(objs, parts, payload_off=64, stamp_off=56)
 *   c.free_snapshot(h); c.pinned_free(a); c.close()
 *
 * objs[i] is the host address of object i (8-byte aligned, in memory the GPU
 * can reach: pinned_alloc memory, or a mapping kvs_cuda_translate registers);
 * parts[i] its device parts, a list of (address, size): stored back to back
 * from objs[i] + payload_off. The result is one bool per object: the view
 * check (kvs_cuda.h) -- dump: the GPU wrote a fresh word at objs[i] +
 * stamp_off after the payload and the CPU reads it back; load: the CPU wrote
 * a fresh word there before the copy and the GPU read the same one. False:
 * the GPU did not see this object's memory as the CPU does; treat the
 * object as failed. stamp_off must lie outside the payload (the Mooncake
 * store uses the reserved word of its header). A CUDA failure raises
 * kvshelf.CudaError; bad arguments raise kvshelf.InvalidArgument.
 *
 * Copies run without the GIL. Each call takes a parts worker (own streams)
 * from a small pool, creating one on first need (at most COPIER_POOL; more
 * concurrent callers wait), and makes the copier's device current on the
 * calling thread for the call only. Built without CUDA, CudaCopier(...)
 * raises kvshelf.Unsupported and CudaCopier.available() is False. */
#include "ext.h"

#include <pthread.h>
#include <string.h>
#include <structmember.h>

#include "connector.h"
#include "errors.h"

#ifdef KVS_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "cuda/kvs_cuda.h"
#endif

#define COPIER_POOL 8
#define COPIER_MAX_OFF (1ull << 32)      /* payload_off, stamp_off */
#define COPIER_MAX_OBJ_BYTES (1ull << 48) /* payload bytes of one object */

typedef struct {
    PyObject_HEAD
    int device;
    volatile int busy;
    int open;
#ifdef KVS_HAVE_CUDA
    kvs_cuda_ctx *x;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    kvs_cuda_pworker *all[COPIER_POOL];
    kvs_cuda_pworker *idle[COPIER_POOL];
    size_t nall, nidle;
    uint64_t gen; /* under mu */
#endif
} CudaCopierObject;

#ifndef KVS_HAVE_CUDA
static PyObject *copier_unsupported(const char *what) {
    return raise_kvs(KVS_ERR_UNSUPPORTED, what,
                     "this kvshelf was built without CUDA (the CUDA toolkit was not found when "
                     "the extension was built)");
}
#endif

static PyObject *CudaCopier_available(PyObject *Py_UNUSED(cls), PyObject *Py_UNUSED(arg)) {
#ifdef KVS_HAVE_CUDA
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

static PyObject *CudaCopier_device_count(PyObject *Py_UNUSED(cls), PyObject *Py_UNUSED(arg)) {
#ifdef KVS_HAVE_CUDA
    int n;
    Py_BEGIN_ALLOW_THREADS
    n = kvs_cuda_device_count();
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(n);
#else
    return PyLong_FromLong(0);
#endif
}

#ifdef KVS_HAVE_CUDA

/* ------------------------------------------------------------ worker pool */

/* Takes a parts worker (creating one while fewer than COPIER_POOL exist,
 * else waiting for one). Call without the GIL, with the device current. */
static int pool_take(CudaCopierObject *self, kvs_cuda_pworker **out) {
    pthread_mutex_lock(&self->mu);
    for (;;) {
        if (self->nidle) {
            *out = self->idle[--self->nidle];
            pthread_mutex_unlock(&self->mu);
            return KVS_OK;
        }
        if (self->nall < COPIER_POOL) {
            self->nall++; /* reserved; filled in below */
            pthread_mutex_unlock(&self->mu);
            kvs_cuda_pworker *w = NULL;
            int rc = kvs_cuda_pworker_create(self->x, self->device, &w);
            pthread_mutex_lock(&self->mu);
            if (rc != KVS_OK) {
                self->nall--;
                pthread_cond_broadcast(&self->cv);
                pthread_mutex_unlock(&self->mu);
                return rc;
            }
            for (size_t i = 0; i < COPIER_POOL; i++)
                if (!self->all[i]) {
                    self->all[i] = w;
                    break;
                }
            pthread_mutex_unlock(&self->mu);
            *out = w;
            return KVS_OK;
        }
        pthread_cond_wait(&self->cv, &self->mu);
    }
}

static void pool_give(CudaCopierObject *self, kvs_cuda_pworker *w) {
    pthread_mutex_lock(&self->mu);
    self->idle[self->nidle++] = w;
    pthread_cond_signal(&self->cv);
    pthread_mutex_unlock(&self->mu);
}

/* cuCtxGetCurrent through the runtime (no link to libcuda); NULL where the
 * driver does not offer it. */
typedef int (*ctx_get_fn)(void **ctx);
static ctx_get_fn g_ctx_get;
static pthread_once_t g_ctx_once = PTHREAD_ONCE_INIT;

static void ctx_get_init(void) {
    void *fn = NULL;
    enum cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuCtxGetCurrent", &fn, 12000, cudaEnableDefault, &q) ==
            cudaSuccess &&
        q == cudaDriverEntryPointSuccess)
        g_ctx_get = (ctx_get_fn)fn;
    else
        cudaGetLastError();
}

/* Whether this thread has a CUDA context current (1 where unknown). */
static int thread_has_ctx(void) {
    pthread_once(&g_ctx_once, ctx_get_init);
    void *ctx = NULL;
    if (!g_ctx_get)
        return 1;
    return g_ctx_get(&ctx) != 0 || ctx != NULL;
}

/* Makes `device` current on this thread; *prev gets the one to restore: -1
 * where the thread had no context (a new thread reports device 0, and
 * setting device 0 back would create a context there: memory on GPU 0 of
 * every process whose KV cache is on another device). */
static int dev_enter(int device, int *prev) {
    *prev = -1;
    if (thread_has_ctx() && cudaGetDevice(prev) != cudaSuccess) {
        cudaGetLastError();
        *prev = -1;
    }
    if (*prev == device)
        return 0;
    if (cudaSetDevice(device) != cudaSuccess) {
        cudaGetLastError();
        return -1;
    }
    return 0;
}

static void dev_restore(int device, int prev) {
    if (prev >= 0 && prev != device)
        cudaSetDevice(prev);
}

/* Frees the workers and the context; `open` was cleared under the GIL
 * first, so no new call can start. */
static void copier_free(CudaCopierObject *self) {
    int prev;
    dev_enter(self->device, &prev);
    for (size_t i = 0; i < COPIER_POOL; i++)
        if (self->all[i]) {
            kvs_cuda_pworker_destroy(self->all[i]);
            self->all[i] = NULL;
        }
    self->nall = self->nidle = 0;
    kvs_cuda_ctx_destroy(self->x);
    self->x = NULL;
    dev_restore(self->device, prev);
    pthread_cond_destroy(&self->cv);
    pthread_mutex_destroy(&self->mu);
}
#endif

static int CudaCopier_init(CudaCopierObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"device", NULL};
    int device = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i:CudaCopier", kwlist, &device))
        return -1;
    if (self->open) {
        PyErr_SetString(PyExc_RuntimeError, "CudaCopier already open");
        return -1;
    }
    if (device < 0) {
        raise_kvs(KVS_ERR_INVALID, "CudaCopier", "device must be a CUDA device index >= 0");
        return -1;
    }
#ifdef KVS_HAVE_CUDA
    char err[ERRBUF] = "";
    kvs_cuda_ctx *x = NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = kvs_cuda_ctx_create(device, KVS_CUDA_AUTO, &x, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (rc != KVS_OK) {
        char msg[ERRBUF + 64];
        snprintf(msg, sizeof msg, "CUDA device %d: %s", device, err[0] ? err : "no context");
        raise_kvs(rc, "CudaCopier", msg);
        return -1;
    }
    self->x = x;
    self->device = device;
    pthread_mutex_init(&self->mu, NULL);
    pthread_cond_init(&self->cv, NULL);
    memset(self->all, 0, sizeof self->all);
    self->nall = self->nidle = 0;
    self->gen = 0x6b7673c0dec0de00ull ^ ((uint64_t)(uintptr_t)self << 8);
    self->open = 1;
    return 0;
#else
    copier_unsupported("CudaCopier");
    return -1;
#endif
}

#ifdef KVS_HAVE_CUDA
static PyObject *copier_closed(const char *what) {
    return raise_kvs(KVS_ERR_CLOSED, what, "the CudaCopier is closed");
}
#endif

static PyObject *CudaCopier_close(CudaCopierObject *self, PyObject *Py_UNUSED(arg)) {
    wait_not_busy(&self->busy);
#ifdef KVS_HAVE_CUDA
    if (self->open) {
        self->open = 0; /* under the GIL: calls that start now raise Closed */
        CudaCopierObject *me = self;
        Py_BEGIN_ALLOW_THREADS
        copier_free(me);
        Py_END_ALLOW_THREADS
    }
#endif
    Py_RETURN_NONE;
}

static void CudaCopier_dealloc(CudaCopierObject *self) {
#ifdef KVS_HAVE_CUDA
    wait_not_busy(&self->busy);
    if (self->open) {
        self->open = 0;
        CudaCopierObject *me = self;
        Py_BEGIN_ALLOW_THREADS /* stream syncs, cudaFreeHost */
        copier_free(me);
        Py_END_ALLOW_THREADS
    }
#endif
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* An unsigned 64-bit integer argument. */
static int u64_from(PyObject *o, const char *what, uint64_t *out) {
    if (!PyLong_Check(o)) {
        raise_kvs(KVS_ERR_INVALID, what, "expected an int");
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        raise_kvs(KVS_ERR_INVALID, what, "not an unsigned 64-bit integer");
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

static PyObject *CudaCopier_pinned_alloc(CudaCopierObject *self, PyObject *arg) {
    uint64_t n;
    if (u64_from(arg, "CudaCopier.pinned_alloc: size", &n) < 0)
        return NULL;
    if (!n)
        return raise_kvs(KVS_ERR_INVALID, "CudaCopier.pinned_alloc", "size 0");
#ifdef KVS_HAVE_CUDA
    if (!self->open)
        return copier_closed("CudaCopier.pinned_alloc");
    void *p = NULL;
    int dev = self->device, ok;
    WITHOUT_GIL(self, {
        int prev;
        ok = dev_enter(dev, &prev) == 0;
        if (ok)
            p = kvs_cuda_pinned_alloc((size_t)n);
        dev_restore(dev, prev);
    });
    if (!p) {
        char msg[128];
        snprintf(msg, sizeof msg, "cannot allocate %llu bytes of pinned host memory on device %d",
                 (unsigned long long)n, dev);
        return raise_kvs(ok ? KVS_ERR_NOMEM : KVS_ERR_CUDA, "CudaCopier.pinned_alloc", msg);
    }
    return PyLong_FromUnsignedLongLong((unsigned long long)(uintptr_t)p);
#else
    return copier_unsupported("CudaCopier.pinned_alloc");
#endif
}

static PyObject *CudaCopier_pinned_free(CudaCopierObject *self, PyObject *arg) {
    uint64_t a;
    if (u64_from(arg, "CudaCopier.pinned_free: address", &a) < 0)
        return NULL;
#ifdef KVS_HAVE_CUDA
    if (a)
        WITHOUT_GIL(self, kvs_cuda_pinned_free((void *)(uintptr_t)a));
    Py_RETURN_NONE;
#else
    return copier_unsupported("CudaCopier.pinned_free");
#endif
}

/* snapshot(event) -> int: a private event that completes when the caller's
 * event (an int cudaEvent_t or an object with .cuda_event, as torch's) has
 * completed as recorded now (re-recording the caller's event later does not
 * move it). 0 for None. free_snapshot() it once the copies that wait for it
 * were made. */
static PyObject *CudaCopier_snapshot(CudaCopierObject *self, PyObject *ev) {
    void *user = NULL;
    if (event_from(ev, &user) < 0)
        return NULL;
    if (!user)
        return PyLong_FromLong(0);
#ifdef KVS_HAVE_CUDA
    if (!self->open)
        return copier_closed("CudaCopier.snapshot");
    void *snap = NULL;
    kvs_cuda_ctx *x = self->x;
    int rc;
    WITHOUT_GIL(self, rc = kvs_cuda_event_snapshot(x, user, &snap));
    if (rc != KVS_OK)
        return raise_kvs(rc, "CudaCopier.snapshot", "cannot wait for the caller's CUDA event");
    return PyLong_FromUnsignedLongLong((unsigned long long)(uintptr_t)snap);
#else
    return copier_unsupported("CudaCopier.snapshot");
#endif
}

static PyObject *CudaCopier_free_snapshot(CudaCopierObject *self, PyObject *arg) {
    uint64_t h;
    if (u64_from(arg, "CudaCopier.free_snapshot", &h) < 0)
        return NULL;
#ifdef KVS_HAVE_CUDA
    if (h)
        WITHOUT_GIL(self, kvs_cuda_event_free((void *)(uintptr_t)h));
#endif
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ copies */
#ifdef KVS_HAVE_CUDA

/* One call's arguments, read under the GIL. */
typedef struct {
    size_t n, ppo;
    void **obj;      /* n */
    uint64_t *addrs; /* n * ppo (zero-length parts pad shorter objects) */
    uint64_t *lens;
    uint64_t *gen;   /* n */
    uint64_t *out;   /* n */
    uint8_t *ok;     /* n: the view check passed */
} copy_args;

static void copy_args_free(copy_args *a) {
    PyMem_RawFree(a->obj);
    PyMem_RawFree(a->addrs);
    PyMem_RawFree(a->lens);
    PyMem_RawFree(a->gen);
    PyMem_RawFree(a->out);
    PyMem_RawFree(a->ok);
}

/* One (address, size) pair of parts[i]. */
static int part_from(PyObject *p, const char *what, size_t i, size_t k, uint64_t *a, uint64_t *len) {
    char w[96];
    snprintf(w, sizeof w, "%s: parts[%zu][%zu]", what, i, k);
    if (!PyTuple_Check(p) || PyTuple_GET_SIZE(p) != 2) {
        raise_kvs(KVS_ERR_INVALID, w, "expected a pair (device address, size)");
        return -1;
    }
    if (u64_from(PyTuple_GET_ITEM(p, 0), w, a) < 0 || u64_from(PyTuple_GET_ITEM(p, 1), w, len) < 0)
        return -1;
    if (!*a && *len) {
        raise_kvs(KVS_ERR_INVALID, w, "address 0");
        return -1;
    }
    return 0;
}

static int copy_args_get(PyObject *objs, PyObject *parts, uint64_t payload_off, uint64_t stamp_off,
                         const char *what, copy_args *a) {
    memset(a, 0, sizeof *a);
    PyObject *so = PySequence_Fast(objs, "objs must be a sequence of host addresses");
    if (!so)
        return -1;
    PyObject *sp = PySequence_Fast(parts, "parts must be a sequence (one list of parts per object)");
    if (!sp) {
        Py_DECREF(so);
        return -1;
    }
    int rc = -1;
    size_t n = (size_t)PySequence_Fast_GET_SIZE(so);
    if ((size_t)PySequence_Fast_GET_SIZE(sp) != n) {
        char m[96];
        snprintf(m, sizeof m, "%zu objects but %zd lists of parts", n, PySequence_Fast_GET_SIZE(sp));
        raise_kvs(KVS_ERR_INVALID, what, m);
        goto out;
    }
    if (stamp_off % 8) {
        raise_kvs(KVS_ERR_INVALID, what, "stamp_off must be a multiple of 8");
        goto out;
    }
    size_t ppo = 1;
    for (size_t i = 0; i < n; i++) {
        PyObject *l = PySequence_Fast_GET_ITEM(sp, i);
        if (!PyList_Check(l) && !PyTuple_Check(l)) {
            char m[96];
            snprintf(m, sizeof m, "parts[%zu] is not a list of (address, size)", i);
            raise_kvs(KVS_ERR_INVALID, what, m);
            goto out;
        }
        Py_ssize_t k = PySequence_Size(l);
        if (k < 0)
            goto out;
        if ((size_t)k > ppo)
            ppo = (size_t)k;
    }
    a->n = n;
    a->ppo = ppo;
    size_t cnt = n ? n : 1;
    a->obj = PyMem_RawCalloc(cnt, sizeof *a->obj);
    a->addrs = PyMem_RawCalloc(cnt * ppo, sizeof *a->addrs);
    a->lens = PyMem_RawCalloc(cnt * ppo, sizeof *a->lens);
    a->gen = PyMem_RawCalloc(cnt, sizeof *a->gen);
    a->out = PyMem_RawCalloc(cnt, sizeof *a->out);
    a->ok = PyMem_RawCalloc(cnt, sizeof *a->ok);
    if (!a->obj || !a->addrs || !a->lens || !a->gen || !a->out || !a->ok) {
        PyErr_NoMemory();
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        uint64_t o;
        char w[64];
        snprintf(w, sizeof w, "%s: objs[%zu]", what, i);
        if (u64_from(PySequence_Fast_GET_ITEM(so, i), w, &o) < 0)
            goto out;
        if (!o || o % 8) {
            raise_kvs(KVS_ERR_INVALID, w, "a host object address must be non-zero and 8-byte "
                                          "aligned");
            goto out;
        }
        a->obj[i] = (void *)(uintptr_t)o;
        PyObject *l = PySequence_Fast_GET_ITEM(sp, i);
        Py_ssize_t ks = PySequence_Size(l);
        if (ks < 0)
            goto out;
        size_t k = (size_t)ks;
        if (k > ppo) { /* the list grew since it was measured */
            raise_kvs(KVS_ERR_INVALID, what, "a list of parts changed while being read");
            goto out;
        }
        uint64_t total = 0;
        for (size_t j = 0; j < k; j++) {
            PyObject *p = PySequence_GetItem(l, (Py_ssize_t)j);
            if (!p)
                goto out;
            int bad = part_from(p, what, i, j, &a->addrs[i * ppo + j], &a->lens[i * ppo + j]);
            Py_DECREF(p);
            if (bad)
                goto out;
            total += a->lens[i * ppo + j];
            if (a->lens[i * ppo + j] > COPIER_MAX_OBJ_BYTES || total > COPIER_MAX_OBJ_BYTES) {
                raise_kvs(KVS_ERR_INVALID, what, "an object's parts add up to 2**48 bytes or more");
                goto out;
            }
        }
        /* the stamp word must not lie inside the payload */
        if (stamp_off + 8 > payload_off && stamp_off < payload_off + total) {
            raise_kvs(KVS_ERR_INVALID, what, "stamp_off lies inside an object's payload");
            goto out;
        }
    }
    rc = 0;
out:
    Py_DECREF(so);
    Py_DECREF(sp);
    if (rc < 0)
        copy_args_free(a);
    return rc;
}

/* The copy of a (all objects, in jobs of KVS_CUDA_MAX_JOB_BLOCKS) and the
 * view checks; without the GIL. */
static int run_copy(CudaCopierObject *self, int dir, copy_args *a, uint64_t payload_off,
                    uint64_t stamp_off, void *snap) {
    int prev;
    if (dev_enter(self->device, &prev) < 0)
        return KVS_ERR_CUDA;
    kvs_cuda_pworker *w = NULL;
    int rc = pool_take(self, &w);
    if (rc == KVS_OK) {
        pthread_mutex_lock(&self->mu);
        for (size_t i = 0; i < a->n; i++) {
            uint64_t g = ++self->gen * 0x9e3779b97f4a7c15ull;
            a->gen[i] = g ? g : 1;
        }
        pthread_mutex_unlock(&self->mu);
        if (dir == KVS_CUDA_LOAD) /* the word the GPU must read back */
            for (size_t i = 0; i < a->n; i++)
                *(volatile uint64_t *)((char *)a->obj[i] + stamp_off) = a->gen[i];
        for (size_t s = 0; s < a->n && rc == KVS_OK; s += KVS_CUDA_MAX_JOB_BLOCKS) {
            size_t m = a->n - s < KVS_CUDA_MAX_JOB_BLOCKS ? a->n - s : KVS_CUDA_MAX_JOB_BLOCKS;
            rc = kvs_cuda_copy_parts(w, dir, m, a->obj + s, a->addrs + s * a->ppo,
                                     a->lens + s * a->ppo, a->ppo, payload_off, stamp_off, NULL,
                                     dir == KVS_CUDA_DUMP ? a->gen + s : NULL, a->out + s, snap);
        }
        pool_give(self, w);
    }
    if (rc == KVS_OK)
        for (size_t i = 0; i < a->n; i++) {
            uint64_t seen = dir == KVS_CUDA_DUMP
                                ? *(volatile uint64_t *)((char *)a->obj[i] + stamp_off)
                                : a->out[i];
            a->ok[i] = seen == a->gen[i];
            if (!a->ok[i])
                kvs_cuda_forget(self->x, a->obj[i]); /* a stale registration: map afresh */
        }
    dev_restore(self->device, prev);
    return rc;
}
#endif

static PyObject *copier_copy(CudaCopierObject *self, PyObject *args, PyObject *kwds, int dir) {
    const char *what = dir == 1 ? "CudaCopier.dump" : "CudaCopier.load";
    static char *kwlist_d[] = {"objs", "parts", "payload_off", "stamp_off", "event", NULL};
    static char *kwlist_l[] = {"objs", "parts", "payload_off", "stamp_off", NULL};
    PyObject *objs, *parts, *event = Py_None;
    unsigned long long poff = 64, soff = 56;
    int okp = dir == 1 ? PyArg_ParseTupleAndKeywords(args, kwds, "OO|$KKO:dump", kwlist_d, &objs,
                                                     &parts, &poff, &soff, &event)
                       : PyArg_ParseTupleAndKeywords(args, kwds, "OO|$KK:load", kwlist_l, &objs,
                                                     &parts, &poff, &soff);
    if (!okp)
        return NULL;
#ifdef KVS_HAVE_CUDA
    if (!self->open)
        return copier_closed(what);
    void *snap = NULL;
    if (event != Py_None) {
        uint64_t h;
        if (u64_from(event, "CudaCopier.dump: event (a handle from snapshot())", &h) < 0)
            return NULL;
        snap = (void *)(uintptr_t)h;
    }
    if (poff > COPIER_MAX_OFF || soff > COPIER_MAX_OFF) {
        raise_kvs(KVS_ERR_INVALID, what, "payload_off and stamp_off must be non-negative and "
                                         "below 2**32");
        return NULL;
    }
    copy_args a;
    if (copy_args_get(objs, parts, poff, soff, what, &a) < 0)
        return NULL;
    if (!self->open) { /* converting the arguments may have run Python code */
        copy_args_free(&a);
        return copier_closed(what);
    }
    int rc = KVS_OK;
    if (a.n)
        WITHOUT_GIL(self, rc = run_copy(self, dir == 1 ? KVS_CUDA_DUMP : KVS_CUDA_LOAD, &a, poff,
                                        soff, snap));
    PyObject *res = NULL;
    if (rc != KVS_OK) {
        char m[96];
        snprintf(m, sizeof m, "copy of %zu objects on CUDA device %d failed", a.n, self->device);
        raise_kvs(rc, what, m);
    } else {
        res = PyList_New((Py_ssize_t)a.n);
        for (size_t i = 0; res && i < a.n; i++)
            PyList_SET_ITEM(res, (Py_ssize_t)i, PyBool_FromLong(a.ok[i]));
    }
    copy_args_free(&a);
    return res;
#else
    (void)objs;
    (void)parts;
    (void)event;
    return copier_unsupported(what);
#endif
}

static PyObject *CudaCopier_dump(CudaCopierObject *self, PyObject *args, PyObject *kwds) {
    return copier_copy(self, args, kwds, 1);
}

static PyObject *CudaCopier_load(CudaCopierObject *self, PyObject *args, PyObject *kwds) {
    return copier_copy(self, args, kwds, 2);
}

static PyObject *CudaCopier_enter(CudaCopierObject *self, PyObject *Py_UNUSED(a)) {
    Py_INCREF(self);
    return (PyObject *)self;
}

static PyObject *CudaCopier_exit(CudaCopierObject *self, PyObject *Py_UNUSED(a)) {
    return CudaCopier_close(self, NULL);
}

static PyMethodDef CudaCopier_methods[] = {
    {"available", (PyCFunction)CudaCopier_available, METH_NOARGS | METH_STATIC,
     "available() -> bool: this build has the CUDA copy path."},
    {"device_count", (PyCFunction)CudaCopier_device_count, METH_NOARGS | METH_STATIC,
     "device_count() -> int: CUDA devices visible (0 without CUDA or a driver)."},
    {"pinned_alloc", (PyCFunction)CudaCopier_pinned_alloc, METH_O,
     "pinned_alloc(size) -> int: pinned, device-mapped host memory (free with pinned_free)."},
    {"pinned_free", (PyCFunction)CudaCopier_pinned_free, METH_O, "pinned_free(address)"},
    {"snapshot", (PyCFunction)CudaCopier_snapshot, METH_O,
     "snapshot(event) -> int: a handle that completes with the caller's event as recorded now "
     "(0 for None); pass it as dump(event=), free it with free_snapshot."},
    {"free_snapshot", (PyCFunction)CudaCopier_free_snapshot, METH_O, "free_snapshot(handle)"},
    {"dump", METH_KW(CudaCopier_dump), METH_VARARGS | METH_KEYWORDS,
     "dump(objs, parts, *, payload_off=64, stamp_off=56, event=None) -> list[bool]: device "
     "parts -> host objects (after the snapshot `event` on the GPU); per object the view check."},
    {"load", METH_KW(CudaCopier_load), METH_VARARGS | METH_KEYWORDS,
     "load(objs, parts, *, payload_off=64, stamp_off=56) -> list[bool]: host objects -> device "
     "parts; per object the view check."},
    {"close", (PyCFunction)CudaCopier_close, METH_NOARGS, "close(): frees the workers and context."},
    {"__enter__", (PyCFunction)CudaCopier_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)CudaCopier_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef CudaCopier_members[] = {
    {"device", T_INT, offsetof(CudaCopierObject, device), READONLY, "the CUDA device"},
    {NULL, 0, 0, 0, NULL},
};

PyTypeObject CudaCopierType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvshelf._kvshelf.CudaCopier",
    .tp_basicsize = sizeof(CudaCopierObject),
    .tp_dealloc = (destructor)CudaCopier_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "CudaCopier(device): kvshelf's CUDA copies between device parts and host objects "
              "(pinned staging); see python/ext/cuda_copier.c.",
    .tp_methods = CudaCopier_methods,
    .tp_members = CudaCopier_members,
    .tp_init = (initproc)CudaCopier_init,
    .tp_new = PyType_GenericNew,
};
