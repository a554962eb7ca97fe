/* The Task type: an asynchronous dump or load started by Connector.dump/load
 * (wait, check, results, failed). */
#include "connector.h"

#include "arrays.h"
#include "errors.h"

TaskObject *task_new(size_t n, char kind) {
    TaskObject *task = PyObject_New(TaskObject, &TaskType);
    if (!task)
        return NULL;
    task->t = NULL;
    task->conn = NULL;
    task->n = n;
    task->results = NULL;
    task->finished = 0;
    task->ok = 0;
    task->kind = kind;
    task->busy = 0;
    task->prev = task->next = NULL;
    task->keep = NULL;
    return task;
}

void task_attach(TaskObject *task, ConnectorObject *conn, kvs_task *t) {
    task->t = t;
    Py_INCREF(conn);
    task->conn = conn;
    task->next = conn->tasks;
    if (conn->tasks)
        conn->tasks->prev = task;
    conn->tasks = task;
}

static void task_unlink(TaskObject *t) {
    if (!t->conn)
        return;
    if (t->prev)
        t->prev->next = t->next;
    else if (t->conn->tasks == t)
        t->conn->tasks = t->next;
    if (t->next)
        t->next->prev = t->prev;
    t->prev = t->next = NULL;
}

int task_collect(TaskObject *t) {
    if (t->finished)
        return 0;
    int *r = PyMem_RawCalloc(t->n ? t->n : 1, sizeof(int));
    if (!r) {
        PyErr_NoMemory();
        return -1;
    }
    int ok = kvs_task_results(t->t, r, t->n);
    t->results = r;
    t->ok = ok < 0 ? 0 : ok;
    if (ok < 0)
        for (size_t i = 0; i < t->n; i++)
            r[i] = ok;
    t->finished = 1;
    kvs_task_free(t->t);
    t->t = NULL;
    Py_CLEAR(t->keep);
    return 0;
}

void task_abandon(TaskObject *t, int status) {
    if (t->finished)
        return;
    if (t->t) {
        if (kvs_task_check(t->t) == 1) {
            if (task_collect(t) == 0)
                return;
            PyErr_Clear();
        }
        kvs_task_free(t->t); /* cancels it */
        t->t = NULL;
    }
    PyMem_RawFree(t->results);
    t->results = PyMem_RawCalloc(t->n ? t->n : 1, sizeof(int));
    if (t->results)
        for (size_t i = 0; i < t->n; i++)
            t->results[i] = status;
    t->ok = 0;
    t->finished = 1;
}

static void Task_dealloc(TaskObject *self) {
    wait_not_busy(&self->busy);
    if (self->t && self->keep) { /* parts tasks copy into `keep`: let them finish first */
        kvs_task *t = self->t;
        Py_BEGIN_ALLOW_THREADS
        kvs_task_wait(t, -1);
        Py_END_ALLOW_THREADS
    }
    if (self->t) {
        kvs_task_free(self->t);
        self->t = NULL;
    }
    task_unlink(self);
    PyMem_RawFree(self->results);
    Py_CLEAR(self->keep);
    Py_CLEAR(self->conn);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* wait(timeout=None) -> bool: True when finished, False on timeout. */
static PyObject *Task_wait(TaskObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"timeout", NULL};
    PyObject *to = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O", kwlist, &to))
        return NULL;
    if (self->finished)
        Py_RETURN_TRUE;
    double secs = -1;
    if (to != Py_None) {
        secs = PyFloat_AsDouble(to);
        if (secs == -1 && PyErr_Occurred())
            return NULL;
        if (secs < 0)
            secs = 0;
    }
    long long left_ms = secs < 0 ? -1 : (long long)(secs * 1000.0 + 0.5);
    for (;;) {
        if (self->finished)
            Py_RETURN_TRUE;
        if (!self->t)
            return raise_kvs(KVS_ERR_CLOSED, "Task.wait", "the task was abandoned");
        int slice = left_ms < 0 || left_ms > 100 ? 100 : (int)left_ms;
        int rc;
        kvs_task *t = self->t;
        WITHOUT_GIL(self, rc = kvs_task_wait(t, slice));
        if (rc == KVS_OK) {
            if (task_collect(self) < 0)
                return NULL;
            Py_RETURN_TRUE;
        }
        if (rc != KVS_ERR_TIMEOUT)
            return raise_kvs(rc, "Task.wait", NULL);
        if (left_ms >= 0) {
            left_ms -= slice;
            if (left_ms <= 0)
                Py_RETURN_FALSE;
        }
        if (PyErr_CheckSignals() < 0)
            return NULL;
    }
}

