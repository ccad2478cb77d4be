// rnnkit's fused CPU kernels: GRU, whole sequence, forward and backward; float32, float64 and
// bfloat16 (gru_fwd_entry / gru_bwd_entry pick by dtype).

#include "common.h"
#include "gates.h"
#include "ops.h"
#include "regularize.h"

namespace rnnkit_fused::gru {

// gru_fwd's and gru_infer's checks of the recurrent weights and the initial state (ref: the input, for the
// dtype): w_hh (3H, H), b_hh (3H; none: zeros, returned), h0 (N, H).
static Tensor check_gru(const Tensor& ref, const Tensor& w_hh, const std::optional<Tensor>& b_hh_, const Tensor& h0,
                        int64_t N) {
  const int64_t H = w_hh.size(1), G = 3 * H;
  check_same(ref, w_hh, "w_hh", {G, H});
  Tensor b_hh = (b_hh_.has_value() && b_hh_->defined()) ? b_hh_->contiguous() : rk::zeros({G}, ref.options());
  check_same(ref, b_hh, "b_hh", {G});
  check_same(ref, h0, "h0", {N, H});
  return b_hh;
}

// One step t of the GRU time loop, gru_fwd's and gru_infer's: hb (N, 3H) = h_{t-1} W_hh^T, then each row's
// gate math on hb, b_hh and the projected input xt (N, 3H) into r/z/n (rzt), the n gate's W_hh h + b_hh
// part (hnt) and h_t (ot); a row past its length (check: some row may be) holds its state.
template <typename T>
void gru_fwd_step(const Recurrent<T>& rec, int64_t N, int64_t H, const int64_t* len, bool check, int64_t t,
                  const T* xt, const T* hp, const T* bh, T* hb, T* rzt, T* hnt, T* ot) {
  const int64_t G = 3 * H;
  rec(hp, H, T(0), hb, G);
  at::parallel_for(0, N, row_grain(G), [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      if (check && t >= len[n]) {  // held: the saved gates are unused, zeroed to stay deterministic
        copy_row(ot + n * H, hp + n * H, H);
        zero_row(rzt + n * G, G);
        zero_row(hnt + n * H, H);
      } else gru_row(xt + n * G, hb + n * G, bh, hp + n * H, rzt + n * G, hnt + n * H, ot + n * H, H);
    }
  });
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
  Tensor b_hh = check_gru(xp, w_hh, b_hh_, h0, N);
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor out = rk::empty({L, N, H}, xp.options());
  Tensor rzn = rk::empty({L, N, G}, xp.options());
  Tensor hns = rk::empty({L, N, H}, xp.options());
  Tensor hh = rk::empty({N, G}, xp.options());
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "gru_fwd", [&] {
    using T = scalar_t;
    const Recurrent<T> rec(N, G, H, true, w_hh);
    const T *x = xp.data_ptr<T>(), *bh = b_hh.data_ptr<T>(), *h_init = h0.data_ptr<T>();
    T *o = out.data_ptr<T>(), *rz = rzn.data_ptr<T>(), *hn = hns.data_ptr<T>(), *hb = hh.data_ptr<T>();
    const int64_t min_len = min_length(len, N, L);
    for (int64_t t = 0; t < L; ++t) {
      gru_fwd_step<T>(rec, N, H, len, len && t >= min_len, t, x + t * N * G, t == 0 ? h_init : o + (t - 1) * N * H,
                      bh, hb, rz + t * N * G, hn + t * N * H, o + t * N * H);
    }
  });
  Tensor h_n = L > 0 ? out[L - 1].clone() : h0.clone();
  return {out, h_n, rzn, hns};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gru_bwd(const Tensor& grad_out_, const Tensor& grad_hn_,
                                                   const Tensor& w_hh_, const Tensor& h0_,
                                                   const std::optional<Tensor>& lengths, const Tensor& out_,
                                                   const Tensor& rzn_, const Tensor& hns_) {
  check_dim(out_, 3, "gru_bwd", "out");
  const int64_t L = out_.size(0), N = out_.size(1), H = out_.size(2), G = 3 * H;
  Tensor grad_out = grad_out_.contiguous(), grad_hn = grad_hn_.contiguous(), w_hh = w_hh_.contiguous();
  Tensor h0 = h0_.contiguous(), out = out_.contiguous(), rzn = rzn_.contiguous(), hns = hns_.contiguous();
  check_same(out, grad_out, "grad_out", out.sizes());
  check_same(out, grad_hn, "grad_h_n", {N, H});
  check_same(out, rzn, "rzn", {L, N, G});
  check_same(out, hns, "hn", {L, N, H});
  check_same(out, w_hh, "w_hh", {G, H});
  check_same(out, h0, "h0", {N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor dxp = rk::empty({L, N, G}, out.options());
  Tensor dhh = rk::empty({L, N, G}, out.options());
  Tensor dh_a = grad_hn.clone(), dh_b = rk::empty({N, H}, out.options());
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
      if (check) pass_held_rows(len, t, N, H, dh, dn);
      std::swap(dh, dn);
    }
    if (dh != dh_a.data_ptr<T>()) std::swap(dh_a, dh_b);
  });
  Tensor grad_w_hh = weight_grad(dhh, previous_states(h0, out, len));
  Tensor grad_b_hh;
  {
    const OneThread one(serial_elems(dhh.numel()));
    grad_b_hh = dhh.sum(at::IntArrayRef{0, 1});
  }
  return {dxp, grad_w_hh, grad_b_hh, dh_a};
}

