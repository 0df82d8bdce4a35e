/*
 * gradmon.agent._scan: the per-parameter pass of a collection (gather.py), in C++ against
 * torch's headers, so that a tensor's grad, version, layout, device, dtype, contiguity,
 * data pointer and size are read from the C++ tensor in nanoseconds. The same pass in
 * Python reads ~15 attributes per parameter through torch's bindings (~50-150 ns each,
 * most of a collection's host cost: bench/host_cost.py). It is built only against the
 * torch it will run with (setup.py; gather.py checks `torch_version`), as every torch
 * extension must be.
 *
 * scan() handles the common case (a plain parameter with a dense grad); anything else is
 * handed back to Python by position (`specials`), which keeps one source of truth for the
 * rare paths (DTensor, complex, sparse, meta). The grads it appends are the Python objects
 * `p.grad` returns (created here if none exists yet; the optimizer would create them next).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <torch/csrc/Device.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/autograd/python_variable.h>

#include <exception>
#include <vector>

#ifndef GRADMON_TORCH_VERSION
#error "setup.py defines GRADMON_TORCH_VERSION: the torch version this is built against"
#endif

namespace {

/* A new reference to the object a weak reference points to, or NULL (dead, or not a
 * weak reference). Never sets an error. */
PyObject *deref(PyObject *ref) {
    if (!PyWeakref_CheckRef(ref)) return nullptr;
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *obj = nullptr;
    if (PyWeakref_GetRef(ref, &obj) < 0) PyErr_Clear();
    return obj;
#else
    PyObject *obj = PyWeakref_GetObject(ref);
    if (obj == Py_None) return nullptr;
    Py_INCREF(obj);
    return obj;
#endif
}

/* A weak reference to obj without callback, untracked by the cyclic GC: the agent keeps
 * one per gradient from one collection to the next, and N tracked ones living across a
 * step set off full collections of the whole heap (~1 us a tensor per step, measured).
 * A weak reference without a callback takes part in no cycle (its dealloc untracks
 * again: a no-op). */
PyObject *untracked_ref(PyObject *obj) {
    PyObject *ref = PyWeakref_NewRef(obj, nullptr);
    if (ref && reinterpret_cast<PyWeakReference *>(ref)->wr_callback == nullptr &&
        PyObject_GC_IsTracked(ref))
        PyObject_GC_UnTrack(ref);
    return ref;
}

/* Appends item and drops the caller's reference to it (NULL: an error is already set). */
int append_steal(PyObject *list, PyObject *item) {
    if (!item) return -1;
    int rc = PyList_Append(list, item);
    Py_DECREF(item);
    return rc;
}

/* The lists of one group, as open_group returns them (see scan's docstring). */
enum { G_POSITIONS, G_GRADS, G_WEIGHTS, G_PTRS, G_NUMELS, G_WPTRS, G_WDTYPES, G_WNUMELS,
       G_UNREADABLE, G_COUNT };

struct Recent {
    c10::Device device;
    c10::ScalarType dtype;
    PyObject *lists; /* owned */
};

/* The groups met in one pass, remembered by their C++ device and dtype: open_group (a
 * Python call) is asked once per group and pass. */
class Groups {
  public:
    explicit Groups(PyObject *open_group) : open_group_(open_group) {}
    ~Groups() {
        for (Recent &r : recent_) Py_DECREF(r.lists);
    }
    Groups(const Groups &) = delete;
    Groups &operator=(const Groups &) = delete;

    /* A borrowed tuple of lists, or NULL with an error set. */
    PyObject *lists_for(const at::Tensor &g) {
        c10::Device device = g.device();
        c10::ScalarType dtype = g.scalar_type();
        for (const Recent &r : recent_)
            if (r.device == device && r.dtype == dtype) return r.lists;
        PyObject *device_obj = THPDevice_New(device);
        if (!device_obj) return nullptr;
        PyObject *dtype_obj = reinterpret_cast<PyObject *>(torch::getTHPDtype(dtype));
        PyObject *lists = PyObject_CallFunctionObjArgs(open_group_, device_obj, dtype_obj, nullptr);
        Py_DECREF(device_obj);
        if (!lists) return nullptr;
        if (!valid(lists)) {
            Py_DECREF(lists);
            PyErr_SetString(PyExc_TypeError, "open_group must return a tuple of 9: 3 lists, then "
                                             "6 lists or 6 Nones");
            return nullptr;
        }
        if (recent_.size() == kRecent) { /* many groups: forget the oldest */
            Py_DECREF(recent_.front().lists);
            recent_.erase(recent_.begin());
        }
        recent_.push_back(Recent{device, dtype, lists});
        return lists;
    }

