/* ReaderWait.wait in C (etwmon/sources/bpf/_wait.py): what a reader blocked in Monitor.wait() does for each batch
 * the kernel's pacer wakes it for, without a Python frame of its own. It does what the Python method (ReaderWait.
 * _wait) does, step for step, on the same attributes:
 *   - the reader joins the source's list of waiting readers (``_waiting``) and raises ``entries``;
 *   - ``_sleeping()`` (the source's deferred work, before this thread sleeps);
 *   - epoll_wait on the waiter's epoll object (its descriptor read from it: a closed one raises as its poll()
 *     would), without the GIL; EINTR runs the signal handlers and waits on for what is left of ``timeout``;
 *   - ``wakeups`` counts a wake-up by one of the ``_own`` descriptors (the rings, the monitor's flag);
 *   - ``_drain(notify)`` takes what the rings hold: where ``_source`` is a BpfSource (not None), the common case of
 *     its ``_reader_pass`` runs here (quick_pass), with the Python method for the rest;
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
static int add_to(PyObject *obj, PyObject *name, Py_ssize_t n);

static PyObject *s_source, *s_drain_lock, *s_sink, *s_ring, *s_quick, *s_running, *s_stopping, *s_images,
    *s_lost_due, *s_decoder, *s_last_filetime, *s_events, *s_mover, *s_records, *s_position_words, *s_data,
    *s_mask, *s_drain_took, *s_report_lost, *s_acquire, *s_release, *s_notify_call;

int reader_init(void)
{
    static const struct name_slot names[] = {
        {&s_waiter, "_waiter"}, {&s_watch, "watch"}, {&s_waiting, "_waiting"}, {&s_entries, "entries"},
        {&s_sleeping, "_sleeping"}, {&s_ep, "_ep"}, {&s_fileno, "fileno"}, {&s_own, "_own"},
        {&s_wakeups, "wakeups"}, {&s_drain, "_drain"}, {&s_notify, "notify"}, {&s_remove, "remove"},
        {&s_source, "_source"}, {&s_drain_lock, "_drain_lock"}, {&s_sink, "_sink"}, {&s_ring, "_ring"},
        {&s_quick, "_quick"}, {&s_running, "_running"}, {&s_stopping, "_stopping"}, {&s_images, "_images"},
        {&s_lost_due, "_lost_due"}, {&s_decoder, "_decoder"}, {&s_last_filetime, "last_filetime"},
        {&s_events, "events"}, {&s_mover, "_mover"}, {&s_records, "records"},
        {&s_position_words, "position_words"}, {&s_data, "data"}, {&s_mask, "mask"},
        {&s_drain_took, "_drain_took"}, {&s_report_lost, "_report_lost"}, {&s_acquire, "acquire"},
        {&s_release, "release"}, {&s_notify_call, "notify"},
    };
    return intern_names(names, sizeof names / sizeof names[0]);
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


/* obj.name += n (under the GIL, as the Python code's += is). */
static int add_to(PyObject *obj, PyObject *name, Py_ssize_t n)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    PyObject *k = PyLong_FromSsize_t(n);
    PyObject *sum = k == NULL ? NULL : PyNumber_Add(v, k);
    Py_DECREF(v);
    Py_XDECREF(k);
    if (sum == NULL)
        return -1;
    int r = PyObject_SetAttr(obj, name, sum);
    Py_DECREF(sum);
    return r;
}

