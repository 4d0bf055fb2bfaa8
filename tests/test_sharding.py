"""The same decoder on a multi-device mesh (8 virtual CPU devices) gives the 1-device result."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import make_hf_model
from test_model import PAGE_SIZE, PAGES_PER_SEQ, PROMPTS, run_chunk, shuffled_page_table

from jmlora.config import ModelConfig
from jmlora.model import init_kv_cache, load_params, make_mesh
from jmlora.sharding import MODEL_AXIS, logical_sharding


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    model_dir, _ = make_hf_model(tmp_path_factory.mktemp("qwen3"), "qwen3", num_hidden_layers=2)
    return model_dir, ModelConfig.from_pretrained(model_dir)


def _logprobs(model_dir, cfg, mesh):
    params = load_params(model_dir, cfg, dtype="float32", mesh=mesh)
    cache = init_kv_cache(cfg, len(PROMPTS) * PAGES_PER_SEQ, PAGE_SIZE, jnp.float32, mesh)
    lp, _ = run_chunk(params, cfg, cache, PROMPTS, [0] * len(PROMPTS), shuffled_page_table(len(PROMPTS)), pad_to=16)
    return params, lp


@pytest.mark.parametrize("model_parallel", [2, 4])
def test_tensor_parallel_matches_single_device(tiny_qwen3, model_parallel):
    assert len(jax.devices()) == 8
    model_dir, cfg = tiny_qwen3
    _, single = _logprobs(model_dir, cfg, make_mesh())
    mesh = make_mesh(model_parallel, devices=jax.devices())          # (8 / mp data, mp model)
    params, sharded = _logprobs(model_dir, cfg, mesh)
    layer = params.layers[0]
    if model_parallel == 2:
        # q/k/v are one weight [embed, kv_heads, q_per_kv + 2, head_dim], split by whole KV-head groups
        assert layer.wq is None and layer.w_qkv.sharding.spec[1] == MODEL_AXIS
        assert len(layer.w_qkv.sharding.device_set) == 8
    else:
        # 2 KV heads cannot split 4 ways: q/k/v stay separate so that the 4 query heads still split,
        # and the rules fall back to replicating the KV-head axis
        assert layer.w_qkv is None and layer.wq.sharding.spec[1] == MODEL_AXIS
        assert layer.wk.sharding.spec[1] is None
    assert tuple(layer.w_gate_up.sharding.spec) == (None, None, MODEL_AXIS)
    for i, p in enumerate(PROMPTS):
        np.testing.assert_allclose(sharded[i, :len(p)], single[i, :len(p)], atol=1e-5, rtol=0)


def test_logical_sharding_rejects_unknown_axis():
    with pytest.raises(KeyError, match="unknown logical axis 'nonsense'"):
        logical_sharding(make_mesh(), ("embed", "nonsense"))
