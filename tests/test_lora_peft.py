"""PEFT adapter reading: LoRAWeights must reproduce PEFT's own LoRA deltas, and every unsupported or damaged
adapter must be refused with a message naming the problem."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_fixtures import ALL_TARGETS, FAMILIES, load_peft_model, make_hf_model, make_peft_adapter
from safetensors.torch import load_file, save_file

from jmlora.config import ModelConfig
from jmlora.lora import LORA_TARGETS, AdapterError, LoRAWeights, load_peft_adapter, target_shapes

# -- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (hf_model, ModelConfig), one tiny random model per family."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for family in FAMILIES:
        model_dir, hf_model = make_hf_model(root, family)
        out[family] = (hf_model, ModelConfig.from_pretrained(model_dir))
    return out


@pytest.fixture(scope="module")
def llama(models):
    return models["llama"]


@pytest.fixture(scope="module")
def good_adapter(llama, tmp_path_factory):
    """A valid Llama adapter on all seven projections, r=4, to damage copies of."""
    hf_model, _ = llama
    return make_peft_adapter(hf_model, tmp_path_factory.mktemp("good") / "adapter", r=4, alpha=8,
                             targets=list(ALL_TARGETS))


@pytest.fixture
def damaged(good_adapter, tmp_path):
    """A fresh copy of ``good_adapter`` that the test may modify."""
    return Path(shutil.copytree(good_adapter, tmp_path / "adapter"))


def _edit_config(adapter_dir: Path, **changes) -> None:
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_tensors(adapter_dir: Path, edit) -> None:
    """Rewrites adapter_model.safetensors with ``edit(dict of torch tensors) -> dict`` (torch's writer)."""
    path = adapter_dir / "adapter_model.safetensors"
    save_file(edit(load_file(path)), path, metadata={"format": "pt"})


Q0_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q0_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _module(peft_model, layer: int, target: str):
    block = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return getattr(getattr(peft_model.base_model.model.model.layers[layer], block), target)


def _assert_matches_peft(weights: LoRAWeights, hf_model, adapter_dir: Path) -> None:
    """For every module in ``weights``: x @ A @ B == PEFT module output - base layer output (float32)."""
    reference = load_peft_model(hf_model, adapter_dir)
    rng = np.random.default_rng(0)
    for (layer, target), (a, b) in weights.layers.items():
        module = _module(reference, layer, target)
        x = rng.standard_normal((5, a.shape[0]), dtype=np.float32)  # [T, in]
        with torch.no_grad():
            xt = torch.from_numpy(x)
            expected = (module(xt) - module.base_layer(xt)).numpy()  # [T, out]
        np.testing.assert_allclose(x @ a @ b, expected, rtol=1e-4, atol=1e-5, err_msg=f"{layer} {target}")
    # and PEFT adapts exactly these modules
    peft_modules = {(i, t) for i in range(len(reference.base_model.model.model.layers)) for t in LORA_TARGETS
                    if hasattr(_module(reference, i, t), "lora_A")}
    assert set(weights.layers) == peft_modules


# -- reading -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_target_shapes_match_hf_modules(models, family):
    hf_model, cfg = models[family]
    shapes = target_shapes(cfg)
    assert tuple(shapes) == LORA_TARGETS
    for target, (in_features, out_features) in shapes.items():
        linear = _module_of_base(hf_model, 0, target)
        assert (linear.in_features, linear.out_features) == (in_features, out_features), target


def _module_of_base(hf_model, layer, target):
    block = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return getattr(getattr(hf_model.model.layers[layer], block), target)


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_peft_delta_all_targets_with_patterns(models, family, tmp_path):
    hf_model, cfg = models[family]
    adapter = make_peft_adapter(
        hf_model, tmp_path / "a", r=4, alpha=8, targets=list(ALL_TARGETS),
        rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 6},
        alpha_pattern={"mlp.up_proj": 3, r"^model\.layers\.0\.self_attn\.k_proj": 32}, seed=1)
    weights = load_peft_adapter(adapter, cfg, max_lora_rank=8)

    assert weights.rank == 6
    assert weights.targets == frozenset(LORA_TARGETS)
    assert set(weights.layers) == {(i, t) for i in range(2) for t in LORA_TARGETS}
    shapes = target_shapes(cfg)
    for (layer, target), (a, b) in weights.layers.items():
        rank = 2 if (layer, target) == (1, "q_proj") else 6 if target == "down_proj" else 4
        assert a.shape == (shapes[target][0], rank) and b.shape == (rank, shapes[target][1])
        assert a.dtype == b.dtype == np.float32
    assert weights.nbytes == sum(a.nbytes + b.nbytes for a, b in weights.layers.values())
    _assert_matches_peft(weights, hf_model, adapter)


