"""Incremental detokenization against a full decode, token by token, for a byte-level BPE (multi-byte
characters split across tokens), a Metaspace (sentencepiece-style leading spaces) and a Llama-2-style
byte-fallback tokenizer (bytes of rare characters as <0xNN> tokens, fused on decode)."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

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


def _byte_fallback_tokenizer() -> Tokenizer:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for ch in "\u2581abcdefghijklmnopqrstuvwxyzTS.,;'":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


_BUILDERS = {"byte_level": build_tokenizer, "metaspace": _metaspace_tokenizer,
             "byte_fallback": _byte_fallback_tokenizer}


@pytest.fixture(scope="module", params=list(_BUILDERS))
def tokenizer(request, tmp_path_factory):
    raw = _BUILDERS[request.param]()
    model_dir = tmp_path_factory.mktemp(request.param)
    raw.save(str(model_dir / "tokenizer.json"))
    return JmloraTokenizer(model_dir)


def _check_stream(tokenizer, ids, skip, text_is_valid):
    """Token by token: where no character is cut in two the settled text equals the full decode; for valid
    text (``text_is_valid``) every settled text is a prefix of the final text (nothing streamed is retracted);
    the final text is the full decode."""
    detok = IncrementalDetokenizer(tokenizer.decode, skip)
    final = tokenizer.decode(ids, skip_special_tokens=skip)
    for n in range(1, len(ids) + 1):
        text = detok.update(ids[:n])
        full = tokenizer.decode(ids[:n], skip_special_tokens=skip)
        if "\ufffd" not in full:
            assert text == full, (n, text, full)
        if text_is_valid:
            assert final.startswith(text), (n, text, final)
    assert detok.final(ids) == final


@pytest.mark.parametrize("skip", [True, False])
def test_real_text_token_by_token(tokenizer, skip):
    ids = tokenizer.encode(TEXT)
    if ids and ids[0] == 1:                     # drop the <s> the template prepends: outputs have none
        ids = ids[1:]
    assert len(ids) > 20
    _check_stream(tokenizer, ids, skip, text_is_valid=True)


@pytest.mark.parametrize("skip", [True, False])
def test_random_tokens_including_special_ones(tokenizer, skip):
    rng = np.random.default_rng(0)
    for _ in range(5):
        _check_stream(tokenizer, [int(t) for t in rng.integers(0, tokenizer.vocab_size, 60)], skip,
                      text_is_valid=False)
