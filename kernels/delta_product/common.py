"""Triton helpers shared by the fused forward and backward kernels.

Index conventions (one program: chunk ``i_c`` of batch ``i_b``, head ``i_h``): local micro-steps
``o_i ∈ [0, BT)``, real when ``o_i < L = CT·NH`` and the global step ``n_i = i_c·L + o_i < N``;
local tokens ``o_t ∈ [0, BQ)``, real when ``o_t < CT`` and ``t = i_c·CT + o_t < T``. Inputs keep
their ``[B, T(·n_h), H, D]`` layout; intermediates are head-major ``[B, H, N, D]``.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def steps(i_c, N, NH: tl.constexpr, CT: tl.constexpr, BT: tl.constexpr):
    """Local step offsets, global step indices, validity, and token of each step."""
    o_i = tl.arange(0, BT)
    n_i = i_c * (CT * NH) + o_i
    m_i = (o_i < CT * NH) & (n_i < N)
    tok_i = i_c * CT + o_i // NH
    return o_i, n_i, m_i, tok_i


@triton.jit
def scan_program(H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """A chunk-scan program's batch, head, ``batch·head`` and its ``[BK, BV]`` state tile: key
    offsets and validity, value offsets (block ``program_id(0)``) and validity."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    return i_bh // H, i_bh % H, i_bh, o_k, o_k < K, o_v, o_v < V


@triton.jit
def tokens(i_c, T, CT: tl.constexpr, BQ: tl.constexpr):
    """Local token offsets, global token indices and validity."""
    o_t = tl.arange(0, BQ)
    t_t = i_c * CT + o_t
    m_t = (o_t < CT) & (t_t < T)
    return o_t, t_t, m_t


@triton.jit
def load_rows(ptr, rows, m_rows, row_stride, cols, m_cols):
    """``ptr[rows[:, None] * row_stride + cols[None, :]]`` (zero where masked), as float32."""
    p = ptr + rows[:, None] * row_stride + cols[None, :]
    return tl.load(p, mask=m_rows[:, None] & m_cols[None, :], other=0.0).to(tl.float32)


@triton.jit
def load_tile(ptr, rows, m_rows, row_stride, cols, m_cols):
    """:func:`load_rows` in the pointer's dtype, for a tile read only as matmul operands: a 16-bit tile then
    reaches the tensor cores (transposed or not) through shared memory, prefetched by the software pipeline,
    with no float32 round trip (scale the other operand or the product instead of the tile). Not for a tile
    also read elementwise: in a pipelined loop such a tile gave wrong sums on an H100 with Triton 3.6."""
    p = ptr + rows[:, None] * row_stride + cols[None, :]
    return tl.load(p, mask=m_rows[:, None] & m_cols[None, :], other=0.0)


@triton.jit
def load_operand(ptr, rows, m_rows, row_stride, cols, m_cols, WIDE: tl.constexpr):
    """:func:`load_rows` when ``WIDE`` (a tile that some compile-time branch also reads elementwise, or a kernel
    kept on float32 tiles), else :func:`load_tile`."""
    if WIDE:
        return load_rows(ptr, rows, m_rows, row_stride, cols, m_cols)
    else:
        return load_tile(ptr, rows, m_rows, row_stride, cols, m_cols)


@triton.jit
def store_rows(ptr, x, rows, m_rows, row_stride, cols, m_cols):
    """Store ``x`` at ``ptr[rows[:, None] * row_stride + cols[None, :]]`` in the pointer's dtype."""
    p = ptr + rows[:, None] * row_stride + cols[None, :]
    tl.store(p, x.to(p.dtype.element_ty), mask=m_rows[:, None] & m_cols[None, :])


@triton.jit
def store_state(ptr, b_h, b_h2, o_k, m_k, K: tl.constexpr, V: tl.constexpr, o_v, m_v, BK: tl.constexpr,
                SPLIT: tl.constexpr):
    """Store the rows ``o_k`` (``b_h``) and, with ``SPLIT``, ``o_k + BK`` (``b_h2``) of a ``K × V`` state at ``ptr``."""
    store_rows(ptr, b_h, o_k, m_k, V, o_v, m_v)
    if SPLIT:
        store_rows(ptr, b_h2, o_k + BK, o_k + BK < K, V, o_v, m_v)


