// rnnkit's fused CPU kernels: LSTM (with and without a projection), whole sequence, forward and
// backward; float32, float64 and bfloat16 (lstm_fwd_entry / lstm_bwd_entry pick by dtype).

#include "common.h"
#include "gates.h"
#include "ops.h"
#include "regularize.h"

namespace rnnkit_fused::lstm {

// ================================================================ LSTM row split
// This extension is built without -fopenmp, so at::parallel_for's header-inline
// OpenMP path compiles to a serial loop here: the gate math of every step ran on
// one thread. lstm_rows runs fn(begin, end) over the rows [0, N) (H cell units
// each) split across a region of torch's own OpenMP pool (libgomp, which
// libtorch_cpu links), called directly by common.h's over_panels, with as many threads as get at least
// kLstmSplitUnitsPerThread units and a row each, at most torch's thread count
// (measured on 2 cores, T=100, fwd+bwd: the split loses 2-37% at N*H <= 1024,
// gains 3-7% at 1536-4096 and 6% at N=64, H=256; see "threading by work").
// Serial for one thread, inside another region, or without those symbols.
template <typename F>
void lstm_rows(int64_t N, int64_t H, const F& fn) {
  over_panels(N, std::min<int64_t>(at::get_num_threads(), N * H / kLstmSplitUnitsPerThread), fn);  // rows as panels
}


// One step t of the LSTM time loop, lstm_fwd's and lstm_infer's: the gates gt (N, 4H) = h_{t-1} W_hh^T,
// then each row's gate math on gt and the projected input xt (N, 4H) into c_t (ct) and h_t (mt; with w_hr,
// m_t, and then h_t = m_t W_hr^T into ot); a row past its length (check: some row may be) holds its state.
template <typename T>
void lstm_fwd_step(const Recurrent<T>& rec, const Recurrent<T>& rec_r, int64_t N, int64_t H, int64_t P,
                   const int64_t* len, bool check, int64_t t, const T* xt, const T* hp, const T* cp, T* gt, T* ct,
                   T* mt, T* ot) {
  const int64_t G = 4 * H;
  const bool proj = mt != ot;
  rec(hp, P, T(0), gt, G);
  lstm_rows(N, H, [&](int64_t b, int64_t e) {
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

// lstm_fwd's and lstm_infer's checks of the recurrent weights and the initial state (ref: the input, for
// the dtype): w_hh (4H, P), w_hr (P, H) or none (then P == H), h0 (N, P), c0 (N, H).
static void check_lstm(const Tensor& ref, const Tensor& w_hh, const Tensor& w_hr, const Tensor& h0, const Tensor& c0,
                       int64_t N, const char* op) {
  const int64_t H = w_hh.size(0) / 4, P = w_hh.size(1);
  check_same(ref, w_hh, "w_hh", {4 * H, P});
  if (w_hr.defined()) check_same(ref, w_hr, "w_hr", {P, H});
  else TORCH_CHECK(P == H, "rnnkit_fused::", op, ": without w_hr, w_hh must be (4H, H), got ", w_hh.sizes());
  check_same(ref, h0, "h0", {N, P});
  check_same(ref, c0, "c0", {N, H});
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
  check_lstm(xp, w_hh, w_hr, h0, c0, N, "lstm_fwd");
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor out = rk::empty({L, N, P}, xp.options());
  Tensor gates = rk::empty({L, N, G}, xp.options());
  Tensor cs = rk::empty({L, N, H}, xp.options());
  Tensor ms = proj ? rk::empty({L, N, H}, xp.options()) : rk::empty({0}, xp.options());
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "lstm_fwd", [&] {
    using T = scalar_t;
    const Recurrent<T> rec(N, G, P, true, w_hh);
    const Recurrent<T> rec_r(proj ? N : 0, P, H, true, proj ? w_hr : w_hh);
    const T* x = xp.data_ptr<T>();
    const T *h_init = h0.data_ptr<T>(), *c_init = c0.data_ptr<T>();
    T *o = out.data_ptr<T>(), *gs = gates.data_ptr<T>(), *c = cs.data_ptr<T>(), *m = proj ? ms.data_ptr<T>() : nullptr;
    const int64_t min_len = min_length(len, N, L);
    for (int64_t t = 0; t < L; ++t) {
      const T* hp = t == 0 ? h_init : o + (t - 1) * N * P;
      const T* cp = t == 0 ? c_init : c + (t - 1) * N * H;
      T* ot = o + t * N * P;
      lstm_fwd_step<T>(rec, rec_r, N, H, P, len, len && t >= min_len, t, x + t * N * G, hp, cp, gs + t * N * G,
                       c + t * N * H, proj ? m + t * N * H : ot, ot);
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
  check_dim(out_, 3, "lstm_bwd", "out");
  check_dim(cs_, 3, "lstm_bwd", "cs");
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
  check_same(out, cs, "cs", {L, N, H});
  check_same(out, w_hh, "w_hh", {G, P});
  if (proj) {
    check_same(out, w_hr, "w_hr", {P, H});
    check_same(out, ms, "ms", {L, N, H});
  } else {
    TORCH_CHECK(P == H, "rnnkit_fused::lstm_bwd: without w_hr, out must be (L, N, H) as cs, got ", out.sizes(),
                " and ", cs.sizes());
  }
  check_same(out, h0, "h0", {N, P});
  check_same(out, c0, "c0", {N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor dG = rk::empty({L, N, G}, out.options());
  Tensor dHall = proj ? rk::empty({L, N, P}, out.options()) : Tensor();
  Tensor dm_buf = proj ? rk::empty({N, H}, out.options()) : Tensor();
  Tensor dh_a = grad_hn.clone(), dh_b = rk::empty({N, P}, out.options()), dc = grad_cn.clone();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "lstm_bwd", [&] {
    using T = scalar_t;
    const Recurrent<T> rec(N, P, G, false, w_hh);
    const Recurrent<T> rec_r(proj ? N : 0, H, P, false, proj ? w_hr : w_hh);
    const T* go = grad_out.data_ptr<T>();
    const T *gs = gates.data_ptr<T>(), *c = cs.data_ptr<T>(), *c_init = c0.data_ptr<T>();
    T *dg = dG.data_ptr<T>(), *dh = dh_a.data_ptr<T>(), *dn = dh_b.data_ptr<T>(), *dcp = dc.data_ptr<T>();
    T *dm = proj ? dm_buf.data_ptr<T>() : nullptr, *dha = proj ? dHall.data_ptr<T>() : nullptr;
    const int64_t min_len = min_length(len, N, L);
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
      lstm_rows(N, H, [&](int64_t b, int64_t e) {
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
      if (check) pass_held_rows(len, t, N, P, dh, dn);
      std::swap(dh, dn);
    }
    if (dh != dh_a.data_ptr<T>()) std::swap(dh_a, dh_b);
  });
  Tensor grad_w_hh = weight_grad(dG, previous_states(h0, out, len));
  Tensor grad_w_hr = proj ? weight_grad(dHall, ms) : rk::empty({0}, out.options());
  return {dG, grad_w_hh, grad_w_hr, dh_a, dc};
}

// ================================================================ LSTM inference (no saved gates)
// lstm_infer: lstm_fwd's visible results (out, h_n, c_n) from the unprojected input x (L, N, I), for a
// call that needs no gradient: nothing is kept for a backward (the gates of one step and the cell
// states of two live in small buffers), and the input is projected (b + x W_ih^T, b = b_ih + b_hh or
// null) in chunks of steps into one reused buffer (common.h, project_chunk), so that neither the
// projection nor the gates of a long call go through memory as fresh tensors of L N 4H elements.
// float32 and float64 (the bfloat16 path keeps lstm_fwd).
std::tuple<Tensor, Tensor, Tensor> lstm_infer(const Tensor& x_, const Tensor& w_ih_, const std::optional<Tensor>& b_,
                                              const Tensor& w_hh_, const std::optional<Tensor>& w_hr_,
                                              const Tensor& h0_, const Tensor& c0_,
                                              const std::optional<Tensor>& lengths) {
  TORCH_CHECK(w_hh_.dim() == 2 && w_hh_.size(0) % 4 == 0,
              "rnnkit_fused::lstm_infer: w_hh must be (4H, H_out), got ", w_hh_.sizes());
  const int64_t H = w_hh_.size(0) / 4, P = w_hh_.size(1), G = 4 * H;
  const InferInput in = infer_input(x_, w_ih_, b_, G, "lstm_infer", "b");
  const int64_t L = in.L, N = in.N;
  const bool proj = w_hr_.has_value() && w_hr_->defined();
  Tensor w_hh = w_hh_.contiguous(), h0 = h0_.contiguous(), c0 = c0_.contiguous();
  Tensor w_hr = proj ? w_hr_->contiguous() : Tensor();
  check_lstm(in.x, w_hh, w_hr, h0, c0, N, "lstm_infer");
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor out = rk::empty({L, N, P}, in.x.options());
  if (L == 0) return {out, h0.clone(), c0.clone()};
  const int64_t C = project_chunk(L, N, G);
  Tensor buf = rk::empty({C * N * G + N * G + 2 * N * H + (proj ? N * H : 0)}, in.x.options());
  Tensor c_n = rk::empty({N, H}, in.x.options());
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "lstm_infer", [&] {
    using T = scalar_t;
    const Recurrent<T> rec(N, G, P, true, w_hh);
    const Recurrent<T> rec_r(proj ? N : 0, P, H, true, proj ? w_hr : w_hh);
    T* xb = buf.data_ptr<T>();  // the chunk's projection (C N, G), then the step's gates, 2 cell states, m_t
    T* gt = xb + C * N * G;
    T* cs[2] = {gt + N * G, gt + N * G + N * H};
    T* mt = proj ? cs[1] + N * H : nullptr;
    const T *h_init = h0.data_ptr<T>(), *c_init = c0.data_ptr<T>();
    T* o = out.data_ptr<T>();
    const int64_t min_len = min_length(len, N, L);
    over_projected_steps<T>(in, G, xb, [&](int64_t t, const T* xt) {
      T* ot = o + t * N * P;
      lstm_fwd_step<T>(rec, rec_r, N, H, P, len, len && t >= min_len, t, xt, t == 0 ? h_init : o + (t - 1) * N * P,
                       t == 0 ? c_init : cs[(t - 1) & 1], gt, cs[t & 1], proj ? mt : ot, ot);
    });
    copy_row(c_n.data_ptr<T>(), (const T*)cs[(L - 1) & 1], N * H);
  });
  return {out, out[L - 1].clone(), c_n};
}

// ---------------------------------------------------------------- LSTM, bf16
// gates (L, N, 4H) and cs (L, N, H) are float32; ms (L, N, H) (with w_hr) is bf16.

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_fwd_bf16(const Tensor& xp_, const Tensor& w_hh_,
                                                                         const std::optional<Tensor>& w_hr_,
                                                                         const Tensor& h0_, const Tensor& c0_,
                                                                         const std::optional<Tensor>& lengths) {
  TORCH_CHECK(w_hh_.dim() == 2 && w_hh_.size(0) % 4 == 0, "rnnkit_fused::lstm_fwd: w_hh must be (4H, H_out), got ",
              w_hh_.sizes());
  const int64_t H = w_hh_.size(0) / 4, P = w_hh_.size(1), G = 4 * H;
  check_seq_bf16(xp_, "lstm_fwd", G);
  const int64_t L = xp_.size(0), N = xp_.size(1);
  const bool proj = w_hr_.has_value() && w_hr_->defined();
  Tensor xp = xp_.contiguous(), w_hh = w_hh_.contiguous(), h0 = h0_.contiguous(), c0 = c0_.contiguous();
  Tensor w_hr = proj ? w_hr_->contiguous() : Tensor();
  check_same(xp, w_hh, "w_hh", {G, P});
  if (proj) check_same(xp, w_hr, "w_hr", {P, H});
  else TORCH_CHECK(P == H, "rnnkit_fused::lstm_fwd: without w_hr, w_hh must be (4H, H), got ", w_hh.sizes());
  check_same(xp, h0, "h0", {N, P});
  check_same(xp, c0, "c0", {N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor out = rk::empty({L, N, P}, xp.options());
  Tensor gates = rk::empty({L, N, G}, f32_like(xp));
  Tensor cs = rk::empty({L, N, H}, f32_like(xp));
  Tensor ms = proj ? rk::empty({L, N, H}, xp.options()) : rk::empty({0}, xp.options());
  Tensor c0f = c0.to(at::kFloat);
  Tensor x_buf = rk::empty({N, G}, f32_like(xp)), m_buf = rk::empty({N, H}, f32_like(xp));
  Tensor o_buf = proj ? rk::empty({N, P}, f32_like(xp)) : Tensor();
  const RecurrentBF16 rec(N, G, P, true, w_hh);
  const RecurrentBF16 rec_r(proj ? N : 0, P, H, true, proj ? w_hr : w_hh);
  const BF *x = xp.data_ptr<BF>(), *h_init = h0.data_ptr<BF>();
  const float* c_init = c0f.data_ptr<float>();
  BF *o = out.data_ptr<BF>(), *m = proj ? ms.data_ptr<BF>() : nullptr;
  float *gs = gates.data_ptr<float>(), *c = cs.data_ptr<float>(), *xs = x_buf.data_ptr<float>(),
        *mf = m_buf.data_ptr<float>(), *of = proj ? o_buf.data_ptr<float>() : nullptr;
  const int64_t min_len = min_length(len, N, L), grain = row_grain(G);
  for (int64_t t = 0; t < L; ++t) {
    const BF* hp = t == 0 ? h_init : o + (t - 1) * N * P;
    const float* cp = t == 0 ? c_init : c + (t - 1) * N * H;
    float* gt = gs + t * N * G;
    float* ct = c + t * N * H;
    BF* ot = o + t * N * P;
    BF* mt = proj ? m + t * N * H : ot;
    rec(hp, P, 0.f, gt, G);
    const BF* xt = x + t * N * G;
    const bool check = len && t >= min_len;
    at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        if (check && t >= len[n]) {
          copy_row(ct + n * H, cp + n * H, H);
          if (proj) zero_row(mt + n * H, H);
          else copy_row(ot + n * H, hp + n * H, H);
        } else {
          to_float(xt + n * G, xs + n * G, G);
          lstm_row(gt + n * G, (const float*)(xs + n * G), cp + n * H, ct + n * H, mf + n * H, H);
          to_bf16(mf + n * H, mt + n * H, H);
        }
      }
    });
    if (proj) {
      rec_r(mt, H, 0.f, of, P);
      for (int64_t n = 0; n < N; ++n) {
        if (check && t >= len[n]) copy_row(ot + n * P, hp + n * P, P);
        else to_bf16(of + n * P, ot + n * P, P);
      }
    }
  }
  Tensor h_n = L > 0 ? out[L - 1].clone() : h0.clone();
  Tensor c_n = L > 0 ? cs[L - 1].to(at::kBFloat16) : c0.clone();
  return {out, h_n, c_n, gates, cs, ms};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_bwd_bf16(
    const Tensor& grad_out_, const Tensor& grad_hn_, const Tensor& grad_cn_, const Tensor& w_hh_,
    const std::optional<Tensor>& w_hr_, const Tensor& h0_, const Tensor& c0_, const std::optional<Tensor>& lengths,
    const Tensor& out_, const Tensor& gates_, const Tensor& cs_, const Tensor& ms_) {
  TORCH_CHECK(out_.dim() == 3 && cs_.dim() == 3, "rnnkit_fused::lstm_bwd: out and cs must be 3-D, got ",
              out_.sizes(), " and ", cs_.sizes());
  const int64_t L = out_.size(0), N = out_.size(1), P = out_.size(2), H = cs_.size(2), G = 4 * H;
  const bool proj = w_hr_.has_value() && w_hr_->defined();
  Tensor grad_out = grad_out_.contiguous(), grad_hn = grad_hn_.contiguous(), grad_cn = grad_cn_.contiguous();
  Tensor w_hh = w_hh_.contiguous(), h0 = h0_.contiguous(), c0 = c0_.contiguous(), out = out_.contiguous();
  Tensor gates = gates_.contiguous(), cs = cs_.contiguous(), ms = ms_.contiguous();
  Tensor w_hr = proj ? w_hr_->contiguous() : Tensor();
  check_same(out, grad_out, "grad_out", out.sizes());
  check_same(out, grad_hn, "grad_h_n", {N, P});
  check_same(out, grad_cn, "grad_c_n", {N, H});
  check_same(out, w_hh, "w_hh", {G, P});
  if (proj) {
    check_same(out, w_hr, "w_hr", {P, H});
    check_same(out, ms, "ms", {L, N, H});
  } else {
    TORCH_CHECK(P == H, "rnnkit_fused::lstm_bwd: without w_hr, out must be (L, N, H) as cs, got ", out.sizes(),
                " and ", cs.sizes());
  }
  check_same(out, h0, "h0", {N, P});
  check_same(out, c0, "c0", {N, H});
  check_f32(gates, "gates", {L, N, G});
  check_f32(cs, "cs", {L, N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor dG = rk::empty({L, N, G}, out.options());
  Tensor dHall = proj ? rk::empty({L, N, P}, out.options()) : Tensor();
  Tensor dm_buf = proj ? rk::empty({N, H}, f32_like(out)) : Tensor();
  Tensor dh_a = grad_hn.to(at::kFloat), dh_b = rk::empty({N, P}, f32_like(out)), dc = grad_cn.to(at::kFloat);
  Tensor c0f = c0.to(at::kFloat), s_buf = rk::empty({N, std::max(G, P)}, f32_like(out));
  const RecurrentBF16 rec(N, P, G, false, w_hh);
  const RecurrentBF16 rec_r(proj ? N : 0, H, P, false, proj ? w_hr : w_hh);
  const BF* go = grad_out.data_ptr<BF>();
  const float *gs = gates.data_ptr<float>(), *c = cs.data_ptr<float>(), *c_init = c0f.data_ptr<float>();
  BF *dg = dG.data_ptr<BF>(), *dha = proj ? dHall.data_ptr<BF>() : nullptr;
  float *dh = dh_a.data_ptr<float>(), *dn = dh_b.data_ptr<float>(), *dcp = dc.data_ptr<float>(),
        *s = s_buf.data_ptr<float>(), *dm = proj ? dm_buf.data_ptr<float>() : nullptr;
  const int64_t min_len = min_length(len, N, L), grain = row_grain(G);
  for (int64_t t = L - 1; t >= 0; --t) {
    to_float(go + t * N * P, s, N * P);
    add_into(dh, s, N * P);
    const float* cp = t == 0 ? c_init : c + (t - 1) * N * H;
    const float* gt = gs + t * N * G;
    const float* ct = c + t * N * H;
    BF* dgt = dg + t * N * G;
    const float* dmt = dh;
    if (proj) {
      to_bf16(dh, dha + t * N * P, N * P);
      rec_r(dha + t * N * P, P, 0.f, dm, H);
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
          lstm_grad_row(gt + n * G, cp + n * H, ct + n * H, dmt + n * H, dcp + n * H, s + n * G, H);
          to_bf16(s + n * G, dgt + n * G, G);
          zero_row(dn + n * P, P);
        }
      }
    });
    rec(dgt, G, 1.f, dn, P);
    if (check) pass_held_rows(len, t, N, P, (const float*)dh, dn);
    std::swap(dh, dn);
  }
  if (dh != dh_a.data_ptr<float>()) std::swap(dh_a, dh_b);
  Tensor grad_w_hh = weight_grad(dG, previous_states(h0, out, len));
  Tensor grad_w_hr = proj ? weight_grad(dHall, ms) : rk::empty({0}, out.options());
  return {dG, grad_w_hh, grad_w_hr, dh_a.to(at::kBFloat16), dc.to(at::kBFloat16)};
}

// ---------------------------------------------------------------- dtype dispatch (the registered entry points)

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_fwd_entry(const Tensor& xp, const Tensor& w_hh,
                                                                          const std::optional<Tensor>& w_hr,
                                                                          const Tensor& h0, const Tensor& c0,
                                                                          const std::optional<Tensor>& lengths) {
  if (xp.scalar_type() == at::kBFloat16) return lstm_fwd_bf16(xp, w_hh, w_hr, h0, c0, lengths);
  return lstm_fwd(xp, w_hh, w_hr, h0, c0, lengths);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_bwd_entry(
    const Tensor& grad_out, const Tensor& grad_hn, const Tensor& grad_cn, const Tensor& w_hh,
    const std::optional<Tensor>& w_hr, const Tensor& h0, const Tensor& c0, const std::optional<Tensor>& lengths,
    const Tensor& out, const Tensor& gates, const Tensor& cs, const Tensor& ms) {
  if (out.scalar_type() == at::kBFloat16)
    return lstm_bwd_bf16(grad_out, grad_hn, grad_cn, w_hh, w_hr, h0, c0, lengths, out, gates, cs, ms);
  return lstm_bwd(grad_out, grad_hn, grad_cn, w_hh, w_hr, h0, c0, lengths, out, gates, cs, ms);
}

}  // namespace rnnkit_fused::lstm

// ================================================================ LSTM with zoneout and recurrent dropout
// lstm_reg_fwd / lstm_reg_bwd: the LSTM above with the runner's regularizers inside the time loop
// (rnnkit/runner.py, apply_regularizers; the masks are drawn in Python by bernoulli_mask, never here):
//   * recurrent dropout: h_{t-1} * r in the recurrent product only (r (N, H_out), already 1/keep-scaled);
//   * zoneout: after each step s_t = k s_{t-1} + (1 - k) s~_t for h (k from zo_h (L, N, H_out)) and c
//     (zo_c (L, N, H)), or the constant rates (eval: the expectation) when no mask is given;
//   * a row past its length holds its state (no mixing), as in the unregularized kernel.
// Besides lstm_fwd's results it returns cn (L, N, H): the pre-zoneout cell state c~_t whose tanh the
// backward needs (empty without zoneout on c: then cs is c~). float32 and float64.

namespace rnnkit_fused::lstm {

// lstm_grad_row with zoneout on c: dc holds dL/dc_t (mixed) on entry and dL/dc_{t-1} on exit;
// c is the pre-zoneout c~_t
template <typename T>
inline void lstm_grad_row_zc(const T* g, const T* cp, const T* c, const T* dm, T* dc, T* dg, const Keep<T>& z,
                             int64_t off, int64_t H) {
  constexpr int64_t VS = Vec<T>::size();
  const Vec<T> one(T(1));
  const T* m = z.mask ? z.mask + off : nullptr;
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    Vec<T> i = Vec<T>::loadu(g + j, cnt), f = Vec<T>::loadu(g + H + j, cnt);
    Vec<T> gg = Vec<T>::loadu(g + 2 * H + j, cnt), o = Vec<T>::loadu(g + 3 * H + j, cnt);
    Vec<T> tc = vtanh(Vec<T>::loadu(c + j, cnt));
    Vec<T> d = Vec<T>::loadu(dm + j, cnt);
    Vec<T> kv = z.k(m, j, cnt), din = Vec<T>::loadu(dc + j, cnt);
    Vec<T> dct = z.one_minus(kv) * din + d * o * (one - tc * tc);
    (dct * gg * i * (one - i)).store(dg + j, cnt);
    (dct * Vec<T>::loadu(cp + j, cnt) * f * (one - f)).store(dg + H + j, cnt);
    (dct * i * (one - gg * gg)).store(dg + 2 * H + j, cnt);
    (d * tc * o * (one - o)).store(dg + 3 * H + j, cnt);
    (kv * din + dct * f).store(dc + j, cnt);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_reg_fwd(
    const Tensor& xp_, const Tensor& w_hh_, const std::optional<Tensor>& w_hr_, const Tensor& h0_, const Tensor& c0_,
    const std::optional<Tensor>& lengths, const std::optional<Tensor>& rd_, const std::optional<Tensor>& zh_,
    const std::optional<Tensor>& zc_, double zh_rate, double zc_rate) {
  TORCH_CHECK(w_hh_.dim() == 2 && w_hh_.size(0) % 4 == 0,
              "rnnkit_fused::lstm_reg_fwd: w_hh must be (4H, H_out), got ", w_hh_.sizes());
  const int64_t H = w_hh_.size(0) / 4, P = w_hh_.size(1), G = 4 * H;
  check_seq(xp_, "lstm_reg_fwd", G);
  const int64_t L = xp_.size(0), N = xp_.size(1);
  const bool proj = w_hr_.has_value() && w_hr_->defined();
  Tensor xp = xp_.contiguous(), w_hh = w_hh_.contiguous(), h0 = h0_.contiguous(), c0 = c0_.contiguous();
  Tensor w_hr = proj ? w_hr_->contiguous() : Tensor();
  check_same(xp, w_hh, "w_hh", {G, P});
  if (proj) check_same(xp, w_hr, "w_hr", {P, H});
  else TORCH_CHECK(P == H, "rnnkit_fused::lstm_reg_fwd: without w_hr, w_hh must be (4H, H), got ", w_hh.sizes());
  check_same(xp, h0, "h0", {N, P});
  check_same(xp, c0, "c0", {N, H});
  check_reg(xp, rd_, zh_, zc_, zh_rate, zc_rate, L, N, P, H, "lstm_reg_fwd", 2, true);
  Tensor rd = opt_contig(rd_), zh = opt_contig(zh_), zc = opt_contig(zc_);
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor out = rk::empty({L, N, P}, xp.options());
  Tensor gates = rk::empty({L, N, G}, xp.options());
  Tensor cs = rk::empty({L, N, H}, xp.options());
  Tensor ms = proj ? rk::empty({L, N, H}, xp.options()) : rk::empty({0}, xp.options());
  const bool zoc = zc.defined() || zc_rate > 0, zoh = zh.defined() || zh_rate > 0;
  Tensor cn_all = zoc ? rk::empty({L, N, H}, xp.options()) : rk::empty({0}, xp.options());
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "lstm_reg_fwd", [&] {
    using T = scalar_t;
    const Keep<T> kh(zh, zh_rate), kc(zc, zc_rate);
    Tensor hr_buf = rd.defined() ? rk::empty({N, P}, xp.options()) : Tensor();
    Tensor m_buf = !proj && zoh ? rk::empty({N, H}, xp.options()) : Tensor();
    const Recurrent<T> rec(N, G, P, true, w_hh);
    const Recurrent<T> rec_r(proj ? N : 0, P, H, true, proj ? w_hr : w_hh);
    const T* x = xp.data_ptr<T>();
    const T *h_init = h0.data_ptr<T>(), *c_init = c0.data_ptr<T>(), *r = rd.defined() ? rd.data_ptr<T>() : nullptr;
    T *o = out.data_ptr<T>(), *gs = gates.data_ptr<T>(), *c = cs.data_ptr<T>(), *m = proj ? ms.data_ptr<T>() : nullptr;
    T* cn = zoc ? cn_all.data_ptr<T>() : nullptr;
    T *hr = r ? hr_buf.data_ptr<T>() : nullptr, *mb = m_buf.defined() ? m_buf.data_ptr<T>() : nullptr;
    const int64_t min_len = min_length(len, N, L);
    for (int64_t t = 0; t < L; ++t) {
      const T* hp = t == 0 ? h_init : o + (t - 1) * N * P;
      const T* cp = t == 0 ? c_init : c + (t - 1) * N * H;
      T* gt = gs + t * N * G;
      T* ct = c + t * N * H;
      T* cnt_ = zoc ? cn + t * N * H : ct;
      T* ot = o + t * N * P;
      T* mt = proj ? m + t * N * H : (zoh ? mb : ot);
      rec_step(rec, hp, r, hr, N, P, gt, G);
      const T* xt = x + t * N * G;
      const bool check = len && t >= min_len;
      lstm_rows(N, H, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          if (check && t >= len[n]) {
            copy_row(ct + n * H, cp + n * H, H);
            if (zoc) copy_row(cnt_ + n * H, cp + n * H, H);
            if (proj) zero_row(mt + n * H, H);
            else copy_row(ot + n * H, hp + n * H, H);
          } else {
            lstm_row(gt + n * G, xt + n * G, cp + n * H, cnt_ + n * H, mt + n * H, H);
            if (zoc) zoneout_mix(kc, (t * N + n) * H, cp + n * H, cnt_ + n * H, ct + n * H, H);
            if (!proj && zoh) zoneout_mix(kh, (t * N + n) * P, hp + n * P, mt + n * H, ot + n * P, P);
          }
        }
      });
      if (proj) {
        rec_r(mt, H, T(0), ot, P);
        for (int64_t n = 0; n < N; ++n) {
          if (check && t >= len[n]) copy_row(ot + n * P, hp + n * P, P);
          else if (zoh) zoneout_mix(kh, (t * N + n) * P, hp + n * P, ot + n * P, ot + n * P, P);
        }
      }
    }
  });
  Tensor h_n = L > 0 ? out[L - 1].clone() : h0.clone();
  Tensor c_n = L > 0 ? cs[L - 1].clone() : c0.clone();
  return {out, h_n, c_n, gates, cs, cn_all, ms};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_reg_bwd(
    const Tensor& grad_out_, const Tensor& grad_hn_, const Tensor& grad_cn_, const Tensor& w_hh_,
    const std::optional<Tensor>& w_hr_, const Tensor& h0_, const Tensor& c0_, const std::optional<Tensor>& lengths,
    const Tensor& out_, const Tensor& gates_, const Tensor& cs_, const Tensor& cn_, const Tensor& ms_,
    const std::optional<Tensor>& rd_, const std::optional<Tensor>& zh_, const std::optional<Tensor>& zc_,
    double zh_rate, double zc_rate) {
  check_dim(out_, 3, "lstm_reg_bwd", "out");
  check_dim(cs_, 3, "lstm_reg_bwd", "cs");
  const int64_t L = out_.size(0), N = out_.size(1), P = out_.size(2), H = cs_.size(2), G = 4 * H;
  const bool proj = w_hr_.has_value() && w_hr_->defined();
  Tensor grad_out = grad_out_.contiguous(), grad_hn = grad_hn_.contiguous(), grad_cn = grad_cn_.contiguous();
  Tensor w_hh = w_hh_.contiguous(), h0 = h0_.contiguous(), c0 = c0_.contiguous(), out = out_.contiguous();
  Tensor gates = gates_.contiguous(), cs = cs_.contiguous(), cn = cn_.contiguous(), ms = ms_.contiguous();
  Tensor w_hr = proj ? w_hr_->contiguous() : Tensor();
  check_reg(out, rd_, zh_, zc_, zh_rate, zc_rate, L, N, P, H, "lstm_reg_bwd", 2, true);
  Tensor rd = opt_contig(rd_), zh = opt_contig(zh_), zc = opt_contig(zc_);
  const bool zoc = zc.defined() || zc_rate > 0, zoh = zh.defined() || zh_rate > 0;
  check_same(out, grad_out, "grad_out", out.sizes());
  check_same(out, grad_hn, "grad_h_n", {N, P});
  check_same(out, grad_cn, "grad_c_n", {N, H});
  check_same(out, gates, "gates", {L, N, G});
  check_same(out, cs, "cs", {L, N, H});
  if (zoc) check_same(out, cn, "cn", {L, N, H});
  check_same(out, w_hh, "w_hh", {G, P});
  if (proj) {
    check_same(out, w_hr, "w_hr", {P, H});
    check_same(out, ms, "ms", {L, N, H});
  } else {
    TORCH_CHECK(P == H, "rnnkit_fused::lstm_reg_bwd: without w_hr, out must be (L, N, H) as cs, got ", out.sizes(),
                " and ", cs.sizes());
  }
  check_same(out, h0, "h0", {N, P});
  check_same(out, c0, "c0", {N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor dG = rk::empty({L, N, G}, out.options());
  Tensor dHall = proj ? rk::empty({L, N, P}, out.options()) : Tensor();
  Tensor dm_buf = proj ? rk::empty({N, H}, out.options()) : Tensor();
  Tensor dt_buf = zoh ? rk::empty({N, P}, out.options()) : Tensor();
  Tensor rb_buf = rd.defined() ? rk::empty({N, P}, out.options()) : Tensor();
  Tensor dh_a = grad_hn.clone(), dh_b = rk::empty({N, P}, out.options()), dc = grad_cn.clone();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "lstm_reg_bwd", [&] {
    using T = scalar_t;
    const Keep<T> kh(zh, zh_rate), kc(zc, zc_rate);
    const Recurrent<T> rec(N, P, G, false, w_hh);
    const Recurrent<T> rec_r(proj ? N : 0, H, P, false, proj ? w_hr : w_hh);
    const T* go = grad_out.data_ptr<T>();
    const T *gs = gates.data_ptr<T>(), *c = cs.data_ptr<T>(), *c_init = c0.data_ptr<T>();
    const T* ctil = zoc ? cn.data_ptr<T>() : c;  // the c~_t whose tanh made h~_t
    const T* r = rd.defined() ? rd.data_ptr<T>() : nullptr;
    T *dg = dG.data_ptr<T>(), *dh = dh_a.data_ptr<T>(), *dn = dh_b.data_ptr<T>(), *dcp = dc.data_ptr<T>();
    T *dm = proj ? dm_buf.data_ptr<T>() : nullptr, *dha = proj ? dHall.data_ptr<T>() : nullptr;
    T *dtl = zoh ? dt_buf.data_ptr<T>() : nullptr, *rb = r ? rb_buf.data_ptr<T>() : nullptr;
    const int64_t min_len = min_length(len, N, L);
    for (int64_t t = L - 1; t >= 0; --t) {
      add_into(dh, go + t * N * P, N * P);  // dL/dh_t (the mixed state)
      const T* cp = t == 0 ? c_init : c + (t - 1) * N * H;
      const T* gt = gs + t * N * G;
      const T* ct = ctil + t * N * H;
      T* dgt = dg + t * N * G;
      const T* dht = dh;  // dL/dh~_t
      if (zoh) {
        zoneout_rest(kh, t * N * P, dh, dtl, N * P);
        dht = dtl;
      }
      const T* dmt = dht;
      if (proj) {
        rec_r(dht, P, T(0), dm, H);
        copy_row(dha + t * N * P, dht, N * P);
        dmt = dm;
      }
      const bool check = len && t >= min_len;
      lstm_rows(N, H, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          if (check && t >= len[n]) {
            zero_row(dgt + n * G, G);
            copy_row(dn + n * P, dh + n * P, P);
            if (proj) zero_row(dha + (t * N + n) * P, P);
          } else {
            if (zoc)
              lstm_grad_row_zc(gt + n * G, cp + n * H, ct + n * H, dmt + n * H, dcp + n * H, dgt + n * G, kc,
                               (t * N + n) * H, H);
            else
              lstm_grad_row(gt + n * G, cp + n * H, ct + n * H, dmt + n * H, dcp + n * H, dgt + n * G, H);
            if (zoh) {  // dn = k dh (the kept part), the product's part added below
              zoneout_kept(kh, (t * N + n) * P, dh + n * P, dn + n * P, P);
            } else {
              zero_row(dn + n * P, P);
            }
          }
        }
      });
      rec_grad(rec, dgt, G, r, rb, dh, dn, len, t, check, N, P);
      std::swap(dh, dn);
    }
    if (dh != dh_a.data_ptr<T>()) std::swap(dh_a, dh_b);
  });
  Tensor grad_w_hh = weight_grad(dG, masked_previous(previous_states(h0, out, len), rd));
  Tensor grad_w_hr = proj ? weight_grad(dHall, ms) : rk::empty({0}, out.options());
  return {dG, grad_w_hh, grad_w_hr, dh_a, dc};
}

}  // namespace rnnkit_fused::lstm
