// rnnkit's fused CPU kernels: whole-sequence RNN (tanh/relu), LSTM (with and
// without a projection), GRU, peephole LSTM, LayerNorm LSTM and IndRNN (tanh/relu), forward and hand-written backward (BPTT),
// plus inference single-step cells. One translation unit on purpose: compile
// time is paid by every fresh install and CI run.
//
// Layout (shape legend as in rnnkit/spec.py): time-major, contiguous.
//   xp     (L, N, G)  input projection of every step, done by the caller in one
//                     GEMM (W_ih x + b_ih, plus b_hh for RNN/LSTM)
//   w_hh   (G, H_out) recurrent weights, row-major as torch.nn stores them
//   out    (L, N, H_out)  h_t for every t
// Lengths: row n is live for t < lengths[n]; past it the state is held, so
// out[t, n] = h at step lengths[n]-1 and the final state is that state. This is
// exactly rnnkit.runner.reference_scan's semantics (the oracle).
//
// Inside the time loop: one BLAS call for the recurrent product (no ATen
// dispatch, no allocation), then vectorized gate math over rows, in parallel
// (at::parallel_for) when the batch is large enough to pay for it.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <tuple>

extern "C" {
// Fortran BLAS as exported by libtorch_cpu (MKL or OpenBLAS). Weak: if this
// libtorch does not export them, the kernels fall back to at::mm on views.
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
// MKL's packed GEMM: the recurrent weights are packed once per sequence and
// every step's product reuses them (plain sgemm re-packs them on every call).
// Weak too: with another BLAS the kernels use plain gemm.
size_t cblas_sgemm_pack_get_size(int, int, int, int) __attribute__((weak));
void cblas_sgemm_pack(int, int, int, int, int, int, float, const float*, int, float*) __attribute__((weak));
void cblas_sgemm_compute(int, int, int, int, int, int, const float*, int, const float*, int, float, float*, int)
    __attribute__((weak));
size_t cblas_dgemm_pack_get_size(int, int, int, int) __attribute__((weak));
void cblas_dgemm_pack(int, int, int, int, int, int, double, const double*, int, double*) __attribute__((weak));
void cblas_dgemm_compute(int, int, int, int, int, int, const double*, int, const double*, int, double, double*, int)
    __attribute__((weak));
}

namespace rnnkit_fused {
namespace {

using at::Tensor;
template <typename T>
using Vec = at::vec::Vectorized<T>;

// ---------------------------------------------------------------- BLAS

inline void blas(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
                 int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void blas(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b,
                 int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline bool have_blas(float*) { return sgemm_ != nullptr; }
inline bool have_blas(double*) { return dgemm_ != nullptr; }

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;
inline bool have_packed(float*) {
  return cblas_sgemm_pack_get_size && cblas_sgemm_pack && cblas_sgemm_compute;
}
inline bool have_packed(double*) {
  return cblas_dgemm_pack_get_size && cblas_dgemm_pack && cblas_dgemm_compute;
}
inline size_t pack_size(float*, int m, int n, int k) { return cblas_sgemm_pack_get_size(kBMatrix, m, n, k); }
inline size_t pack_size(double*, int m, int n, int k) { return cblas_dgemm_pack_get_size(kBMatrix, m, n, k); }
inline void pack(int trans, int m, int n, int k, const float* b, int ldb, float* dst) {
  cblas_sgemm_pack(kRowMajor, kBMatrix, trans, m, n, k, 1.f, b, ldb, dst);
}
inline void pack(int trans, int m, int n, int k, const double* b, int ldb, double* dst) {
  cblas_dgemm_pack(kRowMajor, kBMatrix, trans, m, n, k, 1.0, b, ldb, dst);
}
inline void packed_compute(int m, int n, int k, const float* a, int lda, const float* bp, float beta, float* c, int ldc) {
  cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, m, n, k, a, lda, bp, n, beta, c, ldc);
}
inline void packed_compute(int m, int n, int k, const double* a, int lda, const double* bp, double beta, double* c,
                           int ldc) {
  cblas_dgemm_compute(kRowMajor, kNoTrans, kPacked, m, n, k, a, lda, bp, n, beta, c, ldc);
}

template <typename T>
Tensor view_of(const T* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// Few rows (a batch of 1 to 3): a register-blocked kernel beats BLAS, whose
// call and packing overhead dominates a matrix-vector product of this size.
constexpr int64_t kSmallRows = 4;

// C (rows x cols) = beta * C + A (rows x k) * B, B is (k x cols) row-major; beta 0 or 1.
template <typename T>
void small_gemm_ab(int64_t rows, int64_t cols, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb, T beta,
                   T* C, int64_t ldc) {
  using V = Vec<T>;
  constexpr int64_t VS = V::size();
  for (int64_t r = 0; r < rows; ++r) {
    const T* a = A + r * lda;
    T* c = C + r * ldc;
    int64_t j = 0;
    for (; j + 4 * VS <= cols; j += 4 * VS) {
      V c0(T(0)), c1(T(0)), c2(T(0)), c3(T(0));
      if (beta != T(0)) {
        c0 = V::loadu(c + j), c1 = V::loadu(c + j + VS), c2 = V::loadu(c + j + 2 * VS), c3 = V::loadu(c + j + 3 * VS);
      }
      const T* b = B + j;
      for (int64_t kk = 0; kk < k; ++kk, b += ldb) {
        const V av(a[kk]);
        c0 = at::vec::fmadd(av, V::loadu(b), c0);
        c1 = at::vec::fmadd(av, V::loadu(b + VS), c1);
        c2 = at::vec::fmadd(av, V::loadu(b + 2 * VS), c2);
        c3 = at::vec::fmadd(av, V::loadu(b + 3 * VS), c3);
      }
      c0.store(c + j), c1.store(c + j + VS), c2.store(c + j + 2 * VS), c3.store(c + j + 3 * VS);
    }
    for (; j < cols; j += VS) {
      const int64_t cnt = std::min(VS, cols - j);
      V c0 = beta != T(0) ? V::loadu(c + j, cnt) : V(T(0));
      const T* b = B + j;
      for (int64_t kk = 0; kk < k; ++kk, b += ldb) c0 = at::vec::fmadd(V(a[kk]), V::loadu(b, cnt), c0);
      c0.store(c + j, cnt);
    }
  }
}

// C (rows x cols) = beta * C + A (rows x k) * B^T, B is (cols x k); all row-major.
template <typename T>
void gemm_abt(int64_t rows, int64_t cols, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C,
              int64_t ldc) {
  if (rows == 0 || cols == 0) return;
  if (k == 0) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) C[r * ldc + j] = beta == T(0) ? T(0) : beta * C[r * ldc + j];
    return;
  }
  if (have_blas(C)) {
    // row-major C = A B^T  <=>  column-major C^T = B A^T
    blas('T', 'N', (int)cols, (int)rows, (int)k, T(1), B, (int)ldb, A, (int)lda, beta, C, (int)ldc);
  } else {
    Tensor c = view_of(C, rows, cols, ldc);
    if (beta == T(0)) at::mm_out(c, view_of(A, rows, k, lda), view_of(B, cols, k, ldb).t());
    else c.addmm_(view_of(A, rows, k, lda), view_of(B, cols, k, ldb).t(), beta, 1);
  }
}

// C (rows x cols) = beta * C + A (rows x k) * B, B is (k x cols); all row-major.
template <typename T>
void gemm_ab(int64_t rows, int64_t cols, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C,
             int64_t ldc) {
  if (rows == 0 || cols == 0) return;
  if (rows < kSmallRows && k > 0 && (beta == T(0) || beta == T(1))) {
    small_gemm_ab(rows, cols, k, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  if (k == 0) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) C[r * ldc + j] = beta == T(0) ? T(0) : beta * C[r * ldc + j];
    return;
  }
  if (have_blas(C)) {
    blas('N', 'N', (int)cols, (int)rows, (int)k, T(1), B, (int)ldb, A, (int)lda, beta, C, (int)ldc);
  } else {
    Tensor c = view_of(C, rows, cols, ldc);
    if (beta == T(0)) at::mm_out(c, view_of(A, rows, k, lda), view_of(B, k, cols, ldb));
    else c.addmm_(view_of(A, rows, k, lda), view_of(B, k, cols, ldb), beta, 1);
  }
}

// ---------------------------------------------------------------- helpers

// Gate activations. float64 uses Sleef's 1-ulp exp/tanh (parity to 1e-10);
// float32 uses at::vec's exp_u20 (about 20 ulp, a few times faster), which
// keeps float32 within 1e-6 of torch.nn: the tests' tolerance is 1e-5.
template <typename T>
inline Vec<T> vsigmoid(const Vec<T>& x) {
  const Vec<T> one(T(1));
  return one / (one + x.neg().exp());
}
template <>
inline Vec<float> vsigmoid(const Vec<float>& x) {
  const Vec<float> one(1.f);
  return one / (one + x.neg().exp_u20());
}
template <typename T>
inline Vec<T> vtanh(const Vec<T>& x) { return x.tanh(); }
template <>
inline Vec<float> vtanh(const Vec<float>& x) {
  // tanh(x) = 2 / (1 + exp(-2x)) - 1; saturates correctly at +-inf of exp
  const Vec<float> one(1.f), two(2.f);
  return two / (one + (x * Vec<float>(-2.f)).exp_u20()) - one;
}

// Rows per parallel chunk: parallelise only when a chunk holds enough work
// (about 16k elements) to pay for waking the thread pool.
inline int64_t row_grain(int64_t per_row) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(per_row, 1)); }

template <typename T>
inline void copy_row(T* dst, const T* src, int64_t n) { std::memcpy(dst, src, sizeof(T) * n); }

template <typename T>
inline void zero_row(T* dst, int64_t n) { std::memset(dst, 0, sizeof(T) * n); }

template <typename T>
void add_into(T* dst, const T* src, int64_t n) {
  constexpr int64_t VS = Vec<T>::size();
  int64_t j = 0;
  for (; j + VS <= n; j += VS) (Vec<T>::loadu(dst + j) + Vec<T>::loadu(src + j)).store(dst + j);
  for (; j < n; ++j) dst[j] += src[j];
}

inline int64_t min_length(const int64_t* len, int64_t N, int64_t L) {
  if (!len) return L;
  int64_t m = L;
  for (int64_t n = 0; n < N; ++n) m = std::min(m, len[n]);
  return std::max<int64_t>(m, 0);
}

const int64_t* lengths_ptr(const std::optional<Tensor>& lengths, int64_t N, Tensor& keep) {
  if (!lengths.has_value() || !lengths->defined()) return nullptr;
  TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == N, "rnnkit_fused: lengths must be (N,) = (", N,
              ",), got ", lengths->sizes());
  keep = lengths->to(at::kCPU, at::kLong).contiguous();
  return keep.data_ptr<int64_t>();
}

void check_seq(const Tensor& xp, const char* op, int64_t G) {
  TORCH_CHECK(xp.dim() == 3, "rnnkit_fused::", op, ": xp must be (L, N, G), got ", xp.sizes());
  TORCH_CHECK(xp.size(2) == G, "rnnkit_fused::", op, ": xp's last axis must be G = ", G, ", got ", xp.size(2));
  TORCH_CHECK(xp.scalar_type() == at::kFloat || xp.scalar_type() == at::kDouble, "rnnkit_fused::", op,
              ": float32 or float64 only, got ", xp.scalar_type());
}

void check_same(const Tensor& ref, const Tensor& t, const char* what, at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "rnnkit_fused: ", what, " has dtype ", t.scalar_type(),
              ", expected ", ref.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "rnnkit_fused: ", what, " has shape ", t.sizes(), ", expected ", shape);
}

// The recurrent product of one step, C (rows x cols) = beta C + A (rows x k) op(B),
// with B (a weight) laid out once before the time loop: transposed for the
// few-rows kernel, packed for MKL, or left as is for plain BLAS.
template <typename T>
struct Recurrent {
  int64_t rows, cols, k;
  bool trans;  // op(B) = B^T, B is (cols x k); else op(B) = B, B is (k x cols)
  const T* B;
  Tensor keep;      // the laid-out copy
  const T* small = nullptr;   // (k x cols) for the few-rows kernel
  const T* packed = nullptr;  // MKL packed B