// ---------------------------------------------------------------- GRU, bf16
// rzn (L, N, 3H) and hns (L, N, H) are float32.

std::tuple<Tensor, Tensor, Tensor, Tensor> gru_fwd_bf16(const Tensor& xp_, const Tensor& w_hh_,
                                                        const std::optional<Tensor>& b_hh_, const Tensor& h0_,
                                                        const std::optional<Tensor>& lengths) {
  TORCH_CHECK(w_hh_.dim() == 2 && w_hh_.size(0) == 3 * w_hh_.size(1),
              "rnnkit_fused::gru_fwd: w_hh must be (3H, H), got ", w_hh_.sizes());
  const int64_t H = w_hh_.size(1), G = 3 * H;
  check_seq_bf16(xp_, "gru_fwd", G);
  const int64_t L = xp_.size(0), N = xp_.size(1);
  Tensor xp = xp_.contiguous(), w_hh = w_hh_.contiguous(), h0 = h0_.contiguous();
  check_same(xp, w_hh, "w_hh", {G, H});
  Tensor bhf = rk::zeros({G}, f32_like(xp));
  if (b_hh_.has_value() && b_hh_->defined()) {
    check_same(xp, *b_hh_, "b_hh", {G});
    bhf = b_hh_->to(at::kFloat).contiguous();
  }
  check_same(xp, h0, "h0", {N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor out = rk::empty({L, N, H}, xp.options());
  Tensor rzn = rk::empty({L, N, G}, f32_like(xp));
  Tensor hns = rk::empty({L, N, H}, f32_like(xp));
  Tensor hh = rk::empty({N, G}, f32_like(xp)), x_buf = rk::empty({N, G}, f32_like(xp));
  Tensor hp_buf = rk::empty({N, H}, f32_like(xp)), h_buf = rk::empty({N, H}, f32_like(xp));
  const RecurrentBF16 rec(N, G, H, true, w_hh);
  const BF *x = xp.data_ptr<BF>(), *h_init = h0.data_ptr<BF>();
  const float* bh = bhf.data_ptr<float>();
  BF* o = out.data_ptr<BF>();
  float *rz = rzn.data_ptr<float>(), *hn = hns.data_ptr<float>(), *hb = hh.data_ptr<float>(),
        *xs = x_buf.data_ptr<float>(), *hps = hp_buf.data_ptr<float>(), *hs = h_buf.data_ptr<float>();
  const int64_t min_len = min_length(len, N, L), grain = row_grain(G);
  for (int64_t t = 0; t < L; ++t) {
    const BF* hp = t == 0 ? h_init : o + (t - 1) * N * H;
    rec(hp, H, 0.f, hb, G);
    const BF* xt = x + t * N * G;
    float *rzt = rz + t * N * G, *hnt = hn + t * N * H;
    BF* ot = o + t * N * H;
    const bool check = len && t >= min_len;
    at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        if (check && t >= len[n]) {
          copy_row(ot + n * H, hp + n * H, H);
          zero_row(rzt + n * G, G);
          zero_row(hnt + n * H, H);
        } else {
          to_float(xt + n * G, xs + n * G, G);
          to_float(hp + n * H, hps + n * H, H);
          gru_row((const float*)(xs + n * G), (const float*)(hb + n * G), bh, (const float*)(hps + n * H),
                  rzt + n * G, hnt + n * H, hs + n * H, H);
          to_bf16(hs + n * H, ot + n * H, H);
        }
      }
    });
  }
  Tensor h_n = L > 0 ? out[L - 1].clone() : h0.clone();
  return {out, h_n, rzn, hns};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gru_bwd_bf16(const Tensor& grad_out_, const Tensor& grad_hn_,
                                                        const Tensor& w_hh_, const Tensor& h0_,
                                                        const std::optional<Tensor>& lengths, const Tensor& out_,
                                                        const Tensor& rzn_, const Tensor& hns_) {
  TORCH_CHECK(out_.dim() == 3, "rnnkit_fused::gru_bwd: out must be (L, N, H), got ", out_.sizes());
  const int64_t L = out_.size(0), N = out_.size(1), H = out_.size(2), G = 3 * H;
  Tensor grad_out = grad_out_.contiguous(), grad_hn = grad_hn_.contiguous(), w_hh = w_hh_.contiguous();
  Tensor h0 = h0_.contiguous(), out = out_.contiguous(), rzn = rzn_.contiguous(), hns = hns_.contiguous();
  check_same(out, grad_out, "grad_out", out.sizes());
  check_same(out, grad_hn, "grad_h_n", {N, H});
  check_same(out, w_hh, "w_hh", {G, H});
  check_same(out, h0, "h0", {N, H});
  check_f32(rzn, "rzn", {L, N, G});
  check_f32(hns, "hn", {L, N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor dxp = rk::empty({L, N, G}, out.options());
  Tensor dhh = rk::empty({L, N, G}, out.options());
  Tensor dh_a = grad_hn.to(at::kFloat), dh_b = rk::empty({N, H}, f32_like(out));
  Tensor s_buf = rk::empty({N, H}, f32_like(out)), dx_buf = rk::empty({N, G}, f32_like(out)),
         dhh_buf = rk::empty({N, G}, f32_like(out));
  const RecurrentBF16 rec(N, H, G, false, w_hh);
  const BF *go = grad_out.data_ptr<BF>(), *o = out.data_ptr<BF>(), *h_init = h0.data_ptr<BF>();
  const float *rz = rzn.data_ptr<float>(), *hn = hns.data_ptr<float>();
  BF *dx = dxp.data_ptr<BF>(), *dhp = dhh.data_ptr<BF>();
  float *dh = dh_a.data_ptr<float>(), *dn = dh_b.data_ptr<float>(), *s = s_buf.data_ptr<float>(),
        *dxs = dx_buf.data_ptr<float>(), *dhs = dhh_buf.data_ptr<float>();
  const int64_t min_len = min_length(len, N, L), grain = row_grain(G);
  for (int64_t t = L - 1; t >= 0; --t) {
    to_float(go + t * N * H, s, N * H);
    add_into(dh, s, N * H);
    const BF* hp = t == 0 ? h_init : o + (t - 1) * N * H;
    const float *rzt = rz + t * N * G, *hnt = hn + t * N * H;
    BF *dxt = dx + t * N * G, *dht = dhp + t * N * G;
    const bool check = len && t >= min_len;
    at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        if (check && t >= len[n]) {
          zero_row(dxt + n * G, G);
          zero_row(dht + n * G, G);
          copy_row(dn + n * H, dh + n * H, H);
        } else {
          to_float(hp + n * H, s + n * H, H);
          gru_grad_row(rzt + n * G, hnt + n * H, (const float*)(s + n * H), (const float*)(dh + n * H),
                       dxs + n * G, dhs + n * G, dn + n * H, H);
          to_bf16(dxs + n * G, dxt + n * G, G);
          to_bf16(dhs + n * G, dht + n * G, G);
        }
      }
    });
    rec(dht, G, 1.f, dn, H);
    if (check) pass_held_rows(len, t, N, H, (const float*)dh, dn);
    std::swap(dh, dn);
  }
  if (dh != dh_a.data_ptr<float>()) std::swap(dh_a, dh_b);
  Tensor grad_w_hh = weight_grad(dhh, previous_states(h0, out, len));
  Tensor grad_b_hh;
  {
    const OneThread one(serial_elems(dhh.numel()));
    grad_b_hh = rk::sum(dhh, at::IntArrayRef{0, 1}, false, at::kFloat).to(at::kBFloat16);
  }
  return {dxp, grad_w_hh, grad_b_hh, dh_a.to(at::kBFloat16)};
}
// ---------------------------------------------------------------- dtype dispatch (the registered entry points)

