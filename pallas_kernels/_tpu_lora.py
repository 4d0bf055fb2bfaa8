"""LoRA shrink/expand kernels for TPU (Mosaic TPU through ``pltpu``).

Decode form (BGMV) for every shape: the slot ids and ranks are scalar-prefetched into SMEM and the adapter
blocks are gathered by the BlockSpec index maps (``A[slot[t]]``, ``B[slot[t]]``), so the pipeline DMAs exactly
the blocks each token needs. Block shapes follow Mosaic's (8, 128) rule: H and O must be multiples of 128; R
is always a full dimension. A rank-0 token skips its compute (its DMAs still run: the pipeline is static).

Not tuned on hardware (no TPU was available to this project): a grouped (SGMV/megablox-style) prefill form is
the next step for TPU.
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


def _shrink_kernel(slot_ref, rank_ref, x_ref, a_ref, h_ref):
    # x_ref: [1, 1, BK]; a_ref: [1, BK, R]; h_ref: [1, 1, R] f32, accumulated over the k grid axis
    t = pl.program_id(0)
    k = pl.program_id(1)
    rank = rank_ref[slot_ref[t]]

    @pl.when(k == 0)
    def _():
        h_ref[...] = jnp.zeros_like(h_ref)

    @pl.when(rank > 0)
    def _():
        av = a_ref[0]  # [BK, R]
        cols = lax.broadcasted_iota(jnp.int32, av.shape, 1)
        av = jnp.where(cols < rank, av, jnp.zeros((), av.dtype))
        h_ref[0] += jnp.dot(x_ref[0], av, preferred_element_type=jnp.float32)


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


