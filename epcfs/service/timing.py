"""The timing model: what each ENCLS leaf costs, in simulated microseconds.

The model counts the leaves it performs (Sgx.encls); after each model step the service
sleeps for the new leaves' cost × the scale. The costs are of the order SGX hardware
shows (EWB and ELDU encrypt or decrypt a page, EADD copies one, EEXTEND hashes 256
bytes, EINIT checks a signature); the default scale stretches them so the selftests'
oversubscribed runs at the default 128 MiB capacity last realistic seconds: one heap load
of 32768 pages takes ~6 s alone and ~15 s with eight at once, so the scripts' random kill
1–14 s after the start finds a process still running, and every case stays inside the
harness's 30 s timeout.
Scale 0 runs as fast as the model goes; tests use trio's MockClock.
"""

from __future__ import annotations

from collections.abc import Mapping

COST_US: dict[str, float] = {
    "ECREATE": 20.0,
    "EADD": 10.0,
    "EEXTEND": 1.0,  # per 256-byte block: 16 per measured page
    "EINIT": 1000.0,
    "EBLOCK": 1.0,
    "ETRACK": 2.0,
    "EPA": 5.0,  # makes a VA page
    "EWB": 15.0,
    "ELDU": 12.0,
    "EAUG": 5.0,
    "EREMOVE": 2.0,
    "EMODT": 2.0,
    "EMODPR": 2.0,
    "EACCEPT": 2.0,
}
"""Simulated cost of one ENCLS leaf (EACCEPT is ENCLU, executed inside the enclave)."""

DEFAULT_SCALE = 18.0
"""Wall-clock seconds per simulated second, calibrated on every posted selftest version at
128M: at least ~17 so the bash versions' latest random kill (14 s in) finds a load still
running; at most ~25 so the slowest case (one load under capacity/512, reclaiming every
page) stays inside the harness's 30 s; and 18 keeps a whole run of the final scripts
(~111 s) inside the kselftest runner's 120 s `timeout` setting."""


def cost(before: Mapping[str, int], after: Mapping[str, int], scale: float) -> float:
    """Wall seconds for the leaves counted between two snapshots of Sgx.encls.

    Model steps are synchronous and the loop runs one task at a time, so a snapshot
    taken right before a step and the counters right after it hold exactly that step's
    leaves, whoever else runs between steps.
    """
    total = sum((n - before.get(leaf, 0)) * COST_US.get(leaf, 0.0) for leaf, n in after.items())
    return total * scale / 1e6
