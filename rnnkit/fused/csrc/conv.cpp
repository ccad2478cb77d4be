// rnnkit's fused CPU kernels: ConvLSTM and ConvGRU (1 to 3 spatial dims), whole sequence, forward
// and backward.

#include "common.h"
#include "gates.h"
#include "ops.h"
#include <ATen/core/grad_mode.h>

namespace rnnkit_fused::conv {

// ================================================================ ConvLSTM / ConvGRU
//
// The gated part of rnnkit.zoo.conv's ConvLSTM and ConvGRU (1 to 3 spatial dims).
// Layout: xp (L, N, G, *S), the input convolution of every step done by the
// caller (ATen, one convolution over L * N); G = 4 hidden (LSTM, b_ih + b_hh in
// xp) or 3 hidden (GRU, b_ih only); h, c (N, hidden, *S); w_hh (G, hidden, *k).
// Per step: the recurrent convolution U * h_{t-1} through ATen ('same' padding,
// stride 1, dilation 1, exactly rnnkit.zoo.conv.conv_same: an even kernel pads one
// more after than before), then ONE vectorized pass for gates and state update.
// For one row n the gate blocks are contiguous runs of HP = hidden * prod(S)
// elements, so the row math is the dense kernels' with H = HP; the pass is split
// into (row, block of HP) tasks for at::parallel_for.
// Backward: per step (reverse) the fused gate gradients, then
// at::convolution_backward for the part of dh_{t-1} through U; the gradient of
// w_hh (and the GRU's b_hh) is ONE convolution_backward over all L * N steps
// after the loop. Lengths as everywhere: row n is live for t < lengths[n]; steps
// where every row is held skip the convolution.

// The multiply-adds of one step's recurrent convolution: N rows, each (G x hid x kernel) per output position.
inline int64_t conv_step_macs(int64_t N, const Tensor& w_hh, int64_t P) { return N * w_hh.numel() * P; }
inline bool serial_conv(int64_t macs) { return macs < kSerialConvMacs; }

struct ConvSame {
  int64_t nd;
  std::vector<int64_t> before, flat_pad, ones, zeros;
  bool symmetric = true;

  explicit ConvSame(const Tensor& w) : nd(w.dim() - 2), ones(w.dim() - 2, 1), zeros(w.dim() - 2, 0) {
    for (int64_t d = 0; d < nd; ++d) {
      const int64_t total = w.size(2 + d) - 1;
      before.push_back(total / 2);
      if (total % 2) symmetric = false;
    }
    for (int64_t d = nd - 1; d >= 0; --d) {  // constant_pad_nd lists the last dim first
      const int64_t total = w.size(2 + d) - 1;
      flat_pad.push_back(total / 2);
      flat_pad.push_back(total - total / 2);
    }
  }

  // U * h (+ b): (B, hidden, *S) -> (B, G, *S)
  Tensor conv(const Tensor& h, const Tensor& w, const std::optional<Tensor>& b) const {
    if (symmetric) return rk::convolution(h, w, b, ones, before, ones, false, zeros, 1).contiguous();
    return rk::convolution(rk::constant_pad_nd(h, flat_pad, 0), w, b, ones, zeros, ones, false, zeros, 1).contiguous();
  }

  // The input as the convolution sees it (padded for even kernels).
  Tensor padded(const Tensor& h) const { return symmetric ? h : rk::constant_pad_nd(h, flat_pad, 0); }

  // d(U * h)/dh applied to g (B, G, *S): (B, hidden, *S). `like` has the
  // convolution's input shape (padded for even kernels); its values are not read
  // by the input gradient.
  Tensor grad_input(const Tensor& g, const Tensor& like, const Tensor& w) const {
    Tensor gi = std::get<0>(rk::convolution_backward(g, like, w, std::nullopt, ones, symmetric ? before : zeros, ones,
                                                     false, zeros, 1, {true, false, false}));
    if (!symmetric)
      for (int64_t d = 0; d < nd; ++d) gi = gi.narrow(2 + d, before[d], g.size(2 + d));
    return gi;
  }

