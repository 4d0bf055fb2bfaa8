"""End to end: greedy generation equals transformers' generate; the CLI runs on a fresh tiny checkpoint."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hf_models import make_hf_model

from jmlora.generation import LoadedModel, generate_ids
from jmlora.tiny import build_tokenizer


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_greedy_generation_matches_transformers(tmp_path, family):
    model_dir, hf_model = make_hf_model(tmp_path, family, num_hidden_layers=2)
    build_tokenizer().save(str(model_dir / "tokenizer.json"))
    model = LoadedModel.load(model_dir, dtype="float32")
    prompts = [[1, 17, 29, 301], [1, 400, 5, 6, 7, 8, 9, 10, 11], [1]]
    ours = generate_ids(model, prompts, max_new_tokens=10, stop_ids=(), page_size=4)
    for prompt, out in zip(prompts, ours):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert out == ref


def test_generation_validates_input(tmp_path):
    model_dir, _ = make_hf_model(tmp_path, "llama", num_hidden_layers=1)
    build_tokenizer().save(str(model_dir / "tokenizer.json"))
    model = LoadedModel.load(model_dir, dtype="float32")
    with pytest.raises(ValueError, match="token ids must lie in"):
        generate_ids(model, [[1, 512]])
    with pytest.raises(ValueError, match="exceeds max_model_len 256"):
        generate_ids(model, [[1] * 250], max_new_tokens=10)
    with pytest.raises(ValueError, match="non-empty"):
        generate_ids(model, [[]])
    with pytest.raises(ValueError, match="temperature"):
        generate_ids(model, [[1]], temperature=-1.0)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "jmlora.entrypoints.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_cli_create_tiny_model_and_generate(tmp_path):
    made = _cli("create-tiny-model", str(tmp_path / "tiny"), "--family", "qwen3", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    run = _cli("generate", str(tmp_path / "tiny"), "--prompt", "Hello world", "--prompt", "The quick brown fox",
               "--max-tokens", "6", "--temperature", "0.7", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("--- [base] prompt:") == 2 and "'The quick brown fox'" in run.stdout
    again = _cli("generate", str(tmp_path / "tiny"), "--prompt", "Hello world", "--prompt", "The quick brown fox",
                 "--max-tokens", "6", "--temperature", "0.7", cwd=tmp_path)
    assert again.stdout == run.stdout, "seeded sampling must be reproducible"


def test_cli_reports_bad_model_dir(tmp_path):
    run = _cli("generate", str(tmp_path / "nothing"), "--prompt", "hi", cwd=tmp_path)
    assert run.returncode == 2
    assert "no config.json in" in run.stderr


def test_cli_generate_with_a_lora_adapter(tmp_path):
    import transformers
    from lora_fixtures import make_peft_adapter

    assert _cli("create-tiny-model", str(tmp_path / "tiny"), cwd=tmp_path).returncode == 0
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    adapter = make_peft_adapter(hf_model, tmp_path / "adapter", r=8, alpha=16, targets="all-linear")
    run = _cli("generate", str(tmp_path / "tiny"), "--prompt", "Hello world", "--lora", f"mine={adapter}",
               "--max-tokens", "6", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "--- [base] prompt: 'Hello world'" in run.stdout and "--- [mine] prompt: 'Hello world'" in run.stdout
    bad = _cli("generate", str(tmp_path / "tiny"), "--prompt", "hi", "--lora", "oops", cwd=tmp_path)
    assert bad.returncode == 2 and "--lora takes NAME=PATH" in bad.stderr
