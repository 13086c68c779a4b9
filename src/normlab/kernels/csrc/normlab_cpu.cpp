// normlab CPU kernels: one-sweep normalization forward and backward, parallel (at::parallel_for).
//
// The Python planner (normlab/kernels/cpu.py) maps every op onto one of two canonical layouts:
//
//   row family     x is [R][K][S] contiguous; statistics per row (over its K*S elements), or per
//                  channel c = r % C for batch norm on NCHW ("bn_rows"); parameter index of
//                  element (r, k, s) is (r % Gp) * K + k. Layer/RMS norm: K = features, S = 1;
//                  group norm NCHW: R = N*G, K = C/G, S = spatial; instance norm NCHW: K = 1.
//   column family  x is [O][P][C] contiguous (channels innermost); statistics per (o, g) over the
//                  P rows and the K = C/G channels of group g. Batch norm channels_last: O = 1,
//                  G = C; instance norm: O = N, G = C; group norm: O = N.
//
// Numerics: statistics accumulate in float (double for double inputs). A row is reduced in blocks
// of kBlock elements; each block takes shifted sums (sum of x - x0 and of its square, x0 an
// estimate of the block's mean) and blocks merge with Chan's pairwise update in double, so large
// offsets (1e4 + 0.01 noise) keep their variance. Columns use shifted sums over chunks of rows,
// merged the same way. The mean is carried in double and normalization subtracts it as a float
// pair (hi + lo), which keeps x - mean exact to float rounding at large offsets. Partial sums are
// laid out per fixed-size chunk, not per thread, so results do not depend on the number of threads
// or on scheduling.
//
// Every kernel reads its input at most twice from memory: once when the data one statistic spans
// fits in a core's L2 (a row; a channels_last sample), which one thread then reduces and
// normalizes back to back, or fits in the threads' L2s together (a batch-norm channel, each
// thread reducing and normalizing its own rows of it, with a barrier between); twice when it does
// not (two parallel sweeps). Rows are prefetched one ahead and outputs prefetched for writing,
// since the hardware prefetcher stops at page boundaries and every store otherwise waits for its
// line's read-for-ownership.

#include <ATen/Parallel.h>
#include <omp.h>
#if defined(__linux__)
#include <sched.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using i64 = int64_t;

constexpr i64 kBlock = 4096;        // elements per cached block of a row
constexpr i64 kWork = 16384;        // elements per parallel task (grain)

// ------------------------------------------------------------------------------------------------
// Storage types and conversions. bfloat16 and float16 are 16-bit storage; math runs in float.

struct bf16_t {
  uint16_t bits;
};

#if defined(__FLT16_MAX__)
using fp16_t = _Float16;
inline float to_acc(fp16_t v) { return static_cast<float>(v); }
inline fp16_t fp16_from(float v) { return static_cast<fp16_t>(v); }
#else
struct fp16_t {
  uint16_t bits;
};
inline float to_acc(fp16_t v) {
  const uint32_t h = v.bits, sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp == 0) {
    float f = std::ldexp(static_cast<float>(man), -24);
    std::memcpy(&u, &f, 4);
    u |= sign;
  } else {
    u = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline fp16_t fp16_from(float v) {
  // Round to nearest even through float arithmetic; overflow saturates to inf.
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  float a = std::fabs(v);
  if (std::isnan(v)) return fp16_t{static_cast<uint16_t>(sign | 0x7e00u)};
  if (a >= 65520.0f) return fp16_t{static_cast<uint16_t>(sign | 0x7c00u)};
  if (a < 6.103515625e-05f) {  // subnormal: multiples of 2^-24
    const uint32_t m = static_cast<uint32_t>(std::nearbyint(a * 16777216.0f));
    return fp16_t{static_cast<uint16_t>(sign | m)};
  }
  std::memcpy(&u, &a, 4);
  u += 0xfffu + ((u >> 13) & 1u);
  return fp16_t{static_cast<uint16_t>(sign | (((u >> 23) - 112) << 10) | ((u >> 13) & 0x3ffu))};
}
#endif

inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
inline float to_acc(bf16_t v) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(v.bits) << 16);
}

template <class T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <class T> using acc_t = typename Acc<T>::type;

template <class T> inline T from_acc(acc_t<T> v);
template <> inline float from_acc<float>(float v) { return v; }
template <> inline double from_acc<double>(double v) { return v; }
template <> inline fp16_t from_acc<fp16_t>(float v) { return fp16_from(v); }
template <> inline bf16_t from_acc<bf16_t>(float v) {
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  if ((u & 0x7fffffffu) > 0x7f800000u) r = (u >> 16) | 0x40u;  // NaN stays NaN
  return bf16_t{static_cast<uint16_t>(r)};
}

// ------------------------------------------------------------------------------------------------
// Activations applied after the affine map (fused norm + activation).

enum { ACT_NONE = 0, ACT_RELU = 1, ACT_SILU = 2, ACT_GELU = 3 };

// Vectorizable float exp and erf: glibc's expf/erff are scalar calls unless -ffast-math, which
// would also drop NaN/inf semantics. exp: Cody-Waite reduction x = n ln2 + r and Cephes' degree-6
// polynomial (about 1 ulp); erf: Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7).
inline float vexp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // Round to nearest with the 1.5 * 2^23 trick: floorf does not vectorize without -ffast-math.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  const float z = r * r;
  const float p = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r +
                    4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f;
  const float e = p * z + r + 1.0f;
  // __builtin_bit_cast, not memcpy: a memcpy through the stack blocks vectorization.
  return e * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
}

inline float verf(float x) {
  const float a = std::fabs(x);
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  const float poly =
      ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t +
       0.254829592f) * t;
  const float y = 1.0f - poly * vexp(-a * a);
  return std::copysign(y, x);
}

inline float exp_(float x) { return vexp(x); }
inline double exp_(double x) { return std::exp(x); }
inline float erf_(float x) { return verf(x); }
inline double erf_(double x) { return std::erf(x); }

template <int ACT, class A> inline A act_fwd(A z) {
  if constexpr (ACT == ACT_RELU) {
    return z < A(0) ? A(0) : z;  // NaN stays NaN, as torch.relu (a max instruction would drop it)
  } else if constexpr (ACT == ACT_SILU) {
    return z / (A(1) + exp_(-z));
  } else if constexpr (ACT == ACT_GELU) {
    return A(0.5) * z * (A(1) + erf_(z * A(0.70710678118654752440)));
  } else {
    return z;
  }
}

// d act(z) / dz
template <int ACT, class A> inline A act_grad(A z) {
  if constexpr (ACT == ACT_RELU) {
    return z > A(0) ? A(1) : A(0);
  } else if constexpr (ACT == ACT_SILU) {
    const A s = A(1) / (A(1) + exp_(-z));
    return s * (A(1) + z * (A(1) - s));
  } else if constexpr (ACT == ACT_GELU) {
    const A cdf = A(0.5) * (A(1) + erf_(z * A(0.70710678118654752440)));
    return cdf + z * A(0.39894228040143267794) * exp_(A(-0.5) * z * z);
  } else {
    return A(1);
  }
}

// ------------------------------------------------------------------------------------------------
// Software prefetch over a sweep.

// Runs f(e0, n) over [0, m) in steps of 256 elements, first prefetching the lines kAhead bytes
// past each step (RW = 1: for writing), spread over the sweep: the hardware prefetcher stops at
// page boundaries, and a burst of prefetches per 4 KB stretch stalled on the fill buffers.
// Prefetches the cache lines of [p, p + bytes) (RW = 1: for writing).
template <int RW> inline void prefetch_lines(const void* p, i64 bytes) {
  const char* c = static_cast<const char*>(p);
  for (i64 q = 0; q < bytes; q += 64) __builtin_prefetch(c + q, RW);
}

template <int RW, i64 kAhead, class F, class... Ts>
inline void prefetched_steps(i64 m, F&& f, Ts*... ps) {
  constexpr i64 kStep = 256;
  for (i64 e0 = 0; e0 < m; e0 += kStep) {
    const i64 n = std::min(kStep, m - e0);
    (prefetch_lines<RW>(reinterpret_cast<const char*>(ps + e0) + kAhead,
                        n * static_cast<i64>(sizeof(*ps))), ...);
    f(e0, n);
  }
}

// Output written 512 bytes behind its prefetch, so each store's read-for-ownership overlaps the
// work before it (as normalize_row's sweep): eval batch norm 32x64x56x56 channels_last 81% of
// copy speed with a 4 KB burst per stretch, 91-96% so.
template <class T, class F> inline void write_ahead(T* out, i64 m, F&& f) {
  prefetched_steps<1, 512>(m, std::forward<F>(f), out);
}

// Input read 4 KB behind its prefetch: the statistics sweeps of channels_last group norm
// (32x64x56x56: 60-65% -> 70-73% of copy speed; 8x64x112x112: 54-56% -> 63-64%). 2 KB and 8 KB
// measured no better; on the backward's sums sweep (x and dy) it measured no gain.
template <class F, class... Ts> inline void read_ahead(i64 m, F&& f, const Ts*... in) {
  prefetched_steps<0, 4096>(m, std::forward<F>(f), in...);
}

// ------------------------------------------------------------------------------------------------
// Statistics.

