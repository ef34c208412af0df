"""Input checks shared by the causal depthwise conv kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("silu", None)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_conv_inputs(x: Tensor, weight: Tensor, state: Tensor | None, activation: str | None,
                      token_dims: int) -> None:
    """x is [B, T, D] (token_dims=2) or [B, D] (token_dims=1); weight [D, W]; state [B, D, W-1]."""
    layout = "[B, T, D]" if token_dims == 2 else "[B, D]"
    _require(x.ndim == token_dims + 1, f"x must be {layout}, got shape {tuple(x.shape)}")
    _require(weight.ndim == 2 and weight.shape[1] >= 1,
             f"weight must be [D, W] (depthwise kernel), got shape {tuple(weight.shape)}")
    _require(x.shape[-1] == weight.shape[0], f"x has {x.shape[-1]} channels but weight has {weight.shape[0]}")
    for name, t in (("x", x), ("weight", weight), ("state", state)):
        if t is not None:
            _require(t.is_floating_point(), f"{name} must be a floating-point tensor, got {t.dtype}")
    if state is not None:
        expected = (x.shape[0], weight.shape[0], weight.shape[1] - 1)
        _require(tuple(state.shape) == expected, f"state must be [B, D, W-1] = {expected}, got {tuple(state.shape)}")
    _require(activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def accumulate_dtype(weight: Tensor) -> torch.dtype:
    """Sums run in fp32 (fp64 for fp64 weights) and are rounded once to the weight dtype, as F.conv1d does."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def finish(acc: Tensor, weight: Tensor, activation: str | None, out_dtype: torch.dtype) -> Tensor:
    """Round the sums (a scratch tensor) to the weight dtype, activate there like HF, cast to the input dtype."""
    y = acc.to(weight.dtype)
    if activation == "silu":
        y = F.silu(y, inplace=True)
    return y.to(out_dtype)
