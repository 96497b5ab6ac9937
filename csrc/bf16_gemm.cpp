// AVX512-BF16 GEMM of csrc/bf16_gemm.h: a 6 x 64 register-blocked micro-kernel (24 fp32 zmm
// accumulators) over a K-pair-packed B; the column tail is handled by lane masks.
#include "bf16_gemm.h"

#include <immintrin.h>

#include <algorithm>

#define DAPO_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace dapo::bf16 {
namespace {

constexpr int MR = 6;        // rows of C per micro-kernel call
constexpr int NV = 4;        // zmm vectors of 16 fp32 columns per call (64 columns)
constexpr int64_t KC = 256;  // K-pairs per pass: the 64-column B panel (64 KiB) stays in L2/L1

template <int R>
DAPO_BF16_TARGET void micro(int64_t kp0, int64_t kp1, const uint32_t* A, int64_t lda32, const uint32_t* Bp,
                            int64_t ldb, float* C, int64_t ldc, const __mmask16* mask, bool load_c) {
  __m512 acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[r][v] = load_c ? _mm512_maskz_loadu_ps(mask[v], C + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t kp = kp0; kp < kp1; ++kp) {
    __m512i b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = _mm512_maskz_loadu_epi32(mask[v], Bp + kp * ldb + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512i a = _mm512_set1_epi32(static_cast<int>(A[r * lda32 + kp]));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v)
        acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)a, (__m512bh)b[v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(C + r * ldc + 16 * v, mask[v], acc[r][v]);
}

template <int R>
void micro_dispatch(int rows, int64_t kp0, int64_t kp1, const uint32_t* A, int64_t lda32, const uint32_t* Bp,
                    int64_t ldb, float* C, int64_t ldc, const __mmask16* mask, bool load_c) {
  if constexpr (R > 0) {
    if (rows == R) return micro<R>(kp0, kp1, A, lda32, Bp, ldb, C, ldc, mask, load_c);
    micro_dispatch<R - 1>(rows, kp0, kp1, A, lda32, Bp, ldb, C, ldc, mask, load_c);
  }
}

bool detect() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
}

}  // namespace

bool available() {
  static const bool ok = detect();
  return ok;
}

void pack_b(const uint16_t* src, int64_t ld_src, int64_t K, int64_t N, bool rows_are_n, uint32_t* Bp,
            int64_t ldb) {
  const int64_t KP = (K + 1) / 2;
  if (rows_are_n) {  // src [N, K]: 32-bit transpose, in 16 x 16 blocks for locality
    const uint32_t* s32 = reinterpret_cast<const uint32_t*>(src);
    const int64_t ld32 = ld_src / 2;
    for (int64_t n0 = 0; n0 < N; n0 += 16)
      for (int64_t k0 = 0; k0 < KP; k0 += 16)
        for (int64_t n = n0; n < std::min(n0 + 16, N); ++n)
          for (int64_t kp = k0; kp < std::min(k0 + 16, KP); ++kp) Bp[kp * ldb + n] = s32[n * ld32 + kp];
    return;
  }
  for (int64_t kp = 0; kp < KP; ++kp) {
    const uint16_t* lo = src + 2 * kp * ld_src;
    const bool has_hi = 2 * kp + 1 < K;
    const uint16_t* hi = lo + ld_src;
    uint32_t* out = Bp + kp * ldb;
#pragma omp simd
    for (int64_t n = 0; n < N; ++n)
      out[n] = static_cast<uint32_t>(lo[n]) | (has_hi ? static_cast<uint32_t>(hi[n]) << 16 : 0u);
  }
}

DAPO_BF16_TARGET void gemm(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint32_t* Bp,
                           int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  const int64_t KP = K / 2;  // K is even (caller pads)
  const uint32_t* A32 = reinterpret_cast<const uint32_t*>(A);
  const int64_t lda32 = lda / 2;
  for (int64_t j0 = 0; j0 < N; j0 += 16 * NV) {
    __mmask16 mask[NV];
    for (int v = 0; v < NV; ++v) {
      const int64_t left = std::clamp<int64_t>(N - j0 - 16 * v, 0, 16);
      mask[v] = static_cast<__mmask16>((1u << left) - 1u);
    }
    for (int64_t k0 = 0; k0 < std::max<int64_t>(KP, 1); k0 += KC) {
      const int64_t k1 = std::min(k0 + KC, KP);
      const bool load_c = accumulate || k0 > 0;
      for (int64_t i0 = 0; i0 < M; i0 += MR) {
        const int rows = static_cast<int>(std::min<int64_t>(MR, M - i0));
        micro_dispatch<MR>(rows, k0, k1, A32 + i0 * lda32, lda32, Bp + j0, ldb, C + i0 * ldc + j0, ldc, mask,
                           load_c);
      }
    }
  }
}

}  // namespace dapo::bf16
