"""Second order and forward mode of the DeltaProduct kernels, against float64 autograd / torch.func
on the token-by-token recurrence (fresh random inputs, correlated keys, ``β`` up to 2):

* the low-rank scan primitive ``chunk_scan`` (forward and reverse, with and without the dense
  injection ``C`` and ``h0``): values, gradients, double backward and ``jvp`` against a PyTorch loop,
  float64, to rounding; first and second derivatives against finite differences (gradcheck);
* the composed chunked form (PyTorch inside chunks + ``chunk_scan``) in float64: equal to the
  recurrence to rounding for outputs, gradients, Hessian-vector products and ``jvp``;
* the public function in float32 (fused kernels for value and gradient; double backward and
  ``jvp`` by the tangent kernels without a gate or with ``TUNING.tangent_gate``, else through the
  composed form):
  Hessian-vector products by double backward and ``torch.func.jvp``, and by ``torch.func``'s
  ``jvp`` and ``vjp`` of ``grad``, tolerance 2e-5 relative (seen ≤ 1e-6).
"""
from __future__ import annotations

import pytest
import torch
import triton

from kernels.delta_product import chunk_delta_product, chunk_scan, composed_delta_product
from kernels.delta_product import chunk as chunk_module
from kernels.delta_product import tangent_bwd, tangent_fwd
from kernels.delta_product.tri_inverse import unit_lower_inverse
from kernels.delta_product.utils import TUNING, chunk_local_cumsum, chunk_tokens
from lrnn.ops.recurrent import delta_product_recurrent
from tests.lrnn_inputs import make_inputs, rel_err

ARGS = ("q", "k", "v", "beta", "g", "initial_state")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("DELTA_PRODUCT_POISON", "1")


def _spy(monkeypatch, module, name: str, calls: list, record=None) -> None:
    """Wrap ``module.name`` so that each call first appends ``record(*args, **kwargs)`` (default: ``name``)
    to ``calls``."""
    fn = getattr(module, name)

    def spy(*a, **kw):
        calls.append(name if record is None else record(*a, **kw))
        return fn(*a, **kw)

    monkeypatch.setattr(module, name, spy)


def _loop_scan(a, X, Y, B, h0, C, reverse):
    """``H_{c+1} = a_c H_c + X_cᵀ (B_c − Y_c H_c) + C_c`` (mirrored for ``reverse``), a PyTorch loop."""
    n = X.shape[1]
    if h0 is None:
        h0 = torch.zeros(X.shape[0], X.shape[-1], (B if B is not None else C).shape[-1], dtype=X.dtype)
    H = [h0] * (n + 1)
    for c in (reversed(range(n)) if reverse else range(n)):
        h = H[c + 1 if reverse else c]
        res = -(Y[:, c] @ h) if B is None else B[:, c] - Y[:, c] @ h
        new = a[:, c, None, None] * h + X[:, c].transpose(-1, -2) @ res
        H[c if reverse else c + 1] = new if C is None else new + C[:, c]
    return torch.stack(H, 1)


def _scan_inputs(BH, N, L, K, V, seed, with_b=True, with_c=True, with_h0=True):
    """Float64 ``(a, X, Y, B, h0, C)`` (None where left out) with a contracting transition."""
    gen = torch.Generator().manual_seed(seed)

    def rn(*s, std=1.0):
        return std * torch.randn(*s, generator=gen, dtype=torch.float64)

    a = torch.rand(BH, N, generator=gen, dtype=torch.float64)
    X, Y = rn(BH, N, L, K, std=0.5 / K ** 0.5), rn(BH, N, L, K, std=0.5 / K ** 0.5)
    return (a, X, Y, rn(BH, N, L, V) if with_b else None, rn(BH, K, V) if with_h0 else None,
            rn(BH, N, K, V) if with_c else None)


@pytest.mark.parametrize("reverse, with_c, with_h0, L, K", [(False, True, True, 5, 20), (True, True, False, 5, 20),
                                                            (False, False, True, 70, 70), (True, False, True, 9, 200)])
