"""LoRA deltas of several slices in one launch: the decode-form shrink and delta kernels as two phases of one grid.

``bgmv_shrink_partials_multi`` + ``bgmv_delta_multi`` are two launches: every delta program waits for the
whole shrink kernel to finish (and for the launch in between), although it needs only its own token's
partial sums. ``bgmv_one_launch_delta_multi`` runs both as one 1-D grid:

* programs ``[0, P1)`` are the shrink's (token, H-slice, slice) work items. Each stores its partial sum of
  ``x[t] @ A[slot]`` over its H-slice, then increments the counter of its (slice, token) with an atomic
  (acquire-release, GPU scope) after a barrier over the program's threads;
* programs ``[P1, P1 + P2)`` are the delta's (token, O-block) items. Each loads its token's slot, rank and
  its block of ``B[slot]`` first, then spins on the (slice, token) counter until all ``n_split`` partials
  are in, sums them (volatile loads: from L2, never a stale L1 line) and writes ``h @ B`` for its block.

Deadlock freedom: only delta programs wait, and only for shrink programs, which never wait. NVIDIA GPUs
dispatch the blocks of a grid in increasing linear index, so every shrink program is running or done before
the first delta program is dispatched, and the waits end. (The interpreter runs the programs in the same
order, one at a time, so the CPU tests exercise the same protocol.) The counters start at zero: the wrapper
passes a fresh zero array aliased to an output.

Rank-0 tokens (slot 0, empty slots): shrink items store zero partials and load nothing; delta items write
zeros without waiting.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common, expand, shrink


def _kernel(slot_ref, rank_ref, x_ref, *refs, n_slices, n_tokens, n_split, block_k, k_per_split, block_n,
            starts, interpret):
    # refs: n a_refs [S, H, R], n b_refs [S, R, O_i], count_in (aliased to count_ref), then the outputs: n
    # deltas d_i [T, O_i], part_ref [n, n_split, T, R] f32 (the partial sums, written and read here), and
    # count_ref [n, T] int32 (zero on entry).
    a_refs, b_refs = refs[:n_slices], refs[n_slices:2 * n_slices]
    d_refs = refs[2 * n_slices + 1:3 * n_slices + 1]
    part_ref, count_ref = refs[3 * n_slices + 1:]
    r_max = a_refs[0].shape[2]
    p = pl.program_id(0)
    n_shrink = n_tokens * n_split * n_slices

    @pl.when(p < n_shrink)
    def _():
        t = p % n_tokens
        sp = (p // n_tokens) % n_split
        j = p // (n_tokens * n_split)
        for i in range(n_slices):
            @pl.when(j == i)
            def _(i=i):
                # (zero for a rank-0 token, which loads nothing: the partials are defined for every row)
                part_ref[i, sp, t, :] = shrink._shrink_token(t, sp, slot_ref, rank_ref, x_ref, a_refs[i],
                                                             block_k=block_k, k_per_split=k_per_split)
                if not interpret:  # (the interpreter runs a program as one thread: no barrier to lower)
                    plgpu.debug_barrier()  # every thread's store is issued before the release below
                plgpu.atomic_add(count_ref, (t * 0 + i, t), t * 0 + 1)

    @pl.when(p >= n_shrink)
    def _():
        q = p - n_shrink
        t = q % n_tokens
        nb = q // n_tokens
        s = slot_ref[t]
        rank = rank_ref[s]
        rows = lax.broadcasted_iota(jnp.int32, (r_max,), 0)
        live = lax.broadcasted_iota(jnp.int32, (r_max, block_n), 0) < rank
        for i in range(n_slices):
            @pl.when((nb >= starts[i]) & (nb < starts[i + 1]))
            def _(i=i):
                n0 = pl.multiple_of((nb - starts[i]) * block_n, block_n)

                def delta():
                    # B's block does not depend on the shrink: issue it before waiting
                    bv = plgpu.load(b_refs[i].at[s, :, pl.ds(n0, block_n)], mask=live, other=0)
                    # spin until the n_split partials of (slice i, token t) are in (reads by atomic add of 0;
                    # index and value traced, not constants: the interpreter's loop discharge needs that)
                    idx = (t * 0 + i, t)
                    lax.while_loop(lambda c: c < n_split, lambda c: plgpu.atomic_add(count_ref, idx, c * 0),
                                   plgpu.atomic_add(count_ref, idx, t * 0))
                    hv = jnp.sum(plgpu.load(part_ref.at[idx[0], :, t, :], volatile=True), axis=0)  # [R]
                    hv = jnp.where(rows < rank, hv, 0.0)
                    return jnp.sum(hv[:, None] * bv.astype(jnp.float32), axis=0)

                d = lax.cond(rank > 0, delta, lambda: jnp.zeros((block_n,), jnp.float32))
                d_refs[i][t, pl.ds(n0, block_n)] = d.astype(d_refs[i].dtype)


def bgmv_one_launch_delta_multi(out_dtype, x, a_slices, b_slices, slot_ids, ranks, *, block_k=None, n_split=None,
                                block_n=None, num_warps=4, num_stages=2, interpret=False):
    """Decode-form LoRA deltas of slices sharing x, shrink and delta in one launch.

    Args:
      out_dtype: the deltas' dtype.
      x: [T, H]; a_slices: tuple of n [S, H, R] banks; b_slices: tuple of n [S, R, O_i] banks (same R, a
        power of two); slot_ids: [T] int32; ranks: [S] int32.
      block_k, n_split: the shrink's H-chunk and H-slices (defaults as ``bgmv_shrink_partials_multi``).
      block_n: the delta's O-block (default as ``bgmv_delta_multi``).

    Returns:
      (deltas, h_partials): tuple of d_i [T, O_i] in out_dtype (zero rows for rank-0 tokens), and the
      [n, n_split, T, R] float32 partial sums (as ``bgmv_shrink_partials_multi``'s).
    """
    t, hidden = x.shape
    n = len(a_slices)
    r_max = a_slices[0].shape[2]
    dk, dn = shrink.bgmv_block_sizes(t * n, hidden, r_max)
    block_k, n_split = block_k or dk, n_split or dn
    if hidden % (block_k * n_split):
        raise ValueError(f"H={hidden} must be divisible by block_k*n_split={block_k * n_split}")
    block_n, starts = expand._multi_blocks([b.shape[2] for b in b_slices], r_max, block_n)
    kernel = functools.partial(_kernel, n_slices=n, n_tokens=t, n_split=n_split, block_k=block_k,
                               k_per_split=hidden // n_split, block_n=block_n, starts=starts,
                               interpret=interpret)
    counts = jnp.zeros((n, t), jnp.int32)
    args = _common.match_vma(slot_ids.astype(jnp.int32), ranks.astype(jnp.int32), x, *a_slices, *b_slices, counts)
    outs = pl.pallas_call(
        kernel,
        out_shape=(*(_common.out_struct((t, b.shape[2]), out_dtype, *args) for b in b_slices),
                   _common.out_struct((n, n_split, t, r_max), jnp.float32, *args),
                   _common.out_struct((n, t), jnp.int32, *args)),
        grid=(t * n_split * n + t * starts[-1],),
        input_output_aliases={3 + 2 * n: n + 1},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="lora_bgmv_one_launch_delta",
    )(*args)
    return tuple(outs[:n]), outs[n]
