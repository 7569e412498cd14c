/*
 * carbonscale._hotcount: points per metric name for `carbonscale ops hot-metrics`.
 *
 * The Python twin is carbonscale.ops.hotmetrics' own path (line text collected
 * in chunks and counted by carbonscale.ops.namecount, pickle frames decoded by
 * the pickle relay's carbonscale.relay.lines.decode_frame); the tests check
 * both, and dpkt's full decode, give the same report. Per point, Python costs
 * more than a whole packet may (the goal is 500,000 packets/s on one core).
 *
 * Counts(statsd) counts names in an exact hash table (names compared by their
 * bytes; the hash only picks the slot):
 *
 *   add_text(data)              lines of text: a line protocol name is the
 *                               line's first field as bytes.split() cuts it, a
 *                               statsd name the text before the line's first
 *                               ':'; a last line without '\n' counts too
 *   add_spans(buffer, begins, ends)
 *                               add_text of each buffer[begin:end] (datagrams)
 *   add_segments(prefix, buffer, begins, ends) -> rest
 *                               prefix + the segments, one stream: its lines up
 *                               to the last '\n' counted, the bytes after it
 *                               returned (a TCP connection's back-to-back
 *                               segments, without joining them first)
 *   add_pickle_frames(data, offset, max_name, max_output)
 *                               -> (offset, unknown, invalid)
 *                               carbon pickle frames (4-byte big-endian length,
 *                               a pickled list of (name, (timestamp, value)))
 *                               from offset on, counted as
 *                               relay.lines.decode_frame + the line count would
 *                               count them. It stops at the first frame it
 *                               does not know for sure (unknown: True; the
 *                               caller decodes that frame in Python, then calls
 *                               again after it) or at the first incomplete
 *                               one (unknown: False). invalid: the points
 *                               decode_frame would have skipped.
 *   items() -> dict {name: points};  points: all points counted
 *
 * The pickle decoder is a small pickle machine for what carbon's senders
 * write with protocols 0 to 2 (and the common protocol 4 opcodes): marks,
 * lists, tuples, str and bytes, ints, floats, None, bools, the memo. Anything
 * else (another opcode, a string with escapes, a number written as a string,
 * a long int, a non-UTF-8 str, a stack or memo the unpickler would refuse,
 * bytes after STOP) makes the frame "unknown": never guessed, never dropped.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define INT64_BOUND 9223372036854775808.0 /* 2**63 */
/* The longest line a point's value and timestamp add to its name: repr() of
 * a float is at most 24 bytes, an int64 20; two spaces and '\n'. */
#define POINT_OVERHEAD 48
/* Memo indexes above this make the frame unknown (honest pickles number
 * their memo from 0; relay.lines.check_memo bounds them by the frame size). */
#define MAX_MEMO (1 << 22)

/* ------------------------------------------------------------ growable arrays */

static int
grow(void **array, Py_ssize_t *cap, Py_ssize_t need, size_t item)
{
    if (need <= *cap)
        return 0;
    Py_ssize_t cap2 = *cap ? *cap : 64;
    while (cap2 < need)
        cap2 *= 2;
    void *p = PyMem_Realloc(*array, (size_t)cap2 * item);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    *array = p;
    *cap = cap2;
    return 0;
}

#define GROW(array, cap, need) grow((void **)&(array), &(cap), (need), sizeof(*(array)))

/* ------------------------------------------------------------ the name table */

typedef struct {
    uint64_t hash; /* 0: empty slot */
    Py_ssize_t at; /* the name's bytes in `names` */
    Py_ssize_t len;
    long long count;
} slot_t;

/* Pickle machine values. */
enum { V_OTHER, V_INT, V_FLOAT, V_STR, V_BYTES, V_TUPLE, V_LIST };

typedef struct {
    int type;
    long long i;
    double d;
    const char *p; /* str/bytes */
    Py_ssize_t n;  /* str/bytes length, sequence length */
    Py_ssize_t head, tail; /* sequence: first and last chunk, -1 when empty */
} val_t;

typedef struct {
    Py_ssize_t start, count, next; /* items[start : start + count], next chunk */
} chunk_t;

typedef struct {
    const char *name;
    Py_ssize_t len;
    long long points;
} pending_t;

/* Names are hashed and their slots prefetched QUEUE at a time: the table is
 * larger than the caches, and a miss per point is most of the count's cost. */
#define QUEUE 32

typedef struct {
    const char *name;
    Py_ssize_t len;
    long long points;
    uint64_t hash;
} queued_t;

/* fast_frame's memo entries. */
enum { F_OTHER, F_NAME, F_POINT, F_ENTRY };

typedef struct {
    unsigned int serial;
    int kind;
    int name_ok, point_ok;
    const char *name;
    Py_ssize_t len;
} fmemo_t;

typedef struct {
    PyObject_HEAD
    int statsd;
    slot_t *slots;
    Py_ssize_t mask, used; /* slots: mask + 1 */
    char *names;
    Py_ssize_t names_len, names_cap;
    long long points;
    char *carry; /* add_segments' line crossing segments */
    Py_ssize_t carry_len, carry_cap;
    /* the pickle machine's arrays, reused frame after frame */
    val_t *vals;
    Py_ssize_t vals_len, vals_cap;
    Py_ssize_t *items;
    Py_ssize_t items_len, items_cap;
    chunk_t *chunks;
    Py_ssize_t chunks_len, chunks_cap;
    Py_ssize_t *stack;
    Py_ssize_t stack_len, stack_cap;
    Py_ssize_t *marks;
    Py_ssize_t marks_len, marks_cap;
    Py_ssize_t *memo;
    Py_ssize_t memo_cap, memo_top, memo_set;
    pending_t *pending;
    Py_ssize_t pending_len, pending_cap;
    /* names waiting to be counted, their slots being prefetched */
    queued_t queue[QUEUE];
    int queued;
    /* fast_frame's memo: what each index holds, valid for frame `serial` */
    fmemo_t *fmemo;
    Py_ssize_t fmemo_cap, fmemo_set;
    unsigned int serial;
} CountsObject;

static uint64_t
hash_name(const char *s, Py_ssize_t n)
{
    uint64_t h = 0x9E3779B97F4A7C15ULL * (uint64_t)(n + 1);
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, s, 8);
        h = (h ^ w) * 0xBF58476D1CE4E5B9ULL;
        h ^= h >> 31;
        s += 8;
        n -= 8;
    }
    uint64_t w = 0;
    memcpy(&w, s, (size_t)n);
    h = (h ^ w) * 0x94D049BB133111EBULL;
    h ^= h >> 29;
    return h ? h : 1;
}

