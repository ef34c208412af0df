"""Chunked gated delta rule forward (prefill, CTE) as an NKI kernel for trn2.

One launch covers every chunk of every (sequence, value head) group. Per group, the recurrent state S [K, V]
fp32 stays in SBUF across its chunks (a sequential loop); groups are independent (an affine loop). A chunk is
C = 128 tokens on the partition axis. With G the cumulative log decay inside the chunk (G_i = sum_{t<=i} g_t):

    A = tril(beta_i (k_i . k_j) exp(G_i - G_j), -1)            [C, C]
    (I + A) [U | W] = [beta v | beta k exp(G)]                 blocked forward substitution (see _solve)
    v_new = U - W S
    o = exp(G) (q S) + tril((q k^T) exp(G_i - G_j)) v_new
    S = exp(G_last) S + (k exp(G_last - G))^T v_new

Inputs are fp32 and prepared by the host (kernels.nki.ops): q L2-normalised and scaled by K^-1/2, k
L2-normalised, T padded to a multiple of C with g = beta = k = 0 (padding leaves S unchanged).

On chip at K = V = 128: 17 KiB of SBUF per partition and 7 of the 8 PSUM banks (the emulator's ledger checks
both). Per chunk: 46 matmuls (31 of them in the solve: 15 sweeps for the 16-row diagonal blocks, 16 for the
block substitution) and ~55 Vector/Scalar Engine instructions. Correct in the emulator; its speed on trn2 is
unmeasured.
"""

from __future__ import annotations

from qwenpd.kernels.nki.backend import bound_modules
from qwenpd.kernels.nki.layout import (
    BLOCK,
    BLOCK_MASKS,
    BLOCKDIAG,
    IDENT,
    N_BLOCKS,
    N_CONST_COLS,
    NEG_LOWER,
    NEG_UPPER,
    ONES,
    ROW_MASKS,
    SLOWER,
    UPPER,
    C,
    block,
)

nki, nl, nisa = bound_modules()


