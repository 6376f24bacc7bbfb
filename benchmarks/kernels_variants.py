"""GPU comparison of the DeltaProduct kernel variants (``kernels.delta_product.utils.Tuning``) in one run.

1. Tuning shape (4, 4096, 16, 128), ``n_h = 2``, bf16: every variant is checked, then timed
   (forward, forward+backward) with a per-kernel CUDA profile. The per-kernel winners combine
   into a ``best`` variant (checked and timed too; if it loses to a single variant, that one is best).
   Default, tiles and best are also checked in float32 with gate and initial state (tolerance 1e-4).
2. Correctness of every variant at the three benchmark shapes, ``n_h = 1..3``, bf16, no gate; and of
   default/tiles/best with gate and initial state, and in float32 (tolerance 1e-4): kernel buffers
   NaN-poisoned, every output and gradient element finite, and the heads
   ``(b, h) ∈ {0, B−1} × {0, H−1}`` of outputs, final state and all gradients against the float64
   composed reference run on those heads alone (heads are independent, so this is exact for them).
3. Times across shapes for default, tiles and best beside fla 0.6.0 (bf16, no gate);
   Hessian-vector products for the second-order variants (checked against float64 double backward
   at ``B = H = 2``) and a CUDA profile of one HVP; gate on; float32 (with ``prec_f32=bf16x3`` as
   one more variant).

Writes ``kernels_variants.json`` into ``--out`` (default ``$OUT``, else ``benchmarks/results``) after
every phase, and prints a short table last. Phases are skipped when the ``--budget`` (seconds) runs
out. ``--smoke`` runs the same logic at tiny shapes (on the CPU with ``TRITON_INTERPRET=1``).

    python benchmarks/kernels_variants.py [--budget 400] [--smoke] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels_common import fla_fn, hvp_fn, leaves, make_inputs, ours, reference_fn, rel

from kernels.delta_product.utils import TUNING, Tuning, chunk_tokens

SHAPES = [(4, 4096, 16, 128), (8, 2048, 16, 128), (2, 8192, 8, 64)]
SMOKE_SHAPES = [(2, 40, 3, 32), (3, 24, 2, 16), (2, 50, 2, 16)]
TOL = {torch.float32: 1e-4, torch.bfloat16: 4e-2}
_W8 = "warps_prep=8,warps_out=8,warps_dv=8,warps_dqkw=8,warps_wy=8"
VARIANTS = {  # name -> DELTA_PRODUCT_TUNING spec; all but `default` use the 16×16-tile inverse
    "default": "",
    "tiles": "inverse=tiles",
    "tiles_ieee": "inverse=tiles,prec_inverse=ieee",
    "tiles_w2": "inverse=tiles,warps_prep=2",
    "w8": "inverse=tiles," + _W8,
    "w8_b128": "inverse=tiles,block=128," + _W8,
    "w8_mid": "inverse=tiles,bwd_store=input," + _W8,
    "scan64": "inverse=tiles,bv_scan=64",
    "scan64_w8": "inverse=tiles,bv_scan=64,warps_scan=8",
    "scan_w2": "inverse=tiles,warps_scan=2",
    "dqkw128": "inverse=tiles,bk_dqkw=128,warps_dqkw=8",
    "mid": "inverse=tiles,bwd_store=input",
    "s2": "inverse=tiles,stages=2",
    "wy_late": "inverse=tiles,wy_late=on",  # the float32 schedule of wy_bwd, in bf16
}
#: kernels whose time decides the fields of a group (per-kernel choice of the best variant)
GROUPS = [(("prep_kernel",), ("inverse", "prec_inverse", "warps_prep")),
          (("scan_h_kernel", "scan_dh_kernel"), ("bv_scan", "warps_scan")),
          (("out_kernel",), ("warps_out",)),
          (("dv_local_kernel",), ("warps_dv",)),
          (("dqkw_kernel",), ("warps_dqkw", "bk_dqkw")),
          (("wy_bwd_kernel",), ("warps_wy", "wy_late"))]
#: fields that touch every kernel: decided by the total fwd+bwd time of a pair of variants
GLOBAL_PAIRS = [("bwd_store", "w8", "w8_mid"), ("stages", "tiles", "s2"), ("block", "w8", "w8_b128")]
HVP_VARIANTS = {"default": "", "tf32": "hvp_tf32=1", "kernel_inv": "composed_inverse=kernel",
                "tf32_kernel_inv": "hvp_tf32=1,composed_inverse=kernel"}
T0 = time.time()
#: precompile items that crashed or hung in a worker: not run in this process
UNSAFE: set[tuple] = set()
SKIPPED = {"ok": False, "max_err": float("nan"), "skipped": "its compilation did not finish in a worker"}


def join(*specs: str) -> str:
    return ",".join(s for s in specs if s)


def poison(on: bool) -> None:
    os.environ["DELTA_PRODUCT_POISON"] = "1" if on else "0"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench(fn, rep: int = 50) -> float:
    """Median ms (``triton.testing.do_bench``; a host timer on the CPU smoke run)."""
    if not torch.cuda.is_available():
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


# ---------------------------------------------------------------- pre-compilation (worker processes)

def _warm(item):
    spec, K, n_h, gate, dtype, second = item
    try:
        TUNING.load(spec)
        T = 3 * chunk_tokens(n_h) + 5
        x = make_inputs(2, T, 2, K, K, n_h, dtype=dtype, gate=gate, h0=gate)
        xs = {n: t.requires_grad_(True) for n, t in x.items() if t is not None}
        o, s = ours(x)
        gr = torch.autograd.grad(o.float().sum() + s.sum(), list(xs.values()), create_graph=second)
        if second:
            torch.autograd.grad(sum(g.float().sum() for g in gr), list(xs.values()))
        sync()
        return None
    except Exception as e:  # noqa: BLE001 - recorded as a result
        return f"{item}: {e!r}"[:300]


def _fla_warm(cfgs):
    """One fla forward+backward per configuration: its autotuning and compilation land in the
    disk caches, so the timed process only loads them."""
    errors = []
    for (B, T, H, D, n_h, gate) in cfgs:
        try:
            x = make_inputs(B, T, H, D, D, n_h, gate=gate)
            f = fla_fn(x, n_h)
            o = f()
            if not gate:  # fla's gated backward raises on Hopper with triton 3.6
                torch.autograd.grad(o, f.inputs, torch.randn_like(o))
            sync()
        except Exception as e:  # noqa: BLE001 - recorded as a result
            errors.append(f"{(B, T, H, D, n_h, gate)}: {e!r}"[:300])
    return errors


def _warm_tagged(tagged):
    i, item = tagged
    return i, _warm(item)


class Precompile:
    """Compile ``items`` in spawned worker processes (Triton's disk cache is shared), in the
    background until :meth:`wait`."""

    def __init__(self, items, workers):
        self.items = items
        self.pool = mp.get_context("spawn").Pool(max(1, min(workers, len(items))))
        self.results = self.pool.imap_unordered(_warm_tagged, list(enumerate(items)))

    def wait(self, timeout: float) -> dict:
        """Errors, and the items that did not finish within ``timeout`` seconds (a crashed worker
        loses its item: the variants of those items are not run in this process)."""
        done, errors, deadline = set(), [], time.time() + timeout
        try:
            while len(done) < len(self.items):
                i, err = self.results.next(timeout=max(1.0, deadline - time.time()))
                done.add(i)
                if err:
                    errors.append(err)
        except mp.TimeoutError:
            pass
        missing = [str(self.items[i]) for i in range(len(self.items)) if i not in done]
        UNSAFE.update(self.items[i] for i in range(len(self.items)) if i not in done)
        if missing:
            self.pool.terminate()
        else:
            self.pool.close()
        self.pool.join()
        return {"errors": errors, "unfinished": missing,
                "unfinished_specs": sorted({self.items[i][0] for i in range(len(self.items)) if i not in done})}


# ---------------------------------------------------------------- checks

def heads(x: dict, B: int, H: int) -> dict:
    """Batches ``{0, B−1}`` and heads ``{0, H−1}`` of every input (and of ``o``/grads of the same layout)."""
    bs, hs = sorted({0, B - 1}), sorted({0, H - 1})
    out = {}
    for n, t in x.items():
        if t is None:
            out[n] = None
            continue
        t = t[bs]
        if n in ("q", "g", "o"):
            out[n] = t[:, :, hs]
        elif n in ("k", "v", "beta"):
            out[n] = t[:, :, :, hs]
        else:  # initial_state, final
            out[n] = t[:, hs]
    return out


class Case:
    """Inputs of one configuration at full size, cotangents, and the float64 reference on the
    subset of heads (computed once, shared by every variant)."""

    def __init__(self, B, T, H, D, n_h, gate, dtype, device, seed):
        self.shape, self.n_h, self.gate, self.dtype = (B, T, H, D), n_h, gate, dtype
        self.scale = D ** -0.5
        self.x = make_inputs(B, T, H, D, D, n_h, dtype=dtype, gate=gate, h0=gate, correlated=n_h > 1,
                             device=device, seed=seed)
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        self.do = torch.randn(B, T, H, D, generator=gen, device=device).to(dtype)
        self.ds = torch.randn(B, H, D, D, generator=gen, device=device)
        sub = heads(dict(self.x, o=self.do, final=self.ds), B, H)
        x64 = {n: (sub[n].double().requires_grad_(True) if sub[n] is not None else None)
               for n in self.x}
        o64, s64 = reference_fn(self.scale, n_h)(x64)
        live = [n for n, t in x64.items() if t is not None]
        g64 = torch.autograd.grad((o64 * sub["o"].double()).sum() + (s64 * sub["final"].double()).sum(),
                                  [x64[n] for n in live])
        self.ref = dict(o=o64.detach(), final=s64.detach(), **{f"d{n}": g for n, g in zip(live, g64)})

    def unsafe(self, spec: str) -> bool:
        B, T, H, D = self.shape
        return (spec, D, self.n_h, self.gate, self.dtype, False) in UNSAFE

    def check(self) -> dict:
        """Run the current variant with poisoned buffers; finiteness and errors against the reference."""
        poison(True)
        try:
            xs = {n: t.detach().requires_grad_(True) for n, t in self.x.items() if t is not None}
            o, s = ours(xs, self.scale)
            g = torch.autograd.grad((o.float() * self.do.float()).sum() + (s * self.ds).sum(), list(xs.values()))
            full = dict(o=o, final=s, **{f"d{n}": t for n, t in zip(xs, g)})
            finite = all(bool(torch.isfinite(t).all()) for t in full.values())
            B, _, H, _ = self.shape
            sub = heads(dict(o=full["o"], final=full["final"], **{n: full[f"d{n}"] for n in xs}), B, H)
            err = {"o": rel(sub["o"], self.ref["o"]), "final": rel(sub["final"], self.ref["final"])}
            err.update({f"d{n}": rel(sub[n], self.ref[f"d{n}"]) for n in xs})
            worst = max(err.values())
            ok = finite and all(e <= TOL[self.dtype] for e in err.values())  # NaN fails
            return dict(ok=ok, finite=finite, max_err=worst, err=err)
        except Exception as e:  # noqa: BLE001 - recorded as a result
            return dict(ok=False, finite=False, max_err=float("nan"), error=repr(e)[:300])
        finally:
            poison(False)


def _device_us(event) -> float:
    return getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0)


def time_case(case: Case, profile: bool = False) -> dict:
    xs = {n: t.detach().requires_grad_(True) for n, t in case.x.items() if t is not None}
    args = list(xs.values())

    def fb():
        o, _ = ours(xs, case.scale)
        torch.autograd.grad(o, args, case.do)

    out = dict(fwd_ms=bench(lambda: ours(xs, case.scale)), fwdbwd_ms=bench(fb))
    if profile and torch.cuda.is_available():
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        fb()
        sync()
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(3):
                fb()
            sync()
        out["kernels_ms"] = {e.key: round(_device_us(e) / 3 / 1e3, 4) for e in p.key_averages()
                             if _device_us(e) > 0 and e.key.endswith("_kernel")}
    return out


# ---------------------------------------------------------------- fla

def time_fla(case: Case) -> dict:
    try:
        f = fla_fn(case.x, case.n_h)
        out = dict(fwd_ms=bench(f))
        if not case.gate:
            out["fwdbwd_ms"] = bench(lambda: torch.autograd.grad(f(), f.inputs, case.do))
        return out
    except Exception as e:  # noqa: BLE001 - recorded as a result
        return dict(error=repr(e)[:200])


# ---------------------------------------------------------------- HVP

def hvp_check_and_time(B, T, H, D, n_h, device, sub_B, sub_H, do_time, profile):
    """Time of ``grad(⟨grad(⟨do, o⟩, x, create_graph), v⟩, x)`` at full size (if ``do_time``) and its
    error against float64 double backward at ``B, H = sub_B, sub_H``."""
    res = {}
    xs_small = make_inputs(sub_B, T, sub_H, D, D, n_h, correlated=n_h > 1, device=device, seed=T + n_h)
    p, p64 = leaves(xs_small)
    vs = {n: torch.randn_like(t) for n, t in p64.items()}
    do = torch.randn(sub_B, T, sub_H, D, device=device, dtype=torch.float64).to(torch.bfloat16).double()
    o64, _ = reference_fn(1.0, n_h)(p64)
    g64 = torch.autograd.grad((o64 * do).sum(), list(p64.values()), create_graph=True)
    h64 = torch.autograd.grad(sum((a * vs[n]).sum() for n, a in zip(p64, g64)), list(p64.values()))
    del o64, g64
    big = make_inputs(B, T, H, D, D, n_h, correlated=n_h > 1, device=device, seed=1) if do_time else None
    for name, spec in HVP_VARIANTS.items():
        full = join(VARIANTS["best"], spec)
        if (full, D, n_h, False, torch.bfloat16, True) in UNSAFE:
            res[name] = dict(SKIPPED, err=float("nan"))
            continue
        TUNING.load(full)
        r = {}
        try:
            poison(True)
            o, _ = ours(p)
            gr = torch.autograd.grad((o.double() * do).sum(), list(p.values()), create_graph=True)
            hv = torch.autograd.grad(sum((a.double() * vs[n]).sum() for n, a in zip(p, gr)), list(p.values()))
            r["err"] = max(rel(a, b) for a, b in zip(hv, h64))
            r["ok"] = r["err"] <= TOL[torch.bfloat16]
        except Exception as e:  # noqa: BLE001 - recorded as a result
            r.update(ok=False, err=float("nan"), error=repr(e)[:200])
        finally:
            poison(False)
        if big is not None and r.get("ok"):
            r["hvp_ms"] = time_hvp(big, profile=profile and name in ("default", "tf32_kernel_inv"), out=r)
        res[name] = r
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return res


def time_hvp(x, profile, out):
    ins = {n: t.detach().requires_grad_(True) for n, t in x.items() if t is not None}
    hv = hvp_fn(ins, torch.randn_like(ins["q"]))
    try:
        ms = bench(hv, rep=20)
    except torch.OutOfMemoryError as e:
        out["error"] = repr(e)[:200]
        return float("nan")
    if profile and torch.cuda.is_available():
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        with prof(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as p:
            hv()
            sync()
        rows = sorted(((e.key[:60], _device_us(e) / 1e3, e.count) for e in p.key_averages()
                       if _device_us(e) > 0), key=lambda r: -r[1])
        out["profile_top_ms"] = [[k, round(t, 3), c] for k, t, c in rows[:15]]
        out["profile_device_total_ms"] = round(sum(r[1] for r in rows), 3)
    return ms


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=400.0, help="seconds for the phases (then the summary)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs on the CPU under TRITON_INTERPRET=1")
    ap.add_argument("--workers", type=int, default=14)
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    shapes = SMOKE_SHAPES if args.smoke else SHAPES

    def left() -> float:
        return args.budget - (time.time() - T0)

    import triton

    res = dict(device=torch.cuda.get_device_name() if cuda else "cpu (interpreter)", torch=torch.__version__,
               triton=triton.__version__, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               variants=VARIANTS, hvp_variants=HVP_VARIANTS, tolerances={"bfloat16": 4e-2, "float32": 1e-4},
               phases={})
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "kernels_variants.json")

    def save(phase):
        res["phases"][phase] = round(time.time() - T0, 1)
        with open(path, "w") as f:
            json.dump(res, f, indent=1, default=str)
        print(f"[{time.time() - T0:6.1f}s] {phase}", flush=True)

    D0 = shapes[0][3]
    bf, f32 = torch.bfloat16, torch.float32
    # stage 1: compile every variant at the tuning configuration
    if cuda:
        first = [(s, D0, 2, False, bf, False) for s in VARIANTS.values()]
        first += [(s, D0, 2, True, f32, False) for s in ("", VARIANTS["tiles"])]
        res["precompile1"] = Precompile(first, args.workers).wait(timeout=150)
    save("precompile tuning shape")

    # phase 1: tuning shape, every variant
    tune = Case(*shapes[0], 2, False, bf, device, seed=11)
    res["tuning"] = {}
    for name, spec in VARIANTS.items():
        TUNING.load(spec)
        r = dict(spec=spec, check=SKIPPED if tune.unsafe(spec) else tune.check())
        if r["check"]["ok"]:
            r.update(time_case(tune, profile=True))
        res["tuning"][name] = r
        print(name, json.dumps({k: v for k, v in r.items() if k != "check"}), r["check"]["max_err"], flush=True)
    ok = {n: r for n, r in res["tuning"].items() if r["check"]["ok"] and "fwdbwd_ms" in r}
    best = Tuning()
    globals_ = {f for f, _, _ in GLOBAL_PAIRS}
    for kernels, fields in GROUPS:
        cands = [n for n, r in ok.items() if "kernels_ms" in r and all(
            getattr(Tuning().update(r["spec"]), g) == getattr(Tuning(), g) for g in globals_)]
        if cands:
            win = min(cands, key=lambda n: sum(ok[n]["kernels_ms"].get(k, float("inf")) for k in kernels))
            for f in fields:
                setattr(best, f, getattr(Tuning().update(ok[win]["spec"]), f))
    for field, base, alt in GLOBAL_PAIRS:
        if base in ok and alt in ok and ok[alt]["fwdbwd_ms"] < 0.98 * ok[base]["fwdbwd_ms"]:
            setattr(best, field, getattr(Tuning().update(ok[alt]["spec"]), field))
    TUNING.load(best.spec())
    r = dict(spec=best.spec(), check=tune.check())
    if r["check"]["ok"]:
        r.update(time_case(tune, profile=True))
    res["tuning"]["best"] = r
    timed = {n: v for n, v in res["tuning"].items() if v["check"]["ok"] and "fwdbwd_ms" in v}
    best_name = min(timed, key=lambda n: timed[n]["fwdbwd_ms"]) if timed else "default"
    best_spec = res["tuning"][best_name]["spec"]
    VARIANTS["best"] = best_spec
    res.update(best_name=best_name, best_spec=best_spec)
    print("best:", best_name, best_spec, flush=True)
    del tune
    # the sharp check (float32 tolerance 1e-4) of the new inverse and of best, gated, initial state
    sharp = Case(*shapes[0], 2, True, f32, device, seed=13)
    res["tuning_float32_gate"] = {}
    for name, spec in (("default", ""), ("tiles", VARIANTS["tiles"]), ("best", best_spec)):
        TUNING.load(spec)
        res["tuning_float32_gate"][name] = SKIPPED if sharp.unsafe(spec) else sharp.check()
    print("float32 gated check:", json.dumps({n: (r["ok"], r["max_err"]) for n, r in
                                              res["tuning_float32_gate"].items()}), flush=True)
    del sharp
    save("tuning")

    # stage 2 (background): everything else; fla warms up in its own process
    items = [(s, D, n_h, False, bf, False) for s in VARIANTS.values() for (_, _, _, D) in shapes[:: 2]
             for n_h in (1, 2, 3)]
    items += [(s, D0, n_h, True, bf, False) for s in {"", VARIANTS["tiles"], best_spec} for n_h in (1, 2, 3)]
    items += [(s, D0, n_h, False, f32, False)
              for s in {"", VARIANTS["tiles"], best_spec, join(best_spec, "prec_f32=bf16x3")} for n_h in (1, 2, 3)]
    items += [(join(best_spec, s), D0, n_h, False, bf, True) for s in HVP_VARIANTS.values() for n_h in (1, 2)]
    items = list(dict.fromkeys(items))
    fla_cfgs = [(*sh, n_h, False) for sh in shapes for n_h in (1, 2, 3)]
    fla_cfgs += [(*shapes[0], n_h, True) for n_h in (1, 2, 3)]
    fla_job = None
    if cuda:
        pre = Precompile(items, args.workers)
        try:
            import fla  # noqa: F401

            fla_pool = mp.get_context("spawn").Pool(1)
            fla_job = fla_pool.apply_async(_fla_warm, (fla_cfgs,))
        except ImportError as e:
            res["fla_error"] = repr(e)
        res["precompile2"] = pre.wait(timeout=max(30.0, left() - 170))
        if fla_job is not None:
            try:
                res["fla_warm_errors"] = fla_job.get(timeout=max(10.0, left() - 140))
                fla_pool.close()
                fla_pool.join()
            except mp.TimeoutError:
                res["fla_error"] = "fla warm-up (autotuning) did not finish within the budget: fla not timed"
                fla_pool.terminate()
                fla_job = None
    save("precompile all")

    # phase 2: correctness of every variant at every shape (bf16, no gate), then gate and float32
    checks = res["checks"] = []
    cases = {}
    for (B, T, H, D) in shapes:
        for n_h in (1, 2, 3):
            if left() < 100:
                break
            case = Case(B, T, H, D, n_h, False, bf, device, seed=B + T + n_h)
            row = dict(shape=[B, T, H, D], n_h=n_h, gate=False, dtype="bfloat16", variants={})
            for name, spec in VARIANTS.items():
                TUNING.load(spec)
                row["variants"][name] = SKIPPED if case.unsafe(spec) else case.check()
            checks.append(row)
            cases[(B, T, H, D, n_h)] = case
            print(json.dumps(dict(shape=row["shape"], n_h=n_h, ok={n: v["ok"] for n, v in row["variants"].items()},
                                  max_err=max(v["max_err"] for v in row["variants"].values()))), flush=True)
            if cuda:
                torch.cuda.empty_cache()
    save("checks bf16")

    # phase 3: times across shapes, ours (default / tiles / best) beside fla
    rows = res["shapes"] = []
    for (B, T, H, D) in shapes:
        for n_h in (1, 2, 3):
            if left() < 60:
                break
            case = cases.get((B, T, H, D, n_h)) or Case(B, T, H, D, n_h, False, bf, device, seed=B + T + n_h)
            row = dict(shape=[B, T, H, D], n_h=n_h)
            for name in ("default", "tiles", "best"):
                TUNING.load(VARIANTS[name])
                row[name] = SKIPPED if case.unsafe(VARIANTS[name]) else time_case(case)
            if fla_job is not None:
                row["fla"] = time_fla(case)
            rows.append(row)
            cases.pop((B, T, H, D, n_h), None)
            print(json.dumps(row), flush=True)
    cases.clear()
    save("times")

    # phase 4: Hessian-vector products (first shape, n_h = 1, 2)
    res["hvp"] = {}
    B, T, H, D = shapes[0]
    for n_h in (1, 2):
        if left() < 45:
            break
        res["hvp"][str(n_h)] = hvp_check_and_time(B, T, H, D, n_h, device, min(B, 2), min(H, 2),
                                                  do_time=left() > 60, profile=n_h == 1)
        print("hvp", n_h, json.dumps({n: {k: v for k, v in r.items() if not k.startswith("profile")}
                                      for n, r in res["hvp"][str(n_h)].items()}), flush=True)
    save("hvp")

    # phase 5: gate + initial state, float32 (first shape)
    extra = res["extra"] = []
    for gate, dtype, names in ((True, bf, ("default", "tiles", "best")),
                               (False, f32, ("default", "tiles", "best", "best_bf16x3"))):
        for n_h in (1, 2, 3):
            if left() < 15:
                break
            case = Case(*shapes[0], n_h, gate, dtype, device, seed=7 + n_h)
            row = dict(shape=list(shapes[0]), n_h=n_h, gate=gate, dtype=str(dtype)[6:])
            for name in names:
                spec = join(VARIANTS["best"], "prec_f32=bf16x3") if name == "best_bf16x3" else VARIANTS[name]
                TUNING.load(spec)
                r = dict(check=SKIPPED if case.unsafe(spec) else case.check())
                if r["check"]["ok"]:
                    r.update(time_case(case))
                row[name] = r
            if gate and fla_job is not None:
                row["fla"] = time_fla(case)
            extra.append(row)
            print(json.dumps({k: (v if not isinstance(v, dict) or "check" not in v else
                                  dict(ok=v["check"]["ok"], err=v["check"]["max_err"],
                                       fwdbwd=v.get("fwdbwd_ms"))) for k, v in row.items()}), flush=True)
            del case
    save("gate and float32")

    TUNING.load("")
    res["all_checks_ok"] = ({name: all(r["variants"][name]["ok"] for r in checks) for name in VARIANTS}
                            if checks else None)
    save("done")
    summary(res, shapes)


def summary(res, shapes):
    def f(v) -> str:
        return f"{v:6.2f}" if isinstance(v, (int, float)) else "   -  "

    print(f"\n{res['device']}  torch {res['torch']}  triton {res['triton']}  phases(s) {res['phases']}")
    print("tuning shape", shapes[0], "n_h=2 bf16:  variant | ok max_err | fwd fwd+bwd | "
          "prep scan_h out dv scan_dh dqkw wy")
    ks = ("prep_kernel", "scan_h_kernel", "out_kernel", "dv_local_kernel", "scan_dh_kernel", "dqkw_kernel",
          "wy_bwd_kernel")
    for n, r in res.get("tuning", {}).items():
        km = r.get("kernels_ms", {})
        print(f"  {n:>10} | {str(r['check']['ok'])[0]} {r['check']['max_err']:.1e} | {f(r.get('fwd_ms'))}"
              f" {f(r.get('fwdbwd_ms'))} | " + " ".join(f"{km.get(k, float('nan')):.3f}" for k in ks))
    print(f"best = {res.get('best_name')}: DELTA_PRODUCT_TUNING='{res.get('best_spec')}'")
    print("float32 gated check (ok, max err):", {n: (r["ok"], f"{r['max_err']:.1e}") for n, r in
                                                 res.get("tuning_float32_gate", {}).items()})
    print("all-shape checks ok per variant:", res.get("all_checks_ok"))
    print("shape nh | fwd+bwd default tiles best fla | fwd best fla | fla/best fwd+bwd")
    for r in res.get("shapes", []):
        fl, d, t, b = r.get("fla", {}), r["default"], r["tiles"], r["best"]
        sp = fl.get("fwdbwd_ms", float("nan")) / b.get("fwdbwd_ms", float("nan"))
        print(f"  {r['shape']!s:>20} {r['n_h']} | {f(d.get('fwdbwd_ms'))} {f(t.get('fwdbwd_ms'))} "
              f"{f(b.get('fwdbwd_ms'))} {f(fl.get('fwdbwd_ms'))} | {f(b.get('fwd_ms'))} {f(fl.get('fwd_ms'))}"
              f" | {sp:5.2f}x")
    for r in res.get("extra", []):
        cells = " ".join(f"{n}:{str(v['check']['ok'])[0]} {f(v.get('fwdbwd_ms'))}" for n, v in r.items()
                         if isinstance(v, dict) and "check" in v)
        print(f"  {r['dtype']:>8} gate={str(r['gate'])[0]} nh={r['n_h']} | fwd+bwd {cells} | fla fwd "
              f"{f(r.get('fla', {}).get('fwd_ms'))}")
    for n_h, rr in res.get("hvp", {}).items():
        print(f"  hvp nh={n_h}: " + "  ".join(f"{n} {str(r.get('ok'))[0]} {r.get('err', float('nan')):.1e} "
                                               f"{f(r.get('hvp_ms'))}ms" for n, r in rr.items()))


if __name__ == "__main__":
    main()
