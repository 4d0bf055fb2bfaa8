"""Host-side bookkeeping of which adapter lives in which device slot (plain Python, no JAX).

The adapter bank on the device has ``max_loras`` slots, numbered 1..max_loras; slot 0 is the all-zero
"no adapter" slot and is never handed out. ``SlotManager`` decides which registered adapter occupies
which slot, counts the running requests that use each resident adapter, evicts the least recently used
adapter that no request uses and nobody pinned when a slot is needed, and keeps a host-RAM LRU cache of
parsed ``LoRAWeights`` (``max_cpu_loras`` entries) so that re-loading an evicted adapter skips the disk.

The manager never writes to the device: ``acquire`` answers ``needs_load=True`` when the caller must write
the adapter's weights (``get_weights(name)``) into the returned slot before the next step that uses it.

Typical use by the engine::

    slots.register("sql", "/adapters/sql")
    slot, needs_load = slots.acquire("sql")      # when a request using "sql" is scheduled
    if needs_load:
        bank = write_slot(bank, slot, slots.get_weights("sql"))
    ...
    slots.release("sql")                          # when that request finishes or is aborted

Not thread-safe: call it from the engine's loop only.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable

from jmlora.lora.peft import LoRAWeights


class SlotError(Exception):
    """Base class of the slot manager's errors."""


