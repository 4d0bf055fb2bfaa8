"""Model configuration, read from a Hugging Face ``config.json``.

``ModelConfig`` is a frozen dataclass that holds everything the decoder needs, normalised across the
supported families (Llama, Mistral, Qwen2, Qwen3, Gemma). Anything the decoder does not implement is an
``UnsupportedModelError`` that names the feature: a checkpoint is either run exactly or refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")


class ConfigError(ValueError):
    """A config.json that is missing, malformed, or inconsistent."""


class UnsupportedModelError(ConfigError):
    """A checkpoint that uses a feature the decoder does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding parameters.

    Attributes:
      theta: base of the inverse frequencies.
      rope_type: one of ``SUPPORTED_ROPE_TYPES``.
      factor: scaling factor ("linear", "llama3").
      low_freq_factor, high_freq_factor, original_max_position_embeddings: Llama-3 scaling parameters.
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer, normalised across families.

    Attributes:
      model_type: the Hugging Face ``model_type`` (one of ``SUPPORTED_MODEL_TYPES``).
      vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim: shapes.
      rms_norm_eps: epsilon of every RMSNorm.
      norm_weight_offset: 1.0 where RMSNorm multiplies by (1 + w) (Gemma), else 0.0.
      embed_scale: factor applied to the token embeddings (sqrt(hidden) for Gemma, else 1.0).
      activation: the gated MLP's activation ("silu" or the tanh-approximated GELU).
      qkv_bias, o_bias, mlp_bias: which projections have a bias.
      qk_norm: RMSNorm over head_dim on q and k before RoPE (Qwen3).
      tie_word_embeddings: the LM head is the transposed embedding.
      rope: rotary embedding parameters.
      max_position_embeddings: the checkpoint's trained context length.
      max_model_len: the longest sequence this instance will run (<= max_position_embeddings unless
        scaled RoPE allows more); used to refuse sliding windows we would otherwise silently ignore.
      bos_token_id, eos_token_ids, pad_token_id: special token ids from config.json (may be refined by
        generation_config.json / tokenizer_config.json in ``jmlora.tokenizer``).
      dtype: the checkpoint's dtype name ("float32", "bfloat16", "float16").
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    norm_weight_offset: float = 0.0
    embed_scale: float = 1.0
    activation: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    rope: RopeConfig = dataclasses.field(default_factory=RopeConfig)
    max_position_embeddings: int = 2048
    max_model_len: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.activation not in SUPPORTED_ACTIVATIONS:
            raise UnsupportedModelError(f"activation {self.activation!r} is not supported "
                                        f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
        if self.rope.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(f"rope type {self.rope.rope_type!r} is not supported "
                                        f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")

    @property
    def q_per_kv(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, max_model_len: int | None = None) -> ModelConfig:
        """Builds a ModelConfig from the parsed contents of a Hugging Face config.json.

        Args:
          raw: the config.json dictionary.
          max_model_len: the longest sequence to run; defaults to ``max_position_embeddings``.

        Raises:
          UnsupportedModelError: an unknown model_type or a feature the decoder does not implement.
          ConfigError: a missing or invalid field.
        """
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")

        def need(key: str) -> Any:
            if key not in raw or raw[key] is None:
                raise ConfigError(f"config.json of a {model_type} model has no {key!r}")
            return raw[key]

        hidden = need("hidden_size")
        num_heads = need("num_attention_heads")
        head_dim = raw.get("head_dim") or hidden // num_heads
        max_pos = raw.get("max_position_embeddings") or 2048
        max_model_len = max_model_len or max_pos

        _check_unsupported_features(raw, model_type, max_model_len)
        rope = _rope_config(raw, max_pos)
        if max_model_len > max_pos and rope.rope_type == "default":
            raise ConfigError(f"max_model_len {max_model_len} exceeds max_position_embeddings {max_pos} "
                              "and the model has no RoPE scaling")

        activation = raw.get("hidden_act") or raw.get("hidden_activation") or "silu"
        if model_type == "gemma":
            # Gemma's official configs say "gelu" but mean the tanh approximation; transformers maps it too.
            activation = raw.get("hidden_activation") or activation
            if activation == "gelu":
                activation = "gelu_pytorch_tanh"

        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        is_gemma = model_type == "gemma"
        attention_bias = bool(raw.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            norm_weight_offset=1.0 if is_gemma else 0.0,
            embed_scale=math.sqrt(hidden) if is_gemma else 1.0,
            activation=activation,
            # Qwen2 always has q/k/v biases (hard-coded in transformers); Llama's attention_bias covers o too.
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", is_gemma)),
            rope=rope,
            max_position_embeddings=max_pos,
            max_model_len=max_model_len,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=raw.get("pad_token_id"),
            dtype=_checkpoint_dtype(raw),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *, max_model_len: int | None = None) -> ModelConfig:
        """Reads ``config.json`` from a Hugging Face model directory.

        Raises:
          FileNotFoundError: the directory or its config.json is missing.
          ConfigError / UnsupportedModelError: as ``from_dict``, with the file named.
        """
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {model_dir} (expected a Hugging Face model directory)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} does not hold a JSON object")
        try:
            return cls.from_dict(raw, max_model_len=max_model_len)
        except ConfigError as e:
            raise type(e)(f"{path}: {e}") from e


def _check_unsupported_features(raw: dict[str, Any], model_type: str, max_model_len: int) -> None:
    """Raises UnsupportedModelError for config features the decoder would otherwise silently ignore."""
    window = raw.get("sliding_window")
    uses_window = raw.get("use_sliding_window", model_type == "mistral")
    if uses_window and window is not None and window < max_model_len:
        raise UnsupportedModelError(
            f"sliding-window attention (sliding_window={window}) shorter than the model length "
            f"({max_model_len}) is not implemented; pass max_model_len <= {window}")
    layer_types = raw.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise UnsupportedModelError(f"per-layer attention types {sorted(set(layer_types))} are not implemented")
    if raw.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("partial rotary embeddings (partial_rotary_factor != 1) are not implemented")
    if raw.get("use_bidirectional_attention"):
        raise UnsupportedModelError("bidirectional attention is not implemented")
    for key in ("quantization_config", "attn_logit_softcapping", "final_logit_softcapping"):
        if raw.get(key) is not None:
            raise UnsupportedModelError(f"{key} is not implemented")


def _rope_config(raw: dict[str, Any], max_pos: int) -> RopeConfig:
    """Merges the legacy (``rope_theta`` + ``rope_scaling``) and new (``rope_parameters``) formats."""
    params: dict[str, Any] = {}
    for key in ("rope_scaling", "rope_parameters"):
        value = raw.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be an object, got {value!r}")
        if any(isinstance(v, dict) for v in value.values()):
            raise UnsupportedModelError(f"per-layer-type {key} is not implemented")
        params.update(value)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("partial rotary embeddings (partial_rotary_factor != 1) are not implemented")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(f"rope type {rope_type!r} is not supported "
                                    f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    theta = params.get("rope_theta") or raw.get("rope_theta") or 10000.0
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            raw.get("original_max_position_embeddings")
            or params.get("original_max_position_embeddings") or max_pos),
    )


