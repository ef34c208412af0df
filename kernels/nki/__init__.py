"""NKI kernels for the Gated DeltaNet layers on trn2, runnable on CPU through nki.simulate or our emulator.

- deltanet_chunk.py: chunked prefill (CTE), one launch for every chunk of every (sequence, value head) group,
  state kept in SBUF across chunks, intra-chunk system solved by blocked forward substitution.
- deltanet_step.py: one decode step (TKG) for a batch of sequences.
- ops.py: the host wrappers below, with the torch kernels' signatures (kernels.gated_delta_rule).
- backend.py: which NKI runs them (real `nki` when importable, else kernels.nki.emulator); emulator/: the
  test double for the NKI 0.3.0 subset used. Importing this package never imports `nki`.

Causal conv1d gets no NKI kernel, on purpose. The DeltaNet short convolution is depthwise with kernel 4 over
conv_dim = 2*Hk*K + Hv*V channels (10240 for Qwen3.6-27B): 4 multiply-adds per channel and token, against
about 2 * hidden * conv_dim for the in_proj matmul that produces its input. Its arithmetic intensity is
about 1 FLOP per byte, so as its own kernel it would cost one more HBM round trip of the [T, conv_dim]
activations and give the Tensor Engine nothing to do. Left to the compiler it fuses into the projection's
epilogue: with channels on partitions it is 4 shifted multiply-adds on the Vector Engine plus a SiLU on the
Scalar Engine, on data already in SBUF. Decode is a length-4 dot per channel plus a shift of the conv state,
the same story. The torch implementation (kernels.causal_conv1d) stays the definition of its semantics.
"""

from qwenpd.kernels.nki.ops import nki_chunk_gated_delta_rule, nki_step_gated_delta_rule

__all__ = ["nki_chunk_gated_delta_rule", "nki_step_gated_delta_rule"]
