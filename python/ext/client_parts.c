/* Client.put_parts / Client.get_parts: one object = [header] + part0 + part1
 * + ... with the parts anywhere in caller memory.
 *
 * keys: n keys; addrs: n x m addresses (2-D), n memory objects (m = 1), or n
 * rows of m memory objects; sizes: m sizes (one per column) or one int
 * (required with addresses; with objects, a check of their sizes).
 * header: None, one bytes for all, or a sequence of n bytes.
 * Zero copy: bytes move between the parts and the pool objects directly
 * (reserve -> slot writes -> commit; acquire -> slot reads -> lease check ->
 * release). get_parts checks the stored size and header: a different size is
 * KVS_ERR_TOO_LARGE, a different header KVS_ERR_CORRUPT, a lease lost during
 * the copy KVS_ERR_NOT_FOUND. Returns per-key statuses. */
#include "client.h"

#include <stdlib.h>
#include <string.h>

#include "arrays.h"
#include "errors.h"
#include "keys.h"
#include "memory.h"

typedef struct parts {
    size_t n, m;
    uint64_t *addr;  /* n*m */
    uint64_t *size;  /* m */
    uint64_t total;  /* header + sum(size) */
    const char **hdr;
    uint32_t *hdr_len;
    char *hdr_arena;
    membuf *mb;      /* n*m when objects were given */
    size_t n_mb;
} parts;

static void parts_free(parts *p) {
    if (p->mb)
        for (size_t i = 0; i < p->n_mb; i++)
            membuf_release(&p->mb[i]);
    PyMem_RawFree(p->mb);
    PyMem_RawFree(p->addr);
    PyMem_RawFree(p->size);
    PyMem_RawFree((void *)p->hdr);
    PyMem_RawFree(p->hdr_len);
    PyMem_RawFree(p->hdr_arena);
    memset(p, 0, sizeof(*p));
}

/* 0: addrs are integers; 1: n memory objects; 2: n rows of memory objects. */
static int addrs_kind(PyObject *fast, int *kind) {
    *kind = 0;
    if (PySequence_Fast_GET_SIZE(fast) == 0)
        return 0;
    PyObject *o0 = PySequence_Fast_GET_ITEM(fast, 0);
    if (!PyLong_Check(o0) && (is_tensor_like(o0) || PyObject_CheckBuffer(o0))) {
        *kind = 1;
        return 0;
    }
    if ((PyList_Check(o0) || PyTuple_Check(o0)) && PySequence_Size(o0) > 0) {
        PyObject *o00 = PySequence_GetItem(o0, 0);
        if (!o00)
            return -1;
        if (!PyLong_Check(o00) && (is_tensor_like(o00) || PyObject_CheckBuffer(o00)))
            *kind = 2;
        Py_DECREF(o00);
    }
    return 0;
}

/* Takes memory object o as part j of object i; all parts of a column must
 * have one size. */
static int parts_take(parts *p, size_t i, size_t j, PyObject *o, int writable, int grid,
                      const char *what) {
    size_t k = i * p->m + j;
    char w[128];
    snprintf(w, sizeof w, "%s[%zu][%zu]", what, i, j);
    int bad = membuf_get_host(o, NULL, writable, grid ? w : what, &p->mb[k]) < 0;
    p->n_mb = k + 1;
    if (bad)
        return -1;
    p->addr[k] = (uint64_t)(uintptr_t)p->mb[k].ptr;
    if (i == 0) {
        p->size[j] = p->mb[k].len;
        return 0;
    }
    if (p->mb[k].len == p->size[j])
        return 0;
    if (grid)
        PyErr_Format(PyExc_ValueError,
                     "%s: has %llu bytes but [0][%zu] has %llu: each column must have one size", w,
                     (unsigned long long)p->mb[k].len, j, (unsigned long long)p->size[j]);
    else
        PyErr_Format(PyExc_ValueError,
                     "%s: buffer %zu has %llu bytes, buffer 0 has %llu: all must match", what, i,
                     (unsigned long long)p->mb[k].len, (unsigned long long)p->size[0]);
    return -1;
}

/* Parts given as memory objects: n of them (grid = 0, one part each), or n
 * rows of m (grid = 1). */
