"""Tangent of the chunked DeltaProduct backward: four Triton kernels that read the primal backward's
intermediates ``(dU, dHs, dW)`` instead of recomputing them.

Written here without the gate; with one, each factor ``e^{G_a − G_b}`` of the primal backward adds its
tangent ``(Ġ_a − Ġ_b) e^{G_a − G_b}`` and the gate's cotangent ``dG`` gets its own tangent (the kernels'
docstrings). Three ``Tuning`` fields move gate work out of the larger kernels: ``gate_mids`` (``dqkw_tangent``
reads the gate products the primal ``dqkw`` stored), ``gate_pp_dv`` (``dv_local_tangent`` forms the tangent of
``dG``'s ``dP ⊙ P`` terms) and ``gate_tiles_dv`` (it also stores the decayed tiles the tangent scan reads, but
the decayed keys where :func:`~kernels.delta_product.tangent_fwd.prep_tangent_kernel` stored them already:
``Tuning.gate_keys_prep``).

For tangents ``ẋ`` of the inputs and ``(Ṫ, Ẇ, Ḣs, U̇)`` of the forward's ``saved``
(:func:`~kernels.delta_product.tangent_fwd.chunk_fwd_tangent`), with the cotangents ``(dO, dS_T)``
held fixed, the tangents of the gradients are the Hessian-vector product ``∇²⟨f, (dO, dS_T)⟩ ẋ``:

1. :func:`dv_local_tangent_kernel` (parallel): ``dU̇_loc = (Ṗ ⊙ M)ᵀ dO``, ``Ṗ = Q̇ Kᵀ + Q K̇ᵀ`` (with
   ``Tuning.tangent_tiles`` and ``fuse_dv``, no gate: formed in the scan instead).
2. :func:`scan_dh_tangent_kernel` (sequential, reverse): ``dU̇ = dU̇_loc + K̇ dS_{c+1} + K dṠ_{c+1}``,
   ``dṠ_c = dṠ_{c+1} + Q̇ᵀ dO − Ẇᵀ dU − Wᵀ dU̇`` with ``dS_{c+1}`` and ``dU`` loaded (``dṠ_T = 0``).
3. :func:`dqkw_tangent_kernel` (parallel): the tangents of ``dQ``, ``dW = −dU Sᵀ`` and the partial ``dK``
   by the product rule on ``dQ = dO Sᵀ + (dP ⊙ M) K``, ``dP = dO Uᵀ``,
   ``dK ⊇ (dP ⊙ M)ᵀ Q + U dS_{c+1}ᵀ``.
4. :func:`wy_bwd_tangent_kernel` (parallel): the tangents of ``dX = Tᵀ dW``, ``dY = Tᵀ dU``,
   ``dA = −Tᵀ (dW Xᵀ + dU Yᵀ) Tᵀ`` (strictly lower) and then of ``dK, dV, dβ`` (and ``dG``); with
   ``Tuning.wy_split`` only those of ``dA`` and ``dC + dCᵀ``, and :func:`wy_cols_tangent_kernel` (parallel over
   chunks and column tiles) the rest.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.delta_product.chunk_fwd import launch_config, launch_scan
from kernels.delta_product.chunk_bwd import a_gate_terms, gate_cotangent, gate_mid_views, own_tokens, store_db_dg
from kernels.delta_product.common import (
    causal_mask,
    group_chunks,
    group_end,
    group_start,
    load_operand,
    load_rows,
    load_tile,
    mm,
    scan_program,
    steps,
    store_rows,
    store_state,
    tokens,
)
from kernels.delta_product.tangent_fwd import (
    decayed_keys,
    exp_tangent,
    gate_at,
    gate_end_at,
    gate_pair,
    p_pair,
    scan_launch,
    step_chunk,
    tangent_launch,
)
from kernels.delta_product.launch import launch
from kernels.delta_product.utils import TUNING, alloc, cdiv


@triton.jit(do_not_specialize=["T", "N", "H"])
def dv_local_tangent_kernel(q, k, G, dO, tq, tk, tG, tdUl, U, tU, tdG, KD, TKD, TQD, scale, T, N, H,
                            K: tl.constexpr, V: tl.constexpr, NH: tl.constexpr, CT: tl.constexpr, BT: tl.constexpr,
                            BQ: tl.constexpr, BKB: tl.constexpr, BVB: tl.constexpr, USE_G: tl.constexpr,
                            GATE_PP: tl.constexpr, DECAYED: tl.constexpr, KEYS: tl.constexpr, DOT: tl.constexpr,
                            PREC: tl.constexpr):
    """``dU̇_loc = (Ṗ ⊙ M)ᵀ dO``; with a gate ``M ⊙ E``, ``E_ti = e^{G_t − G_i}``, and its tangent. With
    ``GATE_PP`` (``Tuning.gate_pp_dv``) also the tangent of the gate cotangent's ``dP ⊙ P`` terms over all of
    ``K`` (``dP = dO Uᵀ`` formed here too), stored per token at ``tdG`` (:func:`_gate_pp_tangent`). With
    ``DECAYED`` (``Tuning.gate_tiles_dv``) also ``(Q̇ + diag(Ġ_q) Q) e^{G_q}`` in float32 at ``TQD`` (like ``q``)
    and, with ``KEYS`` (the tangent forward did not store them: ``Tuning.gate_keys_prep``), ``K̃``, ``K̃̇`` at
    ``KD``, ``TKD`` (like ``k``): the gated tiles :func:`scan_dh_tangent_kernel` reads."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_i, n_i, m_i, tok_i = steps(i_c, N, NH, CT, BT)
    o_t, t_t, m_t = tokens(i_c, T, CT, BQ)
    b_s, b_ts = p_pair(q, k, tq, tk, scale, i_b, i_h, t_t, m_t, n_i, m_i, T, N, H, K, BQ, BT, BKB, USE_G, DOT,
                       PREC)
    m_s = causal_mask(o_t, m_t, o_i, m_i, NH)
    b_tsm = b_ts
    if USE_G:
        g_t, tg_t = gate_at(G, tG, i_b, i_h, t_t, m_t, T, H)
        g_i, tg_i = gate_at(G, tG, i_b, i_h, tok_i, m_i, T, H)
        _, b_tsm = gate_pair(b_s, b_ts, g_t, tg_t, g_i, tg_i, m_s)
    b_tsm = tl.where(m_s, b_tsm, 0.0)
    b_dp = tl.zeros([BQ, BT], dtype=tl.float32)
    b_tdp = tl.zeros([BQ, BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BVB)):
        o_v = i_v * BVB + tl.arange(0, BVB)
        m_v = o_v < V
        b_do = load_rows(dO + i_h * V, i_b * T + t_t, m_t, H * V, o_v, m_v)
        store_rows(tdUl + i_bh * N * V, mm(tl.trans(b_tsm), b_do, DOT, PREC), n_i, m_i, V, o_v, m_v)
        if GATE_PP:
            b_dp += mm(b_do, tl.trans(load_rows(U + i_bh * N * V, n_i, m_i, V, o_v, m_v)), DOT, PREC)
            b_tdp += mm(b_do, tl.trans(load_rows(tU + i_bh * N * V, n_i, m_i, V, o_v, m_v)), DOT, PREC)
    if GATE_PP:
        b_dpm, b_tdpm = gate_pair(b_dp, b_tdp, g_t, tg_t, g_i, tg_i, m_s)
        own, _ = own_tokens(o_i, m_i, o_t, i_c, T, NH, CT)
        tl.store(tdG + (i_b * T + t_t) * H + i_h, _gate_pp_tangent(b_dpm, b_tdpm, b_s, b_ts, own), mask=m_t)
    if DECAYED:
        for i_k in range(tl.cdiv(K, BKB)):
            o_k = i_k * BKB + tl.arange(0, BKB)
            m_k = o_k < K
            if KEYS:
                b_k, b_tk, g_l, tg_l = decayed_keys(load_rows(k + i_h * K, i_b * N + n_i, m_i, H * K, o_k, m_k),
                                                   load_rows(tk + i_h * K, i_b * N + n_i, m_i, H * K, o_k, m_k),
                                                   g_i, tg_i, G, tG, i_b, i_c, i_h, T, H, CT)
                store_rows(KD + i_h * K, b_k, i_b * N + n_i, m_i, H * K, o_k, m_k)
                store_rows(TKD + i_h * K, b_tk, i_b * N + n_i, m_i, H * K, o_k, m_k)
            b_tq = exp_tangent(load_rows(q + i_h * K, i_b * T + t_t, m_t, H * K, o_k, m_k),
                               load_rows(tq + i_h * K, i_b * T + t_t, m_t, H * K, o_k, m_k), g_t[:, None],
                               tg_t[:, None])
            store_rows(TQD + i_h * K, b_tq, i_b * T + t_t, m_t, H * K, o_k, m_k)


