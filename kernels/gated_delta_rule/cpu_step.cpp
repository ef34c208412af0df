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
//
// step_states runs several tokens of each sequence one after another in one call (speculative decoding's verify
// pass and its replay: step.py step_states), each token exactly as step_state runs it, a head's state staying in
// L1/L2 between its tokens.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// One token of one (sequence, value head): S [K, V] updated in place, o [V] written. rk, rq, dl: scratch of V.
// Both ops below run exactly this for every (sequence, head, token): the same bits.
inline __attribute__((always_inline)) void step_head(float* __restrict__ S, const float* __restrict__ k,
                                                     const float* __restrict__ q, float g, float b, float qd,
                                                     const float* __restrict__ vv, float* __restrict__ o,
                                                     float* __restrict__ rk, float* __restrict__ rq,
                                                     float* __restrict__ dl, int64_t K, int64_t V) {
  std::fill(rk, rk + V, 0.f);
  std::fill(rq, rq + V, 0.f);
  for (int64_t i = 0; i < K; ++i) {
    const float ki = k[i], qi = q[i];
    const float* row = S + i * V;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      rk[j] = std::fma(ki, row[j], rk[j]);
      rq[j] = std::fma(qi, row[j], rq[j]);
    }
  }
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

// The per-token inputs, checked: qk [R, H, 2, K] (k, then q: l2-normalised, q scaled); qdotk, decay, beta
// [R, H, 1]; v [R, H, V]; all fp32 on the CPU. Returns them contiguous.
std::vector<at::Tensor> token_inputs(const at::Tensor& qk, const at::Tensor& qdotk, const at::Tensor& decay,
                                     const at::Tensor& beta, const at::Tensor& v, int64_t R, int64_t H, int64_t K,
                                     int64_t V) {
  for (const at::Tensor* t : {&qk, &qdotk, &decay, &beta, &v})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "delta step: inputs must be fp32 CPU");
  TORCH_CHECK(qk.sizes() == at::IntArrayRef({R, H, 2, K}), "delta step: qk must be [rows, H, 2, K]");
  TORCH_CHECK(v.sizes() == at::IntArrayRef({R, H, V}), "delta step: v must be [rows, H, V]");
  for (const at::Tensor* t : {&qdotk, &decay, &beta})
    TORCH_CHECK(t->sizes() == at::IntArrayRef({R, H, 1}), "delta step: qdotk, decay, beta must be [rows, H, 1]");
  return {qk.contiguous(), qdotk.contiguous(), decay.contiguous(), beta.contiguous(), v.contiguous()};
}

void check_state(const at::Tensor& state) {
  TORCH_CHECK(state.dim() == 4 && state.scalar_type() == at::kFloat && state.is_contiguous(),
              "delta step: state must be contiguous fp32 [B, H, K, V]");
}

// One token per sequence: row b of the inputs into state[b] (in place). Returns o [B, H, V] fp32.
at::Tensor step_state(const at::Tensor& qk, const at::Tensor& qdotk, const at::Tensor& decay, const at::Tensor& beta,
                      const at::Tensor& v, at::Tensor state) {
  check_state(state);
  const int64_t B = state.size(0), H = state.size(1), K = state.size(2), V = state.size(3);
  const auto in = token_inputs(qk, qdotk, decay, beta, v, B, H, K, V);
  at::Tensor out = at::empty({B, H, V}, v.options());
  const float *qkp = in[0].data_ptr<float>(), *qdp = in[1].data_ptr<float>(), *dp = in[2].data_ptr<float>(),
              *bp = in[3].data_ptr<float>(), *vp = in[4].data_ptr<float>();
  float* sp = state.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(3 * V);
    for (int64_t bh = begin; bh < end; ++bh) {
      const float* k = qkp + bh * 2 * K;
      step_head(sp + bh * K * V, k, k + K, dp[bh], bp[bh], qdp[bh], vp + bh * V, op + bh * V, scratch.data(),
                scratch.data() + V, scratch.data() + 2 * V, K, V);
    }
  });
  return out;
}

