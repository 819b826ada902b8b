"""Where `epcfs top` finds the daemons: one small file per daemon in DAEMONS_DIR.

Every daemon — `epcfs mount`, and the ones `epcfs run` and `epcfs selftest` start in
their private mount namespaces — writes `<pid namespace>-<pid>.json` there (its pid,
mountpoint, enclave socket, mount and pid namespaces) while it serves, and removes it
when it stops. A private mount namespace still shares /run's and /tmp's files with the
host (it copies the mounts, not the filesystems), so a reader in any namespace sees
every entry and reaches each daemon through its socket. A daemon killed with SIGKILL
leaves its file behind: readers skip an entry whose pid is gone, or, for a daemon in
another pid namespace (its pid means nothing here), whose socket refuses; the next
daemon to register removes such entries.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket as sockets
from collections.abc import Iterator
from dataclasses import asdict, dataclass

DAEMONS_DIR = "/run/epcfs/daemons"
"""Beside the default sockets in /run/epcfs: runtime state, gone at reboot."""


@dataclass
class Entry:
    pid: int
    mountpoint: str
    socket: str
    namespace: str
    """The daemon's mount namespace (`mnt:[inode]`): its mountpoint is a path there."""
    pidns: str
    """The daemon's pid namespace (`pid:[inode]`): its pid is a pid there."""

    def alive(self) -> bool:
        """Whether the daemon still runs: its pid, when that means the same process here;
        else whether its socket still accepts."""
        if self.pidns == _own("pid"):
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                pass  # a root daemon, asked by a user: it is there
            return True
        with sockets.socket(sockets.AF_UNIX, sockets.SOCK_SEQPACKET) as s:
            # Never wait on a peer: this runs in a daemon's loop before it serves. A full
            # backlog (EAGAIN) is a daemon that is there but busy.
            s.setblocking(False)
            try:
                s.connect(self.socket)
            except BlockingIOError:
                return True
            except OSError:
                return False
        return True

    def filename(self) -> str:
        return f"{self.pidns.strip('pid:[]')}-{self.pid}.json"

    def command(self) -> str:
        """The epcfs command that started the daemon, e.g. `epcfs selftest …` (a detached
        daemon is a fork of the command that asked for it): from its first argument
        naming epcfs, without the interpreter and the program's directory."""
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                argv = [os.fsdecode(a) for a in f.read().rstrip(b"\0").split(b"\0")]
        except OSError:
            return ""
        for i, arg in enumerate(argv):
            if arg == "epcfs.cli" or os.path.basename(arg) == "epcfs":
                return " ".join(["epcfs", *argv[i + 1:]])
        return " ".join(argv)


@contextlib.contextmanager
def registered(mountpoint: str, socket: str, directory: str = DAEMONS_DIR) -> Iterator[Entry]:
    """This process is a daemon serving `mountpoint` with its enclave `socket`, for the
    duration of the block."""
    entry = Entry(os.getpid(), mountpoint, os.path.abspath(socket), _own("mnt"), _own("pid"))
    os.makedirs(directory, exist_ok=True)
    for stale in _entries(directory, live=False):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, stale.filename()))
    path = os.path.join(directory, entry.filename())
    with open(path + ".tmp", "w") as f:
        json.dump(asdict(entry), f)
    os.replace(path + ".tmp", path)  # readers never see half a file
    try:
        yield entry
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def daemons(directory: str = DAEMONS_DIR) -> list[Entry]:
    """The registered daemons that are still running, by pid."""
    return sorted(_entries(directory, live=True), key=lambda e: e.pid)


def _entries(directory: str, live: bool) -> list[Entry]:
    """The entries whose daemon is running (`live`), or those left by dead ones."""
    found = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(directory, name)) as f:
                entry = Entry(**json.load(f))
        except (OSError, ValueError, TypeError):
            continue  # being replaced, or not ours
        if name == entry.filename() and entry.alive() == live:
            found.append(entry)
    return found


def _own(kind: str) -> str:
    """This process's namespace of `kind` ("mnt", "pid"), as `kind:[inode]`."""
    return os.readlink(f"/proc/self/ns/{kind}")
