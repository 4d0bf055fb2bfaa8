"""Reading and validating PEFT LoRA adapters on the host.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. This module reads
both with numpy only (nothing here touches a device), checks every field and tensor against the base
model's ``ModelConfig``, and returns a ``LoRAWeights``: per (layer, projection) the pair A ``[in, r]`` and
B ``[r, out]`` in float32, with the LoRA scaling already folded into B, so that a projection's LoRA delta is
simply ``x @ A @ B``.

Anything the engine could not reproduce exactly is refused with an ``AdapterError`` naming the file, the
field or the tensor: DoRA and the other LoRA variants, ``modules_to_save``, biases, embedding / LM-head
targets, weights that do not fit the base model, and damaged files.

PEFT's on-disk format (checked against peft 0.21 for Llama, Mistral, Qwen2, Qwen3 and Gemma):

- tensor keys are ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` where ``<module>`` is
  the module's name in the Hugging Face ``*ForCausalLM``, e.g. ``model.layers.3.self_attn.q_proj`` or
  ``model.layers.3.mlp.down_proj``; PEFT strips the adapter name when saving, but a key with one inserted
  (``.lora_A.default.weight``) is accepted too;
- ``lora_A.weight`` is ``[r, in]`` and ``lora_B.weight`` is ``[out, r]`` (torch ``Linear`` layout);
- the tensors are float32 by default (PEFT upcasts adapter weights unless ``autocast_adapter_dtype=False``),
  but bfloat16 / float16 files exist in the wild;
- the scaling of a module is ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``), where ``r`` and
  ``alpha`` come from the first matching ``rank_pattern`` / ``alpha_pattern`` key, else ``r`` /
  ``lora_alpha``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from jmlora.config import ModelConfig
from jmlora.safetensors_io import FLOAT_DTYPES, SafetensorsError, SafetensorsFile

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
# Modules PEFT could put LoRA on that the engine does not route yet.
_UNSUPPORTED_TARGETS = ("model.embed_tokens", "lm_head")

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLE_WEIGHT_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
_KEY_PREFIX = "base_model.model."

# LoraConfig fields naming a LoRA variant whose forward pass differs from y = x W + s x A B. (VeLoRA only
# changes the backward pass and MiCA only which factor trains, so both are plain LoRA at inference.)
_VARIANT_FIELDS = {
    "use_dora": "DoRA (use_dora)",
    "use_qalora": "QALoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "lora_bias": "a bias on lora_B (lora_bias)",
    "layer_replication": "layer replication (layer_replication)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "target_parameters": "parameter targets (target_parameters)",
}
# init_lora_weights values whose adapters are relative to a *modified* base model (PEFT subtracts the
# initial low-rank product from the base weights, or quantises them) unless converted at save time.
_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class AdapterError(ValueError):
    """A LoRA adapter that cannot be served: malformed, damaged, or not matching the base model."""


@dataclasses.dataclass(frozen=True, eq=False)
class LoRAWeights:
    """One parsed LoRA adapter, ready to be written into a slot of the adapter bank.

    Attributes:
      name: the adapter's name (the directory name unless given).
      path: the adapter directory it was read from.
      rank: the largest rank over its modules.
      targets: the projection names (subset of ``LORA_TARGETS``) that it adapts in at least one layer.
      layers: (layer index, target) -> (A ``[in, r_module]`` float32, B ``[r_module, out]`` float32), the
        scaling already multiplied into B, so the projection's LoRA delta is ``x @ A @ B``. Modules the
        adapter does not touch are absent.

    Equality and hashing are by identity (the arrays are not hashable).
    """

    name: str
    path: str
    rank: int
    targets: frozenset[str]
    layers: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]

    @property
    def nbytes(self) -> int:
        """Host bytes held by all A and B arrays."""
        return sum(a.nbytes + b.nbytes for a, b in self.layers.values())


def target_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every LoRA-targetable projection of the base model.

    Args:
      cfg: the base model.

    Returns:
      ``{target: (in_features, out_features)}`` for every name in ``LORA_TARGETS``.
    """
    q_dim = cfg.num_heads * cfg.head_dim
    kv_dim = cfg.num_kv_heads * cfg.head_dim
    return {
        "q_proj": (cfg.hidden_size, q_dim),
        "k_proj": (cfg.hidden_size, kv_dim),
        "v_proj": (cfg.hidden_size, kv_dim),
        "o_proj": (q_dim, cfg.hidden_size),
        "gate_proj": (cfg.hidden_size, cfg.intermediate_size),
        "up_proj": (cfg.hidden_size, cfg.intermediate_size),
        "down_proj": (cfg.intermediate_size, cfg.hidden_size),
    }


