"""Math kernels of qwenpd: Gated DeltaNet recurrence and its causal conv, each a naive reference + fast paths.

Backend-specific kernels live in subpackages imported on demand (e.g. `qwenpd.kernels.nki` on trn2), never here.
"""

from qwenpd.layout import subpackage_only

subpackage_only(__name__)  # never a top-level package (qwenpd/layout.py)

from qwenpd.kernels.causal_conv1d import causal_conv1d, causal_conv1d_update, naive_causal_conv1d  # noqa: E402
from qwenpd.kernels.gated_delta_rule import (chunk_gated_delta_rule, naive_gated_delta_rule,  # noqa: E402
                                             step_gated_delta_rule)

__all__ = [
    "causal_conv1d",
    "causal_conv1d_update",
    "chunk_gated_delta_rule",
    "naive_gated_delta_rule",
    "naive_causal_conv1d",
    "step_gated_delta_rule",
]
