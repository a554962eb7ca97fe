/* Configuration from Python: a dict of Mooncake keys, JSON text or a JSON
 * file path, keyword arguments and the KVSHELF_* environment -> kvs_config;
 * and kvs_config -> dict (secret hidden). */
#ifndef KVS_PY_CONFIG_H
#define KVS_PY_CONFIG_H

#include "ext.h"

/* config: None, dict, JSON text (str starting with '{'), or a path (str /
 * os.PathLike). kwargs: more keys (dict or NULL), applied last. use_env:
 * overlay KVSHELF_* variables (and KVSHELF_CONFIG / MOONCAKE_CONFIG_PATH)
 * first. Validates. 0, or -1 with an exception. */
int build_config(PyObject *config, PyObject *kwargs, int use_env, kvs_config *cfg);

/* Splits the keyword arguments of a call (kwds may be NULL): the names in
 * `own` (NULL-terminated) go into the new dict *mine, the rest (configuration
 * keys) into the new dict *kw. 0, or -1 with an exception (nothing to free). */
int split_kwargs(PyObject *kwds, const char *const *own, PyObject **kw, PyObject **mine);

/* build_config for a call `f(config=None, *, use_env=True, **keys)`. */
int config_from_call(PyObject *config, PyObject *kwds, kvs_config *cfg);

/* The effective configuration as a dict (secret_set instead of the secret). */
PyObject *config_to_dict(const kvs_config *c);

#endif
