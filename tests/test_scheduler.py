"""The scheduler: continuous batching, chunked prefill, budgets, preemption, lookahead and adapter admission.

The tests drive the real ``Scheduler`` with a fake device: a KV cache that stores, in every (page, slot),
the token written there, and a "model" whose next token is a hash of the context it reads back through
the sequence's page table and of the adapter in the sequence's slot of a fake adapter bank. A page handed
to two sequences, a page freed too early, a wrong ``start``, a chunk sampled too early, or a slot holding
another adapter all change the generated tokens, which are compared with a plain greedy reference.
"""

from __future__ import annotations

import random
import zlib

import numpy as np
import pytest

from jmlora.engine.page_manager import PageManager
from jmlora.engine.scheduler import (
    KVCacheCapacityError,
    Scheduler,
    SchedulerConfig,
    SchedulerError,
    SchedulerOutput,
)
from jmlora.engine.sequence import Sequence, SequenceStatus
from jmlora.lora import AdapterError, LoRAWeights, NoFreeSlotError, SlotManager, UnknownAdapterError

VOCAB = 50


def next_token(context: list[int], adapter: str | None) -> int:
    """The fake model: a deterministic function of the whole context and the adapter."""
    data = np.asarray(context, np.int64).tobytes() + (adapter or "").encode()
    return zlib.crc32(data) % VOCAB + 1


def reference(prompt: list[int], max_tokens: int, adapter: str | None) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens, adapter))
    return tokens[len(prompt):]


class Loader:
    """A SlotManager loader building tiny LoRAWeights; adapters named in ``bad`` fail to load."""

    def __init__(self, bad=()):
        self.bad = set(bad)
        self.calls: list[str] = []

    def __call__(self, name: str, path: str) -> LoRAWeights:
        self.calls.append(name)
        if name in self.bad:
            raise AdapterError(f"{path}: adapter_config.json is broken")
        a = np.zeros((4, 2), np.float32)  # [in, r]
        b = np.zeros((2, 4), np.float32)  # [r, out]
        return LoRAWeights(name=name, path=path, rank=2, targets=frozenset({"q_proj"}), layers={(0, "q_proj"): (a, b)})


def make_slots(max_loras=2, names="abcde", loader: Loader | None | str = "default") -> SlotManager:
    slots = SlotManager(max_loras, max(max_loras, 4), Loader() if loader == "default" else loader)
    for name in names:
        slots.register(name, f"/adapters/{name}")
    return slots


