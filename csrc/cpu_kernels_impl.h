// The CPU kernels, compiled once per instruction set: this file is included by
// cpu_kernels.cpp (baseline x86-64 / any CPU) and cpu_kernels_avx2.cpp (under
// `#pragma GCC target("avx2")`), each defining SF_CPU_ISA, the namespace of its copy.
// cpu_kernels.cpp picks a copy at run time. No header guard: included once per ISA.
#ifndef SF_CPU_ISA
#error "define SF_CPU_ISA before including cpu_kernels_impl.h"
#endif

namespace sharpfast {
namespace cpu {
namespace SF_CPU_ISA {
namespace {

constexpr int64_t kChunk = 4096;  // elements of one row handled by one task

int64_t num_chunks(int64_t D) { return (D + kChunk - 1) / kChunk; }

// sums[b] = sum over chunks [lo, hi) of row b of part(b, lo, hi), chunks in parallel,
// added in chunk order afterwards (deterministic for any thread count).
template <typename F>
std::vector<double> rowwise_sum(int64_t B, int64_t D, F part) {
  const int64_t nc = num_chunks(D);
  std::vector<double> partial(static_cast<size_t>(B * nc));
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < B * nc; ++task) {
    const int64_t b = task / nc, j = task % nc;
    const int64_t lo = j * kChunk, hi = lo + kChunk < D ? lo + kChunk : D;
    partial[task] = part(b, lo, hi);
  }
  std::vector<double> sums(static_cast<size_t>(B), 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < nc; ++j) sums[b] += partial[b * nc + j];
  return sums;
}

// sum of term(i) over [lo, hi). Terms capture by value ([=]): captured references defeat
// GCC's vectorizer (5x slower here).: vectorized partial sums of kBlock terms in the accumulation
// type A, added in double (accurate for long rows in fp32).
constexpr int64_t kBlock = 256;
template <typename A, typename F>
double blocked_sum(int64_t lo, int64_t hi, F term) {
  double total = 0.0;
  for (int64_t s = lo; s < hi; s += kBlock) {
    const int64_t e = s + kBlock < hi ? s + kBlock : hi;
    A acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = s; i < e; ++i) acc += term(i);
    total += static_cast<double>(acc);
  }
  return total;
}

// Signs of probe k on elements [lo, hi) of a sample: one hash per 32 elements.
void fill_signs(uint32_t key0, int64_t k, int64_t lo, int64_t hi, float* s) {
  const uint32_t kk = probe_key(key0, static_cast<uint32_t>(k));
  for (int64_t w = lo >> 5; w <= (hi - 1) >> 5; ++w) {
    const uint32_t bits = rademacher_word(kk, static_cast<uint32_t>(w));
    const int64_t a = w * 32 > lo ? w * 32 : lo, e = w * 32 + 32 < hi ? w * 32 + 32 : hi;
    for (int64_t i = a; i < e; ++i) s[i - lo] = (bits >> (i & 31)) & 1u ? -1.0f : 1.0f;
  }
}

template <typename T>
void cfg_combine_t(const T* u, const T* c, T* g, typename io<T>::acc* norm, int64_t B,
                   int64_t D, double w_) {
  using A = typename io<T>::acc;
  const A w = static_cast<A>(w_);
  auto sums = rowwise_sum(B, D, [&](int64_t b, int64_t lo, int64_t hi) {
    const T* ub = u + b * D;
    const T* cb = c + b * D;
    T* gb = g + b * D;
    return blocked_sum<A>(lo, hi, [=](int64_t i) {
      const A uf = io<T>::load(ub[i]);
      const A d = io<T>::load(cb[i]) - uf;
      gb[i] = io<T>::store(uf + w * d);
      return d * d;
    });
  });
  for (int64_t b = 0; b < B; ++b) norm[b] = static_cast<A>(std::sqrt(sums[b]));
}

template <typename T>
void rademacher_perturb_t(const T* x, T* out, int64_t B, int64_t D, int64_t K, bool central,
                          double h_, uint64_t seed) {
  using A = typename io<T>::acc;
  const A h = static_cast<A>(h_);
  const uint32_t key0 = seed_key(seed);
  const int64_t nc = num_chunks(D);
#pragma omp parallel
  {
    std::vector<float> s(kChunk);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < K * nc; ++task) {
      const int64_t k = task / nc, lo = (task % nc) * kChunk;
      const int64_t n = lo + kChunk < D ? kChunk : D - lo;
      fill_signs(key0, k, lo, lo + n, s.data());
      for (int64_t b = 0; b < B; ++b) {
        const T* xb = x + b * D + lo;
        T* plus = out + (k * B + b) * D + lo;
        for (int64_t i = 0; i < n; ++i) plus[i] = io<T>::store(io<T>::load(xb[i]) + h * s[i]);
        if (central) {
          T* minus = out + ((K + k) * B + b) * D + lo;
          for (int64_t i = 0; i < n; ++i) minus[i] = io<T>::store(io<T>::load(xb[i]) - h * s[i]);
        }
      }
    }
  }
}

template <typename T>
void hutchinson_reduce_t(const T* y, const T* y0, typename io<T>::acc* trace, int64_t B,
                         int64_t D, int64_t K, bool central, double h, uint64_t seed) {
  using A = typename io<T>::acc;
  const uint32_t key0 = seed_key(seed);
  const int64_t nc = num_chunks(D);
  std::vector<double> partial(static_cast<size_t>(nc * B), 0.0);  // [chunk][b]
#pragma omp parallel
  {
    std::vector<float> s(kChunk);
#pragma omp for schedule(static)
    for (int64_t j = 0; j < nc; ++j) {
      const int64_t lo = j * kChunk, n = lo + kChunk < D ? kChunk : D - lo;
      for (int64_t k = 0; k < K; ++k) {
        fill_signs(key0, k, lo, lo + n, s.data());
        for (int64_t b = 0; b < B; ++b) {
          const T* yk = y + (k * B + b) * D + lo;
          // forward difference against y0; central against the minus-probe half
          const T* ref = central ? y + ((K + k) * B + b) * D + lo : y0 + b * D + lo;
          const float* sign = s.data();
          partial[j * B + b] += blocked_sum<A>(0, n, [=](int64_t i) {
            return static_cast<A>(sign[i]) * (io<T>::load(yk[i]) - io<T>::load(ref[i]));
          });
        }
      }
    }
  }
  const double scale = 1.0 / (static_cast<double>(K) * h * (central ? 2.0 : 1.0));
  for (int64_t b = 0; b < B; ++b) {
    double t = 0.0;
    for (int64_t j = 0; j < nc; ++j) t += partial[j * B + b];
    trace[b] = static_cast<A>(t * scale);
  }
}

template <typename T>
void fd_direction_t(const T* x, const T* u, const T* c, T* out, int64_t B, int64_t D,
                    double h) {
  using A = typename io<T>::acc;
  auto sq = rowwise_sum(B, D, [&](int64_t b, int64_t lo, int64_t hi) {
    return blocked_sum<A>(b * D + lo, b * D + hi, [=](int64_t i) {
      const A d = io<T>::load(c[i]) - io<T>::load(u[i]);
      return d * d;
    });
  });
  std::vector<A> scale(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b)  // a zero difference has no direction: no shift
    scale[b] = sq[b] > 0.0 ? static_cast<A>(h / std::sqrt(sq[b])) : A(0);
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < B * num_chunks(D); ++task) {
    const int64_t b = task / num_chunks(D), lo = (task % num_chunks(D)) * kChunk;
    const int64_t hi = lo + kChunk < D ? lo + kChunk : D;
    const A sb = scale[b];
    for (int64_t i = b * D + lo; i < b * D + hi; ++i)
      out[i] = io<T>::store(io<T>::load(x[i]) + sb * (io<T>::load(c[i]) - io<T>::load(u[i])));
  }
}

