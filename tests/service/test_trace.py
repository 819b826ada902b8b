"""The tracer under trio's MockClock: what a trace file holds after real enclave requests
(the same Rig as the enclave server's tests), and what the `stats` op reports."""

from __future__ import annotations

import errno
import json
import os

import pytest
import trio

from epcfs.model.constants import PAGE_SIZE
from epcfs.service.trace import ChromeTrace, load

from .test_enclave_server import MIB, Rig, autojump, call  # noqa: F401 (autojump: a fixture)

pytestmark = pytest.mark.usefixtures("autojump")


def limited(rig: Rig, name: str, limit: int):
    """A cgroup under the root with an sgx_epc limit, holding this process."""
    cg = rig.h.mkdir(rig.h.root, name)
    rig.h.write_subtree_control(rig.h.root, "+misc +memory")
    cg.misc.res["sgx_epc"].max = limit
    rig.h.move(os.getpid(), cg)
    return cg


async def test_trace_of_an_oversubscribed_load(tmp_path):
    """A load twice its cgroup's limit: the file is strict JSON once closed, with the
    cgroup's counters and limit, sync reclaim rounds on this process's track costing
    the EWBs they did, failed charges, the move into the cgroup, and EWB counted for
    `epcfs top` against the cgroup whose pages went."""
    capacity = 4 * MIB
    rig = Rig(str(tmp_path / "s"), capacity, scale=1.0)
    limited(rig, "t", capacity // 4)
    path = tmp_path / "trace.json"
    rig.steps.tracer = tracer = ChromeTrace(str(path))
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        nursery.start_soon(tracer.run, rig.sgx)
        sock = await rig.connect()
        await call(sock, "create", size=2 * capacity)
        pages = capacity // 2 // PAGE_SIZE
        assert (await call(sock, "add", offset=0, count=pages, measured=False,
                           tcs=False))["count"] == pages
        await trio.sleep(0.1)
        stats = (await call(sock, "stats"))
        sock.close()
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    tracer.close()
    events = json.loads(path.read_text())
    assert events == load(str(path))
    names = {e["name"] for e in events}
    assert {"misc.current /t", "misc.max /t", "memory.current /t", "EPC free"} <= names
    limit = [e["args"]["bytes"] for e in events if e["name"] == "misc.max /t"]
    assert limit == [capacity // 4]
    peak = max(e["args"]["bytes"] for e in events if e["name"] == "misc.current /t")
    assert 0 < peak <= capacity // 4
    rounds = [e for e in events if e["name"] == "sync reclaim"]
    assert rounds and all(e["ph"] == "X" and e["tid"] == os.getpid() for e in rounds)
    assert all(e["args"]["cgroup"] == "/t" for e in rounds)
    assert sum(e["args"]["cost_us"] for e in rounds) > 0
    assert any(e["name"] == "charge failed" and e["args"]["cgroup"] == "/t" for e in events)
    assert any(e["name"] == "move" and e["tid"] == os.getpid() for e in events)
    assert {"name": "thread_name", "ph": "M", "pid": tracer.pid, "tid": os.getpid(),
            "args": {"name": f"pid {os.getpid()}"}} in events
    row = next(r for r in stats["rows"] if r["path"] == "/t")
    assert row["ewb"] > 0 and row["epc_max"] == capacity // 4 and row["enclaves"] == 1
    assert stats["capacity"] == capacity and stats["rows"][0]["path"] == "/"


async def test_enomem_is_an_instant_on_the_process_track(tmp_path):
    capacity = 16 * MIB
    rig = Rig(str(tmp_path / "s"), capacity, scale=0.0)
    limited(rig, "small", capacity // 512)
    path = tmp_path / "trace.json"
    rig.steps.tracer = tracer = ChromeTrace(str(path))
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        sock = await rig.connect()
        await call(sock, "create", size=2 * capacity)
        reply = await call(sock, "add", offset=0, count=capacity // PAGE_SIZE,
                           measured=False, tcs=False)
        assert reply["errno"] == errno.ENOMEM
        sock.close()
        nursery.cancel_scope.cancel()
    tracer.close()
    events = load(str(path))
    assert [e["tid"] for e in events if e["name"] == "ENOMEM"] == [os.getpid()]


async def test_edmm_ioctl_is_a_duration_holding_its_direct_reclaim(tmp_path):
    capacity = 4 * MIB
    rig = Rig(str(tmp_path / "s"), capacity, scale=1.0)
    limited(rig, "edmm", 256 * PAGE_SIZE)
    path = tmp_path / "trace.json"
    rig.steps.tracer = tracer = ChromeTrace(str(path))
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        sock = await rig.connect()
        await call(sock, "create", size=2 * capacity)
        await call(sock, "add", offset=0, count=254, measured=False, tcs=False)
        await call(sock, "init")
        assert (await call(sock, "modify_types", offset=0, count=4, page_type=4))["ok"]
        sock.close()
        nursery.cancel_scope.cancel()
    tracer.close()
    events = load(str(path))
    (edmm,) = [e for e in events if e["name"] == "modify_types"]
    direct = [e for e in events if e["name"] == "direct reclaim"]
    assert edmm["ph"] == "X" and edmm["args"]["count"] == 4 and direct
    for d in direct:  # nested: inside the ioctl, on the same track
        assert d["tid"] == edmm["tid"]
        assert edmm["ts"] <= d["ts"] and d["ts"] + d["dur"] <= edmm["ts"] + edmm["dur"] + 1
    assert edmm["args"]["cost_us"] >= sum(d["args"]["cost_us"] for d in direct) > 0


def test_a_trace_cut_off_mid_write_still_loads(tmp_path):
    """A daemon killed with SIGKILL: no closing bracket, maybe half a last line. The
    JSON Array Format allows the missing `]`; load() reads every whole event."""
    path = tmp_path / "trace.json"
    tracer = ChromeTrace(str(path))
    tracer.instant("ENOMEM", 42)
    tracer.counter("misc.current /a", 4096)
    tracer.file.flush()
    text = path.read_text()
    assert not text.rstrip().endswith("]")
    assert len(json.loads(text + "]")) == 4  # process name, thread name, two events
    path.write_text(text + ',\n{"name":"misc.curr')
    assert [e["name"] for e in load(str(path))][-2:] == ["ENOMEM", "misc.current /a"]
    tracer.file.close()


async def test_an_oom_kill_is_an_instant_of_its_memcg(tmp_path):
    """Memory declared past memory.max: the memcg OOM killer picks this process (the
    service would SIGKILL it); the trace marks the kill against the cgroup."""
    rig = Rig(str(tmp_path / "s"), 4 * MIB, scale=0.0)
    cg = limited(rig, "m", 4 * MIB)
    cg.memory.max = 16  # pages
    path = tmp_path / "trace.json"
    rig.steps.tracer = tracer = ChromeTrace(str(path))
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        nursery.start_soon(tracer.run, rig.sgx)
        sock = await rig.connect()
        assert (await call(sock, "declare", bytes=8 * PAGE_SIZE))["ok"]
        await call(sock, "declare", bytes=64 * PAGE_SIZE)  # forced: the caller is the victim
        await trio.sleep(0.1)
        sock.close()
        nursery.cancel_scope.cancel()
    tracer.close()
    assert rig.tracker.killed == [os.getpid()]
    kills = [e for e in load(str(path)) if e["name"] == "OOM kill"]
    assert [(k["args"]["cgroup"], k["args"]["count"]) for k in kills] == [("/m", 1)]


def test_replies_that_fail_a_process_are_instants_on_its_track(tmp_path):
    """ENOMEM and a SIGBUS instead of a reply mark the process's track; other errors
    and successes do not (they are in the durations around them)."""
    path = tmp_path / "trace.json"
    tracer = ChromeTrace(str(path))
    for reply in ({"ok": True}, {"errno": errno.EINVAL}, {"errno": errno.ENOMEM, "count": 3},
                  {"signal": "SIGBUS"}):
        tracer.replied(77, reply)
    tracer.close()
    marks = [(e["name"], e["tid"]) for e in load(str(path)) if e["ph"] == "i"]
    assert marks == [("ENOMEM", 77), ("SIGBUS", 77), ("trace_end", 0)]


async def test_kernel_threads_rounds_are_durations_on_their_own_tracks(tmp_path):
    """Rounds that no process runs: ksgxd's, woken by a load past the EPC's capacity,
    and a limited cgroup's async work item, queued by faults on the no-reclaim path.
    Each is on a track named after the kernel thread (and the work item's cgroup); the
    limited load's own rounds are its sync reclaim, on its process's track."""
    capacity = 4 * MIB
    rig = Rig(str(tmp_path / "s"), capacity, scale=1.0)
    path = tmp_path / "trace.json"
    rig.steps.tracer = tracer = ChromeTrace(str(path))
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        free = await rig.connect()  # a load past capacity, in the root
        await call(free, "create", size=2 * capacity)
        pages = capacity // PAGE_SIZE
        assert (await call(free, "add", offset=0, count=pages, measured=False,
                           tcs=False))["count"] == pages
        free.close()
        await trio.sleep(0.1)
        limited(rig, "t", capacity // 4)
        sock = await rig.connect()
        await call(sock, "create", size=2 * capacity)
        await call(sock, "add", offset=0, count=pages // 2, measured=False, tcs=False)
        await call(sock, "init")
        assert (await call(sock, "touch", offset=0, count=pages // 2))["ok"]
        sock.close()
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    tracer.close()
    events = load(str(path))
    threads = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    by_name: dict[str, list[dict]] = {}
    for e in events:
        if e["ph"] == "X":
            by_name.setdefault(e["name"], []).append(e)
    assert {threads[e["tid"]] for e in by_name["ksgxd reclaim"]} == {"ksgxd"}
    assert {e["args"]["cgroup"] for e in by_name["ksgxd reclaim"]} == {"/"}
    assert {threads[e["tid"]] for e in by_name["async reclaim"]} == {"work_item /t"}
    assert {e["args"]["cgroup"] for e in by_name["async reclaim"]} == {"/t"}
    assert sum(e["args"]["cost_us"] for e in by_name["async reclaim"]) > 0
    assert "/t" in {e["args"]["cgroup"] for e in by_name["sync reclaim"]}
    assert all(threads[e["tid"]] == f"pid {os.getpid()}" for e in by_name["sync reclaim"])
