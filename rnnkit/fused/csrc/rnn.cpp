// rnnkit's fused CPU kernels: RNN (tanh / relu), whole sequence, forward and backward; float32,
// float64 and bfloat16 (rnn_fwd_entry / rnn_bwd_entry pick by dtype).

#include "common.h"
#include "gates.h"
#include "ops.h"

namespace rnnkit_fused::rnn {

std::tuple<Tensor, Tensor> rnn_fwd(const Tensor& xp_, const Tensor& w_hh_, const Tensor& h0_,
                                   const std::optional<Tensor>& lengths, int64_t act) {
  check_dim(w_hh_, 2, "rnn_fwd", "w_hh");
  const int64_t H = w_hh_.size(1);
  check_seq(xp_, "rnn_fwd", H);
  TORCH_CHECK(act == 0 || act == 1, "rnnkit_fused::rnn_fwd: act must be 0 (tanh) or 1 (relu), got ", act);
  const int64_t L = xp_.size(0), N = xp_.size(1);
  Tensor xp = xp_.contiguous(), w_hh = w_hh_.contiguous(), h0 = h0_.contiguous();
  check_same(xp, w_hh, "w_hh", {H, H});
  check_same(xp, h0, "h0", {N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor out = rk::empty({L, N, H}, xp.options());
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
  TORCH_CHECK(act == 0 || act == 1, "rnnkit_fused::rnn_bwd: act must be 0 (tanh) or 1 (relu), got ", act);
  check_dim(out_, 3, "rnn_bwd", "out");
  const int64_t L = out_.size(0), N = out_.size(1), H = out_.size(2);
  Tensor grad_out = grad_out_.contiguous(), grad_hn = grad_hn_.contiguous(), w_hh = w_hh_.contiguous(),
         h0 = h0_.contiguous(), out = out_.contiguous();
  check_same(out, grad_out, "grad_out", out.sizes());
  check_same(out, grad_hn, "grad_h_n", {N, H});
  check_same(out, w_hh, "w_hh", {H, H});
  check_same(out, h0, "h0", {N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor dxp = rk::empty({L, N, H}, out.options());
  Tensor dh_a = grad_hn.clone(), dh_b = rk::empty({N, H}, out.options());
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
      if (check) pass_held_rows(len, t, N, H, dh, dn);
      std::swap(dh, dn);
    }
    if (dh != dh_a.data_ptr<T>()) std::swap(dh_a, dh_b);
  });
  Tensor grad_w = weight_grad(dxp, previous_states(h0, out, len));
  return {dxp, grad_w, dh_a};
}

// ---------------------------------------------------------------- RNN, bf16

std::tuple<Tensor, Tensor> rnn_fwd_bf16(const Tensor& xp_, const Tensor& w_hh_, const Tensor& h0_,
                                        const std::optional<Tensor>& lengths, int64_t act) {
  check_dim(w_hh_, 2, "rnn_fwd", "w_hh");
  const int64_t H = w_hh_.size(1);
  check_seq_bf16(xp_, "rnn_fwd", H);
  TORCH_CHECK(act == 0 || act == 1, "rnnkit_fused::rnn_fwd: act must be 0 (tanh) or 1 (relu), got ", act);
  const int64_t L = xp_.size(0), N = xp_.size(1);
  Tensor xp = xp_.contiguous(), w_hh = w_hh_.contiguous(), h0 = h0_.contiguous();
  check_same(xp, w_hh, "w_hh", {H, H});
  check_same(xp, h0, "h0", {N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor out = rk::empty({L, N, H}, xp.options());
  Tensor pre_buf = rk::empty({N, H}, f32_like(xp)), x_buf = rk::empty({N, H}, f32_like(xp));
  const RecurrentBF16 rec(N, H, H, true, w_hh);
  const BF *x = xp.data_ptr<BF>(), *h_init = h0.data_ptr<BF>();
  BF* o = out.data_ptr<BF>();
  float *pre = pre_buf.data_ptr<float>(), *xs = x_buf.data_ptr<float>();
  const int64_t min_len = min_length(len, N, L), grain = row_grain(H);
  for (int64_t t = 0; t < L; ++t) {
    const BF* hp = t == 0 ? h_init : o + (t - 1) * N * H;
    BF* ot = o + t * N * H;
    rec(hp, H, 0.f, pre, H);
    const BF* xt = x + t * N * H;
    const bool check = len && t >= min_len;
    at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        if (check && t >= len[n]) {
          copy_row(ot + n * H, hp + n * H, H);
        } else {
          to_float(xt + n * H, xs + n * H, H);
          rnn_act_row(pre + n * H, xs + n * H, H, act);
          to_bf16(pre + n * H, ot + n * H, H);
        }
      }
    });
  }
  Tensor h_n = L > 0 ? out[L - 1].clone() : h0.clone();
  return {out, h_n};
}

std::tuple<Tensor, Tensor, Tensor> rnn_bwd_bf16(const Tensor& grad_out_, const Tensor& grad_hn_, const Tensor& w_hh_,
                                                const Tensor& h0_, const std::optional<Tensor>& lengths,
                                                const Tensor& out_, int64_t act) {
  TORCH_CHECK(out_.dim() == 3, "rnnkit_fused::rnn_bwd: out must be (L, N, H), got ", out_.sizes());
  const int64_t L = out_.size(0), N = out_.size(1), H = out_.size(2);
  Tensor grad_out = grad_out_.contiguous(), grad_hn = grad_hn_.contiguous(), w_hh = w_hh_.contiguous(),
         h0 = h0_.contiguous(), out = out_.contiguous();
  check_same(out, grad_out, "grad_out", out.sizes());
  check_same(out, grad_hn, "grad_h_n", {N, H});
  check_same(out, w_hh, "w_hh", {H, H});
  check_same(out, h0, "h0", {N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor dxp = rk::empty({L, N, H}, out.options());
  Tensor dh_a = grad_hn.to(at::kFloat), dh_b = rk::empty({N, H}, f32_like(out));
  Tensor s_buf = rk::empty({N, H}, f32_like(out)), dp_buf = rk::empty({N, H}, f32_like(out));
  const RecurrentBF16 rec(N, H, H, false, w_hh);
  const BF *go = grad_out.data_ptr<BF>(), *o = out.data_ptr<BF>();
  BF* dx = dxp.data_ptr<BF>();
  float *dh = dh_a.data_ptr<float>(), *dn = dh_b.data_ptr<float>(), *s = s_buf.data_ptr<float>(),
        *dp = dp_buf.data_ptr<float>();
  const int64_t min_len = min_length(len, N, L), grain = row_grain(H);
  for (int64_t t = L - 1; t >= 0; --t) {
    to_float(go + t * N * H, s, N * H);
    add_into(dh, s, N * H);
    const BF* ht = o + t * N * H;
    BF* dxt = dx + t * N * H;
    const bool check = len && t >= min_len;
    at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        if (check && t >= len[n]) {
          zero_row(dxt + n * H, H);
          copy_row(dn + n * H, dh + n * H, H);
        } else {
          to_float(ht + n * H, s + n * H, H);
          rnn_grad_row(dh + n * H, s + n * H, dp + n * H, H, act);
          to_bf16(dp + n * H, dxt + n * H, H);
          zero_row(dn + n * H, H);
        }
      }
    });
    rec(dxt, H, 1.f, dn, H);
    if (check) pass_held_rows(len, t, N, H, (const float*)dh, dn);
    std::swap(dh, dn);
  }
  if (dh != dh_a.data_ptr<float>()) std::swap(dh_a, dh_b);
  Tensor grad_w = weight_grad(dxp, previous_states(h0, out, len));
  return {dxp, grad_w, dh_a.to(at::kBFloat16)};
}

// ---------------------------------------------------------------- dtype dispatch (the registered entry points)

std::tuple<Tensor, Tensor> rnn_fwd_entry(const Tensor& xp, const Tensor& w_hh, const Tensor& h0,
                                         const std::optional<Tensor>& lengths, int64_t act) {
  if (xp.scalar_type() == at::kBFloat16) return rnn_fwd_bf16(xp, w_hh, h0, lengths, act);
  return rnn_fwd(xp, w_hh, h0, lengths, act);
}

std::tuple<Tensor, Tensor, Tensor> rnn_bwd_entry(const Tensor& grad_out, const Tensor& grad_hn, const Tensor& w_hh,
                                                 const Tensor& h0, const std::optional<Tensor>& lengths,
                                                 const Tensor& out, int64_t act) {
  if (out.scalar_type() == at::kBFloat16) return rnn_bwd_bf16(grad_out, grad_hn, w_hh, h0, lengths, out, act);
  return rnn_bwd(grad_out, grad_hn, w_hh, h0, lengths, out, act);
}

}  // namespace rnnkit_fused::rnn
