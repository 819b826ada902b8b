"""A canonical picture of the whole model state, for comparing two runs of it.

Run boundaries are an implementation detail (the bulk path and the page-by-page path
split and join runs differently), so runs are merged wherever their pages are alike.
"""

from __future__ import annotations

from epcfs.model.constants import SGX_EPC
from epcfs.model.epc_cgroup import epc_cg
from epcfs.model.sgx import Sgx


def _name(css) -> str | None:
    if css is None:
        return None
    return css.cgroup.path + ("~" if css.dead else "")


def _merge(items: list[tuple]) -> list[tuple]:
    """(start, end, *attrs) tuples, joined where contiguous and equal."""
    out: list[tuple] = []
    for item in items:
        if out and out[-1][1] == item[0] and out[-1][2:] == item[2:]:
            out[-1] = (out[-1][0], item[1], *item[2:])
        else:
            out.append(item)
    return out


def _misc_csses(sgx: Sgx):
    stack = [sgx.h.root.misc]
    while stack:
        css = stack.pop()
        yield css
        stack.extend(css.children)


def snapshot(sgx: Sgx) -> dict:
    h = sgx.h
    misc = {}
    lrus = {}
    for css in _misc_csses(sgx):
        res = css.res[SGX_EPC]
        misc[_name(css)] = (res.usage, res.watermark, res.events, res.events_local,
                            _name(epc_cg(css).next_cg))
        lru = [(r.start, r.end, r.encl.id, r.node, r.ptype, r.young) for r in epc_cg(css).lru]
        lrus[_name(css)] = _merge([(a, b, e, n, t, y) for a, b, e, n, t, y in lru])
    memory = {}
    for cg in h.root.walk():
        if cg.memory is not None and not cg.memory.is_root:
            m = cg.memory
            memory[cg.path] = (m.usage, m.watermark, dict(m.events))
    enclaves = {}
    for e in sgx.enclaves.values():
        runs = _merge([(r.start, r.end, r.state.name, r.node, _name(r.css),
                        _name(r.memcg), int(r.ptype), r.accepted, r.young) for r in e.pages])
        pcmd = _merge([(s.start, s.end, _name(s.value)) for s in e.pcmd])
        va = sorted((n, _name(c), k) for (n, c), k in e.va.items())
        enclaves[e.id] = (runs, pcmd, va, e.va_used, e.page_cnt, e.secs_child_cnt,
                          e.secs_node, _name(e.secs_css), _name(e.secs_memcg), e.initialized)
    return {
        "misc": misc, "lru": lrus, "memory": memory, "enclaves": enclaves,
        "nodes": {n: (x.free, x.dirty) for n, x in sgx.epc.nodes.items()},
        "encls": {k: v for k, v in sgx.encls.items() if v},
        "ksgxd": sgx.reclaim._ksgxd_wake, "async": [_name(c) for c in sgx.reclaim.async_work],
        "oom": list(h.oom_kills), "proc_memory": dict(h.proc_memory),
    }
