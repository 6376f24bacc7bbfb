"""``examples/kernels_second_order.py``: its kernel value, gradient, HVP and jvp agree with the
float64 token-by-token recurrence on fresh random inputs (float32, with and without a gate, initial
state, T not a multiple of the chunk)."""
import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

PATH = Path(__file__).resolve().parents[1] / "examples" / "kernels_second_order.py"


@pytest.mark.parametrize("gate", [True, False])
def test_example_derivatives_match_the_float64_recurrence(gate):
    """The second order by the tangent kernels, with the gate terms or without."""
    spec = importlib.util.spec_from_file_location("kernels_second_order", PATH)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    errors = example.run(B=1, T=25, H=2, D=16, n_h=3, dtype="float32", seed=seed, gate=gate)
    assert set(errors) == {"o", "grad", "hvp", "jvp"}
    assert max(errors.values()) < 2e-5, (seed, errors)
