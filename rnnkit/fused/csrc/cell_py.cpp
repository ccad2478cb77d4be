// rnnkit's fused CPU kernels: the direct CPython entries `cell_step` and `layer_run` (the extension
// module's only Python-facing part; its kernels are cell.cpp's direct_step and layer_infer).
//
// Light on purpose: torch's Python headers (torch/csrc/autograd/python_variable.h pulls in pybind11
// and torch/csrc/Exceptions.h; ATen/record_function.h) cost ~25 s of CPU to parse, three times all the
// rest of this file, for five names. They are declared here instead, exactly as torch declares them
// (exported from libtorch_python / libtorch_cpu: a renamed or removed one fails the load with an
// undefined symbol), and the one layout this file assumes, a Tensor object's `at::Tensor` right after
// its PyObject header (torch's THPVariable), is verified when the module loads (tensor_layout_reason):
// a torch that moves it fails the import with that reason, never reads a wrong Tensor.
#include <Python.h>

#include "common.h"
#include "ops.h"

#ifdef TORCH_EXTENSION_NAME
// `cell_step(kind, input, hx, params, input_size, hidden_size)`: one inference
// step of a standard cell called straight from rnnkit.cells.CellBase.forward,
// without the dispatcher (whose boxing costs several times the step itself at
// batch 1). It runs only in the plain case and answers NotImplemented for
// anything else, so the caller takes the full path (its friendly errors, the
// torch.ops op, autograd):
//   kind: 0 lstm, 1 gru, 2 rnn tanh, 3 rnn relu (None: not a fused cell)
//   input (N, H_in) or (H_in,); hx None, a Tensor, or (h, c) for the LSTM,
//   each (N, H) or (H,) as the input; params the module's _parameters dict
//   (weight_ih, weight_hh, bias_ih, bias_hh; a bias may be None).
// Plain means: exact Tensor/Parameter objects, one dtype (float32/float64),
// CPU, strided, contiguous, no gradient needed, no dispatch key beyond
// CPU/autograd/ADInplaceOrView (so no fake tensors, vmap, dispatch or
// __torch_function__ modes, autocast), no profiler callbacks, and the backend
// not disabled by RNNKIT_DISABLE_FUSED.
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Export.h>

#include <cstdlib>
#include <exception>
#include <vector>

// torch's own declarations (torch/csrc/autograd/python_variable.h, torch/csrc/Exceptions.h,
// ATen/record_function.h), repeated word for word
TORCH_PYTHON_API extern PyObject* THPVariableClass;  // torch.Tensor
TORCH_PYTHON_API extern PyObject* ParameterClass;    // torch.nn.Parameter
TORCH_PYTHON_API PyObject* THPVariable_Wrap(at::TensorBase&& var);
namespace torch {
TORCH_PYTHON_API void translate_exception_to_python(const std::exception_ptr&);
}  // namespace torch
namespace at {
TORCH_API bool hasCallbacks();
}  // namespace at

// What HANDLE_TH_ERRORS / END_HANDLE_TH_ERRORS do with an exception: torch's own translation (a
// c10::Error becomes RuntimeError, c10::ValueError ValueError, ...; a python_error restores its
// Python error). (Their C++-warning buffer is left out: the kernels these entries run never warn.)
#define RK_HANDLE_ERRORS try {
#define RK_END_HANDLE_ERRORS                                        \
  }                                                                 \
  catch (const std::exception&) {                                   \
    torch::translate_exception_to_python(std::current_exception()); \
    return nullptr;                                                 \
  }

