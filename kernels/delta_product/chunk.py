"""Public chunked DeltaProduct: fused Triton kernels for value, gradient, forward mode and the double
backward; the composed differentiable form for everything else.

* :class:`ChunkDeltaProductFunction`: forward = the three fused forward kernels; backward =
  :class:`ChunkDeltaProductBackward`, whose forward is the four fused backward kernels (called directly
  when nothing can differentiate the backward: :func:`_first_order_only`); ``jvp`` =
  the tangent kernels of :mod:`~kernels.delta_product.tangent_fwd` at the forward's saved
  intermediates (``TUNING.hvp_mode = "dual"``, the default; with a gate while
  ``TUNING.tangent_gate``, the default), else forward mode through
  :func:`~kernels.delta_product.composed.composed_delta_product`.
* :class:`ChunkDeltaProductBackward`: its backward (the double backward of the operator, e.g. for
  Hessian-vector products) and ``jvp`` are forward-over-reverse by the tangent kernels: with
  ``x + ε ẋ`` as input, the tangents of the outputs are ``J ẋ`` and of the gradients
  ``∇²⟨f, (do, dht)⟩ ẋ``, computed at the saved primal intermediates of the forward and of the
  backward, which are not recomputed. Otherwise (a gate without ``TUNING.tangent_gate``, or ``hvp_mode``
  ``"rev_rev"`` / ``"fwd_rev"``) it is the second derivative of the composed form, reverse-over-reverse or
  forward-over-reverse, whose only sequential part is the low-rank
  :func:`~kernels.delta_product.scan.chunk_scan`.

Both Functions use ``setup_context`` and save only inputs and outputs, so ``torch.func.grad``,
``torch.func.vjp`` and ``torch.func.jvp`` apply (``vmap`` is not supported).
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from torch._functorch.utils import unwrap_dead_wrappers
from torch.autograd import forward_ad

from kernels.delta_product.chunk_bwd import chunk_bwd
from kernels.delta_product.chunk_fwd import chunk_fwd
from kernels.delta_product.composed import composed_delta_product
from kernels.delta_product.tangent_bwd import chunk_bwd_tangent
from kernels.delta_product.tangent_fwd import chunk_fwd_tangent
from kernels.delta_product.varlen import varlen_delta_product
from kernels.delta_product.utils import (
    FUSED_MAX_DIM,
    FUSED_MAX_NH,
    TUNING,
    chunk_local_cumsum,
    chunk_tokens,
    validate,
)

_PRIMALS = ("q", "k", "v", "beta", "G", "h0")


def _composed_at(scale: float, primals: tuple[Tensor | None, ...], directions: tuple[Tensor | None, ...]):
    """The composed operator as a function ``f`` of the present primals only (for torch.func), those
    primals ``xs``, and ``directions`` (tangents or cotangents, one per primal of ``_PRIMALS``) at
    them, zeros where None; the present names, in ``_PRIMALS`` order, come last."""
    present = tuple(n for n, x in zip(_PRIMALS, primals) if x is not None)
    prim, dirs = dict(zip(_PRIMALS, primals)), dict(zip(_PRIMALS, directions))
    ct = chunk_tokens(prim["k"].shape[2])

    def f(*xs: Tensor) -> tuple[Tensor, Tensor]:
        a = dict(zip(present, xs))
        return composed_delta_product(a["q"], a["k"], a["v"], a["beta"], a.get("G"), a.get("h0"), scale, ct)

    xs = tuple(prim[n] for n in present)
    filled = tuple(torch.zeros_like(prim[n]) if dirs[n] is None else dirs[n] for n in present)
    return f, xs, filled, present


@contextlib.contextmanager
def _matmul_precision(q: Tensor):
    """TF32 for the float32 matmuls inside, when ``TUNING.hvp_tf32`` and ``q`` is bf16 on a GPU
    (the legacy ``allow_tf32`` flag, restored on exit; left alone if it cannot be read or set)."""
    m, old = torch.backends.cuda.matmul, None
    if TUNING.hvp_tf32 and q.dtype == torch.bfloat16 and q.is_cuda:
        try:
            old = m.allow_tf32
            m.allow_tf32 = True
        except RuntimeError:  # the new fp32_precision API is in use: do not mix the two
            old = None
    try:
        yield
    finally:
        if old is not None:
            m.allow_tf32 = old


class ChunkDeltaProductFunction(torch.autograd.Function):
    """``(q, k, v, beta, G, h0, scale) → (o, final_state, Ti, W, Hs, U)``; the last four are
    intermediates returned so that the backward may reuse them. Reverse mode treats them as
    constants (their cotangents are ignored; the backward differentiates through them itself);
    forward mode by the tangent kernels (:func:`_dual_ok`) gives them tangents, which the backward's
    ``jvp`` reuses; otherwise they are non-differentiable."""

    @staticmethod
    def forward(q, k, v, beta, G, h0, scale):
        o, ht, saved = chunk_fwd(q, k, v, beta, G, h0, scale, True)
        return (o, ht) + saved

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, beta, G, h0, scale = inputs
        ctx.scale = scale
        if not _dual_ok(G):  # only the tangent kernels give the intermediates tangents
            ctx.mark_non_differentiable(*output[2:])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, beta, G, h0, *output[2:])
        ctx.save_for_forward(q, k, v, beta, G, h0, *output[2:])

    @staticmethod
    def backward(ctx, do, dht, *_):
        q, k, v, beta, G, h0, *saved = ctx.saved_tensors
        if do is None and dht is None:  # only the intermediates got (ignored) cotangents
            return (None,) * 7
        if do is None:
            do = torch.zeros(q.shape[:3] + (v.shape[-1],), device=q.device, dtype=q.dtype)
        if _first_order_only():  # the backward's own autograd Function would record nothing
            return chunk_bwd(q, k, v, beta, G, h0, ctx.scale, saved, do, dht)[0] + (None,)
        grads = _apply(ChunkDeltaProductBackward, q, k, v, beta, G, h0, do, dht, ctx.scale, *saved)[:6]
        return tuple(grads) + (None,)

    @staticmethod
    def jvp(ctx, dq, dk, dv, dbeta, dG, dh0, _scale):
        *primals, Ti, W, Hs, U = ctx.saved_tensors
        q, k, v, beta, G, h0 = primals
        if _dual_ok(G):
            tangents = _filled((q, k, v, beta, h0), (dq, dk, dv, dbeta, dh0))
            tG = None if G is None else _filled((G,), (dG,))[0]
            return _apply(DualForward, q, k, v, beta, h0, ctx.scale, Ti, W, Hs, U, G, tG, *tangents)
        f, xs, tangents, _ = _composed_at(ctx.scale, primals, (dq, dk, dv, dbeta, dG, dh0))
        _, (do, dht) = torch.func.jvp(f, xs, tangents)
        return do.to(primals[0].dtype), dht, None, None, None, None


class ChunkDeltaProductBackward(torch.autograd.Function):
    """``(q, k, v, beta, G, h0, do, dht, scale, Ti, W, Hs, U) → (dq, dk, dv, dbeta, dG, dh0, dU, dHs, dW, gm)``
    by the fused backward kernels (the last four: non-differentiable intermediates that the tangent
    kernels read; ``gm`` the gate products, :func:`~kernels.delta_product.chunk_bwd.gate_mid_views`); its
    backward and ``jvp`` (second order) by :func:`_second_order`."""

    @staticmethod
    def forward(q, k, v, beta, G, h0, do, dht, scale, *saved):
        grads, mids = chunk_bwd(q, k, v, beta, G, h0, scale, saved, do, dht, differentiable=True)
        return grads + mids

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.scale = inputs[8]
        ctx.mark_non_differentiable(*output[6:])
        ctx.set_materialize_grads(False)  # no zeros for missing cotangents and tangents: None, skipped
        ctx.save_for_backward(*inputs[:8], *inputs[9:], *output[6:])
        ctx.save_for_forward(*inputs[:8], *inputs[9:], *output[6:])

    @staticmethod
    def backward(ctx, *cot):
        if all(c is None for c in cot[:6]):
            return (None,) * 13
        q, k, v, beta, G, h0, do, dht, *rest = ctx.saved_tensors
        gx, ddo, ddht = _second_order(ctx.scale, (q, k, v, beta, G, h0), rest, do, dht, cot[:6],
                                      need_jx=any(ctx.needs_input_grad[6:8]))
        return gx + (ddo, ddht, None) + (None,) * 4

    @staticmethod
    def jvp(ctx, *tangents):
        """``d(Jᵀ c) = ∇²⟨f, c⟩ ẋ + Jᵀ ċ`` for ``c = (do, dht)``; the tangents of ``saved`` from the
        forward's ``jvp`` are reused when all four are given."""
        q, k, v, beta, G, h0, do, dht, *rest = ctx.saved_tensors
        tsaved = tangents[9:13] if all(t is not None for t in tangents[9:13]) else None
        gx = _second_order(ctx.scale, (q, k, v, beta, G, h0), rest, do, dht, tangents[:6], tsaved)[0]
        # a cotangent without a tangent (e.g. the constant c of jvp(grad(⟨c, f⟩))) comes as None, not
        # zeros (set_materialize_grads(False)), so the primal backward for J^T ċ runs only when needed
        tdo, tdht = tangents[6:8]
        if tdo is not None or tdht is not None:
            tdo = torch.zeros_like(do) if tdo is None else tdo
            lin = _apply(ChunkDeltaProductBackward, q, k, v, beta, G, h0, tdo, tdht, ctx.scale, *rest[:4])[:6]
            gx = tuple(a if b is None else (b if a is None else a + b) for a, b in zip(gx, lin))
        return tuple(gx) + (None,) * 4


