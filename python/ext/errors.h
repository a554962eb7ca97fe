/* The exception hierarchy: kvshelf.Error and one subclass per KVS_ERR_* code
 * (NotFound, NoSpace, ConfigError, ...), each carrying .code (negative int),
 * .name ("KVS_ERR_...") and the C message. */
#ifndef KVS_PY_ERRORS_H
#define KVS_PY_ERRORS_H

#include "ext.h"

/* Creates kvshelf.Error and its subclasses and adds them to the module with
 * the code constants (ERR_NOT_FOUND, ...). 0, or -1 with an exception. */
int errors_init(PyObject *module);

/* Raises the exception for `code` with "what: NAME: strerror" or, with a
 * detail, "what: NAME: detail (strerror)". Returns NULL. */
PyObject *raise_kvs(int code, const char *what, const char *detail);

#endif
