"""GPU benchmark of ``kernels.delta_product.chunk_delta_product`` against fla 0.6.0 in the same run.

Times (``triton.testing.do_bench`` median, ms) of forward, forward+backward and a Hessian-vector
product (double backward) for bf16 and float32, gate on and off, over (B, T, H, D) ∈
{(4, 4096, 16, 128), (8, 2048, 16, 128), (2, 8192, 8, 64)} and ``n_h ∈ {1, 2, 3}``; fla's
``chunk_gated_delta_product`` (bf16 only) beside them. Writes
``benchmarks/results/kernels_delta_product.json`` (or ``--out``) and prints a table last.

With ``--graphs`` every call is also timed replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``):
the device's time without the host's launch overhead, which at (2, 8192, 8, 64) rivals the kernels.

    python benchmarks/kernels_delta_product.py [--quick] [--profile] [--graphs] [--dtypes ...] [--gates ...]
        [--shapes I ...] [--no-fla] [--no-hvp] [--out DIR]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels_common import bench, bench_graph, env_info, fla_fn, hvp_fn, kernel_profile, make_inputs, ours, precompile

from kernels.delta_product.utils import chunk_tokens

SHAPES = [(4, 4096, 16, 128), (8, 2048, 16, 128), (2, 8192, 8, 64)]


def ceilings():
    """Device-to-device copy rate (bytes read + written per second) and 8192³ matmul rates."""
    src = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    res = dict(copy_Bps=2 * src.numel() * 2 / (bench(functools.partial(dst.copy_, src)) * 1e-3))
    del src, dst
    for dt in (torch.bfloat16, torch.float32):
        a, b = (torch.randn(8192, 8192, device="cuda", dtype=dt) for _ in range(2))
        res[f"mm_{str(dt)[6:]}_flops"] = 2 * 8192 ** 3 / (bench(functools.partial(torch.matmul, a, b), rep=50) * 1e-3)
    return res


def model(B, T, H, D, n_h, dtype):
    """Work of the chunked algorithm (matmul FLOPs) and the unavoidable bytes (inputs read once,
    outputs written once). fwd+bwd FLOPs ≈ 3× fwd, HVP ≈ 2× fwd+bwd (reverse over reverse)."""
    ct = chunk_tokens(n_h)
    L, nc = ct * n_h, triton.cdiv(T, ct)
    K = V = D
    per_chunk = 2 * L * L * K + 2 * L * L * (K + V) + 4 * L * K * V + 2 * ct * L * K + 2 * ct * K * V + 2 * ct * L * V
    fwd = B * H * nc * per_chunk
    e = 2 if dtype == torch.bfloat16 else 4
    x_bytes = e * B * H * T * (K + n_h * (K + V) + n_h) + e * B * T * H * V
    return dict(fwd_flop=fwd, fwdbwd_flop=3 * fwd, hvp_flop=6 * fwd, fwd_bytes=x_bytes, fwdbwd_bytes=3 * x_bytes,
                hvp_bytes=5 * x_bytes)


def timed(out: dict, name: str, fn, graphs: bool, rep: int = 60) -> None:
    """``out[name_ms]`` by :func:`bench` and, with ``graphs``, ``out[graph_name_ms]`` by :func:`bench_graph`;
    a failure is recorded as NaN and its message under ``errors``."""
    for key, timer in ((f"{name}_ms", bench), (f"graph_{name}_ms", bench_graph))[:2 if graphs else 1]:
        try:
            out[key] = timer(fn, rep=rep)
        except Exception as e:  # noqa: BLE001 - recorded as a result
            out[key] = float("nan")
            out.setdefault("errors", []).append(f"{key}: {e!r}"[:200])
        torch.cuda.empty_cache()


def time_ours(x, do, hvp=True, graphs=False):
    xs = [t for t in x.values() if t is not None]
    out = {}
    timed(out, "fwd", lambda: ours(x), graphs)
    timed(out, "fwdbwd", lambda: torch.autograd.grad(ours(x)[0], xs, do), graphs)
    if hvp:
        timed(out, "hvp", hvp_fn(x, do), graphs, rep=20)
    return out


def time_fla(x, do, n_h, graphs=False):
    f = fla_fn(x, n_h)
    out = {}
    timed(out, "fwd", f, graphs)
    timed(out, "fwdbwd", lambda: torch.autograd.grad(f(), f.inputs, do), graphs)
    return out


def profile(x, do):
    """Per-kernel CUDA time of one forward+backward (torch.profiler)."""
    xs = [t for t in x.values() if t is not None]
    return kernel_profile(lambda: torch.autograd.grad(ours(x)[0], xs, do))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="first shape, no gate, bf16 + one float32 row")
    ap.add_argument("--shapes", type=int, nargs="+", help="indices into SHAPES (default all)")
    ap.add_argument("--profile", action="store_true", help="per-kernel times of every row (torch.profiler)")
    ap.add_argument("--dtypes", nargs="+", choices=("bfloat16", "float32"), default=["bfloat16", "float32"])
    ap.add_argument("--gates", nargs="+", choices=("off", "on"), default=["off", "on"])
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--no-hvp", action="store_true")
    ap.add_argument("--graphs", action="store_true", help="also time every call replayed from a CUDA graph")
    ap.add_argument("--no-precompile", action="store_true", help="kernels already in Triton's cache")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    configs = []
    shapes = [SHAPES[i] for i in args.shapes] if args.shapes else SHAPES
    for (B, T, H, D) in shapes[:1] if args.quick else shapes:
        for n_h in (1, 2, 3):
            for gate in ((False,) if args.quick else tuple(g == "on" for g in args.gates)):
                for dtype in (getattr(torch, d) for d in args.dtypes):
                    if args.quick and dtype == torch.float32 and n_h != 2:
                        continue
                    configs.append((B, T, H, D, n_h, gate, dtype))
    errors = [] if args.no_precompile else precompile(
        [(2, H, D, D, n_h, gate, False, dt, not args.no_hvp) for (_, _, H, D, n_h, gate, dt) in configs])
    res = dict(env_info(), ceilings=ceilings(), precompile_errors=errors, rows=[])
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}), flush=True)
    cl = res["ceilings"]
    for (B, T, H, D, n_h, gate, dtype) in configs:
        x = make_inputs(B, T, H, D, D, n_h, dtype=dtype, gate=gate, seed=B * T + n_h)
        for t in x.values():
            if t is not None:
                t.requires_grad_(True)
        do = torch.randn(B, T, H, D, device="cuda", dtype=dtype)
        row = dict(B=B, T=T, H=H, D=D, n_h=n_h, gate=gate, dtype=str(dtype)[6:], **model(B, T, H, D, n_h, dtype))
        try:
            row.update(time_ours(x, do, hvp=not args.no_hvp, graphs=args.graphs))
        except Exception as e:  # noqa: BLE001 - recorded as a result
            row.update(fwd_ms=float("nan"), fwdbwd_ms=float("nan"), error=repr(e)[:300])
        peak = cl["mm_bfloat16_flops"] if dtype == torch.bfloat16 else cl["mm_float32_flops"]
        for m in ("fwd", "fwdbwd", "hvp"):
            if f"{m}_ms" in row:
                floor = max(row[f"{m}_flop"] / peak, row[f"{m}_bytes"] / cl["copy_Bps"]) * 1e3
                row[f"{m}_floor_ms"] = floor
                row[f"{m}_frac_floor"] = floor / row[f"{m}_ms"]
        if dtype == torch.bfloat16 and not args.no_fla:
            row["fla"] = time_fla(x, do, n_h, graphs=args.graphs)
        if args.profile:
            row["profile_ms"] = profile(x, do)
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        del x, do
        torch.cuda.empty_cache()
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kernels_delta_product.json"), "w") as f:
            json.dump(res, f, indent=1)
    print(f"\n{res['device']}  torch {res['torch']}  triton {res['triton']}  "
          f"copy {cl['copy_Bps'] / 1e12:.2f} TB/s  bf16 mm {cl['mm_bfloat16_flops'] / 1e12:.0f} TFLOP/s")
    print(f"{'B,T,H,D':>16} nh gate dtype | fwd   fwd+bwd  hvp  (ms) | fla fwd fwd+bwd | speedup | floor frac fb")
    for r in res["rows"]:
        fla = r.get("fla", {})
        sp = fla.get("fwdbwd_ms", float("nan")) / r["fwdbwd_ms"]
        print(f"{(r['B'], r['T'], r['H'], r['D'])!s:>16} {r['n_h']:>2} {str(r['gate'])[0]:>4} {r['dtype']:>8} | "
              f"{r['fwd_ms']:5.2f} {r['fwdbwd_ms']:7.2f} {r.get('hvp_ms', float('nan')):6.2f} | "
              f"{fla.get('fwd_ms', float('nan')):6.2f} {fla.get('fwdbwd_ms', float('nan')):7.2f} | {sp:6.2f}x | "
              f"{r.get('fwdbwd_frac_floor', float('nan')):.2f}")
    if args.graphs:
        print(f"\nCUDA graphs (device time){'':>4} | fwd   fwd+bwd  hvp  (ms) | fla fwd fwd+bwd | speedup")
        for r in res["rows"]:
            fla = r.get("fla", {})
            nan = float("nan")
            print(f"{(r['B'], r['T'], r['H'], r['D'])!s:>16} {r['n_h']:>2} {str(r['gate'])[0]:>4} {r['dtype']:>8} | "
                  f"{r.get('graph_fwd_ms', nan):5.2f} {r.get('graph_fwdbwd_ms', nan):7.2f} "
                  f"{r.get('graph_hvp_ms', nan):6.2f} | {fla.get('graph_fwd_ms', nan):6.2f} "
                  f"{fla.get('graph_fwdbwd_ms', nan):7.2f} | "
                  f"{fla.get('graph_fwdbwd_ms', nan) / r.get('graph_fwdbwd_ms', nan):6.2f}x")


if __name__ == "__main__":
    main()
