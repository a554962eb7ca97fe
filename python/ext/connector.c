/* The Connector type: moves KV blocks between a registered device (or host)
 * layout and the pool by block hash (register_layout, lookup, dump, load ->
 * Task, close). Every call that may block runs without the GIL. */
#include "connector.h"

#include <structmember.h>

#include <string.h>
#include <time.h>

#include "arrays.h"
#include "config.h"
#include "errors.h"
#include "keys.h"

static PyObject *connector_closed(const char *what) {
    return raise_kvs(KVS_ERR_CLOSED, what, "the connector is closed");
}

static int Connector_init(ConnectorObject *self, PyObject *args, PyObject *kwds) {
    PyObject *config = Py_None;
    if (!PyArg_ParseTuple(args, "|O:Connector", &config))
        return -1;
    if (self->c) {
        PyErr_SetString(PyExc_RuntimeError, "Connector already open");
        return -1;
    }
    static const char *const own[] = {"device",    "namespace",    "rank",          "world_size",
                                      "num_workers", "max_inflight", "drop_when_full", "backend",
                                      "use_env",   NULL};
    PyObject *kw, *mine;
    if (split_kwargs(kwds, own, &kw, &mine) < 0)
        return -1;
    int device = -2;
    const char *ns = NULL, *backend = NULL;
    unsigned long rank = 0, world = 1, workers = 0, inflight = 0;
    int drop = 0, use_env = 1;
    PyObject *v;
    int bad = 0;
#define GETUL(name, var)                                                                           \
    if (!bad && (v = PyDict_GetItemString(mine, name)) && v != Py_None) {                          \
        var = PyLong_AsUnsignedLong(v);                                                            \
        if (PyErr_Occurred())                                                                      \
            bad = 1;                                                                               \
    }
    if ((v = PyDict_GetItemString(mine, "device")) && v != Py_None) {
        device = (int)PyLong_AsLong(v);
        if (PyErr_Occurred())
            bad = 1;
    }
    GETUL("rank", rank)
    GETUL("world_size", world)
    GETUL("num_workers", workers)
    GETUL("max_inflight", inflight)
#undef GETUL
    if (!bad && (v = PyDict_GetItemString(mine, "drop_when_full")) && (drop = PyObject_IsTrue(v)) < 0)
        bad = 1;
    if (!bad && (v = PyDict_GetItemString(mine, "use_env")) && (use_env = PyObject_IsTrue(v)) < 0)
        bad = 1;
    if (!bad && (v = PyDict_GetItemString(mine, "namespace")) && v != Py_None) {
        ns = PyUnicode_AsUTF8(v);
        if (!ns)
            bad = 1;
        else {
            self->ns = v;
            Py_INCREF(v);
        }
    }
    if (!bad && (v = PyDict_GetItemString(mine, "backend")) && v != Py_None) {
        backend = PyUnicode_AsUTF8(v);
        if (!backend)
            bad = 1;
    }
    if (!bad && !ns) {
        PyErr_SetString(PyExc_TypeError, "Connector: namespace= is required (e.g. model name, "
                                         "dtype and block size)");
        bad = 1;
    }
    if (!bad && device < -2) {
        PyErr_Format(PyExc_ValueError, "Connector: device must be >= -2, got %d", device);
        bad = 1;
    }
    kvs_config cfg;
    if (!bad && build_config(config, kw, use_env, &cfg) < 0)
        bad = 1;
    if (bad) {
        Py_DECREF(mine);
        Py_DECREF(kw);
        return -1;
    }
    kvs_connector_opts o;
    memset(&o, 0, sizeof o);
    o.ns = ns;
    o.rank = (uint32_t)rank;
    o.world_size = (uint32_t)world;
    o.num_workers = (uint32_t)workers;
    o.max_inflight = (uint32_t)inflight;
    o.drop_when_full = drop;
    o.backend = backend;
    char err[ERRBUF] = "";
    kvs_connector *c = NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = kvs_connector_open(&cfg, device, &o, &c, err, sizeof err);
    Py_END_ALLOW_THREADS
    Py_DECREF(mine);
    Py_DECREF(kw);
    if (rc < 0) {
        raise_kvs(rc, "kvs_connector_open", err);
        return -1;
    }
    self->c = c;
    self->device = device;
    return 0;
}

/* close(timeout=5.0): waits up to timeout seconds for tasks in flight, then
 * cancels the rest (their blocks report KVS_ERR_CLOSED) and closes. */
