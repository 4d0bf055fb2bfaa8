"""One decode-attention kernel per layer: RoPE on the new q and k, the new K/V written into the paged cache,
and attention over the cache, in one launch.

Without it, a decode layer runs this part as five or six launches between the q/k/v matmul and the output
projection: RoPE (+ the LoRA delta add), two cache scatters, padding q to a 16-row tensor-core tile, JAX's
paged-attention kernel and its split combine (benchmarks/RESULTS.md, "Fused decode attention"). Here one
program per (sequence, KV head):

1. loads its query heads, key and value straight from the fused q/k/v projection output
   ``[B, K, G + 2, D]`` (plus the LoRA deltas, when given), applies RoPE to q and k in float32 and rounds
   them to the activation dtype, as the unfused path does;
2. stores the new key and value at the sequence's next cache slot (its rows are skipped when the slot is
   marked as padding);
3. runs an online softmax over the ``positions[b]`` tokens already cached, with the query heads of the group
   in one 16-row tensor-core tile, starting from the new token's own score, which is taken from registers
   (the cache slot just written is never read back, so no ordering between the store and the loads is
   needed).

``ref_fused_decode_attention`` is its jnp twin.
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


def _rope(x, x_partner, cos, sin_signed):
    """Rotate-half RoPE in float32: ``x * cos + rotate_half(x) * sin``, with the sign of ``rotate_half``
    folded into ``sin_signed`` and ``x_partner[d] = x[(d + D/2) % D]``."""
    return x.astype(jnp.float32) * cos + x_partner.astype(jnp.float32) * sin_signed


def ref_fused_decode_attention(qkv, k_pages, v_pages, page_table, positions, write_pages, cos, sin, deltas=None,
                               *, sm_scale=None):
    """Reference in jnp (same contract as ``fused_decode_attention``)."""
    B, K, G2, D = qkv.shape
    G, dtype = G2 - 2, qkv.dtype
    q, k, v = qkv[:, :, :G], qkv[:, :, G], qkv[:, :, G + 1]
    if deltas is not None:
        dq, dk, dv = deltas
        q, k, v = (q + dq).astype(dtype), (k + dk).astype(dtype), (v + dv).astype(dtype)

    def rope(x):                                                                   # x: [B, K, ..., D]
        shape = (B,) + (1,) * (x.ndim - 2) + (D // 2,)
        c, s = cos.reshape(shape), sin.reshape(shape)
        x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
        return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(dtype)

    q, k = rope(q), rope(k)                                                        # [B, K, G, D], [B, K, D]
    page_size = k_pages.shape[2]
    slots = positions % page_size
    # padding rows (write page == num_pages) are dropped
    k_pages = k_pages.at[:, write_pages, slots].set(k.transpose(1, 0, 2).astype(k_pages.dtype), mode="drop")
    v_pages = v_pages.at[:, write_pages, slots].set(v.transpose(1, 0, 2).astype(v_pages.dtype), mode="drop")
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    kc = k_pages[:, page_table].reshape(K, B, -1, D).astype(jnp.float32)          # [K, B, S, D]
    vc = v_pages[:, page_table].reshape(K, B, -1, D).astype(jnp.float32)
    qf = q.astype(jnp.float32)
    s = jnp.einsum("bkgd,kbsd->bkgs", qf, kc, precision=lax.Precision.HIGHEST) * scale
    s_new = jnp.einsum("bkgd,bkd->bkg", qf, k.astype(jnp.float32), precision=lax.Precision.HIGHEST) * scale
    cached = jnp.arange(s.shape[-1])[None, :] < positions[:, None]                 # [B, S]
    s = jnp.where(cached[:, None, None, :], s, _MASK_VALUE)
    m = jnp.maximum(s.max(axis=-1), s_new)                                         # [B, K, G]
    p = jnp.exp(s - m[..., None]) * cached[:, None, None, :]
    p_new = jnp.exp(s_new - m)
    o = (jnp.einsum("bkgs,kbsd->bkgd", p, vc, precision=lax.Precision.HIGHEST)
         + p_new[..., None] * v.astype(jnp.float32)[:, :, None, :])
    o = o / (p.sum(axis=-1) + p_new)[..., None]
    return o.reshape(B, K * G, D).astype(dtype), k_pages, v_pages


def _kernel(pos_ref, wpage_ref, table_ref, cos_ref, sin_ref, qkv_ref, *refs, group, q_rows, block_pages, sm_scale,
            has_deltas, prefetch):
    # pos_ref, wpage_ref: [1]; table_ref: [P]; cos_ref, sin_ref: [D/2] (this sequence's); qkv_ref: [G + 2, D]
    # (this sequence and KV head); dq_ref: [G, D], dk_ref, dv_ref: [D]; k_ref, v_ref, k_out_ref, v_out_ref:
    # [num_pages, page_size, D] (this KV head; the outputs alias the inputs); o_ref: [G, D]
    if has_deltas:
        dq_ref, dk_ref, dv_ref, k_ref, v_ref, o_ref, k_out_ref, v_out_ref = refs
    else:
        (k_ref, v_ref, o_ref, k_out_ref, v_out_ref), dq_ref, dk_ref, dv_ref = refs, None, None, None
    num_pages, page_size, head_dim = k_ref.shape
    half = head_dim // 2
    block_k = block_pages * page_size
    dtype = qkv_ref.dtype
    pos = pos_ref[0]                                                  # tokens already cached = the new position
    # a padding row's position may be anything: never walk past its page-table row
    n_blocks = jnp.minimum(pl.cdiv(pos, block_k), table_ref.shape[0] // block_pages)
    last = jnp.maximum(n_blocks - 1, 0)

    def block_table(i):
        return table_ref[pl.ds(i * block_pages, block_pages)]                    # [bp] page ids of block i

    def block_kv(pages):
        return k_ref[pages].reshape(block_k, head_dim), v_ref[pages].reshape(block_k, head_dim)   # [BK, D] x 2

    # With prefetch, the first block's page ids are loaded before the prologue's arithmetic (block 0's ids are
    # valid even with nothing cached: the page table's contract).
    if prefetch:
        pages0 = block_table(0)

    cols = lax.broadcasted_iota(jnp.int32, (head_dim,), 0)
    partner = jnp.where(cols < half, cols + half, cols - half)        # rotate-half's source column
    trig = jnp.where(cols < half, cols, cols - half)
    cos = cos_ref[trig]                                               # [D] float32
    sin = jnp.where(cols < half, -sin_ref[trig], sin_ref[trig])
    # the group's query heads as one tile of q_rows rows; rows past the group repeat its last head (never stored)
    rows = lax.broadcasted_iota(jnp.int32, (q_rows, head_dim), 0)
    head_rows = jnp.minimum(rows, group - 1)
    cols2, partner2 = (jnp.broadcast_to(c[None, :], (q_rows, head_dim)) for c in (cols, partner))

    def with_delta(x, d_ref, *idx):
        """x plus its delta (LoRA, bias) when there is one, rounded to the activation dtype as XLA's add."""
        if d_ref is None:
            return x
        return (x.astype(jnp.float32) + d_ref[idx].astype(jnp.float32)).astype(dtype)

    q_x = with_delta(qkv_ref[head_rows, cols2], dq_ref, head_rows, cols2)
    q_p = with_delta(qkv_ref[head_rows, partner2], dq_ref, head_rows, partner2)
    k_x = with_delta(qkv_ref[group, cols], dk_ref, cols)
    k_p = with_delta(qkv_ref[group, partner], dk_ref, partner)
    v_new = with_delta(qkv_ref[group + 1, cols], dv_ref, cols)                   # [D]
    page = wpage_ref[0]
    q = _rope(q_x, q_p, cos, sin).astype(dtype)                                   # [QR, D]
    k_new = _rope(k_x, k_p, cos, sin).astype(dtype)                              # [D]

    @pl.when(page < num_pages)
    def _write():
        slot = pos % page_size
        k_out_ref[page, slot, :] = k_new.astype(k_out_ref.dtype)
        v_out_ref[page, slot, :] = v_new.astype(v_out_ref.dtype)

    # the new token seeds the online softmax: m = its score, denom = 1, o = its value
    m = jnp.sum(q.astype(jnp.float32) * k_new.astype(jnp.float32)[None, :], axis=1) * sm_scale   # [QR]
    denom = jnp.ones((q_rows,), jnp.float32)
    o = jnp.broadcast_to(v_new.astype(jnp.float32)[None, :], (q_rows, head_dim))

    def attend(i, k, v, o, m, denom):
        """One block of cached keys and values into the online softmax."""
        s = plgpu.dot(q, k.T) * sm_scale                                          # [QR, BK] float32
        cached = i * block_k + lax.broadcasted_iota(jnp.int32, (q_rows, block_k), 1) < pos
        s = jnp.where(cached, s, _MASK_VALUE)
        m_next = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp(m - m_next)
        p = jnp.exp(s - m_next[:, None])
        denom = alpha * denom + p.sum(axis=1)
        o = alpha[:, None] * o + plgpu.dot(p.astype(v.dtype), v)
        return o, m_next, denom

    if prefetch:
        # the loop carries block i's page ids and loads block i + 1's beside block i's keys and values, so a
        # block costs one memory round trip instead of two (ids, then the pages they name). On the last
        # block the "next" ids are the last block's again (clamped): a re-read the cache serves.
        def body(i, carry):
            pages, state = carry[0], carry[1:]
            k, v = block_kv(pages)
            pages_next = block_table(jnp.minimum(i + 1, last))
            return (pages_next, *attend(i, k, v, *state))
        carry = (pages0, o, m, denom)
    else:
        def body(i, carry):
            return attend(i, *block_kv(block_table(i)), *carry)
        carry = (o, m, denom)
    carry = lax.fori_loop(0, n_blocks, body, carry)
    o, m, denom = carry[-3:]
    o = o / denom[:, None]                                        # denom >= 1: the new token's own term
    # rows past the group computed the last head again, bit for bit (same q row, same keys): their duplicate
    # stores write the same values, so no mask is needed (and the interpreter, which writes masked lanes
    # back with their old values, agrees)
    o_ref[head_rows, cols2] = o.astype(o_ref.dtype)


