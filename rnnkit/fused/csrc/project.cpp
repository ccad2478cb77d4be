// rnnkit's fused CPU kernels: the input projection of every step, xp = x W^T + b (one GEMM), and its
// backward, for the sequence kernels' callers (rnnkit/fused/backend.py, _project). The same ATen
// products autograd would run, but each on the calling thread when it is small (threading by work,
// common.h): under load, a parallel region for a tiny GEMM costs a scheduler time slice at its join,
// and the projection and its two backward products were the last such regions of a small layer.
//
// Shapes: x (M, K) (M = L * N rows), w (G, K) as torch.nn stores W_ih, b (G,) or none, xp (M, G).

#include "common.h"
#include "ops.h"


namespace rnnkit_fused::project {

namespace {

void check_project(const Tensor& x, const Tensor& w, const char* op) {
  check_dim(x, 2, op, "x");
  check_dim(w, 2, op, "w");
  TORCH_CHECK(x.size(1) == w.size(1), "rnnkit_fused::", op, ": x (M, K) and w (G, K) must share K, got ",
              x.sizes(), " and ", w.sizes());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "rnnkit_fused::", op, ": w has dtype ", w.scalar_type(),
              ", expected ", x.scalar_type(), " (x's)");
}

// the multiply-adds of one of the three products (each is M x G x K)
int64_t macs(const Tensor& x, const Tensor& w) { return x.size(0) * w.size(0) * x.size(1); }

}  // namespace

Tensor project_fwd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
  check_project(x, w, "project_fwd");
  if (b.has_value() && b->defined()) check_same(x, *b, "b", {w.size(0)});
  const OneThread one(serial_once(macs(x, w)));
  if (b.has_value() && b->defined()) return rk::addmm(*b, x, w.t());
  return rk::mm(x, w.t());
}

// (dx (M, K), dw (G, K), db (G,)) from grad (M, G); a result not asked for in `mask` (x, w, b) is empty (0,)
std::tuple<Tensor, Tensor, Tensor> project_bwd(const Tensor& grad, const Tensor& x, const Tensor& w,
                                               std::array<bool, 3> mask) {
  check_project(x, w, "project_bwd");
  check_same(x, grad, "grad", {x.size(0), w.size(0)});
  const OneThread one(serial_once(macs(x, w)));
  Tensor dx = mask[0] ? grad.mm(w) : rk::empty({0}, x.options());
  Tensor dw = mask[1] ? grad.t().mm(x) : rk::empty({0}, x.options());
  Tensor db = mask[2] ? grad.sum(0) : rk::empty({0}, x.options());
  return {dx, dw, db};
}

}  // namespace rnnkit_fused::project
