"""The NKI DeltaNet kernels as the `neuron` implementation of the qwenpd:: DeltaNet ops (TorchNeuron).

Registered only after torch-neuronx has been imported (it names the `neuron` device); nothing else imports this
module. The wrappers in kernels/nki/ops.py take torch tensors and run the kernels in the NKI mode that
kernels/nki/backend.py picks ("device" on a trn2 host). Not exercised on CPU hosts: there the NKI kernels are
tested through the emulator (tests/kernels/nki) and the ops keep their torch kernels.
"""

from __future__ import annotations

from qwenpd.kernels.nki.ops import nki_chunk_gated_delta_rule, nki_step_gated_delta_rule


def nki_chunk(q, k, v, g, beta, initial_state, mask=None):
    """The NKI chunk kernel with the qwenpd::chunk_gated_delta_rule contract (mask = real tokens, a prefix)."""
    if mask is not None:  # padding tokens: g = beta = 0 leaves the state alone; their outputs are zeroed
        g, beta = g * mask[..., None], beta * mask[..., None]
    o, state = nki_chunk_gated_delta_rule(q, k, v, g, beta, initial_state)
    if mask is not None:
        o = o * mask[..., None, None]
    return o, state


def nki_step(q, k, v, g, beta, state):
    """The NKI step kernel with the qwenpd::step_gated_delta_rule contract (state updated in place)."""
    return nki_step_gated_delta_rule(q, k, v, g, beta, state)


def register(chunk_op, step_op) -> str:
    chunk_op.register_kernel("neuron")(nki_chunk)
    step_op.register_kernel("neuron")(nki_step)
    return "nki"
