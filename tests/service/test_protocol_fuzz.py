"""The enclave socket holds every request to its field table before any handler runs:
malformed and hostile messages get the kernel's errno, change nothing, cost at most one
log line a second, and never a traceback. In-process under MockClock, as the other
service tests: this is the socket's contract, not filesystem behaviour."""

from __future__ import annotations

import errno
import json
import logging
import os
import random

import pytest
import trio
import trio.testing

from epcfs.model.cgroup import Hierarchy
from epcfs.model.constants import PAGE_SIZE
from epcfs.model.invariants import check_invariants
from epcfs.protocol import OPS, U64_MAX, decode
from epcfs.service.complaints import COMPLAINT_INTERVAL
from epcfs.service.steps import WAIT_MAX
from tests.service.test_enclave_server import Rig, call

MIB = 1 << 20
REPLY_TIMEOUT = 600.0
"""Virtual seconds a reply may take: far more than any of these requests costs."""

FAULTING = {"touch", "augment", "accept", "vepc"}
"""Requests that stand for accesses from inside an enclave or a guest: page faults,
which the kernel retries for as long as no EPC page can be had for them."""
SERVER_LOG = "epcfs.service.enclave_server"


@pytest.fixture
def autojump():
    return trio.testing.MockClock(autojump_threshold=0)


def usages(h: Hierarchy) -> list[int]:
    """Every page counter in the hierarchy: misc sgx_epc and memory, every cgroup."""
    out = []
    for cg in h.root.walk():
        if cg.misc is not None:
            out.append(cg.misc.res["sgx_epc"].usage)
        if cg.memory is not None:
            out.append(cg.memory.usage)
    return out


def server_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == SERVER_LOG]


async def test_negative_declare_is_einval_and_charges_nothing(tmp_path, caplog):
    rig = Rig(str(tmp_path / "s"), 1 * MIB, scale=0.0)
    cg = rig.h.mkdir(rig.h.root, "w")
    rig.h.write_subtree_control(rig.h.root, "+memory +misc")
    rig.h.move(os.getpid(), cg)
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        sock = await rig.connect()
        assert await call(sock, "declare", bytes=-10 * MIB) == {"errno": errno.EINVAL}
        assert cg.memory.usage == 0
        assert await call(sock, "declare", bytes=2 * PAGE_SIZE) == {"ok": True}
        assert cg.memory.usage == 2
        sock.close()
        nursery.cancel_scope.cancel()


async def test_add_pages_with_count_0_is_einval(tmp_path):
    """sgx_validate_offset_length(): a zero length is EINVAL, nothing added."""
    rig = Rig(str(tmp_path / "s"), 1 * MIB, scale=0.0)
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        sock = await rig.connect()
        assert (await call(sock, "create", size=64 * PAGE_SIZE))["ok"]
        before = rig.h.root.misc.res["sgx_epc"].usage
        reply = await call(sock, "add", offset=0, count=0, measured=True, tcs=False)
        assert reply == {"errno": errno.EINVAL}
        for op in ("remove", "modify_types", "restrict"):
            extra = {"page_type": 4} if op == "modify_types" else (
                {"permissions": 1} if op == "restrict" else {})
            assert (await call(sock, op, offset=0, count=0, **extra))["errno"] == errno.EINVAL
        assert rig.h.root.misc.res["sgx_epc"].usage == before
        sock.close()
        nursery.cancel_scope.cancel()


async def test_types_are_exact(tmp_path):
    """A bool is not a count, 1.0 is not 1, "1" is not 1: each is EINVAL."""
    rig = Rig(str(tmp_path / "s"), 1 * MIB, scale=0.0)
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        sock = await rig.connect()
        assert (await call(sock, "create", size=64 * PAGE_SIZE))["ok"]
        for bad in (True, 1.0, "1", None, [1], {"n": 1}, -1, U64_MAX):
            reply = await call(sock, "add", offset=0, count=bad, measured=False, tcs=False)
            assert reply == {"errno": errno.EINVAL}, bad
        reply = await call(sock, "add", offset=0, count=1, measured=1, tcs=False)
        assert reply == {"errno": errno.EINVAL}
        assert (await call(sock, "add", offset=0, count=1, measured=False, tcs=False))["ok"]
        sock.close()
        nursery.cancel_scope.cancel()


