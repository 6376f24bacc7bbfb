"""GraphedAID: the same hypergradient as aid(inner=None), with no host read between construction and finish.

On the CPU the computation runs eagerly (the code path that a CUDA graph captures); the last test
captures and replays a real graph when a GPU is present.
"""

import dataclasses
import warnings

import pytest
import torch

import hypergrad as hg
from hypergrad_problems import DTYPE, LinearContraction, Ridge, gen, host_reads, randn, rel_err  # noqa: F401


def exact_solution_pair(problem, lam):
    return problem.solution(lam), problem.hypergradient(lam)


@pytest.mark.parametrize(
    "solver",
    [hg.NormalCG(rtol=0.0, atol=0.0, maxiter=60), hg.BiCGSTAB(rtol=0.0, atol=0.0, maxiter=40),
     hg.Neumann(rtol=0.0, atol=0.0, maxiter=120)],
    ids=["normal_cg", "bicgstab", "neumann"],
)
def test_matches_aid_and_the_dense_solve_on_a_nonsymmetric_contraction(gen, solver):
    problem = LinearContraction.make(gen)
    lam = randn(gen, 3)
    w, exact = exact_solution_pair(problem, lam)
    graphed = hg.GraphedAID(problem.phi, problem.outer_loss, w, lam, linear_solver=solver)
    assert not graphed.graphed
    g, info = graphed(w, lam, on_failure="ignore")
    ref = hg.aid(problem.phi, problem.outer_loss, w, lam, inner=None, linear_solver=solver, on_failure="ignore")
    assert torch.allclose(g, ref.grad, rtol=1e-12, atol=1e-14)
    assert rel_err(g, exact) < 1e-9
    assert info.linear.stats.iterations == ref.info.linear.stats.iterations
    assert torch.allclose(info.linear.stats.residual_history, ref.info.linear.stats.residual_history)


def test_cg_is_reused_across_hyperparameters_on_ridge(gen):
    problem = Ridge.make(gen)
    lam0 = randn(gen, problem.X.shape[1]) * 0.3
    graphed = hg.GraphedAID(problem.phi, problem.outer_loss, problem.solution(lam0), lam0,
                            linear_solver=hg.CG(rtol=1e-13, maxiter=50))
    for _ in range(3):
        lam = randn(gen, problem.X.shape[1]) * 0.3
        g, info = graphed(problem.solution(lam), lam)
        assert info.linear.converged
        assert rel_err(g, problem.hypergradient(lam)) < 1e-10
        assert torch.allclose(info.value, problem.outer_loss(problem.solution(lam), lam))


def test_pytree_inner_variables_and_hyperparameters(gen):
    problem = LinearContraction.make(gen, n=8, p=2)
    lam = randn(gen, 2)
    w = problem.solution(lam)

    def phi(w_tree, lam_tree):
        out = problem.phi(torch.cat([w_tree["a"], w_tree["b"]]), torch.stack([lam_tree[0], lam_tree[1]]))
        return {"a": out[:3], "b": out[3:]}

    def outer(w_tree, lam_tree):
        return problem.outer_loss(torch.cat([w_tree["a"], w_tree["b"]]), torch.stack(list(lam_tree)))

    w_tree, lam_tree = {"a": w[:3], "b": w[3:]}, (lam[0], lam[1])
    graphed = hg.GraphedAID(phi, outer, w_tree, lam_tree, linear_solver=hg.NormalCG(rtol=1e-12, maxiter=100))
    g, _ = graphed(w_tree, lam_tree)
    assert rel_err(torch.stack(list(g)), problem.hypergradient(lam)) < 1e-9


def test_warm_start_continues_from_the_previous_solution(gen):
    problem = LinearContraction.make(gen, norm=0.9)
    lam = randn(gen, 3)
    w, exact = exact_solution_pair(problem, lam)
    solver = hg.Neumann(rtol=0.0, atol=0.0, maxiter=5)
    graphed = hg.GraphedAID(problem.phi, problem.outer_loss, w, lam, linear_solver=solver, warm_start=True)
    errors, v0 = [], None
    for _ in range(4):
        g, info = graphed(w, lam, on_failure="ignore")
        ref = hg.aid(problem.phi, problem.outer_loss, w, lam, inner=None, linear_solver=solver, v0=v0,
                     on_failure="ignore")
        assert torch.allclose(g, ref.grad, rtol=1e-12, atol=1e-14)
        v0 = ref.info.linear.value
        errors.append(rel_err(g, exact))
    assert all(b < 0.8 * a for a, b in zip(errors, errors[1:]))
    graphed.reset()
    g, _ = graphed(w, lam, on_failure="ignore")
    assert rel_err(g, exact) == pytest.approx(errors[0], rel=1e-10)


