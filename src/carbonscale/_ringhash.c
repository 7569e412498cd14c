/*
 * carbonscale._ringhash: the per-name loops of carbonscale.ring in C.
 *
 * The numpy batch functions in ring/hashes.py are the reference twin (and the
 * fallback where this module is not built); tests check both agree with the
 * scalar functions and with carbon-c-relay's -t output. Results come back as
 * bytes holding native-endian integer arrays, read with numpy.frombuffer.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FNV32_OFFSET 2166136261U
#define FNV32_PRIME 16777619U
#define FNV64_OFFSET 14695981039346656037ULL
#define FNV64_PRIME 1099511628211ULL

/* fnv1a(names: list[bytes], bits: int, signed_char: bool) -> bytes
 * bits 32: uint32 per name; bits 64: uint64 per name. With signed_char, a
 * byte >= 0x80 is sign-extended to the hash width first, as carbon-c-relay
 * does by reading through a (signed on x86) char. */
static PyObject *
ringhash_fnv1a(PyObject *self, PyObject *args)
{
	PyObject *names;
	int bits, signed_char;
	if (!PyArg_ParseTuple(args, "O!ip", &PyList_Type, &names, &bits, &signed_char))
		return NULL;
	if (bits != 32 && bits != 64) {
		PyErr_SetString(PyExc_ValueError, "bits must be 32 or 64");
		return NULL;
	}
	Py_ssize_t n = PyList_GET_SIZE(names);
	Py_ssize_t width = bits / 8;
	PyObject *out = PyBytes_FromStringAndSize(NULL, n * width);
	if (out == NULL)
		return NULL;
	char *buf = PyBytes_AS_STRING(out);
	for (Py_ssize_t i = 0; i < n; i++) {
		PyObject *item = PyList_GET_ITEM(names, i);
		if (!PyBytes_Check(item)) {
			Py_DECREF(out);
			PyErr_SetString(PyExc_TypeError, "names must be bytes");
			return NULL;
		}
		const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(item);
		Py_ssize_t len = PyBytes_GET_SIZE(item);
		if (bits == 32) {
			uint32_t h = FNV32_OFFSET;
			for (Py_ssize_t k = 0; k < len; k++) {
				uint32_t c = signed_char ? (uint32_t)(int32_t)(int8_t)p[k] : p[k];
				h = (h ^ c) * FNV32_PRIME;
			}
			memcpy(buf + i * width, &h, sizeof h);
		} else {
			uint64_t h = FNV64_OFFSET;
			for (Py_ssize_t k = 0; k < len; k++) {
				uint64_t c = signed_char ? (uint64_t)(int64_t)(int8_t)p[k] : p[k];
				h = (h ^ c) * FNV64_PRIME;
			}
			memcpy(buf + i * width, &h, sizeof h);
		}
	}
	return out;
}

/* MD5 (RFC 1321), just enough to take the first two bytes of a digest:
 * carbon_ch's ring position. Checked against hashlib by the tests. */
static const uint32_t md5_k[64] = {
	0xd76aa478, 0xe8c7b756, 0x242070db, 0xc1bdceee, 0xf57c0faf, 0x4787c62a, 0xa8304613, 0xfd469501,
	0x698098d8, 0x8b44f7af, 0xffff5bb1, 0x895cd7be, 0x6b901122, 0xfd987193, 0xa679438e, 0x49b40821,
	0xf61e2562, 0xc040b340, 0x265e5a51, 0xe9b6c7aa, 0xd62f105d, 0x02441453, 0xd8a1e681, 0xe7d3fbc8,
	0x21e1cde6, 0xc33707d6, 0xf4d50d87, 0x455a14ed, 0xa9e3e905, 0xfcefa3f8, 0x676f02d9, 0x8d2a4c8a,
	0xfffa3942, 0x8771f681, 0x6d9d6122, 0xfde5380c, 0xa4beea44, 0x4bdecfa9, 0xf6bb4b60, 0xbebfbc70,
	0x289b7ec6, 0xeaa127fa, 0xd4ef3085, 0x04881d05, 0xd9d4d039, 0xe6db99e5, 0x1fa27cf8, 0xc4ac5665,
	0xf4292244, 0x432aff97, 0xab9423a7, 0xfc93a039, 0x655b59c3, 0x8f0ccc92, 0xffeff47d, 0x85845dd1,
	0x6fa87e4f, 0xfe2ce6e0, 0xa3014314, 0x4e0811a1, 0xf7537e82, 0xbd3af235, 0x2ad7d2bb, 0xeb86d391};
