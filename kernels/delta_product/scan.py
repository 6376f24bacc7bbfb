"""The one sequential primitive: a low-rank linear scan over chunks, differentiable to any order.

    forward  (``reverse=False``):  H_0 = h0,  H_{c+1} = a_c H_c + X_cᵀ (B_c − Y_c H_c) + C_c,  c = 0..N−1
    reverse  (``reverse=True``):   H_N = h0,  H_c     = a_c H_{c+1} + X_cᵀ (B_c − Y_c H_{c+1}) + C_c

with ``a_c`` a scalar, ``X_c, Y_c ∈ R^{L×K}``, ``B_c ∈ R^{L×V}``, ``C_c, H_c ∈ R^{K×V}`` (``B``,
``C``, ``h0`` optional, 0 when absent). The transition ``h ↦ a h − Xᵀ(Y h)`` is the identity
scaled plus a rank-``L`` term; it is never formed as a ``K×K`` matrix. Write ``h_c`` for the state
step ``c`` reads (``H_c`` forward, ``H_{c+1}`` reverse), ``λ`` for the adjoint state and ``λ'_c``
for the adjoint of the state step ``c`` writes. The scan is linear in ``(B, C, h0)`` and bilinear
in ``((a, X, Y), H)``, so

* its adjoint is the same scan in the other direction with ``X`` and ``Y`` swapped (the transpose
  of ``h ↦ a h − Xᵀ Y h`` is ``λ ↦ a λ − Yᵀ X λ``), no ``B`` and ``C`` = the output cotangents
  ``dH``; then ``dC_c = λ'_c``, ``dB_c = X_c λ'_c``, ``dX_c = (B_c − Y_c h_c) λ'_cᵀ``,
  ``dY_c = −dB_c h_cᵀ``, ``da_c = ⟨λ'_c, h_c⟩``, ``dh0 = λ_0`` (``λ_N`` reverse);
* its tangent is the same scan with ``B'_c = Ḃ_c − Ẏ_c h_c``,
  ``C'_c = ȧ_c h_c + Ẋ_cᵀ (B_c − Y_c h_c) + Ċ_c`` and start ``ḣ0``.

Both are written with :class:`LowRankChunkScan` itself and batched matmuls, so backward of
backward and forward-over-reverse come out of the same kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.delta_product.common import dot
from kernels.delta_product.launch import launch
from kernels.delta_product.utils import alloc, cdiv, dot_config, interpreting, next_pow2


@triton.jit
def _tile(ptr, r, c, R, C, BR: tl.constexpr, BC: tl.constexpr, TRANSPOSE: tl.constexpr):
    """Block ``(r, c)`` (``BR×BC``) of ``M`` or, with ``TRANSPOSE``, of ``Mᵀ``, for a row-major
    ``R×C`` matrix ``M`` at ``ptr`` (zero outside it)."""
    o_r = r * BR + tl.arange(0, BR)
    o_c = c * BC + tl.arange(0, BC)
    if TRANSPOSE:
        return tl.load(ptr + o_c[None, :] * C + o_r[:, None], mask=(o_r[:, None] < C) & (o_c[None, :] < R),
                       other=0.0)
    return tl.load(ptr + o_r[:, None] * C + o_c[None, :], mask=(o_r[:, None] < R) & (o_c[None, :] < C), other=0.0)


@triton.jit
def _load_rows(ptr, r, o_v, m_v, R, V, BR: tl.constexpr):
    """Rows ``[r·BR, (r+1)·BR)`` and columns ``o_v`` of a row-major ``R×V`` matrix (zero outside)."""
    o_r = r * BR + tl.arange(0, BR)
    return tl.load(ptr + o_r[:, None] * V + o_v[None, :], mask=(o_r[:, None] < R) & m_v[None, :], other=0.0)


@triton.jit
def _store_rows(ptr, x, r, o_v, m_v, R, V, BR: tl.constexpr):
    """Store ``x`` at the block of :func:`_load_rows`."""
    o_r = r * BR + tl.arange(0, BR)
    tl.store(ptr + o_r[:, None] * V + o_v[None, :], x, mask=(o_r[:, None] < R) & m_v[None, :])


@triton.jit
def _store_state(ptr, h0, h1, h2, h3, o_v, m_v, K, V, BKT: tl.constexpr, NKB: tl.constexpr):
    _store_rows(ptr, h0, 0, o_v, m_v, K, V, BKT)
    if NKB > 1:
        _store_rows(ptr, h1, 1, o_v, m_v, K, V, BKT)
    if NKB > 2:
        _store_rows(ptr, h2, 2, o_v, m_v, K, V, BKT)
    if NKB > 3:
        _store_rows(ptr, h3, 3, o_v, m_v, K, V, BKT)


@triton.jit
def _load_state(ptr, o_v, m_v, K, V, BKT: tl.constexpr, NKB: tl.constexpr, ACC: tl.constexpr):
    """The ``NKB`` row blocks of a ``K×V`` state (unused blocks repeat the first)."""
    h0 = _load_rows(ptr, 0, o_v, m_v, K, V, BKT).to(ACC)
    h1 = h0
    h2 = h0
    h3 = h0
    if NKB > 1:
        h1 = _load_rows(ptr, 1, o_v, m_v, K, V, BKT).to(ACC)
    if NKB > 2:
        h2 = _load_rows(ptr, 2, o_v, m_v, K, V, BKT).to(ACC)
    if NKB > 3:
        h3 = _load_rows(ptr, 3, o_v, m_v, K, V, BKT).to(ACC)
    return h0, h1, h2, h3


@triton.jit
def _dot(ptr, r, c, R, C, rhs, BR: tl.constexpr, BC: tl.constexpr, TRANSPOSE: tl.constexpr,
         PREC: tl.constexpr, ACC: tl.constexpr):
    """``op(M)[r, c] @ rhs`` for the block of :func:`_tile`."""
    return dot(_tile(ptr, r, c, R, C, BR, BC, TRANSPOSE), rhs, PREC, ACC)


@triton.jit
def _residual_rows(y_ptr, b_ptr, l, h0, h1, h2, h3, o_v, m_v, K, V, L, BL: tl.constexpr, BKT: tl.constexpr,
                   NKB: tl.constexpr, HAS_B: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """Row block ``l`` of ``B − Y h`` (``[BL, BV]``)."""
    acc = -_dot(y_ptr, l, 0, L, K, h0, BL, BKT, False, PREC, ACC)
    if NKB > 1:
        acc -= _dot(y_ptr, l, 1, L, K, h1, BL, BKT, False, PREC, ACC)
    if NKB > 2:
        acc -= _dot(y_ptr, l, 2, L, K, h2, BL, BKT, False, PREC, ACC)
    if NKB > 3:
        acc -= _dot(y_ptr, l, 3, L, K, h3, BL, BKT, False, PREC, ACC)
    if HAS_B:
        acc += _load_rows(b_ptr, l, o_v, m_v, L, V, BL).to(ACC)
    return acc


@triton.jit
def _scaled_plus(a, h, c_ptr, r, o_v, m_v, K, V, BKT: tl.constexpr, HAS_C: tl.constexpr, ACC: tl.constexpr):
    """Row block ``r`` of ``a h + C``."""
    n = a * h
    if HAS_C:
        n += _load_rows(c_ptr, r, o_v, m_v, K, V, BKT).to(ACC)
    return n


@triton.jit
def _scan_step(a_ptr, x_ptr, y_ptr, b_ptr, c_ptr, h0, h1, h2, h3, o_v, m_v, K, V, L,
               BL: tl.constexpr, NLB: tl.constexpr, BKT: tl.constexpr, NKB: tl.constexpr,
               HAS_B: tl.constexpr, HAS_C: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """The state tiles of ``a h + Xᵀ (B − Y h) + C``, ``BL`` rows of ``X, Y, B`` at a time."""
    a = tl.load(a_ptr).to(ACC)
    n0 = _scaled_plus(a, h0, c_ptr, 0, o_v, m_v, K, V, BKT, HAS_C, ACC)
    n1 = n0
    n2 = n0
    n3 = n0
    if NKB > 1:
        n1 = _scaled_plus(a, h1, c_ptr, 1, o_v, m_v, K, V, BKT, HAS_C, ACC)
    if NKB > 2:
        n2 = _scaled_plus(a, h2, c_ptr, 2, o_v, m_v, K, V, BKT, HAS_C, ACC)
    if NKB > 3:
        n3 = _scaled_plus(a, h3, c_ptr, 3, o_v, m_v, K, V, BKT, HAS_C, ACC)
    for l in tl.static_range(NLB):
        res = _residual_rows(y_ptr, b_ptr, l, h0, h1, h2, h3, o_v, m_v, K, V, L, BL, BKT, NKB, HAS_B, PREC, ACC)
        n0 += _dot(x_ptr, 0, l, L, K, res, BKT, BL, True, PREC, ACC)
        if NKB > 1:
            n1 += _dot(x_ptr, 1, l, L, K, res, BKT, BL, True, PREC, ACC)
        if NKB > 2:
            n2 += _dot(x_ptr, 2, l, L, K, res, BKT, BL, True, PREC, ACC)
        if NKB > 3:
            n3 += _dot(x_ptr, 3, l, L, K, res, BKT, BL, True, PREC, ACC)
    return n0, n1, n2, n3


@triton.jit
def _chunk(A, X, Y, Bm, C, Hs, i_bh, c, dst, h0, h1, h2, h3, o_v, m_v, s_a_bh, s_a_c, s_x_bh, s_x_c, s_y_bh,
           s_y_c, s_b_bh, s_b_c, s_c_bh, s_c_c, s_h_bh, s_h_c, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
           BL: tl.constexpr, NLB: tl.constexpr, BKT: tl.constexpr, NKB: tl.constexpr, HAS_B: tl.constexpr,
           HAS_C: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """Step ``c``: ``H[dst] = a_c h + X_cᵀ (B_c − Y_c h) + C_c``; returns the new state tiles."""
    n0, n1, n2, n3 = _scan_step(A + i_bh * s_a_bh + c * s_a_c, X + i_bh * s_x_bh + c * s_x_c,
                                Y + i_bh * s_y_bh + c * s_y_c, Bm + i_bh * s_b_bh + c * s_b_c,
                                C + i_bh * s_c_bh + c * s_c_c, h0, h1, h2, h3, o_v, m_v, K, V, L,
                                BL, NLB, BKT, NKB, HAS_B, HAS_C, PREC, ACC)
    _store_state(Hs + i_bh * s_h_bh + dst * s_h_c, n0, n1, n2, n3, o_v, m_v, K, V, BKT, NKB)
    return n0, n1, n2, n3


@triton.jit(do_not_specialize=["NC"])
def chunk_scan_kernel(A, X, Y, Bm, C, H0, Hs, NC, s_a_bh, s_a_c, s_x_bh, s_x_c, s_y_bh, s_y_c, s_b_bh, s_b_c,
                      s_c_bh, s_c_c, s_0_bh, s_h_bh, s_h_c, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
                      BL: tl.constexpr, NLB: tl.constexpr, BKT: tl.constexpr, NKB: tl.constexpr, BV: tl.constexpr,
                      HAS_B: tl.constexpr, HAS_C: tl.constexpr, REVERSE: tl.constexpr, PREC: tl.constexpr,
                      ACC: tl.constexpr, INTERPRET: tl.constexpr):
    """One program per (value block, batch·head); the state lives in ``NKB`` register tiles of
    ``BKT`` rows, ``X, Y, B`` are read ``BL`` rows at a time."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    h0, h1, h2, h3 = _load_state(H0 + i_bh * s_0_bh, o_v, m_v, K, V, BKT, NKB, ACC)
    first = NC if REVERSE else 0
    _store_state(Hs + i_bh * s_h_bh + first * s_h_c, h0, h1, h2, h3, o_v, m_v, K, V, BKT, NKB)
    if INTERPRET:  # the interpreter cannot loop over a run-time bound with numpy >= 2.4
        it = 0
        while it < NC:
            c = NC - 1 - it if REVERSE else it
            h0, h1, h2, h3 = _chunk(A, X, Y, Bm, C, Hs, i_bh, c, c if REVERSE else c + 1, h0, h1, h2, h3, o_v, m_v,
                                    s_a_bh, s_a_c, s_x_bh, s_x_c, s_y_bh, s_y_c, s_b_bh, s_b_c, s_c_bh, s_c_c,
                                    s_h_bh, s_h_c, K, V, L, BL, NLB, BKT, NKB, HAS_B, HAS_C, PREC, ACC)
            it += 1
    else:
        for it in range(NC):
            c = NC - 1 - it if REVERSE else it
            h0, h1, h2, h3 = _chunk(A, X, Y, Bm, C, Hs, i_bh, c, c if REVERSE else c + 1, h0, h1, h2, h3, o_v, m_v,
                                    s_a_bh, s_a_c, s_x_bh, s_x_c, s_y_bh, s_y_c, s_b_bh, s_b_c, s_c_bh, s_c_c,
                                    s_h_bh, s_h_c, K, V, L, BL, NLB, BKT, NKB, HAS_B, HAS_C, PREC, ACC)


