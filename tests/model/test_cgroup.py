"""Hierarchy rules with the kernel's errnos (kernel-facts §2): mkdir, rmdir, dying
descendants, subtree_control, process moves, and the memcg OOM decisions."""

import errno

import pytest

from epcfs.model import Hierarchy, KernelError


def err(fn, *args):
    with pytest.raises(KernelError) as e:
        fn(*args)
    return e.value.errno


@pytest.fixture
def h():
    h = Hierarchy({"sgx_epc": 1 << 20})
    h.write_subtree_control(h.root, "+misc +memory")
    return h


# -- mkdir / rmdir ---------------------------------------------------------------------

def test_mkdir_errnos(h):
    a = h.mkdir(h.root, "a")
    assert err(h.mkdir, h.root, "a") == errno.EEXIST
    assert err(h.mkdir, h.root, "x\ny") == errno.EINVAL
    h.set_max_depth(a, 1)
    b = h.mkdir(a, "b")
    assert err(h.mkdir, b, "c") == errno.EAGAIN
    h.set_max_descendants(h.root, 2)
    assert err(h.mkdir, h.root, "d") == errno.EAGAIN
    assert err(h.mkdir, h.root, "a") == errno.EAGAIN  # the limit is checked before EEXIST


def test_new_cgroup_gets_the_parents_subtree_controllers(h):
    a = h.mkdir(h.root, "a")
    assert a.controllers == {"misc", "memory"} and a.misc is not None and a.memory is not None
    b = h.mkdir(a, "b")
    assert b.controllers == frozenset() and b.misc is None and b.effective_misc() is a.misc


def test_rmdir_busy_while_populated_or_with_children(h):
    a = h.mkdir(h.root, "a")
    b = h.mkdir(a, "b")
    h.move(7, b)
    assert err(h.rmdir, b) == errno.EBUSY
    assert err(h.rmdir, a) == errno.EBUSY
    assert err(h.rmdir, h.root) == errno.EBUSY
    h.exit(7)
    assert err(h.rmdir, a) == errno.EBUSY  # live child
    h.rmdir(b)
    h.rmdir(a)
    assert h.root.nr_descendants == 0 and h.root.nr_dying_descendants == 0


def test_charged_cgroup_lingers_as_dying_until_uncharged(h):
    a = h.mkdir(h.root, "a")
    h.misc.try_charge("sgx_epc", a.misc, 4096)
    css = a.misc
    h.rmdir(a)
    assert h.root.nr_dying_descendants == 1 and css.dead and css in h.root.misc.children
    assert err(h.mkdir, a, "x") == errno.ENODEV
    h.misc_uncharge("sgx_epc", css, 4096)
    assert h.root.nr_dying_descendants == 0 and css not in h.root.misc.children


# -- subtree_control and process moves -------------------------------------------------

def test_subtree_control_errnos(h):
    a = h.mkdir(h.root, "a")
    assert err(h.write_subtree_control, a, "+nosuch") == errno.EINVAL
    assert err(h.write_subtree_control, a, "misc") == errno.EINVAL
    b = h.mkdir(a, "b")
    assert err(h.write_subtree_control, b, "+misc") == errno.ENOENT  # not in b's controllers
    h.write_subtree_control(a, "+misc")
    h.write_subtree_control(b, "+misc")
    assert err(h.write_subtree_control, a, "-misc") == errno.EBUSY  # b still enables it
    h.write_subtree_control(a, "+misc +misc -memory")  # no-ops are fine
    c = h.mkdir(h.root, "c")
    h.move(5, c)
    assert err(h.write_subtree_control, c, "+misc") == errno.EBUSY  # no internal processes
    h.move(6, h.root)
    h.write_subtree_control(h.root, "+misc")  # the root is exempt


def test_move_into_a_cgroup_that_enables_controllers_is_ebusy(h):
    a = h.mkdir(h.root, "a")
    h.write_subtree_control(a, "+misc")
    assert err(h.move, 5, a) == errno.EBUSY
    h.move(5, h.root)
    assert h.cgroup_of(5) is h.root and h.cgroup_of(99) is h.root


# -- memory and the OOM killer ---------------------------------------------------------

def test_oom_picks_the_biggest_process_and_waits_for_it(h):
    a = h.mkdir(h.root, "a")
    for pid in (1, 2, 3):
        h.move(pid, a)
    a.memory.max = 100
    h.declare_memory(1, 10)
    h.declare_memory(2, 50)
    h.declare_memory(3, 30)
    assert not h.memory_try_charge(a.memory, 20, owner=1, current=1)
    assert h.oom_kills == [2] and h.oom_victims == {2}
    assert a.memory.events["max"] == 1 and a.memory.events["oom"] == 1
    assert a.memory.events["oom_kill"] == 1
    assert not h.memory_try_charge(a.memory, 20, owner=1, current=3)
    assert h.oom_kills == [2]  # no second victim while the first is still exiting
    assert h.memory_try_charge(a.memory, 20, owner=2, current=2)  # the victim is forced
    assert a.memory.usage == 110
    h.exit(2)  # its declared memory goes; what it was charged as an owner stays
    assert a.memory.usage == 60 and not h.oom_victims


def test_declare_memory_over_the_limit_is_enomem_and_exit_uncharges(h):
    a = h.mkdir(h.root, "a")
    h.move(1, a)
    h.move(2, a)
    a.memory.max = 10
    h.declare_memory(1, 2)
    h.declare_memory(2, 6)
    with pytest.raises(KernelError) as e:
        h.declare_memory(1, 8)
    assert e.value.errno == errno.ENOMEM and a.memory.usage == 8
    assert h.oom_kills == [2]
    h.declare_memory(2, 8)  # the victim itself is forced through
    assert a.memory.usage == 16
    h.exit(2)
    h.exit(1)
    assert a.memory.usage == 0 and h.proc_memory == {}


def test_memory_max_below_usage_queues_a_kill(h):
    a = h.mkdir(h.root, "a")
    h.move(1, a)
    h.declare_memory(1, 50)
    h.set_memory_max(a.memory, 20)
    assert h.oom_kills == [1] and a.memory.max == 20
