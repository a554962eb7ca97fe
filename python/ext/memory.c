/* Caller memory as pointer + size (see memory.h). */
#include "memory.h"

#include <string.h>

#include "errors.h"

void membuf_release(membuf *m) {
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

int is_tensor_like(PyObject *o) {
    return PyObject_HasAttrString(o, "data_ptr") && PyObject_HasAttrString(o, "nbytes") &&
           !PyLong_Check(o);
}

/* *out = v as a uint64; takes the reference v (NULL: an exception is set). */
static int take_u64(PyObject *v, uint64_t *out) {
    if (!v)
        return -1;
    *out = PyLong_AsUnsignedLongLong(v);
    Py_DECREF(v);
    return *out == (uint64_t)-1 && PyErr_Occurred() ? -1 : 0;
}

/* The memory of a contiguous tensor-like object. */
static int tensor_get(PyObject *o, const char *what, membuf *m) {
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
    uint64_t addr, len;
    if (take_u64(PyObject_CallMethod(o, "data_ptr", NULL), &addr) < 0 ||
        take_u64(PyObject_GetAttrString(o, "nbytes"), &len) < 0)
        return -1;
    m->ptr = (void *)(uintptr_t)addr;
    m->len = len;
    m->is_device = attr_true(o, "is_cuda");
    return 0;
}

/* The memory of a C-contiguous buffer (a view is held). */
static int buffer_get(PyObject *o, int writable, const char *what, membuf *m) {
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
    return 0;
}

int membuf_get(PyObject *o, PyObject *size, int writable, const char *what, membuf *m) {
    memset(m, 0, sizeof(*m));
    uint64_t want = 0;
    int have_size = size && size != Py_None;
    if (have_size) {
        want = PyLong_AsUnsignedLongLong(size);
        if (want == (uint64_t)-1 && PyErr_Occurred())
            return -1;
    }
    if (is_tensor_like(o)) {
        if (tensor_get(o, what, m) < 0)
            return -1;
    } else if (PyObject_CheckBuffer(o)) {
        if (buffer_get(o, writable, what, m) < 0)
            return -1;
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

int membuf_get_host(PyObject *o, PyObject *size, int writable, const char *what, membuf *m) {
    if (membuf_get(o, size, writable, what, m) < 0)
        return -1;
    if (m->is_device) {
        membuf_release(m);
        raise_kvs(KVS_ERR_UNSUPPORTED, what,
                  "device (CUDA) memory is moved by kvshelf.Connector, not by the client");
        return -1;
    }
    return 0;
}
