"""The fused RoPE + cache write + decode-attention kernel (pallas_kernels.fused_attention) in interpret mode on
CPU, against its jnp reference and against the model's unfused path (apply_rope, write_kv, ref_paged_attention)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jmlora.model.attention import apply_rope, ref_paged_attention, rope_tables, write_kv
from pallas_kernels.fused_attention import (
    FusedLoRA,
    _ref_lora_deltas,
    fused_decode_attention,
    ref_fused_decode_attention,
    supported,
)

INV_FREQ = (1.0 / (10000.0 ** (np.arange(0, 32, 2) / 32))).astype(np.float32)       # head dim 32


def _case(seed, B, K, G, page_size, pages_per_seq, num_pages, dtype, deltas):
    D = 32
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((B, K, G + 2, D)).astype(np.float32)
    k = rng.standard_normal((K, num_pages, page_size, D)).astype(np.float32)
    v = rng.standard_normal((K, num_pages, page_size, D)).astype(np.float32)
    table = rng.permutation(num_pages)[:B * pages_per_seq].reshape(B, pages_per_seq).astype(np.int32)
    pos = rng.integers(0, pages_per_seq * page_size, B).astype(np.int32)
    pos[0] = pages_per_seq * page_size - 1                    # the last slot of a full table
    pos[1] = 0                                                # a first token: nothing cached yet
    write = table[np.arange(B), pos // page_size].copy()
    if B > 3:
        write[3], pos[3] = num_pages, 10 ** 6                 # a padding row: no write, a wild position
    for b in range(B):                                        # the new slot and everything after: large
        for p in range(pos[b], pages_per_seq * page_size):    # (finite) garbage, as in any cache
            k[:, table[b, p // page_size], p % page_size] = 1e4
            v[:, table[b, p // page_size], p % page_size] = -1e4
    cos, sin = rope_tables(jnp.asarray(pos), INV_FREQ)
    d = None
    if deltas:
        d = tuple(jnp.asarray(rng.standard_normal(s) * 0.5, dtype) for s in ((B, K, G, D), (B, K, D), (B, K, D)))
    cast = lambda a: jnp.asarray(a, dtype)
    return (cast(qkv), cast(k), cast(v), jnp.asarray(table), jnp.asarray(pos), jnp.asarray(write), cos, sin, d)


def _unfused(qkv, k_pages, v_pages, table, pos, write, deltas):
    """The decoder's separate steps on the same inputs."""
    B, K, G2, D = qkv.shape
    q, k, v = qkv[:, :, :G2 - 2].reshape(B, 1, -1, D), qkv[:, None, :, -2], qkv[:, None, :, -1]
    if deltas is not None:
        q = q + deltas[0].reshape(q.shape)
        k, v = k + deltas[1][:, None], v + deltas[2][:, None]
    q, k = apply_rope(q, pos[:, None], INV_FREQ), apply_rope(k, pos[:, None], INV_FREQ)
    page_size = k_pages.shape[2]
    k_pages = write_kv(k_pages, k, write[:, None], (pos % page_size)[:, None])
    v_pages = write_kv(v_pages, v, write[:, None], (pos % page_size)[:, None])
    out = ref_paged_attention(q, k_pages, v_pages, table, pos[:, None], pos + 1)
    return out[:, 0], k_pages, v_pages


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize("group,block_pages,deltas", [(4, 2, False), (4, 1, True), (1, 4, True), (8, 8, False)])
def test_kernel_matches_references(dtype, atol, group, block_pages, deltas):
    args = _case(group * 10 + block_pages, 5, 2, group, 4, 8, 48, dtype, deltas)
    qkv, k, v, table, pos, write, cos, sin, d = args
    ref_out, ref_k, ref_v = ref_fused_decode_attention(*args)
    out, new_k, new_v = fused_decode_attention(qkv, jnp.array(k), jnp.array(v), table, pos, write, cos, sin, d,
                                               block_pages=block_pages, interpret=True)
    assert out.shape == (5, 2 * group, 32) and out.dtype == dtype
    live = np.array([b != 3 for b in range(5)])                # row 3 is padding: finite garbage
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all() and np.abs(out[live]).max() < 10, "garbage past a position leaked"
    np.testing.assert_allclose(out[live], np.asarray(ref_out, np.float32)[live], atol=atol, rtol=0)
    # the cache: the new K/V at each live row's slot (RoPE'd k equal up to float32 rounding order, then one
    # bf16 ulp), nothing else touched
    close = dict(atol=1e-5, rtol=0) if dtype == jnp.float32 else dict(atol=0, rtol=8e-3)
    np.testing.assert_allclose(np.asarray(new_k, np.float32), np.asarray(ref_k, np.float32), **close)
    np.testing.assert_array_equal(np.asarray(new_v, np.float32), np.asarray(ref_v, np.float32))
    assert not np.array_equal(np.asarray(new_k, np.float32), np.asarray(k, np.float32)), "nothing was written"
    # and the model's unfused path agrees
    un_out, un_k, _ = _unfused(qkv, k, v, table, pos, write, d)
    np.testing.assert_allclose(out[live], np.asarray(un_out, np.float32)[live], atol=atol, rtol=0)
    np.testing.assert_allclose(np.asarray(new_k, np.float32), np.asarray(un_k, np.float32), **close)