async def test_deep_nesting_gets_einval_and_one_short_line(tmp_path, caplog):
    rig = Rig(str(tmp_path / "s"), 1 * MIB, scale=0.0)
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        sock = await rig.connect()
        for payload in (b"[" * 60000, b'{"op":' * 10000, b"[" * 30 + b"]" * 30):
            await sock.send(payload)
            assert decode(await sock.recv(65536)) == {"errno": errno.EINVAL}
        sock.close()
        nursery.cancel_scope.cancel()
    records = server_records(caplog)
    assert len(records) == 1
    assert records[0].exc_info is None and "\n" not in records[0].getMessage()


def hostile_messages(rng: random.Random, n: int):
    """Random requests: real ops with random values of random types, junk, extremes."""
    values = [0, 1, 2, 7, 64, 4096, -1, -(1 << 70), 1 << 64, U64_MAX, (1 << 52),
              True, False, None, 1.5, float("1e308"), "", "x" * 100, [], {}, [[[]]]]
    junk = [b"", b"\x00", b"\xff\xfe", b"null", b"[]", b"42", b'"op"', b"{", b"}" * 100,
            b'{"op": "create"', b"[" * 5000, b'{"op": "add", "op": "info"}',
            b'{"op": NaN}', b'{"op": "declare", "bytes": 1e999}']
    ops = list(OPS)
    for _ in range(n):
        kind = rng.random()
        if kind < 0.15:
            yield rng.choice(junk)
        elif kind < 0.2:
            yield rng.randbytes(rng.randrange(1, 200))
        else:
            op = rng.choice(ops + ["", "nope", "__class__"])
            fields = {name: (rng.choice(values) if rng.random() < 0.5
                             else rng.randrange(0, 70))
                      for name in OPS.get(op, {}) if rng.random() < 0.95}
            if rng.random() < 0.1:
                fields["extra"] = rng.choice(values)
            yield json.dumps({"op": op, **fields}).encode()


async def test_fuzz_keeps_serving_and_consistent(tmp_path, caplog, autojump):
    """Thousands of random and hostile messages on several connections: every one gets
    a reply, no counter anywhere goes negative, every hang-up frees everything, and the
    log carries no traceback and at most one line per COMPLAINT_INTERVAL."""
    caplog.set_level(logging.INFO)
    rng = random.Random(10)
    rig = Rig(str(tmp_path / "s"), 1 * MIB, scale=0.0)
    cg = rig.h.mkdir(rig.h.root, "fuzz")
    rig.h.write_subtree_control(rig.h.root, "+memory +misc")
    cg.misc.res["sgx_epc"].max = 512 * 1024
    rig.h.move(os.getpid(), cg)

    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        for _ in range(20):
            sock = await rig.connect()
            for payload in hostile_messages(rng, 200):
                if not payload:
                    continue  # an empty datagram is a hang-up on SEQPACKET
                await sock.send(payload)
                with trio.move_on_after(REPLY_TIMEOUT) as waiting:
                    reply = decode(await sock.recv(65536))
                if waiting.cancelled_caught:
                    # Only an access may wait for good: a fault the kernel answers with
                    # NOPAGE retries while nothing can be reclaimed for it (a vEPC holding
                    # the EPC). Meanwhile everyone else is served; the process ends it by
                    # dying, so the client hangs up as a killed process would.
                    assert json.loads(payload)["op"] in FAULTING, payload[:200]
                    other = await rig.connect()
                    assert (await call(other, "info"))["ok"]
                    other.close()
                    break
                assert reply.keys() & {"ok", "errno", "signal"}, reply
                assert all(u >= 0 for u in usages(rig.h))
                check_invariants(rig.sgx)
            await trio.sleep(0.05)  # virtual time passes between connections
            sock.close()
            # A request in progress notices the hang-up at its next step (a waiting
            # fault: within WAIT_MAX); then everything the connection held is freed.
            with trio.move_on_after(2 * WAIT_MAX):
                while rig.h.root.misc.res["sgx_epc"].usage:
                    await trio.sleep(0.01)
            assert rig.h.root.misc.res["sgx_epc"].usage == 0, "hang-up left pages"
        # Still serving a well-formed client after all that.
        sock = await rig.connect()
        assert (await call(sock, "create", size=64 * PAGE_SIZE))["ok"]
        sock.close()
        nursery.cancel_scope.cancel()

    elapsed = trio.current_time()
    records = server_records(caplog)
    assert not [r for r in records if r.exc_info or r.levelno >= logging.ERROR]
    assert all("\n" not in r.getMessage() for r in records)
    assert 1 <= len(records) <= elapsed / COMPLAINT_INTERVAL + 1
