"""Per-cgroup EPC state (struct sgx_cgroup) and the questions asked of a misc subtree.

Each misc css carries an EpcCgroup in its `epc` slot, created on first use because the
Hierarchy makes csses without knowing about SGX. The pages on a css's LRU are the
reclaimable pages charged to it; `subtree_lru` adds those of every descendant css
(live or dying-but-charged), kept incrementally so "can this subtree reclaim anything?"
(sgx_cgroup_lru_empty) costs O(1) instead of a walk.
"""

from __future__ import annotations

from .constants import PAGE_SIZE, SGX_CG_LOW_LIMIT, SGX_CG_MIN_FREE_PAGE, SGX_EPC
from .misc import MiscCss
from .runs import Lru


class EpcCgroup:
    """The SGX side of one misc css: its LRU, the reclaim iterator, invariant memory."""

    __slots__ = ("lru", "next_cg", "subtree_lru", "over_max")

    def __init__(self, css: MiscCss) -> None:
        self.lru = Lru()
        self.next_cg: MiscCss = css
        self.subtree_lru = 0
        self.over_max: tuple[int, int] | None = None  # (max, usage) seen over the limit


def epc_cg(css: MiscCss) -> EpcCgroup:
    """The css's EPC state, attached on first use."""
    state = css.epc
    if state is None:
        state = css.epc = EpcCgroup(css)
    return state


def lru_changed(css: MiscCss, delta: int) -> None:
    """Account `delta` pages added to (or taken off) css's own LRU in every ancestor."""
    for level in css.ancestors():
        epc_cg(level).subtree_lru += delta


def lru_empty(css: MiscCss) -> bool:
    """sgx_cgroup_lru_empty: no reclaimable page anywhere in css's subtree."""
    return epc_cg(css).subtree_lru == 0


def next_descendant_pre(root: MiscCss, pos: MiscCss) -> MiscCss:
    """The css after `pos` in a pre-order walk of root's subtree, or root after the last
    one (css_next_descendant_pre, wrapping). Children are visited in creation order,
    dying csses that still hold charges included: the kernel's css_tryget succeeds on
    them while pages keep references."""
    if pos.children:
        return pos.children[0]
    while pos is not root:
        siblings = pos.parent.children
        i = siblings.index(pos)
        if i + 1 < len(siblings):
            return siblings[i + 1]
        pos = pos.parent
    return root


def next_get(root: MiscCss) -> MiscCss:
    """sgx_cgroup_next_get: the css to scan now, advancing root's iterator past it."""
    state = epc_cg(root)
    pos = state.next_cg
    state.next_cg = next_descendant_pre(root, pos)
    return pos


def forget_css(css: MiscCss) -> None:
    """sgx_cgroup_free's iterator fix-up, run while css is still linked: every ancestor
    whose next_cg is this css moves on to the next one in its own pre-order walk."""
    level = css.parent
    while level is not None:
        state = epc_cg(level)
        if state.next_cg is css:
            state.next_cg = next_descendant_pre(level, css)
        level = level.parent


def max_pages_to_root(css: MiscCss) -> int:
    """sgx_cgroup_max_pages_to_root: the smallest misc.max on the way up, in pages."""
    return min(level.res[SGX_EPC].max for level in css.ancestors()) // PAGE_SIZE


def reclaim_threshold(css: MiscCss) -> int:
    """The usage in pages from which css should reclaim: SGX_CG_MIN_FREE_PAGE below the
    tightest limit, or the limit itself for limits of SGX_CG_LOW_LIMIT pages or less."""
    limit = max_pages_to_root(css)
    if limit > SGX_CG_LOW_LIMIT:
        limit -= SGX_CG_MIN_FREE_PAGE
    return limit


def should_reclaim(css: MiscCss) -> bool:
    """sgx_cgroup_should_reclaim: usage at reclaim_threshold or above, and something to
    reclaim."""
    if lru_empty(css):
        return False
    return css.res[SGX_EPC].usage // PAGE_SIZE >= reclaim_threshold(css)