@pytest.mark.parametrize("r,alpha", [(4, 8), (8, 3)])
def test_rslora_scaling_matches_peft(llama, tmp_path, r, alpha):
    hf_model, cfg = llama
    adapter = make_peft_adapter(hf_model, tmp_path / "a", r=r, alpha=alpha, targets=["q_proj", "down_proj"],
                                use_rslora=True)
    weights = load_peft_adapter(adapter, cfg, max_lora_rank=8)
    _assert_matches_peft(weights, hf_model, adapter)
    # rslora differs from plain scaling, so the check above would catch alpha / r
    plain = make_peft_adapter(hf_model, tmp_path / "b", r=r, alpha=alpha, targets=["q_proj", "down_proj"])
    a_rs, b_rs = weights.layers[(0, "q_proj")]
    _, b_plain = load_peft_adapter(plain, cfg, max_lora_rank=8).layers[(0, "q_proj")]
    np.testing.assert_allclose(b_rs / b_plain, np.sqrt(r), rtol=1e-5)


def test_first_matching_pattern_wins_like_peft(llama, tmp_path):
    hf_model, cfg = llama
    adapter = make_peft_adapter(hf_model, tmp_path / "a", r=4, alpha=4, targets=["q_proj", "v_proj"],
                                # "layers.0" and "_proj" match nothing: PEFT anchors a pattern at the end
                                # of the module name and at its start or just after a dot
                                rank_pattern={"layers.0": 1, "_proj": 1, r"layers\.1\..*": 3, "q_proj": 2},
                                alpha_pattern={"v_proj": 16, r".*": 1})
    weights = load_peft_adapter(adapter, cfg, max_lora_rank=4)
    ranks = {k: a.shape[1] for k, (a, _) in weights.layers.items()}
    assert ranks == {(0, "q_proj"): 2, (0, "v_proj"): 4, (1, "q_proj"): 3, (1, "v_proj"): 3}
    _assert_matches_peft(weights, hf_model, adapter)


@pytest.mark.parametrize("layers", [1, [0], [1, 0]])
def test_layers_to_transform(llama, tmp_path, layers):
    hf_model, cfg = llama
    adapter = make_peft_adapter(hf_model, tmp_path / "a", r=2, alpha=4, targets=["k_proj", "gate_proj"],
                                layers_to_transform=layers)
    weights = load_peft_adapter(adapter, cfg, max_lora_rank=4)
    wanted = {layers} if isinstance(layers, int) else set(layers)
    assert {layer for layer, _ in weights.layers} == wanted
    _assert_matches_peft(weights, hf_model, adapter)


def test_regex_target_modules(models, tmp_path):
    hf_model, cfg = models["qwen3"]
    adapter = make_peft_adapter(hf_model, tmp_path / "a", r=4, alpha=8,
                                targets=r"model\.layers\.1\.(self_attn\.(q|v)_proj|mlp\.up_proj)")
    weights = load_peft_adapter(adapter, cfg, max_lora_rank=4)
    assert set(weights.layers) == {(1, "q_proj"), (1, "v_proj"), (1, "up_proj")}
    _assert_matches_peft(weights, hf_model, adapter)


def test_exclude_modules(llama, tmp_path):
    hf_model, cfg = llama
    adapter = make_peft_adapter(hf_model, tmp_path / "a", r=4, alpha=8, targets=["q_proj", "o_proj"],
                                exclude_modules=["model.layers.0.self_attn.o_proj"])
    weights = load_peft_adapter(adapter, cfg, max_lora_rank=4)
    assert set(weights.layers) == {(0, "q_proj"), (1, "q_proj"), (1, "o_proj")}
    _assert_matches_peft(weights, hf_model, adapter)


