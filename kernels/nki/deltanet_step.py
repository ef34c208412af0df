"""One gated delta rule step for a batch of sequences (decode, TKG) as an NKI kernel for trn2.

Per (sequence, value head) group, with S [K, V] fp32 (K on the partition axis):

    S = exp(g) S;  delta = beta (v - k^T S);  S = S + k delta^T;  o = q^T S

Everything lives on one or K partitions: k^T S and q^T S contract over the K partitions (stationary [K, 1]),
the outer product k delta^T contracts over a single partition (stationary k^T [1, K], obtained once per key
group by a Tensor Engine transpose), and exp(g) reaches the K partitions through a ones [1, K] matmul.
Decode is bound by moving S (64 KiB per group at K = V = 128) between HBM and SBUF, not by this arithmetic.
Inputs come from the host (kernels.nki.ops): q L2-normalised and scaled by K^-1/2, k L2-normalised, fp32.
On chip: 3.5 KiB of SBUF per partition, 3 PSUM banks. Speed on trn2 unmeasured.
"""

from __future__ import annotations

from qwenpd.kernels.nki.backend import bound_modules
from qwenpd.kernels.nki.layout import IDENT, ONES, C

nki, nl, nisa = bound_modules()


@nki.jit
def deltanet_step_fwd(q, k, v, g, beta, state, consts, heads_per_key):
    """q, k: [Nk, K, 1]; v: [N, 1, V]; g, beta: [N, 1, 1]; state: [N, K, V] fp32; consts: layout.constants().

    Value group n = kh * heads_per_key + r reads key group kh; K, V <= 128.
    Returns o [N, 1, V] and the new state [N, K, V], fp32 in shared HBM.
    """
    n_keys, dk, _ = q.shape
    n_groups, _, dv = v.shape
    o = nl.ndarray((n_groups, 1, dv), dtype=nl.float32, buffer=nl.shared_hbm)
    state_out = nl.ndarray((n_groups, dk, dv), dtype=nl.float32, buffer=nl.shared_hbm)
    ident = nl.ndarray((dk, dk), dtype=nl.float32, buffer=nl.sbuf)
    ones = nl.ndarray((1, dk), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=ident, src=consts[0:dk, IDENT * C:IDENT * C + dk])
    nisa.dma_copy(dst=ones, src=consts[0:1, ONES * C:ONES * C + dk])
    for kh in nl.affine_range(n_keys):
        qc = nl.ndarray((dk, 1), dtype=nl.float32, buffer=nl.sbuf)
        kc = nl.ndarray((dk, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=qc, src=q[kh])
        nisa.dma_copy(dst=kc, src=k[kh])
        ps_k = nl.ndarray((1, dk), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=ps_k, stationary=kc, moving=ident, accumulate=False)  # k^T [1, K]
        k_row = nl.ndarray((1, dk), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=k_row, src=ps_k)
        for r in nl.affine_range(heads_per_key):
            n = kh * heads_per_key + r
            _step(qc, kc, k_row, ones, v[n], g[n], beta[n], state[n], o[n], state_out[n])
    return o, state_out


def _step(qc, kc, k_row, ones, v, g, beta, state, out, state_out):
    dk, dv = state.shape
    s = nl.ndarray((dk, dv), dtype=nl.float32, buffer=nl.sbuf)
    vr = nl.ndarray((1, dv), dtype=nl.float32, buffer=nl.sbuf)
    gb = nl.ndarray((1, 2), dtype=nl.float32, buffer=nl.sbuf)  # g | beta
    nisa.dma_copy(dst=s, src=state)
    nisa.dma_copy(dst=vr, src=v)
    nisa.dma_copy(dst=gb[:, 0:1], src=g)
    nisa.dma_copy(dst=gb[:, 1:2], src=beta)

    ps = nl.ndarray((dk, 2 * dv + 1), dtype=nl.float32, buffer=nl.psum)  # g on K partitions | k^T S | q^T S
    ps_upd = nl.ndarray((dk, dv), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=ps[:, 0:1], stationary=ones, moving=gb[:, 0:1], accumulate=False)
    decay = nl.ndarray((dk, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=decay, op=nl.exp, data=ps[:, 0:1])
    nisa.tensor_scalar(dst=s, data=s, op0=nl.multiply, operand0=decay)

    nisa.nc_matmul(dst=ps[0:1, 1:1 + dv], stationary=kc, moving=s, accumulate=False)  # k^T S
    delta = nl.ndarray((1, dv), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=delta, data1=vr, data2=ps[0:1, 1:1 + dv], op=nl.subtract)
    nisa.tensor_scalar(dst=delta, data=delta, op0=nl.multiply, operand0=gb[:, 1:2])
    nisa.nc_matmul(dst=ps_upd, stationary=k_row, moving=delta, accumulate=False)  # k delta^T
    nisa.tensor_tensor(dst=s, data1=s, data2=ps_upd, op=nl.add)

    nisa.nc_matmul(dst=ps[0:1, 1 + dv:1 + 2 * dv], stationary=qc, moving=s, accumulate=False)  # q^T S
    o_sb = nl.ndarray((1, dv), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=o_sb, src=ps[0:1, 1 + dv:1 + 2 * dv])
    nisa.dma_copy(dst=out, src=o_sb)
    nisa.dma_copy(dst=state_out, src=s)
