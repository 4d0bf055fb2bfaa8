"""Host-side owner of the paged KV cache's pages (plain Python, no JAX).

The device KV cache is ``num_pages`` pages of ``page_size`` token slots each. ``PageManager`` hands pages
to sequences (``seq.pages`` grows as the sequence does) and takes them back when a sequence finishes, is
aborted or is preempted. Pages are plain integers ``0..num_pages - 1``; which page a sequence gets carries no
meaning. (If the device wants a scratch page for padding writes, allocate ``num_pages + 1`` pages there and
use the last one: this manager never hands it out.)
"""

from __future__ import annotations

from jmlora.engine.sequence import Sequence


class PageError(Exception):
    """Misuse of the page manager (freeing pages that are not the sequence's, a bad token count)."""


class OutOfPagesError(PageError):
    """``allocate`` asked for more pages than are free (check ``can_allocate`` first)."""


class PageManager:
    """A free list of KV pages and the record of which sequence owns each used page.

    Args:
      num_pages: pages in the device cache, at least 1.
      page_size: token slots per page, at least 1.

    Raises:
      ValueError: a non-positive or non-integer size.
    """

    def __init__(self, num_pages: int, page_size: int):
        for name, value in (("num_pages", num_pages), ("page_size", page_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # popped from the end: page 0 first
        self._owner: dict[int, int] = {}  # used page -> seq_id
        self._owned: dict[int, list[int]] = {}  # seq_id -> its pages, in order (the manager's own copy)

    @property
    def num_free(self) -> int:
        """Pages not owned by any sequence."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        """Pages that hold ``num_tokens`` tokens: ``ceil(num_tokens / page_size)``."""
        if not isinstance(num_tokens, int) or num_tokens < 0:
            raise PageError(f"token count must be a non-negative integer, got {num_tokens!r}")
        return -(-num_tokens // self.page_size)

    def pages_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New pages ``seq`` needs so that its pages cover positions ``0..num_tokens - 1`` (0 if they do).

        Args:
          seq: the sequence.
          num_tokens: tokens its pages must cover.

        Returns:
          ``max(0, ceil(num_tokens / page_size) - len(seq.pages))``.
        """
        return max(0, self.pages_for(num_tokens) - len(seq.pages))

    def can_allocate(self, num_pages: int) -> bool:
        """True if ``num_pages`` pages are free."""
        return num_pages <= len(self._free)

    def allocate(self, seq: Sequence, upto_tokens: int) -> list[int]:
        """Grows ``seq.pages`` so it covers ``upto_tokens`` tokens. Never shrinks it.

        Args:
          seq: the sequence; its current pages must be the ones this manager gave it.
          upto_tokens: tokens the pages must cover.

        Returns:
          The newly allocated page ids (possibly empty), also appended to ``seq.pages``.

        Raises:
          OutOfPagesError: not enough free pages (nothing is allocated then).
          PageError: ``seq.pages`` is not what this manager gave the sequence.
        """
        self._check_owned(seq)
        need = self.pages_needed(seq, upto_tokens)
        if need > len(self._free):
            raise OutOfPagesError(f"sequence {seq.seq_id} needs {need} more page(s) to hold {upto_tokens} tokens "
                                  f"but only {len(self._free)} of {self.num_pages} are free")
        new = [self._free.pop() for _ in range(need)]
        for page in new:
            self._owner[page] = seq.seq_id
        if new:
            self._owned.setdefault(seq.seq_id, []).extend(new)
            seq.pages.extend(new)
        return new

    def free(self, seq: Sequence) -> int:
        """Returns every page of ``seq`` to the free list and empties ``seq.pages``.

        Returns:
          The number of pages freed (0 for a sequence without pages).

        Raises:
          PageError: ``seq.pages`` is not what this manager gave the sequence (nothing is freed then).
        """
        self._check_owned(seq)
        pages = self._owned.pop(seq.seq_id, [])
        for page in reversed(pages):
            del self._owner[page]
            self._free.append(page)
        seq.pages.clear()
        seq.pages_freed += 1
        return len(pages)

    def owned_pages(self) -> dict[int, list[int]]:
        """``{seq_id: pages}`` of every sequence holding pages (copies)."""
        return {sid: list(pages) for sid, pages in self._owned.items()}

    def check_invariants(self) -> None:
        """Raises AssertionError if the bookkeeping is inconsistent (for tests).

        Checks that every page is either free or owned by exactly one sequence, never both, and that the
        per-sequence lists agree with the per-page owners.
        """

        def require(condition: bool, message: str) -> None:
            if not condition:
                raise AssertionError(message)

        free = set(self._free)
        require(len(free) == len(self._free), f"free list has duplicates: {sorted(self._free)}")
        used = set(self._owner)
        require(not free & used, f"pages both free and owned: {sorted(free & used)}")
        require(free | used == set(range(self.num_pages)), "free and owned pages do not cover every page once")
        listed = [p for pages in self._owned.values() for p in pages]
        require(len(listed) == len(set(listed)), "a page is listed for two sequences")
        require(set(listed) == used, "per-sequence page lists disagree with the page owners")
        require(all(self._owner[p] == sid for sid, pages in self._owned.items() for p in pages),
                "a page's owner disagrees with the sequence listing it")
        require(all(pages for pages in self._owned.values()), "a sequence is recorded with no pages")

    def _check_owned(self, seq: Sequence) -> None:
        mine = self._owned.get(seq.seq_id, [])
        if seq.pages != mine:
            raise PageError(f"sequence {seq.seq_id} has pages {seq.pages} but this page manager gave it {mine}")
