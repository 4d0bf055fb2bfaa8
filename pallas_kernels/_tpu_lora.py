"""LoRA shrink/expand kernels for TPU (Mosaic TPU through ``pltpu``).

Decode form (BGMV): the slot ids and ranks are scalar-prefetched into SMEM and the adapter blocks are
gathered by the BlockSpec index maps (``A[slot[t]]``, ``B[slot[t]]``), so the pipeline DMAs exactly the
blocks each token needs. Block shapes follow Mosaic's (8, 128) rule: H and O must be multiples of 128; R is
always a full dimension. A rank-0 token skips its compute (its DMAs still run: the pipeline is static).

Segment form (the grouped prefill form, megablox-style): the tokens' tiles (``grouping.ref_segment_tiles``,
128 rows of one slot each) are gathered into tile order by XLA, each (tile, block) program runs one MXU dot
against the tile's adapter (scalar-prefetched slot in the index map), and the results go back to token
order by one XLA scatter. Costs an extra pass over x and y for the gathers.

Not tuned on hardware (no TPU was available to this project); tested in the TPU interpreter only.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _common


def _interpret_arg(interpret: bool):
    return pltpu.InterpretParams() if interpret else False


def _tpu_block(dim: int, cap: int) -> int:
    """Largest multiple of 128 that divides dim and is <= cap."""
    best = 128
    for b in range(128, min(dim, cap) + 1, 128):
        if dim % b == 0:
            best = b
    return best


def _accumulate_shrink(k, rank, x_ref, a_ref, h_ref, rows):
    """h_ref[rows] += x_ref[rows] @ a_ref[0][:, :rank] over the k grid axis (zeroed at k == 0; rank 0 adds
    nothing). ``rows``: 0 for the decode form's [1, 1, ...] blocks, ``...`` for the segment form's tiles."""
    @pl.when(k == 0)
    def _():
        h_ref[...] = jnp.zeros_like(h_ref)

    @pl.when(rank > 0)
    def _():
        av = a_ref[0]  # [BK, R]
        av = jnp.where(lax.broadcasted_iota(jnp.int32, av.shape, 1) < rank, av, jnp.zeros((), av.dtype))
        h_ref[rows] += jnp.dot(x_ref[rows], av, preferred_element_type=jnp.float32)


def _shrink_kernel(slot_ref, rank_ref, x_ref, a_ref, h_ref):
    # x_ref: [1, 1, BK]; a_ref: [1, BK, R]; h_ref: [1, 1, R] f32, accumulated over the k grid axis
    t = pl.program_id(0)
    k = pl.program_id(1)
    _accumulate_shrink(k, rank_ref[slot_ref[t]], x_ref, a_ref, h_ref, 0)


def tpu_shrink(x, a, slot_ids, ranks, *, block_k=None, interpret=False):
    """Decode-form shrink on TPU.

    Args:
      x: [T, H] (H % 128 == 0); a: [S, H, R]; slot_ids: [T] int32; ranks: [S] int32.

    Returns:
      h: [T, R] float32.
    """
    t, hidden = x.shape
    r_max = a.shape[2]
    block_k = block_k or _tpu_block(hidden, 2048)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(t, hidden // block_k),
        in_specs=[
            pl.BlockSpec((1, 1, block_k), lambda i, k, sl, rk: (i, 0, k)),
            pl.BlockSpec((1, block_k, r_max), lambda i, k, sl, rk: (sl[i], k, 0)),
        ],
        out_specs=pl.BlockSpec((1, 1, r_max), lambda i, k, sl, rk: (i, 0, 0)),
    )
    args = _common.match_vma(slot_ids.astype(jnp.int32), ranks.astype(jnp.int32), x.reshape(t, 1, hidden), a)
    h = pl.pallas_call(
        _shrink_kernel,
        grid_spec=grid_spec,
        out_shape=_common.out_struct((t, 1, r_max), jnp.float32, *args),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=_interpret_arg(interpret),
        name="lora_tpu_shrink",
    )(*args)
    return h.reshape(t, r_max)


def _expand_kernel(slot_ref, rank_ref, h_ref, b_ref, y_ref, o_ref):
    # h_ref: [1, 1, R]; b_ref: [1, R, BN]; y_ref, o_ref: [1, 1, BN]
    t = pl.program_id(0)
    rank = rank_ref[slot_ref[t]]
    bv = b_ref[0]  # [R, BN]
    rows = lax.broadcasted_iota(jnp.int32, bv.shape, 0)
    bv = jnp.where(rows < rank, bv, jnp.zeros((), bv.dtype)).astype(jnp.float32)
    hv = h_ref[0].astype(jnp.float32)  # [1, R]
    hv = jnp.where(lax.broadcasted_iota(jnp.int32, hv.shape, 1) < rank, hv, 0.0)
    delta = jnp.dot(hv, bv, preferred_element_type=jnp.float32)  # [1, BN]
    o_ref[0] = (y_ref[0].astype(jnp.float32) + delta).astype(o_ref.dtype)


def tpu_expand(y, h, b, slot_ids, ranks, *, block_n=None, interpret=False):
    """Decode-form expand on TPU.

    Args:
      y: [T, O] (O % 128 == 0); h: [T, R]; b: [S, R, O]; slot_ids: [T] int32; ranks: [S] int32.

    Returns:
      y_out: [T, O] in y.dtype (aliases y).
    """
    t, o = y.shape
    r_max = b.shape[1]
    block_n = block_n or _tpu_block(o, 2048)
    spec_row = pl.BlockSpec((1, 1, block_n), lambda i, n, sl, rk: (i, 0, n))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(t, o // block_n),
        in_specs=[
            pl.BlockSpec((1, 1, r_max), lambda i, n, sl, rk: (i, 0, 0)),
            pl.BlockSpec((1, r_max, block_n), lambda i, n, sl, rk: (sl[i], 0, n)),
            spec_row,
        ],
        out_specs=spec_row,
    )
    args = _common.match_vma(
        slot_ids.astype(jnp.int32), ranks.astype(jnp.int32), h.reshape(t, 1, r_max), b, y.reshape(t, 1, o)
    )
    out = pl.pallas_call(
        _expand_kernel,
        grid_spec=grid_spec,
        out_shape=_common.out_struct((t, 1, o), y.dtype, *args),
        input_output_aliases={4: 0},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=_interpret_arg(interpret),
        name="lora_tpu_expand",
    )(*args)
    return out.reshape(t, o)




# ----------------------------------------------------------------------------------------------------------
# Segment form (the grouped prefill form): tiles of up to SEGMENT_BLOCK_M tokens of one slot.

SEGMENT_BLOCK_M = 128  # rows per tile: one MXU pass (128 x 128 on v5e; untuned, no TPU here)


def segment_tiles(slot_ids, ranks):
    """The segment tiles for TPU: ``grouping.ref_segment_tiles`` (XLA) with ``SEGMENT_BLOCK_M``-row tiles."""
    from pallas_kernels import grouping

    return grouping.ref_segment_tiles(slot_ids.astype(jnp.int32), ranks.astype(jnp.int32), SEGMENT_BLOCK_M)


def _segment_rows(tiles, num_tokens: int):
    """[N * BM] token of each sorted row; ``num_tokens`` (past the end: scatters drop it) for the rows past a
    tile's length and for empty tiles, so every token is written by exactly one row."""
    live = lax.broadcasted_iota(jnp.int32, tiles.tokens.shape, 1) < tiles.length[:, None]
    return jnp.where(live, tiles.tokens, num_tokens).reshape(-1)


