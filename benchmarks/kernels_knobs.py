"""GPU: launch knobs (``kernels.delta_product.utils.Tuning`` specs) side by side in one process.

For the defaults and each ``--specs`` entry (``DELTA_PRODUCT_TUNING`` format, e.g. ``wy_late=on``; none: the
defaults alone), at ``--shape`` (default (4, 4096, 16, 128)), without a gate or with one (``--gate``), for each dtype
and ``n_h``: the time of forward+backward, or with ``--hvp`` of a Hessian-vector product (double backward,
``kernels_common.hvp_fn``), as the median of ``triton.testing.do_bench``; the ratio to the defaults,
the per-kernel CUDA times of one such call (torch.profiler) and the largest relative difference of
its result from the defaults' (a spec changes the schedule, not the math). Writes ``--json`` into ``--out``.

    python benchmarks/kernels_knobs.py [--specs wy_late=on wy_late=off] [--dtypes bfloat16 float32]
        [--nh 3 2 1] [--gate] [--hvp] [--shape B T H D] [--json kernels_knobs.json] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels_common import hvp_fn, kernel_profile, make_inputs, ours, rel, run_and_save

from kernels.delta_product.utils import TUNING


def measure(dtype: torch.dtype, n_h: int, specs: list[str], gate: bool = False, hvp: bool = False,
            shape: tuple[int, int, int, int] = (4, 4096, 16, 128)) -> list[dict]:
    B, T, H, D = shape
    x = make_inputs(B, T, H, D, D, n_h, dtype=dtype, gate=gate, correlated=n_h > 1, seed=n_h)
    xs = {n: t.requires_grad_(True) for n, t in x.items() if t is not None}
    do = torch.randn(B, T, H, D, device="cuda", dtype=dtype)

    def fwd_bwd():
        return torch.autograd.grad(ours(xs, D ** -0.5)[0], list(xs.values()), do)

    run = hvp_fn(xs, do, scale=D ** -0.5) if hvp else fwd_bwd

    rows, base = [], None
    for spec in ["", *specs]:
        TUNING.load(spec)
        grads = run()
        base = grads if base is None else base
        ms = triton.testing.do_bench(run, warmup=10, rep=200, return_mode="median")
        rows.append(dict(dtype=str(dtype)[6:], n_h=n_h, gate=gate, timed="hvp" if hvp else "fwdbwd",
                         spec=spec or "defaults", ms=ms, ratio_to_defaults=ms / rows[0]["ms"] if rows else 1.0,
                         diff_from_defaults=max(rel(a, b) for a, b in zip(grads, base)),
                         kernels=kernel_profile(run, reps=3)))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "kernels"}), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--specs", nargs="*", default=[], help="Tuning specs compared with the defaults (none: the defaults)")
    ap.add_argument("--dtypes", nargs="+", choices=("bfloat16", "float32"), default=["bfloat16", "float32"])
    ap.add_argument("--nh", type=int, nargs="+", default=[3, 2, 1])
    ap.add_argument("--gate", action="store_true", help="gated inputs")
    ap.add_argument("--hvp", action="store_true", help="time a Hessian-vector product instead of forward+backward")
    ap.add_argument("--shape", type=int, nargs=4, default=[4, 4096, 16, 128], metavar=("B", "T", "H", "D"))
    ap.add_argument("--json", default="kernels_knobs.json", help="file name under --out")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    res = run_and_save(lambda: [r for dt in args.dtypes for n_h in args.nh
                                for r in measure(getattr(torch, dt), n_h, args.specs, args.gate, args.hvp,
                                                 tuple(args.shape))],
                       args.out, args.json, shape=args.shape, gate=args.gate, timed="hvp" if args.hvp else "fwdbwd")
    print(f"{'dtype':>8} {'n_h':>3} {'spec':>24} | {'HVP' if args.hvp else 'fwd+bwd':>8} {'ratio':>6} {'diff':>8} | "
          "largest kernels (ms)")
    for r in res['rows']:
        top = ", ".join(f"{k.replace('_kernel', '')} {v:.3f}" for k, v in list(r["kernels"].items())[:3])
        print(f"{r['dtype']:>8} {r['n_h']:>3} {r['spec']:>24} | {r['ms']:8.3f} {r['ratio_to_defaults']:5.2f}x "
              f"{r['diff_from_defaults']:8.1e} | {top}")


if __name__ == "__main__":
    main()
