// CPU kernels of the fused DAPO-loss op (dapo_mcore::fused_loss_logits / fused_loss_grads), one token
// chunk of whole actions at a time (dapo_mcore/ops/fused_dapo_loss.py drives the chunks, the TP
// all-reduces and the loss arithmetic between the two calls). The logits GEMM runs once: 3 GEMMs of
// 2*T*H*V in all (6*T*H*V), no recompute.
//
// Flat path (fp32, fp64, and bf16 where the library's bf16 GEMM is fast, i.e. AMX CPUs): the chunk's
// logits are one row-major z^T [V, T] in the caller's buffer, and every GEMM is ONE library call on the
// whole chunk, threaded by the library, so it runs at torch.mm's own rate (the floor the benchmark
// measures): fp32/fp64 through at::mm_out / addmm_ (MKL), bf16 through MKL's cblas_gemm_bf16bf16f32
// (csrc/panel_gemm.h: fp32 accumulation and output):
//   fused_loss_logits: z^T = W @ h^T, then (row blocks in parallel) per token max, sum-exp, target logit;
//   fused_loss_grads: per row G = coef * (onehot(y) - exp(z - lse)) in place (bf16: rounded to bf16 and
//     written narrow into the first half of the same row, so no second buffer), then grad_h = G @ W and
//     grad_W += G^T @ h (beta = 1: straight into Megatron's fp32 main_grad).
// Panel path (bf16 where the library's bf16 GEMM is slow, i.e. CPUs without AMX): threads take vocab
// blocks dynamically, single-threaded packed-panel GEMMs per block (csrc/panel_gemm.h: our AVX512-BF16
// kernel, or oneDNN's brgemm), the block's logits in a per-thread fp32 tile; the workspace keeps
// E = exp(z - block max) in bf16 (half the bytes of fp32 logits per token, so twice the tokens per chunk
// for the same memory) and the gradients are computed from it in place.
// Blocked path (fp16, or bf16 without a bf16 GEMM engine): z^T blocks [block_v, T] upcast to fp32 + MKL.
// G is rounded to bf16 for the two gradient GEMMs on the bf16 paths, as on GPU tensor cores.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "fast_exp.h"
#include "online_lse.h"
#include "panel_gemm.h"

namespace dapo {
namespace {

using at::Tensor;
using cpu::acc_type;
using cpu::for_each_chunk;
using cpu::tile;
using cpu::u16;
using cpu::u16m;
using cpu::u32;

void check(const Tensor& hidden, const Tensor& weight, const Tensor& targets, int64_t block_v) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "fused_loss: hidden [T, H] and weight [V_local, H] expected, got ", hidden.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type() && at::isFloatingType(hidden.scalar_type()),
              "fused_loss: hidden (", hidden.scalar_type(), ") and weight (", weight.scalar_type(),
              ") must share one floating dtype");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0) && targets.scalar_type() == at::kLong,
              "fused_loss: targets must be int64 [T=", hidden.size(0), "], got ", targets.scalar_type(), " ",
              targets.sizes());
  TORCH_CHECK(weight.size(0) >= 1 && block_v >= 1, "fused_loss: empty vocab shard or block_v < 1");
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && targets.device().is_cpu(),
              "fused_loss: CPU kernels got a non-CPU tensor");
}

int64_t n_blocks(int64_t V, int64_t block_v) { return (V + block_v - 1) / block_v; }

bool fast_bf16(const Tensor& hidden) {
  return hidden.scalar_type() == at::kBFloat16 && hidden.size(1) % 2 == 0 && panel::available();
}

// The flat path (file comment) applies: dtypes whose GEMM the library runs at torch.mm's rate.
bool flat_path(const Tensor& hidden) {
  const auto st = hidden.scalar_type();
  return st == at::kFloat || st == at::kDouble || (st == at::kBFloat16 && panel::library_gemm_fast());
}

// The panel path (file comment): bf16 on our packed-panel GEMM where the library's bf16 GEMM is slow.
bool panel_path(const Tensor& hidden) { return !flat_path(hidden) && fast_bf16(hidden); }

int64_t even(int64_t n) { return n + (n & 1); }

