// rnnkit's fused CPU kernels: the single-step cells (inference): the lstm_cell / gru_cell /
// rnn_cell ops and the direct CPython entry `cell_step` that skips the dispatcher.

#include "common.h"
#include "gates.h"
#include "ops.h"

#include <vector>

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

constexpr int64_t kGemvRows = 8;  // small_gemv's block of rows of W (one accumulator each)

template <typename T>
void small_gemv(int64_t G, const T* a1, int64_t K1, const T* W1, const T* a2, int64_t K2, const T* W2, const T* b1,
                const T* b2, T* y) {
  constexpr int R = int(kGemvRows);
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
  Tensor gates = rk::empty({N, 4 * H}, x.options());
  Tensor h_new = rk::empty({N, H}, x.options()), c_new = rk::empty({N, H}, x.options());
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
  Tensor scratch = rk::empty({gru_cell_scratch(N, H)}, x.options());
  Tensor h_new = rk::empty({N, H}, x.options());
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
  Tensor out = rk::empty({N, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnn_cell", [&] {
    using T = scalar_t;
    rnn_cell_raw<T>(N, I, H, x.data_ptr<T>(), h.data_ptr<T>(), w_ih.data_ptr<T>(), w_hh.data_ptr<T>(),
                    opt_ptr<T>(b_ih), opt_ptr<T>(b_hh), act, out.data_ptr<T>());
  });
  return out;
}

// ================================================================ direct single-step entry (kernel side)
// One plain inference step for cell_py.cpp's CPython entry `cell_step` (which reads and checks the
// arguments): kind 0 lstm, 1 gru, 2 rnn tanh, 3 rnn relu; h0_/c0_/b_ih/b_hh may be null (zeros);
// x (N, I) and the weights contiguous, float32 or float64; writes h_new (and c_new for the LSTM).
template <typename T>
T* scratch(size_t n) {
  thread_local std::vector<T> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

void direct_step(long kind, int64_t N, int64_t I, int64_t H, const Tensor& x, const Tensor* h0_, const Tensor* c0_,
                 const Tensor& w_ih, const Tensor& w_hh, const Tensor* b_ih, const Tensor* b_hh, Tensor& h_new,
                 Tensor& c_new) {
  const int64_t G = (kind == 0 ? 4 : kind == 1 ? 3 : 1) * H;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cell_step", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    const T *wi = w_ih.data_ptr<T>(), *wh = w_hh.data_ptr<T>();
    const T *bi = b_ih ? b_ih->data_ptr<T>() : nullptr, *bh = b_hh ? b_hh->data_ptr<T>() : nullptr;
    const T* h0 = h0_ ? h0_->data_ptr<T>() : nullptr;  // null: zeros (the product is skipped)
    if (kind == 0) {
      T* g = scratch<T>(N * G + (c0_ ? 0 : N * H));
      const T* c0 = c0_ ? c0_->data_ptr<T>() : nullptr;
      if (!c0) {
        zero_row(g + N * G, N * H);
        c0 = g + N * G;
      }
      lstm_cell_raw<T>(N, I, H, xp, h0, c0, wi, wh, bi, bh, g, h_new.data_ptr<T>(), c_new.data_ptr<T>());
    } else if (kind == 1) {
      const int64_t S = gru_cell_scratch(N, H);
      T* s = scratch<T>(S + (h0 ? 0 : N * H));
      if (!h0) {  // gru_row reads h0 itself
        zero_row(s + S, N * H);
        h0 = s + S;
      }
      gru_cell_raw<T>(N, I, H, xp, h0, wi, wh, bi, bh, s, h_new.data_ptr<T>());
    } else {
      rnn_cell_raw<T>(N, I, H, xp, h0, wi, wh, bi, bh, kind - 2, h_new.data_ptr<T>());
    }
  });
}


