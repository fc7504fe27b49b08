/* etwmon.backlog.fold_plan in C: what folding the identity stage's oldest backlog means, in one pass over its
 * records and a few hash sets instead of some fifty array operations (a fold of ~200 execs' records took the
 * Python code 1-2 ms). The same result, element for element (tests/test_identity.py compares the two):
 *
 * fold_plan(raw, starts, ends, prefix) -> (apply, rows, dropped)
 *   raw: the records back to back (bytes-like); starts, ends: where each starts and ends (int64, native order);
 *   prefix: the 8 bytes every ProcessGuid the programs write starts with.
 *   apply: the indices of the records still to be applied one by one, in order (creates, execs and exits of the
 *     processes kept: those that did not end here and their ancestors here; and every record the arrays cannot
 *     read); rows: the guids (16 bytes each, back to back) of exits of processes not started here; dropped: how
 *     many processes started here are dropped.
 * A record's kind is its Type where its second byte is 0 (a wire record): 1 create, 101 exec, 2 exit, else none.
 * A create's or exec's guid field (Tag 1, Length 16, the prefix) is the block's first, after the command line
 * (40 + 2 x CommandLineLength + the block's 8-byte header), its parent's (Tag 2) the next; an exit's guid field is
 * at 32. A process is keyed by the guid's last 8 bytes. */
#include "_speedups.h"

struct kmap {
    uint64_t *keys, *vals;
    unsigned char *used;
    size_t mask, count;
};

