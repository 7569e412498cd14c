/* The statsd relay's hot path: batched UDP I/O (recvmmsg(2), sendmmsg(2):
 * one system call for hundreds of datagrams) and the per-line routing loop.
 *
 * Hashing stays in Python (carbonscale.ring): route() only looks names up in
 * the caches the relay keeps and hands back the names it has not seen. The
 * pure Python twins are carbonscale.relay.udpio (I/O) and route_py in
 * carbonscale.relay.statsd, used when the extension was not built.
 *
 *   recv_many(fd, max_msgs) -> (count, data)
 *       Read up to max_msgs datagrams without blocking. data is every
 *       datagram followed by b"\n", so data.split(b"\n") yields the metric
 *       lines of all of them. (0, b"") when nothing is queued.
 *   send_many(fd, datagrams) -> int
 *       Send a sequence of bytes on a connected socket; returns how many
 *       were sent before the socket would block.
 *   route(data, first, usable, second, pending) -> (metrics, malformed, refused, misses)
 *       See route_py in relay/statsd/placement.py: the same, line for line.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/uio.h>

/* The largest UDP payload over IPv4 is 65507 bytes: a slot this big never
 * truncates a datagram, so nothing is lost silently. Pages of a slot are only
 * touched as far as a datagram fills them. */
#define SLOT_SIZE 65536
#define MAX_BATCH 1024

static char *slots;
static struct mmsghdr *recv_hdrs;
static struct iovec *recv_iovs;
static int slots_allocated;

static int ensure_slots(int count) {
    if (count <= slots_allocated) return 0;
    free(slots);
    free(recv_hdrs);
    free(recv_iovs);
    slots = malloc((size_t)count * SLOT_SIZE);
    recv_hdrs = calloc((size_t)count, sizeof(struct mmsghdr));
    recv_iovs = calloc((size_t)count, sizeof(struct iovec));
    if (!slots || !recv_hdrs || !recv_iovs) {
        free(slots);
        free(recv_hdrs);
        free(recv_iovs);
        slots = NULL;
        recv_hdrs = NULL;
        recv_iovs = NULL;
        slots_allocated = 0;
        PyErr_NoMemory();
        return -1;
    }
    slots_allocated = count;
    return 0;
}

static PyObject *recv_many(PyObject *self, PyObject *args) {
    int fd, max_msgs;
    if (!PyArg_ParseTuple(args, "ii", &fd, &max_msgs)) return NULL;
    if (max_msgs < 1 || max_msgs > MAX_BATCH) {
        PyErr_Format(PyExc_ValueError, "max_msgs must be in 1..%d", MAX_BATCH);
        return NULL;
    }
    if (ensure_slots(max_msgs) < 0) return NULL;
    for (int i = 0; i < max_msgs; i++) {
        recv_iovs[i].iov_base = slots + (size_t)i * SLOT_SIZE;
        recv_iovs[i].iov_len = SLOT_SIZE;
        memset(&recv_hdrs[i].msg_hdr, 0, sizeof(struct msghdr));
        recv_hdrs[i].msg_hdr.msg_iov = &recv_iovs[i];
        recv_hdrs[i].msg_hdr.msg_iovlen = 1;
    }
    int got;
    do {
        got = recvmmsg(fd, recv_hdrs, (unsigned int)max_msgs, MSG_DONTWAIT, NULL);
    } while (got < 0 && errno == EINTR);
    if (got < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) return Py_BuildValue("iy#", 0, "", (Py_ssize_t)0);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    size_t total = 0;
    for (int i = 0; i < got; i++) total += recv_hdrs[i].msg_len + 1;
    PyObject *data = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (!data) return NULL;
    char *out = PyBytes_AS_STRING(data);
    for (int i = 0; i < got; i++) {
        memcpy(out, slots + (size_t)i * SLOT_SIZE, recv_hdrs[i].msg_len);
        out += recv_hdrs[i].msg_len;
        *out++ = '\n';
    }
    PyObject *result = Py_BuildValue("iN", got, data);
    return result;
}

