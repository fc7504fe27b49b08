/* EventRing's two busiest paths in C (etwmon/ring.py): a checked batch appended, and readinto, for the common case
 * only. Each works on the EventRing's own state (its attributes, arena and slot table) under its own lock, and
 * does exactly what the Python code does then; where that code would do anything more (drop records to make
 * room, write a RecordsLost record, raise an error) or the lock is held elsewhere, it changes nothing and says so,
 * and the Python code does the whole operation.
 *
 * ring_push(ring, data, ends) -> bool: EventRing.push_checked's append when the batch fits both caps beside what
 *   the ring holds (no drop), ``ends`` the bytes of little-endian int64 ends, the last ``len(data)``.
 * ring_copy(ring, buffer) -> int or None: EventRing.readinto when no loss is waiting to be read out (no mark, no
 *   drop not yet marked): the bytes copied (0: nothing held); None when the Python code must do it.
 * ring_push_checked_method and ring_readinto_method: each of those, else the Python code, in one call: what
 *   EventRing's push_checked and readinto are, so that the common case costs no Python frame.
 */
#include "_speedups.h"

static PyObject *s_lock, *s_acquire, *s_release, *s_tail_pos, *s_head_pos, *s_head, *s_count, *s_tail_slot,
    *s_read, *s_mem, *s_endv, *s_marks, *s_dropped, *s_drops_marked, *s_head_lost, *s_max_items, *s_max_bytes,
    *s_push_checked_py, *s_readinto_py;

int ring_init(void)
{
    static const struct name_slot names[] = {
        {&s_lock, "_lock"}, {&s_acquire, "acquire"}, {&s_release, "release"}, {&s_tail_pos, "_tail_pos"},
        {&s_head_pos, "_head_pos"}, {&s_head, "_head"}, {&s_count, "_count"}, {&s_tail_slot, "_tail_slot"},
        {&s_read, "_read"}, {&s_mem, "_mem"}, {&s_endv, "_endv"}, {&s_marks, "_marks"}, {&s_dropped, "_dropped"},
        {&s_drops_marked, "_drops_marked"}, {&s_head_lost, "_head_lost"}, {&s_max_items, "max_items"},
        {&s_max_bytes, "max_bytes"}, {&s_push_checked_py, "_push_checked"},
        {&s_readinto_py, "_readinto"},
    };
    return intern_names(names, sizeof names / sizeof names[0]);
}

