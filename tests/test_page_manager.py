"""The host-side KV page manager: allocation, growth, freeing and its misuse errors."""

from __future__ import annotations

import pytest

from jmlora.engine.page_manager import OutOfPagesError, PageError, PageManager
from jmlora.engine.sequence import Sequence


def _seq(n=3) -> Sequence:
    return Sequence("r", list(range(1, n + 1)))


def test_constructor_validates():
    with pytest.raises(ValueError, match="num_pages must be a positive integer, got 0"):
        PageManager(0, 16)
    with pytest.raises(ValueError, match="page_size must be a positive integer, got 2.0"):
        PageManager(4, 2.0)
    with pytest.raises(ValueError, match="page_size must be a positive integer, got True"):
        PageManager(4, True)


def test_pages_needed_and_allocate_grow_by_whole_pages():
    pm = PageManager(num_pages=6, page_size=4)
    seq = _seq()
    assert pm.pages_needed(seq, 0) == 0
    assert pm.pages_needed(seq, 1) == 1 and pm.pages_needed(seq, 4) == 1 and pm.pages_needed(seq, 5) == 2
    assert pm.allocate(seq, 5) == [0, 1]  # lowest pages first on a fresh manager
    assert seq.pages == [0, 1] and pm.num_free == 4 and pm.num_used == 2
    assert pm.pages_needed(seq, 8) == 0 and pm.allocate(seq, 8) == []  # already covered
    assert pm.allocate(seq, 3) == [] and seq.pages == [0, 1]  # never shrinks
    assert pm.allocate(seq, 9) == [2] and seq.pages == [0, 1, 2]
    other = _seq()
    assert pm.allocate(other, 4) == [3]
    assert pm.owned_pages() == {seq.seq_id: [0, 1, 2], other.seq_id: [3]}
    pm.check_invariants()


def test_free_returns_pages_for_reuse():
    pm = PageManager(4, 2)
    a, b = _seq(), _seq()
    pm.allocate(a, 4)
    pm.allocate(b, 4)
    assert pm.num_free == 0 and not pm.can_allocate(1) and pm.can_allocate(0)
    assert pm.free(a) == 2 and a.pages == [] and pm.num_free == 2
    assert pm.free(a) == 0  # freeing a sequence without pages is a no-op
    c = _seq()
    assert sorted(pm.allocate(c, 3)) == [0, 1]
    pm.check_invariants()
    pm.free(b)
    pm.free(c)
    assert pm.num_free == 4 and pm.owned_pages() == {}
    pm.check_invariants()


def test_out_of_pages_allocates_nothing():
    pm = PageManager(3, 4)
    seq = _seq()
    pm.allocate(seq, 4)
    with pytest.raises(OutOfPagesError, match=r"needs 3 more page\(s\) to hold 16 tokens but only 2 of 3 are free"):
        pm.allocate(seq, 16)
    assert seq.pages == [0] and pm.num_free == 2
    pm.check_invariants()


def test_misuse_is_refused():
    pm = PageManager(4, 4)
    seq = _seq()
    pm.allocate(seq, 4)
    stranger = _seq()
    stranger.pages = [1]  # pages this manager never gave it
    with pytest.raises(PageError, match=r"has pages \[1\] but this page manager gave it \[\]"):
        pm.free(stranger)
    with pytest.raises(PageError, match="but this page manager gave it"):
        pm.allocate(stranger, 8)
    seq.pages.append(3)  # tampered list
    with pytest.raises(PageError, match=r"has pages \[0, 3\] but this page manager gave it \[0\]"):
        pm.free(seq)
    with pytest.raises(PageError, match="non-negative integer, got -1"):
        pm.pages_needed(_seq(), -1)
    seq.pages.pop()
    pm.check_invariants()


def test_check_invariants_detects_corruption():
    pm = PageManager(4, 4)
    seq = _seq()
    pm.allocate(seq, 4)
    pm._free.append(0)  # page 0 both free and owned
    with pytest.raises(AssertionError, match="both free and owned"):
        pm.check_invariants()
    pm._free.pop()
    pm._free.pop()  # page lost: neither free nor owned
    with pytest.raises(AssertionError, match="do not cover every page"):
        pm.check_invariants()
