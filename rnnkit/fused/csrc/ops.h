// rnnkit's fused CPU kernels: the ops each kernel file defines (in a namespace named after its file)
// and register.cpp registers with torch.library. Argument shapes: see the definitions and
// rnnkit/fused/_ops.py (SCHEMAS).

#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace rnnkit_fused {

using at::Tensor;

namespace rnn {  // rnn.cpp
std::tuple<Tensor, Tensor> rnn_fwd_entry(const Tensor& xp, const Tensor& w_hh, const Tensor& h0,
                                         const std::optional<Tensor>& lengths, int64_t act);
std::tuple<Tensor, Tensor, Tensor> rnn_bwd_entry(const Tensor& grad_out, const Tensor& grad_hn, const Tensor& w_hh,
                                                 const Tensor& h0, const std::optional<Tensor>& lengths,
                                                 const Tensor& out, int64_t act);
}  // namespace rnn

namespace lstm {  // lstm.cpp
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_fwd_entry(const Tensor& xp, const Tensor& w_hh,
                                                                          const std::optional<Tensor>& w_hr,
                                                                          const Tensor& h0, const Tensor& c0,
                                                                          const std::optional<Tensor>& lengths);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_bwd_entry(
    const Tensor& grad_out, const Tensor& grad_hn, const Tensor& grad_cn, const Tensor& w_hh,
    const std::optional<Tensor>& w_hr, const Tensor& h0, const Tensor& c0, const std::optional<Tensor>& lengths,
    const Tensor& out, const Tensor& gates, const Tensor& cs, const Tensor& ms);
// inference: lstm_fwd's out, h_n, c_n from the unprojected input, nothing saved (see lstm.cpp, "LSTM inference")
std::tuple<Tensor, Tensor, Tensor> lstm_infer(const Tensor& x, const Tensor& w_ih, const std::optional<Tensor>& b,
                                              const Tensor& w_hh, const std::optional<Tensor>& w_hr, const Tensor& h0,
                                              const Tensor& c0, const std::optional<Tensor>& lengths);
// with zoneout and recurrent dropout (the runner's masks; see lstm.cpp, "LSTM with zoneout and recurrent dropout")
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_reg_fwd(
    const Tensor& xp_, const Tensor& w_hh_, const std::optional<Tensor>& w_hr_, const Tensor& h0_, const Tensor& c0_,
    const std::optional<Tensor>& lengths, const std::optional<Tensor>& rd_, const std::optional<Tensor>& zh_,
    const std::optional<Tensor>& zc_, double zh_rate, double zc_rate);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_reg_bwd(
    const Tensor& grad_out_, const Tensor& grad_hn_, const Tensor& grad_cn_, const Tensor& w_hh_,
    const std::optional<Tensor>& w_hr_, const Tensor& h0_, const Tensor& c0_, const std::optional<Tensor>& lengths,
    const Tensor& out_, const Tensor& gates_, const Tensor& cs_, const Tensor& cn_, const Tensor& ms_,
    const std::optional<Tensor>& rd_, const std::optional<Tensor>& zh_, const std::optional<Tensor>& zc_,
    double zh_rate, double zc_rate);
}  // namespace lstm

namespace gru {  // gru.cpp
// inference: gru_fwd's out and h_n from the unprojected input, nothing saved (see gru.cpp, "GRU inference")
std::tuple<Tensor, Tensor> gru_infer(const Tensor& x, const Tensor& w_ih, const std::optional<Tensor>& b_ih,
                                     const Tensor& w_hh, const std::optional<Tensor>& b_hh, const Tensor& h0,
                                     const std::optional<Tensor>& lengths);
std::tuple<Tensor, Tensor, Tensor, Tensor> gru_fwd_entry(const Tensor& xp, const Tensor& w_hh,
                                                         const std::optional<Tensor>& b_hh, const Tensor& h0,
                                                         const std::optional<Tensor>& lengths);
std::tuple<Tensor, Tensor, Tensor, Tensor> gru_bwd_entry(const Tensor& grad_out, const Tensor& grad_hn,
                                                         const Tensor& w_hh, const Tensor& h0,
                                                         const std::optional<Tensor>& lengths, const Tensor& out,
                                                         const Tensor& rzn, const Tensor& hns);
// with zoneout and recurrent dropout (the runner's masks; see gru.cpp, "GRU with zoneout and recurrent dropout")
std::tuple<Tensor, Tensor, Tensor, Tensor> gru_reg_fwd(const Tensor& xp_, const Tensor& w_hh_,
                                                       const std::optional<Tensor>& b_hh_, const Tensor& h0_,
                                                       const std::optional<Tensor>& lengths,
                                                       const std::optional<Tensor>& rd_,
                                                       const std::optional<Tensor>& zh_, double zh_rate);
std::tuple<Tensor, Tensor, Tensor, Tensor> gru_reg_bwd(const Tensor& grad_out_, const Tensor& grad_hn_,
                                                       const Tensor& w_hh_, const Tensor& h0_,
                                                       const std::optional<Tensor>& lengths, const Tensor& out_,
                                                       const Tensor& rzn_, const Tensor& hns_,
                                                       const std::optional<Tensor>& rd_,
                                                       const std::optional<Tensor>& zh_, double zh_rate);
}  // namespace gru

