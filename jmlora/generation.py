"""Simple batched generation over the decoder: one prefill, then one token per step.

This is the foundation's end-to-end path (used by ``jmlora generate`` and tests). The serving engine,
with continuous batching, bucketing and adapter-aware scheduling, builds its own loop on the same
``forward``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jmlora.config import ModelConfig
from jmlora.model import Params, forward_logits, init_kv_cache, init_params, load_params, make_mesh
from jmlora.model.loader import resolve_dtype
from jmlora.tokenizer import Tokenizer

LOAD_FORMATS = ("auto", "safetensors", "dummy")


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run: config, parameters on the mesh, tokenizer."""

    cfg: ModelConfig
    params: Params
    tokenizer: Tokenizer
    mesh: Mesh

    @classmethod
    def load(cls, model_dir: str | Path, *, dtype: str = "auto", max_model_len: int | None = None,
             mesh: Mesh | None = None, load_format: str = "auto") -> LoadedModel:
        """Reads config.json, the weights and the tokenizer from a Hugging Face model directory.

        Args:
          load_format: "auto" or "safetensors" read ``*.safetensors``; "dummy" (vLLM's name) makes random
            weights of the config's shapes on the devices instead, for benchmarks of models whose weights are
            not on the machine (the directory then needs only config.json and the tokenizer).
        """
        if load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}; got {load_format!r}")
        cfg = ModelConfig.from_pretrained(model_dir, max_model_len=max_model_len)
        mesh = mesh or make_mesh()
        if load_format == "dummy":
            params = init_params(cfg, mesh, dtype=resolve_dtype(dtype, cfg))
        else:
            params = load_params(model_dir, cfg, dtype=dtype, mesh=mesh)
        return cls(cfg, params, Tokenizer(model_dir), mesh)


@functools.partial(jax.jit, static_argnames=("temperature",))
def _sample(logits: jax.Array, key: jax.Array, temperature: float) -> jax.Array:
    """logits ``[B, V]`` -> token ids ``[B]`` (greedy at temperature 0)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


def generate_ids(model: LoadedModel, prompts: list[list[int]], *, max_new_tokens: int = 16,
                 temperature: float = 0.0, seed: int = 0, page_size: int = 16,
                 stop_ids: tuple[int, ...] | None = None) -> list[list[int]]:
    """Generates up to ``max_new_tokens`` tokens after each prompt.

    Args:
      model: the loaded model.
      prompts: token id lists (each non-empty).
      max_new_tokens: tokens to generate per prompt (fewer if a stop id comes first).
      temperature: 0 for greedy, else softmax sampling at this temperature.
      seed: sampling seed.
      page_size: KV cache page size.
      stop_ids: ids that end a sequence (default: the tokenizer's eos ids).

    Returns:
      The generated ids of each prompt (stop id included if reached).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token id lists")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    cfg = model.cfg
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_model_len:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_model_len {cfg.max_model_len}")
    for p in prompts:
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}); got a prompt with {min(p)}..{max(p)}")
    stop_ids = set(model.tokenizer.eos_token_ids if stop_ids is None else stop_ids)
    B = len(prompts)
    pages_per_seq = -(-(longest + max_new_tokens) // page_size)
    page_table = jnp.arange(B * pages_per_seq, dtype=jnp.int32).reshape(B, pages_per_seq)
    cache = init_kv_cache(cfg, B * pages_per_seq, page_size, model.params.embed.dtype, model.mesh)

    # Prefill: prompts right-padded to a power-of-two length so similar batches share one compilation.
    T = 1 << (longest - 1).bit_length()
    tokens = np.zeros((B, T), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    logits, cache = forward_logits(model.params, cfg, jnp.asarray(tokens), jnp.zeros(B, jnp.int32), lengths,
                                   page_table, cache)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]     # [B, V]
    key = jax.random.key(seed)
    outputs: list[list[int]] = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    pos = lengths
    for step in range(max_new_tokens):
        key, sub = jax.random.split(key)
        next_ids = _sample(last, sub, float(temperature))
        for i, t in enumerate(np.asarray(next_ids).tolist()):
            if not done[i]:
                outputs[i].append(t)
                done[i] = t in stop_ids
        if done.all() or step == max_new_tokens - 1:
            break
        logits, cache = forward_logits(model.params, cfg, next_ids[:, None], pos, jnp.ones(B, jnp.int32),
                                       page_table, cache)
        last = logits[:, 0]
        pos = pos + 1
    return outputs


def generate_text(model: LoadedModel, prompts: list[str], **kwargs) -> list[str]:
    """Tokenizes, generates (see ``generate_ids``) and detokenizes, skipping special tokens."""
    ids = [model.tokenizer.encode(p) for p in prompts]
    return [model.tokenizer.decode(out) for out in generate_ids(model, ids, **kwargs)]
