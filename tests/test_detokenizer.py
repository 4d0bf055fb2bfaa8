"""Incremental detokenization against a full decode, token by token, for a byte-level BPE (multi-byte
characters split across tokens) and a Metaspace (sentencepiece-style leading spaces) tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jmlora.engine.detokenizer import IncrementalDetokenizer
from jmlora.tiny import build_tokenizer
from jmlora.tokenizer import Tokenizer as JmloraTokenizer

TEXT = ("The café served crème brûlée at 9 o'clock; 日本語のテキスト and naïve résumé — ok. "
        "Spaces   and\nnew lines\tand tabs, then emoji 🙂🚀 at the end.")


def _metaspace_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([TEXT, "the end of the text is here and there"], trainer=trainer)
    return tok


@pytest.fixture(scope="module", params=["byte_level", "metaspace"])
def tokenizer(request, tmp_path_factory):
    raw = build_tokenizer() if request.param == "byte_level" else _metaspace_tokenizer()
    model_dir = tmp_path_factory.mktemp(request.param)
    raw.save(str(model_dir / "tokenizer.json"))
    return JmloraTokenizer(model_dir)


def _check_stream(tokenizer, ids, skip):
    detok = IncrementalDetokenizer(tokenizer.decode, skip)
    for n in range(1, len(ids) + 1):
        text = detok.update(ids[:n])
        full = tokenizer.decode(ids[:n], skip_special_tokens=skip)
        assert full.startswith(text), (n, text, full)
        if not full.endswith("\ufffd"):
            assert text == full, (n, text, full)
    assert detok.final(ids) == tokenizer.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("skip", [True, False])
def test_real_text_token_by_token(tokenizer, skip):
    ids = tokenizer.encode(TEXT)
    if ids and ids[0] == 1:                     # drop the <s> the template prepends: outputs have none
        ids = ids[1:]
    assert len(ids) > 20
    _check_stream(tokenizer, ids, skip)


@pytest.mark.parametrize("skip", [True, False])
def test_random_tokens_including_special_ones(tokenizer, skip):
    rng = np.random.default_rng(0)
    for _ in range(5):
        _check_stream(tokenizer, [int(t) for t in rng.integers(0, tokenizer.vocab_size, 60)], skip)
