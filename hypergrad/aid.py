"""Approximate implicit differentiation (AID).

At the lower-level solution ``w = Φ(w, λ)`` the implicit function theorem gives

    ∇f(λ) = ∇_λ E(w, λ) + ∂_λ Φ(w, λ)ᵀ v,   where   (I − ∂_w Φ(w, λ)ᵀ) v = ∇_w E(w, λ).

AID solves the lower level approximately (any :class:`~hypergrad.FixedPointSolver`,
or takes a given ``w``), then the linear system approximately with a pluggable
matrix-free solver, whose operator ``v ↦ v − ∂_w Φᵀ v`` costs one VJP:

* :class:`~hypergrad.Neumann`: ``v ← ∂_w Φᵀ v + ∇_w E`` (AID-FP), for any contraction;
* :class:`~hypergrad.CG`: fastest when ``∂_w Φ`` is symmetric (``Φ`` a gradient step);
* :class:`~hypergrad.GMRES`, :class:`~hypergrad.BiCGSTAB`, :class:`~hypergrad.NormalCG`:
  non-symmetric ``∂_w Φ`` (equilibrium models, recurrences);
* :class:`~hypergrad.Dense`: small problems, exact.

Memory is ``O(|w|)`` whatever the number of iterations. ``Φ`` and ``E`` must be
``torch.func``-compatible.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.func import grad_and_value, vjp

from hypergrad.fixed_point_solvers import FixedPointIteration, FixedPointSolver, as_solver
from hypergrad.linear_solvers import GMRES, LinearSolver
from hypergrad.problem import FixedPointMap, OuterLoss, validate_problem
from hypergrad.pytree import PyTree, tree_add, tree_map, tree_sub
from hypergrad.results import Hypergradient, HypergradInfo, OnFailure, check_on_failure


def aid(
    fixed_point_map: FixedPointMap,
    outer_loss: OuterLoss,
    w0: PyTree,
    lam: PyTree,
    *,
    inner: FixedPointSolver | Callable[..., PyTree] | None = FixedPointIteration(),
    linear_solver: LinearSolver | None = None,
    v0: PyTree | None = None,
    on_failure: OnFailure = "raise",
) -> Hypergradient:
    """Hypergradient by implicit differentiation with approximate solves.

    Args:
        fixed_point_map: ``Φ(w, λ)``, a contraction in ``w``.
        outer_loss: ``E(w, λ)``, returning a scalar.
        w0: initial guess of the lower level, or its solution when ``inner is None``.
        lam: hyperparameters ``λ``.
        inner: lower-level solver run from ``w0`` (a callable ``solution(w0, lam)`` is
            wrapped in :class:`~hypergrad.ClosedForm`); ``None`` evaluates at ``w = w0``.
        linear_solver: solver of ``(I − ∂_w Φᵀ) v = ∇_w E`` (default :class:`~hypergrad.GMRES`).
        v0: initial guess for ``v`` (warm start, e.g. ``info.linear.value`` of a previous call).
        on_failure: policy for both solves: ``"raise"``, ``"warn"`` or ``"ignore"``.

    Returns:
        ``Hypergradient(grad, info)``: ``grad`` shaped like ``lam``; ``info.inner`` and
        ``info.linear`` are the two solves.

    Example:
        >>> phi = lambda w, lam: 0.5 * w + lam
        >>> E = lambda w, lam: (w ** 2).sum()
        >>> g, info = aid(phi, E, torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
        >>> round(float(g), 4), info.linear.converged
        (8.0, True)
    """
    check_on_failure(on_failure)
    validate_problem(fixed_point_map, outer_loss, w0, lam)
    linear_solver = GMRES() if linear_solver is None else linear_solver
    lam = tree_map(torch.Tensor.detach, lam)
    inner_solution = None
    w = w0
    if inner is not None:
        inner_solution = as_solver(inner).solve(fixed_point_map, w0, lam, on_failure=on_failure)
        w = inner_solution.value
    w = tree_map(torch.Tensor.detach, w)
    system = adjoint_system(fixed_point_map, outer_loss, w, lam)
    linear = linear_solver.solve(system.operator, system.rhs, v0, on_failure=on_failure)
    grad = assemble(fixed_point_map, w, lam, system.grad_lam, linear.value)
    return Hypergradient(grad, HypergradInfo(w=w, value=system.value.detach(), inner=inner_solution, linear=linear))


class AdjointSystem(NamedTuple):
    """The pieces of ``(I − ∂_w Φᵀ) v = ∇_w E`` at ``(w, λ)``: ``operator(v) = v − ∂_w Φᵀ v``."""

    operator: Callable[[PyTree], PyTree]
    rhs: PyTree
    grad_lam: PyTree
    value: torch.Tensor


def adjoint_system(fixed_point_map: FixedPointMap, outer_loss: OuterLoss, w: PyTree, lam: PyTree) -> AdjointSystem:
    """Build ``v ↦ v − ∂_w Φ(w, λ)ᵀ v`` (one VJP per product, graph of ``Φ`` built once) and ``∇_w E, ∇_λ E, E``."""
    (grad_w, grad_lam), value = grad_and_value(outer_loss, argnums=(0, 1))(w, lam)
    _, vjp_w = vjp(lambda w_: fixed_point_map(w_, lam), w)

    def operator(v: PyTree) -> PyTree:
        return tree_sub(v, vjp_w(v)[0])

    return AdjointSystem(operator, grad_w, grad_lam, value)


def assemble(fixed_point_map: FixedPointMap, w: PyTree, lam: PyTree, grad_lam: PyTree, v: PyTree) -> PyTree:
    """``∇f(λ) = ∇_λ E + ∂_λ Φ(w, λ)ᵀ v``."""
    _, vjp_lam = vjp(lambda lam_: fixed_point_map(w, lam_), lam)
    return tree_add(grad_lam, vjp_lam(v)[0])