def test_scan_all_orders(reverse, with_c, with_h0, L, K):
    """The low-rank scan against the float64 loop: values, gradients of every input, HVP by double
    backward and by forward-over-reverse, and jvp, to rounding; ``L, K > 64`` loop over row blocks
    of ``X, Y`` and the state."""
    full = _scan_inputs(2, 3, L, K, 9, seed=K + L + 2 * reverse + with_c, with_c=with_c, with_h0=with_h0)
    idx = [i for i, t in enumerate(full) if t is not None]
    xs = tuple(full[i].clone().requires_grad_() for i in idx)

    def bind(fn):  # fn of the present inputs only
        def f(*t):
            args = list(full)
            for i, x in zip(idx, t):
                args[i] = x
            return fn(*args, reverse)
        return f

    f, fr = bind(chunk_scan), bind(_loop_scan)
    H, Hr = f(*xs), fr(*xs)
    assert rel_err(H, Hr) < 1e-13
    w = torch.randn_like(H)
    g = torch.autograd.grad((f(*xs) * w).sum(), xs, create_graph=True)
    gr = torch.autograd.grad((fr(*xs) * w).sum(), xs, create_graph=True)
    vs = [torch.randn_like(x) for x in xs]
    hv = torch.autograd.grad(sum((a * b).sum() for a, b in zip(g, vs)), xs)
    hvr = torch.autograd.grad(sum((a * b).sum() for a, b in zip(gr, vs)), xs)
    for a, b in zip(g + hv, gr + hvr):
        assert rel_err(a, b) < 1e-12
    prim = tuple(x.detach() for x in xs)
    assert rel_err(torch.func.jvp(f, prim, tuple(vs))[1], torch.func.jvp(fr, prim, tuple(vs))[1]) < 1e-12
    fwd_over_rev = torch.func.jvp(lambda *t: torch.func.vjp(f, *t)[1](w), prim, tuple(vs))[1]
    for a, b in zip(fwd_over_rev, hvr):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_gradcheck(reverse):
    """Finite differences (float64, ``fast_mode``: a random projection of the Jacobian): first
    derivatives of all six inputs (``gradcheck``) and second derivatives (``gradgradcheck``); then
    with ``B`` and ``C`` absent. (``jvp`` is held to the loop's in :func:`test_scan_all_orders`.)"""
    xs = tuple(t.requires_grad_() for t in _scan_inputs(1, 3, 3, 5, 4, seed=7 + reverse))

    def f(*t):
        return chunk_scan(*t, reverse)

    assert torch.autograd.gradcheck(f, xs, fast_mode=True)
    assert torch.autograd.gradgradcheck(f, xs, fast_mode=True)
    a, X, Y, _, h0, _ = xs
    assert torch.autograd.gradcheck(lambda *t: chunk_scan(*t[:3], None, t[3], None, reverse), (a, X, Y, h0),
                                    fast_mode=True)
    with pytest.raises(ValueError, match="h0"):
        chunk_scan(a, X, Y, None, None)


def test_scan_bad_arguments_are_named():
    a, X, Y, Bm, h0, C = _scan_inputs(2, 3, 4, 5, 6, seed=3)
    bad = {"a": a[:, :2], "Y": Y[..., :3], "Bm": Bm[..., :2, :], "h0": h0[:, :4], "C": C[:, :, :3]}
    for name, t in bad.items():
        args = {**dict(a=a, X=X, Y=Y, Bm=Bm, h0=h0, C=C), name: t}
        with pytest.raises(ValueError, match=f"`{name}` must have shape"):
            chunk_scan(**args)
    with pytest.raises(ValueError, match="`C` must be torch.float64"):
        chunk_scan(a, X, Y, Bm, h0, C.float())
    with pytest.raises(ValueError, match="`X` must be a float32 or float64"):
        chunk_scan(a, X.half(), Y, Bm, h0, C)


