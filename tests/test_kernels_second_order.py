"""Second order and forward mode of the DeltaProduct kernels, against float64 autograd / torch.func
on the token-by-token recurrence (fresh random inputs, correlated keys, ``β`` up to 2):

* the scan primitive ``ChunkScan`` (forward and reverse, transposed or not): values, gradients,
  double backward and ``jvp`` against a PyTorch loop, float64, to rounding;
* the composed chunked form (PyTorch inside chunks + ``ChunkScan``) in float64: equal to the
  recurrence to rounding for outputs, gradients, Hessian-vector products and ``jvp``;
* the public function in float32 (fused kernels for value and gradient; double backward and
  ``jvp`` through the composed form): Hessian-vector products by double backward and
  ``torch.func.jvp``, tolerance 2e-5 relative (seen ≤ 1e-6).
"""
from __future__ import annotations

import pytest
import torch

from kernels.delta_product import chunk_delta_product, chunk_scan, composed_delta_product
from kernels.delta_product.tri_inverse import unit_lower_inverse
from kernels.delta_product.utils import TUNING, chunk_local_cumsum
from lrnn.ops.recurrent import delta_product_recurrent
from tests.lrnn_inputs import make_inputs, rel_err

ARGS = ("q", "k", "v", "beta", "g", "initial_state")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("DELTA_PRODUCT_POISON", "1")


def _loop_scan(A, B, h0, reverse, transpose):
    n = A.shape[1]
    op = (lambda a: a.transpose(-1, -2)) if transpose else (lambda a: a)
    H = [h0] * (n + 1)
    for c in (reversed(range(n)) if reverse else range(n)):
        H[c if reverse else c + 1] = op(A[:, c]) @ H[c + 1 if reverse else c] + B[:, c]
    return torch.stack(H, 1)


@pytest.mark.parametrize("reverse, transpose, K", [(False, False, 20), (True, True, 20), (False, True, 70)])
def test_scan_all_orders(reverse, transpose, K):
    gen = torch.Generator().manual_seed(K + 2 * reverse + transpose)
    A = (0.3 * torch.randn(2, 3, K, K, generator=gen, dtype=torch.float64)).requires_grad_()
    B = torch.randn(2, 3, K, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, K, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    xs = (A, B, h0)
    f = lambda *a: chunk_scan(*a, reverse, transpose)
    fr = lambda *a: _loop_scan(*a, reverse, transpose)
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


@pytest.mark.parametrize("T, n_h, gate, h0, inverse", [(40, 2, True, True, "solve"), (23, 3, False, False, "solve"),
                                                     (30, 2, True, True, "kernel")])
def test_kernel_hvp_and_jvp_float32(T, n_h, gate, h0, inverse, monkeypatch):
    monkeypatch.setattr(TUNING, "composed_inverse", inverse)  # the composed path's (I + A)⁻¹
    x = make_inputs(B=1, T=T, n_h=n_h, H=2, K=16, V=16, gate=gate, initial_state=h0, correlated=True, seed=T)

    def kernel(**a):
        return chunk_delta_product(**a, output_final_state=True, scale=0.8)

    _all_orders(kernel, x, 2e-5, torch.float32)
