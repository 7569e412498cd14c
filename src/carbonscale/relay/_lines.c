/*
 * carbonscale.relay._lines: unpickled carbon datapoints -> line protocol.
 *
 * The C twin of carbonscale.relay.lines.format_points_py (the reference; the
 * tests check both give the same bytes and counts on random input). Per-point
 * work in Python costs more than the whole rest of the pickle relay, which is
 * why this loop is in C. It only ever sees objects a globals-free unpickler
 * can make (int, float, str, bytes, bytearray, list, tuple, dict, set, None,
 * bool), and calls no Python code.
 *
 * format_points(frame, now, max_name, max_output) -> (bytes, points, invalid)
 *   frame       the unpickled object: a list or tuple of entries, else ValueError
 *   now         timestamp that replaces -1 (carbon's "use the current time")
 *   max_name    longest metric name accepted, in bytes
 *   max_output  ValueError when the frame's line output would exceed this
 *
 * An entry is (path, (ts, value)), (path, [(ts, value), ...]) or
 * (path, (ts, value), (ts, value), ...), lists or tuples at every level.
 * Numbers are int, float, or a str/bytes float() accepts. A point that cannot
 * be written is skipped and counted in `invalid`; an entry whose shape is
 * unrecognisable counts as one.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>

#define MAX_EXACT_DOUBLE 9007199254740992.0 /* 2**53 */
#define INT64_BOUND 9223372036854775808.0   /* 2**63 */

typedef struct {
    char *buf;
    Py_ssize_t len;
    Py_ssize_t cap;
    Py_ssize_t limit;
} out_t;

/* 0 ok, -1 MemoryError set, -2 over the output limit (no exception). */
static int
out_reserve(out_t *o, Py_ssize_t n)
{
    if (o->len + n > o->limit)
        return -2;
    if (o->len + n <= o->cap)
        return 0;
    Py_ssize_t cap = o->cap ? o->cap : 4096;
    while (cap < o->len + n)
        cap *= 2;
    char *buf = PyMem_Realloc(o->buf, (size_t)cap);
    if (buf == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    o->buf = buf;
    o->cap = cap;
    return 0;
}

static int
is_seq(PyObject *x)
{
    return PyList_Check(x) || PyTuple_Check(x);
}

/* Borrowed items of a list or tuple (no Python code runs while we hold them). */
static PyObject **
seq_items(PyObject *x, Py_ssize_t *n)
{
    if (PyList_Check(x)) {
        *n = PyList_GET_SIZE(x);
        return ((PyListObject *)x)->ob_item;
    }
    *n = PyTuple_GET_SIZE(x);
    return ((PyTupleObject *)x)->ob_item;
}

/* A number as carbon reads it: float(x). 1 int (*iv), 0 double (*dv), -1 invalid. */
static int
read_number(PyObject *x, long long *iv, double *dv)
{
    if (PyLong_Check(x)) {
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(x, &overflow);
        if (!overflow) {
            if (v == -1 && PyErr_Occurred()) {
                PyErr_Clear();
                return -1;
            }
            *iv = v;
            return 1;
        }
        double d = PyLong_AsDouble(x);
        if (d == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            return -1;
        }
        *dv = d;
        return 0;
    }
    if (PyFloat_Check(x)) {
        *dv = PyFloat_AS_DOUBLE(x);
        return 0;
    }
    if (PyUnicode_Check(x) || PyBytes_Check(x) || PyByteArray_Check(x)) {
        PyObject *f = PyFloat_FromString(x);
        if (f == NULL) {
            PyErr_Clear();
            return -1;
        }
        *dv = PyFloat_AS_DOUBLE(f);
        Py_DECREF(f);
        return 0;
    }
    return -1;
}

/* The metric name's bytes, or NULL when it cannot be written on a line. */
static const char *
read_name(PyObject *x, Py_ssize_t max_name, Py_ssize_t *n)
{
    const char *s;
    if (PyUnicode_Check(x)) {
        s = PyUnicode_AsUTF8AndSize(x, n);
        if (s == NULL) { /* lone surrogates */
            PyErr_Clear();
            return NULL;
        }
    }
    else if (PyBytes_Check(x)) {
        s = PyBytes_AS_STRING(x);
        *n = PyBytes_GET_SIZE(x);
    }
    else if (PyByteArray_Check(x)) {
        s = PyByteArray_AS_STRING(x);
        *n = PyByteArray_GET_SIZE(x);
    }
    else {
        return NULL;
    }
    if (*n == 0 || *n > max_name)
        return NULL;
    /* Whitespace or a control byte would end the name or the line early: a
     * name with "\n" in it could inject points under other names. */
    for (Py_ssize_t i = 0; i < *n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c <= 0x20 || c == 0x7f)
            return NULL;
    }
    return s;
}