def _seg_shrink_kernel(slot_ref, rank_ref, x_ref, a_ref, h_ref):
    # x_ref: [BM, BK] the tile's rows (sorted); a_ref: [1, BK, R] its slot's A; h_ref: [BM, R] f32 over k
    i, k = pl.program_id(0), pl.program_id(1)
    _accumulate_shrink(k, rank_ref[i], x_ref, a_ref, h_ref, ...)  # rank 0 for an empty tile


def _seg_delta_kernel(slot_ref, rank_ref, h_ref, b_ref, d_ref):
    # h_ref: [BM, R] f32; b_ref: [1, R, BN] the tile's slot's B; d_ref: [BM, BN] = h[:, :rank] @ B[:rank]
    rank = rank_ref[pl.program_id(0)]
    bv = b_ref[0]
    bv = jnp.where(lax.broadcasted_iota(jnp.int32, bv.shape, 0) < rank, bv, jnp.zeros((), bv.dtype))
    hv = h_ref[...]
    hv = jnp.where(lax.broadcasted_iota(jnp.int32, hv.shape, 1) < rank, hv, 0.0)
    # h rounded to B's dtype for the MXU, as the GPU segment kernels and PEFT round it
    d_ref[...] = jnp.dot(hv.astype(bv.dtype), bv, preferred_element_type=jnp.float32).astype(d_ref.dtype)


