"""The scheduler: which sequences run in the next step, with which KV pages and adapter slots (no JAX).

Each ``schedule()`` call plans one device step, either a **prefill step** (chunks of prompts, ``T > 1``
allowed) or a **decode step** (every running sequence feeds its one uncomputed token and samples
``num_lookahead`` tokens inside one device call). Token conventions are those of ``jmlora.engine.sequence``.

Policy
------
*Prefill first* (as nano-vllm and vLLM v0). A step is a prefill step whenever there is prefill work it can
schedule, under a budget of ``max_num_batched_tokens`` tokens:

1. Running sequences whose prompt is only partly in the cache (chunked prefill) continue first, oldest
   first, each with a chunk of at most ``max_prefill_chunk`` tokens.
2. Then waiting sequences are admitted in arrival order (``seq_id``), each with its first chunk (at most
   ``max_prefill_chunk`` tokens, and at most what is left of the budget: a long prompt continues over
   later steps). Admission stops at the first sequence that does not fit ``max_num_seqs``, the token budget
   or the free pages (first come, first served for memory: smaller later prompts do not overtake it).
   Admission reserves the pages for the sequence's whole current token list at once (so later chunks never
   wait for memory) and requires, on top, the pages for one decode step of lookahead of every running and
   newly admitted sequence; without that margin a just-admitted sequence would often be preempted by the
   very next decode step, wasting its prefill.
3. Adapters: a sequence with an adapter takes a slot reference (``SlotManager.acquire``) when admitted and
   holds it until it finishes, is aborted or is preempted. If the adapter is not resident, ``acquire``
   gives it a free slot or evicts the least recently used adapter that no running sequence uses; the step's
   ``adapter_loads`` lists ``(name, slot)`` pairs the engine must write into the device bank *before* running
   the step. When every slot is referenced (``NoFreeSlotError``) the sequence stays waiting and later
   sequences may be admitted past it -- this is what keeps the batch full while at most ``max_loras``
   distinct adapters run. A sequence whose adapter fails to load (``AdapterError``), was unregistered, or can
   never get a slot (every slot pinned) is finished and reported in ``failed``; nothing else is affected.

Otherwise the step is a decode step over all running sequences (all are decode-ready then). Each must own
pages for its ``num_lookahead`` new positions before the step; while the free pages do not cover that,
the most recently arrived running sequence is **preempted by recompute**: its pages are freed, its adapter
reference released, ``num_computed_tokens`` reset to 0, and it goes back to the waiting queue with its
generated tokens kept (they are recomputed as part of its prompt). The waiting queue is kept in arrival order,
so a preempted sequence goes ahead of everything that arrived after it -- the front of the queue unless
older sequences are still waiting (e.g. for an adapter slot), which keep their turn; putting it strictly at
the front would let a young sequence that is preempted again and again overtake an old one forever.
Preempting the youngest means the oldest running sequence always progresses, so every sequence finishes.
A sequence that cannot fit in the whole cache even alone is failed with ``KVCacheCapacityError``
(impossible when ``max_model_len`` is set, which the constructor checks against the cache size).

No starvation (adapter slots)
-----------------------------
Admitting later sequences past one that waits for a slot could starve it: if requests for resident adapters
keep arriving, their slots are never unreferenced. Rule: the scheduler counts, per waiting sequence, the
``schedule()`` calls in which it was refused a slot. Once a sequence has been refused more than
``starvation_steps`` times, no sequence behind it that uses an adapter is admitted (base-model sequences,
which take no slot, still are); running sequences then finish, their adapters become unreferenced, and the
starving sequence gets a slot. Memory and ``max_num_seqs`` are already first come, first served, so those
cannot be used to overtake it either. ``starvation_steps=0`` gives strict FCFS over adapters.

The scheduler advances ``num_computed_tokens`` of every scheduled sequence when it plans the step (by the
chunk length for prefill, by ``num_lookahead`` for decode). After running the step the engine appends the
sampled tokens (for each chunk with ``samples`` set; ``num_lookahead`` of them for a decode step), checks
stop conditions (discarding lookahead tokens after a stop) and calls ``finish`` on finished sequences. The
engine must also finish a sequence once it reaches ``max_model_len`` tokens; decode pages are reserved only
up to ``max_model_len`` tokens, so lookahead positions beyond it have no page (the device must drop their
KV writes).
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Literal

from jmlora.engine.page_manager import PageManager
from jmlora.engine.sequence import Sequence, SequenceStatus
from jmlora.lora.peft import AdapterError
from jmlora.lora.slots import NoFreeSlotError, SlotManager, UnknownAdapterError


class SchedulerError(Exception):
    """Misuse of the scheduler (adding a sequence twice, finishing one it does not hold)."""


class KVCacheCapacityError(SchedulerError):
    """A sequence needs more KV pages than the whole cache has."""


def _seq_key(seq: Sequence) -> int:
    return seq.seq_id


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one scheduled step.

    Attributes:
      max_num_seqs: sequences in the running set (and so in one step) at most.
      max_num_batched_tokens: new tokens in one prefill step at most.
      max_prefill_chunk: tokens of one sequence in one prefill step at most (<= max_num_batched_tokens).
      num_lookahead: tokens each sequence generates in one decode step (pages are reserved for all of them).
      max_model_len: longest sequence (prompt + output) in tokens, or None for no limit. Longer prompts are
        refused by ``add``; decode pages are reserved up to this length.
      starvation_steps: scheduling rounds a sequence may be refused an adapter slot before later sequences
        with adapters stop being admitted past it (see the module doc); 0 is strict FCFS over adapters.

    Raises:
      ValueError: a non-positive limit, ``max_prefill_chunk > max_num_batched_tokens`` or a negative
        ``starvation_steps``.
    """

    max_num_seqs: int
    max_num_batched_tokens: int
    max_prefill_chunk: int
    num_lookahead: int = 1
    max_model_len: int | None = None
    starvation_steps: int = 8

    def __post_init__(self):
        def positive(name: str, value) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SchedulerConfig.{name} must be a positive integer, got {value!r}")

        positive("max_num_seqs", self.max_num_seqs)
        positive("max_num_batched_tokens", self.max_num_batched_tokens)
        positive("max_prefill_chunk", self.max_prefill_chunk)
        positive("num_lookahead", self.num_lookahead)
        if self.max_model_len is not None:
            positive("max_model_len", self.max_model_len)
        if self.max_prefill_chunk > self.max_num_batched_tokens:
            raise ValueError(f"SchedulerConfig.max_prefill_chunk ({self.max_prefill_chunk}) cannot exceed "
                             f"max_num_batched_tokens ({self.max_num_batched_tokens})")
        s = self.starvation_steps
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise ValueError(f"SchedulerConfig.starvation_steps must be a non-negative integer, got {s!r}")