def test_no_host_read_between_construction_and_finish(gen, host_reads, monkeypatch):
    problem = Ridge.make(gen)
    lam = randn(gen, problem.X.shape[1]) * 0.3
    w = problem.solution(lam)
    graphed = hg.GraphedAID(problem.phi, problem.outer_loss, w, lam, linear_solver=hg.CG(maxiter=30))
    for name in ("__float__", "__int__", "item", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _orig=original, _name=name: host_reads.append(_name) or _orig(self, *a))
    host_reads.clear()
    graphed._compute()
    assert host_reads == []


def test_cg_refuses_a_nonsymmetric_operator_once_at_construction(gen):
    problem = LinearContraction.make(gen)
    lam = randn(gen, 3)
    with pytest.raises(hg.NonSymmetricOperatorError, match="NormalCG"):
        hg.GraphedAID(problem.phi, problem.outer_loss, problem.solution(lam), lam, linear_solver=hg.CG())


@pytest.mark.parametrize("solver", [hg.GMRES(), hg.Dense()], ids=["gmres", "dense"])
def test_solvers_that_read_the_host_are_refused(gen, solver):
    problem = LinearContraction.make(gen)
    lam = randn(gen, 3)
    with pytest.raises(ValueError, match="cannot be captured.*NormalCG"):
        hg.GraphedAID(problem.phi, problem.outer_loss, problem.w0(), lam, linear_solver=solver)


def test_bad_calls_are_named(gen):
    problem = LinearContraction.make(gen)
    lam = randn(gen, 3)
    graphed = hg.GraphedAID(problem.phi, problem.outer_loss, problem.w0(), lam, linear_solver=hg.NormalCG())
    with pytest.raises(hg.ShapeMismatchError, match="^w has shape"):
        graphed(torch.zeros(5, dtype=DTYPE), lam)
    with pytest.raises(hg.DtypeMismatchError, match="^lam has dtype"):
        graphed(problem.w0(), lam.float())
    with pytest.raises(ValueError, match="on_failure"):
        graphed(problem.w0(), lam, on_failure="skip")
    with pytest.raises(ValueError, match="graph=True"):
        hg.GraphedAID(problem.phi, problem.outer_loss, problem.w0(), lam, linear_solver=hg.NormalCG(), graph=True)
    with pytest.raises(hg.NonFiniteInputError, match="w0"):
        hg.GraphedAID(problem.phi, problem.outer_loss, problem.w0() * float("nan"), lam, linear_solver=hg.NormalCG())


def test_failures_follow_the_policy(gen):
    problem = LinearContraction.make(gen, norm=0.9)
    lam = randn(gen, 3)
    w = problem.solution(lam)
    graphed = hg.GraphedAID(problem.phi, problem.outer_loss, w, lam, linear_solver=hg.Neumann(rtol=1e-12, maxiter=3))
    with pytest.raises(hg.NotConvergedError, match="max_steps_reached"):
        graphed(w, lam)
    with pytest.warns(hg.ConvergenceWarning):
        graphed(w, lam, on_failure="warn")
    nan_w = w.clone()
    nan_w[0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g, info = graphed(nan_w, lam, on_failure="ignore")
    assert info.linear.result == hg.Result.nonfinite_value
    with pytest.raises(hg.NotConvergedError, match="nonfinite_value"):
        graphed(nan_w, lam)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("warm_start", [False, True])
def test_cuda_graph_replay_equals_the_eager_computation(gen, warm_start):
    problem = Ridge.make(gen, n=200, d=64)
    device = torch.device("cuda")
    problem = dataclasses.replace(problem, **{k: getattr(problem, k).to(device) for k in ("X", "y", "Xv", "yv", "lam")})
    solver = hg.CG(rtol=0.0, atol=0.0, maxiter=12)
    lams = [randn(gen, 64).to(device) * 0.3 for _ in range(3)]
    graphed = hg.GraphedAID(problem.phi, problem.outer_loss, problem.solution(lams[0]), lams[0],
                            linear_solver=solver, warm_start=warm_start)
    eager = hg.GraphedAID(problem.phi, problem.outer_loss, problem.solution(lams[0]), lams[0],
                          linear_solver=solver, warm_start=warm_start, graph=False)
    assert graphed.graphed
    for lam in lams:
        w = problem.solution(lam)
        g, info = graphed(w, lam, on_failure="ignore")
        g_eager, info_eager = eager(w, lam, on_failure="ignore")
        assert torch.allclose(g, g_eager, rtol=1e-10, atol=1e-13)
        assert info.linear.stats.iterations == info_eager.linear.stats.iterations