static int
table_resize(CountsObject *self, Py_ssize_t size)
{
    slot_t *slots = PyMem_Calloc((size_t)size, sizeof(slot_t));
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t mask = size - 1;
    if (self->slots != NULL) {
        for (Py_ssize_t i = 0; i <= self->mask; i++) {
            slot_t *old = &self->slots[i];
            if (!old->hash)
                continue;
            Py_ssize_t j = (Py_ssize_t)(old->hash & (uint64_t)mask);
            while (slots[j].hash)
                j = (j + 1) & mask;
            slots[j] = *old;
        }
        PyMem_Free(self->slots);
    }
    self->slots = slots;
    self->mask = mask;
    return 0;
}

static int
count_hashed(CountsObject *self, const char *name, Py_ssize_t len, long long points, uint64_t h)
{
    Py_ssize_t j = (Py_ssize_t)(h & (uint64_t)self->mask);
    for (;;) {
        slot_t *s = &self->slots[j];
        if (!s->hash)
            break;
        if (s->hash == h && s->len == len && memcmp(self->names + s->at, name, (size_t)len) == 0) {
            s->count += points;
            self->points += points;
            return 0;
        }
        j = (j + 1) & self->mask;
    }
    if (GROW(self->names, self->names_cap, self->names_len + len) < 0)
        return -1;
    memcpy(self->names + self->names_len, name, (size_t)len);
    slot_t *s = &self->slots[j];
    s->hash = h;
    s->at = self->names_len;
    s->len = len;
    s->count = points;
    self->names_len += len;
    self->points += points;
    if (++self->used * 2 > self->mask + 1)
        return table_resize(self, (self->mask + 1) * 2);
    return 0;
}

static int
count_name(CountsObject *self, const char *name, Py_ssize_t len, long long points)
{
    return count_hashed(self, name, len, points, hash_name(name, len));
}

static int
flush_names(CountsObject *self)
{
    int n = self->queued;
    self->queued = 0;
    /* the slots are in cache by now: fetch the names they hold next */
    for (int i = 0; i < n; i++) {
        slot_t *slot = &self->slots[self->queue[i].hash & (uint64_t)self->mask];
        if (slot->hash == self->queue[i].hash)
            __builtin_prefetch(self->names + slot->at);
    }
    for (int i = 0; i < n; i++) {
        queued_t *q = &self->queue[i];
        if (count_hashed(self, q->name, q->len, q->points, q->hash) < 0)
            return -1;
    }
    return 0;
}

/* A name counted by the next flush_names: it must stay where it is until then
 * (the caller's buffer, flushed before the call returns). */
static inline int
queue_name(CountsObject *self, const char *name, Py_ssize_t len, long long points)
{
    queued_t *q = &self->queue[self->queued++];
    q->name = name;
    q->len = len;
    q->points = points;
    q->hash = hash_name(name, len);
    __builtin_prefetch(&self->slots[q->hash & (uint64_t)self->mask]);
    return self->queued == QUEUE ? flush_names(self) : 0;
}

/* ------------------------------------------------------------ lines */

static inline int
is_space(unsigned char c)
{
    return c == ' ' || (c >= '\t' && c <= '\r');
}

/* One line (without its '\n'): its name queued (queue) or counted now. */
static inline int
count_line(CountsObject *self, const char *p, const char *end, int queue)
{
    const char *q;
    if (self->statsd) {
        if (p == end)
            return 0;
        q = memchr(p, ':', (size_t)(end - p));
        if (q == NULL)
            q = end;
    }
    else {
        while (p < end && is_space((unsigned char)*p))
            p++;
        if (p == end)
            return 0;
        q = p;
        while (q < end && !is_space((unsigned char)*q))
            q++;
    }
    return queue ? queue_name(self, p, q - p, 1) : count_name(self, p, q - p, 1);
}

#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL

/* Bit 7 of each byte of w below 0x21 (bytes >= 0x80 never); exact up to the
 * lowest flagged byte, which is all the callers look at. */
static inline uint64_t
below_0x21(uint64_t w)
{
    return (w - 0x21 * ONES) & ~w & HIGHS;
}

static inline uint64_t
equal_to(uint64_t w, unsigned char c)
{
    uint64_t x = w ^ (c * ONES);
    return (x - ONES) & ~x & HIGHS;
}

/* The end of the name starting at p: the first byte that is ':' or '\n'
 * (statsd), or at most 0x20 (line protocol), read eight bytes at a time. */
static inline const char *
name_end(const char *p, const char *end, int statsd)
{
    while (end - p >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        uint64_t m = statsd ? (equal_to(w, ':') | equal_to(w, '\n')) : below_0x21(w);
        if (m)
            return p + (__builtin_ctzll(m) >> 3);
        p += 8;
    }
    if (statsd) {
        while (p < end && *p != ':' && *p != '\n')
            p++;
    }
    else {
        while (p < end && (unsigned char)*p > 0x20)
            p++;
    }
    return p;
}

static int
count_text(CountsObject *self, const char *p, Py_ssize_t n)
{
    const char *end = p + n;
    while (p < end) {
        /* The common line: a name from its first byte to a space, '\n' or (statsd)
         * ':'; anything else (leading whitespace, a control byte) line by line. */
        const char *q = name_end(p, end, self->statsd);
        int plain = q > p && (q == end || *q == '\n' || *q == ' ' || *q == ':');
        if (plain && (self->statsd || *q != ':')) {
            if (queue_name(self, p, q - p, 1) < 0)
                return -1;
            if (q < end && *q != '\n')
                q = memchr(q, '\n', (size_t)(end - q));
            p = (q == NULL || q == end) ? end : q + 1;
            continue;
        }
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *line_end = nl ? nl : end;
        if (count_line(self, p, line_end, 1) < 0)
            return -1;
        p = line_end + 1;
    }
    return 0;
}

static int
carry_append(CountsObject *self, const char *p, Py_ssize_t n)
{
    if (GROW(self->carry, self->carry_cap, self->carry_len + n) < 0)
        return -1;
    memcpy(self->carry + self->carry_len, p, (size_t)n);
    self->carry_len += n;
    return 0;
}

/* A stream's next piece: whole lines counted where they lie, a line cut
 * across pieces gathered in carry first. */
static int
stream_piece(CountsObject *self, const char *p, Py_ssize_t n)
{
    const char *end = p + n;
    if (self->carry_len) {
        const char *nl = memchr(p, '\n', (size_t)n);
        if (nl == NULL)
            return carry_append(self, p, n);
        if (carry_append(self, p, nl - p) < 0)
            return -1;
        if (count_line(self, self->carry, self->carry + self->carry_len, 0) < 0)
            return -1;
        self->carry_len = 0;
        p = nl + 1;
    }
    const char *last = p;
    for (const char *q = end; q > p; q--) {
        if (q[-1] == '\n') {
            last = q;
            break;
        }
    }
    if (last > p && count_text(self, p, last - p - 1) < 0)
        return -1;
    return carry_append(self, last, end - last);
}

/* Spans given as two sequences of offsets (lists of int) of one length: the
   caller releases *begins and *ends (NULL or a reference) either way. */
