// rnnkit's fused CPU kernels: LayerNorm LSTM, whole sequence, forward and backward.

#include "common.h"
#include "gates.h"
#include "ops.h"
#include "regularize.h"

namespace rnnkit_fused::ln_lstm {

// a = xp + γ_hh ⊙ LN(z), z = W_hh h_{t-1} (the caller folds b_ih, b_hh and the LN_hh shift into xp);
// i, f, g, o from a; c_t = f c_{t-1} + i g; h_t = o tanh(γ_c ⊙ LN(c_t) + β_c). LN(v) = (v - μ) / sqrt(σ² + eps),
// biased variance, as F.layer_norm.

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
  // LN(z) is formed in the gate pass itself (one pass over the G values, not two)
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    auto pre = [&](int64_t k) {
      const Vec<T> n = (Vec<T>::loadu(z + k * H + j, cnt) - mv) * rv;
      n.store(nz + k * H + j, cnt);
      return Vec<T>::loadu(x + k * H + j, cnt) + Vec<T>::loadu(ghh + k * H + j, cnt) * n;
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
// Three passes: (1) dy, the o gate, the LN_c sums; (2) the i, f, g gates and dc_{t-1}; the LN_hh input
// dn = dg γ_hh and its sums are formed as each gate's dg is; (3) dz from dn.
template <typename T>
inline void ln_lstm_grad_row(const T* g, const T* ghh, const T* gc, const T* bc, const T* cp, const T* nz,
                             const T* nc, const T* rs, const T* dm, T* dc, T* dg, T* dz, T* dy, int64_t H) {
  using V = Vec<T>;
  constexpr int64_t VS = V::size();
  const int64_t G = 4 * H;
  const V one(T(1));
  auto sum = [](const V& v) { return at::vec::vec_reduce_all<T>([](V& x, V& z) { return x + z; }, v); };
  // (1) dy = dh o (1 - tanh² y); dn_c = dy γ_c and its sums for the LN_c backward
  V a1(T(0)), a2(T(0)), b1(T(0)), b2(T(0));
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    V n = V::loadu(nc + j, cnt), gcv = V::loadu(gc + j, cnt);
    V ty = ptanh(gcv * n + V::loadu(bc + j, cnt));
    V o = V::loadu(g + 3 * H + j, cnt), d = V::loadu(dm + j, cnt);
    V dyv = d * o * (one - ty * ty);
    dyv.store(dy + j, cnt);
    V dnc = dyv * gcv;
    a1 = a1 + dnc;
    a2 = at::vec::fmadd(dnc, n, a2);
    V dgo = d * ty * o * (one - o);  // zero past cnt (d is zero-filled there)
    dgo.store(dg + 3 * H + j, cnt);
    V dn = dgo * V::loadu(ghh + 3 * H + j, cnt);
    dn.store(dz + 3 * H + j, cnt);
    b1 = b1 + dn;
    b2 = at::vec::fmadd(dn, V::loadu(nz + 3 * H + j, cnt), b2);
  }
  const V m1(sum(a1) / T(H)), m2(sum(a2) / T(H)), rc(rs[1]);
  // (2) dc_t, the i, f, g gates, dc_{t-1}; dn = dg γ_hh for them
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    V n = V::loadu(nc + j, cnt);
    V dnc = V::loadu(dy + j, cnt) * V::loadu(gc + j, cnt);
    V dct = V::loadu(dc + j, cnt) + rc * (dnc - m1 - n * m2);
    V i = V::loadu(g + j, cnt), f = V::loadu(g + H + j, cnt), gg = V::loadu(g + 2 * H + j, cnt);
    V dgi = dct * gg * i * (one - i), dgf = dct * V::loadu(cp + j, cnt) * f * (one - f);
    V dgg = dct * i * (one - gg * gg);
    if (cnt < VS) {  // past cnt dct is not zero (m1): keep those lanes out of the sums
      dgi = V::set(V(T(0)), dgi, cnt), dgf = V::set(V(T(0)), dgf, cnt), dgg = V::set(V(T(0)), dgg, cnt);
    }
    dgi.store(dg + j, cnt);
    dgf.store(dg + H + j, cnt);
    dgg.store(dg + 2 * H + j, cnt);
    (dct * f).store(dc + j, cnt);
    V dni = dgi * V::loadu(ghh + j, cnt), dnf = dgf * V::loadu(ghh + H + j, cnt);
    V dng = dgg * V::loadu(ghh + 2 * H + j, cnt);
    dni.store(dz + j, cnt);
    dnf.store(dz + H + j, cnt);
    dng.store(dz + 2 * H + j, cnt);
    b1 = b1 + dni + dnf + dng;
    b2 = at::vec::fmadd(dni, V::loadu(nz + j, cnt), b2);
    b2 = at::vec::fmadd(dnf, V::loadu(nz + H + j, cnt), b2);
    b2 = at::vec::fmadd(dng, V::loadu(nz + 2 * H + j, cnt), b2);
  }
  // (3) LN_hh: dz = rstd (dn - mean(dn) - nz mean(dn nz))
  const V n1(sum(b1) / T(G)), n2(sum(b2) / T(G)), rh(rs[0]);
  for (int64_t j = 0; j < G; j += VS) {
    const int64_t cnt = std::min(VS, G - j);
    (rh * (V::loadu(dz + j, cnt) - n1 - V::loadu(nz + j, cnt) * n2)).store(dz + j, cnt);
  }
}

