/* etwmon._speedups: the bpf source's ring walk in C, so that a batch of records the kernel wrote costs Python one
 * call, not a loop per record. Optional: without it (no compiler at install time) the source walks the ring in
 * Python (etwmon/sources/bpf/__init__.py, _wire.py), record for record the same.
 *
 * walk(data, mask, cons, prod, final, floor, seeded) reads a BPF ring buffer's records from position ``cons`` up
 * to ``prod`` the way libbpf's ringbuf.c consumer does (an 8-byte header per record: its length, bit 31 "busy",
 * bit 30 "discarded"; records padded to 8 bytes; the data pages mapped twice so a record that wraps is contiguous)
 * and gathers the wire records among them (a first byte pair < 0x100) back to back:
 *   - a wire record whose header's Size disagrees with its length, or that is shorter than the smallest record,
 *     is skipped and counted (it cannot be passed on; the caller reports it as lost);
 *   - each record's Time (bytes 8-15) is raised to the one before it when two CPUs stamped a little out of ring
 *     order, counted in ``raised`` (as the Python walk does);
 *   - the walk stops *before* a record that Python must handle: an event (a kind >= 0x100, decoded by
 *     EventDecoder), or a record of a process whose pid (or, for a create, whose parent's pid) is flagged in the
 *     ``seeded`` lookup (a bytes-like table by pid, or None): its position comes back as ``stop``;
 *   - a record still being written (busy) ends the walk, unless ``final`` (then it is skipped and counted).
 * Returns (cons, blob, ends, count, floor, raised, skipped, kinds, stop):
 *   cons: the position after the last record taken (to give back to the kernel, or where ``stop`` is);
 *   blob: the gathered records (bytes), ends: where each ends in blob (bytes of little-endian int64);
 *   floor: the latest Time passed on; kinds: bit 0 a create or exec, bit 1 an exit, bit 2 anything else;
 *   stop: the data offset of the record's header that stopped the walk, or -1.
 * The caller holds the GIL throughout (the walk is short: at most one pass over what the kernel committed).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define BUSY 0x80000000u
#define DISCARD 0x40000000u
#define WIRE_MIN 24
#define EVENT_MIN 184

static inline uint32_t load32_acquire(const unsigned char *p)
{
    return __atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE);
}

static inline uint32_t u32_at(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline int flagged(const unsigned char *table, Py_ssize_t len, uint32_t pid)
{
    return table != NULL && (Py_ssize_t)pid < len && table[pid];
}

static PyObject *walk(PyObject *self, PyObject *args)
{
    Py_buffer data, seeded_buf;
    unsigned long long mask, cons, prod;
    int final;
    long long floor;
    PyObject *seeded;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*KKKpLO", &data, &mask, &cons, &prod, &final, &floor, &seeded))
        return NULL;
    const unsigned char *table = NULL;
    Py_ssize_t table_len = 0;
    int have_seeded = 0;
    if (seeded != Py_None) {
        if (PyObject_GetBuffer(seeded, &seeded_buf, PyBUF_SIMPLE) < 0) {
            PyBuffer_Release(&data);
            return NULL;
        }
        have_seeded = 1;
        table = seeded_buf.buf;
        table_len = seeded_buf.len;
    }
    PyObject *result = NULL, *blob = NULL, *ends = NULL;
    /* A pass reads at most one ring's length, and offsets run on into the second mapping. */
    if (prod < cons || prod - cons > mask + 1 || (unsigned long long)data.len < 2 * (mask + 1)) {
        PyErr_SetString(PyExc_ValueError, "walk: positions or mapping do not describe one ring");
        goto done;
    }
    Py_ssize_t room = (Py_ssize_t)(prod - cons);
    blob = PyBytes_FromStringAndSize(NULL, room);
    ends = PyBytes_FromStringAndSize(NULL, (room / 16 + 1) * 8);
    if (blob == NULL || ends == NULL)
        goto done;
    const unsigned char *base = data.buf;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(blob);
    int64_t *end_at = (int64_t *)PyBytes_AS_STRING(ends);
    Py_ssize_t used = 0, count = 0, skipped = 0, raised = 0;
    long long stop = -1;
    int kinds = 0;
    while (cons < prod) {
        unsigned long long at = cons & mask;
        uint32_t length = load32_acquire(base + at);
        if (length & BUSY) {
            if (!final)
                break; /* reserved, not committed yet: the next pass takes it */
            skipped++;  /* never to be committed (final pass, after the programs settled) */
        }
        uint32_t size = length & ~(BUSY | DISCARD);
        if (size > mask + 1 || at + 8 + size > (unsigned long long)data.len) {
            /* cannot be: the ring is corrupt, stop here rather than read past it */
            PyErr_SetString(PyExc_ValueError, "walk: a record longer than the ring");
            goto done;
        }
        if (!(length & (BUSY | DISCARD))) {
            const unsigned char *rec = base + at + 8;
            if (size < WIRE_MIN) {
                skipped++;
            } else if (rec[1] != 0) { /* an event (kind >= 0x100): the decoder's */
                stop = (long long)at;
                break;
            } else {
                unsigned type = rec[0];
                unsigned said = rec[2] | (unsigned)rec[3] << 8;
                if (said != size) {
                    skipped++;
                } else {
                    if (have_seeded) {
                        /* a thread record's ProcessId is at 20; a process record's, an exit's, an image load's
                         * at 16; a create's parent at 20 */
                        uint32_t pid = u32_at(rec + ((type == 3 || type == 4) ? 20 : 16));
                        int create = type == 1 || type == 101;
                        if (flagged(table, table_len, pid)
                            || (create && size >= 24 && flagged(table, table_len, u32_at(rec + 20)))) {
                            stop = (long long)at;
                            break;
                        }
                    }
                    memcpy(out + used, rec, size);
                    int64_t time;
                    memcpy(&time, out + used + 8, 8);
                    if (time < floor) {
                        memcpy(out + used + 8, &floor, 8);
                        raised++;
                    } else {
                        floor = time;
                    }
                    used += size;
                    end_at[count++] = used;
                    kinds |= (type == 1 || type == 101) ? 1 : type == 2 ? 2 : 4;
                }
            }
        }
        cons += (size + 8 + 7) & ~7ull;
    }
    if (_PyBytes_Resize(&blob, used) < 0 || _PyBytes_Resize(&ends, count * 8) < 0)
        goto done;
    result = Py_BuildValue("KOOnLnniL", cons, blob, ends, count, floor, raised, skipped, kinds, stop);
