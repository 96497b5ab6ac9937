// CPU kernels of the fused target log-prob op (dapo_mcore::target_logprob_fwd / _bwd).
//
// logp[t] = z[t, y_t] - logsumexp_v z[t, v],  z = hidden @ weight^T, computed in
// [block_t x block_v] tiles that never leave the cache: [T, V] is never materialised.
// Threads (at::parallel_for) take vocab chunks dynamically; each keeps its own online
// (max, sum-exp) per token, merged at the end, and its own grad_hidden partial sum. Chunk
// GEMMs go to MKL via at::mm_out (one MKL thread per worker); the exp / max passes are
// `omp simd` loops.
// Accumulation dtype: float64 for float64 inputs, float32 otherwise. bf16 with even H on a CPU with
// AMX or AVX512-BF16: the packed-panel bf16 GEMM (csrc/panel_gemm.h, fp32 accumulate); other bf16/fp16
// chunks are upcast before an fp32 GEMM.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <type_traits>
#include <limits>
#include <vector>

#include "cpu_common.h"
#include "online_lse.h"
#include "fast_exp.h"
#include "panel_gemm.h"

namespace dapo {
namespace {

using at::Tensor;
using cpu::acc_type;
using cpu::for_each_chunk;
using cpu::tile;
using cpu::u16;
using cpu::u32;

void check_inputs(const Tensor& hidden, const Tensor& weight, const Tensor& targets, int64_t block_t,
                  int64_t block_v) {
  TORCH_CHECK(hidden.dim() == 2, "target_logprob: hidden must be [T, H], got ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2, "target_logprob: weight must be [V_local, H], got ", weight.sizes());
  TORCH_CHECK(hidden.size(1) == weight.size(1), "target_logprob: hidden [T, ", hidden.size(1),
              "] and weight [V, ", weight.size(1), "] disagree on H");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "target_logprob: hidden (",
              hidden.scalar_type(), ") and weight (", weight.scalar_type(), ") dtypes differ");
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()), "target_logprob: floating inputs required");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0) &&
                  targets.scalar_type() == at::kLong,
              "target_logprob: targets must be int64 [T=", hidden.size(0), "], got ",
              targets.scalar_type(), " ", targets.sizes());
  TORCH_CHECK(weight.size(0) >= 1, "target_logprob: empty vocab shard");
  TORCH_CHECK(block_t >= 1 && block_v >= 1, "target_logprob: block sizes must be >= 1");
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && targets.device().is_cpu(),
              "target_logprob: CPU kernels got a non-CPU tensor");
}

// bf16 inputs take the packed-panel bf16 GEMM (csrc/panel_gemm.h: AMX or AVX512-BF16) when the CPU has
// one; H even so that the K-pairs of a hidden/weight row are adjacent (odd H: upcast + fp32 GEMMs).
bool bf16_fast(const Tensor& hidden) {
  return hidden.scalar_type() == at::kBFloat16 && hidden.size(1) % 2 == 0 && panel::available();
}