static PyObject *Task_check(TaskObject *self, PyObject *Py_UNUSED(a)) {
    if (self->finished)
        Py_RETURN_TRUE;
    if (!self->t)
        Py_RETURN_TRUE;
    int r = kvs_task_check(self->t);
    if (r < 0)
        return raise_kvs(r, "Task.check", NULL);
    if (r == 1) {
        if (task_collect(self) < 0)
            return NULL;
        Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}

/* Collects the task if it finished; raises Busy for `what` if it has not. */
static int task_require_finished(TaskObject *self, const char *what) {
    if (self->finished)
        return 0;
    PyObject *r = Task_check(self, NULL);
    if (!r)
        return -1;
    Py_DECREF(r);
    if (!self->finished) {
        raise_kvs(KVS_ERR_BUSY, what, "the task is still running: wait() first");
        return -1;
    }
    return 0;
}

static PyObject *Task_results(TaskObject *self, PyObject *Py_UNUSED(a)) {
    if (task_require_finished(self, "Task.results") < 0)
        return NULL;
    return int_list(self->results, self->n);
}

/* indices of blocks whose status is not OK (and, for dumps, not EXISTS) */
static PyObject *Task_failed(TaskObject *self, PyObject *Py_UNUSED(a)) {
    if (task_require_finished(self, "Task.failed") < 0)
        return NULL;
    PyObject *l = PyList_New(0);
    if (!l)
        return NULL;
    for (size_t i = 0; i < self->n; i++) {
        int s = self->results[i];
        if (s == KVS_OK || (self->kind == 'd' && s == KVS_ERR_EXISTS))
            continue;
        PyObject *x = PyLong_FromSize_t(i);
        if (!x || PyList_Append(l, x) < 0) {
            Py_XDECREF(x);
            Py_DECREF(l);
            return NULL;
        }
        Py_DECREF(x);
    }
    return l;
}

/* gpu_wait(stream=None): GPU work enqueued on `stream` afterwards waits for the task. */
static PyObject *Task_gpu_wait(TaskObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"stream", NULL};
    PyObject *so = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O", kwlist, &so))
        return NULL;
    void *stream;
    if (cuda_handle_from(so, "cuda_stream", "stream", &stream) < 0)
        return NULL;
    if (self->finished)
        Py_RETURN_NONE;
    if (!self->t)
        return raise_kvs(KVS_ERR_CLOSED, "Task.gpu_wait", "the task was abandoned");
    int rc = kvs_task_gpu_wait(self->t, stream);
    if (rc != KVS_OK)
        return raise_kvs(rc, "Task.gpu_wait", NULL);
    Py_RETURN_NONE;
}

static PyObject *Task_get_n(TaskObject *self, void *Py_UNUSED(c)) {
    return PyLong_FromSize_t(self->n);
}
static PyObject *Task_get_done(TaskObject *self, void *Py_UNUSED(c)) {
    return PyBool_FromLong(self->finished);
}
static PyObject *Task_get_ok(TaskObject *self, void *Py_UNUSED(c)) {
    if (!self->finished)
        Py_RETURN_NONE;
    return PyLong_FromLong(self->ok);
}

static const char *task_kind_name(const TaskObject *self) {
    return self->kind == 'd' ? "dump" : "load";
}

static PyObject *Task_get_kind(TaskObject *self, void *Py_UNUSED(c)) {
    return PyUnicode_FromString(task_kind_name(self));
}

static PyObject *Task_repr(TaskObject *self) {
    if (self->finished)
        return PyUnicode_FromFormat("<kvshelf.Task %s n=%zu done ok=%d>", task_kind_name(self),
                                    self->n, self->ok);
    return PyUnicode_FromFormat("<kvshelf.Task %s n=%zu running>", task_kind_name(self), self->n);
}

static PyMethodDef Task_methods[] = {
    {"wait", METH_KW(Task_wait), METH_VARARGS | METH_KEYWORDS,
     "wait(timeout=None) -> bool: True once finished, False if the timeout (seconds) passed."},
    {"check", (PyCFunction)Task_check, METH_NOARGS, "check() -> bool: finished? Never blocks."},
    {"results", (PyCFunction)Task_results, METH_NOARGS,
     "results() -> list[int]: per-block status (0 ok, NOT_FOUND miss, other errors)."},
    {"failed", (PyCFunction)Task_failed, METH_NOARGS,
     "failed() -> list[int]: indices of blocks that did not succeed."},
    {"gpu_wait", METH_KW(Task_gpu_wait), METH_VARARGS | METH_KEYWORDS,
     "gpu_wait(stream): GPU work enqueued on `stream` (a torch.cuda.Stream or an int "
     "cudaStream_t created non-blocking; the legacy default stream is refused) after this call "
     "waits, on the GPU, until the task finished; the caller is not blocked. Check results() "
     "afterwards and redo work for blocks that are not 0 (OpenedEarly: the gate opened before the "
     "copies finished). CUDA connectors only."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Task_getset[] = {
    {"n", (getter)Task_get_n, NULL, "number of blocks", NULL},
    {"done", (getter)Task_get_done, NULL, "finished and collected", NULL},
    {"ok", (getter)Task_get_ok, NULL, "blocks that succeeded (None while running)", NULL},
    {"kind", (getter)Task_get_kind, NULL, "'dump' or 'load'", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject TaskType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvshelf._kvshelf.Task",
    .tp_basicsize = sizeof(TaskObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An asynchronous dump or load started by Connector.dump/load.",
    .tp_dealloc = (destructor)Task_dealloc,
    .tp_methods = Task_methods,
    .tp_getset = Task_getset,
    .tp_repr = (reprfunc)Task_repr,
};
