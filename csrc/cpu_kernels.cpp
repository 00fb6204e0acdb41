// CPU kernels: the baseline copy of cpu_kernels_impl.h, and the run-time choice between it
// and the AVX2 copy (cpu_kernels_avx2.cpp) by what the processor supports.
#include "cpu_kernels.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "../kernels/sf_common.h"

#define SF_CPU_ISA baseline
#include "cpu_kernels_impl.h"
#undef SF_CPU_ISA

namespace sharpfast {
namespace cpu {

#if SF_HAVE_AVX2_COPY
namespace avx2 {
void cfg_combine(int, const void*, const void*, void*, void*, int64_t, int64_t, double);
void rademacher_perturb(int, const void*, void*, int64_t, int64_t, int64_t, bool, double, uint64_t);
void hutchinson_reduce(int, const void*, const void*, void*, int64_t, int64_t, int64_t, bool, double, uint64_t);
void fd_direction(int, const void*, const void*, const void*, void*, int64_t, int64_t, double);
void diff_of_diffs_norm(int, const void*, const void*, const void*, const void*, void*, int64_t, int64_t);
}  // namespace avx2
#endif

namespace {

bool avx2_supported() {
#if SF_HAVE_AVX2_COPY
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

// SHARPFAST_CPU_ISA=baseline forces the baseline copy (for tests and comparisons).
bool initial_use_avx2() {
  const char* env = std::getenv("SHARPFAST_CPU_ISA");
  if (env != nullptr && std::strcmp(env, "baseline") == 0) return false;
  return avx2_supported();
}

bool& use_avx2() {
  static bool flag = initial_use_avx2();
  return flag;
}

}  // namespace

const char* isa() { return use_avx2() ? "avx2" : "baseline"; }

bool set_isa(const char* name) {
  if (std::strcmp(name, "baseline") == 0) {
    use_avx2() = false;
    return true;
  }
  if ((std::strcmp(name, "avx2") == 0 || std::strcmp(name, "auto") == 0) && avx2_supported()) {
    use_avx2() = true;
    return true;
  }
  if (std::strcmp(name, "auto") == 0) {
    use_avx2() = false;
    return true;
  }
  return false;
}

#if SF_HAVE_AVX2_COPY
#define SF_CALL(fn, ...) return use_avx2() ? avx2::fn(__VA_ARGS__) : baseline::fn(__VA_ARGS__)
#else
#define SF_CALL(fn, ...) return baseline::fn(__VA_ARGS__)
#endif

void cfg_combine(int dtype, const void* u, const void* c, void* guided, void* diff_norm, int64_t B, int64_t D,
                 double w) {
  SF_CALL(cfg_combine, dtype, u, c, guided, diff_norm, B, D, w);
}

void rademacher_perturb(int dtype, const void* x, void* out, int64_t B, int64_t D, int64_t K, bool central,
                        double h, uint64_t seed) {
  SF_CALL(rademacher_perturb, dtype, x, out, B, D, K, central, h, seed);
}

void hutchinson_reduce(int dtype, const void* y, const void* y0, void* trace, int64_t B, int64_t D, int64_t K,
                       bool central, double h, uint64_t seed) {
  SF_CALL(hutchinson_reduce, dtype, y, y0, trace, B, D, K, central, h, seed);
}

void fd_direction(int dtype, const void* x, const void* u, const void* c, void* out, int64_t B, int64_t D,
                  double h) {
  SF_CALL(fd_direction, dtype, x, u, c, out, B, D, h);
}

void diff_of_diffs_norm(int dtype, const void* u0, const void* c0, const void* u1, const void* c1, void* out,
                        int64_t B, int64_t D) {
  SF_CALL(diff_of_diffs_norm, dtype, u0, c0, u1, c1, out, B, D);
}

#undef SF_CALL

}  // namespace cpu
}  // namespace sharpfast
