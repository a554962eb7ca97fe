/* Integer arrays between Python and C (see arrays.h). */
#include "arrays.h"

#include <string.h>

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

/* u64_array_from for a buffer (numpy array and the like). */
static int u64_array_from_buffer(PyObject *obj, const char *what, uint64_t **out, size_t *rows,
                                 size_t *cols, int *is_2d) {
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
    if (c && r > SIZE_MAX / sizeof(uint64_t) / c) { /* (a broadcast array can claim anything) */
        PyErr_Format(PyExc_ValueError, "%s: array too large", what);
        PyBuffer_Release(&v);
        return -1;
    }
    uint64_t *a = PyMem_RawMalloc(sizeof(uint64_t) * ((r * c) > 0 ? r * c : 1));
    if (!a) {
        PyBuffer_Release(&v);
        PyErr_NoMemory();
        return -1;
    }
    const char *f = v.format ? v.format : "B";
    if (*f == '@' || *f == '=' || *f == '<')
        f++;
    if (v.itemsize == 8 && (*f == 'Q' || *f == 'L' || *f == 'N' || *f == 'P') && !f[1] &&
        PyBuffer_IsContiguous(&v, 'C')) {
        /* uint64 in C order (numpy address rows): one copy */
        memcpy(a, v.buf, r * c * sizeof(uint64_t));
        *is_2d = v.ndim == 2;
        PyBuffer_Release(&v);
        *out = a;
        *rows = r;
        *cols = c;
        return 0;
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

/* u64_array_from for a sequence of ints or of sequences of ints. */
static int u64_array_from_seq(PyObject *obj, const char *what, uint64_t **out, size_t *rows,
                              size_t *cols, int *is_2d) {
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

int u64_array_from(PyObject *obj, const char *what, uint64_t **out, size_t *rows, size_t *cols,
                   int *is_2d) {
    *out = NULL;
    *rows = *cols = 0;
    *is_2d = 0;
    if (PyObject_CheckBuffer(obj) && !PyBytes_Check(obj) && !PyByteArray_Check(obj))
        return u64_array_from_buffer(obj, what, out, rows, cols, is_2d);
    return u64_array_from_seq(obj, what, out, rows, cols, is_2d);
}

PyObject *bool_list(const uint8_t *v, size_t n) {
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

PyObject *int_list(const int *v, size_t n) {
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