@triton.jit
def _gate_pp_tangent(b_dpm, b_tdpm, b_p, b_tp, own):
    """The tangent of the ``dP ⊙ P`` terms of ``dG`` per token (:func:`~kernels.delta_product.chunk_bwd.
    gate_cotangent` with only them): the row sums of ``R = dṖ ⊙ P + dP ⊙ Ṗ`` (``dP``, ``dṖ`` masked and decayed;
    ``P``, ``Ṗ`` over the key columns at hand) minus the column sums of each token's micro-steps, ``R`` zero within
    a token. Linear in ``(P, Ṗ)``, so key blocks' parts add up."""
    b_r = tl.where(own, 0.0, b_tdpm * b_p + b_dpm * b_tp)
    return tl.sum(b_r, 1) - tl.sum(tl.where(own, tl.sum(b_r, 0)[None, :], 0.0), 1)


@triton.jit
def _tdh_tiles(q, k, tq, tk, G, tG, dHs, h_ptr, scale, i_b, i_c, i_h, T, N, H, n_i, m_i, tok_i, t_t, m_t, o_k, m_k,
               o_v, m_v, K: tl.constexpr, V: tl.constexpr, CT: tl.constexpr, USE_G: tl.constexpr, WIDE: tl.constexpr,
               DECAYED: tl.constexpr):
    """The key columns ``o_k`` of ``K``, ``K̇``, ``Q̇`` and the state rows ``o_k`` of ``dS_{c+1}`` for one chunk;
    with a gate ``K̃``, ``K̃̇`` (:func:`~kernels.delta_product.tangent_fwd.decayed_keys`) and
    ``diag(e^{G_q}) (Q̇ + diag(Ġ_q) Q)`` for ``Q̇``, with ``G_L`` and ``Ġ_L`` (else 0): formed here, or with
    ``DECAYED`` read as they are from ``k``, ``tk``, ``tq`` (:func:`dv_local_tangent_kernel` stored them). ``Q̇`` is
    scaled when ``WIDE`` (on the tiles, the products ``Q̇ᵀ dO`` and ``Ṗ`` are, instead)."""
    b_k = load_operand(k + i_h * K, i_b * N + n_i, m_i, H * K, o_k, m_k, WIDE)
    b_tk = load_operand(tk + i_h * K, i_b * N + n_i, m_i, H * K, o_k, m_k, WIDE)
    b_tq = load_operand(tq + i_h * K, i_b * T + t_t, m_t, H * K, o_k, m_k, WIDE)
    if WIDE:
        b_tq = b_tq * scale
    b_dh = load_operand(dHs + h_ptr, o_k, m_k, V, o_v, m_v, WIDE)
    g_l, tg_l = 0.0, 0.0
    if DECAYED:
        g_l, tg_l = gate_end_at(G, tG, i_b, i_c, i_h, T, H, CT)
    elif USE_G:
        g_i, tg_i = gate_at(G, tG, i_b, i_h, tok_i, m_i, T, H)
        b_k, b_tk, g_l, tg_l = decayed_keys(b_k, b_tk, g_i, tg_i, G, tG, i_b, i_c, i_h, T, H, CT)
        g_t, tg_t = gate_at(G, tG, i_b, i_h, t_t, m_t, T, H)
        b_q = load_rows(q + i_h * K, i_b * T + t_t, m_t, H * K, o_k, m_k) * scale
        b_tq = exp_tangent(b_q, b_tq, g_t[:, None], tg_t[:, None])
    return b_k, b_tk, b_tq, b_dh, g_l, tg_l


@triton.jit
def _tdh_update(b_tdh, b_tq, b_do, b_tw, b_du, b_w, b_tdu, scale, WIDE: tl.constexpr, DOT: tl.constexpr,
                PREC: tl.constexpr):
    """``dṠ_{c+1} + Q̇ᵀ dO − Ẇᵀ dU − Wᵀ dU̇`` for the state rows of ``b_tdh`` (``Q̇``'s, ``Ẇ``'s and ``W``'s columns
    there); ``Q̇`` unscaled unless ``WIDE``."""
    b_qdo = mm(tl.trans(b_tq), b_do, DOT, PREC)
    if not WIDE:
        b_qdo = b_qdo * scale
    return b_tdh + b_qdo - mm(tl.trans(b_tw), b_du, DOT, PREC) - mm(tl.trans(b_w), b_tdu, DOT, PREC)


