// Vectorisable exp for the CPU kernels: Cephes-style range reduction + degree-6 polynomial
// (max error ~2 ulp in float32). Written as branch-free scalar code so that loops marked
// `#pragma omp simd` compile to AVX2/AVX-512 (no libm call, no -ffast-math needed).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace dapo {

static inline float exp_f32(float x) {
  // exp(x) for x <= 88.3; 0 below -87.3 (no denormals; exp(-inf) = 0); exact 1 at x = 0.
  const float lo = -87.33654475f;
  const bool under = x < lo;
  x = x < lo ? lo : (x > 88.3762626647949f ? 88.3762626647949f : x);
  const float n = std::nearbyint(x * 1.44269504088896341f);  // not floor: floor does not vectorise
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return under ? 0.0f : y * scale;
}

static inline double exp_acc(double x) { return std::exp(x); }
static inline float exp_acc(float x) { return exp_f32(x); }

}  // namespace dapo