@dataclasses.dataclass(frozen=True)
class ScheduledChunk:
    """One sequence's share of a step.

    Attributes:
      seq: the sequence.
      start: position of the first token fed (``seq.num_computed_tokens`` before the step).
      num_tokens: tokens fed from ``start``: the chunk length in a prefill step, 1 in a decode step (where
        the device then feeds each sampled lookahead token itself).
      samples: True if the step samples for this sequence, i.e. the chunk ends at its last token (always
        True in a decode step). An intermediate prefill chunk samples nothing.
    """

    seq: Sequence
    start: int
    num_tokens: int
    samples: bool

    @property
    def token_ids(self) -> list[int]:
        """The fed tokens, ``seq.all_token_ids[start:start + num_tokens]``."""
        return self.seq.token_ids(self.start, self.start + self.num_tokens)


@dataclasses.dataclass
class SchedulerOutput:
    """The plan of one step.

    Attributes:
      kind: "prefill", "decode", or "idle" (nothing to run; ``failed`` may still be non-empty).
      chunks: one per scheduled sequence, in ``seq_id`` order within each part of the step.
      adapter_loads: ``(adapter name, slot)`` pairs to write into the device bank before running the step
        (``SlotManager.get_weights(name)``).
      preempted: sequences moved back to the waiting queue by this call (their pages and slot references are
        already released).
      failed: ``(sequence, exception)`` for sequences finished with an error by this call (a bad adapter, no
        possible slot, or too long for the cache); they hold no pages or slot references.
      num_lookahead: tokens each chunk generates: ``config.num_lookahead`` for decode, 1 for prefill, 0 idle.
    """

    kind: Literal["prefill", "decode", "idle"] = "idle"
    chunks: list[ScheduledChunk] = dataclasses.field(default_factory=list)
    adapter_loads: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    preempted: list[Sequence] = dataclasses.field(default_factory=list)
    failed: list[tuple[Sequence, Exception]] = dataclasses.field(default_factory=list)
    num_lookahead: int = 0

    @property
    def num_batched_tokens(self) -> int:
        """Tokens fed to the model by this step (excluding lookahead tokens)."""
        return sum(c.num_tokens for c in self.chunks)

    @property
    def seqs(self) -> list[Sequence]:
        return [c.seq for c in self.chunks]


