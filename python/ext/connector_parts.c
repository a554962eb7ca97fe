/* Connector.dump_parts / Connector.load_parts: objects made of explicit parts
 * (kvs_connector_dump_parts_ex / load_parts_ex), no registered layout.
 *
 * parts: n rows of ppo memory objects (tensors, buffers), or a flat list of
 * n*ppo memory objects with parts_per_obj=ppo, or integer addresses in the
 * same shapes (nested sequences or a 2-D integer numpy array) with sizes=.
 * sizes: ppo sizes (one per column), one int for all, or n x ppo; required
 * with addresses, a check with memory objects. Memory objects must live where
 * the connector moves memory (CUDA tensors for device >= 0, host memory for
 * device -2). The address arrays are built here in C; the Task keeps a
 * reference to `parts` until it finished. stripe/stripes: striped objects
 * (kvs_parts_opts; stripes 1: whole objects). */
#include "connector.h"

#include <string.h>

#include "arrays.h"
#include "errors.h"
#include "keys.h"
#include "memory.h"

typedef struct pparts {
    size_t n, ppo;
    uint64_t *addr, *len; /* n*ppo, PyMem_Raw */
    uint64_t *tags;       /* n or NULL */
} pparts;

static void pparts_free(pparts *p) {
    PyMem_RawFree(p->addr);
    PyMem_RawFree(p->len);
    PyMem_RawFree(p->tags);
    memset(p, 0, sizeof(*p));
}

static int is_int_like(PyObject *o) {
    return PyLong_Check(o) ||
           (PyIndex_Check(o) && !is_tensor_like(o) && !PyObject_CheckBuffer(o));
}

/* 1 if parts holds integer addresses, 0 memory objects, -1 error. */
static int parts_are_ints(PyObject *parts, PyObject *fast) {
    if (PyObject_CheckBuffer(parts) && !PyList_Check(parts) && !PyTuple_Check(parts))
        return 1; /* a numpy array of addresses */
    if (PySequence_Fast_GET_SIZE(fast) == 0)
        return 1;
    PyObject *o = PySequence_Fast_GET_ITEM(fast, 0);
    if (PyList_Check(o) || PyTuple_Check(o)) {
        if (PySequence_Size(o) == 0)
            return 1;
        PyObject *x = PySequence_GetItem(o, 0);
        if (!x)
            return -1;
        int r = is_int_like(x);
        Py_DECREF(x);
        return r;
    }
    return is_int_like(o);
}

/* Sizes argument into p->len (n*ppo). With memory objects (have_len) the
 * sizes only check the lengths found. */
static int sizes_apply(PyObject *sizes, pparts *p, int have_len, const char *what) {
    if (!sizes || sizes == Py_None) {
        if (!have_len && p->n) {
            PyErr_Format(PyExc_TypeError, "%s: integer addresses need sizes=", what);
            return -1;
        }
        return 0;
    }
    size_t total = p->n * p->ppo;
    uint64_t *s = NULL;
    size_t rows = 1, cols = 1;
    int two = 0;
    if (PyLong_Check(sizes)) {
        uint64_t v = PyLong_AsUnsignedLongLong(sizes);
        if (v == (uint64_t)-1 && PyErr_Occurred())
            return -1;
        s = PyMem_RawMalloc(sizeof(uint64_t));
        if (!s) {
            PyErr_NoMemory();
            return -1;
        }
        s[0] = v;
    } else if (u64_array_from(sizes, "sizes", &s, &rows, &cols, &two) < 0) {
        return -1;
    }
    size_t cnt = rows * cols;
    if (!(cnt == 1 || (!two && cnt == p->ppo) || cnt == total)) {
        PyErr_Format(PyExc_ValueError, "%s: %zu sizes given for %zu objects of %zu parts (give "
                     "one size, one per part, or one per object and part)", what, cnt, p->n,
                     p->ppo);
        PyMem_RawFree(s);
        return -1;
    }
    for (size_t i = 0; i < total; i++) {
        uint64_t v = cnt == 1 ? s[0] : cnt == total ? s[i] : s[i % p->ppo];
        if (have_len && v != p->len[i]) {
            PyErr_Format(PyExc_ValueError, "%s: part %zu of object %zu has %llu bytes, sizes says "
                         "%llu", what, i % p->ppo, i / p->ppo, (unsigned long long)p->len[i],
                         (unsigned long long)v);
            PyMem_RawFree(s);
            return -1;
        }
        p->len[i] = v;
    }
    PyMem_RawFree(s);
    return 0;
}

