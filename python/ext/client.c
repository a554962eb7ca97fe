/* The Client type: open/close and the key/value calls (put, get, exists,
 * remove, their batches, memory registration, stats). put_parts/get_parts
 * are in client_parts.c. Every call that may block runs without the GIL. */
#include "client.h"

#include <stdlib.h>
#include <string.h>

#include "arrays.h"
#include "config.h"
#include "errors.h"
#include "keys.h"
#include "memory.h"

PyObject *client_closed(const char *what) {
    return raise_kvs(KVS_ERR_CLOSED, what, "the client is closed");
}

static int Client_init(ClientObject *self, PyObject *args, PyObject *kwds) {
    PyObject *config = Py_None;
    if (!PyArg_ParseTuple(args, "|O:Client", &config))
        return -1;
    if (self->c) {
        PyErr_SetString(PyExc_RuntimeError, "Client already open");
        return -1;
    }
    kvs_config cfg;
    if (config_from_call(config, kwds, &cfg) < 0)
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

static PyObject *Client_handle(ClientObject *self, void *Py_UNUSED(c)) {
    return PyLong_FromVoidPtr(self->c);
}

/* put(key, value, size=None) / put_from (value inside registered memory). */
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
    if (membuf_get_host(value, size, 0, what, &m) < 0) {
        onekey_release(&k);
        return NULL;
    }
    if (!self->c) {
        membuf_release(&m);
        onekey_release(&k);
        return client_closed(what);
    }
    int rc;
    kvs_client *c = self->c;
    WITHOUT_GIL(self, rc = from ? kvs_put_from(c, k.p, (uint32_t)k.len, m.ptr, m.len)
                                : kvs_put(c, k.p, (uint32_t)k.len, m.ptr, m.len));
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

/* get(key) -> bytes of unknown size: a modest buffer, then the exact size. */
static PyObject *client_get_bytes(ClientObject *self, onekey *k, const char *what) {
    kvs_client *c = self->c;
    int rc = KVS_OK;
    uint64_t got = 0;
    uint64_t cap = 65536;
    PyObject *out = NULL;
    for (int attempt = 0; attempt < 4; attempt++) {
        out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)cap);
        if (!out)
            return NULL;
        char *p = PyBytes_AS_STRING(out);
        WITHOUT_GIL(self, rc = kvs_get(c, k->p, (uint32_t)k->len, p, cap, &got));
        if (rc == KVS_ERR_TOO_LARGE && got > cap) {
            Py_DECREF(out);
            out = NULL;
            cap = got;
            continue;
        }
        break;
    }
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

/* get(key, buf[, size]) / get_into (buf inside registered memory) -> int
 * (bytes stored). */
static PyObject *client_get_buf(ClientObject *self, onekey *k, PyObject *buf, PyObject *size,
                                int into, const char *what) {
    membuf m;
    if (membuf_get_host(buf, size, 1, what, &m) < 0)
        return NULL;
    if (!self->c) { /* closed by another thread while reading buf */
        membuf_release(&m);
        return client_closed(what);
    }
    kvs_client *c = self->c;
    int rc;
    uint64_t got = 0;
    WITHOUT_GIL(self, rc = into ? kvs_get_into(c, k->p, (uint32_t)k->len, m.ptr, m.len, &got)
                                : kvs_get(c, k->p, (uint32_t)k->len, m.ptr, m.len, &got));
    membuf_release(&m);
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
    PyObject *res;
    if (!self->c)
        res = client_closed(what);
    else if (buf == Py_None)
        res = client_get_bytes(self, &k, what);
    else
        res = client_get_buf(self, &k, buf, size, into, what);
    onekey_release(&k);
    return res;
}

static PyObject *Client_get(ClientObject *self, PyObject *args, PyObject *kwds) {
    return client_get_common(self, args, kwds, 0);
}

static PyObject *Client_get_into(ClientObject *self, PyObject *args, PyObject *kwds) {
    return client_get_common(self, args, kwds, 1);
}

/* exists(key) -> bool / remove(key) -> None. */
static PyObject *client_key_common(ClientObject *self, PyObject *key, int remove) {
    const char *what = remove ? "remove" : "exists";
    onekey k;
    if (onekey_get(key, KVS_KEY_MAX, &k) < 0)
        return NULL;
    if (!self->c) {
        onekey_release(&k);
        return client_closed(what);
    }
    kvs_client *c = self->c;
    int rc;
    WITHOUT_GIL(self, rc = remove ? kvs_remove(c, k.p, (uint32_t)k.len)
                                  : kvs_exists(c, k.p, (uint32_t)k.len));
    onekey_release(&k);
    if (rc < 0)
        return raise_kvs(rc, what, NULL);
    if (remove)
        Py_RETURN_NONE;
    return PyBool_FromLong(rc > 0);
}

static PyObject *Client_exists(ClientObject *self, PyObject *key) {
    return client_key_common(self, key, 0);
}

static PyObject *Client_remove(ClientObject *self, PyObject *key) {
    return client_key_common(self, key, 1);
}

