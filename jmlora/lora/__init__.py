"""LoRA adapters: PEFT reading and validation, the stacked device bank, routing, and the host slot manager.

The functional API for JAX users::

    weights = load_peft_adapter(path, cfg, max_lora_rank=16)            # host: parse + validate
    spec = BankSpec(max_loras=8, max_lora_rank=16)
    bank = init_adapter_bank(cfg, spec, dtype=jnp.bfloat16, mesh=mesh)   # device: all slots zero
    bank = write_adapter(bank, 1, weights, cfg, spec)                     # jitted, donating, no recompiles
    logits, cache = forward_logits(params, cfg, ..., cache, LoRABatch(bank, slot_ids))   # slot_ids: [B]
"""

from jmlora.lora.peft import (
    LORA_TARGETS,
    AdapterError,
    LoRAWeights,
    load_peft_adapter,
    peft_loader,
    projection_module_name,
    target_shapes,
)
from jmlora.lora.slots import (
    AdapterInUseError,
    NoFreeSlotError,
    SlotError,
    SlotManager,
    SlotStats,
    UnknownAdapterError,
)

__all__ = [
    "LORA_IMPLS",
    "LORA_TARGETS",
    "AdapterBank",
    "BankSpec",
    "LoRABatch",
    "TargetBank",
    "adapter_arrays",
    "init_adapter_bank",
    "lora_delta",
    "write_adapter",
    "AdapterError",
    "AdapterInUseError",
    "LoRAWeights",
    "NoFreeSlotError",
    "SlotError",
    "SlotManager",
    "SlotStats",
    "UnknownAdapterError",
    "load_peft_adapter",
    "peft_loader",
    "projection_module_name",
    "target_shapes",
]

# The device side (bank, routing) imports JAX; the host side above does not, so the scheduler and slot manager
# stay importable (and testable) without it. The device names load on first use.
_DEVICE_NAMES = {
    "AdapterBank": "bank", "BankSpec": "bank", "TargetBank": "bank", "adapter_arrays": "bank",
    "init_adapter_bank": "bank", "write_adapter": "bank", "LORA_IMPLS": "routing", "LoRABatch": "routing",
    "lora_delta": "routing",
}


def __getattr__(name):
    module = _DEVICE_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'jmlora.lora' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(f"jmlora.lora.{module}"), name)
