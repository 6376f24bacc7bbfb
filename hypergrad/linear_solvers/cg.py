"""Conjugate gradient for symmetric positive-definite ``A x = b``.

    α_k = ‖r_k‖² / p_kᵀ A p_k,   x_{k+1} = x_k + α_k p_k,   r_{k+1} = r_k − α_k A p_k,
    β_k = ‖r_{k+1}‖² / ‖r_k‖²,   p_{k+1} = r_{k+1} + β_k p_k.

In implicit differentiation ``A = I − ∂_w Φᵀ`` is symmetric positive definite when
``Φ(w, λ) = w − η ∇_w L(w, λ)`` is a gradient step on a strongly convex loss
(``A = η ∇²_w L``). For any other map it is not symmetric and CG drifts, so
:class:`CG` first runs a symmetry probe (two extra products) and refuses operators
that fail it, naming :class:`~hypergrad.NormalCG`, :class:`~hypergrad.GMRES` and
:class:`~hypergrad.BiCGSTAB`.

Guards: a step whose ``pᵀAp ≤ tiny`` (residual at round-off, or an indefinite
operator) is not taken and stops the loop (``breakdown`` unless the tolerance was
met); ``β`` is zero when ``‖r_k‖²`` underflows; non-finite values stop the loop with
the last finite iterate. With ``rtol = atol = 0`` the loop therefore ends cleanly once
the residual vanishes or the iteration limit is reached, never with NaN or inf.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hypergrad.linear_solvers.base import (
    FlatOperator,
    GuardedLoop,
    LinearSolver,
    Matvec,
    Outcome,
    initial_residual,
    real_vdot,
    true_residual,
)
from hypergrad.loop import should_stop
from hypergrad.pytree import PyTree, tree_ravel
from hypergrad.results import NonSymmetricOperatorError


def symmetry_gap(A: FlatOperator, like: Tensor, seed: int = 0) -> float:
    """Relative asymmetry ``|⟨u, A w⟩ − ⟨A u, w⟩| / (‖u‖‖A w‖ + ‖A u‖‖w‖)`` for random ``u, w``.

    Zero (up to round-off) for a symmetric operator. Two operator applications; the
    random vectors come from a private generator seeded with ``seed``.
    """
    generator = torch.Generator(device=like.device)
    generator.manual_seed(seed)
    u, w = (torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device) for _ in range(2))
    Au, Aw = A(u), A(w)
    gap = (real_vdot(u, Aw) - real_vdot(Au, w)).abs()
    scale = torch.linalg.vector_norm(u) * torch.linalg.vector_norm(Aw)
    scale = scale + torch.linalg.vector_norm(Au) * torch.linalg.vector_norm(w)
    scale_value = float(scale)
    return 0.0 if scale_value == 0.0 else float(gap) / scale_value


@dataclass(frozen=True, kw_only=True)
class CG(LinearSolver):
    """Conjugate gradient for symmetric positive-definite operators.

    Tolerances, ``maxiter``, ``ridge`` and ``check_every`` as in :class:`LinearSolver`.

    Args:
        check_symmetric: run the symmetry probe and raise
            :class:`~hypergrad.NonSymmetricOperatorError` when it fails.
        symmetry_rtol: probe threshold on the relative asymmetry
            (``None``: ``√eps`` of the dtype).

    Example:
        >>> A = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
        >>> sol = CG().solve(lambda x: A @ x, torch.ones(2, dtype=torch.float64))
        >>> sol.converged, sol.stats.iterations
        (True, 2)
    """

    check_symmetric: bool = True
    symmetry_rtol: float | None = None

    def _run(self, A: FlatOperator, b: Tensor, x: Tensor, x_given: bool, tol: Tensor) -> Outcome:
        if self.check_symmetric:
            self.check_symmetry(A, b)
        tiny = torch.finfo(b.dtype).tiny
        r = initial_residual(A, b, x, x_given)
        p = r
        loop = GuardedLoop(real_vdot(r, r), tol, self.maxiter)
        check = self.check_interval(b.device)
        for k in range(self.maxiter):
            if should_stop(k, check, loop.done):
                break
            rr = loop.rr
            Ap = A(p)
            pAp = real_vdot(p, Ap)
            positive = pAp > tiny
            alpha = rr / torch.where(positive, pAp, torch.ones_like(pAp))
            x_new = x + alpha * p
            r_new = r - alpha * Ap
            rr_new = real_vdot(r_new, r_new)
            beta = rr_new / torch.where(rr > tiny, rr, torch.ones_like(rr))
            finite = torch.isfinite(pAp) & torch.isfinite(rr_new) & torch.isfinite(beta)
            ok = loop.advance(positive, finite, rr_new)
            x = torch.where(ok, x_new, x)
            r = torch.where(ok, r_new, r)
            p = torch.where(ok, r_new + beta * p, p)
        return loop.outcome(x, true_residual(A, b, x))

    def for_capture(self, matvec: Matvec, b: PyTree) -> CG:
        """Run the symmetry probe once on ``matvec`` (if enabled), then drop it and every host read."""
        if self.check_symmetric:
            vec_b, unravel = tree_ravel(b)
            self.check_symmetry(lambda v: tree_ravel(matvec(unravel(v)))[0], vec_b)
        return dataclasses.replace(super().for_capture(matvec, b), check_symmetric=False)

    def check_symmetry(self, A: FlatOperator, b: Tensor) -> None:
        """Raise :class:`~hypergrad.NonSymmetricOperatorError` if :func:`symmetry_gap` exceeds the threshold."""
        threshold = self.symmetry_rtol
        if threshold is None:
            threshold = math.sqrt(torch.finfo(b.dtype).eps)
        gap = symmetry_gap(A, b)
        if gap > threshold:
            raise NonSymmetricOperatorError(
                f"CG needs a symmetric positive-definite operator, but the symmetry probe found a relative "
                f"asymmetry |<u, A w> - <A u, w>| / scale = {gap:.3e} > {threshold:.1e}. For a non-symmetric "
                "operator (e.g. the Jacobian of an equilibrium model or a recurrence) use GMRES, BiCGSTAB or "
                "NormalCG; A = I - d_w Phi^T is symmetric when Phi is a gradient step w - eta grad_w L. "
                "Pass check_symmetric=False to CG only if you know the operator is symmetric."
            )
