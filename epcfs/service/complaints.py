"""One short log line per malformed request, at most one line per COMPLAINT_INTERVAL."""

from __future__ import annotations

import logging

COMPLAINT_INTERVAL = 1.0
"""Seconds between two log lines about malformed requests. Any local user can send them
as fast as the socket takes them; a line a second is enough to see that it happens and
bounds the log at ~100 bytes/s however hard someone tries."""


class Complaints:
    """Logs the first malformed request, then at most one per interval, with how many
    were left unlogged since the last line. Time comes from the caller (trio's clock)."""

    def __init__(self, log: logging.Logger, interval: float = COMPLAINT_INTERVAL) -> None:
        self.log = log
        self.interval = interval
        self.next_at = float("-inf")
        self.suppressed = 0

    def note(self, now: float, pid: int, why: str) -> None:
        if now < self.next_at:
            self.suppressed += 1
            return
        more = f" (and {self.suppressed} more since the last)" if self.suppressed else ""
        self.log.warning("malformed enclave request from pid %d: %s%s", pid, why, more)
        self.suppressed = 0
        self.next_at = now + self.interval
