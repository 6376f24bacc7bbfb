"""``kernels.delta_product.launch``: the pipeline depth that fits, and direct launches of compiled kernels.

The direct path must never launch a compiled kernel that Triton would not have chosen: the specialization it
keys on refines Triton's own (checked against Triton's ``native_specialize_impl`` on random arguments), and
a fake kernel checks which launches go through ``kernel[grid]`` and which through the compiled kernel.
"""
from __future__ import annotations

import itertools
import random
import types

import pytest
import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend

import kernels.delta_product.launch as launch_module
from kernels.delta_product.launch import launch, specialization
from kernels.delta_product.utils import TUNING


@pytest.fixture(autouse=True)
def fresh_caches(monkeypatch):
    """Empty launch caches (they are keyed by ``id(kernel)``: no entry of an earlier fake) and the default
    pipeline depth and direct launches."""
    monkeypatch.setattr(launch_module, "_STAGES", {})
    monkeypatch.setattr(launch_module, "_COMPILED", {})
    monkeypatch.setattr(TUNING, "stages", 3)
    monkeypatch.setattr(TUNING, "direct_launch", True)


class _Compiled:
    """Stands in for a compiled kernel: records the grid and arguments of each launch."""

    packed_metadata = None

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        assert len(grid) == 3  # as Triton's, which reads grid[0], grid[1] and grid[2]
        return lambda *args: self.calls.append((grid, args))


class _FakeKernel:
    """Stands in for a Triton kernel with parameters ``arg_names``: records each launch through ``kernel[grid]``
    (its ``num_stages`` and arguments), runs out of shared memory above ``fits`` stages and returns a
    :class:`_Compiled` (None with ``compiles=False``, as the interpreter does)."""

    def __init__(self, fits: int = 9, arg_names: tuple[str, ...] = ("x", "n", "BLOCK"), compiles: bool = True):
        self.fits, self.arg_names, self.tried, self.compiled = fits, arg_names, [], []
        self.compiles = compiles

    def __getitem__(self, grid):
        def run(*args, num_stages, **kwargs):
            self.tried.append((num_stages, args))
            self.kwargs = kwargs
            if num_stages > self.fits:
                raise triton.runtime.errors.OutOfResources(num_stages, self.fits, "shared memory")
            self.compiled.append(_Compiled() if self.compiles else None)
            return self.compiled[-1]
        return run


@pytest.mark.parametrize("max_stages, fits, tried", [(None, 9, [3]), (2, 9, [2]), (None, 1, [3, 2, 1]),
                                                     (2, 1, [2, 1]), (5, 9, [3])])
def test_launch_caps_and_steps_down_the_pipeline(monkeypatch, max_stages, fits, tried):
    monkeypatch.setattr(TUNING, "direct_launch", False)
    kernel = _FakeKernel(fits)
    launch(kernel, (1,), max_stages=max_stages, BLOCK=fits)
    launch(kernel, (1,), max_stages=max_stages, BLOCK=fits)  # the depth that worked is remembered
    assert [s for s, _ in kernel.tried] == tried + tried[-1:]
    with pytest.raises(triton.runtime.errors.OutOfResources):
        launch(_FakeKernel(0), (1,), max_stages=max_stages)


def _triton_specialization(a):
    """Triton's own specialization of a runtime argument, at its finest (specialized, aligned)."""
    return native_specialize_impl(BaseBackend, a, False, True, True)


