"""Common interface of the matrix-free linear solvers for ``A x = b``.

Every solver is a frozen dataclass of options with one method

    solver.solve(matvec, b, x0=None, *, on_failure="raise") -> Solution

where ``matvec(x) = A x`` maps a pytree like ``b`` to a pytree like ``b``. The
solver flattens ``b`` to a vector, runs on ``x ↦ A x + ridge · x`` and stops when

    ‖b − A x‖ ≤ max(atol, rtol · ‖b‖).

Loops keep their status (converged, breakdown, non-finite) as tensors and freeze
the iterate once it is reached (``torch.where``), so extra steps are no-ops; the host
reads the status at steps ``k = c, 2c, …`` with ``c = check_every`` (default 1 on the
CPU, 10 elsewhere; see :mod:`hypergrad.loop`). The residual history is a preallocated
tensor of ``maxiter + 1`` entries, returned sliced to the steps taken.
Success is judged on the true residual ``‖b − A x‖`` recomputed from the returned
``x``, which is what ``stats.residual_norm`` reports.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from hypergrad.loop import check_interval, empty_history, history_to_host
from hypergrad.pytree import PyTree, tree_ravel
from hypergrad.results import OnFailure, Result, Solution, Stats, check_on_failure, handle_failure
from hypergrad.validation import check_map_output

Matvec = Callable[[PyTree], PyTree]
FlatOperator = Callable[[Tensor], Tensor]


class Outcome(NamedTuple):
    """What a solver's ``_run`` hands back to :meth:`LinearSolver.solve` (tensors, no host sync)."""

    x: Tensor
    residual: Tensor
    iterations: Tensor | int
    history: Tensor
    breakdown: Tensor | bool
    nonfinite: Tensor | bool
    failure: Result = Result.breakdown


class PendingSolution(NamedTuple):
    """A solve's device tensors before the host reads them (see :meth:`LinearSolver.start`)."""

    outcome: Outcome
    tol: Tensor
    unravel: Callable[[Tensor], PyTree]
    solver: str

    def finish(self, on_failure: OnFailure = "raise") -> Solution:
        """Read the status on the host, classify it and apply the failure policy."""
        outcome = self.outcome
        residual = float(outcome.residual)
        iterations = int(outcome.iterations)
        history = history_to_host(outcome.history, iterations + 1)
        if math.isfinite(residual) and residual <= float(self.tol):
            result = Result.successful
        elif bool(outcome.nonfinite) or not math.isfinite(residual):
            result = Result.nonfinite_value
        elif bool(outcome.breakdown):
            result = outcome.failure
        else:
            result = Result.max_steps_reached
        solution = Solution(self.unravel(outcome.x), result, Stats(iterations, residual, history))
        return handle_failure(solution, on_failure, self.solver)


def safe_denominator(d: Tensor) -> tuple[Tensor, Tensor]:
    """Return ``(ok, d')`` with ``ok = |d| > tiny`` and ``d' = d`` where ok, else 1 (so ``x / d'`` is finite)."""
    ok = d.abs() > torch.finfo(d.dtype).tiny
    return ok, torch.where(ok, d, torch.ones_like(d))


def real_vdot(x: Tensor, y: Tensor) -> Tensor:
    """``⟨x, y⟩`` of two vectors (real part for complex inputs)."""
    out = torch.vdot(x, y)
    return out.real if out.is_complex() else out


