/*
 * carbonscale._whisper: the merge of carbonscale.whisper's fill, and its verify, in C.
 *
 * plan(src: bytes, dst: bytes, now: int) -> (points: int, writes: list[(offset, bytes)])
 * fill(src: bytes, dst: bytes, now: int, fd: int) -> points: int
 * verify(src: bytes, dst: bytes, now: int) -> (checked, missing, unchecked, examples)
 *
 * Both buffers must be whole whisper files whose headers carbonscale.whisper
 * .parse_header accepted (this code re-reads the header but trusts it). The
 * rules are those of the docstring of carbonscale/whisper/__init__.py; the numpy
 * implementation (plan_fill_numpy in whisper/merge.py) is the reference twin, and the tests
 * check that both return exactly the same writes (and `verify` the same counts as
 * verify_data_numpy in whisper/verification.py). `fill` is what a fill runs:
 * the same merge, its runs written to fd with pwrite (not handed to Python as
 * bytes objects: allocating those cost as much as the merge). The GIL is
 * released while merging and writing, so --jobs runs files on threads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define POINT 12
/* Runs of filled slots closer than this are written as one, the slots between
 * them rewritten with the bytes just read (under the lock, so unchanged): a
 * 10 s archive filled from 1 min data would otherwise take a write per point. */
#define RUN_GAP 1024
#define MAX_ARCHIVES 1024
/* The slot walks ask for the page ahead: the hardware prefetcher stops at page
 * boundaries, and the mapped page cache is 4 KiB pages scattered in memory
 * (a quarter off the merge in bench/fill.py). Prefetches never fault. */
#define PREFETCH_AHEAD 4096

enum { AVERAGE = 1, SUM, LAST, MAX, MIN, AVG_ZERO, ABSMAX, ABSMIN };

typedef struct {
	int64_t offset, step, points;
} archive_t;

typedef struct {
	int aggregation;
	double xff;
	int count;
	archive_t archives[MAX_ARCHIVES];
} header_t;

/* An archive's window: interval start + i*step. Materialized (DST: values[i]
 * when known[i]) or read straight from the file's slots (SRC: known == NULL). */
typedef struct {
	int64_t start, step, n, first; /* first: slot of `start`, -1 when empty */
	const unsigned char *slots;
	double *values;
	unsigned char *known;
} line_t;

static uint32_t
be32(const unsigned char *p)
{
	uint32_t v;
	memcpy(&v, p, 4);
	return __builtin_bswap32(v);
}

static double
be_double(const unsigned char *p)
{
	uint64_t v;
	double d;
	memcpy(&v, p, 8);
	v = __builtin_bswap64(v);
	memcpy(&d, &v, 8);
	return d;
}

static void
put_point(unsigned char *p, uint32_t t, double value)
{
	uint64_t v;
	t = __builtin_bswap32(t);
	memcpy(p, &t, 4);
	memcpy(&v, &value, 8);
	v = __builtin_bswap64(v);
	memcpy(p + 4, &v, 8);
}