done:
    Py_XDECREF(blob);
    Py_XDECREF(ends);
    if (have_seeded)
        PyBuffer_Release(&seeded_buf);
    PyBuffer_Release(&data);
    return result;
}


/* scan(data, min_size, block_at, rules, max_filetime) -> (rows, blocks, error): what etwmon.events._checked does
 * in Python (header checks record by record, then each extension block's known fields), with the same rows, the
 * same blocks and the same first error (message, offset) or None. ``min_size`` and ``block_at``: dicts by record
 * Type; ``rules``: int32 per tag (-1 any size, 0 text of even length, -8 a FILETIME, else the exact size). */
#define HEADER 16
#define CMDLINE_AT 34
#define CREATE_SIZE 40
#define EXT_HEADER 8

static PyObject *scan_error(const char *text, Py_ssize_t offset)
{
    return Py_BuildValue("(sn)", text, offset);
}

/* The first field of the block at [start, end) that _fields would refuse: its message in ``msg`` (0: none). */
static int check_block(const unsigned char *d, Py_ssize_t start, Py_ssize_t end, const int32_t *rules,
                       long long max_ft, char *msg, size_t room)
{
    if (end - start < EXT_HEADER)
        return 0;
    unsigned version = d[start] | (unsigned)d[start + 1] << 8;
    unsigned length = d[start + 2] | (unsigned)d[start + 3] << 8;
    if (version != 1 || length < EXT_HEADER || start + (Py_ssize_t)length > end)
        return 0;
    Py_ssize_t pos = start + EXT_HEADER, stop = start + length;
    while (pos + 4 <= stop) {
        unsigned tag = d[pos] | (unsigned)d[pos + 1] << 8;
        long size = d[pos + 2] | (long)d[pos + 3] << 8;
        pos += 4;
        Py_ssize_t fend = pos + size;
        if (fend > stop)
            break;
        int32_t rule = rules[tag];
        if (rule != -1 && rule != size) {
            if (rule == 0) {
                if (size & 1) {
                    snprintf(msg, room, "extension field %u holds text of odd length %ld", tag, size);
                    return 1;
                }
            } else if (rule > 0 || size != 8) {
                snprintf(msg, room, "extension field %u has %ld bytes, needs %ld", tag, size,
                         (long)(rule < 0 ? -rule : rule));
                return 1;
            } else {
                int64_t t;
                memcpy(&t, d + pos, 8);
                if (t < 0 || t > max_ft) {
                    snprintf(msg, room, "extension field %u holds a time out of range", tag);
                    return 1;
                }
            }
        }
        pos = fend;
    }
    return 0;
}