@pytest.mark.parametrize("L", [64, 63, 20])
def test_unit_lower_inverse_all_orders(L):
    """``(I + tril(A, −1))⁻¹``: the float32 tile kernel and the float64 solve path against
    ``torch.linalg.inv`` in float64 (value, gradient, HVP, jvp); the upper part of ``A`` is ignored."""
    gen = torch.Generator().manual_seed(L)
    k = torch.nn.functional.normalize(torch.randn(3, 2, L, 16, generator=gen, dtype=torch.float64) * 0.2
                                      + torch.randn(1, 1, 1, 16, generator=gen, dtype=torch.float64), dim=-1)
    beta = 2 * torch.rand(3, 2, L, generator=gen, dtype=torch.float64)
    junk = torch.randn(3, 2, L, L, generator=gen, dtype=torch.float64).triu()  # on and above the diagonal
    A = beta[..., None] * (k @ k.transpose(-1, -2)) + junk
    w, v = torch.randn_like(A), torch.randn_like(A)

    def ref(a):
        return torch.linalg.inv(torch.eye(L, dtype=a.dtype) + a.tril(-1))

    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        a, a64 = A.to(dtype).requires_grad_(), A.clone().requires_grad_()
        errs = {"value": rel_err(unit_lower_inverse(a).double(), ref(A))}
        g = torch.autograd.grad((unit_lower_inverse(a) * w.to(dtype)).sum(), a, create_graph=True)[0]
        g64 = torch.autograd.grad((ref(a64) * w).sum(), a64, create_graph=True)[0]
        errs["grad"] = rel_err(g.double(), g64)
        h = torch.autograd.grad((g * v.to(dtype)).sum(), a)[0]
        errs["hvp"] = rel_err(h.double(), torch.autograd.grad((g64 * v).sum(), a64)[0])
        j = torch.func.jvp(unit_lower_inverse, (a.detach(),), (v.to(dtype),))[1]
        errs["jvp"] = rel_err(j.double(), torch.func.jvp(ref, (A,), (v,))[1])
        assert max(errs.values()) < tol, (dtype, errs)


def _all_orders(fn, x: dict, tol: float, dtype: torch.dtype) -> None:
    """Outputs, gradients, double-backward HVPs and jvp of ``fn`` vs the float64 recurrence."""
    names = [n for n in ARGS if x[n] is not None]
    ref_in = [x[n].to(dtype).double().requires_grad_() for n in names]
    ker_in = [t.detach().to(dtype).requires_grad_() for t in ref_in]

    def ref(*a):
        return delta_product_recurrent(**dict(zip(names, a)), output_final_state=True, scale=0.8)

    def ker(*a):
        return fn(**dict(zip(names, a)))

    o, s = ker(*ker_in)
    o64, s64 = ref(*ref_in)
    do, ds = torch.randn_like(o64), torch.randn_like(s64)
    g = torch.autograd.grad((o.double() * do).sum() + (s.double() * ds).sum(), ker_in, create_graph=True)
    g64 = torch.autograd.grad((o64 * do).sum() + (s64 * ds).sum(), ref_in, create_graph=True)
    vs = [torch.randn_like(t) for t in ref_in]
    hv = torch.autograd.grad(sum((a.double() * v).sum() for a, v in zip(g, vs)), ker_in)
    hv64 = torch.autograd.grad(sum((a * v).sum() for a, v in zip(g64, vs)), ref_in)
    tang = tuple(v.to(dtype) for v in vs)
    _, (jo, js) = torch.func.jvp(ker, tuple(t.detach() for t in ker_in), tang)
    _, (jo64, js64) = torch.func.jvp(ref, tuple(t.detach() for t in ref_in), tuple(t.double() for t in tang))
    errs = {"o": rel_err(o.double(), o64), "jvp_o": rel_err(jo.double(), jo64), "jvp_s": rel_err(js.double(), js64)}
    errs.update({f"d{n}": rel_err(a.double(), b) for n, a, b in zip(names, g, g64)})
    errs.update({f"hvp_{n}": rel_err(a.double(), b) for n, a, b in zip(names, hv, hv64)})
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"{bad} (all: {errs})"


