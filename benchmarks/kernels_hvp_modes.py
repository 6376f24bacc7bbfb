"""GPU: the double backward of the DeltaProduct kernels by mode, side by side in one process.

A Hessian-vector product of ``⟨do, o(x)⟩`` (``o = chunk_delta_product(x)``, every input a leaf)
in fixed random directions ``u``, computed by double backward, ``grad(g, x, grad_outputs=u)`` for
``g = grad(⟨do, o⟩, x, create_graph=True)`` (and, timed beside it, as ``grad(⟨g, u⟩, x)``, "<g,u>",
which adds the inner product's elementwise kernels, and by
``torch.func.jvp(torch.func.grad(⟨do, o⟩))``, "jvp") with ``TUNING.hvp_mode`` =
``"dual"`` (the tangent kernels), ``"rev_rev"`` (``torch.func.vjp`` of the composed
form's ``vjp``) or ``"fwd_rev"`` (one ``torch.func.jvp`` of ``x ↦ (f(x), vjp)``): ``fwd_rev`` (bf16
with ``hvp_tf32``, the former default) and ``dual``, or with ``--all-modes`` also ``rev_rev`` and
the composed modes with and without ``hvp_tf32``. At (4, 4096, 16, 128), no gate (``--gate``: with one,
where ``dual`` runs the gated tangent kernels, ``TUNING.tangent_gate``),
``n_h ∈ {1, 2, 3}``, bf16 and float32: the median time (``triton.testing.do_bench``), the ratio to
forward+backward and the relative difference from the first mode's result; at (1, 1024, 2, 128)
with an initial state, without and with a gate (where ``dual`` runs the gated tangent kernels), each
mode's error against the float64 reference (``kernels_check.second_order``). Writes ``kernels_hvp_modes.json``
(``kernels_hvp_modes_gate.json`` with ``--gate``, unless ``--json``).

    python benchmarks/kernels_hvp_modes.py [--all-modes] [--gate] [--nh 3 2 1] [--dtypes bfloat16 float32] [--out DIR] [--json NAME]
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
from kernels_check import second_order
from kernels_common import hvp_fn, hvp_jvp_fn, make_inputs, ours, rel, run_and_save

from kernels.delta_product.utils import TUNING

os.environ["DELTA_PRODUCT_POISON"] = "0"  # kernels_check turns NaN-filling on at import; it would cost time here

B, T, H, D = 4, 4096, 16, 128
MODES = {torch.bfloat16: (("fwd_rev", True), ("dual", False)), torch.float32: (("fwd_rev", False), ("dual", False))}
ALL_MODES = (("rev_rev", False), ("rev_rev", True), ("fwd_rev", False), ("fwd_rev", True), ("dual", False))


def measure(n_h: int, dtype: torch.dtype, modes, gate: bool) -> list[dict]:
    x = make_inputs(B, T, H, D, D, n_h, dtype=dtype, gate=gate, correlated=n_h > 1, seed=n_h)
    xs = {n: t.requires_grad_(True) for n, t in x.items() if t is not None}
    gen = torch.Generator(device="cuda").manual_seed(n_h)
    vs = [torch.randn(t.shape, generator=gen, device="cuda") for t in xs.values()]
    do = torch.randn(B, T, H, D, generator=gen, device="cuda").to(dtype)

    def fwd_bwd():
        return torch.autograd.grad(ours(xs, D ** -0.5)[0], list(xs.values()), do)

    hvp = hvp_fn(xs, do, vs, D ** -0.5)
    hvp_inner = hvp_fn(xs, do, vs, D ** -0.5, inner=True)
    hvp_jvp = hvp_jvp_fn(xs, do, vs, D ** -0.5)
    rows, base = [], None
    for mode, tf32 in modes:
        TUNING.hvp_mode, TUNING.hvp_tf32 = mode, tf32
        result = hvp()
        if base is None:  # the first mode is the baseline
            base = result
        ms = triton.testing.do_bench(hvp, warmup=2, rep=300, return_mode="median")
        inner_ms = triton.testing.do_bench(hvp_inner, warmup=2, rep=300, return_mode="median")
        jvp_result = hvp_jvp()
        jvp_ms = triton.testing.do_bench(hvp_jvp, warmup=2, rep=300, return_mode="median")
        err = {}
        for small_gate in (False, True):
            small = make_inputs(1, 1024, 2, D, D, n_h, dtype=dtype, gate=small_gate, h0=True, correlated=n_h > 1,
                                seed=10 + n_h)
            err.update({f"{k}{'_gate' if small_gate else ''}": e for k, e in second_order(small, D ** -0.5).items()})
        rows.append(dict(n_h=n_h, dtype=str(dtype)[6:], gate=gate, mode=mode, hvp_tf32=tf32, hvp_ms=ms, hvp_inner_ms=inner_ms,
                         hvp_jvp_ms=jvp_ms,
                         jvp_diff=max(rel(a, b) for a, b in zip(jvp_result, result)),
                         diff_from_first=max(rel(a, b) for a, b in zip(result, base)),
                         max_err_vs_float64=max(err.values()), err=err))
    # after the HVPs (timed before them, fwd+bwd read slow)
    fwdbwd = triton.testing.do_bench(fwd_bwd, warmup=10, rep=100, return_mode="median")
    for row in rows:
        row.update(fwdbwd_ms=fwdbwd, ratio=row["hvp_ms"] / fwdbwd, ratio_inner=row["hvp_inner_ms"] / fwdbwd,
                   ratio_jvp=row["hvp_jvp_ms"] / fwdbwd)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--all-modes", action="store_true", help="also rev_rev and the TF32 variants")
    ap.add_argument("--nh", type=int, nargs="+", default=[3, 2, 1],
                    help="largest first: the first n_h of a process timed its fwd+bwd up to 30%% slow on an H100")
    ap.add_argument("--dtypes", nargs="+", choices=("bfloat16", "float32"), default=["bfloat16", "float32"])
    ap.add_argument("--gate", action="store_true", help="time gated inputs")
    ap.add_argument("--json", help="file name under --out (default kernels_hvp_modes[_gate].json)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    name = args.json or ("kernels_hvp_modes_gate.json" if args.gate else "kernels_hvp_modes.json")
    res = run_and_save(lambda: [row for dtype in args.dtypes for n_h in args.nh
                                for row in measure(n_h, getattr(torch, dtype),
                                                   ALL_MODES if args.all_modes else MODES[getattr(torch, dtype)],
                                                   args.gate)],
                       args.out, name, shape=[B, T, H, D], gate=args.gate)
    print(f"{'dtype':>8} {'n_h':>3} {'mode':>8} {'tf32':>5} | {'fwd+bwd':>7} {'HVP ms':>7} {'ratio':>6} "
          f"{'<g,u> ms':>8} {'ratio':>6} {'jvp ms':>7} {'ratio':>6} | {'jvp diff':>8} {'diff vs first':>13} {'err vs f64':>10}")
    for r in res['rows']:
        print(f"{r['dtype']:>8} {r['n_h']:>3} {r['mode']:>8} {str(r['hvp_tf32']):>5} | {r['fwdbwd_ms']:7.2f} "
              f"{r['hvp_ms']:7.2f} {r['ratio']:5.2f}x {r['hvp_inner_ms']:8.2f} {r['ratio_inner']:5.2f}x "
              f"{r['hvp_jvp_ms']:7.2f} {r['ratio_jvp']:5.2f}x | "
              f"{r['jvp_diff']:8.1e} {r['diff_from_first']:13.2e} {r['max_err_vs_float64']:10.2e}")


if __name__ == "__main__":
    main()
