"""hypergrad: hypergradients of bilevel problems whose lower level is the fixed point of a contraction.

    w(λ) = Φ(w(λ), λ),   f(λ) = E(w(λ), λ),
    ∇f(λ) = ∇_λ E + ∂_λ Φᵀ v,   (I − ∂_w Φᵀ) v = ∇_w E.

Methods: :func:`itd`, :func:`truncated_itd`, :func:`checkpointed_itd`, :func:`forward_itd`,
:func:`aid` and its CUDA-graphed form :class:`GraphedAID`; the implicit layer :func:`fixed_point`; lower-level solvers
:class:`FixedPointIteration`, :class:`ClosedForm`; linear solvers :class:`Neumann`,
:class:`CG`, :class:`NormalCG`, :class:`GMRES`, :class:`BiCGSTAB`, :class:`Dense`; stochastic
hypergradients :func:`sid` and ``hypergrad.nsid.nsid``; the bilevel loop ``hypergrad.bilevel.bilevel``.
"""

from hypergrad.aid import aid
from hypergrad.bilevel import BilevelResult, History, StepReport
from hypergrad.checkpoint import Checkpoint
from hypergrad.nsid import stochastic_prox_gradient
from hypergrad.prox import elastic_net_prox, project_box, project_nonnegative, soft_threshold
from hypergrad.stochastic import Constant, InverseTime, IterationState, Minibatches, StochasticIteration, sid
from hypergrad.checkpointed_itd import checkpointed_itd
from hypergrad.contraction import contraction_factor
from hypergrad.fixed_point_solvers import ClosedForm, FixedPointIteration, FixedPointSolver
from hypergrad.forward_itd import forward_itd
from hypergrad.graphed import GraphedAID
from hypergrad.implicit import ImplicitStatus, fixed_point
from hypergrad.itd import itd, truncated_itd
from hypergrad.linear_solvers import CG, GMRES, BiCGSTAB, Dense, LinearSolver, Neumann, NormalCG, symmetry_gap
from hypergrad.maps import gradient_step_map
from hypergrad.modules import load_params, make_functional
from hypergrad.optim import assign_grad
from hypergrad.pytree import (
    tree_add,
    tree_axpy,
    tree_norm,
    tree_ravel,
    tree_scale,
    tree_sub,
    tree_vdot,
    tree_zeros_like,
)
from hypergrad.results import (
    ConvergenceWarning,
    DeviceMismatchError,
    DtypeMismatchError,
    HypergradError,
    Hypergradient,
    HypergradInfo,
    InputError,
    NonFiniteInputError,
    NonSymmetricOperatorError,
    NotContractiveError,
    NotConvergedError,
    Result,
    ShapeMismatchError,
    Solution,
    Stats,
    StructureMismatchError,
)

__all__ = [
    "BilevelResult",
    "History",
    "StepReport",
    "Checkpoint",
    "stochastic_prox_gradient",
    "elastic_net_prox",
    "project_box",
    "project_nonnegative",
    "soft_threshold",
    "Constant",
    "InverseTime",
    "IterationState",
    "Minibatches",
    "StochasticIteration",
    "sid",
    "BiCGSTAB",
    "CG",
    "ClosedForm",
    "ConvergenceWarning",
    "Dense",
    "DeviceMismatchError",
    "DtypeMismatchError",
    "FixedPointIteration",
    "FixedPointSolver",
    "GMRES",
    "GraphedAID",
    "HypergradError",
    "HypergradInfo",
    "Hypergradient",
    "ImplicitStatus",
    "InputError",
    "LinearSolver",
    "Neumann",
    "NonFiniteInputError",
    "NonSymmetricOperatorError",
    "NormalCG",
    "NotContractiveError",
    "NotConvergedError",
    "Result",
    "ShapeMismatchError",
    "Solution",
    "Stats",
    "StructureMismatchError",
    "aid",
    "assign_grad",
    "checkpointed_itd",
    "contraction_factor",
    "fixed_point",
    "forward_itd",
    "gradient_step_map",
    "itd",
    "load_params",
    "make_functional",
    "symmetry_gap",
    "tree_add",
    "tree_axpy",
    "tree_norm",
    "tree_ravel",
    "tree_scale",
    "tree_sub",
    "tree_vdot",
    "tree_zeros_like",
    "truncated_itd",
]
