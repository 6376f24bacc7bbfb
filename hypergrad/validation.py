"""Input validation: every error names the offending piece (argument and pytree path).

Checks, in this order: every leaf is a tensor; all leaves share one device; all
floating-point leaves share one dtype; floating-point leaves are finite; the map's
output has the structure, shapes, dtypes and devices of ``w``; the outer loss is a
real scalar.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree

from hypergrad.results import (
    DeviceMismatchError,
    DtypeMismatchError,
    InputError,
    NonFiniteInputError,
    ShapeMismatchError,
    StructureMismatchError,
)


def _named_leaves(tree: Any, name: str) -> list[tuple[str, Any]]:
    leaves, _ = _pytree.tree_flatten_with_path(tree)
    return [(name + _pytree.keystr(path), leaf) for path, leaf in leaves]


def _is_float(x: Tensor) -> bool:
    return x.is_floating_point() or x.is_complex()


def check_inputs(**trees: Any) -> None:
    """Validate named pytrees of tensors that enter one computation together.

    Args:
        **trees: e.g. ``w0=w0, lam=lam``; the keyword names the piece in error messages.

    Raises:
        StructureMismatchError: a leaf is not a tensor, or a pytree is empty.
        DeviceMismatchError: two leaves live on different devices.
        DtypeMismatchError: two floating-point leaves have different dtypes.
        NonFiniteInputError: a floating-point leaf contains NaN or inf.
    """
    named = []
    for name, tree in trees.items():
        leaves = _named_leaves(tree, name)
        if not leaves:
            raise StructureMismatchError(f"{name} has no tensor leaves")
        named.extend(leaves)
    for leaf_name, leaf in named:
        if not isinstance(leaf, Tensor):
            raise StructureMismatchError(f"{leaf_name} must be a tensor, got {type(leaf).__name__}")
    first_name, first = named[0]
    for leaf_name, leaf in named[1:]:
        if leaf.device != first.device:
            raise DeviceMismatchError(
                f"{leaf_name} is on {leaf.device} but {first_name} is on {first.device}: move all inputs to one device"
            )
    floats = [(n, leaf) for n, leaf in named if _is_float(leaf)]
    for leaf_name, leaf in floats[1:]:
        if leaf.dtype != floats[0][1].dtype:
            raise DtypeMismatchError(
                f"{leaf_name} has dtype {leaf.dtype} but {floats[0][0]} has {floats[0][1].dtype}: "
                "cast all floating-point inputs to one dtype"
            )
    for leaf_name, leaf in floats:
        # A finite sum implies finite entries (NaN and inf propagate); one reduction instead of a mask.
        if bool(torch.isfinite(leaf.sum())):
            continue
        count = int((~torch.isfinite(leaf)).sum())
        if count:
            raise NonFiniteInputError(f"{leaf_name} contains {count} NaN or inf entries")


def check_floating(tree: Any, name: str) -> None:
    """Raise :class:`InputError` unless every leaf of ``tree`` is a floating-point tensor."""
    for leaf_name, leaf in _named_leaves(tree, name):
        if not (isinstance(leaf, Tensor) and _is_float(leaf)):
            kind = leaf.dtype if isinstance(leaf, Tensor) else type(leaf).__name__
            raise InputError(f"{leaf_name} must be a floating-point tensor to be differentiated, got {kind}")


def check_map_output(output: Any, reference: Any, name: str, reference_name: str) -> None:
    """Check that ``output`` has the structure, shapes, dtypes and devices of ``reference``.

    Args:
        output: what the map returned.
        reference: the inner variable it was called with.
        name: how to call the output in messages (e.g. ``"fixed_point_map(w, lam)"``).
        reference_name: how to call the reference (e.g. ``"w"``).
    """
    out_leaves, out_spec = _pytree.tree_flatten(output)
    ref_leaves, ref_spec = _pytree.tree_flatten(reference)
    if out_spec != ref_spec:
        raise StructureMismatchError(
            f"{name} returned a pytree of structure {out_spec} but {reference_name} has structure {ref_spec}"
        )
    paths = [_pytree.keystr(p) for p, _ in _pytree.tree_flatten_with_path(reference)[0]]
    for path, out, ref in zip(paths, out_leaves, ref_leaves):
        if not isinstance(out, Tensor):
            raise StructureMismatchError(f"{name}{path} must be a tensor, got {type(out).__name__}")
        if out.shape != ref.shape:
            raise ShapeMismatchError(
                f"{name}{path} has shape {tuple(out.shape)} but {reference_name}{path} has shape {tuple(ref.shape)}"
            )
        if out.dtype != ref.dtype:
            raise DtypeMismatchError(
                f"{name}{path} has dtype {out.dtype} but {reference_name}{path} has dtype {ref.dtype}"
            )
        if out.device != ref.device:
            raise DeviceMismatchError(f"{name}{path} is on {out.device} but {reference_name}{path} is on {ref.device}")


def check_scalar(value: Any, name: str) -> None:
    """Raise :class:`ShapeMismatchError` unless ``value`` is a real 0-d tensor (a loss)."""
    if not isinstance(value, Tensor) or value.dim() != 0 or not value.is_floating_point():
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ShapeMismatchError(f"{name} must return a real scalar tensor, got {shape}")
