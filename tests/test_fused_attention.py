"""The fused RoPE + cache write + decode-attention kernel (pallas_kernels.fused_attention) in interpret mode on
CPU, against its jnp reference and against the model's unfused path (apply_rope, write_kv, ref_paged_attention)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jmlora.model.attention import apply_rope, ref_paged_attention, rope_tables, write_kv
from pallas_kernels.fused_attention import fused_decode_attention, ref_fused_decode_attention, supported

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
@pytest.mark.parametrize("group,block_pages,deltas,prefetch", [(4, 2, False, False), (4, 1, True, False),
                                                                (1, 4, True, False), (8, 8, False, False),
                                                                (4, 2, False, True), (4, 1, True, True)])
def test_kernel_matches_references(dtype, atol, group, block_pages, deltas, prefetch):
    args = _case(group * 10 + block_pages, 5, 2, group, 4, 8, 48, dtype, deltas)
    qkv, k, v, table, pos, write, cos, sin, d = args
    ref_out, ref_k, ref_v = ref_fused_decode_attention(*args)
    out, new_k, new_v = fused_decode_attention(qkv, jnp.array(k), jnp.array(v), table, pos, write, cos, sin, d,
                                               block_pages=block_pages, prefetch=prefetch, interpret=True)
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