# What each dimension of target_shapes is called, for error messages.
_DIM_NAMES = {
    "q_proj": ("hidden_size", "num_heads*head_dim"),
    "k_proj": ("hidden_size", "num_kv_heads*head_dim"),
    "v_proj": ("hidden_size", "num_kv_heads*head_dim"),
    "o_proj": ("num_heads*head_dim", "hidden_size"),
    "gate_proj": ("hidden_size", "intermediate_size"),
    "up_proj": ("hidden_size", "intermediate_size"),
    "down_proj": ("intermediate_size", "hidden_size"),
}


def projection_module_name(layer: int, target: str) -> str:
    """The Hugging Face module name of a projection, e.g. ``model.layers.0.self_attn.q_proj``."""
    block = "self_attn" if target in _ATTN_TARGETS else "mlp"
    return f"model.layers.{layer}.{block}.{target}"


def _hf_module_names(cfg: ModelConfig) -> list[str]:
    """The names ``named_modules()`` gives for the supported ``*ForCausalLM`` models (root excluded)."""
    names = ["model", "model.embed_tokens", "model.layers"]
    for i in range(cfg.num_layers):
        layer = f"model.layers.{i}"
        names += [layer, f"{layer}.self_attn"]
        names += [projection_module_name(i, t) for t in _ATTN_TARGETS]
        if cfg.qk_norm:
            names += [f"{layer}.self_attn.q_norm", f"{layer}.self_attn.k_norm"]
        names += [f"{layer}.mlp"] + [projection_module_name(i, t) for t in _MLP_TARGETS]
        names += [f"{layer}.mlp.act_fn", f"{layer}.input_layernorm", f"{layer}.post_attention_layernorm"]
    names += ["model.norm", "model.rotary_emb", "lm_head"]
    return names


# ----------------------------------------------------------------------------------------------------------
# adapter_config.json


@dataclasses.dataclass(frozen=True)
class _LoraSpec:
    """The fields of a LoraConfig that decide which modules carry LoRA and how it is scaled."""

    r: int
    alpha: float
    use_rslora: bool
    target_modules: str | tuple[str, ...]
    exclude_modules: str | tuple[str, ...] | None
    layers_to_transform: int | tuple[int, ...] | None
    layers_pattern: tuple[str, ...] | None
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _str_or_str_list(raw: dict[str, Any], key: str, where: str) -> str | tuple[str, ...] | None:
    value = raw.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise AdapterError(f"{where}: {key} must be a string or a list of strings, got {value!r}")