class Scheduler:
    """Continuous batching over a paged KV cache with adapter-aware admission (policy: see the module doc).

    Args:
      config: a ``SchedulerConfig``.
      page_manager: the KV page manager; the scheduler allocates and frees all pages through it.
      slot_manager: the adapter slot manager; the scheduler is its only ``acquire``/``release`` caller, and
        every adapter a sequence names must be registered there.

    Raises:
      TypeError: arguments of the wrong type.
      ValueError: ``max_model_len`` does not fit in the KV cache.
    """

    def __init__(self, config: SchedulerConfig, page_manager: PageManager, slot_manager: SlotManager):
        if not isinstance(config, SchedulerConfig):
            raise TypeError(f"config must be a SchedulerConfig, got {type(config).__name__}")
        if not isinstance(page_manager, PageManager):
            raise TypeError(f"page_manager must be a PageManager, got {type(page_manager).__name__}")
        if not isinstance(slot_manager, SlotManager):
            raise TypeError(f"slot_manager must be a SlotManager, got {type(slot_manager).__name__}")
        if config.max_model_len is not None:
            need = page_manager.pages_for(config.max_model_len)
            if need > page_manager.num_pages:
                raise ValueError(f"max_model_len {config.max_model_len} needs {need} KV pages of "
                                 f"{page_manager.page_size} tokens but the cache has {page_manager.num_pages}")
        self.config = config
        self.page_manager = page_manager
        self.slot_manager = slot_manager
        self.waiting: list[Sequence] = []  # arrival (seq_id) order
        self.running: list[Sequence] = []  # arrival (seq_id) order
        self._by_request: dict[str, list[Sequence]] = {}
        self._ids: set[int] = set()  # seq_ids of unfinished sequences
        self._slot_refusals: dict[int, int] = {}  # waiting seq_id -> rounds it was refused an adapter slot
        self.num_steps = 0  # schedule() calls

    # -- requests ------------------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queues a new sequence (status WAITING, nothing computed, no pages, no slot).

        Raises:
          SchedulerError: the sequence is not fresh, or one with the same ``seq_id`` is already queued.
          UnknownAdapterError: its adapter is not registered in the slot manager.
          ValueError: it is longer than ``max_model_len``.
          KVCacheCapacityError: it could never fit in the KV cache.
        """
        if not isinstance(seq, Sequence):
            raise TypeError(f"expected a Sequence, got {type(seq).__name__}")
        if seq.seq_id in self._ids:
            raise SchedulerError(f"a sequence with seq_id {seq.seq_id} is already in the scheduler")
        if (seq.status is not SequenceStatus.WAITING or seq.num_computed_tokens or seq.pages
                or seq.lora_slot):
            raise SchedulerError(f"only a fresh waiting sequence can be added, got {seq!r}")
        if seq.lora_name is not None and not self.slot_manager.is_registered(seq.lora_name):
            raise UnknownAdapterError(f"request {seq.request_id!r} names unknown LoRA adapter {seq.lora_name!r}; "
                                      "register it first")
        max_len = self.config.max_model_len
        if max_len is not None and seq.num_tokens > max_len:
            raise ValueError(f"request {seq.request_id!r} has {seq.num_tokens} tokens, more than "
                             f"max_model_len {max_len}")
        need = self.page_manager.pages_for(self._next_decode_target(seq))
        if need > self.page_manager.num_pages:
            raise KVCacheCapacityError(f"request {seq.request_id!r} ({seq.num_tokens} tokens) needs {need} KV "
                                       f"pages but the cache has {self.page_manager.num_pages}")
        bisect.insort(self.waiting, seq, key=_seq_key)
        self._ids.add(seq.seq_id)
        self._by_request.setdefault(seq.request_id, []).append(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        """Finishes every unfinished sequence of ``request_id``, waiting or running, returning its pages and
        slot reference.

        Returns:
          The aborted sequences (empty if the request is unknown or already finished).
        """
        seqs = list(self._by_request.get(request_id, ()))
        for seq in seqs:
            self._remove(seq)
        return seqs

    def finish(self, seq: Sequence) -> None:
        """Marks ``seq`` FINISHED and returns its pages and slot reference (the engine calls this on a stop).

        Raises:
          SchedulerError: the scheduler does not hold ``seq`` (never added, or already finished).
        """
        if seq.seq_id not in self._ids or seq.status is SequenceStatus.FINISHED:
            raise SchedulerError(f"cannot finish {seq!r}: the scheduler does not hold it")
        self._remove(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- scheduling ----------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Plans the next step (policy: see the module doc) and updates the sequences' state for it.

        Returns:
          A ``SchedulerOutput``. Its chunks' sequences have their ``num_computed_tokens`` already advanced,
          pages allocated for every position the step writes, and ``lora_slot`` set.
        """
        self.num_steps += 1
        out = SchedulerOutput()
        self._schedule_prefill(out)
        if out.chunks:
            out.kind, out.num_lookahead = "prefill", 1
        else:
            self._schedule_decode(out)
        return out

    def _schedule_prefill(self, out: SchedulerOutput) -> None:
        cfg, pm = self.config, self.page_manager
        # Pages the running sequences need for their next decode step, kept free by admission (computed only
        # when a sequence waits: a steady decode batch skips the O(running) sum).
        reserve = sum(pm.pages_needed(s, self._next_decode_target(s)) for s in self.running) if self.waiting else 0
        budget = cfg.max_num_batched_tokens
        for seq in self.running:  # 1. partly prefilled sequences continue, oldest first
            if budget == 0:
                break
            if seq.is_prefill:
                out.chunks.append(self._chunk(seq, min(seq.num_uncomputed_tokens, cfg.max_prefill_chunk, budget)))
                budget -= out.chunks[-1].num_tokens

        hold_adapters = False  # set once a starving sequence is met: later ones with adapters wait behind it
        for seq in list(self.waiting):  # 2. admission, in arrival order
            if budget == 0 or len(self.running) >= cfg.max_num_seqs:
                break
            if hold_adapters and seq.lora_name is not None:
                continue
            need_now = pm.pages_needed(seq, seq.num_tokens)
            footprint = pm.pages_needed(seq, self._next_decode_target(seq))
            if footprint > pm.num_pages:  # a preempted sequence that grew past the whole cache
                self._fail(seq, KVCacheCapacityError(
                    f"sequence {seq.seq_id} of request {seq.request_id!r} ({seq.num_tokens} tokens) needs "
                    f"{footprint} KV pages but the cache has {pm.num_pages}"), out)
                continue
            if not pm.can_allocate(footprint + reserve):
                break  # first come, first served for memory
            if seq.lora_name is not None:
                try:
                    slot, needs_load = self.slot_manager.acquire(seq.lora_name)
                except NoFreeSlotError as exc:
                    if self._all_slots_pinned():
                        self._fail(seq, exc, out)
                        continue
                    refusals = self._slot_refusals.get(seq.seq_id, 0) + 1
                    self._slot_refusals[seq.seq_id] = refusals
                    hold_adapters = hold_adapters or refusals > cfg.starvation_steps
                    continue
                except (AdapterError, UnknownAdapterError) as exc:
                    self._fail(seq, exc, out)
                    continue
                seq.lora_slot = slot
                if needs_load:
                    out.adapter_loads.append((seq.lora_name, slot))
            pm.allocate(seq, seq.num_tokens)
            self.waiting.remove(seq)
            self._slot_refusals.pop(seq.seq_id, None)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=_seq_key)
            out.chunks.append(self._chunk(seq, min(seq.num_tokens, cfg.max_prefill_chunk, budget)))
            budget -= out.chunks[-1].num_tokens
            reserve += footprint - need_now

    def _schedule_decode(self, out: SchedulerOutput) -> None:
        pm, lookahead = self.page_manager, self.config.num_lookahead
        if any(s.num_uncomputed_tokens != 1 for s in self.running):
            raise RuntimeError("decode step with a running sequence that is not decode-ready: "
                               f"{[s for s in self.running if s.num_uncomputed_tokens != 1]} (did the engine "
                               "append the sampled tokens of the last step?)")
        target = {s.seq_id: self._next_decode_target(s) for s in self.running}
        need = {s.seq_id: pm.pages_needed(s, target[s.seq_id]) for s in self.running}
        total = sum(need.values())
        while self.running and total > pm.num_free:
            victim = self.running[-1]  # the most recently arrived
            total -= need.pop(victim.seq_id)
            if len(self.running) == 1:
                self._fail(victim, KVCacheCapacityError(
                    f"sequence {victim.seq_id} of request {victim.request_id!r} needs "
                    f"{pm.pages_for(self._next_decode_target(victim))} KV pages for its next decode step but "
                    f"the cache has {pm.num_pages}"), out)
            else:
                self._preempt(victim)
                out.preempted.append(victim)
        for seq in self.running:
            if need[seq.seq_id]:
                pm.allocate(seq, target[seq.seq_id])
            start = seq.num_computed_tokens
            out.chunks.append(ScheduledChunk(seq, start, 1, True))
            seq.num_computed_tokens = start + lookahead
        if out.chunks:
            out.kind, out.num_lookahead = "decode", lookahead

    def schedule_continuation(self, prev: SchedulerOutput) -> SchedulerOutput | None:
        """Plans the decode step after ``prev`` before the engine has appended ``prev``'s samples, so that the
        engine can dispatch it while it reads ``prev``'s results (overlapping host work with the device).

        It returns the step ``schedule()`` would plan once those samples were appended, when that is certain
        without them: ``prev`` is a decode step over exactly the running sequences, no waiting sequence could
        be admitted (none waits, or ``max_num_seqs`` run), and the free pages cover everyone's next
        ``num_lookahead`` positions (so nobody would be preempted). Otherwise it returns None and changes
        nothing; the engine then appends ``prev``'s samples and calls ``schedule()``.

        A sequence that stops inside ``prev`` runs (wastefully) in the continuation too; the engine discards
        those samples and ``finish`` returns its pages as usual.
        """
        cfg, pm = self.config, self.page_manager
        if prev.kind != "decode" or [c.seq for c in prev.chunks] != self.running:
            return None
        if self.waiting and len(self.running) < cfg.max_num_seqs:
            return None
        lookahead, max_len = cfg.num_lookahead, cfg.max_model_len
        # prev advanced num_computed_tokens by num_lookahead already: the next step starts there
        targets = [seq.num_computed_tokens + lookahead for seq in self.running]
        if max_len is not None:
            targets = [min(t, max_len) for t in targets]
        needs = [pm.pages_needed(s, t) for s, t in zip(self.running, targets)]
        if sum(needs) > pm.num_free:
            return None
        self.num_steps += 1
        out = SchedulerOutput(kind="decode", num_lookahead=lookahead)
        for seq, target, need in zip(self.running, targets, needs):
            if need:  # most steps stay inside the sequence's last page
                pm.allocate(seq, target)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, 1, True))
            seq.num_computed_tokens += lookahead
        return out

    # -- internals -----------------------------------------------------------------------------------------

    def _next_decode_target(self, seq: Sequence) -> int:
        """Tokens ``seq``'s pages must cover to run its next decode step (capped at ``max_model_len``).

        A running decode-ready sequence writes positions ``num_computed .. num_computed + lookahead - 1``;
        any other sequence first completes its prefill (``num_computed == num_tokens``, one token sampled)
        and then writes ``num_tokens .. num_tokens + lookahead - 1``.
        """
        ready = seq.status is SequenceStatus.RUNNING and seq.num_uncomputed_tokens == 1
        target = (seq.num_computed_tokens if ready else seq.num_tokens) + self.config.num_lookahead
        max_len = self.config.max_model_len
        return target if max_len is None else min(target, max_len)

    @staticmethod
    def _chunk(seq: Sequence, num_tokens: int) -> ScheduledChunk:
        start = seq.num_computed_tokens
        seq.num_computed_tokens = start + num_tokens
        return ScheduledChunk(seq, start, num_tokens, start + num_tokens == seq.num_tokens)

    def _all_slots_pinned(self) -> bool:
        resident = self.slot_manager.resident()
        return len(resident) == self.slot_manager.max_loras and all(map(self.slot_manager.is_pinned, resident))

    def _release(self, seq: Sequence) -> None:
        """Frees ``seq``'s pages and slot reference."""
        self.page_manager.free(seq)
        if seq.lora_slot:
            self.slot_manager.release(seq.lora_name)
            seq.lora_slot = 0

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        self.running.remove(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        bisect.insort(self.waiting, seq, key=_seq_key)

    def _remove(self, seq: Sequence) -> None:
        """Takes ``seq`` out of the scheduler for good (finished, aborted or failed)."""
        self._release(seq)
        (self.running if seq.status is SequenceStatus.RUNNING else self.waiting).remove(seq)
        seq.status = SequenceStatus.FINISHED
        self._ids.discard(seq.seq_id)
        self._slot_refusals.pop(seq.seq_id, None)
        same = self._by_request[seq.request_id]
        same.remove(seq)
        if not same:
            del self._by_request[seq.request_id]

    def _fail(self, seq: Sequence, exc: Exception, out: SchedulerOutput) -> None:
        self._remove(seq)
        out.failed.append((seq, exc))

    # -- invariants ----------------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raises AssertionError if pages, slot references and the queues disagree (for tests).

        Checks: the running and waiting queues are disjoint, in arrival order and within ``max_num_seqs``;
        only running sequences own pages, enough for their computed tokens (and for their whole token list
        while prefilling); each running sequence with an adapter holds the adapter's current slot, and each
        adapter's reference count equals the number of running sequences using it; plus the page and slot
        managers' own invariants.
        """

        def require(condition: bool, message: str) -> None:
            if not condition:
                raise AssertionError(message)

        pm, sm = self.page_manager, self.slot_manager
        pm.check_invariants()
        sm.check_invariants()
        for name, queue in (("waiting", self.waiting), ("running", self.running)):
            ids = [s.seq_id for s in queue]
            require(ids == sorted(set(ids)), f"{name} queue is not in arrival order: {ids}")
        require(not {s.seq_id for s in self.waiting} & {s.seq_id for s in self.running},
                "a sequence is both waiting and running")
        require({s.seq_id for s in self.waiting + self.running} == self._ids, "unfinished-id set out of date")
        require(sorted(s.seq_id for seqs in self._by_request.values() for s in seqs) == sorted(self._ids),
                "request index out of date")
        require(len(self.running) <= self.config.max_num_seqs, "more running sequences than max_num_seqs")
        require(set(self._slot_refusals) <= {s.seq_id for s in self.waiting}, "refusal count of a non-waiting seq")
        for seq in self.waiting:
            require(seq.status is SequenceStatus.WAITING, f"{seq!r} in the waiting queue")
            require(not seq.pages and seq.lora_slot == 0 and seq.num_computed_tokens == 0,
                    f"waiting {seq!r} holds pages, a slot or computed tokens")
        owned = pm.owned_pages()
        require(set(owned) <= {s.seq_id for s in self.running}, "a page is owned by a sequence that is not running")
        refs: dict[str, int] = {}
        for seq in self.running:
            require(seq.status is SequenceStatus.RUNNING, f"{seq!r} in the running set")
            require(owned.get(seq.seq_id, []) == seq.pages, f"{seq!r} pages disagree with the page manager")
            covered = len(seq.pages) * pm.page_size
            max_len = self.config.max_model_len or seq.num_computed_tokens  # no pages past max_model_len
            require(covered >= min(seq.num_computed_tokens, max_len), f"{seq!r} has computed tokens outside its pages")
            require(covered >= seq.num_tokens or not seq.is_prefill, f"prefilling {seq!r} lacks pages")
            if seq.lora_name is None:
                require(seq.lora_slot == 0, f"base-model {seq!r} has a slot")
            else:
                require(seq.lora_slot == sm.slot_of(seq.lora_name) and seq.lora_slot >= 1,
                        f"{seq!r} does not hold its adapter's slot {sm.slot_of(seq.lora_name)}")
                refs[seq.lora_name] = refs.get(seq.lora_name, 0) + 1
        for name in sm.registered():
            require(sm.refcount(name) == refs.get(name, 0),
                    f"adapter {name!r} has {sm.refcount(name)} references for {refs.get(name, 0)} running sequences")
