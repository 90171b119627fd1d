/*
 * chacha20-poly1305@openssh.com packet sealing and opening in one call each (asyncssh_seam item 3k).
 *
 * Why: in Python every SSH packet costs three ChaCha20 contexts and a Poly1305 object from
 * `cryptography` (about 14 us of call overhead per packet, against about 20 us of cipher work for
 * 32 KiB), and a stock OpenSSH client sends and accepts only 32 KiB packets: 32,768 per GiB. Here
 * the two ChaCha20 keys are set up once per connection and each packet is one call into OpenSSL.
 *
 * No cipher is written here: ChaCha20 and Poly1305 are OpenSSL's (EVP_chacha20, EVP_MAC
 * "POLY1305"), from the system's libcrypto.so.3 found with dlopen at import, so building this needs
 * only a C compiler and Python's headers (no OpenSSL headers). The construction is OpenSSH's
 * PROTOCOL.chacha20poly1305: K_2 = key[0:32] encrypts the payload (block 0 of its keystream is the
 * Poly1305 key, the payload starts at block 1), K_1 = key[32:64] encrypts the 4-byte length, the
 * nonce is the packet sequence number (64-bit big-endian) and the tag covers the encrypted length
 * and payload. tests/test_speedups.py checks it byte for byte against asyncssh's implementation.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <stdint.h>
#include <string.h>

typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
typedef struct evp_cipher_st EVP_CIPHER;
typedef struct evp_mac_st EVP_MAC;
typedef struct evp_mac_ctx_st EVP_MAC_CTX;

static EVP_CIPHER_CTX *(*p_EVP_CIPHER_CTX_new)(void);
static void (*p_EVP_CIPHER_CTX_free)(EVP_CIPHER_CTX *);
static const EVP_CIPHER *(*p_EVP_chacha20)(void);
static int (*p_EVP_CipherInit_ex)(EVP_CIPHER_CTX *, const EVP_CIPHER *, void *, const unsigned char *,
                                  const unsigned char *, int);
static int (*p_EVP_CipherUpdate)(EVP_CIPHER_CTX *, unsigned char *, int *, const unsigned char *, int);
static EVP_MAC *(*p_EVP_MAC_fetch)(void *, const char *, const char *);
static EVP_MAC_CTX *(*p_EVP_MAC_CTX_new)(EVP_MAC *);
static void (*p_EVP_MAC_CTX_free)(EVP_MAC_CTX *);
static int (*p_EVP_MAC_init)(EVP_MAC_CTX *, const unsigned char *, size_t, const void *);
static int (*p_EVP_MAC_update)(EVP_MAC_CTX *, const unsigned char *, size_t);
static int (*p_EVP_MAC_final)(EVP_MAC_CTX *, unsigned char *, size_t *, size_t);
static int (*p_CRYPTO_memcmp)(const void *, const void *, size_t);

static EVP_MAC *poly1305;  /* fetched once */

static int load_libcrypto(void) {
    static const char *names[] = {"libcrypto.so.3", "libcrypto.so", NULL};
    void *lib = NULL;
    for (int i = 0; names[i] && !lib; i++)
        lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        PyErr_SetString(PyExc_ImportError, "libcrypto.so.3 not found");
        return -1;
    }
#define LOAD(name) \
    if (!(*(void **)&p_##name = dlsym(lib, #name))) { \
        PyErr_SetString(PyExc_ImportError, "libcrypto has no " #name); \
        return -1; \
    }
    LOAD(EVP_CIPHER_CTX_new) LOAD(EVP_CIPHER_CTX_free) LOAD(EVP_chacha20) LOAD(EVP_CipherInit_ex)
    LOAD(EVP_CipherUpdate) LOAD(EVP_MAC_fetch) LOAD(EVP_MAC_CTX_new) LOAD(EVP_MAC_CTX_free)
    LOAD(EVP_MAC_init) LOAD(EVP_MAC_update) LOAD(EVP_MAC_final) LOAD(CRYPTO_memcmp)
#undef LOAD
    poly1305 = p_EVP_MAC_fetch(NULL, "POLY1305", NULL);
    if (!poly1305) {
        PyErr_SetString(PyExc_ImportError, "libcrypto offers no POLY1305 MAC");
        return -1;
    }
    return 0;
}

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *main;   /* K_2: payload, and block 0 = the Poly1305 key */
    EVP_CIPHER_CTX *header; /* K_1: the 4-byte packet length */
    EVP_MAC_CTX *mac;
} ChachaPoly;

