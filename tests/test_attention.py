"""Paged attention: JAX's Pallas GPU decode kernel (interpret mode on CPU) against the jnp reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmlora.model.attention import (
    DECODE_ATTENTION_TABLE,
    DecodeAttentionConfig,
    paged_attention,
    pallas_gpu_tuning,
    prefill_attention_impl,
    ref_paged_attention,
    resolve_attention_impl,
)


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("pages_per_seq", [8, 12])
@pytest.mark.parametrize("config", [None, DecodeAttentionConfig("split", 4, 4, 1), DecodeAttentionConfig("gqa", 2, 4)])
def test_pallas_gpu_decode_kernel_matches_reference(dtype, atol, pages_per_seq, config):
    B, H, K, D, page_size, num_pages = 3, 8, 2, 32, 4, 48
    rng = np.random.default_rng(pages_per_seq)
    q = jnp.asarray(rng.standard_normal((B, 1, H, D)), dtype)
    # slots beyond a sequence's length hold large garbage that must not leak into its output. (Finite: the
    # kernel, like any p @ v, turns NaN into NaN even at probability 0. Caches start zeroed and are only
    # ever written with finite K/V, so recycled pages hold finite stale values, never NaN.)
    k_cache = rng.standard_normal((K, num_pages, page_size, D))
    v_cache = rng.standard_normal((K, num_pages, page_size, D))
    page_table = rng.permutation(num_pages)[:B * pages_per_seq].reshape(B, pages_per_seq).astype(np.int32)
    lengths = np.array([5, pages_per_seq * page_size, 17], np.int32)
    for b in range(B):
        for pos in range(lengths[b], pages_per_seq * page_size):
            k_cache[:, page_table[b, pos // page_size], pos % page_size] = 1e4
            v_cache[:, page_table[b, pos // page_size], pos % page_size] = -1e4
    args = (q, jnp.asarray(k_cache, dtype), jnp.asarray(v_cache, dtype), jnp.asarray(page_table),
            jnp.asarray(lengths - 1)[:, None], jnp.asarray(lengths))
    if config is not None and config.kernel == "gqa" and pages_per_seq & (pages_per_seq - 1):
        pytest.skip("the GQA kernel takes power-of-two page-table widths (the runner's)")
    out = paged_attention(*args, impl="pallas_gpu", interpret=True, config=config)
    assert np.abs(np.asarray(out, np.float32)).max() < 10, "garbage beyond the length leaked"
    ref = ref_paged_attention(*args)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=atol, rtol=0)


def test_attention_impl_choice(monkeypatch):
    assert resolve_attention_impl("auto", 4) == "reference"           # prefill: reference everywhere
    assert resolve_attention_impl("auto", 1, 64, 8) == "reference"    # CPU: no GPU kernel
    for impl in ("pallas_gpu", "pallas_gpu_fused"):
        with pytest.raises(ValueError, match="decode only"):
            resolve_attention_impl(impl, 8)
        assert prefill_attention_impl(impl) == "auto"
    with pytest.raises(ValueError, match="attention impl must be"):
        resolve_attention_impl("flash", 1)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve_attention_impl("auto", 4, 64, 8) == "reference"
    assert resolve_attention_impl("auto", 1, 16, 8) == "pallas_gpu_fused"      # 128 (sequence, KV head) programs
    assert resolve_attention_impl("auto", 1, 8, 8) == "pallas_gpu"            # too few: the split kernel


@pytest.mark.parametrize("batch", [1, 3, 8, 32, 64, 256])
@pytest.mark.parametrize("pages_per_seq", [4, 12, 128])
def test_pallas_gpu_tuning_fits_the_kernels(batch, pages_per_seq):
    cfg = pallas_gpu_tuning(batch, 32, 8, 128, pages_per_seq)
    assert cfg.kernel in ("split", "gqa") and cfg.num_warps in (4, 8)
    assert cfg.block_pages & (cfg.block_pages - 1) == 0 and pages_per_seq % cfg.block_pages == 0
    if cfg.kernel == "split":
        assert pages_per_seq % cfg.k_splits == 0 and (pages_per_seq // cfg.k_splits) % cfg.block_pages == 0
        if batch * 8 >= 256:
            assert cfg.k_splits == 1        # the batch alone fills the GPU: no partial outputs to combine



def test_attention_table_entries_apply_only_where_they_fit(monkeypatch):
    gqa, split16 = DecodeAttentionConfig("gqa", 4, 4), DecodeAttentionConfig("split", 8, 4, 16)
    monkeypatch.setitem(DECODE_ATTENTION_TABLE, 32, gqa)
    monkeypatch.setitem(DECODE_ATTENTION_TABLE, 64, split16)
    assert pallas_gpu_tuning(32, 32, 8, 128, 128) == gqa
    assert pallas_gpu_tuning(32, 24, 8, 128, 128).kernel == "split"        # a GQA group of 3: not for gqa
    assert pallas_gpu_tuning(64, 32, 8, 128, 128) == split16
    fallback = pallas_gpu_tuning(64, 32, 8, 128, 8)                         # 16 splits of 8 pages: no
    assert fallback != split16 and 8 % fallback.k_splits == 0


@pytest.mark.parametrize("batch", [32, 64, 128, 256])
@pytest.mark.parametrize("pages_per_seq", [1, 6, 80, 128])
def test_fused_tuning_fits_the_kernel(batch, pages_per_seq):
    """The fused kernel's knobs per batch: the table's entry (page-id prefetch included) or the default, with a
    block of pages that divides the page-table width."""
    from jmlora.model.attention import FUSED_ATTENTION_TABLE, FusedAttentionConfig, fused_tuning

    cfg = fused_tuning(batch, pages_per_seq)
    want = FUSED_ATTENTION_TABLE.get(batch, FusedAttentionConfig())
    assert (cfg.num_warps, cfg.num_stages, cfg.prefetch) == (want.num_warps, want.num_stages, want.prefetch)
    assert cfg.block_pages <= want.block_pages and pages_per_seq % cfg.block_pages == 0
    assert cfg.block_pages & (cfg.block_pages - 1) == 0