// ================================================================ GRU inference (no saved gates)
// gru_infer: gru_fwd's out and h_n from the unprojected input x (L, N, I), for a call that needs no
// gradient: r/z/n and the n gate's recurrent part of one step in small buffers, the input projected
// (b_ih + x W_ih^T; b_hh stays inside, gated by r) in chunks of steps as lstm_infer does (common.h,
// project_chunk). float32 and float64.
std::tuple<Tensor, Tensor> gru_infer(const Tensor& x_, const Tensor& w_ih_, const std::optional<Tensor>& b_ih_,
                                     const Tensor& w_hh_, const std::optional<Tensor>& b_hh_, const Tensor& h0_,
                                     const std::optional<Tensor>& lengths) {
  TORCH_CHECK(w_hh_.dim() == 2 && w_hh_.size(0) == 3 * w_hh_.size(1),
              "rnnkit_fused::gru_infer: w_hh must be (3H, H), got ", w_hh_.sizes());
  const int64_t H = w_hh_.size(1), G = 3 * H;
  const InferInput in = infer_input(x_, w_ih_, b_ih_, G, "gru_infer", "b_ih");
  const int64_t L = in.L, N = in.N;
  Tensor w_hh = w_hh_.contiguous(), h0 = h0_.contiguous();
  Tensor b_hh = check_gru(in.x, w_hh, b_hh_, h0, N);
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor out = rk::empty({L, N, H}, in.x.options());
  if (L == 0) return {out, h0.clone()};
  const int64_t C = project_chunk(L, N, G);
  Tensor buf = rk::empty({C * N * G + 2 * N * G + N * H}, in.x.options());
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "gru_infer", [&] {
    using T = scalar_t;
    const Recurrent<T> rec(N, G, H, true, w_hh);
    T* xb = buf.data_ptr<T>();  // the chunk's projection (C N, G), then hb (N, G), r/z/n (N, G), hn (N, H)
    T *hb = xb + C * N * G, *rz = hb + N * G, *hn = rz + N * G;
    const T *bh = b_hh.data_ptr<T>(), *h_init = h0.data_ptr<T>();
    T* o = out.data_ptr<T>();
    const int64_t min_len = min_length(len, N, L);
    over_projected_steps<T>(in, G, xb, [&](int64_t t, const T* xt) {
      gru_fwd_step<T>(rec, N, H, len, len && t >= min_len, t, xt, t == 0 ? h_init : o + (t - 1) * N * H, bh, hb, rz,
                      hn, o + t * N * H);
    });
  });
  return {out, out[L - 1].clone()};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gru_fwd_entry(const Tensor& xp, const Tensor& w_hh,
                                                         const std::optional<Tensor>& b_hh, const Tensor& h0,
                                                         const std::optional<Tensor>& lengths) {
  if (xp.scalar_type() == at::kBFloat16) return gru_fwd_bf16(xp, w_hh, b_hh, h0, lengths);
  return gru_fwd(xp, w_hh, b_hh, h0, lengths);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gru_bwd_entry(const Tensor& grad_out, const Tensor& grad_hn,
                                                         const Tensor& w_hh, const Tensor& h0,
                                                         const std::optional<Tensor>& lengths, const Tensor& out,
                                                         const Tensor& rzn, const Tensor& hns) {
  if (out.scalar_type() == at::kBFloat16) return gru_bwd_bf16(grad_out, grad_hn, w_hh, h0, lengths, out, rzn, hns);
  return gru_bwd(grad_out, grad_hn, w_hh, h0, lengths, out, rzn, hns);
}

}  // namespace rnnkit_fused::gru

