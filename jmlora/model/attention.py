"""Rotary embeddings and attention over a paged KV cache (plain jnp reference).

The cache is paged from the start: each layer's K and V are ``[num_pages, page_size, kv_heads, head_dim]``
and every sequence owns the pages its row of ``page_table`` lists, in order. Prefill, chunked prefill and
decode are one code path: a chunk of ``T`` new tokens per sequence starting at ``start_pos``.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jmlora.config import ModelConfig, RopeConfig
from jmlora.sharding import filled, logical_sharding

Array = jax.Array
# A large finite negative (not -inf) so that a fully masked row (an idle batch slot) stays finite.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@flax.struct.dataclass
class KVCache:
    """Per-layer paged key/value caches.

    Attributes:
      k, v: one array per layer, each ``[num_pages, page_size, kv_heads, head_dim]``.
    """

    k: tuple[Array, ...]
    v: tuple[Array, ...]

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[1]


KV_CACHE_AXES = ("pages", "page_slot", "kv_heads", "head_dim")


def init_kv_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype, mesh: Mesh) -> KVCache:
    """Zero-filled caches (``jnp.empty`` is uninitialised memory in JAX 0.11; zeros keep masked reads finite)."""
    shape = (num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    sharding = logical_sharding(mesh, KV_CACHE_AXES, shape)
    return KVCache(k=tuple(filled(shape, dtype, sharding) for _ in range(cfg.num_layers)),
                   v=tuple(filled(shape, dtype, sharding) for _ in range(cfg.num_layers)))


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies ``[head_dim // 2]`` (float32), with linear or Llama-3 scaling applied."""
    inv_freq = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
    """Rotates ``x: [B, T, N, D]`` by ``positions: [B, T]`` (the rotate-half convention of HF/Llama)."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq          # [B, T, D/2]
    cos = jnp.cos(freqs)[:, :, None, :]
    sin = jnp.sin(freqs)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def write_kv(cache: Array, new: Array, page_idx: Array, slot_idx: Array) -> Array:
    """Scatters ``new: [B, T, K, D]`` into ``cache: [pages, page_size, K, D]``.

    ``page_idx``/``slot_idx`` are ``[B, T]``; a page index equal to ``num_pages`` marks a padding token,
    which is dropped (never written).
    """
    return cache.at[page_idx, slot_idx].set(new.astype(cache.dtype), mode="drop")


def ref_paged_attention(q: Array, k_cache: Array, v_cache: Array, page_table: Array, q_positions: Array,
                        kv_lens: Array) -> Array:
    """Causal grouped-query attention of new queries against the paged cache (which already holds them).

    Args:
      q: ``[B, T, H, D]`` queries (RoPE applied).
      k_cache, v_cache: ``[num_pages, page_size, K, D]``.
      page_table: ``[B, P]`` page ids of each sequence, in order.
      q_positions: ``[B, T]`` absolute position of each query.
      kv_lens: ``[B]`` number of valid cached tokens of each sequence (after this chunk's writes).

    Returns:
      ``[B, T, H, D]`` in q's dtype. Rows of padding queries are finite garbage.
    """
    B, T, H, D = q.shape
    _, page_size, K, _ = k_cache.shape
    P = page_table.shape[1]
    k = k_cache[page_table].reshape(B, P * page_size, K, D)                 # [B, S, K, D]
    v = v_cache[page_table].reshape(B, P * page_size, K, D)
    qg = q.reshape(B, T, K, H // K, D)                                      # [B, T, K, G, D]
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) / math.sqrt(D)
    key_pos = jnp.arange(P * page_size)
    mask = (key_pos[None, None, :] <= q_positions[:, :, None]) & (key_pos[None, None, :] < kv_lens[:, None, None])
    scores = jnp.where(mask[:, None, None], scores, _MASK_VALUE)            # [B, K, G, T, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, H, D).astype(q.dtype)
