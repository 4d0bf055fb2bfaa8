"""The tokenizer: Hugging Face ``tokenizer.json`` through the ``tokenizers`` library.

Special tokens come from ``tokenizer_config.json`` (bos/eos/pad, chat template, ``add_bos_token``),
``generation_config.json`` (eos ids used to stop generation) and ``config.json``, in that order of
preference, as transformers resolves them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer


class TokenizerError(ValueError):
    """A tokenizer directory that is missing or malformed."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise TokenizerError(f"{path} does not hold a JSON object")
    return value


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Text <-> token ids for one model directory.

    Attributes:
      bos_token_id: id of the beginning-of-sequence token, or None.
      eos_token_ids: ids that end generation (union of generation_config and tokenizer_config's eos).
      pad_token_id: padding id, or None.
      chat_template: the Jinja chat template string from tokenizer_config.json, or None.
    """

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {model_dir}")
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{path} could not be parsed: {e}") from e
        tok_cfg = _read_json(model_dir / "tokenizer_config.json")
        gen_cfg = _read_json(model_dir / "generation_config.json")
        model_cfg = _read_json(model_dir / "config.json")

        def token_id(name: str) -> int | None:
            text = _token_text(tok_cfg.get(f"{name}_token"))
            if text is not None and self._tok.token_to_id(text) is not None:
                return self._tok.token_to_id(text)
            for source in (gen_cfg, model_cfg):
                value = source.get(f"{name}_token_id")
                if isinstance(value, list):
                    value = value[0] if value else None
                if value is not None:
                    return int(value)
            return None

        self.bos_token_id = token_id("bos")
        self.pad_token_id = token_id("pad")
        eos_ids: list[int] = []
        for source in (gen_cfg, model_cfg):
            value = source.get("eos_token_id")
            eos_ids += value if isinstance(value, list) else ([] if value is None else [value])
        eos_tok = token_id("eos")
        if eos_tok is not None:
            eos_ids.append(eos_tok)
        self.eos_token_ids = tuple(dict.fromkeys(int(i) for i in eos_ids))
        self.add_bos_token = bool(tok_cfg.get("add_bos_token", False))
        self.chat_template = tok_cfg.get("chat_template")
        self.special_token_ids = frozenset(
            i for i, token in self._tok.get_added_tokens_decoder().items() if token.special)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the tokenizer's post-processor runs (BOS etc.)."""
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if (add_special_tokens and self.add_bos_token and self.bos_token_id is not None
                and (not ids or ids[0] != self.bos_token_id)):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)
