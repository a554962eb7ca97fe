/* kvshelf._kvshelf — CPython extension over libkvshelf (client.h, connector.h).
 *
 * Written against the plain CPython C API (no pybind/cython). Everything that
 * may block (network round trips, copies, waits) runs with the GIL released.
 *
 * Memory arguments accept, in this order of detection:
 *   - objects with data_ptr() / nbytes / is_contiguous() (torch tensors; torch
 *     is never imported here): the tensor must be contiguous;
 *   - objects with the buffer protocol (numpy arrays, bytes, bytearray,
 *     memoryview): C-contiguous, writable where the call writes;
 *   - plain integers: raw addresses (the size comes from another argument).
 * Keys and block hashes: bytes-like or str (UTF-8), 1..KVS_KEY_MAX bytes
 * (KVS_HASH_MAX for connector hashes).
 * Errors: kvshelf codes raise kvshelf.Error subclasses carrying .code
 * (negative int), .name ("KVS_ERR_...") and the C message.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kvshelf/kvshelf.h"

#define ERRBUF 512

/* ------------------------------------------------------------------------ */
/* Exceptions                                                                */
/* ------------------------------------------------------------------------ */

static PyObject *Error; /* kvshelf.Error */

struct errdef {
    int code;
    const char *pyname;
    const char *doc;
    PyObject *extra_base; /* set at init: a builtin exception to also inherit */
    PyObject *cls;
};

static struct errdef errdefs[] = {
    {KVS_ERR_INVALID, "InvalidArgument", "An argument is invalid (KVS_ERR_INVALID).", NULL, NULL},
    {KVS_ERR_NOMEM, "NoMemory", "Out of process memory (KVS_ERR_NOMEM).", NULL, NULL},
    {KVS_ERR_NOT_FOUND, "NotFound", "The key is not in the pool: a miss (KVS_ERR_NOT_FOUND).",
     NULL, NULL},
    {KVS_ERR_EXISTS, "Exists", "The key is already stored or being written (KVS_ERR_EXISTS).",
     NULL, NULL},
    {KVS_ERR_NO_SPACE, "NoSpace", "The pool is full (KVS_ERR_NO_SPACE).", NULL, NULL},
    {KVS_ERR_TOO_LARGE, "TooLarge", "Value larger than the limit or the buffer (KVS_ERR_TOO_LARGE).",
     NULL, NULL},
    {KVS_ERR_TIMEOUT, "Timeout", "The operation did not finish in time (KVS_ERR_TIMEOUT).", NULL,
     NULL},
    {KVS_ERR_CONN, "ConnectionFailed", "Cannot reach the master or a peer (KVS_ERR_CONN).", NULL,
     NULL},
    {KVS_ERR_PROTO, "ProtocolError", "Malformed or unexpected frame (KVS_ERR_PROTO).", NULL, NULL},
    {KVS_ERR_AUTH, "AuthError", "Wrong or missing shared secret (KVS_ERR_AUTH).", NULL, NULL},
    {KVS_ERR_CONFIG, "ConfigError", "Invalid configuration (KVS_ERR_CONFIG).", NULL, NULL},
    {KVS_ERR_NOT_REGISTERED, "NotRegistered",
     "Buffer is not inside registered memory (KVS_ERR_NOT_REGISTERED).", NULL, NULL},
    {KVS_ERR_IO, "IOFailure", "A system call failed (KVS_ERR_IO).", NULL, NULL},
    {KVS_ERR_CLOSED, "Closed", "The client/connector is closing or closed (KVS_ERR_CLOSED).", NULL,
     NULL},
    {KVS_ERR_BUSY, "Busy", "A queue is full; try again later (KVS_ERR_BUSY).", NULL, NULL},
    {KVS_ERR_CORRUPT, "Corrupt", "A stored object failed its header/length check (KVS_ERR_CORRUPT).",
     NULL, NULL},
    {KVS_ERR_UNAVAILABLE, "Unavailable",
     "The segment holding the object is gone or unreachable (KVS_ERR_UNAVAILABLE).", NULL, NULL},
    {KVS_ERR_UNSUPPORTED, "Unsupported", "Not supported by this build (KVS_ERR_UNSUPPORTED).", NULL,
     NULL},
    {KVS_ERR_INTERNAL, "InternalError", "An internal invariant failed (KVS_ERR_INTERNAL).", NULL,
     NULL},
    {KVS_ERR_CUDA, "CudaError", "A CUDA call failed (KVS_ERR_CUDA).", NULL, NULL},
    {KVS_ERR_LAYOUT, "LayoutError", "No KV layout registered, or block id out of range "
                                    "(KVS_ERR_LAYOUT).", NULL, NULL},
};
#define N_ERRDEFS (sizeof(errdefs) / sizeof(errdefs[0]))

static PyObject *error_class(int code) {
    for (size_t i = 0; i < N_ERRDEFS; i++)
        if (errdefs[i].code == code && errdefs[i].cls)
            return errdefs[i].cls;
    return Error;
}

/* Raises the exception for `code` with "what: NAME: strerror[: detail]". */
static PyObject *raise_kvs(int code, const char *what, const char *detail) {
    PyObject *cls = error_class(code);
    PyObject *msg;
    if (detail && detail[0])
        msg = PyUnicode_FromFormat("%s: %s: %s (%s)", what, kvs_errname(code), detail,
                                   kvs_strerror(code));
    else
        msg = PyUnicode_FromFormat("%s: %s: %s", what, kvs_errname(code), kvs_strerror(code));
    if (!msg)
        return NULL;
    PyObject *exc = PyObject_CallOneArg(cls, msg);
    Py_DECREF(msg);
    if (!exc)
        return NULL;
    PyObject *c = PyLong_FromLong(code);
    PyObject *n = PyUnicode_FromString(kvs_errname(code));
    if (c && n) {
        PyObject_SetAttrString(exc, "code", c);
        PyObject_SetAttrString(exc, "name", n);
    }
    Py_XDECREF(c);
    Py_XDECREF(n);
    PyErr_SetObject(cls, exc);
    Py_DECREF(exc);
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* Argument helpers                                                          */
/* ------------------------------------------------------------------------ */

/* A list of keys copied into one arena (stable while the GIL is released). */
typedef struct keyvec {
    kvs_key *keys;
    char *arena;
    size_t n;
} keyvec;

static void keyvec_free(keyvec *kv) {
    PyMem_RawFree(kv->keys);
    PyMem_RawFree(kv->arena);
    kv->keys = NULL;
    kv->arena = NULL;
    kv->n = 0;
}

/* Borrow the bytes of one key object. Returns 0 or -1 with an exception. */
static int key_bytes(PyObject *o, const char **p, Py_ssize_t *len, Py_buffer *view, int *has_view) {
    *has_view = 0;
    if (PyBytes_Check(o)) {
        *p = PyBytes_AS_STRING(o);
        *len = PyBytes_GET_SIZE(o);
        return 0;
    }
    if (PyUnicode_Check(o)) {
        *p = PyUnicode_AsUTF8AndSize(o, len);
        return *p ? 0 : -1;
    }
    if (PyObject_CheckBuffer(o)) {
        if (PyObject_GetBuffer(o, view, PyBUF_CONTIG_RO) < 0)
            return -1;
        *has_view = 1;
        *p = view->buf;
        *len = view->len;
        return 0;
    }
    PyErr_Format(PyExc_TypeError, "a key must be bytes, str or a bytes-like object, not %.100s",
                 Py_TYPE(o)->tp_name);
    return -1;
}

/* Converts a sequence of keys (or one 2-D uint8 buffer of n rows) into kv. */
static int keyvec_from(PyObject *seq, size_t maxlen, const char *what, keyvec *kv) {
    memset(kv, 0, sizeof(*kv));
    PyObject *fast = PySequence_Fast(seq, "keys must be a sequence of bytes or str");
    if (!fast)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject **items = PySequence_Fast_ITEMS(fast);
    size_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *p;
        Py_ssize_t len;
        Py_buffer v;
        int hv;
        if (key_bytes(items[i], &p, &len, &v, &hv) < 0)
            goto fail;
        if (hv)
            PyBuffer_Release(&v);
        if (len < 1 || (size_t)len > maxlen) {
            PyErr_Format(PyExc_ValueError, "%s[%zd]: a key must be 1..%zu bytes, got %zd", what, i,
                         maxlen, len);
            goto fail;
        }
        total += (size_t)len;
    }
    kv->n = (size_t)n;
    kv->keys = PyMem_RawMalloc(sizeof(kvs_key) * (n ? (size_t)n : 1));
    kv->arena = PyMem_RawMalloc(total ? total : 1);
    if (!kv->keys || !kv->arena) {
        PyErr_NoMemory();
        goto fail;
    }
    size_t off = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *p;
        Py_ssize_t len;
        Py_buffer v;
        int hv;
        if (key_bytes(items[i], &p, &len, &v, &hv) < 0)
            goto fail;
        if ((size_t)len > total - off || len < 1) { /* changed under us */
            if (hv)
                PyBuffer_Release(&v);
            PyErr_SetString(PyExc_RuntimeError, "keys changed while being read");
            goto fail;
        }
        memcpy(kv->arena + off, p, (size_t)len);
        if (hv)
            PyBuffer_Release(&v);
        kv->keys[i].data = kv->arena + off;
        kv->keys[i].len = (uint32_t)len;
        off += (size_t)len;
    }
    Py_DECREF(fast);
    return 0;
fail:
    Py_DECREF(fast);
    keyvec_free(kv);
    return -1;
}

/* Reads one integer (any buffer item format) from a buffer element. */
static int buffer_int_at(const Py_buffer *v, const char *p, uint64_t *out, int *neg) {
    const char *f = v->format ? v->format : "B";
    if (*f == '@' || *f == '=' || *f == '<' || *f == '!' || *f == '>')
        f++;
    *neg = 0;
    switch (*f) {
    case 'b': { int8_t x; memcpy(&x, p, 1); *neg = x < 0; *out = (uint64_t)(int64_t)x; return 0; }
    case 'B': { uint8_t x; memcpy(&x, p, 1); *out = x; return 0; }
    case 'h': { int16_t x; memcpy(&x, p, 2); *neg = x < 0; *out = (uint64_t)(int64_t)x; return 0; }
    case 'H': { uint16_t x; memcpy(&x, p, 2); *out = x; return 0; }
    case 'i': { int32_t x; memcpy(&x, p, 4); *neg = x < 0; *out = (uint64_t)(int64_t)x; return 0; }
    case 'I': { uint32_t x; memcpy(&x, p, 4); *out = x; return 0; }
    case 'l': case 'q': case 'n': {
        if (v->itemsize == 8) { int64_t x; memcpy(&x, p, 8); *neg = x < 0; *out = (uint64_t)x; return 0; }
        if (v->itemsize == 4) { int32_t x; memcpy(&x, p, 4); *neg = x < 0; *out = (uint64_t)(int64_t)x; return 0; }
        break;
    }
    case 'L': case 'Q': case 'N': case 'P': {
        if (v->itemsize == 8) { uint64_t x; memcpy(&x, p, 8); *out = x; return 0; }
        if (v->itemsize == 4) { uint32_t x; memcpy(&x, p, 4); *out = x; return 0; }
        break;
    }
    default:
        break;
    }
    PyErr_Format(PyExc_TypeError, "an integer array is required, got buffer format '%s'",
                 v->format ? v->format : "B");
    return -1;
}