namespace rnnkit_fused::cell {

PyObject *k_weight_ih, *k_weight_hh, *k_bias_ih, *k_bias_hh;

bool fused_disabled() {
  const char* v = std::getenv("RNNKIT_DISABLE_FUSED");
  return v && *v && std::strcmp(v, "0") != 0;
}

// a plain tensor of this process's kind (see above); dtype/shape are checked by the caller
bool plain(const Tensor& t, c10::DispatchKeySet excluded) {
  static const c10::DispatchKeySet allowed = c10::DispatchKeySet(c10::DispatchKey::CPU) |
                                             c10::DispatchKeySet(c10::DispatchKey::AutogradCPU) |
                                             c10::DispatchKeySet(c10::DispatchKey::ADInplaceOrView);
  // (operator- keeps backend bits: only the CPU one may remain)
  return t.defined() && (t.key_set() - excluded - allowed).remove_backend(c10::BackendComponent::CPUBit).empty() &&
         t.device().is_cpu() && t.layout() == at::kStrided && t.is_contiguous();
}

// A Tensor object as torch lays it out (torch's THPVariable: the PyObject header, then the at::Tensor;
// its hook fields follow). Verified when the module loads, see tensor_layout_reason.
struct TensorObject {
  PyObject_HEAD
  Tensor cdata;
};

// the Tensor held by obj if it is an exact Tensor or Parameter (torch's THPVariable_CheckExact), else null
const Tensor* unpack(PyObject* obj) {
  if (!obj) return nullptr;
  PyTypeObject* const type = Py_TYPE(obj);
  if (type != (PyTypeObject*)THPVariableClass && type != (PyTypeObject*)ParameterClass) return nullptr;
  return &reinterpret_cast<TensorObject*>(obj)->cdata;
}

// Null if unpack reads, from the Tensor object obj, the Tensor whose TensorImpl is at `impl` (what
// torch's Tensor._cdata gives), else why not. The load checks it on a Tensor it wraps with torch's
// THPVariable_Wrap; tests on Tensors and Parameters made in Python.
const char* tensor_layout_reason(PyObject* obj, const void* impl) {
  if (!THPVariableClass || !ParameterClass) return "torch.Tensor/torch.nn.Parameter are not initialised (torch._C)";
  if (!obj || (Py_TYPE(obj) != (PyTypeObject*)THPVariableClass && Py_TYPE(obj) != (PyTypeObject*)ParameterClass))
    return "the object is not a torch.Tensor or torch.nn.Parameter";
  if (((PyTypeObject*)THPVariableClass)->tp_basicsize < (Py_ssize_t)sizeof(TensorObject))
    return "torch.Tensor's objects are smaller than a PyObject header and an at::Tensor";
  if (reinterpret_cast<TensorObject*>(obj)->cdata.unsafeGetTensorImpl() != impl)
    return "the at::Tensor after a Tensor object's PyObject header is not its tensor";
  return nullptr;
}

// A direct call's arguments, read and checked.
struct DirectStep {
  long kind = -1;
  int64_t N = 0, I = 0, H = 0;
  bool batched = true;
  at::ScalarType dt = at::kFloat;
  const Tensor *x = nullptr, *w_ih = nullptr, *w_hh = nullptr, *b_ih = nullptr, *b_hh = nullptr;
  const Tensor* st[2] = {nullptr, nullptr};
};

// The parameters' keys in the module's _parameters dict, and how the reasons name them.
struct ParamKeys {
  PyObject *const *w_ih, *const *w_hh, *const *b_ih, *const *b_hh;
  const char *weights_missing, *b_ih_not_tensor, *b_hh_not_tensor;
};

// What cell_step and layer_run read alike from (kind, input, hx, params, input_size, hidden_size, ...):
// the kind and sizes, the exact Tensor objects, the environment (nothing the dispatcher would route
// elsewhere), the tensors (plain, one dtype, no gradient needed) and the parameters' shapes. Null
// if all of that is plain, else why not (a Python error may be set, then the reason is "error").
// The input's and the states' shapes are the caller's (a step's or a sequence's).
const char* read_plain(PyObject* const* args, const char* not_kind, const ParamKeys& keys, DirectStep& d,
                       int& nstates) {
  if (!PyLong_CheckExact(args[0])) return not_kind;
  if (!PyDict_Check(args[3])) return "params is not a dict";
  if (!PyLong_CheckExact(args[4]) || !PyLong_CheckExact(args[5])) return "input_size/hidden_size are not ints";
  d.kind = PyLong_AsLong(args[0]);
  const long in_size = PyLong_AsLong(args[4]), hid = PyLong_AsLong(args[5]);
  if (PyErr_Occurred()) return "error";
  if (d.kind < 0 || d.kind > 3) return "kind out of range";
  if (in_size <= 0 || hid <= 0) return "input_size/hidden_size not positive";
  const int gates = d.kind == 0 ? 4 : d.kind == 1 ? 3 : 1;
  nstates = d.kind == 0 ? 2 : 1;

  // the objects: exact Tensor/Parameter
  d.x = unpack(args[1]);
  if (!d.x) return "input is not a Tensor (or is a Tensor subclass)";
  PyObject* pd = args[3];
  PyObject *ow_ih = PyDict_GetItemWithError(pd, *keys.w_ih), *ow_hh = PyDict_GetItemWithError(pd, *keys.w_hh);
  PyObject *ob_ih = PyDict_GetItemWithError(pd, *keys.b_ih), *ob_hh = PyDict_GetItemWithError(pd, *keys.b_hh);
  if (PyErr_Occurred()) return "error";
  d.w_ih = unpack(ow_ih), d.w_hh = unpack(ow_hh);
  if (!d.w_ih || !d.w_hh) return keys.weights_missing;
  if (ob_ih && ob_ih != Py_None && !(d.b_ih = unpack(ob_ih))) return keys.b_ih_not_tensor;
  if (ob_hh && ob_hh != Py_None && !(d.b_hh = unpack(ob_hh))) return keys.b_hh_not_tensor;
  PyObject* hx = args[2];
  if (hx != Py_None) {
    if (nstates == 2) {
      if (!PyTuple_CheckExact(hx) && !PyList_CheckExact(hx)) return "hx is not a tuple or list";
      if (PySequence_Fast_GET_SIZE(hx) != 2) return "hx does not hold 2 states";
      d.st[0] = unpack(PySequence_Fast_GET_ITEM(hx, 0));
      d.st[1] = unpack(PySequence_Fast_GET_ITEM(hx, 1));
      if (!d.st[0] || !d.st[1]) return "a state is not a Tensor";
    } else if (!(d.st[0] = unpack(hx))) {
      return "hx is not a Tensor";
    }
  }

  // the environment: nothing that the dispatcher would route elsewhere
  if (fused_disabled()) return "disabled by RNNKIT_DISABLE_FUSED";
  if (at::hasCallbacks()) return "RecordFunction callbacks (a profiler) are active";
  if (at::impl::torch_function_mode_enabled()) return "a __torch_function__ mode is active";
  const c10::impl::LocalDispatchKeySet tls = c10::impl::tls_local_dispatch_key_set();
  static const c10::DispatchKeySet default_included =  // what every thread includes by default
      c10::DispatchKeySet(c10::DispatchKey::BackendSelect) | c10::DispatchKeySet(c10::DispatchKey::ADInplaceOrView);
  if (!(tls.included_ - default_included).empty())
    return "dispatch keys are included by thread-local state (a mode or transform)";

  // the tensors
  const bool grad = at::GradMode::is_enabled();
  d.dt = d.x->scalar_type();
  if (d.dt != at::kFloat && d.dt != at::kDouble) return "dtype is not float32/float64";
  const Tensor* all[7] = {d.x, d.w_ih, d.w_hh, d.b_ih, d.b_hh, d.st[0], d.st[1]};
  for (const Tensor* t : all) {
    if (!t) continue;
    if (!plain(*t, tls.excluded_)) return "a tensor is not a plain contiguous CPU tensor";
    if (t->scalar_type() != d.dt) return "the tensors' dtypes differ";
    if (grad && t->requires_grad()) return "a gradient is needed";
  }

  // the parameters' shapes
  const int64_t G = gates * hid;
  d.I = in_size, d.H = hid;
  if (d.w_ih->dim() != 2 || d.w_ih->size(0) != G || d.w_ih->size(1) != d.I) return "weight_ih's shape";
  if (d.w_hh->dim() != 2 || d.w_hh->size(0) != G || d.w_hh->size(1) != d.H) return "weight_hh's shape";
  if ((d.b_ih && (d.b_ih->dim() != 1 || d.b_ih->size(0) != G)) ||
      (d.b_hh && (d.b_hh->dim() != 1 || d.b_hh->size(0) != G)))
    return "a bias's shape";
  return nullptr;
}

const ParamKeys cell_keys{&k_weight_ih, &k_weight_hh, &k_bias_ih, &k_bias_hh,
                          "weight_ih/weight_hh missing or not Tensors", "bias_ih is not a Tensor",
                          "bias_hh is not a Tensor"};

// Reads cell_step's arguments into d: null if the step is plain, else why not
// (a Python error may be set, then the reason is "error").
const char* read_direct(PyObject* const* args, Py_ssize_t nargs, DirectStep& d) {
  if (nargs != 6) return "expected 6 arguments (kind, input, hx, params, input_size, hidden_size)";
  int nstates = 0;
  if (const char* why = read_plain(args, "kind is not an int (not a fused cell)", cell_keys, d, nstates)) return why;
  // the input's and states' shapes: (N, H_in) and (N, H), or unbatched (H_in,) and (H,)
  d.batched = d.x->dim() == 2;
  if (!d.batched && d.x->dim() != 1) return "input is not 1-D or 2-D";
  d.N = d.batched ? d.x->size(0) : 1;
  if (d.N < 1) return "empty batch";
  if (d.x->size(-1) != d.I) return "input's last axis is not input_size";
  for (int i = 0; i < nstates; ++i) {
    const Tensor* s = d.st[i];
    if (s && (d.batched ? (s->dim() != 2 || s->size(0) != d.N || s->size(1) != d.H)
                        : (s->dim() != 1 || s->size(0) != d.H)))
      return "a state's shape";
  }
  return nullptr;
}

PyObject* cell_step(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  RK_HANDLE_ERRORS
  DirectStep d;
  if (const char* why = read_direct(args, nargs, d)) {
    if (PyErr_Occurred()) return nullptr;
    (void)why;
    Py_RETURN_NOTIMPLEMENTED;
  }
  const int64_t N = d.N, I = d.I, H = d.H;
  const at::TensorOptions opts = d.x->options();
  const int64_t dims[2] = {N, H};  // (N, H), or (H,) unbatched
  const c10::IntArrayRef shape = d.batched ? c10::IntArrayRef(dims, 2) : c10::IntArrayRef(dims + 1, 1);
  Tensor h_new = rk::empty(shape, opts), c_new;
  if (d.kind == 0) c_new = rk::empty(shape, opts);
  direct_step(d.kind, N, I, H, *d.x, d.st[0], d.st[1], *d.w_ih, *d.w_hh, d.b_ih, d.b_hh, h_new, c_new);
  if (d.kind != 0) return THPVariable_Wrap(std::move(h_new));
  PyObject* out = PyTuple_New(2);
  if (!out) return nullptr;
  PyTuple_SET_ITEM(out, 0, THPVariable_Wrap(std::move(h_new)));
  PyTuple_SET_ITEM(out, 1, THPVariable_Wrap(std::move(c_new)));
  return out;
  RK_END_HANDLE_ERRORS
}

// cell_step_reason(same arguments): None if cell_step would run the step, else why it answers NotImplemented.
PyObject* cell_step_reason(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  RK_HANDLE_ERRORS
  DirectStep d;
  const char* why = read_direct(args, nargs, d);
  if (PyErr_Occurred()) return nullptr;
  if (!why) Py_RETURN_NONE;
  return PyUnicode_FromString(why);
  RK_END_HANDLE_ERRORS
}

// ---------------------------------------------------------------- the direct layer entry
// `layer_run(kind, input, hx, params, input_size, hidden_size, batch_first)`: one plain inference call
// of a one-layer, one-direction RNN/LSTM/GRU (any length) straight from RecurrentBase.forward: the
// input projection and the time loop in cell.cpp's layer_infer, writing only what the layer returns.
// Same rules as cell_step (plain tensors, no gradient needed, nothing the dispatcher would route
// elsewhere), NotImplemented for anything else, so the caller takes the full path (its checks and
// errors):
//   input (L, N, H_in), or (N, L, H_in) when batch_first is True, contiguous, L >= 1, N >= 1;
//   hx None, a Tensor (1, N, H), or for the LSTM a tuple or list (h_0, c_0), each (1, N, H);
//   params the module's _parameters dict (weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0).
//   lstm_macs_limit (optional, default 0: none): auto's rule (rnnkit.layers.AUTO_DIRECT_LSTM_MACS):
//   an LSTM sequence (L > 1) with N * 4H * H >= this many multiply-adds per step is declined too.
// Returns what the layer returns: (output, h_n), or (output, (h_n, c_n)) for the LSTM; output
// time-major in memory (a transposed view for batch_first, as torch.nn's), h_n and c_n (1, N, H); all
// new tensors.
// (layer_infer is declared here, not in ops.h, so adding it rebuilt only this unit and cell.cpp's.)
void layer_infer(long kind, int64_t L, int64_t N, int64_t I, int64_t H, bool batch_first, const Tensor& x,
                 const Tensor* h0_, const Tensor* c0_, const Tensor& w_ih, const Tensor& w_hh, const Tensor* b_ih,
                 const Tensor* b_hh, Tensor& out, Tensor& h_n, Tensor& c_n);

// releases the GIL for its scope (exception-safe)
struct NoGil {
  PyThreadState* state;
  NoGil() : state(PyEval_SaveThread()) {}
  ~NoGil() { PyEval_RestoreThread(state); }
  NoGil(const NoGil&) = delete;
  NoGil& operator=(const NoGil&) = delete;
};

PyObject *k_weight_ih_l0, *k_weight_hh_l0, *k_bias_ih_l0, *k_bias_hh_l0;
const ParamKeys layer_keys{&k_weight_ih_l0, &k_weight_hh_l0, &k_bias_ih_l0, &k_bias_hh_l0,
                           "weight_ih_l0/weight_hh_l0 missing or not Tensors", "bias_ih_l0 is not a Tensor",
                           "bias_hh_l0 is not a Tensor"};

// A direct layer call's arguments, read and checked into d (N, I, H, kind, tensors) and L: null if
// the call is plain, else why not (a Python error may be set, then the reason is "error").
const char* read_layer(PyObject* const* args, Py_ssize_t nargs, DirectStep& d, int64_t& L, bool& batch_first) {
  if (nargs != 7 && nargs != 8)
    return "expected 7 or 8 arguments (kind, input, hx, params, input_size, hidden_size, batch_first[, "
           "lstm_macs_limit])";
  if (!PyBool_Check(args[6])) return "batch_first is not a bool";
  batch_first = args[6] == Py_True;
  long long limit = 0;
  if (nargs == 8) {
    if (!PyLong_CheckExact(args[7])) return "lstm_macs_limit is not an int";
    limit = PyLong_AsLongLong(args[7]);
    if (PyErr_Occurred()) return "error";
  }
  int nstates = 0;
  if (const char* why = read_plain(args, "kind is not an int (not a fused layer)", layer_keys, d, nstates)) return why;
  // the input's and states' shapes: (L, N, H_in) or (N, L, H_in), and (1, N, H)
  if (d.x->dim() != 3) return "input is not 3-D";
  L = d.x->size(batch_first ? 1 : 0);
  d.N = d.x->size(batch_first ? 0 : 1);
  if (L < 1) return "empty sequence";
  if (d.N < 1) return "empty batch";
  if (d.x->size(2) != d.I) return "input's last axis is not input_size";
  for (int i = 0; i < nstates; ++i) {
    const Tensor* s = d.st[i];
    if (s && (s->dim() != 3 || s->size(0) != 1 || s->size(1) != d.N || s->size(2) != d.H)) return "a state's shape";
  }
  if (limit > 0 && d.kind == 0 && L > 1 && d.N * 4 * d.H * d.H >= limit)
    return "auto's rule: an LSTM sequence at or above lstm_macs_limit multiply-adds per step";
  return nullptr;
}

PyObject* layer_run(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  RK_HANDLE_ERRORS
  DirectStep d;
  int64_t L = 0;
  bool batch_first = false;
  if (const char* why = read_layer(args, nargs, d, L, batch_first)) {
    if (PyErr_Occurred()) return nullptr;
    (void)why;
    Py_RETURN_NOTIMPLEMENTED;
  }
  const int64_t N = d.N, H = d.H;
  const at::TensorOptions opts = d.x->options();
  // out is time-major whatever x's layout (layer_infer_raw), and batch_first returns its transposed view, as
  // torch.nn's op does (same strides: code that transposes it back and calls .view() works the same)
  const int64_t odims[3] = {L, N, H}, sdims[3] = {1, N, H};
  Tensor out = rk::empty(c10::IntArrayRef(odims, 3), opts), h_n = rk::empty(c10::IntArrayRef(sdims, 3), opts), c_n;
  if (d.kind == 0) c_n = rk::empty(c10::IntArrayRef(sdims, 3), opts);
  if (L == 1) {  // one step: a few microseconds, run holding the GIL as cell_step does (releasing costs more)
    layer_infer(d.kind, L, N, d.I, H, batch_first, *d.x, d.st[0], d.st[1], *d.w_ih, *d.w_hh, d.b_ih, d.b_hh, out,
                h_n, c_n);
  } else {
    const NoGil no_gil;  // as an op call does: other Python threads run meanwhile
    layer_infer(d.kind, L, N, d.I, H, batch_first, *d.x, d.st[0], d.st[1], *d.w_ih, *d.w_hh, d.b_ih, d.b_hh, out,
                h_n, c_n);
  }
  PyObject* state;
  if (d.kind == 0) {
    state = PyTuple_New(2);
    if (!state) return nullptr;
    PyTuple_SET_ITEM(state, 0, THPVariable_Wrap(std::move(h_n)));
    PyTuple_SET_ITEM(state, 1, THPVariable_Wrap(std::move(c_n)));
  } else {
    state = THPVariable_Wrap(std::move(h_n));
    if (!state) return nullptr;
  }
  PyObject* result = PyTuple_New(2);
  if (!result) {
    Py_DECREF(state);
    return nullptr;
  }
  PyTuple_SET_ITEM(result, 0, THPVariable_Wrap(batch_first ? out.transpose(0, 1) : std::move(out)));
  PyTuple_SET_ITEM(result, 1, state);
  return result;
  RK_END_HANDLE_ERRORS
}

// layer_run_reason(same arguments): None if layer_run would run the call, else why it answers NotImplemented.
PyObject* layer_run_reason(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  RK_HANDLE_ERRORS
  DirectStep d;
  int64_t L = 0;
  bool batch_first = false;
  const char* why = read_layer(args, nargs, d, L, batch_first);
  if (PyErr_Occurred()) return nullptr;
  if (!why) Py_RETURN_NONE;
  return PyUnicode_FromString(why);
  RK_END_HANDLE_ERRORS
}

// _tensor_layout_reason(tensor, impl_address): None if this module reads tensor's at::Tensor (the
// one whose TensorImpl is at impl_address, what tensor._cdata gives), else why not (tests).
PyObject* tensor_layout_reason_py(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_Format(PyExc_TypeError, "_tensor_layout_reason() takes 2 arguments (tensor, impl_address), got %zd", nargs);
    return nullptr;
  }
  void* impl = PyLong_AsVoidPtr(args[1]);
  if (PyErr_Occurred()) return nullptr;
  const char* why = tensor_layout_reason(args[0], impl);
  if (!why) Py_RETURN_NONE;
  return PyUnicode_FromString(why);
}