static int
span_offsets(PyObject *begins_arg, PyObject *ends_arg, PyObject **begins, PyObject **ends,
             Py_ssize_t *n)
{
    *begins = PySequence_Fast(begins_arg, "offsets must be a sequence of int");
    if (*begins == NULL)
        return -1;
    *ends = PySequence_Fast(ends_arg, "offsets must be a sequence of int");
    if (*ends == NULL)
        return -1;
    *n = PySequence_Fast_GET_SIZE(*begins);
    if (*n != PySequence_Fast_GET_SIZE(*ends)) {
        PyErr_SetString(PyExc_ValueError, "begins and ends differ in length");
        return -1;
    }
    return 0;
}

static int
span(PyObject *begins, PyObject *ends, Py_ssize_t i, Py_ssize_t size, Py_ssize_t *b,
     Py_ssize_t *e)
{
    *b = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(begins, i));
    *e = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(ends, i));
    if ((*b == -1 || *e == -1) && PyErr_Occurred())
        return -1;
    if (*b < 0 || *e < *b || *e > size) {
        PyErr_SetString(PyExc_ValueError, "a span lies outside the buffer");
        return -1;
    }
    return 0;
}

/* piece(self, data[begin:end]) for every span, then the queued names counted. */
static int
each_span(CountsObject *self, const Py_buffer *data, PyObject *begins, PyObject *ends,
          Py_ssize_t n, int (*piece)(CountsObject *, const char *, Py_ssize_t))
{
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t b, e;
        if (span(begins, ends, i, data->len, &b, &e) < 0)
            return -1;
        if (piece(self, (const char *)data->buf + b, e - b) < 0)
            return -1;
    }
    return flush_names(self);
}

static PyObject *
counts_add_text(CountsObject *self, PyObject *args)
{
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "y*:add_text", &data))
        return NULL;
    int rc = count_text(self, data.buf, data.len);
    if (flush_names(self) < 0)
        rc = -1;
    PyBuffer_Release(&data);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
counts_add_spans(CountsObject *self, PyObject *args)
{
    Py_buffer data;
    PyObject *begins_arg, *ends_arg, *begins = NULL, *ends = NULL;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "y*OO:add_spans", &data, &begins_arg, &ends_arg))
        return NULL;
    PyObject *result = NULL;
    if (span_offsets(begins_arg, ends_arg, &begins, &ends, &n) < 0)
        goto done;
    if (each_span(self, &data, begins, ends, n, count_text) < 0)
        goto done;
    result = Py_None;
    Py_INCREF(result);
done:
    self->queued = 0;
    Py_XDECREF(begins);
    Py_XDECREF(ends);
    PyBuffer_Release(&data);
    return result;
}

static PyObject *
counts_add_segments(CountsObject *self, PyObject *args)
{
    Py_buffer prefix, data;
    PyObject *begins_arg, *ends_arg, *begins = NULL, *ends = NULL;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "y*y*OO:add_segments", &prefix, &data, &begins_arg, &ends_arg))
        return NULL;
    PyObject *result = NULL;
    self->carry_len = 0;
    if (span_offsets(begins_arg, ends_arg, &begins, &ends, &n) < 0)
        goto done;
    if (stream_piece(self, prefix.buf, prefix.len) < 0)
        goto done;
    if (each_span(self, &data, begins, ends, n, stream_piece) < 0)
        goto done;
    result = PyBytes_FromStringAndSize(self->carry, self->carry_len);
done:
    self->queued = 0;
    self->carry_len = 0;
    Py_XDECREF(begins);
    Py_XDECREF(ends);
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&data);
    return result;
}

/* ------------------------------------------------------------ pickle frames */

/* Outcome of one frame: counted, unknown (Python decodes it), or an error set. */
#define KNOWN 0
#define UNKNOWN 1
#define FAILED (-1)

static Py_ssize_t
new_val(CountsObject *self, int type)
{
    if (GROW(self->vals, self->vals_cap, self->vals_len + 1) < 0)
        return -1;
    val_t *v = &self->vals[self->vals_len];
    v->type = type;
    v->n = 0;
    v->head = v->tail = -1;
    return self->vals_len++;
}

static int
push(CountsObject *self, Py_ssize_t v)
{
    if (v < 0 || GROW(self->stack, self->stack_cap, self->stack_len + 1) < 0)
        return FAILED;
    self->stack[self->stack_len++] = v;
    return KNOWN;
}

static inline Py_ssize_t
fence(CountsObject *self)
{
    return self->marks_len ? self->marks[self->marks_len - 1] : 0;
}

/* Appends stack[from:] to a sequence as one chunk. */
static int
extend_seq(CountsObject *self, Py_ssize_t seq, Py_ssize_t from)
{
    Py_ssize_t k = self->stack_len - from;
    if (k == 0)
        return KNOWN;
    if (GROW(self->items, self->items_cap, self->items_len + k) < 0 ||
        GROW(self->chunks, self->chunks_cap, self->chunks_len + 1) < 0)
        return FAILED;
    memcpy(self->items + self->items_len, self->stack + from, (size_t)k * sizeof(Py_ssize_t));
    val_t *v = &self->vals[seq];
    if (v->tail >= 0) {
        chunk_t *t = &self->chunks[v->tail];
        if (t->start + t->count == self->items_len) { /* the items last added: grow it */
            t->count += k;
            goto added;
        }
    }
    chunk_t *c = &self->chunks[self->chunks_len];
    c->start = self->items_len;
    c->count = k;
    c->next = -1;
    if (v->tail >= 0)
        self->chunks[v->tail].next = self->chunks_len;
    else
        v->head = self->chunks_len;
    v->tail = self->chunks_len++;
added:
    v->n += k;
    self->items_len += k;
    self->stack_len = from;
    return KNOWN;
}

/* stack[from:] replaced by one new tuple or list of them. */
static int
build_seq(CountsObject *self, int type, Py_ssize_t from)
{
    Py_ssize_t v = new_val(self, type);
    if (v < 0 || extend_seq(self, v, from) < 0)
        return FAILED;
    return push(self, v);
}

static int
pop_mark(CountsObject *self, Py_ssize_t *mark)
{
    if (!self->marks_len)
        return UNKNOWN;
    *mark = self->marks[--self->marks_len];
    return KNOWN;
}

static int
memo_put(CountsObject *self, Py_ssize_t index, Py_ssize_t limit)
{
    if (self->stack_len <= fence(self) || index < 0 || index >= limit || index >= MAX_MEMO)
        return UNKNOWN;
    if (index >= self->memo_top) {
        if (GROW(self->memo, self->memo_cap, index + 1) < 0)
            return FAILED;
        for (Py_ssize_t i = self->memo_top; i <= index; i++)
            self->memo[i] = -1;
        self->memo_top = index + 1;
    }
    if (self->memo[index] < 0)
        self->memo_set++;
    self->memo[index] = self->stack[self->stack_len - 1];
    return KNOWN;
}