@dataclass(frozen=True, kw_only=True)
class LinearSolver(abc.ABC):
    """Base class: tolerance, iteration limit, ridge, and the ``solve`` entry point.

    Args:
        rtol: relative tolerance on ``‖b − A x‖ / ‖b‖``.
        atol: absolute tolerance on ``‖b − A x‖``.
        maxiter: iteration limit (``0`` returns ``x0``).
        ridge: solve ``(A + ridge · I) x = b`` instead.
        check_every: host reads the convergence flag every this many steps
            (``None``: 1 on the CPU, 10 on accelerators).
    """

    rtol: float = 1e-6
    atol: float = 0.0
    maxiter: int = 1000
    ridge: float = 0.0
    check_every: int | None = None

    capturable: ClassVar[bool] = True
    """Whether :meth:`start` makes no host read when ``check_every > maxiter`` (CUDA-graph safe)."""

    def __post_init__(self) -> None:
        if self.rtol < 0 or self.atol < 0:
            raise ValueError(f"rtol and atol must be >= 0, got rtol={self.rtol}, atol={self.atol}")
        if self.maxiter < 0:
            raise ValueError(f"maxiter must be >= 0, got {self.maxiter}")
        if self.check_every is not None and self.check_every < 1:
            raise ValueError(f"check_every must be >= 1 or None, got {self.check_every}")

    def check_interval(self, device: torch.device) -> int:
        """Steps between host reads of the convergence flag."""
        return check_interval(self.check_every, device)

    def solve(
        self, matvec: Matvec, b: PyTree, x0: PyTree | None = None, *, on_failure: OnFailure = "raise"
    ) -> Solution:
        """Solve ``(A + ridge · I) x = b`` with ``A x = matvec(x)``.

        Args:
            matvec: linear map ``x ↦ A x`` on pytrees shaped like ``b``.
            b: right-hand side (tensor or pytree of tensors).
            x0: initial guess shaped like ``b`` (default zeros).
            on_failure: ``"raise"``, ``"warn"`` or ``"ignore"`` when the tolerance is not reached.

        Returns:
            ``Solution(value, result, stats)`` with ``value`` shaped like ``b``.
        """
        check_on_failure(on_failure)
        vec_b, unravel = tree_ravel(b)
        vec_x0 = self._initial_guess(b, x0, vec_b)
        if not (bool(torch.isfinite(vec_b).all()) and bool(torch.isfinite(vec_x0).all())):
            nan = float("nan")
            stats = Stats(0, nan, torch.full((1,), nan, dtype=torch.float64))
            return handle_failure(Solution(unravel(vec_x0), Result.nonfinite_input, stats), on_failure, self.name)
        return self._start(matvec, b, unravel, vec_b, vec_x0, x0 is not None).finish(on_failure)

    def start(self, matvec: Matvec, b: PyTree, x0: PyTree | None = None) -> PendingSolution:
        """The device half of :meth:`solve`: run the loop, return its tensors unread.

        Nothing is read on the host when :attr:`capturable` is true and ``check_every > maxiter``,
        so the call can be captured in a CUDA graph; :meth:`PendingSolution.finish` then reads
        the status once. Non-finite ``b`` or ``x0`` are not checked up front: they surface as
        ``nonfinite_value``.
        """
        vec_b, unravel = tree_ravel(b)
        vec_x0 = self._initial_guess(b, x0, vec_b)
        return self._start(matvec, b, unravel, vec_b, vec_x0, x0 is not None)

    def for_capture(self, matvec: Matvec, b: PyTree) -> LinearSolver:
        """This solver with every host read moved out of :meth:`start`, for CUDA-graph capture.

        One-time checks that need the host (e.g. :class:`~hypergrad.CG`'s symmetry probe) run now on
        ``matvec``; the copy runs exactly ``maxiter`` steps (the steps after convergence are frozen
        no-ops, so the solution is unchanged) and reads nothing until :meth:`PendingSolution.finish`.

        Raises:
            ValueError: if the solver cannot run without host reads (:class:`~hypergrad.GMRES`,
                :class:`~hypergrad.Dense`).
        """
        if not self.capturable:
            raise ValueError(
                f"{self.name} reads the host inside its loop and cannot be captured in a CUDA graph; "
                "use CG, NormalCG, BiCGSTAB or Neumann"
            )
        return dataclasses.replace(self, check_every=self.maxiter + 1)

    @property
    def name(self) -> str:
        """The solver's class name, used in messages."""
        return type(self).__name__

    @staticmethod
    def _initial_guess(b: PyTree, x0: PyTree | None, vec_b: Tensor) -> Tensor:
        if x0 is None:
            return torch.zeros_like(vec_b)
        check_map_output(x0, b, "x0", "b")
        return tree_ravel(x0)[0]

    def _start(
        self, matvec: Matvec, b: PyTree, unravel: Callable[[Tensor], PyTree], vec_b: Tensor, vec_x0: Tensor,
        x_given: bool,
    ) -> PendingSolution:
        operator = self._flat_operator(matvec, b, unravel)
        tol = torch.clamp(self.rtol * torch.linalg.vector_norm(vec_b), min=self.atol)
        return PendingSolution(self._run(operator, vec_b, vec_x0, x_given, tol), tol, unravel, self.name)

    def _flat_operator(self, matvec: Matvec, b: PyTree, unravel: Callable[[Tensor], PyTree]) -> FlatOperator:
        checked = False

        def operator(v: Tensor) -> Tensor:
            nonlocal checked
            out = matvec(unravel(v))
            if not checked:
                check_map_output(out, b, "matvec(x)", "b")
                checked = True
            vec = tree_ravel(out)[0]
            return vec + self.ridge * v if self.ridge else vec

        return operator

    @abc.abstractmethod
    def _run(self, A: FlatOperator, b: Tensor, x: Tensor, x_given: bool, tol: Tensor) -> Outcome:
        """Iterate on vectors: ``A`` is the flat operator, ``x`` the flat initial guess."""