def supported(num_heads: int, num_kv_heads: int, head_dim: int, pages_per_seq: int, page_size: int,
              block_pages: int) -> bool:
    """Whether the kernel takes these shapes: Triton blocks need power-of-two head dims, page sizes and
    page-table blocks, and a block of pages that divides the page-table width."""
    pow2 = _common.is_pow2
    return (num_heads % num_kv_heads == 0 and pow2(head_dim) and head_dim >= 16 and pow2(page_size)
            and pow2(block_pages) and pages_per_seq % block_pages == 0)


def _check(qkv, k_pages, v_pages, page_table, positions, write_pages, cos, sin, deltas, block_pages):
    if qkv.ndim != 4 or qkv.shape[2] < 3:
        raise ValueError(f"qkv must be [B, K, G + 2, D] (G >= 1 query heads per KV head), got {qkv.shape}")
    B, K, G2, D = qkv.shape
    if k_pages.ndim != 4 or k_pages.shape[0] != K or k_pages.shape[3] != D or v_pages.shape != k_pages.shape:
        raise ValueError(f"k_pages and v_pages must both be [K={K}, num_pages, page_size, D={D}], got "
                         f"{k_pages.shape} and {v_pages.shape}")
    if page_table.ndim != 2 or page_table.shape[0] != B:
        raise ValueError(f"page_table must be [B={B}, P], got {page_table.shape}")
    for name, a in (("positions", positions), ("write_pages", write_pages)):
        if a.shape != (B,):
            raise ValueError(f"{name} must be [B={B}], got {a.shape}")
    for name, a in (("cos", cos), ("sin", sin)):
        if a.shape != (B, D // 2):
            raise ValueError(f"{name} must be [B={B}, D/2={D // 2}], got {a.shape}")
    if deltas is not None:
        want = ((B, K, G2 - 2, D), (B, K, D), (B, K, D))
        if len(deltas) != 3 or tuple(d.shape for d in deltas) != want:
            raise ValueError(f"deltas must be (dq {want[0]}, dk {want[1]}, dv {want[2]}), got "
                             f"{tuple(getattr(d, 'shape', None) for d in deltas)}")
    if not supported(K * (G2 - 2), K, D, page_table.shape[1], k_pages.shape[2], block_pages):
        raise ValueError(f"fused_decode_attention needs a power-of-two head dim (>= 16), page size and "
                         f"block_pages dividing the page-table width; got D={D}, page_size={k_pages.shape[2]}, "
                         f"P={page_table.shape[1]}, block_pages={block_pages}")


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_pages", "num_warps", "num_stages", "prefetch",
                                             "interpret"),
                   donate_argnames=("k_pages", "v_pages"))
