"""Tiny random Hugging Face models and real PEFT adapters for tests (no downloads).

    model_dir, hf_model = make_hf_model(tmp_path, "llama")
    adapter_dir = make_peft_adapter(hf_model, tmp_path / "a", r=4, alpha=8, targets=["q_proj", "v_proj"])
    reference = load_peft_model(hf_model, adapter_dir)   # PEFT's own model, for comparing outputs

The models are small enough that building one takes well under a second; build them once per test module.
"""

from __future__ import annotations

import copy
from pathlib import Path

import hf_models
import torch
import transformers
from hf_models import FAMILIES
from peft import LoraConfig, PeftModel, get_peft_model

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# On top of hf_models' tiny shape: head_dim * num_heads (128) differs from hidden_size (64) so that a
# transposed q/o projection cannot pass unnoticed, and intermediate_size differs from both.
_LORA_SHAPE = dict(intermediate_size=96, num_hidden_layers=2, head_dim=32)


def make_hf_model(tmp_path: str | Path, family: str, dtype: torch.dtype = torch.float32, *, seed: int = 0,
                  **overrides) -> tuple[Path, transformers.PreTrainedModel]:
    """Builds a tiny random ``*ForCausalLM`` of ``family`` in ``tmp_path/<family>-model/`` (see hf_models).

    Args:
      tmp_path: a directory to create ``<family>-model/`` in.
      family: one of ``FAMILIES``.
      dtype: the weights' dtype (as saved and as returned).
      seed: torch seed for the random weights.
      **overrides: config fields replacing the tiny defaults (e.g. ``num_hidden_layers=3``).

    Returns:
      ``(model_dir, model)``: the directory (config.json + model.safetensors) and the model in eval mode.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r} (known: {', '.join(FAMILIES)})")
    return hf_models.make_hf_model(Path(tmp_path) / f"{family}-model", family, seed=seed, dtype=dtype,
                                   **{**_LORA_SHAPE, **overrides})


def make_peft_adapter(hf_model: transformers.PreTrainedModel, out_dir: str | Path, *, r: int, alpha: float,
                      targets: list[str] | str, use_rslora: bool = False, rank_pattern: dict | None = None,
                      alpha_pattern: dict | None = None, layers_to_transform: int | list[int] | None = None,
                      seed: int = 0, adapter_dtype: torch.dtype | None = None, safe_serialization: bool = True,
                      **lora_kwargs) -> Path:
    """Saves a random (non-zero B) PEFT LoRA adapter for ``hf_model`` with ``save_pretrained``.

    ``hf_model`` is not modified (PEFT works on a copy).

    Args:
      hf_model: the base model from ``make_hf_model``.
      out_dir: where to save the adapter (created).
      r, alpha, targets, use_rslora, rank_pattern, alpha_pattern, layers_to_transform: the ``LoraConfig``
        fields (``targets`` is ``target_modules``: a list of names or a regex string).
      seed: torch seed for the random A and B.
      adapter_dtype: store the LoRA tensors in this dtype (PEFT's default upcasts them to float32).
      safe_serialization: False saves the legacy pickle ``adapter_model.bin`` instead of safetensors.
      **lora_kwargs: further ``LoraConfig`` fields (e.g. ``use_dora=True``, ``modules_to_save=[...]``).

    Returns:
      ``out_dir`` as a Path, holding adapter_config.json and adapter_model.safetensors.
    """
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                        use_rslora=use_rslora, rank_pattern=rank_pattern or {},
                        alpha_pattern=alpha_pattern or {}, layers_to_transform=layers_to_transform,
                        **lora_kwargs)
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(hf_model), config,
                                autocast_adapter_dtype=adapter_dtype is None)
    if adapter_dtype is not None:
        for param_name, param in peft_model.named_parameters():
            if "lora_" in param_name:
                param.data = param.data.to(adapter_dtype)
    out_dir = Path(out_dir)
    peft_model.save_pretrained(out_dir, safe_serialization=safe_serialization)
    return out_dir


def load_peft_model(hf_model: transformers.PreTrainedModel, adapter_dir: str | Path) -> PeftModel:
    """PEFT's own model: a copy of ``hf_model`` with the saved adapter loaded, in eval mode (the reference)."""
    return PeftModel.from_pretrained(copy.deepcopy(hf_model), str(adapter_dir)).eval()
