"""Paged decode attention for grouped-query models: one program per (sequence, KV head), no split combine.

Each program streams its sequence's pages of one KV head once and keeps an online softmax per query head
of the group in registers, then writes the normalised output: the query needs no padding to a 16-row
tensor-core tile (a GQA group is 4 heads for Llama-3) and no partial outputs are combined outside the
kernel. The products are CUDA-core broadcasts and reductions (``q_g * k`` summed over D, ``p_g * v`` summed
over the keys); decode attention is bound by the KV bytes, not by these flops.

It needs enough (sequence x KV head) programs to fill the GPU. Measured on the H200 it was slower than JAX's
split kernel with tuned knobs when summed over short and long contexts (benchmarks/RESULTS.md, "Decode
attention"), so ``jmlora.model.attention`` runs it only where ``DECODE_ATTENTION_TABLE`` says so (by default
nowhere). ``ref_paged_decode_attention`` is its jnp twin.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _common

# A large finite negative (not -inf), so masked keys give exp(...) = 0 and never NaN.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def ref_paged_decode_attention(q, k_pages, v_pages, page_table, lengths, *, sm_scale=None):
    """Reference in jnp: each sequence's query against its first ``lengths[b]`` cached tokens.

    Args:
      q: [B, H, D] queries (H = K * G; query head i reads KV head i // G).
      k_pages, v_pages: [K, num_pages, page_size, D].
      page_table: [B, P] int32 page ids of each sequence, in order.
      lengths: [B] int32 cached tokens per sequence (0: the output row is zeros).
      sm_scale: logit scale, default 1 / sqrt(D).

    Returns:
      [B, H, D] in q's dtype.
    """
    B, H, D = q.shape
    K, _, page_size, _ = k_pages.shape
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    k = k_pages[:, page_table].reshape(K, B, -1, D).astype(jnp.float32)             # [K, B, S, D]
    v = v_pages[:, page_table].reshape(K, B, -1, D).astype(jnp.float32)
    qg = q.reshape(B, K, H // K, D).astype(jnp.float32)
    s = jnp.einsum("bkgd,kbsd->bkgs", qg, k, precision=lax.Precision.HIGHEST) * scale
    live = jnp.arange(s.shape[-1])[None, :] < lengths[:, None]                      # [B, S]
    s = jnp.where(live[:, None, None, :], s, _MASK_VALUE)
    p = jnp.exp(s - s.max(axis=-1, keepdims=True)) * live[:, None, None, :]
    denom = p.sum(axis=-1, keepdims=True)
    o = jnp.einsum("bkgs,kbsd->bkgd", p / jnp.where(denom > 0, denom, 1.0), v, precision=lax.Precision.HIGHEST)
    return o.reshape(B, H, D).astype(q.dtype)


def _kernel(len_ref, table_ref, q_ref, k_ref, v_ref, o_ref, *, block_pages, sm_scale):
    # len_ref: [1] and table_ref: [P] (this sequence's); q_ref, o_ref: [G, D] (this sequence and KV head);
    # k_ref, v_ref: [num_pages, page_size, D] (this KV head)
    group, head_dim = q_ref.shape
    page_size = k_ref.shape[1]
    block_k = block_pages * page_size
    length = len_ref[0]
    qs = [q_ref[g, :].astype(jnp.float32) * sm_scale for g in range(group)]       # G x [D]
    n_blocks = pl.cdiv(pl.cdiv(length, page_size), block_pages)

    def body(i, carry):
        os, ms, ls = carry
        pages = table_ref[pl.ds(i * block_pages, block_pages)]                        # [bp]
        k = k_ref[pages].reshape(block_k, head_dim).astype(jnp.float32)              # [BK, D]
        v = v_ref[pages].reshape(block_k, head_dim).astype(jnp.float32)
        live = i * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0) < length
        new_os, new_ms, new_ls = [], [], []
        for g in range(group):
            s = jnp.where(live, jnp.sum(k * qs[g][None, :], axis=1), _MASK_VALUE)     # [BK]
            m = jnp.maximum(ms[g], jnp.max(s))
            alpha = jnp.exp(ms[g] - m)
            p = jnp.exp(s - m)                                                        # [BK]
            new_ls.append(alpha * ls[g] + jnp.sum(p))
            new_os.append(alpha * os[g] + jnp.sum(p[:, None] * v, axis=0))            # [D]
            new_ms.append(m)
        return tuple(new_os), tuple(new_ms), tuple(new_ls)

    init = (tuple(jnp.zeros((head_dim,), jnp.float32) for _ in range(group)),
            tuple(jnp.full((), _MASK_VALUE, jnp.float32) for _ in range(group)),
            tuple(jnp.zeros((), jnp.float32) for _ in range(group)))
    os, _, ls = lax.fori_loop(0, n_blocks, body, init)
    for g in range(group):
        o_ref[g, :] = (os[g] / jnp.where(ls[g] > 0, ls[g], 1.0)).astype(o_ref.dtype)


def supported(num_heads: int, num_kv_heads: int, head_dim: int, pages_per_seq: int, block_pages: int) -> bool:
    """Whether the kernel takes these shapes: a power-of-two group, head dim and page-table width (Triton
    block dimensions) and a block of pages that divides the width."""
    group = num_heads // num_kv_heads
    pow2 = lambda n: n > 0 and n & (n - 1) == 0
    return (num_heads % num_kv_heads == 0 and pow2(group) and pow2(head_dim) and pow2(pages_per_seq)
            and pow2(block_pages) and pages_per_seq % block_pages == 0)


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_pages", "num_warps", "num_stages", "interpret"))
def paged_decode_attention(q, k_pages, v_pages, page_table, lengths, *, sm_scale=None, block_pages=4, num_warps=4,
                           num_stages=2, interpret=False):
    """Decode attention over the paged cache (same contract as ``ref_paged_decode_attention``).

    Args:
      q: [B, H, D]; k_pages, v_pages: [K, num_pages, page_size, D]; page_table: [B, P] int32 (P a power of two,
        a multiple of ``block_pages``; entries past a sequence's pages must be valid page ids: read, masked);
      lengths: [B] int32.
      sm_scale: logit scale (default 1 / sqrt(D)).
      block_pages: pages per loop step; num_warps, num_stages: Triton launch knobs.
      interpret: run through the Pallas interpreter (CPU tests).

    Returns:
      [B, H, D] in q's dtype.
    """
    B, H, D = q.shape
    K, num_pages, page_size, _ = k_pages.shape
    P = page_table.shape[1]
    if not supported(H, K, D, P, block_pages):
        raise ValueError(f"paged_decode_attention needs a power-of-two GQA group, head dim and page-table width, "
                         f"and block_pages (a power of two) dividing the width; got H={H}, K={K}, D={D}, P={P}, "
                         f"block_pages={block_pages}")
    G = H // K
    scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    kernel = functools.partial(_kernel, block_pages=block_pages, sm_scale=scale)
    cache_spec = pl.BlockSpec((None, num_pages, page_size, D), lambda b, h: (h, 0, 0, 0))
    head_spec = pl.BlockSpec((None, None, G, D), lambda b, h: (b, h, 0, 0))
    args = _common.match_vma(lengths.astype(jnp.int32)[:, None], page_table.astype(jnp.int32),
                             q.reshape(B, K, G, D), k_pages, v_pages)
    out = pl.pallas_call(
        kernel,
        out_shape=_common.out_struct((B, K, G, D), q.dtype, *args),
        grid=(B, K),
        in_specs=[pl.BlockSpec((None, 1), lambda b, h: (b, 0)), pl.BlockSpec((None, P), lambda b, h: (b, 0)),
                  head_spec, cache_spec, cache_spec],
        out_specs=head_spec,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_decode_attention_gqa",
    )(*args)
    return out.reshape(B, H, D)
