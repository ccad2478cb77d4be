// rnnkit's fused CPU kernels: zoneout and recurrent dropout inside a time loop, shared by the families
// that run them (lstm.cpp, peephole.cpp, ln_lstm.cpp, ln_gru.cpp). They are the runner's regularizers
// (rnnkit/runner.py, apply_regularizers); the masks are drawn in Python by bernoulli_mask, never here:
//   * recurrent dropout: the recurrent product reads h_{t-1} * r (r (N, H_out), already 1/keep-scaled);
//     everything else (a GRU's z h_{t-1}, the zoneout mix) reads the unmasked h_{t-1};
//   * zoneout: after each step s_t = k s_{t-1} + (1 - k) s~_t for h (k from zo_h (L, N, H_out)) and c
//     (zo_c (L, N, H)), or the constant rates (eval: the expectation) where no mask is given;
//   * a row past its length holds its state (no mixing), as without regularizers.
// The backward, per step t, from dL/ds_t (of the mixed state): dL/ds~_t = (1 - k) dL/ds_t goes into the
// cell's gradient, and k dL/ds_t joins dL/ds_{t-1}; with recurrent dropout dL/dh_{t-1} gets
// r * (dL/dz W_hh) and the weight gradient reads h_{t-1} * r.

#pragma once

#include "common.h"

