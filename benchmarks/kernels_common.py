"""Shared pieces of the GPU scripts for the DeltaProduct kernels (inputs, float64 reference,
environment record, parallel pre-compilation)."""
from __future__ import annotations

import datetime
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys

import torch
import torch.nn.functional as F

from kernels.delta_product import chunk_delta_product, composed_delta_product
from kernels.delta_product.utils import TUNING, chunk_local_cumsum, chunk_tokens

NAMES = ("q", "k", "v", "beta", "g", "initial_state")


def make_inputs(B, T, H, K, V, n_h, *, dtype=torch.bfloat16, gate=False, h0=False, correlated=False,
                beta_max=2.0, device="cuda", seed=0):
    """Unit keys (micro-step keys of a token with cosine ≥ 0.9 when ``correlated``),
    ``β ~ U[0, beta_max]`` with both end points present, ``g = log σ(x + 1)``."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def rn(*s):
        return torch.randn(*s, generator=gen, device=device)

    if correlated:
        k = rn(B, T, 1, H, K) + 0.15 * rn(B, T, n_h, H, K) / K ** 0.5
    else:
        k = rn(B, T, n_h, H, K)
    beta = beta_max * torch.rand(B, T, n_h, H, generator=gen, device=device)
    ends = torch.tensor([0.0, beta_max])[: beta.numel()]
    beta.view(-1)[: ends.numel()] = ends
    x = dict(q=rn(B, T, H, K), k=F.normalize(k, dim=-1), v=rn(B, T, n_h, H, V), beta=beta,
             g=F.logsigmoid(rn(B, T, H) + 1.0) if gate else None, initial_state=rn(B, H, K, V) if h0 else None)
    return {n: (t.to(dtype) if t is not None else None) for n, t in x.items()}


def torch_scan(a, X, Y, Bm, h0):
    """``H_{c+1} = a_c H_c + X_cᵀ (B_c − Y_c H_c)`` (``a = None``: 1) as a PyTorch loop, the
    ``scan=`` of ``composed_delta_product`` (any dtype; float64 reference on the GPU)."""
    hs = [h0]
    for c in range(X.shape[1]):
        h = hs[-1]
        decayed = h if a is None else a[:, c, None, None] * h
        hs.append(decayed + X[:, c].transpose(-1, -2) @ (Bm[:, c] - Y[:, c] @ h))
    return torch.stack(hs, 1)


def leaves(x):
    """The present inputs of ``x`` as leaves requiring grad, and their float64 copies (leaves too)."""
    xs = {n: t.detach().requires_grad_(True) for n, t in x.items() if t is not None}
    return xs, {n: t.detach().double().requires_grad_(True) for n, t in xs.items()}


def reference(x, scale=1.0):
    """Float64 outputs and final state from the composed chunked form with a PyTorch scan
    (checked against the token-by-token recurrence to 1e-15 in the CPU tests)."""
    x64 = {n: (t.double() if t is not None else None) for n, t in x.items()}
    return reference_fn(scale, x64["k"].shape[2])(x64)


def reference_fn(scale, n_h):
    """``x ↦ (o, final)`` in float64 with the PyTorch scan, differentiable by autograd / torch.func."""
    ct = chunk_tokens(n_h)

    def f(x):
        G = chunk_local_cumsum(x["g"], ct) if x.get("g") is not None else None
        return composed_delta_product(x["q"], x["k"], x["v"], x["beta"], G, x.get("initial_state"), scale, ct,
                                      scan=torch_scan)

    return f


def ours(x, scale=1.0):
    return chunk_delta_product(x["q"], x["k"], x["v"], x["beta"], x.get("g"), x.get("initial_state"), True, scale)


def rel(a, b):
    """``‖a − b‖ / ‖b‖`` in float64 (``‖a − b‖`` when ``b = 0``); NaN anywhere gives NaN."""
    a, b = a.double(), b.double()
    nb = b.norm()
    return ((a - b).norm() / (nb if nb > 0 else 1.0)).item()


def bench(fn, rep=60):
    """Median ms of ``fn`` called eagerly (``triton.testing.do_bench``, 20 warm-up ms, ``rep`` ms of repetitions)."""
    import triton

    return triton.testing.do_bench(fn, warmup=20, rep=rep, return_mode="median")


def bench_graph(fn, rep=60):
    """Median ms of ``fn`` replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``): the device's time,
    without the host's launch overhead (which at (2, 8192, 8, 64) is as long as the kernels, for fla and for us)."""
    import triton

    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


