"""Wall time per implicit hypergradient at equal accuracy: hypergrad against torchopt, > 10^6 inner parameters.

Problem (``../shared/anchors/torchopt_hypergrad_bench.py``): an MLP 64-1024-1024-10 (tanh) on
scikit-learn's digits, 1000 training points (1,126,410 parameters), per-layer weight decay
``λ ∈ R^3`` (log scale), the weights first trained by Adam on

    L(w, λ) = CE(net_w(X), y) + Σ_l ½ e^{λ_l} ‖W_l‖²,   E(w) = CE(net_w(X_v), y_v).

Hypergradient ``∇f(λ) = −∂_λ∇_w Lᵀ H⁻¹ ∇_w E`` with ``k`` CG iterations (tolerance 0) at the trained
``w``; for hypergrad the lower level is ``Φ(w, λ) = w − η ∇_w L`` and CG runs on
``(I − ∂_w Φᵀ) v = η H v = ∇_w E`` (same Krylov iterates for any ``η > 0``). Rows:

* ``hypergrad.aid + CG``: the engine as a user calls it (symmetry probe on, 2 extra products);
* ``... check_symmetric=False``: without the probe;
* ``hypergrad.GraphedAID + CG`` (GPU): the whole hypergradient (outer gradient, k CG steps,
  final VJP) replayed from one CUDA graph that is captured once and reused for every new
  ``(w, λ)`` (capture time reported apart, and amortized over 10 and 100 calls);
* torchopt 0.7.3 ``custom_root`` with ``solve_cg`` and ``solve_normal_cg``, as in the anchor.

Accuracy: relative error against an independent reference (CG with ``--ref-iters`` iterations on the
Hessian itself, reverse-over-reverse products). Also timed: one gradient and one Hessian-vector
product by reverse-over-reverse (graph kept), forward-over-reverse (``jvp`` of ``grad``), and graphed.

    python benchmarks/hypergrad_speed.py --device cuda            # anchor sizes: 1500 Adam steps, k = 20
    python benchmarks/hypergrad_speed.py --device cpu             # 200 Adam steps, fewer repeats

Prints a table and writes ``benchmarks/results/hypergrad_speed_<device>.json``.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from hypergrad_setup import digits_tensors, environment, median_seconds, package_version, rel_err, save_json
from torch.func import grad, jvp, vjp

import hypergrad as hg

Params = dict[str, torch.Tensor]


class MLPProblem:
    """The anchor's MLP on digits with per-layer weight decay (see the module docstring)."""

    def __init__(self, device: torch.device, train_steps: int, eta: float, seed: int = 0) -> None:
        torch.manual_seed(seed)
        X, y = digits_tensors(device)
        self.Xt, self.yt, self.Xv, self.yv = X[:1000], y[:1000], X[1000:], y[1000:]
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 1024), torch.nn.Tanh(),
            torch.nn.Linear(1024, 10),
        ).to(device)
        self.apply, w = hg.make_functional(self.net)
        self.weights = [name for name in w if name.endswith("weight")]
        self.lam = torch.log(torch.full((len(self.weights),), 1e-3, device=device))
        self.eta = eta
        self.phi = hg.gradient_step_map(self.train_loss, eta)
        self.w = self._train(w, train_steps)
        self.size = sum(t.numel() for t in self.w.values())

    def train_loss(self, w: Params, lam: torch.Tensor) -> torch.Tensor:
        reg = sum(0.5 * lam[i].exp() * (w[name] ** 2).sum() for i, name in enumerate(self.weights))
        return F.cross_entropy(self.apply(w, self.Xt), self.yt) + reg

    def outer_loss(self, w: Params, lam: torch.Tensor | None = None) -> torch.Tensor:
        return F.cross_entropy(self.apply(w, self.Xv), self.yv)

    def _train(self, w: Params, steps: int) -> Params:
        w = {k: v.clone().requires_grad_(True) for k, v in w.items()}
        optimizer = torch.optim.Adam(list(w.values()), lr=1e-3)
        for _ in range(steps):
            optimizer.zero_grad()
            self.train_loss(w, self.lam).backward()
            optimizer.step()
        return {k: v.detach() for k, v in w.items()}


