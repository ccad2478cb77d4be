// rnnkit's fused CPU kernels: whole-sequence RNN (tanh/relu), LSTM (with and
// without a projection), GRU, peephole LSTM, LayerNorm LSTM and IndRNN (tanh/relu), forward and hand-written backward (BPTT),
// plus inference single-step cells. One translation unit on purpose: compile
// time is paid by every fresh install and CI run.
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

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <tuple>

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
}

namespace rnnkit_fused {
namespace {

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

// A GEMM of rows x cols x k multiply-adds in the time loop (or a cell step) runs on one thread below
// kSerialStepMacs.
inline bool serial_gemm(int64_t rows, int64_t cols, int64_t k) { return rows * cols * k < kSerialStepMacs; }
// A GEMM run once per op call (a weight gradient over all steps) runs on one thread below kSerialOnceMacs.
inline bool serial_once(int64_t macs) { return macs < kSerialOnceMacs; }
// An ATen element-wise pass over `elems` elements runs on one thread below kSerialElems.
inline bool serial_elems(int64_t elems) { return elems < kSerialElems; }

template <typename T>
Tensor view_of(const T* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
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
    if (beta == T(0)) at::mm_out(c, view_of(A, rows, k, lda), view_of(B, cols, k, ldb).t());
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
    if (beta == T(0)) at::mm_out(c, view_of(A, rows, k, lda), view_of(B, k, cols, ldb));
    else c.addmm_(view_of(A, rows, k, lda), view_of(B, k, cols, ldb), beta, 1);
  }
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

const int64_t* lengths_ptr(const std::optional<Tensor>& lengths, int64_t N, Tensor& keep) {
  if (!lengths.has_value() || !lengths->defined()) return nullptr;
  TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == N, "rnnkit_fused: lengths must be (N,) = (", N,
              ",), got ", lengths->sizes());
  keep = lengths->to(at::kCPU, at::kLong).contiguous();
  return keep.data_ptr<int64_t>();
}

void check_seq(const Tensor& xp, const char* op, int64_t G) {
  TORCH_CHECK(xp.dim() == 3, "rnnkit_fused::", op, ": xp must be (L, N, G), got ", xp.sizes());
  TORCH_CHECK(xp.size(2) == G, "rnnkit_fused::", op, ": xp's last axis must be G = ", G, ", got ", xp.size(2));
  TORCH_CHECK(xp.scalar_type() == at::kFloat || xp.scalar_type() == at::kDouble, "rnnkit_fused::", op,
              ": float32 or float64 only, got ", xp.scalar_type());
}

// a tensor an op reads its sizes from: `dim`-D (checked before any size is read)
void check_dim(const Tensor& t, int64_t dim, const char* op, const char* what) {
  TORCH_CHECK(t.dim() == dim, "rnnkit_fused::", op, ": ", what, " must be ", dim, "-D, got ", t.sizes());
}

void check_same(const Tensor& ref, const Tensor& t, const char* what, at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "rnnkit_fused: ", what, " has dtype ", t.scalar_type(),
              ", expected ", ref.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "rnnkit_fused: ", what, " has shape ", t.sizes(), ", expected ", shape);
}

// The recurrent product of one step, C (rows x cols) = beta C + A (rows x k) op(B),
// with B (a weight) laid out once before the time loop: transposed for the
// few-rows kernel, packed for MKL, or left as is for plain BLAS.
template <typename T>
struct Recurrent {
  int64_t rows, cols, k;
  bool trans;  // op(B) = B^T, B is (cols x k); else op(B) = B, B is (k x cols)
  const T* B;
  Tensor keep;      // the laid-out copy
  const T* small = nullptr;   // (k x cols) for the few-rows kernel
  const T* packed = nullptr;  // MKL packed B
  bool serial;                // one step's product is too small for more than one thread

  Recurrent(int64_t rows_, int64_t cols_, int64_t k_, bool trans_, const Tensor& w)
      : rows(rows_), cols(cols_), k(k_), trans(trans_), B(w.data_ptr<T>()), serial(serial_gemm(rows_, cols_, k_)) {
    if (rows == 0 || cols == 0 || k == 0) return;
    if (rows < kSmallRows) {
      if (trans) {
        keep = w.t().contiguous();
        small = keep.data_ptr<T>();
      } else {
        small = B;
      }
    } else if (have_packed((T*)nullptr)) {
      const size_t bytes = pack_size((T*)nullptr, (int)rows, (int)cols, (int)k);
      keep = at::empty({(int64_t)(bytes / sizeof(T) + 1)}, w.options());
      const OneThread one(serial);
      pack(trans ? kTrans : kNoTrans, (int)rows, (int)cols, (int)k, B, (int)(trans ? k : cols), keep.data_ptr<T>());
      packed = keep.data_ptr<T>();
    }
  }

  void operator()(const T* A, int64_t lda, T beta, T* C, int64_t ldc) const {
    if (rows == 0 || cols == 0) return;
    if (small && k > 0) small_gemm_ab(rows, cols, k, A, lda, small, cols, beta, C, ldc);
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
Tensor zero_held(const Tensor& s, const int64_t* len, bool fresh) {
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
Tensor previous_states(const Tensor& h0, const Tensor& out, const int64_t* len) {
  const int64_t L = out.size(0);
  if (L == 0) return out;
  const OneThread one(serial_elems(out.numel()));
  return zero_held(at::cat({h0.unsqueeze(0), out.narrow(0, 0, L - 1)}, 0), len, true);
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
Tensor weight_grad(const Tensor& dG, const Tensor& X) {
  const int64_t G = dG.size(2), K = X.size(2);
  const OneThread one(serial_once(K * dG.numel()));  // (G x L*N) x (L*N x K) multiply-adds
  return dG.reshape({-1, G}).t().mm(X.reshape({-1, K}));
}

// ================================================================ RNN (tanh / relu)

// a + b (b may be null: a alone), the pre-activation of a gate from its
// recurrent part (the step's product) and its input part (xp).
template <typename T>
inline Vec<T> load_sum(const T* a, const T* b, int64_t j, int64_t cnt) {
  return b ? Vec<T>::loadu(a + j, cnt) + Vec<T>::loadu(b + j, cnt) : Vec<T>::loadu(a + j, cnt);
}

template <typename T>
inline void rnn_act_row(T* h, const T* x, int64_t H, int64_t act) {
  constexpr int64_t VS = Vec<T>::size();
  const Vec<T> zero(T(0));
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    Vec<T> v = load_sum(h, x, j, cnt);
    v = act == 0 ? vtanh(v) : at::vec::maximum(v, zero);
    v.store(h + j, cnt);
  }
}

template <typename T>
inline void rnn_grad_row(const T* dh, const T* h, T* dpre, int64_t H, int64_t act) {
  constexpr int64_t VS = Vec<T>::size();
  const Vec<T> one(T(1));
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    Vec<T> d = Vec<T>::loadu(dh + j, cnt), y = Vec<T>::loadu(h + j, cnt);
    Vec<T> r = act == 0 ? d * (one - y * y) : relu_grad(d, y);
    r.store(dpre + j, cnt);
  }
}

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
  Tensor out = at::empty({L, N, H}, xp.options());
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
  Tensor dxp = at::empty({L, N, H}, out.options());
  Tensor dh_a = grad_hn.clone(), dh_b = at::empty({N, H}, out.options());
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

// ================================================================ LSTM row split
// This extension is built without -fopenmp, so at::parallel_for's header-inline
// OpenMP path compiles to a serial loop here: the gate math of every step ran on
// one thread. lstm_rows runs fn(begin, end) over the rows [0, N) (H cell units
// each) split across a region of torch's own OpenMP pool (libgomp, which
// libtorch_cpu links), called directly, with as many threads as get at least
// kLstmSplitUnitsPerThread units and a row each, at most torch's thread count
// (measured on 2 cores, T=100, fwd+bwd: the split loses 2-37% at N*H <= 1024,
// gains 3-7% at 1536-4096 and 6% at N=64, H=256; see "threading by work").
// Serial for one thread, inside another region, or without those symbols.
template <typename F>
void lstm_rows(int64_t N, int64_t H, const F& fn) {
  const int64_t nt = N < 2 || !GOMP_parallel || !omp_get_thread_num || !omp_get_num_threads || at::in_parallel_region()
                         ? 1
                         : std::min<int64_t>({at::get_num_threads(), N, N * H / kLstmSplitUnitsPerThread});
  if (nt < 2) {
    fn(0, N);
    return;
  }
  struct Ctx {
    const F* fn;
    int64_t N;
  } ctx{&fn, N};
  GOMP_parallel(
      [](void* p) {
        const Ctx* c = static_cast<const Ctx*>(p);
        const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
        const int64_t chunk = (c->N + nt - 1) / nt, b = tid * chunk;
        if (b < c->N) (*c->fn)(b, std::min(c->N, b + chunk));
      },
      &ctx, (unsigned)nt, 0);
}

// ================================================================ LSTM

template <typename T>
inline void lstm_row(T* g, const T* x, const T* cp, T* c, T* m, int64_t H) {
  constexpr int64_t VS = Vec<T>::size();
  const T *x1 = x ? x + H : nullptr, *x2 = x ? x + 2 * H : nullptr, *x3 = x ? x + 3 * H : nullptr;
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    Vec<T> i = vsigmoid(load_sum(g, x, j, cnt));
    Vec<T> f = vsigmoid(load_sum(g + H, x1, j, cnt));
    Vec<T> gg = vtanh(load_sum(g + 2 * H, x2, j, cnt));
    Vec<T> o = vsigmoid(load_sum(g + 3 * H, x3, j, cnt));
    Vec<T> cn = f * Vec<T>::loadu(cp + j, cnt) + i * gg;
    i.store(g + j, cnt);
    f.store(g + H + j, cnt);
    gg.store(g + 2 * H + j, cnt);
    o.store(g + 3 * H + j, cnt);
    cn.store(c + j, cnt);
    (o * vtanh(cn)).store(m + j, cnt);
  }
}

template <typename T>
inline void lstm_grad_row(const T* g, const T* cp, const T* c, const T* dm, T* dc, T* dg, int64_t H) {
  constexpr int64_t VS = Vec<T>::size();
  const Vec<T> one(T(1));
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    Vec<T> i = Vec<T>::loadu(g + j, cnt), f = Vec<T>::loadu(g + H + j, cnt);
    Vec<T> gg = Vec<T>::loadu(g + 2 * H + j, cnt), o = Vec<T>::loadu(g + 3 * H + j, cnt);
    Vec<T> tc = vtanh(Vec<T>::loadu(c + j, cnt));
    Vec<T> d = Vec<T>::loadu(dm + j, cnt);
    Vec<T> dct = Vec<T>::loadu(dc + j, cnt) + d * o * (one - tc * tc);
    (dct * gg * i * (one - i)).store(dg + j, cnt);
    (dct * Vec<T>::loadu(cp + j, cnt) * f * (one - f)).store(dg + H + j, cnt);
    (dct * i * (one - gg * gg)).store(dg + 2 * H + j, cnt);
    (d * tc * o * (one - o)).store(dg + 3 * H + j, cnt);
    (dct * f).store(dc + j, cnt);
  }
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
  check_same(xp, w_hh, "w_hh", {G, P});
  if (proj) check_same(xp, w_hr, "w_hr", {P, H});
  else TORCH_CHECK(P == H, "rnnkit_fused::lstm_fwd: without w_hr, w_hh must be (4H, H), got ", w_hh.sizes());
  check_same(xp, h0, "h0", {N, P});
  check_same(xp, c0, "c0", {N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor out = at::empty({L, N, P}, xp.options());
  Tensor gates = at::empty({L, N, G}, xp.options());
  Tensor cs = at::empty({L, N, H}, xp.options());
  Tensor ms = proj ? at::empty({L, N, H}, xp.options()) : at::empty({0}, xp.options());
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
      T* gt = gs + t * N * G;
      T* ct = c + t * N * H;
      T* ot = o + t * N * P;
      T* mt = proj ? m + t * N * H : ot;
      rec(hp, P, T(0), gt, G);
      const T* xt = x + t * N * G;
      const bool check = len && t >= min_len;
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
  Tensor dG = at::empty({L, N, G}, out.options());
  Tensor dHall = proj ? at::empty({L, N, P}, out.options()) : Tensor();
  Tensor dm_buf = proj ? at::empty({N, H}, out.options()) : Tensor();
  Tensor dh_a = grad_hn.clone(), dh_b = at::empty({N, P}, out.options()), dc = grad_cn.clone();
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
  Tensor grad_w_hr = proj ? weight_grad(dHall, ms) : at::empty({0}, out.options());
  return {dG, grad_w_hh, grad_w_hr, dh_a, dc};
}

// ================================================================ GRU

template <typename T>
inline void gru_row(const T* x, const T* hh, const T* bh, const T* hp, T* rzn, T* hn, T* h, int64_t H) {
  constexpr int64_t VS = Vec<T>::size();
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    Vec<T> r = vsigmoid(Vec<T>::loadu(x + j, cnt) + Vec<T>::loadu(hh + j, cnt) + Vec<T>::loadu(bh + j, cnt));
    Vec<T> z = vsigmoid(Vec<T>::loadu(x + H + j, cnt) + Vec<T>::loadu(hh + H + j, cnt) +
                        Vec<T>::loadu(bh + H + j, cnt));
    Vec<T> hnb = Vec<T>::loadu(hh + 2 * H + j, cnt) + Vec<T>::loadu(bh + 2 * H + j, cnt);
    Vec<T> nn = vtanh((Vec<T>::loadu(x + 2 * H + j, cnt) + r * hnb));
    Vec<T> hprev = Vec<T>::loadu(hp + j, cnt);
    r.store(rzn + j, cnt);
    z.store(rzn + H + j, cnt);
    nn.store(rzn + 2 * H + j, cnt);
    hnb.store(hn + j, cnt);
    (nn + z * (hprev - nn)).store(h + j, cnt);
  }
}

template <typename T>
inline void gru_grad_row(const T* rzn, const T* hn, const T* hp, const T* dh, T* dx, T* dhh, T* dnext, int64_t H) {
  constexpr int64_t VS = Vec<T>::size();
  const Vec<T> one(T(1));
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    Vec<T> r = Vec<T>::loadu(rzn + j, cnt), z = Vec<T>::loadu(rzn + H + j, cnt);
    Vec<T> nn = Vec<T>::loadu(rzn + 2 * H + j, cnt), d = Vec<T>::loadu(dh + j, cnt);
    Vec<T> dn_pre = d * (one - z) * (one - nn * nn);
    Vec<T> dz_pre = d * (Vec<T>::loadu(hp + j, cnt) - nn) * z * (one - z);
    Vec<T> dr_pre = dn_pre * Vec<T>::loadu(hn + j, cnt) * r * (one - r);
    dr_pre.store(dx + j, cnt);
    dz_pre.store(dx + H + j, cnt);
    dn_pre.store(dx + 2 * H + j, cnt);
    dr_pre.store(dhh + j, cnt);
    dz_pre.store(dhh + H + j, cnt);
    (dn_pre * r).store(dhh + 2 * H + j, cnt);
    (d * z).store(dnext + j, cnt);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gru_fwd(const Tensor& xp_, const Tensor& w_hh_,
                                                   const std::optional<Tensor>& b_hh_, const Tensor& h0_,
                                                   const std::optional<Tensor>& lengths) {
  TORCH_CHECK(w_hh_.dim() == 2 && w_hh_.size(0) == 3 * w_hh_.size(1),
              "rnnkit_fused::gru_fwd: w_hh must be (3H, H), got ", w_hh_.sizes());
  const int64_t H = w_hh_.size(1), G = 3 * H;
  check_seq(xp_, "gru_fwd", G);
  const int64_t L = xp_.size(0), N = xp_.size(1);
  Tensor xp = xp_.contiguous(), w_hh = w_hh_.contiguous(), h0 = h0_.contiguous();
  check_same(xp, w_hh, "w_hh", {G, H});
  Tensor b_hh = (b_hh_.has_value() && b_hh_->defined()) ? b_hh_->contiguous() : at::zeros({G}, xp.options());
  check_same(xp, b_hh, "b_hh", {G});
  check_same(xp, h0, "h0", {N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor out = at::empty({L, N, H}, xp.options());
  Tensor rzn = at::empty({L, N, G}, xp.options());
  Tensor hns = at::empty({L, N, H}, xp.options());
  Tensor hh = at::empty({N, G}, xp.options());
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "gru_fwd", [&] {
    using T = scalar_t;
    const Recurrent<T> rec(N, G, H, true, w_hh);
    const T *x = xp.data_ptr<T>(), *bh = b_hh.data_ptr<T>(), *h_init = h0.data_ptr<T>();
    T *o = out.data_ptr<T>(), *rz = rzn.data_ptr<T>(), *hn = hns.data_ptr<T>(), *hb = hh.data_ptr<T>();
    const int64_t min_len = min_length(len, N, L), grain = row_grain(G);
    for (int64_t t = 0; t < L; ++t) {
      const T* hp = t == 0 ? h_init : o + (t - 1) * N * H;
      rec(hp, H, T(0), hb, G);
      const T* xt = x + t * N * G;
      T *rzt = rz + t * N * G, *hnt = hn + t * N * H, *ot = o + t * N * H;
      const bool check = len && t >= min_len;
      at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          if (check && t >= len[n]) {  // held: the saved gates are unused, zeroed to stay deterministic
            copy_row(ot + n * H, hp + n * H, H);
            zero_row(rzt + n * G, G);
            zero_row(hnt + n * H, H);
          } else gru_row(xt + n * G, hb + n * G, bh, hp + n * H, rzt + n * G, hnt + n * H, ot + n * H, H);
        }
      });
    }
  });
  Tensor h_n = L > 0 ? out[L - 1].clone() : h0.clone();
  return {out, h_n, rzn, hns};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gru_bwd(const Tensor& grad_out_, const Tensor& grad_hn_,
                                                   const Tensor& w_hh_, const Tensor& h0_,
                                                   const std::optional<Tensor>& lengths, const Tensor& out_,
                                                   const Tensor& rzn_, const Tensor& hns_) {
  check_dim(out_, 3, "gru_bwd", "out");
  const int64_t L = out_.size(0), N = out_.size(1), H = out_.size(2), G = 3 * H;
  Tensor grad_out = grad_out_.contiguous(), grad_hn = grad_hn_.contiguous(), w_hh = w_hh_.contiguous();
  Tensor h0 = h0_.contiguous(), out = out_.contiguous(), rzn = rzn_.contiguous(), hns = hns_.contiguous();
  check_same(out, grad_out, "grad_out", out.sizes());
  check_same(out, grad_hn, "grad_h_n", {N, H});
  check_same(out, rzn, "rzn", {L, N, G});
  check_same(out, hns, "hn", {L, N, H});
  check_same(out, w_hh, "w_hh", {G, H});
  check_same(out, h0, "h0", {N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor dxp = at::empty({L, N, G}, out.options());
  Tensor dhh = at::empty({L, N, G}, out.options());
  Tensor dh_a = grad_hn.clone(), dh_b = at::empty({N, H}, out.options());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "gru_bwd", [&] {
    using T = scalar_t;
    const Recurrent<T> rec(N, H, G, false, w_hh);
    const T *go = grad_out.data_ptr<T>(), *o = out.data_ptr<T>();
    const T *rz = rzn.data_ptr<T>(), *hn = hns.data_ptr<T>(), *h_init = h0.data_ptr<T>();
    T *dx = dxp.data_ptr<T>(), *dhp = dhh.data_ptr<T>(), *dh = dh_a.data_ptr<T>(), *dn = dh_b.data_ptr<T>();
    const int64_t min_len = min_length(len, N, L), grain = row_grain(G);
    for (int64_t t = L - 1; t >= 0; --t) {
      add_into(dh, go + t * N * H, N * H);
      const T* hp = t == 0 ? h_init : o + (t - 1) * N * H;
      const T *rzt = rz + t * N * G, *hnt = hn + t * N * H;
      T *dxt = dx + t * N * G, *dht = dhp + t * N * G;
      const bool check = len && t >= min_len;
      at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          if (check && t >= len[n]) {
            zero_row(dxt + n * G, G);
            zero_row(dht + n * G, G);
            copy_row(dn + n * H, dh + n * H, H);
          } else {
            gru_grad_row(rzt + n * G, hnt + n * H, hp + n * H, dh + n * H, dxt + n * G, dht + n * G, dn + n * H, H);
          }
        }
      });
      rec(dht, G, T(1), dn, H);
      if (check) pass_held_rows(len, t, N, H, dh, dn);
      std::swap(dh, dn);
    }
    if (dh != dh_a.data_ptr<T>()) std::swap(dh_a, dh_b);
  });
  Tensor grad_w_hh = weight_grad(dhh, previous_states(h0, out, len));
  Tensor grad_b_hh;
  {
    const OneThread one(serial_elems(dhh.numel()));
    grad_b_hh = dhh.sum(at::IntArrayRef{0, 1});
  }
  return {dxp, grad_w_hh, grad_b_hh, dh_a};
}