  Recurrent(int64_t rows_, int64_t cols_, int64_t k_, bool trans_, const Tensor& w)
      : rows(rows_), cols(cols_), k(k_), trans(trans_), B(w.data_ptr<T>()) {
    if (rows == 0 || cols == 0 || k == 0) return;
    if (rows < kSmallRows) {
      if (trans) {
        keep = w.t().contiguous();
        small = keep.data_ptr<T>();
      } else {
        small = B;
      }
    } else if (have_packed((T*)nullptr)) {
      const size_t bytes = pack_size((T*)nullptr, (int)rows, (int)cols, (int)k);
      keep = at::empty({(int64_t)(bytes / sizeof(T) + 1)}, w.options());
      pack(trans ? kTrans : kNoTrans, (int)rows, (int)cols, (int)k, B, (int)(trans ? k : cols), keep.data_ptr<T>());
      packed = keep.data_ptr<T>();
    }
  }

  void operator()(const T* A, int64_t lda, T beta, T* C, int64_t ldc) const {
    if (rows == 0 || cols == 0) return;
    if (small && k > 0) small_gemm_ab(rows, cols, k, A, lda, small, cols, beta, C, ldc);
    else if (packed) packed_compute((int)rows, (int)cols, (int)k, A, (int)lda, packed, beta, C, (int)ldc);
    else if (trans) gemm_abt(rows, cols, k, A, lda, B, k, beta, C, ldc);
    else gemm_ab(rows, cols, k, A, lda, B, cols, beta, C, ldc);
  }
};

// h_{t-1} for every t: (L, N, H_out), the rows the recurrent weight gradient reads.
Tensor previous_states(const Tensor& h0, const Tensor& out) {
  const int64_t L = out.size(0);
  if (L == 0) return out;
  return at::cat({h0.unsqueeze(0), out.narrow(0, 0, L - 1)}, 0);
}

// grad_w (G, K) = sum_t dG_t^T X_t, one GEMM over all steps
Tensor weight_grad(const Tensor& dG, const Tensor& X) {
  const int64_t G = dG.size(2), K = X.size(2);
  return dG.reshape({-1, G}).t().mm(X.reshape({-1, K}));
}

// ================================================================ RNN (tanh / relu)

// a + b (b may be null: a alone), the pre-activation of a gate from its
// recurrent part (the step's product) and its input part (xp).
template <typename T>
inline Vec<T> load_sum(const T* a, const T* b, int64_t j, int64_t cnt) {
  return b ? Vec<T>::loadu(a + j, cnt) + Vec<T>::loadu(b + j, cnt) : Vec<T>::loadu(a + j, cnt);
}

template <typename T>
inline void rnn_act_row(T* h, const T* x, int64_t H, int64_t act) {
  constexpr int64_t VS = Vec<T>::size();
  const Vec<T> zero(T(0));
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    Vec<T> v = load_sum(h, x, j, cnt);
    v = act == 0 ? vtanh(v) : at::vec::maximum(v, zero);
    v.store(h + j, cnt);
  }
}

template <typename T>
inline void rnn_grad_row(const T* dh, const T* h, T* dpre, int64_t H, int64_t act) {
  constexpr int64_t VS = Vec<T>::size();
  const Vec<T> one(T(1)), zero(T(0));
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    Vec<T> d = Vec<T>::loadu(dh + j, cnt), y = Vec<T>::loadu(h + j, cnt);
    Vec<T> r = act == 0 ? d * (one - y * y) : Vec<T>::blendv(zero, d, y > zero);
    r.store(dpre + j, cnt);
  }
}

std::tuple<Tensor, Tensor> rnn_fwd(const Tensor& xp_, const Tensor& w_hh_, const Tensor& h0_,
                                   const std::optional<Tensor>& lengths, int64_t act) {
  const int64_t H = w_hh_.size(1);
  check_seq(xp_, "rnn_fwd", H);
  TORCH_CHECK(act == 0 || act == 1, "rnnkit_fused::rnn_fwd: act must be 0 (tanh) or 1 (relu), got ", act);
  const int64_t L = xp_.size(0), N = xp_.size(1);
  Tensor xp = xp_.contiguous(), w_hh = w_hh_.contiguous(), h0 = h0_.contiguous();
  check_same(xp, w_hh, "w_hh", {H, H});
  check_same(xp, h0, "h0", {N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor out = at::empty({L, N, H}, xp.options());
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "rnn_fwd", [&] {
    using T = scalar_t;
    const Recurrent<T> rec(N, H, H, true, w_hh);
    const T *x = xp.data_ptr<T>(), *h_init = h0.data_ptr<T>();
    T* o = out.data_ptr<T>();
    const int64_t min_len = min_length(len, N, L), grain = row_grain(H);
    for (int64_t t = 0; t < L; ++t) {
      const T* hp = t == 0 ? h_init : o + (t - 1) * N * H;
      T* ot = o + t * N * H;
      rec(hp, H, T(0), ot, H);
      const T* xt = x + t * N * H;
      const bool check = len && t >= min_len;
      at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          if (check && t >= len[n]) copy_row(ot + n * H, hp + n * H, H);
          else rnn_act_row(ot + n * H, xt + n * H, H, act);
        }
      });
    }
  });
  Tensor h_n = L > 0 ? out[L - 1].clone() : h0.clone();
  return {out, h_n};
}

std::tuple<Tensor, Tensor, Tensor> rnn_bwd(const Tensor& grad_out_, const Tensor& grad_hn_, const Tensor& w_hh_,
                                           const Tensor& h0_, const std::optional<Tensor>& lengths,
                                           const Tensor& out_, int64_t act) {
  const int64_t L = out_.size(0), N = out_.size(1), H = out_.size(2);
  Tensor grad_out = grad_out_.contiguous(), grad_hn = grad_hn_.contiguous(), w_hh = w_hh_.contiguous(),
         h0 = h0_.contiguous(), out = out_.contiguous();
  check_same(out, grad_out, "grad_out", out.sizes());
  check_same(out, grad_hn, "grad_h_n", {N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor dxp = at::empty({L, N, H}, out.options());
  Tensor dh_a = grad_hn.clone(), dh_b = at::empty({N, H}, out.options());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "rnn_bwd", [&] {
    using T = scalar_t;
    const Recurrent<T> rec(N, H, H, false, w_hh);
    const T *go = grad_out.data_ptr<T>(), *o = out.data_ptr<T>();
    T *dx = dxp.data_ptr<T>(), *dh = dh_a.data_ptr<T>(), *dn = dh_b.data_ptr<T>();
    const int64_t min_len = min_length(len, N, L), grain = row_grain(H);
    for (int64_t t = L - 1; t >= 0; --t) {
      add_into(dh, go + t * N * H, N * H);
      const T* ht = o + t * N * H;
      T* dxt = dx + t * N * H;
      const bool check = len && t >= min_len;
      at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          if (check && t >= len[n]) {
            zero_row(dxt + n * H, H);
            copy_row(dn + n * H, dh + n * H, H);
          } else {
            rnn_grad_row(dh + n * H, ht + n * H, dxt + n * H, H, act);
            zero_row(dn + n * H, H);
          }
        }
      });
      rec(dxt, H, T(1), dn, H);
      std::swap(dh, dn);
    }
    if (dh != dh_a.data_ptr<T>()) std::swap(dh_a, dh_b);
  });
  Tensor grad_w = weight_grad(dxp, previous_states(h0, out));
  return {dxp, grad_w, dh_a};
}

// ================================================================ LSTM

template <typename T>
inline void lstm_row(T* g, const T* x, const T* cp, T* c, T* m, int64_t H) {
  constexpr int64_t VS = Vec<T>::size();
  const T *x1 = x ? x + H : nullptr, *x2 = x ? x + 2 * H : nullptr, *x3 = x ? x + 3 * H : nullptr;
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    Vec<T> i = vsigmoid(load_sum(g, x, j, cnt));
    Vec<T> f = vsigmoid(load_sum(g + H, x1, j, cnt));
    Vec<T> gg = vtanh(load_sum(g + 2 * H, x2, j, cnt));
    Vec<T> o = vsigmoid(load_sum(g + 3 * H, x3, j, cnt));
    Vec<T> cn = f * Vec<T>::loadu(cp + j, cnt) + i * gg;
    i.store(g + j, cnt);
    f.store(g + H + j, cnt);
    gg.store(g + 2 * H + j, cnt);
    o.store(g + 3 * H + j, cnt);
    cn.store(c + j, cnt);
    (o * vtanh(cn)).store(m + j, cnt);
  }
}