template <typename acc_t>
std::tuple<Tensor, Tensor, Tensor> fwd_impl(const Tensor& hidden, const Tensor& weight, const Tensor& targets,
                                            int64_t vocab_start, int64_t block_t, int64_t block_v) {
  const int64_t T = hidden.size(0), V = weight.size(0);
  const auto acc = acc_type(hidden);
  const auto opts = hidden.options().dtype(acc);
  const bool fast = bf16_fast(hidden);
  Tensor h = fast ? hidden.detach().contiguous() : hidden.detach().to(acc).contiguous();
  Tensor w = weight.detach().contiguous();
  const int64_t H = w.size(1);
  const int64_t* y = targets.data_ptr<int64_t>();
  cpu::ThreadLse<acc_t> lse(T, at::get_num_threads());  // per-thread online softmax state
  Tensor tgt = at::zeros({T}, opts);
  acc_t* tgt_p = tgt.data_ptr<acc_t>();
  const int64_t n_chunks = (V + block_v - 1) / block_v;
  const int64_t bt = std::min(block_t, std::max<int64_t>(T, 1));

  struct FwdState {
    acc_t* mx;
    acc_t* sm;
    Tensor buf, wbuf;
  };
  const bool upcast = weight.scalar_type() != acc && !fast;
  for_each_chunk(
      n_chunks,
      [&] {
        const int tid = at::get_thread_num();
        return FwdState{lse.mx(tid), lse.sm(tid), at::empty({bt * block_v}, opts),
                        upcast ? at::empty({block_v * H}, opts)
                               : fast ? at::empty({panel::packed_words(H, block_v)}, at::kInt) : Tensor()};
      },
      [&](FwdState& st, int64_t c) {
        acc_t* mx = st.mx;
        acc_t* sm = st.sm;
        const int64_t v0 = c * block_v, vc = std::min(block_v, V - v0);
        Tensor wc = w.narrow(0, v0, vc);
        if (upcast) wc = tile(st.wbuf, vc, H).copy_(wc);  // bf16/fp16 -> fp32, reused buffer
        if (fast) panel::pack(u16(w) + v0 * H, H, H, vc, /*rows_are_n=*/true, u32(st.wbuf));
        for (int64_t t0 = 0; t0 < T; t0 += bt) {
          const int64_t tb = std::min(bt, T - t0);
          Tensor z = tile(st.buf, tb, vc);
          if (fast)
            panel::gemm(tb, vc, H, u16(h) + t0 * H, H, u32(st.wbuf), reinterpret_cast<float*>(z.data_ptr()), vc,
                        false);
          else
            at::mm_out(z, h.narrow(0, t0, tb), wc.t());
          const acc_t* zp = z.data_ptr<acc_t>();
          for (int64_t i = 0; i < tb; ++i) {
            const acc_t* row = zp + i * vc;
            const int64_t t = t0 + i;
            acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
            for (int64_t j = 0; j < vc; ++j) m = std::max(m, row[j]);
            const acc_t m_new = std::max(m, mx[t]);
            acc_t s = 0;
#pragma omp simd reduction(+ : s)
            for (int64_t j = 0; j < vc; ++j) s += exp_acc(row[j] - m_new);
            sm[t] = sm[t] * exp_acc(mx[t] - m_new) + s;
            mx[t] = m_new;
            const int64_t col = y[t] - vocab_start - v0;
            if (col >= 0 && col < vc) tgt_p[t] = row[col];  // exactly one chunk owns the target
          }
        }
      },
      [&](auto&) {
        if (fast) panel::release();
      });

  auto [out_max, out_sum] = lse.merge(opts);
  return {out_max, out_sum, tgt};
}

// bf16 path of one tile's gradient GEMMs: G [tb, vc] fp32 is rounded to bf16 (and transposed),
// then grad_h[t0:t0+tb] += G @ W_c and grad_W_c (+)= G^T @ h[t0:t0+tb], fp32 accumulation.
template <typename State>
void bf16_grad_gemms(State& st, const float* G, int64_t t0, int64_t tb, int64_t vc, int64_t H, Tensor& gwc,
                     bool into_main, Tensor& h_pairs, int64_t T) {
  const int64_t vk = vc + (vc & 1), tk = tb + (tb & 1);  // even K of the two GEMMs (zero padded)
  uint16_t* g16 = reinterpret_cast<uint16_t*>(st.g16.data_ptr());
  uint16_t* gt16 = reinterpret_cast<uint16_t*>(st.gt16.data_ptr());
  for (int64_t i = 0; i < tb; ++i) {
    const float* row = G + i * vc;
    uint16_t* out = g16 + i * vk;
#pragma omp simd
    for (int64_t j = 0; j < vc; ++j) out[j] = c10::detail::round_to_nearest_even(row[j]);
    if (vk != vc) out[vc] = 0;
  }
  for (int64_t j = 0; j < vc; ++j) {
    uint16_t* out = gt16 + j * tk;
    for (int64_t i = 0; i < tb; ++i) out[i] = g16[i * vk + j];
    if (tk != tb) out[tb] = 0;
  }
  panel::gemm(tb, H, vk, g16, vk, u32(st.w_pairs), reinterpret_cast<float*>(st.gh.data_ptr()) + t0 * H, H, true);
  // the K-slice [t0, t0 + tk) of hidden's packed token pairs (t0 even)
  panel::gemm_strided(vc, H, tk, gt16, tk, u32(h_pairs) + t0 / 2 * panel::NP, (T + 1) / 2 * panel::NP,
                      gwc.data_ptr<float>(), H, into_main || t0 > 0);
}

