/* One-pass FASTA unit parser and item hashing for prott5nv.fasta (optional accelerator).
 *
 * scan() parses a unit of whole records -- `buf[:size]`, starting and ending with a newline, as
 * prott5nv.fasta._read_units makes them -- in one pass with the GIL released: it writes the store's
 * "SEQ\nSEQ\n" layout (residues upper-cased through `table`), the ids ("ID\n" each), and per record the
 * residue count, id length, header line and the span of the rest of the header; valid records outside
 * [min_len, max_len] are counted, not written. Anything unusual
 * (text before the first header, an empty id or record, a byte the table calls invalid, a '*' that is
 * not last) returns None: the Python careful path then parses the unit and words the error.
 *
 * `table` (256 bytes): a letter >= 'A' is the residue written for that byte; SKIP bytes are deleted
 * (whitespace; gaps under --strip-gaps); STOP is '*' (allowed once, after the last residue); 0 is invalid.
 *
 * compact() keeps the items of a packed "ITEM\nITEM\n" buffer whose `keep` byte is set (a filter).
 * hash_items() gives a 64-bit hash of each item of a packed "ITEM\nITEM\n" buffer (for duplicate
 * detection; equal items always hash equal, collisions are confirmed by the caller).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define SKIP 1
#define STOP 2

static int is_blank(unsigned char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f'; }

/* Upper-case a line into `d`; nonzero unless every byte is a letter other than J/j, i.e. a residue
 * whatever the policy (the table maps those letters to themselves, upper-cased). Branch-free, so the
 * compiler vectorises it; a line that fails is redone byte by byte through the table. */
static int letters(const unsigned char *restrict s, unsigned char *restrict d, Py_ssize_t n) {
    unsigned char bad = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        unsigned char u = s[k] & 0xDF;
        d[k] = u;
        bad |= (unsigned char)((unsigned char)(u - 'A') > 25) | (unsigned char)(u == 'J');
    }
    return bad;
}

static PyObject *new_bytes(Py_ssize_t n) { return PyBytes_FromStringAndSize(NULL, n > 0 ? n : 0); }

static PyObject *scan(PyObject *self, PyObject *args) {
    Py_buffer in, tab;
    Py_ssize_t size, first_line, min_len, max_len, too_short = 0, too_long = 0;
    if (!PyArg_ParseTuple(args, "y*ny*nnn", &in, &size, &tab, &first_line, &min_len, &max_len)) return NULL;
    PyObject *result = NULL, *packed = NULL, *ids = NULL, *lengths = NULL, *id_lengths = NULL, *lines = NULL,
             *spans = NULL;
    if (tab.len != 256 || size < 2 || size > in.len) {
        PyErr_SetString(PyExc_ValueError, "scan: bad table or size");
        goto done;
    }
    const unsigned char *b = (const unsigned char *)in.buf, *t = (const unsigned char *)tab.buf;
    Py_ssize_t heads = 0;
    for (const unsigned char *p = b; (p = memchr(p, '>', (size_t)(b + size - p))) != NULL; p++) heads++;
    packed = new_bytes(size);
    ids = new_bytes(size);
    lengths = new_bytes(heads * 8);
    id_lengths = new_bytes(heads * 8);
    lines = new_bytes(heads * 8);
    spans = new_bytes(heads * 16);
    if (!packed || !ids || !lengths || !id_lengths || !lines || !spans) goto done;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(packed), *iout = (unsigned char *)PyBytes_AS_STRING(ids);
    int64_t *len = (int64_t *)PyBytes_AS_STRING(lengths), *ilen = (int64_t *)PyBytes_AS_STRING(id_lengths);
    int64_t *line_of = (int64_t *)PyBytes_AS_STRING(lines), *span = (int64_t *)PyBytes_AS_STRING(spans);
    Py_ssize_t n = 0, o = 0, io = 0, line = first_line, i = 1;
    int ok = b[0] == '\n' && b[size - 1] == '\n' && b[1] == '>';

    Py_BEGIN_ALLOW_THREADS
    while (ok && i < size) { /* b[i] == '>' starts a header line */
        if (n >= heads) { ok = 0; break; }
        line_of[n] = line;
        Py_ssize_t id0 = ++i, io0 = io;
        while (b[i] != '\n' && !is_blank(b[i])) iout[io++] = b[i++];
        ilen[n] = i - id0;
        if (i == id0) { ok = 0; break; }
        iout[io++] = '\n';
        span[2 * n] = i;
        const unsigned char *nl = memchr(b + i, '\n', (size_t)(size - i));
        i = nl - b;
        span[2 * n + 1] = i;
        /* the body: lines up to the next line that starts with '>' (or the end of the unit) */
        Py_ssize_t o0 = o, stop = -1, width = 0; /* stop: where the '*' was, in the output */
        while (i < size) { /* b[i] == '\n' */
            line++;
            if (++i >= size || b[i] == '>') break;
            /* most lines are as wide as the one before: try that before searching for the newline */
            if (width && i + width < size && b[i + width] == '\n' && !letters(b + i, out + o, width)) {
                o += width;
                i += width;
                continue;
            }
            const unsigned char *end = memchr(b + i, '\n', (size_t)(size - i));
            Py_ssize_t e = end - b;
            if (!letters(b + i, out + o, e - i)) { /* the common case */
                width = e - i;
                o += e - i;
                i = e;
                continue;
            }
            for (; i < e; i++) { /* the line holds deleted bytes, a '*' or an invalid byte */
                unsigned char r = t[b[i]];
                if (r > STOP) {
                    out[o++] = r;
                } else if (r == STOP && stop < 0) {
                    stop = o;
                } else if (r != SKIP) {
                    ok = 0; /* an invalid byte or a second '*' */
                    break;
                }
            }
            if (!ok) break;
        }
        if (!ok || o == o0 || (stop >= 0 && stop != o)) { ok = 0; break; } /* empty, or residues after '*' */
        if (o - o0 < min_len || o - o0 > max_len) { /* valid, but filtered out by length */
            too_short += o - o0 < min_len;
            too_long += o - o0 > max_len;
            o = o0;
            io = io0;
            continue;
        }
        len[n++] = o - o0;
        out[o++] = '\n';
    }
    Py_END_ALLOW_THREADS

    if (!ok) {
        result = Py_None;
        Py_INCREF(result);
        goto done;
    }
    if (_PyBytes_Resize(&packed, o) < 0 || _PyBytes_Resize(&ids, io) < 0 || _PyBytes_Resize(&lengths, n * 8) < 0 ||
        _PyBytes_Resize(&id_lengths, n * 8) < 0 || _PyBytes_Resize(&lines, n * 8) < 0 ||
        _PyBytes_Resize(&spans, n * 16) < 0)
        goto done;
    result = Py_BuildValue("(OOOOOOnnn)", packed, lengths, ids, id_lengths, lines, spans, line - first_line,
                           too_short, too_long);
done:
    Py_XDECREF(packed);
    Py_XDECREF(ids);
    Py_XDECREF(lengths);
    Py_XDECREF(id_lengths);
    Py_XDECREF(lines);
    Py_XDECREF(spans);
    PyBuffer_Release(&in);
    PyBuffer_Release(&tab);
    return result;
}