template <typename T>
inline void lstm_grad_row(const T* g, const T* cp, const T* c, const T* dm, T* dc, T* dg, int64_t H) {
  constexpr int64_t VS = Vec<T>::size();
  const Vec<T> one(T(1));
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    Vec<T> i = Vec<T>::loadu(g + j, cnt), f = Vec<T>::loadu(g + H + j, cnt);
    Vec<T> gg = Vec<T>::loadu(g + 2 * H + j, cnt), o = Vec<T>::loadu(g + 3 * H + j, cnt);
    Vec<T> tc = vtanh(Vec<T>::loadu(c + j, cnt));
    Vec<T> d = Vec<T>::loadu(dm + j, cnt);
    Vec<T> dct = Vec<T>::loadu(dc + j, cnt) + d * o * (one - tc * tc);
    (dct * gg * i * (one - i)).store(dg + j, cnt);
    (dct * Vec<T>::loadu(cp + j, cnt) * f * (one - f)).store(dg + H + j, cnt);
    (dct * i * (one - gg * gg)).store(dg + 2 * H + j, cnt);
    (d * tc * o * (one - o)).store(dg + 3 * H + j, cnt);
    (dct * f).store(dc + j, cnt);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_fwd(const Tensor& xp_, const Tensor& w_hh_,
                                                                    const std::optional<Tensor>& w_hr_,
                                                                    const Tensor& h0_, const Tensor& c0_,
                                                                    const std::optional<Tensor>& lengths) {
  TORCH_CHECK(w_hh_.dim() == 2 && w_hh_.size(0) % 4 == 0, "rnnkit_fused::lstm_fwd: w_hh must be (4H, H_out), got ",
              w_hh_.sizes());
  const int64_t H = w_hh_.size(0) / 4, P = w_hh_.size(1), G = 4 * H;
  check_seq(xp_, "lstm_fwd", G);
  const int64_t L = xp_.size(0), N = xp_.size(1);
  const bool proj = w_hr_.has_value() && w_hr_->defined();
  Tensor xp = xp_.contiguous(), w_hh = w_hh_.contiguous(), h0 = h0_.contiguous(), c0 = c0_.contiguous();
  Tensor w_hr = proj ? w_hr_->contiguous() : Tensor();
  if (proj) check_same(xp, w_hr, "w_hr", {P, H});
  else TORCH_CHECK(P == H, "rnnkit_fused::lstm_fwd: without w_hr, w_hh must be (4H, H), got ", w_hh.sizes());
  check_same(xp, h0, "h0", {N, P});
  check_same(xp, c0, "c0", {N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor out = at::empty({L, N, P}, xp.options());
  Tensor gates = at::empty({L, N, G}, xp.options());
  Tensor cs = at::empty({L, N, H}, xp.options());
  Tensor ms = proj ? at::empty({L, N, H}, xp.options()) : at::empty({0}, xp.options());
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "lstm_fwd", [&] {
    using T = scalar_t;
    const Recurrent<T> rec(N, G, P, true, w_hh);
    const Recurrent<T> rec_r(proj ? N : 0, P, H, true, proj ? w_hr : w_hh);
    const T* x = xp.data_ptr<T>();
    const T *h_init = h0.data_ptr<T>(), *c_init = c0.data_ptr<T>();
    T *o = out.data_ptr<T>(), *gs = gates.data_ptr<T>(), *c = cs.data_ptr<T>(), *m = proj ? ms.data_ptr<T>() : nullptr;
    const int64_t min_len = min_length(len, N, L), grain = row_grain(G);
    for (int64_t t = 0; t < L; ++t) {
      const T* hp = t == 0 ? h_init : o + (t - 1) * N * P;
      const T* cp = t == 0 ? c_init : c + (t - 1) * N * H;
      T* gt = gs + t * N * G;
      T* ct = c + t * N * H;
      T* ot = o + t * N * P;
      T* mt = proj ? m + t * N * H : ot;
      rec(hp, P, T(0), gt, G);
      const T* xt = x + t * N * G;
      const bool check = len && t >= min_len;
      at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          if (check && t >= len[n]) {
            copy_row(ct + n * H, cp + n * H, H);
            if (proj) zero_row(mt + n * H, H);
            else copy_row(ot + n * H, hp + n * H, H);
          } else {
            lstm_row(gt + n * G, xt + n * G, cp + n * H, ct + n * H, mt + n * H, H);
          }
        }
      });
      if (proj) {
        rec_r(mt, H, T(0), ot, P);
        if (check)
          for (int64_t n = 0; n < N; ++n)
            if (t >= len[n]) copy_row(ot + n * P, hp + n * P, P);
      }
    }
  });
  Tensor h_n = L > 0 ? out[L - 1].clone() : h0.clone();
  Tensor c_n = L > 0 ? cs[L - 1].clone() : c0.clone();
  return {out, h_n, c_n, gates, cs, ms};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_bwd(
    const Tensor& grad_out_, const Tensor& grad_hn_, const Tensor& grad_cn_, const Tensor& w_hh_,
    const std::optional<Tensor>& w_hr_, const Tensor& h0_, const Tensor& c0_, const std::optional<Tensor>& lengths,
    const Tensor& out_, const Tensor& gates_, const Tensor& cs_, const Tensor& ms_) {
  const int64_t L = out_.size(0), N = out_.size(1), P = out_.size(2), H = cs_.size(2), G = 4 * H;
  const bool proj = w_hr_.has_value() && w_hr_->defined();
  Tensor grad_out = grad_out_.contiguous(), grad_hn = grad_hn_.contiguous(), grad_cn = grad_cn_.contiguous();
  Tensor w_hh = w_hh_.contiguous(), h0 = h0_.contiguous(), c0 = c0_.contiguous(), out = out_.contiguous();
  Tensor gates = gates_.contiguous(), cs = cs_.contiguous(), ms = ms_.contiguous();
  Tensor w_hr = proj ? w_hr_->contiguous() : Tensor();
  check_same(out, grad_out, "grad_out", out.sizes());
  check_same(out, grad_hn, "grad_h_n", {N, P});
  check_same(out, grad_cn, "grad_c_n", {N, H});
  check_same(out, gates, "gates", {L, N, G});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor dG = at::empty({L, N, G}, out.options());
  Tensor dHall = proj ? at::empty({L, N, P}, out.options()) : Tensor();
  Tensor dm_buf = proj ? at::empty({N, H}, out.options()) : Tensor();
  Tensor dh_a = grad_hn.clone(), dh_b = at::empty({N, P}, out.options()), dc = grad_cn.clone();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "lstm_bwd", [&] {
    using T = scalar_t;
    const Recurrent<T> rec(N, P, G, false, w_hh);
    const Recurrent<T> rec_r(proj ? N : 0, H, P, false, proj ? w_hr : w_hh);
    const T* go = grad_out.data_ptr<T>();
    const T *gs = gates.data_ptr<T>(), *c = cs.data_ptr<T>(), *c_init = c0.data_ptr<T>();
    T *dg = dG.data_ptr<T>(), *dh = dh_a.data_ptr<T>(), *dn = dh_b.data_ptr<T>(), *dcp = dc.data_ptr<T>();
    T *dm = proj ? dm_buf.data_ptr<T>() : nullptr, *dha = proj ? dHall.data_ptr<T>() : nullptr;
    const int64_t min_len = min_length(len, N, L), grain = row_grain(G);
    for (int64_t t = L - 1; t >= 0; --t) {
      add_into(dh, go + t * N * P, N * P);
      const T* cp = t == 0 ? c_init : c + (t - 1) * N * H;
      const T* gt = gs + t * N * G;
      const T* ct = c + t * N * H;
      T* dgt = dg + t * N * G;
      const T* dmt = dh;
      if (proj) {
        rec_r(dh, P, T(0), dm, H);
        copy_row(dha + t * N * P, dh, N * P);
        dmt = dm;
      }
      const bool check = len && t >= min_len;
      at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          if (check && t >= len[n]) {
            zero_row(dgt + n * G, G);
            copy_row(dn + n * P, dh + n * P, P);
            if (proj) zero_row(dha + (t * N + n) * P, P);
          } else {
            lstm_grad_row(gt + n * G, cp + n * H, ct + n * H, dmt + n * H, dcp + n * H, dgt + n * G, H);
            zero_row(dn + n * P, P);
          }
        }
      });
      rec(dgt, G, T(1), dn, P);
      std::swap(dh, dn);
    }
    if (dh != dh_a.data_ptr<T>()) std::swap(dh_a, dh_b);
  });
  Tensor grad_w_hh = weight_grad(dG, previous_states(h0, out));
  Tensor grad_w_hr = proj ? weight_grad(dHall, ms) : at::empty({0}, out.options());
  return {dG, grad_w_hh, grad_w_hr, dh_a, dc};
}

// ================================================================ GRU

template <typename T>
inline void gru_row(const T* x, const T* hh, const T* bh, const T* hp, T* rzn, T* hn, T* h, int64_t H) {
  constexpr int64_t VS = Vec<T>::size();
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    Vec<T> r = vsigmoid(Vec<T>::loadu(x + j, cnt) + Vec<T>::loadu(hh + j, cnt) + Vec<T>::loadu(bh + j, cnt));
    Vec<T> z = vsigmoid(Vec<T>::loadu(x + H + j, cnt) + Vec<T>::loadu(hh + H + j, cnt) +
                        Vec<T>::loadu(bh + H + j, cnt));
    Vec<T> hnb = Vec<T>::loadu(hh + 2 * H + j, cnt) + Vec<T>::loadu(bh + 2 * H + j, cnt);
    Vec<T> nn = vtanh((Vec<T>::loadu(x + 2 * H + j, cnt) + r * hnb));
    Vec<T> hprev = Vec<T>::loadu(hp + j, cnt);
    r.store(rzn + j, cnt);
    z.store(rzn + H + j, cnt);
    nn.store(rzn + 2 * H + j, cnt);
    hnb.store(hn + j, cnt);
    (nn + z * (hprev - nn)).store(h + j, cnt);
  }
}

template <typename T>
inline void gru_grad_row(const T* rzn, const T* hn, const T* hp, const T* dh, T* dx, T* dhh, T* dnext, int64_t H) {
  constexpr int64_t VS = Vec<T>::size();
  const Vec<T> one(T(1));
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    Vec<T> r = Vec<T>::loadu(rzn + j, cnt), z = Vec<T>::loadu(rzn + H + j, cnt);
    Vec<T> nn = Vec<T>::loadu(rzn + 2 * H + j, cnt), d = Vec<T>::loadu(dh + j, cnt);
    Vec<T> dn_pre = d * (one - z) * (one - nn * nn);
    Vec<T> dz_pre = d * (Vec<T>::loadu(hp + j, cnt) - nn) * z * (one - z);
    Vec<T> dr_pre = dn_pre * Vec<T>::loadu(hn + j, cnt) * r * (one - r);
    dr_pre.store(dx + j, cnt);
    dz_pre.store(dx + H + j, cnt);
    dn_pre.store(dx + 2 * H + j, cnt);
    dr_pre.store(dhh + j, cnt);
    dz_pre.store(dhh + H + j, cnt);
    (dn_pre * r).store(dhh + 2 * H + j, cnt);
    (d * z).store(dnext + j, cnt);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gru_fwd(const Tensor& xp_, const Tensor& w_hh_,
                                                   const std::optional<Tensor>& b_hh_, const Tensor& h0_,
                                                   const std::optional<Tensor>& lengths) {
  TORCH_CHECK(w_hh_.dim() == 2 && w_hh_.size(0) == 3 * w_hh_.size(1),
              "rnnkit_fused::gru_fwd: w_hh must be (3H, H), got ", w_hh_.sizes());
  const int64_t H = w_hh_.size(1), G = 3 * H;
  check_seq(xp_, "gru_fwd", G);
  const int64_t L = xp_.size(0), N = xp_.size(1);
  Tensor xp = xp_.contiguous(), w_hh = w_hh_.contiguous(), h0 = h0_.contiguous();
  Tensor b_hh = (b_hh_.has_value() && b_hh_->defined()) ? b_hh_->contiguous() : at::zeros({G}, xp.options());
  check_same(xp, b_hh, "b_hh", {G});
  check_same(xp, h0, "h0", {N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor out = at::empty({L, N, H}, xp.options());
  Tensor rzn = at::empty({L, N, G}, xp.options());
  Tensor hns = at::empty({L, N, H}, xp.options());
  Tensor hh = at::empty({N, G}, xp.options());
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "gru_fwd", [&] {
    using T = scalar_t;
    const Recurrent<T> rec(N, G, H, true, w_hh);
    const T *x = xp.data_ptr<T>(), *bh = b_hh.data_ptr<T>(), *h_init = h0.data_ptr<T>();
    T *o = out.data_ptr<T>(), *rz = rzn.data_ptr<T>(), *hn = hns.data_ptr<T>(), *hb = hh.data_ptr<T>();
    const int64_t min_len = min_length(len, N, L), grain = row_grain(G);
    for (int64_t t = 0; t < L; ++t) {
      const T* hp = t == 0 ? h_init : o + (t - 1) * N * H;
      rec(hp, H, T(0), hb, G);
      const T* xt = x + t * N * G;
      T *rzt = rz + t * N * G, *hnt = hn + t * N * H, *ot = o + t * N * H;
      const bool check = len && t >= min_len;
      at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          if (check && t >= len[n]) {  // held: the saved gates are unused, zeroed to stay deterministic
            copy_row(ot + n * H, hp + n * H, H);
            zero_row(rzt + n * G, G);
            zero_row(hnt + n * H, H);
          } else gru_row(xt + n * G, hb + n * G, bh, hp + n * H, rzt + n * G, hnt + n * H, ot + n * H, H);
        }
      });
    }
  });
  Tensor h_n = L > 0 ? out[L - 1].clone() : h0.clone();
  return {out, h_n, rzn, hns};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gru_bwd(const Tensor& grad_out_, const Tensor& grad_hn_,
                                                   const Tensor& w_hh_, const Tensor& h0_,
                                                   const std::optional<Tensor>& lengths, const Tensor& out_,
                                                   const Tensor& rzn_, const Tensor& hns_) {
  const int64_t L = out_.size(0), N = out_.size(1), H = out_.size(2), G = 3 * H;
  Tensor grad_out = grad_out_.contiguous(), grad_hn = grad_hn_.contiguous(), w_hh = w_hh_.contiguous();
  Tensor h0 = h0_.contiguous(), out = out_.contiguous(), rzn = rzn_.contiguous(), hns = hns_.contiguous();
  check_same(out, grad_out, "grad_out", out.sizes());
  check_same(out, grad_hn, "grad_h_n", {N, H});
  check_same(out, rzn, "rzn", {L, N, G});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor dxp = at::empty({L, N, G}, out.options());
  Tensor dhh = at::empty({L, N, G}, out.options());
  Tensor dh_a = grad_hn.clone(), dh_b = at::empty({N, H}, out.options());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "gru_bwd", [&] {
    using T = scalar_t;
    const Recurrent<T> rec(N, H, G, false, w_hh);
    const T *go = grad_out.data_ptr<T>(), *o = out.data_ptr<T>();
    const T *rz = rzn.data_ptr<T>(), *hn = hns.data_ptr<T>(), *h_init = h0.data_ptr<T>();
    T *dx = dxp.data_ptr<T>(), *dhp = dhh.data_ptr<T>(), *dh = dh_a.data_ptr<T>(), *dn = dh_b.data_ptr<T>();
    const int64_t min_len = min_length(len, N, L), grain = row_grain(G);
    for (int64_t t = L - 1; t >= 0; --t) {
      add_into(dh, go + t * N * H, N * H);
      const T* hp = t == 0 ? h_init : o + (t - 1) * N * H;
      const T *rzt = rz + t * N * G, *hnt = hn + t * N * H;
      T *dxt = dx + t * N * G, *dht = dhp + t * N * G;
      const bool check = len && t >= min_len;
      at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          if (check && t >= len[n]) {
            zero_row(dxt + n * G, G);
            zero_row(dht + n * G, G);
            copy_row(dn + n * H, dh + n * H, H);
          } else {
            gru_grad_row(rzt + n * G, hnt + n * H, hp + n * H, dh + n * H, dxt + n * G, dht + n * G, dn + n * H, H);
          }
        }
      });
      rec(dht, G, T(1), dn, H);
      std::swap(dh, dn);
    }
    if (dh != dh_a.data_ptr<T>()) std::swap(dh_a, dh_b);
  });
  Tensor grad_w_hh = weight_grad(dhh, previous_states(h0, out));
  Tensor grad_b_hh = dhh.sum(at::IntArrayRef{0, 1});
  return {dxp, grad_w_hh, grad_b_hh, dh_a};
}