def test_composed_form_float64_all_orders():
    x = make_inputs(B=1, T=10, n_h=3, H=2, K=5, V=3, gate=True, initial_state=True, correlated=True, seed=21)

    def composed(q, k, v, beta, g, initial_state):
        G = chunk_local_cumsum(g, 3)  # 3 tokens per chunk: several chunks and a partial one
        return composed_delta_product(q, k, v, beta, G, initial_state, 0.8, 3)

    _all_orders(composed, x, 1e-12, torch.float64)


@pytest.mark.parametrize("T, n_h, gate, h0, inverse, hvp_mode", [
    (40, 2, True, True, "solve", "rev_rev"), (23, 3, False, False, "solve", "rev_rev"),
    (30, 2, True, True, "kernel", "rev_rev"), (30, 3, True, True, "kernel", "fwd_rev"),
    (30, 2, True, True, "kernel", "dual")])  # a gate: "dual" falls back to the composed fwd_rev
def test_kernel_hvp_and_jvp_float32(T, n_h, gate, h0, inverse, hvp_mode, monkeypatch):
    monkeypatch.setattr(TUNING, "composed_inverse", inverse)  # the composed path's (I + A)⁻¹
    monkeypatch.setattr(TUNING, "hvp_mode", hvp_mode)  # double backward: vjp of vjp, or jvp of vjp
    x = make_inputs(B=1, T=T, n_h=n_h, H=2, K=16, V=16, gate=gate, initial_state=h0, correlated=True, seed=T)

    def kernel(**a):
        return chunk_delta_product(**a, output_final_state=True, scale=0.8)

    _all_orders(kernel, x, 2e-5, torch.float32)


@pytest.mark.parametrize("T, n_h, h0, K, V, dtype, wy_split, tiles", [
    (70, 1, False, 16, 32, torch.float32, "f32", "off"),   # two chunks, T not divisible by the chunk
    (40, 2, True, 32, 16, torch.float32, "f32", "off"),
    (40, 2, True, 32, 16, torch.float32, "off", "bf16"),   # one-kernel tangent of wy_bwd; float32 keeps rows
    (30, 3, True, 24, 20, torch.float32, "f32", "off"),    # 63 micro-steps per chunk, odd head dims
    (30, 3, True, 24, 20, torch.bfloat16, "f32", "bf16"),  # the same on bf16 tiles
    (5, 4, False, 16, 16, torch.float32, "f32", "off"),    # one short chunk
    (40, 2, True, 32, 16, torch.bfloat16, "f32", "off"),
    (40, 2, True, 32, 16, torch.bfloat16, "on", "off"),    # the two-kernel tangent of wy_bwd in bf16
    (40, 2, True, 32, 16, torch.bfloat16, "f32", "bf16"),  # bf16 tiles and dU̇_loc in scan_dh_tangent (fuse_dv)
])
def test_dual_kernels_hvp_and_jvp(T, n_h, h0, K, V, dtype, wy_split, tiles, monkeypatch):
    """The tangent kernels (``hvp_mode = "dual"``, the default):
    double backward and ``jvp`` against the float64 recurrence, every buffer NaN-poisoned first
    (tolerance: float32 2e-5, bf16 4e-2 as for the first order); both ``wy_split`` forms in each dtype, and the
    tangent scans on float32 rows or, for bf16, on input-dtype tiles with ``dU̇_loc`` formed in ``scan_dh_tangent``
    (``tangent_tiles``)."""
    monkeypatch.setattr(TUNING, "hvp_mode", "dual")
    monkeypatch.setattr(TUNING, "wy_split", wy_split)
    monkeypatch.setattr(TUNING, "tangent_tiles", tiles)
    x = make_inputs(B=2, T=T, n_h=n_h, H=2, K=K, V=V, gate=False, initial_state=h0, correlated=True, seed=T + K)

    def kernel(**a):
        return chunk_delta_product(**a, output_final_state=True, scale=0.8)

    _all_orders(kernel, x, 2e-5 if dtype == torch.float32 else 4e-2, dtype)