def reference(problem: MLPProblem, iters: int) -> torch.Tensor:
    """``−∂_λ∇_w Lᵀ H⁻¹ ∇_w E`` with ``iters`` CG steps on ``H`` (reverse-over-reverse products, no ``Φ``)."""
    w, lam = problem.w, problem.lam
    b, unravel = hg.tree_ravel(grad(problem.outer_loss)(w))
    _, hvp = vjp(lambda w_: grad(problem.train_loss)(w_, lam), w)
    solution = hg.CG(rtol=0.0, atol=0.0, maxiter=iters, check_symmetric=False).solve(
        lambda v: hg.tree_ravel(hvp(unravel(v))[0])[0], b, on_failure="ignore"
    )
    _, pull = vjp(lambda l: grad(problem.train_loss)(w, l), lam)
    return -pull(unravel(solution.value))[0]


def engine_aid(problem: MLPProblem, k: int, check_symmetric: bool) -> Callable[[], torch.Tensor]:
    solver = hg.CG(rtol=0.0, atol=0.0, maxiter=k, check_symmetric=check_symmetric)

    def run() -> torch.Tensor:
        return hg.aid(problem.phi, problem.outer_loss, problem.w, problem.lam, inner=None,
                      linear_solver=solver, on_failure="ignore").grad

    return run


