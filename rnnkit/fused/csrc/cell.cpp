// rnnkit's fused CPU kernels: the single-step cells (inference): the lstm_cell / gru_cell /
// rnn_cell ops and the direct CPython entry `cell_step` that skips the dispatcher.

#include "common.h"
#include "gates.h"
#include "ops.h"

namespace rnnkit_fused::cell {

// ================================================================ single-step cells (inference)
// One implementation on raw pointers (the *_cell_raw functions) serves both
// entries: the torch.ops ops below (autograd-free, traced by torch.compile) and
// the direct CPython entry `cell_step` at the end of this file, which skips the
// dispatcher for plain inference steps.

// Matrix-vector products of one step at a tiny batch: y (G) = b1 + b2 + W1 a1 + W2 a2,
// W row-major (G x K) as torch stores it (a2/W2 and the biases may be null).
// Both products share each row's accumulators and the bias is added once at
// the end: one pass over y instead of BLAS's two calls (whose per-call cost
// dominates at this size). Rows go in blocks of R, each block's R
// accumulators reduced together.
template <typename T, int R>
inline void gemv_block(int64_t g, const T* a1, int64_t K1, const T* W1, const T* a2, int64_t K2, const T* W2,
                       T* sums) {
  using V = Vec<T>;
  constexpr int64_t VS = V::size();
  V acc[R];
  for (int r = 0; r < R; ++r) acc[r] = V(T(0));
  auto pass = [&](const T* a, int64_t K, const T* W) {
    const T* w = W + g * K;
    int64_t k = 0;
    for (; k + VS <= K; k += VS) {
      const V av = V::loadu(a + k);
      for (int r = 0; r < R; ++r) acc[r] = at::vec::fmadd(av, V::loadu(w + r * K + k), acc[r]);
    }
    if (k < K) {
      const V av = V::loadu(a + k, K - k);  // zero-filled past K
      for (int r = 0; r < R; ++r) acc[r] = at::vec::fmadd(av, V::loadu(w + r * K + k, K - k), acc[r]);
    }
  };
  pass(a1, K1, W1);
  if (a2) pass(a2, K2, W2);
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float> && R == 8) {
    // the 8 horizontal sums at once: [sum acc0, ..., sum acc7]
    const __m256 s01 = _mm256_hadd_ps(acc[0], acc[1]), s23 = _mm256_hadd_ps(acc[2], acc[3]);
    const __m256 s45 = _mm256_hadd_ps(acc[4], acc[5]), s67 = _mm256_hadd_ps(acc[6], acc[7]);
    const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
    _mm256_storeu_ps(sums, _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                                         _mm256_permute2f128_ps(s0123, s4567, 0x31)));
    return;
  }
#endif
  for (int r = 0; r < R; ++r) sums[r] = at::vec::vec_reduce_all<T>([](const V& x, const V& y) { return x + y; }, acc[r]);
}

template <typename T>
void small_gemv(int64_t G, const T* a1, int64_t K1, const T* W1, const T* a2, int64_t K2, const T* W2, const T* b1,
                const T* b2, T* y) {
  constexpr int R = 8;
  T sums[R];
  auto finish = [&](int64_t g, int64_t cnt) {
    for (int64_t r = 0; r < cnt; ++r) y[g + r] = sums[r] + (b1 ? b1[g + r] : T(0)) + (b2 ? b2[g + r] : T(0));
  };
  int64_t g = 0;
  for (; g + R <= G; g += R) {
    gemv_block<T, R>(g, a1, K1, W1, a2, K2, W2, sums);
    finish(g, R);
  }
  for (; g < G; ++g) {
    gemv_block<T, 1>(g, a1, K1, W1, a2, K2, W2, sums);
    finish(g, 1);
  }
}

// g (N, G) = b_ih + b_hh (either may be null) + x W_ih^T (+ h W_hh^T unless h is null)
template <typename T>
void cell_gates_raw(int64_t N, int64_t G, int64_t I, int64_t Hh, const T* x, const T* h, const T* w_ih,
                    const T* w_hh, const T* bi, const T* bh, T* g) {
  if (N < kSmallRows) {
    for (int64_t n = 0; n < N; ++n)
      small_gemv<T>(G, x + n * I, I, w_ih, h ? h + n * Hh : nullptr, Hh, w_hh, bi, bh, g + n * G);
    return;
  }
  for (int64_t n = 0; n < N; ++n) {
    T* row = g + n * G;
    if (bi) copy_row(row, bi, G);
    else zero_row(row, G);
    if (bh) add_into(row, bh, G);
  }
  gemm_abt<T>(N, G, I, x, I, w_ih, I, T(1), g, G);
  if (h) gemm_abt<T>(N, G, Hh, h, Hh, w_hh, Hh, T(1), g, G);
}

