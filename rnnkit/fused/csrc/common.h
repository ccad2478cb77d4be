// rnnkit's fused CPU kernels: the shared header. Every kernel file (one per cell family, see
// _build.py's SOURCES) includes it: the BLAS entry points, threading by work (OneThread and its
// thresholds), the GEMM helpers and the recurrent product (Recurrent), the SIMD gate activations,
// shape checks, the helpers around the time loop, and the bfloat16 conversions.
//
// The kernels: whole-sequence RNN (tanh/relu), LSTM (with and without a projection), GRU, peephole
// LSTM, LayerNorm LSTM and GRU, IndRNN (tanh/relu), ConvLSTM/ConvGRU, forward and hand-written
// backward (BPTT), plus inference single-step cells. One file per family, compiled in parallel by
// ninja; an edit to one file rebuilds that object only (an edit to a header rebuilds its includers).
//
// Layout (shape legend as in rnnkit/spec.py): time-major, contiguous.
//   xp     (L, N, G)  input projection of every step, done by the caller in one
//                     GEMM (W_ih x + b_ih, plus b_hh for RNN/LSTM)
//   w_hh   (G, H_out) recurrent weights, row-major as torch.nn stores them
//   out    (L, N, H_out)  h_t for every t
// Lengths: row n is live for t < lengths[n]; past it the state is held, so
// out[t, n] = h at step lengths[n]-1 and the final state is that state. This is
// exactly rnnkit.runner.reference_scan's semantics (the oracle).
//
// Inside the time loop: one BLAS call for the recurrent product (no ATen
// dispatch, no allocation), then vectorized gate math over rows, written as
// at::parallel_for; built without -fopenmp, that runs serially (see lstm_rows
// and docs/fused.md: only the LSTM splits its rows over threads).

#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <tuple>

#include <dirent.h>
#include <fcntl.h>
#include <sched.h>
#include <unistd.h>

// The few ATen functions the kernels call, declared here and defined in aten.cpp: ATen's own
// headers for them (ATen/ops/*.h pull in Context.h and more, ATen/TensorOperators.h every op)
// would add ~5-10 s of parsing to every kernel file. Called once per op call, never per step.
namespace rk {
using at::Tensor;
Tensor empty(at::IntArrayRef size, const at::TensorOptions& options);
Tensor zeros(at::IntArrayRef size, const at::TensorOptions& options);
Tensor zeros_like(const Tensor& like);
Tensor mm(const Tensor& a, const Tensor& b);
Tensor& mm_out(Tensor& out, const Tensor& a, const Tensor& b);
Tensor sum(const Tensor& x, at::IntArrayRef dims, bool keepdim, at::ScalarType dtype);
Tensor cat(at::TensorList tensors, int64_t dim);
Tensor from_blob(void* data, at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& options);
Tensor addmm(const Tensor& bias, const Tensor& a, const Tensor& b);
Tensor constant_pad_nd(const Tensor& x, at::IntArrayRef pad, double value);
Tensor convolution(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed, at::IntArrayRef output_padding,
                   int64_t groups);
std::tuple<Tensor, Tensor, Tensor> convolution_backward(const Tensor& grad, const Tensor& x, const Tensor& w,
                                                        at::OptionalIntArrayRef bias_sizes, at::IntArrayRef stride,
                                                        at::IntArrayRef padding, at::IntArrayRef dilation,
                                                        bool transposed, at::IntArrayRef output_padding,
                                                        int64_t groups, std::array<bool, 3> mask);
}  // namespace rk

extern "C" {
// Fortran BLAS as exported by libtorch_cpu (MKL or OpenBLAS). Weak: if this
// libtorch does not export them, the kernels fall back to at::mm on views.
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
// MKL's packed GEMM: the recurrent weights are packed once per sequence and
// every step's product reuses them (plain sgemm re-packs them on every call).
// Weak too: with another BLAS the kernels use plain gemm.
size_t cblas_sgemm_pack_get_size(int, int, int, int) __attribute__((weak));
void cblas_sgemm_pack(int, int, int, int, int, int, float, const float*, int, float*) __attribute__((weak));
void cblas_sgemm_compute(int, int, int, int, int, int, const float*, int, const float*, int, float, float*, int)
    __attribute__((weak));
size_t cblas_dgemm_pack_get_size(int, int, int, int) __attribute__((weak));
void cblas_dgemm_pack(int, int, int, int, int, int, double, const double*, int, double*) __attribute__((weak));
void cblas_dgemm_compute(int, int, int, int, int, int, const double*, int, const double*, int, double, double*, int)
    __attribute__((weak));
// libgomp (torch's OpenMP runtime): the LSTM's per-step row split (see lstm_rows)
void GOMP_parallel(void (*)(void*), void*, unsigned, unsigned) __attribute__((weak));
int omp_get_thread_num() __attribute__((weak));
int omp_get_num_threads() __attribute__((weak));
// Threading by work (see OneThread): MKL's per-thread thread count, what mkl_service.h calls
// mkl_set_num_threads_local (a macro for this C entry; the lowercase symbol that libtorch also
// exports is the Fortran interface and takes a pointer). Returns the previous per-thread value,
// 0 meaning "none: MKL's global setting". And libgomp's per-thread nthreads-var ICV.
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
void omp_set_num_threads(int) __attribute__((weak));
int omp_get_max_threads() __attribute__((weak));
// MKL: C (f32) = alpha op(A) op(B) + beta C, A and B bf16 (the bfloat16 kernels). Weak like the BLAS above.
void cblas_gemm_bf16bf16f32(int, int, int, int, int, int, float, const c10::BFloat16*, int, const c10::BFloat16*, int,
                            float, float*, int) __attribute__((weak));
}