def cuda_graphed(fn: Callable[..., torch.Tensor], *static_inputs: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Capture ``fn(*static_inputs)`` in a CUDA graph; the returned callable replays it (copy inputs in first)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_output = fn(*static_inputs)

    def replay() -> torch.Tensor:
        graph.replay()
        return static_output

    return replay


def torchopt_hypergradients(problem: MLPProblem, k: int) -> dict[str, Callable[[], torch.Tensor]]:
    """torchopt ``custom_root`` on ``∇_w L(w, λ) = 0`` with ``solve_cg`` / ``solve_normal_cg`` (anchor script).

    torchopt's ``custom_root`` takes tuples of tensors, not dicts: the parameters are passed in
    ``problem.w``'s order.
    """
    import torchopt
    from torchopt.diff.implicit import custom_root

    names = list(problem.w)
    w_tuple = tuple(problem.w.values())
    g_fn = grad(problem.train_loss)

    def optimality(p: tuple[torch.Tensor, ...], lam: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(g_fn(dict(zip(names, p)), lam).values())

    solvers = {
        "torchopt custom_root + solve_cg": torchopt.linear_solve.solve_cg(maxiter=k, rtol=0.0, atol=0.0),
        "torchopt custom_root + solve_normal_cg": torchopt.linear_solve.solve_normal_cg(maxiter=k, rtol=0.0, atol=0.0),
    }
    out = {}
    for name, solve in solvers.items():
        @custom_root(optimality, argnums=1, solve=solve)
        def solution(p0: tuple[torch.Tensor, ...], lam: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return w_tuple

        def run(solution=solution) -> torch.Tensor:
            lam = problem.lam.clone().requires_grad_(True)
            w = dict(zip(names, solution(w_tuple, lam)))
            return torch.autograd.grad(problem.outer_loss(w), lam)[0]

        out[name] = run
    return out


def hvp_timings(problem: MLPProblem, device: torch.device, repeats: int) -> dict[str, float]:
    """Milliseconds of one gradient and of one Hessian-vector product, by several routes."""
    w, lam = problem.w, problem.lam
    g_fn = grad(problem.train_loss)
    v = {k: torch.randn_like(t) for k, t in w.items()}
    _, retained = vjp(lambda w_: g_fn(w_, lam), w)
    times = {
        "grad": lambda: g_fn(w, lam),
        "hvp reverse-over-reverse, graph kept (the engine's operator)": lambda: retained(v),
        "hvp reverse-over-reverse, rebuilt per product": lambda: vjp(lambda w_: g_fn(w_, lam), w)[1](v),
        "hvp forward-over-reverse (jvp of grad)": lambda: jvp(lambda w_: g_fn(w_, lam), (w,), (v,))[1],
    }
    if device.type == "cuda":
        flat_w, unravel = hg.tree_ravel(w)
        flat_v = hg.tree_ravel(v)[0]

        def rr(v_: torch.Tensor, w_: torch.Tensor) -> torch.Tensor:
            return hg.tree_ravel(vjp(lambda x: g_fn(unravel(x), lam), w_)[1](unravel(v_))[0])[0]

        def fr(v_: torch.Tensor, w_: torch.Tensor) -> torch.Tensor:
            return hg.tree_ravel(jvp(lambda x: g_fn(unravel(x), lam), (w_,), (v_,))[1])[0]

        for name, fn in (("reverse-over-reverse", rr), ("forward-over-reverse", fr)):
            try:
                times[f"hvp {name}, CUDA graph"] = cuda_graphed(fn, flat_v.clone(), flat_w.clone())
            except Exception as error:  # noqa: BLE001 - a failure is a result
                print(f"CUDA graph of the {name} product failed: {type(error).__name__}: {error}"[:300])
    return {name: 1e3 * median_seconds(fn, device, repeats) for name, fn in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--k", type=int, default=20, help="CG iterations")
    parser.add_argument("--train-steps", type=int, default=None, help="Adam steps (default 1500 on GPU, 200 on CPU)")
    parser.add_argument("--eta", type=float, default=1.0, help="step size of Φ (does not change CG's iterates)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 10 on GPU, 3 on CPU)")
    parser.add_argument("--ref-iters", type=int, default=300)
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    repeats = args.repeats or (10 if gpu else 3)
    problem = MLPProblem(device, args.train_steps or (1500 if gpu else 200), args.eta)
    ref = reference(problem, args.ref_iters)

    methods: dict[str, Callable[[], Any]] = {
        "hypergrad.aid + CG": engine_aid(problem, args.k, check_symmetric=True),
        "hypergrad.aid + CG(check_symmetric=False)": engine_aid(problem, args.k, check_symmetric=False),
    }
    extra: dict[str, Any] = {}
    try:
        start = time.perf_counter()
        graphed = hg.GraphedAID(problem.phi, problem.outer_loss, problem.w, problem.lam,
                                linear_solver=hg.CG(rtol=0.0, atol=0.0, maxiter=args.k))
        if gpu:
            torch.cuda.synchronize()
        extra["graph_capture_ms" if gpu else "construction_ms"] = 1e3 * (time.perf_counter() - start)
        methods["hypergrad.GraphedAID + CG"] = lambda: graphed(problem.w, problem.lam, on_failure="ignore").grad
    except Exception as error:  # noqa: BLE001 - a failure is a result
        extra["graph_capture_error"] = f"{type(error).__name__}: {error}"[:500]
    try:
        methods.update(torchopt_hypergradients(problem, args.k))
    except ImportError as error:
        extra["torchopt"] = f"not installed: {error}"

    rows = {}
    for name, run in methods.items():
        try:
            seconds = median_seconds(run, device, repeats)
            rows[name] = {"ms": 1e3 * seconds, "rel_err": rel_err(run(), ref)}
        except Exception as error:  # noqa: BLE001 - a failure is a result
            rows[name] = {"ms": float("nan"), "rel_err": float("nan"), "error": f"{type(error).__name__}: {error}"[:300]}
    if "graph_capture_ms" in extra and "hypergrad.GraphedAID + CG" in rows:
        per_call = rows["hypergrad.GraphedAID + CG"]["ms"]
        for calls in (10, 100):
            rows[f"hypergrad.GraphedAID + CG, capture amortized over {calls} calls"] = {
                "ms": per_call + extra["graph_capture_ms"] / calls,
                "rel_err": rows["hypergrad.GraphedAID + CG"]["rel_err"],
            }
    base = rows.get("torchopt custom_root + solve_cg", {}).get("ms")
    for row in rows.values():
        row["vs_torchopt_cg"] = row["ms"] / base if base else None
    hvps = hvp_timings(problem, device, repeats)

    result = {
        **environment(device),
        "versions": {"torchopt": package_version("torchopt")},
        "problem": {"inner_params": problem.size, "hyperparameters": 3, "k": args.k, "eta": args.eta,
                    "train_steps": args.train_steps or (1500 if gpu else 200), "ref_iters": args.ref_iters},
        "repeats": repeats,
        "hypergradient": rows,
        "unit_ms": hvps,
        **extra,
    }
    path = save_json(result, f"hypergrad_speed_{device.type}.json")
    print(f"\n{result['device']}, torch {result['torch']}, {problem.size:,} inner parameters, k = {args.k}, "
          f"median of {repeats}, {result['date']}")
    print("\n| method | ms per hypergradient | × torchopt CG | rel. error vs reference |\n|---|---|---|---|")
    for name, row in rows.items():
        ratio = f"{row['vs_torchopt_cg']:.2f}" if row["vs_torchopt_cg"] else "-"
        print(f"| {name} | {row['ms']:.1f} | {ratio} | {row['rel_err']:.3g} |")
        if "error" in row:
            print(f"  {row['error']}")
    print("\n| unit | ms |\n|---|---|")
    for name, ms in hvps.items():
        print(f"| {name} | {ms:.2f} |")
    if "graph_capture_ms" in extra:
        print(f"\nCUDA graph capture (once): {extra['graph_capture_ms']:.0f} ms")
    if "graph_capture_error" in extra:
        print(f"\nCUDA graph capture failed: {extra['graph_capture_error']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
