"""Input checks, chunk bookkeeping and dtype choices shared by the DeltaProduct kernels.

A chunk holds ``CT`` whole tokens, i.e. ``L = CT·n_h`` flattened micro-steps, padded to a
block of ``BT`` rows inside the kernels; ``CT = BT // n_h`` so that no token straddles
two chunks and every output row of a chunk is a real token.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton.language as tl
from torch import Tensor

#: micro-steps per chunk block of the fused kernels (rows of the triangular solve)
BLOCK_STEPS = 64
#: largest key / value head dim of the fused kernels; larger ones use the composed path
FUSED_MAX_DIM = 128
#: largest head dim accepted at all
MAX_DIM = 256
#: largest ``n_h`` of the fused kernels (at least 4 tokens per chunk)
FUSED_MAX_NH = 16
SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)


#: ``(num_warps, tile as a share of Tuning.tile)`` of each tangent kernel (``tangent_fwd``,
#: ``tangent_bwd``) for 16-bit inputs, the fastest of 4 / 8 warps and full / half tiles on an H100 (bf16,
#: (4, 4096, 16, 128), n_h = 2; ``benchmarks/results/kernels_tangent_launch.json``); the scans' tile is ``bv_dual``
#: ``wy`` at 4 warps and quarter tiles, chosen when it held ``T``, ``Ṫ`` in bf16 (formed ``K Kᵀ`` after ``dA``): 1.36
#: against 1.42 ms at 8 warps (``kernels_wy_schedule_new.json``; 4 warps for every dtype and gate now); quarter tiles
#: (32 columns, as float32's half tiles): 1.29 against 1.77 ms gated, 1.03 against 1.36 ungated at n_h = 2
#: (``kernels_wy_quarter.json`` against ``kernels_dqkw_gate2_old.json``, one machine). With ``T``, ``Ṫ`` back in
#: float32 (a Triton miscompile in bf16) 1.41 and 1.27 ms (``kernels_wy_tangent_f32_t.json``; not swept again).
#: ``wy_cols`` (the second kernel of ``Tuning.wy_split``) is not tuned on a GPU: at 4 warps and half tiles float32
#: spills 112–128 bytes a thread (8 warps and quarter tiles: 0–88, not timed)
TANGENT_LAUNCH = {"prep": (4, 0.5), "scan": (8, 1.0), "out": (4, 1.0), "dv": (4, 1.0), "dqkw": (4, 1.0),
                  "wy": (4, 0.25), "wy_cols": (4, 0.5)}
#: the same for float32 inputs (``kernels_tangent_launch_float32.json``): ``dqkw`` (8 warps and half tiles then;
#: below); ``wy`` at half tiles (32 columns); ``out`` (not in that run: the HVP skips it) at half tiles, where its
#: key loop spills 32 bytes a thread instead of 600 (``benchmarks/kernels_resources.py``, compiled for sm_90a);
#: the scans at 4 warps, split (``Tuning.scan_split``) on ``bv_scan`` columns (``Tuning.scan_cols``): gated at n_h = 2,
#: ``scan_h_tangent`` 3.18 against 5.37 ms and ``scan_dh_tangent`` 4.55 against 6.13 unsplit at 8 warps and 64
#: columns (``kernels_tangent_scan_split.json``); ``dv`` at half tiles: 0.45 against 0.60 ms (gated 0.49 against 1.00) in
#: the sweep of ``kernels_tangent_launch_float32_split.json`` (``_gate_float32_split.json``), where gated ``wy`` at quarter tiles
#: took 2.33 against 3.72 ms. ``dqkw`` at 4 warps and quarter tiles since ``Tuning.trunc_split`` (session 23 sweep,
#: ``kernels_tangent_launch_tf32x3t.json``): 2.58 / 2.41 / 3.43 against 3.18 / 3.75 / 5.60 ms at 8 warps and half
#: tiles (n_h = 1 / 2 / 3)
TANGENT_LAUNCH_F32 = {**TANGENT_LAUNCH, "scan": (4, 1.0), "dqkw": (4, 0.25), "out": (4, 0.5), "dv": (4, 0.5),
                      "wy": (4, 0.5)}
#: with a gate (its terms add accumulators), bf16: the fastest per kernel in the sweep with 16-bit backward
#: intermediates (``kernels_tangent_launch_gate_store.json``, H100, n_h = 2): ``dqkw`` 2.06 ms at 4 warps and quarter
#: tiles against 2.27 at 8, ``dv`` 0.21 at half tiles against 0.25 (``wy``: as without a gate; at half tiles 1.77 ms
#: against 1.84 at 8 warps, ``kernels_knobs_wy_tangent_gate_warps.json``). ``dqkw_full``:
#: ``dqkw`` with as many query rows a chunk as micro-steps (n_h = 1), where its ``[BQ, BT]`` accumulators double:
#: 8 warps, 1.28 ms against 1.96 at 4 on an H100 (``kernels_knobs_gate_store_hvp.json`` against
#: ``kernels_knobs_gate_launch_hvp.json``).
#: Float32, from the session 23 sweep on the ``trunc_split`` code (``kernels_tangent_launch_tf32x3t.json``): ``dqkw``
#: at 4 warps and quarter tiles, 5.56 / 8.12 against 6.39 / 10.02 ms at 8 warps (n_h = 2 / 3), but ``dqkw_full`` at
#: 8 warps (5.75 against 8.38 ms at n_h = 1); ``wy`` at half tiles as without a gate (1.06 / 1.99 / 3.05 against
#: 1.12 / 2.12 / 3.24 ms at quarter tiles)
#: ``dqkw_state`` and ``dqkw_query``: the two launches of ``dqkw_tangent`` under ``Tuning.gate_dqkw_split``. Gated float32
#: on an H100 (session 26, ``kernels_knobs_dqkw_split_*.json``): the state side at 4 warps (0 bytes of spills, against 0
#: at 8, where both sides at 8 warps took the HVP 0.3–5.4 % above one launch); the query side at 4 warps, 3.60 / 5.01 ms
#: for both launches against 3.96 / 5.80 with it at 8 (n_h = 2 / 3), but at 8 with a full chunk of queries (n_h = 1:
#: 3.45 ms, against 4.38 for one launch; at 4 warps it spills 2 KB a thread, not timed)
_DQKW_SIDES = {"dqkw_state": (4, 0.25), "dqkw_query": (4, 0.25), "dqkw_query_full": (8, 0.25)}
TANGENT_LAUNCH_GATE = {**TANGENT_LAUNCH, "dqkw": (4, 0.25), "dqkw_full": (8, 0.25), "dv": (4, 0.5), **_DQKW_SIDES}
TANGENT_LAUNCH_GATE_F32 = {**TANGENT_LAUNCH_F32, "dqkw_full": (8, 0.25), **_DQKW_SIDES}


#: the fused kernels, by their names without ``_kernel``
KERNELS = ("prep", "scan_h", "out", "dv_local", "scan_dh", "dqkw", "wy_bwd", "prep_tangent", "scan_h_tangent",
           "out_tangent", "dv_local_tangent", "scan_dh_tangent", "dqkw_tangent", "wy_bwd_tangent", "wy_cols_tangent")


@dataclass
class Tuning:
    """Launch choices of the fused kernels. The defaults are the configuration measured on an H100;
    the others are variants for the GPU comparison script (``benchmarks/kernels_variants.py``).

    Set at import from ``DELTA_PRODUCT_TUNING="inverse=tiles,warps_prep=8"`` (comma-separated
    ``field=value``), or by assigning fields of :data:`TUNING` between calls in one process.

    Attributes:
        inverse: ``"packed"``: ``(I + A)⁻¹`` in registers, the 16×16 diagonal blocks by a packed
            forward substitution over 64×64 tiles; ``"tiles"``: ``A`` staged in the ``Ti`` buffer and
            inverted by 16×16 tiles (forward substitution on the four diagonal tiles, six merges).
        prec_inverse: ``input_precision`` of the merge matmuls of the inverse on the GPU.
        prec_f32: ``input_precision`` of every other matmul for float32 inputs, the low-rank
            ``chunk_scan``'s included (``"tf32x3"``, about float32 accuracy; ``"tf32x3t"``, the same three TF32
            passes on a truncation split, :func:`~kernels.delta_product.common.dot_tf32x3t`; ``"bf16x3"`` does half
            the tensor-core work, about 1e-5 accurate; ``"tf32"``, one pass, 2–2.5× faster fwd+bwd on an H100 but
            only as accurate as bf16; ``"ieee"``, no tensor cores).
        trunc_split: the kernels (names without ``_kernel``, joined by ``+``) whose float32 matmuls take
            ``"tf32x3t"`` where ``prec_f32`` is ``"tf32x3"``: those it made faster on an H100, where it reads the
            operands as they are instead of rounding both halves in registers (``dqkw`` 1.66 → 1.05 ms,
            gated ``dqkw_tangent`` 6.73 → 5.61 at n_h = 1, (4, 4096, 16, 128):
            ``benchmarks/results/kernels_tf32x3t.json``). With every kernel at ``tf32x3t`` the chunk scans,
            ``prep`` and ``wy_cols_tangent`` were slower (``kernels_tf32x3t_all.json``).
        warps_prep, warps_scan, warps_out, warps_dv, warps_dqkw, warps_wy: ``num_warps`` of the
            forward prep, both chunk scans, the output, ``dv_local``, ``dqkw`` and ``wy_bwd`` kernels
            (``warps_prep = 0`` chooses by dtype: :meth:`prep_warps`).
        warps_dual: ``num_warps`` of every tangent kernel (``hvp_mode = "dual"``; 0: per kernel,
            :data:`TANGENT_LAUNCH`; 16 is refused: float32 hit an illegal memory access with it on an
            H100, Triton 3.6).
        block_dual: columns per tile of the parallel tangent kernels (0: per kernel, :data:`TANGENT_LAUNCH`).
        bv_dual: value columns per program of the tangent chunk scans (0: by dtype, :meth:`scan_cols`; 16 is
            refused: slower for bf16, illegal memory access for float32 on an H100).
        bv_scan: value columns per program of the chunk scans.
        block: key / value columns per tile of the parallel kernels (their loops over ``K`` and
            ``V``; the output and ``dv_local`` grids split ``V`` by it); 0 chooses by dtype (:meth:`tile`).
        tile_wy: key / value columns per tile of ``wy_bwd``; 0: half of :meth:`tile` (:meth:`wy_tile`).
        tile_prep, tile_dqkw: key / value columns per tile of ``prep`` and value columns per step of ``dqkw``'s
            loops; 0: by dtype (:meth:`kernel_tile`).
        bk_dqkw: key columns per program of ``dqkw`` (64: two programs per chunk at ``K = 128``).
        stages: deepest software pipeline tried (``launch`` steps down when it does not fit).
        stages_scan: the same for the chunk scans ``scan_h`` and ``scan_dh`` (at most ``stages``). On an H100
            at n_h = 2 two stages take bf16 ``scan_dh`` from 0.67 to 0.45 ms and float32 ``scan_h`` from 1.41 to
            1.04 ms against three (``benchmarks/results/kernels_scan_tiles.json``).
        stages_dh: the same for ``scan_dh`` alone; 0 (default): ``stages_scan`` for 16-bit inputs and 1 for float32
            (:meth:`dh_stages`; on an H100 at n_h = 2 float32 ``scan_dh`` takes 1.42–1.43 ms at one stage, 2.14 at two:
            ``benchmarks/results/kernels_fused_out.json``, calls ``d8``, ``d9``).
        stages_dual: the same for the tangent chunk scans ``scan_h_tangent`` and ``scan_dh_tangent``; 0 (default):
            ``stages`` for 16-bit inputs and 1 for float32 (:meth:`dual_stages`; on an H100 at n_h = 2 float32
            ``scan_h_tangent`` takes 2.38 ms at one stage against 3.46 at three, gated 2.97 against 3.26, and
            ``scan_dh_tangent`` the same at either: ``benchmarks/results/kernels_tangent_stages.json``).
        fuse_out: the output formed in ``scan_h`` (which holds ``S_c``, ``U_c`` and the chunk's ``K`` already) instead
            of a separate ``out_kernel`` that reads ``Hs``, ``U`` and ``K`` back; the scan then also reads ``Q`` and
            forms ``Q Kᵀ`` once per value tile. ``"bf16"`` (default: for 16-bit inputs), ``"on"``, ``"off"`` or
            ``"f32"``. On an H100 at n_h = 2, bf16, the fused scan takes 0.44 ms at 64 value columns, against
            0.34 + 0.23 for ``scan_h`` and ``out``; float32's spills 2.6 KB a thread (gated: 9.5 against
            1.05 + 1.38 ms) (``benchmarks/results/kernels_fused_out.json``).
        fuse_min_programs: ``fuse_out`` only when the fused ``scan_h`` has at least this many programs
            (``⌈V / bv_fused⌉·B·H`` times the chunk groups, :meth:`fuses_out`); smaller grids run ``scan_h`` at ``bv_scan`` columns and
            ``out_kernel``. Fusing lengthens each program's sequential chunk loop, which only pays while the grid
            fills the GPU: on an H100, bf16, the fused scan won at (4, 4096, 16, 128) (128 programs: 2.40 against
            2.61 ms fwd+bwd at n_h = 2) and lost at (2, 8192, 8, 64) (16 programs: 1.46 against 1.29 at n_h = 2,
            2.16 against 1.88 at n_h = 3; at ``bv_fused=16``, 64 programs, 1.36 and 2.04;
            ``benchmarks/results/kernels_knobs_d64.json``).
        scan_groups: chunk groups of every chunk scan (first order and tangent): ``G`` programs along the
            sequence, each scanning ``⌈NC / G⌉`` chunks from the start it forms out of the groups before it. The
            scan of a group is affine in its start, ``h ↦ M h + S``; a summary pass (``G − 1`` groups, ``V + K``
            columns) forms ``[S | M]``, then the scan pass folds them in (``common.group_start``): the sequential
            length drops from ``NC`` to about ``2·NC / G`` chunks for ``K/V`` more columns of work. 0 (default)
            chooses (:meth:`groups`), 1 is off.
        group_programs: with ``scan_groups = 0``, scans of fewer programs (``⌈V / bv⌉·B·H``) than this run in 8
            groups. On an H100 at (2, 8192, 8, 64), bf16 (32 programs at ``bv_scan = 32``), the fwd+bwd kernels took
            1.92, 1.47, 1.30 and 1.29 ms at n_h = 3 in 1, 4, 8 and 16 groups (two groups: 1.99 against 1.94 for
            one) and 1.28 / 0.98 / 0.89 / 0.89 at n_h = 2 (``benchmarks/results/kernels_groups.json``).
        group_min_chunks: fewest chunks a group scans (``G`` is lowered to fit).
        fuse_dv: ``dU_loc = Pᵀ dO`` formed in ``scan_dh`` (which holds the chunk's ``K`` and ``dO`` tiles and
            loads ``Q``'s first) instead of a separate ``dv_local_kernel`` whose result the scan reads back; the
            scan then also forms ``Q Kᵀ`` once per value tile. Values as ``fuse_out``. On an H100 at n_h = 2, bf16,
            the fused ``scan_dh`` takes 0.38 ms against 0.45 + 0.14 for ``scan_dh`` and ``dv_local`` (it no longer
            reads ``dU_loc`` back); float32's takes 2.5 ms against 1.43 + 0.34
            (``benchmarks/results/kernels_fused_out.json``).
        tangent_tiles: ``"bf16"`` (default) or ``"off"``: for 16-bit inputs without a gate the tangent chunk scans
            load the tiles they read only as matmul operands in the input dtype (``common.load_tile``), as the
            first-order scans do, and with ``fuse_dv`` ``scan_dh_tangent`` forms ``dU̇_loc`` in place of
            ``dv_local_tangent``. On an H100 it takes the bf16 HVP from 7.42 to 6.71 ms at n_h = 2 and from 11.50
            to 10.46 at n_h = 3 (``benchmarks/results/kernels_tangent_tiles.json``). Float32 keeps its rows: its
            tile form was no faster (``scan_dh_tangent`` 4.31 → 4.84 ms) and ``scan_dh_tangent`` hit an illegal
            memory access at K = V = 64, n_h = 4 with Triton 3.6, so ``"on"`` and ``"f32"`` are refused.
        bv_fused: value columns per program of ``scan_h`` when it forms the output (``fuse_out``); the other
            scans take ``bv_scan``.
        bwd_store: dtype of the backward's intermediates ``dU_loc, dU, dW``, the partial ``dK`` and their tangents:
            ``"f32"``, or ``"input"`` (default: the input dtype, half the bytes for bf16 inputs). With a gate the
            gate cotangent's terms from them cancel at short sequences; with ``gate_dk = "split"`` 16-bit copies
            pass the gated bf16 fuzz (seeds 0 and 1, 506 cases, double backward and jvp on each: 0 failures,
            ``benchmarks/results/kernels_check_fuzz_gate_store.json``; every dtype:
            ``kernels_check_fuzz_gate_mid.json``). On an H100 at (4, 4096, 16, 128) float32 ones (a gate's, before)
            take gated bf16 fwd+bwd 9–13 % and the HVP 14–18 % longer at n_h = 1–3
            (``kernels_knobs_gate_mid_d128.json``, ``kernels_knobs_gate_mid_hvp.json``).
        wy_late: the schedule of ``wy_bwd``: ``"on"``, ``dX = Tᵀ dW`` only in its second loop over ``K``
            (where ``dK`` needs it anyway; its ``dβ``, ``dG`` terms there too) and ``dK ⊇ (dC + dCᵀ) K`` as
            one product; ``"off"``, ``dX`` also in the first loop and ``dC K + dCᵀ K``; ``"f32"`` (default),
            on for float32 only (on an H100 float32 ``wy_bwd`` takes 2.9 instead of 5.8 ms at n_h = 2,
            bf16 0.92 instead of 0.60 ms: ``benchmarks/results/kernels_wy_late.json``).
        scan_split: the state of the chunk scans ``scan_h`` and ``scan_dh`` as two halves of ``K/2`` rows
            (when ``K > 64``), each with its own half of the key-side tiles (``W``, ``K``, ``Q``), instead
            of one ``K``-row tile: ``"on"``, ``"off"``, or ``"f32"`` (default: on for float32 inputs, whose
            full 64×128 float32 tiles spill 0.6–0.7 KB a thread in the scans at 4 warps).
        dqkw_split: ``dqkw`` as three loops over the value tiles (``dW = −dU S_cᵀ``, stored at once; ``dO S_cᵀ``
            and ``dP``; ``U dS_{c+1}ᵀ``), each re-reading ``S_c`` or ``U``, instead of one: ``"on"`` (default),
            ``"off"`` or ``"f32"``. Float32 spills 0.25–0.7 instead of 0.9–1.1 KB a thread; on an H100 at n_h = 2
            ``dqkw`` takes 1.66 instead of 2.75 ms in float32 and 0.50 instead of 0.58 in bf16
            (``benchmarks/results/kernels_f32_splits.json``).
        wy_split: the tangent of ``wy_bwd`` as two kernels, ``"on"``, ``"off"`` or ``"f32"`` (default: on for
            float32 inputs): one program per chunk forms ``dA``, ``dȦ`` and stores ``dC + dCᵀ`` and its tangent
            (``dC = diag(β) dA``), then one program per (chunk, key or value tile) forms the tangents of ``dK``,
            ``dV`` and its part of ``dβ̇`` (``dĠ``); fewer ``64×64`` float32 tiles alive at once (spills of
            0.4–0.5 instead of 1.7–2.4 KB a thread at n_h = 2).
        tangent_gate: the double backward and forward mode (``torch.func.jvp``) of gated inputs by the
            tangent kernels with the gate's terms (with ``hvp_mode = "dual"``); off: the composed form's
            (on an H100 the tangent kernels take the bf16 gated HVP from 21× to 2.6–2.8× fwd+bwd:
            ``benchmarks/results/kernels_hvp_modes_gate.json``).
        hvp_tf32: for bf16 inputs, let the float32 matmuls of the second-order (composed) path
            use TF32 on the GPU (``torch.backends.cuda.matmul`` precision, restored afterwards).
        composed_inverse: the composed path's ``(I + A)⁻¹ [X, Y]``: ``"solve"``
            (``torch.linalg.solve_triangular``) or ``"kernel"`` (``tri_inverse.unit_lower_inverse``
            and matmuls: all its derivatives are batched matmuls).
        hvp_mode: the double backward and ``jvp``: ``"dual"``, the tangent kernels
            (``tangent_fwd``, ``tangent_bwd``: forward-over-reverse at the saved primal intermediates;
            without a gate, else as ``"fwd_rev"``); or differentiate the composed form: ``"rev_rev"``
            (``torch.func.vjp`` of its ``vjp``) or ``"fwd_rev"`` (one ``torch.func.jvp`` of
            ``x ↦ (f(x), vjp)``, no graph of the backward kept).
        direct_launch: a launch specialized as an earlier one calls that launch's compiled kernel directly,
            past ``kernel[grid]``'s per-call argument handling (:mod:`~kernels.delta_product.launch`).
        gate_dk: with a gate and 16-bit inputs, how ``scan_dh`` stores ``dS_{c+1}`` (``dHs``) and ``dqkw`` forms
            ``U dS_{c+1}ᵀ``. That product feeds the gate cotangent's terms, which cancel at short sequences: with bf16
            operands it alone gave ``dG`` 31 % relative error at T = 2 (fuzz seed 0, case 388;
            ``benchmarks/kernels_gate_case.py --emulate dk_tile --tuning gate_dk=input``) where the bf16 recurrence errs
            by 10 %.
            ``"split"`` (default): ``dS_{c+1} = hi + lo`` stored as two bf16 tensors (``hi`` its rounding, which the
            tangent kernels read) and ``U hiᵀ + U loᵀ`` in two bf16 passes (``U`` is bf16, so about 16 bits of
            ``dS_{c+1}`` count): 1.2 % on that case on an H100. ``"input"``: ``hi`` alone, 27 %. On an H100 at
            (4, 4096, 16, 128) the split costs gated bf16 fwd+bwd 4.5–6.3 % (``scan_dh``'s second store,
            ``dqkw``'s second product) and the HVP 1 % (``benchmarks/results/kernels_knobs_gate_dk_d128.json``,
            ``kernels_knobs_gate_dk_hvp.json``); ``dS_{c+1}`` stored in float32 was slower (``scan_dh`` 0.53
            against 0.35 ms at n_h = 1), float32 operands at ``prec_f32`` slower still (fwd+bwd 18–31 % over
            ``"input"``, ``dqkw`` spilling).
        gate_mids: with a gate, where the backward can be differentiated (:class:`~kernels.delta_product.chunk.
            ChunkDeltaProductBackward`), ``dqkw`` also stores its gate products ``dO S_cᵀ``, ``U dS_{c+1}ᵀ`` and
            ``Σ_v S_c ⊙ dS_{c+1}`` (float32, ``(T + N + NC)·K`` values a batch·head) and ``dqkw_tangent`` reads them
            instead of forming them again: two fewer accumulators alive over its value loop. ``"on"``, ``"off"``,
            ``"f32"`` (default) or ``"bf16"``. On an H100 at (4, 4096, 16, 128) it took the float32 gated HVP
            1.1–2.1 % down (``dqkw_tangent`` 5.61 → 4.99 ms at n_h = 1, ``dqkw`` 1.65 → 1.83) and bf16's 0.6 % down to
            1.5 % up (``benchmarks/results/kernels_knobs_gate_mids_*.json``).
        gate_pp_dv: with a gate, the tangent of the gate cotangent's ``dP ⊙ P`` terms formed by ``dv_local_tangent``,
            which holds ``P`` and ``Ṗ`` over all of ``K`` already (it then also forms ``dO Uᵀ`` and ``dO U̇ᵀ``), instead
            of by ``dqkw_tangent`` (three more ``[BQ, BT]`` products per key block, and the tiles they keep alive).
            ``"on"`` (default), ``"off"``, ``"f32"`` or ``"bf16"``. On an H100 at (4, 4096, 16, 128) the gated HVP
            1.0–2.8 % faster in float32 (``dqkw_tangent`` 5.35 → 4.39 ms at n_h = 1), 2.3–2.8 % in bf16
            (``benchmarks/results/kernels_knobs_pp_*.json``).
        gate_tiles_dv: with a gate, ``dv_local_tangent`` also stores the gated tiles of the tangent ``scan_dh``
            (``K̃``, ``K̃̇`` unless ``gate_keys_prep`` stored them, and ``(Q̇ + diag(Ġ) Q) e^G``, float32) and the scan
            reads them instead of forming them in every step of its sequential loop. ``"on"``, ``"off"``, ``"f32"``
            (default) or ``"bf16"``. On an H100 at (4, 4096, 16, 128), float32: the tangent ``scan_dh`` 3.73 → 2.56 ms
            at n_h = 1 (7.71 → 6.82 at n_h = 3) for ``dv_local_tangent`` 0.63 → 1.05, the gated HVP 0–3.8 % faster;
            bf16's 3.6–6.6 % slower
            (``benchmarks/results/kernels_knobs_tiles_dv_*.json``).
        gate_keys_prep: with a gate, ``prep_tangent`` also stores the decayed keys ``K̃``, ``K̃̇`` (float32) in the
            loop where it reads ``K`` and ``K̇`` for ``Ȧ``, and the tangent ``scan_h`` reads them instead of forming
            them in every step of its sequential loop; the double backward hands them on to the tangent ``scan_dh``
            (``gate_tiles_dv``), so that ``dv_local_tangent`` stores ``(Q̇ + diag(Ġ) Q) e^G`` alone. ``"on"``,
            ``"off"``, ``"f32"`` (default) or ``"bf16"``. On an H100 at (4, 4096, 16, 128), float32: the tangent
            ``scan_h`` 1.45 → 1.29 ms at n_h = 1 (4.59 → 4.14 at n_h = 3), ``dv_local_tangent`` 1.05 → 0.82 (2.04 →
            1.50) for ``prep_tangent`` 0.72 → 0.81 (2.14 → 2.52), the gated HVP 1.0–1.9 % faster in two runs; bf16
            6.4–6.8 % slower (its scan reads float32 keys in place of bf16 ones), so off
            (``benchmarks/results/kernels_knobs_keys_prep_*.json``).
        gate_dqkw_split: with a gate, ``dqkw_tangent`` as two launches: the state side (``dẆ``, ``U̇ dS_{c+1}ᵀ + U
            dṠ_{c+1}ᵀ`` and their gate terms; two accumulators, ``dqkw_state`` of the launch tables), then the query
            side (``dP``, ``dṖ``, ``dO Ṡᵀ``; three accumulators, ``dqkw_query``), which adds its ``dK̇`` to the state
            side's (float32). ``"on"``, ``"off"``, ``"f32"`` (default) or ``"bf16"``. On an H100 at (4, 4096, 16,
            128), gated float32, state side at 4 warps and query side at 8: ``dqkw_tangent`` 4.38 → 3.45 ms at n_h =
            1 (6.44 → 5.80 at n_h = 3), the HVP 4.7 / 2.3 / 1.3 % faster at n_h = 1 / 2 / 3; without a gate slower
            (float32 0–3 %, bf16 3–6 %: ``benchmarks/results/kernels_knobs_dqkw_split_*.json``).
    """

    inverse: str = "tiles"
    prec_inverse: str = "tf32x3"
    prec_f32: str = "tf32x3"
    trunc_split: str = "dqkw+dqkw_tangent+prep_tangent+wy_bwd_tangent"
    warps_prep: int = 0
    warps_scan: int = 4
    warps_out: int = 4
    warps_dv: int = 4
    warps_dqkw: int = 4
    warps_wy: int = 4
    warps_dual: int = 0
    block_dual: int = 0
    bv_dual: int = 0
    bv_scan: int = 32
    block: int = 0
    tile_wy: int = 0
    tile_prep: int = 0
    tile_dqkw: int = 0
    bk_dqkw: int = 64
    stages: int = 3
    stages_scan: int = 2
    stages_dh: int = 0
    stages_dual: int = 0
    fuse_out: str = "bf16"
    fuse_dv: str = "bf16"
    tangent_tiles: str = "bf16"
    bv_fused: int = 64
    fuse_min_programs: int = 128
    scan_groups: int = 0
    group_programs: int = 128
    group_min_chunks: int = 16
    bwd_store: str = "input"
    wy_late: str = "f32"
    scan_split: str = "f32"
    wy_split: str = "f32"
    dqkw_split: str = "on"
    hvp_tf32: bool = True
    composed_inverse: str = "kernel"
    hvp_mode: str = "dual"
    tangent_gate: bool = True
    direct_launch: bool = True
    gate_dk: str = "split"
    gate_mids: str = "f32"
    gate_pp_dv: str = "on"
    gate_tiles_dv: str = "f32"
    gate_keys_prep: str = "f32"
    gate_dqkw_split: str = "f32"

    def kernel_prec(self, kernel: str, prec: str) -> str:
        """``input_precision`` of the matmuls of ``kernel`` (a name of :data:`KERNELS`) where the launch's is
        ``prec``: ``"tf32x3t"`` in place of ``"tf32x3"`` for the kernels of ``trunc_split``."""
        return "tf32x3t" if prec == "tf32x3" and kernel in self.trunc_split.split("+") else prec

    def tile(self, dtype: torch.dtype) -> int:
        """Columns per tile of the parallel kernels: ``block``, or when 0, 128 for 16-bit inputs and
        64 for float32 (whose 128-wide tiles spill registers: 2× slower on an H100)."""
        if self.block:
            return self.block
        return 128 if dtype.itemsize == 2 else 64

    def wy_tile(self, dtype: torch.dtype) -> int:
        """Columns per tile of ``wy_bwd``: ``tile_wy``, or when 0, half of :meth:`tile` (at least 16).
        On an H100 at n_h = 2 the half tiles take float32 ``wy_bwd`` from 2.86 to 1.78 ms (its 64-wide
        tiles spill 1.2 KB a thread) and bf16 from 0.59 to 0.50 ms (``kernels_knobs_wy.json``)."""
        return self.tile_wy or max(16, self.tile(dtype) // 2)

    def kernel_tile(self, kernel: str, dtype: torch.dtype) -> int:
        """Columns per tile of ``kernel`` (``"prep"`` or ``"dqkw"``): its ``tile_*`` field, or when 0, :meth:`tile`
        for 16-bit inputs and half of it for float32 (at least 16). On an H100 at (4, 4096, 16, 128) the half tiles
        take float32 fwd+bwd 3.1–3.6 % (gated 2.0–4.9 %) and the gated HVP 0.8–1.5 % below 64 columns, n_h = 1–3
        (``dqkw`` 1.05 → 0.91 ms, ``prep`` 0.74 → 0.69 at n_h = 1;
        ``benchmarks/results/kernels_knobs_tiles_f32*.json``)."""
        return getattr(self, f"tile_{kernel}") or max(16, self.tile(dtype) // (2 if dtype.itemsize == 4 else 1))

    def scan_cols(self, dtype: torch.dtype, dual: bool = False) -> int:
        """Value columns per program of the chunk scans: ``bv_scan``; of the tangent scans (``dual``) ``bv_dual``,
        or when 0, 64 for 16-bit inputs and ``bv_scan`` for float32, whose tangent scans then split their state
        like the primal's (``scan_split``) at 4 warps (:data:`TANGENT_LAUNCH_F32`)."""
        if not dual:
            return self.bv_scan
        return self.bv_dual or (64 if dtype.itemsize == 2 else self.bv_scan)

    def on(self, knob: str, dtype: torch.dtype) -> bool:
        """Whether the ``"on"`` / ``"off"`` / ``"f32"`` / ``"bf16"`` field ``knob`` (``fuse_out``, ``fuse_dv``,
        ``tangent_tiles``, ``wy_late``, ``dqkw_split``, ``wy_split``, ``scan_split``, ``gate_mids``, ``gate_pp_dv``,
        ``gate_tiles_dv``, ``gate_keys_prep``, ``gate_dqkw_split``) holds for inputs of ``dtype``."""
        return _by_dtype(getattr(self, knob), dtype)

    def fuses_out(self, dtype: torch.dtype, programs: int) -> bool:
        """Whether ``scan_h`` forms the output (``fuse_out``) for inputs of ``dtype`` when its fused grid has
        ``programs`` programs (at least ``fuse_min_programs``)."""
        return self.on("fuse_out", dtype) and programs >= self.fuse_min_programs

    def groups(self, programs: int, chunks: int) -> int:
        """Chunk groups of a scan of ``chunks`` chunks whose grid has ``programs`` programs per group:
        ``scan_groups``, at most ``chunks / group_min_chunks`` and at least 1. With ``scan_groups = 0``: 8 below
        ``group_programs`` programs, else 1, and 1 where the chunk count allows only 2 (two groups run as
        many chunks in sequence as one: each pass scans half)."""
        g = min(self.scan_groups or (8 if programs < self.group_programs else 1),
                chunks // max(1, self.group_min_chunks))
        return max(1, g if self.scan_groups or g > 2 else 1)

    def tangent_rows(self, dtype: torch.dtype, gate: bool) -> bool:
        """Whether the tangent chunk scans read their tiles as float32 rows (``WIDE``): with a gate, whose terms
        read them elementwise, or when ``tangent_tiles`` is off for ``dtype``."""
        return gate or not self.on("tangent_tiles", dtype)

    def dh_stages(self, dtype: torch.dtype) -> int:
        """Deepest software pipeline of ``scan_dh``: ``stages_dh``, or when 0, ``stages_scan`` for 16-bit
        inputs and 1 for float32 (whose ``scan_dh`` spills at two stages: 2.14 instead of 1.42 ms on an H100
        at n_h = 2)."""
        return self.stages_dh or (self.stages_scan if dtype.itemsize == 2 else 1)

    def dual_stages(self, dtype: torch.dtype) -> int:
        """Deepest software pipeline of the tangent chunk scans: ``stages_dual``, or when 0, ``stages`` for 16-bit
        inputs and 1 for float32."""
        return self.stages_dual or (self.stages if dtype.itemsize == 2 else 1)

    def tangent_launch(self, kernel: str, dtype: torch.dtype, gate: bool = False,
                       full_queries: bool = False) -> tuple[int, int]:
        """``(num_warps, tile columns)`` of the tangent kernel ``kernel`` (a key of :data:`TANGENT_LAUNCH`):
        ``warps_dual`` and ``block_dual`` where set, else the table's for ``dtype`` and ``gate``
        (:data:`TANGENT_LAUNCH`, :data:`TANGENT_LAUNCH_F32`, :data:`TANGENT_LAUNCH_GATE`,
        :data:`TANGENT_LAUNCH_GATE_F32`); with ``full_queries`` (as many query rows a chunk as micro-steps) the
        table's ``<kernel>_full`` entry where it has one."""
        wide = dtype.itemsize > 2
        table = ((TANGENT_LAUNCH_GATE_F32 if wide else TANGENT_LAUNCH_GATE) if gate
                 else (TANGENT_LAUNCH_F32 if wide else TANGENT_LAUNCH))
        warps, share = table.get(f"{kernel}_full", table[kernel]) if full_queries else table[kernel]
        return self.warps_dual or warps, self.block_dual or int(self.tile(dtype) * share)

    def prep_warps(self, dtype: torch.dtype) -> int:
        """``num_warps`` of the forward prep kernel: ``warps_prep``, or when 0, 2 for 16-bit inputs
        and 4 for float32 (at 2 warps the float32 prep spills: 5–16× slower with a gate on an H100)."""
        if self.warps_prep:
            return self.warps_prep
        return 2 if dtype.itemsize == 2 else 4

    def update(self, spec: str) -> Tuning:
        """Set fields from ``"field=value,field=value"`` (values parsed by the field's type)."""
        for item in filter(None, (s.strip() for s in spec.split(","))):
            name, _, value = item.partition("=")
            if name not in self.__dataclass_fields__:
                raise ValueError(f"DELTA_PRODUCT_TUNING: unknown field `{name}`")
            kind = type(getattr(self, name))
            setattr(self, name, _parse_bool(name, value) if kind is bool else kind(value))
        precisions = ("ieee", "tf32", "tf32x3", "bf16x3", "tf32x3t")
        warps = {n: (0, 1, 2, 4, 8, 16) if n == "warps_prep" else (1, 2, 4, 8, 16)  # warps_prep = 0: by dtype
                 for n in self.__dataclass_fields__ if n.startswith("warps_")}
        warps["warps_dual"] = (0, 4, 8)
        if (not 1 <= self.stages_scan <= 4 or not 1 <= self.stages <= 4 or not 0 <= self.stages_dh <= 4
                or not 0 <= self.stages_dual <= 4):
            raise ValueError(f"DELTA_PRODUCT_TUNING: stages and stages_scan must be in 1..4, stages_dh and stages_dual "
                             f"in 0..4, got `{self.stages}`, `{self.stages_scan}`, `{self.stages_dh}`, "
                             f"`{self.stages_dual}`")
        for name in ("fuse_min_programs", "scan_groups", "group_programs", "group_min_chunks"):
            if getattr(self, name) < 0:
                raise ValueError(f"DELTA_PRODUCT_TUNING: {name} must be >= 0, got `{getattr(self, name)}`")
        for name, allowed in (("inverse", ("packed", "tiles")), ("bwd_store", ("f32", "input")),
                              *((n, ("f32", "bf16", "on", "off"))
                                for n in ("wy_late", "scan_split", "wy_split", "dqkw_split", "fuse_out", "fuse_dv",
                                          "gate_mids", "gate_pp_dv", "gate_tiles_dv", "gate_keys_prep",
                                          "gate_dqkw_split")),
                              ("tangent_tiles", ("bf16", "off")),  # float32 tiles: an illegal memory access
                              ("gate_dk", ("input", "split")),
                              ("composed_inverse", ("solve", "kernel")), ("hvp_mode", ("dual", "rev_rev", "fwd_rev")),
                              ("bv_dual", (0, 32, 64)), ("bv_fused", (16, 32, 64, 128)),
                              ("block_dual", (0, 16, 32, 64, 128)),
                              *((n, (0, 16, 32, 64, 128)) for n in ("block", "tile_wy", "tile_prep", "tile_dqkw")),
                              ("prec_inverse", precisions[:-1]), ("prec_f32", precisions), *warps.items()):
            if getattr(self, name) not in allowed:
                raise ValueError(f"DELTA_PRODUCT_TUNING: {name} must be one of {allowed}, got `{getattr(self, name)}`")
        unknown = set(filter(None, self.trunc_split.split("+"))) - set(KERNELS)
        if unknown:
            raise ValueError(f"DELTA_PRODUCT_TUNING: trunc_split names unknown kernels {sorted(unknown)}; "
                             f"known: {'+'.join(KERNELS)}")
        if self.warps_dual == 8 and self.block_dual == 16:
            raise ValueError("DELTA_PRODUCT_TUNING: warps_dual=8 with block_dual=16 is refused: the float32 gated "
                             "wy_cols_tangent hit an illegal memory access with it on an H100 (Triton 3.6)")
        return self

    def load(self, spec: str) -> Tuning:
        """Every field in place from the defaults updated by ``spec`` (the kernels read this object;
        ``load(spec())`` restores a configuration)."""
        fresh = Tuning().update(spec)
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(fresh, name))
        return self

    def spec(self) -> str:
        """The fields that differ from the defaults, in the ``DELTA_PRODUCT_TUNING`` format."""
        base = Tuning()
        return ",".join(f"{n}={getattr(self, n)}" for n in self.__dataclass_fields__
                        if getattr(self, n) != getattr(base, n))


def _by_dtype(choice: str, dtype: torch.dtype) -> bool:
    """A ``"on"`` / ``"off"`` / ``"f32"`` (on for float32 inputs only) / ``"bf16"`` (on for 16-bit inputs
    only) choice for ``dtype``."""
    return choice == "on" or (choice == "f32" and dtype.itemsize == 4) or (choice == "bf16" and dtype.itemsize == 2)


def _parse_bool(name: str, value: str) -> bool:
    """A boolean field's value: 1 / true / yes / on or 0 / false / no / off, any case; anything else is refused."""
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"DELTA_PRODUCT_TUNING: {name} must be one of 1/true/yes/on or 0/false/no/off, got `{value}`")


