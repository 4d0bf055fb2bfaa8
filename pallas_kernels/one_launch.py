"""The decode-form LoRA op (shrink + in-place expand) as one launch: two phases of one 1-D grid.

``lora_shrink_expand``'s decode form is two launches, and the expand waits for the whole shrink kernel and
the gap between the launches (1.7-2.9 us per op on the H200 at issue 4's 256-token and rank-64 shapes),
although each expand program needs only its own token's partial sums. Here:

* programs ``[0, P1)`` are the shrink's (token, H-slice) items (``shrink._shrink_token``, with the one-op
  defaults: ~256 programs, ``spec_load``). Each stores its partial sum, then increments its token's counter
  with an atomic (acquire-release, GPU scope) after a barrier over the program's threads;
* programs ``[P1, P1 + P2)`` are the expand's (token, O-block) items. Each loads its token's slot, rank, its
  block of ``B[slot]`` and of y first, then spins on the token's counter until all ``n_split`` partials are
  in, sums them (volatile loads: from L2, never a stale L1 line) and writes y + h @ B in place.

Deadlock freedom: only expand programs wait, and only for shrink programs, which never wait; NVIDIA GPUs
dispatch a grid's blocks in increasing linear index, so every shrink program is running or done before the
first expand program is dispatched. (The interpreter runs the programs in order, one at a time.) The counters
start at zero: the wrapper passes a fresh zero array aliased to an output. Rank-0 tokens: the shrink items
load nothing, the expand items neither wait nor touch y.

The tenth session measured the same protocol for the decode step's multi-slice deltas: slower than two
launches from 4-8 tokens. This is the one-op form, for the issue's kernel shapes (sixteenth session).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common, expand, shrink


def _kernel(slot_ref, rank_ref, x_ref, a_ref, b_ref, y_ref, count_in, o_ref, part_ref, count_ref, *, n_tokens,
            n_split, block_k, k_per_split, block_n, spec_load, interpret):
    # x_ref [T, H], a_ref [S, H, R], b_ref [S, R, O], y_ref / o_ref [T, O] (aliased), count_in / count_ref [T]
    # int32 (aliased, zero on entry), part_ref [n_split, T, R] f32 (written and read here)
    del y_ref, count_in  # aliased to o_ref and count_ref
    r_max = a_ref.shape[2]
    p = pl.program_id(0)
    n_shrink = n_tokens * n_split

    @pl.when(p < n_shrink)
    def _():
        t = p % n_tokens
        sp = p // n_tokens
        part_ref[sp, t, :] = shrink._shrink_token(t, sp, slot_ref, rank_ref, x_ref, a_ref, block_k=block_k,
                                                  k_per_split=k_per_split, spec_load=spec_load)[0]
        if not interpret:  # (the interpreter runs a program as one thread: no barrier to lower)
            plgpu.debug_barrier()  # every thread's store is issued before the release below
        plgpu.atomic_add(count_ref, (t,), t * 0 + 1)

    @pl.when(p >= n_shrink)
    def _():
        q = p - n_shrink
        t = q % n_tokens
        n0 = pl.multiple_of((q // n_tokens) * block_n, block_n)
        s = slot_ref[t]
        rank = rank_ref[s]
        rows = lax.broadcasted_iota(jnp.int32, (r_max,), 0)
        live = lax.broadcasted_iota(jnp.int32, (r_max, block_n), 0) < rank

        @pl.when(rank > 0)
        def _():
            # B's and y's blocks do not depend on the shrink: issue them before waiting
            bv = plgpu.load(b_ref.at[s, :, pl.ds(n0, block_n)], mask=live, other=0)
            yv = o_ref[t, pl.ds(n0, block_n)].astype(jnp.float32)
            # spin until the token's n_split partials are in (reads by atomic add of 0; index and value traced,
            # not constants: the interpreter's loop discharge needs that)
            idx = (t,)
            lax.while_loop(lambda c: c < n_split, lambda c: plgpu.atomic_add(count_ref, idx, c * 0),
                           plgpu.atomic_add(count_ref, idx, t * 0))
            hv = jnp.sum(plgpu.load(part_ref.at[:, t, :], volatile=True), axis=0)  # [R]
            hv = jnp.where(rows < rank, hv, 0.0)
            out = yv + jnp.sum(hv[:, None] * bv.astype(jnp.float32), axis=0)
            o_ref[t, pl.ds(n0, block_n)] = out.astype(o_ref.dtype)


def lora_one_launch(y, x, a, b, slot_ids, ranks, *, block_k=None, n_split=None, block_n=None, num_warps=4,
                    num_stages=2, spec_load=None, programs=shrink.BGMV_PROGRAMS, interpret=False):
    """y + (x @ A[slot])[:, :rank] @ B[slot][:rank] in one launch (decode form, in place).

    Args:
      y: [T, O]; x: [T, H]; a: [S, H, R]; b: [S, R, O] (R a power of two); slot_ids: [T] int32; ranks: [S].
      block_k, n_split, spec_load, programs: the shrink phase's, as in ``shrink.bgmv_shrink_partials``.
      block_n: the expand phase's O-block (default as ``expand.bgmv_expand``).

    Returns:
      (y_out, h_partials): y_out [T, O] in y.dtype (aliases y), and the [n_split, T, R] float32 partials.
    """
    t, hidden = x.shape
    o = y.shape[1]
    r_max = a.shape[2]
    dk, dn = shrink.bgmv_block_sizes(t, hidden, r_max, programs)
    block_k, n_split = block_k or dk, n_split or dn
    if hidden % (block_k * n_split):
        raise ValueError(f"H={hidden} must be divisible by block_k*n_split={block_k * n_split}")
    block_n = block_n or expand.bgmv_expand_block_n(o, r_max)
    if o % block_n:
        raise ValueError(f"O={o} must be divisible by block_n={block_n}")
    if spec_load is None:
        spec_load = r_max * jnp.dtype(a.dtype).itemsize <= 32
    kernel = functools.partial(_kernel, n_tokens=t, n_split=n_split, block_k=block_k, k_per_split=hidden // n_split,
                               block_n=block_n, spec_load=spec_load, interpret=interpret)
    counts = jnp.zeros((t,), jnp.int32)
    args = _common.match_vma(slot_ids.astype(jnp.int32), ranks.astype(jnp.int32), x, a, b, y, counts)
    out, hp, _ = pl.pallas_call(
        kernel,
        out_shape=(_common.out_struct(y.shape, y.dtype, *args),
                   _common.out_struct((n_split, t, r_max), jnp.float32, *args),
                   _common.out_struct((t,), jnp.int32, *args)),
        grid=(t * n_split + t * (o // block_n),),
        input_output_aliases={5: 0, 6: 2},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="lora_one_launch",
    )(*args)
    return out, hp
