/* kvshelf._kvshelf — CPython extension over libkvshelf (client.h, connector.h).
 *
 * Written against the plain CPython C API (no pybind/cython). Everything that
 * may block (network round trips, copies, waits) runs with the GIL released.
 *
 * This file: module init, constants and module functions. The rest:
 *   errors.c   kvshelf.Error and its subclasses, code -> exception
 *   memory.c   tensors / buffers / integer addresses -> pointer + size
 *   keys.c     keys and block hashes -> bytes
 *   arrays.c   integer arrays in, int/bool lists out
 *   config.c   dict / JSON / path / kwargs / environment -> kvs_config
 *   busy.c     close() waits for calls running without the GIL
 *   client.c   the Client type (client_parts.c: put_parts / get_parts)
 *   connector.c, task.c   the Connector and Task types (connector_parts.c:
 *              dump_parts / load_parts)
 *   cuda_copier.c  the CudaCopier type: kvshelf's CUDA copies for the
 *              Mooncake store's pinned staging (Unsupported without CUDA)
 */
#include "ext.h"

#include "config.h"
#include "errors.h"

/* The int argument of strerror/errname. */
static int code_arg(PyObject *arg, int *code) {
    long c = PyLong_AsLong(arg);
    if (c == -1 && PyErr_Occurred())
        return -1;
    *code = (int)c;
    return 0;
}

static PyObject *mod_strerror(PyObject *Py_UNUSED(m), PyObject *arg) {
    int c;
    return code_arg(arg, &c) < 0 ? NULL : PyUnicode_FromString(kvs_strerror(c));
}

static PyObject *mod_errname(PyObject *Py_UNUSED(m), PyObject *arg) {
    int c;
    return code_arg(arg, &c) < 0 ? NULL : PyUnicode_FromString(kvs_errname(c));
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
    kvs_config cfg;
    if (config_from_call(config, kwds, &cfg) < 0)
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

/* OK, KEY_MAX, HASH_MAX, __version__, the types and DEFAULTS. */
static int add_constants_and_types(PyObject *m) {
    if (PyModule_AddIntConstant(m, "OK", KVS_OK) < 0 ||
        PyModule_AddIntConstant(m, "KEY_MAX", KVS_KEY_MAX) < 0 ||
        PyModule_AddIntConstant(m, "HASH_MAX", KVS_HASH_MAX) < 0 ||
        PyModule_AddStringConstant(m, "__version__", KVSHELF_VERSION_STRING) < 0 ||
        PyModule_AddObjectRef(m, "Client", (PyObject *)&ClientType) < 0 ||
        PyModule_AddObjectRef(m, "Connector", (PyObject *)&ConnectorType) < 0 ||
        PyModule_AddObjectRef(m, "Task", (PyObject *)&TaskType) < 0 ||
        PyModule_AddObjectRef(m, "CudaCopier", (PyObject *)&CudaCopierType) < 0)
        return -1;
    PyObject *defs = Py_BuildValue("{s:K,s:K,s:i,s:i,s:i}", "global_segment_size",
                                   (unsigned long long)KVS_DEFAULT_GLOBAL_SEGMENT_SIZE,
                                   "local_buffer_size",
                                   (unsigned long long)KVS_DEFAULT_LOCAL_BUFFER_SIZE, "timeout_ms",
                                   KVS_DEFAULT_TIMEOUT_MS, "master_port", KVS_DEFAULT_MASTER_PORT,
                                   "metadata_port", KVS_DEFAULT_METADATA_PORT);
    if (!defs || PyModule_AddObject(m, "DEFAULTS", defs) < 0) {
        Py_XDECREF(defs);
        return -1;
    }
    return 0;
}

PyMODINIT_FUNC PyInit__kvshelf(void) {
    PyObject *m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    if (PyType_Ready(&ClientType) < 0 || PyType_Ready(&ConnectorType) < 0 ||
        PyType_Ready(&TaskType) < 0 || PyType_Ready(&CudaCopierType) < 0 || errors_init(m) < 0 ||
        add_constants_and_types(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
