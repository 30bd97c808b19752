// Registration of the etkd_cpu ops (torch.ops.etkd_cpu.*) and the Python module init of etkd_kernels._C.
// The public ops (torch.ops.etkd.*) are defined once in Python (etkd_kernels/ops); these are the CPU
// kernels the `cpu` backend modules call.
#include <Python.h>
#include <torch/library.h>

#include <exception>
#include <string>
#include <utility>
#include <vector>

#include "cpu/isa.h"
#include "cpu/ops.h"

TORCH_LIBRARY(etkd_cpu, m) {
  m.def(
      "sliding_window_fwd(Tensor q, Tensor k, Tensor v, int window, Tensor? global_mask, Tensor? global_index, "
      "Tensor? global_count, Tensor? qg, Tensor? kg, Tensor? vg, Tensor? key_padding_mask, float scale, "
      "float dropout_p, int seed, int offset) -> (Tensor, Tensor)");
  m.def(
      "sliding_window_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, int window, "
      "Tensor? global_mask, Tensor? global_index, Tensor? global_count, Tensor? qg, Tensor? kg, Tensor? vg, "
      "Tensor? key_padding_mask, float scale, float dropout_p, int seed, int offset) -> Tensor[]");
  m.def(
      "block_sparse_fwd(Tensor q, Tensor k, Tensor v, Tensor lut, Tensor counts, int block_size, "
      "Tensor? key_padding_mask, float scale, float dropout_p, int seed, int offset) -> (Tensor, Tensor)");
  m.def(
      "block_sparse_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor lut, "
      "Tensor counts, int block_size, Tensor? key_padding_mask, float scale, float dropout_p, int seed, int offset) "
      "-> Tensor[]");
  m.def(
      "nystrom_fwd(Tensor q, Tensor k, Tensor v, int num_landmarks, int pinv_iterations, Tensor? key_padding_mask, "
      "float scale, bool hf_global, float dropout_p, int seed, int offset, int keep=0) -> (Tensor, Tensor)");
  m.def(
      "lsg_fwd(Tensor q, Tensor k, Tensor v, Tensor kx, Tensor vx, Tensor kx_ok, Tensor starts, "
      "Tensor? key_padding_mask, int block_size, int sparse_block_size, int num_global_tokens, float scale, "
      "Tensor? kx_cols, float dropout_p, int seed, int offset, bool all_rows=False) -> (Tensor, Tensor)");
  m.def(
      "lsg_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor kx, Tensor vx, "
      "Tensor kx_ok, Tensor starts, Tensor? key_padding_mask, int block_size, int sparse_block_size, "
      "int num_global_tokens, float scale, Tensor? kx_cols, float dropout_p, int seed, int offset, "
      "bool all_rows=False) -> Tensor[]");
  m.def(
      "lsg_sparse_keys(Tensor k, Tensor v, Tensor? key_padding_mask, int num_global_tokens, int block_size, "
      "int sparsity_factor, int type) -> (Tensor, Tensor, Tensor)");
  m.def(
      "lsg_sparse_keys_bwd(Tensor dkx, Tensor dvx, Tensor(a!) dk, Tensor(b!) dv, Tensor? key_padding_mask, "
      "int num_global_tokens, int block_size, int sparsity_factor, int type) -> ()");
  m.def(
      "nystrom_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor saved, int num_landmarks, "
      "int pinv_iterations, Tensor? key_padding_mask, float scale, bool hf_global, float dropout_p, int seed, "
      "int offset) -> Tensor[]");
  m.def(
      "softmax_matmul_fwd(Tensor a, Tensor b, Tensor c, Tensor? key_mask, float scale, float dropout_p, int seed, "
      "int offset) -> (Tensor, Tensor)");
  m.def(
      "softmax_matmul_bwd(Tensor grad_out, Tensor a, Tensor b, Tensor c, Tensor out, Tensor lse, Tensor? key_mask, "
      "float scale, float dropout_p, int seed, int offset) -> Tensor[]");
  m.def(
      "full_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, float scale, float dropout_p, int seed, "
      "int offset) -> (Tensor, Tensor)");
  m.def(
      "full_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? key_padding_mask, "
      "float scale, float dropout_p, int seed, int offset) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(etkd_cpu, CPU, m) {
  m.impl("sliding_window_fwd", &etkd::cpu::sliding_window_fwd);
  m.impl("sliding_window_bwd", &etkd::cpu::sliding_window_bwd);
  m.impl("block_sparse_fwd", &etkd::cpu::block_sparse_fwd);
  m.impl("block_sparse_bwd", &etkd::cpu::block_sparse_bwd);
  m.impl("lsg_fwd", &etkd::cpu::lsg_fwd);
  m.impl("lsg_bwd", &etkd::cpu::lsg_bwd);
  m.impl("lsg_sparse_keys", &etkd::cpu::lsg_sparse_keys);
  m.impl("lsg_sparse_keys_bwd", &etkd::cpu::lsg_sparse_keys_bwd);
  m.impl("nystrom_fwd", &etkd::cpu::nystrom_fwd);
  m.impl("nystrom_bwd", &etkd::cpu::nystrom_bwd);
  m.impl("softmax_matmul_fwd", &etkd::cpu::softmax_matmul_fwd);
  m.impl("softmax_matmul_bwd", &etkd::cpu::softmax_matmul_bwd);
  m.impl("full_fwd", &etkd::cpu::full_fwd);
  m.impl("full_bwd", &etkd::cpu::full_bwd);
}

namespace {

// Runs an entry point's body; a C++ exception (TORCH_CHECK's c10::Error included) becomes Python's RuntimeError
// with its message, so no entry point lets one cross into the interpreter.
template <class F>
PyObject* guarded(F&& body) {
  try {
    return body();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyObject* str_list(const std::vector<std::string>& v) {
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(v.size()));
  for (size_t i = 0; i < v.size(); ++i) PyList_SET_ITEM(out, i, PyUnicode_FromString(v[i].c_str()));
  return out;
}

// _C.isa() -> str: the target the kernels run (chosen on first use; ETKD_CPU_ISA forces one).
PyObject* py_isa(PyObject*, PyObject*) {
  return guarded([&]() -> PyObject* {
    return PyUnicode_FromString(etkd::cpu::kernels().name);
  });
}

// _C.native_bf16() -> bool: whether bf16 tiles are multiplied as bf16 (else converted to float32 on load).
PyObject* py_native_bf16(PyObject*, PyObject*) {
  return guarded([&]() -> PyObject* {
    return PyBool_FromLong(etkd::cpu::kernels().native_bf16);
  });
}

// _C.cpu_profile() -> dict phase -> seconds summed over threads since the last call (timers on: ETKD_CPU_PROFILE=1;
// else all zero), see flash_tile.h.
PyObject* py_cpu_profile(PyObject*, PyObject*) {
  const auto t = etkd::cpu::profile_take();
  PyObject* out = PyDict_New();
  for (int i = 0; i < etkd::cpu::kPhases; ++i) {
    PyObject* v = PyFloat_FromDouble(t[i]);
    PyDict_SetItemString(out, etkd::cpu::kPhaseNames[i], v);
    Py_DECREF(v);
  }
  PyObject* on = PyBool_FromLong(etkd::cpu::profiling());
  PyDict_SetItemString(out, "enabled", on);
  Py_DECREF(on);
  return out;
}

// _C.nystrom_profile() -> dict phase -> seconds of nystrom_fwd / nystrom_bwd's phases summed over threads since the
// last call (ETKD_CPU_PROFILE=1; else all zero); "fwd.total" / "bwd.total" are the calls' wall time.
PyObject* py_nystrom_profile(PyObject*, PyObject*) {
  PyObject* out = PyDict_New();
  for (const auto& [name, sec] : etkd::cpu::nystrom_profile_take()) {
    PyObject* v = PyFloat_FromDouble(sec);
    PyDict_SetItemString(out, name, v);
    Py_DECREF(v);
  }
  return out;
}

// _C.set_cpu_profile(on): the per-phase timers on or off (the cpu backend sets them from ETKD_CPU_PROFILE).
PyObject* py_set_cpu_profile(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  etkd::cpu::set_profiling(on != 0);
  Py_RETURN_NONE;
}

// _C.bf16_brgemm() -> bool: whether bf16 forward tiles go through oneDNN's brgemm (AMX) with packed K/V (else the
// own vdpbf16ps kernels or MKL's bf16 GEMM on the native target, or conversion to fp32; see bf16_products).
PyObject* py_bf16_brgemm(PyObject*, PyObject*) {
  return guarded([&]() -> PyObject* {
    return PyBool_FromLong(etkd::cpu::kernels().native_bf16 && etkd::cpu::own_tile_gemm() &&
                           etkd::cpu::brgemm_bf16_available());
  });
}

// _C.bf16_products() -> {"forward": str, "backward": str}: what multiplies the bf16 tiles of a head_dim that is a
// multiple of 16 (flash_tile_impl.h: bf16_path): "amx" (oneDNN brgemm on AMX tiles, K/V packed per task),
// "vdpbf16ps" (the own AVX512-BF16 micro-kernels, K/V packed per task: no AMX, or ETKD_CPU_AMX=0), "mkl" (MKL's
// bf16 GEMM per tile: ETKD_CPU_GEMM=blas), or "fp32" (converted on load: the target has no native bf16).
PyObject* py_bf16_products(PyObject*, PyObject*) {
  return guarded([&]() -> PyObject* {
    const auto& k = etkd::cpu::kernels();
    const char* fwd = "fp32";
    const char* bwd = "fp32";
    if (k.native_bf16 && !etkd::cpu::own_tile_gemm()) {
      fwd = bwd = "mkl";
    } else if (k.native_bf16) {
      const bool amx = etkd::cpu::brgemm_bf16_available();
      fwd = amx ? "amx" : "vdpbf16ps";
      bwd = fwd;
    }
    PyObject* out = PyDict_New();
    for (auto [key, val] : {std::pair<const char*, const char*>{"forward", fwd}, {"backward", bwd}}) {
      PyObject* v = PyUnicode_FromString(val);
      PyDict_SetItemString(out, key, v);
      Py_DECREF(v);
    }
    return out;
  });
}

// _C.bf16_calls() -> {"forward": {kind: calls}, "backward": {...}}: how the bf16 tile driver calls since the last
// call multiplied their tiles ("amx", "vdpbf16ps", "mkl", "fp32"), then reset (flash_tile.h: count_bf16_call).
PyObject* py_bf16_calls(PyObject*, PyObject*) {
  const auto c = etkd::cpu::bf16_calls_take();
  PyObject* out = PyDict_New();
  for (int dir = 0; dir < 2; ++dir) {
    PyObject* d = PyDict_New();
    for (int i = 0; i < etkd::cpu::kProdKinds; ++i) {
      PyObject* v = PyLong_FromLongLong(c[dir * etkd::cpu::kProdKinds + i]);
      PyDict_SetItemString(d, etkd::cpu::kProdNames[i], v);
      Py_DECREF(v);
    }
    PyDict_SetItemString(out, dir ? "backward" : "forward", d);
    Py_DECREF(d);
  }
  return out;
}

// _C.product_rates() -> {"fp32": GMAC/s, "vdpbf16ps": GMAC/s}: the chosen target's own tile products on one
// thread, the forward's shapes (flash_tile_impl.h: product_rate; vdpbf16ps 0 where the target has none).
PyObject* py_product_rates(PyObject*, PyObject*) {
  return guarded([&]() -> PyObject* {
    const auto& k = etkd::cpu::kernels();
    PyObject* out = PyDict_New();
    const char* names[2] = {"fp32", "vdpbf16ps"};
    for (int i = 0; i < 2; ++i) {
      PyObject* v = PyFloat_FromDouble(k.product_rate(i));
      PyDict_SetItemString(out, names[i], v);
      Py_DECREF(v);
    }
    return out;
  });
}

// _C.tile_gemm() -> "own" | "blas": what multiplies the fp32 tiles (forward and backward) (flash_tile.h: own_tile_gemm).
PyObject* py_tile_gemm(PyObject*, PyObject*) {
  return guarded([&]() -> PyObject* {
    const bool own = etkd::cpu::kernels().own_products && etkd::cpu::own_tile_gemm();
    return PyUnicode_FromString(own ? "own" : "blas");
  });
}

// _C.own_tile_width() -> int: the head_dim multiple the own tile products need (floats per vector of the chosen
// target), 0 when they do not run (portable target, ETKD_CPU_GEMM=blas).
PyObject* py_own_tile_width(PyObject*, PyObject*) {
  return guarded([&]() -> PyObject* {
    const auto& k = etkd::cpu::kernels();
    return PyLong_FromLong(k.own_products && etkd::cpu::own_tile_gemm() ? k.vec_floats : 0);
  });
}

PyObject* py_built_isas(PyObject*, PyObject*) { return str_list(etkd::cpu::built_isas()); }
PyObject* py_supported_isas(PyObject*, PyObject*) { return str_list(etkd::cpu::supported_isas()); }

PyMethodDef methods[] = {
    {"isa", py_isa, METH_NOARGS, "ISA target the kernels run (ETKD_CPU_ISA forces one)"},
    {"native_bf16", py_native_bf16, METH_NOARGS, "whether bf16 tiles are computed natively"},
    {"bf16_brgemm", py_bf16_brgemm, METH_NOARGS, "whether bf16 forward tiles use oneDNN brgemm (AMX)"},
    {"bf16_products", py_bf16_products, METH_NOARGS, "what multiplies bf16 tiles, forward and backward"},
    {"bf16_calls", py_bf16_calls, METH_NOARGS, "bf16 tile-driver calls per product kind since the last call"},
    {"product_rates", py_product_rates, METH_NOARGS, "GMAC/s of the own fp32 and vdpbf16ps tile products, 1 thread"},
    {"tile_gemm", py_tile_gemm, METH_NOARGS, "what multiplies fp32 tiles: own micro-kernels or blas"},
    {"own_tile_width", py_own_tile_width, METH_NOARGS, "head_dim multiple the own tile products need (0: off)"},
    {"cpu_profile", py_cpu_profile, METH_NOARGS, "per-phase kernel time (ETKD_CPU_PROFILE=1), then reset"},
    {"nystrom_profile", py_nystrom_profile, METH_NOARGS, "nystrom_fwd/bwd per-phase time (ETKD_CPU_PROFILE=1), then reset"},
    {"set_cpu_profile", py_set_cpu_profile, METH_O, "per-phase timers on or off (set from ETKD_CPU_PROFILE)"},
    {"built_isas", py_built_isas, METH_NOARGS, "ISA targets compiled into this build"},
    {"supported_isas", py_supported_isas, METH_NOARGS, "built ISA targets this CPU can run"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// A plain module: importing it runs the registrations above (no pybind11 needed).
static PyModuleDef etkd_cpu_module = {PyModuleDef_HEAD_INIT, "_C", "etkd CPU kernels (ops in torch.ops.etkd_cpu)",
                                      -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&etkd_cpu_module); }