static int
memo_get(CountsObject *self, Py_ssize_t index)
{
    if (index < 0 || index >= self->memo_top || self->memo[index] < 0)
        return UNKNOWN;
    return push(self, self->memo[index]);
}

/* A str's bytes are the UTF-8 the unpickler decodes: ASCII as it is, anything
 * else only if strict UTF-8 (then str.encode() gives the same bytes back). */
static int
push_str(CountsObject *self, const char *p, Py_ssize_t n, int type)
{
    if (type == V_STR) {
        unsigned char high = 0;
        for (Py_ssize_t i = 0; i < n; i++)
            high |= (unsigned char)p[i];
        if (high & 0x80) {
            PyObject *s = PyUnicode_DecodeUTF8(p, n, "strict");
            if (s == NULL) {
                PyErr_Clear();
                return UNKNOWN;
            }
            Py_DECREF(s);
        }
    }
    Py_ssize_t v = new_val(self, type);
    if (v < 0)
        return FAILED;
    self->vals[v].p = p;
    self->vals[v].n = n;
    return push(self, v);
}

static int
push_int(CountsObject *self, long long i)
{
    Py_ssize_t v = new_val(self, V_INT);
    if (v < 0)
        return FAILED;
    self->vals[v].i = i;
    return push(self, v);
}