static long dict_long(PyObject *dict, long key, long fallback, int *failed)
{
    PyObject *k = PyLong_FromLong(key);
    if (k == NULL) {
        *failed = 1;
        return fallback;
    }
    PyObject *v = PyDict_GetItemWithError(dict, k);
    Py_DECREF(k);
    if (v == NULL) {
        if (PyErr_Occurred())
            *failed = 1;
        return fallback;
    }
    long out = PyLong_AsLong(v);
    if (out == -1 && PyErr_Occurred())
        *failed = 1;
    return out;
}

static PyObject *scan(PyObject *self, PyObject *args)
{
    Py_buffer data, rules_buf;
    PyObject *min_size, *block_at;
    long long max_ft;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*O!O!y*L", &data, &PyDict_Type, &min_size, &PyDict_Type, &block_at, &rules_buf,
                          &max_ft))
        return NULL;
    PyObject *rows = NULL, *blocks = NULL, *error = NULL, *result = NULL;
    if (rules_buf.len != 0x10000 * (Py_ssize_t)sizeof(int32_t)) {
        PyErr_SetString(PyExc_ValueError, "scan: rules must be 65536 int32");
        goto done;
    }
    const int32_t *rules = rules_buf.buf;
    const unsigned char *d = data.buf;
    Py_ssize_t end = data.len, offset = 0;
    char msg[160];
    rows = PyList_New(0);
    blocks = PyList_New(0);
    if (rows == NULL || blocks == NULL)
        goto done;
    while (offset < end) {
        if (end - offset < HEADER) {
            snprintf(msg, sizeof msg, "truncated header: %zd bytes left, a header needs 16", end - offset);
            error = scan_error(msg, offset);
            break;
        }
        long item = (int16_t)(d[offset] | d[offset + 1] << 8);
        long size = d[offset + 2] | (long)d[offset + 3] << 8;
        int64_t ft;
        memcpy(&ft, d + offset + 8, 8);
        if (size < HEADER) {
            snprintf(msg, sizeof msg, "record Size %ld is smaller than the 16-byte header", size);
            error = scan_error(msg, offset);
            break;
        }
        if (offset + size > end) {
            snprintf(msg, sizeof msg, "record Size %ld runs past the end of the buffer (%zd bytes)", size, end);
            error = scan_error(msg, offset);
            break;
        }
        int failed = 0;
        long need = dict_long(min_size, item, HEADER, &failed);
        if (failed)
            goto done;
        if (size < need) {
            snprintf(msg, sizeof msg, "record of type %ld has Size %ld, needs at least %ld", item, size, need);
            error = scan_error(msg, offset);
            break;
        }
        if (ft < 0 || ft > max_ft) {
            snprintf(msg, sizeof msg, "record Time %lld is out of range (1601-01-01 to 9999-12-31)", (long long)ft);
            error = scan_error(msg, offset);
            break;
        }
        Py_ssize_t bstart = 0, bend = 0;
        if (item == 1 || item == 101) {
            long chars = d[offset + 32] | (long)d[offset + 33] << 8;
            long base = CMDLINE_AT + 2 * chars;
            if (base > size) {
                snprintf(msg, sizeof msg, "CommandLineLength %ld runs past the record's Size %ld", chars, size);
                error = scan_error(msg, offset);
                break;
            }
            base += CREATE_SIZE - CMDLINE_AT;
            if (size > base) {
                bstart = offset + base;
                bend = offset + size;
            }
        } else {
            long at = size > 24 ? dict_long(block_at, item, -1, &failed) : -1;
            if (failed)
                goto done;
            if (at >= 0 && size > at) {
                bstart = offset + at;
                bend = offset + size;
            } else if (item == 100 && !(d[offset + 16] | d[offset + 17] | d[offset + 18] | d[offset + 19])) {
                error = scan_error("RecordsLost with a Count of 0", offset);
                break;
            }
        }
        if (bstart && check_block(d, bstart, bend, rules, max_ft, msg, sizeof msg)) {
            error = scan_error(msg, offset);
            break;
        }
        PyObject *row = Py_BuildValue("(nllL)", offset, item, size, (long long)ft);
        PyObject *block = Py_BuildValue("(nn)", bstart, bend);
        if (row == NULL || block == NULL || PyList_Append(rows, row) < 0 || PyList_Append(blocks, block) < 0) {
            Py_XDECREF(row);
            Py_XDECREF(block);
            goto done;
        }
        Py_DECREF(row);
        Py_DECREF(block);
        offset += size;
    }
    if (error == NULL && !PyErr_Occurred()) {
        error = Py_None;
        Py_INCREF(error);
    }
    if (error != NULL)
        result = PyTuple_Pack(3, rows, blocks, error);