namespace peephole {  // peephole.cpp
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> peephole_fwd(const Tensor& xp_, const Tensor& w_hh_,
                                                                 const Tensor& w_ci_, const Tensor& w_cf_,
                                                                 const Tensor& w_co_, const Tensor& h0_,
                                                                 const Tensor& c0_,
                                                                 const std::optional<Tensor>& lengths);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> peephole_bwd(
    const Tensor& grad_out_, const Tensor& grad_hn_, const Tensor& grad_cn_, const Tensor& w_hh_,
    const Tensor& w_ci_, const Tensor& w_cf_, const Tensor& w_co_, const Tensor& h0_, const Tensor& c0_,
    const std::optional<Tensor>& lengths, const Tensor& out_, const Tensor& gates_, const Tensor& cs_);
// with zoneout and recurrent dropout (regularize.h); also returns cn, the pre-zoneout c~_t
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> peephole_reg_fwd(
    const Tensor& xp_, const Tensor& w_hh_, const Tensor& w_ci_, const Tensor& w_cf_, const Tensor& w_co_,
    const Tensor& h0_, const Tensor& c0_, const std::optional<Tensor>& lengths, const std::optional<Tensor>& rd_,
    const std::optional<Tensor>& zh_, const std::optional<Tensor>& zc_, double zh_rate, double zc_rate);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> peephole_reg_bwd(
    const Tensor& grad_out_, const Tensor& grad_hn_, const Tensor& grad_cn_, const Tensor& w_hh_,
    const Tensor& w_ci_, const Tensor& w_cf_, const Tensor& w_co_, const Tensor& h0_, const Tensor& c0_,
    const std::optional<Tensor>& lengths, const Tensor& out_, const Tensor& gates_, const Tensor& cs_,
    const Tensor& cn_, const std::optional<Tensor>& rd_, const std::optional<Tensor>& zh_,
    const std::optional<Tensor>& zc_, double zh_rate, double zc_rate);
}  // namespace peephole

namespace ln_lstm {  // ln_lstm.cpp
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ln_lstm_fwd(
    const Tensor& xp_, const Tensor& w_hh_, const Tensor& g_hh_, const Tensor& g_c_, const Tensor& b_c_,
    const Tensor& h0_, const Tensor& c0_, const std::optional<Tensor>& lengths, double eps_);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ln_lstm_bwd(
    const Tensor& grad_out_, const Tensor& grad_hn_, const Tensor& grad_cn_, const Tensor& w_hh_,
    const Tensor& g_hh_, const Tensor& g_c_, const Tensor& b_c_, const Tensor& h0_, const Tensor& c0_,
    const std::optional<Tensor>& lengths, const Tensor& out_, const Tensor& gates_, const Tensor& cs_,
    const Tensor& nzs_, const Tensor& ncs_, const Tensor& rstd_);
// with zoneout and recurrent dropout (regularize.h)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ln_lstm_reg_fwd(
    const Tensor& xp_, const Tensor& w_hh_, const Tensor& g_hh_, const Tensor& g_c_, const Tensor& b_c_,
    const Tensor& h0_, const Tensor& c0_, const std::optional<Tensor>& lengths, double eps_,
    const std::optional<Tensor>& rd_, const std::optional<Tensor>& zh_, const std::optional<Tensor>& zc_,
    double zh_rate, double zc_rate);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ln_lstm_reg_bwd(
    const Tensor& grad_out_, const Tensor& grad_hn_, const Tensor& grad_cn_, const Tensor& w_hh_,
    const Tensor& g_hh_, const Tensor& g_c_, const Tensor& b_c_, const Tensor& h0_, const Tensor& c0_,
    const std::optional<Tensor>& lengths, const Tensor& out_, const Tensor& gates_, const Tensor& cs_,
    const Tensor& nzs_, const Tensor& ncs_, const Tensor& rstd_, const std::optional<Tensor>& rd_,
    const std::optional<Tensor>& zh_, const std::optional<Tensor>& zc_, double zh_rate, double zc_rate);
}  // namespace ln_lstm