// The load-time check: a Tensor made here and wrapped by torch (THPVariable_Wrap) must read back as
// itself. Null if so, else why not (a Python error may be set). RNNKIT_FUSED_TEST_LAYOUT_MISMATCH=1
// makes it expect another TensorImpl, so tests can see the import fail as it would on such a torch.
const char* check_tensor_layout() {
  try {
    Tensor probe = rk::empty(c10::IntArrayRef({1}), at::TensorOptions().dtype(at::kFloat));
    const char* simulate = std::getenv("RNNKIT_FUSED_TEST_LAYOUT_MISMATCH");
    const void* impl = reinterpret_cast<const char*>(probe.unsafeGetTensorImpl()) + (simulate && *simulate ? 1 : 0);
    PyObject* obj = THPVariable_Wrap(std::move(probe));
    if (!obj) return "torch could not wrap a Tensor";
    const char* why = tensor_layout_reason(obj, impl);
    Py_DECREF(obj);
    return why;
  } catch (const std::exception&) {
    torch::translate_exception_to_python(std::current_exception());
    return "error";
  }
}

PyMethodDef methods[] = {
    {"cell_step", (PyCFunction)(void (*)(void))cell_step, METH_FASTCALL,
     "cell_step(kind, input, hx, params, input_size, hidden_size): one plain inference step, or NotImplemented"},
    {"cell_step_reason", (PyCFunction)(void (*)(void))cell_step_reason, METH_FASTCALL,
     "cell_step_reason(same arguments): None if cell_step would run the step, else why not"},
    {"layer_run", (PyCFunction)(void (*)(void))layer_run, METH_FASTCALL,
     "layer_run(kind, input, hx, params, input_size, hidden_size, batch_first[, lstm_macs_limit]): one plain "
     "inference call of a one-layer, one-direction RNN/LSTM/GRU, or NotImplemented"},
    {"layer_run_reason", (PyCFunction)(void (*)(void))layer_run_reason, METH_FASTCALL,
     "layer_run_reason(same arguments): None if layer_run would run the call, else why not"},
    {"_tensor_layout_reason", (PyCFunction)(void (*)(void))tensor_layout_reason_py, METH_FASTCALL,
     "_tensor_layout_reason(tensor, impl_address): None if the direct entries read tensor's at::Tensor (the one "
     "at tensor._cdata), else why not"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, C10_STRINGIZE(TORCH_EXTENSION_NAME),
                          "rnnkit's fused kernels: the direct single-step entry (the ops are in torch.ops.rnnkit_fused)",
                          -1, methods};

}  // namespace rnnkit_fused::cell