def _second_order(scale: float, primals: tuple[Tensor | None, ...], kept: list[Tensor], do: Tensor,
                  dht: Tensor | None, dirs: tuple[Tensor | None, ...], tsaved: tuple[Tensor, ...] | None = None,
                  need_jx: bool = True) -> tuple[tuple[Tensor | None, ...], Tensor | None, Tensor | None]:
    """For ``f = (o, h_T)`` at ``primals = (q, k, v, beta, G, h0)`` and ``c = (do, dht)``:
    ``(∇²⟨f, c⟩ ẋ per primal, J ẋ)`` with ``ẋ = dirs`` (None: zero), by the tangent kernels when
    :func:`_dual_ok` (at ``kept``: the forward's ``saved`` and the backward's intermediates; with
    ``tsaved``, the tangents of ``saved``, or ``need_jx`` False, ``J ẋ`` is not formed by them and comes
    back None), else by differentiating the composed form (``TUNING.hvp_mode``)."""
    q, k, v, beta, G, h0 = primals
    if _dual_ok(G):
        tangents = _filled((q, k, v, beta, h0), dirs[:4] + dirs[5:])
        tG = None if G is None else _filled((G,), dirs[4:5])[0]
        args = (q, k, v, beta, h0, do, dht, scale, need_jx, G, tG, *kept, *(tsaved or (None,) * 4), *tangents)
        # DualBackward only refuses third order; nothing can ask for it when nothing differentiates this
        *hvp, to, tht = _dual_backward(*args) if _first_order_only() else _apply(DualBackward, *args)
        return tuple(hvp), to, tht
    f, xs, directions, present = _composed_at(scale, primals, dirs)
    had_dht = dht is not None
    if not had_dht:
        dht = torch.zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[-1], device=q.device,
                          dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    with _matmul_precision(q):
        if TUNING.hvp_mode == "rev_rev":
            gx, ddo, ddht = _reverse_over_reverse(f, xs, do, dht, directions)
        else:
            gx, ddo, ddht = _forward_over_reverse(f, xs, do, dht, directions)
    gx = dict(zip(present, gx))
    return tuple(gx.get(n) for n in _PRIMALS), ddo, (ddht if had_dht else None)


