// Affine quantized matmul on the CPU: out = x @ dequantize(w).T, multi-threaded over output rows,
// vectorised (AVX-512 / AVX2+FMA chosen at run time on x86-64; the compiler's own vectors elsewhere).
//
// Packing (MLX's): element k of a row sits in bits [bits*(k % (32/bits)), ...) of uint32 k*bits/32,
// so in bytes (little-endian) byte j holds elements j*P .. j*P+P-1, P = 8/bits, lowest bits first.
// The kernel reads 16 bytes at a time, widens them to 16 int32 lanes and takes sub-element i of
// every byte with one shift and mask. The activations are permuted once per call to match:
// within each run of 16*P elements, xp[i*16 + j] = x[j*P + i]. Then
//   out[m, n] = sum_g scale[n, g] * sum_{k in g} xp[m, k] q[n, k] + sum_g bias[n, g] * sum_{k in g} x[m, k].
// Many rows (prefill) go another way: a tile of w is dequantized to float32 and handed to the
// CBLAS sgemm that MLX's own float32 matmul uses.

#include "qmm.h"
#include "qmm_internal.h"

#include <algorithm>
#include <utility>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include <dlfcn.h>
#include <sched.h>

#if defined(__x86_64__) || defined(_M_X64)
#define MLXLLAMA_X86 1
#include <immintrin.h>
#endif

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

extern "C" void cblas_sgemm(
    int layout, int transa, int transb, int m, int n, int k, float alpha, const float* a, int lda,
    const float* b, int ldb, float beta, float* c, int ldc);

namespace mlxllama {

namespace {

std::atomic<int> max_kernel_rows{16}; // more rows: dequantized tiles + sgemm
constexpr int kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112;

// ---------------------------------------------------------------------------------------------
// A small pool: the calling thread plus (threads - 1) workers share tasks through an atomic
// counter. The caller never waits for a worker that has not started: it takes whatever tasks are
// left and waits only for tasks already running (on a busy machine a sleeping worker may take
// milliseconds to be scheduled). Workers spin briefly after a job (decode issues matmuls
// microseconds apart), then sleep.

class Pool {
 public:
  explicit Pool(int threads) {
    resize(threads);
  }
  ~Pool() {
    stop_workers();
  }

  int threads() const {
    return static_cast<int>(workers_.size()) + 1;
  }

  void resize(int threads) {
    std::lock_guard<std::mutex> run(run_mu_);
    stop_workers();
    stop_ = false;
    const uint64_t now = generation_.load(); // a worker waits for the next job, whenever it starts
    for (int i = 1; i < std::max(1, threads); ++i) {
      workers_.emplace_back([this, now] { worker_loop(now); });
    }
  }