static const unsigned char md5_r[64] = {
	7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22,
	5, 9, 14, 20, 5, 9, 14, 20, 5, 9, 14, 20, 5, 9, 14, 20,
	4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23,
	6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21};

static void
md5_block(uint32_t state[4], const unsigned char block[64])
{
	uint32_t w[16];
	for (int i = 0; i < 16; i++)
		w[i] = (uint32_t)block[i * 4] | (uint32_t)block[i * 4 + 1] << 8 |
		       (uint32_t)block[i * 4 + 2] << 16 | (uint32_t)block[i * 4 + 3] << 24;
	uint32_t a = state[0], b = state[1], c = state[2], d = state[3];
	for (int i = 0; i < 64; i++) {
		uint32_t f;
		int g;
		if (i < 16) {
			f = (b & c) | (~b & d);
			g = i;
		} else if (i < 32) {
			f = (d & b) | (~d & c);
			g = (5 * i + 1) & 15;
		} else if (i < 48) {
			f = b ^ c ^ d;
			g = (3 * i + 5) & 15;
		} else {
			f = c ^ (b | ~d);
			g = (7 * i) & 15;
		}
		uint32_t t = d;
		d = c;
		c = b;
		uint32_t x = a + f + md5_k[i] + w[g];
		b = b + ((x << md5_r[i]) | (x >> (32 - md5_r[i])));
		a = t;
	}
	state[0] += a;
	state[1] += b;
	state[2] += c;
	state[3] += d;
}

/* First two bytes of MD5(data), big-endian: 0..65535. */
static unsigned int
md5_position(const unsigned char *data, Py_ssize_t len)
{
	uint32_t state[4] = {0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476};
	Py_ssize_t done = 0;
	for (; len - done >= 64; done += 64)
		md5_block(state, data + done);
	unsigned char tail[128];
	Py_ssize_t rest = len - done;
	memcpy(tail, data + done, rest);
	tail[rest] = 0x80;
	Py_ssize_t padded = rest + 1 <= 56 ? 64 : 128;
	memset(tail + rest + 1, 0, padded - rest - 1);
	uint64_t bits = (uint64_t)len * 8;
	for (int i = 0; i < 8; i++)
		tail[padded - 8 + i] = (unsigned char)(bits >> (8 * i));
	md5_block(state, tail);
	if (padded == 128)
		md5_block(state, tail + 64);
	/* the digest starts with state[0] in little-endian byte order */
	return ((state[0] & 0xff) << 8) | ((state[0] >> 8) & 0xff);
}

/* md5_positions(names: list[bytes]) -> bytes (int64 per name) */
static PyObject *
ringhash_md5_positions(PyObject *self, PyObject *args)
{
	PyObject *names;
	if (!PyArg_ParseTuple(args, "O!", &PyList_Type, &names))
		return NULL;
	Py_ssize_t n = PyList_GET_SIZE(names);
	PyObject *out = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(int64_t));
	if (out == NULL)
		return NULL;
	int64_t *pos = (int64_t *)PyBytes_AS_STRING(out);
	for (Py_ssize_t i = 0; i < n; i++) {
		PyObject *item = PyList_GET_ITEM(names, i);
		if (!PyBytes_Check(item)) {
			Py_DECREF(out);
			PyErr_SetString(PyExc_TypeError, "names must be bytes");
			return NULL;
		}
		pos[i] = md5_position((const unsigned char *)PyBytes_AS_STRING(item),
				      PyBytes_GET_SIZE(item));
	}
	return out;
}

