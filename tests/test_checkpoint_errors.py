"""Bad checkpoints and configs raise clear exceptions that name the file, tensor or feature."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hf_models import make_hf_model
from safetensors.numpy import load_file, save_file

from jmlora.config import ConfigError, ModelConfig, UnsupportedModelError
from jmlora.model import CheckpointError, load_params


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    model_dir, _ = make_hf_model(tmp_path_factory.mktemp("good"), "llama", num_hidden_layers=1)
    return model_dir


@pytest.fixture
def model_dir(good_dir, tmp_path):
    """A fresh copy of a good checkpoint that each test may break."""
    return shutil.copytree(good_dir, tmp_path / "model")


def _edit_config(model_dir, **changes):
    path = model_dir / "config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def _load(model_dir, **kwargs):
    cfg = ModelConfig.from_pretrained(model_dir, **kwargs)
    return load_params(model_dir, cfg, dtype="float32")


def test_good_checkpoint_loads(model_dir):
    assert _load(model_dir).embed.shape == (512, 64)


def test_missing_config(model_dir):
    (model_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        _load(model_dir)


def test_malformed_config(model_dir):
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json is not valid JSON"):
        _load(model_dir)


def test_config_missing_field(model_dir):
    path = model_dir / "config.json"
    raw = json.loads(path.read_text())
    del raw["hidden_size"]
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="has no 'hidden_size'"):
        _load(model_dir)


def test_unknown_model_type(model_dir):
    _edit_config(model_dir, model_type="gpt_neox")
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt_neox' is not supported"):
        _load(model_dir)


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope"])
def test_unhandled_rope_type(model_dir, rope_type):
    _edit_config(model_dir, rope_parameters={"rope_type": rope_type, "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match=f"rope type '{rope_type}' is not supported"):
        _load(model_dir)


def test_sliding_window_shorter_than_model_length(model_dir):
    _edit_config(model_dir, model_type="mistral", sliding_window=64)
    with pytest.raises(UnsupportedModelError, match=r"sliding_window=64.*shorter than the model length \(256\)"):
        _load(model_dir)
    # the window never binds when sequences are no longer than it
    assert _load(model_dir, max_model_len=64).embed.shape == (512, 64)


def test_missing_weights(model_dir):
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no safetensors weights in"):
        _load(model_dir)


def test_bin_only_checkpoint(model_dir):
    (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"pytorch_model.bin: convert it to safetensors"):
        _load(model_dir)


def _rewrite_weights(model_dir, mutate):
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    mutate(tensors)
    save_file(tensors, str(path))


def test_tensor_of_wrong_shape(model_dir):
    def mutate(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    _rewrite_weights(model_dir, mutate)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.k_proj.weight'.*shape \[16, 64\], "
                                              r"expected \[32, 64\]"):
        _load(model_dir)


def test_missing_tensor(model_dir):
    _rewrite_weights(model_dir, lambda t: t.pop("model.layers.0.mlp.down_proj.weight"))
    with pytest.raises(CheckpointError, match="no tensor 'model.layers.0.mlp.down_proj.weight'"):
        _load(model_dir)


def test_non_float_tensor(model_dir):
    def mutate(t):
        t["model.norm.weight"] = np.ones(64, np.int32)
    _rewrite_weights(model_dir, mutate)
    with pytest.raises(CheckpointError, match="'model.norm.weight'.*non-float dtype I32"):
        _load(model_dir)


def test_non_finite_tensor(model_dir):
    def mutate(t):
        t["model.layers.0.input_layernorm.weight"][3] = np.nan
    _rewrite_weights(model_dir, mutate)
    with pytest.raises(CheckpointError, match="'model.layers.0.input_layernorm.weight'.*NaN or infinite"):
        _load(model_dir)


@pytest.mark.parametrize("keep_bytes", [0, 4, 100, -1000])
def test_truncated_safetensors(model_dir, keep_bytes):
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep_bytes] if keep_bytes >= 0 else data[:keep_bytes])
    with pytest.raises(CheckpointError, match=r"model.safetensors is (truncated|empty)"):
        _load(model_dir)


def test_sharded_index_naming_a_missing_file(model_dir):
    weights = load_file(str(model_dir / "model.safetensors"))
    index = {"metadata": {}, "weight_map": {name: "model-00001-of-00002.safetensors" for name in weights}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="names model-00001-of-00002.safetensors, which does not exist"):
        _load(model_dir)