def _commit() -> str | None:
    """The checked-out commit (``+dirty`` with uncommitted changes to tracked files), or ``None``
    outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()

    try:
        return git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def env_info():
    import triton

    gpu = torch.cuda.is_available()
    return dict(device=torch.cuda.get_device_name() if gpu else f"no GPU ({platform.machine()} CPU)",
                torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                command=" ".join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]]), commit=_commit(),
                sm_count=torch.cuda.get_device_properties(0).multi_processor_count if gpu else None,
                tuning=TUNING.spec())


def run_and_save(collect, out: str, name: str, **fields) -> dict:
    """``collect()`` (a list of result rows) with :data:`TUNING` restored afterwards; writes
    ``{env_info(), fields, rows}`` to ``out/name``, prints the device line and returns that dict."""
    default = TUNING.spec()
    try:
        rows = collect()
    finally:
        TUNING.load(default)
    res = dict(env_info(), **fields, rows=rows)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name), "w") as f:
        json.dump(res, f, indent=1)
    print(f"\n{res['device']}  torch {res['torch']}  triton {res['triton']}  "
          + "  ".join(f"{k} = {v}" for k, v in fields.items()))
    return res


def _warm_one(cfg):
    B, H, K, V, n_h, gate, h0, dtype, second = cfg
    try:
        T = 3 * chunk_tokens(n_h) + 5
        x = make_inputs(B, T, H, K, V, n_h, dtype=dtype, gate=gate, h0=h0)
        xs = {n: t.requires_grad_(True) for n, t in x.items() if t is not None}
        o, s = ours(x)
        gr = torch.autograd.grad((o.float().sum() + s.sum()), list(xs.values()), create_graph=second)
        if second:
            torch.autograd.grad(sum(g.float().sum() for g in gr), list(xs.values()))
            prim = {n: t.detach() for n, t in xs.items()}
            torch.func.jvp(lambda *a: ours(dict(zip(prim, a)))[0], tuple(prim.values()),
                           tuple(torch.randn_like(t) for t in prim.values()))
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001 - recorded as a result
        return f"{cfg}: {e!r}"[:300]


def precompile(configs, workers=12):
    """Compile the kernels of every configuration in parallel processes (Triton's disk cache is
    shared), so the timed process only loads them. Returns the list of errors."""
    ctx = mp.get_context("spawn")
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache"))
    # H and the initial-state flags are run-time arguments: one warm-up per compiled variant
    unique = sorted({(2, 2, K, V, n_h, gate, True, dt, second) for (_, _, K, V, n_h, gate, _, dt, second) in configs},
                    key=str)
    with ctx.Pool(min(workers, len(unique))) as pool:
        return [e for e in pool.map(_warm_one, unique) if e]


def hvp_fn(x: dict, do, vs=None, scale=1.0, inner: bool = False):
    """A closure returning one Hessian-vector product of ``⟨do, o(x)⟩`` by double backward through
    ``ours(x, scale)`` w.r.t. every tensor of ``x`` (which must require grad), in the directions
    ``vs`` (one per present tensor; default fixed random ones): ``grad(g, x, grad_outputs=vs)`` for
    ``g = grad(⟨do, o⟩, x, create_graph=True)``, or with ``inner`` ``grad(Σ ⟨g, v⟩, x)``, the same
    product plus the elementwise products, sums and their backward that the inner product costs."""
    ins = {n: t for n, t in x.items() if t is not None}
    xs = list(ins.values())
    vs = [torch.randn_like(t) for t in xs] if vs is None else vs
    us = [v.to(t.dtype) for t, v in zip(xs, vs)]  # grad_outputs in the gradients' dtypes, cast once

    def hv():
        o, _ = ours(ins, scale)
        gs = torch.autograd.grad(o, xs, do, create_graph=True)
        if inner:
            return torch.autograd.grad(sum((g * v).sum() for g, v in zip(gs, vs)), xs)
        return torch.autograd.grad(gs, xs, us)

    return hv


def hvp_jvp_fn(x: dict, do, vs, scale=1.0):
    """The same Hessian-vector product as :func:`hvp_fn` by forward over reverse,
    ``torch.func.jvp(torch.func.grad(⟨do, o(x)⟩), x, vs)`` (PyTorch's recommended form): a closure
    returning the tangents of the gradients."""
    ins = {n: t for n, t in x.items() if t is not None}
    names, xs = list(ins), tuple(t.detach() for t in ins.values())

    def loss(*args):
        return (ours(dict(zip(names, args)), scale)[0] * do).sum()

    grad = torch.func.grad(loss, argnums=tuple(range(len(xs))))
    return lambda: torch.func.jvp(grad, xs, tuple(vs))[1]


def kernel_profile(fn, reps: int = 5) -> dict[str, float]:
    """Per-kernel CUDA time (ms) of one call of ``fn``, the mean over ``reps`` profiled calls after
    three warm-up calls (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = {}
    for e in p.key_averages():
        if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0) > 0:
            rows[e.key[:40]] = getattr(e, "self_device_time_total", 0) / reps / 1e3
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]))


def fla_fn(x: dict, n_h: int):
    """fla 0.6.0's ``chunk_gated_delta_product`` on our inputs (micro-steps interleaved to length
    ``n_h·T``, as in ``../shared/anchors/fla_deltaproduct_bench.py``): a closure returning ``o``, with
    the differentiable leaves in ``f.inputs = (q, k, v, beta)``."""
    from fla.ops.gated_delta_product import chunk_gated_delta_product

    B, T, H, K = x["q"].shape
    q = x["q"].detach().requires_grad_()
    k = x["k"].detach().reshape(B, T * n_h, H, K).requires_grad_()
    v = x["v"].detach().reshape(B, T * n_h, H, -1).requires_grad_()
    beta = x["beta"].detach().reshape(B, T * n_h, H).requires_grad_()
    g = x["g"].detach().float() if x["g"] is not None else None

    def f():
        return chunk_gated_delta_product(q, k, v, g, beta, num_householder=n_h)[0]

    f.inputs = (q, k, v, beta)
    return f