def _rowmajor(x: Tensor) -> Tensor:
    """``x`` with contiguous trailing 2-D blocks (strides of the leading dims free)."""
    return x if x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] else x.contiguous()


def _strides(x: Tensor | None) -> tuple[int, int]:
    return (x.stride(0), x.stride(1)) if x is not None else (0, 0)


def _scan(a: Tensor, X: Tensor, Y: Tensor, Bm: Tensor | None, h0: Tensor, C: Tensor | None,
          reverse: bool) -> Tensor:
    BH, NC, L, K = X.shape
    V = h0.shape[-1]
    dt = X.dtype
    X, Y, h0 = _rowmajor(X), _rowmajor(Y.to(dt)), _rowmajor(h0.to(dt))
    a = a.to(dt)
    Bm = _rowmajor(Bm.to(dt)) if Bm is not None else None
    C = _rowmajor(C.to(dt)) if C is not None else None
    Hs = alloc(BH, NC + 1, K, V, device=X.device, dtype=dt)
    bkt = max(16, min(64, next_pow2(K)))
    bl = max(16, min(64, next_pow2(L)))
    bv = max(16, min(32, next_pow2(V)))
    _, prec = dot_config(dt)
    acc = tl.float64 if dt == torch.float64 else tl.float32
    launch(chunk_scan_kernel, (cdiv(V, bv), BH), a, X, Y, Bm if Bm is not None else X,
           C if C is not None else X, h0, Hs, NC, *_strides(a), *_strides(X), *_strides(Y), *_strides(Bm),
           *_strides(C), h0.stride(0), Hs.stride(0), Hs.stride(1), K=K, V=V, L=L, BL=bl, NLB=cdiv(L, bl),
           BKT=bkt, NKB=cdiv(K, bkt), BV=bv, HAS_B=Bm is not None, HAS_C=C is not None, REVERSE=reverse,
           PREC=prec, ACC=acc, INTERPRET=interpreting(), num_warps=4)
    return Hs