@pytest.mark.parametrize("dtype,name", [(torch.bfloat16, "BF16"), (torch.float16, "F16")])
def test_half_precision_adapter_tensors(llama, tmp_path, dtype, name):
    hf_model, cfg = llama
    adapter = make_peft_adapter(hf_model, tmp_path / "a", r=4, alpha=8, targets=["q_proj", "up_proj"],
                                adapter_dtype=dtype)
    header_len = int.from_bytes((adapter / "adapter_model.safetensors").read_bytes()[:8], "little")
    header = json.loads((adapter / "adapter_model.safetensors").read_bytes()[8:8 + header_len])
    assert header[Q0_A]["dtype"] == name  # the file really holds half-precision tensors
    weights = load_peft_adapter(adapter, cfg, max_lora_rank=4)
    a, b = weights.layers[(0, "q_proj")]
    assert a.dtype == b.dtype == np.float32
    np.testing.assert_array_equal(a, load_file(adapter / "adapter_model.safetensors")[Q0_A].float().numpy().T)
    _assert_matches_peft(weights, hf_model, adapter)


def test_peft_stores_float32_adapters_for_a_bf16_model(tmp_path):
    _, hf_model = make_hf_model(tmp_path, "qwen3", torch.bfloat16)
    adapter = make_peft_adapter(hf_model, tmp_path / "a", r=2, alpha=4, targets=["q_proj"])
    assert {t.dtype for t in load_file(adapter / "adapter_model.safetensors").values()} == {torch.float32}


def test_adapter_name_inside_keys_is_accepted(llama, good_adapter, damaged):
    _, cfg = llama
    _edit_tensors(damaged, lambda t: {k.replace(".weight", ".default.weight"): v for k, v in t.items()})
    assert all(".lora_A.default.weight" in k or ".lora_B.default.weight" in k
               for k in load_file(damaged / "adapter_model.safetensors"))
    renamed = load_peft_adapter(damaged, cfg, max_lora_rank=4)
    original = load_peft_adapter(good_adapter, cfg, max_lora_rank=4)
    assert set(renamed.layers) == set(original.layers)
    for key, (a, b) in original.layers.items():
        np.testing.assert_array_equal(renamed.layers[key][0], a)
        np.testing.assert_array_equal(renamed.layers[key][1], b)


def test_all_linear_shorthand(llama, damaged):
    _, cfg = llama
    _edit_config(damaged, target_modules="all-linear")
    assert load_peft_adapter(damaged, cfg, max_lora_rank=4).targets == frozenset(LORA_TARGETS)


def test_name_and_path(llama, good_adapter):
    _, cfg = llama
    weights = load_peft_adapter(good_adapter, cfg, max_lora_rank=4)
    assert weights.name == "adapter" and weights.path == str(good_adapter)
    assert load_peft_adapter(str(good_adapter), cfg, max_lora_rank=4, name="sql").name == "sql"


# -- rejections built with PEFT itself -----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    (dict(use_dora=True), r"DoRA \(use_dora\) is not supported"),
    (dict(modules_to_save=["lm_head"]), r"modules_to_save=\['lm_head'\] is not supported"),
    (dict(bias="all"), r"bias='all' is not supported"),
    (dict(bias="lora_only"), r"bias='lora_only' is not supported"),
    (dict(lora_bias=True), r"a bias on lora_B \(lora_bias\) is not supported"),
])
def test_rejects_unsupported_peft_features(models, tmp_path, kwargs, message):
    hf_model, cfg = models["qwen2"]  # qwen2 has q/k/v biases, so bias='all' really saves some
    adapter = make_peft_adapter(hf_model, tmp_path / "a", r=4, alpha=8, targets=["q_proj", "v_proj"], **kwargs)
    with pytest.raises(AdapterError, match=message) as info:
        load_peft_adapter(adapter, cfg, max_lora_rank=8)
    assert "adapter_config.json" in str(info.value)


@pytest.mark.parametrize("extra,name", [("embed_tokens", "model.embed_tokens"), ("lm_head", "lm_head")])
def test_rejects_embedding_and_lm_head_targets(llama, tmp_path, extra, name):
    hf_model, cfg = llama
    adapter = make_peft_adapter(hf_model, tmp_path / "a", r=4, alpha=8, targets=["q_proj", extra])
    with pytest.raises(AdapterError, match=rf"target module '{name}' is not supported yet"):
        load_peft_adapter(adapter, cfg, max_lora_rank=8)


def test_rejects_pickle_only_adapter(llama, tmp_path):
    hf_model, cfg = llama
    adapter = make_peft_adapter(hf_model, tmp_path / "a", r=4, alpha=8, targets=["q_proj"],
                                safe_serialization=False)
    assert (adapter / "adapter_model.bin").is_file() and not (adapter / "adapter_model.safetensors").exists()
    with pytest.raises(AdapterError, match=r"has only adapter_model\.bin \(a pickle\)"):
        load_peft_adapter(adapter, cfg, max_lora_rank=8)