/* Converts a 1-D or 2-D array of non-negative integers (nested sequences, or
 * a buffer such as a numpy array) into a row-major uint64 array.
 * rows and cols describe the shape (cols = 1 for 1-D input and is_2d = 0). */
static int u64_array_from(PyObject *obj, const char *what, uint64_t **out, size_t *rows, size_t *cols,
                          int *is_2d) {
    *out = NULL;
    *rows = *cols = 0;
    *is_2d = 0;
    if (PyObject_CheckBuffer(obj) && !PyBytes_Check(obj) && !PyByteArray_Check(obj)) {
        Py_buffer v;
        if (PyObject_GetBuffer(obj, &v, PyBUF_RECORDS_RO) < 0)
            return -1;
        if (v.ndim < 1 || v.ndim > 2) {
            PyErr_Format(PyExc_ValueError, "%s: expected a 1-D or 2-D integer array, got %d-D", what,
                         v.ndim);
            PyBuffer_Release(&v);
            return -1;
        }
        size_t r = (size_t)v.shape[0], c = v.ndim == 2 ? (size_t)v.shape[1] : 1;
        uint64_t *a = PyMem_RawMalloc(sizeof(uint64_t) * ((r * c) > 0 ? r * c : 1));
        if (!a) {
            PyBuffer_Release(&v);
            PyErr_NoMemory();
            return -1;
        }
        for (size_t i = 0; i < r; i++)
            for (size_t j = 0; j < c; j++) {
                const char *p = (const char *)v.buf + (Py_ssize_t)i * v.strides[0] +
                                (v.ndim == 2 ? (Py_ssize_t)j * v.strides[1] : 0);
                int neg;
                if (buffer_int_at(&v, p, &a[i * c + j], &neg) < 0 || (neg && (PyErr_Format(
                        PyExc_ValueError, "%s: negative value at [%zu]", what, i), 1))) {
                    PyMem_RawFree(a);
                    PyBuffer_Release(&v);
                    return -1;
                }
            }
        *is_2d = v.ndim == 2;
        PyBuffer_Release(&v);
        *out = a;
        *rows = r;
        *cols = c;
        return 0;
    }
    PyObject *fast = PySequence_Fast(obj, "expected a sequence of integers");
    if (!fast)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject **items = PySequence_Fast_ITEMS(fast);
    size_t c = 1;
    int two = 0;
    if (n > 0 && !PyLong_Check(items[0]) && PySequence_Check(items[0])) {
        two = 1;
        Py_ssize_t l = PySequence_Size(items[0]);
        if (l < 0) {
            Py_DECREF(fast);
            return -1;
        }
        c = (size_t)l;
    }
    uint64_t *a = PyMem_RawMalloc(sizeof(uint64_t) * (((size_t)n * c) > 0 ? (size_t)n * c : 1));
    if (!a) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!two) {
            uint64_t x = PyLong_AsUnsignedLongLong(items[i]);
            if (x == (uint64_t)-1 && PyErr_Occurred()) {
                PyErr_Format(PyExc_ValueError, "%s[%zd]: expected a non-negative integer", what, i);
                goto fail;
            }
            a[i] = x;
            continue;
        }
        PyObject *row = PySequence_Fast(items[i], "expected a sequence of integers");
        if (!row)
            goto fail;
        if ((size_t)PySequence_Fast_GET_SIZE(row) != c) {
            Py_DECREF(row);
            PyErr_Format(PyExc_ValueError, "%s: row %zd has %zd entries, row 0 has %zu", what, i,
                         PySequence_Fast_GET_SIZE(row), c);
            goto fail;
        }
        for (size_t j = 0; j < c; j++) {
            uint64_t x = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(row, j));
            if (x == (uint64_t)-1 && PyErr_Occurred()) {
                Py_DECREF(row);
                PyErr_Format(PyExc_ValueError, "%s[%zd][%zu]: expected a non-negative integer", what,
                             i, j);
                goto fail;
            }
            a[(size_t)i * c + j] = x;
        }
        Py_DECREF(row);
    }
    Py_DECREF(fast);
    *out = a;
    *rows = (size_t)n;
    *cols = c;
    *is_2d = two;
    return 0;
fail:
    PyMem_RawFree(a);
    Py_DECREF(fast);
    return -1;
}

/* One piece of caller memory. */
typedef struct membuf {
    void *ptr;
    uint64_t len;
    int is_device;
    int has_view;
    Py_buffer view;
} membuf;

static void membuf_release(membuf *m) {
    if (m->has_view)
        PyBuffer_Release(&m->view);
    m->has_view = 0;
}

static int attr_true(PyObject *o, const char *name) {
    PyObject *a = PyObject_GetAttrString(o, name);
    if (!a) {
        PyErr_Clear();
        return 0;
    }
    int r = PyObject_IsTrue(a);
    Py_DECREF(a);
    if (r < 0) {
        PyErr_Clear();
        return 0;
    }
    return r;
}

static int is_tensor_like(PyObject *o) {
    return PyObject_HasAttrString(o, "data_ptr") && PyObject_HasAttrString(o, "nbytes") &&
           !PyLong_Check(o);
}

/* Fills m from a tensor-like / buffer / integer address. `size` (may be NULL
 * or None) is required for integer addresses and, for the others, must not
 * exceed their length (then it limits the length). */
static int membuf_get(PyObject *o, PyObject *size, int writable, const char *what, membuf *m) {
    memset(m, 0, sizeof(*m));
    uint64_t want = 0;
    int have_size = size && size != Py_None;
    if (have_size) {
        want = PyLong_AsUnsignedLongLong(size);
        if (want == (uint64_t)-1 && PyErr_Occurred())
            return -1;
    }
    if (is_tensor_like(o)) {
        PyObject *r = PyObject_CallMethod(o, "is_contiguous", NULL);
        if (!r)
            return -1;
        int contig = PyObject_IsTrue(r);
        Py_DECREF(r);
        if (contig < 0)
            return -1;
        if (!contig) {
            PyErr_Format(PyExc_ValueError, "%s: tensor is not contiguous (call .contiguous() or "
                                           "pass a contiguous view)", what);
            return -1;
        }
        PyObject *p = PyObject_CallMethod(o, "data_ptr", NULL);
        if (!p)
            return -1;
        uint64_t addr = PyLong_AsUnsignedLongLong(p);
        Py_DECREF(p);
        if (addr == (uint64_t)-1 && PyErr_Occurred())
            return -1;
        PyObject *nb = PyObject_GetAttrString(o, "nbytes");
        if (!nb)
            return -1;
        uint64_t len = PyLong_AsUnsignedLongLong(nb);
        Py_DECREF(nb);
        if (len == (uint64_t)-1 && PyErr_Occurred())
            return -1;
        m->ptr = (void *)(uintptr_t)addr;
        m->len = len;
        m->is_device = attr_true(o, "is_cuda");
    } else if (PyObject_CheckBuffer(o)) {
        if (PyObject_GetBuffer(o, &m->view, writable ? PyBUF_CONTIG : PyBUF_CONTIG_RO) < 0) {
            if (writable && PyErr_ExceptionMatches(PyExc_BufferError)) {
                PyErr_Clear();
                PyErr_Format(PyExc_TypeError, "%s: a writable C-contiguous buffer is required "
                                              "(got %.100s)", what, Py_TYPE(o)->tp_name);
            }
            return -1;
        }
        m->has_view = 1;
        m->ptr = m->view.buf;
        m->len = (uint64_t)m->view.len;
    } else if (PyLong_Check(o)) {
        uint64_t addr = PyLong_AsUnsignedLongLong(o);
        if (addr == (uint64_t)-1 && PyErr_Occurred())
            return -1;
        if (!have_size) {
            PyErr_Format(PyExc_TypeError, "%s: an integer address needs a size", what);
            return -1;
        }
        if (addr == 0) {
            PyErr_Format(PyExc_ValueError, "%s: address 0", what);
            return -1;
        }
        m->ptr = (void *)(uintptr_t)addr;
        m->len = want;
        return 0;
    } else {
        PyErr_Format(PyExc_TypeError, "%s: expected a tensor, a buffer (numpy array, bytes, "
                                      "bytearray, memoryview) or an integer address, not %.100s",
                     what, Py_TYPE(o)->tp_name);
        return -1;
    }
    if (have_size) {
        if (want > m->len) {
            PyErr_Format(PyExc_ValueError, "%s: size %llu exceeds the buffer's %llu bytes", what,
                         (unsigned long long)want, (unsigned long long)m->len);
            membuf_release(m);
            return -1;
        }
        m->len = want;
    }
    return 0;
}

