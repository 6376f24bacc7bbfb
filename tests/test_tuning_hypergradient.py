"""Hypergradients through the training of a DeltaProduct stack (float64): finite differences,
the implicit formula with a dense Hessian, the relaxed n_h, and the projections."""
import dataclasses

import pytest
import torch
from torch.func import functional_call

import hypergrad
from hypergrad.bilevel import bilevel
from hypergrad.pytree import tree_ravel
from lrnn.models import SequenceModel
from lrnn.tasks import make_task
from lrnn.tuning.hypergradient import (
    HypergradientSettings,
    TrainingHypergradient,
    validation_loss,
)
from lrnn.tuning.hyperparams import HyperSetting, HyperSpace, model_inputs
from lrnn.tuning.training import InnerOptimizer, Trainer

DTYPE = torch.float64


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _space(L=1, H=2, n_h=2, tune=("eigen_scale", "step_gates", "beta_bias", "lr", "weight_decay"), lr=0.05, fix_first=False):
    settings = {
        "eigen_scale": HyperSetting(1.4, (1.0, 2.0), "eigen_scale" in tune, per="head"),
        "step_gates": HyperSetting(
            [1.0 if fix_first else 0.9] + [0.6] * (n_h - 1), (0.0, 1.0), "step_gates" in tune, fix_first=fix_first
        ),
        "beta_bias": HyperSetting(0.3, (-4.0, 4.0), "beta_bias" in tune, per="head"),
        "lr": HyperSetting(lr, (1e-4, 1.0), "lr" in tune, per="layer"),
        "weight_decay": HyperSetting(0.05, (0.0, 1.0), "weight_decay" in tune, per="global"),
    }
    return HyperSpace(settings, L, H, n_h)


def _setup(optimizer="adam", n_h=2, backend="chunked", seed=0, lr=0.05, mlp_ratio=0, tune=None, d_model=8, heads=2, fix_first=False):
    torch.manual_seed(seed)
    task = make_task("parity")
    model = SequenceModel(
        task.vocab_size, task.num_classes, d_model=d_model, num_layers=1, mlp_ratio=mlp_ratio, num_heads=heads,
        num_householder=n_h, backend=backend, chunk_size=4,
    ).to(DTYPE)
    kwargs = {} if tune is None else {"tune": tune}
    space = _space(H=heads, n_h=n_h, lr=lr, fix_first=fix_first, **kwargs)
    opt = InnerOptimizer(optimizer, momentum=0.5, grad_clip=0.5, warmup=2, schedule="cosine", horizon=6)
    trainer = Trainer(model, space, task, [5, 7], 4, opt, seed=seed)
    return trainer, space


def _unrolled_value(trainer, outer, lam, salt, steps):
    state = trainer.initial_state()
    phi = trainer.step_map(salt)
    for _ in range(steps):
        state = phi(state, lam)
    return outer(state, lam)