static int parts_from_objects(parts *p, PyObject *fast, int grid, int writable, const char *what) {
    size_t n = p->n;
    if ((size_t)PySequence_Fast_GET_SIZE(fast) != n) {
        PyErr_Format(PyExc_ValueError, "%s: %zu keys but %zd %s", what, n,
                     PySequence_Fast_GET_SIZE(fast), grid ? "rows of buffers" : "buffers");
        return -1;
    }
    p->m = grid ? (size_t)PySequence_Size(PySequence_Fast_GET_ITEM(fast, 0)) : 1;
    p->mb = PyMem_RawCalloc((n * p->m) > 0 ? n * p->m : 1, sizeof(membuf));
    p->addr = PyMem_RawCalloc((n * p->m) > 0 ? n * p->m : 1, sizeof(uint64_t));
    p->size = PyMem_RawCalloc(p->m ? p->m : 1, sizeof(uint64_t));
    if (!p->mb || !p->addr || !p->size) {
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        if (!grid) {
            if (parts_take(p, i, 0, item, writable, grid, what) < 0)
                return -1;
            continue;
        }
        PyObject *row = PySequence_Fast(item, "each row must be a sequence of buffers");
        if (!row)
            return -1;
        int bad = 0;
        if ((size_t)PySequence_Fast_GET_SIZE(row) != p->m) {
            PyErr_Format(PyExc_ValueError, "%s: row %zu has %zd buffers, row 0 has %zu", what, i,
                         PySequence_Fast_GET_SIZE(row), p->m);
            bad = 1;
        }
        for (size_t j = 0; j < p->m && !bad; j++)
            bad = parts_take(p, i, j, PySequence_Fast_GET_ITEM(row, j), writable, grid, what) < 0;
        Py_DECREF(row);
        if (bad)
            return -1;
    }
    return 0;
}

/* Parts given as an n x m integer array of addresses (or n addresses). */
static int parts_from_ints(parts *p, PyObject *addrs, const char *what) {
    size_t rows, cols;
    int two;
    if (u64_array_from(addrs, what, &p->addr, &rows, &cols, &two) < 0)
        return -1;
    if (rows != p->n) {
        PyErr_Format(PyExc_ValueError, "%s: %zu keys but %zu address rows", what, p->n, rows);
        return -1;
    }
    p->m = cols;
    for (size_t i = 0; i < p->n * cols; i++)
        if (p->addr[i] == 0) {
            PyErr_Format(PyExc_ValueError, "%s: address 0 at row %zu", what, i / cols);
            return -1;
        }
    return 0;
}

static int parts_addrs(parts *p, PyObject *addrs, int writable, const char *what) {
    if (!PyObject_CheckBuffer(addrs) || PyBytes_Check(addrs)) {
        PyObject *fast = PySequence_Fast(addrs, "addresses must be a sequence");
        if (!fast)
            return -1;
        int kind;
        int r = addrs_kind(fast, &kind);
        if (r == 0 && kind)
            r = parts_from_objects(p, fast, kind == 2, writable, what);
        Py_DECREF(fast);
        if (r < 0 || kind)
            return r;
    }
    return parts_from_ints(p, addrs, what);
}

/* sizes: one int (*scalar = 1, *r = 1) or an integer array. */
static int sizes_read(PyObject *sizes, uint64_t **sv, size_t *r, int *two, int *scalar) {
    *scalar = PyLong_Check(sizes);
    if (!*scalar) {
        size_t c;
        return u64_array_from(sizes, "sizes", sv, r, &c, two);
    }
    *sv = PyMem_RawMalloc(sizeof(uint64_t));
    if (!*sv) {
        PyErr_NoMemory();
        return -1;
    }
    (*sv)[0] = PyLong_AsUnsignedLongLong(sizes);
    if ((*sv)[0] == (uint64_t)-1 && PyErr_Occurred()) {
        PyMem_RawFree(*sv);
        return -1;
    }
    *r = 1;
    *two = 0;
    return 0;
}

/* The column sizes: taken from `sizes` with integer addresses; with memory
 * objects, `sizes` (if given) must match theirs. */
static int parts_sizes(parts *p, PyObject *sizes, const char *what) {
    int given = sizes && sizes != Py_None;
    if (!p->mb && !given) {
        PyErr_Format(PyExc_TypeError, "%s: sizes are required with integer addresses", what);
        return -1;
    }
    if (!given)
        return 0;
    if (!p->mb) {
        p->size = PyMem_RawCalloc(p->m ? p->m : 1, sizeof(uint64_t));
        if (!p->size) {
            PyErr_NoMemory();
            return -1;
        }
    }
    uint64_t *sv;
    size_t r;
    int two, scalar;
    if (sizes_read(sizes, &sv, &r, &two, &scalar) < 0)
        return -1;
    int rc = 0;
    if (!p->mb && scalar) {
        for (size_t j = 0; j < p->m; j++)
            p->size[j] = sv[0];
    } else if (!p->mb) {
        if (two || r != p->m) {
            PyErr_Format(PyExc_ValueError, "%s: expected %zu sizes (one per column)", what, p->m);
            rc = -1;
        } else {
            memcpy(p->size, sv, sizeof(uint64_t) * p->m);
        }
    } else {
        for (size_t j = 0; j < p->m && rc == 0; j++) {
            uint64_t want = r == 1 ? sv[0] : (j < r ? sv[j] : 0);
            if ((r != 1 && r != p->m) || two || want != p->size[j]) {
                PyErr_Format(PyExc_ValueError, "%s: buffers of column %zu have %llu bytes, "
                                               "expected %llu", what, j,
                             (unsigned long long)p->size[j], (unsigned long long)want);
                rc = -1;
            }
        }
    }
    PyMem_RawFree(sv);
    return rc;
}

