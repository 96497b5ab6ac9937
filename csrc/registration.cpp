// Op schema registry of the dapo_mcore CPU library. Each op's CPU kernel lives in its own
// file and registers its implementation with TORCH_LIBRARY_IMPL(dapo_mcore, CPU, m).
#include <torch/library.h>
#include <ATen/Parallel.h>

namespace dapo {

// Number of OpenMP/ATen intra-op threads the library sees; a liveness probe for the loader.
int64_t num_threads() { return static_cast<int64_t>(at::get_num_threads()); }

}  // namespace dapo

TORCH_LIBRARY(dapo_mcore, m) {
  m.def("num_threads() -> int", &dapo::num_threads);
}