// fp32 words of the workspace z for T tokens. Flat / blocked: the fp32 logits z^T, block b's rows [vc, T]
// at b * block_v * T. Panel: E = exp(z - m_b) in bf16, [n_blocks * block_v, Te] (Te = T rounded up to
// even: its rows are the K = Te operand of the weight-gradient GEMM), then the block maxima m_b fp32
// [n_blocks, T]: about half the bytes per token.
int64_t z_numel(const Tensor& hidden, int64_t T, int64_t V, int64_t block_v) {
  if (panel_path(hidden)) return n_blocks(V, block_v) * (block_v * even(T) / 2 + T);
  return n_blocks(V, block_v) * block_v * T;
}

void check_z(const Tensor& z, const Tensor& hidden, int64_t V, int64_t block_v) {
  const int64_t need = z_numel(hidden, hidden.size(0), V, block_v);
  TORCH_CHECK(z.dim() == 1 && z.is_contiguous() && z.scalar_type() == acc_type(hidden) && z.numel() >= need,
              "fused_loss: z must be a contiguous 1-D ", acc_type(hidden), " buffer of >= ", need,
              " elements, got ", z.scalar_type(), " ", z.sizes());
}

// Blocked path (fp16, or bf16 without a bf16 GEMM engine): blocks upcast to fp32 + single-threaded MKL.
template <typename acc_t>
std::tuple<Tensor, Tensor, Tensor> logits_blocked(const Tensor& hidden, const Tensor& weight, const Tensor& targets,
                                               int64_t vocab_start, int64_t block_v, Tensor& z) {
  const int64_t T = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto acc = acc_type(hidden);
  const auto opts = hidden.options().dtype(acc);
  const bool upcast = weight.scalar_type() != acc;
  Tensor h = hidden.detach().to(acc).contiguous();
  Tensor w = weight.detach().contiguous();
  const int64_t* y = targets.data_ptr<int64_t>();
  acc_t* zp = z.data_ptr<acc_t>();
  cpu::ThreadLse<acc_t> lse(T, at::get_num_threads());
  Tensor tgt = at::zeros({T}, opts);
  acc_t* tgt_p = tgt.data_ptr<acc_t>();

  struct State {
    int tid;
    std::vector<acc_t> bm;
    Tensor wbuf;
  };
  for_each_chunk(
      n_blocks(V, block_v),
      [&] {
        return State{at::get_thread_num(), std::vector<acc_t>(T), upcast ? at::empty({block_v * H}, opts) : Tensor()};
      },
      [&](State& st, int64_t c) {
        const int64_t v0 = c * block_v, vc = std::min(block_v, V - v0);
        acc_t* zt = zp + c * block_v * T;  // z^T of this block: [vc, T]
        Tensor wc = w.narrow(0, v0, vc);
        if (upcast) wc = tile(st.wbuf, vc, H).copy_(wc);
        Tensor out = z.narrow(0, c * block_v * T, vc * T).view({vc, T});
        at::mm_out(out, wc, h.t());
        lse.update_columns(st.tid, zt, vc, st.bm.data());
        for (int64_t t = 0; t < T; ++t) {
          const int64_t col = y[t] - vocab_start - v0;
          if (col >= 0 && col < vc) tgt_p[t] = zt[col * T + t];  // exactly one block owns the target
        }
      });

  auto [out_max, out_sum] = lse.merge(opts);
  return {out_max, out_sum, tgt};
}

