/* Feature encoding in C: sample dicts -> feature keys as UTF-8 bytes, with their x values.
 *
 * The rules are stream_fm/features.py's. This file takes the common, valid cases (exact str field
 * names with exact str, float, int, bool values and lists/tuples of exact str), which CPython
 * would spend most of a sample's time on: it writes "field=value" bytes straight into a buffer,
 * with no Python string per key. Anything else (other types, non-finite numbers, errors) goes to
 * features._slow, the one place that says what an unusual value means or why it is refused.
 *
 * Two ways out:
 *   encode_batch(xs)                -> (key bytes, key lengths, x values, CSR offsets) as bytes
 *   predict_one(x, model) / learn_one(x, label, model)
 *                                   -> one sample handed to a compiled kernel (fastpath.py's
 *                                      numba cfuncs) with no Python call in between; `model` is
 *                                      the address of the model's pointer table (fastpath.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* the kernels' signature: (model pointer table, sample table) -> probability or status */
typedef double (*kernel_t)(int64_t *model, int64_t *sample);

/* sample table layout: fastpath.py's S_* constants */
enum { S_N, S_DATA, S_BYTES, S_LENGTHS, S_VALS, S_ROWS, S_LABEL, S_SIZE };

static PyObject *slow_fn;       /* features._slow(field, value) -> list of (key, x); raises */
static PyObject *as_dict_fn;    /* features._as_dict(x) -> dict; raises */
static PyObject *feature_error; /* errors.FeatureError */
static kernel_t predict_kernel, learn_kernel;

#define INLINE_BYTES 4096
#define INLINE_KEYS 256

/* Keys written so far: their bytes back to back, lengths, x values.
   One sample fits the inline storage (no malloc on the per-sample path). */
typedef struct {
    char *data;
    Py_ssize_t used, cap;
    int64_t *lengths;
    double *vals;
    Py_ssize_t n, ncap;
    char data0[INLINE_BYTES];
    int64_t lengths0[INLINE_KEYS];
    double vals0[INLINE_KEYS];
} Keys;

static void keys_init(Keys *k) {
    k->data = k->data0;
    k->used = 0;
    k->cap = INLINE_BYTES;
    k->lengths = k->lengths0;
    k->vals = k->vals0;
    k->n = 0;
    k->ncap = INLINE_KEYS;
}

static void keys_free(Keys *k) {
    if (k->data != k->data0) PyMem_Free(k->data);
    if (k->lengths != k->lengths0) PyMem_Free(k->lengths);
    if (k->vals != k->vals0) PyMem_Free(k->vals);
}

/* grow an inline-or-heap buffer to at least `need` items of `size` bytes */
static int grow(void **buf, void *inline_buf, Py_ssize_t *cap, Py_ssize_t need, size_t size, Py_ssize_t used) {
    Py_ssize_t cap2 = *cap ? *cap : 64;
    while (cap2 < need) cap2 *= 2;
    void *fresh = PyMem_Malloc((size_t)cap2 * size);
    if (!fresh) {
        PyErr_NoMemory();
        return -1;
    }
    if (used) memcpy(fresh, *buf, (size_t)used * size);
    if (*buf != inline_buf) PyMem_Free(*buf);
    *buf = fresh;
    *cap = cap2;
    return 0;
}

/* append one key: `a` bytes, then (if `b`) '=' and `b` bytes; x value `x` */
static int add_key(Keys *k, const char *a, Py_ssize_t na, const char *b, Py_ssize_t nb, double x) {
    Py_ssize_t len = b ? na + 1 + nb : na;
    if (k->used + len > k->cap &&
        grow((void **)&k->data, k->data0, &k->cap, k->used + len, 1, k->used) < 0)
        return -1;
    if (k->n == k->ncap) {
        Py_ssize_t ncap = k->ncap;
        if (grow((void **)&k->lengths, k->lengths0, &ncap, k->n + 1, sizeof(int64_t), k->n) < 0) return -1;
        ncap = k->ncap;
        if (grow((void **)&k->vals, k->vals0, &ncap, k->n + 1, sizeof(double), k->n) < 0) return -1;
        k->ncap = ncap;
    }
    char *p = k->data + k->used;
    memcpy(p, a, (size_t)na);
    if (b) {
        p[na] = '=';
        memcpy(p + na + 1, b, (size_t)nb);
    }
    k->used += len;
    k->lengths[k->n] = len;
    k->vals[k->n] = x;
    k->n++;
    return 0;
}

