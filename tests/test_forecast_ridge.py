"""Ridge regression differentiated implicitly (hypergrad.ridge) against dense float64 references."""
import pytest
import torch

from hypergrad.ridge import (
    cholesky_apply,
    ridge,
    ridge_cholesky,
    ridge_closed_form,
    ridge_gradient_step,
    ridge_newton_step,
    ridge_system,
)

DT = torch.float64


def _problem(seed: int, batch=(3, 4), n=9, d=5, k=2, shared_rows=False):
    g = torch.Generator().manual_seed(seed)
    x_batch = (batch[0], 1) if shared_rows else batch
    X = torch.randn(*x_batch, n, d, generator=g, dtype=DT).requires_grad_()
    Y = torch.randn(*batch, n, k, generator=g, dtype=DT).requires_grad_()
    lam = (0.05 + torch.rand(*batch, generator=g, dtype=DT)).requires_grad_()
    w = torch.rand(*batch, n, generator=g, dtype=DT)
    w = (w * (w > 0.2)).requires_grad_()  # some rows switched off
    cot = torch.randn(*batch, d, k, generator=g, dtype=DT)
    return X, Y, lam, w, cot


def _reference(X, Y, lam, w):
    """``W = (XᵀΩX + λI)⁻¹ XᵀΩY`` by a dense LU solve (torch.linalg.solve)."""
    Xb = X.expand(*Y.shape[:-2], *X.shape[-2:])
    A = Xb.mT @ (w[..., None] * Xb) + lam[..., None, None] * torch.eye(X.shape[-1], dtype=DT)
    return torch.linalg.solve(A, Xb.mT @ (w[..., None] * Y))


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("step", ["newton", "gradient"])
@pytest.mark.parametrize("shared_rows", [False, True])
def test_implicit_gradient_matches_autograd_through_solve(step, shared_rows):
    X, Y, lam, w, cot = _problem(seed=1 if shared_rows else 2, shared_rows=shared_rows)
    W_ref = _reference(X, Y, lam, w)
    g_ref = torch.autograd.grad((W_ref * cot).sum(), (X, Y, lam, w))
    W = ridge(X, Y, lam, w, step=step)
    g = torch.autograd.grad((W * cot).sum(), (X, Y, lam, w))
    assert _rel(W, W_ref) <= 1e-12
    for name, a, b in zip("X Y lam w".split(), g, g_ref):
        assert a.shape == b.shape, name
        assert _rel(a, b) <= 1e-10, name


def test_closed_form_equals_reference_and_gradcheck_of_implicit_layer():
    X, Y, lam, w, _ = _problem(seed=3, batch=(2,), n=6, d=3, k=1)
    assert _rel(ridge_closed_form(X, Y, lam, w), _reference(X, Y, lam, w)) <= 1e-12
    # finite differences, independent of any closed-form derivative
    assert torch.autograd.gradcheck(lambda X, Y, lam, w: ridge(X, Y, lam, w), (X, Y, lam, w), atol=1e-7)


def test_system_and_cholesky_apply_equal_dense_solve_with_broadcast_rows():
    X, Y, lam, w, _ = _problem(seed=7, shared_rows=True)
    with torch.no_grad():
        Xb = X.expand(*Y.shape[:-2], *X.shape[-2:])
        A_ref = Xb.mT @ (w[..., None] * Xb) + lam[..., None, None] * torch.eye(X.shape[-1], dtype=DT)
        A = ridge_system(X, lam, w)
        assert _rel(A, A_ref) <= 1e-14
        R = torch.randn(*A.shape[:-1], 3, dtype=DT)
        assert _rel(cholesky_apply(ridge_cholesky(X, lam, w), R), torch.linalg.solve(A_ref, R)) <= 1e-12


def test_solution_is_fixed_point_of_both_step_maps():
    X, Y, lam, w, _ = _problem(seed=4)
    with torch.no_grad():
        W = _reference(X, Y, lam, w)
        chol = ridge_cholesky(X, lam, w)
        assert _rel(ridge_newton_step(W, X, Y, lam, w, chol), W) <= 1e-12
        assert _rel(ridge_gradient_step(W, X, Y, lam, w), W) <= 1e-12
        # the gradient step contracts: ‖Φ(V) − W‖ < ‖V − W‖
        V = W + torch.randn_like(W)
        assert (ridge_gradient_step(V, X, Y, lam, w) - W).norm() < (V - W).norm()


def test_newton_adjoint_needs_at_most_two_neumann_steps():
    X, Y, lam, w, cot = _problem(seed=5)
    W, status = ridge(X, Y, lam, w, return_status=True)
    (W * cot).sum().backward()
    assert status.adjoint.stats.iterations <= 2
    assert status.forward.stats.residual_norm <= 1e-12 * float(W.detach().norm())


def test_rejects_non_positive_lambda_and_bad_shapes():
    X, Y, lam, w, _ = _problem(seed=6, n=3, d=5)  # n < d: XᵀΩX is singular
    with pytest.raises(ValueError, match="positive definite"):
        ridge(X, Y, torch.zeros_like(lam), w)
    with pytest.raises(ValueError, match="rows"):
        ridge(X, Y[..., :2, :], lam, w)
    with pytest.raises(ValueError, match="step"):
        ridge(X, Y, lam, w, step="lbfgs")