struct Moments {
  double count = 0, mean = 0, m2 = 0;
  void merge(double n, double m, double q) {  // Chan et al.'s pairwise update
    if (n <= 0) return;
    const double tot = count + n, delta = m - mean;
    mean += delta * (n / tot);
    m2 += q + delta * delta * (count * n / tot);
    count = tot;
  }
};

// Reductions keep kLanes independent partial sums: one accumulator would serialize every add on
// its latency (4 cycles), which is slower than the memory stream the sums ride on.
constexpr int kLanes = 32;

template <class A, class F> inline A reduce_sum(i64 n, F f) {
  A acc[kLanes] = {};
  i64 i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += f(i + j);
  }
  A tail = 0;
  for (; i < n; ++i) tail += f(i);
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  }
  return acc[0] + tail;
}

// Two sums at once: f(i, a, b) adds its terms to a and b. pf, pf2 / pfw (optional): lines to
// prefetch for reading / writing along the way, pf_step bytes per kLanes elements.
template <class A, class F>
inline void reduce_sum2(i64 n, A& out_a, A& out_b, F f, const char* pf = nullptr, i64 pf_step = 0,
                        char* pfw = nullptr, const char* pf2 = nullptr) {
  A a[kLanes] = {}, b[kLanes] = {};
  i64 i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    if (pf != nullptr) {
      const i64 at = i / kLanes * pf_step;
      for (i64 o = 0; o < pf_step; o += 64) __builtin_prefetch(pf + at + o);
      if (pf2 != nullptr) {
        for (i64 o = 0; o < pf_step; o += 64) __builtin_prefetch(pf2 + at + o);
      }
      if (pfw != nullptr) {
        for (i64 o = 0; o < pf_step; o += 64) __builtin_prefetch(pfw + at + o, 1);
      }
    }
    for (int j = 0; j < kLanes; ++j) f(i + j, a[j], b[j]);
  }
  A ta = 0, tb = 0;
  for (; i < n; ++i) f(i, ta, tb);
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int j = 0; j < w; ++j) {
      a[j] += a[j + w];
      b[j] += b[j + w];
    }
  }
  out_a = a[0] + ta;
  out_b = b[0] + tb;
}

// Mean and M2 of one cached block in one sweep of shifted sums: with d = x - x0,
// M2 = sum d^2 - (sum d)^2 / n. The cancellation costs about eps * (x0 - mean)^2 / var relative,
// so the shift is the mean of the first few elements (an outlier there is diluted), which keeps
// 1e4 + 0.01 * noise exact to float rounding. A second sweep (two-pass) measured 15% slower on
// 4096 x 1024 rows.
template <class T>
inline void block_moments(const T* p, i64 n, double& mean, double& m2, const T* next = nullptr,
                          T* out = nullptr) {
  using A = acc_t<T>;
  A x0 = 0;
  const i64 n0 = std::min<i64>(n, 8);
  for (i64 i = 0; i < n0; ++i) x0 += to_acc(p[i]);
  x0 /= static_cast<A>(n0);
  A s, q;
  reduce_sum2<A>(n, s, q, [&](i64 i, A& sa, A& qa) {
    const A d = to_acc(p[i]) - x0;
    sa += d;
    qa += d * d;
  }, reinterpret_cast<const char*>(next), kLanes * static_cast<i64>(sizeof(T)),
     reinterpret_cast<char*>(out));
  const double sd = static_cast<double>(s) / static_cast<double>(n);
  mean = static_cast<double>(x0) + sd;
  m2 = std::max(0.0, static_cast<double>(q) - static_cast<double>(s) * sd);
}

// Sum of squares: float partial sums over short runs (32 lanes x 8 terms), added in double. RMS
// norm has no centering to absorb rounding, so this keeps the error at a few float ulps. The
// lanes stay separate in double until the end: a horizontal reduction per 256-element run made
// the RMS forward slower than layer norm's two sums.
template <class T>
inline double block_sumsq(const T* p, i64 n, const T* next = nullptr, T* out = nullptr) {
  using A = acc_t<T>;
  constexpr i64 kRun = 256;
  double lanes[kLanes] = {};
  double tail = 0;
  for (i64 i0 = 0; i0 < n; i0 += kRun) {
    const T* b = p + i0;
    const i64 m = std::min<i64>(kRun, n - i0);
    A acc[kLanes] = {};
    i64 i = 0;
    for (; i + kLanes <= m; i += kLanes) {
      // the next row and this row's output, a few lines per step (as reduce_sum2 does)
      constexpr i64 kStepBytes = kLanes * static_cast<i64>(sizeof(T));
      if (next != nullptr) {
        const char* q = reinterpret_cast<const char*>(next + i0 + i);
        for (i64 o = 0; o < kStepBytes; o += 64) __builtin_prefetch(q + o);
      }
      if (out != nullptr) {
        char* q = reinterpret_cast<char*>(out + i0 + i);
        for (i64 o = 0; o < kStepBytes; o += 64) __builtin_prefetch(q + o, 1);
      }
      for (int j = 0; j < kLanes; ++j) {
        const A v = to_acc(b[i + j]);
        acc[j] += v * v;
      }
    }
    for (int j = 0; j < kLanes; ++j) lanes[j] += static_cast<double>(acc[j]);
    for (; i < m; ++i) {
      const double v = static_cast<double>(to_acc(b[i]));
      tail += v * v;
    }
  }
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int j = 0; j < w; ++j) lanes[j] += lanes[j + w];
  }
  return lanes[0] + tail;
}

// Mean and M2 (sum of squared deviations) of a contiguous run; RMS norm (center = 0) returns
// mean 0 and the sum of squares.
// `next` (optional): the next run of the same length, prefetched a little per stretch of this
// one's reduction; `out`: this run's output, prefetched for writing the same way, so the normalize
// sweep's stores find their lines owned (measured 6% on 4096 x 1024 layer norm).
template <class T>
inline void run_moments(const T* p, i64 L, int center, double& mean, double& m2,
                        const T* next = nullptr, T* out = nullptr) {
  auto at = [](auto* q, i64 i0) { return q != nullptr ? q + i0 : nullptr; };
  if (!center) {
    double ss = 0;
    for (i64 i0 = 0; i0 < L; i0 += kBlock)
      ss += block_sumsq(p + i0, std::min(kBlock, L - i0), at(next, i0), at(out, i0));
    mean = 0;
    m2 = ss;
    return;
  }
  if (L <= kBlock) {
    block_moments(p, L, mean, m2, next, out);
    return;
  }
  Moments acc;
  for (i64 i0 = 0; i0 < L; i0 += kBlock) {
    const i64 n = std::min(kBlock, L - i0);
    double bm, bq;
    block_moments(p + i0, n, bm, bq, at(next, i0), at(out, i0));
    acc.merge(static_cast<double>(n), bm, bq);
  }
  mean = acc.mean;
  m2 = acc.m2;
}

// ------------------------------------------------------------------------------------------------
// Row family.

// y = act(((x - mean) * rstd) * w + b) over one row; the mean is subtracted as a float pair.
template <class T, int ACT>
inline void normalize_row(const T* src, T* y, i64 K, i64 S, i64 cbase, double mean,
                          acc_t<T> rs, const acc_t<T>* w, const acc_t<T>* b) {
  using A = acc_t<T>;
  const A mh = static_cast<A>(mean), ml = static_cast<A>(mean - static_cast<double>(mh));
  if (S == 1) {
    const A* wc = w + cbase;
    const A* bc = b + cbase;
#pragma omp simd
    for (i64 k = 0; k < K; ++k) {
      const A v = ((to_acc(src[k]) - mh) - ml) * rs * wc[k] + bc[k];
      y[k] = from_acc<T>(act_fwd<ACT>(v));
    }
    return;
  }
  for (i64 k = 0; k < K; ++k) {
    // (x - hi - lo) * a + b == (x - hi) * a + (b - lo * a): the low part folds into the shift.
    const A a = rs * w[cbase + k], bb = b[cbase + k] - ml * a;
    const T* s = src + k * S;
    T* o = y + k * S;
    if constexpr (ACT != ACT_NONE) {  // compute-bound: one long vector loop
#pragma omp simd
      for (i64 i = 0; i < S; ++i) o[i] = from_acc<T>(act_fwd<ACT>((to_acc(s[i]) - mh) * a + bb));
      continue;
    }
    // Output lines are prefetched for writing 512 bytes ahead, so the read-for-ownership of each
    // store overlaps the work before it (eval batch norm 32x64x56x56: 3.52 -> 3.05 ms).
    constexpr i64 kStep = 256, kAhead = 512;
    for (i64 i0 = 0; i0 < S; i0 += kStep) {
      const i64 n = std::min(kStep, S - i0);
      char* ahead = reinterpret_cast<char*>(o + i0) + kAhead;
      const i64 bytes = n * static_cast<i64>(sizeof(T));
      for (i64 q = 0; q < bytes; q += 64) __builtin_prefetch(ahead + q, 1);
      const T* si = s + i0;
      T* oi = o + i0;
#pragma omp simd
      for (i64 i = 0; i < n; ++i) {
        const A v = (to_acc(si[i]) - mh) * a + bb;
        oi[i] = from_acc<T>(act_fwd<ACT>(v));
      }
    }
  }
}

