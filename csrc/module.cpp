// deit_fast._C: the op schemas, and the Python module whose import loads them.
//
// `import deit_fast._C` loads this shared library; its static TORCH_LIBRARY / TORCH_LIBRARY_IMPL
// registrars then put the ops under torch.ops.deit_fast_C. The module itself is empty: every op
// is called through torch.ops, which keeps the build free of pybind11 and torch/extension.h.
//
// Adding an op = one csrc/<op>.cu holding its schemas (TORCH_LIBRARY_FRAGMENT), kernels and
// CUDA / Meta implementations; setup.py compiles every csrc/*.cu.
#include <Python.h>

#include <torch/library.h>

// The namespace's owner: no schema here. Each csrc/<op>.cu defines its own ops' schemas in a
// TORCH_LIBRARY_FRAGMENT beside their CUDA and Meta implementations.
TORCH_LIBRARY(deit_fast_C, m) {}

static PyModuleDef deit_fast_C_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "CUDA kernels of deit_fast, registered as torch.ops.deit_fast_C (see csrc/).", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&deit_fast_C_module); }
