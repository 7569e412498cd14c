/*
 * carbonscale._hotcount: points per metric name for `carbonscale ops hot-metrics`.
 *
 * The Python twin is carbonscale.ops.hotmetrics' own path (its bulk path, line
 * text collected in chunks and counted by carbonscale.ops.namecount, pickle
 * frames decoded by the pickle relay's carbonscale.relay.lines.decode_frame);
 * the tests check both, and dpkt's full decode, give the same report. Per point, Python costs
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
 *   add_prefixes(mapping, depth) each name of a {name: points} mapping counted
 *                               under its first depth dot-separated fields
 *   items() -> dict {name: points};  points: all points counted
 *
 * top(mapping, limit) ranks a {name: points} mapping: most points first, equal
 * points by name, the first limit (all when 0).
 *
 * Walker (below) walks a whole classic pcap, TCP streams included, into three
 * Counts (line, pickle, statsd): see its own comment.
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

/* A name's entry in the arena: its count and bytes together (one cache line
 * for most names), 8-byte aligned. */
typedef struct {
    long long count;
    uint32_t len;
    uint32_t hash; /* the low half of the name's hash: where its slot is */
    char name[];
} entry_t;

#define ENTRY_SIZE(len) ((sizeof(entry_t) + (size_t)(len) + 7) & ~(size_t)7)

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
    /* slots: mask + 1, each the high half of its name's hash << 32 | (the
     * entry's offset in the arena / 8 + 1), 0 when empty: small enough to stay
     * in the caches, and a name is compared only when its hash's high half is. */
    uint64_t *slots;
    Py_ssize_t mask, used;
    char *arena; /* entries */
    Py_ssize_t arena_len, arena_cap;
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
    /* A product's high bits depend on all of its factors' bits, its low bits on
     * their low bits only: the high half folded into the low one, or the slot
     * (the low bits) would never see the high bytes of the words, and names
     * that differ there would share probe chains. */
    h ^= h >> 32;
    return h ? h : 1;
}

static inline entry_t *
slot_entry(const CountsObject *self, uint64_t slot)
{
    return (entry_t *)(self->arena + ((slot & 0xFFFFFFFFU) - 1) * 8);
}

static int
table_resize(CountsObject *self, Py_ssize_t size)
{
    uint64_t *slots = PyMem_Calloc((size_t)size, sizeof(uint64_t));
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t mask = size - 1;
    if (self->slots != NULL) {
        for (Py_ssize_t i = 0; i <= self->mask; i++) {
            uint64_t slot = self->slots[i];
            if (!slot)
                continue;
            Py_ssize_t j = (Py_ssize_t)(slot_entry(self, slot)->hash & (uint64_t)mask);
            while (slots[j])
                j = (j + 1) & mask;
            slots[j] = slot;
        }
        PyMem_Free(self->slots);
    }
    self->slots = slots;
    self->mask = mask;
    return 0;
}

static inline uint64_t
word_at(const char *p)
{
    uint64_t w;
    memcpy(&w, p, 8);
    return w;
}

/* memcmp(a, b, n) == 0 without a call: names are short. */
static inline int
same_bytes(const char *a, const char *b, Py_ssize_t n)
{
    if (n < 8) {
        for (Py_ssize_t i = 0; i < n; i++)
            if (a[i] != b[i])
                return 0;
        return 1;
    }
    for (Py_ssize_t i = 0; i + 8 < n; i += 8)
        if (word_at(a + i) != word_at(b + i))
            return 0;
    return word_at(a + n - 8) == word_at(b + n - 8); /* the last 8, overlapping */
}

