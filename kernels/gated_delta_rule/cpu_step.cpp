// The state part of a gated delta rule decode step (step.py step_state) on CPU in one pass over the state:
//
//   r_k = k^T S,  r_q = q^T S                  (one read of S [K, V] per sequence and value head)
//   delta = beta (v - e^g r_k),  o = e^g r_q + (q . k) delta
//   S <- e^g S + k delta^T                    (one write; S is back in L1/L2 by then: 64 KB per head at 128 x 128)
//
// The torch code (step_state_torch, the plain reference beside it; equivalence tests in
// tests/kernels/test_delta_step_cpu.py) reads S three times and writes it twice: one batched matmul, then the
// decay and the update as two in-place passes. Every multiply-add is an explicit fma, each sum runs over k in
// order, and every (sequence, head) is computed alone: the same bits whatever the batch, the thread split or the
// vector width the build picked.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace {

// qk [B, H, 2, K] (k, then q: l2-normalised, q scaled); qdotk, decay, beta [B, H, 1]; v [B, H, V]; all fp32.
// state [B, H, K, V] fp32 contiguous, updated in place. Returns o [B, H, V] fp32.
at::Tensor step_state(const at::Tensor& qk, const at::Tensor& qdotk, const at::Tensor& decay, const at::Tensor& beta,
                      const at::Tensor& v, at::Tensor state) {
  TORCH_CHECK(state.dim() == 4 && state.scalar_type() == at::kFloat && state.is_contiguous(),
              "delta step: state must be contiguous fp32 [B, H, K, V]");
  const int64_t B = state.size(0), H = state.size(1), K = state.size(2), V = state.size(3);
  for (const at::Tensor* t : {&qk, &qdotk, &decay, &beta, &v})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "delta step: inputs must be fp32 CPU");
  TORCH_CHECK(qk.sizes() == at::IntArrayRef({B, H, 2, K}), "delta step: qk must be [B, H, 2, K]");
  TORCH_CHECK(v.sizes() == at::IntArrayRef({B, H, V}), "delta step: v must be [B, H, V]");
  for (const at::Tensor* t : {&qdotk, &decay, &beta})
    TORCH_CHECK(t->sizes() == at::IntArrayRef({B, H, 1}), "delta step: qdotk, decay, beta must be [B, H, 1]");
  const at::Tensor qkc = qk.contiguous(), qdc = qdotk.contiguous(), dc = decay.contiguous(), bc = beta.contiguous(),
                   vc = v.contiguous();
  at::Tensor out = at::empty({B, H, V}, v.options());
  const float *qkp = qkc.data_ptr<float>(), *qdp = qdc.data_ptr<float>(), *dp = dc.data_ptr<float>(),
              *bp = bc.data_ptr<float>(), *vp = vc.data_ptr<float>();
  float* sp = state.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> reads(2 * V), delta(V);
    float *rk = reads.data(), *rq = rk + V, *dl = delta.data();
    for (int64_t bh = begin; bh < end; ++bh) {
      float* S = sp + bh * K * V;
      const float* k = qkp + bh * 2 * K;
      const float* q = k + K;
      std::fill(reads.begin(), reads.end(), 0.f);
      for (int64_t i = 0; i < K; ++i) {
        const float ki = k[i], qi = q[i];
        const float* row = S + i * V;
#pragma omp simd
        for (int64_t j = 0; j < V; ++j) {
          rk[j] = std::fma(ki, row[j], rk[j]);
          rq[j] = std::fma(qi, row[j], rq[j]);
        }
      }
      const float g = dp[bh], b = bp[bh], qd = qdp[bh];
      const float* vv = vp + bh * V;
      float* o = op + bh * V;
#pragma omp simd
      for (int64_t j = 0; j < V; ++j) {
        dl[j] = b * std::fma(-g, rk[j], vv[j]);
        o[j] = std::fma(g, rq[j], qd * dl[j]);
      }
      for (int64_t i = 0; i < K; ++i) {
        const float ki = k[i];
        float* row = S + i * V;
#pragma omp simd
        for (int64_t j = 0; j < V; ++j) row[j] = std::fma(ki, dl[j], g * row[j]);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(qwenpd_delta, m) {
  m.def("step_state(Tensor qk, Tensor qdotk, Tensor decay, Tensor beta, Tensor v, Tensor(a!) state) -> Tensor");
}
TORCH_LIBRARY_IMPL(qwenpd_delta, CPU, m) { m.impl("step_state", &step_state); }