static PyObject *send_many(PyObject *self, PyObject *args) {
    int fd;
    PyObject *seq_arg;
    if (!PyArg_ParseTuple(args, "iO", &fd, &seq_arg)) return NULL;
    PyObject *seq = PySequence_Fast(seq_arg, "datagrams must be a sequence of bytes");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    struct mmsghdr hdrs[MAX_BATCH];
    struct iovec iovs[MAX_BATCH];
    Py_ssize_t sent = 0;
    while (sent < n) {
        int batch = (int)((n - sent) > MAX_BATCH ? MAX_BATCH : (n - sent));
        for (int i = 0; i < batch; i++) {
            PyObject *item = items[sent + i];
            if (!PyBytes_Check(item)) {
                Py_DECREF(seq);
                PyErr_SetString(PyExc_TypeError, "every datagram must be bytes");
                return NULL;
            }
            iovs[i].iov_base = PyBytes_AS_STRING(item);
            iovs[i].iov_len = (size_t)PyBytes_GET_SIZE(item);
            memset(&hdrs[i], 0, sizeof(hdrs[i]));
            hdrs[i].msg_hdr.msg_iov = &iovs[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
        }
        int done;
        do {
            done = sendmmsg(fd, hdrs, (unsigned int)batch, 0);
        } while (done < 0 && errno == EINTR);
        if (done < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || sent > 0) break;
            Py_DECREF(seq);
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        sent += done;
        if (done < batch) break;
    }
    Py_DECREF(seq);
    return PyLong_FromSsize_t(sent);
}


/* Slot of a cached index object, or -1 (with an exception) when it is not an
 * integer in [0, limit). */
static Py_ssize_t slot_of(PyObject *value, Py_ssize_t limit) {
    Py_ssize_t slot = PyLong_AsSsize_t(value);
    if (slot == -1 && PyErr_Occurred()) return -1;
    if (slot < 0 || slot >= limit) {
        PyErr_SetString(PyExc_ValueError, "cached backend index out of range");
        return -1;
    }
    return slot;
}

/* A statsd value or sample rate as a number: 0 when it is none (the daemon
 * judges those), 1 finite (in *out), 2 not finite (inf, infinity, nan in any
 * case, or a decimal that overflows), -1 out of memory. Decimal means
 * [+-]?(D+(.D*)?|.D+)([eE][+-]?D+)?, which strtod and Python's float() read
 * alike (number_of in placement.py). */
static int number_of(const char *s, size_t n, double *out) {
    size_t i = 0;
    if (i < n && (s[i] == '+' || s[i] == '-')) i++;
    size_t rest = n - i;
    if ((rest == 3 && (!strncasecmp(s + i, "inf", 3) || !strncasecmp(s + i, "nan", 3))) ||
        (rest == 8 && !strncasecmp(s + i, "infinity", 8)))
        return 2;
    size_t digits = 0;
    while (i < n && s[i] >= '0' && s[i] <= '9') i++, digits++;
    if (i < n && s[i] == '.') {
        i++;
        while (i < n && s[i] >= '0' && s[i] <= '9') i++, digits++;
    }
    if (!digits) return 0;
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < n && (s[i] == '+' || s[i] == '-')) i++;
        size_t exponent = 0;
        while (i < n && s[i] >= '0' && s[i] <= '9') i++, exponent++;
        if (!exponent) return 0;
    }
    if (i != n) return 0;
    char small[64];
    char *buf = n < sizeof small ? small : malloc(n + 1);
    if (!buf) return -1;
    memcpy(buf, s, n);
    buf[n] = '\0';
    *out = strtod(buf, NULL);
    if (buf != small) free(buf);
    return isfinite(*out) ? 1 : 2;
}

/* 1 when a line's samples (the text after the name's ':') would make statsd
 * store a number carbon cannot: a value that is not finite (sets, type s,
 * hold any text) or a sample rate (@RATE) that is not a positive finite
 * number (@0 makes a counter infinite); 0 when not; -1 out of memory. */
static int refused_samples(const char *p, const char *end) {
    while (p <= end) {
        const char *colon = memchr(p, ':', (size_t)(end - p));
        const char *seg_end = colon ? colon : end;
        const char *bar = memchr(p, '|', (size_t)(seg_end - p));
        if (bar) {
            const char *type = bar + 1;
            const char *type_end = memchr(type, '|', (size_t)(seg_end - type));
            if (!type_end) type_end = seg_end;
            double value;
            if (!(type_end - type == 1 && *type == 's')) {
                int kind = number_of(p, (size_t)(bar - p), &value);
                if (kind) {
                    if (kind < 0) return -1;
                    if (kind == 2) return 1;
                }
            }
            const char *field = type_end;
            while (field < seg_end) {
                field++;
                const char *field_end = memchr(field, '|', (size_t)(seg_end - field));
                if (!field_end) field_end = seg_end;
                if (field < field_end && *field == '@') {
                    int kind = number_of(field + 1, (size_t)(field_end - field - 1), &value);
                    if (kind < 0) return -1;
                    if (kind == 2 || (kind == 1 && value <= 0)) return 1;
                }
                field = field_end;
            }
        }
        if (!colon) break;
        p = colon + 1;
    }
    return 0;
}

