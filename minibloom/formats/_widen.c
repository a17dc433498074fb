/* minibloom.formats._widen: 16-bit floats (IEEE binary16, bfloat16) widened to float32 / float64 in C.

   The optional speedup behind minibloom/formats/native.py (the NumPy passes of minibloom/formats/widen.py are the
   portable path and the reference). Built by setup.py where a C compiler exists; absent otherwise.

   Each function f16_f32, f16_f64, bf16_f32, bf16_f64 takes (src, dst): src any C-contiguous buffer of 2-byte items
   (the stored bit patterns), dst a writable C-contiguous buffer of float32 ("f") or float64 ("d") items with as many
   items as src. Both are taken through the buffer protocol and checked here, so a wrong argument raises TypeError /
   ValueError / BufferError and never reads or writes outside the two buffers. The conversion runs without the GIL.
   The result is True if any element was an inf or NaN (exponent all ones): every finite value is converted exactly,
   while a NaN's bits may differ from NumPy's cast (F16C quietens signalling NaNs), so the caller converts such a
   block again with NumPy.

   On x86-64 with AVX2 + F16C (detected at run time with __builtin_cpu_supports, and the functions compiled for
   those instructions with __attribute__((target)), so the module builds with the default flags and loads on every
   x86-64 CPU) binary16 goes through vcvtph2ps (_mm256_cvtph_ps, IEEE 754 conversion of 8 values per instruction)
   and bfloat16 through a zero-extension and a 16-bit shift (bfloat16 is the top half of a float32). Elsewhere, and
   for the last src % 16 elements, plain C does the same conversions one element at a time. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define MB_X86 1
#include <immintrin.h>
#define MB_TARGET __attribute__((target("avx2,f16c")))
#else
#define MB_X86 0
#endif

static int simd = 0; /* AVX2 + F16C usable (set once, at import) */

/* ---- plain C: one element at a time ------------------------------------------------------------------------- */

/* binary16 bits -> float32 bits, exactly as NumPy's npy_halfbits_to_floatbits (inf/NaN keep their payload). */
static inline uint32_t half_to_float_bits(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f)
        return sign | 0x7f800000u | (m << 13);
    if (e == 0) {
        if (m == 0)
            return sign;
        e = 113; /* a subnormal m * 2^-24: normalise the mantissa, one exponent step per shift */
        while (!(m & 0x400u)) {
            m <<= 1;
            e--;
        }
        return sign | (e << 23) | ((m & 0x3ffu) << 13);
    }
    return sign | ((e + 112) << 23) | (m << 13);
}

static inline float bits_to_float(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static int f16_f32_c(const uint16_t *src, float *dst, size_t n)
{
    int flag = 0;
    for (size_t i = 0; i < n; i++) {
        flag |= (src[i] & 0x7c00u) == 0x7c00u;
        dst[i] = bits_to_float(half_to_float_bits(src[i]));
    }
    return flag;
}

static int f16_f64_c(const uint16_t *src, double *dst, size_t n)
{
    int flag = 0;
    for (size_t i = 0; i < n; i++) {
        flag |= (src[i] & 0x7c00u) == 0x7c00u;
        dst[i] = (double)bits_to_float(half_to_float_bits(src[i]));
    }
    return flag;
}

static int bf16_f32_c(const uint16_t *src, float *dst, size_t n)
{
    int flag = 0;
    for (size_t i = 0; i < n; i++) {
        flag |= (src[i] & 0x7f80u) == 0x7f80u;
        dst[i] = bits_to_float((uint32_t)src[i] << 16);
    }
    return flag;
}

static int bf16_f64_c(const uint16_t *src, double *dst, size_t n)
{
    int flag = 0;
    for (size_t i = 0; i < n; i++) {
        flag |= (src[i] & 0x7f80u) == 0x7f80u;
        dst[i] = (double)bits_to_float((uint32_t)src[i] << 16);
    }
    return flag;
}

/* ---- AVX2 + F16C: 16 elements per step, whole steps only (the tail goes to plain C) ---------------------------- */

#if MB_X86
/* 16 values (one 32-byte load) -> two float32 vectors; `seen` collects the lanes whose exponent is all ones */
MB_TARGET static inline void f16_step(const uint16_t *src, __m256 *lo, __m256 *hi, __m256i *seen)
{
    const __m256i mask = _mm256_set1_epi16(0x7c00);
    __m256i h = _mm256_loadu_si256((const __m256i *)src);
    *seen = _mm256_or_si256(*seen, _mm256_cmpeq_epi16(_mm256_and_si256(h, mask), mask));
    *lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
    *hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}

MB_TARGET static inline void bf16_step(const uint16_t *src, __m256 *lo, __m256 *hi, __m256i *seen)
{
    const __m256i mask = _mm256_set1_epi16(0x7f80);
    __m256i b = _mm256_loadu_si256((const __m256i *)src);
    *seen = _mm256_or_si256(*seen, _mm256_cmpeq_epi16(_mm256_and_si256(b, mask), mask));
    *lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(b)), 16));
    *hi = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(b, 1)), 16));
}