constexpr i64 kPrefetchRow = 16 * kBlock;  // longest row whose successor is prefetched (in L2)

inline i64 grain_rows(i64 L) { return std::max<i64>(1, kWork / std::max<i64>(L, 1)); }

template <class T, int ACT>
void row_forward(const T* x, const T* res, T* sum_out, T* y, i64 R, i64 K, i64 S, i64 Gp,
                 const acc_t<T>* w, const acc_t<T>* b, double eps, int center, acc_t<T>* mean_o,
                 acc_t<T>* var_o, acc_t<T>* rstd_o) {
  using A = acc_t<T>;
  const i64 L = K * S;
  at::parallel_for(0, R, grain_rows(L), [&](i64 r0, i64 r1) {
    for (i64 r = r0; r < r1; ++r) {
      const T* src = x + r * L;
      if (res != nullptr) {  // residual add: the sum is an output and the normalized input
        T* so = sum_out + r * L;
        const T* rp = res + r * L;
        const T* xr = src;
        // Two outputs stream out (sum and y): the sum's lines are prefetched for writing, and
        // the next row's x and residual for reading, spread over the add (with an activation
        // too: add + layer norm + GELU measured 3-5% faster with them, unlike group norm + SiLU).
        const bool pf = r + 1 < r1 && L <= kPrefetchRow;
        write_ahead(so, L, [&](i64 e0, i64 n) {
          if (pf) {  // the same elements of the next row
            prefetch_lines<0>(xr + L + e0, n * static_cast<i64>(sizeof(T)));
            prefetch_lines<0>(rp + L + e0, n * static_cast<i64>(sizeof(T)));
          }
#pragma omp simd
          for (i64 i = e0; i < e0 + n; ++i) so[i] = from_acc<T>(to_acc(xr[i]) + to_acc(rp[i]));
        });
        src = so;
      }
      // The hardware prefetcher stops at every page boundary, and rows are often a page or a few:
      // the reduction prefetches the next row a few lines per stretch (a burst of 64 prefetches
      // up front stalled on the line-fill buffers and measured 10% slower on 4096 x 1024).
      // Not with a fused activation: its normalize sweep is compute-bound, and the prefetched
      // lines only crowd the cache (group norm + SiLU measured 10% slower with them).
      const T* next = (ACT == ACT_NONE && r + 1 < r1 && L <= kPrefetchRow && res == nullptr)
                          ? x + (r + 1) * L
                          : nullptr;
      double m, q;
      run_moments(src, L, center, m, q, next, next ? y + r * L : nullptr);
      const double var = q / static_cast<double>(L);
      const A rs = static_cast<A>(1.0 / std::sqrt(var + eps));
      mean_o[r] = static_cast<A>(m);
      var_o[r] = static_cast<A>(var);
      rstd_o[r] = rs;
      normalize_row<T, ACT>(src, y + r * L, K, S, (r % Gp) * K, m, rs, w, b);
    }
  });
}

// Normalize with given statistics, indexed per row (smod = 0) or per r % smod: the mean and the
// variance (the caller's buffers, read only); rstd_o receives 1 / sqrt(var + eps) for each.
template <class T, int ACT>
void row_normalize(const T* x, T* y, i64 R, i64 K, i64 S, i64 Gp, i64 smod, const acc_t<T>* w,
                   const acc_t<T>* b, const acc_t<T>* mean, const acc_t<T>* var, double eps,
                   acc_t<T>* rstd_o) {
  using A = acc_t<T>;
  const i64 L = K * S;
  const i64 nstats = smod ? smod : R;
  for (i64 i = 0; i < nstats; ++i) {
    rstd_o[i] = static_cast<A>(1.0 / std::sqrt(static_cast<double>(var[i]) + eps));
  }
  at::parallel_for(0, R, grain_rows(L), [&](i64 r0, i64 r1) {
    for (i64 r = r0; r < r1; ++r) {
      const i64 si = smod ? r % smod : r;
      normalize_row<T, ACT>(x + r * L, y + r * L, K, S, (r % Gp) * K, mean[si], rstd_o[si], w, b);
    }
  });
}