// ================================================================ peephole LSTM

// i = σ(a_i + w_ci c_{t-1}), f = σ(a_f + w_cf c_{t-1}), g = tanh(a_g), c_t = f c_{t-1} + i g,
// o = σ(a_o + w_co c_t), h_t = o tanh(c_t); a = xp + h_{t-1} W_hh^T (in g on entry).
// On exit g holds (i, f, g, o), the gate activations the backward reads.
template <typename T>
inline void peephole_row(T* g, const T* x, const T* wci, const T* wcf, const T* wco, const T* cp, T* c, T* h,
                         int64_t H) {
  constexpr int64_t VS = Vec<T>::size();
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    const Vec<T> cpv = Vec<T>::loadu(cp + j, cnt);
    Vec<T> i = vsigmoid(load_sum(g, x, j, cnt) + Vec<T>::loadu(wci + j, cnt) * cpv);
    Vec<T> f = vsigmoid(load_sum(g + H, x + H, j, cnt) + Vec<T>::loadu(wcf + j, cnt) * cpv);
    Vec<T> gg = vtanh(load_sum(g + 2 * H, x + 2 * H, j, cnt));
    Vec<T> cn = f * cpv + i * gg;
    Vec<T> o = vsigmoid(load_sum(g + 3 * H, x + 3 * H, j, cnt) + Vec<T>::loadu(wco + j, cnt) * cn);
    i.store(g + j, cnt);
    f.store(g + H + j, cnt);
    gg.store(g + 2 * H + j, cnt);
    o.store(g + 3 * H + j, cnt);
    cn.store(c + j, cnt);
    (o * vtanh(cn)).store(h + j, cnt);
  }
}

// dm: dL/dh_t; dc: dL/dc_t from later steps on entry, dL/dc_{t-1} on exit;
// dg: the pre-activation gradients (i, f, g, o).
template <typename T>
inline void peephole_grad_row(const T* g, const T* wci, const T* wcf, const T* wco, const T* cp, const T* c,
                              const T* dm, T* dc, T* dg, int64_t H) {
  constexpr int64_t VS = Vec<T>::size();
  const Vec<T> one(T(1));
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    Vec<T> i = Vec<T>::loadu(g + j, cnt), f = Vec<T>::loadu(g + H + j, cnt);
    Vec<T> gg = Vec<T>::loadu(g + 2 * H + j, cnt), o = Vec<T>::loadu(g + 3 * H + j, cnt);
    Vec<T> tc = vtanh(Vec<T>::loadu(c + j, cnt));
    Vec<T> cpv = Vec<T>::loadu(cp + j, cnt);
    Vec<T> d = Vec<T>::loadu(dm + j, cnt);
    Vec<T> dop = d * tc * o * (one - o);
    Vec<T> dct = Vec<T>::loadu(dc + j, cnt) + d * o * (one - tc * tc) + dop * Vec<T>::loadu(wco + j, cnt);
    Vec<T> dip = dct * gg * i * (one - i);
    Vec<T> dfp = dct * cpv * f * (one - f);
    dip.store(dg + j, cnt);
    dfp.store(dg + H + j, cnt);
    (dct * i * (one - gg * gg)).store(dg + 2 * H + j, cnt);
    dop.store(dg + 3 * H + j, cnt);
    (dct * f + dip * Vec<T>::loadu(wci + j, cnt) + dfp * Vec<T>::loadu(wcf + j, cnt)).store(dc + j, cnt);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> peephole_fwd(const Tensor& xp_, const Tensor& w_hh_,
                                                                 const Tensor& w_ci_, const Tensor& w_cf_,
                                                                 const Tensor& w_co_, const Tensor& h0_,
                                                                 const Tensor& c0_,
                                                                 const std::optional<Tensor>& lengths) {
  TORCH_CHECK(w_hh_.dim() == 2 && w_hh_.size(0) == 4 * w_hh_.size(1),
              "rnnkit_fused::peephole_fwd: w_hh must be (4H, H), got ", w_hh_.sizes());
  const int64_t H = w_hh_.size(1), G = 4 * H;
  check_seq(xp_, "peephole_fwd", G);
  const int64_t L = xp_.size(0), N = xp_.size(1);
  Tensor xp = xp_.contiguous(), w_hh = w_hh_.contiguous(), h0 = h0_.contiguous(), c0 = c0_.contiguous();
  Tensor w_ci = w_ci_.contiguous(), w_cf = w_cf_.contiguous(), w_co = w_co_.contiguous();
  check_same(xp, w_hh, "w_hh", {G, H});
  check_same(xp, w_ci, "w_ci", {H});
  check_same(xp, w_cf, "w_cf", {H});
  check_same(xp, w_co, "w_co", {H});
  check_same(xp, h0, "h0", {N, H});
  check_same(xp, c0, "c0", {N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor out = at::empty({L, N, H}, xp.options());
  Tensor gates = at::empty({L, N, G}, xp.options());
  Tensor cs = at::empty({L, N, H}, xp.options());
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "peephole_fwd", [&] {
    using T = scalar_t;
    const Recurrent<T> rec(N, G, H, true, w_hh);
    const T* x = xp.data_ptr<T>();
    const T *wci = w_ci.data_ptr<T>(), *wcf = w_cf.data_ptr<T>(), *wco = w_co.data_ptr<T>();
    const T *h_init = h0.data_ptr<T>(), *c_init = c0.data_ptr<T>();
    T *o = out.data_ptr<T>(), *gs = gates.data_ptr<T>(), *c = cs.data_ptr<T>();
    const int64_t min_len = min_length(len, N, L), grain = row_grain(G);
    for (int64_t t = 0; t < L; ++t) {
      const T* hp = t == 0 ? h_init : o + (t - 1) * N * H;
      const T* cp = t == 0 ? c_init : c + (t - 1) * N * H;
      T *gt = gs + t * N * G, *ct = c + t * N * H, *ot = o + t * N * H;
      rec(hp, H, T(0), gt, G);
      const T* xt = x + t * N * G;
      const bool check = len && t >= min_len;
      at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          if (check && t >= len[n]) {
            copy_row(ct + n * H, cp + n * H, H);
            copy_row(ot + n * H, hp + n * H, H);
          } else {
            peephole_row(gt + n * G, xt + n * G, wci, wcf, wco, cp + n * H, ct + n * H, ot + n * H, H);
          }
        }
      });
    }
  });
  Tensor h_n = L > 0 ? out[L - 1].clone() : h0.clone();
  Tensor c_n = L > 0 ? cs[L - 1].clone() : c0.clone();
  return {out, h_n, c_n, gates, cs};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> peephole_bwd(
    const Tensor& grad_out_, const Tensor& grad_hn_, const Tensor& grad_cn_, const Tensor& w_hh_,
    const Tensor& w_ci_, const Tensor& w_cf_, const Tensor& w_co_, const Tensor& h0_, const Tensor& c0_,
    const std::optional<Tensor>& lengths, const Tensor& out_, const Tensor& gates_, const Tensor& cs_) {
  const int64_t L = out_.size(0), N = out_.size(1), H = out_.size(2), G = 4 * H;
  Tensor grad_out = grad_out_.contiguous(), grad_hn = grad_hn_.contiguous(), grad_cn = grad_cn_.contiguous();
  Tensor w_hh = w_hh_.contiguous(), h0 = h0_.contiguous(), c0 = c0_.contiguous(), out = out_.contiguous();
  Tensor w_ci = w_ci_.contiguous(), w_cf = w_cf_.contiguous(), w_co = w_co_.contiguous();
  Tensor gates = gates_.contiguous(), cs = cs_.contiguous();
  check_same(out, grad_out, "grad_out", out.sizes());
  check_same(out, grad_hn, "grad_h_n", {N, H});
  check_same(out, grad_cn, "grad_c_n", {N, H});
  check_same(out, gates, "gates", {L, N, G});
  check_same(out, cs, "cs", {L, N, H});
  check_same(out, w_hh, "w_hh", {G, H});
  check_same(out, w_ci, "w_ci", {H});
  check_same(out, w_cf, "w_cf", {H});
  check_same(out, w_co, "w_co", {H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor dG = at::empty({L, N, G}, out.options());
  Tensor dh_a = grad_hn.clone(), dh_b = at::empty({N, H}, out.options()), dc = grad_cn.clone();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "peephole_bwd", [&] {
    using T = scalar_t;
    const Recurrent<T> rec(N, H, G, false, w_hh);
    const T* go = grad_out.data_ptr<T>();
    const T *gs = gates.data_ptr<T>(), *c = cs.data_ptr<T>(), *c_init = c0.data_ptr<T>();
    const T *wci = w_ci.data_ptr<T>(), *wcf = w_cf.data_ptr<T>(), *wco = w_co.data_ptr<T>();
    T *dg = dG.data_ptr<T>(), *dh = dh_a.data_ptr<T>(), *dn = dh_b.data_ptr<T>(), *dcp = dc.data_ptr<T>();
    const int64_t min_len = min_length(len, N, L), grain = row_grain(G);
    for (int64_t t = L - 1; t >= 0; --t) {
      add_into(dh, go + t * N * H, N * H);
      const T* cp = t == 0 ? c_init : c + (t - 1) * N * H;
      const T *gt = gs + t * N * G, *ct = c + t * N * H;
      T* dgt = dg + t * N * G;
      const bool check = len && t >= min_len;
      at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          if (check && t >= len[n]) {  // held: h and c pass through unchanged
            zero_row(dgt + n * G, G);
            copy_row(dn + n * H, dh + n * H, H);
          } else {
            peephole_grad_row(gt + n * G, wci, wcf, wco, cp + n * H, ct + n * H, dh + n * H, dcp + n * H,
                              dgt + n * G, H);
            zero_row(dn + n * H, H);
          }
        }
      });
      rec(dgt, G, T(1), dn, H);
      std::swap(dh, dn);
    }
    if (dh != dh_a.data_ptr<T>()) std::swap(dh_a, dh_b);
  });
  Tensor grad_w_hh = weight_grad(dG, previous_states(h0, out));
  // the peepholes: sum over steps and rows of the gate gradient times the cell state it saw
  // (held steps have zero gate gradients, so they add nothing)
  Tensor c_prev = previous_states(c0, cs);
  const std::array<int64_t, 2> steps_rows{0, 1};  // owned: an IntArrayRef of a braced list would dangle
  Tensor grad_ci = (dG.narrow(2, 0, H) * c_prev).sum(steps_rows);
  Tensor grad_cf = (dG.narrow(2, H, H) * c_prev).sum(steps_rows);
  Tensor grad_co = (dG.narrow(2, 3 * H, H) * cs).sum(steps_rows);
  return {dG, grad_w_hh, grad_ci, grad_cf, grad_co, dh_a, dc};
}

// ================================================================ LayerNorm LSTM

// a = xp + γ_hh ⊙ LN(z), z = W_hh h_{t-1} (the caller folds b_ih, b_hh and the LN_hh shift into xp);
// i, f, g, o from a; c_t = f c_{t-1} + i g; h_t = o tanh(γ_c ⊙ LN(c_t) + β_c). LN(v) = (v - μ) / sqrt(σ² + eps),
// biased variance, as F.layer_norm.

// The gate functions at full precision (Sleef's 1-ulp exp and tanh) in float32 too: the normalizations
// divide by a small standard deviation and amplify every rounding difference, and float32 must stay
// within 1e-5 of the reference backend.
template <typename T>
inline Vec<T> psigmoid(const Vec<T>& x) {
  const Vec<T> one(T(1));
  return one / (one + x.neg().exp());
}
template <typename T>
inline Vec<T> ptanh(const Vec<T>& x) { return x.tanh(); }

// mean and 1 / sqrt(var + eps) of v (n,), two passes (the variance of the centred values)
template <typename T>
inline void ln_stats(const T* v, int64_t n, T eps, T& mean, T& rstd) {
  constexpr int64_t VS = Vec<T>::size();
  Vec<T> acc(T(0));
  int64_t j = 0;
  for (; j + VS <= n; j += VS) acc = acc + Vec<T>::loadu(v + j);
  T s = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, acc);
  for (; j < n; ++j) s += v[j];
  const T m = s / T(n);
  const Vec<T> mv(m);
  Vec<T> acc2(T(0));
  j = 0;
  for (; j + VS <= n; j += VS) {
    Vec<T> d = Vec<T>::loadu(v + j) - mv;
    acc2 = at::vec::fmadd(d, d, acc2);
  }
  T q = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, acc2);
  for (; j < n; ++j) q += (v[j] - m) * (v[j] - m);
  mean = m;
  rstd = T(1) / std::sqrt(q / T(n) + eps);
}