namespace rnnkit_fused {

template <typename T>
struct Keep {  // one state's zoneout keep probability: a per-step mask, a constant rate, or off
  const T* mask = nullptr;
  T rate = T(0), rest = T(1);
  bool on = false;
  Keep(const Tensor& m, double r) {
    if (m.defined()) {
      mask = m.data_ptr<T>();
      on = true;
    } else if (r > 0) {
      rate = T(r);
      rest = T(1.0 - r);
      on = true;
    }
  }
  inline Vec<T> k(const T* at, int64_t j, int64_t cnt) const { return mask ? Vec<T>::loadu(at + j, cnt) : Vec<T>(rate); }
  inline Vec<T> one_minus(const Vec<T>& kv) const { return mask ? Vec<T>(T(1)) - kv : Vec<T>(rest); }
};

// dst = k prev + (1 - k) cur (dst may be cur); off: the (t, n) row's offset into the mask
template <typename T>
inline void zoneout_mix(const Keep<T>& z, int64_t off, const T* prev, const T* cur, T* dst, int64_t S) {
  constexpr int64_t VS = Vec<T>::size();
  const T* m = z.mask ? z.mask + off : nullptr;
  for (int64_t j = 0; j < S; j += VS) {
    const int64_t cnt = std::min(VS, S - j);
    const Vec<T> kv = z.k(m, j, cnt);
    (kv * Vec<T>::loadu(prev + j, cnt) + z.one_minus(kv) * Vec<T>::loadu(cur + j, cnt)).store(dst + j, cnt);
  }
}

// dst = (1 - k) src over n values from offset off (the part of a state gradient that reaches s~_t)
template <typename T>
inline void zoneout_rest(const Keep<T>& z, int64_t off, const T* src, T* dst, int64_t n) {
  constexpr int64_t VS = Vec<T>::size();
  const T* m = z.mask ? z.mask + off : nullptr;
  for (int64_t j = 0; j < n; j += VS) {
    const int64_t cnt = std::min(VS, n - j);
    (z.one_minus(z.k(m, j, cnt)) * Vec<T>::loadu(src + j, cnt)).store(dst + j, cnt);
  }
}

// dst = k src (the part of a state gradient that skips the step: dL/ds_{t-1} += k dL/ds_t)
template <typename T>
inline void zoneout_kept(const Keep<T>& z, int64_t off, const T* src, T* dst, int64_t n) {
  constexpr int64_t VS = Vec<T>::size();
  const T* m = z.mask ? z.mask + off : nullptr;
  for (int64_t j = 0; j < n; j += VS) {
    const int64_t cnt = std::min(VS, n - j);
    (z.k(m, j, cnt) * Vec<T>::loadu(src + j, cnt)).store(dst + j, cnt);
  }
}

// One row's cell-state gradient around a cell's backward row, with zoneout on c: the row function takes
// dL/dc~_t in dc and leaves its dL/dc_{t-1} there, so split dL/dc_t first (dc = (1 - k) dL/dc_t, kept =
// k dL/dc_t) and add the kept part back after.
template <typename T>
inline void zoneout_split(const Keep<T>& z, int64_t off, T* dc, T* kept, int64_t H) {
  zoneout_kept(z, off, dc, kept, H);
  zoneout_rest(z, off, dc, dc, H);
}

template <typename T>
inline void mul_row(const T* a, const T* b, T* dst, int64_t n) {
  constexpr int64_t VS = Vec<T>::size();
  for (int64_t j = 0; j < n; j += VS) {
    const int64_t cnt = std::min(VS, n - j);
    (Vec<T>::loadu(a + j, cnt) * Vec<T>::loadu(b + j, cnt)).store(dst + j, cnt);
  }
}

// The regularizer arguments' checks: rd_mask (N, P), zo_h (L, N, P), zo_c (L, N, H), rates in [0, 1); a GRU
// (one state: states 1) has no zo_c. The dtype (float32, float64) is checked where a regularizer is given, or
// always for an op that exists for them only (`always`: lstm_reg_*, gru_reg_*; the zoo's loops serve their
// plain ops too)
inline void check_reg(const Tensor& ref, const std::optional<Tensor>& rd, const std::optional<Tensor>& zh,
                      const std::optional<Tensor>& zc, double zh_rate, double zc_rate, int64_t L, int64_t N,
                      int64_t P, int64_t H, const char* op, int states = 2, bool always = false) {
  const bool any = always || (rd.has_value() && rd->defined()) || (zh.has_value() && zh->defined()) ||
                   (zc.has_value() && zc->defined()) || zh_rate != 0 || zc_rate != 0;
  TORCH_CHECK(!any || ref.scalar_type() == at::kFloat || ref.scalar_type() == at::kDouble, "rnnkit_fused::", op,
              ": zoneout and recurrent dropout run in float32 and float64 only, got ", ref.scalar_type());
  if (rd.has_value() && rd->defined()) check_same(ref, *rd, "rd_mask", {N, P});
  if (zh.has_value() && zh->defined()) check_same(ref, *zh, "zo_h", {L, N, P});
  if (zc.has_value() && zc->defined()) check_same(ref, *zc, "zo_c", {L, N, H});
  if (states == 1) {
    TORCH_CHECK(zh_rate >= 0 && zh_rate < 1, "rnnkit_fused::", op, ": the zoneout rate must be in [0, 1), got ",
                zh_rate);
  } else {
    TORCH_CHECK(zh_rate >= 0 && zh_rate < 1 && zc_rate >= 0 && zc_rate < 1, "rnnkit_fused::", op,
                ": zoneout rates must be in [0, 1), got ", zh_rate, " and ", zc_rate);
  }
}

inline Tensor opt_contig(const std::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : Tensor();
}

// The backward's recurrent product with recurrent dropout: dn += r * (dG W_hh) for the rows live at step t
// (rb: an (N, P) buffer; a held row's dn already holds its passed-through gradient)
template <typename T>
inline void masked_rec_grad(const Recurrent<T>& rec, const T* dgt, int64_t G, const T* r, T* rb, T* dn,
                            const int64_t* len, int64_t t, bool check, int64_t N, int64_t P) {
  rec(dgt, G, T(0), rb, P);
  for (int64_t n = 0; n < N; ++n) {
    if (check && t >= len[n]) continue;
    mul_row(rb + n * P, r + n * P, rb + n * P, P);
    add_into(dn + n * P, rb + n * P, P);
  }
}

// The forward's recurrent product of a step: dst (N, G) = h_{t-1} W_hh^T from hp (N, P), with recurrent dropout
// (r) of h_{t-1} * r (hr: an (N, P) buffer)
template <typename T>
inline void rec_step(const Recurrent<T>& rec, const T* hp, const T* r, T* hr, int64_t N, int64_t P, T* dst,
                     int64_t G) {
  if (r) mul_row(hp, r, hr, N * P);
  rec(r ? hr : hp, P, T(0), dst, G);
}

// The backward's recurrent product of step t into dn (N, P): dn += dG W_hh, and a held row's dn passed
// through again (pass_held_rows); with recurrent dropout (r) masked_rec_grad
template <typename T>
inline void rec_grad(const Recurrent<T>& rec, const T* dgt, int64_t G, const T* r, T* rb, const T* dh, T* dn,
                     const int64_t* len, int64_t t, bool check, int64_t N, int64_t P) {
  if (r) {
    masked_rec_grad(rec, dgt, G, r, rb, dn, len, t, check, N, P);
    return;
  }
  rec(dgt, G, T(1), dn, P);
  if (check) pass_held_rows(len, t, N, P, dh, dn);
}

// h_{t-1} as the recurrent product read it: prev (L, N, P), a fresh tensor of the op's own (previous_states),
// times r (N, P) at every step, in place
inline Tensor masked_previous(Tensor prev, const Tensor& rd) {
  if (!rd.defined() || prev.numel() == 0) return prev;
  const int64_t L = prev.size(0), NP = prev.numel() / std::max<int64_t>(L, 1);
  AT_DISPATCH_FLOATING_TYPES(prev.scalar_type(), "masked_previous", [&] {
    using T = scalar_t;
    T* x = prev.data_ptr<T>();
    const T* r = rd.data_ptr<T>();
    for (int64_t t = 0; t < L; ++t) mul_row(static_cast<const T*>(x + t * NP), r, x + t * NP, NP);
  });
  return prev;
}

}  // namespace rnnkit_fused