/* An integer attribute of the ring; -1 with an error set when it is missing or not an int. */
static int get_ll(PyObject *ring, PyObject *name, long long *out)
{
    PyObject *v = PyObject_GetAttr(ring, name);
    if (v == NULL)
        return -1;
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static int set_ll(PyObject *ring, PyObject *name, long long value)
{
    PyObject *v = PyLong_FromLongLong(value);
    if (v == NULL)
        return -1;
    int r = PyObject_SetAttr(ring, name, v);
    Py_DECREF(v);
    return r;
}

/* The ring's lock taken without blocking: 1 taken, 0 held elsewhere (the Python code then waits for it), -1 an
 * error. */
static int try_lock(PyObject *ring, PyObject **lock)
{
    *lock = PyObject_GetAttr(ring, s_lock);
    if (*lock == NULL)
        return -1;
    PyObject *got = PyObject_CallMethodOneArg(*lock, s_acquire, Py_False);
    if (got == NULL) {
        Py_CLEAR(*lock);
        return -1;
    }
    int taken = got == Py_True;
    Py_DECREF(got);
    if (!taken)
        Py_CLEAR(*lock);
    return taken;
}

/* Releases the lock; keeps an error already set (returns -1 then, or when the release itself fails). */
static int unlock(PyObject *lock, int status)
{
    int r = call_keeping_error(lock, s_release, NULL);
    Py_DECREF(lock);
    return r < 0 ? -1 : status;
}

/* The ring's arena and slot table, writable: 0, or -1 with an error set (nothing held then). */
static int views(PyObject *ring, Py_buffer *mem, Py_buffer *endv)
{
    PyObject *m = PyObject_GetAttr(ring, s_mem);
    if (m == NULL)
        return -1;
    int r = PyObject_GetBuffer(m, mem, PyBUF_WRITABLE);
    Py_DECREF(m);
    if (r < 0)
        return -1;
    PyObject *e = PyObject_GetAttr(ring, s_endv);
    if (e == NULL || PyObject_GetBuffer(e, endv, PyBUF_WRITABLE) < 0) {
        Py_XDECREF(e);
        PyBuffer_Release(mem);
        return -1;
    }
    Py_DECREF(e);
    return 0;
}

struct ring_state {
    long long cap, max_items, head, head_pos, tail_pos, tail_slot, count;
};

/* The ring's indices: 1, 0 when they are not a ring's (the Python code then), -1 with an error set. */
static int read_state(PyObject *ring, struct ring_state *s)
{
    if (get_ll(ring, s_max_bytes, &s->cap) < 0 || get_ll(ring, s_max_items, &s->max_items) < 0
        || get_ll(ring, s_head, &s->head) < 0 || get_ll(ring, s_head_pos, &s->head_pos) < 0
        || get_ll(ring, s_tail_pos, &s->tail_pos) < 0 || get_ll(ring, s_tail_slot, &s->tail_slot) < 0
        || get_ll(ring, s_count, &s->count) < 0)
        return -1;
    return s->cap > 0 && s->max_items > 0 && 0 <= s->head && s->head < s->max_items && 0 <= s->tail_slot
           && s->tail_slot < s->max_items && 0 <= s->count && s->count <= s->max_items && 0 <= s->head_pos
           && s->head_pos <= s->tail_pos && s->tail_pos - s->head_pos <= s->cap;
}

/* Copies n bytes into the arena at stream position pos (wrapping at its end). */
static void arena_put(unsigned char *arena, long long cap, long long pos, const unsigned char *src, long long n)
{
    long long at = pos % cap;
    if (at + n <= cap) {
        memcpy(arena + at, src, (size_t)n);
    } else {
        long long part = cap - at;
        memcpy(arena + at, src, (size_t)part);
        memcpy(arena, src + part, (size_t)(n - part));
    }
}

static void arena_get(const unsigned char *arena, long long cap, long long pos, unsigned char *dst, long long n)
{
    long long at = pos % cap;
    if (at + n <= cap) {
        memcpy(dst, arena + at, (size_t)n);
    } else {
        long long part = cap - at;
        memcpy(dst, arena + at, (size_t)part);
        memcpy(dst + part, arena, (size_t)(n - part));
    }
}

static PyObject *ring_push(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "ring_push(ring, data, ends)");
        return NULL;
    }
    PyObject *ring = args[0], *lock = NULL;
    Py_buffer data, ends, mem, endv;
    if (PyObject_GetBuffer(args[1], &data, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[2], &ends, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    int status = 0; /* 1 pushed, 0 for the Python code, -1 an error */
    long long k = ends.len / 8, n = data.len, last = 0;
    if (k >= 1 && ends.len % 8 == 0)
        memcpy(&last, (const char *)ends.buf + (k - 1) * 8, 8);
    if (k < 1 || ends.len % 8 || last != n)
        goto done; /* not what a checked batch is: the Python code's full checks */
    int taken = try_lock(ring, &lock);
    if (taken <= 0) {
        status = taken;
        goto done;
    }
    struct ring_state s;
    int sane = read_state(ring, &s);
    if (sane <= 0) {
        status = unlock(lock, sane);
        goto done;
    }
    long long end = s.tail_pos + n;
    if (k > s.max_items || n > s.cap || s.count + k > s.max_items || end - s.head_pos > s.cap) {
        status = unlock(lock, 0); /* room to make first: the Python code drops and marks */
        goto done;
    }
    if (views(ring, &mem, &endv) < 0) {
        status = unlock(lock, -1);
        goto done;
    }
    if (mem.len != s.cap || endv.len != s.max_items * 8) {
        PyBuffer_Release(&mem);
        PyBuffer_Release(&endv);
        status = unlock(lock, 0);
        goto done;
    }
    arena_put(mem.buf, s.cap, s.tail_pos, data.buf, n);
    long long slot = s.tail_slot, *slots = endv.buf;
    const unsigned char *cut = ends.buf;
    for (long long i = 0; i < k; i++) {
        long long stop;
        memcpy(&stop, cut + i * 8, 8);
        slots[slot] = s.tail_pos + stop;
        if (++slot == s.max_items)
            slot = 0;
    }
    PyBuffer_Release(&mem);
    PyBuffer_Release(&endv);
    status = (set_ll(ring, s_tail_slot, slot) < 0 || set_ll(ring, s_count, s.count + k) < 0
              || set_ll(ring, s_tail_pos, end) < 0) ? -1 : 1;
    status = unlock(lock, status);
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&ends);
    if (status < 0)
        return NULL;
    return PyBool_FromLong(status);
}