// Several tokens of each of several sequences, token after token: rows offsets[b] .. offsets[b] + counts[b] - 1
// into state[slots[b]] (in place), each (sequence, head) its tokens in turn while its state is in L1/L2. `snaps`
// [R, H, K, V] (or empty): row r's place gets the state after row r, for every row but its sequence's last.
// Returns o [R, H, V] fp32, zeros in rows no sequence reads.
at::Tensor step_states(const at::Tensor& qk, const at::Tensor& qdotk, const at::Tensor& decay, const at::Tensor& beta,
                       const at::Tensor& v, at::Tensor state, at::IntArrayRef slots, at::IntArrayRef offsets,
                       at::IntArrayRef counts, at::Tensor snaps) {
  check_state(state);
  const int64_t S = state.size(0), H = state.size(1), K = state.size(2), V = state.size(3), R = qk.size(0);
  const auto in = token_inputs(qk, qdotk, decay, beta, v, R, H, K, V);
  const int64_t B = static_cast<int64_t>(slots.size());
  TORCH_CHECK(static_cast<int64_t>(offsets.size()) == B && static_cast<int64_t>(counts.size()) == B,
              "delta steps: one slot, offset and count per sequence");
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(slots[b] >= 0 && slots[b] < S, "delta steps: slot ", slots[b], " out of ", S);
    TORCH_CHECK(counts[b] >= 0 && offsets[b] >= 0 && offsets[b] + counts[b] <= R, "delta steps: rows of sequence ",
                b, " out of ", R);
    for (int64_t a = 0; a < b; ++a) {  // sequences run in parallel: no two may share a state or an output row
      TORCH_CHECK(slots[a] != slots[b], "delta steps: slot ", slots[b], " given twice");
      TORCH_CHECK(offsets[a] + counts[a] <= offsets[b] || offsets[b] + counts[b] <= offsets[a] || !counts[a] ||
                      !counts[b],
                  "delta steps: rows of sequences ", a, " and ", b, " overlap");
    }
  }
  const bool keep = snaps.numel() > 0;
  if (keep) {
    TORCH_CHECK(snaps.scalar_type() == at::kFloat && snaps.is_contiguous() &&
                    snaps.sizes() == at::IntArrayRef({R, H, K, V}),
                "delta steps: snaps must be contiguous fp32 [R, H, K, V]");
  }
  at::Tensor out = at::zeros({R, H, V}, v.options());
  const float *qkp = in[0].data_ptr<float>(), *qdp = in[1].data_ptr<float>(), *dp = in[2].data_ptr<float>(),
              *bp = in[3].data_ptr<float>(), *vp = in[4].data_ptr<float>();
  float* sp = state.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* np = keep ? snaps.data_ptr<float>() : nullptr;
  const int64_t KV = K * V;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(3 * V);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      float* st = sp + (slots[b] * H + h) * KV;
      for (int64_t t = 0; t < counts[b]; ++t) {
        const int64_t rh = (offsets[b] + t) * H + h;
        const float* k = qkp + rh * 2 * K;
        step_head(st, k, k + K, dp[rh], bp[rh], qdp[rh], vp + rh * V, op + rh * V, scratch.data(),
                  scratch.data() + V, scratch.data() + 2 * V, K, V);
        if (keep && t + 1 < counts[b]) std::copy(st, st + KV, np + rh * KV);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(qwenpd_delta, m) {
  m.def("step_state(Tensor qk, Tensor qdotk, Tensor decay, Tensor beta, Tensor v, Tensor(a!) state) -> Tensor");
  m.def(
      "step_states(Tensor qk, Tensor qdotk, Tensor decay, Tensor beta, Tensor v, Tensor(a!) state, int[] slots, "
      "int[] offsets, int[] counts, Tensor(b!) snaps) -> Tensor");
}
TORCH_LIBRARY_IMPL(qwenpd_delta, CPU, m) {
  m.impl("step_state", &step_state);
  m.impl("step_states", &step_states);
}