class FakeEngine:
    """The engine loop around the scheduler: schedule, load adapters, run the fake device, append, stop."""

    def __init__(self, config: SchedulerConfig, num_pages=64, page_size=4, slots: SlotManager | None = None):
        self.pm = PageManager(num_pages, page_size)
        self.slots = slots if slots is not None else make_slots()
        self.sched = Scheduler(config, self.pm, self.slots)
        self.kv = np.full(num_pages * page_size, -1, np.int64)  # token id written in each KV slot
        self.bank: dict[int, str | None] = {0: None}  # device slot -> adapter whose weights are there
        self.outputs: dict[str, list[int]] = {}  # finished request -> generated tokens
        self.failed: dict[str, Exception] = {}
        self.expected: dict[str, list[int]] = {}
        self.history: list[SchedulerOutput] = []
        self.admitted_at: dict[str, int] = {}  # request -> step of its first chunk
        self.at_schedule: list[dict[str, tuple[list[int], int]]] = []  # per step: request -> (pages, lora_slot)

    def add(self, request_id: str, prompt: list[int], max_tokens: int, lora: str | None = None) -> Sequence:
        seq = Sequence(request_id, prompt, params=max_tokens, lora_name=lora)
        self.sched.add(seq)
        self.expected[request_id] = reference(prompt, max_tokens, lora)
        return seq

    def _kv_index(self, seq: Sequence, pos: int) -> int | None:
        ps = self.pm.page_size
        if pos // ps >= len(seq.pages):
            max_len = self.sched.config.max_model_len
            if max_len is not None and pos >= max_len:
                return None  # a lookahead position past max_model_len: the device drops the write
            raise AssertionError(f"{seq!r} has no page for position {pos}")
        return seq.pages[pos // ps] * ps + pos % ps

    def _write(self, seq: Sequence, pos: int, token: int) -> None:
        index = self._kv_index(seq, pos)
        if index is not None:
            self.kv[index] = token

    def _read(self, seq: Sequence, length: int) -> list[int]:
        return [int(self.kv[self._kv_index(seq, p)]) for p in range(length)]

    def step(self) -> SchedulerOutput:
        out = self.sched.schedule()
        self.history.append(out)
        self.at_schedule.append({c.seq.request_id: (list(c.seq.pages), c.seq.lora_slot) for c in out.chunks})
        for seq, exc in out.failed:
            self.failed[seq.request_id] = exc
        for name, slot in out.adapter_loads:
            if self.slots._loader is not None:  # what the real engine writes into the bank
                self.slots.get_weights(name)
            self.bank[slot] = name
        if out.kind == "idle":
            assert not out.chunks
        sampled: dict[int, list[int]] = {}
        for chunk in out.chunks:  # "device": write KV of the fed tokens, sample from what the cache holds
            seq = chunk.seq
            self.admitted_at.setdefault(seq.request_id, len(self.history))
            adapter = self.bank[seq.lora_slot]
            assert adapter == seq.lora_name, f"{seq!r} runs with adapter {adapter!r} in its slot"
            for i, token in enumerate(chunk.token_ids):
                self._write(seq, chunk.start + i, token)
            if not chunk.samples:
                continue
            pos = chunk.start + chunk.num_tokens
            tokens = []
            for k in range(out.num_lookahead):
                tokens.append(next_token(self._read(seq, pos), adapter))
                if k + 1 < out.num_lookahead:
                    self._write(seq, pos, tokens[-1])
                    pos += 1
            sampled[seq.seq_id] = tokens
        for chunk in out.chunks:  # engine: append, stop checks (discarding lookahead tokens after a stop)
            seq = chunk.seq
            for token in sampled.get(seq.seq_id, []):
                seq.append_token(token)
                max_len = self.sched.config.max_model_len
                if seq.num_output_tokens >= seq.params or (max_len is not None and seq.num_tokens >= max_len):
                    self.outputs[seq.request_id] = list(seq.output_token_ids)
                    self.sched.finish(seq)
                    break
        self.sched.check_invariants()
        return out

    def run(self, max_steps=1000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                return
            self.step()
        raise AssertionError(f"not finished after {max_steps} steps")

    def assert_baseline(self) -> None:
        """No pages owned, no slot references held."""
        self.sched.check_invariants()
        assert self.pm.num_free == self.pm.num_pages and self.pm.owned_pages() == {}
        assert all(self.slots.refcount(name) == 0 for name in self.slots.registered())

    def assert_outputs_match(self) -> None:
        for request_id, tokens in self.outputs.items():
            assert tokens == self.expected[request_id][:len(tokens)], request_id
            if self.sched.config.max_model_len is None:
                assert len(tokens) == len(self.expected[request_id]), request_id


def _config(**kw) -> SchedulerConfig:
    base = dict(max_num_seqs=8, max_num_batched_tokens=64, max_prefill_chunk=32)
    base.update(kw)
    return SchedulerConfig(**base)


def _chunks(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    return [(c.seq.request_id, c.start, c.num_tokens, c.samples) for c in out.chunks]


# -- sequence conventions and validation ---------------------------------------------------------------------


def test_sequence_conventions():
    seq = Sequence("r", [5, 6, 7], lora_name="a")
    assert seq.status is SequenceStatus.WAITING and seq.lora_slot == 0 and seq.pages == []
    assert seq.num_tokens == 3 and seq.is_prefill and seq.last_token_id == 7
    seq.num_computed_tokens = 3  # the whole prompt prefilled ...
    seq.append_token(9)  # ... and its last position's logits gave the first output token
    assert seq.all_token_ids == [5, 6, 7, 9] and seq.num_uncomputed_tokens == 1 and not seq.is_prefill
    assert seq.token_ids(2, 4) == [7, 9] and seq.token_ids(3, 4) == [9] and seq.token_ids(0, 2) == [5, 6]
    assert seq.last_token_id == 9
    with pytest.raises(ValueError, match=r"token range \[3, 5\) is outside"):
        seq.token_ids(3, 5)
    assert not Sequence("r", [1]).is_prefill  # a 1-token prompt is decode-ready from the start
    assert Sequence("r", [1]).seq_id < Sequence("r", [1]).seq_id  # arrival order
    with pytest.raises(ValueError, match="at least one token"):
        Sequence("r", [])
    with pytest.raises(ValueError, match="token ids must be integers, got 1.5"):
        Sequence("r", [1, 1.5])
    with pytest.raises(ValueError, match="lora_name must be a non-empty string"):
        Sequence("r", [1], lora_name="")


def test_config_and_constructor_validate():
    with pytest.raises(ValueError, match="max_num_seqs must be a positive integer, got 0"):
        _config(max_num_seqs=0)
    with pytest.raises(ValueError, match=r"max_prefill_chunk \(65\) cannot exceed max_num_batched_tokens \(64\)"):
        _config(max_prefill_chunk=65)
    with pytest.raises(ValueError, match="num_lookahead must be a positive integer"):
        _config(num_lookahead=0)
    with pytest.raises(ValueError, match="starvation_steps must be a non-negative integer"):
        _config(starvation_steps=-1)
    with pytest.raises(ValueError, match="max_model_len 100 needs 25 KV pages of 4 tokens but the cache has 24"):
        Scheduler(_config(max_model_len=100), PageManager(24, 4), make_slots())
    with pytest.raises(TypeError, match="page_manager must be a PageManager"):
        Scheduler(_config(), object(), make_slots())


def test_add_rejects_bad_sequences():
    eng = FakeEngine(_config(max_model_len=16), num_pages=8, page_size=4)
    with pytest.raises(ValueError, match="has 17 tokens, more than max_model_len 16"):
        eng.add("long", list(range(17)), 1)
    with pytest.raises(UnknownAdapterError, match="unknown LoRA adapter 'zzz'"):
        eng.add("x", [1, 2], 1, lora="zzz")
    seq = eng.add("ok", [1, 2], 1)
    with pytest.raises(SchedulerError, match="already in the scheduler"):
        eng.sched.add(seq)
    used = Sequence("u", [1, 2])
    used.num_computed_tokens = 1
    with pytest.raises(SchedulerError, match="only a fresh waiting sequence"):
        eng.sched.add(used)
    small = FakeEngine(_config(), num_pages=2, page_size=4)
    with pytest.raises(KVCacheCapacityError, match=r"needs 3 KV pages but the cache has 2"):
        small.add("big", list(range(8)), 1)  # 8 prompt tokens + 1 lookahead position
    eng.run()
    with pytest.raises(SchedulerError, match="does not hold it"):
        eng.sched.finish(seq)
    eng.assert_baseline()


# -- batching, chunking and budgets --------------------------------------------------------------------------


def test_continuous_batching_requests_join_and_leave_between_steps():
    eng = FakeEngine(_config())
    eng.add("a", [1, 2, 3], 6)
    eng.add("b", [4, 5], 2)
    out = eng.step()
    assert out.kind == "prefill" and _chunks(out) == [("a", 0, 3, True), ("b", 0, 2, True)]
    out = eng.step()
    assert out.kind == "decode" and _chunks(out) == [("a", 3, 1, True), ("b", 2, 1, True)]
    assert "b" in eng.outputs and eng.sched.num_running == 1  # b finished after 2 tokens and left
    eng.add("c", [7, 8, 9, 10], 3)  # joins while a is decoding
    out = eng.step()
    assert out.kind == "prefill" and _chunks(out) == [("c", 0, 4, True)]
    out = eng.step()
    assert out.kind == "decode" and [c.seq.request_id for c in out.chunks] == ["a", "c"]
    eng.run()
    assert set(eng.outputs) == {"a", "b", "c"}
    eng.assert_outputs_match()
    eng.assert_baseline()


def test_chunked_prefill_boundaries():
    eng = FakeEngine(_config(max_prefill_chunk=4, max_num_batched_tokens=4))
    eng.add("ten", list(range(1, 11)), 2)
    assert _chunks(eng.step()) == [("ten", 0, 4, False)]
    assert _chunks(eng.step()) == [("ten", 4, 4, False)]
    out = eng.step()
    assert out.kind == "prefill" and _chunks(out) == [("ten", 8, 2, True)]  # the last chunk samples
    eng.run()
    # 9 tokens in chunks of 4 leave exactly one uncomputed token: the decode step feeds it and samples.
    eng.add("nine", list(range(1, 10)), 2)
    assert _chunks(eng.step()) == [("nine", 0, 4, False)]
    assert _chunks(eng.step()) == [("nine", 4, 4, False)]
    out = eng.step()
    assert out.kind == "decode" and _chunks(out) == [("nine", 8, 1, True)]
    eng.run()
    eng.assert_outputs_match()
    eng.assert_baseline()


def test_token_budget_and_partial_prefills_continue_first():
    eng = FakeEngine(_config(max_num_batched_tokens=8, max_prefill_chunk=8))
    for name in "abc":
        eng.add(name, [1, 2, 3, 4, 5], 2)
    out = eng.step()
    assert _chunks(out) == [("a", 0, 5, True), ("b", 0, 3, False)] and out.num_batched_tokens == 8
    out = eng.step()  # b's remaining 2 tokens first, then c gets the rest of the budget
    assert _chunks(out) == [("b", 3, 2, True), ("c", 0, 5, True)]
    eng.run()
    eng.assert_outputs_match()
    eng.assert_baseline()


def test_max_num_seqs_limits_the_running_set():
    eng = FakeEngine(_config(max_num_seqs=2))
    eng.add("a", [1, 2], 1)
    eng.add("b", [3, 4], 3)
    eng.add("c", [5, 6], 1)
    out = eng.step()
    assert [c.seq.request_id for c in out.chunks] == ["a", "b"] and eng.sched.num_waiting == 1
    assert "a" in eng.outputs  # a finished after its prefill: c can join now
    out = eng.step()
    assert _chunks(out) == [("c", 0, 2, True)]
    eng.run()
    assert max(len(o.chunks) for o in eng.history) <= 2
    eng.assert_outputs_match()
    eng.assert_baseline()


def test_one_token_prompt_and_idle():
    eng = FakeEngine(_config())
    assert eng.step().kind == "idle"
    eng.add("one", [42], 3)
    assert _chunks(eng.step()) == [("one", 0, 1, True)]
    eng.run()
    eng.assert_outputs_match()
    eng.assert_baseline()


# -- preemption and lookahead --------------------------------------------------------------------------------


def test_preemption_by_recompute_gives_identical_outputs_and_keeps_arrival_order():
    eng = FakeEngine(_config(), num_pages=8, page_size=2)
    prompts = {f"r{i}": [i + 1, i + 2, i + 3, i + 4] for i in range(4)}
    for name, prompt in prompts.items():
        eng.add(name, prompt, 6)
    first = eng.step()
    # 8 pages of 2: each takes 2 pages for its prompt and keeps 1 free for its first decode step: 2 fit.
    assert [c.seq.request_id for c in first.chunks] == ["r0", "r1"]
    eng.run()
    preempted = [s.request_id for out in eng.history for s in out.preempted]
    assert preempted, "the tiny cache should force preemption"
    for out in eng.history:  # the victim is always the most recently arrived running sequence
        for victim in out.preempted:
            assert all(c.seq.seq_id < victim.seq_id for c in out.chunks)
    assert set(eng.outputs) == set(prompts)
    eng.assert_outputs_match()  # identical greedy outputs despite recompute
    eng.assert_baseline()
    roomy = FakeEngine(_config(), num_pages=64, page_size=2)
    for name, prompt in prompts.items():
        roomy.add(name, prompt, 6)
    roomy.run()
    assert roomy.outputs == eng.outputs
    assert not any(out.preempted for out in roomy.history)


def test_preempted_sequence_is_readmitted_before_later_arrivals_with_its_tokens():
    eng = FakeEngine(_config(), num_pages=6, page_size=2)
    eng.add("old", [1, 2, 3], 8)
    eng.add("young", [4, 5, 6], 8)
    for _ in range(20):
        out = eng.step()
        if out.preempted:
            break
    else:
        raise AssertionError("expected a preemption")
    (victim,) = out.preempted
    assert victim.request_id == "young" and victim.status is SequenceStatus.WAITING
    assert victim.num_computed_tokens == 0 and victim.pages == [] and victim.num_output_tokens > 0
    assert victim.num_preemptions == 1
    eng.add("later", [7, 8], 2)  # arrives after the preemption
    assert [s.request_id for s in eng.sched.waiting] == ["young", "later"]
    preempted_at = len(eng.history)
    eng.run()
    readmit = next(i for i, o in enumerate(eng.history)
                   if i >= preempted_at and any(c.seq is victim and c.start == 0 for c in o.chunks))
    later = next(i for i, o in enumerate(eng.history) if any(c.seq.request_id == "later" for c in o.chunks))
    assert readmit <= later
    assert eng.outputs["young"] == eng.expected["young"]  # generated tokens were kept and recomputed
    eng.assert_outputs_match()
    eng.assert_baseline()


def test_preempted_sequence_does_not_overtake_an_older_waiting_one():
    eng = FakeEngine(_config(), num_pages=4, page_size=2, slots=make_slots(max_loras=1))
    eng.add("ra", [1, 2], 5, lora="a")
    eng.add("rb", [3, 4], 2, lora="b")  # waits: the only slot is a's
    eng.add("young", [5, 6], 5)
    while not eng.history or not eng.history[-1].preempted:
        eng.step()
    assert [s.request_id for s in eng.history[-1].preempted] == ["young"]
    assert [s.request_id for s in eng.sched.waiting] == ["rb", "young"]  # arrival order, not young first
    eng.run()
    eng.assert_outputs_match()
    eng.assert_baseline()


def test_lookahead_reserves_pages_and_discards_after_stop():
    eng = FakeEngine(_config(num_lookahead=4), num_pages=32, page_size=4)
    eng.add("a", [1, 2, 3, 4, 5], 7)  # 7 = 1 (prefill) + 4 + 2 of the next 4
    eng.add("b", [6], 10)
    eng.step()
    for _ in range(20):
        if not eng.sched.has_unfinished():
            break
        before = {s.seq_id: s.num_computed_tokens for s in eng.sched.running}
        out = eng.step()
        if out.kind == "decode":
            assert out.num_lookahead == 4
            for c in out.chunks:  # the step could write positions start .. start + 3: pages cover them
                pages, _ = eng.at_schedule[-1][c.seq.request_id]
                assert c.start == before[c.seq.seq_id] and len(pages) * 4 >= c.start + 4
    assert eng.outputs["a"] == eng.expected["a"] and len(eng.outputs["a"]) == 7
    assert eng.outputs["b"] == eng.expected["b"]
    eng.assert_baseline()


def test_lookahead_near_max_model_len_reserves_only_up_to_it():
    eng = FakeEngine(_config(num_lookahead=4, max_model_len=8), num_pages=2, page_size=4)
    eng.add("a", [1, 2, 3], 100)
    eng.run()
    assert len(eng.outputs["a"]) == 5 and eng.outputs["a"] == eng.expected["a"][:5]
    assert not eng.failed
    eng.assert_baseline()


def test_sequence_that_outgrows_the_whole_cache_fails_alone():
    eng = FakeEngine(_config(), num_pages=2, page_size=2)
    eng.add("grow", [1, 2], 10)
    eng.run()
    assert isinstance(eng.failed["grow"], KVCacheCapacityError) and "grow" not in eng.outputs
    eng.assert_baseline()


# -- abort ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["waiting", "mid_prefill", "decoding", "preempted", "finished", "unknown"])
def test_abort_in_every_state_returns_to_baseline(state):
    eng = FakeEngine(_config(max_prefill_chunk=4, max_num_batched_tokens=4), num_pages=8, page_size=2,
                     slots=make_slots(max_loras=2))
    target = eng.add("t", list(range(1, 7)), 50, lora="a")
    eng.add("o", [9, 8], 50, lora="b")
    if state == "mid_prefill":
        eng.step()
        assert target.status is SequenceStatus.RUNNING and target.is_prefill and target.pages
    elif state == "decoding":
        while not (target.status is SequenceStatus.RUNNING and not target.is_prefill):
            eng.step()
    elif state == "preempted":
        eng.sched.abort("o")
        eng.add("late", [1, 2, 3], 50, lora="a")
        while not eng.history or not eng.history[-1].preempted:
            eng.step()
        (target,) = eng.history[-1].preempted
        assert target.status is SequenceStatus.WAITING and target.num_output_tokens > 0 and target.pages == []
        assert eng.slots.refcount("a") == 1  # the victim released its reference, the other one holds one
    elif state == "finished":
        eng.sched.abort("o")
        target.params = 2
        eng.run()
    request_id = "nope" if state == "unknown" else target.request_id
    aborted = eng.sched.abort(request_id)
    if state in ("finished", "unknown"):
        assert aborted == []
    else:
        assert aborted == [target] and target.status is SequenceStatus.FINISHED
        assert target.pages == [] and target.lora_slot == 0
    eng.sched.check_invariants()
    eng.sched.abort("o")
    for seq in list(eng.sched.running) + list(eng.sched.waiting):
        eng.sched.abort(seq.request_id)
    assert not eng.sched.has_unfinished()
    eng.assert_baseline()


def test_abort_returns_every_sequence_of_the_request():
    eng = FakeEngine(_config())
    s1 = eng.add("multi", [1, 2], 9)
    eng.step()
    s2 = Sequence("multi", [1, 2], params=9)
    eng.sched.add(s2)
    assert eng.sched.abort("multi") == [s1, s2]
    eng.assert_baseline()


# -- adapters ------------------------------------------------------------------------------------------------


def test_adapter_admission_waits_for_a_slot_and_base_requests_pass():
    loader = Loader()
    eng = FakeEngine(_config(), slots=make_slots(max_loras=2, loader=loader))
    eng.add("ra", [1, 2], 3, lora="a")
    eng.add("rb", [3, 4], 1, lora="b")
    eng.add("rc", [5, 6], 2, lora="c")
    eng.add("base", [7, 8], 2)
    eng.add("ra2", [9, 10], 2, lora="a")
    out = eng.step()
    assert [c.seq.request_id for c in out.chunks] == ["ra", "rb", "base", "ra2"]  # rc waits for a slot
    assert out.adapter_loads == [("a", 1), ("b", 2)]
    assert {r: slot for r, (_, slot) in eng.at_schedule[-1].items()} == {"ra": 1, "rb": 2, "base": 0, "ra2": 1}
    assert "rb" in eng.outputs  # b is now unreferenced: c takes its slot
    out = eng.step()
    assert out.kind == "prefill" and _chunks(out) == [("rc", 0, 2, True)] and out.adapter_loads == [("c", 2)]
    assert eng.slots.stats.evictions == 1 and eng.slots.slot_of("b") is None
    eng.run()
    assert set(eng.outputs) == {"ra", "rb", "rc", "base", "ra2"}
    eng.assert_outputs_match()  # each ran with its own adapter (the fake bank checks the slot's content)
    eng.assert_baseline()


def test_bad_adapter_fails_only_its_own_request():
    loader = Loader(bad={"bad"})
    slots = make_slots(max_loras=2, names=["a", "bad", "b"], loader=loader)
    eng = FakeEngine(_config(), slots=slots)
    eng.add("r1", [1, 2, 3], 3, lora="a")
    eng.add("r2", [4, 5], 3, lora="bad")
    eng.add("r3", [6], 3)
    eng.add("r4", [7, 8], 3, lora="b")
    out = eng.step()
    assert [(s.request_id, type(e)) for s, e in out.failed] == [("r2", AdapterError)]
    assert "adapter_config.json is broken" in str(out.failed[0][1])
    assert [c.seq.request_id for c in out.chunks] == ["r1", "r3", "r4"]
    assert slots.slot_of("bad") is None and slots.refcount("bad") == 0
    eng.run()
    assert set(eng.outputs) == {"r1", "r3", "r4"} and set(eng.failed) == {"r2"}
    eng.assert_outputs_match()
    eng.assert_baseline()


def test_adapter_unregistered_while_waiting_or_all_slots_pinned_fails_the_request():
    slots = make_slots(max_loras=1, names="abc", loader=None)  # slot tracking only
    eng = FakeEngine(_config(), slots=slots)
    eng.add("ra", [1, 2], 4, lora="a")
    eng.add("rb", [3, 4], 4, lora="b")
    eng.step()  # rb waits for a's slot
    slots.unregister("b")
    eng.run()
    assert isinstance(eng.failed["rb"], UnknownAdapterError) and eng.outputs["ra"] == eng.expected["ra"]
    slots.pin("a")
    eng.add("rc", [5, 6], 2, lora="c")
    eng.add("ra2", [5, 6], 2, lora="a")
    eng.run()
    assert isinstance(eng.failed["rc"], NoFreeSlotError) and "ra2" in eng.outputs
    eng.assert_baseline()


def _stream_with_one_rare_adapter(starvation_steps: int, steps: int) -> FakeEngine:
    """Requests for adapters a and b arrive every other step and overlap; one request for c (3 adapters,
    2 slots) arrives at step 2. Without the rule, a and b are always referenced and c never gets a slot."""
    eng = FakeEngine(_config(max_num_seqs=32, starvation_steps=starvation_steps), num_pages=256,
                     slots=make_slots(max_loras=2))
    eng.add("a0", [1, 2], 4, lora="a")
    eng.add("b0", [1, 2], 4, lora="b")
    eng.step()
    eng.add("rare", [3, 4], 2, lora="c")
    for i in range(steps):
        if i % 2 == 0:
            eng.add(f"a{i + 1}", [i % 7 + 1, 2], 4, lora="a")
            eng.add(f"b{i + 1}", [i % 5 + 1, 3], 4, lora="b")
        eng.step()
    return eng


def test_no_starvation_of_an_adapter_that_waits_for_a_slot():
    eng = _stream_with_one_rare_adapter(starvation_steps=3, steps=60)
    assert "rare" in eng.outputs and eng.outputs["rare"] == eng.expected["rare"]
    # Refused in steps 2-5 (the 4th refusal exceeds starvation_steps=3): from then on new a/b requests wait,
    # the running ones (4 tokens: a prefill and 3 decode steps) drain, and a slot frees within a few steps.
    assert eng.admitted_at["rare"] <= 5 + 5
    held = [r for r, step in eng.admitted_at.items() if r[0] in "ab" and step > eng.admitted_at["rare"]]
    assert held, "the stream continues after the rare request got its slot"
    eng.run()
    eng.assert_outputs_match()
    eng.assert_baseline()
    # Without the rule (huge threshold) the same stream overtakes it for the whole run: the rule is what helps.
    starved = _stream_with_one_rare_adapter(starvation_steps=10**9, steps=60)
    assert "rare" not in starved.admitted_at and starved.sched.waiting[0].request_id == "rare"


def test_more_adapters_than_slots_all_served_correctly():
    loader = Loader()
    names = [f"ad{i}" for i in range(7)]
    eng = FakeEngine(_config(max_num_seqs=6, starvation_steps=2), num_pages=48, page_size=4,
                     slots=make_slots(max_loras=3, names=names, loader=loader))
    rng = random.Random(0)
    for i in range(40):
        eng.add(f"r{i}", [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 12))], rng.randrange(1, 8),
                lora=rng.choice(names + [None]))
    eng.run(max_steps=2000)
    assert len(eng.outputs) == 40 and not eng.failed
    eng.assert_outputs_match()
    assert eng.slots.stats.evictions > 0  # slots were really recycled
    assert max(len({c.seq.lora_name for c in o.chunks} - {None}) for o in eng.history) <= 3
    eng.assert_baseline()


# -- randomized simulation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_randomized_simulation_keeps_invariants(seed):
    rng = random.Random(seed)
    names = ["a", "b", "c", "d", "bad"]
    page_size = rng.choice([1, 2, 4])
    max_model_len = rng.choice([None, 32])
    # A tight cache (room for ~1-3 sequences) so that preemption is frequent.
    num_pages = rng.randrange(20, 48) // page_size if max_model_len is None else 32 // page_size + 4
    budget = rng.choice([4, 8, 16])
    config = _config(max_num_seqs=rng.randrange(1, 7), max_num_batched_tokens=budget,
                     max_prefill_chunk=rng.randrange(1, budget + 1), num_lookahead=rng.choice([1, 1, 3]),
                     max_model_len=max_model_len, starvation_steps=rng.choice([0, 2, 5]))
    eng = FakeEngine(config, num_pages=num_pages, page_size=page_size,
                     slots=make_slots(max_loras=2, names=names, loader=Loader(bad={"bad"})))
    aborted: set[str] = set()
    submitted = 0
    for _ in range(400):
        if rng.random() < 0.3:
            prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 14))]
            try:
                eng.add(f"q{submitted}", prompt, rng.randrange(1, 12), lora=rng.choice(names + [None, None]))
            except KVCacheCapacityError:
                pass
            submitted += 1
        if rng.random() < 0.05 and submitted:
            request_id = f"q{rng.randrange(submitted)}"
            if eng.sched.abort(request_id):
                aborted.add(request_id)
            eng.sched.check_invariants()
        eng.step()
    eng.run(max_steps=3000)
    eng.assert_outputs_match()
    assert all(isinstance(e, (AdapterError, KVCacheCapacityError)) for e in eng.failed.values())
    done = set(eng.outputs) | set(eng.failed) | aborted
    assert done == set(eng.expected)
    assert len(eng.outputs) > 20
    eng.assert_baseline()


