// Conversions between the 16-bit float formats (c10::BFloat16, c10::Half) and float / double for
// the CPU kernels, written as bit operations and masks so that the compiler vectorises the loops
// that use them. c10's own conversions stayed scalar at the extension's baseline ISA (-O3, no
// -march): on bench_alignment's 52M-parameter DiT-like list the bf16 combine ran at 7 GB/s and
// the fp16 one at 2.5 GB/s, against 30 GB/s in fp32; the fp16 per-image likelihood read its bank
// at 3.5 GB/s against 32 GB/s in bf16. The results are c10's bit for bit: a load is exact; a store
// rounds to float, then to the 16-bit format to nearest even, and stores a NaN as c10 does (bf16:
// 0x7FC0; fp16: 0x7E00 with its sign). tests/test_alignment_ops.py checks every 16-bit pattern.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace genrep_fast {
namespace convert {

[[gnu::always_inline]] inline float float_of_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

[[gnu::always_inline]] inline uint32_t bits_of_float(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

[[gnu::always_inline]] inline float float_of_bf16(uint16_t v) {
  return float_of_bits(uint32_t(v) << 16);
}

[[gnu::always_inline]] inline uint16_t bf16_of_float(float f) {
  const uint32_t u = bits_of_float(f);
  const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return f != f ? uint16_t(0x7FC0) : rounded;
}

[[gnu::always_inline]] inline float float_of_half(uint16_t v) {
  const uint32_t sign = uint32_t(v & 0x8000u) << 16;
  const uint32_t em = v & 0x7FFFu;  // exponent and mantissa
  // Normal: rebias the exponent (15 -> 127); subnormal or zero: em * 2^-24 exactly; inf / NaN:
  // all-ones exponent, the mantissa (and a NaN's quiet bit) kept.
  const uint32_t normal = (em << 13) + 0x38000000u;
  const uint32_t small = bits_of_float(static_cast<float>(em) * 5.9604644775390625e-8f);
  const uint32_t special = (em << 13) | 0x7F800000u;
  // Bit masks rather than ?: : GCC keeps a ?: over a float operation as a branch (the operation
  // might trap), and then does not vectorise the loop.
  const uint32_t is_small = 0u - uint32_t(em < 0x0400u);
  const uint32_t is_special = 0u - uint32_t(em >= 0x7C00u);
  uint32_t mag = (normal & ~is_small) | (small & is_small);
  mag = (mag & ~is_special) | (special & is_special);
  return float_of_bits(sign | mag);
}

[[gnu::always_inline]] inline uint16_t half_of_float(float f) {
  const uint32_t x = bits_of_float(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t mag = x & 0x7FFFFFFFu;
  // |f| < 2^-14 (subnormal or zero in fp16): adding 0.5f rounds |f| to a multiple of 2^-24
  // (nearest even), which lands in the low mantissa bits of 0.5f.
  const uint32_t sub = bits_of_float(float_of_bits(mag) + 0.5f) - 0x3F000000u;
  // Normal: rebias (127 -> 15) and round the 13 dropped bits to nearest even; a carry out of the
  // mantissa bumps the exponent, up to infinity from 65520 on.
  const uint32_t norm = (mag - 0x38000000u + 0xFFFu + ((mag >> 13) & 1u)) >> 13;
  const uint32_t is_sub = 0u - uint32_t(mag < 0x38800000u);
  const uint32_t is_inf = 0u - uint32_t(mag >= 0x47800000u);  // 65536 and above, and inf
  const uint32_t is_nan = 0u - uint32_t(mag > 0x7F800000u);
  uint32_t h = (norm & ~is_sub) | (sub & is_sub);
  h = (h & ~is_inf) | (0x7C00u & is_inf);
  h = (h & ~is_nan) | (0x7E00u & is_nan);
  return static_cast<uint16_t>(sign | h);
}

// v as acc_t (float or double): static_cast, except for the 16-bit formats.
template <typename acc_t, typename scalar_t>
[[gnu::always_inline]] inline acc_t to_acc(scalar_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return static_cast<acc_t>(float_of_bf16(v.x));
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return static_cast<acc_t>(float_of_half(v.x));
  } else {
    return static_cast<acc_t>(v);
  }
}

// A double stored as scalar_t (the 16-bit formats through float, as c10 rounds).
template <typename scalar_t>
[[gnu::always_inline]] inline scalar_t from_double(double v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return c10::BFloat16(bf16_of_float(static_cast<float>(v)), c10::BFloat16::from_bits());
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return c10::Half(half_of_float(static_cast<float>(v)), c10::Half::from_bits());
  } else {
    return static_cast<scalar_t>(v);
  }
}

}  // namespace convert
}  // namespace genrep_fast
