"""Choosing the membership mode (--membership auto|cgroup|events), and cgroup v1's
pair of trackers."""

from __future__ import annotations

import logging

from ..model.cgroup import Cgroup, Hierarchy
from .cgroup_tracker import MirrorTracker
from .events import EventTracker
from .mirror import Mirror
from .tracker import ProcessTracker

log = logging.getLogger(__name__)

MODES = ("auto", "cgroup", "events")
"""--membership choices: auto is cgroup where a writable cgroup2 hierarchy allows it."""


def open_tracker(hierarchy: Hierarchy, mode: str) -> ProcessTracker:
    """A tracker for `hierarchy` in `mode`, logged as "membership: MODE". OSError if
    `mode` is cgroup and that cannot work here. A hierarchy of the v1 layout is mirrored
    in a named v1 hierarchy, a v2 one in the daemon's cgroup2 cgroup (see Mirror)."""
    if mode == "events":
        log.info("membership: events")
        return EventTracker(hierarchy)
    legacy = hierarchy.root.legacy
    try:
        mirror = Mirror(legacy=next(iter(legacy)) if legacy else None)
    except OSError as e:
        if mode == "cgroup":
            raise
        log.info("membership: events (no cgroup hierarchy to mirror in: %s)", e)
        return EventTracker(hierarchy)
    log.info("membership: cgroup (mirrored in %s)", mirror.where)
    return MirrorTracker(hierarchy, mirror)


class LegacyTrackers:
    """cgroup v1: a process is in one cgroup of each hierarchy, so each hierarchy has its
    own tracker (fork inheritance, moves and exits are independent per hierarchy). This
    is what the service (enclave server, stepper) sees in place of a single tracker."""

    def __init__(self, *trackers: ProcessTracker) -> None:
        self.trackers = trackers

    def cgroup_of(self, pid: int) -> Cgroup:
        """Resolve (and register) `pid` in every hierarchy; its cgroup in the first."""
        found = [tracker.cgroup_of(pid) for tracker in self.trackers]
        return found[0]

    def settle(self, scan: bool = True) -> None:
        for tracker in self.trackers:
            tracker.settle(scan)

    def deliver_oom_kills(self) -> None:
        for tracker in self.trackers:
            tracker.deliver_oom_kills()

    async def run(self) -> None:
        import trio

        async with trio.open_nursery() as nursery:
            for tracker in self.trackers:
                nursery.start_soon(tracker.run)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
