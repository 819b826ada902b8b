"""check_invariants(sgx): the whole truth about the model, stated once.

Everything the model keeps incrementally (usage, peaks, free counts, LRU counts, VA
slots, PCMD pages, memcg charges) is recomputed here from the ground truth (the runs,
counters and lists) and compared. The cost is O(cgroups + runs + batches), not
O(pages), so tests call it after every step.
"""

from __future__ import annotations

from collections import Counter
from itertools import pairwise
from typing import TYPE_CHECKING

from .constants import PAGE_SIZE, PCMDS_PER_PAGE, SGX_EPC, SGX_VA_SLOT_COUNT
from .epc_cgroup import epc_cg
from .memory import MemCss
from .misc import MISC_RESOURCES, MiscCss
from .reclaim import Stage
from .runs import RunMap, RunState

if TYPE_CHECKING:
    from .cgroup import Cgroup
    from .enclave import Enclave, Vepc
    from .reclaim import Batch
    from .sgx import Sgx

RESIDENT = (RunState.LRU, RunState.ISOLATED)


def _merged(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def check_invariants(sgx: Sgx) -> None:
    """Raise AssertionError naming the first rule that does not hold.

    Hierarchy: tree counters, process membership, controller csses; misc usage =
    own charges + children's, peaks ≥ usage, usage ≤ capacity, usage ≤ max except
    after a limit was lowered below it (then usage may only fall until it fits);
    memcg usage = own charges + children's. EPC: every page in exactly one place
    (free, dirty, or charged: on an LRU, isolated, held by a batch, SECS, VA, vEPC, or
    held by an allocation in progress; a charge may wait for its page),
    per node and per css; LRUs well linked and counted; each enclave's runs, SECS,
    VA slots ≥ evicted pages, PCMD pages = groups holding evicted pages; memory
    charges = backing pages held + declared memory.
    """
    csses = _check_tree(sgx, )
    pages_of: Counter[MiscCss] = Counter()
    per_node: Counter[int] = Counter()
    backing: Counter[MemCss] = Counter()
    owned: Counter[int] = Counter()
    lru_runs = 0
    for encl in sgx.enclaves.values():
        lru_runs += _check_enclave(sgx, encl, pages_of, per_node, backing, owned)
    for vepc in sgx.vepcs.values():
        _check_vepc(sgx, vepc, pages_of, per_node)
    for batch in sgx.reclaim.batches:
        _check_batch(batch, pages_of, per_node)
    for css, n in sgx.allocator.waiting.items():
        pages_of[css] += n
    for (nid, css), n in sgx.allocator.held.items():
        pages_of[css] += n
        per_node[nid] += n
    _check_nodes(sgx, per_node)
    _check_misc(sgx, csses, pages_of, lru_runs)
    _check_memory(sgx, backing, owned)

# -- hierarchy -------------------------------------------------------------------


def _check_tree(sgx: Sgx) -> list[MiscCss]:
    h = sgx.h
    live = list(h.root.walk())
    for cg in live:
        for name, child in cg.children.items():
            assert child.parent is cg and child.name == name and not child.dying
            assert child.level == cg.level + 1
        below = [d for d in cg.walk() if d is not cg]
        assert cg.nr_descendants == len(below), f"nr_descendants of {cg.path}"
        dying = sum(1 for d in h.dying if _is_below(d, cg))
        assert cg.nr_dying_descendants == dying, f"nr_dying_descendants of {cg.path}"
        assert cg.nr_procs_subtree == sum(len(d.procs) for d in cg.walk()), cg.path
        for pid in cg.procs:
            assert h.procs.get(pid) is cg, f"pid {pid} misfiled"
        if not cg.is_root:
            assert (cg.misc is not None) == ("misc" in cg.controllers)
            assert (cg.memory is not None) == ("memory" in cg.controllers)
            assert cg.subtree_control <= cg.controllers, cg.path
    for pid, cg in h.procs.items():
        assert pid in cg.procs and not cg.dying
    for cg in h.dying:
        assert cg.dying and not cg.procs and not cg.children
        assert any(css.cgroup is cg for css in h.lingering), f"{cg.path} dying for nothing"
    csses: list[MiscCss] = []
    stack = [h.root.misc]
    while stack:
        css = stack.pop()
        csses.append(css)
        for child in css.children:
            assert child.parent is css
            stack.append(child)
    expected = {cg.misc for cg in live if cg.misc is not None}
    expected |= {css for css in h.lingering if isinstance(css, MiscCss)}
    assert set(csses) == expected, "misc css tree differs from cgroups + lingering"
    for css in csses:
        assert css.dead == (css in h.lingering), f"misc css of {css.cgroup.path}"
        if css.dead:
            assert not css.idle(), f"idle dead misc css of {css.cgroup.path} not freed"
    return csses


def _is_below(d: Cgroup, cg: Cgroup) -> bool:
    p = d.parent
    while p is not None:
        if p is cg:
            return True
        p = p.parent
    return False


def _check_misc(sgx: Sgx, csses: list[MiscCss], pages_of: Counter[MiscCss],
                lru_runs: int) -> None:
    cap = sgx.h.misc.capacity
    assert cap[SGX_EPC] == sgx.epc.total_pages * PAGE_SIZE
    in_tree = set(csses)
    lru_total = 0
    for css in csses:
        for name in MISC_RESOURCES:
            res = css.res[name]
            own = res.usage - sum(c.res[name].usage for c in css.children)
            expect = pages_of[css] * PAGE_SIZE if name == SGX_EPC else own
            assert own == expect, f"{name} usage of {css.cgroup.path}: own {own} != {expect}"
            assert own >= 0 and res.watermark >= res.usage
            assert res.usage <= cap[name] or not cap[name] and not res.usage
            events_below = res.events_local + sum(c.res[name].events for c in css.children)
            assert res.events >= events_below, f"{name} events of {css.cgroup.path}"
        _check_limit(css)
        state = epc_cg(css)
        lru_total += _check_lru(css)
        assert state.subtree_lru == state.lru.pages + sum(
            epc_cg(c).subtree_lru for c in css.children), f"subtree_lru {css.cgroup.path}"
        pos, seen = state.next_cg, False
        while pos is not None:
            seen = seen or pos is css
            pos = pos.parent
        assert seen and state.next_cg in in_tree, f"next_cg of {css.cgroup.path}"
    assert lru_total == lru_runs, "LRU pages differ from the enclaves' LRU runs"
    for css in sgx.reclaim.async_work:
        assert css in in_tree, "async work queued for a freed css"
    for css, n in pages_of.items():
        assert css in in_tree, f"{n} pages charged to a freed css"


def _check_limit(css: MiscCss) -> None:
    """usage ≤ max, unless max was lowered below usage: then no charge can pass this
    level, so usage may only fall while the limit stays where it is."""
    res = css.res[SGX_EPC]
    state = epc_cg(css)
    if res.usage <= res.max:
        state.over_max = None
        return
    if state.over_max is not None and state.over_max[0] == res.max:
        assert res.usage <= state.over_max[1], f"EPC usage grew over max at {css.cgroup.path}"
    state.over_max = (res.max, res.usage)


def _check_lru(css: MiscCss) -> int:
    lru = epc_cg(css).lru
    prev, total = None, 0
    for run in lru:
        assert run.prev is prev and run.state is RunState.LRU and run.css is css
        assert run.encl.pages.get(run.start) is run, f"LRU run {run} not in its enclave"
        total += len(run)
        prev = run
    assert lru.tail is prev and lru.pages == total, f"LRU of {css.cgroup.path} miscounted"
    return total


def _check_memory(sgx: Sgx, backing: Counter[MemCss], owned: Counter[int]) -> None:
    h = sgx.h.mem
    memcgs = [cg.memory for cg in h.root.walk() if cg.memory is not None]
    memcgs += [css for css in h.lingering if isinstance(css, MemCss)]
    declared: Counter[MemCss] = Counter()
    for pid, held in h.declared.items():
        declared.update(held)
        owned[pid] += sum(held.values())
    child_usage: Counter[MemCss] = Counter()
    for css in memcgs:
        if css.parent is not None and not css.is_root:
            child_usage[css.parent] += css.usage
        assert css.watermark >= css.usage or css.is_root
    for css in memcgs:
        if css.is_root:
            assert css.usage == 0
            continue
        own = css.usage - child_usage[css]
        want = backing[css] + declared[css]
        assert own == want, f"memory of {css.cgroup.path}: {own} pages != {want} held"
    for mc in backing:
        assert mc.is_root or mc in memcgs, "backing charged to a freed memcg"
    for pid, pages in h.proc_memory.items():
        if pid in h.procs:
            assert pages == owned[pid], f"pid {pid} attributed {pages} != {owned[pid]}"

# -- EPC -------------------------------------------------------------------------


def _check_nodes(sgx: Sgx, per_node: Counter[int]) -> None:
    epc = sgx.epc
    assert sum(n.free for n in epc.nodes.values()) == epc.free_total
    assert sum(n.dirty for n in epc.nodes.values()) == epc.dirty_total
    assert sum(n for _, n in epc.dirty_list) == epc.dirty_total
    for nid, node in epc.nodes.items():
        assert node.free >= 0 and node.dirty >= 0
        assert node.used == per_node[nid], \
            f"node {nid}: {node.used} pages in use, {per_node[nid]} accounted for"
    assert set(per_node) <= set(epc.nodes)


def check_runmap(runs: RunMap) -> None:
    """Every block non-empty and indexed by its first start, every start as indexed,
    runs disjoint in order and counted."""
    assert all(runs.blocks) and runs.heads == [starts[0] for starts in runs.bstarts]
    assert [len(b) for b in runs.blocks] == [len(s) for s in runs.bstarts]
    assert runs.starts == [r.start for r in runs.runs] and len(runs.runs) == runs.count
    assert all(a.end <= b.start for a, b in pairwise(runs.runs))


def _check_enclave(sgx: Sgx, encl: Enclave, pages_of: Counter[MiscCss],
                   per_node: Counter[int], backing: Counter[MemCss],
                   owned: Counter[int]) -> int:
    """Returns the pages this enclave has on LRUs."""
    assert not encl.released
    pm = encl.pages
    check_runmap(pm)
    end = 0
    n = evicted = resident = on_lru = 0
    groups: list[tuple[int, int]] = []
    for run in pm:
        assert run.encl is encl and end <= run.start < run.end <= encl.size_pages
        end = run.end
        n += len(run)
        if run.state is RunState.EVICTED:
            assert run.memcg is not None and run.css is None
            evicted += len(run)
            backing[run.memcg] += len(run)
            groups.append((run.start // PCMDS_PER_PAGE, (run.end - 1) // PCMDS_PER_PAGE + 1))
        else:
            assert run.state in RESIDENT, f"{run} in an enclave map"
            assert run.css is not None and run.node in sgx.epc.nodes
            resident += len(run)
            pages_of[run.css] += len(run)
            per_node[run.node] += len(run)
            if run.state is RunState.LRU:
                on_lru += len(run)
            else:
                assert run.batch in sgx.reclaim.batches and run in run.batch.runs
                assert run.batch.stage is Stage.ISOLATED
    assert (n, evicted, resident) == (encl.nr_pages, encl.nr_evicted, encl.secs_child_cnt)
    assert encl.page_cnt == n + 1, "page_cnt != SECS + children"
    assert sum(encl.va.values()) == encl.va_pages
    assert encl.va_pages * SGX_VA_SLOT_COUNT >= encl.page_cnt, "too few VA pages"
    for (nid, css), k in encl.va.items():
        pages_of[css] += k
        per_node[nid] += k
    assert (encl.secs_css is None) != (encl.secs_memcg is None), "SECS in two places"
    if encl.secs_css is not None:
        pages_of[encl.secs_css] += 1
        per_node[encl.secs_node] += 1
    else:
        assert encl.initialized and not encl.secs_child_cnt, "SECS evicted too early"
        backing[encl.secs_memcg] += 1
        groups.append((encl.secs_index // PCMDS_PER_PAGE,
                       encl.secs_index // PCMDS_PER_PAGE + 1))
    slots = evicted + (encl.secs_css is None)
    assert encl.va_used == slots <= encl.va_slots, "VA slots != evicted pages"
    pcmd = encl.pcmd
    check_runmap(pcmd)
    spans = [(s.start, s.end) for s in pcmd]
    assert _merged(spans) == _merged(groups), f"PCMD pages of {encl} != evicted groups"
    assert sum(b - a for a, b in spans) == encl.nr_pcmd
    for span in pcmd:
        backing[span.value] += len(span)
    owned[encl.owner] += evicted + (encl.secs_css is None) + encl.nr_pcmd
    return on_lru


def _check_vepc(sgx: Sgx, vepc: Vepc, pages_of: Counter[MiscCss],
                per_node: Counter[int]) -> None:
    assert not vepc.released
    check_runmap(vepc.pages)
    total = 0
    for run in vepc.pages:
        assert run.state is RunState.VEPC
        pages_of[run.css] += len(run)
        per_node[run.node] += len(run)
        total += len(run)
    assert total == vepc.nr_pages


def _check_batch(batch: Batch, pages_of: Counter[MiscCss],
                 per_node: Counter[int]) -> None:
    assert batch.stage in (Stage.ISOLATED, Stage.WRITTEN)
    for run in batch.runs:
        if run.state is RunState.ORPHAN:  # isolated runs are counted by their enclave
            pages_of[run.css] += len(run)
            per_node[run.node] += len(run)
        else:
            assert run.state is RunState.ISOLATED and batch.stage is Stage.ISOLATED
            assert run.batch is batch and run.encl.pages.get(run.start) is run
    assert not batch.held or batch.stage is Stage.WRITTEN
    for (nid, css), n in batch.held.items():
        pages_of[css] += n
        per_node[nid] += n
