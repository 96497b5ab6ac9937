// bf16 x bf16 -> fp32 GEMM for the CPU kernels, on AVX512-BF16 (vdpbf16ps: 2 bf16 products per
// fp32 lane, fp32 accumulation). MKL's cblas_gemm_bf16bf16f32 (the only bf16->fp32 GEMM libtorch
// exports) runs at sgemm speed on this AMD CPU, and oneDNN's bf16 GEMM is not exported with an
// fp32 output, hence this small kernel. Products of bf16 values are exact in fp32, so the result
// equals an fp32 GEMM of the same (bf16) inputs up to fp32 summation order.
#pragma once
#include <cstdint>

namespace dapo::bf16 {

// True when the CPU has AVX512-BF16 (checked once at run time); else callers use fp32 GEMMs.
bool available();

// "K-pair" packing of B[K, N]: word Bp[kp * ldb + n] holds (B[2kp][n], B[2kp+1][n]) as two bf16
// (low half = even k; a missing odd row is 0). Two layouts of the source:
//   rows_are_n: src is [N, K] row-major (B = src^T; e.g. a weight chunk [V, H] for h @ W^T):
//               the pairs are already adjacent, this is a 32-bit transpose. K must be even.
//   else:       src is [K, N] row-major (B = src), ld_src elements per row.
void pack_b(const uint16_t* src, int64_t ld_src, int64_t K, int64_t N, bool rows_are_n, uint32_t* Bp,
            int64_t ldb);

// C[M, N] (= or +=) A[M, K] @ B[K, N]. A is bf16 row-major with lda elements per row and K even
// (pad with a zero column); Bp packed by pack_b with ldb >= N; C fp32 with ldc. Single-threaded.
void gemm(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint32_t* Bp, int64_t ldb,
          float* C, int64_t ldc, bool accumulate);

}  // namespace dapo::bf16