namespace rnnkit_fused {


using at::Tensor;
template <typename T>
using Vec = at::vec::Vectorized<T>;

// ---------------------------------------------------------------- BLAS

inline void blas(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b,
                 int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void blas(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b,
                 int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline bool have_blas(float*) { return sgemm_ != nullptr; }
inline bool have_blas(double*) { return dgemm_ != nullptr; }

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;
inline bool have_packed(float*) {
  return cblas_sgemm_pack_get_size && cblas_sgemm_pack && cblas_sgemm_compute;
}
inline bool have_packed(double*) {
  return cblas_dgemm_pack_get_size && cblas_dgemm_pack && cblas_dgemm_compute;
}
inline size_t pack_size(float*, int m, int n, int k) { return cblas_sgemm_pack_get_size(kBMatrix, m, n, k); }
inline size_t pack_size(double*, int m, int n, int k) { return cblas_dgemm_pack_get_size(kBMatrix, m, n, k); }
inline void pack(int trans, int m, int n, int k, const float* b, int ldb, float* dst) {
  cblas_sgemm_pack(kRowMajor, kBMatrix, trans, m, n, k, 1.f, b, ldb, dst);
}
inline void pack(int trans, int m, int n, int k, const double* b, int ldb, double* dst) {
  cblas_dgemm_pack(kRowMajor, kBMatrix, trans, m, n, k, 1.0, b, ldb, dst);
}
inline void packed_compute(int m, int n, int k, const float* a, int lda, const float* bp, float beta, float* c, int ldc) {
  cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, m, n, k, a, lda, bp, n, beta, c, ldc);
}
inline void packed_compute(int m, int n, int k, const double* a, int lda, const double* bp, double beta, double* c,
                           int ldc) {
  cblas_dgemm_compute(kRowMajor, kNoTrans, kPacked, m, n, k, a, lda, bp, n, beta, c, ldc);
}

// ---------------------------------------------------------------- threading by work
//
// Every multi-threaded parallel region costs a fork and a join. On an idle machine that is a
// few microseconds; on a busy one (more runnable threads than cores) the join waits until the
// OS runs the team's descheduled thread again, a scheduler time slice (milliseconds). The
// kernels used to pay that at every step: torch turns MKL's dynamic threading off, so MKL runs
// every GEMM, however small, on all of torch's threads (one or two regions per call), and a
// weight gradient of 10k multiply-adds opened regions too. So each parallel piece decides by
// its own work whether it may use more than one thread; below these sizes it runs on the
// calling thread and opens no region at all (tests/test_fused_threads.py counts them).
//
// Measured on the 2-core machine of docs/fused.md ("Under load": AMD EPYC KVM guest, torch
// 2.13, MKL 2024.2, 2 torch threads), forward+backward of whole layers, the old and the new
// threading interleaved in one process (a temporary switch), medians of 15 to 21 samples, at
// moments when other processes used under 0.05 cores ("idle"); "loaded" = 3 busy processes,
// where one region cost 0.2 ms (back to back, every step) to 5 ms (alone, after the loop).
// Ratios are time with the piece on one thread / on two:
//  * kSerialStepMacs: a GEMM inside the time loop (each step's recurrent product, MKL's packed
//    GEMM; a cell step's products at batch >= 4), rows * cols * k multiply-adds. Idle: GRU
//    N=8 H=32 (25k MACs per step) 0.70 and 0.95, GRU N=4 H=64 (49k) 0.87 to 1.02, LSTM N=4
//    H=64 (66k) 0.76 to 1.03, GRU N=8 H=64 (98k) 0.96 and 1.06: even; GRU N=16 H=64 (197k)
//    1.01 to 1.06, RNN N=16 H=128 (262k) 1.02 to 1.11, RNN N=32 H=128 (524k)
//    1.02 to 1.10, GRU N=16 H=128 (786k) 1.06 to 1.26, LSTM N=16 H=128 (1 Mi) 1.11: two
//    threads pay. Loaded, LSTM N=16 H=128: 0.77 (0.52 with the row split off too). Below 2^17
//    one thread.
//  * kSerialOnceMacs: a GEMM run once per op call (a weight gradient over all L * N rows;
//    the conv kernels' weight-gradient convolution). Idle, (G x L*N) x (L*N x K) alone: 10k
//    MACs 0.59, 2.5M 1.24 (13 us saved), 6.5M 1.67 (90 us), 26M 1.69; in the layer, GRU N=16
//    H=64 T=50 (9.8M) 1.08 on one thread. Loaded, GRU N=4 H=64 T=50 (its input projection on
//    one thread as well): its 2.5M weight gradient on two threads made a call 18 ms, on one
//    7 ms. Below 2^22 one thread.
//  * kLstmSplitUnitsPerThread, lstm_rows: the LSTM gate pass is split only into parts of at
//    least this many cell units (N * H / threads). Idle, split vs not: N*H = 2048 (1024 per
//    thread) 4.6% faster, 3072 7%, 4096 3 to 7%, 16384 6%; loaded the split cost 1.5 to 2
//    times at each of those sizes. Kept at 768 per thread (the 1536 units measured before on
//    2 threads; below it the split lost 2 to 37%) so idle speed holds; what changed is that
//    the team is sized by the work (many threads no longer split 2048 units many ways).
//  * kSerialConvMacs: one step's recurrent convolution of the conv kernels (N * G * hid *
//    kernel volume * positions; oneDNN). Idle, 1 / 2 threads: 37k MACs 0.80, 147k 0.86,
//    295k 0.98, 590k 1.16, 4.7M 1.10, 151M 1.42; with other processes using 1.3 to 1.8 cores,
//    one thread was 2 to 10 times faster at every size. Below 2^18 one thread.
//  * kSerialElems: the ATen element-wise passes after the time loop (the cat of the previous
//    states, the bias and peephole gradient sums), once per call. Idle, 1 / 2 threads, sum
//    over (L, N): 38k elements 0.85 (-2 us), 154k 1.29 (5 us saved), 819k 1.37 (16 us); cat
//    0.82, 1.21 (6 us), 1.84 (60 us). Below 2^20 one thread.
constexpr int64_t kSerialStepMacs = int64_t(1) << 17;
constexpr int64_t kSerialOnceMacs = int64_t(1) << 22;
constexpr int64_t kLstmSplitUnitsPerThread = 768;
constexpr int64_t kSerialConvMacs = int64_t(1) << 18;
constexpr int64_t kSerialElems = int64_t(1) << 20;

// While alive, the calling thread's MKL calls and its OpenMP regions (ATen's at::parallel_for
// in libtorch, oneDNN inside at::convolution or a bf16 at::mm, a BLAS built on OpenMP) run on
// one thread; the previous settings come back at the end of the scope (also on an exception).
// Both settings are per thread, so other threads (another op running concurrently, torch's
// autograd or inter-op threads) are not affected:
//  * MKL_Set_Num_Threads_Local (mkl_set_num_threads_local) is MKL's thread-local count, which
//    overrides its global one on this thread only; torch.set_num_threads sets it the same way.
//  * omp_set_num_threads sets the nthreads-var ICV, which OpenMP keeps per task (libgomp: the
//    calling thread's implicit task), so it too is thread-local; torch.set_num_threads calls it
//    in the same way, and at::get_num_threads() reads it back (omp_get_max_threads()).
// at::get_num_threads() is called first: on a thread torch has not seen yet it initializes the
// thread's counts from torch's setting, which would otherwise overwrite ours on the first
// ATen parallel call inside the scope. Nothing to do when torch already runs on one thread.
class OneThread {
 public:
  explicit OneThread(bool serial) {
    if (!serial || at::get_num_threads() < 2) return;
    if (MKL_Set_Num_Threads_Local) {
      mkl_prev_ = MKL_Set_Num_Threads_Local(1);
      mkl_ = true;
    }
    if (omp_set_num_threads && omp_get_max_threads) {
      omp_prev_ = omp_get_max_threads();
      omp_set_num_threads(1);
      omp_ = true;
    }
  }
  ~OneThread() {
    if (omp_) omp_set_num_threads(omp_prev_);
    if (mkl_) MKL_Set_Num_Threads_Local(mkl_prev_);
  }
  OneThread(const OneThread&) = delete;
  OneThread& operator=(const OneThread&) = delete;

 private:
  bool mkl_ = false, omp_ = false;
  int mkl_prev_ = 0, omp_prev_ = 1;
};

// ---------------------------------------------------------------- under load
//
// Threading by work decides by the size of a piece; this decides by the machine. When more threads
// want to run than there are cores, every join of a parallel region waits for a descheduled thread
// (a scheduler time slice), and a problem big enough to be threaded at idle (LSTM N=16 H=128: 1 Mi
// multiply-adds per step, ~500 regions per forward+backward) ran up to 1.6x slower than torch.nn
// with 3 busy processes on 2 cores. So every tensor op call asks oversubscribed() once, at its start
// (register.cpp wraps each op in PerCall: a OneThread around the whole call), and then runs entirely
// on the calling thread; the decision is per call, never per step.
//
// The signal: the machine's runnable threads right now (/proc/loadavg's fourth field, the kernel's
// nr_running: the instantaneous count the load average averages) minus this process's own runnable
// threads (state R in /proc/self/task/*/stat) = the threads of other processes that want a core,
// taken as the least of the last kWindow samples (about 1 to 1.5 s of op calls). A busy process is
// runnable in every sample; what is runnable only now and then (kernel threads: memory compaction,
// page-cache writeback, a kworker; a sample that races this process's own thread switching state)
// is not load a team waits for, and the least of a few samples drops it. An exponential average
// (time constant 1 s) was used before: on an idle 2-core machine such short-lived threads held it
// at 0.25-0.3 during large calls, so one burst above kEnter turned calls serial and the hysteresis
// kept them there (LSTM N32 H1024 T50 forward+backward, 2 threads: median 1.44x torch.nn's time,
// every serial call about 1.9x the parallel one). The machine is oversubscribed for a call on
// `team` threads (torch's thread count) when those others plus the team exceed the online cores
// by more than kEnter (kLeave to go back: hysteresis), or when the team is larger than the cores
// this process may use (affinity, cgroup v2 cpu.max quota).
// A second trigger covers what a machine-wide count cannot see (a process pinned, with its busy
// neighbours, to a few cores of a big machine): the sampling thread's own run-queue wait
// (/proc/thread-self/schedstat: time on a CPU, time waiting for one) since its previous sample; a
// wait above kWaitShare of the time it wanted to run (at least kWaitMinNs of it) decides serial
// until the next sample. It is not the main signal: once serial, a process with one busy neighbour
// on 2 cores no longer waits, so it alone would flip back and forth.
// Not the 1-minute load average: it counts this process's own threads (it cannot tell them apart)
// and takes about 30 s to cross a threshold once the load starts (EMA over 1 min, updated every 5 s).
//
// Sampled at most every kSampleNs, by one thread at a time (try_lock; ~10 small /proc reads); every
// call in between reads the cached values (a steady-clock read and a few relaxed atomic loads).
// RNNKIT_FUSED_UNDER_LOAD: auto (the default), serial or 1 (every call on one thread), parallel or 0
// (never: threading by work alone, the behaviour before); read once, at the first op call. Tests and
// the benchmark switch it, or fake the other processes' threads and the cores, with the
// rnnkit_fused::load_policy op (register.cpp).
namespace under_load {

enum Mode : int { kUnread = -1, kAuto = 0, kSerial = 1, kParallel = 2 };
constexpr int64_t kSampleNs = 500000000;  // 0.5 s
constexpr int kWindow = 3;  // samples whose least is the others' count
constexpr double kEnter = 0.5, kLeave = 0.25;
constexpr double kWaitShare = 0.3;
constexpr int64_t kWaitMinNs = 20000000;  // 20 ms of wanting to run in the interval

struct State {
  std::atomic<int> mode{kUnread};
  std::atomic<int64_t> next_ns{0};   // the next sample is due at this steady-clock time
  std::atomic<double> others{0.0};   // runnable threads of other processes: the least of the window
  std::atomic<double> last{0.0};     // the last sample's count
  std::atomic<int> online{1};        // online cores of the machine
  std::atomic<int> limit{1 << 20};   // cores this process may use (affinity, cgroup quota)
  std::atomic<bool> serial{false};   // the last decision (for the hysteresis)
  std::atomic<bool> waited{false};   // the sampling thread waited for a core (see above)
  std::atomic<int64_t> samples{0};
  std::mutex sampling;               // one sampler at a time; guards the fields below
  int64_t last_ns = 0;               // 0: no sample yet
  double window[kWindow] = {};       // the last samples (a ring), `filled` of them valid
  int filled = 0, at = 0;
  double fake_others = -1;           // test hook (load_policy): others instead of /proc, when >= 0
  int fake_cpus = 0;                 // test hook: online cores and limit, when > 0
};
inline State& state() {
  static State s;
  return s;
}

inline int parse_mode(const char* e) {
  if (!e || !*e || !std::strcmp(e, "auto")) return kAuto;
  if (!std::strcmp(e, "serial") || !std::strcmp(e, "1")) return kSerial;
  if (!std::strcmp(e, "parallel") || !std::strcmp(e, "0")) return kParallel;
  return kUnread;
}

inline int mode() {
  State& s = state();
  int m = s.mode.load(std::memory_order_relaxed);
  if (m != kUnread) return m;
  const char* e = std::getenv("RNNKIT_FUSED_UNDER_LOAD");
  m = parse_mode(e);
  TORCH_CHECK_VALUE(m != kUnread, "RNNKIT_FUSED_UNDER_LOAD='", e,
                    "': expected 'auto' (the default: one thread per op call while the machine is "
                    "oversubscribed), 'serial' or '1' (always one thread) or 'parallel' or '0' (never)");
  s.mode.store(m, std::memory_order_relaxed);
  return m;
}

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// a small file into buf (NUL-terminated); the bytes read, or -1
inline ssize_t read_small(const char* path, char* buf, size_t n) {
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  const ssize_t r = ::read(fd, buf, n - 1);
  ::close(fd);
  buf[r > 0 ? r : 0] = 0;
  return r;
}

// the machine's runnable threads now (/proc/loadavg: "1.00 0.90 0.80 3/131 4656"), -1 if unknown
inline double machine_running() {
  char buf[256];
  if (read_small("/proc/loadavg", buf, sizeof buf) <= 0) return -1;
  double a, b, c;
  long run, total;
  if (std::sscanf(buf, "%lf %lf %lf %ld/%ld", &a, &b, &c, &run, &total) != 5) return -1;
  return double(run);
}

// this process's runnable threads now (the sampling thread included)
inline int own_running() {
  DIR* d = ::opendir("/proc/self/task");
  if (!d) return 1;
  int n = 0;
  char path[64], buf[256];
  while (const dirent* e = ::readdir(d)) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    std::snprintf(path, sizeof path, "/proc/self/task/%s/stat", e->d_name);
    if (read_small(path, buf, sizeof buf) <= 0) continue;
    const char* p = std::strrchr(buf, ')');  // "tid (comm) S ...": comm may hold spaces and parentheses
    if (p && p[1] == ' ' && p[2] == 'R') ++n;
  }
  ::closedir(d);
  return std::max(n, 1);
}

// The calling thread's run-queue wait share since its previous call (-1: no previous call, too little
// running, or no schedstat): /proc/thread-self/schedstat is "ns on a CPU, ns waiting on a run queue, slices".
inline double own_wait_share() {
  thread_local int64_t last_run = -1, last_wait = -1;
  char buf[128];
  long long run = 0, wait = 0;
  if (read_small("/proc/thread-self/schedstat", buf, sizeof buf) <= 0 ||
      std::sscanf(buf, "%lld %lld", &run, &wait) != 2)
    return -1;
  const int64_t d_run = run - last_run, d_wait = wait - last_wait;
  const bool first = last_run < 0;
  last_run = run, last_wait = wait;
  if (first || d_run < 0 || d_wait < 0 || d_run + d_wait < kWaitMinNs) return -1;
  return double(d_wait) / double(d_run + d_wait);
}

// the cores this process may use: its affinity mask, and a cgroup v2 quota ("max" or "quota period")
inline int usable_cpus(int online) {
  int n = online;
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) n = std::min(n, std::max(CPU_COUNT(&set), 1));
  char buf[64];
  long q = 0, p = 0;
  if (read_small("/sys/fs/cgroup/cpu.max", buf, sizeof buf) > 0 && std::sscanf(buf, "%ld %ld", &q, &p) == 2 &&
      q > 0 && p > 0)
    n = std::min<int>(n, std::max<int>(1, int((q + p / 2) / p)));
  return n;
}

// The decision for one call on `team` threads: `others` runnable threads of other processes,
// `online` cores, `limit` cores this process may use; `was` the previous decision (hysteresis).
inline bool decide(double others, int team, int online, int limit, bool was, bool waited = false) {
  if (team < 2) return false;
  if (team > limit || waited) return true;
  return others + team - online > (was ? kLeave : kEnter);
}

inline void sample(State& s, int64_t now) {
  std::unique_lock<std::mutex> lock(s.sampling, std::try_to_lock);
  if (!lock.owns_lock() || now < s.next_ns.load(std::memory_order_acquire)) return;  // another thread samples
  int online = s.fake_cpus > 0 ? s.fake_cpus : int(sysconf(_SC_NPROCESSORS_ONLN));
  online = std::max(online, 1);
  const int limit = s.fake_cpus > 0 ? s.fake_cpus : usable_cpus(online);
  double others = s.fake_others;
  bool waited = false;
  if (others < 0) {
    const double running = machine_running();
    others = running < 0 ? 0.0 : std::max(0.0, running - own_running());  // no /proc: never oversubscribed
    waited = own_wait_share() > kWaitShare;
  }
  s.waited.store(waited, std::memory_order_relaxed);
  if (!s.last_ns) s.filled = s.at = 0;  // forgotten (load_policy): a fresh window
  s.window[s.at] = others;
  s.at = (s.at + 1) % kWindow;
  s.filled = std::min(s.filled + 1, kWindow);
  double least = others;
  for (int i = 0; i < s.filled; ++i) least = std::min(least, s.window[i]);
  s.last.store(others, std::memory_order_relaxed);
  s.others.store(least, std::memory_order_relaxed);
  s.online.store(online, std::memory_order_relaxed);
  s.limit.store(limit, std::memory_order_relaxed);
  s.samples.fetch_add(1, std::memory_order_relaxed);
  s.last_ns = now;
  s.next_ns.store(now + kSampleNs, std::memory_order_release);
}

// Whether this op call should run on one thread (see above). Called once per op call.
inline bool oversubscribed() {
  const int m = mode();
  if (m != kAuto) return m == kSerial;
  const int team = at::get_num_threads();
  if (team < 2) return false;
  State& s = state();
  const int64_t now = now_ns();
  if (now >= s.next_ns.load(std::memory_order_acquire)) sample(s, now);
  const bool serial = decide(s.others.load(std::memory_order_relaxed), team, s.online.load(std::memory_order_relaxed),
                             s.limit.load(std::memory_order_relaxed), s.serial.load(std::memory_order_relaxed),
                             s.waited.load(std::memory_order_relaxed));
  s.serial.store(serial, std::memory_order_relaxed);
  return serial;
}

}  // namespace under_load