static void connector_close_impl(ConnectorObject *self, double timeout) {
    if (!self->c)
        return;
    kvs_connector *c = self->c;
    self->c = NULL; /* new calls fail with Closed */
    wait_not_busy(&self->busy);
    long long left_ms = timeout < 0 ? 0 : (long long)(timeout * 1000);
    /* Snapshot the live tasks with a reference each: the GIL is released
     * while waiting, and other threads may drop their tasks meanwhile. */
    size_t nt = 0;
    for (TaskObject *t = self->tasks; t; t = t->next)
        nt++;
    TaskObject **snap = nt ? PyMem_Malloc(nt * sizeof(TaskObject *)) : NULL;
    if (nt && !snap) {
        nt = 0; /* out of memory: abandon every task without waiting */
        for (TaskObject *t = self->tasks; t; t = t->next)
            task_abandon(t, KVS_ERR_CLOSED);
    }
    nt = 0;
    if (snap)
        for (TaskObject *t = self->tasks; t; t = t->next) {
            Py_INCREF(t);
            snap[nt++] = t;
        }
    for (size_t k = 0; k < nt; k++) {
        TaskObject *t = snap[k];
        wait_not_busy(&t->busy);
        if (t->finished || !t->t)
            continue;
        int rc;
        kvs_task *kt = t->t;
        int slice = left_ms > 0 ? (int)(left_ms > 60000 ? 60000 : left_ms) : 0;
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        Py_BEGIN_ALLOW_THREADS
        rc = kvs_task_wait(kt, slice);
        Py_END_ALLOW_THREADS
        clock_gettime(CLOCK_MONOTONIC, &b);
        left_ms -= (b.tv_sec - a.tv_sec) * 1000 + (b.tv_nsec - a.tv_nsec) / 1000000;
        if (rc == KVS_OK) {
            if (task_collect(t) < 0)
                PyErr_Clear();
        } else {
            task_abandon(t, KVS_ERR_CLOSED);
        }
    }
    /* unlink everything first (tasks keep their results; the list goes
     * away), then drop the snapshot's references */
    while (self->tasks) {
        TaskObject *t = self->tasks;
        self->tasks = t->next;
        t->prev = t->next = NULL;
    }
    for (size_t k = 0; k < nt; k++)
        Py_DECREF(snap[k]);
    PyMem_Free(snap);
    Py_BEGIN_ALLOW_THREADS
    kvs_connector_close(c);
    Py_END_ALLOW_THREADS
}

static void Connector_dealloc(ConnectorObject *self) {
    connector_close_impl(self, 0);
    Py_CLEAR(self->ns);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Connector_close(ConnectorObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"timeout", NULL};
    double timeout = 5.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|d", kwlist, &timeout))
        return NULL;
    connector_close_impl(self, timeout);
    Py_RETURN_NONE;
}

static PyObject *Connector_enter(ConnectorObject *self, PyObject *Py_UNUSED(a)) {
    Py_INCREF(self);
    return (PyObject *)self;
}

static PyObject *Connector_exit(ConnectorObject *self, PyObject *Py_UNUSED(a)) {
    connector_close_impl(self, 5.0);
    Py_RETURN_FALSE;
}

/* register_layout(layouts, num_blocks): layouts is a sequence of
 * (base, block_stride, chunk_bytes, chunk_stride, count) tuples (or an n x 5
 * integer array). */
static PyObject *Connector_register_layout(ConnectorObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"layouts", "num_blocks", NULL};
    PyObject *layouts;
    unsigned long num_blocks;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Ok", kwlist, &layouts, &num_blocks))
        return NULL;
    uint64_t *a;
    size_t rows, cols;
    int two;
    if (u64_array_from(layouts, "layouts", &a, &rows, &cols, &two) < 0)
        return NULL;
    if (!rows || cols != 5 || !two) {
        PyMem_RawFree(a);
        PyErr_SetString(PyExc_ValueError, "layouts: expected a non-empty sequence of (base, "
                                          "block_stride, chunk_bytes, chunk_stride, count)");
        return NULL;
    }
    kvs_tensor_layout *tl = PyMem_RawCalloc(rows, sizeof(kvs_tensor_layout));
    if (!tl) {
        PyMem_RawFree(a);
        return PyErr_NoMemory();
    }
    for (size_t i = 0; i < rows; i++) {
        tl[i].base = a[i * 5 + 0];
        tl[i].block_stride = a[i * 5 + 1];
        tl[i].chunk_bytes = a[i * 5 + 2];
        tl[i].chunk_stride = a[i * 5 + 3];
        if (a[i * 5 + 4] > UINT32_MAX) {
            PyMem_RawFree(a);
            PyMem_RawFree(tl);
            PyErr_Format(PyExc_ValueError, "layouts[%zu]: count too large", i);
            return NULL;
        }
        tl[i].count = (uint32_t)a[i * 5 + 4];
    }
    PyMem_RawFree(a);
    if (!self->c) {
        PyMem_RawFree(tl);
        return connector_closed("register_layout");
    }
    kvs_connector *c = self->c;
    int rc;
    WITHOUT_GIL(self, rc = kvs_connector_register_layout(c, tl, rows, (uint32_t)num_blocks));
    PyMem_RawFree(tl);
    if (rc < 0)
        return raise_kvs(rc, "register_layout", NULL);
    self->layout_set = 1;
    Py_RETURN_NONE;
}

