"""Fused DeltaProduct kernels (Triton; the CPU interpreter without a GPU) against the float64
token-by-token recurrence: outputs, final state and every gradient, on fresh random inputs.

Every kernel buffer is NaN-filled first (``DELTA_PRODUCT_POISON=1``), so an element that no
kernel writes fails the comparison. Tolerances on ``‖x − ref‖ / ‖ref‖``: float32 2e-5 (float32
accumulation; seen ≤ 1e-6); bf16 4e-2 (bf16 intermediates W, U, S stored as in fla; the reference
uses the same bf16-rounded inputs in float64).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from kernels.delta_product import chunk_bwd, chunk_delta_product, chunk_fwd, tangent_bwd, tangent_fwd
from kernels.delta_product import utils
from kernels.delta_product.common import dot, tf32_low
from kernels.delta_product.utils import TUNING, Tuning
from lrnn.ops.recurrent import delta_product_recurrent
from tests.lrnn_inputs import make_inputs, rel_err

TOL = {torch.float32: 2e-5, torch.bfloat16: 4e-2}
ARGS = ("q", "k", "v", "beta", "g", "initial_state")
DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("DELTA_PRODUCT_POISON", "1")


def _check_first_order(x64: dict, dtype: torch.dtype, scale: float = 1.0, naive_factor: float = 0.0) -> None:
    """Every relative error within ``TOL[dtype]``, or (``naive_factor > 0``) within ``naive_factor``
    times the error of the token-by-token recurrence run in ``dtype`` on the same inputs."""
    names = [n for n in ARGS if x64[n] is not None]
    ref_in = [x64[n].to(dtype).double().requires_grad_() for n in names]  # same rounding as the kernel's
    ker_in = [t.detach().to(dtype).requires_grad_() for t in ref_in]
    kw = dict(output_final_state=True, scale=scale)
    o, s = chunk_delta_product(**dict(zip(names, ker_in)), **kw)
    o64, s64 = delta_product_recurrent(**dict(zip(names, ref_in)), **kw)
    assert o.dtype == dtype and o.shape == o64.shape and s.shape == s64.shape
    do, ds = torch.randn_like(o64), torch.randn_like(s64)
    grads64 = torch.autograd.grad((o64 * do).sum() + (s64 * ds).sum(), ref_in)

    def errors(o: torch.Tensor, s: torch.Tensor) -> dict[str, float]:
        grads = torch.autograd.grad((o.double() * do).sum() + (s.double() * ds).sum(), ker_in)
        errs = {"o": rel_err(o.double(), o64), "final": rel_err(s.double(), s64)}
        errs.update({f"d{n}": rel_err(a.double(), b) for n, a, b in zip(names, grads, grads64)})
        return errs

    errs = errors(o, s)
    allowed = dict.fromkeys(errs, TOL[dtype])
    if naive_factor:
        nerrs = errors(*delta_product_recurrent(**dict(zip(names, ker_in)), **kw))
        allowed = {k: max(TOL[dtype], naive_factor * nerrs[k]) for k in errs}
    bad = {k: e for k, e in errs.items() if not e <= allowed[k]}
    assert not bad, f"{dtype}: {bad} (all: {errs}, allowed: {allowed})"


@pytest.mark.parametrize(
    "T, n_h, gate, h0, K, V",
    [
        (70, 1, True, False, 16, 32),   # two chunks, T not divisible by the chunk (64 tokens)
        (40, 2, False, True, 32, 16),   # 32 tokens per chunk
        (30, 3, True, True, 24, 20),    # 21 tokens (63 micro-steps) per chunk, odd head dims
        (5, 4, True, False, 16, 16),    # a single short chunk
    ],
)
def test_float32_matches_recurrence(T, n_h, gate, h0, K, V):
    x = make_inputs(B=2 if T < 10 else 1, T=T, n_h=n_h, H=2, K=K, V=V, gate=gate, initial_state=h0, correlated=True,
                    seed=100 + T + n_h)
    _check_first_order(x, torch.float32, scale=0.5)


@pytest.mark.parametrize("n_h, gate", [(1, False), (3, True)])
def test_bf16_matches_recurrence(n_h, gate):
    x = make_inputs(B=1, T=25, n_h=n_h, H=1, K=32, V=32, gate=gate, initial_state=gate, correlated=True,
                    seed=7 + n_h)
    _check_first_order(x, torch.bfloat16)


@pytest.mark.parametrize("seed", [1000, 1001, 1008, 1039])
def test_bf16_single_token_no_worse_than_a_bf16_recurrence(seed):
    # One token, no initial state: o, dq and dβ are short sums of bf16-rounded products that can
    # nearly cancel, so bf16 storage alone can miss the float64 value by more than 4e-2 (seed 1008:
    # dq 0.063 here, 0.21 for the bf16 recurrence). The kernel must then be no worse than twice
    # the plain bf16 recurrence.
    torch.manual_seed(seed)  # the cotangents
    x = make_inputs(B=1, T=1, n_h=2, H=1, K=64, V=64, beta_max=1.0, seed=seed)
    _check_first_order(x, torch.bfloat16, scale=0.3, naive_factor=2.0)


@pytest.fixture
def tuned():
    """Apply a ``DELTA_PRODUCT_TUNING`` spec to the kernels for one test (restored afterwards)."""
    saved = TUNING.spec()
    yield TUNING.load
    TUNING.load(saved)


@pytest.mark.parametrize(
    "spec, dtype, n_h, K, V, gate",
    [
        ("inverse=packed,warps_prep=4,bwd_store=f32,block=64", torch.float32, 3, 24, 20, True),  # the earlier default
        ("inverse=tiles", torch.float32, 3, 24, 20, True),  # 63-step chunks: a masked row in the last tile
        ("inverse=tiles,bwd_store=input,bk_dqkw=128,bv_scan=64,wy_late=on,scan_split=on", torch.bfloat16, 2, 80, 80,
         True),  # other grids; the scans' state in halves, the second one partly masked
        ("scan_split=off,dqkw_split=off", torch.float32, 2, 80, 72, True),  # float32 scans, dqkw in one piece
        ("dqkw_split=off", torch.bfloat16, 3, 40, 72, True),  # dqkw's single loop, two value tiles
        ("", torch.float32, 1, 96, 40, False),  # float32 scans in halves (the default), no gate
        ("inverse=tiles,bwd_store=input,warps_wy=8,stages=2,wy_late=off", torch.float32, 1, 16, 16, True),
        ("inverse=tiles,block=128,warps_prep=8,warps_dqkw=8", torch.float32, 2, 80, 72, True),  # one K / V block
        ("tile_wy=16,wy_late=on", torch.float32, 2, 40, 36, True),  # wy_bwd over three masked tiles
        ("tile_prep=16,tile_dqkw=16", torch.float32, 2, 40, 36, True),  # prep and dqkw over three masked tiles
        ("fuse_out=on,bv_fused=32,fuse_min_programs=0", torch.float32, 2, 80, 72, True),  # the output in the scan, state halves (second one masked)
        ("bv_fused=16,stages_dh=1,fuse_min_programs=0", torch.bfloat16, 3, 40, 72, True),  # five value tiles, 21-token chunks
        ("fuse_out=off,stages_dh=2", torch.float32, 1, 32, 32, False),
        ("fuse_out=off", torch.bfloat16, 2, 40, 24, False),
        ("fuse_dv=on", torch.float32, 2, 80, 72, True),  # dU_loc in the scan, state halves (second one masked)
        ("fuse_dv=on,bv_scan=16", torch.bfloat16, 3, 40, 72, False),  # five value tiles, 21-token chunks
        ("fuse_dv=bf16,scan_split=on", torch.bfloat16, 1, 96, 32, True),
        ("gate_dk=split,dqkw_split=off", torch.bfloat16, 3, 72, 40, True),  # dS_{c+1} in halves, dqkw's single loop
        ("gate_dk=input,dqkw_split=off", torch.bfloat16, 2, 40, 36, True),  # dS_{c+1} in bf16 alone, its single loop
        ("gate_dk=input", torch.bfloat16, 3, 72, 40, True),  # and its three loops
    ],
)
def test_tuning_variants_match_recurrence(tuned, spec, dtype, n_h, K, V, gate):
    tuned(spec)
    x = make_inputs(B=1, T=45, n_h=n_h, H=2, K=K, V=V, gate=gate, initial_state=True, correlated=True,
                    seed=40 + n_h)
    _check_first_order(x, dtype, scale=0.7)


@pytest.mark.parametrize("gate_dk, low, high", [("split", 0.0, 0.03), ("input", 0.2, 1.0)])
def test_gate_dk_split_keeps_the_short_gate_cotangent(tuned, gate_dk, low, high):
    """Fuzz case 388 (T = 2, gated bf16, n_h = 2, K = V = 128; ``benchmarks/data``): its gate cotangent is a short
    sum of terms that cancel. From ``dS_{c+1}`` stored in bf16 alone (``gate_dk=input``) it is off by about 30 %
    against the float64 recurrence, from the two stored halves (``split``) by about 1 % (the interpreter multiplies
    in float32, so storage is the only rounding of ``dS_{c+1}`` here)."""
    tuned(f"gate_dk={gate_dk}")
    x = torch.load(DATA / "kernels_fuzz_case388.pt")
    do, ds = x.pop("do"), x.pop("ds")

    def dg(z: dict, f) -> torch.Tensor:
        z = {n: t.clone().requires_grad_() for n, t in z.items()}
        o, s = f(**z, output_final_state=True, scale=128 ** -0.5)
        return torch.autograd.grad((o.double() * do).sum() + (s.double() * ds).sum(), z["g"])[0].double()

    exact = dg({n: t.double() for n, t in x.items()}, delta_product_recurrent)
    assert low <= rel_err(dg(x, chunk_delta_product), exact) < high


@pytest.mark.parametrize("min_programs, fused", [(0, True), (3, False)])
def test_fuse_out_only_on_a_full_grid(tuned, monkeypatch, min_programs, fused):
    """``fuse_min_programs``: bf16 ``scan_h`` forms the output when its grid (``⌈V / bv_fused⌉·B·H = 2``
    programs here) has at least that many programs, else ``out_kernel`` runs; both match the recurrence."""
    tuned(f"fuse_min_programs={min_programs}")
    launched, real = [], chunk_fwd.launch
    monkeypatch.setattr(chunk_fwd, "launch", lambda kernel, *a, **kw: (launched.append(kernel), real(kernel, *a, **kw)))
    x = make_inputs(B=1, T=30, n_h=2, H=2, K=32, V=32, gate=True, initial_state=True, correlated=True, seed=5)
    _check_first_order(x, torch.bfloat16, scale=0.7)
    assert (chunk_fwd.out_kernel in launched) is not fused and chunk_fwd.scan_h_kernel in launched


@pytest.mark.parametrize(
    "spec, dtype, T, n_h, K, V, gate",
    [
        ("scan_groups=3", torch.float32, 200, 3, 24, 20, True),  # 10 chunks: groups of 4, 4, 2
        ("scan_groups=4", torch.float32, 150, 2, 80, 72, True),  # 5 chunks: 2, 2, 1; the state in halves
        ("scan_groups=2,fuse_dv=on", torch.float32, 300, 1, 32, 32, False),
        ("scan_groups=16", torch.bfloat16, 200, 3, 40, 72, True),  # ten groups of one chunk, five value tiles
        ("scan_groups=3,fuse_min_programs=0", torch.bfloat16, 130, 2, 32, 48, False),  # the output in the scan
        ("scan_groups=2", torch.bfloat16, 150, 2, 80, 40, True),  # one 128-row state tile (bf16 keeps it whole)
    ],
)
def test_chunk_groups_match_recurrence(tuned, monkeypatch, spec, dtype, T, n_h, K, V, gate):
    """``scan_groups``: the chunk scans in groups, each started from the summaries ``[S | M]`` of the groups
    before it (after it, reverse), match the recurrence; the summary pass and the scan pass both launch with
    the groups on the grid's third axis."""
    tuned(spec + ",group_min_chunks=1")
    grids = {}
    for module in (chunk_fwd, chunk_bwd):
        real = module.launch
        monkeypatch.setattr(module, "launch", lambda kernel, grid, *a, _real=real, **kw: (
            grids.setdefault(kernel.__name__, []).append(grid), _real(kernel, grid, *a, **kw)))
    x = make_inputs(B=1, T=T, n_h=n_h, H=2, K=K, V=V, gate=gate, initial_state=True, correlated=True,
                    seed=60 + T + n_h)
    _check_first_order(x, dtype, scale=0.7)
    nc = triton.cdiv(T, utils.chunk_tokens(n_h))
    ng = triton.cdiv(nc, triton.cdiv(nc, min(TUNING.scan_groups, nc)))
    for name in ("scan_h_kernel", "scan_dh_kernel"):
        assert [g[2] for g in grids[name]] == [ng - 1, ng], (name, grids[name])