def _compile(pattern: str, field: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise AdapterError(f"{where}: {field} entry {pattern!r} is not a valid regular expression: {e}") from e


def _parse_config(raw: Any, where: str) -> _LoraSpec:
    """Validates a parsed adapter_config.json; ``where`` names the file in messages."""
    if not isinstance(raw, dict):
        raise AdapterError(f"{where} does not hold a JSON object")
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"{where}: peft_type is {peft_type!r}; only LoRA adapters (peft_type 'LORA') "
                           "are supported")
    for field, what in _VARIANT_FIELDS.items():
        if raw.get(field) not in (None, False, [], {}):
            raise AdapterError(f"{where}: {what} is not supported; only plain LoRA adapters can be served")
    init = str(raw.get("init_lora_weights", True)).lower()
    if any(init.startswith(prefix) for prefix in _MUTATING_INITS):
        raise AdapterError(
            f"{where}: init_lora_weights={raw['init_lora_weights']!r} adapters modify the base weights; save "
            "them with PEFT's path_initial_model_for_weight_conversion to get a plain LoRA adapter")
    if raw.get("modules_to_save"):
        raise AdapterError(f"{where}: modules_to_save={raw['modules_to_save']!r} is not supported (the "
                           "adapter replaces whole modules of the base model, which the engine cannot route)")
    bias = raw.get("bias", "none")
    if bias != "none":
        raise AdapterError(f"{where}: bias={bias!r} is not supported; only bias='none' adapters can be served")

    r = raw.get("r", 8)
    if not _is_int(r) or r <= 0:
        raise AdapterError(f"{where}: r must be a positive integer, got {r!r}")
    alpha = raw.get("lora_alpha", 8)
    if not _is_number(alpha):
        raise AdapterError(f"{where}: lora_alpha must be a finite number, got {alpha!r}")
    use_rslora = raw.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise AdapterError(f"{where}: use_rslora must be true or false, got {use_rslora!r}")

    rank_pattern = raw.get("rank_pattern") or {}
    alpha_pattern = raw.get("alpha_pattern") or {}
    for field, pattern, valid, want in (
            ("rank_pattern", rank_pattern, lambda v: _is_int(v) and v > 0, "positive integers"),
            ("alpha_pattern", alpha_pattern, _is_number, "finite numbers")):
        if not isinstance(pattern, dict):
            raise AdapterError(f"{where}: {field} must be an object, got {pattern!r}")
        for key, value in pattern.items():
            _compile(rf"(.*\.)?({key})$", field, where)
            if not valid(value):
                raise AdapterError(f"{where}: {field}[{key!r}] = {value!r}; values must be {want}")

    target_modules = _str_or_str_list(raw, "target_modules", where)
    if target_modules is None:
        raise AdapterError(f"{where}: target_modules is missing")
    if isinstance(target_modules, str):
        _compile(target_modules, "target_modules", where)
    exclude_modules = _str_or_str_list(raw, "exclude_modules", where)
    if isinstance(exclude_modules, str):
        _compile(exclude_modules, "exclude_modules", where)

    layers = raw.get("layers_to_transform")
    if isinstance(layers, list) and all(_is_int(i) for i in layers):
        layers = tuple(layers)
    elif layers is not None and not _is_int(layers):
        raise AdapterError(f"{where}: layers_to_transform must be an integer or a list of integers, "
                           f"got {layers!r}")
    if layers is not None and isinstance(target_modules, str):
        raise AdapterError(f"{where}: layers_to_transform cannot be combined with a regex target_modules "
                           "(PEFT refuses this configuration)")
    layers_pattern = _str_or_str_list(raw, "layers_pattern", where)
    if isinstance(layers_pattern, str):
        layers_pattern = (layers_pattern,)
    return _LoraSpec(r=r, alpha=float(alpha), use_rslora=use_rslora, target_modules=target_modules,
                     exclude_modules=exclude_modules, layers_to_transform=layers,
                     layers_pattern=layers_pattern or None, rank_pattern=dict(rank_pattern),
                     alpha_pattern=dict(alpha_pattern))