// sums of d and d ⊙ y over n (for the LN backward)
template <typename T>
inline void ln_sums(const T* d, const T* y, int64_t n, T& sd, T& sdy) {
  constexpr int64_t VS = Vec<T>::size();
  Vec<T> a(T(0)), b(T(0));
  int64_t j = 0;
  for (; j + VS <= n; j += VS) {
    Vec<T> dv = Vec<T>::loadu(d + j);
    a = a + dv;
    b = at::vec::fmadd(dv, Vec<T>::loadu(y + j), b);
  }
  T s1 = at::vec::vec_reduce_all<T>([](Vec<T>& x, Vec<T>& z) { return x + z; }, a);
  T s2 = at::vec::vec_reduce_all<T>([](Vec<T>& x, Vec<T>& z) { return x + z; }, b);
  for (; j < n; ++j) s1 += d[j], s2 += d[j] * y[j];
  sd = s1, sdy = s2;
}

// One row of one step. z (G,) holds W_hh h_{t-1} on entry and the gate activations (i, f, g, o) on exit;
// nz (G,) gets LN(z), nc (H,) gets LN(c_t); rs gets (rstd_hh, rstd_c).
template <typename T>
inline void ln_lstm_row(T* z, const T* x, const T* ghh, const T* gc, const T* bc, const T* cp, T* c, T* h, T* nz,
                        T* nc, T* rs, int64_t H, T eps) {
  constexpr int64_t VS = Vec<T>::size();
  const int64_t G = 4 * H;
  T mean, rstd;
  ln_stats(z, G, eps, mean, rstd);
  rs[0] = rstd;
  const Vec<T> mv(mean), rv(rstd);
  for (int64_t j = 0; j < G; j += VS) {
    const int64_t cnt = std::min(VS, G - j);
    Vec<T> n = (Vec<T>::loadu(z + j, cnt) - mv) * rv;
    n.store(nz + j, cnt);
  }
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    auto pre = [&](int64_t k) {
      return Vec<T>::loadu(x + k * H + j, cnt) + Vec<T>::loadu(ghh + k * H + j, cnt) * Vec<T>::loadu(nz + k * H + j, cnt);
    };
    Vec<T> i = psigmoid(pre(0)), f = psigmoid(pre(1)), gg = ptanh(pre(2)), o = psigmoid(pre(3));
    Vec<T> cn = f * Vec<T>::loadu(cp + j, cnt) + i * gg;
    i.store(z + j, cnt);
    f.store(z + H + j, cnt);
    gg.store(z + 2 * H + j, cnt);
    o.store(z + 3 * H + j, cnt);
    cn.store(c + j, cnt);
  }
  ln_stats(c, H, eps, mean, rstd);
  rs[1] = rstd;
  const Vec<T> mc(mean), rc(rstd);
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    Vec<T> n = (Vec<T>::loadu(c + j, cnt) - mc) * rc;
    n.store(nc + j, cnt);
    Vec<T> y = Vec<T>::loadu(gc + j, cnt) * n + Vec<T>::loadu(bc + j, cnt);
    (Vec<T>::loadu(z + 3 * H + j, cnt) * ptanh(y)).store(h + j, cnt);
  }
}

// The backward of one row of one step. dm: dL/dh_t; dc: dL/dc_t from later steps on entry, dL/dc_{t-1} on exit.
// Writes dg (G,): dL/da (the gradient of xp), dz (G,): dL/dz (for dh_{t-1} and dW_hh), dy (H,): dL/d(LN_c out).
template <typename T>
inline void ln_lstm_grad_row(const T* g, const T* ghh, const T* gc, const T* bc, const T* cp, const T* nz,
                             const T* nc, const T* rs, const T* dm, T* dc, T* dg, T* dz, T* dy, int64_t H) {
  constexpr int64_t VS = Vec<T>::size();
  const int64_t G = 4 * H;
  const Vec<T> one(T(1));
  // dy = dh o (1 - tanh² y); dz temporarily holds dn_c = dy γ_c in its first H entries
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    Vec<T> n = Vec<T>::loadu(nc + j, cnt);
    Vec<T> ty = ptanh(Vec<T>::loadu(gc + j, cnt) * n + Vec<T>::loadu(bc + j, cnt));
    Vec<T> o = Vec<T>::loadu(g + 3 * H + j, cnt), d = Vec<T>::loadu(dm + j, cnt);
    Vec<T> dyv = d * o * (one - ty * ty);
    dyv.store(dy + j, cnt);
    (dyv * Vec<T>::loadu(gc + j, cnt)).store(dz + j, cnt);
    (d * ty * o * (one - o)).store(dg + 3 * H + j, cnt);
  }
  T s1, s2;
  ln_sums(dz, nc, H, s1, s2);
  const Vec<T> m1(s1 / T(H)), m2(s2 / T(H)), rc(rs[1]);
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    Vec<T> dn = Vec<T>::loadu(dz + j, cnt);
    Vec<T> dct = Vec<T>::loadu(dc + j, cnt) + rc * (dn - m1 - Vec<T>::loadu(nc + j, cnt) * m2);
    Vec<T> i = Vec<T>::loadu(g + j, cnt), f = Vec<T>::loadu(g + H + j, cnt), gg = Vec<T>::loadu(g + 2 * H + j, cnt);
    (dct * gg * i * (one - i)).store(dg + j, cnt);
    (dct * Vec<T>::loadu(cp + j, cnt) * f * (one - f)).store(dg + H + j, cnt);
    (dct * i * (one - gg * gg)).store(dg + 2 * H + j, cnt);
    (dct * f).store(dc + j, cnt);
  }
  // LN_hh: dn = dg γ_hh, dz = rstd (dn - mean(dn) - nz mean(dn nz))
  for (int64_t j = 0; j < G; j += VS) {
    const int64_t cnt = std::min(VS, G - j);
    (Vec<T>::loadu(dg + j, cnt) * Vec<T>::loadu(ghh + j, cnt)).store(dz + j, cnt);
  }
  ln_sums(dz, nz, G, s1, s2);
  const Vec<T> n1(s1 / T(G)), n2(s2 / T(G)), rh(rs[0]);
  for (int64_t j = 0; j < G; j += VS) {
    const int64_t cnt = std::min(VS, G - j);
    (rh * (Vec<T>::loadu(dz + j, cnt) - n1 - Vec<T>::loadu(nz + j, cnt) * n2)).store(dz + j, cnt);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ln_lstm_fwd(
    const Tensor& xp_, const Tensor& w_hh_, const Tensor& g_hh_, const Tensor& g_c_, const Tensor& b_c_,
    const Tensor& h0_, const Tensor& c0_, const std::optional<Tensor>& lengths, double eps_) {
  TORCH_CHECK(w_hh_.dim() == 2 && w_hh_.size(0) == 4 * w_hh_.size(1),
              "rnnkit_fused::ln_lstm_fwd: w_hh must be (4H, H), got ", w_hh_.sizes());
  TORCH_CHECK(eps_ > 0, "rnnkit_fused::ln_lstm_fwd: eps must be positive, got ", eps_);
  const int64_t H = w_hh_.size(1), G = 4 * H;
  check_seq(xp_, "ln_lstm_fwd", G);
  const int64_t L = xp_.size(0), N = xp_.size(1);
  Tensor xp = xp_.contiguous(), w_hh = w_hh_.contiguous(), h0 = h0_.contiguous(), c0 = c0_.contiguous();
  Tensor g_hh = g_hh_.contiguous(), g_c = g_c_.contiguous(), b_c = b_c_.contiguous();
  check_same(xp, w_hh, "w_hh", {G, H});
  check_same(xp, g_hh, "ln_weight_hh", {G});
  check_same(xp, g_c, "ln_weight_c", {H});
  check_same(xp, b_c, "ln_bias_c", {H});
  check_same(xp, h0, "h0", {N, H});
  check_same(xp, c0, "c0", {N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor out = at::empty({L, N, H}, xp.options());
  Tensor gates = at::empty({L, N, G}, xp.options());
  Tensor cs = at::empty({L, N, H}, xp.options());
  Tensor nzs = at::empty({L, N, G}, xp.options());
  Tensor ncs = at::empty({L, N, H}, xp.options());
  Tensor rstd = at::empty({L, N, 2}, xp.options());
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "ln_lstm_fwd", [&] {
    using T = scalar_t;
    const T eps = T(eps_);
    const Recurrent<T> rec(N, G, H, true, w_hh);
    const T* x = xp.data_ptr<T>();
    const T *ghh = g_hh.data_ptr<T>(), *gc = g_c.data_ptr<T>(), *bc = b_c.data_ptr<T>();
    const T *h_init = h0.data_ptr<T>(), *c_init = c0.data_ptr<T>();
    T *o = out.data_ptr<T>(), *gs = gates.data_ptr<T>(), *c = cs.data_ptr<T>();
    T *nz = nzs.data_ptr<T>(), *nc = ncs.data_ptr<T>(), *rs = rstd.data_ptr<T>();
    const int64_t min_len = min_length(len, N, L), grain = row_grain(2 * G);
    for (int64_t t = 0; t < L; ++t) {
      const T* hp = t == 0 ? h_init : o + (t - 1) * N * H;
      const T* cp = t == 0 ? c_init : c + (t - 1) * N * H;
      T *gt = gs + t * N * G, *ct = c + t * N * H, *ot = o + t * N * H;
      T *nzt = nz + t * N * G, *nct = nc + t * N * H, *rst = rs + t * N * 2;
      rec(hp, H, T(0), gt, G);
      const T* xt = x + t * N * G;
      const bool check = len && t >= min_len;
      at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          if (check && t >= len[n]) {  // held; the saved LN values are zero so the parameter sums skip this step
            copy_row(ct + n * H, cp + n * H, H);
            copy_row(ot + n * H, hp + n * H, H);
            zero_row(gt + n * G, G);
            zero_row(nzt + n * G, G);
            zero_row(nct + n * H, H);
            rst[2 * n] = rst[2 * n + 1] = T(0);
          } else {
            ln_lstm_row(gt + n * G, xt + n * G, ghh, gc, bc, cp + n * H, ct + n * H, ot + n * H, nzt + n * G,
                        nct + n * H, rst + 2 * n, H, eps);
          }
        }
      });
    }
  });
  Tensor h_n = L > 0 ? out[L - 1].clone() : h0.clone();
  Tensor c_n = L > 0 ? cs[L - 1].clone() : c0.clone();
  return {out, h_n, c_n, gates, cs, nzs, ncs, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ln_lstm_bwd(
    const Tensor& grad_out_, const Tensor& grad_hn_, const Tensor& grad_cn_, const Tensor& w_hh_,
    const Tensor& g_hh_, const Tensor& g_c_, const Tensor& b_c_, const Tensor& h0_, const Tensor& c0_,
    const std::optional<Tensor>& lengths, const Tensor& out_, const Tensor& gates_, const Tensor& cs_,
    const Tensor& nzs_, const Tensor& ncs_, const Tensor& rstd_) {
  const int64_t L = out_.size(0), N = out_.size(1), H = out_.size(2), G = 4 * H;
  Tensor grad_out = grad_out_.contiguous(), grad_hn = grad_hn_.contiguous(), grad_cn = grad_cn_.contiguous();
  Tensor w_hh = w_hh_.contiguous(), h0 = h0_.contiguous(), c0 = c0_.contiguous(), out = out_.contiguous();
  Tensor g_hh = g_hh_.contiguous(), g_c = g_c_.contiguous(), b_c = b_c_.contiguous();
  Tensor gates = gates_.contiguous(), cs = cs_.contiguous(), nzs = nzs_.contiguous(), ncs = ncs_.contiguous();
  Tensor rstd = rstd_.contiguous();
  check_same(out, grad_out, "grad_out", out.sizes());
  check_same(out, grad_hn, "grad_h_n", {N, H});
  check_same(out, grad_cn, "grad_c_n", {N, H});
  check_same(out, gates, "gates", {L, N, G});
  check_same(out, cs, "cs", {L, N, H});
  check_same(out, nzs, "nz", {L, N, G});
  check_same(out, ncs, "nc", {L, N, H});
  check_same(out, rstd, "rstd", {L, N, 2});
  check_same(out, w_hh, "w_hh", {G, H});
  check_same(out, g_hh, "ln_weight_hh", {G});
  check_same(out, g_c, "ln_weight_c", {H});
  check_same(out, b_c, "ln_bias_c", {H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor dG = at::empty({L, N, G}, out.options());
  Tensor dZ = at::empty({L, N, G}, out.options());
  Tensor dY = at::empty({L, N, H}, out.options());
  Tensor dh_a = grad_hn.clone(), dh_b = at::empty({N, H}, out.options()), dc = grad_cn.clone();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "ln_lstm_bwd", [&] {
    using T = scalar_t;
    const Recurrent<T> rec(N, H, G, false, w_hh);
    const T* go = grad_out.data_ptr<T>();
    const T *gs = gates.data_ptr<T>(), *c = cs.data_ptr<T>(), *c_init = c0.data_ptr<T>();
    const T *nz = nzs.data_ptr<T>(), *nc = ncs.data_ptr<T>(), *rs = rstd.data_ptr<T>();
    const T *ghh = g_hh.data_ptr<T>(), *gc = g_c.data_ptr<T>(), *bc = b_c.data_ptr<T>();
    T *dg = dG.data_ptr<T>(), *dz = dZ.data_ptr<T>(), *dy = dY.data_ptr<T>();
    T *dh = dh_a.data_ptr<T>(), *dn = dh_b.data_ptr<T>(), *dcp = dc.data_ptr<T>();
    const int64_t min_len = min_length(len, N, L), grain = row_grain(2 * G);
    for (int64_t t = L - 1; t >= 0; --t) {
      add_into(dh, go + t * N * H, N * H);
      const T* cp = t == 0 ? c_init : c + (t - 1) * N * H;
      const T *gt = gs + t * N * G, *nzt = nz + t * N * G, *nct = nc + t * N * H, *rst = rs + t * N * 2;
      T *dgt = dg + t * N * G, *dzt = dz + t * N * G, *dyt = dy + t * N * H;
      const bool check = len && t >= min_len;
      at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          if (check && t >= len[n]) {  // held: h and c pass through unchanged
            zero_row(dgt + n * G, G);
            zero_row(dzt + n * G, G);
            zero_row(dyt + n * H, H);
            copy_row(dn + n * H, dh + n * H, H);
          } else {
            ln_lstm_grad_row(gt + n * G, ghh, gc, bc, cp + n * H, nzt + n * G, nct + n * H, rst + 2 * n,
                             dh + n * H, dcp + n * H, dgt + n * G, dzt + n * G, dyt + n * H, H);
            zero_row(dn + n * H, H);
          }
        }
      });
      rec(dzt, G, T(1), dn, H);
      std::swap(dh, dn);
    }
    if (dh != dh_a.data_ptr<T>()) std::swap(dh_a, dh_b);
  });
  Tensor grad_w_hh = weight_grad(dZ, previous_states(h0, out));
  // the LN gains and shift: sums over steps and rows (held steps add nothing: their saved LN values are zero)
  const std::array<int64_t, 2> steps_rows{0, 1};
  Tensor grad_g_hh = (dG * nzs).sum(steps_rows);
  Tensor grad_g_c = (dY * ncs).sum(steps_rows);
  Tensor grad_b_c = dY.sum(steps_rows);
  return {dG, grad_w_hh, grad_g_hh, grad_g_c, grad_b_c, dh_a, dc};
}

