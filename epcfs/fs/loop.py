"""The FUSE request loop, tuned: pyfuse3's own loop with a cheaper wait between requests.

`cat misc.current` is three FUSE requests (OPEN, READ, RELEASE), so the cost of getting
from one request to the next dominates. pyfuse3's session loop waits for /dev/fuse with
trio.lowlevel.wait_readable before every request, even when the next one is already
queued: an epoll_ctl, an extra epoll_wait and a park/unpark of the task each time. This
module replaces that wait (pyfuse3's module-level `_wait_fuse_readable`, which its
compiled session loop looks up by name on every call) with one that

1. yields once (a trio checkpoint), so every other task (process tracker, reclaimers)
   still runs between two requests;
2. returns at once if a request is already queued (a poll() with zero timeout): the
   session loop then reads it without yielding, so no other task can take it first;
3. otherwise one task (the watcher) polls for up to SPIN_SECONDS before sleeping in
   wait_readable: a reader's next request (READ right after OPEN) usually arrives within
   that window, and catching it without a sleep/wake-up cycle roughly halves the latency
   of a single `cat`; the other idle workers park until the watcher leaves.

The loop is not held longer than SPIN_SECONDS by the spin. (Skipping the spin while other
tasks are runnable was tried: the idle workers this loop itself wakes count as runnable,
so it almost never spun and a lone `cat` got ~40% slower.) The device stays blocking:
"poll, then read without yielding" guarantees that whoever reads it has a request to
read. pyfuse3.terminate is wrapped so a stopping flag is seen by parked workers (the
original checks fuse_session_exited(), which Python cannot), and an unmount (the device
polls POLLERR) wakes them all, so each reads the end of the session and leaves.

If pyfuse3 ever stops exposing `_wait_fuse_readable`, `main()` runs pyfuse3's loop
unchanged.
"""

from __future__ import annotations

import logging
import os
import select
import time

import pyfuse3
import trio

log = logging.getLogger(__name__)

SPIN_SECONDS = 100e-6
"""How long to poll for the next request before sleeping (one round trip of a reader)."""

WORKERS = 8
"""Session-loop tasks. Handlers that await (entry invalidation after a subtree_control
write) occupy one each; the rest keep answering, which the invalidation itself needs."""

_stopping = False


def _fuse_fd() -> int | None:
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                return int(name)
        except OSError:
            continue
    return None


def _install() -> bool:
    global _stopping
    fd = _fuse_fd()
    if fd is None or not hasattr(pyfuse3, "_wait_fuse_readable"):
        log.warning("pyfuse3 internals not as expected: using its own request loop")
        return False
    _stopping = False
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poll = poller.poll
    clock = time.perf_counter
    checkpoint = trio.lowlevel.checkpoint
    idle = trio.lowlevel.ParkingLot()
    watching = False

    gone = select.POLLERR | select.POLLHUP | select.POLLNVAL

    def ready() -> bool:
        events = poll(0)
        if events and events[0][1] & gone:
            # unmounted: every worker must read once more to see the end and leave
            idle.unpark_all()
        return bool(events)

    async def wait_fuse_readable() -> bool:
        nonlocal watching
        await checkpoint()
        while not _stopping:
            if ready():
                return True  # the caller reads it before anything else runs
            if watching:
                await idle.park()
                continue
            watching = True
            try:
                end = clock() + SPIN_SECONDS
                while clock() < end:
                    if ready():
                        return True
                await trio.lowlevel.wait_readable(fd)
            except trio.ClosedResourceError:
                return False
            finally:
                watching = False
                idle.unpark()
        return False

    original_terminate = pyfuse3.terminate

    def terminate() -> None:
        global _stopping
        _stopping = True
        idle.unpark_all()
        original_terminate()

    pyfuse3._wait_fuse_readable = wait_fuse_readable
    pyfuse3.terminate = terminate
    return True


async def main() -> None:
    """pyfuse3.main() with the cheaper wait; call after pyfuse3.init()."""
    if _install():
        await pyfuse3.main(1, WORKERS)
    else:
        await pyfuse3.main()
