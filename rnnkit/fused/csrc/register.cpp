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
// machine's online and usable cores (negative / 0: sample them). A call that sets anything forgets
// past samples (the next op call samples afresh); ("", -1, 0) only reads the state. Returns [mode (0 auto, 1 serial, 2 parallel, -1 unread),
// the last decision (0/1), smoothed other processes' threads, online cores, usable cores, samples,
// whether the last sampling thread waited for a core].
std::vector<double> load_policy(const std::string& mode, double fake_others, int64_t fake_cpus) {
  using namespace under_load;
  State& s = state();
  if (!mode.empty()) {
    const int m = mode == "env" ? kUnread : parse_mode(mode.c_str());
    TORCH_CHECK_VALUE(mode == "env" || m != kUnread, "load_policy: mode='", mode,
                      "', expected '', 'env', 'auto', 'serial' or 'parallel'");
    s.mode.store(m);
  }
  if (!mode.empty() || fake_others >= 0 || fake_cpus > 0) {
    std::lock_guard<std::mutex> lock(s.sampling);
    s.fake_others = fake_others;
    s.fake_cpus = int(std::max<int64_t>(fake_cpus, 0));
    s.last_ns = 0;
    s.others.store(0.0);
    s.serial.store(false);
    s.waited.store(false);
    s.next_ns.store(0);
  }
  return {double(s.mode.load()), s.serial.load() ? 1.0 : 0.0, s.others.load(), double(s.online.load()),
          double(s.limit.load()), double(s.samples.load()), s.waited.load() ? 1.0 : 0.0};
}

}  // namespace rnnkit_fused

// The tensor ops' schemas are defined in Python when rnnkit is imported (rnnkit/fused/_ops.py, SCHEMAS), so
// saved torch.export / torch.jit artifacts that call them load before this library is built; this library adds
// the CPU kernels (and the three info ops below).
TORCH_LIBRARY_FRAGMENT(rnnkit_fused, m) {
  m.def("capability() -> str", &rnnkit_fused::capability);
  m.def("uses_blas() -> int", &rnnkit_fused::uses_blas);
  m.def("bf16_gemm() -> int", &rnnkit_fused::bf16_gemm);
  m.def("oversubscribed() -> bool", &rnnkit_fused::oversubscribed);
  m.def("load_policy(str mode, float fake_others, int fake_cpus) -> float[]", &rnnkit_fused::load_policy);
}

TORCH_LIBRARY_IMPL(rnnkit_fused, CPU, m) {
  m.impl("rnn_fwd", &rnnkit_fused::PerCall<&rnnkit_fused::rnn::rnn_fwd_entry>::call);
  m.impl("rnn_bwd", &rnnkit_fused::PerCall<&rnnkit_fused::rnn::rnn_bwd_entry>::call);
  m.impl("lstm_fwd", &rnnkit_fused::PerCall<&rnnkit_fused::lstm::lstm_fwd_entry>::call);
  m.impl("lstm_bwd", &rnnkit_fused::PerCall<&rnnkit_fused::lstm::lstm_bwd_entry>::call);
  m.impl("gru_fwd", &rnnkit_fused::PerCall<&rnnkit_fused::gru::gru_fwd_entry>::call);
  m.impl("gru_bwd", &rnnkit_fused::PerCall<&rnnkit_fused::gru::gru_bwd_entry>::call);
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
}
