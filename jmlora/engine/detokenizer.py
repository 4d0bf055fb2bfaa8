"""Incremental detokenization: the text of a growing list of output tokens, without decoding all of them again
for every new token (which made stop-string checks quadratic in the output length).

The scheme is the windowed one vLLM uses: decode a short window of tokens twice, with and without the newest
ones, and append the difference; the window starts where the previous settled text ended, so tokenizers whose
decoded text of a token depends on its neighbours (leading-space rules) give the same text as a full decode.
Text ending in U+FFFD (an incomplete UTF-8 sequence of a byte-level BPE) is held back until its bytes complete.
"""

from __future__ import annotations

from collections.abc import Sequence

_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    """The settled text of one sequence's output tokens.

    Args:
      decode: ``decode(token_ids, skip_special_tokens=...) -> str`` (``jmlora.tokenizer.Tokenizer.decode``).
      skip_special_tokens: passed to ``decode``.
    """

    def __init__(self, decode, skip_special_tokens: bool):
        self._decode = decode
        self._skip = skip_special_tokens
        self.text = ""
        self._prefix_offset = 0      # the window starts here
        self._read_offset = 0        # tokens before this are in ``text``

    def update(self, token_ids: Sequence[int]) -> str:
        """Returns the text of ``token_ids`` (the previous call's tokens plus new ones at the end), except a
        trailing incomplete character."""
        if len(token_ids) <= self._read_offset:
            return self.text
        prefix = self._decode(token_ids[self._prefix_offset:self._read_offset], skip_special_tokens=self._skip)
        window = self._decode(token_ids[self._prefix_offset:], skip_special_tokens=self._skip)
        if len(window) > len(prefix) and not window.endswith(_INCOMPLETE):
            self.text += window[len(prefix):]
            self._prefix_offset, self._read_offset = self._read_offset, len(token_ids)
        return self.text

    def final(self, token_ids: Sequence[int]) -> str:
        """The full decode of ``token_ids`` (held-back characters included), once, when the sequence ends."""
        self.text = self._decode(list(token_ids), skip_special_tokens=self._skip)
        self._prefix_offset = self._read_offset = len(token_ids)
        return self.text
