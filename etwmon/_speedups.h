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
int walk_fields(const unsigned char *d, Py_ssize_t pos, Py_ssize_t stop, PyObject *decode, const int32_t *rules,
                long long max_ft, PyObject *out, char *msg, size_t room);
const int32_t *rules_of(PyObject *obj);

/* _json_lines.c */
int json_lines_init(void);
PyObject *json_batch(PyObject *self, PyObject *args);

/* _ring.c */
int ring_init(void);
int ring_add_methods(PyObject *module);

/* _reader.c */
int reader_init(void);
int reader_add_methods(PyObject *module);
extern PyMethodDef ring_methods[];

#endif