template <typename acc_t>
void grads_blocked(const Tensor& hidden, const Tensor& weight, const Tensor& targets, const Tensor& lse_in,
                const Tensor& coef_in, Tensor& z, int64_t vocab_start, int64_t block_v, const Tensor& grad_hidden,
                const Tensor& grad_weight) {
  const int64_t T = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto acc = acc_type(hidden);
  const auto opts = hidden.options().dtype(acc);
  const bool upcast = weight.scalar_type() != acc;
  const bool want_h = grad_hidden.defined(), want_w = grad_weight.defined();
  Tensor h = hidden.detach().to(acc).contiguous();
  Tensor w = weight.detach().contiguous();
  Tensor lse = lse_in.to(acc).contiguous(), coef = coef_in.to(acc).contiguous();
  const int64_t* y = targets.data_ptr<int64_t>();
  const acc_t* lse_p = lse.data_ptr<acc_t>();
  const acc_t* coef_p = coef.data_ptr<acc_t>();
  acc_t* zp = z.data_ptr<acc_t>();
  const int nthreads = at::get_num_threads();
  Tensor gh_parts = want_h ? at::zeros({nthreads, T, H}, opts) : Tensor();

  struct State {
    Tensor gh, wbuf;
  };
  for_each_chunk(
      n_blocks(V, block_v),
      [&] {
        State st;
        if (want_h) st.gh = gh_parts[at::get_thread_num()];
        if (upcast) st.wbuf = at::empty({block_v * H}, opts);
        return st;
      },
      [&](State& st, int64_t c) {
        const int64_t v0 = c * block_v, vc = std::min(block_v, V - v0);
        acc_t* gt = zp + c * block_v * T;  // z^T -> G^T in place: [vc, T]
        for (int64_t v = 0; v < vc; ++v) {
          acc_t* row = gt + v * T;
#pragma omp simd
          for (int64_t t = 0; t < T; ++t) row[t] = -coef_p[t] * exp_acc(row[t] - lse_p[t]);
        }
        for (int64_t t = 0; t < T; ++t) {
          const int64_t col = y[t] - vocab_start - v0;
          if (y[t] >= 0 && col >= 0 && col < vc) gt[col * T + t] += coef_p[t];
        }
        Tensor Gt = z.narrow(0, c * block_v * T, vc * T).view({vc, T});
        if (want_w) {
          Tensor gwc = grad_weight.narrow(0, v0, vc);
          gwc.addmm_(Gt, h);
        }
        if (want_h) {
          Tensor wc = w.narrow(0, v0, vc);
          if (upcast) wc = tile(st.wbuf, vc, H).copy_(wc);
          st.gh.addmm_(Gt.t(), wc);
        }
      });
  if (want_h) at::sum_out(const_cast<Tensor&>(grad_hidden), gh_parts, {0});
}

// Panel path, logits: per vocab block (threads take blocks dynamically) z^T [vc, T] = W_b @ h^T on the
// packed-panel GEMM into a per-thread fp32 tile (in L2), the block's per-token max m_b and the target
// logits from it, then E = exp(z - m_b) rounded to bf16 into the workspace, summed in fp32 (so the
// statistics are those of the fp32 logits). E in bf16 carries p = E * exp(m_b - lse) to bf16 precision,
// the precision G is rounded to for the gradient GEMMs anyway.
std::tuple<Tensor, Tensor, Tensor> logits_panel(const Tensor& hidden, const Tensor& weight, const Tensor& targets,
                                                int64_t vocab_start, int64_t block_v, Tensor& z) {
  const int64_t T = hidden.size(0), H = hidden.size(1), V = weight.size(0), Te = even(T);
  const int64_t nb = n_blocks(V, block_v);
  const auto opts = hidden.options().dtype(at::kFloat);
  Tensor h = hidden.detach().contiguous(), w = weight.detach().contiguous();
  const int64_t* y = targets.data_ptr<int64_t>();
  uint16_t* E = reinterpret_cast<uint16_t*>(z.data_ptr<float>());
  float* Mb = z.data_ptr<float>() + nb * block_v * Te / 2;
  Tensor hT = at::empty({panel::packed_words(H, T)}, at::kInt);  // B = h^T (K = H, N = T), packed once
  panel::pack(u16(h), H, H, T, /*rows_are_n=*/true, u32(hT));
  cpu::ThreadLse<float> lse(T, at::get_num_threads());
  Tensor tgt = at::zeros({T}, opts);
  float* tgt_p = tgt.data_ptr<float>();
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  struct State {
    int tid;
    std::vector<float> zt, bs;
  };
  for_each_chunk(
      nb, [&] { return State{at::get_thread_num(), std::vector<float>(block_v * T), std::vector<float>(T)}; },
      [&](State& st, int64_t c) {
        const int64_t v0 = c * block_v, vc = std::min(block_v, V - v0);
        float* zt = st.zt.data();
        float* bm = Mb + c * T;
        float* bs = st.bs.data();
        panel::gemm(vc, T, H, u16(w) + v0 * H, H, u32(hT), zt, T, false);
        std::fill(bm, bm + T, kNegInf);
        for (int64_t v = 0; v < vc; ++v) {
          const float* row = zt + v * T;
#pragma omp simd
          for (int64_t t = 0; t < T; ++t) bm[t] = std::max(bm[t], row[t]);
        }
        for (int64_t t = 0; t < T; ++t) {
          const int64_t col = y[t] - vocab_start - v0;
          if (col >= 0 && col < vc) tgt_p[t] = zt[col * T + t];  // exactly one block owns the target
        }
        std::fill(bs, bs + T, 0.0f);
        for (int64_t v = 0; v < vc; ++v) {
          const float* row = zt + v * T;
          uint16_t* out = E + (v0 + v) * Te;
#pragma omp simd
          for (int64_t t = 0; t < T; ++t) {
            const float e = exp_f32(row[t] - bm[t]);
            bs[t] += e;
            out[t] = c10::detail::round_to_nearest_even(e);
          }
          if (Te != T) out[T] = 0;
        }
        lse.fold(st.tid, bm, bs);
      },
      [&](State&) { panel::release(); });
  auto [out_max, out_sum] = lse.merge(opts);
  return {out_max, out_sum, tgt};
}