@pytest.mark.parametrize("T, n_h, h0, K, V, dtype, block, wy_split", [
    (70, 1, False, 16, 32, torch.float32, 0, "f32"),   # two chunks, the second partial
    (30, 3, True, 24, 20, torch.float32, 0, "f32"),    # 63 micro-steps per chunk, odd head dims
    (30, 3, True, 24, 20, torch.float32, 0, "off"),    # the one-kernel tangent of wy_bwd in float32
    (5, 4, False, 16, 16, torch.float32, 0, "f32"),    # one short chunk
    (40, 2, True, 32, 16, torch.bfloat16, 0, "f32"),
    (40, 2, True, 32, 16, torch.bfloat16, 0, "on"),    # the two-kernel tangent of wy_bwd in bf16
    (20, 2, False, 64, 48, torch.bfloat16, 0, "on"),   # its two kernels on tiles of 32 and 64 columns
    (40, 2, True, 48, 40, torch.float32, 16, "f32"),   # tiles of 16 columns: several key and value blocks per loop
])
def test_gated_tangent_kernels_all_orders(T, n_h, h0, K, V, dtype, block, wy_split, monkeypatch):
    """``TUNING.tangent_gate``: the double backward and ``torch.func.jvp`` of gated inputs (``g`` with a
    direction too) by the tangent kernels with the gate's terms, against the float64 recurrence with
    poisoned buffers (tolerance: float32 2e-5, bf16 4e-2); both ``wy_split`` forms in each dtype. With a gate
    the tangent scans read float32 rows even when ``tangent_tiles`` is on (set here in half the cases), and
    ``dqkw_tangent`` reads the gate products the backward stored (``gate_mids``), and ``dv_local_tangent`` forms the
    tangent of the gate's ``dP ⊙ P`` terms (``gate_pp_dv``) and the tangent scan's gated tiles (``gate_tiles_dv``),
    whose decayed keys ``prep_tangent`` stores for both tangent scans (``gate_keys_prep``): here all four in float32
    and in the bf16 cases of ``wy_split = "on"``, none in the float32 case of ``"off"`` nor in the other bf16
    case. With an initial state ``dqkw_tangent`` runs as two launches, its state side and then its query side
    (``gate_dqkw_split``), else as one."""
    monkeypatch.setattr(TUNING, "hvp_mode", "dual")
    monkeypatch.setattr(TUNING, "tangent_gate", True)
    monkeypatch.setattr(TUNING, "block_dual", block)
    monkeypatch.setattr(TUNING, "wy_split", wy_split)
    monkeypatch.setattr(TUNING, "tangent_tiles", "bf16" if T % 20 == 0 else "off")
    for knob in ("gate_mids", "gate_pp_dv", "gate_tiles_dv", "gate_keys_prep"):
        monkeypatch.setattr(TUNING, knob, {"on": "on", "off": "off"}.get(wy_split, "f32"))
    monkeypatch.setattr(TUNING, "gate_dqkw_split", "on" if h0 else "off")
    calls = []
    for name in ("chunk_fwd_tangent", "chunk_bwd_tangent"):
        _spy(monkeypatch, chunk_module, name, calls,
             lambda *a, _n=name, **kw: (_n, kw.get("gate") is not None, _n == "chunk_bwd_tangent" and
                                        a[8][3].numel() > 0, kw.get("keys") is not None))
    sides = []
    _spy(monkeypatch, tangent_bwd, "launch", sides,
         lambda kernel, *a, **kw: kw.get("SIDE") if kernel is tangent_bwd.dqkw_tangent_kernel else None)
    x = make_inputs(B=2, T=T, n_h=n_h, H=2, K=K, V=V, gate=True, initial_state=h0, correlated=True, seed=T + n_h)

    def kernel(**a):
        return chunk_delta_product(**a, output_final_state=True, scale=0.8)

    _all_orders(kernel, x, 2e-5 if dtype == torch.float32 else 4e-2, dtype)
    # the double backward (a tangent forward and backward) and the jvp (a tangent forward), all gated
    stored, keys = TUNING.on("gate_mids", dtype), TUNING.on("gate_keys_prep", dtype)
    assert sorted(calls) == ([("chunk_bwd_tangent", True, stored, keys)]
                             + [("chunk_fwd_tangent", True, False, False)] * 2), calls
    assert [s for s in sides if s is not None] == ([1, 2] if h0 else [0]), sides


