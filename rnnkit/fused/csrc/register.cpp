// rnnkit's fused CPU kernels: the op registration (torch.library) and the info ops.

#include "common.h"
#include "ops.h"

#include <torch/library.h>

#include <string>

namespace rnnkit_fused {

// Which instruction set the gate math was compiled for (reported by `rnnkit info`).
std::string capability() {
#if defined(CPU_CAPABILITY_AVX2)
  return "AVX2";
#else
  return "DEFAULT";
#endif
}

int64_t uses_blas() { return (sgemm_ != nullptr && dgemm_ != nullptr) ? 1 : 0; }

// 1 where the bf16 recurrent product runs on MKL's bf16 GEMM (for batches of kSmallRows and more), else 0.
int64_t bf16_gemm() { return bf16_gemm_enabled() ? 1 : 0; }

}  // namespace rnnkit_fused

// The tensor ops' schemas are defined in Python when rnnkit is imported (rnnkit/fused/_ops.py, SCHEMAS), so
// saved torch.export / torch.jit artifacts that call them load before this library is built; this library adds
// the CPU kernels (and the three info ops below).
TORCH_LIBRARY_FRAGMENT(rnnkit_fused, m) {
  m.def("capability() -> str", &rnnkit_fused::capability);
  m.def("uses_blas() -> int", &rnnkit_fused::uses_blas);
  m.def("bf16_gemm() -> int", &rnnkit_fused::bf16_gemm);
}

TORCH_LIBRARY_IMPL(rnnkit_fused, CPU, m) {
  m.impl("rnn_fwd", &rnnkit_fused::rnn::rnn_fwd_entry);
  m.impl("rnn_bwd", &rnnkit_fused::rnn::rnn_bwd_entry);
  m.impl("lstm_fwd", &rnnkit_fused::lstm::lstm_fwd_entry);
  m.impl("lstm_bwd", &rnnkit_fused::lstm::lstm_bwd_entry);
  m.impl("gru_fwd", &rnnkit_fused::gru::gru_fwd_entry);
  m.impl("gru_bwd", &rnnkit_fused::gru::gru_bwd_entry);
  m.impl("peephole_fwd", &rnnkit_fused::peephole::peephole_fwd);
  m.impl("peephole_bwd", &rnnkit_fused::peephole::peephole_bwd);
  m.impl("indrnn_fwd", &rnnkit_fused::indrnn::indrnn_fwd);
  m.impl("indrnn_bwd", &rnnkit_fused::indrnn::indrnn_bwd);
  m.impl("ln_lstm_fwd", &rnnkit_fused::ln_lstm::ln_lstm_fwd);
  m.impl("ln_lstm_bwd", &rnnkit_fused::ln_lstm::ln_lstm_bwd);
  m.impl("lstm_cell", &rnnkit_fused::cell::lstm_cell);
  m.impl("gru_cell", &rnnkit_fused::cell::gru_cell);
  m.impl("rnn_cell", &rnnkit_fused::cell::rnn_cell);
  m.impl("conv_lstm_fwd", &rnnkit_fused::conv::conv_lstm_fwd);
  m.impl("conv_lstm_bwd", &rnnkit_fused::conv::conv_lstm_bwd);
  m.impl("conv_gru_fwd", &rnnkit_fused::conv::conv_gru_fwd);
  m.impl("conv_gru_bwd", &rnnkit_fused::conv::conv_gru_bwd);
  m.impl("ln_gru_fwd", &rnnkit_fused::ln_gru::ln_gru_fwd);
  m.impl("ln_gru_bwd", &rnnkit_fused::ln_gru::ln_gru_bwd);
  m.impl("project_fwd", &rnnkit_fused::project::project_fwd);
  m.impl("project_bwd", &rnnkit_fused::project::project_bwd);
  m.impl("lstm_reg_fwd", &rnnkit_fused::lstm::lstm_reg_fwd);
  m.impl("lstm_reg_bwd", &rnnkit_fused::lstm::lstm_reg_bwd);
  m.impl("gru_reg_fwd", &rnnkit_fused::gru::gru_reg_fwd);
  m.impl("gru_reg_bwd", &rnnkit_fused::gru::gru_reg_bwd);
}