/* Decimal digits of v into buf (at least 21 bytes); returns the length.
 * snprintf("%lld") costs more than everything else per point. */
static Py_ssize_t
format_int(char *buf, long long v)
{
    char tmp[24];
    int n = 0;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    Py_ssize_t len = 0;
    if (v < 0)
        buf[len++] = '-';
    while (n)
        buf[len++] = tmp[--n];
    return len;
}

/* repr(v) without dtoa, for finite non-integral 1e-4 <= |v| < 2**52 (where
 * repr writes fixed notation); 0 for anything else, which PyOS_double_to_string
 * then does (it costs ~0.5 us a value; full-precision values are common).
 *
 * repr(v) is the shortest decimal that reads back as v, the one nearest v
 * among those. With v = m * 2**-s exactly (m < 2**53, s <= 66 in this range),
 * the p-digit decimal nearest v, M * 10**-k, comes exactly from 128-bit
 * integers: M = round(m * 10**k / 2**s), half to even. It reads back as v
 * when it lies inside v's rounding interval: |M * 2**s - m * 10**k| below
 * half of 10**k (a quarter below v when m = 2**52, whose lower neighbour is
 * twice as close), the bound itself counting when m is even (strtod rounds
 * ties to even). If some p-digit decimal reads back as v the nearest one
 * does, and when the shortest has fewer than 15 digits the nearest 15-digit
 * one is it followed by zeros; so trying p = 15, 16, 17 and dropping trailing
 * zeros gives repr's digits. 17 digits always read back. */
typedef unsigned __int128 u128;
static u128 P10[24]; /* 10**0 .. 10**23 */

static void
init_powers(void)
{
    P10[0] = 1;
    for (int i = 1; i < 24; i++)
        P10[i] = P10[i - 1] * 10;
}

/* The p-digit M and its k with M * 10**-k nearest m * 2**-s; 0 if k leaves the table. */
static int
nearest_digits(unsigned long long m, int s, int p, int k, unsigned long long *M, int *kout)
{
    for (int tries = 0; tries < 3; tries++) {
        if (k < 0 || k > 22)
            return 0;
        u128 x = (u128)m * P10[k];
        u128 q = x >> s;
        u128 r = x & ((((u128)1) << s) - 1);
        u128 half = ((u128)1) << (s - 1);
        if (r > half || (r == half && (q & 1)))
            q++;
        if (q >= P10[p]) {
            k--;
            continue;
        }
        if (q < P10[p - 1]) {
            k++;
            continue;
        }
        *M = (unsigned long long)q;
        *kout = k;
        return 1;
    }
    return 0;
}

static int
reads_back(unsigned long long m, int s, unsigned long long M, int k)
{
    u128 a = ((u128)M) << s;
    u128 x = (u128)m * P10[k];
    u128 t = P10[k];
    int even = !(m & 1);
    if (a >= x) {
        u128 d = a - x;
        if (d >= t)
            return 0;
        return 2 * d < t || (2 * d == t && even);
    }
    u128 d = x - a;
    if (d >= t)
        return 0;
    if (m == (1ULL << 52))
        return 4 * d < t || (4 * d == t && even);
    return 2 * d < t || (2 * d == t && even);
}

/* a = m * 2**-s >= 10**d, exactly (|d| <= 22 here). */
static int
at_least_pow10(unsigned long long m, int s, int d)
{
    if (d >= 0)
        return (u128)m >= (P10[d] << s);
    return (u128)m * P10[-d] >= (((u128)1) << s);
}