def _decode_ready(eng: FakeEngine) -> SchedulerOutput:
    """Steps until the next schedule() is a decode step; returns that plan (not run: samples not appended)."""
    while any(s.is_prefill for s in eng.sched.running) or not eng.sched.running or eng.sched.num_waiting and \
            len(eng.sched.running) < eng.sched.config.max_num_seqs:
        eng.step()
    out = eng.sched.schedule()
    assert out.kind == "decode"
    return out


def test_continuation_plans_the_next_decode_step_before_samples_are_appended():
    eng = FakeEngine(_config(num_lookahead=3, max_num_seqs=2), num_pages=32, page_size=4)
    eng.add("a", [1, 2, 3, 4, 5], 40)
    eng.add("b", [6, 7], 40)
    eng.add("c", [8], 40)                      # waits: max_num_seqs runs, so it cannot be admitted anyway
    prev = _decode_ready(eng)
    starts = {c.seq.request_id: c.start for c in prev.chunks}
    cont = eng.sched.schedule_continuation(prev)
    assert cont is not None and cont.kind == "decode" and cont.num_lookahead == 3
    for c in cont.chunks:
        assert c.start == starts[c.seq.request_id] + 3 and c.samples
        assert len(c.seq.pages) * 4 >= c.start + 3            # pages for the continuation's positions
        assert c.seq.num_computed_tokens == c.start + 3
        for _ in range(6):                                    # the engine appends both calls' samples
            c.seq.append_token(9)
    eng.sched.check_invariants()
    assert eng.sched.schedule().kind == "decode"               # decode-ready again