namespace ln_gru {  // ln_gru.cpp
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ln_gru_fwd(const Tensor& xp_, const Tensor& w_hh_,
                                                              const Tensor& g_hh_, const Tensor& shift_,
                                                              const Tensor& h0_,
                                                              const std::optional<Tensor>& lengths, double eps_);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ln_gru_bwd(
    const Tensor& grad_out_, const Tensor& grad_hn_, const Tensor& w_hh_, const Tensor& g_hh_, const Tensor& shift_,
    const Tensor& h0_, const std::optional<Tensor>& lengths, const Tensor& out_, const Tensor& gates_,
    const Tensor& nzs_, const Tensor& rstd_);
// with zoneout and recurrent dropout (regularize.h)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ln_gru_reg_fwd(
    const Tensor& xp_, const Tensor& w_hh_, const Tensor& g_hh_, const Tensor& shift_, const Tensor& h0_,
    const std::optional<Tensor>& lengths, double eps_, const std::optional<Tensor>& rd_,
    const std::optional<Tensor>& zh_, double zh_rate);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ln_gru_reg_bwd(
    const Tensor& grad_out_, const Tensor& grad_hn_, const Tensor& w_hh_, const Tensor& g_hh_, const Tensor& shift_,
    const Tensor& h0_, const std::optional<Tensor>& lengths, const Tensor& out_, const Tensor& gates_,
    const Tensor& nzs_, const Tensor& rstd_, const std::optional<Tensor>& rd_, const std::optional<Tensor>& zh_,
    double zh_rate);
}  // namespace ln_gru

namespace indrnn {  // indrnn.cpp
std::tuple<Tensor, Tensor> indrnn_fwd(const Tensor& xp_, const Tensor& u_, const Tensor& h0_,
                                      const std::optional<Tensor>& lengths, int64_t act);
std::tuple<Tensor, Tensor, Tensor> indrnn_bwd(const Tensor& grad_out_, const Tensor& grad_hn_, const Tensor& u_,
                                              const Tensor& h0_, const std::optional<Tensor>& lengths,
                                              const Tensor& out_, int64_t act);
}  // namespace indrnn

namespace conv {  // conv.cpp
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> conv_lstm_fwd(
    const Tensor& xp_, const Tensor& w_hh_, const std::optional<Tensor>& w_ci_, const std::optional<Tensor>& w_cf_,
    const std::optional<Tensor>& w_co_, const Tensor& h0_, const Tensor& c0_, const std::optional<Tensor>& lengths);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> conv_lstm_bwd(
    const Tensor& grad_out_, const Tensor& grad_hn_, const Tensor& grad_cn_, const Tensor& w_hh_,
    const std::optional<Tensor>& w_ci_, const std::optional<Tensor>& w_cf_, const std::optional<Tensor>& w_co_,
    const Tensor& h0_, const Tensor& c0_, const std::optional<Tensor>& lengths, const Tensor& out_,
    const Tensor& gates_, const Tensor& cs_);
std::tuple<Tensor, Tensor, Tensor, Tensor> conv_gru_fwd(const Tensor& xp_, const Tensor& w_hh_,
                                                        const std::optional<Tensor>& b_hh_, const Tensor& h0_,
                                                        const std::optional<Tensor>& lengths);
std::tuple<Tensor, Tensor, Tensor, Tensor> conv_gru_bwd(const Tensor& grad_out_, const Tensor& grad_hn_,
                                                        const Tensor& w_hh_, const Tensor& h0_,
                                                        const std::optional<Tensor>& lengths, const Tensor& out_,
                                                        const Tensor& rzn_, const Tensor& hns_);
}  // namespace conv

namespace cell {  // cell.cpp
std::tuple<Tensor, Tensor> lstm_cell(const Tensor& x_, const Tensor& h_, const Tensor& c_, const Tensor& w_ih_,
                                     const Tensor& w_hh_, const std::optional<Tensor>& b_ih_,
                                     const std::optional<Tensor>& b_hh_);
Tensor gru_cell(const Tensor& x_, const Tensor& h_, const Tensor& w_ih_, const Tensor& w_hh_,
                const std::optional<Tensor>& b_ih_, const std::optional<Tensor>& b_hh_);
Tensor rnn_cell(const Tensor& x_, const Tensor& h_, const Tensor& w_ih_, const Tensor& w_hh_,
                const std::optional<Tensor>& b_ih_, const std::optional<Tensor>& b_hh_, int64_t act);
// one plain inference step for cell_py.cpp's direct entry (see cell.cpp)
void direct_step(long kind, int64_t N, int64_t I, int64_t H, const Tensor& x, const Tensor* h0_, const Tensor* c0_,
                 const Tensor& w_ih, const Tensor& w_hh, const Tensor* b_ih, const Tensor* b_hh, Tensor& h_new,
                 Tensor& c_new);
}  // namespace cell

namespace project {  // project.cpp
Tensor project_fwd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b);
std::tuple<Tensor, Tensor, Tensor> project_bwd(const Tensor& grad, const Tensor& x, const Tensor& w,
                                               std::array<bool, 3> mask);
}  // namespace project

}  // namespace rnnkit_fused