// ================================================================ peephole LSTM

// i = σ(a_i + w_ci c_{t-1}), f = σ(a_f + w_cf c_{t-1}), g = tanh(a_g), c_t = f c_{t-1} + i g,
// o = σ(a_o + w_co c_t), h_t = o tanh(c_t); a = xp + h_{t-1} W_hh^T (in g on entry).
// On exit g holds (i, f, g, o), the gate activations the backward reads.
template <typename T>
inline void peephole_row(T* g, const T* x, const T* wci, const T* wcf, const T* wco, const T* cp, T* c, T* h,
                         int64_t H) {
  constexpr int64_t VS = Vec<T>::size();
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    const Vec<T> cpv = Vec<T>::loadu(cp + j, cnt);
    Vec<T> i = vsigmoid(load_sum(g, x, j, cnt) + Vec<T>::loadu(wci + j, cnt) * cpv);
    Vec<T> f = vsigmoid(load_sum(g + H, x + H, j, cnt) + Vec<T>::loadu(wcf + j, cnt) * cpv);
    Vec<T> gg = vtanh(load_sum(g + 2 * H, x + 2 * H, j, cnt));
    Vec<T> cn = f * cpv + i * gg;
    Vec<T> o = vsigmoid(load_sum(g + 3 * H, x + 3 * H, j, cnt) + Vec<T>::loadu(wco + j, cnt) * cn);
    i.store(g + j, cnt);
    f.store(g + H + j, cnt);
    gg.store(g + 2 * H + j, cnt);
    o.store(g + 3 * H + j, cnt);
    cn.store(c + j, cnt);
    (o * vtanh(cn)).store(h + j, cnt);
  }
}

// dm: dL/dh_t; dc: dL/dc_t from later steps on entry, dL/dc_{t-1} on exit;
// dg: the pre-activation gradients (i, f, g, o).
template <typename T>
inline void peephole_grad_row(const T* g, const T* wci, const T* wcf, const T* wco, const T* cp, const T* c,
                              const T* dm, T* dc, T* dg, int64_t H) {
  constexpr int64_t VS = Vec<T>::size();
  const Vec<T> one(T(1));
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    Vec<T> i = Vec<T>::loadu(g + j, cnt), f = Vec<T>::loadu(g + H + j, cnt);
    Vec<T> gg = Vec<T>::loadu(g + 2 * H + j, cnt), o = Vec<T>::loadu(g + 3 * H + j, cnt);
    Vec<T> tc = vtanh(Vec<T>::loadu(c + j, cnt));
    Vec<T> cpv = Vec<T>::loadu(cp + j, cnt);
    Vec<T> d = Vec<T>::loadu(dm + j, cnt);
    Vec<T> dop = d * tc * o * (one - o);
    Vec<T> dct = Vec<T>::loadu(dc + j, cnt) + d * o * (one - tc * tc) + dop * Vec<T>::loadu(wco + j, cnt);
    Vec<T> dip = dct * gg * i * (one - i);
    Vec<T> dfp = dct * cpv * f * (one - f);
    dip.store(dg + j, cnt);
    dfp.store(dg + H + j, cnt);
    (dct * i * (one - gg * gg)).store(dg + 2 * H + j, cnt);
    dop.store(dg + 3 * H + j, cnt);
    (dct * f + dip * Vec<T>::loadu(wci + j, cnt) + dfp * Vec<T>::loadu(wcf + j, cnt)).store(dc + j, cnt);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> peephole_fwd(const Tensor& xp_, const Tensor& w_hh_,
                                                                 const Tensor& w_ci_, const Tensor& w_cf_,
                                                                 const Tensor& w_co_, const Tensor& h0_,
                                                                 const Tensor& c0_,
                                                                 const std::optional<Tensor>& lengths) {
  TORCH_CHECK(w_hh_.dim() == 2 && w_hh_.size(0) == 4 * w_hh_.size(1),
              "rnnkit_fused::peephole_fwd: w_hh must be (4H, H), got ", w_hh_.sizes());
  const int64_t H = w_hh_.size(1), G = 4 * H;
  check_seq(xp_, "peephole_fwd", G);
  const int64_t L = xp_.size(0), N = xp_.size(1);
  Tensor xp = xp_.contiguous(), w_hh = w_hh_.contiguous(), h0 = h0_.contiguous(), c0 = c0_.contiguous();
  Tensor w_ci = w_ci_.contiguous(), w_cf = w_cf_.contiguous(), w_co = w_co_.contiguous();
  check_same(xp, w_hh, "w_hh", {G, H});
  check_same(xp, w_ci, "w_ci", {H});
  check_same(xp, w_cf, "w_cf", {H});
  check_same(xp, w_co, "w_co", {H});
  check_same(xp, h0, "h0", {N, H});
  check_same(xp, c0, "c0", {N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor out = at::empty({L, N, H}, xp.options());
  Tensor gates = at::empty({L, N, G}, xp.options());
  Tensor cs = at::empty({L, N, H}, xp.options());
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "peephole_fwd", [&] {
    using T = scalar_t;
    const Recurrent<T> rec(N, G, H, true, w_hh);
    const T* x = xp.data_ptr<T>();
    const T *wci = w_ci.data_ptr<T>(), *wcf = w_cf.data_ptr<T>(), *wco = w_co.data_ptr<T>();
    const T *h_init = h0.data_ptr<T>(), *c_init = c0.data_ptr<T>();
    T *o = out.data_ptr<T>(), *gs = gates.data_ptr<T>(), *c = cs.data_ptr<T>();
    const int64_t min_len = min_length(len, N, L), grain = row_grain(G);
    for (int64_t t = 0; t < L; ++t) {
      const T* hp = t == 0 ? h_init : o + (t - 1) * N * H;
      const T* cp = t == 0 ? c_init : c + (t - 1) * N * H;
      T *gt = gs + t * N * G, *ct = c + t * N * H, *ot = o + t * N * H;
      rec(hp, H, T(0), gt, G);
      const T* xt = x + t * N * G;
      const bool check = len && t >= min_len;
      at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          if (check && t >= len[n]) {
            copy_row(ct + n * H, cp + n * H, H);
            copy_row(ot + n * H, hp + n * H, H);
          } else {
            peephole_row(gt + n * G, xt + n * G, wci, wcf, wco, cp + n * H, ct + n * H, ot + n * H, H);
          }
        }
      });
    }
  });
  Tensor h_n = L > 0 ? out[L - 1].clone() : h0.clone();
  Tensor c_n = L > 0 ? cs[L - 1].clone() : c0.clone();
  return {out, h_n, c_n, gates, cs};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> peephole_bwd(
    const Tensor& grad_out_, const Tensor& grad_hn_, const Tensor& grad_cn_, const Tensor& w_hh_,
    const Tensor& w_ci_, const Tensor& w_cf_, const Tensor& w_co_, const Tensor& h0_, const Tensor& c0_,
    const std::optional<Tensor>& lengths, const Tensor& out_, const Tensor& gates_, const Tensor& cs_) {
  check_dim(out_, 3, "peephole_bwd", "out");
  const int64_t L = out_.size(0), N = out_.size(1), H = out_.size(2), G = 4 * H;
  Tensor grad_out = grad_out_.contiguous(), grad_hn = grad_hn_.contiguous(), grad_cn = grad_cn_.contiguous();
  Tensor w_hh = w_hh_.contiguous(), h0 = h0_.contiguous(), c0 = c0_.contiguous(), out = out_.contiguous();
  Tensor w_ci = w_ci_.contiguous(), w_cf = w_cf_.contiguous(), w_co = w_co_.contiguous();
  Tensor gates = gates_.contiguous(), cs = cs_.contiguous();
  check_same(out, grad_out, "grad_out", out.sizes());
  check_same(out, grad_hn, "grad_h_n", {N, H});
  check_same(out, grad_cn, "grad_c_n", {N, H});
  check_same(out, gates, "gates", {L, N, G});
  check_same(out, cs, "cs", {L, N, H});
  check_same(out, w_hh, "w_hh", {G, H});
  check_same(out, w_ci, "w_ci", {H});
  check_same(out, w_cf, "w_cf", {H});
  check_same(out, w_co, "w_co", {H});
  check_same(out, h0, "h0", {N, H});
  check_same(out, c0, "c0", {N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor dG = at::empty({L, N, G}, out.options());
  Tensor dh_a = grad_hn.clone(), dh_b = at::empty({N, H}, out.options()), dc = grad_cn.clone();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "peephole_bwd", [&] {
    using T = scalar_t;
    const Recurrent<T> rec(N, H, G, false, w_hh);
    const T* go = grad_out.data_ptr<T>();
    const T *gs = gates.data_ptr<T>(), *c = cs.data_ptr<T>(), *c_init = c0.data_ptr<T>();
    const T *wci = w_ci.data_ptr<T>(), *wcf = w_cf.data_ptr<T>(), *wco = w_co.data_ptr<T>();
    T *dg = dG.data_ptr<T>(), *dh = dh_a.data_ptr<T>(), *dn = dh_b.data_ptr<T>(), *dcp = dc.data_ptr<T>();
    const int64_t min_len = min_length(len, N, L), grain = row_grain(G);
    for (int64_t t = L - 1; t >= 0; --t) {
      add_into(dh, go + t * N * H, N * H);
      const T* cp = t == 0 ? c_init : c + (t - 1) * N * H;
      const T *gt = gs + t * N * G, *ct = c + t * N * H;
      T* dgt = dg + t * N * G;
      const bool check = len && t >= min_len;
      at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          if (check && t >= len[n]) {  // held: h and c pass through unchanged
            zero_row(dgt + n * G, G);
            copy_row(dn + n * H, dh + n * H, H);
          } else {
            peephole_grad_row(gt + n * G, wci, wcf, wco, cp + n * H, ct + n * H, dh + n * H, dcp + n * H,
                              dgt + n * G, H);
            zero_row(dn + n * H, H);
          }
        }
      });
      rec(dgt, G, T(1), dn, H);
      if (check) pass_held_rows(len, t, N, H, dh, dn);
      std::swap(dh, dn);
    }
    if (dh != dh_a.data_ptr<T>()) std::swap(dh_a, dh_b);
  });
  Tensor grad_w_hh = weight_grad(dG, previous_states(h0, out, len));
  // the peepholes: sum over steps and rows of the gate gradient times the cell state it saw
  // (held steps have zero gate gradients, so they add nothing)
  Tensor c_prev = previous_states(c0, cs, len);
  const std::array<int64_t, 2> steps_rows{0, 1};  // owned: an IntArrayRef of a braced list would dangle
  const OneThread one(serial_elems(cs.numel()));
  Tensor grad_ci = (dG.narrow(2, 0, H) * c_prev).sum(steps_rows);
  Tensor grad_cf = (dG.narrow(2, H, H) * c_prev).sum(steps_rows);
  Tensor grad_co = (dG.narrow(2, 3 * H, H) * zero_held(cs, len, false)).sum(steps_rows);
  return {dG, grad_w_hh, grad_ci, grad_cf, grad_co, dh_a, dc};
}

// ================================================================ LayerNorm LSTM

// a = xp + γ_hh ⊙ LN(z), z = W_hh h_{t-1} (the caller folds b_ih, b_hh and the LN_hh shift into xp);
// i, f, g, o from a; c_t = f c_{t-1} + i g; h_t = o tanh(γ_c ⊙ LN(c_t) + β_c). LN(v) = (v - μ) / sqrt(σ² + eps),
// biased variance, as F.layer_norm.

// The gate functions at full precision (Sleef's 1-ulp exp and tanh) in float32 too: the normalizations
// divide by a small standard deviation and amplify every rounding difference, and float32 must stay
// within 1e-5 of the reference backend.
template <typename T>
inline Vec<T> psigmoid(const Vec<T>& x) {
  const Vec<T> one(T(1));
  return one / (one + x.neg().exp());
}
template <typename T>
inline Vec<T> ptanh(const Vec<T>& x) { return x.tanh(); }
// float32: tanh x = sign(x) (1 - e) / (1 + e), e = exp(-2|x|) with Sleef's 1-ulp exp: a few times cheaper
// than Sleef's tanh, within about 1e-7 absolute (the relative error grows only where |tanh x| < 1e-3)
template <>
inline Vec<float> ptanh(const Vec<float>& x) {
  const Vec<float> one(1.f), ax = x.abs();
  const Vec<float> e = (ax * Vec<float>(-2.f)).exp();
  const Vec<float> t = (one - e) / (one + e);
  return Vec<float>::blendv(t, t.neg(), x < Vec<float>(0.f));
}

// mean and 1 / sqrt(var + eps) of v (n,), two passes (the variance of the centred values)
template <typename T>
inline void ln_stats(const T* v, int64_t n, T eps, T& mean, T& rstd) {
  constexpr int64_t VS = Vec<T>::size();
  Vec<T> acc(T(0));
  int64_t j = 0;
  for (; j + VS <= n; j += VS) acc = acc + Vec<T>::loadu(v + j);
  T s = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, acc);
  for (; j < n; ++j) s += v[j];
  const T m = s / T(n);
  const Vec<T> mv(m);
  Vec<T> acc2(T(0));
  j = 0;
  for (; j + VS <= n; j += VS) {
    Vec<T> d = Vec<T>::loadu(v + j) - mv;
    acc2 = at::vec::fmadd(d, d, acc2);
  }
  T q = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, acc2);
  for (; j < n; ++j) q += (v[j] - m) * (v[j] - m);
  mean = m;
  rstd = T(1) / std::sqrt(q / T(n) + eps);
}

// sums of d and d ⊙ y over n (for the LN backward)
template <typename T>
inline void ln_sums(const T* d, const T* y, int64_t n, T& sd, T& sdy) {
  constexpr int64_t VS = Vec<T>::size();
  Vec<T> a(T(0)), b(T(0));
  int64_t j = 0;
  for (; j + VS <= n; j += VS) {
    Vec<T> dv = Vec<T>::loadu(d + j);
    a = a + dv;
    b = at::vec::fmadd(dv, Vec<T>::loadu(y + j), b);
  }
  T s1 = at::vec::vec_reduce_all<T>([](Vec<T>& x, Vec<T>& z) { return x + z; }, a);
  T s2 = at::vec::vec_reduce_all<T>([](Vec<T>& x, Vec<T>& z) { return x + z; }, b);
  for (; j < n; ++j) s1 += d[j], s2 += d[j] * y[j];
  sd = s1, sdy = s2;
}