static int truth(PyObject *obj, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

/* The pass under the source's drain lock (see quick_pass): the records taken, -2 when it is not the common case,
 * -1 with an error set. */
static Py_ssize_t quick_locked(PyObject *src, PyObject *notify)
{
    PyObject *sink = NULL, *ring = NULL, *quick = NULL, *images = NULL, *decoder = NULL, *words = NULL,
             *data = NULL, *table = NULL;
    Py_ssize_t n = -1;
    sink = PyObject_GetAttr(src, s_sink);
    ring = sink == NULL ? NULL : PyObject_GetAttr(src, s_ring);
    quick = ring == NULL ? NULL : PyObject_GetAttr(src, s_quick);
    images = quick == NULL ? NULL : PyObject_GetAttr(src, s_images);
    if (images == NULL)
        goto done;
    int running = truth(src, s_running), stopping = running < 0 ? -1 : truth(src, s_stopping);
    if (stopping < 0)
        goto done;
    if (ring == Py_None || sink == Py_None || !running || stopping) {
        n = 0;
        goto done;
    }
    PyObject *due = PyObject_GetAttr(src, s_lost_due);
    double lost_due = due == NULL ? -1 : PyFloat_AsDouble(due);
    Py_XDECREF(due);
    if (lost_due == -1 && PyErr_Occurred())
        goto done;
    if (!PyTuple_Check(quick) || PyTuple_GET_SIZE(quick) != 2 || images != Py_None || now() >= lost_due) {
        n = -2; /* a loss count due, image loads, no C pass for this sink: the Python pass */
        goto done;
    }
    PyObject *checked = PyTuple_GET_ITEM(quick, 0), *seeded = PyTuple_GET_ITEM(quick, 1);
    decoder = PyObject_GetAttr(src, s_decoder);
    words = decoder == NULL ? NULL : PyObject_GetAttr(ring, s_position_words);
    data = words == NULL ? NULL : PyObject_GetAttr(ring, s_data);
    if (data == NULL)
        goto done;
    long long floor;
    unsigned long long mask;
    PyObject *v = PyObject_GetAttr(decoder, s_last_filetime);
    floor = v == NULL ? -1 : PyLong_AsLongLong(v);
    Py_XDECREF(v);
    if (floor == -1 && PyErr_Occurred())
        goto done;
    v = PyObject_GetAttr(ring, s_mask);
    mask = v == NULL ? (unsigned long long)-1 : PyLong_AsUnsignedLongLong(v);
    Py_XDECREF(v);
    if (mask == (unsigned long long)-1 && PyErr_Occurred())
        goto done;
    if (!PyTuple_Check(words) || PyTuple_GET_SIZE(words) != 2) {
        PyErr_SetString(PyExc_TypeError, "the ring's position_words must be a pair");
        goto done;
    }
    table = seeded == Py_None ? Py_NewRef(Py_None) : PyObject_CallNoArgs(seeded);
    if (table == NULL)
        goto done;
    struct walked w;
    unsigned long long prod = 0;
    int got = drain_pass(PyTuple_GET_ITEM(words, 0), PyTuple_GET_ITEM(words, 1), data, mask, 0, floor, table,
                         checked, &prod, &w);
    if (got <= 0) {
        n = got;
        goto done;
    }
    if (w.raised || w.skipped || w.stop >= 0) { /* the rest of the bookkeeping, and what follows, in Python */
        PyObject *took = Py_BuildValue("KKnLnnL", w.cons, prod, w.count, w.floor, w.raised, w.skipped, w.stop);
        PyObject *r = took == NULL ? NULL
                                   : PyObject_CallMethodObjArgs(src, s_drain_took, sink, checked, ring, Py_False,
                                                                took, NULL);
        Py_XDECREF(took);
        n = r == NULL ? -1 : PyLong_AsSsize_t(r);
        Py_XDECREF(r);
        if (n == -1)
            goto done;
        r = PyObject_CallMethodObjArgs(src, s_report_lost, sink, Py_False, NULL);
        int reported = r == NULL ? -1 : PyObject_IsTrue(r);
        Py_XDECREF(r);
        if (reported < 0) {
            n = -1;
            goto done;
        }
        n += reported;
    } else {
        PyObject *ft = PyLong_FromLongLong(w.floor);
        int bad = ft == NULL || PyObject_SetAttr(decoder, s_last_filetime, ft) < 0;
        Py_XDECREF(ft);
        PyObject *mover = bad ? NULL : PyObject_GetAttr(src, s_mover);
        if (mover == NULL || add_to(decoder, s_events, w.count) < 0 || add_to(mover, s_records, w.count) < 0) {
            Py_XDECREF(mover);
            goto done;
        }
        Py_DECREF(mover);
        n = w.count;
    }
    if (n) {
        int wake = PyObject_IsTrue(notify);
        PyObject *r = wake <= 0 ? NULL : PyObject_CallMethodNoArgs(sink, s_notify_call);
        if (wake < 0 || (wake && r == NULL)) {
            n = -1;
            goto done;
        }
        Py_XDECREF(r);
    }
done:
    Py_XDECREF(sink);
    Py_XDECREF(ring);
    Py_XDECREF(quick);
    Py_XDECREF(images);
    Py_XDECREF(decoder);
    Py_XDECREF(words);
    Py_XDECREF(data);
    Py_XDECREF(table);
    return n;
}

/* BpfSource._reader_pass's common case (no loss count due, no image loads, a sink that takes C passes) in C, on
 * the source's attributes under its drain lock, step for step what its _drain and _drain_fast do then: the records
 * taken (a new int), or None when it is not the common case (the caller runs the Python method), or NULL with an
 * error set. */
static PyObject *quick_pass(PyObject *src, PyObject *notify)
{
    PyObject *lock = PyObject_GetAttr(src, s_drain_lock);
    if (lock == NULL)
        return NULL;
    PyObject *r = PyObject_CallMethodNoArgs(lock, s_acquire); /* waits without the GIL, as `with lock` does */
    if (r == NULL) {
        Py_DECREF(lock);
        return NULL;
    }
    Py_DECREF(r);
    Py_ssize_t n = quick_locked(src, notify);
    int released = call_keeping_error(lock, s_release, NULL);
    Py_DECREF(lock);
    if (n == -1 || released < 0)
        return NULL;
    if (n == -2)
        Py_RETURN_NONE;
    return PyLong_FromSsize_t(n);
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
    if (mine && add_to(self, s_wakeups, 1) < 0)
        return NULL;
    PyObject *notify = PyObject_GetAttr(self, s_notify);
    PyObject *src = notify == NULL ? NULL : PyObject_GetAttr(self, s_source);
    if (src == NULL) {
        Py_XDECREF(notify);
        return NULL;
    }
    r = src == Py_None ? Py_NewRef(Py_None) : quick_pass(src, notify);
    Py_DECREF(src);
    if (r == Py_None) {
        Py_DECREF(r);
        r = PyObject_CallMethodOneArg(self, s_drain, notify);
    }
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
    PyObject *result = add_to(self, s_entries, 1) < 0 ? NULL : wait_body(self, seconds);
    /* finally: leave the list, keeping an error already raised */
    int left = call_keeping_error(waiting, s_remove, self);
    Py_DECREF(waiting);
    if (left < 0) {
        Py_XDECREF(result);
        return NULL;
    }
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
    return add_method_descriptor(module, "reader_wait_method", &wait_def);
}
