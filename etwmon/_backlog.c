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