_THIRD_ORDER = ("third-order derivatives through the DeltaProduct kernels need the composed path: set "
                "kernels.delta_product.utils.TUNING.hvp_mode = 'fwd_rev' (or DELTA_PRODUCT_TUNING=hvp_mode=fwd_rev)")


class _NoThirdOrder(torch.autograd.Function):
    """Base of the dual-kernel Functions: their own derivatives (third order) are not implemented."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *_):
        raise NotImplementedError(_THIRD_ORDER)

    @staticmethod
    def jvp(ctx, *_):
        raise NotImplementedError(_THIRD_ORDER)


class DualForward(_NoThirdOrder):
    """``(q, k, v, beta, h0, scale, Ti, W, Hs, U, G, Ġ, q̇, k̇, v̇, β̇, ḣ0) → (ȯ, ḣ_T, Ṫ, Ẇ, Ḣs, U̇)``: the
    tangent of the operator (``J ẋ``) and of ``saved = (Ti, W, Hs, U)`` by the tangent kernels at
    ``saved`` (``G``, ``Ġ`` None without a gate; ``ḣ0`` None iff ``h0`` is)."""

    @staticmethod
    def forward(q, k, v, beta, h0, scale, Ti, W, Hs, U, G, tG, *tangents):
        to, tht, tsaved, _ = chunk_fwd_tangent(q, k, v, beta, h0, scale, (Ti, W, Hs, U), tangents, True,
                                            gate=None if G is None else (G, tG))
        return (to, tht) + tsaved


class DualBackward(_NoThirdOrder):
    """``(q, k, v, beta, h0, do, dht, scale, need_jx, G, Ġ, Ti, W, Hs, U, dU, dHs, dW, gm, Ṫ, Ẇ, Ḣs, U̇, q̇, k̇, v̇,
    β̇, ḣ0) → (H ẋ for q, k, v, β, G, h0; ȯ, ḣ_T)``: the forward and backward tangent kernels at the forward's
    ``saved`` and the backward's intermediates for the cotangents ``(do, dht)``; the tangents of the
    gradients are the Hessian-vector product ``∇²_x ⟨f(x), (do, dht)⟩ ẋ`` (``G``, ``Ġ`` and the ``G`` entry
    None without a gate). The tangents of ``saved``
    (``Ṫ, Ẇ, Ḣs, U̇``) may be given (all four), and then ``ȯ, ḣ_T`` come back None, as they do when
    ``need_jx`` is False (nothing asks for the cotangents of ``do, dht``: the output tangent kernel is
    skipped); ``ḣ_T`` is None when ``dht`` is."""

    @staticmethod
    def forward(*args):
        return _dual_backward(*args)


def _dual_backward(q, k, v, beta, h0, do, dht, scale, need_jx, G, tG, Ti, W, Hs, U, dU, dHs, dW, gm, tTi, tW, tHs,
                   tU, *tangents):
    """:class:`DualBackward`'s forward: the tangent kernels, forward (unless the tangents of ``saved`` are
    given) then backward."""
    saved, tsaved, to, tht, keys = (Ti, W, Hs, U), (tTi, tW, tHs, tU), None, None, None
    gate = None if G is None else (G, tG)
    if tTi is None:
        to, tht, tsaved, keys = chunk_fwd_tangent(q, k, v, beta, h0, scale, saved, tangents,
                                                  need_jx and dht is not None, output=need_jx, gate=gate)
    hvp = chunk_bwd_tangent(q, k, v, beta, h0, scale, saved, do, (dU, dHs, dW, gm), tangents, tsaved, gate=gate,
                            keys=keys)
    return hvp + (to, tht)


def _first_order_only() -> bool:
    """Nothing can differentiate a backward run now: grad mode is off (no ``create_graph``), no forward-mode
    level is open and no ``torch.func`` transform is active. The backward then calls its kernels directly,
    without :class:`ChunkDeltaProductBackward` (whose ``apply`` costs host time that eager calls feel at
    small sizes)."""
    return (not torch.is_grad_enabled() and getattr(forward_ad, "_current_level", 0) < 0
            and not torch._C._are_functorch_transforms_active())


def _apply(function: type[torch.autograd.Function], *args):
    """``function.apply(*args)``, every argument given positionally. Outside ``torch.func`` transforms and
    ``torch.compile`` this is ``Function.apply`` without its per-call ``inspect.signature`` binding of default
    arguments, which a ``Function`` with ``setup_context`` pays on every call and which has nothing to bind here
    (host time that eager calls at small sizes feel)."""
    if torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
        return function.apply(*args)
    return super(torch.autograd.Function, function).apply(*unwrap_dead_wrappers(args))


def _dual_ok(G: Tensor | None) -> bool:
    """The tangent kernels serve forward mode and the double backward: ``hvp_mode = "dual"``, and no gate or
    ``TUNING.tangent_gate``."""
    return TUNING.hvp_mode == "dual" and (G is None or TUNING.tangent_gate)


def _filled(primals: tuple[Tensor | None, ...], tangents: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
    """Contiguous tangents in the primals' dtypes, zeros where None (None where the primal is)."""
    return tuple(None if x is None else (torch.zeros_like(x) if t is None else t.to(x.dtype).contiguous())
                 for x, t in zip(primals, tangents))


