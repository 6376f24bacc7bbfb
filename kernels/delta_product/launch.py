"""Kernel launches: the deepest software pipeline that fits, and a direct path to compiled kernels.

``kernel[grid](*args)`` binds and specializes every argument on every call, in Python, for the 20–40
arguments of a DeltaProduct kernel. At small sizes eager calls are host-bound
(a bf16 fwd+bwd at (2, 8192, 8, 64) runs 0.9 ms of kernels), so :func:`launch` keeps the compiled kernel
that a launch returns and calls it directly (``compiled[grid](*values)``) while the launch is specialized
alike: equal constexprs and launch options, and runtime arguments that agree in what Triton specializes on
(:func:`specialization`). ``Tuning.direct_launch = False`` sends every launch through ``kernel[grid]``.
"""
from __future__ import annotations

import triton
from torch import Tensor

from kernels.delta_product.utils import TUNING

#: pipeline depth that fitted, per kernel and keyword arguments
_STAGES: dict[tuple, int] = {}
#: compiled kernel and parameter names after the positional ones, per launch key and runtime specialization
_COMPILED: dict[tuple, tuple] = {}


def deepest_stages(max_stages: int | None = None) -> int:
    """The first pipeline depth a launch tries: ``TUNING.stages``, or ``max_stages`` when smaller."""
    return min(TUNING.stages, max_stages or TUNING.stages)


def specialization(args: tuple) -> tuple | None:
    """What Triton specializes a launch on in the runtime arguments ``args``, or finer: a tensor's dtype and
    16-byte alignment; an integer's type (32-bit, 64-bit or unsigned 64-bit), equality to 1 and divisibility
    by 16; a bool's or None's value; a float's type. None when an argument is of another kind."""
    spec = []
    for a in args:
        if isinstance(a, Tensor):
            spec.append(_tensor_key(a))
        elif a is None or isinstance(a, bool):
            spec.append(a)
        elif isinstance(a, int):
            spec.append((-2 ** 31 <= a < 2 ** 31, a >= 2 ** 63, a == 1, a % 16 == 0))
        elif isinstance(a, float):
            spec.append(float)
        else:
            return None
    return tuple(spec)


def _tensor_key(t: Tensor) -> tuple:
    """What Triton specializes a tensor argument on: its dtype and 16-byte alignment."""
    return t.dtype, t.data_ptr() % 16 == 0


def _keyword_key(v):
    """A keyword argument in a launch key: a tensor by :func:`_tensor_key` (``str`` of a CUDA tensor would copy
    it to the host), anything else by value."""
    return _tensor_key(v) if isinstance(v, Tensor) else v


def kernel_options(kernel, kwargs: dict) -> dict:
    """``kwargs`` with the matmul precision ``PREC`` that ``Tuning.trunc_split`` gives ``kernel``
    (:meth:`~kernels.delta_product.utils.Tuning.kernel_prec`, by the kernel's name without ``_kernel``)."""
    prec = kwargs.get("PREC")
    if prec is None:
        return kwargs
    kept = TUNING.kernel_prec(getattr(getattr(kernel, "fn", kernel), "__name__", "").removesuffix("_kernel"), prec)
    return kwargs if kept == prec else dict(kwargs, PREC=kept)  # a copy only where the precision changes


def launch(kernel, grid: tuple[int, ...], *args, max_stages: int | None = None, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` with the deepest software pipeline (:func:`deepest_stages` down to 1)
    that fits in shared memory; the depth that worked is remembered per kernel and keyword arguments, and
    the compiled kernel per specialization (``Tuning.direct_launch``). ``PREC`` as :func:`kernel_options` sets it."""
    kwargs = kernel_options(kernel, kwargs)
    deepest = deepest_stages(max_stages)
    key = (id(kernel), deepest, tuple(kwargs), tuple(_keyword_key(v) for v in kwargs.values()))
    direct = TUNING.direct_launch and not getattr(kernel, "pre_run_hooks", None)
    spec = specialization(args) if direct else None
    if spec is not None:
        hit = _COMPILED.get((key, spec))
        if hit is not None:
            compiled, names = hit
            compiled[tuple(grid) + (1,) * (3 - len(grid))](*args, *(kwargs[n] for n in names))  # it reads three
            return
    stages = _STAGES.get(key, deepest)
    while True:
        try:
            compiled = kernel[grid](*args, num_stages=stages, **kwargs)
        except triton.runtime.errors.OutOfResources:
            if stages == 1:
                raise
            stages -= 1
            continue
        _STAGES[key] = stages
        break
    names = getattr(kernel, "arg_names", ())[len(args):]
    # a compiled kernel (not the interpreter's None) that takes every parameter from these arguments
    if spec is not None and hasattr(compiled, "packed_metadata") and all(n in kwargs for n in names):
        _COMPILED[(key, spec)] = (compiled, tuple(names))