static PyObject *Connector_lookup_common(ConnectorObject *self, PyObject *hashes, int prefix) {
    const char *what = prefix ? "lookup_prefix" : "lookup";
    keyvec kv;
    if (keyvec_from(hashes, KVS_HASH_MAX, "hashes", &kv) < 0)
        return NULL;
    uint8_t *hit = PyMem_RawCalloc(kv.n ? kv.n : 1, 1);
    if (!hit) {
        keyvec_free(&kv);
        return PyErr_NoMemory();
    }
    PyObject *res = NULL;
    if (!self->c) {
        connector_closed(what);
    } else if (!kv.n) {
        res = prefix ? PyLong_FromLong(0) : PyList_New(0);
    } else {
        kvs_connector *c = self->c;
        int rc;
        WITHOUT_GIL(self, rc = prefix ? kvs_connector_lookup_prefix(c, kv.keys, kv.n)
                                      : kvs_connector_lookup(c, kv.keys, kv.n, hit));
        if (rc < 0)
            raise_kvs(rc, what, NULL);
        else
            res = prefix ? PyLong_FromLong(rc) : bool_list(hit, kv.n);
    }
    PyMem_RawFree(hit);
    keyvec_free(&kv);
    return res;
}

static PyObject *Connector_lookup(ConnectorObject *self, PyObject *hashes) {
    return Connector_lookup_common(self, hashes, 0);
}

static PyObject *Connector_lookup_prefix(ConnectorObject *self, PyObject *hashes) {
    return Connector_lookup_common(self, hashes, 1);
}

/* o: None (NULL), an int handle, or an object with attribute `attr` (torch
 * events and streams: .cuda_event, .cuda_stream). */
int cuda_handle_from(PyObject *o, const char *attr, const char *what, void **out) {
    *out = NULL;
    if (!o || o == Py_None)
        return 0;
    PyObject *h = NULL;
    if (PyLong_Check(o)) {
        h = o;
        Py_INCREF(h);
    } else {
        h = PyObject_GetAttrString(o, attr);
        if (!h) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s: expected None, an int handle or an object with .%s, "
                                          "not %.100s", what, attr, Py_TYPE(o)->tp_name);
            return -1;
        }
    }
    unsigned long long x = PyLong_AsUnsignedLongLong(h);
    Py_DECREF(h);
    if (x == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = (void *)(uintptr_t)x;
    return 0;
}

/* event: None, an int (cudaEvent_t), or an object with .cuda_event (torch). */
int event_from(PyObject *ev, void **out) { return cuda_handle_from(ev, "cuda_event", "event", out); }

/* block_ids: n block ids (1-D, each < 2^32) -> *ids (PyMem_RawFree it). */
static int block_ids_from(PyObject *blocks, size_t n, const char *what, uint32_t **ids) {
    uint64_t *b64;
    size_t rows, cols;
    int two;
    if (u64_array_from(blocks, "block_ids", &b64, &rows, &cols, &two) < 0)
        return -1;
    if (two || rows != n) {
        PyErr_Format(PyExc_ValueError, "%s: %zu hashes but %zu block ids", what, n, rows);
        PyMem_RawFree(b64);
        return -1;
    }
    *ids = PyMem_RawMalloc(sizeof(uint32_t) * (rows ? rows : 1));
    if (!*ids) {
        PyMem_RawFree(b64);
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; i < rows; i++) {
        if (b64[i] > UINT32_MAX) {
            PyErr_Format(PyExc_ValueError, "%s: block id %llu out of range", what,
                         (unsigned long long)b64[i]);
            PyMem_RawFree(b64);
            PyMem_RawFree(*ids);
            return -1;
        }
        (*ids)[i] = (uint32_t)b64[i];
    }
    PyMem_RawFree(b64);
    return 0;
}

