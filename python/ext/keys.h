/* Keys and block hashes from Python: bytes-like or str (UTF-8), 1..maxlen
 * bytes (KVS_KEY_MAX for store keys, KVS_HASH_MAX for connector hashes). */
#ifndef KVS_PY_KEYS_H
#define KVS_PY_KEYS_H

#include "ext.h"

/* A list of keys copied into one arena (stable while the GIL is released). */
typedef struct keyvec {
    kvs_key *keys;
    char *arena;
    size_t n;
} keyvec;

/* Converts a sequence of keys (or a 2-D uint8 array: one key a row) into kv; `what` names the argument in errors.
 * 0, or -1 with an exception (kv is then empty). */
int keyvec_from(PyObject *seq, size_t maxlen, const char *what, keyvec *kv);
void keyvec_free(keyvec *kv);

/* One key argument as (p, len), borrowed from the object (view held). */
typedef struct onekey {
    const char *p;
    Py_ssize_t len;
    Py_buffer view;
    int has_view;
} onekey;

int onekey_get(PyObject *o, size_t maxlen, onekey *k);
void onekey_release(onekey *k);

#endif
