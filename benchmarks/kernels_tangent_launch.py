"""GPU: launch choices of the tangent kernels (``kernels.delta_product.tangent_fwd``, ``tangent_bwd``).

One Hessian-vector product by double backward at (4, 4096, 16, 128), without a gate or with one (``--gate``),
bf16 or float32 (``--dtype``; ``--nh``, default 2), profiled (torch.profiler) under every combination of
``warps_dual ∈ {4, 8}``, ``block_dual ∈ {half, full}`` (of ``Tuning.tile``; with a gate also a quarter, but
not 16 columns at 8 warps, which ``Tuning`` refuses) and ``bv_dual ∈ {32, 64}``; per tangent kernel, its CUDA time in each, and the fastest choice. ``TANGENT_LAUNCH``
(``TANGENT_LAUNCH_GATE`` with a gate, ``_F32`` for float32) in ``kernels/delta_product/utils.py`` holds those
choices; the first row is the defaults (with ``DELTA_PRODUCT_TUNING``, which every row starts from). Writes
``kernels_tangent_launch[_gate][_float32].json``.

    python benchmarks/kernels_tangent_launch.py [--nh 2] [--dtype bfloat16] [--gate] [--out DIR]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels_common import env_info, hvp_fn, kernel_profile, make_inputs

from kernels.delta_product.utils import TUNING

B, T, H, D = 4, 4096, 16, 128


def save(args: argparse.Namespace, rows: list[dict], path: str) -> dict:
    """Write the rows so far and, per kernel, the fastest of the swept specs (the defaults' row excluded)."""
    swept = [r for r in rows if r["spec"] != "defaults"]
    best = {k: min((r["kernels"][k], r["spec"]) for r in swept if k in r["kernels"]) for k in rows[0]["kernels"]
            if swept}
    res = dict(env_info(), base=os.environ.get("DELTA_PRODUCT_TUNING", ""), shape=[B, T, H, D], dtype=args.dtype,
               n_h=args.nh, gate=args.gate, rows=rows, fastest=best)
    os.makedirs(args.out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nh", type=int, default=2)
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--gate", action="store_true", help="gated inputs")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    x = make_inputs(B, T, H, D, D, args.nh, dtype=dtype, gate=args.gate, correlated=args.nh > 1, seed=args.nh)
    xs = {n: t.requires_grad_(True) for n, t in x.items() if t is not None}
    do = torch.randn(B, T, H, D, device="cuda", dtype=dtype)
    hvp = hvp_fn(xs, do, scale=D ** -0.5)
    tile = TUNING.tile(dtype)
    default = TUNING.spec()
    blocks = ((tile // 4,) if args.gate else ()) + (tile // 2, tile)
    specs = [default] + [",".join(filter(None, (default, f"warps_dual={w},block_dual={b},bv_dual={v}")))
                         for w, b, v in itertools.product((4, 8), blocks, (32, 64))
                         if (w, b) != (8, 16)]  # refused by Tuning: an illegal memory access (float32, gated)
    name = "kernels_tangent_launch" + "_gate" * args.gate + ("" if dtype == torch.bfloat16 else f"_{args.dtype}")
    name += ".json"
    rows = []
    try:
        for i, spec in enumerate(specs):
            TUNING.load(spec)
            times = {k: ms for k, ms in kernel_profile(hvp).items() if "tangent" in k}
            rows.append(dict(spec=spec if i else "defaults", kernels=times, tangent_total_ms=sum(times.values())))
            print(json.dumps(rows[-1]), flush=True)
            res = save(args, rows, os.path.join(args.out, name))  # after every spec: a cut run keeps its rows
    finally:
        TUNING.load(default)
    best = res["fastest"]
    print(f"\n{res['device']}  torch {res['torch']}  triton {res['triton']}  {args.dtype}, n_h = {args.nh}, "
          f"gate {args.gate}; ms per kernel")
    names = sorted(best)
    print(f"{'spec':>42} | " + " ".join(f"{n.replace('_tangent_kernel', ''):>8}" for n in names) + " |  total")
    for r in rows:
        print(f"{r['spec']:>42} | " + " ".join(f"{r['kernels'].get(n, float('nan')):8.3f}" for n in names)
              + f" | {r['tangent_total_ms']:6.3f}")
    for n, (ms, spec) in best.items():
        print(f"fastest {n}: {ms:.3f} ms with {spec}")


if __name__ == "__main__":
    main()