done:
    Py_XDECREF(rows);
    Py_XDECREF(blocks);
    Py_XDECREF(error);
    PyBuffer_Release(&rules_buf);
    PyBuffer_Release(&data);
    return result;
}

/* The extension fields of d[pos:stop] (tag u16, size u16, value), each known one checked by ``rules`` as scan
 * does; for each tag the dict ``decode`` names ((attribute, decoder)), out[attribute] = decoder(value bytes). A
 * field that runs past ``stop`` ends the walk. 1: done; 0: a field was refused; -1: a Python error. */
static int walk_fields(const unsigned char *d, Py_ssize_t pos, Py_ssize_t stop, PyObject *decode,
                       const int32_t *rules, long long max_ft, PyObject *out)
{
    int wanted = decode != NULL && PyDict_GET_SIZE(decode) > 0;
    while (pos + 4 <= stop) {
        unsigned tag = d[pos] | (unsigned)d[pos + 1] << 8;
        long size = d[pos + 2] | (long)d[pos + 3] << 8;
        pos += 4;
        Py_ssize_t fend = pos + size;
        if (fend > stop)
            break;
        int32_t rule = rules[tag];
        if (rule != -1 && rule != size) {
            if (rule == 0) {
                if (size & 1)
                    return 0;
            } else if (rule > 0 || size != 8) {
                return 0;
            } else {
                int64_t t;
                memcpy(&t, d + pos, 8);
                if (t < 0 || t > max_ft)
                    return 0;
            }
        }
        if (wanted) {
            PyObject *key = PyLong_FromLong((long)tag);
            if (key == NULL)
                return -1;
            PyObject *known = PyDict_GetItemWithError(decode, key); /* borrowed */
            Py_DECREF(key);
            if (known == NULL) {
                if (PyErr_Occurred())
                    return -1;
            } else {
                if (!PyTuple_Check(known) || PyTuple_GET_SIZE(known) < 2) {
                    PyErr_SetString(PyExc_TypeError, "decode values must be (attribute, decoder)");
                    return -1;
                }
                PyObject *raw = PyBytes_FromStringAndSize((const char *)d + pos, size);
                if (raw == NULL)
                    return -1;
                PyObject *value = PyObject_CallOneArg(PyTuple_GET_ITEM(known, 1), raw);
                Py_DECREF(raw);
                if (value == NULL)
                    return -1;
                int bad = PyDict_SetItem(out, PyTuple_GET_ITEM(known, 0), value);
                Py_DECREF(value);
                if (bad < 0)
                    return -1;
            }
        }
        pos = fend;
    }
    return 1;
}

static const int32_t *rules_of(PyObject *obj)
{
    if (!PyBytes_Check(obj) || PyBytes_GET_SIZE(obj) != 0x10000 * (Py_ssize_t)sizeof(int32_t)) {
        PyErr_SetString(PyExc_TypeError, "rules must be 65536 int32 as bytes");
        return NULL;
    }
    return (const int32_t *)PyBytes_AS_STRING(obj);
}

/* fields(data, pos, stop, decode, rules, max_filetime) -> dict, or None: etwmon.events._fields in C (walk_fields
 * over data[pos:stop]). None when a field is refused: the caller then runs the Python walk, which raises the
 * error with its message and offset. */
static PyObject *fields(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "fields takes 6 arguments");
        return NULL;
    }
    PyObject *decode = args[3];
    if (!PyDict_Check(decode)) {
        PyErr_SetString(PyExc_TypeError, "fields: decode must be a dict");
        return NULL;
    }
    const int32_t *rules = rules_of(args[4]);
    if (rules == NULL)
        return NULL;
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    Py_ssize_t stop = PyLong_AsSsize_t(args[2]);
    long long max_ft = PyLong_AsLongLong(args[5]);
    if (PyErr_Occurred())
        return NULL;
    Py_buffer data;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *out = PyDict_New();
    int done = -1;
    if (out != NULL)
        done = walk_fields(data.buf, pos < 0 ? 0 : pos, stop > data.len ? data.len : stop, decode, rules, max_ft,
                           out);
    PyBuffer_Release(&data);
    if (done == 1)
        return out;
    Py_XDECREF(out);
    if (done == 0)
        Py_RETURN_NONE;
    return NULL;
}

/* --- JSON lines of a batch (etwmon.batch_format) ------------------------------------------------------------- */

typedef struct {
    char *buf;
    Py_ssize_t len, cap;
    int ascii;
} text_t;