// One row of one step. z (G,) holds W_hh h_{t-1} on entry and the gate activations (i, f, g, o) on exit;
// nz (G,) gets LN(z), nc (H,) gets LN(c_t); rs gets (rstd_hh, rstd_c).
template <typename T>
inline void ln_lstm_row(T* z, const T* x, const T* ghh, const T* gc, const T* bc, const T* cp, T* c, T* h, T* nz,
                        T* nc, T* rs, int64_t H, T eps) {
  constexpr int64_t VS = Vec<T>::size();
  const int64_t G = 4 * H;
  T mean, rstd;
  ln_stats(z, G, eps, mean, rstd);
  rs[0] = rstd;
  const Vec<T> mv(mean), rv(rstd);
  // LN(z) is formed in the gate pass itself (one pass over the G values, not two)
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    auto pre = [&](int64_t k) {
      const Vec<T> n = (Vec<T>::loadu(z + k * H + j, cnt) - mv) * rv;
      n.store(nz + k * H + j, cnt);
      return Vec<T>::loadu(x + k * H + j, cnt) + Vec<T>::loadu(ghh + k * H + j, cnt) * n;
    };
    Vec<T> i = psigmoid(pre(0)), f = psigmoid(pre(1)), gg = ptanh(pre(2)), o = psigmoid(pre(3));
    Vec<T> cn = f * Vec<T>::loadu(cp + j, cnt) + i * gg;
    i.store(z + j, cnt);
    f.store(z + H + j, cnt);
    gg.store(z + 2 * H + j, cnt);
    o.store(z + 3 * H + j, cnt);
    cn.store(c + j, cnt);
  }
  ln_stats(c, H, eps, mean, rstd);
  rs[1] = rstd;
  const Vec<T> mc(mean), rc(rstd);
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    Vec<T> n = (Vec<T>::loadu(c + j, cnt) - mc) * rc;
    n.store(nc + j, cnt);
    Vec<T> y = Vec<T>::loadu(gc + j, cnt) * n + Vec<T>::loadu(bc + j, cnt);
    (Vec<T>::loadu(z + 3 * H + j, cnt) * ptanh(y)).store(h + j, cnt);
  }
}

// The backward of one row of one step. dm: dL/dh_t; dc: dL/dc_t from later steps on entry, dL/dc_{t-1} on exit.
// Writes dg (G,): dL/da (the gradient of xp), dz (G,): dL/dz (for dh_{t-1} and dW_hh), dy (H,): dL/d(LN_c out).
// Three passes: (1) dy, the o gate, the LN_c sums; (2) the i, f, g gates and dc_{t-1}; the LN_hh input
// dn = dg γ_hh and its sums are formed as each gate's dg is; (3) dz from dn.
template <typename T>
inline void ln_lstm_grad_row(const T* g, const T* ghh, const T* gc, const T* bc, const T* cp, const T* nz,
                             const T* nc, const T* rs, const T* dm, T* dc, T* dg, T* dz, T* dy, int64_t H) {
  using V = Vec<T>;
  constexpr int64_t VS = V::size();
  const int64_t G = 4 * H;
  const V one(T(1));
  auto sum = [](const V& v) { return at::vec::vec_reduce_all<T>([](V& x, V& z) { return x + z; }, v); };
  // (1) dy = dh o (1 - tanh² y); dn_c = dy γ_c and its sums for the LN_c backward
  V a1(T(0)), a2(T(0)), b1(T(0)), b2(T(0));
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    V n = V::loadu(nc + j, cnt), gcv = V::loadu(gc + j, cnt);
    V ty = ptanh(gcv * n + V::loadu(bc + j, cnt));
    V o = V::loadu(g + 3 * H + j, cnt), d = V::loadu(dm + j, cnt);
    V dyv = d * o * (one - ty * ty);
    dyv.store(dy + j, cnt);
    V dnc = dyv * gcv;
    a1 = a1 + dnc;
    a2 = at::vec::fmadd(dnc, n, a2);
    V dgo = d * ty * o * (one - o);  // zero past cnt (d is zero-filled there)
    dgo.store(dg + 3 * H + j, cnt);
    V dn = dgo * V::loadu(ghh + 3 * H + j, cnt);
    dn.store(dz + 3 * H + j, cnt);
    b1 = b1 + dn;
    b2 = at::vec::fmadd(dn, V::loadu(nz + 3 * H + j, cnt), b2);
  }
  const V m1(sum(a1) / T(H)), m2(sum(a2) / T(H)), rc(rs[1]);
  // (2) dc_t, the i, f, g gates, dc_{t-1}; dn = dg γ_hh for them
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    V n = V::loadu(nc + j, cnt);
    V dnc = V::loadu(dy + j, cnt) * V::loadu(gc + j, cnt);
    V dct = V::loadu(dc + j, cnt) + rc * (dnc - m1 - n * m2);
    V i = V::loadu(g + j, cnt), f = V::loadu(g + H + j, cnt), gg = V::loadu(g + 2 * H + j, cnt);
    V dgi = dct * gg * i * (one - i), dgf = dct * V::loadu(cp + j, cnt) * f * (one - f);
    V dgg = dct * i * (one - gg * gg);
    if (cnt < VS) {  // past cnt dct is not zero (m1): keep those lanes out of the sums
      dgi = V::set(V(T(0)), dgi, cnt), dgf = V::set(V(T(0)), dgf, cnt), dgg = V::set(V(T(0)), dgg, cnt);
    }
    dgi.store(dg + j, cnt);
    dgf.store(dg + H + j, cnt);
    dgg.store(dg + 2 * H + j, cnt);
    (dct * f).store(dc + j, cnt);
    V dni = dgi * V::loadu(ghh + j, cnt), dnf = dgf * V::loadu(ghh + H + j, cnt);
    V dng = dgg * V::loadu(ghh + 2 * H + j, cnt);
    dni.store(dz + j, cnt);
    dnf.store(dz + H + j, cnt);
    dng.store(dz + 2 * H + j, cnt);
    b1 = b1 + dni + dnf + dng;
    b2 = at::vec::fmadd(dni, V::loadu(nz + j, cnt), b2);
    b2 = at::vec::fmadd(dnf, V::loadu(nz + H + j, cnt), b2);
    b2 = at::vec::fmadd(dng, V::loadu(nz + 2 * H + j, cnt), b2);
  }
  // (3) LN_hh: dz = rstd (dn - mean(dn) - nz mean(dn nz))
  const V n1(sum(b1) / T(G)), n2(sum(b2) / T(G)), rh(rs[0]);
  for (int64_t j = 0; j < G; j += VS) {
    const int64_t cnt = std::min(VS, G - j);
    (rh * (V::loadu(dz + j, cnt) - n1 - V::loadu(nz + j, cnt) * n2)).store(dz + j, cnt);
  }
}

// The LN parameters' gradients of one row: acc_hh (G) += dg ⊙ LN(z), acc_gc (H) += dy ⊙ LN(c), acc_bc (H) += dy,
// accumulated in double (sums over every step and row).
template <typename T>
inline void ln_lstm_param_sums(const T* dg, const T* nz, const T* dy, const T* nc, int64_t H, double* acc_hh,
                               double* acc_gc, double* acc_bc) {
  for (int64_t j = 0; j < 4 * H; ++j) acc_hh[j] += double(dg[j]) * double(nz[j]);
  for (int64_t j = 0; j < H; ++j) {
    acc_gc[j] += double(dy[j]) * double(nc[j]);
    acc_bc[j] += double(dy[j]);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ln_lstm_fwd(
    const Tensor& xp_, const Tensor& w_hh_, const Tensor& g_hh_, const Tensor& g_c_, const Tensor& b_c_,
    const Tensor& h0_, const Tensor& c0_, const std::optional<Tensor>& lengths, double eps_) {
  TORCH_CHECK(w_hh_.dim() == 2 && w_hh_.size(0) == 4 * w_hh_.size(1),
              "rnnkit_fused::ln_lstm_fwd: w_hh must be (4H, H), got ", w_hh_.sizes());
  TORCH_CHECK(eps_ > 0, "rnnkit_fused::ln_lstm_fwd: eps must be positive, got ", eps_);
  const int64_t H = w_hh_.size(1), G = 4 * H;
  check_seq(xp_, "ln_lstm_fwd", G);
  const int64_t L = xp_.size(0), N = xp_.size(1);
  Tensor xp = xp_.contiguous(), w_hh = w_hh_.contiguous(), h0 = h0_.contiguous(), c0 = c0_.contiguous();
  Tensor g_hh = g_hh_.contiguous(), g_c = g_c_.contiguous(), b_c = b_c_.contiguous();
  check_same(xp, w_hh, "w_hh", {G, H});
  check_same(xp, g_hh, "ln_weight_hh", {G});
  check_same(xp, g_c, "ln_weight_c", {H});
  check_same(xp, b_c, "ln_bias_c", {H});
  check_same(xp, h0, "h0", {N, H});
  check_same(xp, c0, "c0", {N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor out = at::empty({L, N, H}, xp.options());
  Tensor gates = at::empty({L, N, G}, xp.options());
  Tensor cs = at::empty({L, N, H}, xp.options());
  Tensor nzs = at::empty({L, N, G}, xp.options());
  Tensor ncs = at::empty({L, N, H}, xp.options());
  Tensor rstd = at::empty({L, N, 2}, xp.options());
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "ln_lstm_fwd", [&] {
    using T = scalar_t;
    const T eps = T(eps_);
    const Recurrent<T> rec(N, G, H, true, w_hh);
    const T* x = xp.data_ptr<T>();
    const T *ghh = g_hh.data_ptr<T>(), *gc = g_c.data_ptr<T>(), *bc = b_c.data_ptr<T>();
    const T *h_init = h0.data_ptr<T>(), *c_init = c0.data_ptr<T>();
    T *o = out.data_ptr<T>(), *gs = gates.data_ptr<T>(), *c = cs.data_ptr<T>();
    T *nz = nzs.data_ptr<T>(), *nc = ncs.data_ptr<T>(), *rs = rstd.data_ptr<T>();
    const int64_t min_len = min_length(len, N, L), grain = row_grain(2 * G);
    for (int64_t t = 0; t < L; ++t) {
      const T* hp = t == 0 ? h_init : o + (t - 1) * N * H;
      const T* cp = t == 0 ? c_init : c + (t - 1) * N * H;
      T *gt = gs + t * N * G, *ct = c + t * N * H, *ot = o + t * N * H;
      T *nzt = nz + t * N * G, *nct = nc + t * N * H, *rst = rs + t * N * 2;
      rec(hp, H, T(0), gt, G);
      const T* xt = x + t * N * G;
      const bool check = len && t >= min_len;
      at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          if (check && t >= len[n]) {  // held; the saved LN values are zero so the parameter sums skip this step
            copy_row(ct + n * H, cp + n * H, H);
            copy_row(ot + n * H, hp + n * H, H);
            zero_row(gt + n * G, G);
            zero_row(nzt + n * G, G);
            zero_row(nct + n * H, H);
            rst[2 * n] = rst[2 * n + 1] = T(0);
          } else {
            ln_lstm_row(gt + n * G, xt + n * G, ghh, gc, bc, cp + n * H, ct + n * H, ot + n * H, nzt + n * G,
                        nct + n * H, rst + 2 * n, H, eps);
          }
        }
      });
    }
  });
  Tensor h_n = L > 0 ? out[L - 1].clone() : h0.clone();
  Tensor c_n = L > 0 ? cs[L - 1].clone() : c0.clone();
  return {out, h_n, c_n, gates, cs, nzs, ncs, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ln_lstm_bwd(
    const Tensor& grad_out_, const Tensor& grad_hn_, const Tensor& grad_cn_, const Tensor& w_hh_,
    const Tensor& g_hh_, const Tensor& g_c_, const Tensor& b_c_, const Tensor& h0_, const Tensor& c0_,
    const std::optional<Tensor>& lengths, const Tensor& out_, const Tensor& gates_, const Tensor& cs_,
    const Tensor& nzs_, const Tensor& ncs_, const Tensor& rstd_) {
  check_dim(out_, 3, "ln_lstm_bwd", "out");
  const int64_t L = out_.size(0), N = out_.size(1), H = out_.size(2), G = 4 * H;
  Tensor grad_out = grad_out_.contiguous(), grad_hn = grad_hn_.contiguous(), grad_cn = grad_cn_.contiguous();
  Tensor w_hh = w_hh_.contiguous(), h0 = h0_.contiguous(), c0 = c0_.contiguous(), out = out_.contiguous();
  Tensor g_hh = g_hh_.contiguous(), g_c = g_c_.contiguous(), b_c = b_c_.contiguous();
  Tensor gates = gates_.contiguous(), cs = cs_.contiguous(), nzs = nzs_.contiguous(), ncs = ncs_.contiguous();
  Tensor rstd = rstd_.contiguous();
  check_same(out, grad_out, "grad_out", out.sizes());
  check_same(out, grad_hn, "grad_h_n", {N, H});
  check_same(out, grad_cn, "grad_c_n", {N, H});
  check_same(out, gates, "gates", {L, N, G});
  check_same(out, cs, "cs", {L, N, H});
  check_same(out, nzs, "nz", {L, N, G});
  check_same(out, ncs, "nc", {L, N, H});
  check_same(out, rstd, "rstd", {L, N, 2});
  check_same(out, w_hh, "w_hh", {G, H});
  check_same(out, g_hh, "ln_weight_hh", {G});
  check_same(out, g_c, "ln_weight_c", {H});
  check_same(out, b_c, "ln_bias_c", {H});
  check_same(out, h0, "h0", {N, H});
  check_same(out, c0, "c0", {N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor dG = at::empty({L, N, G}, out.options());
  Tensor dZ = at::empty({L, N, G}, out.options());
  Tensor dh_a = grad_hn.clone(), dh_b = at::empty({N, H}, out.options()), dc = grad_cn.clone();
  // the LN parameters' gradients, summed over steps and rows as the loop goes: one double accumulator
  // (G + 2H) and one dy row (H) per thread, added up in thread order after the loop
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads()), P = G + 2 * H;
  Tensor acc = at::zeros({threads, P}, out.options().dtype(at::kDouble));
  Tensor dy_rows = at::empty({threads, H}, out.options());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "ln_lstm_bwd", [&] {
    using T = scalar_t;
    const Recurrent<T> rec(N, H, G, false, w_hh);
    const T* go = grad_out.data_ptr<T>();
    const T *gs = gates.data_ptr<T>(), *c = cs.data_ptr<T>(), *c_init = c0.data_ptr<T>();
    const T *nz = nzs.data_ptr<T>(), *nc = ncs.data_ptr<T>(), *rs = rstd.data_ptr<T>();
    const T *ghh = g_hh.data_ptr<T>(), *gc = g_c.data_ptr<T>(), *bc = b_c.data_ptr<T>();
    T *dg = dG.data_ptr<T>(), *dz = dZ.data_ptr<T>(), *dy_all = dy_rows.data_ptr<T>();
    double* acc_all = acc.data_ptr<double>();
    T *dh = dh_a.data_ptr<T>(), *dn = dh_b.data_ptr<T>(), *dcp = dc.data_ptr<T>();
    const int64_t min_len = min_length(len, N, L), grain = row_grain(2 * G);
    for (int64_t t = L - 1; t >= 0; --t) {
      add_into(dh, go + t * N * H, N * H);
      const T* cp = t == 0 ? c_init : c + (t - 1) * N * H;
      const T *gt = gs + t * N * G, *nzt = nz + t * N * G, *nct = nc + t * N * H, *rst = rs + t * N * 2;
      T *dgt = dg + t * N * G, *dzt = dz + t * N * G;
      const bool check = len && t >= min_len;
      at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
        const int64_t tid = at::get_thread_num();
        TORCH_CHECK(tid >= 0 && tid < threads, "rnnkit_fused::ln_lstm_bwd: thread ", tid, " of ", threads);
        double* a = acc_all + tid * P;
        T* dy = dy_all + tid * H;
        for (int64_t n = b; n < e; ++n) {
          if (check && t >= len[n]) {  // held: h and c pass through unchanged (and add nothing to the sums)
            zero_row(dgt + n * G, G);
            zero_row(dzt + n * G, G);
            copy_row(dn + n * H, dh + n * H, H);
          } else {
            ln_lstm_grad_row(gt + n * G, ghh, gc, bc, cp + n * H, nzt + n * G, nct + n * H, rst + 2 * n,
                             dh + n * H, dcp + n * H, dgt + n * G, dzt + n * G, dy, H);
            ln_lstm_param_sums(dgt + n * G, nzt + n * G, dy, nct + n * H, H, a, a + G, a + G + H);
            zero_row(dn + n * H, H);
          }
        }
      });
      rec(dzt, G, T(1), dn, H);
      if (check) pass_held_rows(len, t, N, H, dh, dn);
      std::swap(dh, dn);
    }
    if (dh != dh_a.data_ptr<T>()) std::swap(dh_a, dh_b);
  });
  Tensor grad_w_hh = weight_grad(dZ, previous_states(h0, out, len));
  // the LN gains and shift: the threads' sums, added in thread order
  auto part = [&](int64_t from, int64_t n) { return acc.narrow(1, from, n).sum(0).to(out.scalar_type()); };
  Tensor grad_g_hh = part(0, G), grad_g_c = part(G, H), grad_b_c = part(G + H, H);  // three separate tensors
  return {dG, grad_w_hh, grad_g_hh, grad_g_c, grad_b_c, dh_a, dc};
}

// ================================================================ LayerNorm GRU

// b = γ_hh ⊙ LN(z) + β, z = W_hh h_{t-1}, β = ln_bias_hh + b_hh (the caller adds them; zeros without bias);
// r = σ(a_r + b_r), z_g = σ(a_z + b_z), n = tanh(a_n + r ⊙ b_n), h_t = n + z_g (h_{t-1} - n), a = xp
// (LN_ih(W_ih x) + b_ih, the spec's project, done by the caller). β stays a kernel input: r multiplies
// b_n, so its n part cannot be folded into xp (the r, z parts could, but one (G,) input is simpler and
// costs one add per element). LN(v) = (v - μ) / sqrt(σ² + eps), biased variance, as F.layer_norm.
// The gate functions are psigmoid / ptanh (Sleef's 1-ulp exp and tanh) in float32 too, as the LN-LSTM.
// The LN statistics take one pass (ln_stats_welford). Measured on the float32 gradients against the
// float64 oracle (max errors summed over 20 seeded two-layer bidirectional cases): Welford 1.09e-3, the
// LN-LSTM's two-pass ln_stats 1.13e-3, a one-pass sum of v - v[0] and (v - v[0])² 1.19e-3, the reference
// backend itself 1.11e-3; Welford and two passes ran at the same speed within this machine's noise.