// h (N, H), c (N, H) from x (N, I), h0, c0; h0 null means zeros (and c0 must then be zeros too or null)
template <typename T>
void lstm_cell_raw(int64_t N, int64_t I, int64_t H, const T* x, const T* h0, const T* c0, const T* w_ih,
                   const T* w_hh, const T* bi, const T* bh, T* g, T* hn, T* cn) {
  cell_gates_raw<T>(N, 4 * H, I, H, x, h0, w_ih, w_hh, bi, bh, g);
  auto rows = [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) lstm_row(g + n * 4 * H, (const T*)nullptr, c0 + n * H, cn + n * H, hn + n * H, H);
  };
  if (N == 1) rows(0, 1);
  else at::parallel_for(0, N, row_grain(4 * H), rows);
}

// scratch: gru_cell_scratch(N, H) elements; bh null means zeros
inline int64_t gru_cell_scratch(int64_t N, int64_t H) { return 3 * N * 3 * H + N * H + 3 * H; }

template <typename T>
void gru_cell_raw(int64_t N, int64_t I, int64_t H, const T* x, const T* h0, const T* w_ih, const T* w_hh,
                  const T* bi, const T* bh, T* scratch, T* out) {
  const int64_t G = 3 * H;
  T *xg = scratch, *hh = xg + N * G, *rz = hh + N * G, *hnp = rz + N * G, *zeros = hnp + N * H;
  if (!bh) {
    zero_row(zeros, G);
    bh = zeros;
  }
  // the input part with b_ih; the recurrent part separately (r gates it)
  cell_gates_raw<T>(N, G, I, H, x, (const T*)nullptr, w_ih, w_hh, bi, (const T*)nullptr, xg);
  cell_gates_raw<T>(N, G, H, H, h0, (const T*)nullptr, w_hh, w_hh, (const T*)nullptr, (const T*)nullptr, hh);
  auto rows = [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n)
      gru_row(xg + n * G, hh + n * G, bh, h0 + n * H, rz + n * G, hnp + n * H, out + n * H, H);
  };
  if (N == 1) rows(0, 1);
  else at::parallel_for(0, N, row_grain(G), rows);
}

template <typename T>
void rnn_cell_raw(int64_t N, int64_t I, int64_t H, const T* x, const T* h0, const T* w_ih, const T* w_hh,
                  const T* bi, const T* bh, int64_t act, T* out) {
  cell_gates_raw<T>(N, H, I, H, x, h0, w_ih, w_hh, bi, bh, out);
  for (int64_t n = 0; n < N; ++n) rnn_act_row(out + n * H, (const T*)nullptr, H, act);
}

template <typename T>
const T* opt_ptr(const std::optional<Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->data_ptr<T>() : nullptr;
}

// a cell op's x, h and w_ih: 2-D, read before G is taken from them
void check_cell_dims(const Tensor& x, const Tensor& h, const Tensor& w_ih, const char* op) {
  TORCH_CHECK(x.dim() == 2 && h.dim() == 2 && x.size(0) == h.size(0), "rnnkit_fused::", op,
              ": x must be (N, H_in) and h (N, H), got ", x.sizes(), " and ", h.sizes());
  TORCH_CHECK(w_ih.dim() == 2, "rnnkit_fused::", op, ": w_ih must be (G, H_in), got ", w_ih.sizes());
}

void check_cell(const Tensor& x, const Tensor& h, const Tensor& w_ih, const Tensor& w_hh,
                const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, int64_t G, const char* op) {
  TORCH_CHECK(x.dim() == 2 && h.dim() == 2 && x.size(0) == h.size(0), "rnnkit_fused::", op,
              ": x must be (N, H_in) and h (N, H), got ", x.sizes(), " and ", h.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "rnnkit_fused::", op,
              ": float32 or float64 only, got ", x.scalar_type());
  const int64_t I = x.size(1), Hh = h.size(1);
  check_same(x, h, "h", {x.size(0), Hh});
  check_same(x, w_ih, "w_ih", {G, I});
  check_same(x, w_hh, "w_hh", {G, Hh});
  if (b_ih.has_value() && b_ih->defined()) check_same(x, *b_ih, "b_ih", {G});
  if (b_hh.has_value() && b_hh->defined()) check_same(x, *b_hh, "b_hh", {G});
}