def _reverse_over_reverse(f, xs: tuple[Tensor, ...], do: Tensor, dht: Tensor, v: tuple[Tensor, ...]):
    """Cotangents of ``(x, do, dht) ↦ J_f(x)ᵀ (do, dht)`` for the cotangent ``v`` of its output, by
    ``torch.func.vjp`` of ``torch.func.vjp``: ``(∇²_x ⟨f(x), (do, dht)⟩ v, J_f(x) v)``."""

    def first_order(*args: Tensor) -> tuple[Tensor, ...]:
        *x, do_, dht_ = args
        out, pull = torch.func.vjp(f, *x)
        return pull((do_.to(out[0].dtype), dht_.to(out[1].dtype)))

    _, pull2 = torch.func.vjp(first_order, *xs, do, dht)
    g = pull2(v)
    return g[:-2], g[-2], g[-1]


def _forward_over_reverse(f, xs: tuple[Tensor, ...], do: Tensor, dht: Tensor, v: tuple[Tensor, ...]):
    """The same three cotangents from one ``torch.func.jvp`` in the direction ``v`` of
    ``x ↦ (f(x), J_f(x)ᵀ (do, dht))``: its tangents are ``J_f(x) v`` (the cotangent of ``(do, dht)``)
    and, by the symmetry of ``∇²_x ⟨f(x), (do, dht)⟩``, the cotangent of ``x``."""

    def value_and_pullback(*x: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, ...]]:
        out, pull = torch.func.vjp(f, *x)
        return out, pull((do.to(out[0].dtype), dht.to(out[1].dtype)))

    _, ((do_dot, dht_dot), gx) = torch.func.jvp(value_and_pullback, xs, v)
    return gx, do_dot.to(do.dtype), dht_dot.to(dht.dtype)


