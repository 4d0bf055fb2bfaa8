"""The decoder's parameters: declared once, with shape, logical axes and Hugging Face name.

``param_specs(cfg)`` is the single declaration. Random init (benchmarks, tests), sharding and checkpoint
loading (``jmlora.model.loader``) all derive from it, so adding a parameter means adding one line here.

Layouts (``x @ W``, input axis first): projections are split by head so that tensor parallelism can
shard heads, e.g. ``wo: [heads, head_dim, embed]``.

Projections that share an input are one weight, so that a decode step runs one larger matmul instead of
several small ones (on the H200 the 32 layers' matmuls of a batch-32 step took 4.83 ms as seven projections
and 4.20 ms as four; ``benchmarks/gemm_probe.py``, RESULTS.md "Fused projection weights"):

- ``w_gate_up: [embed, 2, mlp]``: gate_proj then up_proj.
- ``w_qkv: [embed, kv_heads, q_per_kv + 2, head_dim]``: for each KV head, its ``q_per_kv`` query heads (query
  head ``h`` belongs to KV head ``h // q_per_kv``), then its key head, then its value head. Sharding the
  ``kv_heads`` axis gives each device whole groups. When the model axis does not divide the KV heads,
  q, k and v stay separate (``wq: [embed, heads, head_dim]``, ``wk``, ``wv``) so that the query heads can still
  be split; ``param_specs(cfg, model_parallel)`` decides.
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
from jmlora.sharding import MODEL_AXIS, filled, logical_sharding

Array = jax.Array


@flax.struct.dataclass
class LayerParams:
    """One decoder layer. Optional fields are None when the family does not have them."""

    attn_norm: Array                # [embed]
    wo: Array                       # [heads, head_dim, embed]
    mlp_norm: Array                 # [embed]
    w_gate_up: Array                # [embed, 2, mlp]
    w_down: Array                   # [mlp, embed]
    w_qkv: Array | None = None      # [embed, kv_heads, q_per_kv + 2, head_dim], or None when q/k/v separate:
    wq: Array | None = None         # [embed, heads, head_dim]
    wk: Array | None = None         # [embed, kv_heads, head_dim]
    wv: Array | None = None         # [embed, kv_heads, head_dim]
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
      path: ("embed",) or ("layers", i, "wo"): where it lives in ``Params``.
      shape, axes: our layout and its logical axis names.
      hf: the Hugging Face checkpoint tensors it is made of, as (name, shape there); several for a fused
        weight, in the order ``fuse`` joins them.
      transpose: the HF tensors are torch Linear weights ``[out, in]``; ours is ``x @ W`` (in first).
      fuse: how several tensors join: None (one tensor, reshaped to ``shape``), "qkv" (q/k/v into
        ``[embed, kv_heads, q_per_kv + 2, head_dim]``) or "stack" (along a new axis 1).
      init: "normal", "ones" or "zeros" for random initialisation.
    """

    path: tuple
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    hf: tuple[tuple[str, tuple[int, ...]], ...]
    transpose: bool = False
    init: str = "normal"
    fuse: str | None = None

    def from_hf(self, tensors: list[np.ndarray]) -> np.ndarray:
        """Converts the checkpoint tensors (``hf`` order and shapes) into our layout."""
        ts = [t.T if self.transpose else t for t in tensors]
        if self.fuse is None:
            return ts[0].reshape(self.shape)
        if self.fuse == "stack":
            return np.stack(ts, axis=1).reshape(self.shape)
        if self.fuse == "qkv":
            E, K, G2, D = self.shape
            q, k, v = ts
            return np.concatenate([q.reshape(E, K, G2 - 2, D), k.reshape(E, K, 1, D), v.reshape(E, K, 1, D)],
                                  axis=2)
        raise ValueError(f"unknown fuse {self.fuse!r}")


def fuses_qkv(cfg: ModelConfig, model_parallel: int = 1) -> bool:
    """Whether q/k/v are one weight: when the model axis splits the KV heads evenly (see the module doc)."""
    return cfg.num_kv_heads % model_parallel == 0


def param_specs(cfg: ModelConfig, model_parallel: int = 1) -> list[ParamSpec]:
    """All parameters of a model, in checkpoint order, for a mesh whose model axis has ``model_parallel``
    devices (which decides ``fuses_qkv``)."""
    E, H, K, D, M, V = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.intermediate_size, cfg.vocab_size)
    norm_init = "zeros" if cfg.norm_weight_offset else "ones"

    def vector(path, n, axis, name, init):
        return ParamSpec(path, (n,), (axis,), ((name, (n,)),), False, init)

    def linear(path, shape, axes, *hf, fuse=None):
        return ParamSpec(path, shape, axes, hf, True, fuse=fuse)

    def head_bias(path, n_heads, axis, name):
        return ParamSpec(path, (n_heads, D), (axis, "head_dim"), ((name, (n_heads * D,)),), False, "zeros")

    specs = [ParamSpec(("embed",), (V, E), ("vocab", "embed"), (("model.embed_tokens.weight", (V, E)),))]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        L = ("layers", i)
        q_hf = (p + "self_attn.q_proj.weight", (H * D, E))
        k_hf = (p + "self_attn.k_proj.weight", (K * D, E))
        v_hf = (p + "self_attn.v_proj.weight", (K * D, E))
        specs.append(vector((*L, "attn_norm"), E, "embed", p + "input_layernorm.weight", norm_init))
        if fuses_qkv(cfg, model_parallel):
            specs.append(linear((*L, "w_qkv"), (E, K, H // K + 2, D), ("embed", "kv_heads", None, "head_dim"),
                                q_hf, k_hf, v_hf, fuse="qkv"))
        else:
            specs += [linear((*L, "wq"), (E, H, D), ("embed", "heads", "head_dim"), q_hf),
                      linear((*L, "wk"), (E, K, D), ("embed", "kv_heads", "head_dim"), k_hf),
                      linear((*L, "wv"), (E, K, D), ("embed", "kv_heads", "head_dim"), v_hf)]
        specs += [
            linear((*L, "wo"), (H, D, E), ("heads", "head_dim", "embed"), (p + "self_attn.o_proj.weight", (E, H * D))),
            vector((*L, "mlp_norm"), E, "embed", p + "post_attention_layernorm.weight", norm_init),
            linear((*L, "w_gate_up"), (E, 2, M), ("embed", None, "mlp"), (p + "mlp.gate_proj.weight", (M, E)),
                   (p + "mlp.up_proj.weight", (M, E)), fuse="stack"),
            linear((*L, "w_down"), (M, E), ("mlp", "embed"), (p + "mlp.down_proj.weight", (E, M))),
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
        specs.append(linear(("lm_head",), (E, V), ("embed", "vocab"), ("lm_head.weight", (V, E))))
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
    return assemble_params(cfg, {s.path: logical_sharding(mesh, s.axes, s.shape)
                                 for s in param_specs(cfg, mesh.shape[MODEL_AXIS])})


def init_params(cfg: ModelConfig, mesh: Mesh, *, dtype=jnp.bfloat16, seed: int = 0,
                scale: float = 0.02) -> Params:
    """Random parameters made directly on the devices, each with its target sharding.

    Used by benchmarks (an 8B-shaped model made on the GPU without a checkpoint) and tests.
    """
    values = {}
    key = jax.random.key(seed)
    for spec in param_specs(cfg, mesh.shape[MODEL_AXIS]):
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
