"""GPU: the fused kernels' outputs at several software-pipeline depths, each depth run twice.

A kernel whose result depends on ``num_stages`` or differs between two identical runs has a race (a
prefetched shared-memory tile overwritten while still read) or a miscompile; the float64 reference says
which depth is right. For each dtype and ``n_h``: ``chunk_fwd`` and ``chunk_bwd`` (no gate, other knobs at
their defaults but ``fuse_min_programs = 0``) at ``Tuning.stages`` = ``stages_scan`` = ``stages_dh`` = ``stages_dual`` = 3, 3
again, 2 and 1, every output and saved intermediate against the first run, and ``o``, ``dq``, ``dk``, ``dv``,
``dβ`` against float64 (relative norm errors). With ``--hvp`` also a Hessian-vector product by double backward (the tangent kernels; gate off
and on) at each depth, against the first and against float64.

    python benchmarks/kernels_stage_check.py [--dtypes bfloat16 float32] [--nh 2 3] [--shape B T H D] [--hvp]
        [--out DIR]

Without a GPU it runs under ``TRITON_INTERPRET=1`` on the CPU (a check of the script only: the interpreter
has no pipeline).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels_common import hvp_fn, make_inputs, reference_fn, rel, run_and_save

from kernels.delta_product import chunk_bwd, chunk_fwd
from kernels.delta_product.utils import TUNING

DEPTHS = (3, 3, 2, 1)
NAMES = ("o", "Ti", "W", "Hs", "U", "dq", "dk", "dv", "dbeta", "dU", "dHs", "dW")


def at_depth(stages: int) -> None:
    """Every pipeline depth at ``stages``, and ``fuse_min_programs = 0``: this shape's grids are smaller than the
    benchmark shapes', so without it the bf16 ``scan_h`` would not be the fused one that runs there."""
    TUNING.stages = TUNING.stages_scan = TUNING.stages_dh = TUNING.stages_dual = stages
    TUNING.fuse_min_programs = 0


def outputs(x: dict, do, scale: float, stages: int) -> dict:
    at_depth(stages)
    beta = x["beta"].float()
    o, _, saved = chunk_fwd.chunk_fwd(x["q"], x["k"], x["v"], beta, None, None, scale, False)
    grads, mids = chunk_bwd.chunk_bwd(x["q"], x["k"], x["v"], beta, None, None, scale, saved, do, None)
    return dict(zip(NAMES, (t.clone() for t in (o, *saved, *grads[:4], *mids))))


def inputs(dtype: torch.dtype, n_h: int, shape: tuple[int, int, int, int], gate: bool = False):
    """Benchmark inputs (correlated micro-step keys for ``n_h > 1``) and an output cotangent, on the GPU if any."""
    B, T, H, D = shape
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = make_inputs(B, T, H, D, D, n_h, dtype=dtype, gate=gate, correlated=n_h > 1, seed=n_h, device=dev)
    return x, torch.randn(B, T, H, D, device=dev, dtype=dtype), D ** -0.5


def compare(row: dict, runs: list[dict], ref: dict, what: str) -> dict:
    """``row`` with each run's tensors against the first run's and against float64 ``ref``, printed."""
    row.update(depths=list(DEPTHS), vs_first={n: [rel(r[n], runs[0][n]) for r in runs[1:]] for n in runs[0]},
               vs_float64={n: [rel(r[n], ref[n]) for r in runs] for n in ref})
    row["same_at_every_depth"] = all(e == 0.0 for errs in row["vs_first"].values() for e in errs)
    print(row["dtype"], row["n_h"], what, "same at every depth:", row["same_at_every_depth"],
          {n: f"{max(e):.2e}" for n, e in row["vs_float64"].items()}, flush=True)
    return row


def check(dtype: torch.dtype, n_h: int, shape: tuple[int, int, int, int]) -> dict:
    x, do, scale = inputs(dtype, n_h, shape)
    runs = [outputs(x, do, scale, s) for s in DEPTHS]
    x64 = {n: t.double().requires_grad_(True) for n, t in x.items() if t is not None}
    o64, _ = reference_fn(scale, n_h)(x64)
    g64 = torch.autograd.grad(o64, [x64[n] for n in ("q", "k", "v", "beta")], do.double())
    ref = dict(zip(("o", "dq", "dk", "dv", "dbeta"), (o64, *g64)))
    return compare(dict(dtype=str(dtype)[6:], n_h=n_h), runs, ref, "first order")


def check_hvp(dtype: torch.dtype, n_h: int, shape: tuple[int, int, int, int], gate: bool) -> dict:
    """The double-backward HVP (``kernels_common.hvp_fn``) at each depth, against the first and float64."""
    x, do, scale = inputs(dtype, n_h, shape, gate)
    xs = {n: t.requires_grad_(True) for n, t in x.items() if t is not None}
    vs = [torch.randn_like(t, dtype=torch.float64) for t in xs.values()]
    runs = []
    for s in DEPTHS:
        at_depth(s)
        runs.append(dict(zip(xs, (h.clone() for h in hvp_fn(xs, do, vs, scale)()))))
    x64 = {n: t.detach().double().requires_grad_(True) for n, t in xs.items()}
    o64, _ = reference_fn(scale, n_h)(x64)
    g64 = torch.autograd.grad(o64, list(x64.values()), do.double(), create_graph=True)
    ref = dict(zip(xs, torch.autograd.grad(g64, list(x64.values()), vs)))
    return compare(dict(dtype=str(dtype)[6:], n_h=n_h, gate=gate, timed="hvp"), runs, ref,
                   "HVP" + (" gated" if gate else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", nargs="+", choices=("bfloat16", "float32"), default=["bfloat16", "float32"])
    ap.add_argument("--nh", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--shape", type=int, nargs=4, default=[2, 2048, 8, 128], metavar=("B", "T", "H", "D"))
    ap.add_argument("--hvp", action="store_true", help="also the double-backward HVP, gate off and on")
    ap.add_argument("--json", default="kernels_stage_check.json", help="file name under --out")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    cases = [(getattr(torch, dt), n_h) for dt in args.dtypes for n_h in args.nh]
    run_and_save(lambda: [check(dt, n_h, tuple(args.shape)) for dt, n_h in cases]
                 + [check_hvp(dt, n_h, tuple(args.shape), gate) for dt, n_h in cases for gate in (False, True)
                    if args.hvp],
                 args.out, args.json, shape=args.shape)


if __name__ == "__main__":
    main()
