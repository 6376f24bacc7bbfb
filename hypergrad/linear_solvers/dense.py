"""Dense solve for small problems: materialize ``A`` and factorize it.

    A = [A e_1, …, A e_n],   x = A⁻¹ b   (LU; the pseudo-inverse ``A⁺ b`` when LU fails or
                                          its residual misses the tolerance)

``n`` operator applications (batched with ``torch.func.vmap`` when ``vectorize``)
and ``O(n³)`` work: exact up to round-off, for ``n`` up to a few thousand. Useful as a
reference and for problems with few inner variables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from hypergrad.linear_solvers.base import FlatOperator, LinearSolver, Outcome, zeros_flag
from hypergrad.results import Result


@dataclass(frozen=True, kw_only=True)
class Dense(LinearSolver):
    """Materialize the operator and solve exactly (``x0``, ``maxiter`` and ``check_every`` are unused).

    Tolerances and ``ridge`` as in :class:`LinearSolver`.

    Args:
        max_size: refuse systems with more unknowns than this (``ValueError``).
        vectorize: build the matrix with one ``torch.func.vmap``-ed product
            (``False``: a Python loop, for operators that ``vmap`` cannot batch).
    """

    capturable: ClassVar[bool] = False

    max_size: int = 4096
    vectorize: bool = True

    def materialize(self, A: FlatOperator, like: Tensor) -> Tensor:
        """The matrix of the flat operator ``A`` on vectors shaped like ``like``."""
        n = like.numel()
        if n > self.max_size:
            raise ValueError(f"Dense would materialize a {n}x{n} matrix (max_size={self.max_size}); use CG or GMRES")
        eye = torch.eye(n, dtype=like.dtype, device=like.device)
        rows = torch.func.vmap(A)(eye) if self.vectorize else torch.stack([A(e) for e in eye])
        return rows.T

    def _run(self, A: FlatOperator, b: Tensor, x: Tensor, x_given: bool, tol: Tensor) -> Outcome:
        matrix = self.materialize(A, b)
        solution, info = torch.linalg.solve_ex(matrix, b)
        residual = torch.linalg.vector_norm(b - matrix @ solution)
        singular = bool((info != 0) | ~(residual <= tol))
        if singular:
            solution = torch.linalg.pinv(matrix) @ b
            residual = torch.linalg.vector_norm(b - matrix @ solution)
        history = torch.stack([torch.linalg.vector_norm(b), residual]).detach()
        return Outcome(solution, residual, b.numel(), history, singular, zeros_flag(b), failure=Result.singular)
