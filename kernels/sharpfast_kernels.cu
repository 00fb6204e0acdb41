// CUDA kernels of sharpfast's fused ops (launchers declared in sharpfast_kernels.h).
//
// Reductions are two-pass and deterministic: one block per (sample, chunk) writes a partial
// sum (double) to the workspace, then one thread per sample adds its partials in order.
#include <cuda_runtime.h>

#include "sf_common.h"
#include "sharpfast_kernels.h"

namespace sharpfast {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 8;                      // elements per thread per chunk
constexpr int64_t kChunk = kThreads * kItems;  // elements of one row per block

int64_t num_chunks(int64_t D) { return (D + kChunk - 1) / kChunk; }

__device__ __forceinline__ double block_sum(double v) {
  __shared__ double warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_sums[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;  // valid in thread 0
}

// One block per (row b, chunk j): partial[b * nc + j] = sum_i op(b, i) over the chunk.
template <typename A, typename Op>
__global__ void __launch_bounds__(kThreads) row_reduce_kernel(Op op, double* partial, int64_t D, int64_t nc) {
  const int64_t b = blockIdx.x / nc, lo = (blockIdx.x % nc) * kChunk;
  const int64_t hi = lo + kChunk < D ? lo + kChunk : D;
  A acc = 0;
#pragma unroll
  for (int r = 0; r < kItems; ++r) {
    const int64_t i = lo + r * kThreads + threadIdx.x;
    if (i < hi) acc += op(b, i);
  }
  const double s = block_sum(static_cast<double>(acc));
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

enum Finish { kScaledSum = 0, kSqrt = 1, kStepOverNorm = 2 };

// out[b] from the partials of row b, added in chunk order.
template <typename O>
__global__ void finish_kernel(const double* partial, O* out, int64_t B, int64_t nc, double arg, int mode) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= B) return;
  double s = 0.0;
  for (int64_t j = 0; j < nc; ++j) s += partial[b * nc + j];
  double r = s * arg;
  if (mode == kSqrt) r = sqrt(s);
  if (mode == kStepOverNorm) r = s > 0.0 ? arg / sqrt(s) : 0.0;  // zero difference: no shift
  out[b] = static_cast<O>(r);
}

template <typename T>
struct CfgOp {  // guided = u + w (c - u); returns (c - u)^2
  const T* u; const T* c; T* g; int64_t D; typename io<T>::acc w;
  __device__ typename io<T>::acc operator()(int64_t b, int64_t i) const {
    const int64_t k = b * D + i;
    const auto uf = io<T>::load(u[k]);
    const auto d = io<T>::load(c[k]) - uf;
    g[k] = io<T>::store(uf + w * d);
    return d * d;
  }
};

template <typename T>
struct SqDiffOp {  // (c - u)^2
  const T* u; const T* c; int64_t D;
  __device__ typename io<T>::acc operator()(int64_t b, int64_t i) const {
    const auto d = io<T>::load(c[b * D + i]) - io<T>::load(u[b * D + i]);
    return d * d;
  }
};

template <typename T>
struct DodOp {  // ((c1 - u1) - (c0 - u0))^2
  const T* u0; const T* c0; const T* u1; const T* c1; int64_t D;
  __device__ typename io<T>::acc operator()(int64_t b, int64_t i) const {
    const int64_t k = b * D + i;
    const auto r = (io<T>::load(c1[k]) - io<T>::load(u1[k])) - (io<T>::load(c0[k]) - io<T>::load(u0[k]));
    return r * r;
  }
};

// One block per (probe k, chunk): writes x + h v_k (and x - h v_k) for every sample.
template <typename T>
__global__ void __launch_bounds__(kThreads) perturb_kernel(const T* x, T* out, int64_t B, int64_t D, int64_t K,
                                                           int64_t nc, bool central, typename io<T>::acc h,
                                                           uint32_t key0) {
  const int64_t k = blockIdx.x / nc, lo = (blockIdx.x % nc) * kChunk;
  const uint32_t kk = probe_key(key0, static_cast<uint32_t>(k));
#pragma unroll
  for (int r = 0; r < kItems; ++r) {
    const int64_t i = lo + r * kThreads + threadIdx.x;
    if (i >= D) break;
    const auto hs = h * static_cast<typename io<T>::acc>(rademacher(kk, static_cast<uint32_t>(i)));
    for (int64_t b = 0; b < B; ++b) {
      const auto xf = io<T>::load(x[b * D + i]);
      out[(k * B + b) * D + i] = io<T>::store(xf + hs);
      if (central) out[((K + k) * B + b) * D + i] = io<T>::store(xf - hs);
    }
  }
}

// One block per (sample b, chunk): partial sum over probes of v_k . (y_k - reference).
template <typename T>
__global__ void __launch_bounds__(kThreads) hutchinson_kernel(const T* y, const T* y0, double* partial, int64_t B,
                                                              int64_t D, int64_t K, int64_t nc, bool central,
                                                              uint32_t key0) {
  using A = typename io<T>::acc;
  const int64_t b = blockIdx.x / nc, lo = (blockIdx.x % nc) * kChunk;
  A acc = 0;
  for (int64_t k = 0; k < K; ++k) {
    const uint32_t kk = probe_key(key0, static_cast<uint32_t>(k));
    const T* yk = y + (k * B + b) * D;
    const T* ref = central ? y + ((K + k) * B + b) * D : y0 + b * D;
#pragma unroll
    for (int r = 0; r < kItems; ++r) {
      const int64_t i = lo + r * kThreads + threadIdx.x;
      if (i < D) acc += static_cast<A>(rademacher(kk, static_cast<uint32_t>(i))) * (io<T>::load(yk[i]) - io<T>::load(ref[i]));
    }
  }
  const double s = block_sum(static_cast<double>(acc));
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// out = x + scale[b] (c - u), one block per (sample, chunk).
template <typename T>
__global__ void __launch_bounds__(kThreads) shift_kernel(const T* x, const T* u, const T* c, T* out,
                                                         const double* scale, int64_t D, int64_t nc) {
  const int64_t b = blockIdx.x / nc, lo = (blockIdx.x % nc) * kChunk;
  const auto s = static_cast<typename io<T>::acc>(scale[b]);
#pragma unroll
  for (int r = 0; r < kItems; ++r) {
    const int64_t i = lo + r * kThreads + threadIdx.x;
    if (i < D) {
      const int64_t k = b * D + i;
      out[k] = io<T>::store(io<T>::load(x[k]) + s * (io<T>::load(c[k]) - io<T>::load(u[k])));
    }
  }
}

template <typename Fn>
int dispatch(int dtype, Fn fn) {
  switch (dtype) {
    case kFloat32: fn(static_cast<float*>(nullptr)); break;
    case kFloat64: fn(static_cast<double*>(nullptr)); break;
    case kFloat16: fn(static_cast<half_t*>(nullptr)); break;
    case kBFloat16: fn(static_cast<bf16_t*>(nullptr)); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename O>
void finish(const double* partial, void* out, int64_t B, int64_t nc, double arg, int mode, cudaStream_t st) {
  const int threads = 128;
  finish_kernel<O><<<static_cast<unsigned>((B + threads - 1) / threads), threads, 0, st>>>(
      partial, static_cast<O*>(out), B, nc, arg, mode);
}

}  // namespace
}  // namespace sharpfast

using namespace sharpfast;
#define SF_T std::remove_pointer_t<decltype(tag)>
#define SF_A typename io<SF_T>::acc
#define SF_STREAM static_cast<cudaStream_t>(stream)

extern "C" int64_t sf_cuda_workspace_elems(int64_t B, int64_t D) { return B * num_chunks(D) + B; }

extern "C" int sf_cuda_cfg_combine(int dtype, const void* u, const void* c, void* guided, void* diff_norm,
                                   double* workspace, int64_t B, int64_t D, double w, void* stream) {
  const int64_t nc = num_chunks(D);
  return dispatch(dtype, [&](auto tag) {
    CfgOp<SF_T> op{static_cast<const SF_T*>(u), static_cast<const SF_T*>(c), static_cast<SF_T*>(guided), D,
                   static_cast<SF_A>(w)};
    row_reduce_kernel<SF_A><<<static_cast<unsigned>(B * nc), kThreads, 0, SF_STREAM>>>(op, workspace, D, nc);
    finish<SF_A>(workspace, diff_norm, B, nc, 0.0, kSqrt, SF_STREAM);
  });
}

extern "C" int sf_cuda_rademacher_perturb(int dtype, const void* x, void* out, int64_t B, int64_t D, int64_t K,
                                          bool central, double h, uint64_t seed, void* stream) {
  const int64_t nc = num_chunks(D);
  return dispatch(dtype, [&](auto tag) {
    perturb_kernel<SF_T><<<static_cast<unsigned>(K * nc), kThreads, 0, SF_STREAM>>>(
        static_cast<const SF_T*>(x), static_cast<SF_T*>(out), B, D, K, nc, central, static_cast<SF_A>(h),
        seed_key(seed));
  });
}

extern "C" int sf_cuda_hutchinson_reduce(int dtype, const void* y, const void* y0, void* trace,
                                         double* workspace, int64_t B, int64_t D, int64_t K, bool central,
                                         double h, uint64_t seed, void* stream) {
  const int64_t nc = num_chunks(D);
  const double scale = 1.0 / (static_cast<double>(K) * h * (central ? 2.0 : 1.0));
  return dispatch(dtype, [&](auto tag) {
    hutchinson_kernel<SF_T><<<static_cast<unsigned>(B * nc), kThreads, 0, SF_STREAM>>>(
        static_cast<const SF_T*>(y), static_cast<const SF_T*>(y0), workspace, B, D, K, nc, central,
        seed_key(seed));
    finish<SF_A>(workspace, trace, B, nc, scale, kScaledSum, SF_STREAM);
  });
}

extern "C" int sf_cuda_fd_direction(int dtype, const void* x, const void* u, const void* c, void* out,
                                    double* workspace, int64_t B, int64_t D, double h, void* stream) {
  const int64_t nc = num_chunks(D);
  double* scale = workspace + B * nc;
  return dispatch(dtype, [&](auto tag) {
    SqDiffOp<SF_T> op{static_cast<const SF_T*>(u), static_cast<const SF_T*>(c), D};
    row_reduce_kernel<SF_A><<<static_cast<unsigned>(B * nc), kThreads, 0, SF_STREAM>>>(op, workspace, D, nc);
    finish<double>(workspace, scale, B, nc, h, kStepOverNorm, SF_STREAM);
    shift_kernel<SF_T><<<static_cast<unsigned>(B * nc), kThreads, 0, SF_STREAM>>>(
        static_cast<const SF_T*>(x), static_cast<const SF_T*>(u), static_cast<const SF_T*>(c),
        static_cast<SF_T*>(out), scale, D, nc);
  });
}

extern "C" int sf_cuda_diff_of_diffs_norm(int dtype, const void* u0, const void* c0, const void* u1,
                                          const void* c1, void* out, double* workspace, int64_t B, int64_t D,
                                          void* stream) {
  const int64_t nc = num_chunks(D);
  return dispatch(dtype, [&](auto tag) {
    DodOp<SF_T> op{static_cast<const SF_T*>(u0), static_cast<const SF_T*>(c0), static_cast<const SF_T*>(u1),
                   static_cast<const SF_T*>(c1), D};
    row_reduce_kernel<SF_A><<<static_cast<unsigned>(B * nc), kThreads, 0, SF_STREAM>>>(op, workspace, D, nc);
    finish<SF_A>(workspace, out, B, nc, 0.0, kSqrt, SF_STREAM);
  });
}