// mean and 1 / sqrt(var + eps) of v (n,) in one pass: Welford's update in every vector lane (all lanes
// see the same count, so 1/k is one scalar per step), lanes merged with Chan's formula, the tail after.
template <typename T>
inline void ln_stats_welford(const T* v, int64_t n, T eps, T& mean, T& rstd) {
  constexpr int64_t VS = Vec<T>::size();
  Vec<T> m(T(0)), q(T(0));
  int64_t j = 0, k = 0;
  for (; j + VS <= n; j += VS) {
    ++k;
    const Vec<T> x = Vec<T>::loadu(v + j);
    const Vec<T> d = x - m;
    m = at::vec::fmadd(d, Vec<T>(T(1) / T(k)), m);
    q = at::vec::fmadd(d, x - m, q);
  }
  T mu = 0, m2 = 0, cnt = 0;
  if (k > 0) {
    __at_align__ T ml[VS], ql[VS];
    m.store(ml);
    q.store(ql);
    for (int64_t l = 0; l < VS; ++l) mu += ml[l];
    mu /= T(VS);
    for (int64_t l = 0; l < VS; ++l) m2 += ql[l] + T(k) * (ml[l] - mu) * (ml[l] - mu);
    cnt = T(k * VS);
  }
  for (; j < n; ++j) {
    cnt += T(1);
    const T d = v[j] - mu;
    mu += d / cnt;
    m2 += d * (v[j] - mu);
  }
  mean = mu;
  rstd = T(1) / std::sqrt(m2 / T(n) + eps);
}

// One row of one step. g (G,) holds W_hh h_{t-1} on entry and (r, z, n) on exit; nz (G,) gets LN(W_hh h_{t-1}),
// rs its 1 / sqrt(var + eps); h (H,) gets h_t.
template <typename T>
inline void ln_gru_row(T* g, const T* x, const T* gain, const T* shift, const T* hp, T* h, T* nz, T* rs,
                       int64_t H, T eps) {
  constexpr int64_t VS = Vec<T>::size();
  T mean, rstd;
  ln_stats_welford(g, 3 * H, eps, mean, rstd);
  *rs = rstd;
  const Vec<T> mv(mean), rv(rstd);
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    const Vec<T> nr = (Vec<T>::loadu(g + j, cnt) - mv) * rv;
    const Vec<T> nzz = (Vec<T>::loadu(g + H + j, cnt) - mv) * rv;
    const Vec<T> nn = (Vec<T>::loadu(g + 2 * H + j, cnt) - mv) * rv;
    nr.store(nz + j, cnt);
    nzz.store(nz + H + j, cnt);
    nn.store(nz + 2 * H + j, cnt);
    auto b = [&](int64_t k, const Vec<T>& v) {
      return at::vec::fmadd(Vec<T>::loadu(gain + k * H + j, cnt), v, Vec<T>::loadu(shift + k * H + j, cnt));
    };
    const Vec<T> r = psigmoid(Vec<T>::loadu(x + j, cnt) + b(0, nr));
    const Vec<T> z = psigmoid(Vec<T>::loadu(x + H + j, cnt) + b(1, nzz));
    const Vec<T> n = ptanh(at::vec::fmadd(r, b(2, nn), Vec<T>::loadu(x + 2 * H + j, cnt)));
    r.store(g + j, cnt);
    z.store(g + H + j, cnt);
    n.store(g + 2 * H + j, cnt);
    at::vec::fmadd(z, Vec<T>::loadu(hp + j, cnt) - n, n).store(h + j, cnt);
  }
}

// The backward of one row of one step. dh: dL/dh_t. Writes dx (G,): dL/da (the gradient of xp), dz (G,):
// dL/d(W_hh h_{t-1}) (for dh_{t-1} and dW_hh), dnext (H,): the direct part of dL/dh_{t-1} (dh ⊙ z; the
// caller adds dz W_hh). Adds this step's dL/db ⊙ LN(z) to dg (G,) and dL/db to db (G,): the row's running
// sums for the LN gain and β.
template <typename T>
inline void ln_gru_grad_row(const T* g, const T* nz, T rstd, const T* gain, const T* shift, const T* hp,
                            const T* dh, T* dx, T* dg, T* db, T* dz, T* dnext, int64_t H) {
  constexpr int64_t VS = Vec<T>::size();
  const Vec<T> one(T(1)), zero(T(0));
  Vec<T> s1(T(0)), s2(T(0));  // sums of dn = db γ and dn ⊙ LN(z), for the LN backward
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t cnt = std::min(VS, H - j);
    const Vec<T> r = Vec<T>::loadu(g + j, cnt), z = Vec<T>::loadu(g + H + j, cnt);
    const Vec<T> n = Vec<T>::loadu(g + 2 * H + j, cnt), d = Vec<T>::loadu(dh + j, cnt);
    const Vec<T> nr = Vec<T>::loadu(nz + j, cnt), nzz = Vec<T>::loadu(nz + H + j, cnt);
    const Vec<T> nn = Vec<T>::loadu(nz + 2 * H + j, cnt);
    const Vec<T> gr = Vec<T>::loadu(gain + j, cnt), gz = Vec<T>::loadu(gain + H + j, cnt);
    const Vec<T> gn = Vec<T>::loadu(gain + 2 * H + j, cnt);
    const Vec<T> bn = at::vec::fmadd(gn, nn, Vec<T>::loadu(shift + 2 * H + j, cnt));
    const Vec<T> dn_pre = d * (one - z) * (one - n * n);
    const Vec<T> dz_pre = d * (Vec<T>::loadu(hp + j, cnt) - n) * z * (one - z);
    const Vec<T> dr_pre = dn_pre * bn * r * (one - r);
    const Vec<T> dbn = dn_pre * r;
    dr_pre.store(dx + j, cnt);
    dz_pre.store(dx + H + j, cnt);
    dn_pre.store(dx + 2 * H + j, cnt);
    (Vec<T>::loadu(db + j, cnt) + dr_pre).store(db + j, cnt);
    (Vec<T>::loadu(db + H + j, cnt) + dz_pre).store(db + H + j, cnt);
    (Vec<T>::loadu(db + 2 * H + j, cnt) + dbn).store(db + 2 * H + j, cnt);
    at::vec::fmadd(dr_pre, nr, Vec<T>::loadu(dg + j, cnt)).store(dg + j, cnt);
    at::vec::fmadd(dz_pre, nzz, Vec<T>::loadu(dg + H + j, cnt)).store(dg + H + j, cnt);
    at::vec::fmadd(dbn, nn, Vec<T>::loadu(dg + 2 * H + j, cnt)).store(dg + 2 * H + j, cnt);
    (d * z).store(dnext + j, cnt);
    Vec<T> a = dr_pre * gr, b = dz_pre * gz, c = dbn * gn;
    a.store(dz + j, cnt);
    b.store(dz + H + j, cnt);
    c.store(dz + 2 * H + j, cnt);
    if (cnt < VS) {  // only the loaded lanes take part in the sums
      a = Vec<T>::set(zero, a, cnt), b = Vec<T>::set(zero, b, cnt), c = Vec<T>::set(zero, c, cnt);
    }
    s1 = s1 + a + b + c;
    s2 = at::vec::fmadd(a, nr, at::vec::fmadd(b, nzz, at::vec::fmadd(c, nn, s2)));
  }
  const int64_t G = 3 * H;
  const T m1 = at::vec::vec_reduce_all<T>([](Vec<T>& x, Vec<T>& y) { return x + y; }, s1) / T(G);
  const T m2 = at::vec::vec_reduce_all<T>([](Vec<T>& x, Vec<T>& y) { return x + y; }, s2) / T(G);
  // LN backward: dz = rstd (dn - mean(dn) - LN(z) mean(dn ⊙ LN(z)))
  const Vec<T> v1(m1), v2(m2), rv(rstd);
  for (int64_t j = 0; j < G; j += VS) {
    const int64_t cnt = std::min(VS, G - j);
    (rv * (Vec<T>::loadu(dz + j, cnt) - v1 - Vec<T>::loadu(nz + j, cnt) * v2)).store(dz + j, cnt);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ln_gru_fwd(const Tensor& xp_, const Tensor& w_hh_,
                                                              const Tensor& g_hh_, const Tensor& shift_,
                                                              const Tensor& h0_,
                                                              const std::optional<Tensor>& lengths, double eps_) {
  TORCH_CHECK(w_hh_.dim() == 2 && w_hh_.size(0) == 3 * w_hh_.size(1),
              "rnnkit_fused::ln_gru_fwd: w_hh must be (3H, H), got ", w_hh_.sizes());
  TORCH_CHECK(eps_ > 0, "rnnkit_fused::ln_gru_fwd: eps must be positive, got ", eps_);
  const int64_t H = w_hh_.size(1), G = 3 * H;
  check_seq(xp_, "ln_gru_fwd", G);
  const int64_t L = xp_.size(0), N = xp_.size(1);
  Tensor xp = xp_.contiguous(), w_hh = w_hh_.contiguous(), h0 = h0_.contiguous();
  Tensor g_hh = g_hh_.contiguous(), shift = shift_.contiguous();
  check_same(xp, w_hh, "w_hh", {G, H});
  check_same(xp, g_hh, "ln_weight_hh", {G});
  check_same(xp, shift, "shift", {G});
  check_same(xp, h0, "h0", {N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor out = at::empty({L, N, H}, xp.options());
  Tensor gates = at::empty({L, N, G}, xp.options());
  Tensor nzs = at::empty({L, N, G}, xp.options());
  Tensor rstd = at::empty({L, N}, xp.options());
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "ln_gru_fwd", [&] {
    using T = scalar_t;
    const T eps = T(eps_);
    const Recurrent<T> rec(N, G, H, true, w_hh);
    const T *x = xp.data_ptr<T>(), *gain = g_hh.data_ptr<T>(), *sh = shift.data_ptr<T>();
    const T* h_init = h0.data_ptr<T>();
    T *o = out.data_ptr<T>(), *gs = gates.data_ptr<T>(), *nz = nzs.data_ptr<T>(), *rs = rstd.data_ptr<T>();
    const int64_t min_len = min_length(len, N, L), grain = row_grain(2 * G);
    for (int64_t t = 0; t < L; ++t) {
      const T* hp = t == 0 ? h_init : o + (t - 1) * N * H;
      T *gt = gs + t * N * G, *ot = o + t * N * H, *nzt = nz + t * N * G, *rst = rs + t * N;
      rec(hp, H, T(0), gt, G);
      const T* xt = x + t * N * G;
      const bool check = len && t >= min_len;
      at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          if (check && t >= len[n]) {  // held; the saved values are zero so the backward's sums skip this step
            copy_row(ot + n * H, hp + n * H, H);
            zero_row(gt + n * G, G);
            zero_row(nzt + n * G, G);
            rst[n] = T(0);
          } else {
            ln_gru_row(gt + n * G, xt + n * G, gain, sh, hp + n * H, ot + n * H, nzt + n * G, rst + n, H, eps);
          }
        }
      });
    }
  });
  Tensor h_n = L > 0 ? out[L - 1].clone() : h0.clone();
  return {out, h_n, gates, nzs, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ln_gru_bwd(
    const Tensor& grad_out_, const Tensor& grad_hn_, const Tensor& w_hh_, const Tensor& g_hh_, const Tensor& shift_,
    const Tensor& h0_, const std::optional<Tensor>& lengths, const Tensor& out_, const Tensor& gates_,
    const Tensor& nzs_, const Tensor& rstd_) {
  TORCH_CHECK(out_.dim() == 3, "rnnkit_fused::ln_gru_bwd: out must be (L, N, H), got ", out_.sizes());
  const int64_t L = out_.size(0), N = out_.size(1), H = out_.size(2), G = 3 * H;
  Tensor grad_out = grad_out_.contiguous(), grad_hn = grad_hn_.contiguous(), w_hh = w_hh_.contiguous();
  Tensor g_hh = g_hh_.contiguous(), shift = shift_.contiguous(), h0 = h0_.contiguous(), out = out_.contiguous();
  Tensor gates = gates_.contiguous(), nzs = nzs_.contiguous(), rstd = rstd_.contiguous();
  check_same(out, grad_out, "grad_out", out.sizes());
  check_same(out, grad_hn, "grad_h_n", {N, H});
  check_same(out, w_hh, "w_hh", {G, H});
  check_same(out, g_hh, "ln_weight_hh", {G});
  check_same(out, shift, "shift", {G});
  check_same(out, h0, "h0", {N, H});
  check_same(out, gates, "gates", {L, N, G});
  check_same(out, nzs, "nz", {L, N, G});
  check_same(out, rstd, "rstd", {L, N});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor dX = at::empty({L, N, G}, out.options());
  Tensor dZ = at::empty({L, N, G}, out.options());
  Tensor dG_rows = at::zeros({N, G}, out.options()), dB_rows = at::zeros({N, G}, out.options());
  Tensor dh_a = grad_hn.clone(), dh_b = at::empty({N, H}, out.options());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "ln_gru_bwd", [&] {
    using T = scalar_t;
    const Recurrent<T> rec(N, H, G, false, w_hh);
    const T *go = grad_out.data_ptr<T>(), *o = out.data_ptr<T>(), *h_init = h0.data_ptr<T>();
    const T *gs = gates.data_ptr<T>(), *nz = nzs.data_ptr<T>(), *rs = rstd.data_ptr<T>();
    const T *gain = g_hh.data_ptr<T>(), *sh = shift.data_ptr<T>();
    T *dx = dX.data_ptr<T>(), *dz = dZ.data_ptr<T>(), *dgr = dG_rows.data_ptr<T>(), *dbr = dB_rows.data_ptr<T>();
    T *dh = dh_a.data_ptr<T>(), *dn = dh_b.data_ptr<T>();
    const int64_t min_len = min_length(len, N, L), grain = row_grain(2 * G);
    for (int64_t t = L - 1; t >= 0; --t) {
      add_into(dh, go + t * N * H, N * H);
      const T* hp = t == 0 ? h_init : o + (t - 1) * N * H;
      const T *gt = gs + t * N * G, *nzt = nz + t * N * G, *rst = rs + t * N;
      T *dxt = dx + t * N * G, *dzt = dz + t * N * G;
      const bool check = len && t >= min_len;
      at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) {
          if (check && t >= len[n]) {  // held: h passes through unchanged
            zero_row(dxt + n * G, G);
            zero_row(dzt + n * G, G);
            copy_row(dn + n * H, dh + n * H, H);
          } else {
            ln_gru_grad_row(gt + n * G, nzt + n * G, rst[n], gain, sh, hp + n * H, dh + n * H, dxt + n * G,
                            dgr + n * G, dbr + n * G, dzt + n * G, dn + n * H, H);
          }
        }
      });
      rec(dzt, G, T(1), dn, H);
      if (check) pass_held_rows(len, t, N, H, dh, dn);
      std::swap(dh, dn);
    }
    if (dh != dh_a.data_ptr<T>()) std::swap(dh_a, dh_b);
  });
  Tensor grad_w_hh = weight_grad(dZ, previous_states(h0, out, len));
  // the LN gain and β: each row summed its steps inside the loop (held steps add nothing), rows summed here
  return {dX, grad_w_hh, dG_rows.sum(0), dB_rows.sum(0), dh_a};
}

// ================================================================ IndRNN

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
  Tensor out = at::empty({L, N, H}, xp.options());
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
  Tensor dxp = at::empty({L, N, H}, out.options());
  Tensor dh0 = at::empty({N, H}, out.options());
  Tensor du_rows = at::empty({N, H}, out.options());  // per row, summed over rows after the loop
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

// ================================================================ single-step cells (inference)
// One implementation on raw pointers (the *_cell_raw functions) serves both
// entries: the torch.ops ops below (autograd-free, traced by torch.compile) and
// the direct CPython entry `cell_step` at the end of this file, which skips the
// dispatcher for plain inference steps.

// Matrix-vector products of one step at a tiny batch: y (G) = b1 + b2 + W1 a1 + W2 a2,
// W row-major (G x K) as torch stores it (a2/W2 and the biases may be null).
// Both products share each row's accumulators and the bias is added once at
// the end: one pass over y instead of BLAS's two calls (whose per-call cost
// dominates at this size). Rows go in blocks of R, each block's R
// accumulators reduced together.
template <typename T, int R>
inline void gemv_block(int64_t g, const T* a1, int64_t K1, const T* W1, const T* a2, int64_t K2, const T* W2,
                       T* sums) {
  using V = Vec<T>;
  constexpr int64_t VS = V::size();
  V acc[R];
  for (int r = 0; r < R; ++r) acc[r] = V(T(0));
  auto pass = [&](const T* a, int64_t K, const T* W) {
    const T* w = W + g * K;
    int64_t k = 0;
    for (; k + VS <= K; k += VS) {
      const V av = V::loadu(a + k);
      for (int r = 0; r < R; ++r) acc[r] = at::vec::fmadd(av, V::loadu(w + r * K + k), acc[r]);
    }
    if (k < K) {
      const V av = V::loadu(a + k, K - k);  // zero-filled past K
      for (int r = 0; r < R; ++r) acc[r] = at::vec::fmadd(av, V::loadu(w + r * K + k, K - k), acc[r]);
    }
  };
  pass(a1, K1, W1);
  if (a2) pass(a2, K2, W2);
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float> && R == 8) {
    // the 8 horizontal sums at once: [sum acc0, ..., sum acc7]
    const __m256 s01 = _mm256_hadd_ps(acc[0], acc[1]), s23 = _mm256_hadd_ps(acc[2], acc[3]);
    const __m256 s45 = _mm256_hadd_ps(acc[4], acc[5]), s67 = _mm256_hadd_ps(acc[6], acc[7]);
    const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
    _mm256_storeu_ps(sums, _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                                         _mm256_permute2f128_ps(s0123, s4567, 0x31)));
    return;
  }