def _plus(x: Tensor | None, y: Tensor) -> Tensor:
    return y if x is None else x + y


def _saved(ctx) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor, Tensor]:
    """Saved ``a, X, Y, B, H`` and the states the steps read (``h_c``: ``H_c``, or ``H_{c+1}`` reverse)."""
    a, X, Y, Bm, H = ctx.saved_tensors
    return a, X, Y, Bm, H, (H[:, 1:] if ctx.reverse else H[:, :-1])


def _resid(Y: Tensor, Bm: Tensor | None, h: Tensor) -> Tensor:
    """``B_c − Y_c h_c`` for all chunks."""
    return _plus(Bm, -(Y @ h))


class LowRankChunkScan(torch.autograd.Function):
    """``H = scan(a, X, Y, B, h0, C)``: ``a [BH, N]``, ``X, Y [BH, N, L, K]``, ``B [BH, N, L, V]`` or
    None, ``h0 [BH, K, V]``, ``C [BH, N, K, V]`` or None → ``H [BH, N+1, K, V]`` (all states,
    ``h0`` included), float32 or float64 (the dtype of ``X``)."""

    @staticmethod
    def forward(a: Tensor, X: Tensor, Y: Tensor, Bm: Tensor | None, h0: Tensor, C: Tensor | None,
                reverse: bool) -> Tensor:
        return _scan(a, X, Y, Bm, h0, C, reverse)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, X, Y, Bm, _, _, reverse = inputs
        ctx.reverse = reverse
        ctx.save_for_backward(a, X, Y, Bm, output)
        ctx.save_for_forward(a, X, Y, Bm, output)

    @staticmethod
    def backward(ctx, dH: Tensor):
        a, X, Y, Bm, _, h = _saved(ctx)
        n, r = X.shape[1], ctx.reverse
        if r:
            lam = LowRankChunkScan.apply(a, Y, X, None, dH[:, 0], dH[:, 1:], False)
            lam_out, dh0 = lam[:, :n], lam[:, n]
        else:
            lam = LowRankChunkScan.apply(a, Y, X, None, dH[:, n], dH[:, :n], True)
            lam_out, dh0 = lam[:, 1:], lam[:, 0]
        need_a, need_x, need_y, need_b, need_h0, need_c = ctx.needs_input_grad[:6]
        da = (lam_out * h).sum((-2, -1)) if need_a else None
        dX = _resid(Y, Bm, h) @ lam_out.transpose(-1, -2) if need_x else None
        dB = X @ lam_out if need_b or need_y else None
        dY = -(dB @ h.transpose(-1, -2)) if need_y else None
        return (da, dX, dY, dB if need_b else None, dh0 if need_h0 else None, lam_out if need_c else None,
                None)

    @staticmethod
    def jvp(ctx, da: Tensor | None, dX: Tensor | None, dY: Tensor | None, dB: Tensor | None,
            dh0: Tensor | None, dC: Tensor | None, _r) -> Tensor:
        a, X, Y, Bm, H, h = _saved(ctx)
        inj = dC
        if da is not None:
            inj = _plus(inj, da[..., None, None] * h)
        if dX is not None:
            inj = _plus(inj, dX.transpose(-1, -2) @ _resid(Y, Bm, h))
        b = dB
        if dY is not None:
            b = _plus(b, -(dY @ h))
        start = torch.zeros_like(H[:, 0]) if dh0 is None else dh0
        return LowRankChunkScan.apply(a, X, Y, b, start, inj, ctx.reverse)