// Backward of the row family. gw_part/gb_part: for S == 1 and Gp == 1 (layer/RMS norm),
// [nchunk][K] per chunk of rows, which the caller sums; otherwise the [Gp * K] gradients.
template <class T, int ACT>
void row_backward(const T* dy, const T* x, const T* dextra, T* dx, i64 R, i64 K, i64 S, i64 Gp,
                  i64 smod, const acc_t<T>* w, const acc_t<T>* b, const acc_t<T>* mean,
                  const acc_t<T>* rstd, int center, int batch_stats, acc_t<T>* gw_part,
                  acc_t<T>* gb_part, i64 nchunk) {
  using A = acc_t<T>;
  const i64 L = K * S;
  const A inv_L = A(1) / static_cast<A>(L);
  // dbuf (fused activation, S > 1): d = dy * act'(z) kept from the first sweep for the second,
  // so the activation's derivative is evaluated once per element.
  // prefetch_next (S > 1, no activation): row r + 1 is next on this thread; its x and dy are
  // prefetched during this row's reductions and this row's dx for writing, as in the forward.
  auto one_row = [&](i64 r, A* gw, A* gb, bool accumulate, A* dbuf, bool prefetch_next = false) {
    const i64 si = smod ? r % smod : r;
    const A m = center ? mean[si] : A(0), rs = rstd[si];
    const i64 cbase = (r % Gp) * K;
    const T* xr = x + r * L;
    const T* dyr = dy + r * L;
    A sg = 0, sgx = 0;
    if (S == 1) {
      const A* wc = w + cbase;
      const A* bc = b + cbase;
      reduce_sum2<A>(K, sg, sgx, [&](i64 k, A& ga, A& gxa) {
        const A xh = (to_acc(xr[k]) - m) * rs;
        A d = to_acc(dyr[k]);
        if constexpr (ACT != ACT_NONE) d *= act_grad<ACT>(xh * wc[k] + bc[k]);
        gw[k] += d * xh;
        gb[k] += d;
        const A g = d * wc[k];
        ga += g;
        gxa += g * xh;
      });
    } else {
      const bool pf = ACT == ACT_NONE && prefetch_next && L <= kPrefetchRow;
      for (i64 k = 0; k < K; ++k) {
        const A wk = w[cbase + k], bk = b[cbase + k];
        const T* xs = xr + k * S;
        const T* ds = dyr + k * S;
        A* dk = ACT != ACT_NONE ? dbuf + k * S : nullptr;
        A sd, sdx;
        reduce_sum2<A>(S, sd, sdx, [&](i64 i, A& da, A& dxa) {
          const A xh = (to_acc(xs[i]) - m) * rs;
          A d = to_acc(ds[i]);
          if constexpr (ACT != ACT_NONE) {
            d *= act_grad<ACT>(xh * wk + bk);
            dk[i] = d;
          }
          da += d;
          dxa += d * xh;
        }, pf ? reinterpret_cast<const char*>(xs + L) : nullptr,
           kLanes * static_cast<i64>(sizeof(T)),
           pf && dx != nullptr ? reinterpret_cast<char*>(dx + r * L + k * S) : nullptr,
           pf ? reinterpret_cast<const char*>(ds + L) : nullptr);
        if (accumulate) {
          gw[k] += sdx;
          gb[k] += sd;
        } else {
          gw[k] = sdx;
          gb[k] = sd;
        }
        sg += wk * sd;
        sgx += wk * sdx;
      }
    }
    if (dx == nullptr) return;
    const A c1 = (batch_stats && center) ? sg * inv_L : A(0);
    const A c2 = batch_stats ? sgx * inv_L : A(0);
    T* dxr = dx + r * L;
    const T* der = dextra ? dextra + r * L : nullptr;
    // The optional extra gradient is a compile-time case: a test inside the vector loop turns
    // every operation into a masked one (measured 2.5x slower).
    auto sweep = [&](auto has_e) {
      if (S == 1) {
        const A* wc = w + cbase;
        const A* bc = b + cbase;
#pragma omp simd
        for (i64 k = 0; k < K; ++k) {
          const A xh = (to_acc(xr[k]) - m) * rs;
          A d = to_acc(dyr[k]);
          if constexpr (ACT != ACT_NONE) d *= act_grad<ACT>(xh * wc[k] + bc[k]);
          A v = rs * (d * wc[k] - c1 - xh * c2);
          if constexpr (decltype(has_e)::value) v += to_acc(der[k]);
          dxr[k] = from_acc<T>(v);
        }
        return;
      }
      for (i64 k = 0; k < K; ++k) {
        const A wk = w[cbase + k];
        const T* xs = xr + k * S;
        const T* ds = dyr + k * S;
        const T* es = decltype(has_e)::value ? der + k * S : nullptr;
        const A* dk = ACT != ACT_NONE ? dbuf + k * S : nullptr;
        T* o = dxr + k * S;
#pragma omp simd
        for (i64 i = 0; i < S; ++i) {
          const A xh = (to_acc(xs[i]) - m) * rs;
          A d;
          if constexpr (ACT != ACT_NONE) {
            d = dk[i];
          } else {
            d = to_acc(ds[i]);
          }
          A v = rs * (d * wk - c1 - xh * c2);
          if constexpr (decltype(has_e)::value) v += to_acc(es[i]);
          o[i] = from_acc<T>(v);
        }
      }
    };
    if (der != nullptr) {
      sweep(std::true_type{});
    } else {
      sweep(std::false_type{});
    }
  };
  // Layer/RMS norm: two rows at a time, so the per-element weight/bias gradient accumulators are
  // read and written once per pair (measured 2x faster than row by row on 4096 x 1024). With a
  // fused activation, d = dy * act'(z) is first written to `dbuf` (2K) in a vector loop of its own:
  // inside the reductions below the activation's exp/erf kept them scalar (8x slower for GELU).
  // prefetch_next: the pair after this one is in the same chunk; its x and dy rows are prefetched
  // during this pair's reductions (rows of a page or a few, where the hardware prefetcher stops),
  // and this pair's dx rows for writing (layer norm forward+backward 7.3 -> 6.3 ms on 4096 x 1024).
  auto two_rows = [&](i64 r, A* gw, A* gb, A* dbuf, bool prefetch_next) {
    const T* xr[2] = {x + r * L, x + (r + 1) * L};
    A m[2], rs[2], c1[2], c2[2];
    const i64 cbase = (r % Gp) * K;  // Gp == 1 for layer/RMS norm: both rows share it
    const A* wc = w + cbase;
    const A* bc = b + cbase;
    for (int h = 0; h < 2; ++h) {
      const i64 si = smod ? (r + h) % smod : r + h;
      m[h] = center ? mean[si] : A(0);
      rs[h] = rstd[si];
    }
    // core(d0, d1): the two rows' upstream gradients as T (no activation) or A (dbuf).
    auto core = [&](const auto* g0, const auto* g1) {
      using G = std::remove_cv_t<std::remove_pointer_t<decltype(g0)>>;
      const G* gr[2] = {g0, g1};
      for (int h = 0; h < 2; ++h) {
        const T* xh_ = xr[h];
        const G* dh = gr[h];
        const A mh = m[h], rh = rs[h];
        A sg, sgx;
        const bool pf = prefetch_next && K <= kPrefetchRow;
        reduce_sum2<A>(K, sg, sgx, [&](i64 k, A& ga, A& gxa) {
          const A xh = (to_acc(xh_[k]) - mh) * rh;
          const A g = to_acc(dh[k]) * wc[k];
          ga += g;
          gxa += g * xh;
        }, pf ? reinterpret_cast<const char*>(x + (r + 2 + h) * L) : nullptr,
           kLanes * static_cast<i64>(sizeof(T)),
           pf && dx != nullptr ? reinterpret_cast<char*>(dx + (r + h) * L) : nullptr,
           pf ? reinterpret_cast<const char*>(dy + (r + 2 + h) * L) : nullptr);
        c1[h] = (batch_stats && center) ? sg * inv_L : A(0);
        c2[h] = batch_stats ? sgx * inv_L : A(0);
      }
      // Branch-free inner loops: the dx / extra-gradient cases are separate instantiations, and
      // the row constants are plain scalars (small arrays indexed in the loop spilled to the
      // stack).
      const A m0 = m[0], m1 = m[1], r0 = rs[0], r1 = rs[1];
      const A a0 = c1[0], a1 = c1[1], b0 = c2[0], b1 = c2[1];
      const T* x0 = xr[0];
      const T* x1 = xr[1];
      auto sweep = [&](auto has_dx, auto has_e) {
        T* dx0 = has_dx ? dx + r * L : nullptr;
        T* dx1 = has_dx ? dx + (r + 1) * L : nullptr;
        const T* e0 = has_e ? dextra + r * L : nullptr;
        const T* e1 = has_e ? dextra + (r + 1) * L : nullptr;
#pragma omp simd
        for (i64 k = 0; k < K; ++k) {
          const A xh0 = (to_acc(x0[k]) - m0) * r0;
          const A xh1 = (to_acc(x1[k]) - m1) * r1;
          const A d0 = to_acc(g0[k]), d1 = to_acc(g1[k]);
          gw[k] += d0 * xh0 + d1 * xh1;
          gb[k] += d0 + d1;
          if constexpr (decltype(has_dx)::value) {
            A v0 = r0 * (d0 * wc[k] - a0 - xh0 * b0);
            A v1 = r1 * (d1 * wc[k] - a1 - xh1 * b1);
            if constexpr (decltype(has_e)::value) {
              v0 += to_acc(e0[k]);
              v1 += to_acc(e1[k]);
            }
            dx0[k] = from_acc<T>(v0);
            dx1[k] = from_acc<T>(v1);
          }
        }
      };
      using yes = std::true_type;
      using no = std::false_type;
      if (dx == nullptr) {
        sweep(no{}, no{});
      } else if (dextra == nullptr) {
        sweep(yes{}, no{});
      } else {
        sweep(yes{}, yes{});
      }
    };
    if constexpr (ACT == ACT_NONE) {
      core(dy + r * L, dy + (r + 1) * L);
    } else {
      for (int h = 0; h < 2; ++h) {
        const T* xh_ = xr[h];
        const T* dh = dy + (r + h) * L;
        A* out = dbuf + h * K;
        const A mh = m[h], rh = rs[h];
#pragma omp simd
        for (i64 k = 0; k < K; ++k) {
          out[k] = to_acc(dh[k]) * act_grad<ACT>((to_acc(xh_[k]) - mh) * rh * wc[k] + bc[k]);
        }
      }
      core(static_cast<const A*>(dbuf), static_cast<const A*>(dbuf + K));
    }
  };
  if (S == 1 && Gp == 1) {
    const i64 rows_per = (R + nchunk - 1) / nchunk;
    at::parallel_for(0, nchunk, 1, [&](i64 c0, i64 c1) {
      std::vector<A> dbuf(ACT != ACT_NONE ? 2 * K : 0);
      for (i64 ch = c0; ch < c1; ++ch) {
        A* gw = gw_part + ch * K;
        A* gb = gb_part + ch * K;
        std::fill(gw, gw + K, A(0));
        std::fill(gb, gb + K, A(0));
        const i64 r_end = std::min(R, (ch + 1) * rows_per);
        i64 r = ch * rows_per;
        for (; r + 1 < r_end; r += 2) two_rows(r, gw, gb, dbuf.data(), r + 3 < r_end);
        if (r < r_end) one_row(r, gw, gb, true, nullptr);
      }
    });
  } else {
    // Partials per row ([R / Gp][Gp * K]), summed here over the samples in a fixed order into
    // gw_part/gb_part, which then hold the Gp * K parameter gradients (a torch buffer, sum and
    // unbind per call were most of a small backward's host time).
    std::vector<A> pw(R * K), pb(R * K);
    at::parallel_for(0, R, grain_rows(L), [&](i64 r0, i64 r1) {
      std::vector<A> dbuf(ACT != ACT_NONE ? L : 0);
      for (i64 r = r0; r < r1; ++r) {
        if (S == 1) {  // the S == 1 sweep accumulates into its partials
          std::fill(pw.data() + r * K, pw.data() + (r + 1) * K, A(0));
          std::fill(pb.data() + r * K, pb.data() + (r + 1) * K, A(0));
        }
        one_row(r, pw.data() + r * K, pb.data() + r * K, false, dbuf.data(), r + 1 < r1);
      }
    });
    const i64 GK = Gp * K, n = R / Gp;
    std::vector<double> tw(GK, 0.0), tb(GK, 0.0);
    for (i64 i = 0; i < n; ++i) {
#pragma omp simd
      for (i64 j = 0; j < GK; ++j) {
        tw[j] += static_cast<double>(pw[i * GK + j]);
        tb[j] += static_cast<double>(pb[i * GK + j]);
      }
    }
    for (i64 j = 0; j < GK; ++j) {
      gw_part[j] = static_cast<A>(tw[j]);
      gb_part[j] = static_cast<A>(tb[j]);
    }
  }
}

// Batch norm on an [N][C][S] input: per-row moments, merged per channel across the batch, then
// one normalize sweep. When a thread's share of a channel's rows fits in L2 with room for the
// output, the channels are done one after another by all threads together, each on its own rows
// (moments, a barrier, normalize), so the normalize sweep reads its rows from its own cache; a
// channel per thread where that does not pay or cannot run (channel_team); two parallel sweeps
// over the whole tensor for larger channels (channel_schedule). All schedules compute the same
// numbers (per-row partials merged in row order).
constexpr i64 kChannelBytes = 512 << 10;

#define NL_NOINLINE __attribute__((noinline))

// CPUs in this process's affinity mask (the machine's count where that is unknown).
inline int usable_cpus() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

// Threads for the shared-channel schedule over `rows` rows of `row_bytes` each: all of them when
// the channel would crowd one core's L2 next to its output (from kTeamChannelBytes), each thread
// gets a row, and each thread's share is between kTeamShareBytes and kChannelBytes; 0 otherwise
// (one thread inside a parallel region: nested regions run serially anyway).
// - Sharing a 401 KB channel (32x64x56x56) made the backward 7% faster on 2 cores, an 802 KB one
//   (64x64x56x56), which had taken two sweeps, 15-20%; on 100-200 KB channels the two schedules
//   measured alike, and on 8 KB ones (32x32x8x8) sharing was 3-7% slower: a barrier per channel
//   must have enough work per thread behind it.
// - Not when the threads outnumber the CPUs this process may run on: a team that waits at a
//   barrier per channel then waits for time slices (fwd+bwd 32x64x56x56, 8 threads on 2 CPUs:
//   9.9 ms with a channel per thread, 12.2 ms sharing channels).
constexpr i64 kTeamChannelBytes = 256 << 10;
constexpr i64 kTeamShareBytes = 64 << 10;