// ================================================================ inference-only layer forward (kernel side)
// One plain inference call of a one-layer, one-direction RNN/LSTM/GRU over a whole sequence, for
// cell_py.cpp's CPython entry `layer_run` (which reads and checks the arguments). Writes only what
// the layer returns: no saved gates, cell states or per-step buffers for a backward. x is
// (L, N, I) or, batch_first, (N, L, I), contiguous; out is (L, N, H) whatever x's layout (the entry
// returns its transposed view for batch_first, as torch.nn's op does); h_n/c_n (N, H); h0_/c0_/b_ih/b_hh
// may be null (zeros). Row (t, n) of x and the projection is row n * L + t (batch_first) or t * N + n;
// of out, t * N + n.
//  * the input projection in chunks of steps (common.h, project_chunk) into one reused buffer, each
//    chunk before its steps (BLAS; the small kernel for fewer than kSmallRows rows), with b_ih + b_hh
//    (LSTM, RNN) or b_ih (GRU) folded in;
//  * each step's recurrent product on the small register-blocked GEMV of the cells for a batch
//    under kSmallRows (BLAS's per-call cost dominates there; W_hh read as torch stores it, so no
//    transposed copy per call), else MKL's packed GEMM (Recurrent, packed once per call);
//  * the gate math in place in a (N, G) scratch; the LSTM cell state in two (N, H) rows swapped
//    per step; h_{t-1} is read from out.
// One step (L == 1) is the cell's own step: both products in one pass (lstm/gru/rnn_cell_raw).
template <typename T>
void layer_infer_raw(long kind, int64_t L, int64_t N, int64_t I, int64_t H, bool batch_first, const T* x,
                     const T* h0, const T* c0, const T* w_ih, const Tensor& w_hh_, const T* bi, const T* bh,
                     T* out, T* hn, T* cn) {
  const T* w_hh = w_hh_.data_ptr<T>();
  const int64_t G = (kind == 0 ? 4 : kind == 1 ? 3 : 1) * H;
  if (L == 1) {  // (N, 1, I) and (1, N, I) are the same rows: the cell step
    if (kind == 0) {
      T* g = scratch<T>(N * G + (c0 ? 0 : N * H));
      if (!c0) {
        zero_row(g + N * G, N * H);
        c0 = g + N * G;
      }
      lstm_cell_raw<T>(N, I, H, x, h0, c0, w_ih, w_hh, bi, bh, g, out, cn);
    } else if (kind == 1) {
      const int64_t S = gru_cell_scratch(N, H);
      T* s = scratch<T>(S + (h0 ? 0 : N * H));
      if (!h0) {
        zero_row(s + S, N * H);
        h0 = s + S;
      }
      gru_cell_raw<T>(N, I, H, x, h0, w_ih, w_hh, bi, bh, s, out);
    } else {
      rnn_cell_raw<T>(N, I, H, x, h0, w_ih, w_hh, bi, bh, kind - 2, out);
    }
    copy_row(hn, out, N * H);
    return;
  }
  const int64_t rows = L * N;
  // the projection of a chunk of steps (C N, G) in a tensor of its own (freed after the call); scratch: the step's gates (N, G),
  // two cell-state buffers (N, H) (LSTM; the GRU's hn (N, H) in one), the GRU's r/z/n (N, G), a zero b_hh (G)
  // and a zero h0 (N, H)
  const int64_t C = project_chunk(L, N, G);  // steps per chunk of the projection (common.h)
  const Tensor xp_keep = rk::empty({C * N, G}, w_hh_.options());
  T* xp = xp_keep.data_ptr<T>();
  T* g = scratch<T>(N * G + 2 * N * H + N * G + G + N * H);
  T* ca = g + N * G;
  T* cb = ca + N * H;
  T* rz = cb + N * H;
  T* zb = rz + N * G;
  T* zh = zb + G;
  const bool gru = kind == 1;
  const bool serial_projection = serial_once(rows * G * I);  // project.cpp's rule (kSerialOnceMacs), per call
  // the projection of steps [t0, t1) into xp: row (t, n) at ((t - t0) N + n) G, or (batch_first, where a
  // row's steps are contiguous in x) at (n (t1 - t0) + t - t0) G
  auto project = [&](int64_t t0, int64_t t1) {
    const OneThread one(serial_projection);
    const T* b2 = gru ? (const T*)nullptr : bh;
    if (!batch_first) {
      cell_gates_raw<T>((t1 - t0) * N, G, I, H, x + t0 * N * I, (const T*)nullptr, w_ih, w_hh, bi, b2, xp);
    } else {
      for (int64_t n = 0; n < N; ++n)
        cell_gates_raw<T>(t1 - t0, G, I, H, x + (n * L + t0) * I, (const T*)nullptr, w_ih, w_hh, bi, b2,
                          xp + n * (t1 - t0) * G);
    }
  };
  if (gru && !bh) {
    zero_row(zb, G);
    bh = zb;
  }
  if (!h0 && gru) {
    zero_row(zh, N * H);
  }
  // a batch of 1 to 3: the dot-product kernel on W_hh as it is (measured, LSTM N=1 H=1024 T=100 under no_grad:
  // 114 ms against 691 ms with the panel GEMM threaded on a loaded machine, and 1.1 ms a step against the panel
  // GEMM's 1.6 ms on one thread; docs/fused.md, "The recurrent product")
  const bool small = N < kSmallRows;
  std::unique_ptr<Recurrent<T>> rec;
  if (!small) rec = std::make_unique<Recurrent<T>>(N, G, H, true, w_hh_);
  const int64_t ldh = H;  // h rows of one step in out (time-major)
  T* cp = ca;
  if (kind == 0) {
    if (c0) copy_row(cp, c0, N * H);
    else zero_row(cp, N * H);
  }
  int64_t t0 = 0, t1 = 0;  // the chunk of steps whose projection xp holds
  for (int64_t t = 0; t < L; ++t) {
    if (t == t1) {
      t0 = t, t1 = std::min(L, t + C);
      project(t0, t1);
    }
    const T* hp = t == 0 ? h0 : out + (t - 1) * N * H;  // row n at hp + n * ldh (h0: n * H)
    const int64_t ldp = t == 0 ? H : ldh;
    T* ot = out + t * N * H;
    // the recurrent product into g (kind 2/3: into out's rows, the activation applies in place)
    T* dst = kind >= 2 ? ot : g;
    const int64_t ldd = kind >= 2 ? ldh : G;
    if (!hp) {
      for (int64_t n = 0; n < N; ++n) zero_row(dst + n * ldd, G);
    } else if (small) {
      // the rows of W_hh in blocks of kGemvRows, split over threads when the product is large enough
      // (a batch of 1-3 is memory-bound on W_hh: two cores read it about 1.4x as fast as one)
      const int64_t blocks = (G + kGemvRows - 1) / kGemvRows;
      over_panels(blocks, serial_gemm(N, G, H) ? 1 : at::get_num_threads(), [&](int64_t b0, int64_t b1) {
        const int64_t g0 = b0 * kGemvRows, g1 = std::min(G, b1 * kGemvRows);
        for (int64_t n = 0; n < N; ++n)
          small_gemv<T>(g1 - g0, hp + n * ldp, H, w_hh + g0 * H, (const T*)nullptr, 0, w_hh + g0 * H,
                        (const T*)nullptr, (const T*)nullptr, dst + n * ldd + g0);
      });
    } else {
      (*rec)(hp, ldp, T(0), dst, ldd);
    }
    T* cn_t = cp == ca ? cb : ca;
    for (int64_t n = 0; n < N; ++n) {
      const T* xr = xp + (batch_first ? n * (t1 - t0) + t - t0 : (t - t0) * N + n) * G;
      if (kind == 0) {
        lstm_row(g + n * G, xr, cp + n * H, cn_t + n * H, ot + n * ldh, H);
      } else if (kind == 1) {
        const T* hprev = hp ? hp + n * ldp : zh + n * H;
        gru_row(xr, g + n * G, bh, hprev, rz + n * G, cb + n * H, ot + n * ldh, H);
      } else {
        rnn_act_row(ot + n * ldh, xr, H, kind - 2);
      }
    }
    if (kind == 0) cp = cn_t;
  }
  const T* last = out + (L - 1) * N * H;
  for (int64_t n = 0; n < N; ++n) copy_row(hn + n * H, last + n * ldh, H);
  if (kind == 0) copy_row(cn, cp, N * H);
}

void layer_infer(long kind, int64_t L, int64_t N, int64_t I, int64_t H, bool batch_first, const Tensor& x,
                 const Tensor* h0_, const Tensor* c0_, const Tensor& w_ih, const Tensor& w_hh, const Tensor* b_ih,
                 const Tensor* b_hh, Tensor& out, Tensor& h_n, Tensor& c_n) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "layer_run", [&] {
    using T = scalar_t;
    layer_infer_raw<T>(kind, L, N, I, H, batch_first, x.data_ptr<T>(), h0_ ? h0_->data_ptr<T>() : nullptr,
                       c0_ ? c0_->data_ptr<T>() : nullptr, w_ih.data_ptr<T>(), w_hh,
                       b_ih ? b_ih->data_ptr<T>() : nullptr, b_hh ? b_hh->data_ptr<T>() : nullptr,
                       out.data_ptr<T>(), h_n.data_ptr<T>(), kind == 0 ? c_n.data_ptr<T>() : nullptr);
  });
}

}  // namespace rnnkit_fused::cell
