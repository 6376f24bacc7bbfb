"""Variable-length batches: ``N`` sequences packed along ``T`` (``B = 1``), delimited by ``cu_seqlens``.

Sequence ``n`` is tokens ``cu_seqlens[n] ≤ t < cu_seqlens[n+1]``. It is run as row ``n`` of a padded
``[N, T_max]`` batch whose padding tokens have ``β = 0``, ``g = 0`` and zero ``q, k, v``. Every factor
of a padding token is then the identity and writes nothing:

    S ← e^{0} S,   S ← (I − 0 · k kᵀ) S + 0 · k vᵀ = S,

so row ``n``'s final state is sequence ``n``'s, and its outputs at real tokens are exact. The packing
and unpacking are gathers, differentiable to any order (gradients, double backward, ``jvp``).
Cost: the kernels process ``N · T_max`` tokens instead of ``T``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def check_cu_seqlens(cu_seqlens: Tensor, q: Tensor, initial_state: Tensor | None) -> list[int]:
    """Sequence lengths from ``cu_seqlens``; ``ValueError`` naming the argument when they do not fit ``q``."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError("`cu_seqlens` must be a 1-D int32 or int64 tensor of sequence offsets [0, …, T]")
    if q.dim() != 4 or q.shape[0] != 1:
        raise ValueError(f"with `cu_seqlens`, `q` must have shape [1, T, H, K] (sequences packed along T), got {tuple(q.shape)}")
    offsets = cu_seqlens.tolist()
    T = q.shape[1]
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != T:
        raise ValueError(f"`cu_seqlens` must start at 0 and end at T = {T}, got {offsets}")
    lengths = [b - a for a, b in zip(offsets, offsets[1:])]
    if min(lengths) < 0:
        raise ValueError(f"`cu_seqlens` must be non-decreasing, got {offsets}")
    N, H, K = len(lengths), q.shape[2], q.shape[3]
    if initial_state is not None and (initial_state.dim() != 4 or initial_state.shape[:3] != (N, H, K)):
        raise ValueError(f"with `cu_seqlens`, `initial_state` must have shape [N, H, K, V] = [{N}, {H}, {K}, V], "
                         f"got {tuple(initial_state.shape)}")
    return lengths


def padding_index(lengths: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
    """``index [N, T_max]`` into the packed axis and ``mask [N, T_max]`` of the real tokens.

    Padding entries point at some valid token (the gathered values are masked out); at least
    one sequence must be non-empty.
    """
    t = torch.arange(max(lengths), device=device)
    starts = torch.tensor([0] + lengths[:-1], device=device).cumsum(0)
    mask = t < torch.tensor(lengths, device=device)[:, None]
    return (starts[:, None] + t).clamp(max=sum(lengths) - 1), mask


def varlen_delta_product(
    run: Callable[..., tuple[Tensor, Tensor | None]],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None,
    initial_state: Tensor | None,
    output_final_state: bool,
    scale: float,
    cu_seqlens: Tensor,
) -> tuple[Tensor, Tensor | None]:
    """``run`` (a ``[B, T]`` DeltaProduct) on the packed sequences of ``cu_seqlens``.

    Returns ``o [1, T, H, V]`` and, if asked, the final states ``[N, H, K, V]``.
    """
    lengths = check_cu_seqlens(cu_seqlens, q, initial_state)
    if q.shape[1] == 0:
        raise ValueError("empty input: every sequence of `cu_seqlens` has length 0")
    index, mask = padding_index(lengths, q.device)

    def pad(x: Tensor) -> Tensor:  # [1, T, ...] -> [N, T_max, ...], zeros at padding tokens
        m = mask.view(*mask.shape, *([1] * (x.dim() - 2)))
        return torch.where(m, x[0, index], torch.zeros((), dtype=x.dtype, device=x.device))

    o, final = run(pad(q), pad(k), pad(v), pad(beta), pad(g) if g is not None else None, initial_state,
                   output_final_state, scale)
    return o[mask].unsqueeze(0), final
