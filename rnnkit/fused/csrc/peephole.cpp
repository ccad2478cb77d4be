// rnnkit's fused CPU kernels: peephole LSTM, whole sequence, forward and backward.

#include "common.h"
#include "gates.h"
#include "ops.h"
#include "regularize.h"

namespace rnnkit_fused::peephole {

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

// peephole_reg_fwd / peephole_reg_bwd: the time loop with the runner's zoneout and recurrent dropout
// (regularize.h); peephole_fwd / peephole_bwd are the same loop without them. Besides out, h_n, c_n and
// the gates it returns cs (the cell states c_t, mixed) and cn (L, N, H): the pre-zoneout c~_t that the
// output gate saw and whose tanh made h~_t (empty without zoneout on c: then cs is c~).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> peephole_reg_fwd(
    const Tensor& xp_, const Tensor& w_hh_, const Tensor& w_ci_, const Tensor& w_cf_, const Tensor& w_co_,
    const Tensor& h0_, const Tensor& c0_, const std::optional<Tensor>& lengths, const std::optional<Tensor>& rd_,
    const std::optional<Tensor>& zh_, const std::optional<Tensor>& zc_, double zh_rate, double zc_rate) {
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
  check_reg(xp, rd_, zh_, zc_, zh_rate, zc_rate, L, N, H, H, "peephole_reg_fwd");
  Tensor rd = opt_contig(rd_), zh = opt_contig(zh_), zc = opt_contig(zc_);
  const bool zoc = zc.defined() || zc_rate > 0, zoh = zh.defined() || zh_rate > 0;
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor out = rk::empty({L, N, H}, xp.options());
  Tensor gates = rk::empty({L, N, G}, xp.options());
  Tensor cs = rk::empty({L, N, H}, xp.options());
  Tensor cn_all = zoc ? rk::empty({L, N, H}, xp.options()) : rk::empty({0}, xp.options());
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "peephole_fwd", [&] {
    using T = scalar_t;
    const Keep<T> kh(zh, zh_rate), kc(zc, zc_rate);
    Tensor hr_buf = rd.defined() ? rk::empty({N, H}, xp.options()) : Tensor();
    Tensor m_buf = zoh ? rk::empty({N, H}, xp.options()) : Tensor();
    const Recurrent<T> rec(N, G, H, true, w_hh);
    const T* x = xp.data_ptr<T>();
    const T *wci = w_ci.data_ptr<T>(), *wcf = w_cf.data_ptr<T>(), *wco = w_co.data_ptr<T>();
    const T *h_init = h0.data_ptr<T>(), *c_init = c0.data_ptr<T>(), *r = rd.defined() ? rd.data_ptr<T>() : nullptr;
    T *o = out.data_ptr<T>(), *gs = gates.data_ptr<T>(), *c = cs.data_ptr<T>();
    T *cn = zoc ? cn_all.data_ptr<T>() : nullptr, *hr = r ? hr_buf.data_ptr<T>() : nullptr;
    T* mb = zoh ? m_buf.data_ptr<T>() : nullptr;
    const int64_t min_len = min_length(len, N, L), grain = row_grain(G);
    for (int64_t t = 0; t < L; ++t) {
      const T* hp = t == 0 ? h_init : o + (t - 1) * N * H;
      const T* cp = t == 0 ? c_init : c + (t - 1) * N * H;
      T *gt = gs + t * N * G, *ct = c + t * N * H, *ot = o + t * N * H;
      T* ctil = zoc ? cn + t * N * H : ct;  // c~_t
      T* htil = zoh ? mb : ot;              // h~_t
      rec_step(rec, hp, r, hr, N, H, gt, G);
      const T* xt = x + t * N * G;
      const bool check = len && t >= min_len;
      at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          if (check && t >= len[n]) {
            copy_row(ct + n * H, cp + n * H, H);
            if (zoc) copy_row(ctil + n * H, cp + n * H, H);
            copy_row(ot + n * H, hp + n * H, H);
          } else {
            peephole_row(gt + n * G, xt + n * G, wci, wcf, wco, cp + n * H, ctil + n * H, htil + n * H, H);
            if (zoc) zoneout_mix(kc, (t * N + n) * H, cp + n * H, ctil + n * H, ct + n * H, H);
            if (zoh) zoneout_mix(kh, (t * N + n) * H, hp + n * H, htil + n * H, ot + n * H, H);
          }
        }
      });
    }
  });
  Tensor h_n = L > 0 ? out[L - 1].clone() : h0.clone();
  Tensor c_n = L > 0 ? cs[L - 1].clone() : c0.clone();
  return {out, h_n, c_n, gates, cs, cn_all};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> peephole_fwd(const Tensor& xp, const Tensor& w_hh,
                                                                 const Tensor& w_ci, const Tensor& w_cf,
                                                                 const Tensor& w_co, const Tensor& h0,
                                                                 const Tensor& c0,
                                                                 const std::optional<Tensor>& lengths) {
  auto [out, h_n, c_n, gates, cs, cn] = peephole_reg_fwd(xp, w_hh, w_ci, w_cf, w_co, h0, c0, lengths, std::nullopt,
                                                         std::nullopt, std::nullopt, 0.0, 0.0);
  return {out, h_n, c_n, gates, cs};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> peephole_reg_bwd(
    const Tensor& grad_out_, const Tensor& grad_hn_, const Tensor& grad_cn_, const Tensor& w_hh_,
    const Tensor& w_ci_, const Tensor& w_cf_, const Tensor& w_co_, const Tensor& h0_, const Tensor& c0_,
    const std::optional<Tensor>& lengths, const Tensor& out_, const Tensor& gates_, const Tensor& cs_,
    const Tensor& cn_, const std::optional<Tensor>& rd_, const std::optional<Tensor>& zh_,
    const std::optional<Tensor>& zc_, double zh_rate, double zc_rate) {
  check_dim(out_, 3, "peephole_bwd", "out");
  const int64_t L = out_.size(0), N = out_.size(1), H = out_.size(2), G = 4 * H;
  Tensor grad_out = grad_out_.contiguous(), grad_hn = grad_hn_.contiguous(), grad_cn = grad_cn_.contiguous();
  Tensor w_hh = w_hh_.contiguous(), h0 = h0_.contiguous(), c0 = c0_.contiguous(), out = out_.contiguous();
  Tensor w_ci = w_ci_.contiguous(), w_cf = w_cf_.contiguous(), w_co = w_co_.contiguous();
  Tensor gates = gates_.contiguous(), cs = cs_.contiguous(), cn = cn_.contiguous();
  check_same(out, grad_out, "grad_out", out.sizes());
  check_same(out, grad_hn, "grad_h_n", {N, H});
  check_same(out, grad_cn, "grad_c_n", {N, H});
  check_same(out, gates, "gates", {L, N, G});
  check_same(out, cs, "cs", {L, N, H});
  check_same(out, w_hh, "w_hh", {G, H});
  check_same(out, w_ci, "w_ci", {H});
  check_same(out, w_cf, "w_cf", {H});
  check_same(out, w_co, "w_co", {H});
  check_same(out, h0, "h0", {N, H});
  check_same(out, c0, "c0", {N, H});
  check_reg(out, rd_, zh_, zc_, zh_rate, zc_rate, L, N, H, H, "peephole_reg_bwd");
  Tensor rd = opt_contig(rd_), zh = opt_contig(zh_), zc = opt_contig(zc_);
  const bool zoc = zc.defined() || zc_rate > 0, zoh = zh.defined() || zh_rate > 0;
  if (zoc) check_same(out, cn, "cn", {L, N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor dG = rk::empty({L, N, G}, out.options());
  Tensor dh_a = grad_hn.clone(), dh_b = rk::empty({N, H}, out.options()), dc = grad_cn.clone();
  Tensor dt_buf = zoh ? rk::empty({N, H}, out.options()) : Tensor();
  Tensor kc_buf = zoc ? rk::empty({N, H}, out.options()) : Tensor();
  Tensor rb_buf = rd.defined() ? rk::empty({N, H}, out.options()) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "peephole_bwd", [&] {
    using T = scalar_t;
    const Keep<T> kh(zh, zh_rate), kc(zc, zc_rate);
    const Recurrent<T> rec(N, H, G, false, w_hh);
    const T* go = grad_out.data_ptr<T>();
    const T *gs = gates.data_ptr<T>(), *c = cs.data_ptr<T>(), *c_init = c0.data_ptr<T>();
    const T* ctil = zoc ? cn.data_ptr<T>() : c;  // the c~_t the output gate saw
    const T *wci = w_ci.data_ptr<T>(), *wcf = w_cf.data_ptr<T>(), *wco = w_co.data_ptr<T>();
    const T* r = rd.defined() ? rd.data_ptr<T>() : nullptr;
    T *dg = dG.data_ptr<T>(), *dh = dh_a.data_ptr<T>(), *dn = dh_b.data_ptr<T>(), *dcp = dc.data_ptr<T>();
    T *dtl = zoh ? dt_buf.data_ptr<T>() : nullptr, *kcb = zoc ? kc_buf.data_ptr<T>() : nullptr;
    T* rb = r ? rb_buf.data_ptr<T>() : nullptr;
    const int64_t min_len = min_length(len, N, L), grain = row_grain(G);
    for (int64_t t = L - 1; t >= 0; --t) {
      add_into(dh, go + t * N * H, N * H);  // dL/dh_t (the mixed state)
      const T* dht = dh;                     // dL/dh~_t
      if (zoh) {
        zoneout_rest(kh, t * N * H, dh, dtl, N * H);
        dht = dtl;
      }
      const T* cp = t == 0 ? c_init : c + (t - 1) * N * H;
      const T *gt = gs + t * N * G, *ct = ctil + t * N * H;
      T* dgt = dg + t * N * G;
      const bool check = len && t >= min_len;
      at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          if (check && t >= len[n]) {  // held: h and c pass through unchanged
            zero_row(dgt + n * G, G);
            copy_row(dn + n * H, dh + n * H, H);
          } else {
            const int64_t off = (t * N + n) * H;
            if (zoc) zoneout_split(kc, off, dcp + n * H, kcb + n * H, H);
            peephole_grad_row(gt + n * G, wci, wcf, wco, cp + n * H, ct + n * H, dht + n * H, dcp + n * H,
                              dgt + n * G, H);
            if (zoc) add_into(dcp + n * H, kcb + n * H, H);
            if (zoh) zoneout_kept(kh, off, dh + n * H, dn + n * H, H);
            else zero_row(dn + n * H, H);
          }
        }
      });
      rec_grad(rec, dgt, G, r, rb, dh, dn, len, t, check, N, H);
      std::swap(dh, dn);
    }
    if (dh != dh_a.data_ptr<T>()) std::swap(dh_a, dh_b);
  });
  Tensor grad_w_hh = weight_grad(dG, masked_previous(previous_states(h0, out, len), rd));
  // the peepholes: sum over steps and rows of the gate gradient times the cell state it saw: c_{t-1} (the
  // mixed state) for i and f, c~_t for o (held steps have zero gate gradients, so they add nothing)
  Tensor c_prev = previous_states(c0, cs, len);
  const std::array<int64_t, 2> steps_rows{0, 1};  // owned: an IntArrayRef of a braced list would dangle
  const OneThread one(serial_elems(cs.numel()));
  Tensor grad_ci = dG.narrow(2, 0, H).mul(c_prev).sum(steps_rows);
  Tensor grad_cf = dG.narrow(2, H, H).mul(c_prev).sum(steps_rows);
  Tensor grad_co = dG.narrow(2, 3 * H, H).mul(zero_held(zoc ? cn : cs, len, false)).sum(steps_rows);
  return {dG, grad_w_hh, grad_ci, grad_cf, grad_co, dh_a, dc};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> peephole_bwd(
    const Tensor& grad_out, const Tensor& grad_hn, const Tensor& grad_cn, const Tensor& w_hh, const Tensor& w_ci,
    const Tensor& w_cf, const Tensor& w_co, const Tensor& h0, const Tensor& c0, const std::optional<Tensor>& lengths,
    const Tensor& out, const Tensor& gates, const Tensor& cs) {
  return peephole_reg_bwd(grad_out, grad_hn, grad_cn, w_hh, w_ci, w_cf, w_co, h0, c0, lengths, out, gates, cs, cs,
                          std::nullopt, std::nullopt, std::nullopt, 0.0, 0.0);
}

}  // namespace rnnkit_fused::peephole
