// The AVX2 copy of the CPU kernels (x86-64 with GCC or Clang); cpu_kernels.cpp uses it when
// the processor supports AVX2. No FMA: products and sums round as in the baseline copy.
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "../kernels/sf_common.h"
#include "cpu_kernels.h"

#if SF_HAVE_AVX2_COPY
#pragma GCC push_options
#pragma GCC target("avx2")
#define SF_CPU_ISA avx2
#include "cpu_kernels_impl.h"
#undef SF_CPU_ISA
#pragma GCC pop_options
#endif
