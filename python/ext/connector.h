/* The Connector and Task types, shared by connector.c and task.c: a
 * connector keeps a list of its live tasks (under the GIL) so that close()
 * can wait for them or cancel them. */
#ifndef KVS_PY_CONNECTOR_H
#define KVS_PY_CONNECTOR_H

#include "ext.h"

typedef struct TaskObject TaskObject;

typedef struct ConnectorObject {
    PyObject_HEAD
    kvs_connector *c; /* NULL once closed */
    volatile int busy;
    int device;
    int layout_set;
    TaskObject *tasks; /* live tasks (under the GIL) */
    PyObject *ns;
} ConnectorObject;

struct TaskObject {
    PyObject_HEAD
    kvs_task *t;
    ConnectorObject *conn; /* strong ref */
    size_t n;
    int *results; /* set once finished */
    int finished;
    int ok;
    char kind; /* 'd' dump, 'l' load */
    volatile int busy;
    TaskObject *prev, *next;
    PyObject *keep; /* what the task's copies use (parts tasks), or NULL; dropped when done */
};

/* A new Task of n blocks ('d' dump or 'l' load), not started yet. */
TaskObject *task_new(size_t n, char kind);

/* Gives the started C task t to task and puts it on conn's list. */
void task_attach(TaskObject *task, ConnectorObject *conn, kvs_task *t);

/* Collects the results of a finished task and frees the C task. 0, or -1
 * with an exception. */
int task_collect(TaskObject *t);

/* Ends a task that will never be waited for (connector closing): collects it
 * if it finished, else cancels it with `status` for every block. */
void task_abandon(TaskObject *t, int status);

/* event: None, an int cudaEvent_t, or an object with .cuda_event -> *out
 * (NULL for None). 0, or -1 with an exception. */
int event_from(PyObject *ev, void **out);
int cuda_handle_from(PyObject *o, const char *attr, const char *what, void **out);

/* Connector.dump_parts / load_parts (connector_parts.c). */
PyObject *Connector_dump_parts(ConnectorObject *self, PyObject *args, PyObject *kwds);
PyObject *Connector_load_parts(ConnectorObject *self, PyObject *args, PyObject *kwds);

#endif