static int reject_device(const membuf *m, const char *what) {
    if (m->is_device) {
        raise_kvs(KVS_ERR_UNSUPPORTED, what,
                  "device (CUDA) memory is moved by kvshelf.Connector, not by the client");
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Configuration                                                             */
/* ------------------------------------------------------------------------ */

static PyObject *json_dumps(PyObject *obj) {
    PyObject *json = PyImport_ImportModule("json");
    if (!json)
        return NULL;
    PyObject *s = PyObject_CallMethod(json, "dumps", "O", obj);
    Py_DECREF(json);
    return s;
}

/* config: None, dict, JSON text (str starting with '{'), or a path (str /
 * os.PathLike). kwargs: more keys (dict or NULL), applied last. use_env:
 * overlay KVSHELF_* variables (and KVSHELF_CONFIG / MOONCAKE_CONFIG_PATH)
 * first. Validates. */
static int build_config(PyObject *config, PyObject *kwargs, int use_env, kvs_config *cfg) {
    char err[ERRBUF] = "";
    int rc;
    kvs_config_init(cfg);
    if (use_env) {
        Py_BEGIN_ALLOW_THREADS
        rc = kvs_config_load_env(cfg, err, sizeof err);
        Py_END_ALLOW_THREADS
        if (rc < 0) {
            raise_kvs(rc, "configuration from the environment", err);
            return -1;
        }
    }
    if (config && config != Py_None) {
        if (PyDict_Check(config)) {
            PyObject *s = json_dumps(config);
            if (!s)
                return -1;
            const char *txt = PyUnicode_AsUTF8(s);
            rc = txt ? kvs_config_load_json(cfg, txt, err, sizeof err) : -1;
            Py_DECREF(s);
            if (!txt)
                return -1;
            if (rc < 0) {
                raise_kvs(rc, "configuration", err);
                return -1;
            }
        } else {
            PyObject *path = NULL;
            const char *txt = NULL;
            if (PyUnicode_Check(config)) {
                txt = PyUnicode_AsUTF8(config);
                if (!txt)
                    return -1;
                const char *q = txt;
                while (*q == ' ' || *q == '\t' || *q == '\n' || *q == '\r')
                    q++;
                if (*q == '{') {
                    rc = kvs_config_load_json(cfg, txt, err, sizeof err);
                    if (rc < 0) {
                        raise_kvs(rc, "configuration", err);
                        return -1;
                    }
                    txt = NULL;
                    goto kw;
                }
            }
            if (!PyUnicode_FSConverter(config, &path))
                return -1;
            const char *p = PyBytes_AS_STRING(path);
            Py_BEGIN_ALLOW_THREADS
            rc = kvs_config_load_file(cfg, p, err, sizeof err);
            Py_END_ALLOW_THREADS
            if (rc < 0) {
                raise_kvs(rc, p, err);
                Py_DECREF(path);
                return -1;
            }
            Py_DECREF(path);
        }
    }
kw:
    if (kwargs && PyDict_Check(kwargs) && PyDict_Size(kwargs) > 0) {
        PyObject *s = json_dumps(kwargs);
        if (!s)
            return -1;
        const char *txt = PyUnicode_AsUTF8(s);
        rc = txt ? kvs_config_load_json(cfg, txt, err, sizeof err) : -1;
        Py_DECREF(s);
        if (!txt)
            return -1;
        if (rc < 0) {
            raise_kvs(rc, "configuration", err);
            return -1;
        }
    }
    rc = kvs_config_validate(cfg, err, sizeof err);
    if (rc < 0) {
        raise_kvs(rc, "configuration", err);
        return -1;
    }
    return 0;
}

static PyObject *config_to_dict(const kvs_config *c) {
    return Py_BuildValue("{s:s,s:s,s:s,s:s,s:s,s:K,s:K,s:i,s:s,s:O}", "local_hostname",
                         c->local_hostname, "metadata_server", c->metadata_server,
                         "master_server_address", c->master_server_address, "protocol",
                         c->protocol, "device_name", c->device_name, "global_segment_size",
                         (unsigned long long)c->global_segment_size, "local_buffer_size",
                         (unsigned long long)c->local_buffer_size, "timeout_ms", c->timeout_ms,
                         "runtime_dir", c->runtime_dir, "secret_set",
                         c->secret[0] ? Py_True : Py_False);
}

/* Splits the Python-level keyword arguments of a constructor: names in
 * `own` are removed from kw into the returned dict `mine`; the rest stay (and
 * are configuration keys). */
static PyObject *split_kwargs(PyObject *kw, const char *const *own) {
    PyObject *mine = PyDict_New();
    if (!mine || !kw)
        return mine;
    for (const char *const *o = own; *o; o++) {
        PyObject *v = PyDict_GetItemString(kw, *o);
        if (v) {
            if (PyDict_SetItemString(mine, *o, v) < 0 || PyDict_DelItemString(kw, *o) < 0) {
                Py_DECREF(mine);
                return NULL;
            }
        }
    }
    return mine;
}

/* ------------------------------------------------------------------------ */
/* "busy" guard: close() waits for calls running without the GIL            */
/* ------------------------------------------------------------------------ */

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void wait_not_busy(volatile int *busy) {
    while (*busy > 0) {
        Py_BEGIN_ALLOW_THREADS
        sleep_ms(1);
        Py_END_ALLOW_THREADS
    }
}

/* ------------------------------------------------------------------------ */
/* Client                                                                    */
/* ------------------------------------------------------------------------ */

typedef struct ClientObject {
    PyObject_HEAD
    kvs_client *c;
    volatile int busy;
    kvs_config cfg;
} ClientObject;

static PyTypeObject ClientType;

#define CLIENT_ENTER(self, what)                                                                   \
    do {                                                                                           \
        if (!(self)->c)                                                                            \
            return raise_kvs(KVS_ERR_CLOSED, what, "the client is closed");                      \
        (self)->busy++;                                                                            \
    } while (0)
#define CLIENT_LEAVE(self) ((self)->busy--)

static int Client_init(ClientObject *self, PyObject *args, PyObject *kwds) {
    PyObject *config = Py_None;
    if (!PyArg_ParseTuple(args, "|O:Client", &config))
        return -1;
    static const char *const own[] = {"use_env", NULL};
    PyObject *kw = kwds ? PyDict_Copy(kwds) : PyDict_New();
    if (!kw)
        return -1;
    PyObject *mine = split_kwargs(kw, own);
    if (!mine) {
        Py_DECREF(kw);
        return -1;
    }
    PyObject *ue = PyDict_GetItemString(mine, "use_env");
    int use_env = ue ? PyObject_IsTrue(ue) : 1;
    Py_DECREF(mine);
    if (use_env < 0 || self->c) {
        if (self->c)
            PyErr_SetString(PyExc_RuntimeError, "Client already open");
        Py_DECREF(kw);
        return -1;
    }
    kvs_config cfg;
    int r = build_config(config, kw, use_env, &cfg);
    Py_DECREF(kw);
    if (r < 0)
        return -1;
    char err[ERRBUF] = "";
    kvs_client *c = NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = kvs_client_open(&cfg, &c, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        raise_kvs(rc, "kvs_client_open", err);
        return -1;
    }
    self->c = c;
    self->cfg = cfg;
    return 0;
}

static void client_close_impl(ClientObject *self) {
    if (!self->c)
        return;
    kvs_client *c = self->c;
    self->c = NULL; /* new calls fail with Closed */
    wait_not_busy(&self->busy);
    Py_BEGIN_ALLOW_THREADS
    kvs_client_close(c);
    Py_END_ALLOW_THREADS
}

static void Client_dealloc(ClientObject *self) {
    client_close_impl(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Client_close(ClientObject *self, PyObject *Py_UNUSED(a)) {
    client_close_impl(self);
    Py_RETURN_NONE;
}

static PyObject *Client_enter(ClientObject *self, PyObject *Py_UNUSED(a)) {
    Py_INCREF(self);
    return (PyObject *)self;
}

static PyObject *Client_exit(ClientObject *self, PyObject *Py_UNUSED(a)) {
    client_close_impl(self);
    Py_RETURN_FALSE;
}

static PyObject *Client_closed(ClientObject *self, void *Py_UNUSED(c)) {
    return PyBool_FromLong(self->c == NULL);
}

static PyObject *Client_config(ClientObject *self, void *Py_UNUSED(c)) {
    return config_to_dict(&self->cfg);
}

/* One key argument as (ptr, len) with its view. */
typedef struct onekey {
    const char *p;
    Py_ssize_t len;
    Py_buffer view;
    int has_view;
} onekey;

static int onekey_get(PyObject *o, size_t maxlen, onekey *k) {
    if (key_bytes(o, &k->p, &k->len, &k->view, &k->has_view) < 0)
        return -1;
    if (k->len < 1 || (size_t)k->len > maxlen) {
        if (k->has_view)
            PyBuffer_Release(&k->view);
        k->has_view = 0;
        PyErr_Format(PyExc_ValueError, "a key must be 1..%zu bytes, got %zd", maxlen, k->len);
        return -1;
    }
    return 0;
}

static void onekey_release(onekey *k) {
    if (k->has_view)
        PyBuffer_Release(&k->view);
    k->has_view = 0;
}

static PyObject *client_put_common(ClientObject *self, PyObject *args, PyObject *kwds, int from) {
    static char *kwlist[] = {"key", "value", "size", NULL};
    PyObject *key, *value, *size = Py_None;
    const char *what = from ? "put_from" : "put";
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|O", kwlist, &key, &value, &size))
        return NULL;
    onekey k;
    if (onekey_get(key, KVS_KEY_MAX, &k) < 0)
        return NULL;
    membuf m;
    if (membuf_get(value, size, 0, what, &m) < 0) {
        onekey_release(&k);
        return NULL;
    }
    if (reject_device(&m, what) < 0) {
        membuf_release(&m);
        onekey_release(&k);
        return NULL;
    }
    if (!self->c) {
        membuf_release(&m);
        onekey_release(&k);
        return raise_kvs(KVS_ERR_CLOSED, what, "the client is closed");
    }
    self->busy++;
    int rc;
    kvs_client *c = self->c;
    Py_BEGIN_ALLOW_THREADS
    rc = from ? kvs_put_from(c, k.p, (uint32_t)k.len, m.ptr, m.len)
              : kvs_put(c, k.p, (uint32_t)k.len, m.ptr, m.len);
    Py_END_ALLOW_THREADS
    self->busy--;
    membuf_release(&m);
    onekey_release(&k);
    if (rc < 0)
        return raise_kvs(rc, what, NULL);
    Py_RETURN_NONE;
}

static PyObject *Client_put(ClientObject *self, PyObject *args, PyObject *kwds) {
    return client_put_common(self, args, kwds, 0);
}

static PyObject *Client_put_from(ClientObject *self, PyObject *args, PyObject *kwds) {
    return client_put_common(self, args, kwds, 1);
}

/* get(key) -> bytes; get(key, buf[, size]) -> int (bytes stored). */
static PyObject *client_get_common(ClientObject *self, PyObject *args, PyObject *kwds, int into) {
    static char *kwlist[] = {"key", "buf", "size", NULL};
    PyObject *key, *buf = Py_None, *size = Py_None;
    const char *what = into ? "get_into" : "get";
    if (!PyArg_ParseTupleAndKeywords(args, kwds, into ? "OO|O" : "O|OO", kwlist, &key, &buf, &size))
        return NULL;
    onekey k;
    if (onekey_get(key, KVS_KEY_MAX, &k) < 0)
        return NULL;
    if (!self->c) {
        onekey_release(&k);
        return raise_kvs(KVS_ERR_CLOSED, what, "the client is closed");
    }
    kvs_client *c = self->c;
    int rc;
    uint64_t got = 0;
    if (buf == Py_None) {
        /* Unknown size: try a modest buffer, then the exact size. */
        uint64_t cap = 65536;
        PyObject *out = NULL;
        for (int attempt = 0; attempt < 4; attempt++) {
            out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)cap);
            if (!out) {
                onekey_release(&k);
                return NULL;
            }
            char *p = PyBytes_AS_STRING(out);
            self->busy++;
            Py_BEGIN_ALLOW_THREADS
            rc = kvs_get(c, k.p, (uint32_t)k.len, p, cap, &got);
            Py_END_ALLOW_THREADS
            self->busy--;
            if (rc == KVS_ERR_TOO_LARGE && got > cap) {
                Py_DECREF(out);
                out = NULL;
                cap = got;
                continue;
            }
            break;
        }
        onekey_release(&k);
        if (!out)
            return raise_kvs(KVS_ERR_TOO_LARGE, what, "value kept growing");
        if (rc < 0) {
            Py_DECREF(out);
            return raise_kvs(rc, what, NULL);
        }
        if (_PyBytes_Resize(&out, (Py_ssize_t)got) < 0)
            return NULL;
        return out;
    }
    membuf m;
    if (membuf_get(buf, size, 1, what, &m) < 0) {
        onekey_release(&k);
        return NULL;
    }
    if (reject_device(&m, what) < 0) {
        membuf_release(&m);
        onekey_release(&k);
        return NULL;
    }
    self->busy++;
    Py_BEGIN_ALLOW_THREADS
    rc = into ? kvs_get_into(c, k.p, (uint32_t)k.len, m.ptr, m.len, &got)
              : kvs_get(c, k.p, (uint32_t)k.len, m.ptr, m.len, &got);
    Py_END_ALLOW_THREADS
    self->busy--;
    membuf_release(&m);
    onekey_release(&k);
    if (rc < 0) {
        if (rc == KVS_ERR_TOO_LARGE) {
            char d[128];
            snprintf(d, sizeof d, "value is %llu bytes, buffer %llu", (unsigned long long)got,
                     (unsigned long long)m.len);
            return raise_kvs(rc, what, d);
        }
        return raise_kvs(rc, what, NULL);
    }
    return PyLong_FromUnsignedLongLong(got);
}

static PyObject *Client_get(ClientObject *self, PyObject *args, PyObject *kwds) {
    return client_get_common(self, args, kwds, 0);
}

static PyObject *Client_get_into(ClientObject *self, PyObject *args, PyObject *kwds) {
    return client_get_common(self, args, kwds, 1);
}

static PyObject *Client_exists(ClientObject *self, PyObject *key) {
    onekey k;
    if (onekey_get(key, KVS_KEY_MAX, &k) < 0)
        return NULL;
    if (!self->c) {
        onekey_release(&k);
        return raise_kvs(KVS_ERR_CLOSED, "exists", "the client is closed");
    }
    kvs_client *c = self->c;
    int rc;
    self->busy++;
    Py_BEGIN_ALLOW_THREADS
    rc = kvs_exists(c, k.p, (uint32_t)k.len);
    Py_END_ALLOW_THREADS
    self->busy--;
    onekey_release(&k);
    if (rc < 0)
        return raise_kvs(rc, "exists", NULL);
    return PyBool_FromLong(rc > 0);
}

static PyObject *Client_remove(ClientObject *self, PyObject *key) {
    onekey k;
    if (onekey_get(key, KVS_KEY_MAX, &k) < 0)
        return NULL;
    if (!self->c) {
        onekey_release(&k);
        return raise_kvs(KVS_ERR_CLOSED, "remove", "the client is closed");
    }
    kvs_client *c = self->c;
    int rc;
    self->busy++;
    Py_BEGIN_ALLOW_THREADS
    rc = kvs_remove(c, k.p, (uint32_t)k.len);
    Py_END_ALLOW_THREADS
    self->busy--;
    onekey_release(&k);
    if (rc < 0)
        return raise_kvs(rc, "remove", NULL);
    Py_RETURN_NONE;
}

static PyObject *bool_list(const uint8_t *v, size_t n) {
    PyObject *l = PyList_New((Py_ssize_t)n);
    if (!l)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        PyObject *b = v[i] ? Py_True : Py_False;
        Py_INCREF(b);
        PyList_SET_ITEM(l, (Py_ssize_t)i, b);
    }
    return l;
}

static PyObject *int_list(const int *v, size_t n) {
    PyObject *l = PyList_New((Py_ssize_t)n);
    if (!l)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        PyObject *x = PyLong_FromLong(v[i]);
        if (!x) {
            Py_DECREF(l);
            return NULL;
        }
        PyList_SET_ITEM(l, (Py_ssize_t)i, x);
    }
    return l;
}

