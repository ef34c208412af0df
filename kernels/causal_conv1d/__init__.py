"""Causal depthwise conv1d of Gated DeltaNet: the naive reference, the chunk (prefill) and update (decode) kernels."""

from qwenpd.kernels.causal_conv1d.conv import causal_conv1d, causal_conv1d_update, causal_conv1d_update_many
from qwenpd.kernels.causal_conv1d.naive import naive_causal_conv1d

__all__ = ["causal_conv1d", "causal_conv1d_update", "causal_conv1d_update_many", "naive_causal_conv1d"]