static int put(text_t *t, const char *s, Py_ssize_t n)
{
    if (t->len + n > t->cap) {
        Py_ssize_t cap = t->cap ? t->cap : 1024;
        while (cap < t->len + n)
            cap *= 2;
        char *grown = PyMem_Realloc(t->buf, cap);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        t->buf = grown;
        t->cap = cap;
    }
    memcpy(t->buf + t->len, s, n);
    t->len += n;
    return 0;
}

static int put_c(text_t *t, const char *s)
{
    return put(t, s, (Py_ssize_t)strlen(s));
}

static int put_str(text_t *t, PyObject *str)
{
    if (!PyUnicode_Check(str)) {
        PyErr_SetString(PyExc_TypeError, "a JSON piece must be a str");
        return -1;
    }
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(str, &n);
    if (s == NULL)
        return -1;
    if (!PyUnicode_IS_ASCII(str))
        t->ascii = 0;
    return put(t, s, n);
}

static PyObject *text_value(text_t *t)
{
    if (t->ascii) {
        PyObject *out = PyUnicode_New(t->len, 127);
        if (out != NULL)
            memcpy(PyUnicode_1BYTE_DATA(out), t->buf, t->len);
        return out;
    }
    return PyUnicode_DecodeUTF8(t->buf, t->len, "strict");
}

static PyObject *KEY_RULE_NAME, *KEY_COMMAND_LINE; /* interned at import */

enum { HOW_PIECE, HOW_PAIR, HOW_IMPLIED, HOW_FLAGS, HOW_RULE };

/* json_batch(data, rows, blocks, types, ctx) -> (lines, kinds, stopped): etwmon.batch_format's JSON form in C.
 * rows/blocks: _scan's. types: a frozenset of record types shown (None: all). ctx: (second_text, type_names,
 * pieces, plans, quote, text_piece, flags_pieces, marker, fallback, rules, max_filetime), see batch_format.py.
 * stopped: the index of the row whose block was refused (the caller goes on from it in Python, which raises the
 * error), or -1. */
