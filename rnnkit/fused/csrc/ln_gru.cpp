// rnnkit's fused CPU kernels: LayerNorm GRU, whole sequence, forward and backward.

#include "common.h"
#include "gates.h"
#include "ops.h"
#include "regularize.h"

namespace rnnkit_fused::ln_gru {

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

// ln_gru_reg_fwd / ln_gru_reg_bwd: the time loop with the runner's zoneout and recurrent dropout
// (regularize.h: the mask r only in W_hh (h_{t-1} r); z h_{t-1} reads the unmasked state); ln_gru_fwd /
// ln_gru_bwd are the same loop without them.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ln_gru_reg_fwd(
    const Tensor& xp_, const Tensor& w_hh_, const Tensor& g_hh_, const Tensor& shift_, const Tensor& h0_,
    const std::optional<Tensor>& lengths, double eps_, const std::optional<Tensor>& rd_,
    const std::optional<Tensor>& zh_, double zh_rate) {
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
  check_reg(xp, rd_, zh_, std::nullopt, zh_rate, 0.0, L, N, H, H, "ln_gru_reg_fwd", 1);
  Tensor rd = opt_contig(rd_), zh = opt_contig(zh_);
  const bool zoh = zh.defined() || zh_rate > 0;
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor out = rk::empty({L, N, H}, xp.options());
  Tensor gates = rk::empty({L, N, G}, xp.options());
  Tensor nzs = rk::empty({L, N, G}, xp.options());
  Tensor rstd = rk::empty({L, N}, xp.options());
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "ln_gru_fwd", [&] {
    using T = scalar_t;
    const T eps = T(eps_);
    const Keep<T> kh(zh, zh_rate);
    Tensor hr_buf = rd.defined() ? rk::empty({N, H}, xp.options()) : Tensor();
    Tensor m_buf = zoh ? rk::empty({N, H}, xp.options()) : Tensor();
    const Recurrent<T> rec(N, G, H, true, w_hh);
    const T *x = xp.data_ptr<T>(), *gain = g_hh.data_ptr<T>(), *sh = shift.data_ptr<T>();
    const T *h_init = h0.data_ptr<T>(), *r = rd.defined() ? rd.data_ptr<T>() : nullptr;
    T *o = out.data_ptr<T>(), *gs = gates.data_ptr<T>(), *nz = nzs.data_ptr<T>(), *rs = rstd.data_ptr<T>();
    T *hr = r ? hr_buf.data_ptr<T>() : nullptr, *mb = zoh ? m_buf.data_ptr<T>() : nullptr;
    const int64_t min_len = min_length(len, N, L), grain = row_grain(2 * G);
    for (int64_t t = 0; t < L; ++t) {
      const T* hp = t == 0 ? h_init : o + (t - 1) * N * H;
      T *gt = gs + t * N * G, *ot = o + t * N * H, *nzt = nz + t * N * G, *rst = rs + t * N;
      T* htil = zoh ? mb : ot;  // h~_t
      rec_step(rec, hp, r, hr, N, H, gt, G);
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
            ln_gru_row(gt + n * G, xt + n * G, gain, sh, hp + n * H, htil + n * H, nzt + n * G, rst + n, H, eps);
            if (zoh) zoneout_mix(kh, (t * N + n) * H, hp + n * H, htil + n * H, ot + n * H, H);
          }
        }
      });
    }
  });
  Tensor h_n = L > 0 ? out[L - 1].clone() : h0.clone();
  return {out, h_n, gates, nzs, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ln_gru_fwd(const Tensor& xp, const Tensor& w_hh,
                                                              const Tensor& g_hh, const Tensor& shift,
                                                              const Tensor& h0,
                                                              const std::optional<Tensor>& lengths, double eps) {
  return ln_gru_reg_fwd(xp, w_hh, g_hh, shift, h0, lengths, eps, std::nullopt, std::nullopt, 0.0);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ln_gru_reg_bwd(
    const Tensor& grad_out_, const Tensor& grad_hn_, const Tensor& w_hh_, const Tensor& g_hh_, const Tensor& shift_,
    const Tensor& h0_, const std::optional<Tensor>& lengths, const Tensor& out_, const Tensor& gates_,
    const Tensor& nzs_, const Tensor& rstd_, const std::optional<Tensor>& rd_, const std::optional<Tensor>& zh_,
    double zh_rate) {
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
  check_reg(out, rd_, zh_, std::nullopt, zh_rate, 0.0, L, N, H, H, "ln_gru_reg_bwd", 1);
  Tensor rd = opt_contig(rd_), zh = opt_contig(zh_);
  const bool zoh = zh.defined() || zh_rate > 0;
  Tensor dt_buf = zoh ? rk::empty({N, H}, out.options()) : Tensor();
  Tensor kb_buf = zoh ? rk::empty({N, H}, out.options()) : Tensor();
  Tensor rb_buf = rd.defined() ? rk::empty({N, H}, out.options()) : Tensor();
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor dX = rk::empty({L, N, G}, out.options());
  Tensor dZ = rk::empty({L, N, G}, out.options());
  Tensor dG_rows = rk::zeros({N, G}, out.options()), dB_rows = rk::zeros({N, G}, out.options());
  Tensor dh_a = grad_hn.clone(), dh_b = rk::empty({N, H}, out.options());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "ln_gru_bwd", [&] {
    using T = scalar_t;
    const Keep<T> kh(zh, zh_rate);
    const T* r = rd.defined() ? rd.data_ptr<T>() : nullptr;
    T *dtl = zoh ? dt_buf.data_ptr<T>() : nullptr, *kb = zoh ? kb_buf.data_ptr<T>() : nullptr;
    T* rb = r ? rb_buf.data_ptr<T>() : nullptr;
    const Recurrent<T> rec(N, H, G, false, w_hh);
    const T *go = grad_out.data_ptr<T>(), *o = out.data_ptr<T>(), *h_init = h0.data_ptr<T>();
    const T *gs = gates.data_ptr<T>(), *nz = nzs.data_ptr<T>(), *rs = rstd.data_ptr<T>();
    const T *gain = g_hh.data_ptr<T>(), *sh = shift.data_ptr<T>();
    T *dx = dX.data_ptr<T>(), *dz = dZ.data_ptr<T>(), *dgr = dG_rows.data_ptr<T>(), *dbr = dB_rows.data_ptr<T>();
    T *dh = dh_a.data_ptr<T>(), *dn = dh_b.data_ptr<T>();
    const int64_t min_len = min_length(len, N, L), grain = row_grain(2 * G);
    for (int64_t t = L - 1; t >= 0; --t) {
      add_into(dh, go + t * N * H, N * H);  // dL/dh_t (the mixed state)
      const T* dht = dh;                     // dL/dh~_t
      if (zoh) {
        zoneout_rest(kh, t * N * H, dh, dtl, N * H);
        dht = dtl;
      }
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
            ln_gru_grad_row(gt + n * G, nzt + n * G, rst[n], gain, sh, hp + n * H, dht + n * H, dxt + n * G,
                            dgr + n * G, dbr + n * G, dzt + n * G, dn + n * H, H);
            if (zoh) {  // dL/dh_{t-1} += k dL/dh_t
              zoneout_kept(kh, (t * N + n) * H, dh + n * H, kb + n * H, H);
              add_into(dn + n * H, kb + n * H, H);
            }
          }
        }
      });
      rec_grad(rec, dzt, G, r, rb, dh, dn, len, t, check, N, H);
      std::swap(dh, dn);
    }
    if (dh != dh_a.data_ptr<T>()) std::swap(dh_a, dh_b);
  });
  Tensor grad_w_hh = weight_grad(dZ, masked_previous(previous_states(h0, out, len), rd));
  // the LN gain and β: each row summed its steps inside the loop (held steps add nothing), rows summed here
  return {dX, grad_w_hh, dG_rows.sum(0), dB_rows.sum(0), dh_a};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ln_gru_bwd(
    const Tensor& grad_out, const Tensor& grad_hn, const Tensor& w_hh, const Tensor& g_hh, const Tensor& shift,
    const Tensor& h0, const std::optional<Tensor>& lengths, const Tensor& out, const Tensor& gates, const Tensor& nzs,
    const Tensor& rstd) {
  return ln_gru_reg_bwd(grad_out, grad_hn, w_hh, g_hh, shift, h0, lengths, out, gates, nzs, rstd, std::nullopt,
                        std::nullopt, 0.0);
}

}  // namespace rnnkit_fused::ln_gru