@triton.jit
def _tdh_step(q, k, G, W, dO, dHs, dU, tq, tk, tG, tW, tdUl, tdHs, tdU, b_tdh, b_tdh2, scale, i_c, i_b, i_h, i_bh,
              T, N, NC, o_k, m_k, o_v, m_v, H, K: tl.constexpr, V: tl.constexpr, NH: tl.constexpr, CT: tl.constexpr,
              BT: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, USE_G: tl.constexpr,
              WIDE: tl.constexpr, FUSE_DV: tl.constexpr, STORE: tl.constexpr, DECAYED: tl.constexpr, DOT: tl.constexpr,
              PREC: tl.constexpr):
    """One chunk backwards: ``dṠ_{c+1} ↦ dṠ_c``, storing ``dṠ_{c+1}`` and ``dU̇ = dU̇_loc + K̇ dS_{c+1} + K dṠ_{c+1}``
    (:func:`_tdh_tiles`, :func:`_tdh_update`). The state is ``b_tdh`` (rows ``o_k``) and, with ``SPLIT``,
    ``b_tdh2`` (rows ``o_k + BK``), each with its own key columns. Tiles as float32 rows when ``WIDE``, else in the
    input dtype (``Tuning.tangent_tiles``; no gate); with ``FUSE_DV`` (not ``WIDE``, not ``SPLIT``)
    ``dU̇_loc = (Ṗ ⊙ M)ᵀ dO`` is formed here from the chunk's ``Q``, ``K`` and tangent tiles, not read from
    ``tdUl``. Without ``STORE`` (a group's summary) nothing is stored."""
    tl.static_assert(not (FUSE_DV and (WIDE or SPLIT)), "the fused dU̇_loc takes the input-dtype tiles, unsplit")
    h_ptr = (i_bh * NC + i_c) * K * V
    o_k2, m_k2 = o_k + BK, o_k + BK < K
    if STORE:
        store_state(tdHs + h_ptr, b_tdh, b_tdh2, o_k, m_k, K, V, o_v, m_v, BK, SPLIT)
    o_i, n_i, m_i, tok_i = steps(i_c, N, NH, CT, BT)
    o_t, t_t, m_t = tokens(i_c, T, CT, BQ)
    b_k, b_tk, b_tq, b_dh, g_l, tg_l = _tdh_tiles(q, k, tq, tk, G, tG, dHs, h_ptr, scale, i_b, i_c, i_h, T, N, H, n_i,
                                                  m_i, tok_i, t_t, m_t, o_k, m_k, o_v, m_v, K, V, CT, USE_G, WIDE,
                                                  DECAYED)
    if FUSE_DV:
        b_do = load_tile(dO + i_h * V, i_b * T + t_t, m_t, H * V, o_v, m_v)
        b_q = load_tile(q + i_h * K, i_b * T + t_t, m_t, H * K, o_k, m_k)
        b_ts = mm(b_tq, tl.trans(b_k), DOT, PREC) + mm(b_q, tl.trans(b_tk), DOT, PREC)
        b_ts = tl.where(causal_mask(o_t, m_t, o_i, m_i, NH), b_ts * scale, 0.0)
        b_tdu = mm(tl.trans(b_ts), b_do, DOT, PREC) + mm(b_tk, b_dh, DOT, PREC) + mm(b_k, b_tdh, DOT, PREC)
    else:
        b_tdu = (load_rows(tdUl + i_bh * N * V, n_i, m_i, V, o_v, m_v) + mm(b_tk, b_dh, DOT, PREC)
                 + mm(b_k, b_tdh, DOT, PREC))
    b_tq2, b_dh2 = b_tq, b_dh
    if SPLIT:
        b_k2, b_tk2, b_tq2, b_dh2, _, _ = _tdh_tiles(q, k, tq, tk, G, tG, dHs, h_ptr, scale, i_b, i_c, i_h, T, N, H,
                                                     n_i, m_i, tok_i, t_t, m_t, o_k2, m_k2, o_v, m_v, K, V, CT, USE_G,
                                                     WIDE, DECAYED)
        b_tdu += mm(b_tk2, b_dh2, DOT, PREC) + mm(b_k2, b_tdh2, DOT, PREC)
    if STORE:
        store_rows(tdU + i_bh * N * V, b_tdu, n_i, m_i, V, o_v, m_v)
    if USE_G:  # dṠ_c ⊇ e^{G_L} (Ġ_L dS_{c+1} + dṠ_{c+1})
        b_tdh = exp_tangent(b_dh, b_tdh, g_l, tg_l)
    if not FUSE_DV:
        b_do = load_operand(dO + i_h * V, i_b * T + t_t, m_t, H * V, o_v, m_v, WIDE)
    b_tw = load_operand(tW + i_bh * N * K, n_i, m_i, K, o_k, m_k, WIDE)
    b_du = load_operand(dU + i_bh * N * V, n_i, m_i, V, o_v, m_v, WIDE)
    b_w = load_operand(W + i_bh * N * K, n_i, m_i, K, o_k, m_k, WIDE)
    b_tdh = _tdh_update(b_tdh, b_tq, b_do, b_tw, b_du, b_w, b_tdu, scale, WIDE, DOT, PREC)
    if SPLIT:
        if USE_G:
            b_tdh2 = exp_tangent(b_dh2, b_tdh2, g_l, tg_l)
        b_tdh2 = _tdh_update(b_tdh2, b_tq2, b_do, load_operand(tW + i_bh * N * K, n_i, m_i, K, o_k2, m_k2, WIDE), b_du,
                             load_operand(W + i_bh * N * K, n_i, m_i, K, o_k2, m_k2, WIDE), b_tdu, scale, WIDE, DOT,
                             PREC)
    return b_tdh, b_tdh2


@triton.jit(do_not_specialize=["T", "N", "NC", "H", "STORE_DH0", "CG", "NG"])
def scan_dh_tangent_kernel(q, k, G, W, dO, dHs, dU, tq, tk, tG, tW, tdUl, tdHs, tdU, tdH0, scale, T, N, NC, H,
                           STORE_DH0, Sum, CG, NG, K: tl.constexpr, V: tl.constexpr, NH: tl.constexpr,
                           CT: tl.constexpr, BT: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                           SPLIT: tl.constexpr, USE_G: tl.constexpr, WIDE: tl.constexpr, FUSE_DV: tl.constexpr,
                           SUMMARY: tl.constexpr, GROUPED: tl.constexpr, DECAYED: tl.constexpr, DOT: tl.constexpr,
                           PREC: tl.constexpr, PREC_C: tl.constexpr, INTERPRET: tl.constexpr):
    """``WIDE``, ``FUSE_DV``: see ``_tdh_step`` (``FUSE_DV`` in place of :func:`dv_local_tangent_kernel`); ``BK``
    state rows per tile: all of ``K``, or with ``SPLIT`` half of them (two tiles, ``Tuning.scan_split`` on float32
    tiles). Chunk groups and ``SUMMARY``: as for :func:`~kernels.delta_product.chunk_bwd.scan_dh_kernel`."""
    i_b, i_h, i_bh, o_k, m_k, o_v, m_v = scan_program(H, K, V, BK, BV)
    i_g, c0, c1 = group_chunks(CG, NC, True, SUMMARY)
    b_tdh, b_tdh2 = group_start(Sum, tdH0, 0, i_g, i_bh, NG, o_k, m_k, o_v, m_v, K, V, BK, BV, SPLIT, True, SUMMARY,
                                GROUPED, PREC_C)
    if INTERPRET:  # run-time loop bounds break the interpreter under numpy >= 2.4
        i_c = c1 - 1
        while i_c >= c0:
            b_tdh, b_tdh2 = _tdh_step(q, k, G, W, dO, dHs, dU, tq, tk, tG, tW, tdUl, tdHs, tdU, b_tdh, b_tdh2, scale,
                                      i_c, i_b, i_h, i_bh, T, N, NC, o_k, m_k, o_v, m_v, H, K, V, NH, CT, BT, BQ, BK,
                                      SPLIT, USE_G, WIDE, FUSE_DV, not SUMMARY, DECAYED, DOT, PREC)
            i_c -= 1
    else:
        for it in range(c1 - c0):
            b_tdh, b_tdh2 = _tdh_step(q, k, G, W, dO, dHs, dU, tq, tk, tG, tW, tdUl, tdHs, tdU, b_tdh, b_tdh2, scale,
                                      c1 - 1 - it, i_b, i_h, i_bh, T, N, NC, o_k, m_k, o_v, m_v, H, K, V, NH, CT, BT,
                                      BQ, BK, SPLIT, USE_G, WIDE, FUSE_DV, not SUMMARY, DECAYED, DOT, PREC)
    group_end(Sum, tdH0, STORE_DH0, b_tdh, b_tdh2, i_g, i_bh, NG, o_k, m_k, o_v, m_v, K, V, BK, SPLIT, True, SUMMARY)


@triton.jit
def _u_rows(U, tU, u_ptr, n_i, m_i, V, o_v, m_v):
    """``U`` and ``U̇`` at the micro-steps ``n_i`` and value columns ``o_v``."""
    return load_rows(U + u_ptr, n_i, m_i, V, o_v, m_v), load_rows(tU + u_ptr, n_i, m_i, V, o_v, m_v)


