"""CPU, no GPU needed: compile every fused DeltaProduct kernel for an H100 (``sm_90a``) and report its
registers, spills and shared memory.

The host functions (``chunk_fwd``, ``chunk_bwd``, ``chunk_fwd_tangent``, ``chunk_bwd_tangent``) run on
CPU tensors with their ``launch`` replaced by an ahead-of-time compile: each launch's arguments give
the kernel's signature (pointer dtypes, integer widths) and constexprs, ``triton.compile`` builds it
for ``GPUTarget("cuda", 90, 32)`` at the launch's ``num_warps``, and the ``cuobjdump`` that ships with
Triton reads the registers per thread and the stack frame (spilled registers) from the cubin. Like
``launch`` on a GPU, a kernel whose shared memory exceeds the H100's 227 KB per block is rebuilt with
one pipeline stage less. The sizes that are not constexprs (``B``, ``T``, ``H``) do not change the
code, so a short sequence stands in for the benchmark shapes (at their first shape's ``B·H``, on which
``Tuning.fuse_min_programs`` depends); divisibility specialisation of integer
arguments is not modelled (pointers are taken as 16-byte aligned, as a GPU launch sees them).

Each row also carries ``code``, a hash of the kernel's PTX instructions (debug sections, line records and
labels left out): two trees whose rows give the same ``code`` build the same machine code, so a refactor can be
shown to change nothing the GPU runs, and timings and checks of one tree hold for the other.

A kernel that compiles here may still fail on a GPU at run time (an illegal memory access is not a
compile-time error), and registers do not give times: this is a check before a GPU run, not instead.

With ``--opcodes`` each row also counts the kernel's SASS instructions by opcode (``cuobjdump -sass``) and gives
``sass_code``, a hash of those instructions with the kernel-parameter offsets left out: two builds that differ only in
their parameter list (an unused pointer argument added) give the same ``sass_code``.

    python benchmarks/kernels_resources.py [--dtypes bfloat16 float32] [--nh 1 2 3] [--gates off on] [--D 128]
        [--opcodes]
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels_common import run_and_save

from kernels.delta_product import chunk_bwd, chunk_fwd, tangent_bwd, tangent_fwd
from kernels.delta_product.launch import deepest_stages, kernel_options

TARGET = GPUTarget("cuda", 90, 32)
MAX_SHARED = 232448  # bytes per block on an H100 (sharedMemPerBlockOptin)
POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.float64: "*fp64",
           torch.int32: "*i32", torch.int64: "*i64"}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def signature(kernel, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` of ``kernel`` for a launch with ``args`` and ``kwargs``."""
    bound = dict(zip(kernel.arg_names, args), **kwargs)
    sig, consts, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        value = bound[name]
        if param.is_constexpr:
            sig[name], consts[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            sig[name], attrs[(i,)] = POINTER[value.dtype], [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{kernel.fn.__name__}: argument `{name}` of type {type(value).__name__}")
    return sig, consts, attrs


def code_hash(ptx: str) -> str:
    """A short hash of the instructions of ``ptx``: without its debug sections, ``.loc`` / ``.file`` records,
    comments and the ``$L__tmp`` labels that mark inlined calls for the debugger."""
    code = re.split(r"\.section\s+\.debug", ptx)[0]
    kept = (line for line in code.splitlines() if not line.strip().startswith((".loc", ".file", "//", "$L__tmp")))
    return hashlib.sha256("\n".join(kept).encode()).hexdigest()[:12]


def cuobjdump(cubin: bytes, flag: str) -> str:
    """``cuobjdump FLAG`` of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([CUOBJDUMP, flag, f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def sass_opcodes(cubin: bytes) -> dict[str, int]:
    """How many SASS instructions of each opcode (without its modifiers) a cubin holds, most frequent first."""
    ops = collections.Counter(m[1].split(".")[0] for m in re.finditer(
        r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", cuobjdump(cubin, "-sass"), re.M))
    return dict(ops.most_common())


def sass_code(cubin: bytes) -> str:
    """A hash of the SASS instructions of a cubin with their kernel-parameter offsets (``c[0x0][...]``) left out:
    equal for two builds that differ only in the parameter list (a pointer argument added or moved)."""
    lines = re.findall(r"^\s*/\*[0-9a-f]+\*/\s+([^;]*);", cuobjdump(cubin, "-sass"), re.M)
    text = "\n".join(re.sub(r"c\[0x0\]\[0x[0-9a-f]+\]", "c[0x0][*]", line.strip()) for line in lines)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cubin_usage(cubin: bytes, name: str) -> dict:
    """Registers per thread and stack frame bytes (spills) of the function ``name`` in a cubin, by
    ``cuobjdump -res-usage``."""
    out = cuobjdump(cubin, "-res-usage")
    found = re.search(rf"Function {name}:\s*REG:(\d+) STACK:(\d+)", out)
    if found is None:
        raise RuntimeError(f"no resource usage of `{name}` in:\n{out}")
    return dict(regs=int(found[1]), stack=int(found[2]))


class Compiler:
    """A stand-in for :func:`kernels.delta_product.launch.launch` that compiles and records, never runs."""

    def __init__(self, opcodes: bool = False):
        self.rows: list[dict] = []
        self.opcodes = opcodes

    def __call__(self, kernel, grid, *args, num_warps: int = 4, max_stages: int | None = None, **kwargs) -> None:
        kwargs = kernel_options(kernel, kwargs)  # the precision a launch would pass (Tuning.trunc_split)
        src = ASTSource(kernel, *signature(kernel, args, kwargs))
        stages, start = deepest_stages(max_stages), time.time()
        while True:
            ck = triton.compile(src, target=TARGET, options=dict(num_warps=num_warps, num_stages=stages))
            if ck.metadata.shared <= MAX_SHARED or stages == 1:
                break
            stages -= 1
        name = kernel.fn.__name__
        self.rows.append(dict(kernel=name, warps=num_warps, stages=stages, shared=ck.metadata.shared,
                              fits=ck.metadata.shared <= MAX_SHARED, compile_s=round(time.time() - start, 1),
                              code=code_hash(ck.asm["ptx"]), **cubin_usage(ck.asm["cubin"], name)))
        if self.opcodes:
            self.rows[-1].update(sass=sass_opcodes(ck.asm["cubin"]), sass_code=sass_code(ck.asm["cubin"]))


def compile_all(dtype: torch.dtype, n_h: int, gate: bool, D: int, opcodes: bool = False) -> list[dict]:
    """Compile the forward, backward, tangent forward and tangent backward kernels for one configuration
    (an initial state and a final state, as in the benchmarks' HVP)."""
    compiler = Compiler(opcodes)
    modules = (chunk_fwd, chunk_bwd, tangent_fwd, tangent_bwd)
    launches = [m.launch for m in modules]
    for m in modules:
        m.launch = compiler
    try:
        B, T, H = 4, 64, 16  # B·H of (4, 4096, 16, 128): the grid decides Tuning.fuses_out as it does there
        q = torch.zeros(B, T, H, D, dtype=dtype)
        k, v = torch.zeros(B, T, n_h, H, D, dtype=dtype), torch.zeros(B, T, n_h, H, D, dtype=dtype)
        beta, h0 = torch.zeros(B, T, n_h, H), torch.zeros(B, H, D, D)
        G = torch.zeros(B, T, H) if gate else None
        _, _, saved = chunk_fwd.chunk_fwd(q, k, v, beta, G, h0, 0.1, True)
        _, mids = chunk_bwd.chunk_bwd(q, k, v, beta, G, h0, 0.1, saved, q, h0)
        if gate:  # the tangent kernels read the differentiable backward's intermediates (Tuning.gate_mids)
            for m in modules:
                m.launch = lambda *_, **__: None
            _, mids = chunk_bwd.chunk_bwd(q, k, v, beta, G, h0, 0.1, saved, q, h0, differentiable=True)
            for m in modules:
                m.launch = compiler
        tangents = (q, k, v, beta, h0)
        gates = (G, torch.zeros_like(G)) if gate else None
        _, _, tsaved, keys = tangent_fwd.chunk_fwd_tangent(q, k, v, beta, h0, 0.1, saved, tangents, True, gate=gates)
        tangent_bwd.chunk_bwd_tangent(q, k, v, beta, h0, 0.1, saved, q, mids, tangents, tsaved, gate=gates, keys=keys)
    finally:
        for m, fn in zip(modules, launches):
            m.launch = fn
    config = dict(dtype=str(dtype)[6:], n_h=n_h, gate=gate, D=D)
    return [dict(config, **row) for row in compiler.rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", nargs="+", choices=("bfloat16", "float32"), default=["bfloat16", "float32"])
    ap.add_argument("--nh", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--gates", nargs="+", choices=("off", "on"), default=["off", "on"])
    ap.add_argument("--D", type=int, default=128, help="key and value head dim")
    ap.add_argument("--opcodes", action="store_true",
                    help="also count each kernel's SASS instructions by opcode (the row's `sass`; printed: the total)")
    ap.add_argument("--json", default="kernels_resources.json", help="file name under --out")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        ap.error("unset TRITON_INTERPRET: the kernels are compiled for the GPU, not interpreted")
    res = run_and_save(lambda: [row for dtype in args.dtypes for n_h in args.nh for gate in args.gates
                                for row in compile_all(getattr(torch, dtype), n_h, gate == "on", args.D, args.opcodes)],
                       args.out, args.json, target="sm_90a (H100), compiled ahead of time", D=args.D)
    print(f"{'dtype':>8} {'n_h':>3} {'gate':>5} {'kernel':>24} {'warps':>5} {'stages':>6} {'regs':>4} "
          f"{'spill B':>7} {'shared KB':>9} {'code':>12}")
    for r in res["rows"]:
        flag = "" if r["fits"] else "  does not fit"
        sass = "" if "sass" not in r else f"  SASS {sum(r['sass'].values())}: " + " ".join(
            f"{op} {n}" for op, n in list(r["sass"].items())[:6])
        print(f"{r['dtype']:>8} {r['n_h']:>3} {str(r['gate']):>5} {r['kernel']:>24} {r['warps']:>5} {r['stages']:>6} "
              f"{r['regs']:>4} {r['stack']:>7} {r['shared'] / 1024:9.1f} {r['code']:>12}{flag}{sass}")


if __name__ == "__main__":
    main()
