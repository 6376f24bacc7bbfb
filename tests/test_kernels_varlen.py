"""Variable-length batches (``cu_seqlens``): sequences packed along ``T`` against the float64
token-by-token recurrence run on each sequence alone, with its own initial and final state.

Fused kernels in float32 (tolerance 2e-5 relative; outputs, final states, every gradient) and the
float64 composed path to rounding for gradients, a Hessian-vector product and ``jvp``; a sequence of
length 0 keeps its initial state; bad offsets name ``cu_seqlens``.
"""
from __future__ import annotations

import pytest
import torch

from kernels.delta_product import chunk_delta_product
from lrnn.ops.recurrent import delta_product_recurrent
from tests.lrnn_inputs import make_inputs, rel_err

ARGS = ("q", "k", "v", "beta", "g")
LENGTHS = [5, 0, 23, 1, 9, 0]  # two empty sequences, one of them last; 23 > 21 tokens per chunk at n_h = 3


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("DELTA_PRODUCT_POISON", "1")


def _packed(n_h: int, gate: bool, dtype: torch.dtype, seed: int):
    """Packed inputs ``[1, ΣL, …]``, offsets, initial states ``[N, H, K, V]``."""
    T, N, H, K, V = sum(LENGTHS), len(LENGTHS), 2, 16, 12
    x = make_inputs(B=1, T=T, n_h=n_h, H=H, K=K, V=V, gate=gate, correlated=True, dtype=dtype, seed=seed)
    h0 = torch.randn(N, H, K, V, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)
    cu = torch.tensor([0] + LENGTHS).cumsum(0)
    return {n: x[n] for n in ARGS}, cu, h0


def _per_sequence(x: dict, cu: torch.Tensor, h0: torch.Tensor, scale: float):
    """The float64 recurrence on each sequence alone: ``(o [1, T, H, V], final [N, H, K, V])``."""
    outs, finals = [], []
    for n, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        part = {name: (t[:, a:b] if t is not None else None) for name, t in x.items()}
        if b == a:
            finals.append(h0[n])
            continue
        o, s = delta_product_recurrent(**part, initial_state=h0[n:n + 1], output_final_state=True, scale=scale)
        outs.append(o)
        finals.append(s[0])
    return torch.cat(outs, 1), torch.stack(finals)


@pytest.mark.parametrize("n_h, gate", [(1, True), (3, False)])
def test_packed_sequences_match_each_sequence_alone(n_h, gate):
    x64, cu, h0_64 = _packed(n_h, gate, torch.float64, seed=20 + n_h)
    names = [n for n in ARGS if x64[n] is not None]
    ref_in = [x64[n].float().double().requires_grad_() for n in names] + [h0_64.float().double().requires_grad_()]
    ker_in = [t.detach().float().requires_grad_() for t in ref_in]
    o, s = chunk_delta_product(**dict(zip(names, ker_in[:-1])), initial_state=ker_in[-1], output_final_state=True,
                               scale=0.5, cu_seqlens=cu)
    o64, s64 = _per_sequence(dict(zip(names, ref_in[:-1])), cu, ref_in[-1], 0.5)
    assert o.shape == o64.shape and s.shape == s64.shape == (len(LENGTHS), 2, 16, 12)
    do, ds = torch.randn_like(o64), torch.randn_like(s64)
    grads = torch.autograd.grad((o.double() * do).sum() + (s.double() * ds).sum(), ker_in)
    grads64 = torch.autograd.grad((o64 * do).sum() + (s64 * ds).sum(), ref_in)
    errs = {"o": rel_err(o.double(), o64), "final": rel_err(s.double(), s64)}
    errs.update({f"d{n}": rel_err(a.double(), b) for n, a, b in zip(names + ["initial_state"], grads, grads64)})
    assert max(errs.values()) < 2e-5, errs
    for n in (1, 5):  # the empty sequences keep their initial states
        assert torch.equal(s[n], ker_in[-1][n].detach())


def test_packed_float64_second_order_and_forward_mode():
    x, cu, h0 = _packed(2, True, torch.float64, seed=5)
    names = list(ARGS)
    prim = tuple(x[n] for n in names) + (h0,)

    def ours(*a):
        o, s = chunk_delta_product(*a[:-1], initial_state=a[-1], output_final_state=True, cu_seqlens=cu)
        return o, s

    def ref(*a):
        return _per_sequence(dict(zip(names, a[:-1])), cu, a[-1], 1.0)

    gen = torch.Generator().manual_seed(6)
    tang = tuple(torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in prim)
    do = torch.randn(ref(*prim)[0].shape, generator=gen, dtype=torch.float64)

    def hvp(f):
        xs = [t.detach().requires_grad_() for t in prim]
        g = torch.autograd.grad((f(*xs)[0] * do).sum(), xs, create_graph=True)
        return torch.autograd.grad(sum((a * b).sum() for a, b in zip(g, tang)), xs)

    for a, b in zip(hvp(ours), hvp(ref)):
        assert rel_err(a, b) < 1e-10
    (_, jo), (_, jr) = torch.func.jvp(ours, prim, tang), torch.func.jvp(ref, prim, tang)
    assert rel_err(jo[0], jr[0]) < 1e-10 and rel_err(jo[1], jr[1]) < 1e-10


@pytest.mark.parametrize(
    "cu, match",
    [
        ([0, 5, 4, 38], "non-decreasing"),
        ([1, 38], "start at 0"),
        ([0, 37], "end at T"),
    ],
)
def test_bad_offsets_name_cu_seqlens(cu, match):
    x, _, _ = _packed(1, False, torch.float32, seed=0)
    with pytest.raises(ValueError, match=match):
        chunk_delta_product(**x, cu_seqlens=torch.tensor(cu))


def test_varlen_needs_one_packed_row_and_one_state_per_sequence():
    x, cu, h0 = _packed(1, False, torch.float32, seed=0)
    with pytest.raises(ValueError, match="cu_seqlens.*int"):
        chunk_delta_product(**x, cu_seqlens=cu.float())
    with pytest.raises(ValueError, match=r"\[1, T, H, K\]"):
        chunk_delta_product(**{n: torch.cat([t, t]) for n, t in x.items() if t is not None}, cu_seqlens=cu)
    with pytest.raises(ValueError, match="initial_state"):
        chunk_delta_product(**x, initial_state=h0[:2], cu_seqlens=cu)