@triton.jit(do_not_specialize=["T", "N", "NC", "H", "B"])
def dqkw_tangent_kernel(q, k, G, Hs, dHs, U, dU, dO, tq, tk, tG, tHs, tdHs, tU, tdU, tdq, tdk, tdW, tdG, GQ, GK, GH,
                        TDK, scale, T, N, NC, B, H, K: tl.constexpr, V: tl.constexpr, NH: tl.constexpr,
                        CT: tl.constexpr, BT: tl.constexpr, BQ: tl.constexpr, BKB: tl.constexpr, BVB: tl.constexpr,
                        USE_G: tl.constexpr, LOAD_GM: tl.constexpr, GATE_PP: tl.constexpr, SIDE: tl.constexpr,
                        DOT: tl.constexpr, PREC: tl.constexpr):
    """One program per (key block, chunk, batch·head). With a gate, the tangents of ``dQ = diag(e^{G_q}) dO Sᵀ +
    (dP ⊙ M ⊙ E) K``, ``dK ⊇ (dP ⊙ M ⊙ E)ᵀ Q + K̃``'s term and of this key block's ``dG`` terms
    (:func:`~kernels.delta_product.chunk_bwd.gate_cotangent`), which also need ``dO Sᵀ``, ``U dS_{c+1}ᵀ`` and
    ``Σ S ⊙ dS_{c+1}``: formed here, or with ``LOAD_GM`` read from ``GQ, GK, GH``, where the primal ``dqkw``
    stored them (``Tuning.gate_mids``). ``GATE_PP``: the ``dP ⊙ P`` terms' tangent is formed here (per key
    block), else by :func:`dv_local_tangent_kernel`.

    ``SIDE`` (with a gate, ``Tuning.gate_dqkw_split``): 0, every term; 1, the state side alone: ``dẆ``, ``dK̇ ⊇ U̇ dS_{c+1}ᵀ +
    U dṠ_{c+1}ᵀ`` (with a gate through ``K̃``) stored in float32 at ``TDK``, and the ``dĠ`` terms of ``K̃`` and
    ``Σ S ⊙ dS_{c+1}``; 2, the query side alone: ``dQ̇``, the rest of ``dK̇`` (added to ``TDK``'s part) and the ``dĠ``
    terms of ``dO Sᵀ ⊙ Q`` (and ``dP ⊙ P``). The two launches hold two and three accumulators, where one holds
    five."""
    i_kb, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_i, n_i, m_i, tok_i = steps(i_c, N, NH, CT, BT)
    o_t, t_t, m_t = tokens(i_c, T, CT, BQ)
    o_k = i_kb * BKB + tl.arange(0, BKB)
    m_k = o_k < K
    b_dp = tl.zeros([BQ, BT], dtype=tl.float32)
    b_tdp = tl.zeros([BQ, BT], dtype=tl.float32)
    b_tdqa = tl.zeros([BQ, BKB], dtype=tl.float32)
    b_dqa = tl.zeros([BQ, BKB], dtype=tl.float32)  # the gate's terms
    b_tdw = tl.zeros([BT, BKB], dtype=tl.float32)
    b_tdkt = tl.zeros([BT, BKB], dtype=tl.float32)
    b_dkt = tl.zeros([BT, BKB], dtype=tl.float32)
    b_hdh = tl.zeros([BKB], dtype=tl.float32)
    b_thdh = tl.zeros([BKB], dtype=tl.float32)
    h_ptr = (i_bh * NC + i_c) * K * V
    for i_v in range(tl.cdiv(V, BVB)):
        o_v = i_v * BVB + tl.arange(0, BVB)
        m_v = o_v < V
        b_h = load_rows(Hs + h_ptr, o_k, m_k, V, o_v, m_v)
        b_th = load_rows(tHs + h_ptr, o_k, m_k, V, o_v, m_v)
        if SIDE != 0:  # the two launches load U, U̇ first (the faster order there, not in one launch)
            b_u, b_tu = _u_rows(U, tU, i_bh * N * V, n_i, m_i, V, o_v, m_v)
        if SIDE != 2:
            b_tdw -= (mm(load_rows(tdU + i_bh * N * V, n_i, m_i, V, o_v, m_v), tl.trans(b_h), DOT, PREC)
                      + mm(load_rows(dU + i_bh * N * V, n_i, m_i, V, o_v, m_v), tl.trans(b_th), DOT, PREC))
        if SIDE == 0:
            b_u, b_tu = _u_rows(U, tU, i_bh * N * V, n_i, m_i, V, o_v, m_v)
        if SIDE != 1:
            b_do = load_rows(dO + i_h * V, i_b * T + t_t, m_t, H * V, o_v, m_v)
            b_dp += mm(b_do, tl.trans(b_u), DOT, PREC)
            b_tdp += mm(b_do, tl.trans(b_tu), DOT, PREC)
            b_tdqa += mm(b_do, tl.trans(b_th), DOT, PREC)
            if USE_G and not LOAD_GM:
                b_dqa += mm(b_do, tl.trans(b_h), DOT, PREC)
        if SIDE != 2:
            b_dh = load_rows(dHs + h_ptr, o_k, m_k, V, o_v, m_v)
            b_tdh = load_rows(tdHs + h_ptr, o_k, m_k, V, o_v, m_v)
            b_tdkt += mm(b_tu, tl.trans(b_dh), DOT, PREC) + mm(b_u, tl.trans(b_tdh), DOT, PREC)
            if USE_G:
                if not LOAD_GM:
                    b_dkt += mm(b_u, tl.trans(b_dh), DOT, PREC)
                    b_hdh += tl.sum(b_h * b_dh, 1)
                b_thdh += tl.sum(b_th * b_dh + b_h * b_tdh, 1)
    if SIDE != 2:
        store_rows(tdW + i_bh * N * K, b_tdw, n_i, m_i, K, o_k, m_k)
    m_s = causal_mask(o_t, m_t, o_i, m_i, NH)
    b_q = load_rows(q + i_h * K, i_b * T + t_t, m_t, H * K, o_k, m_k) * scale
    b_tq = load_rows(tq + i_h * K, i_b * T + t_t, m_t, H * K, o_k, m_k) * scale
    b_k = load_rows(k + i_h * K, i_b * N + n_i, m_i, H * K, o_k, m_k)
    b_tk = load_rows(tk + i_h * K, i_b * N + n_i, m_i, H * K, o_k, m_k)
    if USE_G and SIDE != 0:  # the two launches take G at the micro-steps and the tokens' micro-steps first
        g_i, tg_i = gate_at(G, tG, i_b, i_h, tok_i, m_i, T, H)
        own, t_last = own_tokens(o_i, m_i, o_t, i_c, T, NH, CT)
    a_t = 0.0  # the dĠ terms per token, but those of dP ⊙ P
    tpp = 0.0
    # dẆ above, then dQ̇, dK̇ and the gate's terms, each stored when formed (fewer tiles alive at once)
    if SIDE != 1:
        if USE_G:
            if LOAD_GM:
                b_dqa = load_rows(GQ + i_bh * T * K, t_t, m_t, K, o_k, m_k)
            g_t, tg_t = gate_at(G, tG, i_b, i_h, t_t, m_t, T, H)
            if SIDE == 0:
                g_i, tg_i = gate_at(G, tG, i_b, i_h, tok_i, m_i, T, H)
            b_dpm, b_tdpm = gate_pair(b_dp, b_tdp, g_t, tg_t, g_i, tg_i, m_s)
            a_t = exp_tangent(tl.sum(b_dqa * b_q, 1), tl.sum(b_tdqa * b_q + b_dqa * b_tq, 1), g_t, tg_t)
            b_tdq = exp_tangent(b_dqa, b_tdqa, g_t[:, None], tg_t[:, None])
        else:
            b_dpm = tl.where(m_s, b_dp, 0.0)
            b_tdpm = tl.where(m_s, b_tdp, 0.0)
            b_tdq = b_tdqa
        b_tdq += mm(b_tdpm, b_k, DOT, PREC) + mm(b_dpm, b_tk, DOT, PREC)
        store_rows(tdq + i_h * K, b_tdq * scale, i_b * T + t_t, m_t, H * K, o_k, m_k)
        if USE_G:  # dṖ ⊙ P + dP ⊙ Ṗ, this key block, as its row and column sums
            if SIDE == 0:
                own, t_last = own_tokens(o_i, m_i, o_t, i_c, T, NH, CT)
            if GATE_PP:
                tpp = _gate_pp_tangent(b_dpm, b_tdpm, mm(b_q, tl.trans(b_k), DOT, PREC),
                                       mm(b_tq, tl.trans(b_k), DOT, PREC) + mm(b_q, tl.trans(b_tk), DOT, PREC), own)
        b_tdk = mm(tl.trans(b_tdpm), b_q, DOT, PREC) + mm(tl.trans(b_dpm), b_tq, DOT, PREC)
        if SIDE == 2:
            b_tdk += load_rows(TDK + i_bh * N * K, n_i, m_i, K, o_k, m_k)
    else:
        b_tdk = tl.zeros([BT, BKB], dtype=tl.float32)
    if SIDE != 2:
        if USE_G:  # K̃ = diag(e^{a}) K with a = G_L − G: its row factors taken out of the sums
            if LOAD_GM:
                b_dkt = load_rows(GK + i_bh * N * K, n_i, m_i, K, o_k, m_k)
                b_hdh = tl.load(GH + (i_bh * NC + i_c) * K + o_k, mask=m_k, other=0.0)
            g_l, tg_l = gate_end_at(G, tG, i_b, i_c, i_h, T, H, CT)
            a_i, ta_i = g_l - g_i, tg_l - tg_i
            b_tdkk = tl.where(o_i // NH == t_last, 0.0,
                              exp_tangent(tl.sum(b_dkt * b_k, 1), tl.sum(b_tdkt * b_k + b_dkt * b_tk, 1), a_i, ta_i))
            b_tdk += exp_tangent(b_dkt, b_tdkt, a_i[:, None], ta_i[:, None])
            a_t = gate_cotangent(a_t, 0.0, 0.0, b_tdkk, exp_tangent(tl.sum(b_hdh, 0), tl.sum(b_thdh, 0), g_l, tg_l),
                                 own, o_t, t_last)
        else:
            b_tdk += b_tdkt
    if USE_G:
        if SIDE == 0 or GATE_PP:
            a_t += tpp
        tl.store(tdG + ((i_kb * B + i_b) * T + t_t) * H + i_h, a_t, mask=m_t)
    store_rows((TDK if SIDE == 1 else tdk) + i_bh * N * K, b_tdk, n_i, m_i, K, o_k, m_k)