std::optional<Tensor> opt_contiguous(const std::optional<Tensor>& t) {
  if (t.has_value() && t->defined()) return t->contiguous();
  return std::nullopt;
}

std::tuple<Tensor, Tensor> lstm_cell(const Tensor& x_, const Tensor& h_, const Tensor& c_, const Tensor& w_ih_,
                                     const Tensor& w_hh_, const std::optional<Tensor>& b_ih_,
                                     const std::optional<Tensor>& b_hh_) {
  Tensor x = x_.contiguous(), h = h_.contiguous(), c = c_.contiguous(), w_ih = w_ih_.contiguous(),
         w_hh = w_hh_.contiguous();
  auto b_ih = opt_contiguous(b_ih_), b_hh = opt_contiguous(b_hh_);
  check_cell_dims(x, h, w_ih, "lstm_cell");
  check_cell(x, h, w_ih, w_hh, b_ih, b_hh, w_ih.size(0), "lstm_cell");
  const int64_t N = x.size(0), I = x.size(1), H = h.size(1);
  TORCH_CHECK(w_ih.size(0) == 4 * H, "rnnkit_fused::lstm_cell: w_ih must be (4H, H_in), got ", w_ih.sizes());
  check_same(x, c, "c", {N, H});
  Tensor gates = at::empty({N, 4 * H}, x.options());
  Tensor h_new = at::empty({N, H}, x.options()), c_new = at::empty({N, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_cell", [&] {
    using T = scalar_t;
    lstm_cell_raw<T>(N, I, H, x.data_ptr<T>(), h.data_ptr<T>(), c.data_ptr<T>(), w_ih.data_ptr<T>(),
                     w_hh.data_ptr<T>(), opt_ptr<T>(b_ih), opt_ptr<T>(b_hh), gates.data_ptr<T>(),
                     h_new.data_ptr<T>(), c_new.data_ptr<T>());
  });
  return {h_new, c_new};
}

Tensor gru_cell(const Tensor& x_, const Tensor& h_, const Tensor& w_ih_, const Tensor& w_hh_,
                const std::optional<Tensor>& b_ih_, const std::optional<Tensor>& b_hh_) {
  Tensor x = x_.contiguous(), h = h_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  auto b_ih = opt_contiguous(b_ih_), b_hh = opt_contiguous(b_hh_);
  check_cell_dims(x, h, w_ih, "gru_cell");
  check_cell(x, h, w_ih, w_hh, b_ih, b_hh, w_ih.size(0), "gru_cell");
  const int64_t N = x.size(0), I = x.size(1), H = h.size(1);
  TORCH_CHECK(w_ih.size(0) == 3 * H, "rnnkit_fused::gru_cell: w_ih must be (3H, H_in), got ", w_ih.sizes());
  Tensor scratch = at::empty({gru_cell_scratch(N, H)}, x.options());
  Tensor h_new = at::empty({N, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gru_cell", [&] {
    using T = scalar_t;
    gru_cell_raw<T>(N, I, H, x.data_ptr<T>(), h.data_ptr<T>(), w_ih.data_ptr<T>(), w_hh.data_ptr<T>(),
                    opt_ptr<T>(b_ih), opt_ptr<T>(b_hh), scratch.data_ptr<T>(), h_new.data_ptr<T>());
  });
  return h_new;
}

