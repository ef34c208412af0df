"""Chunked gated delta rule for prefill: WY/UT form with a direct triangular solve per chunk.

Within a chunk of C tokens (positions i, j; G = cumulative log decay from the chunk start) the delta-rule
updates collapse into one unit lower-triangular system (I + A) [u | w] = [beta v | beta exp(G) k] with
A_ij = beta_i (k_i . k_j) exp(G_i - G_j) for j < i. Then, with S the state entering the chunk:
    v_new = u - w S                                      (what the old state does not already predict)
    o     = (exp(G) q) S + (QK^T * exp(G_i - G_j))_{j<=i} v_new
    S'    = exp(G_C) S + (exp(G_C - G) k)^T v_new
All chunks' intra-chunk work is batched; only the state recurrence loops over chunks. The system is solved
directly (torch.linalg.solve_triangular): Neumann power doubling loses fp32 precision at realistic gates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qwenpd.kernels.gated_delta_rule.checks import check_sequence_inputs, compute_dtype, inv_l2norm


def _to_chunks(x: Tensor, chunk: int, dtype: torch.dtype) -> Tensor:
    """[B, T, H, ...] -> a new contiguous [N, B, H, C, ...] in dtype, in one copy; the last chunk's tail is zero
    (zero k, beta and g leave the state as it is)."""
    batch, seq, heads = x.shape[:3]
    n, full = -(-seq // chunk), seq // chunk
    out = torch.empty(n, batch, heads, chunk, *x.shape[3:], dtype=dtype, device=x.device)
    dst = out.transpose(2, 3).transpose(0, 1)  # [B, N, C, H, ...] view of out
    dst[:, :full].copy_(x[:, :full * chunk].unflatten(1, (full, chunk)))
    if full < n:
        rest = seq - full * chunk
        dst[:, full, :rest].copy_(x[:, full * chunk:])
        dst[:, full, rest:].zero_()
    return out


def _intra_chunk(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor):
    """Everything that does not depend on the state entering a chunk, for all chunks at once.

    q, k [N, B, Hk, C, K]; v [N, B, Hv, C, V]; g, beta [N, B, Hv, C]. Returns, with BH = B * Hv:
    u [N, BH, C, V]; w and q_in = exp(G) q [N, BH, C, K]; k_out = exp(G_C - G) k [N, BH, C, K];
    attn [N, BH, C, C] (causal, decayed q.k); chunk_decay = exp(G_C) [N, BH, 1, 1].
    """
    n, batch, hk, chunk, dk = k.shape
    hv = v.shape[2]
    group = hv // hk

    def by_key_head(x: Tensor) -> Tensor:  # [N, B, Hv, ...] -> [N, B, Hk, Hv // Hk, ...]
        return x.unflatten(2, (hk, group))

    def flat(x: Tensor) -> Tensor:  # [N, B, Hk, Hv // Hk, ...] -> [N, B * Hv, ...]
        return x.flatten(1, 3)

    cum = g.cumsum(-1)  # [N, B, Hv, C]
    # Mask the non-causal half BEFORE exp: G_i - G_j > 0 there, and exp overflows to inf (then inf * 0 = NaN) once
    # decays reach -100 or below. Filled with 0 (not -inf: exp is slow on underflow), zeroed again after exp.
    non_causal = torch.ones(chunk, chunk, dtype=torch.bool, device=g.device).triu(1)
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill_(non_causal, 0).exp_().masked_fill_(non_causal, 0)
    decay = by_key_head(decay)  # exp(G_i - G_j) for j <= i, else 0              [N, B, Hk, Hv/Hk, C, C]
    beta, enter = by_key_head(beta), by_key_head(cum.exp())  # [N, B, Hk, Hv/Hk, C]
    # Gram matrices are per key head; the value heads sharing one differ only in decay and beta.
    kk = (k @ k.transpose(-1, -2)).unsqueeze(3)  # [N, B, Hk, 1, C, C]
    attn = (q @ k.transpose(-1, -2)).unsqueeze(3) * decay  # [N, B, Hk, Hv/Hk, C, C]

    # (I + A)^-1 by forward substitution against the identity (a direct solve: as accurate as solving for the
    # right-hand sides, and cheaper since C < V + K). Only A's strict lower triangle is read (unitriangular).
    system = kk * decay * beta[..., None]  # A_ij = beta_i k_i.k_j exp(G_i - G_j)
    eye = torch.eye(chunk, dtype=k.dtype, device=k.device)
    solve = torch.linalg.solve_triangular(system, eye, upper=False, unitriangular=True).mul_(beta[..., None, :])
    u = solve @ by_key_head(v)  # (I + A)^-1 beta v                           [N, B, Hk, Hv/Hk, C, V]
    w = (solve * enter[..., None, :]).flatten(3, 4) @ k  # (I + A)^-1 beta exp(G) k, one GEMM per key head
    q_in = enter[..., None] * q.unsqueeze(3)  # reads the entering state         [N, B, Hk, Hv/Hk, C, K]
    k_out = by_key_head((cum[..., -1:] - cum).exp())[..., None] * k.unsqueeze(3)  # writes the leaving state
    chunk_decay = cum[..., -1].exp().reshape(n, batch * hv, 1, 1)
    return flat(u), w.view(n, batch * hv, chunk, dk), flat(q_in), flat(k_out), flat(attn), chunk_decay


def _scan_chunks(u: Tensor, w: Tensor, q_in: Tensor, k_out: Tensor, attn: Tensor, chunk_decay: Tensor,
                 state: Tensor) -> Tensor:
    """The only sequential part: carry state [BH, K, V] (updated in place) across chunks; returns o [N, BH, C, V].

    u is overwritten with v_new = u - w S, chunk by chunk.
    """
    out = torch.empty_like(u)
    for c in range(u.shape[0]):
        v_new = u[c].baddbmm_(w[c], state, alpha=-1)
        torch.bmm(q_in[c], state, out=out[c]).baddbmm_(attn[c], v_new)
        state.mul_(chunk_decay[c]).baddbmm_(k_out[c].transpose(-1, -2), v_new)
    return out


def chunk_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                           initial_state: Tensor | None = None, mask: Tensor | None = None,
                           chunk_size: int = 64, use_qk_l2norm: bool = True) -> tuple[Tensor, Tensor]:
    """Gated delta rule over a whole sequence, chunk by chunk (the prefill path).

    Args:
        q, k: [B, T, Hk, K]. Value head h reads key head h // (Hv // Hk).
        v: [B, T, Hv, V].
        g: [B, T, Hv] log decay (<= 0). beta: [B, T, Hv] write strength.
        initial_state: [B, Hv, K, V], any float dtype (not modified); None = zeros.
        mask: [B, T] bool, True = real token. A masked token leaves the state alone and outputs zero.
        chunk_size: tokens per chunk C; T need not be a multiple of it.
        use_qk_l2norm: L2-normalise q and k (eps 1e-6) before q is scaled by K^-1/2.

    Returns:
        o [B, T, Hv, V] in v.dtype and the final state [B, Hv, K, V] in float32 (float64 for float64 inputs).
        Same semantics as naive_gated_delta_rule.
    """
    check_sequence_inputs(q, k, v, g, beta, initial_state, mask)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    dtype, out_dtype = compute_dtype(q, k, v), v.dtype
    batch, seq, hk, dk = q.shape
    hv, dv = v.shape[2:]

    g, beta = g.to(dtype), beta.to(dtype)
    if mask is not None:
        keep = mask[..., None]  # g = 0 and beta = 0: the state passes through unchanged
        g, beta = g * keep, beta * keep

    q, k, v, g, beta = (_to_chunks(x, chunk_size, dtype) for x in (q, k, v, g, beta))  # [N, B, H, C, ...]
    if use_qk_l2norm:  # in place on our own copies
        q.mul_(inv_l2norm(q) * dk ** -0.5)
        k.mul_(inv_l2norm(k))
    else:
        q.mul_(dk ** -0.5)
    intra = _intra_chunk(q, k, v, g, beta)

    if initial_state is None:
        state = torch.zeros(batch * hv, dk, dv, dtype=dtype, device=v.device)
    else:
        state = initial_state.to(dtype, memory_format=torch.contiguous_format, copy=True).view(batch * hv, dk, dv)
    o = _scan_chunks(*intra, state)  # [N, B * Hv, C, V]

    n = o.shape[0]
    out = torch.empty(batch, n * chunk_size, hv, dv, dtype=out_dtype, device=o.device)
    out.view(batch, n, chunk_size, hv, dv).copy_(o.view(n, batch, hv, chunk_size, dv).permute(1, 0, 3, 2, 4))
    out = out[:, :seq]
    if mask is not None:
        out.masked_fill_(~mask[:, :, None, None], 0)
    return out.contiguous(), state.view(batch, hv, dk, dv)
