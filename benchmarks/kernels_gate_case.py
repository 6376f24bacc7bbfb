"""The gate cotangent of fuzz case 388 (seed 0): T = 2, K = V = 128, n_h = 2, gated bf16.

``dg`` of ``⟨do, o⟩ + ⟨ds, S_T⟩`` per token from the float64 recurrence, the bf16 token-by-token recurrence and
the kernels (bf16 inputs, and the same inputs in float32). The inputs and cotangents are
``benchmarks/data/kernels_fuzz_case388.pt``, drawn on an H100 by ``kernels_check.py``'s case (CUDA's generator
differs from the CPU's). On a GPU this is the kernels' own arithmetic. On the CPU (``TRITON_INTERPRET=1``) the
interpreter multiplies in float32; ``--emulate SCOPE`` rounds the matmul operands to bf16 inside ``SCOPE``, as the
tensor cores see them for bf16 inputs:

* ``all``: every kernel's products (with ``Tuning.gate_dk = "split"``, the default, both halves of ``dS_{c+1}``
  in ``U dS_{c+1}ᵀ``; ``--tuning gate_dk=input`` for the one bf16 ``dS_{c+1}`` before it); ``all_but_dk_tile``:
  all but ``dqkw``'s ``U dS_{c+1}ᵀ``;
* ``scan_dh``, ``dqkw``, ``wy_bwd``: that backward kernel's products alone; ``dk_tile``: only ``dqkw``'s
  ``U dS_{c+1}ᵀ`` (``chunk_bwd._dk_tile``); ``dq_dp_tile``: only its ``dO Sᵀ`` and ``dO Uᵀ``.

``--record FILE`` appends the run (device, versions, command, rows) to the ``runs`` of that JSON file.

    python benchmarks/kernels_gate_case.py [--emulate SCOPE] [--tuning SPEC] [--record FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import types

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels_common import NAMES, env_info, ours

from kernels.delta_product import chunk_bwd, chunk_fwd, common, tangent_bwd, tangent_fwd
from kernels.delta_product.utils import TUNING
from lrnn.ops.recurrent import delta_product_recurrent

CASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "kernels_fuzz_case388.pt")
SCALE = 128 ** -0.5
#: the jitted functions of ``chunk_bwd`` whose products each scope rounds, helpers before their callers
SCOPES = {"all": (), "all_but_dk_tile": (), "scan_dh": ("_dh_update", "_dh_step", "scan_dh_kernel"),
          "dqkw": ("_dq_dp_tile", "_dk_tile", "dqkw_kernel"), "wy_bwd": ("wy_bwd_kernel",), "dk_tile": ("_dk_tile",),
          "dq_dp_tile": ("_dq_dp_tile",)}

@triton.jit
def _mm_bf16(a, b, DOT: tl.constexpr, PREC: tl.constexpr):
    """``mm`` with both operands rounded to bf16 first (the interpreter then multiplies in float32)."""
    return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), input_precision=PREC)


def _rebuilt(jitted, mm):
    """``jitted`` with ``mm`` for its matmuls. The interpreter looks globals up per call; the copy of the module's
    globals taken here holds the helpers rebuilt before it."""
    fn = jitted.fn
    return triton.jit(types.FunctionType(fn.__code__, {**fn.__globals__, "mm": mm}, fn.__name__, fn.__defaults__,
                                         fn.__closure__))


def emulate(scope: str) -> None:
    """Round the matmul operands to bf16 in ``scope`` (:data:`SCOPES`), under the interpreter."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--emulate runs under TRITON_INTERPRET=1 (on a GPU the tensor cores round already)")
    exact = common.mm
    if scope.startswith("all"):
        for module in (chunk_fwd, chunk_bwd, tangent_fwd, tangent_bwd, common):
            module.mm = _mm_bf16
    if scope == "all_but_dk_tile":
        chunk_bwd._dk_tile = _rebuilt(chunk_bwd._dk_tile, exact)
    for name in SCOPES[scope]:
        setattr(chunk_bwd, name, _rebuilt(getattr(chunk_bwd, name), _mm_bf16))


def gate_cotangent(x: dict, do: torch.Tensor, ds: torch.Tensor, f) -> list[float]:
    xs = {n: t.clone().requires_grad_(True) for n, t in x.items()}
    o, s = f(xs)
    return torch.autograd.grad((o.double() * do).sum() + (s.double() * ds).sum(), xs["g"])[0].double().flatten().tolist()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--emulate", choices=tuple(SCOPES), help="bf16 matmul operands in this scope (CPU interpreter)")
    ap.add_argument("--tuning", default="", help="a DELTA_PRODUCT_TUNING spec, e.g. gate_dk=input")
    ap.add_argument("--record", help="append this run to the runs of this JSON file")
    args = ap.parse_args()
    TUNING.update(args.tuning)
    if args.emulate:
        emulate(args.emulate)
    dev = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    x = {n: t.to(dev) for n, t in torch.load(CASE).items()}
    do, ds = x.pop("do"), x.pop("ds")

    def recurrent(z):
        return delta_product_recurrent(*(z.get(n) for n in NAMES), True, SCALE)

    def kernels(z):
        return ours(z, SCALE)

    rows = [("float64 recurrence", {n: t.double() for n, t in x.items()}, recurrent),
            ("bf16 recurrence", x, recurrent), ("kernels, bf16 inputs", x, kernels),
            ("kernels, float32 inputs", {n: t.float() for n, t in x.items()}, kernels)]
    exact, found = None, {}
    print(f"dg per token ({dev}, emulate={args.emulate}, tuning='{TUNING.spec()}')")
    for name, z, f in rows:
        dg = gate_cotangent(z, do, ds, f)
        exact = exact or dg
        err = sum((a - b) ** 2 for a, b in zip(dg, exact)) ** 0.5 / sum(b ** 2 for b in exact) ** 0.5
        found[name] = dict(dg=[round(d, 6) for d in dg], rel_err=float(f"{err:.3g}"))
        print(f"{name:24s} {dg[0]: .6f} {dg[1]: .6f}   relative error {err:.3g}")
    if args.record:
        record(args.record, dict(env_info(), command=" ".join(["python", *sys.argv]), rows=found))


def record(path: str, run: dict) -> None:
    """Append ``run`` to the ``runs`` of the JSON file ``path`` (created if missing)."""
    res = {"runs": []}
    if os.path.exists(path):
        with open(path) as f:
            res = json.load(f)
    res.setdefault("runs", []).append(run)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
