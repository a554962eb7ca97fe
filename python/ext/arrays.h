/* Integer arrays between Python and C: nested sequences or buffers (numpy
 * arrays) of non-negative integers in, lists of ints or bools out. */
#ifndef KVS_PY_ARRAYS_H
#define KVS_PY_ARRAYS_H

#include "ext.h"

/* Converts a 1-D or 2-D array of non-negative integers (nested sequences, or
 * a buffer such as a numpy array of any integer type) into a row-major
 * uint64 array (PyMem_RawFree it). rows and cols describe the shape (cols = 1
 * and is_2d = 0 for 1-D input). `what` names the argument in errors. */
int u64_array_from(PyObject *obj, const char *what, uint64_t **out, size_t *rows, size_t *cols,
                   int *is_2d);

/* New lists of n bools (v[i] != 0) / n ints. */
PyObject *bool_list(const uint8_t *v, size_t n);
PyObject *int_list(const int *v, size_t n);

#endif