@triton.jit
def _dT_block(b_x, b_tx, b_d, b_td, b_beta, b_tbeta, DOT: tl.constexpr, PREC: tl.constexpr):
    """One column block's terms of ``dT = dW (diag(β) K)ᵀ + dU (diag(β) V)ᵀ`` and of its tangent, for
    ``b_x`` (``K`` or ``V``) with cotangent ``b_d`` (``dW`` or ``dU``)."""
    b_xb = b_x * b_beta[:, None]
    b_dT = mm(b_d, tl.trans(b_xb), DOT, PREC)
    b_tdT = (mm(b_td, tl.trans(b_xb), DOT, PREC)
             + mm(b_d, tl.trans(b_tx * b_beta[:, None] + b_x * b_tbeta[:, None]), DOT, PREC))
    return b_dT, b_tdT


@triton.jit
def _t_transpose_times(b_T, b_tT, b_d, b_td, DOT: tl.constexpr, PREC: tl.constexpr):
    """``Tᵀ b_d`` (``dX`` or ``dY``) and its tangent ``Ṫᵀ b_d + Tᵀ ḃ_d``."""
    b_dx = mm(tl.trans(b_T), b_d, DOT, PREC)
    return b_dx, mm(tl.trans(b_tT), b_d, DOT, PREC) + mm(tl.trans(b_T), b_td, DOT, PREC)


@triton.jit
def _x_factor(G, tG, b_beta, b_tbeta, i_b, i_h, tok_i, m_i, T, H, USE_G: tl.constexpr):
    """``X = diag(f) K``'s row factor ``f`` (``β``, or ``β e^G`` with a gate) and its tangent ``ḟ``, with ``G`` and
    ``Ġ`` at the micro-steps (``β`` and ``β̇`` stand in for them without a gate, unread)."""
    if USE_G:
        g_i, tg_i = gate_at(G, tG, i_b, i_h, tok_i, m_i, T, H)
        return b_beta * tl.exp(g_i), exp_tangent(b_beta, b_tbeta, g_i, tg_i), g_i, tg_i
    return b_beta, b_tbeta, b_beta, b_tbeta


@triton.jit
def _dy_block(b_T, b_tT, b_v, b_tv, b_du, b_tdu, b_beta, b_tbeta, DOT: tl.constexpr, PREC: tl.constexpr):
    """For one value block: the tangent of ``dV = diag(β) dY`` (``dY = Tᵀ dU``) and of ``dY``'s ``dβ`` term
    ``Σ_d dY ⊙ V``."""
    b_dy, b_tdy = _t_transpose_times(b_T, b_tT, b_du, b_tdu, DOT, PREC)
    return b_tdy * b_beta[:, None] + b_dy * b_tbeta[:, None], tl.sum(b_tdy * b_v + b_dy * b_tv, 1)


@triton.jit
def _dx_block(b_T, b_tT, b_k, b_tk, b_dw, b_tdw, b_f, b_tf, g_i, tg_i, b_tdb, b_tdg, USE_G: tl.constexpr,
              DOT: tl.constexpr, PREC: tl.constexpr):
    """For one key block: ``dX = Tᵀ dW``, the part ``diag(f) dX`` of ``dK``'s tangent, and ``dX``'s terms of the
    tangents of ``dβ`` and ``dG`` (``Σ_d dX ⊙ K``, times ``e^G`` with a gate), added to ``b_tdb``, ``b_tdg``."""
    b_dx, b_tdx = _t_transpose_times(b_T, b_tT, b_dw, b_tdw, DOT, PREC)
    b_dxk = tl.sum(b_k * b_dx, 1)  # Σ_d dX ⊙ K and its tangent
    b_tdxk = tl.sum(b_k * b_tdx + b_tk * b_dx, 1)
    if USE_G:
        b_tdb += exp_tangent(b_dxk, b_tdxk, g_i, tg_i)
        b_tdg += b_tdxk * b_f + b_dxk * b_tf
    else:
        b_tdb += b_tdxk
    return b_tdx * b_f[:, None] + b_dx * b_tf[:, None], b_tdb, b_tdg


