// Helpers shared by the CPU kernels (csrc/target_logprob.cpp, csrc/fused_dapo_loss.cpp): the dynamic
// chunk scheduler over torch's OpenMP threads, single-threaded MKL inside it, small tensor views.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>

// MKL (statically inside libtorch_cpu) could otherwise start its own threads inside each of
// our workers (nested oversubscription). Weak symbol: simply absent in builds without MKL.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace dapo::cpu {

// Single-threaded BLAS for the chunk GEMMs of one at::parallel_for task (restored on exit).
struct SerialBlas {
  int prev = 0;
  SerialBlas() {
    if (MKL_Set_Num_Threads_Local) prev = MKL_Set_Num_Threads_Local(1);
  }
  ~SerialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev);
  }
};

// Runs body(state, chunk) for chunk in [0, n_chunks) on all threads, handing chunks out dynamically
// (an atomic counter): on a shared, noisy CPU a static split waits for the slowest thread. Each thread
// builds its state with init() once; finish(state) runs on the same thread after its last chunk.
template <typename Init, typename Body, typename Finish>
void for_each_chunk(int64_t n_chunks, const Init& init, const Body& body, const Finish& finish) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    at::NoGradGuard no_grad;  // grad mode is thread-local: worker threads start with it on
    SerialBlas serial;
    auto state = init();
    for (int64_t c = next.fetch_add(1); c < n_chunks; c = next.fetch_add(1)) body(state, c);
    finish(state);
  });
}

template <typename Init, typename Body>
void for_each_chunk(int64_t n_chunks, const Init& init, const Body& body) {
  for_each_chunk(n_chunks, init, body, [](auto&) {});
}

inline at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline const uint16_t* u16(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.const_data_ptr()); }
inline uint16_t* u16m(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); }
inline uint32_t* u32(at::Tensor& t) { return reinterpret_cast<uint32_t*>(t.data_ptr<int32_t>()); }

// Row-major [rows, cols] tile view over the first rows*cols elements of a flat buffer.
inline at::Tensor tile(const at::Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

}  // namespace dapo::cpu