def test_rejects_rank_above_max_lora_rank(llama, tmp_path):
    hf_model, cfg = llama
    adapter = make_peft_adapter(hf_model, tmp_path / "a", r=4, alpha=8, targets=["q_proj", "up_proj"],
                                rank_pattern={"up_proj": 16})
    with pytest.raises(AdapterError, match=r"model\.layers\.0\.mlp\.up_proj has rank 16, above max_lora_rank=8"):
        load_peft_adapter(adapter, cfg, max_lora_rank=8)


@pytest.mark.parametrize("change,message", [
    (dict(hidden_size=96), r"q_proj\.lora_A\.weight' has shape \[4, 64\], expected \[r, 96\]: q_proj of the "
                           r"base model takes hidden_size=96"),
    (dict(head_dim=16), r"q_proj\.lora_B\.weight' has shape \[128, 4\], expected \[64, r\]: q_proj of the "
                        r"base model gives num_heads\*head_dim=64"),
    (dict(intermediate_size=128), r"gate_proj\.lora_B\.weight' has shape \[96, 4\], expected \[128, r\]: "
                                  r"gate_proj of the base model gives intermediate_size=128"),
    (dict(num_layers=1), r"tensor 'base_model\.model\.model\.layers\.1\..*' is for layer 1, but the base "
                         r"model has 1 layers"),
])
def test_rejects_shapes_that_do_not_fit_the_base(llama, good_adapter, change, message):
    _, cfg = llama
    with pytest.raises(AdapterError, match=message):
        load_peft_adapter(good_adapter, dataclasses.replace(cfg, **change), max_lora_rank=8)


# -- rejections of hand-damaged configs ----------------------------------------------------------------------