/* The headers: none, one bytes for all, or n of one length. Sets total. */
static int parts_headers(parts *p, PyObject *header, const char *what) {
    size_t n = p->n;
    p->hdr = PyMem_RawCalloc(n ? n : 1, sizeof(char *));
    p->hdr_len = PyMem_RawCalloc(n ? n : 1, sizeof(uint32_t));
    if (!p->hdr || !p->hdr_len) {
        PyErr_NoMemory();
        return -1;
    }
    uint32_t hlen0 = 0;
    if (header && header != Py_None) {
        if (PyBytes_Check(header)) {
            Py_ssize_t l = PyBytes_GET_SIZE(header);
            p->hdr_arena = PyMem_RawMalloc(l ? (size_t)l : 1);
            if (!p->hdr_arena) {
                PyErr_NoMemory();
                return -1;
            }
            memcpy(p->hdr_arena, PyBytes_AS_STRING(header), (size_t)l);
            for (size_t i = 0; i < n; i++) {
                p->hdr[i] = p->hdr_arena;
                p->hdr_len[i] = (uint32_t)l;
            }
            hlen0 = (uint32_t)l;
        } else {
            keyvec hv;
            if (keyvec_from(header, 1u << 20, "header", &hv) < 0)
                return -1;
            if (hv.n != n) {
                keyvec_free(&hv);
                PyErr_Format(PyExc_ValueError, "%s: %zu keys but %zu headers", what, n, hv.n);
                return -1;
            }
            for (size_t i = 0; i < n; i++) {
                p->hdr[i] = hv.keys[i].data;
                p->hdr_len[i] = hv.keys[i].len;
                if (i && hv.keys[i].len != hlen0) {
                    keyvec_free(&hv);
                    PyErr_Format(PyExc_ValueError, "%s: headers must all have the same length",
                                 what);
                    return -1;
                }
                hlen0 = hv.keys[i].len;
            }
            p->hdr_arena = hv.arena; /* keep */
            PyMem_RawFree(hv.keys);
        }
    }
    p->total = hlen0;
    for (size_t j = 0; j < p->m; j++)
        p->total += p->size[j];
    if (p->total == 0) {
        PyErr_Format(PyExc_ValueError, "%s: objects would be empty", what);
        return -1;
    }
    return 0;
}

/* Fills p for n keys. On failure p may hold memory: parts_free it. */
static int parts_from(size_t n, PyObject *addrs, PyObject *sizes, PyObject *header, int writable,
                      const char *what, parts *p) {
    memset(p, 0, sizeof(*p));
    p->n = n;
    if (parts_addrs(p, addrs, writable, what) < 0 || parts_sizes(p, sizes, what) < 0 ||
        parts_headers(p, header, what) < 0)
        return -1;
    return 0;
}

/* Runs without the GIL. */
static int do_put_parts(kvs_client *c, const keyvec *kv, const parts *p, int *st) {
    size_t n = kv->n;
    kvs_slot *slots = calloc(n ? n : 1, sizeof(kvs_slot));
    uint64_t *sizes = calloc(n ? n : 1, sizeof(uint64_t));
    uint8_t *ok = calloc(n ? n : 1, 1);
    int *cres = calloc(n ? n : 1, sizeof(int));
    int rc = KVS_OK;
    if (!slots || !sizes || !ok || !cres) {
        rc = KVS_ERR_NOMEM;
        goto out;
    }
    for (size_t i = 0; i < n; i++)
        sizes[i] = p->total;
    rc = kvs_reserve_batch(c, kv->keys, sizes, n, slots);
    if (rc < 0)
        goto out;
    for (size_t i = 0; i < n; i++) {
        st[i] = slots[i].status;
        if (slots[i].status != KVS_OK)
            continue;
        uint64_t off = 0;
        int r = KVS_OK;
        if (p->hdr_len[i]) {
            r = kvs_slot_write(c, &slots[i], 0, p->hdr[i], p->hdr_len[i]);
            off = p->hdr_len[i];
        }
        for (size_t j = 0; j < p->m && r == KVS_OK; j++) {
            r = kvs_slot_write(c, &slots[i], off, (const void *)(uintptr_t)p->addr[i * p->m + j],
                               p->size[j]);
            off += p->size[j];
        }
        ok[i] = r == KVS_OK;
        st[i] = r;
    }
    /* commit only the reserved slots (others have an error status) */
    rc = kvs_commit_batch(c, kv->keys, slots, ok, n, cres);
    if (rc < 0) {
        for (size_t i = 0; i < n; i++)
            if (slots[i].status == KVS_OK && st[i] == KVS_OK)
                st[i] = rc;
        rc = KVS_OK;
        goto out;
    }
    for (size_t i = 0; i < n; i++)
        if (slots[i].status == KVS_OK && st[i] == KVS_OK && cres[i] < 0)
            st[i] = cres[i];
    rc = KVS_OK;
out:
    free(slots);
    free(sizes);
    free(ok);
    free(cres);
    return rc;
}

