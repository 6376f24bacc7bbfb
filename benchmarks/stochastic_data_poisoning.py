"""Data poisoning on scikit-learn's digits: NSID with constant vs decreasing steps vs AID-FP.

Data: ``digits`` (1797 × 64, pixels / 16), shuffled (seed 0): 1,000 training and 797
validation points. The first 30% of the training points (300) are poisoned,
``x̃_i = x_i + δ_i``; the perturbations ``δ ∈ R^{300×64}`` are the outer variables. Lower level:
elastic-net multinomial logistic regression ``W ∈ R^{64×10}``,

    L(W, δ) = (1/n) Σ_i CE(Wᵀx̃_i, y_i) + λ₁‖W‖₁ + ½λ₂‖W‖²,   λ = (10⁻³, 0.3),
    Φ(W, δ) = G(T(W, δ)),  T = W − α∇_W CE,  G = prox_{α(λ₁‖·‖₁ + ½λ₂‖·‖²)},  α = 1/(½ λ_max(XᵀX/n)),

and the attacker's outer objective ``E(W) = −CE_val(W)`` (maximize the validation loss). The
hypergradient ``∇_δ f`` (19,200 entries) at a fixed random ``δ`` (uniform in ±0.1, clipped to
keep pixels in [0, 1]) is estimated by

* AID-FP: ``t`` full-batch proximal-gradient steps, ``k = t`` Neumann steps (``hypergrad.aid``): ``2t + 1`` epochs;
* NSID, decreasing steps: ``t`` stochastic proximal-gradient steps (minibatch 50) and ``k = t``
  steps on the linear system, both with ``η_i = β/(β + i)``, ``β = 2/(1 − q)``; ``w̄`` and
  ``∂_δΦᵀv`` with the full batch (``T_bar``): ``2t/20 + 1`` epochs;
* NSID, constant steps: the same with ``η = 0.5`` throughout.

Reference: the fixed point to ``‖Φ(W) − W‖ ≤ 10⁻¹³‖W‖`` and a dense solve (``hypergrad.Dense``).
Five seeds per stochastic variant. A short projected attack (``hypergrad.bilevel.bilevel``
with NSID hypergradients, Adam, per-pixel bounds keeping ``x̃`` in [0, 1]) closes the run.

    python benchmarks/stochastic_data_poisoning.py [--levels 20 40 100 200 400 1000] [--seeds 5]

Writes ``benchmarks/results/stochastic_data_poisoning.{json,png}``.
"""
from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch.func import grad  # noqa: E402

import hypergrad as hg  # noqa: E402
from hypergrad.bilevel import bilevel  # noqa: E402
from hypergrad.nsid import nsid, prox_gradient_step, stochastic_prox_gradient  # noqa: E402
from hypergrad.prox import elastic_net_prox  # noqa: E402
from hypergrad.stochastic import Constant, InverseTime, Minibatches, StochasticIteration  # noqa: E402
from stochastic_common import DTYPE, Timer, environment, log_log_slope, rel_err, save_figure, save_json  # noqa: E402

N_TRAIN, N_POISON, BATCH = 1000, 300, 50
LAM = (1e-3, 0.3)


