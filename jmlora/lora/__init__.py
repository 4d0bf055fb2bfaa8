"""LoRA adapters: PEFT reading and validation, the stacked device bank, routing, and the host slot manager.

The functional API for JAX users::

    weights = load_peft_adapter(path, cfg, max_lora_rank=16)            # host: parse + validate
    spec = BankSpec(max_loras=8, max_lora_rank=16)
    bank = init_adapter_bank(cfg, spec, dtype=jnp.bfloat16, mesh=mesh)   # device: all slots zero
    bank = write_adapter(bank, 1, weights, cfg, spec)                     # jitted, donating, no recompiles
    logits, cache = forward_logits(params, cfg, ..., cache, LoRABatch(bank, slot_ids))   # slot_ids: [B]
"""

from jmlora.lora.bank import AdapterBank, BankSpec, TargetBank, adapter_arrays, init_adapter_bank, write_adapter
from jmlora.lora.peft import (
    LORA_TARGETS,
    AdapterError,
    LoRAWeights,
    load_peft_adapter,
    peft_loader,
    projection_module_name,
    target_shapes,
)
from jmlora.lora.routing import LORA_IMPLS, LoRABatch, lora_delta
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
