/* ReaderWait.wait in C (etwmon/sources/bpf/_wait.py): what a reader blocked in Monitor.wait() does for each batch
 * the kernel's pacer wakes it for, without a Python frame of its own. It does what the Python method (ReaderWait.
 * _wait) does, step for step, on the same attributes:
 *   - the reader joins the source's list of waiting readers (``_waiting``) and raises ``entries``;
 *   - ``_sleeping()`` (the source's deferred work, before this thread sleeps);
 *   - epoll_wait on the waiter's epoll object (its descriptor read from it: a closed one raises as its poll()
 *     would), without the GIL; EINTR runs the signal handlers and waits on for what is left of ``timeout``;
 *   - ``wakeups`` counts a wake-up by one of the ``_own`` descriptors (the rings, the monitor's flag);
 *   - ``_drain(notify)`` takes what the rings hold;
 *   - the reader leaves the list, whatever happened; the result: whether another descriptor woke it.
 */
#include "_speedups.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <sys/epoll.h>
#include <time.h>

static PyObject *s_waiter, *s_watch, *s_waiting, *s_entries, *s_sleeping, *s_ep, *s_fileno, *s_own, *s_wakeups,
    *s_drain, *s_notify, *s_remove;

int reader_init(void)
{
    struct {
        PyObject **at;
        const char *name;
    } names[] = {
        {&s_waiter, "_waiter"}, {&s_watch, "watch"}, {&s_waiting, "_waiting"}, {&s_entries, "entries"},
        {&s_sleeping, "_sleeping"}, {&s_ep, "_ep"}, {&s_fileno, "fileno"}, {&s_own, "_own"},
        {&s_wakeups, "wakeups"}, {&s_drain, "_drain"}, {&s_notify, "notify"}, {&s_remove, "remove"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if ((*names[i].at = PyUnicode_InternFromString(names[i].name)) == NULL)
            return -1;
    return 0;
}

/* obj.name += 1 (under the GIL, as the Python code's += is). */
static int bump(PyObject *obj, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    PyObject *one = PyLong_FromLong(1);
    PyObject *sum = one == NULL ? NULL : PyNumber_Add(v, one);
    Py_DECREF(v);
    Py_XDECREF(one);
    if (sum == NULL)
        return -1;
    int r = PyObject_SetAttr(obj, name, sum);
    Py_DECREF(sum);
    return r;
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + t.tv_nsec / 1e9;
}

/* The epoll wait: the events' count, or -1 with an error set. ``seconds`` < 0: no limit. */
static int sleep_on(int epfd, double seconds, struct epoll_event *events, int room)
{
    double deadline = seconds < 0 ? 0 : now() + seconds;
    for (;;) {
        int ms;
        if (seconds < 0) {
            ms = -1;
        } else {
            double left = ceil(seconds * 1000.0); /* rounded up, as select.epoll.poll does */
            ms = left >= INT_MAX ? INT_MAX : (int)left;
        }
        int n, err;
        Py_BEGIN_ALLOW_THREADS
        n = epoll_wait(epfd, events, room, ms);
        err = errno;
        Py_END_ALLOW_THREADS
        if (n >= 0)
            return n;
        if (err != EINTR) {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        if (PyErr_CheckSignals() < 0)
            return -1;
        if (seconds >= 0) {
            seconds = deadline - now();
            if (seconds < 0)
                seconds = 0;
        }
    }
}

/* The steps between joining and leaving the list: Py_True/Py_False, or NULL with an error set. */
static PyObject *wait_body(PyObject *self, double seconds)
{
    PyObject *r = PyObject_CallMethodNoArgs(self, s_sleeping);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    PyObject *waiter = PyObject_GetAttr(self, s_waiter);
    PyObject *ep = waiter == NULL ? NULL : PyObject_GetAttr(waiter, s_ep);
    Py_XDECREF(waiter);
    PyObject *fd = ep == NULL ? NULL : PyObject_CallMethodNoArgs(ep, s_fileno); /* ValueError once closed */
    Py_XDECREF(ep);
    if (fd == NULL)
        return NULL;
    int epfd = PyLong_AsLong(fd);
    Py_DECREF(fd);
    if (epfd == -1 && PyErr_Occurred())
        return NULL;
    struct epoll_event events[64];
    int n = sleep_on(epfd, seconds, events, 64);
    if (n < 0)
        return NULL;
    PyObject *own = PyObject_GetAttr(self, s_own);
    if (own == NULL)
        return NULL;
    int mine = 0, others = 0;
    for (int i = 0; i < n; i++) {
        PyObject *key = PyLong_FromLong(events[i].data.fd); /* select.epoll registers each fd as its data */
        int in = key == NULL ? -1 : PySequence_Contains(own, key);
        Py_XDECREF(key);
        if (in < 0) {
            Py_DECREF(own);
            return NULL;
        }
        if (in)
            mine = 1;
        else
            others = 1;
    }
    Py_DECREF(own);
    if (mine && bump(self, s_wakeups) < 0)
        return NULL;
    PyObject *notify = PyObject_GetAttr(self, s_notify);
    if (notify == NULL)
        return NULL;
    r = PyObject_CallMethodOneArg(self, s_drain, notify);
    Py_DECREF(notify);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    return PyBool_FromLong(others);
}

static PyObject *reader_wait(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "wait(timeout, also=())");
        return NULL;
    }
    double seconds = -1;
    if (args[0] != Py_None) {
        seconds = PyFloat_AsDouble(args[0]);
        if (seconds == -1 && PyErr_Occurred())
            return NULL;
        if (isnan(seconds)) {
            PyErr_SetString(PyExc_ValueError, "Invalid value NaN (not a number)");
            return NULL;
        }
        if (seconds < 0)
            seconds = 0;
    }
    if (nargs == 2) {
        int some = PyObject_IsTrue(args[1]);
        if (some < 0)
            return NULL;
        if (some) {
            PyObject *waiter = PyObject_GetAttr(self, s_waiter);
            PyObject *r = waiter == NULL ? NULL : PyObject_CallMethodOneArg(waiter, s_watch, args[1]);
            Py_XDECREF(waiter);
            if (r == NULL)
                return NULL;
            Py_DECREF(r);
        }
    }
    PyObject *waiting = PyObject_GetAttr(self, s_waiting);
    if (waiting == NULL)
        return NULL;
    if (PyList_Check(waiting) ? PyList_Append(waiting, self) < 0 : 1) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "ReaderWait._waiting must be a list");
        Py_DECREF(waiting);
        return NULL;
    }
    PyObject *result = bump(self, s_entries) < 0 ? NULL : wait_body(self, seconds);
    /* finally: leave the list, keeping an error already raised */
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *r = PyObject_CallMethodOneArg(waiting, s_remove, self);
    Py_DECREF(waiting);
    if (r == NULL) {
        if (type != NULL) {
            PyErr_Clear();
            PyErr_Restore(type, value, tb);
        }
        Py_XDECREF(result);
        return NULL;
    }
    Py_DECREF(r);
    PyErr_Restore(type, value, tb);
    return result;
}

static PyMethodDef wait_def = {
    "wait", (PyCFunction)(void (*)(void))reader_wait, METH_FASTCALL,
    "wait(timeout, also=()) -> bool: sleep for the kernel's wake-up (or the monitor's flag, or timeout seconds; "
    "None: no limit), then take what the rings hold; also: descriptors to wake for besides; True when one of them "
    "did. ReaderWait._wait in C (etwmon/_reader.c).",
};

int reader_add_methods(PyObject *module)
{
    PyObject *d = PyDescr_NewMethod(&PyBaseObject_Type, &wait_def);
    if (d == NULL || PyModule_AddObject(module, "reader_wait_method", d) < 0) {
        Py_XDECREF(d);
        return -1;
    }
    return 0;
}
