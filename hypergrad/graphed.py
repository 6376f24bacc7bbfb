"""AID captured once as a CUDA graph and replayed for every new ``(w, λ)``.

The same hypergradient as :func:`~hypergrad.aid` evaluated at a given ``w`` (``inner=None``),

    ∇f(λ) = ∇_λ E(w, λ) + ∂_λ Φ(w, λ)ᵀ v,   (I − ∂_w Φ(w, λ)ᵀ) v = ∇_w E(w, λ),

computed without a single host synchronisation: the outer gradient, the ``maxiter`` steps of
the linear solver (frozen once converged, so the solution is that of an early stop), the true
residual and the final VJP form one CUDA graph. Each call copies ``w`` and ``λ`` into the
graph's static buffers, replays it and reads the solver's status once. On a GPU this removes
the Python and kernel-launch overhead that dominates an eager solve of a mid-sized problem
(``benchmarks/hypergrad_speed.py``); off a GPU the same computation runs eagerly.

Host-side work happens once, at construction: input validation, one evaluation of ``Φ`` and
``E``, and the solver's one-time checks (:class:`~hypergrad.CG`'s symmetry probe). The linear
solver must be capturable (:class:`~hypergrad.CG`, :class:`~hypergrad.NormalCG`,
:class:`~hypergrad.BiCGSTAB`, :class:`~hypergrad.Neumann`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from hypergrad.aid import adjoint_system, assemble
from hypergrad.linear_solvers import LinearSolver
from hypergrad.linear_solvers.base import PendingSolution
from hypergrad.problem import FixedPointMap, OuterLoss, validate_problem
from hypergrad.pytree import PyTree, tree_leaves, tree_map
from hypergrad.results import Hypergradient, HypergradInfo, OnFailure, check_on_failure
from hypergrad.validation import check_map_output


class _Outputs(NamedTuple):
    grad: PyTree
    value: Tensor
    linear: PendingSolution


def _static_copy(tree: PyTree) -> PyTree:
    return tree_map(lambda t: t.detach().clone(), tree)


def _copy_into(static: PyTree, tree: PyTree) -> None:
    for dst, src in zip(tree_leaves(static), tree_leaves(tree)):
        dst.copy_(src.detach())


class GraphedAID:
    """A reusable hypergradient ``(w, λ) ↦ ∇f(λ)`` by AID, replayed from one CUDA graph.

    Args:
        fixed_point_map: ``Φ(w, λ)``, a contraction in ``w``; ``torch.func``-compatible and
            free of host reads (no ``.item()``, no data-dependent Python control flow).
        outer_loss: ``E(w, λ)``, returning a scalar, with the same restrictions.
        w: inner variables (tensor or pytree); fixes the shapes, dtypes and device of every call.
        lam: hyperparameters, likewise.
        linear_solver: a capturable solver of ``(I − ∂_w Φᵀ) v = ∇_w E``; it always runs its
            ``maxiter`` steps (tolerances decide ``converged``, not when to stop).
        warm_start: start each solve from the previous call's ``v`` (one extra product per call).
        graph: capture a CUDA graph (default: when ``w`` lives on a CUDA device).
        warmup: eager runs on a side stream before the capture.

    Raises:
        ValueError: a non-capturable solver, or ``graph=True`` off a CUDA device.
        InputError: (subclasses) as :func:`~hypergrad.aid` for bad ``w``, ``λ``, ``Φ`` or ``E``.
        NonSymmetricOperatorError: :class:`~hypergrad.CG` with its probe on a non-symmetric operator.

    Example:
        >>> from hypergrad import CG
        >>> A = torch.tensor([[0.5, 0.1], [0.1, 0.3]], dtype=torch.float64)
        >>> phi = lambda w, lam: A @ w + lam
        >>> E = lambda w, lam: (w ** 2).sum()
        >>> hypergradient = GraphedAID(phi, E, torch.zeros(2, dtype=A.dtype), torch.ones(2, dtype=A.dtype),
        ...                            linear_solver=CG(maxiter=4, rtol=1e-12))
        >>> w = torch.linalg.solve(torch.eye(2, dtype=A.dtype) - A, torch.ones(2, dtype=A.dtype))
        >>> g, info = hypergradient(w, torch.ones(2, dtype=A.dtype))
        >>> exact = torch.linalg.solve((torch.eye(2, dtype=A.dtype) - A).T, 2 * w)
        >>> bool(torch.allclose(g, exact)), info.linear.converged
        (True, True)
    """

    def __init__(
        self,
        fixed_point_map: FixedPointMap,
        outer_loss: OuterLoss,
        w: PyTree,
        lam: PyTree,
        *,
        linear_solver: LinearSolver,
        warm_start: bool = False,
        graph: bool | None = None,
        warmup: int = 3,
    ) -> None:
        validate_problem(fixed_point_map, outer_loss, w, lam)
        device = tree_leaves(w)[0].device
        if graph is None:
            graph = device.type == "cuda"
        if graph and device.type != "cuda":
            raise ValueError(f"graph=True needs w and lam on a CUDA device, got {device}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1, got {warmup}")
        self.fixed_point_map, self.outer_loss = fixed_point_map, outer_loss
        self._w, self._lam = _static_copy(w), _static_copy(lam)
        system = adjoint_system(fixed_point_map, outer_loss, self._w, self._lam)
        self.linear_solver = linear_solver.for_capture(system.operator, system.rhs)
        self._v0 = tree_map(torch.zeros_like, system.rhs) if warm_start else None
        self._graph: torch.cuda.CUDAGraph | None = None
        if graph:
            self._outputs = self._capture(warmup)

    @property
    def graphed(self) -> bool:
        """Whether calls replay a CUDA graph (else they run eagerly)."""
        return self._graph is not None

    def __call__(self, w: PyTree, lam: PyTree, *, on_failure: OnFailure = "raise") -> Hypergradient:
        """``Hypergradient(grad, info)`` at ``(w, λ)``, as :func:`~hypergrad.aid` with ``inner=None``.

        Args:
            w: inner variables shaped like the ``w`` given at construction.
            lam: hyperparameters shaped like the ``lam`` given at construction.
            on_failure: policy when the linear solve misses its tolerance or meets NaN/inf
                (non-finite ``w`` or ``λ`` surface here as ``nonfinite_value``).
        """
        check_on_failure(on_failure)
        check_map_output(w, self._w, "w", "the w given at construction")
        check_map_output(lam, self._lam, "lam", "the lam given at construction")
        _copy_into(self._w, w)
        _copy_into(self._lam, lam)
        if self._graph is None:
            outputs = self._compute()
        else:
            self._graph.replay()
            outputs = self._outputs
        pending = outputs.linear
        outcome = pending.outcome._replace(x=pending.outcome.x.clone())
        linear = pending._replace(outcome=outcome).finish(on_failure)
        grad = _static_copy(outputs.grad)
        info = HypergradInfo(w=tree_map(torch.Tensor.detach, w), value=outputs.value.detach().clone(), linear=linear)
        return Hypergradient(grad, info)

    def reset(self) -> None:
        """Forget the warm start: the next solve starts from ``v = 0``."""
        if self._v0 is not None:
            for leaf in tree_leaves(self._v0):
                leaf.zero_()

    def _compute(self) -> _Outputs:
        system = adjoint_system(self.fixed_point_map, self.outer_loss, self._w, self._lam)
        pending = self.linear_solver.start(system.operator, system.rhs, self._v0)
        v = pending.unravel(pending.outcome.x)
        if self._v0 is not None:
            _copy_into(self._v0, v)
        grad = assemble(self.fixed_point_map, self._w, self._lam, system.grad_lam, v)
        return _Outputs(grad, system.value.detach(), pending)

    def _capture(self, warmup: int) -> _Outputs:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self._compute()
        torch.cuda.current_stream().wait_stream(stream)
        self.reset()
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            outputs = self._compute()
        self.reset()
        return outputs