/* Google's jump consistent hash with carbon-c-relay's double arithmetic. */
static int64_t
jump(uint64_t key, int64_t buckets)
{
	int64_t b = -1, j = 0;
	while (j < buckets) {
		b = j;
		key = key * 2862933555777941757ULL + 1;
		j = (int64_t)((double)(b + 1) * ((double)(1LL << 31) / (double)((key >> 33) + 1)));
	}
	return b;
}

/* jump_replicas(keys: bytes (uint64 each), order: bytes (int64 member index
 * per bucket), replication: int) -> bytes (int64, replication per key)
 * carbon-c-relay's replicas: pick, xorshift the key, move the last bucket into
 * the picked one, jump again over one bucket less. */
static PyObject *
ringhash_jump_replicas(PyObject *self, PyObject *args)
{
	Py_buffer keys, order;
	int replication;
	if (!PyArg_ParseTuple(args, "y*y*i", &keys, &order, &replication))
		return NULL;
	Py_ssize_t n = keys.len / (Py_ssize_t)sizeof(uint64_t);
	Py_ssize_t buckets = order.len / (Py_ssize_t)sizeof(int64_t);
	PyObject *out = NULL;
	if (replication < 1 || replication > buckets || buckets > 4096) {
		PyErr_SetString(PyExc_ValueError, "replication must be in 1..buckets (<= 4096)");
		goto done;
	}
	out = PyBytes_FromStringAndSize(NULL, n * replication * (Py_ssize_t)sizeof(int64_t));
	if (out == NULL)
		goto done;
	{
		int64_t *result = (int64_t *)PyBytes_AS_STRING(out);
		const uint64_t *key_in = (const uint64_t *)keys.buf;
		const int64_t *base = (const int64_t *)order.buf;
		int64_t list[4096];
		for (Py_ssize_t i = 0; i < n; i++) {
			uint64_t h = key_in[i];
			Py_ssize_t alive = buckets;
			if (replication > 1)
				memcpy(list, base, buckets * sizeof(int64_t));
			const int64_t *current = replication > 1 ? list : base;
			for (int r = 0; r < replication; r++) {
				int64_t pick = jump(h, alive);
				result[i * replication + r] = current[pick];
				if (r + 1 == replication)
					break;
				h ^= h >> 12;
				h ^= h << 25;
				h ^= h >> 27;
				h *= 2685821657736338717ULL;
				list[pick] = list[--alive];
			}
		}
	}
done:
	PyBuffer_Release(&keys);
	PyBuffer_Release(&order);
	return out;
}

/* join_lines(names: list[bytes], suffixes: list[bytes], indices: bytes (int64))
 * -> bytes: names[i] + suffixes[indices[i]] for every i, concatenated. */
static PyObject *
ringhash_join_lines(PyObject *self, PyObject *args)
{
	PyObject *names, *suffixes;
	Py_buffer indices;
	if (!PyArg_ParseTuple(args, "O!O!y*", &PyList_Type, &names, &PyList_Type, &suffixes,
			      &indices))
		return NULL;
	PyObject *out = NULL;
	Py_ssize_t n = PyList_GET_SIZE(names);
	Py_ssize_t table = PyList_GET_SIZE(suffixes);
	const int64_t *index = (const int64_t *)indices.buf;
	if (indices.len != n * (Py_ssize_t)sizeof(int64_t)) {
		PyErr_SetString(PyExc_ValueError, "one index per name");
		goto done;
	}
	Py_ssize_t total = 0;
	for (Py_ssize_t i = 0; i < n; i++) {
		PyObject *name = PyList_GET_ITEM(names, i);
		if (index[i] < 0 || index[i] >= table) {
			PyErr_SetString(PyExc_IndexError, "suffix index out of range");
			goto done;
		}
		PyObject *suffix = PyList_GET_ITEM(suffixes, index[i]);
		if (!PyBytes_Check(name) || !PyBytes_Check(suffix)) {
			PyErr_SetString(PyExc_TypeError, "names and suffixes must be bytes");
			goto done;
		}
		total += PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(suffix);
	}
	out = PyBytes_FromStringAndSize(NULL, total);
	if (out == NULL)
		goto done;
	{
		char *w = PyBytes_AS_STRING(out);
		for (Py_ssize_t i = 0; i < n; i++) {
			PyObject *name = PyList_GET_ITEM(names, i);
			PyObject *suffix = PyList_GET_ITEM(suffixes, index[i]);
			memcpy(w, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name));
			w += PyBytes_GET_SIZE(name);
			memcpy(w, PyBytes_AS_STRING(suffix), PyBytes_GET_SIZE(suffix));
			w += PyBytes_GET_SIZE(suffix);
		}
	}
