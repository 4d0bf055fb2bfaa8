"""The host-side slot manager: slots, reference counts, pinning, LRU eviction and the host cache."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jmlora.lora import (
    AdapterError,
    AdapterInUseError,
    LoRAWeights,
    NoFreeSlotError,
    SlotError,
    SlotManager,
    UnknownAdapterError,
)


class RecordingLoader:
    """Builds a small LoRAWeights per adapter and records every call (the loader is a plain callable)."""

    def __init__(self, bad: frozenset[str] = frozenset()):
        self.calls: list[tuple[str, str]] = []
        self.bad = bad

    def __call__(self, name: str, path: str) -> LoRAWeights:
        self.calls.append((name, path))
        if name in self.bad:
            raise AdapterError(f"{path}: broken adapter")
        a = np.full((8, 2), len(self.calls), np.float32)  # [in, r]
        b = np.ones((2, 8), np.float32)  # [r, out]
        return LoRAWeights(name=name, path=path, rank=2, targets=frozenset({"q_proj"}),
                           layers={(0, "q_proj"): (a, b)})


def _manager(max_loras=2, max_cpu_loras=3, names="abcde", loader=None) -> SlotManager:
    slots = SlotManager(max_loras, max_cpu_loras, loader)
    for name in names:
        slots.register(name, f"/adapters/{name}")
    return slots


def test_constructor_validates():
    with pytest.raises(ValueError, match="max_loras must be a positive integer, got 0"):
        SlotManager(0, 4)
    with pytest.raises(ValueError, match=r"max_cpu_loras \(1\) must be an integer >= max_loras \(2\)"):
        SlotManager(2, 1)


def test_acquire_assigns_lowest_free_slot_and_counts_references():
    slots = _manager()
    assert slots.acquire("a") == (1, True)
    assert slots.acquire("b") == (2, True)
    assert slots.acquire("a") == (1, False)  # resident: same slot, nothing to load
    assert slots.refcount("a") == 2 and slots.refcount("b") == 1
    assert slots.resident() == {"b": 2, "a": 1}  # least recently used first
    assert slots.stats.loads == 2 and slots.stats.evictions == 0
    slots.check_invariants()


def test_evicts_least_recently_used_unreferenced_adapter():
    slots = _manager(max_loras=3)
    for name in "abc":
        slots.acquire(name)
    for name in "abc":
        slots.release(name)
    slots.acquire("a")  # touch a: b is now the least recently used
    slots.release("a")
    assert slots.acquire("d") == (2, True)  # b's slot
    assert slots.slot_of("b") is None and slots.slot_of("d") == 2
    assert slots.acquire("e") == (3, True)  # then c's
    assert slots.stats.evictions == 2 and slots.stats.loads == 5
    slots.check_invariants()


def test_referenced_and_pinned_adapters_are_never_evicted():
    slots = _manager(max_loras=2)
    slots.acquire("a")  # referenced
    assert slots.pin("b") == (2, True)  # resident, pinned, unreferenced
    with pytest.raises(NoFreeSlotError, match=r"cannot load adapter 'c': all 2 slots hold adapters that running "
                                              r"requests use or that are pinned \(1 pinned\)"):
        slots.acquire("c")
    assert slots.resident() == {"a": 1, "b": 2}  # the failed acquire changed nothing
    slots.check_invariants()
    slots.unpin("b")
    assert slots.acquire("c") == (2, True)  # b is evictable again; a is still referenced
    slots.release("a")
    assert slots.acquire("d") == (1, True)
    slots.check_invariants()


def test_pin_of_resident_adapter_keeps_its_slot():
    slots = _manager()
    slots.acquire("a")
    assert slots.pin("a") == (1, False)
    slots.release("a")
    slots.acquire("b")
    slots.release("b")
    slots.acquire("c")  # must evict b, not the pinned a
    assert slots.resident() == {"a": 1, "c": 2}


def test_release_errors():
    slots = _manager()
    with pytest.raises(SlotError, match=r"release\('a'\) without a matching acquire"):
        slots.release("a")
    slots.acquire("a")
    slots.release("a")
    with pytest.raises(SlotError, match="without a matching acquire"):
        slots.release("a")
    assert slots.slot_of("a") == 1  # released adapters stay resident


def test_unknown_names_are_refused():
    slots = _manager(names="a")
    for call in (slots.acquire, slots.release, slots.pin, slots.unpin, slots.unregister, slots.get_weights,
                 slots.evict):
        with pytest.raises(UnknownAdapterError, match="unknown LoRA adapter 'zz'; register it first"):
            call("zz")
    assert slots.slot_of("zz") is None


def test_register_is_idempotent_and_refuses_a_second_path():
    slots = _manager(names="")
    slots.register("a", "/x")
    slots.register("a", "/x")
    with pytest.raises(AdapterInUseError, match="adapter 'a' is already registered with path '/x'"):
        slots.register("a", "/y")
    with pytest.raises(ValueError, match="adapter name must be a non-empty string"):
        slots.register("", "/z")
    assert slots.registered() == {"a": "/x"}


def test_unregister_refuses_while_referenced_then_frees_everything():
    loader = RecordingLoader()
    slots = _manager(loader=loader)
    slots.acquire("a")
    slots.pin("a")
    with pytest.raises(AdapterInUseError, match=r"cannot unregister adapter 'a': 1 running request\(s\) use it"):
        slots.unregister("a")
    slots.release("a")
    slots.unregister("a")
    assert not slots.is_registered("a") and slots.resident() == {} and slots.cached() == []
    assert not slots.is_pinned("a")
    slots.check_invariants()
    assert slots.acquire("b") == (1, True)  # the slot is free again


def test_evict():
    slots = _manager()
    assert slots.evict("a") is False
    slots.acquire("a")
    with pytest.raises(AdapterInUseError, match="cannot evict adapter 'a': it is used by running requests"):
        slots.evict("a")
    slots.release("a")
    slots.pin("a")
    with pytest.raises(AdapterInUseError, match="cannot evict adapter 'a': it is pinned"):
        slots.evict("a")
    slots.unpin("a")
    assert slots.evict("a") is True and slots.slot_of("a") is None
    slots.check_invariants()


def test_host_cache_is_lru_bounded_and_counted():
    loader = RecordingLoader()
    slots = _manager(max_loras=1, max_cpu_loras=2, loader=loader)
    first = slots.get_weights("a")
    assert slots.get_weights("a") is first  # a hit, no second load
    slots.get_weights("b")
    slots.get_weights("a")  # a becomes most recent
    slots.get_weights("c")  # evicts b
    assert slots.cached() == ["a", "c"]
    assert loader.calls == [("a", "/adapters/a"), ("b", "/adapters/b"), ("c", "/adapters/c")]
    assert (slots.stats.cpu_hits, slots.stats.cpu_misses, slots.stats.cpu_evictions) == (2, 3, 1)
    slots.check_invariants()


def test_acquire_loads_through_the_host_cache():
    loader = RecordingLoader()
    slots = _manager(max_loras=1, max_cpu_loras=2, loader=loader)
    assert slots.acquire("a") == (1, True)
    slots.release("a")
    assert slots.acquire("b") == (1, True)  # evicts a from the device, not from the host cache
    slots.release("b")
    assert slots.acquire("a") == (1, True)
    assert [name for name, _ in loader.calls] == ["a", "b"]  # a's second load came from host RAM
    assert slots.get_weights("a").name == "a"


def test_failed_load_leaves_the_manager_unchanged():
    slots = _manager(max_loras=1, loader=RecordingLoader(bad=frozenset({"b"})))
    slots.acquire("a")
    slots.release("a")
    with pytest.raises(AdapterError, match="broken adapter"):
        slots.acquire("b")
    assert slots.resident() == {"a": 1} and slots.refcount("b") == 0 and "b" not in slots.cached()
    assert slots.stats.evictions == 0
    slots.check_invariants()


def test_get_weights_without_loader():
    slots = _manager()
    with pytest.raises(SlotError, match="'a' is not in the host cache and the slot manager has no loader"):
        slots.get_weights("a")


def test_with_real_peft_adapters(tmp_path):
    """End to end with peft_loader: a valid adapter loads into a slot, a DoRA one is refused before any slot
    changes."""
    from lora_fixtures import make_hf_model, make_peft_adapter

    from jmlora.config import ModelConfig
    from jmlora.lora import peft_loader

    model_dir, hf_model = make_hf_model(tmp_path, "llama")
    cfg = ModelConfig.from_pretrained(model_dir)
    good = make_peft_adapter(hf_model, tmp_path / "good", r=4, alpha=8, targets=["q_proj", "v_proj"])
    dora = make_peft_adapter(hf_model, tmp_path / "dora", r=4, alpha=8, targets=["q_proj"], use_dora=True)
    slots = SlotManager(1, 2, peft_loader(cfg, max_lora_rank=8))
    slots.register("sql", str(good))
    slots.register("dora", str(dora))
    assert slots.acquire("sql") == (1, True)
    weights = slots.get_weights("sql")
    assert weights.name == "sql" and weights.rank == 4 and weights.targets == {"q_proj", "v_proj"}
    slots.release("sql")
    with pytest.raises(AdapterError, match="DoRA"):
        slots.acquire("dora")
    assert slots.resident() == {"sql": 1}
    slots.check_invariants()


class SlotMachine(RuleBasedStateMachine):
    """Random operation sequences against a timestamp model of the intended policy."""

    NAMES = ("a", "b", "c", "d", "e", "f")

    def __init__(self):
        super().__init__()
        self.max_loras = 3
        self.slots = SlotManager(self.max_loras, 4, RecordingLoader())
        for name in self.NAMES:
            self.slots.register(name, f"/adapters/{name}")
        # the model
        self.slot: dict[str, int] = {}
        self.refs: dict[str, int] = {}
        self.pinned: set[str] = set()
        self.last_use: dict[str, int] = {}
        self.clock = 0

    def _expected_resident(self, name: str) -> tuple[int, bool] | None:
        """What taking a slot for ``name`` should give; None for NoFreeSlotError. Updates the model."""
        self.clock += 1
        if name in self.slot:
            self.last_use[name] = self.clock
            return self.slot[name], False
        free = sorted(set(range(1, self.max_loras + 1)) - set(self.slot.values()))
        if free:
            slot = free[0]
        else:
            evictable = [n for n in self.slot if not self.refs.get(n) and n not in self.pinned]
            if not evictable:
                return None
            victim = min(evictable, key=self.last_use.__getitem__)
            slot = self.slot.pop(victim)
        self.slot[name] = slot
        self.last_use[name] = self.clock
        return slot, True

    def _take(self, method, name: str) -> tuple[int, bool] | None:
        expected = self._expected_resident(name)
        if expected is None:
            with pytest.raises(NoFreeSlotError):
                method(name)
        else:
            assert method(name) == expected
        return expected

    @rule(name=st.sampled_from(NAMES))
    def acquire(self, name):
        if self._take(self.slots.acquire, name) is not None:
            self.refs[name] = self.refs.get(name, 0) + 1

    @precondition(lambda self: any(self.refs.values()))
    @rule(data=st.data())
    def release(self, data):
        name = data.draw(st.sampled_from(sorted(n for n, c in self.refs.items() if c)))
        self.slots.release(name)
        self.refs[name] -= 1

    @rule(name=st.sampled_from(NAMES))
    def pin(self, name):
        if self._take(self.slots.pin, name) is not None:
            self.pinned.add(name)

    @rule(name=st.sampled_from(NAMES))
    def unpin(self, name):
        self.slots.unpin(name)
        self.pinned.discard(name)

    @rule(name=st.sampled_from(NAMES))
    def get_weights(self, name):
        assert self.slots.get_weights(name).name == name

    @invariant()
    def agrees_with_model(self):
        self.slots.check_invariants()
        assert self.slots.resident().keys() == self.slot.keys()
        assert all(self.slots.slot_of(n) == s for n, s in self.slot.items())
        assert all(self.slots.refcount(n) == self.refs.get(n, 0) for n in self.NAMES)
        assert all(self.slots.is_pinned(n) == (n in self.pinned) for n in self.NAMES)


TestSlotMachine = SlotMachine.TestCase
TestSlotMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