  private:
    static bool valid(PyObject *lists) {
        if (!PyTuple_Check(lists) || PyTuple_GET_SIZE(lists) != G_COUNT) return false;
        bool reads = PyTuple_GET_ITEM(lists, G_PTRS) != Py_None;
        for (int k = 0; k < G_COUNT; k++) {
            PyObject *item = PyTuple_GET_ITEM(lists, k);
            if (k < G_PTRS || reads ? !PyList_Check(item) : item != Py_None) return false;
        }
        return true;
    }

    static constexpr size_t kRecent = 8;
    PyObject *open_group_;
    std::vector<Recent> recent_;
};

/* The reads the CPU kernel needs of a fresh grad g and its weight w, appended to the
 * group's lists: g's data pointer (0, and its position in `unreadable`, when the kernel
 * cannot read it in place: not contiguous, or a lazily negated view) and element count;
 * w's data pointer, dtype and element count (cpu.KnownWeights checks them). */
int append_reads(PyObject *lists, Py_ssize_t i, const at::Tensor &g, const at::Tensor &w) {
    bool readable = g.is_contiguous() && !g.is_neg();
    const void *ptr = readable ? g.const_data_ptr() : nullptr;
    if (append_steal(PyTuple_GET_ITEM(lists, G_PTRS), PyLong_FromVoidPtr(const_cast<void *>(ptr))) < 0)
        return -1;
    if (!readable &&
        append_steal(PyTuple_GET_ITEM(lists, G_UNREADABLE), PyLong_FromSsize_t(i)) < 0)
        return -1;
    PyObject *wdtype = reinterpret_cast<PyObject *>(torch::getTHPDtype(w.scalar_type()));
    if (append_steal(PyTuple_GET_ITEM(lists, G_NUMELS), PyLong_FromLongLong(g.numel())) < 0 ||
        append_steal(PyTuple_GET_ITEM(lists, G_WPTRS),
                     PyLong_FromVoidPtr(const_cast<void *>(w.const_data_ptr()))) < 0 ||
        PyList_Append(PyTuple_GET_ITEM(lists, G_WDTYPES), wdtype) < 0 ||
        append_steal(PyTuple_GET_ITEM(lists, G_WNUMELS), PyLong_FromLongLong(w.numel())) < 0)
        return -1;
    return 0;
}

/* Whether last_ref (a weak reference, or None) refers to the Python object of grad. */
bool same_grad(PyObject *last_ref, const at::Tensor &grad) {
    PyObject *seen = deref(last_ref);
    bool same = seen && THPVariable_Check(seen) &&
                THPVariable_Unpack(seen).unsafeGetTensorImpl() == grad.unsafeGetTensorImpl();
    Py_XDECREF(seen);
    return same;
}

enum Outcome { kDone, kSpecial, kError };

