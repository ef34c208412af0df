"""Gated DeltaNet recurrence: the naive reference, the chunked prefill kernel and the single-step decode kernel."""

from qwenpd.kernels.gated_delta_rule.chunk import chunk_gated_delta_rule
from qwenpd.kernels.gated_delta_rule.naive import naive_gated_delta_rule
from qwenpd.kernels.gated_delta_rule.step import (StepInputs, step_gated_delta_rule, step_inputs, step_state,
                                                  step_state_torch, step_states, step_states_torch)

__all__ = ["StepInputs", "chunk_gated_delta_rule", "naive_gated_delta_rule", "step_gated_delta_rule", "step_inputs",
           "step_state", "step_state_torch", "step_states", "step_states_torch"]