#endif
  for (int r = 0; r < R; ++r) sums[r] = at::vec::vec_reduce_all<T>([](const V& x, const V& y) { return x + y; }, acc[r]);
}

template <typename T>
void small_gemv(int64_t G, const T* a1, int64_t K1, const T* W1, const T* a2, int64_t K2, const T* W2, const T* b1,
                const T* b2, T* y) {
  constexpr int R = 8;
  T sums[R];
  auto finish = [&](int64_t g, int64_t cnt) {
    for (int64_t r = 0; r < cnt; ++r) y[g + r] = sums[r] + (b1 ? b1[g + r] : T(0)) + (b2 ? b2[g + r] : T(0));
  };
  int64_t g = 0;
  for (; g + R <= G; g += R) {
    gemv_block<T, R>(g, a1, K1, W1, a2, K2, W2, sums);
    finish(g, R);
  }
  for (; g < G; ++g) {
    gemv_block<T, 1>(g, a1, K1, W1, a2, K2, W2, sums);
    finish(g, 1);
  }
}

// g (N, G) = b_ih + b_hh (either may be null) + x W_ih^T (+ h W_hh^T unless h is null)
template <typename T>
void cell_gates_raw(int64_t N, int64_t G, int64_t I, int64_t Hh, const T* x, const T* h, const T* w_ih,
                    const T* w_hh, const T* bi, const T* bh, T* g) {
  if (N < kSmallRows) {
    for (int64_t n = 0; n < N; ++n)
      small_gemv<T>(G, x + n * I, I, w_ih, h ? h + n * Hh : nullptr, Hh, w_hh, bi, bh, g + n * G);
    return;
  }
  for (int64_t n = 0; n < N; ++n) {
    T* row = g + n * G;
    if (bi) copy_row(row, bi, G);
    else zero_row(row, G);
    if (bh) add_into(row, bh, G);
  }
  gemm_abt<T>(N, G, I, x, I, w_ih, I, T(1), g, G);
  if (h) gemm_abt<T>(N, G, Hh, h, Hh, w_hh, Hh, T(1), g, G);
}

// h (N, H), c (N, H) from x (N, I), h0, c0; h0 null means zeros (and c0 must then be zeros too or null)
template <typename T>
void lstm_cell_raw(int64_t N, int64_t I, int64_t H, const T* x, const T* h0, const T* c0, const T* w_ih,
                   const T* w_hh, const T* bi, const T* bh, T* g, T* hn, T* cn) {
  cell_gates_raw<T>(N, 4 * H, I, H, x, h0, w_ih, w_hh, bi, bh, g);
  auto rows = [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) lstm_row(g + n * 4 * H, (const T*)nullptr, c0 + n * H, cn + n * H, hn + n * H, H);
  };
  if (N == 1) rows(0, 1);
  else at::parallel_for(0, N, row_grain(4 * H), rows);
}

// scratch: gru_cell_scratch(N, H) elements; bh null means zeros
inline int64_t gru_cell_scratch(int64_t N, int64_t H) { return 3 * N * 3 * H + N * H + 3 * H; }

template <typename T>
void gru_cell_raw(int64_t N, int64_t I, int64_t H, const T* x, const T* h0, const T* w_ih, const T* w_hh,
                  const T* bi, const T* bh, T* scratch, T* out) {
  const int64_t G = 3 * H;
  T *xg = scratch, *hh = xg + N * G, *rz = hh + N * G, *hnp = rz + N * G, *zeros = hnp + N * H;
  if (!bh) {
    zero_row(zeros, G);
    bh = zeros;
  }
  // the input part with b_ih; the recurrent part separately (r gates it)
  cell_gates_raw<T>(N, G, I, H, x, (const T*)nullptr, w_ih, w_hh, bi, (const T*)nullptr, xg);
  cell_gates_raw<T>(N, G, H, H, h0, (const T*)nullptr, w_hh, w_hh, (const T*)nullptr, (const T*)nullptr, hh);
  auto rows = [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n)
      gru_row(xg + n * G, hh + n * G, bh, h0 + n * H, rz + n * G, hnp + n * H, out + n * H, H);
  };
  if (N == 1) rows(0, 1);
  else at::parallel_for(0, N, row_grain(G), rows);
}

template <typename T>
void rnn_cell_raw(int64_t N, int64_t I, int64_t H, const T* x, const T* h0, const T* w_ih, const T* w_hh,
                  const T* bi, const T* bh, int64_t act, T* out) {
  cell_gates_raw<T>(N, H, I, H, x, h0, w_ih, w_hh, bi, bh, out);
  for (int64_t n = 0; n < N; ++n) rnn_act_row(out + n * H, (const T*)nullptr, H, act);
}

template <typename T>
const T* opt_ptr(const std::optional<Tensor>& t) {
  return (t.has_value() && t->defined()) ? t->data_ptr<T>() : nullptr;
}

// a cell op's x, h and w_ih: 2-D, read before G is taken from them
void check_cell_dims(const Tensor& x, const Tensor& h, const Tensor& w_ih, const char* op) {
  TORCH_CHECK(x.dim() == 2 && h.dim() == 2 && x.size(0) == h.size(0), "rnnkit_fused::", op,
              ": x must be (N, H_in) and h (N, H), got ", x.sizes(), " and ", h.sizes());
  TORCH_CHECK(w_ih.dim() == 2, "rnnkit_fused::", op, ": w_ih must be (G, H_in), got ", w_ih.sizes());
}

void check_cell(const Tensor& x, const Tensor& h, const Tensor& w_ih, const Tensor& w_hh,
                const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, int64_t G, const char* op) {
  TORCH_CHECK(x.dim() == 2 && h.dim() == 2 && x.size(0) == h.size(0), "rnnkit_fused::", op,
              ": x must be (N, H_in) and h (N, H), got ", x.sizes(), " and ", h.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "rnnkit_fused::", op,
              ": float32 or float64 only, got ", x.scalar_type());
  const int64_t I = x.size(1), Hh = h.size(1);
  check_same(x, h, "h", {x.size(0), Hh});
  check_same(x, w_ih, "w_ih", {G, I});
  check_same(x, w_hh, "w_hh", {G, Hh});
  if (b_ih.has_value() && b_ih->defined()) check_same(x, *b_ih, "b_ih", {G});
  if (b_hh.has_value() && b_hh->defined()) check_same(x, *b_hh, "b_hh", {G});
}

std::optional<Tensor> opt_contiguous(const std::optional<Tensor>& t) {
  if (t.has_value() && t->defined()) return t->contiguous();
  return std::nullopt;
}

std::tuple<Tensor, Tensor> lstm_cell(const Tensor& x_, const Tensor& h_, const Tensor& c_, const Tensor& w_ih_,
                                     const Tensor& w_hh_, const std::optional<Tensor>& b_ih_,
                                     const std::optional<Tensor>& b_hh_) {
  Tensor x = x_.contiguous(), h = h_.contiguous(), c = c_.contiguous(), w_ih = w_ih_.contiguous(),
         w_hh = w_hh_.contiguous();
  auto b_ih = opt_contiguous(b_ih_), b_hh = opt_contiguous(b_hh_);
  check_cell_dims(x, h, w_ih, "lstm_cell");
  check_cell(x, h, w_ih, w_hh, b_ih, b_hh, w_ih.size(0), "lstm_cell");
  const int64_t N = x.size(0), I = x.size(1), H = h.size(1);
  TORCH_CHECK(w_ih.size(0) == 4 * H, "rnnkit_fused::lstm_cell: w_ih must be (4H, H_in), got ", w_ih.sizes());
  check_same(x, c, "c", {N, H});
  Tensor gates = at::empty({N, 4 * H}, x.options());
  Tensor h_new = at::empty({N, H}, x.options()), c_new = at::empty({N, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lstm_cell", [&] {
    using T = scalar_t;
    lstm_cell_raw<T>(N, I, H, x.data_ptr<T>(), h.data_ptr<T>(), c.data_ptr<T>(), w_ih.data_ptr<T>(),
                     w_hh.data_ptr<T>(), opt_ptr<T>(b_ih), opt_ptr<T>(b_hh), gates.data_ptr<T>(),
                     h_new.data_ptr<T>(), c_new.data_ptr<T>());
  });
  return {h_new, c_new};
}

Tensor gru_cell(const Tensor& x_, const Tensor& h_, const Tensor& w_ih_, const Tensor& w_hh_,
                const std::optional<Tensor>& b_ih_, const std::optional<Tensor>& b_hh_) {
  Tensor x = x_.contiguous(), h = h_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  auto b_ih = opt_contiguous(b_ih_), b_hh = opt_contiguous(b_hh_);
  check_cell_dims(x, h, w_ih, "gru_cell");
  check_cell(x, h, w_ih, w_hh, b_ih, b_hh, w_ih.size(0), "gru_cell");
  const int64_t N = x.size(0), I = x.size(1), H = h.size(1);
  TORCH_CHECK(w_ih.size(0) == 3 * H, "rnnkit_fused::gru_cell: w_ih must be (3H, H_in), got ", w_ih.sizes());
  Tensor scratch = at::empty({gru_cell_scratch(N, H)}, x.options());
  Tensor h_new = at::empty({N, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gru_cell", [&] {
    using T = scalar_t;
    gru_cell_raw<T>(N, I, H, x.data_ptr<T>(), h.data_ptr<T>(), w_ih.data_ptr<T>(), w_hh.data_ptr<T>(),
                    opt_ptr<T>(b_ih), opt_ptr<T>(b_hh), scratch.data_ptr<T>(), h_new.data_ptr<T>());
  });
  return h_new;
}

Tensor rnn_cell(const Tensor& x_, const Tensor& h_, const Tensor& w_ih_, const Tensor& w_hh_,
                const std::optional<Tensor>& b_ih_, const std::optional<Tensor>& b_hh_, int64_t act) {
  TORCH_CHECK(act == 0 || act == 1, "rnnkit_fused::rnn_cell: act must be 0 (tanh) or 1 (relu), got ", act);
  Tensor x = x_.contiguous(), h = h_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  auto b_ih = opt_contiguous(b_ih_), b_hh = opt_contiguous(b_hh_);
  check_cell_dims(x, h, w_ih, "rnn_cell");
  check_cell(x, h, w_ih, w_hh, b_ih, b_hh, h.size(1), "rnn_cell");
  const int64_t N = x.size(0), I = x.size(1), H = h.size(1);
  Tensor out = at::empty({N, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnn_cell", [&] {
    using T = scalar_t;
    rnn_cell_raw<T>(N, I, H, x.data_ptr<T>(), h.data_ptr<T>(), w_ih.data_ptr<T>(), w_hh.data_ptr<T>(),
                    opt_ptr<T>(b_ih), opt_ptr<T>(b_hh), act, out.data_ptr<T>());
  });
  return out;
}

// Which instruction set the gate math was compiled for (reported by `rnnkit info`).
std::string capability() {
#if defined(CPU_CAPABILITY_AVX2)
  return "AVX2";
#else
  return "DEFAULT";
#endif
}

int64_t uses_blas() { return (sgemm_ != nullptr && dgemm_ != nullptr) ? 1 : 0; }

// ================================================================ ConvLSTM / ConvGRU
//
// The gated part of rnnkit.zoo.conv's ConvLSTM and ConvGRU (1 to 3 spatial dims).
// Layout: xp (L, N, G, *S), the input convolution of every step done by the
// caller (ATen, one convolution over L * N); G = 4 hidden (LSTM, b_ih + b_hh in
// xp) or 3 hidden (GRU, b_ih only); h, c (N, hidden, *S); w_hh (G, hidden, *k).
// Per step: the recurrent convolution U * h_{t-1} through ATen ('same' padding,
// stride 1, dilation 1, exactly rnnkit.zoo.conv.conv_same: an even kernel pads one
// more after than before), then ONE vectorized pass for gates and state update.
// For one row n the gate blocks are contiguous runs of HP = hidden * prod(S)
// elements, so the row math is the dense kernels' with H = HP; the pass is split
// into (row, block of HP) tasks for at::parallel_for.
// Backward: per step (reverse) the fused gate gradients, then
// at::convolution_backward for the part of dh_{t-1} through U; the gradient of
// w_hh (and the GRU's b_hh) is ONE convolution_backward over all L * N steps
// after the loop. Lengths as everywhere: row n is live for t < lengths[n]; steps
// where every row is held skip the convolution.

// The multiply-adds of one step's recurrent convolution: N rows, each (G x hid x kernel) per output position.
inline int64_t conv_step_macs(int64_t N, const Tensor& w_hh, int64_t P) { return N * w_hh.numel() * P; }
inline bool serial_conv(int64_t macs) { return macs < kSerialConvMacs; }

struct ConvSame {
  int64_t nd;
  std::vector<int64_t> before, flat_pad, ones, zeros;
  bool symmetric = true;

  explicit ConvSame(const Tensor& w) : nd(w.dim() - 2), ones(w.dim() - 2, 1), zeros(w.dim() - 2, 0) {
    for (int64_t d = 0; d < nd; ++d) {
      const int64_t total = w.size(2 + d) - 1;
      before.push_back(total / 2);
      if (total % 2) symmetric = false;
    }
    for (int64_t d = nd - 1; d >= 0; --d) {  // constant_pad_nd lists the last dim first
      const int64_t total = w.size(2 + d) - 1;
      flat_pad.push_back(total / 2);
      flat_pad.push_back(total - total / 2);
    }
  }

  // U * h (+ b): (B, hidden, *S) -> (B, G, *S)
  Tensor conv(const Tensor& h, const Tensor& w, const std::optional<Tensor>& b) const {
    if (symmetric) return at::convolution(h, w, b, ones, before, ones, false, zeros, 1).contiguous();
    return at::convolution(at::constant_pad_nd(h, flat_pad, 0), w, b, ones, zeros, ones, false, zeros, 1).contiguous();
  }

  // The input as the convolution sees it (padded for even kernels).
  Tensor padded(const Tensor& h) const { return symmetric ? h : at::constant_pad_nd(h, flat_pad, 0); }

  // d(U * h)/dh applied to g (B, G, *S): (B, hidden, *S). `like` has the
  // convolution's input shape (padded for even kernels); its values are not read
  // by the input gradient.
  Tensor grad_input(const Tensor& g, const Tensor& like, const Tensor& w) const {
    Tensor gi = std::get<0>(at::convolution_backward(g, like, w, std::nullopt, ones, symmetric ? before : zeros, ones,
                                                     false, zeros, 1, {true, false, false}));
    if (!symmetric)
      for (int64_t d = 0; d < nd; ++d) gi = gi.narrow(2 + d, before[d], g.size(2 + d));
    return gi;
  }

  // (grad w, grad b) of sum over B of g * (U * input + b); input unpadded (B, hidden, *S).
  std::tuple<Tensor, Tensor> grad_weight(const Tensor& g, const Tensor& input, const Tensor& w, bool bias) const {
    if (g.size(0) == 0) return {at::zeros_like(w), at::zeros({w.size(0)}, w.options())};
    // one convolution_backward over all L * N steps: g (L * N, G, *S), w (G, hid, *k)
    const OneThread one(serial_once(g.numel() / std::max<int64_t>(w.size(0), 1) * w.numel()));
    std::vector<int64_t> bias_sizes{w.size(0)};
    auto r = at::convolution_backward(g, padded(input), w, bias ? at::OptionalIntArrayRef(bias_sizes) : std::nullopt,
                                      ones, symmetric ? before : zeros, ones, false, zeros, 1, {false, true, bias});
    return {std::get<1>(r), bias ? std::get<2>(r) : Tensor()};
  }
};

// Checks xp (L, N, gates * hidden, *S) against w_hh (gates * hidden, hidden, *k);
// returns hidden.
int64_t check_conv_seq(const Tensor& xp, const Tensor& w_hh, int64_t gates, const char* op) {
  TORCH_CHECK(xp.dim() >= 4 && xp.dim() <= 6, "rnnkit_fused::", op,
              ": xp must be (L, N, G, *S) with 1 to 3 spatial dims, got ", xp.sizes());
  TORCH_CHECK(xp.scalar_type() == at::kFloat || xp.scalar_type() == at::kDouble, "rnnkit_fused::", op,
              ": float32 or float64 only, got ", xp.scalar_type());
  const int64_t nd = xp.dim() - 3;
  TORCH_CHECK(w_hh.dim() == nd + 2 && w_hh.size(0) == gates * w_hh.size(1), "rnnkit_fused::", op, ": w_hh must be (",
              gates, "*hidden, hidden, *kernel) with ", nd, " kernel dims (as xp has spatial dims), got ",
              w_hh.sizes());
  TORCH_CHECK(w_hh.scalar_type() == xp.scalar_type(), "rnnkit_fused: w_hh has dtype ", w_hh.scalar_type(),
              ", expected ", xp.scalar_type());
  TORCH_CHECK(xp.size(2) == w_hh.size(0), "rnnkit_fused::", op, ": xp's channel axis (2) must be G = ", gates,
              "*hidden = ", w_hh.size(0), ", got ", xp.size(2));
  return w_hh.size(1);
}

// (prefix..., sizes of t from axis `from` on)
std::vector<int64_t> conv_shape(std::initializer_list<int64_t> prefix, const Tensor& t, int64_t from) {
  std::vector<int64_t> s(prefix);
  for (int64_t d = from; d < t.dim(); ++d) s.push_back(t.size(d));
  return s;
}

inline int64_t max_length(const int64_t* len, int64_t N, int64_t L) {
  if (!len) return L;
  int64_t m = 0;
  for (int64_t n = 0; n < N; ++n) m = std::max(m, len[n]);
  return std::min(m, L);
}