static Py_ssize_t
format_shortest(char *buf, double v)
{
    double a = fabs(v);
    if (!(a >= 1e-4 && a < 4503599627370496.0) || a == trunc(a))
        return 0;
    int e;
    double f = frexp(a, &e); /* a = f * 2**e, 0.5 <= f < 1 */
    unsigned long long m = (unsigned long long)ldexp(f, 53);
    int s = 53 - e; /* a = m * 2**-s, 1 <= s <= 66 here */
    /* log10 rounds up just below a power of ten: set the exponent exactly. */
    int d10 = (int)floor(log10(a));
    while (!at_least_pow10(m, s, d10))
        d10--;
    while (at_least_pow10(m, s, d10 + 1))
        d10++;
    unsigned long long M = 0;
    int k = 0, found = 0;
    for (int p = 15; p <= 17 && !found; p++) {
        if (!nearest_digits(m, s, p, p - 1 - d10, &M, &k))
            return 0;
        found = reads_back(m, s, M, k);
    }
    if (!found)
        return 0;
    while (M % 10 == 0 && k > 0) {
        M /= 10;
        k--;
    }
    if (k <= 0)
        return 0;
    char dig[24];
    int n = 0;
    do {
        dig[n++] = (char)('0' + M % 10);
        M /= 10;
    } while (M);
    /* dig holds the n digits backwards; the point goes k digits from the right */
    Py_ssize_t len = 0;
    if (v < 0)
        buf[len++] = '-';
    if (n <= k) {
        buf[len++] = '0';
        buf[len++] = '.';
        for (int i = 0; i < k - n; i++)
            buf[len++] = '0';
        while (n)
            buf[len++] = dig[--n];
    }
    else {
        while (n > k)
            buf[len++] = dig[--n];
        buf[len++] = '.';
        while (n)
            buf[len++] = dig[--n];
    }
    return len;
}

