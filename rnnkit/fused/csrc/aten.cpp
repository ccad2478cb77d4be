// rnnkit's fused CPU kernels: the ATen functions the kernel files call (declared in common.h,
// namespace rk). Only this file parses ATen's per-op headers for them.

#include "common.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

namespace rk {

Tensor empty(at::IntArrayRef size, const at::TensorOptions& options) { return at::empty(size, options); }
Tensor zeros(at::IntArrayRef size, const at::TensorOptions& options) { return at::zeros(size, options); }
Tensor zeros_like(const Tensor& like) { return at::zeros_like(like); }
Tensor mm(const Tensor& a, const Tensor& b) { return at::mm(a, b); }
Tensor& mm_out(Tensor& out, const Tensor& a, const Tensor& b) { return at::mm_out(out, a, b); }
Tensor sum(const Tensor& x, at::IntArrayRef dims, bool keepdim, at::ScalarType dtype) {
  return at::sum(x, dims, keepdim, dtype);
}
Tensor cat(at::TensorList tensors, int64_t dim) { return at::cat(tensors, dim); }
Tensor from_blob(void* data, at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& options) {
  return at::from_blob(data, sizes, strides, options);
}

Tensor addmm(const Tensor& bias, const Tensor& a, const Tensor& b) { return at::addmm(bias, a, b); }
Tensor constant_pad_nd(const Tensor& x, at::IntArrayRef pad, double value) { return at::constant_pad_nd(x, pad, value); }
Tensor convolution(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding,
                   int64_t groups) {
  return at::convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups);
}
std::tuple<Tensor, Tensor, Tensor> convolution_backward(const Tensor& grad, const Tensor& x, const Tensor& w,
                                                        at::OptionalIntArrayRef bias_sizes, at::IntArrayRef stride,
                                                        at::IntArrayRef padding, at::IntArrayRef dilation,
                                                        bool transposed, at::IntArrayRef output_padding,
                                                        int64_t groups, std::array<bool, 3> mask) {
  return at::convolution_backward(grad, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding,
                                  groups, mask);
}

}  // namespace rk
