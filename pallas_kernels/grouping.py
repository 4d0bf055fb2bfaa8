"""Token grouping for the segment kernels: tokens by slot, in tiles of at most ``block_m`` tokens of one slot.

``ref_segment_tiles`` is the jnp twin (an XLA sort and scatters); ``segment_tiles_triton`` builds the same
``_common.SegmentTiles`` in one Pallas Triton launch without a sort: a counting sort, each slot's tokens
counted and scattered by its own programs (one per share of the tokens). On the H200 the XLA sort alone took
~30 us at 8192 tokens (RESULTS.md, "Kernels"), several times the LoRA kernels' own time at 2048 tokens.

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
                          chunk, span, part, part_chunk):
    # slot_ref [T], rank_ref [S]; outputs: tok_ref [N * BM] (flat), len_ref/tslot_ref/trank_ref [N].
    # Program (s, p): counts slot s's tokens over all T, then scatters those among tokens [p * part, (p + 1) *
    # part); program (s, 0) also writes the slot's tile metadata and padding rows.
    s, p = pl.program_id(0), pl.program_id(1)
    num_slots = rank_ref.shape[0]
    # Masked-off lanes of a store point past the end: Triton never touches them, and the Pallas interpreter
    # (which stores where(mask, new, old) at every lane's index) drops out-of-bounds writes, where an
    # in-bounds dummy index could overwrite a live lane's value.
    tok_out, tile_out = tok_ref.shape[0], len_ref.shape[0]
    part0 = p * part

    def ids_at(start, size):
        idx = start + lax.broadcasted_iota(jnp.int32, (size,), 0)
        ok = idx < num_tokens
        ids = plgpu.load(slot_ref.at[jnp.where(ok, idx, 0)], mask=ok, other=num_slots)  # past T: no slot
        return idx, ids

    def count(c, carry):
        before, mine, last, seen = carry
        idx, ids = ids_at(c * chunk, chunk)
        m = ids == s
        return (before + jnp.sum((ids < s).astype(jnp.int32)), mine + jnp.sum(m.astype(jnp.int32)),
                jnp.maximum(last, jnp.max(jnp.where(m, idx, -1))),
                seen + jnp.sum((m & (idx < part0)).astype(jnp.int32)))

    zero = jnp.int32(0)
    before, n, last, seen = lax.fori_loop(0, -(-num_tokens // chunk), count, (zero, zero, jnp.int32(-1), zero))
    base = lax.div(before, block_m) + s  # first tile of this slot
    n_live = lax.div(n + block_m - 1, block_m)
    n_span = lax.div(before + n, block_m) + s + 1 - base  # n_live or n_live + 1 tiles

    def scatter(c, seen):
        idx, ids = ids_at(part0 + c * part_chunk, part_chunk)
        m = (ids == s) & (idx < part0 + part)
        pos = seen + jnp.cumsum(m.astype(jnp.int32)) - 1  # position among the slot's tokens (stable)
        plgpu.store(tok_ref.at[jnp.where(m, base * block_m + pos, tok_out)], idx, mask=m)
        return seen + jnp.sum(m.astype(jnp.int32))

    lax.fori_loop(0, -(-part // part_chunk), scatter, seen)
    first = p == 0
    r = lax.broadcasted_iota(jnp.int32, (block_m,), 0)
    pad = ((n + r) < n_live * block_m) & first  # the last live tile's rows past its length repeat its last token
    plgpu.store(tok_ref.at[jnp.where(pad, base * block_m + n + r, tok_out)], jnp.full((block_m,), last),
                mask=pad)
    empty = jnp.broadcast_to((n_span > n_live) & first, (block_m,))  # the slot's empty tile: token 0 in every row
    plgpu.store(tok_ref.at[jnp.where(empty, (base + n_live) * block_m + r, tok_out)],
                jnp.zeros((block_m,), jnp.int32), mask=empty)
    j = lax.broadcasted_iota(jnp.int32, (span,), 0)
    mine = (j < n_span) & first
    live = j < n_live
    at = jnp.where(mine, base + j, tile_out)
    plgpu.store(len_ref.at[at], jnp.where(live, jnp.minimum(block_m, n - j * block_m), 0), mask=mine)
    plgpu.store(tslot_ref.at[at], jnp.where(live, s, 0), mask=mine)
    plgpu.store(trank_ref.at[at], jnp.where(live, rank_ref[s], 0), mask=mine)


# Programs per slot (``segment_tiles_triton``'s ``parts``): one per GROUPING_PART_TOKENS tokens, with at most
# GROUPING_PROGRAMS programs in all (one wave on the H200's 132 SMs: every program reads all T ids again).
# H200, twenty-fifth session (benchmarks/RESULTS.md, ``grouping_profile.py``), device us for parts = 1 / 2 / 4 /
# 8 / 16: 8192 tokens over 5 slots 4.4 / 3.5 / 2.8 / 3.0 / 3.1, over 65 slots 4.6 / 3.8 / 4.0 / 5.4 / 8.3; 2048
# over 5 slots 1.9 / 1.7 / 1.6 / 1.5 / 1.6. The prefill op (``kernels.py``, wall us) with these defaults against
# one program per slot: 8192 tokens over 4 adapters 48.7-49.1 against 50.9 (r = 16) and 57.0-57.2 against
# 58.5-58.9 (r = 64); over 64 adapters (2 parts) and at 2048 tokens (1 part) within 1 us either way.
GROUPING_PART_TOKENS = 2048
GROUPING_PROGRAMS = 132


def segment_tiles_triton(slot_ids, ranks, block_m: int, *, chunk: int | None = None, num_warps: int | None = None,
                         parts: int | None = None, interpret: bool = False) -> _common.SegmentTiles:
    """``ref_segment_tiles`` as one Pallas Triton launch (a counting sort; grid: slots x parts).

    Args:
      slot_ids: [T] int32 in [0, S); ranks: [S] int32; block_m: rows per tile.
      chunk: slot ids read per step of the counting pass (a power of two; default: all T up to 8192, so a
        program's pass over the ids is one step: its latency is the loop's, not the bytes').
      num_warps: default 8 from 4096-id chunks, else 4.
      parts: programs per slot (default: ceil(T / ``GROUPING_PART_TOKENS``), at most ``GROUPING_PROGRAMS`` // S).
        Each counts its slot's tokens over all T, then scatters those among its own T / parts tokens.

    Each program reads all T slot ids (L2-resident) and writes only its own slot's tiles. On the H200
    (``benchmarks/grouping_profile.py``), one program per slot: 4.4 us at 8192 tokens over 5 slots (1024-id
    chunks and 4 warps: 9.8 us), 1.9 us at 2048; 4 programs per slot at 8192: 2.8 us; the XLA twin 57 and 27 us.
    """
    t, num_slots = slot_ids.shape[0], ranks.shape[0]
    n_tiles = _common.max_segment_tiles(t, num_slots, block_m)
    chunk = chunk or min(8192, _next_pow2(t))
    parts = parts or max(1, min(-(-t // GROUPING_PART_TOKENS), GROUPING_PROGRAMS // num_slots))
    part = -(-t // parts)
    part_chunk = min(chunk, _next_pow2(part))
    num_warps = num_warps or (8 if chunk >= 4096 else 4)
    span = _next_pow2(-(-t // block_m) + 1)  # a slot's tiles: at most ceil(T / BM) live + one empty
    kernel = functools.partial(_segment_tiles_kernel, num_tokens=t, block_m=block_m, chunk=chunk, span=span,
                               part=part, part_chunk=part_chunk)
    args = _common.match_vma(slot_ids.astype(jnp.int32), ranks.astype(jnp.int32))
    i32 = jnp.int32
    tokens, length, slot, rank = pl.pallas_call(
        kernel,
        out_shape=(_common.out_struct((n_tiles * block_m,), i32, *args),
                   *(_common.out_struct((n_tiles,), i32, *args) for _ in range(3))),
        grid=(num_slots, parts),
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