// ================================================================ LayerNorm GRU

// b = γ_hh ⊙ LN(z) + β, z = W_hh h_{t-1}, β = ln_bias_hh + b_hh (the caller adds them; zeros without bias);
// r = σ(a_r + b_r), z_g = σ(a_z + b_z), n = tanh(a_n + r ⊙ b_n), h_t = n + z_g (h_{t-1} - n), a = xp
// (LN_ih(W_ih x) + b_ih, the spec's project, done by the caller). β stays a kernel input: r multiplies
// b_n, so its n part cannot be folded into xp (the r, z parts could, but one (G,) input is simpler and
// costs one add per element). LN(v) = (v - μ) / sqrt(σ² + eps), biased variance, as F.layer_norm.
// The gate functions are psigmoid / ptanh (Sleef's 1-ulp exp and tanh) in float32 too, as the LN-LSTM.
// The LN statistics take one pass (ln_stats_welford). Measured on the float32 gradients against the
// float64 oracle (max errors summed over 20 seeded two-layer bidirectional cases): Welford 1.09e-3, the
// LN-LSTM's two-pass ln_stats 1.13e-3, a one-pass sum of v - v[0] and (v - v[0])² 1.19e-3, the reference
// backend itself 1.11e-3; Welford and two passes ran at the same speed within this machine's noise.

// mean and 1 / sqrt(var + eps) of v (n,) in one pass: Welford's update in every vector lane (all lanes
// see the same count, so 1/k is one scalar per step), lanes merged with Chan's formula, the tail after.
template <typename T>
inline void ln_stats_welford(const T* v, int64_t n, T eps, T& mean, T& rstd) {
  constexpr int64_t VS = Vec<T>::size();
  Vec<T> m(T(0)), q(T(0));
  int64_t j = 0, k = 0;
  for (; j + VS <= n; j += VS) {
    ++k;
    const Vec<T> x = Vec<T>::loadu(v + j);
    const Vec<T> d = x - m;
    m = at::vec::fmadd(d, Vec<T>(T(1) / T(k)), m);
    q = at::vec::fmadd(d, x - m, q);
  }
  T mu = 0, m2 = 0, cnt = 0;
  if (k > 0) {
    __at_align__ T ml[VS], ql[VS];
    m.store(ml);
    q.store(ql);
    for (int64_t l = 0; l < VS; ++l) mu += ml[l];
    mu /= T(VS);
    for (int64_t l = 0; l < VS; ++l) m2 += ql[l] + T(k) * (ml[l] - mu) * (ml[l] - mu);
    cnt = T(k * VS);
  }
  for (; j < n; ++j) {
    cnt += T(1);
    const T d = v[j] - mu;
    mu += d / cnt;
    m2 += d * (v[j] - mu);
  }
  mean = mu;
  rstd = T(1) / std::sqrt(m2 / T(n) + eps);
}

// One row of one step. g (G,) holds W_hh h_{t-1} on entry and (r, z, n) on exit; nz (G,) gets LN(W_hh h_{t-1}),
// rs its 1 / sqrt(var + eps); h (H,) gets h_t.
template <typename T>
inline void ln_gru_row(T* g, const T* x, const T* gain, const T* shift, const T* hp, T* h, T* nz, T* rs,
                       int64_t H, T eps) {
  constexpr int64_t VS = Vec<T>::size();
  T mean, rstd;
  ln_stats_welford(g, 3 * H, eps, mean, rstd);
  *rs = rstd;
  const Vec<T> mv(mean), rv(rstd);
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    const Vec<T> nr = (Vec<T>::loadu(g + j, cnt) - mv) * rv;
    const Vec<T> nzz = (Vec<T>::loadu(g + H + j, cnt) - mv) * rv;
    const Vec<T> nn = (Vec<T>::loadu(g + 2 * H + j, cnt) - mv) * rv;
    nr.store(nz + j, cnt);
    nzz.store(nz + H + j, cnt);
    nn.store(nz + 2 * H + j, cnt);
    auto b = [&](int64_t k, const Vec<T>& v) {
      return at::vec::fmadd(Vec<T>::loadu(gain + k * H + j, cnt), v, Vec<T>::loadu(shift + k * H + j, cnt));
    };
    const Vec<T> r = psigmoid(Vec<T>::loadu(x + j, cnt) + b(0, nr));
    const Vec<T> z = psigmoid(Vec<T>::loadu(x + H + j, cnt) + b(1, nzz));
    const Vec<T> n = ptanh(at::vec::fmadd(r, b(2, nn), Vec<T>::loadu(x + 2 * H + j, cnt)));
    r.store(g + j, cnt);
    z.store(g + H + j, cnt);
    n.store(g + 2 * H + j, cnt);
    at::vec::fmadd(z, Vec<T>::loadu(hp + j, cnt) - n, n).store(h + j, cnt);
  }
}