def _pattern_key(patterns: Iterable[str], module: str) -> str | None:
    """The first rank/alpha pattern that matches ``module`` as PEFT matches them, or None.

    PEFT (``peft.utils.other.get_pattern_key``) takes the first key, in the config's order, such that
    ``re.match(rf"(.*\\.)?({key})$", module)``: a regex anchored at the end, matched either from the start
    of the module name or from just after one of its dots.
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _layer_index(spec: _LoraSpec, module: str) -> int | None:
    """The layer index PEFT reads from a module name for ``layers_to_transform``."""
    if spec.layers_pattern is None:
        # Lazy: the first numbered segment is the layer index.
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        match = None
        for pattern in spec.layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def _is_targeted(spec: _LoraSpec, module: str) -> bool:
    """Whether PEFT puts LoRA on ``module`` (``peft.tuners.tuners_utils.check_target_module_exists``)."""
    exclude = spec.exclude_modules
    if isinstance(exclude, str):
        if re.fullmatch(exclude, module):
            return False
    elif exclude and (module in exclude or any(module.endswith(f".{e}") for e in exclude)):
        return False

    if isinstance(spec.target_modules, str):
        return re.fullmatch(spec.target_modules, module) is not None
    if module in spec.target_modules:
        return True  # named in full: PEFT skips the layers_to_transform check in this case
    if not any(module.endswith(f".{t}") for t in spec.target_modules):
        return False
    layers = spec.layers_to_transform
    if layers is None or layers == ():
        return True
    index = _layer_index(spec, module)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def _expand_all_linear(spec: _LoraSpec) -> _LoraSpec:
    """PEFT saves the expanded module list; a hand-written ``"all-linear"`` means every projection."""
    if spec.target_modules == "all-linear":
        return dataclasses.replace(spec, target_modules=LORA_TARGETS)
    return spec


def _targeted_modules(spec: _LoraSpec, cfg: ModelConfig, where: str) -> dict[str, tuple[int, str]]:
    """Resolves target_modules against the base model.

    Returns:
      ``{module name: (layer, target)}`` for every projection that must carry LoRA.

    Raises:
      AdapterError: a target the model lacks, one the engine does not support (embeddings, LM head, norms),
        or layers_to_transform outside the model.
    """
    projections = {projection_module_name(i, t): (i, t)
                   for i in range(cfg.num_layers) for t in LORA_TARGETS}
    names = _hf_module_names(cfg)
    matched = [m for m in names if _is_targeted(spec, m)]
    for module in matched:
        if module in _UNSUPPORTED_TARGETS:
            raise AdapterError(f"{where}: target module {module!r} is not supported yet "
                               f"(supported targets: {', '.join(LORA_TARGETS)})")
        if module not in projections:
            raise AdapterError(f"{where}: target module {module!r} is not a projection LoRA can adapt "
                               f"(supported targets: {', '.join(LORA_TARGETS)})")
    if isinstance(spec.target_modules, tuple):
        for target in spec.target_modules:
            if not any(m == target or m.endswith(f".{target}") for m in names):
                raise AdapterError(f"{where}: target_modules names {target!r}, which the {cfg.model_type} "
                                   f"base model does not have (supported targets: {', '.join(LORA_TARGETS)})")
    layers = spec.layers_to_transform
    for index in (layers,) if isinstance(layers, int) else layers or ():
        if not 0 <= index < cfg.num_layers:
            raise AdapterError(f"{where}: layers_to_transform has layer {index}, but the base model has "
                               f"{cfg.num_layers} layers")
    if not matched:
        raise AdapterError(f"{where}: target_modules {spec.target_modules!r} matches no module of the base "
                           "model")
    return {m: projections[m] for m in matched}


# ----------------------------------------------------------------------------------------------------------
# adapter_model.safetensors, read through jmlora.safetensors_io (which handles bfloat16; see there why)

@dataclasses.dataclass(frozen=True)
class _TensorInfo:
    dtype: str
    shape: tuple[int, ...]


def _open_weights(path: Path) -> SafetensorsFile:
    """Opens an adapter's safetensors file; every structural problem is an AdapterError naming the file."""
    try:
        return SafetensorsFile(path)
    except SafetensorsError as e:
        raise AdapterError(str(e)) from e


def _read_safetensors_header(path: Path) -> dict[str, _TensorInfo]:
    """The dtype and shape of every tensor, from the header alone; LoRA weights must be floating point.

    Raises:
      AdapterError: an empty, truncated or malformed file, or a tensor that is not floating point.
    """
    with _open_weights(path) as f:
        infos = {name: _TensorInfo(f.dtype_name(name), f.shape(name)) for name in f.keys()}
    for name, info in infos.items():
        if info.dtype not in FLOAT_DTYPES:
            raise AdapterError(f"{path}: tensor {name!r} has dtype {info.dtype}; LoRA weights must be floating "
                               f"point ({', '.join(FLOAT_DTYPES)})")
    return infos


def _read_tensor(path: Path, f: SafetensorsFile, name: str) -> np.ndarray:
    """Reads one tensor as float32 and checks it is finite."""
    array = f.get(name).astype(np.float32)
    if not np.isfinite(array).all():
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise AdapterError(f"{path}: tensor {name!r} has {bad} non-finite values (NaN or Inf)")
    return array


# ----------------------------------------------------------------------------------------------------------
# Keys

_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.weight")


def _explain_unknown_key(key: str) -> str:
    if "lora_magnitude_vector" in key:
        return "a DoRA magnitude vector; DoRA adapters are not supported"
    if "lora_embedding_" in key or "embed_tokens" in key:
        return "LoRA on the token embeddings, which is not supported yet"
    if "modules_to_save" in key:
        return "a modules_to_save copy of a base module, which is not supported"
    if "lm_head" in key:
        return "LoRA on the LM head, which is not supported yet"
    if key.endswith(".bias"):
        return "a bias; only bias='none' adapters without lora_bias are supported"
    return "not a LoRA A/B weight of a supported projection"