static uint64_t
le(const unsigned char *p, int n)
{
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* Decimal digits [-]D+ of at most 18 digits without a leading zero (or "0");
 * 1 and *out, or 0 for anything else. */
static int
decimal(const unsigned char *p, const unsigned char *end, long long *out)
{
    int negative = p < end && *p == '-';
    p += negative;
    Py_ssize_t n = end - p;
    if (n < 1 || n > 18 || (n > 1 && *p == '0'))
        return 0;
    long long v = 0;
    for (; p < end; p++) {
        if (*p < '0' || *p > '9')
            return 0;
        v = v * 10 + (*p - '0');
    }
    *out = negative ? -v : v;
    return 1;
}

/* The pickle in frame[0:n] run into self->vals; *result its object. */
static int
run_pickle(CountsObject *self, const unsigned char *frame, Py_ssize_t n, Py_ssize_t *result)
{
    const unsigned char *p = frame, *end = frame + n;
    self->vals_len = self->items_len = self->chunks_len = 0;
    self->stack_len = self->marks_len = 0;
    self->memo_top = self->memo_set = 0;
    int rc;
#define NEED(k)                                                                                    \
    do {                                                                                           \
        if (end - p < (k))                                                                         \
            return UNKNOWN;                                                                        \
    } while (0)
#define CHECK(call)                                                                                \
    do {                                                                                           \
        if ((rc = (call)) != KNOWN)                                                                \
            return rc;                                                                             \
    } while (0)
    while (p < end) {
        unsigned char op = *p++;
        const unsigned char *line = NULL, *line_end = NULL;
        if (op == 'I' || op == 'L' || op == 'F' || op == 'S' || op == 'V' || op == 'p' ||
            op == 'g') {
            line = p;
            line_end = memchr(p, '\n', (size_t)(end - p));
            if (line_end == NULL)
                return UNKNOWN;
            p = line_end + 1;
        }
        switch (op) {
        case 0x80: /* PROTO */
            NEED(1);
            if (*p++ > 5)
                return UNKNOWN;
            break;
        case 0x95: /* FRAME: the unpickler wants its length to be there */
            NEED(8);
            if (le(p, 8) > (uint64_t)(end - p - 8))
                return UNKNOWN;
            p += 8;
            break;
        case '(': /* MARK */
            if (GROW(self->marks, self->marks_cap, self->marks_len + 1) < 0)
                return FAILED;
            self->marks[self->marks_len++] = self->stack_len;
            break;
        case ')': /* EMPTY_TUPLE */
            CHECK(build_seq(self, V_TUPLE, self->stack_len));
            break;
        case ']': /* EMPTY_LIST */
            CHECK(build_seq(self, V_LIST, self->stack_len));
            break;
        case 't': /* TUPLE */
        case 'l': { /* LIST */
            Py_ssize_t mark;
            CHECK(pop_mark(self, &mark));
            CHECK(build_seq(self, op == 't' ? V_TUPLE : V_LIST, mark));
            break;
        }
        case 0x85: /* TUPLE1 */
        case 0x86: /* TUPLE2 */
        case 0x87: { /* TUPLE3 */
            Py_ssize_t k = op - 0x84;
            if (self->stack_len - fence(self) < k)
                return UNKNOWN;
            CHECK(build_seq(self, V_TUPLE, self->stack_len - k));
            break;
        }
        case 'a': { /* APPEND */
            if (self->stack_len - 1 <= fence(self))
                return UNKNOWN;
            Py_ssize_t list = self->stack[self->stack_len - 2];
            if (self->vals[list].type != V_LIST)
                return UNKNOWN;
            CHECK(extend_seq(self, list, self->stack_len - 1));
            break;
        }
        case 'e': { /* APPENDS */
            Py_ssize_t mark;
            CHECK(pop_mark(self, &mark));
            /* the list must lie above the enclosing mark, as for APPEND */
            if (mark <= fence(self) || self->vals[self->stack[mark - 1]].type != V_LIST)
                return UNKNOWN;
            CHECK(extend_seq(self, self->stack[mark - 1], mark));
            break;
        }
        case 'N': /* NONE */
            CHECK(push(self, new_val(self, V_OTHER)));
            break;
        case 0x88: /* NEWTRUE: an int to float() and "%d" */
        case 0x89: /* NEWFALSE */
            CHECK(push_int(self, op == 0x88));
            break;
        case 'K': /* BININT1 */
            NEED(1);
            CHECK(push_int(self, p[0]));
            p += 1;
            break;
        case 'M': /* BININT2 */
            NEED(2);
            CHECK(push_int(self, (long long)le(p, 2)));
            p += 2;
            break;
        case 'J': /* BININT */
            NEED(4);
            CHECK(push_int(self, (int32_t)(uint32_t)le(p, 4)));
            p += 4;
            break;
        case 0x8a: { /* LONG1 */
            NEED(1);
            int k = p[0];
            NEED(1 + k);
            if (k > 8)
                return UNKNOWN;
            uint64_t u = le(p + 1, k);
            if (k > 0 && k < 8 && (p[k] & 0x80))
                u |= ~0ULL << (8 * k);
            CHECK(push_int(self, (long long)u));
            p += 1 + k;
            break;
        }
        case 'G': { /* BINFLOAT, big-endian */
            NEED(8);
            uint64_t u = 0;
            for (int i = 0; i < 8; i++)
                u = (u << 8) | p[i];
            double d;
            memcpy(&d, &u, 8);
            Py_ssize_t v = new_val(self, V_FLOAT);
            if (v < 0)
                return FAILED;
            self->vals[v].d = d;
            CHECK(push(self, v));
            p += 8;
            break;
        }
        case 'X': /* BINUNICODE */
        case 'T': /* BINSTRING: bytes (encoding="bytes") */
        case 'B': /* BINBYTES */
        case 0x8c: /* SHORT_BINUNICODE */
        case 'U': /* SHORT_BINSTRING */
        case 'C': { /* SHORT_BINBYTES */
            int width = (op == 'X' || op == 'T' || op == 'B') ? 4 : 1;
            NEED(width);
            uint64_t k = le(p, width);
            if (op == 'T' && (k & 0x80000000U))
                return UNKNOWN;
            p += width;
            if (k > (uint64_t)(end - p))
                return UNKNOWN;
            CHECK(push_str(self, (const char *)p, (Py_ssize_t)k,
                           (op == 'X' || op == 0x8c) ? V_STR : V_BYTES));
            p += k;
            break;
        }
        case 'S': { /* STRING: 'text' or "text"; escapes are Python's */
            Py_ssize_t k = line_end - line;
            if (k < 2 || line[0] != line[k - 1] || (line[0] != '\'' && line[0] != '"') ||
                memchr(line, '\\', (size_t)k))
                return UNKNOWN;
            CHECK(push_str(self, (const char *)line + 1, k - 2, V_BYTES));
            break;
        }
        case 'V': { /* UNICODE (raw-unicode-escape): plain ASCII only */
            for (const unsigned char *c = line; c < line_end; c++)
                if (*c >= 0x80 || *c == '\\')
                    return UNKNOWN;
            CHECK(push_str(self, (const char *)line, line_end - line, V_STR));
            break;
        }
        case 'I': /* INT: "00" and "01" are False and True */
        case 'L': { /* LONG */
            long long v;
            const unsigned char *digits_end = line_end;
            if (op == 'L' && digits_end > line && digits_end[-1] == 'L')
                digits_end--;
            if (op == 'I' && line_end - line == 2 && line[0] == '0' && (line[1] == '0' || line[1] == '1'))
                v = line[1] == '1';
            else if (!decimal(line, digits_end, &v))
                return UNKNOWN;
            CHECK(push_int(self, v));
            break;
        }
        case 'F': { /* FLOAT: the unpickler's own conversion */
            char text[64];
            Py_ssize_t k = line_end - line;
            if (k == 0 || k >= (Py_ssize_t)sizeof(text))
                return UNKNOWN;
            memcpy(text, line, (size_t)k);
            text[k] = '\0';
            char *stop;
            double d = PyOS_string_to_double(text, &stop, PyExc_OverflowError);
            if (d == -1.0 && PyErr_Occurred()) {
                PyErr_Clear();
                return UNKNOWN;
            }
            if (*stop != '\0')
                return UNKNOWN;
            Py_ssize_t v = new_val(self, V_FLOAT);
            if (v < 0)
                return FAILED;
            self->vals[v].d = d;
            CHECK(push(self, v));
            break;
        }
        case 'q': /* BINPUT */
            NEED(1);
            CHECK(memo_put(self, p[0], n));
            p += 1;
            break;
        case 'r': /* LONG_BINPUT */
            NEED(4);
            CHECK(memo_put(self, (Py_ssize_t)le(p, 4), n));
            p += 4;
            break;
        case 0x94: /* MEMOIZE */
            CHECK(memo_put(self, self->memo_set, n));
            break;
        case 'p': { /* PUT */
            long long index;
            if (line_end - line > 9 || !decimal(line, line_end, &index) || index < 0)
                return UNKNOWN;
            CHECK(memo_put(self, (Py_ssize_t)index, n));
            break;
        }
        case 'h': /* BINGET */
            NEED(1);
            CHECK(memo_get(self, p[0]));
            p += 1;
            break;
        case 'j': /* LONG_BINGET */
            NEED(4);
            CHECK(memo_get(self, (Py_ssize_t)le(p, 4)));
            p += 4;
            break;
        case 'g': { /* GET */
            long long index;
            if (line_end - line > 9 || !decimal(line, line_end, &index) || index < 0)
                return UNKNOWN;
            CHECK(memo_get(self, (Py_ssize_t)index));
            break;
        }
        case '.': /* STOP: the frame must end here */
            if (p != end || self->stack_len <= fence(self))
                return UNKNOWN;
            *result = self->stack[self->stack_len - 1];
            return KNOWN;
        default:
            return UNKNOWN;
        }
    }
    return UNKNOWN;
#undef NEED
#undef CHECK
}

/* Items of a sequence value, in order. */
typedef struct {
    Py_ssize_t chunk, at, left;
} iter_t;

static void
iter_start(CountsObject *self, Py_ssize_t seq, iter_t *it)
{
    it->chunk = self->vals[seq].head;
    it->at = it->chunk >= 0 ? self->chunks[it->chunk].start : 0;
    it->left = it->chunk >= 0 ? self->chunks[it->chunk].count : 0;
}

static Py_ssize_t
iter_next(CountsObject *self, iter_t *it)
{
    while (it->left == 0) {
        if (it->chunk < 0 || (it->chunk = self->chunks[it->chunk].next) < 0)
            return -1;
        it->at = self->chunks[it->chunk].start;
        it->left = self->chunks[it->chunk].count;
    }
    it->left--;
    return self->items[it->at++];
}

static inline int
is_seq(CountsObject *self, Py_ssize_t v)
{
    int t = self->vals[v].type;
    return t == V_TUPLE || t == V_LIST;
}

/* 1 a number relay.lines writes, 0 one it skips; UNKNOWN for a string (float()
 * of it is Python's). */
static int
valid_timestamp(val_t *v)
{
    if (v->type == V_INT)
        return 1;
    if (v->type == V_FLOAT) {
        double t = trunc(v->d);
        return isfinite(v->d) && t >= -INT64_BOUND && t < INT64_BOUND;
    }
    return (v->type == V_STR || v->type == V_BYTES) ? -1 : 0;
}

static int
valid_value(val_t *v)
{
    if (v->type == V_INT)
        return 1;
    if (v->type == V_FLOAT)
        return isfinite(v->d) != 0;
    return (v->type == V_STR || v->type == V_BYTES) ? -1 : 0;
}

/* relay.lines.format_points' walk over the frame's object, without writing:
 * the points per entry name into self->pending, *invalid the points skipped. */
static int
walk_points(CountsObject *self, Py_ssize_t top, Py_ssize_t max_name, Py_ssize_t max_output,
            long long *invalid)
{
    self->pending_len = 0;
    if (!is_seq(self, top))
        return UNKNOWN; /* format_points' ValueError: decode_frame's to report */
    long long bound = 0;
    iter_t entries;
    iter_start(self, top, &entries);
    Py_ssize_t entry;
    while ((entry = iter_next(self, &entries)) >= 0) {
        if (!is_seq(self, entry) || self->vals[entry].n < 2) {
            ++*invalid;
            continue;
        }
        iter_t fields, pts;
        iter_start(self, entry, &fields);
        Py_ssize_t name = iter_next(self, &fields);
        Py_ssize_t n_pts;
        if (self->vals[entry].n > 2) { /* (name, point, point, ...) */
            pts = fields;
            n_pts = self->vals[entry].n - 1;
        }
        else {
            Py_ssize_t second = iter_next(self, &fields);
            if (!is_seq(self, second) || self->vals[second].n == 0) {
                ++*invalid;
                continue;
            }
            iter_start(self, second, &pts);
            Py_ssize_t first = iter_next(self, &pts);
            if (!is_seq(self, first)) { /* (name, (ts, value)) */
                iter_start(self, entry, &pts);
                iter_next(self, &pts);
                n_pts = 1;
            }
            else { /* (name, [(ts, value), ...]) */
                iter_start(self, second, &pts);
                n_pts = self->vals[second].n;
            }
        }
        val_t *nv = &self->vals[name];
        int name_ok = (nv->type == V_STR || nv->type == V_BYTES) && nv->n > 0 && nv->n <= max_name;
        for (Py_ssize_t i = 0; name_ok && i < nv->n; i++) {
            unsigned char c = (unsigned char)nv->p[i];
            if (c <= 0x20 || c == 0x7f)
                name_ok = 0;
        }
        if (!name_ok) {
            *invalid += n_pts;
            continue;
        }
        long long written = 0;
        for (Py_ssize_t i = 0; i < n_pts; i++) {
            Py_ssize_t point = iter_next(self, &pts);
            if (!is_seq(self, point) || self->vals[point].n != 2) {
                ++*invalid;
                continue;
            }
            iter_t pair;
            iter_start(self, point, &pair);
            val_t *ts = &self->vals[iter_next(self, &pair)];
            val_t *value = &self->vals[iter_next(self, &pair)];
            int ts_ok = valid_timestamp(ts), value_ok = valid_value(value);
            if (ts_ok < 0 || value_ok < 0)
                return UNKNOWN;
            if (ts_ok && value_ok)
                written++;
            else
                ++*invalid;
        }
        if (!written)
            continue;
        bound += written * (nv->n + POINT_OVERHEAD);
        if (bound > max_output)
            return UNKNOWN; /* maybe over decode_frame's limit: its call */
        if (GROW(self->pending, self->pending_cap, self->pending_len + 1) < 0)
            return FAILED;
        pending_t *pe = &self->pending[self->pending_len++];
        pe->name = nv->p;
        pe->len = nv->n;
        pe->points = written;
    }
    return KNOWN;
}


/* ------------------------------------------------------------ the common frame, fast */

/* What carbon's senders write with protocols 2 to 5 (Python 2's cPickle and
 * Python 3's pickle alike), read without building anything:
 *
 *   PROTO [FRAME] EMPTY_LIST [put] ( MARK entry* APPENDS | entry APPEND )* STOP
 *   entry: name [put] point TUPLE2 [put] | get of an entry
 *   name:  BINUNICODE, SHORT_BINUNICODE (ASCII), BINSTRING, SHORT_BINSTRING,
 *          BINBYTES, SHORT_BINBYTES | get of a name
 *   point: number number TUPLE2 [put] | get of a point
 *   number: BININT, BININT1, BININT2, LONG1 (up to 8 bytes), BINFLOAT,
 *           NEWTRUE, NEWFALSE, NONE
 *
 * Anything else is UNKNOWN here and goes to the general machine (run_pickle). */

static fmemo_t *
fmemo_at(CountsObject *self, const unsigned char **pp, const unsigned char *end, int get,
         Py_ssize_t limit)
{
    const unsigned char *p = *pp;
    unsigned char op = *p++;
    Py_ssize_t index;
    if (op == (get ? 'h' : 'q')) {
        if (end - p < 1)
            return NULL;
        index = p[0];
        p += 1;
    }
    else if (op == (get ? 'j' : 'r')) {
        if (end - p < 4)
            return NULL;
        index = (Py_ssize_t)le(p, 4);
        p += 4;
    }
    else if (!get && op == 0x94) {
        index = self->fmemo_set;
    }
    else {
        return NULL;
    }
    *pp = p;
    if (get) {
        if (index >= self->fmemo_cap || self->fmemo[index].serial != self->serial)
            return NULL;
        return &self->fmemo[index];
    }
    if (index >= limit || index >= MAX_MEMO)
        return NULL;
    if (index >= self->fmemo_cap) {
        Py_ssize_t old = self->fmemo_cap;
        if (GROW(self->fmemo, self->fmemo_cap, index + 1) < 0) {
            PyErr_Clear(); /* the general machine will say */
            return NULL;
        }
        memset(self->fmemo + old, 0, (size_t)(self->fmemo_cap - old) * sizeof(fmemo_t));
    }
    fmemo_t *m = &self->fmemo[index];
    if (m->serial != self->serial) {
        m->serial = self->serial;
        self->fmemo_set++;
    }
    return m;
}

static inline int
is_put(unsigned char op)
{
    return op == 'q' || op == 'r' || op == 0x94;
}

static inline int
is_get(unsigned char op)
{
    return op == 'h' || op == 'j';
}

/* 1 a number relay.lines writes (as a timestamp or as a value), 0 one it skips. */
static int
fast_number(const unsigned char **pp, const unsigned char *end, int timestamp)
{
    const unsigned char *p = *pp;
    if (p >= end)
        return UNKNOWN;
    unsigned char op = *p++;
    int width, ok = 1;
    switch (op) {
    case 'K':
        width = 1;
        break;
    case 'M':
        width = 2;
        break;
    case 'J':
        width = 4;
        break;
    case 0x88:
    case 0x89:
        width = 0;
        break;
    case 'N':
        width = 0;
        ok = 0;
        break;
    case 0x8a:
        if (end - p < 1 || p[0] > 8)
            return UNKNOWN;
        width = 1 + p[0];
        break;
    case 'G': {
        width = 8;
        if (end - p < 8)
            return UNKNOWN;
        uint64_t u = 0;
        for (int i = 0; i < 8; i++)
            u = (u << 8) | p[i];
        double d;
        memcpy(&d, &u, 8);
        double t = trunc(d);
        ok = timestamp ? (isfinite(d) && t >= -INT64_BOUND && t < INT64_BOUND) : isfinite(d) != 0;
        break;
    }
    default:
        return UNKNOWN;
    }
    if (end - p < width)
        return UNKNOWN;
    *pp = p + width;
    return ok ? 2 : 3; /* distinct from KNOWN/UNKNOWN: 2 valid, 3 skipped */
}

static int
fast_entry(CountsObject *self, const unsigned char **pp, const unsigned char *end,
           Py_ssize_t limit, Py_ssize_t max_name, long long *bound, Py_ssize_t max_output,
           long long *invalid)
{
    const unsigned char *p = *pp;
    const char *name;
    Py_ssize_t len;
    int name_ok, point_ok;
    fmemo_t *m;
    if (is_get(*p)) {
        if ((m = fmemo_at(self, &p, end, 1, limit)) == NULL)
            return UNKNOWN;
        if (m->kind == F_ENTRY) {
            name = m->name;
            len = m->len;
            name_ok = m->name_ok;
            point_ok = m->point_ok;
            goto emit;
        }
        if (m->kind != F_NAME)
            return UNKNOWN;
        name = m->name;
        len = m->len;
        name_ok = m->name_ok;
    }
    else {
        unsigned char op = *p++;
        int width, str = 0;
        switch (op) {
        case 'X':
            str = 1;
            width = 4;
            break;
        case 0x8c:
            str = 1;
            width = 1;
            break;
        case 'T':
        case 'B':
            width = 4;
            break;
        case 'U':
        case 'C':
            width = 1;
            break;
        default:
            return UNKNOWN;
        }
        if (end - p < width)
            return UNKNOWN;
        uint64_t k = le(p, width);
        if (op == 'T' && (k & 0x80000000U))
            return UNKNOWN;
        p += width;
        if (k > (uint64_t)(end - p))
            return UNKNOWN;
        name = (const char *)p;
        len = (Py_ssize_t)k;
        p += k;
        /* a name relay.lines writes: no whitespace or control byte, eight at a time */
        uint64_t high = 0, bad = 0;
        Py_ssize_t i = 0;
        for (; len - i >= 8; i += 8) {
            uint64_t w;
            memcpy(&w, name + i, 8);
            high |= w & HIGHS;
            bad |= below_0x21(w) | equal_to(w, 0x7f);
        }
        for (; i < len; i++) {
            unsigned char c = (unsigned char)name[i];
            high |= c & 0x80;
            bad |= c <= 0x20 || c == 0x7f;
        }
        name_ok = len > 0 && len <= max_name && !bad;
        if (str && high)
            return UNKNOWN; /* UTF-8 to check: the general machine's */
        if (p < end && is_put(*p)) {
            if ((m = fmemo_at(self, &p, end, 0, limit)) == NULL)
                return UNKNOWN;
            m->kind = F_NAME;
            m->name = name;
            m->len = len;
            m->name_ok = name_ok;
        }
    }
    if (p >= end)
        return UNKNOWN;
    if (is_get(*p)) {
        if ((m = fmemo_at(self, &p, end, 1, limit)) == NULL || m->kind != F_POINT)
            return UNKNOWN;
        point_ok = m->point_ok;
    }
    else {
        int ts = fast_number(&p, end, 1);
        if (ts == UNKNOWN)
            return UNKNOWN;
        int value = fast_number(&p, end, 0);
        if (value == UNKNOWN || p >= end || *p++ != 0x86)
            return UNKNOWN;
        point_ok = ts == 2 && value == 2;
        if (p < end && is_put(*p)) {
            if ((m = fmemo_at(self, &p, end, 0, limit)) == NULL)
                return UNKNOWN;
            m->kind = F_POINT;
            m->point_ok = point_ok;
        }
    }
    if (p >= end || *p++ != 0x86)
        return UNKNOWN;
    if (p < end && is_put(*p)) {
        if ((m = fmemo_at(self, &p, end, 0, limit)) == NULL)
            return UNKNOWN;
        m->kind = F_ENTRY;
        m->name = name;
        m->len = len;
        m->name_ok = name_ok;
        m->point_ok = point_ok;
    }
emit:
    *pp = p;
    if (!(name_ok && point_ok)) {
        ++*invalid;
        return KNOWN;
    }
    *bound += len + POINT_OVERHEAD;
    if (*bound > max_output)
        return UNKNOWN;
    if (GROW(self->pending, self->pending_cap, self->pending_len + 1) < 0)
        return FAILED;
    pending_t *pe = &self->pending[self->pending_len++];
    pe->name = name;
    pe->len = len;
    pe->points = 1;
    return KNOWN;
}

static int
fast_frame(CountsObject *self, const unsigned char *p, Py_ssize_t n, Py_ssize_t max_name,
           Py_ssize_t max_output, long long *invalid)
{
    const unsigned char *end = p + n;
    long long bound = 0;
    int rc;
    self->pending_len = 0;
    self->fmemo_set = 0;
    if (++self->serial == 0) { /* wrapped: no entry may look current */
        for (Py_ssize_t i = 0; i < self->fmemo_cap; i++)
            self->fmemo[i].serial = 0;
        self->serial = 1;
    }
    if (n < 4 || p[0] != 0x80 || p[1] < 2 || p[1] > 5)
        return UNKNOWN;
    p += 2;
    if (p[0] == 0x95) {
        if (end - p < 9 || le(p + 1, 8) > (uint64_t)(end - p - 9))
            return UNKNOWN;
        p += 9;
    }
    if (p >= end || *p++ != ']')
        return UNKNOWN;
    if (p < end && is_put(*p)) {
        fmemo_t *m = fmemo_at(self, &p, end, 0, n);
        if (m == NULL)
            return UNKNOWN;
        m->kind = F_OTHER;
    }
    while (p < end) {
        if (*p == '.')
            return p + 1 == end ? KNOWN : UNKNOWN;
        if (*p == '(') {
            p++;
            while (p < end && *p != 'e')
                if ((rc = fast_entry(self, &p, end, n, max_name, &bound, max_output, invalid)) !=
                    KNOWN)
                    return rc;
            p++;
        }
        else {
            if ((rc = fast_entry(self, &p, end, n, max_name, &bound, max_output, invalid)) !=
                KNOWN)
                return rc;
            if (p >= end || *p++ != 'a')
                return UNKNOWN;
        }
    }
    return UNKNOWN;
}

static PyObject *
counts_add_pickle_frames(CountsObject *self, PyObject *args)
{
    Py_buffer data;
    Py_ssize_t offset, max_name, max_output;
    if (!PyArg_ParseTuple(args, "y*nnn:add_pickle_frames", &data, &offset, &max_name,
                          &max_output))
        return NULL;
    const unsigned char *buf = data.buf;
    Py_ssize_t size = data.len;
    long long invalid = 0;
    int unknown = 0;
    if (offset < 0)
        offset = size;
    while (size - offset >= 4) {
        Py_ssize_t length = (Py_ssize_t)(((uint64_t)buf[offset] << 24) | (buf[offset + 1] << 16) |
                                         (buf[offset + 2] << 8) | buf[offset + 3]);
        if (size - offset - 4 < length)
            break;
        Py_ssize_t top = -1;
        long long frame_invalid = 0;
        int rc = fast_frame(self, buf + offset + 4, length, max_name, max_output, &frame_invalid);
        if (rc == UNKNOWN) {
            frame_invalid = 0;
            rc = run_pickle(self, buf + offset + 4, length, &top);
            if (rc == KNOWN)
                rc = walk_points(self, top, max_name, max_output, &frame_invalid);
        }
        if (rc == FAILED) {
            PyBuffer_Release(&data);
            return NULL;
        }
        if (rc == UNKNOWN) {
            unknown = 1;
            break;
        }
        for (Py_ssize_t i = 0; i < self->pending_len; i++) {
            pending_t *pe = &self->pending[i];
            if (queue_name(self, pe->name, pe->len, pe->points) < 0) {
                self->queued = 0;
                PyBuffer_Release(&data);
                return NULL;
            }
        }
        invalid += frame_invalid;
        offset += 4 + length;
    }
    int flushed = flush_names(self);
    PyBuffer_Release(&data);
    if (flushed < 0)
        return NULL;
    return Py_BuildValue("(nNL)", offset, PyBool_FromLong(unknown), invalid);
}

/* ------------------------------------------------------------ module functions */

/* record_starts(data, big_endian) -> (starts, end)
 * The classic pcap records that lie whole in data (which starts at a record
 * header): starts, native int64s, where each record's frame begins; end, the
 * offset of the first record not whole in data (pcaprecords' loop, in C). */
static PyObject *
record_starts(PyObject *module, PyObject *args)
{
    Py_buffer data;
    int big_endian;
    if (!PyArg_ParseTuple(args, "y*p:record_starts", &data, &big_endian))
        return NULL;
    const unsigned char *buf = data.buf;
    Py_ssize_t size = data.len, offset = 0, count = 0, cap = 0;
    int64_t *starts = NULL;
    while (size - offset >= 16) {
        const unsigned char *h = buf + offset + 8;
        uint64_t caplen = big_endian ? ((uint64_t)h[0] << 24 | (uint64_t)h[1] << 16 | h[2] << 8 | h[3])
                                     : le(h, 4);
        if (caplen > (uint64_t)(size - offset - 16))
            break;
        if (GROW(starts, cap, count + 1) < 0) {
            PyMem_Free(starts);
            PyBuffer_Release(&data);
            return NULL;
        }
        starts[count++] = offset + 16;
        offset += 16 + (Py_ssize_t)caplen;
    }
    PyBuffer_Release(&data);
    PyObject *found = PyBytes_FromStringAndSize((const char *)starts, count * (Py_ssize_t)sizeof(int64_t));
    PyMem_Free(starts);
    if (found == NULL)
        return NULL;
    return Py_BuildValue("(Nn)", found, offset);
}

/* join_spans(prefix, buffer, begins, ends) -> prefix + every buffer[begin:end] */
static PyObject *
join_spans(PyObject *module, PyObject *args)
{
    Py_buffer prefix, data;
    PyObject *begins_arg, *ends_arg, *begins = NULL, *ends = NULL, *result = NULL;
    Py_ssize_t n, total;
    if (!PyArg_ParseTuple(args, "y*y*OO:join_spans", &prefix, &data, &begins_arg, &ends_arg))
        return NULL;
    if (span_offsets(begins_arg, ends_arg, &begins, &ends, &n) < 0)
        goto done;
    total = prefix.len;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t b, e;
        if (span(begins, ends, i, data.len, &b, &e) < 0)
            goto done;
        total += e - b;
    }
    result = PyBytes_FromStringAndSize(NULL, total);
    if (result == NULL)
        goto done;
    char *out = PyBytes_AS_STRING(result);
    memcpy(out, prefix.buf, (size_t)prefix.len);
    out += prefix.len;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t b = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(begins, i));
        Py_ssize_t e = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(ends, i));
        memcpy(out, (const char *)data.buf + b, (size_t)(e - b));
        out += e - b;
    }