static PyObject *Client_exists_batch(ClientObject *self, PyObject *keys) {
    keyvec kv;
    if (keyvec_from(keys, KVS_KEY_MAX, "keys", &kv) < 0)
        return NULL;
    uint8_t *out = PyMem_RawCalloc(kv.n ? kv.n : 1, 1);
    if (!out) {
        keyvec_free(&kv);
        return PyErr_NoMemory();
    }
    if (!self->c) {
        keyvec_free(&kv);
        PyMem_RawFree(out);
        return raise_kvs(KVS_ERR_CLOSED, "exists_batch", "the client is closed");
    }
    kvs_client *c = self->c;
    int rc = 0;
    self->busy++;
    if (kv.n) {
        Py_BEGIN_ALLOW_THREADS
        rc = kvs_exists_batch(c, kv.keys, kv.n, out);
        Py_END_ALLOW_THREADS
    }
    self->busy--;
    PyObject *res = rc < 0 ? raise_kvs(rc, "exists_batch", NULL) : bool_list(out, kv.n);
    keyvec_free(&kv);
    PyMem_RawFree(out);
    return res;
}

static PyObject *Client_remove_batch(ClientObject *self, PyObject *keys) {
    keyvec kv;
    if (keyvec_from(keys, KVS_KEY_MAX, "keys", &kv) < 0)
        return NULL;
    int *out = PyMem_RawCalloc(kv.n ? kv.n : 1, sizeof(int));
    if (!out) {
        keyvec_free(&kv);
        return PyErr_NoMemory();
    }
    if (!self->c) {
        keyvec_free(&kv);
        PyMem_RawFree(out);
        return raise_kvs(KVS_ERR_CLOSED, "remove_batch", "the client is closed");
    }
    kvs_client *c = self->c;
    int rc = 0;
    self->busy++;
    if (kv.n) {
        Py_BEGIN_ALLOW_THREADS
        rc = kvs_remove_batch(c, kv.keys, kv.n, out);
        Py_END_ALLOW_THREADS
    }
    self->busy--;
    PyObject *res = rc < 0 ? raise_kvs(rc, "remove_batch", NULL) : int_list(out, kv.n);
    keyvec_free(&kv);
    PyMem_RawFree(out);
    return res;
}

/* put_batch(keys, values) / get_batch(keys, bufs): values/bufs are memory
 * objects (or (address, size) pairs). Returns a list: put -> status per item
 * (0 or negative code); get -> stored size (>= 0) or negative code. */
static PyObject *client_batch_common(ClientObject *self, PyObject *args, int is_get) {
    PyObject *keys, *vals;
    const char *what = is_get ? "get_batch" : "put_batch";
    if (!PyArg_ParseTuple(args, "OO", &keys, &vals))
        return NULL;
    keyvec kv;
    if (keyvec_from(keys, KVS_KEY_MAX, "keys", &kv) < 0)
        return NULL;
    PyObject *fast = PySequence_Fast(vals, "values must be a sequence");
    if (!fast) {
        keyvec_free(&kv);
        return NULL;
    }
    size_t n = kv.n;
    if ((size_t)PySequence_Fast_GET_SIZE(fast) != n) {
        Py_DECREF(fast);
        keyvec_free(&kv);
        PyErr_Format(PyExc_ValueError, "%s: %zu keys but %zd buffers", what, n,
                     PySequence_Fast_GET_SIZE(fast));
        return NULL;
    }
    kvs_item *items = PyMem_RawCalloc(n ? n : 1, sizeof(kvs_item));
    membuf *mb = PyMem_RawCalloc(n ? n : 1, sizeof(membuf));
    PyObject *res = NULL;
    size_t got = 0;
    if (!items || !mb) {
        PyErr_NoMemory();
        goto out;
    }
    for (size_t i = 0; i < n; i++, got++) {
        PyObject *o = PySequence_Fast_GET_ITEM(fast, i);
        PyObject *sz = NULL;
        if (PyTuple_Check(o) && PyTuple_GET_SIZE(o) == 2) {
            sz = PyTuple_GET_ITEM(o, 1);
            o = PyTuple_GET_ITEM(o, 0);
        }
        if (membuf_get(o, sz, is_get, what, &mb[i]) < 0 || reject_device(&mb[i], what) < 0) {
            if (mb[i].has_view)
                membuf_release(&mb[i]);
            goto out;
        }
        items[i].key = kv.keys[i];
        items[i].buf = mb[i].ptr;
        items[i].len = mb[i].len;
    }
    if (!self->c) {
        raise_kvs(KVS_ERR_CLOSED, what, "the client is closed");
        goto out;
    }
    kvs_client *c = self->c;
    int rc = 0;
    self->busy++;
    if (n) {
        Py_BEGIN_ALLOW_THREADS
        rc = is_get ? kvs_get_batch(c, items, n) : kvs_put_batch(c, items, n);
        Py_END_ALLOW_THREADS
    }
    self->busy--;
    if (rc < 0) {
        raise_kvs(rc, what, NULL);
        goto out;
    }
    res = PyList_New((Py_ssize_t)n);
    if (!res)
        goto out;
    for (size_t i = 0; i < n; i++) {
        PyObject *x;
        if (items[i].status < 0)
            x = PyLong_FromLong(items[i].status);
        else
            x = is_get ? PyLong_FromUnsignedLongLong(items[i].size) : PyLong_FromLong(0);
        if (!x) {
            Py_CLEAR(res);
            goto out;
        }
        PyList_SET_ITEM(res, (Py_ssize_t)i, x);
    }
out:
    for (size_t i = 0; i < got; i++)
        membuf_release(&mb[i]);
    PyMem_RawFree(items);
    PyMem_RawFree(mb);
    Py_DECREF(fast);
    keyvec_free(&kv);
    return res;
}