/* Builds p from the arguments. device: the connector's (memory checks). */
static int pparts_from(PyObject *parts, PyObject *sizes, Py_ssize_t ppo_arg, PyObject *tags,
                       size_t n, int device, int writable, const char *what, pparts *p) {
    memset(p, 0, sizeof(*p));
    PyObject *fast = NULL;
    int ints;
    if (PyObject_CheckBuffer(parts) && !PyList_Check(parts) && !PyTuple_Check(parts)) {
        /* a numpy array of addresses: read through its buffer, never as a
         * sequence (that made a row object per block: ~0.2 us each) */
        ints = 1;
    } else {
        fast = PySequence_Fast(parts, "parts: expected a sequence");
        if (!fast)
            return -1;
        ints = parts_are_ints(parts, fast);
        if (ints < 0)
            goto fail;
    }
    if (ints) {
        uint64_t *a;
        size_t rows, cols;
        int two;
        if (u64_array_from(parts, "parts", &a, &rows, &cols, &two) < 0)
            goto fail;
        size_t total = rows * cols;
        size_t ppo = two ? cols : ppo_arg > 0 ? (size_t)ppo_arg : (n ? total / n : 1);
        if (!ppo || total != n * ppo || (two && rows != n) || (two && ppo_arg > 0 &&
                                                               (size_t)ppo_arg != cols)) {
            PyErr_Format(PyExc_ValueError, "%s: %zu addresses do not make %zu objects of %s parts",
                         what, total, n, ppo_arg > 0 ? "parts_per_obj" : "equal");
            PyMem_RawFree(a);
            goto fail;
        }
        p->n = n;
        p->ppo = ppo;
        p->addr = a;
        p->len = PyMem_RawCalloc(total ? total : 1, sizeof(uint64_t));
        if (!p->len) {
            PyErr_NoMemory();
            goto fail;
        }
        if (sizes_apply(sizes, p, 0, what) < 0)
            goto fail;
    } else {
        Py_ssize_t m = PySequence_Fast_GET_SIZE(fast);
        PyObject **items = PySequence_Fast_ITEMS(fast);
        int rowsform = m > 0 && (PyList_Check(items[0]) || PyTuple_Check(items[0]));
        size_t ppo;
        if (rowsform) {
            if ((size_t)m != n) {
                PyErr_Format(PyExc_ValueError, "%s: %zu hashes but %zd rows of parts", what, n, m);
                goto fail;
            }
            Py_ssize_t l = PySequence_Size(items[0]);
            if (l < 0)
                goto fail;
            ppo = (size_t)l;
        } else {
            ppo = ppo_arg > 0 ? (size_t)ppo_arg : 1;
            if ((size_t)m != n * ppo) {
                PyErr_Format(PyExc_ValueError, "%s: %zd parts do not make %zu objects of %zu parts",
                             what, m, n, ppo);
                goto fail;
            }
        }
        if (ppo_arg > 0 && (size_t)ppo_arg != ppo) {
            PyErr_Format(PyExc_ValueError, "%s: rows of %zu parts but parts_per_obj=%zd", what, ppo,
                         ppo_arg);
            goto fail;
        }
        if (!ppo && n) {
            PyErr_Format(PyExc_ValueError, "%s: objects of no parts", what);
            goto fail;
        }
        size_t total = n * ppo;
        p->n = n;
        p->ppo = ppo;
        p->addr = PyMem_RawCalloc(total ? total : 1, sizeof(uint64_t));
        p->len = PyMem_RawCalloc(total ? total : 1, sizeof(uint64_t));
        if (!p->addr || !p->len) {
            PyErr_NoMemory();
            goto fail;
        }
        for (size_t i = 0; i < n; i++) {
            PyObject *row = NULL;
            if (rowsform) {
                row = PySequence_Fast(items[i], "parts: expected rows of memory objects");
                if (!row)
                    goto fail;
                if ((size_t)PySequence_Fast_GET_SIZE(row) != ppo) {
                    PyErr_Format(PyExc_ValueError, "%s: row %zu has %zd parts, row 0 has %zu",
                                 what, i, PySequence_Fast_GET_SIZE(row), ppo);
                    Py_DECREF(row);
                    goto fail;
                }
            }
            for (size_t k = 0; k < ppo; k++) {
                PyObject *o = rowsform ? PySequence_Fast_GET_ITEM(row, k) : items[i * ppo + k];
                char w[96];
                snprintf(w, sizeof w, "%s: parts[%zu][%zu]", what, i, k);
                membuf mb;
                if (membuf_get(o, NULL, writable, w, &mb) < 0) {
                    Py_XDECREF(row);
                    goto fail;
                }
                int dev = mb.is_device;
                membuf_release(&mb); /* the Task keeps `parts` alive */
                if (device >= 0 && !dev) {
                    PyErr_Format(PyExc_ValueError, "%s: host memory given to a connector on CUDA "
                                 "device %d", w, device);
                    Py_XDECREF(row);
                    goto fail;
                }
                if (device < 0 && dev) {
                    Py_XDECREF(row);
                    raise_kvs(KVS_ERR_UNSUPPORTED, w,
                              "a CUDA tensor given to a host-memory connector (device -2)");
                    goto fail;
                }
                p->addr[i * ppo + k] = (uint64_t)(uintptr_t)mb.ptr;
                p->len[i * ppo + k] = mb.len;
            }
            Py_XDECREF(row);
        }
        if (sizes_apply(sizes, p, 1, what) < 0)
            goto fail;
    }
    if (tags && tags != Py_None) {
        size_t rows, cols;
        int two;
        if (u64_array_from(tags, "tags", &p->tags, &rows, &cols, &two) < 0)
            goto fail;
        if (two || rows != n) {
            PyErr_Format(PyExc_ValueError, "%s: %zu hashes but %zu tags", what, n, rows * cols);
            goto fail;
        }
    }
    Py_XDECREF(fast);
    return 0;
fail:
    Py_XDECREF(fast);
    pparts_free(p);
    return -1;
}

