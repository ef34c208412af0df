"""Math kernels of qwenpd: Gated DeltaNet recurrence and its causal conv, each a naive reference + fast paths.

Backend-specific kernels live in subpackages imported on demand (e.g. `qwenpd.kernels.nki` on trn2), never here.
"""

from qwenpd.kernels.causal_conv1d import causal_conv1d, causal_conv1d_update, naive_causal_conv1d
from qwenpd.kernels.gated_delta_rule import chunk_gated_delta_rule, naive_gated_delta_rule, step_gated_delta_rule

__all__ = [
    "causal_conv1d",
    "causal_conv1d_update",
    "chunk_gated_delta_rule",
    "naive_causal_conv1d",
    "naive_gated_delta_rule",
    "step_gated_delta_rule",
]
