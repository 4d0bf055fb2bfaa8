"""LoRA expand: y[t] += h[t, :rank] @ B[slot[t]][:rank]  (a gathered low-rank matmul, [T, R] -> [T, O]).

This module holds the jnp reference (``ref_lora_expand``) and the GPU kernels written against the Pallas
Triton lowering:

* ``bgmv_expand`` (decode form): one program per (token, block of O), tokens in any order; reads
  ``B[slot, :rank, block]`` once and adds into y in place (the output aliases y). A token of a rank-0 slot
  (slot 0, the zero adapter) returns at once: its row of y is neither read nor written.
  ``bgmv_expand_multi`` does several B's (q/k/v, gate/up) in one launch, in place; ``bgmv_delta_multi``
  likewise but writes the deltas alone into fresh arrays (zero rows for rank 0), for outputs that are slices
  of one fused projection: the add is then left to XLA, which fuses it into the slices' consumers instead of
  copying each slice out for the kernel to update.
* ``seg_expand_multi`` / ``seg_delta_multi`` (segment form, also the prefill form): tiles of up to
  ``block_m`` tokens of one slot (``grouping``), rows of y gathered/scattered by token index, one
  tensor-core dot per (tile, block of O); in place or as deltas. A program may take ``o_blocks`` blocks of O
  in a row, loading the tile's h once for all of them (the prefill default: ``lora.segment_delta_blocks``).

Both take h as partial sums ``[n_split, T, R]`` (what the shrink kernels produce), so the fused
shrink+expand never materialises the reduced h. The public entry point is ``pallas_kernels.lora.lora_expand``.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common


def ref_lora_expand(y, h, b, slot_ids, ranks):
    """Reference expand in plain jnp (XLA gather + einsum).

    Args:
      y: [T, O] base output to add into.
      h: [T, R] shrink output (any float dtype); columns >= ranks[slot] are ignored.
      b: [S, R, O] stacked B (scaling folded in); rows >= ranks[s] of b[s] are ignored (may hold NaN).
      slot_ids: [T] int32 slot of each token, in [0, S).
      ranks: [S] int32 rank of each slot.

    Returns:
      y_out: [T, O] in y.dtype, y + h[:, :rank] @ b[slot, :rank] computed in float32.
    """
    _common.check_expand_args(y, h, b, slot_ids, ranks)
    rank_t = _common.token_ranks(slot_ids, ranks)  # [T]
    live = jnp.arange(b.shape[1])[None, :] < rank_t[:, None]  # [T, R]
    hm = jnp.where(live, h.astype(jnp.float32), 0.0)
    b_t = b[slot_ids]  # [T, R, O]
    b_t = jnp.where(live[:, :, None], b_t, jnp.zeros((), b.dtype))
    delta = jnp.einsum(
        "tr,tro->to", hm, b_t.astype(jnp.float32), preferred_element_type=jnp.float32,
        precision=lax.Precision.HIGHEST,
    )
    return (y.astype(jnp.float32) + delta).astype(y.dtype)


# ----------------------------------------------------------------------------------------------------------
# Decode form (BGMV): one program per (token, block of O).


def _delta_block(s, rank, hv, b_ref, n0, block_n):
    """hv[:rank] @ b[s, :rank, n0:n0+block_n]: [block_n] float32 (hv: [R] float32). Rank 0 loads no B."""
    r_max = b_ref.shape[1]
    rows = lax.broadcasted_iota(jnp.int32, (r_max,), 0)
    hv = jnp.where(rows < rank, hv, 0.0)
    live = lax.broadcasted_iota(jnp.int32, (r_max, block_n), 0) < rank
    bv = plgpu.load(b_ref.at[s, :, pl.ds(n0, block_n)], mask=live, other=0)  # [R, BN], dead rows unread
    return jnp.sum(hv[:, None] * bv.astype(jnp.float32), axis=0)


def _expand_token(s, rank, hv, b_ref, o_ref, t, n0, block_n):
    """o[t, n0:n0+block_n] += hv[:rank] @ b[s, :rank, n0:n0+block_n] (hv: [R] float32)."""
    yv = o_ref[t, pl.ds(n0, block_n)].astype(jnp.float32)  # [BN]
    out = yv + _delta_block(s, rank, hv, b_ref, n0, block_n)
    o_ref[t, pl.ds(n0, block_n)] = out.astype(o_ref.dtype)


def _bgmv_expand_kernel(slot_ref, rank_ref, h_ref, b_ref, y_ref, o_ref, *, block_n, per_token):
    # slot_ref: [T]; rank_ref: [S], or [T] (``per_token``: each token's rank, loaded beside its slot instead
    # of after it); h_ref: [n_split, T, R] f32 partials; b_ref: [S, R, O]; y_ref, o_ref: [T, O] (aliased)
    del y_ref  # o_ref aliases it
    t = pl.program_id(0)
    n = pl.program_id(1)
    s = slot_ref[t]
    rank = rank_ref[t] if per_token else rank_ref[s]

    @pl.when(rank > 0)
    def _():
        hv = jnp.sum(h_ref[:, t, :].astype(jnp.float32), axis=0)  # [R]
        _expand_token(s, rank, hv, b_ref, o_ref, t, pl.multiple_of(n * block_n, block_n), block_n)


def _bgmv_expand_multi_kernel(slot_ref, rank_ref, h_ref, *refs, block_n, starts):
    # h_ref: [n, n_split, T, R] f32 partials; refs: n b_refs [S, R, O_i], n y_refs, n o_refs (aliased).
    # Grid axis 1 runs over the O-blocks of all slices: slice i owns blocks starts[i] .. starts[i + 1] - 1.
    n_slices = len(starts) - 1
    b_refs, o_refs = refs[:n_slices], refs[2 * n_slices:]
    t = pl.program_id(0)
    n = pl.program_id(1)
    s = slot_ref[t]
    rank = rank_ref[s]
    for i in range(n_slices):
        @pl.when((rank > 0) & (n >= starts[i]) & (n < starts[i + 1]))
        def _(i=i):
            hv = jnp.sum(h_ref[i, :, t, :].astype(jnp.float32), axis=0)  # [R]
            n0 = pl.multiple_of((n - starts[i]) * block_n, block_n)
            _expand_token(s, rank, hv, b_refs[i], o_refs[i], t, n0, block_n)


def _bgmv_delta_multi_kernel(slot_ref, rank_ref, h_ref, *refs, block_n, starts):
    # As _bgmv_expand_multi_kernel, but refs are n b_refs then n fresh outputs d [T, O_i]: d = h @ B.
    n_slices = len(starts) - 1
    b_refs, o_refs = refs[:n_slices], refs[n_slices:]
    t = pl.program_id(0)
    n = pl.program_id(1)
    s = slot_ref[t]
    rank = rank_ref[s]
    for i in range(n_slices):
        @pl.when((n >= starts[i]) & (n < starts[i + 1]))
        def _(i=i):
            hv = jnp.sum(h_ref[i, :, t, :].astype(jnp.float32), axis=0)  # [R]
            n0 = pl.multiple_of((n - starts[i]) * block_n, block_n)
            o_refs[i][t, pl.ds(n0, block_n)] = _delta_block(s, rank, hv, b_refs[i], n0, block_n).astype(
                o_refs[i].dtype)


def bgmv_expand_block_n(out_dim: int, r_max: int) -> int:
    """Default block of O for the decode expand (<= 8192 live elements of B per program)."""
    return _common.largest_pow2_divisor(out_dim, max(16, min(1024, 8192 // max(r_max, 1))))


def bgmv_expand(y, h_partials, b, slot_ids, ranks, *, block_n=None, num_warps=4, num_stages=2, token_ranks=None,
                interpret=False):
    """Decode-form expand on GPU (Pallas Triton lowering).

    Args:
      y: [T, O]; h_partials: [n_split, T, R] (n_split a power of two; sum over axis 0 is h);
      b: [S, R, O] with R a power of two; slot_ids: [T] int32; ranks: [S] int32.
      token_ranks: optional [T] int32, ``ranks[slot_ids]`` (``bgmv_shrink_partials(..., token_ranks=True)``
        returns it): then a program's B load waits on one dependent load instead of two.

    Returns:
      y_out: [T, O] in y.dtype (aliases y: donate it to update in place).
    """
    t, o = y.shape
    r_max = b.shape[1]
    block_n = block_n or bgmv_expand_block_n(o, r_max)
    if o % block_n:
        raise ValueError(f"O={o} must be divisible by block_n={block_n}")
    kernel = functools.partial(_bgmv_expand_kernel, block_n=block_n, per_token=token_ranks is not None)
    rank_arg = ranks if token_ranks is None else token_ranks
    args = _common.match_vma(slot_ids.astype(jnp.int32), rank_arg.astype(jnp.int32), h_partials, b, y)
    return pl.pallas_call(
        kernel,
        out_shape=_common.out_struct(y.shape, y.dtype, *args),
        grid=(t, o // block_n),
        input_output_aliases={4: 0},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="lora_bgmv_expand",
    )(*args)


def _multi_blocks(out_dims: list[int], r_max: int, block_n: int | None) -> tuple[int, tuple[int, ...]]:
    """The multi-slice grid's O-blocks: (block_n, starts), slice i owning blocks starts[i] .. starts[i+1] - 1."""
    block_n = block_n or min(bgmv_expand_block_n(o, r_max) for o in out_dims)   # powers of two: divides all
    for o in out_dims:
        if o % block_n:
            raise ValueError(f"O={o} must be divisible by block_n={block_n}")
    starts = [0]
    for o in out_dims:
        starts.append(starts[-1] + o // block_n)
    return block_n, tuple(starts)


def bgmv_expand_multi(ys, h_partials, b_slices, slot_ids, ranks, *, block_n=None, num_warps=4, num_stages=2,
                      interpret=False):
    """Decode-form expand of several slices (q/k/v, gate/up) in one launch.

    Args:
      ys: tuple of n base outputs [T, O_i]; h_partials: [n, n_split, T, R] (``bgmv_shrink_partials_multi``);
      b_slices: tuple of n [S, R, O_i] banks (same R); slot_ids: [T] int32; ranks: [S] int32.

    Returns:
      tuple of y_out[i]: [T, O_i] in ys[i].dtype (each aliases ys[i]).
    """
    t = ys[0].shape[0]
    n = len(ys)
    block_n, starts = _multi_blocks([y.shape[1] for y in ys], b_slices[0].shape[1], block_n)
    kernel = functools.partial(_bgmv_expand_multi_kernel, block_n=block_n, starts=starts)
    args = _common.match_vma(slot_ids.astype(jnp.int32), ranks.astype(jnp.int32), h_partials, *b_slices, *ys)
    return tuple(pl.pallas_call(
        kernel,
        out_shape=tuple(_common.out_struct(y.shape, y.dtype, *args) for y in ys),
        grid=(t, starts[-1]),
        input_output_aliases={3 + n + i: i for i in range(n)},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="lora_bgmv_expand_multi",
    )(*args))


def bgmv_delta_multi(out_dtype, h_partials, b_slices, slot_ids, ranks, *, block_n=None, num_warps=4,
                     num_stages=2, interpret=False):
    """Decode-form LoRA deltas of several slices in one launch: d_i[t] = h_i[t, :rank] @ b_i[slot[t], :rank].

    Args:
      out_dtype: the deltas' dtype (the base outputs').
      h_partials: [n, n_split, T, R] (``bgmv_shrink_partials_multi``); b_slices: tuple of n [S, R, O_i]
        banks (same R); slot_ids: [T] int32; ranks: [S] int32.

    Returns:
      tuple of d_i: [T, O_i] in out_dtype (zero rows for rank-0 tokens).
    """
    t = h_partials.shape[2]
    block_n, starts = _multi_blocks([b.shape[2] for b in b_slices], b_slices[0].shape[1], block_n)
    kernel = functools.partial(_bgmv_delta_multi_kernel, block_n=block_n, starts=starts)
    args = _common.match_vma(slot_ids.astype(jnp.int32), ranks.astype(jnp.int32), h_partials, *b_slices)
    return tuple(pl.pallas_call(
        kernel,
        out_shape=tuple(_common.out_struct((t, b.shape[2]), out_dtype, *args) for b in b_slices),
        grid=(t, starts[-1]),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="lora_bgmv_delta_multi",
    )(*args))


# ----------------------------------------------------------------------------------------------------------
# Segment form (grouped decode): tiles of up to block_m tokens of one slot, deltas of several B's.


def _seg_multi_kernel(tok_ref, len_ref, tslot_ref, trank_ref, h_ref, *refs, block_m, block_n, o_blocks, starts,
                      in_place):
    # tok_ref [N, BM], len_ref/tslot_ref/trank_ref [N] (``_common.SegmentTiles``); h_ref [n, n_split, T, R] f32
    # partials; refs: n b_refs [S, R, O_i], then (in place) n y_refs and n aliased o_refs [T, O_i], or (delta)
    # n fresh outputs d_i [T, O_i]. Grid: (tile, group of o_blocks O-blocks over all slices); slice i owns the
    # groups starts[i] .. starts[i + 1] - 1 (in units of groups).
    n_slices = len(starts) - 1
    b_refs, o_refs = refs[:n_slices], refs[(2 if in_place else 1) * n_slices:]
    i, ng = pl.program_id(0), pl.program_id(1)
    r_max = b_refs[0].shape[1]
    hcols = lax.broadcasted_iota(jnp.int32, (block_m, r_max), 1)
    brows = lax.broadcasted_iota(jnp.int32, (r_max, block_n), 0)

    @pl.when(len_ref[i] > 0)  # every token is in exactly one non-empty tile: each output row written once
    def _():
        toks = tok_ref[i, :]  # [BM]
        s = tslot_ref[i]
        rank = trank_ref[i]
        for ii in range(n_slices):
            o_ref = o_refs[ii]

            def n0_of(k, ii=ii):
                return pl.multiple_of(((ng - starts[ii]) * o_blocks + k) * block_n, block_n)

            @pl.when((ng >= starts[ii]) & (ng < starts[ii + 1]) & (rank > 0))
            def _(ii=ii, o_ref=o_ref, n0_of=n0_of):
                hv = h_ref[ii, 0, toks, :]  # [BM, R]: the shrink's H-slices summed here (tiny, from L2), once
                for sp in range(1, h_ref.shape[1]):  # for the program's o_blocks O-blocks
                    hv = hv + h_ref[ii, sp, toks, :]
                hv = jnp.where(hcols < rank, hv, 0.0)

                def load_b(k, ii=ii, n0_of=n0_of):
                    return plgpu.load(b_refs[ii].at[s, :, pl.ds(n0_of(k), block_n)], mask=brows < rank, other=0)

                def block(k, bv, ii=ii, o_ref=o_ref, n0_of=n0_of):
                    n0 = n0_of(k)
                    d = jnp.dot(hv.astype(bv.dtype), bv, preferred_element_type=jnp.float32)
                    if in_place:
                        d = d + o_ref[toks, pl.ds(n0, block_n)].astype(jnp.float32)  # [BM, BN] rows by token
                    o_ref[toks, pl.ds(n0, block_n)] = d.astype(o_ref.dtype)

                if o_blocks == 1:
                    block(0, load_b(0))
                else:
                    # Several O-blocks as a loop rather than unrolled: Triton software-pipelines the loop's B loads
                    # (cp.async into shared memory, num_stages deep) where unrolled code staged the next block's B
                    # in registers. H200, twentieth session, same process (benchmarks/RESULTS.md): the rank-64
                    # delta 19.6-19.7 -> 15.9-16.1 us at 2048 tokens over 64 adapters, 30.3-30.5 -> 25.9-26.0 at
                    # 8192 over 4, 39.2-40.0 -> 37.9-38.0 at 8192 over 64, 0.3 us slower at 2048 over 4 (154 ->
                    # 130 registers per thread, kernel_registers.py); rank 16 within 1.2 us either way.
                    def body(k, carry):
                        block(k, load_b(k))
                        return carry

                    lax.fori_loop(0, o_blocks, body, 0)

            if not in_place:  # rank-0 tiles: zero rows (in place, their rows are neither read nor written)
                @pl.when((ng >= starts[ii]) & (ng < starts[ii + 1]) & (rank == 0))
                def _(o_ref=o_ref, n0_of=n0_of):
                    for k in range(o_blocks):
                        o_ref[toks, pl.ds(n0_of(k), block_n)] = jnp.zeros((block_m, block_n), o_ref.dtype)


def seg_delta_block_n(out_dims: list[int]) -> int:
    """Default O-block of the segment delta: 256 columns, or the largest power of two dividing every O."""
    return min(_common.largest_pow2_divisor(o, 256) for o in out_dims)


def _seg_call(out_dtype, h_partials, b_slices, ys, tiles, block_n, o_blocks, num_warps, num_stages, interpret):
    t = h_partials.shape[2]
    block_m = tiles.tokens.shape[1]
    out_dims = [b.shape[2] for b in b_slices]
    block_n, starts = _multi_blocks(out_dims, b_slices[0].shape[1], block_n or seg_delta_block_n(out_dims))
    if any(s % o_blocks for s in starts):
        raise ValueError(f"o_blocks={o_blocks} must divide every slice's O-blocks of {block_n} columns "
                         f"(O = {out_dims})")
    in_place = ys is not None
    kernel = functools.partial(_seg_multi_kernel, block_m=block_m, block_n=block_n, o_blocks=o_blocks,
                               starts=tuple(s // o_blocks for s in starts), in_place=in_place)
    args = _common.match_vma(*tiles, h_partials, *b_slices, *(ys or ()))
    n = len(b_slices)
    return tuple(pl.pallas_call(
        kernel,
        out_shape=tuple(_common.out_struct((t, o), out_dtype, *args) for o in out_dims),
        grid=(tiles.length.shape[0], starts[-1] // o_blocks),
        input_output_aliases={5 + n + i: i for i in range(n)} if in_place else {},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="lora_seg_expand_multi" if in_place else "lora_seg_delta_multi",
    )(*args))


def seg_delta_multi(out_dtype, h_partials, b_slices, tiles, *, block_n=None, o_blocks=1, num_warps=4,
                    num_stages=2, interpret=False):
    """Segment-form LoRA deltas of several slices in one launch: d_i[t] = h_i[t, :rank] @ b_i[slot[t], :rank].

    Args:
      out_dtype: the deltas' dtype (the base outputs').
      h_partials: [n, n_split, T, R] f32 (``seg_shrink_partials_multi``); b_slices: tuple of n [S, R, O_i]
        banks (same R >= 16); tiles: the shrink's ``_common.SegmentTiles``.
      block_n: columns of O per dot (default ``seg_delta_block_n``).
      o_blocks: O-blocks per program (it loads h once for all of them); must divide every slice's count.

    Returns:
      tuple of d_i: [T, O_i] in out_dtype (zero rows for rank-0 tokens). h is rounded to B's dtype before the
      tensor-core dot, as PEFT rounds it to the model's dtype.
    """
    return _seg_call(out_dtype, h_partials, b_slices, None, tiles, block_n, o_blocks, num_warps, num_stages,
                     interpret)


def seg_expand_multi(ys, h_partials, b_slices, tiles, *, block_n=None, o_blocks=1, num_warps=4, num_stages=2,
                     interpret=False):
    """Segment-form expand of several slices in one launch, in place: y_i[t] += h_i[t, :rank] @ b_i[slot, :rank].

    Args:
      ys: tuple of n base outputs [T, O_i] (one dtype); other arguments as in ``seg_delta_multi``.

    Returns:
      tuple of y_out[i]: [T, O_i] (each aliases ys[i]: donate them to update in place). Rows of rank-0 tokens
      are neither read nor written.
    """
    dtypes = {y.dtype for y in ys}
    if len(dtypes) != 1:
        raise ValueError(f"the outputs of one segment expand need one dtype, got {sorted(map(str, dtypes))}")
    return _seg_call(ys[0].dtype, h_partials, b_slices, tuple(ys), tiles, block_n, o_blocks, num_warps,
                     num_stages, interpret)