class Poisoning:
    """The bilevel problem of the module docstring."""

    def __init__(self) -> None:
        X, y = load_digits(return_X_y=True)
        X, y = torch.tensor(X / 16.0, dtype=DTYPE), torch.tensor(y)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        X, y = X[order], y[order]
        self.X, self.y = X[:N_TRAIN], y[:N_TRAIN]
        self.Xv, self.yv = X[N_TRAIN:], y[N_TRAIN:]
        self.alpha = float(1.0 / (0.5 * torch.linalg.eigvalsh(self.X.T @ self.X / N_TRAIN).max()))
        self.lower = -self.X[:N_POISON]  # pixels stay in [0, 1]
        self.upper = 1.0 - self.X[:N_POISON]
        self.W0 = torch.zeros(64, 10, dtype=DTYPE)

    def inputs(self, delta: torch.Tensor, idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Poisoned features and labels of the rows ``idx`` (all rows when ``None``)."""
        padded = F.pad(delta, (0, 0, 0, N_TRAIN - N_POISON))
        if idx is None:
            return self.X + padded, self.y
        return self.X[idx] + padded[idx], self.y[idx]

    def T_hat(self, W: torch.Tensor, delta: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        Xb, yb = self.inputs(delta, idx)
        return W - self.alpha * grad(lambda W_: F.cross_entropy(Xb @ W_, yb))(W)

    def T(self, W: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.T_hat(W, delta, None)

    def prox(self, Z: torch.Tensor, delta: torch.Tensor, s: float) -> torch.Tensor:
        return elastic_net_prox(Z, s * self.alpha * LAM[0], s * self.alpha * LAM[1])

    def G(self, Z: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.prox(Z, delta, 1.0)

    def phi(self, W: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.G(self.T(W, delta), delta)

    def outer_loss(self, W: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(self.Xv @ W, self.yv)

    def accuracy(self, W: torch.Tensor) -> float:
        return float(((self.Xv @ W).argmax(1) == self.yv).double().mean())


def nsid_curve(P: Poisoning, delta: torch.Tensor, levels: list[int], schedule, seeds: int, reference) -> dict:
    """One SPGD trajectory per seed, snapshotted at every level; NSID's linear system at each snapshot."""
    sampler = Minibatches(N_TRAIN, BATCH)
    rows = {t: [] for t in levels}
    seconds = 0.0
    for seed in range(seeds):
        it = StochasticIteration(steps=max(levels), schedule=schedule)
        state = it.init(P.W0, torch.Generator().manual_seed(seed).get_state())
        step = prox_gradient_step(P.T_hat, P.prox, delta, sampler)
        with Timer() as timer:
            for i in range(max(levels)):
                with torch.no_grad():
                    state = it.update(step, state, sampler)
                if i + 1 in levels:
                    linear = StochasticIteration(steps=i + 1, schedule=schedule)
                    generator = torch.Generator().manual_seed(10_000 * (seed + 1) + i)  # independent of the SPGD stream
                    g = nsid(P.T_hat, P.G, P.outer_loss, state.x, delta, generator, linear=linear,
                             sampler=sampler, T_bar=P.T).grad
                    rows[i + 1].append(rel_err(g, reference) ** 2)
        seconds += timer.seconds
    per_epoch = N_TRAIN // BATCH
    return {t: {"epochs": 2 * t / per_epoch + 1, "squared_errors": rows[t], "mse": sum(rows[t]) / len(rows[t]),
                "min": min(rows[t]), "max": max(rows[t])} for t in levels} | {"seconds": seconds}


def attack(P: Poisoning, delta0: torch.Tensor, steps: int, t: int, beta: float) -> dict:
    """Projected Adam on δ with NSID hypergradients (no warm start), validation accuracy at exact solutions."""
    schedule = InverseTime(beta, beta)
    sampler = Minibatches(N_TRAIN, BATCH)

    def estimate(W_init, delta, *, generator):
        inner = StochasticIteration(steps=t, schedule=schedule)
        W = stochastic_prox_gradient(P.T_hat, P.prox, W_init, delta, generator, iteration=inner, sampler=sampler).value
        linear = StochasticIteration(steps=t, schedule=schedule)
        return nsid(P.T_hat, P.G, P.outer_loss, W, delta, generator, linear=linear, sampler=sampler, T_bar=P.T)

    deltas = [delta0.clone()]
    with Timer() as timer:
        result = bilevel(estimate, delta0, P.W0, steps=steps, optimizer=lambda p: torch.optim.Adam(p, lr=0.05),
                         bounds=(P.lower, P.upper), seed=0, callbacks=[lambda r: deltas.append(r.lam.clone())])
    solver = hg.FixedPointIteration(rtol=1e-10, maxiter=3000)
    every = max(1, steps // 10)
    accuracy = [P.accuracy(solver.solve(P.phi, P.W0, d, on_failure="ignore").value) for d in deltas[::every]]
    return {"steps": steps, "inner_steps": t, "seconds": timer.seconds, "validation_accuracy_every_10pct": accuracy,
            "value": result.history["value"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[20, 40, 100, 200, 400, 1000])
    parser.add_argument("--aid-ts", type=int, nargs="+", default=[1, 2, 5, 10, 20, 50, 100, 200])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--attack-steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with Timer() as total:
        P = Poisoning()
        g = torch.Generator().manual_seed(1)
        delta = (0.2 * torch.rand(N_POISON, 64, generator=g, dtype=DTYPE) - 0.1).clamp(P.lower, P.upper)
        with Timer() as ref_timer:
            solution = hg.FixedPointIteration(rtol=1e-13, maxiter=20_000).solve(P.phi, P.W0, delta)
            W_star = solution.value
            reference = hg.aid(P.phi, P.outer_loss, W_star, delta, inner=None, linear_solver=hg.Dense()).grad
        q = hg.contraction_factor(P.phi, W_star, delta, iters=100)
        beta = 2.0 / (1.0 - q)
        curves = {
            "NSID decreasing": nsid_curve(P, delta, args.levels, InverseTime(beta, beta), args.seeds, reference),
            "NSID constant": nsid_curve(P, delta, args.levels, Constant(0.5), args.seeds, reference),
        }
        aid_rows = {}
        for t in args.aid_ts:
            with Timer() as timer:
                W = P.W0
                with torch.no_grad():
                    for _ in range(t):
                        W = P.phi(W, delta)
                est = hg.aid(P.phi, P.outer_loss, W, delta, inner=None,
                             linear_solver=hg.Neumann(rtol=0.0, maxiter=t), on_failure="ignore").grad
            aid_rows[t] = {"epochs": 2 * t + 1, "mse": rel_err(est, reference) ** 2, "seconds": timer.seconds}
        attack_run = attack(P, delta, args.attack_steps, t=200, beta=beta)

    slopes = {name: log_log_slope(args.levels, [rows[t]["mse"] for t in args.levels]) for name, rows in curves.items()}
    result = {
        **environment(torch.device("cpu")),
        "problem": {
            "data": "digits, shuffled (seed 0), 1000 train (300 poisoned) / 797 validation, pixels / 16",
            "lambda": LAM, "alpha": P.alpha, "contraction": q, "beta_gamma": beta,
            "reference_iterations": solution.stats.iterations, "reference_seconds": ref_timer.seconds,
            "nonzeros": int((W_star != 0).sum()), "clean_accuracy": P.accuracy(
                hg.FixedPointIteration(rtol=1e-10, maxiter=3000).solve(P.phi, P.W0, torch.zeros_like(delta)).value),
            "accuracy_at_delta": P.accuracy(W_star), "batch": BATCH, "seeds": args.seeds,
        },
        "levels_t": args.levels,
        "nsid": curves,
        "aid_fp": aid_rows,
        "log_log_slope_mse_vs_t": slopes,
        "theory_slope": {"NSID decreasing": -1.0, "NSID constant": "0 (plateau at O(eta))"},
        "attack": attack_run,
        "wall_time_s": total.seconds,
    }
    save_json(result, "stochastic_data_poisoning.json")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for (name, rows), color in zip(curves.items(), ("C2", "C3")):
        ep = [rows[t]["epochs"] for t in args.levels]
        ax.loglog(ep, [rows[t]["mse"] for t in args.levels], "o-", color=color,
                  label=f"{name} (slope {slopes[name]:.2f})")
        ax.fill_between(ep, [rows[t]["min"] for t in args.levels], [rows[t]["max"] for t in args.levels],
                        color=color, alpha=0.2)
    ax.loglog([aid_rows[t]["epochs"] for t in args.aid_ts], [aid_rows[t]["mse"] for t in args.aid_ts], "s-", color="C0",
              label="AID-FP")
    ax.set_xlabel("epochs (1,000 sample gradients)")
    ax.set_ylabel("squared relative error of ∇_δ f")
    ax.set_title(f"digits poisoning, {args.seeds} seeds (band: min-max)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
    acc = attack_run["validation_accuracy_every_10pct"]
    ax.plot([i * max(1, args.attack_steps // 10) for i in range(len(acc))], acc, "o-")
    ax.set_xlabel("attack steps (projected Adam, NSID hypergradients)")
    ax.set_ylabel("validation accuracy")
    ax.grid(True, alpha=0.3)
    save_figure(fig, "stochastic_data_poisoning.png")

    p = result["problem"]
    print(f"{result['device']}, torch {result['torch']}, {result['date']}, wall {total.seconds:.1f} s")
    print(f"contraction {q:.4f}, beta {beta:.1f}, nonzeros {p['nonzeros']}, accuracy clean {p['clean_accuracy']:.3f}, "
          f"at delta {p['accuracy_at_delta']:.3f}")
    print("| method | t | epochs | MSE | min | max |")
    print("|---|---|---|---|---|---|")
    for name, rows in curves.items():
        for t in args.levels:
            r = rows[t]
            print(f"| {name} | {t} | {r['epochs']:.1f} | {r['mse']:.2e} | {r['min']:.2e} | {r['max']:.2e} |")
    for t in args.aid_ts:
        print(f"| AID-FP | {t} | {aid_rows[t]['epochs']} | {aid_rows[t]['mse']:.2e} | | |")
    print("log-log slopes of the MSE against t: " + ", ".join(f"{k} {v:.2f}" for k, v in slopes.items()))
    print(f"attack: validation accuracy {acc[0]:.3f} -> {acc[-1]:.3f} in {args.attack_steps} steps "
          f"({attack_run['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