def test_specialization_refines_tritons():
    """Two arguments of equal :func:`specialization` get equal specializations from Triton, for integers
    around every boundary Triton draws (1, multiples of 16, the 32- and 64-bit ranges), tensors of three
    dtypes at every offset of a 16-byte line, bools, None and floats."""
    rng = random.Random(0)
    ints = [0, 1, 2, 15, 16, 17, 32, -1, -16, -17, 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 16, -2 ** 31, -2 ** 31 - 1,
            -2 ** 31 - 16, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 16, -2 ** 63, *(rng.randrange(-2 ** 63, 2 ** 64) for _ in range(200))]
    base = {dt: torch.zeros(64, dtype=dt) for dt in (torch.float32, torch.bfloat16, torch.float64)}
    tensors = [t[i:] for t in base.values() for i in range(16 // t.element_size() + 1)]
    values = ints + tensors + [True, False, None, 0.0, 1.0, -2.5]
    pairs = 0
    for a, b in itertools.combinations(values, 2):
        if specialization((a,)) == specialization((b,)):
            pairs += 1
            assert _triton_specialization(a) == _triton_specialization(b), (a, b)
    assert pairs > 1000  # the check compared many pairs, across classes
    assert specialization(("a string",)) is None  # an unknown kind: no direct launch


def test_direct_launch_reuses_the_compiled_kernel_while_specialized_alike():
    kernel = _FakeKernel()
    x = torch.zeros(64)
    launch(kernel, (2,), x, 32, BLOCK=16)  # compiles: through kernel[grid]
    compiled = kernel.compiled[-1]
    y = torch.ones(64)
    launch(kernel, (3, 1), y, 48, BLOCK=16)  # same specialization: the compiled kernel, parameters in order
    assert len(kernel.tried) == 1 and compiled.calls == [((3, 1, 1), (y, 48, 16))]
    launch(kernel, (2,), x, 33, BLOCK=16)  # n no longer a multiple of 16
    launch(kernel, (2,), x[1:], 32, BLOCK=16)  # x misaligned
    launch(kernel, (2,), x.double(), 32, BLOCK=16)  # another dtype
    launch(kernel, (2,), x, 32, BLOCK=32)  # another constexpr
    launch(kernel, (2,), x, 32, BLOCK=16, num_warps=8)  # another launch option
    launch(kernel, (2,), x, n=32, BLOCK=16)  # n by keyword: its value enters the key
    assert len(kernel.tried) == 7 and len(compiled.calls) == 1
    launch(kernel, (2,), y, 1, BLOCK=16)  # n = 1: compiles
    launch(kernel, (2,), y, 1, BLOCK=16)
    assert len(kernel.tried) == 8 and len(kernel.compiled[-1].calls) == 1
    z = y[4:]  # 16 bytes in: aligned
    launch(kernel, (5,), z, 64, BLOCK=16, num_warps=4)  # compiles (a new launch option)
    launch(kernel, (5,), z, 80, BLOCK=16, num_warps=4)
    assert len(kernel.tried) == 9 and kernel.compiled[-1].calls == [((5, 1, 1), (z, 80, 16))]


def test_no_direct_launch_when_off_interpreted_or_a_parameter_is_left_to_its_default(monkeypatch):
    for kernel in (_FakeKernel(compiles=False), _FakeKernel(arg_names=("x", "n", "BLOCK", "EXTRA"))):
        for _ in range(3):
            launch(kernel, (1,), torch.zeros(4), 16, BLOCK=16)
        assert len(kernel.tried) == 3
    monkeypatch.setattr(TUNING, "direct_launch", False)
    kernel = _FakeKernel()
    for _ in range(3):
        launch(kernel, (1,), torch.zeros(4), 16, BLOCK=16)
    assert len(kernel.tried) == 3 and not any(c.calls for c in kernel.compiled)


def test_a_pipeline_depth_that_did_not_fit_is_not_cached_as_compiled():
    kernel = _FakeKernel(fits=1)
    launch(kernel, (1,), torch.zeros(4), 16, BLOCK=16)
    launch(kernel, (1,), torch.zeros(4), 16, BLOCK=16)
    assert [s for s, _ in kernel.tried] == [3, 2, 1] and len(kernel.compiled[-1].calls) == 1


@pytest.mark.parametrize("name, split, prec, passed", [
    ("out_kernel", "out", "tf32x3", "tf32x3t"), ("out_kernel", "dqkw+out", "tf32x3", "tf32x3t"),
    ("dqkw_kernel", "out", "tf32x3", "tf32x3"), ("out_kernel", "", "tf32x3", "tf32x3"),
    ("out_kernel", "out", "ieee", "ieee"), ("out_kernel", "out", "tf32", "tf32")])
def test_launch_passes_the_precision_trunc_split_gives_the_kernel(monkeypatch, name, split, prec, passed):
    """``Tuning.trunc_split`` names kernels by their function's name without ``_kernel``; only ``tf32x3`` (float32
    inputs on a GPU) turns into ``tf32x3t``, and a launch without ``PREC`` is left alone."""
    monkeypatch.setattr(TUNING, "trunc_split", split)
    kernel = _FakeKernel(arg_names=("x", "PREC"))
    kernel.fn = types.SimpleNamespace(__name__=name)
    launch(kernel, (1,), torch.zeros(4), PREC=prec)
    assert kernel.kwargs == {"PREC": passed}
    launch(kernel, (1,), torch.zeros(4), BLOCK=16)
    assert kernel.kwargs == {"BLOCK": 16}
