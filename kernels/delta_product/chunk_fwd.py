"""Fused forward of chunked DeltaProduct: three Triton kernels.

1. :func:`prep_kernel` (parallel over chunks): ``A = tril(diag(β)(K Kᵀ ⊙ E), −1)``,
   ``T = (I + A)⁻¹`` by blocked forward substitution (``TUNING.inverse``), ``W = T diag(β e^G) K``,
   ``U₀ = T diag(β) V``.
2. :func:`scan_h_kernel` (sequential over chunks, in chunk groups on small grids: ``Tuning.scan_groups``):
   ``S_c`` stored, ``U_c = U₀ − W S_c``, ``S_{c+1} = e^{G_L} S_c + (diag(e^{G_L−G}) K)ᵀ U_c``.
3. :func:`out_kernel` (parallel): ``O = scale·(diag(e^{Gq}) Q S_c + (Q Kᵀ ⊙ M) U_c)`` at the real
   tokens only (``M_ti = e^{Gq_t − G_i}[i ≤ last(t)]``, ``Q`` rows are tokens, not micro-steps); with
   ``Tuning.fuse_out`` the scan forms it instead, while it holds ``S_c``, ``U_c`` and ``K`` (when its grid has
   at least ``Tuning.fuse_min_programs`` programs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.delta_product.common import (
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
    unit_lower_inverse,
    unit_lower_inverse_tiles,
)
from kernels.delta_product.launch import launch
from kernels.delta_product.utils import (BLOCK_STEPS, TUNING, alloc, cdiv, chunk_tokens, dot_config, interpreting,
                                         next_pow2)


@triton.jit(do_not_specialize=["T", "N", "H"])
def prep_kernel(k, v, beta, G, Ti, W, U0, T, N, H, K: tl.constexpr, V: tl.constexpr,
                NH: tl.constexpr, CT: tl.constexpr, BT: tl.constexpr, BKB: tl.constexpr, BVB: tl.constexpr,
                USE_G: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, PREC_T: tl.constexpr,
                INV_TILES: tl.constexpr):
    i_c, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_i, n_i, m_i, tok_i = steps(i_c, N, NH, CT, BT)
    rows = i_b * N + n_i
    b_beta = tl.load(beta + rows * H + i_h, mask=m_i, other=0.0).to(tl.float32)
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BKB)):
        o_k = i_k * BKB + tl.arange(0, BKB)
        b_k = load_tile(k + i_h * K, rows, m_i, H * K, o_k, o_k < K)
        b_kk += mm(b_k, tl.trans(b_k), DOT, PREC)
    m_A = (o_i[:, None] > o_i[None, :]) & m_i[:, None] & m_i[None, :]
    b_A = b_kk * b_beta[:, None]
    b_x = b_beta
    if USE_G:
        b_g = tl.load(G + (i_b * T + tok_i) * H + i_h, mask=m_i, other=0.0)
        b_A = b_A * masked_exp(b_g[:, None] - b_g[None, :], m_A)
        b_x = b_beta * tl.exp(b_g)
    b_A = tl.where(m_A, b_A, 0.0)
    if INV_TILES:  # A staged in this chunk's rows of Ti, inverted there by 16×16 tiles
        store_rows(Ti + i_bh * N * BT, b_A, n_i, m_i, BT, o_i, o_i < BT)
        tl.debug_barrier()
        unit_lower_inverse_tiles(Ti + i_bh * N * BT, i_c * (CT * NH), N, CT * NH, BT, PREC_T)
        tl.debug_barrier()
        b_T = load_rows(Ti + i_bh * N * BT, n_i, m_i, BT, o_i, o_i < BT)
    else:
        b_T = unit_lower_inverse(b_A, o_i, BT, 16, PREC_T)
        store_rows(Ti + i_bh * N * BT, b_T, n_i, m_i, BT, o_i, o_i < BT)
    b_tx = b_T * b_x[None, :]  # T diag(x): W = T diag(x) K, U₀ = T diag(β) V
    b_tb = b_T * b_beta[None, :]
    for i_k in range(tl.cdiv(K, BKB)):
        o_k = i_k * BKB + tl.arange(0, BKB)
        b_k = load_tile(k + i_h * K, rows, m_i, H * K, o_k, o_k < K)
        store_rows(W + i_bh * N * K, mm(b_tx, b_k, DOT, PREC), n_i, m_i, K, o_k, o_k < K)
    for i_v in range(tl.cdiv(V, BVB)):
        o_v = i_v * BVB + tl.arange(0, BVB)
        b_v = load_tile(v + i_h * V, rows, m_i, H * V, o_v, o_v < V)
        store_rows(U0 + i_bh * N * V, mm(b_tb, b_v, DOT, PREC), n_i, m_i, V, o_v, o_v < V)


@triton.jit
def _h_step(k, q, G, W, U0, Hs, U, O, b_h, b_h2, scale, i_c, i_b, i_h, i_bh, T, N, NC, o_k, m_k, o_v, m_v,
            H, K: tl.constexpr, V: tl.constexpr, NH: tl.constexpr, CT: tl.constexpr, BT: tl.constexpr,
            BQ: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, USE_G: tl.constexpr, FUSE_OUT: tl.constexpr,
            STORE: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """Chunk ``i_c``: store ``S_c``, form and store ``U_c = U₀ − W S_c`` and, with ``FUSE_OUT``, the output
    rows of :func:`out_kernel` in this program's value columns; return ``S_{c+1}``. The state is ``b_h`` (rows
    ``o_k``) and, with ``SPLIT``, ``b_h2`` (rows ``o_k + BK``), each with its own key columns. Without ``STORE``
    (a group's summary) nothing is stored."""
    o_k2, m_k2 = o_k + BK, o_k + BK < K
    if STORE:
        store_rows(Hs + (i_bh * NC + i_c) * K * V, b_h, o_k, m_k, V, o_v, m_v)
    o_i, n_i, m_i, tok_i = steps(i_c, N, NH, CT, BT)
    o_t, t_t, m_t = tokens(i_c, T, CT, BQ)
    b_u = load_rows(U0 + i_bh * N * V, n_i, m_i, V, o_v, m_v)
    b_u -= mm(load_tile(W + i_bh * N * K, n_i, m_i, K, o_k, m_k), b_h, DOT, PREC)
    if SPLIT:
        if STORE:
            store_rows(Hs + (i_bh * NC + i_c) * K * V, b_h2, o_k2, m_k2, V, o_v, m_v)
        b_u -= mm(load_tile(W + i_bh * N * K, n_i, m_i, K, o_k2, m_k2), b_h2, DOT, PREC)
    if STORE:
        store_rows(U + i_bh * N * V, b_u, n_i, m_i, V, o_v, m_v)
    b_d = tl.full([BT], 1.0, tl.float32)  # K̃ = diag(e^{G_L − G}) K and the state's decay e^{G_L}
    b_a = 1.0
    if USE_G:
        g_i = tl.load(G + (i_b * T + tok_i) * H + i_h, mask=m_i, other=0.0)
        g_l = chunk_gate_end(G, i_b, i_c, i_h, T, H, CT)
        b_d = tl.exp(g_l - g_i)
        b_a = tl.exp(g_l)
    b_o = tl.zeros([BQ, b_h.shape[1]], dtype=tl.float32)  # Q S_c and Q Kᵀ (with FUSE_OUT)
    b_s = tl.zeros([BQ, BT], dtype=tl.float32)
    b_h, b_o, b_s = _h_update(k + i_h * K, q + i_h * K, b_h, b_u, b_d, b_a, b_o, b_s, i_b * N + n_i, m_i,
                              i_b * T + t_t, m_t, H * K, o_k, m_k, FUSE_OUT, DOT, PREC)
    if SPLIT:
        b_h2, b_o, b_s = _h_update(k + i_h * K, q + i_h * K, b_h2, b_u, b_d, b_a, b_o, b_s, i_b * N + n_i, m_i,
                                   i_b * T + t_t, m_t, H * K, o_k2, m_k2, FUSE_OUT, DOT, PREC)
    if FUSE_OUT:
        b_o, b_s = out_terms(b_o, b_s, G, i_b, i_h, T, H, o_t, t_t, m_t, o_i, m_i, tok_i, NH, USE_G)
        store_rows(O + i_h * V, (b_o + mm(b_s, b_u, DOT, PREC)) * scale, i_b * T + t_t, m_t, H * V, o_v, m_v)
    return b_h, b_h2


@triton.jit
def _h_update(k, q, b_h, b_u, b_d, b_a, b_o, b_s, k_rows, m_i, q_rows, m_t, row_stride, o_k, m_k,
              FUSE_OUT: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """``a S + Kᵀ diag(d) U`` for the state rows ``o_k`` (``K``'s columns ``o_k``) and, with ``FUSE_OUT``, the
    terms ``Q S`` and ``Q Kᵀ`` of those columns added to ``b_o`` and ``b_s``."""
    b_k = load_tile(k, k_rows, m_i, row_stride, o_k, m_k)
    if FUSE_OUT:
        b_q = load_tile(q, q_rows, m_t, row_stride, o_k, m_k)
        b_o += mm(b_q, b_h, DOT, PREC)
        b_s += mm(b_q, tl.trans(b_k), DOT, PREC)
    return b_h * b_a + mm(tl.trans(b_k), b_u * b_d[:, None], DOT, PREC), b_o, b_s


@triton.jit
def out_terms(b_o, b_s, G, i_b, i_h, T, H, o_t, t_t, m_t, o_i, m_i, tok_i, NH: tl.constexpr, USE_G: tl.constexpr):
    """The two terms of one chunk's output ``O = diag(e^{Gq}) Q S_c + (Q Kᵀ ⊙ M) U_c`` (unscaled) from
    ``b_o = Q S_c`` and ``b_s = Q Kᵀ``: ``diag(e^{Gq}) Q S_c`` and ``Q Kᵀ ⊙ M``."""
    if USE_G:
        b_o = b_o * tl.exp(tl.load(G + (i_b * T + t_t) * H + i_h, mask=m_t, other=0.0))[:, None]
    return b_o, local_scores(b_s, G, i_b, i_h, T, H, o_t, t_t, m_t, o_i, m_i, tok_i, NH, USE_G)


@triton.jit(do_not_specialize=["T", "N", "NC", "H", "USE_H0", "STORE_HT", "CG", "NG"])
def scan_h_kernel(k, q, G, W, U0, H0, Hs, U, O, HT, scale, T, N, NC, H, USE_H0, STORE_HT, Sum, CG, NG,
                  K: tl.constexpr, V: tl.constexpr, NH: tl.constexpr, CT: tl.constexpr, BT: tl.constexpr,
                  BQ: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SPLIT: tl.constexpr, USE_G: tl.constexpr,
                  FUSE_OUT: tl.constexpr, SUMMARY: tl.constexpr, GROUPED: tl.constexpr, DOT: tl.constexpr,
                  PREC: tl.constexpr, PREC_C: tl.constexpr, INTERPRET: tl.constexpr):
    """``BK`` state rows per tile: all of ``K``, or with ``SPLIT`` half of them (two tiles, ``Tuning.scan_split``);
    ``FUSE_OUT`` (``Tuning.fuse_out``): the output too, in place of :func:`out_kernel`. Chunk groups
    (``Tuning.scan_groups``): program ``(·, ·, i_g)`` scans group ``i_g`` from the start that
    :func:`~kernels.delta_product.common.group_start` forms; ``SUMMARY``: the groups' summaries instead."""
    i_b, i_h, i_bh, o_k, m_k, o_v, m_v = scan_program(H, K, V, BK, BV)
    i_g, c0, c1 = group_chunks(CG, NC, False, SUMMARY)
    b_h, b_h2 = group_start(Sum, H0, USE_H0, i_g, i_bh, NG, o_k, m_k, o_v, m_v, K, V, BK, BV, SPLIT, False, SUMMARY,
                            GROUPED, PREC_C)
    if INTERPRET:  # run-time loop bounds break the interpreter under numpy >= 2.4
        i_c = c0
        while i_c < c1:
            b_h, b_h2 = _h_step(k, q, G, W, U0, Hs, U, O, b_h, b_h2, scale, i_c, i_b, i_h, i_bh, T, N, NC, o_k, m_k,
                                o_v, m_v, H, K, V, NH, CT, BT, BQ, BK, SPLIT, USE_G, FUSE_OUT, not SUMMARY, DOT, PREC)
            i_c += 1
    else:
        for i_c in range(c0, c1):
            b_h, b_h2 = _h_step(k, q, G, W, U0, Hs, U, O, b_h, b_h2, scale, i_c, i_b, i_h, i_bh, T, N, NC, o_k, m_k,
                                o_v, m_v, H, K, V, NH, CT, BT, BQ, BK, SPLIT, USE_G, FUSE_OUT, not SUMMARY, DOT, PREC)
    group_end(Sum, HT, STORE_HT, b_h, b_h2, i_g, i_bh, NG, o_k, m_k, o_v, m_v, K, V, BK, SPLIT, False, SUMMARY)


@triton.jit(do_not_specialize=["T", "N", "NC", "H"])
def out_kernel(q, k, G, Hs, U, O, scale, T, N, NC, H, K: tl.constexpr, V: tl.constexpr,
               NH: tl.constexpr, CT: tl.constexpr, BT: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
               BV: tl.constexpr, USE_G: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    i_v, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_i, n_i, m_i, tok_i = steps(i_c, N, NH, CT, BT)
    o_t, t_t, m_t = tokens(i_c, T, CT, BQ)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_q = load_rows(q + i_h * K, i_b * T + t_t, m_t, H * K, o_k, m_k) * scale
    b_k = load_rows(k + i_h * K, i_b * N + n_i, m_i, H * K, o_k, m_k)
    b_h = load_rows(Hs + (i_bh * NC + i_c) * K * V, o_k, m_k, V, o_v, m_v)
    b_s = mm(b_q, tl.trans(b_k), DOT, PREC)
    b_o = mm(b_q, b_h, DOT, PREC)
    b_o, b_s = out_terms(b_o, b_s, G, i_b, i_h, T, H, o_t, t_t, m_t, o_i, m_i, tok_i, NH, USE_G)
    b_u = load_rows(U + i_bh * N * V, n_i, m_i, V, o_v, m_v)
    b_o += mm(b_s, b_u, DOT, PREC)
    store_rows(O + i_h * V, b_o, i_b * T + t_t, m_t, H * V, o_v, m_v)


def launch_config(q: Tensor, k: Tensor, v: Tensor, dual: bool = False) -> dict:
    """Sizes and constexprs shared by the forward and backward launches (``dual``: of the tangent kernels);
    ``NG`` chunk groups of ``CG`` chunks for the chunk scans (:meth:`Tuning.groups`)."""
    B, T, H, K = q.shape
    n_h, V = k.shape[2], v.shape[-1]
    ct = chunk_tokens(n_h)
    dot, prec = dot_config(q.dtype)
    bk, bv = max(16, next_pow2(K)), max(16, next_pow2(V))
    split = TUNING.on("scan_split", q.dtype) and bk > 64
    bvs = min(bv, TUNING.scan_cols(q.dtype, dual))
    nc = cdiv(T, ct)
    cg = cdiv(nc, TUNING.groups(cdiv(V, bvs) * B * H, nc))
    return dict(B=B, T=T, H=H, K=K, V=V, NH=n_h, N=T * n_h, CT=ct, NC=nc, NG=cdiv(nc, cg), CG=cg,
                BT=BLOCK_STEPS, BQ=max(16, next_pow2(ct)), BK=bk, BKS=bk // 2 if split else bk,
                SPLIT=split, BVP=bv, BKB=min(bk, TUNING.tile(q.dtype)), BVB=min(bv, TUNING.tile(q.dtype)), BVS=bvs,
                DOT=dot, PREC=prec, INTERPRET=interpreting())


def launch_scan(kernel, c: dict, bv: int, *args, summary: dict | None = None, **kwargs) -> None:
    """A chunk scan over ``c["NG"]`` groups of ``c["CG"]`` chunks, ``bv`` value columns per program: with more
    than one group, first its summary pass (``SUMMARY``, on ``V + K`` columns, one program column per group but
    the last, or the first for a reverse scan; ``summary``: constexprs that differ there) into a float32 buffer,
    then the scan pass, whose programs start from it (:func:`~kernels.delta_product.common.group_start`).
    The kernel takes ``Sum, CG, NG`` (the summaries, chunks per group, groups) and ``BV``, ``SUMMARY``, ``GROUPED``
    (more than one group), ``PREC_C`` (the summaries' matmul precision) from here."""
    BH, K, V, ng, cg = c["B"] * c["H"], c["K"], c["V"], c["NG"], c["CG"]
    prec_c = dot_config(torch.float32)[1]
    sums = args[0]  # not read with one group
    if ng > 1:
        sums = alloc(ng - 1, BH, K, K + V, device=args[0].device, dtype=torch.float32)
        launch(kernel, (cdiv(K + V, bv), BH, ng - 1), *args, Sum=sums, CG=cg, NG=ng, BV=bv, SUMMARY=True,
               GROUPED=True, PREC_C=prec_c, **{**kwargs, **(summary or {})})
    launch(kernel, (cdiv(V, bv), BH, ng), *args, Sum=sums, CG=cg, NG=ng, BV=bv, SUMMARY=False, GROUPED=ng > 1,
           PREC_C=prec_c, **kwargs)


def chunk_fwd(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, G: Tensor | None, h0: Tensor | None,
              scale: float, output_final_state: bool) -> tuple[Tensor, Tensor | None, tuple[Tensor, ...]]:
    """Run the three forward kernels.

    Args:
        q ``[B, T, H, K]``, k ``[B, T, n_h, H, K]``, v ``[B, T, n_h, H, V]`` (contiguous, one dtype);
        beta ``[B, T, n_h, H]`` float32; G chunk-local cumulative log gate ``[B, T, H]`` float32 or None;
        h0 ``[B, H, K, V]`` float32 or None.

    Returns:
        ``(o, final_state or None, saved)``, ``saved = (Ti, W, Hs, U)`` for the backward.
    """
    c = launch_config(q, k, v)
    B, T, H, K, V, N, NC, BT = c["B"], c["T"], c["H"], c["K"], c["V"], c["N"], c["NC"], c["BT"]
    common = dict(H=H, K=K, V=V, NH=c["NH"], CT=c["CT"], BT=BT, DOT=c["DOT"], PREC=c["PREC"])
    dev, st = q.device, q.dtype
    use_g = G is not None
    gp = G if use_g else beta
    Ti = alloc(B, H, N, BT, device=dev, dtype=torch.float32)
    W = alloc(B, H, N, K, device=dev, dtype=st)
    U0 = alloc(B, H, N, V, device=dev, dtype=st)
    tp = TUNING.kernel_tile("prep", q.dtype)
    launch(prep_kernel, (NC, B * H), k, v, beta, gp, Ti, W, U0, T, N, BKB=min(c["BK"], tp), BVB=min(c["BVP"], tp),
           USE_G=use_g, PREC_T="ieee" if c["INTERPRET"] else TUNING.prec_inverse, INV_TILES=TUNING.inverse == "tiles",
           num_warps=TUNING.prep_warps(q.dtype), **common)
    Hs = alloc(B, H, NC, K, V, device=dev, dtype=st)
    U = alloc(B, H, N, V, device=dev, dtype=st)
    ht = alloc(B, H, K, V, device=dev, dtype=torch.float32) if output_final_state else None
    o = alloc(B, T, H, V, device=dev, dtype=q.dtype)
    bv_fused = min(c["BVP"], TUNING.bv_fused)
    fuse = TUNING.fuses_out(q.dtype, cdiv(V, bv_fused) * B * H * c["NG"])
    launch_scan(scan_h_kernel, c, bv_fused if fuse else c["BVS"], k, q, gp, W, U0, h0 if h0 is not None else W, Hs,
                U, o, ht if ht is not None else W, scale, T, N, NC, summary=dict(FUSE_OUT=False), BQ=c["BQ"],
                BK=c["BKS"], SPLIT=c["SPLIT"], USE_G=use_g, FUSE_OUT=fuse, USE_H0=int(h0 is not None),
                STORE_HT=int(ht is not None), INTERPRET=c["INTERPRET"], num_warps=TUNING.warps_scan,
                max_stages=TUNING.stages_scan, **common)
    if not fuse:
        launch(out_kernel, (cdiv(V, c["BVB"]), NC, B * H), q, k, gp, Hs, U, o, scale, T, N, NC, BQ=c["BQ"],
               BK=c["BK"], BV=c["BVB"], USE_G=use_g, num_warps=TUNING.warps_out, **common)
    return o, ht, (Ti, W, Hs, U)
