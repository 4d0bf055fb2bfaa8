"""Shared pieces of the LoRA kernels: input validation, masking and token grouping.

Layouts (fixed by the model code):
  x        [T, H]     activations, tokens in any order
  a        [S, H, R]  stacked LoRA A (shrink) matrices, slot 0 is the all-zero adapter
  b        [S, R, O]  stacked LoRA B (expand) matrices, scaling folded in
  ranks    [S] int32  true rank of each slot (0 for slot 0 and empty slots)
  slot_ids [T] int32  slot of each token, in [0, S)

Columns >= rank of ``a[s]`` and rows >= rank of ``b[s]`` are padding and may hold anything (NaN included);
every implementation here masks them before they touch an output.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def _shape_error(name: str, got, want: str) -> ValueError:
    return ValueError(f"{name} has shape {tuple(got)}, expected {want}")


def check_bank(a_or_b, ranks, name: str) -> None:
    """Validates a stacked adapter tensor and its rank vector (shapes and dtypes only; jit-safe)."""
    if a_or_b.ndim != 3:
        raise _shape_error(name, a_or_b.shape, "a rank-3 stacked adapter tensor")
    if ranks.ndim != 1 or ranks.shape[0] != a_or_b.shape[0]:
        raise _shape_error("ranks", ranks.shape, f"[S] with S={a_or_b.shape[0]} (slots of {name})")
    if not jnp.issubdtype(ranks.dtype, jnp.integer):
        raise ValueError(f"ranks must be an integer array, got {ranks.dtype}")


def check_slot_ids(slot_ids, num_tokens: int) -> None:
    if slot_ids.ndim != 1 or slot_ids.shape[0] != num_tokens:
        raise _shape_error("slot_ids", slot_ids.shape, f"[T] with T={num_tokens}")
    if not jnp.issubdtype(slot_ids.dtype, jnp.integer):
        raise ValueError(f"slot_ids must be an integer array, got {slot_ids.dtype}")


def check_shrink_args(x, a, slot_ids, ranks) -> None:
    """Validates the arguments of a shrink: x [T, H], a [S, H, R], slot_ids [T], ranks [S]."""
    if x.ndim != 2:
        raise _shape_error("x", x.shape, "[T, H]")
    check_bank(a, ranks, "a")
    if a.shape[1] != x.shape[1]:
        raise _shape_error("a", a.shape, f"[S, H, R] with H={x.shape[1]} (x's hidden size)")
    check_slot_ids(slot_ids, x.shape[0])


def check_expand_args(y, h, b, slot_ids, ranks) -> None:
    """Validates the arguments of an expand: y [T, O], h [T, R], b [S, R, O], slot_ids [T], ranks [S]."""
    if y.ndim != 2:
        raise _shape_error("y", y.shape, "[T, O]")
    if h.ndim != 2 or h.shape[0] != y.shape[0]:
        raise _shape_error("h", h.shape, f"[T, R] with T={y.shape[0]}")
    check_bank(b, ranks, "b")
    if b.shape[1] != h.shape[1] or b.shape[2] != y.shape[1]:
        raise _shape_error("b", b.shape, f"[S, R, O] with R={h.shape[1]}, O={y.shape[1]}")
    check_slot_ids(slot_ids, y.shape[0])


def token_ranks(slot_ids, ranks):
    """Rank of each token's adapter, [T] int32; out-of-range slot ids count as rank 0."""
    s = ranks.shape[0]
    ok = (slot_ids >= 0) & (slot_ids < s)
    return jnp.where(ok, ranks[jnp.clip(slot_ids, 0, s - 1)], 0).astype(jnp.int32)


def masked_bank_a(a, ranks):
    """a [S, H, R] with columns >= rank zeroed (NaN padding removed)."""
    keep = jnp.arange(a.shape[2])[None, None, :] < ranks[:, None, None]
    return jnp.where(keep, a, jnp.zeros((), a.dtype))


def masked_bank_b(b, ranks):
    """b [S, R, O] with rows >= rank zeroed (NaN padding removed)."""
    keep = jnp.arange(b.shape[1])[None, :, None] < ranks[:, None, None]
    return jnp.where(keep, b, jnp.zeros((), b.dtype))


class SegmentTiles(NamedTuple):
    """Tokens sorted by slot and cut into tiles of at most ``block_m`` tokens of one slot (``grouping``).

    Everything a segment kernel's program needs is one independent load from these arrays (no chain of
    dependent loads: position -> token -> slot -> rank).

    Attributes:
      tokens: [N, block_m] int32, the token of each row of each tile; rows past the tile's length repeat its
        last token (their results equal that row's, so storing them is harmless).
      length: [N] int32, tokens in each tile (0 for an empty tile; see ``grouping`` for the layout).
      slot: [N] int32, the tile's slot.
      rank: [N] int32, the rank of the tile's slot (0 for unused tiles).
    """

    tokens: jax.Array
    length: jax.Array
    slot: jax.Array
    rank: jax.Array


def max_segment_tiles(num_tokens: int, num_slots: int, block_m: int) -> int:
    """Tiles of ``grouping.ref_segment_tiles`` (a static count): slot s owns the tiles from
    (tokens of slots < s) // block_m + s, which puts the end of the last slot's range at T // block_m + S."""
    return num_tokens // block_m + num_slots


def compact_segment_tiles(tiles: SegmentTiles, num_tiles: int) -> SegmentTiles:
    """The live tiles (length > 0) first, in their order, and only the first ``num_tiles`` kept.

    A batch of T tokens over P distinct slots fills at most T // block_m + P tiles (each slot's last tile may be
    partial), but the grouping lays out T // block_m + S (S = the bank's slots; ``max_segment_tiles``), and every
    tile, empty or not, is a program in each segment kernel's grid. For a batch known to hold at most P slots,
    ``num_tiles = T // block_m + P`` keeps every live tile and drops only empty ones. Cutting below the live
    count would drop tokens: the caller guarantees the bound.
    """
    if num_tiles >= tiles.length.shape[0]:
        return tiles
    order = jnp.argsort((tiles.length == 0).astype(jnp.int32), stable=True)[:num_tiles]
    return SegmentTiles(*(a[order] for a in tiles))


def largest_pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two that divides n and is <= cap (1 if n is odd)."""
    d = 1
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


def is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def default_platform() -> str:
    return jax.default_backend()


def out_struct(shape, dtype, *inputs) -> jax.ShapeDtypeStruct:
    """Output spec of a pallas_call that also works inside ``jax.shard_map`` (with check_vma).

    The output varies over the union of the mesh axes its inputs vary over (outside shard_map: none).
    """
    varying = frozenset()
    for v in inputs:
        mat = getattr(jax.typeof(v), "manual_axis_type", None)
        if mat is not None:
            varying |= frozenset(mat.varying)
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=varying))


def match_vma(*arrays):
    """Casts arrays to vary over the union of their mesh axes (a no-op outside shard_map)."""
    sets = [frozenset(getattr(jax.typeof(v), "manual_axis_type", None).varying)
            if getattr(jax.typeof(v), "manual_axis_type", None) is not None else frozenset() for v in arrays]
    union = frozenset().union(*sets)
    out = []
    for v, s in zip(arrays, sets):
        missing = tuple(sorted(union - s))
        out.append(jax.lax.pcast(v, missing, to="varying") if missing else v)
    return tuple(out)