/* Runs without the GIL. */
static int do_get_parts(kvs_client *c, const keyvec *kv, const parts *p, int *st) {
    size_t n = kv->n;
    kvs_slot *slots = calloc(n ? n : 1, sizeof(kvs_slot));
    char *hbuf = NULL;
    uint32_t hmax = 0;
    int rc;
    for (size_t i = 0; i < n; i++)
        if (p->hdr_len[i] > hmax)
            hmax = p->hdr_len[i];
    if (hmax)
        hbuf = malloc(hmax);
    if (!slots || (hmax && !hbuf)) {
        free(slots);
        free(hbuf);
        return KVS_ERR_NOMEM;
    }
    rc = kvs_acquire_batch(c, kv->keys, n, slots);
    if (rc < 0) {
        free(slots);
        free(hbuf);
        return rc;
    }
    for (size_t i = 0; i < n; i++) {
        st[i] = slots[i].status;
        if (slots[i].status != KVS_OK)
            continue;
        if (slots[i].size != p->total) {
            st[i] = KVS_ERR_TOO_LARGE;
            continue;
        }
        uint64_t off = 0;
        int r = KVS_OK;
        if (p->hdr_len[i]) {
            r = kvs_slot_read(c, &slots[i], 0, hbuf, p->hdr_len[i]);
            if (r == KVS_OK && memcmp(hbuf, p->hdr[i], p->hdr_len[i]) != 0)
                r = KVS_ERR_CORRUPT;
            off = p->hdr_len[i];
        }
        for (size_t j = 0; j < p->m && r == KVS_OK; j++) {
            r = kvs_slot_read(c, &slots[i], off, (void *)(uintptr_t)p->addr[i * p->m + j],
                              p->size[j]);
            off += p->size[j];
        }
        if (r == KVS_OK && !kvs_slot_lease_valid(c, &slots[i]))
            r = KVS_ERR_NOT_FOUND; /* never hand back bytes read after the lease ended */
        st[i] = r;
    }
    kvs_release_batch(c, slots, n);
    free(slots);
    free(hbuf);
    return KVS_OK;
}

static PyObject *client_parts_common(ClientObject *self, PyObject *args, PyObject *kwds, int is_get) {
    static char *kwlist[] = {"keys", "addrs", "sizes", "header", NULL};
    PyObject *keys, *addrs, *sizes = Py_None, *header = Py_None;
    const char *what = is_get ? "get_parts" : "put_parts";
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|OO", kwlist, &keys, &addrs, &sizes, &header))
        return NULL;
    keyvec kv;
    if (keyvec_from(keys, KVS_KEY_MAX, "keys", &kv) < 0)
        return NULL;
    parts p;
    if (parts_from(kv.n, addrs, sizes, header, is_get, what, &p) < 0) {
        parts_free(&p);
        keyvec_free(&kv);
        return NULL;
    }
    int *st = PyMem_RawCalloc(kv.n ? kv.n : 1, sizeof(int));
    if (!st) {
        parts_free(&p);
        keyvec_free(&kv);
        return PyErr_NoMemory();
    }
    PyObject *res = NULL;
    if (!self->c) {
        client_closed(what);
    } else {
        kvs_client *c = self->c;
        int rc = KVS_OK;
        if (kv.n)
            WITHOUT_GIL(self, rc = is_get ? do_get_parts(c, &kv, &p, st)
                                          : do_put_parts(c, &kv, &p, st));
        res = rc < 0 ? raise_kvs(rc, what, NULL) : int_list(st, kv.n);
    }
    PyMem_RawFree(st);
    parts_free(&p);
    keyvec_free(&kv);
    return res;
}

PyObject *Client_put_parts(ClientObject *self, PyObject *args, PyObject *kwds) {
    return client_parts_common(self, args, kwds, 0);
}

PyObject *Client_get_parts(ClientObject *self, PyObject *args, PyObject *kwds) {
    return client_parts_common(self, args, kwds, 1);
}