class UnknownAdapterError(SlotError, KeyError):
    """An adapter name that was never registered (or was unregistered)."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


class NoFreeSlotError(SlotError):
    """Every device slot holds an adapter that a running request uses or that is pinned."""


class AdapterInUseError(SlotError):
    """An operation that needs an adapter to be unused (unregister, evict, re-register elsewhere)."""


@dataclasses.dataclass
class SlotStats:
    """Counters for metrics.

    Attributes:
      loads: slot assignments that needed the weights written to the device.
      evictions: resident adapters pushed out of their slot to make room.
      cpu_hits: ``get_weights`` answered from the host cache.
      cpu_misses: ``get_weights`` calls that went to the loader (disk).
      cpu_evictions: parsed adapters dropped from the host cache to respect ``max_cpu_loras``.
    """

    loads: int = 0
    evictions: int = 0
    cpu_hits: int = 0
    cpu_misses: int = 0
    cpu_evictions: int = 0


class SlotManager:
    """Maps adapter names to device slots 1..max_loras, with reference counts, pinning and LRU eviction.

    Args:
      max_loras: number of usable device slots (slot 0, the "no adapter" slot, comes on top).
      max_cpu_loras: capacity of the host cache of parsed adapters; at least ``max_loras``, so every
        resident adapter can be kept on the host too.
      loader: ``(name, path) -> LoRAWeights``, used by ``get_weights`` on a cache miss (see
        ``jmlora.lora.peft.peft_loader``). Without a loader the manager only tracks slots, and
        ``get_weights`` raises.

    Raises:
      ValueError: a non-positive ``max_loras`` or ``max_cpu_loras < max_loras``.
    """

    def __init__(self, max_loras: int, max_cpu_loras: int,
                 loader: Callable[[str, str], LoRAWeights] | None = None):
        if not isinstance(max_loras, int) or max_loras < 1:
            raise ValueError(f"max_loras must be a positive integer, got {max_loras!r}")
        if not isinstance(max_cpu_loras, int) or max_cpu_loras < max_loras:
            raise ValueError(f"max_cpu_loras ({max_cpu_loras!r}) must be an integer >= max_loras ({max_loras})")
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self._loader = loader
        self._paths: dict[str, str] = {}  # registered name -> adapter path
        # Resident adapters, least recently used first: name -> slot.
        self._slots: OrderedDict[str, int] = OrderedDict()
        self._free: list[int] = list(range(max_loras, 0, -1))  # popped from the end: lowest slot first
        self._refs: dict[str, int] = {}  # resident name -> running requests using it (> 0 only)
        self._pinned: set[str] = set()  # resident names that are never evicted
        self._cpu: OrderedDict[str, LoRAWeights] = OrderedDict()  # host cache, least recently used first
        self.stats = SlotStats()

    # -- registry ------------------------------------------------------------------------------------------

    def register(self, name: str, path: str) -> None:
        """Makes ``name`` known, pointing at the adapter directory ``path``. Idempotent for the same path.

        Raises:
          ValueError: an empty name.
          AdapterInUseError: ``name`` is already registered with a different path (unregister it first).
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        old = self._paths.get(name)
        if old is not None and old != str(path):
            raise AdapterInUseError(f"adapter {name!r} is already registered with path {old!r}; "
                                    f"unregister it before registering {str(path)!r}")
        self._paths[name] = str(path)

    def unregister(self, name: str) -> None:
        """Forgets ``name``: frees its slot (unpinning it) and drops it from the host cache.

        Raises:
          UnknownAdapterError: ``name`` is not registered.
          AdapterInUseError: running requests still use it.
        """
        self._need(name)
        if self._refs.get(name):
            raise AdapterInUseError(f"cannot unregister adapter {name!r}: {self._refs[name]} running "
                                    "request(s) use it")
        self._pinned.discard(name)
        if name in self._slots:
            self._free_slot(name)
        self._cpu.pop(name, None)
        del self._paths[name]

    def is_registered(self, name: str) -> bool:
        return name in self._paths

    def registered(self) -> dict[str, str]:
        """``{name: path}`` of every registered adapter."""
        return dict(self._paths)

    # -- slots ---------------------------------------------------------------------------------------------

    def acquire(self, name: str) -> tuple[int, bool]:
        """Gives a running request the slot of adapter ``name``, taking one if it is not resident.

        A resident adapter keeps its slot. Otherwise the lowest free slot is used, else the least recently
        used adapter with no running request and no pin is evicted. With a loader, the adapter's weights
        are read (or found in the host cache) *before* any slot changes, so an invalid adapter leaves the
        manager as it was.

        Args:
          name: a registered adapter.

        Returns:
          ``(slot, needs_load)``: ``slot`` in 1..max_loras; ``needs_load`` is True when the adapter was
          just given the slot, and the caller must write ``get_weights(name)`` into it before using it.

        Raises:
          UnknownAdapterError: ``name`` is not registered.
          NoFreeSlotError: every slot is used by a running request or pinned.
          jmlora.lora.peft.AdapterError: (with a loader) the adapter does not load.
        """
        slot, needs_load = self._make_resident(name)
        self._refs[name] = self._refs.get(name, 0) + 1
        return slot, needs_load

    def release(self, name: str) -> None:
        """Ends one running request's use of ``name``; the adapter stays resident until evicted.

        Raises:
          UnknownAdapterError: ``name`` is not registered.
          SlotError: ``name`` has no running request to release.
        """
        self._need(name)
        count = self._refs.get(name, 0)
        if count == 0:
            raise SlotError(f"release({name!r}) without a matching acquire")
        if count == 1:
            del self._refs[name]
        else:
            self._refs[name] = count - 1

    def pin(self, name: str) -> tuple[int, bool]:
        """Makes ``name`` resident (like ``acquire``, without a reference) and never evicts it until unpinned.

        Returns:
          ``(slot, needs_load)`` as ``acquire``.

        Raises:
          UnknownAdapterError, NoFreeSlotError, AdapterError: as ``acquire``.
        """
        result = self._make_resident(name)
        self._pinned.add(name)
        return result

    def unpin(self, name: str) -> None:
        """Lets ``name`` be evicted again once unused. A no-op if it was not pinned.

        Raises:
          UnknownAdapterError: ``name`` is not registered.
        """
        self._need(name)
        self._pinned.discard(name)

    def evict(self, name: str) -> bool:
        """Frees the slot of ``name`` now (e.g. after writing its weights failed, or to unload it).

        Returns:
          True if it was resident.

        Raises:
          UnknownAdapterError: ``name`` is not registered.
          AdapterInUseError: running requests use it, or it is pinned.
        """
        self._need(name)
        if name not in self._slots:
            return False
        if self._refs.get(name) or name in self._pinned:
            raise AdapterInUseError(f"cannot evict adapter {name!r}: it is "
                                    + ("pinned" if name in self._pinned else "used by running requests"))
        self._free_slot(name)
        return True

    def slot_of(self, name: str) -> int | None:
        """The slot of ``name`` if resident, else None (also None for unknown names)."""
        return self._slots.get(name)

    def resident(self) -> dict[str, int]:
        """``{name: slot}`` of resident adapters, least recently used first."""
        return dict(self._slots)

    def refcount(self, name: str) -> int:
        """Running requests using ``name`` (0 if none or unknown)."""
        return self._refs.get(name, 0)

    def is_pinned(self, name: str) -> bool:
        return name in self._pinned

    # -- host cache ----------------------------------------------------------------------------------------

    def get_weights(self, name: str) -> LoRAWeights:
        """The parsed weights of ``name``, from the host cache or through the loader.

        Raises:
          UnknownAdapterError: ``name`` is not registered.
          SlotError: the cache misses and the manager has no loader.
          jmlora.lora.peft.AdapterError: the loader rejects the adapter (nothing is cached then).
        """
        self._need(name)
        weights = self._cpu.get(name)
        if weights is not None:
            self._cpu.move_to_end(name)
            self.stats.cpu_hits += 1
            return weights
        if self._loader is None:
            raise SlotError(f"adapter {name!r} is not in the host cache and the slot manager has no loader")
        weights = self._loader(name, self._paths[name])
        self.stats.cpu_misses += 1
        self._cpu[name] = weights
        while len(self._cpu) > self.max_cpu_loras:
            self._cpu.popitem(last=False)
            self.stats.cpu_evictions += 1
        return weights

    def cached(self) -> list[str]:
        """Names in the host cache, least recently used first."""
        return list(self._cpu)

    # -- invariants ----------------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raises AssertionError if the internal state is inconsistent (for tests)."""

        def require(condition: bool, message: str) -> None:
            if not condition:
                raise AssertionError(message)

        slots = list(self._slots.values())
        require(len(set(slots)) == len(slots), f"two adapters share a slot: {self._slots}")
        require(all(1 <= s <= self.max_loras for s in slots), f"slot out of range: {self._slots}")
        require(len(set(self._free)) == len(self._free), f"free list has duplicates: {self._free}")
        require(set(self._free) | set(slots) == set(range(1, self.max_loras + 1))
                and not set(self._free) & set(slots), f"free {self._free} and used {slots} do not partition")
        require(set(self._slots) <= set(self._paths), "a resident adapter is not registered")
        require(set(self._refs) <= set(self._slots), f"referenced adapters {self._refs} are not resident")
        require(all(c > 0 for c in self._refs.values()), f"non-positive refcount: {self._refs}")
        require(self._pinned <= set(self._slots), f"pinned {self._pinned} are not all resident")
        require(len(self._cpu) <= self.max_cpu_loras, "host cache over capacity")
        require(set(self._cpu) <= set(self._paths), "a cached adapter is not registered")

    # -- internals -----------------------------------------------------------------------------------------

    def _need(self, name: str) -> None:
        if name not in self._paths:
            raise UnknownAdapterError(f"unknown LoRA adapter {name!r}; register it first")

    def _make_resident(self, name: str) -> tuple[int, bool]:
        """Returns (slot, needs_load), taking a slot for ``name`` if it has none."""
        self._need(name)
        slot = self._slots.get(name)
        if slot is not None:
            self._slots.move_to_end(name)
            return slot, False
        victim = None
        if not self._free:
            victim = next((n for n in self._slots if n not in self._refs and n not in self._pinned), None)
            if victim is None:
                raise NoFreeSlotError(
                    f"cannot load adapter {name!r}: all {self.max_loras} slots hold adapters that running "
                    f"requests use or that are pinned ({len(self._pinned)} pinned); raise max_loras or wait")
        if self._loader is not None:
            self.get_weights(name)  # validate (and cache) before changing any slot
        if victim is not None:
            self._free_slot(victim)
            self.stats.evictions += 1
        slot = self._free.pop()
        self._slots[name] = slot
        self.stats.loads += 1
        return slot, True

    def _free_slot(self, name: str) -> None:
        slot = self._slots.pop(name)
        self._free.append(slot)
        self._free.sort(reverse=True)
