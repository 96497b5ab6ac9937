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
  // Fused target log-prob over one vocab shard (csrc/target_logprob.cpp); see dapo_mcore/ops.
  m.def("target_logprob_fwd(Tensor hidden, Tensor weight, Tensor targets, int vocab_start, int block_t, "
        "int block_v) -> (Tensor, Tensor, Tensor)");
  m.def("target_logprob_bwd(Tensor hidden, Tensor weight, Tensor targets, Tensor lse, Tensor grad_logp, "
        "int vocab_start, int block_t, int block_v, Tensor(a!)? main_grad=None) -> (Tensor, Tensor)");
  // Fused DAPO loss from hidden states, one token chunk at a time (csrc/fused_dapo_loss.cpp).
  m.def("fused_loss_logits(Tensor hidden, Tensor weight, Tensor targets, int vocab_start, int block_v, "
        "Tensor(a!) z) -> (Tensor, Tensor, Tensor)");
  m.def("fused_loss_grads(Tensor hidden, Tensor weight, Tensor targets, Tensor lse, Tensor coef, Tensor(a!) z, "
        "int vocab_start, int block_v, Tensor(b!)? grad_hidden, Tensor(c!)? grad_weight) -> ()");
  m.def("fused_loss_z_numel(Tensor hidden, int T, int V, int block_v) -> int");
  // Which bf16 GEMM the CPU kernels use: "amx" | "avx512_bf16" | "none" (csrc/panel_gemm.h).
  m.def("bf16_gemm_engine() -> str");
  // DAPO loss fused with the per-action segment sums (csrc/dapo_loss.cpp).
  m.def("dapo_loss_fwd(Tensor logp, Tensor ref_logp, Tensor segment_ids, Tensor advantages, float beta, "
        "float normalizer) -> (Tensor, Tensor)");
  m.def("dapo_loss_bwd(Tensor grad_loss, Tensor log_ratio, Tensor segment_ids, Tensor advantages, float beta, "
        "float normalizer) -> Tensor");
}