// Panel path, gradients: per vocab block, G^T = bf16(-coef * exp(m_b - lse) * E) in place over E (plus
// coef at each token's target, from E before it is overwritten), then grad_W[v0:v0+vc] += G^T @ h straight
// from those rows (K = Te) and, per thread, grad_h += G @ W_b (G transposed, W_b packed per block).
void grads_panel(const Tensor& hidden, const Tensor& weight, const Tensor& targets, const Tensor& lse_in,
                 const Tensor& coef_in, Tensor& z, int64_t vocab_start, int64_t block_v, const Tensor& grad_hidden,
                 const Tensor& grad_weight) {
  const int64_t T = hidden.size(0), H = hidden.size(1), V = weight.size(0), Te = even(T);
  const int64_t nb = n_blocks(V, block_v), vce = even(block_v);
  const auto opts = hidden.options().dtype(at::kFloat);
  const bool want_h = grad_hidden.defined(), want_w = grad_weight.defined();
  Tensor h = hidden.detach().contiguous(), w = weight.detach().contiguous();
  Tensor lse = lse_in.to(at::kFloat).contiguous(), coef = coef_in.to(at::kFloat).contiguous();
  const int64_t* y = targets.data_ptr<int64_t>();
  const float* lse_p = lse.data_ptr<float>();
  const float* coef_p = coef.data_ptr<float>();
  uint16_t* E = reinterpret_cast<uint16_t*>(z.data_ptr<float>());
  const float* Mb = z.data_ptr<float>() + nb * block_v * Te / 2;
  const int nthreads = at::get_num_threads();
  Tensor gh_parts = want_h ? at::zeros({nthreads, T, H}, opts) : Tensor();
  Tensor h_pairs;  // B = h (K = T, N = H) packed once, for G^T @ h
  if (want_w) {
    h_pairs = at::empty({panel::packed_words(Te, H)}, at::kInt);
    panel::pack(u16(h), H, T, H, /*rows_are_n=*/false, u32(h_pairs));
  }

  struct State {
    Tensor gh, g16, w_pairs;
    std::vector<float> sc;
    std::vector<std::pair<int64_t, float>> hits;  // (index into the block, G) at the block's targets
  };
  for_each_chunk(
      nb,
      [&] {
        State st;
        st.sc.resize(Te);
        if (want_h) {
          st.gh = gh_parts[at::get_thread_num()];
          st.g16 = at::empty({T * vce}, at::kBFloat16);
          st.w_pairs = at::empty({panel::packed_words(vce, H)}, at::kInt);
        }
        return st;
      },
      [&](State& st, int64_t c) {
        const int64_t v0 = c * block_v, vc = std::min(block_v, V - v0);
        uint16_t* gt = E + v0 * Te;  // E -> G^T in place: [vc, Te] bf16
        const float* bm = Mb + c * T;
        float* sc = st.sc.data();
#pragma omp simd
        for (int64_t t = 0; t < T; ++t) sc[t] = -coef_p[t] * exp_f32(bm[t] - lse_p[t]);
        if (Te != T) sc[T] = 0.0f;
        st.hits.clear();
        for (int64_t t = 0; t < T; ++t) {
          const int64_t col = y[t] - vocab_start - v0;
          if (y[t] >= 0 && col >= 0 && col < vc)
            st.hits.emplace_back(col * Te + t, coef_p[t] + sc[t] * c10::detail::f32_from_bits(gt[col * Te + t]));
        }
        for (int64_t v = 0; v < vc; ++v) {
          uint16_t* row = gt + v * Te;
#pragma omp simd
          for (int64_t t = 0; t < Te; ++t)
            row[t] = c10::detail::round_to_nearest_even(sc[t] * c10::detail::f32_from_bits(row[t]));
        }
        for (const auto& [i, g] : st.hits) gt[i] = c10::detail::round_to_nearest_even(g);
        if (want_w) panel::gemm(vc, H, Te, gt, Te, u32(h_pairs), grad_weight.data_ptr<float>() + v0 * H, H, true);
        if (want_h) {
          const int64_t vk = even(vc);
          uint16_t* g = u16m(st.g16);  // G in bf16 [T, vk]
          for (int64_t v = 0; v < vc; ++v)
            for (int64_t t = 0; t < T; ++t) g[t * vk + v] = gt[v * Te + t];
          if (vk != vc)
            for (int64_t t = 0; t < T; ++t) g[t * vk + vc] = 0;
          panel::pack(u16(w) + v0 * H, H, vc, H, /*rows_are_n=*/false, u32(st.w_pairs));
          panel::gemm(T, H, vk, g, vk, u32(st.w_pairs), st.gh.data_ptr<float>(), H, true);
        }
      },
      [&](State&) { panel::release(); });
  if (want_h) at::sum_out(const_cast<Tensor&>(grad_hidden), gh_parts, {0});
}

