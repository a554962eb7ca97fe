/* Caller memory as pointer + size. Memory arguments accept, in this order of
 * detection:
 *   - objects with data_ptr() / nbytes / is_contiguous() (torch tensors; torch
 *     is never imported here): the tensor must be contiguous;
 *   - objects with the buffer protocol (numpy arrays, bytes, bytearray,
 *     memoryview): C-contiguous, writable where the call writes;
 *   - plain integers: raw addresses (the size comes from another argument). */
#ifndef KVS_PY_MEMORY_H
#define KVS_PY_MEMORY_H

#include "ext.h"

/* One piece of caller memory. */
typedef struct membuf {
    void *ptr;
    uint64_t len;
    int is_device; /* a CUDA tensor */
    int has_view;
    Py_buffer view;
} membuf;

/* 1 if o looks like a tensor (has data_ptr and nbytes, is not an int). */
int is_tensor_like(PyObject *o);

/* Fills m from a tensor-like / buffer / integer address. `size` (may be NULL
 * or None) is required for integer addresses and, for the others, must not
 * exceed their length (then it limits the length). `what` names the argument
 * in errors. 0, or -1 with an exception (nothing held). */
int membuf_get(PyObject *o, PyObject *size, int writable, const char *what, membuf *m);

/* membuf_get for host memory only: device (CUDA) memory raises Unsupported
 * (the client moves host memory; device memory is the connector's). */
int membuf_get_host(PyObject *o, PyObject *size, int writable, const char *what, membuf *m);

/* Releases the view held by m, if any (idempotent). */
void membuf_release(membuf *m);

#endif