inline int channel_team(i64 rows, i64 row_bytes) {
  static const int cpus = usable_cpus();
  const int n = at::in_parallel_region() ? 1 : at::get_num_threads();
  const i64 bytes = rows * row_bytes;
  const bool fits = bytes >= kTeamChannelBytes && bytes >= kTeamShareBytes * n &&
                    bytes <= kChannelBytes * n;
  return n <= cpus && rows >= n && fits ? n : 0;
}

// The single-read schedules of a per-channel statistic over [N][C][S] rows of row_bytes each:
// reduce(r, prefetch_next) on every row r of channel c, then finish(c, n0, n1, publish) on rows
// [n0, n1) of it once all its rows are reduced (publish: the one call that writes the channel's
// outputs). All threads share each channel, each on its own rows with a barrier between, when
// channel_team allows; else a channel per thread when a channel fits kChannelBytes; false when
// neither does (the caller then takes two sweeps over the whole tensor).
template <class Reduce, class Finish>
bool channel_schedule(i64 N, i64 C, i64 row_bytes, Reduce&& reduce, Finish&& finish) {
  if (const int nt = channel_team(N, row_bytes)) {
    auto body = [&](int t, int team) {
      const i64 n0 = N * t / team, n1 = N * (t + 1) / team;
      for (i64 c = 0; c < C; ++c) {
        for (i64 n = n0; n < n1; ++n) reduce(n * C + c, n + 1 < n1);
        if (team > 1) {
#pragma omp barrier
        }
        finish(c, n0, n1, t == 0);
      }
    };
    if (nt == 1) {
      body(0, 1);
    } else {
      // nt is the team's actual size, which OpenMP may reduce.
#pragma omp parallel num_threads(nt)
      body(omp_get_thread_num(), omp_get_num_threads());
    }
    return true;
  }
  if (N * row_bytes > kChannelBytes) return false;
  at::parallel_for(0, C, 1, [&](i64 c0, i64 c1) {
    for (i64 c = c0; c < c1; ++c) {
      for (i64 n = 0; n < N; ++n) reduce(n * C + c, n + 1 < N);
      finish(c, 0, N, true);
    }
  });
  return true;
}

template <class T, int ACT>
void bn_rows_forward(const T* x, T* y, i64 N, i64 C, i64 S, const acc_t<T>* w, const acc_t<T>* b,
                     double eps, acc_t<T>* mean_o, acc_t<T>* var_o, acc_t<T>* rstd_o) {
  using A = acc_t<T>;
  const i64 R = N * C;
  std::vector<double> rm(R), rq(R);
  // The channel's mean and 1 / sqrt(var + eps) from its rows' partials; the outputs written when
  // `publish` (one thread of a team).
  auto merge_channel = [&](i64 c, bool publish = true) {
    double m = 0;  // equal counts: the mean of row means, then Chan's M2
    for (i64 n = 0; n < N; ++n) m += rm[n * C + c];
    m /= static_cast<double>(N);
    double q = 0;
    for (i64 n = 0; n < N; ++n) {
      const double d = rm[n * C + c] - m;
      q += rq[n * C + c] + static_cast<double>(S) * d * d;
    }
    const double var = q / static_cast<double>(N * S);
    const A rs = static_cast<A>(1.0 / std::sqrt(var + eps));
    if (publish) {
      mean_o[c] = static_cast<A>(m);
      var_o[c] = static_cast<A>(var);
      rstd_o[c] = rs;
    }
    return std::pair<double, A>(m, rs);
  };
  // The per-row work is out of line (NL_NOINLINE) so that every schedule runs the same machine code
  // and computes the same bits: inlined into two callers, GCC contracted the fused activation's
  // arithmetic differently (dx of batch norm + SiLU differed by an ulp between schedules).
  auto moments_row = [&](i64 r, bool prefetch_next) NL_NOINLINE {
    // The channel's rows are strided, which the hardware prefetcher does not follow.
    run_moments(x + r * S, S, 1, rm[r], rq[r],
                prefetch_next && S <= kPrefetchRow ? x + (r + C) * S : nullptr);
  };
  auto normalize_one = [&](i64 r, std::pair<double, A> st) NL_NOINLINE {
    normalize_row<T, ACT>(x + r * S, y + r * S, 1, S, r % C, st.first, st.second, w, b);
  };
  auto normalize_rows_of = [&](i64 c, i64 n0, i64 n1, std::pair<double, A> st) {
    for (i64 n = n0; n < n1; ++n) normalize_one(n * C + c, st);
  };
  if (channel_schedule(N, C, S * static_cast<i64>(sizeof(T)), moments_row,
                       [&](i64 c, i64 n0, i64 n1, bool publish) {
                         normalize_rows_of(c, n0, n1, merge_channel(c, publish));
                       })) {
    return;
  }
  at::parallel_for(0, R, grain_rows(S), [&](i64 r0, i64 r1) {
    for (i64 r = r0; r < r1; ++r) moments_row(r, false);
  });
  std::vector<std::pair<double, A>> st(C);
  for (i64 c = 0; c < C; ++c) st[c] = merge_channel(c);
  at::parallel_for(0, R, grain_rows(S), [&](i64 r0, i64 r1) {
    for (i64 r = r0; r < r1; ++r) normalize_one(r, st[r % C]);
  });
}

template <class T, int ACT>
void bn_rows_backward(const T* dy, const T* x, T* dx, i64 N, i64 C, i64 S, const acc_t<T>* w,
                      const acc_t<T>* b, const acc_t<T>* mean, const acc_t<T>* rstd,
                      acc_t<T>* gw, acc_t<T>* gb) {
  using A = acc_t<T>;
  const i64 R = N * C;
  const double M = static_cast<double>(N * S);
  std::vector<double> sd(R), sdx(R);
  // prefetch_next: also prefetch row r + C (the channel's next row, which the hardware prefetcher
  // does not follow across the stride).
  // Out of line, as in the forward: the same bits from every schedule.
  auto row_sums = [&](i64 r, bool prefetch_next = false) NL_NOINLINE {
    const i64 c = r % C;
    const A m = mean[c], rs = rstd[c], wc = w[c], bc = b[c];
    const T* xr = x + r * S;
    const T* dr = dy + r * S;
    const bool pf = prefetch_next && S <= kPrefetchRow;
    A s0, s1;
    reduce_sum2<A>(S, s0, s1, [&](i64 i, A& da, A& dxa) {
      const A xh = (to_acc(xr[i]) - m) * rs;
      A d = to_acc(dr[i]);
      if constexpr (ACT != ACT_NONE) d *= act_grad<ACT>(xh * wc + bc);
      da += d;
      dxa += d * xh;
    }, pf ? reinterpret_cast<const char*>(xr + C * S) : nullptr,
       kLanes * static_cast<i64>(sizeof(T)), nullptr,
       pf ? reinterpret_cast<const char*>(dr + C * S) : nullptr);
    sd[r] = s0;
    sdx[r] = s1;
  };
  // The channel's sums from its rows' partials (written to gw/gb when `publish`: one thread of
  // a team) and the two means dx needs.
  auto channel_sums = [&](i64 c, bool publish = true) {
    double t0 = 0, t1 = 0;
    for (i64 n = 0; n < N; ++n) {
      t0 += sd[n * C + c];
      t1 += sdx[n * C + c];
    }
    if (publish) {
      gb[c] = static_cast<A>(t0);
      gw[c] = static_cast<A>(t1);
    }
    return std::pair<A, A>(static_cast<A>(t0 / M), static_cast<A>(t1 / M));
  };
  auto row_dx = [&](i64 r, std::pair<A, A> k) NL_NOINLINE {
    const i64 c = r % C;
    const A m = mean[c], rs = rstd[c], wc = w[c], bc = b[c], k1 = k.first, k2 = k.second;
    const A a = rs * wc;
    const T* xr = x + r * S;
    const T* dr = dy + r * S;
    T* o = dx + r * S;
#pragma omp simd
    for (i64 i = 0; i < S; ++i) {
      const A xh = (to_acc(xr[i]) - m) * rs;
      A d = to_acc(dr[i]);
      if constexpr (ACT != ACT_NONE) d *= act_grad<ACT>(xh * wc + bc);
      o[i] = from_acc<T>(a * (d - k1 - xh * k2));
    }
  };
  // x and dy of a thread's rows of one channel in its L2 (the output streaming through), so the
  // dx sweep rereads both from cache: one channel per thread was 1.4x faster than two sweeps on
  // 32x64x56x56; all threads on each channel (half the bytes per L2) another 7%.
  if (dx != nullptr &&
      channel_schedule(N, C, S * static_cast<i64>(sizeof(T)), row_sums,
                       [&](i64 c, i64 n0, i64 n1, bool publish) {
                         const std::pair<A, A> k = channel_sums(c, publish);
                         for (i64 n = n0; n < n1; ++n) row_dx(n * C + c, k);
                       })) {
    return;
  }
  at::parallel_for(0, R, grain_rows(S), [&](i64 r0, i64 r1) {
    for (i64 r = r0; r < r1; ++r) row_sums(r);
  });
  std::vector<std::pair<A, A>> k(C);
  for (i64 c = 0; c < C; ++c) k[c] = channel_sums(c);
  if (dx == nullptr) return;
  at::parallel_for(0, R, grain_rows(S), [&](i64 r0, i64 r1) {
    for (i64 r = r0; r < r1; ++r) row_dx(r, k[r % C]);
  });
}

