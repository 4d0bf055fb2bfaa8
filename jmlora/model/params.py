"""The decoder's parameters: declared once, with shape, logical axes and Hugging Face name.

``param_specs(cfg)`` is the single declaration. Random init (benchmarks, tests), sharding and checkpoint
loading (``jmlora.model.loader``) all derive from it, so adding a parameter means adding one line here.

Layouts (``x @ W``, input axis first): projections are split by head so that tensor parallelism can
shard heads, e.g. ``wq: [embed, heads, head_dim]``, ``wo: [heads, head_dim, embed]``.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jmlora.config import ModelConfig
from jmlora.sharding import filled, logical_sharding

Array = jax.Array


@flax.struct.dataclass
class LayerParams:
    """One decoder layer. Optional fields are None when the family does not have them."""

    attn_norm: Array                # [embed]
    wq: Array                       # [embed, heads, head_dim]
    wk: Array                       # [embed, kv_heads, head_dim]
    wv: Array                       # [embed, kv_heads, head_dim]
    wo: Array                       # [heads, head_dim, embed]
    mlp_norm: Array                 # [embed]
    w_gate: Array                   # [embed, mlp]
    w_up: Array                     # [embed, mlp]
    w_down: Array                   # [mlp, embed]
    bq: Array | None = None         # [heads, head_dim]
    bk: Array | None = None         # [kv_heads, head_dim]
    bv: Array | None = None         # [kv_heads, head_dim]
    bo: Array | None = None         # [embed]
    q_norm: Array | None = None     # [head_dim]
    k_norm: Array | None = None     # [head_dim]
    b_gate: Array | None = None     # [mlp]
    b_up: Array | None = None       # [mlp]
    b_down: Array | None = None     # [embed]


@flax.struct.dataclass
class Params:
    """The whole decoder. ``lm_head`` is None when tied to ``embed``."""

    embed: Array                    # [vocab, embed]
    layers: tuple[LayerParams, ...]
    final_norm: Array               # [embed]
    lm_head: Array | None = None    # [embed, vocab]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter's declaration.

    Attributes:
      path: ("embed",) or ("layers", i, "wq"): where it lives in ``Params``.
      shape, axes: our layout and its logical axis names.
      hf_name: the tensor name in a Hugging Face checkpoint.
      hf_shape: the shape that tensor must have there.
      transpose: the HF tensor is a torch Linear weight ``[out, in]``; ours is ``x @ W`` (in first).
        After the optional transpose the tensor is reshaped to ``shape`` (splitting heads).
      init: "normal", "ones" or "zeros" for random initialisation.
    """

    path: tuple
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    hf_name: str
    hf_shape: tuple[int, ...]
    transpose: bool = False
    init: str = "normal"

    def from_hf(self, tensor: np.ndarray) -> np.ndarray:
        """Converts a checkpoint tensor of ``hf_shape`` into our layout."""
        return (tensor.T if self.transpose else tensor).reshape(self.shape)