done:
    Py_XDECREF(begins);
    Py_XDECREF(ends);
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&data);
    return result;
}

static PyMethodDef module_methods[] = {
    {"record_starts", record_starts, METH_VARARGS,
     "record_starts(data, big_endian) -> (int64 frame starts, end of the whole records)"},
    {"join_spans", join_spans, METH_VARARGS,
     "join_spans(prefix, buffer, begins, ends) -> prefix + every buffer[begin:end]"},
    {NULL, NULL, 0, NULL},
};

/* ------------------------------------------------------------ the type */

static PyObject *
counts_items(CountsObject *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *result = PyDict_New();
    if (result == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i <= self->mask; i++) {
        slot_t *s = &self->slots[i];
        if (!s->hash)
            continue;
        PyObject *name = PyBytes_FromStringAndSize(self->names + s->at, s->len);
        PyObject *count = PyLong_FromLongLong(s->count);
        if (name == NULL || count == NULL || PyDict_SetItem(result, name, count) < 0) {
            Py_XDECREF(name);
            Py_XDECREF(count);
            Py_DECREF(result);
            return NULL;
        }
        Py_DECREF(name);
        Py_DECREF(count);
    }
    return result;
}

static PyObject *
counts_get_points(CountsObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLongLong(self->points);
}