static PyObject *Client_put_batch(ClientObject *self, PyObject *args) {
    return client_batch_common(self, args, 0);
}

static PyObject *Client_get_batch(ClientObject *self, PyObject *args) {
    return client_batch_common(self, args, 1);
}

static PyObject *Client_register_memory(ClientObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"buf", "size", NULL};
    PyObject *buf, *size = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O", kwlist, &buf, &size))
        return NULL;
    membuf m;
    if (membuf_get(buf, size, 0, "register_memory", &m) < 0)
        return NULL;
    membuf_release(&m); /* the caller keeps the memory alive while registered */
    if (!self->c)
        return raise_kvs(KVS_ERR_CLOSED, "register_memory", "the client is closed");
    kvs_client *c = self->c;
    int rc;
    self->busy++;
    Py_BEGIN_ALLOW_THREADS
    rc = kvs_register_memory(c, m.ptr, m.len);
    Py_END_ALLOW_THREADS
    self->busy--;
    if (rc < 0)
        return raise_kvs(rc, "register_memory", NULL);
    return PyLong_FromUnsignedLongLong((unsigned long long)(uintptr_t)m.ptr);
}

static PyObject *Client_unregister_memory(ClientObject *self, PyObject *buf) {
    membuf m;
    if (PyLong_Check(buf)) {
        memset(&m, 0, sizeof m);
        m.ptr = (void *)(uintptr_t)PyLong_AsUnsignedLongLong(buf);
        if (PyErr_Occurred())
            return NULL;
    } else if (membuf_get(buf, NULL, 0, "unregister_memory", &m) < 0) {
        return NULL;
    } else {
        membuf_release(&m);
    }
    if (!self->c)
        return raise_kvs(KVS_ERR_CLOSED, "unregister_memory", "the client is closed");
    kvs_client *c = self->c;
    int rc;
    self->busy++;
    Py_BEGIN_ALLOW_THREADS
    rc = kvs_unregister_memory(c, m.ptr);
    Py_END_ALLOW_THREADS
    self->busy--;
    if (rc < 0)
        return raise_kvs(rc, "unregister_memory", NULL);
    Py_RETURN_NONE;
}

/* ---- put_parts / get_parts: one object = [header] + part0 + part1 + ... --
 * keys: n keys; addrs: n x m addresses (2-D), or n memory objects when m == 1
 * is wanted with tensors/buffers; sizes: m sizes (one per column) or one int.
 * header: None, one bytes for all, or a sequence of n bytes.
 * Zero copy: bytes move between the parts and the pool objects directly
 * (reserve -> slot writes -> commit; acquire -> slot reads -> lease check ->
 * release). get_parts checks the stored size and header: a different size is
 * KVS_ERR_TOO_LARGE, a different header KVS_ERR_CORRUPT, a lease lost during
 * the copy KVS_ERR_NOT_FOUND. Returns per-key statuses. */

typedef struct parts {
    size_t n, m;
    uint64_t *addr;  /* n*m */
    uint64_t *size;  /* m */
    uint64_t total;  /* header + sum(size) */
    const char **hdr;
    uint32_t *hdr_len;
    char *hdr_arena;
    membuf *mb;      /* n when objects were given */
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

static int parts_from(size_t n, PyObject *addrs, PyObject *sizes, PyObject *header, int writable,
                      const char *what, parts *p) {
    memset(p, 0, sizeof(*p));
    p->n = n;
    /* addresses: a sequence of memory objects (one part per key), or ints */
    int objects = 0;
    if (!PyObject_CheckBuffer(addrs) || PyBytes_Check(addrs)) {
        PyObject *fast = PySequence_Fast(addrs, "addresses must be a sequence");
        if (!fast)
            return -1;
        if (PySequence_Fast_GET_SIZE(fast) > 0) {
            PyObject *o0 = PySequence_Fast_GET_ITEM(fast, 0);
            objects = !PyLong_Check(o0) && (is_tensor_like(o0) || PyObject_CheckBuffer(o0));
            if (!objects && (PyList_Check(o0) || PyTuple_Check(o0)) && PySequence_Size(o0) > 0) {
                PyObject *o00 = PySequence_GetItem(o0, 0);
                if (!o00) {
                    Py_DECREF(fast);
                    return -1;
                }
                if (!PyLong_Check(o00) && (is_tensor_like(o00) || PyObject_CheckBuffer(o00)))
                    objects = 2;
                Py_DECREF(o00);
            }
        }
        if (objects == 2) {
            /* n rows of m memory objects: part j of object i is addrs[i][j] */
            if ((size_t)PySequence_Fast_GET_SIZE(fast) != n) {
                PyErr_Format(PyExc_ValueError, "%s: %zu keys but %zd rows of buffers", what, n,
                             PySequence_Fast_GET_SIZE(fast));
                Py_DECREF(fast);
                return -1;
            }
            Py_ssize_t m0 = PySequence_Size(PySequence_Fast_GET_ITEM(fast, 0));
            p->m = (size_t)m0;
            p->mb = PyMem_RawCalloc((n * p->m) > 0 ? n * p->m : 1, sizeof(membuf));
            p->addr = PyMem_RawCalloc((n * p->m) > 0 ? n * p->m : 1, sizeof(uint64_t));
            p->size = PyMem_RawCalloc(p->m ? p->m : 1, sizeof(uint64_t));
            if (!p->mb || !p->addr || !p->size) {
                Py_DECREF(fast);
                PyErr_NoMemory();
                return -1;
            }
            for (size_t i = 0; i < n; i++) {
                PyObject *row = PySequence_Fast(PySequence_Fast_GET_ITEM(fast, i),
                                                "each row must be a sequence of buffers");
                if (!row) {
                    Py_DECREF(fast);
                    return -1;
                }
                if ((size_t)PySequence_Fast_GET_SIZE(row) != p->m) {
                    PyErr_Format(PyExc_ValueError, "%s: row %zu has %zd buffers, row 0 has %zu",
                                 what, i, PySequence_Fast_GET_SIZE(row), p->m);
                    Py_DECREF(row);
                    Py_DECREF(fast);
                    return -1;
                }
                for (size_t j = 0; j < p->m; j++) {
                    size_t k = i * p->m + j;
                    char w[128];
                    snprintf(w, sizeof w, "%s[%zu][%zu]", what, i, j);
                    int bad = membuf_get(PySequence_Fast_GET_ITEM(row, j), NULL, writable, w,
                                         &p->mb[k]) < 0;
                    p->n_mb = k + 1;
                    if (!bad)
                        bad = reject_device(&p->mb[k], w) < 0;
                    if (!bad) {
                        p->addr[k] = (uint64_t)(uintptr_t)p->mb[k].ptr;
                        if (i == 0)
                            p->size[j] = p->mb[k].len;
                        else if (p->mb[k].len != p->size[j]) {
                            PyErr_Format(PyExc_ValueError,
                                         "%s: has %llu bytes but [0][%zu] has %llu: each column "
                                         "must have one size", w, (unsigned long long)p->mb[k].len,
                                         j, (unsigned long long)p->size[j]);
                            bad = 1;
                        }
                    }
                    if (bad) {
                        Py_DECREF(row);
                        Py_DECREF(fast);
                        return -1;
                    }
                }
                Py_DECREF(row);
            }
        } else if (objects) {
            if ((size_t)PySequence_Fast_GET_SIZE(fast) != n) {
                PyErr_Format(PyExc_ValueError, "%s: %zu keys but %zd buffers", what, n,
                             PySequence_Fast_GET_SIZE(fast));
                Py_DECREF(fast);
                return -1;
            }
            p->m = 1;
            p->mb = PyMem_RawCalloc(n ? n : 1, sizeof(membuf));
            p->addr = PyMem_RawCalloc(n ? n : 1, sizeof(uint64_t));
            p->size = PyMem_RawCalloc(1, sizeof(uint64_t));
            if (!p->mb || !p->addr || !p->size) {
                Py_DECREF(fast);
                PyErr_NoMemory();
                return -1;
            }
            for (size_t i = 0; i < n; i++) {
                if (membuf_get(PySequence_Fast_GET_ITEM(fast, i), NULL, writable, what, &p->mb[i]) <
                        0 ||
                    reject_device(&p->mb[i], what) < 0) {
                    p->n_mb = i + 1;
                    Py_DECREF(fast);
                    return -1;
                }
                p->n_mb = i + 1;
                p->addr[i] = (uint64_t)(uintptr_t)p->mb[i].ptr;
                if (i == 0)
                    p->size[0] = p->mb[i].len;
                else if (p->mb[i].len != p->size[0]) {
                    PyErr_Format(PyExc_ValueError,
                                 "%s: buffer %zu has %llu bytes, buffer 0 has %llu: all must match",
                                 what, i, (unsigned long long)p->mb[i].len,
                                 (unsigned long long)p->size[0]);
                    Py_DECREF(fast);
                    return -1;
                }
            }
        }
        Py_DECREF(fast);
    }
    if (!objects) {
        size_t rows, cols;
        int two;
        if (u64_array_from(addrs, what, &p->addr, &rows, &cols, &two) < 0)
            return -1;
        if (rows != n) {
            PyErr_Format(PyExc_ValueError, "%s: %zu keys but %zu address rows", what, n, rows);
            return -1;
        }
        p->m = cols;
        for (size_t i = 0; i < n * cols; i++)
            if (p->addr[i] == 0) {
                PyErr_Format(PyExc_ValueError, "%s: address 0 at row %zu", what, i / cols);
                return -1;
            }
    }
    /* sizes */
    if (!p->mb) {
        if (sizes == NULL || sizes == Py_None) {
            PyErr_Format(PyExc_TypeError, "%s: sizes are required with integer addresses", what);
            return -1;
        }
        p->size = PyMem_RawCalloc(p->m ? p->m : 1, sizeof(uint64_t));
        if (!p->size) {
            PyErr_NoMemory();
            return -1;
        }
        if (PyLong_Check(sizes)) {
            uint64_t s = PyLong_AsUnsignedLongLong(sizes);
            if (s == (uint64_t)-1 && PyErr_Occurred())
                return -1;
            for (size_t j = 0; j < p->m; j++)
                p->size[j] = s;
        } else {
            uint64_t *sv;
            size_t r, c;
            int two;
            if (u64_array_from(sizes, "sizes", &sv, &r, &c, &two) < 0)
                return -1;
            if (two || r != p->m) {
                PyMem_RawFree(sv);
                PyErr_Format(PyExc_ValueError, "%s: expected %zu sizes (one per column)", what,
                             p->m);
                return -1;
            }
            memcpy(p->size, sv, sizeof(uint64_t) * p->m);
            PyMem_RawFree(sv);
        }
    } else if (sizes && sizes != Py_None) {
        /* expected sizes given: the buffers must match them (clear error) */
        uint64_t *sv = NULL;
        size_t r = 1, c = 1;
        int two = 0;
        if (PyLong_Check(sizes)) {
            sv = PyMem_RawMalloc(sizeof(uint64_t));
            if (!sv) {
                PyErr_NoMemory();
                return -1;
            }
            sv[0] = PyLong_AsUnsignedLongLong(sizes);
            if (sv[0] == (uint64_t)-1 && PyErr_Occurred()) {
                PyMem_RawFree(sv);
                return -1;
            }
        } else if (u64_array_from(sizes, "sizes", &sv, &r, &c, &two) < 0) {
            return -1;
        }
        for (size_t j = 0; j < p->m; j++) {
            uint64_t want = r == 1 ? sv[0] : (j < r ? sv[j] : 0);
            if ((r != 1 && r != p->m) || two || want != p->size[j]) {
                PyErr_Format(PyExc_ValueError, "%s: buffers of column %zu have %llu bytes, "
                                               "expected %llu", what, j,
                             (unsigned long long)p->size[j], (unsigned long long)want);
                PyMem_RawFree(sv);
                return -1;
            }
        }
        PyMem_RawFree(sv);
    }
    /* headers */
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
        raise_kvs(KVS_ERR_CLOSED, what, "the client is closed");
    } else {
        kvs_client *c = self->c;
        int rc = KVS_OK;
        self->busy++;
        if (kv.n) {
            Py_BEGIN_ALLOW_THREADS
            rc = is_get ? do_get_parts(c, &kv, &p, st) : do_put_parts(c, &kv, &p, st);
            Py_END_ALLOW_THREADS
        }
        self->busy--;
        res = rc < 0 ? raise_kvs(rc, what, NULL) : int_list(st, kv.n);
    }
    PyMem_RawFree(st);
    parts_free(&p);
    keyvec_free(&kv);
    return res;
}