/* The first slot in [lo, hi) whose end is above ``limit`` (bisect_right over ascending ends). */
static long long bisect_right_ll(const long long *a, long long limit, long long lo, long long hi)
{
    while (lo < hi) {
        long long mid = lo + (hi - lo) / 2;
        if (limit < a[mid])
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

static PyObject *ring_copy(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "ring_copy(ring, buffer)");
        return NULL;
    }
    PyObject *ring = args[0], *lock = NULL;
    Py_buffer out, mem, endv;
    if (PyObject_GetBuffer(args[1], &out, PyBUF_WRITABLE) < 0) {
        PyErr_Clear(); /* read-only, or not one flat block: the Python code says what is wrong */
        Py_RETURN_NONE;
    }
    int status = 0; /* 1 copied (pos bytes), 0 for the Python code, -1 an error */
    long long pos = 0;
    int taken = try_lock(ring, &lock);
    if (taken <= 0) {
        status = taken;
        goto done;
    }
    struct ring_state s;
    long long dropped, marked, head_lost;
    int sane = read_state(ring, &s);
    if (sane <= 0 || get_ll(ring, s_dropped, &dropped) < 0 || get_ll(ring, s_drops_marked, &marked) < 0
        || get_ll(ring, s_head_lost, &head_lost) < 0) {
        status = unlock(lock, sane <= 0 ? sane : -1);
        goto done;
    }
    PyObject *marks = PyObject_GetAttr(ring, s_marks);
    Py_ssize_t nmarks = marks == NULL ? -1 : PyObject_Size(marks);
    Py_XDECREF(marks);
    if (nmarks < 0) {
        status = unlock(lock, -1);
        goto done;
    }
    if (nmarks || dropped != marked || head_lost) {
        status = unlock(lock, 0); /* a loss to read out first */
        goto done;
    }
    if (!s.count) {
        status = unlock(lock, 1);
        goto done;
    }
    if (views(ring, &mem, &endv) < 0) {
        status = unlock(lock, -1);
        goto done;
    }
    const long long *ends = endv.buf;
    long long room = out.len, head = s.head, head_pos = s.head_pos, count = s.count, taken_records = 0;
    if (mem.len != s.cap || endv.len != s.max_items * 8)
        count = 0; /* not the ring this was written for: the Python code */
    while (count) {
        long long limit = head_pos + room - pos;
        long long hi = head + count <= s.max_items ? head + count : s.max_items;
        long long j = bisect_right_ll(ends, limit, head, hi);
        if (j == head)
            break;
        long long nbytes = ends[j - 1] - head_pos;
        arena_get(mem.buf, s.cap, head_pos, (unsigned char *)out.buf + pos, nbytes);
        pos += nbytes;
        head_pos += nbytes;
        count -= j - head;
        taken_records += j - head;
        head = j < s.max_items ? j : 0;
        if (j < hi)
            break;
    }
    PyBuffer_Release(&mem);
    PyBuffer_Release(&endv);
    if (pos == 0) {
        status = unlock(lock, 0); /* not even one record fits: the Python code raises BufferTooSmall */
        goto done;
    }
    long long read;
    status = (get_ll(ring, s_read, &read) < 0 || set_ll(ring, s_read, read + taken_records) < 0
              || set_ll(ring, s_head, head) < 0 || set_ll(ring, s_head_pos, head_pos) < 0
              || set_ll(ring, s_count, count) < 0) ? -1 : 1;
    status = unlock(lock, status);
done:
    PyBuffer_Release(&out);
    if (status < 0)
        return NULL;
    if (status == 0)
        Py_RETURN_NONE;
    return PyLong_FromLongLong(pos);
}

