"""Host time of eager DeltaProduct calls at (2, 8192, 8, 64), bf16, without a gate or with one (``--gate``),
n_h = 1..3 (GPU).

At this shape a forward+backward runs 0.5–1.3 ms of kernels, so an eager call is as fast as the host can
issue it: Python, autograd and one Triton launch per kernel. For each ``n_h`` it prints and records

* ``host_fwd``, ``host_fb``: host time per eager forward / forward+backward, without synchronizing (best of
  ``--reps`` loops of ``--calls`` calls, ms); ``host_chunk_fwd``, ``host_chunk_bwd``: the same for the kernel
  launchers alone (``chunk_fwd``, ``chunk_bwd``: Python and Triton launches, no autograd);
* ``bench_fwd``, ``bench_fb``: ``triton.testing.do_bench`` medians of the same eager calls;
* ``graph_fb``: ``do_bench_cudagraph`` of the forward+backward (device time alone);
* ``host_fb_direct_apply``, ``host_fb_function_apply``: ``host_fb`` with the autograd ``Function`` applied by
  ``chunk._apply`` (as the kernels do) and by ``Function.apply``, measured in alternation within this process
  (host times drift between processes more than the difference).

``--tuning`` applies a ``DELTA_PRODUCT_TUNING`` spec (e.g. ``direct_launch=False``). To compare with an
earlier version, run this script with that version's ``kernels`` package first on ``PYTHONPATH``.
Host timings vary between processes on a shared machine; compare rows of one run.

    python benchmarks/kernels_host_time.py [--tag NAME] [--tuning SPEC] [--gate] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels_common import bench, bench_graph, make_inputs, ours, run_and_save

from kernels.delta_product import chunk
from kernels.delta_product.chunk_bwd import chunk_bwd
from kernels.delta_product.chunk_fwd import chunk_fwd
from kernels.delta_product.utils import TUNING, chunk_local_cumsum, chunk_tokens


def host_ms(fn, calls: int, reps: int) -> float:
    """Best over ``reps`` loops of the host time per call of ``calls`` calls to ``fn`` (ms)."""
    best = float("inf")
    for _ in range(reps):
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls * 1e3)
        torch.cuda.synchronize()
    return best


def alternated(fns: dict, calls: int, reps: int) -> dict[str, float]:
    """:func:`host_ms` of each of ``fns`` in turn, ``reps`` rounds of one loop each: the best per name."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for name, fn in fns.items():
            best[name] = min(best[name], host_ms(fn, calls, 1))
    return best


def function_apply(fn):
    """``fn`` run with ``chunk._apply`` replaced by plain ``Function.apply``."""
    def run():
        direct, chunk._apply = chunk._apply, lambda function, *args: function.apply(*args)
        try:
            return fn()
        finally:
            chunk._apply = direct
    return run


def measure(n_h: int, calls: int, reps: int, gate: bool) -> dict:
    x = make_inputs(2, 8192, 8, 64, 64, n_h, dtype=torch.bfloat16, gate=gate, correlated=True, seed=1)
    xs = [t.requires_grad_(True) for t in x.values() if t is not None]
    do = torch.randn(2, 8192, 8, 64, device="cuda", dtype=torch.bfloat16)

    def fwd():
        return ours(x, 0.125)

    def fwdbwd():
        return torch.autograd.grad(ours(x, 0.125)[0], xs, do)

    for _ in range(3):
        fwdbwd()
    q, k, v = (x[n].detach() for n in ("q", "k", "v"))
    beta = x["beta"].detach().float()
    G = chunk_local_cumsum(x["g"].detach(), chunk_tokens(n_h)).contiguous() if gate else None
    saved = chunk_fwd(q, k, v, beta, G, None, 0.125, True)[2]
    launchers = dict(host_chunk_fwd=host_ms(lambda: chunk_fwd(q, k, v, beta, G, None, 0.125, True), calls, reps),
                     host_chunk_bwd=host_ms(lambda: chunk_bwd(q, k, v, beta, G, None, 0.125, saved, do, None), calls,
                                            reps))
    applied = alternated(dict(host_fb_direct_apply=fwdbwd, host_fb_function_apply=function_apply(fwdbwd)), calls,
                         2 * reps)
    return dict(n_h=n_h, gate=gate, host_fwd=host_ms(fwd, calls, reps), host_fb=host_ms(fwdbwd, calls, reps),
                **launchers, bench_fwd=bench(fwd, rep=100), bench_fb=bench(fwdbwd, rep=100),
                graph_fb=bench_graph(fwdbwd), **applied)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", default="current", help="name of this run in the JSON file name")
    ap.add_argument("--tuning", default="", help="a DELTA_PRODUCT_TUNING spec")
    ap.add_argument("--gate", action="store_true", help="gated inputs")
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()

    def collect():
        TUNING.update(args.tuning)
        return [measure(n_h, args.calls, args.reps, args.gate) for n_h in (1, 2, 3)]

    res = run_and_save(collect, args.out, f"kernels_host_time_{args.tag}.json", shape=[2, 8192, 8, 64],
                       spec=args.tuning, gate=args.gate)
    cols = ("host_fwd", "host_fb", "host_chunk_fwd", "host_chunk_bwd", "bench_fwd", "bench_fb", "graph_fb",
            "host_fb_direct_apply", "host_fb_function_apply")
    print("n_h | " + " ".join(f"{c:>9s}" for c in cols) + "  (ms)")
    for r in res["rows"]:
        print(f"{r['n_h']:3d} | " + " ".join(f"{r[c]:{max(9, len(c))}.3f}" for c in cols))


if __name__ == "__main__":
    main()