def fused_decode_attention(qkv, k_pages, v_pages, page_table, positions, write_pages, cos, sin, deltas=None, *,
                           sm_scale=None, block_pages=4, num_warps=4, num_stages=2, prefetch=False,
                           interpret=False):
    """RoPE + cache write + paged decode attention for one new token per sequence.

    Args:
      qkv: [B, K, G + 2, D] the q/k/v projection of each sequence's new token: per KV head, its G query
        heads, then its key, then its value (the model's fused ``w_qkv`` layout), before RoPE.
      k_pages, v_pages: [K, num_pages, page_size, D] the layer's caches (donated; updated in place).
      page_table: [B, P] int32 page ids of each sequence, in order (P a multiple of ``block_pages``; entries
        past a sequence's pages must be valid page ids: they are read and masked).
      positions: [B] int32 position of the new token = tokens already cached.
      write_pages: [B] int32 page that receives the new K/V at slot ``positions % page_size``; ``num_pages``
        marks a padding row (nothing written; its output row is finite garbage).
      cos, sin: [B, D/2] float32 RoPE tables at ``positions`` (rotate-half convention).
      deltas: optional (dq [B, K, G, D], dk [B, K, D], dv [B, K, D]) added to q, k, v before RoPE (LoRA).
      sm_scale: logit scale (default 1 / sqrt(D)).
      block_pages: pages per loop step; num_warps, num_stages: Triton launch knobs.
      prefetch: load the next block's page ids while this block is attended (without it a block's ids, then
        the keys and values they name, are two dependent memory round trips). Prefetching the keys and values
        too, in registers, was slower from batch 64 (benchmarks/KERNELS_NOTES.md).
      interpret: run through the Pallas interpreter (CPU tests).

    Returns:
      (out [B, K * G, D] in qkv's dtype, k_pages, v_pages).
    """
    _check(qkv, k_pages, v_pages, page_table, positions, write_pages, cos, sin, deltas, block_pages)
    B, K, G2, D = qkv.shape
    G = G2 - 2
    _, num_pages, page_size, _ = k_pages.shape
    P = page_table.shape[1]
    scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    q_rows = max(16, 1 << (G - 1).bit_length())                     # the tensor-core tile's rows
    kernel = functools.partial(_kernel, group=G, q_rows=q_rows, block_pages=block_pages, sm_scale=scale,
                               has_deltas=deltas is not None, prefetch=prefetch)
    row = lambda n: pl.BlockSpec((None, n), lambda b, h: (b, 0))
    cache_spec = pl.BlockSpec((None, num_pages, page_size, D), lambda b, h: (h, 0, 0, 0))
    inputs = [positions.astype(jnp.int32)[:, None], write_pages.astype(jnp.int32)[:, None],
              page_table.astype(jnp.int32), cos.astype(jnp.float32), sin.astype(jnp.float32), qkv]
    specs = [row(1), row(1), row(P), row(D // 2), row(D // 2),
             pl.BlockSpec((None, None, G2, D), lambda b, h: (b, h, 0, 0))]
    if deltas is not None:
        inputs += list(deltas)
        specs += [pl.BlockSpec((None, None, G, D), lambda b, h: (b, h, 0, 0)),
                  pl.BlockSpec((None, None, D), lambda b, h: (b, h, 0)),
                  pl.BlockSpec((None, None, D), lambda b, h: (b, h, 0))]
    inputs += [k_pages, v_pages]
    specs += [cache_spec, cache_spec]
    inputs = _common.match_vma(*inputs)
    n_in = len(inputs)
    out, k_pages, v_pages = pl.pallas_call(
        kernel,
        out_shape=(_common.out_struct((B, K, G, D), qkv.dtype, *inputs),
                   _common.out_struct(k_pages.shape, k_pages.dtype, *inputs),
                   _common.out_struct(v_pages.shape, v_pages.dtype, *inputs)),
        grid=(B, K),
        in_specs=specs,
        out_specs=(pl.BlockSpec((None, None, G, D), lambda b, h: (b, h, 0, 0)), cache_spec, cache_spec),
        input_output_aliases={n_in - 2: 1, n_in - 1: 2},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"fused_decode_attention_bp{block_pages}w{num_warps}s{num_stages}p{int(prefetch)}",   # knobs in profiles
    )(*inputs)
    return out.reshape(B, K * G, D), k_pages, v_pages