Tensor rnn_cell(const Tensor& x_, const Tensor& h_, const Tensor& w_ih_, const Tensor& w_hh_,
                const std::optional<Tensor>& b_ih_, const std::optional<Tensor>& b_hh_, int64_t act) {
  TORCH_CHECK(act == 0 || act == 1, "rnnkit_fused::rnn_cell: act must be 0 (tanh) or 1 (relu), got ", act);
  Tensor x = x_.contiguous(), h = h_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  auto b_ih = opt_contiguous(b_ih_), b_hh = opt_contiguous(b_hh_);
  check_cell_dims(x, h, w_ih, "rnn_cell");
  check_cell(x, h, w_ih, w_hh, b_ih, b_hh, h.size(1), "rnn_cell");
  const int64_t N = x.size(0), I = x.size(1), H = h.size(1);
  Tensor out = at::empty({N, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnn_cell", [&] {
    using T = scalar_t;
    rnn_cell_raw<T>(N, I, H, x.data_ptr<T>(), h.data_ptr<T>(), w_ih.data_ptr<T>(), w_hh.data_ptr<T>(),
                    opt_ptr<T>(b_ih), opt_ptr<T>(b_hh), act, out.data_ptr<T>());
  });
  return out;
}

}  // namespace rnnkit_fused::cell

// ================================================================ direct single-step entry (CPython)
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
#ifdef TORCH_EXTENSION_NAME
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdlib>
#include <vector>

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

// the Tensor held by obj if it is an exact Tensor or Parameter, else null
const Tensor* unpack(PyObject* obj) {
  if (!obj || !THPVariable_CheckExact(obj)) return nullptr;
  return &THPVariable_Unpack(obj);
}