_DTYPE_NAMES = {"float32": "float32", "float": "float32", "bfloat16": "bfloat16",
                "float16": "float16", "half": "float16"}


def _checkpoint_dtype(raw: dict[str, Any]) -> str:
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    name = str(name).removeprefix("torch.")
    if name not in _DTYPE_NAMES:
        raise UnsupportedModelError(f"checkpoint dtype {name!r} is not supported "
                                    "(supported: float32, bfloat16, float16)")
    return _DTYPE_NAMES[name]


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the serving engine runs a model (vLLM's names where vLLM has one).

    Attributes:
      max_num_seqs: sequences running at once (the largest decode batch).
      max_num_batched_tokens: new tokens in one prefill step at most.
      max_prefill_chunk: tokens of one prompt in one prefill step at most (longer prompts are chunked).
      page_size: tokens per KV-cache page.
      num_kv_pages: KV pages; None sizes the cache from ``gpu_memory_utilization`` on accelerators and
        to ``max_num_seqs`` full-length sequences on CPU.
      gpu_memory_utilization: fraction of device memory the engine may use (weights, adapters, KV cache).
      num_lookahead: decode steps per jitted call (sampling on device; stop checks after each call). 8: on
        the H200 at batch 256 the host's Python and scheduling per token step fell from 11.2% to 5.5% of the
        device step against 4, with throughput +1% (benchmarks/RESULTS.md); a request that stops inside a
        call wastes at most 7 steps of its row.
      enable_lora, max_loras, max_lora_rank, max_cpu_loras: multi-LoRA serving (device slots, padded rank,
        host cache of parsed adapters; None = 2 * max_loras).
      lora_impl, attention_impl: kernel/formulation choices ("auto" = the measured default). The decode-only
        attention kernels ("pallas_gpu", "pallas_gpu_fused") apply to decode steps; prefill then uses "auto".
      max_logprobs: the largest ``logprobs`` / ``prompt_logprobs`` a request may ask for.
      seed: engine seed (random seeds of unseeded requests derive from it).
      warmup: compile every bucket at start-up, so nothing compiles while serving.
      decode_unroll: unroll the ``num_lookahead`` decode steps into straight-line code instead of a device loop.
      async_scheduling: dispatch the next decode call before reading the samples of the one in flight when
        the next step is certain without them (the same sequences continue; vLLM's ``async_scheduling``), so
        the host's per-step work overlaps with the device. Outputs are identical either way.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_prefill_chunk: int = 512
    page_size: int = 16
    num_kv_pages: int | None = None
    gpu_memory_utilization: float = 0.9
    num_lookahead: int = 8
    enable_lora: bool = False
    max_loras: int = 4
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    lora_impl: str = "auto"
    attention_impl: str = "auto"
    max_logprobs: int = 20
    seed: int = 0
    warmup: bool = True
    decode_unroll: bool = False
    async_scheduling: bool = True

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_prefill_chunk", "page_size", "num_lookahead",
                     "max_loras", "max_lora_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_kv_pages is not None and (not isinstance(self.num_kv_pages, int) or self.num_kv_pages < 1):
            raise ValueError(f"num_kv_pages must be a positive integer or None, got {self.num_kv_pages!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.max_prefill_chunk > self.max_num_batched_tokens:
            raise ValueError(f"max_prefill_chunk ({self.max_prefill_chunk}) cannot exceed max_num_batched_tokens "
                             f"({self.max_num_batched_tokens})")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        # jmlora.lora.routing.FEW_SEGMENT_IMPL and PACKED_IMPL (that module needs JAX)
        if self.lora_impl in ("pallas_segment_few", "mgpu_packed"):
            raise ValueError(f"lora_impl {self.lora_impl!r} is the runner's own choice for batches it knows hold "
                             f"few adapters (routing.decode_impl); use 'auto' or 'pallas_segment'")
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be a non-negative integer, got {self.max_logprobs!r}")