static int64_t
floor_div(int64_t a, int64_t b)
{
	int64_t q = a / b;
	return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

static int64_t
floor_mod(int64_t a, int64_t b)
{
	int64_t m = a % b;
	return (m != 0 && ((m < 0) != (b < 0))) ? m + b : m;
}

static int
read_header(const unsigned char *buf, Py_ssize_t size, header_t *h)
{
	if (size < 16)
		return -1;
	uint32_t xff_bits = be32(buf + 8);
	float xff;
	memcpy(&xff, &xff_bits, 4);
	h->aggregation = (int)be32(buf);
	h->xff = (double)xff;
	h->count = (int)be32(buf + 12);
	if (h->aggregation < AVERAGE || h->aggregation > ABSMIN || h->count < 1 ||
	    h->count > MAX_ARCHIVES || size < 16 + 12 * (Py_ssize_t)h->count)
		return -1;
	for (int i = 0; i < h->count; i++) {
		const unsigned char *p = buf + 16 + 12 * i;
		archive_t *a = &h->archives[i];
		a->offset = be32(p);
		a->step = be32(p + 4);
		a->points = be32(p + 8);
		if (a->step < 1 || a->points < 1 || a->offset + a->points * POINT > size)
			return -1;
	}
	return 0;
}

static int64_t
window_start(const archive_t *a, int64_t now)
{
	return now - floor_mod(now, a->step) - (a->points - 1) * a->step;
}

/* Point `line` at the archive's window in the buffer. */
static void
open_line(const unsigned char *buf, const archive_t *a, int64_t now, line_t *line)
{
	line->start = window_start(a, now);
	line->step = a->step;
	line->n = a->points;
	line->slots = buf + a->offset;
	line->values = NULL;
	line->known = NULL;
	int64_t base = be32(line->slots);
	line->first = base == 0 ? -1 : floor_mod(floor_div(line->start - base, a->step), a->points);
}

/* Materialize known[] (all rows) and values[] (rows from `from` on: the rows
 * a coarser archive may aggregate; others are only read once filled); returns
 * the number of points. */
static int64_t
materialize(line_t *line, int64_t from)
{
	int64_t n = line->n, count = 0;
	if (line->first < 0) {
		memset(line->known, 0, (size_t)n);
		return 0;
	}
	int64_t slot = line->first, expected = line->start;
	for (int64_t i = 0; i < n; i++) {
		const unsigned char *p = line->slots + slot * POINT;
		__builtin_prefetch(p + PREFETCH_AHEAD);
		int known = (int64_t)be32(p) == expected;
		line->known[i] = (unsigned char)known;
		count += known;
		if (known && i >= from)
			line->values[i] = be_double(p + 4);
		expected += line->step;
		if (++slot == n)
			slot = 0;
	}
	return count;
}

/* A running aggregate: the known cells of one coarse interval. */
typedef struct {
	int aggregation;
	int64_t count;
	double total, best;
} aggregate_t;

static inline void
aggregate_add(aggregate_t *g, double v)
{
	g->total += v; /* unknown cells add nothing: +0.0 would change no sum */
	switch (g->aggregation) {
	case LAST:
		g->best = v;
		break;
	case MAX:
		if (g->count == 0 || v > g->best)
			g->best = v;
		break;
	case MIN:
		if (g->count == 0 || v < g->best)
			g->best = v;
		break;
	case ABSMAX:
		if (g->count == 0 || fabs(v) > fabs(g->best))
			g->best = v;
		break;
	case ABSMIN:
		if (g->count == 0 || fabs(v) < fabs(g->best))
			g->best = v;
		break;
	default:
		break;
	}
	g->count++;
}

/* Aggregate of the `per_row` cells of `line` from interval `t` on; returns 1
 * when whisper would propagate it (a known cell, known/total >= xff). */
static int
aggregate_row(const line_t *line, int64_t t, int64_t per_row, int aggregation, double xff,
	      double *out)
{
	aggregate_t g = {aggregation, 0, 0.0, 0.0};
	int64_t lo = floor_div(t - line->start, line->step), hi = lo + per_row;
	if (lo < 0)
		lo = 0;
	if (hi > line->n)
		hi = line->n;
	if (line->known) { /* a materialized DST line */
		for (int64_t i = lo; i < hi; i++)
			if (line->known[i])
				aggregate_add(&g, line->values[i]);
	} else if (line->first >= 0 && lo < hi) { /* SRC's slots, walked in order */
		int64_t slot = line->first + lo;
		if (slot >= line->n)
			slot -= line->n;
		int64_t expected = line->start + lo * line->step;
		for (int64_t i = lo; i < hi; i++, expected += line->step) {
			const unsigned char *p = line->slots + slot * POINT;
			__builtin_prefetch(p + PREFETCH_AHEAD);
			if (++slot == line->n)
				slot = 0;
			if ((int64_t)be32(p) == expected)
				aggregate_add(&g, be_double(p + 4));
		}
	}
	if (g.count == 0 || !((double)g.count / (double)per_row >= xff))
		return 0;
	switch (aggregation) {
	case AVERAGE:
		*out = g.total / (double)g.count;
		break;
	case SUM:
		*out = g.total;
		break;
	case AVG_ZERO:
		*out = g.total / (double)per_row;
		break;
	default:
		*out = g.best;
		break;
	}
	return 1;
}

typedef struct {
	int64_t offset, length; /* bytes, in the file; data in the scratch image */
} run_t;

typedef struct {
	const unsigned char *dst; /* the DST file */
	unsigned char *image; /* scratch, same layout as the DST file: only the runs are set */
	unsigned char *work;  /* scratch for two lines of max_points (10 bytes a point) */
	int64_t max_points;
	run_t *runs;
	Py_ssize_t nruns, cap;
	int64_t points;
} plan_t;

static int
add_run(plan_t *plan, int64_t offset, int64_t length)
{
	if (plan->nruns > 0) {
		run_t *last = &plan->runs[plan->nruns - 1];
		int64_t end = last->offset + last->length, gap = offset - end;
		if (gap >= 0 && gap <= RUN_GAP) {
			/* the slots between two runs are rewritten as they are */
			memcpy(plan->image + end, plan->dst + end, (size_t)gap);
			last->length = offset + length - last->offset;
			return 0;
		}
	}
	if (plan->nruns == plan->cap) {
		Py_ssize_t cap = plan->cap ? plan->cap * 2 : 16;
		run_t *grown = realloc(plan->runs, (size_t)cap * sizeof(run_t));
		if (grown == NULL)
			return -1;
		plan->runs = grown;
		plan->cap = cap;
	}
	plan->runs[plan->nruns].offset = offset;
	plan->runs[plan->nruns].length = length;
	plan->nruns++;
	return 0;
}

static int
all_zero(const unsigned char *p, int64_t length)
{
	uint64_t word, any = 0;
	int64_t i = 0;
	for (; i + 8 <= length; i += 8) {
		memcpy(&word, p + i, 8);
		any |= word;
	}
	for (; i < length; i++)
		any |= p[i];
	return any == 0;
}

/* The first row from r on (below end) that is filled, or end: eight rows a step
 * over the unfilled stretches. */
static inline int64_t
next_filled(const unsigned char *filled, int64_t r, int64_t end)
{
	uint64_t word;
	while (r + 8 <= end) {
		memcpy(&word, filled + r, 8);
		if (word)
			break;
		r += 8;
	}
	while (r < end && !filled[r])
		r++;
	return r;
}

/* Record the filled rows of one DST archive as writes (the numpy twin's _patch
 * and patch_writes): runs of slots, or the whole archive when it was empty (no
 * base) and not all zeros -- then the new layout must not pick up stale slots
 * whose timestamps happen to match it. */
static int
emit(plan_t *plan, const archive_t *a, const line_t *line, const unsigned char *filled)
{
	int64_t n = a->points;
	unsigned char *slots = plan->image + a->offset;
	int64_t first = line->first, whole = 0;
	if (first < 0) {
		first = floor_mod(-next_filled(filled, 0, n), n); /* the first filled row in slot 0 */
		whole = !all_zero(plan->dst + a->offset, n * POINT);
		if (whole)
			memset(slots, 0, (size_t)(n * POINT));
	}
	/* slot s holds row (s - first) mod n: slots [0, first) hold rows [n - first, n),
	 * slots [first, n) rows [0, n - first); in slot order, for add_run */
	int64_t segments[2][2] = {{0, n - first}, {first, 0}}; /* {first slot, first row} */
	for (int g = 0; g < 2; g++) {
		int64_t slot0 = segments[g][0], row0 = segments[g][1];
		int64_t end = row0 + (g == 0 ? first : n - first);
		for (int64_t r = next_filled(filled, row0, end); r < end;
		     r = next_filled(filled, r, end)) {
			int64_t start = r;
			for (; r < end && filled[r]; r++)
				put_point(slots + (slot0 + r - row0) * POINT,
					  (uint32_t)(line->start + r * line->step), line->values[r]);
			plan->points += r - start;
			if (!whole &&
			    add_run(plan, a->offset + (slot0 + start - row0) * POINT, (r - start) * POINT))
				return -1;
		}
	}
	return whole ? add_run(plan, a->offset, n * POINT) : 0;
}

/* One scratch buffer per thread, grown as needed and kept: fresh allocations
 * of this size come from mmap, and the page faults (and the kernel zeroing
 * every new page) cost more than the merge itself. */
static __thread unsigned char *scratch;
static __thread size_t scratch_size;

static unsigned char *
scratch_get(size_t size)
{
	if (size > scratch_size) {
		free(scratch);
		scratch = malloc(size);
		scratch_size = scratch ? size : 0;
	}
	return scratch;
}

/* Row r of the DST line becomes a point filled with v. */
static inline void
fill_row(line_t *line, unsigned char *filled, int64_t r, double v, int64_t *needed)
{
	line->values[r] = v;
	line->known[r] = 1;
	filled[r] = 1;
	(*needed)--;
}

/* Pass 2: every row of `line` still empty that SRC's archive of the same step
 * holds, walking SRC's slots in order (no per-row bounds or modulo). */
static void
fill_same_step(line_t *line, unsigned char *filled, const line_t *other, int64_t *needed)
{
	int64_t step = line->step, shift = floor_div(line->start - other->start, step);
	int64_t lo = shift < 0 ? -shift : 0;
	int64_t hi = other->n - shift < line->n ? other->n - shift : line->n;
	if (lo >= hi)
		return;
	int64_t slot = floor_mod(other->first + lo + shift, other->n);
	int64_t expected = other->start + (lo + shift) * step;
	for (int64_t r = lo; r < hi; r++, expected += step) {
		const unsigned char *p = other->slots + slot * POINT;
		__builtin_prefetch(p + PREFETCH_AHEAD);
		if (++slot == other->n)
			slot = 0;
		if (!line->known[r] && (int64_t)be32(p) == expected)
			fill_row(line, filled, r, be_double(p + 4), needed);
	}
}

/* Fill rows [lo, hi) of `line` still empty with aggregates of `finer`. */
static void
fill_aggregates(line_t *line, unsigned char *filled, const line_t *finer, int64_t lo, int64_t hi,
		const header_t *dh, int64_t *needed)
{
	int64_t per_row = line->step / finer->step;
	for (int64_t r = lo < 0 ? 0 : lo; r < hi && r < line->n && *needed; r++) {
		double v;
		if (!line->known[r] && aggregate_row(finer, line->start + r * line->step, per_row,
						     dh->aggregation, dh->xff, &v))
			fill_row(line, filled, r, v, needed);
	}
}

/* The merge; returns the points filled, or -1 when out of memory. */
static int64_t
merge(const unsigned char *src, const header_t *sh, const unsigned char *dst, const header_t *dh,
      int64_t now, plan_t *plan)
{
	line_t previous = {0}, line = {0}, other;
	int64_t finest_start = window_start(&dh->archives[0], now);
	/* lines alternate between two areas: this archive's and the finer one's */
	unsigned char *areas[2] = {plan->work, plan->work + plan->max_points * 10};

	for (int d = 0; d < dh->count; d++) {
		const archive_t *a = &dh->archives[d];
		int64_t n = a->points, step = a->step;
		unsigned char *area = areas[d % 2];
		open_line(dst, a, now, &line);
		line.values = (double *)area;
		line.known = area + n * 8;
		unsigned char *filled = line.known + n;
		memset(filled, 0, (size_t)n);
		/* rows from `inside` on start inside the finest archive's window */
		int64_t inside = -floor_div(line.start - finest_start, step);
		int64_t empty = n - materialize(&line, inside < 0 ? 0 : inside), needed = empty;
		/* 1. coarse intervals inside the finest window, from the merged finer archive */
		if (d > 0 && needed && step % previous.step == 0)
			fill_aggregates(&line, filled, &previous, inside, n, dh, &needed);
		/* 2. SRC at the same precision; 3. finer SRC aggregated, finest first */
		for (int s = 0; s < sh->count && needed; s++) {
			const archive_t *sa = &sh->archives[s];
			if (sa->step != step)
				continue;
			open_line(src, sa, now, &other);
			if (other.first >= 0)
				fill_same_step(&line, filled, &other, &needed);
		}
		for (int s = 0; s < sh->count && needed; s++) {
			const archive_t *sa = &sh->archives[s];
			if (sa->step >= step || step % sa->step)
				continue;
			open_line(src, sa, now, &other);
			if (other.first < 0)
				continue;
			int64_t other_end = other.start + (other.n - 1) * other.step;
			fill_aggregates(&line, filled, &other, floor_div(other.start - line.start, step),
					floor_div(other_end - line.start, step) + 1, dh, &needed);
		}
		if (needed < empty && emit(plan, a, &line, filled))
			return -1;
		previous = line;
	}
	return plan->points;
}

/* Parse both headers and merge; fills `plan` (runs in plan->image). Returns 0, or
 * -1 with a Python exception set. `fd` >= 0: also write the runs to it (pwrite,
 * GIL released). */
static int
run_merge(Py_buffer *src, Py_buffer *dst, long long now, int fd, plan_t *plan)
{
	header_t *sh = malloc(sizeof(header_t)), *dh = malloc(sizeof(header_t));
	int status = -1;
	if (!sh || !dh) {
		PyErr_NoMemory();
		goto out;
	}
	if (read_header(src->buf, src->len, sh) || read_header(dst->buf, dst->len, dh)) {
		PyErr_SetString(PyExc_ValueError, "not a whisper file carbonscale.whisper accepted");
		goto out;
	}
	for (int d = 0; d < dh->count; d++)
		if (dh->archives[d].points > plan->max_points)
			plan->max_points = dh->archives[d].points;
	/* 8-byte aligned: the work area holds doubles */
	size_t image_size = ((size_t)dst->len + 7) & ~(size_t)7;
	plan->image = scratch_get(image_size + (size_t)plan->max_points * 20);
	if (!plan->image) {
		PyErr_NoMemory();
		goto out;
	}
	plan->work = plan->image + image_size;
	plan->dst = dst->buf;
	int64_t merged;
	int failed = 0; /* errno of a failed write */
	Py_BEGIN_ALLOW_THREADS
	merged = merge(src->buf, sh, dst->buf, dh, (int64_t)now, plan);
	for (Py_ssize_t i = 0; merged >= 0 && fd >= 0 && i < plan->nruns && !failed; i++) {
		const unsigned char *data = plan->image + plan->runs[i].offset;
		int64_t offset = plan->runs[i].offset, left = plan->runs[i].length;
		while (left > 0) {
			ssize_t written = pwrite(fd, data, (size_t)left, (off_t)offset);
			if (written < 0 && errno == EINTR)
				continue;
			if (written <= 0) {
				failed = written < 0 ? errno : EIO;
				break;
			}
			data += written;
			offset += written;
			left -= written;
		}
	}
	Py_END_ALLOW_THREADS
	if (merged < 0)
		PyErr_NoMemory();
	else if (failed) {
		errno = failed;
		PyErr_SetFromErrno(PyExc_OSError);
	} else
		status = 0;
out:
	free(sh);
	free(dh);
	return status;
}

static PyObject *
whisper_plan(PyObject *Py_UNUSED(self), PyObject *args)
{
	Py_buffer src, dst;
	long long now;
	if (!PyArg_ParseTuple(args, "y*y*L", &src, &dst, &now))
		return NULL;
	PyObject *result = NULL, *writes = NULL;
	plan_t plan = {0};
	if (run_merge(&src, &dst, now, -1, &plan))
		goto out;
	writes = PyList_New(plan.nruns);
	if (!writes)
		goto out;
	for (Py_ssize_t i = 0; i < plan.nruns; i++) {
		PyObject *item = Py_BuildValue(
			"Ly#", (long long)plan.runs[i].offset,
			(const char *)plan.image + plan.runs[i].offset, (Py_ssize_t)plan.runs[i].length);
		if (!item)
			goto out;
		PyList_SET_ITEM(writes, i, item);
	}
	result = Py_BuildValue("LO", (long long)plan.points, writes);
out:
	Py_XDECREF(writes);
	free(plan.runs);
	PyBuffer_Release(&src);
	PyBuffer_Release(&dst);
	return result;
}

static PyObject *
whisper_fill(PyObject *Py_UNUSED(self), PyObject *args)
{
	Py_buffer src, dst;
	long long now;
	int fd;
	if (!PyArg_ParseTuple(args, "y*y*Li", &src, &dst, &now, &fd))
		return NULL;
	plan_t plan = {0};
	PyObject *result = NULL;
	if (run_merge(&src, &dst, now, fd, &plan) == 0)
		result = PyLong_FromLongLong((long long)plan.points);
	free(plan.runs);
	PyBuffer_Release(&src);
	PyBuffer_Release(&dst);
	return result;
}

/* Is row r (interval start + r*step) of the line a point? */
static inline int
line_known(const line_t *line, int64_t r)
{
	if (line->first < 0)
		return 0;
	int64_t slot = line->first + r;
	if (slot >= line->n)
		slot -= line->n;
	return (int64_t)be32(line->slots + slot * POINT) == line->start + r * line->step;
}

#define MISSING_EXAMPLES 5

typedef struct {
	int64_t checked, missing, unchecked;
	int nexamples;
	int64_t examples[MISSING_EXAMPLES];
} verified_t;

/* verify_data's count (carbonscale/whisper/verification.py, its numpy twin):
 * every SRC point in a DST archive of the same step must be a DST point; SRC
 * points at a step DST lacks are unchecked when younger than DST's retention. */
static void
verify_points(const unsigned char *src, const header_t *sh, const unsigned char *dst,
	      const header_t *dh, int64_t now, verified_t *out)
{
	int64_t retention = 0;
	for (int d = 0; d < dh->count; d++)
		if (dh->archives[d].step * dh->archives[d].points > retention)
			retention = dh->archives[d].step * dh->archives[d].points;
	int64_t oldest = now - retention;
	for (int s = 0; s < sh->count; s++) {
		const archive_t *sa = &sh->archives[s], *target = NULL;
		line_t line, other;
		open_line(src, sa, now, &line);
		for (int d = 0; d < dh->count; d++)
			if (dh->archives[d].step == sa->step)
				target = &dh->archives[d];
		if (!target) {
			for (int64_t r = 0; r < line.n; r++)
				if (line.start + r * line.step > oldest && line_known(&line, r))
					out->unchecked++;
			continue;
		}
		open_line(dst, target, now, &other);
		int64_t shift = floor_div(other.start - line.start, line.step);
		int64_t lo = shift > 0 ? shift : 0;
		int64_t hi = shift + other.n < line.n ? shift + other.n : line.n;
		for (int64_t r = lo; r < hi; r++) {
			if (!line_known(&line, r))
				continue;
			out->checked++;
			if (line_known(&other, r - shift))
				continue;
			out->missing++;
			if (out->nexamples < MISSING_EXAMPLES)
				out->examples[out->nexamples++] = line.start + r * line.step;
		}
	}
}

static PyObject *
whisper_verify(PyObject *Py_UNUSED(self), PyObject *args)
{
	Py_buffer src, dst;
	long long now;
	if (!PyArg_ParseTuple(args, "y*y*L", &src, &dst, &now))
		return NULL;
	PyObject *result = NULL;
	header_t *sh = malloc(sizeof(header_t)), *dh = malloc(sizeof(header_t));
	verified_t found = {0};
	if (!sh || !dh) {
		PyErr_NoMemory();
		goto out;
	}
	if (read_header(src.buf, src.len, sh) || read_header(dst.buf, dst.len, dh)) {
		PyErr_SetString(PyExc_ValueError, "not a whisper file carbonscale.whisper accepted");
		goto out;
	}
	Py_BEGIN_ALLOW_THREADS
	verify_points(src.buf, sh, dst.buf, dh, (int64_t)now, &found);
	Py_END_ALLOW_THREADS
	PyObject *examples = PyList_New(found.nexamples);
	if (!examples)
		goto out;
	for (int i = 0; i < found.nexamples; i++) {
		PyObject *t = PyLong_FromLongLong((long long)found.examples[i]);
		if (!t) {
			Py_DECREF(examples);
			goto out;
		}
		PyList_SET_ITEM(examples, i, t);
	}
	result = Py_BuildValue("LLLN", (long long)found.checked, (long long)found.missing,
			       (long long)found.unchecked, examples);
out:
	free(sh);
	free(dh);
	PyBuffer_Release(&src);
	PyBuffer_Release(&dst);
	return result;
}

static PyMethodDef whisper_methods[] = {
	{"plan", whisper_plan, METH_VARARGS,
	 "plan(src, dst, now) -> (points, [(offset, bytes), ...]): the writes of a fill."},
	{"fill", whisper_fill, METH_VARARGS,
	 "fill(src, dst, now, fd) -> points: the fill, written to fd (-1: counted only)."},
	{"verify", whisper_verify, METH_VARARGS,
	 "verify(src, dst, now) -> (checked, missing, unchecked, [first missing times])."},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef whisper_module = {
	PyModuleDef_HEAD_INIT, "carbonscale._whisper", NULL, -1, whisper_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__whisper(void)
{
	return PyModule_Create(&whisper_module);
}
