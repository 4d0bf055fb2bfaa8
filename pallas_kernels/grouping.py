"""Token grouping for the segment kernels: tokens by slot, in tiles of at most ``block_m`` tokens of one slot.

``ref_segment_tiles`` is the jnp twin (an XLA sort and scatters); ``segment_tiles_triton`` builds the same
``_common.SegmentTiles`` in one Pallas Triton launch without a sort: a counting sort with one program per
slot. On the H200 the XLA sort alone took ~30 us at 8192 tokens (RESULTS.md, "Kernels"), several times the
LoRA kernels' own time at 2048 tokens.

Layout (both versions, equal arrays). With off[s] = tokens of slots < s and n[s] = tokens of slot s, slot s
owns the tiles ``base[s] = off[s] // block_m + s`` up to ``base[s + 1]``: its ceil(n[s] / block_m) live
tiles, then at most one empty one. Every slot's range follows from its own two counts, so each program
writes its tiles without knowing the other slots' counts, and the ranges tile ``[0, T // block_m + S)``
exactly (``_common.max_segment_tiles``). Within a slot tokens keep their order; a live tile's rows past its
length repeat its last token (their results equal that row's, so storing them is harmless). An empty tile has
length 0, slot 0, rank 0 and token 0 in every row; kernels skip it.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common


def ref_segment_tiles(slot_ids, ranks, block_m: int) -> _common.SegmentTiles:
    """Groups tokens by slot into tiles of one slot each (plain XLA: a sort and a few scatters).

    Args:
      slot_ids: [T] int32 slot of each token, in [0, S).
      ranks: [S] int32 rank of each slot.
      block_m: rows per tile.

    Returns:
      ``_common.SegmentTiles`` with ``T // block_m + S`` tiles, laid out as the module docstring says.
    """
    t, num_slots = slot_ids.shape[0], ranks.shape[0]
    n_tiles = _common.max_segment_tiles(t, num_slots, block_m)
    slot_ids = slot_ids.astype(jnp.int32)
    counts = jnp.zeros((num_slots,), jnp.int32).at[slot_ids].add(1)
    off = jnp.cumsum(counts) - counts  # tokens of the slots before each slot
    base = off // block_m + jnp.arange(num_slots, dtype=jnp.int32)
    perm = jnp.argsort(slot_ids, stable=True).astype(jnp.int32)
    sorted_slots = slot_ids[perm]
    within = jnp.arange(t, dtype=jnp.int32) - off[sorted_slots]  # position among its slot's tokens
    tile = base[sorted_slots] + within // block_m
    flat = jnp.zeros((n_tiles * block_m,), jnp.int32).at[tile * block_m + within % block_m].set(perm)
    length = jnp.zeros((n_tiles,), jnp.int32).at[tile].add(1)
    slot = jnp.zeros((n_tiles,), jnp.int32).at[tile].set(sorted_slots)
    rows = jnp.minimum(jnp.arange(block_m, dtype=jnp.int32)[None, :], jnp.maximum(length - 1, 0)[:, None])
    tokens = jnp.take_along_axis(flat.reshape(n_tiles, block_m), rows, axis=1)
    rank = jnp.where(length > 0, ranks.astype(jnp.int32)[slot], 0)
    return _common.SegmentTiles(tokens=tokens, length=length, slot=slot, rank=rank)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _segment_tiles_kernel(slot_ref, rank_ref, tok_ref, len_ref, tslot_ref, trank_ref, *, num_tokens, block_m,
                          chunk, span):
    # slot_ref [T], rank_ref [S]; outputs: tok_ref [N * BM] (flat), len_ref/tslot_ref/trank_ref [N].
    # One program per slot s: count, then scatter, its own tokens.
    s = pl.program_id(0)
    num_slots = rank_ref.shape[0]
    # Masked-off lanes of a store point past the end: Triton never touches them, and the Pallas interpreter
    # (which stores where(mask, new, old) at every lane's index) drops out-of-bounds writes, where an
    # in-bounds dummy index could overwrite a live lane's value.
    tok_out, tile_out = tok_ref.shape[0], len_ref.shape[0]
    lanes = lax.broadcasted_iota(jnp.int32, (chunk,), 0)
    n_chunks = -(-num_tokens // chunk)

    def ids_at(c):
        idx = c * chunk + lanes
        ok = idx < num_tokens
        ids = plgpu.load(slot_ref.at[jnp.where(ok, idx, 0)], mask=ok, other=num_slots)  # past T: no slot
        return idx, ids

    def count(c, carry):
        before, mine, last = carry
        idx, ids = ids_at(c)
        m = ids == s
        return (before + jnp.sum((ids < s).astype(jnp.int32)), mine + jnp.sum(m.astype(jnp.int32)),
                jnp.maximum(last, jnp.max(jnp.where(m, idx, -1))))

    zero = jnp.int32(0)
    before, n, last = lax.fori_loop(0, n_chunks, count, (zero, zero, jnp.int32(-1)))
    base = lax.div(before, block_m) + s  # first tile of this slot
    n_live = lax.div(n + block_m - 1, block_m)
    n_span = lax.div(before + n, block_m) + s + 1 - base  # n_live or n_live + 1 tiles

    def scatter(c, seen):
        idx, ids = ids_at(c)
        m = ids == s
        pos = seen + jnp.cumsum(m.astype(jnp.int32)) - 1  # position among the slot's tokens (stable)
        plgpu.store(tok_ref.at[jnp.where(m, base * block_m + pos, tok_out)], idx, mask=m)
        return seen + jnp.sum(m.astype(jnp.int32))

    lax.fori_loop(0, n_chunks, scatter, zero)
    r = lax.broadcasted_iota(jnp.int32, (block_m,), 0)
    pad = (n + r) < n_live * block_m  # the last live tile's rows past its length repeat its last token
    plgpu.store(tok_ref.at[jnp.where(pad, base * block_m + n + r, tok_out)], jnp.full((block_m,), last),
                mask=pad)
    empty = jnp.broadcast_to(n_span > n_live, (block_m,))  # the slot's empty tile, if any: token 0 in every row
    plgpu.store(tok_ref.at[jnp.where(empty, (base + n_live) * block_m + r, tok_out)],
                jnp.zeros((block_m,), jnp.int32), mask=empty)
    j = lax.broadcasted_iota(jnp.int32, (span,), 0)
    mine = j < n_span
    live = j < n_live
    at = jnp.where(mine, base + j, tile_out)
    plgpu.store(len_ref.at[at], jnp.where(live, jnp.minimum(block_m, n - j * block_m), 0), mask=mine)
    plgpu.store(tslot_ref.at[at], jnp.where(live, s, 0), mask=mine)
    plgpu.store(trank_ref.at[at], jnp.where(live, rank_ref[s], 0), mask=mine)


def segment_tiles_triton(slot_ids, ranks, block_m: int, *, chunk: int | None = None, num_warps: int | None = None,
                         interpret: bool = False) -> _common.SegmentTiles:
    """``ref_segment_tiles`` as one Pallas Triton launch (a counting sort; grid: one program per slot).

    Args:
      slot_ids: [T] int32 in [0, S); ranks: [S] int32; block_m: rows per tile.
      chunk: slot ids read per loop step (a power of two; default: all T up to 8192, so a program's two
        passes over the ids are one step each: its latency is the loop's, not the bytes').
      num_warps: default 8 from 4096-id chunks, else 4.

    Each program reads all T slot ids twice (L2-resident) and writes only its own slot's tiles. On the H200
    (``benchmarks/grouping_profile.py``): 4.3 us at 8192 tokens (1024-id chunks and 4 warps: 9.8 us), 2.2 us
    at 2048; the XLA twin 57 and 28 us.
    """
    t, num_slots = slot_ids.shape[0], ranks.shape[0]
    n_tiles = _common.max_segment_tiles(t, num_slots, block_m)
    chunk = chunk or min(8192, _next_pow2(t))
    num_warps = num_warps or (8 if chunk >= 4096 else 4)
    span = _next_pow2(-(-t // block_m) + 1)  # a slot's tiles: at most ceil(T / BM) live + one empty
    kernel = functools.partial(_segment_tiles_kernel, num_tokens=t, block_m=block_m, chunk=chunk, span=span)
    args = _common.match_vma(slot_ids.astype(jnp.int32), ranks.astype(jnp.int32))
    i32 = jnp.int32
    tokens, length, slot, rank = pl.pallas_call(
        kernel,
        out_shape=(_common.out_struct((n_tiles * block_m,), i32, *args),
                   *(_common.out_struct((n_tiles,), i32, *args) for _ in range(3))),
        grid=(num_slots,),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="lora_segment_tiles",
    )(*args)
    return _common.SegmentTiles(tokens=tokens.reshape(n_tiles, block_m), length=length, slot=slot, rank=rank)


def segment_tiles(slot_ids, ranks, block_m: int, *, backend: str = "triton", interpret: bool = False):
    """The segment tiles through ``backend`` ("triton": the kernel; anything else: the jnp twin)."""
    if backend == "triton":
        return segment_tiles_triton(slot_ids, ranks, block_m, interpret=interpret)
    return ref_segment_tiles(slot_ids, ranks, block_m)

