// sharpfast: facts shared by the CPU (csrc/) and CUDA (kernels/) implementations.
//
// Plain C++ (no torch, no CUDA runtime headers), so that g++ and nvcc both compile it.
//  - the counter-based Rademacher sign: a pure function of (seed, probe k, element i);
//    sharpfast/ops/_hash.py holds the same function for the torch and Triton backends,
//    and tests/test_ops_cross_backend.py checks that they agree bit for bit;
//  - float <-> fp16 / bf16 conversions with round-to-nearest-even, matching torch.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define SF_HD __host__ __device__ __forceinline__
#else
#define SF_HD inline
#endif

namespace sharpfast {

// dtype codes passed from the bindings to the launchers (kept torch-free).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// ---- Rademacher signs -------------------------------------------------------------
// mix32: a 32-bit avalanche hash (xorshift-multiply, "lowbias32" constants).
SF_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// Key of the whole probe family: both 32-bit halves of the 64-bit seed.
SF_HD uint32_t seed_key(uint64_t seed) {
  return mix32(static_cast<uint32_t>(seed >> 32) ^ mix32(static_cast<uint32_t>(seed)));
}

// Key of probe k (a Weyl step per probe, then mixed).
SF_HD uint32_t probe_key(uint32_t key0, uint32_t k) { return mix32(key0 + k * 0x9e3779b9u); }

// Signs of probe k come 32 at a time: bit (i % 32) of the hash of word i / 32 is the sign of
// element i (flat index inside ONE sample; set bit = -1). Every sample of a batch sees the same
// probe, so a sample's estimate does not depend on its batch.
SF_HD uint32_t rademacher_word(uint32_t kkey, uint32_t word) { return mix32(mix32(word) ^ kkey); }
SF_HD float rademacher(uint32_t kkey, uint32_t i) {
  return (rademacher_word(kkey, i >> 5) >> (i & 31u)) & 1u ? -1.0f : 1.0f;
}

// ---- 16-bit float storage types -----------------------------------------------------
struct half_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

SF_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}
SF_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

SF_HD float to_float(bf16_t v) { return bits_to_float(static_cast<uint32_t>(v.bits) << 16); }
SF_HD bf16_t to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40u)};  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}

// cond ? a : b as bit masks: GCC turns ternaries here into branches, which stop vectorization.
SF_HD uint32_t select_bits(bool cond, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - static_cast<uint32_t>(cond);
  return (a & m) | (b & ~m);
}

// fp16 <-> fp32 on the host without branches (so loops over them vectorize), round to
// nearest even; on the device the hardware conversions.
SF_HD float to_float(half_t v) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(v.bits));
#else
  const uint32_t sign = (static_cast<uint32_t>(v.bits) & 0x8000u) << 16;
  const uint32_t em = v.bits & 0x7fffu;                   // exponent and mantissa
  const uint32_t normal = (em << 13) + 0x38000000u;       // rebias 15 -> 127
  const uint32_t inf_nan = (em << 13) | 0x7f800000u;
  const uint32_t sub = float_to_bits(static_cast<float>(em) * 5.9604644775390625e-08f);  // em * 2^-24
  const uint32_t r = select_bits(em < 0x400u, sub, select_bits(em >= 0x7c00u, inf_nan, normal));
  return bits_to_float(r | sign);
#endif
}

SF_HD half_t to_half(float f) {
#if defined(__CUDA_ARCH__)
  return half_t{__half_as_ushort(__float2half_rn(f))};
#else
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  uint32_t normal = a - 0x38000000u;                       // rebias 127 -> 15
  normal = (normal + 0xfffu + ((normal >> 13) & 1u)) >> 13;  // drop 13 bits, ties to even
  // below 2^-14: adding 0.5 makes the FPU round to a multiple of 2^-24, ties to even
  const uint32_t sub = float_to_bits(bits_to_float(a) + 0.5f) - 0x3f000000u;
  const uint32_t big = select_bits(a > 0x7f800000u, 0x7e00u, 0x7c00u);  // NaN, or rounds to inf
  const uint32_t r = select_bits(a >= 0x477ff000u, big, select_bits(a < 0x38800000u, sub, normal));
  return half_t{static_cast<uint16_t>(sign | r)};
#endif
}

// io<T>: accumulation type of a storage type T, and its load / store.
// fp16, bf16 and fp32 accumulate in fp32; fp64 in fp64.
template <typename T> struct io;
template <> struct io<float> {
  using acc = float;
  static SF_HD float load(float v) { return v; }
  static SF_HD float store(float v) { return v; }
};
template <> struct io<double> {
  using acc = double;
  static SF_HD double load(double v) { return v; }
  static SF_HD double store(double v) { return v; }
};
template <> struct io<half_t> {
  using acc = float;
  static SF_HD float load(half_t v) { return to_float(v); }
  static SF_HD half_t store(float v) { return to_half(v); }
};
template <> struct io<bf16_t> {
  using acc = float;
  static SF_HD float load(bf16_t v) { return to_float(v); }
  static SF_HD bf16_t store(float v) { return to_bf16(v); }
};

}  // namespace sharpfast