def _parse_keys(path: Path, keys: Iterable[str], cfg: ModelConfig
                ) -> dict[tuple[int, str], dict[str, str]]:
    """Maps tensor keys to modules.

    Returns:
      ``{(layer, target): {"A": key, "B": key}}`` (a factor may be missing; the caller checks).
    """
    projections = {projection_module_name(i, t): (i, t) for i in range(cfg.num_layers) for t in LORA_TARGETS}
    layer_re = re.compile(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)")
    modules: dict[tuple[int, str], dict[str, str]] = {}
    adapter_names = set()
    for key in keys:
        if not key.startswith(_KEY_PREFIX):
            raise AdapterError(f"{path}: tensor {key!r} does not start with {_KEY_PREFIX!r}; not a PEFT "
                               "adapter file")
        match = _LORA_KEY.fullmatch(key.removeprefix(_KEY_PREFIX))
        module = match and match.group("module")
        if module not in projections:
            in_layer = match and layer_re.fullmatch(module)
            if in_layer and int(in_layer.group(1)) >= cfg.num_layers:
                raise AdapterError(f"{path}: tensor {key!r} is for layer {in_layer.group(1)}, but the base "
                                   f"model has {cfg.num_layers} layers")
            raise AdapterError(f"{path}: tensor {key!r} is {_explain_unknown_key(key)}")
        adapter_names.add(match.group("adapter"))
        if len(adapter_names) > 1:
            named = sorted(str(n) for n in adapter_names)
            raise AdapterError(f"{path} holds several adapters (names in keys: {named}); save one adapter per "
                               "directory")
        factors = modules.setdefault(projections[module], {})
        factor = match.group("factor")
        if factor in factors:
            raise AdapterError(f"{path}: tensors {factors[factor]!r} and {key!r} are both lora_{factor} of "
                               f"{module}")
        factors[factor] = key
    return modules


# ----------------------------------------------------------------------------------------------------------
# Loading


def _module_order(item: tuple[tuple[int, str], Any]) -> tuple[int, int]:
    """Sort key: by layer, then in the order of LORA_TARGETS."""
    (layer, target), _ = item
    return layer, LORA_TARGETS.index(target)


