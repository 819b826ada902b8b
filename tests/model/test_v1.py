"""cgroup v1: two hierarchies, misc and memory; EPC charges follow a process's cgroup in
the misc one, backing-store and declared memory its cgroup in the memory one."""

from __future__ import annotations

import errno

import pytest

from epcfs.model import Hierarchy, Sgx
from epcfs.model.errors import KernelError
from epcfs.model.invariants import check_invariants

from .helpers import MiB, encl_size

PID = 100


def make_v1() -> tuple[Hierarchy, Hierarchy, Sgx]:
    misc = Hierarchy(legacy="misc")
    misc.mem = Hierarchy(legacy="memory")
    sgx = Sgx(misc, [(0, 16 * MiB)])
    sgx.sanitize_all()
    return misc, misc.mem, sgx


def test_every_cgroup_has_its_hierarchys_controller_only():
    misc, memory, _ = make_v1()
    a = misc.mkdir(misc.root, "a")
    b = misc.mkdir(a, "b")
    m = memory.mkdir(memory.root, "a")
    assert misc.root.name == "misc" and memory.root.name == "memory"
    assert b.controllers == frozenset({"misc"}) and b.misc is not None and b.memory is None
    assert m.controllers == frozenset({"memory"}) and m.memory is not None and m.misc is None
    misc.move(PID, a)  # no no-internal-process rule
    assert misc.cgroup_of(PID) is a and memory.cgroup_of(PID) is memory.root


def test_charges_follow_each_hierarchy():
    misc, memory, sgx = make_v1()
    a = misc.mkdir(misc.root, "a")
    m = memory.mkdir(memory.root, "m")
    misc.move(PID, a)
    memory.move(PID, m)
    m.memory.max = 40
    assert misc.misc_of(PID) is a.misc and misc.memcg_of(PID) is m.memory
    encl = sgx.create(PID, encl_size(64))
    sgx.add_pages(encl, PID, 0, 64, False)
    assert a.misc.res["sgx_epc"].usage > 0
    memory.declare_memory(PID, 10)
    assert m.memory.usage == 10
    memory.declare_memory(PID, 31)  # over: the OOM victim is the charging task, forced
    assert memory.oom_kills == [PID] and m.memory.failcnt == 1 and m.memory.usage == 41
    assert misc.oom_kills == []
    check_invariants(sgx)
    sgx.release(encl)
    memory.exit(PID)
    misc.exit(PID)
    assert m.memory.usage == 0 and a.misc.res["sgx_epc"].usage == 0
    check_invariants(sgx)


def test_v1_limit_rules():
    _, memory, _ = make_v1()
    m = memory.mkdir(memory.root, "m")
    with pytest.raises(KernelError) as e:
        memory.set_memory_limit_v1(m.memory, 100, memsw=True)  # below the memory limit
    assert e.value.errno == errno.EINVAL
    memory.set_memory_limit_v1(m.memory, 100, memsw=False)
    memory.set_memory_limit_v1(m.memory, 100, memsw=True)
    with pytest.raises(KernelError) as e:
        memory.set_memory_limit_v1(m.memory, 101, memsw=False)  # above memsw
    assert e.value.errno == errno.EINVAL
    memory.move(PID, m)
    memory.declare_memory(PID, 50)
    with pytest.raises(KernelError) as e:
        memory.set_memory_limit_v1(m.memory, 49, memsw=False)
    assert e.value.errno == errno.EBUSY and m.memory.max == 100
    with pytest.raises(KernelError) as e:
        memory.set_memory_limit_v1(memory.root.memory, 10, memsw=False)
    assert e.value.errno == errno.EINVAL
