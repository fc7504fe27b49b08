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
#include "_speedups.h"

#define BUSY 0x80000000u
#define DISCARD 0x40000000u
#define WIRE_MIN 24
#define EVENT_MIN 184

static inline uint32_t load32_acquire(const unsigned char *p)
{
    return __atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE);
}


static inline int flagged(const unsigned char *table, Py_ssize_t len, uint32_t pid)
{
    return table != NULL && (Py_ssize_t)pid < len && table[pid];
}

/* One pass's walk (see walk above): the gathered records in *blob and *ends (new references), the rest in *w; 0, or
 * -1 with an error set. */

static int walk_core(const Py_buffer *data, unsigned long long mask, unsigned long long cons,
                     unsigned long long prod, int final, long long floor, const unsigned char *table,
                     Py_ssize_t table_len, PyObject **blob_out, PyObject **ends_out, struct walked *w)
{
    PyObject *blob = NULL, *ends = NULL;
    /* A pass reads at most one ring's length, and offsets run on into the second mapping. */
    if (prod < cons || prod - cons > mask + 1 || (unsigned long long)data->len < 2 * (mask + 1)) {
        PyErr_SetString(PyExc_ValueError, "walk: positions or mapping do not describe one ring");
        return -1;
    }
    Py_ssize_t room = (Py_ssize_t)(prod - cons);
    blob = PyBytes_FromStringAndSize(NULL, room);
    ends = PyBytes_FromStringAndSize(NULL, (room / 16 + 1) * 8);
    if (blob == NULL || ends == NULL)
        goto fail;
    const unsigned char *base = data->buf;
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
        if (size > mask + 1 || at + 8 + size > (unsigned long long)data->len) {
            /* cannot be: the ring is corrupt, stop here rather than read past it */
            PyErr_SetString(PyExc_ValueError, "walk: a record longer than the ring");
            goto fail;
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
                    if (table != NULL) {
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
        goto fail;
    *blob_out = blob;
    *ends_out = ends;
    w->cons = cons;
    w->floor = floor;
    w->stop = stop;
    w->count = count;
    w->raised = raised;
    w->skipped = skipped;
    w->kinds = kinds;
    return 0;
fail:
    Py_XDECREF(blob);
    Py_XDECREF(ends);
    return -1;
}

/* The seeded lookup as a table (NULL for None); 0, or -1 with an error set. */
static int seeded_table(PyObject *seeded, Py_buffer *buf, const unsigned char **table, Py_ssize_t *len)
{
    *table = NULL;
    *len = 0;
    if (seeded == Py_None)
        return 0;
    if (PyObject_GetBuffer(seeded, buf, PyBUF_SIMPLE) < 0)
        return -1;
    *table = buf->len ? buf->buf : (const unsigned char *)"";
    *len = buf->len;
    return 0;
}

static PyObject *walk(PyObject *self, PyObject *args)
{
    Py_buffer data, seeded_buf;
    unsigned long long mask, cons, prod;
    int final;
    long long floor;
    PyObject *seeded, *blob, *ends, *result = NULL;
    const unsigned char *table;
    Py_ssize_t table_len;
    struct walked w;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*KKKpLO", &data, &mask, &cons, &prod, &final, &floor, &seeded))
        return NULL;
    if (seeded_table(seeded, &seeded_buf, &table, &table_len) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    if (walk_core(&data, mask, cons, prod, final, floor, table, table_len, &blob, &ends, &w) == 0) {
        result = Py_BuildValue("KNNnLnniL", w.cons, blob, ends, w.count, w.floor, w.raised, w.skipped, w.kinds,
                               w.stop);
    }
    if (table != NULL)
        PyBuffer_Release(&seeded_buf);
    PyBuffer_Release(&data);
    return result;
}

int intern_names(const struct name_slot *names, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((*names[i].at = PyUnicode_InternFromString(names[i].name)) == NULL)
            return -1;
    return 0;
}

int add_method_descriptor(PyObject *module, const char *name, PyMethodDef *def)
{
    PyObject *d = PyDescr_NewMethod(&PyBaseObject_Type, def);
    if (d == NULL || PyModule_AddObject(module, name, d) < 0) {
        Py_XDECREF(d);
        return -1;
    }
    return 0;
}

int call_keeping_error(PyObject *obj, PyObject *name, PyObject *arg)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *r = arg == NULL ? PyObject_CallMethodNoArgs(obj, name) : PyObject_CallMethodOneArg(obj, name, arg);
    if (r == NULL) {
        if (type != NULL) {
            PyErr_Clear();
            PyErr_Restore(type, value, tb);
        }
        return -1;
    }
    Py_DECREF(r);
    PyErr_Restore(type, value, tb);
    return type != NULL ? -1 : 0;
}

/* A reader's pass over the ring (see drain below) on the position words ``consumer`` and ``producer``, the data
 * pages ``data_obj``; 1 done (*w and *prod say how far), 0 nothing new, -1 an error set. */
int drain_pass(PyObject *consumer_obj, PyObject *producer_obj, PyObject *data_obj, unsigned long long mask,
               int final, long long floor, PyObject *seeded, PyObject *checked, unsigned long long *prod_out,
               struct walked *w)
{
    Py_buffer consumer, producer, data, seeded_buf;
    PyObject *blob = NULL, *ends = NULL;
    const unsigned char *table = NULL;
    Py_ssize_t table_len;
    int status = -1;
    if (PyObject_GetBuffer(consumer_obj, &consumer, PyBUF_WRITABLE) < 0)
        return -1;
    if (PyObject_GetBuffer(producer_obj, &producer, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&consumer);
        return -1;
    }
    if (PyObject_GetBuffer(data_obj, &data, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&consumer);
        PyBuffer_Release(&producer);
        return -1;
    }
    if (consumer.len < 8 || producer.len < 8 || ((uintptr_t)consumer.buf & 7) || ((uintptr_t)producer.buf & 7)) {
        PyErr_SetString(PyExc_ValueError, "drain: the position words must be 8 aligned bytes");
        goto done;
    }
    unsigned long long cons = *(unsigned long long *)consumer.buf;
    unsigned long long prod = __atomic_load_n((unsigned long long *)producer.buf, __ATOMIC_ACQUIRE);
    if (cons == prod) {
        status = 0;
        goto done;
    }
    if (seeded_table(seeded, &seeded_buf, &table, &table_len) < 0)
        goto done;
    if (walk_core(&data, mask, cons, prod, final, floor, table, table_len, &blob, &ends, w) < 0)
        goto done;
    if (w->count) {
        PyObject *r = PyObject_CallFunction(checked, "OOi", blob, ends, w->kinds);
        if (r == NULL)
            goto done;
        Py_DECREF(r);
    }
    if (w->stop < 0 && w->cons != cons)
        __atomic_store_n((unsigned long long *)consumer.buf, w->cons, __ATOMIC_RELEASE);
    *prod_out = prod;
    status = 1;
done:
    Py_XDECREF(blob);
    Py_XDECREF(ends);
    if (table != NULL)
        PyBuffer_Release(&seeded_buf);
    PyBuffer_Release(&consumer);
    PyBuffer_Release(&producer);
    PyBuffer_Release(&data);
    return status;
}

/* drain(consumer, producer, data, mask, final, floor, seeded, checked) -> None or (cons, prod, count, floor,
 * raised, skipped, stop): a reader's pass over the ring in one call. ``consumer`` and ``producer``: the ring's position
 * words (writable bytes-like of the consumer page's first 8 bytes; the producer page), read here (the producer's
 * with an acquire load). None when the ring holds nothing new. Otherwise walk()'s pass from the consumer's
 * position, its records handed to ``checked(blob, ends, kinds)`` (when there are any), and the space given back
 * to the kernel (a release store) when the walk did not stop before a record for Python (``stop`` >= 0: the
 * caller handles it, goes on from ``cons`` and gives the space back itself). */
static PyObject *drain(PyObject *self, PyObject *args)
{
    PyObject *consumer, *producer, *data, *seeded, *checked;
    unsigned long long mask, prod = 0;
    int final;
    long long floor;
    struct walked w;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOKpLOO", &consumer, &producer, &data, &mask, &final, &floor, &seeded, &checked))
        return NULL;
    int got = drain_pass(consumer, producer, data, mask, final, floor, seeded, checked, &prod, &w);
    if (got < 0)
        return NULL;
    if (got == 0)
        Py_RETURN_NONE;
    return Py_BuildValue("KKnLnnL", w.cons, prod, w.count, w.floor, w.raised, w.skipped, w.stop);
}


/* scan(data, min_size, block_at, rules, max_filetime) -> (rows, blocks, error): what etwmon.events._checked does
 * in Python (header checks record by record, then each extension block's known fields), with the same rows, the
 * same blocks and the same first error (message, offset) or None. ``min_size`` and ``block_at``: dicts by record
 * Type; ``rules``: int32 per tag (-1 any size, 0 text of even length, -8 a FILETIME, else the exact size). */

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
    return walk_fields(d, start + EXT_HEADER, start + length, NULL, rules, max_ft, NULL, msg, room) == 0;
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
 * does; for each tag the dict ``decode`` names ((attribute, decoder[, remembered])), out[attribute] =
 * decoder(value bytes), or remembered[value bytes] when that dict has it. A
 * field that runs past ``stop`` ends the walk. 1: done; 0: a field was refused (why in ``msg``, when given); -1: a
 * Python error. */
int walk_fields(const unsigned char *d, Py_ssize_t pos, Py_ssize_t stop, PyObject *decode, const int32_t *rules,
                long long max_ft, PyObject *out, char *msg, size_t room)
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
            int64_t t = 0;
            if (rule > 0 || (rule < 0 && size != 8)) {
                if (msg)
                    snprintf(msg, room, "extension field %u has %ld bytes, needs %ld", tag, size,
                             (long)(rule < 0 ? -rule : rule));
                return 0;
            }
            if (rule == 0 && (size & 1)) {
                if (msg)
                    snprintf(msg, room, "extension field %u holds text of odd length %ld", tag, size);
                return 0;
            }
            if (rule < 0)
                memcpy(&t, d + pos, 8);
            if (t < 0 || t > max_ft) {
                if (msg)
                    snprintf(msg, room, "extension field %u holds a time out of range", tag);
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
                /* (attribute, decoder, its remembered values): a value seen before is one look-up */
                PyObject *value = NULL;
                if (PyTuple_GET_SIZE(known) > 2 && PyDict_Check(PyTuple_GET_ITEM(known, 2))) {
                    value = PyDict_GetItemWithError(PyTuple_GET_ITEM(known, 2), raw);
                    if (value != NULL)
                        Py_INCREF(value);
                    else if (PyErr_Occurred()) {
                        Py_DECREF(raw);
                        return -1;
                    }
                }
                if (value == NULL)
                    value = PyObject_CallOneArg(PyTuple_GET_ITEM(known, 1), raw);
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

const int32_t *rules_of(PyObject *obj)
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
                           out, NULL, 0);
    PyBuffer_Release(&data);
    if (done == 1)
        return out;
    Py_XDECREF(out);
    if (done == 0)
        Py_RETURN_NONE;
    return NULL;
}

static PyMethodDef methods[] = {
    {"walk", walk, METH_VARARGS,
     "walk(data, mask, cons, prod, final, floor, seeded) -> (cons, blob, ends, count, floor, raised, skipped, "
     "kinds, stop): the wire records of a BPF ring pass gathered back to back (see etwmon/_speedups.c)."},
    {"drain", drain, METH_VARARGS,
     "drain(consumer, producer, data, mask, final, floor, seeded, checked) -> None or (cons, prod, count, floor, "
     "raised, skipped, stop): a reader's whole pass over a BPF ring in one call (see etwmon/_speedups.c)."},
    {"fold_plan", fold_plan, METH_VARARGS,
     "fold_plan(raw, starts, ends, prefix) -> (apply, rows, dropped): etwmon.backlog.fold_plan in C (see "
     "etwmon/_backlog.c); rows: the guids, 16 bytes each, back to back."},
    {"scan", scan, METH_VARARGS,
     "scan(data, min_size, block_at, rules, max_filetime) -> (rows, blocks, error): etwmon.events._checked in C "
     "(see etwmon/_speedups.c); error is (message, offset) or None."},
    {"fields", (PyCFunction)(void (*)(void))fields, METH_FASTCALL,
     "fields(data, pos, stop, decode, rules, max_filetime) -> dict or None: etwmon.events._fields in C (see "
     "etwmon/_speedups.c); None when a field is refused (the Python walk then raises the error)."},
    {"json_batch", json_batch, METH_VARARGS,
     "json_batch(data, rows, blocks, types, ctx, fallback) -> (lines, kinds): etwmon.batch_format's JSON lines "
     "in C (see etwmon/_json_lines.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "etwmon._speedups",
    .m_doc = "The bpf source's ring walk, the EventRing's common paths, parse's record checks and extension-field "
             "walk in C (optional).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__speedups(void)
{
    if (json_lines_init() < 0 || ring_init() < 0 || reader_init() < 0 || backlog_init() < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && (PyModule_AddFunctions(m, ring_methods) < 0 || ring_add_methods(m) < 0
                      || reader_add_methods(m) < 0 || backlog_add_methods(m) < 0))
        Py_CLEAR(m);
    return m;
}