// ------------------------------------------------------------------------------------------------
// Column family: x is [O][P][C].
//
// Work is split into tasks of (o, chunk of PB rows); per-chunk partial statistics merge in a
// fixed order afterwards, so results do not depend on the thread count. Channels are often few
// (64 in a ResNet stage), and a loop over one row's channels is then mostly loop overhead: rows
// are taken V at a time as one flat stretch of V*C elements, against per-channel arrays (shift,
// accumulators, coefficients) replicated V times.

// Rows per task: about 1 MB of float32. Smaller chunks spent a third of the statistics sweep on
// each task's set-up (replicate, fill, fold); 262144 elements measured 10% faster than 16384 on
// 32x64x56x56 channels_last batch norm.
inline i64 chunk_rows(i64 C) {
  return std::max<i64>(8, std::min<i64>(4096, (i64{1} << 18) / std::max<i64>(C, 1)));
}

constexpr i64 kStretch = 1024;  // elements per flat stretch of rows (the arrays stay in L1)

inline i64 stretch_rows(i64 C) { return std::max<i64>(1, kStretch / std::max<i64>(C, 1)); }

// dst[v * C + c] = src[c] for v < V (dst may start with src itself).
template <class A> inline void replicate(const A* src, i64 C, i64 V, A* dst) {
  for (i64 v = 0; v < V; ++v) {
    if (dst + v * C != src) std::copy(src, src + C, dst + v * C);
  }
}

// Adds the V replicas of per-channel sums into the first C entries.
template <class A> inline void fold(A* s, i64 C, i64 V) {
  for (i64 v = 1; v < V; ++v) {
    for (i64 c = 0; c < C; ++c) s[c] += s[v * C + c];
  }
}

// Bytes of one sample's slice below which its statistics and its normalization run back to back
// on one thread, so the second read comes from that core's L2 instead of memory.
constexpr i64 kFuseBytes = 1 << 20;

template <class T, int ACT>
void col_forward(const T* x, T* y, i64 O, i64 P, i64 C, i64 G, const acc_t<T>* w,
                 const acc_t<T>* b, double eps, int stats_given, acc_t<T>* mean_o,
                 acc_t<T>* var_o, acc_t<T>* rstd_o) {
  using A = acc_t<T>;
  const i64 K = C / G, V = stretch_rows(C), VC = V * C;
  const i64 PB = chunk_rows(C), nb = (P + PB - 1) / PB;
  std::vector<double> gm(O * G), pm(stats_given ? 0 : O * nb * C), pq(stats_given ? 0 : O * nb * C);
  // Per (o, c) coefficients, so the normalize sweep is one vector loop.
  // y = (x - mean_hi) * a + (b - mean_lo * a): the low part of the mean folds into the shift.
  std::vector<A> mh(O * C), a(O * C), sh(O * C);

  // Shifted sums of chunk t (the shift being each channel's first value in the chunk) into
  // pm/pq; s1, s2, shift: VC-element scratch.
  auto chunk_stats = [&](i64 t, A* shp, A* s1p, A* s2p) {
    const i64 o = t / nb, p0 = (t % nb) * PB, n = std::min(PB, P - p0);
    const T* base = x + (o * P + p0) * C;
    for (i64 c = 0; c < C; ++c) shp[c] = to_acc(base[c]);
    replicate(shp, C, V, shp);
    std::fill(s1p, s1p + VC, A(0));
    std::fill(s2p, s2p + VC, A(0));
    auto add = [&](const T* src, i64 m, i64 e0 = 0) {
      // Local restrict copies: through the lambda's captured references GCC could not tell the
      // stores from the pointers and left this loop scalar ("complicated access pattern").
      const A* __restrict sh = shp + e0;
      A* __restrict a1 = s1p + e0;
      A* __restrict a2 = s2p + e0;
#pragma omp simd
      for (i64 e = 0; e < m; ++e) {
        const A d = to_acc(src[e]) - sh[e];
        a1[e] += d;
        a2[e] += d * d;
      }
    };
    i64 p = 0;
    for (; p + V <= n; p += V) {
      const T* src = base + p * C;
      read_ahead(VC, [&](i64 e0, i64 m) { add(src + e0, m, e0); }, src);
    }
    for (; p < n; ++p) add(base + p * C, C);
    fold(s1p, C, V);
    fold(s2p, C, V);
    for (i64 c = 0; c < C; ++c) {
      const double mm = static_cast<double>(s1p[c]) / static_cast<double>(n);
      pm[t * C + c] = static_cast<double>(shp[c]) + mm;
      pq[t * C + c] = std::max(0.0, static_cast<double>(s2p[c]) - static_cast<double>(s1p[c]) * mm);
    }
  };
  // Chunks merged in a fixed order: the result does not depend on the schedule.
  auto group_stats = [&](i64 og) {
    const i64 o = og / G, g = og % G;
    Moments acc;
    for (i64 j = 0; j < nb; ++j) {
      const double n = static_cast<double>(std::min(PB, P - j * PB));
      for (i64 k = 0; k < K; ++k) {
        const i64 idx = (o * nb + j) * C + g * K + k;
        acc.merge(n, pm[idx], pq[idx]);
      }
    }
    const double var = acc.m2 / static_cast<double>(P * K);
    gm[og] = acc.mean;
    mean_o[og] = static_cast<A>(acc.mean);
    var_o[og] = static_cast<A>(var);
    rstd_o[og] = static_cast<A>(1.0 / std::sqrt(var + eps));
  };
  auto coefficients = [&](i64 o) {
    for (i64 c = 0; c < C; ++c) {
      const i64 og = o * G + c / K;
      const A hi = static_cast<A>(gm[og]);
      const A lo = static_cast<A>(gm[og] - static_cast<double>(hi));
      mh[o * C + c] = hi;
      a[o * C + c] = rstd_o[og] * w[c];
      sh[o * C + c] = b[c] - lo * a[o * C + c];
    }
  };
  // Normalizes rows [p0, p0 + n) of sample o with its coefficients replicated in mr/ar/br.
  auto normalize_rows = [&](i64 o, i64 p0, i64 n, const A* mrp, const A* arp, const A* brp) {
    const T* xb = x + (o * P + p0) * C;
    T* yb = y + (o * P + p0) * C;
    auto run = [&](const T* xs, T* ys, i64 m, i64 e0) {
#pragma omp simd
      for (i64 e = 0; e < m; ++e) {
        ys[e] = from_acc<T>(act_fwd<ACT>((to_acc(xs[e]) - mrp[e0 + e]) * arp[e0 + e] +
                                         brp[e0 + e]));
      }
    };
    // Output prefetched for writing (not with an activation: compute-bound).
    i64 p = 0;
    for (; p + V <= n; p += V) {
      const T* xs = xb + p * C;
      T* ys = yb + p * C;
      if constexpr (ACT == ACT_NONE) {
        write_ahead(ys, VC, [&](i64 e0, i64 m) { run(xs + e0, ys + e0, m, e0); });
      } else {
        run(xs, ys, VC, 0);
      }
    }
    for (; p < n; ++p) run(xb + p * C, yb + p * C, C, 0);
  };
  // Three VC-element arrays per thread: (shift, sum, sum of squares) for chunk_stats, then
  // (mean, scale, shift) replicated for normalize_rows.
  struct Scratch {
    std::vector<A> u, v, z;
    explicit Scratch(i64 n) : u(n), v(n), z(n) {}
  };
  auto replicated = [&](i64 o, Scratch& r) {
    replicate(mh.data() + o * C, C, V, r.u.data());
    replicate(a.data() + o * C, C, V, r.v.data());
    replicate(sh.data() + o * C, C, V, r.z.data());
  };

  if (!stats_given && O > 1 && P * C * static_cast<i64>(sizeof(T)) <= kFuseBytes) {
    // Group/instance norm on channels_last: one sample per task, read once from memory.
    at::parallel_for(0, O, 1, [&](i64 o0, i64 o1) {
      Scratch s(VC);
      for (i64 o = o0; o < o1; ++o) {
        for (i64 t = o * nb; t < (o + 1) * nb; ++t) {
          chunk_stats(t, s.u.data(), s.v.data(), s.z.data());
        }
        for (i64 g = 0; g < G; ++g) group_stats(o * G + g);
        coefficients(o);
        replicated(o, s);
        normalize_rows(o, 0, P, s.u.data(), s.v.data(), s.z.data());
      }
    });
    return;
  }
  if (!stats_given) {
    at::parallel_for(0, O * nb, 1, [&](i64 t0, i64 t1) {
      Scratch s(VC);
      for (i64 t = t0; t < t1; ++t) chunk_stats(t, s.u.data(), s.v.data(), s.z.data());
    });
    at::parallel_for(0, O * G, 1, [&](i64 g0, i64 g1) {
      for (i64 og = g0; og < g1; ++og) group_stats(og);
    });
  } else {
    // Given statistics: var_o is read (the caller's buffer), rstd_o written from it.
    for (i64 og = 0; og < O * G; ++og) {
      gm[og] = static_cast<double>(mean_o[og]);
      rstd_o[og] = static_cast<A>(1.0 / std::sqrt(static_cast<double>(var_o[og]) + eps));
    }
  }
  for (i64 o = 0; o < O; ++o) coefficients(o);
  // The sweep is split evenly, in stretches of V rows, over the threads: chunk_rows-sized tasks
  // leave one thread a whole chunk more when the count is odd (25 chunks on 32x64x56x56).
  const i64 nv = (P + V - 1) / V;
  at::parallel_for(0, O * nv, std::max<i64>(1, kWork / VC), [&](i64 s0, i64 s1) {
    Scratch s(VC);
    for (i64 o = s0 / nv; o * nv < s1; ++o) {
      const i64 p0 = std::max<i64>(s0 - o * nv, 0) * V;
      const i64 p1 = std::min(std::min<i64>(s1 - o * nv, nv) * V, P);
      replicated(o, s);
      normalize_rows(o, p0, p1 - p0, s.u.data(), s.v.data(), s.z.data());
    }
  });
}