// The flat path keeps z^T [V, T] (W @ h^T is the faster orientation of both BLAS calls, measured) and
// makes ONE library call per GEMM per chunk and one parallel region per row pass: on a shared, loaded
// CPU every extra parallel region costs a barrier that waits for a descheduled thread (measured: cutting
// the passes into 2 MiB slabs between smaller GEMM calls made them ~3x slower in CPU time there).
// Threads take kPassRows-row blocks of z^T dynamically; a [kPassRows, T] block stays in L2 between the
// two sweeps of the statistics pass (256 rows x 192 tokens x 4 B = 192 KiB).
constexpr int64_t kPassRows = 256;

template <typename acc_t>
std::tuple<Tensor, Tensor, Tensor> logits_flat(const Tensor& hidden, const Tensor& weight, const Tensor& targets,
                                               int64_t vocab_start, Tensor& z) {
  const int64_t T = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto opts = hidden.options().dtype(acc_type(hidden));
  const bool bf = hidden.scalar_type() == at::kBFloat16;
  Tensor h = hidden.detach().contiguous(), w = weight.detach().contiguous();
  Tensor ZT = z.narrow(0, 0, V * T).view({V, T});  // z^T: W @ h^T is the fast orientation of both BLAS calls
  acc_t* zp = ZT.data_ptr<acc_t>();
  cpu::ThreadLse<acc_t> lse(T, at::get_num_threads());
  {
    at::NoGradGuard no_grad;
    if (bf) {
      if constexpr (std::is_same_v<acc_t, float>)
        panel::library_gemm(false, true, V, T, H, u16(w), H, u16(h), H, 0.0f, zp, T);
    } else {
      at::mm_out(ZT, w, h.t());
    }
  }
  for_each_chunk(
        n_blocks(V, kPassRows), [&] { return std::vector<acc_t>(T); },
        [&](std::vector<acc_t>& bmv, int64_t c) {
          const int64_t v0 = c * kPassRows, vc = std::min(kPassRows, V - v0);
          lse.update_columns(at::get_thread_num(), zp + v0 * T, vc, bmv.data());
        });
  Tensor tgt = at::zeros({T}, opts);
  acc_t* tgt_p = tgt.data_ptr<acc_t>();
  const int64_t* y = targets.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t col = y[t] - vocab_start;
    if (col >= 0 && col < V) tgt_p[t] = zp[col * T + t];  // targets of other shards: 0 (summed over TP)
  }
  auto [out_max, out_sum] = lse.merge(opts);
  return {out_max, out_sum, tgt};
}

