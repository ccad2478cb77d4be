// rnnkit's fused CPU kernels: IndRNN (tanh / relu), whole sequence, forward and backward.

#include "common.h"
#include "gates.h"
#include "ops.h"

namespace rnnkit_fused::indrnn {

// h_t = act(xp_t + u * h_{t-1}), u (H,) per unit: no recurrent matrix product,
// every unit of every row is its own recurrence. The work is split over
// (row, block of units) and each block keeps its state in registers across the
// whole time loop (time is the inner loop).
constexpr int64_t kIndBlock = 256;

template <typename T>
inline Vec<T> ind_act(const Vec<T>& v, int64_t act) {
  return act == 0 ? vtanh(v) : at::vec::maximum(v, Vec<T>(T(0)));
}

// dL/d(pre-activation) from dL/dh and h = act(pre)
template <typename T>
inline Vec<T> ind_act_grad(const Vec<T>& d, const Vec<T>& h, int64_t act) {
  const Vec<T> one(T(1));
  return act == 0 ? d * (one - h * h) : relu_grad(d, h);
}

inline int64_t row_length(const int64_t* len, int64_t n, int64_t L) {
  return len ? std::min<int64_t>(std::max<int64_t>(len[n], 0), L) : L;
}

std::tuple<Tensor, Tensor> indrnn_fwd(const Tensor& xp_, const Tensor& u_, const Tensor& h0_,
                                      const std::optional<Tensor>& lengths, int64_t act) {
  TORCH_CHECK(act == 0 || act == 1, "rnnkit_fused::indrnn_fwd: act must be 0 (tanh) or 1 (relu), got ", act);
  TORCH_CHECK(u_.dim() == 1, "rnnkit_fused::indrnn_fwd: u must be (H,), got ", u_.sizes());
  const int64_t H = u_.size(0);
  check_seq(xp_, "indrnn_fwd", H);
  const int64_t L = xp_.size(0), N = xp_.size(1);
  Tensor xp = xp_.contiguous(), u = u_.contiguous(), h0 = h0_.contiguous();
  check_same(xp, u, "u", {H});
  check_same(xp, h0, "h0", {N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor out = rk::empty({L, N, H}, xp.options());
  const int64_t blocks = (H + kIndBlock - 1) / kIndBlock;
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "indrnn_fwd", [&] {
    using T = scalar_t;
    constexpr int64_t VS = Vec<T>::size();
    const T *x = xp.data_ptr<T>(), *up = u.data_ptr<T>(), *h_init = h0.data_ptr<T>();
    T* o = out.data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(L * std::min(H, kIndBlock), 1));
    at::parallel_for(0, N * blocks, grain, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        const int64_t n = k / blocks, j0 = (k % blocks) * kIndBlock, j1 = std::min(H, j0 + kIndBlock);
        const int64_t ln = row_length(len, n, L);
        for (int64_t j = j0; j < j1; j += VS) {
          const int64_t cnt = std::min(VS, j1 - j);
          const Vec<T> uv = Vec<T>::loadu(up + j, cnt);
          Vec<T> h = Vec<T>::loadu(h_init + n * H + j, cnt);
          int64_t t = 0;
          for (; t < ln; ++t) {
            const int64_t off = (t * N + n) * H + j;
            h = ind_act(at::vec::fmadd(uv, h, Vec<T>::loadu(x + off, cnt)), act);
            h.store(o + off, cnt);
          }
          for (; t < L; ++t) h.store(o + (t * N + n) * H + j, cnt);  // held past the length
        }
      }
    });
  });
  Tensor h_n = L > 0 ? out[L - 1].clone() : h0.clone();
  return {out, h_n};
}

std::tuple<Tensor, Tensor, Tensor> indrnn_bwd(const Tensor& grad_out_, const Tensor& grad_hn_, const Tensor& u_,
                                              const Tensor& h0_, const std::optional<Tensor>& lengths,
                                              const Tensor& out_, int64_t act) {
  TORCH_CHECK(act == 0 || act == 1, "rnnkit_fused::indrnn_bwd: act must be 0 (tanh) or 1 (relu), got ", act);
  TORCH_CHECK(out_.dim() == 3, "rnnkit_fused::indrnn_bwd: out must be (L, N, H), got ", out_.sizes());
  const int64_t L = out_.size(0), N = out_.size(1), H = out_.size(2);
  Tensor grad_out = grad_out_.contiguous(), grad_hn = grad_hn_.contiguous(), u = u_.contiguous();
  Tensor h0 = h0_.contiguous(), out = out_.contiguous();
  check_same(out, grad_out, "grad_out", out.sizes());
  check_same(out, grad_hn, "grad_h_n", {N, H});
  check_same(out, u, "u", {H});
  check_same(out, h0, "h0", {N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor dxp = rk::empty({L, N, H}, out.options());
  Tensor dh0 = rk::empty({N, H}, out.options());
  Tensor du_rows = rk::empty({N, H}, out.options());  // per row, summed over rows after the loop
  const int64_t blocks = (H + kIndBlock - 1) / kIndBlock;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "indrnn_bwd", [&] {
    using T = scalar_t;
    constexpr int64_t VS = Vec<T>::size();
    const T *go = grad_out.data_ptr<T>(), *gn = grad_hn.data_ptr<T>(), *up = u.data_ptr<T>();
    const T *o = out.data_ptr<T>(), *h_init = h0.data_ptr<T>();
    T *dx = dxp.data_ptr<T>(), *dh = dh0.data_ptr<T>(), *dur = du_rows.data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(L * std::min(H, kIndBlock), 1));
    at::parallel_for(0, N * blocks, grain, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        const int64_t n = k / blocks, j0 = (k % blocks) * kIndBlock, j1 = std::min(H, j0 + kIndBlock);
        const int64_t ln = row_length(len, n, L);
        for (int64_t j = j0; j < j1; j += VS) {
          const int64_t cnt = std::min(VS, j1 - j);
          const Vec<T> uv = Vec<T>::loadu(up + j, cnt);
          Vec<T> d = Vec<T>::loadu(gn + n * H + j, cnt), du(T(0));
          int64_t t = L - 1;
          for (; t >= ln; --t) {  // held: h passes through unchanged
            const int64_t off = (t * N + n) * H + j;
            d = d + Vec<T>::loadu(go + off, cnt);
            Vec<T>(T(0)).store(dx + off, cnt);
          }
          for (; t >= 0; --t) {
            const int64_t off = (t * N + n) * H + j;
            d = d + Vec<T>::loadu(go + off, cnt);
            const Vec<T> dpre = ind_act_grad(d, Vec<T>::loadu(o + off, cnt), act);
            dpre.store(dx + off, cnt);
            const Vec<T> hp = t > 0 ? Vec<T>::loadu(o + off - N * H, cnt) : Vec<T>::loadu(h_init + n * H + j, cnt);
            du = at::vec::fmadd(dpre, hp, du);
            d = dpre * uv;
          }
          d.store(dh + n * H + j, cnt);
          du.store(dur + n * H + j, cnt);
        }
      }
    });
  });
  return {dxp, du_rows.sum(0), dh0};
}

}  // namespace rnnkit_fused::indrnn
