"""Tangent of the chunked DeltaProduct backward (no gate): four Triton kernels that read the primal
backward's intermediates ``(dU, dHs, dW)`` instead of recomputing them.

For tangents ``ẋ`` of the inputs and ``(Ṫ, Ẇ, Ḣs, U̇)`` of the forward's ``saved``
(:func:`~kernels.delta_product.tangent_fwd.chunk_fwd_tangent`), with the cotangents ``(dO, dS_T)``
held fixed, the tangents of the gradients are the Hessian-vector product ``∇²⟨f, (dO, dS_T)⟩ ẋ``:

1. :func:`dv_local_tangent_kernel` (parallel): ``dU̇_loc = (Ṗ ⊙ M)ᵀ dO``, ``Ṗ = Q̇ Kᵀ + Q K̇ᵀ``.
2. :func:`scan_dh_tangent_kernel` (sequential, reverse): ``dU̇ = dU̇_loc + K̇ dS_{c+1} + K dṠ_{c+1}``,
   ``dṠ_c = dṠ_{c+1} + Q̇ᵀ dO − Ẇᵀ dU − Wᵀ dU̇`` with ``dS_{c+1}`` and ``dU`` loaded (``dṠ_T = 0``).
3. :func:`dqkw_tangent_kernel` (parallel): the tangents of ``dQ``, ``dW = −dU Sᵀ`` and the partial ``dK``
   by the product rule on ``dQ = dO Sᵀ + (dP ⊙ M) K``, ``dP = dO Uᵀ``,
   ``dK ⊇ (dP ⊙ M)ᵀ Q + U dS_{c+1}ᵀ``.
4. :func:`wy_bwd_tangent_kernel` (parallel): the tangents of ``dX = Tᵀ dW``, ``dY = Tᵀ dU``,
   ``dA = −Tᵀ (dW Xᵀ + dU Yᵀ) Tᵀ`` (strictly lower) and then of ``dK, dV, dβ``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.delta_product.chunk_fwd import launch_config
from kernels.delta_product.common import causal_mask, load_rows, mm, scan_program, steps, store_rows, tokens
from kernels.delta_product.tangent_fwd import step_chunk, tangent_launch
from kernels.delta_product.utils import TUNING, alloc, launch


@triton.jit
def _p_tangent(q, k, tq, tk, scale, i_c, i_b, i_h, T, N, H, K: tl.constexpr, NH: tl.constexpr, CT: tl.constexpr,
               BT: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """``Ṗ ⊙ M`` of chunk ``i_c``: ``[BQ, BT]``, token rows, micro-step columns."""
    o_i, n_i, m_i, _ = steps(i_c, N, NH, CT, BT)
    o_t, t_t, m_t = tokens(i_c, T, CT, BQ)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    b_q = load_rows(q + i_h * K, i_b * T + t_t, m_t, H * K, o_k, m_k) * scale
    b_tq = load_rows(tq + i_h * K, i_b * T + t_t, m_t, H * K, o_k, m_k) * scale
    b_k = load_rows(k + i_h * K, i_b * N + n_i, m_i, H * K, o_k, m_k)
    b_tk = load_rows(tk + i_h * K, i_b * N + n_i, m_i, H * K, o_k, m_k)
    b_ts = mm(b_tq, tl.trans(b_k), DOT, PREC) + mm(b_q, tl.trans(b_tk), DOT, PREC)
    return tl.where(causal_mask(o_t, m_t, o_i, m_i, NH), b_ts, 0.0)


@triton.jit(do_not_specialize=["T", "N", "H"])
def dv_local_tangent_kernel(q, k, dO, tq, tk, tdUl, scale, T, N, H, K: tl.constexpr, V: tl.constexpr,
                            NH: tl.constexpr, CT: tl.constexpr, BT: tl.constexpr, BQ: tl.constexpr,
                            BK: tl.constexpr, BVB: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    i_c, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    _, n_i, m_i, _ = steps(i_c, N, NH, CT, BT)
    _, t_t, m_t = tokens(i_c, T, CT, BQ)
    b_ts = _p_tangent(q, k, tq, tk, scale, i_c, i_b, i_h, T, N, H, K, NH, CT, BT, BQ, BK, DOT, PREC)
    for i_v in range(tl.cdiv(V, BVB)):
        o_v = i_v * BVB + tl.arange(0, BVB)
        b_do = load_rows(dO + i_h * V, i_b * T + t_t, m_t, H * V, o_v, o_v < V)
        store_rows(tdUl + i_bh * N * V, mm(tl.trans(b_ts), b_do, DOT, PREC), n_i, m_i, V, o_v, o_v < V)


@triton.jit
def _tdh_step(k, W, dO, dHs, dU, tq, tk, tW, tdUl, tdHs, tdU, b_tdh, scale, i_c, i_b, i_h, i_bh, T, N, NC, o_k, m_k,
              o_v, m_v, H, K: tl.constexpr, V: tl.constexpr, NH: tl.constexpr, CT: tl.constexpr, BT: tl.constexpr,
              BQ: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """One chunk backwards: ``dṠ_{c+1} ↦ dṠ_c``, storing ``dṠ_{c+1}`` and ``dU̇``."""
    h_ptr = (i_bh * NC + i_c) * K * V
    store_rows(tdHs + h_ptr, b_tdh, o_k, m_k, V, o_v, m_v)
    _, n_i, m_i, _ = steps(i_c, N, NH, CT, BT)
    _, t_t, m_t = tokens(i_c, T, CT, BQ)
    b_k = load_rows(k + i_h * K, i_b * N + n_i, m_i, H * K, o_k, m_k)
    b_tk = load_rows(tk + i_h * K, i_b * N + n_i, m_i, H * K, o_k, m_k)
    b_tdu = (load_rows(tdUl + i_bh * N * V, n_i, m_i, V, o_v, m_v)
             + mm(b_tk, load_rows(dHs + h_ptr, o_k, m_k, V, o_v, m_v), DOT, PREC) + mm(b_k, b_tdh, DOT, PREC))
    store_rows(tdU + i_bh * N * V, b_tdu, n_i, m_i, V, o_v, m_v)
    b_tq = load_rows(tq + i_h * K, i_b * T + t_t, m_t, H * K, o_k, m_k) * scale
    b_do = load_rows(dO + i_h * V, i_b * T + t_t, m_t, H * V, o_v, m_v)
    b_tw = load_rows(tW + i_bh * N * K, n_i, m_i, K, o_k, m_k)
    b_du = load_rows(dU + i_bh * N * V, n_i, m_i, V, o_v, m_v)
    b_w = load_rows(W + i_bh * N * K, n_i, m_i, K, o_k, m_k)
    return (b_tdh + mm(tl.trans(b_tq), b_do, DOT, PREC) - mm(tl.trans(b_tw), b_du, DOT, PREC)
            - mm(tl.trans(b_w), b_tdu, DOT, PREC))


@triton.jit(do_not_specialize=["T", "N", "NC", "H", "STORE_DH0"])
def scan_dh_tangent_kernel(k, W, dO, dHs, dU, tq, tk, tW, tdUl, tdHs, tdU, tdH0, scale, T, N, NC, H,
                           K: tl.constexpr, V: tl.constexpr, NH: tl.constexpr, CT: tl.constexpr, BT: tl.constexpr,
                           BQ: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, STORE_DH0, DOT: tl.constexpr,
                           PREC: tl.constexpr, INTERPRET: tl.constexpr):
    i_b, i_h, i_bh, o_k, m_k, o_v, m_v = scan_program(H, K, V, BK, BV)
    b_tdh = tl.zeros([BK, BV], dtype=tl.float32)
    if INTERPRET:  # run-time loop bounds break the interpreter under numpy >= 2.4
        it = 0
        while it < NC:
            b_tdh = _tdh_step(k, W, dO, dHs, dU, tq, tk, tW, tdUl, tdHs, tdU, b_tdh, scale, NC - 1 - it, i_b, i_h,
                              i_bh, T, N, NC, o_k, m_k, o_v, m_v, H, K, V, NH, CT, BT, BQ, DOT, PREC)
            it += 1
    else:
        for it in range(NC):
            b_tdh = _tdh_step(k, W, dO, dHs, dU, tq, tk, tW, tdUl, tdHs, tdU, b_tdh, scale, NC - 1 - it, i_b, i_h,
                              i_bh, T, N, NC, o_k, m_k, o_v, m_v, H, K, V, NH, CT, BT, BQ, DOT, PREC)
    if STORE_DH0 > 0:
        store_rows(tdH0 + i_bh * K * V, b_tdh, o_k, m_k, V, o_v, m_v)


@triton.jit(do_not_specialize=["T", "N", "NC", "H"])
def dqkw_tangent_kernel(q, k, Hs, dHs, U, dU, dO, tq, tk, tHs, tdHs, tU, tdU, tdq, tdk, tdW, scale, T, N, NC, H,
                        K: tl.constexpr, V: tl.constexpr, NH: tl.constexpr, CT: tl.constexpr, BT: tl.constexpr,
                        BQ: tl.constexpr, BKB: tl.constexpr, BVB: tl.constexpr, DOT: tl.constexpr,
                        PREC: tl.constexpr):
    """One program per (key block, chunk, batch·head)."""
    i_kb, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_i, n_i, m_i, _ = steps(i_c, N, NH, CT, BT)
    o_t, t_t, m_t = tokens(i_c, T, CT, BQ)
    o_k = i_kb * BKB + tl.arange(0, BKB)
    m_k = o_k < K
    b_dp = tl.zeros([BQ, BT], dtype=tl.float32)
    b_tdp = tl.zeros([BQ, BT], dtype=tl.float32)
    b_tdqa = tl.zeros([BQ, BKB], dtype=tl.float32)
    b_tdw = tl.zeros([BT, BKB], dtype=tl.float32)
    b_tdkt = tl.zeros([BT, BKB], dtype=tl.float32)
    h_ptr = (i_bh * NC + i_c) * K * V
    for i_v in range(tl.cdiv(V, BVB)):
        o_v = i_v * BVB + tl.arange(0, BVB)
        m_v = o_v < V
        b_do = load_rows(dO + i_h * V, i_b * T + t_t, m_t, H * V, o_v, m_v)
        b_u = load_rows(U + i_bh * N * V, n_i, m_i, V, o_v, m_v)
        b_tu = load_rows(tU + i_bh * N * V, n_i, m_i, V, o_v, m_v)
        b_th = load_rows(tHs + h_ptr, o_k, m_k, V, o_v, m_v)
        b_dp += mm(b_do, tl.trans(b_u), DOT, PREC)
        b_tdp += mm(b_do, tl.trans(b_tu), DOT, PREC)
        b_tdqa += mm(b_do, tl.trans(b_th), DOT, PREC)
        b_tdw -= (mm(load_rows(tdU + i_bh * N * V, n_i, m_i, V, o_v, m_v),
                     tl.trans(load_rows(Hs + h_ptr, o_k, m_k, V, o_v, m_v)), DOT, PREC)
                  + mm(load_rows(dU + i_bh * N * V, n_i, m_i, V, o_v, m_v), tl.trans(b_th), DOT, PREC))
        b_tdkt += (mm(b_tu, tl.trans(load_rows(dHs + h_ptr, o_k, m_k, V, o_v, m_v)), DOT, PREC)
                   + mm(b_u, tl.trans(load_rows(tdHs + h_ptr, o_k, m_k, V, o_v, m_v)), DOT, PREC))
    m_s = causal_mask(o_t, m_t, o_i, m_i, NH)
    b_dpm = tl.where(m_s, b_dp, 0.0)
    b_tdpm = tl.where(m_s, b_tdp, 0.0)
    b_q = load_rows(q + i_h * K, i_b * T + t_t, m_t, H * K, o_k, m_k) * scale
    b_tq = load_rows(tq + i_h * K, i_b * T + t_t, m_t, H * K, o_k, m_k) * scale
    b_k = load_rows(k + i_h * K, i_b * N + n_i, m_i, H * K, o_k, m_k)
    b_tk = load_rows(tk + i_h * K, i_b * N + n_i, m_i, H * K, o_k, m_k)
    b_tdq = b_tdqa + mm(b_tdpm, b_k, DOT, PREC) + mm(b_dpm, b_tk, DOT, PREC)
    b_tdk = mm(tl.trans(b_tdpm), b_q, DOT, PREC) + mm(tl.trans(b_dpm), b_tq, DOT, PREC) + b_tdkt
    store_rows(tdq + i_h * K, b_tdq * scale, i_b * T + t_t, m_t, H * K, o_k, m_k)
    store_rows(tdk + i_bh * N * K, b_tdk, n_i, m_i, K, o_k, m_k)
    store_rows(tdW + i_bh * N * K, b_tdw, n_i, m_i, K, o_k, m_k)


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


@triton.jit(do_not_specialize=["N", "H"])
def wy_bwd_tangent_kernel(k, v, beta, Ti, dW, dU, tk, tv, tbeta, tTi, tdW, tdU, tdk_in, tdk, tdv, tdbeta, N, H,
                          K: tl.constexpr, V: tl.constexpr, NH: tl.constexpr, CT: tl.constexpr, BT: tl.constexpr,
                          BKB: tl.constexpr, BVB: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """``d(dA) = −(Ṫᵀ dT Tᵀ + Tᵀ (dṪ Tᵀ + dT Ṫᵀ))``; ``Σ_j dA_ij (K Kᵀ)_ij = Σ_d K_id (dA K)_id`` in ``dβ``."""
    i_h, i_bh, o_i, n_i, m_i, _, rows, b_beta, b_tbeta = step_chunk(beta, tbeta, N, H, NH, CT, BT)
    b_T = load_rows(Ti + i_bh * N * BT, n_i, m_i, BT, o_i, o_i < BT)
    b_tT = load_rows(tTi + i_bh * N * BT, n_i, m_i, BT, o_i, o_i < BT)
    b_dT = tl.zeros([BT, BT], dtype=tl.float32)
    b_tdT = tl.zeros([BT, BT], dtype=tl.float32)
    b_tdb = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BKB)):  # dX = Tᵀ dW and its tangent: in the second loop over K
        o_k = i_k * BKB + tl.arange(0, BKB)
        dT, tdT = _dT_block(load_rows(k + i_h * K, rows, m_i, H * K, o_k, o_k < K),
                            load_rows(tk + i_h * K, rows, m_i, H * K, o_k, o_k < K),
                            load_rows(dW + i_bh * N * K, n_i, m_i, K, o_k, o_k < K),
                            load_rows(tdW + i_bh * N * K, n_i, m_i, K, o_k, o_k < K), b_beta, b_tbeta, DOT, PREC)
        b_dT += dT
        b_tdT += tdT
    for i_v in range(tl.cdiv(V, BVB)):
        o_v = i_v * BVB + tl.arange(0, BVB)
        b_v = load_rows(v + i_h * V, rows, m_i, H * V, o_v, o_v < V)
        b_tv = load_rows(tv + i_h * V, rows, m_i, H * V, o_v, o_v < V)
        b_du = load_rows(dU + i_bh * N * V, n_i, m_i, V, o_v, o_v < V)
        b_tdu = load_rows(tdU + i_bh * N * V, n_i, m_i, V, o_v, o_v < V)
        dT, tdT = _dT_block(b_v, b_tv, b_du, b_tdu, b_beta, b_tbeta, DOT, PREC)
        b_dy, b_tdy = _t_transpose_times(b_T, b_tT, b_du, b_tdu, DOT, PREC)
        b_dT += dT
        b_tdT += tdT
        b_tdb += tl.sum(b_tdy * b_v + b_dy * b_tv, 1)
        store_rows(tdv + i_h * V, b_tdy * b_beta[:, None] + b_dy * b_tbeta[:, None], rows, m_i, H * V, o_v,
                   o_v < V)
    m_A = (o_i[:, None] > o_i[None, :]) & m_i[:, None] & m_i[None, :]
    b_dT = tl.where(m_A, b_dT, 0.0)
    b_tdT = tl.where(m_A, b_tdT, 0.0)
    b_dTT = mm(b_dT, tl.trans(b_T), DOT, PREC)  # dT Tᵀ
    b_dA = tl.where(m_A, -mm(tl.trans(b_T), b_dTT, DOT, PREC), 0.0)
    b_inner = mm(b_tdT, tl.trans(b_T), DOT, PREC) + mm(b_dT, tl.trans(b_tT), DOT, PREC)
    b_tdA = tl.where(m_A, -mm(tl.trans(b_tT), b_dTT, DOT, PREC) - mm(tl.trans(b_T), b_inner, DOT, PREC), 0.0)
    b_dc = b_dA * b_beta[:, None]
    b_tdc = b_tdA * b_beta[:, None] + b_dA * b_tbeta[:, None]
    for i_k in range(tl.cdiv(K, BKB)):
        o_k = i_k * BKB + tl.arange(0, BKB)
        b_k = load_rows(k + i_h * K, rows, m_i, H * K, o_k, o_k < K)
        b_tk = load_rows(tk + i_h * K, rows, m_i, H * K, o_k, o_k < K)
        b_dx, b_tdx = _t_transpose_times(b_T, b_tT, load_rows(dW + i_bh * N * K, n_i, m_i, K, o_k, o_k < K),
                                         load_rows(tdW + i_bh * N * K, n_i, m_i, K, o_k, o_k < K), DOT, PREC)
        b_dak = mm(b_dA, b_k, DOT, PREC)
        b_tdak = mm(b_tdA, b_k, DOT, PREC) + mm(b_dA, b_tk, DOT, PREC)
        b_tdkk = load_rows(tdk_in + i_bh * N * K, n_i, m_i, K, o_k, o_k < K)
        b_tdkk += b_tdx * b_beta[:, None] + b_dx * b_tbeta[:, None]
        b_tdkk += b_tdak * b_beta[:, None] + b_dak * b_tbeta[:, None]
        b_tdkk += mm(tl.trans(b_tdc), b_k, DOT, PREC) + mm(tl.trans(b_dc), b_tk, DOT, PREC)
        b_tdb += tl.sum(b_k * (b_tdx + b_tdak) + b_tk * (b_dx + b_dak), 1)
        store_rows(tdk + i_h * K, b_tdkk, rows, m_i, H * K, o_k, o_k < K)
    tl.store(tdbeta + rows * H + i_h, b_tdb, mask=m_i)


def chunk_bwd_tangent(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, h0: Tensor | None, scale: float,
                      saved: tuple[Tensor, ...], do: Tensor, mids: tuple[Tensor, ...],
                      tangents: tuple[Tensor | None, ...], tsaved: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
    """The four tangent kernels (no gate).

    Args:
        q, k, v, beta, h0, scale, saved, do: as for :func:`~kernels.delta_product.chunk_bwd.chunk_bwd`;
        mids: its ``(dU, dHs, dW)``; tangents: ``(q̇, k̇, v̇, β̇, ḣ0)``; tsaved: ``(Ṫ, Ẇ, Ḣs, U̇)`` from
        :func:`~kernels.delta_product.tangent_fwd.chunk_fwd_tangent` (``do`` and ``dht`` held fixed).

    Returns:
        The tangents of ``(dq, dk, dv, dbeta, dh0)`` (``dh0``'s None without an initial state): the
        Hessian-vector product ``∇²⟨f, (do, dht)⟩ ẋ``.
    """
    Ti, W, Hs, U = saved
    dU, dHs, dW = mids
    tq, tk, tv, tbeta, _ = tangents
    tTi, tW, tHs, tU = tsaved
    c = launch_config(q, k, v, True)
    B, T, H, K, V, N, NC, BT = c["B"], c["T"], c["H"], c["K"], c["V"], c["N"], c["NC"], c["BT"]
    common = dict(H=H, K=K, V=V, NH=c["NH"], CT=c["CT"], BT=BT, DOT=c["DOT"], PREC=c["PREC"])
    dev, mid = q.device, dU.dtype
    do = do.contiguous()
    tdUl = alloc(B, H, N, V, device=dev, dtype=mid)
    warps, _, bvb = tangent_launch(c, "dv", q.dtype)
    launch(dv_local_tangent_kernel, (NC, B * H), q, k, do, tq, tk, tdUl, scale, T, N, BQ=c["BQ"], BK=c["BK"],
           BVB=bvb, num_warps=warps, **common)
    tdHs = alloc(*Hs.shape, device=dev, dtype=Hs.dtype)
    tdU = alloc(B, H, N, V, device=dev, dtype=mid)
    tdh0 = alloc(B, H, K, V, device=dev, dtype=torch.float32) if h0 is not None else None
    launch(scan_dh_tangent_kernel, (triton.cdiv(V, c["BVS"]), B * H), k, W, do, dHs, dU, tq, tk, tW, tdUl, tdHs,
           tdU, tdh0 if tdh0 is not None else tdUl, scale, T, N, NC, BQ=c["BQ"], BK=c["BK"], BV=c["BVS"],
           STORE_DH0=int(tdh0 is not None), INTERPRET=c["INTERPRET"],
           num_warps=tangent_launch(c, "scan", q.dtype)[0], **common)
    bkd = min(c["BK"], TUNING.bk_dqkw)
    warps, _, bvb = tangent_launch(c, "dqkw", q.dtype)
    tdq = alloc(*q.shape, device=dev, dtype=q.dtype)
    tdk_part = alloc(B, H, N, K, device=dev, dtype=mid)
    tdW = alloc(B, H, N, K, device=dev, dtype=mid)
    launch(dqkw_tangent_kernel, (triton.cdiv(K, bkd), NC, B * H), q, k, Hs, dHs, U, dU, do, tq, tk, tHs, tdHs, tU,
           tdU, tdq, tdk_part, tdW, scale, T, N, NC, BQ=c["BQ"], BKB=bkd, BVB=bvb, num_warps=warps, **common)
    tdk = alloc(*k.shape, device=dev, dtype=k.dtype)
    tdv = alloc(*v.shape, device=dev, dtype=v.dtype)
    tdbeta = alloc(B, T, c["NH"], H, device=dev, dtype=torch.float32)
    warps, bkb, bvb = tangent_launch(c, "wy", q.dtype)
    launch(wy_bwd_tangent_kernel, (NC, B * H), k, v, beta, Ti, dW, dU, tk, tv, tbeta, tTi, tdW, tdU, tdk_part, tdk,
           tdv, tdbeta, N, BKB=bkb, BVB=bvb, num_warps=warps, **common)
    return tdq, tdk, tdv, tdbeta, tdh0
