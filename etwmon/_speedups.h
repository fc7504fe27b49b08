/* What the parts of etwmon._speedups share: the wire format's offsets and the extension-field walk. */
#ifndef ETWMON_SPEEDUPS_H
#define ETWMON_SPEEDUPS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define HEADER 16      /* a record's header: Type, Size, Time */
#define CMDLINE_AT 34  /* a create's command line */
#define CREATE_SIZE 40 /* a create's fixed part, the command line's NUL included */
#define EXT_HEADER 8   /* an extension block's header: version, length, flags */

static inline uint32_t u32_at(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* _speedups.c */
/* What a pass's walk took: the position after it, the latest Time, where it stopped (-1: it did not), the records
 * gathered, the times raised, the records skipped, what the batch holds. */
struct walked {
    unsigned long long cons;
    long long floor, stop;
    Py_ssize_t count, raised, skipped;
    int kinds;
};
/* The attribute names a part looks up, interned once at import: 0, or -1 with an error set. */
struct name_slot {
    PyObject **at;
    const char *name;
};
int intern_names(const struct name_slot *names, size_t n);
/* A method for a Python class's body (bound like its own methods: no reference from an instance to itself), added
 * to the module as ``name``: 0, or -1 with an error set. */
int add_method_descriptor(PyObject *module, const char *name, PyMethodDef *def);
/* obj.name() (arg NULL) or obj.name(arg), keeping an error already set (the first error wins): 0, or -1 when an error
 * is set afterwards (the earlier one, or this call's). For a cleanup that must run whatever happened before it. */
int call_keeping_error(PyObject *obj, PyObject *name, PyObject *arg);
int drain_pass(PyObject *consumer_obj, PyObject *producer_obj, PyObject *data_obj, unsigned long long mask,
               int final, long long floor, PyObject *seeded, PyObject *checked, unsigned long long *prod_out,
               struct walked *w);
int walk_fields(const unsigned char *d, Py_ssize_t pos, Py_ssize_t stop, PyObject *decode, const int32_t *rules,
                long long max_ft, PyObject *out, char *msg, size_t room);
const int32_t *rules_of(PyObject *obj);

/* _json_lines.c */
int json_lines_init(void);
PyObject *json_batch(PyObject *self, PyObject *args);

/* _ring.c */
int ring_init(void);
int ring_add_methods(PyObject *module);

/* _backlog.c */
PyObject *fold_plan(PyObject *self, PyObject *args);
int backlog_init(void);
int backlog_add_methods(PyObject *module);

/* _reader.c */
int reader_init(void);
int reader_add_methods(PyObject *module);
extern PyMethodDef ring_methods[];

#endif