@triton.jit
def _dk_block(k, tk, dW, tdW, tdk_in, b_T, b_tT, b_f, b_tf, g_i, tg_i, b_tdb, b_tdg, o_k, rows, n_i, m_i, i_h, i_bh,
              N, H, K: tl.constexpr, USE_G: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """One key block: ``K``, ``K̇`` and the part ``dK̇_in + diag(f) dẊ + diag(ḟ) dX`` of ``dK̇``, and ``b_tdb``,
    ``b_tdg`` with ``dX``'s terms (:func:`_dx_block`). The caller adds ``(dĊ + dĊᵀ) K + (dC + dCᵀ) K̇``."""
    m_k = o_k < K
    b_k = load_rows(k + i_h * K, rows, m_i, H * K, o_k, m_k)
    b_tk = load_rows(tk + i_h * K, rows, m_i, H * K, o_k, m_k)
    b_tdkk, b_tdb, b_tdg = _dx_block(b_T, b_tT, b_k, b_tk, load_rows(dW + i_bh * N * K, n_i, m_i, K, o_k, m_k),
                                     load_rows(tdW + i_bh * N * K, n_i, m_i, K, o_k, m_k), b_f, b_tf, g_i, tg_i,
                                     b_tdb, b_tdg, USE_G, DOT, PREC)
    return b_k, b_tk, b_tdkk + load_rows(tdk_in + i_bh * N * K, n_i, m_i, K, o_k, m_k), b_tdb, b_tdg


@triton.jit(do_not_specialize=["T", "N", "H"])
def wy_bwd_tangent_kernel(k, v, beta, G, Ti, dW, dU, tk, tv, tbeta, tG, tTi, tdW, tdU, tdk_in, tdk, tdv, tdbeta, tdG,
                          DC, tDC, T, N, H, K: tl.constexpr, V: tl.constexpr, NH: tl.constexpr, CT: tl.constexpr,
                          BT: tl.constexpr, BQ: tl.constexpr, BKB: tl.constexpr, BVB: tl.constexpr,
                          USE_G: tl.constexpr, SPLIT: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """``d(dA) = −(Ṫᵀ dT Tᵀ + Tᵀ (dṪ Tᵀ + dT Ṫᵀ))``; ``dβ`` gets the row sums of ``dA ⊙ K Kᵀ``, whose tangent
    ``dȦ ⊙ K Kᵀ + dA ⊙ (K̇ Kᵀ + K K̇ᵀ)`` is formed once ``dA`` is (``K Kᵀ`` and ``K̇ Kᵀ`` in a loop of their own, after
    ``dT`` and ``dṪ`` die), and ``dK`` gets ``(dC + dCᵀ) K`` (``dC = diag(β) dA``) and its tangent. With a gate:
    ``X = diag(f) K``, ``f = β e^G``; ``dA ⊙ E`` for ``dA`` (:func:`~kernels.delta_product.tangent_fwd.gate_pair`);
    ``dG`` gets ``dX``'s ``Σ_d dX ⊙ K f`` and ``A``'s row minus column sums of ``dC ⊙ K Kᵀ`` off the token
    blocks. ``T`` and ``Ṫ`` stay float32: held in bf16 (fewer registers) they were miscompiled by Triton 3.6 on an
    H100 where a loop over ``K`` is not pipelined (one stage, or ``K = 32``): ``dK̇``, ``dβ̇`` 30–120 % off, or an
    illegal memory access (``benchmarks/results/kernels_wy_tangent_f32_t.json``).

    ``SPLIT`` (``Tuning.wy_split``): the first half of the two-kernel form. ``T`` and ``Ṫ`` are loaded after the
    loops, which accumulate ``dT`` and ``dṪ`` alone; the program stores ``dC + dCᵀ`` and ``dĊ + dĊᵀ`` in ``DC``,
    ``tDC`` and its terms of ``dβ̇`` and ``dĠ`` as the first partial sums ``tdbeta``, ``tdG``;
    :func:`wy_cols_tangent_kernel` does the rest, one column tile per program."""
    i_h, i_bh, o_i, n_i, m_i, tok_i, rows, b_beta, b_tbeta = step_chunk(beta, tbeta, N, H, NH, CT, BT, 0)
    b_f, b_tf, g_i, tg_i = _x_factor(G, tG, b_beta, b_tbeta, i_bh // H, i_h, tok_i, m_i, T, H, USE_G)
    if not SPLIT:
        b_T = load_rows(Ti + i_bh * N * BT, n_i, m_i, BT, o_i, o_i < BT)
        b_tT = load_rows(tTi + i_bh * N * BT, n_i, m_i, BT, o_i, o_i < BT)
    b_dT = tl.zeros([BT, BT], dtype=tl.float32)
    b_tdT = tl.zeros([BT, BT], dtype=tl.float32)
    b_tdb = tl.zeros([BT], dtype=tl.float32)
    b_tdg = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BKB)):  # dX = Tᵀ dW and its tangent: in the second loop over K
        o_k = i_k * BKB + tl.arange(0, BKB)
        b_k = load_rows(k + i_h * K, rows, m_i, H * K, o_k, o_k < K)
        b_tk = load_rows(tk + i_h * K, rows, m_i, H * K, o_k, o_k < K)
        dT, tdT = _dT_block(b_k, b_tk, load_rows(dW + i_bh * N * K, n_i, m_i, K, o_k, o_k < K),
                            load_rows(tdW + i_bh * N * K, n_i, m_i, K, o_k, o_k < K), b_f, b_tf, DOT, PREC)
        b_dT += dT
        b_tdT += tdT
    for i_v in range(tl.cdiv(V, BVB)):
        o_v = i_v * BVB + tl.arange(0, BVB)
        b_v = load_rows(v + i_h * V, rows, m_i, H * V, o_v, o_v < V)
        b_tv = load_rows(tv + i_h * V, rows, m_i, H * V, o_v, o_v < V)
        b_du = load_rows(dU + i_bh * N * V, n_i, m_i, V, o_v, o_v < V)
        b_tdu = load_rows(tdU + i_bh * N * V, n_i, m_i, V, o_v, o_v < V)
        dT, tdT = _dT_block(b_v, b_tv, b_du, b_tdu, b_beta, b_tbeta, DOT, PREC)
        b_dT += dT
        b_tdT += tdT
        if not SPLIT:
            b_tdv, tdb = _dy_block(b_T, b_tT, b_v, b_tv, b_du, b_tdu, b_beta, b_tbeta, DOT, PREC)
            b_tdb += tdb
            store_rows(tdv + i_h * V, b_tdv, rows, m_i, H * V, o_v, o_v < V)
    if SPLIT:
        b_T = load_rows(Ti + i_bh * N * BT, n_i, m_i, BT, o_i, o_i < BT)
        b_tT = load_rows(tTi + i_bh * N * BT, n_i, m_i, BT, o_i, o_i < BT)
    m_A = (o_i[:, None] > o_i[None, :]) & m_i[:, None] & m_i[None, :]
    b_dT = tl.where(m_A, b_dT, 0.0)
    b_tdT = tl.where(m_A, b_tdT, 0.0)
    # (dT Tᵀ)˙ − dT Ṫᵀ, then dT Tᵀ: dT and dṪ die before dA is formed (fewer BT×BT tiles alive at once)
    b_inner = mm(b_tdT, tl.trans(b_T), DOT, PREC) + mm(b_dT, tl.trans(b_tT), DOT, PREC)
    b_dTT = mm(b_dT, tl.trans(b_T), DOT, PREC)
    b_dA = tl.where(m_A, -mm(tl.trans(b_T), b_dTT, DOT, PREC), 0.0)
    b_tdA = tl.where(m_A, -mm(tl.trans(b_tT), b_dTT, DOT, PREC) - mm(tl.trans(b_T), b_inner, DOT, PREC), 0.0)
    if USE_G:
        b_dA, b_tdA = gate_pair(b_dA, b_tdA, g_i, tg_i, g_i, tg_i, m_A)
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)  # K Kᵀ and K̇ Kᵀ only now, when dT and dṪ are dead
    b_tkk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BKB)):
        o_k = i_k * BKB + tl.arange(0, BKB)
        b_k = load_rows(k + i_h * K, rows, m_i, H * K, o_k, o_k < K)
        b_kk += mm(b_k, tl.trans(b_k), DOT, PREC)
        b_tkk += mm(load_rows(tk + i_h * K, rows, m_i, H * K, o_k, o_k < K), tl.trans(b_k), DOT, PREC)
    b_p = b_tdA * b_kk + b_dA * (b_tkk + tl.trans(b_tkk))  # the tangent of dA ⊙ K Kᵀ
    b_tdb += tl.sum(b_p, 1)
    if USE_G:  # the tangent of dC ⊙ K Kᵀ (dC = diag(β) dA), whose dG terms are linear in it
        b_tdg += a_gate_terms(b_p * b_beta[:, None] + b_dA * b_kk * b_tbeta[:, None], o_i, NH)
    b_dc = b_dA * b_beta[:, None]
    b_tdc = b_tdA * b_beta[:, None] + b_dA * b_tbeta[:, None]
    b_dcs, b_tdcs = b_dc + tl.trans(b_dc), b_tdc + tl.trans(b_tdc)  # dC + dCᵀ and its tangent
    if SPLIT:
        store_rows(DC + i_bh * N * BT, b_dcs, n_i, m_i, BT, o_i, o_i < BT)
        store_rows(tDC + i_bh * N * BT, b_tdcs, n_i, m_i, BT, o_i, o_i < BT)
    else:
        for i_k in range(tl.cdiv(K, BKB)):
            o_k = i_k * BKB + tl.arange(0, BKB)
            b_k, b_tk, b_tdkk, b_tdb, b_tdg = _dk_block(k, tk, dW, tdW, tdk_in, b_T, b_tT, b_f, b_tf, g_i, tg_i,
                                                        b_tdb, b_tdg, o_k, rows, n_i, m_i, i_h, i_bh, N, H, K, USE_G,
                                                        DOT, PREC)
            b_tdkk += mm(b_tdcs, b_k, DOT, PREC) + mm(b_dcs, b_tk, DOT, PREC)
            store_rows(tdk + i_h * K, b_tdkk, rows, m_i, H * K, o_k, o_k < K)
    store_db_dg(tdbeta, tdG, b_tdb, b_tdg, rows, m_i, o_i, tl.program_id(0), i_bh // H, i_h, T, H, NH, CT, BQ, USE_G)


@triton.jit(do_not_specialize=["T", "N", "H", "SB", "SG"])
def wy_cols_tangent_kernel(k, v, beta, G, Ti, dW, dU, tk, tv, tbeta, tG, tTi, tdW, tdU, tdk_in, DC, tDC, tdk, tdv,
                           tdbeta, tdG, T, N, H, SB, SG, K: tl.constexpr, V: tl.constexpr, NH: tl.constexpr,
                           CT: tl.constexpr, BT: tl.constexpr, BQ: tl.constexpr, BKB: tl.constexpr,
                           BVB: tl.constexpr, USE_G: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """The second half of the two-kernel ``SPLIT`` form, one program per (column tile, chunk, batch·head), the
    tile fastest (a chunk's tiles run together and share ``T``, ``Ṫ``, ``DC``, ``tDC`` in L2): a key
    tile gets ``dK̇ = dK̇_in + diag(f) dẊ + diag(ḟ) dX + (dĊ + dĊᵀ) K + (dC + dCᵀ) K̇`` (``dC + dCᵀ`` and its
    tangent from ``DC``, ``tDC``), a value tile ``dV̇`` (:func:`_dy_block`); each writes its terms of ``dβ̇``
    (and ``dĠ``) as the partial sums of slot ``1 + tile`` (strides ``SB``, ``SG``; value tiles write zero ``dĠ``)."""
    i_h, i_bh, o_i, n_i, m_i, tok_i, rows, b_beta, b_tbeta = step_chunk(beta, tbeta, N, H, NH, CT, BT, 1)
    i_t = tl.program_id(0)
    b_T = load_rows(Ti + i_bh * N * BT, n_i, m_i, BT, o_i, o_i < BT)
    b_tT = load_rows(tTi + i_bh * N * BT, n_i, m_i, BT, o_i, o_i < BT)
    b_tdb = tl.zeros([BT], dtype=tl.float32)
    b_tdg = tl.zeros([BT], dtype=tl.float32)
    NKT: tl.constexpr = (K + BKB - 1) // BKB
    if i_t < NKT:
        b_f, b_tf, g_i, tg_i = _x_factor(G, tG, b_beta, b_tbeta, i_bh // H, i_h, tok_i, m_i, T, H, USE_G)
        o_k = i_t * BKB + tl.arange(0, BKB)
        b_k, b_tk, b_tdkk, b_tdb, b_tdg = _dk_block(k, tk, dW, tdW, tdk_in, b_T, b_tT, b_f, b_tf, g_i, tg_i, b_tdb,
                                                    b_tdg, o_k, rows, n_i, m_i, i_h, i_bh, N, H, K, USE_G, DOT, PREC)
        b_tdkk += mm(load_rows(tDC + i_bh * N * BT, n_i, m_i, BT, o_i, o_i < BT), b_k, DOT, PREC)
        b_tdkk += mm(load_rows(DC + i_bh * N * BT, n_i, m_i, BT, o_i, o_i < BT), b_tk, DOT, PREC)
        store_rows(tdk + i_h * K, b_tdkk, rows, m_i, H * K, o_k, o_k < K)
    else:
        o_v = (i_t - NKT) * BVB + tl.arange(0, BVB)
        b_tdv, b_tdb = _dy_block(b_T, b_tT, load_rows(v + i_h * V, rows, m_i, H * V, o_v, o_v < V),
                                 load_rows(tv + i_h * V, rows, m_i, H * V, o_v, o_v < V),
                                 load_rows(dU + i_bh * N * V, n_i, m_i, V, o_v, o_v < V),
                                 load_rows(tdU + i_bh * N * V, n_i, m_i, V, o_v, o_v < V), b_beta, b_tbeta, DOT, PREC)
        store_rows(tdv + i_h * V, b_tdv, rows, m_i, H * V, o_v, o_v < V)
    slot = (i_t + 1).to(tl.int64)
    store_db_dg(tdbeta + slot * SB, tdG + slot * SG, b_tdb, b_tdg, rows, m_i, o_i, tl.program_id(1), i_bh // H, i_h,
                T, H, NH, CT, BQ, USE_G)


def chunk_bwd_tangent(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, h0: Tensor | None, scale: float,
                      saved: tuple[Tensor, ...], do: Tensor, mids: tuple[Tensor, ...],
                      tangents: tuple[Tensor | None, ...], tsaved: tuple[Tensor, ...],
                      gate: tuple[Tensor, Tensor] | None = None,
                      keys: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor | None, ...]:
    """The four tangent kernels.

    Args:
        q, k, v, beta, h0, scale, saved, do: as for :func:`~kernels.delta_product.chunk_bwd.chunk_bwd`;
        mids: its ``(dU, dHs, dW, gm)`` (``gm`` empty: the gate products are formed again); tangents:
        ``(q̇, k̇, v̇, β̇, ḣ0)``; tsaved: ``(Ṫ, Ẇ, Ḣs, U̇)`` from
        :func:`~kernels.delta_product.tangent_fwd.chunk_fwd_tangent` (``do`` and ``dht`` held fixed, and the
        same ``gate``); gate: ``(G, Ġ)`` as for ``chunk_fwd_tangent``, or None without a gate; keys: the
        decayed keys ``(K̃, K̃̇)`` that ``chunk_fwd_tangent`` returned, or None (then formed here where needed).

    Returns:
        The tangents of ``(dq, dk, dv, dbeta, dG, dh0)`` (``dG``'s None without a gate, ``dh0``'s without an
        initial state): the Hessian-vector product ``∇²⟨f, (do, dht)⟩ ẋ``.
    """
    Ti, W, Hs, U = saved
    dU, dHs, dW, gm = mids
    tq, tk, tv, tbeta, _ = tangents
    tTi, tW, tHs, tU = tsaved
    c = launch_config(q, k, v, True)
    B, T, H, K, V, N, NC, BT = c["B"], c["T"], c["H"], c["K"], c["V"], c["N"], c["NC"], c["BT"]
    common = dict(H=H, K=K, V=V, NH=c["NH"], CT=c["CT"], BT=BT, USE_G=gate is not None, DOT=c["DOT"],
                  PREC=c["PREC"])
    G, tG = gate if gate is not None else (beta, beta)  # placeholders, not read without a gate
    dev, mid, f32 = q.device, dU.dtype, torch.float32
    do = do.contiguous()
    wide = TUNING.tangent_rows(q.dtype, gate is not None)
    fuse = not wide and TUNING.on("fuse_dv", q.dtype)
    tdUl = do if fuse else alloc(B, H, N, V, device=dev, dtype=mid)
    bkd = min(c["BK"], TUNING.bk_dqkw)
    nkb = cdiv(K, bkd)
    pp_dv = gate is not None and TUNING.on("gate_pp_dv", q.dtype)  # the gate's dP ⊙ P terms in dv_local_tangent
    sides = gate is not None and TUNING.on("gate_dqkw_split", q.dtype)  # dqkw_tangent as two launches
    tdG1 = alloc(nkb * (1 + sides) + pp_dv, B, T, H, device=dev, dtype=f32) if gate is not None else None
    decayed = gate is not None and TUNING.on("gate_tiles_dv", q.dtype)  # the scan's gated tiles stored by dv
    kd, tkd, tqd = k, tk, tq
    if decayed:
        kd, tkd = keys or (alloc(*k.shape, device=dev, dtype=f32) for _ in range(2))
        tqd = alloc(*q.shape, device=dev, dtype=f32)
    if not fuse:  # with a gate, always (wide)
        warps, bkb, bvb = tangent_launch(c, "dv", q.dtype, gate is not None)
        launch(dv_local_tangent_kernel, (NC, B * H), q, k, G, do, tq, tk, tG, tdUl, U, tU,
               tdG1[nkb] if pp_dv else tdUl, kd, tkd, tqd, scale, T, N, BQ=c["BQ"], BKB=bkb, BVB=bvb,
               GATE_PP=pp_dv, DECAYED=decayed, KEYS=decayed and keys is None, num_warps=warps, **common)
    tdHs = alloc(*Hs.shape, device=dev, dtype=Hs.dtype)
    tdU = alloc(B, H, N, V, device=dev, dtype=mid)
    tdh0 = alloc(B, H, K, V, device=dev, dtype=f32) if h0 is not None else None
    launch_scan(scan_dh_tangent_kernel, c, c["BVS"], q, kd, G, W, do, dHs, dU, tqd, tkd, tG, tW, tdUl, tdHs, tdU,
                tdh0 if tdh0 is not None else tdUl, scale, T, N, NC, BQ=c["BQ"], STORE_DH0=int(tdh0 is not None),
                FUSE_DV=fuse, DECAYED=decayed, INTERPRET=c["INTERPRET"], **scan_launch(c, q.dtype, gate is not None),
                **common)
    tdq = alloc(*q.shape, device=dev, dtype=q.dtype)
    tdk_part = alloc(B, H, N, K, device=dev, dtype=mid)
    tdW = alloc(B, H, N, K, device=dev, dtype=mid)
    load_gm = gate is not None and gm.numel() > 0
    gq, gk, gh = gate_mid_views(gm, B, H, T, N, NC, K) if load_gm else (tdW,) * 3
    args = (q, k, G, Hs, dHs, U, dU, do, tq, tk, tG, tHs, tdHs, tU, tdU, tdq, tdk_part, tdW)
    if sides:  # the state side, then the query side, which adds the state side's dK̇ part (float32)
        tdk_state = alloc(B, H, N, K, device=dev, dtype=f32)
        parts = (("dqkw_state", 1, tdG1[nkb + pp_dv:]), ("dqkw_query", 2, tdG1))
    else:
        tdk_state = tdW  # placeholder, not read
        parts = (("dqkw", 0, tdG1 if gate is not None else tdW),)
    for name, side, slots in parts:
        warps, _, bvb = tangent_launch(c, name, q.dtype, gate is not None)
        launch(dqkw_tangent_kernel, (nkb, NC, B * H), *args, slots, gq, gk, gh, tdk_state, scale, T, N, NC, B,
               BQ=c["BQ"], BKB=bkd, BVB=bvb, LOAD_GM=load_gm, GATE_PP=not pp_dv, SIDE=side, num_warps=warps,
               **common)
    tdk = alloc(*k.shape, device=dev, dtype=k.dtype)
    tdv = alloc(*v.shape, device=dev, dtype=v.dtype)
    split = TUNING.on("wy_split", q.dtype)
    cols = tangent_launch(c, "wy_cols", q.dtype, gate is not None)
    tiles = cdiv(K, cols[1]) + cdiv(V, cols[2]) if split else 0  # of wy_cols_tangent_kernel
    tdbeta = alloc(1 + tiles, B, T, c["NH"], H, device=dev, dtype=f32)  # partial sums (one without split)
    tdG2 = alloc(1 + tiles, B, T, H, device=dev, dtype=f32) if gate is not None else None
    DC, tDC = (alloc(B, H, N, BT, device=dev, dtype=f32) for _ in range(2)) if split else (tdbeta, tdbeta)
    args = (k, v, beta, G, Ti, dW, dU, tk, tv, tbeta, tG, tTi, tdW, tdU, tdk_part)
    tdg = tdG2 if gate is not None else tdbeta
    warps, bkb, bvb = tangent_launch(c, "wy", q.dtype, gate is not None)
    launch(wy_bwd_tangent_kernel, (NC, B * H), *args, tdk, tdv, tdbeta, tdg, DC, tDC, T, N, BQ=c["BQ"], BKB=bkb,
           BVB=bvb, SPLIT=split, num_warps=warps, **common)
    if split:
        warps, bkb, bvb = cols
        launch(wy_cols_tangent_kernel, (tiles, NC, B * H), *args, DC, tDC, tdk, tdv, tdbeta, tdg, T, N,
               SB=tdbeta[0].numel(), SG=tdg[0].numel(), BQ=c["BQ"], BKB=bkb, BVB=bvb, num_warps=warps, **common)
    def total(parts: Tensor) -> Tensor:  # the partial sums of the split form; the one slot otherwise
        return parts.sum(0) if split else parts[0]

    tdG = tdG1.sum(0) + total(tdG2) if gate is not None else None
    return tdq, tdk, tdv, total(tdbeta), tdG, tdh0