template <typename acc_t>
void grads_flat(const Tensor& hidden, const Tensor& weight, const Tensor& targets, const Tensor& lse_in,
                const Tensor& coef_in, Tensor& z, int64_t vocab_start, const Tensor& grad_hidden,
                const Tensor& grad_weight) {
  const int64_t T = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto acc = acc_type(hidden);
  const bool bf = std::is_same_v<acc_t, float> && hidden.scalar_type() == at::kBFloat16;
  const bool want_h = grad_hidden.defined(), want_w = grad_weight.defined();
  Tensor h = hidden.detach().contiguous(), w = weight.detach().contiguous();
  Tensor lse = lse_in.to(acc).contiguous(), coef = coef_in.to(acc).contiguous();
  const acc_t* lse_p = lse.data_ptr<acc_t>();
  const acc_t* coef_p = coef.data_ptr<acc_t>();
  const int64_t* y = targets.data_ptr<int64_t>();
  Tensor ZT = z.narrow(0, 0, V * T).view({V, T});
  acc_t* zp = ZT.data_ptr<acc_t>();
  uint16_t* z16 = reinterpret_cast<uint16_t*>(zp);  // bf16: G^T [V, T] with row stride 2T (below)
  // G at each token's target, from z before the pass overwrites it: coef * (1 - p_target); -1: none here.
  std::vector<acc_t> g_hit(T, acc_t(0));
  std::vector<int64_t> hit_col(T, -1);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t col = y[t] - vocab_start;
    if (y[t] < 0 || col < 0 || col >= V) continue;
    hit_col[t] = col;
    g_hit[t] = coef_p[t] * (acc_t(1) - exp_acc(zp[col * T + t] - lse_p[t]));
  }
  at::NoGradGuard no_grad;
  // grad_h^T [H, T] = W^T @ G^T (the faster orientation of this K = V reduction, measured), transposed
  // into grad_h at the end; grad_W += G^T @ h.
  Tensor ghT = want_h ? at::empty({H, T}, hidden.options().dtype(acc)) : Tensor();
  // G^T = -coef * exp(z^T - lse) in place, row by row (bf16: each row's G is rounded to bf16 and written
  // into the first half of the same row, floats [v*T, v*T+T) -> bf16 [2vT, 2vT+T), via a row buffer and
  // memcpy: no other row is touched, no aliasing assumption).
  at::parallel_for(0, V, kPassRows, [&](int64_t b, int64_t e) {
    std::vector<uint16_t> buf(bf ? T : 0);
    for (int64_t v = b; v < e; ++v) {
      acc_t* row = zp + v * T;
      if (!bf) {
#pragma omp simd
        for (int64_t t = 0; t < T; ++t) row[t] = -coef_p[t] * exp_acc(row[t] - lse_p[t]);
        continue;
      }
      if constexpr (std::is_same_v<acc_t, float>) {
        uint16_t* bp = buf.data();
#pragma omp simd
        for (int64_t t = 0; t < T; ++t)
          bp[t] = c10::detail::round_to_nearest_even(-coef_p[t] * exp_acc(row[t] - lse_p[t]));
        std::memcpy(reinterpret_cast<uint16_t*>(row), bp, static_cast<size_t>(T) * sizeof(uint16_t));
      }
    }
  });
  for (int64_t t = 0; t < T; ++t) {  // the one-hot term at each token's target (in this shard)
    const int64_t col = hit_col[t];
    if (col < 0) continue;
    if constexpr (std::is_same_v<acc_t, float>) {
      if (bf) {
        const uint16_t g16 = c10::detail::round_to_nearest_even(g_hit[t]);
        std::memcpy(z16 + 2 * col * T + t, &g16, sizeof(g16));
        continue;
      }
    }
    zp[col * T + t] = g_hit[t];
  }
  if (bf) {
    if constexpr (std::is_same_v<acc_t, float>) {
      const uint16_t* g16 = z16;  // G^T [V, T] bf16, row stride 2T
      if (want_h) panel::library_gemm(true, false, H, T, V, u16(w), H, g16, 2 * T, 0.0f, ghT.data_ptr<float>(), T);
      if (want_w)
        panel::library_gemm(false, false, V, H, T, g16, 2 * T, u16(h), H, 1.0f,
                            const_cast<Tensor&>(grad_weight).data_ptr<float>(), H);
    }
  } else {
    if (want_h) at::mm_out(ghT, w.t(), ZT);
    if (want_w) const_cast<Tensor&>(grad_weight).addmm_(ZT, h);
  }
  if (want_h) const_cast<Tensor&>(grad_hidden).copy_(ghT.t());
}

}  // namespace