// Every tensor op's entry point as registered (register.cpp): decides once, then runs the whole
// call on the calling thread while the machine is oversubscribed.
template <auto F>
struct PerCall;
template <typename R, typename... A, R (*F)(A...)>
struct PerCall<F> {
  static R call(A... a) {
    const OneThread one(under_load::oversubscribed());
    return F(a...);
  }
};

// A GEMM of rows x cols x k multiply-adds in the time loop (or a cell step) runs on one thread below
// kSerialStepMacs.
inline bool serial_gemm(int64_t rows, int64_t cols, int64_t k) { return rows * cols * k < kSerialStepMacs; }
// A GEMM run once per op call (a weight gradient over all steps) runs on one thread below kSerialOnceMacs.
inline bool serial_once(int64_t macs) { return macs < kSerialOnceMacs; }
// An ATen element-wise pass over `elems` elements runs on one thread below kSerialElems.
inline bool serial_elems(int64_t elems) { return elems < kSerialElems; }

template <typename T>
Tensor view_of(const T* p, int64_t rows, int64_t cols, int64_t ld) {
  return rk::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// Few rows (a batch of 1 to 3): a register-blocked kernel beats BLAS, whose
// call and packing overhead dominates a matrix-vector product of this size.
constexpr int64_t kSmallRows = 4;

// C (rows x cols) = beta * C + A (rows x k) * B, B is (k x cols) row-major; beta 0 or 1.
template <typename T>
void small_gemm_ab(int64_t rows, int64_t cols, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb, T beta,
                   T* C, int64_t ldc) {
  using V = Vec<T>;
  constexpr int64_t VS = V::size();
  for (int64_t r = 0; r < rows; ++r) {
    const T* a = A + r * lda;
    T* c = C + r * ldc;
    int64_t j = 0;
    for (; j + 4 * VS <= cols; j += 4 * VS) {
      V c0(T(0)), c1(T(0)), c2(T(0)), c3(T(0));
      if (beta != T(0)) {
        c0 = V::loadu(c + j), c1 = V::loadu(c + j + VS), c2 = V::loadu(c + j + 2 * VS), c3 = V::loadu(c + j + 3 * VS);
      }
      const T* b = B + j;
      for (int64_t kk = 0; kk < k; ++kk, b += ldb) {
        const V av(a[kk]);
        c0 = at::vec::fmadd(av, V::loadu(b), c0);
        c1 = at::vec::fmadd(av, V::loadu(b + VS), c1);
        c2 = at::vec::fmadd(av, V::loadu(b + 2 * VS), c2);
        c3 = at::vec::fmadd(av, V::loadu(b + 3 * VS), c3);
      }
      c0.store(c + j), c1.store(c + j + VS), c2.store(c + j + 2 * VS), c3.store(c + j + 3 * VS);
    }
    for (; j < cols; j += VS) {
      const int64_t cnt = std::min(VS, cols - j);
      V c0 = beta != T(0) ? V::loadu(c + j, cnt) : V(T(0));
      const T* b = B + j;
      for (int64_t kk = 0; kk < k; ++kk, b += ldb) c0 = at::vec::fmadd(V(a[kk]), V::loadu(b, cnt), c0);
      c0.store(c + j, cnt);
    }
  }
}

// C (rows x cols) = beta * C + A (rows x k) * B^T, B is (cols x k); all row-major.
template <typename T>
void gemm_abt(int64_t rows, int64_t cols, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C,
              int64_t ldc) {
  if (rows == 0 || cols == 0) return;
  if (k == 0) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) C[r * ldc + j] = beta == T(0) ? T(0) : beta * C[r * ldc + j];
    return;
  }
  const OneThread one(serial_gemm(rows, cols, k));
  if (have_blas(C)) {
    // row-major C = A B^T  <=>  column-major C^T = B A^T
    blas('T', 'N', (int)cols, (int)rows, (int)k, T(1), B, (int)ldb, A, (int)lda, beta, C, (int)ldc);
  } else {
    Tensor c = view_of(C, rows, cols, ldc);
    if (beta == T(0)) rk::mm_out(c, view_of(A, rows, k, lda), view_of(B, cols, k, ldb).t());
    else c.addmm_(view_of(A, rows, k, lda), view_of(B, cols, k, ldb).t(), beta, 1);
  }
}

