"""Batched weighted ridge regression as a fixed point, differentiated implicitly.

For each problem in the batch (leading dims ``...``), rows ``x_i ∈ R^d`` with
targets ``y_i ∈ R^k`` and weights ``ω_i ≥ 0``:

    W(θ) = argmin_W  ½ Σ_i ω_i ‖y_i − Wᵀx_i‖² + ½ λ ‖W‖²_F = A⁻¹ Xᵀ Ω Y,
    A = Xᵀ Ω X + λ I,    ∇_W L(W) = Xᵀ Ω (X W − Y) + λ W,    θ = (X, Y, λ, ω).

``W`` is the fixed point of either step map (both contractions for ``λ > 0``):

* gradient step  ``Φ(W) = W − η ∇_W L(W)`` with ``η = 1 / (Σ_i ω_i ‖x_i‖² + λ) ≤ 1/λ_max(A)``:
  contraction factor ``1 − η λ_min(A)``; ``I − ∂_WΦ = η A`` is symmetric positive
  definite, so the adjoint system may be solved by conjugate gradients;
* Newton step  ``Φ(W) = W − A₀⁻¹ ∇_W L(W)`` with ``A₀ = C Cᵀ`` (``C`` the Cholesky
  factor of ``A``, passed in as a constant): ``∂_WΦ = I − A₀⁻¹A = 0`` at the same
  inputs, so the adjoint system ``(I − ∂_WΦᵀ) v = ∇_W E`` is solved by ``v = ∇_W E``
  in one Neumann step (a few more refine it in finite precision).

Neither map forms ``A``: a product costs ``O(n d k)`` (plus, for the Newton step, two
triangular solves with ``C``: :func:`cholesky_apply`), and the backward pass needs no
derivative of the factorisation. By the implicit function theorem both give

    ∂E/∂λ = −⟨A⁻¹∇_W E, W⟩,   ∂E/∂Y = Ω X A⁻¹∇_W E,
    ∂E/∂X = Ω (Y − X W) (A⁻¹∇_W E)ᵀ − Ω X A⁻¹∇_W E Wᵀ,

which :func:`ridge` obtains from :func:`hypergrad.fixed_point` with the
closed-form solution as the lower-level solver.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from hypergrad.implicit import fixed_point
from hypergrad.linear_solvers import CG, LinearSolver, Neumann

StepKind = Literal["newton", "gradient"]


def _lam(lam: Tensor | float, X: Tensor) -> Tensor:
    return torch.as_tensor(lam, dtype=X.dtype, device=X.device)


def _weights(X: Tensor, weights: Tensor | None) -> Tensor:
    if weights is None:
        return X.new_ones(X.shape[:-1])
    return weights.to(X.dtype)


def _xt(X: Tensor, R: Tensor) -> Tensor:
    """``XᵀR`` with broadcasting batch dims (no copy of a broadcast ``X``)."""
    return torch.einsum("...nd,...nk->...dk", X, R)


def ridge_system(X: Tensor, lam: Tensor | float, weights: Tensor | None = None) -> Tensor:
    """``A = XᵀΩX + λI`` ``[..., d, d]`` for rows ``X`` ``[..., n, d]`` and ``λ`` broadcastable to ``[...]``."""
    A = torch.einsum("...nd,...n,...ne->...de", X, _weights(X, weights), X)  # no copy of a broadcast X
    A.diagonal(dim1=-2, dim2=-1).add_(_lam(lam, X)[..., None])
    return A


def ridge_gradient(W: Tensor, X: Tensor, Y: Tensor, lam: Tensor, weights: Tensor) -> Tensor:
    """``∇_W L = XᵀΩ(XW − Y) + λW`` ``[..., d, k]`` without forming ``XᵀΩX``."""
    residual = (torch.einsum("...nd,...dk->...nk", X, W) - Y) * weights.unsqueeze(-1)
    return _xt(X, residual) + lam[..., None, None] * W


def cholesky_apply(chol: Tensor, R: Tensor) -> Tensor:
    """``A⁻¹R = C⁻ᵀ(C⁻¹R)`` for the lower Cholesky factor ``C`` of ``A`` (two triangular solves).

    Unlike ``torch.cholesky_solve``, which copies ``C`` into column-major order at every call,
    this reads ``C`` in place (a row-major ``C`` is a column-major ``Cᵀ``): cheaper for the
    many small systems of :func:`ridge`.
    """
    return torch.linalg.solve_triangular(chol.mT, torch.linalg.solve_triangular(chol, R, upper=False), upper=True)


def _cholesky(A: Tensor) -> Tensor:
    chol, info = torch.linalg.cholesky_ex(A)
    if bool((info > 0).any()):
        raise ValueError("ridge system is not positive definite: is lambda > 0 and finite, and are X, weights finite?")
    return chol


def ridge_cholesky(X: Tensor, lam: Tensor | float, weights: Tensor | None = None) -> Tensor:
    """Lower Cholesky factor of ``A`` (no graph); ``ValueError`` if ``A`` is not positive definite."""
    with torch.no_grad():
        return _cholesky(ridge_system(X, lam, weights))


def ridge_closed_form(X: Tensor, Y: Tensor, lam: Tensor | float, weights: Tensor | None = None) -> Tensor:
    """``W = A⁻¹XᵀΩY`` by a batched Cholesky solve, differentiated by ordinary autograd (the reference)."""
    chol = _cholesky(ridge_system(X, lam, weights))
    return torch.cholesky_solve(_xt(X, Y * _weights(X, weights).unsqueeze(-1)), chol)


def ridge_gradient_step(W: Tensor, X: Tensor, Y: Tensor, lam: Tensor, weights: Tensor) -> Tensor:
    """``Φ(W) = W − η ∇_W L(W)`` with ``η = 1 / (Σ ω‖x‖² + λ)`` held constant."""
    with torch.no_grad():
        eta = 1.0 / ((X * X).sum(-1).mul(weights).sum(-1) + lam)  # tr(XᵀΩX) + λ ≥ λ_max(A)
    return W - eta[..., None, None] * ridge_gradient(W, X, Y, lam, weights)


def ridge_newton_step(W: Tensor, X: Tensor, Y: Tensor, lam: Tensor, weights: Tensor, chol: Tensor) -> Tensor:
    """``Φ(W) = W − A₀⁻¹ ∇_W L(W)`` with ``A₀ = chol cholᵀ`` a constant."""
    return W - cholesky_apply(chol.detach(), ridge_gradient(W, X, Y, lam, weights))


def _newton_solution(W0: Tensor, X: Tensor, Y: Tensor, lam: Tensor, weights: Tensor, chol: Tensor) -> Tensor:
    return cholesky_apply(chol, _xt(X, Y * weights.unsqueeze(-1)))


def _gradient_solution(W0: Tensor, X: Tensor, Y: Tensor, lam: Tensor, weights: Tensor) -> Tensor:
    return _newton_solution(W0, X, Y, lam, weights, ridge_cholesky(X, lam, weights))


def default_linear_solver(step: StepKind, dtype: torch.dtype) -> LinearSolver:
    """Neumann (iterative refinement) for the Newton step, CG for the gradient step; ``rtol = 1000 eps``."""
    rtol = 1e3 * torch.finfo(dtype).eps
    return Neumann(rtol=rtol, maxiter=20) if step == "newton" else CG(rtol=rtol, maxiter=10_000)


def ridge(
    X: Tensor,
    Y: Tensor,
    lam: Tensor | float,
    weights: Tensor | None = None,
    *,
    step: StepKind = "newton",
    linear_solver: LinearSolver | None = None,
    **fixed_point_kwargs: Any,
) -> Tensor:
    """Ridge solution ``W = A⁻¹XᵀΩY`` ``[..., d, k]`` with gradients by implicit differentiation.

    The forward pass is the closed form (one batched Cholesky factorisation); the
    backward pass is :func:`hypergrad.fixed_point`'s implicit differentiation of the
    chosen step map (module docstring), with ``linear_solver`` for the adjoint system
    (default :func:`default_linear_solver`). Other keywords (``on_failure=``,
    ``return_status=``) go to :func:`hypergrad.fixed_point`.

    Args:
        X: rows ``[..., n, d]``; its leading dims broadcast against ``Y`` and ``weights``
            (e.g. ``[B, 1, n, d]`` shares the rows of a series among several problems
            without copying them).
        Y: targets ``[..., n, k]``.
        lam: ``λ > 0``, broadcastable to the batch shape ``[...]``.
        weights: row weights ``ω ≥ 0``, ``[..., n]`` (default ones).
        step: ``"newton"`` or ``"gradient"``.

    Example:
        >>> X = torch.randn(5, 20, 3, dtype=torch.float64)
        >>> Y = torch.randn(5, 20, 2, dtype=torch.float64)
        >>> ridge(X, Y, 0.1).shape
        torch.Size([5, 3, 2])
    """
    if X.shape[-2] != Y.shape[-2]:
        raise ValueError(f"X has {X.shape[-2]} rows and Y has {Y.shape[-2]}")
    w = _weights(X, weights)
    batch = torch.broadcast_shapes(X.shape[:-2], Y.shape[:-2], w.shape[:-1])
    lam = _lam(lam, X).expand(batch)
    w = w.expand(*batch, X.shape[-2])
    W0 = X.new_zeros(*lam.shape, X.shape[-1], Y.shape[-1])
    solver = linear_solver or default_linear_solver(step, X.dtype)
    if step == "newton":
        chol = ridge_cholesky(X, lam, w)
        return fixed_point(
            ridge_newton_step, W0, X, Y, lam, w, chol, solver=_newton_solution, linear_solver=solver, **fixed_point_kwargs
        )
    if step == "gradient":
        return fixed_point(
            ridge_gradient_step, W0, X, Y, lam, w, solver=_gradient_solution, linear_solver=solver, **fixed_point_kwargs
        )
    raise ValueError(f"step must be 'newton' or 'gradient', got {step!r}")