/* What EventRing's push_checked and readinto are where this module is built (method descriptors, bound like
 * the class's own methods, so a ring holds no reference to itself): ring_push or ring_copy, and where that leaves
 * the work to Python, the class's _push_checked or _readinto (the Python code). */
static PyObject *push_checked_method(PyObject *ring, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 && nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "push_checked(data, ends, kinds=0)");
        return NULL;
    }
    PyObject *all[4] = {ring, args[0], args[1], nargs == 3 ? args[2] : NULL};
    PyObject *done = ring_push(NULL, all, 3);
    if (done == NULL)
        return NULL;
    int pushed = done == Py_True;
    Py_DECREF(done);
    if (pushed)
        Py_RETURN_NONE;
    PyObject *method = PyObject_GetAttr((PyObject *)Py_TYPE(ring), s_push_checked_py);
    if (method == NULL)
        return NULL;
    PyObject *r = PyObject_Vectorcall(method, all, (size_t)nargs + 1, NULL);
    Py_DECREF(method);
    return r;
}

static PyObject *readinto_method(PyObject *ring, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "readinto(buffer)");
        return NULL;
    }
    PyObject *all[2] = {ring, args[0]};
    PyObject *n = ring_copy(NULL, all, 2);
    if (n != Py_None)
        return n;
    Py_DECREF(n);
    PyObject *method = PyObject_GetAttr((PyObject *)Py_TYPE(ring), s_readinto_py);
    if (method == NULL)
        return NULL;
    PyObject *r = PyObject_Vectorcall(method, all, 2, NULL);
    Py_DECREF(method);
    return r;
}

static PyMethodDef method_defs[] = {
    {"push_checked", (PyCFunction)(void (*)(void))push_checked_method, METH_FASTCALL,
     "push_checked(data, ends, kinds=0): EventRing.push_checked, its common case in C (etwmon/_ring.c)."},
    {"readinto", (PyCFunction)(void (*)(void))readinto_method, METH_FASTCALL,
     "readinto(buffer) -> int: copy as many whole records as fit into buffer, oldest first (the first that does "
     "not fit stays for the next call), and return the byte count; 0 when nothing waits. Losses are RecordsLost "
     "records where they happened. Raises BufferTooSmall (consuming nothing) when not even one record fits, and "
     "TypeError for a read-only buffer. Its common case in C (etwmon/_ring.c), the rest in EventRing._readinto."},
};

int ring_add_methods(PyObject *module)
{
    return add_method_descriptor(module, "ring_push_checked_method", &method_defs[0]) < 0
                   || add_method_descriptor(module, "ring_readinto_method", &method_defs[1]) < 0
               ? -1
               : 0;
}

PyMethodDef ring_methods[] = {
    {"ring_push", (PyCFunction)(void (*)(void))ring_push, METH_FASTCALL,
     "ring_push(ring, data, ends) -> bool: EventRing.push_checked's append when nothing must be dropped (see "
     "etwmon/_ring.c); False: the Python code does it."},
    {"ring_copy", (PyCFunction)(void (*)(void))ring_copy, METH_FASTCALL,
     "ring_copy(ring, buffer) -> int or None: EventRing.readinto when no loss waits to be read out (see "
     "etwmon/_ring.c); None: the Python code does it."},
    {NULL, NULL, 0, NULL},
};