// C (rows x cols) = beta * C + A (rows x k) * B, B is (k x cols); all row-major.
template <typename T>
void gemm_ab(int64_t rows, int64_t cols, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C,
             int64_t ldc) {
  if (rows == 0 || cols == 0) return;
  if (rows < kSmallRows && k > 0 && (beta == T(0) || beta == T(1))) {
    small_gemm_ab(rows, cols, k, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  if (k == 0) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) C[r * ldc + j] = beta == T(0) ? T(0) : beta * C[r * ldc + j];
    return;
  }
  const OneThread one(serial_gemm(rows, cols, k));
  if (have_blas(C)) {
    blas('N', 'N', (int)cols, (int)rows, (int)k, T(1), B, (int)ldb, A, (int)lda, beta, C, (int)ldc);
  } else {
    Tensor c = view_of(C, rows, cols, ldc);
    if (beta == T(0)) rk::mm_out(c, view_of(A, rows, k, lda), view_of(B, k, cols, ldb));
    else c.addmm_(view_of(A, rows, k, lda), view_of(B, k, cols, ldb), beta, 1);
  }
}

// ---------------------------------------------------------------- the panel GEMM
//
// The recurrent product of one step is skinny: a batch of rows (1 to ~128) times a weight of
// cols x k (4H x H for an LSTM). The weight is laid out once per op call into column panels of
// kPanelVecs vectors (24 float32 / 12 float64 columns under AVX2; 48 / 24 where at::vec is
// AVX-512), k-contiguous within a panel and zero-padded to the panel width, so each step reads
// the weight once, linearly. A micro-kernel keeps an up to kPanelRows x panel block of C in
// registers (4 x 3 vectors: 12 accumulators, 3 weight loads and 4 broadcasts of A per k) and
// walks k; the rows of a step go through the panel in blocks of kPanelRows while the panel
// stays in L1/L2. Every output element is one sum over k in the same order whatever the block,
// the thread or the thread count (a thread takes whole panels), so results are bit-identical
// for 1 and 2 threads. See docs/fused.md, "The recurrent product".
constexpr int64_t kPanelVecs = 3;
constexpr int64_t kPanelRows = 4;
template <typename T>
constexpr int64_t panel_width() {
  return kPanelVecs * Vec<T>::size();
}
template <typename T>
inline int64_t panel_count(int64_t cols) {
  return (cols + panel_width<T>() - 1) / panel_width<T>();
}

// Panels [p0, p1) of op(B) (k x cols) into dst (panel p at dst + p * k * NR, element (kk, jj) at
// kk * NR + jj). trans: B is (cols x k) row-major (op(B) = B^T), else B is (k x cols) row-major.
template <typename T>
void panel_pack(bool trans, int64_t cols, int64_t k, const T* B, T* dst, int64_t p0, int64_t p1) {
  constexpr int64_t NR = panel_width<T>();
  for (int64_t p = p0; p < p1; ++p) {
    T* d = dst + p * k * NR;
    const int64_t j0 = p * NR, w = std::min(NR, cols - j0);
    if (trans) {
      if (w < NR)
        for (int64_t kk = 0; kk < k; ++kk) std::fill(d + kk * NR + w, d + kk * NR + NR, T(0));
      for (int64_t jj = 0; jj < w; ++jj) {
        const T* b = B + (j0 + jj) * k;
        for (int64_t kk = 0; kk < k; ++kk) d[kk * NR + jj] = b[kk];
      }
    } else {
      for (int64_t kk = 0; kk < k; ++kk) {
        std::copy(B + kk * cols + j0, B + kk * cols + j0 + w, d + kk * NR);
        std::fill(d + kk * NR + w, d + kk * NR + NR, T(0));
      }
    }
  }
}