def test_shapes_it_refuses():
    assert supported(32, 8, 128, 128, 16, 4)
    assert not supported(32, 8, 80, 128, 16, 4)               # head dim not a power of two
    assert not supported(32, 8, 128, 128, 12, 4)              # page size not a power of two
    assert not supported(32, 8, 128, 6, 16, 4)                # block of pages not dividing the table
    qkv, k, v, table, pos, write, cos, sin, _ = _case(0, 2, 2, 4, 4, 8, 48, jnp.float32, False)
    with pytest.raises(ValueError, match="block_pages dividing"):
        fused_decode_attention(qkv, k, v, table, pos, write, cos, sin, block_pages=16, interpret=True)
    with pytest.raises(ValueError, match="positions must be"):
        fused_decode_attention(qkv, k, v, table, pos[:1], write, cos, sin, interpret=True)
    with pytest.raises(ValueError, match="deltas must be"):
        fused_decode_attention(qkv, k, v, table, pos, write, cos, sin, (qkv, qkv, qkv), interpret=True)


def _lora_case(seed, B, K, G, D, S, R, dtype):
    """A FusedLoRA with mixed ranks (slot 0 and an unused slot of rank 0), NaN past each rank in every bank and
    in the shrink partials, slots repeated across rows."""
    rng = np.random.default_rng(seed)
    ranks = rng.integers(1, R + 1, S).astype(np.int32)
    ranks[0], ranks[-1], ranks[1] = 0, 0, R
    slots = rng.integers(0, S - 1, B).astype(np.int32)
    slots[:2] = (0, 1)
    trank = ranks[slots]
    h = rng.standard_normal((3, 2, B, R)).astype(np.float32)
    bq = rng.standard_normal((S, R, K, G, D)).astype(np.float32) * 0.3
    bk = rng.standard_normal((S, R, K, D)).astype(np.float32) * 0.3
    bv = rng.standard_normal((S, R, K, D)).astype(np.float32) * 0.3
    ao = rng.standard_normal((S, K, G, D, R)).astype(np.float32) * 0.3
    for s, r in enumerate(ranks):
        bq[s, r:], bk[s, r:], bv[s, r:], ao[s, ..., r:] = np.nan, np.nan, np.nan, np.nan
    for b, r in enumerate(trank):
        h[:, :, b, r:] = np.nan
    cast = lambda a: jnp.asarray(a, dtype)
    return FusedLoRA(jnp.asarray(slots), jnp.asarray(trank), jnp.asarray(h), cast(bq), cast(bk), cast(bv), cast(ao))


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize("group,o_shrink", [(4, True), (1, True), (2, False)])
def test_lora_in_the_kernel_matches_references(dtype, atol, group, o_shrink):
    """With ``lora``, the q/k/v LoRA expand and the o_proj shrink run inside the kernel: against the jnp twin,
    and against the kernel fed the reference's deltas; rank-0 rows get nothing, NaN padding never leaks."""
    B, K, D = 5, 2, 32
    qkv, k, v, table, pos, write, cos, sin, _ = _case(group + 40, B, K, group, 4, 8, 48, dtype, False)
    lora = _lora_case(group, B, K, group, D, 6, 8, dtype)
    if not o_shrink:
        lora = lora._replace(a_o=None)
    want = ref_fused_decode_attention(qkv, k, v, table, pos, write, cos, sin, lora=lora)
    got = fused_decode_attention(qkv, jnp.array(k), jnp.array(v), table, pos, write, cos, sin, lora=lora,
                                 block_pages=2, interpret=True)
    assert len(got) == len(want) == (4 if o_shrink else 3)
    live = np.array([b != 3 for b in range(B)])
    out = np.asarray(got[0], np.float32)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[live], np.asarray(want[0], np.float32)[live], atol=atol, rtol=0)
    close = dict(atol=1e-5, rtol=0) if dtype == jnp.float32 else dict(atol=0, rtol=8e-3)
    for g, w in zip(got[1:3], want[1:3]):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), **close)
    # the same kernel fed the deltas the reference computes: the LoRA path adds exactly those
    deltas = _ref_lora_deltas(lora, dtype)
    via_deltas = fused_decode_attention(qkv, jnp.array(k), jnp.array(v), table, pos, write, cos, sin, deltas,
                                        block_pages=2, interpret=True)
    np.testing.assert_allclose(out[live], np.asarray(via_deltas[0], np.float32)[live], atol=atol, rtol=0)
    no_lora = fused_decode_attention(qkv, jnp.array(k), jnp.array(v), table, pos, write, cos, sin, block_pages=2,
                                     interpret=True)[0]
    base = np.asarray(lora.token_ranks) == 0
    np.testing.assert_array_equal(out[base], np.asarray(no_lora, np.float32)[base])     # rank 0: untouched
    assert not np.allclose(out[live & ~base], np.asarray(no_lora, np.float32)[live & ~base], atol=atol)
    if o_shrink:
        ho = np.asarray(got[3])
        assert ho.shape == (K, B, 8) and np.isfinite(ho).all()
        np.testing.assert_allclose(ho[:, live], np.asarray(want[3])[:, live], atol=1e-4 if dtype == jnp.float32
                                   else 5e-2, rtol=1e-3 if dtype == jnp.float32 else 2e-2)
        assert not ho[:, base].any()


def test_lora_arguments_are_checked():
    qkv, k, v, table, pos, write, cos, sin, d = _case(1, 5, 2, 4, 4, 8, 48, jnp.float32, True)
    lora = _lora_case(1, 5, 2, 4, 32, 6, 8, jnp.float32)
    with pytest.raises(ValueError, match="not both"):
        fused_decode_attention(qkv, k, v, table, pos, write, cos, sin, d, lora, interpret=True)
    with pytest.raises(ValueError, match=r"lora.b_k must be"):
        fused_decode_attention(qkv, k, v, table, pos, write, cos, sin, lora=lora._replace(b_k=lora.b_v[:, :4]),
                               interpret=True)
