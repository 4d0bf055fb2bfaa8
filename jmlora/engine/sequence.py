"""One generation stream: its tokens, how many of them are in the KV cache, its pages and its adapter slot.

Token conventions (shared by the scheduler, the model runner and the engine):

- ``all_token_ids`` is ``prompt_token_ids + output_token_ids``; the token at index ``p`` sits at position
  ``p``, and its KV lives in page ``pages[p // page_size]``, slot ``p % page_size``.
- ``num_computed_tokens`` counts the leading tokens whose KV is in the cache. A step feeds the model a chunk
  ``all_token_ids[start:start + n]`` with ``start == num_computed_tokens``; the model writes their KV and,
  when the chunk ends at the last token (``start + n == num_tokens``), the logits at that last position give
  the next token, which the engine appends. A chunk that ends earlier (an intermediate chunk of a chunked
  prefill) samples nothing.
- So after the whole prompt is prefilled, ``num_computed_tokens == num_prompt_tokens`` and the first output
  token has just been appended: ``num_tokens - num_computed_tokens == 1``. That single uncomputed token (the
  last generated one) is what the next decode step feeds. A sequence **needs prefill** while it has more than
  one uncomputed token (``is_prefill``); with exactly one it is **decode-ready**. (A prompt of one token is
  decode-ready from the start; the scheduler still admits it through a prefill step with a 1-token chunk.)
- The scheduler advances ``num_computed_tokens`` when it schedules a chunk (the KV is in the cache once
  that step has run): by ``n`` for a prefill chunk, by ``num_lookahead`` for a decode step, which feeds the
  last token and then each sampled token in turn inside one device call. After a decode step the engine
  appends the ``num_lookahead`` sampled tokens, so ``num_tokens - num_computed_tokens == 1`` again; if a stop
  condition hits at an earlier lookahead token it discards the rest and finishes the sequence.
- Preemption by recompute resets ``num_computed_tokens`` to 0 and keeps ``output_token_ids``: the generated
  tokens are recomputed together with the prompt by later prefill chunks, and the chunk that ends at the
  last token samples the next token exactly as a decode step would have.
"""

from __future__ import annotations

import enum
import itertools
from typing import Any

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    """Where a sequence is: in the scheduler's waiting queue, in its running set, or done."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """A single sequence of tokens being generated for one request.

    Args:
      request_id: the request this sequence belongs to (several sequences may share one).
      prompt_token_ids: the prompt, at least one token id.
      params: the request's sampling parameters; opaque to the scheduler.
      lora_name: the registered adapter this sequence runs with, or None for the base model.
      seq_id: unique id; ids must increase in arrival order (the scheduler's FCFS order). By default the next
        value of a process-wide counter.

    Attributes:
      seq_id, request_id, prompt_token_ids, params, lora_name: as given.
      output_token_ids: tokens generated so far (appended by the engine with ``append_token``).
      num_computed_tokens: leading tokens of ``all_token_ids`` whose KV is in the cache (see the module doc).
      pages: KV page ids, ``pages[i]`` holding positions ``[i * page_size, (i + 1) * page_size)``; owned by
        the ``PageManager``.
      pages_freed: how many times the ``PageManager`` freed its pages (between two frees ``pages`` only grows,
        which lets the model runner update its page table row instead of rewriting it).
      lora_slot: device slot of the adapter while the sequence holds a slot reference (set by the
        scheduler), else 0 (the all-zero "no adapter" slot).
      status: a ``SequenceStatus``.
      num_preemptions: how many times the scheduler preempted it (for metrics).
      sampling_seed: the seed of its sampling noise (set by the engine: the request's seed, else a random one).

    Raises:
      ValueError: an empty prompt, a non-integer token id, or an empty adapter name.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: Any = None,
                 lora_name: str | None = None, seq_id: int | None = None):
        prompt = list(prompt_token_ids)
        if not prompt:
            raise ValueError(f"request {request_id!r}: the prompt must have at least one token")
        bad = next((t for t in prompt if not isinstance(t, int) or isinstance(t, bool)), None)
        if bad is not None:
            raise ValueError(f"request {request_id!r}: token ids must be integers, got {bad!r}")
        if lora_name is not None and (not isinstance(lora_name, str) or not lora_name):
            raise ValueError(f"request {request_id!r}: lora_name must be a non-empty string or None, "
                             f"got {lora_name!r}")
        self.seq_id: int = next(_seq_ids) if seq_id is None else int(seq_id)
        self.request_id = request_id
        self.prompt_token_ids: list[int] = prompt
        self.output_token_ids: list[int] = []
        self.params = params
        self.lora_name = lora_name
        self.lora_slot = 0
        self.num_computed_tokens = 0
        self.pages: list[int] = []
        self.pages_freed = 0
        self.status = SequenceStatus.WAITING
        self.num_preemptions = 0
        self.sampling_seed = 0          # set by the engine: the request's seed, or a random one

    # -- tokens --------------------------------------------------------------------------------------------

    @property
    def all_token_ids(self) -> list[int]:
        """``prompt_token_ids + output_token_ids`` (a new list)."""
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, stop: int) -> list[int]:
        """``all_token_ids[start:stop]`` without building the whole list.

        Args:
          start, stop: ``0 <= start <= stop <= num_tokens``.

        Raises:
          ValueError: the range is out of bounds.
        """
        if not 0 <= start <= stop <= self.num_tokens:
            raise ValueError(f"token range [{start}, {stop}) is outside sequence {self.seq_id} "
                             f"of {self.num_tokens} tokens")
        n = len(self.prompt_token_ids)
        if stop <= n:
            return self.prompt_token_ids[start:stop]
        if start >= n:
            return self.output_token_ids[start - n:stop - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:stop - n]

    @property
    def last_token_id(self) -> int:
        """The newest token (what a decode step feeds)."""
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def append_token(self, token_id: int) -> None:
        """Appends one generated token (the engine calls this after each step that sampled for the sequence)."""
        self.output_token_ids.append(token_id)

    def append_tokens(self, token_ids: list[int]) -> None:
        """Appends generated tokens, oldest first."""
        self.output_token_ids.extend(token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens not yet in the KV cache (1 for a decode-ready sequence)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """True while more than one token is uncomputed: the next chunk is a prefill chunk, not a decode step."""
        return self.num_uncomputed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence(seq_id={self.seq_id}, request_id={self.request_id!r}, status={self.status.name}, "
                f"tokens={self.num_prompt_tokens}+{self.num_output_tokens}, computed={self.num_computed_tokens}, "
                f"pages={self.pages}, lora={self.lora_name!r}@{self.lora_slot})")