@triton.jit
def _tf32_low_kernel(x, lo, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(lo + o, tf32_low(tl.load(x + o)))


@triton.jit
def _dot_kernel(a, b, c, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, PREC: tl.constexpr):
    o_m, o_k, o_n = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    b_a = tl.load(a + o_m[:, None] * K + o_k[None, :])
    b_b = tl.load(b + o_k[:, None] * N + o_n[None, :])
    tl.store(c + o_m[:, None] * N + o_n[None, :], dot(b_a, b_b, PREC))


def test_tf32x3t_split_and_its_error_bound():
    """``tf32_low`` (interpreted) is ``x`` less its 19 high bits, bit for bit; ``dot`` at ``"tf32x3t"`` (interpreted)
    sums the three passes; those passes, with the tensor cores' truncating read emulated in float64, stay within
    ``3·2⁻²⁰ Σ_k |a_ik| |b_kj|`` of ``a @ b``, a bound that one TF32 pass breaks."""
    n = 1024
    x = torch.randn(n) * 2.0 ** torch.randint(-60, 60, (n,)).float()
    x[:4] = torch.tensor([0.0, -0.0, 1e-40, -3e-39])  # subnormals keep their bits below the mask
    lo = torch.empty_like(x)
    _tf32_low_kernel[(1,)](x, lo, n)
    high = (x.view(torch.int32) & ~0x1FFF).view(torch.float32)
    assert torch.equal(lo, x - high) and torch.equal(high + lo, x)

    def read(t):  # what a TF32 tensor-core pass reads of a float32 operand: its 19 high bits
        return (t.view(torch.int32) & ~0x1FFF).view(torch.float32).double()

    a, b = torch.randn(64, 128), torch.randn(128, 32)
    a_lo, b_lo = a - read(a).float(), b - read(b).float()
    # the kernel's three passes: the interpreter multiplies in float32 without the TF32 read, so it sums
    # a_lo b + a b_lo + a b as they are
    c = torch.empty(64, 32)
    _dot_kernel[(1,)](a, b, c, 64, 128, 32, "tf32x3t")
    passes = a_lo.double() @ b.double() + a.double() @ b_lo.double() + a.double() @ b.double()
    assert rel_err(c.double(), passes) < 1e-6
    three = read(a_lo) @ read(b) + read(a) @ read(b_lo) + read(a) @ read(b)
    exact, bound = a.double() @ b.double(), 3 * 2.0 ** -20 * (a.double().abs() @ b.double().abs())
    assert ((three - exact).abs() <= bound).all()
    assert ((read(a) @ read(b) - exact).abs() > bound).any()


def test_tuning_spec_is_validated():
    assert Tuning().update("inverse=packed,warps_wy=8,hvp_tf32=0").spec() == "inverse=packed,warps_wy=8,hvp_tf32=False"
    loaded = Tuning().update("inverse=packed,stages=2").load("warps_wy=8")  # the rest back to the defaults
    assert loaded.spec() == "warps_wy=8" and loaded.load(loaded.spec()) == loaded
    with pytest.raises(ValueError, match="unknown field `warps`"):
        Tuning().update("warps=8")
    # booleans: on / off as the string fields spell them, never a silent False for a misspelling
    assert Tuning().update("hvp_tf32=off,hvp_tf32=ON").hvp_tf32 and not Tuning().update("direct_launch=Off").direct_launch
    with pytest.raises(ValueError, match="gate_dk must be one of"):
        Tuning().update("gate_dk=bf16")
    with pytest.raises(ValueError, match="tangent_gate must be one of"):
        Tuning().update("tangent_gate=maybe")
    with pytest.raises(ValueError, match="inverse"):
        Tuning().update("inverse=dense")
    with pytest.raises(ValueError, match="prec_f32"):
        Tuning().update("prec_f32=fp16")
    with pytest.raises(ValueError, match="prec_inverse"):  # the inverse's direct tl.dot takes Triton's precisions
        Tuning().update("prec_inverse=tf32x3t")
    with pytest.raises(ValueError, match=r"trunc_split names unknown kernels \['dq'\]"):
        Tuning().update("trunc_split=dqkw+dq")
    assert Tuning().kernel_prec("dqkw", "tf32x3") == "tf32x3t" and Tuning().kernel_prec("scan_h", "tf32x3") == "tf32x3"
    assert Tuning().kernel_prec("dqkw", "ieee") == "ieee"  # the interpreter, float64
    assert Tuning().update("trunc_split=").kernel_prec("dqkw", "tf32x3") == "tf32x3"
    launched = {n.removesuffix("_kernel") for m in (chunk_fwd, chunk_bwd, tangent_fwd, tangent_bwd) for n in dir(m)
                if n.endswith("_kernel") and isinstance(getattr(m, n), triton.runtime.KernelInterface)}
    assert launched == set(utils.KERNELS)  # the names trunc_split accepts
    with pytest.raises(ValueError, match="warps_wy must be one of"):
        Tuning().update("warps_wy=3")
    with pytest.raises(ValueError, match="warps_scan"):
        Tuning().update("warps_scan=0")  # only warps_prep has the by-dtype 0
    assert Tuning().prep_warps(torch.bfloat16) == 2 and Tuning().prep_warps(torch.float32) == 4
    assert Tuning().wy_tile(torch.bfloat16) == 64 and Tuning().wy_tile(torch.float32) == 32
    assert Tuning().update("tile_wy=64").wy_tile(torch.float32) == 64
    assert Tuning().update("tile_dqkw=32").kernel_tile("dqkw", torch.float32) == 32
    assert Tuning().kernel_tile("prep", torch.bfloat16) == 128 and Tuning().kernel_tile("dqkw", torch.float32) == 32
    assert Tuning().update("block=16").wy_tile(torch.bfloat16) == 16
    assert Tuning().update("warps_prep=8").prep_warps(torch.bfloat16) == 8
    for knob in ("gate_keys_prep", "gate_dqkw_split"):
        assert Tuning().on(knob, torch.float32) and not Tuning().on(knob, torch.bfloat16)
    for refused in ("tile_wy=48", "tile_dqkw=48", "gate_mids=yes", "gate_keys_prep=1", "gate_dqkw_split=2", "block=8",
                    "warps_dual=16", "bv_dual=16",  # 16: illegal memory access (float32)
                    "hvp_mode=twice", "wy_late=yes", "stages_scan=0", "stages=5",
                    "stages_dh=5", "stages_dual=5", "fuse_out=1", "bv_fused=48", "tangent_tiles=yes", "fuse_min_programs=-1",
                    "tangent_tiles=on", "tangent_tiles=f32", "scan_groups=-1", "group_min_chunks=-2",  # float32 tiles: illegal memory access
                    "warps_dual=8,block_dual=16"):  # illegal memory access (float32 gated wy_cols_tangent)
        with pytest.raises(ValueError, match=refused.split("=")[0]):
            Tuning().update(refused)
    assert Tuning().tangent_launch("prep", torch.bfloat16) == (4, 64)  # TANGENT_LAUNCH: 4 warps, half tiles
    assert Tuning().tangent_launch("wy", torch.float32) == (4, 32) and Tuning().tangent_launch("out", torch.float32) == (4, 32)
    assert Tuning().tangent_launch("dqkw", torch.float32) == (4, 16)  # TANGENT_LAUNCH_F32
    assert Tuning().tangent_launch("dqkw", torch.float32, full_queries=True) == (4, 16)
    # TANGENT_LAUNCH_GATE(_F32): the gated dqkw at 4 warps and quarter tiles, 8 warps with a full chunk of queries;
    # the rest as without (wy: 4 warps and 32 columns everywhere)
    assert Tuning().tangent_launch("dqkw", torch.bfloat16, gate=True) == (4, 32)
    assert Tuning().tangent_launch("dqkw", torch.bfloat16, gate=True, full_queries=True) == (8, 32)
    assert Tuning().tangent_launch("dqkw", torch.bfloat16, full_queries=True) == (4, 128)
    assert Tuning().tangent_launch("dv", torch.bfloat16, gate=True) == (4, 64)
    assert Tuning().tangent_launch("wy", torch.bfloat16, gate=True) == (4, 32) == Tuning().tangent_launch(
        "wy", torch.bfloat16) == Tuning().tangent_launch("wy", torch.float32)
    assert Tuning().tangent_launch("dqkw", torch.float32, gate=True) == (4, 16)
    assert Tuning().tangent_launch("dqkw", torch.float32, gate=True, full_queries=True) == (8, 16)
    # float32: the scans at 4 warps, dv at half tiles, wy at half tiles with a gate too
    assert Tuning().tangent_launch("wy", torch.float32, gate=True) == (4, 32)
    assert Tuning().tangent_launch("scan", torch.float32)[0] == 4 and Tuning().tangent_launch("scan", torch.bfloat16)[0] == 8
    assert Tuning().tangent_launch("dv", torch.float32) == Tuning().tangent_launch("dv", torch.float32, gate=True) == (4, 32)
    assert Tuning().tangent_launch("out", torch.bfloat16, gate=True) == Tuning().tangent_launch("out", torch.bfloat16)
    bf16, f32 = torch.bfloat16, torch.float32
    assert Tuning().on("wy_late", f32) and not Tuning().on("wy_late", bf16)
    assert Tuning().on("dqkw_split", bf16) and not Tuning().update("dqkw_split=f32").on("dqkw_split", bf16)
    for knob in ("scan_split", "wy_split"):  # on for float32 only, unless set
        assert Tuning().on(knob, f32) and not Tuning().on(knob, bf16)
    assert Tuning().update("scan_split=on,wy_split=off").on("scan_split", bf16)
    assert not Tuning().update("scan_split=on,wy_split=off").on("wy_split", f32)
    with pytest.raises(ValueError, match="wy_split"):
        Tuning().update("wy_split=yes")
    assert Tuning().tangent_gate and not Tuning().update("tangent_gate=0").tangent_gate
    assert Tuning().update("wy_late=on").on("wy_late", bf16) and not Tuning().update("wy_late=off").on("wy_late", f32)
    assert Tuning().update("warps_dual=8,block_dual=32").tangent_launch("prep", bf16) == (8, 32)
    assert Tuning().scan_cols(bf16, dual=True) == 64 and Tuning().scan_cols(f32, dual=True) == Tuning().bv_scan
    assert Tuning().update("bv_dual=64").scan_cols(f32, True) == 64
    assert Tuning().scan_cols(bf16) == Tuning().scan_cols(f32) == Tuning().bv_scan
    for knob in ("fuse_out", "fuse_dv", "tangent_tiles"):  # "bf16": 16-bit inputs only
        assert Tuning().on(knob, bf16) and not Tuning().on(knob, f32)
    assert Tuning().update("fuse_out=f32").on("fuse_out", f32) and not Tuning().update("fuse_out=off").on("fuse_out", bf16)
    assert not Tuning().update("tangent_tiles=off").on("tangent_tiles", bf16)
    # the tangent scans on float32 rows with a gate, for float32, and with tangent_tiles off; else on bf16 tiles
    assert not Tuning().tangent_rows(bf16, gate=False) and Tuning().tangent_rows(bf16, gate=True)
    assert Tuning().tangent_rows(f32, gate=False) and Tuning().update("tangent_tiles=off").tangent_rows(bf16, False)
    # fuse_out at fused grids of at least fuse_min_programs programs only
    assert Tuning().fuses_out(bf16, 128) and not Tuning().fuses_out(bf16, 127) and not Tuning().fuses_out(f32, 10 ** 4)
    assert Tuning().update("fuse_min_programs=0").fuses_out(bf16, 1)
    assert Tuning().dh_stages(torch.float32) == 1 and Tuning().dh_stages(torch.bfloat16) == Tuning().stages_scan
    assert Tuning().update("stages_dh=3").dh_stages(torch.float32) == 3
    assert Tuning().dual_stages(f32) == 1 and Tuning().dual_stages(bf16) == Tuning().stages  # the tangent scans
    assert Tuning().update("stages_dual=2").dual_stages(f32) == 2
    # chunk groups: 8 below group_programs programs, no fewer than group_min_chunks chunks each, never 2 by choice
    assert Tuning().groups(32, 400) == 8 == Tuning().groups(127, 400) and Tuning().groups(128, 400) == 1
    assert Tuning().groups(1, 100) == 6 and Tuning().groups(32, 48) == 3 and Tuning().groups(32, 47) == 1
    assert Tuning().groups(32, 10) == 1 and Tuning().update("scan_groups=2").groups(32, 47) == 2
    assert Tuning().update("scan_groups=3").groups(10 ** 4, 400) == 3
    assert Tuning().update("scan_groups=1").groups(1, 400) == 1
    assert Tuning().update("group_min_chunks=0,scan_groups=6").groups(1, 4) == 4


@pytest.mark.parametrize("T, ct", [(12, 4), (13, 4), (3, 4), (1, 1)])
def test_chunk_local_cumsum_restarts_at_every_chunk(T, ct):
    """``G_t`` sums ``g`` from the first token of ``t``'s chunk (whole chunks, a partial last one, one chunk), in
    float32 for bf16 input, with its gradient."""
    g = torch.randn(2, T, 3, dtype=torch.float64).to(torch.bfloat16).requires_grad_(True)
    G = utils.chunk_local_cumsum(g, ct)
    ref = torch.stack([g[:, (t // ct) * ct:t + 1].double().sum(1) for t in range(T)], 1)
    assert G.dtype == torch.float32 and G.shape == g.shape
    assert torch.allclose(G.double(), ref, rtol=0, atol=1e-6)
    w = torch.randn(2, T, 3, dtype=torch.float32)
    dg, = torch.autograd.grad((G * w).sum(), g)  # Σ_{s ≥ t in t's chunk} w_s
    ref_dg = torch.stack([w[:, t:((t // ct) + 1) * ct].sum(1) for t in range(T)], 1)
    assert torch.allclose(dg.float(), ref_dg.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("T, ct", [(13, 4), (8, 4), (5, 7)])
def test_chunk_local_cumsum_every_order(T, ct):
    """``chunk_local_cumsum`` against finite differences in float64: reverse and forward mode, reverse-over-reverse
    and forward-over-reverse, and through ``torch.func``."""
    g = torch.randn(2, T, 3, dtype=torch.float64, requires_grad=True)

    def f(x):
        return utils.chunk_local_cumsum(x, ct)

    assert torch.autograd.gradcheck(f, (g,), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(f, (g,), check_fwd_over_rev=True)
    w = torch.randn(2, T, 3, dtype=torch.float64)
    dg = torch.func.grad(lambda x: (f(x) * w).sum())(g.detach())
    assert torch.allclose(dg, torch.autograd.grad((f(g) * w).sum(), g)[0], rtol=0, atol=1e-12)
    assert torch.allclose(torch.func.jvp(f, (g.detach(),), (w,))[1], f(w), rtol=0, atol=1e-12)


def test_uncorrelated_keys_beta_up_to_one():
    x = make_inputs(B=1, T=40, n_h=2, H=1, K=16, V=16, gate=True, beta_max=1.0, seed=3)
    _check_first_order(x, torch.float32)


@pytest.mark.parametrize("K, V", [(136, 16), (16, 144)])
def test_wide_head_dims_fall_back_to_composed_path(K, V):
    x = make_inputs(B=1, T=9, n_h=2, H=1, K=K, V=V, gate=True, initial_state=True, correlated=True, seed=K)
    _check_first_order(x, torch.float32)


@pytest.mark.parametrize("n_h, K", [(3, 16), (1, 136)])  # fused kernels, composed fallback
def test_gate_gradient_is_exactly_zero_on_a_zero_state(n_h, K):
    """With one token and no initial state the gate multiplies a zero state: ``∂L/∂g = 0`` exactly.
    Factors ``e^{G_a − G_b}`` within one token are identically 1, so no rounding residue may remain."""
    x = make_inputs(B=1, T=1, n_h=n_h, H=2, K=K, V=16, gate=True, dtype=torch.float32, seed=n_h,
                    requires_grad=True)
    o, s = chunk_delta_product(**x, output_final_state=True)
    dg, = torch.autograd.grad((o * torch.randn_like(o)).sum() + s.sum(), x["g"])
    assert torch.equal(dg, torch.zeros_like(dg))


def test_float64_composed_path_is_exact():
    x = make_inputs(B=1, T=11, n_h=3, H=2, K=8, V=8, gate=True, initial_state=True, correlated=True, seed=5)
    o, s = chunk_delta_product(**x, output_final_state=True)
    o64, s64 = delta_product_recurrent(**x, output_final_state=True)
    assert o.dtype == torch.float64
    assert rel_err(o, o64) < 1e-12 and rel_err(s, s64) < 1e-12


def test_non_contiguous_inputs_are_accepted():
    x = make_inputs(B=1, T=20, n_h=2, H=2, K=16, V=16, gate=True, seed=11, dtype=torch.float32)
    o_ref, _ = chunk_delta_product(**x)
    nc = {n: (t.transpose(0, 1).contiguous().transpose(0, 1) if t is not None else None) for n, t in x.items()}
    nc["q"] = torch.cat([x["q"], x["q"]], -1)[..., :16]  # a strided view
    assert not nc["q"].is_contiguous()
    o, _ = chunk_delta_product(**nc)
    assert torch.equal(o, o_ref)


def test_no_final_state_unless_asked():
    x = make_inputs(B=1, T=4, n_h=1, H=1, K=16, V=16, seed=2, dtype=torch.float32)
    o, s = chunk_delta_product(**x)
    assert s is None and o.shape == (1, 4, 1, 16)


def _base(**kw):
    x = make_inputs(B=1, T=4, n_h=2, H=2, K=16, V=16, gate=True, initial_state=True, seed=1, dtype=torch.float32)
    x.update(kw)
    return x


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(k=torch.randn(1, 4, 3, 2, 16)), "`v`"),              # n_h of k and v disagree
        (dict(v=torch.randn(1, 4, 3, 2, 16)), "`v`"),
        (dict(beta=torch.rand(1, 4, 3, 2)), "`beta`"),             # n_h of beta disagrees
        (dict(beta=torch.rand(1, 4, 2)), "`beta`"),
        (dict(g=torch.randn(1, 5, 2)), "`g`"),
        (dict(initial_state=torch.randn(1, 2, 16, 8)), "`initial_state`"),
        (dict(q=torch.randn(1, 4, 2)), "`q`"),
        (dict(k=torch.randn(1, 4, 2, 2, 8)), "`k`"),
        (dict(q=torch.randn(1, 4, 2, 16, dtype=torch.float16)), "`q`"),
        (dict(v=torch.randn(1, 4, 2, 2, 16, dtype=torch.float64)), "`v`"),
        (dict(beta=torch.ones(1, 4, 2, 2, dtype=torch.int64)), "`beta`"),
        (dict(q=torch.randn(1, 4, 2, 300), k=torch.randn(1, 4, 2, 2, 300), initial_state=None), "head dim"),
    ],
)
def test_bad_inputs_name_the_argument(change, name):
    with pytest.raises(ValueError, match=name):
        chunk_delta_product(**_base(**change))


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="`q` is on cpu"):
        chunk_delta_product(**_base())
