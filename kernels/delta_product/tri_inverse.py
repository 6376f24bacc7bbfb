"""``T = (I + tril(A, −1))⁻¹`` for batches of matrices up to 64×64, differentiable to any order.

    vjp:  Ā = −tril(Tᵀ T̄ Tᵀ, −1)          jvp:  Ṫ = −T tril(Ȧ, −1) T

Both are matmuls with the output ``T``, so the second derivative goes through this Function
again. The forward is the 16×16-tile Triton inverse of the fused kernels for float32 (on a GPU
or under ``TRITON_INTERPRET=1``) and ``torch.linalg.solve_triangular`` otherwise (float64, larger
matrices). The composed path uses it in place of a triangular solve when
``TUNING.composed_inverse == "kernel"``: its derivatives are then batched matmuls, not solves.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.delta_product.common import unit_lower_inverse_tiles
from kernels.delta_product.utils import interpreting

_SIDE = 64


@triton.jit
def tri_inverse_kernel(A, PREC: tl.constexpr):
    """One program per 64×64 matrix, inverted in place."""
    i = tl.program_id(0).to(tl.int64)
    unit_lower_inverse_tiles(A + i * 64 * 64, 0, 64, 64, 64, PREC)


def _forward(A: Tensor) -> Tensor:
    L = A.shape[-1]
    if A.dtype != torch.float32 or L > _SIDE or not (A.is_cuda or interpreting()):
        eye = torch.eye(L, dtype=A.dtype, device=A.device)
        return torch.linalg.solve_triangular(eye + A.tril(-1), eye.expand_as(A), upper=False, unitriangular=True)
    buf = torch.zeros(*A.shape[:-2], _SIDE, _SIDE, dtype=A.dtype, device=A.device)
    buf[..., :L, :L] = A.tril(-1)  # the kernel writes the lower tiles only: the upper ones stay 0
    if buf.numel():
        tri_inverse_kernel[(buf.numel() // _SIDE ** 2,)](buf, PREC="ieee", num_warps=4)
    return buf[..., :L, :L]


def _sandwich(T: Tensor, X: Tensor) -> Tensor:
    """``−T X T``."""
    return -(T @ X @ T)


class UnitLowerInverse(torch.autograd.Function):
    """``A [..., L, L] → (I + tril(A, −1))⁻¹``, float32 or float64."""

    @staticmethod
    def forward(A: Tensor) -> Tensor:
        return _forward(A)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, gT: Tensor) -> Tensor:
        T, = ctx.saved_tensors
        Tt = T.transpose(-1, -2)
        return _sandwich(Tt, gT).tril(-1)

    @staticmethod
    def jvp(ctx, dA: Tensor) -> Tensor:
        T, = ctx.saved_tensors
        return _sandwich(T, dA.tril(-1))


def unit_lower_inverse(A: Tensor) -> Tensor:
    """``(I + tril(A, −1))⁻¹`` over the last two dims (see the module docstring)."""
    return UnitLowerInverse.apply(A)