MB_TARGET static inline void store_f32(float *dst, __m256 lo, __m256 hi)
{
    _mm256_storeu_ps(dst, lo);
    _mm256_storeu_ps(dst + 8, hi);
}

MB_TARGET static inline void store_f64(double *dst, __m256 lo, __m256 hi)
{
    _mm256_storeu_pd(dst, _mm256_cvtps_pd(_mm256_castps256_ps128(lo)));
    _mm256_storeu_pd(dst + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(lo, 1)));
    _mm256_storeu_pd(dst + 8, _mm256_cvtps_pd(_mm256_castps256_ps128(hi)));
    _mm256_storeu_pd(dst + 12, _mm256_cvtps_pd(_mm256_extractf128_ps(hi, 1)));
}

/* One loop per (source format, destination type): `step` reads 16 values, `store` writes them, `tail` does the rest */
#define MB_LOOP(name, out_t, step, store, tail)                                                                      \
    MB_TARGET static int name(const uint16_t *src, out_t *dst, size_t n)                                            \
    {                                                                                                               \
        __m256i seen = _mm256_setzero_si256();                                                                      \
        __m256 lo, hi;                                                                                              \
        size_t i = 0;                                                                                               \
        for (; i + 16 <= n; i += 16) {                                                                              \
            step(src + i, &lo, &hi, &seen);                                                                         \
            store(dst + i, lo, hi);                                                                                 \
        }                                                                                                           \
        int flag = !_mm256_testz_si256(seen, seen);                                                                 \
        _mm256_zeroupper();                                                                                         \
        return tail(src + i, dst + i, n - i) | flag;                                                                \
    }

MB_LOOP(f16_f32_avx2, float, f16_step, store_f32, f16_f32_c)
MB_LOOP(f16_f64_avx2, double, f16_step, store_f64, f16_f64_c)
MB_LOOP(bf16_f32_avx2, float, bf16_step, store_f32, bf16_f32_c)
MB_LOOP(bf16_f64_avx2, double, bf16_step, store_f64, bf16_f64_c)
#endif

/* ---- the Python functions ------------------------------------------------------------------------------------ */

typedef int (*loop_f32)(const uint16_t *, float *, size_t);
typedef int (*loop_f64)(const uint16_t *, double *, size_t);

/* A buffer's format without a native / little-endian prefix, or NULL if it names another byte order. */
static const char *plain_format(const Py_buffer *b)
{
    const char *f = b->format ? b->format : "B";
    if (*f == '@' || *f == '=')
        return f + 1;
#if PY_LITTLE_ENDIAN
    if (*f == '<')
        return f + 1;
    if (*f == '>' || *f == '!')
        return NULL;
#else
    if (*f == '>' || *f == '!')
        return f + 1;
    if (*f == '<')
        return NULL;
#endif
    return f;
}

