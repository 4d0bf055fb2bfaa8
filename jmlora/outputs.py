"""What the engine returns: ``RequestOutput`` / ``CompletionOutput`` / ``Logprob``, with vLLM's field names.

Plain dataclasses, no JAX. Log-probabilities follow vLLM's layout:

- ``CompletionOutput.logprobs`` is one dict per generated token, ``{token_id: Logprob}``, holding the sampled
  token and the ``SamplingParams.logprobs`` most likely tokens (so ``logprobs`` or ``logprobs + 1`` entries).
- ``RequestOutput.prompt_logprobs`` is one entry per prompt token: ``None`` at position 0 (nothing predicts the
  first token), then a dict that always holds the actual prompt token plus the top ``prompt_logprobs`` ones.

Log-probabilities are those of the raw model distribution (``log_softmax`` of the logits before penalties,
temperature or filtering), as vLLM reports by default; ``rank`` is 1 for the most likely token.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclasses.dataclass
class Logprob:
    """The log-probability of one token at one position.

    Attributes:
      logprob: natural-log probability under the model's distribution.
      rank: 1-based rank of the token in that distribution (1 = most likely), or None if unknown.
      decoded_token: the token's text, or None when not detokenized.
    """

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


SampleLogprobs = list[dict[int, Logprob]]
"""One dict per generated token: the sampled token plus the top-k alternatives."""

PromptLogprobs = list[dict[int, Logprob] | None]
"""One entry per prompt token; ``None`` at position 0."""


@dataclasses.dataclass
class CompletionOutput:
    """One completion of a request (a request with ``n > 1`` has several, told apart by ``index``).

    Attributes:
      index: which of the request's ``n`` completions this is (0-based).
      text: the generated text (stop string removed unless ``include_stop_str_in_output``).
      token_ids: the generated token ids (a matched stop token id included, as in vLLM).
      cumulative_logprob: sum of the sampled tokens' log-probabilities, or None when logprobs were not asked.
      logprobs: per generated token ``{token_id: Logprob}``, or None when ``SamplingParams.logprobs`` is None.
      finish_reason: "stop" (EOS, stop token or stop string), "length" (max_tokens or the context length),
        "abort", or None while still running.
      stop_reason: the stop string or stop token id that ended it; None for EOS, length, abort or running.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        """True once the completion has a finish reason."""
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    """The output of one request, returned in input order (streamed snapshots have ``finished=False``).

    Attributes:
      request_id: the request's id.
      prompt: the prompt text, or None when the request gave token ids only.
      prompt_token_ids: the prompt's token ids.
      prompt_logprobs: see ``PromptLogprobs``; None unless ``SamplingParams.prompt_logprobs`` was set.
      outputs: the completions, ordered by ``index``.
      finished: True when every completion has finished.
      lora_request: the adapter request the prompt ran with, or None for the base model.
      error: why the engine gave up on the request (e.g. its adapter failed to load), else None. Not in vLLM:
        the streaming engine reports a failed request here instead of raising mid-batch.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    lora_request: Any = None
    error: Exception | None = None
