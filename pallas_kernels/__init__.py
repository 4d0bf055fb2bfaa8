"""Pallas kernels for gathered low-rank (LoRA) matmuls; public entry points live in ``pallas_kernels.lora``."""

from pallas_kernels.expand import ref_lora_expand
from pallas_kernels.lora import (
    gpu_backend,
    lora_expand,
    lora_shrink,
    lora_shrink_expand,
    lora_shrink_expand_multi,
    lora_shrink_multi,
    resolve_backend,
)
from pallas_kernels.shrink import ref_lora_shrink

__all__ = [
    "gpu_backend",
    "lora_expand",
    "lora_shrink",
    "lora_shrink_expand",
    "lora_shrink_expand_multi",
    "lora_shrink_multi",
    "ref_lora_expand",
    "ref_lora_shrink",
    "resolve_backend",
]
