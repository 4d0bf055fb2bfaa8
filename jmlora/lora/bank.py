"""The stacked adapter bank: every device-resident LoRA adapter in fixed-shape arrays.

For each layer and each target projection the bank holds ``a: [S, in, R]`` and ``b: [S, R, out]``, where
``S = max_loras + 1`` slots (slot 0 is the all-zero adapter, so base-only rows take the same path) and
``R = max_lora_rank``. Each adapter is zero-padded to ``R`` and to the bank's full target set, with its
scaling already folded into ``b``; ``ranks: [S]`` keeps each slot's true (largest) rank so kernels can
skip the padding. Writing an adapter into a slot changes array contents only, through one jitted,
donating update: no reallocation and no recompilation, whichever slot or adapter.

Memory: ``S * sum over layers and targets of (in + out) * R`` elements; for a Llama-3-8B shape with all
seven targets at R = 16 that is 41.9M elements (83.9 MB in bfloat16) per slot, so 64 slots take 5.4 GB.
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
from jmlora.lora.peft import LORA_TARGETS, AdapterError, LoRAWeights, target_shapes
from jmlora.sharding import filled, logical_sharding

Array = jax.Array

# Logical axes of each target's input and output features (for tensor-parallel sharding of the bank).
_TARGET_AXES = {
    "q_proj": ("embed", "heads"), "k_proj": ("embed", "kv_heads"), "v_proj": ("embed", "kv_heads"),
    "o_proj": ("heads", "embed"), "gate_proj": ("embed", "mlp"), "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
}


@dataclasses.dataclass(frozen=True)
class BankSpec:
    """The static shape of a bank.

    Attributes:
      max_loras: adapters resident on the device at once (slots 1..max_loras; slot 0 is the zero adapter).
      max_lora_rank: R, the padded rank.
      targets: the projections the bank holds (a subset of ``LORA_TARGETS``).
    """

    max_loras: int
    max_lora_rank: int
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        unknown = set(self.targets) - set(LORA_TARGETS)
        if unknown or not self.targets:
            raise ValueError(f"targets must be a non-empty subset of {LORA_TARGETS}, got {self.targets}")
        object.__setattr__(self, "targets", tuple(t for t in LORA_TARGETS if t in self.targets))

    @property
    def num_slots(self) -> int:
        return self.max_loras + 1

    def slot_elements(self, cfg: ModelConfig) -> int:
        """Elements of one padded adapter (a and b, every layer and target)."""
        shapes = target_shapes(cfg)
        return cfg.num_layers * sum((shapes[t][0] + shapes[t][1]) * self.max_lora_rank for t in self.targets)


@flax.struct.dataclass
class TargetBank:
    """One target projection of one layer, for every slot."""

    a: Array    # [S, in, R]
    b: Array    # [S, R, out]   (scaling folded in)


@flax.struct.dataclass
class AdapterBank:
    """All slots of all targets. ``layers[i][target]`` is a TargetBank; ``ranks`` is ``[S]`` int32."""

    layers: tuple[dict[str, TargetBank], ...]
    ranks: Array

    @property
    def num_slots(self) -> int:
        return self.ranks.shape[0]


def init_adapter_bank(cfg: ModelConfig, spec: BankSpec, *, dtype, mesh: Mesh) -> AdapterBank:
    """An all-zero bank (every slot the zero adapter), each array placed with its sharding."""
    shapes = target_shapes(cfg)
    S, R = spec.num_slots, spec.max_lora_rank

    def zeros(shape, axes):
        return filled(shape, dtype, logical_sharding(mesh, axes, shape))

    layers = []
    for _ in range(cfg.num_layers):
        layer = {}
        for t in spec.targets:
            (n_in, n_out), (in_axis, out_axis) = shapes[t], _TARGET_AXES[t]
            layer[t] = TargetBank(a=zeros((S, n_in, R), ("lora_slots", in_axis, "lora_rank")),
                                  b=zeros((S, R, n_out), ("lora_slots", "lora_rank", out_axis)))
        layers.append(layer)
    ranks = jax.device_put(np.zeros(S, np.int32), logical_sharding(mesh, ("lora_slots",)))
    return AdapterBank(layers=tuple(layers), ranks=ranks)


def adapter_arrays(weights: LoRAWeights, cfg: ModelConfig, spec: BankSpec, dtype) -> tuple[tuple, int]:
    """Pads one adapter to the bank's shape on the host.

    Returns:
      (a pytree shaped like one slot of ``AdapterBank.layers`` holding numpy arrays ``a [in, R]`` and
      ``b [R, out]`` in ``dtype``, the adapter's rank).

    Raises:
      AdapterError: the adapter targets a projection the bank does not hold, or its rank exceeds R.
    """
    missing = set(weights.targets) - set(spec.targets)
    if missing:
        raise AdapterError(f"adapter {weights.name!r} targets {sorted(missing)}, which this engine's adapter bank "
                           f"does not hold (bank targets: {list(spec.targets)})")
    if weights.rank > spec.max_lora_rank:
        raise AdapterError(f"adapter {weights.name!r} has rank {weights.rank} > max_lora_rank {spec.max_lora_rank}")
    shapes = target_shapes(cfg)
    R = spec.max_lora_rank
    np_dtype = np.dtype(dtype)
    layers = []
    for i in range(cfg.num_layers):
        layer = {}
        for t in spec.targets:
            n_in, n_out = shapes[t]
            a = np.zeros((n_in, R), np_dtype)
            b = np.zeros((R, n_out), np_dtype)
            if (i, t) in weights.layers:
                a_w, b_w = weights.layers[(i, t)]
                a[:, :a_w.shape[1]] = a_w
                b[:b_w.shape[0]] = b_w
            layer[t] = TargetBank(a=a, b=b)
        layers.append(layer)
    return tuple(layers), weights.rank


@functools.partial(jax.jit, donate_argnames=("bank",))
def _write_slot(bank: AdapterBank, slot: Array, layers: tuple, rank: Array) -> AdapterBank:
    new_layers = tuple(
        {t: TargetBank(a=tb.a.at[slot].set(new[t].a), b=tb.b.at[slot].set(new[t].b)) for t, tb in layer.items()}
        for layer, new in zip(bank.layers, layers))
    return AdapterBank(layers=new_layers, ranks=bank.ranks.at[slot].set(rank))


def write_adapter(bank: AdapterBank, slot: int, weights: LoRAWeights | None, cfg: ModelConfig,
                  spec: BankSpec) -> AdapterBank:
    """Writes an adapter (or, with ``weights=None``, the zero adapter) into ``slot``; donates ``bank``.

    Everything that can fail is checked on the host first, so a rejected adapter leaves the bank as it was.

    Args:
      bank: the bank (donated: use the returned one).
      slot: 1..max_loras (slot 0 is the permanent zero adapter).
      weights: a parsed adapter from ``load_peft_adapter``.
      cfg, spec: the model config and bank spec the bank was made with.

    Returns:
      The updated bank.
    """
    if not 1 <= slot <= spec.max_loras:
        raise ValueError(f"slot must be in 1..{spec.max_loras} (slot 0 is the zero adapter), got {slot}")
    dtype = bank.layers[0][spec.targets[0]].a.dtype
    if weights is None:
        layers, rank = zero_adapter_arrays(cfg, spec, dtype), 0
    else:
        layers, rank = adapter_arrays(weights, cfg, spec, dtype)
    return _write_slot(bank, jnp.int32(slot), layers, jnp.int32(rank))


def write_adapter_arrays(bank: AdapterBank, slot: int, layers: tuple, rank: int) -> AdapterBank:
    """Writes pre-padded arrays from ``adapter_arrays`` (host numpy, or already on the device) into ``slot``.

    With device arrays (e.g. staged earlier with ``jax.device_put``, overlapping the copy with other work) the
    write is a device-to-device copy. Donates ``bank``; the slot must be valid (see ``write_adapter``).
    """
    if not 1 <= slot < bank.num_slots:
        raise ValueError(f"slot must be in 1..{bank.num_slots - 1} (slot 0 is the zero adapter), got {slot}")
    return _write_slot(bank, jnp.int32(slot), layers, jnp.int32(rank))


def zero_adapter_arrays(cfg: ModelConfig, spec: BankSpec, dtype) -> tuple:
    """The zero adapter as ``adapter_arrays`` lays it out (host numpy arrays of one slot)."""
    shapes = target_shapes(cfg)
    R = spec.max_lora_rank
    return tuple({t: TargetBank(a=np.zeros((shapes[t][0], R), dtype), b=np.zeros((R, shapes[t][1]), dtype))
                  for t in spec.targets} for _ in range(cfg.num_layers))