// The backward of one row of one step. dh: dL/dh_t. Writes dx (G,): dL/da (the gradient of xp), dz (G,):
// dL/d(W_hh h_{t-1}) (for dh_{t-1} and dW_hh), dnext (H,): the direct part of dL/dh_{t-1} (dh ⊙ z; the
// caller adds dz W_hh). Adds this step's dL/db ⊙ LN(z) to dg (G,) and dL/db to db (G,): the row's running
// sums for the LN gain and β.
template <typename T>
inline void ln_gru_grad_row(const T* g, const T* nz, T rstd, const T* gain, const T* shift, const T* hp,
                            const T* dh, T* dx, T* dg, T* db, T* dz, T* dnext, int64_t H) {
  constexpr int64_t VS = Vec<T>::size();
  const Vec<T> one(T(1)), zero(T(0));
  Vec<T> s1(T(0)), s2(T(0));  // sums of dn = db γ and dn ⊙ LN(z), for the LN backward
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    const Vec<T> r = Vec<T>::loadu(g + j, cnt), z = Vec<T>::loadu(g + H + j, cnt);
    const Vec<T> n = Vec<T>::loadu(g + 2 * H + j, cnt), d = Vec<T>::loadu(dh + j, cnt);
    const Vec<T> nr = Vec<T>::loadu(nz + j, cnt), nzz = Vec<T>::loadu(nz + H + j, cnt);
    const Vec<T> nn = Vec<T>::loadu(nz + 2 * H + j, cnt);
    const Vec<T> gr = Vec<T>::loadu(gain + j, cnt), gz = Vec<T>::loadu(gain + H + j, cnt);
    const Vec<T> gn = Vec<T>::loadu(gain + 2 * H + j, cnt);
    const Vec<T> bn = at::vec::fmadd(gn, nn, Vec<T>::loadu(shift + 2 * H + j, cnt));
    const Vec<T> dn_pre = d * (one - z) * (one - n * n);
    const Vec<T> dz_pre = d * (Vec<T>::loadu(hp + j, cnt) - n) * z * (one - z);
    const Vec<T> dr_pre = dn_pre * bn * r * (one - r);
    const Vec<T> dbn = dn_pre * r;
    dr_pre.store(dx + j, cnt);
    dz_pre.store(dx + H + j, cnt);
    dn_pre.store(dx + 2 * H + j, cnt);
    (Vec<T>::loadu(db + j, cnt) + dr_pre).store(db + j, cnt);
    (Vec<T>::loadu(db + H + j, cnt) + dz_pre).store(db + H + j, cnt);
    (Vec<T>::loadu(db + 2 * H + j, cnt) + dbn).store(db + 2 * H + j, cnt);
    at::vec::fmadd(dr_pre, nr, Vec<T>::loadu(dg + j, cnt)).store(dg + j, cnt);
    at::vec::fmadd(dz_pre, nzz, Vec<T>::loadu(dg + H + j, cnt)).store(dg + H + j, cnt);
    at::vec::fmadd(dbn, nn, Vec<T>::loadu(dg + 2 * H + j, cnt)).store(dg + 2 * H + j, cnt);
    (d * z).store(dnext + j, cnt);
    Vec<T> a = dr_pre * gr, b = dz_pre * gz, c = dbn * gn;
    a.store(dz + j, cnt);
    b.store(dz + H + j, cnt);
    c.store(dz + 2 * H + j, cnt);
    if (cnt < VS) {  // only the loaded lanes take part in the sums
      a = Vec<T>::set(zero, a, cnt), b = Vec<T>::set(zero, b, cnt), c = Vec<T>::set(zero, c, cnt);
    }
    s1 = s1 + a + b + c;
    s2 = at::vec::fmadd(a, nr, at::vec::fmadd(b, nzz, at::vec::fmadd(c, nn, s2)));
  }
  const int64_t G = 3 * H;
  const T m1 = at::vec::vec_reduce_all<T>([](Vec<T>& x, Vec<T>& y) { return x + y; }, s1) / T(G);
  const T m2 = at::vec::vec_reduce_all<T>([](Vec<T>& x, Vec<T>& y) { return x + y; }, s2) / T(G);
  // LN backward: dz = rstd (dn - mean(dn) - LN(z) mean(dn ⊙ LN(z)))
  const Vec<T> v1(m1), v2(m2), rv(rstd);
  for (int64_t j = 0; j < G; j += VS) {
    const int64_t cnt = std::min(VS, G - j);
    (rv * (Vec<T>::loadu(dz + j, cnt) - v1 - Vec<T>::loadu(nz + j, cnt) * v2)).store(dz + j, cnt);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ln_gru_fwd(const Tensor& xp_, const Tensor& w_hh_,
                                                              const Tensor& g_hh_, const Tensor& shift_,
                                                              const Tensor& h0_,
                                                              const std::optional<Tensor>& lengths, double eps_) {
  TORCH_CHECK(w_hh_.dim() == 2 && w_hh_.size(0) == 3 * w_hh_.size(1),
              "rnnkit_fused::ln_gru_fwd: w_hh must be (3H, H), got ", w_hh_.sizes());
  TORCH_CHECK(eps_ > 0, "rnnkit_fused::ln_gru_fwd: eps must be positive, got ", eps_);
  const int64_t H = w_hh_.size(1), G = 3 * H;
  check_seq(xp_, "ln_gru_fwd", G);
  const int64_t L = xp_.size(0), N = xp_.size(1);
  Tensor xp = xp_.contiguous(), w_hh = w_hh_.contiguous(), h0 = h0_.contiguous();
  Tensor g_hh = g_hh_.contiguous(), shift = shift_.contiguous();
  check_same(xp, w_hh, "w_hh", {G, H});
  check_same(xp, g_hh, "ln_weight_hh", {G});
  check_same(xp, shift, "shift", {G});
  check_same(xp, h0, "h0", {N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor out = at::empty({L, N, H}, xp.options());
  Tensor gates = at::empty({L, N, G}, xp.options());
  Tensor nzs = at::empty({L, N, G}, xp.options());
  Tensor rstd = at::empty({L, N}, xp.options());
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "ln_gru_fwd", [&] {
    using T = scalar_t;
    const T eps = T(eps_);
    const Recurrent<T> rec(N, G, H, true, w_hh);
    const T *x = xp.data_ptr<T>(), *gain = g_hh.data_ptr<T>(), *sh = shift.data_ptr<T>();
    const T* h_init = h0.data_ptr<T>();
    T *o = out.data_ptr<T>(), *gs = gates.data_ptr<T>(), *nz = nzs.data_ptr<T>(), *rs = rstd.data_ptr<T>();
    const int64_t min_len = min_length(len, N, L), grain = row_grain(2 * G);
    for (int64_t t = 0; t < L; ++t) {
      const T* hp = t == 0 ? h_init : o + (t - 1) * N * H;
      T *gt = gs + t * N * G, *ot = o + t * N * H, *nzt = nz + t * N * G, *rst = rs + t * N;
      rec(hp, H, T(0), gt, G);
      const T* xt = x + t * N * G;
      const bool check = len && t >= min_len;
      at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          if (check && t >= len[n]) {  // held; the saved values are zero so the backward's sums skip this step
            copy_row(ot + n * H, hp + n * H, H);
            zero_row(gt + n * G, G);
            zero_row(nzt + n * G, G);
            rst[n] = T(0);
          } else {
            ln_gru_row(gt + n * G, xt + n * G, gain, sh, hp + n * H, ot + n * H, nzt + n * G, rst + n, H, eps);
          }
        }
      });
    }
  });
  Tensor h_n = L > 0 ? out[L - 1].clone() : h0.clone();
  return {out, h_n, gates, nzs, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ln_gru_bwd(
    const Tensor& grad_out_, const Tensor& grad_hn_, const Tensor& w_hh_, const Tensor& g_hh_, const Tensor& shift_,
    const Tensor& h0_, const std::optional<Tensor>& lengths, const Tensor& out_, const Tensor& gates_,
    const Tensor& nzs_, const Tensor& rstd_) {
  TORCH_CHECK(out_.dim() == 3, "rnnkit_fused::ln_gru_bwd: out must be (L, N, H), got ", out_.sizes());
  const int64_t L = out_.size(0), N = out_.size(1), H = out_.size(2), G = 3 * H;
  Tensor grad_out = grad_out_.contiguous(), grad_hn = grad_hn_.contiguous(), w_hh = w_hh_.contiguous();
  Tensor g_hh = g_hh_.contiguous(), shift = shift_.contiguous(), h0 = h0_.contiguous(), out = out_.contiguous();
  Tensor gates = gates_.contiguous(), nzs = nzs_.contiguous(), rstd = rstd_.contiguous();
  check_same(out, grad_out, "grad_out", out.sizes());
  check_same(out, grad_hn, "grad_h_n", {N, H});
  check_same(out, w_hh, "w_hh", {G, H});
  check_same(out, g_hh, "ln_weight_hh", {G});
  check_same(out, shift, "shift", {G});
  check_same(out, h0, "h0", {N, H});
  check_same(out, gates, "gates", {L, N, G});
  check_same(out, nzs, "nz", {L, N, G});
  check_same(out, rstd, "rstd", {L, N});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor dX = at::empty({L, N, G}, out.options());
  Tensor dZ = at::empty({L, N, G}, out.options());
  Tensor dG_rows = at::zeros({N, G}, out.options()), dB_rows = at::zeros({N, G}, out.options());
  Tensor dh_a = grad_hn.clone(), dh_b = at::empty({N, H}, out.options());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "ln_gru_bwd", [&] {
    using T = scalar_t;
    const Recurrent<T> rec(N, H, G, false, w_hh);
    const T *go = grad_out.data_ptr<T>(), *o = out.data_ptr<T>(), *h_init = h0.data_ptr<T>();
    const T *gs = gates.data_ptr<T>(), *nz = nzs.data_ptr<T>(), *rs = rstd.data_ptr<T>();
    const T *gain = g_hh.data_ptr<T>(), *sh = shift.data_ptr<T>();
    T *dx = dX.data_ptr<T>(), *dz = dZ.data_ptr<T>(), *dgr = dG_rows.data_ptr<T>(), *dbr = dB_rows.data_ptr<T>();
    T *dh = dh_a.data_ptr<T>(), *dn = dh_b.data_ptr<T>();
    const int64_t min_len = min_length(len, N, L), grain = row_grain(2 * G);
    for (int64_t t = L - 1; t >= 0; --t) {
      add_into(dh, go + t * N * H, N * H);
      const T* hp = t == 0 ? h_init : o + (t - 1) * N * H;
      const T *gt = gs + t * N * G, *nzt = nz + t * N * G, *rst = rs + t * N;
      T *dxt = dx + t * N * G, *dzt = dz + t * N * G;
      const bool check = len && t >= min_len;
      at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          if (check && t >= len[n]) {  // held: h passes through unchanged
            zero_row(dxt + n * G, G);
            zero_row(dzt + n * G, G);
            copy_row(dn + n * H, dh + n * H, H);
          } else {
            ln_gru_grad_row(gt + n * G, nzt + n * G, rst[n], gain, sh, hp + n * H, dh + n * H, dxt + n * G,
                            dgr + n * G, dbr + n * G, dzt + n * G, dn + n * H, H);
          }
        }
      });
      rec(dzt, G, T(1), dn, H);
      std::swap(dh, dn);
    }
    if (dh != dh_a.data_ptr<T>()) std::swap(dh_a, dh_b);
  });
  Tensor grad_w_hh = weight_grad(dZ, previous_states(h0, out));
  // the LN gain and β: each row summed its steps inside the loop (held steps add nothing), rows summed here
  return {dX, grad_w_hh, dG_rows.sum(0), dB_rows.sum(0), dh_a};
}

// ================================================================ IndRNN

// h_t = act(xp_t + u * h_{t-1}), u (H,) per unit: no recurrent matrix product,
// every unit of every row is its own recurrence. The work is split over
// (row, block of units) and each block keeps its state in registers across the
// whole time loop (time is the inner loop).
constexpr int64_t kIndBlock = 256;

template <typename T>
inline Vec<T> ind_act(const Vec<T>& v, int64_t act) {
  return act == 0 ? vtanh(v) : at::vec::maximum(v, Vec<T>(T(0)));
}

// dL/d(pre-activation) from dL/dh and h = act(pre)
template <typename T>
inline Vec<T> ind_act_grad(const Vec<T>& d, const Vec<T>& h, int64_t act) {
  const Vec<T> one(T(1)), zero(T(0));
  return act == 0 ? d * (one - h * h) : Vec<T>::blendv(zero, d, h > zero);
}

inline int64_t row_length(const int64_t* len, int64_t n, int64_t L) {
  return len ? std::min<int64_t>(std::max<int64_t>(len[n], 0), L) : L;
}

std::tuple<Tensor, Tensor> indrnn_fwd(const Tensor& xp_, const Tensor& u_, const Tensor& h0_,
                                      const std::optional<Tensor>& lengths, int64_t act) {
  TORCH_CHECK(act == 0 || act == 1, "rnnkit_fused::indrnn_fwd: act must be 0 (tanh) or 1 (relu), got ", act);
  TORCH_CHECK(u_.dim() == 1, "rnnkit_fused::indrnn_fwd: u must be (H,), got ", u_.sizes());
  const int64_t H = u_.size(0);
  check_seq(xp_, "indrnn_fwd", H);
  const int64_t L = xp_.size(0), N = xp_.size(1);
  Tensor xp = xp_.contiguous(), u = u_.contiguous(), h0 = h0_.contiguous();
  check_same(xp, u, "u", {H});
  check_same(xp, h0, "h0", {N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor out = at::empty({L, N, H}, xp.options());
  const int64_t blocks = (H + kIndBlock - 1) / kIndBlock;
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "indrnn_fwd", [&] {
    using T = scalar_t;
    constexpr int64_t VS = Vec<T>::size();
    const T *x = xp.data_ptr<T>(), *up = u.data_ptr<T>(), *h_init = h0.data_ptr<T>();
    T* o = out.data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(L * std::min(H, kIndBlock), 1));
    at::parallel_for(0, N * blocks, grain, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        const int64_t n = k / blocks, j0 = (k % blocks) * kIndBlock, j1 = std::min(H, j0 + kIndBlock);
        const int64_t ln = row_length(len, n, L);
        for (int64_t j = j0; j < j1; j += VS) {
          const int64_t cnt = std::min(VS, j1 - j);
          const Vec<T> uv = Vec<T>::loadu(up + j, cnt);
          Vec<T> h = Vec<T>::loadu(h_init + n * H + j, cnt);
          int64_t t = 0;
          for (; t < ln; ++t) {
            const int64_t off = (t * N + n) * H + j;
            h = ind_act(at::vec::fmadd(uv, h, Vec<T>::loadu(x + off, cnt)), act);
            h.store(o + off, cnt);
          }
          for (; t < L; ++t) h.store(o + (t * N + n) * H + j, cnt);  // held past the length
        }
      }
    });
  });
  Tensor h_n = L > 0 ? out[L - 1].clone() : h0.clone();
  return {out, h_n};
}

std::tuple<Tensor, Tensor, Tensor> indrnn_bwd(const Tensor& grad_out_, const Tensor& grad_hn_, const Tensor& u_,
                                              const Tensor& h0_, const std::optional<Tensor>& lengths,
                                              const Tensor& out_, int64_t act) {
  TORCH_CHECK(act == 0 || act == 1, "rnnkit_fused::indrnn_bwd: act must be 0 (tanh) or 1 (relu), got ", act);
  TORCH_CHECK(out_.dim() == 3, "rnnkit_fused::indrnn_bwd: out must be (L, N, H), got ", out_.sizes());
  const int64_t L = out_.size(0), N = out_.size(1), H = out_.size(2);
  Tensor grad_out = grad_out_.contiguous(), grad_hn = grad_hn_.contiguous(), u = u_.contiguous();
  Tensor h0 = h0_.contiguous(), out = out_.contiguous();
  check_same(out, grad_out, "grad_out", out.sizes());
  check_same(out, grad_hn, "grad_h_n", {N, H});
  check_same(out, u, "u", {H});
  check_same(out, h0, "h0", {N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor dxp = at::empty({L, N, H}, out.options());
  Tensor dh0 = at::empty({N, H}, out.options());
  Tensor du_rows = at::empty({N, H}, out.options());  // per row, summed over rows after the loop
  const int64_t blocks = (H + kIndBlock - 1) / kIndBlock;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "indrnn_bwd", [&] {
    using T = scalar_t;
    constexpr int64_t VS = Vec<T>::size();
    const T *go = grad_out.data_ptr<T>(), *gn = grad_hn.data_ptr<T>(), *up = u.data_ptr<T>();
    const T *o = out.data_ptr<T>(), *h_init = h0.data_ptr<T>();
    T *dx = dxp.data_ptr<T>(), *dh = dh0.data_ptr<T>(), *dur = du_rows.data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(L * std::min(H, kIndBlock), 1));
    at::parallel_for(0, N * blocks, grain, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        const int64_t n = k / blocks, j0 = (k % blocks) * kIndBlock, j1 = std::min(H, j0 + kIndBlock);
        const int64_t ln = row_length(len, n, L);
        for (int64_t j = j0; j < j1; j += VS) {
          const int64_t cnt = std::min(VS, j1 - j);
          const Vec<T> uv = Vec<T>::loadu(up + j, cnt);
          Vec<T> d = Vec<T>::loadu(gn + n * H + j, cnt), du(T(0));
          int64_t t = L - 1;
          for (; t >= ln; --t) {  // held: h passes through unchanged
            const int64_t off = (t * N + n) * H + j;
            d = d + Vec<T>::loadu(go + off, cnt);
            Vec<T>(T(0)).store(dx + off, cnt);
          }
          for (; t >= 0; --t) {
            const int64_t off = (t * N + n) * H + j;
            d = d + Vec<T>::loadu(go + off, cnt);
            const Vec<T> dpre = ind_act_grad(d, Vec<T>::loadu(o + off, cnt), act);
            dpre.store(dx + off, cnt);
            const Vec<T> hp = t > 0 ? Vec<T>::loadu(o + off - N * H, cnt) : Vec<T>::loadu(h_init + n * H + j, cnt);
            du = at::vec::fmadd(dpre, hp, du);
            d = dpre * uv;
          }
          d.store(dh + n * H + j, cnt);
          du.store(dur + n * H + j, cnt);
        }
      }
    });
  });
  return {dxp, du_rows.sum(0), dh0};
}

