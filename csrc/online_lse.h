// The online log-sum-exp of the CPU kernels (csrc/target_logprob.cpp, csrc/fused_dapo_loss.cpp): each
// thread keeps a running max and a sum of exp(z - max) per token over the vocab blocks it took; merge()
// combines the threads' states into this shard's (max [T], sumexp [T] relative to max), the statistics
// the TP vocab shards later combine (dapo_mcore/ops/target_logprob.py: shard_logprobs).
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "fast_exp.h"

namespace dapo::cpu {

template <typename acc_t>
struct ThreadLse {
  static constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  int64_t T;
  int nthreads;
  std::vector<acc_t> max, sum;  // [nthreads, T] each

  ThreadLse(int64_t tokens, int threads)
      : T(tokens), nthreads(threads), max(static_cast<size_t>(threads) * tokens, kNegInf),
        sum(static_cast<size_t>(threads) * tokens, acc_t(0)) {}

  acc_t* mx(int tid) { return max.data() + static_cast<size_t>(tid) * T; }
  acc_t* sm(int tid) { return sum.data() + static_cast<size_t>(tid) * T; }

  // Folds one z^T block [vc, T] (row stride T: vocab rows, token columns) into thread tid's state;
  // bm: scratch of T elements. Two sweeps over the block (its max, then the rescaled sum of exp).
  void update_columns(int tid, const acc_t* blk, int64_t vc, acc_t* bm) {
    std::fill(bm, bm + T, kNegInf);
    for (int64_t v = 0; v < vc; ++v) {
      const acc_t* row = blk + v * T;
#pragma omp simd
      for (int64_t t = 0; t < T; ++t) bm[t] = std::max(bm[t], row[t]);
    }
    acc_t* m = mx(tid);
    acc_t* s = sm(tid);
#pragma omp simd
    for (int64_t t = 0; t < T; ++t) {
      const acc_t m_new = std::max(m[t], bm[t]);
      s[t] *= exp_acc(m[t] - m_new);  // m = -inf at first: exp(-inf) = 0
      m[t] = m_new;
    }
    for (int64_t v = 0; v < vc; ++v) {
      const acc_t* row = blk + v * T;
#pragma omp simd
      for (int64_t t = 0; t < T; ++t) s[t] += exp_acc(row[t] - m[t]);
    }
  }

  // Folds one block's per-token statistics (max bm [T], sum of exp(z - bm) bs [T]) into thread tid's state.
  void fold(int tid, const acc_t* bm, const acc_t* bs) {
    acc_t* m = mx(tid);
    acc_t* s = sm(tid);
#pragma omp simd
    for (int64_t t = 0; t < T; ++t) {
      const acc_t m_new = std::max(m[t], bm[t]);
      s[t] = s[t] * exp_acc(m[t] - m_new) + bs[t] * exp_acc(bm[t] - m_new);
      m[t] = m_new;
    }
  }

  // (max [T], sumexp [T] relative to max) over all threads, as tensors with `opts` (dtype acc_t).
  std::tuple<at::Tensor, at::Tensor> merge(const at::TensorOptions& opts) const {
    at::Tensor out_max = at::empty({T}, opts), out_sum = at::empty({T}, opts);
    acc_t* om = out_max.data_ptr<acc_t>();
    acc_t* os = out_sum.data_ptr<acc_t>();
    for (int64_t t = 0; t < T; ++t) {
      acc_t m = kNegInf;
      for (int k = 0; k < nthreads; ++k) m = std::max(m, max[static_cast<size_t>(k) * T + t]);
      acc_t s = 0;
      for (int k = 0; k < nthreads; ++k) {
        const acc_t mk = max[static_cast<size_t>(k) * T + t];
        if (mk != kNegInf) s += sum[static_cast<size_t>(k) * T + t] * exp_acc(mk - m);
      }
      om[t] = m;
      os[t] = s;
    }
    return {out_max, out_sum};
  }
};

}  // namespace dapo::cpu