// one row of a tile, w <= NR columns, into c (added to c's when add)
template <typename T>
inline void panel_store_row(Vec<T> x0, Vec<T> x1, Vec<T> x2, T* c, int64_t w, bool add) {
  using V = Vec<T>;
  constexpr int64_t VS = V::size();
  if (w == 3 * VS) {
    if (add) {
      x0 = x0 + V::loadu(c);
      x1 = x1 + V::loadu(c + VS);
      x2 = x2 + V::loadu(c + 2 * VS);
    }
    x0.store(c), x1.store(c + VS), x2.store(c + 2 * VS);
    return;
  }
  // the last panel's w < NR columns
  const V x[3] = {x0, x1, x2};
  for (int64_t v = 0; v < 3 && v * VS < w; ++v) {
    const int64_t cnt = std::min<int64_t>(VS, w - v * VS);
    V y = x[v];
    if (add) y = y + V::loadu(c + v * VS, cnt);
    y.store(c + v * VS, cnt);
  }
}

// C (MR x w) = [C +] A (MR x k) P (k x NR), w <= NR columns of the panel P stored. The accumulators are
// named variables, not arrays: GCC kept arrays of Vectorized in memory, storing all 12 every k.
template <typename T, int MR>
inline void panel_tile(int64_t k, const T* A, int64_t lda, const T* P, bool add, T* C, int64_t ldc, int64_t w) {
  using V = Vec<T>;
  constexpr int64_t VS = V::size();
  static_assert(kPanelVecs == 3 && kPanelRows == 4 && MR >= 1 && MR <= 4, "panel_tile: 1 to 4 rows x 3 vectors");
  V c00(T(0)), c01(T(0)), c02(T(0)), c10(T(0)), c11(T(0)), c12(T(0));
  V c20(T(0)), c21(T(0)), c22(T(0)), c30(T(0)), c31(T(0)), c32(T(0));
  const T* a0 = A;
  const T* a1 = A + (MR > 1 ? lda : 0);
  const T* a2 = A + (MR > 2 ? 2 * lda : 0);
  const T* a3 = A + (MR > 3 ? 3 * lda : 0);
  for (int64_t kk = 0; kk < k; ++kk, P += 3 * VS) {
    const V b0 = V::loadu(P), b1 = V::loadu(P + VS), b2 = V::loadu(P + 2 * VS);
    const V x0(a0[kk]);
    c00 = at::vec::fmadd(x0, b0, c00), c01 = at::vec::fmadd(x0, b1, c01), c02 = at::vec::fmadd(x0, b2, c02);
    if constexpr (MR > 1) {
      const V x1(a1[kk]);
      c10 = at::vec::fmadd(x1, b0, c10), c11 = at::vec::fmadd(x1, b1, c11), c12 = at::vec::fmadd(x1, b2, c12);
    }
    if constexpr (MR > 2) {
      const V x2(a2[kk]);
      c20 = at::vec::fmadd(x2, b0, c20), c21 = at::vec::fmadd(x2, b1, c21), c22 = at::vec::fmadd(x2, b2, c22);
    }
    if constexpr (MR > 3) {
      const V x3(a3[kk]);
      c30 = at::vec::fmadd(x3, b0, c30), c31 = at::vec::fmadd(x3, b1, c31), c32 = at::vec::fmadd(x3, b2, c32);
    }
  }
  panel_store_row(c00, c01, c02, C, w, add);
  if constexpr (MR > 1) panel_store_row(c10, c11, c12, C + ldc, w, add);
  if constexpr (MR > 2) panel_store_row(c20, c21, c22, C + 2 * ldc, w, add);
  if constexpr (MR > 3) panel_store_row(c30, c31, c32, C + 3 * ldc, w, add);
}

// One row through two whole panels P and P + k * NR at once (6 accumulators: one row's 3 FMA chains would
// wait on the FMA latency), into C (2 * NR columns).
template <typename T>
inline void panel_tile_1x2(int64_t k, const T* a, const T* P, bool add, T* C) {
  using V = Vec<T>;
  constexpr int64_t VS = V::size(), NR = 3 * VS;
  const T* Q = P + k * NR;
  V c0(T(0)), c1(T(0)), c2(T(0)), c3(T(0)), c4(T(0)), c5(T(0));
  for (int64_t kk = 0; kk < k; ++kk, P += NR, Q += NR) {
    const V x(a[kk]);
    c0 = at::vec::fmadd(x, V::loadu(P), c0), c1 = at::vec::fmadd(x, V::loadu(P + VS), c1);
    c2 = at::vec::fmadd(x, V::loadu(P + 2 * VS), c2), c3 = at::vec::fmadd(x, V::loadu(Q), c3);
    c4 = at::vec::fmadd(x, V::loadu(Q + VS), c4), c5 = at::vec::fmadd(x, V::loadu(Q + 2 * VS), c5);
  }
  panel_store_row(c0, c1, c2, C, NR, add);
  panel_store_row(c3, c4, c5, C + NR, NR, add);
}

// C (rows x cols) [+]= A (rows x k) op(B) for the panels [p0, p1) of the packed op(B); k > 0.
template <typename T>
void panel_gemm(int64_t rows, int64_t cols, int64_t k, const T* A, int64_t lda, const T* packed, bool add, T* C,
                int64_t ldc, int64_t p0, int64_t p1) {
  constexpr int64_t NR = panel_width<T>();
  if (rows == 1)  // a batch of one: whole panels in pairs, the last (maybe partial) one alone below
    for (; p0 + 1 < p1 && (p0 + 2) * NR <= cols; p0 += 2)
      panel_tile_1x2(k, A, packed + p0 * k * NR, add, C + p0 * NR);
  for (int64_t p = p0; p < p1; ++p) {
    const T* P = packed + p * k * NR;
    const int64_t j0 = p * NR, w = std::min(NR, cols - j0);
    int64_t r = 0;
    for (; r + kPanelRows <= rows; r += kPanelRows)
      panel_tile<T, kPanelRows>(k, A + r * lda, lda, P, add, C + r * ldc + j0, ldc, w);
    switch (rows - r) {
      case 3: panel_tile<T, 3>(k, A + r * lda, lda, P, add, C + r * ldc + j0, ldc, w); break;
      case 2: panel_tile<T, 2>(k, A + r * lda, lda, P, add, C + r * ldc + j0, ldc, w); break;
      case 1: panel_tile<T, 1>(k, A + r * lda, lda, P, add, C + r * ldc + j0, ldc, w); break;
      default: break;
    }
  }
}

// fn(p0, p1) over the panels [0, panels), split into contiguous ranges over up to `threads` threads of torch's own
// OpenMP pool (raw GOMP_parallel: this extension is built without -fopenmp; lstm.cpp's lstm_rows splits rows with it); serial for
// one thread, inside another parallel region, or without libgomp's symbols.
template <typename F>
void over_panels(int64_t panels, int64_t threads, const F& fn) {
  const int64_t nt = threads < 2 || panels < 2 || !GOMP_parallel || !omp_get_thread_num || !omp_get_num_threads ||
                             at::in_parallel_region()
                         ? 1
                         : std::min(threads, panels);
  if (nt < 2) {
    fn(int64_t(0), panels);
    return;
  }
  struct Ctx {
    const F* fn;
    int64_t panels;
  } ctx{&fn, panels};
  GOMP_parallel(
      [](void* p) {
        const Ctx* c = static_cast<const Ctx*>(p);
        const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
        const int64_t b = c->panels * tid / nt, e = c->panels * (tid + 1) / nt;
        if (b < e) (*c->fn)(b, e);
      },
      &ctx, (unsigned)nt, 0);
}

// ---------------------------------------------------------------- helpers