template <typename T>
T* scratch(size_t n) {
  thread_local std::vector<T> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
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

// Reads cell_step's arguments into d: null if the step is plain, else why not
// (a Python error may be set, then the reason is "error").
const char* read_direct(PyObject* const* args, Py_ssize_t nargs, DirectStep& d) {
  if (nargs != 6) return "expected 6 arguments (kind, input, hx, params, input_size, hidden_size)";
  if (!PyLong_CheckExact(args[0])) return "kind is not an int (not a fused cell)";
  if (!PyDict_Check(args[3])) return "params is not a dict";
  if (!PyLong_CheckExact(args[4]) || !PyLong_CheckExact(args[5])) return "input_size/hidden_size are not ints";
  d.kind = PyLong_AsLong(args[0]);
  const long in_size = PyLong_AsLong(args[4]), hid = PyLong_AsLong(args[5]);
  if (PyErr_Occurred()) return "error";
  if (d.kind < 0 || d.kind > 3) return "kind out of range";
  if (in_size <= 0 || hid <= 0) return "input_size/hidden_size not positive";
  const int gates = d.kind == 0 ? 4 : d.kind == 1 ? 3 : 1;
  const int nstates = d.kind == 0 ? 2 : 1;

  // the objects: exact Tensor/Parameter
  d.x = unpack(args[1]);
  if (!d.x) return "input is not a Tensor (or is a Tensor subclass)";
  PyObject* pd = args[3];
  PyObject *ow_ih = PyDict_GetItemWithError(pd, k_weight_ih), *ow_hh = PyDict_GetItemWithError(pd, k_weight_hh);
  PyObject *ob_ih = PyDict_GetItemWithError(pd, k_bias_ih), *ob_hh = PyDict_GetItemWithError(pd, k_bias_hh);
  if (PyErr_Occurred()) return "error";
  d.w_ih = unpack(ow_ih), d.w_hh = unpack(ow_hh);
  if (!d.w_ih || !d.w_hh) return "weight_ih/weight_hh missing or not Tensors";
  if (ob_ih && ob_ih != Py_None && !(d.b_ih = unpack(ob_ih))) return "bias_ih is not a Tensor";
  if (ob_hh && ob_hh != Py_None && !(d.b_hh = unpack(ob_hh))) return "bias_hh is not a Tensor";
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

  // the shapes
  const int64_t G = gates * hid;
  d.I = in_size, d.H = hid;
  d.batched = d.x->dim() == 2;
  if (!d.batched && d.x->dim() != 1) return "input is not 1-D or 2-D";
  d.N = d.batched ? d.x->size(0) : 1;
  if (d.N < 1) return "empty batch";
  if (d.x->size(-1) != d.I) return "input's last axis is not input_size";
  if (d.w_ih->dim() != 2 || d.w_ih->size(0) != G || d.w_ih->size(1) != d.I) return "weight_ih's shape";
  if (d.w_hh->dim() != 2 || d.w_hh->size(0) != G || d.w_hh->size(1) != d.H) return "weight_hh's shape";
  if ((d.b_ih && (d.b_ih->dim() != 1 || d.b_ih->size(0) != G)) ||
      (d.b_hh && (d.b_hh->dim() != 1 || d.b_hh->size(0) != G)))
    return "a bias's shape";
  for (int i = 0; i < nstates; ++i) {
    const Tensor* s = d.st[i];
    if (s && (d.batched ? (s->dim() != 2 || s->size(0) != d.N || s->size(1) != d.H)
                        : (s->dim() != 1 || s->size(0) != d.H)))
      return "a state's shape";
  }
  return nullptr;
}

PyObject* cell_step(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  DirectStep d;
  if (const char* why = read_direct(args, nargs, d)) {
    if (PyErr_Occurred()) return nullptr;
    (void)why;
    Py_RETURN_NOTIMPLEMENTED;
  }
  const int64_t N = d.N, I = d.I, H = d.H, G = (d.kind == 0 ? 4 : d.kind == 1 ? 3 : 1) * H;
  const at::TensorOptions opts = d.x->options();
  const int64_t dims[2] = {N, H};  // (N, H), or (H,) unbatched
  const c10::IntArrayRef shape = d.batched ? c10::IntArrayRef(dims, 2) : c10::IntArrayRef(dims + 1, 1);
  Tensor h_new = at::empty(shape, opts), c_new;
  if (d.kind == 0) c_new = at::empty(shape, opts);
  AT_DISPATCH_FLOATING_TYPES(d.dt, "cell_step", [&] {
    using T = scalar_t;
    const T* xp = d.x->data_ptr<T>();
    const T *wi = d.w_ih->data_ptr<T>(), *wh = d.w_hh->data_ptr<T>();
    const T *bi = d.b_ih ? d.b_ih->data_ptr<T>() : nullptr, *bh = d.b_hh ? d.b_hh->data_ptr<T>() : nullptr;
    const T* h0 = d.st[0] ? d.st[0]->data_ptr<T>() : nullptr;  // null: zeros (the product is skipped)
    if (d.kind == 0) {
      T* g = scratch<T>(N * G + (d.st[1] ? 0 : N * H));
      const T* c0 = d.st[1] ? d.st[1]->data_ptr<T>() : nullptr;
      if (!c0) {
        zero_row(g + N * G, N * H);
        c0 = g + N * G;
      }
      lstm_cell_raw<T>(N, I, H, xp, h0, c0, wi, wh, bi, bh, g, h_new.data_ptr<T>(), c_new.data_ptr<T>());
    } else if (d.kind == 1) {
      const int64_t S = gru_cell_scratch(N, H);
      T* s = scratch<T>(S + (h0 ? 0 : N * H));
      if (!h0) {  // gru_row reads h0 itself
        zero_row(s + S, N * H);
        h0 = s + S;
      }
      gru_cell_raw<T>(N, I, H, xp, h0, wi, wh, bi, bh, s, h_new.data_ptr<T>());
    } else {
      rnn_cell_raw<T>(N, I, H, xp, h0, wi, wh, bi, bh, d.kind - 2, h_new.data_ptr<T>());
    }
  });
  if (d.kind != 0) return THPVariable_Wrap(std::move(h_new));
  PyObject* out = PyTuple_New(2);
  if (!out) return nullptr;
  PyTuple_SET_ITEM(out, 0, THPVariable_Wrap(std::move(h_new)));
  PyTuple_SET_ITEM(out, 1, THPVariable_Wrap(std::move(c_new)));
  return out;
  END_HANDLE_TH_ERRORS
}

// cell_step_reason(same arguments): None if cell_step would run the step, else why it answers NotImplemented.
PyObject* cell_step_reason(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  DirectStep d;
  const char* why = read_direct(args, nargs, d);
  if (PyErr_Occurred()) return nullptr;
  if (!why) Py_RETURN_NONE;
  return PyUnicode_FromString(why);
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"cell_step", (PyCFunction)(void (*)(void))cell_step, METH_FASTCALL,
     "cell_step(kind, input, hx, params, input_size, hidden_size): one plain inference step, or NotImplemented"},
    {"cell_step_reason", (PyCFunction)(void (*)(void))cell_step_reason, METH_FASTCALL,
     "cell_step_reason(same arguments): None if cell_step would run the step, else why not"},
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
  return PyModule_Create(&module_def);
}
#endif  // TORCH_EXTENSION_NAME