static PyObject *Client_put_parts(ClientObject *self, PyObject *args, PyObject *kwds) {
    return client_parts_common(self, args, kwds, 0);
}

static PyObject *Client_get_parts(ClientObject *self, PyObject *args, PyObject *kwds) {
    return client_parts_common(self, args, kwds, 1);
}

/* read_header(key, n) -> bytes (first n bytes of the object; for diagnostics) */
static PyObject *Client_read_header(ClientObject *self, PyObject *args) {
    PyObject *key;
    Py_ssize_t want;
    if (!PyArg_ParseTuple(args, "On", &key, &want))
        return NULL;
    if (want < 0) {
        PyErr_SetString(PyExc_ValueError, "negative length");
        return NULL;
    }
    onekey k;
    if (onekey_get(key, KVS_KEY_MAX, &k) < 0)
        return NULL;
    if (!self->c) {
        onekey_release(&k);
        return raise_kvs(KVS_ERR_CLOSED, "read_header", "the client is closed");
    }
    kvs_client *c = self->c;
    kvs_key kk = {k.p, (uint32_t)k.len};
    kvs_slot slot;
    memset(&slot, 0, sizeof slot);
    PyObject *out = PyBytes_FromStringAndSize(NULL, want);
    if (!out) {
        onekey_release(&k);
        return NULL;
    }
    char *buf = PyBytes_AS_STRING(out);
    int rc;
    uint64_t sz = 0;
    self->busy++;
    Py_BEGIN_ALLOW_THREADS
    rc = kvs_acquire_batch(c, &kk, 1, &slot);
    if (rc >= 0) {
        rc = slot.status;
        if (rc == KVS_OK) {
            sz = slot.size < (uint64_t)want ? slot.size : (uint64_t)want;
            rc = kvs_slot_read(c, &slot, 0, buf, sz);
            kvs_release_batch(c, &slot, 1);
        }
    }
    Py_END_ALLOW_THREADS
    self->busy--;
    onekey_release(&k);
    if (rc < 0) {
        Py_DECREF(out);
        return raise_kvs(rc, "read_header", NULL);
    }
    if (_PyBytes_Resize(&out, (Py_ssize_t)sz) < 0)
        return NULL;
    return out;
}

static PyObject *Client_stats(ClientObject *self, PyObject *Py_UNUSED(a)) {
    if (!self->c)
        return raise_kvs(KVS_ERR_CLOSED, "stats", "the client is closed");
    kvs_client *c = self->c;
    char *json = NULL;
    int rc;
    self->busy++;
    Py_BEGIN_ALLOW_THREADS
    rc = kvs_client_stats_json(c, &json);
    Py_END_ALLOW_THREADS
    self->busy--;
    if (rc < 0)
        return raise_kvs(rc, "stats", NULL);
    PyObject *mod = PyImport_ImportModule("json");
    PyObject *res = NULL;
    if (mod) {
        res = PyObject_CallMethod(mod, "loads", "s", json ? json : "{}");
        Py_DECREF(mod);
    }
    free(json);
    return res;
}

static PyObject *Client_counters(ClientObject *self, PyObject *Py_UNUSED(a)) {
    if (!self->c)
        return raise_kvs(KVS_ERR_CLOSED, "counters", "the client is closed");
    kvs_client_counters k;
    memset(&k, 0, sizeof k);
    kvs_client_get_counters(self->c, &k);
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K}", "puts", (unsigned long long)k.puts,
                         "gets", (unsigned long long)k.gets, "hits", (unsigned long long)k.hits,
                         "misses", (unsigned long long)k.misses, "errors",
                         (unsigned long long)k.errors, "reconnects",
                         (unsigned long long)k.reconnects, "bytes_put",
                         (unsigned long long)k.bytes_put, "bytes_got",
                         (unsigned long long)k.bytes_got);
}

static PyObject *Client_handle(ClientObject *self, void *Py_UNUSED(c)) {
    return PyLong_FromVoidPtr(self->c);
}

#define METH_KW(f) (PyCFunction)(void (*)(void))(f)