  // (grad w, grad b) of sum over B of g * (U * input + b); input unpadded (B, hidden, *S).
  std::tuple<Tensor, Tensor> grad_weight(const Tensor& g, const Tensor& input, const Tensor& w, bool bias) const {
    if (g.size(0) == 0) return {rk::zeros_like(w), rk::zeros({w.size(0)}, w.options())};
    // one convolution_backward over all L * N steps: g (L * N, G, *S), w (G, hid, *k)
    const OneThread one(serial_once(g.numel() / std::max<int64_t>(w.size(0), 1) * w.numel()));
    std::vector<int64_t> bias_sizes{w.size(0)};
    auto r = rk::convolution_backward(g, padded(input), w, bias ? at::OptionalIntArrayRef(bias_sizes) : std::nullopt,
                                      ones, symmetric ? before : zeros, ones, false, zeros, 1, {false, true, bias});
    return {std::get<1>(r), bias ? std::get<2>(r) : Tensor()};
  }
};

// Checks xp (L, N, gates * hidden, *S) against w_hh (gates * hidden, hidden, *k);
// returns hidden.
int64_t check_conv_seq(const Tensor& xp, const Tensor& w_hh, int64_t gates, const char* op) {
  TORCH_CHECK(xp.dim() >= 4 && xp.dim() <= 6, "rnnkit_fused::", op,
              ": xp must be (L, N, G, *S) with 1 to 3 spatial dims, got ", xp.sizes());
  TORCH_CHECK(xp.scalar_type() == at::kFloat || xp.scalar_type() == at::kDouble, "rnnkit_fused::", op,
              ": float32 or float64 only, got ", xp.scalar_type());
  const int64_t nd = xp.dim() - 3;
  TORCH_CHECK(w_hh.dim() == nd + 2 && w_hh.size(0) == gates * w_hh.size(1), "rnnkit_fused::", op, ": w_hh must be (",
              gates, "*hidden, hidden, *kernel) with ", nd, " kernel dims (as xp has spatial dims), got ",
              w_hh.sizes());
  TORCH_CHECK(w_hh.scalar_type() == xp.scalar_type(), "rnnkit_fused: w_hh has dtype ", w_hh.scalar_type(),
              ", expected ", xp.scalar_type());
  TORCH_CHECK(xp.size(2) == w_hh.size(0), "rnnkit_fused::", op, ": xp's channel axis (2) must be G = ", gates,
              "*hidden = ", w_hh.size(0), ", got ", xp.size(2));
  return w_hh.size(1);
}

// (prefix..., sizes of t from axis `from` on)
std::vector<int64_t> conv_shape(std::initializer_list<int64_t> prefix, const Tensor& t, int64_t from) {
  std::vector<int64_t> s(prefix);
  for (int64_t d = from; d < t.dim(); ++d) s.push_back(t.size(d));
  return s;
}

inline int64_t max_length(const int64_t* len, int64_t N, int64_t L) {
  if (!len) return L;
  int64_t m = 0;
  for (int64_t n = 0; n < N; ++n) m = std::max(m, len[n]);
  return std::min(m, L);
}

// f(n, j0, j1) over every row n and block [j0, j1) of its HP elements, in parallel
// when there is enough work (about 4k elements per chunk).
template <typename F>
void for_row_blocks(int64_t N, int64_t HP, const F& f) {
  constexpr int64_t kBlock = 2048;  // a multiple of every vector width
  if (N == 0 || HP == 0) return;
  const int64_t nb = (HP + kBlock - 1) / kBlock;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::min(kBlock, HP));
  at::parallel_for(0, N * nb, grain, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const int64_t n = k / nb, j0 = (k % nb) * kBlock;
      f(n, j0, std::min(HP, j0 + kBlock));
    }
  });
}