template <typename T>
void diff_of_diffs_norm_t(const T* u0, const T* c0, const T* u1, const T* c1,
                          typename io<T>::acc* out, int64_t B, int64_t D) {
  using A = typename io<T>::acc;
  auto sq = rowwise_sum(B, D, [&](int64_t b, int64_t lo, int64_t hi) {
    return blocked_sum<A>(b * D + lo, b * D + hi, [=](int64_t i) {
      const A r = (io<T>::load(c1[i]) - io<T>::load(u1[i])) - (io<T>::load(c0[i]) - io<T>::load(u0[i]));
      return r * r;
    });
  });
  for (int64_t b = 0; b < B; ++b) out[b] = static_cast<A>(std::sqrt(sq[b]));
}

// Calls fn with a typed null pointer of the storage type named by dtype.
template <typename Fn>
void dispatch(int dtype, Fn fn) {
  switch (dtype) {
    case kFloat32: fn(static_cast<float*>(nullptr)); break;
    case kFloat64: fn(static_cast<double*>(nullptr)); break;
    case kFloat16: fn(static_cast<half_t*>(nullptr)); break;
    case kBFloat16: fn(static_cast<bf16_t*>(nullptr)); break;
    default: throw std::invalid_argument("sharpfast cpu: unsupported dtype code");
  }
}

}  // namespace

#define SF_T std::remove_pointer_t<decltype(tag)>
#define SF_A typename io<SF_T>::acc

void cfg_combine(int dtype, const void* u, const void* c, void* guided, void* diff_norm,
                 int64_t B, int64_t D, double w) {
  dispatch(dtype, [&](auto tag) {
    cfg_combine_t(static_cast<const SF_T*>(u), static_cast<const SF_T*>(c),
                  static_cast<SF_T*>(guided), static_cast<SF_A*>(diff_norm), B, D, w);
  });
}

void rademacher_perturb(int dtype, const void* x, void* out, int64_t B, int64_t D, int64_t K,
                        bool central, double h, uint64_t seed) {
  dispatch(dtype, [&](auto tag) {
    rademacher_perturb_t(static_cast<const SF_T*>(x), static_cast<SF_T*>(out), B, D, K,
                         central, h, seed);
  });
}

void hutchinson_reduce(int dtype, const void* y, const void* y0, void* trace, int64_t B,
                       int64_t D, int64_t K, bool central, double h, uint64_t seed) {
  dispatch(dtype, [&](auto tag) {
    hutchinson_reduce_t(static_cast<const SF_T*>(y), static_cast<const SF_T*>(y0),
                        static_cast<SF_A*>(trace), B, D, K, central, h, seed);
  });
}

void fd_direction(int dtype, const void* x, const void* u, const void* c, void* out,
                  int64_t B, int64_t D, double h) {
  dispatch(dtype, [&](auto tag) {
    fd_direction_t(static_cast<const SF_T*>(x), static_cast<const SF_T*>(u),
                   static_cast<const SF_T*>(c), static_cast<SF_T*>(out), B, D, h);
  });
}

void diff_of_diffs_norm(int dtype, const void* u0, const void* c0, const void* u1,
                        const void* c1, void* out, int64_t B, int64_t D) {
  dispatch(dtype, [&](auto tag) {
    diff_of_diffs_norm_t(static_cast<const SF_T*>(u0), static_cast<const SF_T*>(c0),
                         static_cast<const SF_T*>(u1), static_cast<const SF_T*>(c1),
                         static_cast<SF_A*>(out), B, D);
  });
}

#undef SF_T
#undef SF_A

}  // namespace SF_CPU_ISA
}  // namespace cpu
}  // namespace sharpfast
