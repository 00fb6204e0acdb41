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

SF_HD float to_float(half_t v) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(v.bits));
#endif
  const uint32_t h = v.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  // zero or subnormal: man * 2^-24
  const float mag = static_cast<float>(man) * 5.9604644775390625e-08f;
  return sign ? -mag : mag;
}
SF_HD half_t to_half(float f) {
#if defined(__CUDA_ARCH__)
  return half_t{__half_as_ushort(__float2half_rn(f))};
#endif
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return half_t{static_cast<uint16_t>(sign | 0x7e00u)};   // NaN
  if (a >= 0x477ff000u) return half_t{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
  if (a < 0x38800000u) {
    // result is subnormal (or zero): round a's value to a multiple of 2^-24, ties to even
    const uint32_t exp = a >> 23;
    if (exp < 102u) return half_t{sign};  // below half of the smallest subnormal
    const uint32_t man = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exp;  // 14..24
    uint32_t r = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
    return half_t{static_cast<uint16_t>(sign | r)};
  }
  // normal: rebias the exponent, round 13 dropped mantissa bits to nearest even
  uint32_t r = a - 0x38000000u;  // exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return half_t{static_cast<uint16_t>(sign | (r >> 13))};
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
