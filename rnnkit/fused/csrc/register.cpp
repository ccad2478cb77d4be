// rnnkit's fused CPU kernels: the op registration (torch.library) and the info ops.

#include "common.h"
#include "ops.h"

#include <torch/library.h>

#include <string>
#include <vector>

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

// Whether an op call starting now would run on one thread (common.h, "under load"); the fused backend
// asks it before a large input projection (rnnkit/fused/backend.py, _project).
bool oversubscribed() { return under_load::oversubscribed(); }

// The under-load policy's state, and its test hook. `mode`: "" leaves it, "env" reads
// RNNKIT_FUSED_UNDER_LOAD again at the next call, "auto" / "serial" / "parallel" set it.
// `fake_others` >= 0 replaces the sampled runnable threads of other processes, `fake_cpus` > 0 the
// machine's online and usable cores (negative / 0: sample them). A call that sets the mode or the cores
// forgets past samples (the next op call samples afresh); one that sets only `fake_others` keeps them
// and makes the next op call sample (a test feeds a sequence of samples so); ("", -1, 0) only reads. Returns [mode (0 auto, 1 serial, 2 parallel, -1 unread),
// the last decision (0/1), other processes' runnable threads (the least of the window), online cores,
// usable cores, samples, whether the last sampling thread waited for a core, the last sample's count].
std::vector<double> load_policy(const std::string& mode, double fake_others, int64_t fake_cpus) {
  using namespace under_load;
  State& s = state();
  if (!mode.empty()) {
    const int m = mode == "env" ? kUnread : parse_mode(mode.c_str());
    TORCH_CHECK_VALUE(mode == "env" || m != kUnread, "load_policy: mode='", mode,
                      "', expected '', 'env', 'auto', 'serial' or 'parallel'");
    s.mode.store(m);
  }
  if (!mode.empty() || fake_cpus > 0) {
    std::lock_guard<std::mutex> lock(s.sampling);
    s.fake_others = fake_others;
    s.fake_cpus = int(std::max<int64_t>(fake_cpus, 0));
    s.last_ns = 0;
    s.others.store(0.0);
    s.last.store(0.0);
    s.serial.store(false);
    s.waited.store(false);
    s.next_ns.store(0);
  } else if (fake_others >= 0) {  // the next samples read this instead of /proc; the window is kept
    std::lock_guard<std::mutex> lock(s.sampling);
    s.fake_others = fake_others;
    s.next_ns.store(0);  // the next op call samples
  }
  return {double(s.mode.load()), s.serial.load() ? 1.0 : 0.0, s.others.load(), double(s.online.load()),
          double(s.limit.load()), double(s.samples.load()), s.waited.load() ? 1.0 : 0.0, s.last.load()};
}


// The recurrent product's kernel for every op call from now on (common.h, RecurrentKernel): "rule" (the
// default), "blas" or "panel"; "" leaves it. Returns the setting before the call. For benchmarks and tests.
std::string recurrent_kernel(const std::string& mode) {
  static const char* names[] = {"rule", "blas", "panel"};
  std::atomic<int>& m = recurrent_kernel_mode();
  const int before = m.load();
  if (!mode.empty()) {
    int v = -1;
    for (int i = 0; i < 3; ++i)
      if (mode == names[i]) v = i;
    TORCH_CHECK_VALUE(v >= 0, "recurrent_kernel: mode='", mode, "', expected '', 'rule', 'blas' or 'panel'");
    m.store(v);
  }
  return names[before];
}