// Gate activations. float64 uses Sleef's 1-ulp exp/tanh (parity to 1e-10);
// float32 uses at::vec's exp_u20 (about 20 ulp, a few times faster), which
// keeps float32 within 1e-6 of torch.nn: the tests' tolerance is 1e-5.
//
// NaN and Inf propagate as in torch.nn: at::vec's AVX2 exp_u20 clamps its
// argument with _mm256_min_ps(x, hi) / _mm256_max_ps(x, lo), which return the
// bound when x is NaN (they return their second operand on NaN), so exp_u20(NaN)
// was +inf, sigmoid(NaN) 0 and tanh(NaN) -1. exp_u20_nan is the same function
// with the clamp's operands swapped, so a NaN passes through: checked over all
// 2^32 float inputs, bit-identical to exp_u20 for every non-NaN input (Inf
// included: exp(+inf) = inf, exp(-inf) = 0), NaN for every NaN input. No extra
// instruction. Other builds (no AVX2, or AVX-512) keep at::vec's exp_u20 and put
// the NaN back with a blend.
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
inline Vec<float> exp_u20_nan(const Vec<float>& x) {
  // at::vec::Vectorized<float>::exp_u20 (vec256_float.h), min/max operands swapped
  const __m256 c1 = _mm256_set1_ps(0.999999701f), c2 = _mm256_set1_ps(0.499991506f);
  const __m256 c3 = _mm256_set1_ps(0.166676521f), c4 = _mm256_set1_ps(0.0418978221f);
  const __m256 c5 = _mm256_set1_ps(0.00828929059f);
  const __m256 log2e = _mm256_castsi256_ps(_mm256_set1_epi32(0x3fb8aa3b));
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.f), zero = _mm256_set1_ps(0.f);
  const __m256 two = _mm256_set1_ps(2.f);
  const __m256 ln2 = _mm256_castsi256_ps(_mm256_set1_epi32(0x3f317218));
  const __m256 lo = _mm256_castsi256_ps(_mm256_set1_epi32(0xc2aeac50));  // ln(FLT_MIN)
  const __m256 hi = _mm256_castsi256_ps(_mm256_set1_epi32(0x42b17218));  // ln(FLT_MAX)
  const __m256i bias = _mm256_set1_epi32(0x7f);
  const __m256 v = x;
  const __m256 tiny = _mm256_cmp_ps(v, lo, _CMP_LT_OS);
  __m256 src = _mm256_min_ps(hi, v);  // NaN (the second operand) wins
  src = _mm256_max_ps(lo, src);
  const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(src, log2e, half));
  const __m256 r = _mm256_fnmadd_ps(fx, ln2, src);
  __m256 p = _mm256_fmadd_ps(r, c5, c4);
  p = _mm256_fmadd_ps(r, p, c3);
  p = _mm256_fmadd_ps(r, p, c2);
  p = _mm256_fmadd_ps(r, p, c1);
  p = _mm256_fmadd_ps(r, p, one);
  const __m256i n = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_sub_ps(fx, one)), bias);
  __m256 pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(n, 23));
  pow2 = _mm256_blendv_ps(pow2, zero, tiny);
  return _mm256_mul_ps(_mm256_mul_ps(p, pow2), two);
}
#else
inline Vec<float> exp_u20_nan(const Vec<float>& x) { return Vec<float>::blendv(x.exp_u20(), x, x.isnan()); }
#endif

template <typename T>
inline Vec<T> vsigmoid(const Vec<T>& x) {
  const Vec<T> one(T(1));
  return one / (one + x.neg().exp());
}
template <>
inline Vec<float> vsigmoid(const Vec<float>& x) {
  const Vec<float> one(1.f);
  return one / (one + exp_u20_nan(x.neg()));
}
template <typename T>
inline Vec<T> vtanh(const Vec<T>& x) { return x.tanh(); }
template <>
inline Vec<float> vtanh(const Vec<float>& x) {
  // tanh(x) = 2 / (1 + exp(-2x)) - 1; saturates correctly at +-inf of exp
  const Vec<float> one(1.f), two(2.f);
  return two / (one + exp_u20_nan(x * Vec<float>(-2.f))) - one;
}

// relu's gradient as autograd computes it (threshold_backward: 0 where h <= 0, else d),
// so a NaN h passes d on instead of zeroing it
template <typename T>
inline Vec<T> relu_grad(const Vec<T>& d, const Vec<T>& h) {
  const Vec<T> zero(T(0));
  return Vec<T>::blendv(d, zero, h <= zero);
}

// Rows per parallel chunk: parallelise only when a chunk holds enough work
// (about 16k elements) to pay for waking the thread pool.
inline int64_t row_grain(int64_t per_row) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(per_row, 1)); }

template <typename T>
inline void copy_row(T* dst, const T* src, int64_t n) { std::memcpy(dst, src, sizeof(T) * n); }

template <typename T>
inline void zero_row(T* dst, int64_t n) { std::memset(dst, 0, sizeof(T) * n); }

template <typename T>
void add_into(T* dst, const T* src, int64_t n) {
  constexpr int64_t VS = Vec<T>::size();
  int64_t j = 0;
  for (; j + VS <= n; j += VS) (Vec<T>::loadu(dst + j) + Vec<T>::loadu(src + j)).store(dst + j);
  for (; j < n; ++j) dst[j] += src[j];
}

inline int64_t min_length(const int64_t* len, int64_t N, int64_t L) {
  if (!len) return L;
  int64_t m = L;
  for (int64_t n = 0; n < N; ++n) m = std::min(m, len[n]);
  return std::max<int64_t>(m, 0);
}

inline const int64_t* lengths_ptr(const std::optional<Tensor>& lengths, int64_t N, Tensor& keep) {
  if (!lengths.has_value() || !lengths->defined()) return nullptr;
  TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == N, "rnnkit_fused: lengths must be (N,) = (", N,
              ",), got ", lengths->sizes());
  keep = lengths->to(at::kCPU, at::kLong).contiguous();
  return keep.data_ptr<int64_t>();
}

// An inference call projects its input in one product while the projection (L N G elements) fits
// kProjectWholeElems (32 MB in float32: the L3 here, and glibc's largest mmap threshold, above which
// every allocation is a fresh mapping whose pages are faulted in on every call), else in chunks of
// steps into one reused buffer of about kProjectChunkElems elements (1 MB, an L2) and at least 256
// rows, each chunk consumed by its steps before the next: a whole-sequence projection of a long call
// (65 MB at LSTM N=32 H=256 L=500) is written to and read back from memory. Fewer rows than 256 lose
// more than they gain (a product of few rows; LSTM N=1 H=1024 L=500, 2 layers, bidirectional: 837 ms
// in chunks of 64 rows against 665 ms for the whole sequence at once). Swept over 2^16..2^23
// elements (docs/fused.md, "Inference without saved gates"): 2^18 was the fastest or within noise of
// it at N=32 H=256 L=500 and N=128 H=256 L=200, where the whole sequence at once took 1.08-1.11x
// torch.nn's time against 0.61-0.89x; below 32 MB chunks measured no better than noise.
constexpr int64_t kProjectWholeElems = int64_t(1) << 23;
constexpr int64_t kProjectChunkElems = int64_t(1) << 18;
inline int64_t project_chunk(int64_t L, int64_t N, int64_t G) {
  if (L * N * G <= kProjectWholeElems) return std::max<int64_t>(L, 1);
  const int64_t steps = std::max(kProjectChunkElems / std::max<int64_t>(N * G, 1), (256 + N - 1) / std::max<int64_t>(N, 1));
  return std::clamp<int64_t>(steps, 1, std::max<int64_t>(L, 1));
}

// dst (rows, G) = b (G; null: zeros) + x (rows, I, leading dimension ldx) W^T, W (G, I) as torch stores it
template <typename T>
void project_rows(int64_t rows, int64_t G, int64_t I, const T* x, int64_t ldx, const T* w, const T* b, T* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    if (b) copy_row(dst + r * G, b, G);
    else zero_row(dst + r * G, G);
  }
  gemm_abt<T>(rows, G, I, x, ldx, w, I, T(1), dst, G);
}

inline void check_seq(const Tensor& xp, const char* op, int64_t G) {
  TORCH_CHECK(xp.dim() == 3, "rnnkit_fused::", op, ": xp must be (L, N, G), got ", xp.sizes());
  TORCH_CHECK(xp.size(2) == G, "rnnkit_fused::", op, ": xp's last axis must be G = ", G, ", got ", xp.size(2));
  TORCH_CHECK(xp.scalar_type() == at::kFloat || xp.scalar_type() == at::kDouble, "rnnkit_fused::", op,
              ": float32 or float64 only, got ", xp.scalar_type());
}

