"""The GQA paged decode-attention kernel (pallas_kernels.decode_attention) in interpret mode on CPU, against
its jnp reference and the model's reference attention."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jmlora.model.attention import ref_paged_attention
from pallas_kernels.decode_attention import paged_decode_attention, ref_paged_decode_attention, supported


def _case(seed, B, H, K, D, page_size, pages_per_seq, num_pages, dtype):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, D)).astype(np.float32)
    k = rng.standard_normal((K, num_pages, page_size, D)).astype(np.float32)
    v = rng.standard_normal((K, num_pages, page_size, D)).astype(np.float32)
    table = rng.permutation(num_pages)[:B * pages_per_seq].reshape(B, pages_per_seq).astype(np.int32)
    lengths = rng.integers(1, pages_per_seq * page_size + 1, B).astype(np.int32)
    lengths[0] = pages_per_seq * page_size                    # a full table
    if B > 2:
        lengths[1] = 0                                        # an idle batch row: zeros, never NaN
    for b in range(B):                                        # keys past the length: large garbage (finite)
        for pos in range(lengths[b], pages_per_seq * page_size):
            k[:, table[b, pos // page_size], pos % page_size] = 1e4
            v[:, table[b, pos // page_size], pos % page_size] = -1e4
    cast = lambda a: jnp.asarray(a, dtype)
    return cast(q), cast(k), cast(v), jnp.asarray(table), jnp.asarray(lengths)


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("group,block_pages", [(4, 2), (1, 1), (8, 4)])
def test_kernel_matches_references(dtype, atol, group, block_pages):
    K, D, page_size, pages_per_seq = 2, 32, 4, 8
    q, k, v, table, lengths = _case(group * 10 + block_pages, 5, K * group, K, D, page_size, pages_per_seq, 48,
                                    dtype)
    out = paged_decode_attention(q, k, v, table, lengths, block_pages=block_pages, interpret=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all() and np.abs(out).max() < 10, "garbage beyond a length leaked"
    ref = np.asarray(ref_paged_decode_attention(q, k, v, table, lengths), np.float32)
    np.testing.assert_allclose(out, ref, atol=atol, rtol=0)
    np.testing.assert_array_equal(out[1], 0.0)                 # length 0
    live = np.asarray(lengths) > 0                             # the model's reference (which needs length >= 1)
    model_ref = ref_paged_attention(q[:, None], k, v, table, (lengths - 1)[:, None], lengths)[:, 0]
    np.testing.assert_allclose(out[live], np.asarray(model_ref, np.float32)[live], atol=atol, rtol=0)


def test_shapes_it_refuses():
    assert supported(32, 8, 128, 128, 4)
    assert not supported(24, 8, 128, 128, 4) and not supported(32, 8, 80, 128, 4)
    assert not supported(32, 8, 128, 12, 4) and not supported(32, 8, 128, 4, 8)
    q, k, v, table, lengths = _case(0, 2, 6, 2, 16, 4, 4, 16, jnp.float32)
    with pytest.raises(ValueError, match="power-of-two GQA group"):
        paged_decode_attention(q, k, v, table, lengths, interpret=True)