  // Runs f(0) .. f(tasks - 1); returns when all are done.
  void run(int tasks, const std::function<void(int)>& f) {
    std::unique_lock<std::mutex> run(run_mu_, std::try_to_lock);
    if (tasks <= 1 || workers_.empty() || !run.owns_lock()) {
      for (int i = 0; i < tasks; ++i) f(i);
      return;
    }
    if (tasks > kMaxTasks) {
      for (int i = 0; i < tasks; ++i) f(i);
      return;
    }
    job_ = &f;
    done_.store(0);
    job_id_ = (job_id_ + 1) & kIdMask;
    claim_.store(job_id_ << (2 * kIndexBits) | static_cast<uint64_t>(tasks) << kIndexBits, std::memory_order_release);
    generation_.fetch_add(1);
    if (sleeping_.load() > 0) {
      { std::lock_guard<std::mutex> lk(mu_); }
      cv_.notify_all();
    }
    work();
    for (int spin = 0; done_.load(std::memory_order_acquire) != tasks; ++spin) {
      if (spin < 4096) {
        relax();
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  static void relax() {
#ifdef MLXLLAMA_X86
    _mm_pause();
#else
    std::this_thread::yield();
#endif
  }

  // Takes tasks of the current job until none is left. A task is claimed by one compare-exchange on
  // claim_ (job id | task count | next index), so a thread that arrives late, when that job is over
  // and another is being set up, cannot take (or skip) a task of the new one by mistake.
  void work() {
    constexpr uint64_t mask = (uint64_t{1} << kIndexBits) - 1;
    uint64_t c = claim_.load(std::memory_order_acquire);
    while ((c & mask) < ((c >> kIndexBits) & mask)) {
      if (claim_.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        (*job_)(static_cast<int>(c & mask));
        done_.fetch_add(1, std::memory_order_release);
        c = claim_.load(std::memory_order_acquire);
      }
    }
  }

  void worker_loop(uint64_t seen) {
    using clock = std::chrono::steady_clock;
    while (true) {
      const auto until = clock::now() + std::chrono::microseconds(200);
      for (int spin = 0; generation_.load(std::memory_order_acquire) == seen && !stop_; ++spin) {
        relax();
        if ((spin & 63) == 63 && clock::now() > until) break;
      }
      if (generation_.load() == seen && !stop_) {
        std::unique_lock<std::mutex> lk(mu_);
        sleeping_.fetch_add(1);
        cv_.wait(lk, [&] { return stop_ || generation_.load() != seen; });
        sleeping_.fetch_sub(1);
      }
      if (stop_) return;
      seen = generation_.load();
      work();
    }
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  std::vector<std::thread> workers_;
  std::mutex run_mu_, mu_;
  std::condition_variable cv_;
  const std::function<void(int)>* job_ = nullptr;
  static constexpr int kIndexBits = 20;
  static constexpr int kMaxTasks = (1 << kIndexBits) - 1;
  static constexpr uint64_t kIdMask = (uint64_t{1} << (64 - 2 * kIndexBits)) - 1;
  uint64_t job_id_ = 0; // the caller's count of jobs (run() runs one job at a time)
  std::atomic<uint64_t> claim_{0};
  std::atomic<int> done_{0}, sleeping_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stop_{false};
};

int default_threads() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    return std::max(1, CPU_COUNT(&set));
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

Pool& pool() {
  static Pool p(default_threads());
  return p;
}

// ---------------------------------------------------------------------------------------------
// Kernels. One call computes out rows m0 .. m0 + MB - 1, output columns n0 .. n1 - 1.

// Scales and biases stay in the checkpoint's type (float16 halves the bytes they add to each
// group); read one at a time and widened to float32.
inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float f16_to_float(uint16_t h) { // IEEE half -> float, subnormals included
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {
    exp = 113;
    while (!(mant & 0x400u)) mant <<= 1, --exp;
    bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

struct Generic {
  static float half(uint16_t h) { return f16_to_float(h); }
};

template <class V>
[[gnu::always_inline]] inline float scale_at(const void* p, ScaleType t, size_t i) {
  switch (t) {
    case ScaleType::f32: return static_cast<const float*>(p)[i];
    case ScaleType::bf16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return V::half(static_cast<const uint16_t*>(p)[i]);
  }
}

struct Args {
  const float* xp; // (M, K) permuted activations
  const float* xsum; // (M, G) per-group sums of x
  const uint8_t* w; // (N, K * bits / 8)
  const void* scales; // (N, G), float32, float16 or bfloat16 (ScaleType)
  const void* biases; // (N, G), the same type
  ScaleType st;
  float* out; // (M, N)
  int M, N, K, G, group_size;
};

inline float bias_term(const Args& a, int n, int m) {
  const size_t b = static_cast<size_t>(n) * a.G;
  const float* s = a.xsum + static_cast<size_t>(m) * a.G;
  float t = 0.f;
  for (int g = 0; g < a.G; ++g) t += scale_at<Generic>(a.biases, a.st, b + g) * s[g];
  return t;
}

template <int BITS, int MB>
void rows_generic(const Args& a, int m0, int n0, int n1) {
  constexpr int P = 8 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1;
  const int chunks = a.group_size / (16 * P);
  const size_t row_bytes = static_cast<size_t>(a.K) * BITS / 8;
  const float* xp = a.xp + static_cast<size_t>(m0) * a.K;
  for (int n = n0; n < n1; ++n) {
    const uint8_t* wr = a.w + n * row_bytes;
    const size_t sr = static_cast<size_t>(n) * a.G;
    float tot[MB] = {};
    for (int g = 0; g < a.G; ++g) {
      float acc[MB][16] = {};
      for (int c = 0; c < chunks; ++c) {
        const int chunk = g * chunks + c;
        const uint8_t* b = wr + chunk * 16;
        const float* xb = xp + chunk * 16 * P;
        for (int i = 0; i < P; ++i) {
          float q[16];
          for (int j = 0; j < 16; ++j) q[j] = static_cast<float>((b[j] >> (i * BITS)) & MASK);
          for (int m = 0; m < MB; ++m) {
            const float* xr = xb + static_cast<size_t>(m) * a.K + i * 16;
            for (int j = 0; j < 16; ++j) acc[m][j] += xr[j] * q[j];
          }
        }
      }
      for (int m = 0; m < MB; ++m) {
        float t = 0.f;
        for (int j = 0; j < 16; ++j) t += acc[m][j];
        tot[m] += scale_at<Generic>(a.scales, a.st, sr + g) * t;
      }
    }
    for (int m = 0; m < MB; ++m) {
      a.out[static_cast<size_t>(m0 + m) * a.N + n] = tot[m] + bias_term(a, n, m0 + m);
    }
  }
}

#ifdef MLXLLAMA_X86
// The x86 loops are written once, over a vector type V: Avx512 (16 float lanes) or Avx2 (8 lanes,
// so each 16-byte run of weights is read in two halves). V's operations carry their instruction
// set; a loop template is always inlined into a function compiled for that instruction set
// (rows_avx512, rows_avx2, ...), where V's operations are inlined in turn. (GCC does not inline a
// target-specific function into one without the target, so the templates themselves carry none;
// and their __m512 / __m256 values never cross a call: -Wpsabi's ABI note does not apply.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#define MLXLLAMA_AVX512 __attribute__((target("avx512f,f16c")))
#define MLXLLAMA_AVX2 __attribute__((target("avx2,fma,f16c")))

struct Avx512 {
  static constexpr int W = 16;
  static constexpr bool kTable = true; // vpermps over 16 floats
  using F = __m512;
  using I = __m512i;
  MLXLLAMA_AVX512 static F iota() {
    return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  }
  MLXLLAMA_AVX512 static I shift(I v, int shift) { return _mm512_srli_epi32(v, shift); }
  MLXLLAMA_AVX512 static float half(uint16_t h) { return _cvtsh_ss(h); }
  // n float16 / bfloat16 values from element `at` of src -> float32
  MLXLLAMA_AVX512 static void widen(const void* src, ScaleType t, size_t at, size_t n, float* dst) {
    const uint16_t* p = static_cast<const uint16_t*>(src) + at;
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i));
      _mm512_storeu_ps(dst + i, t == ScaleType::f16 ? _mm512_cvtph_ps(h)
                                                    : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    }
    for (; i < n; ++i) dst[i] = t == ScaleType::f16 ? _cvtsh_ss(p[i]) : bf16_to_float(p[i]);
  }
  MLXLLAMA_AVX512 static F lookup(I idx, F table) { return _mm512_permutexvar_ps(idx, table); }
  MLXLLAMA_AVX512 static F zero() { return _mm512_setzero_ps(); }
  MLXLLAMA_AVX512 static F set1(float v) { return _mm512_set1_ps(v); }
  MLXLLAMA_AVX512 static I set1i(int v) { return _mm512_set1_epi32(v); }
  MLXLLAMA_AVX512 static F load(const float* p) { return _mm512_loadu_ps(p); }
  MLXLLAMA_AVX512 static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  MLXLLAMA_AVX512 static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  MLXLLAMA_AVX512 static F add(F a, F b) { return _mm512_add_ps(a, b); }
  // W bytes, each widened to an int32 lane
  MLXLLAMA_AVX512 static I bytes(const uint8_t* p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  MLXLLAMA_AVX512 static I shift_mask(I v, int shift, I mask) { return _mm512_and_si512(_mm512_srli_epi32(v, shift), mask); }
  MLXLLAMA_AVX512 static F to_float(I v) { return _mm512_cvtepi32_ps(v); }
  MLXLLAMA_AVX512 static float sum(F v) { return _mm512_reduce_add_ps(v); }
};

struct Avx2 {
  static constexpr int W = 8;
  static constexpr bool kTable = false;
  using F = __m256;
  using I = __m256i;
  MLXLLAMA_AVX2 static F iota() { return _mm256_setzero_ps(); } // unused: no table on AVX2
  MLXLLAMA_AVX2 static I shift(I v, int shift) { return _mm256_srli_epi32(v, shift); }
  MLXLLAMA_AVX2 static float half(uint16_t h) { return _cvtsh_ss(h); }
  MLXLLAMA_AVX2 static void widen(const void* src, ScaleType t, size_t at, size_t n, float* dst) {
    const uint16_t* p = static_cast<const uint16_t*>(src) + at;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i));
      _mm256_storeu_ps(dst + i, t == ScaleType::f16 ? _mm256_cvtph_ps(h)
                                                    : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    }
    for (; i < n; ++i) dst[i] = t == ScaleType::f16 ? _cvtsh_ss(p[i]) : bf16_to_float(p[i]);
  }
  MLXLLAMA_AVX2 static F lookup(I, F table) { return table; }
  MLXLLAMA_AVX2 static F zero() { return _mm256_setzero_ps(); }
  MLXLLAMA_AVX2 static F set1(float v) { return _mm256_set1_ps(v); }
  MLXLLAMA_AVX2 static I set1i(int v) { return _mm256_set1_epi32(v); }
  MLXLLAMA_AVX2 static F load(const float* p) { return _mm256_loadu_ps(p); }
  MLXLLAMA_AVX2 static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  MLXLLAMA_AVX2 static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  MLXLLAMA_AVX2 static F add(F a, F b) { return _mm256_add_ps(a, b); }
  MLXLLAMA_AVX2 static I bytes(const uint8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  MLXLLAMA_AVX2 static I shift_mask(I v, int shift, I mask) { return _mm256_and_si256(_mm256_srli_epi32(v, shift), mask); }
  MLXLLAMA_AVX2 static F to_float(I v) { return _mm256_cvtepi32_ps(v); }
  MLXLLAMA_AVX2 static float sum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

// Few rows (decode). NR output columns run side by side, so the accumulators form NR * MB
// independent chains (a single chain would wait on each FMA's latency). Two ways to apply the
// group's scale s and bias b:
// - table (AVX-512, 2 and 4 bits): the 16 dequantized values s * q + b of the group are one
//   vector, and vpermps turns the codes into weights in one instruction (conversion, scale and
//   bias together); x * w accumulates over the whole row.
// - factored (8 bits, AVX2): sum_k x q accumulates per group, then s times that plus b times the
//   group's sum of x.
// - weights are read ahead with software prefetches, about 4.5 KB on: from memory (a model larger
//   than the cache) the loop otherwise waited on each line, and ran at 6-12 GB/s where the bus
//   gives 26 (measured here: a 4-bit 3072x576 matmul 98 -> 65 us, the 8-bit 49152x576 head
//   2.7 -> 1.1 ms, on two threads; no change when the weights sit in the cache).
constexpr size_t kPrefetchBytes = 4608;
// (__builtin_prefetch: GCC 12 drops _mm_prefetch inlined into the target("avx512f") loops)
inline void prefetch(const uint8_t* p) { __builtin_prefetch(p, 0, 3); }
template <class V, int BITS, int MB, int NR, int CH>
[[gnu::always_inline]] inline void rows_block(const Args& a, int m0, int n, const float* sc, const float* bi) {
  // sc, bi: the NR rows' scales and biases as float32, (NR, G)
  using F = typename V::F;
  using I = typename V::I;
  constexpr int P = 8 / BITS, HALVES = 16 / V::W; // vectors per 16-byte run of weights
  constexpr bool LUT = V::kTable && BITS <= 4;
  const I mask = V::set1i((1 << BITS) - 1);
  constexpr int chunks = CH; // 16-byte runs of weights per group, fixed so the group loop unrolls
  const size_t row_bytes = static_cast<size_t>(a.K) * BITS / 8;
  const size_t ahead = (kPrefetchBytes + NR * row_bytes - 1) / (NR * row_bytes) * NR * row_bytes; // whole blocks
  const float* xp = a.xp + static_cast<size_t>(m0) * a.K;
  const size_t K = a.K;
  const F iota = V::iota();
  constexpr bool SPLIT = !LUT && CH > 1; // factored: odd runs of the group in a second chain
  F tot[NR][MB], acc[NR][MB], acc2[NR][MB];
  float bsum[NR][MB] = {};
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MB; ++m) tot[r][m] = acc[r][m] = V::zero();
  for (int g = 0; g < a.G; ++g) {
    F table[NR];
    if constexpr (LUT) {
      for (int r = 0; r < NR; ++r) {
        const size_t at = static_cast<size_t>(r) * a.G + g;
        table[r] = V::fmadd(iota, V::set1(sc[at]), V::set1(bi[at]));
      }
    } else {
      for (int r = 0; r < NR; ++r)
        for (int m = 0; m < MB; ++m) acc[r][m] = acc2[r][m] = V::zero();
    }
    for (int c = 0; c < chunks; ++c) {
      const int chunk = g * chunks + c;
      const float* xb = xp + chunk * 16 * P;
      if ((chunk & 3) == 0) { // each row enters a new cache line: ask for the one `ahead` bytes on
        for (int r = 0; r < NR; ++r) prefetch(a.w + (n + r) * row_bytes + ahead + chunk * 16);
      }
      for (int h = 0; h < HALVES; ++h) {
        I v[NR];
        for (int r = 0; r < NR; ++r) v[r] = V::bytes(a.w + (n + r) * row_bytes + chunk * 16 + h * V::W);
        for (int i = 0; i < P; ++i) {
          F xv[MB];
          for (int m = 0; m < MB; ++m) xv[m] = V::load(xb + m * K + i * 16 + h * V::W);
          for (int r = 0; r < NR; ++r) {
            I qi = v[r];
            if constexpr (BITS == 8) {
            } else if constexpr (LUT && BITS == 4) {
              if (i) qi = V::shift(v[r], 4); // the table reads the low 4 bits only
            } else if (BITS * (i + 1) == 8) {
              qi = V::shift(v[r], i * BITS); // the top code of a byte needs no mask
            } else {
              qi = V::shift_mask(v[r], i * BITS, mask);
            }
            const F w = LUT ? V::lookup(qi, table[r]) : V::to_float(qi);
            // two chains a row: table, even and odd codes; factored, even and odd runs
            F* dst = LUT ? ((i & 1) == 0 ? tot[r] : acc[r]) : (SPLIT && (c & 1) ? acc2[r] : acc[r]);
            for (int m = 0; m < MB; ++m) dst[m] = V::fmadd(xv[m], w, dst[m]);
          }
        }
      }
    }
    if constexpr (!LUT) {
      for (int r = 0; r < NR; ++r) {
        const size_t at = static_cast<size_t>(r) * a.G + g;
        const F sv = V::set1(sc[at]);
        const float bv = bi[at];
        for (int m = 0; m < MB; ++m) {
          tot[r][m] = V::fmadd(SPLIT ? V::add(acc[r][m], acc2[r][m]) : acc[r][m], sv, tot[r][m]);
          bsum[r][m] += bv * a.xsum[static_cast<size_t>(m0 + m) * a.G + g];
        }
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MB; ++m)
      a.out[static_cast<size_t>(m0 + m) * a.N + n + r] = LUT ? V::sum(V::add(tot[r][m], acc[r][m]))
                                                             : V::sum(tot[r][m]) + bsum[r][m];
}

template <class V, int BITS, int MB, int CH>
[[gnu::always_inline]] inline void rows_simd(const Args& a, int m0, int n0, int n1) {
  constexpr int NR = MB == 1 ? 4 : MB == 2 ? 2 : 1;
  int n = n0;
  // scales and biases of the rows in float32: the data itself, or widened 64 rows at a time
  constexpr int CHUNK = 64; // a multiple of NR
  const bool wide = a.st == ScaleType::f32;
  thread_local std::vector<float> buf;
  if (!wide) buf.resize(static_cast<size_t>(2) * CHUNK * a.G);
  for (int c0 = n0; c0 < n1; c0 += CHUNK) {
    const int c1 = std::min(n1, c0 + CHUNK);
    const size_t at = static_cast<size_t>(c0) * a.G, len = static_cast<size_t>(c1 - c0) * a.G;
    const float* sc = static_cast<const float*>(a.scales) + at;
    const float* bi = static_cast<const float*>(a.biases) + at;
    if (!wide) {
      V::widen(a.scales, a.st, at, len, buf.data());
      V::widen(a.biases, a.st, at, len, buf.data() + len);
      sc = buf.data(), bi = buf.data() + len;
    }
    int n = c0;
    for (; n + NR <= c1; n += NR) {
      const size_t r = static_cast<size_t>(n - c0) * a.G;
      rows_block<V, BITS, MB, NR, CH>(a, m0, n, sc + r, bi + r);
    }
    for (; n < c1; ++n) {
      const size_t r = static_cast<size_t>(n - c0) * a.G;
      rows_block<V, BITS, MB, 1, CH>(a, m0, n, sc + r, bi + r);
    }
  }
}

template <int BITS, int MB, int CH>
MLXLLAMA_AVX512 void rows_avx512(const Args& a, int m0, int n0, int n1) {
  rows_simd<Avx512, BITS, MB, CH>(a, m0, n0, n1);
}

template <int BITS, int MB, int CH>
MLXLLAMA_AVX2 void rows_avx2(const Args& a, int m0, int n0, int n1) {
  rows_simd<Avx2, BITS, MB, CH>(a, m0, n0, n1);
}
#pragma GCC diagnostic pop
#endif

enum class Isa { generic, avx2, avx512 };

// The best the CPU has, capped by MLXLLAMA_KERNEL_ISA (generic, avx2 or avx512; for tests and
// comparisons, never above what the CPU supports).
Isa detect_isa() {
  Isa best = Isa::generic;
#ifdef MLXLLAMA_X86
  __builtin_cpu_init();
  const bool f16c = __builtin_cpu_supports("f16c");
  if (__builtin_cpu_supports("avx512f") && f16c) {
    best = Isa::avx512;
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c) {
    best = Isa::avx2;
  }
#endif
  const char* cap = std::getenv("MLXLLAMA_KERNEL_ISA");
  if (cap != nullptr && std::strcmp(cap, "generic") == 0) return Isa::generic;
  if (cap != nullptr && std::strcmp(cap, "avx2") == 0 && best == Isa::avx512) return Isa::avx2;
  return best;
}

const Isa kIsa = detect_isa();

using RowsFn = void (*)(const Args&, int, int, int);

// The vector loops are compiled for each (bits, rows, 16-byte runs per group): CH = group_size * bits / 128.
template <int BITS, int CH>
constexpr bool valid_runs() {
  return CH * 128 % BITS == 0 && (CH * 128 / BITS == 32 || CH * 128 / BITS == 64 || CH * 128 / BITS == 128);
}

template <int BITS, int MB, int CH>
RowsFn pick_simd() {
#ifdef MLXLLAMA_X86
  if constexpr (valid_runs<BITS, CH>()) {
    if (kIsa == Isa::avx512) return rows_avx512<BITS, MB, CH>;
    if (kIsa == Isa::avx2) return rows_avx2<BITS, MB, CH>;
  }
#endif
  return nullptr;
}

template <int BITS, int MB>
RowsFn pick_fixed(int runs) {
  RowsFn f = nullptr;
  switch (runs) {
    case 1: f = pick_simd<BITS, MB, 1>(); break;
    case 2: f = pick_simd<BITS, MB, 2>(); break;
    case 4: f = pick_simd<BITS, MB, 4>(); break;
    case 8: f = pick_simd<BITS, MB, 8>(); break;
    default: break;
  }
  return f != nullptr ? f : rows_generic<BITS, MB>;
}

template <int BITS>
RowsFn pick_rows(int mb, int runs) {
  switch (mb) {
    case 1: return pick_fixed<BITS, 1>(runs);
    case 2: return pick_fixed<BITS, 2>(runs);
    case 3: return pick_fixed<BITS, 3>(runs);
    case 4: return pick_fixed<BITS, 4>(runs);
    case 5: return pick_fixed<BITS, 5>(runs);
    case 6: return pick_fixed<BITS, 6>(runs);
    case 7: return pick_fixed<BITS, 7>(runs);
    default: return pick_fixed<BITS, 8>(runs);
  }
}

RowsFn pick(int bits, int mb, int group_size) {
  const int runs = group_size * bits / 128;
  switch (bits) {
    case 2: return pick_rows<2>(mb, runs);
    case 4: return pick_rows<4>(mb, runs);
    default: return pick_rows<8>(mb, runs);
  }
}

int max_block_rows() {
  return kIsa == Isa::avx512 ? 8 : 4; // AVX2 / generic: 16 vector registers
}

// ---------------------------------------------------------------------------------------------
// Activations: gather (any strides) into the permuted layout, with per-group sums.

// Element offsets of row m of x viewed as (M, K): x may be any strided view.
void gather_rows(const mx::array& x, int M, int K, float* dst) {
  const float* src = x.data<float>();
  if (x.flags().row_contiguous) {
    std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(M) * K);
    return;
  }
  const auto& shape = x.shape();
  const auto& strides = x.strides();
  const int nd = x.ndim();
  std::vector<int64_t> idx(nd, 0);
  const size_t total = static_cast<size_t>(M) * K;
  for (size_t e = 0; e < total; ++e) {
    int64_t off = 0;
    for (int d = 0; d < nd; ++d) off += idx[d] * strides[d];
    dst[e] = src[off];
    for (int d = nd - 1; d >= 0; --d) {
      if (++idx[d] < shape[d]) break;
      idx[d] = 0;
    }
  }
}

void permute_rows(const float* x, int M, int K, int bits, int group_size, float* xp, float* xsum) {
  const int P = 8 / bits, run = 16 * P, G = K / group_size;
  for (int m = 0; m < M; ++m) {
    const float* xr = x + static_cast<size_t>(m) * K;
    float* pr = xp + static_cast<size_t>(m) * K;
    for (int base = 0; base < K; base += run) {
      for (int j = 0; j < 16; ++j) {
        for (int i = 0; i < P; ++i) pr[base + i * 16 + j] = xr[base + j * P + i];
      }
    }
    for (int g = 0; g < G; ++g) {
      float s = 0.f;
      for (int k = 0; k < group_size; ++k) s += xr[g * group_size + k];
      xsum[static_cast<size_t>(m) * G + g] = s;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Many rows: dequantize tiles of w and multiply with sgemm. A dot product does not care about the
// order of k, so the tile is dequantized in the permuted order (vector stores) and multiplied with
// the permuted activations.

template <int BITS>
void dequant_generic(const Args& a, int n0, int n1, float* dst) {
  constexpr int P = 8 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1;
  const int chunks = a.group_size / (16 * P);
  const size_t row_bytes = static_cast<size_t>(a.K) * BITS / 8;
  for (int n = n0; n < n1; ++n) {
    const uint8_t* wr = a.w + n * row_bytes;
    float* d = dst + static_cast<size_t>(n - n0) * a.K;
    for (int g = 0; g < a.G; ++g) {
      const size_t at = static_cast<size_t>(n) * a.G + g;
      const float s = scale_at<Generic>(a.scales, a.st, at), b = scale_at<Generic>(a.biases, a.st, at);
      for (int c = 0; c < chunks; ++c) {
        const int chunk = g * chunks + c;
        const uint8_t* by = wr + chunk * 16;
        float* dc = d + chunk * 16 * P;
        for (int i = 0; i < P; ++i) {
          for (int j = 0; j < 16; ++j) dc[i * 16 + j] = s * static_cast<float>((by[j] >> (i * BITS)) & MASK) + b;
        }
      }
    }
  }
}

#ifdef MLXLLAMA_X86
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
template <class V, int BITS>
[[gnu::always_inline]] inline void dequant_simd(const Args& a, int n0, int n1, float* dst) {
  using F = typename V::F;
  using I = typename V::I;
  constexpr int P = 8 / BITS, HALVES = 16 / V::W;
  const I mask = V::set1i((1 << BITS) - 1);
  const int chunks = a.group_size / (16 * P);
  const size_t row_bytes = static_cast<size_t>(a.K) * BITS / 8;
  for (int n = n0; n < n1; ++n) {
    const uint8_t* wr = a.w + n * row_bytes;
    float* d = dst + static_cast<size_t>(n - n0) * a.K;
    for (int g = 0; g < a.G; ++g) {
      const size_t at = static_cast<size_t>(n) * a.G + g;
      const F s = V::set1(scale_at<V>(a.scales, a.st, at));
      const F b = V::set1(scale_at<V>(a.biases, a.st, at));
      for (int c = 0; c < chunks; ++c) {
        const int chunk = g * chunks + c;
        for (int h = 0; h < HALVES; ++h) {
          const I v = V::bytes(wr + chunk * 16 + h * V::W);
          for (int i = 0; i < P; ++i) {
            I qi = v;
            if constexpr (BITS != 8) qi = V::shift_mask(v, i * BITS, mask);
            V::store(d + chunk * 16 * P + i * 16 + h * V::W, V::fmadd(V::to_float(qi), s, b));
          }
        }
      }
    }
  }
}

template <int BITS>
MLXLLAMA_AVX512 void dequant_avx512(const Args& a, int n0, int n1, float* dst) {
  dequant_simd<Avx512, BITS>(a, n0, n1, dst);
}

template <int BITS>
MLXLLAMA_AVX2 void dequant_avx2(const Args& a, int n0, int n1, float* dst) {
  dequant_simd<Avx2, BITS>(a, n0, n1, dst);
}
#pragma GCC diagnostic pop
#endif

using DequantFn = void (*)(const Args&, int, int, float*);

template <int BITS>
DequantFn pick_dequant_bits() {
#ifdef MLXLLAMA_X86
  if (kIsa == Isa::avx512) return dequant_avx512<BITS>;
  if (kIsa == Isa::avx2) return dequant_avx2<BITS>;
#endif
  return dequant_generic<BITS>;
}

DequantFn pick_dequant(int bits) {
  switch (bits) {
    case 2: return pick_dequant_bits<2>();
    case 4: return pick_dequant_bits<4>();
    default: return pick_dequant_bits<8>();
  }
}

// MKL's per-thread thread count, C interface (dlsym: absent with other BLAS libraries).
using SetLocalThreads = int (*)(int);
SetLocalThreads mkl_set_local_threads() {
  static SetLocalThreads f = reinterpret_cast<SetLocalThreads>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
  return f;
}

void run_dense(const Args& a, int bits) {
  const DequantFn dequant = pick_dequant(bits);
  const int tile = std::min(a.N, std::max(32, (256 << 10) / std::max(1, a.K))); // about 1 MB: stays in L2
  const int tiles = (a.N + tile - 1) / tile;
  auto body = [&](int t) {
    thread_local std::vector<float> buf;
    buf.resize(static_cast<size_t>(tile) * a.K);
    const int t0 = t * tile, t1 = std::min(a.N, t0 + tile);
    dequant(a, t0, t1, buf.data());
    cblas_sgemm(kCblasRowMajor, kCblasNoTrans, kCblasTrans, a.M, t1 - t0, a.K, 1.0f, a.xp, a.K, buf.data(), a.K,
                0.0f, a.out + t0, a.N);
  };
  if (SetLocalThreads set_local = mkl_set_local_threads()) {
    // One sequential sgemm per tile on each of our threads (no nested thread teams).
    pool().run(tiles, [&](int t) {
      const int previous = set_local(1);
      body(t);
      set_local(previous);
    });
  } else {
    for (int t = 0; t < tiles; ++t) body(t); // the BLAS threads each call itself
  }
}



constexpr int kSplit = 4; // tasks per thread and matmul: balance on a busy machine, little cost on a quiet one
void run_kernel(const Args& a, int bits) {
  const int mb_max = max_block_rows();
  // Split columns so every thread gets several tasks; small problems run on one thread.
  const size_t work = static_cast<size_t>(a.N) * a.K * a.M;
  const int threads = work < (1 << 16) ? 1 : pool().threads();
  const int per = std::max(4, (a.N + threads * kSplit - 1) / (threads * kSplit) + 3 & ~3); // whole blocks of 4 columns
  const int tasks = (a.N + per - 1) / per;
  auto body = [&](int task) {
    const int n0 = task * per, n1 = std::min(a.N, n0 + per);
    for (int m0 = 0; m0 < a.M; m0 += mb_max) {
      const int mb = std::min(mb_max, a.M - m0);
      pick(bits, mb, a.group_size)(a, m0, n0, n1);
    }
  };
  if (threads == 1) {
    for (int t = 0; t < tasks; ++t) body(t);
  } else {
    pool().run(tasks, body);
  }
}

void quantized_matmul_cpu(const mx::array& x, const mx::array& w, const mx::array& scales,
                          const mx::array& biases, mx::array& out, int group_size, int bits) {
  const int K = x.shape(-1);
  const int M = static_cast<int>(x.size() / std::max(1, K));
  const int N = w.shape(0);
  float* y = out.data<float>();
  if (M == 0 || N == 0) return;
  if (K == 0) {
    std::fill(y, y + static_cast<size_t>(M) * N, 0.f);
    return;
  }
  thread_local std::vector<float> xbuf;
  xbuf.resize(static_cast<size_t>(M) * K);
  gather_rows(x, M, K, xbuf.data());
  detail::qmm_rows(xbuf.data(), M, K, w.data<uint32_t>(), scales.data<void>(), biases.data<void>(),
                   scale_type(scales.dtype()), y, N, group_size, bits);
}

void require_contiguous(const mx::array& a, const char* what) {
  if (!a.flags().row_contiguous) {
    throw std::invalid_argument(std::string("[qmm] ") + what + " must be row-contiguous");
  }
}

} // namespace

namespace detail {

void qmm_rows(const float* x, int M, int K, const uint32_t* w, const void* scales, const void* biases,
              ScaleType st, float* out, int N, int group_size, int bits) {
  Args a{};
  a.w = reinterpret_cast<const uint8_t*>(w);
  a.scales = scales, a.biases = biases, a.st = st, a.out = out;
  a.M = M, a.N = N, a.K = K, a.G = K / group_size, a.group_size = group_size;
  thread_local std::vector<float> xpbuf, sumbuf;
  xpbuf.resize(static_cast<size_t>(M) * K);
  sumbuf.resize(static_cast<size_t>(M) * a.G);
  permute_rows(x, M, K, bits, group_size, xpbuf.data(), sumbuf.data());
  a.xp = xpbuf.data();
  a.xsum = sumbuf.data();
  if (M > max_kernel_rows.load()) {
    run_dense(a, bits);
  } else {
    run_kernel(a, bits);
  }
}

void parallel_for(int tasks, const std::function<void(int)>& f) {
  pool().run(tasks, f);
}

int pool_threads() {
  return pool().threads();
}

} // namespace detail

bool qmm_supported(int bits, int group_size) {
  if (bits != 2 && bits != 4 && bits != 8) return false;
  if (group_size != 32 && group_size != 64 && group_size != 128) return false;
  return group_size * bits % 128 == 0; // whole 16-byte runs per group
}

const char* qmm_isa() {
  switch (kIsa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "generic";
  }
}

int qmm_max_rows() {
  return max_kernel_rows.load();
}

void set_qmm_max_rows(int rows) {
  max_kernel_rows.store(std::clamp(rows, 0, 16));
}

int qmm_threads() {
  return pool().threads();
}

void set_qmm_threads(int n) {
  pool().resize(n <= 0 ? default_threads() : n);
}

mx::array qmm(const mx::array& x, const mx::array& w, const mx::array& scales, const mx::array& biases,
              int group_size, int bits) {
  if (!qmm_supported(bits, group_size)) {
    throw std::invalid_argument("[qmm] unsupported bits/group_size: " + std::to_string(bits) + "/" +
                                std::to_string(group_size));
  }
  if (x.dtype() != mx::float32) throw std::invalid_argument("[qmm] x must be float32");
  if (w.dtype() != mx::uint32 || w.ndim() != 2) throw std::invalid_argument("[qmm] w must be a 2-D uint32 array");
  if (x.ndim() < 1) throw std::invalid_argument("[qmm] x must have at least one dimension");
  const int K = w.shape(1) * 32 / bits;
  if (x.shape(-1) != K) {
    throw std::invalid_argument("[qmm] x has " + std::to_string(x.shape(-1)) + " features, w expects " +
                                std::to_string(K));
  }
  mx::Shape sshape{w.shape(0), K / group_size};
  auto s = mx::default_stream(mx::Device(mx::Device::cpu));
  // float16 and bfloat16 scales are read as they are; others become float32 (biases follow the scales)
  const auto st = mx::issubdtype(scales.dtype(), mx::floating) && scale_supported(scales.dtype()) ? scales.dtype() : mx::float32;
  auto sc = mx::astype(scales, st, s), bi = mx::astype(biases, st, s);
  if (sc.shape() != sshape || bi.shape() != sshape) {
    throw std::invalid_argument("[qmm] scales and biases must have shape (N, K / group_size)");
  }
  mx::Shape out_shape = x.shape();
  out_shape.back() = w.shape(0);
  return mx::array(out_shape, mx::float32, std::make_shared<QuantizedMatmulCPU>(s, group_size, bits),
                   {x, w, sc, bi});
}

void QuantizedMatmulCPU::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& x = inputs[0];
  const auto& w = inputs[1];
  const auto& scales = inputs[2];
  const auto& biases = inputs[3];
  require_contiguous(w, "w");
  require_contiguous(scales, "scales");
  require_contiguous(biases, "biases");
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(x);
  encoder.set_input_array(w);
  encoder.set_input_array(scales);
  encoder.set_input_array(biases);
  encoder.set_output_array(out);
  encoder.dispatch([x = mx::array::unsafe_weak_copy(x), w = mx::array::unsafe_weak_copy(w),
                    scales = mx::array::unsafe_weak_copy(scales), biases = mx::array::unsafe_weak_copy(biases),
                    out = mx::array::unsafe_weak_copy(out), gs = group_size_, bits = bits_]() mutable {
    quantized_matmul_cpu(x, w, scales, biases, out, gs, bits);
  });
}

void QuantizedMatmulCPU::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[qmm] QuantizedMatmulCPU runs on the CPU only");
}

std::vector<mx::array> QuantizedMatmulCPU::vjp(const std::vector<mx::array>& primals,
                                               const std::vector<mx::array>& cotangents,
                                               const std::vector<int>& argnums, const std::vector<mx::array>&) {
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg != 0) throw std::invalid_argument("[qmm] no gradient with respect to the quantized weights");
    // d x = cot @ dequantize(w): dequantized once, then the float32 matmul (BLAS).
    auto wd = mx::dequantize(primals[1], primals[2], primals[3], group_size_, bits_, "affine", std::nullopt,
                             mx::float32, stream());
    grads.push_back(mx::matmul(cotangents[0], wd, stream()));
  }
  return grads;
}

std::vector<mx::Shape> QuantizedMatmulCPU::output_shapes(const std::vector<mx::array>& inputs) {
  mx::Shape shape = inputs[0].shape();
  shape.back() = inputs[1].shape(0);
  return {shape};
}

bool QuantizedMatmulCPU::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const QuantizedMatmulCPU&>(other);
  return group_size_ == o.group_size_ && bits_ == o.bits_;
}

} // namespace mlxllama