def test_continuation_declines_when_schedule_could_decide_otherwise():
    # a waiting sequence could be admitted (fewer than max_num_seqs run)
    eng = FakeEngine(_config(num_lookahead=2, max_num_seqs=4), num_pages=32, page_size=4)
    eng.add("a", [1, 2, 3], 40)
    prev = _decode_ready(eng)
    eng.add("b", [4, 5], 10)
    seq = prev.chunks[0].seq
    state = (seq.num_computed_tokens, list(seq.pages))
    assert eng.sched.schedule_continuation(prev) is None
    assert (seq.num_computed_tokens, seq.pages) == state        # nothing changed
    # a sequence of the step left the running set (finished or aborted)
    eng = FakeEngine(_config(num_lookahead=2), num_pages=32, page_size=4)
    eng.add("a", [1, 2, 3], 40)
    eng.add("b", [4], 40)
    prev = _decode_ready(eng)
    eng.sched.abort("b")
    assert eng.sched.schedule_continuation(prev) is None
    # not enough free pages for everyone's next positions (schedule() would preempt)
    eng = FakeEngine(_config(num_lookahead=4), num_pages=2, page_size=4)
    eng.add("a", [1, 2, 3], 40)                 # the decode step writes positions 3..6; the next one 7..10
    prev = _decode_ready(eng)
    free = eng.pm.num_free
    assert eng.sched.schedule_continuation(prev) is None and eng.pm.num_free == free
    # a prefill step has no continuation
    eng = FakeEngine(_config(num_lookahead=2), num_pages=32, page_size=4)
    eng.add("a", [1, 2, 3], 40)
    assert eng.sched.schedule_continuation(eng.sched.schedule()) is None