template <typename acc_t>
std::tuple<Tensor, Tensor> bwd_impl(const Tensor& hidden, const Tensor& weight, const Tensor& targets,
                                    const Tensor& lse_in, const Tensor& grad_in, int64_t vocab_start,
                                    int64_t block_t, int64_t block_v, const Tensor& main_grad) {
  const int64_t T = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  const auto acc = acc_type(hidden);
  const auto opts = hidden.options().dtype(acc);
  const bool fast = bf16_fast(hidden);
  Tensor h = fast ? hidden.detach().contiguous() : hidden.detach().to(acc).contiguous();
  Tensor w = weight.detach().contiguous();
  Tensor lse = lse_in.to(acc).contiguous();
  Tensor g = grad_in.to(acc).contiguous();
  const int64_t* y = targets.data_ptr<int64_t>();
  const acc_t* lse_p = lse.data_ptr<acc_t>();
  const acc_t* g_p = g.data_ptr<acc_t>();
  const int nthreads = at::get_num_threads();
  // into_main: grad_W is added straight into the caller's accumulation-dtype buffer (Megatron's
  // param.main_grad); each vocab chunk belongs to one thread, so the rows are written race-free.
  const bool into_main = main_grad.defined();
  const bool upcast = weight.scalar_type() != acc && !fast;  // bf16/fp16 chunks upcast to fp32
  const bool direct_gw = into_main || weight.scalar_type() == acc;  // else an fp32 chunk buffer
  Tensor grad_w = into_main ? at::empty({0}, weight.options()) : at::empty_like(w);
  Tensor grad_h_parts = at::zeros({nthreads, T, H}, opts);
  const int64_t n_chunks = (V + block_v - 1) / block_v;
  int64_t bt = std::min(block_t, std::max<int64_t>(T, 1));
  // bf16 fast path: G is rounded to bf16 for the two gradient GEMMs (fp32 accumulation), as on
  // GPU tensor cores; token blocks start at even t so that hidden's K-pairs (t, t+1) are packed
  // once for all chunks.
  Tensor h_pairs;
  if (fast) {
    bt += bt & 1;
    h_pairs = at::empty({panel::packed_words(T, H)}, at::kInt);
    panel::pack(u16(h), H, T, H, /*rows_are_n=*/false, u32(h_pairs));
  }
  const int64_t vce = block_v + (block_v & 1);  // even K for G @ W_chunk

  struct BwdState {
    Tensor gh, buf, buf_t, gw_buf, wbuf, w_pairs, g16, gt16;
  };
  for_each_chunk(
      n_chunks,
      [&] {
        return BwdState{grad_h_parts[at::get_thread_num()],
                        at::empty({bt * block_v}, opts),
                        at::empty({bt * block_v}, opts),  // G^T contiguous: MKL runs G^T @ h ~1.7x faster
                        direct_gw ? Tensor() : at::empty({block_v * H}, opts),
                        upcast ? at::empty({block_v * H}, opts)
                               : fast ? at::empty({panel::packed_words(H, block_v)}, at::kInt) : Tensor(),
                        fast ? at::empty({panel::packed_words(vce, H)}, at::kInt) : Tensor(),
                        fast ? at::empty({bt * vce}, at::kBFloat16) : Tensor(),
                        fast ? at::empty({block_v * bt}, at::kBFloat16) : Tensor()};
      },
      [&](BwdState& st, int64_t c) {
        const int64_t v0 = c * block_v, vc = std::min(block_v, V - v0);
        Tensor wc = w.narrow(0, v0, vc);
        if (upcast) wc = tile(st.wbuf, vc, H).copy_(wc);  // bf16/fp16 -> fp32, reused buffer
        Tensor gwc = into_main ? main_grad.narrow(0, v0, vc)
                     : direct_gw ? grad_w.narrow(0, v0, vc) : tile(st.gw_buf, vc, H);
        if (fast) {
          panel::pack(u16(w) + v0 * H, H, H, vc, /*rows_are_n=*/true, u32(st.wbuf));     // for h @ W_c^T
          panel::pack(u16(w) + v0 * H, H, vc, H, /*rows_are_n=*/false, u32(st.w_pairs));  // for G @ W_c
        }
        for (int64_t t0 = 0; t0 < T; t0 += bt) {
          const int64_t tb = std::min(bt, T - t0);
          Tensor z = tile(st.buf, tb, vc);
          Tensor hb = h.narrow(0, t0, tb);
          if (fast)
            panel::gemm(tb, vc, H, u16(h) + t0 * H, H, u32(st.wbuf), reinterpret_cast<float*>(z.data_ptr()), vc,
                        false);
          else
            at::mm_out(z, hb, wc.t());
          acc_t* zp = z.data_ptr<acc_t>();
          // z <- g * (onehot(y) - softmax(z)) = g * dlogp/dz, in place.
          for (int64_t i = 0; i < tb; ++i) {
            acc_t* row = zp + i * vc;
            const int64_t t = t0 + i;
            const acc_t gi = y[t] < 0 ? acc_t(0) : g_p[t];
            const acc_t l = lse_p[t];
#pragma omp simd
            for (int64_t j = 0; j < vc; ++j) row[j] = -gi * exp_acc(row[j] - l);
            const int64_t col = y[t] - vocab_start - v0;
            if (col >= 0 && col < vc) row[col] += gi;
          }
          if (fast) {
            if constexpr (std::is_same_v<acc_t, float>) bf16_grad_gemms(st, zp, t0, tb, vc, H, gwc, into_main, h_pairs, T);
            continue;
          }
          Tensor zt = tile(st.buf_t, vc, tb);
          zt.copy_(z.t());
          if (t0 == 0 && !into_main)
            at::mm_out(gwc, zt, hb);
          else
            gwc.addmm_(zt, hb);
          st.gh.narrow(0, t0, tb).addmm_(z, wc);
        }
        if (T == 0 && !into_main) gwc.zero_();
        if (!direct_gw) grad_w.narrow(0, v0, vc).copy_(gwc);
      },
      [&](auto&) {
        if (fast) panel::release();
      });
  Tensor grad_h = grad_h_parts.sum(0).to(hidden.scalar_type());
  return {grad_h, grad_w};
}

}  // namespace