static int
count_hashed(CountsObject *self, const char *name, Py_ssize_t len, long long points, uint64_t h)
{
    uint64_t tag = h & 0xFFFFFFFF00000000ULL;
    Py_ssize_t j = (Py_ssize_t)(h & (uint64_t)self->mask);
    for (;;) {
        uint64_t slot = self->slots[j];
        if (!slot)
            break;
        if ((slot & 0xFFFFFFFF00000000ULL) == tag) {
            entry_t *e = slot_entry(self, slot);
            if (e->len == len && same_bytes(e->name, name, len)) {
                e->count += points;
                self->points += points;
                return 0;
            }
        }
        j = (j + 1) & self->mask;
    }
    size_t size = ENTRY_SIZE(len);
    Py_ssize_t at = self->arena_len;
    if (len > (Py_ssize_t)UINT32_MAX || (uint64_t)(at + size) / 8 >= UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "too many or too long metric names");
        return -1;
    }
    if (GROW(self->arena, self->arena_cap, at + (Py_ssize_t)size) < 0)
        return -1;
    entry_t *e = (entry_t *)(self->arena + at);
    e->count = points;
    e->len = (uint32_t)len;
    e->hash = (uint32_t)h;
    memcpy(e->name, name, (size_t)len);
    self->arena_len = at + (Py_ssize_t)size;
    self->slots[j] = tag | (uint64_t)(at / 8 + 1);
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
    /* the slots are in cache by now: fetch the entries they point at next */
    for (int i = 0; i < n; i++) {
        uint64_t h = self->queue[i].hash;
        uint64_t slot = self->slots[h & (uint64_t)self->mask];
        if (slot && (slot ^ h) >> 32 == 0)
            __builtin_prefetch(slot_entry(self, slot));
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

/* The first '\n' from p on, or end: eight bytes at a time (what follows a
 * line's name is a few bytes, a call to memchr costs more). */
static inline const char *
next_newline(const char *p, const char *end)
{
    while (end - p >= 8) {
        uint64_t m = equal_to(word_at(p), '\n');
        if (m)
            return p + (__builtin_ctzll(m) >> 3);
        p += 8;
    }
    while (p < end && *p != '\n')
        p++;
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
                q = next_newline(q, end);
            p = q == end ? end : q + 1;
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

/* Called three times per point: inlined. */
#define HOT static inline __attribute__((always_inline))

HOT fmemo_t *
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
HOT int
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

/* One whole frame's points queued (names point into the frame: flush before it
 * goes); *invalid the points decode_frame would skip. UNKNOWN: nothing queued,
 * the frame is the pickle relay's decoder's to read. */
static int
count_frame(CountsObject *self, const unsigned char *frame, Py_ssize_t length, Py_ssize_t max_name,
            Py_ssize_t max_output, long long *invalid)
{
    Py_ssize_t top = -1;
    long long frame_invalid = 0;
    int rc = fast_frame(self, frame, length, max_name, max_output, &frame_invalid);
    if (rc == UNKNOWN) {
        frame_invalid = 0;
        rc = run_pickle(self, frame, length, &top);
        if (rc == KNOWN)
            rc = walk_points(self, top, max_name, max_output, &frame_invalid);
    }
    if (rc != KNOWN)
        return rc;
    for (Py_ssize_t i = 0; i < self->pending_len; i++) {
        pending_t *pe = &self->pending[i];
        if (queue_name(self, pe->name, pe->len, pe->points) < 0)
            return FAILED;
    }
    *invalid += frame_invalid;
    return KNOWN;
}

static inline Py_ssize_t
frame_length(const unsigned char *p)
{
    return (Py_ssize_t)((uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]);
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
    int unknown = 0, rc = KNOWN;
    if (offset < 0)
        offset = size;
    while (size - offset >= 4) {
        Py_ssize_t length = frame_length(buf + offset);
        if (size - offset - 4 < length)
            break;
        rc = count_frame(self, buf + offset + 4, length, max_name, max_output, &invalid);
        if (rc != KNOWN)
            break;
        offset += 4 + length;
    }
    if (rc == UNKNOWN)
        unknown = 1;
    if (rc == FAILED)
        self->queued = 0;
    else if (flush_names(self) < 0)
        rc = FAILED;
    PyBuffer_Release(&data);
    if (rc == FAILED)
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

/* ------------------------------------------------------------ ranking */

typedef struct {
    PyObject *name, *count; /* borrowed from the mapping */
    long long points;
} ranked_t;

/* Most points first, equal points by name (bytes order). */
static int
ranked_order(const void *a, const void *b)
{
    const ranked_t *x = a, *y = b;
    if (x->points != y->points)
        return x->points > y->points ? -1 : 1;
    Py_ssize_t nx = PyBytes_GET_SIZE(x->name), ny = PyBytes_GET_SIZE(y->name);
    int order = memcmp(PyBytes_AS_STRING(x->name), PyBytes_AS_STRING(y->name),
                       (size_t)(nx < ny ? nx : ny));
    return order ? order : (nx > ny) - (nx < ny);
}

/* top(mapping, limit) -> [(name, points), ...]: heapq.nsmallest(limit, items,
 * key=(-points, name)), all of them sorted when limit is 0. */
static PyObject *
top(PyObject *module, PyObject *args)
{
    PyObject *mapping, *key, *value, *result = NULL;
    Py_ssize_t limit, pos = 0, n = 0;
    if (!PyArg_ParseTuple(args, "O!n:top", &PyDict_Type, &mapping, &limit))
        return NULL;
    Py_ssize_t size = PyDict_Size(mapping);
    ranked_t *items = PyMem_Malloc((size_t)(size ? size : 1) * sizeof(ranked_t));
    if (items == NULL)
        return PyErr_NoMemory();
    while (PyDict_Next(mapping, &pos, &key, &value)) {
        if (!PyBytes_Check(key)) {
            PyErr_SetString(PyExc_TypeError, "names must be bytes");
            goto done;
        }
        long long points = PyLong_AsLongLong(value);
        if (points == -1 && PyErr_Occurred())
            goto done;
        items[n].name = key;
        items[n].count = value;
        items[n++].points = points;
    }
    qsort(items, (size_t)n, sizeof(ranked_t), ranked_order);
    if (limit)
        n = limit < 0 ? 0 : (limit < n ? limit : n);
    result = PyList_New(n);
    for (Py_ssize_t i = 0; result != NULL && i < n; i++) {
        PyObject *pair = PyTuple_Pack(2, items[i].name, items[i].count);
        if (pair == NULL)
            Py_CLEAR(result);
        else
            PyList_SET_ITEM(result, i, pair);
    }
done:
    PyMem_Free(items);
    return result;
}

static PyMethodDef module_methods[] = {
    {"top", top, METH_VARARGS,
     "top(mapping, limit) -> [(name, points)]: most points first, then by name; all if 0"},
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
    for (Py_ssize_t at = 0; at < self->arena_len;) {
        entry_t *e = (entry_t *)(self->arena + at);
        at += (Py_ssize_t)ENTRY_SIZE(e->len);
        PyObject *name = PyBytes_FromStringAndSize(e->name, e->len);
        PyObject *count = PyLong_FromLongLong(e->count);
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

/* add_prefixes(mapping, depth): each name's first `depth` dot-separated fields
 * (b".".join(name.split(b".", depth)[:depth])) counted with the name's points. */
static PyObject *
counts_add_prefixes(CountsObject *self, PyObject *args)
{
    PyObject *mapping, *key, *value;
    Py_ssize_t depth, pos = 0;
    if (!PyArg_ParseTuple(args, "O!n:add_prefixes", &PyDict_Type, &mapping, &depth))
        return NULL;
    if (depth < 1) {
        PyErr_SetString(PyExc_ValueError, "depth must be at least 1");
        return NULL;
    }
    while (PyDict_Next(mapping, &pos, &key, &value)) {
        if (!PyBytes_Check(key)) {
            PyErr_SetString(PyExc_TypeError, "names must be bytes");
            return NULL;
        }
        long long points = PyLong_AsLongLong(value);
        if (points == -1 && PyErr_Occurred())
            return NULL;
        const char *name = PyBytes_AS_STRING(key);
        Py_ssize_t n = PyBytes_GET_SIZE(key), end = n, dots = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            if (name[i] == '.' && ++dots == depth) {
                end = i;
                break;
            }
        }
        if (count_name(self, name, end, points) < 0)
            return NULL;
    }
    Py_RETURN_NONE;
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
    PyMem_Free(self->arena);
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
    {"add_prefixes", (PyCFunction)counts_add_prefixes, METH_VARARGS,
     "add_prefixes(mapping, depth): each name's first depth fields counted with its points"},
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

/* ------------------------------------------------------------ the capture walker */

/* Walker(line, pickle, statsd, kinds, decode_frame, other_frame, max_name, max_output)
 *
 * A classic pcap's records from the first record header to the end of the file
 * (an mmap of it), decoded here down to the points, with the same outcome as
 * hotmetrics.Decoder's own path (its twin, tested equal):
 *
 *   walk(buffer, offset, big_endian, linktype)
 *                               the records from offset on: a record whose data
 *                               is cut off at the end is the bytes there are, a
 *                               record header cut off is "truncated record at
 *                               the end". The frames of plain IPv4 (no options,
 *                               not a fragment) and IPv6 (no extension header)
 *                               TCP and UDP behind Ethernet (one 802.1Q/802.1ad
 *                               tag or none), Linux cooked v1/v2 or raw IP are
 *                               decoded here; any other frame goes to
 *                               other_frame(frame), dpkt's full decode, which
 *                               counts its datagrams and returns its TCP
 *                               segments as (src, sport, dst, dport, flags,
 *                               seq, payload), fed to their streams here
 *   stats() -> (packets, first, last, {reason: frames or points skipped})
 *                               first and last: the (seconds, fraction) of the
 *                               first and last record, None without records
 *
 * TCP streams are Decoder.tcp()'s: in sequence order, out-of-order segments held
 * (MAX_PENDING per connection), retransmitted bytes dropped, a connection seen
 * from its middle starts at its first newline (line) or is skipped (pickle), a
 * SYN starts it again, a FIN or RST ends it. Pickle frames this file's decoder
 * does not know for sure go to decode_frame(frame) -> (text, invalid points) or
 * None when the frame is malformed (the pickle relay's decoder). */

#define MAX_PENDING 256
#define TH_FIN 0x01
#define TH_SYN 0x02
#define TH_RST 0x04

enum { K_NONE, K_LINE, K_PICKLE, K_STATSD };
enum {
    S_OTHER_PORTS,
    S_PICKLE_UDP,
    S_GIVEN_UP,
    S_MIDDLE,
    S_MALFORMED,
    S_INVALID,
    S_TRUNCATED,
    S_COUNT
};
static const char *const skip_reasons[S_COUNT] = {
    "other ports",
    "pickle over UDP",
    "connections given up (lost segments)",
    "pickle connections seen from their middle",
    "malformed pickle frames",
    "invalid pickle points",
    "truncated record at the end",
};

typedef struct {
    uint8_t alen; /* 4 or 16 */
    uint8_t pad;
    uint16_t sport, dport;
    uint8_t src[16], dst[16];
} flowkey_t;

typedef struct {
    uint32_t seq;
    Py_ssize_t len;
    char *data;
} held_t;

typedef struct {
    flowkey_t key;
    uint64_t hash;
    int kind, synced;
    uint32_t next_seq;
    char *buf; /* bytes after the last whole line or frame */
    Py_ssize_t buf_len, buf_cap;
    held_t *held; /* segments ahead of next_seq */
    Py_ssize_t held_len, held_cap;
} stream_t;

typedef struct {
    PyObject_HEAD
    CountsObject *counts[4]; /* by K_*: NULL, line, pickle, statsd */
    unsigned char kinds[65536];
    PyObject *decode_frame, *other_frame;
    Py_ssize_t max_name, max_output;
    stream_t **table; /* open addressing, linear probing, NULL: empty */
    Py_ssize_t mask, used;
    long long skipped[S_COUNT];
    long long packets;
    int stamped;
    uint32_t first[2], last[2];
    char *scratch; /* a stream's bytes joined out of order */
    Py_ssize_t scratch_cap;
} WalkerObject;

static inline uint32_t
rd16(const unsigned char *p)
{
    return (uint32_t)p[0] << 8 | p[1];
}

static inline uint32_t
rd32(const unsigned char *p, int big_endian)
{
    return big_endian ? (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]
                      : (uint32_t)p[3] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[1] << 8 | p[0];
}

static int
bytes_set(char **buf, Py_ssize_t *len, Py_ssize_t *cap, const char *p, Py_ssize_t n)
{
    if (GROW(*buf, *cap, n) < 0)
        return -1;
    memmove(*buf, p, (size_t)n);
    *len = n;
    return 0;
}

static int
bytes_append(char **buf, Py_ssize_t *len, Py_ssize_t *cap, const char *p, Py_ssize_t n)
{
    if (GROW(*buf, *cap, *len + n) < 0)
        return -1;
    memcpy(*buf + *len, p, (size_t)n);
    *len += n;
    return 0;
}

static void
held_clear(stream_t *s)
{
    for (Py_ssize_t i = 0; i < s->held_len; i++)
        PyMem_Free(s->held[i].data);
    s->held_len = 0;
}

static void
stream_free(stream_t *s)
{
    held_clear(s);
    PyMem_Free(s->held);
    PyMem_Free(s->buf);
    PyMem_Free(s);
}

/* ----- the connection table */

static stream_t **
flow_slot(WalkerObject *self, const flowkey_t *key, uint64_t h)
{
    Py_ssize_t j = (Py_ssize_t)(h & (uint64_t)self->mask);
    for (;;) {
        stream_t *s = self->table[j];
        if (s == NULL || (s->hash == h && memcmp(&s->key, key, sizeof(*key)) == 0))
            return &self->table[j];
        j = (j + 1) & self->mask;
    }
}

static int
flows_resize(WalkerObject *self, Py_ssize_t size)
{
    stream_t **table = PyMem_Calloc((size_t)size, sizeof(stream_t *));
    if (table == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t mask = size - 1;
    for (Py_ssize_t i = 0; self->table != NULL && i <= self->mask; i++) {
        stream_t *s = self->table[i];
        if (s == NULL)
            continue;
        Py_ssize_t j = (Py_ssize_t)(s->hash & (uint64_t)mask);
        while (table[j] != NULL)
            j = (j + 1) & mask;
        table[j] = s;
    }
    PyMem_Free(self->table);
    self->table = table;
    self->mask = mask;
    return 0;
}

static stream_t *
flow_add(WalkerObject *self, stream_t **slot, const flowkey_t *key, uint64_t h, int kind)
{
    stream_t *s = PyMem_Calloc(1, sizeof(stream_t));
    if (s == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    s->key = *key;
    s->hash = h;
    s->kind = kind;
    *slot = s;
    if (++self->used * 2 > self->mask + 1 && flows_resize(self, (self->mask + 1) * 2) < 0)
        return NULL; /* s stays in the old table, freed with it */
    return s;
}

/* The slot emptied, the entries after it moved back (no tombstones). */
static void
flow_remove(WalkerObject *self, stream_t **slot)
{
    Py_ssize_t i = slot - self->table;
    stream_free(self->table[i]);
    self->table[i] = NULL;
    self->used--;
    Py_ssize_t j = i;
    for (;;) {
        j = (j + 1) & self->mask;
        stream_t *s = self->table[j];
        if (s == NULL)
            return;
        Py_ssize_t home = (Py_ssize_t)(s->hash & (uint64_t)self->mask);
        /* s may move to i when its home is not cyclically within (i, j] */
        if ((j > i && (home <= i || home > j)) || (j < i && home <= i && home > j)) {
            self->table[i] = s;
            self->table[j] = NULL;
            i = j;
        }
    }
}

/* ----- what a stream's bytes hold */

/* Whole lines of text, counted now (p may go away after). */
static int
count_now(CountsObject *counts, const char *p, Py_ssize_t n)
{
    if (count_text(counts, p, n) < 0) {
        counts->queued = 0;
        return -1;
    }
    return flush_names(counts);
}

/* A frame the decoder here does not know: the pickle relay's decoder's.
 * 1 counted, 0 malformed, -1 an error. */
static int
decode_in_python(WalkerObject *self, const unsigned char *frame, Py_ssize_t length)
{
    PyObject *result = PyObject_CallFunction(self->decode_frame, "y#", (const char *)frame,
                                             length);
    if (result == NULL)
        return -1;
    if (result == Py_None) {
        Py_DECREF(result);
        return 0;
    }
    const char *text;
    Py_ssize_t n;
    long long invalid;
    if (!PyArg_ParseTuple(result, "y#L", &text, &n, &invalid) ||
        count_now(self->counts[K_PICKLE], text, n) < 0) {
        Py_DECREF(result);
        return -1;
    }
    self->skipped[S_INVALID] += invalid;
    Py_DECREF(result);
    return 1;
}

/* Decoder._pickle_frames: the whole frames of data counted; the bytes left
 * (after the last whole frame; none when the stream lost its frame bounds) go
 * to the stream's buffer (data may be that buffer). */
static int
stream_frames(WalkerObject *self, stream_t *s, const char *data, Py_ssize_t size)
{
    CountsObject *counts = self->counts[K_PICKLE];
    const unsigned char *buf = (const unsigned char *)data;
    Py_ssize_t offset = 0;
    if (!s->synced) {
        self->skipped[S_MIDDLE]++;
        s->buf_len = 0;
        return 0;
    }
    while (size - offset >= 4) {
        Py_ssize_t length = frame_length(buf + offset);
        if (size - offset - 4 < length)
            break;
        long long invalid = 0;
        int rc = count_frame(counts, buf + offset + 4, length, self->max_name, self->max_output,
                             &invalid);
        if (rc == FAILED) {
            counts->queued = 0;
            return -1;
        }
        if (rc == UNKNOWN) {
            int known = decode_in_python(self, buf + offset + 4, length);
            if (known < 0) {
                counts->queued = 0;
                return -1;
            }
            if (!known) {
                self->skipped[S_MALFORMED]++;
                s->synced = 0;
                s->buf_len = 0;
                return flush_names(counts);
            }
        }
        self->skipped[S_INVALID] += invalid;
        offset += 4 + length;
    }
    if (flush_names(counts) < 0)
        return -1;
    return bytes_set(&s->buf, &s->buf_len, &s->buf_cap, data + offset, size - offset);
}

static const char *
last_newline(const char *p, Py_ssize_t n)
{
    for (const char *q = p + n; q > p; q--)
        if (q[-1] == '\n')
            return q - 1;
    return NULL;
}

/* Decoder.in_order: the next segment of a synced stream, nothing held. Names
 * of lines within payload are queued (payload must last until the flush). */
static int
stream_in_order(WalkerObject *self, stream_t *s, const char *p, Py_ssize_t n)
{
    s->next_seq += (uint32_t)n;
    if (s->kind == K_PICKLE) {
        if (s->buf_len) {
            /* the frame the buffer begins, completed from the payload */
            Py_ssize_t take = 4 - s->buf_len;
            if (take > 0) {
                take = take < n ? take : n;
                if (bytes_append(&s->buf, &s->buf_len, &s->buf_cap, p, take) < 0)
                    return -1;
                p += take;
                n -= take;
                if (s->buf_len < 4)
                    return 0;
            }
            take = 4 + frame_length((const unsigned char *)s->buf) - s->buf_len;
            if (take > n)
                return bytes_append(&s->buf, &s->buf_len, &s->buf_cap, p, n);
            if (bytes_append(&s->buf, &s->buf_len, &s->buf_cap, p, take) < 0 ||
                stream_frames(self, s, s->buf, s->buf_len) < 0)
                return -1;
            if (!s->synced) /* that frame was malformed: the rest is lost with it */
                return 0;
            p += take;
            n -= take;
        }
        /* the frames after it counted where they lie; what follows them kept */
        if (n < 4 || frame_length((const unsigned char *)p) + 4 > n)
            return bytes_set(&s->buf, &s->buf_len, &s->buf_cap, p, n);
        return stream_frames(self, s, p, n);
    }
    CountsObject *counts = self->counts[K_LINE];
    const char *last = last_newline(p, n);
    if (last == NULL)
        return bytes_append(&s->buf, &s->buf_len, &s->buf_cap, p, n);
    const char *from = p;
    if (s->buf_len) { /* the line the buffer begins */
        const char *nl = memchr(p, '\n', (size_t)n);
        if (bytes_append(&s->buf, &s->buf_len, &s->buf_cap, p, nl - p) < 0 ||
            count_line(counts, s->buf, s->buf + s->buf_len, 0) < 0)
            return -1;
        from = nl + 1;
    }
    if (last > from && count_text(counts, from, last - from) < 0) {
        counts->queued = 0;
        return -1;
    }
    return bytes_set(&s->buf, &s->buf_len, &s->buf_cap, last + 1, p + n - last - 1);
}

/* Decoder.segment: anything but the next segment of a synced stream with
 * nothing held. */
static int
stream_out_of_order(WalkerObject *self, stream_t *s, uint32_t seq, const char *p, Py_ssize_t n)
{
    uint32_t ahead = seq - s->next_seq;
    if (ahead && ahead < 0x80000000U) {
        if (s->held_len >= MAX_PENDING) {
            self->skipped[S_GIVEN_UP]++;
            held_clear(s);
            s->buf_len = 0;
            s->synced = 0;
            s->next_seq = seq;
        }
        else {
            held_t *h = NULL;
            for (Py_ssize_t i = 0; i < s->held_len; i++)
                if (s->held[i].seq == seq)
                    h = &s->held[i];
            if (h == NULL) {
                if (GROW(s->held, s->held_cap, s->held_len + 1) < 0)
                    return -1;
                h = &s->held[s->held_len++];
                h->data = NULL;
            }
            char *copy = PyMem_Malloc(n ? (size_t)n : 1);
            if (copy == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            memcpy(copy, p, (size_t)n);
            PyMem_Free(h->data);
            h->seq = seq;
            h->len = n;
            h->data = copy;
            return 0;
        }
    }
    else if (ahead) { /* a retransmission: what is new */
        uint32_t behind = (uint32_t)(0x100000000ULL - ahead);
        if ((Py_ssize_t)behind >= n)
            return 0;
        p += behind;
        n -= behind;
    }
    /* the stream's buffer, the payload and the held segments that follow it */
    Py_ssize_t size = 0;
    if (bytes_append(&self->scratch, &size, &self->scratch_cap, s->buf, s->buf_len) < 0 ||
        bytes_append(&self->scratch, &size, &self->scratch_cap, p, n) < 0)
        return -1;
    s->next_seq += (uint32_t)n;
    while (s->held_len) {
        Py_ssize_t i = 0;
        while (i < s->held_len && s->held[i].seq != s->next_seq)
            i++;
        if (i == s->held_len)
            break;
        held_t more = s->held[i];
        s->held[i] = s->held[--s->held_len];
        int rc = bytes_append(&self->scratch, &size, &self->scratch_cap, more.data, more.len);
        PyMem_Free(more.data);
        if (rc < 0)
            return -1;
        s->next_seq += (uint32_t)more.len;
    }
    const char *data = self->scratch;
    if (s->kind == K_PICKLE)
        return stream_frames(self, s, data, size);
    if (!s->synced) {
        const char *nl = memchr(data, '\n', (size_t)size);
        if (nl == NULL) {
            s->buf_len = 0;
            return 0;
        }
        size -= nl + 1 - data;
        data = nl + 1;
        s->synced = 1;
    }
    const char *last = last_newline(data, size);
    if (last != NULL) {
        if (count_now(self->counts[K_LINE], data, last - data) < 0)
            return -1;
        size -= last + 1 - data;
        data = last + 1;
    }
    return bytes_set(&s->buf, &s->buf_len, &s->buf_cap, data, size);
}

/* Decoder.tcp: one segment of a line or pickle connection. */
static int
tcp_segment(WalkerObject *self, const flowkey_t *key, int kind, int flags, uint32_t seq,
            const char *p, Py_ssize_t n)
{
    uint64_t h = hash_name((const char *)key, sizeof(*key));
    stream_t **slot = flow_slot(self, key, h);
    stream_t *s = *slot;
    if (flags & TH_SYN) {
        if (s == NULL && (s = flow_add(self, slot, key, h, kind)) == NULL)
            return -1;
        held_clear(s);
        s->buf_len = 0;
        s->next_seq = seq + 1;
        s->synced = 1;
        return 0;
    }
    if (s == NULL) {
        if (!n)
            return 0;
        if ((s = flow_add(self, slot, key, h, kind)) == NULL)
            return -1;
        s->next_seq = seq;
        slot = flow_slot(self, key, h); /* the table may have grown */
    }
    if (n) {
        int rc = s->synced && seq == s->next_seq && !s->held_len
                     ? stream_in_order(self, s, p, n)
                     : stream_out_of_order(self, s, seq, p, n);
        if (rc < 0)
            return -1;
    }
    if (flags & (TH_FIN | TH_RST))
        flow_remove(self, slot);
    return 0;
}

/* ----- frames */

static int
flush_all(WalkerObject *self)
{
    for (int k = K_LINE; k <= K_STATSD; k++)
        if (flush_names(self->counts[k]) < 0)
            return -1;
    return 0;
}


/* One TCP segment dpkt decoded: (src, sport, dst, dport, flags, seq, payload). */
static int
python_segment(WalkerObject *self, PyObject *item)
{
    Py_buffer src, dst, payload;
    unsigned int sport, dport, flags;
    unsigned long seq;
    if (!PyTuple_Check(item)) {
        PyErr_SetString(PyExc_TypeError, "a segment is a tuple");
        return -1;
    }
    if (!PyArg_ParseTuple(item, "y*Iy*IIky*:segment", &src, &sport, &dst, &dport, &flags, &seq,
                          &payload))
        return -1;
    int rc = -1;
    flowkey_t key;
    memset(&key, 0, sizeof(key));
    int kind = dport < 65536 ? self->kinds[dport] : K_NONE;
    if (src.len != dst.len || (src.len != 4 && src.len != 16) || sport > 65535 ||
        (kind != K_LINE && kind != K_PICKLE)) {
        PyErr_SetString(PyExc_ValueError, "not a segment of a line or pickle TCP connection");
        goto done;
    }
    key.alen = (uint8_t)src.len;
    key.sport = (uint16_t)sport;
    key.dport = (uint16_t)dport;
    memcpy(key.src, src.buf, (size_t)src.len);
    memcpy(key.dst, dst.buf, (size_t)dst.len);
    rc = tcp_segment(self, &key, kind, (int)flags, (uint32_t)seq, payload.buf, payload.len);
    /* names queued in payload: counted before it is released */
    if (rc == 0)
        rc = flush_all(self);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    PyBuffer_Release(&payload);
    return rc;
}

/* A frame for dpkt's full decode: other_frame(frame) counts its datagrams (through
 * the same Counts) and returns its TCP segments, fed to their streams here. */
static int
other_frame(WalkerObject *self, const unsigned char *f, Py_ssize_t len)
{
    PyObject *result = PyObject_CallFunction(self->other_frame, "y#", (const char *)f, len);
    if (result == NULL)
        return -1;
    PyObject *segments = PySequence_Fast(result, "other_frame returns a sequence of segments");
    Py_DECREF(result);
    if (segments == NULL)
        return -1;
    int rc = 0;
    for (Py_ssize_t i = 0; rc == 0 && i < PySequence_Fast_GET_SIZE(segments); i++)
        rc = python_segment(self, PySequence_Fast_GET_ITEM(segments, i));
    Py_DECREF(segments);
    return rc;
}

static inline int
is_vlan(uint32_t type)
{
    return type == 0x8100 || type == 0x88A8 || type == 0x9100 || type == 0x9200;
}

/* One frame of the capture's link type (Decoder.transport for the frames the
 * numpy path reads, plus IPv6 and VLAN tags); anything else to other_frame. */
static int
walk_frame(WalkerObject *self, int linktype, const unsigned char *f, Py_ssize_t len)
{
    Py_ssize_t at;
    uint32_t type;
    switch (linktype) {
    case 1: /* Ethernet */
        if (len < 14)
            return other_frame(self, f, len);
        type = rd16(f + 12);
        at = 14;
        if (is_vlan(type)) { /* one tag; a second (QinQ) goes to dpkt */
            if (len < 18 || rd16(f + 16) == 0x8100)
                return other_frame(self, f, len);
            type = rd16(f + 16);
            at = 18;
        }
        break;
    case 113: /* Linux cooked v1 */
        if (len < 16)
            return other_frame(self, f, len);
        type = rd16(f + 14);
        at = 16;
        break;
    case 276: /* Linux cooked v2 */
        if (len < 20)
            return other_frame(self, f, len);
        type = rd16(f);
        at = 20;
        break;
    default: /* raw IP: the version says which */
        if (len < 1)
            return other_frame(self, f, len);
        type = f[0] >> 4 == 4 ? 0x0800 : 0x86DD;
        at = 0;
        break;
    }
    const unsigned char *ip = f + at, *l4;
    Py_ssize_t captured = len - at, end; /* end: of the IP payload, from ip */
    flowkey_t key;
    int proto;
    if (type == 0x0800) {
        if (captured < 28 || ip[0] != 0x45 || (ip[6] & 0x3F) || ip[7])
            return other_frame(self, f, len);
        proto = ip[9];
        Py_ssize_t total = (Py_ssize_t)rd16(ip + 2);
        end = total == 0 ? captured : (total < captured ? total : captured);
        l4 = ip + 20;
        memset(&key, 0, sizeof(key));
        key.alen = 4;
        memcpy(key.src, ip + 12, 4);
        memcpy(key.dst, ip + 16, 4);
    }
    else if (type == 0x86DD) {
        if (captured < 48 || ip[0] >> 4 != 6)
            return other_frame(self, f, len);
        proto = ip[6];
        Py_ssize_t payload = (Py_ssize_t)rd16(ip + 4);
        captured -= 40;
        end = 40 + (payload == 0 ? captured : (payload < captured ? payload : captured));
        l4 = ip + 40;
        memset(&key, 0, sizeof(key));
        key.alen = 16;
        memcpy(key.src, ip + 8, 16);
        memcpy(key.dst, ip + 24, 16);
    }
    else {
        return other_frame(self, f, len);
    }
    Py_ssize_t l4_len = end - (l4 - ip);
    if (proto == 17) {
        if (l4_len < 8)
            return other_frame(self, f, len);
        int kind = self->kinds[rd16(l4 + 2)];
        if (kind == K_LINE || kind == K_STATSD) {
            if (count_text(self->counts[kind], (const char *)l4 + 8, l4_len - 8) < 0) {
                self->counts[kind]->queued = 0;
                return -1;
            }
        }
        else
            self->skipped[kind == K_NONE ? S_OTHER_PORTS : S_PICKLE_UDP]++;
        return 0;
    }
    if (proto != 6 || l4_len < 20)
        return other_frame(self, f, len);
    Py_ssize_t header = (l4[12] >> 4) * 4;
    if (header < 20 || l4_len < header)
        return other_frame(self, f, len);
    int kind = self->kinds[rd16(l4 + 2)];
    if (kind != K_LINE && kind != K_PICKLE) {
        self->skipped[S_OTHER_PORTS]++;
        return 0;
    }
    key.sport = (uint16_t)rd16(l4);
    key.dport = (uint16_t)rd16(l4 + 2);
    return tcp_segment(self, &key, kind, l4[13], rd32(l4 + 4, 1), (const char *)l4 + header,
                       l4_len - header);
}

static PyObject *
walker_walk(WalkerObject *self, PyObject *args)
{
    Py_buffer data;
    Py_ssize_t offset;
    int big_endian, linktype;
    if (self->table == NULL) {
        PyErr_SetString(PyExc_TypeError, "the Walker was not initialised");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "y*npi:walk", &data, &offset, &big_endian, &linktype))
        return NULL;
    const unsigned char *buf = data.buf;
    Py_ssize_t size = data.len;
    int rc = 0;
    if (offset < 0 || offset > size) {
        PyErr_SetString(PyExc_ValueError, "offset outside the buffer");
        rc = -1;
    }
    while (rc == 0 && size - offset >= 16) {
        const unsigned char *h = buf + offset;
        Py_ssize_t start = offset + 16;
        uint32_t caplen = rd32(h + 8, big_endian);
        Py_ssize_t len = (uint64_t)caplen > (uint64_t)(size - start) ? size - start : caplen;
        self->last[0] = rd32(h, big_endian);
        self->last[1] = rd32(h + 4, big_endian);
        if (!self->stamped) {
            self->first[0] = self->last[0];
            self->first[1] = self->last[1];
            self->stamped = 1;
        }
        self->packets++;
        rc = walk_frame(self, linktype, buf + start, len);
        offset = start + len;
    }
    if (rc == 0 && offset < size)
        self->skipped[S_TRUNCATED]++;
    /* the queued names point into data: counted before it is released */
    if (rc == 0)
        rc = flush_all(self);
    else
        for (int k = K_LINE; k <= K_STATSD; k++)
            self->counts[k]->queued = 0;
    PyBuffer_Release(&data);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
walker_stats(WalkerObject *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *skipped = PyDict_New();
    if (skipped == NULL)
        return NULL;
    for (int i = 0; i < S_COUNT; i++) {
        if (!self->skipped[i])
            continue;
        PyObject *count = PyLong_FromLongLong(self->skipped[i]);
        if (count == NULL || PyDict_SetItemString(skipped, skip_reasons[i], count) < 0) {
            Py_XDECREF(count);
            Py_DECREF(skipped);
            return NULL;
        }
        Py_DECREF(count);
    }
    if (!self->stamped)
        return Py_BuildValue("(LOON)", self->packets, Py_None, Py_None, skipped);
    return Py_BuildValue("(L(II)(II)N)", self->packets, self->first[0], self->first[1],
                         self->last[0], self->last[1], skipped);
}

static int
walker_init(WalkerObject *self, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"line",      "pickle",      "statsd",   "kinds", "decode_frame",
                               "other_frame", "max_name", "max_output", NULL};
    PyObject *counts[3], *decode_frame, *other;
    Py_buffer kinds;
    Py_ssize_t max_name, max_output;
    if (self->table != NULL) {
        PyErr_SetString(PyExc_TypeError, "a Walker is initialised once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!O!y*OOnn:Walker", keywords, &CountsType,
                                     &counts[0], &CountsType, &counts[1], &CountsType,
                                     &counts[2], &kinds, &decode_frame, &other, &max_name,
                                     &max_output))
        return -1;
    int ok = kinds.len == 65536;
    if (ok)
        memcpy(self->kinds, kinds.buf, 65536);
    PyBuffer_Release(&kinds);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "kinds: one byte per port (65536)");
        return -1;
    }
    for (int k = 0; k < 3; k++) {
        Py_INCREF(counts[k]);
        self->counts[K_LINE + k] = (CountsObject *)counts[k];
    }
    Py_INCREF(decode_frame);
    self->decode_frame = decode_frame;
    Py_INCREF(other);
    self->other_frame = other;
    self->max_name = max_name;
    self->max_output = max_output;
    return flows_resize(self, 256);
}

static void
walker_dealloc(WalkerObject *self)
{
    for (Py_ssize_t i = 0; self->table != NULL && i <= self->mask; i++)
        if (self->table[i] != NULL)
            stream_free(self->table[i]);
    PyMem_Free(self->table);
    PyMem_Free(self->scratch);
    for (int k = K_LINE; k <= K_STATSD; k++)
        Py_XDECREF(self->counts[k]);
    Py_XDECREF(self->decode_frame);
    Py_XDECREF(self->other_frame);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef walker_methods[] = {
    {"walk", (PyCFunction)walker_walk, METH_VARARGS,
     "walk(buffer, offset, big_endian, linktype): the pcap records from offset to the end"},
    {"stats", (PyCFunction)walker_stats, METH_NOARGS,
     "stats() -> (packets, first (seconds, fraction), last, {reason: skipped})"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject WalkerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "carbonscale._hotcount.Walker",
    .tp_basicsize = sizeof(WalkerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Walker(line, pickle, statsd, kinds, decode_frame, other_frame, max_name, "
              "max_output): a classic pcap's records decoded and counted",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)walker_init,
    .tp_dealloc = (destructor)walker_dealloc,
    .tp_methods = walker_methods,
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
    if (PyType_Ready(&CountsType) < 0 || PyType_Ready(&WalkerType) < 0)
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
    Py_INCREF(&WalkerType);
    if (PyModule_AddObject(m, "Walker", (PyObject *)&WalkerType) < 0) {
        Py_DECREF(&WalkerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
