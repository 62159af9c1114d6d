/* vmfork._fastpath: the hot paths' ioctl sequences in one call from Python.
 *
 * A fork's reset and a new fork issue a fixed list of KVM ioctls (state sets on the vCPU and VM fds). From Python
 * each costs the ioctl plus about 1-2 us of ctypes call and loop overhead; here the list runs in one C loop with
 * the GIL released. vmfork.kvm.api.PackedPlan builds the list and falls back to its Python loop when this module
 * is not built (the results are the same: tests/test_fastpath.py). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <sys/ioctl.h>

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

static PyMethodDef methods[] = {
    {"run_steps", (PyCFunction)(void (*)(void))run_steps, METH_FASTCALL,
     "run_steps(address, count): issue `count` (fd, request, arg) ioctls from a packed array; None, or (index, "
     "errno) of the first that failed."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "vmfork._fastpath", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastpath(void)
{
    return PyModule_Create(&module);
}