// f(n, j0, j1) over every row n and block [j0, j1) of its HP elements, in parallel
// when there is enough work (about 4k elements per chunk).
template <typename F>
void for_row_blocks(int64_t N, int64_t HP, const F& f) {
  constexpr int64_t kBlock = 2048;  // a multiple of every vector width
  if (N == 0 || HP == 0) return;
  const int64_t nb = (HP + kBlock - 1) / kBlock;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::min(kBlock, HP));
  at::parallel_for(0, N * nb, grain, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const int64_t n = k / nb, j0 = (k % nb) * kBlock;
      f(n, j0, std::min(HP, j0 + kBlock));
    }
  });
}

// One ConvLSTM row, elements [j0, j1) of each gate block. a = xp + U * h_{t-1} (x + hh);
// i = σ(a_i + w_ci c_{t-1}), f = σ(a_f + w_cf c_{t-1}), g = tanh(a_g), c_t = f c_{t-1} + i g,
// o = σ(a_o + w_co c_t), h_t = o tanh(c_t); without peepholes (wci null) those terms are absent.
// Writes the activations (i, f, g, o) into gs, c_t and h_t.
template <typename T>
inline void conv_lstm_row(const T* x, const T* hh, const T* wci, const T* wcf, const T* wco, const T* cp, T* gs, T* c,
                          T* h, int64_t HP, int64_t j0, int64_t j1) {
  constexpr int64_t VS = Vec<T>::size();
  for (int64_t j = j0; j < j1; j += VS) {
    const int64_t cnt = std::min(VS, j1 - j);
    const Vec<T> cpv = Vec<T>::loadu(cp + j, cnt);
    Vec<T> ai = Vec<T>::loadu(x + j, cnt) + Vec<T>::loadu(hh + j, cnt);
    Vec<T> af = Vec<T>::loadu(x + HP + j, cnt) + Vec<T>::loadu(hh + HP + j, cnt);
    Vec<T> ag = Vec<T>::loadu(x + 2 * HP + j, cnt) + Vec<T>::loadu(hh + 2 * HP + j, cnt);
    Vec<T> ao = Vec<T>::loadu(x + 3 * HP + j, cnt) + Vec<T>::loadu(hh + 3 * HP + j, cnt);
    if (wci) {
      ai = ai + Vec<T>::loadu(wci + j, cnt) * cpv;
      af = af + Vec<T>::loadu(wcf + j, cnt) * cpv;
    }
    const Vec<T> i = vsigmoid(ai), f = vsigmoid(af), g = vtanh(ag);
    const Vec<T> cn = f * cpv + i * g;
    if (wco) ao = ao + Vec<T>::loadu(wco + j, cnt) * cn;
    const Vec<T> o = vsigmoid(ao);
    i.store(gs + j, cnt);
    f.store(gs + HP + j, cnt);
    g.store(gs + 2 * HP + j, cnt);
    o.store(gs + 3 * HP + j, cnt);
    cn.store(c + j, cnt);
    (o * vtanh(cn)).store(h + j, cnt);
  }
}

// dm: dL/dh_t; dc: dL/dc_t on entry, dL/dc_{t-1} on exit; dg: pre-activation gradients (i, f, g, o).
template <typename T>
inline void conv_lstm_grad_row(const T* gs, const T* wci, const T* wcf, const T* wco, const T* cp, const T* c,
                               const T* dm, T* dc, T* dg, int64_t HP, int64_t j0, int64_t j1) {
  constexpr int64_t VS = Vec<T>::size();
  const Vec<T> one(T(1));
  for (int64_t j = j0; j < j1; j += VS) {
    const int64_t cnt = std::min(VS, j1 - j);
    const Vec<T> i = Vec<T>::loadu(gs + j, cnt), f = Vec<T>::loadu(gs + HP + j, cnt);
    const Vec<T> g = Vec<T>::loadu(gs + 2 * HP + j, cnt), o = Vec<T>::loadu(gs + 3 * HP + j, cnt);
    const Vec<T> tc = vtanh(Vec<T>::loadu(c + j, cnt)), cpv = Vec<T>::loadu(cp + j, cnt);
    const Vec<T> d = Vec<T>::loadu(dm + j, cnt);
    const Vec<T> dop = d * tc * o * (one - o);
    Vec<T> dct = Vec<T>::loadu(dc + j, cnt) + d * o * (one - tc * tc);
    if (wco) dct = dct + dop * Vec<T>::loadu(wco + j, cnt);
    const Vec<T> dip = dct * g * i * (one - i);
    const Vec<T> dfp = dct * cpv * f * (one - f);
    dip.store(dg + j, cnt);
    dfp.store(dg + HP + j, cnt);
    (dct * i * (one - g * g)).store(dg + 2 * HP + j, cnt);
    dop.store(dg + 3 * HP + j, cnt);
    Vec<T> dcp = dct * f;
    if (wci) dcp = dcp + dip * Vec<T>::loadu(wci + j, cnt) + dfp * Vec<T>::loadu(wcf + j, cnt);
    dcp.store(dc + j, cnt);
  }
}

// One ConvGRU row: r = σ(x_r + hh_r), z = σ(x_z + hh_z), n = tanh(x_n + r hh_n), h_t = n + z (h_{t-1} - n);
// hh = U * h_{t-1} + b_hh. Saves (r, z, n) and hh_n for the backward.
template <typename T>
inline void conv_gru_row(const T* x, const T* hh, const T* hp, T* rzn, T* hn, T* h, int64_t HP, int64_t j0,
                         int64_t j1) {
  constexpr int64_t VS = Vec<T>::size();
  for (int64_t j = j0; j < j1; j += VS) {
    const int64_t cnt = std::min(VS, j1 - j);
    const Vec<T> r = vsigmoid(Vec<T>::loadu(x + j, cnt) + Vec<T>::loadu(hh + j, cnt));
    const Vec<T> z = vsigmoid(Vec<T>::loadu(x + HP + j, cnt) + Vec<T>::loadu(hh + HP + j, cnt));
    const Vec<T> hnv = Vec<T>::loadu(hh + 2 * HP + j, cnt);
    const Vec<T> nn = vtanh(Vec<T>::loadu(x + 2 * HP + j, cnt) + r * hnv);
    r.store(rzn + j, cnt);
    z.store(rzn + HP + j, cnt);
    nn.store(rzn + 2 * HP + j, cnt);
    hnv.store(hn + j, cnt);
    (nn + z * (Vec<T>::loadu(hp + j, cnt) - nn)).store(h + j, cnt);
  }
}

// dx: gradient of xp (r, z, n pre-activations); dhh: gradient of U * h_{t-1} + b_hh;
// dnext: the direct part of dL/dh_{t-1} (z dh), the convolution's part is added by the caller.
template <typename T>
inline void conv_gru_grad_row(const T* rzn, const T* hn, const T* hp, const T* dh, T* dx, T* dhh, T* dnext, int64_t HP,
                              int64_t j0, int64_t j1) {
  constexpr int64_t VS = Vec<T>::size();
  const Vec<T> one(T(1));
  for (int64_t j = j0; j < j1; j += VS) {
    const int64_t cnt = std::min(VS, j1 - j);
    const Vec<T> r = Vec<T>::loadu(rzn + j, cnt), z = Vec<T>::loadu(rzn + HP + j, cnt);
    const Vec<T> nn = Vec<T>::loadu(rzn + 2 * HP + j, cnt), d = Vec<T>::loadu(dh + j, cnt);
    const Vec<T> dn_pre = d * (one - z) * (one - nn * nn);
    const Vec<T> dz_pre = d * (Vec<T>::loadu(hp + j, cnt) - nn) * z * (one - z);
    const Vec<T> dr_pre = dn_pre * Vec<T>::loadu(hn + j, cnt) * r * (one - r);
    dr_pre.store(dx + j, cnt);
    dz_pre.store(dx + HP + j, cnt);
    dn_pre.store(dx + 2 * HP + j, cnt);
    dr_pre.store(dhh + j, cnt);
    dz_pre.store(dhh + HP + j, cnt);
    (dn_pre * r).store(dhh + 2 * HP + j, cnt);
    (d * z).store(dnext + j, cnt);
  }
}

// dst += src on this thread (an ATen add_ of a state-sized tensor opens a thread-pool
// region per step, which costs more than the add on a busy machine)
inline void add_grad(Tensor& dst, const Tensor& src) {
  if (!src.is_contiguous()) {
    dst.add_(src);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(dst.scalar_type(), "add_grad",
                             [&] { add_into(dst.data_ptr<scalar_t>(), src.data_ptr<scalar_t>(), dst.numel()); });
}

// zero elements [j0, j1) of each of `blocks` gate blocks of one row
template <typename T>
inline void zero_blocks(T* row, int64_t blocks, int64_t HP, int64_t j0, int64_t j1) {
  for (int64_t k = 0; k < blocks; ++k) zero_row(row + k * HP + j0, j1 - j0);
}

Tensor optional_peephole(const std::optional<Tensor>& w, const Tensor& xp, at::IntArrayRef shape, const char* what) {
  if (!w.has_value() || !w->defined()) return Tensor();
  Tensor t = w->contiguous();
  check_same(xp, t, what, shape);
  return t;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> conv_lstm_fwd(
    const Tensor& xp_, const Tensor& w_hh_, const std::optional<Tensor>& w_ci_, const std::optional<Tensor>& w_cf_,
    const std::optional<Tensor>& w_co_, const Tensor& h0_, const Tensor& c0_, const std::optional<Tensor>& lengths) {
  at::NoGradGuard no_grad;
  const int64_t hid = check_conv_seq(xp_, w_hh_, 4, "conv_lstm_fwd");
  const int64_t L = xp_.size(0), N = xp_.size(1), G = 4 * hid;
  Tensor xp = xp_.contiguous(), w_hh = w_hh_.contiguous(), h0 = h0_.contiguous(), c0 = c0_.contiguous();
  const auto state_shape = conv_shape({N, hid}, xp, 3), peep_shape = conv_shape({hid}, xp, 3);
  check_same(xp, h0, "h0", state_shape);
  check_same(xp, c0, "c0", state_shape);
  const int n_peep = (w_ci_.has_value() && w_ci_->defined()) + (w_cf_.has_value() && w_cf_->defined()) +
                     (w_co_.has_value() && w_co_->defined());
  TORCH_CHECK(n_peep == 0 || n_peep == 3, "rnnkit_fused::conv_lstm_fwd: pass all three peepholes w_ci, w_cf, w_co "
              "or none, got ", n_peep);
  Tensor w_ci = optional_peephole(w_ci_, xp, peep_shape, "w_ci"), w_cf = optional_peephole(w_cf_, xp, peep_shape, "w_cf"),
         w_co = optional_peephole(w_co_, xp, peep_shape, "w_co");
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  const ConvSame same(w_hh);
  const int64_t HP = h0.numel() / std::max<int64_t>(N, 1), P = HP / std::max<int64_t>(hid, 1);
  Tensor out = at::empty(conv_shape({L, N, hid}, xp, 3), xp.options());
  Tensor cs = at::empty(out.sizes(), xp.options());
  Tensor gates = at::empty(xp.sizes(), xp.options());
  const int64_t min_len = min_length(len, N, L), max_len = max_length(len, N, L);
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "conv_lstm_fwd", [&] {
    using T = scalar_t;
    const OneThread one_step(serial_conv(conv_step_macs(N, w_hh, P)));  // the time loop's convolutions
    const T *wci = w_ci.defined() ? w_ci.data_ptr<T>() : nullptr, *wcf = w_cf.defined() ? w_cf.data_ptr<T>() : nullptr,
            *wco = w_co.defined() ? w_co.data_ptr<T>() : nullptr;
    for (int64_t t = 0; t < L; ++t) {
      const Tensor hp_t = t == 0 ? h0 : out[t - 1], cp_t = t == 0 ? c0 : cs[t - 1];
      if (t >= max_len) {  // every row is past its length: hold
        out[t].copy_(hp_t);
        cs[t].copy_(cp_t);
        gates[t].zero_();
        continue;
      }
      const Tensor hh = same.conv(hp_t, w_hh, std::nullopt);
      const T *x = xp[t].data_ptr<T>(), *hhp = hh.data_ptr<T>(), *hp = hp_t.data_ptr<T>(), *cp = cp_t.data_ptr<T>();
      T *gt = gates[t].data_ptr<T>(), *ct = cs[t].data_ptr<T>(), *ot = out[t].data_ptr<T>();
      const bool check = len && t >= min_len;
      for_row_blocks(N, HP, [&](int64_t n, int64_t j0, int64_t j1) {
        const int64_t r = n * HP, rg = n * G * P;
        if (check && t >= len[n]) {  // held: the saved gates are unused, zeroed to stay deterministic
          copy_row(ct + r + j0, cp + r + j0, j1 - j0);
          copy_row(ot + r + j0, hp + r + j0, j1 - j0);
          zero_blocks(gt + rg, 4, HP, j0, j1);
        } else {
          conv_lstm_row(x + rg, hhp + rg, wci, wcf, wco, cp + r, gt + rg, ct + r, ot + r, HP, j0, j1);
        }
      });
    }
  });
  Tensor h_n = L > 0 ? out[L - 1].clone() : h0.clone();
  Tensor c_n = L > 0 ? cs[L - 1].clone() : c0.clone();
  return {out, h_n, c_n, gates, cs};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> conv_lstm_bwd(
    const Tensor& grad_out_, const Tensor& grad_hn_, const Tensor& grad_cn_, const Tensor& w_hh_,
    const std::optional<Tensor>& w_ci_, const std::optional<Tensor>& w_cf_, const std::optional<Tensor>& w_co_,
    const Tensor& h0_, const Tensor& c0_, const std::optional<Tensor>& lengths, const Tensor& out_,
    const Tensor& gates_, const Tensor& cs_) {
  at::NoGradGuard no_grad;
  const int64_t hid = check_conv_seq(gates_, w_hh_, 4, "conv_lstm_bwd");
  const int64_t L = gates_.size(0), N = gates_.size(1), G = 4 * hid;
  Tensor grad_out = grad_out_.contiguous(), grad_hn = grad_hn_.contiguous(), grad_cn = grad_cn_.contiguous();
  Tensor w_hh = w_hh_.contiguous(), h0 = h0_.contiguous(), c0 = c0_.contiguous(), out = out_.contiguous();
  Tensor gates = gates_.contiguous(), cs = cs_.contiguous();
  const auto state_shape = conv_shape({N, hid}, gates, 3), peep_shape = conv_shape({hid}, gates, 3);
  const auto seq_shape = conv_shape({L, N, hid}, gates, 3);
  check_same(gates, out, "out", seq_shape);
  check_same(gates, cs, "cs", seq_shape);
  check_same(gates, grad_out, "grad_out", seq_shape);
  check_same(gates, grad_hn, "grad_h_n", state_shape);
  check_same(gates, grad_cn, "grad_c_n", state_shape);
  check_same(gates, h0, "h0", state_shape);
  check_same(gates, c0, "c0", state_shape);
  Tensor w_ci = optional_peephole(w_ci_, gates, peep_shape, "w_ci"),
         w_cf = optional_peephole(w_cf_, gates, peep_shape, "w_cf"),
         w_co = optional_peephole(w_co_, gates, peep_shape, "w_co");
  TORCH_CHECK(w_ci.defined() == w_cf.defined() && w_cf.defined() == w_co.defined(),
              "rnnkit_fused::conv_lstm_bwd: pass all three peepholes w_ci, w_cf, w_co or none");
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  const ConvSame same(w_hh);
  const int64_t HP = h0.numel() / std::max<int64_t>(N, 1), P = HP / std::max<int64_t>(hid, 1);
  Tensor dG = at::empty(gates.sizes(), gates.options());
  Tensor dh = grad_hn.clone(), dn = at::empty(state_shape, gates.options()), dc = grad_cn.clone();
  const Tensor like = same.symmetric ? Tensor() : at::zeros_like(same.padded(h0));
  const int64_t min_len = min_length(len, N, L), max_len = max_length(len, N, L);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "conv_lstm_bwd", [&] {
    using T = scalar_t;
    const OneThread one_step(serial_conv(conv_step_macs(N, w_hh, P)));  // the time loop's convolutions
    const T *wci = w_ci.defined() ? w_ci.data_ptr<T>() : nullptr, *wcf = w_cf.defined() ? w_cf.data_ptr<T>() : nullptr,
            *wco = w_co.defined() ? w_co.data_ptr<T>() : nullptr;
    for (int64_t t = L - 1; t >= 0; --t) {
      add_into(dh.data_ptr<T>(), grad_out[t].data_ptr<T>(), N * HP);
      if (t >= max_len) {  // every row held: dh and dc pass through
        dG[t].zero_();
        continue;
      }
      const Tensor hp_t = t == 0 ? h0 : out[t - 1];
      const T *cp = (t == 0 ? c0 : cs[t - 1]).data_ptr<T>(), *gt = gates[t].data_ptr<T>(), *ct = cs[t].data_ptr<T>();
      T *dgt = dG[t].data_ptr<T>(), *dhp = dh.data_ptr<T>(), *dnp = dn.data_ptr<T>(), *dcp = dc.data_ptr<T>();
      const bool check = len && t >= min_len;
      for_row_blocks(N, HP, [&](int64_t n, int64_t j0, int64_t j1) {
        const int64_t r = n * HP, rg = n * G * P;
        if (check && t >= len[n]) {  // held: h and c pass through unchanged
          zero_blocks(dgt + rg, 4, HP, j0, j1);
          copy_row(dnp + r + j0, dhp + r + j0, j1 - j0);
        } else {
          conv_lstm_grad_row(gt + rg, wci, wcf, wco, cp + r, ct + r, dhp + r, dcp + r, dgt + rg, HP, j0, j1);
          zero_row(dnp + r + j0, j1 - j0);
        }
      });
      add_grad(dn, same.grad_input(dG[t], same.symmetric ? hp_t : like, w_hh));
      if (check) pass_held_rows(len, t, N, HP, (const T*)dhp, dnp);
      std::swap(dh, dn);
    }
  });
  Tensor grad_w = std::get<0>(same.grad_weight(dG.reshape(conv_shape({L * N, G}, gates, 3)),
                                               previous_states(h0, out, len).reshape(conv_shape({L * N, hid}, gates, 3)),
                                               w_hh, false));
  Tensor grad_ci = gates.new_empty({0}), grad_cf = gates.new_empty({0}), grad_co = gates.new_empty({0});
  if (w_ci.defined()) {
    // sum over steps and rows of the gate gradient times the cell state it saw (held steps add zero)
    const Tensor c_prev = previous_states(c0, cs, len);
    const std::array<int64_t, 2> steps_rows{0, 1};
    const OneThread one(serial_elems(cs.numel()));
    grad_ci = (dG.narrow(2, 0, hid) * c_prev).sum(steps_rows);
    grad_cf = (dG.narrow(2, hid, hid) * c_prev).sum(steps_rows);
    grad_co = (dG.narrow(2, 3 * hid, hid) * zero_held(cs, len, false)).sum(steps_rows);
  }
  return {dG, grad_w, grad_ci, grad_cf, grad_co, dh, dc};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> conv_gru_fwd(const Tensor& xp_, const Tensor& w_hh_,
                                                        const std::optional<Tensor>& b_hh_, const Tensor& h0_,
                                                        const std::optional<Tensor>& lengths) {
  at::NoGradGuard no_grad;
  const int64_t hid = check_conv_seq(xp_, w_hh_, 3, "conv_gru_fwd");
  const int64_t L = xp_.size(0), N = xp_.size(1), G = 3 * hid;
  Tensor xp = xp_.contiguous(), w_hh = w_hh_.contiguous(), h0 = h0_.contiguous();
  std::optional<Tensor> b_hh;
  if (b_hh_.has_value() && b_hh_->defined()) {
    b_hh = b_hh_->contiguous();
    check_same(xp, *b_hh, "b_hh", {G});
  }
  check_same(xp, h0, "h0", conv_shape({N, hid}, xp, 3));
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  const ConvSame same(w_hh);
  const int64_t HP = h0.numel() / std::max<int64_t>(N, 1), P = HP / std::max<int64_t>(hid, 1);
  Tensor out = at::empty(conv_shape({L, N, hid}, xp, 3), xp.options());
  Tensor rzn = at::empty(xp.sizes(), xp.options());
  Tensor hns = at::empty(out.sizes(), xp.options());
  const int64_t min_len = min_length(len, N, L), max_len = max_length(len, N, L);
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "conv_gru_fwd", [&] {
    using T = scalar_t;
    const OneThread one_step(serial_conv(conv_step_macs(N, w_hh, P)));  // the time loop's convolutions
    for (int64_t t = 0; t < L; ++t) {
      const Tensor hp_t = t == 0 ? h0 : out[t - 1];
      if (t >= max_len) {
        out[t].copy_(hp_t);
        rzn[t].zero_();
        hns[t].zero_();
        continue;
      }
      const Tensor hh = same.conv(hp_t, w_hh, b_hh);
      const T *x = xp[t].data_ptr<T>(), *hhp = hh.data_ptr<T>(), *hp = hp_t.data_ptr<T>();
      T *rzt = rzn[t].data_ptr<T>(), *hnt = hns[t].data_ptr<T>(), *ot = out[t].data_ptr<T>();
      const bool check = len && t >= min_len;
      for_row_blocks(N, HP, [&](int64_t n, int64_t j0, int64_t j1) {
        const int64_t r = n * HP, rg = n * G * P;
        if (check && t >= len[n]) {  // held: the saved gates are unused, zeroed to stay deterministic
          copy_row(ot + r + j0, hp + r + j0, j1 - j0);
          zero_blocks(rzt + rg, 3, HP, j0, j1);
          zero_row(hnt + r + j0, j1 - j0);
        } else {
          conv_gru_row(x + rg, hhp + rg, hp + r, rzt + rg, hnt + r, ot + r, HP, j0, j1);
        }
      });
    }
  });
  Tensor h_n = L > 0 ? out[L - 1].clone() : h0.clone();
  return {out, h_n, rzn, hns};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> conv_gru_bwd(const Tensor& grad_out_, const Tensor& grad_hn_,
                                                        const Tensor& w_hh_, const Tensor& h0_,
                                                        const std::optional<Tensor>& lengths, const Tensor& out_,
                                                        const Tensor& rzn_, const Tensor& hns_) {
  at::NoGradGuard no_grad;
  const int64_t hid = check_conv_seq(rzn_, w_hh_, 3, "conv_gru_bwd");
  const int64_t L = rzn_.size(0), N = rzn_.size(1), G = 3 * hid;
  Tensor grad_out = grad_out_.contiguous(), grad_hn = grad_hn_.contiguous(), w_hh = w_hh_.contiguous();
  Tensor h0 = h0_.contiguous(), out = out_.contiguous(), rzn = rzn_.contiguous(), hns = hns_.contiguous();
  const auto state_shape = conv_shape({N, hid}, rzn, 3), seq_shape = conv_shape({L, N, hid}, rzn, 3);
  check_same(rzn, out, "out", seq_shape);
  check_same(rzn, hns, "hn", seq_shape);
  check_same(rzn, grad_out, "grad_out", seq_shape);
  check_same(rzn, grad_hn, "grad_h_n", state_shape);
  check_same(rzn, h0, "h0", state_shape);
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  const ConvSame same(w_hh);
  const int64_t HP = h0.numel() / std::max<int64_t>(N, 1), P = HP / std::max<int64_t>(hid, 1);
  Tensor dxp = at::empty(rzn.sizes(), rzn.options()), dhh = at::empty(rzn.sizes(), rzn.options());
  Tensor dh = grad_hn.clone(), dn = at::empty(state_shape, rzn.options());
  const Tensor like = same.symmetric ? Tensor() : at::zeros_like(same.padded(h0));
  const int64_t min_len = min_length(len, N, L), max_len = max_length(len, N, L);
  AT_DISPATCH_FLOATING_TYPES(rzn.scalar_type(), "conv_gru_bwd", [&] {
    using T = scalar_t;
    const OneThread one_step(serial_conv(conv_step_macs(N, w_hh, P)));  // the time loop's convolutions
    for (int64_t t = L - 1; t >= 0; --t) {
      add_into(dh.data_ptr<T>(), grad_out[t].data_ptr<T>(), N * HP);
      if (t >= max_len) {  // every row held: dh passes through
        dxp[t].zero_();
        dhh[t].zero_();
        continue;
      }
      const Tensor hp_t = t == 0 ? h0 : out[t - 1];
      const T *hp = hp_t.data_ptr<T>(), *rzt = rzn[t].data_ptr<T>(), *hnt = hns[t].data_ptr<T>();
      T *dxt = dxp[t].data_ptr<T>(), *dht = dhh[t].data_ptr<T>(), *dhp = dh.data_ptr<T>(), *dnp = dn.data_ptr<T>();
      const bool check = len && t >= min_len;
      for_row_blocks(N, HP, [&](int64_t n, int64_t j0, int64_t j1) {
        const int64_t r = n * HP, rg = n * G * P;
        if (check && t >= len[n]) {
          zero_blocks(dxt + rg, 3, HP, j0, j1);
          zero_blocks(dht + rg, 3, HP, j0, j1);
          copy_row(dnp + r + j0, dhp + r + j0, j1 - j0);
        } else {
          conv_gru_grad_row(rzt + rg, hnt + r, hp + r, dhp + r, dxt + rg, dht + rg, dnp + r, HP, j0, j1);
        }
      });
      add_grad(dn, same.grad_input(dhh[t], same.symmetric ? hp_t : like, w_hh));
      if (check) pass_held_rows(len, t, N, HP, (const T*)dhp, dnp);
      std::swap(dh, dn);
    }
  });
  auto [grad_w, grad_b] = same.grad_weight(dhh.reshape(conv_shape({L * N, G}, rzn, 3)),
                                           previous_states(h0, out, len).reshape(conv_shape({L * N, hid}, rzn, 3)), w_hh,
                                           true);
  return {dxp, grad_w, grad_b, dh};
}

}  // namespace
}  // namespace rnnkit_fused

