"""LoRA shrink: h[t] = x[t] @ A[slot[t]][:, :rank]  (a gathered low-rank matmul, [T, H] -> [T, R]).

This module holds the jnp reference (``ref_lora_shrink``) and the GPU kernels written against the Pallas
Triton lowering:

* ``bgmv_shrink_partials`` (decode form): one program per (token, slice of H); tokens in any order. Each
  program streams its slice of ``A[slot]`` once; the H-slices write partial sums ``[n_split, T, R]`` that the
  consumer (the expand kernel, or a tiny XLA sum) adds up, so no program needs a grid-wide reduction.
* ``seg_shrink_partials_multi`` (segment form, also the prefill form): tiles of up to ``block_m`` tokens of
  one slot (``grouping``), rows gathered from x by token index, one tensor-core dot per tile against its
  adapter; several A's sharing x in one launch.

Both are rank-aware (slot of rank 0 skips its loop entirely, padding columns are masked before use) and write
their rows in the original token order. The public entry point is ``pallas_kernels.lora.lora_shrink``.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common


def ref_lora_shrink(x, a, slot_ids, ranks):
    """Reference shrink in plain jnp (XLA gather + einsum).

    Args:
      x: [T, H] activations.
      a: [S, H, R] stacked A; columns >= ranks[s] of a[s] are ignored (may hold NaN).
      slot_ids: [T] int32 slot of each token, in [0, S).
      ranks: [S] int32 rank of each slot.

    Returns:
      h: [T, R] float32; h[t, j] = 0 for j >= ranks[slot_ids[t]].
    """
    _common.check_shrink_args(x, a, slot_ids, ranks)
    rank_t = _common.token_ranks(slot_ids, ranks)  # [T]
    a_t = a[slot_ids]  # [T, H, R]
    keep = jnp.arange(a.shape[2])[None, None, :] < rank_t[:, None, None]
    a_t = jnp.where(keep, a_t, jnp.zeros((), a.dtype))
    return jnp.einsum(
        "th,thr->tr", x, a_t, preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST
    ).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------------
# Decode form (BGMV): one program per (token, H-slice).


def _shrink_token(t, sp, slot_ref, rank_ref, x_ref, a_ref, *, block_k, k_per_split, spec_load=False):
    """Token t's partial of x[t] @ a[slot[t]] over H-slice sp: [R] float32, and the token's rank. (Program
    ids are read by the caller, at the kernel's top level: the interpreter cannot evaluate them inside a
    ``pl.when``.)

    ``spec_load``: for a slot other than 0, load whole rows of A as soon as the slot is known and zero the
    columns >= rank afterwards, so the loads wait on one dependent load (the slot) instead of two (slot, then
    its rank). Only worth it where a row is one 32-byte sector (R * itemsize <= 32): a masked load moves the
    same sectors then, so a rank below R costs nothing more. Slot 0 keeps the rank test (no load at rank 0)."""
    r_max = a_ref.shape[2]
    s = slot_ref[t]
    rank = rank_ref[s]
    cols = lax.broadcasted_iota(jnp.int32, (block_k, r_max), 1)
    n_k = k_per_split // block_k

    def body(i, acc, masked):
        k0 = pl.multiple_of(sp * k_per_split + i * block_k, block_k)
        xv = x_ref[t, pl.ds(k0, block_k)].astype(jnp.float32)  # [BK]
        if masked:  # rank < R: load only the live columns, zero the rest (NaN padding never read)
            av = plgpu.load(a_ref.at[s, pl.ds(k0, block_k), :], mask=cols < rank, other=0)
        else:  # rank == R: unmasked, vectorised loads of whole rows
            av = a_ref[s, pl.ds(k0, block_k), :]
        return acc + xv[:, None] * av.astype(jnp.float32)  # [BK, R]

    zero = jnp.zeros((block_k, r_max), jnp.float32)
    full = lambda: lax.fori_loop(0, n_k, functools.partial(body, masked=False), zero)
    part = lambda: lax.fori_loop(0, n_k, functools.partial(body, masked=True), zero)
    # rank 0 (slot 0, empty slots): no load at all.
    by_rank = lambda: lax.cond(rank >= r_max, full, lambda: lax.cond(rank > 0, part, lambda: zero))
    if spec_load:
        # dead columns (NaN padding included) are dropped by the select, after the load
        acc = lax.cond(s != 0, lambda: jnp.where(cols < rank, full(), 0.0), by_rank)
    else:
        acc = by_rank()
    return jnp.sum(acc, axis=0), rank


def _bgmv_shrink_kernel(slot_ref, rank_ref, x_ref, a_ref, h_ref, *tr_refs, block_k, k_per_split, spec_load):
    # slot_ref: [T] int32, rank_ref: [S] int32, x_ref: [T, H], a_ref: [S, H, R], h_ref: [n_split, T, R] f32;
    # tr_refs: () or (token ranks [T] int32,) written by the H-slice-0 programs
    t, sp = pl.program_id(0), pl.program_id(1)
    h_ref[sp, t, :], rank = _shrink_token(t, sp, slot_ref, rank_ref, x_ref, a_ref, block_k=block_k,
                                          k_per_split=k_per_split, spec_load=spec_load)
    for tr_ref in tr_refs:
        @pl.when(sp == 0)
        def _(tr_ref=tr_ref):
            tr_ref[t] = rank


def _bgmv_shrink_multi_kernel(slot_ref, rank_ref, x_ref, *refs, block_k, k_per_split):
    # refs: n a_refs [S, H, R], then h_ref [n, n_split, T, R] f32; grid axis 2 picks the slice
    *a_refs, h_ref = refs
    t, sp, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    for i, a_ref in enumerate(a_refs):
        @pl.when(j == i)
        def _(i=i, a_ref=a_ref):
            h_ref[i, sp, t, :] = _shrink_token(t, sp, slot_ref, rank_ref, x_ref, a_ref, block_k=block_k,
                                               k_per_split=k_per_split)[0]


# Programs the decode shrink aims at. One op (``bgmv_shrink_partials``): ~256, two per SM of the H200, each
# streaming its token's A over several loop steps. Sixteenth session, this change alone, same process (with
# 3 pipeline stages, which measured like 2): shrink+expand 0.1-1.7 us less device time at the four
# decode shapes than with ~2048 one-step programs (256 tokens, O = 14336: 51.6 -> 50.0 us), mostly in the
# expand, which then sums fewer partials. The multi-slice kernels of the decode step keep ~2048 programs, the
# rank lookup before A's load and no token ranks for the delta: beside the base matmuls there, ~256 programs,
# spec loads and token ranks made the step 0.04-0.12 ms slower at batch 32 and no faster at 64 (sixteenth
# session, experiment 40a96e4).
BGMV_PROGRAMS = 256
BGMV_MULTI_PROGRAMS = 2048


def bgmv_block_sizes(num_tokens: int, hidden: int, r_max: int, programs: int = BGMV_MULTI_PROGRAMS
                     ) -> tuple[int, int]:
    """Default (block_k, n_split) of the decode shrink: ~``programs`` programs, <= 8192 live accumulator
    elements."""
    block_k = _common.largest_pow2_divisor(hidden, max(16, 8192 // max(r_max, 1)))
    max_split = max(1, min(hidden // block_k, hidden // 256))  # keep >= 256 of H per program
    n_split = 1
    while (n_split * 2 <= max_split and num_tokens * n_split < programs
           and (hidden // block_k) % (n_split * 2) == 0):
        n_split *= 2
    return block_k, n_split


def bgmv_shrink_partials(
    x, a, slot_ids, ranks, *, block_k=None, n_split=None, num_warps=None, num_stages=2, spec_load=None,
    token_ranks=False, programs=BGMV_PROGRAMS, interpret=False
):
    """Decode-form shrink on GPU (Pallas Triton lowering).

    Args:
      x: [T, H]; a: [S, H, R] with R a power of two; slot_ids: [T] int32; ranks: [S] int32.
      block_k, n_split: H-chunk per loop step and number of H-slices (powers of two; defaults from
        ``bgmv_block_sizes``).
      spec_load: A's rows loaded on the slot alone, the rank applied after the load (``_shrink_token``);
        default: where a row of A is one 32-byte sector, so that a rank below R costs no more bytes.
      token_ranks: also return each token's rank (``ranks[slot_ids]``, as the expand can take it: one
        dependent load fewer there), written by the programs that have the rank at hand anyway.
      programs: the number of programs the default (block_k, n_split) aims at.
      num_warps: default 8 where a program streams at least 64 KB of A, else 4 (sixteenth session: the
        shrink 0.2-0.7 us faster with 8 at the issue's 256-token and rank-64 shapes, 128 KB per program;
        0.2-0.3 us slower at its 64-token rank-16 shapes, 32 KB per program).

    Returns:
      h_partials: [n_split, T, R] float32 whose sum over axis 0 is the shrink; with ``token_ranks``, the
      pair (h_partials, [T] int32 token ranks).
    """
    t, hidden = x.shape
    r_max = a.shape[2]
    dk, dn = bgmv_block_sizes(t, hidden, r_max, programs)
    block_k = block_k or dk
    n_split = n_split or dn
    row_bytes = r_max * jnp.dtype(a.dtype).itemsize  # one row of A
    if spec_load is None:
        spec_load = row_bytes <= 32
    if num_warps is None:
        num_warps = 8 if (hidden // n_split) * row_bytes >= 64 * 1024 else 4
    if hidden % (block_k * n_split):
        raise ValueError(f"H={hidden} must be divisible by block_k*n_split={block_k * n_split}")
    kernel = functools.partial(_bgmv_shrink_kernel, block_k=block_k, k_per_split=hidden // n_split,
                               spec_load=spec_load)
    args = _common.match_vma(slot_ids.astype(jnp.int32), ranks.astype(jnp.int32), x, a)
    out_shape = _common.out_struct((n_split, t, r_max), jnp.float32, *args)
    if token_ranks:
        out_shape = (out_shape, _common.out_struct((t,), jnp.int32, *args))
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(t, n_split),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="lora_bgmv_shrink",
    )(*args)


def bgmv_shrink_partials_multi(
    x, a_slices, slot_ids, ranks, *, block_k=None, n_split=None, num_warps=4, num_stages=2, interpret=False
):
    """Decode-form shrink of several A's that share x (q/k/v, gate/up) in one launch.

    Args:
      x: [T, H]; a_slices: tuple of n [S, H, R] banks (same H and R); slot_ids: [T]; ranks: [S].
      block_k, n_split: as in ``bgmv_shrink_partials``.

    Returns:
      h_partials: [n, n_split, T, R] float32; ``h_partials[i]`` are slice i's partials.
    """
    t, hidden = x.shape
    r_max = a_slices[0].shape[2]
    dk, dn = bgmv_block_sizes(t * len(a_slices), hidden, r_max)
    block_k = block_k or dk
    n_split = n_split or dn
    if hidden % (block_k * n_split):
        raise ValueError(f"H={hidden} must be divisible by block_k*n_split={block_k * n_split}")
    kernel = functools.partial(_bgmv_shrink_multi_kernel, block_k=block_k, k_per_split=hidden // n_split)
    args = _common.match_vma(slot_ids.astype(jnp.int32), ranks.astype(jnp.int32), x, *a_slices)
    return pl.pallas_call(
        kernel,
        out_shape=_common.out_struct((len(a_slices), n_split, t, r_max), jnp.float32, *args),
        grid=(t, n_split, len(a_slices)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="lora_bgmv_shrink_multi",
    )(*args)


# ----------------------------------------------------------------------------------------------------------
# Segment form (grouped decode): tiles of up to block_m tokens of one slot, several A's sharing x.


def _seg_shrink_multi_kernel(tok_ref, len_ref, tslot_ref, trank_ref, x_ref, *refs, block_m, block_k, k_per_split):
    # tok_ref [N, BM], len_ref/tslot_ref/trank_ref [N] int32 (``_common.SegmentTiles``); x_ref [T, H];
    # refs: n a_refs [S, H, R], then h_ref [n, n_split, T, R] f32. Grid: (tile, H-slice, slice).
    *a_refs, h_ref = refs
    i, sp, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    r_max = a_refs[0].shape[2]
    cols = lax.broadcasted_iota(jnp.int32, (block_k, r_max), 1)
    n_k = k_per_split // block_k

    @pl.when(len_ref[i] > 0)  # tiles past the data-dependent count are empty
    def _():
        toks = tok_ref[i, :]  # [BM]
        s = tslot_ref[i]
        rank = trank_ref[i]
        for ii, a_ref in enumerate(a_refs):
            @pl.when(j == ii)
            def _(a_ref=a_ref, ii=ii):
                def k_step(step, acc, masked):
                    k0 = pl.multiple_of(sp * k_per_split + step * block_k, block_k)
                    xv = x_ref[toks, pl.ds(k0, block_k)]  # [BM, BK] rows gathered by token index
                    if masked:  # rank < R: dead columns are not read
                        av = plgpu.load(a_ref.at[s, pl.ds(k0, block_k), :], mask=cols < rank, other=0)
                    else:
                        av = a_ref[s, pl.ds(k0, block_k), :]
                    return acc + jnp.dot(xv, av.astype(xv.dtype), preferred_element_type=jnp.float32)

                zero = jnp.zeros((block_m, r_max), jnp.float32)
                full = lambda: lax.fori_loop(0, n_k, functools.partial(k_step, masked=False), zero)
                some = lambda: lax.fori_loop(0, n_k, functools.partial(k_step, masked=True), zero)
                acc = lax.cond(rank >= r_max, full, lambda: lax.cond(rank > 0, some, lambda: zero))
                h_ref[ii, sp, toks, :] = acc


# Programs the segment shrink aims at when every tile is full (the fewest tiles, T / block_m): its H-slice count
# is the smallest that reaches this many. ``lora.segment_shrink_programs`` lowers it where XLA sums the slices'
# partials (R > 16 prefill): one H-slice then needs no sum at all.
SEG_PROGRAMS = 512


def seg_block_sizes(num_tokens: int, hidden: int, n_slices: int, block_m: int, programs: int = SEG_PROGRAMS
                    ) -> tuple[int, int]:
    """Default (block_k, n_split) of the segment shrink: enough programs (>= ``programs``) even when every tile
    is full (the fewest tiles, T / block_m), each program keeping >= 512 of H."""
    block_k = _common.largest_pow2_divisor(hidden, 128)
    min_tiles = max(1, num_tokens // block_m)
    n_split = 1
    while (min_tiles * n_slices * n_split < programs and hidden // (n_split * 2) >= 512
           and (hidden // block_k) % (n_split * 2) == 0):
        n_split *= 2
    return block_k, n_split


def seg_shrink_stages(block_m: int) -> int:
    """Default software-pipeline depth of the segment shrink: 3 for the prefill tiles (32 rows at R <= 16, 64 at
    R > 16), else 2 (16-row decode tiles: not measured). H200 (benchmarks/KERNELS_NOTES.md): 32-row tiles under
    ncu, thirteenth session, x at 67-68% of DRAM peak instead of 59-60% (24.5 -> 21.5 us at 8192 tokens / 4
    adapters, 27.1 -> 24.1 at 8192 / 64, 11.1 -> 10.0 at 2048 / 4); 64-row tiles, fourteenth session, the op
    0.8-3.1 us faster at all four r = 64 shapes."""
    return 3 if block_m >= 32 else 2


def seg_shrink_partials_multi(x, a_slices, tiles, *, block_k=None, n_split=None, num_warps=4, num_stages=None,
                              programs=SEG_PROGRAMS, interpret=False):
    """Segment-form shrink of several A's that share x, in one launch (Pallas Triton lowering; R >= 16).

    Args:
      x: [T, H]; a_slices: tuple of n [S, H, R] banks (same H and R).
      tiles: ``grouping.segment_tiles(slot_ids, ranks, block_m)`` (block_m >= 16: a tensor-core dot).
      block_k, n_split: H-chunk per loop step and number of H-slices (defaults from ``seg_block_sizes``).
      num_warps, num_stages: Triton launch knobs (default stages: ``seg_shrink_stages``).
      programs: the number of programs the default n_split aims at (``SEG_PROGRAMS``).

    Returns:
      h_partials: [n, n_split, T, R] float32 in token order; ``h_partials[i]`` sum over axis 0 to slice i's h.
    """
    t, hidden = x.shape
    r_max = a_slices[0].shape[2]
    block_m = tiles.tokens.shape[1]
    dk, dn = seg_block_sizes(t, hidden, len(a_slices), block_m, programs)
    block_k, n_split = block_k or dk, n_split or dn
    num_stages = num_stages or seg_shrink_stages(block_m)
    if hidden % (block_k * n_split):
        raise ValueError(f"H={hidden} must be divisible by block_k*n_split={block_k * n_split}")
    kernel = functools.partial(_seg_shrink_multi_kernel, block_m=block_m, block_k=block_k,
                               k_per_split=hidden // n_split)
    args = _common.match_vma(*tiles, x, *a_slices)
    return pl.pallas_call(
        kernel,
        out_shape=_common.out_struct((len(a_slices), n_split, t, r_max), jnp.float32, *args),
        grid=(tiles.length.shape[0], n_split, len(a_slices)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="lora_seg_shrink_multi",
    )(*args)
