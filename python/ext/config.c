/* Configuration from Python (see config.h). */
#include "config.h"

#include "errors.h"

static PyObject *json_dumps(PyObject *obj) {
    PyObject *json = PyImport_ImportModule("json");
    if (!json)
        return NULL;
    PyObject *s = PyObject_CallMethod(json, "dumps", "O", obj);
    Py_DECREF(json);
    return s;
}

/* 0, or -1 raising the error of a configuration step that returned rc. */
static int step(int rc, const char *what, const char *err) {
    if (rc >= 0)
        return 0;
    raise_kvs(rc, what, err);
    return -1;
}

/* Applies JSON text to cfg. */
static int load_json(kvs_config *cfg, const char *txt) {
    char err[ERRBUF] = "";
    return step(kvs_config_load_json(cfg, txt, err, sizeof err), "configuration", err);
}

/* Applies a dict (through json.dumps) to cfg. */
static int load_dict(kvs_config *cfg, PyObject *d) {
    PyObject *s = json_dumps(d);
    if (!s)
        return -1;
    const char *txt = PyUnicode_AsUTF8(s);
    int r = txt ? load_json(cfg, txt) : -1;
    Py_DECREF(s);
    return r;
}

static int load_env(kvs_config *cfg) {
    char err[ERRBUF] = "";
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = kvs_config_load_env(cfg, err, sizeof err);
    Py_END_ALLOW_THREADS
    return step(rc, "configuration from the environment", err);
}

/* Applies a JSON file (path: str / os.PathLike) to cfg. */
static int load_file(kvs_config *cfg, PyObject *config) {
    PyObject *path = NULL;
    if (!PyUnicode_FSConverter(config, &path))
        return -1;
    const char *p = PyBytes_AS_STRING(path);
    char err[ERRBUF] = "";
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = kvs_config_load_file(cfg, p, err, sizeof err);
    Py_END_ALLOW_THREADS
    int r = step(rc, p, err);
    Py_DECREF(path);
    return r;
}

/* Applies the `config` argument (not None): dict, JSON text or path. */
static int load_config_arg(kvs_config *cfg, PyObject *config) {
    if (PyDict_Check(config))
        return load_dict(cfg, config);
    if (PyUnicode_Check(config)) {
        const char *txt = PyUnicode_AsUTF8(config);
        if (!txt)
            return -1;
        const char *q = txt;
        while (*q == ' ' || *q == '\t' || *q == '\n' || *q == '\r')
            q++;
        if (*q == '{')
            return load_json(cfg, txt);
    }
    return load_file(cfg, config);
}

int build_config(PyObject *config, PyObject *kwargs, int use_env, kvs_config *cfg) {
    kvs_config_init(cfg);
    if (use_env && load_env(cfg) < 0)
        return -1;
    if (config && config != Py_None && load_config_arg(cfg, config) < 0)
        return -1;
    if (kwargs && PyDict_Check(kwargs) && PyDict_Size(kwargs) > 0 && load_dict(cfg, kwargs) < 0)
        return -1;
    char err[ERRBUF] = "";
    return step(kvs_config_validate(cfg, err, sizeof err), "configuration", err);
}

int split_kwargs(PyObject *kwds, const char *const *own, PyObject **kw, PyObject **mine) {
    *kw = kwds ? PyDict_Copy(kwds) : PyDict_New();
    *mine = *kw ? PyDict_New() : NULL;
    if (!*mine)
        goto fail;
    for (const char *const *o = own; *o; o++) {
        PyObject *v = PyDict_GetItemString(*kw, *o);
        if (v && (PyDict_SetItemString(*mine, *o, v) < 0 || PyDict_DelItemString(*kw, *o) < 0))
            goto fail;
    }
    return 0;
fail:
    Py_CLEAR(*kw);
    Py_CLEAR(*mine);
    return -1;
}

int config_from_call(PyObject *config, PyObject *kwds, kvs_config *cfg) {
    static const char *const own[] = {"use_env", NULL};
    PyObject *kw, *mine;
    if (split_kwargs(kwds, own, &kw, &mine) < 0)
        return -1;
    PyObject *ue = PyDict_GetItemString(mine, "use_env");
    int use_env = ue ? PyObject_IsTrue(ue) : 1;
    Py_DECREF(mine);
    int r = use_env < 0 ? -1 : build_config(config, kw, use_env, cfg);
    Py_DECREF(kw);
    return r;
}

PyObject *config_to_dict(const kvs_config *c) {
    return Py_BuildValue("{s:s,s:s,s:s,s:s,s:s,s:K,s:K,s:i,s:s,s:O}", "local_hostname",
                         c->local_hostname, "metadata_server", c->metadata_server,
                         "master_server_address", c->master_server_address, "protocol",
                         c->protocol, "device_name", c->device_name, "global_segment_size",
                         (unsigned long long)c->global_segment_size, "local_buffer_size",
                         (unsigned long long)c->local_buffer_size, "timeout_ms", c->timeout_ms,
                         "runtime_dir", c->runtime_dir, "secret_set",
                         c->secret[0] ? Py_True : Py_False);
}