@pytest.mark.parametrize("changes,message", [
    (dict(r=8), r"q_proj\.lora_A\.weight' has rank 4, but adapter_config\.json gives "
                r"model\.layers\.0\.self_attn\.q_proj rank 8 \(r\)"),
    (dict(rank_pattern={"layers.1.mlp.gate_proj": 2}),
     r"has rank 4, but adapter_config\.json gives model\.layers\.1\.mlp\.gate_proj rank 2 "
     r"\(rank_pattern\['layers\.1\.mlp\.gate_proj'\]\)"),
    (dict(target_modules=["q_proj", "c_attn"]), r"target_modules names 'c_attn', which the llama base model "
                                                r"does not have"),
    (dict(target_modules=["q_proj", "input_layernorm"]),
     r"target module 'model\.layers\.0\.input_layernorm' is not a projection LoRA can adapt"),
    (dict(target_modules=r".*embed_tokens|.*q_proj"), r"target module 'model\.embed_tokens' is not supported yet"),
    (dict(target_modules=r"nothing"), r"target_modules 'nothing' matches no module of the base model"),
    (dict(target_modules=["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
     r"has LoRA weights for model\.layers\.0\.self_attn\.v_proj, which adapter_config\.json's target_modules"),
    (dict(layers_to_transform=[0, 5]), r"layers_to_transform has layer 5, but the base model has 2 layers"),
    (dict(layers_to_transform="0"), r"layers_to_transform must be an integer or a list of integers"),
    (dict(use_dora=True), r"DoRA \(use_dora\) is not supported"),
    (dict(use_rslora="yes"), r"use_rslora must be true or false"),
    (dict(peft_type="LOHA"), r"peft_type is 'LOHA'; only LoRA adapters"),
    (dict(peft_type=None), r"peft_type is None"),
    (dict(target_modules=None), r"target_modules is missing"),
    (dict(target_modules=r"(unclosed"), r"target_modules entry '\(unclosed' is not a valid regular expression"),
    (dict(r=0), r"r must be a positive integer, got 0"),
    (dict(r="4"), r"r must be a positive integer, got '4'"),
    (dict(lora_alpha=float("nan")), r"lora_alpha must be a finite number, got nan"),
    (dict(rank_pattern={"q_proj": -1}), r"rank_pattern\['q_proj'\] = -1; values must be positive integers"),
    (dict(alpha_pattern={"q_proj": "x"}), r"alpha_pattern\['q_proj'\] = 'x'; values must be finite numbers"),
    (dict(init_lora_weights="pissa_niter_4"), r"init_lora_weights='pissa_niter_4' adapters modify the base"),
    (dict(alora_invocation_tokens=[5, 6]), r"activated LoRA \(alora_invocation_tokens\) is not supported"),
    (dict(trainable_token_indices=[1, 2]), r"trainable token embeddings \(trainable_token_indices\)"),
])
def test_rejects_bad_config_fields(llama, damaged, changes, message):
    _, cfg = llama
    _edit_config(damaged, **changes)
    with pytest.raises(AdapterError, match=message) as info:
        load_peft_adapter(damaged, cfg, max_lora_rank=8)
    assert str(damaged) in str(info.value)


@pytest.mark.parametrize("text,message", [
    ("{not json", r"adapter_config\.json is not valid JSON"),
    ("", r"adapter_config\.json is not valid JSON"),
    ("[1, 2]", r"adapter_config\.json does not hold a JSON object"),
])
def test_rejects_malformed_config_json(llama, damaged, text, message):
    _, cfg = llama
    (damaged / "adapter_config.json").write_text(text)
    with pytest.raises(AdapterError, match=message):
        load_peft_adapter(damaged, cfg, max_lora_rank=8)


def test_rejects_missing_files(llama, damaged, tmp_path):
    _, cfg = llama
    with pytest.raises(AdapterError, match=r"is not a directory"):
        load_peft_adapter(tmp_path / "nowhere", cfg, max_lora_rank=8)
    (damaged / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=r"has no adapter_model\.safetensors"):
        load_peft_adapter(damaged, cfg, max_lora_rank=8)
    (damaged / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match=r"has no adapter_config\.json"):
        load_peft_adapter(damaged, cfg, max_lora_rank=8)


def test_rejects_bad_max_lora_rank(llama, good_adapter):
    _, cfg = llama
    with pytest.raises(ValueError, match=r"max_lora_rank must be a positive integer, got 0"):
        load_peft_adapter(good_adapter, cfg, max_lora_rank=0)


# -- rejections of hand-damaged weight files -----------------------------------------------------------------


@pytest.mark.parametrize("key,value,message", [
    (Q0_A, float("nan"), r"tensor '.*q_proj\.lora_A\.weight' has 1 non-finite values \(NaN or Inf\)"),
    (Q0_B, float("inf"), r"tensor '.*q_proj\.lora_B\.weight' has 1 non-finite values"),
    (Q0_B, float("-inf"), r"tensor '.*q_proj\.lora_B\.weight' has 1 non-finite values"),
])
def test_rejects_non_finite_weights(llama, damaged, key, value, message):
    _, cfg = llama

    def poison(tensors):
        tensors[key][1, 2] = value
        return tensors

    _edit_tensors(damaged, poison)
    with pytest.raises(AdapterError, match=message):
        load_peft_adapter(damaged, cfg, max_lora_rank=8)


def test_rejects_scaling_overflow(llama, damaged):
    _, cfg = llama
    _edit_config(damaged, lora_alpha=1e38, r=4)

    def huge(tensors):
        tensors[Q0_B][0, 0] = 3e38
        return tensors

    _edit_tensors(damaged, huge)
    with pytest.raises(AdapterError, match=r"q_proj\.lora_B\.weight' overflows float32 once scaled"):
        load_peft_adapter(damaged, cfg, max_lora_rank=8)


@pytest.mark.parametrize("dtype,name", [(torch.int64, "I64"), (torch.int8, "I8"), (torch.bool, "BOOL"),
                                        (torch.float8_e4m3fn, "F8_E4M3")])
def test_rejects_non_float_dtypes(llama, damaged, dtype, name):
    _, cfg = llama

    def cast(tensors):
        tensors[Q0_A] = tensors[Q0_A].to(dtype)
        return tensors

    _edit_tensors(damaged, cast)
    with pytest.raises(AdapterError, match=rf"tensor '.*q_proj\.lora_A\.weight' has dtype {name}; LoRA "
                                           r"weights must be floating point"):
        load_peft_adapter(damaged, cfg, max_lora_rank=8)


@pytest.mark.parametrize("drop,message", [
    ([Q0_B], r"tensor '.*q_proj\.lora_A\.weight' has no matching lora_B for model\.layers\.0\.self_attn\.q_proj"),
    ([Q0_A], r"tensor '.*q_proj\.lora_B\.weight' has no matching lora_A for model\.layers\.0\.self_attn\.q_proj"),
    ([Q0_A, Q0_B], r"adapter_config\.json targets model\.layers\.0\.self_attn\.q_proj, but the file has no "
                   r"LoRA weights for it"),
])
def test_rejects_incomplete_pairs(llama, damaged, drop, message):
    _, cfg = llama
    _edit_tensors(damaged, lambda t: {k: v for k, v in t.items() if k not in drop})
    with pytest.raises(AdapterError, match=message):
        load_peft_adapter(damaged, cfg, max_lora_rank=8)


@pytest.mark.parametrize("extra_key,message", [
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", r"DoRA magnitude vector"),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", r"is a bias"),
    ("base_model.model.model.embed_tokens.lora_embedding_A", r"LoRA on the token embeddings"),
    ("base_model.model.lm_head.lora_A.weight", r"LoRA on the LM head"),
    ("base_model.model.lm_head.modules_to_save.default.weight", r"a modules_to_save copy"),
    ("base_model.model.model.layers.0.self_attn.q_norm.lora_A.weight", r"not a LoRA A/B weight of a supported"),
    ("model.layers.0.self_attn.q_proj.lora_A.weight", r"does not start with 'base_model\.model\.'"),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.other.weight", r"holds several adapters"),
])
def test_rejects_unexpected_tensors(llama, damaged, extra_key, message):
    _, cfg = llama

    def add(tensors):
        tensors[extra_key] = torch.zeros(4, 64)
        return tensors

    if extra_key.endswith(".other.weight"):
        _edit_tensors(damaged, lambda t: {k.replace(".weight", ".default.weight"): v for k, v in t.items()})
    _edit_tensors(damaged, add)
    with pytest.raises(AdapterError, match=message) as info:
        load_peft_adapter(damaged, cfg, max_lora_rank=8)
    assert "adapter_model.safetensors" in str(info.value)


def test_rejects_ranks_disagreeing_between_a_and_b(llama, damaged):
    _, cfg = llama

    def shrink(tensors):
        tensors[Q0_B] = tensors[Q0_B][:, :3].contiguous()
        return tensors

    _edit_tensors(damaged, shrink)
    with pytest.raises(AdapterError, match=r"\(rank 4\) and '.*q_proj\.lora_B\.weight' \(rank 3\) disagree"):
        load_peft_adapter(damaged, cfg, max_lora_rank=8)


def test_rejects_empty_weight_file(llama, damaged):
    _, cfg = llama
    (damaged / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors is empty"):
        load_peft_adapter(damaged, cfg, max_lora_rank=8)


def test_rejects_weight_file_without_tensors(llama, damaged):
    _, cfg = llama
    save_file({}, damaged / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors holds no tensors"):
        load_peft_adapter(damaged, cfg, max_lora_rank=8)


@pytest.mark.parametrize("keep,message", [
    (5, r"is truncated \(5 bytes, shorter than the 8-byte header length\)"),
    (100, r"is truncated or not a safetensors file \(header length \d+, file size 100 bytes\)"),
    (-1, r"is truncated: tensor '.*' ends at byte \d+, the file has \d+"),
])
def test_rejects_truncated_weight_file(llama, damaged, keep, message):
    _, cfg = llama
    path = damaged / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(AdapterError, match=message):
        load_peft_adapter(damaged, cfg, max_lora_rank=8)


def _safetensors_bytes(header: bytes, data: bytes = b"") -> bytes:
    return len(header).to_bytes(8, "little") + header + data


@pytest.mark.parametrize("content,message", [
    (_safetensors_bytes(b"{oops}}"), r"not a safetensors file \(its header is not valid JSON"),
    (_safetensors_bytes(b"[]"), r"not a safetensors file \(its header is not a JSON object\)"),
    (_safetensors_bytes(json.dumps({Q0_A: {"dtype": "F32"}}).encode()),
     r"header entry for tensor '.*q_proj\.lora_A\.weight' is malformed"),
    (_safetensors_bytes(json.dumps({"t": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}).encode(),
                        bytes(8)),
     r"tensor 't' has 8 bytes of data but its shape \[2, 2\] and dtype F32 need 16"),
])
def test_rejects_corrupt_weight_file(llama, damaged, content, message):
    _, cfg = llama
    (damaged / "adapter_model.safetensors").write_bytes(content)
    with pytest.raises(AdapterError, match=message):
        load_peft_adapter(damaged, cfg, max_lora_rank=8)