def _draw(seed):
    """The batch stream that the hypergradient draws from a generator seeded with ``seed``."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("optimizer, method", [("adam", "itd"), ("sgd", "checkpointed_itd")])
def test_hypergradient_through_training_matches_central_differences(optimizer, method):
    trainer, space = _setup(optimizer)
    steps = 4
    settings = HypergradientSettings(method=method, inner_steps=steps, val_lengths=(9,), val_batch_size=4)
    hypergradient = TrainingHypergradient(trainer, settings)
    lam = space.initial(DTYPE)
    estimate = hypergradient(trainer.initial_state(), lam, generator=torch.Generator().manual_seed(0))
    salt = _draw(0)
    outer = validation_loss(trainer, hypergradient.validation_batch(salt))
    flat, unravel = tree_ravel(lam)
    grad, _ = tree_ravel(estimate.grad)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    eps = 1e-6

    def derivative(direction):
        plus = _unrolled_value(trainer, outer, unravel(flat + eps * direction), salt, steps)
        minus = _unrolled_value(trainer, outer, unravel(flat - eps * direction), salt, steps)
        return float((plus - minus) / (2 * eps))

    direction = torch.randn(flat.shape, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    fd = derivative(direction)
    assert abs(fd - float(grad @ direction)) <= 1e-6 * max(1.0, abs(fd))
    if optimizer == "adam":  # every hyperparameter, one coordinate at a time
        for i, e in enumerate(torch.eye(flat.numel(), dtype=DTYPE)):
            fd = derivative(e)
            assert abs(fd - float(grad[i])) <= 1e-6 * max(1.0, abs(fd)), i


def test_truncated_itd_equals_itd_from_the_intermediate_state():
    trainer, space = _setup("adam")
    lam = space.initial(DTYPE)
    hypergradient = TrainingHypergradient(
        trainer, HypergradientSettings("truncated_itd", inner_steps=5, truncate=2, val_lengths=(9,), val_batch_size=4)
    )
    truncated = hypergradient(trainer.initial_state(), lam, generator=torch.Generator().manual_seed(3))
    salt = _draw(3)
    start = trainer.run(trainer.initial_state(), lam, salt, 3)
    outer = validation_loss(trainer, hypergradient.validation_batch(salt))
    ref = hypergrad.itd(trainer.step_map(salt), outer, start, lam, steps=2)
    for key in lam:
        torch.testing.assert_close(truncated.grad[key], ref.grad[key], rtol=1e-10, atol=1e-12)


def test_aid_matches_the_implicit_formula_with_a_dense_hessian():
    """``∇f = ∇_λE − ∂_λ(∇_θL)ᵀ (∇²_θL + δP)⁻¹ ∇_θE`` at the trained weights (P: the decayed coordinates)."""
    trainer, space = _setup("adam", tune=("eigen_scale", "beta_bias", "weight_decay"), n_h=1, d_model=4, heads=1)
    # decay every parameter: RMSNorm makes the loss scale-invariant in some directions (a singular ∇²L)
    trainer.decays = {name: True for name in trainer.decays}
    lam = space.initial(DTYPE)
    settings = HypergradientSettings(
        "aid", inner_steps=2, val_lengths=(9,), val_batch_size=4, aid_solver="dense", aid_iterations=1,
        aid_step_size=0.1, aid_batch_size=8,
    )
    hyper = TrainingHypergradient(trainer, settings)
    estimate = hyper(trainer.initial_state(), lam, generator=torch.Generator().manual_seed(5))
    salt = _draw(5)
    params = estimate.info.w["params"]
    batch = hyper.aid_batch(salt)
    val = hyper.validation_batch(salt)
    theta, unravel_theta = tree_ravel(params)
    lam_flat, unravel_lam = tree_ravel(lam)

    def regularized_grad(t, l):
        p, h = unravel_theta(t), unravel_lam(l)
        g = torch.func.grad(trainer.loss)(p, h, batch)
        decay = space.full(h)["weight_decay"][0]
        g = {n: g[n] + decay * p[n] if trainer.decays[n] else g[n] for n in g}
        return tree_ravel(g)[0]

    hessian = torch.func.jacrev(regularized_grad, argnums=0)(theta, lam_flat)
    cross = torch.func.jacrev(regularized_grad, argnums=1)(theta, lam_flat)
    e_theta, e_lam = torch.func.grad(
        lambda t, l: trainer.loss(unravel_theta(t), unravel_lam(l), val), argnums=(0, 1)
    )(theta, lam_flat)
    assert torch.linalg.cond(hessian) < 1e8
    expected = e_lam - cross.T @ torch.linalg.solve(hessian, e_theta)
    got, _ = tree_ravel(estimate.grad)
    assert estimate.info.linear.converged
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", ["recurrent", "chunked"])
def test_relaxed_nh_with_gates_zero_beyond_the_first_is_nh_1(backend):
    trainer3, space3 = _setup(n_h=3, backend=backend, tune=("step_gates",))
    trainer1, space1 = _setup(n_h=1, backend=backend, tune=())
    m3, m1 = trainer3.model, trainer1.model
    # n_h = 1 copy: the first micro-step's rows of the k, v, β projections and convolutions ([n_h, H, D] order)
    p3 = {n: p.detach() for n, p in m3.named_parameters()}
    p1 = {}
    for name, p in m1.named_parameters():
        p1[name] = p3[name][: p.shape[0]] if p3[name].shape != p.shape else p3[name]
    lam3 = {"step_gates": torch.tensor([[0.9, 0.0, 0.0]], dtype=DTYPE)}  # m_1 = 0.9 as in the n_h = 1 space
    tokens = make_task("parity").sample(3, 13, 0).tokens
    out3 = functional_call(m3, model_inputs(m3, p3, space3.full(lam3)), (tokens,))
    out1 = functional_call(m1, model_inputs(m1, p1, space1.full({})), (tokens,))
    # the same sums with exact zeros added: equal up to the rounding of reordered float64 reductions (the
    # recurrent path within a few ulps; it differed by one on some CPUs), the chunked path's blocked solves more
    torch.testing.assert_close(out3, out1, rtol=0, atol=1e-14 if backend == "recurrent" else 1e-12)
    # the gates stay differentiable at 0: the relaxation can switch micro-steps back on
    grad = torch.func.grad(lambda lam: trainer3.logits(p3, lam, tokens).square().sum())(lam3)["step_gates"]
    assert grad[0, 1:].abs().min() > 0


def test_projection_keeps_every_hyperparameter_in_its_box():
    trainer, space = _setup("sgd", lr=0.02, fix_first=True)
    settings = HypergradientSettings("truncated_itd", inner_steps=2, truncate=1, val_lengths=(9,), val_batch_size=4)
    seen = []
    lower, upper = space.bounds(DTYPE)
    result = bilevel(
        TrainingHypergradient(trainer, settings), space.initial(DTYPE), trainer.initial_state(), steps=4,
        optimizer=lambda p: torch.optim.SGD(p, lr=1e4), bounds=(lower, upper), warm_start=True,
        callbacks=[lambda report: seen.append(report.lam)],
    )
    at_bound = 0
    for lam in seen + [result.lam]:
        space.check(lam)
        for key, value in lam.items():
            assert (value >= lower[key]).all() and (value <= upper[key]).all()
            at_bound += int(((value == lower[key]) | (value == upper[key])).sum())
        assert (lam["step_gates"][..., 0] == 1.0).all()  # fix_first
    assert at_bound > len(seen)  # the huge step did hit the walls


def test_bounds_outside_what_the_model_accepts_are_rejected():
    from lrnn.tuning.hyperparams import HyperparameterError

    base = dict(
        eigen_scale=HyperSetting(1.5, (1.0, 2.0)), step_gates=HyperSetting(1.0, (0.0, 1.0)),
        beta_bias=HyperSetting(0.0, (-1.0, 1.0)), lr=HyperSetting(1e-3, (1e-4, 1e-2)),
        weight_decay=HyperSetting(0.0, (0.0, 1.0)),
    )
    HyperSpace(base, 1, 2, 2)
    bad = {
        "eigen_scale": HyperSetting(1.5, (0.5, 2.0)), "step_gates": HyperSetting(1.0, (0.0, 1.5)),
        "lr": HyperSetting(1e-3, (0.0, 1e-2)), "weight_decay": HyperSetting(0.1, (-0.1, 1.0)),
        "beta_bias": HyperSetting(2.0, (-1.0, 1.0)),
    }
    for name, setting in bad.items():
        with pytest.raises(HyperparameterError, match=name):
            HyperSpace({**base, name: setting}, 1, 2, 2)
    with pytest.raises(HyperparameterError, match="eigen_scale"):
        HyperSpace({**base, "eigen_scale": HyperSetting(2.5, (1.0, 2.0))}, 1, 2, 2)


def test_diverging_training_raises_with_the_reason():
    from lrnn.tuning.hypergradient import InnerDivergenceError

    trainer, _ = _setup("sgd", lr=0.9)
    trainer.optimizer = dataclasses.replace(trainer.optimizer, grad_clip=0.0, warmup=0)
    lam = {"log_lr": torch.full((3,), 80.0, dtype=DTYPE)}  # e^80: the weights overflow
    settings = HypergradientSettings("truncated_itd", inner_steps=3, truncate=1, val_lengths=(9,), val_batch_size=4)
    with pytest.raises(InnerDivergenceError, match="diverged"):
        TrainingHypergradient(trainer, settings)(trainer.initial_state(), lam, generator=torch.Generator().manual_seed(0))
