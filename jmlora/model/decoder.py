"""The pure-functional decoder: embeddings, decoder layers over a paged KV cache, final norm, LM head.

``forward`` runs one chunk of new tokens per sequence, so prefill (``start_pos == 0``), chunked prefill
and single-token decode (``T == 1``) share one code path. Layers are a Python loop (unrolled under jit)
with one cache array per layer, updated in place when the cache is donated: a ``lax.scan`` over layers
with the cache as a scanned carry made XLA copy the whole cache every step (DESIGN.md).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jmlora.config import ModelConfig
from jmlora.lora.routing import FEW_ADAPTERS, LoRABatch, apply_lora, apply_lora_group, prepare_lora, resolve_impl
from jmlora.model.attention import (
    KVCache,
    apply_rope,
    fused_attention_supported,
    fused_paged_decode,
    paged_attention,
    resolve_attention_impl,
    rope_inv_freq,
    write_kv,
)
from jmlora.model.params import LayerParams, Params

Array = jax.Array


def rms_norm(x: Array, weight: Array, eps: float, weight_offset: float) -> Array:
    """RMSNorm over the last axis, computed in float32.

    Llama/Qwen multiply the normalised value, cast back to x's dtype, by ``weight``; Gemma multiplies by
    ``1 + weight`` in float32 and casts after. Both orders are kept so bf16 results match transformers.
    """
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if weight_offset:
        return (normed * (weight_offset + weight.astype(jnp.float32))).astype(x.dtype)
    return weight * normed.astype(x.dtype)


def _activation(name: str):
    if name == "silu":
        return jax.nn.silu
    if name == "gelu_pytorch_tanh":
        return functools.partial(jax.nn.gelu, approximate=True)
    return functools.partial(jax.nn.gelu, approximate=False)


def _bias(y: Array, b: Array | None) -> Array:
    return y if b is None else y + b


def _dense(x: Array, w: Array, spec: str) -> Array:
    """An einsum with output in x's dtype. XLA accumulates bf16 products in float32 on GPU/TPU/CPU anyway;
    asking for a float32 result and casting back cost one extra kernel per matmul on the H200 (measured
    in benchmarks/RESULTS.md, "Decode step diagnostics")."""
    return jnp.einsum(spec, x, w)


# Decode projections run the Pallas skinny GEMM (``pallas_kernels.gemm``) where its table holds the shape and the
# backend is one GPU: "auto" (a pallas_call is not partitioned, so with several devices the weights' sharded XLA
# GEMM stays). "xla" keeps XLA's GEMM everywhere (benchmarks' A/B); "pallas" also runs the table's shapes off
# GPU, in the Pallas interpreter (tests). "mgpu" is "pallas" with the shapes of ``pallas_kernels.ws_gemm``'s
# table on that Mosaic GPU GEMM first (an A/B knob of benchmarks/throughput.py, Hopper only; off GPU its
# interpreter). Read while tracing.
DECODE_GEMM_IMPL = "auto"


def _project(x: Array, w: Array, spec: str) -> Array:
    """``_dense`` for a projection whose einsum contracts all of x's dims after (b, t) with w's leading dims
    (``"bte,ekgd->btkgd"``, ``"bthd,hde->bte"``, ...): by the Pallas skinny GEMM where ``DECODE_GEMM_IMPL``
    and the kernel's table say so (with "mgpu", first by the Mosaic GPU GEMM where its table does), else by
    XLA."""
    from pallas_kernels.gemm import decode_gemm_config, gemm

    x_dims, rest = spec.split(",")
    w_dims, out_dims = rest.split("->")
    contracted = x_dims[2:]
    on_gpu = jax.default_backend() == "gpu"
    auto_off = not on_gpu or jax.device_count() > 1
    if (DECODE_GEMM_IMPL == "xla" or (DECODE_GEMM_IMPL == "auto" and auto_off) or not x_dims.startswith("bt")
            or not w_dims.startswith(contracted) or out_dims != "bt" + w_dims[len(contracted):]):
        return _dense(x, w, spec)
    lead, out_shape = x.shape[:2], w.shape[len(contracted):]
    k = math.prod(x.shape[2:])
    m, n = math.prod(lead), math.prod(out_shape)
    if DECODE_GEMM_IMPL == "mgpu":
        from pallas_kernels.ws_gemm import ws_gemm, ws_gemm_config  # Mosaic GPU: imported only when asked for

        if (ws_config := ws_gemm_config(m, k, n)) is not None:
            y = ws_gemm(x.reshape(-1, k), w.reshape(k, -1), config=ws_config, interpret=not on_gpu)
            return y.reshape(*lead, *out_shape)
    config = decode_gemm_config(m, k, n)
    if config is None:
        return _dense(x, w, spec)
    y = gemm(x.reshape(-1, k), w.reshape(k, -1), config, interpret=not on_gpu)
    return y.reshape(*lead, *out_shape)


class _LayerLoRA:
    """The adapter inputs of one layer: adds each row's LoRA term to a projection's output."""

    def __init__(self, lora: LoRABatch | None, layer: int, impl: str):
        self.targets = {} if lora is None else lora.bank.layers[layer]
        self.lora, self.impl = lora, impl
        self.packed = {} if lora is None or lora.packed is None else lora.packed["layers"][layer]

    def project(self, x: Array, w: Array, spec: str, group: str, tile_target=None) -> tuple[Array, bool]:
        """``_project``, and whether the LoRA terms of ``group`` (``routing.PACKED_GROUPS``) are in it already:
        with packed adapters (``routing.PACKED_IMPL``) the projection and its LoRA terms run in one Mosaic GPU
        launch (``pallas_kernels.ws_lora``) where that kernel's table holds the shape. ``tile_target(cta_n)``:
        for groups of several targets, the map from a CTA tile's column index to its target, or None where
        tiles that wide would straddle two."""
        if group not in self.packed:
            return _project(x, w, spec), False
        from pallas_kernels.ws_lora import ws_lora_config, ws_lora_gemm  # Mosaic GPU: imported only when asked for

        n_x = x.ndim - 2
        m, k, n = math.prod(x.shape[:2]), math.prod(x.shape[2:]), math.prod(w.shape[n_x:])
        config = ws_lora_config(m, k, n)
        targets = None if config is None or tile_target is None else tile_target(config.gemm.cta_tile[1])
        if config is None or (tile_target is not None and targets is None):
            return _project(x, w, spec), False
        a, b = self.packed[group]
        y = ws_lora_gemm(x.reshape(m, k), w.reshape(k, n), a, b, self.lora.packed["pos"], config=config,
                         rank=b.shape[0] // FEW_ADAPTERS, tile_target=targets,
                         interpret=jax.default_backend() != "gpu")
        return y.reshape(*x.shape[:2], *w.shape[n_x:]), True

    def __call__(self, y: Array, x: Array, target: str) -> Array:
        """y: the base projection's output ``[B, T, ...out]``; x: its input ``[B, T, in]``."""
        if target not in self.targets:
            return y
        return apply_lora(y, x, self.targets[target], self.lora.slot_ids, self.lora.bank.ranks, self.impl,
                          self.lora.tiles)

    def group(self, ys: tuple[Array, ...], x: Array, targets: tuple[str, ...]) -> tuple[Array, ...]:
        """``__call__`` for projections that share the input x (q/k/v, gate/up), applied together."""
        present = [i for i, t in enumerate(targets) if t in self.targets]
        if len(present) < 2:
            return tuple(self(y, x, t) for y, t in zip(ys, targets))
        outs = apply_lora_group(tuple(ys[i] for i in present), x, tuple(self.targets[targets[i]] for i in present),
                                self.lora.slot_ids, self.lora.bank.ranks, self.impl, self.lora.tiles)
        out = list(ys)
        for i, o in zip(present, outs):
            out[i] = o
        return tuple(out)

    def deltas(self, x: Array, shapes: tuple[tuple[int, ...], ...], targets: tuple[str, ...]
               ) -> tuple[Array, ...] | None:
        """The LoRA terms alone of projections that share x (zeros for a target without adapters), or None
        when the layer has no adapters at all."""
        if not any(t in self.targets for t in targets):
            return None
        return self.group(tuple(jnp.zeros(s, x.dtype) for s in shapes), x, targets)