done:
	PyBuffer_Release(&indices);
	return out;
}

/* locate_block(block: bytes, kind: int, signed_char: bool, table: bytes (int64),
 *              suffixes: list[bytes], order: bytes (int64), replication: int) -> bytes
 * The whole of `carbonscale ring locate` for one block of lines: the metric is
 * the first whitespace-separated field of each line (blank lines are skipped);
 * it is written followed by its owner text suffixes[i], where i is
 *   kind 0 (carbon_ch):     table[md5 position]
 *   kind 1 (fnv1a_ch):      table[fnv1a_32 position]
 *   kind 2 (jump_fnv1a_ch): the owner row's code (members in base len(order)).
 * The Python path (names_in + positions + join_lines) is the reference twin. */
static int
is_space(unsigned char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

static PyObject *
ringhash_locate_block(PyObject *self, PyObject *args)
{
	Py_buffer block, table, order;
	PyObject *suffixes;
	int kind, signed_char, replication;
	if (!PyArg_ParseTuple(args, "y*ipy*O!y*i", &block, &kind, &signed_char, &table,
			      &PyList_Type, &suffixes, &order, &replication))
		return NULL;
	PyObject *out = NULL;
	char *w = NULL;
	const char **stext = NULL;
	Py_ssize_t *slens = NULL;
	Py_ssize_t cap = 0, used = 0;
	int bad_index = 0;
	Py_ssize_t nsuffix = PyList_GET_SIZE(suffixes);
	Py_ssize_t ntable = table.len / (Py_ssize_t)sizeof(int64_t);
	Py_ssize_t buckets = order.len / (Py_ssize_t)sizeof(int64_t);
	const int64_t *tab = (const int64_t *)table.buf;
	const int64_t *base = (const int64_t *)order.buf;
	int64_t list[4096];
	int nomem = 0;
	if (kind < 0 || kind > 2 || (kind < 2 && ntable != 65536) ||
	    (kind == 2 && (replication < 1 || replication > buckets || buckets > 4096))) {
		PyErr_SetString(PyExc_ValueError, "bad kind, table or replication");
		goto done;
	}
	/* The suffix texts are read while the GIL is released (another thread
	 * formats the next block meanwhile): take plain pointers first. The
	 * list and its bytes stay alive: the caller holds them. */
	stext = PyMem_Malloc((nsuffix + 1) * sizeof *stext);
	slens = PyMem_Malloc((nsuffix + 1) * sizeof *slens);
	if (stext == NULL || slens == NULL) {
		PyErr_NoMemory();
		goto done;
	}
	for (Py_ssize_t i = 0; i < nsuffix; i++) {
		PyObject *item = PyList_GET_ITEM(suffixes, i);
		if (!PyBytes_Check(item)) {
			PyErr_SetString(PyExc_TypeError, "suffixes must be bytes");
			goto done;
		}
		stext[i] = PyBytes_AS_STRING(item);
		slens[i] = PyBytes_GET_SIZE(item);
	}
	cap = block.len * 2 + 4096;
	Py_BEGIN_ALLOW_THREADS
	w = malloc(cap);
	if (w == NULL)
		nomem = 1;
	const unsigned char *p = (const unsigned char *)block.buf;
	const unsigned char *end = p + block.len;
	while (!nomem && p < end) {
		const unsigned char *eol = memchr(p, '\n', end - p);
		if (eol == NULL)
			eol = end;
		const unsigned char *name = p;
		while (name < eol && is_space(*name))
			name++;
		const unsigned char *stop = name;
		while (stop < eol && !is_space(*stop))
			stop++;
		p = eol + 1;
		if (stop == name)
			continue;
		Py_ssize_t len = stop - name;
		int64_t index;
		if (kind == 0) {
			index = tab[md5_position(name, len)];
		} else if (kind == 1) {
			uint32_t h = FNV32_OFFSET;
			for (Py_ssize_t k = 0; k < len; k++) {
				uint32_t c = signed_char ? (uint32_t)(int32_t)(int8_t)name[k] : name[k];
				h = (h ^ c) * FNV32_PRIME;
			}
			index = tab[(h >> 16) ^ (h & 0xffff)];
		} else {
			uint64_t h = FNV64_OFFSET;
			for (Py_ssize_t k = 0; k < len; k++) {
				uint64_t c = signed_char ? (uint64_t)(int64_t)(int8_t)name[k] : name[k];
				h = (h ^ c) * FNV64_PRIME;
			}
			Py_ssize_t alive = buckets;
			if (replication > 1)
				memcpy(list, base, buckets * sizeof(int64_t));
			const int64_t *current = replication > 1 ? list : base;
			index = 0;
			for (int r = 0; r < replication; r++) {
				int64_t pick = jump(h, alive);
				index = index * buckets + current[pick];
				if (r + 1 == replication)
					break;
				h ^= h >> 12;
				h ^= h << 25;
				h ^= h >> 27;
				h *= 2685821657736338717ULL;
				list[pick] = list[--alive];
			}
		}
		if (index < 0 || index >= nsuffix) {
			bad_index = 1;
			break;
		}
		Py_ssize_t slen = slens[index];
		if (used + len + slen > cap) {
			cap = (used + len + slen) * 2;
			char *grown = realloc(w, cap);
			if (grown == NULL) {
				nomem = 1;
				break;
			}
			w = grown;
		}
		memcpy(w + used, name, len);
		used += len;
		memcpy(w + used, stext[index], slen);
		used += slen;
	}
	Py_END_ALLOW_THREADS
	if (nomem)
		PyErr_NoMemory();
	else if (bad_index)
		PyErr_SetString(PyExc_IndexError, "owner text index out of range");
	else
		out = PyBytes_FromStringAndSize(w, used);
done:
	free(w);
	PyMem_Free(stext);
	PyMem_Free(slens);
	PyBuffer_Release(&block);
	PyBuffer_Release(&table);
	PyBuffer_Release(&order);
	return out;
}

static PyMethodDef ringhash_methods[] = {
	{"locate_block", ringhash_locate_block, METH_VARARGS,
	 "Owner lines for a block of metric lines (the locate verb's inner loop)."},
	{"join_lines", ringhash_join_lines, METH_VARARGS,
	 "Concatenate names[i] + suffixes[indices[i]] for all i."},
	{"fnv1a", ringhash_fnv1a, METH_VARARGS, "FNV-1a of a list of bytes, packed."},
	{"md5_positions", ringhash_md5_positions, METH_VARARGS,
	 "carbon_ch positions (first two MD5 bytes) of a list of bytes, packed int64."},
	{"jump_replicas", ringhash_jump_replicas, METH_VARARGS,
	 "carbon-c-relay jump_fnv1a_ch replicas for packed uint64 keys."},
	{NULL, NULL, 0, NULL}};

static struct PyModuleDef ringhash_module = {
	PyModuleDef_HEAD_INIT, "_ringhash", "C loops of carbonscale.ring", -1, ringhash_methods};

PyMODINIT_FUNC
PyInit__ringhash(void)
{
	return PyModule_Create(&ringhash_module);
}
