"""The tokenizer against transformers' on the same files, and special-token resolution."""

from __future__ import annotations

import json

import pytest
import transformers

from jmlora.tiny import create_tiny_checkpoint
from jmlora.tokenizer import Tokenizer, TokenizerError

TEXTS = ["Hello world!", "jmlora serves many LoRA adapters", "  odd   spacing\nand lines ", "ünïcödé ✓ 123", ""]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return create_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def test_encode_decode_match_transformers(tiny_dir):
    ours = Tokenizer(tiny_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ids[0] == ours.bos_token_id == 1
        assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True) == text
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False)


def test_special_tokens_from_config_files(tiny_dir):
    tok = Tokenizer(tiny_dir)
    assert (tok.bos_token_id, tok.eos_token_ids, tok.pad_token_id) == (1, (2,), 0)
    assert tok.special_token_ids == {0, 1, 2}
    assert "messages" in tok.chat_template
    # generation_config.json may list several eos ids (Llama-3 style); all of them stop generation
    (tiny_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert Tokenizer(tiny_dir).eos_token_ids == (2, 7)


def test_add_bos_token_without_post_processor(tiny_dir, tmp_path):
    raw = json.loads((tiny_dir / "tokenizer.json").read_text())
    raw["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "add_bos_token": True}))
    tok = Tokenizer(tmp_path)
    assert tok.encode("Hello")[0] == 1 and tok.encode("Hello").count(1) == 1


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{\"version\": \"1.0\"}")
    with pytest.raises(TokenizerError, match="tokenizer.json could not be parsed"):
        Tokenizer(tmp_path)