// (max [T], sumexp [T] relative to max, target_logit [T]) over this vocab shard, as target_logprob_fwd,
// and the logits in z (a caller-owned buffer, see z_numel).
std::tuple<Tensor, Tensor, Tensor> fused_loss_logits(const Tensor& hidden, const Tensor& weight,
                                                     const Tensor& targets, int64_t vocab_start, int64_t block_v,
                                                     Tensor& z) {
  check(hidden, weight, targets, block_v);
  check_z(z, hidden, weight.size(0), block_v);
  if (hidden.scalar_type() == at::kDouble) return logits_flat<double>(hidden, weight, targets, vocab_start, z);
  if (flat_path(hidden)) return logits_flat<float>(hidden, weight, targets, vocab_start, z);
  if (panel_path(hidden)) return logits_panel(hidden, weight, targets, vocab_start, block_v, z);
  return logits_blocked<float>(hidden, weight, targets, vocab_start, block_v, z);
}

// From fused_loss_logits' z (overwritten): G = coef * (onehot(y) - exp(z - lse)); writes grad_hidden
// [T, H] = G @ W (of this shard) and ADDS G^T @ h into grad_weight [V_local, H] (e.g. Megatron's
// main_grad); both in the accumulation dtype, contiguous; either may be None (skipped).
void fused_loss_grads(const Tensor& hidden, const Tensor& weight, const Tensor& targets, const Tensor& lse,
                      const Tensor& coef, Tensor& z, int64_t vocab_start, int64_t block_v,
                      const std::optional<Tensor>& grad_hidden, const std::optional<Tensor>& grad_weight) {
  check(hidden, weight, targets, block_v);
  check_z(z, hidden, weight.size(0), block_v);
  const int64_t T = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == T && coef.dim() == 1 && coef.size(0) == T,
              "fused_loss_grads: lse and coef must be [T=", T, "]");
  const auto acc = acc_type(hidden);
  Tensor gh = grad_hidden.has_value() ? *grad_hidden : Tensor();
  Tensor gw = grad_weight.has_value() ? *grad_weight : Tensor();
  if (gh.defined())
    TORCH_CHECK(gh.sizes() == at::IntArrayRef({T, H}) && gh.is_contiguous() && gh.scalar_type() == acc,
                "fused_loss_grads: grad_hidden must be a contiguous ", acc, " [", T, ", ", H, "] tensor, got ",
                gh.scalar_type(), " ", gh.sizes());
  if (gw.defined())
    TORCH_CHECK(gw.sizes() == weight.sizes() && gw.is_contiguous() && gw.scalar_type() == acc && gw.device().is_cpu(),
                "fused_loss_grads: grad_weight must be a contiguous CPU ", acc, " tensor of the weight's shape ",
                weight.sizes(), ", got ", gw.scalar_type(), " ", gw.sizes());
  if (T == 0) return;
  (void)V;
  if (hidden.scalar_type() == at::kDouble)
    return grads_flat<double>(hidden, weight, targets, lse, coef, z, vocab_start, gh, gw);
  if (flat_path(hidden)) return grads_flat<float>(hidden, weight, targets, lse, coef, z, vocab_start, gh, gw);
  if (panel_path(hidden)) return grads_panel(hidden, weight, targets, lse, coef, z, vocab_start, block_v, gh, gw);
  grads_blocked<float>(hidden, weight, targets, lse, coef, z, vocab_start, block_v, gh, gw);
}

std::string bf16_gemm_engine() { return panel::engine_name(); }

// fp32 (fp64 for fp64 inputs) elements of the workspace z that fused_loss_logits needs for T tokens of
// hidden's dtype and width over V vocab rows: the caller sizes its buffer and its token chunks with it.
int64_t fused_loss_z_numel(const Tensor& hidden, int64_t T, int64_t V, int64_t block_v) {
  TORCH_CHECK(T >= 0 && V >= 1 && block_v >= 1, "fused_loss_z_numel: T >= 0, V >= 1, block_v >= 1 expected");
  return z_numel(hidden, T, V, block_v);
}

}  // namespace dapo

TORCH_LIBRARY_IMPL(dapo_mcore, CPU, m) {
  m.impl("fused_loss_logits", &dapo::fused_loss_logits);
  m.impl("fused_loss_grads", &dapo::fused_loss_grads);
  m.impl("fused_loss_z_numel", &dapo::fused_loss_z_numel);
}

TORCH_LIBRARY_IMPL(dapo_mcore, CatchAll, m) { m.impl("bf16_gemm_engine", &dapo::bf16_gemm_engine); }