static void ChachaPoly_dealloc(ChachaPoly *self) {
    if (self->main) p_EVP_CIPHER_CTX_free(self->main);
    if (self->header) p_EVP_CIPHER_CTX_free(self->header);
    if (self->mac) p_EVP_MAC_CTX_free(self->mac);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int ChachaPoly_init(ChachaPoly *self, PyObject *args, PyObject *kwds) {
    Py_buffer key;
    static char *kwlist[] = {"key", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*", kwlist, &key))
        return -1;
    int ok = key.len == 64;
    if (!ok)
        PyErr_SetString(PyExc_ValueError, "chacha20-poly1305@openssh.com needs a 64-byte key");
    if (ok) {
        self->main = p_EVP_CIPHER_CTX_new();
        self->header = p_EVP_CIPHER_CTX_new();
        self->mac = p_EVP_MAC_CTX_new(poly1305);
        const unsigned char *k = key.buf;
        ok = self->main && self->header && self->mac
             && p_EVP_CipherInit_ex(self->main, p_EVP_chacha20(), NULL, k, NULL, 1) == 1
             && p_EVP_CipherInit_ex(self->header, p_EVP_chacha20(), NULL, k + 32, NULL, 1) == 1;
        if (!ok)
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL could not set up ChaCha20");
    }
    PyBuffer_Release(&key);
    return ok ? 0 : -1;
}

/* OpenSSL's ChaCha20 IV: a 32-bit little-endian block counter, then 96 bits of nonce. OpenSSH's
 * nonce is 64 bits (the sequence number, big-endian) after a 64-bit counter: the same keystream
 * while the counter stays below 2^32 blocks (256 GiB per packet; packets are at most 256 KiB). */
static void make_iv(unsigned char iv[16], uint64_t seq) {
    memset(iv, 0, 8);
    for (int i = 0; i < 8; i++)
        iv[8 + i] = (unsigned char)(seq >> (56 - 8 * i));
}

static int xcrypt(EVP_CIPHER_CTX *ctx, unsigned char *out, const unsigned char *in, Py_ssize_t len) {
    while (len > 0) {  /* EVP takes an int length */
        int n = len > (1 << 30) ? (1 << 30) : (int)len, outl = 0;
        if (p_EVP_CipherUpdate(ctx, out, &outl, in, n) != 1 || outl != n)
            return -1;
        out += n;
        in += n;
        len -= n;
    }
    return 0;
}

/* Start the payload stream for `seq`: returns the Poly1305 key (keystream block 0); the context
 * then continues at block 1, where the payload starts. */
static int start_packet(ChachaPoly *self, uint64_t seq, unsigned char polykey[32]) {
    unsigned char iv[16], block0[64] = {0}, stream0[64];
    make_iv(iv, seq);
    if (p_EVP_CipherInit_ex(self->main, NULL, NULL, NULL, iv, 1) != 1 || xcrypt(self->main, stream0, block0, 64))
        return -1;
    memcpy(polykey, stream0, 32);
    return p_EVP_MAC_init(self->mac, polykey, 32, NULL) == 1 ? 0 : -1;
}

static int crypt_header(ChachaPoly *self, uint64_t seq, unsigned char out[4], const unsigned char in[4]) {
    unsigned char iv[16];
    make_iv(iv, seq);
    if (p_EVP_CipherInit_ex(self->header, NULL, NULL, NULL, iv, 1) != 1)
        return -1;
    return xcrypt(self->header, out, in, 4);
}

static PyObject *fail(void) {
    PyErr_SetString(PyExc_RuntimeError, "OpenSSL ChaCha20-Poly1305 call failed");
    return NULL;
}

/* The buffers of `parts` (a sequence of bytes-like objects) in `*views` (PyMem), `*got` of them
 * acquired, their total length in `*total`; 0, or -1 with an exception set. Release with
 * release_parts(*views, *got) in every case. */
static int get_parts(PyObject *seqobj, Py_buffer **views, Py_ssize_t *got, Py_ssize_t *total) {
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seqobj);
    *got = *total = 0;
    *views = PyMem_Calloc(n ? n : 1, sizeof(Py_buffer));
    if (!*views) {
        PyErr_NoMemory();
        return -1;
    }
    for (; *got < n; (*got)++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seqobj, *got), &(*views)[*got], PyBUF_SIMPLE))
            return -1;
        *total += (*views)[*got].len;
    }
    return 0;
}

