"""A RunMap answers as a plain page → value table would, however its runs are blocked.

Hypothesis drives one map of Spans through inserts into free gaps, cuts, removals and
merges, with blocks of a few runs so that blocks split, empty and re-index often, and
compares every page's value and the map's own index after each step.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epcfs.model import runs as runs_module
from epcfs.model.invariants import check_runmap
from epcfs.model.runs import RunMap, Span

PAGES = 120
"""Pages the map covers: enough for a few dozen runs over several small blocks."""
VALUES = ("a", "b", "c")
"""Few values, so that neighbours are often alike and merge."""

steps = st.lists(st.tuples(st.sampled_from(["insert", "cut", "remove", "merge"]),
                           st.integers(0, PAGES - 1), st.integers(1, 9),
                           st.sampled_from(VALUES)), max_size=150)


@pytest.fixture(autouse=True, scope="module")
def small_blocks():
    """Blocks of at most 2 × 2 runs while this module's tests run."""
    block = runs_module.BLOCK
    runs_module.BLOCK = 2
    yield
    runs_module.BLOCK = block


def table(m: RunMap) -> dict[int, str]:
    return {i: span.value for span in m for i in range(span.start, span.end)}


@settings(max_examples=200, deadline=None)
@given(steps=steps)
def test_runmap_equals_a_page_table(steps):
    m = RunMap()
    ref: dict[int, str] = {}
    for kind, at, n, value in steps:
        if kind == "insert":
            end = min(at + n, PAGES)
            nxt = m.next_start(at)
            end = min(end, nxt) if nxt is not None else end
            if at in ref or end <= at:
                continue
            span = Span(at, end, value)
            m.insert(span)
            ref.update(dict.fromkeys(range(at, end), value))
            if n % 2:
                m.merge(span)
        elif kind == "cut":
            m.cut(at)
            span = m.get(at)
            assert span is None or span.start == at
        elif kind == "remove":
            for span in m.isolate(at, at + n):
                m.remove(span)
            for i in range(at, at + n):
                ref.pop(i, None)
            assert m.overlapping(at, at + n) == []
        elif (span := m.get(at)) is not None:
            held = m.merge(span)
            assert held.start <= at < held.end
        check_runmap(m)
        assert table(m) == ref
        for i in (at, at + n):
            span = m.get(i)
            assert (span.value if span is not None else None) == ref.get(i)


@given(steps=steps)
def test_overlapping_lists_the_runs_meeting_a_range(steps):
    m = RunMap()
    for kind, at, n, value in steps:
        if kind == "insert" and m.get(at) is None:
            nxt = m.next_start(at)
            end = min(at + n, nxt if nxt is not None else PAGES, PAGES)
            m.insert(Span(at, end, value))
        a, b = at, at + n
        assert m.overlapping(a, b) == [s for s in m.runs if s.start < b and a < s.end]