def decoder_layer(cfg: ModelConfig, layer: LayerParams, x: Array, positions: Array, k_cache: Array,
                  v_cache: Array, page_idx: Array, slot_idx: Array, page_table: Array,
                  kv_lens: Array, lora: _LayerLoRA, attention_impl: str = "reference") -> tuple[Array, Array, Array]:
    """One pre-norm decoder layer.

    Args:
      x: ``[B, T, E]`` residual stream.
      positions: ``[B, T]`` absolute positions of the new tokens.
      k_cache, v_cache: this layer's ``[num_pages, page_size, K, D]`` caches.
      page_idx, slot_idx: ``[B, T]`` where each new token's K/V go (``num_pages`` = padding, dropped).
      page_table: ``[B, P]``; kv_lens: ``[B]`` valid cached tokens after this chunk.
      lora: adds each row's adapter to the targeted projections.
      attention_impl: a resolved ``jmlora.model.attention.ATTENTION_IMPLS`` name.

    Returns:
      (x ``[B, T, E]``, k_cache, v_cache).
    """
    eps, offset = cfg.rms_norm_eps, cfg.norm_weight_offset
    inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim)
    fused = (attention_impl == "pallas_gpu_fused" and layer.w_qkv is not None and not cfg.qk_norm
             and fused_attention_supported(cfg, k_cache.shape[2], page_table.shape[1]))
    if attention_impl == "pallas_gpu_fused" and not fused:
        attention_impl = "pallas_gpu"
    with jax.named_scope("attention"):
        h = rms_norm(x, layer.attn_norm, eps, offset)
        if fused:
            attn, k_cache, v_cache = _fused_attention(cfg, layer, h, positions, k_cache, v_cache, page_idx, page_table,
                                                      lora, inv_freq)
        else:
            attn, k_cache, v_cache = _attention(cfg, layer, h, positions, k_cache, v_cache, page_idx, slot_idx,
                                                page_table, kv_lens, lora, inv_freq, attention_impl)
        B, T = attn.shape[:2]
        o, done = lora.project(attn, layer.wo, "bthd,hde->bte", "o")
        o = _bias(o, layer.bo)
        x = x + (o if done else lora(o, attn.reshape(B, T, -1), "o_proj"))
    with jax.named_scope("mlp"):
        h = rms_norm(x, layer.mlp_norm, eps, offset)
        M = layer.w_gate_up.shape[-1]
        gate_up, done = lora.project(h, layer.w_gate_up, "bte,egm->btgm", "gate_up",  # [B, T, 2, M]
                                     lambda cta_n: (lambda ni: ni * cta_n // M) if M % cta_n == 0 else None)
        gate, up = _bias(gate_up[:, :, 0], layer.b_gate), _bias(gate_up[:, :, 1], layer.b_up)
        if not done:
            gate, up = lora.group((gate, up), h, ("gate_proj", "up_proj"))
        h = _activation(cfg.activation)(gate) * up
        down, done = lora.project(h, layer.w_down, "btm,me->bte", "down")
        down = _bias(down, layer.b_down)
        x = x + (down if done else lora(down, h, "down_proj"))
    return x, k_cache, v_cache


def _attention(cfg: ModelConfig, layer: LayerParams, h: Array, positions: Array, k_cache: Array, v_cache: Array,
               page_idx: Array, slot_idx: Array, page_table: Array, kv_lens: Array, lora: _LayerLoRA,
               inv_freq, attention_impl: str) -> tuple[Array, Array, Array]:
    """q/k/v projections, RoPE, cache writes and attention as separate steps (any chunk length).

    Returns:
      (attn ``[B, T, H, D]``, k_cache, v_cache).
    """
    eps, offset = cfg.rms_norm_eps, cfg.norm_weight_offset
    done = False
    if layer.w_qkv is not None:
        qkv, done = lora.project(h, layer.w_qkv, "bte,ekgd->btkgd", "qkv", _qkv_tiles(layer))  # [B, T, K, G+2, D]
        B, T, K, G2, D = qkv.shape
        q, k, v = qkv[:, :, :, :G2 - 2].reshape(B, T, K * (G2 - 2), D), qkv[:, :, :, -2], qkv[:, :, :, -1]
    else:
        q = _dense(h, layer.wq, "bte,ehd->bthd")                                    # [B, T, H, D]
        k = _dense(h, layer.wk, "bte,ekd->btkd")                                    # [B, T, K, D]
        v = _dense(h, layer.wv, "bte,ekd->btkd")
    q, k, v = _bias(q, layer.bq), _bias(k, layer.bk), _bias(v, layer.bv)
    if not done:
        q, k, v = lora.group((q, k, v), h, ("q_proj", "k_proj", "v_proj"))
    if cfg.qk_norm:
        q = rms_norm(q, layer.q_norm, eps, offset)
        k = rms_norm(k, layer.k_norm, eps, offset)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    k_cache = write_kv(k_cache, k, page_idx, slot_idx)
    v_cache = write_kv(v_cache, v, page_idx, slot_idx)
    attn = paged_attention(q, k_cache, v_cache, page_table, positions, kv_lens, impl=attention_impl)  # [B,T,H,D]
    return attn, k_cache, v_cache


def _qkv_tiles(layer: LayerParams):
    """``_LayerLoRA.project``'s ``tile_target`` for the fused q/k/v weights ``[E, K, G + 2, D]``: per KV head, G
    tiles of q, one of k, one of v, when a CTA tile is one head wide."""
    G, D = layer.w_qkv.shape[2] - 2, layer.w_qkv.shape[3]
    return lambda cta_n: (lambda ni: jnp.maximum(ni % (G + 2) - (G - 1), 0)) if cta_n == D else None


# Decode batches up to this size add the q/k/v LoRA deltas (and biases) inside the fused attention kernel,
# larger ones with XLA before it. Measured on the H200 (benchmarks/RESULTS.md, "Twelfth session"): with the
# delta inputs the kernel took 34 against 26 us per layer at batch 64 / 192 tokens, with nothing else running
# (the cause is not isolated), and XLA's add cut the LoRA step by up to 11% at batch 64-128 with 1152 tokens;
# at batch 32 the kernel's add was ~1% faster in all four cells.
FUSED_DELTAS_MAX_BATCH = 32


def _fused_attention(cfg: ModelConfig, layer: LayerParams, h: Array, positions: Array, k_cache: Array,
                     v_cache: Array, page_idx: Array, page_table: Array, lora: _LayerLoRA, inv_freq
                     ) -> tuple[Array, Array, Array]:
    """Decode (T == 1) with the fused q/k/v weights: the projection, then one kernel for RoPE, the cache
    writes and attention (``fused_paged_decode``); LoRA terms and biases go in as deltas, or, above
    ``FUSED_DELTAS_MAX_BATCH`` rows, are added to the projection first.

    Returns:
      (attn ``[B, 1, H, D]``, k_cache, v_cache).
    """
    qkv, done = lora.project(h, layer.w_qkv, "bte,ekgd->btkgd", "qkv", _qkv_tiles(layer))
    qkv = qkv[:, 0]                                                                     # [B, K, G + 2, D]
    B, K, G2, D = qkv.shape
    shapes = ((B, 1, K * (G2 - 2), D), (B, 1, K, D), (B, 1, K, D))
    deltas = None if done else lora.deltas(h, shapes, ("q_proj", "k_proj", "v_proj"))
    biases = (layer.bq, layer.bk, layer.bv)
    if deltas is None and any(b is not None for b in biases):
        deltas = tuple(jnp.zeros(s, h.dtype) for s in shapes)
    if deltas is not None:
        dq, dk, dv = (_bias(d, b) for d, b in zip(deltas, biases))
        deltas = (dq.reshape(B, K, G2 - 2, D), dk.reshape(B, K, D), dv.reshape(B, K, D))
        if B > FUSED_DELTAS_MAX_BATCH:
            dq, dk, dv = deltas
            qkv = qkv + jnp.concatenate([dq, dk[:, :, None], dv[:, :, None]], axis=2).astype(qkv.dtype)
            deltas = None
    return fused_paged_decode(qkv, deltas, k_cache, v_cache, page_table, positions[:, 0], page_idx[:, 0], inv_freq)


def forward(params: Params, cfg: ModelConfig, tokens: Array, start_pos: Array, num_tokens: Array,
            page_table: Array, cache: KVCache, lora: LoRABatch | None = None,
            lora_impl: str = "auto", attention_impl: str = "auto") -> tuple[Array, KVCache]:
    """Runs a chunk of new tokens through the decoder, writing their K/V into the cache.

    Args:
      params: model parameters.
      cfg: model config (static).
      tokens: ``[B, T]`` int32 new tokens, right-padded.
      start_pos: ``[B]`` int32 tokens already in the cache for each sequence (0 for a fresh prefill).
      num_tokens: ``[B]`` int32 how many of the T tokens are real; padding is neither written nor attended.
      page_table: ``[B, P]`` int32 pages of each sequence; must cover ``start_pos + num_tokens`` tokens.
      cache: the KV cache.
      lora: the adapter bank and each row's slot (``[B]``, 0 = base model only); None for no adapters.
      lora_impl: the routing formulation (``jmlora.lora.routing.LORA_IMPLS``) or "auto" (static).
      attention_impl: "reference", "pallas_gpu" (decode on GPU) or "auto" (static).

    Returns:
      (hidden ``[B, T, E]`` after the final norm, updated cache).
    """
    B, T = tokens.shape
    page_size, num_pages = cache.page_size, cache.num_pages
    offsets = jnp.arange(T, dtype=jnp.int32)
    positions = start_pos[:, None] + offsets[None, :]                              # [B, T]
    valid = offsets[None, :] < num_tokens[:, None]                                  # [B, T]
    page_col = jnp.minimum(positions // page_size, page_table.shape[1] - 1)
    page_idx = jnp.where(valid, jnp.take_along_axis(page_table, page_col, axis=1), num_pages)
    slot_idx = positions % page_size
    kv_lens = start_pos + num_tokens

    dtype = params.embed.dtype
    x = params.embed[tokens]                                                        # [B, T, E]
    if cfg.embed_scale != 1.0:
        x = x * jnp.asarray(cfg.embed_scale, dtype)
    impl = resolve_impl(lora_impl, T, B)
    attn_impl = resolve_attention_impl(attention_impl, T, B, cfg.num_kv_heads)
    lora = prepare_lora(lora, T, impl, cfg.num_kv_heads)  # tiles, packed adapters: once per forward or decode call
    new_k, new_v = [], []
    for i, layer in enumerate(params.layers):
        with jax.named_scope(f"layer_{i}"):
            x, k, v = decoder_layer(cfg, layer, x, positions, cache.k[i], cache.v[i], page_idx, slot_idx,
                                    page_table, kv_lens, _LayerLoRA(lora, i, impl), attn_impl)
        new_k.append(k)
        new_v.append(v)
    x = rms_norm(x, params.final_norm, cfg.rms_norm_eps, cfg.norm_weight_offset)
    return x, KVCache(k=tuple(new_k), v=tuple(new_v))


def compute_logits(params: Params, hidden: Array) -> Array:
    """LM head: ``hidden [..., E]`` -> float32 logits ``[..., V]`` (the tied embedding when no head)."""
    if params.lm_head is None:
        return jnp.einsum("...e,ve->...v", hidden, params.embed, preferred_element_type=jnp.float32)
    return jnp.einsum("...e,ev->...v", hidden, params.lm_head, preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("cfg", "lora_impl", "attention_impl"), donate_argnames=("cache",))
def forward_logits(params: Params, cfg: ModelConfig, tokens: Array, start_pos: Array, num_tokens: Array,
                   page_table: Array, cache: KVCache, lora: LoRABatch | None = None,
                   lora_impl: str = "auto", attention_impl: str = "auto") -> tuple[Array, KVCache]:
    """``forward`` + LM head at every position, jitted with the cache donated.

    Returns:
      (logits ``[B, T, V]`` float32, updated cache).
    """
    hidden, cache = forward(params, cfg, tokens, start_pos, num_tokens, page_table, cache, lora, lora_impl,
                            attention_impl)
    return compute_logits(params, hidden), cache
