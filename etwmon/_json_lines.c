/* etwmon._speedups.json_batch: ``etwmon tail --json``'s lines for a whole batch in C, from the same pieces as
 * etwmon/batch_format.py (each field's JSON piece is made once per distinct value by Python and remembered; the
 * line around them, the numbers and the clock are put together here), so a line costs no Python frame unless a
 * value is new. tests/test_formats.py and tests/test_speedups.py hold both to the same bytes. */
#include "_speedups.h"

static PyObject *KEY_RULE_NAME, *KEY_COMMAND_LINE; /* interned at import */

int json_lines_init(void)
{
    KEY_RULE_NAME = PyUnicode_InternFromString("rule_name");
    KEY_COMMAND_LINE = PyUnicode_InternFromString("command_line");
    return KEY_RULE_NAME == NULL || KEY_COMMAND_LINE == NULL ? -1 : 0;
}

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

/* json_batch(data, rows, blocks, types, ctx, fallback) -> (lines, kinds): etwmon.batch_format's JSON form in C.
 * rows/blocks: scan's (every block checked: one refused here is a ValueError). types: a frozenset of record types
 * shown (None: all). ctx: (second_text, type_names, pieces, plans, quote, text_piece, flags_pieces, marker, rules,
 * max_filetime), see batch_format.py. fallback(offset, size): the line of a record of another type. */
PyObject *json_batch(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer data;
    PyObject *rows, *blocks, *types, *ctx, *fallback;
    if (!PyArg_ParseTuple(args, "y*O!O!OO!O", &data, &PyList_Type, &rows, &PyList_Type, &blocks, &types,
                          &PyTuple_Type, &ctx, &fallback))
        return NULL;
    PyObject *lines = NULL, *kinds = NULL, *result = NULL, *last_text = NULL;
    long long last_second = -1;
    text_t t = {NULL, 0, 0, 1};
    if (PyTuple_GET_SIZE(ctx) != 10) {
        PyErr_SetString(PyExc_TypeError, "json_batch: ctx must have 10 items");
        goto done;
    }
    PyObject *second_text = PyTuple_GET_ITEM(ctx, 0), *type_names = PyTuple_GET_ITEM(ctx, 1),
             *pieces_for = PyTuple_GET_ITEM(ctx, 2), *plans = PyTuple_GET_ITEM(ctx, 3),
             *quote = PyTuple_GET_ITEM(ctx, 4), *text_piece = PyTuple_GET_ITEM(ctx, 5),
             *flags_pieces = PyTuple_GET_ITEM(ctx, 6), *marker = PyTuple_GET_ITEM(ctx, 7);
    const int32_t *rules = rules_of(PyTuple_GET_ITEM(ctx, 8));
    long long max_ft = PyLong_AsLongLong(PyTuple_GET_ITEM(ctx, 9));
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
        if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != 4 || !PyTuple_Check(block) ||
            PyTuple_GET_SIZE(block) != 2) {
            PyErr_SetString(PyExc_TypeError, "json_batch: rows are (offset, type, size, time), blocks (start, end)");
            goto done;
        }
        offset = PyLong_AsSsize_t(PyTuple_GET_ITEM(row, 0));
        item = PyLong_AsLong(PyTuple_GET_ITEM(row, 1));
        size = PyLong_AsLong(PyTuple_GET_ITEM(row, 2));
        ft = PyLong_AsLongLong(PyTuple_GET_ITEM(row, 3));
        bstart = PyLong_AsSsize_t(PyTuple_GET_ITEM(block, 0));
        bend = PyLong_AsSsize_t(PyTuple_GET_ITEM(block, 1));
        if (PyErr_Occurred())
            goto done;
        if (ft < 0) {
            PyErr_SetString(PyExc_ValueError, "json_batch: a row's Time is negative");
            goto done;
        }
        /* (rows come from scan, which checked all this: checked again, as nothing here may read past a record) */
        long need = HEADER; /* what the fields read below need; other types are the Python formatter's */
        if (item == 1 || item == 101)
            need = offset >= 0 && offset + 34 <= data.len ? CMDLINE_AT + 2 * (d[offset + 32] | d[offset + 33] << 8)
                                                          : CMDLINE_AT;
        else if (item == 4)
            need = 32;
        else if (item == 2 || item == 3 || item == 100)
            need = 24;
        if (offset < 0 || size < HEADER || offset + size > data.len || bstart < 0 || bend > data.len ||
            (bstart && (bstart < offset || bend > offset + size)) || size < need) {
            PyErr_SetString(PyExc_ValueError, "json_batch: a row lies outside the data or its record");
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
                    int walked = walk_fields(d, bstart + EXT_HEADER, bstart + length, decode, rules, max_ft, pieces,
                                             NULL, 0);
                    if (walked <= 0) {
                        if (walked == 0)
                            PyErr_Format(PyExc_ValueError, "json_batch: the block of record %zd was not checked", i);
                        Py_DECREF(pieces);
                        Py_DECREF(item_obj);
                        goto done;
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
        uint32_t a = u32_at(body), b = item == 100 ? 0 : u32_at(body + 4);
        uint32_t c = (is_create || item == 4) ? u32_at(body + 8) : 0;
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
    result = PyTuple_Pack(2, lines, kinds);
done:
    Py_XDECREF(lines);
    Py_XDECREF(kinds);
    Py_XDECREF(last_text);
    PyMem_Free(t.buf);
    PyBuffer_Release(&data);
    return result;
}