static PyObject *json_batch(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer data;
    PyObject *rows, *blocks, *types, *ctx;
    if (!PyArg_ParseTuple(args, "y*O!O!OO!", &data, &PyList_Type, &rows, &PyList_Type, &blocks, &types,
                          &PyTuple_Type, &ctx))
        return NULL;
    PyObject *lines = NULL, *kinds = NULL, *result = NULL, *last_text = NULL;
    long long last_second = -1;
    text_t t = {NULL, 0, 0, 1};
    Py_ssize_t stopped = -1;
    if (PyTuple_GET_SIZE(ctx) != 11) {
        PyErr_SetString(PyExc_TypeError, "json_batch: ctx must have 11 items");
        goto done;
    }
    PyObject *second_text = PyTuple_GET_ITEM(ctx, 0), *type_names = PyTuple_GET_ITEM(ctx, 1),
             *pieces_for = PyTuple_GET_ITEM(ctx, 2), *plans = PyTuple_GET_ITEM(ctx, 3),
             *quote = PyTuple_GET_ITEM(ctx, 4), *text_piece = PyTuple_GET_ITEM(ctx, 5),
             *flags_pieces = PyTuple_GET_ITEM(ctx, 6), *marker = PyTuple_GET_ITEM(ctx, 7),
             *fallback = PyTuple_GET_ITEM(ctx, 8);
    const int32_t *rules = rules_of(PyTuple_GET_ITEM(ctx, 9));
    long long max_ft = PyLong_AsLongLong(PyTuple_GET_ITEM(ctx, 10));
    if (rules == NULL || PyErr_Occurred())
        goto done;
    if (!PyDict_Check(type_names) || !PyDict_Check(pieces_for) || !PyDict_Check(plans)) {
        PyErr_SetString(PyExc_TypeError, "json_batch: type_names, pieces and plans must be dicts");
        goto done;
    }
    if (PyList_GET_SIZE(rows) != PyList_GET_SIZE(blocks)) {
        PyErr_SetString(PyExc_ValueError, "json_batch: rows and blocks differ in length");
        goto done;
    }
    lines = PyList_New(0);
    kinds = PyList_New(0);
    if (lines == NULL || kinds == NULL)
        goto done;
    const unsigned char *d = data.buf;
    Py_ssize_t count = PyList_GET_SIZE(rows);
    char num[192];
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *row = PyList_GET_ITEM(rows, i), *block = PyList_GET_ITEM(blocks, i);
        Py_ssize_t offset, bstart, bend;
        long item, size;
        long long ft;
        if (!PyArg_ParseTuple(row, "nllL", &offset, &item, &size, &ft) ||
            !PyArg_ParseTuple(block, "nn", &bstart, &bend))
            goto done;
        if (offset < 0 || size < HEADER || offset + size > data.len || bstart < 0 || bend > data.len) {
            PyErr_SetString(PyExc_ValueError, "json_batch: a row lies outside the data");
            goto done;
        }
        PyObject *item_obj = PyLong_FromLong(item);
        if (item_obj == NULL)
            goto done;
        int shown = 1;
        if (types != Py_None && item != 100) {
            shown = PySequence_Contains(types, item_obj);
            if (shown < 0) {
                Py_DECREF(item_obj);
                goto done;
            }
        }
        PyObject *decode = shown ? PyDict_GetItemWithError(pieces_for, item_obj) : NULL;
        if (decode == NULL && PyErr_Occurred()) {
            Py_DECREF(item_obj);
            goto done;
        }
        PyObject *pieces = PyDict_New();
        if (pieces == NULL) {
            Py_DECREF(item_obj);
            goto done;
        }
        unsigned long flags = 0;
        if (bstart) {
            /* _block_bounds: a block of another version, or whose length does not fit, is skipped whole */
            if (bend - bstart >= EXT_HEADER) {
                unsigned version = d[bstart] | (unsigned)d[bstart + 1] << 8;
                unsigned length = d[bstart + 2] | (unsigned)d[bstart + 3] << 8;
                if (version == 1 && length >= EXT_HEADER && bstart + (Py_ssize_t)length <= bend) {
                    flags = u32_at(d + bstart + 4);
                    int walked = walk_fields(d, bstart + EXT_HEADER, bstart + length, decode, rules, max_ft, pieces);
                    if (walked <= 0) {
                        Py_DECREF(pieces);
                        Py_DECREF(item_obj);
                        if (walked < 0)
                            goto done;
                        stopped = i;
                        break;
                    }
                }
            }
        }
        if (!shown) {
            Py_DECREF(pieces);
            Py_DECREF(item_obj);
            continue;
        }
        if (PyList_Append(kinds, item_obj) < 0) {
            Py_DECREF(pieces);
            Py_DECREF(item_obj);
            goto done;
        }
        const unsigned char *body = d + offset + HEADER;
        int is_create = item == 1 || item == 101;
        if (!(is_create || item == 2 || item == 3 || item == 4 || item == 100)) {
            Py_DECREF(pieces);
            Py_DECREF(item_obj);
            PyObject *line = PyObject_CallFunction(fallback, "nl", offset, size);
            if (line == NULL || PyList_Append(lines, line) < 0) {
                Py_XDECREF(line);
                goto done;
            }
            Py_DECREF(line);
            continue;
        }
        PyObject *type_name = PyDict_GetItemWithError(type_names, item_obj);
        Py_DECREF(item_obj);
        if (type_name == NULL) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_KeyError, "json_batch: no type name for %ld", item);
            Py_DECREF(pieces);
            goto done;
        }
        t.len = 0;
        t.ascii = 1;
        long long second = ft / 10000000, ticks = ft % 10000000;
        if (second != last_second || last_text == NULL) {
            Py_XDECREF(last_text);
            last_text = PyObject_CallFunction(second_text, "L", second);
            last_second = second;
            if (last_text == NULL) {
                Py_DECREF(pieces);
                goto done;
            }
        }
        if (put_c(&t, "{\"type\":\"") < 0 || put_str(&t, type_name) < 0 || put_c(&t, "\",\"time\":\"") < 0 ||
            put_str(&t, last_text) < 0)
            goto line_fail;
        snprintf(num, sizeof num, ".%06lldZ\"", ticks / 10);
        if (put_c(&t, num) < 0)
            goto line_fail;
        /* the rule's name goes early in the line (its base64 twin, if any, in the details' order) */
        PyObject *rule = PyDict_GetItemWithError(pieces, KEY_RULE_NAME);
        if (rule == NULL && PyErr_Occurred())
            goto line_fail;
        if (rule != NULL && (!PyTuple_Check(rule) || PyTuple_GET_SIZE(rule) != 2)) {
            PyErr_SetString(PyExc_TypeError, "json_batch: the rule_name piece must be a pair");
            goto line_fail;
        }
        if (rule != NULL && (put_c(&t, ",") < 0 || put_str(&t, PyTuple_GET_ITEM(rule, 0)) < 0))
            goto line_fail;
        /* (scan checked the minimum Sizes: 36 a create, 32 a thread exit, 24 the others) */
        uint32_t a = u32_at(body), b = item == 100 ? 0 : u32_at(body + 4), c = (is_create || item == 4) ? u32_at(body + 8) : 0;
        if (is_create) {
            /* pid, parent pid, creating tid, creating pid, then the command line's length in characters */
            uint32_t creating_pid = u32_at(body + 12);
            long chars = d[offset + 32] | (long)d[offset + 33] << 8;
            snprintf(num, sizeof num, ",\"pid\":%u,\"parent_pid\":%u,\"creating_pid\":%u,\"creating_tid\":%u,", a, b,
                     creating_pid, c);
            if (put_c(&t, num) < 0)
                goto line_fail;
            int order = -1;
            PyObject *text = PyUnicode_DecodeUTF16((const char *)d + offset + CMDLINE_AT, 2 * chars, "surrogatepass",
                                                   &order);
            if (text == NULL)
                goto line_fail;
            PyObject *piece;
            if (PyUnicode_IS_ASCII(text)) {
                PyObject *quoted = PyObject_CallOneArg(quote, text);
                piece = quoted;
                if (quoted != NULL) {
                    int bad = put_c(&t, "\"command_line\":") < 0 || put_str(&t, quoted) < 0;
                    Py_DECREF(quoted);
                    piece = bad ? NULL : Py_None;
                    if (piece)
                        Py_INCREF(piece);
                }
            } else {
                piece = PyObject_CallFunctionObjArgs(text_piece, KEY_COMMAND_LINE, text, NULL);
                if (piece != NULL && put_str(&t, piece) < 0) {
                    Py_DECREF(piece);
                    piece = NULL;
                }
            }
            int truncated = piece == NULL ? 0 : PyUnicode_Tailmatch(text, marker, 0, PY_SSIZE_T_MAX, 1);
            Py_DECREF(text);
            if (piece == NULL || truncated < 0)
                goto line_fail;
            Py_DECREF(piece);
            if (put_c(&t, (truncated || (flags & 1u)) ? ",\"truncated\":true" : ",\"truncated\":false") < 0)
                goto line_fail;
        } else if (item == 2) {
            if (b == 0xFFFFFFFFu)
                snprintf(num, sizeof num, ",\"pid\":%u,\"exit_code\":null", a);
            else
                snprintf(num, sizeof num, ",\"pid\":%u,\"exit_code\":%u", a, b);
            if (put_c(&t, num) < 0)
                goto line_fail;
        } else if (item == 4) {
            if (c == 0xFFFFFFFFu)
                snprintf(num, sizeof num, ",\"tid\":%u,\"pid\":%u,\"exit_code\":null", a, b);
            else
                snprintf(num, sizeof num, ",\"tid\":%u,\"pid\":%u,\"exit_code\":%u", a, b, c);
            if (put_c(&t, num) < 0)
                goto line_fail;
        } else if (item == 3) {
            snprintf(num, sizeof num, ",\"tid\":%u,\"pid\":%u", a, b);
            if (put_c(&t, num) < 0)
                goto line_fail;
        } else { /* RecordsLost: the count, nothing else */
            snprintf(num, sizeof num, ",\"count\":%u", a);
            if (put_c(&t, num) < 0)
                goto line_fail;
            goto line_end;
        }
        if (flags || PyDict_GET_SIZE(pieces)) {
            PyObject *plan = PyDict_GetItemWithError(plans, PyTuple_GET_ITEM(row, 1));
            if (plan == NULL) {
                if (!PyErr_Occurred())
                    PyErr_Format(PyExc_KeyError, "json_batch: no plan for %ld", item);
                goto line_fail;
            }
            if (!PyTuple_Check(plan)) {
                PyErr_SetString(PyExc_TypeError, "json_batch: a plan must be a tuple");
                goto line_fail;
            }
            for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(plan); k++) {
                PyObject *step = PyTuple_GET_ITEM(plan, k);
                if (!PyTuple_Check(step) || PyTuple_GET_SIZE(step) != 4) {
                    PyErr_SetString(PyExc_TypeError, "json_batch: a plan step must be a 4-tuple");
                    goto line_fail;
                }
                long how = PyLong_AsLong(PyTuple_GET_ITEM(step, 0));
                PyObject *attribute = PyTuple_GET_ITEM(step, 1), *unknown = PyTuple_GET_ITEM(step, 2),
                         *source = PyTuple_GET_ITEM(step, 3);
                if (how == -1 && PyErr_Occurred())
                    goto line_fail;
                PyObject *value = NULL; /* borrowed, or owned when ``own`` */
                int own = 0;
                if (how == HOW_RULE) {
                    if (rule == NULL)
                        value = unknown;
                    else {
                        PyObject *twin = PyTuple_GET_ITEM(rule, 1);
                        if (PyObject_IsTrue(twin) && put_str(&t, twin) < 0) /* after the previous part, no comma */
                            goto line_fail;
                        continue;
                    }
                } else if (how == HOW_FLAGS) {
                    PyObject *key = PyLong_FromUnsignedLong(flags);
                    if (key == NULL)
                        goto line_fail;
                    value = PyObject_GetItem(flags_pieces, key);
                    Py_DECREF(key);
                    if (value == NULL)
                        goto line_fail;
                    own = 1;
                } else {
                    PyObject *got = PyDict_GetItemWithError(pieces, attribute);
                    if (got == NULL && PyErr_Occurred())
                        goto line_fail;
                    if (how == HOW_PIECE) {
                        int truth = got == NULL ? 0 : PyObject_IsTrue(got);
                        if (truth < 0)
                            goto line_fail;
                        value = truth ? got : unknown;
                    } else if (how == HOW_PAIR) {
                        if (got == NULL || got == Py_None)
                            value = unknown;
                        else if (PyTuple_Check(got) && PyTuple_GET_SIZE(got) == 2)
                            value = PyTuple_GET_ITEM(got, 0);
                    } else if (how == HOW_IMPLIED) {
                        if (got != NULL && got != Py_None)
                            value = got;
                        else {
                            PyObject *pair = PyDict_GetItemWithError(pieces, source);
                            if (pair == NULL && PyErr_Occurred())
                                goto line_fail;
                            if (pair == NULL || pair == Py_None)
                                value = unknown;
                            else if (PyTuple_Check(pair) && PyTuple_GET_SIZE(pair) == 2)
                                value = PyTuple_GET_ITEM(pair, 1);
                        }
                    }
                    if (value == NULL) {
                        PyErr_SetString(PyExc_TypeError, "json_batch: a pair piece must be a 2-tuple");
                        goto line_fail;
                    }
                }
                int bad = put_c(&t, ",") < 0 || put_str(&t, value) < 0;
                if (own)
                    Py_DECREF(value);
                if (bad)
                    goto line_fail;
            }
        }
    line_end:
        if (put_c(&t, "}\n") < 0)
            goto line_fail;
        {
            PyObject *line = text_value(&t);
            if (line == NULL || PyList_Append(lines, line) < 0) {
                Py_XDECREF(line);
                goto line_fail;
            }
            Py_DECREF(line);
        }
        Py_DECREF(pieces);
        continue;
    line_fail:
        Py_DECREF(pieces);
        goto done;
    }
    result = Py_BuildValue("(OOn)", lines, kinds, stopped);
