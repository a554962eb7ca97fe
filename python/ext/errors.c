/* The exception hierarchy and code -> exception (see errors.h). */
#include "errors.h"

#include <string.h>

static PyObject *Error; /* kvshelf.Error */

struct errdef {
    int code;
    const char *pyname;
    const char *doc;
    PyObject *const *extra_base; /* a builtin exception to also inherit, or NULL */
    PyObject *cls;               /* set by errors_init */
};

static struct errdef errdefs[] = {
    {KVS_ERR_INVALID, "InvalidArgument", "An argument is invalid (KVS_ERR_INVALID).",
     &PyExc_ValueError, NULL},
    {KVS_ERR_NOMEM, "NoMemory", "Out of process memory (KVS_ERR_NOMEM).", &PyExc_MemoryError, NULL},
    {KVS_ERR_NOT_FOUND, "NotFound", "The key is not in the pool: a miss (KVS_ERR_NOT_FOUND).",
     &PyExc_LookupError, NULL},
    {KVS_ERR_EXISTS, "Exists", "The key is already stored or being written (KVS_ERR_EXISTS).",
     NULL, NULL},
    {KVS_ERR_NO_SPACE, "NoSpace", "The pool is full (KVS_ERR_NO_SPACE).", NULL, NULL},
    {KVS_ERR_TOO_LARGE, "TooLarge", "Value larger than the limit or the buffer (KVS_ERR_TOO_LARGE).",
     NULL, NULL},
    {KVS_ERR_TIMEOUT, "Timeout", "The operation did not finish in time (KVS_ERR_TIMEOUT).",
     &PyExc_TimeoutError, NULL},
    {KVS_ERR_CONN, "ConnectionFailed", "Cannot reach the master or a peer (KVS_ERR_CONN).",
     &PyExc_ConnectionError, NULL},
    {KVS_ERR_PROTO, "ProtocolError", "Malformed or unexpected frame (KVS_ERR_PROTO).", NULL, NULL},
    {KVS_ERR_AUTH, "AuthError", "Wrong or missing shared secret (KVS_ERR_AUTH).", NULL, NULL},
    {KVS_ERR_CONFIG, "ConfigError", "Invalid configuration (KVS_ERR_CONFIG).", &PyExc_ValueError,
     NULL},
    {KVS_ERR_NOT_REGISTERED, "NotRegistered",
     "Buffer is not inside registered memory (KVS_ERR_NOT_REGISTERED).", NULL, NULL},
    {KVS_ERR_IO, "IOFailure", "A system call failed (KVS_ERR_IO).", &PyExc_OSError, NULL},
    {KVS_ERR_CLOSED, "Closed", "The client/connector is closing or closed (KVS_ERR_CLOSED).", NULL,
     NULL},
    {KVS_ERR_BUSY, "Busy", "A queue is full; try again later (KVS_ERR_BUSY).", NULL, NULL},
    {KVS_ERR_CORRUPT, "Corrupt", "A stored object failed its header/length check (KVS_ERR_CORRUPT).",
     NULL, NULL},
    {KVS_ERR_UNAVAILABLE, "Unavailable",
     "The segment holding the object is gone or unreachable (KVS_ERR_UNAVAILABLE).", NULL, NULL},
    {KVS_ERR_UNSUPPORTED, "Unsupported", "Not supported by this build (KVS_ERR_UNSUPPORTED).",
     &PyExc_NotImplementedError, NULL},
    {KVS_ERR_INTERNAL, "InternalError", "An internal invariant failed (KVS_ERR_INTERNAL).", NULL,
     NULL},
    {KVS_ERR_CUDA, "CudaError", "A CUDA call failed (KVS_ERR_CUDA).", NULL, NULL},
    {KVS_ERR_LAYOUT, "LayoutError", "No KV layout registered, or block id out of range "
                                    "(KVS_ERR_LAYOUT).", NULL, NULL},
    {KVS_ERR_EARLY, "OpenedEarly", "A GPU gate opened before its load finished: work queued "
                                   "after it must be redone (KVS_ERR_EARLY).", NULL, NULL},
};
#define N_ERRDEFS (sizeof(errdefs) / sizeof(errdefs[0]))

/* Creates the class of errdefs[i] (a subclass of Error and of its builtin
 * base, with .code set), adds it and its code constant to the module. */
static int add_error_class(PyObject *m, struct errdef *d) {
    PyObject *bases = d->extra_base ? PyTuple_Pack(2, Error, *d->extra_base)
                                    : PyTuple_Pack(1, Error);
    if (!bases)
        return -1;
    char full[96];
    snprintf(full, sizeof full, "kvshelf.%s", d->pyname);
    PyObject *cls = PyErr_NewExceptionWithDoc(full, d->doc, bases, NULL);
    Py_DECREF(bases);
    if (!cls)
        return -1;
    PyObject *code = PyLong_FromLong(d->code);
    if (!code || PyObject_SetAttrString(cls, "code", code) < 0) {
        Py_XDECREF(code);
        Py_DECREF(cls);
        return -1;
    }
    Py_DECREF(code);
    d->cls = cls; /* module keeps a ref below; this one is ours */
    if (PyModule_AddObjectRef(m, d->pyname, cls) < 0)
        return -1;
    char cname[64];
    snprintf(cname, sizeof cname, "%s", kvs_errname(d->code));
    const char *short_name = strncmp(cname, "KVS_", 4) == 0 ? cname + 4 : cname;
    return PyModule_AddIntConstant(m, short_name, d->code);
}

int errors_init(PyObject *m) {
    PyObject *dict = Py_BuildValue("{s:O,s:O}", "code", Py_None, "name", Py_None);
    if (!dict)
        return -1;
    Error = PyErr_NewExceptionWithDoc("kvshelf.Error",
                                      "Base of kvshelf errors: .code (negative int), .name "
                                      "('KVS_ERR_...'), str() is the C message.",
                                      NULL, dict);
    Py_DECREF(dict);
    if (!Error || PyModule_AddObjectRef(m, "Error", Error) < 0)
        return -1;
    for (size_t i = 0; i < N_ERRDEFS; i++)
        if (add_error_class(m, &errdefs[i]) < 0)
            return -1;
    return 0;
}

static PyObject *error_class(int code) {
    for (size_t i = 0; i < N_ERRDEFS; i++)
        if (errdefs[i].code == code && errdefs[i].cls)
            return errdefs[i].cls;
    return Error;
}

PyObject *raise_kvs(int code, const char *what, const char *detail) {
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