/* the UTF-8 bytes of str `s`: CPython's cached form, or (lone surrogates) a 'surrogatepass'
   encoding held in *tmp, which the caller releases */
static const char *utf8(PyObject *s, Py_ssize_t *n, PyObject **tmp) {
    const char *p = PyUnicode_AsUTF8AndSize(s, n);
    if (p) return p;
    if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) return NULL;
    PyErr_Clear();
    *tmp = PyUnicode_AsEncodedString(s, "utf-8", "surrogatepass");
    if (!*tmp) return NULL;
    *n = PyBytes_GET_SIZE(*tmp);
    return PyBytes_AS_STRING(*tmp);
}

static int add_pair(Keys *k, PyObject *field, PyObject *value, double x) {
    PyObject *t1 = NULL, *t2 = NULL;
    Py_ssize_t na, nb = 0;
    const char *a = utf8(field, &na, &t1), *b = NULL;
    int rc = -1;
    if (a && (!value || (b = utf8(value, &nb, &t2)))) rc = add_key(k, a, na, b, nb, x);
    Py_XDECREF(t1);
    Py_XDECREF(t2);
    return rc;
}

/* features._slow(field, value): a list of (key, x) pairs, or an exception */
static int add_slow(Keys *k, PyObject *field, PyObject *value) {
    PyObject *pairs = PyObject_CallFunctionObjArgs(slow_fn, field, value, NULL);
    if (!pairs) return -1;
    int rc = 0;
    if (!PyList_Check(pairs)) {
        PyErr_SetString(PyExc_TypeError, "features._slow must return a list");
        rc = -1;
    }
    for (Py_ssize_t i = 0; rc == 0 && i < PyList_GET_SIZE(pairs); i++) {
        PyObject *key, *x;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(pairs, i), "UO!", &key, &PyFloat_Type, &x)) {
            rc = -1;
            break;
        }
        rc = add_pair(k, key, NULL, PyFloat_AS_DOUBLE(x));
    }
    Py_DECREF(pairs);
    return rc;
}

/* one value of an exact-str field: 1 done, 0 not a fast case (nothing written), -1 error */
static int add_fast(Keys *k, PyObject *field, PyObject *value) {
    PyTypeObject *t = Py_TYPE(value);
    double x;
    if (t == &PyUnicode_Type) return add_pair(k, field, value, 1.0) < 0 ? -1 : 1;
    if (t == &PyFloat_Type) {
        x = PyFloat_AS_DOUBLE(value);
        if (!isfinite(x)) return 0;
    } else if (t == &PyBool_Type) {
        x = value == Py_True ? 1.0 : 0.0;
    } else if (t == &PyLong_Type) {
        x = PyLong_AsDouble(value); /* float(value), correctly rounded */
        if (x == -1.0 && PyErr_Occurred()) {
            PyErr_Clear(); /* too large for a float: the slow path says so */
            return 0;
        }
    } else if (t == &PyList_Type || t == &PyTuple_Type) {
        Py_ssize_t n = PySequence_Fast_GET_SIZE(value);
        PyObject **items = PySequence_Fast_ITEMS(value);
        for (Py_ssize_t i = 0; i < n; i++)
            if (Py_TYPE(items[i]) != &PyUnicode_Type) return 0;
        for (Py_ssize_t i = 0; i < n; i++)
            if (add_pair(k, field, items[i], 1.0) < 0) return -1;
        return 1;
    } else {
        return 0;
    }
    if (x == 0.0) return 1; /* x = 0 contributes nothing: dropped */
    return add_pair(k, field, NULL, x) < 0 ? -1 : 1;
}