static uint64_t mix(uint64_t h) { /* splitmix64 finaliser */
    h ^= h >> 30;
    h *= 0xbf58476d1ce4e5b9ULL;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebULL;
    return h ^ (h >> 31);
}

static uint64_t hash_bytes(const unsigned char *p, Py_ssize_t n) {
    uint64_t h = 0x9e3779b97f4a7c15ULL ^ (uint64_t)n, w;
    Py_ssize_t k = 0;
    for (; k + 8 <= n; k += 8) {
        memcpy(&w, p + k, 8);
        h = (h ^ mix(w)) * 0x100000001b3ULL;
    }
    w = 0;
    memcpy(&w, p + k, (size_t)(n - k));
    return mix(h ^ mix(w ^ 0xff51afd7ed558ccdULL));
}

static PyObject *compact(PyObject *self, PyObject *args) {
    Py_buffer items, lengths, keep;
    if (!PyArg_ParseTuple(args, "y*y*y*", &items, &lengths, &keep)) return NULL;
    Py_ssize_t n = lengths.len / 8, total = 0, kept = 0;
    const int64_t *len = (const int64_t *)lengths.buf;
    const unsigned char *k = (const unsigned char *)keep.buf, *p = (const unsigned char *)items.buf;
    PyObject *out = NULL;
    if (keep.len != n) {
        PyErr_SetString(PyExc_ValueError, "compact: keep and lengths differ in length");
        goto done;
    }
    for (Py_ssize_t r = 0; r < n; r++) {
        total += len[r] + 1;
        kept += k[r] ? len[r] + 1 : 0;
    }
    if (total > items.len) {
        PyErr_SetString(PyExc_ValueError, "compact: lengths exceed the buffer");
        goto done;
    }
    out = new_bytes(kept);
    if (out) {
        unsigned char *q = (unsigned char *)PyBytes_AS_STRING(out);
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t r = 0, at = 0; r < n; at += len[r] + 1, r++) {
            if (k[r]) {
                memcpy(q, p + at, (size_t)len[r] + 1);
                q += len[r] + 1;
            }
        }
        Py_END_ALLOW_THREADS
    }
done:
    PyBuffer_Release(&items);
    PyBuffer_Release(&lengths);
    PyBuffer_Release(&keep);
    return out;
}

static PyObject *hash_items(PyObject *self, PyObject *args) {
    Py_buffer items, lengths;
    if (!PyArg_ParseTuple(args, "y*y*", &items, &lengths)) return NULL;
    Py_ssize_t n = lengths.len / 8;
    PyObject *out = new_bytes(n * 8);
    if (out) {
        const unsigned char *p = (const unsigned char *)items.buf;
        const int64_t *len = (const int64_t *)lengths.buf;
        uint64_t *h = (uint64_t *)PyBytes_AS_STRING(out);
        Py_ssize_t at = 0, total = 0;
        for (Py_ssize_t r = 0; r < n; r++) total += len[r] + 1;
        if (total > items.len) {
            PyErr_SetString(PyExc_ValueError, "hash_items: lengths exceed the buffer");
            Py_CLEAR(out);
        } else {
            Py_BEGIN_ALLOW_THREADS
            for (Py_ssize_t r = 0; r < n; r++) {
                h[r] = hash_bytes(p + at, len[r]);
                at += len[r] + 1;
            }
            Py_END_ALLOW_THREADS
        }
    }
    PyBuffer_Release(&items);
    PyBuffer_Release(&lengths);
    return out;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS,
     "scan(buf, size, table, first_line, min_len, max_len) -> (packed, lengths, ids, id_lengths, lines, spans, "
     "newlines, too_short, too_long) | None"},
    {"compact", compact, METH_VARARGS, "compact(packed, lengths, keep) -> the kept items of a packed buffer"},
    {"hash_items", hash_items, METH_VARARGS, "hash_items(packed, lengths) -> uint64 hashes as bytes"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastscan", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastscan(void) { return PyModule_Create(&module); }
