"""Creates a tiny random Hugging Face-format checkpoint (config, safetensors, tokenizer) without torch.

For the README's first command and smoke tests on a fresh machine: no downloads, a few seconds. The
weights are random, so generated text is gibberish; the demo issue will ship a small trained model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from jmlora.config import ModelConfig
from jmlora.model.params import param_specs

_CORPUS = """\
jmlora serves many LoRA adapters at once on one base model. A base model is loaded once and every request
names its adapter, or none. The engine runs a mixed batch in which each sequence gets its own adapter.
Serving many variants costs one base model plus small deltas, not many model copies. The quick brown fox
jumps over the lazy dog. Hello world! Once upon a time there was a small model that learned to write.
"""

_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_FAMILY_EXTRAS = {
    "llama": {"architectures": ["LlamaForCausalLM"], "rope_theta": 10000.0},
    "mistral": {"architectures": ["MistralForCausalLM"], "sliding_window": None},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": False},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"]},
    "gemma": {"architectures": ["GemmaForCausalLM"], "hidden_act": "gelu_pytorch_tanh"},
}


def build_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """A byte-level BPE tokenizer trained on a built-in paragraph, with <s> prepended on encode."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def create_tiny_checkpoint(out_dir: str | Path, *, family: str = "llama", seed: int = 0, hidden_size: int = 64,
                           num_layers: int = 2, scale: float = 0.2) -> Path:
    """Writes config.json, model.safetensors, tokenizer.json, tokenizer_config.json and generation_config.json.

    Args:
      out_dir: directory to create (may exist).
      family: one of llama, mistral, qwen2, qwen3, gemma.
      seed: weight seed.
      hidden_size, num_layers: model size (4 heads, 2 KV heads, MLP 2x hidden, vocab 512).
      scale: standard deviation of the random weights.

    Returns:
      The directory.
    """
    if family not in _FAMILY_EXTRAS:
        raise ValueError(f"family must be one of {', '.join(_FAMILY_EXTRAS)}, got {family!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    raw = {
        "model_type": family, "vocab_size": 512, "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size, "num_hidden_layers": num_layers, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": hidden_size // 4, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": family in ("gemma", "qwen2"),
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "dtype": "float32",
        **_FAMILY_EXTRAS[family],
    }
    cfg = ModelConfig.from_dict(raw)
    rng = np.random.default_rng(seed)
    tensors = {}
    for spec in param_specs(cfg):
        for name, shape in spec.hf:
            if spec.init == "normal":
                tensors[name] = (scale * rng.standard_normal(shape)).astype(np.float32)
            else:
                tensors[name] = np.full(shape, 1.0 if spec.init == "ones" else 0.0, np.float32)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "chat_template": _CHAT_TEMPLATE, "model_max_length": 512}, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, indent=2))
    return out
