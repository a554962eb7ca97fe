/* Keys and block hashes from Python objects (see keys.h). */
#include "keys.h"

#include <string.h>

/* Borrows the bytes of one key object into k (a view is held for buffers).
 * Returns 0 or -1 with an exception. */
static int key_bytes(PyObject *o, onekey *k) {
    k->has_view = 0;
    if (PyBytes_Check(o)) {
        k->p = PyBytes_AS_STRING(o);
        k->len = PyBytes_GET_SIZE(o);
        return 0;
    }
    if (PyUnicode_Check(o)) {
        k->p = PyUnicode_AsUTF8AndSize(o, &k->len);
        return k->p ? 0 : -1;
    }
    if (PyObject_CheckBuffer(o)) {
        if (PyObject_GetBuffer(o, &k->view, PyBUF_CONTIG_RO) < 0)
            return -1;
        k->has_view = 1;
        k->p = k->view.buf;
        k->len = k->view.len;
        return 0;
    }
    PyErr_Format(PyExc_TypeError, "a key must be bytes, str or a bytes-like object, not %.100s",
                 Py_TYPE(o)->tp_name);
    return -1;
}

void keyvec_free(keyvec *kv) {
    PyMem_RawFree(kv->keys);
    PyMem_RawFree(kv->arena);
    kv->keys = NULL;
    kv->arena = NULL;
    kv->n = 0;
}

/* A C-contiguous 2-D array of bytes (numpy uint8 [n, len]): n keys of len
 * bytes, one per row, copied with one memcpy (kvshelf.ucm builds the keys of
 * a whole call this way). 1 done, 0 not such an array, -1 error. */
static int keyvec_from_rows(PyObject *o, size_t maxlen, const char *what, keyvec *kv) {
    if (PyBytes_Check(o) || PyByteArray_Check(o) || PyUnicode_Check(o) || !PyObject_CheckBuffer(o))
        return 0;
    Py_buffer v;
    if (PyObject_GetBuffer(o, &v, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyErr_Clear();
        return 0;
    }
    if (v.ndim != 2 || v.itemsize != 1) {
        PyBuffer_Release(&v);
        return 0;
    }
    size_t n = (size_t)v.shape[0], len = (size_t)v.shape[1];
    if (n && (len < 1 || len > maxlen)) {
        PyErr_Format(PyExc_ValueError, "%s: rows of %zu bytes: a key must be 1..%zu bytes", what, len,
                     maxlen);
        PyBuffer_Release(&v);
        return -1;
    }
    size_t bytes = n * len;
    kv->n = n;
    kv->keys = PyMem_RawMalloc(sizeof(kvs_key) * (n ? n : 1));
    kv->arena = PyMem_RawMalloc(bytes > 0 ? bytes : 1);
    if (!kv->keys || !kv->arena) {
        PyBuffer_Release(&v);
        keyvec_free(kv);
        PyErr_NoMemory();
        return -1;
    }
    if (bytes)
        memcpy(kv->arena, v.buf, bytes);
    PyBuffer_Release(&v);
    for (size_t i = 0; i < n; i++) {
        kv->keys[i].data = kv->arena + i * len;
        kv->keys[i].len = (uint32_t)len;
    }
    return 1;
}

int keyvec_from(PyObject *seq, size_t maxlen, const char *what, keyvec *kv) {
    memset(kv, 0, sizeof(*kv));
    int rows = keyvec_from_rows(seq, maxlen, what, kv);
    if (rows != 0)
        return rows > 0 ? 0 : -1;
    PyObject *fast = PySequence_Fast(seq, "keys must be a sequence of bytes or str");
    if (!fast)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject **items = PySequence_Fast_ITEMS(fast);
    size_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        onekey k;
        if (key_bytes(items[i], &k) < 0)
            goto fail;
        onekey_release(&k);
        if (k.len < 1 || (size_t)k.len > maxlen) {
            PyErr_Format(PyExc_ValueError, "%s[%zd]: a key must be 1..%zu bytes, got %zd", what, i,
                         maxlen, k.len);
            goto fail;
        }
        total += (size_t)k.len;
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
        onekey k;
        if (key_bytes(items[i], &k) < 0)
            goto fail;
        if ((size_t)k.len > total - off || k.len < 1) { /* changed under us */
            onekey_release(&k);
            PyErr_SetString(PyExc_RuntimeError, "keys changed while being read");
            goto fail;
        }
        memcpy(kv->arena + off, k.p, (size_t)k.len);
        onekey_release(&k);
        kv->keys[i].data = kv->arena + off;
        kv->keys[i].len = (uint32_t)k.len;
        off += (size_t)k.len;
    }
    Py_DECREF(fast);
    return 0;
fail:
    Py_DECREF(fast);
    keyvec_free(kv);
    return -1;
}

int onekey_get(PyObject *o, size_t maxlen, onekey *k) {
    if (key_bytes(o, k) < 0)
        return -1;
    if (k->len < 1 || (size_t)k->len > maxlen) {
        onekey_release(k);
        PyErr_Format(PyExc_ValueError, "a key must be 1..%zu bytes, got %zd", maxlen, k->len);
        return -1;
    }
    return 0;
}

void onekey_release(onekey *k) {
    if (k->has_view)
        PyBuffer_Release(&k->view);
    k->has_view = 0;
}