// ================================================================ GRU with zoneout and recurrent dropout
// gru_reg_fwd / gru_reg_bwd: the GRU above with the runner's regularizers inside the time loop (the masks
// drawn in Python by rnnkit.runner.bernoulli_mask; see lstm.cpp, "LSTM with zoneout and recurrent dropout"):
// recurrent dropout multiplies h_{t-1} by r (N, H) in the recurrent product only (the update z h_{t-1}
// reads the unmasked h, as gru_step does); zoneout mixes h_t = k h_{t-1} + (1 - k) h~_t after each step
// (k from zo_h (L, N, H), or the constant rate: eval). Same saved tensors as gru_fwd. float32 and float64.

namespace rnnkit_fused::gru {

std::tuple<Tensor, Tensor, Tensor, Tensor> gru_reg_fwd(const Tensor& xp_, const Tensor& w_hh_,
                                                       const std::optional<Tensor>& b_hh_, const Tensor& h0_,
                                                       const std::optional<Tensor>& lengths,
                                                       const std::optional<Tensor>& rd_,
                                                       const std::optional<Tensor>& zh_, double zh_rate) {
  TORCH_CHECK(w_hh_.dim() == 2 && w_hh_.size(0) == 3 * w_hh_.size(1),
              "rnnkit_fused::gru_reg_fwd: w_hh must be (3H, H), got ", w_hh_.sizes());
  const int64_t H = w_hh_.size(1), G = 3 * H;
  check_seq(xp_, "gru_reg_fwd", G);
  const int64_t L = xp_.size(0), N = xp_.size(1);
  Tensor xp = xp_.contiguous(), w_hh = w_hh_.contiguous(), h0 = h0_.contiguous();
  check_same(xp, w_hh, "w_hh", {G, H});
  Tensor b_hh = (b_hh_.has_value() && b_hh_->defined()) ? b_hh_->contiguous() : rk::zeros({G}, xp.options());
  check_same(xp, b_hh, "b_hh", {G});
  check_same(xp, h0, "h0", {N, H});
  check_reg(xp, rd_, zh_, std::nullopt, zh_rate, 0.0, L, N, H, H, "gru_reg_fwd", 1, true);
  Tensor rd = opt_contig(rd_), zh = opt_contig(zh_);
  const bool zoh = zh.defined() || zh_rate > 0;
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor out = rk::empty({L, N, H}, xp.options());
  Tensor rzn = rk::empty({L, N, G}, xp.options());
  Tensor hns = rk::empty({L, N, H}, xp.options());
  Tensor hh = rk::empty({N, G}, xp.options());
  Tensor hr_buf = rd.defined() ? rk::empty({N, H}, xp.options()) : Tensor();
  Tensor ht_buf = zoh ? rk::empty({N, H}, xp.options()) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "gru_reg_fwd", [&] {
    using T = scalar_t;
    const Keep<T> kh(zh, zh_rate);
    const Recurrent<T> rec(N, G, H, true, w_hh);
    const T *x = xp.data_ptr<T>(), *bh = b_hh.data_ptr<T>(), *h_init = h0.data_ptr<T>();
    const T* r = rd.defined() ? rd.data_ptr<T>() : nullptr;
    T *o = out.data_ptr<T>(), *rz = rzn.data_ptr<T>(), *hn = hns.data_ptr<T>(), *hb = hh.data_ptr<T>();
    T *hr = r ? hr_buf.data_ptr<T>() : nullptr, *htl = zoh ? ht_buf.data_ptr<T>() : nullptr;
    const int64_t min_len = min_length(len, N, L), grain = row_grain(G);
    for (int64_t t = 0; t < L; ++t) {
      const T* hp = t == 0 ? h_init : o + (t - 1) * N * H;
      rec_step(rec, hp, r, hr, N, H, hb, G);
      const T* xt = x + t * N * G;
      T *rzt = rz + t * N * G, *hnt = hn + t * N * H, *ot = o + t * N * H;
      const bool check = len && t >= min_len;
      at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          if (check && t >= len[n]) {
            copy_row(ot + n * H, hp + n * H, H);
            zero_row(rzt + n * G, G);
            zero_row(hnt + n * H, H);
          } else if (zoh) {
            gru_row(xt + n * G, hb + n * G, bh, hp + n * H, rzt + n * G, hnt + n * H, htl + n * H, H);
            zoneout_mix(kh, (t * N + n) * H, hp + n * H, htl + n * H, ot + n * H, H);
          } else {
            gru_row(xt + n * G, hb + n * G, bh, hp + n * H, rzt + n * G, hnt + n * H, ot + n * H, H);
          }
        }
      });
    }
  });
  Tensor h_n = L > 0 ? out[L - 1].clone() : h0.clone();
  return {out, h_n, rzn, hns};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gru_reg_bwd(const Tensor& grad_out_, const Tensor& grad_hn_,
                                                       const Tensor& w_hh_, const Tensor& h0_,
                                                       const std::optional<Tensor>& lengths, const Tensor& out_,
                                                       const Tensor& rzn_, const Tensor& hns_,
                                                       const std::optional<Tensor>& rd_,
                                                       const std::optional<Tensor>& zh_, double zh_rate) {
  check_dim(out_, 3, "gru_reg_bwd", "out");
  const int64_t L = out_.size(0), N = out_.size(1), H = out_.size(2), G = 3 * H;
  Tensor grad_out = grad_out_.contiguous(), grad_hn = grad_hn_.contiguous(), w_hh = w_hh_.contiguous();
  Tensor h0 = h0_.contiguous(), out = out_.contiguous(), rzn = rzn_.contiguous(), hns = hns_.contiguous();
  check_reg(out, rd_, zh_, std::nullopt, zh_rate, 0.0, L, N, H, H, "gru_reg_bwd", 1, true);
  Tensor rd = opt_contig(rd_), zh = opt_contig(zh_);
  const bool zoh = zh.defined() || zh_rate > 0;
  check_same(out, grad_out, "grad_out", out.sizes());
  check_same(out, grad_hn, "grad_h_n", {N, H});
  check_same(out, rzn, "rzn", {L, N, G});
  check_same(out, hns, "hn", {L, N, H});
  check_same(out, w_hh, "w_hh", {G, H});
  check_same(out, h0, "h0", {N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor dxp = rk::empty({L, N, G}, out.options());
  Tensor dhh = rk::empty({L, N, G}, out.options());
  Tensor dh_a = grad_hn.clone(), dh_b = rk::empty({N, H}, out.options());
  Tensor dt_buf = zoh ? rk::empty({N, H}, out.options()) : Tensor();
  Tensor kb_buf = zoh ? rk::empty({N, H}, out.options()) : Tensor();
  Tensor rb_buf = rd.defined() ? rk::empty({N, H}, out.options()) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "gru_reg_bwd", [&] {
    using T = scalar_t;
    const Keep<T> kh(zh, zh_rate);
    const Recurrent<T> rec(N, H, G, false, w_hh);
    const T *go = grad_out.data_ptr<T>(), *o = out.data_ptr<T>();
    const T *rz = rzn.data_ptr<T>(), *hn = hns.data_ptr<T>(), *h_init = h0.data_ptr<T>();
    const T* r = rd.defined() ? rd.data_ptr<T>() : nullptr;
    T *dx = dxp.data_ptr<T>(), *dhp = dhh.data_ptr<T>(), *dh = dh_a.data_ptr<T>(), *dn = dh_b.data_ptr<T>();
    T *dtl = zoh ? dt_buf.data_ptr<T>() : nullptr, *rb = r ? rb_buf.data_ptr<T>() : nullptr;
    T* kb = zoh ? kb_buf.data_ptr<T>() : nullptr;
    const int64_t min_len = min_length(len, N, L), grain = row_grain(G);
    for (int64_t t = L - 1; t >= 0; --t) {
      add_into(dh, go + t * N * H, N * H);  // dL/dh_t (the mixed state)
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
          } else if (zoh) {
            const int64_t off = (t * N + n) * H;
            zoneout_rest(kh, off, dh + n * H, dtl + n * H, H);  // dL/dh~_t
            gru_grad_row(rzt + n * G, hnt + n * H, hp + n * H, dtl + n * H, dxt + n * G, dht + n * G, dn + n * H, H);
            zoneout_kept(kh, off, dh + n * H, kb + n * H, H);  // + k dh: the kept part
            add_into(dn + n * H, kb + n * H, H);
          } else {
            gru_grad_row(rzt + n * G, hnt + n * H, hp + n * H, dh + n * H, dxt + n * G, dht + n * G, dn + n * H, H);
          }
        }
      });
      rec_grad(rec, dht, G, r, rb, dh, dn, len, t, check, N, H);
      std::swap(dh, dn);
    }
    if (dh != dh_a.data_ptr<T>()) std::swap(dh_a, dh_b);
  });
  Tensor grad_w_hh = weight_grad(dhh, masked_previous(previous_states(h0, out, len), rd));
  Tensor grad_b_hh;
  {
    const OneThread one(serial_elems(dhh.numel()));
    grad_b_hh = dhh.sum(at::IntArrayRef{0, 1});
  }
  return {dxp, grad_w_hh, grad_b_hh, dh_a};
}

}  // namespace rnnkit_fused::gru