@nki.jit
def deltanet_chunk_fwd(q, k, v, g, beta, state0, consts, heads_per_key):
    """Gated delta rule over whole padded sequences.

    q, k: [Nk, Tp, K] (key groups); v: [N, Tp, V]; g, beta: [N, Tp, 1]; state0: [N, K, V] fp32;
    consts: [C, N_CONST_COLS] (kernels.nki.layout.constants()). Value group n = kh * heads_per_key + r reads
    key group kh. Tp is a multiple of C; K, V <= 128.
    Returns o [N, Tp, V] and the final state [N, K, V], fp32 in shared HBM.
    """
    n_keys, t_pad, dk = q.shape
    n_groups, _, dv = v.shape
    o = nl.ndarray((n_groups, t_pad, dv), dtype=nl.float32, buffer=nl.shared_hbm)
    state_out = nl.ndarray((n_groups, dk, dv), dtype=nl.float32, buffer=nl.shared_hbm)
    cst = nl.ndarray((C, N_CONST_COLS), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=cst, src=consts)
    for kh in nl.affine_range(n_keys):
        for r in nl.affine_range(heads_per_key):
            n = kh * heads_per_key + r
            state = nl.ndarray((dk, dv), dtype=nl.float32, buffer=nl.sbuf)
            nisa.dma_copy(dst=state, src=state0[n])
            for c in nl.sequential_range(t_pad // C):
                t0 = c * C
                _chunk(q[kh, t0:t0 + C], k[kh, t0:t0 + C], v[n, t0:t0 + C], g[n, t0:t0 + C], beta[n, t0:t0 + C],
                       o[n, t0:t0 + C], state, cst)
            nisa.dma_copy(dst=state_out[n], src=state)
    return o, state_out


def _chunk(q, k, v, g, beta, out, state, cst):
    """One chunk: writes out [C, V] (HBM) and advances state [K, V] (SBUF) in place."""
    qc, kc, vc, gc, bc = _load(q, k, v, g, beta)
    qk_t = _transpose_qk(qc, kc, cst)  # [K, 2C]: q^T | k^T
    q_t, k_t = qk_t[:, 0:C], qk_t[:, C:2 * C]
    e, e_last, decay, decay_t = _decays(gc, cst, qc.shape[1])
    a_blk_t, a_off_t = _system(k_t, bc, decay, cst)
    x = _solve(a_blk_t, a_off_t, _rhs(vc, kc, bc, e[:, 0:1]), cst)  # [C, V + K]: U | W
    _output_and_state(x, q_t, k_t, kc, decay_t, e, e_last, state, out, cst)


def _load(q, k, v, g, beta):
    dk, dv = q.shape[1], v.shape[1]
    qc = nl.ndarray((C, dk), dtype=nl.float32, buffer=nl.sbuf)
    kc = nl.ndarray((C, dk), dtype=nl.float32, buffer=nl.sbuf)
    vc = nl.ndarray((C, dv), dtype=nl.float32, buffer=nl.sbuf)
    gc = nl.ndarray((C, 1), dtype=nl.float32, buffer=nl.sbuf)
    bc = nl.ndarray((C, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=qc, src=q)
    nisa.dma_copy(dst=kc, src=k)
    nisa.dma_copy(dst=vc, src=v)
    nisa.dma_copy(dst=gc, src=g)
    nisa.dma_copy(dst=bc, src=beta)
    return qc, kc, vc, gc, bc


def _transpose_qk(qc, kc, cst):
    """q^T and k^T [K, C] side by side, by the Tensor Engine (x^T = x.T @ I)."""
    dk = qc.shape[1]
    ps = nl.ndarray((dk, 2 * C), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=ps[:, 0:C], stationary=qc, moving=cst[:, block(IDENT)], accumulate=False)
    nisa.nc_matmul(dst=ps[:, C:2 * C], stationary=kc, moving=cst[:, block(IDENT)], accumulate=False)
    qk_t = nl.ndarray((dk, 2 * C), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=qk_t, src=ps)
    return qk_t


def _decays(gc, cst, dk):
    """Decays of the chunk from g [C, 1], with cumulative sums on the Tensor Engine (sum over partitions).

    Returns e [C, 2] = exp(G) | exp(G_last - G), e_last [K, 1] = exp(G_last) on every key partition,
    decay [i, j] = exp(G_i - G_j) for j <= i else 0, and decay_t = its transpose. G_i - G_j is positive above
    the diagonal and would overflow exp (then inf * 0 = NaN), so it is masked to -1e30 before the exp.
    """
    ones = cst[:, block(ONES)]
    g_b = nl.ndarray((C, C), dtype=nl.float32, buffer=nl.sbuf)  # [t, j] = g_t
    ng_b = nl.ndarray((C, C), dtype=nl.float32, buffer=nl.sbuf)  # [t, i] = -g_t
    nisa.tensor_scalar(dst=g_b, data=ones, op0=nl.multiply, operand0=gc)
    nisa.tensor_scalar(dst=ng_b, data=ones, op0=nl.multiply, operand0=gc, op1=nl.multiply, operand1=-1.0)
    ps = nl.ndarray((C, C + 3), dtype=nl.float32, buffer=nl.psum)  # G_i - G_j | G | G_last - G | G_last
    upper = cst[:, block(UPPER)]
    nisa.nc_matmul(dst=ps[:, 0:C], stationary=upper, moving=g_b, accumulate=False)  # [i, j] = G_i
    nisa.nc_matmul(dst=ps[:, 0:C], stationary=ng_b, moving=upper, accumulate=True)  # [i, j] -= G_j
    nisa.nc_matmul(dst=ps[:, C:C + 1], stationary=upper, moving=gc, accumulate=False)
    nisa.nc_matmul(dst=ps[:, C + 1:C + 2], stationary=cst[:, block(SLOWER)], moving=gc, accumulate=False)
    nisa.nc_matmul(dst=ps[0:dk, C + 2:C + 3], stationary=ones[:, 0:dk], moving=gc, accumulate=False)
    e = nl.ndarray((C, 2), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=e, op=nl.exp, data=ps[:, C:C + 2])
    e_last = nl.ndarray((dk, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=e_last, op=nl.exp, data=ps[0:dk, C + 2:C + 3])
    masked = nl.ndarray((C, C), dtype=nl.float32, buffer=nl.sbuf)
    decay = nl.ndarray((C, C), dtype=nl.float32, buffer=nl.sbuf)
    decay_t = nl.ndarray((C, C), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=masked, data1=ps[:, 0:C], data2=cst[:, block(NEG_UPPER)], op=nl.add)
    nisa.activation(dst=decay, op=nl.exp, data=masked)
    nisa.tensor_tensor(dst=masked, data1=cst[:, block(NEG_LOWER)], data2=ps[:, 0:C], op=nl.subtract)
    nisa.activation(dst=decay_t, op=nl.exp, data=masked)  # [j, i] = exp(G_i - G_j) for j <= i
    return e, e_last, decay, decay_t


def _system(k_t, bc, decay, cst):
    """A^T split for the blocked solve: (BLOCK x BLOCK diagonal blocks, the rest), both [C, C]."""
    ps = nl.ndarray((C, 2 * C), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=ps[:, 0:C], stationary=k_t, moving=k_t, accumulate=False)  # k_i . k_j
    a = nl.ndarray((C, C), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=a, data1=ps[:, 0:C], data2=cst[:, block(SLOWER)], op=nl.multiply)  # j < i only
    nisa.scalar_tensor_tensor(dst=a, data=a, op0=nl.multiply, operand0=bc, op1=nl.multiply, operand1=decay)
    nisa.nc_matmul(dst=ps[:, C:2 * C], stationary=a, moving=cst[:, block(IDENT)], accumulate=False)  # A^T
    a_blk_t = nl.ndarray((C, C), dtype=nl.float32, buffer=nl.sbuf)
    a_off_t = nl.ndarray((C, C), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=a_blk_t, data1=ps[:, C:2 * C], data2=cst[:, block(BLOCKDIAG)], op=nl.multiply)
    nisa.tensor_tensor(dst=a_off_t, data1=ps[:, C:2 * C], data2=a_blk_t, op=nl.subtract)
    return a_blk_t, a_off_t


def _rhs(vc, kc, bc, e_g):
    """[beta v | beta k exp(G)], [C, V + K]."""
    dk, dv = kc.shape[1], vc.shape[1]
    rhs = nl.ndarray((C, dv + dk), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=rhs[:, 0:dv], data=vc, op0=nl.multiply, operand0=bc)
    nisa.tensor_scalar(dst=rhs[:, dv:dv + dk], data=kc, op0=nl.multiply, operand0=e_g, op1=nl.multiply, operand1=bc)
    return rhs


def _solve(a_blk_t, a_off_t, rhs, cst):
    """X = (I + A)^-1 rhs for unit lower-triangular I + A, by blocked forward substitution (no power series).

    1. T = inverse of the BLOCK x BLOCK diagonal blocks, all blocks at once: T <- I - mask_s (A_blk T) for
       s = 1 .. BLOCK-1. Row i of T needs only the rows j < i of its block, so after sweep s the rows with
       i % BLOCK <= s hold their final values, computed with exactly the operations of row-by-row forward
       substitution; the other rows stay rows of I (mask_s), so nothing grows in the meantime.
    2. Block forward substitution: X <- mask_n (T (rhs - A_off X)) for n = 0 .. N_BLOCKS-1: block n is final
       after step n, the blocks below it are still zero.
    """
    ident = cst[:, block(IDENT)]
    t = nl.ndarray((C, C), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=t, src=ident)
    ps = nl.ndarray((C, C), dtype=nl.float32, buffer=nl.psum)
    for s in nl.sequential_range(1, BLOCK):
        nisa.nc_matmul(dst=ps, stationary=a_blk_t, moving=t, accumulate=False)  # A_blk T
        nisa.scalar_tensor_tensor(dst=t, data=ps, op0=nl.multiply, operand0=cst[:, ROW_MASKS + s:ROW_MASKS + s + 1],
                                  op1=nl.subtract, operand1=ident, reverse1=True)
    nisa.nc_matmul(dst=ps, stationary=t, moving=ident, accumulate=False)
    t_t = nl.ndarray((C, C), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=t_t, src=ps)

    width = rhs.shape[1]
    psx = nl.ndarray((C, width), dtype=nl.float32, buffer=nl.psum)
    x = nl.ndarray((C, width), dtype=nl.float32, buffer=nl.sbuf)
    z = nl.ndarray((C, width), dtype=nl.float32, buffer=nl.sbuf)
    nisa.nc_matmul(dst=psx, stationary=t_t, moving=rhs, accumulate=False)
    nisa.tensor_scalar(dst=x, data=psx, op0=nl.multiply, operand0=cst[:, BLOCK_MASKS:BLOCK_MASKS + 1])
    for n in nl.sequential_range(1, N_BLOCKS):
        nisa.nc_matmul(dst=psx, stationary=a_off_t, moving=x, accumulate=False)  # A_off X
        nisa.tensor_tensor(dst=z, data1=rhs, data2=psx, op=nl.subtract)
        nisa.nc_matmul(dst=psx, stationary=t_t, moving=z, accumulate=False)
        nisa.tensor_scalar(dst=x, data=psx, op0=nl.multiply, operand0=cst[:, BLOCK_MASKS + n:BLOCK_MASKS + n + 1])
    return x


def _output_and_state(x, q_t, k_t, kc, decay_t, e, e_last, state, out, cst):
    """o = exp(G) (q S) + P v_new to HBM, then S = exp(G_last) S + (k exp(G_last - G))^T v_new in place."""
    dk, dv = state.shape
    pa = nl.ndarray((C, C), dtype=nl.float32, buffer=nl.psum)
    pb = nl.ndarray((C, 4 * dv), dtype=nl.float32, buffer=nl.psum)  # W S | q S | P v_new | state update
    w_t = nl.ndarray((dk, C), dtype=nl.float32, buffer=nl.sbuf)
    nisa.nc_matmul(dst=pa[0:dk, :], stationary=x[:, dv:dv + dk], moving=cst[:, block(IDENT)], accumulate=False)
    nisa.tensor_copy(dst=w_t, src=pa[0:dk, :])
    nisa.nc_matmul(dst=pb[:, 0:dv], stationary=w_t, moving=state, accumulate=False)
    v_new = nl.ndarray((C, dv), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=v_new, data1=x[:, 0:dv], data2=pb[:, 0:dv], op=nl.subtract)

    nisa.nc_matmul(dst=pb[:, dv:2 * dv], stationary=q_t, moving=state, accumulate=False)
    nisa.nc_matmul(dst=pa, stationary=k_t, moving=q_t, accumulate=False)  # [j, i] = k_j . q_i
    p_t = nl.ndarray((C, C), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=p_t, data1=pa, data2=decay_t, op=nl.multiply)
    nisa.nc_matmul(dst=pb[:, 2 * dv:3 * dv], stationary=p_t, moving=v_new, accumulate=False)
    o_sb = nl.ndarray((C, dv), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=o_sb, data=pb[:, dv:2 * dv], op0=nl.multiply, operand0=e[:, 0:1])
    nisa.tensor_tensor(dst=o_sb, data1=o_sb, data2=pb[:, 2 * dv:3 * dv], op=nl.add)
    nisa.dma_copy(dst=out, src=o_sb)

    k_dec = nl.ndarray((C, dk), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=k_dec, data=kc, op0=nl.multiply, operand0=e[:, 1:2])
    nisa.nc_matmul(dst=pb[0:dk, 3 * dv:4 * dv], stationary=k_dec, moving=v_new, accumulate=False)
    nisa.scalar_tensor_tensor(dst=state, data=state, op0=nl.multiply, operand0=e_last,
                              op1=nl.add, operand1=pb[0:dk, 3 * dv:4 * dv])
