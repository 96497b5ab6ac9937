// CPU kernels of the DAPO loss (dapo_mcore::dapo_loss_fwd / _bwd), fused with the per-action
// segment sums:  r_s = sum_{t: seg_t = s} (logp_t - ref_logp_t),
//                loss = sum_s 1/2 (A_s / beta - r_s)^2 / normalizer.
// Tokens with seg_t = -1 (state tokens, padding) contribute nothing. Sums accumulate in float64.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

namespace dapo {
namespace {

using at::Tensor;

void check(const Tensor& logp, const Tensor& segment_ids, const Tensor& advantages, double beta, double normalizer) {
  TORCH_CHECK(logp.dim() == 1, "dapo_loss: logp must be [T], got ", logp.sizes());
  TORCH_CHECK(segment_ids.dim() == 1 && segment_ids.size(0) == logp.size(0) && segment_ids.scalar_type() == at::kLong,
              "dapo_loss: segment_ids must be int64 [T=", logp.size(0), "], got ", segment_ids.scalar_type(), " ",
              segment_ids.sizes());
  TORCH_CHECK(advantages.dim() == 1, "dapo_loss: advantages must be [S], got ", advantages.sizes());
  TORCH_CHECK(beta > 0, "dapo_loss: beta must be > 0, got ", beta);
  TORCH_CHECK(normalizer > 0, "dapo_loss: normalizer must be > 0, got ", normalizer);
  const int64_t S = advantages.size(0);
  if (segment_ids.numel() > 0) {
    const int64_t lo = segment_ids.min().item<int64_t>(), hi = segment_ids.max().item<int64_t>();
    TORCH_CHECK(lo >= -1 && hi < S, "dapo_loss: segment_ids must lie in [-1, S=", S, "), got range [", lo, ", ", hi,
                "]");
  }
}

}  // namespace

// Returns (loss [] , log_ratio [S]) in float64 for float64 inputs, else float32.
std::tuple<at::Tensor, at::Tensor> dapo_loss_fwd(const at::Tensor& logp, const at::Tensor& ref_logp,
                                                 const at::Tensor& segment_ids, const at::Tensor& advantages,
                                                 double beta, double normalizer) {
  check(logp, segment_ids, advantages, beta, normalizer);
  TORCH_CHECK(ref_logp.sizes() == logp.sizes(), "dapo_loss: ref_logp ", ref_logp.sizes(), " != logp ", logp.sizes());
  const int64_t T = logp.size(0), S = advantages.size(0);
  const auto out_t = logp.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor lp = logp.to(at::kDouble).contiguous(), rp = ref_logp.to(at::kDouble).contiguous();
  Tensor adv = advantages.to(at::kDouble).contiguous();
  const double* lpp = lp.data_ptr<double>();
  const double* rpp = rp.data_ptr<double>();
  const int64_t* seg = segment_ids.contiguous().data_ptr<int64_t>();
  const int nthreads = at::get_num_threads();
  std::vector<double> parts(static_cast<size_t>(nthreads) * S, 0.0);
  at::parallel_for(0, T, 4096, [&](int64_t b, int64_t e) {
    double* acc = parts.data() + static_cast<size_t>(at::get_thread_num()) * S;
    for (int64_t t = b; t < e; ++t)
      if (seg[t] >= 0) acc[seg[t]] += lpp[t] - rpp[t];
  });
  Tensor ratio = at::zeros({S}, adv.options());
  double* r = ratio.data_ptr<double>();
  const double* a = adv.data_ptr<double>();
  double loss = 0.0;
  for (int64_t s = 0; s < S; ++s) {
    for (int k = 0; k < nthreads; ++k) r[s] += parts[static_cast<size_t>(k) * S + s];
    const double d = a[s] / beta - r[s];
    loss += 0.5 * d * d;
  }
  return {at::scalar_tensor(loss / normalizer, adv.options()).to(out_t), ratio.to(out_t)};
}

// dL/dlogp [T] = -grad_loss * (A_s / beta - r_s) / normalizer for seg_t = s >= 0, else 0
// (dL/dref_logp = -dL/dlogp). Output dtype: float64 for float64 log_ratio, else float32.
at::Tensor dapo_loss_bwd(const at::Tensor& grad_loss, const at::Tensor& log_ratio, const at::Tensor& segment_ids,
                         const at::Tensor& advantages, double beta, double normalizer) {
  TORCH_CHECK(grad_loss.numel() == 1, "dapo_loss_bwd: grad_loss must be a scalar");
  TORCH_CHECK(log_ratio.dim() == 1 && log_ratio.size(0) == advantages.size(0),
              "dapo_loss_bwd: log_ratio must be [S=", advantages.size(0), "]");
  const int64_t T = segment_ids.size(0), S = advantages.size(0);
  const double g = grad_loss.item<double>();
  Tensor adv = advantages.to(at::kDouble).contiguous(), r = log_ratio.to(at::kDouble).contiguous();
  std::vector<double> coef(S);
  for (int64_t s = 0; s < S; ++s)
    coef[s] = -g * (adv.data_ptr<double>()[s] / beta - r.data_ptr<double>()[s]) / normalizer;
  Tensor out = at::empty({T}, log_ratio.options());
  const int64_t* seg = segment_ids.contiguous().data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "dapo_loss_bwd", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 4096, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) o[t] = seg[t] >= 0 ? static_cast<scalar_t>(coef[seg[t]]) : scalar_t(0);
    });
  });
  return out;
}

}  // namespace dapo

TORCH_LIBRARY_IMPL(dapo_mcore, CPU, m) {
  m.impl("dapo_loss_fwd", &dapo::dapo_loss_fwd);
  m.impl("dapo_loss_bwd", &dapo::dapo_loss_bwd);
}
