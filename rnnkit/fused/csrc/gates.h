// rnnkit's fused CPU kernels: the gate math that several kernel files share, one row of one step.
// The RNN, LSTM and GRU rows serve the whole-sequence kernels (float32/float64 and, on float32 rows,
// bfloat16) and the single-step cells (cell.cpp); load_sum also the peephole LSTM; the full-precision
// activations and the layer-norm statistics both LayerNorm kernels.

#pragma once

#include "common.h"

namespace rnnkit_fused {

// ---------------------------------------------------------------- RNN (tanh / relu)

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
  const Vec<T> one(T(1));
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    Vec<T> d = Vec<T>::loadu(dh + j, cnt), y = Vec<T>::loadu(h + j, cnt);
    Vec<T> r = act == 0 ? d * (one - y * y) : relu_grad(d, y);
    r.store(dpre + j, cnt);
  }
}
// ---------------------------------------------------------------- LSTM

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
// ---------------------------------------------------------------- GRU

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
// ---------------------------------------------------------------- LayerNorm LSTM and GRU

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
// float32: tanh x = sign(x) (1 - e) / (1 + e), e = exp(-2|x|) with Sleef's 1-ulp exp: a few times cheaper
// than Sleef's tanh, within about 1e-7 absolute (the relative error grows only where |tanh x| < 1e-3)
template <>
inline Vec<float> ptanh(const Vec<float>& x) {
  const Vec<float> one(1.f), ax = x.abs();
  const Vec<float> e = (ax * Vec<float>(-2.f)).exp();
  const Vec<float> t = (one - e) / (one + e);
  return Vec<float>::blendv(t, t.neg(), x < Vec<float>(0.f));
}

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


}  // namespace rnnkit_fused