// Test and benchmark hook: `steps` recurrent products c = beta c + a op(w) through Recurrent<T> (w laid out
// once, as a step loop does), with `kernel` -1 (the process-wide setting), 0 (by the rule), 1 (BLAS) or 2
// (panel). a is (rows, k) and c (rows, cols), both with unit column stride (any row stride); w is (cols, k)
// when trans, else (k, cols), contiguous; float32 or float64; beta 0 or 1.
void recurrent_mm(const Tensor& a, const Tensor& w, const Tensor& c, bool trans, double beta, int64_t kernel,
                  int64_t steps) {
  TORCH_CHECK(a.dim() == 2 && w.dim() == 2 && c.dim() == 2, "recurrent_mm: a, w and c must be 2-D, got a ",
              a.sizes(), ", w ", w.sizes(), ", c ", c.sizes());
  TORCH_CHECK(a.scalar_type() == w.scalar_type() && a.scalar_type() == c.scalar_type() &&
                  (a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble),
              "recurrent_mm: a, w and c must all be float32 or all float64, got ", a.scalar_type(), ", ",
              w.scalar_type(), ", ", c.scalar_type());
  const int64_t rows = a.size(0), k = a.size(1), cols = c.size(1);
  const std::vector<int64_t> wshape = trans ? std::vector<int64_t>{cols, k} : std::vector<int64_t>{k, cols};
  TORCH_CHECK(c.size(0) == rows && w.sizes() == at::IntArrayRef(wshape), "recurrent_mm: with a ", a.sizes(),
              " and c ", c.sizes(), " (trans=", trans, "), w must be ", at::IntArrayRef(wshape), ", got ", w.sizes(),
              c.size(0) == rows ? "" : " (and c must have a's rows)");
  TORCH_CHECK((a.stride(1) == 1 || k < 2) && (c.stride(1) == 1 || cols < 2) && w.is_contiguous(),
              "recurrent_mm: a and c need unit column stride and w must be contiguous, got strides a ", a.strides(),
              ", c ", c.strides(), ", w ", w.strides());
  TORCH_CHECK_VALUE(beta == 0.0 || beta == 1.0, "recurrent_mm: beta=", beta, ", expected 0 or 1");
  TORCH_CHECK_VALUE(kernel >= -1 && kernel <= 2, "recurrent_mm: kernel=", kernel,
                    ", expected -1 (the process-wide setting), 0 (rule), 1 (blas) or 2 (panel)");
  TORCH_CHECK_VALUE(steps >= 1, "recurrent_mm: steps=", steps, ", expected at least 1");
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "recurrent_mm", [&] {
    using T = scalar_t;
    const Recurrent<T> rec(rows, cols, k, trans, w, (int)kernel);
    const int64_t lda = rows > 1 ? a.stride(0) : std::max<int64_t>(k, 1), ldc = rows > 1 ? c.stride(0) : cols;
    for (int64_t s = 0; s < steps; ++s) rec(a.data_ptr<T>(), lda, T(beta), c.data_ptr<T>(), ldc);
  });
}

}  // namespace rnnkit_fused

// The tensor ops' schemas are defined in Python when rnnkit is imported (rnnkit/fused/_ops.py, SCHEMAS), so
// saved torch.export / torch.jit artifacts that call them load before this library is built; this library adds
// the CPU kernels (and the info and test ops below).
TORCH_LIBRARY_FRAGMENT(rnnkit_fused, m) {
  m.def("capability() -> str", &rnnkit_fused::capability);
  m.def("uses_blas() -> int", &rnnkit_fused::uses_blas);
  m.def("bf16_gemm() -> int", &rnnkit_fused::bf16_gemm);
  m.def("oversubscribed() -> bool", &rnnkit_fused::oversubscribed);
  m.def("load_policy(str mode, float fake_others, int fake_cpus) -> float[]", &rnnkit_fused::load_policy);
  m.def("recurrent_kernel(str mode) -> str", &rnnkit_fused::recurrent_kernel);
  m.def("recurrent_mm(Tensor a, Tensor w, Tensor(a!) c, bool trans, float beta, int kernel, int steps) -> ()",
        &rnnkit_fused::PerCall<&rnnkit_fused::recurrent_mm>::call);
}

