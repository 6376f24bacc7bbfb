"""Restarted GMRES for any invertible ``A x = b``.

Each cycle builds an orthonormal Krylov basis ``V = [v_1 … v_m]`` of
``span{r, A r, …, A^{m−1} r}`` (Arnoldi, classical Gram–Schmidt applied twice), with
``A V_j = V_{j+1} H_j``, and sets ``x ← x + V_j y`` where

    y = argmin_y ‖ ‖r‖ e_1 − H_j y ‖,

solved with Givens rotations, which also give the residual norm at every step.
The small least-squares problem lives on the host in float64 (one host sync per
Arnoldi step). Guards: a Krylov vector whose norm falls below round-off of ``‖A v‖``
ends the cycle (the Krylov space is invariant: the solution is exact in it); a cycle
that does not lower the true residual is discarded and ends the solve (the
tolerance is below round-off). The iteration count is the number of Arnoldi steps;
each restart adds one product for the true residual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from hypergrad.linear_solvers.base import FlatOperator, LinearSolver, Outcome, initial_residual


def _givens(a: float, b: float) -> tuple[float, float, float]:
    """``(c, s, ρ)`` with ``[c s; −s c] [a; b] = [ρ; 0]``."""
    rho = math.hypot(a, b)
    if rho == 0.0:
        return 1.0, 0.0, 0.0
    return a / rho, b / rho, rho


@dataclass(frozen=True, kw_only=True)
class GMRES(LinearSolver):
    """Restarted GMRES(m) for real operators; valid for non-symmetric ones.

    Tolerances and ``ridge`` as in :class:`LinearSolver`; ``maxiter`` counts Arnoldi
    steps; ``check_every`` is unused (GMRES reads its residual every step).

    Args:
        restart: Krylov dimension ``m`` per cycle.
    """

    capturable: ClassVar[bool] = False

    restart: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.restart < 1:
            raise ValueError(f"restart must be >= 1, got {self.restart}")

    def _run(self, A: FlatOperator, b: Tensor, x: Tensor, x_given: bool, tol: Tensor) -> Outcome:
        eps = torch.finfo(b.dtype).eps
        tol_value = float(tol)
        m = min(self.restart, b.numel())
        r = initial_residual(A, b, x, x_given)
        beta = torch.linalg.vector_norm(r)
        beta_value = float(beta)
        history = torch.full((self.maxiter + 1,), math.nan, dtype=torch.float64)
        history[0], steps = beta_value, 0
        breakdown = nonfinite = False
        while steps < self.maxiter and beta_value > tol_value:
            basis = [r / beta]
            rotations: list[tuple[float, float]] = []
            columns: list[list[float]] = []
            g = [beta_value]
            for _ in range(min(m, self.maxiter - steps)):
                w = A(basis[-1])
                steps += 1
                V = torch.stack(basis)
                h = V @ w
                w = w - V.T @ h
                h2 = V @ w
                w = w - V.T @ h2
                w_norm = torch.linalg.vector_norm(w)
                column = torch.cat([h + h2, w_norm[None]]).to("cpu", torch.float64).tolist()
                if not all(math.isfinite(c) for c in column):
                    nonfinite = True
                    break
                for i, (c, s) in enumerate(rotations):
                    column[i], column[i + 1] = c * column[i] + s * column[i + 1], -s * column[i] + c * column[i + 1]
                c, s, column[-2] = _givens(column[-2], column[-1])
                column[-1] = 0.0
                rotations.append((c, s))
                columns.append(column)
                g.append(-s * g[-1])
                g[-2] = c * g[-2]
                history[steps] = abs(g[-1])
                invariant = float(w_norm) <= eps * math.sqrt(sum(v * v for v in column[:-1]))
                if abs(g[-1]) <= tol_value or invariant:
                    break
                basis.append(w / w_norm)
            if not columns:
                break
            y = self._least_squares(columns, g)
            if y is None:
                breakdown = True
                break
            V = torch.stack(basis[: len(y)])
            x_new = x + V.T @ torch.tensor(y, dtype=b.dtype, device=b.device)
            r_new = b - A(x_new)
            beta_new = torch.linalg.vector_norm(r_new)
            beta_new_value = float(beta_new)
            if not math.isfinite(beta_new_value):
                nonfinite = True
                break
            if beta_new_value >= beta_value:
                breakdown = True
                break
            x, r, beta, beta_value = x_new, r_new, beta_new, beta_new_value
            history[steps] = beta_value
            if nonfinite:
                break
        return Outcome(x, beta, steps, history, breakdown, nonfinite)

    @staticmethod
    def _least_squares(columns: list[list[float]], g: list[float]) -> list[float] | None:
        """Back substitution ``R y = g`` on the rotated Hessenberg matrix; ``None`` if ``R`` is singular."""
        k = len(columns)
        y = [0.0] * k
        for i in reversed(range(k)):
            diagonal = columns[i][i]
            if diagonal == 0.0:
                return None
            y[i] = (g[i] - sum(columns[j][i] * y[j] for j in range(i + 1, k))) / diagonal
        return y