static int
counts_init(CountsObject *self, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"statsd", NULL};
    int statsd = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|p:Counts", keywords, &statsd))
        return -1;
    self->statsd = statsd;
    if (self->slots == NULL && table_resize(self, 1024) < 0)
        return -1;
    return 0;
}

static void
counts_dealloc(CountsObject *self)
{
    PyMem_Free(self->slots);
    PyMem_Free(self->names);
    PyMem_Free(self->carry);
    PyMem_Free(self->vals);
    PyMem_Free(self->items);
    PyMem_Free(self->chunks);
    PyMem_Free(self->stack);
    PyMem_Free(self->marks);
    PyMem_Free(self->memo);
    PyMem_Free(self->pending);
    PyMem_Free(self->fmemo);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef counts_methods[] = {
    {"add_text", (PyCFunction)counts_add_text, METH_VARARGS,
     "add_text(data): the points of whole lines of text"},
    {"add_spans", (PyCFunction)counts_add_spans, METH_VARARGS,
     "add_spans(buffer, begins, ends): add_text of each buffer[begin:end]"},
    {"add_segments", (PyCFunction)counts_add_segments, METH_VARARGS,
     "add_segments(prefix, buffer, begins, ends) -> the bytes after the stream's last newline"},
    {"add_pickle_frames", (PyCFunction)counts_add_pickle_frames, METH_VARARGS,
     "add_pickle_frames(data, offset, max_name, max_output) -> (offset, unknown, invalid)"},
    {"items", (PyCFunction)counts_items, METH_NOARGS, "items() -> {name: points}"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef counts_getset[] = {
    {"points", (getter)counts_get_points, NULL, "points counted", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject CountsType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "carbonscale._hotcount.Counts",
    .tp_basicsize = sizeof(CountsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Counts(statsd=False): points per metric name",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)counts_init,
    .tp_dealloc = (destructor)counts_dealloc,
    .tp_methods = counts_methods,
    .tp_getset = counts_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "carbonscale._hotcount",
    "Points per metric name of hot-metrics' line, statsd and pickle traffic (C).", -1,
    module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__hotcount(void)
{
    if (PyType_Ready(&CountsType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&CountsType);
    if (PyModule_AddObject(m, "Counts", (PyObject *)&CountsType) < 0) {
        Py_DECREF(&CountsType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