TORCH_LIBRARY_IMPL(rnnkit_fused, CPU, m) {
  m.impl("rnn_fwd", &rnnkit_fused::PerCall<&rnnkit_fused::rnn::rnn_fwd_entry>::call);
  m.impl("rnn_bwd", &rnnkit_fused::PerCall<&rnnkit_fused::rnn::rnn_bwd_entry>::call);
  m.impl("lstm_fwd", &rnnkit_fused::PerCall<&rnnkit_fused::lstm::lstm_fwd_entry>::call);
  m.impl("lstm_bwd", &rnnkit_fused::PerCall<&rnnkit_fused::lstm::lstm_bwd_entry>::call);
  m.impl("lstm_infer", &rnnkit_fused::PerCall<&rnnkit_fused::lstm::lstm_infer>::call);
  m.impl("gru_fwd", &rnnkit_fused::PerCall<&rnnkit_fused::gru::gru_fwd_entry>::call);
  m.impl("gru_bwd", &rnnkit_fused::PerCall<&rnnkit_fused::gru::gru_bwd_entry>::call);
  m.impl("gru_infer", &rnnkit_fused::PerCall<&rnnkit_fused::gru::gru_infer>::call);
  m.impl("peephole_fwd", &rnnkit_fused::PerCall<&rnnkit_fused::peephole::peephole_fwd>::call);
  m.impl("peephole_bwd", &rnnkit_fused::PerCall<&rnnkit_fused::peephole::peephole_bwd>::call);
  m.impl("indrnn_fwd", &rnnkit_fused::PerCall<&rnnkit_fused::indrnn::indrnn_fwd>::call);
  m.impl("indrnn_bwd", &rnnkit_fused::PerCall<&rnnkit_fused::indrnn::indrnn_bwd>::call);
  m.impl("ln_lstm_fwd", &rnnkit_fused::PerCall<&rnnkit_fused::ln_lstm::ln_lstm_fwd>::call);
  m.impl("ln_lstm_bwd", &rnnkit_fused::PerCall<&rnnkit_fused::ln_lstm::ln_lstm_bwd>::call);
  m.impl("lstm_cell", &rnnkit_fused::PerCall<&rnnkit_fused::cell::lstm_cell>::call);
  m.impl("gru_cell", &rnnkit_fused::PerCall<&rnnkit_fused::cell::gru_cell>::call);
  m.impl("rnn_cell", &rnnkit_fused::PerCall<&rnnkit_fused::cell::rnn_cell>::call);
  m.impl("conv_lstm_fwd", &rnnkit_fused::PerCall<&rnnkit_fused::conv::conv_lstm_fwd>::call);
  m.impl("conv_lstm_bwd", &rnnkit_fused::PerCall<&rnnkit_fused::conv::conv_lstm_bwd>::call);
  m.impl("conv_gru_fwd", &rnnkit_fused::PerCall<&rnnkit_fused::conv::conv_gru_fwd>::call);
  m.impl("conv_gru_bwd", &rnnkit_fused::PerCall<&rnnkit_fused::conv::conv_gru_bwd>::call);
  m.impl("ln_gru_fwd", &rnnkit_fused::PerCall<&rnnkit_fused::ln_gru::ln_gru_fwd>::call);
  m.impl("ln_gru_bwd", &rnnkit_fused::PerCall<&rnnkit_fused::ln_gru::ln_gru_bwd>::call);
  m.impl("project_fwd", &rnnkit_fused::PerCall<&rnnkit_fused::project::project_fwd>::call);
  m.impl("project_bwd", &rnnkit_fused::PerCall<&rnnkit_fused::project::project_bwd>::call);
  m.impl("lstm_reg_fwd", &rnnkit_fused::PerCall<&rnnkit_fused::lstm::lstm_reg_fwd>::call);
  m.impl("lstm_reg_bwd", &rnnkit_fused::PerCall<&rnnkit_fused::lstm::lstm_reg_bwd>::call);
  m.impl("gru_reg_fwd", &rnnkit_fused::PerCall<&rnnkit_fused::gru::gru_reg_fwd>::call);
  m.impl("gru_reg_bwd", &rnnkit_fused::PerCall<&rnnkit_fused::gru::gru_reg_bwd>::call);
  m.impl("peephole_reg_fwd", &rnnkit_fused::PerCall<&rnnkit_fused::peephole::peephole_reg_fwd>::call);
  m.impl("peephole_reg_bwd", &rnnkit_fused::PerCall<&rnnkit_fused::peephole::peephole_reg_bwd>::call);
  m.impl("ln_lstm_reg_fwd", &rnnkit_fused::PerCall<&rnnkit_fused::ln_lstm::ln_lstm_reg_fwd>::call);
  m.impl("ln_lstm_reg_bwd", &rnnkit_fused::PerCall<&rnnkit_fused::ln_lstm::ln_lstm_reg_bwd>::call);
  m.impl("ln_gru_reg_fwd", &rnnkit_fused::PerCall<&rnnkit_fused::ln_gru::ln_gru_reg_fwd>::call);
  m.impl("ln_gru_reg_bwd", &rnnkit_fused::PerCall<&rnnkit_fused::ln_gru::ln_gru_reg_bwd>::call);
}
