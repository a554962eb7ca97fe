/* Shared by every source of the extension kvshelf._kvshelf (python/ext/):
 * the includes, small macros, the busy guard and the three types.
 * module.c says what the module offers and where each part lives. */
#ifndef KVS_PY_EXT_H
#define KVS_PY_EXT_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

#include "kvshelf/kvshelf.h"

/* Size of the message buffers handed to libkvshelf. */
#define ERRBUF 512

/* A METH_VARARGS | METH_KEYWORDS function as a PyMethodDef entry. */
#define METH_KW(f) (PyCFunction)(void (*)(void))(f)

/* The busy guard (busy.c): a call that runs without the GIL counts itself in
 * the object's `busy` (under the GIL); close() and dealloc wait for 0. */
void wait_not_busy(volatile int *busy);

/* Runs the statement without the GIL, counted in obj->busy. It must use only
 * C state copied beforehand (e.g. `kvs_client *c = self->c`), never obj. */
#define WITHOUT_GIL(obj, ...)                                                                      \
    do {                                                                                           \
        (obj)->busy++;                                                                             \
        Py_BEGIN_ALLOW_THREADS                                                                     \
        __VA_ARGS__;                                                                               \
        Py_END_ALLOW_THREADS                                                                       \
        (obj)->busy--;                                                                             \
    } while (0)

/* The types (client.c, connector.c, task.c, cuda_copier.c); module.c readies them. */
extern PyTypeObject ClientType;
extern PyTypeObject ConnectorType;
extern PyTypeObject TaskType;
extern PyTypeObject CudaCopierType;

#endif