// ================================================================ single-step cells (inference)

// gates (N, G) = b_ih + b_hh (either may be missing) + x W_ih^T + h W_hh^T
Tensor cell_gates(const Tensor& x, const Tensor& h, const Tensor& w_ih, const Tensor& w_hh,
                  const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, bool recurrent,
                  const char* op) {
  TORCH_CHECK(x.dim() == 2 && h.dim() == 2 && x.size(0) == h.size(0), "rnnkit_fused::", op,
              ": x must be (N, H_in) and h (N, H), got ", x.sizes(), " and ", h.sizes());
  // with recurrent=false only the input part is computed (the GRU gates its recurrent part)
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "rnnkit_fused::", op,
              ": float32 or float64 only, got ", x.scalar_type());
  const int64_t N = x.size(0), I = x.size(1), Hh = h.size(1), G = w_ih.size(0);
  check_same(x, w_ih, "w_ih", {G, I});
  check_same(x, w_hh, "w_hh", {G, Hh});
  Tensor gates = at::empty({N, G}, x.options());
  const bool has_bi = b_ih.has_value() && b_ih->defined();
  const bool has_bh = recurrent && b_hh.has_value() && b_hh->defined();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cell_gates", [&] {
    using T = scalar_t;
    T* g = gates.data_ptr<T>();
    const T* bi = has_bi ? b_ih->data_ptr<T>() : nullptr;
    const T* bh = has_bh ? b_hh->data_ptr<T>() : nullptr;
    for (int64_t n = 0; n < N; ++n) {
      T* row = g + n * G;
      if (bi) copy_row(row, bi, G);
      else zero_row(row, G);
      if (bh) add_into(row, bh, G);
    }
    gemm_abt<T>(N, G, I, x.data_ptr<T>(), I, w_ih.data_ptr<T>(), I, T(1), g, G);
    if (recurrent) gemm_abt<T>(N, G, Hh, h.data_ptr<T>(), Hh, w_hh.data_ptr<T>(), Hh, T(1), g, G);
  });
  return gates;
}

std::tuple<Tensor, Tensor> lstm_cell(const Tensor& x_, const Tensor& h_, const Tensor& c_, const Tensor& w_ih,
                                     const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                                     const std::optional<Tensor>& b_hh) {
  Tensor x = x_.contiguous(), h = h_.contiguous(), c = c_.contiguous();
  Tensor gates = cell_gates(x, h, w_ih.contiguous(), w_hh.contiguous(), b_ih, b_hh, true, "lstm_cell");
  const int64_t N = x.size(0), H = gates.size(1) / 4;
  check_same(x, c, "c", {N, H});
  Tensor h_new = at::empty({N, H}, x.options()), c_new = at::empty({N, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_cell", [&] {
    using T = scalar_t;
    T *g = gates.data_ptr<T>(), *hn = h_new.data_ptr<T>(), *cn = c_new.data_ptr<T>();
    const T* cp = c.data_ptr<T>();
    at::parallel_for(0, N, row_grain(4 * H), [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) lstm_row(g + n * 4 * H, (const T*)nullptr, cp + n * H, cn + n * H, hn + n * H, H);
    });
  });
  return {h_new, c_new};
}

Tensor gru_cell(const Tensor& x_, const Tensor& h_, const Tensor& w_ih, const Tensor& w_hh_,
                const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh_) {
  Tensor x = x_.contiguous(), h = h_.contiguous(), w_hh = w_hh_.contiguous();
  const int64_t N = x.size(0), H = h.size(1), G = 3 * H;
  // the input part with b_ih; the recurrent part separately (r gates it)
  Tensor xg = cell_gates(x, h, w_ih.contiguous(), w_hh, b_ih, std::nullopt, false, "gru_cell");
  Tensor b_hh = (b_hh_.has_value() && b_hh_->defined()) ? b_hh_->contiguous() : at::zeros({G}, x.options());
  Tensor hh = at::empty({N, G}, x.options()), rzn = at::empty({N, G}, x.options()), hn = at::empty({N, H}, x.options());
  Tensor h_new = at::empty({N, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gru_cell", [&] {
    using T = scalar_t;
    gemm_abt<T>(N, G, H, h.data_ptr<T>(), H, w_hh.data_ptr<T>(), H, T(0), hh.data_ptr<T>(), G);
    const T *xgp = xg.data_ptr<T>(), *hhp = hh.data_ptr<T>(), *bh = b_hh.data_ptr<T>(), *hp = h.data_ptr<T>();
    T *rz = rzn.data_ptr<T>(), *hnp = hn.data_ptr<T>(), *o = h_new.data_ptr<T>();
    at::parallel_for(0, N, row_grain(G), [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n)
        gru_row(xgp + n * G, hhp + n * G, bh, hp + n * H, rz + n * G, hnp + n * H, o + n * H, H);
    });
  });
  return h_new;
}

Tensor rnn_cell(const Tensor& x_, const Tensor& h_, const Tensor& w_ih, const Tensor& w_hh,
                const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, int64_t act) {
  TORCH_CHECK(act == 0 || act == 1, "rnnkit_fused::rnn_cell: act must be 0 (tanh) or 1 (relu), got ", act);
  Tensor x = x_.contiguous(), h = h_.contiguous();
  Tensor pre = cell_gates(x, h, w_ih.contiguous(), w_hh.contiguous(), b_ih, b_hh, true, "rnn_cell");
  const int64_t N = x.size(0), H = pre.size(1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnn_cell", [&] {
    using T = scalar_t;
    T* p = pre.data_ptr<T>();
    for (int64_t n = 0; n < N; ++n) rnn_act_row(p + n * H, (const T*)nullptr, H, act);
  });
  return pre;
}

// Which instruction set the gate math was compiled for (reported by `rnnkit info`).
std::string capability() {
#if defined(CPU_CAPABILITY_AVX2)
  return "AVX2";
#else
  return "DEFAULT";
#endif
}

int64_t uses_blas() { return (sgemm_ != nullptr && dgemm_ != nullptr) ? 1 : 0; }

}  // namespace
}  // namespace rnnkit_fused

TORCH_LIBRARY(rnnkit_fused, m) {
  m.def("rnn_fwd(Tensor xp, Tensor w_hh, Tensor h0, Tensor? lengths, int act) -> (Tensor, Tensor)");
  m.def("rnn_bwd(Tensor grad_out, Tensor grad_hn, Tensor w_hh, Tensor h0, Tensor? lengths, Tensor out, int act)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("lstm_fwd(Tensor xp, Tensor w_hh, Tensor? w_hr, Tensor h0, Tensor c0, Tensor? lengths)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("lstm_bwd(Tensor grad_out, Tensor grad_hn, Tensor grad_cn, Tensor w_hh, Tensor? w_hr, Tensor h0, Tensor c0,"
        " Tensor? lengths, Tensor out, Tensor gates, Tensor cs, Tensor ms) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("gru_fwd(Tensor xp, Tensor w_hh, Tensor? b_hh, Tensor h0, Tensor? lengths) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gru_bwd(Tensor grad_out, Tensor grad_hn, Tensor w_hh, Tensor h0, Tensor? lengths, Tensor out, Tensor rzn,"
        " Tensor hn) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("lstm_cell(Tensor x, Tensor h, Tensor c, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh)"
        " -> (Tensor, Tensor)");
  m.def("gru_cell(Tensor x, Tensor h, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh) -> Tensor");
  m.def("rnn_cell(Tensor x, Tensor h, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, int act) -> Tensor");
  m.def("peephole_fwd(Tensor xp, Tensor w_hh, Tensor w_ci, Tensor w_cf, Tensor w_co, Tensor h0, Tensor c0,"
        " Tensor? lengths) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("peephole_bwd(Tensor grad_out, Tensor grad_hn, Tensor grad_cn, Tensor w_hh, Tensor w_ci, Tensor w_cf,"
        " Tensor w_co, Tensor h0, Tensor c0, Tensor? lengths, Tensor out, Tensor gates, Tensor cs)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("indrnn_fwd(Tensor xp, Tensor u, Tensor h0, Tensor? lengths, int act) -> (Tensor, Tensor)");
  m.def("indrnn_bwd(Tensor grad_out, Tensor grad_hn, Tensor u, Tensor h0, Tensor? lengths, Tensor out, int act)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("ln_lstm_fwd(Tensor xp, Tensor w_hh, Tensor ln_w_hh, Tensor ln_w_c, Tensor ln_b_c, Tensor h0, Tensor c0,"
        " Tensor? lengths, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("ln_lstm_bwd(Tensor grad_out, Tensor grad_hn, Tensor grad_cn, Tensor w_hh, Tensor ln_w_hh, Tensor ln_w_c,"
        " Tensor ln_b_c, Tensor h0, Tensor c0, Tensor? lengths, Tensor out, Tensor gates, Tensor cs, Tensor nz,"
        " Tensor nc, Tensor rstd) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("capability() -> str", &rnnkit_fused::capability);
  m.def("uses_blas() -> int", &rnnkit_fused::uses_blas);
  m.def("ln_gru_fwd(Tensor xp, Tensor w_hh, Tensor ln_w_hh, Tensor shift, Tensor h0, Tensor? lengths, float eps)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("ln_gru_bwd(Tensor grad_out, Tensor grad_hn, Tensor w_hh, Tensor ln_w_hh, Tensor shift, Tensor h0,"
        " Tensor? lengths, Tensor out, Tensor gates, Tensor nz, Tensor rstd)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rnnkit_fused, CPU, m) {
  m.impl("rnn_fwd", &rnnkit_fused::rnn_fwd);
  m.impl("rnn_bwd", &rnnkit_fused::rnn_bwd);
  m.impl("lstm_fwd", &rnnkit_fused::lstm_fwd);
  m.impl("lstm_bwd", &rnnkit_fused::lstm_bwd);
  m.impl("gru_fwd", &rnnkit_fused::gru_fwd);
  m.impl("gru_bwd", &rnnkit_fused::gru_bwd);
  m.impl("peephole_fwd", &rnnkit_fused::peephole_fwd);
  m.impl("peephole_bwd", &rnnkit_fused::peephole_bwd);
  m.impl("indrnn_fwd", &rnnkit_fused::indrnn_fwd);
  m.impl("indrnn_bwd", &rnnkit_fused::indrnn_bwd);
  m.impl("ln_lstm_fwd", &rnnkit_fused::ln_lstm_fwd);
  m.impl("ln_lstm_bwd", &rnnkit_fused::ln_lstm_bwd);
  m.impl("lstm_cell", &rnnkit_fused::lstm_cell);
  m.impl("gru_cell", &rnnkit_fused::gru_cell);
  m.impl("rnn_cell", &rnnkit_fused::rnn_cell);
  m.impl("ln_gru_fwd", &rnnkit_fused::ln_gru_fwd);
  m.impl("ln_gru_bwd", &rnnkit_fused::ln_gru_bwd);
}
