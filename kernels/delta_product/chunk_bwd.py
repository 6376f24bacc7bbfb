"""Fused backward of chunked DeltaProduct: four Triton kernels (formulas in ``docs/kernels.md``).

With ``P = Q Kᵀ ⊙ M`` (token rows), ``K̃ = diag(e^{G_L−G}) K`` and ``dS_{c+1}`` the cotangent of
the state at the end of chunk ``c``:

1. :func:`dv_local_kernel` (parallel): ``dU_loc = Pᵀ dO`` (with ``Tuning.fuse_dv`` formed in the scan instead).
2. :func:`scan_dh_kernel` (sequential, reverse): ``dU = dU_loc + K̃ dS_{c+1}``,
   ``dS_c = e^{G_L} dS_{c+1} + (diag(e^{Gq}) Q)ᵀ dO − Wᵀ dU``.
3. :func:`dqkw_kernel` (parallel): ``dQ = diag(e^{Gq}) dO S_cᵀ + (dP ⊙ M) K`` with ``dP = dO U_cᵀ``;
   ``dK ⊇ (dP ⊙ M)ᵀ Q + diag(e^{G_L−G}) U_c dS_{c+1}ᵀ``; ``dW = −dU S_cᵀ``; gate terms.
4. :func:`wy_bwd_kernel` (parallel): through ``W = T X``, ``U₀ = T Y``, ``T = (I + A)⁻¹``:
   ``dX = Tᵀ dW``, ``dY = Tᵀ dU``, ``dA = −Tᵀ (dW Xᵀ + dU Yᵀ) Tᵀ`` (strictly lower), then
   ``dK, dV, dβ, dG``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.delta_product.chunk_fwd import launch_config, launch_scan
from kernels.delta_product.common import (
    causal_mask,
    chunk_gate_end,
    group_chunks,
    group_end,
    group_start,
    load_rows,
    load_tile,
    local_scores,
    masked_exp,
    mm,
    scan_program,
    steps,
    store_rows,
    tokens,
)
from kernels.delta_product.launch import launch
from kernels.delta_product.utils import TUNING, alloc, cdiv


@triton.jit(do_not_specialize=["T", "N", "H"])
def dv_local_kernel(q, k, G, dO, dUl, scale, T, N, H, K: tl.constexpr, V: tl.constexpr,
                    NH: tl.constexpr, CT: tl.constexpr, BT: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                    BVB: tl.constexpr, USE_G: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    i_c, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_i, n_i, m_i, tok_i = steps(i_c, N, NH, CT, BT)
    o_t, t_t, m_t = tokens(i_c, T, CT, BQ)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    b_q = load_rows(q + i_h * K, i_b * T + t_t, m_t, H * K, o_k, m_k) * scale
    b_k = load_rows(k + i_h * K, i_b * N + n_i, m_i, H * K, o_k, m_k)
    b_s = local_scores(mm(b_q, tl.trans(b_k), DOT, PREC), G, i_b, i_h, T, H, o_t, t_t, m_t, o_i, m_i, tok_i, NH,
                       USE_G)  # [BQ, BT]
    for i_v in range(tl.cdiv(V, BVB)):
        o_v = i_v * BVB + tl.arange(0, BVB)
        b_do = load_rows(dO + i_h * V, i_b * T + t_t, m_t, H * V, o_v, o_v < V)
        store_rows(dUl + i_bh * N * V, mm(tl.trans(b_s), b_do, DOT, PREC), n_i, m_i, V, o_v, o_v < V)


@triton.jit
def _dh_step(q, k, G, W, dO, dUl, dHs, dHl, dU, b_dh, b_dh2, scale, i_c, i_b, i_h, i_bh, T, N, NC, o_k, m_k, o_v,
             m_v, H, K: tl.constexpr, V: tl.constexpr, NH: tl.constexpr, CT: tl.constexpr, BT: tl.constexpr,
             BQ: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, USE_G: tl.constexpr, FUSE_DV: tl.constexpr,
             STORE: tl.constexpr, SPLIT_DS: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """Chunk ``i_c`` in reverse: store ``dS_{c+1}``, form and store ``dU = dU_loc + K̃ dS_{c+1}``, return ``dS_c``.
    The state is ``b_dh`` (rows ``o_k``) and, with ``SPLIT``, ``b_dh2`` (rows ``o_k + BK``). With ``FUSE_DV``
    ``dU_loc = Pᵀ dO`` is formed here from the chunk's ``Q``, ``K`` and ``dO`` tiles, not read from ``dUl``.
    Without ``STORE`` (a group's summary) nothing is stored."""
    o_k2, m_k2 = o_k + BK, o_k + BK < K
    # dS_{c+1}'s second half is stored inside each branch below, after the first half's product: hoisted here,
    # float32 scan_dh (split by default) took 1.54 instead of 1.43 ms on an H100 at n_h = 2
    # (benchmarks/results/kernels_knobs_f32_warps.json against kernels_fused_out.json, call d11)
    if STORE:
        _store_ds(dHs, dHl, (i_bh * NC + i_c) * K * V, b_dh, o_k, m_k, V, o_v, m_v, SPLIT_DS)
    o_i, n_i, m_i, tok_i = steps(i_c, N, NH, CT, BT)
    o_t, t_t, m_t = tokens(i_c, T, CT, BQ)
    b_d = tl.full([BT], 1.0, tl.float32)  # K̃ = diag(e^{G_L − G}) K, Q's factor e^{Gq} and the decay e^{G_L}
    b_e = tl.full([BQ], scale, tl.float32)
    b_a = 1.0
    if USE_G:
        g_i = tl.load(G + (i_b * T + tok_i) * H + i_h, mask=m_i, other=0.0)
        g_t = tl.load(G + (i_b * T + t_t) * H + i_h, mask=m_t, other=0.0)
        g_l = chunk_gate_end(G, i_b, i_c, i_h, T, H, CT)
        b_d = tl.exp(g_l - g_i)
        b_e = b_e * tl.exp(g_t)
        b_a = tl.exp(g_l)
    rows_k, rows_q = i_b * N + n_i, i_b * T + t_t
    if FUSE_DV:
        b_do = load_rows(dO + i_h * V, rows_q, m_t, H * V, o_v, m_v)
        b_q = load_tile(q + i_h * K, rows_q, m_t, H * K, o_k, m_k)
        b_k = load_tile(k + i_h * K, rows_k, m_i, H * K, o_k, m_k)
        b_du = mm(b_k, b_dh, DOT, PREC)
        b_s = mm(b_q, tl.trans(b_k), DOT, PREC)
        if SPLIT:
            if STORE:
                _store_ds(dHs, dHl, (i_bh * NC + i_c) * K * V, b_dh2, o_k2, m_k2, V, o_v, m_v, SPLIT_DS)
            b_q2 = load_tile(q + i_h * K, rows_q, m_t, H * K, o_k2, m_k2)
            b_k2 = load_tile(k + i_h * K, rows_k, m_i, H * K, o_k2, m_k2)
            b_du += mm(b_k2, b_dh2, DOT, PREC)
            b_s += mm(b_q2, tl.trans(b_k2), DOT, PREC)
        b_s = local_scores(b_s * scale, G, i_b, i_h, T, H, o_t, t_t, m_t, o_i, m_i, tok_i, NH, USE_G)
        b_du = b_du * b_d[:, None] + mm(tl.trans(b_s), b_do, DOT, PREC)
    else:
        b_du = load_rows(dUl + i_bh * N * V, n_i, m_i, V, o_v, m_v)
        b_du += mm(load_tile(k + i_h * K, rows_k, m_i, H * K, o_k, m_k), b_dh, DOT, PREC) * b_d[:, None]
        if SPLIT:
            if STORE:
                _store_ds(dHs, dHl, (i_bh * NC + i_c) * K * V, b_dh2, o_k2, m_k2, V, o_v, m_v, SPLIT_DS)
            b_du += mm(load_tile(k + i_h * K, rows_k, m_i, H * K, o_k2, m_k2), b_dh2, DOT, PREC) * b_d[:, None]
    if STORE:
        store_rows(dU + i_bh * N * V, b_du, n_i, m_i, V, o_v, m_v)
    if not FUSE_DV:
        b_do = load_rows(dO + i_h * V, rows_q, m_t, H * V, o_v, m_v)
        b_q = load_tile(q + i_h * K, rows_q, m_t, H * K, o_k, m_k)
    b_dh = _dh_update(W, b_q, b_dh, b_do, b_du, b_e, b_a, i_bh, N, K, n_i, m_i, o_k, m_k, DOT, PREC)
    if SPLIT:
        if not FUSE_DV:
            b_q2 = load_tile(q + i_h * K, rows_q, m_t, H * K, o_k2, m_k2)
        b_dh2 = _dh_update(W, b_q2, b_dh2, b_do, b_du, b_e, b_a, i_bh, N, K, n_i, m_i, o_k2, m_k2, DOT, PREC)
    return b_dh, b_dh2


@triton.jit
def _store_ds(dHs, dHl, offset, b_dh, o_k, m_k, V: tl.constexpr, o_v, m_v, SPLIT_DS: tl.constexpr):
    """Store ``dS_{c+1}`` (rows ``o_k``) into ``dHs`` (in its dtype) and, with ``SPLIT_DS``, what its bf16 rounding
    leaves into ``dHl`` (``Tuning.gate_dk``)."""
    store_rows(dHs + offset, b_dh, o_k, m_k, V, o_v, m_v)
    if SPLIT_DS:
        store_rows(dHl + offset, b_dh - b_dh.to(tl.bfloat16).to(tl.float32), o_k, m_k, V, o_v, m_v)


@triton.jit
def _dh_update(W, b_q, b_dh, b_do, b_du, b_e, b_a, i_bh, N, K: tl.constexpr, n_i, m_i, o_k, m_k,
               DOT: tl.constexpr, PREC: tl.constexpr):
    """``a dS + Qᵀ diag(e) dO − Wᵀ dU`` for the state rows ``o_k`` (``Q``'s and ``W``'s columns ``o_k``)."""
    b_w = load_tile(W + i_bh * N * K, n_i, m_i, K, o_k, m_k)
    return b_dh * b_a + mm(tl.trans(b_q), b_do * b_e[:, None], DOT, PREC) - mm(tl.trans(b_w), b_du, DOT, PREC)


@triton.jit(do_not_specialize=["T", "N", "NC", "H", "USE_DHT", "STORE_DH0", "CG", "NG"])
def scan_dh_kernel(q, k, G, W, dO, dUl, dHT, dHs, dHl, dU, dH0, scale, T, N, NC, H, USE_DHT, STORE_DH0, Sum, CG,
                   NG, K: tl.constexpr, V: tl.constexpr, NH: tl.constexpr, CT: tl.constexpr, BT: tl.constexpr,
                   BQ: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SPLIT: tl.constexpr, USE_G: tl.constexpr,
                   FUSE_DV: tl.constexpr, SPLIT_DS: tl.constexpr, SUMMARY: tl.constexpr, GROUPED: tl.constexpr,
                   DOT: tl.constexpr, PREC: tl.constexpr, PREC_C: tl.constexpr, INTERPRET: tl.constexpr):
    """``BK`` state rows per tile: all of ``K``, or with ``SPLIT`` half of them (two tiles, ``Tuning.scan_split``).
    ``FUSE_DV`` (``Tuning.fuse_dv``): ``dU_loc`` formed here, in place of :func:`dv_local_kernel`. Chunk groups
    and ``SUMMARY``: as for :func:`~kernels.delta_product.chunk_fwd.scan_h_kernel`, in reverse."""
    i_b, i_h, i_bh, o_k, m_k, o_v, m_v = scan_program(H, K, V, BK, BV)
    i_g, c0, c1 = group_chunks(CG, NC, True, SUMMARY)
    b_dh, b_dh2 = group_start(Sum, dHT, USE_DHT, i_g, i_bh, NG, o_k, m_k, o_v, m_v, K, V, BK, BV, SPLIT, True,
                              SUMMARY, GROUPED, PREC_C)
    if INTERPRET:
        i_c = c1 - 1
        while i_c >= c0:
            b_dh, b_dh2 = _dh_step(q, k, G, W, dO, dUl, dHs, dHl, dU, b_dh, b_dh2, scale, i_c, i_b, i_h, i_bh, T, N,
                                   NC, o_k, m_k, o_v, m_v, H, K, V, NH, CT, BT, BQ, BK, SPLIT, USE_G, FUSE_DV,
                                   not SUMMARY, SPLIT_DS, DOT, PREC)
            i_c -= 1
    else:
        for it in range(c1 - c0):
            b_dh, b_dh2 = _dh_step(q, k, G, W, dO, dUl, dHs, dHl, dU, b_dh, b_dh2, scale, c1 - 1 - it, i_b, i_h,
                                   i_bh, T, N, NC, o_k, m_k, o_v, m_v, H, K, V, NH, CT, BT, BQ, BK, SPLIT, USE_G,
                                   FUSE_DV, not SUMMARY, SPLIT_DS, DOT, PREC)
    group_end(Sum, dH0, STORE_DH0, b_dh, b_dh2, i_g, i_bh, NG, o_k, m_k, o_v, m_v, K, V, BK, SPLIT, True, SUMMARY)


@triton.jit
def own_tokens(o_i, m_i, o_t, i_c, T, NH: tl.constexpr, CT: tl.constexpr):
    """``[BQ, BT]``: micro-step ``i`` belongs to token ``t``; and the local index of the chunk's last real token."""
    return (o_i[None, :] // NH == o_t[:, None]) & m_i[None, :], tl.minimum(CT, T - i_c * CT) - 1


@triton.jit
def gate_cotangent(a_t, pp_t, pp_i, b_kk, c_l, own, o_t, t_last):
    """One key block's part of ``dG`` per token from the terms of chunk ``i_c``: ``a_t = e^{G_t} Σ_d (dO Sᵀ ⊙ Q)``
    per token, the row and column sums ``pp_t``, ``pp_i`` of ``dP ⊙ P ⊙ E`` (zero within a token), ``b_kk =
    Σ_d (U dS_{c+1}ᵀ ⊙ K̃)`` per micro-step (zero at the last token) and ``c_l = e^{G_L} Σ (S_c ⊙ dS_{c+1})``:
    ``G_t`` gets ``a_t + pp_t``, micro-step ``i`` ``−pp_i − b_kk`` (summed into its token) and ``G_L``
    ``c_l + Σ_i b_kk``. Linear in the terms, so their tangents give the tangent of ``dG``."""
    dg_t = a_t + pp_t
    dg_i = -pp_i - b_kk
    dg_l = c_l + tl.sum(b_kk, 0)
    dg_t += tl.sum(tl.where(own, dg_i[None, :], 0.0), 1)
    return dg_t + tl.where(o_t == t_last, dg_l, 0.0)


@triton.jit
def _dq_dp_tile(b_h, b_u, b_do, b_dqa, b_dp, DOT: tl.constexpr, PREC: tl.constexpr):
    """One value tile's terms of ``dO S_cᵀ`` and ``dP = dO Uᵀ``."""
    return b_dqa + mm(b_do, tl.trans(b_h), DOT, PREC), b_dp + mm(b_do, tl.trans(b_u), DOT, PREC)


@triton.jit
def _dk_tile(b_u, dHs, dHl, offset, o_k, m_k, V: tl.constexpr, o_v, m_v, b_h, b_dkt, b_hdh, USE_G: tl.constexpr,
             SPLIT_DS: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """One value tile's terms of ``U dS_{c+1}ᵀ`` and, with a gate, of ``Σ_v S_c ⊙ dS_{c+1}`` (``b_h``, ``S_c``, is
    read only then), ``dS_{c+1}``'s tile read at ``offset``. ``SPLIT_DS``: ``dS_{c+1} = hi + lo``, ``hi`` in ``dHs``
    (its bf16 rounding) and ``lo`` in ``dHl``, and ``U dS_{c+1}ᵀ = U hiᵀ + U loᵀ``: two bf16 passes that keep
    about 16 bits of ``dS_{c+1}`` (``U`` is bf16 already)."""
    b_dh = load_rows(dHs + offset, o_k, m_k, V, o_v, m_v)
    b_dkt += mm(b_u, tl.trans(b_dh), DOT, PREC)
    if SPLIT_DS:
        b_lo = load_rows(dHl + offset, o_k, m_k, V, o_v, m_v)
        b_dkt += mm(b_u, tl.trans(b_lo), DOT, PREC)
        b_dh += b_lo
    if USE_G:
        b_hdh += tl.sum(b_h * b_dh, 1)
    return b_dkt, b_hdh


@triton.jit
def _dk_loop(U, dHs, dHl, Hs, h_ptr, i_bh, N, n_i, m_i, o_k, m_k, b_dkt, b_hdh, V: tl.constexpr, BVB: tl.constexpr,
             USE_G: tl.constexpr, SPLIT_DS: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """:func:`_dk_tile` over every value tile (the third loop of ``dqkw``'s split form)."""
    for i_v in range(tl.cdiv(V, BVB)):
        o_v = i_v * BVB + tl.arange(0, BVB)
        m_v = o_v < V
        b_dkt, b_hdh = _dk_tile(load_rows(U + i_bh * N * V, n_i, m_i, V, o_v, m_v), dHs, dHl, h_ptr, o_k, m_k, V,
                                o_v, m_v, load_rows(Hs + h_ptr, o_k, m_k, V, o_v, m_v), b_dkt, b_hdh, USE_G, SPLIT_DS,
                                DOT, PREC)
    return b_dkt, b_hdh


@triton.jit(do_not_specialize=["T", "N", "NC", "H", "B"])
def dqkw_kernel(q, k, G, Hs, dHs, dHl, U, dU, dO, dq, dk, dW, dG, GQ, GK, GH, scale, T, N, NC, B, H,
                K: tl.constexpr, V: tl.constexpr, NH: tl.constexpr, CT: tl.constexpr, BT: tl.constexpr,
                BQ: tl.constexpr, BKB: tl.constexpr, BVB: tl.constexpr, USE_G: tl.constexpr,
                SPLIT: tl.constexpr, SPLIT_DS: tl.constexpr, STORE_GM: tl.constexpr, DOT: tl.constexpr,
                PREC: tl.constexpr):
    """One program per (key block, chunk, batch·head); gate terms are partial sums over key blocks. ``SPLIT``
    (``Tuning.dqkw_split``): three loops over ``V`` (``dW``; ``dO Sᵀ`` and ``dP``; ``U dS_{c+1}ᵀ``, with a gate once
    ``dQ`` is stored and ``dP ⊙ P`` summed), not one. ``SPLIT_DS``: ``dS_{c+1}`` read as two bf16 halves (:func:`_dk_tile`, ``Tuning.gate_dk``).
    ``STORE_GM`` (with a gate, ``Tuning.gate_mids``): the gate's products ``dO Sᵀ``, ``U dS_{c+1}ᵀ`` and
    ``Σ_v S ⊙ dS_{c+1}`` also stored, at ``GQ [B·H, T, K]``, ``GK [B·H, N, K]`` and ``GH [B·H, NC, K]``, for
    :func:`~kernels.delta_product.tangent_bwd.dqkw_tangent_kernel`."""
    i_kb, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_i, n_i, m_i, tok_i = steps(i_c, N, NH, CT, BT)
    o_t, t_t, m_t = tokens(i_c, T, CT, BQ)
    o_k = i_kb * BKB + tl.arange(0, BKB)
    m_k = o_k < K
    b_dqa = tl.zeros([BQ, BKB], dtype=tl.float32)
    b_dp = tl.zeros([BQ, BT], dtype=tl.float32)
    b_dw = tl.zeros([BT, BKB], dtype=tl.float32)
    b_dkt = tl.zeros([BT, BKB], dtype=tl.float32)
    b_hdh = tl.zeros([BKB], dtype=tl.float32)
    h_ptr = (i_bh * NC + i_c) * K * V
    for i_v in range(tl.cdiv(V, BVB)):
        o_v = i_v * BVB + tl.arange(0, BVB)
        m_v = o_v < V
        b_h = load_rows(Hs + h_ptr, o_k, m_k, V, o_v, m_v)
        b_dw -= mm(load_rows(dU + i_bh * N * V, n_i, m_i, V, o_v, m_v), tl.trans(b_h), DOT, PREC)
        if not SPLIT:
            b_u = load_rows(U + i_bh * N * V, n_i, m_i, V, o_v, m_v)
            b_dqa, b_dp = _dq_dp_tile(b_h, b_u, load_rows(dO + i_h * V, i_b * T + t_t, m_t, H * V, o_v, m_v),
                                      b_dqa, b_dp, DOT, PREC)
            b_dkt, b_hdh = _dk_tile(b_u, dHs, dHl, h_ptr, o_k, m_k, V, o_v, m_v, b_h, b_dkt, b_hdh, USE_G, SPLIT_DS,
                                    DOT, PREC)
    store_rows(dW + i_bh * N * K, b_dw, n_i, m_i, K, o_k, m_k)
    if SPLIT:  # dW's loop above, then dQ's and dP's sums, then dK's: fewer tiles alive at once
        for i_v in range(tl.cdiv(V, BVB)):
            o_v = i_v * BVB + tl.arange(0, BVB)
            m_v = o_v < V
            b_dqa, b_dp = _dq_dp_tile(load_rows(Hs + h_ptr, o_k, m_k, V, o_v, m_v),
                                      load_rows(U + i_bh * N * V, n_i, m_i, V, o_v, m_v),
                                      load_rows(dO + i_h * V, i_b * T + t_t, m_t, H * V, o_v, m_v),
                                      b_dqa, b_dp, DOT, PREC)
        if not USE_G:  # with a gate, after dQ is stored (its terms hold more tiles)
            b_dkt, b_hdh = _dk_loop(U, dHs, dHl, Hs, h_ptr, i_bh, N, n_i, m_i, o_k, m_k, b_dkt, b_hdh, V, BVB,
                                    USE_G, SPLIT_DS, DOT, PREC)
    b_q = load_rows(q + i_h * K, i_b * T + t_t, m_t, H * K, o_k, m_k) * scale
    b_k = load_rows(k + i_h * K, i_b * N + n_i, m_i, H * K, o_k, m_k)
    m_s = causal_mask(o_t, m_t, o_i, m_i, NH)
    # dQ, then dK and this key block's part of the gate cotangents, each stored when formed
    if USE_G:
        g_t = tl.load(G + (i_b * T + t_t) * H + i_h, mask=m_t, other=0.0)
        g_i = tl.load(G + (i_b * T + tok_i) * H + i_h, mask=m_i, other=0.0)
        b_dpm = b_dp * masked_exp(g_t[:, None] - g_i[None, :], m_s)
        a_t = tl.exp(g_t) * tl.sum(b_dqa * b_q, 1)
        if STORE_GM:
            store_rows(GQ + i_bh * T * K, b_dqa, t_t, m_t, K, o_k, m_k)
        b_dq = b_dqa * tl.exp(g_t)[:, None] + mm(b_dpm, b_k, DOT, PREC)
    else:
        b_dpm = tl.where(m_s, b_dp, 0.0)
        b_dq = b_dqa + mm(b_dpm, b_k, DOT, PREC)
    store_rows(dq + i_h * K, b_dq * scale, i_b * T + t_t, m_t, H * K, o_k, m_k)
    if USE_G:  # dP ⊙ P as its row and column sums; factors e^{G_a − G_b} with a and b in one token are
        # identically 1 and are left out (their terms would cancel in rounding)
        own, t_last = own_tokens(o_i, m_i, o_t, i_c, T, NH, CT)
        b_dpp = tl.where(own, 0.0, b_dpm * mm(b_q, tl.trans(b_k), DOT, PREC))
        pp_t, pp_i = tl.sum(b_dpp, 1), tl.sum(b_dpp, 0)
    b_dk = mm(tl.trans(b_dpm), b_q, DOT, PREC)
    if SPLIT and USE_G:
        b_dkt, b_hdh = _dk_loop(U, dHs, dHl, Hs, h_ptr, i_bh, N, n_i, m_i, o_k, m_k, b_dkt, b_hdh, V, BVB, USE_G,
                                SPLIT_DS, DOT, PREC)
    if USE_G:  # K̃ = diag(e^{G_L − G}) K: its row factors taken out of the sums
        if STORE_GM:
            store_rows(GK + i_bh * N * K, b_dkt, n_i, m_i, K, o_k, m_k)
            tl.store(GH + (i_bh * NC + i_c) * K + o_k, b_hdh, mask=m_k)
        g_l = chunk_gate_end(G, i_b, i_c, i_h, T, H, CT)
        e_i = tl.exp(g_l - g_i)
        b_dkk = tl.where(o_i // NH == t_last, 0.0, e_i * tl.sum(b_dkt * b_k, 1))
        b_dk += b_dkt * e_i[:, None]
        dg_t = gate_cotangent(a_t, pp_t, pp_i, b_dkk, tl.exp(g_l) * tl.sum(b_hdh, 0), own, o_t, t_last)
        tl.store(dG + ((i_kb * B + i_b) * T + t_t) * H + i_h, dg_t, mask=m_t)
    else:
        b_dk += b_dkt
    store_rows(dk + i_bh * N * K, b_dk, n_i, m_i, K, o_k, m_k)


@triton.jit
def a_gate_terms(b_daa, o_i, NH: tl.constexpr):
    """The ``dG`` terms of ``A ⊙ E`` (``E_ij = e^{G_i − G_j}``) per micro-step from ``b_daa = dA ⊙ A``: row sums
    minus column sums, off the token blocks (within a token ``E = 1`` and the terms would only cancel in
    rounding). Linear in ``b_daa``, so its tangent gives the tangent of those terms."""
    b_daa = tl.where(o_i[:, None] // NH == o_i[None, :] // NH, 0.0, b_daa)
    return tl.sum(b_daa, 1) - tl.sum(b_daa, 0)


@triton.jit
def _dx_terms(b_dx, b_k, b_ex, b_x, b_db, b_dg, USE_G: tl.constexpr):
    """The ``dβ`` and ``dG`` terms of ``dX = Tᵀ dW`` for one key block: ``Σ_d dX ⊙ K`` (times ``e^G``)."""
    b_dxk = tl.sum(b_dx * b_k, 1)
    if USE_G:
        return b_db + b_dxk * b_ex, b_dg + b_dxk * b_x
    return b_db + b_dxk, b_dg


@triton.jit
def store_db_dg(dbeta, dG, b_db, b_dg, rows, m_i, o_i, i_c, i_b, i_h, T, H, NH: tl.constexpr, CT: tl.constexpr,
                 BQ: tl.constexpr, USE_G: tl.constexpr):
    """``dβ`` per micro-step and, with a gate, ``dG`` per token (the sum over its micro-steps)."""
    if USE_G:
        o_t, t_t, m_t = tokens(i_c, T, CT, BQ)
        own = own_tokens(o_i, m_i, o_t, i_c, T, NH, CT)[0]
        tl.store(dG + (i_b * T + t_t) * H + i_h, tl.sum(tl.where(own, b_dg[None, :], 0.0), 1), mask=m_t)
    tl.store(dbeta + rows * H + i_h, b_db, mask=m_i)


@triton.jit(do_not_specialize=["T", "N", "H"])
def wy_bwd_kernel(k, v, beta, G, Ti, dW, dU, dk_in, dk, dv, dbeta, dG, T, N, H, K: tl.constexpr,
                  V: tl.constexpr, NH: tl.constexpr, CT: tl.constexpr, BT: tl.constexpr, BQ: tl.constexpr,
                  BKB: tl.constexpr, BVB: tl.constexpr, USE_G: tl.constexpr, LATE: tl.constexpr,
                  DOT: tl.constexpr, PREC: tl.constexpr):
    """``LATE`` (``Tuning.wy_late``): ``dX = Tᵀ dW`` only in the second loop over ``K`` (its ``dβ``, ``dG``
    terms there too) and ``dK ⊇ (dC + dCᵀ) K`` as one product; else ``dX`` also in the first loop (for
    those terms) and ``dC K + dCᵀ K``."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_i, n_i, m_i, tok_i = steps(i_c, N, NH, CT, BT)
    rows = i_b * N + n_i
    b_beta = tl.load(beta + rows * H + i_h, mask=m_i, other=0.0).to(tl.float32)
    b_x = b_beta
    b_ex = b_beta  # e^G with a gate (unused without)
    if USE_G:
        g_i = tl.load(G + (i_b * T + tok_i) * H + i_h, mask=m_i, other=0.0)
        b_ex = tl.exp(g_i)
        b_x = b_beta * b_ex
    b_T = load_rows(Ti + i_bh * N * BT, n_i, m_i, BT, o_i, o_i < BT)
    b_dT = tl.zeros([BT, BT], dtype=tl.float32)
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    b_db = tl.zeros([BT], dtype=tl.float32)
    b_dg = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BKB)):
        o_k = i_k * BKB + tl.arange(0, BKB)
        b_k = load_rows(k + i_h * K, rows, m_i, H * K, o_k, o_k < K)
        b_dw = load_rows(dW + i_bh * N * K, n_i, m_i, K, o_k, o_k < K)
        b_dT += mm(b_dw, tl.trans(b_k * b_x[:, None]), DOT, PREC)
        if not LATE:
            b_db, b_dg = _dx_terms(mm(tl.trans(b_T), b_dw, DOT, PREC), b_k, b_ex, b_x, b_db, b_dg, USE_G)
        b_kk += mm(b_k, tl.trans(b_k), DOT, PREC)
    for i_v in range(tl.cdiv(V, BVB)):
        o_v = i_v * BVB + tl.arange(0, BVB)
        b_v = load_rows(v + i_h * V, rows, m_i, H * V, o_v, o_v < V)
        b_du = load_rows(dU + i_bh * N * V, n_i, m_i, V, o_v, o_v < V)
        b_dT += mm(b_du, tl.trans(b_v * b_beta[:, None]), DOT, PREC)
        b_dy = mm(tl.trans(b_T), b_du, DOT, PREC)
        b_db += tl.sum(b_dy * b_v, 1)
        store_rows(dv + i_h * V, b_dy * b_beta[:, None], rows, m_i, H * V, o_v, o_v < V)
    m_A = (o_i[:, None] > o_i[None, :]) & m_i[:, None] & m_i[None, :]
    b_dT = tl.where(m_A, b_dT, 0.0)
    b_dA = -mm(tl.trans(b_T), mm(b_dT, tl.trans(b_T), DOT, PREC), DOT, PREC)
    b_dA = tl.where(m_A, b_dA, 0.0)
    if USE_G:
        b_e = masked_exp(g_i[:, None] - g_i[None, :], m_A)
        b_dA = b_dA * b_e
    b_db += tl.sum(b_dA * b_kk, 1)
    b_dc = b_dA * b_beta[:, None]
    if USE_G:
        b_dg += a_gate_terms(b_dc * b_kk, o_i, NH)
    if LATE:
        b_dcs = b_dc + tl.trans(b_dc)
    else:
        store_db_dg(dbeta, dG, b_db, b_dg, rows, m_i, o_i, i_c, i_b, i_h, T, H, NH, CT, BQ, USE_G)
    for i_k in range(tl.cdiv(K, BKB)):
        o_k = i_k * BKB + tl.arange(0, BKB)
        b_k = load_rows(k + i_h * K, rows, m_i, H * K, o_k, o_k < K)
        b_dx = mm(tl.trans(b_T), load_rows(dW + i_bh * N * K, n_i, m_i, K, o_k, o_k < K), DOT, PREC)
        b_dkk = load_rows(dk_in + i_bh * N * K, n_i, m_i, K, o_k, o_k < K)
        b_dkk += b_dx * b_x[:, None]
        if LATE:
            b_dkk += mm(b_dcs, b_k, DOT, PREC)
            b_db, b_dg = _dx_terms(b_dx, b_k, b_ex, b_x, b_db, b_dg, USE_G)
        else:
            b_dkk += mm(b_dc, b_k, DOT, PREC) + mm(tl.trans(b_dc), b_k, DOT, PREC)
        store_rows(dk + i_h * K, b_dkk, rows, m_i, H * K, o_k, o_k < K)
    if LATE:
        store_db_dg(dbeta, dG, b_db, b_dg, rows, m_i, o_i, i_c, i_b, i_h, T, H, NH, CT, BQ, USE_G)


def gate_mid_views(gm: torch.Tensor, B: int, H: int, T: int, N: int, NC: int,
                   K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dO S_cᵀ [B·H, T, K]``, ``U dS_{c+1}ᵀ [B·H, N, K]`` and ``Σ_v S_c ⊙ dS_{c+1} [B·H, NC, K]``: the views of
    the flat float32 buffer ``gm`` that ``dqkw_kernel`` fills with ``STORE_GM`` (``Tuning.gate_mids``)."""
    gq, gk, gh = gm.split((B * H * T * K, B * H * N * K, B * H * NC * K))
    return gq.view(B * H, T, K), gk.view(B * H, N, K), gh.view(B * H, NC, K)


def chunk_bwd(q, k, v, beta, G, h0, scale, saved, do, dht, differentiable: bool = False):
    """Run the four backward kernels.

    Args: the forward's inputs (``beta``, ``G`` float32), ``saved = (Ti, W, Hs, U)`` from
    :func:`~kernels.delta_product.chunk_fwd.chunk_fwd`, ``do [B, T, H, V]`` and ``dht [B, H, K, V]``
    or None; ``differentiable``: the tangent kernels may follow (then, with a gate and ``Tuning.gate_mids``,
    ``dqkw`` also stores its gate products).

    Returns:
        ``((dq, dk, dv, dbeta, dG, dh0), (dU, dHs, dW, gm))``: ``dq, dk, dv`` in the input dtype, ``dbeta,
        dG, dh0`` in float32 (``dG``/``dh0`` None without gate / initial state); ``dU``, ``dHs`` (the
        cotangents of the chunk-final states), ``dW`` and ``gm`` (the gate products, :func:`gate_mid_views`;
        empty when not stored), the intermediates that
        :func:`~kernels.delta_product.tangent_bwd.chunk_bwd_tangent` reads.
    """
    Ti, W, Hs, U = saved
    c = launch_config(q, k, v)
    B, T, H, K, V, N, NC, BT = c["B"], c["T"], c["H"], c["K"], c["V"], c["N"], c["NC"], c["BT"]
    common = dict(H=H, K=K, V=V, NH=c["NH"], CT=c["CT"], BT=BT, DOT=c["DOT"], PREC=c["PREC"])
    dev, f32 = q.device, torch.float32
    use_g = G is not None
    mid = q.dtype if TUNING.bwd_store == "input" else f32  # of dU_loc, dU, dW and the dk partial
    gp = G if use_g else beta
    do = do.contiguous()
    fuse = TUNING.on("fuse_dv", q.dtype)
    dUl = do if fuse else alloc(B, H, N, V, device=dev, dtype=mid)
    if not fuse:
        launch(dv_local_kernel, (NC, B * H), q, k, gp, do, dUl, scale, T, N, BQ=c["BQ"], BK=c["BK"], BVB=c["BVB"],
               USE_G=use_g, num_warps=TUNING.warps_dv, **common)
    # U dS_{c+1}ᵀ feeds dG's terms that cancel: with gate_dk = split, dS_{c+1} is stored in two bf16 halves
    split_ds = use_g and TUNING.gate_dk == "split" and q.dtype.itemsize == 2
    dHs = alloc(*Hs.shape, device=dev, dtype=Hs.dtype)
    dHl = alloc(*Hs.shape, device=dev, dtype=Hs.dtype) if split_ds else dHs
    dU = alloc(B, H, N, V, device=dev, dtype=mid)
    dh0 = alloc(B, H, K, V, device=dev, dtype=f32) if h0 is not None else None
    launch_scan(scan_dh_kernel, c, c["BVS"], q, k, gp, W, do, dUl, dht.contiguous() if dht is not None else dUl, dHs,
                dHl, dU, dh0 if dh0 is not None else dUl, scale, T, N, NC, BQ=c["BQ"], BK=c["BKS"], SPLIT=c["SPLIT"],
                USE_G=use_g, FUSE_DV=fuse, SPLIT_DS=split_ds, USE_DHT=int(dht is not None),
                STORE_DH0=int(dh0 is not None), INTERPRET=c["INTERPRET"], num_warps=TUNING.warps_scan,
                max_stages=TUNING.dh_stages(q.dtype), **common)
    bkd = min(c["BK"], TUNING.bk_dqkw)
    nkb = cdiv(K, bkd)
    dq = alloc(*q.shape, device=dev, dtype=q.dtype)
    dk_part = alloc(B, H, N, K, device=dev, dtype=mid)
    dW = alloc(B, H, N, K, device=dev, dtype=mid)
    dG1 = alloc(nkb, B, T, H, device=dev, dtype=f32) if use_g else None
    store_gm = use_g and differentiable and TUNING.on("gate_mids", q.dtype)
    gm = alloc(B * H * (T + N + NC) * K if store_gm else 0, device=dev, dtype=f32)
    gq, gk, gh = gate_mid_views(gm, B, H, T, N, NC, K) if store_gm else (dW,) * 3
    launch(dqkw_kernel, (nkb, NC, B * H), q, k, gp, Hs, dHs, dHl, U, dU, do, dq, dk_part, dW, dG1 if use_g else dW,
           gq, gk, gh, scale, T, N, NC, B, BQ=c["BQ"], BKB=bkd,
           BVB=min(c["BVP"], TUNING.kernel_tile("dqkw", q.dtype)), USE_G=use_g,
           SPLIT=TUNING.on("dqkw_split", q.dtype), SPLIT_DS=split_ds, STORE_GM=store_gm,
           num_warps=TUNING.warps_dqkw, **common)
    dk = alloc(*k.shape, device=dev, dtype=k.dtype)
    dv = alloc(*v.shape, device=dev, dtype=v.dtype)
    dbeta = alloc(B, T, c["NH"], H, device=dev, dtype=f32)
    dG2 = alloc(B, T, H, device=dev, dtype=f32) if use_g else None
    wy = TUNING.wy_tile(q.dtype)
    launch(wy_bwd_kernel, (NC, B * H), k, v, beta, gp, Ti, dW, dU, dk_part, dk, dv, dbeta,
           dG2 if use_g else dbeta, T, N, BQ=c["BQ"], BKB=min(c["BK"], wy), BVB=min(c["BVP"], wy),
           USE_G=use_g, LATE=TUNING.on("wy_late", q.dtype), num_warps=TUNING.warps_wy, **common)
    dG = dG1.sum(0) + dG2 if use_g else None
    return (dq, dk, dv, dbeta, dG, dh0), (dU, dHs, dW, gm)