static PyMethodDef Client_methods[] = {
    {"put", METH_KW(Client_put), METH_VARARGS | METH_KEYWORDS,
     "put(key, value, size=None): store value (tensor/buffer, or int address with size) under key."},
    {"put_from", METH_KW(Client_put_from), METH_VARARGS | METH_KEYWORDS,
     "put_from(key, value, size=None): like put, value inside registered memory (zero copy)."},
    {"get", METH_KW(Client_get), METH_VARARGS | METH_KEYWORDS,
     "get(key, buf=None, size=None): bytes of key, or read into buf and return the size."},
    {"get_into", METH_KW(Client_get_into), METH_VARARGS | METH_KEYWORDS,
     "get_into(key, buf, size=None): read into registered memory; returns the stored size."},
    {"exists", (PyCFunction)Client_exists, METH_O, "exists(key) -> bool"},
    {"exists_batch", (PyCFunction)Client_exists_batch, METH_O,
     "exists_batch(keys) -> list[bool] (one round trip)"},
    {"remove", (PyCFunction)Client_remove, METH_O, "remove(key); NotFound if absent"},
    {"remove_batch", (PyCFunction)Client_remove_batch, METH_O,
     "remove_batch(keys) -> list[int] statuses"},
    {"put_batch", (PyCFunction)Client_put_batch, METH_VARARGS,
     "put_batch(keys, values) -> list[int]: 0 or a negative error code per item. values: "
     "tensors/buffers or (address, size) pairs."},
    {"get_batch", (PyCFunction)Client_get_batch, METH_VARARGS,
     "get_batch(keys, bufs) -> list[int]: stored size (>= 0) or a negative error code per item."},
    {"put_parts", METH_KW(Client_put_parts), METH_VARARGS | METH_KEYWORDS,
     "put_parts(keys, addrs, sizes=None, header=None) -> list[int]: object i = header + the "
     "parts addrs[i][0..m-1] (sizes[j] bytes each), written zero-copy."},
    {"get_parts", METH_KW(Client_get_parts), METH_VARARGS | METH_KEYWORDS,
     "get_parts(keys, addrs, sizes=None, header=None) -> list[int]: scatter objects into the "
     "parts; TooLarge code if the stored size differs, Corrupt if the header differs."},
    {"read_header", (PyCFunction)Client_read_header, METH_VARARGS,
     "read_header(key, n) -> first n bytes of the stored object"},
    {"register_memory", METH_KW(Client_register_memory), METH_VARARGS | METH_KEYWORDS,
     "register_memory(buf, size=None) -> address; the caller keeps buf alive."},
    {"unregister_memory", (PyCFunction)Client_unregister_memory, METH_O,
     "unregister_memory(buf_or_address)"},
    {"stats", (PyCFunction)Client_stats, METH_NOARGS, "stats() -> dict (pool state)"},
    {"counters", (PyCFunction)Client_counters, METH_NOARGS, "counters() -> dict"},
    {"close", (PyCFunction)Client_close, METH_NOARGS, "close() (idempotent)"},
    {"__enter__", (PyCFunction)Client_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)Client_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Client_getset[] = {
    {"closed", (getter)Client_closed, NULL, "True after close()", NULL},
    {"config", (getter)Client_config, NULL, "the effective configuration (secret hidden)", NULL},
    {"handle", (getter)Client_handle, NULL, "address of the kvs_client (for native code)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ClientType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvshelf._kvshelf.Client",
    .tp_basicsize = sizeof(ClientObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Client(config=None, /, *, use_env=True, **keys)\n\n"
              "A kvshelf store client. config: a dict of Mooncake keys, JSON text, or a path to a "
              "JSON file; keyword arguments add keys. With use_env the KVSHELF_* variables are "
              "applied first. With no master_server_address the host-local embedded pool is used.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Client_init,
    .tp_dealloc = (destructor)Client_dealloc,
    .tp_methods = Client_methods,
    .tp_getset = Client_getset,
};

/* ------------------------------------------------------------------------ */
/* Connector and Task                                                        */
/* ------------------------------------------------------------------------ */

typedef struct TaskObject TaskObject;

typedef struct ConnectorObject {
    PyObject_HEAD
    kvs_connector *c;
    volatile int busy;
    int device;
    int layout_set;
    TaskObject *tasks; /* live tasks (under the GIL) */
    PyObject *ns;
} ConnectorObject;

struct TaskObject {
    PyObject_HEAD
    kvs_task *t;
    ConnectorObject *conn; /* strong ref */
    size_t n;
    int *results; /* set once finished */
    int finished;
    int ok;
    char kind; /* 'd' dump, 'l' load */
    volatile int busy;
    TaskObject *prev, *next;
};

static PyTypeObject ConnectorType;
static PyTypeObject TaskType;

static void task_unlink(TaskObject *t) {
    if (!t->conn)
        return;
    if (t->prev)
        t->prev->next = t->next;
    else if (t->conn->tasks == t)
        t->conn->tasks = t->next;
    if (t->next)
        t->next->prev = t->prev;
    t->prev = t->next = NULL;
}

/* Collects the results of a finished task and frees the C task. */
static int task_collect(TaskObject *t) {
    if (t->finished)
        return 0;
    int *r = PyMem_RawCalloc(t->n ? t->n : 1, sizeof(int));
    if (!r) {
        PyErr_NoMemory();
        return -1;
    }
    int ok = kvs_task_results(t->t, r, t->n);
    t->results = r;
    t->ok = ok < 0 ? 0 : ok;
    if (ok < 0)
        for (size_t i = 0; i < t->n; i++)
            r[i] = ok;
    t->finished = 1;
    kvs_task_free(t->t);
    t->t = NULL;
    return 0;
}

/* Ends a task that will never be waited for (connector closing). */
static void task_abandon(TaskObject *t, int status) {
    if (t->finished)
        return;
    if (t->t) {
        if (kvs_task_check(t->t) == 1) {
            if (task_collect(t) == 0)
                return;
            PyErr_Clear();
        }
        kvs_task_free(t->t); /* cancels it */
        t->t = NULL;
    }
    PyMem_RawFree(t->results);
    t->results = PyMem_RawCalloc(t->n ? t->n : 1, sizeof(int));
    if (t->results)
        for (size_t i = 0; i < t->n; i++)
            t->results[i] = status;
    t->ok = 0;
    t->finished = 1;
}

static void Task_dealloc(TaskObject *self) {
    wait_not_busy(&self->busy);
    if (self->t) {
        kvs_task_free(self->t);
        self->t = NULL;
    }
    task_unlink(self);
    PyMem_RawFree(self->results);
    Py_CLEAR(self->conn);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* wait(timeout=None) -> bool: True when finished, False on timeout. */
static PyObject *Task_wait(TaskObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"timeout", NULL};
    PyObject *to = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O", kwlist, &to))
        return NULL;
    if (self->finished)
        Py_RETURN_TRUE;
    double secs = -1;
    if (to != Py_None) {
        secs = PyFloat_AsDouble(to);
        if (secs == -1 && PyErr_Occurred())
            return NULL;
        if (secs < 0)
            secs = 0;
    }
    long long left_ms = secs < 0 ? -1 : (long long)(secs * 1000.0 + 0.5);
    for (;;) {
        if (self->finished)
            Py_RETURN_TRUE;
        if (!self->t)
            return raise_kvs(KVS_ERR_CLOSED, "Task.wait", "the task was abandoned");
        int slice = left_ms < 0 || left_ms > 100 ? 100 : (int)left_ms;
        int rc;
        kvs_task *t = self->t;
        self->busy++;
        Py_BEGIN_ALLOW_THREADS
        rc = kvs_task_wait(t, slice);
        Py_END_ALLOW_THREADS
        self->busy--;
        if (rc == KVS_OK) {
            if (task_collect(self) < 0)
                return NULL;
            Py_RETURN_TRUE;
        }
        if (rc != KVS_ERR_TIMEOUT)
            return raise_kvs(rc, "Task.wait", NULL);
        if (left_ms >= 0) {
            left_ms -= slice;
            if (left_ms <= 0)
                Py_RETURN_FALSE;
        }
        if (PyErr_CheckSignals() < 0)
            return NULL;
    }
}

static PyObject *Task_check(TaskObject *self, PyObject *Py_UNUSED(a)) {
    if (self->finished)
        Py_RETURN_TRUE;
    if (!self->t)
        Py_RETURN_TRUE;
    int r = kvs_task_check(self->t);
    if (r < 0)
        return raise_kvs(r, "Task.check", NULL);
    if (r == 1) {
        if (task_collect(self) < 0)
            return NULL;
        Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}

static PyObject *Task_results(TaskObject *self, PyObject *Py_UNUSED(a)) {
    if (!self->finished) {
        PyObject *r = Task_check(self, NULL);
        if (!r)
            return NULL;
        Py_DECREF(r);
        if (!self->finished)
            return raise_kvs(KVS_ERR_BUSY, "Task.results", "the task is still running: wait() first");
    }
    return int_list(self->results, self->n);
}

static PyObject *Task_failed(TaskObject *self, PyObject *Py_UNUSED(a)) {
    /* indices of blocks whose status is not OK (and, for dumps, not EXISTS) */
    if (!self->finished) {
        PyObject *r = Task_check(self, NULL);
        if (!r)
            return NULL;
        Py_DECREF(r);
        if (!self->finished)
            return raise_kvs(KVS_ERR_BUSY, "Task.failed", "the task is still running: wait() first");
    }
    PyObject *l = PyList_New(0);
    if (!l)
        return NULL;
    for (size_t i = 0; i < self->n; i++) {
        int s = self->results[i];
        if (s == KVS_OK || (self->kind == 'd' && s == KVS_ERR_EXISTS))
            continue;
        PyObject *x = PyLong_FromSize_t(i);
        if (!x || PyList_Append(l, x) < 0) {
            Py_XDECREF(x);
            Py_DECREF(l);
            return NULL;
        }
        Py_DECREF(x);
    }
    return l;
}

static PyObject *Task_get_n(TaskObject *self, void *Py_UNUSED(c)) {
    return PyLong_FromSize_t(self->n);
}
static PyObject *Task_get_done(TaskObject *self, void *Py_UNUSED(c)) {
    return PyBool_FromLong(self->finished);
}
static PyObject *Task_get_ok(TaskObject *self, void *Py_UNUSED(c)) {
    if (!self->finished)
        Py_RETURN_NONE;
    return PyLong_FromLong(self->ok);
}
static PyObject *Task_get_kind(TaskObject *self, void *Py_UNUSED(c)) {
    return PyUnicode_FromString(self->kind == 'd' ? "dump" : "load");
}

static PyObject *Task_repr(TaskObject *self) {
    if (self->finished)
        return PyUnicode_FromFormat("<kvshelf.Task %s n=%zu done ok=%d>",
                                    self->kind == 'd' ? "dump" : "load", self->n, self->ok);
    return PyUnicode_FromFormat("<kvshelf.Task %s n=%zu running>",
                                self->kind == 'd' ? "dump" : "load", self->n);
}

static PyMethodDef Task_methods[] = {
    {"wait", METH_KW(Task_wait), METH_VARARGS | METH_KEYWORDS,
     "wait(timeout=None) -> bool: True once finished, False if the timeout (seconds) passed."},
    {"check", (PyCFunction)Task_check, METH_NOARGS, "check() -> bool: finished? Never blocks."},
    {"results", (PyCFunction)Task_results, METH_NOARGS,
     "results() -> list[int]: per-block status (0 ok, NOT_FOUND miss, other errors)."},
    {"failed", (PyCFunction)Task_failed, METH_NOARGS,
     "failed() -> list[int]: indices of blocks that did not succeed."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Task_getset[] = {
    {"n", (getter)Task_get_n, NULL, "number of blocks", NULL},
    {"done", (getter)Task_get_done, NULL, "finished and collected", NULL},
    {"ok", (getter)Task_get_ok, NULL, "blocks that succeeded (None while running)", NULL},
    {"kind", (getter)Task_get_kind, NULL, "'dump' or 'load'", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject TaskType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvshelf._kvshelf.Task",
    .tp_basicsize = sizeof(TaskObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An asynchronous dump or load started by Connector.dump/load.",
    .tp_dealloc = (destructor)Task_dealloc,
    .tp_methods = Task_methods,
    .tp_getset = Task_getset,
    .tp_repr = (reprfunc)Task_repr,
};

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
    PyObject *kw = kwds ? PyDict_Copy(kwds) : PyDict_New();
    if (!kw)
        return -1;
    PyObject *mine = split_kwargs(kw, own);
    if (!mine) {
        Py_DECREF(kw);
        return -1;
    }
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
        return raise_kvs(KVS_ERR_CLOSED, "register_layout", "the connector is closed");
    }
    kvs_connector *c = self->c;
    int rc;
    self->busy++;
    Py_BEGIN_ALLOW_THREADS
    rc = kvs_connector_register_layout(c, tl, rows, (uint32_t)num_blocks);
    Py_END_ALLOW_THREADS
    self->busy--;
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
        raise_kvs(KVS_ERR_CLOSED, what, "the connector is closed");
    } else if (!kv.n) {
        res = prefix ? PyLong_FromLong(0) : PyList_New(0);
    } else {
        kvs_connector *c = self->c;
        int rc;
        self->busy++;
        Py_BEGIN_ALLOW_THREADS
        rc = prefix ? kvs_connector_lookup_prefix(c, kv.keys, kv.n)
                    : kvs_connector_lookup(c, kv.keys, kv.n, hit);
        Py_END_ALLOW_THREADS
        self->busy--;
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

/* event: None, an int (cudaEvent_t), or an object with .cuda_event (torch). */
static int event_from(PyObject *ev, void **out) {
    *out = NULL;
    if (!ev || ev == Py_None)
        return 0;
    PyObject *h = NULL;
    if (PyLong_Check(ev)) {
        h = ev;
        Py_INCREF(h);
    } else {
        h = PyObject_GetAttrString(ev, "cuda_event");
        if (!h) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "event: expected None, an int cudaEvent_t handle or an "
                                          "object with .cuda_event, not %.100s", Py_TYPE(ev)->tp_name);
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
    uint64_t *b64;
    size_t rows, cols;
    int two;
    if (u64_array_from(blocks, "block_ids", &b64, &rows, &cols, &two) < 0) {
        keyvec_free(&kv);
        return NULL;
    }
    if (two || rows != kv.n) {
        PyErr_Format(PyExc_ValueError, "%s: %zu hashes but %zu block ids", what, kv.n, rows);
        PyMem_RawFree(b64);
        keyvec_free(&kv);
        return NULL;
    }
    uint32_t *ids = PyMem_RawMalloc(sizeof(uint32_t) * (rows ? rows : 1));
    if (!ids) {
        PyMem_RawFree(b64);
        keyvec_free(&kv);
        return PyErr_NoMemory();
    }
    for (size_t i = 0; i < rows; i++) {
        if (b64[i] > UINT32_MAX) {
            PyMem_RawFree(b64);
            PyMem_RawFree(ids);
            keyvec_free(&kv);
            PyErr_Format(PyExc_ValueError, "%s: block id %llu out of range", what,
                         (unsigned long long)b64[i]);
            return NULL;
        }
        ids[i] = (uint32_t)b64[i];
    }
    PyMem_RawFree(b64);
    TaskObject *task = NULL;
    if (!self->c) {
        raise_kvs(KVS_ERR_CLOSED, what, "the connector is closed");
        goto out;
    }
    task = PyObject_New(TaskObject, &TaskType);
    if (!task)
        goto out;
    task->t = NULL;
    task->conn = NULL;
    task->n = kv.n;
    task->results = NULL;
    task->finished = 0;
    task->ok = 0;
    task->kind = dump ? 'd' : 'l';
    task->busy = 0;
    task->prev = task->next = NULL;
    kvs_connector *c = self->c;
    kvs_task *t = NULL;
    int rc;
    self->busy++;
    Py_BEGIN_ALLOW_THREADS
    rc = dump ? kvs_connector_dump(c, kv.keys, ids, kv.n, ev, &t)
              : kvs_connector_load(c, kv.keys, ids, kv.n, &t);
    Py_END_ALLOW_THREADS
    self->busy--;
    if (rc < 0) {
        Py_CLEAR(task);
        raise_kvs(rc, what, NULL);
        goto out;
    }
    task->t = t;
    Py_INCREF(self);
    task->conn = self;
    task->next = self->tasks;
    if (self->tasks)
        self->tasks->prev = task;
    self->tasks = task;
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
        return raise_kvs(KVS_ERR_CLOSED, "counters", "the connector is closed");
    kvs_connector_counters k;
    memset(&k, 0, sizeof k);
    kvs_connector_get_counters(self->c, &k);
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K}", "dumped_blocks",
                         (unsigned long long)k.dumped_blocks, "loaded_blocks",
                         (unsigned long long)k.loaded_blocks, "missed_blocks",
                         (unsigned long long)k.missed_blocks, "failed_blocks",
                         (unsigned long long)k.failed_blocks, "dropped_blocks",
                         (unsigned long long)k.dropped_blocks, "skipped_blocks",
                         (unsigned long long)k.skipped_blocks, "bytes_dumped",
                         (unsigned long long)k.bytes_dumped, "bytes_loaded",
                         (unsigned long long)k.bytes_loaded);
}

static PyObject *Connector_get_block_bytes(ConnectorObject *self, void *Py_UNUSED(c)) {
    if (!self->c)
        return raise_kvs(KVS_ERR_CLOSED, "block_bytes", "the connector is closed");
    return PyLong_FromUnsignedLongLong(kvs_connector_block_bytes(self->c));
}

static PyObject *Connector_get_backend(ConnectorObject *self, void *Py_UNUSED(c)) {
    if (!self->c)
        return raise_kvs(KVS_ERR_CLOSED, "backend", "the connector is closed");
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

static PyTypeObject ConnectorType = {
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

/* ------------------------------------------------------------------------ */
/* Module functions                                                          */
/* ------------------------------------------------------------------------ */

static PyObject *mod_strerror(PyObject *Py_UNUSED(m), PyObject *arg) {
    long c = PyLong_AsLong(arg);
    if (c == -1 && PyErr_Occurred())
        return NULL;
    return PyUnicode_FromString(kvs_strerror((int)c));
}

static PyObject *mod_errname(PyObject *Py_UNUSED(m), PyObject *arg) {
    long c = PyLong_AsLong(arg);
    if (c == -1 && PyErr_Occurred())
        return NULL;
    return PyUnicode_FromString(kvs_errname((int)c));
}

static PyObject *mod_parse_size(PyObject *Py_UNUSED(m), PyObject *arg) {
    const char *s = PyUnicode_AsUTF8(arg);
    if (!s)
        return NULL;
    uint64_t v;
    int rc = kvs_parse_size(s, &v);
    if (rc < 0)
        return raise_kvs(rc, "parse_size", s);
    return PyLong_FromUnsignedLongLong(v);
}

/* load_config(config=None, *, use_env=True, **keys) -> dict (validated) */
static PyObject *mod_load_config(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kwds) {
    PyObject *config = Py_None;
    if (!PyArg_ParseTuple(args, "|O:load_config", &config))
        return NULL;
    static const char *const own[] = {"use_env", NULL};
    PyObject *kw = kwds ? PyDict_Copy(kwds) : PyDict_New();
    if (!kw)
        return NULL;
    PyObject *mine = split_kwargs(kw, own);
    if (!mine) {
        Py_DECREF(kw);
        return NULL;
    }
    PyObject *ue = PyDict_GetItemString(mine, "use_env");
    int use_env = ue ? PyObject_IsTrue(ue) : 1;
    Py_DECREF(mine);
    if (use_env < 0) {
        Py_DECREF(kw);
        return NULL;
    }
    kvs_config cfg;
    int r = build_config(config, kw, use_env, &cfg);
    Py_DECREF(kw);
    if (r < 0)
        return NULL;
    return config_to_dict(&cfg);
}

static PyMethodDef module_methods[] = {
    {"strerror", (PyCFunction)mod_strerror, METH_O, "strerror(code) -> str"},
    {"errname", (PyCFunction)mod_errname, METH_O, "errname(code) -> 'KVS_ERR_...'"},
    {"parse_size", (PyCFunction)mod_parse_size, METH_O, "parse_size('3.125GiB') -> int"},
    {"load_config", METH_KW(mod_load_config), METH_VARARGS | METH_KEYWORDS,
     "load_config(config=None, *, use_env=True, **keys) -> dict: the validated configuration "
     "(secret hidden)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_kvshelf", "kvshelf C extension (see the kvshelf package).", -1,
    module_methods,        NULL,       NULL,                                             NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__kvshelf(void) {
    PyObject *m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    if (PyType_Ready(&ClientType) < 0 || PyType_Ready(&ConnectorType) < 0 ||
        PyType_Ready(&TaskType) < 0)
        goto fail;
    PyObject *dict = Py_BuildValue("{s:O,s:O}", "code", Py_None, "name", Py_None);
    if (!dict)
        goto fail;
    Error = PyErr_NewExceptionWithDoc("kvshelf.Error",
                                      "Base of kvshelf errors: .code (negative int), .name "
                                      "('KVS_ERR_...'), str() is the C message.",
                                      NULL, dict);
    Py_DECREF(dict);
    if (!Error || PyModule_AddObjectRef(m, "Error", Error) < 0)
        goto fail;
    for (size_t i = 0; i < N_ERRDEFS; i++) {
        PyObject *extra = NULL;
        switch (errdefs[i].code) {
        case KVS_ERR_INVALID: extra = PyExc_ValueError; break;
        case KVS_ERR_CONFIG: extra = PyExc_ValueError; break;
        case KVS_ERR_TIMEOUT: extra = PyExc_TimeoutError; break;
        case KVS_ERR_CONN: extra = PyExc_ConnectionError; break;
        case KVS_ERR_NOMEM: extra = PyExc_MemoryError; break;
        case KVS_ERR_NOT_FOUND: extra = PyExc_LookupError; break;
        case KVS_ERR_UNSUPPORTED: extra = PyExc_NotImplementedError; break;
        case KVS_ERR_IO: extra = PyExc_OSError; break;
        default: break;
        }
        PyObject *bases = extra ? PyTuple_Pack(2, Error, extra) : PyTuple_Pack(1, Error);
        if (!bases)
            goto fail;
        char full[96];
        snprintf(full, sizeof full, "kvshelf.%s", errdefs[i].pyname);
        PyObject *cls = PyErr_NewExceptionWithDoc(full, errdefs[i].doc, bases, NULL);
        Py_DECREF(bases);
        if (!cls)
            goto fail;
        PyObject *code = PyLong_FromLong(errdefs[i].code);
        if (!code || PyObject_SetAttrString(cls, "code", code) < 0) {
            Py_XDECREF(code);
            Py_DECREF(cls);
            goto fail;
        }
        Py_DECREF(code);
        errdefs[i].cls = cls; /* module keeps a ref below; this one is ours */
        if (PyModule_AddObjectRef(m, errdefs[i].pyname, cls) < 0)
            goto fail;
        char cname[64];
        snprintf(cname, sizeof cname, "%s", kvs_errname(errdefs[i].code));
        const char *short_name = strncmp(cname, "KVS_", 4) == 0 ? cname + 4 : cname;
        if (PyModule_AddIntConstant(m, short_name, errdefs[i].code) < 0)
            goto fail;
    }
    if (PyModule_AddIntConstant(m, "OK", KVS_OK) < 0 ||
        PyModule_AddIntConstant(m, "KEY_MAX", KVS_KEY_MAX) < 0 ||
        PyModule_AddIntConstant(m, "HASH_MAX", KVS_HASH_MAX) < 0 ||
        PyModule_AddStringConstant(m, "__version__", KVSHELF_VERSION_STRING) < 0 ||
        PyModule_AddObjectRef(m, "Client", (PyObject *)&ClientType) < 0 ||
        PyModule_AddObjectRef(m, "Connector", (PyObject *)&ConnectorType) < 0 ||
        PyModule_AddObjectRef(m, "Task", (PyObject *)&TaskType) < 0)
        goto fail;
    PyObject *defs = Py_BuildValue("{s:K,s:K,s:i,s:i,s:i}", "global_segment_size",
                                   (unsigned long long)KVS_DEFAULT_GLOBAL_SEGMENT_SIZE,
                                   "local_buffer_size",
                                   (unsigned long long)KVS_DEFAULT_LOCAL_BUFFER_SIZE, "timeout_ms",
                                   KVS_DEFAULT_TIMEOUT_MS, "master_port", KVS_DEFAULT_MASTER_PORT,
                                   "metadata_port", KVS_DEFAULT_METADATA_PORT);
    if (!defs || PyModule_AddObject(m, "DEFAULTS", defs) < 0) {
        Py_XDECREF(defs);
        goto fail;
    }
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
