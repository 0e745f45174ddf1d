// deit_fast._C: the op schemas, and the Python module whose import loads them.
//
// `import deit_fast._C` loads this shared library; its static TORCH_LIBRARY / TORCH_LIBRARY_IMPL
// registrars then put the ops under torch.ops.deit_fast_C. The module itself is empty: every op
// is called through torch.ops, which keeps the build free of pybind11 and torch/extension.h.
//
// One schema block per op below (a namespace has exactly one TORCH_LIBRARY); the kernels and their
// CUDA / Meta implementations live in csrc/<op>.cu. Adding an op = one .cu + one block here.
#include <Python.h>

#include <torch/library.h>

TORCH_LIBRARY(deit_fast_C, m) {
  // layerscale.cu. out = x + gamma * y * scale[b] in fp32; out contiguous with x's shape.
  // x, y: (rows, C) or (B, ..., C), fp32/fp16/bf16, any row strides; gamma: (C,) fp32 or y's
  // dtype; scale: (B,) fp32 per-sample DropPath factors. dgamma is deterministic (no atomics),
  // in gamma's dtype, and an empty tensor when gamma is None; dy is contiguous, y's dtype.
  m.def("layerscale_residual_forward(Tensor x, Tensor y, Tensor? gamma, Tensor? scale, "
        "ScalarType out_dtype) -> Tensor");
  m.def("layerscale_residual_backward(Tensor dout, Tensor y, Tensor? gamma, Tensor? scale) "
        "-> (Tensor, Tensor)");
}

static PyModuleDef deit_fast_C_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "CUDA kernels of deit_fast, registered as torch.ops.deit_fast_C (see csrc/).", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&deit_fast_C_module); }
