"""Tiny random Hugging Face checkpoints built at test time with transformers (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma")

_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
}

TINY_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)


def make_hf_model(out_dir: str | Path, family: str, *, seed: int = 0, dtype=torch.float32,
                  max_shard_size: str | None = None, **overrides) -> tuple[Path, torch.nn.Module]:
    """Builds, perturbs and saves a tiny random model of ``family``; returns (dir, the torch model in eval mode).

    Weights are drawn with std 0.1 and norm weights/biases are perturbed away from their init, so every
    parameter matters to the output and a wrong mapping shows in the logits.
    """
    config_cls, model_cls = _CLASSES[family]
    kwargs = dict(TINY_SHAPE, initializer_range=0.1)
    if family == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.2 * torch.randn_like(p))
    model = model.to(dtype)
    out_dir = Path(out_dir)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **save_kwargs)
    return out_dir, model


def hf_logprobs(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    """float32 log-softmax ``[T, V]`` of a full forward over one sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)