// a tensor an op reads its sizes from: `dim`-D (checked before any size is read)
inline void check_dim(const Tensor& t, int64_t dim, const char* op, const char* what) {
  TORCH_CHECK(t.dim() == dim, "rnnkit_fused::", op, ": ", what, " must be ", dim, "-D, got ", t.sizes());
}

inline void check_same(const Tensor& ref, const Tensor& t, const char* what, at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "rnnkit_fused: ", what, " has dtype ", t.scalar_type(),
              ", expected ", ref.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "rnnkit_fused: ", what, " has shape ", t.sizes(), ", expected ", shape);
}

// The unprojected input of an inference op (lstm_infer, gru_infer): x (L, N, I), its W_ih (G, I) and bias
// (G; undefined: none), checked and contiguous.
struct InferInput {
  Tensor x, w_ih, b;
  int64_t L, N, I;
};
inline InferInput infer_input(const Tensor& x, const Tensor& w_ih, const std::optional<Tensor>& b, int64_t G,
                              const char* op, const char* b_name) {
  TORCH_CHECK(x.dim() == 3, "rnnkit_fused::", op, ": x must be (L, N, I), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "rnnkit_fused::", op,
              ": float32 or float64 only, got ", x.scalar_type());
  InferInput in{x.contiguous(), w_ih.contiguous(), (b.has_value() && b->defined()) ? b->contiguous() : Tensor(),
                x.size(0), x.size(1), x.size(2)};
  check_same(in.x, in.w_ih, "w_ih", {G, in.I});
  if (in.b.defined()) check_same(in.x, in.b, b_name, {G});
  return in;
}

// An inference op's time loop: step(t, xt) for t = 0 .. L - 1, xt the projected input b + x_t W_ih^T of
// step t (N, G), projected chunk by chunk (project_chunk) into xb, (C N, G) for C = project_chunk(L, N, G).
template <typename T, typename F>
void over_projected_steps(const InferInput& in, int64_t G, T* xb, const F& step) {
  const int64_t L = in.L, N = in.N, I = in.I, C = project_chunk(L, N, G);
  const T *x = in.x.data_ptr<T>(), *w = in.w_ih.data_ptr<T>(), *b = in.b.defined() ? in.b.data_ptr<T>() : nullptr;
  for (int64_t t0 = 0; t0 < L; t0 += C) {
    const int64_t t1 = std::min(L, t0 + C);
    project_rows<T>((t1 - t0) * N, G, I, x + t0 * N * I, I, w, b, xb);
    for (int64_t t = t0; t < t1; ++t) step(t, (const T*)(xb + (t - t0) * N * G));
  }
}

// Which kernel the recurrent product uses: by the rule below (0), the BLAS path (1: the few-rows kernel
// below kSmallRows rows, else MKL's packed GEMM, or plain BLAS), or the panel GEMM (2). A process-wide
// switch for the benchmarks and tests (rnnkit_fused::recurrent_kernel); read once per Recurrent.
enum RecurrentKernel : int { kByRule = 0, kBlas = 1, kPanel = 2 };
inline std::atomic<int>& recurrent_kernel_mode() {
  static std::atomic<int> mode{kByRule};
  return mode;
}

// The rule: the panel GEMM for a product of rows x cols x k (trans: forward, op(B) = B^T), else the BLAS path.
// Measured on the 2-core AMD EPYC of docs/fused.md (Zen 3 KVM guest, AVX2, 1 MiB L2, torch 2.13 with MKL,
// which on this CPU is memory- or latency-bound on these shapes), 2026-12-02, load average 4 to 7 (other
// helpers' builds and tests: the minimum of 5 to 7 interleaved repeats), float32, one product in a step loop
// (the layout amortized over up to 100 steps), `python benchmarks/recurrent_gemm.py --stat min`; MKL time /
// panel time, LSTM (4H x H) and GRU (3H x H), forward and backward:
//  * 1 thread, rows 4 to 64, H 64 to 1024: 1.09 to 5.9 (rows 8, H 512: 2.02 forward, 1.60 backward);
//    rows 128 to 512, H 64 to 512: 0.88 to 1.83 (one below 1: 0.88 at rows 128, H 256 forward);
//  * 2 threads, rows 4 to 128: 1.04 to 15 (rows 8, H 512: 2.99 / 2.69);
//  * rows 1 to 3 against the few-rows kernel (small_gemm_ab): 1.1 to 5.3 but a single row backward
//    (B as it is, no transposed copy) below 2^17 weights: H 64 0.77 to 0.98, H 128 0.79 to 0.88; H 256 1.11 to 4.35.
// So the panel GEMM everywhere but there, and up to kPanelMaxRows rows (the most measured; above it MKL's
// blocking for large products). On Intel CPUs, where MKL takes its tuned paths, re-measure before relying
// on this rule (the panel GEMM's results are correct everywhere; the tests cover it on every machine).
constexpr int64_t kPanelOneRowBwdElems = int64_t(1) << 17;
constexpr int64_t kPanelMaxRows = 512;
template <typename T>
inline bool use_panel(int64_t rows, int64_t cols, int64_t k, bool trans) {
  if (rows > kPanelMaxRows) return false;
  if (rows == 1 && !trans && cols * k < kPanelOneRowBwdElems) return false;
  return true;
}

// Whether a Recurrent built now with `kernel` (a RecurrentKernel, or -1: the process-wide setting) takes the
// panel GEMM.
template <typename T>
inline bool panel_chosen(int64_t rows, int64_t cols, int64_t k, bool trans, int kernel = -1) {
  const int mode = kernel >= 0 ? kernel : recurrent_kernel_mode().load(std::memory_order_relaxed);
  return mode == kPanel || (mode == kByRule && use_panel<T>(rows, cols, k, trans));
}

// The recurrent product of one step, C (rows x cols) = beta C + A (rows x k) op(B), beta 0 or 1,
// with B (a weight) laid out once before the time loop: in panels for the panel GEMM, transposed
// for the few-rows kernel, packed for MKL, or left as is for plain BLAS.
template <typename T>
struct Recurrent {
  int64_t rows, cols, k;
  bool trans;  // op(B) = B^T, B is (cols x k); else op(B) = B, B is (k x cols)
  const T* B;
  Tensor keep;      // the laid-out copy
  const T* panels = nullptr;  // op(B) in panels for the panel GEMM
  const T* small = nullptr;   // (k x cols) for the few-rows kernel
  const T* packed = nullptr;  // MKL packed B
  bool serial;                // one step's product is too small for more than one thread

  // kernel: a RecurrentKernel, or -1 for the process-wide setting (recurrent_kernel_mode)
  Recurrent(int64_t rows_, int64_t cols_, int64_t k_, bool trans_, const Tensor& w, int kernel = -1)
      : rows(rows_), cols(cols_), k(k_), trans(trans_), B(w.data_ptr<T>()), serial(serial_gemm(rows_, cols_, k_)) {
    if (rows == 0 || cols == 0 || k == 0) return;
    if (panel_chosen<T>(rows, cols, k, trans, kernel)) {
      const int64_t np = panel_count<T>(cols);
      keep = rk::empty({np * k * panel_width<T>()}, w.options());
      T* dst = keep.data_ptr<T>();
      const OneThread one(serial_elems(cols * k));
      over_panels(np, at::get_num_threads(), [&](int64_t p0, int64_t p1) { panel_pack(trans, cols, k, B, dst, p0, p1); });
      panels = dst;
    } else if (rows < kSmallRows) {
      if (trans) {
        keep = w.t().contiguous();
        small = keep.data_ptr<T>();
      } else {
        small = B;
      }
    } else if (have_packed((T*)nullptr)) {
      const size_t bytes = pack_size((T*)nullptr, (int)rows, (int)cols, (int)k);
      keep = rk::empty({(int64_t)(bytes / sizeof(T) + 1)}, w.options());
      const OneThread one(serial);
      pack(trans ? kTrans : kNoTrans, (int)rows, (int)cols, (int)k, B, (int)(trans ? k : cols), keep.data_ptr<T>());
      packed = keep.data_ptr<T>();
    }
  }

