"""Tangent of the chunked DeltaProduct forward (forward mode): three Triton kernels that read the
primal forward's ``saved = (Ti, W, Hs, U)`` instead of recomputing it.

Written here without the gate; with one (``G`` the chunk-local cumulative log gate, ``Ġ`` its tangent)
each factor ``e^{G_a − G_b}`` (in ``A``, ``X = diag(β e^G) K``, the decays, ``M``) adds its tangent
``(Ġ_a − Ġ_b) e^{G_a − G_b}`` (the kernels' docstrings).

For tangents ``(q̇, k̇, v̇, β̇, ḣ0)`` of the inputs, with ``X = diag(β) K``, ``Y = diag(β) V``:

1. :func:`prep_tangent_kernel` (parallel over chunks):
   ``Ȧ = tril(diag(β̇) K Kᵀ + diag(β)(K̇ Kᵀ + K K̇ᵀ), −1)``, ``Ṫ = −T Ȧ T`` (``T = (I + A)⁻¹`` loaded),
   ``Ẇ = Ṫ X + T Ẋ``, ``U̇₀ = Ṫ Y + T Ẏ``.
2. :func:`scan_h_tangent_kernel` (sequential over chunks): ``U̇_c = U̇₀ − Ẇ S_c − W Ṡ_c``,
   ``Ṡ_{c+1} = Ṡ_c + K̇ᵀ U_c + Kᵀ U̇_c`` with ``S_c`` and ``U_c`` loaded: one state in registers.
3. :func:`out_tangent_kernel` (parallel): ``Ȯ = scale·(Q̇ S_c + Q Ṡ_c + (Ṗ ⊙ M) U_c + (P ⊙ M) U̇_c)``,
   ``P = Q Kᵀ``, ``Ṗ = Q̇ Kᵀ + Q K̇ᵀ``.

The primal is not recomputed: a Jacobian-vector product costs these three kernels on top of the
forward whose ``saved`` they read, and :func:`~kernels.delta_product.tangent_bwd.chunk_bwd_tangent`
takes their ``(Ṫ, Ẇ, Ḣs, U̇)`` (no gate).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.delta_product.chunk_fwd import launch_config, launch_scan
from kernels.delta_product.common import (
    causal_mask,
    chunk_gate_end,
    group_chunks,
    group_end,
    group_start,
    load_operand,
    load_rows,
    masked_exp,
    mm,
    scan_program,
    steps,
    store_rows,
    store_state,
    tokens,
)
from kernels.delta_product.launch import launch
from kernels.delta_product.utils import TUNING, alloc, cdiv


@triton.jit
def step_chunk(beta, tbeta, N, H, NH: tl.constexpr, CT: tl.constexpr, BT: tl.constexpr, AXIS: tl.constexpr):
    """A per-chunk program over micro-steps (grid axes ``AXIS``, ``AXIS + 1``: chunk, batch·head): head,
    batch·head, the chunk's steps (``steps``: offsets, indices, validity, tokens), their rows of ``[B·N, H]``,
    and ``β``, ``β̇`` there (float32)."""
    i_c, i_bh = tl.program_id(AXIS), tl.program_id(AXIS + 1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_i, n_i, m_i, tok_i = steps(i_c, N, NH, CT, BT)
    rows = i_b * N + n_i
    b_beta = tl.load(beta + rows * H + i_h, mask=m_i, other=0.0).to(tl.float32)
    b_tbeta = tl.load(tbeta + rows * H + i_h, mask=m_i, other=0.0).to(tl.float32)
    return i_h, i_bh, o_i, n_i, m_i, tok_i, rows, b_beta, b_tbeta


@triton.jit
def _t_times(b_T, b_tT, b_x, b_tx, b_beta, b_tbeta, DOT: tl.constexpr, PREC: tl.constexpr):
    """The tangent of ``T diag(β) X`` for one column block ``b_x`` of ``K`` or ``V``:
    ``Ṫ diag(β) X + T (diag(β̇) X + diag(β) Ẋ)``."""
    return (mm(b_tT, b_x * b_beta[:, None], DOT, PREC)
            + mm(b_T, b_tx * b_beta[:, None] + b_x * b_tbeta[:, None], DOT, PREC))


@triton.jit
def gate_at(G, tG, i_b, i_h, tok, m, T, H):
    """``G`` and its tangent ``Ġ`` at the tokens ``tok`` (zero where ``m`` is False)."""
    p = G + (i_b * T + tok) * H + i_h
    return tl.load(p, mask=m, other=0.0), tl.load(tG + (i_b * T + tok) * H + i_h, mask=m, other=0.0)


@triton.jit
def gate_end_at(G, tG, i_b, i_c, i_h, T, H, CT: tl.constexpr):
    """``G_L`` and ``Ġ_L``: ``G`` and its tangent at the last real token of chunk ``i_c``."""
    return chunk_gate_end(G, i_b, i_c, i_h, T, H, CT), chunk_gate_end(tG, i_b, i_c, i_h, T, H, CT)


@triton.jit
def exp_tangent(b_x, b_tx, a, ta):
    """The tangent of ``x e^a``: ``(ẋ + x ȧ) e^a`` (every gate factor's product rule)."""
    return (b_tx + b_x * ta) * tl.exp(a)


@triton.jit
def gate_pair(b_s, b_ts, g_a, tg_a, g_b, tg_b, m):
    """``S ⊙ E`` and its tangent ``(Ṡ + S ⊙ (Ġ_a − Ġ_b)) ⊙ E`` for ``E_ab = e^{G_a − G_b}`` where the
    ``[rows, columns]`` mask ``m`` holds, else 0 (rows ``a``, columns ``b``)."""
    b_e = masked_exp(g_a[:, None] - g_b[None, :], m)
    return b_s * b_e, (b_ts + b_s * (tg_a[:, None] - tg_b[None, :])) * b_e


@triton.jit
def decayed_keys(b_k, b_tk, g_i, tg_i, G, tG, i_b, i_c, i_h, T, H, CT: tl.constexpr):
    """``K̃ = diag(e^{G_L − G}) K`` and ``K̃̇ = diag(e^{G_L − G}) (K̇ + diag(Ġ_L − Ġ) K)`` of chunk ``i_c``
    (``G_L`` at its last real token; ``g_i``, ``tg_i``: ``G``, ``Ġ`` at the micro-steps), with ``G_L`` and ``Ġ_L``."""
    g_l, tg_l = gate_end_at(G, tG, i_b, i_c, i_h, T, H, CT)
    a, ta = (g_l - g_i)[:, None], (tg_l - tg_i)[:, None]
    return b_k * tl.exp(a), exp_tangent(b_k, b_tk, a, ta), g_l, tg_l


@triton.jit(do_not_specialize=["T", "N", "H"])
def prep_tangent_kernel(k, v, beta, G, Ti, tk, tv, tbeta, tG, tTi, tW, tU0, KD, TKD, T, N, H, K: tl.constexpr,
                        V: tl.constexpr, NH: tl.constexpr, CT: tl.constexpr, BT: tl.constexpr, BKB: tl.constexpr,
                        BVB: tl.constexpr, USE_G: tl.constexpr, DECAYED: tl.constexpr, DOT: tl.constexpr,
                        PREC: tl.constexpr, PREC_T: tl.constexpr):
    """With a gate, ``A ⊙ E`` (``E_ij = e^{G_i − G_j}``) adds ``A ⊙ (Ġ_i − Ġ_j)`` to ``Ȧ``, and ``X`` has the
    row factor ``f = β e^G``, ``ḟ = (β̇ + β Ġ) e^G``. With ``DECAYED`` (a gate and ``Tuning.gate_keys_prep``) also
    the decayed keys ``K̃``, ``K̃̇`` (:func:`decayed_keys`) in float32 at ``KD``, ``TKD`` (like ``k``), which the
    tangent scans read instead of forming them in every step."""
    i_h, i_bh, o_i, n_i, m_i, tok_i, rows, b_beta, b_tbeta = step_chunk(beta, tbeta, N, H, NH, CT, BT, 0)
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    b_tkk = tl.zeros([BT, BT], dtype=tl.float32)  # K̇ Kᵀ
    for i_k in range(tl.cdiv(K, BKB)):
        o_k = i_k * BKB + tl.arange(0, BKB)
        b_k = load_rows(k + i_h * K, rows, m_i, H * K, o_k, o_k < K)
        b_kk += mm(b_k, tl.trans(b_k), DOT, PREC)
        b_tk = load_rows(tk + i_h * K, rows, m_i, H * K, o_k, o_k < K)
        b_tkk += mm(b_tk, tl.trans(b_k), DOT, PREC)
        if DECAYED:  # here, where no T, Ṫ are alive yet
            g_i, tg_i = gate_at(G, tG, i_bh // H, i_h, tok_i, m_i, T, H)
            b_kd, b_tkd, g_l, tg_l = decayed_keys(b_k, b_tk, g_i, tg_i, G, tG, i_bh // H, tl.program_id(0), i_h, T, H,
                                                  CT)
            store_rows(KD + i_h * K, b_kd, rows, m_i, H * K, o_k, o_k < K)
            store_rows(TKD + i_h * K, b_tkd, rows, m_i, H * K, o_k, o_k < K)
    m_A = (o_i[:, None] > o_i[None, :]) & m_i[:, None] & m_i[None, :]
    b_tA = b_kk * b_tbeta[:, None] + (b_tkk + tl.trans(b_tkk)) * b_beta[:, None]
    b_f, b_tf = b_beta, b_tbeta  # X = diag(f) K with f = β e^G, and ḟ
    if USE_G:  # A ⊙ E, E_ij = e^{G_i − G_j}: Ȧ gains A ⊙ (Ġ_i − Ġ_j)
        b_g, b_tg = gate_at(G, tG, i_bh // H, i_h, tok_i, m_i, T, H)
        _, b_tA = gate_pair(b_kk * b_beta[:, None], b_tA, b_g, b_tg, b_g, b_tg, m_A)
        b_f = b_beta * tl.exp(b_g)
        b_tf = exp_tangent(b_beta, b_tbeta, b_g, b_tg)
    b_tA = tl.where(m_A, b_tA, 0.0)
    b_T = load_rows(Ti + i_bh * N * BT, n_i, m_i, BT, o_i, o_i < BT)
    b_tT = -tl.dot(b_T, tl.dot(b_tA, b_T, input_precision=PREC_T), input_precision=PREC_T)
    store_rows(tTi + i_bh * N * BT, b_tT, n_i, m_i, BT, o_i, o_i < BT)
    for i_k in range(tl.cdiv(K, BKB)):
        o_k = i_k * BKB + tl.arange(0, BKB)
        b_tw = _t_times(b_T, b_tT, load_rows(k + i_h * K, rows, m_i, H * K, o_k, o_k < K),
                        load_rows(tk + i_h * K, rows, m_i, H * K, o_k, o_k < K), b_f, b_tf, DOT, PREC)
        store_rows(tW + i_bh * N * K, b_tw, n_i, m_i, K, o_k, o_k < K)
    for i_v in range(tl.cdiv(V, BVB)):
        o_v = i_v * BVB + tl.arange(0, BVB)
        b_tu = _t_times(b_T, b_tT, load_rows(v + i_h * V, rows, m_i, H * V, o_v, o_v < V),
                        load_rows(tv + i_h * V, rows, m_i, H * V, o_v, o_v < V), b_beta, b_tbeta, DOT, PREC)
        store_rows(tU0 + i_bh * N * V, b_tu, n_i, m_i, V, o_v, o_v < V)


@triton.jit
def _th_keys(k, tk, G, tG, b_h, b_th, i_b, i_c, i_h, T, N, H, n_i, m_i, tok_i, o_k, m_k, K: tl.constexpr,
             CT: tl.constexpr, USE_G: tl.constexpr, WIDE: tl.constexpr, DECAYED: tl.constexpr):
    """The key columns ``o_k`` of ``K`` and ``K̇`` for one chunk, and the state rows ``o_k`` of ``Ṡ_c`` as
    ``Ṡ_{c+1}`` takes them; with a gate ``K̃ = diag(e^{G_L − G}) K``, ``K̃̇`` (formed here, or with ``DECAYED`` read
    as they are from ``k``, ``tk``: :func:`prep_tangent_kernel` stored them) and ``e^{G_L} (Ġ_L S_c + Ṡ_c)``
    (``b_h``: those rows of ``S_c``)."""
    b_k = load_operand(k + i_h * K, i_b * N + n_i, m_i, H * K, o_k, m_k, WIDE)
    b_tk = load_operand(tk + i_h * K, i_b * N + n_i, m_i, H * K, o_k, m_k, WIDE)
    if DECAYED:
        g_l, tg_l = gate_end_at(G, tG, i_b, i_c, i_h, T, H, CT)
    elif USE_G:
        g_i, tg_i = gate_at(G, tG, i_b, i_h, tok_i, m_i, T, H)
        b_k, b_tk, g_l, tg_l = decayed_keys(b_k, b_tk, g_i, tg_i, G, tG, i_b, i_c, i_h, T, H, CT)
    if USE_G:
        b_th = exp_tangent(b_h, b_th, g_l, tg_l)
    return b_k, b_tk, b_th


@triton.jit
def _th_step(k, G, W, Hs, U, tk, tG, tW, tU0, tHs, tU, b_th, b_th2, i_c, i_b, i_h, i_bh, T, N, NC, o_k, m_k, o_v, m_v,
             H, K: tl.constexpr, V: tl.constexpr, NH: tl.constexpr, CT: tl.constexpr, BT: tl.constexpr,
             BK: tl.constexpr, SPLIT: tl.constexpr, USE_G: tl.constexpr, WIDE: tl.constexpr, STORE: tl.constexpr,
             DECAYED: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """One chunk: ``Ṡ_c ↦ Ṡ_{c+1}``, storing ``Ṡ_c`` and ``U̇_c = U̇₀ − Ẇ S_c − W Ṡ_c`` (unless a group's summary:
    not ``STORE``). The state is ``b_th`` (rows ``o_k``) and, with ``SPLIT``, ``b_th2`` (rows ``o_k + BK``), each
    with its own key columns (:func:`_th_keys`). Tiles as float32 rows when ``WIDE``, else in the input dtype
    (``Tuning.tangent_tiles``; no gate)."""
    h_ptr = (i_bh * NC + i_c) * K * V
    o_k2, m_k2 = o_k + BK, o_k + BK < K
    if STORE:
        store_state(tHs + h_ptr, b_th, b_th2, o_k, m_k, K, V, o_v, m_v, BK, SPLIT)
    _, n_i, m_i, tok_i = steps(i_c, N, NH, CT, BT)
    b_h = load_operand(Hs + h_ptr, o_k, m_k, V, o_v, m_v, WIDE)
    b_tu = (load_rows(tU0 + i_bh * N * V, n_i, m_i, V, o_v, m_v)
            - mm(load_operand(tW + i_bh * N * K, n_i, m_i, K, o_k, m_k, WIDE), b_h, DOT, PREC)
            - mm(load_operand(W + i_bh * N * K, n_i, m_i, K, o_k, m_k, WIDE), b_th, DOT, PREC))
    b_h2 = b_h
    if SPLIT:
        b_h2 = load_operand(Hs + h_ptr, o_k2, m_k2, V, o_v, m_v, WIDE)
        b_tu = (b_tu - mm(load_operand(tW + i_bh * N * K, n_i, m_i, K, o_k2, m_k2, WIDE), b_h2, DOT, PREC)
                - mm(load_operand(W + i_bh * N * K, n_i, m_i, K, o_k2, m_k2, WIDE), b_th2, DOT, PREC))
    if STORE:
        store_rows(tU + i_bh * N * V, b_tu, n_i, m_i, V, o_v, m_v)
    b_k, b_tk, b_th = _th_keys(k, tk, G, tG, b_h, b_th, i_b, i_c, i_h, T, N, H, n_i, m_i, tok_i, o_k, m_k, K, CT, USE_G,
                               WIDE, DECAYED)
    b_u = load_operand(U + i_bh * N * V, n_i, m_i, V, o_v, m_v, WIDE)
    b_th = b_th + mm(tl.trans(b_tk), b_u, DOT, PREC) + mm(tl.trans(b_k), b_tu, DOT, PREC)
    if SPLIT:
        b_k, b_tk, b_th2 = _th_keys(k, tk, G, tG, b_h2, b_th2, i_b, i_c, i_h, T, N, H, n_i, m_i, tok_i, o_k2, m_k2, K,
                                    CT, USE_G, WIDE, DECAYED)
        b_th2 = b_th2 + mm(tl.trans(b_tk), b_u, DOT, PREC) + mm(tl.trans(b_k), b_tu, DOT, PREC)
    return b_th, b_th2


@triton.jit(do_not_specialize=["T", "N", "NC", "H", "USE_H0", "STORE_HT", "CG", "NG"])
def scan_h_tangent_kernel(k, G, W, Hs, U, tk, tG, tW, tU0, tH0, tHs, tU, tHT, T, N, NC, H, USE_H0, STORE_HT, Sum, CG,
                          NG, K: tl.constexpr, V: tl.constexpr, NH: tl.constexpr, CT: tl.constexpr, BT: tl.constexpr,
                          BK: tl.constexpr, BV: tl.constexpr, SPLIT: tl.constexpr, USE_G: tl.constexpr,
                          WIDE: tl.constexpr, SUMMARY: tl.constexpr, GROUPED: tl.constexpr, DECAYED: tl.constexpr,
                          DOT: tl.constexpr, PREC: tl.constexpr, PREC_C: tl.constexpr, INTERPRET: tl.constexpr):
    """``BK`` state rows per tile: all of ``K``, or with ``SPLIT`` half of them (two tiles, ``Tuning.scan_split``
    on float32 tiles). Chunk groups and ``SUMMARY``: as for :func:`~kernels.delta_product.chunk_fwd.scan_h_kernel`
    (the tangent scan has the primal's transition). ``DECAYED``: ``k``, ``tk`` hold the decayed keys
    (:func:`_th_keys`)."""
    i_b, i_h, i_bh, o_k, m_k, o_v, m_v = scan_program(H, K, V, BK, BV)
    i_g, c0, c1 = group_chunks(CG, NC, False, SUMMARY)
    b_th, b_th2 = group_start(Sum, tH0, USE_H0, i_g, i_bh, NG, o_k, m_k, o_v, m_v, K, V, BK, BV, SPLIT, False, SUMMARY,
                              GROUPED, PREC_C)
    if INTERPRET:  # run-time loop bounds break the interpreter under numpy >= 2.4
        i_c = c0
        while i_c < c1:
            b_th, b_th2 = _th_step(k, G, W, Hs, U, tk, tG, tW, tU0, tHs, tU, b_th, b_th2, i_c, i_b, i_h, i_bh, T, N, NC,
                                   o_k, m_k, o_v, m_v, H, K, V, NH, CT, BT, BK, SPLIT, USE_G, WIDE, not SUMMARY,
                                   DECAYED, DOT, PREC)
            i_c += 1
    else:
        for i_c in range(c0, c1):
            b_th, b_th2 = _th_step(k, G, W, Hs, U, tk, tG, tW, tU0, tHs, tU, b_th, b_th2, i_c, i_b, i_h, i_bh, T, N, NC,
                                   o_k, m_k, o_v, m_v, H, K, V, NH, CT, BT, BK, SPLIT, USE_G, WIDE, not SUMMARY,
                                   DECAYED, DOT, PREC)
    group_end(Sum, tHT, STORE_HT, b_th, b_th2, i_g, i_bh, NG, o_k, m_k, o_v, m_v, K, V, BK, SPLIT, False, SUMMARY)


@triton.jit
def p_pair(q, k, tq, tk, scale, i_b, i_h, t_t, m_t, n_i, m_i, T, N, H, K: tl.constexpr, BQ: tl.constexpr,
           BT: tl.constexpr, BKB: tl.constexpr, NEED_P: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """``P = scale·Q Kᵀ`` (zero unless ``NEED_P``) and ``Ṗ = scale·(Q̇ Kᵀ + Q K̇ᵀ)``, ``[BQ, BT]`` unmasked, over
    key blocks of ``BKB`` columns (whole rows of ``Q``, ``K`` and their tangents at once spill registers)."""
    b_s = tl.zeros([BQ, BT], dtype=tl.float32)
    b_ts = tl.zeros([BQ, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BKB)):
        o_k = i_k * BKB + tl.arange(0, BKB)
        m_k = o_k < K
        b_q = load_rows(q + i_h * K, i_b * T + t_t, m_t, H * K, o_k, m_k)
        b_k = load_rows(k + i_h * K, i_b * N + n_i, m_i, H * K, o_k, m_k)
        b_ts += mm(load_rows(tq + i_h * K, i_b * T + t_t, m_t, H * K, o_k, m_k), tl.trans(b_k), DOT, PREC)
        b_ts += mm(b_q, tl.trans(load_rows(tk + i_h * K, i_b * N + n_i, m_i, H * K, o_k, m_k)), DOT, PREC)
        if NEED_P:
            b_s += mm(b_q, tl.trans(b_k), DOT, PREC)
    return b_s * scale, b_ts * scale


@triton.jit(do_not_specialize=["T", "N", "NC", "H"])
def out_tangent_kernel(q, k, G, Hs, U, tq, tk, tG, tHs, tU, tO, scale, T, N, NC, H, K: tl.constexpr,
                       V: tl.constexpr, NH: tl.constexpr, CT: tl.constexpr, BT: tl.constexpr, BQ: tl.constexpr,
                       BKB: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, DOT: tl.constexpr,
                       PREC: tl.constexpr):
    """With a gate ``Ȯ`` gains ``Ġ_t`` times the state part (``Q̇ + diag(Ġ_q) Q`` in place of ``Q̇``,
    then ``diag(e^{G_q})``) and ``P ⊙ M ⊙ (Ġ_t − Ġ_i)`` in ``Ṗ``. Key blocks of ``BKB`` columns."""
    i_v, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_i, n_i, m_i, tok_i = steps(i_c, N, NH, CT, BT)
    o_t, t_t, m_t = tokens(i_c, T, CT, BQ)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    h_ptr = (i_bh * NC + i_c) * K * V
    b_s, b_ts = p_pair(q, k, tq, tk, scale, i_b, i_h, t_t, m_t, n_i, m_i, T, N, H, K, BQ, BT, BKB, True, DOT, PREC)
    if USE_G:
        g_t, tg_t = gate_at(G, tG, i_b, i_h, t_t, m_t, T, H)
    b_to = tl.zeros([BQ, BV], dtype=tl.float32)  # Q̇ S + Q Ṡ (the state part)
    for i_k in range(tl.cdiv(K, BKB)):
        o_k = i_k * BKB + tl.arange(0, BKB)
        m_k = o_k < K
        b_q = load_rows(q + i_h * K, i_b * T + t_t, m_t, H * K, o_k, m_k) * scale
        b_tq = load_rows(tq + i_h * K, i_b * T + t_t, m_t, H * K, o_k, m_k) * scale
        if USE_G:
            b_tq += b_q * tg_t[:, None]
        b_to += mm(b_tq, load_rows(Hs + h_ptr, o_k, m_k, V, o_v, m_v), DOT, PREC)
        b_to += mm(b_q, load_rows(tHs + h_ptr, o_k, m_k, V, o_v, m_v), DOT, PREC)
    m_s = causal_mask(o_t, m_t, o_i, m_i, NH)
    if USE_G:
        b_to = b_to * tl.exp(g_t)[:, None]
        g_i, tg_i = gate_at(G, tG, i_b, i_h, tok_i, m_i, T, H)
        b_s, b_ts = gate_pair(b_s, b_ts, g_t, tg_t, g_i, tg_i, m_s)
    b_to += mm(tl.where(m_s, b_ts, 0.0), load_rows(U + i_bh * N * V, n_i, m_i, V, o_v, m_v), DOT, PREC)
    b_to += mm(tl.where(m_s, b_s, 0.0), load_rows(tU + i_bh * N * V, n_i, m_i, V, o_v, m_v), DOT, PREC)
    store_rows(tO + i_h * V, b_to, i_b * T + t_t, m_t, H * V, o_v, m_v)


def scan_launch(c: dict, dtype: torch.dtype, gate: bool) -> dict:
    """``WIDE``, ``BK``, ``SPLIT``, ``num_warps`` and ``max_stages`` of a tangent chunk scan for the sizes ``c`` of
    :func:`~kernels.delta_product.chunk_fwd.launch_config`: float32 rows or not
    (:meth:`~kernels.delta_product.utils.Tuning.tangent_rows`), on float32 rows the state in two halves as in the
    primal scans (``Tuning.scan_split``), the warps of :func:`tangent_launch` and the pipeline depth of
    :meth:`~kernels.delta_product.utils.Tuning.dual_stages`."""
    wide = TUNING.tangent_rows(dtype, gate)
    split = c["SPLIT"] and wide
    return dict(WIDE=wide, BK=c["BKS"] if split else c["BK"], SPLIT=split,
                num_warps=tangent_launch(c, "scan", dtype, gate)[0], max_stages=TUNING.dual_stages(dtype))


def tangent_launch(c: dict, kernel: str, dtype: torch.dtype, gate: bool = False) -> tuple[int, int, int]:
    """``(num_warps, BKB, BVB)`` of the tangent kernel ``kernel`` for the sizes ``c`` of
    :func:`~kernels.delta_product.chunk_fwd.launch_config`, with or without a ``gate``
    (:meth:`~kernels.delta_product.utils.Tuning.tangent_launch`)."""
    warps, tile = TUNING.tangent_launch(kernel, dtype, gate, full_queries=c["BQ"] == c["BT"])
    return warps, min(c["BK"], tile), min(c["BVP"], tile)


def twin(x: Tensor | None) -> Tensor | None:
    """An unwritten buffer like ``x`` (for a tangent), or None."""
    return None if x is None else alloc(*x.shape, device=x.device, dtype=x.dtype)


def chunk_fwd_tangent(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, h0: Tensor | None, scale: float,
                      saved: tuple[Tensor, ...], tangents: tuple[Tensor | None, ...], output_final_state: bool,
                      output: bool = True, gate: tuple[Tensor, Tensor] | None = None,
                      ) -> tuple[Tensor | None, Tensor | None, tuple[Tensor, ...], tuple[Tensor, Tensor] | None]:
    """The three tangent kernels at the primal forward's ``saved``.

    Args:
        q, k, v, beta, h0, scale: the inputs of :func:`~kernels.delta_product.chunk_fwd.chunk_fwd`;
        saved: its ``(Ti, W, Hs, U)``; tangents: ``(q̇, k̇, v̇, β̇, ḣ0)`` like the primals (``ḣ0`` None iff
        ``h0`` is); output_final_state: also return the final state's tangent; output: also form ``ȯ``
        (without it, for the tangent backward alone, :func:`out_tangent_kernel` is not launched);
        gate: ``(G, Ġ)``, the chunk-local cumulative log gate ``[B, T, H]`` float32 and its tangent, or
        None without a gate.

    Returns:
        ``(ȯ or None, final-state tangent or None, (Ṫ, Ẇ, Ḣs, U̇), keys)``, the last two for the tangent
        backward: ``keys`` the decayed keys ``(K̃, K̃̇)`` (float32, like ``k``) that the tangent scan read
        (``Tuning.gate_keys_prep``), or None.
    """
    c = launch_config(q, k, v, True)
    B, T, H, K, V, N, NC, BT = c["B"], c["T"], c["H"], c["K"], c["V"], c["N"], c["NC"], c["BT"]
    common = dict(H=H, K=K, V=V, NH=c["NH"], CT=c["CT"], BT=BT, USE_G=gate is not None, DOT=c["DOT"],
                  PREC=c["PREC"])
    G, tG = gate if gate is not None else (beta, beta)  # placeholders, not read without a gate
    Ti, W, Hs, U = saved
    tq, tk, tv, tbeta, th0 = tangents
    tTi, tW, tU0 = twin(Ti), twin(W), alloc(B, H, N, V, device=q.device, dtype=q.dtype)
    keys = None
    if gate is not None and TUNING.on("gate_keys_prep", q.dtype):
        keys = tuple(alloc(*k.shape, device=q.device, dtype=torch.float32) for _ in range(2))
    kd, tkd = keys or (k, tk)
    warps, bkb, bvb = tangent_launch(c, "prep", q.dtype, gate is not None)
    launch(prep_tangent_kernel, (NC, B * H), k, v, beta, G, Ti, tk, tv, tbeta, tG, tTi, tW, tU0, kd, tkd, T, N,
           BKB=bkb, BVB=bvb, DECAYED=keys is not None, PREC_T="ieee" if c["INTERPRET"] else TUNING.prec_inverse,
           num_warps=warps, **common)
    tHs, tU = twin(Hs), twin(U)
    tht = alloc(B, H, K, V, device=q.device, dtype=torch.float32) if output_final_state else None
    launch_scan(scan_h_tangent_kernel, c, c["BVS"], kd, G, W, Hs, U, tkd, tG, tW, tU0, th0 if th0 is not None else W,
                tHs, tU, tht if tht is not None else W, T, N, NC, USE_H0=int(th0 is not None),
                STORE_HT=int(tht is not None), DECAYED=keys is not None, INTERPRET=c["INTERPRET"],
                **scan_launch(c, q.dtype, gate is not None), **common)
    if not output:
        return None, tht, (tTi, tW, tHs, tU), keys
    to = alloc(B, T, H, V, device=q.device, dtype=q.dtype)
    warps, bkb, bvb = tangent_launch(c, "out", q.dtype, gate is not None)
    launch(out_tangent_kernel, (cdiv(V, bvb), NC, B * H), q, k, G, Hs, U, tq, tk, tG, tHs, tU, to, scale,
           T, N, NC, BQ=c["BQ"], BKB=bkb, BV=bvb, num_warps=warps, **common)
    return to, tht, (tTi, tW, tHs, tU), keys
