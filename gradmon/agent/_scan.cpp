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

#include <cstdint>
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

/* What open_group returns: positions, grads, weights (lists), then the group's Reads table
 * (an int64 [READ_ROWS, capacity] array, see gather.Reads) and its `unreadable` list, or
 * two Nones where no pointers are wanted. */
enum { G_POSITIONS, G_GRADS, G_WEIGHTS, G_TABLE, G_UNREADABLE, G_COUNT };
enum { R_PTR, R_NUMEL, R_WPTR, R_WNUMEL, R_WCODE, READ_ROWS };

/* The CPU kernel's dtype codes (stats/cpu.py SUPPORTED_DTYPES); -1: not one it reads. */
int64_t kernel_code(c10::ScalarType t) {
    switch (t) {
        case c10::ScalarType::Float: return 0;
        case c10::ScalarType::Half: return 1;
        case c10::ScalarType::BFloat16: return 2;
        case c10::ScalarType::Double: return 3;
        default: return -1;
    }
}

struct Group {
    c10::Device device;
    c10::ScalarType dtype;
    PyObject *lists; /* owned */
    Py_buffer table; /* held while `has_table` */
    bool has_table;
};

/* The groups met in one pass, remembered by their C++ device and dtype: open_group (a
 * Python call) is asked once per group and pass. */
class Groups {
  public:
    explicit Groups(PyObject *open_group) : open_group_(open_group) {}
    ~Groups() {
        for (Group &g : recent_) drop(g);
    }
    Groups(const Groups &) = delete;
    Groups &operator=(const Groups &) = delete;

    /* The group of g (borrowed from this object), or NULL with an error set. */
    Group *group_of(const at::Tensor &g) {
        c10::Device device = g.device();
        c10::ScalarType dtype = g.scalar_type();
        for (Group &r : recent_)
            if (r.device == device && r.dtype == dtype) return &r;
        PyObject *device_obj = THPDevice_New(device);
        if (!device_obj) return nullptr;
        PyObject *dtype_obj = reinterpret_cast<PyObject *>(torch::getTHPDtype(dtype));
        PyObject *lists = PyObject_CallFunctionObjArgs(open_group_, device_obj, dtype_obj, nullptr);
        Py_DECREF(device_obj);
        if (!lists) return nullptr;
        Group group{device, dtype, lists, {}, false};
        if (!open(group)) {
            drop(group);
            return nullptr;
        }
        if (recent_.size() == kRecent) { /* many groups: forget the oldest */
            drop(recent_.front());
            recent_.erase(recent_.begin());
        }
        recent_.push_back(group);
        return &recent_.back();
    }

  private:
    /* Checks what open_group returned and takes hold of the table's buffer. */
    static bool open(Group &group) {
        PyObject *lists = group.lists;
        bool ok = PyTuple_Check(lists) && PyTuple_GET_SIZE(lists) == G_COUNT;
        for (int k = 0; ok && k < G_TABLE; k++) ok = PyList_Check(PyTuple_GET_ITEM(lists, k));
        PyObject *table = ok ? PyTuple_GET_ITEM(lists, G_TABLE) : nullptr;
        PyObject *unreadable = ok ? PyTuple_GET_ITEM(lists, G_UNREADABLE) : nullptr;
        ok = ok && (table == Py_None ? unreadable == Py_None : PyList_Check(unreadable));
        if (!ok) {
            PyErr_SetString(PyExc_TypeError, "open_group must return (positions, grads, "
                                             "weights, table, unreadable): 3 lists, then an "
                                             "int64 array and a list, or two Nones");
            return false;
        }
        if (table == Py_None) return true;
        if (PyObject_GetBuffer(table, &group.table, PyBUF_RECORDS) < 0) return false;
        group.has_table = true;
        const Py_buffer &v = group.table;
        if (v.ndim != 2 || v.shape[0] != READ_ROWS || v.itemsize != 8 ||
            !PyBuffer_IsContiguous(&v, 'C') || v.readonly) {
            PyErr_Format(PyExc_TypeError, "open_group: the table must be a writable, "
                                          "C-contiguous int64 array of %d rows", READ_ROWS);
            return false;
        }
        return true;
    }

    static void drop(Group &group) {
        if (group.has_table) PyBuffer_Release(&group.table);
        group.has_table = false;
        Py_CLEAR(group.lists);
    }

    static constexpr size_t kRecent = 8;
    PyObject *open_group_;
    std::vector<Group> recent_;
};

/* The reads the CPU kernel needs of a fresh grad g and its weight w, written to column
 * `col` of the group's table: g's data pointer (0, and its position in `unreadable`, when
 * the kernel cannot read it in place: not contiguous, or a lazily negated view) and
 * element count; w's data pointer, element count and dtype code (cpu.KnownWeights checks
 * them). */
