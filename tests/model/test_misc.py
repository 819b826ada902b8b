"""The misc controller's charge rules (kernel-facts §1): EBUSY with rollback, which
levels count events, and the peak quirk."""

import errno

import pytest

from epcfs.model import Hierarchy, KernelError
from epcfs.model.constants import U64_MAX

CAP = 100


@pytest.fixture
def tree():
    """root → a → b → c with misc on every level; sgx_epc capacity CAP."""
    h = Hierarchy({"sgx_epc": CAP})
    h.write_subtree_control(h.root, "+misc")
    a = h.mkdir(h.root, "a")
    h.write_subtree_control(a, "+misc")
    b = h.mkdir(a, "b")
    h.write_subtree_control(b, "+misc")
    c = h.mkdir(b, "c")
    return h, a, b, c


def res(cg):
    return cg.misc.res["sgx_epc"]


def test_charge_is_hierarchical_and_raises_peaks(tree):
    h, a, b, c = tree
    h.misc.try_charge("sgx_epc", c.misc, 10)
    for cg in (h.root, a, b, c):
        assert res(cg).usage == 10 and res(cg).watermark == 10
    h.misc_uncharge("sgx_epc", c.misc, 4)
    for cg in (h.root, a, b, c):
        assert res(cg).usage == 6 and res(cg).watermark == 10


def test_failure_rolls_back_every_level_and_returns_ebusy(tree):
    h, a, b, c = tree
    res(a).max = 15
    h.misc.try_charge("sgx_epc", c.misc, 10)
    with pytest.raises(KernelError) as e:
        h.misc.try_charge("sgx_epc", c.misc, 10)
    assert e.value.errno == errno.EBUSY
    assert [res(cg).usage for cg in (h.root, a, b, c)] == [10, 10, 10, 10]


def test_events_count_at_the_failing_level_and_above_local_only_there(tree):
    h, a, b, c = tree
    res(b).max = 5
    with pytest.raises(KernelError):
        h.misc.try_charge("sgx_epc", c.misc, 6)
    assert (res(c).events, res(c).events_local) == (0, 0)
    assert (res(b).events, res(b).events_local) == (1, 1)
    assert (res(a).events, res(a).events_local) == (1, 0)


def test_peak_quirk_lower_levels_keep_the_transient_peak(tree):
    h, a, b, c = tree
    res(a).max = 15
    h.misc.try_charge("sgx_epc", c.misc, 10)
    with pytest.raises(KernelError):
        h.misc.try_charge("sgx_epc", c.misc, 10)
    assert res(c).watermark == res(b).watermark == 20  # passed their check, then rolled back
    assert res(a).watermark == 10 and res(h.root).watermark == 10


def test_capacity_limits_every_level(tree):
    h, a, b, c = tree
    assert res(c).max == U64_MAX
    with pytest.raises(KernelError) as e:
        h.misc.try_charge("sgx_epc", c.misc, CAP + 1)
    assert e.value.errno == errno.EBUSY
    assert res(c).events_local == 1  # the first level checked fails on capacity


def test_no_capacity_is_einval_and_zero_amount_is_free(tree):
    h, a, b, c = tree
    with pytest.raises(KernelError) as e:
        h.misc.try_charge("sev", c.misc, 1)
    assert e.value.errno == errno.EINVAL
    h.misc.try_charge("sgx_epc", c.misc, 0)
    assert res(h.root).usage == 0 and res(c).watermark == 0


def test_limit_below_usage_is_kept_and_only_stops_later_charges(tree):
    h, a, b, c = tree
    h.misc.try_charge("sgx_epc", c.misc, 50)
    res(b).max = 10
    assert res(b).usage == 50
    with pytest.raises(KernelError):
        h.misc.try_charge("sgx_epc", c.misc, 1)
    h.misc_uncharge("sgx_epc", c.misc, 45)
    h.misc.try_charge("sgx_epc", c.misc, 5)
    assert res(b).usage == 10


def test_count_failure_matches_failed_charges(tree):
    h, a, b, c = tree
    h.misc.count_failure("sgx_epc", b.misc, 7)
    assert (res(b).events_local, res(b).events, res(a).events, res(c).events) == (7, 7, 7, 0)