#: the launch choices in use (see :class:`Tuning`)
TUNING = Tuning().update(os.environ.get("DELTA_PRODUCT_TUNING", ""))


def cdiv(a: int, b: int) -> int:
    """``⌈a / b⌉`` on the host (``triton.cdiv`` is a constexpr function, whose wrapper unwraps its arguments on
    every call)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The least power of two ``≥ n`` (at least 1) on the host, as ``triton.next_power_of_2``."""
    return 1 << max(0, n - 1).bit_length()


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def poisoning() -> bool:
    """True when ``DELTA_PRODUCT_POISON=1``: every buffer the kernels write is NaN-filled first,
    so an element a kernel forgets to write shows up as NaN (used by the tests and GPU checks)."""
    return os.environ.get("DELTA_PRODUCT_POISON", "0") == "1"


def alloc(*shape: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``torch.empty``, or NaN-filled under :func:`poisoning`."""
    if poisoning():
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(*shape, device=device, dtype=dtype)


def chunk_tokens(n_h: int, block: int = BLOCK_STEPS) -> int:
    """Tokens per chunk: ``⌊block / n_h⌋`` (at least one)."""
    return max(1, block // n_h)


def chunk_local_cumsum(g: Tensor, ct: int) -> Tensor:
    """``G_t = Σ_{s ≤ t, s in the chunk of t} g_s`` for chunks of ``ct`` tokens along dim 1.

    Args:
        g: ``[B, T, H]`` log gates.
        ct: tokens per chunk.

    Returns:
        ``[B, T, H]`` float32 (float64 for float64 ``g``), differentiable.
    """
    B, T, H = g.shape
    nc = cdiv(T, ct)
    dt = torch.float64 if g.dtype == torch.float64 else torch.float32
    gp, pad = g.to(dt), nc * ct - T
    if pad:  # a zero pad would still copy
        gp = torch.nn.functional.pad(gp, (0, 0, 0, pad))
    return gp.reshape(B, nc, ct, H).cumsum(2).view(B, nc * ct, H)[:, :T]


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    """Triton dtype of a torch floating dtype."""
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
            torch.float64: tl.float64}[dtype]


def dot_config(dtype: torch.dtype) -> tuple[tl.dtype, str]:
    """Operand dtype and ``input_precision`` of ``tl.dot`` for inputs of ``dtype``.

    bf16 operands on the tensor cores for bf16 inputs; float32 operands with the
    three-pass TF32 split (about float32 accuracy; ``TUNING.prec_f32``) for float32 inputs; exact float64
    for float64. The interpreter cannot multiply bf16 (it sees raw bits), so there
    the operands are float32.
    """
    if dtype == torch.float64:
        return tl.float64, "ieee"
    if dtype == torch.float32 or interpreting():
        return tl.float32, ("ieee" if interpreting() else TUNING.prec_f32)
    return tl.bfloat16, "tf32"


@dataclass(frozen=True)
class Dims:
    """Sizes of one DeltaProduct call."""

    B: int
    T: int
    n_h: int
    H: int
    K: int
    V: int


def _shape(name: str, expected: str, got: Tensor) -> ValueError:
    return ValueError(f"`{name}` must have shape {expected}, got {tuple(got.shape)}")


def validate(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None,
             initial_state: Tensor | None) -> Dims:
    """Check shapes, dtypes and devices; raise ``ValueError`` naming the offending argument.

    ``q, k, v`` share one dtype (bf16, float32; float64 runs the composed path);
    ``beta, g, initial_state`` may be any floating dtype (they are used in float32).
    Tensors must be on a CUDA device, or on the CPU under ``TRITON_INTERPRET=1``.
    """
    named = {"q": q, "k": k, "v": v, "beta": beta}
    for name, x in named.items():
        if not isinstance(x, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if q.dim() != 4:
        raise _shape("q", "[B, T, H, K]", q)
    B, T, H, K = q.shape
    if k.dim() != 5 or k.shape[:2] != (B, T) or k.shape[3:] != (H, K):
        raise _shape("k", f"[B, T, n_h, H, K] = [{B}, {T}, n_h, {H}, {K}]", k)
    n_h = k.shape[2]
    if v.dim() != 5 or v.shape[:4] != (B, T, n_h, H):
        raise _shape("v", f"[B, T, n_h, H, V] = [{B}, {T}, {n_h}, {H}, V]", v)
    V = v.shape[-1]
    if beta.shape != (B, T, n_h, H):
        raise _shape("beta", f"[B, T, n_h, H] = [{B}, {T}, {n_h}, {H}]", beta)
    if g is not None and g.shape != (B, T, H):
        raise _shape("g", f"[B, T, H] = [{B}, {T}, {H}]", g)
    if initial_state is not None and initial_state.shape != (B, H, K, V):
        raise _shape("initial_state", f"[B, H, K, V] = [{B}, {H}, {K}, {V}]", initial_state)
    if min(B, T, n_h, H, K, V) < 1:
        raise ValueError(f"empty input: B, T, n_h, H, K, V = {B, T, n_h, H, K, V}")
    for name, d in (("q (head dim K)", K), ("v (head dim V)", V)):
        if d > MAX_DIM:
            raise ValueError(f"`{name}` = {d} exceeds the largest supported head dim {MAX_DIM}")
    allowed = SUPPORTED_DTYPES + (torch.float64,)
    if q.dtype not in allowed:
        raise ValueError(f"`q` has dtype {q.dtype}; supported: bfloat16, float32 (float64 on the composed path)")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"`{name}` has dtype {x.dtype}, expected {q.dtype} (the dtype of `q`)")
    others = {"k": k, "v": v, "beta": beta, "g": g, "initial_state": initial_state}
    for name, x in others.items():
        if x is None:
            continue
        if not x.is_floating_point():
            raise ValueError(f"`{name}` must be floating point, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"`{name}` is on {x.device}, expected {q.device} (the device of `q`)")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"`q` is on {q.device}: the Triton kernels need a CUDA device "
                         "(or TRITON_INTERPRET=1 for the CPU interpreter); use "
                         "lrnn.ops.delta_product_chunked on the CPU")
    return Dims(B, T, n_h, H, K, V)