static PyObject *route(PyObject *self, PyObject *args) {
    Py_buffer data, usable;
    PyObject *first, *second, *pending;
    if (!PyArg_ParseTuple(args, "y*O!y*O!O!", &data, &PyDict_Type, &first, &usable,
                          &PyDict_Type, &second, &PyList_Type, &pending))
        return NULL;
    PyObject *misses = NULL;
    const Py_ssize_t count = usable.len;
    const unsigned char *up = usable.buf;
    if (PyList_GET_SIZE(pending) != 2 * count + 1) {
        PyErr_SetString(PyExc_ValueError, "pending needs 2 * backends + 1 lists");
        goto fail;
    }
    misses = PyList_New(0);
    if (!misses) goto fail;
    Py_ssize_t metrics = 0, malformed = 0, refused = 0;
    const char *p = data.buf, *end = p + data.len;
    while (p < end) {
        const char *newline = memchr(p, '\n', (size_t)(end - p));
        const char *line_end = newline ? newline : end;
        Py_ssize_t length = line_end - p;
        if (length) {
            metrics++;
            const char *colon = memchr(p, ':', (size_t)length);
            int bad = 0;
            if (!colon || colon == p || !memchr(colon, '|', (size_t)(line_end - colon))) {
                malformed++;
            } else if ((bad = refused_samples(colon + 1, line_end)) != 0) {
                if (bad < 0) {
                    PyErr_NoMemory();
                    goto fail;
                }
                refused++;
            } else {
                PyObject *name = PyBytes_FromStringAndSize(p, colon - p);
                PyObject *line = name ? PyBytes_FromStringAndSize(p, length) : NULL;
                if (!line) {
                    Py_XDECREF(name);
                    goto fail;
                }
                PyObject *target = NULL; /* borrowed: the list the line goes to */
                PyObject *index = PyDict_GetItemWithError(first, name);
                if (index) {
                    Py_ssize_t slot = slot_of(index, count);
                    if (slot < 0) goto fail_line;
                    if (!up[slot]) {
                        PyObject *rerouted = PyDict_GetItemWithError(second, name);
                        if (rerouted) {
                            slot = slot_of(rerouted, 2 * count + 1);
                            if (slot < 0) goto fail_line;
                        } else if (PyErr_Occurred()) {
                            goto fail_line;
                        } else {
                            slot = -1;
                        }
                    }
                    if (slot >= 0) target = PyList_GET_ITEM(pending, slot);
                } else if (PyErr_Occurred()) {
                    goto fail_line;
                }
                int failed;
                if (target) {
                    failed = PyList_Append(target, line);
                } else {
                    PyObject *miss = PyTuple_Pack(2, name, line);
                    failed = !miss || PyList_Append(misses, miss);
                    Py_XDECREF(miss);
                }
                Py_DECREF(name);
                Py_DECREF(line);
                if (failed) goto fail;
                goto next;
            fail_line:
                Py_DECREF(name);
                Py_DECREF(line);
                goto fail;
            }
        }
    next:
        p = line_end + 1;
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&usable);
    return Py_BuildValue("nnnN", metrics, malformed, refused, misses);
fail:
    Py_XDECREF(misses);
    PyBuffer_Release(&data);
    PyBuffer_Release(&usable);
    return NULL;
}

static PyMethodDef methods[] = {
    {"recv_many", recv_many, METH_VARARGS,
     "recv_many(fd, max_msgs) -> (count, data): up to max_msgs datagrams, each followed by "
     "a newline, without blocking; (0, b'') when none is queued."},
    {"send_many", send_many, METH_VARARGS,
     "send_many(fd, datagrams) -> int: send bytes objects on a connected socket with "
     "sendmmsg; returns how many were sent before it would block."},
    {"route", route, METH_VARARGS,
     "route(data, first, usable, second, pending) -> (metrics, malformed, refused, misses): "
     "route_py in carbonscale.relay.statsd, in C."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "carbonscale.relay._statsd",
    "The statsd relay's hot path (see udpio.py and statsd.route_py).", -1, methods,
};

PyMODINIT_FUNC PyInit__statsd(void) { return PyModule_Create(&module); }
