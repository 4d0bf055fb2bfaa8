"""``SamplingParams``: how one request is decoded, with vLLM's field names, defaults and ranges.

Every field is checked in ``__post_init__``; a bad value is a ``ValueError`` whose message starts with the
field's name and shows the value. The object is frozen (share it between requests freely; derive a variant
with ``dataclasses.replace``). ``stop`` is normalised to a tuple of strings and ``stop_token_ids`` to a
tuple of ints (duplicates dropped, order kept), as vLLM turns them into lists.

Differences from vLLM, on purpose:

- ``logprobs`` / ``prompt_logprobs`` are capped at ``MAX_LOGPROBS`` (20, vLLM's default ``max_logprobs``);
  vLLM's ``-1`` (the whole vocabulary) is refused.
- A temperature in ``(0, 1e-2)`` is kept as given (vLLM raises it to 1e-2 with a warning); below
  ``SAMPLING_EPS`` (1e-5) it is greedy, as in vLLM. The sampler works in float32, where dividing logits by
  1e-5 is still finite.
- ``temperature`` has no upper bound (the newest vLLM caps it at 2); it must be finite.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
from collections.abc import Sequence

MAX_LOGPROBS = 20
"""Largest ``logprobs`` / ``prompt_logprobs`` accepted (vLLM's default ``max_logprobs``)."""

SAMPLING_EPS = 1e-5
"""Temperatures below this are greedy (vLLM's ``_SAMPLING_EPS``)."""


class RequestOutputKind(enum.Enum):
    """Which outputs ``LLMEngine.step`` returns for a request (vLLM's enum; DELTA is not supported).

    CUMULATIVE: after every step that advanced it, the whole output so far (streaming).
    FINAL_ONLY: only the finished output; the text is then decoded once at the end unless stop strings need
      it earlier (what ``LLM.generate`` uses).
    """

    CUMULATIVE = "cumulative"
    FINAL_ONLY = "final_only"


def _is_int(v: object) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    """A real number (Python or NumPy), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Sampling parameters of one request (vLLM's names and defaults).

    Attributes:
      n: number of completions to return for the prompt (>= 1; must be 1 when greedy, as in vLLM).
      temperature: softmax temperature, >= 0 and finite; 0 (anything below ``SAMPLING_EPS``) is greedy.
      top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``; in (0, 1].
      top_k: keep the ``top_k`` most likely tokens; 0 or -1 disables it.
      min_p: drop tokens whose probability is below ``min_p`` times the most likely token's; in [0, 1].
      seed: per-request random seed (any int); the same seed gives the same tokens whatever else is batched.
      max_tokens: most tokens to generate (>= 1), or None for "until the context length".
      min_tokens: tokens to generate before EOS or ``stop_token_ids`` may be sampled; <= ``max_tokens``.
      stop: strings that end generation when they appear in the output text (not included in it unless
        ``include_stop_str_in_output``). A str or a sequence of non-empty str; stored as a tuple.
      stop_token_ids: token ids that end generation (the token is kept in the output); stored as a tuple.
      ignore_eos: keep generating after the EOS token.
      include_stop_str_in_output: keep the matched stop string in the returned text.
      logprobs: number of top log-probabilities to return per generated token (plus the sampled token's),
        0..``MAX_LOGPROBS``, or None for none.
      prompt_logprobs: the same for every prompt token, or None.
      presence_penalty: subtracted from the logit of every token already generated; in [-2, 2].
      frequency_penalty: subtracted once per previous occurrence in the generated text; in [-2, 2].
      repetition_penalty: > 0 and finite; divides positive / multiplies negative logits of tokens in the prompt
        or the generated text (1 = off).
      skip_special_tokens: drop special tokens when detokenizing.
      output_kind: a ``RequestOutputKind`` (or its value, "cumulative" / "final_only").
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)

        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")

        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            set_(name, float(value))
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}")
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")

        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer: 0 or -1 (disabled) or >= 1, got {self.top_k!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")

        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1 or None, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens={self.max_tokens}, got {self.min_tokens!r}")

        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], got {value!r}")

        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, (list, tuple)):
            stop = tuple(stop)
        else:
            raise ValueError(f"stop must be a str, a list of str or None, got {self.stop!r}")
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop must contain only non-empty strings, got {self.stop!r}")
        set_("stop", stop)

        ids = self.stop_token_ids
        if ids is None:
            ids = ()
        elif not isinstance(ids, (list, tuple)) or any(not _is_int(t) or t < 0 for t in ids):
            raise ValueError(f"stop_token_ids must be a list of non-negative integers or None, got {ids!r}")
        set_("stop_token_ids", tuple(dict.fromkeys(int(t) for t in ids)))
        for name in ("n", "top_k", "seed", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                set_(name, int(getattr(self, name)))

        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

        try:
            set_("output_kind", RequestOutputKind(self.output_kind))
        except ValueError:
            kinds = ", ".join(k.value for k in RequestOutputKind)
            raise ValueError(f"output_kind must be a RequestOutputKind or one of {kinds}, got "
                             f"{self.output_kind!r}") from None

        if self.temperature < SAMPLING_EPS and self.n > 1:
            raise ValueError(f"n must be 1 when using greedy sampling (temperature 0), got {self.n!r}")

    @property
    def greedy(self) -> bool:
        """True when every draw is the argmax: temperature below ``SAMPLING_EPS`` or ``top_k == 1``."""
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    @property
    def needs_penalties(self) -> bool:
        """True when any of the presence / frequency / repetition penalties is active."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def output_text_buffer_length(self) -> int:
        """Characters of new text to hold back while streaming, so that a stop string is never half-shown."""
        if self.stop and not self.include_stop_str_in_output:
            return max(len(s) for s in self.stop) - 1
        return 0
