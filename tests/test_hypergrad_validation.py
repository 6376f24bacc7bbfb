"""Input validation: NaN/inf, shape, dtype, device and structure mismatches name the offending piece."""

import pytest
import torch
from hypergrad_problems import DTYPE, gen, randn  # noqa: F401

import hypergrad as hg


def phi(w, lam):
    return {"a": 0.5 * w["a"] + lam["x"].sum(), "b": 0.5 * w["b"]}


def outer(w, lam):
    return (w["a"] ** 2).sum() + (w["b"] ** 2).sum() + (lam["x"] ** 2).sum()


METHODS = {
    "itd": lambda f, E, w0, lam: hg.itd(f, E, w0, lam, steps=3),
    "truncated_itd": lambda f, E, w0, lam: hg.truncated_itd(f, E, w0, lam, steps=3, truncate=1),
    "checkpointed_itd": lambda f, E, w0, lam: hg.checkpointed_itd(f, E, w0, lam, steps=3),
    "forward_itd": lambda f, E, w0, lam: hg.forward_itd(f, E, w0, lam, steps=3),
    "aid": lambda f, E, w0, lam: hg.aid(f, E, w0, lam),
    "fixed_point": lambda f, E, w0, lam: E(hg.fixed_point(f, w0, lam), lam),
}


def inputs(gen, dtype=DTYPE):
    w0 = {"a": randn(gen, 3).to(dtype), "b": randn(gen, 2, 2).to(dtype)}
    lam = {"x": randn(gen, 4).to(dtype)}
    return w0, lam


@pytest.mark.parametrize("method", list(METHODS))
def test_valid_inputs_pass(gen, method):
    w0, lam = inputs(gen)
    METHODS[method](phi, outer, w0, lam)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("method", list(METHODS))
def test_nonfinite_inputs_are_named(gen, method, bad):
    w0, lam = inputs(gen)
    lam["x"][2] = bad
    with pytest.raises(hg.NonFiniteInputError, match=r"\['x'\]"):
        METHODS[method](phi, outer, w0, lam)
    w0, lam = inputs(gen)
    w0["b"][1, 0] = bad
    with pytest.raises(hg.NonFiniteInputError, match=r"w0\['b'\]"):
        METHODS[method](phi, outer, w0, lam)


def test_finite_inputs_whose_sum_overflows_pass():
    big = torch.full((4,), torch.finfo(torch.float32).max, dtype=torch.float32)
    assert not torch.isfinite(big.sum())
    hg.validation.check_inputs(w0=big, lam=torch.ones(2, dtype=torch.float32))
    big[1] = float("nan")
    with pytest.raises(hg.NonFiniteInputError, match="w0 contains 1 NaN"):
        hg.validation.check_inputs(w0=big, lam=torch.ones(2, dtype=torch.float32))


@pytest.mark.parametrize("method", list(METHODS))
def test_map_output_shape_mismatch_is_named(gen, method):
    w0, lam = inputs(gen)

    def bad_phi(w, lam):
        return {"a": torch.cat([w["a"], w["a"]]), "b": w["b"]}

    with pytest.raises(hg.ShapeMismatchError, match=r"fixed_point_map.*\['a'\].*shape \(6,\)"):
        METHODS[method](bad_phi, outer, w0, lam)


@pytest.mark.parametrize("method", list(METHODS))
def test_map_output_structure_mismatch(gen, method):
    w0, lam = inputs(gen)
    with pytest.raises(hg.StructureMismatchError, match="fixed_point_map"):
        METHODS[method](lambda w, lam: (w["a"], w["b"]), outer, w0, lam)


@pytest.mark.parametrize("method", list(METHODS))
def test_dtype_mismatch_between_w_and_lam(gen, method):
    w0, _ = inputs(gen, torch.float32)
    _, lam = inputs(gen, torch.float64)
    with pytest.raises(hg.DtypeMismatchError, match=r"float64.*float32|float32.*float64"):
        METHODS[method](phi, outer, w0, lam)


@pytest.mark.parametrize("method", list(METHODS))
def test_map_output_dtype_mismatch(gen, method):
    w0, lam = inputs(gen, torch.float32)

    def promoting_phi(w, lam):
        return {"a": 0.5 * w["a"].double(), "b": 0.5 * w["b"]}

    with pytest.raises(hg.DtypeMismatchError, match=r"fixed_point_map.*\['a'\].*float64"):
        METHODS[method](promoting_phi, outer, w0, lam)


@pytest.mark.parametrize("method", list(METHODS))
def test_device_mismatch(gen, method):
    w0, lam = inputs(gen)
    lam = {"x": lam["x"].to("meta")}
    with pytest.raises(hg.DeviceMismatchError, match=r"\['x'\].*meta"):
        METHODS[method](phi, outer, w0, lam)


@pytest.mark.parametrize("method", ["itd", "checkpointed_itd", "forward_itd", "aid"])
def test_outer_loss_must_be_a_scalar(gen, method):
    w0, lam = inputs(gen)
    with pytest.raises(hg.ShapeMismatchError, match="outer_loss"):
        METHODS[method](phi, lambda w, lam: w["a"], w0, lam)


@pytest.mark.parametrize("method", ["itd", "aid", "forward_itd"])
def test_hyperparameters_must_be_floating(gen, method):
    w0, _ = inputs(gen)
    with pytest.raises(hg.InputError, match=r"lam\['x'\].*floating"):
        METHODS[method](phi, outer, w0, {"x": torch.arange(4)})


def test_fixed_point_rejects_non_tensor_leaves(gen):
    w0, lam = inputs(gen)
    with pytest.raises(hg.StructureMismatchError, match="params"):
        hg.fixed_point(phi, w0, {"x": 1.0})