def _fused_ok(q: Tensor, K: int, V: int, n_h: int) -> bool:
    return q.dtype in (torch.bfloat16, torch.float32) and max(K, V) <= FUSED_MAX_DIM and n_h <= FUSED_MAX_NH


def chunk_delta_product(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    scale: float = 1.0,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Chunked DeltaProduct on Triton: per token ``S ← e^{g_t} S``, then for ``j = 1..n_h``
    ``S ← (I − β_{t,j} k_{t,j} k_{t,j}ᵀ) S + β_{t,j} k_{t,j} v_{t,j}ᵀ``; ``o_t = scale · Sᵀ q_t``.

    Differentiable to any order: gradients come from fused kernels, the backward is itself
    differentiable (Hessian-vector products by double backward) and ``torch.func.jvp`` works.

    Args:
        q: queries ``[B, T, H, K]`` (bf16 or float32; float64 runs the composed path).
        k: keys ``[B, T, n_h, H, K]``, unit norm expected, same dtype as ``q``.
        v: values ``[B, T, n_h, H, V]``, same dtype as ``q``.
        beta: step sizes ``[B, T, n_h, H]``, ``β ∈ [0, 2]`` expected (not checked).
        g: optional log forget gate ``[B, T, H]`` (``≤ 0`` expected), applied before the first
            micro-step of each token.
        initial_state: optional ``[B, H, K, V]`` (``[N, H, K, V]`` with ``cu_seqlens``).
        output_final_state: also return the final state.
        scale: output factor.
        cu_seqlens: optional offsets ``[N + 1]`` (int) of ``N`` sequences packed along ``T`` with
            ``B = 1``: sequence ``n`` is tokens ``cu_seqlens[n] ≤ t < cu_seqlens[n+1]``, each with
            its own initial and final state (run as a padded ``[N, max length]`` batch,
            :mod:`kernels.delta_product.varlen`).

    Returns:
        ``(o [B, T, H, V]`` in the dtype of ``q``, ``final_state [B, H, K, V]`` (``[N, H, K, V]`` with
        ``cu_seqlens``) float32 (float64 for float64 inputs) or None``)``.

    Fallbacks (documented, not silent errors): head dims ``K`` or ``V`` in (128, 256], ``n_h > 16``
    and float64 run the composed path (PyTorch inside chunks, the Triton scan across them);
    non-contiguous inputs are made contiguous.

    Raises:
        ValueError: naming the argument for a shape that disagrees with ``q``/``k``, an unsupported
            dtype, a head dim above 256, mismatched devices, or a CPU tensor without
            ``TRITON_INTERPRET=1``.

    Example:
        >>> o, s = chunk_delta_product(q, k, v, beta, g, output_final_state=True)  # doctest: +SKIP
    """
    if cu_seqlens is not None:
        return varlen_delta_product(chunk_delta_product, q, k, v, beta, g, initial_state, output_final_state,
                                    scale, cu_seqlens)
    d = validate(q, k, v, beta, g, initial_state)
    ct = chunk_tokens(d.n_h)
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    G = chunk_local_cumsum(g, ct).contiguous() if g is not None else None
    h0 = initial_state.to(wide).contiguous() if initial_state is not None else None
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    beta = beta.to(wide).contiguous()
    if _fused_ok(q, d.K, d.V, d.n_h):
        o, ht = _apply(ChunkDeltaProductFunction, q, k, v, beta, G, h0, float(scale))[:2]
    else:
        o, ht = composed_delta_product(q, k, v, beta, G, h0, float(scale), ct)
        o = o.to(q.dtype)
    return o, (ht if output_final_state else None)