done:
    Py_XDECREF(lines);
    Py_XDECREF(kinds);
    Py_XDECREF(last_text);
    PyMem_Free(t.buf);
    PyBuffer_Release(&data);
    return result;
}

static PyMethodDef methods[] = {
    {"walk", walk, METH_VARARGS,
     "walk(data, mask, cons, prod, final, floor, seeded) -> (cons, blob, ends, count, floor, raised, skipped, "
     "kinds, stop): the wire records of a BPF ring pass gathered back to back (see etwmon/_speedups.c)."},
    {"scan", scan, METH_VARARGS,
     "scan(data, min_size, block_at, rules, max_filetime) -> (rows, blocks, error): etwmon.events._checked in C "
     "(see etwmon/_speedups.c); error is (message, offset) or None."},
    {"fields", (PyCFunction)(void (*)(void))fields, METH_FASTCALL,
     "fields(data, pos, stop, decode, rules, max_filetime) -> dict or None: etwmon.events._fields in C (see "
     "etwmon/_speedups.c); None when a field is refused (the Python walk then raises the error)."},
    {"json_batch", json_batch, METH_VARARGS,
     "json_batch(data, rows, blocks, types, ctx) -> (lines, kinds, stopped): etwmon.batch_format's JSON lines in "
     "C (see etwmon/_speedups.c); stopped is the index of a row whose block was refused, or -1."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "etwmon._speedups",
    .m_doc = "The bpf source's ring walk, parse's record checks and extension-field walk in C (optional).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__speedups(void)
{
    KEY_RULE_NAME = PyUnicode_InternFromString("rule_name");
    KEY_COMMAND_LINE = PyUnicode_InternFromString("command_line");
    if (KEY_RULE_NAME == NULL || KEY_COMMAND_LINE == NULL)
        return NULL;
    return PyModule_Create(&module);
}