static int kmap_init(struct kmap *m, size_t n)
{
    size_t cap = 16;
    while (cap < 2 * n + 2)
        cap <<= 1;
    m->keys = PyMem_Calloc(cap, sizeof(uint64_t));
    m->vals = PyMem_Calloc(cap, sizeof(uint64_t));
    m->used = PyMem_Calloc(cap, 1);
    m->mask = cap - 1;
    m->count = 0;
    if (m->keys == NULL || m->vals == NULL || m->used == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void kmap_free(struct kmap *m)
{
    PyMem_Free(m->keys);
    PyMem_Free(m->vals);
    PyMem_Free(m->used);
}

static size_t kmap_slot(const struct kmap *m, uint64_t key)
{
    uint64_t h = key * 0x9E3779B97F4A7C15ull;
    size_t i = (size_t)(h ^ (h >> 29)) & m->mask;
    while (m->used[i] && m->keys[i] != key)
        i = (i + 1) & m->mask;
    return i;
}

/* Whether key is in the map; its value in *val (when val is not NULL). */
static int kmap_get(const struct kmap *m, uint64_t key, uint64_t *val)
{
    size_t i = kmap_slot(m, key);
    if (!m->used[i])
        return 0;
    if (val != NULL)
        *val = m->vals[i];
    return 1;
}

/* Sets key's value (a later one replaces it); 1 when the key is new. */
static int kmap_put(struct kmap *m, uint64_t key, uint64_t val)
{
    size_t i = kmap_slot(m, key);
    int fresh = !m->used[i];
    m->used[i] = 1;
    m->keys[i] = key;
    m->vals[i] = val;
    m->count += fresh;
    return fresh;
}

static inline unsigned u16_at(const unsigned char *p)
{
    return p[0] | (unsigned)p[1] << 8;
}

/* The key of the guid field (Tag ``tag``, Length 16, then ``prefix``) at ``at``: 1 when it is one. */
static int guid_at(const unsigned char *at, unsigned tag, const unsigned char *prefix, uint64_t *key)
{
    if (u16_at(at) != tag || u16_at(at + 2) != 16 || memcmp(at + 4, prefix, 8) != 0)
        return 0;
    memcpy(key, at + 12, 8);
    return 1;
}

PyObject *fold_plan(PyObject *self, PyObject *args)
{
    Py_buffer raw, starts_buf, ends_buf, prefix;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*y*y*", &raw, &starts_buf, &ends_buf, &prefix))
        return NULL;
    PyObject *result = NULL, *apply = NULL, *rows = NULL;
    struct kmap started = {0}, ended = {0}, keep = {0};
    int *kind = NULL, *readable = NULL;
    uint64_t *key = NULL, *stack = NULL;
    Py_ssize_t n = starts_buf.len / 8;
    const unsigned char *r = raw.buf, *pre = prefix.buf;
    const int64_t *starts = starts_buf.buf, *ends = ends_buf.buf;
    if (starts_buf.len % 8 || ends_buf.len != starts_buf.len || prefix.len != 8) {
        PyErr_SetString(PyExc_ValueError, "fold_plan: starts and ends of one length (int64), an 8-byte prefix");
        goto done;
    }
    kind = PyMem_Calloc(n + 1, sizeof(int));
    readable = PyMem_Calloc(n + 1, sizeof(int));
    key = PyMem_Calloc(n + 1, sizeof(uint64_t));
    stack = PyMem_Calloc(n + 1, sizeof(uint64_t));
    if (kind == NULL || readable == NULL || key == NULL || stack == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (kmap_init(&started, n) < 0 || kmap_init(&ended, n) < 0 || kmap_init(&keep, n) < 0)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t s = starts[i], e = ends[i];
        if (s < 0 || e < s || e > raw.len || e - s < 2) {
            PyErr_Format(PyExc_ValueError, "fold_plan: record %zd is not within the bytes", i);
            goto done;
        }
        const unsigned char *rec = r + s;
        int64_t size = e - s;
        int k = rec[1] == 0 ? rec[0] : 0;
        if (k != 1 && k != 2 && k != 101)
            k = 0;
        kind[i] = k;
        readable[i] = 1;
        if (k == 1 || k == 101) {
            uint64_t parent = 0;
            int good = 0;
            if (size >= 40) {
                int64_t first = 40 + 2 * (int64_t)u16_at(rec + 32) + 8;
                if (first + 40 <= size && guid_at(rec + first, 1, pre, &key[i])) {
                    good = 1;
                    if (!guid_at(rec + first + 20, 2, pre, &parent))
                        parent = 0;
                }
            }
            readable[i] = good;
            if (good)
                kmap_put(&started, key[i], parent); /* the last record's parent wins */
            else
                key[i] = 0;
        } else if (k == 2) {
            int good = size >= 52 && guid_at(rec + 32, 1, pre, &key[i]);
            readable[i] = good;
            if (good)
                kmap_put(&ended, key[i], 0);
            else
                key[i] = 0;
        }
    }
    /* Keep every process that has not ended here, and the ancestors here of those kept (a daemon's chain). */
    Py_ssize_t top = 0;
    for (size_t slot = 0; slot <= started.mask; slot++) {
        if (started.used[slot] && !kmap_get(&ended, started.keys[slot], NULL)) {
            kmap_put(&keep, started.keys[slot], 0);
            stack[top++] = started.keys[slot];
        }
    }
    while (top > 0) {
        uint64_t parent = 0;
        kmap_get(&started, stack[--top], &parent);
        if (kmap_get(&started, parent, NULL) && kmap_put(&keep, parent, 0))
            stack[top++] = parent;
    }
    apply = PyList_New(0);
    Py_ssize_t before = 0;
    for (Py_ssize_t i = 0; i < n && apply != NULL; i++) {
        int noted = kind[i] == 1 || kind[i] == 101 || kind[i] == 2;
        if (readable[i] && kind[i] == 2 && !kmap_get(&started, key[i], NULL))
            before++;
        if (!readable[i] || (noted && kmap_get(&keep, key[i], NULL))) {
            PyObject *at = PyLong_FromSsize_t(i);
            if (at == NULL || PyList_Append(apply, at) < 0) {
                Py_XDECREF(at);
                goto done;
            }
            Py_DECREF(at);
        }
    }
    if (apply == NULL)
        goto done;
    rows = PyBytes_FromStringAndSize(NULL, before * 16);
    if (rows == NULL)
        goto done;
    unsigned char *row = (unsigned char *)PyBytes_AS_STRING(rows);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (readable[i] && kind[i] == 2 && !kmap_get(&started, key[i], NULL)) {
            memcpy(row, r + starts[i] + 36, 16); /* ended here, started before: the table has it (or had) */
            row += 16;
        }
    }
    result = Py_BuildValue("OOn", apply, rows, (Py_ssize_t)(started.count - keep.count));
done:
    Py_XDECREF(apply);
    Py_XDECREF(rows);
    kmap_free(&started);
    kmap_free(&ended);
    kmap_free(&keep);
    PyMem_Free(kind);
    PyMem_Free(readable);
    PyMem_Free(key);
    PyMem_Free(stack);
    PyBuffer_Release(&raw);
    PyBuffer_Release(&starts_buf);
    PyBuffer_Release(&ends_buf);
    PyBuffer_Release(&prefix);
    return result;
}

/* IdentityStage.push_checked in C where this module is built (a method descriptor, like EventRing's): a batch of
 * the C walk that passes on whole joins the backlog (under the stage's lock: the entry (data, _whole, ends), its
 * bytes counted, the pids read out dropped), a fold is done at once past the cap or marked due within 1/32 of it
 * (``defer_folds``), and the batch goes on to the next stage. Anything else (no next stage that takes checked
 * batches, creates the stage must write fields into) is the Python method's (``_push_checked``). */
static PyObject *s_push_checked, *s_push_checked_py, *s_lean, *s_sink, *s_batch_creates, *s_lock, *s_acquire,
    *s_release, *s_pending, *s_whole, *s_backlog_bytes, *s_pending_pids, *s_backlog_max_bytes, *s_fold_backlog,
    *s_defer_folds, *s_fold_due;

int backlog_init(void)
{
    static const struct name_slot names[] = {
        {&s_push_checked, "_push_checked"}, {&s_push_checked_py, "_push_checked_batch"}, {&s_lean, "lean"},
        {&s_sink, "sink"}, {&s_batch_creates, "batch_creates"}, {&s_lock, "_lock"}, {&s_acquire, "acquire"},
        {&s_release, "release"}, {&s_pending, "_pending"}, {&s_whole, "_whole"},
        {&s_backlog_bytes, "_backlog_bytes"}, {&s_pending_pids, "_pending_pids"},
        {&s_backlog_max_bytes, "backlog_max_bytes"}, {&s_fold_backlog, "_fold_backlog"},
        {&s_defer_folds, "defer_folds"}, {&s_fold_due, "_fold_due"},
    };
    return intern_names(names, sizeof names / sizeof names[0]);
}

/* obj.name where it has one: 1 (a new reference in *out), 0 (none, no error), -1 (an error set); without raising
 * an AttributeError to clear (as getattr(obj, name, default) does). */
static int optional_attr(PyObject *obj, PyObject *name, PyObject **out)
{
#if PY_VERSION_HEX >= 0x030D0000
    return PyObject_GetOptionalAttr(obj, name, out);
#else
    return _PyObject_LookupAttr(obj, name, out);
#endif
}

/* Whether the batch passes whole (the Python test ``checked is not None and lean and batch_creates``): 1, 0, or -1
 * with an error set; the next stage's push_checked in *checked (a new reference) when 1. */
static int passes_whole(PyObject *stage, PyObject **checked)
{
    *checked = PyObject_GetAttr(stage, s_push_checked);
    if (*checked == NULL)
        return -1;
    int ok = *checked != Py_None;
    if (ok) {
        PyObject *lean = PyObject_GetAttr(stage, s_lean);
        ok = lean == NULL ? -1 : PyObject_IsTrue(lean);
        Py_XDECREF(lean);
    }
    if (ok > 0) {
        PyObject *sink = PyObject_GetAttr(stage, s_sink), *creates = NULL;
        if (sink == NULL || optional_attr(sink, s_batch_creates, &creates) < 0)
            ok = -1;
        else
            ok = creates == NULL ? 1 : PyObject_IsTrue(creates);
        Py_XDECREF(sink);
        Py_XDECREF(creates);
    }
    if (ok <= 0)
        Py_CLEAR(*checked);
    return ok;
}

/* The batch joins the backlog, under the stage's lock: 0, or -1 with an error set. */
static int keep_batch(PyObject *stage, PyObject *data, PyObject *ends, Py_ssize_t nbytes)
{
    PyObject *lock = PyObject_GetAttr(stage, s_lock);
    if (lock == NULL)
        return -1;
    PyObject *r = PyObject_CallMethodNoArgs(lock, s_acquire);
    if (r == NULL) {
        Py_DECREF(lock);
        return -1;
    }
    Py_DECREF(r);
    int status = -1;
    PyObject *pending = PyObject_GetAttr(stage, s_pending), *whole = PyObject_GetAttr(stage, s_whole);
    PyObject *entry = pending == NULL || whole == NULL ? NULL : PyTuple_Pack(3, data, whole, ends);
    PyObject *held = entry == NULL ? NULL : PyObject_GetAttr(stage, s_backlog_bytes);
    PyObject *size = held == NULL ? NULL : PyLong_FromSsize_t(nbytes);
    PyObject *sum = size == NULL ? NULL : PyNumber_Add(held, size);
    if (sum != NULL && PyList_Check(pending) && PyList_Append(pending, entry) == 0
        && PyObject_SetAttr(stage, s_backlog_bytes, sum) == 0 && PyObject_SetAttr(stage, s_pending_pids, Py_None) == 0)
        status = 0;
    else if (!PyErr_Occurred())
        PyErr_SetString(PyExc_TypeError, "IdentityStage._pending must be a list");
    Py_XDECREF(pending);
    Py_XDECREF(whole);
    Py_XDECREF(entry);
    Py_XDECREF(held);
    Py_XDECREF(size);
    Py_XDECREF(sum);
    if (call_keeping_error(lock, s_release, NULL) < 0)
        status = -1;
    Py_DECREF(lock);
    return status;
}

/* A fold at once past the cap, or marked due within one fold (1/32) of it: 0, or -1 with an error set. */
static int fold_if_due(PyObject *stage)
{
    PyObject *held = PyObject_GetAttr(stage, s_backlog_bytes);
    PyObject *cap = held == NULL ? NULL : PyObject_GetAttr(stage, s_backlog_max_bytes);
    long long bytes = held == NULL ? -1 : PyLong_AsLongLong(held), most = cap == NULL ? -1 : PyLong_AsLongLong(cap);
    Py_XDECREF(held);
    Py_XDECREF(cap);
    if (PyErr_Occurred())
        return -1;
    if (bytes > most) {
        PyObject *r = PyObject_CallMethodNoArgs(stage, s_fold_backlog);
        Py_XDECREF(r);
        return r == NULL ? -1 : 0;
    }
    if (bytes > most - (most >> 5)) {
        PyObject *defer = PyObject_GetAttr(stage, s_defer_folds);
        int deferred = defer == NULL ? -1 : PyObject_IsTrue(defer);
        Py_XDECREF(defer);
        if (deferred < 0 || (deferred && PyObject_SetAttr(stage, s_fold_due, Py_True) < 0))
            return -1;
    }
    return 0;
}

static PyObject *stage_push_checked(PyObject *stage, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "push_checked(data, ends, kinds)");
        return NULL;
    }
    PyObject *checked;
    int whole = passes_whole(stage, &checked);
    if (whole < 0)
        return NULL;
    if (!whole) {
        PyObject *method = PyObject_GetAttr((PyObject *)Py_TYPE(stage), s_push_checked_py);
        PyObject *all[4] = {stage, args[0], args[1], args[2]};
        PyObject *r = method == NULL ? NULL : PyObject_Vectorcall(method, all, 4, NULL);
        Py_XDECREF(method);
        return r;
    }
    long kinds = PyLong_AsLong(args[2]);
    Py_ssize_t nbytes = PyObject_Size(args[0]);
    if ((kinds == -1 || nbytes < 0) && PyErr_Occurred()) {
        Py_DECREF(checked);
        return NULL;
    }
    if ((kinds & 3) && (keep_batch(stage, args[0], args[1], nbytes) < 0 || fold_if_due(stage) < 0)) {
        Py_DECREF(checked);
        return NULL;
    }
    PyObject *r = PyObject_Vectorcall(checked, args, 3, NULL);
    Py_DECREF(checked);
    return r;
}

static PyMethodDef stage_def = {
    "push_checked", (PyCFunction)(void (*)(void))stage_push_checked, METH_FASTCALL,
    "push_checked(data, ends, kinds): IdentityStage.push_checked, its common case in C (etwmon/_backlog.c); the "
    "rest in IdentityStage._push_checked_batch.",
};

int backlog_add_methods(PyObject *module)
{
    return add_method_descriptor(module, "stage_push_checked_method", &stage_def);
}
