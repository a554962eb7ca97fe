/* The Client type, shared by client.c (lifecycle and the key/value calls)
 * and client_parts.c (put_parts / get_parts). */
#ifndef KVS_PY_CLIENT_H
#define KVS_PY_CLIENT_H

#include "ext.h"

typedef struct ClientObject {
    PyObject_HEAD
    kvs_client *c; /* NULL once closed */
    volatile int busy;
    kvs_config cfg;
} ClientObject;

/* Raises Closed for a call `what` on a closed client. Returns NULL. */
PyObject *client_closed(const char *what);

PyObject *Client_put_parts(ClientObject *self, PyObject *args, PyObject *kwds);
PyObject *Client_get_parts(ClientObject *self, PyObject *args, PyObject *kwds);

#endif
