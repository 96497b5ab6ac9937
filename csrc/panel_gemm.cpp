// Packed-panel bf16 GEMM of csrc/panel_gemm.h: AMX through oneDNN's brgemm ukernel (libtorch's
// at::native::cpublas), else our AVX512-BF16 micro-kernel (csrc/bf16_gemm.cpp).
#include "panel_gemm.h"

#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "bf16_gemm.h"

namespace dapo::panel {
namespace {

Engine detect() {
  // DAPO_CPU_BF16_GEMM=avx512|none forces a slower engine (tests compare the paths).
  const char* force = std::getenv("DAPO_CPU_BF16_GEMM");
  const bool amx_ok = at::native::cpublas::could_pack(at::kBFloat16);
  if (force && std::strcmp(force, "none") == 0) return Engine::none;
  if (force && std::strcmp(force, "avx512") == 0) return bf16::available() ? Engine::avx512_bf16 : Engine::none;
  if (amx_ok) return Engine::amx;
  return bf16::available() ? Engine::avx512_bf16 : Engine::none;
}

}  // namespace

Engine engine() {
  static const Engine e = detect();
  return e;
}

const char* engine_name() {
  switch (engine()) {
    case Engine::amx: return "amx";
    case Engine::avx512_bf16: return "avx512_bf16";
    default: return "none";
  }
}

int64_t packed_words(int64_t K, int64_t N) { return (K + 1) / 2 * NP * ((N + NP - 1) / NP); }

void pack(const uint16_t* src, int64_t ld_src, int64_t K, int64_t N, bool rows_are_n, uint32_t* out) {
  const int64_t KP = (K + 1) / 2, n_panels = (N + NP - 1) / NP;
  for (int64_t p = 0; p < n_panels; ++p) {
    uint32_t* panel = out + p * KP * NP;
    const int64_t n0 = p * NP, nw = std::min(NP, N - n0);
    if (rows_are_n) {  // src [N, K]: word (kp, n) = the 32-bit pair at src[n][2kp]
      for (int64_t n = 0; n < nw; ++n) {
        const uint16_t* row = src + (n0 + n) * ld_src;
        for (int64_t kp = 0; kp < KP; ++kp) {
          const uint32_t lo = row[2 * kp], hi = 2 * kp + 1 < K ? row[2 * kp + 1] : 0u;
          panel[kp * NP + n] = lo | (hi << 16);
        }
      }
      for (int64_t kp = 0; kp < KP; ++kp)
        for (int64_t n = nw; n < NP; ++n) panel[kp * NP + n] = 0;
    } else {  // src [K, N]: interleave rows 2kp and 2kp+1
      for (int64_t kp = 0; kp < KP; ++kp) {
        const uint16_t* lo = src + 2 * kp * ld_src + n0;
        const bool has_hi = 2 * kp + 1 < K;
        const uint16_t* hi = lo + ld_src;
        uint32_t* o = panel + kp * NP;
#pragma omp simd
        for (int64_t n = 0; n < nw; ++n)
          o[n] = static_cast<uint32_t>(lo[n]) | (has_hi ? static_cast<uint32_t>(hi[n]) << 16 : 0u);
        for (int64_t n = nw; n < NP; ++n) o[n] = 0;
      }
    }
  }
}

void gemm(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint32_t* Bp, float* C,
          int64_t ldc, bool accumulate) {
  gemm_strided(M, N, K, A, lda, Bp, (K + 1) / 2 * NP, C, ldc, accumulate);
}

void gemm_strided(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint32_t* Bp,
                  int64_t panel_stride, float* C, int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  const int64_t KP = (K + 1) / 2;
  const Engine e = engine();
  for (int64_t p = 0; p * NP < N; ++p) {
    const int64_t nw = std::min(NP, N - p * NP);
    const uint32_t* B = Bp + p * panel_stride;
    float* Cp = C + p * NP;
    if (K == 0) {
      if (!accumulate)
        for (int64_t i = 0; i < M; ++i) std::fill(Cp + i * ldc, Cp + i * ldc + nw, 0.0f);
      continue;
    }
    if (e == Engine::amx)
      at::native::cpublas::brgemm(M, nw, 2 * KP, lda, NP, ldc, accumulate, reinterpret_cast<const at::BFloat16*>(A),
                                  reinterpret_cast<const at::BFloat16*>(B), Cp);
    else
      bf16::gemm(M, nw, 2 * KP, A, lda, B, NP, Cp, ldc, accumulate);
  }
}

void release() {
  if (engine() == Engine::amx) at::native::cpublas::brgemm_release();
}

}  // namespace dapo::panel