// The LN parameters' gradients of one row: acc_hh (G) += dg ⊙ LN(z), acc_gc (H) += dy ⊙ LN(c), acc_bc (H) += dy,
// accumulated in double (sums over every step and row).
template <typename T>
inline void ln_lstm_param_sums(const T* dg, const T* nz, const T* dy, const T* nc, int64_t H, double* acc_hh,
                               double* acc_gc, double* acc_bc) {
  for (int64_t j = 0; j < 4 * H; ++j) acc_hh[j] += double(dg[j]) * double(nz[j]);
  for (int64_t j = 0; j < H; ++j) {
    acc_gc[j] += double(dy[j]) * double(nc[j]);
    acc_bc[j] += double(dy[j]);
  }
}

// ln_lstm_reg_fwd / ln_lstm_reg_bwd: the time loop with the runner's zoneout and recurrent dropout
// (regularize.h); ln_lstm_fwd / ln_lstm_bwd are the same loop without them. cs holds the mixed c_t; the
// backward needs no pre-zoneout c~_t (LN(c~_t) and its 1/std are saved).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ln_lstm_reg_fwd(
    const Tensor& xp_, const Tensor& w_hh_, const Tensor& g_hh_, const Tensor& g_c_, const Tensor& b_c_,
    const Tensor& h0_, const Tensor& c0_, const std::optional<Tensor>& lengths, double eps_,
    const std::optional<Tensor>& rd_, const std::optional<Tensor>& zh_, const std::optional<Tensor>& zc_,
    double zh_rate, double zc_rate) {
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
  check_reg(xp, rd_, zh_, zc_, zh_rate, zc_rate, L, N, H, H, "ln_lstm_reg_fwd");
  Tensor rd = opt_contig(rd_), zh = opt_contig(zh_), zc = opt_contig(zc_);
  const bool zoc = zc.defined() || zc_rate > 0, zoh = zh.defined() || zh_rate > 0;
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor out = rk::empty({L, N, H}, xp.options());
  Tensor gates = rk::empty({L, N, G}, xp.options());
  Tensor cs = rk::empty({L, N, H}, xp.options());
  Tensor nzs = rk::empty({L, N, G}, xp.options());
  Tensor ncs = rk::empty({L, N, H}, xp.options());
  Tensor rstd = rk::empty({L, N, 2}, xp.options());
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "ln_lstm_fwd", [&] {
    using T = scalar_t;
    const T eps = T(eps_);
    const Keep<T> kh(zh, zh_rate), kc(zc, zc_rate);
    Tensor hr_buf = rd.defined() ? rk::empty({N, H}, xp.options()) : Tensor();
    Tensor m_buf = zoh ? rk::empty({N, H}, xp.options()) : Tensor();
    const Recurrent<T> rec(N, G, H, true, w_hh);
    const T* x = xp.data_ptr<T>();
    const T *ghh = g_hh.data_ptr<T>(), *gc = g_c.data_ptr<T>(), *bc = b_c.data_ptr<T>();
    const T *h_init = h0.data_ptr<T>(), *c_init = c0.data_ptr<T>(), *r = rd.defined() ? rd.data_ptr<T>() : nullptr;
    T *o = out.data_ptr<T>(), *gs = gates.data_ptr<T>(), *c = cs.data_ptr<T>();
    T *nz = nzs.data_ptr<T>(), *nc = ncs.data_ptr<T>(), *rs = rstd.data_ptr<T>();
    T *hr = r ? hr_buf.data_ptr<T>() : nullptr, *mb = zoh ? m_buf.data_ptr<T>() : nullptr;
    const int64_t min_len = min_length(len, N, L), grain = row_grain(2 * G);
    for (int64_t t = 0; t < L; ++t) {
      const T* hp = t == 0 ? h_init : o + (t - 1) * N * H;
      const T* cp = t == 0 ? c_init : c + (t - 1) * N * H;
      T *gt = gs + t * N * G, *ct = c + t * N * H, *ot = o + t * N * H;
      T *nzt = nz + t * N * G, *nct = nc + t * N * H, *rst = rs + t * N * 2;
      T* htil = zoh ? mb : ot;  // h~_t
      rec_step(rec, hp, r, hr, N, H, gt, G);
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
            ln_lstm_row(gt + n * G, xt + n * G, ghh, gc, bc, cp + n * H, ct + n * H, htil + n * H, nzt + n * G,
                        nct + n * H, rst + 2 * n, H, eps);
            if (zoc) zoneout_mix(kc, (t * N + n) * H, cp + n * H, ct + n * H, ct + n * H, H);
            if (zoh) zoneout_mix(kh, (t * N + n) * H, hp + n * H, htil + n * H, ot + n * H, H);
          }
        }
      });
    }
  });
  Tensor h_n = L > 0 ? out[L - 1].clone() : h0.clone();
  Tensor c_n = L > 0 ? cs[L - 1].clone() : c0.clone();
  return {out, h_n, c_n, gates, cs, nzs, ncs, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ln_lstm_fwd(
    const Tensor& xp, const Tensor& w_hh, const Tensor& g_hh, const Tensor& g_c, const Tensor& b_c,
    const Tensor& h0, const Tensor& c0, const std::optional<Tensor>& lengths, double eps) {
  return ln_lstm_reg_fwd(xp, w_hh, g_hh, g_c, b_c, h0, c0, lengths, eps, std::nullopt, std::nullopt, std::nullopt,
                         0.0, 0.0);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ln_lstm_reg_bwd(
    const Tensor& grad_out_, const Tensor& grad_hn_, const Tensor& grad_cn_, const Tensor& w_hh_,
    const Tensor& g_hh_, const Tensor& g_c_, const Tensor& b_c_, const Tensor& h0_, const Tensor& c0_,
    const std::optional<Tensor>& lengths, const Tensor& out_, const Tensor& gates_, const Tensor& cs_,
    const Tensor& nzs_, const Tensor& ncs_, const Tensor& rstd_, const std::optional<Tensor>& rd_,
    const std::optional<Tensor>& zh_, const std::optional<Tensor>& zc_, double zh_rate, double zc_rate) {
  check_dim(out_, 3, "ln_lstm_bwd", "out");
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
  check_same(out, h0, "h0", {N, H});
  check_same(out, c0, "c0", {N, H});
  check_reg(out, rd_, zh_, zc_, zh_rate, zc_rate, L, N, H, H, "ln_lstm_reg_bwd");
  Tensor rd = opt_contig(rd_), zh = opt_contig(zh_), zc = opt_contig(zc_);
  const bool zoc = zc.defined() || zc_rate > 0, zoh = zh.defined() || zh_rate > 0;
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor dG = rk::empty({L, N, G}, out.options());
  Tensor dZ = rk::empty({L, N, G}, out.options());
  Tensor dh_a = grad_hn.clone(), dh_b = rk::empty({N, H}, out.options()), dc = grad_cn.clone();
  Tensor dt_buf = zoh ? rk::empty({N, H}, out.options()) : Tensor();
  Tensor kc_buf = zoc ? rk::empty({N, H}, out.options()) : Tensor();
  Tensor rb_buf = rd.defined() ? rk::empty({N, H}, out.options()) : Tensor();
  // the LN parameters' gradients, summed over steps and rows as the loop goes: one double accumulator
  // (G + 2H) and one dy row (H) per thread, added up in thread order after the loop
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads()), P = G + 2 * H;
  Tensor acc = rk::zeros({threads, P}, out.options().dtype(at::kDouble));
  Tensor dy_rows = rk::empty({threads, H}, out.options());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "ln_lstm_bwd", [&] {
    using T = scalar_t;
    const Keep<T> kh(zh, zh_rate), kc(zc, zc_rate);
    const T* r = rd.defined() ? rd.data_ptr<T>() : nullptr;
    T *dtl = zoh ? dt_buf.data_ptr<T>() : nullptr, *kcb = zoc ? kc_buf.data_ptr<T>() : nullptr;
    T* rb = r ? rb_buf.data_ptr<T>() : nullptr;
    const Recurrent<T> rec(N, H, G, false, w_hh);
    const T* go = grad_out.data_ptr<T>();
    const T *gs = gates.data_ptr<T>(), *c = cs.data_ptr<T>(), *c_init = c0.data_ptr<T>();
    const T *nz = nzs.data_ptr<T>(), *nc = ncs.data_ptr<T>(), *rs = rstd.data_ptr<T>();
    const T *ghh = g_hh.data_ptr<T>(), *gc = g_c.data_ptr<T>(), *bc = b_c.data_ptr<T>();
    T *dg = dG.data_ptr<T>(), *dz = dZ.data_ptr<T>(), *dy_all = dy_rows.data_ptr<T>();
    double* acc_all = acc.data_ptr<double>();
    T *dh = dh_a.data_ptr<T>(), *dn = dh_b.data_ptr<T>(), *dcp = dc.data_ptr<T>();
    const int64_t min_len = min_length(len, N, L), grain = row_grain(2 * G);
    for (int64_t t = L - 1; t >= 0; --t) {
      add_into(dh, go + t * N * H, N * H);  // dL/dh_t (the mixed state)
      const T* dht = dh;                     // dL/dh~_t
      if (zoh) {
        zoneout_rest(kh, t * N * H, dh, dtl, N * H);
        dht = dtl;
      }
      const T* cp = t == 0 ? c_init : c + (t - 1) * N * H;
      const T *gt = gs + t * N * G, *nzt = nz + t * N * G, *nct = nc + t * N * H, *rst = rs + t * N * 2;
      T *dgt = dg + t * N * G, *dzt = dz + t * N * G;
      const bool check = len && t >= min_len;
      at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
        const int64_t tid = at::get_thread_num();
        TORCH_CHECK(tid >= 0 && tid < threads, "rnnkit_fused::ln_lstm_bwd: thread ", tid, " of ", threads);
        double* a = acc_all + tid * P;
        T* dy = dy_all + tid * H;
        for (int64_t n = b; n < e; ++n) {
          if (check && t >= len[n]) {  // held: h and c pass through unchanged (and add nothing to the sums)
            zero_row(dgt + n * G, G);
            zero_row(dzt + n * G, G);
            copy_row(dn + n * H, dh + n * H, H);
          } else {
            const int64_t off = (t * N + n) * H;
            if (zoc) zoneout_split(kc, off, dcp + n * H, kcb + n * H, H);
            ln_lstm_grad_row(gt + n * G, ghh, gc, bc, cp + n * H, nzt + n * G, nct + n * H, rst + 2 * n,
                             dht + n * H, dcp + n * H, dgt + n * G, dzt + n * G, dy, H);
            if (zoc) add_into(dcp + n * H, kcb + n * H, H);
            ln_lstm_param_sums(dgt + n * G, nzt + n * G, dy, nct + n * H, H, a, a + G, a + G + H);
            if (zoh) zoneout_kept(kh, off, dh + n * H, dn + n * H, H);
            else zero_row(dn + n * H, H);
          }
        }
      });
      rec_grad(rec, dzt, G, r, rb, dh, dn, len, t, check, N, H);
      std::swap(dh, dn);
    }
    if (dh != dh_a.data_ptr<T>()) std::swap(dh_a, dh_b);
  });
  Tensor grad_w_hh = weight_grad(dZ, masked_previous(previous_states(h0, out, len), rd));
  // the LN gains and shift: the threads' sums, added in thread order
  auto part = [&](int64_t from, int64_t n) { return acc.narrow(1, from, n).sum(0).to(out.scalar_type()); };
  Tensor grad_g_hh = part(0, G), grad_g_c = part(G, H), grad_b_c = part(G + H, H);  // three separate tensors
  return {dG, grad_w_hh, grad_g_hh, grad_g_c, grad_b_c, dh_a, dc};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ln_lstm_bwd(
    const Tensor& grad_out, const Tensor& grad_hn, const Tensor& grad_cn, const Tensor& w_hh, const Tensor& g_hh,
    const Tensor& g_c, const Tensor& b_c, const Tensor& h0, const Tensor& c0, const std::optional<Tensor>& lengths,
    const Tensor& out, const Tensor& gates, const Tensor& cs, const Tensor& nzs, const Tensor& ncs,
    const Tensor& rstd) {
  return ln_lstm_reg_bwd(grad_out, grad_hn, grad_cn, w_hh, g_hh, g_c, b_c, h0, c0, lengths, out, gates, cs, nzs, ncs,
                         rstd, std::nullopt, std::nullopt, std::nullopt, 0.0, 0.0);
}

}  // namespace rnnkit_fused::ln_lstm