def _seg_shrink_sorted(xs, a, tiles, block_k, interpret):
    """xs [N * BM, H] (rows in tile order) -> h_sorted [N * BM, R] float32."""
    rows, hidden = xs.shape
    r_max, bm = a.shape[2], tiles.tokens.shape[1]
    block_k = block_k or _tpu_block(hidden, 2048)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(rows // bm, hidden // block_k),
        in_specs=[
            pl.BlockSpec((bm, block_k), lambda i, k, sl, rk: (i, k)),
            pl.BlockSpec((1, block_k, r_max), lambda i, k, sl, rk: (sl[i], k, 0)),
        ],
        out_specs=pl.BlockSpec((bm, r_max), lambda i, k, sl, rk: (i, 0)),
    )
    args = _common.match_vma(tiles.slot, tiles.rank, xs, a)
    return pl.pallas_call(
        _seg_shrink_kernel,
        grid_spec=grid_spec,
        out_shape=_common.out_struct((rows, r_max), jnp.float32, *args),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=_interpret_arg(interpret),
        name="lora_tpu_seg_shrink",
    )(*args)


def _seg_delta_sorted(hs, b, tiles, out_dtype, block_n, interpret):
    """h_sorted [N * BM, R] -> deltas [N * BM, O] in out_dtype (rows in tile order)."""
    rows, r_max = hs.shape
    o, bm = b.shape[2], tiles.tokens.shape[1]
    block_n = block_n or _tpu_block(o, 2048)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(rows // bm, o // block_n),
        in_specs=[
            pl.BlockSpec((bm, r_max), lambda i, n, sl, rk: (i, 0)),
            pl.BlockSpec((1, r_max, block_n), lambda i, n, sl, rk: (sl[i], 0, n)),
        ],
        out_specs=pl.BlockSpec((bm, block_n), lambda i, n, sl, rk: (i, n)),
    )
    args = _common.match_vma(tiles.slot, tiles.rank, hs, b)
    return pl.pallas_call(
        _seg_delta_kernel,
        grid_spec=grid_spec,
        out_shape=_common.out_struct((rows, o), out_dtype, *args),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=_interpret_arg(interpret),
        name="lora_tpu_seg_delta",
    )(*args)


def tpu_seg_shrink(x, a, slot_ids, ranks, *, tiles=None, block_k=None, interpret=False):
    """Segment-form shrink on TPU: rows gathered into tile order by XLA, one MXU dot per (tile, H-block)
    against the tile's adapter, results scattered back to token order.

    Args:
      x: [T, H] (H % 128 == 0); a: [S, H, R]; slot_ids: [T] int32; ranks: [S] int32.
      tiles: ``segment_tiles(slot_ids, ranks)`` (built here when None).

    Returns:
      h: [T, R] float32.
    """
    t = x.shape[0]
    tiles = tiles if tiles is not None else segment_tiles(slot_ids, ranks)
    hs = _seg_shrink_sorted(x[tiles.tokens.reshape(-1)], a, tiles, block_k, interpret)
    return jnp.zeros((t, a.shape[2]), jnp.float32).at[_segment_rows(tiles, t)].set(hs, mode="drop")


def tpu_seg_expand(y, h, b, slot_ids, ranks, *, tiles=None, block_n=None, interpret=False):
    """Segment-form expand on TPU: y[t] + h[t, :rank] @ b[slot, :rank] (h gathered into tile order, one MXU
    dot per (tile, O-block), the tile's rows of y updated by one XLA scatter; rank-0 rows come back as y).

    Args:
      y: [T, O] (O % 128 == 0); h: [T, R]; b: [S, R, O]; slot_ids: [T] int32; ranks: [S] int32.
      tiles: as in ``tpu_seg_shrink``.

    Returns:
      y_out: [T, O] in y.dtype.
    """
    t = y.shape[0]
    tiles = tiles if tiles is not None else segment_tiles(slot_ids, ranks)
    tokens = tiles.tokens.reshape(-1)
    ds = _seg_delta_sorted(h.astype(jnp.float32)[tokens], b, tiles, jnp.float32, block_n, interpret)
    out = (y[tokens].astype(jnp.float32) + ds).astype(y.dtype)
    return y.at[_segment_rows(tiles, t)].set(out, mode="drop")