// ================================================================ bfloat16
//
// bf16 at the op boundary (xp, the weights, the states, out, and the gradients of
// all of them), float32 inside:
//   * the recurrent product is bf16 x bf16 -> float32: MKL's cblas_gemm_bf16bf16f32
//     (AMX / avx512_bf16 where the CPU has them); with fewer than kSmallRows rows,
//     without that symbol, or with RNNKIT_FUSED_BF16_GEMM=0, a float32 product on a
//     float32 copy of the weight made once per sequence (a product of two bf16
//     values is exact in float32, so the two differ only in summation order);
//   * the gate math is the float32 row functions above, on rows converted from bf16;
//   * the LSTM cell state and the saved gate activations (the backward's inputs)
//     stay float32 from step to step; h is rounded to bf16 once per step (it is the
//     output and the next step's GEMM operand);
//   * backward: float32 gate gradients and state gradients, rounded to bf16 for the
//     recurrent GEMM and for the weight gradients (one ATen bf16 GEMM over all steps).
// The float32 / float64 kernels above are untouched: the *_entry functions at the
// end of this section send bf16 here and everything else there.

extern "C" {
// MKL: C (f32) = alpha op(A) op(B) + beta C, A and B bf16. Weak like the BLAS above.
void cblas_gemm_bf16bf16f32(int, int, int, int, int, int, float, const c10::BFloat16*, int, const c10::BFloat16*, int,
                            float, float*, int) __attribute__((weak));
}

namespace rnnkit_fused {
namespace {

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

void check_seq_bf16(const Tensor& xp, const char* op, int64_t G) {
  TORCH_CHECK(xp.dim() == 3, "rnnkit_fused::", op, ": xp must be (L, N, G), got ", xp.sizes());
  TORCH_CHECK(xp.size(2) == G, "rnnkit_fused::", op, ": xp's last axis must be G = ", G, ", got ", xp.size(2));
}

void check_f32(const Tensor& t, const char* what, at::IntArrayRef shape) {
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
    abuf = at::empty({rows, std::max<int64_t>(k, 1)}, f32_like(w));
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
  Tensor out = at::empty({L, N, H}, xp.options());
  Tensor pre_buf = at::empty({N, H}, f32_like(xp)), x_buf = at::empty({N, H}, f32_like(xp));
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
  Tensor dxp = at::empty({L, N, H}, out.options());
  Tensor dh_a = grad_hn.to(at::kFloat), dh_b = at::empty({N, H}, f32_like(out));
  Tensor s_buf = at::empty({N, H}, f32_like(out)), dp_buf = at::empty({N, H}, f32_like(out));
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
  Tensor out = at::empty({L, N, P}, xp.options());
  Tensor gates = at::empty({L, N, G}, f32_like(xp));
  Tensor cs = at::empty({L, N, H}, f32_like(xp));
  Tensor ms = proj ? at::empty({L, N, H}, xp.options()) : at::empty({0}, xp.options());
  Tensor c0f = c0.to(at::kFloat);
  Tensor x_buf = at::empty({N, G}, f32_like(xp)), m_buf = at::empty({N, H}, f32_like(xp));
  Tensor o_buf = proj ? at::empty({N, P}, f32_like(xp)) : Tensor();
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
  Tensor dG = at::empty({L, N, G}, out.options());
  Tensor dHall = proj ? at::empty({L, N, P}, out.options()) : Tensor();
  Tensor dm_buf = proj ? at::empty({N, H}, f32_like(out)) : Tensor();
  Tensor dh_a = grad_hn.to(at::kFloat), dh_b = at::empty({N, P}, f32_like(out)), dc = grad_cn.to(at::kFloat);
  Tensor c0f = c0.to(at::kFloat), s_buf = at::empty({N, std::max(G, P)}, f32_like(out));
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
  Tensor grad_w_hr = proj ? weight_grad(dHall, ms) : at::empty({0}, out.options());
  return {dG, grad_w_hh, grad_w_hr, dh_a.to(at::kBFloat16), dc.to(at::kBFloat16)};
}

// ---------------------------------------------------------------- GRU, bf16
// rzn (L, N, 3H) and hns (L, N, H) are float32.

std::tuple<Tensor, Tensor, Tensor, Tensor> gru_fwd_bf16(const Tensor& xp_, const Tensor& w_hh_,
                                                        const std::optional<Tensor>& b_hh_, const Tensor& h0_,
                                                        const std::optional<Tensor>& lengths) {
  TORCH_CHECK(w_hh_.dim() == 2 && w_hh_.size(0) == 3 * w_hh_.size(1),
              "rnnkit_fused::gru_fwd: w_hh must be (3H, H), got ", w_hh_.sizes());
  const int64_t H = w_hh_.size(1), G = 3 * H;
  check_seq_bf16(xp_, "gru_fwd", G);
  const int64_t L = xp_.size(0), N = xp_.size(1);
  Tensor xp = xp_.contiguous(), w_hh = w_hh_.contiguous(), h0 = h0_.contiguous();
  check_same(xp, w_hh, "w_hh", {G, H});
  Tensor bhf = at::zeros({G}, f32_like(xp));
  if (b_hh_.has_value() && b_hh_->defined()) {
    check_same(xp, *b_hh_, "b_hh", {G});
    bhf = b_hh_->to(at::kFloat).contiguous();
  }
  check_same(xp, h0, "h0", {N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor out = at::empty({L, N, H}, xp.options());
  Tensor rzn = at::empty({L, N, G}, f32_like(xp));
  Tensor hns = at::empty({L, N, H}, f32_like(xp));
  Tensor hh = at::empty({N, G}, f32_like(xp)), x_buf = at::empty({N, G}, f32_like(xp));
  Tensor hp_buf = at::empty({N, H}, f32_like(xp)), h_buf = at::empty({N, H}, f32_like(xp));
  const RecurrentBF16 rec(N, G, H, true, w_hh);
  const BF *x = xp.data_ptr<BF>(), *h_init = h0.data_ptr<BF>();
  const float* bh = bhf.data_ptr<float>();
  BF* o = out.data_ptr<BF>();
  float *rz = rzn.data_ptr<float>(), *hn = hns.data_ptr<float>(), *hb = hh.data_ptr<float>(),
        *xs = x_buf.data_ptr<float>(), *hps = hp_buf.data_ptr<float>(), *hs = h_buf.data_ptr<float>();
  const int64_t min_len = min_length(len, N, L), grain = row_grain(G);
  for (int64_t t = 0; t < L; ++t) {
    const BF* hp = t == 0 ? h_init : o + (t - 1) * N * H;
    rec(hp, H, 0.f, hb, G);
    const BF* xt = x + t * N * G;
    float *rzt = rz + t * N * G, *hnt = hn + t * N * H;
    BF* ot = o + t * N * H;
    const bool check = len && t >= min_len;
    at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        if (check && t >= len[n]) {
          copy_row(ot + n * H, hp + n * H, H);
          zero_row(rzt + n * G, G);
          zero_row(hnt + n * H, H);
        } else {
          to_float(xt + n * G, xs + n * G, G);
          to_float(hp + n * H, hps + n * H, H);
          gru_row((const float*)(xs + n * G), (const float*)(hb + n * G), bh, (const float*)(hps + n * H),
                  rzt + n * G, hnt + n * H, hs + n * H, H);
          to_bf16(hs + n * H, ot + n * H, H);
        }
      }
    });
  }
  Tensor h_n = L > 0 ? out[L - 1].clone() : h0.clone();
  return {out, h_n, rzn, hns};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gru_bwd_bf16(const Tensor& grad_out_, const Tensor& grad_hn_,
                                                        const Tensor& w_hh_, const Tensor& h0_,
                                                        const std::optional<Tensor>& lengths, const Tensor& out_,
                                                        const Tensor& rzn_, const Tensor& hns_) {
  TORCH_CHECK(out_.dim() == 3, "rnnkit_fused::gru_bwd: out must be (L, N, H), got ", out_.sizes());
  const int64_t L = out_.size(0), N = out_.size(1), H = out_.size(2), G = 3 * H;
  Tensor grad_out = grad_out_.contiguous(), grad_hn = grad_hn_.contiguous(), w_hh = w_hh_.contiguous();
  Tensor h0 = h0_.contiguous(), out = out_.contiguous(), rzn = rzn_.contiguous(), hns = hns_.contiguous();
  check_same(out, grad_out, "grad_out", out.sizes());
  check_same(out, grad_hn, "grad_h_n", {N, H});
  check_same(out, w_hh, "w_hh", {G, H});
  check_same(out, h0, "h0", {N, H});
  check_f32(rzn, "rzn", {L, N, G});
  check_f32(hns, "hn", {L, N, H});
  Tensor len_keep;
  const int64_t* len = lengths_ptr(lengths, N, len_keep);
  Tensor dxp = at::empty({L, N, G}, out.options());
  Tensor dhh = at::empty({L, N, G}, out.options());
  Tensor dh_a = grad_hn.to(at::kFloat), dh_b = at::empty({N, H}, f32_like(out));
  Tensor s_buf = at::empty({N, H}, f32_like(out)), dx_buf = at::empty({N, G}, f32_like(out)),
         dhh_buf = at::empty({N, G}, f32_like(out));
  const RecurrentBF16 rec(N, H, G, false, w_hh);
  const BF *go = grad_out.data_ptr<BF>(), *o = out.data_ptr<BF>(), *h_init = h0.data_ptr<BF>();
  const float *rz = rzn.data_ptr<float>(), *hn = hns.data_ptr<float>();
  BF *dx = dxp.data_ptr<BF>(), *dhp = dhh.data_ptr<BF>();
  float *dh = dh_a.data_ptr<float>(), *dn = dh_b.data_ptr<float>(), *s = s_buf.data_ptr<float>(),
        *dxs = dx_buf.data_ptr<float>(), *dhs = dhh_buf.data_ptr<float>();
  const int64_t min_len = min_length(len, N, L), grain = row_grain(G);
  for (int64_t t = L - 1; t >= 0; --t) {
    to_float(go + t * N * H, s, N * H);
    add_into(dh, s, N * H);
    const BF* hp = t == 0 ? h_init : o + (t - 1) * N * H;
    const float *rzt = rz + t * N * G, *hnt = hn + t * N * H;
    BF *dxt = dx + t * N * G, *dht = dhp + t * N * G;
    const bool check = len && t >= min_len;
    at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        if (check && t >= len[n]) {
          zero_row(dxt + n * G, G);
          zero_row(dht + n * G, G);
          copy_row(dn + n * H, dh + n * H, H);
        } else {
          to_float(hp + n * H, s + n * H, H);
          gru_grad_row(rzt + n * G, hnt + n * H, (const float*)(s + n * H), (const float*)(dh + n * H),
                       dxs + n * G, dhs + n * G, dn + n * H, H);
          to_bf16(dxs + n * G, dxt + n * G, G);
          to_bf16(dhs + n * G, dht + n * G, G);
        }
      }
    });
    rec(dht, G, 1.f, dn, H);
    if (check) pass_held_rows(len, t, N, H, (const float*)dh, dn);
    std::swap(dh, dn);
  }
  if (dh != dh_a.data_ptr<float>()) std::swap(dh_a, dh_b);
  Tensor grad_w_hh = weight_grad(dhh, previous_states(h0, out, len));
  Tensor grad_b_hh;
  {
    const OneThread one(serial_elems(dhh.numel()));
    grad_b_hh = at::sum(dhh, at::IntArrayRef{0, 1}, false, at::kFloat).to(at::kBFloat16);
  }
  return {dxp, grad_w_hh, grad_b_hh, dh_a.to(at::kBFloat16)};
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