@pytest.mark.parametrize("T, n_h, K, V, dtype, gate, groups", [
    (200, 3, 24, 20, torch.float32, False, 3),   # 10 chunks in groups of 4, 4, 2; odd head dims
    (130, 2, 32, 16, torch.float32, True, 16),   # 5 chunks, a group each, with a gate
    (200, 3, 32, 48, torch.bfloat16, False, 4),  # bf16 tiles and dU̇_loc in scan_dh_tangent
    (40, 2, 80, 24, torch.float32, False, 1),    # state in halves, the second partly masked
    (30, 3, 72, 20, torch.float32, True, 1),     # halves with a gate: K̃, K̃̇ and e^{G_L} (Ġ_L S + Ṡ) per half
    (130, 2, 96, 16, torch.float32, True, 3),    # halves in chunk groups: the summaries by halves
    (40, 2, 80, 24, torch.bfloat16, True, 1),    # gated bf16 reads float32 rows: halves too with scan_split=on
])
def test_tangent_scans_grouped_and_split(T, n_h, K, V, dtype, gate, groups, monkeypatch):
    """``scan_groups`` in the tangent scans (the primal's transition, tangent injections) and ``scan_split`` (set
    on) on float32 rows at ``K > 64``, the state as two tiles of 64 rows, each with its own key columns: double
    backward and ``jvp`` against the float64 recurrence with poisoned buffers, and every tangent scan launched in
    groups and, at ``K > 64``, split."""
    monkeypatch.setattr(TUNING, "hvp_mode", "dual")
    monkeypatch.setattr(TUNING, "scan_split", "on")
    monkeypatch.setattr(TUNING, "scan_groups", groups)
    monkeypatch.setattr(TUNING, "group_min_chunks", 1)
    calls = []
    for module in (tangent_fwd, tangent_bwd):
        _spy(monkeypatch, module, "launch_scan", calls,
             lambda kernel, c, *a, **kw: (kernel.__name__, c["NG"], kw["SPLIT"], kw["BK"]))
    x = make_inputs(B=1, T=T, n_h=n_h, H=2, K=K, V=V, gate=gate, initial_state=True, correlated=True, seed=T + K)

    def kernel(**a):
        return chunk_delta_product(**a, output_final_state=True, scale=0.8)

    _all_orders(kernel, x, 2e-5 if dtype == torch.float32 else 4e-2, dtype)
    nc = triton.cdiv(T, chunk_tokens(n_h))
    ng = triton.cdiv(nc, triton.cdiv(nc, min(groups, nc)))
    split = K > 64
    bk = 64 if split else triton.next_power_of_2(K)
    assert sorted(set(calls)) == [("scan_dh_tangent_kernel", ng, split, bk), ("scan_h_tangent_kernel", ng, split, bk)]


@pytest.mark.parametrize("gate, tangent_gate", [(False, False), (True, False), (True, True)])
def test_torch_func_hvp_forward_and_reverse_over_reverse(gate, tangent_gate, monkeypatch):
    """``torch.func.jvp(grad(ℓ))`` (the backward Function's ``jvp``) and ``torch.func.vjp(grad(ℓ))``
    give the float64 Hessian-vector product, for a loss nonlinear in both outputs (the tangent kernels
    without a gate or with ``TUNING.tangent_gate``, else the composed form)."""
    monkeypatch.setattr(TUNING, "hvp_mode", "dual")
    monkeypatch.setattr(TUNING, "tangent_gate", tangent_gate)
    x = make_inputs(B=1, T=20, n_h=2, H=2, K=16, V=16, gate=gate, initial_state=True, correlated=True, seed=3)
    names = [n for n in ARGS if x[n] is not None]
    xs = tuple(x[n].float() for n in names)
    vs = tuple(torch.randn_like(t) for t in xs)
    argnums = tuple(range(len(xs)))

    def loss(fn, *a):
        o, s = fn(**dict(zip(names, a)), output_final_state=True, scale=0.8)
        return (o.double() ** 2).sum() + (s.double() ** 3).sum()

    def grad(fn):
        return lambda *a: torch.func.grad(lambda *b: loss(fn, *b), argnums=argnums)(*a)

    _, h64 = torch.func.jvp(grad(delta_product_recurrent), tuple(t.double() for t in xs), tuple(t.double() for t in vs))
    calls = []
    _spy(monkeypatch, chunk_module, "chunk_fwd_tangent", calls)
    _, h_fwd = torch.func.jvp(grad(chunk_delta_product), xs, vs)
    # the backward's jvp reuses the forward's tangents of the saved intermediates: one tangent forward
    assert len(calls) == (0 if gate and not tangent_gate else 1)
    h_rev = torch.func.vjp(grad(chunk_delta_product), *xs)[1](vs)
    errs = {f"{way}_{n}": rel_err(a.double(), b) for way, h in (("fwd", h_fwd), ("rev", h_rev))
            for n, a, b in zip(names, h, h64)}
    assert max(errs.values()) < 2e-5, errs