// dy is addressed with its own strides (o, p, c) in elements: when they are not x's, each task
// first gathers its tile of dy into x's order (group norm's grad_out arrives NCHW-contiguous for a
// channels_last input).
template <class T, int ACT>
void col_backward(const T* dy, i64 sdo, i64 sdp, i64 sdc, const T* x, T* dx, i64 O, i64 P, i64 C,
                  i64 G, const acc_t<T>* w, const acc_t<T>* b, const acc_t<T>* mean,
                  const acc_t<T>* rstd, int batch_stats, acc_t<T>* gw, acc_t<T>* gb) {
  using A = acc_t<T>;
  const i64 K = C / G, V = stretch_rows(C), VC = V * C;
  const bool direct = sdc == 1 && sdp == C && sdo == P * C;
  // Per (o, c) copies of the group statistics and the forward's scale.
  std::vector<A> mc(O * C), rc(O * C), a(O * C);
  for (i64 o = 0; o < O; ++o) {
    for (i64 c = 0; c < C; ++c) {
      const i64 og = o * G + c / K;
      mc[o * C + c] = mean[og];
      rc[o * C + c] = rstd[og];
      a[o * C + c] = rstd[og] * w[c];
    }
  }
  // Weight and bias replicated (read only by the fused activation's derivative).
  std::vector<A> wr(ACT != ACT_NONE ? VC : 0), br(ACT != ACT_NONE ? VC : 0);
  if constexpr (ACT != ACT_NONE) {
    replicate(w, C, V, wr.data());
    replicate(b, C, V, br.data());
  }
  const A* wrp = wr.data();
  const A* brp = br.data();
  const i64 PB = chunk_rows(C), nb = (P + PB - 1) / PB;
  // The tile of dy for task t, in x's row order: a pointer into dy or into `buf`.
  auto tile = [&](i64 t, std::vector<T>& buf) -> const T* {
    const i64 o = t / nb, p0 = (t % nb) * PB, n = std::min(PB, P - p0);
    if (direct) return dy + (o * P + p0) * C;
    buf.resize(PB * C);
    // Transpose in blocks of 16 rows so the rows being written stay in L1 across channels.
    for (i64 q0 = 0; q0 < n; q0 += 16) {
      const i64 q1 = std::min(n, q0 + 16);
      for (i64 c = 0; c < C; ++c) {
        const T* src = dy + o * sdo + p0 * sdp + c * sdc;
        for (i64 p = q0; p < q1; ++p) buf[p * C + c] = src[p * sdp];
      }
    }
    return buf.data();
  };
  // Fixed statistics (eval): dx = a d needs none of the sums, so the sums' sweep writes it too and
  // the second sweep is skipped (two reads and a write instead of four reads and a write).
  const bool one_sweep = !batch_stats && dx != nullptr;
  // Sums over `m` elements of a stretch (m = VC) or of one row (m = C); with WRITE_DX, also
  // os = ap * d.
  // Sums over `m` elements of a stretch (m = VC) or of one row (m = C); with WRITE_DX, then
  // os = ap * d over the same elements while they are in L1 (one loop doing both measured
  // slower than two whole sweeps).
  auto sums = [&](auto write_dx, const T* xs, const T* ds, T* os, i64 m, const A* mp,
                  const A* rp, const A* ap, A* s0p, A* s1p) {
#pragma omp simd
    for (i64 e = 0; e < m; ++e) {
      const A xh = (to_acc(xs[e]) - mp[e]) * rp[e];
      A d = to_acc(ds[e]);
      if constexpr (ACT != ACT_NONE) d *= act_grad<ACT>(xh * wrp[e] + brp[e]);
      s0p[e] += d;
      s1p[e] += d * xh;
    }
    if constexpr (decltype(write_dx)::value) {
      write_ahead(os, m, [&](i64 e0, i64 n) {
#pragma omp simd
        for (i64 e = e0; e < e0 + n; ++e) {
          A d = to_acc(ds[e]);
          if constexpr (ACT != ACT_NONE) {
            d *= act_grad<ACT>((to_acc(xs[e]) - mp[e]) * rp[e] * wrp[e] + brp[e]);
          }
          os[e] = from_acc<T>(ap[e] * d);
        }
      });
    }
  };
  std::vector<double> pd(O * nb * C), pdx(O * nb * C);
  at::parallel_for(0, O * nb, 1, [&](i64 t0, i64 t1) {
    std::vector<T> buf;
    std::vector<A> s0(VC), s1(VC), mr(VC), rr(VC), ar(one_sweep ? VC : 0);
    A* s0p = s0.data();
    A* s1p = s1.data();
    i64 cur = -1;
    for (i64 t = t0; t < t1; ++t) {
      const i64 o = t / nb, p0 = (t % nb) * PB, n = std::min(PB, P - p0);
      if (o != cur) {
        replicate(mc.data() + o * C, C, V, mr.data());
        replicate(rc.data() + o * C, C, V, rr.data());
        if (one_sweep) replicate(a.data() + o * C, C, V, ar.data());
        cur = o;
      }
      const T* xb = x + (o * P + p0) * C;
      const T* db = tile(t, buf);
      T* ob = one_sweep ? dx + (o * P + p0) * C : nullptr;
      std::fill(s0p, s0p + VC, A(0));
      std::fill(s1p, s1p + VC, A(0));
      auto sweep = [&](auto write_dx) {
        i64 p = 0;
        for (; p + V <= n; p += V) {
          sums(write_dx, xb + p * C, db + p * C, ob + p * C, VC, mr.data(), rr.data(), ar.data(),
               s0p, s1p);
        }
        for (; p < n; ++p) {
          sums(write_dx, xb + p * C, db + p * C, ob + p * C, C, mr.data(), rr.data(), ar.data(),
               s0p, s1p);
        }
      };
      if (one_sweep) {
        sweep(std::true_type{});
      } else {
        sweep(std::false_type{});
      }
      fold(s0p, C, V);
      fold(s1p, C, V);
      for (i64 c = 0; c < C; ++c) {
        pd[t * C + c] = s0p[c];
        pdx[t * C + c] = s1p[c];
      }
    }
  });
  std::vector<double> sd(O * C, 0.0), sdx(O * C, 0.0);
  for (i64 o = 0; o < O; ++o) {
    for (i64 j = 0; j < nb; ++j) {
      for (i64 c = 0; c < C; ++c) {
        sd[o * C + c] += pd[(o * nb + j) * C + c];
        sdx[o * C + c] += pdx[(o * nb + j) * C + c];
      }
    }
  }
  for (i64 c = 0; c < C; ++c) {
    double t0 = 0, t1 = 0;
    for (i64 o = 0; o < O; ++o) {
      t0 += sd[o * C + c];
      t1 += sdx[o * C + c];
    }
    gb[c] = static_cast<A>(t0);
    gw[c] = static_cast<A>(t1);
  }
  if (dx == nullptr || one_sweep) return;
  // dx = rstd * (w d - mean_g(w d) - x_hat * mean_g(w d x_hat)) = a d + c0 + c2 x_hat
  std::vector<A> c0(O * C, A(0)), c2(O * C, A(0));
  if (batch_stats) {
    const double M = static_cast<double>(P * K);
    for (i64 o = 0; o < O; ++o) {
      for (i64 g = 0; g < G; ++g) {
        double tg = 0, tgx = 0;
        for (i64 k = 0; k < K; ++k) {
          const i64 c = g * K + k;
          tg += static_cast<double>(w[c]) * sd[o * C + c];
          tgx += static_cast<double>(w[c]) * sdx[o * C + c];
        }
        const double rs = rstd[o * G + g];
        for (i64 k = 0; k < K; ++k) {
          c0[o * C + g * K + k] = static_cast<A>(-rs * tg / M);
          c2[o * C + g * K + k] = static_cast<A>(-rs * tgx / M);
        }
      }
    }
  }
  auto grads = [&](const T* xs, const T* ds, T* os, i64 m, const A* mp, const A* rp, const A* ap,
                   const A* c0p, const A* c2p) {
    write_ahead(os, m, [&](i64 e0, i64 n) {
#pragma omp simd
      for (i64 e = e0; e < e0 + n; ++e) {
        const A xh = (to_acc(xs[e]) - mp[e]) * rp[e];
        A d = to_acc(ds[e]);
        if constexpr (ACT != ACT_NONE) d *= act_grad<ACT>(xh * wrp[e] + brp[e]);
        os[e] = from_acc<T>(ap[e] * d + c0p[e] + c2p[e] * xh);
      }
    });
  };
  at::parallel_for(0, O * nb, 1, [&](i64 t0, i64 t1) {
    std::vector<T> buf;
    std::vector<A> mr(VC), rr(VC), ar(VC), c0r(VC), c2r(VC);
    i64 cur = -1;
    for (i64 t = t0; t < t1; ++t) {
      const i64 o = t / nb, p0 = (t % nb) * PB, n = std::min(PB, P - p0);
      if (o != cur) {
        replicate(mc.data() + o * C, C, V, mr.data());
        replicate(rc.data() + o * C, C, V, rr.data());
        replicate(a.data() + o * C, C, V, ar.data());
        replicate(c0.data() + o * C, C, V, c0r.data());
        replicate(c2.data() + o * C, C, V, c2r.data());
        cur = o;
      }
      const T* xb = x + (o * P + p0) * C;
      const T* db = tile(t, buf);
      T* ob = dx + (o * P + p0) * C;
      i64 p = 0;
      for (; p + V <= n; p += V) {
        grads(xb + p * C, db + p * C, ob + p * C, VC, mr.data(), rr.data(), ar.data(), c0r.data(),
              c2r.data());
      }
      for (; p < n; ++p) {
        grads(xb + p * C, db + p * C, ob + p * C, C, mr.data(), rr.data(), ar.data(), c0r.data(),
              c2r.data());
      }
    }
  });
}