def _check_scan_args(a, X, Y, Bm, h0, C) -> None:
    """``ValueError`` naming the argument whose shape, dtype or device disagrees with ``X``."""
    if X.dim() != 4 or X.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"chunk_scan: `X` must be a float32 or float64 [BH, N, L, K] tensor, got {X.dtype} "
                         f"{tuple(X.shape)}")
    BH, N, L, K = X.shape
    V = next((t.shape[-1] for t in (Bm, h0, C) if t is not None), None)
    expected = {"a": (BH, N), "Y": (BH, N, L, K), "Bm": (BH, N, L, V), "h0": (BH, K, V), "C": (BH, N, K, V)}
    for name, t in (("a", a), ("Y", Y), ("Bm", Bm), ("h0", h0), ("C", C)):
        if t is None:
            continue
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"chunk_scan: `{name}` must have shape {expected[name]} (from `X` {tuple(X.shape)}"
                             f"{'' if name in ('a', 'Y') else f' and V = {V}'}), got {tuple(t.shape)}")
        if t.dtype != X.dtype or t.device != X.device:
            raise ValueError(f"chunk_scan: `{name}` must be {X.dtype} on {X.device} like `X`, got {t.dtype} "
                             f"on {t.device}")


def chunk_scan(a: Tensor | None, X: Tensor, Y: Tensor, Bm: Tensor | None, h0: Tensor | None,
               C: Tensor | None = None, reverse: bool = False) -> Tensor:
    """All states of ``H_{c+1} = a_c H_c + X_cᵀ (B_c − Y_c H_c) + C_c`` (see the module docstring).

    Args:
        a: ``[BH, N]`` per-chunk scalars, or None for 1.
        X, Y: ``[BH, N, L, K]``; their dtype (float32 or float64) is the scan's.
        Bm: ``[BH, N, L, V]`` or None for 0.
        h0: ``[BH, K, V]`` first state (``H_N`` for ``reverse``), or None for 0.
        C: ``[BH, N, K, V]`` dense injections, or None for 0.
        reverse: run from ``c = N−1`` down to 0.

    Returns:
        ``H [BH, N+1, K, V]``, ``h0`` included; differentiable to any order (backward and ``jvp``).

    Raises:
        ValueError: naming the argument whose shape, dtype or device disagrees with ``X``, or when
            ``h0``, ``Bm`` and ``C`` are all None.
    """
    _check_scan_args(a, X, Y, Bm, h0, C)
    BH, N, _, K = X.shape
    if a is None:
        a = torch.ones(BH, N, dtype=X.dtype, device=X.device)
    if h0 is None:
        like = Bm if Bm is not None else C
        if like is None:
            raise ValueError("chunk_scan: with neither `Bm` nor `C`, `h0` sets the value dim and must be given")
        h0 = torch.zeros(BH, K, like.shape[-1], dtype=X.dtype, device=X.device)
    return LowRankChunkScan.apply(a, X, Y, Bm, h0, C, reverse)