std::tuple<Tensor, Tensor, Tensor, Tensor> gru_fwd_entry(const Tensor& xp, const Tensor& w_hh,
                                                         const std::optional<Tensor>& b_hh, const Tensor& h0,
                                                         const std::optional<Tensor>& lengths) {
  if (xp.scalar_type() == at::kBFloat16) return gru_fwd_bf16(xp, w_hh, b_hh, h0, lengths);
  return gru_fwd(xp, w_hh, b_hh, h0, lengths);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gru_bwd_entry(const Tensor& grad_out, const Tensor& grad_hn,
                                                         const Tensor& w_hh, const Tensor& h0,
                                                         const std::optional<Tensor>& lengths, const Tensor& out,
                                                         const Tensor& rzn, const Tensor& hns) {
  if (out.scalar_type() == at::kBFloat16) return gru_bwd_bf16(grad_out, grad_hn, w_hh, h0, lengths, out, rzn, hns);
  return gru_bwd(grad_out, grad_hn, w_hh, h0, lengths, out, rzn, hns);
}

// 1 where the bf16 recurrent product runs on MKL's bf16 GEMM (for batches of kSmallRows and more), else 0.
int64_t bf16_gemm() { return bf16_gemm_enabled() ? 1 : 0; }

}  // namespace
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
  m.impl("rnn_fwd", &rnnkit_fused::rnn_fwd_entry);
  m.impl("rnn_bwd", &rnnkit_fused::rnn_bwd_entry);
  m.impl("lstm_fwd", &rnnkit_fused::lstm_fwd_entry);
  m.impl("lstm_bwd", &rnnkit_fused::lstm_bwd_entry);
  m.impl("gru_fwd", &rnnkit_fused::gru_fwd_entry);
  m.impl("gru_bwd", &rnnkit_fused::gru_bwd_entry);
  m.impl("peephole_fwd", &rnnkit_fused::peephole_fwd);
  m.impl("peephole_bwd", &rnnkit_fused::peephole_bwd);
  m.impl("indrnn_fwd", &rnnkit_fused::indrnn_fwd);
  m.impl("indrnn_bwd", &rnnkit_fused::indrnn_bwd);
  m.impl("ln_lstm_fwd", &rnnkit_fused::ln_lstm_fwd);
  m.impl("ln_lstm_bwd", &rnnkit_fused::ln_lstm_bwd);
  m.impl("lstm_cell", &rnnkit_fused::lstm_cell);
  m.impl("gru_cell", &rnnkit_fused::gru_cell);
  m.impl("rnn_cell", &rnnkit_fused::rnn_cell);
  m.impl("conv_lstm_fwd", &rnnkit_fused::conv_lstm_fwd);
  m.impl("conv_lstm_bwd", &rnnkit_fused::conv_lstm_bwd);
  m.impl("conv_gru_fwd", &rnnkit_fused::conv_gru_fwd);
  m.impl("conv_gru_bwd", &rnnkit_fused::conv_gru_bwd);
  m.impl("ln_gru_fwd", &rnnkit_fused::ln_gru_fwd);
  m.impl("ln_gru_bwd", &rnnkit_fused::ln_gru_bwd);
}

// ================================================================ direct single-step entry (CPython)
// `cell_step(kind, input, hx, params, input_size, hidden_size)`: one inference
// step of a standard cell called straight from rnnkit.cells.CellBase.forward,
// without the dispatcher (whose boxing costs several times the step itself at
// batch 1). It runs only in the plain case and answers NotImplemented for
// anything else, so the caller takes the full path (its friendly errors, the
// torch.ops op, autograd):
//   kind: 0 lstm, 1 gru, 2 rnn tanh, 3 rnn relu (None: not a fused cell)
//   input (N, H_in) or (H_in,); hx None, a Tensor, or (h, c) for the LSTM,
//   each (N, H) or (H,) as the input; params the module's _parameters dict
//   (weight_ih, weight_hh, bias_ih, bias_hh; a bias may be None).
// Plain means: exact Tensor/Parameter objects, one dtype (float32/float64),
// CPU, strided, contiguous, no gradient needed, no dispatch key beyond
// CPU/autograd/ADInplaceOrView (so no fake tensors, vmap, dispatch or
// __torch_function__ modes, autocast), no profiler callbacks, and the backend
// not disabled by RNNKIT_DISABLE_FUSED.
#ifdef TORCH_EXTENSION_NAME
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdlib>
#include <vector>

namespace rnnkit_fused {
namespace {

PyObject *k_weight_ih, *k_weight_hh, *k_bias_ih, *k_bias_hh;

bool fused_disabled() {
  const char* v = std::getenv("RNNKIT_DISABLE_FUSED");
  return v && *v && std::strcmp(v, "0") != 0;
}

// a plain tensor of this process's kind (see above); dtype/shape are checked by the caller
bool plain(const Tensor& t, c10::DispatchKeySet excluded) {
  static const c10::DispatchKeySet allowed = c10::DispatchKeySet(c10::DispatchKey::CPU) |
                                             c10::DispatchKeySet(c10::DispatchKey::AutogradCPU) |
                                             c10::DispatchKeySet(c10::DispatchKey::ADInplaceOrView);
  // (operator- keeps backend bits: only the CPU one may remain)
  return t.defined() && (t.key_set() - excluded - allowed).remove_backend(c10::BackendComponent::CPUBit).empty() &&
         t.device().is_cpu() && t.layout() == at::kStrided && t.is_contiguous();
}

// the Tensor held by obj if it is an exact Tensor or Parameter, else null
const Tensor* unpack(PyObject* obj) {
  if (!obj || !THPVariable_CheckExact(obj)) return nullptr;
  return &THPVariable_Unpack(obj);
}

template <typename T>
T* scratch(size_t n) {
  thread_local std::vector<T> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// A direct call's arguments, read and checked.
struct DirectStep {
  long kind = -1;
  int64_t N = 0, I = 0, H = 0;
  bool batched = true;
  at::ScalarType dt = at::kFloat;
  const Tensor *x = nullptr, *w_ih = nullptr, *w_hh = nullptr, *b_ih = nullptr, *b_hh = nullptr;
  const Tensor* st[2] = {nullptr, nullptr};
};

// Reads cell_step's arguments into d: null if the step is plain, else why not
// (a Python error may be set, then the reason is "error").
const char* read_direct(PyObject* const* args, Py_ssize_t nargs, DirectStep& d) {
  if (nargs != 6) return "expected 6 arguments (kind, input, hx, params, input_size, hidden_size)";
  if (!PyLong_CheckExact(args[0])) return "kind is not an int (not a fused cell)";
  if (!PyDict_Check(args[3])) return "params is not a dict";
  if (!PyLong_CheckExact(args[4]) || !PyLong_CheckExact(args[5])) return "input_size/hidden_size are not ints";
  d.kind = PyLong_AsLong(args[0]);
  const long in_size = PyLong_AsLong(args[4]), hid = PyLong_AsLong(args[5]);
  if (PyErr_Occurred()) return "error";
  if (d.kind < 0 || d.kind > 3) return "kind out of range";
  if (in_size <= 0 || hid <= 0) return "input_size/hidden_size not positive";
  const int gates = d.kind == 0 ? 4 : d.kind == 1 ? 3 : 1;
  const int nstates = d.kind == 0 ? 2 : 1;

  // the objects: exact Tensor/Parameter
  d.x = unpack(args[1]);
  if (!d.x) return "input is not a Tensor (or is a Tensor subclass)";
  PyObject* pd = args[3];
  PyObject *ow_ih = PyDict_GetItemWithError(pd, k_weight_ih), *ow_hh = PyDict_GetItemWithError(pd, k_weight_hh);
  PyObject *ob_ih = PyDict_GetItemWithError(pd, k_bias_ih), *ob_hh = PyDict_GetItemWithError(pd, k_bias_hh);
  if (PyErr_Occurred()) return "error";
  d.w_ih = unpack(ow_ih), d.w_hh = unpack(ow_hh);
  if (!d.w_ih || !d.w_hh) return "weight_ih/weight_hh missing or not Tensors";
  if (ob_ih && ob_ih != Py_None && !(d.b_ih = unpack(ob_ih))) return "bias_ih is not a Tensor";
  if (ob_hh && ob_hh != Py_None && !(d.b_hh = unpack(ob_hh))) return "bias_hh is not a Tensor";
  PyObject* hx = args[2];
  if (hx != Py_None) {
    if (nstates == 2) {
      if (!PyTuple_CheckExact(hx) && !PyList_CheckExact(hx)) return "hx is not a tuple or list";
      if (PySequence_Fast_GET_SIZE(hx) != 2) return "hx does not hold 2 states";
      d.st[0] = unpack(PySequence_Fast_GET_ITEM(hx, 0));
      d.st[1] = unpack(PySequence_Fast_GET_ITEM(hx, 1));
      if (!d.st[0] || !d.st[1]) return "a state is not a Tensor";
    } else if (!(d.st[0] = unpack(hx))) {
      return "hx is not a Tensor";
    }
  }

  // the environment: nothing that the dispatcher would route elsewhere
  if (fused_disabled()) return "disabled by RNNKIT_DISABLE_FUSED";
  if (at::hasCallbacks()) return "RecordFunction callbacks (a profiler) are active";
  if (at::impl::torch_function_mode_enabled()) return "a __torch_function__ mode is active";
  const c10::impl::LocalDispatchKeySet tls = c10::impl::tls_local_dispatch_key_set();
  static const c10::DispatchKeySet default_included =  // what every thread includes by default
      c10::DispatchKeySet(c10::DispatchKey::BackendSelect) | c10::DispatchKeySet(c10::DispatchKey::ADInplaceOrView);
  if (!(tls.included_ - default_included).empty())
    return "dispatch keys are included by thread-local state (a mode or transform)";

  // the tensors
  const bool grad = at::GradMode::is_enabled();
  d.dt = d.x->scalar_type();
  if (d.dt != at::kFloat && d.dt != at::kDouble) return "dtype is not float32/float64";
  const Tensor* all[7] = {d.x, d.w_ih, d.w_hh, d.b_ih, d.b_hh, d.st[0], d.st[1]};
  for (const Tensor* t : all) {
    if (!t) continue;
    if (!plain(*t, tls.excluded_)) return "a tensor is not a plain contiguous CPU tensor";
    if (t->scalar_type() != d.dt) return "the tensors' dtypes differ";
    if (grad && t->requires_grad()) return "a gradient is needed";
  }

  // the shapes
  const int64_t G = gates * hid;
  d.I = in_size, d.H = hid;
  d.batched = d.x->dim() == 2;
  if (!d.batched && d.x->dim() != 1) return "input is not 1-D or 2-D";
  d.N = d.batched ? d.x->size(0) : 1;
  if (d.N < 1) return "empty batch";
  if (d.x->size(-1) != d.I) return "input's last axis is not input_size";
  if (d.w_ih->dim() != 2 || d.w_ih->size(0) != G || d.w_ih->size(1) != d.I) return "weight_ih's shape";
  if (d.w_hh->dim() != 2 || d.w_hh->size(0) != G || d.w_hh->size(1) != d.H) return "weight_hh's shape";
  if ((d.b_ih && (d.b_ih->dim() != 1 || d.b_ih->size(0) != G)) ||
      (d.b_hh && (d.b_hh->dim() != 1 || d.b_hh->size(0) != G)))
    return "a bias's shape";
  for (int i = 0; i < nstates; ++i) {
    const Tensor* s = d.st[i];
    if (s && (d.batched ? (s->dim() != 2 || s->size(0) != d.N || s->size(1) != d.H)
                        : (s->dim() != 1 || s->size(0) != d.H)))
      return "a state's shape";
  }
  return nullptr;
}

PyObject* cell_step(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  DirectStep d;
  if (const char* why = read_direct(args, nargs, d)) {
    if (PyErr_Occurred()) return nullptr;
    (void)why;
    Py_RETURN_NOTIMPLEMENTED;
  }
  const int64_t N = d.N, I = d.I, H = d.H, G = (d.kind == 0 ? 4 : d.kind == 1 ? 3 : 1) * H;
  const at::TensorOptions opts = d.x->options();
  const int64_t dims[2] = {N, H};  // (N, H), or (H,) unbatched
  const c10::IntArrayRef shape = d.batched ? c10::IntArrayRef(dims, 2) : c10::IntArrayRef(dims + 1, 1);
  Tensor h_new = at::empty(shape, opts), c_new;
  if (d.kind == 0) c_new = at::empty(shape, opts);
  AT_DISPATCH_FLOATING_TYPES(d.dt, "cell_step", [&] {
    using T = scalar_t;
    const T* xp = d.x->data_ptr<T>();
    const T *wi = d.w_ih->data_ptr<T>(), *wh = d.w_hh->data_ptr<T>();
    const T *bi = d.b_ih ? d.b_ih->data_ptr<T>() : nullptr, *bh = d.b_hh ? d.b_hh->data_ptr<T>() : nullptr;
    const T* h0 = d.st[0] ? d.st[0]->data_ptr<T>() : nullptr;  // null: zeros (the product is skipped)
    if (d.kind == 0) {
      T* g = scratch<T>(N * G + (d.st[1] ? 0 : N * H));
      const T* c0 = d.st[1] ? d.st[1]->data_ptr<T>() : nullptr;
      if (!c0) {
        zero_row(g + N * G, N * H);
        c0 = g + N * G;
      }
      lstm_cell_raw<T>(N, I, H, xp, h0, c0, wi, wh, bi, bh, g, h_new.data_ptr<T>(), c_new.data_ptr<T>());
    } else if (d.kind == 1) {
      const int64_t S = gru_cell_scratch(N, H);
      T* s = scratch<T>(S + (h0 ? 0 : N * H));
      if (!h0) {  // gru_row reads h0 itself
        zero_row(s + S, N * H);
        h0 = s + S;
      }
      gru_cell_raw<T>(N, I, H, xp, h0, wi, wh, bi, bh, s, h_new.data_ptr<T>());
    } else {
      rnn_cell_raw<T>(N, I, H, xp, h0, wi, wh, bi, bh, d.kind - 2, h_new.data_ptr<T>());
    }
  });
  if (d.kind != 0) return THPVariable_Wrap(std::move(h_new));
  PyObject* out = PyTuple_New(2);
  if (!out) return nullptr;
  PyTuple_SET_ITEM(out, 0, THPVariable_Wrap(std::move(h_new)));
  PyTuple_SET_ITEM(out, 1, THPVariable_Wrap(std::move(c_new)));
  return out;
  END_HANDLE_TH_ERRORS
}

// cell_step_reason(same arguments): None if cell_step would run the step, else why it answers NotImplemented.
PyObject* cell_step_reason(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  DirectStep d;
  const char* why = read_direct(args, nargs, d);
  if (PyErr_Occurred()) return nullptr;
  if (!why) Py_RETURN_NONE;
  return PyUnicode_FromString(why);
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"cell_step", (PyCFunction)(void (*)(void))cell_step, METH_FASTCALL,
     "cell_step(kind, input, hx, params, input_size, hidden_size): one plain inference step, or NotImplemented"},
    {"cell_step_reason", (PyCFunction)(void (*)(void))cell_step_reason, METH_FASTCALL,
     "cell_step_reason(same arguments): None if cell_step would run the step, else why not"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, C10_STRINGIZE(TORCH_EXTENSION_NAME),
                          "rnnkit's fused kernels: the direct single-step entry (the ops are in torch.ops.rnnkit_fused)",
                          -1, methods};

}  // namespace
}  // namespace rnnkit_fused

#define RNNKIT_PYINIT2(name) PyInit_##name
#define RNNKIT_PYINIT(name) RNNKIT_PYINIT2(name)
PyMODINIT_FUNC RNNKIT_PYINIT(TORCH_EXTENSION_NAME)(void) {
  using namespace rnnkit_fused;
  k_weight_ih = PyUnicode_InternFromString("weight_ih");
  k_weight_hh = PyUnicode_InternFromString("weight_hh");
  k_bias_ih = PyUnicode_InternFromString("bias_ih");
  k_bias_hh = PyUnicode_InternFromString("bias_hh");
  if (!k_weight_ih || !k_weight_hh || !k_bias_ih || !k_bias_hh) return nullptr;
  return PyModule_Create(&module_def);
}
#endif  // TORCH_EXTENSION_NAME
