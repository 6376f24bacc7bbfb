"""Value, gradient, Hessian-vector product and forward mode through the DeltaProduct kernels.

For ``L(x) = ⟨do, o(x)⟩ + ⟨ds, S_T(x)⟩`` with ``(o, S_T) = chunk_delta_product(x)`` and
``x = (q, k, v, β, g, S_0)``, this computes

    ∇L(x)                       (the fused backward kernels),
    ∇²L(x) u = ∇_x ⟨∇L(x), u⟩   (double backward),
    J_o(x) u                    (``torch.func.jvp``),

and compares each with the same quantity of the token-by-token recurrence
(``lrnn.ops.recurrent.delta_product_recurrent``) in float64, printing relative errors and times.
The second order runs the tangent kernels
(``kernels.delta_product.tangent_fwd`` / ``tangent_bwd``), with the gate (the default) or ``--no-gate``;
with the gate and ``DELTA_PRODUCT_TUNING=tangent_gate=0`` it differentiates the composed chunked form. On a machine without a GPU the kernels
run under ``TRITON_INTERPRET=1`` (keep the sizes small).

    python examples/kernels_second_order.py                        # GPU if present, else the CPU interpreter
    python examples/kernels_second_order.py --T 2048 --D 128 --n-h 2 --dtype bfloat16 --no-gate
"""
from __future__ import annotations

import argparse
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from kernels.delta_product import chunk_delta_product  # noqa: E402
from lrnn.ops.recurrent import delta_product_recurrent  # noqa: E402

NAMES = ("q", "k", "v", "beta", "g", "initial_state")


def make_inputs(B: int, T: int, H: int, D: int, n_h: int, dtype: torch.dtype, device: str,
                gen: torch.Generator, gate: bool = True) -> dict[str, torch.Tensor]:
    """Unit keys, ``β ~ U[0, 2]``, log forget gates ``log σ(x + 2)`` (``gate``), a random initial
    state (float32)."""
    def rn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device)

    x = dict(q=rn(B, T, H, D), k=torch.nn.functional.normalize(rn(B, T, n_h, H, D), dim=-1),
             v=rn(B, T, n_h, H, D), beta=2 * torch.rand(B, T, n_h, H, generator=gen, device=device),
             g=torch.nn.functional.logsigmoid(rn(B, T, H) + 2), initial_state=rn(B, H, D, D))
    if not gate:
        del x["g"]
    return {n: t.to(dtype if n in ("q", "k", "v") else torch.float32) for n, t in x.items()}


def derivatives(fn, x: dict[str, torch.Tensor], do: torch.Tensor, ds: torch.Tensor,
                u: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    """Output, gradient, HVP and jvp of ``fn(**x) = (o, S_T)`` for the loss ``⟨do, o⟩ + ⟨ds, S_T⟩``."""
    names = [n for n in NAMES if n in x]
    xs = [x[n].detach().requires_grad_(True) for n in names]
    o, s = fn(**dict(zip(names, xs)))
    loss = (o.to(do.dtype) * do).sum() + (s.to(ds.dtype) * ds).sum()
    grads = torch.autograd.grad(loss, xs, create_graph=True)
    hvp = torch.autograd.grad(sum((g.to(u[n].dtype) * u[n]).sum() for n, g in zip(names, grads)), xs)
    primals = tuple(x[n] for n in names)
    tangents = tuple(u[n].to(x[n].dtype) for n in names)
    _, jvp = torch.func.jvp(lambda *a: fn(**dict(zip(names, a)))[0], primals, tangents)
    return {"o": [o], "grad": list(grads), "hvp": list(hvp), "jvp": [jvp]}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def run(B: int = 1, T: int = 40, H: int = 2, D: int = 16, n_h: int = 2, dtype: str = "float32",
        seed: int = 0, gate: bool = True) -> dict[str, float]:
    """Largest relative error against the float64 recurrence for each of o, gradient, HVP and jvp."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(seed)
    x = make_inputs(B, T, H, D, n_h, getattr(torch, dtype), device, gen, gate)
    do, ds = torch.randn(B, T, H, D, generator=gen, device=device), torch.randn(B, H, D, D, generator=gen, device=device)
    u = {n: torch.randn(t.shape, generator=gen, device=device) for n, t in x.items()}
    scale = D ** -0.5

    def kernel(**a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return chunk_delta_product(**a, output_final_state=True, scale=scale)

    def reference(**a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return delta_product_recurrent(**a, output_final_state=True, scale=scale)

    start = time.perf_counter()
    ours = derivatives(kernel, x, do, ds, u)
    seconds = time.perf_counter() - start
    x64 = {n: t.double() for n, t in x.items()}
    exact = derivatives(reference, x64, do.double(), ds.double(), {n: t.double() for n, t in u.items()})
    errors = {key: max(rel(a, b) for a, b in zip(ours[key], exact[key])) for key in ours}
    print(f"chunk_delta_product on {device} ({'interpreter' if device == 'cpu' else 'GPU'}), {dtype}, "
          f"(B, T, H, D) = {(B, T, H, D)}, n_h = {n_h}, {'gate' if gate else 'no gate'}, initial state: "
          f"{seconds:.2f} s")
    for key, err in errors.items():
        print(f"  {key:>5}: max relative error against the float64 recurrence {err:.1e}")
    return errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--T", type=int, default=40)
    p.add_argument("--H", type=int, default=2)
    p.add_argument("--D", type=int, default=16)
    p.add_argument("--n-h", type=int, default=2)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-gate", action="store_true", help="no forget gate")
    a = p.parse_args()
    run(a.B, a.T, a.H, a.D, a.n_h, a.dtype, a.seed, not a.no_gate)


if __name__ == "__main__":
    main()
