"""`epcfs top`: the EPC per cgroup of every running daemon, like systemd-cgtop.

It finds the daemons through their registry files (service.registry), including those of
`epcfs run` and `epcfs selftest` in private mount namespaces, and asks each for a row per
cgroup with the read-only `stats` op on its enclave socket. Every `-d` seconds it draws a
frame: a live table on a terminal (rich; keys pick the order, q quits), or with -b (or
when stdout is not a terminal) plain text, one frame per iteration, for scripts. Rates
(EWB/s, ELDU/s) are the difference between two frames, so the first frame shows `-`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import select
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ..protocol import MAX_MESSAGE, decode, encode
from ..service.registry import Entry, daemons

COLUMNS = (
    # key, heading, right-aligned; values as Frame.cells gives them
    ("path", "Control Group", False),
    ("epc", "EPC", True),
    ("epc_max", "EPC max", True),
    ("epc_peak", "EPC peak", True),
    ("epc_events", "max events", True),
    ("mem", "Memory", True),
    ("mem_max", "Mem max", True),
    ("oom_kill", "OOM kills", True),
    ("ewb", "EWB/s", True),
    ("eldu", "ELDU/s", True),
    ("enclaves", "Enclaves", True),
    ("procs", "Procs", True),
)
"""The table: one row per cgroup, sgx_epc and memory numbers, reclaim rates."""

ORDERS = {
    # key pressed in the live table → --order value, as systemd-cgtop's p/m/…
    "p": "path", "e": "epc", "m": "mem", "w": "ewb", "l": "eldu", "n": "enclaves",
}
"""Keys of the live table; --order takes the same names."""

REPLY_TIMEOUT = 2.0
"""Seconds to wait for a daemon's stats: a daemon busy longer than that is skipped."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", "--delay", type=float, default=1.0, metavar="SECONDS",
                   help="seconds between frames (default 1)")
    p.add_argument("-n", "--iterations", type=int, default=None, metavar="N",
                   help="stop after N frames (default: until q or Ctrl-C)")
    p.add_argument("-b", "--batch", action="store_true",
                   help="plain text, one frame after another (also when stdout is not a "
                        "terminal)")
    p.add_argument("--order", choices=sorted(set(ORDERS.values())), default="path",
                   help="sort rows by this column, largest first (default: path, "
                        "alphabetical); in the live table the keys p e m w l n")
    p.add_argument("--mountpoint", metavar="PATH",
                   help="only the daemon serving PATH (as seen in its mount namespace; "
                        "/sys/fs/cgroup for those of epcfs run and selftest)")
    p.add_argument("--daemon", type=int, metavar="PID", help="only the daemon with this pid")


@dataclass
class Snapshot:
    """One daemon's answer to `stats` at one moment."""

    entry: Entry
    at: float
    capacity: int
    rows: list[dict]


def ask(path: str) -> dict | None:
    """The `stats` reply of the daemon listening at `path`; None if it does not answer
    (it just stopped, or is too busy)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as s:
            s.settimeout(REPLY_TIMEOUT)
            s.connect(path)
            s.send(encode({"op": "stats"}))
            reply = decode(s.recv(MAX_MESSAGE))
    except (OSError, ValueError):
        return None
    return reply if reply.get("ok") else None


def query(entry: Entry) -> Snapshot | None:
    """One daemon's rows now; None if it does not answer."""
    reply = ask(entry.socket)
    if reply is None:
        return None
    return Snapshot(entry, time.monotonic(), reply["capacity"], reply["rows"])


def selected(args: argparse.Namespace) -> list[Entry]:
    found = daemons()
    if args.daemon is not None:
        found = [e for e in found if e.pid == args.daemon]
    if args.mountpoint is not None:
        found = [e for e in found if e.mountpoint == os.path.abspath(args.mountpoint)]
    return found


def size(n: int | None) -> str:
    """Bytes as systemd-cgtop shows them: 1024-based, one decimal (`-` for none)."""
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    raise AssertionError