/* exists_batch(keys) -> list[bool] / remove_batch(keys) -> list[int]. */
static PyObject *client_keys_common(ClientObject *self, PyObject *keys, int remove) {
    const char *what = remove ? "remove_batch" : "exists_batch";
    keyvec kv;
    if (keyvec_from(keys, KVS_KEY_MAX, "keys", &kv) < 0)
        return NULL;
    void *out = PyMem_RawCalloc(kv.n ? kv.n : 1, remove ? sizeof(int) : 1);
    if (!out) {
        keyvec_free(&kv);
        return PyErr_NoMemory();
    }
    if (!self->c) {
        keyvec_free(&kv);
        PyMem_RawFree(out);
        return client_closed(what);
    }
    kvs_client *c = self->c;
    int rc = 0;
    if (kv.n)
        WITHOUT_GIL(self, rc = remove ? kvs_remove_batch(c, kv.keys, kv.n, out)
                                      : kvs_exists_batch(c, kv.keys, kv.n, out));
    PyObject *res = rc < 0   ? raise_kvs(rc, what, NULL)
                    : remove ? int_list(out, kv.n)
                             : bool_list(out, kv.n);
    keyvec_free(&kv);
    PyMem_RawFree(out);
    return res;
}

static PyObject *Client_exists_batch(ClientObject *self, PyObject *keys) {
    return client_keys_common(self, keys, 0);
}

static PyObject *Client_remove_batch(ClientObject *self, PyObject *keys) {
    return client_keys_common(self, keys, 1);
}

/* The per-item results of put_batch/get_batch as a list. */
static PyObject *batch_results(const kvs_item *items, size_t n, int is_get) {
    PyObject *res = PyList_New((Py_ssize_t)n);
    if (!res)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        PyObject *x;
        if (items[i].status < 0)
            x = PyLong_FromLong(items[i].status);
        else
            x = is_get ? PyLong_FromUnsignedLongLong(items[i].size) : PyLong_FromLong(0);
        if (!x) {
            Py_DECREF(res);
            return NULL;
        }
        PyList_SET_ITEM(res, (Py_ssize_t)i, x);
    }
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
        if (membuf_get_host(o, sz, is_get, what, &mb[i]) < 0)
            goto out;
        items[i].key = kv.keys[i];
        items[i].buf = mb[i].ptr;
        items[i].len = mb[i].len;
    }
    if (!self->c) {
        client_closed(what);
        goto out;
    }
    kvs_client *c = self->c;
    int rc = 0;
    if (n)
        WITHOUT_GIL(self, rc = is_get ? kvs_get_batch(c, items, n) : kvs_put_batch(c, items, n));
    res = rc < 0 ? raise_kvs(rc, what, NULL) : batch_results(items, n, is_get);
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
        return client_closed("register_memory");
    kvs_client *c = self->c;
    int rc;
    WITHOUT_GIL(self, rc = kvs_register_memory(c, m.ptr, m.len));
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
        return client_closed("unregister_memory");
    kvs_client *c = self->c;
    int rc;
    WITHOUT_GIL(self, rc = kvs_unregister_memory(c, m.ptr));
    if (rc < 0)
        return raise_kvs(rc, "unregister_memory", NULL);
    Py_RETURN_NONE;
}

/* Reads up to `want` first bytes of the object of key into buf (*got of
 * them). Runs without the GIL. */
static int read_head(kvs_client *c, const kvs_key *key, char *buf, uint64_t want, uint64_t *got) {
    kvs_slot slot;
    memset(&slot, 0, sizeof slot);
    int rc = kvs_acquire_batch(c, key, 1, &slot);
    if (rc < 0)
        return rc;
    rc = slot.status;
    if (rc == KVS_OK) {
        *got = slot.size < want ? slot.size : want;
        rc = kvs_slot_read(c, &slot, 0, buf, *got);
        kvs_release_batch(c, &slot, 1);
    }
    return rc;
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
        return client_closed("read_header");
    }
    kvs_client *c = self->c;
    kvs_key kk = {k.p, (uint32_t)k.len};
    PyObject *out = PyBytes_FromStringAndSize(NULL, want);
    if (!out) {
        onekey_release(&k);
        return NULL;
    }
    char *buf = PyBytes_AS_STRING(out);
    int rc;
    uint64_t sz = 0;
    WITHOUT_GIL(self, rc = read_head(c, &kk, buf, (uint64_t)want, &sz));
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
        return client_closed("stats");
    kvs_client *c = self->c;
    char *json = NULL;
    int rc;
    WITHOUT_GIL(self, rc = kvs_client_stats_json(c, &json));
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
        return client_closed("counters");
    kvs_client_counters k;
    memset(&k, 0, sizeof k);
    kvs_client_get_counters(self->c, &k);
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K}", "puts",
                         (unsigned long long)k.puts,
                         "gets", (unsigned long long)k.gets, "hits", (unsigned long long)k.hits,
                         "misses", (unsigned long long)k.misses, "errors",
                         (unsigned long long)k.errors, "reconnects",
                         (unsigned long long)k.reconnects, "bytes_put",
                         (unsigned long long)k.bytes_put, "bytes_got",
                         (unsigned long long)k.bytes_got, "early_kept",
                         (unsigned long long)k.early_kept, "early_wasted",
                         (unsigned long long)k.early_wasted);
}

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

PyTypeObject ClientType = {
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