#define RNNKIT_PYINIT2(name) PyInit_##name
#define RNNKIT_PYINIT(name) RNNKIT_PYINIT2(name)
PyMODINIT_FUNC RNNKIT_PYINIT(TORCH_EXTENSION_NAME)(void) {
  using namespace rnnkit_fused::cell;
  k_weight_ih = PyUnicode_InternFromString("weight_ih");
  k_weight_hh = PyUnicode_InternFromString("weight_hh");
  k_bias_ih = PyUnicode_InternFromString("bias_ih");
  k_bias_hh = PyUnicode_InternFromString("bias_hh");
  if (!k_weight_ih || !k_weight_hh || !k_bias_ih || !k_bias_hh) return nullptr;
  k_weight_ih_l0 = PyUnicode_InternFromString("weight_ih_l0");
  k_weight_hh_l0 = PyUnicode_InternFromString("weight_hh_l0");
  k_bias_ih_l0 = PyUnicode_InternFromString("bias_ih_l0");
  k_bias_hh_l0 = PyUnicode_InternFromString("bias_hh_l0");
  if (!k_weight_ih_l0 || !k_weight_hh_l0 || !k_bias_ih_l0 || !k_bias_hh_l0) return nullptr;
  if (const char* why = check_tensor_layout()) {
    if (!PyErr_Occurred())
      PyErr_Format(PyExc_ImportError,
                   "rnnkit's fused extension (cell_py.cpp) does not match this torch's Tensor objects: %s; "
                   "its direct entries read a Tensor object as torch's THPVariable lays it out "
                   "(a PyObject header, then the at::Tensor)", why);
    return nullptr;
  }
  return PyModule_Create(&module_def);
}
#endif  // TORCH_EXTENSION_NAME