static void release_parts(Py_buffer *views, Py_ssize_t got) {
    for (Py_ssize_t i = 0; i < got; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
}

/* decrypt_length(encrypted_length: 4 bytes, seq) -> the plain 4 bytes */
static PyObject *ChachaPoly_decrypt_length(ChachaPoly *self, PyObject *args) {
    Py_buffer enc;
    unsigned long long seq;
    if (!PyArg_ParseTuple(args, "y*K", &enc, &seq))
        return NULL;
    PyObject *result = NULL;
    unsigned char out[4];
    if (enc.len != 4)
        PyErr_SetString(PyExc_ValueError, "the length is 4 bytes");
    else if (crypt_header(self, seq, out, enc.buf))
        fail();
    else
        result = PyBytes_FromStringAndSize((const char *)out, 4);
    PyBuffer_Release(&enc);
    return result;
}

/* open(encrypted_length: 4 bytes, parts: sequence of buffers, seq, tag: 16 bytes) -> the decrypted
 * parts, concatenated, or None when the tag does not verify (nothing decrypted is returned). */
static PyObject *ChachaPoly_open(ChachaPoly *self, PyObject *args) {
    Py_buffer enc, tag;
    PyObject *parts;
    unsigned long long seq;
    if (!PyArg_ParseTuple(args, "y*OKy*", &enc, &parts, &seq, &tag))
        return NULL;
    PyObject *result = NULL, *seqobj = PySequence_Fast(parts, "parts must be a sequence");
    Py_buffer *views = NULL;
    Py_ssize_t n = 0, got = 0, total = 0;
    unsigned char polykey[32], mac[16];
    size_t macl = 0;
    if (!seqobj)
        goto done;
    if (enc.len != 4 || tag.len != 16) {
        PyErr_SetString(PyExc_ValueError, "a 4-byte length and a 16-byte tag");
        goto done;
    }
    if (get_parts(seqobj, &views, &got, &total))
        goto done;
    n = got;
    if (start_packet(self, seq, polykey) || p_EVP_MAC_update(self->mac, enc.buf, 4) != 1) {
        fail();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (p_EVP_MAC_update(self->mac, views[i].buf, (size_t)views[i].len) != 1) {
            fail();
            goto done;
        }
    if (p_EVP_MAC_final(self->mac, mac, &macl, sizeof mac) != 1 || macl != 16) {
        fail();
        goto done;
    }
    if (p_CRYPTO_memcmp(mac, tag.buf, 16) != 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    result = PyBytes_FromStringAndSize(NULL, total);
    if (!result)
        goto done;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (xcrypt(self->main, out, views[i].buf, views[i].len)) {
            Py_CLEAR(result);
            fail();
            goto done;
        }
        out += views[i].len;
    }
done:
    release_parts(views, got);
    Py_XDECREF(seqobj);
    PyBuffer_Release(&enc);
    PyBuffer_Release(&tag);
    return result;
}

/* seal(length: 4 plain bytes, parts: sequence of buffers, seq) -> the whole packet as sent:
 * encrypted length + encrypted parts + tag, written once into one bytes object. */
static PyObject *ChachaPoly_seal(ChachaPoly *self, PyObject *args) {
    Py_buffer len4;
    PyObject *parts;
    unsigned long long seq;
    if (!PyArg_ParseTuple(args, "y*OK", &len4, &parts, &seq))
        return NULL;
    PyObject *result = NULL, *seqobj = PySequence_Fast(parts, "parts must be a sequence");
    Py_buffer *views = NULL;
    Py_ssize_t n = 0, got = 0, total = 0;
    unsigned char polykey[32];
    size_t macl = 0;
    if (!seqobj)
        goto done;
    if (len4.len != 4) {
        PyErr_SetString(PyExc_ValueError, "the length is 4 bytes");
        goto done;
    }
    if (get_parts(seqobj, &views, &got, &total))
        goto done;
    n = got;
    result = PyBytes_FromStringAndSize(NULL, 4 + total + 16);
    if (!result)
        goto done;
    unsigned char *start = (unsigned char *)PyBytes_AS_STRING(result), *out = start + 4;
    if (crypt_header(self, seq, start, len4.buf) || start_packet(self, seq, polykey))
        goto failed;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (xcrypt(self->main, out, views[i].buf, views[i].len))
            goto failed;
        out += views[i].len;
    }
    if (p_EVP_MAC_update(self->mac, start, (size_t)(4 + total)) != 1
        || p_EVP_MAC_final(self->mac, out, &macl, 16) != 1 || macl != 16)
        goto failed;
    goto done;
failed:
    Py_CLEAR(result);
    fail();
done:
    release_parts(views, got);
    Py_XDECREF(seqobj);
    PyBuffer_Release(&len4);
    return result;
}

static PyMethodDef ChachaPoly_methods[] = {
    {"decrypt_length", (PyCFunction)ChachaPoly_decrypt_length, METH_VARARGS,
     "decrypt_length(encrypted_length, seq) -> the packet length's 4 plain bytes"},
    {"open", (PyCFunction)ChachaPoly_open, METH_VARARGS,
     "open(encrypted_length, parts, seq, tag) -> decrypted parts joined, or None if the tag is wrong"},
    {"seal", (PyCFunction)ChachaPoly_seal, METH_VARARGS,
     "seal(length, parts, seq) -> encrypted length + encrypted parts + tag"},
    {NULL, NULL, 0, NULL}};

static PyTypeObject ChachaPolyType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sshfiles._chachapoly.ChachaPoly",
    .tp_doc = "chacha20-poly1305@openssh.com with both keys set up once (ChachaPoly(key64))",
    .tp_basicsize = sizeof(ChachaPoly),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)ChachaPoly_init,
    .tp_dealloc = (destructor)ChachaPoly_dealloc,
    .tp_methods = ChachaPoly_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sshfiles._chachapoly",
    "chacha20-poly1305@openssh.com packets in one OpenSSL call each (asyncssh_seam item 3k).", -1,
    NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__chachapoly(void) {
    if (load_libcrypto())
        return NULL;
    if (PyType_Ready(&ChachaPolyType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    if (PyModule_AddObjectRef(m, "ChachaPoly", (PyObject *)&ChachaPolyType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