static PyObject *convert(PyObject *args, const char *name, char out_format, Py_ssize_t out_size, void *loop)
{
    PyObject *src_obj, *dst_obj;
    if (!PyArg_ParseTuple(args, "OO", &src_obj, &dst_obj))
        return NULL;
    Py_buffer src, dst;
    if (PyObject_GetBuffer(src_obj, &src, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0)
        return NULL;
    if (PyObject_GetBuffer(dst_obj, &dst, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) != 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    const char *sf = plain_format(&src), *df = plain_format(&dst);
    PyObject *result = NULL;
    if (src.itemsize != 2 || sf == NULL || strlen(sf) != 1 || src.len % 2 != 0) {
        PyErr_Format(PyExc_ValueError, "%s: the source must hold native-order 2-byte items (format '%s', item size "
                     "%zd)", name, src.format ? src.format : "B", src.itemsize);
    } else if (dst.itemsize != out_size || df == NULL || df[0] != out_format || df[1] != '\0'
               || dst.len % out_size != 0) {
        PyErr_Format(PyExc_ValueError, "%s: the destination must hold native-order '%c' items (format '%s', item "
                     "size %zd)", name, out_format, dst.format ? dst.format : "B", dst.itemsize);
    } else if (src.len / 2 != dst.len / out_size) {
        PyErr_Format(PyExc_ValueError, "%s: %zd source items but room for %zd", name, src.len / 2,
                     dst.len / out_size);
    } else {
        size_t n = (size_t)(src.len / 2);
        int flag;
        Py_BEGIN_ALLOW_THREADS
        if (out_size == 4)
            flag = ((loop_f32)loop)((const uint16_t *)src.buf, (float *)dst.buf, n);
        else
            flag = ((loop_f64)loop)((const uint16_t *)src.buf, (double *)dst.buf, n);
        Py_END_ALLOW_THREADS
        result = PyBool_FromLong(flag);
    }
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    return result;
}

#if MB_X86
#define PICK(fast, plain) (simd ? (void *)(fast) : (void *)(plain))
#else
#define PICK(fast, plain) ((void *)(plain))
#endif

static PyObject *py_f16_f32(PyObject *self, PyObject *args)
{
    return convert(args, "f16_f32", 'f', 4, PICK(f16_f32_avx2, f16_f32_c));
}

static PyObject *py_f16_f64(PyObject *self, PyObject *args)
{
    return convert(args, "f16_f64", 'd', 8, PICK(f16_f64_avx2, f16_f64_c));
}

static PyObject *py_bf16_f32(PyObject *self, PyObject *args)
{
    return convert(args, "bf16_f32", 'f', 4, PICK(bf16_f32_avx2, bf16_f32_c));
}

static PyObject *py_bf16_f64(PyObject *self, PyObject *args)
{
    return convert(args, "bf16_f64", 'd', 8, PICK(bf16_f64_avx2, bf16_f64_c));
}

#define DOC(what) what "(src, dst) -> bool: widen src's 2-byte items into dst; True if any was an inf or NaN."

static PyMethodDef methods[] = {
    {"f16_f32", py_f16_f32, METH_VARARGS, DOC("binary16 -> float32")},
    {"f16_f64", py_f16_f64, METH_VARARGS, DOC("binary16 -> float64")},
    {"bf16_f32", py_bf16_f32, METH_VARARGS, DOC("bfloat16 -> float32")},
    {"bf16_f64", py_bf16_f64, METH_VARARGS, DOC("bfloat16 -> float64")},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_widen",
    "16-bit floats widened to float32 / float64 in C (AVX2 + F16C where the CPU has them); see _widen.c.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__widen(void)
{
#if MB_X86
    __builtin_cpu_init();
    simd = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#endif
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    /* "avx2+f16c" or "c": which loops the functions run (the plain C ones do the same conversions, slower) */
    if (PyModule_AddStringConstant(m, "simd", simd ? "avx2+f16c" : "c") != 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