@triton.jit
def tf32_low(x):
    """``x − ⌊x⌋₁₉``: what the tensor cores drop when they read the float32 ``x`` as TF32 (its 13 low mantissa
    bits; exact in float32)."""
    return x - (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def dot_tf32x3t(a, b):
    """``a @ b`` in three TF32 passes on a truncation split, ``a_lo b + a b_lo + a b`` with
    ``x_lo = x − ⌊x⌋₁₉`` (:func:`tf32_low`): the tensor cores read ``a`` and ``b`` as they are, so only the low parts
    are formed in registers, where ``tf32x3`` rounds both halves of both operands. The dropped ``a_lo b_lo`` and the
    truncated low parts leave a relative error of at most ``3·2⁻²⁰`` per product, against ``1.25·2⁻²⁰``."""
    a = a.to(tl.float32)
    b = b.to(tl.float32)
    acc = tl.dot(tf32_low(a), b, input_precision="tf32")
    acc = tl.dot(a, tf32_low(b), acc, input_precision="tf32")
    return tl.dot(a, b, acc, input_precision="tf32")


@triton.jit
def dot(a, b, PREC: tl.constexpr, ACC: tl.constexpr = tl.float32):
    """``a @ b`` at ``input_precision = PREC``, accumulated in ``ACC`` (``PREC = "tf32x3t"``: :func:`dot_tf32x3t`)."""
    if PREC == "tf32x3t":
        out = dot_tf32x3t(a, b)
    else:
        out = tl.dot(a, b, input_precision=PREC, out_dtype=ACC)
    return out


@triton.jit
def mm(a, b, DOT: tl.constexpr, PREC: tl.constexpr):
    """``a @ b`` with operands cast to ``DOT`` and float32 accumulation (:func:`dot`)."""
    return dot(a.to(DOT), b.to(DOT), PREC)


@triton.jit
def causal_mask(o_t, m_t, o_i, m_i, NH: tl.constexpr):
    """``[BQ, BT]``: step ``i`` is at or before the last micro-step of token ``t``."""
    return (o_i[None, :] <= (o_t * NH + NH - 1)[:, None]) & m_t[:, None] & m_i[None, :]


@triton.jit
def local_scores(b_s, G, i_b, i_h, T, H, o_t, t_t, m_t, o_i, m_i, tok_i, NH: tl.constexpr, USE_G: tl.constexpr):
    """``Q Kᵀ ⊙ M`` from ``b_s = Q Kᵀ`` (token rows, micro-step columns), ``M_ti = e^{Gq_t − G_i}[i ≤ last(t)]``."""
    m_s = causal_mask(o_t, m_t, o_i, m_i, NH)
    if USE_G:
        g_t = tl.load(G + (i_b * T + t_t) * H + i_h, mask=m_t, other=0.0)
        g_i = tl.load(G + (i_b * T + tok_i) * H + i_h, mask=m_i, other=0.0)
        b_s = b_s * masked_exp(g_t[:, None] - g_i[None, :], m_s)
    return tl.where(m_s, b_s, 0.0)


@triton.jit
def masked_exp(x, m):
    """``exp(x)`` where ``m``, else 0 (the exponent is zeroed first, so no overflow)."""
    return tl.where(m, tl.exp(tl.where(m, x, 0.0)), 0.0)


@triton.jit
def chunk_gate_end(G, i_b, i_c, i_h, T, H, CT: tl.constexpr):
    """``G`` at the last real token of chunk ``i_c``."""
    t_end = tl.minimum(i_c * CT + CT, T) - 1
    return tl.load(G + (i_b * T + t_end) * H + i_h)


@triton.jit
def unit_lower_inverse(b_A, o_i, BT: tl.constexpr, BS: tl.constexpr, PREC: tl.constexpr):
    """``(I + A)⁻¹`` for a strictly lower ``A [BT, BT]`` (float32).

    The ``BS×BS`` diagonal blocks are inverted together by forward substitution (their rows
    ``i, i+BS, …`` share one packed vector since the blocks occupy disjoint columns), then the
    block rows by block forward substitution ``T_bc = −D_b⁻¹ Σ_{j<b} A_bj T_jc`` (two matmuls
    per block row): the stable order of a triangular solve, in ``BS + BT/BS`` steps, not ``BT``.
    """
    blk = o_i // BS
    same = blk[:, None] == blk[None, :]
    a_bd = tl.where(same, b_A, 0.0)
    b_d = tl.zeros([BT, BT], dtype=tl.float32)
    for i in range(1, BS):
        rows = (o_i % BS) == i
        a_i = tl.sum(tl.where(rows[:, None], a_bd, 0.0), 0)
        t_i = -a_i - tl.sum(a_i[:, None] * b_d, 0)
        b_d = tl.where(rows[:, None] & same, t_i[None, :], b_d)
    b_d += (o_i[:, None] == o_i[None, :]).to(tl.float32)
    b_T = b_d
    for b in range(1, BT // BS):
        off = (blk == b)[:, None] & (blk[None, :] < b)
        b_x = tl.dot(tl.where(off, b_A, 0.0), b_T, input_precision=PREC)
        b_T = tl.where(off, -tl.dot(b_d, b_x, input_precision=PREC), b_T)
    return b_T


@triton.jit
def _tile_at(base, r: tl.constexpr, c: tl.constexpr, row0, N, L: tl.constexpr, BT: tl.constexpr):
    """Pointers and row mask of the 16×16 tile ``(r, c)`` of a chunk's ``[BT, BT]`` block stored
    row-major (row stride ``BT``) from global row ``row0``; rows past ``L`` or ``N`` are masked."""
    o = tl.arange(0, 16)
    n = row0 + r * 16 + o
    m = (r * 16 + o < L) & (n < N)
    return base + n[:, None] * BT + (c * 16 + o)[None, :], m[:, None]


@triton.jit
def _load_tile(base, r: tl.constexpr, c: tl.constexpr, row0, N, L: tl.constexpr, BT: tl.constexpr):
    p, m = _tile_at(base, r, c, row0, N, L, BT)
    return tl.load(p, mask=m, other=0.0)


@triton.jit
def _store_tile(base, x, r: tl.constexpr, c: tl.constexpr, row0, N, L: tl.constexpr, BT: tl.constexpr):
    p, m = _tile_at(base, r, c, row0, N, L, BT)
    tl.store(p, x, mask=m)


@triton.jit
def _neg_row(base, r: tl.constexpr, i, row0, N, L: tl.constexpr, BT: tl.constexpr):
    """``−A[i, :i]`` of the diagonal tile ``r`` (zero elsewhere)."""
    o = tl.arange(0, 16)
    n = row0 + r * 16 + i
    # every term a vector: Triton 3.9's interpreter rejects a vector & scalar-tensor mask
    m = (o < i) & (o * 0 + r * 16 + i < L) & (o * 0 + n < N)
    return -tl.load(base + n * BT + r * 16 + o, mask=m, other=0.0)


@triton.jit
def _sub_step(y, a, o, i):
    """Row ``i`` of ``(I + A)⁻¹ − I``: ``a + Σ_j a_j Y_j`` over the rows ``j < i`` already in ``y``."""
    a += tl.sum(a[:, None] * y, 0)
    return tl.where((o == i)[:, None], a[None, :], y)


@triton.jit
def unit_lower_inverse_tiles(base, row0, N, L: tl.constexpr, BT: tl.constexpr, PREC: tl.constexpr):
    """``(I + A)⁻¹`` in place, by 16×16 tiles, for ``A [64, 64]`` stored (float32, row stride
    ``BT = 64``) at rows ``row0 + [0, L)`` of ``base``; only the strictly lower part of ``A`` is read.

    The four diagonal tiles by forward substitution in one loop (rows of ``A`` read from memory,
    ``Y_i = −A_i + Σ_{j<i} (−A_ij) Y_j``), then the off-diagonal tiles by the block forward
    substitution ``X_bc = −D_b Σ_{c≤j<b} A_bj X_jc`` (``D_b`` the inverted diagonal tile, 16×16
    matmuls). Writes the ten lower tiles; the six upper ones are left as they are (zero for a
    strictly lower ``A``). The caller puts a barrier between storing ``A`` and this call, and
    between this call and reading the result.
    """
    tl.static_assert(BT == 64, "the tiled inverse is written for 64-step chunks")
    o = tl.arange(0, 16)
    strict = o[:, None] > o[None, :]
    y1 = -tl.where(strict, _load_tile(base, 0, 0, row0, N, L, BT), 0.0)
    y2 = -tl.where(strict, _load_tile(base, 1, 1, row0, N, L, BT), 0.0)
    y3 = -tl.where(strict, _load_tile(base, 2, 2, row0, N, L, BT), 0.0)
    y4 = -tl.where(strict, _load_tile(base, 3, 3, row0, N, L, BT), 0.0)
    a21 = _load_tile(base, 1, 0, row0, N, L, BT)
    a31 = _load_tile(base, 2, 0, row0, N, L, BT)
    a32 = _load_tile(base, 2, 1, row0, N, L, BT)
    a41 = _load_tile(base, 3, 0, row0, N, L, BT)
    a42 = _load_tile(base, 3, 1, row0, N, L, BT)
    a43 = _load_tile(base, 3, 2, row0, N, L, BT)
    for i in range(2, 16):
        y1 = _sub_step(y1, _neg_row(base, 0, i, row0, N, L, BT), o, i)
        y2 = _sub_step(y2, _neg_row(base, 1, i, row0, N, L, BT), o, i)
        y3 = _sub_step(y3, _neg_row(base, 2, i, row0, N, L, BT), o, i)
        y4 = _sub_step(y4, _neg_row(base, 3, i, row0, N, L, BT), o, i)
    eye = (o[:, None] == o[None, :]).to(tl.float32)
    d1, d2, d3, d4 = y1 + eye, y2 + eye, y3 + eye, y4 + eye
    x21 = -tl.dot(d2, tl.dot(a21, d1, input_precision=PREC), input_precision=PREC)
    x32 = -tl.dot(d3, tl.dot(a32, d2, input_precision=PREC), input_precision=PREC)
    x43 = -tl.dot(d4, tl.dot(a43, d3, input_precision=PREC), input_precision=PREC)
    x31 = -tl.dot(d3, tl.dot(a31, d1, input_precision=PREC) + tl.dot(a32, x21, input_precision=PREC),
                  input_precision=PREC)
    x42 = -tl.dot(d4, tl.dot(a42, d2, input_precision=PREC) + tl.dot(a43, x32, input_precision=PREC),
                  input_precision=PREC)
    x41 = -tl.dot(d4, tl.dot(a41, d1, input_precision=PREC) + tl.dot(a42, x21, input_precision=PREC)
                  + tl.dot(a43, x31, input_precision=PREC), input_precision=PREC)
    tl.debug_barrier()  # every read of A is done before the first write of the inverse
    _store_tile(base, d1, 0, 0, row0, N, L, BT)
    _store_tile(base, d2, 1, 1, row0, N, L, BT)
    _store_tile(base, d3, 2, 2, row0, N, L, BT)
    _store_tile(base, d4, 3, 3, row0, N, L, BT)
    _store_tile(base, x21, 1, 0, row0, N, L, BT)
    _store_tile(base, x31, 2, 0, row0, N, L, BT)
    _store_tile(base, x32, 2, 1, row0, N, L, BT)
    _store_tile(base, x41, 3, 0, row0, N, L, BT)
    _store_tile(base, x42, 3, 1, row0, N, L, BT)
    _store_tile(base, x43, 3, 2, row0, N, L, BT)


@triton.jit
def group_chunks(CG, NC, REVERSE: tl.constexpr, SUMMARY: tl.constexpr):
    """Chunk groups (``Tuning.scan_groups``): program ``(·, ·, i_g)`` scans the chunks ``[c0, c1)`` of group
    ``i_g``, or in the summary pass of a reverse scan (whose first group needs none) of group ``i_g + 1``."""
    i_g = tl.program_id(2)
    g = i_g
    if REVERSE and SUMMARY:
        g = i_g + 1
    c0 = g * CG
    return i_g, c0, tl.minimum(c0 + CG, NC)


@triton.jit
def _apply_summary(base, b_h, b_h2, o_k, m_k, o_v, m_v, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                   SPLIT: tl.constexpr, PREC: tl.constexpr):
    """``M h + S`` for a group's summary ``[S | M]`` (``K × (V + K)`` float32, row-major at ``base``) and the state
    rows ``o_k`` (``b_h``) and, with ``SPLIT``, ``o_k + BK`` (``b_h2``), in float32."""
    KV: tl.constexpr = K + V
    o_k2, m_k2 = o_k + BK, o_k + BK < K
    n = (load_rows(base, o_k, m_k, KV, o_v, m_v)
         + mm(load_rows(base, o_k, m_k, KV, V + o_k, m_k), b_h, tl.float32, PREC))
    n2 = b_h2
    if SPLIT:
        n += mm(load_rows(base, o_k, m_k, KV, V + o_k2, m_k2), b_h2, tl.float32, PREC)
        n2 = (load_rows(base, o_k2, m_k2, KV, o_v, m_v)
              + mm(load_rows(base, o_k2, m_k2, KV, V + o_k, m_k), b_h, tl.float32, PREC)
              + mm(load_rows(base, o_k2, m_k2, KV, V + o_k2, m_k2), b_h2, tl.float32, PREC))
    return n, n2


@triton.jit
def group_start(Sum, In, USE_IN, i_g, i_bh, NG, o_k, m_k, o_v, m_v, K: tl.constexpr, V: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, SPLIT: tl.constexpr, REVERSE: tl.constexpr, SUMMARY: tl.constexpr,
                GROUPED: tl.constexpr, PREC: tl.constexpr):
    """The state tiles (rows ``o_k`` and, with ``SPLIT``, ``o_k + BK``) a scan program's first chunk reads.

    A scan ``h ↦ A_c h + B_c`` over a group of chunks is ``h ↦ M h + S`` with ``M = Π A_c`` and ``S`` the group's
    scan from 0. The summary pass runs the scan itself on ``V + K`` columns from ``[0 | I]``: the columns past
    ``V`` read no injection (their loads are masked by ``o_v < V``), so the group ends at ``[S | M]``. The scan
    pass starts from ``In`` (the initial state forward, the final state's cotangent reverse; 0 unless ``USE_IN``)
    carried through the summaries of the groups before its own (after it, reverse), in order. Only a ``GROUPED``
    launch (more than one group) compiles that loop: its ``K × K`` float32 tiles made the ungrouped scans spill
    (at ``K = 128`` bf16 ``scan_h`` 16 → 664 bytes a thread, ``scan_dh`` 0 → 448)."""
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    b_h2 = tl.zeros([BK, BV], dtype=tl.float32)
    o_k2, m_k2 = o_k + BK, o_k + BK < K
    if SUMMARY:
        b_h = tl.where((o_k[:, None] == (o_v - V)[None, :]) & m_k[:, None], 1.0, 0.0)
        b_h2 = tl.where((o_k2[:, None] == (o_v - V)[None, :]) & m_k2[:, None], 1.0, 0.0)
    else:
        if USE_IN > 0:
            b_h += load_rows(In + i_bh * K * V, o_k, m_k, V, o_v, m_v)
            if SPLIT:
                b_h2 += load_rows(In + i_bh * K * V, o_k2, m_k2, V, o_v, m_v)
        if GROUPED:
            n = i_g
            if REVERSE:
                n = NG - 1 - i_g
            j = 0
            while j < n:
                s = j
                if REVERSE:
                    s = NG - 2 - j
                b_h, b_h2 = _apply_summary(Sum + (s * tl.num_programs(1) + i_bh) * K * (K + V), b_h, b_h2, o_k,
                                           m_k, o_v, m_v, K, V, BK, SPLIT, PREC)
                j += 1
    return b_h, b_h2


@triton.jit
def group_end(Sum, Out, STORE_OUT, b_h, b_h2, i_g, i_bh, NG, o_k, m_k, o_v, m_v, K: tl.constexpr, V: tl.constexpr,
              BK: tl.constexpr, SPLIT: tl.constexpr, REVERSE: tl.constexpr, SUMMARY: tl.constexpr):
    """The summary pass stores its group's ``[S | M]`` (see :func:`group_start`); the scan pass stores the state it
    ends at to ``Out`` when ``STORE_OUT``, from the last group (the first, reverse)."""
    o_k2, m_k2 = o_k + BK, o_k + BK < K
    if SUMMARY:
        base = Sum + (i_g * tl.num_programs(1) + i_bh) * K * (K + V)
        store_rows(base, b_h, o_k, m_k, K + V, o_v, o_v < K + V)
        if SPLIT:
            store_rows(base, b_h2, o_k2, m_k2, K + V, o_v, o_v < K + V)
    else:
        if STORE_OUT > 0:
            last = NG - 1
            if REVERSE:
                last = 0
            if i_g == last:
                store_rows(Out + i_bh * K * V, b_h, o_k, m_k, V, o_v, m_v)
                if SPLIT:
                    store_rows(Out + i_bh * K * V, b_h2, o_k2, m_k2, V, o_v, m_v)