int write_reads(Group &group, Py_ssize_t col, Py_ssize_t i, const at::Tensor &g,
                const at::Tensor &w) {
    Py_ssize_t capacity = group.table.shape[1];
    if (col >= capacity) {
        PyErr_Format(PyExc_ValueError, "the group's table holds %zd columns", capacity);
        return -1;
    }
    bool readable = g.is_contiguous() && !g.is_neg();
    auto *row = static_cast<int64_t *>(group.table.buf);
    row[R_PTR * capacity + col] = readable ? reinterpret_cast<intptr_t>(g.const_data_ptr()) : 0;
    row[R_NUMEL * capacity + col] = g.numel();
    row[R_WPTR * capacity + col] = reinterpret_cast<intptr_t>(w.const_data_ptr());
    row[R_WNUMEL * capacity + col] = w.numel();
    row[R_WCODE * capacity + col] = kernel_code(w.scalar_type());
    if (!readable &&
        append_steal(PyTuple_GET_ITEM(group.lists, G_UNREADABLE), PyLong_FromSsize_t(i)) < 0)
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

/* The objects of the parameters a few places ahead, asked for before their turn. Each
 * parameter is a chain of separately allocated objects (its weak reference, Python
 * object, TensorImpl, autograd metadata, grad), cold in cache after a backward over a
 * large model: each stage here reads only what an earlier one brought in, so the misses
 * of several parameters overlap instead of following one another. */
inline void prefetch_ahead(PyObject *refs, Py_ssize_t i, Py_ssize_t n) {
    if (i + 12 < n) __builtin_prefetch(PyList_GET_ITEM(refs, i + 12));
    if (i + 8 < n) {
        PyObject *ref = PyList_GET_ITEM(refs, i + 8);
        if (PyWeakref_CheckRef(ref))
            __builtin_prefetch(reinterpret_cast<PyWeakReference *>(ref)->wr_object);
    }
    auto param = [&](Py_ssize_t k) -> c10::TensorImpl * {
        PyObject *ref = PyList_GET_ITEM(refs, k);
        if (!PyWeakref_CheckRef(ref)) return nullptr;
        PyObject *p = reinterpret_cast<PyWeakReference *>(ref)->wr_object;
        return p != Py_None && THPVariable_Check(p) ? THPVariable_Unpack(p).unsafeGetTensorImpl()
                                                    : nullptr;
    };
    if (i + 4 < n) {
        if (c10::TensorImpl *impl = param(i + 4)) {
            __builtin_prefetch(impl);
            __builtin_prefetch(reinterpret_cast<const char *>(impl) + 64);
        }
    }
    if (i + 2 < n) {
        if (c10::TensorImpl *impl = param(i + 2)) {
            if (c10::AutogradMetaInterface *meta = impl->autograd_meta()) __builtin_prefetch(meta);
        }
    }
    if (i + 1 < n) {
        if (c10::TensorImpl *impl = param(i + 1)) {
            c10::AutogradMetaInterface *meta = impl->autograd_meta();
            if (meta && meta->grad().defined()) __builtin_prefetch(meta->grad().unsafeGetTensorImpl());
        }
    }
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
    PyObject *ref = untracked_ref(grad), *version_obj = nullptr, *positions = nullptr;
    Group *group = nullptr;
    Py_ssize_t col = 0;
    if (!ref || PyList_SetItem(last, i, ref) < 0) goto done; /* steals ref */
    version_obj = PyLong_FromUnsignedLong(version);
    if (!version_obj || PyList_SetItem(versions, i, version_obj) < 0) goto done; /* steals */
    /* A dense grad of a plain parameter has the parameter's dtype (torch checks it). */
    if (PyList_GET_ITEM(plain, i) != Py_True || g.layout() != c10::kStrided) {
        outcome = kSpecial;
        goto done;
    }
    group = groups.group_of(g);
    if (!group) goto done;
    Py_INCREF(Py_True);
    if (PyList_SetItem(fresh, i, Py_True) < 0) goto done; /* steals */
    positions = PyTuple_GET_ITEM(group->lists, G_POSITIONS);
    col = PyList_GET_SIZE(positions);
    if (append_steal(positions, PyLong_FromSsize_t(i)) < 0 ||
        PyList_Append(PyTuple_GET_ITEM(group->lists, G_GRADS), grad) < 0 ||
        PyList_Append(PyTuple_GET_ITEM(group->lists, G_WEIGHTS), p) < 0)
        goto done;
    if (group->has_table && write_reads(*group, col, i, g, w) < 0) goto done;
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
        prefetch_ahead(refs, i, n);
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
     "`open_group(device, dtype)` returns (positions, grads, weights, table, unreadable):\n"
     "3 lists, then an int64 [5, capacity] array whose column k gets the k-th grad's data\n"
     "pointer (0 if not contiguous or negated: its position goes to the `unreadable` list)\n"
     "and element count, its weight's data pointer, element count and CPU-kernel dtype code\n"
     "(-1: none), or two Nones where no pointers are wanted. Other fresh parameters are\n"
     "appended to `specials`."},
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