/* One parameter: kDone (recorded, or not fresh), kSpecial (hand it to Python), kError. */
Outcome scan_one(Py_ssize_t i, PyObject *p, PyObject *last, PyObject *versions, PyObject *plain,
                 PyObject *fresh, Groups &groups) {
    if (!THPVariable_Check(p)) {
        PyErr_Format(PyExc_TypeError, "parameter %zd is a %s, not a tensor", i, Py_TYPE(p)->tp_name);
        return kError;
    }
    const at::Tensor &w = THPVariable_Unpack(p);
    const at::Tensor &g = w.grad();
    if (!g.defined()) {
        Py_INCREF(Py_None);
        return PyList_SetItem(last, i, Py_None) < 0 ? kError : kDone; /* steals */
    }
    unsigned long version = g._version();
    if (same_grad(PyList_GET_ITEM(last, i), g)) {
        unsigned long seen = PyLong_AsUnsignedLong(PyList_GET_ITEM(versions, i));
        if (seen == static_cast<unsigned long>(-1) && PyErr_Occurred()) return kError;
        if (seen == version) return kDone;
    }
    PyObject *grad = THPVariable_Wrap(g); /* the object p.grad returns */
    if (!grad) return kError;
    Outcome outcome = kError;
    PyObject *ref = untracked_ref(grad), *version_obj = nullptr, *lists = nullptr;
    if (!ref || PyList_SetItem(last, i, ref) < 0) goto done; /* steals ref */
    version_obj = PyLong_FromUnsignedLong(version);
    if (!version_obj || PyList_SetItem(versions, i, version_obj) < 0) goto done; /* steals */
    /* A dense grad of a plain parameter has the parameter's dtype (torch checks it). */
    if (PyList_GET_ITEM(plain, i) != Py_True || g.layout() != c10::kStrided) {
        outcome = kSpecial;
        goto done;
    }
    lists = groups.lists_for(g);
    if (!lists) goto done;
    Py_INCREF(Py_True);
    if (PyList_SetItem(fresh, i, Py_True) < 0) goto done; /* steals */
    if (append_steal(PyTuple_GET_ITEM(lists, G_POSITIONS), PyLong_FromSsize_t(i)) < 0 ||
        PyList_Append(PyTuple_GET_ITEM(lists, G_GRADS), grad) < 0 ||
        PyList_Append(PyTuple_GET_ITEM(lists, G_WEIGHTS), p) < 0)
        goto done;
    if (PyTuple_GET_ITEM(lists, G_PTRS) != Py_None && append_reads(lists, i, g, w) < 0) goto done;
    outcome = kDone;
done:
    Py_DECREF(grad);
    return outcome;
}

PyObject *scan(PyObject *, PyObject *args) {
    PyObject *refs, *last, *versions, *plain, *fresh, *open_group, *specials;
    if (!PyArg_ParseTuple(args, "O!O!O!O!O!OO!:scan", &PyList_Type, &refs, &PyList_Type, &last,
                          &PyList_Type, &versions, &PyList_Type, &plain, &PyList_Type, &fresh,
                          &open_group, &PyList_Type, &specials))
        return nullptr;
    Py_ssize_t n = PyList_GET_SIZE(refs);
    if (PyList_GET_SIZE(last) != n || PyList_GET_SIZE(versions) != n ||
        PyList_GET_SIZE(plain) != n || PyList_GET_SIZE(fresh) != n) {
        PyErr_SetString(PyExc_ValueError, "refs, last, versions, plain and fresh must have "
                                          "equal lengths");
        return nullptr;
    }
    Groups groups(open_group);
    Py_ssize_t gone = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *p = deref(PyList_GET_ITEM(refs, i));
        if (!p) {
            gone++;
            continue;
        }
        Outcome outcome;
        try {
            outcome = scan_one(i, p, last, versions, plain, fresh, groups);
        } catch (const std::exception &e) { /* c10::Error: a tensor without storage... */
            if (!PyErr_Occurred()) PyErr_Format(PyExc_RuntimeError, "parameter %zd: %s", i, e.what());
            outcome = kError;
        }
        Py_DECREF(p);
        if (outcome == kSpecial) outcome = append_steal(specials, PyLong_FromSsize_t(i)) < 0 ? kError : kDone;
        if (outcome == kError) return nullptr;
    }
    return PyLong_FromSsize_t(gone);
}

PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS,
     "scan(refs, last, versions, plain, fresh, open_group, specials) -> gone\n\n"
     "One pass over the parameters (weak references in `refs`; dead ones are counted and\n"
     "returned). A parameter is fresh when its grad is not the one `last[i]` weakly refers\n"
     "to or its `_version` is not `versions[i]`; then `last[i]` becomes an untracked weak\n"
     "reference to the grad and `versions[i]` its version. A fresh strided grad of a plain\n"
     "parameter (`plain[i]`) sets `fresh[i] = True` and is appended to its group:\n"
     "`open_group(device, dtype)` returns a tuple of lists (positions, grads, weights, then\n"
     "ptrs, numels, wptrs, wdtypes, wnumels, unreadable, or 6 Nones where no pointers are\n"
     "wanted). Other fresh parameters are appended to `specials`."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_scan", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__scan(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddStringConstant(m, "torch_version", GRADMON_TORCH_VERSION) < 0) {
        Py_DECREF(m);
        return nullptr;
    }
    return m;
}