def load_peft_adapter(path: str | Path, cfg: ModelConfig, *, max_lora_rank: int,
                      name: str | None = None) -> LoRAWeights:
    """Reads and validates a PEFT LoRA adapter directory on the host.

    Args:
      path: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
      cfg: the base model the adapter will run on.
      max_lora_rank: the largest rank the adapter bank holds; every module's rank must fit.
      name: the adapter's name; defaults to the directory name.

    Returns:
      A ``LoRAWeights`` whose ``layers[(i, target)]`` is (A ``[in, r]``, B ``[r, out]``) in float32 with
      the module's scaling folded into B.

    Raises:
      AdapterError: anything that would make the served adapter differ from PEFT's, or any damaged file;
        the message names the file and the field or tensor.
    """
    if not _is_int(max_lora_rank) or max_lora_rank <= 0:
        raise ValueError(f"max_lora_rank must be a positive integer, got {max_lora_rank!r}")
    directory = Path(path)
    if not directory.is_dir():
        raise AdapterError(f"LoRA adapter path {str(path)!r} is not a directory")
    config_path = directory / CONFIG_NAME
    weights_path = directory / WEIGHTS_NAME
    if not config_path.is_file():
        raise AdapterError(f"{directory} has no {CONFIG_NAME} (expected a PEFT adapter directory)")
    if not weights_path.is_file():
        pickles = [n for n in _PICKLE_WEIGHT_NAMES if (directory / n).is_file()]
        if pickles:
            raise AdapterError(f"{directory} has only {pickles[0]} (a pickle); only {WEIGHTS_NAME} is read. "
                               "Re-save it with PEFT's save_pretrained(..., safe_serialization=True)")
        raise AdapterError(f"{directory} has no {WEIGHTS_NAME}")

    try:
        raw_config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{config_path} is not valid JSON: {e}") from e
    spec = _expand_all_linear(_parse_config(raw_config, str(config_path)))
    targeted = _targeted_modules(spec, cfg, str(config_path))  # module name -> (layer, target)

    infos = _read_safetensors_header(weights_path)
    if not infos:
        raise AdapterError(f"{weights_path} holds no tensors")
    found = _parse_keys(weights_path, infos, cfg)
    shapes = target_shapes(cfg)

    # Every (layer, target) the config promises must be in the file, and nothing else.
    expected = {lt: m for m, lt in targeted.items()}
    found = dict(sorted(found.items(), key=_module_order))
    for (layer, target), factors in found.items():
        module = projection_module_name(layer, target)
        if (layer, target) not in expected:
            raise AdapterError(f"{weights_path}: has LoRA weights for {module}, which adapter_config.json's "
                               "target_modules / layers_to_transform / exclude_modules do not select")
        for factor, other in (("A", "B"), ("B", "A")):
            if factor not in factors:
                raise AdapterError(f"{weights_path}: tensor {factors[other]!r} has no matching lora_{factor} "
                                   f"for {module}")
    missing = sorted(set(expected) - set(found), key=lambda lt: _module_order((lt, None)))
    if missing:
        modules = ", ".join(projection_module_name(*lt) for lt in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise AdapterError(f"{weights_path}: adapter_config.json targets {modules}{more}, but the file has no "
                           "LoRA weights for it")

    # Shapes and ranks, from the header alone, before any data is read.
    plan = {}  # (layer, target) -> (key A, key B, scaling)
    for (layer, target), factors in found.items():
        module = projection_module_name(layer, target)
        key_a, key_b = factors["A"], factors["B"]
        shape_a, shape_b = infos[key_a].shape, infos[key_b].shape
        in_features, out_features = shapes[target]
        in_name, out_name = _DIM_NAMES[target]
        if len(shape_a) != 2 or len(shape_b) != 2:
            raise AdapterError(f"{weights_path}: tensors {key_a!r} {list(shape_a)} and {key_b!r} "
                               f"{list(shape_b)} must both be matrices")
        if shape_a[1] != in_features:
            raise AdapterError(f"{weights_path}: tensor {key_a!r} has shape {list(shape_a)}, expected "
                               f"[r, {in_features}]: {target} of the base model takes {in_name}={in_features}")
        if shape_b[0] != out_features:
            raise AdapterError(f"{weights_path}: tensor {key_b!r} has shape {list(shape_b)}, expected "
                               f"[{out_features}, r]: {target} of the base model gives "
                               f"{out_name}={out_features}")
        if shape_a[0] != shape_b[1]:
            raise AdapterError(f"{weights_path}: tensors {key_a!r} (rank {shape_a[0]}) and {key_b!r} "
                               f"(rank {shape_b[1]}) disagree on the rank of {module}")
        rank_key = _pattern_key(spec.rank_pattern, module)
        rank = spec.r if rank_key is None else spec.rank_pattern[rank_key]
        if shape_a[0] != rank:
            source = f"rank_pattern[{rank_key!r}]" if rank_key is not None else "r"
            raise AdapterError(f"{weights_path}: tensor {key_a!r} has rank {shape_a[0]}, but adapter_config.json "
                               f"gives {module} rank {rank} ({source})")
        if rank > max_lora_rank:
            raise AdapterError(f"{directory}: {module} has rank {rank}, above max_lora_rank={max_lora_rank}; "
                               "raise max_lora_rank or use a lower-rank adapter")
        alpha_key = _pattern_key(spec.alpha_pattern, module)
        alpha = spec.alpha if alpha_key is None else float(spec.alpha_pattern[alpha_key])
        scaling = alpha / math.sqrt(rank) if spec.use_rslora else alpha / rank
        plan[(layer, target)] = (key_a, key_b, scaling)

    layers = {}
    with _open_weights(weights_path) as f:
        for (layer, target), (key_a, key_b, scaling) in plan.items():
            lora_a = _read_tensor(weights_path, f, key_a)  # [r, in]
            lora_b = _read_tensor(weights_path, f, key_b)  # [out, r]
            a = np.ascontiguousarray(lora_a.T)  # [in, r]
            with np.errstate(over="ignore"):  # reported below, with the tensor named
                b = np.ascontiguousarray(lora_b.T * np.float32(scaling))  # [r, out]
            if not np.isfinite(b).all():
                raise AdapterError(f"{weights_path}: tensor {key_b!r} overflows float32 once scaled by "
                                   f"{scaling}")
            layers[(layer, target)] = (a, b)

    return LoRAWeights(
        name=name if name is not None else directory.resolve().name,
        path=str(directory),
        rank=max(a.shape[1] for a, _ in layers.values()),
        targets=frozenset(target for _, target in layers),
        layers=layers,
    )


def peft_loader(cfg: ModelConfig, *, max_lora_rank: int) -> Callable[[str, str], LoRAWeights]:
    """A ``(name, path) -> LoRAWeights`` loader for ``SlotManager``, bound to one base model."""

    def load(name: str, path: str) -> LoRAWeights:
        return load_peft_adapter(path, cfg, max_lora_rank=max_lora_rank, name=name)

    return load