class Frame:
    """The table of one daemon: its snapshot, with rates against the previous one."""

    def __init__(self, now: Snapshot, before: Snapshot | None, order: str) -> None:
        self.now = now
        old = {r["path"]: r for r in before.rows} if before else {}
        elapsed = now.at - before.at if before else 0.0
        self.rows = []
        for row in now.rows:
            row = dict(row)
            for leaf in ("ewb", "eldu"):
                prev = old.get(row["path"])
                # A count below the last frame's: a new cgroup at a removed one's path.
                row[leaf + "_rate"] = ((row[leaf] - prev[leaf]) / elapsed
                                       if prev is not None and elapsed > 0
                                       and row[leaf] >= prev[leaf] else None)
            self.rows.append(row)
        if order == "path":  # alphabetical, each cgroup right above its children
            self.rows.sort(key=lambda r: r["path"].split("/"))
        else:
            key = order + "_rate" if order in ("ewb", "eldu") else order
            self.rows.sort(key=lambda r: r[key] or 0, reverse=True)

    def title(self) -> str:
        e = self.now.entry
        used = self.now.rows[0]["epc"] if self.now.rows else 0
        where = e.mountpoint
        if e.namespace != _own_namespace():
            where += " (private mount namespace)"
        return (f"epcfs daemon {e.pid} at {where}, EPC {size(used)} of "
                f"{size(self.now.capacity)} used: {e.command()}")

    def cells(self) -> Iterator[list[str]]:
        for r in self.rows:
            out = []
            for key, _, _ in COLUMNS:
                if key in ("ewb", "eldu"):
                    rate = r[key + "_rate"]
                    out.append("-" if rate is None else f"{rate:.0f}")
                elif key in ("epc", "epc_max", "epc_peak", "mem", "mem_max"):
                    out.append(size(r[key]))
                else:
                    out.append("-" if r[key] is None else str(r[key]))
            yield out

    def text(self) -> str:
        """The plain-text frame of -b."""
        table = [[h for _, h, _ in COLUMNS], *self.cells()]
        widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
        lines = [self.title()]
        for row in table:
            lines.append("  ".join(c.rjust(w) if right else c.ljust(w)
                                   for c, w, (_, _, right) in zip(row, widths, COLUMNS,
                                                                  strict=True)).rstrip())
        return "\n".join(lines)

    def rich(self):
        """The live table of one daemon."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(expand=False)
        for _, heading, right in COLUMNS:
            table.add_column(heading, justify="right" if right else "left", no_wrap=True)
        for cells in self.cells():
            table.add_row(*cells)
        return Group(Text(self.title(), style="bold"), table)


def _own_namespace() -> str:
    return os.readlink("/proc/self/ns/mnt")


class Top:
    """The frames over time: each daemon's previous snapshot for the rates."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.order = args.order
        self.previous: dict[int, Snapshot] = {}

    def frames(self) -> list[Frame]:
        out = []
        current = {}
        for entry in selected(self.args):
            snap = query(entry)
            if snap is None:
                continue
            out.append(Frame(snap, self.previous.get(entry.pid), self.order))
            current[entry.pid] = snap
        self.previous = current
        return out


def run(args: argparse.Namespace) -> int:
    if args.delay <= 0 or (args.iterations is not None and args.iterations < 1):
        print("epcfs top: -d wants seconds > 0, -n a count ≥ 1", file=sys.stderr)
        return 2
    top = Top(args)
    try:
        if args.batch or not sys.stdout.isatty():
            return batch(top)
        if importlib.util.find_spec("rich") is None:  # no `observe` extra: plain frames
            return batch(top)
        return live(top)
    except KeyboardInterrupt:
        return 0


def batch(top: Top) -> int:
    n = 0
    while True:
        frames = top.frames()
        if not frames:
            print("epcfs top: no epcfs daemon is running" if not selected(top.args)
                  else "epcfs top: no daemon answered", file=sys.stderr)
            return 1
        print("\n\n".join(f.text() for f in frames), flush=True)
        n += 1
        if top.args.iterations is not None and n >= top.args.iterations:
            return 0
        print(flush=True)
        time.sleep(top.args.delay)


def live(top: Top) -> int:
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    def render():
        frames = top.frames()
        keys = "  ".join(f"{k}:{v}" for k, v in ORDERS.items())
        footer = Text(f"order: {top.order}   keys: {keys}  q:quit", style="dim")
        if not frames:
            return Group(Text("no epcfs daemon is running (waiting for one)"), footer)
        return Group(*(f.rich() for f in frames), footer)

    n = 0
    with cbreak() as keys, Live(render(), screen=True, auto_refresh=False) as view:
        view.refresh()
        while top.args.iterations is None or n + 1 < top.args.iterations:
            deadline = time.monotonic() + top.args.delay
            while (left := deadline - time.monotonic()) > 0:
                key = keys(left)
                if key == "q":
                    return 0
                if key in ORDERS:
                    top.order = ORDERS[key]
                    break
            view.update(render(), refresh=True)
            n += 1
    return 0


@contextlib.contextmanager
def cbreak():
    """Keys as they are pressed, without echo; yields `read(timeout) -> key or None`."""
    import termios
    import tty

    fd = sys.stdin.fileno()
    try:
        saved = termios.tcgetattr(fd)
    except termios.error:  # stdin is not a terminal: no keys, only the clock
        yield lambda timeout: time.sleep(timeout)
        return
    tty.setcbreak(fd)
    try:
        def read(timeout: float) -> str | None:
            ready, _, _ = select.select([fd], [], [], timeout)
            return os.read(fd, 1).decode(errors="replace") if ready else None
        yield read
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