def true_residual(A: FlatOperator, b: Tensor, x: Tensor) -> Tensor:
    """``‖b − A x‖`` (one operator application)."""
    return torch.linalg.vector_norm(b - A(x))


def initial_residual(A: FlatOperator, b: Tensor, x: Tensor, x_given: bool) -> Tensor:
    """``b − A x0``, skipping the product when ``x0 = 0``."""
    return b - A(x) if x_given else b.clone()


def zeros_flag(b: Tensor) -> Tensor:
    """A 0-d ``False`` on ``b``'s device (status flags stay on the device)."""
    return torch.zeros((), dtype=torch.bool, device=b.device)


def zeros_count(b: Tensor) -> Tensor:
    """A 0-d integer ``0`` on ``b``'s device (iteration counters stay on the device)."""
    return torch.zeros((), dtype=torch.int64, device=b.device)


class GuardedLoop:
    """Device-side status of a guarded short-recurrence loop (CG, NormalCG, BiCGSTAB) on ``rr = ‖r‖²``.

    Each step proposes ``rr_new``; :meth:`advance` accepts it where

        ok = ¬done ∧ guards ∧ finite,

    records a breakdown (finite, but a guard failed) or non-finite values, counts the
    accepted step, sets ``done`` once a step is refused or ``rr ≤ tol²``, and writes
    ``√rr`` into the preallocated history (entry 0: the initial residual).
    """

    def __init__(self, rr: Tensor, tol: Tensor, maxiter: int) -> None:
        self.rr = rr
        self.tol2 = tol * tol
        self.done = ~(rr > self.tol2)
        self.breakdown, self.nonfinite, self.iterations = zeros_flag(rr), zeros_flag(rr), zeros_count(rr)
        self.history = empty_history(maxiter + 1, rr)
        self.history[0] = rr.detach().sqrt()
        self._steps = 0

    def advance(self, guards: Tensor, finite: Tensor, rr_new: Tensor) -> Tensor:
        """Account for one step and return ``ok`` (0-d bool): where it is false the caller keeps its iterate."""
        active = ~self.done
        ok = active & guards & finite
        self.nonfinite = self.nonfinite | (active & ~finite)
        self.breakdown = self.breakdown | (active & finite & ~guards)
        self.rr = torch.where(ok, rr_new, self.rr)
        self.iterations = self.iterations + ok
        self.done = self.done | ~ok | (self.rr <= self.tol2)
        self._steps += 1
        self.history[self._steps] = self.rr.detach().sqrt()
        return ok

    def outcome(self, x: Tensor, residual: Tensor) -> Outcome:
        """The :class:`Outcome` with the returned ``x`` and its true residual."""
        return Outcome(x, residual, self.iterations, self.history, self.breakdown, self.nonfinite)