def test_jvp_of_grad_of_a_linear_loss_runs_one_tangent_forward(monkeypatch):
    """``jvp(grad(⟨c, o⟩))`` matches the float64 HVP and runs one tangent forward, one tangent
    backward (the backward's ``jvp`` reuses the forward's tangents) and one primal backward: the
    constant cotangent ``c`` has no tangent, which reaches the backward's ``jvp`` as None (not
    materialized as zeros, which would cost a second primal backward ``Jᵀ ċ``)."""
    monkeypatch.setattr(TUNING, "hvp_mode", "dual")
    x = make_inputs(B=1, T=12, n_h=2, H=2, K=16, V=16, gate=False, initial_state=True, correlated=True, seed=5)
    names = [n for n in ARGS if x[n] is not None]
    xs = tuple(x[n].float() for n in names)
    vs = tuple(torch.randn_like(t) for t in xs)
    c = torch.randn(x["q"].shape[:3] + (x["v"].shape[-1],), dtype=torch.float64)
    argnums = tuple(range(len(xs)))

    def grad(fn):
        return torch.func.grad(lambda *a: (fn(**dict(zip(names, a)), scale=0.7)[0].double() * c).sum(), argnums=argnums)

    h64 = torch.func.jvp(grad(delta_product_recurrent), tuple(t.double() for t in xs), tuple(t.double() for t in vs))[1]
    calls = []
    for name in ("chunk_bwd", "chunk_fwd_tangent", "chunk_bwd_tangent"):
        _spy(monkeypatch, chunk_module, name, calls)
    h = torch.func.jvp(grad(chunk_delta_product), xs, vs)[1]
    assert sorted(calls) == ["chunk_bwd", "chunk_bwd_tangent", "chunk_fwd_tangent"], calls
    errs = {n: rel_err(a.double(), b) for n, a, b in zip(names, h, h64)}
    assert max(errs.values()) < 2e-5, errs


