// Launchers of sharpfast's CUDA kernels. Plain C interface: raw device pointers, a dtype code
// (sf_common.h), a cudaStream_t passed as void*. No torch headers, so that nvcc compiles the
// kernels on any machine, and the torch binding (csrc/cuda_bindings.cpp) only links to them.
//
// Layout: contiguous (B, D) rows; probe batches (K * B, D), or (2 * K * B, D) when central.
// Per-sample outputs are float (double for fp64 inputs). `workspace` is a device buffer of at
// least sf_cuda_workspace_elems(B, D) doubles. Every launcher returns a cudaError_t as int.
#pragma once
#include <cstdint>

extern "C" {

int64_t sf_cuda_workspace_elems(int64_t B, int64_t D);

int sf_cuda_cfg_combine(int dtype, const void* u, const void* c, void* guided, void* diff_norm,
                        double* workspace, int64_t B, int64_t D, double guidance_scale, void* stream);

int sf_cuda_rademacher_perturb(int dtype, const void* x, void* out, int64_t B, int64_t D, int64_t K,
                               bool central, double h, uint64_t seed, void* stream);

int sf_cuda_hutchinson_reduce(int dtype, const void* y, const void* y0, void* trace, double* workspace,
                              int64_t B, int64_t D, int64_t K, bool central, double h, uint64_t seed,
                              void* stream);

int sf_cuda_fd_direction(int dtype, const void* x, const void* u, const void* c, void* out,
                         double* workspace, int64_t B, int64_t D, double h, void* stream);

int sf_cuda_diff_of_diffs_norm(int dtype, const void* u0, const void* c0, const void* u1, const void* c1,
                               void* out, double* workspace, int64_t B, int64_t D, void* stream);
}