def param_specs(cfg: ModelConfig) -> list[ParamSpec]:
    """All parameters of a model, in checkpoint order."""
    E, H, K, D, M, V = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.intermediate_size, cfg.vocab_size)
    norm_init = "zeros" if cfg.norm_weight_offset else "ones"

    def vector(path, n, axis, name, init):
        return ParamSpec(path, (n,), (axis,), name, (n,), False, init)

    def linear(path, shape, axes, name, hf_shape):
        return ParamSpec(path, shape, axes, name, hf_shape, True)

    def head_bias(path, n_heads, axis, name):
        return ParamSpec(path, (n_heads, D), (axis, "head_dim"), name, (n_heads * D,), False, "zeros")

    specs = [ParamSpec(("embed",), (V, E), ("vocab", "embed"), "model.embed_tokens.weight", (V, E))]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        L = ("layers", i)
        specs += [
            vector((*L, "attn_norm"), E, "embed", p + "input_layernorm.weight", norm_init),
            linear((*L, "wq"), (E, H, D), ("embed", "heads", "head_dim"), p + "self_attn.q_proj.weight", (H * D, E)),
            linear((*L, "wk"), (E, K, D), ("embed", "kv_heads", "head_dim"), p + "self_attn.k_proj.weight",
                   (K * D, E)),
            linear((*L, "wv"), (E, K, D), ("embed", "kv_heads", "head_dim"), p + "self_attn.v_proj.weight",
                   (K * D, E)),
            linear((*L, "wo"), (H, D, E), ("heads", "head_dim", "embed"), p + "self_attn.o_proj.weight", (E, H * D)),
            vector((*L, "mlp_norm"), E, "embed", p + "post_attention_layernorm.weight", norm_init),
            linear((*L, "w_gate"), (E, M), ("embed", "mlp"), p + "mlp.gate_proj.weight", (M, E)),
            linear((*L, "w_up"), (E, M), ("embed", "mlp"), p + "mlp.up_proj.weight", (M, E)),
            linear((*L, "w_down"), (M, E), ("mlp", "embed"), p + "mlp.down_proj.weight", (E, M)),
        ]
        if cfg.qkv_bias:
            specs += [head_bias((*L, "bq"), H, "heads", p + "self_attn.q_proj.bias"),
                      head_bias((*L, "bk"), K, "kv_heads", p + "self_attn.k_proj.bias"),
                      head_bias((*L, "bv"), K, "kv_heads", p + "self_attn.v_proj.bias")]
        if cfg.o_bias:
            specs.append(vector((*L, "bo"), E, "embed", p + "self_attn.o_proj.bias", "zeros"))
        if cfg.qk_norm:
            specs += [vector((*L, "q_norm"), D, "head_dim", p + "self_attn.q_norm.weight", "ones"),
                      vector((*L, "k_norm"), D, "head_dim", p + "self_attn.k_norm.weight", "ones")]
        if cfg.mlp_bias:
            specs += [vector((*L, "b_gate"), M, "mlp", p + "mlp.gate_proj.bias", "zeros"),
                      vector((*L, "b_up"), M, "mlp", p + "mlp.up_proj.bias", "zeros"),
                      vector((*L, "b_down"), E, "embed", p + "mlp.down_proj.bias", "zeros")]
    specs.append(vector(("final_norm",), E, "embed", "model.norm.weight", norm_init))
    if not cfg.tie_word_embeddings:
        specs.append(linear(("lm_head",), (E, V), ("embed", "vocab"), "lm_head.weight", (V, E)))
    return specs


def assemble_params(cfg: ModelConfig, values: dict[tuple, Array]) -> Params:
    """Builds a ``Params`` from ``{spec.path: array}`` for every spec of ``param_specs(cfg)``."""
    layers = []
    for i in range(cfg.num_layers):
        fields = {path[2]: v for path, v in values.items() if path[0] == "layers" and path[1] == i}
        layers.append(LayerParams(**fields))
    return Params(embed=values[("embed",)], layers=tuple(layers), final_norm=values[("final_norm",)],
                  lm_head=values.get(("lm_head",)))


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> Params:
    """A ``Params``-shaped pytree of NamedShardings (for ``jax.jit(in_shardings=...)``)."""
    return assemble_params(cfg, {s.path: logical_sharding(mesh, s.axes, s.shape) for s in param_specs(cfg)})


def init_params(cfg: ModelConfig, mesh: Mesh, *, dtype=jnp.bfloat16, seed: int = 0,
                scale: float = 0.02) -> Params:
    """Random parameters made directly on the devices, each with its target sharding.

    Used by benchmarks (an 8B-shaped model made on the GPU without a checkpoint) and tests.
    """
    values = {}
    key = jax.random.key(seed)
    for spec in param_specs(cfg):
        key, sub = jax.random.split(key)
        sharding = logical_sharding(mesh, spec.axes, spec.shape)
        if spec.init == "normal":
            values[spec.path] = _normal_fn(spec.shape, jnp.dtype(dtype), float(scale), sharding)(sub)
        else:
            values[spec.path] = filled(spec.shape, dtype, sharding, 1.0 if spec.init == "ones" else 0.0)
    return assemble_params(cfg, values)


@functools.cache
def _normal_fn(shape, dtype, scale, sharding):
    """A jitted random-normal maker, cached so that same-shaped parameters (every layer's) compile once."""
    return jax.jit(lambda k: (scale * jax.random.normal(k, shape, jnp.float32)).astype(dtype), out_shardings=sharding)