static PyObject *connector_parts(ConnectorObject *self, PyObject *args, PyObject *kwds, int dump) {
    static char *kwlist_d[] = {"hashes", "parts", "event", "sizes", "parts_per_obj", "tags",
                               "raw_keys", "stripe", "stripes", NULL};
    static char *kwlist_l[] = {"hashes", "parts", "sizes", "parts_per_obj", "tags", "raw_keys",
                               "stripe", "stripes", NULL};
    const char *what = dump ? "dump_parts" : "load_parts";
    PyObject *hashes, *parts, *event = Py_None, *sizes = Py_None, *tags = Py_None;
    Py_ssize_t ppo = 0, stripe = 0, stripes = 1;
    int raw = 0;
    if (dump) {
        if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|O$OnOpnn", kwlist_d, &hashes, &parts,
                                         &event, &sizes, &ppo, &tags, &raw, &stripe, &stripes))
            return NULL;
    } else if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|$OnOpnn", kwlist_l, &hashes, &parts,
                                            &sizes, &ppo, &tags, &raw, &stripe, &stripes)) {
        return NULL;
    }
    if (stripes < 1 || stripes > 65536 || stripe < 0 || stripe >= stripes) {
        PyErr_Format(PyExc_ValueError, "%s: stripe %zd of %zd stripes (1 <= stripes <= 65536, "
                     "0 <= stripe < stripes)", what, stripe, stripes);
        return NULL;
    }
    void *ev = NULL;
    if (event_from(event, &ev) < 0)
        return NULL;
    if (!self->c)
        return raise_kvs(KVS_ERR_CLOSED, what, "the connector is closed");
    keyvec kv;
    if (keyvec_from(hashes, raw ? KVS_KEY_MAX : KVS_HASH_MAX, "hashes", &kv) < 0)
        return NULL;
    pparts p;
    if (pparts_from(parts, sizes, ppo, tags, kv.n, self->device, !dump, what, &p) < 0) {
        keyvec_free(&kv);
        return NULL;
    }
    TaskObject *task = NULL;
    if (!self->c) {
        raise_kvs(KVS_ERR_CLOSED, what, "the connector is closed");
        goto out;
    }
    task = task_new(kv.n, dump ? 'd' : 'l');
    if (!task)
        goto out;
    kvs_connector *c = self->c;
    kvs_task *t = NULL;
    kvs_parts_opts o;
    memset(&o, 0, sizeof o);
    o.tags = p.tags;
    o.raw_keys = raw;
    o.stripe = (uint32_t)stripe;
    o.stripes = (uint32_t)stripes;
    size_t ppo_u = p.ppo ? p.ppo : 1;
    int rc;
    WITHOUT_GIL(self, rc = dump ? kvs_connector_dump_parts_ex(c, kv.keys, kv.n, p.addr, p.len,
                                                              ppo_u, ev, &o, &t)
                                : kvs_connector_load_parts_ex(c, kv.keys, kv.n, p.addr, p.len,
                                                              ppo_u, &o, &t));
    if (rc < 0) {
        Py_CLEAR(task);
        raise_kvs(rc, what, NULL);
        goto out;
    }
    Py_INCREF(parts);
    task->keep = parts;
    task_attach(task, self, t);
out:
    pparts_free(&p);
    keyvec_free(&kv);
    return (PyObject *)task;
}

PyObject *Connector_dump_parts(ConnectorObject *self, PyObject *args, PyObject *kwds) {
    return connector_parts(self, args, kwds, 1);
}

PyObject *Connector_load_parts(ConnectorObject *self, PyObject *args, PyObject *kwds) {
    return connector_parts(self, args, kwds, 0);
}