// Running statistics of one batch-norm step, in place: rm <- lerp(rm, mean, momentum) and
// rv <- lerp(rv, var * bessel, momentum), with torch.lerp's two-sided formula (the same numbers
// as the reference's in-place ops). With `check`, a non-finite mean or variance in any channel
// leaves both buffers untouched and returns 3. One call instead of the ~9 small torch ops (a
// finiteness probe, its read-back, two lerps) that cost tens of microseconds per training step.
template <class A>
int running_stats(const A* mean, const A* var, A* rm, A* rv, i64 C, double bessel,
                  double momentum, int check) {
  if (check) {
    for (i64 c = 0; c < C; ++c) {
      if (!std::isfinite(mean[c]) || !std::isfinite(var[c])) return 3;
    }
  }
  const A w = static_cast<A>(momentum), f = static_cast<A>(bessel);
  auto lerp = [w](A a, A b) {
    return std::abs(w) < A(0.5) ? a + w * (b - a) : b - (b - a) * (A(1) - w);
  };
  for (i64 c = 0; c < C; ++c) {
    rm[c] = lerp(rm[c], mean[c]);
    rv[c] = lerp(rv[c], var[c] * f);
  }
  return 0;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// C entry points (called through ctypes). dtype must equal this build's NL_DTYPE; parameter and
// statistics pointers are float (double for float64 inputs); act: see ACT_*. Return 0 on success.

// Each build of this file holds one storage type (NL_DTYPE: 0 float32, 1 float64, 2 bfloat16,
// 3 float16) and either the plain kernels or the fused-activation ones (NL_ACT = 1): the Python
// loader compiles only the variants a program uses, which keeps every compile to seconds.
#ifndef NL_DTYPE
#define NL_DTYPE 0
#endif
#if NL_DTYPE == 0
using T = float;
#elif NL_DTYPE == 1
using T = double;
#elif NL_DTYPE == 2
using T = bf16_t;
#else
using T = fp16_t;
#endif

#if defined(NL_ACT) && NL_ACT
#define NL_DISPATCH(dtype, act, CALL)                                     \
  if (dtype != NL_DTYPE) return 1;                                        \
  switch (act) {                                                          \
    case ACT_RELU: { constexpr int ACT = ACT_RELU; CALL; } break;         \
    case ACT_SILU: { constexpr int ACT = ACT_SILU; CALL; } break;         \
    case ACT_GELU: { constexpr int ACT = ACT_GELU; CALL; } break;         \
    default: return 2;                                                    \
  }                                                                       \
  return 0;
#else
#define NL_DISPATCH(dtype, act, CALL)                                     \
  if (dtype != NL_DTYPE) return 1;                                        \
  if (act != ACT_NONE) return 2;                                          \
  { constexpr int ACT = ACT_NONE; CALL; }                                 \
  return 0;
#endif

#define P_(ptr) static_cast<const T*>(ptr)
#define M_(ptr) static_cast<T*>(ptr)
#define PA_(ptr) static_cast<const acc_t<T>*>(ptr)
#define MA_(ptr) static_cast<acc_t<T>*>(ptr)

extern "C" {

int nl_abi_version() { return 3; }
int nl_dtype() { return NL_DTYPE; }

int nl_row_forward(int dtype, int act, const void* x, const void* res, void* sum_out, void* y,
                   i64 R, i64 K, i64 S, i64 Gp, const void* w, const void* b, double eps,
                   int center, void* mean, void* var, void* rstd) {
  NL_DISPATCH(dtype, act,
              (row_forward<T, ACT>(P_(x), P_(res), M_(sum_out), M_(y), R, K, S, Gp, PA_(w),
                                   PA_(b), eps, center, MA_(mean), MA_(var), MA_(rstd))))
}

int nl_row_normalize(int dtype, int act, const void* x, void* y, i64 R, i64 K, i64 S, i64 Gp,
                     i64 smod, const void* w, const void* b, const void* mean, const void* var,
                     double eps, void* rstd) {
  NL_DISPATCH(dtype, act,
              (row_normalize<T, ACT>(P_(x), M_(y), R, K, S, Gp, smod, PA_(w), PA_(b), PA_(mean),
                                     PA_(var), eps, MA_(rstd))))
}

int nl_row_backward(int dtype, int act, const void* dy, const void* x, const void* dextra,
                    void* dx, i64 R, i64 K, i64 S, i64 Gp, i64 smod, const void* w, const void* b,
                    const void* mean, const void* rstd, int center, int batch_stats,
                    void* gw_part, void* gb_part, i64 nchunk) {
  NL_DISPATCH(dtype, act,
              (row_backward<T, ACT>(P_(dy), P_(x), P_(dextra), M_(dx), R, K, S, Gp, smod, PA_(w),
                                    PA_(b), PA_(mean), PA_(rstd), center, batch_stats,
                                    MA_(gw_part), MA_(gb_part), nchunk)))
}

int nl_bn_rows_forward(int dtype, int act, const void* x, void* y, i64 N, i64 C, i64 S,
                       const void* w, const void* b, double eps, void* mean, void* var,
                       void* rstd) {
  NL_DISPATCH(dtype, act,
              (bn_rows_forward<T, ACT>(P_(x), M_(y), N, C, S, PA_(w), PA_(b), eps, MA_(mean),
                                       MA_(var), MA_(rstd))))
}

int nl_bn_rows_backward(int dtype, int act, const void* dy, const void* x, void* dx, i64 N, i64 C,
                        i64 S, const void* w, const void* b, const void* mean, const void* rstd,
                        void* gw, void* gb) {
  NL_DISPATCH(dtype, act,
              (bn_rows_backward<T, ACT>(P_(dy), P_(x), M_(dx), N, C, S, PA_(w), PA_(b),
                                        PA_(mean), PA_(rstd), MA_(gw), MA_(gb))))
}

int nl_col_forward(int dtype, int act, const void* x, void* y, i64 O, i64 P, i64 C, i64 G,
                   const void* w, const void* b, double eps, int stats_given, void* mean,
                   void* var, void* rstd) {
  NL_DISPATCH(dtype, act,
              (col_forward<T, ACT>(P_(x), M_(y), O, P, C, G, PA_(w), PA_(b), eps, stats_given,
                                   MA_(mean), MA_(var), MA_(rstd))))
}

int nl_col_backward(int dtype, int act, const void* dy, i64 sdo, i64 sdp, i64 sdc, const void* x,
                    void* dx, i64 O, i64 P, i64 C, i64 G, const void* w, const void* b,
                    const void* mean, const void* rstd, int batch_stats, void* gw, void* gb) {
  NL_DISPATCH(dtype, act,
              (col_backward<T, ACT>(P_(dy), sdo, sdp, sdc, P_(x), M_(dx), O, P, C, G, PA_(w),
                                    PA_(b), PA_(mean), PA_(rstd), batch_stats, MA_(gw),
                                    MA_(gb))))
}

int nl_running_stats(int dtype, const void* mean, const void* var, void* rm, void* rv, i64 C,
                     double bessel, double momentum, int check) {
  if (dtype != NL_DTYPE) return 1;
  using A = acc_t<T>;
  return running_stats<A>(static_cast<const A*>(mean), static_cast<const A*>(var),
                          static_cast<A*>(rm), static_cast<A*>(rv), C, bessel, momentum, check);
}

}  // extern "C"
