// CPU implementations of sharpfast's fused ops: raw pointers, OpenMP, no torch.
//
// Every tensor is a contiguous (B, D) row-major array of `dtype` (see sf_common.h);
// probe batches are (K * B, D), or (2 * K * B, D) for central differences, probe-major.
// Per-sample outputs (norms, traces) are float for fp32/fp16/bf16 inputs, double for fp64.
// Reductions use a fixed chunking and a fixed summation order, so results do not depend
// on the number of threads.
#pragma once
#include <cstdint>

// An AVX2 copy of the kernels is built on x86-64 with GCC / Clang and chosen at run time.
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#define SF_HAVE_AVX2_COPY 1
#else
#define SF_HAVE_AVX2_COPY 0
#endif

namespace sharpfast {
namespace cpu {

void cfg_combine(int dtype, const void* u, const void* c, void* guided, void* diff_norm,
                 int64_t B, int64_t D, double guidance_scale);

void rademacher_perturb(int dtype, const void* x, void* out, int64_t B, int64_t D,
                        int64_t K, bool central, double h, uint64_t seed);

// y0 may be null when central is true (it is not read then).
void hutchinson_reduce(int dtype, const void* y, const void* y0, void* trace, int64_t B,
                       int64_t D, int64_t K, bool central, double h, uint64_t seed);

void fd_direction(int dtype, const void* x, const void* u, const void* c, void* out,
                  int64_t B, int64_t D, double h);

void diff_of_diffs_norm(int dtype, const void* u0, const void* c0, const void* u1,
                        const void* c1, void* out, int64_t B, int64_t D);

// The instruction set of the kernels in use ("avx2" or "baseline"), and a way to choose it:
// "baseline", "avx2" (false if the CPU lacks it) or "auto".
const char* isa();
bool set_isa(const char* name);

}  // namespace cpu
}  // namespace sharpfast