static int add_sample(Keys *k, PyObject *x) {
    PyObject *owned = NULL;
    if (!PyDict_Check(x)) {
        if (!(owned = PyObject_CallOneArg(as_dict_fn, x))) return -1;
        x = owned;
    }
    Py_ssize_t pos = 0;
    PyObject *field, *value;
    int rc = 0;
    while (rc == 0 && PyDict_Next(x, &pos, &field, &value)) {
        int done = 0;
        if (Py_TYPE(field) == &PyUnicode_Type) done = add_fast(k, field, value);
        if (done == 0) {
            Py_INCREF(field);
            Py_INCREF(value);
            done = add_slow(k, field, value) < 0 ? -1 : 1;
            Py_DECREF(field);
            Py_DECREF(value);
        }
        if (done < 0) rc = -1;
    }
    Py_XDECREF(owned);
    return rc;
}

/* a FeatureError of sample i: the same field and reason, with the sample's position */
static void at_index(Py_ssize_t i) {
    if (!PyErr_ExceptionMatches(feature_error)) return;
    PyObject *type, *exc, *tb;
    PyErr_Fetch(&type, &exc, &tb);
    PyErr_NormalizeException(&type, &exc, &tb);
    PyObject *field = PyObject_GetAttrString(exc, "field");
    PyObject *reason = PyObject_GetAttrString(exc, "reason");
    if (field && reason) {
        PyObject *again = PyObject_CallFunction(feature_error, "OOn", field, reason, i);
        if (again) {
            PyErr_SetObject(feature_error, again);
            Py_DECREF(again);
        }
        Py_XDECREF(type);
        Py_XDECREF(exc);
        Py_XDECREF(tb);
    } else {
        PyErr_Restore(type, exc, tb);
    }
    Py_XDECREF(field);
    Py_XDECREF(reason);
}

static PyObject *encode_batch(PyObject *self, PyObject *xs) {
    PyObject *seq = PySequence_Fast(xs, "samples must be a sequence of dicts");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    Keys k;
    keys_init(&k);
    PyObject *result = NULL;
    int64_t *offsets = PyMem_Malloc((size_t)(n + 1) * sizeof(int64_t)); /* CSR: sample i's keys */
    if (!offsets) {
        PyErr_NoMemory();
        goto done;
    }
    offsets[0] = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (add_sample(&k, PySequence_Fast_GET_ITEM(seq, i)) < 0) {
            at_index(i);
            goto done;
        }
        offsets[i + 1] = k.n;
    }
    result = Py_BuildValue("(y#y#y#y#)", k.data, k.used, (char *)k.lengths, k.n * (Py_ssize_t)sizeof(int64_t),
                           (char *)k.vals, k.n * (Py_ssize_t)sizeof(double), (char *)offsets,
                           (n + 1) * (Py_ssize_t)sizeof(int64_t));
done:
    PyMem_Free(offsets);
    keys_free(&k);
    Py_DECREF(seq);
    return result;
}

/* ---------------------------------------------------------------- one sample, to a kernel */

typedef struct {
    Keys k;
    int64_t rows0[INLINE_KEYS];
    int64_t *rows;
    int64_t table[S_SIZE];
} Sample;

static int sample_encode(Sample *s, PyObject *x, int64_t label) {
    keys_init(&s->k);
    s->rows = s->rows0;
    if (add_sample(&s->k, x) < 0) return -1;
    if (s->k.n > INLINE_KEYS && !(s->rows = PyMem_Malloc((size_t)s->k.n * sizeof(int64_t)))) {
        PyErr_NoMemory();
        return -1;
    }
    int64_t *t = s->table;
    t[S_N] = s->k.n;
    t[S_DATA] = (int64_t)(intptr_t)s->k.data;
    t[S_BYTES] = s->k.used;
    t[S_LENGTHS] = (int64_t)(intptr_t)s->k.lengths;
    t[S_VALS] = (int64_t)(intptr_t)s->k.vals;
    t[S_ROWS] = (int64_t)(intptr_t)s->rows;
    t[S_LABEL] = label;
    return 0;
}

static void sample_free(Sample *s) {
    keys_free(&s->k);
    if (s->rows != s->rows0) PyMem_Free(s->rows);
}