// One ConvLSTM row, elements [j0, j1) of each gate block. a = xp + U * h_{t-1} (x + hh);
// i = σ(a_i + w_ci c_{t-1}), f = σ(a_f + w_cf c_{t-1}), g = tanh(a_g), c_t = f c_{t-1} + i g,
// o = σ(a_o + w_co c_t), h_t = o tanh(c_t); without peepholes (wci null) those terms are absent.
// Writes the activations (i, f, g, o) into gs, c_t and h_t.
template <typename T>
inline void conv_lstm_row(const T* x, const T* hh, const T* wci, const T* wcf, const T* wco, const T* cp, T* gs, T* c,
                          T* h, int64_t HP, int64_t j0, int64_t j1) {
  constexpr int64_t VS = Vec<T>::size();
  for (int64_t j = j0; j < j1; j += VS) {
    const int64_t cnt = std::min(VS, j1 - j);
    const Vec<T> cpv = Vec<T>::loadu(cp + j, cnt);
    Vec<T> ai = Vec<T>::loadu(x + j, cnt) + Vec<T>::loadu(hh + j, cnt);
    Vec<T> af = Vec<T>::loadu(x + HP + j, cnt) + Vec<T>::loadu(hh + HP + j, cnt);
    Vec<T> ag = Vec<T>::loadu(x + 2 * HP + j, cnt) + Vec<T>::loadu(hh + 2 * HP + j, cnt);
    Vec<T> ao = Vec<T>::loadu(x + 3 * HP + j, cnt) + Vec<T>::loadu(hh + 3 * HP + j, cnt);
    if (wci) {
      ai = ai + Vec<T>::loadu(wci + j, cnt) * cpv;
      af = af + Vec<T>::loadu(wcf + j, cnt) * cpv;
    }
    const Vec<T> i = vsigmoid(ai), f = vsigmoid(af), g = vtanh(ag);
    const Vec<T> cn = f * cpv + i * g;
    if (wco) ao = ao + Vec<T>::loadu(wco + j, cnt) * cn;
    const Vec<T> o = vsigmoid(ao);
    i.store(gs + j, cnt);
    f.store(gs + HP + j, cnt);
    g.store(gs + 2 * HP + j, cnt);
    o.store(gs + 3 * HP + j, cnt);
    cn.store(c + j, cnt);
    (o * vtanh(cn)).store(h + j, cnt);
  }
}

// dm: dL/dh_t; dc: dL/dc_t on entry, dL/dc_{t-1} on exit; dg: pre-activation gradients (i, f, g, o).
template <typename T>
inline void conv_lstm_grad_row(const T* gs, const T* wci, const T* wcf, const T* wco, const T* cp, const T* c,
                               const T* dm, T* dc, T* dg, int64_t HP, int64_t j0, int64_t j1) {
  constexpr int64_t VS = Vec<T>::size();
  const Vec<T> one(T(1));
  for (int64_t j = j0; j < j1; j += VS) {
    const int64_t cnt = std::min(VS, j1 - j);
    const Vec<T> i = Vec<T>::loadu(gs + j, cnt), f = Vec<T>::loadu(gs + HP + j, cnt);
    const Vec<T> g = Vec<T>::loadu(gs + 2 * HP + j, cnt), o = Vec<T>::loadu(gs + 3 * HP + j, cnt);
    const Vec<T> tc = vtanh(Vec<T>::loadu(c + j, cnt)), cpv = Vec<T>::loadu(cp + j, cnt);
    const Vec<T> d = Vec<T>::loadu(dm + j, cnt);
    const Vec<T> dop = d * tc * o * (one - o);
    Vec<T> dct = Vec<T>::loadu(dc + j, cnt) + d * o * (one - tc * tc);
    if (wco) dct = dct + dop * Vec<T>::loadu(wco + j, cnt);
    const Vec<T> dip = dct * g * i * (one - i);
    const Vec<T> dfp = dct * cpv * f * (one - f);
    dip.store(dg + j, cnt);
    dfp.store(dg + HP + j, cnt);
    (dct * i * (one - g * g)).store(dg + 2 * HP + j, cnt);
    dop.store(dg + 3 * HP + j, cnt);
    Vec<T> dcp = dct * f;
    if (wci) dcp = dcp + dip * Vec<T>::loadu(wci + j, cnt) + dfp * Vec<T>::loadu(wcf + j, cnt);
    dcp.store(dc + j, cnt);
  }
}