static PyObject *connector_transfer(ConnectorObject *self, PyObject *args, PyObject *kwds,
                                    int dump) {
    static char *kwlist_d[] = {"hashes", "block_ids", "event", NULL};
    static char *kwlist_l[] = {"hashes", "block_ids", NULL};
    const char *what = dump ? "dump" : "load";
    PyObject *hashes, *blocks, *event = Py_None;
    if (dump) {
        if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|O", kwlist_d, &hashes, &blocks, &event))
            return NULL;
    } else if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO", kwlist_l, &hashes, &blocks)) {
        return NULL;
    }
    void *ev;
    if (event_from(event, &ev) < 0)
        return NULL;
    keyvec kv;
    if (keyvec_from(hashes, KVS_HASH_MAX, "hashes", &kv) < 0)
        return NULL;
    uint32_t *ids;
    if (block_ids_from(blocks, kv.n, what, &ids) < 0) {
        keyvec_free(&kv);
        return NULL;
    }
    TaskObject *task = NULL;
    if (!self->c) {
        connector_closed(what);
        goto out;
    }
    task = task_new(kv.n, dump ? 'd' : 'l');
    if (!task)
        goto out;
    kvs_connector *c = self->c;
    kvs_task *t = NULL;
    int rc;
    WITHOUT_GIL(self, rc = dump ? kvs_connector_dump(c, kv.keys, ids, kv.n, ev, &t)
                                : kvs_connector_load(c, kv.keys, ids, kv.n, &t));
    if (rc < 0) {
        Py_CLEAR(task);
        raise_kvs(rc, what, NULL);
        goto out;
    }
    task_attach(task, self, t);
out:
    PyMem_RawFree(ids);
    keyvec_free(&kv);
    return (PyObject *)task;
}

static PyObject *Connector_dump(ConnectorObject *self, PyObject *args, PyObject *kwds) {
    return connector_transfer(self, args, kwds, 1);
}

static PyObject *Connector_load(ConnectorObject *self, PyObject *args, PyObject *kwds) {
    return connector_transfer(self, args, kwds, 0);
}

static PyObject *Connector_counters(ConnectorObject *self, PyObject *Py_UNUSED(a)) {
    if (!self->c)
        return connector_closed("counters");
    kvs_connector_counters k;
    memset(&k, 0, sizeof k);
    kvs_connector_get_counters(self->c, &k);
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K}", "dumped_blocks",
                         (unsigned long long)k.dumped_blocks, "loaded_blocks",
                         (unsigned long long)k.loaded_blocks, "missed_blocks",
                         (unsigned long long)k.missed_blocks, "failed_blocks",
                         (unsigned long long)k.failed_blocks, "dropped_blocks",
                         (unsigned long long)k.dropped_blocks, "skipped_blocks",
                         (unsigned long long)k.skipped_blocks, "bytes_dumped",
                         (unsigned long long)k.bytes_dumped, "bytes_loaded",
                         (unsigned long long)k.bytes_loaded, "readahead_stripes",
                         (unsigned long long)k.readahead_stripes);
}

static PyObject *Connector_get_block_bytes(ConnectorObject *self, void *Py_UNUSED(c)) {
    if (!self->c)
        return connector_closed("block_bytes");
    return PyLong_FromUnsignedLongLong(kvs_connector_block_bytes(self->c));
}

static PyObject *Connector_get_backend(ConnectorObject *self, void *Py_UNUSED(c)) {
    if (!self->c)
        return connector_closed("backend");
    return PyUnicode_FromString(kvs_connector_backend(self->c));
}

static PyObject *Connector_get_closed(ConnectorObject *self, void *Py_UNUSED(c)) {
    return PyBool_FromLong(self->c == NULL);
}

static PyObject *Connector_get_device(ConnectorObject *self, void *Py_UNUSED(c)) {
    return PyLong_FromLong(self->device);
}

static PyObject *Connector_get_handle(ConnectorObject *self, void *Py_UNUSED(c)) {
    return PyLong_FromVoidPtr(self->c);
}

static PyObject *Connector_get_inflight(ConnectorObject *self, void *Py_UNUSED(c)) {
    long n = 0;
    for (TaskObject *t = self->tasks; t; t = t->next)
        if (!t->finished)
            n++;
    return PyLong_FromLong(n);
}