static int64_t *model_table(PyObject *address, kernel_t kernel) {
    if (!kernel) {
        PyErr_SetString(PyExc_RuntimeError, "stream_fm._encode: kernels not configured");
        return NULL;
    }
    void *p = PyLong_AsVoidPtr(address);
    if (!p && !PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "null model table");
    return p;
}

/* predict_one(x, model) -> p */
static PyObject *predict_one(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "predict_one(x, model)");
        return NULL;
    }
    Sample s;
    PyObject *result = NULL;
    if (sample_encode(&s, args[0], 0) == 0) {
        int64_t *model = model_table(args[1], predict_kernel); /* read after encoding: current */
        if (model) result = PyFloat_FromDouble(predict_kernel(model, s.table));
    }
    sample_free(&s);
    return result;
}

/* learn_one(x, label, model) -> None (learned), or (rows, x values, misses) for the Python path:
   rows -1 where the key is absent, misses the (position, key) of those */
static PyObject *learn_one(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "learn_one(x, label, model)");
        return NULL;
    }
    int64_t label = PyObject_IsTrue(args[1]);
    if (label < 0) return NULL;
    Sample s;
    PyObject *result = NULL, *rows = NULL, *vals = NULL, *misses = NULL;
    if (sample_encode(&s, args[0], label) < 0) goto done;
    int64_t *model = model_table(args[2], learn_kernel);
    if (!model) goto done;
    if (learn_kernel(model, s.table) == 0.0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    Py_ssize_t n = s.k.n, start = 0;
    if (!(rows = PyList_New(n)) || !(vals = PyList_New(n)) || !(misses = PyList_New(0))) goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *r = PyLong_FromLongLong(s.rows[i]), *v = PyFloat_FromDouble(s.k.vals[i]);
        if (!r || !v) {
            Py_XDECREF(r);
            Py_XDECREF(v);
            goto done;
        }
        PyList_SET_ITEM(rows, i, r);
        PyList_SET_ITEM(vals, i, v);
        if (s.rows[i] < 0) {
            PyObject *key = PyUnicode_DecodeUTF8(s.k.data + start, s.k.lengths[i], "surrogatepass");
            PyObject *miss = key ? Py_BuildValue("(nN)", i, key) : NULL;
            if (!miss || PyList_Append(misses, miss) < 0) {
                Py_XDECREF(miss);
                goto done;
            }
            Py_DECREF(miss);
        }
        start += s.k.lengths[i];
    }
    result = PyTuple_Pack(3, rows, vals, misses);
done:
    Py_XDECREF(rows);
    Py_XDECREF(vals);
    Py_XDECREF(misses);
    sample_free(&s);
    return result;
}

/* configure(slow, as_dict, FeatureError, predict_kernel_address, learn_kernel_address) */
static PyObject *configure(PyObject *self, PyObject *args) {
    PyObject *slow, *as_dict, *error, *predict, *learn;
    if (!PyArg_ParseTuple(args, "OOOOO", &slow, &as_dict, &error, &predict, &learn)) return NULL;
    void *p = PyLong_AsVoidPtr(predict), *l = PyLong_AsVoidPtr(learn);
    if (PyErr_Occurred()) return NULL;
    Py_XSETREF(slow_fn, Py_NewRef(slow));
    Py_XSETREF(as_dict_fn, Py_NewRef(as_dict));
    Py_XSETREF(feature_error, Py_NewRef(error));
    predict_kernel = (kernel_t)p;
    learn_kernel = (kernel_t)l;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS, "Set the slow path, the error class and the kernels."},
    {"encode_batch", encode_batch, METH_O, "Samples -> (key bytes, lengths, x values, offsets), as bytes."},
    {"predict_one", (PyCFunction)(void (*)(void))predict_one, METH_FASTCALL, "One sample's probability."},
    {"learn_one", (PyCFunction)(void (*)(void))learn_one, METH_FASTCALL, "Learn one sample."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_encode", "Feature encoding in C.", -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__encode(void) { return PyModule_Create(&module); }