// One ConvGRU row: r = σ(x_r + hh_r), z = σ(x_z + hh_z), n = tanh(x_n + r hh_n), h_t = n + z (h_{t-1} - n);
// hh = U * h_{t-1} + b_hh. Saves (r, z, n) and hh_n for the backward.
template <typename T>
inline void conv_gru_row(const T* x, const T* hh, const T* hp, T* rzn, T* hn, T* h, int64_t HP, int64_t j0,
                         int64_t j1) {
  constexpr int64_t VS = Vec<T>::size();
  for (int64_t j = j0; j < j1; j += VS) {
    const int64_t cnt = std::min(VS, j1 - j);
    const Vec<T> r = vsigmoid(Vec<T>::loadu(x + j, cnt) + Vec<T>::loadu(hh + j, cnt));
    const Vec<T> z = vsigmoid(Vec<T>::loadu(x + HP + j, cnt) + Vec<T>::loadu(hh + HP + j, cnt));
    const Vec<T> hnv = Vec<T>::loadu(hh + 2 * HP + j, cnt);
    const Vec<T> nn = vtanh(Vec<T>::loadu(x + 2 * HP + j, cnt) + r * hnv);
    r.store(rzn + j, cnt);
    z.store(rzn + HP + j, cnt);
    nn.store(rzn + 2 * HP + j, cnt);
    hnv.store(hn + j, cnt);
    (nn + z * (Vec<T>::loadu(hp + j, cnt) - nn)).store(h + j, cnt);
  }
}

// dx: gradient of xp (r, z, n pre-activations); dhh: gradient of U * h_{t-1} + b_hh;
// dnext: the direct part of dL/dh_{t-1} (z dh), the convolution's part is added by the caller.
template <typename T>
inline void conv_gru_grad_row(const T* rzn, const T* hn, const T* hp, const T* dh, T* dx, T* dhh, T* dnext, int64_t HP,
                              int64_t j0, int64_t j1) {
  constexpr int64_t VS = Vec<T>::size();
  const Vec<T> one(T(1));
  for (int64_t j = j0; j < j1; j += VS) {
    const int64_t cnt = std::min(VS, j1 - j);
    const Vec<T> r = Vec<T>::loadu(rzn + j, cnt), z = Vec<T>::loadu(rzn + HP + j, cnt);
    const Vec<T> nn = Vec<T>::loadu(rzn + 2 * HP + j, cnt), d = Vec<T>::loadu(dh + j, cnt);
    const Vec<T> dn_pre = d * (one - z) * (one - nn * nn);
    const Vec<T> dz_pre = d * (Vec<T>::loadu(hp + j, cnt) - nn) * z * (one - z);
    const Vec<T> dr_pre = dn_pre * Vec<T>::loadu(hn + j, cnt) * r * (one - r);
    dr_pre.store(dx + j, cnt);
    dz_pre.store(dx + HP + j, cnt);
    dn_pre.store(dx + 2 * HP + j, cnt);
    dr_pre.store(dhh + j, cnt);
    dz_pre.store(dhh + HP + j, cnt);
    (dn_pre * r).store(dhh + 2 * HP + j, cnt);
    (d * z).store(dnext + j, cnt);
  }
}