/* Appends " value timestamp\n" after the name. 1 written, 0 invalid point, <0 error. */
static int
write_point(out_t *o, const char *name, Py_ssize_t name_len, PyObject *point, long long now)
{
    long long iv = 0;
    double dv = 0.0;
    Py_ssize_t n;
    PyObject **pv = seq_items(point, &n);
    if (n != 2)
        return 0;

    /* timestamp: int(float(ts)), -1 meaning now */
    long long ts;
    int kind = read_number(pv[0], &iv, &dv);
    if (kind < 0)
        return 0;
    if (kind == 1) {
        ts = iv;
    }
    else {
        if (!isfinite(dv))
            return 0;
        dv = trunc(dv);
        if (!(dv >= -INT64_BOUND && dv < INT64_BOUND))
            return 0;
        ts = (long long)dv;
    }
    if (ts == -1)
        ts = now;

    /* value: exact for int64 and integral doubles below 2**53, else repr() */
    char numbuf[48];
    char *repr = NULL;
    const char *value;
    Py_ssize_t value_len;
    kind = read_number(pv[1], &iv, &dv);
    if (kind < 0)
        return 0;
    if (kind == 0) {
        if (!isfinite(dv))
            return 0;
        if (dv == trunc(dv) && fabs(dv) < MAX_EXACT_DOUBLE) {
            iv = (long long)dv;
            kind = 1;
        }
    }
    if (kind == 1) {
        value_len = format_int(numbuf, iv);
        value = numbuf;
    }
    else if ((value_len = format_shortest(numbuf, dv)) > 0) {
        value = numbuf;
    }
    else {
        repr = PyOS_double_to_string(dv, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
        if (repr == NULL)
            return -1;
        value = repr;
        value_len = (Py_ssize_t)strlen(repr);
    }

    char tsbuf[24];
    Py_ssize_t ts_len = format_int(tsbuf, ts);
    int rc = out_reserve(o, name_len + value_len + ts_len + 3);
    if (rc == 0) {
        char *p = o->buf + o->len;
        memcpy(p, name, (size_t)name_len);
        p += name_len;
        *p++ = ' ';
        memcpy(p, value, (size_t)value_len);
        p += value_len;
        *p++ = ' ';
        memcpy(p, tsbuf, (size_t)ts_len);
        p += ts_len;
        *p++ = '\n';
        o->len = p - o->buf;
    }
    if (repr != NULL)
        PyMem_Free(repr);
    return rc == 0 ? 1 : rc;
}

static PyObject *
format_points(PyObject *module, PyObject *args)
{
    PyObject *frame;
    long long now;
    Py_ssize_t max_name, max_output;
    if (!PyArg_ParseTuple(args, "OLnn:format_points", &frame, &now, &max_name, &max_output))
        return NULL;
    if (!is_seq(frame)) {
        PyErr_Format(PyExc_ValueError, "frame holds a %.50s, not a list of datapoints",
                     Py_TYPE(frame)->tp_name);
        return NULL;
    }
    out_t o = {NULL, 0, 0, max_output};
    Py_ssize_t points = 0, invalid = 0, n_entries;
    PyObject **entries = seq_items(frame, &n_entries);

    for (Py_ssize_t e = 0; e < n_entries; e++) {
        PyObject *entry = entries[e];
        Py_ssize_t n_fields;
        if (!is_seq(entry)) {
            invalid++;
            continue;
        }
        PyObject **fields = seq_items(entry, &n_fields);
        if (n_fields < 2) {
            invalid++;
            continue;
        }
        /* The points of this entry: fields[1:] when there are several, or the
         * items of fields[1] when it is itself a sequence of points. */
        PyObject **pts;
        Py_ssize_t n_pts;
        if (n_fields > 2) {
            pts = fields + 1;
            n_pts = n_fields - 1;
        }
        else if (!is_seq(fields[1])) {
            invalid++;
            continue;
        }
        else {
            Py_ssize_t n_inner;
            PyObject **inner = seq_items(fields[1], &n_inner);
            if (n_inner == 0) {
                invalid++;
                continue;
            }
            if (!is_seq(inner[0])) {
                pts = fields + 1; /* the single point (ts, value) */
                n_pts = 1;
            }
            else {
                pts = inner;
                n_pts = n_inner;
            }
        }
        Py_ssize_t name_len;
        const char *name = read_name(fields[0], max_name, &name_len);
        if (name == NULL) {
            invalid += n_pts;
            continue;
        }
        for (Py_ssize_t i = 0; i < n_pts; i++) {
            if (!is_seq(pts[i])) {
                invalid++;
                continue;
            }
            int rc = write_point(&o, name, name_len, pts[i], now);
            if (rc == 1) {
                points++;
            }
            else if (rc == 0) {
                invalid++;
            }
            else {
                PyMem_Free(o.buf);
                if (rc == -2)
                    PyErr_Format(PyExc_ValueError,
                                 "frame expands to more than %zd bytes of line protocol",
                                 max_output);
                return NULL;
            }
        }
    }
    PyObject *data = PyBytes_FromStringAndSize(o.buf ? o.buf : "", o.len);
    PyMem_Free(o.buf);
    if (data == NULL)
        return NULL;
    return Py_BuildValue("(Nnn)", data, points, invalid);
}

/*
 * check_memo(frame) -> None, or ValueError
 *
 * Walks the pickle's opcodes the way the unpickler will, without building
 * anything, and refuses a memo index (PUT, BINPUT, LONG_BINPUT) at or past
 * the frame's length, or an argument running past the frame's end. CPython's
 * unpickler grows its memo array to twice the largest index it is given:
 * LONG_BINPUT 1078405844 in a 200-byte frame made it allocate and zero 16 GiB
 * (43 s here). Honest pickles number their memo entries from 0 and each PUT
 * takes at least two bytes, so every index is below the frame's length. The
 * walk stops at STOP or at an opcode it does not know (where the unpickler
 * fails anyway); twin: carbonscale.relay.lines.check_memo_py.
 */
static int
read_le(const unsigned char *p, int n, unsigned long long *out)
{
    unsigned long long v = 0;
    for (int i = n - 1; i >= 0; i--)
        v = (v << 8) | p[i];
    *out = v;
    return 0;
}

static PyObject *
check_memo(PyObject *self, PyObject *args)
{
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "y*", &view))
        return NULL;
    const unsigned char *buf = view.buf;
    Py_ssize_t size = view.len, pos = 0;
    unsigned long long limit = (unsigned long long)size, value;
    const char *error = NULL;

    while (pos < size && error == NULL) {
        unsigned char op = buf[pos++];
        Py_ssize_t fixed = -1; /* bytes of a fixed-size argument */
        int prefix = 0;        /* bytes of a length prefix */
        int lines = 0;         /* newline-terminated arguments */
        int memo = 0;          /* the argument is a memo index to check */
        switch (op) {
        case '.': /* STOP */
            goto done;
        case '(': case '0': case '1': case '2': case 'N': case 'a': case 'e':
        case 'b': case 'd': case '}': case 'l': case ']': case 't': case ')':
        case 's': case 'u': case 'R': case 'o': case 'Q':
        case 0x81: case 0x85: case 0x86: case 0x87: case 0x88: case 0x89:
        case 0x8f: case 0x90: case 0x91: case 0x92: case 0x93: case 0x94:
        case 0x97: case 0x98:
            fixed = 0;
            break;
        case 'K': case 'h': case 0x80: case 0x82:
            fixed = 1;
            break;
        case 'q': /* BINPUT: below 256, never large */
            fixed = 1;
            break;
        case 'M': case 0x83:
            fixed = 2;
            break;
        case 'J': case 'j': case 0x84:
            fixed = 4;
            break;
        case 'r': /* LONG_BINPUT */
            fixed = 4;
            memo = 1;
            break;
        case 'G': case 0x95:
            fixed = 8;
            break;
        case 'I': case 'L': case 'F': case 'S': case 'V': case 'g': case 'P':
            lines = 1;
            break;
        case 'p': /* PUT: decimal index */
            lines = 1;
            memo = 1;
            break;
        case 'c': case 'i':
            lines = 2;
            break;
        case 'U': case 'C': case 0x8c: case 0x8a:
            prefix = 1;
            break;
        case 'T': case 'B': case 'X': case 0x8b:
            prefix = 4;
            break;
        case 0x8d: case 0x8e: case 0x96:
            prefix = 8;
            break;
        default:
            goto done; /* unknown: the unpickler stops here too */
        }
        if (fixed >= 0) {
            if (size - pos < fixed) {
                error = "the pickle ends inside an opcode's argument";
                break;
            }
            if (memo) {
                read_le(buf + pos, 4, &value);
                if (value >= limit)
                    error = "memo index past the frame's length";
            }
            pos += fixed;
        } else if (prefix) {
            if (size - pos < prefix) {
                error = "the pickle ends inside a length";
                break;
            }
            read_le(buf + pos, prefix, &value);
            pos += prefix;
            if (op == 0x8b && (value & 0x80000000ULL)) {
                error = "negative length";
                break;
            }
            if (value > (unsigned long long)(size - pos)) {
                error = "a length runs past the frame's end";
                break;
            }
            pos += (Py_ssize_t)value;
        } else {
            for (int n = 0; n < lines; n++) {
                const unsigned char *start = buf + pos;
                const unsigned char *nl = memchr(start, '\n', (size_t)(size - pos));
                if (nl == NULL) {
                    error = "the pickle ends inside a line argument";
                    break;
                }
                if (memo) {
                    /* A decimal longer than the frame's own length's is past it. */
                    unsigned long long v = 0;
                    int digits = 0, bad = 0;
                    for (const unsigned char *c = start; c < nl; c++) {
                        if (*c < '0' || *c > '9' || ++digits > 19) {
                            bad = 1;
                            break;
                        }
                        v = v * 10 + (unsigned long long)(*c - '0');
                    }
                    if (bad || digits == 0 || v >= limit)
                        error = "memo index past the frame's length";
                }
                pos = (Py_ssize_t)(nl - buf) + 1;
            }
        }
    }
done:
    PyBuffer_Release(&view);
    if (error != NULL) {
        PyErr_SetString(PyExc_ValueError, error);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"check_memo", check_memo, METH_VARARGS,
     "check_memo(frame) -> None; ValueError on a memo index or length past the frame"},
    {"format_points", format_points, METH_VARARGS,
     "format_points(frame, now, max_name, max_output) -> (bytes, points, invalid)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "carbonscale.relay._lines",
    "Unpickled carbon datapoints to line protocol (C twin of carbonscale.relay.lines).", -1,
    methods,
};

PyMODINIT_FUNC
PyInit__lines(void)
{
    init_powers();
    return PyModule_Create(&module);
}
