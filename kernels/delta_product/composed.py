"""DeltaProduct by chunks, composed of differentiable pieces: batched PyTorch ops inside a
chunk and the low-rank chunk scan :class:`~kernels.delta_product.scan.LowRankChunkScan` across
chunks.

It serves as the second-order and forward-mode path of the fused kernels (their backward's
backward and their ``jvp`` differentiate this function) and as the fallback for head dims the
fused kernels do not take. Per chunk of ``CT`` tokens (``L = CT·n_h`` micro-steps ``i``,
token-level chunk-cumulative log gate ``G``, ``G_i`` that of the token of step ``i``):

    A = tril(diag(β) (K Kᵀ ⊙ E), −1),  E_ij = e^{G_i − G_j};   (I + A) [W, U] = [diag(β e^G) K, diag(β) V]
    K̃ = diag(e^{G_L − G}) K
    P = Q Kᵀ ⊙ M,  M_ti = e^{Gq_t − G_i} [i ≤ last(t)];   Q̃ = diag(e^{Gq}) Q − P W;   O₀ = P U
    h_{c+1} = e^{G_L} h_c + K̃ᵀ (U − W h_c)  (chunk_scan: a = e^{G_L}, X = K̃, Y = W, B = U),
    O_c = scale · (Q̃_c h_c + O₀_c).

No ``K×K`` matrix is formed: the chunk transition ``e^{G_L} I − K̃ᵀ W`` stays in its rank-``L`` form.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.delta_product.scan import chunk_scan
from kernels.delta_product.tri_inverse import unit_lower_inverse
from kernels.delta_product.utils import TUNING, cdiv


def _decay(rows: Tensor, cols: Tensor, mask: Tensor, vary: Tensor) -> Tensor:
    """``mask ⊙ exp(rows[:, None] − cols[None, :])``, with the exponent zeroed where it is masked
    out (values and derivatives of every order stay finite) or known to vanish (``~vary``: both in
    one token, so the factor is exactly 1 and has exactly zero derivatives)."""
    diff = rows[..., :, None] - cols[..., None, :]
    return torch.where(mask & vary, diff, torch.zeros_like(diff)).exp() * mask


def composed_delta_product(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, G: Tensor | None,
                           h0: Tensor | None, scale: float, ct: int,
                           scan: Callable[..., Tensor] = chunk_scan) -> tuple[Tensor, Tensor]:
    """Outputs and final state of DeltaProduct from differentiable chunk-level pieces.

    Args:
        q: ``[B, T, H, K]``; k: ``[B, T, n_h, H, K]``; v: ``[B, T, n_h, H, V]``; beta: ``[B, T, n_h, H]``.
        G: chunk-local cumulative log gate ``[B, T, H]`` (see ``utils.chunk_local_cumsum``) or None.
        h0: initial state ``[B, H, K, V]`` or None.
        scale: output factor.
        ct: tokens per chunk (must match the ``G`` chunking).
        scan: the chunk scan ``(a [BH, n] or None, X, Y [BH, n, L, K], B [BH, n, L, V], h0 [BH, K, V])
            → H [BH, n+1, K, V]`` with ``H_{c+1} = a_c H_c + X_cᵀ (B_c − Y_c H_c)`` (None: ``a = 1``);
            any differentiable implementation (the GPU checks pass a float64 PyTorch loop).

    Returns:
        ``(o [B, T, H, V], final state [B, H, K, V])`` in float32 (float64 for float64 inputs).
    """
    B, T, n_h, H, K = k.shape
    V = v.shape[-1]
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    nc = cdiv(T, ct)
    pad = nc * ct - T
    L = ct * n_h

    def chunks(x: Tensor, per: int) -> Tensor:  # [B, T, (n_h,) H, D] -> [B, H, nc, per, D]
        x = x.to(dt).reshape(B, T, -1, x.shape[-1])
        x = F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x
        return x.reshape(B, nc, per, H, x.shape[-1]).permute(0, 3, 1, 2, 4)

    qc = chunks(q, ct) * scale
    kc, vc = chunks(k, L), chunks(v, L)
    bc = chunks(beta[..., None], L)[..., 0]
    strict = torch.ones(L, L, dtype=torch.bool, device=q.device).tril(-1)
    last = torch.arange(ct, device=q.device) * n_h + n_h - 1
    causal = torch.arange(L, device=q.device)[None, :] <= last[:, None]  # [ct, L]
    if G is not None:
        if pad:  # padded tokens (identities) carry the last real value of the chunk
            G = torch.cat([G, G[:, -1:].expand(B, pad, H)], 1)
        gq = G.to(dt).reshape(B, nc, ct, H).permute(0, 3, 1, 2)  # [B, H, nc, ct]
        gi = gq.repeat_interleave(n_h, dim=-1)  # [B, H, nc, L]
        gl = gq[..., -1]
        tok = torch.arange(L, device=q.device) // n_h
        E = _decay(gi, gi, strict, tok[:, None] != tok[None, :])
        Mq = _decay(gq, gi, causal, torch.arange(ct, device=q.device)[:, None] != tok[None, :])
        x = (bc * gi.exp())[..., None] * kc
        last_real = torch.full((nc, 1, 1), ct - 1, device=q.device)
        last_real[-1] = (T - 1) % ct  # the chunk's last real token: its factor e^{G_L − G_i} is exactly 1
        ones = torch.ones(L, dtype=torch.bool, device=q.device)
        kt = _decay(gl[..., None], gi, ones, tok < last_real)[..., 0, :, None] * kc
        decay_l = gl.exp().reshape(B * H, nc)
        qd = gq.exp()[..., None] * qc
    else:
        E, Mq, x, kt, decay_l, qd = strict.to(dt), causal.to(dt), bc[..., None] * kc, kc, None, qc
    A = bc[..., None] * (kc @ kc.transpose(-1, -2)) * E
    if TUNING.composed_inverse == "kernel":
        Tinv = unit_lower_inverse(A)
        W, U = Tinv @ x, Tinv @ (bc[..., None] * vc)
    else:
        eye_l = torch.eye(L, dtype=dt, device=q.device)
        wu = torch.linalg.solve_triangular(eye_l + A, torch.cat([x, bc[..., None] * vc], -1),
                                           upper=False, unitriangular=True)
        W, U = wu[..., :K], wu[..., K:]
    P = (qc @ kc.transpose(-1, -2)) * Mq  # [B, H, nc, ct, L]
    Qt = qd - P @ W
    O0 = P @ U
    start = torch.zeros(B * H, K, V, dtype=dt, device=q.device) if h0 is None else h0.to(dt).reshape(B * H, K, V)
    Hs = scan(decay_l, kt.reshape(B * H, nc, L, K), W.reshape(B * H, nc, L, K), U.reshape(B * H, nc, L, V), start)
    O = Qt @ Hs[:, :nc].reshape(B, H, nc, K, V) + O0
    o = O.permute(0, 2, 3, 1, 4).reshape(B, nc * ct, H, V)[:, :T]
    return o, Hs[:, nc].reshape(B, H, K, V)