// dst += src on this thread (an ATen add_ of a state-sized tensor opens a thread-pool
// region per step, which costs more than the add on a busy machine)
inline void add_grad(Tensor& dst, const Tensor& src) {
  if (!src.is_contiguous()) {
    dst.add_(src);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(dst.scalar_type(), "add_grad",
                             [&] { add_into(dst.data_ptr<scalar_t>(), src.data_ptr<scalar_t>(), dst.numel()); });
}

// zero elements [j0, j1) of each of `blocks` gate blocks of one row
template <typename T>
inline void zero_blocks(T* row, int64_t blocks, int64_t HP, int64_t j0, int64_t j1) {
  for (int64_t k = 0; k < blocks; ++k) zero_row(row + k * HP + j0, j1 - j0);
}

Tensor optional_peephole(const std::optional<Tensor>& w, const Tensor& xp, at::IntArrayRef shape, const char* what) {
  if (!w.has_value() || !w->defined()) return Tensor();
  Tensor t = w->contiguous();
  check_same(xp, t, what, shape);
  return t;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> conv_lstm_fwd(
    const Tensor& xp_, const Tensor& w_hh_, const std::optional<Tensor>& w_ci_, const std::optional<Tensor>& w_cf_,
    const std::optional<Tensor>& w_co_, const Tensor& h0_, const Tensor& c0_, const std::optional<Tensor>& lengths) {
  at::NoGradGuard no_grad;
  const int64_t hid = check_conv_seq(xp_, w_hh_, 4, "conv_lstm_fwd");
  const int64_t L = xp_.size(0), N = xp_.size(1), G = 4 * hid;
  Tensor xp = xp_.contiguous(), w_hh = w_hh_.contiguous(), h0 = h0_.contiguous(), c0 = c0_.contiguous();
  const auto state_shape = conv_shape({N, hid}, xp, 3), peep_shape = conv_shape({hid}, xp, 3);
  check_same(xp, h0, "h0", state_shape);
  check_same(xp, c0, "c0", state_shape);
  const int n_peep = (w_ci_.has_value() && w_ci_->defined()) + (w_cf_.has_value() && w_cf_->defined()) +
                     (w_co_.has_value() && w_co_->defined());
  TORCH_CHECK(n_peep == 0 || n_peep == 3, "rnnkit_fused::conv_lstm_fwd: pass all three peepholes w_ci, w_cf, w_co "
              "or none, got ", n_peep);
  Tensor w_ci = optional_peephole(w_ci_, xp, peep_shape, "w_ci"), w_cf = optional_peephole(w_cf_, xp, peep_shape, "w_cf"),
         w_co = optional_peephole(w_co_, xp, peep_shape, "w_co");
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  const ConvSame same(w_hh);
  const int64_t HP = h0.numel() / std::max<int64_t>(N, 1), P = HP / std::max<int64_t>(hid, 1);
  Tensor out = rk::empty(conv_shape({L, N, hid}, xp, 3), xp.options());
  Tensor cs = rk::empty(out.sizes(), xp.options());
  Tensor gates = rk::empty(xp.sizes(), xp.options());
  const int64_t min_len = min_length(len, N, L), max_len = max_length(len, N, L);
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "conv_lstm_fwd", [&] {
    using T = scalar_t;
    const OneThread one_step(serial_conv(conv_step_macs(N, w_hh, P)));  // the time loop's convolutions
    const T *wci = w_ci.defined() ? w_ci.data_ptr<T>() : nullptr, *wcf = w_cf.defined() ? w_cf.data_ptr<T>() : nullptr,
            *wco = w_co.defined() ? w_co.data_ptr<T>() : nullptr;
    for (int64_t t = 0; t < L; ++t) {
      const Tensor hp_t = t == 0 ? h0 : out[t - 1], cp_t = t == 0 ? c0 : cs[t - 1];
      if (t >= max_len) {  // every row is past its length: hold
        out[t].copy_(hp_t);
        cs[t].copy_(cp_t);
        gates[t].zero_();
        continue;
      }
      const Tensor hh = same.conv(hp_t, w_hh, std::nullopt);
      const T *x = xp[t].data_ptr<T>(), *hhp = hh.data_ptr<T>(), *hp = hp_t.data_ptr<T>(), *cp = cp_t.data_ptr<T>();
      T *gt = gates[t].data_ptr<T>(), *ct = cs[t].data_ptr<T>(), *ot = out[t].data_ptr<T>();
      const bool check = len && t >= min_len;
      for_row_blocks(N, HP, [&](int64_t n, int64_t j0, int64_t j1) {
        const int64_t r = n * HP, rg = n * G * P;
        if (check && t >= len[n]) {  // held: the saved gates are unused, zeroed to stay deterministic
          copy_row(ct + r + j0, cp + r + j0, j1 - j0);
          copy_row(ot + r + j0, hp + r + j0, j1 - j0);
          zero_blocks(gt + rg, 4, HP, j0, j1);
        } else {
          conv_lstm_row(x + rg, hhp + rg, wci, wcf, wco, cp + r, gt + rg, ct + r, ot + r, HP, j0, j1);
        }
      });
    }
  });
  Tensor h_n = L > 0 ? out[L - 1].clone() : h0.clone();
  Tensor c_n = L > 0 ? cs[L - 1].clone() : c0.clone();
  return {out, h_n, c_n, gates, cs};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> conv_lstm_bwd(
    const Tensor& grad_out_, const Tensor& grad_hn_, const Tensor& grad_cn_, const Tensor& w_hh_,
    const std::optional<Tensor>& w_ci_, const std::optional<Tensor>& w_cf_, const std::optional<Tensor>& w_co_,
    const Tensor& h0_, const Tensor& c0_, const std::optional<Tensor>& lengths, const Tensor& out_,
    const Tensor& gates_, const Tensor& cs_) {
  at::NoGradGuard no_grad;
  const int64_t hid = check_conv_seq(gates_, w_hh_, 4, "conv_lstm_bwd");
  const int64_t L = gates_.size(0), N = gates_.size(1), G = 4 * hid;
  Tensor grad_out = grad_out_.contiguous(), grad_hn = grad_hn_.contiguous(), grad_cn = grad_cn_.contiguous();
  Tensor w_hh = w_hh_.contiguous(), h0 = h0_.contiguous(), c0 = c0_.contiguous(), out = out_.contiguous();
  Tensor gates = gates_.contiguous(), cs = cs_.contiguous();
  const auto state_shape = conv_shape({N, hid}, gates, 3), peep_shape = conv_shape({hid}, gates, 3);
  const auto seq_shape = conv_shape({L, N, hid}, gates, 3);
  check_same(gates, out, "out", seq_shape);
  check_same(gates, cs, "cs", seq_shape);
  check_same(gates, grad_out, "grad_out", seq_shape);
  check_same(gates, grad_hn, "grad_h_n", state_shape);
  check_same(gates, grad_cn, "grad_c_n", state_shape);
  check_same(gates, h0, "h0", state_shape);
  check_same(gates, c0, "c0", state_shape);
  Tensor w_ci = optional_peephole(w_ci_, gates, peep_shape, "w_ci"),
         w_cf = optional_peephole(w_cf_, gates, peep_shape, "w_cf"),
         w_co = optional_peephole(w_co_, gates, peep_shape, "w_co");
  TORCH_CHECK(w_ci.defined() == w_cf.defined() && w_cf.defined() == w_co.defined(),
              "rnnkit_fused::conv_lstm_bwd: pass all three peepholes w_ci, w_cf, w_co or none");
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  const ConvSame same(w_hh);
  const int64_t HP = h0.numel() / std::max<int64_t>(N, 1), P = HP / std::max<int64_t>(hid, 1);
  Tensor dG = rk::empty(gates.sizes(), gates.options());
  Tensor dh = grad_hn.clone(), dn = rk::empty(state_shape, gates.options()), dc = grad_cn.clone();
  const Tensor like = same.symmetric ? Tensor() : rk::zeros_like(same.padded(h0));
  const int64_t min_len = min_length(len, N, L), max_len = max_length(len, N, L);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "conv_lstm_bwd", [&] {
    using T = scalar_t;
    const OneThread one_step(serial_conv(conv_step_macs(N, w_hh, P)));  // the time loop's convolutions
    const T *wci = w_ci.defined() ? w_ci.data_ptr<T>() : nullptr, *wcf = w_cf.defined() ? w_cf.data_ptr<T>() : nullptr,
            *wco = w_co.defined() ? w_co.data_ptr<T>() : nullptr;
    for (int64_t t = L - 1; t >= 0; --t) {
      add_into(dh.data_ptr<T>(), grad_out[t].data_ptr<T>(), N * HP);
      if (t >= max_len) {  // every row held: dh and dc pass through
        dG[t].zero_();
        continue;
      }
      const Tensor hp_t = t == 0 ? h0 : out[t - 1];
      const T *cp = (t == 0 ? c0 : cs[t - 1]).data_ptr<T>(), *gt = gates[t].data_ptr<T>(), *ct = cs[t].data_ptr<T>();
      T *dgt = dG[t].data_ptr<T>(), *dhp = dh.data_ptr<T>(), *dnp = dn.data_ptr<T>(), *dcp = dc.data_ptr<T>();
      const bool check = len && t >= min_len;
      for_row_blocks(N, HP, [&](int64_t n, int64_t j0, int64_t j1) {
        const int64_t r = n * HP, rg = n * G * P;
        if (check && t >= len[n]) {  // held: h and c pass through unchanged
          zero_blocks(dgt + rg, 4, HP, j0, j1);
          copy_row(dnp + r + j0, dhp + r + j0, j1 - j0);
        } else {
          conv_lstm_grad_row(gt + rg, wci, wcf, wco, cp + r, ct + r, dhp + r, dcp + r, dgt + rg, HP, j0, j1);
          zero_row(dnp + r + j0, j1 - j0);
        }
      });
      add_grad(dn, same.grad_input(dG[t], same.symmetric ? hp_t : like, w_hh));
      if (check) pass_held_rows(len, t, N, HP, (const T*)dhp, dnp);
      std::swap(dh, dn);
    }
  });
  Tensor grad_w = std::get<0>(same.grad_weight(dG.reshape(conv_shape({L * N, G}, gates, 3)),
                                               previous_states(h0, out, len).reshape(conv_shape({L * N, hid}, gates, 3)),
                                               w_hh, false));
  Tensor grad_ci = gates.new_empty({0}), grad_cf = gates.new_empty({0}), grad_co = gates.new_empty({0});
  if (w_ci.defined()) {
    // sum over steps and rows of the gate gradient times the cell state it saw (held steps add zero)
    const Tensor c_prev = previous_states(c0, cs, len);
    const std::array<int64_t, 2> steps_rows{0, 1};
    const OneThread one(serial_elems(cs.numel()));
    grad_ci = dG.narrow(2, 0, hid).mul(c_prev).sum(steps_rows);
    grad_cf = dG.narrow(2, hid, hid).mul(c_prev).sum(steps_rows);
    grad_co = dG.narrow(2, 3 * hid, hid).mul(zero_held(cs, len, false)).sum(steps_rows);
  }
  return {dG, grad_w, grad_ci, grad_cf, grad_co, dh, dc};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> conv_gru_fwd(const Tensor& xp_, const Tensor& w_hh_,
                                                        const std::optional<Tensor>& b_hh_, const Tensor& h0_,
                                                        const std::optional<Tensor>& lengths) {
  at::NoGradGuard no_grad;
  const int64_t hid = check_conv_seq(xp_, w_hh_, 3, "conv_gru_fwd");
  const int64_t L = xp_.size(0), N = xp_.size(1), G = 3 * hid;
  Tensor xp = xp_.contiguous(), w_hh = w_hh_.contiguous(), h0 = h0_.contiguous();
  std::optional<Tensor> b_hh;
  if (b_hh_.has_value() && b_hh_->defined()) {
    b_hh = b_hh_->contiguous();
    check_same(xp, *b_hh, "b_hh", {G});
  }
  check_same(xp, h0, "h0", conv_shape({N, hid}, xp, 3));
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  const ConvSame same(w_hh);
  const int64_t HP = h0.numel() / std::max<int64_t>(N, 1), P = HP / std::max<int64_t>(hid, 1);
  Tensor out = rk::empty(conv_shape({L, N, hid}, xp, 3), xp.options());
  Tensor rzn = rk::empty(xp.sizes(), xp.options());
  Tensor hns = rk::empty(out.sizes(), xp.options());
  const int64_t min_len = min_length(len, N, L), max_len = max_length(len, N, L);
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "conv_gru_fwd", [&] {
    using T = scalar_t;
    const OneThread one_step(serial_conv(conv_step_macs(N, w_hh, P)));  // the time loop's convolutions
    for (int64_t t = 0; t < L; ++t) {
      const Tensor hp_t = t == 0 ? h0 : out[t - 1];
      if (t >= max_len) {
        out[t].copy_(hp_t);
        rzn[t].zero_();
        hns[t].zero_();
        continue;
      }
      const Tensor hh = same.conv(hp_t, w_hh, b_hh);
      const T *x = xp[t].data_ptr<T>(), *hhp = hh.data_ptr<T>(), *hp = hp_t.data_ptr<T>();
      T *rzt = rzn[t].data_ptr<T>(), *hnt = hns[t].data_ptr<T>(), *ot = out[t].data_ptr<T>();
      const bool check = len && t >= min_len;
      for_row_blocks(N, HP, [&](int64_t n, int64_t j0, int64_t j1) {
        const int64_t r = n * HP, rg = n * G * P;
        if (check && t >= len[n]) {  // held: the saved gates are unused, zeroed to stay deterministic
          copy_row(ot + r + j0, hp + r + j0, j1 - j0);
          zero_blocks(rzt + rg, 3, HP, j0, j1);
          zero_row(hnt + r + j0, j1 - j0);
        } else {
          conv_gru_row(x + rg, hhp + rg, hp + r, rzt + rg, hnt + r, ot + r, HP, j0, j1);
        }
      });
    }
  });
  Tensor h_n = L > 0 ? out[L - 1].clone() : h0.clone();
  return {out, h_n, rzn, hns};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> conv_gru_bwd(const Tensor& grad_out_, const Tensor& grad_hn_,
                                                        const Tensor& w_hh_, const Tensor& h0_,
                                                        const std::optional<Tensor>& lengths, const Tensor& out_,
                                                        const Tensor& rzn_, const Tensor& hns_) {
  at::NoGradGuard no_grad;
  const int64_t hid = check_conv_seq(rzn_, w_hh_, 3, "conv_gru_bwd");
  const int64_t L = rzn_.size(0), N = rzn_.size(1), G = 3 * hid;
  Tensor grad_out = grad_out_.contiguous(), grad_hn = grad_hn_.contiguous(), w_hh = w_hh_.contiguous();
  Tensor h0 = h0_.contiguous(), out = out_.contiguous(), rzn = rzn_.contiguous(), hns = hns_.contiguous();
  const auto state_shape = conv_shape({N, hid}, rzn, 3), seq_shape = conv_shape({L, N, hid}, rzn, 3);
  check_same(rzn, out, "out", seq_shape);
  check_same(rzn, hns, "hn", seq_shape);
  check_same(rzn, grad_out, "grad_out", seq_shape);
  check_same(rzn, grad_hn, "grad_h_n", state_shape);
  check_same(rzn, h0, "h0", state_shape);
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  const ConvSame same(w_hh);
  const int64_t HP = h0.numel() / std::max<int64_t>(N, 1), P = HP / std::max<int64_t>(hid, 1);
  Tensor dxp = rk::empty(rzn.sizes(), rzn.options()), dhh = rk::empty(rzn.sizes(), rzn.options());
  Tensor dh = grad_hn.clone(), dn = rk::empty(state_shape, rzn.options());
  const Tensor like = same.symmetric ? Tensor() : rk::zeros_like(same.padded(h0));
  const int64_t min_len = min_length(len, N, L), max_len = max_length(len, N, L);
  AT_DISPATCH_FLOATING_TYPES(rzn.scalar_type(), "conv_gru_bwd", [&] {
    using T = scalar_t;
    const OneThread one_step(serial_conv(conv_step_macs(N, w_hh, P)));  // the time loop's convolutions
    for (int64_t t = L - 1; t >= 0; --t) {
      add_into(dh.data_ptr<T>(), grad_out[t].data_ptr<T>(), N * HP);
      if (t >= max_len) {  // every row held: dh passes through
        dxp[t].zero_();
        dhh[t].zero_();
        continue;
      }
      const Tensor hp_t = t == 0 ? h0 : out[t - 1];
      const T *hp = hp_t.data_ptr<T>(), *rzt = rzn[t].data_ptr<T>(), *hnt = hns[t].data_ptr<T>();
      T *dxt = dxp[t].data_ptr<T>(), *dht = dhh[t].data_ptr<T>(), *dhp = dh.data_ptr<T>(), *dnp = dn.data_ptr<T>();
      const bool check = len && t >= min_len;
      for_row_blocks(N, HP, [&](int64_t n, int64_t j0, int64_t j1) {
        const int64_t r = n * HP, rg = n * G * P;
        if (check && t >= len[n]) {
          zero_blocks(dxt + rg, 3, HP, j0, j1);
          zero_blocks(dht + rg, 3, HP, j0, j1);
          copy_row(dnp + r + j0, dhp + r + j0, j1 - j0);
        } else {
          conv_gru_grad_row(rzt + rg, hnt + r, hp + r, dhp + r, dxt + rg, dht + rg, dnp + r, HP, j0, j1);
        }
      });
      add_grad(dn, same.grad_input(dhh[t], same.symmetric ? hp_t : like, w_hh));
      if (check) pass_held_rows(len, t, N, HP, (const T*)dhp, dnp);
      std::swap(dh, dn);
    }
  });
  auto [grad_w, grad_b] = same.grad_weight(dhh.reshape(conv_shape({L * N, G}, rzn, 3)),
                                           previous_states(h0, out, len).reshape(conv_shape({L * N, hid}, rzn, 3)), w_hh,
                                           true);
  return {dxp, grad_w, grad_b, dh};
}

}  // namespace rnnkit_fused::conv
