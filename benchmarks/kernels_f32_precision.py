"""GPU: speed and accuracy of float32 inputs by the ``input_precision`` of their dots, beside bf16.

At (4, 4096, 16, 128), no gate, ``n_h ∈ {1, 2, 3}``: forward and forward+backward times
(``triton.testing.do_bench``, 100 ms of repetitions, mean) for bf16, float32 with
``prec_f32 = "tf32x3"`` (the default) and float32 with ``"tf32"`` (one pass; with ``--ieee`` also
``"ieee"``, no tensor cores); and for each, the largest relative error of outputs, final state and gradients against float64 at (1, 1024, 2, 128)
(``kernels_check.first_order``). Writes ``kernels_f32_precision.json`` into ``--out``.

    python benchmarks/kernels_f32_precision.py [--ieee] [--out DIR]
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
from kernels_check import first_order
from kernels_common import env_info, make_inputs, ours

from kernels.delta_product.utils import TUNING

os.environ["DELTA_PRODUCT_POISON"] = "0"  # kernels_check turns NaN-filling on at import; it would cost time here

B, T, H, D = 4, 4096, 16, 128
VARIANTS = (("bf16", torch.bfloat16, "tf32x3"), ("f32 tf32x3", torch.float32, "tf32x3"),
            ("f32 tf32", torch.float32, "tf32"))
IEEE = ("f32 ieee", torch.float32, "ieee")  # no tensor cores: about 20x slower than tf32x3, so only with --ieee


def measure(n_h: int, dtype: torch.dtype) -> dict:
    x = make_inputs(B, T, H, D, D, n_h, dtype=dtype, correlated=n_h > 1, seed=n_h)
    xs = {n: t.requires_grad_(True) for n, t in x.items() if t is not None}
    do = torch.randn_like(ours(xs, D ** -0.5)[0])

    def fwd_bwd():
        torch.autograd.grad(ours(xs, D ** -0.5)[0], list(xs.values()), do)

    fwd = triton.testing.do_bench(lambda: ours(xs, D ** -0.5), warmup=20, rep=100)
    fwdbwd = triton.testing.do_bench(fwd_bwd, warmup=20, rep=100)
    err = first_order(make_inputs(1, 1024, 2, D, D, n_h, dtype=dtype, correlated=n_h > 1, seed=n_h), D ** -0.5)
    return dict(fwd_ms=fwd, fwdbwd_ms=fwdbwd, max_err=max(err.values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--ieee", action="store_true", help="also float32 without tensor cores")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    default = TUNING.prec_f32
    rows = []
    try:
        for n_h in (1, 2, 3):
            for name, dtype, precision in VARIANTS + ((IEEE,) if args.ieee else ()):
                TUNING.prec_f32 = precision
                rows.append(dict(n_h=n_h, variant=name, **measure(n_h, dtype)))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        TUNING.prec_f32 = default
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernels_f32_precision.json"), "w") as f:
        json.dump(dict(env_info(), shape=[B, T, H, D], rows=rows), f, indent=1)
    for r in rows:
        bf16 = next(q for q in rows if q["n_h"] == r["n_h"] and q["variant"] == "bf16")["fwdbwd_ms"]
        print(f"n_h={r['n_h']} {r['variant']:>11}: fwd {r['fwd_ms']:.2f}  fwd+bwd {r['fwdbwd_ms']:.2f} ms "
              f"({r['fwdbwd_ms'] / bf16:.1f}x bf16)  max rel err {r['max_err']:.1e}")


if __name__ == "__main__":
    main()