  void operator()(const T* A, int64_t lda, T beta, T* C, int64_t ldc) const {
    if (rows == 0 || cols == 0) return;
    if (panels) {
      TORCH_INTERNAL_ASSERT(beta == T(0) || beta == T(1));
      over_panels(panel_count<T>(cols), serial ? 1 : at::get_num_threads(), [&](int64_t p0, int64_t p1) {
        panel_gemm(rows, cols, k, A, lda, panels, beta != T(0), C, ldc, p0, p1);
      });
    } else if (small && k > 0) small_gemm_ab(rows, cols, k, A, lda, small, cols, beta, C, ldc);
    else if (packed) {
      const OneThread one(serial);
      packed_compute((int)rows, (int)cols, (int)k, A, (int)lda, packed, beta, C, (int)ldc);
    }
    else if (trans) gemm_abt(rows, cols, k, A, lda, B, k, beta, C, ldc);
    else gemm_ab(rows, cols, k, A, lda, B, cols, beta, C, ldc);
  }
};

// s with every (t, n) where row n is held (t >= lengths[n]) zeroed, in place when `fresh` (s is a
// contiguous tensor of this op's own), else in a copy; s itself without lengths or held steps.
// The parameter sums of a backward (sum over t, n of a gate gradient times a state) must not see
// held steps at all: their gate gradients are zero, but zero times a non-finite held state (a NaN
// h0 of a zero-length row, a state that went NaN before the row ended) is NaN, and a row past its
// length must add nothing, as it adds nothing to the reference backend's (per-row) result.
inline Tensor zero_held(const Tensor& s, const int64_t* len, bool fresh) {
  if (!len || s.dim() < 2 || s.numel() == 0) return s;
  const int64_t L = s.size(0), N = s.size(1);
  bool any = false;
  for (int64_t n = 0; n < N && !any; ++n) any = len[n] < L;
  if (!any) return s;
  Tensor r = fresh && s.is_contiguous() ? s : s.clone(at::MemoryFormat::Contiguous);
  const int64_t row = r.numel() / (L * N) * r.element_size();
  char* base = static_cast<char*>(r.data_ptr());
  for (int64_t n = 0; n < N; ++n)
    for (int64_t t = std::max<int64_t>(len[n], 0); t < L; ++t) std::memset(base + (t * N + n) * row, 0, row);
  return r;
}

// h_{t-1} for every t: (L, N, H_out), the rows the recurrent weight gradient reads; zero at held
// steps (see zero_held).
inline Tensor previous_states(const Tensor& h0, const Tensor& out, const int64_t* len) {
  const int64_t L = out.size(0);
  if (L == 0) return out;
  const OneThread one(serial_elems(out.numel()));
  return zero_held(rk::cat({h0.unsqueeze(0), out.narrow(0, 0, L - 1)}, 0), len, true);
}

// A held row's state gradient passes through unchanged (dn = dh). The step's recurrent product
// dn += dG W runs over every row, and a held row's zero dG times a non-finite weight is NaN, so the
// held rows are written again after the product.
template <typename T>
inline void pass_held_rows(const int64_t* len, int64_t t, int64_t N, int64_t H, const T* dh, T* dn) {
  for (int64_t n = 0; n < N; ++n)
    if (t >= len[n]) copy_row(dn + n * H, dh + n * H, H);
}

// grad_w (G, K) = sum_t dG_t^T X_t, one GEMM over all steps
inline Tensor weight_grad(const Tensor& dG, const Tensor& X) {
  const int64_t G = dG.size(2), K = X.size(2);
  const OneThread one(serial_once(K * dG.numel()));  // (G x L*N) x (L*N x K) multiply-adds
  const int64_t rows = dG.size(0) * dG.size(1);  // not -1: a zero-size gate axis (hidden_size 0) has no -1
  return dG.reshape({rows, G}).t().mm(X.reshape({rows, K}));
}

// ================================================================ bfloat16
//
// bf16 at the op boundary (xp, the weights, the states, out, and the gradients of
// all of them), float32 inside:
//   * the recurrent product is bf16 x bf16 -> float32: MKL's cblas_gemm_bf16bf16f32
//     (AMX / avx512_bf16 where the CPU has them); with fewer than kSmallRows rows,
//     without that symbol, or with RNNKIT_FUSED_BF16_GEMM=0, a float32 product on a
//     float32 copy of the weight made once per sequence (a product of two bf16
//     values is exact in float32, so the two differ only in summation order);
//   * the gate math is the float32 row functions of gates.h, on rows converted from bf16;
//   * the LSTM cell state and the saved gate activations (the backward's inputs)
//     stay float32 from step to step; h is rounded to bf16 once per step (it is the
//     output and the next step's GEMM operand);
//   * backward: float32 gate gradients and state gradients, rounded to bf16 for the
//     recurrent GEMM and for the weight gradients (one ATen bf16 GEMM over all steps).
// The float32 / float64 kernels are untouched: each family's *_entry function (rnn.cpp, lstm.cpp,
// gru.cpp) sends bf16 to its *_bf16 kernel and everything else to the float32/float64 one.


using BF = c10::BFloat16;

inline bool bf16_gemm_enabled() {
  if (!cblas_gemm_bf16bf16f32) return false;
  const char* e = std::getenv("RNNKIT_FUSED_BF16_GEMM");
  return !(e && e[0] == '0');
}

inline void to_float(const BF* src, float* dst, int64_t n) {
  constexpr int64_t VS = Vec<BF>::size(), VF = Vec<float>::size();
  int64_t j = 0;
  for (; j + VS <= n; j += VS) {
    auto v = at::vec::convert_to_float<BF>(Vec<BF>::loadu(src + j));
    std::get<0>(v).store(dst + j);
    std::get<1>(v).store(dst + j + VF);
  }
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

inline void to_bf16(const float* src, BF* dst, int64_t n) { at::vec::convert(src, dst, n); }

inline at::TensorOptions f32_like(const Tensor& t) { return t.options().dtype(at::kFloat); }

inline void check_seq_bf16(const Tensor& xp, const char* op, int64_t G) {
  TORCH_CHECK(xp.dim() == 3, "rnnkit_fused::", op, ": xp must be (L, N, G), got ", xp.sizes());
  TORCH_CHECK(xp.size(2) == G, "rnnkit_fused::", op, ": xp's last axis must be G = ", G, ", got ", xp.size(2));
}

inline void check_f32(const Tensor& t, const char* what, at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "rnnkit_fused: ", what, " has dtype ", t.scalar_type(),
              ", expected Float (the bfloat16 kernels save it in float32)");
  TORCH_CHECK(t.sizes() == shape, "rnnkit_fused: ", what, " has shape ", t.sizes(), ", expected ", shape);
}

// Recurrent<T>'s bf16 counterpart: C (rows x cols, float32) = beta C + A (rows x k, bf16) op(B), B bf16.
struct RecurrentBF16 {
  int64_t rows, cols, k;
  bool trans;
  const BF* B;
  bool bf16 = false;  // MKL's bf16 GEMM on A and B as they are
  Tensor wf, abuf;    // otherwise: B in float32 (laid out by Recurrent<float>) and A converted per call
  std::unique_ptr<Recurrent<float>> f32;

  RecurrentBF16(int64_t rows_, int64_t cols_, int64_t k_, bool trans_, const Tensor& w)
      : rows(rows_), cols(cols_), k(k_), trans(trans_), B(w.data_ptr<BF>()) {
    if (rows == 0 || cols == 0) return;
    if (k > 0 && rows >= kSmallRows && bf16_gemm_enabled()) {
      bf16 = true;
      return;
    }
    wf = w.to(at::kFloat);
    f32 = std::make_unique<Recurrent<float>>(rows, cols, k, trans, wf);
    abuf = rk::empty({rows, std::max<int64_t>(k, 1)}, f32_like(w));
  }

  void operator()(const BF* A, int64_t lda, float beta, float* C, int64_t ldc) const {
    if (rows == 0 || cols == 0) return;
    if (bf16) {
      const OneThread one(serial_gemm(rows, cols, k));
      cblas_gemm_bf16bf16f32(kRowMajor, kNoTrans, trans ? kTrans : kNoTrans, (int)rows, (int)cols, (int)k, 1.f, A,
                             (int)lda, B, (int)(trans ? k : cols), beta, C, (int)ldc);
      return;
    }
    float* a = abuf.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r) to_float(A + r * lda, a + r * k, k);
    (*f32)(a, k, beta, C, ldc);
  }
};

}  // namespace rnnkit_fused
