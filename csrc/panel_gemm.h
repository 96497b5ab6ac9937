// bf16 x bf16 -> fp32 GEMM on packed B panels, the CPU kernels' bf16 fast path.
// B[K, N] is packed once into panels of NP = 64 columns in K-pair ("VNNI") layout: panel p holds
// words W[kp][n] = (B[2kp][p*64+n], B[2kp+1][p*64+n]) as two bf16 (low half = even k), zero padded.
// That is both the layout of oneDNN's brgemm ukernel (AMX; reached through
// at::native::cpublas::brgemm, used where cpublas::could_pack(bf16) says the CPU has it) and of our
// AVX512-BF16 kernel (csrc/bf16_gemm.h, ldb = 64), so one packing serves both. Products of bf16 values
// are exact in fp32: results equal an fp32 GEMM of the same inputs up to summation order.
#pragma once
#include <cstdint>

namespace dapo::panel {

constexpr int64_t NP = 64;  // columns per panel (brgemm's packed ldb must be 16, 32, 48 or 64)

enum class Engine { amx, avx512_bf16, none };
Engine engine();                      // checked once: AMX (oneDNN brgemm) > AVX512-BF16 > none
inline bool available() { return engine() != Engine::none; }
const char* engine_name();

// Words of a packed [K, N] B (K rounded up to even, N to panels).
int64_t packed_words(int64_t K, int64_t N);

// Pack B into panels. rows_are_n: src is [N, K] row-major (B = src^T, e.g. a weight block [V, H] for
// x @ W^T, or hidden [T, H] for W @ h^T); else src is [K, N] row-major. ld_src: elements per src row.
void pack(const uint16_t* src, int64_t ld_src, int64_t K, int64_t N, bool rows_are_n, uint32_t* out);

// C[M, N] (= or +=) A[M, K] @ B, A bf16 row-major (lda elements) with K EVEN (callers pad A with a
// zero column), B packed by pack(K, N), C fp32 row-major (ldc). Single-threaded.
void gemm(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint32_t* Bp, float* C,
          int64_t ldc, bool accumulate);

// As gemm, on a K-slice of a larger packed B: Bp points at the slice's first K-pair of panel 0 and
// panel_stride is the word distance between panels (ceil(K_full / 2) * NP for a pack of K_full rows).
void gemm_strided(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint32_t* Bp,
                  int64_t panel_stride, float* C, int64_t ldc, bool accumulate);

// Releases the AMX tile state of this thread (call at the end of a thread's GEMM work; no-op otherwise).
void release();

}  // namespace dapo::panel