// Returns (max [T], sumexp [T], target_logit [T]) over this vocab shard, in the accumulation
// dtype: sumexp is relative to max; target_logit is 0 where the target is outside the shard
// [vocab_start, vocab_start + V_local) or negative (ignore index).
std::tuple<at::Tensor, at::Tensor, at::Tensor> target_logprob_fwd(const at::Tensor& hidden, const at::Tensor& weight,
                                                                  const at::Tensor& targets, int64_t vocab_start,
                                                                  int64_t block_t, int64_t block_v) {
  check_inputs(hidden, weight, targets, block_t, block_v);
  if (hidden.scalar_type() == at::kDouble)
    return fwd_impl<double>(hidden, weight, targets, vocab_start, block_t, block_v);
  return fwd_impl<float>(hidden, weight, targets, vocab_start, block_t, block_v);
}

// Given the global lse [T] and dL/dlogp [T], returns (grad_hidden [T, H] of this shard's
// vocab only, grad_weight [V_local, H]) in the input dtype. Rows with target < 0 get no gradient.
// With main_grad ([V_local, H], contiguous, accumulation dtype: fp32, or fp64 for fp64 inputs)
// grad_weight is ADDED into main_grad instead and the second output is an empty [0] tensor.
std::tuple<at::Tensor, at::Tensor> target_logprob_bwd(const at::Tensor& hidden, const at::Tensor& weight,
                                                      const at::Tensor& targets, const at::Tensor& lse,
                                                      const at::Tensor& grad_logp, int64_t vocab_start,
                                                      int64_t block_t, int64_t block_v,
                                                      const std::optional<at::Tensor>& main_grad) {
  check_inputs(hidden, weight, targets, block_t, block_v);
  const int64_t T = hidden.size(0);
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == T, "target_logprob_bwd: lse must be [T=", T, "]");
  TORCH_CHECK(grad_logp.dim() == 1 && grad_logp.size(0) == T, "target_logprob_bwd: grad_logp must be [T=", T, "]");
  Tensor mg;
  if (main_grad.has_value() && main_grad->defined()) {
    mg = *main_grad;
    TORCH_CHECK(mg.sizes() == weight.sizes() && mg.is_contiguous() && mg.device().is_cpu() &&
                    mg.scalar_type() == acc_type(hidden),
                "target_logprob_bwd: main_grad must be a contiguous CPU ", acc_type(hidden), " tensor of the weight's shape ",
                weight.sizes(), ", got ", mg.scalar_type(), " ", mg.sizes(), mg.is_contiguous() ? "" : " (non-contiguous)");
  }
  if (hidden.scalar_type() == at::kDouble)
    return bwd_impl<double>(hidden, weight, targets, lse, grad_logp, vocab_start, block_t, block_v, mg);
  return bwd_impl<float>(hidden, weight, targets, lse, grad_logp, vocab_start, block_t, block_v, mg);
}

}  // namespace dapo

TORCH_LIBRARY_IMPL(dapo_mcore, CPU, m) {
  m.impl("target_logprob_fwd", &dapo::target_logprob_fwd);
  m.impl("target_logprob_bwd", &dapo::target_logprob_bwd);
}