static PyMethodDef Connector_methods[] = {
    {"register_layout", METH_KW(Connector_register_layout), METH_VARARGS | METH_KEYWORDS,
     "register_layout(layouts, num_blocks): layouts = [(base, block_stride, chunk_bytes, "
     "chunk_stride, count), ...], one per KV tensor, in bytes."},
    {"lookup", (PyCFunction)Connector_lookup, METH_O,
     "lookup(hashes) -> list[bool] (one round trip)"},
    {"lookup_prefix", (PyCFunction)Connector_lookup_prefix, METH_O,
     "lookup_prefix(hashes) -> number of leading hashes stored"},
    {"dump", METH_KW(Connector_dump), METH_VARARGS | METH_KEYWORDS,
     "dump(hashes, block_ids, event=None) -> Task: copy blocks to the pool after `event` (a "
     "torch.cuda.Event or a cudaEvent_t int) completes."},
    {"load", METH_KW(Connector_load), METH_VARARGS | METH_KEYWORDS,
     "load(hashes, block_ids) -> Task: copy blocks from the pool."},
    {"dump_parts", METH_KW(Connector_dump_parts), METH_VARARGS | METH_KEYWORDS,
     "dump_parts(hashes, parts, event=None, *, sizes=None, parts_per_obj=0, tags=None, "
     "raw_keys=False, stripe=0, stripes=1) -> Task: store object i = its parts back to back. "
     "parts: n rows of tensors/buffers, a flat list with parts_per_obj, or integer addresses "
     "(nested or a 2-D array) with sizes (per part, one for all, or n x ppo). Device memory of "
     "the connector's device (host memory for device -2); no layout needed. tags: n ints a load "
     "must match; raw_keys: the hashes are whole store keys. stripes > 1: objects of `stripes` "
     "such stripes, this call storing stripe `stripe` of each; an object is published once all "
     "its stripes are in (see kvs_parts_opts)."},
    {"load_parts", METH_KW(Connector_load_parts), METH_VARARGS | METH_KEYWORDS,
     "load_parts(hashes, parts, *, sizes=None, parts_per_obj=0, tags=None, raw_keys=False, "
     "stripe=0, stripes=1) -> Task: load objects into their parts. Per-object results: 0 "
     "loaded, ERR_NOT_FOUND miss, ERR_TOO_LARGE / ERR_CORRUPT stored with other sizes or tag "
     "(nothing copied). stripes > 1: stripe `stripe` of striped objects (one lease per object "
     "for all its stripes)."},
    {"counters", (PyCFunction)Connector_counters, METH_NOARGS, "counters() -> dict"},
    {"close", METH_KW(Connector_close), METH_VARARGS | METH_KEYWORDS,
     "close(timeout=5.0): wait up to timeout s for tasks in flight, cancel the rest, close."},
    {"__enter__", (PyCFunction)Connector_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)Connector_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Connector_getset[] = {
    {"block_bytes", (getter)Connector_get_block_bytes, NULL, "bytes of one stored block object",
     NULL},
    {"backend", (getter)Connector_get_backend, NULL, "copy backend in use", NULL},
    {"closed", (getter)Connector_get_closed, NULL, "True after close()", NULL},
    {"device", (getter)Connector_get_device, NULL, "device ordinal, -1 lookup-only, -2 host", NULL},
    {"handle", (getter)Connector_get_handle, NULL, "address of the kvs_connector", NULL},
    {"inflight", (getter)Connector_get_inflight, NULL, "tasks not yet collected", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef Connector_members[] = {
    {"namespace", T_OBJECT, offsetof(ConnectorObject, ns), READONLY, "the key namespace"},
    {NULL, 0, 0, 0, NULL},
};

PyTypeObject ConnectorType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvshelf._kvshelf.Connector",
    .tp_basicsize = sizeof(ConnectorObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Connector(config=None, /, *, namespace, device=-2, rank=0, world_size=1, "
              "num_workers=0, max_inflight=0, drop_when_full=False, backend='auto', use_env=True, "
              "**keys)\n\nA KV connector: device >= 0 CUDA ordinal, -1 lookup-only (scheduler), "
              "-2 host memory.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Connector_init,
    .tp_dealloc = (destructor)Connector_dealloc,
    .tp_methods = Connector_methods,
    .tp_getset = Connector_getset,
    .tp_members = Connector_members,
};

