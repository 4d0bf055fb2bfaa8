"""Rotary embeddings and attention over a paged KV cache (plain jnp reference).

The cache is paged from the start: each layer's K and V are ``[kv_heads, num_pages, page_size, head_dim]``
(head-major, the layout of JAX's Pallas GPU paged-attention kernel, and shardable by KV head) and every
sequence owns the pages its row of ``page_table`` lists, in order. Prefill, chunked prefill and
decode are one code path: a chunk of ``T`` new tokens per sequence starting at ``start_pos``.
"""

from __future__ import annotations

import dataclasses
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
      k, v: one array per layer, each ``[kv_heads, num_pages, page_size, head_dim]``.
    """

    k: tuple[Array, ...]
    v: tuple[Array, ...]

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[1]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[2]


KV_CACHE_AXES = ("kv_heads", "pages", "page_slot", "head_dim")


def init_kv_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype, mesh: Mesh) -> KVCache:
    """Zero-filled caches (``jnp.empty`` is uninitialised memory in JAX 0.11; zeros keep masked reads finite)."""
    shape = (cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
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
    """Scatters ``new: [B, T, K, D]`` into ``cache: [K, pages, page_size, D]``.

    ``page_idx``/``slot_idx`` are ``[B, T]``; a page index equal to ``num_pages`` marks a padding token,
    which is dropped (never written).
    """
    return cache.at[:, page_idx, slot_idx].set(new.transpose(2, 0, 1, 3).astype(cache.dtype), mode="drop")


def ref_paged_attention(q: Array, k_cache: Array, v_cache: Array, page_table: Array, q_positions: Array,
                        kv_lens: Array) -> Array:
    """Causal grouped-query attention of new queries against the paged cache (which already holds them).

    Args:
      q: ``[B, T, H, D]`` queries (RoPE applied).
      k_cache, v_cache: ``[K, num_pages, page_size, D]``.
      page_table: ``[B, P]`` page ids of each sequence, in order.
      q_positions: ``[B, T]`` absolute position of each query.
      kv_lens: ``[B]`` number of valid cached tokens of each sequence (after this chunk's writes).

    Returns:
      ``[B, T, H, D]`` in q's dtype. Rows of padding queries are finite garbage.
    """
    B, T, H, D = q.shape
    K, _, page_size, _ = k_cache.shape
    P = page_table.shape[1]
    k = k_cache[:, page_table].reshape(K, B, P * page_size, D).transpose(1, 2, 0, 3)   # [B, S, K, D]
    v = v_cache[:, page_table].reshape(K, B, P * page_size, D).transpose(1, 2, 0, 3)
    qg = q.reshape(B, T, K, H // K, D)                                      # [B, T, K, G, D]
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) / math.sqrt(D)
    key_pos = jnp.arange(P * page_size)
    mask = (key_pos[None, None, :] <= q_positions[:, :, None]) & (key_pos[None, None, :] < kv_lens[:, None, None])
    scores = jnp.where(mask[:, None, None], scores, _MASK_VALUE)            # [B, K, G, T, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, H, D).astype(q.dtype)


# "pallas_gpu": JAX's split kernel or the GQA kernel (``DecodeAttentionConfig``), after XLA's RoPE and cache
# writes; "pallas_gpu_fused": one kernel doing RoPE, the cache write and attention (``fused_decode_attention``)
# where the layer allows it (fused q/k/v weights, no q/k norm), "pallas_gpu" otherwise.
ATTENTION_IMPLS = ("reference", "pallas_gpu", "pallas_gpu_fused")


def prefill_attention_impl(impl: str) -> str:
    """The engine's choice for prefill chunks: the decode-only kernels give way to "auto"."""
    return "auto" if impl in ("pallas_gpu", "pallas_gpu_fused") else impl


# The fused kernel runs one program per (sequence, KV head), each walking its whole context; below this many
# programs JAX's split kernel, which also splits the context, was faster at long contexts on the H200
# (batch 1 and 8 x 8 KV heads at 1152 tokens; benchmarks/RESULTS.md, "Fused decode attention").
FUSED_MIN_PROGRAMS = 128


def resolve_attention_impl(impl: str, num_new_tokens: int, batch: int = 1, num_kv_heads: int = 1) -> str:
    """"auto" picks the Pallas GPU decode kernels for decode (T == 1) on GPU, else the reference: the fused
    kernel from ``FUSED_MIN_PROGRAMS`` (sequence x KV head) programs up, the split kernel below."""
    if impl == "auto":
        if num_new_tokens != 1 or jax.default_backend() != "gpu":
            return "reference"
        return "pallas_gpu_fused" if batch * num_kv_heads >= FUSED_MIN_PROGRAMS else "pallas_gpu"
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be 'auto' or one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl != "reference" and num_new_tokens != 1:
        raise ValueError(f"the {impl} attention kernels serve decode only (one new token per sequence)")
    return impl


def _largest_pow2_divisor(n: int, at_most: int) -> int:
    d = 1
    while d * 2 <= at_most and n % (d * 2) == 0:
        d *= 2
    return d


# Enough (batch x KV head x split) programs to fill the H200's 132 SMs about twice over.
_TARGET_PROGRAMS = 256


@dataclasses.dataclass(frozen=True)
class DecodeAttentionConfig:
    """Which Pallas GPU decode-attention kernel runs, with its knobs.

    Attributes:
      kernel: "gqa" (``pallas_kernels.decode_attention``: one program per sequence and KV head, no combine)
        or "split" (JAX's ``pallas.ops.gpu.paged_attention``: 16-row query blocks, ``k_splits`` partial
        outputs combined by XLA).
      block_pages: pages per loop step.
      num_warps: Triton warps per program.
      k_splits: context splits ("split" only).
    """

    kernel: str
    block_pages: int
    num_warps: int
    k_splits: int = 1


# Measured choices per batch size (benchmarks/RESULTS.md, "Decode attention"), filled in from
# ``benchmarks/throughput.py --tune-attention``; batches not listed use ``pallas_gpu_tuning``'s rule.
DECODE_ATTENTION_TABLE: dict[int, DecodeAttentionConfig] = {}


def pallas_gpu_tuning(batch: int, num_heads: int, num_kv_heads: int, head_dim: int,
                      pages_per_seq: int) -> DecodeAttentionConfig:
    """The decode-attention kernel and knobs for a batch on GPU.

    A ``DECODE_ATTENTION_TABLE`` entry for the batch wins when these shapes can take it. Otherwise, from the
    H200 sweep (benchmarks/RESULTS.md, "Decode attention"): JAX's split kernel, splitting the context only as
    far as the batch needs to fill the GPU (every split writes a partial output that XLA then combines,
    empty or not), 4 pages per step from batch 64 up, 4 warps. Block counts are powers of two dividing the
    page-table width (Triton blocks).
    """
    from pallas_kernels import decode_attention

    chosen = DECODE_ATTENTION_TABLE.get(batch)
    if chosen is not None:
        if chosen.kernel == "gqa":
            fits = decode_attention.supported(num_heads, num_kv_heads, head_dim, pages_per_seq, chosen.block_pages)
        else:
            fits = (pages_per_seq % chosen.k_splits == 0
                    and (pages_per_seq // chosen.k_splits) % chosen.block_pages == 0)
        if fits:
            return chosen
    want = min(16, max(1, _TARGET_PROGRAMS // max(1, batch * num_kv_heads)))    # 16: the most measured
    per_block = 4 if batch >= 64 else 8
    k_splits = 1
    while k_splits * 2 <= want and pages_per_seq % (k_splits * 2) == 0:
        k_splits *= 2
    per_block = _largest_pow2_divisor(pages_per_seq // k_splits, per_block)
    return DecodeAttentionConfig("split", per_block, 4, k_splits)


def paged_attention(q: Array, k_cache: Array, v_cache: Array, page_table: Array, q_positions: Array,
                    kv_lens: Array, *, impl: str = "reference", interpret: bool = False,
                    config: DecodeAttentionConfig | None = None) -> Array:
    """Attention over the paged cache with the chosen implementation (same contract as ``ref_paged_attention``).

    ``pallas_gpu`` is decode only: the query of each sequence is its newest token, so attending to all
    ``kv_lens`` cached tokens is causal. ``config`` picks the kernel and its knobs (None: ``pallas_gpu_tuning``).
    Off GPU the kernels run in the Pallas interpreter.
    """
    if impl == "reference":
        return ref_paged_attention(q, k_cache, v_cache, page_table, q_positions, kv_lens)
    interpret = interpret or jax.default_backend() != "gpu"
    B, _, H, D = q.shape
    config = config or pallas_gpu_tuning(B, H, k_cache.shape[0], D, page_table.shape[1])
    if config.kernel == "gqa":
        from pallas_kernels.decode_attention import paged_decode_attention

        out = paged_decode_attention(q[:, 0], k_cache, v_cache, page_table, kv_lens, block_pages=config.block_pages,
                                     num_warps=config.num_warps, interpret=interpret)
        return out[:, None]
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as pallas_paged_attention

    per_block = min(config.block_pages, page_table.shape[1] // config.k_splits)
    # the kernel does not scale the logits: fold 1/sqrt(D) into q (in float32, then back to q's dtype)
    q_scaled = (q[:, 0].astype(jnp.float32) / math.sqrt(D)).astype(q.dtype)                # [B, H, D]
    out = pallas_paged_attention(q_scaled, k_cache, v_cache, page_table, kv_lens.astype(jnp.int32),
                                 block_h=16, pages_per_compute_block=per_block, k_splits=config.k_splits,
                                 num_warps=config.num_warps, interpret=interpret)
    return out[:, None]


@dataclasses.dataclass(frozen=True)
class FusedAttentionConfig:
    """Knobs of ``pallas_kernels.fused_attention.fused_decode_attention``: pages per loop step, Triton's warps
    and pipeline stages, and whether each program loads its next block's page ids ahead. Summed over 192 and
    1152 tokens, the defaults were within 3% of the best knobs of the H200 sweeps at batch 32 and 64 (batch 128
    and 256: ``FUSED_ATTENTION_TABLE``); more pipeline stages cost up to 35% from batch 64 up
    (benchmarks/RESULTS.md, "Fused decode attention")."""

    block_pages: int = 4
    num_warps: int = 4
    num_stages: int = 1
    prefetch: bool = False


# Measured choices per batch size, an entry only where it beat the default by 5% in the kernel's
# micro-benchmark (device time summed over 192 and 1152 tokens: ``benchmarks/decode_profile.py --parts fused
# --fused-grid prefetch``) and the engine's step confirmed it (benchmarks/RESULTS.md, "Fifteenth session");
# batches not listed use ``FusedAttentionConfig()``.
FUSED_ATTENTION_TABLE: dict[int, FusedAttentionConfig] = {
    128: FusedAttentionConfig(block_pages=2, num_warps=2, num_stages=1, prefetch=True),   # 196 vs 211 us
    256: FusedAttentionConfig(block_pages=2, num_warps=2, num_stages=1, prefetch=True),   # 379 vs 411 us
}


def fused_tuning(batch: int, pages_per_seq: int) -> FusedAttentionConfig:
    """The fused decode-attention kernel's knobs for a batch on GPU (a block of pages dividing the width)."""
    chosen = FUSED_ATTENTION_TABLE.get(batch, FusedAttentionConfig())
    return dataclasses.replace(chosen, block_pages=_largest_pow2_divisor(pages_per_seq, chosen.block_pages))


def fused_attention_supported(cfg: ModelConfig, page_size: int, pages_per_seq: int) -> bool:
    from pallas_kernels import fused_attention

    return fused_attention.supported(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, pages_per_seq, page_size, 1)


def rope_tables(positions: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
    """cos, sin ``[B, D/2]`` float32 at ``positions: [B]``, computed as ``apply_rope`` does."""
    freqs = positions[:, None].astype(jnp.float32) * inv_freq
    return jnp.cos(freqs), jnp.sin(freqs)


def fused_paged_decode(qkv: Array, deltas: tuple[Array, Array, Array] | None, k_cache: Array, v_cache: Array,
                       page_table: Array, positions: Array, write_pages: Array, inv_freq: np.ndarray,
                       config: FusedAttentionConfig | None = None) -> tuple[Array, Array, Array]:
    """RoPE, cache write and decode attention in one kernel (``fused_decode_attention``), from model arrays.

    Args:
      qkv: ``[B, K, G + 2, D]`` the fused q/k/v projection of each sequence's new token (before RoPE).
      deltas: None or (dq ``[B, K, G, D]``, dk ``[B, K, D]``, dv ``[B, K, D]``) added before RoPE (LoRA, bias).
      k_cache, v_cache: ``[K, num_pages, page_size, D]``.
      page_table: ``[B, P]``; positions: ``[B]`` the new token's position (= tokens already cached);
      write_pages: ``[B]`` its page (``num_pages``: a padding row, nothing written).
      config: the kernel's knobs (None: ``fused_tuning``).

    Returns:
      (attn ``[B, 1, H, D]``, k_cache, v_cache). Off GPU the kernel runs in the Pallas interpreter.
    """
    from pallas_kernels.fused_attention import fused_decode_attention

    B = qkv.shape[0]
    config = config or fused_tuning(B, page_table.shape[1])
    cos, sin = rope_tables(positions, inv_freq)
    out, k_cache, v_cache = fused_decode_attention(
        qkv, k_cache, v_cache, page_table, positions, write_pages, cos, sin, deltas, block_pages=config.block_pages,
        num_warps=config.num_warps, num_stages=config.num_stages, prefetch=config.prefetch,
        interpret=jax.default_backend() != "gpu")
    return out[:, None], k_cache, v_cache