@pytest.mark.parametrize("cotangents_need_grad", [False, True])
def test_double_backward_forms_the_output_tangent_only_for_cotangents_that_need_it(cotangents_need_grad,
                                                                                  monkeypatch):
    """In ``grad(⟨grad(⟨c, f(x)⟩, x), u⟩)`` the cotangent of ``c = (do, dht)`` is ``J u``: the tangent
    kernels form it (against the float64 ``jvp``) only when ``c`` requires grad, else the output tangent
    kernel is not launched; the HVP is the float64 one either way."""
    from kernels.delta_product import tangent_fwd as tangent_fwd_module

    monkeypatch.setattr(TUNING, "hvp_mode", "dual")
    launched = []
    _spy(monkeypatch, tangent_fwd_module, "launch", launched, lambda kernel, *a, **kw: kernel)
    x = make_inputs(B=1, T=20, n_h=2, H=2, K=16, V=16, gate=False, initial_state=True, correlated=True, seed=8)
    names = [n for n in ARGS if x[n] is not None]
    xs64 = tuple(x[n].double() for n in names)
    us = tuple(torch.randn_like(t) for t in xs64)

    def ref(*a):
        return delta_product_recurrent(**dict(zip(names, a)), output_final_state=True, scale=0.8)

    o64, s64 = ref(*(t.clone().requires_grad_() for t in xs64))
    cs64 = (torch.randn_like(o64), torch.randn_like(s64))
    xs = [t.float().requires_grad_() for t in xs64]
    cs = [c.float().requires_grad_(cotangents_need_grad) for c in cs64]
    o, s = chunk_delta_product(**dict(zip(names, xs)), output_final_state=True, scale=0.8)
    g = torch.autograd.grad((o, s), xs, cs, create_graph=True)
    wrt = xs + (cs if cotangents_need_grad else [])
    h = torch.autograd.grad(g, wrt, [u.float() for u in us])

    def grad_at(*a):
        out = ref(*a)
        return torch.autograd.grad(out, a, cs64, create_graph=True)

    a64 = tuple(t.clone().requires_grad_() for t in xs64)
    h64 = torch.autograd.grad(grad_at(*a64), a64, us)
    errs = {f"hvp_{n}": rel_err(a.double(), b) for n, a, b in zip(names, h, h64)}
    if cotangents_need_grad:
        jo, js = torch.func.jvp(ref, xs64, us)[1]
        errs.update(jvp_o=rel_err(h[-2].double(), jo), jvp_s=rel_err(h[-1].double(), js))
    assert max(errs.values()) < 2e-5, errs
    assert (tangent_fwd_module.out_tangent_kernel in launched) == cotangents_need_grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_small_heads_take_the_tangent_kernels(dtype, monkeypatch):
    """The double backward takes the tangent kernels at small head dims too (bf16 at K = 32 on an H100 needed
    ``wy_bwd_tangent``'s ``T`` in float32), and gives the float64 Hessian-vector product."""
    calls = []
    _spy(monkeypatch, chunk_module, "chunk_fwd_tangent", calls)
    x = make_inputs(B=1, T=20, n_h=2, H=2, K=16, V=32, gate=False, initial_state=True, correlated=True, seed=6)
    _all_orders(lambda **a: chunk_delta_product(**a, output_final_state=True, scale=0.8), x,
                2e-5 if dtype == torch.float32 else 4e-2, dtype)
    assert calls


def test_third_order_through_the_dual_kernels_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(TUNING, "hvp_mode", "dual")
    x = make_inputs(B=1, T=6, n_h=2, H=1, K=16, V=16, gate=False, initial_state=False, seed=4)
    xs = [x[n].float().requires_grad_() for n in ("q", "k", "v", "beta")]
    o, _ = chunk_delta_product(*xs)
    g = torch.autograd.grad(o.sum(), xs, create_graph=True)
    h = torch.autograd.grad(sum((a * a).sum() for a in g), xs, create_graph=True)
    with pytest.raises(NotImplementedError, match="hvp_mode = 'fwd_rev'"):
        torch.autograd.grad(sum(a.sum() for a in h), xs)


@pytest.mark.parametrize("gate_dk", ["split", "input"])
def test_gate_dk_keeps_every_order(monkeypatch, gate_dk):
    """``TUNING.gate_dk``: with a gate and bf16 inputs ``dS_{c+1}`` is stored as two bf16 halves and ``U dS_{c+1}ᵀ``
    formed from both, or from the first alone; gradients, the double backward and ``jvp`` match the float64
    recurrence (bf16 4e-2), the tangent kernels reading the first half (bf16 ``dHs``)."""
    monkeypatch.setattr(TUNING, "hvp_mode", "dual")
    monkeypatch.setattr(TUNING, "tangent_gate", True)
    monkeypatch.setattr(TUNING, "gate_dk", gate_dk)
    calls = []
    _spy(monkeypatch, chunk_module, "chunk_bwd_tangent", calls, lambda *a, **kw: a[8][1].dtype)
    x = make_inputs(B=1, T=40, n_h=2, H=2, K=32, V=16, gate=True, initial_state=True, correlated=True, seed=9)

    def kernel(**a):
        return chunk_delta_product(**a, output_final_state=True, scale=0.8)

    _all_orders(kernel, x, 4e-2, torch.bfloat16)
    assert calls == [torch.bfloat16]
