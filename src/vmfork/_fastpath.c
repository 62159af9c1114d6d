/* vmfork._fastpath: the hot paths' ioctl sequences in one call from Python.
 *
 * A fork's reset and a new fork issue a fixed list of KVM ioctls (state sets on the vCPU and VM fds). From Python
 * each costs the ioctl plus about 1-2 us of ctypes call and loop overhead; here the list runs in one C loop with
 * the GIL released. vmfork.kvm.api.PackedPlan builds the list and falls back to its Python loop when this module
 * is not built (the results are the same: tests/test_fastpath.py). `iterate` is a fuzzing iteration's reset, input and
 * KVM_RUN in one call (vmfork.fork.VM.reset_and_run; the same test compares it with reset(), write, run()). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

struct step {           /* laid out as vmfork.kvm.api.Step */
    int64_t fd;
    uint64_t request;
    uint64_t arg;
};

/* run_steps(address, count) -> None, or (index, errno) of the first step that failed (the rest did not run). */
static PyObject *run_steps(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "run_steps(address, count)");
        return NULL;
    }
    uintptr_t addr = (uintptr_t)PyLong_AsUnsignedLongLong(args[0]);
    if (PyErr_Occurred())
        return NULL;
    Py_ssize_t count = PyLong_AsSsize_t(args[1]);
    if (PyErr_Occurred())
        return NULL;
    const struct step *steps = (const struct step *)addr;
    Py_ssize_t failed = -1;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < count; i++) {
        int ret;
        do {
            ret = ioctl((int)steps[i].fd, (unsigned long)steps[i].request, (void *)(uintptr_t)steps[i].arg);
        } while (ret < 0 && errno == EINTR);
        if (ret < 0) {
            failed = i;
            err = errno;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    if (failed < 0)
        Py_RETURN_NONE;
    return Py_BuildValue("(ni)", failed, err);
}

struct copy {          /* laid out as vmfork.kvm.api.Copy: memmove(dst, src, size) */
    uint64_t dst;
    uint64_t src;
    uint64_t size;
};

struct piece {         /* laid out as vmfork.kvm.api.Piece: `size` bytes of the input go to host address `dst` */
    uint64_t dst;
    uint64_t size;
};

/* iterate(copies, ncopies, data, pieces, npieces, steps, nsteps, vcpu_fd) -> int, or (index, errno)
 *
 * One fuzzing iteration's way into the guest, with the GIL released once: the copies (a reset's page copy-back and
 * the vCPUs' sync-area images), `data` scattered over the pieces (the input buffer), the ioctl steps (the reset's
 * state sets), then KVM_RUN on vcpu_fd (none when it is -1). Returns KVM_RUN's result (0, or -errno: -EINTR when
 * interrupted; 0 without KVM_RUN), or
 * (index, errno) of the step that failed (nothing after it ran). The caller handles the exit as after any KVM_RUN. */
static PyObject *iterate(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "iterate(copies, ncopies, data, pieces, npieces, steps, nsteps, vcpu_fd)");
        return NULL;
    }
    const struct copy *copies = (const struct copy *)(uintptr_t)PyLong_AsUnsignedLongLong(args[0]);
    Py_ssize_t ncopies = PyLong_AsSsize_t(args[1]);
    if (PyErr_Occurred())
        return NULL;
    Py_buffer data;
    if (PyObject_GetBuffer(args[2], &data, PyBUF_SIMPLE) < 0)
        return NULL;
    const struct piece *pieces = (const struct piece *)(uintptr_t)PyLong_AsUnsignedLongLong(args[3]);
    Py_ssize_t npieces = PyLong_AsSsize_t(args[4]);
    const struct step *steps = (const struct step *)(uintptr_t)PyLong_AsUnsignedLongLong(args[5]);
    Py_ssize_t nsteps = PyLong_AsSsize_t(args[6]);
    long vcpu_fd = PyLong_AsLong(args[7]);
    if (PyErr_Occurred()) {
        PyBuffer_Release(&data);
        return NULL;
    }
    Py_ssize_t failed = -1;
    int err = 0, ret = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < ncopies; i++)
        memmove((void *)(uintptr_t)copies[i].dst, (const void *)(uintptr_t)copies[i].src, copies[i].size);
    const char *src = (const char *)data.buf;
    Py_ssize_t left = data.len;
    for (Py_ssize_t i = 0; i < npieces && left > 0; i++) {
        size_t n = (size_t)left < pieces[i].size ? (size_t)left : pieces[i].size;
        memcpy((void *)(uintptr_t)pieces[i].dst, src, n);
        src += n;
        left -= (Py_ssize_t)n;
    }
    for (Py_ssize_t i = 0; i < nsteps; i++) {
        int r;
        do {
            r = ioctl((int)steps[i].fd, (unsigned long)steps[i].request, (void *)(uintptr_t)steps[i].arg);
        } while (r < 0 && errno == EINTR);
        if (r < 0) {
            failed = i;
            err = errno;
            break;
        }
    }
    if (failed < 0 && vcpu_fd >= 0) {       /* vcpu_fd -1: a reset alone */
        ret = ioctl((int)vcpu_fd, KVM_RUN, 0);
        if (ret < 0)
            ret = -errno;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (failed >= 0)
        return Py_BuildValue("(ni)", failed, err);
    return PyLong_FromLong(ret);
}

static PyMethodDef methods[] = {
    {"run_steps", (PyCFunction)(void (*)(void))run_steps, METH_FASTCALL,
     "run_steps(address, count): issue `count` (fd, request, arg) ioctls from a packed array; None, or (index, "
     "errno) of the first that failed."},
    {"iterate", (PyCFunction)(void (*)(void))iterate, METH_FASTCALL,
     "iterate(copies, ncopies, data, pieces, npieces, steps, nsteps, vcpu_fd): memmoves, the input scattered over "
     "its pieces, ioctl steps, then KVM_RUN; its result (0 or -errno), or (index, errno) of a failed step."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "vmfork._fastpath", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastpath(void)
{
    return PyModule_Create(&module);
}
